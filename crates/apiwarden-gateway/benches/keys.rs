//! Checking an API key: cold (the HMAC-SHA256 under the pepper, constant-time compare) and
//! hot (a key already verified: its keyed tag). `cargo bench -p apiwarden-gateway --bench keys`.

use apiwarden_core::config::parse;
use apiwarden_gateway::keystore::KeyStore;
use apiwarden_gateway::now_ms;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use std::time::Duration;

fn keys(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("aw-bench-keys-{}", std::process::id()));
    let text = format!(
        "[storage]\ndata_dir = \"{}\"\n\n[[consumers]]\nname = \"bench\"\nscopes = [\"a\"]\n",
        dir.display()
    );
    let cfg = parse(&text, "bench.toml").unwrap();
    let mut store = KeyStore::open(&cfg).unwrap();
    let (_, key) = store.create(&cfg, "bench", None, None).unwrap();
    let now = now_ms();
    let mut g = c.benchmark_group("api_key_check");
    g.bench_function("cold_hmac", |b| {
        b.iter_batched(
            || store.ring().unwrap(),
            |ring| {
                assert!(ring.check(black_box(&key), now).is_ok());
                ring
            },
            BatchSize::SmallInput,
        )
    });
    let ring = store.ring().unwrap();
    assert!(ring.check(&key, now).is_ok());
    g.bench_function("hot_verified", |b| {
        b.iter(|| assert!(ring.check(black_box(&key), now).is_ok()))
    });
    let last = if key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    g.bench_function("wrong_secret", |b| {
        b.iter(|| assert!(ring.check(black_box(&wrong), now).is_err()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = keys
}
criterion_main!(benches);
