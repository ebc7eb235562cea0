//! The block list from the command line to the refusal, against `apiwarden serve` processes:
//! in the data directory's SQLite on one node, through Redis for a fleet.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn route(up: std::net::SocketAddr) -> String {
    format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"echo\"\nauth = [\"none\"]\n"
    )
}

/// Runs `apiwarden block ARGS --config CONFIG`: (success, stdout, stderr).
fn block(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    cli("block", config, args)
}

/// Polls until `path` answers `status` on `addr`, within 1 s (what the README promises).
fn within_a_second(addr: &str, path: &str, status: u16) -> Duration {
    let start = Instant::now();
    loop {
        let got = Conn::open(addr).get(path);
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{addr}{path} still answers {got}, not {status}, after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn audit_lines(dir: &std::path::Path, node: usize) -> Vec<serde_json::Value> {
    audit_text(&dir.join(format!("data{node}")))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_from_the_command_line_are_enforced_audited_and_expire() {
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("block");
    let node = start_node(&dir, 0, &route(up));
    let config = dir.join("node0.toml");
    let mut c = Conn::open(&node.addr);
    assert_eq!(c.get("/api/a"), 200);

    // Bad input: a clear error, exit 1, nothing stored.
    let (ok, _, err) = block(&config, &["add", "ip", "10.0.0.300", "--reason", "x"]);
    assert!(!ok);
    assert!(err.contains("not an IP address"), "{err}");
    let (ok, _, err) = block(&config, &["add", "user", "bob", "--reason", "x"]);
    assert!(!ok && err.contains("ip, key or consumer"), "{err}");
    let (ok, _, err) = block(
        &config,
        &["add", "ip", "10.0.0.1", "--for", "soon", "--reason", "x"],
    );
    assert!(!ok && err.contains("--for"), "{err}");

    let (ok, out, err) = block(
        &config,
        &[
            "add",
            "ip",
            "127.0.0.1",
            "--for",
            "3s",
            "--reason",
            "credential stuffing",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("blocked ip 127.0.0.1 until"), "{out}");
    let took = within_a_second(&node.addr, "/api/a", 403);
    println!("block effective after {took:?}");
    let (status, body) = Conn::open(&node.addr).request("/api/b");
    assert_eq!(status, 403);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "this client is blocked");
    assert!(json["request_id"].as_str().is_some());

    let (ok, out, _) = block(&config, &["list"]);
    assert!(
        ok && out.contains("127.0.0.1") && out.contains("credential stuffing"),
        "{out}"
    );
    let (ok, out, _) = block(&config, &["list", "--json"]);
    assert!(ok);
    let entry: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(entry["kind"], "ip");
    assert!(entry["actor"].as_str().unwrap().starts_with("cli:"));

    // The block expires by itself.
    std::thread::sleep(Duration::from_secs(3));
    within_a_second(&node.addr, "/api/a", 200);
    let (ok, out, err) = block(&config, &["list"]);
    assert!(ok, "{err}");
    assert!(out.contains("empty"), "{out}");

    // A network, until removed; then removed.
    assert!(
        block(
            &config,
            &["add", "ip", "127.0.0.0/8", "--reason", "all of loopback"]
        )
        .0
    );
    within_a_second(&node.addr, "/api/a", 403);
    let (ok, out, _) = block(&config, &["remove", "ip", "127.0.0.0/8"]);
    assert!(ok, "{out}");
    within_a_second(&node.addr, "/api/a", 200);
    let (ok, _, err) = block(&config, &["remove", "ip", "127.0.0.0/8"]);
    assert!(!ok && err.contains("not on the block list"), "{err}");

    // Every change is an admin event with its actor; every refusal a request event.
    std::thread::sleep(Duration::from_millis(300));
    let events = audit_lines(&dir, 0);
    let admin: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "admin")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(admin.len(), 4, "{admin:#?}");
    assert!(admin[0].starts_with("block list: added ip 127.0.0.1 until"));
    assert!(admin[0].contains("credential stuffing"));
    assert_eq!(admin[1], "block list: ip 127.0.0.1 expired");
    assert!(admin[2].starts_with("block list: added ip 127.0.0.0/8 until removed"));
    assert_eq!(admin[3], "block list: removed ip 127.0.0.0/8");
    assert!(events
        .iter()
        .filter(|e| e["kind"] == "admin")
        .all(|e| e["actor"].as_str().is_some()));
    let refused = events
        .iter()
        .find(|e| e["response"]["status"] == 403)
        .expect("a refusal was recorded");
    assert_eq!(refused["decision"]["reason"], "blocked");
    assert_eq!(refused["decision"]["policy"], "blocklist:ip");
    assert!(refused["upstream"]["name"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_reaches_every_node_through_redis() {
    if !redis_available() {
        return;
    }
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("block-fleet");
    let prefix = format!("test-{}", apiwarden_gateway::ids::new_id());
    let common = format!(
        "redis = \"redis://127.0.0.1:6379/\"\nredis_prefix = \"{prefix}\"\n\n{}",
        route(up)
    );
    let nodes: Vec<Node> = (0..2).map(|i| start_node(&dir, i, &common)).collect();
    for n in &nodes {
        assert_eq!(Conn::open(&n.addr).get("/api"), 200);
    }
    let config = dir.join("node0.toml");
    let (ok, _, err) = block(
        &config,
        &["add", "ip", "127.0.0.1", "--for", "1h", "--reason", "fleet"],
    );
    assert!(ok, "{err}");
    for n in &nodes {
        within_a_second(&n.addr, "/api", 403);
    }
    // Listed from the other node's config too: one list for the fleet.
    let (_, out, _) = block(&dir.join("node1.toml"), &["list"]);
    assert!(out.contains("fleet"), "{out}");
    assert!(block(&dir.join("node1.toml"), &["remove", "ip", "127.0.0.1"]).0);
    for n in &nodes {
        within_a_second(&n.addr, "/api", 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..2 {
        let admin = audit_lines(&dir, i)
            .into_iter()
            .filter(|e| e["kind"] == "admin")
            .count();
        assert_eq!(admin, 2, "node {i} audits both changes");
    }
}
