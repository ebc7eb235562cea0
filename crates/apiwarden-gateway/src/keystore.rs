//! API keys: the store (SQLite in the data directory, `<data_dir>/apiwarden.db`), and the key
//! ring the identify stage checks against.
//!
//! A key's secret is never stored: only HMAC-SHA256(pepper, secret), where the pepper is a
//! server-side secret kept outside the database (`storage.pepper`). Checking a key is one map
//! lookup by key id and one HMAC verified in constant time. The gateway keeps an in-memory
//! [`KeyRing`], read again whenever another process changes the database (checked every
//! 250 ms, so a revocation is in force within a second); `last_used` is written back every
//! 10 s, not once per request.

use apiwarden_core::apikey;
use apiwarden_core::config::{Config, SecretSource};
use apiwarden_core::event::Reason;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::now_ms;

/// Why the key store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key database {path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("the pepper ({0}) cannot be read: {1}; set storage.pepper to env:NAME or file:PATH")]
    Pepper(String, String),
    #[error("no key with id {0}; `apiwarden keys list` shows the keys")]
    NoSuchKey(String),
    #[error("key {0} is {1}; only an active key can be rotated")]
    NotActive(String, &'static str),
    #[error("no consumer named {0:?} in the config; add a [[consumers]] entry first")]
    NoSuchConsumer(String),
    #[error("consumer {consumer:?} does not hold scope {scope:?}; a key can only narrow its consumer's scopes")]
    ScopeNotGranted { consumer: String, scope: String },
    #[error("the system random number generator failed")]
    Random,
    #[error("the pepper ({0}) is not the one the keys in {1} were made with: every key would be refused; restore the original pepper (or move the database away to start over)")]
    PepperMismatch(String, PathBuf),
}

/// Where a key stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    /// Replaced by a rotation; still accepted until its grace period ends.
    Rotating,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Rotating => "rotating",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

/// One key as stored (without its secret).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub consumer: String,
    #[serde(skip)]
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    /// Unix milliseconds, as every time here.
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    /// Set by a rotation: the old key works until then.
    pub grace_until: Option<u64>,
    pub replaced_by: Option<String>,
    pub last_used: Option<u64>,
}

impl KeyRecord {
    pub fn status(&self, now: u64) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|t| t <= now) {
            KeyStatus::Expired
        } else if let Some(g) = self.grace_until {
            if g > now {
                KeyStatus::Rotating
            } else {
                KeyStatus::Expired
            }
        } else {
            KeyStatus::Active
        }
    }
}

fn insert(conn: &rusqlite::Connection, r: &KeyRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO api_keys (key_id, consumer, hash, scopes, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        rusqlite::params![
            r.key_id,
            r.consumer,
            r.hash,
            r.scopes.join(" "),
            r.created_at as i64,
            r.expires_at.map(|t| t as i64)
        ],
    )
    .map(|_| ())
}

fn sq(path: &std::path::Path) -> impl Fn(rusqlite::Error) -> KeyError + '_ {
    move |error| KeyError::Sqlite {
        path: path.to_path_buf(),
        error,
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    consumer TEXT NOT NULL,
    hash BLOB NOT NULL,
    scopes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    grace_until INTEGER,
    replaced_by TEXT,
    last_used INTEGER
);
CREATE TABLE IF NOT EXISTS key_meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
";

/// Reads (or, for the default, creates) the pepper.
pub fn load_pepper(
    source: &SecretSource,
    data_dir: &std::path::Path,
) -> Result<hmac::Key, KeyError> {
    // The default pepper follows the data directory, also when `--data-dir` moved it.
    let default_path;
    let source = match source {
        SecretSource::Generated(_) => {
            default_path = SecretSource::Generated(data_dir.join("pepper"));
            &default_path
        }
        other => other,
    };
    let bytes = match source {
        // As bytes, and with a fixed message: the value itself must never reach an error.
        SecretSource::Env(name) => std::os::unix::ffi::OsStringExt::into_vec(
            std::env::var_os(name)
                .ok_or_else(|| KeyError::Pepper(format!("env:{name}"), "it is not set".into()))?,
        ),
        SecretSource::File(path) => {
            warn_if_readable_by_others(path);
            std::fs::read(path)
                .map_err(|e| KeyError::Pepper(format!("file:{}", path.display()), e.to_string()))?
        }
        SecretSource::Generated(path) => match std::fs::read(path) {
            Ok(b) => {
                warn_if_readable_by_others(path);
                b
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut raw = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut raw)
                    .map_err(|_| KeyError::Random)?;
                let text = apikey::hex(&raw);
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                write_private(path, text.as_bytes()).map_err(|e| {
                    KeyError::Pepper(format!("file:{}", path.display()), e.to_string())
                })?;
                // Whoever created it first wins; read back what is there.
                std::fs::read(path).map_err(|e| {
                    KeyError::Pepper(format!("file:{}", path.display()), e.to_string())
                })?
            }
            Err(e) => {
                return Err(KeyError::Pepper(
                    format!("file:{}", path.display()),
                    e.to_string(),
                ))
            }
        },
    };
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < 16 {
        return Err(KeyError::Pepper(
            "storage.pepper".into(),
            "it is shorter than 16 bytes".into(),
        ));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, trimmed))
}

fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the pepper file can be read by others than its owner; chmod 600 it");
        }
    }
}

/// Creates `path` readable by its owner only, whole or not at all: the bytes go to a private
/// temporary file, are synced, and the file is then linked to `path` (which fails if another
/// process got there first: its pepper wins). An existing file is left alone.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A name of its own per attempt (threads of one process race too).
    let tmp = path.with_extension(format!("tmp-{}", crate::ids::new_id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The key table in the data directory's database.
pub struct KeyStore {
    conn: rusqlite::Connection,
    path: PathBuf,
    pepper: hmac::Key,
}

impl KeyStore {
    pub fn open(config: &Config) -> Result<KeyStore, KeyError> {
        let pepper = load_pepper(&config.storage.pepper, &config.storage.data_dir)?;
        let path = crate::blocklist::database_path(&config.storage.data_dir);
        let _ = std::fs::create_dir_all(&config.storage.data_dir);
        let conn = rusqlite::Connection::open(&path).map_err(sq(&path))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sq(&path))?;
        conn.execute_batch(SCHEMA).map_err(sq(&path))?;
        // A fingerprint of the pepper (an HMAC of a fixed text, which reveals nothing of it):
        // recorded by the first user of the database, checked by every later one, so a changed
        // or mismatched pepper is an error at once rather than every key failing.
        let print = hmac::sign(&pepper, b"apiwarden pepper fingerprint v1");
        conn.execute(
            "INSERT OR IGNORE INTO key_meta (name, value) VALUES ('pepper_fingerprint', ?1)",
            [print.as_ref()],
        )
        .map_err(sq(&path))?;
        let stored: Vec<u8> = conn
            .query_row(
                "SELECT value FROM key_meta WHERE name = 'pepper_fingerprint'",
                [],
                |r| r.get(0),
            )
            .map_err(sq(&path))?;
        if stored != print.as_ref() {
            let source = match &config.storage.pepper {
                SecretSource::Env(n) => format!("env:{n}"),
                SecretSource::File(p) => format!("file:{}", p.display()),
                SecretSource::Generated(_) => {
                    format!("file:{}", config.storage.data_dir.join("pepper").display())
                }
            };
            return Err(KeyError::PepperMismatch(source, path));
        }
        Ok(KeyStore { conn, path, pepper })
    }

    fn random_hex(n_bytes: usize) -> Result<String, KeyError> {
        let mut raw = vec![0u8; n_bytes];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| KeyError::Random)?;
        Ok(apikey::hex(&raw))
    }

    /// Issues a key: returns its record and the key text (shown once, never stored).
    pub fn create(
        &mut self,
        config: &Config,
        consumer: &str,
        scopes: Option<Vec<String>>,
        expires_at: Option<u64>,
    ) -> Result<(KeyRecord, String), KeyError> {
        let (record, text) = self.new_key(config, consumer, scopes, expires_at)?;
        insert(&self.conn, &record).map_err(sq(&self.path))?;
        Ok((record, text))
    }

    /// A new key record and its text, not yet stored.
    fn new_key(
        &self,
        config: &Config,
        consumer: &str,
        scopes: Option<Vec<String>>,
        expires_at: Option<u64>,
    ) -> Result<(KeyRecord, String), KeyError> {
        let c = config
            .consumers
            .iter()
            .find(|c| c.name == consumer)
            .ok_or_else(|| KeyError::NoSuchConsumer(consumer.to_string()))?;
        let scopes = scopes.unwrap_or_else(|| c.scopes.clone());
        if let Some(s) = scopes.iter().find(|s| !c.scopes.contains(s)) {
            return Err(KeyError::ScopeNotGranted {
                consumer: consumer.to_string(),
                scope: s.clone(),
            });
        }
        let key_id = Self::random_hex(apikey::KEY_ID_LEN / 2)?;
        let secret = Self::random_hex(apikey::SECRET_LEN / 2)?;
        let hash = hmac::sign(&self.pepper, secret.as_bytes())
            .as_ref()
            .to_vec();
        let record = KeyRecord {
            key_id: key_id.clone(),
            consumer: consumer.to_string(),
            hash,
            scopes,
            created_at: now_ms(),
            expires_at,
            revoked_at: None,
            grace_until: None,
            replaced_by: None,
            last_used: None,
        };
        Ok((record, apikey::format(&key_id, &secret)))
    }

    /// Every key, oldest first.
    pub fn list(&mut self) -> Result<Vec<KeyRecord>, KeyError> {
        let path = self.path.clone();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key_id, consumer, hash, scopes, created_at, expires_at, revoked_at, grace_until, replaced_by, last_used FROM api_keys ORDER BY created_at, key_id")
            .map_err(sq(&path))?;
        let opt = |v: Option<i64>| v.map(|t| t as u64);
        let rows = stmt
            .query_map([], |r| {
                Ok(KeyRecord {
                    key_id: r.get(0)?,
                    consumer: r.get(1)?,
                    hash: r.get(2)?,
                    scopes: r
                        .get::<_, String>(3)?
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                    created_at: r.get::<_, i64>(4)? as u64,
                    expires_at: opt(r.get(5)?),
                    revoked_at: opt(r.get(6)?),
                    grace_until: opt(r.get(7)?),
                    replaced_by: r.get(8)?,
                    last_used: opt(r.get(9)?),
                })
            })
            .map_err(sq(&path))?;
        rows.collect::<Result<_, _>>().map_err(sq(&path))
    }

    fn get(&mut self, key_id: &str) -> Result<KeyRecord, KeyError> {
        self.list()?
            .into_iter()
            .find(|k| k.key_id == key_id)
            .ok_or_else(|| KeyError::NoSuchKey(key_id.to_string()))
    }

    /// Revokes a key at once; false when it was already revoked.
    pub fn revoke(&mut self, key_id: &str) -> Result<bool, KeyError> {
        self.get(key_id)?;
        let n = self
            .conn
            .execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL",
                rusqlite::params![key_id, now_ms() as i64],
            )
            .map_err(sq(&self.path))?;
        Ok(n == 1)
    }

    /// Issues a new secret for the same consumer and scopes (a new key id), and lets the old
    /// key work until `grace` has passed. One transaction: a key revoked or rotated meanwhile
    /// is not rotated.
    pub fn rotate(
        &mut self,
        config: &Config,
        key_id: &str,
        grace: Duration,
    ) -> Result<(KeyRecord, String), KeyError> {
        let old = self.get(key_id)?;
        let now = now_ms();
        let status = old.status(now);
        if status != KeyStatus::Active {
            return Err(KeyError::NotActive(key_id.to_string(), status.as_str()));
        }
        // Scopes the consumer lost since are not carried over.
        let held = config
            .consumers
            .iter()
            .find(|c| c.name == old.consumer)
            .ok_or_else(|| KeyError::NoSuchConsumer(old.consumer.clone()))?;
        let scopes = old
            .scopes
            .iter()
            .filter(|s| held.scopes.contains(s))
            .cloned()
            .collect();
        let grace_until = now
            .checked_add(grace.as_millis().try_into().unwrap_or(u64::MAX))
            .ok_or(KeyError::NotActive(key_id.to_string(), "beyond any grace"))?;
        let (new, text) = self.new_key(config, &old.consumer, Some(scopes), old.expires_at)?;
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sq(&path))?;
        let n = tx
            .execute(
                "UPDATE api_keys SET grace_until = ?2, replaced_by = ?3 WHERE key_id = ?1 AND revoked_at IS NULL AND grace_until IS NULL",
                rusqlite::params![key_id, grace_until as i64, new.key_id],
            )
            .map_err(sq(&path))?;
        if n != 1 {
            return Err(KeyError::NotActive(key_id.to_string(), "changed meanwhile"));
        }
        insert(&tx, &new).map_err(sq(&path))?;
        tx.commit().map_err(sq(&path))?;
        Ok((new, text))
    }

    /// Changes when another connection commits: the gateway's cue to read the keys again.
    pub fn data_version(&self) -> Result<i64, KeyError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sq(&self.path))
    }

    /// Writes back `last_used` times (never moving one backwards).
    pub fn touch(&mut self, used: &[(String, u64)]) -> Result<(), KeyError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sq(&path))?;
        for (key_id, at) in used {
            tx.execute(
                "UPDATE api_keys SET last_used = ?2 WHERE key_id = ?1 AND (last_used IS NULL OR last_used < ?2)",
                rusqlite::params![key_id, *at as i64],
            )
            .map_err(sq(&path))?;
        }
        tx.commit().map_err(sq(&path))
    }

    /// The key ring the gateway checks against.
    pub fn ring(&mut self) -> Result<KeyRing, KeyError> {
        let keys = self
            .list()?
            .into_iter()
            .map(|r| {
                let used = r.last_used.unwrap_or(0);
                (
                    r.key_id.clone(),
                    Arc::new(LiveKey {
                        record: r,
                        last_used: AtomicU64::new(used),
                        verified: [AtomicU64::new(0), AtomicU64::new(0)],
                    }),
                )
            })
            .collect();
        Ok(KeyRing {
            keys,
            pepper: Some(self.pepper.clone()),
        })
    }
}

/// A key as the gateway holds it.
pub struct LiveKey {
    pub record: KeyRecord,
    /// When it was last used, updated on the request path and written back every 10 s.
    pub last_used: AtomicU64,
    /// A fast 128-bit tag of the secret under per-process random keys, set once the secret
    /// has passed the HMAC check: later requests with the same key compare this instead of
    /// computing the HMAC again (like a verified-token cache). 0 = not yet verified.
    verified: [AtomicU64; 2],
}

/// Per-process random keys of the verified-secret tags.
fn tag_keys() -> &'static [std::hash::RandomState; 2] {
    static KEYS: std::sync::OnceLock<[std::hash::RandomState; 2]> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| [std::hash::RandomState::new(), std::hash::RandomState::new()])
}

fn tag(secret: &str) -> [u64; 2] {
    use std::hash::BuildHasher;
    let [a, b] = tag_keys();
    // Never 0, so that 0 can mean "none".
    [a.hash_one(secret) | 1, b.hash_one(secret) | 1]
}

/// The keys in force, immutable; swapped whole when the store changes.
#[derive(Default)]
pub struct KeyRing {
    keys: HashMap<String, Arc<LiveKey>>,
    /// `None` until the pepper could be read: then API keys cannot be checked at all.
    pepper: Option<hmac::Key>,
}

impl KeyRing {
    /// Whether keys can be checked at all (the pepper and the store could be read).
    pub fn usable(&self) -> bool {
        self.pepper.is_some()
    }

    /// Checks a credential as sent. `Err(reason)` says why it is refused.
    pub fn check(&self, text: &str, now: u64) -> Result<&Arc<LiveKey>, Reason> {
        let Some(pepper) = &self.pepper else {
            return Err(Reason::AuthnUnavailable);
        };
        let parsed = apikey::parse(text).ok_or(Reason::AuthnMalformed)?;
        // Before the lookup, so an unknown key id costs the same.
        let t = tag(parsed.secret);
        let Some(key) = self.keys.get(parsed.key_id) else {
            // Same work as for a known key, so timing does not tell whether an id exists.
            let _ = hmac::verify(pepper, parsed.secret.as_bytes(), &[0u8; 32]);
            return Err(Reason::AuthnInvalidKey);
        };
        let known = key.verified[0].load(Relaxed) == t[0] && key.verified[1].load(Relaxed) == t[1];
        if !known {
            hmac::verify(pepper, parsed.secret.as_bytes(), &key.record.hash)
                .map_err(|_| Reason::AuthnInvalidKey)?;
            key.verified[0].store(t[0], Relaxed);
            key.verified[1].store(t[1], Relaxed);
        }
        match key.record.status(now) {
            KeyStatus::Active | KeyStatus::Rotating => {
                // At most one write a second per key: a busy key's cache line is not written
                // by every worker on every request.
                if now > key.last_used.load(Relaxed) + 1_000 {
                    key.last_used.fetch_max(now, Relaxed);
                }
                Ok(key)
            }
            KeyStatus::Revoked => Err(Reason::AuthnRevokedKey),
            KeyStatus::Expired => Err(Reason::AuthnExpiredKey),
        }
    }

    /// Carries what the request path learned (last use, verified tags) over from the ring this
    /// one replaces, for keys that did not change.
    pub fn inherit(&self, old: &KeyRing) {
        for (id, k) in &self.keys {
            if let Some(o) = old.keys.get(id).filter(|o| o.record.hash == k.record.hash) {
                k.last_used.fetch_max(o.last_used.load(Relaxed), Relaxed);
                for i in 0..2 {
                    k.verified[i].store(o.verified[i].load(Relaxed), Relaxed);
                }
            }
        }
    }

    /// Keys used since `since` (for writing `last_used` back).
    pub fn used_since(&self, since: &HashMap<String, u64>) -> Vec<(String, u64)> {
        self.keys
            .values()
            .filter_map(|k| {
                let t = k.last_used.load(Relaxed);
                (t > since.get(&k.record.key_id).copied().unwrap_or(0))
                    .then(|| (k.record.key_id.clone(), t))
            })
            .collect()
    }
}

/// Keeps `shared.keys` in step with the store: reads the keys again when another process
/// changed the database, writes `last_used` back every 10 s. Runs until `stop` is set.
pub fn follow(shared: Arc<crate::pipeline::Shared>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut store: Option<(KeyStore, i64)> = None;
    // What the store was opened from; a reload that changes it opens the store again.
    let mut origin: Option<(PathBuf, SecretSource)> = None;
    let mut written: HashMap<String, u64> = HashMap::new();
    // A ring read from the store takes over what the old one learned; what the store already
    // holds as last use needs no writing back.
    let install = |ring: KeyRing, written: &mut HashMap<String, u64>| {
        ring.inherit(&shared.keys.load());
        for (id, k) in &ring.keys {
            if let Some(t) = k.record.last_used {
                let w = written.entry(id.clone()).or_default();
                *w = (*w).max(t);
            }
        }
        shared.keys.store(Arc::new(ring));
    };
    let mut last_flush = std::time::Instant::now();
    let mut last_error: Option<std::time::Instant> = None;
    loop {
        let stopping = stop.load(std::sync::atomic::Ordering::Relaxed);
        // An `Arc`, not a guard: this thread holds it across its sleep.
        let state = shared.state.load_full();
        let config = &state.config;
        let now_from = (
            config.storage.data_dir.clone(),
            config.storage.pepper.clone(),
        );
        if origin.as_ref() != Some(&now_from) {
            store = None;
            origin = Some(now_from);
        }
        let result = (|| -> Result<(), KeyError> {
            if store.is_none() {
                let mut s = KeyStore::open(config)?;
                let v = s.data_version()?;
                install(s.ring()?, &mut written);
                store = Some((s, v));
            }
            let (s, version) = store.as_mut().expect("opened above");
            // Changes first (a revocation must not wait behind our own writes), then usage.
            let v = s.data_version()?;
            if v != *version {
                *version = v;
                install(s.ring()?, &mut written);
            }
            if last_flush.elapsed() >= Duration::from_secs(10) || stopping {
                let used = shared.keys.load().used_since(&written);
                if !used.is_empty() {
                    s.touch(&used)?;
                    written.extend(used);
                }
                last_flush = std::time::Instant::now();
            }
            Ok(())
        })();
        if let Err(e) = result {
            store = None;
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(error = %e, "cannot read the API keys; the keys in force stay as they are");
                last_error = Some(std::time::Instant::now());
            }
        }
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_racing_to_make_the_pepper_all_get_the_same_one() {
        let dir = std::env::temp_dir().join(format!("aw-pepper-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = SecretSource::Generated(dir.join("ignored"));
        let tags: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let key = load_pepper(&source, &dir).unwrap();
                        hmac::sign(&key, b"probe").as_ref().to_vec()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tags.windows(2).all(|w| w[0] == w[1]), "one pepper for all");
        let text = std::fs::read_to_string(dir.join("pepper")).unwrap();
        assert_eq!(text.len(), 64, "a whole pepper, never a partial one");
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_changed_pepper_is_refused_at_open() {
        let dir = std::env::temp_dir().join(format!("aw-pepper-fp-{}", crate::ids::new_id()));
        let text = format!("[storage]\ndata_dir = \"{}\"\n", dir.display());
        let cfg = apiwarden_core::config::parse(&text, "t.toml").unwrap();
        KeyStore::open(&cfg).unwrap();
        KeyStore::open(&cfg).expect("the same pepper opens again");
        std::fs::write(dir.join("pepper"), "another pepper, long enough to count").unwrap();
        let err = KeyStore::open(&cfg)
            .err()
            .expect("a changed pepper is refused")
            .to_string();
        assert!(err.contains("not the one the keys"), "{err}");
        assert!(!err.contains("another pepper"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pepper_from_the_environment_is_never_quoted_in_errors() {
        let err = load_pepper(
            &SecretSource::Env("APIWARDEN_TEST_PEPPER_THAT_IS_NOT_SET".into()),
            std::path::Path::new("/nonexistent"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("not set"), "{err}");
    }
}
