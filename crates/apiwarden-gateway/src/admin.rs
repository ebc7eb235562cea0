//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the admin API (`admin_api.rs`).

use crate::body::ResponseBody;
use crate::pipeline::Shared;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An error of the admin listener's own (not of the admin API): JSON with `error` and
/// `request_id`, and the id in `X-Request-Id`, as every error of the gateway.
fn error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let rid = crate::ids::new_id();
    let body = serde_json::json!({ "error": message, "request_id": rid.to_string() });
    let mut r = reply(status, "application/json", body.to_string() + "\n");
    r.headers_mut()
        .insert(crate::pipeline::X_REQUEST_ID, crate::ids::header_value(rid));
    r
}

async fn handle(
    shared: Arc<Shared>,
    peer: std::net::IpAddr,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    const JSON: &str = "application/json";
    // Everything under `/admin` is the admin API's, so that every call there, known or not,
    // is authenticated first and recorded.
    let path = req.uri().path();
    if path == "/admin" || path.starts_with("/admin/") {
        return Ok(crate::admin_api::handle(shared, peer, req).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is allowed here",
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, JSON, "{\"status\":\"ok\"}\n".into()),
        "/readyz" => {
            if shared.shutting_down.load(Ordering::Relaxed) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    "{\"status\":\"shutting down\"}\n".into(),
                )
            } else if !shared.sink.healthy() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    "{\"status\":\"audit sink unhealthy\"}\n".into(),
                )
            } else if !shared.keys.load().usable() && needs_keys(&shared) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    "{\"status\":\"API keys cannot be read (see the log)\"}\n".into(),
                )
            } else if let Some(issuer) = unready_issuer(&shared) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    serde_json::json!({ "status": format!("the keys of token issuer {issuer} are not fetched yet (see the log)") }).to_string() + "\n",
                )
            } else {
                reply(StatusCode::OK, JSON, "{\"status\":\"ready\"}\n".into())
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.render_metrics(),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /admin/v1/...",
        ),
    })
}

/// Serves the admin listener until `stop` turns true.
/// A token issuer that a route relies on and whose keys are not there yet (its fetch is
/// started again if the floor allows).
fn unready_issuer(shared: &Shared) -> Option<String> {
    let state = shared.state.load();
    let issuer = state.issuers.iter().find(|i| {
        !i.ready()
            && state
                .config
                .routes
                .iter()
                .any(|r| r.jwt.as_deref() == Some(i.name.as_str()))
    })?;
    issuer.prefetch();
    Some(issuer.name.clone())
}

/// Whether a route of the config in force checks API keys.
fn needs_keys(shared: &Shared) -> bool {
    shared
        .state
        .load()
        .config
        .routes
        .iter()
        .any(|r| r.auth.contains(&apiwarden_core::config::AuthMethod::ApiKey))
}

/// Records a request the admin listener's HTTP parser refused (hyper answered it `400` or
/// `431` itself), as an `admin` event: anyone who reaches the listener is recorded, token or
/// not, whatever they send. Other connection errors (a client gone) are not requests.
fn record_unparsed(shared: &Shared, peer: std::net::IpAddr, e: &hyper::Error) {
    use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
    let reason = if e.is_parse_too_large() {
        Reason::RequestHeadersTooLarge
    } else if e.is_parse() {
        Reason::RequestMalformed
    } else {
        return;
    };
    let mut event = AuditEvent::new(EventKind::Admin, crate::ids::new_id(), shared.node.clone());
    event.request_id = Some(crate::ids::new_id());
    event.client.ip = Some(peer);
    event.decision.outcome = Outcome::Deny;
    event.decision.reason = reason;
    event.decision.policy = Some("admin_api".into());
    event.response.status = crate::respond::status_and_message(reason).0.as_u16();
    event.message = Some("admin listener: a request its HTTP parser refused".into());
    shared.record(Box::new(event));
}

/// Resolves once `stop` holds a deadline (at once if it already does).
async fn stopped(stop: &mut watch::Receiver<Option<Instant>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// Connections the admin listener keeps open at once. One beyond is closed as soon as it is
/// accepted: a client that opens connections without end (the admin API answers only to a
/// token, but any client can connect) costs a socket and a task each, never the process's
/// file descriptors. Monitoring and operators need a few.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Connections one address other than loopback may keep open on the admin listener, so that
/// one remote client cannot take every place (callers without a token are answered
/// `Connection: close`, so holding places takes requests sent slowly, each cut after 10 s).
pub const ADMIN_MAX_CONNECTIONS_PER_ADDRESS: usize = 32;

/// The admin listener's open connections by address (loopback's are not counted).
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// A connection's place in [`PerAddress`], given back when its task ends (however it ends).
struct Place {
    counts: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// A place for a connection from `ip`, unless it has [`ADMIN_MAX_CONNECTIONS_PER_ADDRESS`].
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Option<Place>> {
        // IPv4 as it comes on a dual-stack listener (`::ffff:127.0.0.1`) is IPv4; an IPv6
        // client is counted by its /64, which one host usually holds whole.
        let ip = match ip.to_canonical() {
            ip if ip.is_loopback() => return Some(None),
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            ip => ip,
        };
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= ADMIN_MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Some(Place {
            counts: self.clone(),
            ip,
        }))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serves the admin listener until `stop` gives a deadline; then lets the admin requests in
/// flight finish (until that deadline, at least a second) and closes kept-alive connections,
/// so that the gateway's last audit flush comes after every admin action's event. (Changes
/// are refused from the start of the shutdown, see `admin_api`; one still running at the
/// deadline is recorded as interrupted.)
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut conns = tokio::task::JoinSet::new();
    let per_address = Arc::new(PerAddress::default());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => (s, peer.ip()),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
            // Reaps the connections that ended.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = stream;
        while conns.try_join_next().is_some() {}
        // At most a warning a second, however many are refused.
        let refused = |why: &str| {
            static LAST_WARNING: std::sync::atomic::AtomicU64 =
                std::sync::atomic::AtomicU64::new(0);
            let now = crate::now_ms();
            let last = LAST_WARNING.load(std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(last) >= 1000 {
                LAST_WARNING.store(now, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%peer, "admin listener: {why}; closing a new connection at once");
            }
        };
        if conns.len() >= ADMIN_MAX_CONNECTIONS {
            refused(&format!("{ADMIN_MAX_CONNECTIONS} connections are open"));
            drop(stream);
            continue;
        }
        let Some(place) = per_address.take(peer) else {
            refused(&format!(
                "{ADMIN_MAX_CONNECTIONS_PER_ADDRESS} connections from this address are open"
            ));
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let mut conn_stop = stop.clone();
        conns.spawn(async move {
            let _place = place;
            let recorder = shared.clone();
            let svc = service_fn(move |req| handle(shared.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        record_unparsed(&recorder, peer, &e);
                    }
                    return;
                }
                () = stopped(&mut conn_stop) => {}
            }
            // Finishes the request in flight, then closes (at once when idle).
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let deadline = *stop.borrow();
    let bound = deadline
        .map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        })
        .max(Duration::from_secs(1));
    let drained =
        tokio::time::timeout(bound, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "admin connections still open after gateway.shutdown_timeout; closing them"
        );
        conns.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address other than loopback gets at most `ADMIN_MAX_CONNECTIONS_PER_ADDRESS`
    /// places, given back as its connections end; loopback and other addresses are not held
    /// up by it.
    #[test]
    fn one_remote_address_cannot_take_every_admin_connection() {
        let counts = Arc::new(PerAddress::default());
        let remote: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let places: Vec<_> = (0..ADMIN_MAX_CONNECTIONS_PER_ADDRESS)
            .map(|_| counts.take(remote).expect("a place").expect("counted"))
            .collect();
        assert!(counts.take(remote).is_none(), "one more is refused");
        let other: std::net::IpAddr = "192.0.2.8".parse().unwrap();
        assert!(counts.take(other).is_some_and(|p| p.is_some()));
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        assert!(
            counts.take(local).is_some_and(|p| p.is_none()),
            "loopback is not counted"
        );
        // Loopback through a dual-stack listener is loopback too.
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(counts.take(mapped).is_some_and(|p| p.is_none()));
        // IPv4 mapped to IPv6 counts as its IPv4 address.
        let remote_mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(counts.take(remote_mapped).is_none(), "the same address");
        // IPv6 by its /64: another address of the same /64 is the same client.
        let v6: Vec<_> = (0..ADMIN_MAX_CONNECTIONS_PER_ADDRESS)
            .map(|i| {
                let ip: std::net::IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
                counts.take(ip).expect("a place")
            })
            .collect();
        let same_64: std::net::IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(counts.take(same_64).is_none());
        let other_64: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(counts.take(other_64).is_some());
        drop(v6);
        drop(places);
        assert!(counts.take(remote).is_some(), "places come back");
        assert!(counts.0.lock().unwrap().get(&other).is_none());
    }
}
