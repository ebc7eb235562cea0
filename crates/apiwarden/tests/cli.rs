//! Black-box tests of the built binary, as a user runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_apiwarden"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "aw-cli-{tag}-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let d = PathBuf::from(d.to_string_lossy().replace([' ', '{', '}', ':', ','], ""));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A plain HTTP/1.1 GET over a real socket: (status, whole answer).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, out)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            panic!("the process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["demo", "--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
        vec!["block", "--help"],
        vec!["block", "add", "--help"],
        vec!["block", "list", "--help"],
        vec!["block", "remove", "--help"],
        vec!["keys", "--help"],
        vec!["keys", "create", "--help"],
        vec!["keys", "list", "--help"],
        vec!["keys", "rotate", "--help"],
        vec!["keys", "revoke", "--help"],
        vec!["consumers", "--help"],
        vec!["consumers", "add", "--help"],
        vec!["consumers", "list", "--help"],
        vec!["consumers", "remove", "--help"],
        vec!["access", "--help"],
        vec!["access", "review", "--help"],
        vec!["audit", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["audit", "prove", "--help"],
        vec!["audit", "consistency", "--help"],
        vec!["audit", "verify-proof", "--help"],
        vec!["audit", "public-key", "--help"],
        vec!["audit", "search", "--help"],
        vec!["audit", "hash", "--help"],
        vec!["audit", "rewrap", "--help"],
        vec!["audit", "export", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: apiwarden"), "{args:?}: {text}");
    }
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[gateway]\nlisten = \"nowhere\"\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/x\"\nupstream = \"u\"\n").unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let b = bad.display();
    assert!(
        err.contains(&format!("{b}:2:10: \"nowhere\" is not a socket address")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{b}:4:1: route \"r\" has no `auth`")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{b}:7:12: route \"r\": upstream \"u\" is not defined"
        )),
        "{err}"
    );
    assert!(err.contains("3 error(s)"), "{err}");

    let good = dir.join("good.toml");
    std::fs::write(&good, "[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:3000\"\n[[routes]]\nname = \"r\"\npath_prefix = \"/x\"\nupstream = \"u\"\nauth = [\"none\"]\n").unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (1 upstreams, 1 routes"));

    let out = bin()
        .args(["check", "--config"])
        .arg(dir.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));
}

#[test]
fn demo_serves_a_curl_and_stops_on_sigterm() {
    let mut child = bin()
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut api = None;
    let mut audit = None;
    let mut billing_key = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("API listener") {
            api = Some(rest.trim().trim_start_matches("http://").to_string());
        }
        if let Some(rest) = line.trim().strip_prefix("audit events") {
            audit = Some(PathBuf::from(rest.trim()));
        }
        if let Some(rest) = line.trim().strip_prefix("billing key") {
            billing_key = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("Ctrl-C stops it") {
            break;
        }
    }
    let api = api.expect("the demo prints its API address");
    let (status, answer) = http_get(&api, "/echo/hello?name=ada");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"path\": \"/echo/hello\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-request-id: "));
    let (status, _) = http_get(&api, "/nope");
    assert_eq!(status, 404);
    // The demo's limited route: a burst of 5, then 429 with Retry-After, as it prints.
    let statuses: Vec<u16> = (0..6).map(|_| http_get(&api, "/limited").0).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let (_, answer) = http_get(&api, "/limited");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: "),
        "{answer}"
    );
    // The demo's consumers have keys: one opens /orders/{id}, none gets 401.
    let key = billing_key.expect("the demo prints a key for billing");
    assert!(key.starts_with("aw_"), "{key}");
    let mut s = TcpStream::connect(&api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /orders/42 HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(http_get(&api, "/orders/42").0, 401);
    // The events are on disk as NDJSON before the demo exits.
    let audit = audit.expect("the demo prints where audit events go");
    let mut lines_written = 0;
    for _ in 0..50 {
        // The demo names its ledger directory; its records are the events.
        lines_written = 0;
        let _ = apiwarden_gateway::ledger::read_records(&audit, |_, p| {
            let text = String::from_utf8_lossy(p);
            // One outcome record per request (`strict` also makes a `received` one first).
            if text.contains("\"kind\":\"request\"") && !text.contains("\"phase\":") {
                lines_written += 1;
            }
        });
        if lines_written == 11 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lines_written, 11);
    signal(&child, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn serve_reloads_on_sighup_and_keeps_serving_on_a_bad_file() {
    let dir = temp_dir("serve");
    let cfg = dir.join("apiwarden.toml");
    // An upstream nobody listens on is fine: the test looks at routing (404 vs 502).
    let base = "[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"u\"\nauth = [\"none\"]\n";
    std::fs::write(&cfg, base).unwrap();
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while addr.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains("apiwarden gateway started") {
                addr = line
                    .split("addr=")
                    .nth(1)
                    .map(|s| s.split_whitespace().next().unwrap().to_string());
            }
        }
    }
    let addr = addr.expect("serve logs its address");
    assert_eq!(http_get(&addr, "/a").0, 502);
    assert_eq!(http_get(&addr, "/b").0, 404);

    let with_b = format!("{base}[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"u\"\nauth = [\"none\"]\n");
    std::fs::write(&cfg, with_b).unwrap();
    signal(&child, "-HUP");
    let mut b = 404;
    let mut made = 2;
    for _ in 0..50 {
        b = http_get(&addr, "/b").0;
        made += 1;
        if b == 502 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b, 502, "route b exists after SIGHUP");

    std::fs::write(&cfg, "this is not toml = = =").unwrap();
    signal(&child, "-HUP");
    let mut refused = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            refused = line.contains("configuration reload refused");
        }
    }
    assert!(refused, "the refused reload is logged");
    assert_eq!(
        http_get(&addr, "/b").0,
        502,
        "the previous config keeps serving"
    );
    made += 1;

    signal(&child, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    let mut audit = String::new();
    apiwarden_gateway::ledger::read_records(&dir.join("data").join("ledger"), |_, p| {
        audit.push_str(&String::from_utf8_lossy(p));
        audit.push('\n');
    })
    .unwrap();
    let requests = audit
        .lines()
        .filter(|l| l.contains("\"kind\":\"request\"") && !l.contains("\"phase\":"))
        .count();
    assert_eq!(
        requests, made,
        "every request is in the audit file exactly once"
    );
    assert!(audit.contains("configuration reload refused"));
}
