//! Client certificates (mTLS) against a real gateway: test CAs made with rcgen, real TLS
//! connections from rustls clients with and without a certificate, HTTP/1.1 over them. A
//! decision table asserts what the client sees and what the audit event says; then
//! `client_auth = "required"`, and a reload of the client CA file.
// Tests read small, known bodies whole.
#![allow(clippy::disallowed_methods)]

mod common;

use apiwarden_core::event::Reason;
use apiwarden_gateway::keystore::KeyStore;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn test_ca(name: &str) -> TestCa {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCa { cert, key }
}

/// A certificate and its private key, issued by a test CA.
struct Issued {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// A client certificate: subject `O=Example, CN=cn` (when `cn` is given) and these SANs.
fn client_cert(ca: &TestCa, cn: Option<&str>, sans: &[SanType], expired: bool) -> Issued {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Example");
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.subject_alt_names = sans.to_vec();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Issued {
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// A client certificate for `billing` that is valid from an hour ago until `seconds` from now.
fn expiring_cert(ca: &TestCa, seconds: u64) -> Issued {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "billing");
    params.subject_alt_names = vec![uri("spiffe://example.org/billing")];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(now - 3600);
    params.not_after = epoch + Duration::from_secs(now + seconds);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Issued {
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// One kept-alive connection over TLS (HTTP/1.1, or HTTP/2 through ALPN), for several
/// requests in a row.
struct KeptAlive {
    send: Sender,
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl KeptAlive {
    async fn open(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, h2: bool) -> KeptAlive {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            KeptAlive {
                send: Sender::Http2(send),
                conn: tokio::spawn(conn),
            }
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            KeptAlive {
                send: Sender::Http1(send),
                conn: tokio::spawn(conn),
            }
        }
    }

    /// The status, the request id and the `Connection` header of the answer.
    async fn get(&mut self, path: &str) -> (u16, String, Option<String>) {
        let req = http::Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = match &mut self.send {
            Sender::Http1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::Http2(s) => {
                s.ready().await.unwrap();
                let mut req = req;
                *req.uri_mut() = format!("https://localhost{path}").parse().unwrap();
                req.headers_mut().remove("host");
                s.send_request(req).await.unwrap()
            }
        };
        let status = resp.status().as_u16();
        let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let connection = resp
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_string());
        let _ = resp.into_body().collect().await;
        (status, rid, connection)
    }

    /// Whether the connection ended within two seconds. An HTTP/2 client keeps its
    /// connection open whatever the answers, so an end there is the gateway's doing (GOAWAY).
    async fn closed(self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), self.conn)
            .await
            .is_ok()
    }
}

fn uri(v: &str) -> SanType {
    SanType::URI(Ia5String::try_from(v).unwrap())
}

fn dns(v: &str) -> SanType {
    SanType::DnsName(Ia5String::try_from(v).unwrap())
}

fn email(v: &str) -> SanType {
    SanType::Rfc822Name(Ia5String::try_from(v).unwrap())
}

/// The server's certificate for `localhost` (from its own CA) and the client CA file.
fn write_files(server_ca: &TestCa, client_ca: &TestCa, dir: &Path) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "gateway");
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &server_ca.cert, &server_ca.key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("clients-ca.pem"), client_ca.cert.pem()).unwrap();
}

fn client_config(server_ca: &TestCa, cert: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![c.cert.clone()],
                PrivateKeyDer::Pkcs8(c.key.clone_key()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// An upstream that counts the requests it receives and answers `200 ok`.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

/// One request on a new TLS connection: the status and the request id, or the TLS error the
/// client saw (during the handshake, or, in TLS 1.3, when it reads the server's alert).
async fn call(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    header: Option<(&str, String)>,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "localhost");
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = match send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // The connection task holds the cause (the alert).
            let cause = match tokio::time::timeout(Duration::from_secs(2), conn).await {
                Ok(Ok(Err(c))) => format!("{c:?}"),
                _ => String::new(),
            };
            return Err(format!("{e}: {cause}"));
        }
    };
    let status = resp.status().as_u16();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = resp.into_body().collect().await;
    Ok((status, rid))
}

/// Whether the server refuses the client's certificate (or its lack of one): the TLS error the
/// client sees. In TLS 1.3 the client's handshake ends before the server has checked its
/// certificate, so this waits for the server's verdict (an alert) before sending anything.
async fn refused(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = match tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return Ok(format!("handshake: {e}")),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
        Ok(Err(e)) => Ok(format!("{e:?}")),
        Ok(Ok(0)) => Err("the server closed the connection without an alert".into()),
        Ok(Ok(n)) => Err(format!("the server sent {n} bytes")),
        Err(_) => Err("the server accepted the connection".into()),
    }
}

fn tls_line(dir: &Path, client_auth: Option<&str>) -> String {
    let auth = client_auth.map_or(String::new(), |a| format!(", client_auth = \"{a}\""));
    format!(
        "tls = {{ cert = \"{d}/server.pem\", key = \"{d}/server.key\", client_ca = \"{d}/clients-ca.pem\"{auth}, reload_interval = \"100ms\" }}\n",
        d = dir.display()
    )
}

fn config(dir: &Path, up: SocketAddr, client_auth: Option<&str>) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{tls}\n\
         [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"billing\"\npath_prefix = \"/billing\"\nupstream = \"up\"\nauth = [\"mtls\"]\nscopes = [\"billing:read\"]\n\n\
         [[routes]]\nname = \"whoami\"\npath_prefix = \"/whoami\"\nupstream = \"up\"\nauth = [\"mtls\"]\n\n\
         [[routes]]\nname = \"mixed\"\npath_prefix = \"/mixed\"\nupstream = \"up\"\nauth = [\"mtls\", \"api_key\"]\nscopes = [\"billing:read\"]\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"up\"\nauth = [\"none\"]\n\n\
         [[consumers]]\nname = \"billing\"\nscopes = [\"billing:read\"]\ncertificate_names = [\"billing.internal\", \"spiffe://example.org/billing\"]\n\n\
         [[consumers]]\nname = \"reports\"\nscopes = [\"billing:read\"]\ncertificate_names = [\"reports.internal\"]\n\n\
         [[consumers]]\nname = \"legacy\"\nscopes = [\"billing:read\"]\ncertificate_names = [\"legacy-client\"]\n",
        tls = tls_line(dir, client_auth)
    )
}

/// What one case expects: an answer and its audit event, or a refused handshake.
enum Expect {
    Answer {
        status: u16,
        reason: Reason,
        method: &'static str,
        subject: Option<&'static str>,
        consumer: Option<&'static str>,
        scopes: &'static [&'static str],
        client_subject: Option<&'static str>,
    },
    HandshakeRefused,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_table_of_client_certificates() {
    let (server_ca, clients_ca, other_ca) = (
        test_ca("server CA"),
        test_ca("clients CA"),
        test_ca("other CA"),
    );
    let dir = temp_dir("mtls");
    write_files(&server_ca, &clients_ca, &dir);
    let (up, upstream_requests) = counting_upstream().await;
    let gw = start(&config(&dir, up, None)).await;

    // An API key of the billing consumer, for the route that accepts both.
    let cfg = gw.gw.shared.state.load().config.clone();
    let (_, api_key) = KeyStore::open(&cfg)
        .unwrap()
        .create(&cfg, "billing", None, None)
        .unwrap();
    let anonymous = client_config(&server_ca, None);
    let started = Instant::now();
    loop {
        let got = call(
            gw.gw.addr,
            anonymous.clone(),
            "/mixed",
            Some(("x-api-key", api_key.clone())),
        )
        .await;
        if got.as_ref().is_ok_and(|(s, _)| *s == 200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the gateway did not pick up the key: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let billing = client_config(
        &server_ca,
        Some(&client_cert(
            &clients_ca,
            Some("billing"),
            &[
                uri("spiffe://example.org/billing"),
                dns("billing.internal"),
                email("billing@example.org"),
            ],
            false,
        )),
    );
    let reports = client_config(
        &server_ca,
        Some(&client_cert(
            &clients_ca,
            Some("reports"),
            &[dns("REPORTS.internal")],
            false,
        )),
    );
    let legacy = client_config(
        &server_ca,
        Some(&client_cert(&clients_ca, Some("legacy-client"), &[], false)),
    );
    let stranger = client_config(
        &server_ca,
        Some(&client_cert(
            &clients_ca,
            Some("stranger"),
            &[dns("stranger.internal")],
            false,
        )),
    );
    let other_ca_cert = client_config(
        &server_ca,
        Some(&client_cert(
            &other_ca,
            Some("billing"),
            &[uri("spiffe://example.org/billing")],
            false,
        )),
    );
    let expired = client_config(
        &server_ca,
        Some(&client_cert(
            &clients_ca,
            Some("billing"),
            &[uri("spiffe://example.org/billing")],
            true,
        )),
    );

    struct Case {
        name: &'static str,
        client: Arc<rustls::ClientConfig>,
        path: &'static str,
        header: Option<(&'static str, String)>,
        expect: Expect,
    }
    #[allow(clippy::too_many_arguments)]
    fn answer(
        status: u16,
        reason: Reason,
        method: &'static str,
        subject: Option<&'static str>,
        consumer: Option<&'static str>,
        scopes: &'static [&'static str],
        client_subject: Option<&'static str>,
    ) -> Expect {
        Expect::Answer {
            status,
            reason,
            method,
            subject,
            consumer,
            scopes,
            client_subject,
        }
    }
    const BILLING_DN: Option<&str> = Some("CN=billing,O=Example");
    const READ: &[&str] = &["billing:read"];
    let case = |name, client: &Arc<rustls::ClientConfig>, path, header, expect| Case {
        name,
        client: client.clone(),
        path,
        header,
        expect,
    };
    let cases = [
        case(
            "a certificate mapped to a consumer by its URI SAN",
            &billing,
            "/billing/invoices",
            None,
            answer(
                200,
                Reason::Ok,
                "mtls",
                Some("spiffe://example.org/billing"),
                Some("billing"),
                READ,
                BILLING_DN,
            ),
        ),
        case(
            "mapped by a DNS SAN, without regard to case",
            &reports,
            "/billing",
            None,
            answer(
                200,
                Reason::Ok,
                "mtls",
                Some("REPORTS.internal"),
                Some("reports"),
                READ,
                Some("CN=reports,O=Example"),
            ),
        ),
        case(
            "mapped by the CN of a certificate without SANs",
            &legacy,
            "/billing",
            None,
            answer(
                200,
                Reason::Ok,
                "mtls",
                Some("legacy-client"),
                Some("legacy"),
                READ,
                Some("CN=legacy-client,O=Example"),
            ),
        ),
        case(
            "a valid certificate no consumer claims, on a route with scopes",
            &stranger,
            "/billing",
            None,
            answer(
                403,
                Reason::AuthzMissingScope,
                "mtls",
                Some("stranger.internal"),
                None,
                &[],
                Some("CN=stranger,O=Example"),
            ),
        ),
        case(
            "a valid certificate no consumer claims, on a route without scopes",
            &stranger,
            "/whoami",
            None,
            answer(
                200,
                Reason::Ok,
                "mtls",
                Some("stranger.internal"),
                None,
                &[],
                Some("CN=stranger,O=Example"),
            ),
        ),
        case(
            "no certificate on an mtls route",
            &anonymous,
            "/billing",
            None,
            answer(401, Reason::AuthnMissing, "", None, None, &[], None),
        ),
        case(
            "no certificate on an open route (optional mode)",
            &anonymous,
            "/open",
            None,
            answer(200, Reason::Ok, "none", None, None, &[], None),
        ),
        case(
            "a certificate on an open route is recorded too",
            &billing,
            "/open",
            None,
            answer(200, Reason::Ok, "none", None, None, &[], BILLING_DN),
        ),
        case(
            "a bearer token on an mtls-only route is checked, not the certificate",
            &billing,
            "/billing",
            Some(("authorization", "Bearer an-opaque-token".to_string())),
            answer(401, Reason::AuthnMalformed, "", None, None, &[], BILLING_DN),
        ),
        case(
            "an API key on a route with mtls and api_key, without a certificate",
            &anonymous,
            "/mixed",
            Some(("x-api-key", api_key.clone())),
            answer(
                200,
                Reason::Ok,
                "api_key",
                Some("billing"),
                Some("billing"),
                READ,
                None,
            ),
        ),
        case(
            "an API key wins over a certificate",
            &stranger,
            "/mixed",
            Some(("authorization", format!("Bearer {api_key}"))),
            answer(
                200,
                Reason::Ok,
                "api_key",
                Some("billing"),
                Some("billing"),
                READ,
                Some("CN=stranger,O=Example"),
            ),
        ),
        case(
            "a certificate on a route with mtls and api_key",
            &billing,
            "/mixed",
            None,
            answer(
                200,
                Reason::Ok,
                "mtls",
                Some("spiffe://example.org/billing"),
                Some("billing"),
                READ,
                BILLING_DN,
            ),
        ),
        case(
            "nothing on a route with mtls and api_key",
            &anonymous,
            "/mixed",
            None,
            answer(401, Reason::AuthnMissing, "", None, None, &[], None),
        ),
        case(
            "a certificate from another CA",
            &other_ca_cert,
            "/open",
            None,
            Expect::HandshakeRefused,
        ),
        case(
            "an expired certificate",
            &expired,
            "/open",
            None,
            Expect::HandshakeRefused,
        ),
    ];

    for c in cases {
        let events_before = gw.request_events().len();
        let upstream_before = upstream_requests.load(Ordering::SeqCst);
        let got = call(gw.gw.addr, c.client.clone(), c.path, c.header.clone()).await;
        match c.expect {
            Expect::HandshakeRefused => {
                assert!(got.is_err(), "{}: {got:?}", c.name);
                let err = refused(gw.gw.addr, c.client.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert!(
                    err.contains("AlertReceived(BadCertificate)")
                        || err.contains("AlertReceived(UnknownCA)")
                        || err.contains("AlertReceived(CertificateExpired)"),
                    "{}: not the TLS alert expected: {err}",
                    c.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(gw.request_events().len(), events_before, "{}", c.name);
                assert_eq!(
                    upstream_requests.load(Ordering::SeqCst),
                    upstream_before,
                    "{}: nothing reaches the upstream",
                    c.name
                );
            }
            Expect::Answer {
                status,
                reason,
                method,
                subject,
                consumer,
                scopes,
                client_subject,
            } => {
                let (got_status, rid) = got.unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert_eq!(got_status, status, "{}", c.name);
                let e = event_of(&gw, &rid).await;
                let who = format!("{}: {:?} {:?}", c.name, e.identity, e.tls);
                assert_eq!(e.decision.reason, reason, "{who}");
                assert_eq!(e.response.status, status, "{who}");
                assert_eq!(e.identity.method.unwrap_or(""), method, "{who}");
                assert_eq!(e.identity.subject.as_deref(), subject, "{who}");
                assert_eq!(e.identity.consumer.as_deref(), consumer, "{who}");
                assert_eq!(e.identity.scopes, scopes, "{who}");
                assert_eq!(e.tls.client_subject.as_deref(), client_subject, "{who}");
                assert_eq!(e.tls.version, Some("TLSv1.3"), "{who}");
                assert_eq!(
                    upstream_requests.load(Ordering::SeqCst) - upstream_before,
                    usize::from(status == 200),
                    "{who}"
                );
            }
        }
    }
}

#[tokio::test]
async fn required_client_auth_refuses_a_handshake_without_a_certificate() {
    let (server_ca, clients_ca) = (test_ca("server CA"), test_ca("clients CA"));
    let dir = temp_dir("mtls-required");
    write_files(&server_ca, &clients_ca, &dir);
    let (up, upstream_requests) = counting_upstream().await;
    let gw = start(&config(&dir, up, Some("required"))).await;

    let anonymous = client_config(&server_ca, None);
    let got = call(gw.gw.addr, anonymous.clone(), "/open", None).await;
    assert!(got.is_err(), "no certificate, no request: {got:?}");
    let err = refused(gw.gw.addr, anonymous).await.unwrap();
    assert!(err.contains("AlertReceived(CertificateRequired)"), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.request_events().is_empty());
    assert_eq!(upstream_requests.load(Ordering::SeqCst), 0);

    let billing = client_config(
        &server_ca,
        Some(&client_cert(
            &clients_ca,
            Some("billing"),
            &[uri("spiffe://example.org/billing")],
            false,
        )),
    );
    let (status, rid) = call(gw.gw.addr, billing, "/billing", None).await.unwrap();
    assert_eq!(status, 200);
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.identity.method, Some("mtls"));
    assert_eq!(e.identity.consumer.as_deref(), Some("billing"));
    assert_eq!(upstream_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_new_client_ca_file_is_in_force_without_a_restart() {
    let (server_ca, old_ca, new_ca) = (
        test_ca("server CA"),
        test_ca("old clients CA"),
        test_ca("new clients CA"),
    );
    let dir = temp_dir("mtls-reload");
    write_files(&server_ca, &old_ca, &dir);
    let (up, _) = counting_upstream().await;
    let gw = start(&config(&dir, up, None)).await;
    let sans = [uri("spiffe://example.org/billing")];
    let old = client_config(
        &server_ca,
        Some(&client_cert(&old_ca, Some("billing"), &sans, false)),
    );
    let new = client_config(
        &server_ca,
        Some(&client_cert(&new_ca, Some("billing"), &sans, false)),
    );
    assert_eq!(
        call(gw.gw.addr, old.clone(), "/billing", None)
            .await
            .map(|r| r.0),
        Ok(200)
    );
    refused(gw.gw.addr, new.clone()).await.unwrap();

    // A file that is not PEM keeps the old CA.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a different modification time
    std::fs::write(dir.join("clients-ca.pem"), "not a certificate\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        call(gw.gw.addr, old.clone(), "/billing", None)
            .await
            .map(|r| r.0),
        Ok(200),
        "a broken CA file keeps the previous CA"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(dir.join("clients-ca.pem"), new_ca.cert.pem()).unwrap();
    wait_for_ca(gw.gw.addr, new.clone()).await;
    assert_eq!(
        call(gw.gw.addr, new.clone(), "/billing", None)
            .await
            .map(|r| r.0),
        Ok(200)
    );
    let err = refused(gw.gw.addr, old)
        .await
        .expect("the old CA is no longer trusted");
    assert!(err.contains("AlertReceived"), "{err}");
}

#[tokio::test]
async fn a_kept_alive_connection_is_checked_again_after_a_new_client_ca() {
    let (server_ca, old_ca, new_ca) = (
        test_ca("server CA"),
        test_ca("old clients CA"),
        test_ca("new clients CA"),
    );
    let dir = temp_dir("mtls-kept-alive");
    write_files(&server_ca, &old_ca, &dir);
    let (up, upstream_requests) = counting_upstream().await;
    let gw = start(&config(&dir, up, None)).await;
    let sans = [uri("spiffe://example.org/billing")];
    let old = client_config(
        &server_ca,
        Some(&client_cert(&old_ca, Some("billing"), &sans, false)),
    );
    let mut conn = KeptAlive::open(gw.gw.addr, old.clone(), false).await;
    assert_eq!(conn.get("/billing").await.0, 200);

    // A new file that still holds the old CA: the connection's chain verifies again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let both = format!("{}{}", old_ca.cert.pem(), new_ca.cert.pem());
    std::fs::write(dir.join("clients-ca.pem"), both).unwrap();
    let new_only = client_config(
        &server_ca,
        Some(&client_cert(&new_ca, Some("billing"), &sans, false)),
    );
    wait_for_ca(gw.gw.addr, new_only.clone()).await;
    assert_eq!(conn.get("/billing").await.0, 200, "still trusted");
    assert_eq!(conn.get("/open").await.0, 200);

    // Only the new CA: the next request on the old connection is refused, on an open route
    // too, and the answer closes the connection (`Connection: close`).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(dir.join("clients-ca.pem"), new_ca.cert.pem()).unwrap();
    let started = Instant::now();
    while refused(gw.gw.addr, old.clone()).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new CA is not in force"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = upstream_requests.load(Ordering::SeqCst);
    let (status, rid, connection) = conn.get("/open").await;
    assert_eq!(status, 401);
    assert_eq!(connection.as_deref(), Some("close"));
    let e = event_of(&gw, &rid).await;
    assert_eq!(e.decision.reason, Reason::AuthnCertificateInvalid);
    let message = e.message.unwrap();
    assert!(message.contains("does not verify"), "{message}");
    assert_eq!(
        e.tls.client_subject.as_deref(),
        Some("CN=billing,O=Example")
    );
    assert_eq!(upstream_requests.load(Ordering::SeqCst), before);
}

/// Waits until the gateway's client CA trusts `tls`'s certificate.
async fn wait_for_ca(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) {
    let started = Instant::now();
    loop {
        let got = call(addr, tls.clone(), "/open", None).await;
        if got.as_ref().is_ok_and(|r| r.0 == 200) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new CA is not in force: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_certificate_that_expires_during_a_connection_is_refused_at_the_next_request() {
    let (server_ca, clients_ca) = (test_ca("server CA"), test_ca("clients CA"));
    let dir = temp_dir("mtls-expiring");
    write_files(&server_ca, &clients_ca, &dir);
    let (up, upstream_requests) = counting_upstream().await;
    let gw = start(&config(&dir, up, None)).await;
    let valid_for = 4;
    let tls = client_config(&server_ca, Some(&expiring_cert(&clients_ca, valid_for)));
    let issued = Instant::now();
    let mut http1 = KeptAlive::open(gw.gw.addr, tls.clone(), false).await;
    let mut http2 = KeptAlive::open(gw.gw.addr, tls, true).await;
    for conn in [&mut http1, &mut http2] {
        let (status, rid, _) = conn.get("/billing").await;
        assert_eq!(status, 200);
        assert_eq!(
            event_of(&gw, &rid).await.identity.consumer.as_deref(),
            Some("billing")
        );
    }

    // Past its notAfter (whole seconds, inclusive).
    let past = Duration::from_secs(valid_for + 1) + Duration::from_millis(100);
    tokio::time::sleep(past.saturating_sub(issued.elapsed())).await;
    for (conn, close_header) in [(&mut http1, Some("close")), (&mut http2, None)] {
        let (status, rid, connection) = conn.get("/open").await;
        assert_eq!(status, 401);
        assert_eq!(connection.as_deref(), close_header);
        let e = event_of(&gw, &rid).await;
        assert_eq!(e.decision.reason, Reason::AuthnCertificateInvalid);
        assert_eq!(e.identity.consumer, None);
        let message = e.message.unwrap();
        assert!(message.contains("expired"), "{message}");
    }
    assert!(
        http2.closed().await,
        "the gateway closes the HTTP/2 connection (GOAWAY) after the refusal"
    );
    assert_eq!(upstream_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_client_ca_file_that_cannot_be_used_is_a_start_error_with_its_path() {
    let server_ca = test_ca("server CA");
    let dir = temp_dir("mtls-bad-ca");
    write_files(&server_ca, &server_ca, &dir);
    std::fs::write(dir.join("clients-ca.pem"), "no certificate here\n").unwrap();
    let path = dir.join("gw.toml");
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        tls_line(&dir, None)
    );
    let config = apiwarden_core::config::parse(&text, &path.display().to_string()).unwrap();
    let err = apiwarden_gateway::Gateway::start(apiwarden_gateway::Options {
        config,
        config_path: None,
        sink: Arc::new(apiwarden_gateway::audit::MemorySink::new()),
        node: "test".into(),
    })
    .await
    .err()
    .expect("the gateway does not start")
    .to_string();
    assert!(err.contains("clients-ca.pem"), "{err}");
    assert!(err.contains("client_ca"), "{err}");
}
