//! Rate limits in local mode, against a real gateway over real sockets: what a client sees
//! (status, headers, body) and what the audit record says.

mod common;

use apiwarden_core::event::{Outcome, Reason};
use common::*;
use std::time::{Duration, Instant};

fn limited_route(limits: &str, policies: &str, upstream: std::net::SocketAddr) -> String {
    format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{upstream}\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"echo\"\nauth = [\"none\"]\nlimits = [{limits}]\n\n{policies}"
    )
}

/// A client on one keep-alive connection.
struct Client {
    c: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl Client {
    fn new() -> Self {
        Client { c: client() }
    }
    async fn get(&self, url: &str) -> (u16, http::HeaderMap) {
        self.get_with(url, &[]).await
    }
    async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap) {
        use http_body_util::BodyExt;
        let mut req = http::Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .c
            .request(req.body(Default::default()).unwrap())
            .await
            .expect("the gateway answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
        (status, headers)
    }
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_gets_429_with_headers_and_an_audit_record() {
    let up = echo_upstream().await;
    let gw = start(&limited_route(
        "\"per-ip\"",
        "[limits.per-ip]\nrate = \"5/m\"\nburst = 3\n",
        up,
    ))
    .await;
    let c = Client::new();
    for remaining in [2, 1, 0] {
        let (status, h) = c.get(&gw.url("/api/x")).await;
        assert_eq!(status, 200);
        assert_eq!(header(&h, "ratelimit-policy"), "\"per-ip\";q=5;w=60");
        let state = header(&h, "ratelimit");
        assert!(
            state.starts_with(&format!("\"per-ip\";r={remaining};t=")),
            "{state}"
        );
    }
    let (status, h, body) = get(&gw.url("/api/x")).await;
    assert_eq!(status, 429);
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    // 5 a minute: the next request is allowed 12 s after the first.
    assert!((11..=12).contains(&retry), "Retry-After {retry}");
    assert!(header(&h, "ratelimit").starts_with("\"per-ip\";r=0;t="));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["error"].as_str().unwrap().contains("rate limit"));
    assert_eq!(json["request_id"], header(&h, "x-request-id"));

    let events = gw.assert_events(4).await;
    let refused = events.iter().find(|e| e.response.status == 429).unwrap();
    assert_eq!(refused.decision.outcome, Outcome::Deny);
    assert_eq!(refused.decision.reason, Reason::RateLimitExceeded);
    assert_eq!(refused.decision.policy.as_deref(), Some("per-ip"));
    assert!(
        refused.upstream.name.is_none(),
        "a refused request is not forwarded"
    );
    let metrics = get(&format!("http://{}/metrics", gw.gw.admin_addr)).await.2;
    assert!(
        metrics.contains("apiwarden_limit_decisions_total{policy=\"per-ip\",outcome=\"deny\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics
        .contains("apiwarden_limit_decisions_total{policy=\"per-ip\",outcome=\"allow\"} 3\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_rate_for_ten_seconds_admits_what_gcra_allows_within_one_percent() {
    let up = echo_upstream().await;
    let (rate, burst) = (100.0, 20.0);
    let gw = start(&limited_route(
        "\"l\"",
        "[limits.l]\nrate = \"100/s\"\nburst = 20\n",
        up,
    ))
    .await;
    let c = Client::new();
    let url = gw.url("/api/flood");
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut sent = Vec::with_capacity(2_000);
    let mut admitted = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        sent.push(Instant::now());
        match c.get(&url).await.0 {
            200 => admitted += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    // What GCRA allows for exactly these arrival times (a stalled client sends less, and is
    // owed less): burst + rate x span when the client keeps up.
    let g = apiwarden_core::limit::Gcra {
        interval: 10_000_000,
        tolerance: 19 * 10_000_000,
    };
    let mut tat = None;
    let mut allowed = 0u64;
    for t in &sent {
        let d = g.decide(tat, t.duration_since(start).as_nanos() as u64 + 1);
        if d.allowed {
            tat = Some(d.tat);
            allowed += 1;
        }
    }
    let span = sent.last().unwrap().duration_since(start).as_secs_f64();
    let error = (admitted as f64 - allowed as f64).abs() / allowed as f64;
    println!(
        "offered {} in {span:.3} s, admitted {admitted}, GCRA allows {allowed} (burst + rate x span = {:.1}), error {:.3}%",
        sent.len(),
        burst + rate * span,
        error * 100.0
    );
    assert!(
        sent.len() as f64 > 1.5 * (burst + rate * span),
        "the client did send at about twice the rate"
    );
    assert!(error <= 0.01, "admitted {admitted}, GCRA allows {allowed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_exactly_at_its_rate_is_never_refused() {
    let up = echo_upstream().await;
    // 50/s with a burst of 10: a client keeping to one request every 20 ms is always within
    // it, whatever the scheduling jitter below 180 ms.
    let gw = start(&limited_route(
        "\"l\"",
        "[limits.l]\nrate = \"50/s\"\nburst = 10\n",
        up,
    ))
    .await;
    let c = Client::new();
    let url = gw.url("/api/steady");
    // Spend the burst first, so that only the steady rate is left.
    for _ in 0..10 {
        assert_eq!(c.get(&url).await.0, 200);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.tick().await;
    for i in 0..150 {
        tick.tick().await;
        // One interval of slack per request is what the burst spent above took away; the
        // ticks are exactly the rate.
        let (status, _) = c.get(&url).await;
        assert_eq!(status, 200, "request {i} at exactly the rate was refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_retry_after_is_enough() {
    let up = echo_upstream().await;
    let gw = start(&limited_route(
        "\"l\"",
        "[limits.l]\nrate = \"60/m\"\nburst = 1\n",
        up,
    ))
    .await;
    let c = Client::new();
    let url = gw.url("/api/r");
    assert_eq!(c.get(&url).await.0, 200);
    let (status, h) = c.get(&url).await;
    assert_eq!(status, 429);
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert_eq!(retry, 1);
    // Hammering while refused does not push the admission back.
    for _ in 0..20 {
        assert_eq!(c.get(&url).await.0, 429);
    }
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(c.get(&url).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_aimed_at_a_window_edge_gets_no_more_than_the_burst() {
    let up = echo_upstream().await;
    // Ten a second: a fixed one-second window would let 10 through just before a second
    // boundary and 10 more just after it.
    let gw = start(&limited_route(
        "\"l\"",
        "[limits.l]\nrate = \"10/s\"\nburst = 10\n",
        up,
    ))
    .await;
    let c = Client::new();
    let url = gw.url("/api/edge");
    // Wait until 30 ms before a wall-clock second boundary.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.subsec_millis() as u64;
    tokio::time::sleep(Duration::from_millis((1970 - into) % 1000)).await;
    let started = Instant::now();
    let mut admitted = 0;
    for _ in 0..40 {
        if c.get(&url).await.0 == 200 {
            admitted += 1;
        }
    }
    let span = started.elapsed().as_secs_f64();
    // GCRA: the burst, plus what the rate refills during the span itself.
    let allowed = 10 + (10.0 * span).ceil() as u64;
    println!("{admitted} admitted across the edge in {span:.3} s");
    assert!(admitted <= allowed, "{admitted} admitted in {span:.3} s");
    assert!(admitted >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_limits_all_apply_and_a_refusal_uses_no_budget() {
    let up = echo_upstream().await;
    let text = format!(
        "[[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"both\"\npath_prefix = \"/both\"\nupstream = \"echo\"\nauth = [\"none\"]\nlimits = [\"per-ip\", \"route-quota\"]\n\n\
         [[routes]]\nname = \"one\"\npath_prefix = \"/one\"\nupstream = \"echo\"\nauth = [\"none\"]\nlimits = [\"per-ip\"]\n\n\
         [limits.per-ip]\nrate = \"3/m\"\nkey = \"ip\"\n\n\
         [limits.route-quota]\nrate = \"2/d\"\nkey = \"route\"\n"
    );
    let gw = start(&text).await;
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/both")).await.0, 200);
    let (s, h) = c.get(&gw.url("/both")).await;
    assert_eq!(s, 200);
    assert_eq!(
        header(&h, "ratelimit-policy"),
        "\"per-ip\";q=3;w=60, \"route-quota\";q=2;w=86400"
    );
    // The tightest policy is the one the RateLimit header reports.
    assert!(header(&h, "ratelimit").starts_with("\"route-quota\";r=0;"));
    // The quota refuses; per-ip had admitted this one, and must get it back.
    let (s, h) = c.get(&gw.url("/both")).await;
    assert_eq!(s, 429);
    assert!(header(&h, "ratelimit").starts_with("\"route-quota\";r=0;"));
    // per-ip has one request left (3 a minute, 2 used): without the undo it would have none.
    assert_eq!(c.get(&gw.url("/one")).await.0, 200);
    let (s, _) = c.get(&gw.url("/one")).await;
    assert_eq!(s, 429);
    let events = gw.assert_events(5).await;
    let policies: Vec<_> = events
        .iter()
        .filter(|e| e.response.status == 429)
        .map(|e| e.decision.policy.clone().unwrap())
        .collect();
    assert_eq!(policies, ["route-quota", "per-ip"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_compound_keys_count_separately() {
    let up = echo_upstream().await;
    let gw = start(&limited_route(
        "\"tenant\"",
        "[limits.tenant]\nrate = \"1/m\"\nkey = [\"header:X-Tenant\", \"route\"]\n",
        up,
    ))
    .await;
    let c = Client::new();
    let url = gw.url("/api/t");
    assert_eq!(c.get_with(&url, &[("x-tenant", "a")]).await.0, 200);
    assert_eq!(c.get_with(&url, &[("x-tenant", "a")]).await.0, 429);
    assert_eq!(c.get_with(&url, &[("x-tenant", "b")]).await.0, 200);
    // Without the header, the client IP is the key.
    assert_eq!(c.get(&url).await.0, 200);
    assert_eq!(c.get(&url).await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_source_addresses_stays_within_the_key_bound() {
    let up = echo_upstream().await;
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
         [storage]\nlimit_keys = 640\n\n{}",
        limited_route("\"per-ip\"", "[limits.per-ip]\nrate = \"1/h\"\n", up)
    );
    let gw = start(&text).await;
    let c = Client::new();
    let url = gw.url("/api/f");
    for i in 0..5_000u32 {
        let [_, a, b, d] = i.to_be_bytes();
        let ip = format!("10.{a}.{b}.{d}");
        assert_eq!(c.get_with(&url, &[("x-forwarded-for", &ip)]).await.0, 200);
    }
    // The most recent addresses are still limited.
    assert_eq!(
        c.get_with(&url, &[("x-forwarded-for", "10.0.19.135")])
            .await
            .0,
        429
    );
    let metrics = get(&format!("http://{}/metrics", gw.gw.admin_addr)).await.2;
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    assert_eq!(gauge("apiwarden_limit_max_keys"), 640);
    assert!(gauge("apiwarden_limit_tracked_keys") <= 640);
    assert!(gauge("apiwarden_limit_evictions_total{kind=\"active\"}") >= 5_000 - 640);
}
