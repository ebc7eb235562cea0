//! The audit event, schema version 1 (see the SPEC's "Audit event").
//!
//! Serialised as JSON with the SPEC's dotted names as nested objects (`client.ip` is
//! `{"client":{"ip":...}}`). Secrets never enter this type: there is no field for a credential,
//! and the query string is stored with its values redacted.

use serde::{Serialize, Serializer};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

/// The schema version written in every event.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Request,
    Admin,
    System,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
}

/// Reason codes. A fixed set, so they can also be metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed by every stage.
    Ok,
    /// The request could not be parsed as HTTP.
    RequestMalformed,
    /// The path could not be normalised, or holds an encoded slash that is refused.
    RequestBadPath,
    /// The request head is larger than `gateway.max_header_size`.
    RequestHeadersTooLarge,
    /// The body is larger than `gateway.max_body_size`.
    RequestBodyTooLarge,
    /// No part of the request body came for `gateway.body_timeout`.
    RequestBodyTimeout,
    /// No route matches.
    RouteNotFound,
    /// No credential was presented.
    AuthnMissing,
    /// The route's authentication method is not available in this build.
    AuthnUnavailable,
    /// A credential was sent but is not in the expected form.
    AuthnMalformed,
    /// An API key that does not exist, or whose secret is wrong.
    AuthnInvalidKey,
    /// An API key past its expiry (or past the grace period of its rotation).
    AuthnExpiredKey,
    /// An API key that was revoked.
    AuthnRevokedKey,
    /// A token whose header says `alg: none` (unsigned).
    AuthnAlgNone,
    /// A token whose `alg` does not fit the key it names: an HMAC `alg` against an issuer's
    /// public keys, or an RSA `alg` with an EC key, and so on (algorithm confusion).
    AuthnAlgConfusion,
    /// A token signed with an algorithm the issuer's `algorithms` does not list.
    AuthnAlgNotAllowed,
    /// A token whose `kid` is not in the issuer's key set, even after fetching it again.
    AuthnUnknownKid,
    /// A token whose signature does not verify.
    AuthnBadSignature,
    /// A validly signed token whose `iss` is not the route's issuer.
    AuthnWrongIssuer,
    /// A validly signed token whose `aud` names none of the issuer's `audiences`.
    AuthnWrongAudience,
    /// A token past its `exp` (plus leeway).
    AuthnTokenExpired,
    /// A token before its `nbf` (minus leeway).
    AuthnTokenNotYetValid,
    /// The issuer's keys could not be fetched yet, so no token can be checked.
    AuthnKeysUnavailable,
    /// The connection's client certificate expired after its handshake, or the client CA
    /// loaded since no longer verifies it.
    AuthnCertificateInvalid,
    /// The introspection endpoint says the token is not active (unknown, revoked, expired or
    /// never issued).
    AuthnTokenInactive,
    /// The introspection endpoint could not answer (unreachable, timeout, a status other than
    /// 200, or an answer that is not an introspection response).
    AuthnIntrospectionUnavailable,
    /// Authenticated, but the route needs a scope the caller does not hold.
    AuthzMissingScope,
    /// Authenticated, but not from an address the consumer's `allow_ips` lists.
    AuthzIpNotAllowed,
    /// Authenticated, but the route needs a role the consumer does not hold.
    AuthzMissingRole,
    /// The upstream could not be reached.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream failed while answering.
    UpstreamError,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The client went away before the response was complete.
    ClientDisconnected,
    /// A rate limit refused the request (`decision.policy` names it).
    RateLimitExceeded,
    /// A Redis-backed limit could not be checked; the policy's `failure_mode` decided.
    RateLimitUnavailable,
    /// The client IP, key or consumer is on the block list.
    Blocked,
    /// An admin action (a block list change, ...), allowed.
    AdminAction,
    /// At start, a torn last ledger record (a crash in the middle of a write) was cut off.
    LedgerRecordCut,
    /// Retention deleted the oldest sealed segments of the ledger (the event names the range
    /// and the retention anchor the ledger now starts from).
    LedgerRetention,
    /// The audit ledger could not make the request's record durable (`strict`), or cannot
    /// write at all and the route fails closed: nothing was forwarded.
    AuditUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::RequestMalformed => "request.malformed",
            Reason::RequestBadPath => "request.bad_path",
            Reason::RequestHeadersTooLarge => "request.headers_too_large",
            Reason::RequestBodyTooLarge => "request.body_too_large",
            Reason::RequestBodyTimeout => "request.body_timeout",
            Reason::RouteNotFound => "route.not_found",
            Reason::AuthnMissing => "authn.missing",
            Reason::AuthnUnavailable => "authn.unavailable",
            Reason::AuthnMalformed => "authn.malformed",
            Reason::AuthnInvalidKey => "authn.invalid_key",
            Reason::AuthnExpiredKey => "authn.expired_key",
            Reason::AuthnRevokedKey => "authn.revoked_key",
            Reason::AuthnAlgNone => "authn.alg_none",
            Reason::AuthnAlgConfusion => "authn.alg_confusion",
            Reason::AuthnAlgNotAllowed => "authn.alg_not_allowed",
            Reason::AuthnUnknownKid => "authn.unknown_kid",
            Reason::AuthnBadSignature => "authn.bad_signature",
            Reason::AuthnWrongIssuer => "authn.wrong_issuer",
            Reason::AuthnWrongAudience => "authn.wrong_audience",
            Reason::AuthnTokenExpired => "authn.token_expired",
            Reason::AuthnTokenNotYetValid => "authn.token_not_yet_valid",
            Reason::AuthnCertificateInvalid => "authn.certificate_invalid",
            Reason::AuthnKeysUnavailable => "authn.keys_unavailable",
            Reason::AuthnTokenInactive => "authn.token_inactive",
            Reason::AuthnIntrospectionUnavailable => "authn.introspection_unavailable",
            Reason::AuthzMissingScope => "authz.missing_scope",
            Reason::AuthzIpNotAllowed => "authz.ip_not_allowed",
            Reason::AuthzMissingRole => "authz.missing_role",
            Reason::UpstreamUnavailable => "upstream.unavailable",
            Reason::UpstreamTimeout => "upstream.timeout",
            Reason::UpstreamError => "upstream.error",
            Reason::ShuttingDown => "gateway.shutting_down",
            Reason::ClientDisconnected => "client.disconnected",
            Reason::RateLimitExceeded => "ratelimit.exceeded",
            Reason::RateLimitUnavailable => "ratelimit.unavailable",
            Reason::Blocked => "blocked",
            Reason::AdminAction => "admin.action",
            Reason::LedgerRecordCut => "ledger.record_cut",
            Reason::LedgerRetention => "ledger.retention",
            Reason::AuditUnavailable => "audit.unavailable",
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Client {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// The `X-Forwarded-For` header as received, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IdentityFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `none`, `api_key`, `jwt`, `introspection` or `mtls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub scopes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestFields {
    /// The request's method: one of HTTP's own without an allocation, any other as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Cow<'static, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The route's path as written in the config (a template such as `/orders/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Arc<str>>,
    /// The route's name (an extension of schema 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_name: Option<Arc<str>>,
    /// The query string with every value replaced by `REDACTED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    pub bytes: u64,
    /// `websocket` (or another protocol) when the request was an upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// Configured sensitive headers (`audit.hmac_headers`), each as `hmac:<hex>`: HMAC-SHA256
    /// under the ledger's salt, so equal values correlate without being stored.
    #[serde(
        serialize_with = "pairs_as_object",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub headers_hmac: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ResponseFields {
    pub status: u16,
    pub bytes: u64,
    pub latency_us: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionFields {
    pub outcome: Outcome,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Default for DecisionFields {
    fn default() -> Self {
        DecisionFields {
            outcome: Outcome::Allow,
            reason: Reason::Ok,
            policy: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TlsFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_subject: Option<String>,
}

impl TlsFields {
    /// No TLS facts (a plain-HTTP request): the event leaves `tls` out.
    pub fn is_empty(&self) -> bool {
        self.version.is_none() && self.client_subject.is_none()
    }
}

/// One audit event.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEvent {
    pub schema_version: u32,
    pub event_id: Uuid,
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub node: Arc<str>,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Uuid>,
    pub client: Client,
    pub identity: IdentityFields,
    pub request: RequestFields,
    pub response: ResponseFields,
    pub upstream: UpstreamFields,
    pub decision: DecisionFields,
    #[serde(skip_serializing_if = "TlsFields::is_empty")]
    pub tls: TlsFields,
    /// What went wrong after the request was allowed (a [`Reason`] code), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Reason>,
    /// A sentence for `system` and `admin` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Who did an `admin` action (`cli:USER@HOST`, an admin token's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// `received`: the record a `strict` ledger makes durable before the request is
    /// forwarded; the request's outcome follows in a second record without a phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<&'static str>,
    /// On the outcome record of a `strict` request: the `seq` of its `received` record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_seq: Option<u64>,
    /// Assigned by the audit sink, gap-free per node. Written last, so that everything
    /// before it can be encoded and hashed by the thread that records the event before the
    /// ledger's writer knows the number (see `write_json_unnumbered`).
    pub seq: u64,
}

fn pairs_as_object<S: Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

impl AuditEvent {
    /// A blank event of the given kind, happening now.
    pub fn new(kind: EventKind, event_id: Uuid, node: Arc<str>) -> Self {
        Self::new_at(kind, event_id, node, SystemTime::now())
    }

    /// A blank event of the given kind that happened at `time` (a caller that has read the
    /// clock for the event's ids already).
    pub fn new_at(kind: EventKind, event_id: Uuid, node: Arc<str>, time: SystemTime) -> Self {
        AuditEvent {
            schema_version: SCHEMA_VERSION,
            seq: 0,
            event_id,
            time,
            node,
            kind,
            request_id: None,
            client: Client::default(),
            identity: IdentityFields::default(),
            request: RequestFields::default(),
            response: ResponseFields::default(),
            upstream: UpstreamFields::default(),
            decision: DecisionFields::default(),
            tls: TlsFields::default(),
            error: None,
            message: None,
            actor: None,
            phase: None,
            received_seq: None,
        }
    }
}

/// The canonical JSON encoding of an event: the same document as its `Serialize`
/// implementation (a test checks), written directly into a buffer. A field without a value
/// (`None`, no HMAC'd headers, no TLS facts) is left out rather than written as `null`: a
/// reader sees the same thing (`event["tls"]["version"]` is `null` either way) and a typical
/// request event is about a fifth smaller, which is a fifth less to hash, write and verify.
/// This is what sinks write; it costs a fraction of a generic serialiser on the hot path of
/// the audit writer.
impl AuditEvent {
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.write_json_inner(out, true);
    }

    /// The canonical JSON without the value of `seq`, which the ledger assigns when it writes
    /// the record; returns the position in `out` where its decimal digits go. With them
    /// inserted there, the bytes are exactly [`AuditEvent::write_json`]'s. Lets the recording
    /// thread, where the event is hot in its cache, do the encoding. `seq` is the last field,
    /// so only the closing brace follows the position: the recording thread can also hash
    /// everything before it (the frame's checksum, which covers the number, stays the
    /// writer's).
    pub fn write_json_unnumbered(&self, out: &mut Vec<u8>) -> usize {
        self.write_json_inner(out, false)
    }

    fn write_json_inner(&self, out: &mut Vec<u8>, numbered: bool) -> usize {
        out.reserve(1024);
        let mut j = Json { out, first: true };
        j.open();
        j.key(k!("schema_version"))
            .u64(u64::from(self.schema_version));
        j.key(k!("event_id")).uuid(self.event_id);
        j.key(k!("time"));
        j.out.push(b'"');
        write_time(j.out, self.time);
        j.out.push(b'"');
        j.key(k!("node")).str(&self.node);
        j.key(k!("kind")).str(match self.kind {
            EventKind::Request => "request",
            EventKind::Admin => "admin",
            EventKind::System => "system",
        });
        if let Some(id) = self.request_id {
            j.key(k!("request_id")).uuid(id);
        }
        j.key(k!("client")).open();
        if let Some(ip) = self.client.ip {
            {
                j.key(k!("ip"));
                j.out.push(b'"');
                match ip {
                    IpAddr::V4(v4) => {
                        for (i, octet) in v4.octets().iter().enumerate() {
                            if i > 0 {
                                j.out.push(b'.');
                            }
                            j.u64(u64::from(*octet));
                        }
                    }
                    IpAddr::V6(v6) => {
                        use std::io::Write as _;
                        let _ = write!(j.out, "{v6}");
                    }
                }
                j.out.push(b'"');
            }
        }
        j.opt_str(k!("forwarded_for"), self.client.forwarded_for.as_deref());
        j.close();
        let id = &self.identity;
        j.key(k!("identity")).open();
        j.opt_str(k!("consumer"), id.consumer.as_deref());
        j.opt_str(k!("key_id"), id.key_id.as_deref());
        j.opt_str(k!("method"), id.method);
        j.opt_str(k!("subject"), id.subject.as_deref());
        j.key(k!("scopes")).strs(&id.scopes);
        j.close();
        let r = &self.request;
        j.key(k!("request")).open();
        j.opt_str(k!("method"), r.method.as_deref());
        j.opt_str(k!("host"), r.host.as_deref());
        j.opt_str(k!("path"), r.path.as_deref());
        j.opt_str(k!("route"), r.route.as_deref());
        j.opt_str(k!("route_name"), r.route_name.as_deref());
        j.opt_str(k!("query"), r.query.as_deref());
        j.opt_str(k!("user_agent"), r.user_agent.as_deref());
        j.key(k!("bytes")).u64(r.bytes);
        j.opt_str(k!("upgrade"), r.upgrade.as_deref());
        if !r.headers_hmac.is_empty() {
            j.key(k!("headers_hmac")).open();
            for (name, value) in &r.headers_hmac {
                j.name(name).str(value);
            }
            j.close();
        }
        j.close();
        j.key(k!("response")).open();
        j.key(k!("status")).u64(u64::from(self.response.status));
        j.key(k!("bytes")).u64(self.response.bytes);
        j.key(k!("latency_us")).u64(self.response.latency_us);
        j.close();
        let u = &self.upstream;
        j.key(k!("upstream")).open();
        j.opt_str(k!("name"), u.name.as_deref());
        j.opt_str(k!("target"), u.target.as_deref());
        if let Some(n) = u.latency_us {
            j.key(k!("latency_us")).u64(n);
        }
        j.close();
        let d = &self.decision;
        j.key(k!("decision")).open();
        j.key(k!("outcome")).str(match d.outcome {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        });
        j.key(k!("reason")).str(d.reason.as_str());
        j.opt_str(k!("policy"), d.policy.as_deref());
        j.close();
        if !self.tls.is_empty() {
            j.key(k!("tls")).open();
            j.opt_str(k!("version"), self.tls.version);
            j.opt_str(k!("client_subject"), self.tls.client_subject.as_deref());
            j.close();
        }
        j.opt_str(k!("error"), self.error.map(Reason::as_str));
        j.opt_str(k!("message"), self.message.as_deref());
        j.opt_str(k!("actor"), self.actor.as_deref());
        j.opt_str(k!("phase"), self.phase);
        if let Some(n) = self.received_seq {
            j.key(k!("received_seq")).u64(n);
        }
        j.key(k!("seq"));
        let seq_at = j.out.len();
        if numbered {
            j.u64(self.seq);
        }
        j.close();
        seq_at
    }
}

/// Bytes a JSON string cannot hold as they are: control characters, DEL, `"` and `\\`.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    t
};

thread_local! {
    /// The formatted `YYYY-MM-DDTHH:MM:SS` of the last second written, and that second.
    static SECOND: std::cell::RefCell<(u64, [u8; 19])> = const { std::cell::RefCell::new((u64::MAX, [0; 19])) };
}

/// Writes `t` as RFC 3339 in UTC with microseconds (`2026-11-25T12:00:00.123456Z`). The
/// date and time of day are formatted once per second and reused.
fn write_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    SECOND.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != secs {
            let mut text = Vec::with_capacity(32);
            {
                use std::io::Write as _;
                let _ = write!(text, "{}", humantime::format_rfc3339_seconds(t));
            }
            c.1.copy_from_slice(&text[..19]);
            c.0 = secs;
        }
        out.extend_from_slice(&c.1);
    });
    let micros = d.subsec_micros();
    out.push(b'.');
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// A JSON object key with its quotes and colon, as one literal.
macro_rules! k {
    ($name:literal) => {
        concat!("\"", $name, "\":").as_bytes()
    };
}
use k;

/// Appends `n` in decimal (what the ledger writer inserts into
/// [`AuditEvent::write_json_unnumbered`]'s output).
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A minimal JSON writer for [`AuditEvent::write_json`].
struct Json<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Json<'_> {
    fn open(&mut self) -> &mut Self {
        self.out.push(b'{');
        self.first = true;
        self
    }

    fn close(&mut self) {
        self.out.push(b'}');
        self.first = false;
    }

    /// A key that is not known at compile time (escaped like any string).
    fn name(&mut self, k: &str) -> &mut Self {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.str(k);
        self.out.push(b':');
        self
    }

    /// Writes a key made by `k!`: `"name":`, with the comma before it when needed.
    fn key(&mut self, k: &[u8]) -> &mut Self {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(k);
        self
    }

    fn uuid(&mut self, id: Uuid) {
        let mut buf = [0u8; 38];
        buf[0] = b'"';
        buf[37] = b'"';
        id.hyphenated().encode_lower(&mut buf[1..37]);
        self.out.extend_from_slice(&buf);
    }

    fn u64(&mut self, n: u64) {
        push_decimal(self.out, n);
    }

    fn str(&mut self, s: &str) {
        let bytes = s.as_bytes();
        self.out.reserve(bytes.len() + 2);
        self.out.push(b'"');
        // Most strings need no escaping: find the first byte that does with a table look-up.
        let Some(first) = bytes.iter().position(|&b| NEEDS_ESCAPE[usize::from(b)]) else {
            self.out.extend_from_slice(bytes);
            self.out.push(b'"');
            return;
        };
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate().skip(first) {
            if !NEEDS_ESCAPE[usize::from(b)] {
                continue;
            }
            self.out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => self.out.extend_from_slice(b"\\\""),
                b'\\' => self.out.extend_from_slice(b"\\\\"),
                b'\n' => self.out.extend_from_slice(b"\\n"),
                b'\r' => self.out.extend_from_slice(b"\\r"),
                b'\t' => self.out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.out.extend_from_slice(b"\\u00");
                    self.out.push(HEX[usize::from(b >> 4)]);
                    self.out.push(HEX[usize::from(b & 0xf)]);
                }
            }
            start = i + 1;
        }
        self.out.extend_from_slice(&bytes[start..]);
        self.out.push(b'"');
    }

    /// A string field, left out when there is no value (the canonical form has no `null`s).
    fn opt_str(&mut self, k: &[u8], s: Option<&str>) {
        if let Some(s) = s {
            self.key(k).str(s);
        }
    }

    fn strs(&mut self, items: &[String]) {
        self.out.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.str(s);
        }
        self.out.push(b']');
    }
}

/// Replaces every value of a query string with `REDACTED`, keeping the parameter names; a
/// parameter without `=` (which may itself be a secret, such as a bare token) is replaced whole.
pub fn redact_query(query: &str) -> String {
    redact_query_with(query, &[], &|_| String::new())
}

/// As [`redact_query`], except that the values of the parameters named in `hashed` are
/// replaced by `hash(value)` (the ledger's `hmac:<hex>`), so that equal values correlate.
pub fn redact_query_with(query: &str, hashed: &[String], hash: &dyn Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, v)) if hashed.iter().any(|h| h == k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(&hash(v));
            }
            Some((k, _)) => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            None if pair.is_empty() => {}
            None => out.push_str("REDACTED"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_numbers_are_written_like_display() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let mut v = Vec::new();
            push_decimal(&mut v, n);
            assert_eq!(v, n.to_string().into_bytes());
        }
    }

    #[test]
    fn serialises_with_nested_spec_names() {
        let mut e = AuditEvent::new(EventKind::Request, Uuid::nil(), Arc::from("n1"));
        e.client.ip = Some("10.0.0.1".parse().unwrap());
        e.decision = DecisionFields {
            outcome: Outcome::Deny,
            reason: Reason::RouteNotFound,
            policy: None,
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["kind"], "request");
        assert_eq!(v["client"]["ip"], "10.0.0.1");
        assert_eq!(v["decision"]["outcome"], "deny");
        assert_eq!(v["decision"]["reason"], "route.not_found");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn the_canonical_encoding_is_the_serde_document() {
        let mut e = AuditEvent::new(
            EventKind::Request,
            Uuid::from_u128(0x0190_1234),
            Arc::from("node-\"1\""),
        );
        e.seq = 42;
        e.request_id = Some(Uuid::from_u128(7));
        e.client.ip = Some("2001:db8::1".parse().unwrap());
        e.client.forwarded_for = Some("1.2.3.4, 5.6.7.8".into());
        e.identity.method = Some("api_key");
        e.identity.scopes = vec!["a:read".into(), "b\\write".into()];
        e.request.path = Some("/p\u{1}\u{7f}\tq/\u{e9}t\u{e9}".into());
        e.request.user_agent = Some("ua \"quoted\"\n".into());
        e.request.bytes = 18_446_744_073_709_551_615;
        e.response = ResponseFields {
            status: 502,
            bytes: 0,
            latency_us: 1234,
        };
        e.upstream.latency_us = Some(7);
        e.error = Some(Reason::UpstreamTimeout);
        e.tls.version = Some("TLSv1.3");
        e.request.headers_hmac = vec![("x-account".into(), "hmac:00ff".into())];
        let mut buf = Vec::new();
        e.write_json(&mut buf);
        let canonical: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            canonical,
            serde_json::to_value(&e).unwrap(),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        let blank = AuditEvent::new(EventKind::System, Uuid::nil(), Arc::from(""));
        buf.clear();
        blank.write_json(&mut buf);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&buf).unwrap(),
            serde_json::to_value(&blank).unwrap()
        );
        // Encoded without the number, then numbered: the same bytes.
        let mut unnumbered = Vec::new();
        let at = e.write_json_unnumbered(&mut unnumbered);
        // `seq` is the last field: only the closing brace follows its digits, so the ledger's
        // recording threads can hash everything before them.
        assert_eq!(&unnumbered[at..], b"}");
        assert!(unnumbered[..at].ends_with(br#","seq":"#));
        unnumbered.splice(at..at, b"42".iter().copied());
        let mut numbered = Vec::new();
        e.write_json(&mut numbered);
        assert_eq!(unnumbered, numbered);
        // Fields without a value are left out, in both encodings, in the same order.
        assert_eq!(buf, serde_json::to_vec(&blank).unwrap());
        let text = String::from_utf8(buf).unwrap();
        assert!(!text.contains("null"), "{text}");
        assert!(
            !text.contains("tls") && !text.contains("headers_hmac"),
            "{text}"
        );
        assert!(text.contains(r#""client":{}"#), "{text}");
    }

    #[test]
    fn string_escaping_matches_serde_json_on_random_strings() {
        let alphabet: Vec<char> = "ab\"\\\n\r\t\u{0}\u{1f}\u{7f} é€😀/zZ09".chars().collect();
        let mut rng = crate::XorShift(0x2545_F491_4F6C_DD1D);
        for len in 0..200usize {
            for _ in 0..10 {
                let text: String = (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect();
                let mut buf = Vec::new();
                Json {
                    out: &mut buf,
                    first: true,
                }
                .str(&text);
                let back: String = serde_json::from_slice(&buf).unwrap();
                assert_eq!(back, text);
            }
        }
    }

    #[test]
    fn query_values_are_redacted() {
        assert_eq!(
            redact_query("a=1&token=secret&sk_live_abc"),
            "a=REDACTED&token=REDACTED&REDACTED"
        );
    }
}
