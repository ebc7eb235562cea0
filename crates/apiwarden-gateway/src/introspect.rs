//! Opaque bearer tokens, checked by OAuth 2.0 token introspection (RFC 7662).
//!
//! An [`Introspector`] holds one `[introspection.NAME]`: the endpoint, the gateway's client
//! credentials (HTTP Basic, `client_secret_basic`: RFC 7662 §2.1 with RFC 6749 §2.3.1, the id
//! and secret form-urlencoded, read once when the config is loaded), and a cache of answers.
//! Checking a token:
//!
//! 1. the cache, on a keyed 128-bit tag of the token's text (never the text): an active answer
//!    is reused until `cache_ttl` has passed or the token's `exp`, whichever is first; a
//!    refusal (inactive, expired, wrong `iss` or `aud`) for `negative_cache_ttl`, so a flood of
//!    made-up tokens costs one call per distinct token and period, not one per request;
//! 2. otherwise a POST of `token=...&token_type_hint=access_token` to the endpoint, bounded by
//!    `timeout` and 64 KiB of answer. Anything but a `200` with a JSON object holding a boolean
//!    `active` is `authn.introspection_unavailable` (not cached: the next request asks again);
//! 3. the answer: `active`, then `exp`, `nbf`, and `iss` and `aud` when the config names them.
//!
//! The token and the client secret go nowhere but the request to the endpoint: not into a log
//! line, an error, the cache or an audit event.

use apiwarden_core::config::IntrospectionConfig;
use apiwarden_core::event::Reason;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::jwt::{read_secret, OneOrMany, TokenCache, TokenIdentity};
use crate::now_ms;
use crate::tag::tag;

/// The largest introspection answer read.
const MAX_ANSWER: usize = 64 << 10;

/// Counters of one endpoint (`apiwarden_introspection_*`).
#[derive(Default)]
pub struct IntrospectionMetrics {
    /// Tokens accepted after asking the endpoint.
    pub introspected: crate::metrics::Counter,
    /// Tokens accepted from the cache.
    pub cached: crate::metrics::Counter,
    /// Tokens refused (by the endpoint's answer, a cached refusal, or because it could not
    /// be asked).
    pub refused: crate::metrics::Counter,
    /// Calls that got no usable answer (unreachable, timeout, a status other than 200, not an
    /// introspection response).
    pub errors: AtomicU64,
}

/// What the cache remembers about a token: who it is, or why it was refused.
type Answer = Result<Arc<TokenIdentity>, Reason>;

/// One introspection endpoint, kept across config reloads while its settings stay the same.
pub struct Introspector {
    pub name: String,
    pub config: IntrospectionConfig,
    /// `Basic ...` (marked sensitive), or `None` when the secret could not be read: then every
    /// token is refused as unavailable.
    authorization: Option<HeaderValue>,
    cache: TokenCache<Answer>,
    last_error_log: AtomicU64,
    pub metrics: Arc<IntrospectionMetrics>,
    /// SHA-256 of the client secret as read, to tell on a reload whether it changed.
    secret_digest: Option<Vec<u8>>,
}

/// An introspection response (RFC 7662 §2.2); other members are ignored.
#[derive(Deserialize)]
struct Response {
    active: bool,
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<OneOrMany>,
    sub: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    username: Option<String>,
}

/// `application/x-www-form-urlencoded` (WHATWG URL §5.2): unreserved bytes stay, a space is
/// `+`, everything else is `%XX`.
fn form_encode(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

/// `Basic base64(form(id) ":" form(secret))` (RFC 6749 §2.3.1).
fn basic_authorization(client_id: &str, secret: &[u8]) -> Option<HeaderValue> {
    let mut pair = String::new();
    form_encode(&mut pair, client_id.as_bytes());
    pair.push(':');
    form_encode(&mut pair, secret);
    let mut value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn secs_to_ms(t: f64) -> u64 {
    (t.max(0.0) * 1000.0) as u64
}

impl Introspector {
    /// Whether the client secret still reads as it did: a reload keeps this endpoint, and its
    /// cached answers, only then.
    pub fn secret_unchanged(&self) -> bool {
        crate::jwt::secret_digest(&self.config.client_secret) == self.secret_digest
    }

    pub fn new(
        name: &str,
        config: IntrospectionConfig,
        metrics: Arc<IntrospectionMetrics>,
    ) -> Arc<Introspector> {
        let authorization = match read_secret(&config.client_secret) {
            Ok(secret) if !secret.is_empty() => basic_authorization(&config.client_id, &secret),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(introspection = name, error = %e, "the client secret cannot be read; tokens checked by this endpoint are refused");
                None
            }
        };
        Arc::new(Introspector {
            secret_digest: crate::jwt::secret_digest(&config.client_secret),
            name: name.to_string(),
            config,
            authorization,
            cache: TokenCache::new(false),
            last_error_log: AtomicU64::new(0),
            metrics,
        })
    }

    /// Checks an opaque bearer token. `Err(reason)` says why it is refused.
    pub async fn check(&self, token: &str) -> Result<Arc<TokenIdentity>, Reason> {
        let now = now_ms();
        let t = tag(token);
        if let Some(answer) = self.cache.get(t, now) {
            match &answer {
                Ok(_) => self.metrics.cached.fetch_add(1, Relaxed),
                Err(_) => self.metrics.refused.fetch_add(1, Relaxed),
            };
            return answer;
        }
        if token.is_empty() {
            self.metrics.refused.fetch_add(1, Relaxed);
            return Err(Reason::AuthnMalformed);
        }
        match self.introspect(token).await {
            Ok(response) => {
                let (answer, until) = self.judge(response, now);
                match &answer {
                    Ok(_) => self.metrics.introspected.fetch_add(1, Relaxed),
                    Err(_) => self.metrics.refused.fetch_add(1, Relaxed),
                };
                if until > now {
                    self.cache.put(t, until, answer.clone(), now);
                }
                answer
            }
            Err(e) => {
                self.metrics.errors.fetch_add(1, Relaxed);
                self.metrics.refused.fetch_add(1, Relaxed);
                let last = self.last_error_log.load(Relaxed);
                if now.saturating_sub(last) > 30_000 {
                    self.last_error_log.store(now, Relaxed);
                    tracing::warn!(introspection = %self.name, error = %e, "cannot introspect a token; tokens not in the cache are refused with 503");
                }
                Err(Reason::AuthnIntrospectionUnavailable)
            }
        }
    }

    /// What an answer means, and until when (Unix ms) that may be remembered.
    fn judge(&self, r: Response, now: u64) -> (Answer, u64) {
        let negative = now + self.config.negative_cache_ttl.as_millis() as u64;
        if !r.active {
            return (Err(Reason::AuthnTokenInactive), negative);
        }
        let exp = r.exp.map(secs_to_ms);
        if exp.is_some_and(|exp| exp <= now) {
            return (Err(Reason::AuthnTokenExpired), negative);
        }
        if let Some(nbf) = r.nbf.map(secs_to_ms).filter(|&nbf| nbf > now) {
            // Remembered only until it becomes valid.
            return (Err(Reason::AuthnTokenNotYetValid), negative.min(nbf));
        }
        if let Some(issuer) = &self.config.issuer {
            if r.iss.as_deref() != Some(issuer.as_str()) {
                return (Err(Reason::AuthnWrongIssuer), negative);
            }
        }
        if !self.config.audiences.is_empty()
            && !r.aud.is_some_and(|a| {
                a.into_vec()
                    .iter()
                    .any(|a| self.config.audiences.contains(a))
            })
        {
            return (Err(Reason::AuthnWrongAudience), negative);
        }
        let positive = now + self.config.cache_ttl.as_millis() as u64;
        let until = exp.map_or(positive, |exp| exp.min(positive));
        let identity = TokenIdentity {
            subject: r.sub.or(r.username),
            client: r.client_id,
            scopes: r
                .scope
                .as_deref()
                .unwrap_or("")
                .split_ascii_whitespace()
                .map(str::to_string)
                .collect(),
        };
        (Ok(Arc::new(identity)), until)
    }

    /// One call to the endpoint. The error text holds the URL and what failed, never the
    /// token or the credentials.
    async fn introspect(&self, token: &str) -> Result<Response, String> {
        let authorization = self
            .authorization
            .clone()
            .ok_or("the client secret could not be read when the config was loaded")?;
        let mut form = String::with_capacity(token.len() + 40);
        form.push_str("token=");
        form_encode(&mut form, token.as_bytes());
        form.push_str("&token_type_hint=access_token");
        let (status, body) = crate::http_client::send(crate::http_client::Call {
            method: http::Method::POST,
            url: &self.config.url,
            headers: vec![
                (header::AUTHORIZATION, authorization),
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                ),
                (header::ACCEPT, HeaderValue::from_static("application/json")),
            ],
            body: Bytes::from(form),
            ca: self.config.ca.as_deref(),
            timeout: self.config.timeout,
            max_body: MAX_ANSWER,
        })
        .await?;
        let url = apiwarden_core::config::redact_url(&self.config.url);
        match status {
            http::StatusCode::OK => {}
            http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN => {
                return Err(format!(
                    "{url}: status {status}: the endpoint refused the gateway's client credentials (client_id {:?})",
                    self.config.client_id
                ))
            }
            _ => return Err(format!("{url}: status {status}")),
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("{url}: not an introspection response: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_credentials_are_form_encoded_before_basic() {
        // RFC 6749 §2.3.1: "a b:c" is sent as "a+b%3Ac".
        let v = basic_authorization("gw app", b"s:e/cr%t").unwrap();
        let decoded = STANDARD
            .decode(v.to_str().unwrap().strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"gw+app:s%3Ae%2Fcr%25t");
        assert!(v.is_sensitive());
    }

    #[test]
    fn only_unreserved_bytes_stay() {
        let mut out = String::new();
        form_encode(&mut out, "aZ9*-._ +&=/é".as_bytes());
        assert_eq!(out, "aZ9*-._+%2B%26%3D%2F%C3%A9");
    }
}
