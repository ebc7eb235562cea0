//! A built-in echo upstream, for `apiwarden demo` and for tests.
//!
//! A request with a body gets the body streamed back; a request without one gets a JSON
//! description of what arrived (method, path, query and the headers the gateway set).

use crate::body::ResponseBody;
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;

type EchoBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    if !http_body::Body::is_end_stream(req.body()) {
        let ct = req.headers().get(header::CONTENT_TYPE).cloned();
        let mut resp = Response::new(req.into_body().boxed());
        if let Some(ct) = ct {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        return Ok(resp);
    }
    let pick = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let description = serde_json::json!({
        "echo": "apiwarden demo upstream",
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": {
            "host": pick("host"),
            "x-request-id": pick("x-request-id"),
            "x-forwarded-for": pick("x-forwarded-for"),
            "x-forwarded-proto": pick("x-forwarded-proto"),
            "x-forwarded-host": pick("x-forwarded-host"),
            "x-real-ip": pick("x-real-ip"),
            "forwarded": pick("forwarded"),
            "traceparent": pick("traceparent"),
            "user-agent": pick("user-agent"),
            "authorization": pick("authorization"),
            "x-api-key": pick("x-api-key"),
        }
    });
    let mut body = serde_json::to_string_pretty(&description).unwrap_or_default();
    body.push('\n');
    let mut resp = Response::new(ResponseBody::full(body).map_err(|e| e).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Starts the echo upstream on `addr` and returns where it listens.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .await;
            });
        }
    });
    Ok(local)
}
