//! Upstreams: their targets, round-robin selection with passive health checks, and the
//! keep-alive connection pools that reach them.
//!
//! Each worker thread has its own pool per target (a connection is only used by the thread
//! whose runtime drives it), so taking a connection is a pop from a vector that no other
//! thread touches. A connection returns to its pool when the response body has been read to
//! its end; a response abandoned half-way closes its connection. A pool keeps at most
//! `max_idle` connections (the least recently used goes first) and closes those unused for
//! `idle_timeout` (each worker's once-a-second check, [`Upstream::sweep`]).

use crate::body::RequestBody;
use crate::metrics::UpstreamMetrics;
use apiwarden_core::config::{Target, UpstreamConfig};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

type Sender = SendRequest<RequestBody>;

/// Why a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection failed while the request or response was under way.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The upstream stopped taking the request body, or gave no response head within
    /// `timeout` of the request's end.
    #[error("no answer in time")]
    Timeout,
}

/// A connection lent to one request; hand it back with [`Lease::release`] once the response
/// body has ended.
pub struct Lease {
    sender: Sender,
    upstream: Arc<Upstream>,
    target: usize,
    worker: usize,
    /// The request body, when there was one: a connection still uploading it is not idle.
    request_body: Option<Arc<crate::body::BodyStats>>,
}

impl Lease {
    /// Puts the connection back into its pool, unless the request body is still being sent
    /// (the upstream answered early): such a connection is closed instead.
    pub fn release(self) {
        if self.request_body.as_ref().is_some_and(|b| !b.done()) {
            return;
        }
        let slot = &self.upstream.targets[self.target].idle[self.worker];
        if let Ok(mut idle) = slot.lock() {
            // Read under the lock: `retire` sets the flag before it takes each lock to clear
            // the pool, so a connection is either cleared by it or never put back.
            if self.upstream.retired.load(Relaxed) {
                return;
            }
            if idle.len() >= self.upstream.config.max_idle {
                // The least recently used one is closed (dropping its sender ends it).
                if idle.pop_front().is_none() {
                    return;
                }
            }
            idle.push_back(Idle {
                sender: self.sender,
                checks: 0,
            });
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// One target and its passive health state.
pub struct TargetState {
    pub target: Target,
    /// Text of the target for audit events.
    pub label: Arc<str>,
    /// `Host` header value for requests to this target.
    pub host: http::HeaderValue,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the process epoch until which the target is skipped.
    down_until: AtomicU64,
    /// Idle keep-alive connections, one list per worker thread, the most recently used at
    /// the back. Each list is locked by its own worker, and by another thread only when a
    /// reload retires the upstream, so the lock is practically never contended.
    idle: Vec<Mutex<VecDeque<Idle>>>,
}

/// An idle connection in a pool.
struct Idle {
    sender: Sender,
    /// Once-a-second checks that found it idle: how long it has been unused, without a
    /// clock read when it comes back.
    checks: u32,
}

/// A named upstream.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub name: Arc<str>,
    workers: usize,
    pub targets: Vec<TargetState>,
    next: AtomicUsize,
    pub metrics: Arc<UpstreamMetrics>,
    /// Set when a reload dropped this upstream: its connections are no longer pooled.
    retired: std::sync::atomic::AtomicBool,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, metrics: Arc<UpstreamMetrics>, workers: usize) -> Self {
        let workers = workers.max(1);
        let targets = config
            .targets
            .iter()
            .map(|t| TargetState {
                host: http::HeaderValue::from_str(&t.authority).expect("validated authority"),
                target: t.clone(),
                label: Arc::from(t.to_string()),
                consecutive_failures: AtomicU32::new(0),
                down_until: AtomicU64::new(0),
                idle: (0..workers).map(|_| Mutex::new(VecDeque::new())).collect(),
            })
            .collect();
        Upstream {
            name: Arc::from(config.name.as_str()),
            config,
            workers,
            targets,
            next: AtomicUsize::new(0),
            metrics,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends `req` to target number `target` on a pooled connection of the calling worker,
    /// or a new one. A request that a pooled connection turns out to be unable to take (the
    /// upstream closed it while it was idle) is sent once more on a new connection.
    ///
    /// The upstream's `timeout` runs once a connection is in hand (getting one is bounded by
    /// `connect_timeout`): from the end of the request body, or, while the body is being
    /// sent, from the last part the upstream took (see [`BodyStats::wait_sent`]).
    ///
    /// [`BodyStats::wait_sent`]: crate::body::BodyStats::wait_sent
    ///
    /// `started` is when the caller began: the time a pooled connection is in hand (it takes
    /// no waiting), without a second read of the clock.
    pub async fn send(
        self: &Arc<Self>,
        target: usize,
        req: Request<RequestBody>,
        request_body: Option<Arc<crate::body::BodyStats>>,
        started: Instant,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let worker = crate::server::worker_index() % self.workers;
        let (mut sender, in_hand) = match self.pooled(target, worker).await {
            Some(s) => (s, started),
            // Boxed, as below: connecting is rare and its future large; unboxed it would
            // enlarge every request's future, which is moved on every request.
            None => (Box::pin(self.connect(target)).await?, Instant::now()),
        };
        let body = request_body.as_deref();
        // The select is written here rather than in a function of its own: the answer, a few
        // hundred bytes, is then moved once less on every request.
        let sent = tokio::select! {
            r = sender.try_send_request(req) => r,
            () = self.deadline(body, in_hand) => return Err(SendError::Timeout),
        };
        let resp = match sent {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = Box::pin(self.connect(target)).await?;
                    let deadline = self.deadline(body, Instant::now());
                    let retry = sender.send_request(req);
                    Box::pin(async {
                        tokio::select! {
                            r = retry => r.map_err(SendError::Http),
                            () = deadline => Err(SendError::Timeout),
                        }
                    })
                    .await?
                }
                None => return Err(SendError::Http(e.into_error())),
            },
        };
        Ok((
            resp,
            Lease {
                sender,
                upstream: self.clone(),
                target,
                worker,
                request_body,
            },
        ))
    }

    /// Resolves once the upstream's `timeout` has passed (see [`Upstream::send`]) on a
    /// connection in hand since `in_hand`.
    async fn deadline(&self, body: Option<&crate::body::BodyStats>, in_hand: Instant) {
        let timeout = self.config.timeout;
        // The worker's own deadline list rather than tokio's timer: no entry put into the
        // timer wheel and taken out again per request; the 504 comes at most
        // `wakeups::TICK` late.
        let from = match body {
            // Boxed: only requests with a body wait here, and the timer it holds would
            // enlarge every request's future.
            Some(b) => match Box::pin(b.wait_sent(timeout)).await {
                Some(from) => from,
                None => return,
            },
            None => in_hand,
        };
        crate::wakeups::deadline(from + timeout).await;
    }

    async fn pooled(&self, target: usize, worker: usize) -> Option<Sender> {
        loop {
            let mut sender = self.targets[target].idle[worker]
                .lock()
                .ok()?
                .pop_back()?
                .sender;
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, target: usize) -> Result<Sender, SendError> {
        let authority = &self.targets[target].target.authority;
        let stream = match tokio::time::timeout(
            self.config.connect_timeout,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "no connection within {:?}",
                    self.config.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        // The connection is driven on the calling worker's runtime, next to the requests
        // that use it.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The calling worker's share of the once-a-second idle check: closes its pooled
    /// connections that have been unused for `idle_timeout` (and forgets those the upstream
    /// closed). Returns how many it closed.
    pub fn sweep(&self) -> usize {
        let worker = crate::server::worker_index() % self.workers;
        // Whole checks, rounded up: a connection is never closed sooner than `idle_timeout`.
        let t = self.config.idle_timeout;
        let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
        let limit = u32::try_from(secs).unwrap_or(u32::MAX);
        let mut closed = 0;
        for t in &self.targets {
            let Ok(mut idle) = t.idle[worker].lock() else {
                continue;
            };
            idle.retain_mut(|c| {
                c.checks = c.checks.saturating_add(1);
                let keep = c.checks <= limit && !c.sender.is_closed();
                closed += usize::from(!keep);
                keep
            });
        }
        closed
    }

    /// A reload no longer uses this upstream: closes its pooled connections (each worker's
    /// connection task ends when its sender is dropped), and those in use when they come back.
    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
        for t in &self.targets {
            for idle in &t.idle {
                if let Ok(mut idle) = idle.lock() {
                    idle.clear();
                }
            }
        }
    }

    /// Picks the next healthy target round-robin. When every target is cooling down, the one
    /// whose cool-down ends first is tried, so a recovered upstream is found again.
    pub fn pick(&self) -> usize {
        if self.targets.len() == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Relaxed);
        let now = now_ms();
        let n = self.targets.len();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.targets[i].down_until.load(Relaxed) <= now)
            .unwrap_or_else(|| {
                (0..n)
                    .min_by_key(|&i| self.targets[i].down_until.load(Relaxed))
                    .expect("an upstream has at least one target")
            })
    }

    /// Records a connect error or timeout of `target`.
    pub fn failed(&self, target: &TargetState) {
        let n = target.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if n >= self.config.failure_threshold {
            target.consecutive_failures.store(0, Relaxed);
            target
                .down_until
                .store(now_ms() + self.config.cooldown.as_millis() as u64, Relaxed);
            tracing::warn!(upstream = %self.name, target = %target.label, cooldown_ms = self.config.cooldown.as_millis() as u64, "target failed repeatedly; skipping it for the cool-down");
        }
    }

    /// Records a success of `target`.
    pub fn succeeded(&self, target: &TargetState) {
        if target.consecutive_failures.load(Relaxed) != 0 {
            target.consecutive_failures.store(0, Relaxed);
        }
    }

    /// True when this upstream can keep serving under `new` (same targets and timeouts), so a
    /// reload keeps its pool and health state.
    pub fn same_as(&self, new: &UpstreamConfig) -> bool {
        self.config == *new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream(targets: &[&str], threshold: u32) -> Upstream {
        let cfg = UpstreamConfig {
            name: "u".into(),
            targets: targets
                .iter()
                .map(|a| Target {
                    authority: a.to_string(),
                    base_path: String::new(),
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: threshold,
            cooldown: Duration::from_secs(60),
            max_idle: 128,
            idle_timeout: Duration::from_secs(60),
        };
        Upstream::new(cfg, crate::metrics::Metrics::default().upstream("u"), 1)
    }

    #[tokio::test]
    async fn round_robin_skips_a_failing_target_for_the_cooldown() {
        let u = upstream(&["a:1", "b:1", "c:1"], 2);
        let picks: Vec<String> = (0..6)
            .map(|_| u.targets[u.pick()].target.authority.clone())
            .collect();
        assert_eq!(picks, ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]);
        let b = &u.targets[1];
        u.failed(b);
        assert!(
            (0..3).any(|_| u.targets[u.pick()].target.authority == "b:1"),
            "one failure is below the threshold"
        );
        u.failed(b);
        let picks: Vec<String> = (0..6)
            .map(|_| u.targets[u.pick()].target.authority.clone())
            .collect();
        assert!(!picks.iter().any(|p| p == "b:1"), "{picks:?}");
        // Everything down: the earliest to recover is still tried.
        for t in &u.targets {
            u.failed(t);
            u.failed(t);
        }
        let _ = u.pick();
    }
}
