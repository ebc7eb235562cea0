//! `audit.durability = "strict"` through the real binary and its ledger on disk: the upstream
//! itself checks, for every request it receives, that the request's record is already in the
//! ledger files; and a ledger on a full disk refuses requests with 503, forwards nothing, and
//! recovers when space returns. `batched` on a full disk refuses too, and loses none of the
//! records it had accepted.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// An upstream that answers `recorded` when the ledger under `ledger` already holds a
/// `received` record of the request's `X-Request-Id`, `missing` otherwise; counts requests.
fn checking_upstream(ledger: PathBuf, hits: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (ledger, hits) = (ledger.clone(), hits.clone());
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                loop {
                    let mut rid = None;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-request-id:") {
                            rid = Some(v.trim().to_string());
                        }
                    }
                    hits.fetch_add(1, Relaxed);
                    let mut found = false;
                    let _ = apiwarden_gateway::ledger::read_records(&ledger, |_, p| {
                        let e: serde_json::Value = serde_json::from_slice(p).unwrap_or_default();
                        if e["phase"] == "received"
                            && rid.as_deref().is_some_and(|r| e["request_id"] == r)
                        {
                            found = true;
                        }
                    });
                    let body = if found { "recorded" } else { "missing" };
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    port
}

fn start(dir: &Path, up: u16, extra: &str) -> Node {
    start_with(dir, up, "strict", extra)
}

fn start_with(dir: &Path, up: u16, durability: &str, extra: &str) -> Node {
    let common = format!(
        "[audit]\ndurability = \"{durability}\"\n{extra}\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{up}\"\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\nauth = [\"none\"]\n"
    );
    // The node's data directory is `<dir>/data0`.
    start_node(dir, 0, &common)
}

#[test]
fn strict_forwards_nothing_before_its_record_is_on_disk() {
    let dir = temp_dir("strict");
    let hits = Arc::new(AtomicUsize::new(0));
    let up = checking_upstream(dir.join("data0/ledger"), hits.clone());
    let node = start(&dir, up, "");
    let mut conn = Conn::open(&node.addr);
    let started = Instant::now();
    for i in 0..50 {
        let (status, body) = conn.request(&format!("/x/{i}"));
        assert_eq!((status, body.as_str()), (200, "recorded"), "request {i}");
    }
    println!(
        "50 strict requests on one connection: {:?}",
        started.elapsed()
    );
    assert_eq!(hits.load(Relaxed), 50);
    // Each request: its `received` record, then its outcome pointing back at it (a graceful
    // stop writes the last outcomes).
    let mut node = node;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
    let events = audit_text(&dir.join("data0"));
    let records: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "request")
        .collect();
    let received: Vec<&serde_json::Value> = records
        .iter()
        .filter(|e| e["phase"] == "received")
        .collect();
    let outcomes: Vec<&serde_json::Value> =
        records.iter().filter(|e| e["phase"].is_null()).collect();
    assert_eq!(received.len(), 50);
    assert_eq!(outcomes.len(), 50);
    for o in &outcomes {
        let r = received
            .iter()
            .find(|r| r["request_id"] == o["request_id"])
            .expect("every outcome has its received record");
        assert_eq!(o["received_seq"], r["seq"]);
        assert!(o["seq"].as_u64() > r["seq"].as_u64());
        assert_eq!(o["response"]["status"], 200);
    }
}

/// Runs a command; whether it succeeded.
fn run(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Mounts a 2 MiB tmpfs as the node's data directory `<dir>/data0` (unmounted when the guard
/// drops): the directory and the guard. `None`, said loudly, when the test cannot run
/// (mounting needs root).
fn small_disk(dir: &Path) -> Option<(PathBuf, impl Drop)> {
    let data = dir.join("data0");
    std::fs::create_dir_all(&data).unwrap();
    if !run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=2m",
            "tmpfs",
            data.to_str().unwrap(),
        ],
    ) {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs at {} (needs root); the full-disk test did not run",
            data.display()
        );
        return None;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    Some((data.clone(), Unmount(data)))
}

/// Fills the file system of `data` to its last byte; returns the file to delete to free it.
fn fill(data: &Path) -> PathBuf {
    let filler = data.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    // Then to the last byte: what a 64 KiB block left over still holds a dozen records.
    while f.write_all(&block[..4096]).is_ok() {}
    while f.write_all(&block[..1]).is_ok() {}
    filler
}

#[test]
fn a_full_disk_refuses_with_503_forwards_nothing_and_recovers() {
    let dir = temp_dir("diskfull");
    let Some((data, _unmount)) = small_disk(&dir) else {
        return;
    };
    let hits = Arc::new(AtomicUsize::new(0));
    let up = checking_upstream(data.join("ledger"), hits.clone());
    let node = start(&dir, up, "");
    let mut conn = Conn::open(&node.addr);
    assert_eq!(conn.request("/before"), (200, "recorded".to_string()));

    let filler = fill(&data);
    // The segment file's last page may still hold a few records (tmpfs allocates whole
    // pages): requests whose records fit go through, recorded (the upstream checks), until
    // the first that cannot be recorded.
    let mut went_through = 0;
    loop {
        let (status, body) = Conn::open(&node.addr).request(&format!("/filling/{went_through}"));
        if status == 503 {
            assert!(body.contains("not forwarded"), "{body}");
            break;
        }
        assert_eq!((status, body.as_str()), (200, "recorded"));
        went_through += 1;
        assert!(went_through < 50, "the full disk never refused a request");
    }
    let before = hits.load(Relaxed);
    let mut refused = 0;
    for i in 0..20 {
        let (status, body) = Conn::open(&node.addr).request(&format!("/full/{i}"));
        if status == 503 {
            refused += 1;
            assert!(body.contains("not forwarded"), "{body}");
        }
    }
    assert_eq!(refused, 20, "only {refused} of 20 refused on a full disk");
    assert_eq!(
        hits.load(Relaxed),
        before,
        "requests reached the upstream while their records could not be written"
    );
    // Space returns: the ledger writes again (its queued records first).
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = Conn::open(&node.addr).request("/after");
        if status == 200 {
            assert_eq!(body, "recorded");
            break;
        }
        assert!(Instant::now() < deadline, "the ledger did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(node);
    // Every record that was written reads back in order, gap-free.
    let mut seqs = Vec::new();
    apiwarden_gateway::ledger::read_records(&data.join("ledger"), |s, _| seqs.push(s)).unwrap();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let mut s = String::new();
    let _ =
        std::fs::File::open(data.join("ledger/checkpoint")).map(|mut f| f.read_to_string(&mut s));
    assert!(
        s.contains("apiwarden/node0"),
        "a checkpoint was written: {s}"
    );
}

#[test]
fn batched_on_a_full_disk_refuses_with_503_and_loses_nothing_it_accepted() {
    let dir = temp_dir("diskfull-batched");
    let Some((data, _unmount)) = small_disk(&dir) else {
        return;
    };
    let up = echo_upstream().port();
    let node = start_with(&dir, up, "batched", "");
    // A client sending requests all along: the disk fills while the writer holds records
    // written but not yet synced, which it must write again after cutting the file back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let client = {
        let (addr, stop, refused) = (node.addr.clone(), stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut answered = Vec::new();
            let mut conn = Conn::open(&addr);
            let mut i = 0;
            while !stop.load(Relaxed) {
                let path = format!("/r/{i}");
                i += 1;
                let (status, body) = conn.request(&path);
                match status {
                    200 => answered.push(path),
                    503 => {
                        assert!(body.contains("not forwarded"), "{body}");
                        refused.fetch_add(1, Relaxed);
                    }
                    _ => panic!("{status} {body}"),
                }
            }
            answered
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let filler = fill(&data);
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.load(Relaxed) < 20 {
        if client.is_finished() {
            // The client failed: its panic says why.
            client.join().unwrap();
            unreachable!("the client stops only when told to");
        }
        assert!(
            Instant::now() < deadline,
            "the full disk never refused a request"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(&filler).unwrap();
    // Space returns: requests go through again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = Conn::open(&node.addr).request("/after");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the ledger did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Relaxed);
    let mut answered = client.join().unwrap();
    answered.push("/after".into());
    // Stopped as an operator stops it (SIGTERM: the queue is written before exit), since
    // `batched` may lose the last tick's records to a SIGKILL.
    let mut node = node;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
    // Gap-free, and every request answered 200 has its record.
    let mut seqs = Vec::new();
    let mut paths = std::collections::HashSet::new();
    apiwarden_gateway::ledger::read_records(&data.join("ledger"), |s, p| {
        seqs.push(s);
        let e: serde_json::Value = serde_json::from_slice(p).unwrap();
        if let Some(path) = e["request"]["path"].as_str() {
            paths.insert(path.to_string());
        }
    })
    .unwrap();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let lost: Vec<_> = answered.iter().filter(|p| !paths.contains(*p)).collect();

    assert!(lost.is_empty(), "answered 200 without a record: {lost:?}");
    let (ok, out, err) = cli("audit", &dir.join("node0.toml"), &["verify"]);
    assert!(ok, "audit verify failed: {out}{err}");
}

#[test]
fn sensitive_values_are_recorded_as_hmacs_that_audit_hash_reproduces() {
    let dir = temp_dir("hmac");
    let hits = Arc::new(AtomicUsize::new(0));
    let up = checking_upstream(dir.join("data0/ledger"), hits);
    let node = start(
        &dir,
        up,
        "hmac_headers = [\"X-Customer-Id\"]\nhmac_query = [\"email\"]\n",
    );
    for (customer, email) in [
        ("alice", "a%40example.org"),
        ("alice", "b%40example.org"),
        ("bob", "a%40example.org"),
    ] {
        let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
        write!(
            s,
            "GET /x?email={email}&page=2 HTTP/1.1\r\nHost: api\r\nX-Customer-Id: {customer}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    let mut node = node;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
    let config = dir.join("node0.toml");
    let hash = |v: &str| {
        let (ok, out, err) = cli("audit", &config, &["hash", v]);
        assert!(ok, "{err}");
        out.trim().to_string()
    };
    let (alice, bob) = (hash("alice"), hash("bob"));
    assert!(alice.starts_with("hmac:") && alice.len() == 5 + 64 && alice != bob);
    let text = audit_text(&dir.join("data0"));
    assert!(
        !text.contains("alice") && !text.contains("example.org"),
        "{text}"
    );
    let outcomes: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "request" && e["phase"].is_null())
        .collect();
    assert_eq!(outcomes.len(), 3);
    let customers: Vec<&str> = outcomes
        .iter()
        .map(|e| {
            e["request"]["headers_hmac"]["x-customer-id"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(customers, [alice.as_str(), alice.as_str(), bob.as_str()]);
    let a = hash("a%40example.org");
    assert_eq!(
        outcomes[0]["request"]["query"],
        format!("email={a}&page=REDACTED")
    );
    assert_eq!(
        outcomes[0]["request"]["query"],
        outcomes[2]["request"]["query"]
    );
    assert_ne!(
        outcomes[0]["request"]["query"],
        outcomes[1]["request"]["query"]
    );
}

#[test]
fn an_encrypted_ledger_verifies_without_the_key_and_searches_with_it() {
    let dir = temp_dir("sealed");
    let key = dir.join("ledger.key");
    std::fs::write(
        &key,
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let up = checking_upstream(dir.join("data0/ledger"), hits);
    let token = "auditor-token-0123456789abcdef0123456789";
    std::fs::write(dir.join("auditor.token"), token).unwrap();
    let node = start(
        &dir,
        up,
        &format!(
            "encryption_key = \"file:{}\"\n\n[admin.tokens.audit]\nrole = \"auditor\"\nsecret = \"file:{}\"\n",
            key.display(),
            dir.join("auditor.token").display()
        ),
    );
    for i in 0..5 {
        // The upstream cannot read sealed records: it answers "missing", which is fine here.
        assert_eq!(
            Conn::open(&node.addr).request(&format!("/sealed/{i}")).0,
            200
        );
    }
    // The auditor role searches through the admin API (the gateway opens sealed records).
    std::thread::sleep(Duration::from_millis(300));
    let admin_search = |query: &str| {
        let mut a = std::net::TcpStream::connect(&node.admin).unwrap();
        write!(
            a,
            "GET /admin/v1/audit?{query} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        a.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        body
    };
    let body = admin_search("status=200&limit=3");
    assert_eq!(body["count"], 3, "{body}");
    assert!(body["events"][0]["request"]["path"]
        .as_str()
        .unwrap()
        .starts_with("/sealed/"));
    // Values as clients encode them, and RFC 3339 times with an offset.
    let body = admin_search("status=200&limit=3&since=2000-01-01T02%3A00%3A00%2B02%3A00");
    assert_eq!(body["count"], 3, "{body}");
    let body = admin_search("status=200&limit=3&since=2099-01-01T00%3A00%3A00Z");
    assert_eq!(body["count"], 0, "{body}");
    // Paging: a full page's `next` is its last record; `after` begins the next page there.
    // (Each search is an admin event with status 200 too: only requests are compared.)
    let all = admin_search("status=200");
    assert!(all["next"].is_null(), "{all}");
    let seqs = |body: &serde_json::Value| -> Vec<u64> {
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "request")
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    let want = seqs(&all);
    assert!(want.len() > 3, "{all}");
    let mut paged = Vec::new();
    let mut query = "status=200&limit=3".to_string();
    loop {
        let body = admin_search(&query);
        let page = seqs(&body);
        paged.extend_from_slice(&page);
        match body["next"].as_u64() {
            Some(next) => {
                assert_eq!(
                    Some(next),
                    body["events"][2]["seq"].as_u64(),
                    "the last of 3: {body}"
                );
                query = format!("status=200&limit=3&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(paged, want);
    let mut node = node;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
    // On disk: nothing readable.
    for e in std::fs::read_dir(dir.join("data0/ledger/segments")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("/sealed/"));
    }
    // Verified by an auditor's copy without the key (no config at all).
    let out = bin()
        .args(["audit", "verify", "--data-dir"])
        .arg(dir.join("data0"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A proof of a sealed record proves its ciphertext: a readable `record` added to it is
    // refused, where it used to be shown as proven.
    let audit = |args: &[&str]| {
        bin()
            .arg("audit")
            .args(args)
            .arg("--config")
            .arg(dir.join("none.toml"))
            .arg("--data-dir")
            .arg(dir.join("data0"))
            .output()
            .unwrap()
    };
    let out = audit(&["prove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut proof: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(proof["record"].is_null(), "{proof}");
    let out = audit(&["public-key"]);
    assert!(out.status.success());
    std::fs::write(dir.join("ledger.vkey"), &out.stdout).unwrap();
    let verify_proof = |proof: &serde_json::Value| {
        std::fs::write(dir.join("proof.json"), proof.to_string()).unwrap();
        bin()
            .args(["audit", "verify-proof"])
            .arg(dir.join("proof.json"))
            .arg("--public-key")
            .arg(dir.join("ledger.vkey"))
            .output()
            .unwrap()
    };
    let out = verify_proof(&proof);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 2 is in the ledger"));
    proof["record"] = serde_json::json!({"seq": 2, "request": {"path": "/forged"}});
    let out = verify_proof(&proof);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing proves"),
        "{out:?}"
    );

    // Searched with it.
    let config = dir.join("node0.toml");
    let (ok, out, err) = cli("audit", &config, &["search", "--status", "200", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("/sealed/") && !l.contains("\"phase\":"))
            .count(),
        5
    );
    // The next page from the command line too.
    let after = want[1].to_string();
    let (ok, out, err) = cli(
        "audit",
        &config,
        &["search", "--status", "200", "--json", "--after", &after],
    );
    assert!(ok, "{err}");
    let got: Vec<u64> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "request")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, want[2..]);
}
