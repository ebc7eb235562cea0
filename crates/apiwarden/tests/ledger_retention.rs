//! Retention through the real binary: tiny segments sealed by size and age, a retention of
//! two seconds; old segments go (after their retention anchor), the deletion is a `system`
//! event in the ledger, and `apiwarden audit verify` starts at the boundary and passes. With
//! `retention_requires_export`, nothing goes until the export cursor has passed it.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

fn start(dir: &Path, extra: &str) -> Node {
    let up = echo_upstream();
    let common = format!(
        "[audit]\ndurability = \"batched\"\ncheckpoint_interval = \"200ms\"\n\
         segment_size = \"4KiB\"\nsegment_max_age = \"1s\"\nretention = \"2s\"\n{extra}\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\nauth = [\"none\"]\n"
    );
    start_node(dir, 0, &common)
}

fn stop(mut node: Node) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
}

/// The first sequence number of every segment, in order.
fn firsts(ledger: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(ledger.join("segments"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    v.sort();
    v
}

fn traffic(node: &Node, n: usize) {
    let mut conn = Conn::open(&node.addr);
    for i in 0..n {
        assert_eq!(conn.get(&format!("/orders/{i}")), 200);
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn retention_events(data: &Path) -> Vec<serde_json::Value> {
    audit_text(data)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["decision"]["reason"] == "ledger.retention")
        .collect()
}

#[test]
fn old_segments_are_deleted_after_their_anchor_recorded_and_verify_starts_at_the_boundary() {
    let dir = temp_dir("retention");
    let data = dir.join("data0");
    let ledger = data.join("ledger");
    let config: PathBuf = dir.join("node0.toml");
    let node = start(&dir, "");
    traffic(&node, 60);
    let before = firsts(&ledger);
    assert!(before.len() >= 3, "segments rotate by size: {before:?}");
    // Quiet now: the last segment is sealed by age, and every segment two seconds old goes.
    wait_for("the oldest segments deleted", 20, || firsts(&ledger)[0] > 1);
    wait_for("every sealed segment of the traffic deleted", 20, || {
        firsts(&ledger)[0] > *before.last().unwrap()
    });
    traffic(&node, 5);
    std::thread::sleep(Duration::from_millis(500));
    stop(node);

    let now = firsts(&ledger);
    for f in &before {
        assert!(
            !ledger.join(format!("segments/{f:020}.seg")).exists(),
            "segment {f} deleted: {now:?}"
        );
    }
    assert!(ledger.join("retention").exists(), "the retention anchor");
    // Each deletion is a system event naming the range.
    let events = retention_events(&data);
    assert!(!events.is_empty());
    let first = &events[0];
    assert_eq!(first["kind"], "system");
    let msg = first["message"].as_str().unwrap();
    assert!(msg.contains("deleted records 1 to "), "{msg}");
    assert!(msg.contains("00000000000000000001.seg"), "{msg}");
    assert!(msg.contains("retention anchor of"), "{msg}");
    let deleted_to = now[0] - 1;
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap()
            .contains(&format!(" to {deleted_to} ("))),
        "an event names the last range, to {deleted_to}"
    );

    // verify starts at the boundary and passes.
    let (ok, out, err) = cli("audit", &config, &["verify"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "retention boundary: records 1 to {deleted_to} were deleted by retention"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("intact: records {} to ", now[0])),
        "{out}"
    );
    let (ok, out, err) = cli("audit", &config, &["verify", "--json"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["retention"]["first_record"], now[0]);
    assert_eq!(v["retention"]["anchor_size"], deleted_to);
    // A deleted record cannot be proved; a kept one can.
    let out = bin()
        .args(["audit", "prove", "1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "record 1 was deleted by retention (the ledger starts at record {}",
            now[0]
        )),
        "{err}"
    );
    let (ok, out, err) = cli("audit", &config, &["prove", &now[0].to_string()]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn with_an_export_requirement_nothing_goes_before_the_cursor_passes_it() {
    let dir = temp_dir("retention-export");
    let data = dir.join("data0");
    let ledger = data.join("ledger");
    let config: PathBuf = dir.join("node0.toml");
    let node = start(&dir, "retention_requires_export = [\"siem\"]\n");
    traffic(&node, 60);
    // Well past the retention: nothing deleted, nothing exported.
    std::thread::sleep(Duration::from_secs(4));
    let before = firsts(&ledger);
    assert!(before.len() >= 3, "{before:?}");
    assert_eq!(before[0], 1, "nothing deleted without the cursor");
    assert!(!ledger.join("retention").exists());
    // The exporter has passed the first segment only (not the second's last record).
    let cursor = before[2] - 2;
    std::fs::create_dir_all(ledger.join("cursors")).unwrap();
    std::fs::write(ledger.join("cursors/siem"), format!("{cursor}\n")).unwrap();
    wait_for("the first segment deleted", 20, || firsts(&ledger)[0] > 1);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        firsts(&ledger)[0],
        before[1],
        "only what the cursor has passed"
    );
    stop(node);
    let events = retention_events(&data);
    assert_eq!(events.len(), 1, "{events:?}");
    let msg = events[0]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("deleted records 1 to {} ", before[1] - 1)),
        "{msg}"
    );
    assert!(msg.contains(&format!("siem at {cursor}")), "{msg}");
    let (ok, out, err) = cli("audit", &config, &["verify"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("retention boundary"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
