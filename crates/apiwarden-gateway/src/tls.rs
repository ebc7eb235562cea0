//! TLS termination with rustls: TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`, and a
//! certificate that is reloaded from its files when they change, without a restart.

use apiwarden_core::config::TlsConfig;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Errors loading a certificate or key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate and key do not form a usable pair: {0}")]
    Pair(String),
    #[error(
        "client certificates (gateway.tls.client_ca, mTLS) are not supported in this build yet"
    )]
    MtlsUnsupported,
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.to_path_buf(),
            reason: "no PEM certificate in the file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(Arc::new(ck))
}

/// Serves the current certificate; [`CertReloader::check`] swaps in a new one.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Watches the certificate and key files.
pub struct CertReloader {
    resolver: Arc<Resolver>,
    config: TlsConfig,
    stamp: Option<(SystemTime, SystemTime)>,
}

fn stamp(cfg: &TlsConfig) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&cfg.cert)?, m(&cfg.key)?))
}

impl CertReloader {
    /// Reloads the certificate when its files changed. A bad new pair keeps the old one.
    pub fn check(&mut self) {
        let now = stamp(&self.config);
        if now.is_none() || now == self.stamp {
            return;
        }
        match load(&self.config.cert, &self.config.key) {
            Ok(ck) => {
                self.resolver.0.store(ck);
                self.stamp = now;
                tracing::info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the previous one")
            }
        }
    }

    /// How often to check.
    pub fn interval(&self) -> std::time::Duration {
        self.config.reload_interval
    }
}

/// Builds the rustls server configuration and the reloader of its certificate.
pub fn server_config(
    cfg: &TlsConfig,
) -> Result<(Arc<rustls::ServerConfig>, CertReloader), TlsError> {
    if cfg.client_ca.is_some() {
        return Err(TlsError::MtlsUnsupported);
    }
    let ck = load(&cfg.cert, &cfg.key)?;
    let resolver = Arc::new(Resolver(ArcSwap::new(ck)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((
        Arc::new(sc),
        CertReloader {
            resolver,
            config: cfg.clone(),
            stamp: stamp(cfg),
        },
    ))
}
