//! Opening the ledger at start. One gateway writes a ledger: a second one started on the same
//! data directory (by mistake, or a unit file run twice) refuses to start instead of writing
//! the same segments, and the first one goes on serving and recording. A torn record cut at
//! start is recorded whatever happens next.

#![cfg(target_os = "linux")]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The config of another gateway on `dir`'s `data0` (`<dir>/<name>.toml`), listening on
/// `listen`, its admin listener on a free port.
fn same_data_dir(
    dir: &std::path::Path,
    name: &str,
    listen: &str,
    node: &str,
    common: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[gateway]\nlisten = \"{listen}\"\nnode = \"{node}\"\nworker_threads = 1\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n\n\
             [storage]\ndata_dir = \"data0\"\n{common}",
            free_port()
        ),
    )
    .unwrap();
    path
}

/// A gateway on `dir`'s `data0`, once its start-up event is in the ledger: the node, its data
/// directory, and the config text it shares with the next gateway of the test.
fn started_gateway(dir: &std::path::Path) -> (Node, std::path::PathBuf, String) {
    let up = echo_upstream();
    let common = format!(
        "[audit]\ndurability = \"batched\"\n\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\nauth = [\"none\"]\n"
    );
    let node = start_node(dir, 0, &common);
    let data = dir.join("data0");
    wait_started(&data);
    (node, data, common)
}

#[test]
fn a_second_gateway_on_the_same_ledger_refuses_to_start() {
    let dir = temp_dir("ledger-lock");
    let (node, data, common) = started_gateway(&dir);
    // The same data directory, other ports.
    let second = same_data_dir(
        &dir,
        "second",
        &format!("127.0.0.1:{}", free_port()),
        "node1",
        &common,
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_apiwarden"))
        .args(["serve", "--config"])
        .arg(&second)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It waits a few seconds for the lock (a gateway just stopped lets it go), then gives up.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| panic!("the second gateway started: {stderr}"));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("is in use by another process") && stderr.contains("data_dir of its own"),
        "{stderr}"
    );
    // The first one serves and records on.
    let mut conn = Conn::open(&node.addr);
    assert_eq!(conn.get("/after-the-second"), 200);
    let started = Instant::now();
    while !audit_text(&data).contains("/after-the-second") {
        assert!(started.elapsed() < Duration::from_secs(10), "not recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !audit_text(&data).contains("node1"),
        "the second gateway wrote nothing"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(dir);
}

/// Regression (found by review): a torn last record was cut when the ledger opened, but its
/// event was recorded only once the gateway had started; a start that then failed (its port
/// taken) lost the event, and the next start found a clean tail: the cut went unrecorded.
#[test]
fn a_cut_torn_record_is_recorded_even_when_the_start_then_fails() {
    let dir = temp_dir("ledger-cut");
    let (mut node, data, common) = started_gateway(&dir);
    let _ = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    let _ = node.child.wait();
    // A record begun and never finished: three bytes of a frame header.
    let segments = data.join("ledger/segments");
    let mut last: Vec<_> = std::fs::read_dir(&segments)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    last.sort();
    let last = last.pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0, 0, 1]).unwrap();
    drop(f);
    // The same data directory, and a listening port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let config = same_data_dir(&dir, "taken", &listen, "node0", &common);
    let out = Command::new(env!("CARGO_BIN_EXE_apiwarden"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started on a taken port");
    let text = audit_text(&data);
    assert!(
        text.contains("ledger.record_cut") && text.contains("was cut from"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}
