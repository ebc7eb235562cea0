//! No secret appears anywhere a secret could leak: after a run of `apiwarden serve` (at debug
//! log level) that sees good and bad API keys, JWTs, admin tokens and a key issued through the
//! admin API, neither the log, the audit file, nor any error body holds a key, a token, an
//! `Authorization` value, the pepper, an HS256 secret or an admin token.

mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// One request on a fresh connection: the status and the whole raw response.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

fn hs256(secret: &[u8], claims: &str) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn no_secret_reaches_a_log_line_an_error_body_or_the_audit_trail() {
    let dir = temp_dir("secrets");
    let pepper = random_hex(32);
    let admin_token = format!("admintok-{}", random_hex(24));
    let hs_secret = format!("hs256-{}", random_hex(24));
    std::fs::write(dir.join("admin.token"), &admin_token).unwrap();
    std::fs::write(dir.join("hs.secret"), &hs_secret).unwrap();
    let (port, admin_port, up_port) = (free_port(), free_port(), free_port());
    // The upstream: a raw listener that answers 200 to everything.
    let upstream = std::net::TcpListener::bind(("127.0.0.1", up_port)).unwrap();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
            });
        }
    });
    let config = dir.join("apiwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [admin.tokens.ops]\nrole = \"admin\"\nsecret = \"file:admin.token\"\n\n\
             [storage]\ndata_dir = \"data\"\npepper = \"env:AW_SECRETS_TEST_PEPPER\"\n\n\
             [jwt.partner]\nissuer = \"partner\"\naudiences = [\"api\"]\nsecret = \"file:hs.secret\"\n\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{up_port}\"\n\n\
             [[routes]]\nname = \"keyed\"\npath_prefix = \"/keyed\"\nupstream = \"up\"\nauth = [\"api_key\"]\n\n\
             [[routes]]\nname = \"jwt\"\npath_prefix = \"/jwt\"\nupstream = \"up\"\nauth = [\"jwt\"]\n\n\
             [[consumers]]\nname = \"billing\"\n"
        ),
    )
    .unwrap();
    let env = [("AW_SECRETS_TEST_PEPPER", pepper.as_str())];
    let (ok, out, err) = cli_env(
        "keys",
        &config,
        &["create", "--consumer", "billing", "--json"],
        &env,
    );
    assert!(ok, "{err}");
    let cli_key = serde_json::from_str::<serde_json::Value>(&out).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();

    let log = dir.join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_apiwarden"))
        .args(["serve", "--config"])
        .arg(&config)
        .envs(env)
        .env("APIWARDEN_LOG", "debug")
        .stdout(Stdio::from(
            std::fs::File::create(dir.join("serve.out")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&admin, "GET", "/readyz", &[], "").0 != 200 {
        assert!(Instant::now() < deadline, "serve did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }

    let exp = apiwarden_gateway::now_ms() / 1000 + 300;
    let good_jwt = hs256(
        hs_secret.as_bytes(),
        &format!(r#"{{"iss":"partner","aud":"api","sub":"s","exp":{exp}}}"#),
    );
    let forged_jwt = hs256(
        b"a guessed secret that is long enough!!",
        &format!(r#"{{"iss":"partner","aud":"api","sub":"s","exp":{exp}}}"#),
    );
    let key_id = &cli_key[3..15];
    let wrong_key = format!("aw_{key_id}_{}", random_hex(32));
    let wrong_admin = format!("admintok-{}", random_hex(24));
    let mut responses = String::new();
    let mut expect = |r: (u16, String), want: u16| {
        assert_eq!(r.0, want, "{}", r.1);
        responses.push_str(&r.1);
    };
    let bearer = |t: &str| format!("Bearer {t}");
    expect(
        http(
            &addr,
            "GET",
            "/keyed/a",
            &[("Authorization", &bearer(&cli_key))],
            "",
        ),
        200,
    );
    expect(
        http(&addr, "GET", "/keyed/a", &[("X-API-Key", &cli_key)], ""),
        200,
    );
    expect(
        http(
            &addr,
            "GET",
            "/keyed/a",
            &[("Authorization", &bearer(&wrong_key))],
            "",
        ),
        401,
    );
    expect(
        http(
            &addr,
            "GET",
            &format!("/keyed/a?api_key={cli_key}"),
            &[],
            "",
        ),
        401,
    );
    expect(
        http(
            &addr,
            "GET",
            "/keyed/a",
            &[("Authorization", &format!("Basic {cli_key}"))],
            "",
        ),
        401,
    );
    expect(
        http(
            &addr,
            "GET",
            "/jwt/a",
            &[("Authorization", &bearer(&good_jwt))],
            "",
        ),
        200,
    );
    expect(
        http(
            &addr,
            "GET",
            "/jwt/a",
            &[("Authorization", &bearer(&forged_jwt))],
            "",
        ),
        401,
    );
    expect(
        http(
            &admin,
            "GET",
            "/admin/v1/keys",
            &[("Authorization", &bearer(&wrong_admin))],
            "",
        ),
        401,
    );
    let (status, created) = http(
        &admin,
        "POST",
        "/admin/v1/keys",
        &[("Authorization", &bearer(&admin_token))],
        r#"{"consumer":"billing"}"#,
    );
    assert_eq!(status, 201, "{created}");
    let api_key = created
        .split("\"secret\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    // The issued key is in force within a second; its secret was shown once, in that answer.
    let deadline = Instant::now() + Duration::from_secs(2);
    while http(
        &addr,
        "GET",
        "/keyed/b",
        &[("Authorization", &bearer(&api_key))],
        "",
    )
    .0 != 200
    {
        assert!(Instant::now() < deadline, "the issued key was not taken up");
        std::thread::sleep(Duration::from_millis(25));
    }
    expect(
        http(
            &admin,
            "GET",
            "/admin/v1/keys",
            &[("Authorization", &bearer(&admin_token))],
            "",
        ),
        200,
    );

    // Stop the gateway so every event is flushed.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let log_text = std::fs::read_to_string(&log).unwrap();
    // The ledger's records, and its files as bytes (nothing hides in framing or checkpoints).
    let mut audit = audit_text(&dir.join("data"));
    for entry in walk(&dir.join("data/ledger")) {
        audit.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    assert!(audit.lines().count() >= 10, "the run was audited: {audit}");
    assert!(
        log_text.contains("DEBUG") || log_text.contains("INFO"),
        "the log was written: {log_text}"
    );
    let secrets = [
        ("pepper", pepper.as_str()),
        ("CLI key", cli_key.as_str()),
        ("CLI key secret", &cli_key[16..]),
        ("admin-issued key", api_key.as_str()),
        ("admin-issued key secret", &api_key[16..]),
        ("wrong key secret", &wrong_key[16..]),
        ("JWT", good_jwt.as_str()),
        ("JWT signature", good_jwt.rsplit('.').next().unwrap()),
        (
            "forged JWT signature",
            forged_jwt.rsplit('.').next().unwrap(),
        ),
        ("HS256 secret", hs_secret.as_str()),
        ("admin token", admin_token.as_str()),
        ("wrong admin token", wrong_admin.as_str()),
    ];
    for (what, secret) in secrets {
        assert!(!log_text.contains(secret), "the {what} is in the log");
        assert!(!audit.contains(secret), "the {what} is in the audit trail");
        assert!(!responses.contains(secret), "the {what} is in a response");
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
