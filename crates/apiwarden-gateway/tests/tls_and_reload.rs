//! TLS termination (HTTP/2 through ALPN, certificate reload) and configuration hot reload.
// Tests read small, known bodies whole.
#![allow(clippy::disallowed_methods)]

mod common;

use apiwarden_core::event::{EventKind, Outcome, Reason};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn test_ca() -> TestCa {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "apiwarden test CA");
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCa { cert, key }
}

/// Writes a server certificate for `localhost` signed by `ca` into `dir`.
fn write_server_cert(ca: &TestCa, dir: &Path, cn: &str) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn client_config(ca: &TestCa, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_cn(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    // The test names each certificate with a unique CN; find it in the DER bytes.
    let text = String::from_utf8_lossy(der.as_ref()).to_string();
    ["first-cert", "second-cert"]
        .iter()
        .find(|cn| text.contains(*cn))
        .unwrap_or(&"unknown")
        .to_string()
}

#[tokio::test]
async fn http2_over_tls_with_a_test_ca_and_certificate_reload() {
    let ca = test_ca();
    let echo = echo_upstream().await;
    let dir = temp_dir("tls");
    write_server_cert(&ca, &dir, "first-cert");
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{d}/server.pem\", key = \"{d}/server.key\", reload_interval = \"100ms\" }}\n{}",
        open_route("echo", "/", echo),
        d = dir.display()
    );
    let gw = start(&cfg).await;

    // HTTP/2 through ALPN.
    let tls = tls_connect(gw.gw.addr, client_config(&ca, &[b"h2"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(peer_cn(&tls), "first-cert");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/h2/check")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/h2/check");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");

    // HTTP/1.1 over TLS 1.2 still works.
    let mut c12 = (*client_config(&ca, &[b"http/1.1"])).clone();
    c12 = {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert.der().to_vec()))
            .unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = c12.alpn_protocols;
        c
    };
    let tls = tls_connect(gw.gw.addr, Arc::new(c12)).await;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("/h1")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (http::Version::HTTP_11, 200)
    );
    drop(resp);

    // A new certificate on disk is served without a restart.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a different modification time
    write_server_cert(&ca, &dir, "second-cert");
    let mut served = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        served = peer_cn(&tls_connect(gw.gw.addr, client_config(&ca, &[b"h2"])).await);
        if served == "second-cert" {
            break;
        }
    }
    assert_eq!(served, "second-cert");

    let ev = gw.assert_events(2).await;
    assert_eq!(ev[0].tls.version, Some("TLSv1.3"));
    assert_eq!(ev[1].tls.version, Some("TLSv1.2"));
}

fn two_routes(echo: std::net::SocketAddr, with_b: bool) -> String {
    let mut cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        open_route("echo", "/a", echo)
    );
    if with_b {
        cfg.push_str("[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"echo\"\nauth = [\"none\"]\n");
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_route_while_requests_are_in_flight_and_none_fails() {
    let echo = echo_upstream().await;
    let gw = start(&two_routes(echo, false)).await;
    gw.gw.watch_config(Duration::from_millis(50));
    assert_eq!(get(&gw.url("/b")).await.0, 404);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, done, url) = (stop.clone(), done.clone(), gw.url("/a/x"));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let status = get(&url).await.0;
                if status != 200 {
                    failures.push(status);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The file watcher notices the change; no signal needed.
    std::fs::write(gw.dir.join("apiwarden.toml"), two_routes(echo, true)).unwrap();
    let mut b_status = 404;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b_status = get(&gw.url("/b")).await.0;
        if b_status == 200 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert_eq!(b_status, 200, "the new route serves after the reload");
    assert!(
        failures.is_empty(),
        "requests failed during the reload: {failures:?}"
    );
    let n = done.load(Ordering::Relaxed);
    assert!(n > 20, "traffic ran during the reload ({n} requests)");
    let system = gw.events_of(EventKind::System);
    assert!(
        system.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("configuration reloaded"))),
        "{system:?}"
    );
    // Every request recorded once: the workers' requests plus the /b probes.
    let events = gw.request_events();
    let a_events = events
        .iter()
        .filter(|e| e.request.path.as_deref() == Some("/a/x"))
        .count();
    assert_eq!(a_events, n);
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_old_routes_and_is_recorded() {
    let echo = echo_upstream().await;
    let gw = start(&two_routes(echo, false)).await;
    std::fs::write(
        gw.dir.join("apiwarden.toml"),
        "[[routes]]\nname = \"broken\"\npath_prefix = \"/c\"\nupstream = \"missing\"\n",
    )
    .unwrap();
    let err = gw.gw.reload().unwrap_err().to_string();
    assert!(
        err.contains("apiwarden.toml:1:1: route \"broken\" has no `auth`"),
        "{err}"
    );
    assert!(err.contains("upstream \"missing\" is not defined"), "{err}");
    assert_eq!(
        get(&gw.url("/a/still")).await.0,
        200,
        "old routes keep working"
    );
    assert_eq!(get(&gw.url("/c")).await.0, 404);
    let system = gw.events_of(EventKind::System);
    let refused = system
        .iter()
        .find(|e| {
            e.message
                .as_deref()
                .is_some_and(|m| m.starts_with("configuration reload refused"))
        })
        .expect("a system event for the refused reload");
    assert_eq!(refused.decision.outcome, Outcome::Deny);
    let metrics = get(&format!("http://{}/metrics", gw.gw.admin_addr)).await.2;
    assert!(
        metrics.contains("apiwarden_config_reloads_total{result=\"invalid\"} 1"),
        "{metrics}"
    );
    gw.assert_events(2).await;
}

/// Regression: a file caught between being emptied and written (`cat new > apiwarden.toml`)
/// was a valid, empty configuration, and a reload took every route away.
#[tokio::test]
async fn an_empty_file_is_not_taken_on_reload() {
    let echo = echo_upstream().await;
    let gw = start(&two_routes(echo, false)).await;
    std::fs::write(gw.dir.join("apiwarden.toml"), "\n").unwrap();
    let err = gw.gw.reload().unwrap_err().to_string();
    assert!(err.contains("is empty"), "{err}");
    assert_eq!(get(&gw.url("/a/still")).await.0, 200, "the routes stay");
    std::fs::write(gw.dir.join("apiwarden.toml"), two_routes(echo, true)).unwrap();
    gw.gw.reload().expect("a whole file is taken");
    assert_eq!(get(&gw.url("/b/new")).await.0, 200);
}

/// A TLS gateway (with `gateway_lines` in its `[gateway]`) in front of an echo upstream, and a
/// client connection to it that negotiated `h2` by ALPN and has sent nothing yet.
async fn alpn_h2_connection(
    tag: &str,
    gateway_lines: &str,
) -> (TestGateway, tokio_rustls::client::TlsStream<TcpStream>) {
    let ca = test_ca();
    let dir = temp_dir(tag);
    write_server_cert(&ca, &dir, "first-cert");
    let up = echo_upstream().await;
    let gw = start(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{gateway_lines}tls = {{ cert = \"{d}/server.pem\", key = \"{d}/server.key\" }}\n{}",
        open_route("echo", "/", up),
        d = dir.display()
    ))
    .await;
    let tls = tls_connect(gw.gw.addr, client_config(&ca, &[b"h2"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    (gw, tls)
}

/// A client that completes TLS with ALPN `h2` and then sends nothing (not even the HTTP/2
/// preface, so GOAWAY cannot end it) is cut off one `idle_timeout` after it was asked to
/// close: it cannot hold a connection slot for ever.
#[tokio::test]
async fn a_silent_http2_client_is_cut_off_after_two_idle_timeouts() {
    use tokio::io::AsyncReadExt;
    let (gw, mut tls) = alpn_h2_connection("tls-silent-h2", "idle_timeout = \"1s\"\n").await;
    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        // The server's own SETTINGS may come first; then the end of the stream.
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the silent connection is still open");
    until_metric(&gw, "apiwarden_connections_open ", 0).await;
}

/// A client that negotiates `h2` by ALPN and then speaks HTTP/1.1 is recorded as malformed
/// (h2 itself drops it before any request exists).
#[tokio::test]
async fn http1_after_alpn_h2_is_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, mut tls) = alpn_h2_connection("tls-no-preface", "").await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    let ev = gw.assert_events(1).await;
    assert_eq!(ev[0].decision.reason, Reason::RequestMalformed);
    assert_eq!(ev[0].tls.version, Some("TLSv1.3"));
    assert!(
        ev[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("did not send the HTTP/2 connection preface"),
        "{:?}",
        ev[0].message
    );
}

/// Regression (found by review): a reload that changed `audit.durability` changed whether
/// requests wait for their received record, while the ledger's writer kept the mode it was
/// opened with, so a writer opened `async` could answer a `strict` wait before syncing.
/// Durability now changes on restart only, for the requests as for the writer.
#[tokio::test]
async fn a_reload_does_not_change_durability() {
    let echo = echo_upstream().await;
    let route = open_route("echo", "/", echo);
    let gw = start(&format!("[audit]\ndurability = \"batched\"\n{route}")).await;
    assert_eq!(get(&gw.url("/before")).await.0, 200);
    std::fs::write(
        gw.dir.join("apiwarden.toml"),
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\ndurability = \"strict\"\n{route}"
        ),
    )
    .unwrap();
    gw.gw.reload().unwrap();
    assert_eq!(get(&gw.url("/after")).await.0, 200);
    gw.assert_events(2).await;
    let received = gw
        .events_of(EventKind::Request)
        .into_iter()
        .filter(|e| e.phase.is_some())
        .count();
    assert_eq!(
        received, 0,
        "no received record: the ledger is still batched"
    );
}
