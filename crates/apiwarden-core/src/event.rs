//! The audit event, schema version 1 (see the SPEC's "Audit event").
//!
//! Serialised as JSON with the SPEC's dotted names as nested objects (`client.ip` is
//! `{"client":{"ip":...}}`). Secrets never enter this type: there is no field for a credential,
//! and the query string is stored with its values redacted.

use serde::{Serialize, Serializer};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

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
    /// No route matches.
    RouteNotFound,
    /// No credential was presented.
    AuthnMissing,
    /// The route's authentication method is not available in this build.
    AuthnUnavailable,
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
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::RequestMalformed => "request.malformed",
            Reason::RequestBadPath => "request.bad_path",
            Reason::RequestHeadersTooLarge => "request.headers_too_large",
            Reason::RequestBodyTooLarge => "request.body_too_large",
            Reason::RouteNotFound => "route.not_found",
            Reason::AuthnMissing => "authn.missing",
            Reason::AuthnUnavailable => "authn.unavailable",
            Reason::UpstreamUnavailable => "upstream.unavailable",
            Reason::UpstreamTimeout => "upstream.timeout",
            Reason::UpstreamError => "upstream.error",
            Reason::ShuttingDown => "gateway.shutting_down",
            Reason::ClientDisconnected => "client.disconnected",
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
    pub ip: Option<IpAddr>,
    /// The `X-Forwarded-For` header as received, when there was one.
    pub forwarded_for: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IdentityFields {
    pub consumer: Option<String>,
    pub key_id: Option<String>,
    /// `none`, `api_key`, `jwt`, `introspection` or `mtls`.
    pub method: Option<&'static str>,
    pub subject: Option<String>,
    pub scopes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestFields {
    pub method: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    /// The route's path as written in the config (a template such as `/orders/{id}`).
    pub route: Option<String>,
    /// The route's name (an extension of schema 1).
    pub route_name: Option<String>,
    /// The query string with every value replaced by `REDACTED`.
    pub query: Option<String>,
    pub user_agent: Option<String>,
    pub bytes: u64,
    /// `websocket` (or another protocol) when the request was an upgrade.
    pub upgrade: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ResponseFields {
    pub status: u16,
    pub bytes: u64,
    pub latency_us: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamFields {
    pub name: Option<String>,
    pub target: Option<String>,
    pub latency_us: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionFields {
    pub outcome: Outcome,
    pub reason: Reason,
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
    pub version: Option<&'static str>,
    pub client_subject: Option<String>,
}

/// One audit event.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEvent {
    pub schema_version: u32,
    /// Assigned by the audit sink, gap-free per node.
    pub seq: u64,
    pub event_id: String,
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub node: Arc<str>,
    pub kind: EventKind,
    pub request_id: Option<String>,
    pub client: Client,
    pub identity: IdentityFields,
    pub request: RequestFields,
    pub response: ResponseFields,
    pub upstream: UpstreamFields,
    pub decision: DecisionFields,
    pub tls: TlsFields,
    /// What went wrong after the request was allowed (a [`Reason`] code), if anything.
    pub error: Option<Reason>,
    /// A sentence for `system` and `admin` events.
    pub message: Option<String>,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

impl AuditEvent {
    /// A blank event of the given kind.
    pub fn new(kind: EventKind, event_id: String, node: Arc<str>) -> Self {
        AuditEvent {
            schema_version: SCHEMA_VERSION,
            seq: 0,
            event_id,
            time: SystemTime::now(),
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
        }
    }
}

/// Replaces every value of a query string with `REDACTED`, keeping the parameter names.
pub fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            None => out.push_str(pair),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_nested_spec_names() {
        let mut e = AuditEvent::new(EventKind::Request, "id".into(), Arc::from("n1"));
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
    fn query_values_are_redacted() {
        assert_eq!(
            redact_query("a=1&token=secret&flag"),
            "a=REDACTED&token=REDACTED&flag"
        );
    }
}
