//! The audit ledger (issue 4): the per-record cost of appending (canonical JSON, framing, leaf
//! hash, hash chain, Merkle tree; and the writer thread's share of it, since the recording
//! thread encodes and hashes all but the sequence number) and of verifying (frame decode,
//! leaf hash, chain, tree), with criterion; then, printed with `println!`, 1 000 000 events
//! end to end through `LedgerSink` (`batched` and `async`, three runs each, or `LEDGER_RUNS`)
//! and `audit verify` over the ledger just written.
//! `cargo bench -p apiwarden-gateway --bench ledger`.

use apiwarden_core::config::Durability;
use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
use apiwarden_core::ledger::frame::{self, CHAIN_START};
use apiwarden_core::ledger::merkle::{leaf_hash, LeafHasher, Tree};
use apiwarden_gateway::audit::AuditSink;
use apiwarden_gateway::ids::new_id;
use apiwarden_gateway::ledger::{read_records, LedgerOptions, LedgerSink};
use apiwarden_gateway::ledger_verify;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator the `apiwarden` binary ships with: events are allocated by the recording
/// threads and freed by the writer, which glibc's arenas make a locked operation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per end-to-end run.
const N: u64 = 1_000_000;
/// End-to-end and verify runs per mode (the median is reported): `LEDGER_RUNS`, 3 when unset.
/// The writer's CPU per event moves by 10-20 % between runs on a shared machine, so a
/// comparison of two builds wants more.
fn runs() -> usize {
    std::env::var("LEDGER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

/// A request event as the pipeline fills it for an API-key route that was allowed and proxied
/// (no forwarded-for, query, TLS or policy: the fields issue 4 names).
fn event() -> AuditEvent {
    let mut e = AuditEvent::new(EventKind::Request, new_id(), Arc::from("gw-eu-west-1a"));
    e.seq = 123_456_789;
    e.request_id = Some(new_id());
    e.client.ip = Some("203.0.113.57".parse().unwrap());
    e.identity.consumer = Some("billing-service".into());
    e.identity.key_id = Some("awk_01JD8Y3ZQ4M2N7P5R6S9T0V1W2".into());
    e.identity.method = Some("api_key");
    e.identity.scopes = vec![
        "orders:read".into(),
        "orders:write".into(),
        "invoices:read".into(),
    ];
    e.request.method = Some("POST".into());
    e.request.host = Some("api.example.com".into());
    e.request.path = Some("/v1/orders/8f14e45f-ceea-467a-9575-0b3c5e0f1b2a/items".into());
    e.request.route = Some(Arc::from("/v1/orders/{id}/items"));
    e.request.user_agent = Some("billing-client/4.12.1 (linux; x86_64) reqwest/0.12".into());
    e.request.bytes = 1_834;
    e.response.status = 201;
    e.response.bytes = 2_417;
    e.response.latency_us = 4_712;
    e.upstream.name = Some(Arc::from("orders"));
    e.upstream.latency_us = Some(4_188);
    e.decision.outcome = Outcome::Allow;
    e.decision.reason = Reason::Ok;
    e
}

fn per_record(c: &mut Criterion) {
    let e = event();
    let mut payload = Vec::with_capacity(4096);
    e.write_json(&mut payload);
    println!(
        "event payload: {} bytes of JSON: {}",
        payload.len(),
        String::from_utf8_lossy(&payload)
    );

    let mut g = c.benchmark_group("ledger_append");
    g.throughput(Throughput::Elements(1));
    // Everything done for one event, on one thread: encoding (now the recording thread's),
    // framing, the leaf hash (begun by the recording thread), the chain and the tree.
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chain = CHAIN_START;
    let mut tree = Tree::new();
    let mut seq = 0u64;
    g.bench_function("per_record", |b| {
        b.iter(|| {
            seq += 1;
            payload.clear();
            black_box(&e).write_json(&mut payload);
            frame::encode(seq, &payload, &mut batch).unwrap();
            let leaf = leaf_hash(&payload);
            chain = frame::chain_next(&chain, &leaf);
            tree.push(leaf);
            if batch.len() >= 512 * 1024 {
                batch.clear();
            }
        })
    });
    // The writer's per-record computation since the recording thread encodes the event and
    // hashes all of it but the sequence number (ledger.rs, `Encoded::of`): frame from the
    // parts, finish the leaf hash, chain, tree. A lower bound of the writer's share: taking
    // the event off the queue, freeing it and the search index entry are left out, and the
    // record stays in the cache between iterations.
    let mut head = Vec::with_capacity(4096);
    let at = e.write_json_unnumbered(&mut head);
    let mut head_leaf = LeafHasher::new();
    head_leaf.update(&head[..at]);
    let mut rest = Vec::with_capacity(32);
    g.bench_function("writer_share_per_record", |b| {
        b.iter(|| {
            seq += 1;
            // The writer receives the begun hash by value; a clone stands in for that move.
            let mut h = black_box(&head_leaf).clone();
            rest.clear();
            apiwarden_core::event::push_decimal(&mut rest, seq);
            rest.extend_from_slice(&head[at..]);
            frame::encode_parts(seq, &[&head[..at], &rest], &mut batch).unwrap();
            h.update(&rest);
            let leaf = h.finish();
            chain = frame::chain_next(&chain, &leaf);
            tree.push(leaf);
            if batch.len() >= 512 * 1024 {
                batch.clear();
            }
        })
    });
    g.bench_function("write_json", |b| {
        b.iter(|| {
            payload.clear();
            black_box(&e).write_json(&mut payload);
        })
    });
    let fixed = payload.clone();
    g.bench_function("frame_encode", |b| {
        b.iter(|| {
            seq += 1;
            frame::encode(seq, black_box(&fixed), &mut batch).unwrap();
            if batch.len() >= 512 * 1024 {
                batch.clear();
            }
        })
    });
    g.bench_function("leaf_hash", |b| b.iter(|| leaf_hash(black_box(&fixed))));
    let leaf = leaf_hash(&fixed);
    g.bench_function("chain_next_and_tree_push", |b| {
        b.iter(|| {
            chain = frame::chain_next(&chain, black_box(&leaf));
            tree.push(leaf);
        })
    });
    g.finish();
    black_box((chain, tree.root()));

    // Verify's per-record work on a segment already in memory.
    let mut seg = Vec::with_capacity(1 << 20);
    let mut n = 0u64;
    while seg.len() < 512 * 1024 {
        n += 1;
        frame::encode(n, &fixed, &mut seg).unwrap();
    }
    let mut g = c.benchmark_group("ledger_verify");
    g.throughput(Throughput::Elements(n));
    g.bench_function(format!("in_memory_{n}_records"), |b| {
        b.iter(|| {
            let mut chain = CHAIN_START;
            let mut tree = Tree::new();
            let mut at = 0;
            while at < seg.len() {
                let (f, used) = frame::decode(&seg[at..]).unwrap();
                let leaf = leaf_hash(f.payload);
                chain = frame::chain_next(&chain, &leaf);
                tree.push(leaf);
                at += used;
            }
            black_box((chain, tree.root()))
        })
    });
    g.finish();
}

/// The writer thread's CPU time (user + system), from `/proc/self/task/<tid>/stat`, in
/// clock ticks (10 ms).
fn writer_cpu_ticks() -> Option<(u64, u64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() == "audit-ledger" {
            return stat_ticks(&path.join("stat"));
        }
    }
    None
}

/// The whole process's CPU time (user + system) in seconds.
fn process_cpu_secs() -> f64 {
    cpu_secs(Path::new("/proc/self/stat"))
}

/// The calling thread's CPU time (user + system) in seconds.
fn thread_cpu_secs() -> f64 {
    cpu_secs(Path::new("/proc/thread-self/stat"))
}

fn cpu_secs(stat: &Path) -> f64 {
    stat_ticks(stat).map_or(0.0, |(u, k)| (u + k) as f64 / 100.0)
}

/// (utime, stime) in clock ticks from a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime); `rest` starts at field 3.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

struct Run {
    secs: f64,
    produce_secs: f64,
    /// The writer thread's (user, system) CPU seconds.
    writer_cpu_secs: Option<(f64, f64)>,
    /// /proc/loadavg (1 min) at the end: other work on the 2 cores.
    load: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn open(dir: &Path, durability: Durability) -> LedgerSink {
    let opened = LedgerSink::open(LedgerOptions {
        dir: dir.to_path_buf(),
        durability,
        checkpoint_interval: Duration::from_secs(1),
        origin: "apiwarden/bench".into(),
        copy_to: None,
        segment_bytes: apiwarden_gateway::ledger::SEGMENT_BYTES,
        segment_max_age: apiwarden_gateway::ledger::SEGMENT_MAX_AGE,
        retention: None,
        node: "bench".into(),
        encryption: None,
    })
    .unwrap();
    assert_eq!(opened.records, 0);
    opened.sink
}

/// Records N events from this thread as fast as it can, then waits for the flush.
fn end_to_end(dir: &Path, durability: Durability, template: &AuditEvent) -> Run {
    let _ = std::fs::remove_dir_all(dir);
    let sink = open(dir, durability);
    // Let the writer start and write its first (empty) checkpoint.
    std::thread::sleep(Duration::from_millis(50));
    let cpu0 = writer_cpu_ticks();
    let start = Instant::now();
    for _ in 0..N {
        let mut e = Box::new(template.clone());
        e.event_id = new_id();
        e.request_id = Some(new_id());
        sink.record(e);
    }
    let produce_secs = start.elapsed().as_secs_f64();
    sink.flush().blocking_recv().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = writer_cpu_ticks();
    assert_eq!(sink.written.load(Relaxed), N);
    drop(sink);
    // The writer writes a last checkpoint and exits.
    std::thread::sleep(Duration::from_millis(300));
    Run {
        secs,
        produce_secs,
        writer_cpu_secs: cpu0
            .zip(cpu1)
            .map(|(a, b)| ((b.0 - a.0) as f64 / 100.0, (b.1 - a.1) as f64 / 100.0)),
        load: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

fn end_to_end_all(_c: &mut Criterion) {
    // Only under `cargo bench`, not `cargo test --benches`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root: PathBuf =
        std::env::temp_dir().join(format!("aw-bench-ledger-{}", std::process::id()));
    let dir = root.join("ledger");
    let template = event();
    let mut bytes = Vec::new();
    template.write_json(&mut bytes);
    println!(
        "\nend to end: {N} events of {} bytes through LedgerSink into {}",
        bytes.len(),
        dir.display()
    );
    for (name, durability) in [
        ("async", Durability::Async),
        ("batched", Durability::Batched),
    ] {
        let mut rates = Vec::new();
        let mut writer_rates = Vec::new();
        for run in 1..=runs() {
            let r = end_to_end(&dir, durability, &template);
            let rate = N as f64 / r.secs;
            rates.push(rate);
            if let Some((u, k)) = r.writer_cpu_secs {
                writer_rates.push(N as f64 / (u + k));
            }
            println!(
                "ledger_e2e/{name} run {run}: {:.3} s, {:.0} events/s (producer done after {:.3} s; writer thread CPU {}; load {})",
                r.secs,
                rate,
                r.produce_secs,
                r.writer_cpu_secs.map_or("n/a".to_string(), |(u, k)| format!(
                    "{u:.2} s user + {k:.2} s sys = {:.0} events per CPU-second",
                    N as f64 / (u + k)
                )),
                r.load,
            );
        }
        println!("ledger_e2e/{name} median: {:.0} events/s", median(rates));
        if !writer_rates.is_empty() {
            let (lo, hi) = writer_rates
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            println!(
                "ledger_e2e/{name} writer: median {:.0} events per CPU-second of its thread ({lo:.0}-{hi:.0})",
                median(writer_rates)
            );
        }
    }

    // The batched ledger of the last run is left in `dir`.
    let size: u64 = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        // The writer drops synced records from the page cache: the first run below reads them
        // from the disk, the later ones (and `verify`) from the cache.
        "\nverify: {N} records, {:.0} MB of segments (read from the disk by the first run, then cached)",
        size as f64 / 1e6
    );
    let mut rates = Vec::new();
    for run in 1..=runs() {
        let start = Instant::now();
        let mut chain = CHAIN_START;
        let mut tree = Tree::new();
        let n = read_records(&dir, |_, payload| {
            let leaf = leaf_hash(payload);
            chain = frame::chain_next(&chain, &leaf);
            tree.push(leaf);
        })
        .unwrap();
        black_box((chain, tree.root()));
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(n, N);
        rates.push(N as f64 / secs);
        println!(
            "read_records+leaf+chain+tree run {run}: {secs:.3} s, {:.0} events/s",
            N as f64 / secs
        );
    }
    println!(
        "read_records+leaf+chain+tree median: {:.0} events/s",
        median(rates)
    );
    let mut rates = Vec::new();
    for run in 1..=runs() {
        let cpu0 = process_cpu_secs();
        let own0 = thread_cpu_secs();
        let start = Instant::now();
        let report = ledger_verify::verify(&dir, None, &mut |_, _| {}).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let cpu = process_cpu_secs() - cpu0;
        let own = thread_cpu_secs() - own0;
        assert_eq!(report.records, N);
        rates.push(N as f64 / secs);
        println!(
            "ledger_verify::verify run {run}: {secs:.3} s, {:.0} events/s ({} checkpoints checked; CPU {cpu:.2} s = {:.2} cores busy, {own:.2} s of it on the reading thread)",
            N as f64 / secs,
            report.checkpoints_checked,
            cpu / secs
        );
    }
    println!(
        "ledger_verify::verify median: {:.0} events/s",
        median(rates)
    );
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = per_record, end_to_end_all
}
criterion_main!(benches);
