//! Upstreams: their targets, round-robin selection with passive health checks, and the pooled
//! keep-alive HTTP client that reaches them.

use crate::body::RequestBody;
use crate::metrics::UpstreamMetrics;
use apiwarden_core::config::{Target, UpstreamConfig};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The HTTP client type used to reach upstreams.
pub type HttpClient = Client<HttpConnector, RequestBody>;

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
    /// `Host` header value and URI authority for requests to this target.
    pub host: http::HeaderValue,
    pub authority: http::uri::Authority,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the process epoch until which the target is skipped.
    down_until: AtomicU64,
}

/// A named upstream.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub name: Arc<str>,
    /// One client (and so one connection pool) per worker thread: a connection is only ever
    /// used by the thread whose runtime drives it.
    clients: Vec<HttpClient>,
    pub targets: Vec<TargetState>,
    next: AtomicUsize,
    pub metrics: Arc<UpstreamMetrics>,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, metrics: Arc<UpstreamMetrics>, workers: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let clients = (0..workers.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(1024)
                    .pool_timer(TokioTimer::new())
                    .set_host(false)
                    .build(connector.clone())
            })
            .collect();
        let targets = config
            .targets
            .iter()
            .map(|t| TargetState {
                host: http::HeaderValue::from_str(&t.authority).expect("validated authority"),
                authority: t.authority.parse().expect("validated authority"),
                target: t.clone(),
                label: Arc::from(t.to_string()),
                consecutive_failures: AtomicU32::new(0),
                down_until: AtomicU64::new(0),
            })
            .collect();
        Upstream {
            name: Arc::from(config.name.as_str()),
            config,
            clients,
            targets,
            next: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The client of the calling worker thread.
    pub fn client(&self) -> &HttpClient {
        &self.clients[crate::server::worker_index() % self.clients.len()]
    }

    /// Picks the next healthy target round-robin. When every target is cooling down, the one
    /// whose cool-down ends first is tried, so a recovered upstream is found again.
    pub fn pick(&self) -> &TargetState {
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let start = self.next.fetch_add(1, Relaxed);
        let now = now_ms();
        let n = self.targets.len();
        (0..n)
            .map(|i| &self.targets[(start + i) % n])
            .find(|t| t.down_until.load(Relaxed) <= now)
            .unwrap_or_else(|| {
                self.targets
                    .iter()
                    .min_by_key(|t| t.down_until.load(Relaxed))
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
        };
        Upstream::new(cfg, crate::metrics::Metrics::default().upstream("u"), 1)
    }

    #[tokio::test]
    async fn round_robin_skips_a_failing_target_for_the_cooldown() {
        let u = upstream(&["a:1", "b:1", "c:1"], 2);
        let picks: Vec<String> = (0..6).map(|_| u.pick().target.authority.clone()).collect();
        assert_eq!(picks, ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]);
        let b = &u.targets[1];
        u.failed(b);
        assert!(
            (0..3).any(|_| u.pick().target.authority == "b:1"),
            "one failure is below the threshold"
        );
        u.failed(b);
        let picks: Vec<String> = (0..6).map(|_| u.pick().target.authority.clone()).collect();
        assert!(!picks.iter().any(|p| p == "b:1"), "{picks:?}");
        // Everything down: the earliest to recover is still tried.
        for t in &u.targets {
            u.failed(t);
            u.failed(t);
        }
        let _ = u.pick();
    }
}
