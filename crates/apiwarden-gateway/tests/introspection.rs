//! Opaque bearer tokens against a real gateway and a real token introspection endpoint
//! (RFC 7662) on loopback that checks the gateway's client credentials and counts its calls:
//! every answer and refusal with its audit fields, the cache of active answers, the negative
//! cache under a flood of made-up tokens, an endpoint that is down or misbehaves, and that
//! neither the token nor the client secret leaks.

// The test's endpoint reads small request bodies whole.
#![allow(clippy::disallowed_methods)]

mod common;

use apiwarden_core::event::{Outcome, Reason};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENT_ID: &str = "gateway client";
/// With bytes that form-encoding changes (RFC 6749 §2.3.1).
const CLIENT_SECRET: &str = "introspection-secret/+=:xyzzy";
const ISS: &str = "https://idp.example.com";

fn now() -> i64 {
    (apiwarden_gateway::now_ms() / 1000) as i64
}

fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// The test's authorization server: a fixed table of token → introspection answer (unknown
/// tokens are inactive), a few tokens that make it misbehave, and counters.
struct Server {
    addr: SocketAddr,
    /// Calls with the right credentials, by token.
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Calls refused for their credentials.
    unauthorized: Arc<AtomicUsize>,
}

impl Server {
    async fn start(answers: HashMap<String, Value>) -> Server {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let unauthorized = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(answers);
        let expected = format!(
            "Basic {}",
            STANDARD.encode("gateway+client:introspection-secret%2F%2B%3D%3Axyzzy")
        );
        let (c, u) = (calls.clone(), unauthorized.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (c, u, a, expected) = (c.clone(), u.clone(), answers.clone(), expected.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, u, a, expected) =
                            (c.clone(), u.clone(), a.clone(), expected.clone());
                        async move {
                            let reply = |status: u16, body: String| {
                                let mut r = http::Response::new(Full::new(Bytes::from(body)));
                                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            };
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            if req.method() != http::Method::POST
                                || req.uri().path() != "/introspect"
                                || h("content-type") != "application/x-www-form-urlencoded"
                            {
                                return reply(400, "{\"error\":\"invalid_request\"}".into());
                            }
                            if h("authorization") != expected {
                                u.fetch_add(1, Relaxed);
                                return reply(401, "{\"error\":\"invalid_client\"}".into());
                            }
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let form: HashMap<String, String> = std::str::from_utf8(&body)
                                .unwrap()
                                .split('&')
                                .filter_map(|kv| kv.split_once('='))
                                .map(|(k, v)| (form_decode(k), form_decode(v)))
                                .collect();
                            assert_eq!(
                                form.get("token_type_hint").map(String::as_str),
                                Some("access_token")
                            );
                            let token = form.get("token").cloned().unwrap_or_default();
                            *c.lock().unwrap().entry(token.clone()).or_default() += 1;
                            match token.as_str() {
                                "tok-500" => reply(500, "oops".into()),
                                "tok-not-json" => reply(200, "<html>maintenance</html>".into()),
                                "tok-no-active" => reply(200, "{\"sub\":\"x\"}".into()),
                                "tok-slow-active" => {
                                    tokio::time::sleep(Duration::from_millis(1200)).await;
                                    reply(200, a["tok-active"].to_string())
                                }
                                "tok-slow" => {
                                    tokio::time::sleep(Duration::from_secs(3)).await;
                                    reply(200, "{\"active\":true}".into())
                                }
                                t => reply(
                                    200,
                                    a.get(t)
                                        .cloned()
                                        .unwrap_or(json!({"active": false}))
                                        .to_string(),
                                ),
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server {
            addr,
            calls,
            unauthorized,
        }
    }

    fn calls(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
}

fn answers() -> HashMap<String, Value> {
    let t = now();
    let active = json!({
        "active": true, "sub": "user-7", "client_id": "billing-app", "username": "alice",
        "scope": "orders:read orders:write", "iss": ISS, "aud": ["other-api", "orders-api"],
        "exp": t + 300, "iat": t - 10, "token_type": "Bearer",
    });
    let with = |change: Value| {
        let mut c = active.clone();
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    HashMap::from([
        ("tok-active".to_string(), active.clone()),
        (
            "tok-username".to_string(),
            with(
                json!({"sub": null, "exp": null, "client_id": "unknown-app", "aud": "orders-api", "scope": "orders:read"}),
            ),
        ),
        ("tok-inactive".to_string(), json!({"active": false})),
        ("tok-expired".to_string(), with(json!({"exp": t - 10}))),
        ("tok-not-yet".to_string(), with(json!({"nbf": t + 600}))),
        (
            "tok-wrong-aud".to_string(),
            with(json!({"aud": "billing-api"})),
        ),
        ("tok-no-aud".to_string(), with(json!({"aud": null}))),
        (
            "tok-wrong-iss".to_string(),
            with(json!({"iss": "https://evil.example"})),
        ),
        (
            "tok-no-scope".to_string(),
            with(json!({"scope": "profile"})),
        ),
        ("tok-short".to_string(), with(json!({"exp": t + 2}))),
    ])
}

const HS_SECRET: &str = "a shared secret of more than thirty-two bytes";

fn config(up: SocketAddr, server: &Server, dir: &std::path::Path, down: SocketAddr) -> String {
    let secret = dir.join("introspection.secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    let wrong = dir.join("wrong.secret");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let hs = dir.join("hs.secret");
    std::fs::write(&hs, HS_SECRET).unwrap();
    let a = server.addr;
    format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [introspection.idp]\nurl = \"http://{a}/introspect\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"file:{s}\"\n\
         audiences = [\"orders-api\"]\nissuer = \"{ISS}\"\ncache_ttl = \"60s\"\nnegative_cache_ttl = \"1s\"\ntimeout = \"1s\"\n\n\
         [introspection.badcreds]\nurl = \"http://{a}/introspect\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"file:{w}\"\n\n\
         [introspection.down]\nurl = \"http://{down}/introspect\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"file:{s}\"\ntimeout = \"300ms\"\n\n\
         [jwt.hs]\nissuer = \"hs-issuer\"\naudiences = [\"orders-api\"]\nsecret = \"file:{hs}\"\n\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"introspection\"]\nintrospection = \"idp\"\nscopes = [\"orders:read\"]\n\n\
         [[routes]]\nname = \"mixed\"\npath_prefix = \"/mixed\"\nupstream = \"echo\"\nauth = [\"jwt\", \"introspection\", \"api_key\"]\njwt = \"hs\"\nintrospection = \"idp\"\n\n\
         [[routes]]\nname = \"badcreds\"\npath_prefix = \"/badcreds\"\nupstream = \"echo\"\nauth = [\"introspection\"]\nintrospection = \"badcreds\"\n\n\
         [[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"echo\"\nauth = [\"introspection\"]\nintrospection = \"down\"\n\n\
         [[consumers]]\nname = \"billing-app\"\nroles = [\"reader\"]\ntoken_issuers = [\"idp\"]\n",
        s = secret.display(),
        w = wrong.display(),
        hs = hs.display(),
    )
}

async fn setup() -> (TestGateway, Server) {
    let server = Server::start(answers()).await;
    let up = echo_upstream().await;
    let down = closed_port().await;
    let dir = temp_dir("introspection");
    let gw = start(&config(up, &server, &dir, down)).await;
    (gw, server)
}

async fn call(gw: &TestGateway, path: &str, token: &str) -> (u16, String, String) {
    let req = http::Request::get(gw.url(path))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(req).await;
    let rid = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, body, rid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_endpoint_and_what_the_gateway_makes_of_it() {
    let (gw, server) = setup().await;
    struct Case {
        name: &'static str,
        path: &'static str,
        token: &'static str,
        status: u16,
        reason: Reason,
    }
    let case = |name, path, token, status, reason| Case {
        name,
        path,
        token,
        status,
        reason,
    };
    let cases = [
        case("active", "/orders", "tok-active", 200, Reason::Ok),
        case(
            "username as subject, no exp",
            "/orders",
            "tok-username",
            200,
            Reason::Ok,
        ),
        case(
            "inactive",
            "/orders",
            "tok-inactive",
            401,
            Reason::AuthnTokenInactive,
        ),
        case(
            "unknown to the server",
            "/orders",
            "never-issued",
            401,
            Reason::AuthnTokenInactive,
        ),
        case(
            "expired",
            "/orders",
            "tok-expired",
            401,
            Reason::AuthnTokenExpired,
        ),
        case(
            "not yet valid",
            "/orders",
            "tok-not-yet",
            401,
            Reason::AuthnTokenNotYetValid,
        ),
        case(
            "wrong audience",
            "/orders",
            "tok-wrong-aud",
            401,
            Reason::AuthnWrongAudience,
        ),
        case(
            "no audience",
            "/orders",
            "tok-no-aud",
            401,
            Reason::AuthnWrongAudience,
        ),
        case(
            "wrong issuer",
            "/orders",
            "tok-wrong-iss",
            401,
            Reason::AuthnWrongIssuer,
        ),
        case(
            "active, without the route's scope",
            "/orders",
            "tok-no-scope",
            403,
            Reason::AuthzMissingScope,
        ),
        case(
            "server error",
            "/orders",
            "tok-500",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "not JSON",
            "/orders",
            "tok-not-json",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "no `active`",
            "/orders",
            "tok-no-active",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "slower than the timeout",
            "/orders",
            "tok-slow",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "credentials refused by the server",
            "/badcreds",
            "tok-active",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "server down",
            "/down",
            "tok-active",
            503,
            Reason::AuthnIntrospectionUnavailable,
        ),
        case(
            "mixed route: an opaque token is introspected",
            "/mixed",
            "tok-active",
            200,
            Reason::Ok,
        ),
        case(
            "mixed route: a JWS goes to the JWT issuer",
            "/mixed",
            "eyJhbGciOiJIUzI1NiJ9.e30.c2ln",
            401,
            Reason::AuthnBadSignature,
        ),
    ];
    let mut everything = String::new();
    for c in &cases {
        let (status, body, rid) = call(&gw, c.path, c.token).await;
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let e = event_of(&gw, &rid).await;
        assert_eq!(e.decision.reason, c.reason, "{}", c.name);
        assert_eq!(e.response.status, c.status, "{}", c.name);
        let json: Value = serde_json::from_str(&body).unwrap();
        if c.status == 200 {
            assert_eq!(e.decision.outcome, Outcome::Allow, "{}", c.name);
            assert_eq!(e.identity.method, Some("introspection"), "{}", c.name);
            // The token is not passed on to the upstream.
            assert_eq!(json["headers"]["authorization"], Value::Null, "{}", c.name);
        } else {
            assert_eq!(e.decision.outcome, Outcome::Deny, "{}", c.name);
            assert_eq!(json["request_id"], rid.as_str(), "{}", c.name);
        }
        if c.status == 503 {
            assert!(
                json["error"].as_str().unwrap().contains("retry later"),
                "{}: {body}",
                c.name
            );
        }
        everything.push_str(&body);
    }
    assert!(
        server.unauthorized.load(Relaxed) >= 1,
        "the wrong secret was sent"
    );
    assert_eq!(
        server.calls("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
        0,
        "a JWS on a route with jwt is not introspected"
    );

    // The audit fields.
    let (_, _, rid) = call(&gw, "/orders", "tok-active").await;
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.identity.method, Some("introspection"));
    assert_eq!(e.identity.subject.as_deref(), Some("user-7"));
    assert_eq!(e.identity.consumer.as_deref(), Some("billing-app"));
    assert_eq!(e.identity.scopes, vec!["orders:read", "orders:write"]);
    assert_eq!(e.identity.key_id, None);
    let (_, _, rid) = call(&gw, "/orders", "tok-username").await;
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.identity.subject.as_deref(), Some("alice"));
    assert_eq!(e.identity.consumer.as_deref(), Some("unknown-app"));
    assert_eq!(e.identity.scopes, vec!["orders:read"]);
    let (_, _, rid) = call(&gw, "/orders", "tok-no-scope").await;
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.identity.method, Some("introspection"));
    assert_eq!(e.identity.scopes, vec!["profile"]);

    // Neither a token nor the client secret in any error body or audit event.
    for e in gw.sink.events() {
        everything.push_str(&serde_json::to_string(&e).unwrap());
    }
    for c in &cases {
        assert!(
            !everything.contains(c.token),
            "{}: the token leaked",
            c.name
        );
    }
    for secret in [
        CLIENT_SECRET,
        "introspection-secret",
        "not-the-secret",
        HS_SECRET,
    ] {
        assert!(!everything.contains(secret), "a secret leaked");
    }
    assert!(!everything
        .contains(&STANDARD.encode("gateway+client:introspection-secret%2F%2B%3D%3Axyzzy")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_token_is_introspected_once_and_never_past_its_exp() {
    let (gw, server) = setup().await;
    let (status, body, _) = call(&gw, "/orders", "tok-active").await;
    assert_eq!(status, 200, "{body}");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = gw.url("/orders");
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let req = http::Request::get(&url)
                    .header("authorization", "Bearer tok-active")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                assert_eq!(send(req).await.0, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        server.calls("tok-active"),
        1,
        "201 requests, one introspection"
    );
    let m = "apiwarden_introspection_tokens_total{name=\"idp\",result=";
    assert_eq!(metric(&gw, &format!("{m}\"introspected\"}} ")), 1);
    assert_eq!(metric(&gw, &format!("{m}\"cached\"}} ")), 200);
    assert_eq!(metric(&gw, &format!("{m}\"refused\"}} ")), 0);
    assert_eq!(
        metric(&gw, "apiwarden_introspection_errors_total{name=\"idp\"} "),
        0
    );

    // A positive answer is cached only until the token's `exp`, then asked again.
    assert_eq!(call(&gw, "/orders", "tok-short").await.0, 200);
    assert_eq!(call(&gw, "/orders", "tok-short").await.0, 200);
    assert_eq!(server.calls("tok-short"), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, rid) = call(&gw, "/orders", "tok-short").await;
    assert_eq!(status, 401);
    assert_eq!(
        event_of(&gw, &rid).await.decision.reason,
        Reason::AuthnTokenExpired
    );
    assert_eq!(server.calls("tok-short"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_tokens_is_bounded_by_the_negative_cache() {
    let (gw, server) = setup().await;
    // 20 distinct tokens, each sent 10 times: one call per token.
    for round in 0..10 {
        for i in 0..20 {
            let (status, body, _) = call(&gw, "/orders", &format!("garbage-{i}")).await;
            assert_eq!(status, 401, "round {round}: {body}");
        }
    }
    assert_eq!(server.total_calls(), 20);
    let m = "apiwarden_introspection_tokens_total{name=\"idp\",result=";
    assert_eq!(metric(&gw, &format!("{m}\"refused\"}} ")), 200);
    assert_eq!(metric(&gw, &format!("{m}\"introspected\"}} ")), 0);
    // The same for refusals of active tokens (wrong audience).
    for _ in 0..10 {
        assert_eq!(call(&gw, "/orders", "tok-wrong-aud").await.0, 401);
    }
    assert_eq!(server.calls("tok-wrong-aud"), 1);
    // After `negative_cache_ttl` (1s here), the server is asked again: a token that became
    // valid is not refused for long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&gw, "/orders", "garbage-0").await.0, 401);
    assert_eq!(server.calls("garbage-0"), 2);
    // Failures are not cached: the next request asks again.
    assert_eq!(call(&gw, "/orders", "tok-500").await.0, 503);
    assert_eq!(call(&gw, "/orders", "tok-500").await.0, 503);
    assert_eq!(server.calls("tok-500"), 2);
    assert_eq!(
        metric(&gw, "apiwarden_introspection_errors_total{name=\"idp\"} "),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_survive_a_reload_that_keeps_the_endpoint() {
    let (gw, server) = setup().await;
    assert_eq!(call(&gw, "/orders", "tok-active").await.0, 200);
    // The same file again, with one more route: the endpoint's settings are unchanged.
    let path = gw.dir.join("apiwarden.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[[routes]]\nname = \"new\"\npath_prefix = \"/new\"\nupstream = \"echo\"\nauth = [\"introspection\"]\nintrospection = \"idp\"\n");
    std::fs::write(&path, text).unwrap();
    gw.gw.reload().expect("reload");
    assert_eq!(call(&gw, "/new", "tok-active").await.0, 200);
    assert_eq!(call(&gw, "/orders", "tok-active").await.0, 200);
    assert_eq!(server.calls("tok-active"), 1);
}

/// Regression (found by review): `audit.strict_timeout` counted from the request's start, so
/// a request whose token took longer to introspect than the timeout was refused `503
/// audit.unavailable` by a ledger that was only slow, never stuck. It counts from the hand-over
/// of the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_timeout_counts_from_the_record_not_from_the_request() {
    let server = Server::start(answers()).await;
    let up = echo_upstream().await;
    let down = closed_port().await;
    let dir = temp_dir("introspection-strict");
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}\n\
         [introspection.slow]\nurl = \"http://{}/introspect\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"file:{}\"\ntimeout = \"3s\"\n\n\
         [[routes]]\nname = \"slow\"\npath_prefix = \"/slow\"\nupstream = \"echo\"\nauth = [\"introspection\"]\nintrospection = \"slow\"\n\n\
         [audit]\ndurability = \"strict\"\nstrict_timeout = \"1s\"\n",
        config(up, &server, &dir, down),
        server.addr,
        dir.join("introspection.secret").display(),
    );
    let path = dir.join("apiwarden.toml");
    std::fs::write(&path, &text).unwrap();
    let config = apiwarden_core::config::parse(&text, &path.display().to_string()).unwrap();
    // Every record answered durable 300 ms after it is handed over.
    let sink = Arc::new(LedgerDouble {
        delay: Some(Duration::from_millis(300)),
        ..Default::default()
    });
    let gw = apiwarden_gateway::Gateway::start(apiwarden_gateway::Options {
        config,
        config_path: Some(path),
        sink: sink.clone(),
        node: "test-node".into(),
    })
    .await
    .unwrap();
    // 1.2 s to introspect, then 0.3 s for the record: 1.5 s in all, the record's own wait
    // well within its 1 s.
    let since = std::time::Instant::now();
    let req = http::Request::get(format!("http://{}/slow/x", gw.addr))
        .header("authorization", "Bearer tok-slow-active")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
    assert!(since.elapsed() >= Duration::from_millis(1500));
    assert_eq!(server.calls("tok-slow-active"), 1);
    let received: Vec<_> = sink
        .events
        .events()
        .into_iter()
        .filter(|e| e.phase == Some("received"))
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].request.route_name.as_deref(), Some("slow"));
}
