//! `apiwarden keys create|list|rotate|revoke`: API keys from the command line.

use anyhow::{Context, Result};
use apiwarden_core::config::Config;
use apiwarden_gateway::admin_api::{key_json as record_json, key_warnings as warnings};
use apiwarden_gateway::keystore::KeyStore;
use apiwarden_gateway::now_ms;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Issue a key for a consumer. The secret is printed once and never stored.
    Create {
        /// The consumer (a [[consumers]] entry of the config).
        #[arg(long)]
        consumer: String,
        /// Scopes of the key, comma-separated; default: all of the consumer's. A key can only
        /// narrow its consumer's scopes.
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        /// Lifetime (`90d`, `12h`); without it the key does not expire.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// Print `{"key_id","secret",...}`.
        #[arg(long)]
        json: bool,
    },
    /// List keys with their status, last use and warnings.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Issue a new secret; the old key keeps working until the grace period ends.
    Rotate {
        key_id: String,
        /// How long the old key keeps working (`24h`, `0s` to stop it at once).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        grace: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: refused by every gateway using this data directory within a second.
    Revoke { key_id: String },
}

fn duration(flag: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .map_err(|e| anyhow::anyhow!("{flag} {text:?}: {e}; write a duration such as 12h or 90d"))
}

fn when(ms: u64) -> String {
    apiwarden_gateway::keystore::rfc3339(ms)
}

pub fn run(cmd: KeysCommand, cfg: &Config) -> Result<()> {
    let mut store = KeyStore::open(cfg)
        .context("cannot open the key store; check storage.data_dir (or storage.database) and storage.pepper")?;
    store.set_actor(crate::block::actor());
    let now = now_ms();
    match cmd {
        KeysCommand::Create {
            consumer,
            scopes,
            expires_in,
            json,
        } => {
            let expires_at = match expires_in {
                Some(d) => Some(
                    u64::try_from(duration("--expires-in", &d)?.as_millis())
                        .ok()
                        .and_then(|ms| now.checked_add(ms))
                        .context("--expires-in is too far in the future")?,
                ),
                None => None,
            };
            let (k, secret) = store.create(cfg, &consumer, scopes, expires_at)?;
            if json {
                let mut v = record_json(&k, cfg, now);
                v["secret"] = secret.into();
                println!("{v}");
            } else {
                println!(
                    "key {} for {} (scopes: {})",
                    k.key_id,
                    k.consumer,
                    k.scopes.join(",")
                );
                println!("{secret}");
                println!("this is the only time the secret is shown; send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`");
            }
        }
        KeysCommand::List { json } => {
            let keys = store.list()?;
            if json {
                for k in &keys {
                    println!("{}", record_json(k, cfg, now));
                }
                return Ok(());
            }
            if keys.is_empty() {
                println!("no keys; `apiwarden keys create --consumer NAME` issues one");
                return Ok(());
            }
            println!(
                "{:<13} {:<16} {:<9} {:<21} {:<21} {:<21} {:<24} WARNINGS",
                "KEY ID", "CONSUMER", "STATUS", "CREATED", "EXPIRES", "LAST USED", "SCOPES"
            );
            for k in &keys {
                println!(
                    "{:<13} {:<16} {:<9} {:<21} {:<21} {:<21} {:<24} {}",
                    k.key_id,
                    k.consumer,
                    k.status(now).as_str(),
                    when(k.created_at),
                    k.expires_at.map_or("-".into(), when),
                    k.last_used.map_or("never".into(), when),
                    k.scopes.join(","),
                    warnings(k, cfg, now).join("; ")
                );
            }
        }
        KeysCommand::Rotate {
            key_id,
            grace,
            json,
        } => {
            let grace = duration("--grace", &grace)?;
            let (k, secret) = store.rotate(cfg, &key_id, grace)?;
            if json {
                let mut v = record_json(&k, cfg, now);
                v["secret"] = secret.into();
                v["replaces"] = key_id.into();
                println!("{v}");
            } else {
                println!(
                    "key {} replaces {key_id}, which keeps working until {}",
                    k.key_id,
                    when(now + grace.as_millis() as u64)
                );
                println!("{secret}");
                println!("this is the only time the secret is shown");
            }
        }
        KeysCommand::Revoke { key_id } => {
            if store.revoke(&key_id)? {
                println!("revoked {key_id}");
            } else {
                println!("{key_id} was already revoked");
            }
        }
    }
    Ok(())
}
