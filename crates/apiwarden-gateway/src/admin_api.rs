//! The admin API on the admin listener (`/admin/v1/...`): keys and consumers, as the command
//! line manages them, for tokens with a role (`[admin.tokens.NAME]`): `admin` reads and
//! writes, `auditor` reads.
//!
//! Every call, allowed or refused, is an `admin` audit event with its actor
//! (`admin-token:NAME`, or none when no token matched), the method and path, the status and a
//! sentence; never a token or a key's secret.
//!
//! | method and path | role | does |
//! | --- | --- | --- |
//! | `GET /admin/v1/consumers` | auditor | the consumers: of the config in force (`source: config`) and of the store (`source: store`) |
//! | `POST /admin/v1/consumers` `{"name", "scopes"?, "roles"?, "allow_ips"?, "metadata"?}` | admin | adds a consumer to the store (`201`) or replaces one there (`200`) |
//! | `DELETE /admin/v1/consumers/{name}` | admin | removes a consumer from the store and revokes its keys |
//! | `GET /admin/v1/keys` | auditor | every key, as `keys list --json` |
//! | `GET /admin/v1/audit?consumer=&key=&ip=&status=&decision=&since=&until=&limit=&after=` | auditor | events from the ledger, oldest first, as `audit search` (`since`/`until`: RFC 3339 or a duration back from now; `limit` default 100, at most 10 000; a full page's `next` is the `after` of the next page) |
//! | `POST /admin/v1/keys` `{"consumer", "scopes"?, "expires_in"?}` | admin | issues a key; the secret is in this answer only |
//! | `POST /admin/v1/keys/{id}/rotate` `{"grace"?}` | admin | as `keys rotate` (default grace 24h) |
//! | `POST /admin/v1/keys/{id}/revoke` | admin | as `keys revoke` |

use crate::body::ResponseBody;
use crate::keystore::{KeyError, KeyRecord, KeyStatus, KeyStore};
use crate::pipeline::Shared;
use apiwarden_core::config::{AdminRole, Config};
use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ring::hmac;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// A page of an audit search ends once its records reach this size (the page's `next` then
/// says where to go on), whatever its `limit`.
const PAGE_BYTES: usize = 16 << 20;

/// The longest the admin API waits for a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What `keys list` warns about: old, unused or soon-expiring keys.
pub fn key_warnings(k: &KeyRecord, cfg: &Config, now: u64) -> Vec<String> {
    let mut w = Vec::new();
    let status = k.status(now);
    if status != KeyStatus::Active && status != KeyStatus::Rotating {
        return w;
    }
    let day = 86_400_000;
    let age = now.saturating_sub(k.created_at);
    if age > cfg.storage.key_max_age.as_millis() as u64 {
        w.push(format!(
            "older than {} days: rotate it",
            cfg.storage.key_max_age.as_secs() / 86_400
        ));
    }
    let idle_since = k.last_used.unwrap_or(k.created_at);
    if now.saturating_sub(idle_since) > cfg.storage.key_unused_after.as_millis() as u64 {
        w.push(match k.last_used {
            Some(_) => format!("unused for {} days: revoke it?", (now - idle_since) / day),
            None => format!(
                "never used in {} days: revoke it?",
                (now - idle_since) / day
            ),
        });
    }
    if let Some(t) = k.expires_at {
        if t > now && t - now < 7 * day {
            w.push(format!("expires in {} days", (t - now).div_ceil(day)));
        }
    }
    w
}

/// A key record as `keys list --json` and the admin API show it: never its hash.
pub fn key_json(k: &KeyRecord, cfg: &Config, now: u64) -> Value {
    let mut v = serde_json::to_value(k).expect("a key record serialises");
    v["status"] = k.status(now).as_str().into();
    v["warnings"] = key_warnings(k, cfg, now).into();
    v
}

/// An answer of the admin API: JSON, never cached, with the call's `X-Request-Id` (also in
/// the body of an error, as the gateway's own errors have it).
fn reply(status: StatusCode, mut body: Value, rid: uuid::Uuid) -> Response<ResponseBody> {
    if !status.is_success() {
        body["request_id"] = rid.to_string().into();
    }
    let mut r = Response::new(ResponseBody::full(body.to_string() + "\n"));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(crate::pipeline::X_REQUEST_ID, crate::ids::header_value(rid));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        // A caller without a token keeps no connection (the listener keeps a few hundred).
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Per-process key under which presented and configured tokens are compared (as HMACs, in
/// constant time, whatever their lengths).
fn compare_key() -> &'static hmac::Key {
    static KEY: std::sync::OnceLock<hmac::Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system random generator works")
    })
}

/// At most one warning about unusable tokens per 30 s, however many requests arrive.
fn warn_now() -> bool {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::now_ms();
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    now.saturating_sub(last) >= 30_000
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
}

/// The token a request presents, matched against the configured ones.
fn authenticate(cfg: &Config, req: &Request<Incoming>) -> Result<(String, AdminRole), Reason> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(Reason::AuthnMissing)?
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or(Reason::AuthnMalformed)?;
    let tag = hmac::sign(compare_key(), presented.as_bytes());
    let mut found: Option<(String, AdminRole)> = None;
    let mut twin = None;
    // Every configured token is compared, so the time taken does not say which one matched.
    for t in &cfg.admin.tokens {
        match crate::jwt::read_secret(&t.secret) {
            // Trimmed as the presented token is (an environment variable's trailing newline).
            Ok(secret) if secret.trim_ascii().len() >= 32 => {
                if hmac::verify(compare_key(), secret.trim_ascii(), tag.as_ref()).is_ok() {
                    match &found {
                        Some((first, _)) => twin = Some((first.clone(), t.name.clone())),
                        None => found = Some((t.name.clone(), t.role)),
                    }
                }
            }
            Ok(_) => {
                if warn_now() {
                    tracing::warn!(token = %t.name, "admin token shorter than 32 bytes: refused")
                }
            }
            Err(e) => {
                if warn_now() {
                    tracing::warn!(token = %t.name, error = %e, "admin token cannot be read")
                }
            }
        }
    }
    // Two tokens with one secret: whoever holds it could not be told apart (nor their role,
    // an auditor's secret reused as an admin's): neither is accepted.
    if let Some((a, b)) = twin {
        if warn_now() {
            tracing::warn!(first = %a, second = %b, "two admin tokens have the same secret: both are refused until one is changed");
        }
        return Err(Reason::AuthnInvalidKey);
    }
    found.ok_or(Reason::AuthnInvalidKey)
}

/// How many key store operations of the admin API run at once (each opens the store on a
/// thread of its own): more calls get `429` rather than a thread and a database connection
/// each.
const STORE_CALLS: usize = 4;

/// Why a key store operation of the admin API did not run, or failed.
enum StoreFailure {
    Busy,
    Failed(KeyError),
}

/// Runs a key store operation on a thread of its own (the store's clients block), at most
/// [`STORE_CALLS`] at once.
async fn with_store<T: Send + 'static>(
    cfg: Config,
    actor: String,
    op: impl FnOnce(&mut KeyStore, &Config) -> Result<T, KeyError> + Send + 'static,
) -> Result<T, StoreFailure> {
    static CALLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STORE_CALLS);
    let Ok(permit) = CALLS.try_acquire() else {
        return Err(StoreFailure::Busy);
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // Held until the store call has ended, even if its caller has gone.
        let _permit = permit;
        let r = KeyStore::open(&cfg).and_then(|mut s| {
            s.set_actor(actor);
            op(&mut s, &cfg)
        });
        let _ = tx.send(r);
    });
    rx.await
        .map_err(|_| StoreFailure::Failed(KeyError::ThreadFailed))?
        .map_err(StoreFailure::Failed)
}

fn parse_duration(
    v: Option<&Value>,
    name: &str,
    default: Option<&str>,
) -> Result<Option<Duration>, String> {
    match v.and_then(Value::as_str).or(default) {
        None => Ok(None),
        Some(t) => humantime::parse_duration(t)
            .map(Some)
            .map_err(|e| format!("{name} {t:?}: {e}; write a duration such as 12h or 90d")),
    }
}

/// What a call did, for its audit event and its answer.
struct Done {
    status: StatusCode,
    body: Value,
    message: String,
    reason: Reason,
}

fn refused(status: StatusCode, reason: Reason, error: &str, message: String) -> Done {
    Done {
        status,
        body: json!({ "error": error }),
        message,
        reason,
    }
}

fn store_error(e: StoreFailure, what: &str) -> Done {
    let e = match e {
        StoreFailure::Busy => {
            return refused(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::RateLimitExceeded,
                "too many key store calls are running; retry when one has ended",
                format!("{what} refused: {STORE_CALLS} key store calls were running"),
            )
        }
        StoreFailure::Failed(e) => e,
    };
    let status = match e {
        KeyError::NoSuchKey(_) => StatusCode::NOT_FOUND,
        KeyError::NoSuchConsumer(_)
        | KeyError::ConsumerInConfig(_)
        | KeyError::BadConsumer(_)
        | KeyError::ScopeNotGranted { .. }
        | KeyError::NotActive(..) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    // Store errors name ids, consumers and paths, never a secret (the pepper's value is never
    // in them). Those of the store itself (its paths, the database's messages) go to the log
    // and the event, not to the caller.
    let text = e.to_string();
    let answer = if status == StatusCode::SERVICE_UNAVAILABLE {
        tracing::error!(error = %text, "{what} failed");
        "the key store cannot be used now; the gateway's log says why".to_string()
    } else {
        text.clone()
    };
    Done {
        status,
        body: json!({ "error": answer }),
        message: format!("{what} failed: {text}"),
        reason: Reason::AdminAction,
    }
}

/// Whether a call of this method may change something (anything but a read).
fn changes(method: &Method) -> bool {
    *method != Method::GET && *method != Method::HEAD
}

/// The event of an admin call in progress, recorded if the call is dropped before it ends:
/// cut off at the end of a shutdown's drain, or its client went away.
struct Unfinished<'a> {
    shared: &'a Shared,
    event: Option<AuditEvent>,
    method_path: String,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(mut e) = self.event.take() {
            let shutting_down = self
                .shared
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed);
            let (why, reason) = if shutting_down {
                ("interrupted at shutdown", Reason::ShuttingDown)
            } else {
                (
                    "left unanswered: the client went away",
                    Reason::ClientDisconnected,
                )
            };
            e.message = Some(format!(
                "admin API {} {why}; whether it was applied is unknown",
                self.method_path
            ));
            e.error = Some(reason);
            self.shared.record(Box::new(e));
        }
    }
}

/// Serves `/admin/v1/...`.
pub async fn handle(
    shared: Arc<Shared>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let cfg = shared.state.load().config.clone();
    let method = req.method().clone();
    // As the gateway records request paths: at most 1 KiB (a long path would fill the
    // ledger, and anyone who reaches the listener is recorded, token or not).
    let path = crate::pipeline::truncate(req.uri().path());
    let rid = crate::ids::new_id();
    let mut event = AuditEvent::new(EventKind::Admin, crate::ids::new_id(), shared.node.clone());
    event.request_id = Some(rid);
    event.client.ip = Some(peer);
    event.request.method = Some(crate::pipeline::method_name(&method));
    event.request.path = Some(path.clone());
    let auth = authenticate(&cfg, &req);
    let mut pending = Unfinished {
        shared: &shared,
        event: None,
        method_path: String::new(),
    };
    let outcome = match auth {
        Err(reason) => refused(
            StatusCode::UNAUTHORIZED,
            reason,
            "an admin token is required: Authorization: Bearer <token> ([admin.tokens.NAME])",
            format!("admin API {method} {path} refused: no valid admin token"),
        ),
        Ok((name, role)) => {
            event.actor = Some(format!("admin-token:{name}"));
            event.identity.method = Some("admin_token");
            event.identity.subject = Some(name.clone());
            event.identity.scopes = vec![role.as_str().to_string()];
            let actor = format!("admin-token:{name}");
            // From the start of a shutdown nothing is changed any more: a change must never
            // be applied after the last flush of the audit ledger.
            let shutting_down = shared
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed);
            if shutting_down && changes(&method) {
                let done = refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::ShuttingDown,
                    "the gateway is shutting down; send the change to another node or after the restart",
                    format!("admin API {method} {path} refused: the gateway is shutting down"),
                );
                return finish(&shared, event, done, rid);
            }
            // If this call is cut off (the admin listener's drain ran out at shutdown), its
            // event is still recorded, saying that the outcome is unknown.
            let mut interrupted = event.clone();
            interrupted.decision.outcome = Outcome::Allow;
            interrupted.decision.reason = Reason::AdminAction;
            interrupted.decision.policy = Some("admin_api".into());
            pending.event = Some(interrupted);
            pending.method_path = format!("{method} {path}");
            route(&shared, &cfg, role, &actor, &method, &path, req).await
        }
    };
    pending.event = None;
    finish(&shared, event, outcome, rid)
}

/// Records an admin call's event and answers it.
fn finish(
    shared: &Shared,
    mut event: AuditEvent,
    outcome: Done,
    rid: uuid::Uuid,
) -> Response<ResponseBody> {
    let allowed = outcome.reason == Reason::AdminAction && outcome.status.is_success();
    event.decision.outcome = if allowed {
        Outcome::Allow
    } else {
        Outcome::Deny
    };
    event.decision.reason = outcome.reason;
    event.decision.policy = Some("admin_api".into());
    event.response.status = outcome.status.as_u16();
    event.message = Some(cut_message(outcome.message));
    shared.record(Box::new(event));
    reply(outcome.status, outcome.body, rid)
}

/// The longest message an admin event keeps: messages quote what the caller sent (a search's
/// query string, a refused parameter), and anyone who reaches the listener is recorded.
const MESSAGE_MAX: usize = 4096;

/// `message`, cut to [`MESSAGE_MAX`] bytes (at a character boundary) and marked as cut.
fn cut_message(mut message: String) -> String {
    if message.len() > MESSAGE_MAX {
        let mut end = MESSAGE_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(" ... (cut)");
    }
    message
}

// A request body is read whole, but never more than `MAX_BODY` bytes.
#[allow(clippy::disallowed_methods)]
async fn route(
    shared: &Shared,
    cfg: &Config,
    role: AdminRole,
    actor: &str,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Done {
    let query = req.uri().query().map(str::to_string);
    // Each segment percent-decoded on its own (a consumer named `a/b` is `a%2Fb`); one that
    // is not valid percent-encoding stays as it came, and names nothing.
    let decoded: Vec<String> = path
        .strip_prefix("/admin/v1/")
        .unwrap_or_default()
        .split('/')
        .filter(|p| !p.is_empty())
        .map(|p| percent_decoded(p).unwrap_or_else(|| p.to_string()))
        .collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let write = changes(method);
    let known = matches!(
        (method.as_str(), parts.as_slice()),
        ("GET", ["consumers"])
            | ("GET", ["audit"])
            | ("POST", ["consumers"])
            | ("DELETE", ["consumers", _])
            | ("GET", ["keys"])
            | ("POST", ["keys"])
            | ("POST", ["keys", _, "rotate" | "revoke"])
    );
    if !known {
        return refused(
            StatusCode::NOT_FOUND,
            Reason::RouteNotFound,
            "no such admin call: GET /admin/v1/consumers, GET|POST /admin/v1/keys, POST /admin/v1/keys/{id}/rotate|revoke",
            format!("admin API {method} {path}: no such call"),
        );
    }
    if write && role != AdminRole::Admin {
        return refused(
            StatusCode::FORBIDDEN,
            Reason::AuthzMissingRole,
            "this call changes state and needs a token with role \"admin\"; this one is \"auditor\"",
            format!("admin API {method} {path} refused: role auditor may only read"),
        );
    }
    let body: Value = if write {
        let read = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
        let bytes = match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    Reason::RequestMalformed,
                    "the body could not be read (at most 64 KiB, within 10 s)",
                    format!("admin API {method} {path}: unreadable body"),
                )
            }
        };
        // A shutdown that began while the body came: nothing is changed any more.
        if shared
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::ShuttingDown,
                "the gateway is shutting down; send the change to another node or after the restart",
                format!("admin API {method} {path} refused: the gateway is shutting down"),
            );
        }
        if bytes.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return refused(
                        StatusCode::BAD_REQUEST,
                        Reason::RequestMalformed,
                        "the body must be a JSON object",
                        format!("admin API {method} {path}: the body is not a JSON object"),
                    )
                }
            }
        }
    } else {
        Value::Null
    };
    let now = crate::now_ms();
    let ok = |status: StatusCode, body: Value, message: String| Done {
        status,
        body,
        message,
        reason: Reason::AdminAction,
    };
    let bad = |e: String| {
        refused(
            StatusCode::BAD_REQUEST,
            Reason::RequestMalformed,
            &e,
            format!("admin API {method} {path}: {e}"),
        )
    };
    match parts.as_slice() {
        ["audit"] => match search(cfg, query.as_deref()).await {
            // The filter goes into the auditor's own event: who searched for what.
            Ok(Found {
                events,
                scanned,
                next,
            }) => {
                let count = events.len();
                // The events moved into the answer, not copied (a page may be large).
                let mut body = json!({ "count": count, "scanned": scanned, "next": next });
                body["events"] = Value::Array(events);
                ok(
                    StatusCode::OK,
                    body,
                    format!(
                        "searched the audit ledger ({}): {count} events",
                        query.as_deref().unwrap_or("no filter"),
                    ),
                )
            }
            Err(SearchFailure::Bad(e)) => bad(e),
            Err(SearchFailure::Busy) => refused(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::RateLimitExceeded,
                "two searches are running already; retry when one has ended",
                format!("admin API {method} {path}: refused, two searches were running"),
            ),
            Err(SearchFailure::Failed(e)) => {
                tracing::error!(error = %e, "an audit search failed");
                refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::AuditUnavailable,
                    "the audit ledger cannot be searched now; the gateway's log says why",
                    format!("admin API {method} {path}: the search failed: {e}"),
                )
            }
        },
        ["consumers"] if *method == Method::GET => {
            let mut list: Vec<Value> = cfg
                .consumers
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name, "scopes": c.scopes, "roles": c.roles,
                        "allow_ips": c.allow_ips.as_ref().map(|n| n.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
                        "metadata": c.metadata,
                        "source": "config",
                    })
                })
                .collect();
            match with_store(cfg.clone(), actor.to_string(), |s, _| s.consumers()).await {
                Ok(stored) => {
                    list.extend(stored.iter().map(|c| {
                        let mut v = serde_json::to_value(c).expect("a consumer serialises");
                        v["source"] = "store".into();
                        v
                    }));
                    ok(
                        StatusCode::OK,
                        json!({ "consumers": list }),
                        "listed consumers".into(),
                    )
                }
                Err(e) => store_error(e, "listing consumers"),
            }
        }
        ["consumers"] => {
            let consumer: crate::keystore::StoredConsumer =
                match serde_json::from_value(body.clone()) {
                    Ok(c) => c,
                    Err(e) => {
                        return bad(format!(
                            "a consumer is {{\"name\", \"scopes\"?, \"roles\"?, \"allow_ips\"?, \"metadata\"?}}: {e}"
                        ))
                    }
                };
            let name = consumer.name.clone();
            match with_store(cfg.clone(), actor.to_string(), move |s, c| {
                let new = s.put_consumer(c, consumer)?;
                let saved = s.consumers()?.into_iter().find(|k| k.name == name);
                Ok((new, saved))
            })
            .await
            {
                Ok((new, Some(saved))) => {
                    let mut v = serde_json::to_value(&saved).expect("a consumer serialises");
                    v["source"] = "store".into();
                    ok(
                        if new {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        },
                        v,
                        format!(
                            "{} consumer {} in the store",
                            if new { "added" } else { "updated" },
                            saved.name
                        ),
                    )
                }
                Ok((_, None)) => store_error(
                    StoreFailure::Failed(KeyError::BadConsumer(
                        "was saved but cannot be read back".into(),
                    )),
                    "saving a consumer",
                ),
                Err(e) => store_error(e, "saving a consumer"),
            }
        }
        ["consumers", name] => {
            let who = name.to_string();
            match with_store(cfg.clone(), actor.to_string(), move |s, c| {
                s.remove_consumer(c, &who)
            })
            .await
            {
                Ok(revoked) => ok(
                    StatusCode::OK,
                    json!({ "name": name, "removed": true, "keys_revoked": revoked }),
                    format!("removed consumer {name} from the store; {revoked} keys revoked"),
                ),
                Err(StoreFailure::Failed(KeyError::NoSuchConsumer(_))) => refused(
                    StatusCode::NOT_FOUND,
                    Reason::AdminAction,
                    "no consumer of that name in the store",
                    format!("admin API DELETE {path}: no such consumer in the store"),
                ),
                Err(e) => store_error(e, &format!("removing consumer {name}")),
            }
        }
        ["keys"] if *method == Method::GET => {
            match with_store(cfg.clone(), actor.to_string(), |s, _| s.list()).await {
                Ok(keys) => {
                    let list: Vec<Value> = keys.iter().map(|k| key_json(k, cfg, now)).collect();
                    ok(
                        StatusCode::OK,
                        json!({ "keys": list }),
                        "listed keys".into(),
                    )
                }
                Err(e) => store_error(e, "listing keys"),
            }
        }
        ["keys"] => {
            let Some(consumer) = body
                .get("consumer")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return bad("\"consumer\" is required".into());
            };
            let scopes = match body.get("scopes") {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => Some(
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                Some(_) => return bad("\"scopes\" must be a list of strings".into()),
            };
            // As `keys create --expires-in`: a time past what the store holds is refused, not
            // clamped (nor wrapped around to one that expired at once).
            let expires_at = match parse_duration(body.get("expires_in"), "expires_in", None) {
                Ok(None) => None,
                Ok(Some(d)) => match u64::try_from(d.as_millis())
                    .ok()
                    .and_then(|ms| now.checked_add(ms))
                {
                    Some(t) => Some(t),
                    None => return bad("expires_in is too far in the future".into()),
                },
                Err(e) => return bad(e),
            };
            let who = consumer.clone();
            match with_store(cfg.clone(), actor.to_string(), move |s, c| {
                s.create(c, &who, scopes, expires_at)
            })
            .await
            {
                Ok((k, secret)) => {
                    let mut v = key_json(&k, cfg, now);
                    v["secret"] = secret.into();
                    ok(
                        StatusCode::CREATED,
                        v,
                        format!("issued key {} for consumer {}", k.key_id, k.consumer),
                    )
                }
                Err(e) => store_error(e, &format!("issuing a key for {consumer}")),
            }
        }
        ["keys", id, "rotate"] => {
            let grace = match parse_duration(body.get("grace"), "grace", Some("24h")) {
                Ok(d) => d.unwrap_or_default(),
                Err(e) => return bad(e),
            };
            let key_id = id.to_string();
            match with_store(cfg.clone(), actor.to_string(), move |s, c| {
                s.rotate(c, &key_id, grace)
            })
            .await
            {
                Ok((k, secret)) => {
                    let mut v = key_json(&k, cfg, now);
                    v["secret"] = secret.into();
                    ok(
                        StatusCode::OK,
                        v,
                        format!(
                            "rotated key {id}: new key {}, the old one works for {}",
                            k.key_id,
                            humantime::format_duration(grace)
                        ),
                    )
                }
                Err(e) => store_error(e, &format!("rotating key {id}")),
            }
        }
        ["keys", id, "revoke"] => {
            let key_id = id.to_string();
            match with_store(cfg.clone(), actor.to_string(), move |s, _| {
                s.revoke(&key_id)
            })
            .await
            {
                Ok(changed) => ok(
                    StatusCode::OK,
                    json!({ "key_id": id, "revoked": true, "already_revoked": !changed }),
                    format!("revoked key {id}"),
                ),
                Err(e) => store_error(e, &format!("revoking key {id}")),
            }
        }
        _ => bad("no such call".into()),
    }
}

/// `%XX` decoded (a `+` stays a `+`: it is an offset's sign in a time); `None` if it is not
/// valid percent-encoding of UTF-8.
fn percent_decoded(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why an audit search gave no answer.
enum SearchFailure {
    /// The caller's query (`400`).
    Bad(String),
    /// [`SEARCHES`] are running already (`429`).
    Busy,
    /// The ledger could not be read (`503`; the detail goes to the log and the event, not to
    /// the caller).
    Failed(String),
}

impl From<String> for SearchFailure {
    fn from(e: String) -> Self {
        SearchFailure::Bad(e)
    }
}

/// One page of an audit search.
struct Found {
    events: Vec<Value>,
    /// Records read.
    scanned: u64,
    /// The last record's sequence number when the page is full (`after=` for the next one).
    next: Option<u64>,
}

/// Searches running at once: each may read the whole ledger.
const SEARCHES: usize = 2;
static SEARCHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SEARCHES);

/// `GET /admin/v1/audit`: the ledger searched on a thread of its own (it reads files), at
/// most [`SEARCHES`] at once.
async fn search(cfg: &Config, query: Option<&str>) -> Result<Found, SearchFailure> {
    let mut filter = crate::ledger::SearchFilter::default();
    let mut limit = 100usize;
    let when = |k: &str, v: &str| -> Result<std::time::SystemTime, String> {
        apiwarden_core::units::parse_time(v, std::time::SystemTime::now())
            .map_err(|e| format!("{k}={e}"))
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Values as a client encodes them (`since=2026-11-25T10%3A00%3A00Z`).
        let v = percent_decoded(v).ok_or_else(|| format!("{k}: invalid percent-encoding"))?;
        match k {
            "consumer" => filter.consumer = Some(v),
            "key" => filter.key = Some(v),
            "ip" => filter.ip = Some(v),
            "status" => {
                filter.status = Some(v.parse().map_err(|_| format!("status={v:?} is not a number"))?)
            }
            "decision" if v == "allow" || v == "deny" => filter.decision = Some(v),
            "decision" => return Err(format!("decision={v:?}: allow or deny").into()),
            "since" => filter.since = Some(when(k, &v)?),
            "until" => filter.until = Some(when(k, &v)?),
            "after" => {
                filter.after = Some(
                    v.parse()
                        .map_err(|_| format!("after={v:?}: a sequence number (the last page's `next`)"))?,
                )
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| format!("limit={v:?}: a number from 1 to 10000"))?
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: consumer, key, ip, status, decision, since, until, limit, after"
                )
                .into())
            }
        }
    }
    let dir = cfg.storage.data_dir.join("ledger");
    let key = cfg.audit.encryption_key.clone();
    let permit = SEARCHING.try_acquire().map_err(|_| SearchFailure::Busy)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // Held until the search has ended, even if its caller has gone.
        let _permit = permit;
        let result = (|| -> Result<Found, String> {
            let opener = match &key {
                Some(k) => Some(
                    crate::ledger_crypt::master_from(k)
                        .and_then(|m| crate::ledger_crypt::Opener::load(&dir, &m))
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            let mut events = Vec::new();
            let mut last = 0;
            // A page also ends at [`PAGE_BYTES`] of records, whatever `limit` says: events can
            // be large (a long path, a long message), and a page is held whole.
            let mut bytes = 0usize;
            let mut full = false;
            let stats = crate::ledger_index::search_until(
                &dir,
                opener.as_ref(),
                &filter,
                limit,
                |seq, raw, e| {
                    bytes += raw.len();
                    events.push(e.clone());
                    last = seq;
                    full = bytes >= PAGE_BYTES;
                    // The search ends with the page: nothing is read past it.
                    if full {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                },
            )
            .map_err(|e| e.to_string())?;
            Ok(Found {
                // A full page: more may match after its last record.
                next: (full || events.len() == limit).then_some(last),
                events,
                // Records read: the index's candidates, and those past it read one by one.
                scanned: stats.candidates + stats.scanned,
            })
        })();
        let _ = tx.send(result);
    });
    rx.await
        .unwrap_or_else(|_| Err("the search stopped unexpectedly".into()))
        .map_err(SearchFailure::Failed)
}
