//! The gateway's own small HTTP client, for calls to identity providers: an issuer's discovery
//! document and JWKS (`jwt.rs`), a token introspection endpoint (`introspect.rs`).
//!
//! One HTTP/1.1 connection per call (hyper's client connection), over rustls with the Mozilla
//! roots and an optional extra CA, or plain HTTP where the config allows it (loopback only).
//! Every call is bounded in time (connect, TLS, request and body together) and in the size of
//! the body it reads. Errors name the URL (without any `user:password@`) and what failed, never
//! a header or body that was sent.

use apiwarden_core::config::redact_url;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One call: where, how, and its bounds.
pub struct Call<'a> {
    pub method: Method,
    pub url: &'a str,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Extra CA certificate (PEM) trusted besides the public roots.
    pub ca: Option<&'a Path>,
    /// Bound on the whole call, from connecting to the end of the body.
    pub timeout: Duration,
    /// The largest response body read; a longer one is an error.
    pub max_body: usize,
}

/// Sends `call` and reads the answer: its status and whole (bounded) body.
pub async fn send(call: Call<'_>) -> Result<(StatusCode, Bytes), String> {
    let url = redact_url(call.url);
    let timeout = call.timeout;
    tokio::time::timeout(timeout, send_unbounded(call))
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))
}

/// GET a JSON document (status 200 only).
pub async fn get_json(
    url: &str,
    ca: Option<&Path>,
    timeout: Duration,
    max_body: usize,
) -> Result<serde_json::Value, String> {
    let (status, body) = send(Call {
        method: Method::GET,
        url,
        headers: vec![(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        )],
        body: Bytes::new(),
        ca,
        timeout,
        max_body,
    })
    .await?;
    if status != StatusCode::OK {
        return Err(format!("{}: status {status}", redact_url(url)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{}: not JSON: {e}", redact_url(url)))
}

// The answer is read whole, but never more than `max_body` bytes.
#[allow(clippy::disallowed_methods)]
async fn send_unbounded(call: Call<'_>) -> Result<(StatusCode, Bytes), String> {
    use http_body_util::{BodyExt, Full, Limited};
    use hyper_util::rt::TokioIo;

    let uri: http::Uri = call.url.parse().map_err(|_| "not a URL".to_string())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http and https URLs".into()),
    };
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // The authority without any `user:password@`.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let mut request = http::Request::builder()
        .method(call.method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "apiwarden");
    for (name, value) in call.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(call.body))
        .map_err(|e| e.to_string())?;
    let response = if https {
        let tls = tls_connector(call.ca)?;
        let name = rustls_pki_types::ServerName::try_from(bare_host.clone())
            .map_err(|_| "not a valid TLS server name".to_string())?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(request)
            .await
            .map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(request)
            .await
            .map_err(|e| e.to_string())?
    };
    let status = response.status();
    let body = Limited::new(response.into_body(), call.max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

fn tls_connector(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{}: {e}", ca.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}
