//! Fleet mode: three gateway processes share one budget in the Redis on 127.0.0.1:6379.
//!
//! Without that Redis the test says so loudly and passes, unless `CI` is set, where it fails.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_budget_within_two_percent() {
    if !redis_available() {
        return;
    }
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "aw-fleet-{}-{}",
        std::process::id(),
        apiwarden_gateway::ids::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // A prefix of its own, so that no other run shares this budget.
    let prefix = format!("test-{}", apiwarden_gateway::ids::new_id());
    let (rate, burst) = (200.0, 20.0);
    let common = format!(
        "redis = \"redis://127.0.0.1:6379/\"\nredis_prefix = \"{prefix}\"\nredis_timeout = \"1s\"\n\n\
         [[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"echo\"\nauth = [\"none\"]\nlimits = [\"global\"]\n\n\
         [limits.global]\nrate = \"200/s\"\nburst = 20\nkey = \"route\"\nfailure_mode = \"closed\"\n\n\
         [audit]\ndurability = \"batched\"\n"
    );
    let nodes: Vec<Node> = (0..3).map(|i| start_node(&dir, i, &common)).collect();

    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let run = Duration::from_secs(5);
    let mut clients = Vec::new();
    // Two clients per node, each at 250 requests a second: 1 500/s offered, 7.5 times the limit.
    for n in &nodes {
        for _ in 0..2 {
            let (addr, admitted, refused, stop) = (
                n.addr.clone(),
                admitted.clone(),
                refused.clone(),
                stop.clone(),
            );
            clients.push(std::thread::spawn(move || {
                let mut c = Conn::open(&addr);
                let mut next = Instant::now();
                let mut last = start;
                while start.elapsed() < run && !stop.load(Ordering::Relaxed) {
                    last = Instant::now();
                    match c.get("/api/x") {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        429 => refused.fetch_add(1, Ordering::Relaxed),
                        s => panic!("status {s}"),
                    };
                    next += Duration::from_millis(4);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                last
            }));
        }
    }
    let last = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .max()
        .unwrap();
    let span = last.duration_since(start).as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    let expected = burst + rate * span;
    let error = (admitted - expected).abs() / expected;
    println!(
        "3 nodes, {:.0} offered in {span:.2} s: admitted {admitted}, one global budget allows {expected:.1}, error {:.2}%",
        admitted + refused.load(Ordering::Relaxed) as f64,
        error * 100.0
    );
    assert!(
        refused.load(Ordering::Relaxed) as f64 > admitted,
        "the clients did offer well over the limit"
    );
    assert!(
        error <= 0.02,
        "admitted {admitted}, a single global limit allows {expected:.1}"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
