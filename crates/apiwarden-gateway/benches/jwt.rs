//! Checking a JWT: cold (parse, ECDSA P-256 or Ed25519 signature, claims) and cached (a token
//! verified before: its keyed tag). The issuer's keys come from a JWKS served on loopback.
//! `cargo bench -p apiwarden-gateway --bench jwt`.

use apiwarden_core::config::parse;
use apiwarden_gateway::jwt::Issuer;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::json;
use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves one fixed JWKS to every connection, one request per connection.
fn jwks_server(body: String) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn jwt(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let es_alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let es = EcdsaKeyPair::from_pkcs8(
        es_alg,
        EcdsaKeyPair::generate_pkcs8(es_alg, &rng).unwrap().as_ref(),
        &rng,
    )
    .unwrap();
    let ed =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let p = es.public_key().as_ref();
    let jwks = json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "es", "x": b64(&p[1..33]), "y": b64(&p[33..65])},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed.public_key().as_ref())},
    ]});
    let addr = jwks_server(jwks.to_string());
    let text = format!(
        "[jwt.bench]\nissuer = \"https://idp.example\"\njwks_url = \"http://{addr}/jwks\"\naudiences = [\"api\"]\n"
    );
    let cfg = parse(&text, "bench.toml").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let issuer = Issuer::new("bench", cfg.jwt["bench"].clone(), Arc::default());
    let exp = apiwarden_gateway::now_ms() / 1000 + 3600;
    let token =
        |alg: &str, kid: &str, n: u64| {
            let input =
                format!(
            "{}.{}",
            b64(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string().as_bytes()),
            b64(json!({"iss": "https://idp.example", "aud": "api", "sub": format!("user-{n}"),
                "client_id": "bench", "scope": "orders:read orders:write", "exp": exp})
            .to_string()
            .as_bytes())
        );
            let sig = match alg {
                "ES256" => es.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
                _ => ed.sign(input.as_bytes()).as_ref().to_vec(),
            };
            format!("{input}.{}", b64(&sig))
        };
    // The first check fetches the keys.
    rt.block_on(async {
        let first = token("ES256", "es", 0);
        let start = Instant::now();
        while issuer.check(&first).await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(5), "keys not fetched");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let mut g = c.benchmark_group("jwt_check");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    let mut n = 1;
    for (alg, kid, name) in [("ES256", "es", "cold_es256"), ("EdDSA", "ed", "cold_eddsa")] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Tokens never seen before, made outside the timed part.
                let tokens: Vec<String> = (0..iters)
                    .map(|_| {
                        n += 1;
                        token(alg, kid, n)
                    })
                    .collect();
                rt.block_on(async {
                    let start = Instant::now();
                    for t in &tokens {
                        assert!(issuer.check(black_box(t)).await.is_ok());
                    }
                    start.elapsed()
                })
            })
        });
    }
    let hot = token("ES256", "es", 0);
    g.bench_function("cached_es256", |b| {
        b.iter(|| rt.block_on(async { assert!(issuer.check(black_box(&hot)).await.is_ok()) }))
    });
    g.finish();
}

criterion_group!(benches, jwt);
criterion_main!(benches);
