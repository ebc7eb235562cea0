//! TLS termination with rustls: TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`, a certificate
//! that is reloaded from its files when they change, without a restart, and client
//! certificates (mTLS) verified against `gateway.tls.client_ca`, whose file is reloaded too.
//!
//! rustls (webpki) verifies a client's chain during the handshake; [`ClientCert`] then reads
//! the values an identity needs (subject, SANs, fingerprint) from the verified end-entity
//! certificate, once per connection. A connection outlives its handshake, so [`CertCheck`]
//! looks again at each request: a certificate past its `notAfter`, or one that the client CA
//! loaded since no longer verifies, is refused.

use apiwarden_core::config::{ClientAuth, TlsConfig};
use arc_swap::ArcSwap;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Errors loading a certificate, a key or the client CA certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate and key do not form a usable pair: {0}")]
    Pair(String),
    #[error("cannot use the client CA certificates {path} (gateway.tls.client_ca): {reason}")]
    ClientCa { path: PathBuf, reason: String },
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

/// The verifier of client certificates: webpki against the CA certificates in `path`.
fn client_verifier(
    path: &Path,
    mode: ClientAuth,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let error = |reason: String| TlsError::ClientCa {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| error(e.to_string()))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if mode == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| error(e.to_string()))
}

/// Serves the current certificate; [`CertReloader::check`] swaps in a new one.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The TLS configuration in force and the client CA it verifies against.
pub struct TlsState {
    /// What each handshake takes.
    pub server: Arc<rustls::ServerConfig>,
    /// Counts the client CA files loaded (0: the one read at start).
    pub generation: u64,
    /// The verifier of client certificates inside `server`, to check a connection's
    /// certificate again after a new client CA (none without `client_ca`).
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// The TLS configuration in force: each handshake takes the current one, and a new client
/// CA file swaps in a new one (the certificate is swapped inside it, by its resolver).
pub type ServerConfigs = Arc<ArcSwap<TlsState>>;

/// A whole server configuration: protocol versions, ALPN, the certificate resolver and, with
/// `client_ca`, the verifier of client certificates.
fn build(cfg: &TlsConfig, resolver: Arc<Resolver>, generation: u64) -> Result<TlsState, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    let verifier = match &cfg.client_ca {
        None => None,
        Some(ca) => Some(client_verifier(ca, cfg.client_auth, provider)?),
    };
    let mut sc = match &verifier {
        None => builder.with_no_client_auth(),
        Some(v) => builder.with_client_cert_verifier(v.clone()),
    }
    .with_cert_resolver(resolver);
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsState {
        server: Arc::new(sc),
        generation,
        verifier,
    })
}

/// Watches the certificate, key and client CA files.
pub struct CertReloader {
    resolver: Arc<Resolver>,
    config: TlsConfig,
    stamp: Option<(SystemTime, SystemTime)>,
    ca_stamp: Option<SystemTime>,
    server: ServerConfigs,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn stamp(cfg: &TlsConfig) -> Option<(SystemTime, SystemTime)> {
    Some((modified(&cfg.cert)?, modified(&cfg.key)?))
}

impl CertReloader {
    /// Reloads the certificate when its files changed, and the client CA certificates when
    /// their file changed. A bad new file keeps the previous certificate or CA.
    pub fn check(&mut self) {
        let now = stamp(&self.config);
        if now.is_some() && now != self.stamp {
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
        let Some(ca) = &self.config.client_ca else {
            return;
        };
        let now = modified(ca);
        if now.is_none() || now == self.ca_stamp {
            return;
        }
        // A new configuration (with a new session cache: a session resumed after the change
        // was verified against the new CA certificates).
        let generation = self.server.load().generation + 1;
        match build(&self.config, self.resolver.clone(), generation) {
            Ok(sc) => {
                self.server.store(Arc::new(sc));
                self.ca_stamp = now;
                tracing::info!(client_ca = %ca.display(), "client CA certificates reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "client CA certificates changed but cannot be loaded; keeping the previous ones")
            }
        }
    }

    /// How often to check.
    pub fn interval(&self) -> std::time::Duration {
        self.config.reload_interval
    }
}

/// Builds the rustls server configuration and the reloader of its files.
pub fn server_config(cfg: &TlsConfig) -> Result<(ServerConfigs, CertReloader), TlsError> {
    let ck = load(&cfg.cert, &cfg.key)?;
    let resolver = Arc::new(Resolver(ArcSwap::new(ck)));
    // Stamped before reading: a change while reading is read again at the next check.
    let ca_stamp = cfg.client_ca.as_deref().and_then(modified);
    let server = Arc::new(ArcSwap::from_pointee(build(cfg, resolver.clone(), 0)?));
    Ok((
        server.clone(),
        CertReloader {
            resolver,
            config: cfg.clone(),
            stamp: stamp(cfg),
            ca_stamp,
            server,
        },
    ))
}

/// What the gateway knows about a client certificate that rustls verified against
/// `client_ca`: read once per connection from the end-entity certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject as an RFC 4514 string, most specific first (`CN=billing,O=Example`).
    pub subject: String,
    /// The subject's (first) common name.
    pub common_name: Option<String>,
    /// DNS name SANs.
    pub dns_names: Vec<String>,
    /// URI SANs (a SPIFFE ID is one).
    pub uris: Vec<String>,
    /// E-mail (RFC 822 name) SANs.
    pub emails: Vec<String>,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    /// Its `notAfter`, in seconds since the Unix epoch (the last second it is valid).
    pub not_after: i64,
}

/// Longest subject string kept (an audit field); a longer one is cut at a character boundary.
const MAX_SUBJECT: usize = 1024;

impl ClientCert {
    /// Reads an end-entity certificate (DER). Only call it on a certificate that rustls has
    /// verified: nothing here checks a signature.
    pub fn parse(der: &[u8]) -> Result<ClientCert, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let mut subject = rfc4514(cert.subject());
        if subject.len() > MAX_SUBJECT {
            let mut end = MAX_SUBJECT;
            while !subject.is_char_boundary(end) {
                end -= 1;
            }
            subject.truncate(end);
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string);
        let (mut dns_names, mut uris, mut emails) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(v) => dns_names.push(v.to_string()),
                    GeneralName::URI(v) => uris.push(v.to_string()),
                    GeneralName::RFC822Name(v) => emails.push(v.to_string()),
                    _ => {}
                }
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Ok(ClientCert {
            subject,
            common_name,
            dns_names,
            uris,
            emails,
            fingerprint: apiwarden_core::apikey::hex(digest.as_ref()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// The identity's subject: the first URI SAN, else the first DNS SAN, else the CN.
    pub fn identity_subject(&self) -> Option<&str> {
        self.uris
            .first()
            .or(self.dns_names.first())
            .or(self.common_name.as_ref())
            .map(String::as_str)
    }

    /// Whether `name` (one of `consumers[].certificate_names`) names this certificate: equal to
    /// a URI or e-mail SAN or the CN, or to a DNS SAN without regard to case.
    /// The CN counts only for a certificate without SANs (RFC 6125 §6.4.4): otherwise a CN
    /// could claim a consumer that the certificate's own names do not.
    pub fn is_named(&self, name: &str) -> bool {
        let has_sans =
            !self.uris.is_empty() || !self.emails.is_empty() || !self.dns_names.is_empty();
        self.uris.iter().any(|v| v == name)
            || self.emails.iter().any(|v| v == name)
            || self.dns_names.iter().any(|v| v.eq_ignore_ascii_case(name))
            || (!has_sans && self.common_name.as_deref() == Some(name))
    }
}

/// A connection's client certificate, checked again at each request: the handshake verified
/// it once, but a kept-alive connection lives on after the certificate expires or after a
/// new client CA file stops trusting it.
pub struct CertCheck {
    /// The chain the client sent, end entity first.
    chain: Vec<CertificateDer<'static>>,
    /// The end entity's `notAfter`: past it, refused without more ado.
    not_after: i64,
    /// The `notAfter`s of the other certificates the client sent. Which of them the verified
    /// path uses is not known (a client may send stale extras), so once one of them passes,
    /// the chain is verified again at that time, and refused only if that fails.
    others: Vec<i64>,
    /// The earliest of `others` still ahead when last verified (`i64::MAX`: none).
    recheck_at: std::sync::atomic::AtomicI64,
    configs: ServerConfigs,
    /// The client CA generation the chain last verified against; [`REFUSED`] once it did not.
    verified: AtomicU64,
}

/// Whole seconds since the Unix epoch, as certificates give their validity.
fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The earliest of `times` after `now` (`i64::MAX`: none).
fn next_after(times: &[i64], now: i64) -> i64 {
    times
        .iter()
        .copied()
        .filter(|&t| t >= now)
        .min()
        .unwrap_or(i64::MAX)
}

/// [`CertCheck::verified`] of a certificate that failed a check: it stays refused (the
/// client is to reconnect).
const REFUSED: u64 = u64::MAX;

impl CertCheck {
    /// `generation`: that of the configuration whose handshake verified `chain`;
    /// `not_after`: the end entity's.
    pub fn new(
        chain: &[CertificateDer<'_>],
        not_after: i64,
        configs: ServerConfigs,
        generation: u64,
    ) -> CertCheck {
        let others: Vec<i64> = chain
            .iter()
            .skip(1)
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .collect();
        let now = unix_secs(SystemTime::now());
        CertCheck {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            not_after,
            recheck_at: std::sync::atomic::AtomicI64::new(next_after(&others, now)),
            others,
            configs,
            verified: AtomicU64::new(generation),
        }
    }

    /// Whether the certificate is still good at `now`: not past its `notAfter`, and, when
    /// the client CA changed since it was last checked, verified by the one in force (once
    /// per change and connection). Otherwise, why not (for the audit event's `message`).
    pub fn check(&self, now: SystemTime) -> Result<(), String> {
        let seen = self.verified.load(Ordering::Relaxed);
        if seen == REFUSED {
            return Err("the client certificate was refused earlier on this connection".into());
        }
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = unix_secs(now);
        if secs > self.not_after {
            self.verified.store(REFUSED, Ordering::Relaxed);
            return Err(format!(
                "the client certificate expired during the connection (notAfter {})",
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH
                        + std::time::Duration::from_secs(self.not_after.max(0).unsigned_abs())
                )
            ));
        }
        let state = self.configs.load();
        let chain_due = secs > self.recheck_at.load(Ordering::Relaxed);
        if state.generation == seen && !chain_due {
            return Ok(());
        }
        let result = match (&state.verifier, self.chain.split_first()) {
            (Some(v), Some((end_entity, intermediates))) => v
                .verify_client_cert(
                    end_entity,
                    intermediates,
                    UnixTime::since_unix_epoch(since_epoch),
                )
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (None, _) => Err("no client CA is configured any more".into()),
            (_, None) => Err("no certificate".into()),
        };
        match result {
            Ok(()) => {
                self.verified.store(state.generation, Ordering::Relaxed);
                self.recheck_at
                    .store(next_after(&self.others, secs), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.verified.store(REFUSED, Ordering::Relaxed);
                Err(if state.generation == seen {
                    format!("the client certificate's chain no longer verifies (a CA certificate of it expired during the connection): {e}")
                } else {
                    format!("the client certificate does not verify against the client CA loaded since the connection opened: {e}")
                })
            }
        }
    }
}

/// RFC 4514: the RDNs in reverse order, `+` between the attributes of one RDN, the usual
/// short names, other attribute types as dotted OIDs, and a value that is not a string as
/// `#` and the hex of its content.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    let key = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.9" => "STREET",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "0.9.2342.19200300.100.1.25" => "DC",
                        "0.9.2342.19200300.100.1.1" => "UID",
                        other => other,
                    };
                    let value = match atv.as_str() {
                        Ok(v) => escape_value(v),
                        Err(_) => format!("#{}", apiwarden_core::apikey::hex(atv.as_slice())),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

/// RFC 4514 section 2.4 escaping (control characters as `\XX` too).
fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push('\\');
                    out.push_str(&apiwarden_core::apikey::hex(&[b]).to_ascii_uppercase());
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape_value("billing"), "billing");
        assert_eq!(escape_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_value("#x "), "\\#x\\ ");
        assert_eq!(escape_value(" x"), "\\ x");
        assert_eq!(escape_value("a\nb"), "a\\0Ab");
        assert_eq!(apiwarden_core::apikey::hex(&[0, 0xab, 0x7f]), "00ab7f");
    }

    /// A certificate signed by `issuer` (self-signed without one), valid from a day ago
    /// until `not_after` (seconds since the epoch).
    fn issue(
        name: &str,
        ca: bool,
        not_after: u64,
        issuer: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(vec![format!("{name}.example")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        } else {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        params.not_before = epoch + std::time::Duration::from_secs(now - 86_400 * 400);
        params.not_after = epoch + std::time::Duration::from_secs(not_after);
        let key = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some((c, k)) => params.signed_by(&key, c, k).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert, key)
    }

    /// The check at each request, with chosen times: the end entity's expiry refuses; a
    /// certificate the client sent that the verified path does not need (a stale extra) does
    /// not, even once it has expired; a CA change re-verifies.
    #[test]
    fn a_connection_certificate_is_checked_against_its_expiry_and_the_ca_in_force() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let dir = std::env::temp_dir().join(format!("aw-certcheck-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = issue("clients-ca", true, now + 86_400 * 365, None);
        let (server, server_key) = issue("localhost", false, now + 86_400, None);
        let (client, _) = issue("billing", false, now + 3_600, Some((&ca, &ca_key)));
        // Sent along but not on the path: expired before the connection, and one expiring
        // in a minute.
        let (stale, _) = issue("old-intermediate", true, now - 86_400, None);
        let (soon, _) = issue("other-intermediate", true, now + 60, None);
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        let cfg = TlsConfig {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: Some(dir.join("ca.pem")),
            client_auth: ClientAuth::Optional,
            reload_interval: std::time::Duration::from_secs(1),
        };
        let (configs, _) = server_config(&cfg).unwrap();
        let chain = [
            client.der().clone(),
            stale.der().clone(),
            soon.der().clone(),
        ];
        let parsed = ClientCert::parse(client.der()).unwrap();
        let check = CertCheck::new(&chain, parsed.not_after, configs.clone(), 0);
        let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);

        assert_eq!(check.check(at(now)), Ok(()), "a stale extra is no reason");
        assert_eq!(
            check.check(at(now + 120)),
            Ok(()),
            "the extra that expired is not on the path: verified again, still good"
        );
        // A new CA that does not trust the client: refused, and for good.
        let (other, _) = issue("other-ca", true, now + 86_400, None);
        std::fs::write(dir.join("ca.pem"), other.pem()).unwrap();
        let state = build(
            &cfg,
            Arc::new(Resolver(ArcSwap::new(server_certified(&dir)))),
            1,
        )
        .unwrap();
        configs.store(Arc::new(state));
        let err = check.check(at(now + 130)).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        assert!(check.check(at(now + 131)).is_err(), "refused for good");
        assert_eq!(configs.load().generation, 1);

        // Past the end entity's notAfter.
        let fresh = CertCheck::new(&chain[..1], parsed.not_after, configs.clone(), 1);
        let err = fresh.check(at(now + 3_601)).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    fn server_certified(dir: &Path) -> Arc<CertifiedKey> {
        load(&dir.join("server.pem"), &dir.join("server.key")).unwrap()
    }

    #[test]
    fn a_certificate_is_read_once_into_subject_sans_and_fingerprint() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, Ia5String, KeyPair, SanType};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "NL");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example, Inc.");
        params
            .distinguished_name
            .push(DnType::CommonName, "billing");
        params.subject_alt_names = vec![
            SanType::DnsName(Ia5String::try_from("billing.internal").unwrap()),
            SanType::URI(Ia5String::try_from("spiffe://example.org/billing").unwrap()),
            SanType::Rfc822Name(Ia5String::try_from("billing@example.org").unwrap()),
            SanType::IpAddress([10, 0, 0, 1].into()),
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = ClientCert::parse(cert.der()).unwrap();
        assert_eq!(c.subject, "CN=billing,O=Example\\, Inc.,C=NL");
        assert_eq!(c.common_name.as_deref(), Some("billing"));
        assert_eq!(c.dns_names, ["billing.internal"]);
        assert_eq!(c.uris, ["spiffe://example.org/billing"]);
        assert_eq!(c.emails, ["billing@example.org"]);
        assert_eq!(c.identity_subject(), Some("spiffe://example.org/billing"));
        assert_eq!(c.fingerprint.len(), 64);
        assert_eq!(
            c.fingerprint,
            apiwarden_core::apikey::hex(
                ring::digest::digest(&ring::digest::SHA256, cert.der()).as_ref()
            )
        );
        assert!(c.is_named("BILLING.internal"));
        // The CN does not count next to SANs (RFC 6125): the SANs are the names.
        assert!(!c.is_named("billing"));
        assert!(!c.is_named("SPIFFE://example.org/billing"));
        assert!(!c.is_named("10.0.0.1"));
        assert!(ClientCert::parse(b"not a certificate").is_err());
    }
}
