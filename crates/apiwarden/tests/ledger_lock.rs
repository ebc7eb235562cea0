//! One gateway writes a ledger: a second one started on the same data directory (by mistake,
//! or a unit file run twice) refuses to start instead of writing the same segments, and the
//! first one goes on serving and recording.

#![cfg(target_os = "linux")]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn a_second_gateway_on_the_same_ledger_refuses_to_start() {
    let dir = temp_dir("ledger-lock");
    let up = echo_upstream();
    let common = format!(
        "[audit]\ndurability = \"batched\"\n\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\nauth = [\"none\"]\n"
    );
    let node = start_node(&dir, 0, &common);
    let data = dir.join("data0");
    let started = Instant::now();
    while !audit_text(&data).contains("gateway started") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no start-up event"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same data directory, other ports.
    let second = dir.join("second.toml");
    std::fs::write(
        &second,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\nnode = \"node1\"\nworker_threads = 1\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n\n\
             [storage]\ndata_dir = \"data0\"\n{common}",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
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
