//! `apiwarden consumers add|list|remove`: consumers kept in the store (SQLite, or PostgreSQL in
//! fleet mode), beside those of the config file.

use anyhow::{Context, Result};
use apiwarden_core::config::Config;
use apiwarden_gateway::keystore::{KeyStore, StoredConsumer};
use clap::Subcommand;
use std::collections::BTreeMap;

#[derive(Subcommand)]
pub enum ConsumersCommand {
    /// Add a consumer to the store, or replace the settings of one there. Every gateway using
    /// the store takes it up within a second.
    Add {
        name: String,
        /// Scopes, comma-separated.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Roles, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Addresses or CIDR networks the consumer's credentials are accepted from,
        /// comma-separated (default: anywhere).
        #[arg(long, value_delimiter = ',')]
        allow_ips: Option<Vec<String>>,
        /// Metadata, `KEY=VALUE`; repeat for several.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// `[jwt.NAME]` / `[introspection.NAME]` tables whose token clients of this name act
        /// as this consumer, comma-separated.
        #[arg(long, value_delimiter = ',')]
        token_issuers: Vec<String>,
        /// Print the consumer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the consumers: those of the config file and those of the store.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove a consumer from the store and revoke its keys.
    Remove { name: String },
}

fn config_json(c: &apiwarden_core::config::ConsumerConfig) -> serde_json::Value {
    serde_json::json!({
        "name": c.name, "scopes": c.scopes, "roles": c.roles,
        "allow_ips": c.allow_ips.as_ref().map(|n| n.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
        "metadata": c.metadata,
        "source": "config",
    })
}

fn stored_json(c: &StoredConsumer) -> serde_json::Value {
    let mut v = serde_json::to_value(c).expect("a consumer serialises");
    v["source"] = "store".into();
    v
}

pub fn run(cmd: ConsumersCommand, cfg: &Config) -> Result<()> {
    let mut store = KeyStore::open(cfg).context(
        "cannot open the store; check storage.data_dir (or storage.database) and storage.pepper",
    )?;
    store.set_actor(crate::block::actor());
    match cmd {
        ConsumersCommand::Add {
            name,
            scopes,
            roles,
            allow_ips,
            metadata,
            token_issuers,
            json,
        } => {
            let mut meta = BTreeMap::new();
            for m in metadata {
                let (k, v) = m
                    .split_once('=')
                    .with_context(|| format!("--meta {m:?}: write KEY=VALUE"))?;
                meta.insert(k.to_string(), v.to_string());
            }
            let consumer = StoredConsumer {
                name: name.clone(),
                scopes,
                roles,
                allow_ips,
                metadata: meta,
                token_issuers,
                created_at: 0,
                updated_at: 0,
            };
            let new = store.put_consumer(cfg, consumer)?;
            let saved = store
                .consumers()?
                .into_iter()
                .find(|c| c.name == name)
                .context("the consumer was saved but cannot be read back")?;
            if json {
                println!("{}", stored_json(&saved));
            } else {
                println!(
                    "consumer {name} {} (scopes: {}; roles: {}; allow_ips: {})",
                    if new { "added" } else { "updated" },
                    saved.scopes.join(","),
                    saved.roles.join(","),
                    saved
                        .allow_ips
                        .as_ref()
                        .map_or("any".into(), |n| n.join(","))
                );
            }
        }
        ConsumersCommand::List { json } => {
            let stored = store.consumers()?;
            if json {
                for c in &cfg.consumers {
                    println!("{}", config_json(c));
                }
                for c in &stored {
                    println!("{}", stored_json(c));
                }
                return Ok(());
            }
            println!(
                "{:<24} {:<7} {:<30} {:<20} allow_ips",
                "consumer", "source", "scopes", "roles"
            );
            let ips = |n: Option<Vec<String>>| n.map_or("any".into(), |n| n.join(","));
            for c in &cfg.consumers {
                println!(
                    "{:<24} {:<7} {:<30} {:<20} {}",
                    c.name,
                    "config",
                    c.scopes.join(","),
                    c.roles.join(","),
                    ips(c
                        .allow_ips
                        .as_ref()
                        .map(|n| n.iter().map(|n| n.to_string()).collect()))
                );
            }
            for c in stored {
                println!(
                    "{:<24} {:<7} {:<30} {:<20} {}",
                    c.name,
                    "store",
                    c.scopes.join(","),
                    c.roles.join(","),
                    ips(c.allow_ips)
                );
            }
        }
        ConsumersCommand::Remove { name } => {
            let revoked = store.remove_consumer(cfg, &name)?;
            println!("consumer {name} removed; {revoked} of its keys revoked");
        }
    }
    Ok(())
}
