//! The request pipeline: the whole path of a request, in one file.
//!
//! ```text
//!  admit ─► route ─► identify ─► authorize ─► limit ─► forward ─► record
//! (size,    (host,   (who is     (may they?)  (within   (upstream) (one audit event,
//!  path)    path,     calling?)               limits?)              when the response ends)
//!           method)
//! ```
//!
//! Each stage is a type with one job. A stage that refuses returns a [`Reason`]; the refusal
//! becomes a response in `respond.rs` and is recorded like any other request. The identity,
//! limit and ledger work fill [`Identify`], [`Limit`] and the audit sink behind [`Recorder`].

use crate::audit::AuditSink;
use crate::body::{BodyStats, RequestBody, ResponseBody};
use crate::ids::new_id;
use crate::limit::{decide, LocalStore, Policy, RedisStore, RouteLimits, Subject, Verdict};
use crate::metrics::{Metrics, RouteMetrics, UpstreamErrorKind};
use crate::respond::error_response;
use crate::upstream::{Lease, SendError, Upstream};
use apiwarden_core::config::{AuthMethod, Config, RouteConfig};
use apiwarden_core::event::{push_decimal, redact_query, AuditEvent, EventKind, Outcome, Reason};
use apiwarden_core::path::{normalize, PathRules};
use apiwarden_core::router::Router;
use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Everything a gateway's requests share: the current configuration (swapped atomically on
/// reload), the audit sink and the metrics.
pub struct Shared {
    pub state: ArcSwap<State>,
    pub sink: Arc<dyn AuditSink>,
    pub metrics: Metrics,
    /// The local limit store, kept across reloads (its size is read at start).
    pub local_limits: Arc<LocalStore>,
    /// The API keys in force, swapped by `keystore::follow`.
    pub keys: ArcSwap<crate::keystore::KeyRing>,
    /// The block list in force, swapped by `blocklist::follow`.
    pub blocks: ArcSwap<crate::blocklist::BlockSet>,
    pub node: Arc<str>,
    pub shutting_down: AtomicBool,
    /// HMAC-SHA256 under the ledger's salt, for `audit.hmac_headers` and `audit.hmac_query`.
    pub audit_hmac: Option<ring::hmac::Key>,
    /// `audit.durability` as the ledger was opened with it (read at start): whether a request
    /// waits for its received record. A reload does not change it, as it does not change the
    /// ledger's writer: a `strict` wait on a writer opened `async` would be answered before
    /// the record is synced.
    pub strict: bool,
}

impl Shared {
    /// `hmac:<hex>` of a sensitive value, or `REDACTED` when the salt could not be read.
    pub fn audit_hash(&self, value: &str) -> String {
        match &self.audit_hmac {
            Some(k) => crate::ledger::hmac_text(k, value),
            None => "REDACTED".into(),
        }
    }
}

impl Shared {
    /// Hands a finished event to the sink.
    pub fn record(&self, event: Box<AuditEvent>) {
        self.metrics.audit_event();
        self.sink.record(event);
    }

    /// `/metrics`: the registry and the local limit store's gauges.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = self.metrics.render();
        let l = &self.local_limits;
        let _ = write!(
            out,
            "# HELP apiwarden_limit_tracked_keys Keys held by the local limit store.\n# TYPE apiwarden_limit_tracked_keys gauge\napiwarden_limit_tracked_keys {}\n\
             # HELP apiwarden_limit_max_keys Most keys the local limit store holds (storage.limit_keys).\n# TYPE apiwarden_limit_max_keys gauge\napiwarden_limit_max_keys {}\n\
             # HELP apiwarden_limit_evictions_total Keys dropped from the full local store: idle ones had their whole budget, active ones lost their state.\n# TYPE apiwarden_limit_evictions_total counter\n\
             apiwarden_limit_evictions_total{{kind=\"idle\"}} {}\napiwarden_limit_evictions_total{{kind=\"active\"}} {}\n",
            l.tracked.load(std::sync::atomic::Ordering::Relaxed),
            l.capacity(),
            l.evicted_idle.load(std::sync::atomic::Ordering::Relaxed),
            l.evicted_active.load(std::sync::atomic::Ordering::Relaxed),
        );
        out
    }

    /// Records a `system` event (a reload, a start, a stop).
    pub fn system_event(&self, message: String, outcome: Outcome, reason: Reason) {
        let mut e = AuditEvent::new(EventKind::System, new_id(), self.node.clone());
        e.decision.outcome = outcome;
        e.decision.reason = reason;
        e.message = Some(message);
        self.record(Box::new(e));
    }
}

impl State {
    /// The upstreams of this configuration.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }
}

/// One compiled configuration: what a request needs, ready to use.
pub struct State {
    pub config: Config,
    router: Router,
    upstreams: Vec<Arc<Upstream>>,
    routes: Vec<RouteState>,
    /// Redis for limits shared by every node, when `storage.redis` is set.
    redis: Option<Arc<RedisStore>>,
    /// Token issuers (`[jwt.NAME]`), by name.
    pub issuers: Vec<Arc<crate::jwt::Issuer>>,
    /// Token introspection endpoints (`[introspection.NAME]`), by name.
    pub introspectors: Vec<Arc<crate::introspect::Introspector>>,
    workers: usize,
}

struct RouteState {
    name: Arc<str>,
    template: Arc<str>,
    metrics: Arc<RouteMetrics>,
    limits: RouteLimits,
    /// The issuer of the tokens the route accepts (`auth` has `jwt`).
    jwt: Option<Arc<crate::jwt::Issuer>>,
    /// The endpoint that checks the route's opaque tokens (`auth` has `introspection`).
    introspection: Option<Arc<crate::introspect::Introspector>>,
}

impl State {
    /// Compiles a validated config. Upstreams whose settings did not change keep their
    /// connection pools and health state from `previous`.
    /// `workers` is the number of worker threads, each of which gets its own upstream pools.
    pub fn compile(
        config: Config,
        metrics: &Metrics,
        previous: Option<&State>,
        workers: usize,
    ) -> State {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.upstreams.iter().find(|old| old.same_as(u)))
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Upstream::new(u.clone(), metrics.upstream(&u.name), workers))
                    })
            })
            .collect();
        // Issuers whose settings did not change keep their keys and verified tokens.
        let issuers: Vec<Arc<crate::jwt::Issuer>> = config
            .jwt
            .iter()
            .map(|(name, j)| {
                previous
                    .and_then(|p| {
                        p.issuers.iter().find(|old| {
                            &old.name == name && &old.config == j && old.secret_unchanged()
                        })
                    })
                    .cloned()
                    .unwrap_or_else(|| crate::jwt::Issuer::new(name, j.clone(), metrics.jwt(name)))
            })
            .collect();
        // Endpoints whose settings did not change keep their cached answers.
        let introspectors: Vec<Arc<crate::introspect::Introspector>> = config
            .introspection
            .iter()
            .map(|(name, c)| {
                previous
                    .and_then(|p| {
                        p.introspectors.iter().find(|old| {
                            &old.name == name && &old.config == c && old.secret_unchanged()
                        })
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        crate::introspect::Introspector::new(
                            name,
                            c.clone(),
                            metrics.introspection(name),
                        )
                    })
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| RouteState {
                name: Arc::from(r.name.as_str()),
                template: Arc::from(r.path_text.as_str()),
                metrics: metrics.route(&r.name),
                limits: RouteLimits::compile(&config, &r.limits, metrics),
                jwt: r
                    .jwt
                    .as_ref()
                    .and_then(|n| issuers.iter().find(|i| &i.name == n).cloned()),
                introspection: r
                    .introspection
                    .as_ref()
                    .and_then(|n| introspectors.iter().find(|i| &i.name == n).cloned()),
            })
            .collect();
        let redis = match previous.and_then(|p| p.redis.as_ref()) {
            Some(r) if r.same_as(&config) => Some(r.clone()),
            _ => RedisStore::new(&config, workers, metrics.redis.clone()).map(Arc::new),
        };
        State {
            router: Router::new(&config.routes),
            upstreams,
            routes,
            redis,
            issuers,
            introspectors,
            config,
            workers,
        }
    }

    /// The number of worker threads this state was compiled for.
    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// What the gateway knows about the connection a request came on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `TLSv1.2` or `TLSv1.3` when the connection is TLS.
    pub tls_version: Option<&'static str>,
    /// The peer's address as a header value, made once per connection.
    peer_ip: HeaderValue,
    /// The client certificate rustls verified against `gateway.tls.client_ca`, read once
    /// after the handshake.
    pub client_cert: Option<Arc<crate::tls::ClientCert>>,
    /// Checks `client_cert` again at each request (expiry, a client CA loaded since).
    pub(crate) cert_check: Option<crate::tls::CertCheck>,
    /// Set on connections that can be asked to close gracefully (HTTP/2, h2c, and those with
    /// a client certificate): see [`ConnInfo::request_close`].
    pub(crate) closing: Option<tokio::sync::Notify>,
    /// The connection's place in the open-connection counts (`gateway.max_connections`),
    /// held as long as anything serves it (a WebSocket tunnel outlives hyper's connection).
    pub(crate) slot: Option<crate::server::Assigned>,
    /// Its requests, for the idle check (`gateway.idle_timeout`, see `server::IdleWatch`).
    pub(crate) activity: Activity,
}

/// What the idle check of a connection reads: how many requests it has begun, and how many
/// of them have not ended (their response is still being sent, or their tunnel is open).
/// A connection with one open is never idle, however slow its upstream or its body.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    begun: std::sync::atomic::AtomicU64,
    open: std::sync::atomic::AtomicU32,
}

impl Activity {
    fn begin(&self) {
        self.begun
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn end(&self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests begun so far, and whether one is open now.
    pub(crate) fn read(&self) -> (u64, bool) {
        (
            self.begun.load(std::sync::atomic::Ordering::Relaxed),
            self.open.load(std::sync::atomic::Ordering::Relaxed) > 0,
        )
    }
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls_version: Option<&'static str>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo {
            peer,
            tls_version,
            peer_ip,
            client_cert: None,
            cert_check: None,
            closing: None,
            slot: None,
            activity: Activity::default(),
        }
    }

    /// Asks the connection to finish its requests in flight and close (HTTP/2: GOAWAY).
    /// Does nothing on a connection that cannot be asked (plain HTTP/1.1 without a client
    /// certificate).
    pub(crate) fn request_close(&self) {
        if let Some(n) = &self.closing {
            n.notify_one();
        }
    }

    /// The connection's verified client certificate, and its check at each request.
    pub fn with_client_cert(
        mut self,
        cert: Option<Arc<crate::tls::ClientCert>>,
        check: Option<crate::tls::CertCheck>,
    ) -> Self {
        self.client_cert = cert;
        self.cert_check = check;
        self
    }
}

/// Who is calling, as the identify stage found out.
#[derive(Clone, Debug)]
pub struct Identity {
    pub method: AuthMethod,
    pub consumer: Option<String>,
    pub key_id: Option<String>,
    pub subject: Option<String>,
    pub scopes: Vec<String>,
    /// The consumer's settings, found once by the identify stage.
    pub consumer_ref: Option<ConsumerRef>,
    /// The header the credential came in (removed before forwarding).
    pub credential_header: Option<HeaderName>,
    /// The API key came in the route's `api_key_query` parameter (removed before forwarding).
    pub credential_in_query: bool,
}

/// Where a caller's consumer is defined.
#[derive(Clone, Debug)]
pub enum ConsumerRef {
    /// `[[consumers]]` of the config in force, by index.
    Config(usize),
    /// Kept in the store (`apiwarden consumers`, the admin API).
    Store(Arc<apiwarden_core::config::ConsumerConfig>),
}

impl ConsumerRef {
    /// The consumer named `name`: the config's first, then the store's.
    fn find(config: &Config, keys: &crate::keystore::KeyRing, name: &str) -> Option<ConsumerRef> {
        match config.consumers.iter().position(|c| c.name == name) {
            Some(i) => Some(ConsumerRef::Config(i)),
            None => keys.consumers.get(name).cloned().map(ConsumerRef::Store),
        }
    }

    /// The consumer a token's client names, if that consumer accepts tokens of `issuer`
    /// (`token_issuers`): a client cannot take a consumer's roles just by its name.
    fn find_for_token(
        config: &Config,
        keys: &crate::keystore::KeyRing,
        client: &str,
        issuer: &str,
    ) -> Option<ConsumerRef> {
        ConsumerRef::find(config, keys, client)
            .filter(|r| r.get(config).token_issuers.iter().any(|t| t == issuer))
    }

    pub fn get<'a>(&'a self, config: &'a Config) -> &'a apiwarden_core::config::ConsumerConfig {
        match self {
            ConsumerRef::Config(i) => &config.consumers[*i],
            ConsumerRef::Store(c) => c,
        }
    }
}

impl Identity {
    /// Nobody in particular: the identity on an open route (`auth = ["none"]`).
    pub fn anonymous() -> Identity {
        Identity {
            method: AuthMethod::None,
            consumer: None,
            key_id: None,
            subject: None,
            scopes: Vec::new(),
            consumer_ref: None,
            credential_header: None,
            credential_in_query: false,
        }
    }
}

/// Stage: who is calling.
pub struct Identify;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl Identify {
    /// `compiled`: the route's token issuer and introspection endpoint.
    async fn run(
        route: &RouteConfig,
        compiled: &RouteState,
        config: &Config,
        headers: &HeaderMap,
        query: Option<&str>,
        keys: &crate::keystore::KeyRing,
        client_cert: Option<&crate::tls::ClientCert>,
    ) -> Result<Identity, Reason> {
        let issuer = compiled.jwt.as_ref();
        let introspector = compiled.introspection.as_ref();
        if route.auth == [AuthMethod::None] {
            return Ok(Identity::anonymous());
        }
        // The credential: `X-API-Key` (API keys only), or `Authorization: Bearer`. Never the
        // query string, unless the route names a parameter for API keys (`api_key_query`).
        // Without one, a verified client certificate on a route that accepts mTLS.
        let (credential, from_x_api_key) =
            // `from_utf8`, not `HeaderValue::to_str`: hyper has already refused control
            // characters, every credential form checks its own alphabet, and this runs on
            // every request over a few hundred bytes.
            match (headers.get(&X_API_KEY), headers.get(header::AUTHORIZATION)) {
                (Some(v), _) => (
                    std::str::from_utf8(v.as_bytes()).map_err(|_| Reason::AuthnMalformed)?,
                    true,
                ),
                (None, Some(v)) => {
                    let v =
                        std::str::from_utf8(v.as_bytes()).map_err(|_| Reason::AuthnMalformed)?;
                    // `Bearer <token>`, the scheme in any case (RFC 9110 §11.1).
                    match v.get(..7) {
                        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => {
                            (v[7..].trim(), false)
                        }
                        _ => return Err(Reason::AuthnMalformed),
                    }
                }
                (None, None) => {
                    let in_query = route.api_key_query.as_deref().and_then(|name| {
                        query?.split('&').find_map(|pair| {
                            pair.strip_prefix(name).and_then(|rest| rest.strip_prefix('='))
                        })
                    });
                    if let Some(key) = in_query {
                        let mut id = Identify::api_key(config, keys, key)?;
                        id.credential_in_query = true;
                        return Ok(id);
                    }
                    return match client_cert {
                        Some(cert) if route.auth.contains(&AuthMethod::Mtls) => {
                            Ok(Identify::mtls(config, cert))
                        }
                        _ => Err(Reason::AuthnMissing),
                    };
                }
            };
        let header = if from_x_api_key {
            X_API_KEY
        } else {
            header::AUTHORIZATION
        };
        let with_header = |mut id: Identity| {
            id.credential_header = Some(header.clone());
            id
        };
        if credential.starts_with("aw_") {
            if !route.auth.contains(&AuthMethod::ApiKey) {
                return Err(Reason::AuthnMalformed);
            }
            return Identify::api_key(config, keys, credential).map(with_header);
        }
        let jwt = route.auth.contains(&AuthMethod::Jwt) && !from_x_api_key;
        // A bearer token that is not an API key: on a route that accepts both, a JWS (three
        // parts) is verified here, anything else is asked about at the introspection endpoint.
        if route.auth.contains(&AuthMethod::Introspection)
            && !from_x_api_key
            && !(jwt && credential.bytes().filter(|&b| b == b'.').count() == 2)
        {
            let Some(introspector) = introspector else {
                return Err(Reason::AuthnUnavailable);
            };
            // Boxed: the exchange is large, and would otherwise make every request's
            // future (moved and copied on every request) as large as itself.
            return Box::pin(Identify::introspection(
                config,
                keys,
                introspector,
                credential,
            ))
            .await
            .map(with_header);
        }
        if jwt {
            let Some(issuer) = issuer else {
                return Err(Reason::AuthnUnavailable);
            };
            return Box::pin(Identify::jwt(config, keys, issuer, credential))
                .await
                .map(with_header);
        }
        // A credential of a kind the route does not accept (a client certificate is not
        // one that comes in a header).
        Err(Reason::AuthnMalformed)
    }

    /// A verified client certificate: its consumer is the one whose `certificate_names`
    /// name one of its SANs or its CN; a certificate no consumer claims has no scopes.
    fn mtls(config: &Config, cert: &crate::tls::ClientCert) -> Identity {
        let consumer_index = config
            .consumers
            .iter()
            .position(|c| c.certificate_names.iter().any(|n| cert.is_named(n)));
        let consumer = consumer_index.map(|i| &config.consumers[i]);
        Identity {
            method: AuthMethod::Mtls,
            consumer: consumer.map(|c| c.name.clone()),
            key_id: None,
            subject: cert.identity_subject().map(str::to_string),
            scopes: consumer.map_or_else(Vec::new, |c| c.scopes.clone()),
            consumer_ref: consumer_index.map(ConsumerRef::Config),
            credential_header: None,
            credential_in_query: false,
        }
    }

    fn api_key(
        config: &Config,
        keys: &crate::keystore::KeyRing,
        credential: &str,
    ) -> Result<Identity, Reason> {
        let now = crate::now_ms();
        let key = keys.check(credential, now)?;
        let r = &key.record;
        // A key narrows its consumer: scopes the consumer no longer holds are gone from its
        // keys too, and a key whose consumer is gone (from the config and the store) is no
        // longer valid.
        let consumer_ref =
            ConsumerRef::find(config, keys, &r.consumer).ok_or(Reason::AuthnInvalidKey)?;
        let consumer = consumer_ref.get(config);
        Ok(Identity {
            method: AuthMethod::ApiKey,
            consumer: Some(r.consumer.clone()),
            key_id: Some(r.key_id.clone()),
            subject: Some(r.consumer.clone()),
            scopes: r
                .scopes
                .iter()
                .filter(|s| consumer.scopes.contains(s))
                .cloned()
                .collect(),
            consumer_ref: Some(consumer_ref),
            credential_header: None,
            credential_in_query: false,
        })
    }

    /// A token's scopes are what its issuer granted; its client (`client_id` or `azp`) is the
    /// consumer, whose `roles` and `allow_ips` apply when that consumer takes this issuer's
    /// tokens (`token_issuers`).
    async fn jwt(
        config: &Config,
        keys: &crate::keystore::KeyRing,
        issuer: &Arc<crate::jwt::Issuer>,
        token: &str,
    ) -> Result<Identity, Reason> {
        let id = issuer.check(token).await?;
        Ok(Identify::token(
            config,
            keys,
            AuthMethod::Jwt,
            &issuer.name,
            &id,
        ))
    }

    /// As [`Identify::jwt`], with what the introspection endpoint said about the token.
    async fn introspection(
        config: &Config,
        keys: &crate::keystore::KeyRing,
        introspector: &crate::introspect::Introspector,
        token: &str,
    ) -> Result<Identity, Reason> {
        let id = introspector.check(token).await?;
        Ok(Identify::token(
            config,
            keys,
            AuthMethod::Introspection,
            &introspector.name,
            &id,
        ))
    }

    /// The identity a checked bearer token carries, from `issuer` (a table name).
    fn token(
        config: &Config,
        keys: &crate::keystore::KeyRing,
        method: AuthMethod,
        issuer: &str,
        id: &crate::jwt::TokenIdentity,
    ) -> Identity {
        Identity {
            method,
            consumer: id.client.clone(),
            key_id: None,
            subject: id.subject.clone(),
            scopes: id.scopes.clone(),
            consumer_ref: id
                .client
                .as_ref()
                .and_then(|c| ConsumerRef::find_for_token(config, keys, c, issuer)),
            credential_header: None,
            credential_in_query: false,
        }
    }
}

/// Stage: may they.
pub struct Authorize;

impl Authorize {
    /// Deny by default: the consumer's address allowlist, then every role and every scope the
    /// route names must be held.
    pub fn run(
        route: &RouteConfig,
        consumer: Option<&apiwarden_core::config::ConsumerConfig>,
        scopes: &[String],
        ip: IpAddr,
    ) -> Result<(), Reason> {
        if let Some(nets) = consumer.and_then(|c| c.allow_ips.as_ref()) {
            if !nets.iter().any(|n| n.contains(ip)) {
                return Err(Reason::AuthzIpNotAllowed);
            }
        }
        if !route.roles.is_empty()
            && !consumer.is_some_and(|c| route.roles.iter().all(|r| c.roles.contains(r)))
        {
            return Err(Reason::AuthzMissingRole);
        }
        if route.scopes.iter().all(|s| scopes.contains(s)) {
            Ok(())
        } else {
            Err(Reason::AuthzMissingScope)
        }
    }
}

/// Stage: are they within their limits.
pub struct Limit;

/// What the limit stage adds to the response: `RateLimit-Policy`, `RateLimit` and, on a
/// refusal, `Retry-After`.
#[derive(Default)]
pub struct RateHeaders {
    policy: Option<HeaderValue>,
    state: Option<HeaderValue>,
    retry_after: Option<u64>,
}

impl RateHeaders {
    fn apply(self, h: &mut HeaderMap) {
        if let Some(p) = self.policy {
            h.insert(RATELIMIT_POLICY, p);
        }
        if let Some(s) = self.state {
            h.insert(RATELIMIT, s);
        }
        if let Some(r) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(r));
        }
    }
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// `"NAME";r=REMAINING;t=SECONDS` (draft-ietf-httpapi-ratelimit-headers). Written by hand: on
/// a limited route this runs for every response, and `format!` cost four times as much.
fn ratelimit_value(p: &Policy, remaining: u64, reset: u64) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(p.quoted_name.len() + 48);
    v.extend_from_slice(p.quoted_name.as_bytes());
    v.extend_from_slice(b";r=");
    push_decimal(&mut v, remaining);
    v.extend_from_slice(b";t=");
    push_decimal(&mut v, reset);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

impl Limit {
    /// Ok with the headers for the response, or the refusal with its headers and the name of
    /// the policy that refused.
    pub async fn run(
        limits: &RouteLimits,
        local: &LocalStore,
        redis: Option<&RedisStore>,
        subject: &Subject<'_>,
        at: Instant,
    ) -> Result<RateHeaders, (Reason, String, RateHeaders, Outcome)> {
        if limits.policies.is_empty() {
            return Ok(RateHeaders::default());
        }
        match decide(limits, local, redis, subject, at).await {
            Verdict::Allow { tightest } => Ok(RateHeaders {
                policy: limits.policy_header.clone(),
                state: tightest.and_then(|(i, r, t)| ratelimit_value(&limits.policies[i].0, r, t)),
                retry_after: None,
            }),
            Verdict::Deny {
                policy,
                retry_after,
                reset,
            } => Err((
                Reason::RateLimitExceeded,
                policy.name.to_string(),
                RateHeaders {
                    policy: limits.policy_header.clone(),
                    state: ratelimit_value(&policy, 0, reset),
                    retry_after: Some(retry_after.max(1)),
                },
                Outcome::Deny,
            )),
            Verdict::Unavailable { policies, closed } => Err((
                Reason::RateLimitUnavailable,
                policies,
                RateHeaders {
                    retry_after: closed.then_some(1),
                    ..RateHeaders::default()
                },
                if closed {
                    Outcome::Deny
                } else {
                    Outcome::Allow
                },
            )),
        }
    }
}

/// Stage: the record. Holds the request's audit event until the response has ended, then
/// hands it to the sink exactly once.
pub struct Recorder(Option<RecorderParts>);

/// What the record stage holds while the request runs.
pub struct RecorderParts {
    pub(crate) event: Box<AuditEvent>,
    start: Instant,
    shared: Arc<Shared>,
    /// The connection the request came on; the request counts as open on it until it is
    /// recorded.
    conn: Arc<ConnInfo>,
    /// The configuration the request runs under, and its route once known.
    state: Arc<State>,
    route: Option<usize>,
    request_body: Option<Arc<BodyStats>>,
}

impl std::ops::Deref for Recorder {
    type Target = RecorderParts;
    fn deref(&self) -> &RecorderParts {
        self.0
            .as_ref()
            .expect("a recorder is used only until it finishes")
    }
}

impl std::ops::DerefMut for Recorder {
    fn deref_mut(&mut self) -> &mut RecorderParts {
        self.0
            .as_mut()
            .expect("a recorder is used only until it finishes")
    }
}

impl Recorder {
    fn new(parts: RecorderParts) -> Self {
        parts.conn.activity.begin();
        Recorder(Some(parts))
    }

    /// Completes the event with what the response did and records it.
    pub fn finish(mut self, response_bytes: u64, error: Option<Reason>) {
        if let Some(parts) = self.0.take() {
            parts.finish(response_bytes, error);
        }
    }
}

/// A request abandoned before its response ended (the client went away, the connection was
/// reset, the gateway stopped) is still recorded, exactly once.
impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(mut parts) = self.0.take() {
            let reason = if parts
                .shared
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                Reason::ShuttingDown
            } else {
                Reason::ClientDisconnected
            };
            if parts.event.response.status == 0 {
                // No response was sent: nginx's "client closed request".
                parts.event.response.status = 499;
            }
            parts.finish(0, Some(reason));
        }
    }
}

impl RecorderParts {
    fn finish(self, response_bytes: u64, mut error: Option<Reason>) {
        let RecorderParts {
            mut event,
            start,
            shared,
            conn,
            state,
            route,
            request_body,
        } = self;
        let elapsed = start.elapsed();
        // The outcome's record carries no phase: `strict`'s received record was made from this
        // same event, marked `received` (see `handle`), and this is where the mark comes off.
        event.phase = None;
        event.response.bytes = response_bytes;
        event.response.latency_us = elapsed.as_micros() as u64;
        if let Some(stats) = request_body {
            event.request.bytes = stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
            if stats.too_large.load(std::sync::atomic::Ordering::Relaxed) && event.error.is_none() {
                event.error = Some(Reason::RequestBodyTooLarge);
            }
            if stats.timed_out.load(std::sync::atomic::Ordering::Relaxed) && event.error.is_none() {
                event.error = Some(Reason::RequestBodyTimeout);
            }
            // A client that broke its body after the upstream began its answer breaks that
            // answer too: the client's doing, not the upstream's.
            if stats
                .client_failed
                .load(std::sync::atomic::Ordering::Relaxed)
                && error == Some(Reason::UpstreamError)
            {
                error = Some(Reason::ClientDisconnected);
            }
        }
        if event.error.is_none() {
            event.error = error;
        }
        let metrics: &RouteMetrics = match route {
            Some(i) => &state.routes[i].metrics,
            None => &shared.metrics.unrouted,
        };
        metrics.count(
            event.response.status,
            event.decision.outcome == Outcome::Deny,
        );
        shared.metrics.observe_latency(elapsed);
        shared.metrics.request_finished();
        shared.record(event);
        conn.activity.end();
    }
}

/// Stage: forward to the upstream.
pub struct Forward;

impl Forward {
    #[allow(clippy::too_many_arguments)] // each argument is a distinct fact of this one request
    async fn run(
        upstream: &Arc<Upstream>,
        mut req: Request<Incoming>,
        normalized: Option<&str>,
        trusted_peer: bool,
        request_id: &HeaderValue,
        max_body: u64,
        recorder: &mut RecorderParts,
    ) -> Result<Forwarded, Reason> {
        let RecorderParts {
            event, conn, state, ..
        } = recorder;
        let upgrade = is_upgrade(&req);
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let ti = upstream.pick();
        let target = &upstream.targets[ti];
        event.upstream.name = Some(upstream.name.clone());
        event.upstream.target = Some(target.label.clone());

        // The URI: the target's authority, its base path, the normalised path, the query. The
        // common case (no base path, path already normal) reuses the request's own bytes.
        let path_and_query = match (
            target.target.base_path.is_empty(),
            normalized,
            parts.uri.path_and_query(),
        ) {
            (true, None, Some(pq)) => pq.clone(),
            (_, normalized, pq) => {
                let path = normalized.unwrap_or(parts.uri.path());
                let query = pq.and_then(|pq| pq.query());
                let mut s = String::with_capacity(
                    target.target.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
                );
                s.push_str(&target.target.base_path);
                s.push_str(path);
                if let Some(q) = query {
                    s.push('?');
                    s.push_str(q);
                }
                PathAndQuery::try_from(s).map_err(|_| Reason::RequestBadPath)?
            }
        };
        // The authority of an absolute-form request wins over `Host` (RFC 9112 section 3.2.2).
        // Its host and port only: never the user information an absolute-form target may hold
        // (`http://user:secret@host/`), which would leak a password upstream.
        let original_host = parts
            .uri
            .authority()
            .and_then(|a| {
                let host_port = match a.as_str().rsplit_once('@') {
                    Some((_, hp)) => hp,
                    None => a.as_str(),
                };
                HeaderValue::from_str(host_port).ok()
            })
            .or_else(|| parts.headers.get(header::HOST).cloned());
        // Origin form, as HTTP/1.1 sends to a server: the target is named by `Host`.
        parts.uri = Uri::from(path_and_query);

        strip_hop_by_hop(&mut parts.headers, upgrade);
        let h = &mut parts.headers;
        if !trusted_peer {
            // What an untrusted client says about proxies in front of it is not passed on.
            if h.keys().any(is_untrusted_forwarding) {
                for name in &UNTRUSTED_FORWARDING {
                    h.remove(name);
                }
            }
        }
        // X-Forwarded-For: appended to when the peer is a trusted proxy (every line of it, in
        // order), replaced otherwise.
        let xff = match trusted_peer.then(|| joined(h, &X_FORWARDED_FOR)).flatten() {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + conn.peer_ip.len());
                v.extend_from_slice(&prev);
                v.extend_from_slice(b", ");
                v.extend_from_slice(conn.peer_ip.as_bytes());
                HeaderValue::from_bytes(&v).map_err(|_| Reason::RequestMalformed)?
            }
            _ => conn.peer_ip.clone(),
        };
        // Room for the five headers set here, made once.
        h.reserve(5);
        h.insert(X_FORWARDED_FOR, xff);
        if !(trusted_peer && h.contains_key(&X_FORWARDED_PROTO)) {
            let proto = if conn.tls_version.is_some() {
                "https"
            } else {
                "http"
            };
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !(trusted_peer && h.contains_key(&X_FORWARDED_HOST)) {
            if let Some(host) = original_host {
                h.insert(X_FORWARDED_HOST, host);
            }
        }
        h.insert(header::HOST, target.host.clone());
        h.insert(X_REQUEST_ID, request_id.clone());
        if parts.version == Version::HTTP_2 {
            // HTTP/2 may split cookies over several fields; HTTP/1.1 wants one (RFC 9113
            // section 8.2.3).
            let mut cookies = h.get_all(header::COOKIE).iter();
            if let (Some(first), Some(_)) = (cookies.next(), cookies.next()) {
                let mut joined = first.as_bytes().to_vec();
                for v in h.get_all(header::COOKIE).iter().skip(1) {
                    joined.extend_from_slice(b"; ");
                    joined.extend_from_slice(v.as_bytes());
                }
                if let Ok(v) = HeaderValue::from_bytes(&joined) {
                    h.insert(header::COOKIE, v);
                }
            }
        }
        parts.version = Version::HTTP_11;

        let (body, stats) = if body.is_end_stream() {
            (RequestBody::empty(), None)
        } else {
            let (b, s) = RequestBody::limited(body, max_body, state.config.gateway.body_timeout);
            (b, Some(s))
        };
        let started = Instant::now();
        // The response timeout counts from the end of the request body (a slow upload is not
        // the upstream's fault, and must not put a target into cool-down), and from when a
        // connection is in hand: see `Upstream::send`.
        let result = upstream
            .send(ti, Request::from_parts(parts, body), stats.clone(), started)
            .await;
        event.upstream.latency_us = Some(started.elapsed().as_micros() as u64);
        if let (Err(_), Some(s)) = (&result, &stats) {
            // What of the body went before the failure (a success leaves this to the record
            // stage, once the body has ended).
            event.request.bytes = s.bytes.load(std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok((response, lease)) => {
                upstream.succeeded(target);
                Ok(Forwarded {
                    response,
                    lease,
                    request_body: stats,
                    on_upgrade,
                })
            }
            Err(SendError::Timeout) => {
                upstream.failed(target);
                upstream.metrics.error(UpstreamErrorKind::Timeout);
                Err(Reason::UpstreamTimeout)
            }
            Err(e) => {
                if stats
                    .as_ref()
                    .is_some_and(|s| s.timed_out.load(std::sync::atomic::Ordering::Relaxed))
                {
                    // The client's pause, not the upstream's fault.
                    return Err(Reason::RequestBodyTimeout);
                }
                if stats
                    .as_ref()
                    .is_some_and(|s| s.client_failed.load(std::sync::atomic::Ordering::Relaxed))
                {
                    // Not the upstream's fault: no error metric, no health penalty.
                    return Err(Reason::ClientDisconnected);
                }
                if stats
                    .as_ref()
                    .is_some_and(|s| s.too_large.load(std::sync::atomic::Ordering::Relaxed))
                {
                    return Err(Reason::RequestBodyTooLarge);
                }
                match e {
                    SendError::Connect(_) => {
                        upstream.failed(target);
                        upstream.metrics.error(UpstreamErrorKind::Connect);
                        tracing::warn!(upstream = %upstream.name, target = %target.label, error = %e, "cannot connect to the upstream");
                        Err(Reason::UpstreamUnavailable)
                    }
                    SendError::Http(_) | SendError::Timeout => {
                        upstream.metrics.error(UpstreamErrorKind::Protocol);
                        tracing::warn!(upstream = %upstream.name, target = %target.label, error = %e, "upstream request failed");
                        Err(Reason::UpstreamError)
                    }
                }
            }
        }
    }
}

/// What the forward stage got back.
struct Forwarded {
    response: Response<Incoming>,
    lease: Lease,
    request_body: Option<Arc<BodyStats>>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
        // Never `h2c`: an upstream that took it would speak HTTP/2 with the client directly,
        // every later request past routing, identity, limits and the ledger. The request goes
        // on as a plain one (its `Upgrade` and `HTTP2-Settings` removed as hop-by-hop).
        && !req.headers().get_all(header::UPGRADE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1), and those the `Connection` header
/// names. An upgrade keeps `Connection: upgrade` and `Upgrade`. One pass over the names finds
/// what to remove, so the common case (none present) costs no hashing.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut found = [false; 10];
    let mut any = false;
    let mut connection_lists = false;
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
            found[i] = true;
            any = true;
            if i == 0 {
                connection_lists = true;
            }
        }
    }
    if !any && !keep_upgrade {
        return;
    }
    // The `Connection` options that name no header. A value that is just one of them (the
    // usual `keep-alive` or `close`) needs no parsing as a list.
    let option_only = |t: &[u8]| {
        [&b"keep-alive"[..], b"close", b"upgrade"]
            .iter()
            .any(|o| t.eq_ignore_ascii_case(o))
    };
    if connection_lists
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| !option_only(v.as_bytes()))
    {
        // Split as bytes: a value with a byte outside ASCII (which hyper lets through) still
        // names its headers; only a name that is no header name is passed over.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !option_only(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        let keep = keep_upgrade && (*name == header::UPGRADE || *name == header::CONNECTION);
        if found[i] && !keep {
            h.remove(name);
            // A message framed by `Transfer-Encoding` is re-framed by hyper from its body: a
            // `Content-Length` beside it is stale (RFC 9112, 6.3), and would cut the body
            // short or hold the client waiting.
            if *name == header::TRANSFER_ENCODING {
                h.remove(header::CONTENT_LENGTH);
            }
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Forwarding headers that only a trusted proxy may set; removed from other peers' requests
/// (the gateway then sets `X-Forwarded-For`, `-Proto` and `-Host` itself).
/// Also the other names upstreams read a client's address, scheme, certificate or original URL
/// from (`X-Forwarded-Client-Cert` as Envoy's, `X-Original-URL` and `X-Rewrite-URL` as IIS's and
/// Symfony's), which the gateway never sets: from an untrusted peer they are forgeries.
const UNTRUSTED_FORWARDING: [HeaderName; 15] = [
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-client-cert"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    header::FORWARDED,
    HeaderName::from_static("x-original-forwarded-for"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Whether a header is one of [`UNTRUSTED_FORWARDING`]. Every one of their names begins with
/// `x`, `f` or `t`, so most headers are passed over on their first byte.
fn is_untrusted_forwarding(name: &HeaderName) -> bool {
    matches!(name.as_str().as_bytes().first(), Some(b'x' | b'f' | b't'))
        && UNTRUSTED_FORWARDING.contains(name)
}

/// All lines of a header joined with `", "`, as RFC 9110 section 5.3 allows for lists.
fn joined(h: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = h.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

/// Hop-by-hop header names; `Connection` first.
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    header::UPGRADE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    // The settings of an HTTP/1.1 to h2c upgrade: for this connection only (RFC 7540, 3.2.1).
    HeaderName::from_static("http2-settings"),
];

/// The client IP: the peer, or when the peer is a trusted proxy, the right-most address of
/// `X-Forwarded-For` that is not itself a trusted proxy. An IPv4 client of a dual-stack
/// listener (`::ffff:a.b.c.d`) is its IPv4 address, in the event and to every stage.
fn client_ip(config: &Config, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
    let peer = peer.to_canonical();
    let trusted = |ip: IpAddr| {
        config
            .gateway
            .trusted_proxies
            .iter()
            .any(|n| n.contains(ip))
    };
    if !trusted(peer) {
        return (peer, false);
    }
    let mut ip = peer;
    for v in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(s) = v.to_str() else { break };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(addr) => {
                    let addr = addr.to_canonical();
                    ip = addr;
                    if !trusted(addr) {
                        return (ip, true);
                    }
                }
                Err(_) => return (ip, true),
            }
        }
    }
    (ip, true)
}

/// The URI without the query parameter `name` (every occurrence).
fn without_query_param(uri: &Uri, name: &str) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(name))
        .collect();
    let mut pq = uri.path().to_string();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(pq).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// What the first stages read of a request's head, found in one pass over its headers
/// rather than a hash look-up each.
struct Head<'a> {
    /// The head's size as sent, near enough: request line and header lines.
    size: usize,
    /// The first `Host`, `User-Agent` and `Content-Length` lines (as `HeaderMap::get`).
    host: Option<&'a HeaderValue>,
    user_agent: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
    /// Whether there is an `X-Forwarded-For` line.
    forwarded_for: bool,
}

fn read_head<B>(req: &Request<B>) -> Head<'_> {
    let mut head = Head {
        size: req.method().as_str().len()
            + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + 12,
        host: None,
        user_agent: None,
        content_length: None,
        forwarded_for: false,
    };
    for (k, v) in req.headers() {
        head.size += k.as_str().len() + v.len() + 4;
        if *k == header::HOST {
            head.host.get_or_insert(v);
        } else if *k == header::USER_AGENT {
            head.user_agent.get_or_insert(v);
        } else if *k == header::CONTENT_LENGTH {
            head.content_length.get_or_insert(v);
        } else if *k == X_FORWARDED_FOR {
            head.forwarded_for = true;
        }
    }
    head
}

/// A method's name for the audit event: HTTP's own methods without an allocation.
pub(crate) fn method_name(m: &hyper::Method) -> std::borrow::Cow<'static, str> {
    use std::borrow::Cow;
    Cow::Borrowed(match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        other => return Cow::Owned(other.to_owned()),
    })
}

/// The host a request is for, without port.
fn request_host<'a, B>(req: &'a Request<B>, host: Option<&'a HeaderValue>) -> Option<&'a str> {
    let raw = req
        .uri()
        .host()
        .or_else(|| host.and_then(|h| h.to_str().ok()))?;
    if raw.starts_with('[') {
        return raw.split(']').next().map(|h| &h[1..]);
    }
    Some(raw.split(':').next().unwrap_or(raw))
}

/// Handles one request through every stage.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    shared.metrics.request_started();
    let state = shared.state.load_full();

    // One clock read for the request's id, its event's id and the event's time.
    let now = std::time::SystemTime::now();
    let request_id = crate::ids::new_id_at(now);
    let rid = crate::ids::header_value(request_id);
    let mut event = Box::new(AuditEvent::new_at(
        EventKind::Request,
        crate::ids::new_id_at(now),
        shared.node.clone(),
        now,
    ));
    event.request_id = Some(request_id);
    let head = read_head(&req);
    let (ip, trusted_peer) = client_ip(&state.config, conn.peer.ip(), req.headers());
    event.client.ip = Some(ip);
    event.client.forwarded_for = head
        .forwarded_for
        .then(|| joined(req.headers(), &X_FORWARDED_FOR))
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    event.tls.version = conn.tls_version;
    event.tls.client_subject = conn.client_cert.as_ref().map(|c| c.subject.clone());
    event.request.method = Some(method_name(req.method()));
    let host = request_host(&req, head.host);
    event.request.host = host.map(str::to_string);
    let audit_cfg = &state.config.audit;
    event.request.query = req.uri().query().map(|q| {
        if audit_cfg.hmac_query.is_empty() {
            redact_query(q)
        } else {
            apiwarden_core::event::redact_query_with(q, &audit_cfg.hmac_query, &|v| {
                shared.audit_hash(v)
            })
        }
    });
    for name in &audit_cfg.hmac_headers {
        if let Some(v) = req.headers().get(name.as_str()) {
            let hashed = shared.audit_hash(&String::from_utf8_lossy(v.as_bytes()));
            event.request.headers_hmac.push((name.clone(), hashed));
        }
    }
    event.request.user_agent = head
        .user_agent
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);

    let mut recorder = Recorder::new(RecorderParts {
        event,
        start,
        shared: shared.clone(),
        conn,
        state: state.clone(),
        route: None,
        request_body: None,
    });
    let deny = |mut recorder: Recorder, reason: Reason| {
        recorder.event.decision.outcome = Outcome::Deny;
        recorder.event.decision.reason = reason;
        respond_with(recorder, reason, &rid)
    };
    let cfg = &state.config;

    // A client certificate that expired, or that a client CA loaded since the handshake no
    // longer trusts, is refused as the handshake would refuse it now, whatever the request,
    // and the connection is asked to close (HTTP/1.1 after this answer, HTTP/2 with GOAWAY).
    if let Some(check) = &recorder.conn.cert_check {
        if let Err(why) = check.check(now) {
            recorder.event.message = Some(why);
            recorder.event.request.path = Some(truncate(req.uri().path()));
            recorder.conn.request_close();
            let http1 = req.version() < Version::HTTP_2;
            return closing(deny(recorder, Reason::AuthnCertificateInvalid), http1);
        }
    }

    // Stage: admit. Refuse what is malformed or too large before anything else looks at it.
    if head.size > cfg.gateway.max_header_size {
        recorder.event.request.path = Some(truncate(req.uri().path()));
        return deny(recorder, Reason::RequestHeadersTooLarge);
    }
    let rules = PathRules {
        encoded_slashes: cfg.gateway.encoded_slashes,
        parameters: cfg.gateway.path_parameters,
    };
    let path = match normalize(req.uri().path(), rules) {
        Ok(p) => p,
        Err(e) => {
            // Which rule refused it, for whoever reads the event (`;`, `%2F`, `..;`).
            recorder.event.message = Some(e.to_string());
            recorder.event.request.path = Some(truncate(req.uri().path()));
            return deny(recorder, Reason::RequestBadPath);
        }
    };
    recorder.event.request.path = Some(path.to_string());
    let announced = head
        .content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > cfg.gateway.max_body_size) {
        return deny(recorder, Reason::RequestBodyTooLarge);
    }

    // Stage: route.
    let Some(ri) = state.router.find(host, req.method().as_str(), &path) else {
        return deny(recorder, Reason::RouteNotFound);
    };
    let route = &cfg.routes[ri];
    recorder.route = Some(ri);
    recorder.event.request.route = Some(state.routes[ri].template.clone());
    recorder.event.request.route_name = Some(state.routes[ri].name.clone());

    // A blocked address is refused before anything looks at its credentials.
    let blocks = shared.blocks.load();
    if blocks.blocks_ip(ip) {
        recorder.event.decision.policy = Some("blocklist:ip".into());
        return deny(recorder, Reason::Blocked);
    }

    // Stages: identify, authorize, limit.
    let identity = match Identify::run(
        route,
        &state.routes[ri],
        cfg,
        req.headers(),
        req.uri().query(),
        &shared.keys.load(),
        recorder.conn.client_cert.as_deref(),
    )
    .await
    {
        Ok(id) => id,
        Err(reason) => {
            // A known key refused (expired, revoked, wrong secret): its id goes into the
            // record (an id is no secret), so refusals of one key can be found and counted.
            if matches!(
                reason,
                Reason::AuthnInvalidKey | Reason::AuthnExpiredKey | Reason::AuthnRevokedKey
            ) {
                let key_id = [
                    req.headers().get(&X_API_KEY),
                    req.headers().get(header::AUTHORIZATION),
                ]
                .into_iter()
                .flatten()
                .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
                .map(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                        .unwrap_or(v)
                        .trim()
                })
                .find_map(|c| apiwarden_core::apikey::parse(c).map(|k| k.key_id.to_string()));
                if key_id.is_some() {
                    recorder.event.identity.method = Some(AuthMethod::ApiKey.as_str());
                    recorder.event.identity.key_id = key_id;
                }
            }
            return deny(recorder, reason);
        }
    };
    // The identity moves into the event; the stages below read it from there.
    let consumer = identity.consumer_ref.as_ref().map(|c| c.get(cfg));
    let credential_header = identity.credential_header;
    let fields = &mut recorder.event.identity;
    fields.method = Some(identity.method.as_str());
    fields.consumer = identity.consumer;
    fields.key_id = identity.key_id;
    fields.subject = identity.subject;
    fields.scopes = identity.scopes;
    if let Some(kind) = blocks.blocks_identity(fields.key_id.as_deref(), fields.consumer.as_deref())
    {
        recorder.event.decision.policy = Some(format!("blocklist:{}", kind.as_str()));
        return deny(recorder, Reason::Blocked);
    }
    if let Err(reason) = Authorize::run(route, consumer, &recorder.event.identity.scopes, ip) {
        return deny(recorder, reason);
    }
    let subject = Subject {
        route: &state.routes[ri].name,
        ip,
        consumer: recorder.event.identity.consumer.as_deref(),
        key_id: recorder.event.identity.key_id.as_deref(),
        headers: req.headers(),
    };
    let rate_headers = match Limit::run(
        &state.routes[ri].limits,
        &shared.local_limits,
        state.redis.as_deref(),
        &subject,
        start,
    )
    .await
    {
        Ok(h) => h,
        Err((reason, policy, headers, Outcome::Deny)) => {
            recorder.event.decision.policy = Some(policy);
            let mut resp = deny(recorder, reason);
            if let Ok(r) = &mut resp {
                headers.apply(r.headers_mut());
            }
            return resp;
        }
        Err((reason, policy, headers, Outcome::Allow)) => {
            // Failing open: let the request through, and say in its record that its limits
            // were not checked.
            recorder.event.decision.reason = reason;
            recorder.event.decision.policy = Some(policy);
            headers
        }
    };

    // Stage: record before forwarding. `strict`: nothing reaches the upstream before the
    // request's record is durable (concurrent requests share one fdatasync); the outcome is a
    // second record when the response ends. In every mode, a ledger that cannot write refuses
    // the request unless the route fails open.
    let strict = shared.strict;
    let fail_closed = route.audit_failure == apiwarden_core::config::FailureMode::Closed;
    if fail_closed && !shared.sink.healthy() {
        // The ledger cannot write, or its writer is stuck (a disk that hangs): refused at
        // once, in `strict` too, rather than after `audit.strict_timeout`.
        let mut resp = deny(recorder, Reason::AuditUnavailable);
        if let Ok(r) = &mut resp {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return resp;
    }
    if strict {
        // The received record is the event as it stands now, marked as such: encoded from it
        // in place, without a copy. The outcome's record takes the mark off
        // (`RecorderParts::finish`, the one place a request's event is recorded).
        recorder.event.phase = Some("received");
        let durable = shared.sink.record_durable(&recorder.event);
        // Bounded: a ledger disk that hangs must not hold requests without end. The record
        // stays queued, and is written when the disk answers. Counted from here, not from the
        // request's start: slow identification (a token introspected) is not the ledger's.
        let wait = crate::wakeups::deadline(Instant::now() + state.config.audit.strict_timeout);
        let answer = tokio::select! {
            biased;
            r = durable => r.ok().and_then(Result::ok),
            () = wait => None,
        };
        match answer {
            Some(seq) => recorder.event.received_seq = Some(seq),
            _ if fail_closed => {
                let mut resp = deny(recorder, Reason::AuditUnavailable);
                if let Ok(r) = &mut resp {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                return resp;
            }
            _ => {}
        }
    }

    // Stage: forward. The normalised path is passed on only when it differs from the request's.
    let normalized = match path {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    // The credential has done its work here: it is not passed on, so no upstream (or its
    // logs) ever holds a client's key or token (as Envoy's `forward: false`, its default).
    // The identify stage named the header it came in (an `X-API-Key`, when present, was it).
    if let Some(h) = credential_header {
        let headers = req.headers_mut();
        if h == X_API_KEY {
            // A second credential in `Authorization` does not go on either, as it was never
            // checked: a key, or on a route that takes tokens any bearer token (an upstream
            // reading its claims would trust a forgery). Other schemes (`Basic` for the
            // upstream's own login) go on.
            let takes_tokens = route
                .auth
                .iter()
                .any(|m| matches!(m, AuthMethod::Jwt | AuthMethod::Introspection));
            let unchecked = headers.get_all(header::AUTHORIZATION).iter().any(|v| {
                v.as_bytes()
                    .split_at_checked(7)
                    .is_some_and(|(scheme, token)| {
                        scheme.eq_ignore_ascii_case(b"bearer ")
                            && (takes_tokens || token.trim_ascii().starts_with(b"aw_"))
                    })
            });
            if unchecked {
                headers.remove(header::AUTHORIZATION);
            }
        }
        headers.remove(h);
    }
    // On a route that takes keys from the query, the parameter never goes on, whichever
    // credential was used.
    if let Some(name) = route.api_key_query.as_deref() {
        if req.uri().query().is_some() {
            let uri = without_query_param(req.uri(), name);
            *req.uri_mut() = uri;
        }
    }
    let upstream = &state.upstreams[route.upstream];
    // A refusal after the body began is answered with `Connection: close` on HTTP/1.1 (the
    // rest of the body is never read).
    let http1 = req.version() < Version::HTTP_2;
    let forwarded = Forward::run(
        upstream,
        req,
        normalized.as_deref(),
        trusted_peer,
        &rid,
        cfg.gateway.max_body_size,
        &mut recorder,
    )
    .await;
    let Forwarded {
        response,
        lease,
        request_body,
        on_upgrade,
    } = match forwarded {
        Ok(f) => f,
        Err(Reason::RequestBodyTooLarge) => return deny(recorder, Reason::RequestBodyTooLarge),
        Err(Reason::RequestBodyTimeout) => {
            return closing(deny(recorder, Reason::RequestBodyTimeout), http1)
        }
        Err(reason) => {
            recorder.event.error = Some(reason);
            return respond_with(recorder, reason, &rid);
        }
    };
    recorder.request_body = request_body;
    let (mut parts, body) = response.into_parts();
    recorder.event.response.status = parts.status.as_u16();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS && on_upgrade.is_some();
    strip_hop_by_hop(&mut parts.headers, upgraded);
    parts.headers.insert(X_REQUEST_ID, rid);
    rate_headers.apply(&mut parts.headers);

    // Stage: record. An upgrade is recorded when its tunnel closes; anything else when the
    // response body ends.
    if let (true, Some(client_upgrade)) = (upgraded, on_upgrade) {
        // The connection now belongs to the tunnel; it never returns to the pool.
        drop((body, lease));
        let Some(upstream_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            recorder.event.error = Some(Reason::UpstreamError);
            return Ok(Response::from_parts(
                parts,
                ResponseBody::full(bytes::Bytes::new()).with_recorder(recorder),
            ));
        };
        recorder.event.request.upgrade = parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, recorder));
        return Ok(Response::from_parts(
            parts,
            ResponseBody::full(bytes::Bytes::new()),
        ));
    }
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream(body, lease).with_recorder(recorder),
    ))
}

/// The error response for `reason`, carrying the recorder to its end.
fn respond_with(
    mut recorder: Recorder,
    reason: Reason,
    rid: &HeaderValue,
) -> Result<Response<ResponseBody>, Infallible> {
    let resp = error_response(reason, rid);
    recorder.event.response.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, body.with_recorder(recorder)))
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut recorder: Recorder,
) {
    // Which side failed is what the event says: a client that left before the `101` reached
    // it, or an upstream connection that broke.
    let client = async { client.await.map_err(|_| Reason::ClientDisconnected) };
    let upstream = async { upstream.await.map_err(|_| Reason::UpstreamError) };
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = Counted::new(TokioIo::new(c));
            let mut u = Counted::new(TokioIo::new(u));
            let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
            // A tunnel on a connection with a client certificate is checked once a second as
            // a request would be (expiry, a new client CA), and closed when it fails.
            let conn = recorder.conn.clone();
            let refused = async {
                match &conn.cert_check {
                    Some(check) => {
                        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                        loop {
                            tick.tick().await;
                            if let Err(why) = check.check(std::time::SystemTime::now()) {
                                return why;
                            }
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let error = tokio::select! {
                r = copy => r.err().map(|_| {
                    if u.failed && !c.failed {
                        Reason::UpstreamError
                    } else {
                        Reason::ClientDisconnected
                    }
                }),
                why = refused => {
                    recorder.event.message = Some(why);
                    Some(Reason::AuthnCertificateInvalid)
                }
            };
            // What went each way, however the tunnel ended.
            recorder.event.request.bytes = c.read;
            recorder.finish(u.read, error);
        }
        Err(reason) => recorder.finish(0, Some(reason)),
    }
}

/// An answer after which an HTTP/1.1 connection closes (`Connection: close`; HTTP/2 has no
/// such header: its connection is asked to close with GOAWAY instead).
fn closing(
    mut resp: Result<Response<ResponseBody>, Infallible>,
    http1: bool,
) -> Result<Response<ResponseBody>, Infallible> {
    if let (true, Ok(r)) = (http1, &mut resp) {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// One side of a tunnel, counting the bytes read from it (the copy reports its totals only
/// when it ends without an error, and not at all when it is stopped), and noting whether it
/// failed (the copy's error does not say which side's it was).
struct Counted<T> {
    inner: T,
    read: u64,
    failed: bool,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Counted {
            inner,
            read: 0,
            failed: false,
        }
    }

    fn note<R>(
        &mut self,
        polled: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        if let std::task::Poll::Ready(Err(_)) = &polled {
            self.failed = true;
        }
        polled
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            self.read += (buf.filled().len() - before) as u64;
        }
        self.note(polled)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(polled)
    }
}

pub(crate) fn truncate(s: &str) -> String {
    let mut end = s.len().min(1024);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Records a request that never reached the pipeline because the HTTP parser refused it
/// (hyper answered it with `400` or `431` itself).
pub fn record_unparsed(shared: &Shared, conn: &ConnInfo, reason: Reason) {
    record_refused(shared, conn, reason, None);
}

/// Records the streams of an HTTP/2 connection that never became requests (see `h2watch`):
/// one event when the connection ends, whose `message` says how many and why.
pub(crate) fn record_h2_refused(shared: &Shared, conn: &ConnInfo, summary: String) {
    record_refused(shared, conn, Reason::RequestMalformed, Some(summary));
}

/// The event of something the protocol layer refused before a request existed: the
/// connection's client and TLS, the refusal, no route.
fn record_refused(shared: &Shared, conn: &ConnInfo, reason: Reason, message: Option<String>) {
    let mut e = AuditEvent::new(EventKind::Request, new_id(), shared.node.clone());
    e.request_id = Some(new_id());
    e.client.ip = Some(conn.peer.ip());
    e.tls.version = conn.tls_version;
    e.tls.client_subject = conn.client_cert.as_ref().map(|c| c.subject.clone());
    e.decision.outcome = Outcome::Deny;
    e.decision.reason = reason;
    e.response.status = crate::respond::status_and_message(reason).0.as_u16();
    e.message = message;
    shared.metrics.unrouted.count(e.response.status, true);
    shared.record(Box::new(e));
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_untrusted_forwarding_header_is_found() {
        for name in &UNTRUSTED_FORWARDING {
            assert!(is_untrusted_forwarding(name), "{name}");
        }
        assert!(!is_untrusted_forwarding(&header::HOST));
        assert!(!is_untrusted_forwarding(&X_FORWARDED_FOR));
    }
    use super::*;

    #[test]
    fn methods_are_named_as_sent() {
        assert!(matches!(
            method_name(&hyper::Method::GET),
            std::borrow::Cow::Borrowed("GET")
        ));
        assert_eq!(method_name(&hyper::Method::PATCH), "PATCH");
        let purge = hyper::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method_name(&purge), "PURGE");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("traceparent"));

        // Every hop-by-hop header goes, whichever of them a message carries.
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name} was kept: {h:?}");
            assert!(h.contains_key("x-kept"));
        }
    }

    #[test]
    fn client_ip_trusts_forwarded_for_only_from_trusted_proxies() {
        let text = "[gateway]\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
        let cfg = apiwarden_core::config::parse(text, "t.toml").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 203.0.113.9, 10.0.0.2"),
        );
        let ip = |peer: &str| client_ip(&cfg, peer.parse().unwrap(), &h);
        assert_eq!(ip("10.0.0.1"), ("203.0.113.9".parse().unwrap(), true));
        assert_eq!(ip("192.0.2.1"), ("192.0.2.1".parse().unwrap(), false));
        // IPv4 clients of a dual-stack listener are their IPv4 address (so `audit search
        // --ip 192.0.2.1` finds them), trusted proxies too.
        assert_eq!(
            ip("::ffff:192.0.2.1"),
            ("192.0.2.1".parse().unwrap(), false)
        );
        assert_eq!(
            ip("::ffff:10.0.0.1"),
            ("203.0.113.9".parse().unwrap(), true)
        );
    }
}
