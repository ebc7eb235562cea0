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
//!
//! On start the last segment is read to its end: a torn last record (a crash in the middle
//! of a write) is cut off and reported ([`Opened::cut`]), never silently; a bad record with
//! valid data after it stops the start (`apiwarden audit verify` says more).

use crate::audit::AuditSink;
use apiwarden_core::config::Durability;
use apiwarden_core::event::AuditEvent;
use apiwarden_core::ledger::frame::{self, FrameError, CHAIN_START};
use apiwarden_core::ledger::merkle::{leaf_hash, Hash, Tree};
use apiwarden_core::ledger::note::{Checkpoint, NoteSigner};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Segments are closed and a new one begun past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// How the ledger is set up.
#[derive(Clone, Debug)]
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
    /// The master key (`audit.encryption_key`): records are sealed under a new data key.
    pub encryption: Option<[u8; 32]>,
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
    #[error("the ledger signing key {0} is not a 32-byte Ed25519 seed; restore it, or move it away to start a new key (keep keys/ so old checkpoints stay verifiable)")]
    BadKey(PathBuf),
    #[error("the system random number generator failed")]
    Random,
    #[error("the ledger's checkpoint signing: {0}")]
    Note(String),
    #[error("{0}")]
    Crypt(#[from] crate::ledger_crypt::CryptError),
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

/// Writes a file atomically (temp file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
    std::fs::create_dir_all(&keys).map_err(io(&keys))?;
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
            std::fs::create_dir_all(dir).map_err(io(dir))?;
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
/// record. Without a usable state, or when it does not fit the segments, from the start.
fn replay(dir: &Path) -> Result<(Tail, Option<Cut>), LedgerError> {
    if let Some((size, chain, tree)) = saved_state(dir) {
        match replay_from(dir, size, chain, tree) {
            Ok(r) => return Ok(r),
            Err(LedgerError::Corrupt { .. }) | Err(LedgerError::Sequence { .. }) => {
                tracing::warn!(
                    "the ledger's saved state does not fit its segments; reading them all"
                );
            }
            Err(e) => return Err(e),
        }
    }
    replay_from(dir, 0, CHAIN_START, Tree::new())
}

/// `replay`, trusting `tree` and `chain` for the first `skip` records.
fn replay_from(
    dir: &Path,
    skip: u64,
    chain: Hash,
    tree: Tree,
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
                    if f.seq != next_seq {
                        return Err(LedgerError::Sequence {
                            segment: path.clone(),
                            expected: next_seq,
                            found: f.seq,
                        });
                    }
                    if f.seq > skip {
                        let leaf = leaf_hash(f.payload);
                        chain = frame::chain_next(&chain, &leaf);
                        tree.push(leaf);
                    }
                    next_seq += 1;
                    offset += used;
                }
                Err(error) => {
                    // A torn write: the damaged record runs to the end of the last segment.
                    let declared_end = declared_end(&bytes[offset..]);
                    let torn =
                        i == last_index && declared_end.is_none_or(|e| offset + e >= bytes.len());
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

/// The length a frame at the start of `buf` claims (header, payload, checksum), if its
/// header is there to say.
fn declared_end(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
    Some(frame::OVERHEAD + len)
}

enum Msg {
    Event(Box<AuditEvent>),
    /// An event whose sender waits until it is durable (`strict`).
    Durable(Box<AuditEvent>, oneshot::Sender<Result<u64, ()>>),
    Flush(oneshot::Sender<()>),
}

/// The ledger as the gateway's audit sink. Events are numbered, hashed and written by one
/// thread in batches; `batched` and `strict` make them durable (fdatasync) with every batch,
/// at least every 10 ms.
pub struct LedgerSink {
    tx: mpsc::UnboundedSender<Msg>,
    /// The writer thread, woken at once by a request waiting for its record (`strict`).
    writer: std::thread::Thread,
    healthy: Arc<AtomicBool>,
    /// Records written so far (for metrics and tests).
    pub written: Arc<AtomicU64>,
    dir: PathBuf,
}

impl LedgerSink {
    /// Opens (or creates) the ledger, replays it, and starts the writer thread.
    pub fn open(opts: LedgerOptions) -> Result<Opened, LedgerError> {
        let seg_dir = opts.dir.join("segments");
        std::fs::create_dir_all(&seg_dir).map_err(io(&seg_dir))?;
        let signer = signing_key(&opts.dir, &opts.origin)?;
        let sealer = match &opts.encryption {
            Some(master) => Some(crate::ledger_crypt::Sealer::new_data_key(
                &opts.dir, master,
            )?),
            None => None,
        };
        let (tail, cut) = replay(&opts.dir)?;
        let records = tail.next_seq - 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tail.segment)
            .map_err(io(&tail.segment))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let written = Arc::new(AtomicU64::new(records));
        let writer = Writer {
            opts: opts.clone(),
            signer,
            sealer,
            file,
            tail,
            healthy: healthy.clone(),
            written: written.clone(),
            last_checkpoint: None,
        };
        let thread = std::thread::Builder::new()
            .name("audit-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(io(&opts.dir))?;
        Ok(Opened {
            sink: LedgerSink {
                writer: thread.thread().clone(),
                tx,
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

impl AuditSink for LedgerSink {
    fn record(&self, event: Box<AuditEvent>) {
        if self.tx.send(Msg::Event(event)).is_err() {
            tracing::error!("the audit ledger writer has stopped; an event could not be recorded");
            self.healthy.store(false, Relaxed);
        }
    }

    fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Flush(tx));
        rx
    }

    fn record_durable(&self, event: Box<AuditEvent>) -> oneshot::Receiver<Result<u64, ()>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Msg::Durable(_, tx))) =
            self.tx.send(Msg::Durable(event, tx))
        {
            self.healthy.store(false, Relaxed);
            let _ = tx.send(Err(()));
        }
        // The request waits for this record: no polling delay on top of the write.
        self.writer.unpark();
        rx
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }
}

/// How long the writer sleeps when its queue is empty: polling, so that recording an event
/// never wakes a thread (a system call per event). A request that waits for its record
/// (`strict`) wakes the writer at once instead; records that arrive meanwhile share the
/// write and `fdatasync` (group commit).
const TICK: Duration = Duration::from_millis(2);

struct Writer {
    opts: LedgerOptions,
    signer: NoteSigner,
    sealer: Option<crate::ledger_crypt::Sealer>,
    file: File,
    tail: Tail,
    healthy: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    last_checkpoint: Option<Instant>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
        // Requests waiting for their record to be durable, with its sequence number: answered
        // together after the batch's one write and fdatasync (group commit).
        let mut durable: Vec<(u64, oneshot::Sender<Result<u64, ()>>)> = Vec::new();
        let mut batch: Vec<u8> = Vec::with_capacity(512 * 1024);
        let mut payload: Vec<u8> = Vec::with_capacity(4096);
        let mut sealed: Vec<u8> = Vec::with_capacity(4096);
        // Records encoded into `batch` but not yet written: their sequence numbers are
        // taken, so they must reach the file before anything after them.
        loop {
            let mut disconnected = false;
            loop {
                let msg = rx.try_recv();
                let (event, waiter) = match msg {
                    Ok(Msg::Event(e)) => (Some(e), None),
                    Ok(Msg::Durable(e, w)) => (Some(e), Some(w)),
                    Ok(Msg::Flush(done)) => {
                        waiting.push(done);
                        (None, None)
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                };
                if let Some(mut e) = event {
                    {
                        e.seq = self.tail.next_seq;
                        if let Some(w) = waiter {
                            durable.push((e.seq, w));
                        }
                        payload.clear();
                        e.write_json(&mut payload);
                        if let Some(sealer) = &self.sealer {
                            sealed.clear();
                            sealer.seal(e.seq, &payload, &mut sealed);
                            std::mem::swap(&mut payload, &mut sealed);
                        }
                        if frame::encode(e.seq, &payload, &mut batch).is_err() {
                            // An event over 1 MiB cannot be framed: record that it existed.
                            tracing::error!(
                                seq = e.seq,
                                bytes = payload.len(),
                                "an audit event is too large for the ledger; recording a stub"
                            );
                            payload.clear();
                            let stub = serde_json::json!({"seq": e.seq, "event_id": e.event_id, "error": "event too large to record", "bytes": payload.capacity()});
                            payload.extend_from_slice(stub.to_string().as_bytes());
                            let _ = frame::encode(e.seq, &payload, &mut batch);
                        }
                        let leaf = leaf_hash(&payload);
                        self.tail.chain = frame::chain_next(&self.tail.chain, &leaf);
                        self.tail.tree.push(leaf);
                        self.tail.next_seq += 1;
                        if batch.len() >= 512 * 1024 {
                            self.write(&mut batch);
                        }
                    }
                }
            }
            self.write(&mut batch);
            // Durable now (one fdatasync for all of them), or not: then the requests are
            // refused rather than forwarded unrecorded; their records stay queued.
            let ok = batch.is_empty();
            for (seq, w) in durable.drain(..) {
                let _ = w.send(if ok { Ok(seq) } else { Err(()) });
            }
            if batch.is_empty() {
                for w in waiting.drain(..) {
                    let _ = w.send(());
                }
                if disconnected
                    || self
                        .last_checkpoint
                        .is_none_or(|t| t.elapsed() >= self.opts.checkpoint_interval)
                {
                    self.checkpoint();
                }
            }
            if disconnected && batch.is_empty() {
                return;
            }
            std::thread::park_timeout(TICK);
        }
    }

    /// Writes the batch (and makes it durable unless `async`), then starts a new segment if
    /// this one is full. On failure the batch is kept and tried again on the next tick.
    fn write(&mut self, batch: &mut Vec<u8>) {
        if batch.is_empty() {
            return;
        }
        let result = self.file.write_all(batch).and_then(|_| {
            if self.opts.durability != Durability::Async {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.tail.segment_len += batch.len() as u64;
                batch.clear();
                self.written.store(self.tail.next_seq - 1, Relaxed);
                if !self.healthy.swap(true, Relaxed) {
                    tracing::info!("the audit ledger can write again");
                }
                if self.tail.segment_len >= self.opts.segment_bytes {
                    self.rotate();
                }
            }
            Err(e) => {
                // A partial write leaves a torn record: cut the file back to what is whole,
                // so the retry starts at a record boundary.
                let _ = self.file.set_len(self.tail.segment_len);
                if self.healthy.swap(false, Relaxed) {
                    tracing::error!(error = %e, bytes = batch.len(), "cannot write the audit ledger; keeping the records and retrying");
                }
            }
        }
    }

    /// Closes the full segment and begins the next one.
    fn rotate(&mut self) {
        let next = segment_path(&self.opts.dir, self.tail.next_seq);
        match self
            .file
            .sync_all()
            .and_then(|_| OpenOptions::new().create(true).append(true).open(&next))
        {
            Ok(f) => {
                self.file = f;
                self.tail.segment = next;
                self.tail.segment_len = 0;
                if let Ok(d) = File::open(self.opts.dir.join("segments")) {
                    let _ = d.sync_all();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot begin a new ledger segment; the current one keeps growing")
            }
        }
    }

    /// Signs and writes a checkpoint of everything written (made durable first, whatever the
    /// durability mode: a checkpoint never covers records that could still be lost).
    fn checkpoint(&mut self) {
        self.last_checkpoint = Some(Instant::now());
        if self.file.sync_data().is_err() {
            return;
        }
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
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()))
            .and_then(|_| write_atomic(&self.opts.dir.join("checkpoint"), note.as_bytes()));
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write a ledger checkpoint");
            return;
        }
        if let Some(copy) = &self.opts.copy_to {
            let r = std::fs::create_dir_all(copy)
                .and_then(|_| write_atomic(&copy.join("checkpoint"), note.as_bytes()));
            if let Err(e) = r {
                tracing::warn!(error = %e, dir = %copy.display(), "cannot copy the ledger checkpoint to its second location");
            }
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
pub fn read_records(dir: &Path, mut f: impl FnMut(u64, &[u8])) -> Result<u64, LedgerError> {
    let mut count = 0;
    let segs = segments(dir)?;
    let last = segs.len().saturating_sub(1);
    for (i, (_, path)) in segs.into_iter().enumerate() {
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
                        after_seq: count,
                        offset: offset as u64,
                        error,
                    })
                }
            };
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
    mut f: impl FnMut(u64, &[u8]),
) -> Result<u64, LedgerError> {
    let mut failed = None;
    let n = read_records(dir, |seq, payload| {
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
#[derive(Default)]
pub struct SearchFilter {
    pub consumer: Option<String>,
    pub key: Option<String>,
    pub ip: Option<String>,
    pub status: Option<u16>,
    pub decision: Option<String>,
    pub since: Option<std::time::SystemTime>,
    pub until: Option<std::time::SystemTime>,
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
mod tests {
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
            encryption: None,
        }
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

    #[tokio::test]
    async fn a_torn_last_record_is_cut_and_reported_and_damage_inside_stops_the_start() {
        let dir = temp();
        let opened = LedgerSink::open(options(&dir)).unwrap();
        for i in 0..10 {
            opened.sink.record(event(i));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
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
        assert!(matches!(
            Opener::load(&ledger, &master),
            Err(CryptError::WrongMaster(_))
        ));
        let opener = Opener::load(&ledger, &new).unwrap();
        assert_eq!(read_plain(&ledger, Some(&opener), |_, _| {}).unwrap(), 200);
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
        let _ = std::fs::remove_dir_all(dir);
    }
}
