//! `apiwarden keys ...` against a running `apiwarden serve`, as an operator uses them.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

fn keys(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    cli("keys", config, args)
}

/// GET with a bearer key on a fresh connection: the status.
fn get_with(addr: &str, path: &str, key: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    out[9..12].parse().unwrap()
}

fn until(addr: &str, key: &str, status: u16) {
    let start = Instant::now();
    while get_with(addr, "/orders", key) != status {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "not {status} within 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_use_rotate_revoke_from_the_command_line() {
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("keys");
    let common = format!(
        "\n[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n"
    );
    let mut node = start_node(&dir, 0, &common);
    let config = dir.join("node0.toml");

    let (ok, _, err) = keys(&config, &["create", "--consumer", "nobody"]);
    assert!(!ok && err.contains("no consumer named"), "{err}");
    let (ok, _, err) = keys(
        &config,
        &["create", "--consumer", "billing", "--scopes", "admin"],
    );
    assert!(!ok && err.contains("does not hold scope"), "{err}");

    let (ok, out, err) = keys(
        &config,
        &[
            "create",
            "--consumer",
            "billing",
            "--expires-in",
            "90d",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let key = created["secret"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("aw_{key_id}_")));
    assert_eq!(created["status"], "active");
    until(&node.addr, &key, 200);

    // Rotation: both work during the grace period.
    let (ok, out, err) = keys(&config, &["rotate", &key_id, "--grace", "1h", "--json"]);
    assert!(ok, "{err}");
    let rotated: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let new_key = rotated["secret"].as_str().unwrap().to_string();
    until(&node.addr, &new_key, 200);
    assert_eq!(get_with(&node.addr, "/orders", &key), 200);

    let (ok, out, _) = keys(&config, &["list", "--json"]);
    assert!(ok);
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["status"], "rotating");
    assert_eq!(listed[1]["status"], "active");
    assert!(!out.contains(&key[16..]), "keys list never shows a secret");
    let (ok, out, _) = keys(&config, &["list"]);
    assert!(
        ok && out.contains(&key_id) && out.contains("rotating"),
        "{out}"
    );

    // Revocation: refused within a second.
    let (ok, out, _) = keys(&config, &["revoke", &key_id]);
    assert!(ok && out.contains("revoked"), "{out}");
    until(&node.addr, &key, 401);
    assert_eq!(get_with(&node.addr, "/orders", &new_key), 200);

    // `audit search`: the refused request of the revoked key, by key id and decision.
    std::thread::sleep(Duration::from_millis(100));
    let (ok, out, err) = cli(
        "audit",
        &config,
        &["search", "--key", &key_id, "--decision", "deny", "--json"],
    );
    assert!(ok, "{err}");
    let found: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!found.is_empty(), "the refused requests are found");
    assert!(found
        .iter()
        .all(|e| e["identity"]["key_id"] == key_id.as_str() && e["decision"]["outcome"] == "deny"));
    let (ok, out, _) = cli(
        "audit",
        &config,
        &["search", "--status", "200", "--since", "1h"],
    );
    assert!(
        ok && out.lines().count() > 1 && out.contains("billing"),
        "{out}"
    );
    let (ok, out, _) = cli("audit", &config, &["export", "--format", "json"]);
    assert!(ok && out.lines().count() >= found.len(), "{out}");
    let (ok, cef, err) = cli("audit", &config, &["export", "--format", "cef"]);
    assert!(ok && cef.lines().all(|l| l.starts_with("CEF:0|")), "{err}");

    // No secret in the audit trail.
    let _ = node.child.kill();
    let _ = node.child.wait();
    let audit = audit_text(&dir.join("data0"));
    assert!(audit.contains(&key_id), "events name the key by id");
    // Every change made on the command line is an `admin` event with its actor, on every
    // gateway that follows the store.
    let changes: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "admin" && e["decision"]["policy"] == "keys")
        .collect();
    let said: Vec<String> = changes
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(changes.len(), 3, "created, rotated, revoked: {said:#?}");
    assert!(changes
        .iter()
        .all(|e| e["actor"].as_str().unwrap().starts_with("cli:")));
    assert!(
        said.iter()
            .any(|m| m.contains(&key_id) && m.contains("rotated")),
        "{said:#?}"
    );
    assert!(
        said.iter()
            .any(|m| m.contains(&key_id) && m.contains("revoked")),
        "{said:#?}"
    );
    for secret in [&key, &new_key] {
        assert!(!audit.contains(&secret[16..]));
    }
    let pepper = std::fs::read_to_string(dir.join("data0/pepper")).unwrap();
    assert!(!audit.contains(pepper.trim()));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("data0/pepper"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the pepper is readable by its owner only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_review_names_unused_scopes_and_idle_keys() {
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("access");
    // `strict`: each request leaves a `received` record and an outcome; counted once.
    let common = format!(
        "\n[audit]\ndurability = \"strict\"\n\n[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[routes]]\nname = \"write\"\npath_prefix = \"/write\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:write\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\", \"orders:write\"]\n\n\
         [[consumers]]\nname = \"ops\"\nscopes = [\"orders:read\"]\n"
    );
    let mut node = start_node(&dir, 0, &common);
    let config = dir.join("node0.toml");
    let create = |consumer: &str| -> (String, String) {
        let (ok, out, err) = keys(&config, &["create", "--consumer", consumer, "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        (
            v["key_id"].as_str().unwrap().into(),
            v["secret"].as_str().unwrap().into(),
        )
    };
    let (_, billing) = create("billing");
    let (ops_id, _) = create("ops");
    until(&node.addr, &billing, 200);
    for _ in 0..3 {
        assert_eq!(get_with(&node.addr, "/orders", &billing), 200);
    }
    // Stopping the gateway writes last_used back and flushes the audit trail.
    signal_term(&mut node);

    let (ok, out, err) = cli("access", &config, &["review", "--days", "30", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let billing_row = rows.iter().find(|r| r["consumer"] == "billing").unwrap();
    assert_eq!(
        billing_row["scopes_unused"],
        serde_json::json!(["orders:write"])
    );
    assert_eq!(billing_row["keys_never_used"], serde_json::json!([]));
    // `until`'s first 200 and the three after it.
    assert_eq!(billing_row["requests_allowed"], 4);
    let ops_row = rows.iter().find(|r| r["consumer"] == "ops").unwrap();
    assert_eq!(ops_row["scopes_unused"], serde_json::json!(["orders:read"]));
    assert_eq!(ops_row["keys_never_used"], serde_json::json!([ops_id]));
    let (ok, out, _) = cli("access", &config, &["review"]);
    assert!(
        ok && out.contains("orders:write") && out.contains(&ops_id),
        "{out}"
    );
}

/// SIGTERM, then wait for a graceful exit.
fn signal_term(node: &mut Node) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let start = Instant::now();
    while node.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_added_on_the_command_line_get_keys_that_work() {
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("consumers");
    let common = format!(
        "\n[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n"
    );
    let node = start_node(&dir, 0, &common);
    let config = dir.join("node0.toml");
    let consumers = |args: &[&str]| cli("consumers", &config, args);

    let (ok, out, err) = consumers(&[
        "add",
        "partner",
        "--scopes",
        "orders:read",
        "--allow-ips",
        "127.0.0.0/8",
        "--meta",
        "team=payments",
        "--json",
    ]);
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(added["source"], "store");
    assert_eq!(added["metadata"]["team"], "payments");
    let (ok, _, err) = consumers(&["add", "billing"]);
    assert!(!ok && err.contains("config file"), "{err}");
    let (ok, out, _) = consumers(&["list"]);
    assert!(
        ok && out.contains("billing") && out.contains("partner") && out.contains("store"),
        "{out}"
    );

    let (ok, out, err) = keys(&config, &["create", "--consumer", "partner", "--json"]);
    assert!(ok, "{err}");
    let key = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    until(&node.addr, &key, 200);

    let (ok, out, err) = consumers(&["remove", "partner"]);
    assert!(ok && out.contains("1 of its keys revoked"), "{out}{err}");
    until(&node.addr, &key, 401);
    let (ok, _, err) = consumers(&["remove", "partner"]);
    assert!(!ok && err.contains("no consumer named"), "{err}");
}
