//! The configuration: parsed and validated in two stages, every error reported at once with
//! file, line and column.
//!
//! Stage one deserialises the TOML into plain serde types (`raw.rs`, unknown keys rejected);
//! stage two (`validate.rs`) turns them into the types below, which the rest of apiwarden uses.
//! Nothing here reads files: the caller passes the text and the file name.

mod raw;
mod spans;
mod validate;

use crate::net::IpNet;
use crate::path::{EncodedSlashes, PathParameters};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use validate::{fetch_url, parse};

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// All the problems found in one configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
    pub storage: StorageConfig,
    pub audit: AuditConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub limits: BTreeMap<String, LimitConfig>,
    pub consumers: Vec<ConsumerConfig>,
    /// Token issuers (`[jwt.NAME]`) that `auth = ["jwt"]` routes accept.
    pub jwt: BTreeMap<String, JwtConfig>,
    /// Token introspection endpoints (`[introspection.NAME]`) that `auth = ["introspection"]`
    /// routes ask about opaque bearer tokens.
    pub introspection: BTreeMap<String, IntrospectionConfig>,
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_size: u64,
    pub max_header_size: usize,
    pub encoded_slashes: EncodedSlashes,
    pub path_parameters: PathParameters,
    pub shutdown_timeout: Duration,
    /// An HTTP/1.1 connection with no request in flight is closed once no whole request
    /// head has come for this long: the keep-alive idle time and a slow request head alike.
    pub idle_timeout: Duration,
    /// The longest pause between two parts of a request body (nginx's
    /// `client_body_timeout`); a longer one fails the request with `408`.
    pub body_timeout: Duration,
    /// This node's name in audit events; `None` lets the binary pick the host name.
    pub node: Option<String>,
    /// Runtime worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
    /// Client connections open at once (TLS handshakes included); more are closed at accept.
    pub max_connections: usize,
    /// Accept HTTP/2 with prior knowledge on a plain-TCP listener.
    pub h2c: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Whether a client without a certificate may complete the handshake.
    pub client_auth: ClientAuth,
    pub reload_interval: Duration,
}

/// `gateway.tls.client_auth`: what the handshake asks of a client when `client_ca` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client may connect without a certificate; a certificate it sends must verify.
    #[default]
    Optional,
    /// The handshake fails without a certificate that verifies against `client_ca`.
    Required,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Tokens of the admin API (`[admin.tokens.NAME]`); none: the API answers `401`.
    pub tokens: Vec<AdminToken>,
}

/// What an admin token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRole {
    /// Read and write.
    Admin,
    /// Read only.
    Auditor,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Admin => "admin",
            AdminRole::Auditor => "auditor",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminToken {
    /// Recorded as the actor of admin events (`admin-token:NAME`).
    pub name: String,
    pub role: AdminRole,
    pub secret: SecretSource,
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub database: Option<String>,
    pub redis: Option<String>,
    /// Prefix of every Redis key apiwarden writes (`PREFIX:rl:...`, `PREFIX:blocks`).
    pub redis_prefix: String,
    /// How long one Redis round trip may take before it counts as a failure.
    pub redis_timeout: Duration,
    /// The most keys the local limit store tracks at once.
    pub limit_keys: u64,
    /// Where the API key pepper comes from.
    pub pepper: SecretSource,
    /// `keys list` warns about keys older than this.
    pub key_max_age: Duration,
    /// `keys list` warns about keys unused for this long.
    pub key_unused_after: Duration,
}

/// Where a secret the config needs comes from: never the config file itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// `env:NAME`
    Env(String),
    /// `file:PATH` (relative to the config file)
    File(PathBuf),
    /// `file:<data_dir>/pepper`, created with a random value on first use.
    Generated(PathBuf),
}

/// When an audit record must be on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Strict,
    Batched,
    Async,
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub durability: Durability,
    /// `strict`: the longest a request waits for its record to be durable.
    pub strict_timeout: Duration,
    pub checkpoint_interval: Duration,
    /// A second directory the latest checkpoint is copied to.
    pub checkpoint_copy: Option<PathBuf>,
    /// Request headers recorded as HMAC-SHA256 under the ledger's salt (lower case).
    pub hmac_headers: Vec<String>,
    /// Query parameters whose values are recorded as HMAC-SHA256 instead of `REDACTED`.
    pub hmac_query: Vec<String>,
    /// The master key that wraps the ledger's data keys (encryption at rest), if any.
    pub encryption_key: Option<SecretSource>,
    /// A segment is sealed and a new one begun past this size.
    pub segment_size: u64,
    /// A segment older than this is sealed and a new one begun, even if small.
    pub segment_max_age: Duration,
    /// Sealed segments whose last write is older than this are deleted (once covered by a
    /// checkpoint and exported); `None` keeps everything.
    pub retention: Option<Duration>,
    /// Export cursors (`<data_dir>/ledger/cursors/NAME`) that must have passed a segment's
    /// last record before retention deletes it.
    pub retention_requires_export: Vec<String>,
}

/// One upstream target: `http://host:port` with an optional base path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host:port`, as sent in the `Host` header to the upstream.
    pub authority: String,
    /// Prefixed to every forwarded path; empty for none.
    pub base_path: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub cooldown: Duration,
    /// Idle keep-alive connections kept per target and worker thread; more are closed.
    pub max_idle: usize,
    /// An idle keep-alive connection unused for this long is closed.
    pub idle_timeout: Duration,
}

/// How a route matches the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// Exact host name, lower case, without port.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (stored with the leading dot).
    Suffix(String),
}

/// How a route matches the normalised path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Matches the prefix itself and anything below it at a segment boundary.
    Prefix(String),
    /// `/orders/{id}`: each `{name}` matches one non-empty segment.
    Template(Vec<TemplateSegment>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSegment {
    Literal(String),
    Param(String),
}

/// An authentication method a route accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    None,
    ApiKey,
    Jwt,
    Introspection,
    Mtls,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Introspection => "introspection",
            AuthMethod::Mtls => "mtls",
        }
    }
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    /// The path as written (`/orders/{id}`), recorded as `request.route`.
    pub path_text: String,
    /// Upper-case method names; `None` matches every method.
    pub methods: Option<Vec<String>>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub auth: Vec<AuthMethod>,
    pub scopes: Vec<String>,
    /// Roles the caller's consumer must all hold.
    pub roles: Vec<String>,
    pub limits: Vec<String>,
    /// The `[jwt.NAME]` issuer whose tokens the route accepts (set when `auth` has `jwt`).
    pub jwt: Option<String>,
    /// The `[introspection.NAME]` endpoint that checks the route's opaque tokens (set when
    /// `auth` has `introspection`).
    pub introspection: Option<String>,
    /// The query parameter an API key may come in (off unless set).
    pub api_key_query: Option<String>,
    /// What the route does while the audit ledger cannot record: refuse (`Closed`, the
    /// default) or serve unrecorded-for-now (`Open`).
    pub audit_failure: FailureMode,
}

/// What a rate limit is counted by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKey {
    Consumer,
    Key,
    Ip,
    Route,
    Header(String),
}

impl LimitKey {
    /// The name as written in the config.
    pub fn name(&self) -> String {
        match self {
            LimitKey::Consumer => "consumer".into(),
            LimitKey::Key => "key".into(),
            LimitKey::Ip => "ip".into(),
            LimitKey::Route => "route".into(),
            LimitKey::Header(h) => format!("header:{h}"),
        }
    }
}

/// Where a limit's state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitStore {
    /// In this process: exact for one node.
    Local,
    /// In Redis (`storage.redis`): one budget shared by every node.
    Redis,
}

/// What a Redis-backed limit does when Redis cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Let the request through (and record that the limit was not checked).
    Open,
    /// Refuse the request with `503`.
    Closed,
}

#[derive(Clone, Debug)]
pub struct LimitConfig {
    /// Requests allowed per `per`.
    pub requests: u64,
    pub per: Duration,
    /// Requests that may arrive at once after an idle period (at least 1).
    pub burst: u64,
    /// What is counted; several parts make one compound key (`["consumer", "route"]`).
    pub key: Vec<LimitKey>,
    pub store: LimitStore,
    pub failure_mode: FailureMode,
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerConfig {
    pub name: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// When set, the consumer's credentials are accepted only from these networks.
    pub allow_ips: Option<Vec<IpNet>>,
    /// Names (a SAN: DNS name, URI or e-mail, or the subject's CN) that identify the consumer
    /// in a verified client certificate.
    pub certificate_names: Vec<String>,
    /// Free-form labels (team, owner, ticket), shown by `consumers list` and the admin API.
    pub metadata: BTreeMap<String, String>,
    /// The `[jwt.NAME]` / `[introspection.NAME]` tables whose tokens, when their client
    /// (`client_id` or `azp`) has this consumer's name, act as this consumer.
    pub token_issuers: Vec<String>,
}

/// A JWS signature algorithm apiwarden verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JwtAlg {
    Rs256,
    Ps256,
    Es256,
    EdDsa,
    Hs256,
}

impl JwtAlg {
    /// Every algorithm, by its JOSE name.
    pub const ALL: [JwtAlg; 5] = [
        JwtAlg::Rs256,
        JwtAlg::Ps256,
        JwtAlg::Es256,
        JwtAlg::EdDsa,
        JwtAlg::Hs256,
    ];

    /// The `alg` value of a JOSE header.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Ps256 => "PS256",
            JwtAlg::Es256 => "ES256",
            JwtAlg::EdDsa => "EdDSA",
            JwtAlg::Hs256 => "HS256",
        }
    }

    /// Parses a JOSE `alg` value (exact, case-sensitive, as RFC 7515 says).
    pub fn parse(s: &str) -> Option<JwtAlg> {
        JwtAlg::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Where an issuer's verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtKeySource {
    /// `{issuer}/.well-known/openid-configuration` names the JWKS.
    Discovery,
    /// A JWKS URL given directly.
    JwksUrl(String),
    /// An HS256 shared secret (the only way HS256 is ever accepted).
    Secret(SecretSource),
}

/// A token issuer: `[jwt.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtConfig {
    /// The exact `iss` every token must carry.
    pub issuer: String,
    pub keys: JwtKeySource,
    /// A token's `aud` must name at least one of these.
    pub audiences: Vec<String>,
    pub algorithms: Vec<JwtAlg>,
    /// Allowed clock difference for `exp` and `nbf`.
    pub leeway: Duration,
    /// Keys older than this are fetched again in the background.
    pub refresh: Duration,
    /// At most one fetch per this interval, however many unknown `kid`s arrive.
    pub min_refresh: Duration,
    /// Bound on one discovery or JWKS fetch.
    pub timeout: Duration,
    /// Extra CA certificate (PEM) trusted for the issuer's HTTPS endpoints.
    pub ca: Option<PathBuf>,
}

/// An OAuth 2.0 token introspection endpoint (RFC 7662): `[introspection.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntrospectionConfig {
    /// The endpoint, `https://` (plain `http://` only on loopback).
    pub url: String,
    /// The gateway's client id at the authorization server (HTTP Basic, `client_secret_basic`).
    pub client_id: String,
    pub client_secret: SecretSource,
    /// When not empty, an active token's `aud` must name one of these.
    pub audiences: Vec<String>,
    /// When set, an active token's `iss` must be exactly this.
    pub issuer: Option<String>,
    /// The longest a positive answer is reused (never past the token's `exp`).
    pub cache_ttl: Duration,
    /// How long an inactive (or refused) token is remembered.
    pub negative_cache_ttl: Duration,
    /// Bound on one introspection call.
    pub timeout: Duration,
    /// Extra CA certificate (PEM) trusted for the endpoint.
    pub ca: Option<PathBuf>,
}

/// A URL with any `user:password@` part replaced by `***@`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// One documented option: the README's configuration reference is generated from this table,
/// and a test checks that every example value here is accepted.
pub struct OptionDoc {
    /// `section.key`; `[[upstreams]]` and `[[routes]]` entries are written `upstreams[].key`.
    pub key: &'static str,
    pub default: &'static str,
    /// A valid TOML value for the key.
    pub example: &'static str,
    pub doc: &'static str,
}

/// Every configuration option.
pub const REFERENCE: &[OptionDoc] = &[
    OptionDoc { key: "gateway.listen", default: "\"127.0.0.1:8080\"", example: "\"127.0.0.1:8080\"", doc: "Address of the API listener." },
    OptionDoc { key: "gateway.tls", default: "none (plain HTTP)", example: "{ cert = \"server.pem\", key = \"server.key\", client_ca = \"clients-ca.pem\", client_auth = \"optional\" }", doc: "TLS termination: `cert` and `key` are PEM files (paths relative to the config file); `client_ca` (mTLS) is a PEM file of one or more CA certificates that client certificates are verified against; `client_auth` (with `client_ca` only) is `\"optional\"` (the default: a client may connect without a certificate and use the routes that do not need one) or `\"required\"` (the handshake fails without a valid certificate); `reload_interval` (default `\"5s\"`) is how often the files (the client CA's too) are checked for changes. TLS 1.2 and 1.3 only; ALPN offers `h2` and `http/1.1`." },
    OptionDoc { key: "gateway.trusted_proxies", default: "[]", example: "[\"10.0.0.0/8\", \"127.0.0.1\"]", doc: "Peers (addresses or CIDR networks) whose `X-Forwarded-For` is believed. The client IP is the right-most address in `X-Forwarded-For` that is not a trusted proxy; from any other peer the header is ignored for the client IP." },
    OptionDoc { key: "gateway.max_body_size", default: "\"10MiB\"", example: "\"1GiB\"", doc: "Largest request body accepted; larger ones get `413`, whether announced by `Content-Length` or found while streaming." },
    OptionDoc { key: "gateway.max_header_size", default: "\"32KiB\"", example: "\"64KiB\"", doc: "Largest request head (request line and all header lines) accepted; larger ones get `431`." },
    OptionDoc { key: "gateway.encoded_slashes", default: "\"reject\"", example: "\"keep\"", doc: "`reject`: a path with `%2F` or `%5C` gets `400`. `keep`: they stay encoded inside their segment and never separate segments for routing." },
    OptionDoc { key: "gateway.path_parameters", default: "\"reject\"", example: "\"keep\"", doc: "`reject`: a path with a path parameter (a raw `;`, as in `/admin;x`) gets `400`, since Tomcat, Jetty and Spring cut `;...` off a segment before matching. `keep`: `;...` stays part of its segment, for routing too; a dot segment with one (`..;`) is still refused." },
    OptionDoc { key: "gateway.shutdown_timeout", default: "\"30s\"", example: "\"10s\"", doc: "On SIGTERM or Ctrl-C, how long requests in flight may take to finish." },
    OptionDoc { key: "gateway.idle_timeout", default: "\"30s\"", example: "\"75s\"", doc: "An HTTP/1.1 connection with no request in flight is closed when no whole request head has arrived for this long: it bounds both the time a kept-alive connection may sit idle and the time a request head may take to arrive (slow-header attacks). Checked once a second (a connection may stay up to 2 s longer, never shorter), so at least `\"1s\"`. An HTTP/2 (or h2c) connection with no stream open for this long is asked to close with GOAWAY, and its socket is shut down if it is still open one `idle_timeout` later (a client that never sent its preface, or ignores GOAWAY)." },
    OptionDoc { key: "gateway.body_timeout", default: "\"60s\"", example: "\"20s\"", doc: "The longest pause between two parts of a request body (as nginx's `client_body_timeout`). A client that stops sending in the middle of a body gets `408` `request.body_timeout` (if the upstream has not answered yet; otherwise the event's `error` says so), and the upstream connection that carried the body is closed. It bounds pauses, not the whole upload." },
    OptionDoc { key: "gateway.node", default: "the host name", example: "\"gw-1\"", doc: "This node's name in audit events." },
    OptionDoc { key: "gateway.worker_threads", default: "one per core", example: "2", doc: "Worker threads, each with its own event loop, connections and upstream pools (read at start only)." },
    OptionDoc { key: "gateway.max_connections", default: "10000", example: "50000", doc: "Client connections open at once, TLS handshakes included (as nginx's `worker_connections`, but for the whole gateway). A connection beyond it is closed as soon as it is accepted, logged (at most once a second) and counted in `apiwarden_connections_refused_total`; the admin listener does not count. An HTTP/1.1 connection takes two file descriptors (a second handle serves the idle check) and may hold an upstream connection too, and pools keep up to `max_idle` per target and worker besides: keep it below a third of the process's open-file limit (`ulimit -n`). A WebSocket tunnel counts until it closes." },
    OptionDoc { key: "gateway.h2c", default: "false", example: "true", doc: "Plain-TCP listener only: also accept HTTP/2 with prior knowledge (h2c). Over TLS, HTTP/2 is always offered through ALPN." },
    OptionDoc { key: "admin.listen", default: "\"127.0.0.1:9090\"", example: "\"127.0.0.1:9090\"", doc: "Address of the admin listener (`/healthz`, `/readyz`, `/metrics`)." },
    OptionDoc { key: "admin.tokens.NAME.role", default: "required", example: "\"auditor\"", doc: "`admin` (read and write) or `auditor` (read only) for the admin API (`/admin/v1/...`). The token's name is the actor of its audit events (`admin-token:NAME`)." },
    OptionDoc { key: "admin.tokens.NAME.secret", default: "required", example: "\"env:APIWARDEN_AUDITOR_TOKEN\"", doc: "The bearer token: `env:NAME` or `file:PATH`, read at each request (so it can be replaced without a reload), at least 32 bytes." },
    OptionDoc { key: "storage.data_dir", default: "\"./apiwarden-data\"", example: "\"/var/lib/apiwarden\"", doc: "Where audit records and local state live (relative to the config file)." },
    OptionDoc { key: "storage.database", default: "none", example: "\"postgres://postgres@127.0.0.1/test\"", doc: "Fleet mode: PostgreSQL for shared consumers and keys (used by the identity stage)." },
    OptionDoc { key: "storage.redis", default: "none", example: "\"redis://127.0.0.1/\"", doc: "Fleet mode: Redis for limits shared by every node and for the block list. Limits use it unless they say `store = \"local\"`." },
    OptionDoc { key: "storage.redis_prefix", default: "\"apiwarden\"", example: "\"gw-eu\"", doc: "Prefix of every Redis key apiwarden writes; fleets that must not share budgets use different prefixes." },
    OptionDoc { key: "storage.redis_timeout", default: "\"100ms\"", example: "\"50ms\"", doc: "How long one Redis round trip may take; past it the limit's `failure_mode` applies." },
    OptionDoc { key: "storage.limit_keys", default: "1000000", example: "100000", doc: "The most keys (clients, IPs, ...) the local limit store tracks at once, over all limits. When full, idle keys are dropped first (an idle key has its full budget, so nothing is lost); only then the key closest to a full budget." },
    OptionDoc { key: "storage.pepper", default: "a random pepper in `<data_dir>/pepper`, made on first use", example: "\"env:APIWARDEN_PEPPER\"", doc: "The server-side secret API keys are hashed with (HMAC-SHA256): `env:NAME` or `file:PATH`, never the value itself. Every node of a fleet needs the same one. Changing it invalidates every key." },
    OptionDoc { key: "storage.key_max_age", default: "\"90d\"", example: "\"30d\"", doc: "`keys list` warns about keys older than this (rotate them)." },
    OptionDoc { key: "storage.key_unused_after", default: "\"30d\"", example: "\"14d\"", doc: "`keys list` warns about keys not used for this long (revoke them)." },
    OptionDoc { key: "audit.durability", default: "\"strict\"", example: "\"batched\"", doc: "`strict`, `batched` or `async`: when an audit record must be on disk (enforced by the ledger)." },
    OptionDoc { key: "audit.strict_timeout", default: "\"5s\"", example: "\"2s\"", doc: "`strict`: the longest a request waits for its record to be durable. Past it (a ledger disk that hangs) the request is answered as when the ledger cannot write: `503 audit.unavailable` on a route that fails closed, forwarded on one that fails open. Checked every 50 ms." },
    OptionDoc { key: "audit.checkpoint_interval", default: "\"1s\"", example: "\"5s\"", doc: "How often the ledger writes a signed checkpoint (C2SP signed note: origin, size, Merkle root, time), also when nothing happened, so a quiet period is provably quiet." },
    OptionDoc { key: "audit.hmac_headers", default: "[]", example: "[\"x-customer-id\"]", doc: "Request headers recorded as `hmac:<hex>` (HMAC-SHA256 under the ledger's salt, `<data_dir>/ledger/salt`) in `request.headers_hmac`: equal values correlate, the values are not stored. `apiwarden audit hash VALUE` computes the same to search for a known value. `Authorization`, `Cookie`, `X-API-Key` and `Proxy-Authorization` are never recorded, hashed or not." },
    OptionDoc { key: "audit.hmac_query", default: "[]", example: "[\"email\"]", doc: "Query parameters whose values are recorded as `hmac:<hex>` instead of `REDACTED` (the value as sent, percent-encoding included). Credentials are refused: a route's `api_key_query`, `access_token`, `id_token`, `refresh_token`, `client_secret`, `api_key`, `apikey`, `password`, `passwd`." },
    OptionDoc { key: "audit.encryption_key", default: "none (records stored in the clear)", example: "\"file:/etc/apiwarden/ledger.key\"", doc: "Encryption at rest: `file:PATH` or `env:NAME` holding a 32-byte master key (raw, or 64 hex digits). Each record is sealed with AES-256-GCM under a data key (a new one each start) that this key wraps. `audit verify` needs no key (the Merkle tree covers the sealed bytes); `audit search`, `audit export` and `access review` do. Rotate the master key with `apiwarden audit rewrap --new-key FILE`." },
    OptionDoc { key: "audit.checkpoint_copy", default: "none", example: "\"/mnt/audit-copies/gw-1\"", doc: "A second directory (another disk, a mounted share) the latest checkpoint is copied to, so cutting the tail of the ledger or rolling it back is detectable: `apiwarden audit verify --from-checkpoint DIR/checkpoint`." },
    OptionDoc { key: "audit.segment_size", default: "\"64MiB\"", example: "\"256MiB\"", doc: "The ledger's segments (`<data_dir>/ledger/segments/*.seg`) are sealed and a new one begun once they reach this size (at least 1 KiB, at most 2 GiB: the search index keeps 32-bit offsets). A sealed segment is never written again; retention deletes whole sealed segments." },
    OptionDoc { key: "audit.segment_max_age", default: "\"1d\"", example: "\"6h\"", doc: "A segment holding records for longer than this is sealed and a new one begun even if it is small, so that retention can delete by age on a quiet node." },
    OptionDoc { key: "audit.retention", default: "none (keep forever)", example: "\"90d\"", doc: "Delete sealed segments closed longer ago than this (by their signed seal's time; a segment of an older version, sealed at a start, counts from that start): only the oldest ones (a prefix of the ledger, never the segment being written), only when a signed checkpoint covers every record in them (and, with `audit.checkpoint_copy`, was copied there), and only when every cursor of `audit.retention_requires_export` has passed them. Before deleting, a signed retention anchor (`<data_dir>/ledger/retention`: the tree size, root, chain head and Merkle frontier at the boundary) is written, so `audit verify` checks the rest from there; each deletion is recorded as a `system` event (`decision.reason = ledger.retention`) naming the records, segments and bytes deleted." },
    OptionDoc { key: "audit.retention_requires_export", default: "[]", example: "[\"siem\"]", doc: "Export cursor names (`apiwarden audit export --cursor NAME`): retention deletes a segment only when every named cursor file `<data_dir>/ledger/cursors/NAME` holds a sequence number at or past the segment's last record (a missing cursor, or one past the ledger's last record, means nothing was exported, so nothing is deleted)." },
    OptionDoc { key: "upstreams[].name", default: "required", example: "\"orders\"", doc: "Name that routes refer to; unique." },
    OptionDoc { key: "upstreams[].url", default: "required unless `targets`", example: "\"http://127.0.0.1:3000\"", doc: "One target: `http://host:port` with an optional base path that is put before every forwarded path." },
    OptionDoc { key: "upstreams[].targets", default: "none", example: "[\"http://127.0.0.1:3000\", \"http://127.0.0.1:3001\"]", doc: "Several targets instead of `url`: round-robin, and a target that fails `failure_threshold` times in a row is skipped for `cooldown`." },
    OptionDoc { key: "upstreams[].connect_timeout", default: "\"5s\"", example: "\"1s\"", doc: "Time to open a connection to a target; past it the request gets `502`." },
    OptionDoc { key: "upstreams[].timeout", default: "\"30s\"", example: "\"10s\"", doc: "Time from sending the request on a connection (from the end of its body, if it has one) until the response head arrives; also the longest the upstream may leave a part of the request body untaken (nginx's `proxy_send_timeout`). Past it the request gets `504`. Getting a connection is bounded by `connect_timeout`, not this. Checked every 50 ms: the `504` comes up to 50 ms after the timeout, never before." },
    OptionDoc { key: "upstreams[].failure_threshold", default: "5", example: "3", doc: "Consecutive connect errors or timeouts after which a target is skipped." },
    OptionDoc { key: "upstreams[].cooldown", default: "\"10s\"", example: "\"30s\"", doc: "How long a failed target is skipped (if all are failing, the least recently failed one is tried)." },
    OptionDoc { key: "upstreams[].max_idle", default: "128", example: "32", doc: "Idle keep-alive connections kept per target and worker thread (as nginx's `keepalive`); when more come back from a burst, the least recently used is closed. `0` keeps none (a new connection per request)." },
    OptionDoc { key: "upstreams[].idle_timeout", default: "\"60s\"", example: "\"30s\"", doc: "An idle keep-alive connection to a target unused for this long is closed: checked once a second, so between `idle_timeout` and 2 s later (never sooner), and at least `\"1s\"`. Set it at least 2 s below the upstream's own keep-alive timeout (Node.js: 5 s, gunicorn: 2 s), so that the gateway closes first: a pooled connection the upstream has closed is passed over, but a close that crosses a request on its way fails that request with `502`." },
    OptionDoc { key: "routes[].name", default: "required", example: "\"orders-read\"", doc: "Name in audit events and metrics; unique." },
    OptionDoc { key: "routes[].host", default: "any host", example: "\"api.example.com\"", doc: "Exact host name or `*.example.com`; compared without the port, case-insensitively." },
    OptionDoc { key: "routes[].path", default: "one of `path`, `path_prefix`", example: "\"/orders/{id}\"", doc: "Exact path, or a template whose `{name}` segments match one segment each. The template is what audit events record as `request.route`." },
    OptionDoc { key: "routes[].path_prefix", default: "one of `path`, `path_prefix`", example: "\"/orders\"", doc: "Matches the prefix and everything below it, at a segment boundary (`/orders` matches `/orders/7`, not `/ordersX`)." },
    OptionDoc { key: "routes[].methods", default: "all methods", example: "[\"GET\", \"HEAD\"]", doc: "Methods the route accepts." },
    OptionDoc { key: "routes[].upstream", default: "required", example: "\"orders\"", doc: "Name of the upstream that receives the requests." },
    OptionDoc { key: "routes[].auth", default: "required", example: "[\"api_key\", \"jwt\", \"introspection\"]", doc: "Accepted methods: `api_key`, `jwt`, `introspection`, `mtls`, or `[\"none\"]` for an open route. A route without `auth` is an error, so an open route is always explicit." },
    OptionDoc { key: "routes[].scopes", default: "[]", example: "[\"orders:read\"]", doc: "Scopes the caller must all hold (not allowed with `none`)." },
    OptionDoc { key: "routes[].roles", default: "[]", example: "[\"operator\"]", doc: "Roles the caller's consumer must all hold (`consumers[].roles`); otherwise `403 authz.missing_role`. Not allowed with `none`." },
    OptionDoc { key: "routes[].limits", default: "[]", example: "[]", doc: "Names of `[limits.NAME]` tables applied to the route, in order." },
    OptionDoc { key: "routes[].jwt", default: "the only `[jwt.NAME]`, if there is one", example: "\"corp\"", doc: "With `auth = [\"jwt\"]`: the issuer whose tokens the route accepts." },
    OptionDoc { key: "routes[].audit_failure", default: "\"closed\"", example: "\"open\"", doc: "While the audit ledger cannot write (disk full, I/O error): `closed` answers `503 audit.unavailable` and forwards nothing; `open` serves the request (its record is kept in memory and written when the ledger can write again)." },
    OptionDoc { key: "routes[].api_key_query", default: "none (never from the query string)", example: "\"apikey\"", doc: "With `api_key` in `auth`: also accept the key from this query parameter when no header carries a credential (for clients that cannot set headers). The parameter is removed before forwarding and, like every query value, is `REDACTED` in audit events. Query strings end up in browser histories and proxy logs: prefer the headers." },
    OptionDoc { key: "routes[].introspection", default: "the only `[introspection.NAME]`, if there is one", example: "\"corp\"", doc: "With `auth = [\"introspection\"]`: the endpoint that checks the route's opaque bearer tokens." },
    OptionDoc { key: "limits.NAME.rate", default: "required", example: "\"100/s\"", doc: "Steady rate (GCRA, no window boundaries): `N/s`, `N/m`, `N/h`, `N/d`. A quota is a rate with a large burst: `rate = \"100000/d\"`." },
    OptionDoc { key: "limits.NAME.burst", default: "the rate's N", example: "20", doc: "Requests that may arrive at once after an idle period. Over any time T at most `burst + rate × T` requests are admitted. Refused requests use no budget." },
    OptionDoc { key: "limits.NAME.key", default: "\"ip\"", example: "[\"consumer\", \"route\"]", doc: "What is counted: `consumer`, `key`, `ip`, `route`, `header:NAME`, or a list of them for one compound key. Without an identity (an open route) `consumer` and `key` count by client IP, as does `header:NAME` when the header is absent." },
    OptionDoc { key: "limits.NAME.store", default: "`redis` if `storage.redis` is set, else `local`", example: "\"local\"", doc: "`local`: exact per node, in memory. `redis`: one budget shared by every node, decided atomically in Redis in one round trip." },
    OptionDoc { key: "limits.NAME.failure_mode", default: "\"open\"", example: "\"closed\"", doc: "Redis limits only, when Redis cannot answer in `storage.redis_timeout`: `open` lets requests through, `closed` refuses them with `503`. Either way the audit event says `ratelimit.unavailable`." },
    OptionDoc { key: "jwt.NAME.issuer", default: "required", example: "\"http://127.0.0.1:8081\"", doc: "The exact `iss` every token must carry (else `authn.wrong_issuer`). Without `jwks_url` or `secret`, keys are found by OIDC discovery at `{issuer}/.well-known/openid-configuration`." },
    OptionDoc { key: "jwt.NAME.jwks_url", default: "from discovery", example: "\"https://idp.example.com/keys\"", doc: "The issuer's JWKS. `https://` (plain `http://` only on loopback addresses). Keys are cached, fetched again after `refresh` in the background, and at once when a token names an unknown `kid` (at most once per `min_refresh`). If a fetch fails, the keys held stay in use." },
    OptionDoc { key: "jwt.NAME.secret", default: "none", example: "\"env:JWT_HS256_SECRET\"", doc: "HS256 only: the shared secret (`env:NAME` or `file:PATH`, at least 32 bytes). An issuer with `secret` accepts HS256 and nothing else; an issuer with public keys never accepts HS256." },
    OptionDoc { key: "jwt.NAME.audiences", default: "required", example: "[\"orders-api\"]", doc: "A token's `aud` must name one of these (else `authn.wrong_audience`)." },
    OptionDoc { key: "jwt.NAME.algorithms", default: "`[\"RS256\", \"PS256\", \"ES256\", \"EdDSA\"]`, or `[\"HS256\"]` with `secret`", example: "[\"ES256\"]", doc: "Accepted `alg` values. `none` is never accepted (`authn.alg_none`); an `alg` that does not fit the key named by `kid` is `authn.alg_confusion`." },
    OptionDoc { key: "jwt.NAME.leeway", default: "\"30s\"", example: "\"10s\"", doc: "Allowed clock difference when checking `exp` and `nbf` (at most 5m)." },
    OptionDoc { key: "jwt.NAME.refresh", default: "\"15m\"", example: "\"5m\"", doc: "Keys older than this are fetched again in the background (the request that notices does not wait)." },
    OptionDoc { key: "jwt.NAME.min_refresh", default: "\"10s\"", example: "\"1s\"", doc: "Floor between two fetches, so tokens with made-up `kid`s cannot make the gateway fetch once per request." },
    OptionDoc { key: "jwt.NAME.timeout", default: "\"5s\"", example: "\"2s\"", doc: "Bound on one discovery or JWKS fetch." },
    OptionDoc { key: "jwt.NAME.ca", default: "the Mozilla root certificates", example: "\"idp-ca.pem\"", doc: "A CA certificate (PEM) trusted for the issuer's HTTPS endpoints, in addition to the public roots." },
    OptionDoc { key: "introspection.NAME.url", default: "required", example: "\"https://idp.example.com/oauth2/introspect\"", doc: "The token introspection endpoint (RFC 7662). `https://` (plain `http://` only on loopback addresses). The gateway POSTs `token=...&token_type_hint=access_token` to it for each bearer token that is not an API key (nor, on a route that also accepts `jwt`, a JWS)." },
    OptionDoc { key: "introspection.NAME.client_id", default: "required", example: "\"apiwarden\"", doc: "The gateway's client id at the authorization server, sent with `client_secret` as HTTP Basic credentials (`client_secret_basic`)." },
    OptionDoc { key: "introspection.NAME.client_secret", default: "required", example: "\"env:INTROSPECTION_SECRET\"", doc: "The gateway's client secret: `env:NAME` or `file:PATH` (never the secret itself), read when the config is loaded." },
    OptionDoc { key: "introspection.NAME.audiences", default: "[] (any `aud`)", example: "[\"orders-api\"]", doc: "When set, an active token's `aud` must name one of these (else `authn.wrong_audience`)." },
    OptionDoc { key: "introspection.NAME.issuer", default: "none (any `iss`)", example: "\"https://idp.example.com\"", doc: "When set, an active token's `iss` must be exactly this (else `authn.wrong_issuer`)." },
    OptionDoc { key: "introspection.NAME.cache_ttl", default: "\"60s\"", example: "\"30s\"", doc: "The longest an active answer is reused without asking again (never past the token's `exp`; at most 1h). A token revoked at the server stays accepted until its cached answer expires." },
    OptionDoc { key: "introspection.NAME.negative_cache_ttl", default: "\"5s\"", example: "\"10s\"", doc: "How long an inactive or refused token is remembered (at most 5m), so a flood of made-up tokens cannot make the gateway call the server once per request." },
    OptionDoc { key: "introspection.NAME.timeout", default: "\"2s\"", example: "\"1s\"", doc: "Bound on one introspection call; past it the request gets `503 authn.introspection_unavailable`." },
    OptionDoc { key: "introspection.NAME.ca", default: "the Mozilla root certificates", example: "\"idp-ca.pem\"", doc: "A CA certificate (PEM) trusted for the endpoint, in addition to the public roots." },
    OptionDoc { key: "consumers[].name", default: "required", example: "\"billing\"", doc: "Consumer name; unique." },
    OptionDoc { key: "consumers[].scopes", default: "[]", example: "[\"orders:read\"]", doc: "Scopes granted to the consumer." },
    OptionDoc { key: "consumers[].roles", default: "[]", example: "[\"reader\"]", doc: "Roles granted to the consumer." },
    OptionDoc { key: "consumers[].allow_ips", default: "any address", example: "[\"10.0.0.0/8\", \"192.0.2.7\"]", doc: "Client addresses or CIDR networks the consumer's credentials are accepted from (the client IP after `trusted_proxies`); from anywhere else: `403 authz.ip_not_allowed`." },
    OptionDoc { key: "consumers[].token_issuers", default: "[]", example: "[\"corp\"]", doc: "Names of `[jwt.NAME]` or `[introspection.NAME]` tables whose tokens act as this consumer when their client (`client_id`, else `azp`) has the consumer's name: then the consumer's `roles` and `allow_ips` apply. A token from any other issuer never takes a consumer's roles by naming it." },
    OptionDoc { key: "consumers[].metadata", default: "{}", example: "{ team = \"payments\", owner = \"ana@example.com\" }", doc: "Free-form string labels, shown by `apiwarden consumers list` and the admin API." },
    OptionDoc { key: "consumers[].certificate_names", default: "[]", example: "[\"billing.internal\", \"spiffe://example.org/billing\"]", doc: "Names that identify the consumer in a verified client certificate (mTLS): a DNS, URI or e-mail SAN, or the subject's CN, compared exactly (DNS names without regard to case). A name belongs to one consumer only. A certificate that matches no consumer still authenticates, without scopes or roles." },
];

/// The configuration reference as a Markdown table (what the README shows).
pub fn reference_markdown() -> String {
    let mut out = String::from("| key | default | meaning |\n| --- | --- | --- |\n");
    for o in REFERENCE {
        out.push_str(&format!("| `{}` | {} | {} |\n", o.key, o.default, o.doc));
    }
    out
}
