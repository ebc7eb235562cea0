//! The block list: client IPs (or networks), API keys and consumers refused with `403 blocked`.
//!
//! Entries live in a store every process can reach: SQLite in the data directory
//! (`<data_dir>/apiwarden.db`) on a single node, Redis when `storage.redis` is set, so that a
//! whole fleet shares one list. Every change (add, remove, expiry) is also appended to a change
//! log in the same store. Each gateway follows that log from a cursor kept in its data
//! directory: it records every change as an `admin` audit event with its actor, and then
//! swaps in the new list. The command line (`apiwarden block ...`) and, later, the detection
//! engine change the list through [`BlockStore`]; nothing else does.
//!
//! On the request path the list is an immutable [`BlockSet`] behind an `ArcSwap`: an empty
//! list costs one pointer load.

use crate::now_ms;
use apiwarden_core::block::{BlockAction, BlockChange, BlockEntry, BlockKind};
use apiwarden_core::config::Config;
use apiwarden_core::net::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The block list as the request path reads it.
#[derive(Default)]
pub struct BlockSet {
    ips: HashMap<IpAddr, Option<u64>>,
    nets: Vec<(IpNet, Option<u64>)>,
    keys: HashMap<String, Option<u64>>,
    consumers: HashMap<String, Option<u64>>,
}

impl BlockSet {
    pub fn new(entries: &[BlockEntry]) -> BlockSet {
        let mut set = BlockSet::default();
        for e in entries {
            match e.kind {
                BlockKind::Ip => match IpNet::parse(&e.value) {
                    Ok(n) => match n.single() {
                        Some(ip) => {
                            set.ips.insert(ip, e.expires_at);
                        }
                        None => set.nets.push((n, e.expires_at)),
                    },
                    Err(_) => {
                        tracing::warn!(value = %e.value, "a block list entry is not an IP address; ignored")
                    }
                },
                BlockKind::Key => {
                    set.keys.insert(e.value.clone(), e.expires_at);
                }
                BlockKind::Consumer => {
                    set.consumers.insert(e.value.clone(), e.expires_at);
                }
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
            && self.nets.is_empty()
            && self.keys.is_empty()
            && self.consumers.is_empty()
    }

    /// Whether the client IP (or a network holding it) is blocked. Entries past their expiry no
    /// longer count, even before the store has removed them.
    pub fn blocks_ip(&self, ip: IpAddr) -> bool {
        if self.ips.is_empty() && self.nets.is_empty() {
            return false;
        }
        let now = now_ms();
        let live = |exp: &Option<u64>| exp.is_none_or(|t| t > now);
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.ips.get(&ip).is_some_and(live)
            || self.nets.iter().any(|(n, e)| live(e) && n.contains(ip))
    }

    /// What blocks this identity, if anything.
    pub fn blocks_identity(
        &self,
        key_id: Option<&str>,
        consumer: Option<&str>,
    ) -> Option<BlockKind> {
        if self.keys.is_empty() && self.consumers.is_empty() {
            return None;
        }
        let now = now_ms();
        let live = |exp: &Option<u64>| exp.is_none_or(|t| t > now);
        if key_id.and_then(|k| self.keys.get(k)).is_some_and(live) {
            return Some(BlockKind::Key);
        }
        if consumer
            .and_then(|c| self.consumers.get(c))
            .is_some_and(live)
        {
            return Some(BlockKind::Consumer);
        }
        None
    }
}

/// Where the block list lives.
pub enum BlockStore {
    Sqlite(rusqlite::Connection),
    Redis {
        conn: redis::Connection,
        prefix: String,
    },
}

/// Why the block store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the block list database {path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("Redis ({url}): {error}")]
    Redis {
        url: String,
        error: redis::RedisError,
    },
    #[error("a block list record in the store is damaged: {0}")]
    Damaged(String),
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS blocks (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS block_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    entry TEXT NOT NULL,
    by TEXT NOT NULL
);
";

/// The SQLite database of a data directory.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("apiwarden.db")
}

impl BlockStore {
    /// Opens the store `config` names: Redis when `storage.redis` is set, else SQLite in the
    /// data directory.
    pub fn open(config: &Config) -> Result<BlockStore, StoreError> {
        match &config.storage.redis {
            Some(url) => {
                let err = |error| StoreError::Redis {
                    url: apiwarden_core::config::redact_url(url),
                    error,
                };
                let client = redis::Client::open(url.as_str()).map_err(err)?;
                let conn = client
                    .get_connection_with_timeout(Duration::from_secs(2))
                    .map_err(err)?;
                conn.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(err)?;
                conn.set_write_timeout(Some(Duration::from_secs(2)))
                    .map_err(err)?;
                Ok(BlockStore::Redis {
                    conn,
                    prefix: config.storage.redis_prefix.clone(),
                })
            }
            None => {
                let path = database_path(&config.storage.data_dir);
                let err = |error| StoreError::Sqlite {
                    path: path.clone(),
                    error,
                };
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let conn = rusqlite::Connection::open(&path).map_err(err)?;
                conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
                conn.execute_batch(SCHEMA).map_err(err)?;
                Ok(BlockStore::Sqlite(conn))
            }
        }
    }

    fn redis_err(error: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: "storage.redis".into(),
            error,
        }
    }

    /// Adds or replaces an entry, and logs the change.
    pub fn add(&mut self, entry: &BlockEntry) -> Result<(), StoreError> {
        let change = (BlockAction::Add, entry, entry.actor.as_str());
        match self {
            BlockStore::Sqlite(c) => {
                // IMMEDIATE: take the write lock first, so a concurrent writer makes this wait (busy
                // timeout) instead of failing when a read would have to become a write.
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(sq)?;
                tx.execute(
                    "INSERT OR REPLACE INTO blocks (kind, value, reason, actor, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![
                        entry.kind.as_str(),
                        entry.value,
                        entry.reason,
                        entry.actor,
                        entry.created_at as i64,
                        entry.expires_at.map(|t| t as i64)
                    ],
                )
                .and_then(|_| log_sqlite(&tx, change))
                .and_then(|_| tx.commit())
                .map_err(sq)
            }
            BlockStore::Redis { conn, prefix } => {
                let json = serde_json::to_string(entry).expect("an entry serialises");
                redis::pipe()
                    .atomic()
                    .hset(blocks_key(prefix), field(entry.kind, &entry.value), json)
                    .ignore()
                    .add_command(log_redis_cmd(prefix, change))
                    .ignore()
                    .exec(conn)
                    .map_err(Self::redis_err)
            }
        }
    }

    /// Removes an entry; false when there was none.
    pub fn remove(&mut self, kind: BlockKind, value: &str, by: &str) -> Result<bool, StoreError> {
        self.remove_as(kind, value, by, BlockAction::Remove, None)
    }

    /// Removes an entry and logs the change, in one transaction (SQLite) or one script
    /// (Redis). With `expired_by`, only if it is still expired at that time (an entry that was
    /// extended meanwhile stays).
    fn remove_as(
        &mut self,
        kind: BlockKind,
        value: &str,
        by: &str,
        action: BlockAction,
        expired_by: Option<u64>,
    ) -> Result<bool, StoreError> {
        match self {
            BlockStore::Sqlite(c) => {
                // IMMEDIATE: take the write lock first, so a concurrent writer makes this wait (busy
                // timeout) instead of failing when a read would have to become a write.
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(sq)?;
                let entry: Option<(String, String, String, i64, Option<i64>)> = {
                    let mut stmt = tx
                        .prepare_cached("SELECT reason, actor, kind, created_at, expires_at FROM blocks WHERE kind = ?1 AND value = ?2")
                        .map_err(sq)?;
                    let mut rows = stmt
                        .query(rusqlite::params![kind.as_str(), value])
                        .map_err(sq)?;
                    match rows.next().map_err(sq)? {
                        Some(r) => Some((
                            r.get(0).map_err(sq)?,
                            r.get(1).map_err(sq)?,
                            r.get(2).map_err(sq)?,
                            r.get(3).map_err(sq)?,
                            r.get(4).map_err(sq)?,
                        )),
                        None => None,
                    }
                };
                let Some((reason, actor, _, created_at, expires_at)) = entry else {
                    return Ok(false);
                };
                if let Some(now) = expired_by {
                    if expires_at.is_none_or(|t| t as u64 > now) {
                        return Ok(false);
                    }
                }
                tx.execute(
                    "DELETE FROM blocks WHERE kind = ?1 AND value = ?2",
                    rusqlite::params![kind.as_str(), value],
                )
                .map_err(sq)?;
                let entry = BlockEntry {
                    kind,
                    value: value.to_string(),
                    reason,
                    actor,
                    created_at: created_at as u64,
                    expires_at: expires_at.map(|t| t as u64),
                };
                log_sqlite(&tx, (action, &entry, by)).map_err(sq)?;
                tx.commit().map_err(sq)?;
                Ok(true)
            }
            BlockStore::Redis { conn, prefix } => {
                // Whoever deletes the field logs the change, in the same script, so that a
                // change is logged exactly once even when several nodes expire the same entry.
                let n: i64 = redis::Script::new(REMOVE_SCRIPT)
                    .key(blocks_key(prefix))
                    .key(changes_key(prefix))
                    .arg(field(kind, value))
                    .arg(expired_by.map_or(-1, |t| t as i64))
                    .arg(now_ms())
                    .arg(action_str(action))
                    .arg(by)
                    .invoke(conn)
                    .map_err(Self::redis_err)?;
                Ok(n == 1)
            }
        }
    }

    /// Every entry, expired ones included, sorted by kind and value.
    pub fn all(&mut self) -> Result<Vec<BlockEntry>, StoreError> {
        let mut out = match self {
            BlockStore::Sqlite(c) => {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT kind, value, reason, actor, created_at, expires_at FROM blocks",
                    )
                    .map_err(sq)?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            BlockEntry {
                                kind: BlockKind::Ip,
                                value: r.get(1)?,
                                reason: r.get(2)?,
                                actor: r.get(3)?,
                                created_at: r.get::<_, i64>(4)? as u64,
                                expires_at: r.get::<_, Option<i64>>(5)?.map(|t| t as u64),
                            },
                        ))
                    })
                    .map_err(sq)?;
                let mut out = Vec::new();
                for row in rows {
                    let (kind, mut e) = row.map_err(sq)?;
                    match BlockKind::parse(&kind) {
                        Ok(k) => {
                            e.kind = k;
                            out.push(e);
                        }
                        Err(why) => tracing::warn!(%why, "a damaged block list entry is ignored"),
                    }
                }
                out
            }
            BlockStore::Redis { conn, prefix } => {
                let map: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(blocks_key(prefix))
                    .query(conn)
                    .map_err(Self::redis_err)?;
                map.values()
                    .filter_map(|v| match serde_json::from_str(v) {
                        Ok(e) => Some(e),
                        Err(why) => {
                            tracing::warn!(%why, "a damaged block list entry is ignored");
                            None
                        }
                    })
                    .collect()
            }
        };
        out.sort_by(|a, b| (a.kind.as_str(), &a.value).cmp(&(b.kind.as_str(), &b.value)));
        Ok(out)
    }

    /// Removes entries past their expiry, logging each as `expire`. Returns how many.
    pub fn expire(&mut self, now: u64) -> Result<usize, StoreError> {
        let expired: Vec<BlockEntry> = self.all()?.into_iter().filter(|e| e.expired(now)).collect();
        let mut n = 0;
        for e in expired {
            if self.remove_as(e.kind, &e.value, "system", BlockAction::Expire, Some(now))? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Changes after `cursor` (`""`: from the start), oldest first, at most 1 000, and the
    /// position of the last one read (damaged ones are skipped with a warning, not stuck on).
    pub fn changes_after(
        &mut self,
        cursor: &str,
    ) -> Result<(Vec<BlockChange>, Option<String>), StoreError> {
        match self {
            BlockStore::Sqlite(c) => {
                let after: i64 = cursor.parse().unwrap_or(0);
                let mut stmt = c
                    .prepare_cached("SELECT id, at, action, entry, by FROM block_changes WHERE id > ?1 ORDER BY id LIMIT 1000")
                    .map_err(sq)?;
                let rows = stmt
                    .query_map([after], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    })
                    .map_err(sq)?;
                let mut out = Vec::new();
                let mut last = None;
                for row in rows {
                    let (id, at, action, entry, by) = row.map_err(sq)?;
                    last = Some(id.to_string());
                    keep(
                        &mut out,
                        change(id.to_string(), at as u64, &action, &entry, by),
                    );
                }
                Ok((out, last))
            }
            BlockStore::Redis { conn, prefix } => {
                let start = if cursor.is_empty() {
                    "-".to_string()
                } else {
                    format!("({cursor}")
                };
                let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(changes_key(prefix))
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(1000)
                    .query(conn)
                    .map_err(Self::redis_err)?;
                let mut out = Vec::new();
                let mut last = None;
                for id in reply.ids {
                    last = Some(id.id.clone());
                    let get = |k: &str| -> Result<String, StoreError> {
                        id.get::<String>(k).ok_or_else(|| {
                            StoreError::Damaged(format!("change {} has no {k}", id.id))
                        })
                    };
                    let parsed = (|| {
                        let at: u64 = get("at")?
                            .parse()
                            .map_err(|_| StoreError::Damaged("at".into()))?;
                        change(
                            id.id.clone(),
                            at,
                            &get("action")?,
                            &get("entry")?,
                            get("by")?,
                        )
                    })();
                    keep(&mut out, parsed);
                }
                Ok((out, last))
            }
        }
    }
}

fn keep(out: &mut Vec<BlockChange>, c: Result<BlockChange, StoreError>) {
    match c {
        Ok(c) => out.push(c),
        Err(e) => tracing::warn!(error = %e, "a damaged block list change is skipped"),
    }
}

/// Removes a block list field and logs the change atomically. KEYS: the hash, the stream.
/// ARGV: field, expired-by time (-1: remove whatever is there), now, action, by. Logs the
/// entry as it was stored.
const REMOVE_SCRIPT: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local by = tonumber(ARGV[2])
if by >= 0 then
  local e = cjson.decode(v)
  if type(e.expires_at) ~= 'number' or e.expires_at > by then return 0 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'at', ARGV[3], 'action', ARGV[4], 'entry', v, 'by', ARGV[5])
return 1
"#;

fn sq(error: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: PathBuf::from("apiwarden.db"),
        error,
    }
}

fn change(
    id: String,
    at: u64,
    action: &str,
    entry: &str,
    by: String,
) -> Result<BlockChange, StoreError> {
    let action = match action {
        "add" => BlockAction::Add,
        "remove" => BlockAction::Remove,
        "expire" => BlockAction::Expire,
        other => return Err(StoreError::Damaged(format!("unknown action {other:?}"))),
    };
    Ok(BlockChange {
        id,
        action,
        at,
        entry: serde_json::from_str(entry).map_err(|e| StoreError::Damaged(e.to_string()))?,
        by,
    })
}

fn action_str(a: BlockAction) -> &'static str {
    match a {
        BlockAction::Add => "add",
        BlockAction::Remove => "remove",
        BlockAction::Expire => "expire",
    }
}

fn log_sqlite(
    tx: &rusqlite::Transaction<'_>,
    (action, entry, by): (BlockAction, &BlockEntry, &str),
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO block_changes (at, action, entry, by) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![
            now_ms() as i64,
            action_str(action),
            serde_json::to_string(entry).expect("an entry serialises"),
            by
        ],
    )
    .map(|_| ())
}

fn log_redis_cmd(
    prefix: &str,
    (action, entry, by): (BlockAction, &BlockEntry, &str),
) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(changes_key(prefix))
        .arg("MAXLEN")
        .arg("~")
        .arg(100_000)
        .arg("*")
        .arg("at")
        .arg(now_ms())
        .arg("action")
        .arg(action_str(action))
        .arg("entry")
        .arg(serde_json::to_string(entry).expect("an entry serialises"))
        .arg("by")
        .arg(by);
    cmd
}

fn blocks_key(prefix: &str) -> String {
    format!("{prefix}:blocks")
}

fn changes_key(prefix: &str) -> String {
    format!("{prefix}:blocks:changes")
}

fn field(kind: BlockKind, value: &str) -> String {
    format!("{}:{value}", kind.as_str())
}

/// Where a node keeps its position in the change log.
pub fn cursor_path(data_dir: &Path) -> PathBuf {
    data_dir.join("blocklist.cursor")
}

/// Follows the store's change log for a running gateway: records each change as an `admin`
/// audit event, then swaps in the new list. Runs on a thread of its own until `stop` is set;
/// the store is opened again after an error, and the list in use stays as it was meanwhile.
pub fn follow(
    shared: std::sync::Arc<crate::pipeline::Shared>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut follower: Follower,
) {
    use std::sync::atomic::Ordering;
    let mut last_error: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let config = shared.state.load().config.clone();
        if let Err(e) = follower.round(&config, &shared) {
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(error = %e, "cannot read the block list; the list in use stays as it is");
                last_error = Some(std::time::Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the store was opened from: Redis URL, prefix, data directory.
type Origin = (Option<String>, String, PathBuf);

/// A gateway's view of the block list store: the open store and its place in the change log.
#[derive(Default)]
pub struct Follower {
    store: Option<(BlockStore, Origin)>,
    /// The last change audited; `None` until read from the cursor file.
    cursor: Option<String>,
    /// When the whole list was last read (it is read again every 5 s whatever the log says).
    last_full: Option<std::time::Instant>,
}

impl Follower {
    /// One round: (re)open the store, expire, audit new changes, reload the list when something
    /// changed or 5 s have passed.
    pub fn round(
        &mut self,
        config: &Config,
        shared: &crate::pipeline::Shared,
    ) -> Result<(), StoreError> {
        use apiwarden_core::event::{AuditEvent, EventKind, Outcome, Reason};
        let origin = (
            config.storage.redis.clone(),
            config.storage.redis_prefix.clone(),
            config.storage.data_dir.clone(),
        );
        if self.store.as_ref().is_none_or(|(_, o)| *o != origin) {
            let switched = self.store.as_ref().is_some_and(|(_, o)| *o != origin);
            self.store = None;
            if switched {
                // Another store: its log has its own positions, its list replaces the old one.
                self.cursor = None;
                self.last_full = None;
            }
            self.store = Some((BlockStore::open(config)?, origin));
        }
        let Some((store, _)) = self.store.as_mut() else {
            return Ok(());
        };
        let result = (|| {
            let now = now_ms();
            store.expire(now)?;
            let cursor_file = cursor_path(&config.storage.data_dir);
            let cursor = self.cursor.get_or_insert_with(|| {
                std::fs::read_to_string(&cursor_file)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            });
            let mut changed = false;
            loop {
                let (changes, last) = store.changes_after(cursor)?;
                let Some(last) = last else { break };
                for c in &changes {
                    let mut e = AuditEvent::new(
                        EventKind::Admin,
                        crate::ids::new_id(),
                        shared.node.clone(),
                    );
                    e.decision.outcome = Outcome::Allow;
                    e.decision.reason = Reason::AdminAction;
                    e.decision.policy = Some("blocklist".into());
                    e.actor = Some(c.by.clone());
                    e.message = Some(c.describe());
                    shared.record(Box::new(e));
                }
                // In memory first: what was audited is never audited again by this process.
                *cursor = last;
                changed = true;
            }
            if changed {
                let tmp = cursor_file.with_extension("tmp");
                if std::fs::write(&tmp, cursor.as_bytes())
                    .and_then(|_| std::fs::rename(&tmp, &cursor_file))
                    .is_err()
                {
                    tracing::warn!(file = %cursor_file.display(), "cannot save the block list cursor; changes may be audited again after a restart");
                }
            }
            if changed
                || self
                    .last_full
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
            {
                let entries: Vec<BlockEntry> = store
                    .all()?
                    .into_iter()
                    .filter(|e| !e.expired(now))
                    .collect();
                shared
                    .blocks
                    .store(std::sync::Arc::new(BlockSet::new(&entries)));
                self.last_full = Some(std::time::Instant::now());
            }
            Ok(())
        })();
        if result.is_err() {
            // Opened again next round.
            self.store = None;
        }
        result
    }
}
