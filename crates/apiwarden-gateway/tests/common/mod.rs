//! Shared helpers of the integration tests: a real gateway on 127.0.0.1:0, real upstreams on
//! loopback, and clients that speak HTTP over real sockets.
#![allow(dead_code)]
// Tests read small, known bodies whole.
#![allow(clippy::disallowed_methods)]

use apiwarden_core::event::{AuditEvent, EventKind};
use apiwarden_gateway::audit::MemorySink;
use apiwarden_gateway::{Gateway, Options};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct TestGateway {
    pub gw: Arc<Gateway>,
    pub sink: MemorySink,
    pub dir: PathBuf,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.addr, path)
    }

    /// Events of one kind recorded so far.
    pub fn events_of(&self, kind: EventKind) -> Vec<AuditEvent> {
        self.sink
            .events()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }

    /// Request events recorded so far: one per request, its outcome (a `strict` ledger's
    /// `received` records, made before forwarding, are left out).
    pub fn request_events(&self) -> Vec<AuditEvent> {
        self.events_of(EventKind::Request)
            .into_iter()
            .filter(|e| e.phase.is_none())
            .collect()
    }

    /// Waits until `n` request events are recorded (a response body ends just after the
    /// client has read it), then returns them.
    pub async fn wait_for_events(&self, n: usize) -> Vec<AuditEvent> {
        for _ in 0..200 {
            let ev = self.request_events();
            if ev.len() >= n {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.request_events()
    }

    /// Asserts that exactly `n` request events were recorded, and no more arrive.
    pub async fn assert_events(&self, n: usize) -> Vec<AuditEvent> {
        let ev = self.wait_for_events(n).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ev2 = self.request_events();
        assert_eq!(
            ev2.len(),
            n,
            "expected exactly {n} request events, got {}: {:#?}",
            ev2.len(),
            ev2.iter()
                .map(|e| (&e.request.path, e.response.status, e.decision.reason))
                .collect::<Vec<_>>()
        );
        ev
    }
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "aw-test-{tag}-{}",
        apiwarden_gateway::ids::new_id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts a gateway from config text. `listen` and `admin.listen` default to 127.0.0.1:0
/// unless the text sets them. The config is written to `<dir>/apiwarden.toml`.
pub async fn start(config_body: &str) -> TestGateway {
    let dir = temp_dir("gw");
    let mut text = String::new();
    if !config_body.contains("[gateway]") {
        text.push_str("[gateway]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !config_body.contains("[admin]") {
        text.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    text.push_str(config_body);
    let path = dir.join("apiwarden.toml");
    std::fs::write(&path, &text).unwrap();
    let config = apiwarden_core::config::parse(&text, &path.display().to_string())
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
    let sink = MemorySink::new();
    let gw = Gateway::start(Options {
        config,
        config_path: Some(path),
        sink: Arc::new(sink.clone()),
        node: "test-node".into(),
    })
    .await
    .expect("gateway starts");
    TestGateway {
        gw: Arc::new(gw),
        sink,
        dir,
    }
}

/// The built-in echo upstream on a free port.
pub async fn echo_upstream() -> SocketAddr {
    apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

/// An address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// An upstream that accepts, reads the request head, waits `delay`, then answers 200.
pub async fn slow_upstream(delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await;
            });
        }
    });
    a
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A simple GET: status, headers and body.
pub async fn get(url: &str) -> (u16, http::HeaderMap, String) {
    send(
        http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub async fn send(req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, String) {
    let resp = client()
        .request(req)
        .await
        .expect("request reaches the gateway");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Writes raw bytes to `addr` and reads the whole answer until the server closes or 2 s pass.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Resident memory of this process in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// An upstream section and an open route to it.
pub fn open_route(name: &str, path_prefix: &str, upstream: SocketAddr) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nurl = \"http://{upstream}\"\n\n[[routes]]\nname = \"{name}\"\npath_prefix = \"{path_prefix}\"\nupstream = \"{name}\"\nauth = [\"none\"]\n"
    )
}

/// Waits up to two seconds for a metric line of the gateway to read `want`.
pub async fn until_metric(gw: &TestGateway, line_start: &str, want: u64) {
    let started = std::time::Instant::now();
    loop {
        let got = metric(gw, line_start);
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{line_start}{got}, not {want}, after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one metric line of the gateway (`line_start` is the name with its labels and
/// the space before the value).
pub fn metric(gw: &TestGateway, line_start: &str) -> u64 {
    let text = gw.gw.shared.render_metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
}

/// The request event of the request with this `X-Request-Id`, once it is recorded.
pub async fn event_of(gw: &TestGateway, rid: &str) -> AuditEvent {
    for _ in 0..200 {
        if let Some(e) = gw
            .request_events()
            .into_iter()
            .find(|e| e.request_id.map(|r| r.to_string()).as_deref() == Some(rid))
        {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no audit event for request {rid}");
}

/// The one test double of the ledger (a disk that hangs, or one that is slow, cannot be made
/// here): it keeps events in memory, and answers a record a request waits for (`strict`) as
/// durable after `delay`, or never when `delay` is `None` (a disk that hangs; the answers wait
/// in `waiting`).
#[derive(Default)]
pub struct LedgerDouble {
    pub events: MemorySink,
    pub delay: Option<Duration>,
    pub waiting: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Result<u64, ()>>>>,
}

impl apiwarden_gateway::audit::AuditSink for LedgerDouble {
    fn record(&self, event: Box<AuditEvent>) {
        self.events.record(event);
    }
    fn flush(&self) -> tokio::sync::oneshot::Receiver<()> {
        self.events.flush()
    }
    fn record_durable(
        &self,
        event: &AuditEvent,
    ) -> tokio::sync::oneshot::Receiver<Result<u64, ()>> {
        let answer = self.events.record_durable(event);
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.delay {
            None => self.waiting.lock().unwrap().push(tx),
            Some(d) => {
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let _ = tx.send(answer.blocking_recv().unwrap_or(Err(())));
                });
            }
        }
        rx
    }
}
