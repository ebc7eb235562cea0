//! The admin API on a real admin listener: tokens with roles, keys managed through it as
//! through the command line (and in force on the gateway within a second), and an `admin`
//! audit event with the actor for every call, allowed or refused, holding no secret.

mod common;

use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef0123456789abcdef";
const AUDITOR_TOKEN: &str = "auditor-token-0123456789abcdef0123456789abcdef";

async fn admin(
    gw: &TestGateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.gw.admin_addr));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, _, text) = send(req.body(Full::new(Bytes::from(body))).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn status_with_key(gw: &TestGateway, key: &str) -> u16 {
    let req = http::Request::get(gw.url("/orders"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(req).await.0
}

/// Waits until the gateway answers `want` for `key`; returns how long that took.
async fn until_status(gw: &TestGateway, key: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        if status_with_key(gw, key).await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the gateway did not answer {want} within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gateway with an `admin` token (`ops`) and an `auditor` token (`audit`), one API key route
/// needing `orders:read`, and the config consumer `billing`.
async fn start_with_tokens() -> TestGateway {
    let dir = temp_dir("admin-api");
    std::fs::write(dir.join("admin.token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::write(dir.join("auditor.token"), AUDITOR_TOKEN).unwrap();
    let up = echo_upstream().await;
    let gw = start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [admin.tokens.ops]\nrole = \"admin\"\nsecret = \"file:{dir}/admin.token\"\n\
         [admin.tokens.audit]\nrole = \"auditor\"\nsecret = \"file:{dir}/auditor.token\"\n\n\
         [[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\"]\n",
        dir = dir.display()
    ))
    .await;

    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_managed_through_the_admin_api_with_roles_and_audit() {
    let gw = start_with_tokens().await;

    // Refused: no token, a wrong token, an auditor writing, an unknown call.
    let (s, body) = admin(&gw, "GET", "/admin/v1/keys", None, None).await;
    assert_eq!(s, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("admin token"));
    let (s, _) = admin(
        &gw,
        "GET",
        "/admin/v1/keys",
        Some("not-the-token-but-long-enough-to-count"),
        None,
    )
    .await;
    assert_eq!(s, 401);
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(AUDITOR_TOKEN),
        Some(json!({"consumer": "billing"})),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, _) = admin(&gw, "POST", "/admin/v1/everything", Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 404);

    // Reading: an auditor may.
    let (s, body) = admin(&gw, "GET", "/admin/v1/keys", Some(AUDITOR_TOKEN), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["keys"], json!([]));
    let (s, body) = admin(&gw, "GET", "/admin/v1/consumers", Some(AUDITOR_TOKEN), None).await;
    assert_eq!(s, 200);
    assert_eq!(body["consumers"][0]["name"], "billing");

    // Issuing: the key works on the gateway.
    let (s, created) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "billing", "expires_in": "30d"})),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let first = created["secret"].as_str().unwrap().to_string();
    let first_id = created["key_id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "active");
    assert!(
        created.get("hash").is_none(),
        "the hash is never shown: {created}"
    );
    until_status(&gw, &first, 200).await;
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "nobody"})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nobody"));
    let (s, _) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "billing", "expires_in": "soon"})),
    )
    .await;
    assert_eq!(s, 400);

    // Rotating without grace: the old key stops, the new one works.
    let (s, rotated) = admin(
        &gw,
        "POST",
        &format!("/admin/v1/keys/{first_id}/rotate"),
        Some(ADMIN_TOKEN),
        Some(json!({"grace": "0s"})),
    )
    .await;
    assert_eq!(s, 200, "{rotated}");
    let second = rotated["secret"].as_str().unwrap().to_string();
    let second_id = rotated["key_id"].as_str().unwrap().to_string();
    until_status(&gw, &second, 200).await;
    until_status(&gw, &first, 401).await;

    // Revoking: refused within a second.
    let (s, body) = admin(
        &gw,
        "POST",
        &format!("/admin/v1/keys/{second_id}/revoke"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let took = until_status(&gw, &second, 401).await;
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    let (s, _) = admin(
        &gw,
        "POST",
        "/admin/v1/keys/000000000000/revoke",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, body) = admin(&gw, "GET", "/admin/v1/keys", Some(AUDITOR_TOKEN), None).await;
    assert_eq!(s, 200);
    let statuses: Vec<&str> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2);
    assert!(
        statuses.contains(&"revoked") && statuses.contains(&"expired"),
        "{statuses:?}"
    );

    // One admin event per call, with the actor; refusals with their reason; no secret.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events: Vec<AuditEvent> = gw
        .events_of(EventKind::Admin)
        .into_iter()
        .filter(|e| e.decision.policy.as_deref() == Some("admin_api"))
        .collect();
    assert_eq!(
        events.len(),
        13,
        "{:#?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    let reasons: Vec<(Reason, Outcome, Option<&str>, u16)> = events
        .iter()
        .map(|e| {
            (
                e.decision.reason,
                e.decision.outcome,
                e.actor.as_deref(),
                e.response.status,
            )
        })
        .collect();
    assert_eq!(reasons[0], (Reason::AuthnMissing, Outcome::Deny, None, 401));
    assert_eq!(
        reasons[1],
        (Reason::AuthnInvalidKey, Outcome::Deny, None, 401)
    );
    assert_eq!(
        reasons[2],
        (
            Reason::AuthzMissingRole,
            Outcome::Deny,
            Some("admin-token:audit"),
            403
        )
    );
    assert_eq!(
        reasons[3],
        (
            Reason::RouteNotFound,
            Outcome::Deny,
            Some("admin-token:ops"),
            404
        )
    );
    assert_eq!(
        reasons[6],
        (
            Reason::AdminAction,
            Outcome::Allow,
            Some("admin-token:ops"),
            201
        )
    );
    assert!(events[6].message.as_deref().unwrap().contains(&first_id));
    // The changes themselves, as every gateway following the store records them.
    let deadline = Instant::now() + Duration::from_secs(2);
    let changes = loop {
        let changes: Vec<AuditEvent> = gw
            .events_of(EventKind::Admin)
            .into_iter()
            .filter(|e| e.decision.policy.as_deref() == Some("keys"))
            .collect();
        if changes.len() >= 3 || Instant::now() > deadline {
            break changes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let said: Vec<&str> = changes
        .iter()
        .filter_map(|e| e.message.as_deref())
        .collect();
    assert_eq!(changes.len(), 3, "created, rotated, revoked: {said:#?}");
    assert!(changes
        .iter()
        .all(|e| e.actor.as_deref() == Some("admin-token:ops")));
    assert!(
        said[0].contains("created") && said[1].contains("rotated") && said[2].contains("revoked"),
        "{said:#?}"
    );
    let all = serde_json::to_string(&gw.sink.events()).unwrap();
    for secret in [ADMIN_TOKEN, AUDITOR_TOKEN, &first, &second] {
        assert!(!all.contains(secret), "a secret reached the audit trail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_kept_in_the_store_through_the_admin_api() {
    let gw = start_with_tokens().await;
    let consumer = json!({"name": "partner", "scopes": ["orders:read"], "roles": ["reader"],
        "allow_ips": ["127.0.0.1"], "metadata": {"team": "payments"}});
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(AUDITOR_TOKEN),
        Some(consumer.clone()),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, added) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(consumer),
    )
    .await;
    assert_eq!(s, 201, "{added}");
    assert_eq!(added["allow_ips"], json!(["127.0.0.1"]));
    assert_eq!(added["metadata"]["team"], "payments");
    // A consumer of the config file is not shadowed; bad input is refused with its reason.
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "billing"})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("config file"),
        "{body}"
    );
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "x", "allow_ips": ["not-an-ip"]})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let (s, listed) = admin(&gw, "GET", "/admin/v1/consumers", Some(AUDITOR_TOKEN), None).await;
    assert_eq!(s, 200);
    let sources: Vec<(String, String)> = listed["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        vec![
            ("billing".into(), "config".into()),
            ("partner".into(), "store".into())
        ]
    );

    // A key for the stored consumer works on the gateway, with its scopes.
    let (s, created) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "partner"})),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let key = created["secret"].as_str().unwrap().to_string();
    assert_eq!(created["scopes"], json!(["orders:read"]));
    until_status(&gw, &key, 200).await;

    // Narrowing the consumer narrows its keys at once (within the store's poll).
    let (s, _) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "partner", "scopes": []})),
    )
    .await;
    assert_eq!(s, 200);
    until_status(&gw, &key, 403).await;

    // Removing it revokes its keys.
    let (s, body) = admin(
        &gw,
        "DELETE",
        "/admin/v1/consumers/partner",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["keys_revoked"], 1);
    let took = until_status(&gw, &key, 401).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (s, _) = admin(
        &gw,
        "DELETE",
        "/admin/v1/consumers/partner",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // The changes are in the audit trail with their actor.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said: Vec<String> = gw
        .events_of(EventKind::Admin)
        .into_iter()
        .filter(|e| e.decision.policy.as_deref() == Some("keys"))
        .map(|e| {
            format!(
                "{} | {}",
                e.actor.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect();
    for want in [
        "consumer added partner",
        "consumer updated partner",
        "revoked",
        "consumer removed partner",
    ] {
        assert!(
            said.iter()
                .any(|m| m.contains(want) && m.starts_with("admin-token:ops")),
            "{want}: {said:#?}"
        );
    }
}

#[tokio::test]
async fn changes_are_refused_once_a_shutdown_has_begun() {
    let gw = start_with_tokens().await;
    // The first thing a shutdown does; the admin listener keeps answering while requests
    // drain (readiness, reads), but applies no change that could land after the last flush.
    gw.gw
        .shared
        .shutting_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, body) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "billing"})),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    let (s, body) = admin(&gw, "GET", "/admin/v1/keys", Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["keys"].as_array().map(Vec::len), Some(0), "{body}");
    let events = gw.events_of(EventKind::Admin);
    let refused = events
        .iter()
        .find(|e| e.request.method.as_deref() == Some("POST"))
        .expect("the refused change is recorded");
    assert_eq!(refused.decision.reason, Reason::ShuttingDown);
    assert_eq!(refused.response.status, 503);
    assert_eq!(refused.actor.as_deref(), Some("admin-token:ops"));
}

/// Regressions (found by a review of the admin API): errors had no `request_id` (nor
/// `X-Request-Id`, nor `WWW-Authenticate` on 401); a long path went whole into the ledger for
/// anyone who could reach the listener; calls just outside `/admin/v1/` were not recorded; a
/// consumer could name a token issuer that does not exist, and its issuers were not in the
/// change's record; a huge `expires_in` wrapped to a key that expired at once; a non-ASCII
/// `since` panicked the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_errors_are_identified_bounded_and_recorded() {
    let gw = start_with_tokens().await;
    // 401: the body's id is the header's, and the event's.
    let (status, headers, text) = send(
        http::Request::get(format!("http://{}/admin/v1/keys", gw.gw.admin_addr))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    // A caller without a token keeps no connection.
    assert_eq!(headers["connection"], "close");
    let body: Value = serde_json::from_str(&text).unwrap();
    let rid = headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(body["request_id"], rid.as_str());
    let ev = wait_admin_events(&gw, 1).await;
    assert_eq!(ev[0].request_id.map(|r| r.to_string()), Some(rid));
    // A path of 60 KB: recorded, cut to 1 KiB.
    let long = format!("/admin/v1/{}", "a".repeat(60_000));
    let (status, _) = admin(&gw, "GET", &long, None, None).await;
    assert_eq!(status, 401);
    let ev = wait_admin_events(&gw, 2).await;
    assert_eq!(ev[1].request.path.as_deref().map(str::len), Some(1024));
    assert!(ev[1].message.as_deref().unwrap().len() < 1200);
    // A query of 20 KB, quoted in the refusal: the event's message is cut to 4 KiB.
    let query = format!("/admin/v1/audit?{}=1", "q".repeat(20_000));
    let (status, body) = admin(&gw, "GET", &query, Some(AUDITOR_TOKEN), None).await;
    assert_eq!(status, 400, "{body}");
    let ev = wait_admin_events(&gw, 3).await;
    let msg = ev[2].message.as_deref().unwrap();
    assert!(
        msg.len() <= 4096 + 16 && msg.ends_with("(cut)"),
        "{}",
        msg.len()
    );
    // Just outside `/admin/v1/`: authenticated, answered 404, recorded.
    let (status, body) = admin(&gw, "POST", "/admin/v2/keys", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    let ev = wait_admin_events(&gw, 4).await;
    assert_eq!(ev[3].request.path.as_deref(), Some("/admin/v2/keys"));
    // The listener's own 404 has an id too.
    let (status, body) = admin(&gw, "GET", "/nothing", None, None).await;
    assert_eq!(status, 404);
    assert!(body["request_id"].is_string(), "{body}");
    // A token issuer that no table of the config defines.
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "partner", "roles": ["payments-admin"], "token_issuers": ["corp"]})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("\"corp\""),
        "{body}"
    );
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "partner", "scopes": ["orders:read"], "metadata": {"team": "x"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // A name with a slash, percent-encoded in the path, is removed by its name.
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(ADMIN_TOKEN),
        Some(json!({"name": "team/a"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin(
        &gw,
        "DELETE",
        "/admin/v1/consumers/team%2Fa",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!((status, &body["name"]), (200, &json!("team/a")), "{body}");
    // A huge expiry is refused, as the command line refuses it (it once wrapped around to a
    // key that expired at once, then was clamped); a far one that fits is a far one.
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "partner", "expires_in": "18446744073709552s"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "expires_in is too far in the future");
    let (status, key) = admin(
        &gw,
        "POST",
        "/admin/v1/keys",
        Some(ADMIN_TOKEN),
        Some(json!({"consumer": "partner", "expires_in": "100years"})),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    until_status(&gw, &secret, 200).await;
    // A time that is not one: refused with its reason, not a dropped connection.
    let (status, body) = admin(
        &gw,
        "GET",
        "/admin/v1/audit?since=%E2%82%AC%C3%A9%E2%82%AC",
        Some(AUDITOR_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // What the consumer change recorded names its issuers and metadata.
    let changes = gw.events_of(EventKind::Admin);
    assert!(
        changes.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("token_issuers none") && m.contains("metadata team"))),
        "{:?}",
        changes
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
    );
}

/// The admin events so far, once there are at least `n`.
async fn wait_admin_events(gw: &TestGateway, n: usize) -> Vec<AuditEvent> {
    let start = Instant::now();
    loop {
        let ev = gw.events_of(EventKind::Admin);
        if ev.len() >= n {
            return ev;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{ev:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression (found by review): two admin tokens with the same secret were both accepted, the
/// last one configured winning, so an auditor's secret reused for an `admin` token (or the
/// other way round) gave whichever role came last. Such a secret is refused, whichever token
/// it is presented as; the other tokens go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admin_tokens_with_one_secret_are_both_refused() {
    let dir = temp_dir("admin-twins");
    std::fs::write(dir.join("admin.token"), ADMIN_TOKEN).unwrap();
    std::fs::write(dir.join("auditor.token"), AUDITOR_TOKEN).unwrap();
    let gw = start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [admin.tokens.reader]\nrole = \"auditor\"\nsecret = \"file:{dir}/auditor.token\"\n\
         [admin.tokens.ops]\nrole = \"admin\"\nsecret = \"file:{dir}/admin.token\"\n\
         [admin.tokens.copy]\nrole = \"admin\"\nsecret = \"file:{dir}/auditor.token\"\n",
        dir = dir.display()
    ))
    .await;
    let (status, body) = admin(&gw, "GET", "/admin/v1/keys", Some(AUDITOR_TOKEN), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/v1/consumers",
        Some(AUDITOR_TOKEN),
        Some(json!({"name": "partner"})),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // The token with a secret of its own still works.
    let (status, body) = admin(&gw, "GET", "/admin/v1/keys", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    let ev = wait_admin_events(&gw, 3).await;
    assert_eq!(ev[0].decision.reason, Reason::AuthnInvalidKey);
    assert_eq!(ev[1].decision.reason, Reason::AuthnInvalidKey);
    assert_eq!(ev[2].actor.as_deref(), Some("admin-token:ops"));
}

/// Regression (found by review): the admin listener kept every connection it accepted, so a
/// client opening connections without end held a socket and a task each. Beyond
/// `ADMIN_MAX_CONNECTIONS` a new one is closed at once, and once some close, new ones are
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_connections_beyond_its_cap() {
    use apiwarden_gateway::admin::ADMIN_MAX_CONNECTIONS;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_with_tokens().await;
    let addr = gw.gw.admin_addr;
    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";
    async fn answer(c: &mut tokio::net::TcpStream) -> String {
        let mut buf = vec![0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("an answer or a close")
        {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
            Err(_) => String::new(),
        }
    }
    let mut held = Vec::new();
    for _ in 0..ADMIN_MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The last one answered: every one before it was accepted (the listener takes them in
    // order).
    let last = held.last_mut().unwrap();
    last.write_all(HEALTHZ).await.unwrap();
    assert!(answer(last).await.starts_with("HTTP/1.1 200"));
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = over.write_all(HEALTHZ).await;
    assert_eq!(answer(&mut over).await, "", "closed without an answer");
    held.truncate(ADMIN_MAX_CONNECTIONS - 10);
    let t = Instant::now();
    loop {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(HEALTHZ).await;
        if answer(&mut c).await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression (found by review): a request the admin listener's HTTP parser refused (hyper
/// answers it itself) left no event, while every other call to the listener is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_admin_parser_refuses_are_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_with_tokens().await;
    let mut c = tokio::net::TcpStream::connect(gw.gw.admin_addr)
        .await
        .unwrap();
    c.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let ev = wait_admin_events(&gw, 1).await;
    assert_eq!(
        (
            ev[0].decision.reason,
            ev[0].decision.outcome,
            ev[0].response.status
        ),
        (Reason::RequestMalformed, Outcome::Deny, 400)
    );
    assert!(ev[0].client.ip.is_some_and(|ip| ip.is_loopback()));
    assert!(ev[0].request_id.is_some());
}
