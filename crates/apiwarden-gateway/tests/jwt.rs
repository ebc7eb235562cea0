//! JWT bearer tokens against a real gateway and a real identity provider on loopback (OIDC
//! discovery and a JWKS served over HTTP), with real signatures from keys made in the test:
//! every rejection reason, the verified-token cache, the floor on key fetches, and a key
//! rotation at the issuer while traffic runs.

mod common;

use apiwarden_core::event::{Outcome, Reason};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A signing key of the test's identity provider.
enum Signer {
    Es(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
    Hs(Vec<u8>),
}

fn rng() -> SystemRandom {
    SystemRandom::new()
}

impl Signer {
    fn es256() -> Signer {
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng()).unwrap();
        Signer::Es(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng()).unwrap())
    }

    fn ed25519() -> Signer {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng()).unwrap();
        Signer::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    /// ring verifies RSA but does not make RSA keys: OpenSSL makes one (PKCS#1 DER).
    fn rsa() -> Signer {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl runs (the CI installs it)");
        assert!(out.status.success(), "openssl genpkey failed");
        Signer::Rsa(RsaKeyPair::from_der(&out.stdout).unwrap())
    }

    fn sign(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        match self {
            Signer::Es(k) => k.sign(&rng(), msg).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(msg).as_ref().to_vec(),
            Signer::Rsa(k) => {
                let pad: &dyn signature::RsaEncoding = if alg == "PS256" {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(pad, &rng(), msg, &mut sig).unwrap();
                sig
            }
            Signer::Hs(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, msg).as_ref().to_vec()
            }
        }
    }

    fn jwk(&self, kid: &str) -> Value {
        let b = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        match self {
            Signer::Es(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "x": b(&p[1..33]), "y": b(&p[33..65])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b(k.public_key().as_ref())})
            }
            Signer::Rsa(k) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "n": b(&c.n), "e": b(&c.e)})
            }
            Signer::Hs(_) => unreachable!("a shared secret is never published"),
        }
    }

    /// The RSA public key as the bytes an attacker would use as an HMAC secret.
    fn public_bytes(&self) -> Vec<u8> {
        match self {
            Signer::Rsa(k) => k.public().as_ref().to_vec(),
            _ => unreachable!(),
        }
    }
}

fn token(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn now() -> i64 {
    (apiwarden_gateway::now_ms() / 1000) as i64
}

/// The test's identity provider: discovery and a JWKS that the test can change, counting
/// how often each is fetched, and answering the JWKS after `jwks_delay_ms`.
struct Idp {
    addr: SocketAddr,
    jwks: Arc<Mutex<Value>>,
    jwks_fetches: Arc<AtomicUsize>,
    jwks_delay_ms: Arc<AtomicUsize>,
}

impl Idp {
    async fn start(jwks: Value) -> Idp {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let jwks = Arc::new(Mutex::new(jwks));
        let fetches = Arc::new(AtomicUsize::new(0));
        let delay = Arc::new(AtomicUsize::new(0));
        let (j, f, d) = (jwks.clone(), fetches.clone(), delay.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (j, f, d) = (j.clone(), f.clone(), d.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let wait = match req.uri().path() {
                            "/jwks" => d.load(Relaxed) as u64,
                            _ => 0,
                        };
                        let body = match req.uri().path() {
                            "/.well-known/openid-configuration" => json!({
                                "issuer": format!("http://{addr}"),
                                "jwks_uri": format!("http://{addr}/jwks"),
                            })
                            .to_string(),
                            "/jwks" => {
                                f.fetch_add(1, Relaxed);
                                j.lock().unwrap().to_string()
                            }
                            _ => String::new(),
                        };
                        async move {
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Idp {
            addr,
            jwks,
            jwks_fetches: fetches,
            jwks_delay_ms: delay,
        }
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }
}

const HS_SECRET: &[u8] = b"a shared secret of more than thirty-two bytes";

fn config(up: SocketAddr, idp: &Idp, secret_file: &std::path::Path) -> String {
    format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [jwt.idp]\nissuer = \"{iss}\"\naudiences = [\"orders-api\"]\nleeway = \"30s\"\nmin_refresh = \"300ms\"\n\n\
         [jwt.shared]\nissuer = \"hs-issuer\"\naudiences = [\"orders-api\"]\nsecret = \"file:{secret}\"\n\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"echo\"\nauth = [\"jwt\"]\njwt = \"idp\"\nscopes = [\"orders:read\"]\n\n\
         [[routes]]\nname = \"ops\"\npath_prefix = \"/ops\"\nupstream = \"echo\"\nauth = [\"jwt\", \"api_key\"]\njwt = \"idp\"\nroles = [\"operator\"]\n\n\
         [[routes]]\nname = \"hs\"\npath_prefix = \"/hs\"\nupstream = \"echo\"\nauth = [\"jwt\"]\njwt = \"shared\"\n\n\
         [[consumers]]\nname = \"billing-app\"\nroles = [\"reader\"]\ntoken_issuers = [\"idp\"]\n\n\
         [[consumers]]\nname = \"ops-app\"\nroles = [\"operator\"]\ntoken_issuers = [\"idp\"]\n\n\
         [[consumers]]\nname = \"admin-app\"\nroles = [\"operator\"]\n",
        iss = idp.issuer(),
        secret = secret_file.display(),
    )
}

async fn call(
    gw: &TestGateway,
    path: &str,
    header: Option<(&str, String)>,
) -> (u16, String, String) {
    let mut req = http::Request::get(gw.url(path));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let (status, headers, body) = send(req.body(Full::new(Bytes::new())).unwrap()).await;
    let rid = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, body, rid)
}

fn bearer(t: &str) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {t}")))
}

/// A gateway with this file's routes in front of an echo upstream, trusting `idp` (and the
/// shared HS256 secret), once it holds the issuer's keys.
async fn gateway_for(idp: &Idp, tag: &str) -> TestGateway {
    let secret_file = temp_dir(tag).join("hs256.secret");
    std::fs::write(&secret_file, HS_SECRET).unwrap();
    let up = echo_upstream().await;
    let gw = start(&config(up, idp, &secret_file)).await;
    until_ready(&gw).await;
    gw
}

async fn until_ready(gw: &TestGateway) {
    let url = format!("http://{}/readyz", gw.gw.admin_addr);
    let start = Instant::now();
    while get(&url).await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the issuer's keys were not fetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_decision_space_of_jwt() {
    let es = Signer::es256();
    let ed = Signer::ed25519();
    let rsa = Signer::rsa();
    let other = Signer::es256();
    let idp = Idp::start(json!({"keys": [es.jwk("es-1"), ed.jwk("ed-1"), rsa.jwk("rsa-1")]})).await;
    let gw = gateway_for(&idp, "jwt").await;

    let iss = idp.issuer();
    let t = now();
    let claims = json!({
        "iss": iss, "aud": "orders-api", "sub": "user-42", "client_id": "billing-app",
        "scope": "orders:read orders:write", "iat": t, "nbf": t - 5, "exp": t + 300,
    });
    let with = |change: Value| {
        let mut c = claims.clone();
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let signed = |s: &Signer, alg: &str, kid: &str, c: &Value| {
        token(&json!({"alg": alg, "kid": kid, "typ": "JWT"}), c, |m| {
            s.sign(alg, m)
        })
    };
    let es_ok = signed(&es, "ES256", "es-1", &claims);
    let tampered = {
        let parts: Vec<&str> = es_ok.split('.').collect();
        let forged =
            URL_SAFE_NO_PAD.encode(with(json!({"scope": "orders:read admin"})).to_string());
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    let confusion = {
        // The RSA public key, as published, used as an HMAC secret.
        let secret = rsa.public_bytes();
        let header = json!({"alg": "HS256", "kid": "rsa-1"});
        token(&header, &claims, |m| {
            Signer::Hs(secret.clone()).sign("HS256", m)
        })
    };
    let hs_claims = with(json!({"iss": "hs-issuer"}));

    struct Case {
        name: &'static str,
        path: &'static str,
        header: Option<(&'static str, String)>,
        status: u16,
        reason: Reason,
    }
    let case = |name, path, header, status, reason| Case {
        name,
        path,
        header,
        status,
        reason,
    };
    let cases = [
        case("ES256", "/orders", bearer(&es_ok), 200, Reason::Ok),
        case(
            "RS256",
            "/orders",
            bearer(&signed(&rsa, "RS256", "rsa-1", &claims)),
            200,
            Reason::Ok,
        ),
        case(
            "PS256",
            "/orders",
            bearer(&signed(&rsa, "PS256", "rsa-1", &claims)),
            200,
            Reason::Ok,
        ),
        case(
            "EdDSA",
            "/orders",
            bearer(&signed(&ed, "EdDSA", "ed-1", &claims)),
            200,
            Reason::Ok,
        ),
        case(
            "aud list, azp, scp list",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(
                    json!({"aud": ["other", "orders-api"], "client_id": null, "azp": "ops-app", "scope": null, "scp": ["orders:read"]}),
                ),
            )),
            200,
            Reason::Ok,
        ),
        case(
            "expired within the leeway",
            "/orders",
            bearer(&signed(&es, "ES256", "es-1", &with(json!({"exp": t - 10})))),
            200,
            Reason::Ok,
        ),
        case("missing", "/orders", None, 401, Reason::AuthnMissing),
        case(
            "not a JWS",
            "/orders",
            bearer("abc.def"),
            401,
            Reason::AuthnMalformed,
        ),
        case(
            "a JWT in X-API-Key",
            "/orders",
            Some(("x-api-key", es_ok.clone())),
            401,
            Reason::AuthnMalformed,
        ),
        case(
            "alg none",
            "/orders",
            bearer(&token(&json!({"alg": "none"}), &claims, |_| Vec::new())),
            401,
            Reason::AuthnAlgNone,
        ),
        case(
            "alg None, any case",
            "/orders",
            bearer(&token(
                &json!({"alg": "nOnE", "kid": "es-1"}),
                &claims,
                |_| Vec::new(),
            )),
            401,
            Reason::AuthnAlgNone,
        ),
        case(
            "HS256 with the RSA public key as secret",
            "/orders",
            bearer(&confusion),
            401,
            Reason::AuthnAlgConfusion,
        ),
        case(
            "ES256 naming the RSA key",
            "/orders",
            bearer(&signed(&es, "ES256", "rsa-1", &claims)),
            401,
            Reason::AuthnAlgConfusion,
        ),
        case(
            "an algorithm not allowed",
            "/orders",
            bearer(&signed(&rsa, "RS384", "rsa-1", &claims)),
            401,
            Reason::AuthnAlgNotAllowed,
        ),
        case(
            "unknown kid",
            "/orders",
            bearer(&signed(&other, "ES256", "nobody", &claims)),
            401,
            Reason::AuthnUnknownKid,
        ),
        case(
            "a key not published under a known kid",
            "/orders",
            bearer(&signed(&other, "ES256", "es-1", &claims)),
            401,
            Reason::AuthnBadSignature,
        ),
        case(
            "payload changed after signing",
            "/orders",
            bearer(&tampered),
            401,
            Reason::AuthnBadSignature,
        ),
        case(
            "wrong issuer",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"iss": "https://evil.example"})),
            )),
            401,
            Reason::AuthnWrongIssuer,
        ),
        case(
            "wrong audience",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"aud": "billing-api"})),
            )),
            401,
            Reason::AuthnWrongAudience,
        ),
        case(
            "no audience",
            "/orders",
            bearer(&signed(&es, "ES256", "es-1", &with(json!({"aud": null})))),
            401,
            Reason::AuthnWrongAudience,
        ),
        case(
            "expired",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"exp": t - 120})),
            )),
            401,
            Reason::AuthnTokenExpired,
        ),
        case(
            "not yet valid",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"nbf": t + 120})),
            )),
            401,
            Reason::AuthnTokenNotYetValid,
        ),
        case(
            "no exp",
            "/orders",
            bearer(&signed(&es, "ES256", "es-1", &with(json!({"exp": null})))),
            401,
            Reason::AuthnMalformed,
        ),
        case(
            "missing scope",
            "/orders",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"scope": "orders:write"})),
            )),
            403,
            Reason::AuthzMissingScope,
        ),
        case(
            "missing role",
            "/ops",
            bearer(&es_ok),
            403,
            Reason::AuthzMissingRole,
        ),
        case(
            "role of the token's client",
            "/ops",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"client_id": "ops-app"})),
            )),
            200,
            Reason::Ok,
        ),
        case(
            "a consumer that does not take this issuer's clients",
            "/ops",
            bearer(&signed(
                &es,
                "ES256",
                "es-1",
                &with(json!({"client_id": "admin-app"})),
            )),
            403,
            Reason::AuthzMissingRole,
        ),
        case(
            "HS256 with the shared secret",
            "/hs",
            bearer(&token(&json!({"alg": "HS256"}), &hs_claims, |m| {
                Signer::Hs(HS_SECRET.to_vec()).sign("HS256", m)
            })),
            200,
            Reason::Ok,
        ),
        case(
            "HS256 with another secret",
            "/hs",
            bearer(&token(&json!({"alg": "HS256"}), &hs_claims, |m| {
                Signer::Hs(b"another secret, also long enough to pass".to_vec()).sign("HS256", m)
            })),
            401,
            Reason::AuthnBadSignature,
        ),
        case(
            "ES256 on the HS256 issuer",
            "/hs",
            bearer(&signed(&es, "ES256", "es-1", &hs_claims)),
            401,
            Reason::AuthnAlgNotAllowed,
        ),
    ];
    let mut everything = String::new();
    for c in &cases {
        let (status, body, rid) = call(&gw, c.path, c.header.clone()).await;
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let e = event_of(&gw, &rid).await;
        assert_eq!(e.decision.reason, c.reason, "{}", c.name);
        assert_eq!(e.response.status, c.status, "{}", c.name);
        if c.status == 200 {
            assert_eq!(e.decision.outcome, Outcome::Allow, "{}", c.name);
            assert_eq!(e.identity.method, Some("jwt"), "{}", c.name);
            assert!(e.identity.consumer.is_some(), "{}", c.name);
        } else {
            assert_eq!(e.decision.outcome, Outcome::Deny, "{}", c.name);
            let json: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["request_id"], rid.as_str(), "{}", c.name);
        }
        // For 200, the body is the echo upstream's view of the request: the token is not
        // passed on to the upstream either.
        everything.push_str(&body);
        everything.push_str(&serde_json::to_string(&e).unwrap());
    }
    // The audit fields of the first case.
    let (_, _, rid) = call(&gw, "/orders", bearer(&es_ok)).await;
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.identity.subject.as_deref(), Some("user-42"));
    assert_eq!(e.identity.consumer.as_deref(), Some("billing-app"));
    assert_eq!(e.identity.scopes, vec!["orders:read", "orders:write"]);
    assert_eq!(e.identity.key_id, None);
    // No token, signature or secret in any error body or audit event.
    for c in &cases {
        if let Some((_, v)) = &c.header {
            let sig = v.rsplit('.').next().unwrap();
            assert!(
                sig.len() < 8 || !everything.contains(sig),
                "{}: a signature leaked",
                c.name
            );
        }
    }
    assert!(!everything.contains(&es_ok));
    assert!(!everything.contains(std::str::from_utf8(HS_SECRET).unwrap()));
}

/// Regression: when the issuer took longer to answer than `min_refresh`, a token with a
/// made-up `kid` fetched the key set again and again and its request never ended. Now one
/// fresh key set is all a request gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_fetches_once_even_from_a_slow_issuer() {
    let es = Signer::es256();
    let idp = Idp::start(json!({"keys": [es.jwk("es-1")]})).await;
    let gw = gateway_for(&idp, "jwt-slow").await;
    // Slower than the floor (`min_refresh` 300 ms), well within the fetch timeout (5 s).
    idp.jwks_delay_ms.store(400, Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claims = json!({"iss": idp.issuer(), "aud": "orders-api", "sub": "u", "scope": "orders:read", "exp": now() + 300});
    let made_up = token(&json!({"alg": "ES256", "kid": "made-up"}), &claims, |m| {
        es.sign("ES256", m)
    });
    let before = idp.jwks_fetches.load(Relaxed);
    let (status, body, rid) = tokio::time::timeout(
        Duration::from_secs(10),
        call(&gw, "/orders", bearer(&made_up)),
    )
    .await
    .expect("the request ends");
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        event_of(&gw, &rid).await.decision.reason,
        Reason::AuthnUnknownKid
    );
    assert_eq!(idp.jwks_fetches.load(Relaxed) - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_token_is_verified_once_and_unknown_kids_cannot_force_fetches() {
    let es = Signer::es256();
    let idp = Idp::start(json!({"keys": [es.jwk("es-1")]})).await;
    let gw = gateway_for(&idp, "jwt-cache").await;
    let t = now();
    let claims = json!({"iss": idp.issuer(), "aud": "orders-api", "sub": "u", "client_id": "billing-app", "scope": "orders:read", "exp": t + 300});
    let hot = token(&json!({"alg": "ES256", "kid": "es-1"}), &claims, |m| {
        es.sign("ES256", m)
    });
    for _ in 0..50 {
        assert_eq!(call(&gw, "/orders", bearer(&hot)).await.0, 200);
    }
    // Each worker keeps its own cache (no lock shared between cores): verified at most once
    // per worker, every other request a cache hit.
    let workers = gw.gw.shared.state.load().workers() as u64;
    let verified = metric(
        &gw,
        "apiwarden_jwt_tokens_total{issuer=\"idp\",result=\"verified\"} ",
    );
    let cached = metric(
        &gw,
        "apiwarden_jwt_tokens_total{issuer=\"idp\",result=\"cached\"} ",
    );
    assert!(
        (1..=workers).contains(&verified),
        "{verified} verifications with {workers} workers"
    );
    assert_eq!(verified + cached, 50);

    // A flood of made-up kids: fetches are bounded by the floor (300 ms), not by requests.
    let before = idp.jwks_fetches.load(Relaxed);
    let started = Instant::now();
    let other = Signer::es256();
    for i in 0..100 {
        let t = token(
            &json!({"alg": "ES256", "kid": format!("made-up-{i}")}),
            &claims,
            |m| other.sign("ES256", m),
        );
        let (status, body, _) = call(&gw, "/orders", bearer(&t)).await;
        assert_eq!(status, 401, "{body}");
    }
    let fetched = idp.jwks_fetches.load(Relaxed) - before;
    let bound = 1 + (started.elapsed().as_millis() / 300) as usize;
    println!(
        "100 unknown kids in {:?}: {fetched} JWKS fetches (bound {bound})",
        started.elapsed()
    );
    assert!(
        fetched <= bound,
        "{fetched} fetches for 100 unknown kids in {:?}",
        started.elapsed()
    );
    // The hot token still needs no work.
    assert_eq!(call(&gw, "/orders", bearer(&hot)).await.0, 200);
    assert_eq!(
        metric(
            &gw,
            "apiwarden_jwt_tokens_total{issuer=\"idp\",result=\"verified\"} "
        ),
        verified
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_at_the_issuer_while_traffic_runs() {
    let old = Arc::new(Signer::es256());
    let new = Arc::new(Signer::ed25519());
    let idp = Idp::start(json!({"keys": [old.jwk("2026-old")]})).await;
    let gw = Arc::new(gateway_for(&idp, "jwt-rotation").await);
    let iss = idp.issuer();
    let claims = move |sub: &str| json!({"iss": iss, "aud": "orders-api", "sub": sub, "client_id": "billing-app", "scope": "orders:read", "exp": now() + 300});
    let old_token = |sub: &str| {
        token(
            &json!({"alg": "ES256", "kid": "2026-old"}),
            &claims(sub),
            |m| old.sign("ES256", m),
        )
    };
    let new_token = |sub: &str| {
        token(
            &json!({"alg": "EdDSA", "kid": "2026-new"}),
            &claims(sub),
            |m| new.sign("EdDSA", m),
        )
    };
    // A token held by a client from before the rotation, verified and cached.
    let held = old_token("held");
    assert_eq!(call(&gw, "/orders", bearer(&held)).await.0, 200);

    // Traffic: clients always use the token the issuer gives out now.
    let rotated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (gw, rotated) = (gw.clone(), rotated.clone());
        let (old_t, new_t) = (old_token(&format!("c{c}")), new_token(&format!("c{c}")));
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let t = if rotated.load(Relaxed) {
                    &new_t
                } else {
                    &old_t
                };
                let (status, body, _) = call(&gw, "/orders", bearer(t)).await;
                if status == 200 {
                    ok += 1;
                } else {
                    failed.push(body);
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The rotation: the new key appears, the old one is withdrawn, new tokens are given out.
    *idp.jwks.lock().unwrap() = json!({"keys": [new.jwk("2026-new")]});
    rotated.store(true, Relaxed);
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(ok > 10, "client made only {ok} requests");
        assert!(
            failed.is_empty(),
            "requests failed during the rotation: {failed:?}"
        );
    }
    // The withdrawn key's tokens are refused now, cached or not.
    let (status, _, rid) = call(&gw, "/orders", bearer(&held)).await;
    assert_eq!(status, 401);
    assert_eq!(
        event_of(&gw, &rid).await.decision.reason,
        Reason::AuthnUnknownKid
    );
    let (status, _, _) = call(&gw, "/orders", bearer(&old_token("late"))).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuer_is_not_ready_and_refuses_with_503() {
    let closed = closed_port().await;
    let up = echo_upstream().await;
    let gw = start(&format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [jwt.idp]\nissuer = \"http://{closed}\"\naudiences = [\"a\"]\ntimeout = \"200ms\"\nmin_refresh = \"100ms\"\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"echo\"\nauth = [\"jwt\"]\n"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = {
        let r = get(&format!("http://{}/readyz", gw.gw.admin_addr)).await;
        (r.0, r.2)
    };
    assert_eq!(status, 503, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["status"]
            .as_str()
            .unwrap()
            .contains("token issuer idp"),
        "{body}"
    );
    let es = Signer::es256();
    let t = token(
        &json!({"alg": "ES256", "kid": "k"}),
        &json!({"exp": now() + 60}),
        |m| es.sign("ES256", m),
    );
    let (status, body, rid) = call(&gw, "/x", bearer(&t)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        event_of(&gw, &rid).await.decision.reason,
        Reason::AuthnKeysUnavailable
    );
    assert!(
        metric(
            &gw,
            "apiwarden_jwt_key_fetches_total{issuer=\"idp\",outcome=\"failed\"} "
        ) >= 1
    );
}
