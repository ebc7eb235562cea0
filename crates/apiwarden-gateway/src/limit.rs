//! The limit stage's machinery: compiled policies, the local store and the Redis store.
//!
//! A route's policies are decided together, and a request is admitted only when every one of
//! them admits it; a refused request uses no budget of any of them (local decisions are undone,
//! and the Redis script writes nothing unless all of its keys admit). Local policies are
//! decided first, so a request refused locally costs no Redis round trip; Redis policies are
//! decided in one script call, whatever their number.

use crate::metrics::{Metrics, PolicyMetrics};
use crate::server::worker_index;
use apiwarden_core::config::{Config, FailureMode, LimitConfig, LimitKey, LimitStore};
use apiwarden_core::limit::{ceil_secs, Decision, Gcra};
use http::{HeaderMap, HeaderValue};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NANOS: u64 = 1_000_000_000;
const MICROS: u64 = 1_000_000;
/// An IPv6 client is counted by its /64: one subscriber usually holds a whole /64, and counting
/// single addresses would give it 2^64 budgets.
const V6_CLIENT_MASK: u128 = !0u128 << 64;
/// The most limits one route may stack (checked by the config).
pub const MAX_PER_ROUTE: usize = 8;

/// One `[limits.NAME]` policy, ready to decide.
pub struct Policy {
    pub name: Arc<str>,
    /// Distinguishes this policy's keys from every other's in the local store.
    seed: u64,
    /// The arithmetic in nanoseconds (local store) and microseconds (Redis).
    local: Gcra,
    remote: Gcra,
    key: Vec<LimitKey>,
    pub store: LimitStore,
    pub failure_mode: FailureMode,
    /// `"NAME";q=N;w=SECONDS`, this policy's item of the `RateLimit-Policy` header.
    header_item: String,
    /// `"NAME"`, as the `RateLimit` header names it.
    pub quoted_name: String,
}

impl Policy {
    fn new(name: &str, c: &LimitConfig) -> Policy {
        let mut h = std::hash::DefaultHasher::new();
        name.hash(&mut h);
        Policy {
            name: Arc::from(name),
            seed: h.finish(),
            local: Gcra::new(c, NANOS),
            remote: Gcra::new(c, MICROS),
            key: c.key.clone(),
            store: c.store,
            failure_mode: c.failure_mode,
            header_item: format!(
                "{};q={};w={}",
                sf_string(name),
                c.requests,
                c.per.as_secs().max(1)
            ),
            quoted_name: sf_string(name),
        }
    }
}

/// A structured-field string (RFC 8941 section 3.3.3): policy names are printable ASCII in
/// practice; anything else is replaced so the header stays valid.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// The policies of one route.
pub struct RouteLimits {
    pub policies: Vec<(Arc<Policy>, Arc<PolicyMetrics>)>,
    /// `RateLimit-Policy`, the same on every response of the route.
    pub policy_header: Option<HeaderValue>,
}

impl RouteLimits {
    pub fn compile(config: &Config, names: &[String], metrics: &Metrics) -> RouteLimits {
        let policies: Vec<_> = names
            .iter()
            .filter_map(|n| config.limits.get(n).map(|c| (n, c)))
            .map(|(n, c)| (Arc::new(Policy::new(n, c)), metrics.policy(n)))
            .collect();
        let policy_header = (!policies.is_empty()).then(|| {
            let items: Vec<&str> = policies
                .iter()
                .map(|(p, _)| p.header_item.as_str())
                .collect();
            HeaderValue::from_str(&items.join(", ")).expect("policy items are printable ASCII")
        });
        RouteLimits {
            policies,
            policy_header,
        }
    }
}

/// What the request is counted by.
pub struct Subject<'a> {
    pub route: &'a str,
    pub ip: IpAddr,
    /// From the identify stage (`None` on open routes).
    pub consumer: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// One part of a limit's key, resolved for a request.
enum Part<'a> {
    Ip(IpAddr),
    Consumer(&'a str),
    Key(&'a str),
    Route(&'a str),
    Header(&'a [u8]),
}

impl<'a> Subject<'a> {
    /// A key part; `consumer`, `key` and a missing header fall back to the client IP (as Kong
    /// does), tagged differently, so a consumer named like an address never shares a budget.
    fn part(&self, k: &'a LimitKey) -> Part<'a> {
        match k {
            LimitKey::Ip => Part::Ip(self.ip),
            LimitKey::Route => Part::Route(self.route),
            LimitKey::Consumer => self.consumer.map_or(Part::Ip(self.ip), Part::Consumer),
            LimitKey::Key => self.key_id.map_or(Part::Ip(self.ip), Part::Key),
            LimitKey::Header(name) => self
                .headers
                .get(name.as_str())
                .map_or(Part::Ip(self.ip), |v| Part::Header(v.as_bytes())),
        }
    }

    fn local_key(&self, p: &Policy, hasher: &std::hash::RandomState) -> u64 {
        let mut h = hasher.build_hasher();
        h.write_u64(p.seed);
        for k in &p.key {
            match self.part(k) {
                Part::Ip(IpAddr::V4(a)) => {
                    h.write_u8(0);
                    h.write_u32(u32::from(a));
                }
                Part::Ip(IpAddr::V6(a)) => {
                    h.write_u8(5);
                    h.write_u128(u128::from(a) & V6_CLIENT_MASK);
                }
                Part::Consumer(s) => {
                    h.write_u8(1);
                    s.hash(&mut h);
                }
                Part::Key(s) => {
                    h.write_u8(2);
                    s.hash(&mut h);
                }
                Part::Route(s) => {
                    h.write_u8(3);
                    s.hash(&mut h);
                }
                Part::Header(b) => {
                    h.write_u8(4);
                    b.hash(&mut h);
                }
            }
        }
        h.finish()
    }

    /// `PREFIX:rl:POLICY:PART...`, each part as `tag:length:value` so no value can forge a
    /// boundary.
    fn redis_key(&self, prefix: &str, p: &Policy) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(b":rl:");
        out.extend_from_slice(p.name.as_bytes());
        for k in &p.key {
            let (tag, value): (&str, std::borrow::Cow<'_, [u8]>) = match self.part(k) {
                Part::Ip(IpAddr::V4(a)) => ("ip", a.to_string().into_bytes().into()),
                Part::Ip(IpAddr::V6(a)) => (
                    "ip6",
                    std::net::Ipv6Addr::from(u128::from(a) & V6_CLIENT_MASK)
                        .to_string()
                        .into_bytes()
                        .into(),
                ),
                Part::Consumer(s) => ("consumer", s.as_bytes().into()),
                Part::Key(s) => ("key", s.as_bytes().into()),
                Part::Route(s) => ("route", s.as_bytes().into()),
                // A long value becomes a digest, so a client cannot make Redis keys as long as
                // its headers. (SipHash with fixed keys: the same on every node.)
                Part::Header(b) if b.len() > 64 => {
                    let mut h = std::hash::DefaultHasher::new();
                    b.hash(&mut h);
                    let lo = h.finish();
                    0xA5u8.hash(&mut h);
                    (
                        "header-digest",
                        format!("{lo:016x}{:016x}", h.finish()).into_bytes().into(),
                    )
                }
                Part::Header(b) => ("header", b.into()),
            };
            out.push(b':');
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(format!(":{}:", value.len()).as_bytes());
            out.extend_from_slice(&value);
        }
        out
    }
}

/// What the limit stage decided.
pub enum Verdict {
    /// Admitted by every policy. `tightest` is the policy with the least budget left, for the
    /// `RateLimit` header: (index in the route's policies, remaining, seconds until full).
    Allow { tightest: Option<(usize, u64, u64)> },
    /// Refused by `policy`; retry after `retry_after` seconds.
    Deny {
        policy: Arc<Policy>,
        retry_after: u64,
        reset: u64,
    },
    /// Redis could not answer for these policies; `closed` when one of them fails closed.
    Unavailable { policies: String, closed: bool },
}

/// Decides a request against a route's policies.
pub async fn decide(
    limits: &RouteLimits,
    local: &LocalStore,
    redis: Option<&RedisStore>,
    subject: &Subject<'_>,
    at: Instant,
) -> Verdict {
    let mut tightest: Option<(usize, u64, u64)> = None;
    let mut keep = |i: usize, remaining: u64, reset: u64| {
        if tightest.is_none_or(|(_, r, _)| remaining < r) {
            tightest = Some((i, remaining, reset));
        }
    };
    // Local policies first: a request refused here costs no Redis round trip.
    let mut done: [(u64, Option<u64>, u64, u64); MAX_PER_ROUTE] = [(0, None, 0, 0); MAX_PER_ROUTE];
    let mut n_done = 0;
    let mut remote = false;
    let now = local.time(at);
    for (i, (p, m)) in limits.policies.iter().enumerate() {
        if p.store == LimitStore::Redis && redis.is_some() {
            remote = true;
            continue;
        }
        let key = subject.local_key(p, &local.hasher);
        let (d, prev) = local.decide(key, &p.local, now);
        if !d.allowed {
            for &(key, prev, tat, interval) in &done[..n_done] {
                local.undo(key, prev, tat, interval);
            }
            m.count(PolicyOutcome::Deny);
            return Verdict::Deny {
                policy: p.clone(),
                retry_after: ceil_secs(d.retry_after, NANOS),
                reset: ceil_secs(d.reset, NANOS),
            };
        }
        if n_done < MAX_PER_ROUTE {
            done[n_done] = (key, prev, d.tat, p.local.interval);
            n_done += 1;
        }
        keep(i, d.remaining, ceil_secs(d.reset, NANOS));
    }
    let undo_local = || {
        for &(key, prev, tat, interval) in &done[..n_done] {
            local.undo(key, prev, tat, interval);
        }
    };
    if let (true, Some(redis)) = (remote, redis) {
        let mine: Vec<usize> = (0..limits.policies.len())
            .filter(|&i| limits.policies[i].0.store == LimitStore::Redis)
            .collect();
        // Boxed: a Redis exchange is a large future, which would otherwise enlarge (and slow
        // down) every request's future, limited or not.
        match Box::pin(redis.decide(&limits.policies, &mine, subject)).await {
            Ok(decisions) => {
                for (&i, d) in mine.iter().zip(&decisions) {
                    if !d.allowed {
                        undo_local();
                        let (p, m) = &limits.policies[i];
                        m.count(PolicyOutcome::Deny);
                        return Verdict::Deny {
                            policy: p.clone(),
                            retry_after: ceil_secs(d.retry_after, MICROS),
                            reset: ceil_secs(d.reset, MICROS),
                        };
                    }
                }
                for (&i, d) in mine.iter().zip(&decisions) {
                    keep(i, d.remaining, ceil_secs(d.reset, MICROS));
                }
            }
            Err(()) => {
                let closed = mine
                    .iter()
                    .any(|&i| limits.policies[i].0.failure_mode == FailureMode::Closed);
                let names: Vec<&str> = mine.iter().map(|&i| &*limits.policies[i].0.name).collect();
                for &i in &mine {
                    limits.policies[i].1.count(if closed {
                        PolicyOutcome::UnavailableClosed
                    } else {
                        PolicyOutcome::UnavailableOpen
                    });
                }
                if closed {
                    undo_local();
                } else {
                    for (p, m) in &limits.policies {
                        if p.store != LimitStore::Redis {
                            let _ = p;
                            m.count(PolicyOutcome::Allow);
                        }
                    }
                }
                return Verdict::Unavailable {
                    policies: names.join(","),
                    closed,
                };
            }
        }
    }
    for (_, m) in &limits.policies {
        m.count(PolicyOutcome::Allow);
    }
    Verdict::Allow { tightest }
}

/// The label values of `apiwarden_limit_decisions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOutcome {
    Allow,
    Deny,
    UnavailableOpen,
    UnavailableClosed,
}

impl PolicyOutcome {
    pub const ALL: [PolicyOutcome; 4] = [
        PolicyOutcome::Allow,
        PolicyOutcome::Deny,
        PolicyOutcome::UnavailableOpen,
        PolicyOutcome::UnavailableClosed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyOutcome::Allow => "allow",
            PolicyOutcome::Deny => "deny",
            PolicyOutcome::UnavailableOpen => "unavailable_open",
            PolicyOutcome::UnavailableClosed => "unavailable_closed",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The local store.

const SHARDS: usize = 64;
/// Entries looked at when one must be evicted: a first sample, and a longer one when the first
/// found no idle entry (so an idle entry is missed only when idle entries are rare).
const EVICTION_SAMPLE: usize = 8;
const EVICTION_SAMPLE_MORE: usize = 32;

/// The keys of the local store are already hashes: the map uses them as they are.
#[derive(Default)]
struct Identity64(u64);

impl Hasher for Identity64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Shard {
    /// Key hash → (TAT, index in `keys`). A decision touches only this map.
    index: HashMap<u64, (u64, u32), BuildHasherDefault<Identity64>>,
    /// Every key, dense, so that eviction can sample at random in O(1).
    keys: Vec<u64>,
    rng: u64,
}

/// Limits of this process: a sharded map from key to TAT, bounded in size.
///
/// Keys are 64-bit SipHash values under a per-process random key, so a client cannot aim two
/// keys at one slot; two keys sharing a budget by chance needs ~4 billion tracked keys. When a
/// shard is full, a sample of its entries is looked at and the one with the earliest TAT is
/// dropped: an idle key (TAT in the past) has its whole budget, so dropping it changes nothing;
/// an active one gets its budget back early, the price of bounded memory, counted in
/// `apiwarden_limit_evictions_total{kind="active"}`.
pub struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: std::hash::RandomState,
    epoch: Instant,
    pub tracked: AtomicU64,
    pub evicted_idle: AtomicU64,
    pub evicted_active: AtomicU64,
}

impl LocalStore {
    /// A store that tracks at most `max_keys` keys (rounded up to a multiple of the shards).
    pub fn new(max_keys: u64) -> LocalStore {
        let per_shard = (max_keys as usize).div_ceil(SHARDS).max(1);
        LocalStore {
            shards: (0..SHARDS)
                .map(|i| {
                    Mutex::new(Shard {
                        index: HashMap::default(),
                        keys: Vec::new(),
                        rng: 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                    })
                })
                .collect(),
            per_shard,
            hasher: std::hash::RandomState::new(),
            epoch: Instant::now(),
            tracked: AtomicU64::new(0),
            evicted_idle: AtomicU64::new(0),
            evicted_active: AtomicU64::new(0),
        }
    }

    /// The most keys this store holds.
    pub fn capacity(&self) -> u64 {
        (self.per_shard * SHARDS) as u64
    }

    /// Nanoseconds on this store's monotonic clock (never 0) at `at`: the request's arrival,
    /// read once for the whole request.
    pub fn time(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// Nanoseconds on this store's clock now.
    pub fn now(&self) -> u64 {
        self.time(Instant::now())
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        // Middle bits: hashbrown uses the top bits for its control tags.
        &self.shards[(key >> 32) as usize % SHARDS]
    }

    /// Decides and, when admitted, stores the new TAT. Returns the decision and the TAT that
    /// was there before (for [`LocalStore::undo`]).
    pub fn decide(&self, key: u64, g: &Gcra, now: u64) -> (Decision, Option<u64>) {
        let mut s = self.shard(key).lock().expect("limit shard poisoned");
        if let Some((tat, _)) = s.index.get_mut(&key) {
            let prev = *tat;
            let d = g.decide(Some(prev), now);
            if d.allowed {
                *tat = d.tat;
            }
            return (d, Some(prev));
        }
        let d = g.decide(None, now);
        if d.allowed {
            if s.keys.capacity() == 0 {
                // Sized once, on first use: twice the entries, so that deletions are cleaned up
                // in place and the table never grows.
                s.index.reserve(2 * self.per_shard);
                s.keys.reserve_exact(self.per_shard);
            }
            if s.keys.len() >= self.per_shard {
                self.evict_one(&mut s, now);
            } else {
                self.tracked.fetch_add(1, Relaxed);
            }
            let i = s.keys.len() as u32;
            s.keys.push(key);
            s.index.insert(key, (d.tat, i));
        }
        (d, None)
    }

    /// Takes back an admission whose request another policy refused: the TAT goes back by one
    /// interval (to where it was, when no other request moved it since), never below `prev`'s
    /// point of view of a full budget.
    pub fn undo(&self, key: u64, prev: Option<u64>, tat: u64, interval: u64) {
        let mut s = self.shard(key).lock().expect("limit shard poisoned");
        if let Some((slot, _)) = s.index.get_mut(&key) {
            if *slot == tat {
                *slot = prev.unwrap_or(0);
            } else if *slot >= interval {
                *slot -= interval;
            }
        }
    }

    fn evict_one(&self, s: &mut Shard, now: u64) {
        let len = s.keys.len();
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for n in 0..EVICTION_SAMPLE_MORE {
            if n == EVICTION_SAMPLE && oldest <= now {
                break;
            }
            s.rng ^= s.rng << 13;
            s.rng ^= s.rng >> 7;
            s.rng ^= s.rng << 17;
            let i = (s.rng % len as u64) as usize;
            let tat = s.index.get(&s.keys[i]).map_or(0, |e| e.0);
            if tat < oldest {
                oldest = tat;
                victim = i;
            }
        }
        if oldest <= now {
            self.evicted_idle.fetch_add(1, Relaxed);
        } else {
            self.evicted_active.fetch_add(1, Relaxed);
        }
        let key = s.keys.swap_remove(victim);
        s.index.remove(&key);
        if victim < s.keys.len() {
            let moved = s.keys[victim];
            if let Some(e) = s.index.get_mut(&moved) {
                e.1 = victim as u32;
            }
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("limit shard poisoned").keys.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// The Redis store.

/// GCRA over several keys at once, atomically, on Redis's clock (so nodes with skewed clocks
/// still share one budget). Mirrors `apiwarden_core::limit::Gcra::decide`, in microseconds.
/// ARGV holds (interval, tolerance) per key. Writes nothing unless every key admits.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out, tats, denied = {}, {}, false
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  if tat - now > tolerance then
    denied = true
    out[i] = {0, 0, tat - now - tolerance, tat - now}
  else
    local new = tat + interval
    local ahead = new - now
    local remaining = 0
    if ahead <= tolerance + interval then
      remaining = math.floor((tolerance + interval - ahead) / interval)
    end
    tats[i] = new
    out[i] = {1, remaining, 0, ahead}
  end
end
if not denied then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1)
  end
end
return out
"#;

/// Redis for limits shared by every node: one multiplexed connection per worker thread,
/// opened on first use and again after a failure (at most every 200 ms while Redis is down).
pub struct RedisStore {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    client: redis::Client,
    script: redis::Script,
    slots: Box<[tokio::sync::Mutex<Slot>]>,
    pub metrics: Arc<RedisMetrics>,
}

#[derive(Default)]
struct Slot {
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Counts connections, so that a failure on an old one never drops a newer one.
    generation: u64,
    retry_at: Option<Instant>,
}

/// Redis round trips: latency and errors.
#[derive(Default)]
pub struct RedisMetrics {
    pub calls: AtomicU64,
    pub latency_us_sum: AtomicU64,
    /// Latency buckets (upper bounds in [`REDIS_BUCKETS_US`], then +Inf).
    pub latency: [AtomicU64; REDIS_BUCKETS_US.len() + 1],
    pub errors_connect: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_reply: AtomicU64,
    /// Decisions not even tried: Redis was down a moment ago (reconnects wait 200 ms).
    pub errors_unavailable: AtomicU64,
}

pub const REDIS_BUCKETS_US: [u64; 8] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];

const RECONNECT_FLOOR: Duration = Duration::from_millis(200);

impl RedisStore {
    pub fn new(config: &Config, workers: usize, metrics: Arc<RedisMetrics>) -> Option<RedisStore> {
        let url = config.storage.redis.clone()?;
        let client = match redis::Client::open(url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "storage.redis is not a usable Redis URL; Redis limits will follow their failure_mode");
                redis::Client::open("redis://127.0.0.1:1/").ok()?
            }
        };
        Some(RedisStore {
            url,
            prefix: config.storage.redis_prefix.clone(),
            timeout: config.storage.redis_timeout,
            client,
            script: redis::Script::new(SCRIPT),
            slots: (0..workers.max(1)).map(|_| Default::default()).collect(),
            metrics,
        })
    }

    /// Whether this store can serve `config` as it is (reloads keep connections).
    pub fn same_as(&self, config: &Config) -> bool {
        config.storage.redis.as_deref() == Some(self.url.as_str())
            && config.storage.redis_prefix == self.prefix
            && config.storage.redis_timeout == self.timeout
    }

    async fn connection(&self) -> Result<(redis::aio::MultiplexedConnection, u64), ()> {
        let slot = &self.slots[worker_index() % self.slots.len()];
        let mut s = slot.lock().await;
        if let Some(c) = &s.conn {
            return Ok((c.clone(), s.generation));
        }
        if s.retry_at.is_some_and(|t| Instant::now() < t) {
            self.metrics.errors_unavailable.fetch_add(1, Relaxed);
            return Err(());
        }
        // Whoever finds no connection opens one; the others wait for it (all of it within the
        // caller's overall timeout).
        s.retry_at = Some(Instant::now() + RECONNECT_FLOOR);
        match self.client.get_multiplexed_async_connection().await {
            Ok(c) => {
                s.conn = Some(c.clone());
                s.generation += 1;
                s.retry_at = None;
                Ok((c, s.generation))
            }
            Err(e) => {
                self.metrics.errors_connect.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "cannot connect to Redis");
                Err(())
            }
        }
    }

    fn drop_connection(&self, generation: u64) {
        let slot = &self.slots[worker_index() % self.slots.len()];
        // Never waits: if the slot is busy, someone is connecting anew anyway.
        if let Ok(mut s) = slot.try_lock() {
            if s.generation == generation {
                s.conn = None;
            }
        }
    }

    /// Decides the policies `which` of `all` in one round trip, within `storage.redis_timeout`
    /// in all (waiting for a connection included).
    async fn decide(
        &self,
        all: &[(Arc<Policy>, Arc<PolicyMetrics>)],
        which: &[usize],
        subject: &Subject<'_>,
    ) -> Result<Vec<Decision>, ()> {
        let started = Instant::now();
        let mut generation = None;
        let call = async {
            let (mut conn, g) = self.connection().await.map_err(|_| None)?;
            generation = Some(g);
            let mut inv = self.script.prepare_invoke();
            for &i in which {
                let p = &all[i].0;
                inv.key(subject.redis_key(&self.prefix, p));
                inv.arg(p.remote.interval).arg(p.remote.tolerance);
            }
            inv.invoke_async::<Vec<Vec<i64>>>(&mut conn)
                .await
                .map_err(Some)
        };
        let reply = tokio::time::timeout(self.timeout, call).await;
        let m = &self.metrics;
        let failed = |counter: &AtomicU64| {
            counter.fetch_add(1, Relaxed);
            if let Some(g) = generation {
                // Any failure on a connection ends it: after a failover a connection may still
                // be open to a server that is no longer the primary.
                self.drop_connection(g);
            }
            Err(())
        };
        match reply {
            Ok(Ok(rows)) if rows.len() == which.len() && rows.iter().all(|r| r.len() == 4) => {
                let us = started.elapsed().as_micros() as u64;
                m.calls.fetch_add(1, Relaxed);
                m.latency_us_sum.fetch_add(us, Relaxed);
                let b = REDIS_BUCKETS_US
                    .iter()
                    .position(|&b| us <= b)
                    .unwrap_or(REDIS_BUCKETS_US.len());
                m.latency[b].fetch_add(1, Relaxed);
                Ok(rows
                    .iter()
                    .map(|r| Decision {
                        allowed: r[0] == 1,
                        tat: 0,
                        remaining: r[1].max(0) as u64,
                        retry_after: r[2].max(0) as u64,
                        reset: r[3].max(0) as u64,
                    })
                    .collect())
            }
            Ok(Ok(_)) => failed(&m.errors_reply),
            // Counted where it happened (connect, or not tried during the back-off).
            Ok(Err(None)) => Err(()),
            Ok(Err(Some(e))) => {
                tracing::warn!(error = %e, "Redis limit script failed");
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    failed(&m.errors_connect)
                } else {
                    failed(&m.errors_reply)
                }
            }
            Err(_) => failed(&m.errors_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Identity;

    fn policy(rate: &str, burst: u64, key: &str) -> Policy {
        let text = format!("[limits.p]\nrate = \"{rate}\"\nburst = {burst}\nkey = \"{key}\"\n");
        let c = apiwarden_core::config::parse(&text, "t.toml").unwrap();
        Policy::new("p", &c.limits["p"])
    }

    #[test]
    fn a_million_source_ips_stay_within_the_bound() {
        let store = LocalStore::new(10_000);
        let p = policy("10/s", 10, "ip");
        let id = Identity::anonymous();
        let h = HeaderMap::new();
        let now = store.now();
        for i in 0..1_000_000u32 {
            let s = Subject {
                route: "r",
                ip: IpAddr::from(i.to_be_bytes()),
                consumer: id.consumer.as_deref(),
                key_id: id.key_id.as_deref(),
                headers: &h,
            };
            let key = s.local_key(&p, &store.hasher);
            assert!(store.decide(key, &p.local, now + u64::from(i)).0.allowed);
        }
        assert!(
            store.len() as u64 <= store.capacity(),
            "{} keys",
            store.len()
        );
        assert!(store.capacity() < 10_100);
        assert_eq!(store.tracked.load(Relaxed), store.len() as u64);
        // No shard's table grew past the size reserved on first use: memory is bounded.
        let mut fresh: HashMap<u64, (u64, u32), BuildHasherDefault<Identity64>> =
            HashMap::default();
        fresh.reserve(2 * store.per_shard);
        let reserved = fresh.capacity();
        for s in store.shards.iter() {
            let s = s.lock().unwrap();
            // (hashbrown's capacity() counts deleted entries against it; it can only shrink.)
            assert!(s.index.capacity() <= reserved);
            assert_eq!(s.keys.capacity(), store.per_shard);
        }
    }

    #[test]
    fn idle_keys_are_evicted_before_active_ones() {
        let store = LocalStore::new(SHARDS as u64 * 64);
        let g = policy("1/s", 1, "ip").local;
        // Fill the store with keys that become idle after one second.
        let mut t = store.now();
        let mut k = 1u64;
        let spread = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        while store.len() < store.capacity() as usize && k < 100_000 {
            store.decide(spread(k), &g, t);
            k += 1;
        }
        assert_eq!(store.len() as u64, store.capacity());
        // Shards fill unevenly, so filling the last ones evicted from the first: start the
        // count now.
        let active_before = store.evicted_active.load(Relaxed);
        t += 2 * NANOS;
        // A quarter as many new keys: every shard still holds idle keys when they come.
        for i in 0..(SHARDS as u64 * 16) {
            store.decide(spread(1_000_000 + i), &g, t);
        }
        assert_eq!(store.evicted_active.load(Relaxed), active_before);
        assert!(store.evicted_idle.load(Relaxed) > 0);
    }

    #[test]
    fn undo_gives_the_budget_back() {
        let store = LocalStore::new(100);
        let g = policy("1/m", 1, "ip").local;
        let now = store.now();
        let (d, prev) = store.decide(7, &g, now);
        assert!(d.allowed);
        assert!(!store.decide(7, &g, now).0.allowed);
        store.undo(7, prev, d.tat, g.interval);
        assert!(store.decide(7, &g, now).0.allowed);
        // When another request moved the TAT meanwhile, one interval still comes back.
        let g2 = policy("2/m", 2, "ip").local;
        let (a, pa) = store.decide(8, &g2, now);
        let (b, _) = store.decide(8, &g2, now);
        assert!(a.allowed && b.allowed);
        store.undo(8, pa, a.tat, g2.interval);
        assert!(
            store.decide(8, &g2, now).0.allowed,
            "the undone admission is usable again"
        );
        assert!(!store.decide(8, &g2, now).0.allowed);
    }

    #[test]
    fn compound_and_fallback_keys_are_distinct() {
        let store = LocalStore::new(100);
        let p = policy("1/s", 1, "consumer");
        let h = HeaderMap::new();
        let anon = Identity::anonymous();
        let mut named = Identity::anonymous();
        named.consumer = Some("10.0.0.1".into());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let key = |id: &Identity| {
            Subject {
                route: "r",
                ip,
                consumer: id.consumer.as_deref(),
                key_id: id.key_id.as_deref(),
                headers: &h,
            }
            .local_key(&p, &store.hasher)
        };
        assert_ne!(key(&anon), key(&named));
        let s = Subject {
            route: "r",
            ip,
            consumer: named.consumer.as_deref(),
            key_id: named.key_id.as_deref(),
            headers: &h,
        };
        assert_eq!(
            s.redis_key("aw", &p),
            b"aw:rl:p:consumer:8:10.0.0.1".to_vec()
        );
    }
}
