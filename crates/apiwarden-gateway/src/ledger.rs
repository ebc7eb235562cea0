//! The tamper-evident audit ledger: the [`AuditSink`] that replaces the NDJSON file.
//!
//! Layout of `<data_dir>/ledger/`:
//!
//! - `segments/<first seq, 20 digits>.seg`: append-only files of framed records
//!   (`apiwarden_core::ledger::frame`), sequence numbers 1, 2, 3… without gaps, each payload
//!   the event's canonical JSON. Each record's leaf hash (RFC 6962) extends a SHA-256 hash
//!   chain and an incremental Merkle tree.
//! - `signing.key`: the Ed25519 seed the checkpoints are signed with (made on first start,
//!   readable by its owner only); `keys/<key id>.vkey`: every public key the ledger has
//!   signed with, in the signed-note `vkey` form, so checkpoints of an earlier key stay
//!   verifiable after a rotation.
//! - `checkpoints.log`: every checkpoint, one JSON line `{"note": "<signed note>"}`;
//!   `checkpoint`: the latest one. Checkpoints (C2SP signed notes: origin, tree size, root,
//!   plus a `time` extension line) are written every `audit.checkpoint_interval`, also when
//!   nothing happened, so a quiet period is provably quiet; and copied to
//!   `audit.checkpoint_copy` when set, so that cutting the tail of the ledger is detectable
//!   from there.
//! - `state`: the tree's frontier, the chain head and the size at the last checkpoint, so a
//!   start replays only what came after it.
//! - `seals/<first seq>.seal`: written when a segment is sealed (past `audit.segment_size`,
//!   or older than `audit.segment_max_age`), before the next one is begun: a signed
//!   [`Anchor`] (a checkpoint of the records up to the segment's last one, whose extension
//!   lines carry the chain head and the Merkle frontier there).
//! - `retention`: with `audit.retention`, the seal of the last segment retention deleted,
//!   written durably *before* any segment is unlinked; `audit verify` starts the chain and
//!   the tree from it when the first segment does not start at record 1. Only a prefix of
//!   sealed segments is ever deleted, each older than the retention, covered by a checkpoint
//!   already written, and passed by every cursor `audit.retention_requires_export` names
//!   (`cursors/<NAME>`: the last exported sequence number); each deletion is recorded in the
//!   ledger as a `system` event (`ledger.retention`).
//!
//! On start the last segment is read to its end: a torn last record (a crash in the middle
//! of a write) is cut off and reported ([`Opened::cut`]), never silently; a bad record with
//! valid data after it stops the start (`apiwarden audit verify` says more).

use crate::audit::AuditSink;
use apiwarden_core::config::Durability;
use apiwarden_core::event::AuditEvent;
use apiwarden_core::ledger::frame::{self, FrameError, CHAIN_START};
use apiwarden_core::ledger::merkle::{leaf_hash, Hash, LeafHasher, Tree};
use apiwarden_core::ledger::note::{Checkpoint, NoteSigner, Verifier};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Segments are closed and a new one begun past this size (`audit.segment_size`'s default).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// A segment holding records for longer than this is sealed (`audit.segment_max_age`'s
/// default).
pub const SEGMENT_MAX_AGE: Duration = Duration::from_secs(86_400);

/// How often, at most, the writer looks for segments that retention may delete.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// How long one retention pass goes on looking at and deleting segments (at least one a
/// pass): the writer writes no records meanwhile.
const RETENTION_PASS: Duration = Duration::from_millis(50);

/// How long retention waits before it tries again to delete a segment it could not delete.
const RETENTION_RETRY: Duration = Duration::from_secs(60);

/// What retention may delete (`audit.retention`, `audit.retention_requires_export`).
#[derive(Clone, Debug)]
pub struct Retention {
    /// Sealed segments whose last write is older than this are deleted.
    pub max_age: Duration,
    /// Export cursors (`cursors/<NAME>`) that must have passed a segment's last record.
    pub requires_export: Vec<String>,
}

/// How the ledger is set up. (`Debug` leaves the master key out.)
#[derive(Clone)]
pub struct LedgerOptions {
    /// `<data_dir>/ledger`.
    pub dir: PathBuf,
    pub durability: Durability,
    pub checkpoint_interval: Duration,
    /// The checkpoints' origin line (and the signing key's name).
    pub origin: String,
    /// A second directory the latest checkpoint is copied to.
    pub copy_to: Option<PathBuf>,
    pub segment_bytes: u64,
    /// A segment holding records for longer than this is sealed, even if small.
    pub segment_max_age: Duration,
    /// Retention: `None` keeps every record.
    pub retention: Option<Retention>,
    /// The node name of the events the ledger writes itself (what retention deleted).
    pub node: Arc<str>,
    /// The master key (`audit.encryption_key`): records are sealed under a new data key.
    pub encryption: Option<[u8; 32]>,
}

impl std::fmt::Debug for LedgerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerOptions")
            .field("dir", &self.dir)
            .field("durability", &self.durability)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("origin", &self.origin)
            .field("copy_to", &self.copy_to)
            .field("segment_bytes", &self.segment_bytes)
            .field("segment_max_age", &self.segment_max_age)
            .field("retention", &self.retention)
            .field("node", &self.node)
            .field("encryption", &self.encryption.map(|_| "(a master key)"))
            .finish()
    }
}

/// Why the ledger cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the audit ledger {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the audit ledger is damaged: segment {segment}, after record {after_seq}, at byte {offset}: {error}; nothing was changed — run `apiwarden audit verify` for the whole picture")]
    Corrupt {
        segment: PathBuf,
        after_seq: u64,
        offset: u64,
        error: FrameError,
    },
    #[error("the audit ledger is out of order: segment {segment} holds record {found} where record {expected} belongs; run `apiwarden audit verify`")]
    Sequence {
        segment: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the audit ledger starts at record {first} ({segment}) but {why}: records 1 to {} are unaccounted for (deleted outside of retention?); nothing was changed — run `apiwarden audit verify`", first - 1)]
    NoAnchor {
        segment: PathBuf,
        first: u64,
        why: String,
    },
    #[error("the audit ledger holds records up to {found}, but {durable} were written, synced and checkpointed (its saved state, its latest checkpoint, or its checkpoint copy held elsewhere, says so): records are missing (a rollback, or a cut segment); nothing was changed — run `apiwarden audit verify` to see what is missing. To start from what the ledger holds after restoring a backup on purpose, move `state`, `checkpoint` and `checkpoints.log` (in the ledger directory) and the checkpoint copy aside, keeping them as evidence")]
    Missing { durable: u64, found: u64 },
    #[error("the checkpoint copy {copy} is not signed by any key of this audit ledger ({error}): the ledger's keys were replaced, or the copy is another ledger's; nothing was changed — run `apiwarden audit verify --from-checkpoint {copy}`, and if the keys were changed on purpose, move the copy aside")]
    CopyUnverified { copy: PathBuf, error: String },
    #[error("the audit ledger does not match the checkpoint copy {copy}, which covers {size} records where the ledger holds {records}: the ledger was rolled back or changed; nothing was changed — run `apiwarden audit verify` (it compares the two). To start from what the ledger holds after restoring a backup on purpose, move the copy aside, keeping it as evidence")]
    BehindCopy {
        copy: PathBuf,
        size: u64,
        records: u64,
    },
    #[error("the audit ledger cannot be checked against its checkpoint copy {copy} ({size} records): it does not start at record 1, and neither a segment's seal (seals/) nor the retention anchor gives a signed state at or before the copy's size, so seals or the anchor were removed; nothing was changed — run `apiwarden audit verify --from-checkpoint {copy}`")]
    CopyUnchecked { copy: PathBuf, size: u64 },
    #[error("the ledger signing key {0} is not a 32-byte Ed25519 seed; restore it, or move it away to start a new key (keep keys/ so old checkpoints stay verifiable)")]
    BadKey(PathBuf),
    #[error("the system random number generator failed")]
    Random,
    #[error("the audit ledger {} is in use by another process (a running gateway, or `apiwarden audit rewrap`), which holds its lock: only one process may write a ledger. Stop the other one first, or give this gateway a data_dir of its own", .0.display())]
    Locked(PathBuf),
    #[error("the ledger's checkpoint signing: {0}")]
    Note(String),
    #[error("{0}")]
    Crypt(#[from] crate::ledger_crypt::CryptError),
    #[error("{0}; nothing was changed. Start with the key file these records were sealed under (if the master key was rotated, finish `apiwarden audit rewrap` first)")]
    WrongMasterKey(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LedgerError + '_ {
    move |error| LedgerError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// A torn last record that was cut off at start.
#[derive(Clone, Debug)]
pub struct Cut {
    pub segment: PathBuf,
    /// The last whole record before the cut.
    pub after_seq: u64,
    pub bytes: u64,
    pub error: FrameError,
}

/// What opening the ledger found.
pub struct Opened {
    pub sink: LedgerSink,
    /// Records already in the ledger.
    pub records: u64,
    pub cut: Option<Cut>,
}

/// The path of the segment whose first record is `seq`.
fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join("segments").join(format!("{seq:020}.seg"))
}

/// The segments in order, with the first sequence number their name gives.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LedgerError> {
    let seg_dir = dir.join("segments");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&seg_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&seg_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(&seg_dir))?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((first, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// The ledger's files are created readable and writable by their owner only (and its
/// directories usable by their owner only), whatever the process's umask: records, index,
/// checkpoints and keys alike. Files and directories made before keep their mode.
pub const FILE_MODE: u32 = 0o600;

/// See [`FILE_MODE`].
pub const DIR_MODE: u32 = 0o700;

/// Creates directory `path` and its missing parents with [`DIR_MODE`].
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Opens `path` for appending, creating it with [`FILE_MODE`].
pub fn append_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates (or empties) `path` for writing, with [`FILE_MODE`] when it is new.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    create_with_mode(path, FILE_MODE)
}

/// Creates (or empties) `path` for writing, with `mode` (before the umask) when it is new.
fn create_with_mode(path: &Path, mode: u32) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
}

/// How long the writer may be inside one pass (a write, an `fdatasync`) before the ledger
/// reports itself unhealthy: a disk that hangs.
#[cfg(not(test))]
const STALL_AFTER: Duration = Duration::from_secs(5);
#[cfg(test)]
const STALL_AFTER: Duration = Duration::from_secs(1);

/// The writer's progress, watched by a thread of its own (`audit-watch`), since a writer
/// stuck in a system call cannot say so itself.
#[derive(Default)]
struct Heartbeat {
    /// Passes of the writer's loop so far.
    passes: AtomicU64,
    /// Set while the writer has been inside one pass for [`STALL_AFTER`].
    stalled: AtomicBool,
    /// Set when the writer has ended.
    ended: AtomicBool,
    /// Events queued since the writer was found stuck; reset by the writer once its queue is
    /// empty again (not when it goes on: what queued meanwhile is still to be drained, and
    /// a second stall while it is counts against the same bound).
    held: AtomicU64,
    /// Events not recorded because [`MAX_HELD`] were queued while the writer was stuck; the
    /// writer records how many once it goes on.
    dropped: AtomicU64,
}

/// How many events may queue while the writer is stuck (a disk that hangs) before the next
/// ones are counted rather than kept: on routes that fail open requests go on, and an
/// unbounded queue would take the process's memory. Some hundreds of megabytes.
#[cfg(not(test))]
const MAX_HELD: u64 = 1_000_000;
#[cfg(test)]
const MAX_HELD: u64 = 1_000;

impl Heartbeat {
    /// Starts the watch of `beat`; `asleep` is the writer's idle flag (no passes then, and no
    /// stall either).
    fn watch(beat: Arc<Heartbeat>, asleep: Arc<AtomicBool>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("audit-watch".into())
            .spawn(move || {
                let mut last = beat.passes.load(Relaxed);
                let mut since = Instant::now();
                while !beat.ended.load(Relaxed) {
                    std::thread::sleep(STALL_AFTER / 5);
                    let now = beat.passes.load(Relaxed);
                    if now != last || asleep.load(Relaxed) {
                        last = now;
                        since = Instant::now();
                        if beat.stalled.swap(false, Relaxed) {
                            tracing::info!("the audit ledger's writer goes on again");
                        }
                    } else if since.elapsed() >= STALL_AFTER && !beat.stalled.swap(true, Relaxed) {
                        tracing::error!("the audit ledger's writer has been stuck for {STALL_AFTER:?} (a disk that hangs?); the ledger reports itself unhealthy, and routes that fail closed answer 503, until it goes on");
                    }
                }
            })
            .map(|_| ())
    }
}

/// How long a start waits, at most, to read the checkpoint copy ([`read_copy`]).
#[cfg(not(test))]
const COPY_READ_WAIT: Duration = Duration::from_secs(10);
#[cfg(test)]
const COPY_READ_WAIT: Duration = Duration::from_secs(1);

/// How long the writer waits, at most, for the checkpoint copy before it answers a flush or
/// ends (see [`Copier`]).
const COPY_WAIT: Duration = Duration::from_secs(5);

/// Writes checkpoint copies (`audit.checkpoint_copy`) on a thread of its own, so that a copy
/// location that hangs (a hard-mounted share that went away) holds up the copies, never the
/// ledger's writer nor the requests waiting for it. Only the latest checkpoint waits to be
/// copied: one that comes while the copier is busy replaces the one still waiting.
struct Copier {
    shared: Arc<(std::sync::Mutex<CopyQueue>, std::sync::Condvar)>,
    /// The size of the last checkpoint copied.
    copied: Arc<AtomicU64>,
}

#[derive(Default)]
struct CopyQueue {
    next: Option<(u64, String)>,
    busy: bool,
    stop: bool,
}

impl Copier {
    /// `unchecked`: the copy found at start could not be compared with the ledger (it did
    /// not answer, or could not be read); it is renamed `checkpoint.unchecked-<unix time>`
    /// before the first copy is written, so that a rolled-back ledger cannot overwrite the
    /// evidence just because the share was slow at its start.
    fn start(dir: PathBuf, unchecked: bool) -> std::io::Result<Copier> {
        let shared: Arc<(std::sync::Mutex<CopyQueue>, std::sync::Condvar)> = Arc::default();
        let copied = Arc::new(AtomicU64::new(0));
        let (queue, done) = (shared.clone(), copied.clone());
        std::thread::Builder::new()
            .name("audit-copy".into())
            .spawn(move || Copier::run(&dir, &queue, &done, unchecked))?;
        Ok(Copier { shared, copied })
    }

    fn run(
        dir: &Path,
        queue: &(std::sync::Mutex<CopyQueue>, std::sync::Condvar),
        copied: &AtomicU64,
        mut unchecked: bool,
    ) {
        let (lock, changed) = queue;
        loop {
            let (size, note) = {
                let Ok(mut q) = lock.lock() else { return };
                loop {
                    if let Some(next) = q.next.take() {
                        q.busy = true;
                        break next;
                    }
                    if q.stop {
                        return;
                    }
                    q = match changed.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
            };
            // The copy is for whoever watches the ledger from elsewhere (a monitor running
            // as another user): a signed note, public; its mode is the umask's.
            // The rename made durable too, before retention counts on the copy.
            if unchecked {
                let aside = dir.join(format!("checkpoint.unchecked-{}", crate::now_ms() / 1000));
                match std::fs::rename(dir.join("checkpoint"), &aside) {
                    Ok(()) => {
                        tracing::warn!(kept = %aside.display(), "the checkpoint copy the start could not compare is kept aside: run `apiwarden audit verify --from-checkpoint` with it");
                        unchecked = false;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => unchecked = false,
                    Err(e) => {
                        tracing::warn!(error = %e, dir = %dir.display(), "cannot keep the unchecked checkpoint copy aside; not overwriting it");
                        if let Ok(mut q) = lock.lock() {
                            q.busy = false;
                        }
                        changed.notify_all();
                        continue;
                    }
                }
            }
            let r = std::fs::create_dir_all(dir)
                .and_then(|_| write_atomic_mode(&dir.join("checkpoint"), note.as_bytes(), 0o666))
                .and_then(|_| sync_dir(dir));
            match r {
                Ok(()) => copied.store(size, Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot copy the ledger checkpoint to its second location; retention deletes nothing the copy does not cover")
                }
            }
            if let Ok(mut q) = lock.lock() {
                q.busy = false;
            }
            changed.notify_all();
        }
    }

    /// Hands the checkpoint of `size` records over for copying; never waits for the copy.
    fn offer(&self, size: u64, note: String) {
        if let Ok(mut q) = self.shared.0.lock() {
            q.next = Some((size, note));
        }
        self.shared.1.notify_all();
    }

    /// Waits until what was offered has been copied (or failed), for at most `wait`.
    fn settle(&self, wait: Duration) {
        let (lock, changed) = &*self.shared;
        let Ok(q) = lock.lock() else { return };
        let waited = changed.wait_timeout_while(q, wait, |q| q.busy || q.next.is_some());
        if waited.is_ok_and(|(_, t)| t.timed_out()) {
            tracing::warn!("the ledger checkpoint copy is taking longer than {wait:?} (a share that hangs?); going on without it");
        }
    }
}

impl Drop for Copier {
    /// The copier ends once it has copied what was offered last (a copy that hangs keeps
    /// its thread, which the process's exit ends).
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.0.lock() {
            q.stop = true;
        }
        self.shared.1.notify_all();
    }
}

/// How long a process that would write the ledger waits for another one to let it go (a
/// gateway that was just stopped still writes its last checkpoint).
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The ledger directory's lock: `<dir>/lock`, an advisory lock (`flock`) that the one
/// process writing the ledger (the gateway, `apiwarden audit rewrap`) holds for as long as it
/// writes. The kernel lets it go when the process ends, however it ends, so a crash never
/// leaves a stale lock. Readers (`audit verify`, `search`, `export`, `prove`) take none.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of the ledger in `dir` (made if need be), waiting up to `wait` for the
    /// process that holds it.
    pub fn take(dir: &Path, wait: Duration) -> Result<DirLock, LedgerError> {
        private_dir(dir).map_err(io(dir))?;
        let path = dir.join("lock");
        // Read access is enough for `flock`: a lock file made by another user (`audit rewrap`
        // run as root) does not keep the gateway out.
        let file = match File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                append_private(&path).map_err(io(&path))?
            }
            other => other.map_err(io(&path))?,
        };
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LedgerError::Locked(dir.to_path_buf()))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
    }
}

/// Cuts a last line of `checkpoints.log` that a crash or a full disk left without its end: a
/// line is written whole with its newline, so one without it never was. Returns the bytes cut.
fn cut_torn_log_line(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join("checkpoints.log");
    let (bytes, at) = match log_tail(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(0);
    }
    // A line is far shorter than the tail read: without a newline in it, the file holds no
    // whole line at all, or its end is not a checkpoint line.
    let keep = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => at + i as u64 + 1,
        None if at == 0 => 0,
        None => {
            return Err(std::io::Error::other(
                "the end of checkpoints.log is not a checkpoint line",
            ))
        }
    };
    let f = OpenOptions::new().write(true).open(&path)?;
    f.set_len(keep)?;
    f.sync_all()?;
    Ok(at + bytes.len() as u64 - keep)
}

/// The last [`LOG_TAIL`] bytes of `checkpoints.log` (all of it when shorter), and where they
/// begin: the log grows by a line a checkpoint, so a start reads its end, never the whole.
fn log_tail(path: &Path) -> std::io::Result<(Vec<u8>, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let at = len.saturating_sub(LOG_TAIL);
    f.seek(SeekFrom::Start(at))?;
    let mut bytes = Vec::with_capacity((len - at) as usize);
    f.read_to_end(&mut bytes)?;
    Ok((bytes, at))
}

/// How much of the end of `checkpoints.log` a start reads: many lines (a line is a few hundred
/// bytes).
const LOG_TAIL: u64 = 64 * 1024;

/// The size of the latest checkpoint this ledger signed that is still on its disk: the
/// largest of the `checkpoint` file and the lines at the end of `checkpoints.log` that verify
/// with `verifiers` (0 when none does; one that does not is warned of). Those records were synced before they were signed, so a start
/// must find them all, even when the saved `state`, written after them, is older (a crash
/// between the two).
fn last_signed(dir: &Path, verifiers: &[Verifier]) -> u64 {
    let verified = |note: &str| apiwarden_core::ledger::note::verify(note, verifiers).ok();
    let mut size = 0;
    let file = dir.join("checkpoint");
    if let Ok(note) = std::fs::read_to_string(&file) {
        match verified(&note) {
            Some(cp) => size = cp.size,
            None => {
                tracing::warn!(file = %file.display(), "the ledger's checkpoint file does not verify with its keys: it was changed, or its key removed from keys/; run `apiwarden audit verify`")
            }
        }
    }
    // Every whole line of the log's tail (the first may be cut by the tail's start): the
    // largest that verifies, so that one damaged line does not lower the floor.
    if let Ok((bytes, at)) = log_tail(&dir.join("checkpoints.log")) {
        let text = String::from_utf8_lossy(&bytes);
        let mut unverified = 0;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || (i == 0 && at > 0) {
                continue;
            }
            let cp = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("note")?.as_str().and_then(verified));
            match cp {
                Some(cp) => size = size.max(cp.size),
                None => unverified += 1,
            }
        }
        if unverified > 0 {
            tracing::warn!(lines = unverified, "lines at the end of the ledger's checkpoints.log do not verify with its keys: they were changed, or their key removed from keys/; run `apiwarden audit verify`");
        }
    }
    size
}

/// Writes a file atomically (temp file, fsync, rename), readable by its owner only.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, FILE_MODE)
}

/// [`write_atomic`] with the file's mode before the umask.
fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = create_with_mode(&tmp, mode)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Makes the entries of directory `dir` (files created, renamed, removed) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The seal of the segment whose first record is `first`.
fn seal_path(dir: &Path, first: u64) -> PathBuf {
    dir.join("seals").join(format!("{first:020}.seal"))
}

/// The retention anchor of the ledger in `dir`.
pub fn anchor_path(dir: &Path) -> PathBuf {
    dir.join("retention")
}

/// The export cursor `name` of the ledger in `dir`: the decimal sequence number of the last
/// record exported, then a newline.
pub fn cursor_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("cursors").join(name)
}

/// The signed state of the ledger after record `size`: a checkpoint (origin, size, root) whose
/// extension lines also carry what it is, the hash chain head and the Merkle frontier there,
/// so that checking can resume at that point without the records before it:
///
/// ```text
/// apiwarden/node-1
/// 1234
/// <base64 root>
/// time 2025-01-01T00:00:00Z
/// kind retention-anchor            or segment-seal
/// chain <base64 chain head after record 1234>
/// frontier <base64> <base64> …     one hash per set bit of the size, largest subtree first
///
/// — apiwarden/node-1 <signature>
/// ```
///
/// A segment's seal (`segment-seal`) is signed when the segment is closed. Only a
/// `retention-anchor`, signed when retention deletes the records up to it, lets `audit verify`
/// start after record 1: a seal cannot stand in for one, so deleting segments by hand stays
/// evident even though every sealed segment has a signed seal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub size: u64,
    pub root: Hash,
    pub chain: Hash,
    pub frontier: Vec<Hash>,
    /// [`SEAL`] or [`RETENTION_ANCHOR`] (the `kind` line).
    pub kind: String,
    /// When it was signed (the `time` line), if given.
    pub time: Option<String>,
    /// The signed note itself.
    pub note: String,
}

/// The `kind` of a segment's seal.
pub const SEAL: &str = "segment-seal";
/// The `kind` of the retention anchor.
pub const RETENTION_ANCHOR: &str = "retention-anchor";

impl Anchor {
    /// The Merkle tree at the anchor, to append the records after it.
    pub fn tree(&self) -> Tree {
        Tree::from_frontier(self.size, &self.frontier).unwrap_or_default()
    }
}

/// Why an anchor is refused.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("it does not verify: {0}")]
    Signature(String),
    #[error("{0}")]
    Content(String),
}

/// Signs the state at `tree` and `chain` as an [`Anchor`] note of `kind`.
fn anchor_note(
    signer: &NoteSigner,
    origin: &str,
    kind: &str,
    tree: &Tree,
    chain: &Hash,
) -> Result<String, apiwarden_core::ledger::note::NoteError> {
    let mut frontier = String::from("frontier");
    for h in tree.frontier() {
        frontier.push(' ');
        frontier.push_str(&B64.encode(h));
    }
    signer.sign(&Checkpoint {
        origin: origin.to_string(),
        size: tree.size(),
        root: tree.root(),
        extensions: vec![
            format!(
                "time {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            ),
            format!("kind {kind}"),
            format!("chain {}", B64.encode(chain)),
            frontier,
        ],
    })
}

/// Verifies an [`Anchor`] note against `verifiers` and reads it: its signature, its chain and
/// frontier lines, and that the frontier's root is the signed root.
pub fn parse_anchor(note: &str, verifiers: &[Verifier]) -> Result<Anchor, AnchorError> {
    let cp = apiwarden_core::ledger::note::verify(note, verifiers)
        .map_err(|e| AnchorError::Signature(e.to_string()))?;
    let hash = |t: &str| -> Option<Hash> { B64.decode(t).ok()?.try_into().ok() };
    let (mut chain, mut frontier, mut time, mut kind) = (None, None, None, None);
    for line in &cp.extensions {
        let (key, value) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match key {
            "chain" if chain.is_none() => {
                chain = Some(hash(value).ok_or_else(|| {
                    AnchorError::Content(format!("the chain line {line:?} is not a base64 hash"))
                })?)
            }
            "frontier" if frontier.is_none() => {
                frontier = Some(
                    value
                        .split(' ')
                        .filter(|h| !h.is_empty())
                        .map(hash)
                        .collect::<Option<Vec<Hash>>>()
                        .ok_or_else(|| {
                            AnchorError::Content(
                                "the frontier line holds something that is not a base64 hash"
                                    .into(),
                            )
                        })?,
                )
            }
            "kind" if kind.is_none() => kind = Some(value.to_string()),
            "chain" | "frontier" | "kind" => {
                return Err(AnchorError::Content(format!("it has two {key} lines")))
            }
            "time" => time = Some(value.to_string()),
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| {
        AnchorError::Content("it has no kind line: it is a checkpoint, not an anchor".into())
    })?;
    let chain = chain.ok_or_else(|| {
        AnchorError::Content("it has no chain line: it is a checkpoint, not an anchor".into())
    })?;
    let frontier = frontier.ok_or_else(|| {
        AnchorError::Content("it has no frontier line: it is a checkpoint, not an anchor".into())
    })?;
    let tree = Tree::from_frontier(cp.size, &frontier).ok_or_else(|| {
        AnchorError::Content(format!(
            "its frontier has {} hashes where a tree of {} records has {}",
            frontier.len(),
            cp.size,
            cp.size.count_ones()
        ))
    })?;
    if tree.root() != cp.root {
        return Err(AnchorError::Content(format!(
            "its frontier does not lead to its signed root of {} records",
            cp.size
        )));
    }
    Ok(Anchor {
        size: cp.size,
        root: cp.root,
        chain,
        frontier,
        kind,
        time,
        note: note.to_string(),
    })
}

/// The retention anchor of the ledger in `dir` (`retention`), verified, if there is one.
pub fn read_anchor(dir: &Path, verifiers: &[Verifier]) -> Result<Option<Anchor>, AnchorError> {
    match std::fs::read_to_string(anchor_path(dir)) {
        Ok(note) => {
            let a = parse_anchor(&note, verifiers)?;
            if a.kind != RETENTION_ANCHOR {
                return Err(AnchorError::Content(format!(
                    "it is a {}, not a {RETENTION_ANCHOR}: records may only be deleted by retention",
                    a.kind
                )));
            }
            Ok(Some(a))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AnchorError::Content(format!("it cannot be read: {e}"))),
    }
}

/// The parsed public keys of the ledger in `dir` (`keys/*.vkey`), unreadable ones left out.
fn own_verifiers(dir: &Path) -> Vec<Verifier> {
    verifier_keys(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|k| Verifier::parse(k).ok())
        .collect()
}

/// The signing key of the ledger in `dir`, made on first use; its public key is kept in
/// `keys/`.
pub fn signing_key(dir: &Path, origin: &str) -> Result<NoteSigner, LedgerError> {
    let path = dir.join("signing.key");
    let seed: [u8; 32] = match std::fs::read(&path) {
        Ok(bytes) => bytes
            .try_into()
            .map_err(|_| LedgerError::BadKey(path.clone()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| LedgerError::Random)?;
            // Two processes starting at once: the first key written is the one both use.
            crate::keystore::write_private(&path, &seed).map_err(io(&path))?;
            return signing_key(dir, origin);
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let signer = NoteSigner::new(origin, seed).map_err(|e| LedgerError::Note(e.to_string()))?;
    let vkey = signer.verifier_key();
    let id = vkey.split('+').nth(1).unwrap_or("key").to_string();
    let keys = dir.join("keys");
    private_dir(&keys).map_err(io(&keys))?;
    let pub_path = keys.join(format!("{id}.vkey"));
    if !pub_path.exists() {
        write_atomic(&pub_path, format!("{vkey}\n").as_bytes()).map_err(io(&pub_path))?;
    }
    Ok(signer)
}

/// The ledger's salt for HMACs of sensitive values (`<dir>/salt`, 32 random bytes, made on
/// first use, readable by its owner only).
pub fn salt(dir: &Path) -> Result<Vec<u8>, LedgerError> {
    let path = dir.join("salt");
    match std::fs::read(&path) {
        Ok(s) if s.len() == 32 => Ok(s),
        Ok(_) => Err(LedgerError::BadKey(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            private_dir(dir).map_err(io(dir))?;
            let mut s = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                .map_err(|_| LedgerError::Random)?;
            // Another process may have made it meanwhile: theirs is kept and read back.
            crate::keystore::write_private(&path, &s).map_err(io(&path))?;
            salt(dir)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// `hmac:<hex>` of `value` under the salt of the ledger in `dir` (`apiwarden audit hash`).
pub fn hmac_of(dir: &Path, value: &str) -> Result<String, LedgerError> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt(dir)?);
    Ok(hmac_text(&key, value))
}

/// `hmac:<hex>`: HMAC-SHA256 of a value under the ledger's salt.
pub fn hmac_text(key: &ring::hmac::Key, value: &str) -> String {
    let tag = ring::hmac::sign(key, value.as_bytes());
    format!("hmac:{}", apiwarden_core::apikey::hex(tag.as_ref()))
}

/// Every public key the ledger in `dir` has signed with (`keys/*.vkey`).
pub fn verifier_keys(dir: &Path) -> Result<Vec<String>, LedgerError> {
    let keys = dir.join("keys");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&keys) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&keys)(e)),
    };
    for entry in entries {
        let p = entry.map_err(io(&keys))?.path();
        if p.extension().and_then(|e| e.to_str()) == Some("vkey") {
            let text = std::fs::read_to_string(&p).map_err(io(&p))?;
            out.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
    }
    out.sort();
    Ok(out)
}

/// Where the writer starts: the tree, the chain head, and the open last segment.
struct Tail {
    tree: Tree,
    chain: Hash,
    next_seq: u64,
    segment: PathBuf,
    segment_len: u64,
}

/// Reads every segment, checking framing and sequence, and cuts a torn last record.
/// The tree, chain head and size saved at the last checkpoint (`state`), if readable.
fn saved_state(dir: &Path) -> Option<(u64, Hash, Tree)> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state")).ok()?).ok()?;
    let size = v["size"].as_u64()?;
    let hash =
        |t: &serde_json::Value| -> Option<Hash> { B64.decode(t.as_str()?).ok()?.try_into().ok() };
    let chain = hash(&v["chain"])?;
    let frontier: Vec<Hash> = v["frontier"]
        .as_array()?
        .iter()
        .map(hash)
        .collect::<Option<_>>()?;
    Some((size, chain, Tree::from_frontier(size, &frontier)?))
}

/// Reads the ledger from the last saved state on (the records it covers are not hashed
/// again: `audit verify` checks them), checking framing and sequence, and cuts a torn last
/// record. Without a usable state, or when it does not fit the segments, from the start: from
/// record 1, or from the retention anchor when retention deleted the oldest records (a first
/// segment after record 1 without an anchor that reaches it stops the start).
///
/// The saved state's size, and `signed` (what the checkpoint copy held elsewhere and the
/// latest checkpoint on this disk cover), are also a floor: those records were synced and
/// checkpointed before the state, the checkpoint or the copy was written, so none of them may
/// be missing or cut off as torn; a ledger that does not reach it stops the start
/// ([`LedgerError::Missing`], [`LedgerError::Corrupt`]).
fn replay(dir: &Path, signed: u64) -> Result<(Tail, Option<Cut>), LedgerError> {
    let saved = saved_state(dir);
    let durable = saved.as_ref().map_or(0, |(size, _, _)| *size).max(signed);
    if let Some((size, chain, tree)) = saved {
        match replay_from(dir, size, chain, tree, durable) {
            Ok(r) => return Ok(r),
            Err(LedgerError::Corrupt { .. }) | Err(LedgerError::Sequence { .. }) => {
                tracing::warn!(
                    "the ledger's saved state does not fit its segments; reading them all"
                );
            }
            Err(e) => return Err(e),
        }
    }
    let segs = segments(dir)?;
    let first = segs.first().map_or(1, |(f, _)| *f);
    let anchor = read_anchor(dir, &own_verifiers(dir));
    if let Ok(Some(a)) = &anchor {
        // (An anchor past the first segment's start: a retention interrupted between writing
        // the anchor and unlinking the segments it covers.)
        if a.size + 1 >= first {
            match replay_from(dir, a.size, a.chain, a.tree(), durable) {
                Ok(r) => return Ok(r),
                Err(LedgerError::Corrupt { .. }) | Err(LedgerError::Sequence { .. })
                    if first == 1 =>
                {
                    tracing::warn!(
                        "the ledger's retention anchor does not fit its segments; reading them all"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }
    if first > 1 {
        let why = match anchor {
            Ok(Some(a)) => format!("the retention anchor covers only records 1 to {}", a.size),
            Ok(None) => "there is no retention anchor (`retention`)".into(),
            Err(e) => format!("the retention anchor is refused ({e})"),
        };
        return Err(LedgerError::NoAnchor {
            segment: segs[0].1.clone(),
            first,
            why,
        });
    }
    replay_from(dir, 0, CHAIN_START, Tree::new(), durable)
}

/// `replay`, trusting `tree` and `chain` for the first `skip` records; the first `durable`
/// records must all be there, whole.
fn replay_from(
    dir: &Path,
    skip: u64,
    chain: Hash,
    tree: Tree,
    durable: u64,
) -> Result<(Tail, Option<Cut>), LedgerError> {
    let segs = segments(dir)?;
    let mut tree = tree;
    let mut chain = chain;
    let mut cut = None;
    let last_index = segs.len().saturating_sub(1);
    // Segments wholly covered by the saved state are not read.
    let start = segs
        .iter()
        .rposition(|(first, _)| *first <= skip + 1)
        .unwrap_or(0);
    let mut next_seq = segs.get(start).map_or(1, |(first, _)| *first);
    // The records between what `tree` covers and the first segment are gone.
    if let Some((first, path)) = segs.get(start) {
        if *first > skip + 1 {
            return Err(LedgerError::Sequence {
                segment: path.clone(),
                expected: skip + 1,
                found: *first,
            });
        }
    }
    if skip > 0 && segs.is_empty() {
        return Err(LedgerError::Sequence {
            segment: dir.join("segments"),
            expected: skip + 1,
            found: 1,
        });
    }
    for (i, (first, path)) in segs.iter().enumerate().skip(start) {
        if *first != next_seq {
            return Err(LedgerError::Sequence {
                segment: path.clone(),
                expected: next_seq,
                found: *first,
            });
        }
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(path))?;
        let mut offset = 0usize;
        while offset < bytes.len() {
            match frame::decode(&bytes[offset..]) {
                Ok((f, used)) => {
                    replay_record(path, &f, skip, &mut next_seq, &mut chain, &mut tree)?;
                    offset += used;
                }
                Err(error) => {
                    // A torn write: the damaged record runs to the end of the last segment.
                    // Not when the record was checkpointed (synced long before), and not when
                    // a whole later record follows: a torn write is the last thing written, so
                    // that is damage, such as a flipped bit in a length field.
                    let declared_end = declared_end(&bytes[offset..]);
                    let torn = i == last_index
                        && declared_end.is_none_or(|e| offset + e >= bytes.len())
                        && next_seq > durable
                        && !later_record_follows(&bytes, offset, next_seq);
                    if !torn {
                        return Err(LedgerError::Corrupt {
                            segment: path.clone(),
                            after_seq: next_seq - 1,
                            offset: offset as u64,
                            error,
                        });
                    }
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io(path))?;
                    f.set_len(offset as u64).map_err(io(path))?;
                    f.sync_all().map_err(io(path))?;
                    cut = Some(Cut {
                        segment: path.clone(),
                        after_seq: next_seq - 1,
                        bytes: (bytes.len() - offset) as u64,
                        error,
                    });
                    bytes.truncate(offset);
                    break;
                }
            }
        }
    }
    // The saved state covers records that are no longer there: read everything instead.
    if next_seq - 1 < skip {
        return Err(LedgerError::Sequence {
            segment: dir.join("state"),
            expected: skip,
            found: next_seq - 1,
        });
    }
    if next_seq - 1 < durable {
        return Err(LedgerError::Missing {
            durable,
            found: next_seq - 1,
        });
    }
    let (segment, segment_len) = match segs.last() {
        Some((_, path)) => {
            let len = std::fs::metadata(path).map_err(io(path))?.len();
            (path.clone(), len)
        }
        None => (segment_path(dir, 1), 0),
    };
    Ok((
        Tail {
            tree,
            chain,
            next_seq,
            segment,
            segment_len,
        },
        cut,
    ))
}

/// Writes the seal of every sealed segment (all but the last) that has none, or one that does
/// not verify or does not end where the next segment begins, reading the records from where
/// the ledger starts (record 1, or the retention anchor) to the last of them. Returns how many
/// were written.
fn seal_missing(
    dir: &Path,
    signer: &NoteSigner,
    origin: &str,
    verifiers: &[Verifier],
) -> Result<usize, LedgerError> {
    let segs = segments(dir)?;
    if segs.len() < 2 {
        return Ok(0);
    }
    let fits = |i: usize| {
        std::fs::read_to_string(seal_path(dir, segs[i].0))
            .ok()
            .and_then(|n| parse_anchor(&n, verifiers).ok())
            .is_some_and(|a| a.size + 1 == segs[i + 1].0)
    };
    let missing: Vec<usize> = (0..segs.len() - 1).filter(|&i| !fits(i)).collect();
    let Some(&last) = missing.last() else {
        return Ok(0);
    };
    let first = segs[0].0;
    let (mut tree, mut chain) = if first == 1 {
        (Tree::new(), CHAIN_START)
    } else {
        match read_anchor(dir, verifiers) {
            Ok(Some(a)) if a.size + 1 >= first => (a.tree(), a.chain),
            _ => {
                return Err(LedgerError::NoAnchor {
                    segment: segs[0].1.clone(),
                    first,
                    why: "there is no retention anchor that reaches it".into(),
                })
            }
        }
    };
    let skip = tree.size();
    let seals = dir.join("seals");
    private_dir(&seals).map_err(io(&seals))?;
    let mut written = 0;
    let mut next_seq = first;
    for (i, (seg_first, path)) in segs.iter().enumerate().take(last + 1) {
        if *seg_first != next_seq {
            return Err(LedgerError::Sequence {
                segment: path.clone(),
                expected: next_seq,
                found: *seg_first,
            });
        }
        let bytes = std::fs::read(path).map_err(io(path))?;
        let mut offset = 0;
        while offset < bytes.len() {
            let (f, used) =
                frame::decode(&bytes[offset..]).map_err(|error| LedgerError::Corrupt {
                    segment: path.clone(),
                    after_seq: next_seq - 1,
                    offset: offset as u64,
                    error,
                })?;
            replay_record(path, &f, skip, &mut next_seq, &mut chain, &mut tree)?;
            offset += used;
        }
        // (A segment that ends at or before the anchor is left over from an interrupted
        // retention and needs no seal.)
        if missing.contains(&i) && tree.size() == next_seq - 1 {
            let note = anchor_note(signer, origin, SEAL, &tree, &chain)
                .map_err(|e| LedgerError::Note(e.to_string()))?;
            let at = seal_path(dir, *seg_first);
            write_atomic(&at, note.as_bytes()).map_err(io(&at))?;
            written += 1;
        }
    }
    sync_dir(&seals).map_err(io(&seals))?;
    Ok(written)
}

/// One whole record read back at open (replay, sealing older segments): its number must be
/// the next, and it joins the chain and the tree unless the retention anchor already covers it
/// (`seq <= skip`).
fn replay_record(
    path: &Path,
    f: &frame::Frame<'_>,
    skip: u64,
    next_seq: &mut u64,
    chain: &mut Hash,
    tree: &mut Tree,
) -> Result<(), LedgerError> {
    if f.seq != *next_seq {
        return Err(LedgerError::Sequence {
            segment: path.to_path_buf(),
            expected: *next_seq,
            found: f.seq,
        });
    }
    if f.seq > skip {
        let leaf = leaf_hash(f.payload);
        *chain = frame::chain_next(chain, &leaf);
        tree.push(leaf);
    }
    *next_seq += 1;
    Ok(())
}

/// The checkpoint copy held elsewhere (`audit.checkpoint_copy`), read at start before
/// anything is changed.
struct HeldCopy {
    path: PathBuf,
    size: u64,
    root: Hash,
}

/// Reads the checkpoint copy. A missing one is passed over (a first start, or an unmounted
/// share: `audit verify` says so). One that no key of this ledger signed stops the start: the
/// ledger's keys were replaced, or the copy is another ledger's, and the next checkpoint would
/// overwrite it, the evidence.
///
/// Read on a thread of its own, waited for at most [`COPY_READ_WAIT`]: a share that hangs is
/// passed over as a missing one is (with an error in the log), rather than hold the start.
/// Such a copy, or one that is there but cannot be read, was not compared: `unchecked` is set,
/// and the copier keeps it aside rather than overwrite it ([`Copier::start`]).
fn read_copy(
    path: &Path,
    verifiers: &[Verifier],
    unchecked: &mut bool,
) -> Result<Option<HeldCopy>, LedgerError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let at = path.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("audit-copy-read".into())
        .spawn(move || {
            let _ = tx.send(std::fs::read_to_string(at));
        });
    let read = match reader {
        Ok(_) => rx.recv_timeout(COPY_READ_WAIT).ok(),
        Err(_) => Some(std::fs::read_to_string(path)),
    };
    let Some(read) = read else {
        tracing::error!(copy = %path.display(), "the checkpoint copy did not answer within {COPY_READ_WAIT:?} (a share that hangs?): the start goes on without comparing the ledger with it, and the copy found there is kept aside (checkpoint.unchecked-TIME) before the next is written; run `apiwarden audit verify --from-checkpoint` with it once it is back");
        *unchecked = true;
        return Ok(None);
    };
    let note = match read {
        Ok(note) => note,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::error!(copy = %path.display(), error = %e, "the checkpoint copy cannot be read: the start goes on without comparing the ledger with it, and the copy is kept aside (checkpoint.unchecked-TIME) before the next is written");
            *unchecked = true;
            return Ok(None);
        }
    };
    match apiwarden_core::ledger::note::verify(&note, verifiers) {
        Ok(cp) => Ok(Some(HeldCopy {
            path: path.to_path_buf(),
            size: cp.size,
            root: cp.root,
        })),
        Err(e) => Err(LedgerError::CopyUnverified {
            copy: path.to_path_buf(),
            error: e.to_string(),
        }),
    }
}

/// The ledger found at start against its checkpoint copy: the copy's size was already a floor
/// for the replay (fewer records is [`LedgerError::Missing`]); as many records with another
/// root means the ledger was changed and refilled. Starting would sign checkpoints over the
/// changed ledger and overwrite the copy, the evidence; so the start stops.
fn check_copy(held: &HeldCopy, tail: &Tail) -> Result<(), LedgerError> {
    let records = tail.next_seq - 1;
    if held.size > records || (held.size == records && held.root != tail.tree.root()) {
        return Err(LedgerError::BehindCopy {
            copy: held.path.clone(),
            size: held.size,
            records,
        });
    }
    Ok(())
}

/// The ledger found at start has grown past its checkpoint copy: its root at the copy's size
/// must be the copy's. [`check_copy`] compares sizes only, and the replay trusts the saved
/// `state` (unsigned) for the records it covers, so a ledger changed before the copy's size
/// and refilled past it, `state` rewritten to match, would otherwise be extended, signed, and
/// the copy overwritten with a checkpoint of the changed history.
///
/// The records are hashed from the last signed state at or before the copy's size (the seal
/// of the segment before the one holding it, or the retention anchor, or record 1) to the
/// end, each number the next: a segment or two when the copy is recent and the seals are
/// there. A mismatch at the copy's size stops the start ([`LedgerError::BehindCopy`]), and so
/// does a record out of order or missing, or no signed state to start from
/// ([`LedgerError::CopyUnchecked`]: seals and anchor removed). The tail the writer goes on
/// from is the one hashed here, never the saved state's (which may differ only if it was
/// changed). A copy older than the retention anchor is not compared (the records it covers
/// are gone; the signed anchor stands for them): the records are hashed from the anchor.
fn check_copy_history(
    dir: &Path,
    held: &HeldCopy,
    tail: &mut Tail,
    verifiers: &[Verifier],
) -> Result<(), LedgerError> {
    let records = tail.next_seq - 1;
    if held.size == 0 || held.size >= records {
        return Ok(());
    }
    let segs = segments(dir)?;
    let signed = |path: PathBuf, size: u64| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|n| parse_anchor(&n, verifiers).ok())
            .filter(|a| a.size == size)
            .map(|a| (a.tree(), a.chain))
    };
    // The signed state at the start of segment `j`.
    let start_of = |j: usize| -> Option<(Tree, Hash)> {
        let size = segs[j].0 - 1;
        if size == 0 {
            return Some((Tree::new(), CHAIN_START));
        }
        j.checked_sub(1)
            .and_then(|k| signed(seal_path(dir, segs[k].0), size))
            .or_else(|| signed(anchor_path(dir), size))
    };
    let anchor = read_anchor(dir, verifiers).ok().flatten();
    let (mut tree, mut chain, compare) = match anchor.filter(|a| a.size >= held.size) {
        // The anchor at the copy's size: its root is the one compared.
        Some(a) if a.size == held.size && a.root != held.root => {
            return Err(LedgerError::BehindCopy {
                copy: held.path.clone(),
                size: held.size,
                records,
            })
        }
        Some(a) => {
            if a.size > held.size {
                // Retention deletes nothing the copy does not cover: the copy went back (a
                // restored share), or the anchor is not retention's.
                tracing::warn!(copy = %held.path.display(), copy_size = held.size, anchor_size = a.size, "the retention anchor reaches past the checkpoint copy: the copy cannot be compared with the records it covers (they were deleted); run `apiwarden audit verify --from-checkpoint`");
            }
            (a.tree(), a.chain, false)
        }
        None => {
            let holding = segs
                .iter()
                .rposition(|(first, _)| *first <= held.size)
                .unwrap_or(0);
            match (0..=holding).rev().find_map(start_of) {
                Some((tree, chain)) => (tree, chain, true),
                None => {
                    return Err(LedgerError::CopyUnchecked {
                        copy: held.path.clone(),
                        size: held.size,
                    })
                }
            }
        }
    };
    let from = tree.size();
    let mut out_of_order = None;
    let mut matched = None;
    // Every record of the segments read: one numbered at or below `from` that comes after
    // the first one past it is out of place, not skipped.
    let mut prev: Option<u64> = None;
    read_segments_from(dir, from + 1, |seq, payload| {
        if out_of_order.is_some() {
            return;
        }
        // Every record read comes right after the one before, those the signed state covers
        // (the first segment's, before `from`) included: one slipped in among them is out of
        // place too.
        if let Some(p) = prev {
            if seq != p + 1 {
                out_of_order = Some((p + 1, seq));
                return;
            }
        }
        prev = Some(seq);
        // Records of the first segment read that the signed state already covers.
        if seq <= from && tree.size() == from {
            return;
        }
        if seq != tree.size() + 1 {
            out_of_order = Some((tree.size() + 1, seq));
            return;
        }
        let leaf = leaf_hash(payload);
        chain = frame::chain_next(&chain, &leaf);
        tree.push(leaf);
        if tree.size() == held.size {
            matched = Some(tree.root() == held.root);
        }
    })?;
    let (expected, found) = match out_of_order {
        Some(e) => e,
        None if tree.size() != records => (tree.size() + 1, records + 1),
        None => (0, 0),
    };
    if expected != 0 {
        return Err(LedgerError::Sequence {
            segment: dir.join("segments"),
            expected,
            found,
        });
    }
    if compare && matched != Some(true) {
        return Err(LedgerError::BehindCopy {
            copy: held.path.clone(),
            size: held.size,
            records,
        });
    }
    if tree.root() != tail.tree.root() || chain != tail.chain {
        tracing::warn!("the audit ledger's saved state does not match its records; going on from the records, which match the checkpoint copy (run `apiwarden audit verify`)");
    }
    tail.tree = tree;
    tail.chain = chain;
    Ok(())
}

/// Whether a whole record numbered `seq` or later begins somewhere after `from`. A torn
/// write leaves nothing whole after it, so if one does, the bytes at `from` are damage.
/// Only positions holding the magic byte and a plausible later number are decoded (with
/// their checksum), so a long segment is scanned at the speed of a byte search.
fn later_record_follows(bytes: &[u8], from: usize, seq: u64) -> bool {
    (from + 1..bytes.len()).any(|k| {
        bytes[k] == frame::MAGIC
            && bytes
                .get(k + 5..k + frame::HEADER_LEN)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .is_some_and(|n| n >= seq && n - seq < 1 << 24)
            && frame::decode(&bytes[k..]).is_ok()
    })
}

/// The length a frame at the start of `buf` claims (header, payload, checksum), if its
/// header is there to say.
fn declared_end(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
    Some(frame::OVERHEAD + len)
}

enum Msg {
    Event(Encoded),
    /// An event whose sender waits until it is durable (`strict`), and the way back to the
    /// sender's worker thread when it has one.
    Durable(Encoded, oneshot::Sender<Result<u64, ()>>, Option<Relay>),
    Flush(oneshot::Sender<()>),
}

/// An event encoded by the thread that recorded it (where the event is hot in its cache, and
/// where its strings are freed), its leaf hash begun, waiting for its sequence number. The
/// writer thread inserts the number, frames, finishes the leaf hash, chains and writes: the
/// serial part of the ledger's work.
struct Encoded {
    /// The canonical JSON without the value of `seq`, whose digits go at `at`.
    json: Vec<u8>,
    at: usize,
    /// The leaf hash begun over `json[..at]` by the recording thread, for a ledger whose
    /// records are not sealed: `seq` is the event's last field, so the writer only adds its
    /// digits and the closing brace (for the stub of an event too large to record, whose
    /// `seq` comes first, the digits and the whole stub). A sealed record's leaf hashes the
    /// ciphertext, which only the writer makes.
    head_leaf: Option<LeafHasher>,
    /// The search index entry, without the sequence number and the offset.
    entry: crate::ledger_index::Entry,
}

/// An encoded event no larger than this (with its sequence number and sealing) still fits a
/// frame; a larger one is recorded as a stub that says so.
const MAX_ENCODED: usize = frame::MAX_RECORD - 256;

impl Encoded {
    fn of(e: &AuditEvent, key: &crate::ledger_index::IndexKey, plain: bool) -> Encoded {
        let mut json = Vec::with_capacity(1024);
        let mut at = e.write_json_unnumbered(&mut json);
        if json.len() > MAX_ENCODED {
            // An event over 1 MiB cannot be framed: record that it existed.
            tracing::error!(
                bytes = json.len(),
                "an audit event is too large for the ledger; recording a stub"
            );
            let stub = serde_json::json!({"event_id": e.event_id, "error": "event too large to record", "bytes": json.len()});
            json.clear();
            json.extend_from_slice(b"{\"seq\":");
            at = json.len();
            json.push(b',');
            json.extend_from_slice(&stub.to_string().as_bytes()[1..]);
        }
        let head_leaf = plain.then(|| {
            let mut h = LeafHasher::new();
            h.update(&json[..at]);
            h
        });
        Encoded {
            json,
            at,
            head_leaf,
            entry: crate::ledger_index::Entry::of_event(e, 0, key),
        }
    }
}

/// A request waiting for its record to be durable: its sequence number, where its answer
/// goes, and its worker thread's relay.
type Waiter = (u64, oneshot::Sender<Result<u64, ()>>, Option<Relay>);

/// Durability answers for the requests of one worker thread.
type Acks = Vec<(oneshot::Sender<Result<u64, ()>>, Result<u64, ()>)>;

/// The way back to one worker thread for `strict` answers. Answering a waiting request from
/// the writer thread wakes its worker's runtime with a system call (an `eventfd` write) per
/// request; a group commit answers dozens at once. Through the relay the writer wakes each
/// worker once per batch, and the worker's relay task answers its requests on their own
/// thread, where a wake-up is a push onto the local run queue.
#[derive(Clone)]
struct Relay(mpsc::UnboundedSender<Acks>);

thread_local! {
    static RELAY: std::cell::RefCell<Option<Relay>> = const { std::cell::RefCell::new(None) };
}

/// Starts this thread's relay for `strict` answers (see [`Relay`]) on the current
/// single-threaded runtime. Each gateway worker calls it once, inside its runtime; a thread
/// without a relay is answered directly.
pub fn start_durable_relay() {
    let (tx, mut rx) = mpsc::unbounded_channel::<Acks>();
    tokio::spawn(async move {
        while let Some(acks) = rx.recv().await {
            for (waiter, answer) in acks {
                let _ = waiter.send(answer);
            }
        }
    });
    RELAY.with(|r| *r.borrow_mut() = Some(Relay(tx)));
}

/// Answers the requests waiting for the batch just written (`ok`: it is durable), grouped by
/// worker thread.
fn answer_durable(durable: &mut Vec<Waiter>, ok: bool) {
    let mut groups: Vec<(Relay, Acks)> = Vec::new();
    for (seq, waiter, relay) in durable.drain(..) {
        let answer = if ok { Ok(seq) } else { Err(()) };
        match relay {
            Some(relay) => match groups.iter_mut().find(|(g, _)| g.0.same_channel(&relay.0)) {
                Some((_, acks)) => acks.push((waiter, answer)),
                None => groups.push((relay, vec![(waiter, answer)])),
            },
            None => {
                let _ = waiter.send(answer);
            }
        }
    }
    for (relay, acks) in groups {
        // The worker's runtime is gone: answer directly (nobody may be waiting any more).
        if let Err(mpsc::error::SendError(acks)) = relay.0.send(acks) {
            for (waiter, answer) in acks {
                let _ = waiter.send(answer);
            }
        }
    }
}

/// The ledger as the gateway's audit sink. Events are numbered, hashed and written by one
/// thread in batches; `strict` makes them durable (fdatasync) with every batch, `batched`
/// within [`BATCHED_SYNC_AFTER`] of their write, `async` never.
pub struct LedgerSink {
    tx: mpsc::UnboundedSender<Msg>,
    /// The search index's key: the recording thread makes its event's index entry.
    index_key: crate::ledger_index::IndexKey,
    /// Records are not sealed: the recording thread begins each record's leaf hash.
    plain: bool,
    /// The writer thread, woken at once by a request waiting for its record (`strict`), and
    /// by any message while it sleeps through an idle spell.
    writer: std::thread::Thread,
    /// Set while the writer sleeps through an idle spell (see [`Writer::sleep_while_idle`]).
    asleep: Arc<AtomicBool>,
    healthy: Arc<AtomicBool>,
    heartbeat: Arc<Heartbeat>,
    /// Records written so far (for metrics and tests).
    pub written: Arc<AtomicU64>,
    dir: PathBuf,
}

impl LedgerSink {
    /// Opens (or creates) the ledger, replays it, and starts the writer thread.
    pub fn open(opts: LedgerOptions) -> Result<Opened, LedgerError> {
        // Before anything is read: replaying cuts a torn tail, which only the writer may do.
        let lock = DirLock::take(&opts.dir, LOCK_WAIT)?;
        match cut_torn_log_line(&opts.dir) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(bytes = n, "cut a checkpoint line that was never written whole (a crash or a full disk) from the end of checkpoints.log"),
            // Checkpoints will fail to be written too, and say so; the start goes on.
            Err(e) => tracing::warn!(error = %e, "cannot read checkpoints.log"),
        }
        let seg_dir = opts.dir.join("segments");
        private_dir(&seg_dir).map_err(io(&seg_dir))?;
        let signer = signing_key(&opts.dir, &opts.origin)?;
        let sealer = match &opts.encryption {
            Some(master) => {
                // The master key must open every data key already there before a new one is
                // made under it: started once with the wrong key file, the gateway would
                // otherwise seal on under a key no other data key shares, and search and
                // export would fail for every record while `verify` still passed.
                crate::ledger_crypt::Opener::load(&opts.dir, master).map_err(|e| match e {
                    crate::ledger_crypt::CryptError::WrongMaster(_) => {
                        LedgerError::WrongMasterKey(e.to_string())
                    }
                    other => LedgerError::Crypt(other),
                })?;
                Some(crate::ledger_crypt::Sealer::new_data_key(
                    &opts.dir, master,
                )?)
            }
            None => None,
        };
        let mut verifiers = own_verifiers(&opts.dir);
        verifiers.push(signer.verifier());
        // The copy first: what it covers must not be cut off as torn either.
        let mut unchecked = false;
        let held = match &opts.copy_to {
            Some(copy) => read_copy(&copy.join("checkpoint"), &verifiers, &mut unchecked)?,
            None => None,
        };
        // Nor what a checkpoint still on this disk covers, when `state` is older.
        let floor = held
            .as_ref()
            .map_or(0, |h| h.size)
            .max(last_signed(&opts.dir, &verifiers));
        let (mut tail, cut) = replay(&opts.dir, floor)?;
        if let Some(held) = &held {
            check_copy(held, &tail)?;
            check_copy_history(&opts.dir, held, &mut tail, &verifiers)?;
        }
        let records = tail.next_seq - 1;
        if opts.retention.is_some() {
            // Segments sealed before this version (or whose seal was lost) get theirs now,
            // so that retention can pass them.
            match seal_missing(&opts.dir, &signer, &opts.origin, &verifiers) {
                Ok(0) => {}
                Ok(n) => tracing::info!(segments = n, "sealed older ledger segments for retention"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot seal older ledger segments; retention stops before them")
                }
            }
        }
        // A segment's age counts from its first record: for the one reopened, from the file.
        let segment_born = std::fs::metadata(&tail.segment)
            .ok()
            .filter(|m| m.len() > 0)
            .and_then(|m| m.created().or_else(|_| m.modified()).ok());
        // The index's hashes are keyed by the master key when records are sealed (so the index
        // tells nothing without it), else by the salt.
        let (index_key, opener) = match &opts.encryption {
            Some(master) => (
                crate::ledger_index::IndexKey::from_master(master),
                crate::ledger_crypt::Opener::load(&opts.dir, master).ok(),
            ),
            None => (
                crate::ledger_index::IndexKey::from_salt(&salt(&opts.dir)?),
                None,
            ),
        };
        let index = crate::ledger_index::SidecarWriter::open(
            &tail.segment,
            tail.segment_len,
            index_key,
            opener.as_ref(),
        );
        let file = append_private(&tail.segment).map_err(io(&tail.segment))?;
        let copier = match &opts.copy_to {
            Some(dir) => Some(Copier::start(dir.clone(), unchecked).map_err(io(dir))?),
            None => None,
        };
        let plain = sealer.is_none();
        let (tx, rx) = mpsc::unbounded_channel();
        let asleep = Arc::new(AtomicBool::new(false));
        let healthy = Arc::new(AtomicBool::new(true));
        let written = Arc::new(AtomicU64::new(records));
        let heartbeat = Arc::new(Heartbeat::default());
        Heartbeat::watch(heartbeat.clone(), asleep.clone()).map_err(io(&opts.dir))?;
        let writer = Writer {
            heartbeat: heartbeat.clone(),
            _lock: lock,
            opts: opts.clone(),
            signer,
            sealer,
            file,
            tail,
            healthy: healthy.clone(),
            asleep: asleep.clone(),
            written: written.clone(),
            last_checkpoint: None,
            index,
            index_key,
            verifiers,
            covered: 0,
            copier,
            last_retention: None,
            retention_held: None,
            delete_failed: None,
            sync_lost: false,
            own: Vec::new(),
            segment_born,
            rotate_failed: None,
            segments_unsynced: false,
            batch_written: 0,
            unsynced_since: None,
            cut_owed: false,
            released_to: 0,
            #[cfg(test)]
            fail_next_sync: FAIL_NEXT_SYNC.with(|f| f.clone()),
            #[cfg(test)]
            fail_next_cut: FAIL_NEXT_CUT.with(|f| f.clone()),
            #[cfg(test)]
            hang_next_sync: HANG_NEXT_SYNC.with(|f| f.clone()),
            #[cfg(test)]
            slow_unlink: SLOW_UNLINK.with(|f| f.clone()),
            #[cfg(test)]
            fail_dir_syncs: FAIL_DIR_SYNCS.with(|f| f.clone()),
        };
        let thread = std::thread::Builder::new()
            .name("audit-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(io(&opts.dir))?;
        Ok(Opened {
            sink: LedgerSink {
                writer: thread.thread().clone(),
                heartbeat,
                asleep,
                tx,
                index_key,
                plain,
                healthy,
                written,
                dir: opts.dir,
            },
            records,
            cut,
        })
    }

    /// The ledger's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl LedgerSink {
    /// Queues a message for the writer, and wakes the writer if it sleeps through an idle
    /// spell. Under load it never does, and queuing wakes no thread.
    ///
    /// The message (about 200 bytes with a begun leaf hash) goes into the queue by value, and
    /// comes back only when the writer has stopped: boxing it would cost an allocation per
    /// event to shrink a return that almost never happens.
    #[allow(clippy::result_large_err)]
    fn send(&self, msg: Msg) -> Result<(), mpsc::error::SendError<Msg>> {
        self.tx.send(msg)?;
        // Pairs with the writer's fence between setting `asleep` and looking at the queue:
        // either the writer sees this message, or this sees `asleep` set.
        fence(SeqCst);
        if self.asleep.load(Relaxed) {
            self.writer.unpark();
        }
        Ok(())
    }
}

impl Drop for LedgerSink {
    /// Closing the queue goes through no `send`: wake the writer so that it sees the queue
    /// closed now (and writes its last checkpoint) even in the middle of an idle sleep.
    fn drop(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, closed));
        self.writer.unpark();
    }
}

impl LedgerSink {
    /// Whether an event may queue: always, except while the writer is stuck and
    /// [`MAX_HELD`] events queued already (then it is counted, and the writer records the
    /// count once it goes on).
    fn may_queue(&self) -> bool {
        if !self.heartbeat.stalled.load(Relaxed)
            || self.heartbeat.held.fetch_add(1, Relaxed) < MAX_HELD
        {
            return true;
        }
        if self.heartbeat.dropped.fetch_add(1, Relaxed) == 0 {
            tracing::error!("the audit ledger's writer is stuck and {MAX_HELD} events wait for it: the next ones are counted, not recorded, until it goes on");
        }
        false
    }
}

impl AuditSink for LedgerSink {
    fn record(&self, event: Box<AuditEvent>) {
        if !self.may_queue() {
            return;
        }
        let encoded = Encoded::of(&event, &self.index_key, self.plain);
        drop(event);
        if self.send(Msg::Event(encoded)).is_err() {
            tracing::error!("the audit ledger writer has stopped; an event could not be recorded");
            self.healthy.store(false, Relaxed);
        }
    }

    fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.send(Msg::Flush(tx));
        rx
    }

    fn record_durable(&self, event: &AuditEvent) -> oneshot::Receiver<Result<u64, ()>> {
        let (tx, rx) = oneshot::channel();
        if !self.may_queue() {
            // Not durable: refused on a route that fails closed, forwarded on one that fails
            // open (its outcome's record is counted with the others).
            let _ = tx.send(Err(()));
            return rx;
        }
        let encoded = Encoded::of(event, &self.index_key, self.plain);
        let relay = RELAY.with(|r| r.borrow().clone());
        if let Err(mpsc::error::SendError(Msg::Durable(_, tx, _))) =
            self.send(Msg::Durable(encoded, tx, relay))
        {
            self.healthy.store(false, Relaxed);
            let _ = tx.send(Err(()));
        }
        // The request waits for this record: no polling delay on top of the write.
        self.writer.unpark();
        rx
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Relaxed) && !self.heartbeat.stalled.load(Relaxed)
    }
}

/// How long the writer sleeps when its queue is empty: polling, so that recording an event
/// never wakes a thread (a system call per event). After a whole tick with nothing to do it
/// sleeps until the next checkpoint instead ([`Writer::sleep_while_idle`]), and the next
/// event wakes it. A request that waits for its record
/// (`strict`) wakes the writer at once instead; records that arrive meanwhile share the
/// write and `fdatasync` (group commit).
const TICK: Duration = Duration::from_millis(2);

/// How many bytes of synced records the writer lets gather in the page cache before it drops
/// them ([`Writer::release_cache`]): one `posix_fadvise` for many `strict` group commits.
const RELEASE_EVERY: u64 = 256 * 1024;

/// `batched`: how long written records may wait for their `fdatasync`. The writer wakes when
/// this has passed (it parks no longer than that), so a record is durable within about 8 ms of
/// being recorded (up to a [`TICK`] in the queue, then this), plus the time the `fdatasync`
/// itself takes: one `fdatasync` for three ticks' records instead of one per tick.
const BATCHED_SYNC_AFTER: Duration = Duration::from_millis(6);

#[cfg(test)]
thread_local! {
    /// Tests: set to make the next `fdatasync` of a ledger opened on this thread fail.
    pub(crate) static FAIL_NEXT_SYNC: Arc<AtomicBool> = Arc::default();
    /// Tests: set to make the next cut-back of a segment fail.
    pub(crate) static FAIL_NEXT_CUT: Arc<AtomicBool> = Arc::default();
    /// Tests: set to make the next `fdatasync` of a ledger opened on this thread take this
    /// many milliseconds, as a disk that hangs would.
    pub(crate) static HANG_NEXT_SYNC: Arc<AtomicU64> = Arc::default();
    /// Tests: each segment retention deletes takes this many milliseconds more (a slow disk,
    /// or thousands of segments).
    pub(crate) static SLOW_UNLINK: Arc<AtomicU64> = Arc::default();
    /// Tests: the next this many syncs of the `segments` directory (after a rotation) fail.
    pub(crate) static FAIL_DIR_SYNCS: Arc<AtomicU64> = Arc::default();
}

struct Writer {
    opts: LedgerOptions,
    /// Held until the writer thread ends: its last checkpoint is written by then.
    _lock: DirLock,
    signer: NoteSigner,
    sealer: Option<crate::ledger_crypt::Sealer>,
    file: File,
    tail: Tail,
    healthy: Arc<AtomicBool>,
    /// Set while the writer sleeps through an idle spell; senders then wake it.
    asleep: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    last_checkpoint: Option<Instant>,
    /// The search index of the segment being written (`None` when it could not be kept:
    /// searches then read that segment's records one by one).
    index: Option<crate::ledger_index::SidecarWriter>,
    index_key: crate::ledger_index::IndexKey,
    /// The ledger's public keys, for its seals.
    verifiers: Vec<Verifier>,
    /// The size of the last checkpoint written.
    covered: u64,
    /// Writes checkpoints to `audit.checkpoint_copy`, when there is one; what it has copied
    /// bounds retention: records whose checkpoint never left the machine are not yet safe
    /// from a rollback.
    copier: Option<Copier>,
    last_retention: Option<Instant>,
    /// Why retention last stopped short (logged once per reason).
    retention_held: Option<String>,
    /// The segment retention last failed to delete, and when: tried again only after
    /// [`RETENTION_RETRY`], and recorded once.
    delete_failed: Option<(PathBuf, Instant)>,
    /// `async`: an `fdatasync` failed, so records written since the last good one may be
    /// lost from the disk though still in the page cache. No checkpoint is signed from then
    /// on (it would vouch for them), and the ledger reports itself unhealthy, until a restart
    /// reads back what the disk holds.
    sync_lost: bool,
    /// Events the writer records itself (retention), taken before the queue.
    own: Vec<AuditEvent>,
    /// When the segment being written received its first record (`None` while empty).
    segment_born: Option<std::time::SystemTime>,
    /// The last failed rotation: retried at most once a second.
    rotate_failed: Option<Instant>,
    /// The `segments` directory could not be synced after a rotation: the new segment's name
    /// may not survive a power failure, so its records are not durable (nor checkpointed)
    /// until a sync of the directory succeeds.
    segments_unsynced: bool,
    /// How much of the batch is in the file already. `batched` keeps written records in the
    /// batch until their `fdatasync`, so that a failed one writes them again; the other modes
    /// complete a batch with its write.
    batch_written: usize,
    /// `batched`: when the oldest record not yet synced was written.
    unsynced_since: Option<Instant>,
    /// A failed write or `fdatasync` could not cut the file back to `tail.segment_len`: no
    /// write may append before that cut is made.
    cut_owed: bool,
    /// How far into the segment synced records were last dropped from the page cache (see
    /// [`Writer::release_cache`]).
    released_to: u64,
    /// The writer's progress, for the watch that tells a stuck writer.
    heartbeat: Arc<Heartbeat>,
    /// Tests: the next `fdatasync` of a segment fails, as an I/O error would make it.
    #[cfg(test)]
    fail_next_sync: Arc<AtomicBool>,
    #[cfg(test)]
    fail_next_cut: Arc<AtomicBool>,
    #[cfg(test)]
    hang_next_sync: Arc<AtomicU64>,
    #[cfg(test)]
    slow_unlink: Arc<AtomicU64>,
    #[cfg(test)]
    fail_dir_syncs: Arc<AtomicU64>,
}

impl Drop for Writer {
    /// However the writer ends, its watch ends with it.
    fn drop(&mut self) {
        self.heartbeat.ended.store(true, Relaxed);
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
        // Requests waiting for their record to be durable, with its sequence number: answered
        // together after the batch's one write and fdatasync (group commit).
        let mut durable: Vec<Waiter> = Vec::new();
        let mut batch: Vec<u8> = Vec::with_capacity(512 * 1024);
        let mut payload: Vec<u8> = Vec::with_capacity(4096);
        let mut sealed: Vec<u8> = Vec::with_capacity(4096);
        let mut rest: Vec<u8> = Vec::with_capacity(32);
        // Records encoded into `batch` but not yet written: their sequence numbers are
        // taken, so they must reach the file before anything after them.
        loop {
            self.beat();
            self.note_dropped();
            let mut disconnected = false;
            let mut received = false;
            loop {
                let msg = match self.own.pop() {
                    Some(e) => Ok(Msg::Event(Encoded::of(
                        &e,
                        &self.index_key,
                        self.sealer.is_none(),
                    ))),
                    None => rx.try_recv(),
                };
                received |= msg.is_ok();
                let (event, waiter) = match msg {
                    Ok(Msg::Event(e)) => (Some(e), None),
                    Ok(Msg::Durable(e, w, relay)) => (Some(e), Some((w, relay))),
                    Ok(Msg::Flush(done)) => {
                        waiting.push(done);
                        (None, None)
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Nothing waits any more: the events held while the writer was stuck
                        // are all in the batch (the bound counts from here again).
                        if self.heartbeat.held.load(Relaxed) != 0 {
                            self.heartbeat.held.store(0, Relaxed);
                        }
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                };
                if let Some(enc) = event {
                    {
                        let seq = self.tail.next_seq;
                        if let Some((w, relay)) = waiter {
                            durable.push((seq, w, relay));
                        }
                        // What follows the record's head: the number, the closing brace.
                        rest.clear();
                        apiwarden_core::event::push_decimal(&mut rest, seq);
                        rest.extend_from_slice(&enc.json[enc.at..]);
                        let head = &enc.json[..enc.at];
                        let offset = self.tail.segment_len + batch.len() as u64;
                        // A plain record is framed straight from its parts and hashed from
                        // its head's hash (`encode_parts` writes nothing when it refuses).
                        // A sealed one, or one too large to frame, is built whole first.
                        let leaf = match enc.head_leaf {
                            Some(mut h)
                                if self.sealer.is_none()
                                    && frame::encode_parts(seq, &[head, &rest], &mut batch)
                                        .is_ok() =>
                            {
                                h.update(&rest);
                                h.finish()
                            }
                            _ => {
                                payload.clear();
                                payload.extend_from_slice(head);
                                payload.extend_from_slice(&rest);
                                if let Some(sealer) = &self.sealer {
                                    sealed.clear();
                                    sealer.seal(seq, &payload, &mut sealed);
                                    std::mem::swap(&mut payload, &mut sealed);
                                }
                                if frame::encode(seq, &payload, &mut batch).is_err() {
                                    // Cannot happen below `MAX_ENCODED`; record that it existed.
                                    tracing::error!(
                                        seq,
                                        bytes = payload.len(),
                                        "an audit event is too large for the ledger; recording a stub"
                                    );
                                    let stub = serde_json::json!({"seq": seq, "error": "event too large to record", "bytes": payload.len()});
                                    payload.clear();
                                    payload.extend_from_slice(stub.to_string().as_bytes());
                                    let _ = frame::encode(seq, &payload, &mut batch);
                                }
                                leaf_hash(&payload)
                            }
                        };
                        if let Some(index) = &mut self.index {
                            index.push_entry(crate::ledger_index::Entry {
                                seq,
                                offset: offset as u32,
                                ..enc.entry
                            });
                        }
                        self.tail.chain = frame::chain_next(&self.tail.chain, &leaf);
                        self.tail.tree.push(leaf);
                        self.tail.next_seq += 1;
                        // Not while the file cannot be written: the batch is tried again once
                        // a pass, not for every event that arrives meanwhile.
                        if batch.len() - self.batch_written >= 512 * 1024
                            && (self.sync_lost || self.healthy.load(Relaxed))
                        {
                            self.write(&mut batch, false);
                            // A step of a long pass (a backlog drained after a stall).
                            self.beat();
                        }
                    }
                }
            }
            // Shutting down, a flush asked for, or a request waiting for its record (`strict`,
            // also when a reload made it so under a writer opened `batched`): whatever is
            // written must be durable now.
            self.write(
                &mut batch,
                disconnected || !waiting.is_empty() || !durable.is_empty(),
            );
            // Durable now (one fdatasync for all of them), or not: then the requests are
            // refused rather than forwarded unrecorded; their records stay queued.
            answer_durable(&mut durable, batch.is_empty());
            if batch.is_empty() {
                // A flush (the gateway shutting down) also gets a checkpoint of everything
                // written, before it is answered: the process may exit right after.
                if !waiting.is_empty() {
                    self.checkpoint();
                    self.settle_copy();
                }
                for w in waiting.drain(..) {
                    let _ = w.send(());
                }
                if disconnected
                    || self
                        .last_checkpoint
                        .is_none_or(|t| t.elapsed() >= self.opts.checkpoint_interval)
                {
                    if !disconnected {
                        self.rotate_by_age();
                    }
                    self.checkpoint();
                    if !disconnected {
                        self.retain();
                    }
                }
            }
            if disconnected && batch.is_empty() {
                self.settle_copy();
                return;
            }
            if !received && batch.is_empty() && durable.is_empty() && waiting.is_empty() {
                self.sleep_while_idle(&rx);
                continue;
            }
            // Written records waiting for their `fdatasync` shorten the sleep to their due time.
            let due = self
                .unsynced_since
                .filter(|_| self.batch_written > 0)
                .map_or(TICK, |t| BATCHED_SYNC_AFTER.saturating_sub(t.elapsed()));
            std::thread::park_timeout(due.min(TICK));
        }
    }

    /// A whole tick brought nothing and nothing is left to write: sleeps until the next
    /// checkpoint is due, instead of waking every [`TICK`] (an idle gateway would otherwise
    /// wake 500 times a second). A sender that finds `asleep` set wakes the writer at once.
    fn sleep_while_idle(&mut self, rx: &mpsc::UnboundedReceiver<Msg>) {
        let until_checkpoint = self.last_checkpoint.map_or(Duration::ZERO, |t| {
            self.opts.checkpoint_interval.saturating_sub(t.elapsed())
        });
        if until_checkpoint <= TICK {
            // As on any other pass (a checkpoint slower than its interval does not make the
            // next pass start at once).
            std::thread::park_timeout(TICK);
            return;
        }
        self.asleep.store(true, Relaxed);
        // Pairs with the fence in `LedgerSink::send`: either a message queued before this
        // point is seen here, or its sender sees `asleep` and wakes this thread.
        fence(SeqCst);
        if rx.is_empty() && self.own.is_empty() {
            std::thread::park_timeout(until_checkpoint);
        }
        self.asleep.store(false, Relaxed);
    }

    /// Writes what the batch holds beyond what is in the file already, and completes the
    /// batch: `strict` makes it durable at once, `async` never, `batched` once its oldest
    /// record has waited [`BATCHED_SYNC_AFTER`] (or at once with `sync_now`, or when the
    /// segment is full). A completed batch is emptied, and a full segment makes way for the
    /// next. On failure the file is cut back to where the batch began and the whole batch is
    /// kept, to be written again on the next tick.
    fn write(&mut self, batch: &mut Vec<u8>, sync_now: bool) {
        if self.cut_owed {
            // Appending now would leave the stale copy of the batch in front of the new one.
            if self.cut_back().is_err() {
                return;
            }
            self.cut_owed = false;
        }
        if self.batch_written < batch.len() {
            match self.file.write_all(&batch[self.batch_written..]) {
                Ok(()) => {
                    self.batch_written = batch.len();
                    self.unsynced_since.get_or_insert_with(Instant::now);
                    self.written.store(self.tail.next_seq - 1, Relaxed);
                    if self.index.as_mut().is_some_and(|i| !i.write()) {
                        tracing::warn!(segment = %self.tail.segment.display(), "cannot write the ledger's search index; searches read this segment's records one by one");
                        self.index = None;
                    }
                }
                Err(e) => return self.write_failed(&e, batch.len()),
            }
        }
        if self.batch_written == 0 {
            return;
        }
        let full = self.tail.segment_len + batch.len() as u64 >= self.opts.segment_bytes;
        let sync = match self.opts.durability {
            Durability::Strict => true,
            // Best effort, except for whoever waits for durability (a flush, shutdown). No
            // request waits on an `async` writer: requests wait for their record only when
            // the ledger was opened `strict` (`Shared::strict`; a reload changes neither).
            Durability::Async => sync_now,
            Durability::Batched => {
                sync_now
                    || full
                    || self
                        .unsynced_since
                        .is_some_and(|t| t.elapsed() >= BATCHED_SYNC_AFTER)
            }
        };
        if sync {
            if let Err(e) = self.sync_data().and_then(|_| self.settle_segments_dir()) {
                return self.write_failed(&e, batch.len());
            }
            self.release_cache(self.tail.segment_len + batch.len() as u64);
        } else if self.opts.durability == Durability::Batched {
            // Written, not yet due: the records stay in the batch until their `fdatasync`.
            return;
        }
        self.tail.segment_len += batch.len() as u64;
        batch.clear();
        self.batch_written = 0;
        self.unsynced_since = None;
        if !self.sync_lost && !self.healthy.swap(true, Relaxed) {
            tracing::info!("the audit ledger can write again");
        }
        if full {
            self.rotate();
        }
    }

    /// A write or `fdatasync` of the batch failed: cuts the file back to where the batch
    /// began (a partial write leaves a torn record, and after a failed `fdatasync` the kernel
    /// may have dropped the pages), so that the retry writes the whole batch again at a
    /// record boundary.
    fn write_failed(&mut self, e: &std::io::Error, bytes: usize) {
        self.cut_owed = self.cut_back().is_err();
        self.batch_written = 0;
        if self.healthy.swap(false, Relaxed) {
            tracing::error!(error = %e, bytes, "cannot write the audit ledger; keeping the records and retrying");
        }
    }

    /// Cuts the segment being written back to its last completed batch.
    fn cut_back(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_next_cut.swap(false, Relaxed) {
            return Err(std::io::Error::other("injected ftruncate failure"));
        }
        self.file.set_len(self.tail.segment_len)
    }

    /// Drops synced records from the page cache (`posix_fadvise(DONTNEED)`), once at least
    /// [`RELEASE_EVERY`] more bytes of them are there: records are written once and read back
    /// rarely (search reads the index, verify and export read sealed segments), so their pages
    /// are better spent elsewhere, and the pages the next batches are copied into are then ones
    /// the kernel has just freed rather than fresh ones. On a virtual machine a page not
    /// touched since boot costs the host a fault: on a fresh machine, copying the records into
    /// the page cache was 40 % of the writer thread's time under load (BENCHMARKS.md); the
    /// page cache also stops filling with records nobody reads. The kernel drops
    /// only pages (or large folios) wholly inside the range, so the one the next batch
    /// continues stays cached (or its write would first read it back from the disk); the range
    /// always starts at the segment's beginning, so that a page or folio left at the edge of
    /// one range goes with the next. Advice only: an error changes nothing that was written.
    fn release_cache(&mut self, synced_to: u64) {
        if synced_to < self.released_to + RELEASE_EVERY {
            return;
        }
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        {
            // Whole pages: a range that ends at the end of the file inside a page drops it.
            let page = rustix::param::page_size() as u64;
            let _ = rustix::fs::fadvise(
                &self.file,
                0,
                std::num::NonZeroU64::new(synced_to / page * page),
                rustix::fs::Advice::DontNeed,
            );
        }
        self.released_to = synced_to;
    }

    /// Records how many events were counted rather than queued while the writer was stuck
    /// ([`MAX_HELD`]), once it goes on: the gap is in the ledger, not only in the log.
    fn note_dropped(&mut self) {
        if self.heartbeat.dropped.load(Relaxed) == 0 || self.heartbeat.stalled.load(Relaxed) {
            return;
        }
        let n = self.heartbeat.dropped.swap(0, Relaxed);
        let message = format!("{n} audit events were not recorded: the ledger's writer was stuck (a disk that hangs?) while {MAX_HELD} events waited for it; requests on routes that fail open went on unrecorded meanwhile");
        tracing::error!("{message}");
        self.record_own(
            apiwarden_core::event::Outcome::Deny,
            apiwarden_core::event::Reason::AuditUnavailable,
            message,
        );
    }

    /// Queues a `system` event of the writer's own (retention, events not recorded), written
    /// with the next batch.
    fn record_own(
        &mut self,
        outcome: apiwarden_core::event::Outcome,
        reason: apiwarden_core::event::Reason,
        message: String,
    ) {
        let mut e = AuditEvent::new(
            apiwarden_core::event::EventKind::System,
            crate::ids::new_id(),
            self.opts.node.clone(),
        );
        e.decision.outcome = outcome;
        e.decision.reason = reason;
        e.message = Some(message);
        self.own.push(e);
    }

    /// Tells the watch ([`Heartbeat`]) that the writer is making progress: once a pass, and
    /// once a step of a long one (retention's segments).
    fn beat(&self) {
        self.heartbeat.passes.fetch_add(1, Relaxed);
    }

    /// Syncs the `segments` directory (a new segment's name).
    fn sync_segments_dir(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .fail_dir_syncs
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(std::io::Error::other("injected directory sync failure"));
        }
        sync_dir(&self.opts.dir.join("segments"))
    }

    /// A sync of the `segments` directory that a rotation owes, tried again: until it
    /// succeeds, the new segment's records are neither durable nor checkpointed.
    fn settle_segments_dir(&mut self) -> std::io::Result<()> {
        if self.segments_unsynced {
            self.sync_segments_dir()?;
            self.segments_unsynced = false;
        }
        Ok(())
    }

    /// `fdatasync` of the segment being written.
    fn sync_data(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        match self.hang_next_sync.swap(0, Relaxed) {
            0 => {}
            ms => std::thread::sleep(Duration::from_millis(ms)),
        }
        #[cfg(test)]
        let result = if self.fail_next_sync.swap(false, Relaxed) {
            Err(std::io::Error::other("injected fdatasync failure"))
        } else {
            self.file.sync_data()
        };
        #[cfg(not(test))]
        let result = self.file.sync_data();
        if let Err(e) = &result {
            // `strict` and `batched` keep every record not yet synced and write them again;
            // `async` has let go of those written since its last sync (see `sync_lost`).
            if self.opts.durability == Durability::Async && !self.sync_lost {
                self.sync_lost = true;
                self.healthy.store(false, Relaxed);
                tracing::error!(error = %e, "fdatasync of the audit ledger failed: records written since the last sync may be lost from the disk; no more checkpoints are signed and the ledger reports itself unhealthy until a restart reads back what the disk holds (then run `apiwarden audit verify`)");
            }
        }
        result
    }

    /// Closes the full segment (synced, then sealed: see [`Writer::seal`]) and begins the
    /// next one.
    fn rotate(&mut self) {
        // No seal, which is signed, over records that may be lost (`sync_lost`): the segment
        // keeps growing until a restart.
        if self.sync_lost
            || self
                .rotate_failed
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let next = segment_path(&self.opts.dir, self.tail.next_seq);
        match self
            .sync_data()
            .and_then(|_| self.seal())
            .and_then(|_| append_private(&next))
        {
            Ok(f) => {
                self.rotate_failed = None;
                self.segment_born = None;
                self.file = f;
                self.index = crate::ledger_index::SidecarWriter::create(&next, self.index_key);
                self.tail.segment = next;
                self.tail.segment_len = 0;
                self.released_to = 0;
                // The new segment's name durable before any record in it counts as durable.
                self.segments_unsynced = false;
                if let Err(e) = self.sync_segments_dir() {
                    tracing::error!(error = %e, "cannot sync the ledger's segments directory after beginning a new segment; its records are not durable until it can be");
                    self.segments_unsynced = true;
                }
            }
            Err(e) => {
                self.rotate_failed = Some(Instant::now());
                tracing::error!(error = %e, "cannot seal the ledger segment and begin a new one; the current one keeps growing")
            }
        }
    }

    /// Writes the seal of the segment being closed (`seals/<first seq>.seal`): the signed
    /// tree size, root, chain head and frontier after its last record, all synced already.
    /// Retention copies it to `retention` when it deletes this segment, and `audit verify`
    /// starts from there. No new segment is begun without it.
    fn seal(&self) -> std::io::Result<()> {
        let first = self
            .tail
            .segment
            .file_stem()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| std::io::Error::other("a segment name that is not a sequence number"))?;
        let note = anchor_note(
            &self.signer,
            &self.opts.origin,
            SEAL,
            &self.tail.tree,
            &self.tail.chain,
        )
        .map_err(std::io::Error::other)?;
        let seals = self.opts.dir.join("seals");
        private_dir(&seals)?;
        write_atomic(&seal_path(&self.opts.dir, first), note.as_bytes())?;
        sync_dir(&seals)
    }

    /// Seals the segment being written when its first record is older than
    /// `audit.segment_max_age`, so that retention can delete by age on a quiet node too.
    fn rotate_by_age(&mut self) {
        if self.tail.segment_len == 0 {
            return;
        }
        let born = *self
            .segment_born
            .get_or_insert_with(std::time::SystemTime::now);
        if born.elapsed().unwrap_or_default() >= self.opts.segment_max_age {
            self.rotate();
        }
    }

    /// Retention (`audit.retention`), at most every [`RETENTION_EVERY`]: deletes the oldest
    /// sealed segments, as long as each one's last write is older than the retention, a
    /// checkpoint already written covers its last record, and every required export cursor
    /// has passed it. Never the segment being written, only a prefix of the ledger. A
    /// retention anchor at the new start (signed now, from the verified seal of the last
    /// segment deleted) is written durably before anything is unlinked; then a `system` event
    /// (`ledger.retention`) records what was deleted.
    fn retain(&mut self) {
        let Some(retention) = self.opts.retention.clone() else {
            return;
        };
        if self
            .last_retention
            .is_some_and(|t| t.elapsed() < RETENTION_EVERY)
        {
            return;
        }
        self.last_retention = Some(Instant::now());
        if self
            .delete_failed
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < RETENTION_RETRY)
        {
            return;
        }
        let dir = self.opts.dir.clone();
        let dir = &dir;
        let segs = match segments(dir) {
            Ok(s) => s,
            Err(e) => return self.hold(format!("cannot list the segments: {e}")),
        };
        // Only sealed segments: never the one being written (the last).
        if segs.len() < 2 || segs.last().map(|(_, p)| p) != Some(&self.tail.segment) {
            return;
        }
        // Records an earlier retention already gave up (it was interrupted before unlinking
        // all of them) go whatever the conditions now.
        let given_up = read_anchor(dir, &self.verifiers)
            .ok()
            .flatten()
            .map_or(0, |a| a.size);
        // Never over a gap: what was deleted by other means stays evident.
        if segs[0].0 > given_up + 1 {
            return self.hold(format!(
                "the ledger starts at record {} but no retention anchor covers the records before; run `apiwarden audit verify`",
                segs[0].0
            ));
        }
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention.max_age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut exported = u64::MAX;
        let mut cursors = Vec::new();
        for name in &retention.requires_export {
            let at = cursor_path(dir, name);
            let seq = match std::fs::read_to_string(&at) {
                Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
                    tracing::warn!(cursor = %at.display(), "an export cursor that does not hold a sequence number counts as nothing exported");
                    0
                }),
                Err(_) => 0,
            };
            // No export reaches past the last record written: such a cursor was not written
            // by an export.
            if seq >= self.tail.next_seq {
                // Named in the reason segments are kept (logged once with it).
                exported = 0;
                cursors.push(format!(
                    "{name} at {seq}, past the last record, so it counts as nothing exported"
                ));
                continue;
            }
            exported = exported.min(seq);
            cursors.push(format!("{name} at {seq}"));
        }
        // The longest prefix that may go, as far as a pass looks ([`RETENTION_PASS`], the
        // deletions included: records wait meanwhile).
        let started = Instant::now();
        let mut deletable = 0;
        let mut why = None;
        for i in 0..segs.len() - 1 {
            if deletable > 0 && started.elapsed() >= RETENTION_PASS {
                break;
            }
            // A step of the pass: a pass over thousands of segments is long, not stuck.
            self.beat();
            let last = segs[i + 1].0 - 1;
            if last > given_up {
                // Its seal, signed when it was closed, must end where the next segment
                // begins: a segment missing in between is never deleted over. Its signed time
                // is the segment's age, never the file's modification time, which whoever can
                // write the directory can set (the time is in whole seconds: a second is
                // added, so that no segment goes early).
                let seal = std::fs::read_to_string(seal_path(dir, segs[i].0))
                    .ok()
                    .and_then(|n| parse_anchor(&n, &self.verifiers).ok())
                    .filter(|a| a.size == last);
                let Some(seal) = seal else {
                    why = Some(format!(
                        "segment {} has no valid seal ending at record {last} (seals/): run `apiwarden audit verify`; a restart seals a segment that has none",
                        segs[i].1.display()
                    ));
                    break;
                };
                let old = seal
                    .time
                    .as_deref()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .is_some_and(|t| t + Duration::from_secs(1) <= cutoff);
                if !old {
                    break;
                }
                if last > self.covered {
                    why = Some(format!("record {last} is not covered by a checkpoint yet"));
                    break;
                }
                let copied = self
                    .copier
                    .as_ref()
                    .map_or(self.covered, |c| c.copied.load(Relaxed));
                if last > copied {
                    why = Some(format!(
                        "record {last} is not covered by a checkpoint copied to `audit.checkpoint_copy` yet (the copy is {copied} records; see the log)"
                    ));
                    break;
                }
                if last > exported {
                    why = Some(format!(
                        "record {last} is not exported yet (cursors: {})",
                        cursors.join(", ")
                    ));
                    break;
                }
            }
            deletable = i + 1;
        }
        if deletable == 0 {
            if let Some(why) = why {
                self.hold(format!("segments past the retention are kept: {why}"));
            }
            return;
        }
        let boundary = segs[deletable].0 - 1;
        let mut anchor = None;
        if boundary > given_up {
            // The seal of the last segment to go gives the state there, signed when it was
            // closed; the anchor says, signed now, that retention deleted everything before.
            let seal = std::fs::read_to_string(seal_path(dir, segs[deletable - 1].0))
                .ok()
                .and_then(|n| parse_anchor(&n, &self.verifiers).ok())
                .filter(|a| a.size == boundary);
            let Some(seal) = seal else {
                return self.hold(format!(
                    "segment {} has no valid seal (seals/); restart the gateway to seal it",
                    segs[deletable - 1].1.display()
                ));
            };
            let note = match anchor_note(
                &self.signer,
                &self.opts.origin,
                RETENTION_ANCHOR,
                &seal.tree(),
                &seal.chain,
            ) {
                Ok(n) => n,
                Err(e) => return self.hold(format!("cannot sign the retention anchor: {e}")),
            };
            // Durable before anything is unlinked: a crash after it leaves a ledger that
            // verifies (and whose remaining records up to it go at the next pass).
            let at = anchor_path(dir);
            if let Err(e) = write_atomic(&at, note.as_bytes()).and_then(|_| sync_dir(dir)) {
                return self.hold(format!("cannot write the retention anchor: {e}"));
            }
            anchor = Some(seal);
        }
        self.retention_held = None;
        let mut names = Vec::new();
        let mut bytes = 0u64;
        let mut failed = None;
        for (_, path) in &segs[..deletable] {
            // A pass deletes for at most `RETENTION_PASS`, so that records go on being
            // written (`batched` syncs within milliseconds); the anchor already covers the rest,
            // which the next passes delete.
            if !names.is_empty() && started.elapsed() >= RETENTION_PASS {
                break;
            }
            self.beat();
            #[cfg(test)]
            std::thread::sleep(Duration::from_millis(self.slow_unlink.load(Relaxed)));
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if let Err(e) = std::fs::remove_file(path) {
                failed = Some((path.clone(), format!("{}: {e}", path.display())));
                break;
            }
            bytes += len;
            names.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            // The segment's search index goes with it.
            let _ = std::fs::remove_file(path.with_extension("idx"));
        }
        let _ = sync_dir(&dir.join("segments"));
        let first = segs[0].0;
        let deleted_to = segs[names.len()].0 - 1;
        // Seals before the new start are of no use any more.
        if let Ok(entries) = std::fs::read_dir(dir.join("seals")) {
            for entry in entries.flatten() {
                let stale = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".seal"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|f| f <= deleted_to);
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            let _ = sync_dir(&dir.join("seals"));
        }
        let (anchor_size, anchor_root) = match &anchor {
            Some(a) => (a.size, a.root),
            None => match read_anchor(dir, &self.verifiers) {
                Ok(Some(a)) => (a.size, a.root),
                _ => (given_up, [0; 32]),
            },
        };
        let mut message = if names.is_empty() {
            format!(
                "ledger retention wrote a retention anchor of {anchor_size} records but deleted nothing"
            )
        } else {
            format!(
                "ledger retention deleted records {first} to {deleted_to} ({} sealed segment{}: {}; {bytes} bytes), each last written more than {} ago and covered by a signed checkpoint of {} records{}; the ledger now starts at record {}, after the signed retention anchor of {anchor_size} records (root {})",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                names.join(", "),
                humantime::format_duration(retention.max_age),
                self.covered,
                if cursors.is_empty() {
                    String::new()
                } else {
                    format!(" and exported (cursors: {})", cursors.join(", "))
                },
                deleted_to + 1,
                B64.encode(anchor_root),
            )
        };
        if failed.is_none() && !names.is_empty() && names.len() < deletable {
            message.push_str(&format!(
                "; the segments up to record {boundary} go in the next passes"
            ));
        }
        // The same segment failing again, with nothing else done, was recorded already.
        let again = names.is_empty()
            && anchor.is_none()
            && failed.as_ref().map(|(p, _)| p) == self.delete_failed.as_ref().map(|(p, _)| p);
        self.delete_failed = failed.as_ref().map(|(p, _)| (p.clone(), Instant::now()));
        if let Some((_, f)) = &failed {
            message.push_str(&format!(
                "; stopped: cannot delete {f} (tried again in {})",
                humantime::format_duration(RETENTION_RETRY)
            ));
            if again {
                return;
            }
            tracing::error!("{message}");
        } else {
            tracing::info!("{message}");
        }
        self.record_own(
            apiwarden_core::event::Outcome::Allow,
            apiwarden_core::event::Reason::LedgerRetention,
            message,
        );
    }

    /// Waits (at most [`COPY_WAIT`]) for the checkpoint copy to catch up: a flush, and the
    /// writer's end, answer for the copy too, as long as its location answers.
    fn settle_copy(&self) {
        if let Some(c) = &self.copier {
            c.settle(COPY_WAIT);
        }
    }

    /// Logs why retention keeps segments it would delete, once per reason.
    fn hold(&mut self, why: String) {
        if self.retention_held.as_ref() != Some(&why) {
            tracing::warn!("audit ledger retention: {why}");
            self.retention_held = Some(why);
        }
    }

    /// Signs and writes a checkpoint of everything written (made durable first, whatever the
    /// durability mode: a checkpoint never covers records that could still be lost).
    fn checkpoint(&mut self) {
        self.last_checkpoint = Some(Instant::now());
        if self.sync_lost
            || self
                .sync_data()
                .and_then(|_| self.settle_segments_dir())
                .is_err()
        {
            return;
        }
        // Everything written is synced now (the writer checkpoints with an empty batch): in
        // `async`, whose only periodic sync this is, this is where its records leave the cache.
        self.release_cache(self.tail.segment_len);
        let cp = Checkpoint {
            origin: self.opts.origin.clone(),
            size: self.tail.tree.size(),
            root: self.tail.tree.root(),
            extensions: vec![format!(
                "time {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            )],
        };
        let note = match self.signer.sign(&cp) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a ledger checkpoint");
                return;
            }
        };
        let log = self.opts.dir.join("checkpoints.log");
        let line = serde_json::json!({ "note": note }).to_string() + "\n";
        let result = append_private(&log)
            .and_then(|mut f| {
                // A line written in part (the disk filled up) is taken back: the next one
                // would follow it on the same line, and `audit verify` refuse the log.
                let before = f.metadata()?.len();
                let written = f.write_all(line.as_bytes()).and_then(|_| f.sync_data());
                if written.is_err() {
                    let _ = f.set_len(before).and_then(|_| f.sync_data());
                }
                written
            })
            .and_then(|_| write_atomic(&self.opts.dir.join("checkpoint"), note.as_bytes()));
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write a ledger checkpoint");
            return;
        }
        self.covered = cp.size;
        if let Some(copier) = &self.copier {
            copier.offer(cp.size, note);
        }
        let state = serde_json::json!({
            "size": self.tail.tree.size(),
            "chain": B64.encode(self.tail.chain),
            "frontier": self.tail.tree.frontier().iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
        });
        let _ = write_atomic(&self.opts.dir.join("state"), state.to_string().as_bytes());
    }
}

/// Calls `f` with every record of the ledger in `dir`, in order (sequence number, payload),
/// one segment in memory at a time. Stops at the first damaged record with its error (a torn
/// tail included: readers never change files). For tools that read events (`access review`,
/// tests); `audit verify` checks far more.
pub fn read_records(dir: &Path, f: impl FnMut(u64, &[u8])) -> Result<u64, LedgerError> {
    read_records_from(dir, 0, f)
}

/// [`read_records`] of the records numbered `from` and above only: a segment whose successor
/// starts at or below `from` holds none of them and is not read at all (segments are named by
/// their first record, which `audit verify` checks), so an export that resumes at a cursor
/// reads what is new, not the whole ledger. Returns the number of records read (including
/// those below `from` in the first segment read).
pub fn read_records_from(
    dir: &Path,
    from: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<u64, LedgerError> {
    read_segments_from(dir, from, |seq, payload| {
        if seq >= from {
            f(seq, payload);
        }
    })
}

/// Calls `f` with every record of the segments that [`read_records_from`] reads, those below
/// `from` included, wherever they are: a check that must see a record out of place.
fn read_segments_from(
    dir: &Path,
    from: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<u64, LedgerError> {
    let mut count = 0;
    let segs = segments(dir)?;
    let last = segs.len().saturating_sub(1);
    let firsts: Vec<u64> = segs.iter().map(|(first, _)| *first).collect();
    for (i, (_, path)) in segs.into_iter().enumerate() {
        if firsts.get(i + 1).is_some_and(|&next| next <= from) {
            continue;
        }
        // The sequence number of the last whole record read, for an error's "after record N".
        let mut last_seq = firsts[i].saturating_sub(1);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(io(&path))?;
        let mut offset = 0;
        while offset < bytes.len() {
            let (fr, used) = match frame::decode(&bytes[offset..]) {
                Ok(r) => r,
                // The record the writer is writing at this moment.
                Err(FrameError::Truncated { .. }) if i == last => break,
                Err(error) => {
                    return Err(LedgerError::Corrupt {
                        segment: path.clone(),
                        after_seq: last_seq,
                        offset: offset as u64,
                        error,
                    })
                }
            };
            last_seq = fr.seq;
            f(fr.seq, fr.payload);
            count += 1;
            offset += used;
        }
    }
    Ok(count)
}

/// [`read_records`], with sealed records opened (`opener`: the ledger's data keys, from
/// `audit.encryption_key`). A sealed record without an opener is an error that says so.
pub fn read_plain(
    dir: &Path,
    opener: Option<&crate::ledger_crypt::Opener>,
    f: impl FnMut(u64, &[u8]),
) -> Result<u64, LedgerError> {
    read_plain_from(dir, opener, 0, f)
}

/// [`read_plain`] of the records numbered `from` and above (see [`read_records_from`]).
pub fn read_plain_from(
    dir: &Path,
    opener: Option<&crate::ledger_crypt::Opener>,
    from: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<u64, LedgerError> {
    let mut failed = None;
    let n = read_records_from(dir, from, |seq, payload| {
        if failed.is_some() {
            return;
        }
        match crate::ledger_crypt::open_with(opener, seq, payload) {
            Ok(plain) => f(seq, &plain),
            Err(e) => failed = Some(e),
        }
    })?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(n),
    }
}

/// Whether an event (as JSON) passes the search filters.
#[derive(Default, Clone)]
pub struct SearchFilter {
    pub consumer: Option<String>,
    pub key: Option<String>,
    pub ip: Option<String>,
    pub status: Option<u16>,
    pub decision: Option<String>,
    pub since: Option<std::time::SystemTime>,
    pub until: Option<std::time::SystemTime>,
    /// Only records after this sequence number (the next page of a search).
    pub after: Option<u64>,
}

impl SearchFilter {
    pub fn passes(&self, e: &serde_json::Value) -> bool {
        let is = |v: &serde_json::Value, want: &Option<String>| {
            want.as_ref().is_none_or(|w| v.as_str() == Some(w.as_str()))
        };
        if !(is(&e["identity"]["consumer"], &self.consumer)
            && is(&e["identity"]["key_id"], &self.key)
            && is(&e["client"]["ip"], &self.ip)
            && is(&e["decision"]["outcome"], &self.decision))
        {
            return false;
        }
        if self
            .status
            .is_some_and(|s| e["response"]["status"].as_u64() != Some(u64::from(s)))
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = e["time"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        true
    }
}

/// Every event of the ledger in `dir` as JSON (for tools and tests; see [`read_records`]).
pub fn read_events(dir: &Path) -> Result<Vec<serde_json::Value>, LedgerError> {
    let mut out = Vec::new();
    read_records(dir, |_, payload| {
        if let Ok(v) = serde_json::from_slice(payload) {
            out.push(v);
        }
    })?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use apiwarden_core::event::EventKind;

    fn options(dir: &Path) -> LedgerOptions {
        LedgerOptions {
            dir: dir.join("ledger"),
            durability: Durability::Batched,
            checkpoint_interval: Duration::from_millis(20),
            origin: "apiwarden/test".into(),
            copy_to: Some(dir.join("elsewhere")),
            segment_bytes: 16 * 1024,
            segment_max_age: SEGMENT_MAX_AGE,
            retention: None,
            node: "t".into(),
            encryption: None,
        }
    }

    /// Retention after `max_age`, waiting for the export cursors named.
    fn retention(max_age: Duration, requires_export: &[&str]) -> Option<Retention> {
        Some(Retention {
            max_age,
            requires_export: requires_export.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn event(i: usize) -> Box<AuditEvent> {
        let mut e = AuditEvent::new(EventKind::System, crate::ids::new_id(), Arc::from("t"));
        e.message = Some(format!("event {i}"));
        Box::new(e)
    }

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("aw-ledger-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn records_are_numbered_across_restarts_segments_and_checkpoints() {
        let dir = temp();
        for round in 0..2 {
            let opened = LedgerSink::open(options(&dir)).unwrap();
            assert_eq!(opened.records, round * 300);
            assert!(opened.cut.is_none());
            for i in 0..300 {
                opened.sink.record(event(i));
            }
            opened.sink.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            drop(opened);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut seqs = Vec::new();
        read_records(&dir.join("ledger"), |seq, _| seqs.push(seq)).unwrap();
        assert_eq!(seqs, (1..=600).collect::<Vec<u64>>());
        assert!(
            segments(&dir.join("ledger")).unwrap().len() > 2,
            "segments rotate"
        );
        // The latest checkpoint is signed, covers everything, and is copied elsewhere.
        let keys: Vec<apiwarden_core::ledger::note::Verifier> = verifier_keys(&dir.join("ledger"))
            .unwrap()
            .iter()
            .map(|k| apiwarden_core::ledger::note::Verifier::parse(k).unwrap())
            .collect();
        let note = std::fs::read_to_string(dir.join("elsewhere/checkpoint")).unwrap();
        let cp = apiwarden_core::ledger::note::verify(&note, &keys).unwrap();
        assert_eq!(cp.size, 600);
        let mut leaves = Vec::new();
        read_records(&dir.join("ledger"), |_, p| leaves.push(leaf_hash(p))).unwrap();
        assert_eq!(cp.root, apiwarden_core::ledger::merkle::root(&leaves));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Waits (up to 10 s) until `f` holds.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn firsts(ledger: &Path) -> Vec<u64> {
        segments(ledger).unwrap().iter().map(|(f, _)| *f).collect()
    }

    /// Records events, 40 to a batch (segments rotate between batches).
    async fn write_events(sink: &LedgerSink, range: std::ops::Range<usize>) {
        for i in range {
            sink.record(event(i));
            if i % 40 == 39 {
                sink.flush().await.unwrap();
            }
        }
        sink.flush().await.unwrap();
    }

    #[test]
    fn strict_answers_reach_a_worker_thread_through_its_relay() {
        let dir = temp();
        let mut opts = options(&dir);
        opts.durability = Durability::Strict;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opened = LedgerSink::open(opts).unwrap();
            start_durable_relay();
            assert!(RELAY.with(|r| r.borrow().is_some()));
            let waits: Vec<_> = (0..50)
                .map(|i| opened.sink.record_durable(&event(i)))
                .collect();
            let mut seqs = Vec::new();
            for w in waits {
                seqs.push(w.await.unwrap().unwrap());
            }
            assert_eq!(seqs, (1..=50).collect::<Vec<u64>>());
            // Answered means written: every one of them reads back.
            let mut on_disk = Vec::new();
            read_records(&dir.join("ledger"), |seq, _| on_disk.push(seq)).unwrap();
            assert_eq!(on_disk, seqs);
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn batched_writes_its_records_again_after_a_failed_fdatasync() {
        rewritten_after_a_failed_fdatasync(false).await;
    }

    #[tokio::test]
    async fn a_cut_back_that_failed_is_made_before_the_records_are_written_again() {
        rewritten_after_a_failed_fdatasync(true).await;
    }

    /// A `batched` ledger whose `fdatasync` fails once (and, with `cut_fails`, the cut-back
    /// after it too) ends with every record once, at the offsets its index names.
    async fn rewritten_after_a_failed_fdatasync(cut_fails: bool) {
        let dir = temp();
        let mut opts = options(&dir);
        opts.segment_bytes = 1 << 20;
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..50).await;
        // The next fdatasync fails after these records were written: the writer must cut
        // them out of the file and write them again, not keep a second copy nor lose them.
        FAIL_NEXT_CUT.with(|f| f.store(cut_fails, Relaxed));
        FAIL_NEXT_SYNC.with(|f| f.store(true, Relaxed));
        for i in 50..100 {
            opened.sink.record(event(i));
        }
        until("the injected failures happened", || {
            FAIL_NEXT_SYNC.with(|f| !f.load(Relaxed)) && FAIL_NEXT_CUT.with(|f| !f.load(Relaxed))
        })
        .await;
        opened.sink.flush().await.unwrap();
        assert!(
            opened.sink.healthy(),
            "healthy again once the rewrite was synced"
        );
        drop(opened);
        let ledger = dir.join("ledger");
        let mut seqs = Vec::new();
        let mut offsets = Vec::new();
        let mut offset = 0u64;
        read_records(&ledger, |seq, p| {
            seqs.push(seq);
            offsets.push((seq, offset));
            offset += (frame::OVERHEAD + p.len()) as u64;
        })
        .unwrap();
        assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
        // The search index names every record once, at its offset in the rewritten file.
        let segs = segments(&ledger).unwrap();
        assert_eq!(segs.len(), 1);
        let side = std::fs::read(crate::ledger_index::sidecar_path(&segs[0].1)).unwrap();
        let entries: Vec<(u64, u64)> = side[crate::ledger_index::HEADER_LEN..]
            .chunks_exact(crate::ledger_index::ENTRY_LEN)
            .map(|c| {
                let e = crate::ledger_index::Entry::decode(c.try_into().unwrap());
                (e.seq, u64::from(e.offset))
            })
            .collect();
        assert_eq!(entries, offsets);
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.records, 100);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The size of the latest checkpoint the ledger in `ledger` signed.
    fn checkpoint_size(ledger: &Path) -> u64 {
        std::fs::read_to_string(ledger.join("checkpoint"))
            .ok()
            .and_then(|n| n.lines().nth(1).and_then(|l| l.parse().ok()))
            .unwrap_or(0)
    }

    /// Regression (found by review): in `async`, a failed `fdatasync` was not remembered, so
    /// the next checkpoint vouched for records whose write-back had failed (the kernel reports
    /// such a failure once, and may have dropped the pages).
    #[tokio::test]
    async fn an_async_ledger_whose_fdatasync_failed_signs_no_more_checkpoints() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.durability = Durability::Async;
        opts.segment_bytes = 1 << 20;
        let opened = LedgerSink::open(opts.clone()).unwrap();
        write_events(&opened.sink, 0..50).await;
        until("a checkpoint of the first 50", || {
            checkpoint_size(&ledger) == 50
        })
        .await;
        FAIL_NEXT_SYNC.with(|f| f.store(true, Relaxed));
        for i in 50..100 {
            opened.sink.record(event(i));
        }
        until("the injected failure happened", || {
            FAIL_NEXT_SYNC.with(|f| !f.load(Relaxed))
        })
        .await;
        write_events(&opened.sink, 100..150).await;
        // Ten checkpoint intervals, and the syncs of two flushes that succeeded.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!opened.sink.healthy(), "unhealthy until a restart");
        assert!(
            checkpoint_size(&ledger) == 50,
            "no checkpoint covers records written after the failed sync: {}",
            checkpoint_size(&ledger)
        );
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A restart reads back what the disk holds (here, everything), and signs again.
        let opened = LedgerSink::open(opts).unwrap();
        assert_eq!(opened.records, 150);
        assert!(opened.sink.healthy());
        until("a checkpoint of all of them", || {
            checkpoint_size(&ledger) == 150
        })
        .await;
        assert_eq!(close_and_verify(opened, &dir).await, 150);
    }

    /// Regression (found by review): a writer stuck in a system call (a disk that hangs)
    /// left the ledger reporting itself healthy, so `/readyz` said ready and every `strict`
    /// request waited out its `strict_timeout`. A watch thread tells it now.
    #[tokio::test]
    async fn a_writer_stuck_in_a_sync_reports_the_ledger_unhealthy_until_it_goes_on() {
        let dir = temp();
        let mut opts = options(&dir);
        opts.segment_bytes = 1 << 20;
        HANG_NEXT_SYNC.with(|h| h.store(2500, Relaxed));
        let opened = LedgerSink::open(opts).unwrap();
        assert!(opened.sink.healthy());
        for i in 0..10 {
            opened.sink.record(event(i));
        }
        // The watch says so within a second and a fifth of the stall (`STALL_AFTER` is 1 s
        // in tests), and the writer goes on once the sync returns.
        until("the stall seen", || !opened.sink.healthy()).await;
        until("healthy again", || opened.sink.healthy()).await;
        assert_eq!(close_and_verify(opened, &dir).await, 10);
    }

    /// Regression (found by review): a failed sync of the `segments` directory after a
    /// rotation was ignored, so the new segment's records counted as durable, and were
    /// checkpointed, in a file whose name a power failure could lose. Until the directory
    /// syncs, the ledger cannot write: unhealthy, no checkpoint over the new segment.
    #[tokio::test]
    async fn a_new_segment_counts_only_once_its_directory_is_synced() {
        let dir = temp();
        let ledger = dir.join("ledger");
        FAIL_DIR_SYNCS.with(|f| f.store(u64::MAX, Relaxed));
        let opened = LedgerSink::open(options(&dir)).unwrap();
        for i in 0..100 {
            opened.sink.record(event(i));
        }
        until("a second segment", || firsts(&ledger).len() >= 2).await;
        // Records in the new segment.
        for i in 100..110 {
            opened.sink.record(event(i));
        }
        until("the ledger unhealthy", || !opened.sink.healthy()).await;
        let second = firsts(&ledger)[1];
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            checkpoint_size(&ledger) < second,
            "a checkpoint of {} over segment {second}",
            checkpoint_size(&ledger)
        );
        // The directory syncs again: the records are written, synced and checkpointed.
        FAIL_DIR_SYNCS.with(|f| f.store(0, Relaxed));
        opened.sink.flush().await.unwrap();
        until("healthy again", || opened.sink.healthy()).await;
        until("a checkpoint of all", || checkpoint_size(&ledger) >= 110).await;
        close_and_verify(opened, &dir).await;
    }

    /// Regression (found by review): while the writer was stuck, events queued without a
    /// bound (requests on routes that fail open go on), so a disk that hung for long enough
    /// took the process's memory. Past `MAX_HELD` (1 000 in tests) they are counted, and the
    /// count is recorded once the writer goes on.
    #[tokio::test]
    async fn events_beyond_a_bound_while_the_writer_is_stuck_are_counted_and_recorded() {
        let dir = temp();
        let mut opts = options(&dir);
        opts.segment_bytes = 1 << 20;
        HANG_NEXT_SYNC.with(|h| h.store(2500, Relaxed));
        let opened = LedgerSink::open(opts).unwrap();
        for i in 0..10 {
            opened.sink.record(event(i));
        }
        until("the stall seen", || !opened.sink.healthy()).await;
        for i in 0..MAX_HELD as usize + 500 {
            opened.sink.record(event(100 + i));
        }
        until("healthy again", || opened.sink.healthy()).await;
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ledger = dir.join("ledger");
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.records, 10 + MAX_HELD + 1);
        let events = read_events(&ledger).unwrap();
        let gap: Vec<_> = events
            .iter()
            .filter(|e| e["decision"]["reason"] == "audit.unavailable")
            .collect();
        assert_eq!(gap.len(), 1, "{gap:?}");
        assert_eq!(gap[0]["kind"], "system");
        let msg = gap[0]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("500 audit events were not recorded"),
            "{msg}"
        );
        // The first `MAX_HELD` queued while stuck are all there, in order.
        let kept: Vec<_> = events
            .iter()
            .filter_map(|e| {
                e["message"]
                    .as_str()?
                    .strip_prefix("event ")?
                    .parse::<usize>()
                    .ok()
            })
            .collect();
        let want: Vec<usize> = (0..10).chain(100..100 + MAX_HELD as usize).collect();
        assert_eq!(kept, want);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_request_waiting_for_its_record_is_answered_by_a_batched_writer() {
        // A reload can make a route `strict` while the writer was opened `batched`: the
        // waiting request gets its record synced at once, not refused.
        let dir = temp();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opened = LedgerSink::open(options(&dir)).unwrap();
            start_durable_relay();
            for round in 0..20 {
                // Records written but not yet synced sit in the batch when the request comes.
                opened.sink.record(event(round));
                tokio::time::sleep(Duration::from_millis(3)).await;
                let answer = opened.sink.record_durable(&event(round)).await.unwrap();
                assert!(answer.is_ok(), "round {round}: refused");
            }
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn synced_records_do_not_stay_in_the_page_cache() {
        // Written once, read back rarely: the pages of synced records are given back, all
        // but the last few. `fincore` (util-linux) counts what is cached. The data directory
        // is under target/, not /tmp: a tmpfs keeps every page it holds. `async` syncs only
        // for its checkpoints (every 20 ms here), and is not flushed: the checkpoint must
        // give its pages back.
        for durability in [Durability::Batched, Durability::Async] {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
                PathBuf::from,
            );
            let dir = target
                .join("test-data")
                .join(format!("aw-ledger-{}", crate::ids::new_id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut opts = options(&dir);
            opts.segment_bytes = 64 * 1024 * 1024;
            opts.durability = durability;
            let opened = LedgerSink::open(opts).unwrap();
            if durability == Durability::Async {
                for i in 0..12_000 {
                    opened.sink.record(event(i));
                }
                // The `state` is written after the checkpoint's sync and release.
                let state = dir.join("ledger/state");
                until("a checkpoint of every record", || {
                    std::fs::read(&state)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|v| v["size"] == 12_000)
                })
                .await;
            } else {
                write_events(&opened.sink, 0..12_000).await;
            }
            let segment = std::fs::read_dir(dir.join("ledger/segments"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "seg"))
                .unwrap();
            let size = std::fs::metadata(&segment).unwrap().len();
            assert!(
                size > 4 * RELEASE_EVERY,
                "{durability:?}: {size} bytes: too few records to tell"
            );
            let out = std::process::Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(&segment)
                .output()
                .expect("fincore (util-linux) must be installed");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let cached: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert!(
                cached <= RELEASE_EVERY + 4096,
                "{durability:?}: {cached} of the segment's {size} bytes are still cached"
            );
            drop(opened);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[tokio::test]
    async fn an_event_too_large_for_a_frame_is_recorded_as_a_stub_in_its_place() {
        let dir = temp();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        opened.sink.record(event(0));
        let mut big = event(1);
        big.message = Some("x".repeat(frame::MAX_RECORD + 10));
        let big_id = big.event_id;
        opened.sink.record(big);
        opened.sink.record(event(2));
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let events = read_events(&dir.join("ledger")).unwrap();
        assert_eq!(events.len(), 3);
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(events[1]["error"], "event too large to record");
        assert_eq!(events[1]["event_id"], big_id.to_string());
        assert!(events[1]["bytes"].as_u64().unwrap() > frame::MAX_RECORD as u64);
        assert_eq!(events[2]["message"], "event 2");
        // The stub's leaf hash was begun over its head (`{"seq":`) by the recording thread
        // and finished by the writer: the roots verify against the signed checkpoints.
        let report = crate::ledger_verify::verify(&dir.join("ledger"), None, &mut |_, _| {})
            .expect("the ledger with a stub verifies");
        assert_eq!(report.records, 3);
        assert_eq!(report.covered, 3);
        assert!(report.checkpoints_checked >= 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn reading_from_a_sequence_number_skips_the_segments_before_it() {
        let dir = temp();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        write_events(&opened.sink, 0..600).await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let ledger = dir.join("ledger");
        let firsts = firsts(&ledger);
        assert!(firsts.len() > 3, "{firsts:?}");
        // Damage the first segment's first record: a reader that opens it stops there.
        let (_, first_path) = &segments(&ledger).unwrap()[0];
        let mut bytes = std::fs::read(first_path).unwrap();
        bytes[frame::HEADER_LEN + 2] ^= 0x20;
        std::fs::write(first_path, &bytes).unwrap();
        assert!(matches!(
            read_records(&ledger, |_, _| {}),
            Err(LedgerError::Corrupt { after_seq: 0, .. })
        ));
        // From a record inside the third segment: the first two are never read.
        let from = firsts[2] + 1;
        let mut seqs = Vec::new();
        read_plain_from(&ledger, None, from, |seq, p| {
            assert!(std::str::from_utf8(p).unwrap().contains("event"));
            seqs.push(seq);
        })
        .unwrap();
        assert_eq!(seqs, (from..=600).collect::<Vec<u64>>());
        // Damage in the third segment's first record is reported after the record before it.
        let (_, third) = &segments(&ledger).unwrap()[2];
        let mut bytes = std::fs::read(third).unwrap();
        bytes[frame::HEADER_LEN + 2] ^= 0x20;
        std::fs::write(third, &bytes).unwrap();
        let err = read_plain_from(&ledger, None, from, |_, _| {}).unwrap_err();
        assert!(
            matches!(err, LedgerError::Corrupt { after_seq, .. } if after_seq == firsts[2] - 1),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn retention_deletes_only_an_old_covered_exported_prefix_after_its_anchor() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(500), &["siem"]);
        let opened = LedgerSink::open(opts.clone()).unwrap();
        write_events(&opened.sink, 0..400).await;
        let before = firsts(&ledger);
        assert!(before.len() >= 4, "{before:?}");
        // Sealed segments have their seal, signed, with the chain head and frontier.
        let verifiers = own_verifiers(&ledger);
        for w in before.windows(2) {
            let seal = std::fs::read_to_string(seal_path(&ledger, w[0])).unwrap();
            let a = parse_anchor(&seal, &verifiers).unwrap();
            assert_eq!((a.size, a.kind.as_str()), (w[1] - 1, SEAL));
        }
        // Old enough, covered, but never exported: kept.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(firsts(&ledger), before);
        assert!(!anchor_path(&ledger).exists());
        // Exported up to the end of the second segment (not quite to the end of the third):
        // the first two go, the anchor at their end first.
        std::fs::create_dir_all(ledger.join("cursors")).unwrap();
        std::fs::write(cursor_path(&ledger, "siem"), format!("{}\n", before[3] - 2)).unwrap();
        until("the first two segments deleted", || {
            firsts(&ledger)[0] == before[2]
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(firsts(&ledger), before[2..], "nothing past the cursor");
        let anchor = read_anchor(&ledger, &verifiers).unwrap().unwrap();
        assert_eq!(
            (anchor.size, anchor.kind.as_str()),
            (before[2] - 1, RETENTION_ANCHOR)
        );
        assert!(!seal_path(&ledger, before[0]).exists());
        assert!(!seal_path(&ledger, before[1]).exists());
        assert!(seal_path(&ledger, before[2]).exists());
        // The deletion is itself an event, naming the range.
        opened.sink.flush().await.unwrap();
        let events = read_events(&ledger).unwrap();
        let e = events
            .iter()
            .find(|e| e["decision"]["reason"] == "ledger.retention")
            .expect("a retention event");
        assert_eq!(e["kind"], "system");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("deleted records 1 to {}", before[2] - 1)),
            "{msg}"
        );
        assert!(msg.contains(&format!("{:020}.seg", before[1])), "{msg}");
        assert!(msg.contains("siem at"), "{msg}");
        // Verify starts at the boundary.
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        let b = report.retention.clone().expect("a retention boundary");
        assert_eq!(
            (b.anchor_size, b.first, b.leftover),
            (before[2] - 1, before[2], None)
        );
        assert!(b.checkpoints_skipped > 0);
        // Everything exported: every sealed segment goes, never the one being written.
        std::fs::write(
            cursor_path(&ledger, "siem"),
            format!("{}\n", report.records),
        )
        .unwrap();
        let last = *before.last().unwrap();
        until("all sealed segments deleted", || firsts(&ledger) == [last]).await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;

        // A start without the state file replays from the anchor; young segments stay.
        std::fs::remove_file(ledger.join("state")).unwrap();
        opts.retention = retention(Duration::from_secs(3600), &[]);
        let opened = LedgerSink::open(opts.clone()).unwrap();
        let records = opened.records;
        assert!(records >= 402, "{records}");
        write_events(&opened.sink, 400..700).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(firsts(&ledger)[0], last, "young segments are kept");
        assert!(firsts(&ledger).len() > 2);
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.records, records + 300);
        assert_eq!(report.retention.unwrap().first, last);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Regression (found by review): the watch counted the writer's passes only, so one long
    /// pass (retention deleting many segments, or a slow disk deleting a few) read as a writer
    /// stuck, and the ledger reported itself unhealthy (`503` on every route that fails
    /// closed) while it was working.
    #[tokio::test]
    async fn a_long_retention_pass_is_not_a_stuck_writer() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(300), &[]);
        opts.copy_to = None;
        // Each deletion takes 400 ms: the pass that deletes the sealed segments (a second or
        // so after they were sealed) takes 1.2 s or more, longer than `STALL_AFTER` (1 s in
        // tests).
        SLOW_UNLINK.with(|f| f.store(400, Relaxed));
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..400).await;
        let before = firsts(&ledger);
        assert!(before.len() >= 4, "{before:?}");
        let last = *before.last().unwrap();
        let t = Instant::now();
        let mut unhealthy = 0;
        // Records go on being written meanwhile: a pass deletes for at most 50 ms (one
        // segment, here), so no flush waits for all of them.
        let mut slowest = Duration::ZERO;
        let mut i = 1000;
        while firsts(&ledger)[0] < last {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "retention never ran: {:?}",
                firsts(&ledger)
            );
            if !opened.sink.healthy() {
                unhealthy += 1;
            }
            opened.sink.record(event(i));
            i += 1;
            let f = Instant::now();
            opened.sink.flush().await.unwrap();
            slowest = slowest.max(f.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            t.elapsed() >= Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            unhealthy, 0,
            "the ledger reported itself unhealthy while retention ran"
        );
        assert!(
            slowest < Duration::from_millis(900),
            "a flush waited {slowest:?}"
        );
        SLOW_UNLINK.with(|f| f.store(0, Relaxed));
        assert!(opened.sink.healthy());
        close_and_verify(opened, &dir).await;
    }

    #[tokio::test]
    async fn retention_waits_for_a_checkpoint_covering_the_segments() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(1), &[]);
        // No checkpoint can be written while its log is a directory.
        std::fs::create_dir_all(ledger.join("checkpoints.log")).unwrap();
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..300).await;
        assert!(firsts(&ledger).len() >= 3);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            firsts(&ledger)[0],
            1,
            "nothing deleted that no checkpoint covers"
        );
        assert!(!anchor_path(&ledger).exists());
        std::fs::remove_dir(ledger.join("checkpoints.log")).unwrap();
        until("deleted once covered", || firsts(&ledger)[0] > 1).await;
        close_and_verify(opened, &dir).await;
    }

    /// Regression (found by review): retention deleted segments while the checkpoint copy
    /// could not be written, so a rollback of what was left could no longer be shown against a
    /// copy held elsewhere.
    #[tokio::test]
    async fn retention_waits_for_the_checkpoint_copy() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(1), &[]);
        // No copy can be written while a file stands where its directory would be.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("blocker"), "a file").unwrap();
        opts.copy_to = Some(dir.join("blocker").join("copy"));
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..300).await;
        assert!(firsts(&ledger).len() >= 3);
        until("a checkpoint covering the sealed segments", || {
            std::fs::read_to_string(ledger.join("checkpoints.log"))
                .is_ok_and(|l| l.lines().count() > 2)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            firsts(&ledger)[0],
            1,
            "nothing deleted that no copied checkpoint covers"
        );
        assert!(!anchor_path(&ledger).exists());
        std::fs::remove_file(dir.join("blocker")).unwrap();
        until("deleted once copied", || firsts(&ledger)[0] > 1).await;
        assert!(dir.join("blocker/copy/checkpoint").exists());
        close_and_verify(opened, &dir).await;
    }

    /// Regression (found by review): the writer wrote the checkpoint copy itself, so a copy
    /// location that hung (a hard-mounted share gone away) stopped the ledger: no record
    /// written, no checkpoint signed, every `strict` request waiting. A FIFO where the copy's
    /// temporary file goes makes its open hang as such a share would.
    #[tokio::test]
    async fn a_checkpoint_copy_that_hangs_does_not_hold_the_ledger() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let copy_dir = dir.join("elsewhere");
        std::fs::create_dir_all(&copy_dir).unwrap();
        let fifo = copy_dir.join("checkpoint.tmp");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let opened = LedgerSink::open(options(&dir)).unwrap();
        for i in 0..100 {
            opened.sink.record(event(i));
        }
        until("a first checkpoint", || checkpoint_size(&ledger) == 100).await;
        // Its copy hangs; the ledger goes on.
        for i in 100..200 {
            opened.sink.record(event(i));
        }
        until("a checkpoint of all of them", || {
            checkpoint_size(&ledger) == 200
        })
        .await;
        assert!(!copy_dir.join("checkpoint").exists(), "the copy hangs");
        // The share comes back: the hung open returns (the FIFO gets a reader), and the
        // next copy finds the path free.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let reader = OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&fifo)
                .unwrap();
            std::fs::remove_file(&fifo).unwrap();
            drop(reader);
        }
        until("the copy caught up", || {
            std::fs::read_to_string(copy_dir.join("checkpoint"))
                .is_ok_and(|c| c.contains("\n200\n"))
        })
        .await;
        close_and_verify(opened, &dir).await;
    }

    /// Regression (found by review): the start read the checkpoint copy on its own thread, so
    /// a copy location that hung held the start without end. A FIFO with no writer in place
    /// of the copy makes its read hang as such a share would; the start goes on after
    /// `COPY_READ_WAIT` (1 s in tests), as with a copy that is missing.
    #[tokio::test]
    async fn a_checkpoint_copy_that_hangs_does_not_hold_the_start() {
        let dir = temp();
        record_and_close(options(&dir), 0..20).await;
        let copy = dir.join("elsewhere").join("checkpoint");
        std::fs::remove_file(&copy).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&copy)
            .status()
            .unwrap();
        assert!(made.success());
        let t = Instant::now();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        assert!(t.elapsed() >= COPY_READ_WAIT, "{:?}", t.elapsed());
        assert!(t.elapsed() < COPY_READ_WAIT * 4, "{:?}", t.elapsed());
        assert_eq!(opened.records, 20);
        // The copy it could not compare is kept aside, not overwritten (found by review: a
        // rolled-back ledger whose share was slow at its start overwrote the evidence).
        let elsewhere = dir.join("elsewhere");
        let aside = || {
            std::fs::read_dir(&elsewhere)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains("checkpoint.unchecked-"))
        };
        until(
            "the unchecked copy kept aside and a new one written",
            || aside().is_some() && std::fs::metadata(&copy).is_ok_and(|m| m.is_file()),
        )
        .await;
        let kept = aside().unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&kept).unwrap().file_type().is_fifo());
        // The share comes back: the hung read returns (the FIFO gets a writer, then none).
        {
            use std::os::unix::fs::OpenOptionsExt;
            let writer = OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&kept)
                .unwrap();
            std::fs::remove_file(&kept).unwrap();
            drop(writer);
        }
        close_and_verify(opened, &dir).await;
    }

    /// Regression (found by review): a segment retention could not delete was tried again,
    /// and recorded again, every second.
    #[tokio::test]
    async fn a_segment_retention_cannot_delete_is_recorded_once() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(1), &["siem"]);
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..300).await;
        let before = firsts(&ledger);
        assert!(before.len() >= 3, "{before:?}");
        // The first segment cannot be unlinked while a directory (not empty) has its name.
        let first = segments(&ledger).unwrap()[0].1.clone();
        let aside = dir.join("aside.seg");
        std::fs::rename(&first, &aside).unwrap();
        std::fs::create_dir_all(first.join("inside")).unwrap();
        std::fs::create_dir_all(ledger.join("cursors")).unwrap();
        std::fs::write(cursor_path(&ledger, "siem"), "300\n").unwrap();
        // Retention looks once a second: three looks.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(firsts(&ledger), before, "nothing deleted past it");
        std::fs::remove_dir_all(&first).unwrap();
        std::fs::rename(&aside, &first).unwrap();
        let events = read_events(&ledger).unwrap();
        let retention: Vec<&str> = events
            .iter()
            .filter(|e| e["decision"]["reason"] == "ledger.retention")
            .map(|e| e["message"].as_str().unwrap())
            .collect();
        assert_eq!(retention.len(), 1, "{retention:?}");
        assert!(
            retention[0].contains("cannot delete") && retention[0].contains("tried again in 1m"),
            "{}",
            retention[0]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Regression: retention took a segment's age from its file's modification time and an
    /// export cursor at its word, so whoever could write the data directory could make it
    /// delete every sealed segment (`touch -d 2000-01-01`, a cursor of u64::MAX), with a
    /// signed anchor after which `audit verify` passed.
    #[tokio::test]
    async fn retention_trusts_neither_file_times_nor_impossible_cursors() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_secs(3600), &[]);
        let opened = LedgerSink::open(opts.clone()).unwrap();
        write_events(&opened.sink, 0..300).await;
        assert!(firsts(&ledger).len() >= 3);
        let y2000 = std::time::UNIX_EPOCH + Duration::from_secs(946_684_800);
        for (_, p) in segments(&ledger).unwrap() {
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(y2000)
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(firsts(&ledger)[0], 1, "nothing deleted for a file's time");
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;

        opts.retention = retention(Duration::from_millis(1), &["siem"]);
        std::fs::create_dir_all(ledger.join("cursors")).unwrap();
        std::fs::write(cursor_path(&ledger, "siem"), format!("{}\n", u64::MAX)).unwrap();
        let opened = LedgerSink::open(opts.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            firsts(&ledger)[0],
            1,
            "nothing deleted for an impossible cursor"
        );
        // A cursor an export could have written: the segments it covers go.
        let before = firsts(&ledger);
        std::fs::write(cursor_path(&ledger, "siem"), format!("{}\n", before[1] - 1)).unwrap();
        until("the exported segment deleted", || {
            firsts(&ledger)[0] == before[1]
        })
        .await;
        close_and_verify(opened, &dir).await;
    }

    #[tokio::test]
    async fn retention_never_deletes_over_a_segment_deleted_by_hand() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(1), &["siem"]);
        let opened = LedgerSink::open(opts).unwrap();
        write_events(&opened.sink, 0..300).await;
        let before = firsts(&ledger);
        assert!(before.len() >= 4, "{before:?}");
        std::fs::remove_file(segment_path(&ledger, before[1])).unwrap();
        std::fs::create_dir_all(ledger.join("cursors")).unwrap();
        std::fs::write(cursor_path(&ledger, "siem"), "1000000\n").unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(firsts(&ledger)[0], 1, "the gap stays evident");
        assert!(!anchor_path(&ledger).exists());
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), "missing", "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_interrupted_retention_still_verifies_and_is_finished_at_the_next_start() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.retention = retention(Duration::from_millis(1), &["siem"]);
        let opened = LedgerSink::open(opts.clone()).unwrap();
        write_events(&opened.sink, 0..300).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = firsts(&ledger);
        assert!(before.len() >= 3, "{before:?}");
        // A copy before retention, to put into the state a crash would leave.
        let copy = dir.join("copy");
        copy_dir(&ledger, &copy);
        std::fs::create_dir_all(ledger.join("cursors")).unwrap();
        std::fs::write(cursor_path(&ledger, "siem"), format!("{}\n", before[2] - 1)).unwrap();
        let opened = LedgerSink::open(opts.clone()).unwrap();
        until("two segments deleted", || firsts(&ledger)[0] == before[2]).await;
        drop(opened);
        // The anchor written, nothing unlinked yet: every record is still checked, the anchor
        // too.
        std::fs::copy(anchor_path(&ledger), anchor_path(&copy)).unwrap();
        let report = crate::ledger_verify::verify(&copy, None, &mut |_, _| {}).unwrap();
        let b = report.retention.unwrap();
        assert!(b.anchor_checked);
        assert_eq!(b.leftover, Some((1, before[2] - 1)));
        // The first segment unlinked, not the second.
        std::fs::remove_file(segment_path(&copy, 1)).unwrap();
        let report = crate::ledger_verify::verify(&copy, None, &mut |_, _| {}).unwrap();
        let b = report.retention.unwrap();
        assert_eq!(b.leftover, Some((before[1], before[2] - 1)));
        assert!(!b.anchor_checked);
        // The next start finishes the job (whatever the cursors say now), from the anchor.
        std::fs::remove_file(copy.join("state")).unwrap();
        let mut copy_opts = opts.clone();
        copy_opts.dir = copy.clone();
        // Not the original's checkpoint copy: that one has moved on past this older copy
        // of the directory (and a start refuses a ledger behind its copy).
        copy_opts.copy_to = Some(dir.join("elsewhere-of-the-copy"));
        let opened = LedgerSink::open(copy_opts).unwrap();
        assert_eq!(opened.records, 300);
        until("the leftover segment deleted", || {
            firsts(&copy)[0] == before[2]
        })
        .await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = crate::ledger_verify::verify(&copy, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.retention.unwrap().leftover, None);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A copy of a ledger directory, for tests that damage one and compare (also used by
    /// `ledger_verify`'s tests).
    pub(crate) fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    /// Opens the ledger, records `events`, flushes, and closes it again.
    /// Closes the ledger of `dir` (its writer ends with a last checkpoint), checks that it
    /// verifies, and removes `dir`.
    /// Leaves the ledger's checkpoints (`checkpoints.log`, `checkpoint`) as they were when it
    /// held `to` records: an old copy of the directory.
    fn roll_back_checkpoints(ledger: &Path, to: u64) {
        let size = |note: &str| note.lines().nth(1).unwrap().parse::<u64>().unwrap();
        let log = std::fs::read_to_string(ledger.join("checkpoints.log")).unwrap();
        let mut kept = String::new();
        let mut last = None;
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let note = v["note"].as_str().unwrap().to_string();
            if size(&note) <= to {
                kept.push_str(line);
                kept.push('\n');
                last = Some(note);
            }
        }
        std::fs::write(ledger.join("checkpoints.log"), kept).unwrap();
        match last {
            Some(note) => std::fs::write(ledger.join("checkpoint"), note).unwrap(),
            None => std::fs::remove_file(ledger.join("checkpoint")).unwrap(),
        }
    }

    /// Regression (found by review): the floor below which a start never cuts or misses a
    /// record was the saved `state` or the checkpoint copy only. A crash between a checkpoint's
    /// line and the `state` after it (or a `state` put back) let a start go on from fewer
    /// records than a checkpoint on the same disk covers, and sign checkpoints that contradict
    /// it.
    #[tokio::test]
    async fn a_start_never_has_fewer_records_than_its_latest_checkpoint() {
        let dir = temp();
        let ledger = dir.join("ledger");
        let mut opts = options(&dir);
        opts.copy_to = None;
        record_and_close(opts.clone(), 0..10).await;
        let old_state = std::fs::read(ledger.join("state")).unwrap();
        record_and_close(opts.clone(), 10..20).await;
        let records = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {})
            .unwrap()
            .records;
        assert!(records >= 20, "{records}");
        std::fs::write(ledger.join("state"), &old_state).unwrap();
        // The last records gone, whole, past what the old state covers.
        let last = segments(&ledger).unwrap().last().unwrap().1.clone();
        let bytes = std::fs::read(&last).unwrap();
        let spans = frame::spans(&bytes).unwrap();
        let (seq, _, end) = spans[spans.len() - 4];
        std::fs::write(&last, &bytes[..end]).unwrap();
        let err = LedgerSink::open(opts.clone()).err().expect("refused");
        assert!(
            matches!(err, LedgerError::Missing { found, durable } if found == seq && durable >= records - 1),
            "{err}"
        );
        assert!(err.to_string().contains("checkpoint"), "{err}");
        assert_eq!(
            std::fs::read(&last).unwrap(),
            &bytes[..end],
            "nothing was cut"
        );
        // Nor when the log's last line is damaged and the checkpoint file gone: the lines
        // before it still count (found by review: only the last line was read).
        let log = ledger.join("checkpoints.log");
        let whole_log = std::fs::read(&log).unwrap();
        let mut damaged = whole_log.clone();
        damaged.extend_from_slice(b"{\"note\": \"not a checkpoint\"}\n");
        std::fs::write(&log, &damaged).unwrap();
        let checkpoint = std::fs::read(ledger.join("checkpoint")).unwrap();
        std::fs::remove_file(ledger.join("checkpoint")).unwrap();
        let err = LedgerSink::open(opts.clone()).err().expect("refused");
        assert!(
            matches!(err, LedgerError::Missing { found, durable } if found == seq && durable >= records - 1),
            "{err}"
        );
        std::fs::write(&log, &whole_log).unwrap();
        std::fs::write(ledger.join("checkpoint"), &checkpoint).unwrap();
        // Once the checkpoints are rolled back with it (a backup restored on purpose), it
        // starts.
        roll_back_checkpoints(&ledger, seq);
        let opened = LedgerSink::open(opts).unwrap();
        assert_eq!(opened.records, seq);
        close_and_verify(opened, &dir).await;
    }

    /// Flushes and closes the ledger, verifies it, removes `dir`: the records it holds.
    async fn close_and_verify(opened: Opened, dir: &Path) -> u64 {
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report =
            crate::ledger_verify::verify(&dir.join("ledger"), None, &mut |_, _| {}).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        report.records
    }

    async fn record_and_close(opts: LedgerOptions, events: std::ops::Range<usize>) {
        let opened = LedgerSink::open(opts).unwrap();
        for i in events {
            opened.sink.record(event(i));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_and_reported_and_damage_inside_stops_the_start() {
        let dir = temp();
        record_and_close(options(&dir), 0..10).await;
        let segs = segments(&dir.join("ledger")).unwrap();
        let last = &segs.last().unwrap().1;
        // A crash in the middle of a write: half a record at the end.
        let mut half = Vec::new();
        frame::encode(
            11,
            b"{\"seq\":11,\"message\":\"never finished\"}",
            &mut half,
        )
        .unwrap();
        half.truncate(half.len() / 2);
        OpenOptions::new()
            .append(true)
            .open(last)
            .unwrap()
            .write_all(&half)
            .unwrap();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        let cut = opened.cut.clone().expect("the torn record is reported");
        assert_eq!(cut.after_seq, 10);
        assert_eq!(cut.bytes, half.len() as u64);
        assert_eq!(opened.records, 10);
        opened.sink.record(event(11));
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(read_records(&dir.join("ledger"), |_, _| {}).unwrap(), 11);

        // One changed byte in the middle of the ledger: the start refuses, naming verify.
        let first = &segments(&dir.join("ledger")).unwrap()[0].1;
        let mut bytes = std::fs::read(first).unwrap();
        bytes[20] ^= 0x55;
        std::fs::write(first, &bytes).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains("audit verify"), "{text}");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Regression: a flipped bit in a record's length field made it look torn, and start-up
    /// cut it and every whole record after it; with the saved state, a record already
    /// checkpointed could be cut with no event at all, and a ledger shorter than its state, or
    /// than the checkpoint copy held elsewhere, started anyway, numbering records again.
    #[tokio::test]
    async fn damage_that_looks_torn_and_missing_records_stop_the_start() {
        let dir = temp();
        record_and_close(options(&dir), 0..10).await;
        let ledger = dir.join("ledger");
        let last = segments(&ledger).unwrap().last().unwrap().1.clone();
        let good = std::fs::read(&last).unwrap();
        let (_, start_of_4, _) = frame::spans(&good)
            .unwrap()
            .into_iter()
            .find(|f| f.0 == 4)
            .unwrap();
        // Record 4's length now points far past the end of the file.
        let mut flipped = good.clone();
        flipped[start_of_4 + 3] ^= 0x40;
        for state_kept in [true, false] {
            std::fs::write(&last, &flipped).unwrap();
            if !state_kept {
                std::fs::remove_file(ledger.join("state")).unwrap();
            }
            let err = LedgerSink::open(options(&dir)).err().expect("refused");
            assert!(
                matches!(err, LedgerError::Corrupt { after_seq: 3, .. }),
                "state kept {state_kept}: {err}"
            );
            assert_eq!(std::fs::read(&last).unwrap(), flipped, "nothing was cut");
        }
        std::fs::write(&last, &good).unwrap();
        // Whole records gone from the end, behind a state that covers them.
        let opened = LedgerSink::open(options(&dir)).unwrap();
        assert_eq!(opened.records, 10);
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let last = segments(&ledger).unwrap().last().unwrap().1.clone();
        let now = std::fs::read(&last).unwrap();
        let (_, _, end_of_7) = frame::spans(&now)
            .unwrap()
            .into_iter()
            .find(|f| f.0 == 7)
            .expect("record 7 is in the last segment");
        std::fs::write(&last, &now[..end_of_7]).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(err, LedgerError::Missing { found: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("audit verify"), "{err}");
        // The state and the checkpoints rolled back too (an old copy of the whole directory):
        // the checkpoint copy held elsewhere still covers ten records, so the start stops
        // rather than sign smaller checkpoints and overwrite that copy.
        std::fs::remove_file(ledger.join("state")).unwrap();
        roll_back_checkpoints(&ledger, 7);
        let held = dir.join("elsewhere").join("checkpoint");
        let copy = std::fs::read(&held).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(err, LedgerError::Missing { found: 7, .. }),
            "{err}"
        );
        // Refilled to the copy's size with other records: the roots differ.
        let mut without_copy = options(&dir);
        without_copy.copy_to = None;
        let opened = LedgerSink::open(without_copy).unwrap();
        assert_eq!(opened.records, 7);
        for i in 0..3 {
            opened.sink.record(event(100 + i));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(
                err,
                LedgerError::BehindCopy {
                    size: 10,
                    records: 10,
                    ..
                }
            ),
            "{err}"
        );
        // Refilled past the copy's size (found by review: the start compared sizes only, and
        // would have extended the changed history and overwritten the copy): the root at the
        // copy's size is not the copy's.
        let mut without_copy = options(&dir);
        without_copy.copy_to = None;
        let opened = LedgerSink::open(without_copy).unwrap();
        for i in 0..3 {
            opened.sink.record(event(200 + i));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(
                err,
                LedgerError::BehindCopy {
                    size: 10,
                    records: 13,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&held).unwrap(), copy, "the copy is kept");
        // New keys (the old ones deleted): the copy verifies with none of them.
        std::fs::remove_file(ledger.join("signing.key")).unwrap();
        std::fs::remove_dir_all(ledger.join("keys")).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(matches!(err, LedgerError::CopyUnverified { .. }), "{err}");
        assert_eq!(std::fs::read(&held).unwrap(), copy, "the copy is kept");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A ledger of 600 records, its checkpoint copy at 480 (inside a segment after the first),
    /// as a crash after that copy would leave it.
    async fn grown_past_its_copy(dir: &Path) {
        let copy = dir.join("elsewhere").join("checkpoint");
        record_and_close(options(dir), 0..450).await;
        let opened = LedgerSink::open(options(dir)).unwrap();
        write_events(&opened.sink, 450..480).await;
        until("a copy of 480 records", || {
            std::fs::read_to_string(&copy).is_ok_and(|c| c.contains("\n480\n"))
        })
        .await;
        let held = std::fs::read(&copy).unwrap();
        write_events(&opened.sink, 480..600).await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&copy, held).unwrap();
        // The copy's size is inside a segment after the first: its check starts at a seal.
        let firsts = firsts(&dir.join("ledger"));
        let holding = firsts.iter().rev().find(|&&f| f <= 480).copied();
        assert!(holding.is_some_and(|f| f > 1 && f < 480), "{firsts:?}");
    }

    /// A ledger grown past its checkpoint copy (records written after the last copy) starts:
    /// its root at the copy's size, hashed from the seal before it, is the copy's. Its saved
    /// state, if it no longer matches the records, gives way to them.
    #[tokio::test]
    async fn a_ledger_grown_past_its_copy_is_checked_from_a_seal_and_starts() {
        let dir = temp();
        let ledger = dir.join("ledger");
        grown_past_its_copy(&dir).await;
        // A saved state that no longer matches the records (its chain head from elsewhere).
        let state = std::fs::read_to_string(ledger.join("state")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
        v["chain"] = serde_json::Value::String(B64.encode([9u8; 32]));
        std::fs::write(ledger.join("state"), v.to_string()).unwrap();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        assert_eq!(opened.records, 600);
        for i in 600..610 {
            opened.sink.record(event(i));
        }
        assert_eq!(close_and_verify(opened, &dir).await, 610);
    }

    /// Regressions (found by review): the check of a ledger grown past its copy passed a
    /// record out of order in a segment the saved state covers (replay reads none of it), and
    /// passed by when no signed state was left to start from (seals and anchor removed).
    #[tokio::test]
    async fn a_ledger_grown_past_its_copy_out_of_order_or_unsealed_does_not_start() {
        let dir = temp();
        let ledger = dir.join("ledger");
        grown_past_its_copy(&dir).await;
        let segs = segments(&ledger).unwrap();
        let (_, path) = segs.iter().rev().find(|(f, _)| *f <= 500).unwrap().clone();
        let good = std::fs::read(&path).unwrap();
        let spans = frame::spans(&good).unwrap();
        let at = |seq: u64| *spans.iter().find(|f| f.0 == seq).unwrap();
        let ((_, s500, e500), (_, s501, e501)) = (at(500), at(501));
        assert_eq!(e500, s501);
        let mut swapped = good[..s500].to_vec();
        swapped.extend_from_slice(&good[s501..e501]);
        swapped.extend_from_slice(&good[s500..e500]);
        swapped.extend_from_slice(&good[e501..]);
        std::fs::write(&path, &swapped).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(
                err,
                LedgerError::Sequence {
                    expected: 500,
                    found: 501,
                    ..
                }
            ),
            "{err}"
        );
        // Record 1 again, in front of the segment's first record: the check skipped records
        // below where it starts hashing while it had hashed none (found by review).
        let first_segment = std::fs::read(&segs[0].1).unwrap();
        let (_, s1, e1) = *frame::spans(&first_segment)
            .unwrap()
            .iter()
            .find(|f| f.0 == 1)
            .unwrap();
        let mut in_front = first_segment[s1..e1].to_vec();
        in_front.extend_from_slice(&good);
        std::fs::write(&path, &in_front).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(err, LedgerError::Sequence { found, .. } if found != 501),
            "{err}"
        );
        std::fs::write(&path, &good).unwrap();
        // Record 1 again, after record 500: below where the check starts hashing (a seal
        // after record 1), it was skipped, and the ledger started (found by review).
        let first_segment = std::fs::read(&segs[0].1).unwrap();
        let (_, s1, e1) = *frame::spans(&first_segment)
            .unwrap()
            .iter()
            .find(|f| f.0 == 1)
            .unwrap();
        let mut inserted = good[..e500].to_vec();
        inserted.extend_from_slice(&first_segment[s1..e1]);
        inserted.extend_from_slice(&good[e500..]);
        std::fs::write(&path, &inserted).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(
                err,
                LedgerError::Sequence {
                    expected: 501,
                    found: 1,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(&path, &good).unwrap();
        // The first segment and every seal gone: nothing signed to start the check from.
        std::fs::remove_file(&segs[0].1).unwrap();
        std::fs::remove_dir_all(ledger.join("seals")).unwrap();
        let err = LedgerSink::open(options(&dir)).err().expect("refused");
        assert!(
            matches!(err, LedgerError::CopyUnchecked { size: 480, .. }),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn sealed_records_verify_without_the_key_and_read_with_it_across_key_rotations() {
        use crate::ledger_crypt::{rewrap, CryptError, Opener};
        let dir = temp();
        let master = [7u8; 32];
        let mut opts = options(&dir);
        opts.encryption = Some(master);
        for round in 0..2 {
            let opened = LedgerSink::open(opts.clone()).unwrap();
            for i in 0..100 {
                opened.sink.record(event(round * 100 + i));
            }
            opened.sink.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            drop(opened);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let ledger = dir.join("ledger");
        // Nothing readable on disk.
        for (_, seg) in segments(&ledger).unwrap() {
            let bytes = std::fs::read(seg).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("event 1") && !text.contains("\"kind\""));
        }
        // Verify needs no key.
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).expect("verifies");
        assert_eq!(report.records, 200);
        // Reading needs it: one data key per start, both opened.
        let opener = Opener::load(&ledger, &master).unwrap();
        let mut messages = Vec::new();
        read_plain(&ledger, Some(&opener), |_, p| {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap();
            messages.push(v["message"].as_str().unwrap().to_string());
        })
        .unwrap();
        assert_eq!(messages.len(), 200);
        assert_eq!(messages[150], "event 150");
        assert_eq!(
            std::fs::read_dir(ledger.join("datakeys")).unwrap().count(),
            2
        );
        assert!(matches!(
            read_plain(&ledger, None, |_, _| {}),
            Err(LedgerError::Crypt(CryptError::NoKey(1)))
        ));
        // Master key rotation: the new key opens, the old one no longer does.
        let new = [9u8; 32];
        assert_eq!(rewrap(&ledger, &master, &new).unwrap(), 2);
        // Run again (as after a rotation cut off half-way): the keys already under the new
        // master are left as they are; a third key opens none and stops it.
        assert_eq!(rewrap(&ledger, &master, &new).unwrap(), 0);
        assert!(matches!(
            rewrap(&ledger, &[3u8; 32], &[4u8; 32]),
            Err(CryptError::WrongMaster(_))
        ));
        assert!(matches!(
            Opener::load(&ledger, &master),
            Err(CryptError::WrongMaster(_))
        ));
        let opener = Opener::load(&ledger, &new).unwrap();
        assert_eq!(read_plain(&ledger, Some(&opener), |_, _| {}).unwrap(), 200);
        // Started with the old (now wrong) key: refused, and no data key made under it.
        let mut wrong = opts.clone();
        wrong.encryption = Some(master);
        let err = LedgerSink::open(wrong).err().expect("refused");
        assert!(matches!(err, LedgerError::WrongMasterKey(_)), "{err}");
        assert!(err.to_string().contains("audit rewrap"), "{err}");
        assert_eq!(
            std::fs::read_dir(ledger.join("datakeys")).unwrap().count(),
            2
        );
        assert!(Opener::load(&ledger, &new).is_ok(), "still one master key");
        // A sealed record moved or altered does not open.
        let mut sealed = None;
        read_records(&ledger, |seq, p| {
            if seq == 5 {
                sealed = Some(p.to_vec());
            }
        })
        .unwrap();
        let sealed = sealed.unwrap();
        assert!(opener.open(5, &sealed).is_ok());
        assert!(matches!(
            opener.open(6, &sealed),
            Err(CryptError::BadRecord(6))
        ));
        // A data key file lost: the records still verify, and verify names the key whose
        // records can no longer be read.
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        assert!(report.missing_data_keys.is_empty());
        let lost = std::fs::read_dir(ledger.join("datakeys"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::remove_file(&lost).unwrap();
        let report = crate::ledger_verify::verify(&ledger, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.missing_data_keys.len(), 1);
        assert_eq!(
            format!("{:08x}.key", report.missing_data_keys[0]),
            lost.file_name().unwrap().to_str().unwrap()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// One process writes a ledger at a time, and what it writes is its owner's only.
    #[tokio::test]
    async fn one_writer_holds_the_ledger_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp();
        let ledger = dir.join("ledger");
        let master = [7u8; 32];
        let mut opts = options(&dir);
        opts.encryption = Some(master);
        let opened = LedgerSink::open(opts.clone()).unwrap();
        for i in 0..300 {
            opened.sink.record(event(i));
        }
        opened.sink.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        // While the gateway writes: neither another writer nor a key rotation may begin.
        let err = DirLock::take(&ledger, Duration::ZERO).err().expect("held");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        let started = Instant::now();
        let err = crate::ledger_crypt::rewrap(&ledger, &master, &[9u8; 32])
            .expect_err("refused while the gateway writes");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        assert!(started.elapsed() >= LOCK_WAIT, "it waited for the writer");
        // Readers take no lock.
        assert_eq!(read_records(&ledger, |_, _| {}).unwrap(), 300);
        drop(opened);
        // The lock goes with the writer thread, once its last checkpoint is written.
        let lock = DirLock::take(&ledger, LOCK_WAIT).expect("released");
        drop(lock);
        assert_eq!(
            crate::ledger_crypt::rewrap(&ledger, &master, &[9u8; 32]).unwrap(),
            1
        );
        // Everything the ledger made, whatever the umask: records, index, seals, checkpoints,
        // state, keys, the lock, and the directories that hold them.
        let mut seen = Vec::new();
        let mut todo = vec![ledger.clone()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                let meta = entry.metadata().unwrap();
                let mode = meta.permissions().mode() & 0o777;
                let path = entry.path();
                if meta.is_dir() {
                    assert_eq!(mode, DIR_MODE, "{}", path.display());
                    todo.push(path.clone());
                } else {
                    assert_eq!(mode, FILE_MODE, "{}", path.display());
                }
                seen.push(path.strip_prefix(&ledger).unwrap().to_path_buf());
            }
        }
        assert_eq!(
            std::fs::metadata(&ledger).unwrap().permissions().mode() & 0o777,
            DIR_MODE
        );
        for want in [
            "lock",
            "signing.key",
            "state",
            "checkpoint",
            "checkpoints.log",
            "segments",
            "seals",
            "datakeys",
            "keys",
        ] {
            assert!(
                seen.iter().any(|p| p == Path::new(want)),
                "{want} in {seen:?}"
            );
        }
        // The checkpoint copy is for a monitor elsewhere: the umask decides its mode.
        let umask = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("elsewhere/checkpoint"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o666 & !umask
        );
        for ext in ["seg", "idx", "seal", "vkey", "key"] {
            assert!(
                seen.iter().any(|p| p.extension().is_some_and(|e| e == ext)),
                "a .{ext} file in {seen:?}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Regression (found by review): a checkpoint line written in part (a full disk, a crash)
    /// stayed in `checkpoints.log`, the next one followed it on the same line, and `audit
    /// verify` refused the intact ledger from then on.
    #[tokio::test]
    async fn a_checkpoint_line_written_in_part_is_cut_and_verify_passes() {
        let dir = temp();
        let ledger = dir.join("ledger");
        record_and_close(options(&dir), 0..50).await;
        drop(DirLock::take(&ledger, LOCK_WAIT).expect("the writer has ended"));
        let log = ledger.join("checkpoints.log");
        // The first half of a line, as a failed write leaves it.
        let text = std::fs::read_to_string(&log).unwrap();
        let line = text.lines().last().unwrap();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&line.as_bytes()[..line.len() / 2]).unwrap();
        drop(f);
        let verify = || crate::ledger_verify::verify(&ledger, None, &mut |_, _| {});
        verify().expect("a torn last line proves nothing and is passed over");
        // The next start cuts it; the checkpoints after it are whole lines of their own.
        record_and_close(options(&dir), 50..60).await;
        let _ = DirLock::take(&ledger, LOCK_WAIT).expect("the writer has ended");
        let report = verify().expect("verifies");
        assert_eq!(report.records, 60);
        let after = std::fs::read_to_string(&log).unwrap();
        assert!(after.starts_with(&text) && after.len() > text.len() && after.ends_with('\n'));
        for line in after.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole line");
            assert!(v["note"].is_string());
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
