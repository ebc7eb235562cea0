//! API keys: the store (SQLite in the data directory, `<data_dir>/apiwarden.db`, or, in fleet
//! mode, the PostgreSQL database of `storage.database`), and the key ring the identify stage
//! checks against.
//!
//! A key's secret is never stored: only HMAC-SHA256(pepper, secret), where the pepper is a
//! server-side secret kept outside the database (`storage.pepper`). Checking a key is one map
//! lookup by key id and one HMAC verified in constant time. The gateway keeps an in-memory
//! [`KeyRing`], read again whenever another process changes the database (checked every
//! 250 ms, so a revocation is in force within a second); `last_used` is written back every
//! 10 s, not once per request.
//!
//! Both backends have the same tables and run the same statements (written with `?N`
//! placeholders, which PostgreSQL spells `$N`) through [`Tx`]; only opening, the schema and
//! change detection differ. SQLite tells of other connections' commits by itself
//! (`PRAGMA data_version`); in PostgreSQL every transaction that changes keys also writes a
//! new random change mark (the `key_meta` row `change`), which each gateway polls.

use apiwarden_core::apikey;
use apiwarden_core::config::{redact_url, Config, SecretSource};
use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    /// `url_redacted` never holds the password.
    #[error("the key database {url_redacted}: {}; is PostgreSQL running there, reachable from here, and do its user, password, database and schema exist? check storage.database", with_causes(.error))]
    Postgres {
        url_redacted: String,
        error: postgres::Error,
    },
    #[error("storage.database must be a postgres://user@host[:port]/database URL")]
    NotAPostgresUrl,
    #[error("the pepper ({0}) cannot be read: {1}; set storage.pepper to env:NAME or file:PATH")]
    Pepper(String, String),
    #[error("no key with id {0}; `apiwarden keys list` shows the keys")]
    NoSuchKey(String),
    #[error("key {0} is {1}; only an active key can be rotated")]
    NotActive(String, &'static str),
    #[error("no consumer named {0:?}; add a [[consumers]] entry to the config, or `apiwarden consumers add {0}`")]
    NoSuchConsumer(String),
    #[error("consumer {0:?} is defined in the config file; change it there (the store holds only consumers added with `apiwarden consumers` or the admin API)")]
    ConsumerInConfig(String),
    #[error("consumer {0}")]
    BadConsumer(String),
    #[error("consumer {consumer:?} does not hold scope {scope:?}; a key can only narrow its consumer's scopes")]
    ScopeNotGranted { consumer: String, scope: String },
    #[error("the system random number generator failed")]
    Random,
    #[error("the key store's thread ended without an answer (see the log)")]
    ThreadFailed,
    #[error("the pepper ({0}) is not the one the keys in {1} were made with: every key would be refused; restore the original pepper (every gateway sharing the keys needs the same one, so set storage.pepper to the same env: or file: on each), or start over with an empty key database")]
    PepperMismatch(String, String),
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

/// An error with its causes: the postgres crate's own message is only the kind ("error
/// connecting to server"). None of them holds the password: connection settings are only
/// named, never quoted, and only a URL reaches the parser (see `Backend::open`).
fn with_causes(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn sq(path: &Path) -> impl Fn(rusqlite::Error) -> KeyError + '_ {
    move |error| KeyError::Sqlite {
        path: path.to_path_buf(),
        error,
    }
}

fn pg(url_redacted: &str) -> impl Fn(postgres::Error) -> KeyError + '_ {
    move |error| KeyError::Postgres {
        url_redacted: url_redacted.to_string(),
        error,
    }
}

/// `storage.database` as it may be shown: no password, neither before the host nor as a
/// `password=` parameter.
fn shown_url(url: &str) -> String {
    let url = redact_url(url);
    match url.split_once('?') {
        Some((base, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .map(|kv| {
                    if kv.to_ascii_lowercase().starts_with("password=") {
                        "password=***"
                    } else {
                        kv
                    }
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => url,
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
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

/// The same tables in PostgreSQL, in the first schema of the connection's `search_path`.
/// Gateways starting together take an advisory lock first: concurrent `CREATE TABLE IF NOT
/// EXISTS` of one table can fail in PostgreSQL.
const PG_SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(6148254117034640425);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    consumer TEXT NOT NULL,
    hash BYTEA NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    grace_until BIGINT,
    replaced_by TEXT,
    last_used BIGINT
);
CREATE TABLE IF NOT EXISTS key_meta (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    detail TEXT NOT NULL
);
INSERT INTO key_meta (name, value) VALUES ('change', decode('00', 'hex')) ON CONFLICT (name) DO NOTHING;
COMMIT;
";

/// The columns of a key record, in the order `key_record!` reads them.
const COLUMNS: &str = "key_id, consumer, hash, scopes, created_at, expires_at, revoked_at, grace_until, replaced_by, last_used";

/// A `KeyRecord` from a row of `COLUMNS`; `$get` is the row's fallible getter (`get` for
/// SQLite, `try_get` for PostgreSQL).
macro_rules! key_record {
    ($row:ident . $get:ident) => {{
        let opt = |v: Option<i64>| v.map(|t| t as u64);
        KeyRecord {
            key_id: $row.$get(0)?,
            consumer: $row.$get(1)?,
            hash: $row.$get(2)?,
            scopes: $row
                .$get::<_, String>(3)?
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            created_at: $row.$get::<_, i64>(4)? as u64,
            expires_at: opt($row.$get(5)?),
            revoked_at: opt($row.$get(6)?),
            grace_until: opt($row.$get(7)?),
            replaced_by: $row.$get(8)?,
            last_used: opt($row.$get(9)?),
        }
    }};
}

/// A value bound to a statement, for either backend.
#[derive(Clone, Copy, Debug)]
enum Val<'a> {
    Text(&'a str),
    Int(Option<i64>),
    Bytes(&'a [u8]),
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Val::Text(s) => s.to_sql(),
            Val::Int(i) => i.to_sql(),
            Val::Bytes(b) => b.to_sql(),
        }
    }
}

impl postgres::types::ToSql for Val<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Text(s) => s.to_sql_checked(ty, out),
            Val::Int(i) => i.to_sql_checked(ty, out),
            Val::Bytes(b) => b.to_sql_checked(ty, out),
        }
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::ToSql;
        <&str as ToSql>::accepts(ty) || <i64 as ToSql>::accepts(ty) || <&[u8]>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

/// PostgreSQL's spelling of a statement written for SQLite: `?N` becomes `$N`.
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

fn pg_params<'a>(params: &'a [Val<'a>]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// One transaction on either backend: everything the store does goes through one.
enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>, &'a Path),
    Postgres(postgres::Transaction<'a>, &'a str),
}

impl Tx<'_> {
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64, KeyError> {
        match self {
            Tx::Sqlite(tx, path) => tx
                .prepare_cached(sql)
                .and_then(|mut s| s.execute(rusqlite::params_from_iter(params)))
                .map(|n| n as u64)
                .map_err(sq(path)),
            Tx::Postgres(tx, url) => tx
                .execute(&pg_sql(sql), &pg_params(params))
                .map_err(pg(url)),
        }
    }

    /// The keys `filter` (a `WHERE` clause, or nothing) selects, oldest first.
    fn keys(&mut self, filter: &str, params: &[Val<'_>]) -> Result<Vec<KeyRecord>, KeyError> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys {filter} ORDER BY created_at, key_id");
        match self {
            Tx::Sqlite(tx, path) => {
                let mut stmt = tx.prepare_cached(&sql).map_err(sq(path))?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params), |r| {
                        Ok(key_record!(r.get))
                    })
                    .map_err(sq(path))?;
                rows.collect::<Result<_, _>>().map_err(sq(path))
            }
            Tx::Postgres(tx, url) => tx
                .query(&pg_sql(&sql), &pg_params(params))
                .map_err(pg(url))?
                .iter()
                .map(|r| Ok(key_record!(r.try_get)))
                .collect::<Result<_, postgres::Error>>()
                .map_err(pg(url)),
        }
    }

    /// The consumers kept in the store (`filter`: a `WHERE` clause, or nothing), by name.
    fn consumers(
        &mut self,
        filter: &str,
        params: &[Val<'_>],
    ) -> Result<Vec<StoredConsumer>, KeyError> {
        let sql = format!(
            "SELECT name, body, created_at, updated_at FROM consumers {filter} ORDER BY name"
        );
        let rows: Vec<(String, String, i64, i64)> = match self {
            Tx::Sqlite(tx, path) => {
                let mut stmt = tx.prepare_cached(&sql).map_err(sq(path))?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params), |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .map_err(sq(path))?;
                rows.collect::<Result<_, _>>().map_err(sq(path))?
            }
            Tx::Postgres(tx, url) => tx
                .query(&pg_sql(&sql), &pg_params(params))
                .map_err(pg(url))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
                .collect::<Result<_, postgres::Error>>()
                .map_err(pg(url))?,
        };
        rows.into_iter()
            .map(|(name, body, created, updated)| {
                let mut c: StoredConsumer = serde_json::from_str(&body).map_err(|e| {
                    KeyError::BadConsumer(format!(
                        "{name}: the stored settings cannot be read: {e}"
                    ))
                })?;
                c.name = name;
                c.created_at = created as u64;
                c.updated_at = updated as u64;
                Ok(c)
            })
            .collect()
    }

    /// The scopes a consumer holds, from the config or else the store.
    fn granted(&mut self, config: &Config, consumer: &str) -> Result<Vec<String>, KeyError> {
        if let Some(c) = config.consumers.iter().find(|c| c.name == consumer) {
            return Ok(c.scopes.clone());
        }
        self.consumers("WHERE name = ?1", &[Val::Text(consumer)])?
            .pop()
            .map(|c| c.scopes)
            .ok_or_else(|| KeyError::NoSuchConsumer(consumer.to_string()))
    }

    /// Change log entries after `seq`, oldest first, at most 1 000.
    fn changes(&mut self, seq: i64) -> Result<Vec<KeyChange>, KeyError> {
        let sql = "SELECT seq, at, actor, action, key_id, consumer, detail FROM key_changes WHERE seq > ?1 ORDER BY seq LIMIT 1000";
        macro_rules! change {
            ($r:ident . $get:ident) => {
                KeyChange {
                    seq: $r.$get(0)?,
                    at: $r.$get::<_, i64>(1)? as u64,
                    actor: $r.$get(2)?,
                    action: $r.$get(3)?,
                    key_id: $r.$get(4)?,
                    consumer: $r.$get(5)?,
                    detail: $r.$get(6)?,
                }
            };
        }
        match self {
            Tx::Sqlite(tx, path) => {
                let mut stmt = tx.prepare_cached(sql).map_err(sq(path))?;
                let rows = stmt
                    .query_map([seq], |r| Ok(change!(r.get)))
                    .map_err(sq(path))?;
                rows.collect::<Result<_, _>>().map_err(sq(path))
            }
            Tx::Postgres(tx, url) => tx
                .query(&pg_sql(sql), &[&seq])
                .map_err(pg(url))?
                .iter()
                .map(|r| Ok(change!(r.try_get)))
                .collect::<Result<_, postgres::Error>>()
                .map_err(pg(url)),
        }
    }

    /// A `key_meta` value.
    fn meta(&mut self, name: &str) -> Result<Option<Vec<u8>>, KeyError> {
        let sql = "SELECT value FROM key_meta WHERE name = ?1";
        match self {
            Tx::Sqlite(tx, path) => {
                use rusqlite::OptionalExtension;
                tx.query_row(sql, [name], |r| r.get(0))
                    .optional()
                    .map_err(sq(path))
            }
            Tx::Postgres(tx, url) => tx
                .query_opt(&pg_sql(sql), &[&name])
                .and_then(|row| row.map(|r| r.try_get(0)).transpose())
                .map_err(pg(url)),
        }
    }

    /// Tells the other gateways that the keys changed, once this commits. SQLite needs nothing
    /// (`PRAGMA data_version` moves by itself); PostgreSQL gets a new random change mark. Changing
    /// transactions lock its row first (`Backend::transaction`), so they run one at a time;
    /// readers see the new mark only with the change.
    fn mark_changed(&mut self) -> Result<(), KeyError> {
        if let Tx::Postgres(..) = self {
            let mut mark = [0u8; 8];
            SystemRandom::new()
                .fill(&mut mark)
                .map_err(|_| KeyError::Random)?;
            self.execute(
                "UPDATE key_meta SET value = ?1 WHERE name = 'change'",
                &[Val::Bytes(&mark)],
            )?;
        }
        Ok(())
    }

    fn commit(self) -> Result<(), KeyError> {
        match self {
            Tx::Sqlite(tx, path) => tx.commit().map_err(sq(path)),
            Tx::Postgres(tx, url) => tx.commit().map_err(pg(url)),
        }
    }
}

/// A consumer kept in the store (added with `apiwarden consumers` or the admin API), beside
/// those of the config file. Its settings are one JSON document (`body`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredConsumer {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// CIDR networks (canonical), when the consumer is limited to them.
    #[serde(default)]
    pub allow_ips: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// As `consumers[].token_issuers`: the token issuers whose clients of this name act as it.
    #[serde(default)]
    pub token_issuers: Vec<String>,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub updated_at: u64,
}

impl StoredConsumer {
    /// Checks the names and canonicalises the networks; the error says what is wrong.
    pub fn validated(mut self) -> Result<StoredConsumer, KeyError> {
        let bad = |m: String| Err(KeyError::BadConsumer(m));
        let word = |s: &str| {
            !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
        };
        if !word(&self.name) {
            return bad(format!(
                "name {:?}: 1 to 128 visible characters, no spaces or quotes",
                self.name
            ));
        }
        for s in self.scopes.iter().chain(&self.roles) {
            if !word(s) {
                return bad(format!(
                    "{}: scope or role {s:?} must be visible characters without spaces",
                    self.name
                ));
            }
        }
        if let Some(nets) = &mut self.allow_ips {
            for n in nets.iter_mut() {
                match apiwarden_core::net::IpNet::parse(n) {
                    Ok(net) => *n = net.canonical().to_string(),
                    Err(e) => return bad(format!("{}: allow_ips {n:?}: {e}", self.name)),
                }
            }
        }
        if self.metadata.len() > 64
            || self
                .metadata
                .iter()
                .any(|(k, v)| k.len() > 128 || v.len() > 1024)
        {
            return bad(format!(
                "{}: metadata is limited to 64 entries, keys of 128 and values of 1024 bytes",
                self.name
            ));
        }
        Ok(self)
    }

    /// The settings the request path uses, as a config entry would give them.
    pub fn to_config(&self) -> apiwarden_core::config::ConsumerConfig {
        apiwarden_core::config::ConsumerConfig {
            name: self.name.clone(),
            scopes: self.scopes.clone(),
            roles: self.roles.clone(),
            allow_ips: self.allow_ips.as_ref().map(|nets| {
                nets.iter()
                    .filter_map(|n| apiwarden_core::net::IpNet::parse(n).ok())
                    .collect()
            }),
            metadata: self.metadata.clone(),
            token_issuers: self.token_issuers.clone(),
            ..Default::default()
        }
    }
}

/// One change of the keys, as the change log holds it: every gateway turns each into an
/// `admin` audit event.
#[derive(Clone, Debug)]
pub struct KeyChange {
    pub seq: i64,
    pub at: u64,
    /// Who made it: `cli:USER@HOST`, `admin-token:NAME`.
    pub actor: String,
    /// `created`, `rotated` or `revoked`.
    pub action: String,
    pub key_id: String,
    pub consumer: String,
    pub detail: String,
}

impl KeyChange {
    /// A sentence for the audit event.
    pub fn describe(&self) -> String {
        let mut s = if self.key_id.is_empty() {
            format!("{} {} by {}", self.action, self.consumer, self.actor)
        } else {
            format!(
                "key {} of consumer {} {} by {}",
                self.key_id, self.consumer, self.action, self.actor
            )
        };
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

/// Appends to the change log, in the transaction of the change itself.
fn log_change(
    tx: &mut Tx<'_>,
    actor: &str,
    action: &str,
    key_id: &str,
    consumer: &str,
    detail: &str,
) -> Result<(), KeyError> {
    tx.execute(
        "INSERT INTO key_changes (at, actor, action, key_id, consumer, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[
            Val::Int(Some(now_ms() as i64)),
            Val::Text(actor),
            Val::Text(action),
            Val::Text(key_id),
            Val::Text(consumer),
            Val::Text(detail),
        ],
    )
    .map(|_| ())
}

fn insert(tx: &mut Tx<'_>, r: &KeyRecord) -> Result<(), KeyError> {
    tx.execute(
        "INSERT INTO api_keys (key_id, consumer, hash, scopes, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[
            Val::Text(&r.key_id),
            Val::Text(&r.consumer),
            Val::Bytes(&r.hash),
            Val::Text(&r.scopes.join(" ")),
            Val::Int(Some(r.created_at as i64)),
            Val::Int(r.expires_at.map(|t| t as i64)),
        ],
    )
    .map(|_| ())
}

/// Where the keys live.
enum Backend {
    /// `<data_dir>/apiwarden.db`.
    Sqlite {
        conn: rusqlite::Connection,
        path: PathBuf,
    },
    /// `storage.database` (fleet mode). A synchronous client: it runs a small runtime of its
    /// own and must never be used on a tokio runtime's thread.
    Postgres {
        client: postgres::Client,
        url_redacted: String,
        /// Reads the change mark (prepared once: it is polled every 250 ms).
        read_mark: postgres::Statement,
    },
}

impl Backend {
    /// Connects and creates the tables when they are missing.
    fn open(config: &Config) -> Result<Backend, KeyError> {
        let Some(url) = &config.storage.database else {
            let path = crate::blocklist::database_path(&config.storage.data_dir);
            let _ = std::fs::create_dir_all(&config.storage.data_dir);
            let conn = rusqlite::Connection::open(&path).map_err(sq(&path))?;
            conn.busy_timeout(Duration::from_secs(5))
                .map_err(sq(&path))?;
            conn.execute_batch(SCHEMA).map_err(sq(&path))?;
            return Ok(Backend::Sqlite { conn, path });
        };
        // Only the URL form: `redact_url` cannot hide a password in `key=value` settings.
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(KeyError::NotAPostgresUrl);
        }
        let url_redacted = shown_url(url);
        let err = pg(&url_redacted);
        let mut pc: postgres::Config = url.parse().map_err(&err)?;
        if pc.get_connect_timeout().is_none() {
            pc.connect_timeout(Duration::from_secs(5));
        }
        // A database gone silent (no reset) fails the next poll within 10 s instead of
        // hanging the key thread: it then reconnects and says so in the log.
        if pc.get_tcp_user_timeout().is_none() {
            pc.tcp_user_timeout(Duration::from_secs(10));
        }
        if pc.get_application_name().is_none() {
            pc.application_name("apiwarden");
        }
        let mut client = pc.connect(postgres::NoTls).map_err(&err)?;
        client.batch_execute(PG_SCHEMA).map_err(&err)?;
        let read_mark = client
            .prepare("SELECT value FROM key_meta WHERE name = 'change'")
            .map_err(&err)?;
        drop(err);
        Ok(Backend::Postgres {
            client,
            url_redacted,
            read_mark,
        })
    }

    /// Where the keys are, for messages (never with a password).
    fn location(&self) -> String {
        match self {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres { url_redacted, .. } => url_redacted.clone(),
        }
    }

    /// Runs `f` in one transaction and commits if it succeeds (a failure rolls back). A
    /// transaction that `changes` keys tells the other gateways so.
    fn transaction<T>(
        &mut self,
        write: bool,
        changes: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut tx = match self {
            Backend::Sqlite { conn, path } => {
                let path: &Path = path;
                let behavior = if write {
                    rusqlite::TransactionBehavior::Immediate
                } else {
                    rusqlite::TransactionBehavior::Deferred
                };
                Tx::Sqlite(
                    conn.transaction_with_behavior(behavior).map_err(sq(path))?,
                    path,
                )
            }
            Backend::Postgres {
                client,
                url_redacted,
                ..
            } => {
                let url: &str = url_redacted;
                Tx::Postgres(client.transaction().map_err(pg(url))?, url)
            }
        };
        if changes {
            // PostgreSQL: changing transactions take the change mark's row lock first, so they
            // run one at a time and the change log's sequence numbers are given out in commit
            // order (a node following the log never skips an entry that commits late).
            // SQLite's IMMEDIATE transactions are serial already.
            if let Tx::Postgres(..) = tx {
                tx.execute(
                    "SELECT 1 FROM key_meta WHERE name = 'change' FOR UPDATE",
                    &[],
                )?;
            }
        }
        let out = f(&mut tx)?;
        if changes {
            tx.mark_changed()?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Changes when another connection has committed a change of the keys.
    fn change_version(&mut self) -> Result<u64, KeyError> {
        match self {
            Backend::Sqlite { conn, path } => conn
                .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
                .map_err(sq(path)),
            Backend::Postgres {
                client,
                url_redacted,
                read_mark,
            } => {
                let err = pg(url_redacted);
                let mark: Vec<u8> = client
                    .query_one(&*read_mark, &[])
                    .and_then(|r| r.try_get(0))
                    .map_err(err)?;
                Ok(mark.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)))
            }
        }
    }
}

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
/// Creates a file readable by its owner only with `bytes`, unless another process created it
/// first (then theirs is kept: callers read the file back). Used for secrets made on first use.
pub(crate) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// The key table: in the data directory's database, or in PostgreSQL when `storage.database`
/// is set.
pub struct KeyStore {
    db: Backend,
    pepper: hmac::Key,
    /// Who the changes made through this handle are recorded as (`set_actor`).
    actor: String,
}

/// A Unix time in ms as RFC 3339, to the second.
pub fn rfc3339(ms: u64) -> String {
    // humantime formats years up to 9999 only.
    const LAST: u64 = 253_402_300_799_000;
    if ms > LAST {
        return "9999-12-31T23:59:59Z".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn random_hex(n_bytes: usize) -> Result<String, KeyError> {
    let mut raw = vec![0u8; n_bytes];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| KeyError::Random)?;
    Ok(apikey::hex(&raw))
}

/// A new key record and its text, not yet stored.
fn new_key(
    pepper: &hmac::Key,
    granted: &[String],
    consumer: &str,
    scopes: Option<Vec<String>>,
    expires_at: Option<u64>,
) -> Result<(KeyRecord, String), KeyError> {
    let scopes = scopes.unwrap_or_else(|| granted.to_vec());
    if let Some(s) = scopes.iter().find(|s| !granted.contains(s)) {
        return Err(KeyError::ScopeNotGranted {
            consumer: consumer.to_string(),
            scope: s.clone(),
        });
    }
    let key_id = random_hex(apikey::KEY_ID_LEN / 2)?;
    let secret = random_hex(apikey::SECRET_LEN / 2)?;
    let hash = hmac::sign(pepper, secret.as_bytes()).as_ref().to_vec();
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

impl KeyStore {
    /// Opens the store of `config` (PostgreSQL when `storage.database` is set). Never call it
    /// on a tokio runtime's thread: the PostgreSQL client blocks on a runtime of its own.
    pub fn open(config: &Config) -> Result<KeyStore, KeyError> {
        let pepper = load_pepper(&config.storage.pepper, &config.storage.data_dir)?;
        let mut db = Backend::open(config)?;
        // A fingerprint of the pepper (an HMAC of a fixed text, which reveals nothing of it):
        // recorded by the first user of the database, checked by every later one, so a changed
        // or mismatched pepper (another gateway of the fleet with another one) is an error at
        // once rather than every key failing.
        let print = hmac::sign(&pepper, b"apiwarden pepper fingerprint v1");
        let stored = db.transaction(true, false, |tx| {
            tx.execute(
                "INSERT INTO key_meta (name, value) VALUES ('pepper_fingerprint', ?1) ON CONFLICT (name) DO NOTHING",
                &[Val::Bytes(print.as_ref())],
            )?;
            tx.meta("pepper_fingerprint")
        })?;
        if stored.as_deref() != Some(print.as_ref()) {
            let source = match &config.storage.pepper {
                SecretSource::Env(n) => format!("env:{n}"),
                SecretSource::File(p) => format!("file:{}", p.display()),
                SecretSource::Generated(_) => {
                    format!("file:{}", config.storage.data_dir.join("pepper").display())
                }
            };
            return Err(KeyError::PepperMismatch(source, db.location()));
        }
        Ok(KeyStore {
            db,
            pepper,
            actor: "unknown".into(),
        })
    }

    /// Who the changes made through this handle are recorded as in the change log (and so in
    /// every gateway's audit trail): `cli:USER@HOST`, `admin-token:NAME`.
    pub fn set_actor(&mut self, actor: impl Into<String>) {
        self.actor = actor.into();
    }

    /// The consumers kept in the store, by name.
    pub fn consumers(&mut self) -> Result<Vec<StoredConsumer>, KeyError> {
        self.db
            .transaction(false, false, |tx| tx.consumers("", &[]))
    }

    /// Adds a consumer to the store, or replaces the settings of one there; `true` when it is
    /// new. A consumer of the config file cannot be shadowed. Keys keep working; scopes taken
    /// away no longer count for them (a key only narrows its consumer).
    pub fn put_consumer(
        &mut self,
        config: &Config,
        consumer: StoredConsumer,
    ) -> Result<bool, KeyError> {
        let mut c = consumer.validated()?;
        if config.consumers.iter().any(|k| k.name == c.name) {
            return Err(KeyError::ConsumerInConfig(c.name));
        }
        // An issuer named here lets its clients take the consumer's roles: only issuers of
        // the config in force.
        if let Some(unknown) = c.token_issuers.iter().find(|i| {
            !config.jwt.contains_key(i.as_str()) && !config.introspection.contains_key(i.as_str())
        }) {
            return Err(KeyError::BadConsumer(format!(
                "{}: token issuer {unknown:?} is not a [jwt.NAME] or [introspection.NAME] table of the config",
                c.name
            )));
        }
        let now = now_ms();
        let actor = &self.actor;
        self.db.transaction(true, true, |tx| {
            let old = tx
                .consumers("WHERE name = ?1", &[Val::Text(&c.name)])?
                .pop();
            if old.is_none() {
                // Keys are tied to a consumer by name: live keys left from an earlier consumer
                // of this name (one removed from the config) would work again for the new one.
                let live = tx.keys(
                    "WHERE consumer = ?1 AND revoked_at IS NULL",
                    &[Val::Text(&c.name)],
                )?;
                let live: Vec<&KeyRecord> = live
                    .iter()
                    .filter(|k| matches!(k.status(now), KeyStatus::Active | KeyStatus::Rotating))
                    .collect();
                if !live.is_empty() {
                    return Err(KeyError::BadConsumer(format!(
                        "{}: {} live keys still carry this name from an earlier consumer ({}); revoke them first with `apiwarden keys revoke`",
                        c.name,
                        live.len(),
                        live.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            c.created_at = old.as_ref().map_or(now, |o| o.created_at);
            c.updated_at = now;
            let body = serde_json::json!({
                "scopes": c.scopes, "roles": c.roles, "allow_ips": c.allow_ips, "metadata": c.metadata,
                "token_issuers": c.token_issuers,
            })
            .to_string();
            // Everything that decides what the consumer may do, and the metadata's names.
            let detail = format!(
                "scopes {}; roles {}; allow_ips {}; token_issuers {}; metadata {}",
                c.scopes.join(","),
                c.roles.join(","),
                c.allow_ips.as_ref().map_or("any".into(), |n| n.join(",")),
                if c.token_issuers.is_empty() {
                    "none".into()
                } else {
                    c.token_issuers.join(",")
                },
                if c.metadata.is_empty() {
                    "none".into()
                } else {
                    c.metadata.keys().cloned().collect::<Vec<_>>().join(",")
                }
            );
            if old.is_some() {
                tx.execute(
                    "UPDATE consumers SET body = ?2, updated_at = ?3 WHERE name = ?1",
                    &[Val::Text(&c.name), Val::Text(&body), Val::Int(Some(now as i64))],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO consumers (name, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                    &[Val::Text(&c.name), Val::Text(&body), Val::Int(Some(now as i64))],
                )?;
            }
            let action = if old.is_some() { "consumer updated" } else { "consumer added" };
            log_change(tx, actor, action, "", &c.name, &detail)?;
            Ok(old.is_none())
        })
    }

    /// Removes a consumer from the store and revokes its keys, in one transaction; the number
    /// of keys revoked.
    pub fn remove_consumer(&mut self, config: &Config, name: &str) -> Result<usize, KeyError> {
        if config.consumers.iter().any(|k| k.name == name) {
            return Err(KeyError::ConsumerInConfig(name.to_string()));
        }
        let now = now_ms() as i64;
        let actor = &self.actor;
        self.db.transaction(true, true, |tx| {
            if tx.execute("DELETE FROM consumers WHERE name = ?1", &[Val::Text(name)])? == 0 {
                return Err(KeyError::NoSuchConsumer(name.to_string()));
            }
            let live = tx.keys(
                "WHERE consumer = ?1 AND revoked_at IS NULL",
                &[Val::Text(name)],
            )?;
            for k in &live {
                tx.execute(
                    "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1",
                    &[Val::Text(&k.key_id), Val::Int(Some(now))],
                )?;
                log_change(
                    tx,
                    actor,
                    "revoked",
                    &k.key_id,
                    name,
                    "its consumer was removed",
                )?;
            }
            log_change(
                tx,
                actor,
                "consumer removed",
                "",
                name,
                &format!("{} keys revoked", live.len()),
            )?;
            Ok(live.len())
        })
    }

    /// Change log entries after `seq` (0: from the start), oldest first, at most 1 000.
    pub fn changes_after(&mut self, seq: i64) -> Result<Vec<KeyChange>, KeyError> {
        self.db.transaction(false, false, |tx| tx.changes(seq))
    }

    /// Issues a key: returns its record and the key text (shown once, never stored).
    pub fn create(
        &mut self,
        config: &Config,
        consumer: &str,
        scopes: Option<Vec<String>>,
        expires_at: Option<u64>,
    ) -> Result<(KeyRecord, String), KeyError> {
        let actor = &self.actor;
        let pepper = &self.pepper;
        // One write transaction: the consumer cannot be removed between reading its scopes
        // and inserting the key.
        self.db.transaction(true, true, |tx| {
            let granted = tx.granted(config, consumer)?;
            let (record, text) = new_key(pepper, &granted, consumer, scopes, expires_at)?;
            let detail = format!(
                "scopes {}{}",
                if record.scopes.is_empty() {
                    "(none)".to_string()
                } else {
                    record.scopes.join(",")
                },
                match record.expires_at {
                    Some(t) => format!(", expires at {}", rfc3339(t)),
                    None => String::new(),
                }
            );
            insert(tx, &record)?;
            log_change(
                tx,
                actor,
                "created",
                &record.key_id,
                &record.consumer,
                &detail,
            )?;
            Ok((record, text))
        })
    }

    /// Every key, oldest first.
    pub fn list(&mut self) -> Result<Vec<KeyRecord>, KeyError> {
        self.db.transaction(false, false, |tx| tx.keys("", &[]))
    }

    /// Revokes a key at once; false when it was already revoked.
    pub fn revoke(&mut self, key_id: &str) -> Result<bool, KeyError> {
        let now = now_ms() as i64;
        let actor = &self.actor;
        self.db.transaction(true, true, |tx| {
            let Some(key) = tx.keys("WHERE key_id = ?1", &[Val::Text(key_id)])?.pop() else {
                return Err(KeyError::NoSuchKey(key_id.to_string()));
            };
            let n = tx.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL",
                &[Val::Text(key_id), Val::Int(Some(now))],
            )?;
            if n == 1 {
                log_change(tx, actor, "revoked", key_id, &key.consumer, "")?;
            }
            Ok(n == 1)
        })
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
        let pepper = &self.pepper;
        let actor = &self.actor;
        self.db.transaction(true, true, |tx| {
            let old = tx
                .keys("WHERE key_id = ?1", &[Val::Text(key_id)])?
                .pop()
                .ok_or_else(|| KeyError::NoSuchKey(key_id.to_string()))?;
            let now = now_ms();
            let status = old.status(now);
            if status != KeyStatus::Active {
                return Err(KeyError::NotActive(key_id.to_string(), status.as_str()));
            }
            // Scopes the consumer lost since are not carried over.
            let held = tx.granted(config, &old.consumer)?;
            let scopes = old
                .scopes
                .iter()
                .filter(|s| held.contains(s))
                .cloned()
                .collect();
            let grace_until = now
                .checked_add(grace.as_millis().try_into().unwrap_or(u64::MAX))
                .and_then(|t| i64::try_from(t).ok())
                .ok_or(KeyError::NotActive(key_id.to_string(), "beyond any grace"))?;
            let (new, text) = new_key(pepper, &held, &old.consumer, Some(scopes), old.expires_at)?;
            // Only if no other writer revoked or rotated it since it was read (PostgreSQL
            // evaluates this again on the row as a concurrent writer left it).
            let n = tx.execute(
                "UPDATE api_keys SET grace_until = ?2, replaced_by = ?3 WHERE key_id = ?1 AND revoked_at IS NULL AND grace_until IS NULL",
                &[Val::Text(key_id), Val::Int(Some(grace_until)), Val::Text(&new.key_id)],
            )?;
            if n != 1 {
                return Err(KeyError::NotActive(key_id.to_string(), "changed meanwhile"));
            }
            insert(tx, &new)?;
            log_change(
                tx,
                actor,
                "rotated",
                key_id,
                &old.consumer,
                &format!(
                    "new key {}; the old one works until {}",
                    new.key_id,
                    rfc3339(grace_until as u64)
                ),
            )?;
            Ok((new, text))
        })
    }

    /// Changes when another process committed a change of the keys: the gateway's cue to read
    /// them again.
    pub fn change_version(&mut self) -> Result<u64, KeyError> {
        self.db.change_version()
    }

    /// Writes back `last_used` times (never moving one backwards). In key id order, so that
    /// gateways writing the same keys at once cannot deadlock.
    pub fn touch(&mut self, used: &[(String, u64)]) -> Result<(), KeyError> {
        let mut used: Vec<&(String, u64)> = used.iter().collect();
        used.sort();
        self.db.transaction(true, false, |tx| {
            for (key_id, at) in used {
                tx.execute(
                    "UPDATE api_keys SET last_used = ?2 WHERE key_id = ?1 AND (last_used IS NULL OR last_used < ?2)",
                    &[Val::Text(key_id), Val::Int(Some(*at as i64))],
                )?;
            }
            Ok(())
        })
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
        let consumers = self
            .consumers()?
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(c.to_config())))
            .collect();
        Ok(KeyRing {
            keys,
            consumers,
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

/// The keys in force, immutable; swapped whole when the store changes.
#[derive(Default)]
pub struct KeyRing {
    keys: HashMap<String, Arc<LiveKey>>,
    /// The consumers kept in the store, as the request path uses them.
    pub consumers: HashMap<String, Arc<apiwarden_core::config::ConsumerConfig>>,
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
        let t = crate::tag::tag(parsed.secret);
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
/// changed the database, writes `last_used` back every 10 s. Runs until `stop` is set; `ready`
/// hears when the first attempt to read the keys is over (read or not). It runs on a plain
/// thread of its own, where the PostgreSQL client may block.
pub fn follow(
    shared: Arc<crate::pipeline::Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut store: Option<(KeyStore, u64)> = None;
    // What the store was opened from; a reload that changes it opens the store again.
    let mut origin: Option<(PathBuf, Option<String>, SecretSource)> = None;
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
    // The last change log entry audited by this node (`<data_dir>/keys.cursor`).
    let mut cursor: Option<i64> = None;
    let audit_changes = |s: &mut KeyStore, cursor: &mut Option<i64>, data_dir: &Path| {
        let file = data_dir.join("keys.cursor");
        let at = cursor.get_or_insert_with(|| {
            std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0)
        });
        let start = *at;
        loop {
            let changes = s.changes_after(*at)?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            for c in &changes {
                let mut e =
                    AuditEvent::new(EventKind::Admin, crate::ids::new_id(), shared.node.clone());
                e.decision.outcome = Outcome::Allow;
                e.decision.reason = Reason::AdminAction;
                e.decision.policy = Some("keys".into());
                e.actor = Some(c.actor.clone());
                e.identity.key_id = Some(c.key_id.clone());
                e.identity.consumer = Some(c.consumer.clone());
                e.message = Some(c.describe());
                shared.record(Box::new(e));
            }
            // In memory first: what was audited is never audited again by this process.
            *at = last;
        }
        if *at != start {
            let tmp = file.with_extension("tmp");
            if std::fs::write(&tmp, at.to_string())
                .and_then(|_| std::fs::rename(&tmp, &file))
                .is_err()
            {
                tracing::warn!(file = %file.display(), "cannot save the key change cursor; changes may be audited again after a restart");
            }
        }
        Ok::<(), KeyError>(())
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
            config.storage.database.clone(),
            config.storage.pepper.clone(),
        );
        if origin.as_ref() != Some(&now_from) {
            store = None;
            cursor = None;
            origin = Some(now_from);
        }
        let result = (|| -> Result<(), KeyError> {
            if store.is_none() {
                let mut s = KeyStore::open(config)?;
                let v = s.change_version()?;
                install(s.ring()?, &mut written);
                audit_changes(&mut s, &mut cursor, &config.storage.data_dir)?;
                store = Some((s, v));
            }
            let (s, version) = store.as_mut().expect("opened above");
            // Changes first (a revocation must not wait behind our own writes), then usage.
            let v = s.change_version()?;
            if v != *version {
                *version = v;
                install(s.ring()?, &mut written);
                audit_changes(s, &mut cursor, &config.storage.data_dir)?;
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
            if ready.is_some() {
                tracing::warn!(error = %e, "cannot read the API keys at start; routes with api_key refuse every request until they can be read (trying again every 250 ms)");
                last_error = Some(std::time::Instant::now());
            } else if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(error = %e, "cannot read the API keys; the keys in force stay as they are");
                last_error = Some(std::time::Instant::now());
            }
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
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

    /// A fresh schema of its own in the PostgreSQL at 127.0.0.1:5432 (trust auth, user
    /// `postgres`, database `test`), dropped at the end. `None`, said loudly, when that server
    /// is not there; under CI (env `CI` set) that fails the test instead.
    struct PgSchema {
        name: String,
        url: String,
    }

    const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn pg_admin() -> Result<postgres::Client, postgres::Error> {
        let mut c: postgres::Config = PG_BASE.parse()?;
        c.connect_timeout(Duration::from_secs(3));
        c.connect(postgres::NoTls)
    }

    impl PgSchema {
        fn new() -> Option<PgSchema> {
            let mut admin = match pg_admin() {
                Ok(c) => c,
                Err(e) if std::env::var_os("CI").is_some() => {
                    panic!("PostgreSQL at 127.0.0.1:5432 is required under CI: {e}")
                }
                Err(e) => {
                    eprintln!("\n*** SKIPPED: PostgreSQL not reachable at 127.0.0.1:5432 ({e}); the PostgreSQL key store test did not run ***\n");
                    return None;
                }
            };
            let name = format!("aw_test_{}", uuid::Uuid::new_v4().simple());
            admin
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .unwrap();
            // The postgres crate passes `options` on to the server: the schema is the only one
            // on the search path, so the store's tables land in it.
            let url = format!("{PG_BASE}?options=-csearch_path%3D{name}");
            Some(PgSchema { name, url })
        }

        /// A config of a gateway using this schema, with a pepper file of `pepper`.
        fn config(&self, dir: &Path, pepper: &str) -> Config {
            std::fs::create_dir_all(dir).unwrap();
            let file = dir.join(format!("pepper-{}", crate::ids::new_id()));
            std::fs::write(&file, pepper).unwrap();
            let text = format!(
                "[storage]\ndata_dir = \"{}\"\ndatabase = \"{}\"\npepper = \"file:{}\"\n\n\
                 [[consumers]]\nname = \"billing\"\nscopes = [\"orders:read\", \"orders:write\"]\n",
                dir.display(),
                self.url,
                file.display()
            );
            apiwarden_core::config::parse(&text, "t.toml").unwrap()
        }
    }

    impl Drop for PgSchema {
        fn drop(&mut self) {
            if let Ok(mut admin) = pg_admin() {
                let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
            }
        }
    }

    const PEPPER: &str = "a fleet pepper, the same on every node";

    #[test]
    fn postgres_keys_live_in_their_schema_and_other_gateways_see_changes() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", crate::ids::new_id()));
        let cfg = schema.config(&dir, PEPPER);
        let mut a = KeyStore::open(&cfg).unwrap();
        let mut b = KeyStore::open(&cfg).expect("a second gateway with the same pepper");

        // The same tables, in the schema the URL's search_path names, with PostgreSQL types.
        let mut admin = pg_admin().unwrap();
        let types: HashMap<String, String> = admin
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'api_keys'",
                &[&schema.name],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(types.len(), 10, "{types:?}");
        assert_eq!(types["hash"], "bytea");
        assert_eq!(types["created_at"], "bigint");
        assert_eq!(types["last_used"], "bigint");

        let v0 = b.change_version().unwrap();
        assert_eq!(b.change_version().unwrap(), v0, "no change, no new version");
        let (old, old_text) = a.create(&cfg, "billing", None, None).unwrap();
        let v1 = b.change_version().unwrap();
        assert_ne!(v1, v0, "a created key is a change");
        let now = now_ms();
        assert!(b.ring().unwrap().check(&old_text, now).is_ok());

        // Last use is not a change: gateways do not read every key again for it.
        a.touch(&[(old.key_id.clone(), now)]).unwrap();
        a.touch(&[(old.key_id.clone(), now - 5_000)]).unwrap();
        assert_eq!(b.change_version().unwrap(), v1);
        assert_eq!(b.list().unwrap()[0].last_used, Some(now), "never backwards");

        let (new, new_text) = a
            .rotate(&cfg, &old.key_id, Duration::from_secs(3600))
            .unwrap();
        let v2 = b.change_version().unwrap();
        assert_ne!(v2, v1);
        let ring = b.ring().unwrap();
        assert!(
            ring.check(&old_text, now).is_ok(),
            "the old key works in its grace"
        );
        assert!(ring.check(&new_text, now).is_ok());
        let listed = b.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].status(now_ms()), KeyStatus::Rotating);
        assert_eq!(listed[0].replaced_by.as_deref(), Some(new.key_id.as_str()));
        assert_eq!(listed[1].hash.len(), 32);
        assert!(matches!(
            a.rotate(&cfg, &old.key_id, Duration::ZERO),
            Err(KeyError::NotActive(..))
        ));

        assert!(a.revoke(&old.key_id).unwrap());
        assert!(!a.revoke(&old.key_id).unwrap(), "already revoked");
        assert!(matches!(a.revoke("nope"), Err(KeyError::NoSuchKey(_))));
        assert_ne!(b.change_version().unwrap(), v2);
        let ring = b.ring().unwrap();
        assert_eq!(
            ring.check(&old_text, now_ms()).err(),
            Some(Reason::AuthnRevokedKey)
        );
        assert!(ring.check(&new_text, now_ms()).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn postgres_a_fleet_with_different_peppers_fails_at_open() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", crate::ids::new_id()));
        KeyStore::open(&schema.config(&dir, PEPPER)).unwrap();
        let other = "another pepper, long enough to count";
        let err = KeyStore::open(&schema.config(&dir, other)).err().unwrap();
        assert!(matches!(err, KeyError::PepperMismatch(..)), "{err}");
        let text = err.to_string();
        assert!(text.contains("not the one the keys"), "{text}");
        assert!(text.contains("127.0.0.1:5432/test"), "{text}");
        assert!(!text.contains(other) && !text.contains(PEPPER), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn postgres_concurrent_rotations_of_one_key_let_exactly_one_win() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", crate::ids::new_id()));
        let cfg = schema.config(&dir, PEPPER);
        let (key, _) = KeyStore::open(&cfg)
            .unwrap()
            .create(&cfg, "billing", None, None)
            .unwrap();
        let barrier = std::sync::Barrier::new(4);
        let results: Vec<Result<(KeyRecord, String), KeyError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut store = KeyStore::open(&cfg).unwrap();
                        barrier.wait();
                        store.rotate(&cfg, &key.key_id, Duration::from_secs(60))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        assert!(results
            .iter()
            .all(|r| r.is_ok() || matches!(r, Err(KeyError::NotActive(..)))));
        assert_eq!(KeyStore::open(&cfg).unwrap().list().unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn postgres_gateways_starting_together_on_a_new_schema_all_open_it() {
        let Some(schema) = PgSchema::new() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", crate::ids::new_id()));
        let cfg = schema.config(&dir, PEPPER);
        let barrier = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    barrier.wait();
                    KeyStore::open(&cfg).unwrap();
                });
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn postgres_errors_name_the_database_but_never_its_password() {
        let dir = std::env::temp_dir().join(format!("aw-pg-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pepper"), PEPPER).unwrap();
        let config = |url: &str| {
            let text = format!(
                "[storage]\ndata_dir = \"{}\"\ndatabase = \"{url}\"\npepper = \"file:{}\"\n",
                dir.display(),
                dir.join("pepper").display()
            );
            apiwarden_core::config::parse(&text, "t.toml").unwrap()
        };
        // Nothing listens on port 1.
        let err = KeyStore::open(&config(
            "postgres://apiwarden:s3cret-pw@127.0.0.1:1/keys?password=other-pw&connect_timeout=2",
        ))
        .err()
        .unwrap();
        assert!(matches!(err, KeyError::Postgres { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1/keys"), "{text}");
        assert!(text.contains("is PostgreSQL running"), "{text}");
        assert!(text.contains("storage.database"), "{text}");
        assert!(
            !text.contains("s3cret-pw") && !text.contains("other-pw"),
            "{text}"
        );
        assert!(
            !format!("{err:?}").contains("s3cret-pw"),
            "not even in Debug"
        );
        let err = KeyStore::open(&config("host=127.0.0.1 password=s3cret-pw"))
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::NotAPostgresUrl), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
