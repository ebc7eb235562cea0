//! JWT bearer tokens (RFC 7519, JWS compact form) from OIDC providers.
//!
//! An [`Issuer`] holds one `[jwt.NAME]`: its verification keys (fetched from the JWKS named by
//! OIDC discovery or by `jwks_url`, or an HS256 shared secret), and a cache of tokens it has
//! verified. Checking a token:
//!
//! 1. the cache: a token verified before and not expired is accepted on a 128-bit keyed tag of
//!    its text, without parsing or signature work;
//! 2. the header: `alg: none` is refused, an `alg` that does not fit the key (an HMAC `alg`
//!    against public keys, RSA against an EC key, ...) is algorithm confusion, an `alg` outside
//!    `algorithms` is not allowed;
//! 3. the key by `kid`; an unknown `kid` fetches the key set once more (single flight, at most
//!    once per `min_refresh`), so a rotation at the issuer is picked up at once while made-up
//!    `kid`s cannot make the gateway fetch on every request;
//! 4. the signature (ring), then the claims: `iss`, `aud`, `exp` and `nbf` with leeway.
//!
//! Each refusal has its own reason code. Keys older than `refresh` are fetched again in the
//! background; when a fetch fails the keys held stay in use. A new key set starts an empty
//! cache, so a token whose key the issuer withdrew is checked again (and refused).

use apiwarden_core::config::{JwtAlg, JwtConfig, JwtKeySource, SecretSource};
use apiwarden_core::event::Reason;
use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::now_ms;
use crate::tag::{tag, TagBuildHasher};

/// Who a verified token says the caller is.
#[derive(Debug)]
pub struct TokenIdentity {
    /// `sub`
    pub subject: Option<String>,
    /// `client_id`, else `azp`: the OAuth client, matched against `[[consumers]]` by name.
    pub client: Option<String>,
    /// `scope` (space-separated) or `scp` (a list or a string).
    pub scopes: Vec<String>,
}

/// One verification key from a JWKS (or the shared secret).
enum VerifyKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256, as the uncompressed point `04 || x || y`.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
    Hmac(hmac::Key),
}

impl VerifyKey {
    /// Whether `alg` may be used with this key at all.
    fn fits(&self, alg: JwtAlg) -> bool {
        matches!(
            (self, alg),
            (VerifyKey::Rsa { .. }, JwtAlg::Rs256 | JwtAlg::Ps256)
                | (VerifyKey::P256(_), JwtAlg::Es256)
                | (VerifyKey::Ed25519(_), JwtAlg::EdDsa)
                | (VerifyKey::Hmac(_), JwtAlg::Hs256)
        )
    }

    fn verify(&self, alg: JwtAlg, message: &[u8], sig: &[u8]) -> bool {
        match (self, alg) {
            (VerifyKey::Rsa { n, e }, JwtAlg::Rs256 | JwtAlg::Ps256) => {
                let params = if alg == JwtAlg::Rs256 {
                    &signature::RSA_PKCS1_2048_8192_SHA256
                } else {
                    &signature::RSA_PSS_2048_8192_SHA256
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
            (VerifyKey::P256(point), JwtAlg::Es256) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (VerifyKey::Ed25519(x), JwtAlg::EdDsa) => {
                signature::UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(message, sig)
                    .is_ok()
            }
            // Constant time.
            (VerifyKey::Hmac(k), JwtAlg::Hs256) => hmac::verify(k, message, sig).is_ok(),
            _ => false,
        }
    }
}

/// One key of a JWKS as it arrives; unknown members are ignored (RFC 7517).
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: then only that `alg` may use the key.
    alg: Option<JwtAlg>,
    key: VerifyKey,
    /// The JWK as received, to tell whether a fetched set differs from the one held.
    source: String,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// Big-endian unsigned integers as ring wants them: without leading zero bytes.
fn unsigned(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|&&b| b == 0).count();
    v.drain(..zeros.min(v.len().saturating_sub(1)));
    v
}

impl Key {
    /// A usable signing key from one JWKS entry; `None` for encryption keys and key types
    /// apiwarden does not verify with (they are skipped, not fatal).
    fn from_jwk(value: &serde_json::Value) -> Option<Key> {
        let jwk: Jwk = serde_json::from_value(value.clone()).ok()?;
        if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let alg = match &jwk.alg {
            None => None,
            Some(a) => Some(JwtAlg::parse(a)?),
        };
        let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => {
                let n = unsigned(b64(jwk.n.as_deref()?)?);
                // ring refuses moduli under 2048 bits at verification; refuse them here too.
                if n.len() < 256 {
                    return None;
                }
                VerifyKey::Rsa {
                    n,
                    e: unsigned(b64(jwk.e.as_deref()?)?),
                }
            }
            ("EC", Some("P-256")) => {
                let (x, y) = (b64(jwk.x.as_deref()?)?, b64(jwk.y.as_deref()?)?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = Vec::with_capacity(65);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                VerifyKey::P256(point)
            }
            ("OKP", Some("Ed25519")) => {
                let x = b64(jwk.x.as_deref()?)?;
                if x.len() != 32 {
                    return None;
                }
                VerifyKey::Ed25519(x)
            }
            _ => return None,
        };
        if alg.is_some_and(|a| !key.fits(a)) {
            return None;
        }
        Some(Key {
            kid: jwk.kid,
            alg,
            key,
            source: value.to_string(),
        })
    }
}

/// The keys in force and the tokens verified with them.
struct KeySet {
    keys: Vec<Key>,
    /// When the keys were fetched (Unix ms); 0 = never.
    fetched: u64,
    cache: Arc<TokenCache>,
}

impl KeySet {
    fn empty() -> KeySet {
        KeySet {
            keys: Vec::new(),
            fetched: 0,
            cache: Arc::new(TokenCache::new(true)),
        }
    }

    fn same_keys(&self, other: &[Key]) -> bool {
        self.keys.len() == other.len()
            && self
                .keys
                .iter()
                .zip(other)
                .all(|(a, b)| a.source == b.source)
    }

    /// The key a token names. `Err(true)`: no key by that `kid` (fetching again may help);
    /// `Err(false)`: the key exists but does not fit `alg`.
    fn find(&self, kid: Option<&str>, alg: JwtAlg) -> Result<&Key, bool> {
        match kid {
            Some(kid) => {
                // A JWKS may reuse a `kid` across key types: the one that fits `alg` counts.
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Err(true);
                }
                named
                    .find(|k| k.key.fits(alg) && k.alg.is_none_or(|a| a == alg))
                    .ok_or(false)
            }
            // No `kid`: acceptable only when exactly one key could have signed it.
            None => {
                let mut fitting = self
                    .keys
                    .iter()
                    .filter(|k| k.key.fits(alg) && k.alg.is_none_or(|a| a == alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Ok(k),
                    _ if self.keys.is_empty() => Err(true),
                    (None, _) => Err(false),
                    _ => Err(true),
                }
            }
        }
    }
}

const CACHE_SHARDS: usize = 16;
/// Tokens remembered per shard; a full shard drops its expired tokens, then everything.
const CACHE_PER_SHARD: usize = 4096;

pub(crate) struct Cached<V> {
    /// Until when the entry holds, in Unix ms (for a verified JWT: `exp` plus leeway).
    until: u64,
    value: V,
}

/// Answers about tokens by a keyed 128-bit tag of their text (never the text), each until its
/// own time. Bounded: a full shard drops its expired entries, then everything.
///
/// `per_worker`: one shard per worker thread, so that a hot token is not a lock and a cache
/// line that every worker takes in turn; a token is then checked once per worker (right for
/// JWTs, whose check is local). Otherwise shards by tag, one answer for all workers (right for
/// introspection, whose check is a call to another server).
pub(crate) struct TokenCache<V = Arc<TokenIdentity>> {
    shards: [Mutex<Shard<V>>; CACHE_SHARDS],
    per_worker: bool,
}

type Shard<V> = HashMap<[u64; 2], Cached<V>, TagBuildHasher>;

impl<V> TokenCache<V> {
    pub(crate) fn new(per_worker: bool) -> Self {
        TokenCache {
            shards: std::array::from_fn(|_| Mutex::default()),
            per_worker,
        }
    }

    fn shard(&self, tag: [u64; 2]) -> &Mutex<Shard<V>> {
        let i = if self.per_worker {
            crate::server::worker_index()
        } else {
            tag[0] as usize
        };
        &self.shards[i % CACHE_SHARDS]
    }
}

impl<V: Clone> TokenCache<V> {
    pub(crate) fn get(&self, tag: [u64; 2], now: u64) -> Option<V> {
        let shard = self.shard(tag).lock().expect("token cache poisoned");
        shard
            .get(&tag)
            .filter(|c| now <= c.until)
            .map(|c| c.value.clone())
    }

    pub(crate) fn put(&self, tag: [u64; 2], until: u64, value: V, now: u64) {
        let mut shard = self.shard(tag).lock().expect("token cache poisoned");
        if shard.len() >= CACHE_PER_SHARD {
            shard.retain(|_, c| c.until >= now);
            if shard.len() >= CACHE_PER_SHARD {
                shard.clear();
            }
        }
        shard.insert(tag, Cached { until, value });
    }
}

/// Counters of one issuer (`apiwarden_jwt_*`).
#[derive(Default)]
pub struct JwtMetrics {
    /// Tokens accepted after a full verification.
    pub verified: crate::metrics::Counter,
    /// Tokens accepted from the cache.
    pub cached: crate::metrics::Counter,
    /// Tokens refused.
    pub refused: crate::metrics::Counter,
    pub fetch_ok: AtomicU64,
    pub fetch_failed: AtomicU64,
}

/// One token issuer, kept across config reloads while its settings stay the same.
pub struct Issuer {
    pub name: String,
    pub config: JwtConfig,
    keys: ArcSwap<KeySet>,
    /// When the last fetch started (Unix ms); the `min_refresh` floor counts from here.
    last_attempt: AtomicU64,
    background: AtomicBool,
    fetch: tokio::sync::Mutex<()>,
    last_error_log: AtomicU64,
    pub metrics: Arc<JwtMetrics>,
    /// SHA-256 of the HS256 secret as read, to tell on a reload whether it changed.
    secret_digest: Option<Vec<u8>>,
}

/// SHA-256 of a secret the config refers to, as it reads now (`None` if it cannot be read).
pub fn secret_digest(source: &SecretSource) -> Option<Vec<u8>> {
    read_secret(source).ok().map(|s| {
        ring::digest::digest(&ring::digest::SHA256, &s)
            .as_ref()
            .to_vec()
    })
}

/// The parts of a compact JWS.
struct Parsed<'a> {
    signing_input: &'a str,
    payload: &'a str,
    signature: Vec<u8>,
    header: Header,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<OneOrMany>,
    exp: Option<f64>,
    nbf: Option<f64>,
    client_id: Option<String>,
    azp: Option<String>,
    scope: Option<String>,
    scp: Option<OneOrMany>,
}

fn parse(token: &str) -> Result<Parsed<'_>, Reason> {
    let (signing_input, sig) = token.rsplit_once('.').ok_or(Reason::AuthnMalformed)?;
    let (header, payload) = signing_input
        .split_once('.')
        .ok_or(Reason::AuthnMalformed)?;
    let header: Header = b64(header)
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(Reason::AuthnMalformed)?;
    Ok(Parsed {
        signing_input,
        payload,
        signature: b64(sig).ok_or(Reason::AuthnMalformed)?,
        header,
    })
}

/// Reads a secret the config refers to. The error never holds the value.
pub fn read_secret(source: &SecretSource) -> Result<Vec<u8>, String> {
    match source {
        SecretSource::Env(name) => std::env::var_os(name)
            .map(|v| v.into_encoded_bytes())
            .ok_or_else(|| format!("environment variable {name} is not set")),
        SecretSource::File(p) | SecretSource::Generated(p) => std::fs::read(p)
            .map(|mut v| {
                // A trailing newline from an editor is not part of the secret.
                while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    v.pop();
                }
                v
            })
            .map_err(|e| format!("{}: {e}", p.display())),
    }
}

impl Issuer {
    pub fn new(name: &str, config: JwtConfig, metrics: Arc<JwtMetrics>) -> Arc<Issuer> {
        let mut set = KeySet::empty();
        if let JwtKeySource::Secret(source) = &config.keys {
            match read_secret(source) {
                Ok(secret) if secret.len() >= 32 => {
                    set.keys.push(Key {
                        kid: None,
                        alg: Some(JwtAlg::Hs256),
                        key: VerifyKey::Hmac(hmac::Key::new(hmac::HMAC_SHA256, &secret)),
                        source: String::new(),
                    });
                    set.fetched = u64::MAX;
                }
                Ok(_) => tracing::error!(
                    issuer = name,
                    "the HS256 secret is shorter than 32 bytes; tokens of this issuer are refused"
                ),
                Err(e) => {
                    tracing::error!(issuer = name, error = %e, "the HS256 secret cannot be read; tokens of this issuer are refused")
                }
            }
        }
        let secret_digest = match &config.keys {
            JwtKeySource::Secret(source) => secret_digest(source),
            _ => None,
        };
        Arc::new(Issuer {
            secret_digest,
            name: name.to_string(),
            config,
            keys: ArcSwap::from_pointee(set),
            last_attempt: AtomicU64::new(0),
            background: AtomicBool::new(false),
            fetch: tokio::sync::Mutex::new(()),
            last_error_log: AtomicU64::new(0),
            metrics,
        })
    }

    /// Whether the HS256 secret still reads as it did (always true for a key set): a reload
    /// keeps this issuer, and its verified tokens, only then.
    pub fn secret_unchanged(&self) -> bool {
        match &self.config.keys {
            JwtKeySource::Secret(source) => secret_digest(source) == self.secret_digest,
            _ => true,
        }
    }

    /// Whether tokens can be checked: the secret was read, or keys were fetched at least once.
    pub fn ready(&self) -> bool {
        self.keys.load().fetched > 0
    }

    /// Checks a bearer token. `Err(reason)` says why it is refused.
    pub async fn check(self: &Arc<Self>, token: &str) -> Result<Arc<TokenIdentity>, Reason> {
        let result = self.check_inner(token).await;
        if result.is_err() {
            self.metrics.refused.fetch_add(1, Relaxed);
        }
        result
    }

    async fn check_inner(self: &Arc<Self>, token: &str) -> Result<Arc<TokenIdentity>, Reason> {
        let now = now_ms();
        let t = tag(token);
        let mut set = self.keys.load_full();
        if let Some(id) = set.cache.get(t, now) {
            self.metrics.cached.fetch_add(1, Relaxed);
            self.refresh_if_stale(&set, now);
            return Ok(id);
        }
        self.refresh_if_stale(&set, now);
        let parsed = parse(token)?;
        let alg_text = parsed.header.alg.as_str();
        if alg_text.eq_ignore_ascii_case("none") {
            return Err(Reason::AuthnAlgNone);
        }
        let hmac_issuer = matches!(self.config.keys, JwtKeySource::Secret(_));
        let alg = match JwtAlg::parse(alg_text) {
            // An HMAC token presented to an issuer of public keys: the classic confusion
            // attack (the public key used as the HMAC secret).
            _ if !hmac_issuer && alg_text.starts_with("HS") => {
                return Err(Reason::AuthnAlgConfusion)
            }
            Some(a) if self.config.algorithms.contains(&a) => a,
            _ => return Err(Reason::AuthnAlgNotAllowed),
        };
        // RFC 7515 §4.1.11: extensions this verifier does not understand must be refused.
        if parsed.header.crit.is_some() {
            return Err(Reason::AuthnMalformed);
        }
        // A shared secret has no `kid` to match: whatever the token names is beside the point.
        let kid = if hmac_issuer {
            None
        } else {
            parsed.header.kid.as_deref()
        };
        // One fresh key set per request at most: a fetch that takes longer than `min_refresh`
        // would otherwise let a made-up `kid` fetch again and again, the request never ending.
        let mut refreshed = false;
        let key = loop {
            match set.find(kid, alg) {
                Ok(k) => break k,
                Err(false) => return Err(Reason::AuthnAlgConfusion),
                Err(true) if refreshed => return Err(Reason::AuthnUnknownKid),
                Err(true) => {
                    // An unknown `kid`: the issuer may have rotated its keys. Fetch once more
                    // (single flight, at most once per `min_refresh`) and look again.
                    refreshed = true;
                    if hmac_issuer || !self.refresh_now(set.fetched).await {
                        return Err(if set.fetched == 0 {
                            Reason::AuthnKeysUnavailable
                        } else {
                            Reason::AuthnUnknownKid
                        });
                    }
                    let fresh = self.keys.load_full();
                    if Arc::ptr_eq(&fresh, &set) {
                        return Err(Reason::AuthnUnknownKid);
                    }
                    set = fresh;
                    if let Some(id) = set.cache.get(t, now) {
                        return Ok(id);
                    }
                }
            }
        };
        if !key
            .key
            .verify(alg, parsed.signing_input.as_bytes(), &parsed.signature)
        {
            return Err(Reason::AuthnBadSignature);
        }
        // Signed by the issuer: now what it says.
        let claims: Claims = b64(parsed.payload)
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(Reason::AuthnMalformed)?;
        if claims.iss.as_deref() != Some(self.config.issuer.as_str()) {
            return Err(Reason::AuthnWrongIssuer);
        }
        let aud_ok = claims.aud.is_some_and(|a| {
            a.into_vec()
                .iter()
                .any(|a| self.config.audiences.contains(a))
        });
        if !aud_ok {
            return Err(Reason::AuthnWrongAudience);
        }
        let leeway = self.config.leeway.as_millis() as u64;
        // A token without `exp` would be valid forever: refused.
        let exp = claims.exp.ok_or(Reason::AuthnMalformed)?;
        let until = ((exp.max(0.0) * 1000.0) as u64).saturating_add(leeway);
        if now > until {
            return Err(Reason::AuthnTokenExpired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| (nbf.max(0.0) * 1000.0) as u64 > now.saturating_add(leeway))
        {
            return Err(Reason::AuthnTokenNotYetValid);
        }
        let scopes = match (claims.scope, claims.scp) {
            (Some(s), _) => s.split_ascii_whitespace().map(str::to_string).collect(),
            (None, Some(OneOrMany::One(s))) => {
                s.split_ascii_whitespace().map(str::to_string).collect()
            }
            (None, Some(OneOrMany::Many(v))) => v,
            (None, None) => Vec::new(),
        };
        let identity = Arc::new(TokenIdentity {
            subject: claims.sub,
            client: claims.client_id.or(claims.azp),
            scopes,
        });
        set.cache.put(t, until, identity.clone(), now);
        self.metrics.verified.fetch_add(1, Relaxed);
        Ok(identity)
    }

    /// Starts a background fetch when the keys are older than `refresh` (or were never
    /// fetched) and the floor allows one. The request that notices does not wait.
    fn refresh_if_stale(self: &Arc<Self>, set: &KeySet, now: u64) {
        if matches!(self.config.keys, JwtKeySource::Secret(_)) {
            return;
        }
        let stale = set.fetched == 0
            || now.saturating_sub(set.fetched) >= self.config.refresh.as_millis() as u64;
        if !stale || !self.floor_allows(now) || self.background.swap(true, Relaxed) {
            return;
        }
        // Outside a runtime (a reload from a plain thread) the next request starts the fetch.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.background.store(false, Relaxed);
            return;
        };
        let me = self.clone();
        let since = set.fetched;
        runtime.spawn(async move {
            me.refresh_now(since).await;
            me.background.store(false, Relaxed);
        });
    }

    /// Fetches the keys in the background if none are held yet (at start).
    pub fn prefetch(self: &Arc<Self>) {
        let set = self.keys.load_full();
        self.refresh_if_stale(&set, now_ms());
    }

    fn floor_allows(&self, now: u64) -> bool {
        now.saturating_sub(self.last_attempt.load(Relaxed))
            >= self.config.min_refresh.as_millis() as u64
    }

    /// Fetches the key set unless another fetch finished after `since` (then its result is
    /// used) or the floor forbids it. `true` when keys newer than `since` are in place.
    async fn refresh_now(&self, since: u64) -> bool {
        let _one = self.fetch.lock().await;
        if self.keys.load().fetched != since {
            return true;
        }
        let now = now_ms();
        if !self.floor_allows(now) {
            return false;
        }
        self.last_attempt.store(now, Relaxed);
        match fetch_keys(&self.config).await {
            Ok(keys) => {
                self.metrics.fetch_ok.fetch_add(1, Relaxed);
                let old = self.keys.load();
                // The same keys again: the verified tokens stay verified.
                let cache = if old.same_keys(&keys) {
                    old.cache.clone()
                } else {
                    tracing::info!(issuer = %self.name, keys = keys.len(), "token issuer keys loaded");
                    Arc::new(TokenCache::new(true))
                };
                self.keys.store(Arc::new(KeySet {
                    keys,
                    fetched: now.max(1),
                    cache,
                }));
                true
            }
            Err(e) => {
                self.metrics.fetch_failed.fetch_add(1, Relaxed);
                let last = self.last_error_log.load(Relaxed);
                if now.saturating_sub(last) > 30_000 {
                    self.last_error_log.store(now, Relaxed);
                    tracing::warn!(issuer = %self.name, error = %e, "cannot fetch the token issuer's keys; the keys held stay in use");
                }
                false
            }
        }
    }
}

/// The largest discovery document or JWKS accepted.
const MAX_DOCUMENT: usize = 1 << 20;

/// GET a discovery document or JWKS, bounded by the issuer's `timeout` and `MAX_DOCUMENT`.
async fn get_json(url: &str, config: &JwtConfig) -> Result<serde_json::Value, String> {
    crate::http_client::get_json(url, config.ca.as_deref(), config.timeout, MAX_DOCUMENT).await
}

/// Discovery (when configured), then the JWKS.
async fn fetch_keys(config: &JwtConfig) -> Result<Vec<Key>, String> {
    let jwks_url = match &config.keys {
        JwtKeySource::JwksUrl(u) => u.clone(),
        JwtKeySource::Discovery => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                config.issuer.trim_end_matches('/')
            );
            let doc = get_json(&url, config).await?;
            // OIDC Discovery §4.3: the document's issuer must be the one asked for.
            if doc.get("issuer").and_then(|v| v.as_str()) != Some(config.issuer.as_str()) {
                return Err(format!(
                    "{url}: the document's issuer is not {:?}",
                    config.issuer
                ));
            }
            let jwks = doc
                .get("jwks_uri")
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("{url}: no jwks_uri"))?;
            // The same rule as for a configured URL: a key set must not come in the clear.
            apiwarden_core::config::fetch_url(jwks).map_err(|e| format!("{url}: jwks_uri {e}"))?;
            jwks.to_string()
        }
        JwtKeySource::Secret(_) => return Err("an HS256 issuer has no key set".into()),
    };
    let set: JwkSet = serde_json::from_value(get_json(&jwks_url, config).await?)
        .map_err(|e| format!("{jwks_url}: not a JWK set: {e}"))?;
    let keys: Vec<Key> = set.keys.iter().filter_map(Key::from_jwk).collect();
    if keys.is_empty() {
        return Err(format!(
            "{jwks_url}: no usable signing key (RSA, P-256 or Ed25519)"
        ));
    }
    Ok(keys)
}

/// How long a caller should wait before the issuer's keys may be there (for `Retry-After`).
pub const KEYS_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_bytes_are_dropped_but_zero_stays_one_byte() {
        assert_eq!(unsigned(vec![0, 0, 1, 2]), vec![1, 2]);
        assert_eq!(unsigned(vec![0]), vec![0]);
        assert_eq!(unsigned(vec![]), Vec::<u8>::new());
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_key_work() {
        for t in ["", "abc", "a.b", "!!.e30.", "e30.e30", "e30.e30.!!"] {
            assert!(matches!(parse(t), Err(Reason::AuthnMalformed)), "{t}");
        }
        // `{"alg":"ES256"}` . `{}` . empty signature
        let ok = parse("eyJhbGciOiJFUzI1NiJ9.e30.").map(|p| p.header.alg);
        assert_eq!(ok.ok().as_deref(), Some("ES256"));
    }

    #[test]
    fn a_jwk_whose_alg_does_not_fit_its_type_is_skipped() {
        let v = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([7u8; 32]), "alg": "ES256"});
        assert!(Key::from_jwk(&v).is_none());
        let v = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([7u8; 32])});
        assert!(Key::from_jwk(&v).is_some());
        let v = serde_json::json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(
            Key::from_jwk(&v).is_none(),
            "symmetric keys in a JWKS are never used"
        );
    }
}
