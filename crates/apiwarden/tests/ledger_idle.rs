//! An idle gateway's ledger writer sleeps until its next checkpoint instead of polling its
//! queue every 2 ms, and a request that arrives meanwhile wakes it: its record is written at
//! once, not when the checkpoint is due.

#![cfg(target_os = "linux")]

mod support;

use std::time::{Duration, Instant};
use support::*;

/// Context switches of the process's `audit-ledger` thread so far (each sleep is one).
fn ledger_thread_switches(pid: u32) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != "audit-ledger" {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        return status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
            .sum();
    }
    panic!("the gateway (pid {pid}) has no audit-ledger thread");
}

#[test]
fn an_idle_ledger_writer_sleeps_until_a_request_wakes_it() {
    let dir = temp_dir("ledger-idle");
    let up = echo_upstream();
    // A checkpoint only every 30 s: an idle writer has no reason to wake before that.
    let node = start_node(
        &dir,
        0,
        &format!(
            "[audit]\ndurability = \"batched\"\ncheckpoint_interval = \"30s\"\n\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\nauth = [\"none\"]\n"
        ),
    );
    let pid = node.child.id();
    let data = dir.join("data0");
    // Start-up's own events (the last: "gateway started") are written, then a quiet moment.
    wait_started(&data);
    std::thread::sleep(Duration::from_millis(200));
    let before = ledger_thread_switches(pid);
    std::thread::sleep(Duration::from_secs(1));
    let woke = ledger_thread_switches(pid) - before;
    assert!(
        woke < 20,
        "the idle ledger writer woke {woke} times in one second (a 2 ms poll wakes about 500)"
    );

    // A request now: its record reaches the segment file long before the next checkpoint.
    let sent = Instant::now();
    let mut conn = Conn::open(&node.addr);
    assert_eq!(conn.get("/idle-probe"), 200);
    while !audit_text(&data).contains("\"path\":\"/idle-probe\"") {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the request's record was not written within 10 s of the request"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
