//! Limit decisions: local (target under 200 ns) and in Redis (latency of one decision, and
//! throughput with 64 decisions in flight on one connection).
//!
//! `cargo bench -p apiwarden-gateway --bench limits`. The Redis group needs the Redis on
//! 127.0.0.1:6379 (or `BENCH_REDIS=redis://...`) and is skipped with a message without it.

use apiwarden_core::config::{parse, Config};
use apiwarden_gateway::limit::{decide, LocalStore, RedisStore, RouteLimits, Subject, Verdict};
use apiwarden_gateway::metrics::Metrics;
use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use std::future::Future;
use std::hint::black_box;
use std::net::IpAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

fn config(redis: Option<&str>) -> Config {
    let storage = redis.map_or(String::new(), |url| {
        format!(
            "[storage]\nredis = \"{url}\"\nredis_prefix = \"bench-{}\"\n",
            std::process::id()
        )
    });
    let text = format!(
        "{storage}[limits.fast]\nrate = \"1000000/s\"\nburst = 1000000000000\n\n[limits.slow]\nrate = \"1/h\"\nstore = \"local\"\n"
    );
    parse(&text, "bench.toml").unwrap()
}

/// Runs a future that completes without waiting (a local decision never waits).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a local decision waited"),
    }
}

fn local(c: &mut Criterion) {
    let cfg = config(None);
    let metrics = Metrics::new(1);
    let store = LocalStore::new(1_000_000);
    let fast = RouteLimits::compile(&cfg, &["fast".into()], &metrics);
    let slow = RouteLimits::compile(&cfg, &["slow".into()], &metrics);
    let headers = HeaderMap::new();
    let subject = |ip: IpAddr| Subject {
        route: "api",
        ip,
        consumer: None,
        key_id: None,
        headers: &headers,
    };
    let mut g = c.benchmark_group("local_decision");
    let one: IpAddr = "10.0.0.1".parse().unwrap();
    // The gateway reads the clock once per request, when it arrives, and decides at that
    // time; these benchmarks pass an arrival time the same way, except the last one.
    let at = Instant::now();
    g.bench_function("allow_one_key", |b| {
        b.iter(|| {
            let v = now(decide(&fast, &store, None, &subject(black_box(one)), at));
            assert!(matches!(v, Verdict::Allow { .. }));
        })
    });
    g.bench_function("allow_one_key_reading_the_clock", |b| {
        b.iter(|| {
            now(decide(
                &fast,
                &store,
                None,
                &subject(black_box(one)),
                Instant::now(),
            ))
        })
    });
    now(decide(&slow, &store, None, &subject(one), Instant::now()));
    g.bench_function("deny_one_key", |b| {
        b.iter(|| {
            let v = now(decide(&slow, &store, None, &subject(black_box(one)), at));
            assert!(matches!(v, Verdict::Deny { .. }));
        })
    });
    // 100 000 clients in turn: the map no longer fits in cache.
    let mut i = 0u32;
    g.bench_function("allow_100k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % 100_000;
            let ip = IpAddr::from((0x0a00_0000 | i).to_be_bytes());
            now(decide(&fast, &store, None, &subject(black_box(ip)), at))
        })
    });
    // A flood of new addresses into a full store: every decision evicts.
    let full = LocalStore::new(10_000);
    let mut n = 0u32;
    g.bench_function("new_key_into_full_store", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::from(n.to_be_bytes());
            now(decide(&fast, &full, None, &subject(black_box(ip)), at))
        })
    });
    g.finish();
}

fn redis(c: &mut Criterion) {
    let url = std::env::var("BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    if std::net::TcpStream::connect(addr).is_err() {
        eprintln!("*** no Redis at {url}: the Redis decision benchmarks are skipped ***");
        return;
    }
    let cfg = config(Some(&url));
    let metrics = Metrics::new(1);
    let store = LocalStore::new(1000);
    let redis = RedisStore::new(&cfg, 1, metrics.redis.clone()).unwrap();
    let limits = RouteLimits::compile(&cfg, &["fast".into()], &metrics);
    let headers = HeaderMap::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("redis_decision");
    g.bench_function("one_at_a_time", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let subject = Subject {
                    route: "api",
                    ip: "10.0.0.1".parse().unwrap(),
                    consumer: None,
                    key_id: None,
                    headers: &headers,
                };
                let start = Instant::now();
                for _ in 0..iters {
                    let v = decide(&limits, &store, Some(&redis), &subject, Instant::now()).await;
                    assert!(matches!(v, Verdict::Allow { .. }), "Redis answered");
                }
                start.elapsed()
            })
        })
    });
    // 64 decisions in flight at once on the one connection, as under load: the time per
    // decision here is the inverse of the throughput.
    g.bench_function("64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let per = iters.div_ceil(64);
                let tasks = (0..64u32).map(|t| {
                    let (limits, store, redis, headers) = (&limits, &store, &redis, &headers);
                    async move {
                        let subject = Subject {
                            route: "api",
                            ip: IpAddr::from((0x0a00_0000 | t).to_be_bytes()),
                            consumer: None,
                            key_id: None,
                            headers,
                        };
                        for _ in 0..per {
                            decide(limits, store, Some(redis), &subject, Instant::now()).await;
                        }
                    }
                });
                futures_join_all(tasks).await;
                start.elapsed()
            })
        })
    });
    g.finish();
    let calls = metrics
        .redis
        .calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let sum = metrics
        .redis
        .latency_us_sum
        .load(std::sync::atomic::Ordering::Relaxed);
    if calls > 0 {
        println!(
            "redis: {calls} decisions, mean round trip {:.1} µs",
            sum as f64 / calls as f64
        );
    }
}

/// Drives futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: Future<Output = ()>>(fs: impl Iterator<Item = F>) {
    // The futures borrow from the caller, so they cannot be spawned; poll them together.
    let mut fs: Vec<_> = fs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        fs.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if fs.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = local, redis
}
criterion_main!(benches);
