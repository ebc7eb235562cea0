//! `apiwarden audit export --format json|ocsf|ecs|cef|leef [--cursor NAME]` against the ledger
//! of a real `apiwarden serve`: what a SIEM ingesting the output would see.

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

/// A GET with these extra header lines on a fresh connection: the status and `X-Request-Id`.
fn send(addr: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let id = out
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-request-id:")
                .map(|v| v.trim().to_string())
        })
        .expect("every response carries X-Request-Id");
    (status, id)
}

/// The ledger's records, parsed.
fn events(data_dir: &Path) -> Vec<Value> {
    audit_text(data_dir)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the outcome record of every request id is in the ledger.
fn wait_recorded(data_dir: &Path, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evs = events(data_dir);
        let done = ids.iter().all(|id| {
            evs.iter()
                .any(|e| e["request_id"] == *id && e["phase"].is_null())
        });
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "requests {ids:?} not recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn export(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli("audit", config, &all);
    assert!(ok, "audit {all:?}: {err}");
    out
}

/// A CEF line: its seven header fields (unescaped) and its extension (key, unescaped value).
fn parse_cef(line: &str) -> (Vec<String>, Vec<(String, String)>) {
    let mut header = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while header.len() < 7 {
        match chars
            .next()
            .unwrap_or_else(|| panic!("7 header fields: {line}"))
        {
            '\\' => field.push(chars.next().unwrap()),
            '|' => header.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    // Each unescaped `=` ends a key, the word before it; the value runs to the next key.
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut raw = String::new();
    let mut it = chars.peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' => {
                let n = it.next().unwrap();
                raw.push(match n {
                    'n' => '\n',
                    'r' => '\r',
                    n => n,
                });
                // Mark escaped characters so that an escaped `=` is never a key's end.
                if n == '=' {
                    raw.pop();
                    raw.push('\u{0}');
                }
            }
            '=' => {
                let (before, key) = match raw.rfind(' ') {
                    Some(i) => (raw[..i].to_string(), raw[i + 1..].to_string()),
                    None => (String::new(), raw.clone()),
                };
                if let Some(last) = pairs.last_mut() {
                    last.1 = before;
                }
                pairs.push((key, String::new()));
                raw.clear();
            }
            c => raw.push(c),
        }
    }
    if let Some(last) = pairs.last_mut() {
        last.1 = raw;
    }
    let pairs = pairs
        .into_iter()
        .map(|(k, v)| (k, v.replace('\u{0}', "=")))
        .collect();
    (header, pairs)
}

/// A LEEF 2.0 line: its six header fields and its tab-separated attributes.
fn parse_leef(line: &str) -> (Vec<String>, Vec<(String, String)>) {
    let parts: Vec<&str> = line.splitn(7, '|').collect();
    assert_eq!(parts.len(), 7, "{line}");
    let attrs = parts[6]
        .split('\t')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{kv:?}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    (parts[..6].iter().map(|s| s.to_string()).collect(), attrs)
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_the_ledger_in_every_siem_format_and_resumes_from_a_cursor() {
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = temp_dir("export");
    let common = format!(
        "\n[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"orders-read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n"
    );
    let node = start_node(&dir, 0, &common);
    let config = dir.join("node0.toml");
    let data = dir.join("data0");

    let (ok, out, err) = cli(
        "keys",
        &config,
        &["create", "--consumer", "billing", "--json"],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(out.trim()).unwrap();
    let key = created["secret"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    let auth = format!("Authorization: Bearer {key}\r\nUser-Agent: siem|test=1\\x\r\n");
    let start = Instant::now();
    let (ok_id, bad_id, missing_id) = loop {
        let (status, id) = send(&node.addr, "/orders/42?token=sekrit&page=2", &auth);
        if status == 200 {
            let (s401, bad) = send(&node.addr, "/orders/43", "");
            assert_eq!(s401, 401);
            let (s404, missing) = send(&node.addr, "/nope", "");
            assert_eq!(s404, 404);
            break (id, bad, missing);
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the new key is not in force"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_recorded(&data, &[&ok_id, &bad_id, &missing_id]);
    // A stable ledger from here on.
    drop(node);
    let recorded = events(&data);
    let n = recorded.len();
    let last_seq = recorded.last().unwrap()["seq"].as_u64().unwrap();

    // json: the ledger's records as they are.
    let json = export(&config, &["--format", "json"]);
    assert_eq!(json.lines().count(), n);
    let back: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, recorded);
    let outcome = |e: &Value, id: &str| e["request_id"] == id && e["phase"].is_null();
    let ok_event = recorded.iter().find(|e| outcome(e, &ok_id)).unwrap();
    let ok_seq = ok_event["seq"].as_u64().unwrap();
    assert_eq!(ok_event["request"]["query"], "token=REDACTED&page=REDACTED");

    // OCSF API Activity.
    let ocsf = export(&config, &["--format", "ocsf"]);
    assert_eq!(ocsf.lines().count(), n, "one line an event");
    let ocsf: Vec<Value> = ocsf
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(ocsf
        .iter()
        .all(|o| o["class_uid"] == 6003 && o["category_uid"] == 6));
    assert!(ocsf
        .iter()
        .all(|o| o["type_uid"].as_u64().unwrap() == 600300 + o["activity_id"].as_u64().unwrap()));
    let find = |id: &str| {
        ocsf.iter()
            .find(|o| o["http_request"]["uid"] == id && o["http_response"]["code"].is_u64())
            .unwrap_or_else(|| panic!("no OCSF outcome for {id}"))
    };
    let o = find(&ok_id);
    assert_eq!(o["activity_id"], 2);
    assert_eq!(o["status_id"], 1);
    assert_eq!(o["status_code"], "200");
    assert_eq!(o["http_request"]["http_method"], "GET");
    assert_eq!(o["http_request"]["url"]["path"], "/orders/42");
    assert_eq!(
        o["http_request"]["url"]["query_string"],
        "token=REDACTED&page=REDACTED"
    );
    assert_eq!(o["http_request"]["user_agent"], "siem|test=1\\x");
    assert_eq!(o["http_response"]["code"], 200);
    assert_eq!(o["metadata"]["correlation_uid"], ok_id.as_str());
    assert_eq!(o["metadata"]["sequence"], ok_seq);
    assert_eq!(o["metadata"]["product"]["name"], "apiwarden");
    assert_eq!(o["actor"]["user"]["name"], "billing");
    assert_eq!(o["actor"]["user"]["uid"], key_id.as_str());
    assert_eq!(o["src_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(o["api"]["service"]["name"], "echo");
    let o = find(&bad_id);
    assert_eq!(o["status_id"], 2);
    assert_eq!(o["status_detail"], "authn.missing");
    assert_eq!(o["http_response"]["code"], 401);
    let o = find(&missing_id);
    assert_eq!(o["status_detail"], "route.not_found");
    assert_eq!(o["http_request"]["url"]["path"], "/nope");
    assert!(ocsf.iter().any(|o| o["unmapped"]["kind"] == "admin"
        && o["api"]["operation"] == "keys.created"
        && o["activity_id"] == 1));

    // ECS.
    let ecs = export(&config, &["--format", "ecs"]);
    assert_eq!(ecs.lines().count(), n);
    let ecs: Vec<Value> = ecs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |id: &str| {
        ecs.iter()
            .find(|o| {
                o["http"]["request"]["id"] == id && o["http"]["response"]["status_code"].is_u64()
            })
            .unwrap_or_else(|| panic!("no ECS outcome for {id}"))
    };
    let o = find(&ok_id);
    assert_eq!(o["ecs"]["version"], "8.11.0");
    assert_eq!(o["@timestamp"], ok_event["time"]);
    assert_eq!(o["event"]["outcome"], "success");
    assert_eq!(o["event"]["sequence"], ok_seq);
    assert_eq!(o["url"]["path"], "/orders/42");
    assert_eq!(o["http"]["response"]["status_code"], 200);
    assert_eq!(o["user"]["name"], "billing");
    assert_eq!(o["source"]["ip"], "127.0.0.1");
    assert_eq!(o["observer"]["name"], "node0");
    let o = find(&bad_id);
    assert_eq!(o["event"]["outcome"], "failure");
    assert_eq!(o["event"]["reason"], "authn.missing");
    assert_eq!(o["http"]["response"]["status_code"], 401);

    // CEF.
    let cef = export(&config, &["--format", "cef"]);
    assert_eq!(cef.lines().count(), n);
    let cef: Vec<_> = cef.lines().map(parse_cef).collect();
    assert!(cef
        .iter()
        .all(|(h, _)| h[0] == "CEF:0" && h[1] == "apiwarden" && h[2] == "apiwarden"));
    let find = |id: &str| {
        cef.iter()
            .find(|(_, x)| get(x, "cs4") == Some(id) && get(x, "cn1").is_some())
            .unwrap_or_else(|| panic!("no CEF outcome for {id}"))
    };
    let (h, x) = find(&ok_id);
    assert_eq!(h[4], "ok");
    assert_eq!(get(x, "cs4Label"), Some("requestId"));
    assert_eq!(
        get(x, "request"),
        Some("/orders/42?token=REDACTED&page=REDACTED")
    );
    assert_eq!(get(x, "requestMethod"), Some("GET"));
    assert_eq!(get(x, "requestClientApplication"), Some("siem|test=1\\x"));
    assert_eq!(get(x, "cn1"), Some("200"));
    assert_eq!(get(x, "suser"), Some("billing"));
    assert_eq!(get(x, "src"), Some("127.0.0.1"));
    assert_eq!(get(x, "cn3"), Some(ok_seq.to_string().as_str()));
    let (h, x) = find(&bad_id);
    assert_eq!(h[4], "authn.missing");
    assert_eq!(h[5], "request denied");
    assert_eq!(get(x, "cn1"), Some("401"));
    assert_eq!(get(x, "outcome"), Some("failure"));

    // LEEF.
    let leef = export(&config, &["--format", "leef"]);
    assert_eq!(leef.lines().count(), n);
    let leef: Vec<_> = leef.lines().map(parse_leef).collect();
    assert!(leef
        .iter()
        .all(|(h, _)| h[0] == "LEEF:2.0" && h[1] == "apiwarden" && h[5] == "x09"));
    let find = |id: &str| {
        leef.iter()
            .find(|(_, a)| get(a, "requestId") == Some(id) && get(a, "status").is_some())
            .unwrap_or_else(|| panic!("no LEEF outcome for {id}"))
    };
    let (h, a) = find(&ok_id);
    assert_eq!(h[4], "ok");
    assert_eq!(
        get(a, "url"),
        Some("/orders/42?token=REDACTED&page=REDACTED")
    );
    assert_eq!(get(a, "status"), Some("200"));
    assert_eq!(get(a, "usrName"), Some("billing"));
    assert_eq!(get(a, "src"), Some("127.0.0.1"));
    assert_eq!(get(a, "userAgent"), Some("siem|test=1\\x"));
    let (h, a) = find(&missing_id);
    assert_eq!(h[4], "route.not_found");
    assert_eq!(get(a, "status"), Some("404"));
    assert_eq!(get(a, "url"), Some("/nope"));

    // No secret reaches any export.
    for format in ["json", "ocsf", "ecs", "cef", "leef"] {
        let out = export(&config, &["--format", format]);
        assert!(!out.contains("sekrit"), "{format}");
        assert!(!out.contains(&key[16..]), "{format}");
        if format != "json" {
            assert!(!out.contains("null"), "{format}: no field printed as null");
        }
    }

    // --cursor: the first run exports everything and saves the last seq...
    let first = export(&config, &["--format", "ecs", "--cursor", "splunk"]);
    assert_eq!(first.lines().count(), n);
    let cursor_file = data.join("ledger/cursors/splunk");
    assert_eq!(
        std::fs::read_to_string(&cursor_file).unwrap(),
        format!("{last_seq}\n")
    );
    // The cursor is the ledger's, and its owner's only like the rest of it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cursor_file), 0o600);
    assert_eq!(mode(cursor_file.parent().unwrap()), 0o700);
    // ... a second run with nothing new prints nothing and keeps it.
    let again = export(&config, &["--format", "ecs", "--cursor", "splunk"]);
    assert_eq!(again, "");
    assert_eq!(
        std::fs::read_to_string(&cursor_file).unwrap(),
        format!("{last_seq}\n")
    );
    // ... and after more traffic, only what was recorded since.
    let node = start_node(&dir, 0, &common);
    let (status, new_id) = send(&node.addr, "/orders/44", &auth);
    assert_eq!(status, 200);
    wait_recorded(&data, &[&new_id]);
    drop(node);
    let now = events(&data);
    let fresh: Vec<&Value> = now
        .iter()
        .filter(|e| e["seq"].as_u64().unwrap() > last_seq)
        .collect();
    let second = export(&config, &["--format", "ecs", "--cursor", "splunk"]);
    let second: Vec<Value> = second
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(second.len(), fresh.len());
    assert_eq!(second[0]["event"]["sequence"], last_seq + 1);
    assert!(second
        .iter()
        .all(|o| o["event"]["sequence"].as_u64().unwrap() > last_seq));
    assert!(second
        .iter()
        .any(|o| o["http"]["request"]["id"] == new_id.as_str()));
    assert!(!second
        .iter()
        .any(|o| o["http"]["request"]["id"] == ok_id.as_str()));
    let new_last = now.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(
        std::fs::read_to_string(&cursor_file).unwrap(),
        format!("{new_last}\n")
    );
    // A cursor past the ledger's end (a ledger restored from a backup) is said to skip what
    // will be written, not passed over in silence.
    let ahead = data.join("ledger/cursors/ahead");
    std::fs::write(&ahead, format!("{}\n", new_last + 1000)).unwrap();
    let (ok, out, err) = cli("audit", &config, &["export", "--cursor", "ahead"]);
    assert!(ok, "{err}");
    assert_eq!(out, "");
    assert!(
        err.contains(&format!(
            "is at record {}, but the ledger ends at record {new_last}",
            new_last + 1000
        )),
        "{err}"
    );
    // A cursor of another name is independent; --since still applies.
    let other = export(&config, &["--format", "json", "--cursor", "elastic_2"]);
    assert_eq!(other.lines().count(), now.len());
    let since = export(
        &config,
        &["--format", "json", "--since", "2000-01-01T00:00:00Z"],
    );
    assert_eq!(since.lines().count(), now.len());
    let future = export(
        &config,
        &["--format", "cef", "--since", "2999-01-01T00:00:00Z"],
    );
    assert_eq!(future, "");
    // --since from the middle (through the search index): what a full export holds from
    // that time on; with a cursor, the next run has nothing new.
    let mid = &now[now.len() / 2];
    let from = mid["time"].as_str().unwrap();
    let want: Vec<u64> = now
        .iter()
        .filter(|e| e["time"].as_str().unwrap() >= from)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let seqs = |text: &str| -> Vec<u64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let args = ["--format", "json", "--since", from, "--cursor", "mid"];
    assert_eq!(seqs(&export(&config, &args)), want);
    assert!(want.len() < now.len());
    assert_eq!(export(&config, &args), "");
}

#[test]
fn a_bad_format_or_cursor_name_is_a_usage_error() {
    let dir = temp_dir("export-usage");
    std::fs::create_dir_all(dir.join("ledger")).unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(["audit", "export"])
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .arg("--config")
            .arg(dir.join("absent.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--format", "syslog"]);
    assert_eq!(code, Some(2), "{err}");
    for name in ["json", "ocsf", "ecs", "cef", "leef"] {
        assert!(err.contains(name), "the valid formats are named: {err}");
    }
    for bad in ["../x", "a b", "", &"x".repeat(65)] {
        let (code, err) = run(&["--format", "json", "--cursor", bad]);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert!(err.contains("cursor"), "{err}");
    }
    std::fs::create_dir_all(dir.join("ledger/cursors")).unwrap();
    std::fs::write(dir.join("ledger/cursors/broken"), "twelve\n").unwrap();
    let (code, err) = run(&["--cursor", "broken"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("broken"), "{err}");
}
