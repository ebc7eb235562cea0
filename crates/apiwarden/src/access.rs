//! `apiwarden access review`: least privilege in practice. Per consumer: scopes granted but not
//! used in the window (from the audit trail), keys never used, keys overdue for rotation.

use anyhow::{Context, Result};
use apiwarden_core::config::Config;
use apiwarden_gateway::keystore::{KeyStatus, KeyStore};
use apiwarden_gateway::now_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// One consumer's review.
#[derive(serde::Serialize)]
struct Review<'a> {
    consumer: &'a str,
    scopes_granted: Vec<&'a str>,
    scopes_unused: Vec<&'a str>,
    requests_allowed: u64,
    keys_never_used: Vec<String>,
    keys_overdue_for_rotation: Vec<String>,
}

pub fn run(cfg: &Config, days: u64, json: bool) -> Result<()> {
    let since = SystemTime::now() - Duration::from_secs(days * 86_400);
    // Which route scopes each consumer used, from allowed requests in the window.
    let routes: BTreeMap<&str, &[String]> = cfg
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.scopes.as_slice()))
        .collect();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut allowed: BTreeMap<String, u64> = BTreeMap::new();
    let ledger = cfg.storage.data_dir.join("ledger");
    let mut visit = |e: serde_json::Value| {
        // A `strict` request leaves a `received` record before its outcome: count it once.
        if e["kind"] != "request" || e["decision"]["outcome"] != "allow" || !e["phase"].is_null() {
            return;
        }
        let in_window = e["time"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t >= since);
        let (Some(consumer), Some(route)) = (
            e["identity"]["consumer"].as_str(),
            e["request"]["route_name"].as_str(),
        ) else {
            return;
        };
        if !in_window {
            return;
        }
        *allowed.entry(consumer.to_string()).or_default() += 1;
        let set = used.entry(consumer.to_string()).or_default();
        for s in routes.get(route).copied().unwrap_or_default() {
            set.insert(s.clone());
        }
    };
    let opener = crate::ledger_opener(cfg, &ledger)?;
    apiwarden_gateway::ledger::read_plain(&ledger, opener.as_ref(), |_, payload| {
        if let Ok(e) = serde_json::from_slice::<serde_json::Value>(payload) {
            visit(e);
        }
    })
    .with_context(|| format!("cannot read the audit ledger {}", ledger.display()))?;
    let mut store = KeyStore::open(cfg)
        .context("cannot open the key store; check storage.data_dir (or storage.database) and storage.pepper")?;
    let keys = store.list()?;
    // The consumers of the config file and those kept in the store.
    let all: Vec<apiwarden_core::config::ConsumerConfig> = cfg
        .consumers
        .iter()
        .cloned()
        .chain(store.consumers()?.iter().map(|c| c.to_config()))
        .collect();
    let now = now_ms();
    let max_age = cfg.storage.key_max_age.as_millis() as u64;
    let empty = BTreeSet::new();
    let reviews: Vec<Review<'_>> = all
        .iter()
        .map(|c| {
            let used = used.get(&c.name).unwrap_or(&empty);
            let live = keys.iter().filter(|k| {
                k.consumer == c.name
                    && matches!(k.status(now), KeyStatus::Active | KeyStatus::Rotating)
            });
            Review {
                consumer: &c.name,
                scopes_granted: c.scopes.iter().map(String::as_str).collect(),
                scopes_unused: c
                    .scopes
                    .iter()
                    .filter(|s| !used.contains(*s))
                    .map(String::as_str)
                    .collect(),
                requests_allowed: allowed.get(&c.name).copied().unwrap_or(0),
                keys_never_used: live
                    .clone()
                    .filter(|k| k.last_used.is_none())
                    .map(|k| k.key_id.clone())
                    .collect(),
                keys_overdue_for_rotation: live
                    .filter(|k| now.saturating_sub(k.created_at) > max_age)
                    .map(|k| k.key_id.clone())
                    .collect(),
            }
        })
        .collect();
    if json {
        for r in &reviews {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "access review over the last {days} days (audit trail {}; keys overdue after {} days)",
        ledger.display(),
        max_age / 86_400_000
    );
    println!(
        "{:<16} {:>9} {:<32} {:<28} OVERDUE KEYS",
        "CONSUMER", "REQUESTS", "UNUSED SCOPES", "NEVER-USED KEYS"
    );
    for r in &reviews {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        println!(
            "{:<16} {:>9} {:<32} {:<28} {}",
            r.consumer,
            r.requests_allowed,
            if r.scopes_unused.is_empty() {
                "-".to_string()
            } else {
                r.scopes_unused.join(",")
            },
            list(&r.keys_never_used),
            list(&r.keys_overdue_for_rotation)
        );
    }
    Ok(())
}
