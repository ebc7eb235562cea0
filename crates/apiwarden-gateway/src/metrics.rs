//! Prometheus metrics. Every metric name is defined here, and every label comes from a fixed
//! set (route and upstream names from the config, status codes, decision, error kind), so the
//! number of series is bounded. Counters are plain atomics: recording takes no lock.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const STATUS_MIN: u16 = 100;
const STATUS_SLOTS: usize = 500;
/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upstream error kinds, the label values of `apiwarden_upstream_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
    ];
    fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// One worker's share of a route's counters: `[status - 100][0 allow | 1 deny]`.
type StatusCounts = Box<[[AtomicU64; 2]]>;

fn status_counts() -> StatusCounts {
    (0..STATUS_SLOTS)
        .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
        .collect()
}

/// The shard of the calling worker thread.
fn shard_index(shards: usize) -> usize {
    crate::server::worker_index() % shards
}

/// A counter with a cache line per worker thread, for counts taken on every request: workers
/// on different cores never write the same line. Reads sum the shards. Its methods mirror
/// `AtomicU64`'s.
pub struct Counter {
    shards: Box<[PaddedU64]>,
}

#[repr(align(128))]
#[derive(Default)]
struct PaddedU64(AtomicU64);

impl Default for Counter {
    /// One shard per core (the default number of workers; other counts still work).
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
        Counter {
            shards: (0..n).map(|_| PaddedU64::default()).collect(),
        }
    }
}

impl Counter {
    pub fn fetch_add(&self, n: u64, order: std::sync::atomic::Ordering) {
        self.shards[shard_index(self.shards.len())]
            .0
            .fetch_add(n, order);
    }

    pub fn load(&self, order: std::sync::atomic::Ordering) -> u64 {
        self.shards.iter().map(|s| s.0.load(order)).sum()
    }
}

/// Request counters of one route, by status and decision, one shard per worker so that
/// workers on different cores never write the same cache line.
pub struct RouteMetrics {
    shards: Box<[StatusCounts]>,
}

impl RouteMetrics {
    fn new(shards: usize) -> Self {
        RouteMetrics {
            shards: (0..shards).map(|_| status_counts()).collect(),
        }
    }

    /// Counts one finished request.
    pub fn count(&self, status: u16, deny: bool) {
        let slot = usize::from(
            status.clamp(STATUS_MIN, STATUS_MIN + STATUS_SLOTS as u16 - 1) - STATUS_MIN,
        );
        self.shards[shard_index(self.shards.len())][slot][usize::from(deny)].fetch_add(1, Relaxed);
    }

    fn total(&self, slot: usize, deny: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s[slot][deny].load(Relaxed))
            .sum()
    }
}

/// Error counters of one upstream (errors are rare: not sharded).
pub struct UpstreamMetrics {
    errors: [AtomicU64; 3],
}

impl UpstreamMetrics {
    pub fn error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }
}

/// Decisions of one limit policy by outcome, one shard per worker.
pub struct PolicyMetrics {
    shards: Box<[PolicyShard]>,
}

#[repr(align(128))]
#[derive(Default)]
struct PolicyShard([AtomicU64; 4]);

impl PolicyMetrics {
    pub fn count(&self, outcome: crate::limit::PolicyOutcome) {
        self.shards[shard_index(self.shards.len())].0[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn total(&self, outcome: crate::limit::PolicyOutcome) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[outcome as usize].load(Relaxed))
            .sum()
    }
}

/// The per-request gauges and histogram of one worker, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    in_flight: AtomicI64,
    audit_events: AtomicU64,
}

/// All of the gateway's metrics.
pub struct Metrics {
    routes: Registry<RouteMetrics>,
    upstreams: Registry<UpstreamMetrics>,
    policies: Registry<PolicyMetrics>,
    issuers: Registry<crate::jwt::JwtMetrics>,
    introspectors: Registry<crate::introspect::IntrospectionMetrics>,
    /// Redis round trips of the limit stage.
    pub redis: Arc<crate::limit::RedisMetrics>,
    /// Requests that matched no route (label `route=""`).
    pub unrouted: Arc<RouteMetrics>,
    shards: Box<[Shard]>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Client connections open now (handed to a worker and not yet closed).
    pub connections_open: Arc<std::sync::atomic::AtomicUsize>,
    /// Client connections closed at accept because `gateway.max_connections` were open.
    pub connections_refused: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(1)
    }
}

impl Metrics {
    /// Metrics for a gateway with `workers` worker threads.
    pub fn new(workers: usize) -> Self {
        let workers = workers.max(1);
        Metrics {
            routes: Mutex::default(),
            upstreams: Mutex::default(),
            policies: Mutex::default(),
            issuers: Mutex::default(),
            introspectors: Mutex::default(),
            redis: Arc::default(),
            unrouted: Arc::new(RouteMetrics::new(workers)),
            shards: (0..workers).map(|_| Shard::default()).collect(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            connections_open: Arc::default(),
            connections_refused: Arc::default(),
        }
    }

    fn shard(&self) -> &Shard {
        &self.shards[shard_index(self.shards.len())]
    }

    /// The counters of a route, kept across reloads by name. Called when a config is compiled.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        entry(&self.routes, name, || RouteMetrics::new(self.shards.len()))
    }

    /// The counters of an upstream, kept across reloads by name.
    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        entry(&self.upstreams, name, || UpstreamMetrics {
            errors: Default::default(),
        })
    }

    /// The counters of a limit policy, kept across reloads by name.
    pub fn policy(&self, name: &str) -> Arc<PolicyMetrics> {
        entry(&self.policies, name, || PolicyMetrics {
            shards: (0..self.shards.len())
                .map(|_| PolicyShard::default())
                .collect(),
        })
    }

    /// The counters of a token issuer, kept across reloads by name.
    pub fn jwt(&self, name: &str) -> Arc<crate::jwt::JwtMetrics> {
        entry(&self.issuers, name, Default::default)
    }

    /// The counters of a token introspection endpoint, kept across reloads by name.
    pub fn introspection(&self, name: &str) -> Arc<crate::introspect::IntrospectionMetrics> {
        entry(&self.introspectors, name, Default::default)
    }

    pub fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let shard = self.shard();
        shard.latency[idx].fetch_add(1, Relaxed);
        shard
            .latency_sum_us
            .fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn request_started(&self) {
        self.shard().in_flight.fetch_add(1, Relaxed);
    }

    pub fn request_finished(&self) {
        self.shard().in_flight.fetch_sub(1, Relaxed);
    }

    /// Counts an event handed to the audit sink.
    pub fn audit_event(&self) {
        self.shard().audit_events.fetch_add(1, Relaxed);
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    /// The Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP apiwarden_requests_total Requests by route, status and decision.\n# TYPE apiwarden_requests_total counter\n");
        let mut routes = sorted(&self.routes);
        routes.insert(0, (String::new(), self.unrouted.clone()));
        for (name, m) in &routes {
            for slot in 0..STATUS_SLOTS {
                for (d, decision) in ["allow", "deny"].iter().enumerate() {
                    let n = m.total(slot, d);
                    if n > 0 {
                        let status = slot as u16 + STATUS_MIN;
                        let _ = writeln!(out, "apiwarden_requests_total{{route=\"{}\",status=\"{status}\",decision=\"{decision}\"}} {n}", escape(name));
                    }
                }
            }
        }
        out.push_str("# HELP apiwarden_request_duration_seconds Time from request head to the end of the response.\n# TYPE apiwarden_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.sum(|s| s.latency[i].load(Relaxed));
            let _ = writeln!(
                out,
                "apiwarden_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += self.sum(|s| s.latency[LATENCY_BUCKETS.len()].load(Relaxed));
        let _ = writeln!(
            out,
            "apiwarden_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "apiwarden_request_duration_seconds_sum {}",
            self.sum(|s| s.latency_sum_us.load(Relaxed)) as f64 / 1e6
        );
        let _ = writeln!(out, "apiwarden_request_duration_seconds_count {cumulative}");
        out.push_str("# HELP apiwarden_requests_in_flight Requests being handled now.\n# TYPE apiwarden_requests_in_flight gauge\n");
        let in_flight: i64 = self.shards.iter().map(|s| s.in_flight.load(Relaxed)).sum();
        let _ = writeln!(out, "apiwarden_requests_in_flight {in_flight}");
        out.push_str("# HELP apiwarden_upstream_errors_total Failed upstream requests by upstream and kind.\n# TYPE apiwarden_upstream_errors_total counter\n");
        let ups = sorted(&self.upstreams);
        for (name, m) in &ups {
            for kind in UpstreamErrorKind::ALL {
                let _ = writeln!(
                    out,
                    "apiwarden_upstream_errors_total{{upstream=\"{}\",kind=\"{}\"}} {}",
                    escape(name),
                    kind.as_str(),
                    m.errors[kind as usize].load(Relaxed)
                );
            }
        }
        out.push_str("# HELP apiwarden_audit_events_total Audit events handed to the audit sink.\n# TYPE apiwarden_audit_events_total counter\n");
        let _ = writeln!(
            out,
            "apiwarden_audit_events_total {}",
            self.sum(|s| s.audit_events.load(Relaxed))
        );
        out.push_str("# HELP apiwarden_limit_decisions_total Limit decisions by policy and outcome (unavailable_*: Redis could not answer and the failure mode decided).\n# TYPE apiwarden_limit_decisions_total counter\n");
        for (name, m) in &sorted(&self.policies) {
            for o in crate::limit::PolicyOutcome::ALL {
                let _ = writeln!(
                    out,
                    "apiwarden_limit_decisions_total{{policy=\"{}\",outcome=\"{}\"}} {}",
                    escape(name),
                    o.as_str(),
                    m.total(o)
                );
            }
        }
        let issuers = sorted(&self.issuers);
        out.push_str("# HELP apiwarden_jwt_tokens_total Bearer tokens checked, by issuer and result (verified: signature checked; cached: accepted from the verified-token cache).\n# TYPE apiwarden_jwt_tokens_total counter\n");
        for (name, m) in &issuers {
            for (result, n) in [
                ("verified", &m.verified),
                ("cached", &m.cached),
                ("refused", &m.refused),
            ] {
                let _ = writeln!(
                    out,
                    "apiwarden_jwt_tokens_total{{issuer=\"{}\",result=\"{result}\"}} {}",
                    escape(name),
                    n.load(Relaxed)
                );
            }
        }
        out.push_str("# HELP apiwarden_jwt_key_fetches_total Fetches of an issuer's keys (discovery and JWKS), by outcome.\n# TYPE apiwarden_jwt_key_fetches_total counter\n");
        for (name, m) in &issuers {
            for (outcome, n) in [("ok", &m.fetch_ok), ("failed", &m.fetch_failed)] {
                let _ = writeln!(
                    out,
                    "apiwarden_jwt_key_fetches_total{{issuer=\"{}\",outcome=\"{outcome}\"}} {}",
                    escape(name),
                    n.load(Relaxed)
                );
            }
        }
        let introspectors = sorted(&self.introspectors);
        out.push_str("# HELP apiwarden_introspection_tokens_total Opaque bearer tokens checked by token introspection, by endpoint and result (introspected: the endpoint was asked; cached: accepted from the cache; refused: any refusal, cached or not).\n# TYPE apiwarden_introspection_tokens_total counter\n");
        for (name, m) in &introspectors {
            for (result, n) in [
                ("introspected", &m.introspected),
                ("cached", &m.cached),
                ("refused", &m.refused),
            ] {
                let _ = writeln!(
                    out,
                    "apiwarden_introspection_tokens_total{{name=\"{}\",result=\"{result}\"}} {}",
                    escape(name),
                    n.load(Relaxed)
                );
            }
        }
        out.push_str("# HELP apiwarden_introspection_errors_total Introspection calls without a usable answer (unreachable, timeout, status other than 200, not an introspection response).\n# TYPE apiwarden_introspection_errors_total counter\n");
        for (name, m) in &introspectors {
            let _ = writeln!(
                out,
                "apiwarden_introspection_errors_total{{name=\"{}\"}} {}",
                escape(name),
                m.errors.load(Relaxed)
            );
        }
        let r = &self.redis;
        out.push_str("# HELP apiwarden_redis_duration_seconds Redis round trips of the limit stage.\n# TYPE apiwarden_redis_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in crate::limit::REDIS_BUCKETS_US.iter().enumerate() {
            cumulative += r.latency[i].load(Relaxed);
            let _ = writeln!(
                out,
                "apiwarden_redis_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        cumulative += r.latency[crate::limit::REDIS_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "apiwarden_redis_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "apiwarden_redis_duration_seconds_sum {}",
            r.latency_us_sum.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "apiwarden_redis_duration_seconds_count {cumulative}");
        out.push_str("# HELP apiwarden_redis_errors_total Failed Redis round trips by kind.\n# TYPE apiwarden_redis_errors_total counter\n");
        for (kind, n) in [
            ("connect", &r.errors_connect),
            ("timeout", &r.errors_timeout),
            ("reply", &r.errors_reply),
            ("unavailable", &r.errors_unavailable),
        ] {
            let _ = writeln!(
                out,
                "apiwarden_redis_errors_total{{kind=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        out.push_str("# HELP apiwarden_config_reloads_total Configuration reloads by result.\n# TYPE apiwarden_config_reloads_total counter\n");
        let _ = writeln!(
            out,
            "apiwarden_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "apiwarden_config_reloads_total{{result=\"invalid\"}} {}",
            self.reloads_failed.load(Relaxed)
        );
        let _ = write!(
            out,
            "# HELP apiwarden_connections_open Client connections open now.\n# TYPE apiwarden_connections_open gauge\napiwarden_connections_open {}\n\
             # HELP apiwarden_connections_refused_total Client connections closed at accept because gateway.max_connections were open.\n# TYPE apiwarden_connections_refused_total counter\napiwarden_connections_refused_total {}\n",
            self.connections_open.load(Relaxed),
            self.connections_refused.load(Relaxed)
        );
        out
    }
}

type Registry<T> = Mutex<HashMap<String, Arc<T>>>;

/// The entry of `name`, made on first use. Only config compilation calls this.
fn entry<T>(map: &Registry<T>, name: &str, make: impl FnOnce() -> T) -> Arc<T> {
    let mut map = map.lock().expect("metrics poisoned");
    map.entry(name.to_string())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

/// A snapshot of a registry, sorted by name, for rendering.
fn sorted<T>(map: &Registry<T>) -> Vec<(String, Arc<T>)> {
    let mut all: Vec<(String, Arc<T>)> = map
        .lock()
        .expect("metrics poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauge() {
        let m = Metrics::default();
        m.route("orders").count(200, false);
        m.route("orders").count(200, false);
        m.unrouted.count(404, true);
        m.observe_latency(Duration::from_millis(3));
        m.upstream("u").error(UpstreamErrorKind::Timeout);
        m.request_started();
        let text = m.render();
        assert!(
            text.contains(
                "apiwarden_requests_total{route=\"orders\",status=\"200\",decision=\"allow\"} 2\n"
            ),
            "{text}"
        );
        assert!(text
            .contains("apiwarden_requests_total{route=\"\",status=\"404\",decision=\"deny\"} 1\n"));
        assert!(text.contains("apiwarden_request_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("apiwarden_request_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("apiwarden_request_duration_seconds_count 1\n"));
        assert!(text.contains("apiwarden_requests_in_flight 1\n"));
        assert!(
            text.contains("apiwarden_upstream_errors_total{upstream=\"u\",kind=\"timeout\"} 1\n")
        );
    }
}
