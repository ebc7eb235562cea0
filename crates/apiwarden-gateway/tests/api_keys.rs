//! API keys against a real gateway: the whole decision space, each case asserting the status
//! the client sees, the reason code and the audit fields; and no secret anywhere.

mod common;

use apiwarden_core::event::{AuditEvent, Outcome, Reason};
use apiwarden_gateway::keystore::KeyStore;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::time::{Duration, Instant};

fn config(up: std::net::SocketAddr) -> String {
    format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"read\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:read\"]\n\n\
         [[routes]]\nname = \"write\"\npath_prefix = \"/write\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nscopes = [\"orders:write\"]\n\n\
         [[routes]]\nname = \"ops\"\npath_prefix = \"/ops\"\nupstream = \"echo\"\nauth = [\"api_key\"]\nroles = [\"operator\"]\n\n\
         [[routes]]\nname = \"mtls\"\npath_prefix = \"/mtls\"\nupstream = \"echo\"\nauth = [\"mtls\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\", \"orders:write\"]\n\n\
         [[consumers]]\nname = \"operator\"\nroles = [\"operator\"]\n\n\
         [[consumers]]\nname = \"local\"\nscopes = [\"orders:read\"]\nallow_ips = [\"127.0.0.0/8\"]\n\n\
         [[consumers]]\nname = \"remote\"\nscopes = [\"orders:read\"]\nallow_ips = [\"10.0.0.0/8\"]\n"
    )
}

async fn call(gw: &TestGateway, path: &str, header: Option<(&str, String)>) -> (u16, String) {
    let mut req = http::Request::get(gw.url(path));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let (status, _, body) = send(req.body(Full::new(Bytes::new())).unwrap()).await;
    (status, body)
}

fn bearer(key: &str) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {key}")))
}

/// Waits until the gateway has read the keys written by another connection.
async fn until_known(gw: &TestGateway, key: &str) {
    let start = Instant::now();
    while call(gw, "/orders", bearer(key)).await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the gateway did not pick up new keys"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_decision_space_of_api_keys() {
    let up = echo_upstream().await;
    let gw = start(&config(up)).await;
    let cfg = gw.gw.shared.state.load().config.clone();
    let mut store = KeyStore::open(&cfg).unwrap();
    let now = apiwarden_gateway::now_ms();

    let (good, good_text) = store.create(&cfg, "billing", None, None).unwrap();
    let (_, read_only) = store
        .create(&cfg, "billing", Some(vec!["orders:read".into()]), None)
        .unwrap();
    let (_, expired) = store.create(&cfg, "billing", None, Some(now - 1)).unwrap();
    let (revoked_rec, revoked) = store.create(&cfg, "billing", None, None).unwrap();
    store.revoke(&revoked_rec.key_id).unwrap();
    let (in_grace_rec, in_grace) = store.create(&cfg, "billing", None, None).unwrap();
    let (_, rotated_new) = store
        .rotate(&cfg, &in_grace_rec.key_id, Duration::from_secs(3600))
        .unwrap();
    let (past_grace_rec, past_grace) = store.create(&cfg, "billing", None, None).unwrap();
    store
        .rotate(&cfg, &past_grace_rec.key_id, Duration::ZERO)
        .unwrap();
    let (_, wrong_ip) = store.create(&cfg, "remote", None, None).unwrap();
    let (_, right_ip) = store.create(&cfg, "local", None, None).unwrap();
    let (_, operator_key) = store.create(&cfg, "operator", None, None).unwrap();
    let wrong_secret = format!("aw_{}_{}", good.key_id, "0".repeat(64));
    let unknown = format!("aw_{}_{}", "0".repeat(12), "1".repeat(64));
    // Made last: once the gateway knows it, it knows every key above.
    let (_, sentinel) = store.create(&cfg, "billing", None, None).unwrap();
    until_known(&gw, &sentinel).await;
    // The sentinel's own events are recorded as their bodies end: wait until no more arrive.
    let mut before = gw.request_events().len();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = gw.request_events().len();
        if now == before {
            break;
        }
        before = now;
    }

    struct Case {
        name: &'static str,
        path: &'static str,
        header: Option<(&'static str, String)>,
        status: u16,
        reason: Reason,
    }
    let cases = [
        Case {
            name: "missing",
            path: "/orders",
            header: None,
            status: 401,
            reason: Reason::AuthnMissing,
        },
        Case {
            name: "malformed bearer",
            path: "/orders",
            header: bearer("not-a-key"),
            status: 401,
            reason: Reason::AuthnMalformed,
        },
        Case {
            name: "other scheme",
            path: "/orders",
            header: Some(("authorization", format!("Basic {good_text}"))),
            status: 401,
            reason: Reason::AuthnMalformed,
        },
        Case {
            name: "unknown key",
            path: "/orders",
            header: bearer(&unknown),
            status: 401,
            reason: Reason::AuthnInvalidKey,
        },
        Case {
            name: "wrong secret",
            path: "/orders",
            header: bearer(&wrong_secret),
            status: 401,
            reason: Reason::AuthnInvalidKey,
        },
        Case {
            name: "expired",
            path: "/orders",
            header: bearer(&expired),
            status: 401,
            reason: Reason::AuthnExpiredKey,
        },
        Case {
            name: "revoked",
            path: "/orders",
            header: bearer(&revoked),
            status: 401,
            reason: Reason::AuthnRevokedKey,
        },
        Case {
            name: "rotated, within grace",
            path: "/orders",
            header: bearer(&in_grace),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "rotated, the new key",
            path: "/orders",
            header: bearer(&rotated_new),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "rotated, after grace",
            path: "/orders",
            header: bearer(&past_grace),
            status: 401,
            reason: Reason::AuthnExpiredKey,
        },
        Case {
            name: "right IP",
            path: "/orders",
            header: bearer(&right_ip),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "wrong IP",
            path: "/orders",
            header: bearer(&wrong_ip),
            status: 403,
            reason: Reason::AuthzIpNotAllowed,
        },
        Case {
            name: "missing role",
            path: "/ops",
            header: bearer(&good_text),
            status: 403,
            reason: Reason::AuthzMissingRole,
        },
        Case {
            name: "right role",
            path: "/ops",
            header: bearer(&operator_key),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "wrong scope",
            path: "/write",
            header: bearer(&read_only),
            status: 403,
            reason: Reason::AuthzMissingScope,
        },
        Case {
            name: "right everything",
            path: "/write",
            header: bearer(&good_text),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "wrong secret of a key in use",
            path: "/orders",
            header: bearer(&wrong_secret),
            status: 401,
            reason: Reason::AuthnInvalidKey,
        },
        Case {
            name: "X-API-Key",
            path: "/orders",
            header: Some(("x-api-key", good_text.clone())),
            status: 200,
            reason: Reason::Ok,
        },
        Case {
            name: "a bearer token on a route that accepts only client certificates",
            path: "/mtls",
            header: bearer("an-opaque-token"),
            status: 401,
            reason: Reason::AuthnMalformed,
        },
    ];
    let mut bodies = String::new();
    for (i, c) in cases.iter().enumerate() {
        let (status, body) = call(&gw, c.path, c.header.clone()).await;
        assert_eq!(status, c.status, "{}: {body}", c.name);
        if status != 200 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(json["request_id"].is_string(), "{}", c.name);
        }
        if c.status == 200 {
            // The key is not passed on: the echo upstream shows what it received.
            let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                echoed["headers"]["authorization"].is_null(),
                "{}: {body}",
                c.name
            );
            assert!(
                echoed["headers"]["x-api-key"].is_null(),
                "{}: {body}",
                c.name
            );
        }
        bodies.push_str(&body);
        let events = gw.wait_for_events(before + i + 1).await;
        let e: &AuditEvent = &events[before + i];
        assert_eq!(e.decision.reason, c.reason, "{}", c.name);
        assert_eq!(e.response.status, c.status, "{}", c.name);
        assert_eq!(
            e.decision.outcome,
            if c.status == 200 {
                Outcome::Allow
            } else {
                Outcome::Deny
            },
            "{}",
            c.name
        );
        match c.name {
            "right everything" => {
                assert_eq!(e.identity.method, Some("api_key"));
                assert_eq!(e.identity.consumer.as_deref(), Some("billing"));
                assert_eq!(e.identity.key_id.as_deref(), Some(good.key_id.as_str()));
                assert_eq!(e.identity.scopes, ["orders:read", "orders:write"]);
            }
            "wrong IP" => assert_eq!(e.identity.consumer.as_deref(), Some("remote")),
            "wrong scope" => {
                assert_eq!(e.identity.consumer.as_deref(), Some("billing"));
                assert_eq!(e.identity.scopes, ["orders:read"]);
            }
            _ => {}
        }
    }

    // No secret in any answer or event.
    let events = serde_json::to_string(&gw.request_events()).unwrap();
    for secret in [
        &good_text,
        &read_only,
        &wrong_ip,
        &right_ip,
        &operator_key,
        &expired,
        &revoked,
        &in_grace,
        &rotated_new,
        &past_grace,
    ] {
        let s = &secret[16..];
        assert!(!events.contains(s), "a secret reached the audit events");
        assert!(!bodies.contains(s), "a secret reached a response body");
    }

    // last_used is written back (every 10 s, and when the gateway stops).
    let gw = std::sync::Arc::try_unwrap(gw.gw)
        .ok()
        .expect("no other handle");
    gw.shutdown().await;
    let keys = store.list().unwrap();
    let k = keys.iter().find(|k| k.key_id == good.key_id).unwrap();
    assert!(k.last_used.is_some_and(|t| t >= now), "{k:?}");
    assert!(keys.iter().all(|k| k.hash.len() == 32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_within_a_second() {
    let up = echo_upstream().await;
    let gw = start(&config(up)).await;
    let cfg = gw.gw.shared.state.load().config.clone();
    let mut store = KeyStore::open(&cfg).unwrap();
    let (k, text) = store.create(&cfg, "billing", None, None).unwrap();
    until_known(&gw, &text).await;
    store.revoke(&k.key_id).unwrap();
    let start = Instant::now();
    loop {
        let (status, _) = call(&gw, "/orders", bearer(&text)).await;
        if status == 401 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("revocation in force after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_pepper_the_gateway_refuses_keys_and_is_not_ready() {
    let up = echo_upstream().await;
    let text = format!(
        "[storage]\npepper = \"env:APIWARDEN_TEST_PEPPER_NEVER_SET\"\n\n{}",
        config(up)
    );
    let gw = start(&text).await;
    let (status, body) = call(
        &gw,
        "/orders",
        bearer(&format!("aw_{}_{}", "a".repeat(12), "b".repeat(64))),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let events = gw.wait_for_events(1).await;
    assert_eq!(events[0].decision.reason, Reason::AuthnUnavailable);
    let (status, _, body) = get(&format!("http://{}/readyz", gw.gw.admin_addr)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("API keys"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_may_opt_in_to_keys_in_the_query_string() {
    let up = echo_upstream().await;
    let gw = start(&format!(
        "{}\n[[routes]]\nname = \"legacy\"\npath_prefix = \"/legacy\"\nupstream = \"echo\"\nauth = [\"api_key\"]\napi_key_query = \"apikey\"\nscopes = [\"orders:read\"]\n",
        config(up)
    ))
    .await;
    let cfg = gw.gw.shared.state.load().config.clone();
    let mut store = KeyStore::open(&cfg).unwrap();
    let (_, key) = store.create(&cfg, "billing", None, None).unwrap();
    until_known(&gw, &key).await;

    // The opted-in route: the key works from the query; the upstream never sees it.
    let (status, body) = call(&gw, &format!("/legacy/x?a=1&apikey={key}&b=2"), None).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["query"], "a=1&b=2", "{body}");
    assert!(!body.contains(&key[16..]));
    let (status, _) = call(&gw, &format!("/legacy/x?apikey={key}"), None).await;
    assert_eq!(status, 200);
    // A header credential and a key in the query: the parameter still never goes on.
    let (status, body) = call(&gw, &format!("/legacy/y?apikey={key}&c=3"), bearer(&key)).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["query"], "c=3", "{body}");
    let (status, _) = call(&gw, "/legacy/x?apikey=aw_nothing", None).await;
    assert_eq!(status, 401);
    // Any other route: never from the query string.
    let (status, body) = call(&gw, &format!("/orders?apikey={key}"), None).await;
    assert_eq!(status, 401, "{body}");
    let mut events = gw.request_events();
    for _ in 0..200 {
        if events.iter().any(|e| {
            e.request.route_name.as_deref() == Some("read")
                && e.decision.reason == Reason::AuthnMissing
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        events = gw.request_events();
    }
    let from_query: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.request.route_name.as_deref() == Some("legacy"))
        .collect();
    assert!(!from_query.is_empty());
    for e in &events {
        let q = e.request.query.as_deref().unwrap_or("");
        assert!(
            !q.contains(&key[16..]),
            "the key is redacted in the event: {q}"
        );
    }
    assert_eq!(from_query[0].identity.method, Some("api_key"));
    assert!(
        events
            .iter()
            .any(|e| e.request.route_name.as_deref() == Some("read")
                && e.decision.reason == Reason::AuthnMissing),
        "a key in the query of a route that did not opt in is no credential"
    );
}

/// Regression: with an `X-API-Key` on a route that also takes tokens, a bearer token beside
/// it reached the upstream unchecked (an upstream reading its claims would trust a forgery).
/// On a route that takes only keys, another scheme (`Basic`, the upstream's own login) still
/// goes on, and a second key does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_beside_the_one_used_is_not_passed_on_unchecked() {
    let up = echo_upstream().await;
    let secret_file = temp_dir("hs").join("hs256.secret");
    std::fs::write(
        &secret_file,
        b"a shared secret of more than thirty-two bytes",
    )
    .unwrap();
    let gw = start(&format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [jwt.shared]\nissuer = \"hs-issuer\"\naudiences = [\"orders-api\"]\nsecret = \"file:{secret}\"\n\n\
         [[routes]]\nname = \"mixed\"\npath_prefix = \"/mixed\"\nupstream = \"echo\"\nauth = [\"api_key\", \"jwt\"]\njwt = \"shared\"\n\n\
         [[routes]]\nname = \"keys\"\npath_prefix = \"/keys\"\nupstream = \"echo\"\nauth = [\"api_key\"]\n\n\
         [[consumers]]\nname = \"billing\"\n",
        secret = secret_file.display()
    ))
    .await;
    let cfg = gw.gw.shared.state.load().config.clone();
    let mut store = KeyStore::open(&cfg).unwrap();
    let (_, key) = store.create(&cfg, "billing", None, None).unwrap();
    let (_, other_key) = store.create(&cfg, "billing", None, None).unwrap();
    let start = Instant::now();
    while call(&gw, "/keys", Some(("x-api-key", key.clone()))).await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the key was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.Zm9yZ2Vk";
    let cases: &[(&str, String, Option<&str>)] = &[
        ("/mixed", format!("Bearer {forged}"), None),
        ("/mixed", format!("bearer {other_key}"), None),
        ("/keys", format!("Bearer {other_key}"), None),
        (
            "/keys",
            "Basic dXNlcjpwdw==".to_string(),
            Some("Basic dXNlcjpwdw=="),
        ),
    ];
    for (path, authorization, passed_on) in cases {
        let req = http::Request::get(gw.url(path))
            .header("x-api-key", &key)
            .header("authorization", authorization)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = send(req).await;
        assert_eq!(status, 200, "{path} {authorization}: {body}");
        let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            echoed["headers"]["authorization"].as_str(),
            *passed_on,
            "{path} {authorization}"
        );
        assert!(echoed["headers"]["x-api-key"].is_null(), "{path}: {body}");
    }
}
