//! The floor under the gateway's cost: a reverse proxy made of hyper alone, laid out as
//! apiwarden is (one acceptor handing connections to one single-threaded runtime per core,
//! keep-alive upstream connections pooled per worker, each driven by a task of its own) but
//! with none of its stages: no routing, identity, limits, headers of its own, audit events or
//! ledger. `bench/run.sh` runs it with `FLOOR=1`, so that one run shows how much of the
//! distance to nginx is hyper's and how much is apiwarden's own work.
//!
//! Usage: `hyper_floor LISTEN UPSTREAM` (both `host:port`). Not a product: no timeouts, no
//! error answers, no TLS; a benchmark fixture only.

use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static UPSTREAM: OnceLock<String> = OnceLock::new();

thread_local! {
    /// This worker's idle upstream connections.
    static POOL: RefCell<Vec<client::SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

/// The upstream's response body; its connection returns to the pool at the end.
struct Pooled {
    body: Incoming,
    sender: Option<client::SendRequest<Incoming>>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            POOL.with(|p| p.borrow_mut().push(s));
        }
    }
}

impl http_body::Body for Pooled {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

async fn connection() -> client::SendRequest<Incoming> {
    loop {
        let Some(mut s) = POOL.with(|p| p.borrow_mut().pop()) else {
            break;
        };
        if s.ready().await.is_ok() {
            return s;
        }
    }
    let upstream = UPSTREAM.get().expect("set in main");
    let stream = tokio::net::TcpStream::connect(upstream.as_str())
        .await
        .expect("the upstream accepts connections");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (sender, conn) = client::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    sender
}

async fn proxy(req: hyper::Request<Incoming>) -> Result<hyper::Response<Pooled>, Infallible> {
    let mut sender = connection().await;
    let response = sender
        .send_request(req)
        .await
        .expect("the upstream answers");
    let (parts, body) = response.into_parts();
    Ok(hyper::Response::from_parts(
        parts,
        Pooled {
            body,
            sender: Some(sender),
        },
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = &args[..] else {
        eprintln!("usage: hyper_floor LISTEN UPSTREAM  (both host:port)");
        std::process::exit(2);
    };
    UPSTREAM.set(upstream.clone()).expect("set once");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues: Vec<_> = (0..workers)
        .map(|_| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    while let Some(stream) = rx.recv().await {
                        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let _ = server::Builder::new()
                                .serve_connection(TokioIo::new(stream), service_fn(proxy))
                                .await;
                        });
                    }
                });
            });
            tx
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str())
            .await
            .expect("the listen address is free");
        for next in (0..workers).cycle() {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if let Ok(stream) = stream.into_std() {
                let _ = queues[next].send(stream);
            }
        }
    });
}
