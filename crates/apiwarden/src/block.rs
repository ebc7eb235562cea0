//! `apiwarden block add|list|remove`: the block list from the command line.

use anyhow::{Context, Result};
use apiwarden_core::block::{BlockEntry, BlockKind};
use apiwarden_core::config::Config;
use apiwarden_gateway::blocklist::BlockStore;
use apiwarden_gateway::now_ms;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand)]
pub enum BlockCommand {
    /// Block a client IP (or CIDR network), an API key (by key id) or a consumer. Running
    /// gateways refuse it with 403 within a second, and record the change in their audit trail.
    Add {
        /// ip, key or consumer.
        kind: String,
        /// The address or network, key id or consumer name.
        value: String,
        /// How long the block lasts (`30m`, `1h`, `7d`); without it, until removed.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// Why; shown by `block list` and kept in the audit trail.
        #[arg(long)]
        reason: String,
        /// Print the entry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the entries in force.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove an entry.
    Remove {
        /// ip, key or consumer.
        kind: String,
        /// The value as it was added.
        value: String,
    },
}

/// Who is running the command, as the audit trail names them.
pub(crate) fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("cli:{user}@{host}")
}

fn open(cfg: &Config) -> Result<BlockStore> {
    BlockStore::open(cfg).context(
        "cannot open the block list store; check storage.data_dir (or storage.redis) in the config",
    )
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn run(cmd: BlockCommand, cfg: &Config) -> Result<()> {
    match cmd {
        BlockCommand::Add {
            kind,
            value,
            duration,
            reason,
            json,
        } => {
            let kind = BlockKind::parse(&kind).map_err(anyhow::Error::msg)?;
            let value = kind.normalize(&value).map_err(anyhow::Error::msg)?;
            let ttl = match duration {
                Some(d) => {
                    let d = humantime::parse_duration(&d).map_err(|e| {
                        anyhow::anyhow!("--for {d:?}: {e}; write a duration such as 30m, 1h or 7d")
                    })?;
                    if d.is_zero() {
                        anyhow::bail!("--for must be longer than zero");
                    }
                    Some(d)
                }
                None => None,
            };
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why (it is kept in the audit trail)");
            }
            let now = now_ms();
            let entry = BlockEntry {
                kind,
                value,
                reason,
                actor: actor(),
                created_at: now,
                expires_at: ttl.map(|d| now + d.as_millis() as u64),
            };
            let mut store = open(cfg)?;
            // Expired entries go first, so the audit trail shows them expiring before any
            // new entry (and `add` replacing one never races its expiry).
            store.expire(now)?;
            store.add(&entry)?;
            if json {
                println!("{}", serde_json::to_string(&entry)?);
            } else {
                let until = entry.expires_at.map_or("until removed".to_string(), |t| {
                    format!("until {}", when(t))
                });
                println!("blocked {} {} {until}", kind.as_str(), entry.value);
            }
            Ok(())
        }
        BlockCommand::List { json } => {
            let now = now_ms();
            let mut store = open(cfg)?;
            store.expire(now)?;
            let entries: Vec<BlockEntry> = store
                .all()?
                .into_iter()
                .filter(|e| !e.expired(now))
                .collect();
            if json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e)?);
                }
                return Ok(());
            }
            if entries.is_empty() {
                println!("the block list is empty");
                return Ok(());
            }
            println!(
                "{:<9} {:<40} {:<21} {:<21} {:<24} REASON",
                "KIND", "VALUE", "SINCE", "UNTIL", "BY"
            );
            for e in &entries {
                println!(
                    "{:<9} {:<40} {:<21} {:<21} {:<24} {}",
                    e.kind.as_str(),
                    e.value,
                    when(e.created_at),
                    e.expires_at.map_or("-".to_string(), when),
                    e.actor,
                    e.reason
                );
            }
            Ok(())
        }
        BlockCommand::Remove { kind, value } => {
            let kind = BlockKind::parse(&kind).map_err(anyhow::Error::msg)?;
            let value = kind.normalize(&value).map_err(anyhow::Error::msg)?;
            if open(cfg)?.remove(kind, &value, &actor())? {
                println!("removed {} {value} from the block list", kind.as_str());
                Ok(())
            } else {
                anyhow::bail!(
                    "{} {value} is not on the block list; `apiwarden block list` shows what is",
                    kind.as_str()
                )
            }
        }
    }
}
