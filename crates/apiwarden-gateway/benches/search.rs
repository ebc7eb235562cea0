//! Audit search on a large ledger (issue 4, item 10: "fast on millions of events"): writes
//! `SEARCH_EVENTS` (default 2 000 000) request events through `LedgerSink` (batched), then
//! times searches with the segments' index (`ledger_index::search`) against reading every
//! record (what `audit search` did before the index), and the making of a missing index.
//! `cargo bench -p apiwarden-gateway --bench search`. Printed, not asserted. With
//! `SEARCH_KEEP=1` the ledger stays (its path is printed) for timing the command line on it.

use apiwarden_core::config::Durability;
use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
use apiwarden_gateway::audit::AuditSink;
use apiwarden_gateway::ids::new_id;
use apiwarden_gateway::ledger::{read_plain, segments, LedgerOptions, LedgerSink, SearchFilter};
use apiwarden_gateway::ledger_index::{search, sidecar_path};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// 40 consumers with 8 keys each, 20 000 client addresses, a few statuses; the newest event
/// is "now", the oldest about a day before.
fn event(i: u64, n: u64, now: SystemTime) -> Box<AuditEvent> {
    let mut e = AuditEvent::new(EventKind::Request, new_id(), Arc::from("gw-eu-west-1a"));
    e.time = now - Duration::from_millis((n - i) * 86_400_000 / n);
    e.request_id = Some(new_id());
    let c = (i * 7919) % 40;
    e.client.ip = Some(
        format!(
            "10.{}.{}.{}",
            (i * 31) % 20,
            (i * 17) % 250,
            (i * 13) % 4 + 1
        )
        .parse()
        .unwrap(),
    );
    e.identity.consumer = Some(format!("consumer-{c:02}"));
    e.identity.key_id = Some(format!("awk_{c:02}{:014}", (i * 104_729) % 8));
    e.identity.method = Some("api_key");
    e.identity.scopes = vec!["orders:read".into(), "orders:write".into()];
    e.request.method = Some("GET".into());
    e.request.host = Some("api.example.com".into());
    e.request.path = Some(format!("/v1/orders/{i}"));
    e.request.route = Some(Arc::from("/v1/orders/{id}"));
    e.request.user_agent = Some("billing-client/4.12.1".into());
    e.response.status = match i % 1000 {
        0..=4 => 429,
        5..=14 => 403,
        _ => 200,
    };
    if e.response.status != 200 {
        e.decision.outcome = Outcome::Deny;
        e.decision.reason = Reason::AuthnInvalidKey;
    }
    e.response.bytes = 512;
    e.response.latency_us = 900;
    e.upstream.name = Some(Arc::from("orders"));
    Box::new(e)
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed().as_secs_f64())
}

fn du(dir: &Path, ext: &str) -> u64 {
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = std::env::var("SEARCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let root = std::env::temp_dir().join(format!("aw-bench-search-{}", std::process::id()));
    let dir = root.join("ledger");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = SystemTime::now();
    let ((), secs) = time(|| {
        rt.block_on(async {
            let opened = LedgerSink::open(LedgerOptions {
                dir: dir.clone(),
                durability: Durability::Batched,
                checkpoint_interval: Duration::from_secs(1),
                origin: "bench".into(),
                copy_to: None,
                segment_bytes: apiwarden_gateway::ledger::SEGMENT_BYTES,
                segment_max_age: Duration::from_secs(86_400),
                retention: None,
                node: Arc::from("bench"),
                encryption: None,
            })
            .unwrap();
            for i in 0..n {
                opened.sink.record(event(i, n, now));
                if i % 100_000 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            opened.sink.flush().await.unwrap();
        })
    });
    println!(
        "ledger: {n} events written in {secs:.1} s; {} segments, {:.0} MB of records, {:.1} MB of index ({:.1} bytes an event)",
        segments(&dir).unwrap().len(),
        du(&dir, "seg") as f64 / 1e6,
        du(&dir, "idx") as f64 / 1e6,
        du(&dir, "idx") as f64 / n as f64,
    );
    let s = |v: &str| Some(v.to_string());
    let hour_ago = now - Duration::from_secs(3600);
    let cases: Vec<(&str, SearchFilter, usize)> = vec![
        (
            "consumer (1 in 40)",
            SearchFilter {
                consumer: s("consumer-17"),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "consumer, first 100",
            SearchFilter {
                consumer: s("consumer-17"),
                ..Default::default()
            },
            100,
        ),
        (
            "key (1 in 320)",
            SearchFilter {
                key: s("awk_1700000000000003"),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "ip",
            SearchFilter {
                ip: s("10.7.99.2"),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "status 429",
            SearchFilter {
                status: Some(429),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "deny in the last hour",
            SearchFilter {
                decision: s("deny"),
                since: Some(hour_ago),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "consumer + status + last hour",
            SearchFilter {
                consumer: s("consumer-03"),
                status: Some(200),
                since: Some(hour_ago),
                ..Default::default()
            },
            usize::MAX,
        ),
        (
            "nothing matches",
            SearchFilter {
                consumer: s("nobody"),
                ..Default::default()
            },
            usize::MAX,
        ),
    ];
    println!(
        "\n{:<32} {:>9} {:>12} {:>12} {:>9}",
        "search", "found", "index (ms)", "scan (ms)", "speedup"
    );
    for (name, f, limit) in &cases {
        // Warm: the page cache holds the files in both cases.
        let (stats, idx) = time(|| search(&dir, None, f, *limit, |_, _, _| {}).unwrap());
        let (stats2, idx2) = time(|| search(&dir, None, f, *limit, |_, _, _| {}).unwrap());
        let idx = idx.min(idx2);
        assert_eq!(stats.found, stats2.found);
        let (found, scan) = time(|| {
            let mut found = 0usize;
            read_plain(&dir, None, |_, p| {
                if found < *limit
                    && serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|e| f.passes(&e))
                {
                    found += 1;
                }
            })
            .unwrap();
            found
        });
        assert_eq!(found as u64, stats.found, "{name}");
        println!(
            "{name:<32} {:>9} {:>12.1} {:>12.1} {:>8.0}x",
            stats.found,
            idx * 1e3,
            scan * 1e3,
            scan / idx
        );
    }
    // A ledger without an index (written before it existed): the first search makes it.
    for (_, p) in segments(&dir).unwrap() {
        let _ = std::fs::remove_file(sidecar_path(&p));
    }
    let f = SearchFilter {
        consumer: s("consumer-17"),
        ..Default::default()
    };
    let (stats, secs) = time(|| search(&dir, None, &f, usize::MAX, |_, _, _| {}).unwrap());
    println!(
        "\nindex made by the first search: {} sidecars in {secs:.2} s ({:.0} events/s); the last segment is read instead",
        stats.built,
        n as f64 / secs
    );
    if std::env::var_os("SEARCH_KEEP").is_some() {
        // For timing the command line on it: `apiwarden audit export --data-dir <this>`.
        println!("\nkept: the ledger is in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
}
