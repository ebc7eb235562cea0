//! Fleet mode for API keys: two `apiwarden serve` processes share the keys in one PostgreSQL
//! schema (`storage.database`, the PostgreSQL on 127.0.0.1:5432), and the command line changes
//! them with the same config: a key created, rotated or revoked is in force on both within 1 s.
//!
//! Without that PostgreSQL the test says so loudly and passes, unless `CI` is set, where it fails.

mod support;

use std::time::{Duration, Instant};
use support::*;

const PEPPER_VAR: &str = "APIWARDEN_TEST_FLEET_PEPPER";

/// Polls every 20 ms until `addr` answers `status` to `key`, at most 1 s: how long it took.
fn until(addr: &str, key: &str, status: u16) -> Duration {
    let start = Instant::now();
    loop {
        if get_with_key(addr, "/orders", key) == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{addr} did not answer {status} within 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Not a tokio test: the postgres client of the schema helper must not run on a runtime's
/// thread. The echo upstream gets a runtime of its own.
#[test]
fn two_nodes_share_keys_and_a_revocation_reaches_both_within_a_second() {
    if !postgres_available() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt
        .block_on(apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into()))
        .unwrap();
    // Dropped after the nodes (declared before them).
    let schema = PgSchema::create();
    let dir = temp_dir("keys-fleet");
    let pepper = format!("fleet-pepper-{}", apiwarden_gateway::ids::new_id().simple());
    let env = [(PEPPER_VAR, pepper.as_str())];
    let common = format!(
        "database = \"{}\"\npepper = \"env:{PEPPER_VAR}\"\n\n\
         [[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n",
        schema.url
    );
    let a = start_node_env(&dir, 0, &common, &env);
    let b = start_node_env(&dir, 1, &common, &env);
    let (config_a, config_b) = (dir.join("node0.toml"), dir.join("node1.toml"));
    let keys = |config: &std::path::Path, args: &[&str]| cli_env("keys", config, args, &env);
    let create = || -> (String, String) {
        let (ok, out, err) = keys(&config_a, &["create", "--consumer", "billing", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        (
            v["key_id"].as_str().unwrap().into(),
            v["secret"].as_str().unwrap().into(),
        )
    };

    // A key made through the command line works on both nodes.
    let (key_id, key) = create();
    until(&a.addr, &key, 200);
    until(&b.addr, &key, 200);

    // Rotation (through the other node's config: the same database): during the grace
    // period the old and the new key work on both nodes.
    let (ok, out, err) = keys(&config_b, &["rotate", &key_id, "--grace", "1h", "--json"]);
    assert!(ok, "{err}");
    let rotated: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let new_key = rotated["secret"].as_str().unwrap().to_string();
    for node in [&a, &b] {
        until(&node.addr, &new_key, 200);
        assert_eq!(
            get_with_key(&node.addr, "/orders", &key),
            200,
            "old key in its grace"
        );
    }
    let (ok, out, _) = keys(&config_b, &["list", "--json"]);
    assert!(ok && out.lines().count() == 2, "{out}");
    assert!(out.contains("\"rotating\""), "{out}");

    // Revocation: refused by node B within 1 s of the command returning. Measured a few times
    // (the rotated key, then fresh ones), since the delay depends on when node B polls next.
    let mut delays = Vec::new();
    let mut revoke = |key_id: &str, key: &str| {
        let (ok, out, err) = keys(&config_a, &["revoke", key_id]);
        let returned = Instant::now();
        assert!(ok && out.contains("revoked"), "{out}{err}");
        let on_b = until(&b.addr, key, 401);
        delays.push(on_b);
        println!(
            "revocation of {key_id}: 401 on node B {} ms after `keys revoke` returned",
            on_b.as_millis()
        );
        assert!(returned.elapsed() < Duration::from_secs(2));
        until(&a.addr, key, 401);
    };
    revoke(&key_id, &key);
    for i in 0..6 {
        let (id, k) = create();
        until(&b.addr, &k, 200);
        // Waiting for the key to arrive put us just after node B's poll; spread the revocations
        // over the 250 ms between two polls, so the worst case is among them.
        std::thread::sleep(Duration::from_millis(40 * i));
        revoke(&id, &k);
    }
    let worst = delays.iter().max().unwrap();
    println!(
        "revocation delays on node B (ms): {:?}; worst {} ms",
        delays.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        worst.as_millis()
    );
    assert!(*worst < Duration::from_secs(1));
    // The rotated-to key is untouched by the old one's revocation.
    for node in [&a, &b] {
        assert_eq!(get_with_key(&node.addr, "/orders", &new_key), 200);
    }

    // Both nodes read the keys from PostgreSQL, not from their own data directories.
    for i in 0..2 {
        let db = dir.join(format!("data{i}/apiwarden.db"));
        if let Ok(conn_bytes) = std::fs::read(&db) {
            assert!(
                !String::from_utf8_lossy(&conn_bytes).contains(&key_id),
                "no key in {}",
                db.display()
            );
        }
    }
    drop((a, b));
    drop(schema);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_with_another_pepper_is_refused_and_the_error_names_no_password() {
    if !postgres_available() {
        return;
    }
    let schema = PgSchema::create();
    let dir = temp_dir("keys-fleet-pepper");
    let config = |name: &str, pepper_var: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "[storage]\ndata_dir = \"data\"\ndatabase = \"{}\"\npepper = \"env:{pepper_var}\"\n\n\
                 [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n",
                schema.url
            ),
        )
        .unwrap();
        path
    };
    let (first, second) = (
        config("a.toml", "AW_PEPPER_A"),
        config("b.toml", "AW_PEPPER_B"),
    );
    let env = [
        ("AW_PEPPER_A", "the first pepper of this fleet"),
        ("AW_PEPPER_B", "another pepper, not the same"),
    ];
    let (ok, _, err) = cli_env("keys", &first, &["list"], &env);
    assert!(ok, "{err}");
    let (ok, _, err) = cli_env("keys", &second, &["list"], &env);
    assert!(!ok && err.contains("not the one the keys"), "{err}");
    assert!(!err.contains("another pepper"), "{err}");

    // An unreachable database: the error says where (without the password) and what to check.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[storage]\ndata_dir = \"data\"\ndatabase = \"postgres://aw:hunter2-secret@127.0.0.1:1/keys\"\npepper = \"env:AW_PEPPER_A\"\n",
    )
    .unwrap();
    let (ok, _, err) = cli_env("keys", &bad, &["list"], &env);
    assert!(!ok, "{err}");
    assert!(
        err.contains("127.0.0.1:1/keys") && err.contains("storage.database"),
        "{err}"
    );
    assert!(!err.contains("hunter2-secret"), "{err}");
    println!("{err}");
    drop(schema);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node whose database cannot be read yet starts anyway, reports not ready and refuses keys;
/// it reads the keys as soon as the database can be used.
#[test]
fn a_node_started_before_its_database_is_usable_becomes_ready_when_it_is() {
    if !postgres_available() {
        return;
    }
    let schema = PgSchema::planned();
    let dir = temp_dir("keys-fleet-later");
    let env = [(PEPPER_VAR, "a pepper for the node that starts early")];
    let common = format!(
        "database = \"{}\"\npepper = \"env:{PEPPER_VAR}\"\n\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:9\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"up\"\nauth = [\"api_key\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = []\n",
        schema.url
    );
    let node = start_node_env(&dir, 0, &common, &env);
    let ready = || Conn::open(&node.admin).get("/readyz");
    assert_eq!(ready(), 503, "no schema to create the tables in yet");
    schema.make();
    let made = Instant::now();
    while ready() != 200 {
        assert!(made.elapsed() < Duration::from_secs(2), "not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "ready {} ms after the schema was made",
        made.elapsed().as_millis()
    );
    drop(node);
    drop(schema);
    let _ = std::fs::remove_dir_all(&dir);
}
