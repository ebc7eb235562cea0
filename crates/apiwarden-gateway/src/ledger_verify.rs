//! `apiwarden audit verify`, `prove`, `consistency` and `verify-proof`: read-only checks of a
//! ledger written by [`crate::ledger`] (its layout is documented there).
//!
//! [`verify`] streams every segment once, in order, keeping O(log n) memory (the Merkle
//! frontier and the chain head, plus a few batches of records whose leaf hashes are computed on
//! one thread per core: [`scan_leaves`]): framing and checksums, segment names against their first
//! record, sequence continuity from 1, the hash chain against the `state` file, the Merkle
//! root at the size of every checkpoint in `checkpoints.log` and `checkpoint` (each signature
//! verified first, against `keys/*.vkey`), and optionally a checkpoint held elsewhere. It
//! never changes a file: a torn last record that the gateway would cut on its next start is
//! reported too.
//!
//! After retention deleted the oldest segments, the first segment starts at record S > 1: the
//! signed retention anchor (`retention`, see [`ledger::Anchor`]) must then cover exactly
//! records 1 to S-1 (or more, when a retention was interrupted before unlinking all it had
//! given up), and the chain and the tree start from its chain head and Merkle frontier.
//! Checkpoints of fewer records are skipped and counted; a held checkpoint of fewer records
//! cannot be checked ([`VerifyError::PredatesRetention`]).
//!
//! [`prove`] and [`consistency`] keep the leaf hashes (32 bytes a record) of the records a
//! checkpoint covers (after retention: of the records kept, with the anchor's frontier standing
//! for the rest) and print RFC 6962 proofs; [`verify_proof`] checks either kind of proof with
//! nothing but the public key(s).

use crate::ledger;
use apiwarden_core::ledger::frame::{self, FrameError, CHAIN_START, HEADER_LEN};
use apiwarden_core::ledger::merkle::{
    leaf_hash, verify_consistency, verify_inclusion, Hash, Pruned, Tree, EMPTY_ROOT,
};
use apiwarden_core::ledger::note::{self, Checkpoint, Verifier};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a ledger or a proof does not verify. [`VerifyError::exit_code`] is 1 for evidence of
/// tampering or damage, 2 for usage and I/O errors.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A record's framing or checksum is wrong: its bytes were altered or damaged.
    #[error("{segment}: the record after sequence {after_seq} (byte {offset} of the segment) was modified or damaged: {reason}")]
    Modified {
        segment: String,
        after_seq: u64,
        offset: u64,
        reason: String,
    },
    /// A gap in the sequence numbers.
    #[error("{segment}: {}", missing(*expected, *found))]
    Missing {
        segment: String,
        expected: u64,
        found: u64,
    },
    /// A record number lower than one already seen, or a record that appears later than it
    /// belongs.
    #[error("{segment}: record {seq} comes after record {after}: records were reordered (or duplicated)")]
    Reordered {
        segment: String,
        seq: u64,
        after: u64,
    },
    /// A segment's name does not give the number of its first record.
    #[error("{segment}: the segment is named for record {named} but starts with record {first}: segments were renamed or records moved")]
    Misnamed {
        segment: String,
        named: u64,
        first: u64,
    },
    /// The records are well-formed and in sequence, but the Merkle root at a checkpoint
    /// differs: records were inserted, removed or changed and the chain recomputed.
    #[error("{segment}: the Merkle root of the first {size} records does not match {checkpoint}: records before sequence {} (between {from} and {size}) were changed, inserted or removed and their chain recomputed", size + 1)]
    RootMismatch {
        segment: String,
        checkpoint: String,
        /// The checkpoint's size.
        size: u64,
        /// The first record not covered by a checkpoint that matched.
        from: u64,
    },
    /// The chain head recorded in `state` does not match the records.
    #[error("{segment}: the hash chain after record {at} does not match the chain head recorded in the ledger's state file: records up to {at} were changed, inserted or removed")]
    ChainMismatch { segment: String, at: u64 },
    /// A checkpoint of the ledger itself covers more records than the ledger holds.
    #[error("{segment}: the ledger ends at record {records} but {checkpoint} covers {covers}: records were cut off")]
    Truncated {
        segment: String,
        records: u64,
        checkpoint: String,
        covers: u64,
    },
    /// A checkpoint's signature does not verify, or it is not a signed checkpoint at all.
    #[error("{checkpoint}: {reason}")]
    BadSignature { checkpoint: String, reason: String },
    /// The ledger and its own checkpoints are consistent but shorter than a checkpoint held
    /// elsewhere.
    #[error("the ledger was rolled back: it ends at record {records} (and its own checkpoints agree) but {checkpoint} covers {covers}: the whole ledger was replaced by an earlier copy, and records {} to {covers} are gone", records + 1)]
    RolledBack {
        checkpoint: String,
        records: u64,
        covers: u64,
    },
    /// The first segment starts after record 1 and no retention anchor accounts for the
    /// records before it (or the anchor stops short of them).
    #[error("{segment}: the ledger starts at record {first}, but {why}: records {from} to {} are missing — they were deleted outside of retention, or the retention anchor was replaced", first - 1)]
    PrefixMissing {
        segment: String,
        first: u64,
        /// The first record missing.
        from: u64,
        why: String,
    },
    /// The retention anchor (`retention`) is signed but not a usable anchor.
    #[error("the retention anchor (retention): {reason}")]
    BadAnchor { reason: String },
    /// A record that retention deleted (`prove`).
    #[error("record {seq} was deleted by retention (the ledger starts at record {first}; the retention anchor covers records 1 to {})", first - 1)]
    Deleted { seq: u64, first: u64 },
    /// A checkpoint smaller than the retention boundary: its root cannot be recomputed.
    #[error("{checkpoint} covers {size} records, which predates the retention boundary: records 1 to {boundary} were deleted by retention, so its root can no longer be recomputed; give a checkpoint of {boundary} records or more (the latest copy that audit.checkpoint_copy keeps will do)")]
    PredatesRetention {
        checkpoint: String,
        size: u64,
        boundary: u64,
    },
    /// A proof does not verify.
    #[error("the proof does not verify: {0}")]
    BadProof(String),
    /// No checkpoint covers the record to prove yet.
    #[error("record {seq} is not covered by a checkpoint yet (the latest covers {latest} records): wait for the next checkpoint (audit.checkpoint_interval) and try again")]
    NotCovered { seq: u64, latest: u64 },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl VerifyError {
    /// 1 for a ledger or proof that does not verify, 2 for usage and I/O errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            VerifyError::Io { .. }
            | VerifyError::Usage(_)
            | VerifyError::NotCovered { .. }
            | VerifyError::Deleted { .. }
            | VerifyError::PredatesRetention { .. } => 2,
            _ => 1,
        }
    }

    /// A short name of what is wrong, for `--json`.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::Modified { .. } => "modified",
            VerifyError::Missing { .. } => "missing",
            VerifyError::Reordered { .. } => "reordered",
            VerifyError::Misnamed { .. } => "misnamed",
            VerifyError::RootMismatch { .. } => "inserted",
            VerifyError::ChainMismatch { .. } => "chain",
            VerifyError::Truncated { .. } => "truncated",
            VerifyError::BadSignature { .. } => "bad_signature",
            VerifyError::RolledBack { .. } => "rolled_back",
            VerifyError::PrefixMissing { .. } => "missing",
            VerifyError::BadAnchor { .. } => "bad_anchor",
            VerifyError::Deleted { .. } => "deleted",
            VerifyError::PredatesRetention { .. } => "predates_retention",
            VerifyError::BadProof(_) => "bad_proof",
            VerifyError::NotCovered { .. } => "not_covered",
            VerifyError::Io { .. } => "io",
            VerifyError::Usage(_) => "usage",
        }
    }

    /// The segment file named by the error, if any.
    pub fn segment(&self) -> Option<&str> {
        match self {
            VerifyError::Modified { segment, .. }
            | VerifyError::Missing { segment, .. }
            | VerifyError::Reordered { segment, .. }
            | VerifyError::Misnamed { segment, .. }
            | VerifyError::RootMismatch { segment, .. }
            | VerifyError::ChainMismatch { segment, .. }
            | VerifyError::Truncated { segment, .. }
            | VerifyError::PrefixMissing { segment, .. } => Some(segment),
            _ => None,
        }
    }

    /// The first sequence number the error is about, if any.
    pub fn seq(&self) -> Option<u64> {
        match self {
            VerifyError::Modified { after_seq, .. } => Some(after_seq + 1),
            VerifyError::Missing { expected, .. } => Some(*expected),
            VerifyError::Reordered { seq, .. } => Some(*seq),
            VerifyError::Misnamed { named, .. } => Some(*named),
            VerifyError::RootMismatch { from, .. } => Some(*from),
            VerifyError::ChainMismatch { at, .. } => Some(*at),
            VerifyError::Truncated { records, .. } | VerifyError::RolledBack { records, .. } => {
                Some(records + 1)
            }
            VerifyError::NotCovered { seq, .. } | VerifyError::Deleted { seq, .. } => Some(*seq),
            VerifyError::PrefixMissing { from, .. } => Some(*from),
            _ => None,
        }
    }

    /// The error as one JSON object (`--json`).
    pub fn to_json(&self) -> Value {
        json!({
            "status": if self.exit_code() == 1 { "tampered" } else { "error" },
            "kind": self.kind(),
            "segment": self.segment(),
            "seq": self.seq(),
            "message": self.to_string(),
        })
    }
}

fn missing(expected: u64, found: u64) -> String {
    let what = if found - expected == 1 {
        format!("record {expected} was deleted")
    } else {
        format!("records {expected} to {} were deleted", found - 1)
    };
    format!(
        "record {expected} is missing: the ledger goes from record {} to record {found}; {what}",
        expected - 1
    )
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> VerifyError + '_ {
    move |error| VerifyError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn from_ledger(e: ledger::LedgerError) -> VerifyError {
    match e {
        ledger::LedgerError::Io { path, error } => VerifyError::Io { path, error },
        other => VerifyError::Usage(other.to_string()),
    }
}

/// What a clean verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Records in the ledger.
    pub records: u64,
    pub segments: usize,
    /// Bytes of segments read.
    pub bytes: u64,
    /// Signed checkpoints whose root was checked (from `checkpoints.log`, `checkpoint` and the
    /// held one).
    pub checkpoints_checked: usize,
    /// The Merkle root of all the records.
    pub last_root: Hash,
    /// The size of the largest checkpoint: records after it are not yet covered by one.
    pub covered: u64,
    /// The size of the held checkpoint the ledger was found consistent with.
    pub held: Option<u64>,
    /// Where the hash chain was checked against the `state` file.
    pub chain_checked_at: Option<u64>,
    /// Where retention left the ledger, when it deleted records.
    pub retention: Option<Boundary>,
    /// Data keys that sealed records name but `datakeys/` does not hold: those records are
    /// intact but can never be read (encryption at rest).
    pub missing_data_keys: Vec<u32>,
}

/// The retention boundary the ledger starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boundary {
    /// Records 1 to `anchor_size` were deleted by retention; the signed retention anchor
    /// holds the tree and chain after record `anchor_size`.
    pub anchor_size: u64,
    pub anchor_root: Hash,
    /// When the anchor was signed (its `time` line).
    pub anchor_time: Option<String>,
    /// The first record kept (the first segment's first record).
    pub first: u64,
    /// Records still on disk that the anchor already covers (a retention interrupted before
    /// it unlinked them all; the gateway deletes them on its next pass): their framing and
    /// sequence were checked, not their hashes.
    pub leftover: Option<(u64, u64)>,
    /// Checkpoints of fewer records than the anchor: their roots cannot be recomputed, so
    /// they were skipped (they are counted here, not in `checkpoints_checked`).
    pub checkpoints_skipped: usize,
    /// Whether the anchor was checked against the records themselves (the ledger still
    /// starts at record 1: a retention interrupted before it unlinked anything).
    pub anchor_checked: bool,
}

impl Report {
    /// The report as one JSON object (`--json`).
    pub fn to_json(&self) -> Value {
        json!({
            "status": "intact",
            "records": self.records,
            "segments": self.segments,
            "bytes": self.bytes,
            "checkpoints_checked": self.checkpoints_checked,
            "root": B64.encode(self.last_root),
            "covered": self.covered,
            "held": self.held,
            "chain_checked_at": self.chain_checked_at,
            "missing_data_keys": self.missing_data_keys.iter().map(|id| format!("{id:08x}")).collect::<Vec<_>>(),
            "retention": self.retention.as_ref().map(|b| json!({
                "deleted_through": b.anchor_size,
                "first_record": b.first,
                "anchor_size": b.anchor_size,
                "anchor_root": B64.encode(b.anchor_root),
                "anchor_time": b.anchor_time,
                "leftover": b.leftover.map(|(from, to)| json!([from, to])),
                "checkpoints_skipped": b.checkpoints_skipped,
            })),
        })
    }
}

/// The ledger's public keys (`keys/*.vkey`), parsed.
pub fn ledger_verifiers(dir: &Path) -> Result<Vec<Verifier>, VerifyError> {
    if !dir.is_dir() {
        return Err(VerifyError::Usage(format!(
            "there is no audit ledger at {}: check storage.data_dir (or --data-dir)",
            dir.display()
        )));
    }
    let keys = ledger::verifier_keys(dir).map_err(from_ledger)?;
    if keys.is_empty() {
        return Err(VerifyError::Usage(format!(
            "the ledger at {} has no public key in keys/: give the auditor's copy with --public-key, or start the gateway once so it makes its signing key",
            dir.display()
        )));
    }
    parse_verifiers(&keys)
}

/// Parses verifier keys (`name+id+key` lines).
pub fn parse_verifiers(vkeys: &[String]) -> Result<Vec<Verifier>, VerifyError> {
    let out = vkeys
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .map(|k| Verifier::parse(k).map_err(|e| VerifyError::Usage(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if out.is_empty() {
        return Err(VerifyError::Usage("no public key was given".into()));
    }
    Ok(out)
}

/// One signed checkpoint found for the ledger.
#[derive(Clone, Debug)]
struct Cp {
    /// Where it was found, for messages: `checkpoints.log line 7`.
    label: String,
    size: u64,
    root: Hash,
    note: String,
    /// Whether it is held elsewhere rather than one of the ledger's own.
    held: bool,
}

fn open_note(label: &str, note: &str, verifiers: &[Verifier]) -> Result<Checkpoint, VerifyError> {
    note::verify(note, verifiers).map_err(|e| VerifyError::BadSignature {
        checkpoint: label.to_string(),
        reason: format!("the checkpoint does not verify: {e}"),
    })
}

/// Every checkpoint of the ledger (`checkpoints.log` in order, then `checkpoint`), each
/// signature verified.
fn ledger_checkpoints(dir: &Path, verifiers: &[Verifier]) -> Result<Vec<Cp>, VerifyError> {
    let mut out = Vec::new();
    let log = dir.join("checkpoints.log");
    match std::fs::read_to_string(&log) {
        Ok(text) => {
            // A last line without its newline was never written whole (a crash, a full disk):
            // it proves nothing, and the gateway cuts it at its next start.
            let whole = match text.rfind('\n') {
                Some(end) if !text.ends_with('\n') => &text[..=end],
                None if !text.is_empty() => "",
                _ => &text[..],
            };
            for (i, line) in whole.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let label = format!("checkpoints.log line {}", i + 1);
                let note = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("note").and_then(Value::as_str).map(str::to_string))
                    .ok_or_else(|| VerifyError::BadSignature {
                        checkpoint: label.clone(),
                        reason: "the line is not a checkpoint ({\"note\": \"<signed note>\"}): the log was altered, or a write was torn".into(),
                    })?;
                let cp = open_note(&label, &note, verifiers)?;
                out.push(Cp {
                    label,
                    size: cp.size,
                    root: cp.root,
                    note,
                    held: false,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&log)(e)),
    }
    let latest = dir.join("checkpoint");
    match std::fs::read_to_string(&latest) {
        Ok(note) => {
            let label = "the checkpoint file".to_string();
            let cp = open_note(&label, &note, verifiers)?;
            out.push(Cp {
                label,
                size: cp.size,
                root: cp.root,
                note,
                held: false,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&latest)(e)),
    }
    Ok(out)
}

/// A segment as the scan sees it.
struct Seg {
    first: u64,
    path: PathBuf,
    label: String,
}

fn segment_list(dir: &Path) -> Result<Vec<Seg>, VerifyError> {
    Ok(ledger::segments(dir)
        .map_err(from_ledger)?
        .into_iter()
        .map(|(first, path)| {
            let label = format!(
                "segments/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            Seg { first, path, label }
        })
        .collect())
}

/// Reads the frames of one segment file in chunks.
struct FrameReader {
    file: File,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    /// The file offset of `buf[0]`.
    base: u64,
}

const CHUNK: usize = 1 << 20;

enum Next {
    /// A record: its sequence number, and the payload at `buf[range]`.
    Frame(u64, std::ops::Range<usize>),
    End,
    /// Damage at this file offset; `torn` when the segment ends inside the record.
    Bad {
        offset: u64,
        error: FrameError,
        torn: bool,
    },
}

impl FrameReader {
    fn new(file: File) -> FrameReader {
        FrameReader {
            file,
            // Room for a chunk after the leftover of the last one.
            buf: Vec::with_capacity(2 * CHUNK),
            start: 0,
            eof: false,
            base: 0,
        }
    }

    /// Reads more bytes, keeping `buf[start..]`; returns how many were read.
    fn fill(&mut self, want: usize) -> std::io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        let mut total = 0;
        while !self.eof && self.buf.len() < want {
            let grow = CHUNK.max(want - self.buf.len());
            // Into the spare capacity, which is neither zeroed first nor (with the leftover
            // of a frame shorter than a chunk) reallocated.
            self.buf.reserve(grow);
            let n = (&mut self.file)
                .take(grow as u64)
                .read_to_end(&mut self.buf)?;
            if n < grow {
                self.eof = true;
            }
            total += n;
        }
        Ok(total)
    }

    /// The payload of a frame that [`FrameReader::next`] returned.
    fn payload(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Whether the next frame is wholly in the buffer (its header and as many bytes as its
    /// length field counts): then [`FrameReader::next`] returns it without reading or moving
    /// the buffer's contents. When not, `next` may read, or may not.
    fn next_is_buffered(&self) -> bool {
        let rest = &self.buf[self.start..];
        rest.len() >= HEADER_LEN
            && rest.len()
                >= frame::OVERHEAD
                    + u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize
    }

    /// Hands over the buffer, whose frames up to the last one returned stay where they were,
    /// and goes on in `fresh`, where the bytes not yet returned are moved. The ranges of the
    /// frames returned so far index the buffer handed over.
    fn take_consumed(&mut self, mut fresh: Vec<u8>) -> Vec<u8> {
        fresh.clear();
        fresh.reserve(2 * CHUNK);
        fresh.extend_from_slice(&self.buf[self.start..]);
        self.base += self.start as u64;
        self.start = 0;
        std::mem::replace(&mut self.buf, fresh)
    }

    fn next(&mut self, read: &mut u64) -> std::io::Result<Next> {
        loop {
            if self.start == self.buf.len() && !self.eof {
                *read += self.fill(CHUNK)? as u64;
            }
            if self.start == self.buf.len() {
                return Ok(Next::End);
            }
            let r = frame::decode(&self.buf[self.start..]).map(|(f, used)| (f.seq, used));
            match r {
                Ok((seq, used)) => {
                    let range = self.start + HEADER_LEN..self.start + used - 4;
                    self.start += used;
                    return Ok(Next::Frame(seq, range));
                }
                Err(FrameError::Truncated { needed, .. }) if !self.eof => {
                    *read += self.fill(needed.max(CHUNK))? as u64;
                }
                Err(error) => {
                    return Ok(Next::Bad {
                        offset: self.base + self.start as u64,
                        torn: matches!(error, FrameError::Truncated { .. }),
                        error,
                    })
                }
            }
        }
    }
}

/// What [`scan`] calls for each record: (segment index, seq, payload range, reader) → go on?
type Visit<'a> = dyn FnMut(usize, u64, std::ops::Range<usize>, &mut FrameReader) -> Result<bool, VerifyError>
    + 'a;

/// Streams every record of the ledger in order from record `first` (1, or the first kept after
/// retention), checking framing, segment names and sequence continuity, and calls
/// `visit(segment index, seq, payload range, reader)` for each (until it returns `false`); the
/// payload is `reader.payload(range)`. `release(reader)` is called before the reader moves
/// what its buffer holds (to read more), and when the scan leaves a segment (at its end, or
/// stopping early) before anything else is returned: until then, the ranges visited stay valid.
/// Returns the last sequence number visited and the bytes read.
fn scan(
    segs: &[Seg],
    first: u64,
    progress: &mut dyn FnMut(u64, u64),
    visit: &mut Visit<'_>,
    release: &mut dyn FnMut(&mut FrameReader),
) -> Result<(u64, u64), VerifyError> {
    let total: u64 = segs
        .iter()
        .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut read = 0u64;
    let mut last_report = 0u64;
    let mut expected = first;
    // A record numbered above the next expected one: a gap, unless the missing numbers turn
    // up later (then the records were reordered). (segment label, expected, found)
    let mut gap: Option<(String, u64, u64)> = None;
    progress(0, total);
    for (si, seg) in segs.iter().enumerate() {
        let file = File::open(&seg.path).map_err(io(&seg.path))?;
        let mut reader = FrameReader::new(file);
        let mut first_in_segment = true;
        // Ok(false): stop here (the visit said so).
        let outcome: Result<bool, VerifyError> = 'segment: loop {
            if !reader.next_is_buffered() {
                release(&mut reader);
            }
            let next = match reader.next(&mut read) {
                Ok(next) => next,
                Err(e) => break 'segment Err(io(&seg.path)(e)),
            };
            if read - last_report >= 4 << 20 {
                last_report = read;
                progress(read, total);
            }
            match next {
                Next::End => break 'segment Ok(true),
                Next::Bad {
                    offset,
                    error,
                    torn,
                } => {
                    if let Some((segment, expected, found)) = gap.take() {
                        break 'segment Err(VerifyError::Missing {
                            segment,
                            expected,
                            found,
                        });
                    }
                    let reason = if torn && si + 1 == segs.len() {
                        format!("the ledger ends inside this record ({error}); if the gateway crashed while writing it, it cuts this torn record off on its next start")
                    } else if torn {
                        format!("the segment ends inside this record, yet another segment follows ({error})")
                    } else {
                        error.to_string()
                    };
                    break 'segment Err(VerifyError::Modified {
                        segment: seg.label.clone(),
                        after_seq: expected - 1,
                        offset,
                        reason,
                    });
                }
                Next::Frame(seq, range) => {
                    if let Some((segment, exp, found)) = &gap {
                        if (*exp..*found).contains(&seq) {
                            break 'segment Err(VerifyError::Reordered {
                                segment: segment.clone(),
                                seq: *found,
                                after: exp - 1,
                            });
                        }
                        continue;
                    }
                    if first_in_segment {
                        first_in_segment = false;
                        if seq != seg.first {
                            break 'segment Err(VerifyError::Misnamed {
                                segment: seg.label.clone(),
                                named: seg.first,
                                first: seq,
                            });
                        }
                    }
                    if seq < expected {
                        break 'segment Err(VerifyError::Reordered {
                            segment: seg.label.clone(),
                            seq,
                            after: expected - 1,
                        });
                    }
                    if seq > expected {
                        gap = Some((seg.label.clone(), expected, seq));
                        continue;
                    }
                    match visit(si, seq, range, &mut reader) {
                        Ok(true) => expected += 1,
                        other => break 'segment other,
                    }
                }
            }
        };
        release(&mut reader);
        if !outcome? {
            progress(total, total);
            return Ok((expected, read));
        }
    }
    if let Some((segment, expected, found)) = gap {
        return Err(VerifyError::Missing {
            segment,
            expected,
            found,
        });
    }
    progress(total, total);
    Ok((expected - 1, read))
}

/// Records handed to the leaf-hashing threads together: the reader's buffer that holds them,
/// not a copy.
struct Batch {
    /// The batch's place in the ledger's order.
    id: u64,
    data: Vec<u8>,
    /// (segment index, seq, payload range in `data`).
    recs: Vec<(usize, u64, std::ops::Range<usize>)>,
    leaves: Vec<Hash>,
    /// Hashing it panicked (a bug): the reading thread panics in turn rather than wait.
    hash_panicked: bool,
}

/// [`scan`], with the leaf hash of every record computed on `threads` threads (the calling
/// thread, which also reads, and `threads - 1` more), and
/// `visit(segment index, seq, leaf)` called in ledger order on the calling thread. Only the
/// leaf hashes are independent of each other (the chain and the tree are serial), but they are
/// most of the work: over a kilobyte of SHA-256 a record against two 64-byte blocks for the
/// chain link and the tree node. A scan error is returned after every record before it was
/// visited, so the first problem in ledger order is the one reported.
#[cfg(test)]
fn scan_leaves(
    segs: &[Seg],
    first: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
    visit: &mut dyn FnMut(usize, u64, &Hash) -> Result<(), VerifyError>,
) -> Result<(u64, u64), VerifyError> {
    scan_leaves_noting_keys(
        segs,
        first,
        threads,
        progress,
        visit,
        &mut Default::default(),
    )
}

/// [`scan_leaves`], also noting the data key of every sealed record in `keys` (one byte
/// compared a record; the key id read when the record is sealed).
fn scan_leaves_noting_keys(
    segs: &[Seg],
    first: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
    visit: &mut dyn FnMut(usize, u64, &Hash) -> Result<(), VerifyError>,
    keys: &mut std::collections::BTreeSet<u32>,
) -> Result<(u64, u64), VerifyError> {
    use std::collections::BTreeMap;
    use std::sync::mpsc;
    use std::sync::Mutex;

    let threads = threads.max(1);
    // Batches in flight (each a read buffer of up to 2 chunks): enough to keep every thread
    // busy while the next one fills.
    let depth = 2 * threads + 2;
    let (work_tx, work_rx) = mpsc::sync_channel::<Batch>(depth);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<Batch>();
    std::thread::scope(|scope| {
        // The reading thread hashes too (see `Ordered::step`).
        for _ in 1..threads {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            scope.spawn(move || loop {
                let next = work_rx.lock().map(|rx| rx.recv());
                let Ok(Ok(mut b)) = next else { return };
                // A panic here must reach the reading thread, which waits for this batch
                // (the other threads' senders would keep it waiting for ever).
                let hashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.hash()));
                b.hash_panicked = hashed.is_err();
                if done_tx.send(b).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut state = Ordered {
            done_rx,
            waiting: BTreeMap::new(),
            next: 0,
            in_flight: 0,
            spare: Vec::new(),
            failed: None,
        };
        // The batch being filled; its records are in the reader's buffer until it is cut.
        let batch = std::cell::RefCell::new(state.fresh(0));
        let state = std::cell::RefCell::new(state);
        let visit = std::cell::RefCell::new(visit);
        // Hands the records so far to the hashing threads, with the buffer they are in (the
        // reader goes on in a spare one), then visits what is back, keeping fewer than `depth`
        // batches in flight. A failed visit's error is kept in `failed`.
        let cut = |reader: &mut FrameReader| {
            let mut state = state.borrow_mut();
            {
                let mut batch = batch.borrow_mut();
                if !batch.recs.is_empty() {
                    let mut next = state.fresh(batch.id + 1);
                    let spare = std::mem::take(&mut next.data);
                    let mut full = std::mem::replace(&mut *batch, next);
                    full.data = reader.take_consumed(spare);
                    state.in_flight += 1;
                    work_tx
                        .send(full)
                        .expect("the queue has room for every batch in flight");
                }
            }
            let mut visit = visit.borrow_mut();
            while state.failed.is_none() && (state.in_flight >= depth || state.ready()) {
                state.step(&work_rx, &mut **visit);
            }
        };
        let scanned = scan(
            segs,
            first,
            progress,
            &mut |si, seq, range, reader| {
                let p = reader.payload(range.clone());
                if p.first() == Some(&crate::ledger_crypt::SEALED) {
                    if let Some(id) = p.get(1..5) {
                        keys.insert(u32::from_be_bytes(id.try_into().expect("4 bytes")));
                    }
                }
                // The batch is cut when the scan releases the reader's buffer: before the
                // reader reads more, or leaves the segment. A failed visit stops the reading;
                // its error is returned below.
                batch.borrow_mut().recs.push((si, seq, range));
                Ok(state.borrow().failed.is_none())
            },
            &mut |reader| cut(reader),
        );
        drop(work_tx);
        let mut state = state.into_inner();
        let visit = visit.into_inner();
        // Whatever was read before a scan error is visited first: an earlier problem wins.
        while state.failed.is_none() && state.in_flight > 0 {
            state.step(&work_rx, visit);
        }
        match state.failed.take() {
            Some(e) => Err(e),
            None => scanned,
        }
    })
}

/// The ordered end of [`scan_leaves`]: batches come back from the hashing threads in any
/// order and are visited in ledger order.
struct Ordered {
    done_rx: std::sync::mpsc::Receiver<Batch>,
    waiting: std::collections::BTreeMap<u64, Batch>,
    next: u64,
    in_flight: usize,
    spare: Vec<Batch>,
    failed: Option<VerifyError>,
}

impl Batch {
    fn hash(&mut self) {
        self.leaves.clear();
        for (_, _, range) in &self.recs {
            self.leaves.push(leaf_hash(&self.data[range.clone()]));
        }
    }
}

impl Ordered {
    /// Visits the next batch in order when it is back; otherwise hashes a queued batch on this
    /// thread rather than wait (the reading thread is a hashing thread too, so that it never
    /// sleeps while there is work: with as many threads as cores, no core idles); with the
    /// queue empty, waits. `false` when a visit failed.
    fn step(
        &mut self,
        work_rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Batch>>,
        visit: &mut dyn FnMut(usize, u64, &Hash) -> Result<(), VerifyError>,
    ) -> bool {
        if !self.ready() {
            // `try_lock`: a hashing thread holds the lock while it waits for work, and only
            // this thread makes work.
            let queued = work_rx.try_lock().ok().and_then(|rx| rx.try_recv().ok());
            if let Some(mut b) = queued {
                b.hash();
                self.waiting.insert(b.id, b);
                return true;
            }
        }
        self.apply_one(visit)
    }

    fn fresh(&mut self, id: u64) -> Batch {
        let mut b = self.spare.pop().unwrap_or_else(|| Batch {
            id: 0,
            data: Vec::new(),
            recs: Vec::with_capacity(2048),
            leaves: Vec::with_capacity(2048),
            hash_panicked: false,
        });
        b.id = id;
        b.recs.clear();
        b
    }

    /// Whether the next batch in order is back without waiting.
    fn ready(&mut self) -> bool {
        while let Ok(b) = self.done_rx.try_recv() {
            self.waiting.insert(b.id, b);
        }
        self.waiting.contains_key(&self.next)
    }

    /// Waits for the next batch in order and visits its records; `false` (the error kept in
    /// `failed`) when a visit failed.
    fn apply_one(
        &mut self,
        visit: &mut dyn FnMut(usize, u64, &Hash) -> Result<(), VerifyError>,
    ) -> bool {
        let b = loop {
            if let Some(b) = self.waiting.remove(&self.next) {
                break b;
            }
            let b = self
                .done_rx
                .recv()
                .expect("a hashing thread returns every batch it takes");
            self.waiting.insert(b.id, b);
        };
        assert!(!b.hash_panicked, "a leaf-hashing thread panicked");
        self.next += 1;
        self.in_flight -= 1;
        if self.failed.is_none() {
            for (&(si, seq, _), leaf) in b.recs.iter().zip(&b.leaves) {
                if let Err(e) = visit(si, seq, leaf) {
                    self.failed = Some(e);
                    break;
                }
            }
        }
        self.spare.push(b);
        self.failed.is_none()
    }
}

/// The `state` file's chain head: (size, chain).
fn read_state(dir: &Path) -> Option<(u64, Hash)> {
    let text = std::fs::read_to_string(dir.join("state")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let size = v.get("size")?.as_u64()?;
    let chain = B64.decode(v.get("chain")?.as_str()?).ok()?;
    Some((size, chain.try_into().ok()?))
}

/// Where checking starts: at record 1, or after the retention anchor when retention deleted
/// the oldest records.
struct Start {
    /// The records only the anchor vouches for (0 without retention).
    base: u64,
    tree: Tree,
    chain: Hash,
    /// The retention anchor, if there is one.
    anchor: Option<ledger::Anchor>,
    /// The first segment's first record.
    first: u64,
}

/// Reads and checks the retention anchor (`retention`) and decides where checking starts: a
/// first segment after record 1 needs a valid anchor (signed by a trusted key, its frontier
/// leading to its signed root) that reaches it.
fn start(dir: &Path, segs: &[Seg], verifiers: &[Verifier]) -> Result<Start, VerifyError> {
    let first = segs.first().map_or(1, |s| s.first);
    let path = ledger::anchor_path(dir);
    let label = "the retention anchor (retention)".to_string();
    let anchor = match std::fs::read_to_string(&path) {
        Ok(note) => Some(match ledger::parse_anchor(&note, verifiers) {
            Ok(a) if a.kind == ledger::RETENTION_ANCHOR => a,
            Ok(a) => {
                return Err(VerifyError::BadAnchor {
                    reason: format!(
                        "it is a {} (signed when a segment was closed), not a {}: records may only be deleted by retention, which signs its own anchor",
                        a.kind,
                        ledger::RETENTION_ANCHOR
                    ),
                })
            }
            Err(ledger::AnchorError::Signature(e)) => {
                return Err(VerifyError::BadSignature {
                    checkpoint: label,
                    reason: format!("the retention anchor does not verify ({e}): it was altered or forged, so where the ledger may start cannot be trusted"),
                })
            }
            Err(ledger::AnchorError::Content(e)) => {
                return Err(VerifyError::BadAnchor { reason: e })
            }
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&path)(e)),
    };
    if first == 1 {
        return Ok(Start {
            base: 0,
            tree: Tree::new(),
            chain: CHAIN_START,
            anchor,
            first,
        });
    }
    let segment = segs[0].label.clone();
    match anchor {
        None => Err(VerifyError::PrefixMissing {
            segment,
            first,
            from: 1,
            why: "there is no retention anchor (retention) to start from".into(),
        }),
        Some(a) if a.size + 1 < first => Err(VerifyError::PrefixMissing {
            segment,
            first,
            from: a.size + 1,
            why: format!(
                "the retention anchor covers records 1 to {} only, which does not reach the first segment's start",
                a.size
            ),
        }),
        Some(a) => Ok(Start {
            base: a.size,
            tree: a.tree(),
            chain: a.chain,
            anchor: Some(a),
            first,
        }),
    }
}

/// Verifies the ledger in `dir` against its own public keys (`keys/*.vkey`); see
/// [`verify_with`].
pub fn verify(
    dir: &Path,
    held: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, VerifyError> {
    verify_with(dir, held, None, progress)
}

/// Verifies the ledger in `dir`: framing and checksums, segment names, sequence continuity,
/// the hash chain, and the Merkle root at every checkpoint (each signature checked against
/// `vkeys`, or the ledger's `keys/*.vkey` when `None`). With `held` (a signed note kept
/// elsewhere), also that the ledger is consistent with it. `progress(bytes read, total)` is
/// called as the segments are read. Never changes a file.
///
/// After retention (the first segment starts after record 1) the chain and the tree start
/// from the retention anchor; checkpoints of fewer records cannot be recomputed and are
/// skipped (counted in [`Boundary::checkpoints_skipped`]), and a held checkpoint of fewer
/// records is [`VerifyError::PredatesRetention`] (exit 2: it cannot be checked, which is not
/// evidence of tampering).
pub fn verify_with(
    dir: &Path,
    held: Option<&str>,
    vkeys: Option<&[String]>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, VerifyError> {
    let verifiers = match vkeys {
        Some(k) => parse_verifiers(k)?,
        None => ledger_verifiers(dir)?,
    };
    if !dir.is_dir() {
        return Err(VerifyError::Usage(format!(
            "there is no audit ledger at {}",
            dir.display()
        )));
    }
    let mut cps = ledger_checkpoints(dir, &verifiers)?;
    if let Some(note) = held {
        let label = "the checkpoint held elsewhere".to_string();
        let cp = open_note(&label, note, &verifiers)?;
        cps.push(Cp {
            label,
            size: cp.size,
            root: cp.root,
            note: note.to_string(),
            held: true,
        });
    }
    let segs = segment_list(dir)?;
    let st = start(dir, &segs, &verifiers)?;
    let base = st.base;
    // A ledger that still starts at record 1 under its anchor (a retention interrupted before
    // it unlinked anything): the anchor is checked like a checkpoint, chain included.
    let mut anchor_chain = None;
    if let (0, Some(a)) = (base, &st.anchor) {
        cps.push(Cp {
            label: "the retention anchor (retention)".into(),
            size: a.size,
            root: a.root,
            note: a.note.clone(),
            held: false,
        });
        anchor_chain = Some((a.size, a.chain));
    }
    // Checkpoints in the order the scan reaches them; the ledger's own before a held one of
    // the same size.
    let mut order: Vec<usize> = (0..cps.len()).collect();
    order.sort_by_key(|&i| (cps[i].size, cps[i].held, i));
    let state = read_state(dir);
    let first_label = segs
        .first()
        .map_or_else(|| "segments/".to_string(), |s| s.label.clone());
    let mut next = 0;
    let mut good = base;
    let mut checked = 0usize;
    let mut skipped = 0usize;
    // Checkpoints up to where checking starts: of the empty tree, or before the retention
    // boundary (skipped), or at it (against the anchor's root).
    let start_root = st
        .anchor
        .as_ref()
        .filter(|_| base > 0)
        .map_or(EMPTY_ROOT, |a| a.root);
    while next < order.len() && cps[order[next]].size <= base {
        let cp = &cps[order[next]];
        if cp.size < base {
            if cp.held {
                return Err(VerifyError::PredatesRetention {
                    checkpoint: cp.label.clone(),
                    size: cp.size,
                    boundary: base,
                });
            }
            skipped += 1;
        } else {
            if cp.root != start_root {
                return Err(VerifyError::RootMismatch {
                    segment: first_label,
                    checkpoint: cp.label.clone(),
                    size: base,
                    from: 1,
                });
            }
            checked += 1;
        }
        next += 1;
    }
    let mut tree = st.tree.clone();
    let mut chain = st.chain;
    let mut chain_checked_at = None;
    if let Some((size, head)) = state {
        if size == base && base > 0 {
            if head != chain {
                return Err(VerifyError::ChainMismatch {
                    segment: first_label,
                    at: base,
                });
            }
            chain_checked_at = Some(base);
        }
    }
    // The first record of each segment reached, to name the segment of a record.
    let mut starts: Vec<(u64, usize)> = Vec::new();
    let segment_of = |starts: &[(u64, usize)], seq: u64| -> String {
        let i = starts.partition_point(|(first, _)| *first <= seq);
        let si = if i == 0 { 0 } else { starts[i - 1].1 };
        segs.get(si).map_or_else(String::new, |s| s.label.clone())
    };
    // The chain and the tree stay serial, so more than a few hashing threads gain nothing.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let mut sealed_under = std::collections::BTreeSet::new();
    let (records, bytes) = scan_leaves_noting_keys(
        &segs,
        st.first,
        threads,
        progress,
        &mut |si, seq, leaf| {
            if starts.last().is_none_or(|(_, s)| *s != si) {
                starts.push((seq, si));
            }
            // Left over from an interrupted retention: only the anchor vouches for them.
            if seq <= base {
                return Ok(());
            }
            chain = frame::chain_next(&chain, leaf);
            tree.push(*leaf);
            if next < order.len() && cps[order[next]].size == seq {
                let r = tree.root();
                while next < order.len() && cps[order[next]].size == seq {
                    let cp = &cps[order[next]];
                    if cp.root != r {
                        return Err(VerifyError::RootMismatch {
                            segment: segment_of(&starts, good + 1),
                            checkpoint: cp.label.clone(),
                            size: seq,
                            from: good + 1,
                        });
                    }
                    checked += 1;
                    next += 1;
                }
                good = seq;
            }
            if let Some((size, head)) = state {
                if size == seq {
                    if head != chain {
                        return Err(VerifyError::ChainMismatch {
                            segment: segment_of(&starts, seq),
                            at: seq,
                        });
                    }
                    chain_checked_at = Some(seq);
                }
            }
            if let Some((size, head)) = anchor_chain {
                if size == seq && head != chain {
                    return Err(VerifyError::BadAnchor {
                    reason: format!("its chain head after record {seq} is not the records' (while its root is): the anchor was signed over a different chain"),
                });
                }
            }
            Ok(())
        },
        &mut sealed_under,
    )?;
    let last_label = segs
        .last()
        .map_or_else(|| "segments/".to_string(), |s| s.label.clone());
    // Checkpoints beyond the end: the ledger's own say the tail was cut; only a held one says
    // the whole ledger was rolled back.
    let mut beyond: Option<&Cp> = None;
    for cp in order[next..].iter().map(|&i| &cps[i]).filter(|c| !c.held) {
        if beyond.is_none_or(|b| cp.size > b.size) {
            beyond = Some(cp);
        }
    }
    if let Some(cp) = beyond {
        return Err(VerifyError::Truncated {
            segment: last_label,
            records,
            checkpoint: cp.label.clone(),
            covers: cp.size,
        });
    }
    if let Some(cp) = order[next..].iter().map(|&i| &cps[i]).find(|c| c.held) {
        return Err(VerifyError::RolledBack {
            checkpoint: cp.label.clone(),
            records,
            covers: cp.size,
        });
    }
    Ok(Report {
        records,
        segments: segs.len(),
        bytes,
        checkpoints_checked: checked,
        last_root: tree.root(),
        covered: cps
            .iter()
            .filter(|c| !c.held)
            .map(|c| c.size)
            .max()
            .unwrap_or(0),
        held: cps.iter().find(|c| c.held).map(|c| c.size),
        chain_checked_at,
        retention: st.anchor.as_ref().map(|a| Boundary {
            anchor_size: a.size,
            anchor_root: a.root,
            anchor_time: a.time.clone(),
            first: st.first,
            leftover: (st.first <= a.size).then_some((st.first, a.size)),
            checkpoints_skipped: skipped,
            anchor_checked: base == 0,
        }),
        missing_data_keys: sealed_under
            .into_iter()
            .filter(|id| !dir.join("datakeys").join(format!("{id:08x}.key")).exists())
            .collect(),
    })
}

/// The leaf hashes of the records after `st.base` up to record `size`, and the payload of
/// record `want` if asked.
fn leaves(
    segs: &[Seg],
    st: &Start,
    size: u64,
    want: Option<u64>,
) -> Result<(Vec<Hash>, Option<Vec<u8>>), VerifyError> {
    let mut out = Vec::with_capacity(size.saturating_sub(st.base).min(1 << 24) as usize);
    let mut payload = None;
    if size <= st.base {
        return Ok((out, payload));
    }
    let mut visit = |_, seq, range, reader: &mut FrameReader| {
        if seq <= st.base {
            return Ok(true);
        }
        let p = reader.payload(range);
        out.push(leaf_hash(p));
        if Some(seq) == want {
            payload = Some(p.to_vec());
        }
        Ok(seq < size)
    };
    scan(segs, st.first, &mut |_, _| {}, &mut visit, &mut |_| {})?;
    Ok((out, payload))
}

/// The tree of `leaves` (from [`leaves`]) after what the start's frontier covers.
fn pruned<'a>(st: &'a Start, leaves: &'a [Hash]) -> Pruned<'a> {
    Pruned::new(st.base, st.tree.frontier(), leaves).expect("a tree's frontier fits its size")
}

/// The checkpoint to prove against: the largest one of the ledger covering `size` records
/// (the last written of equal ones).
fn covering(cps: &[Cp], size: u64) -> Option<&Cp> {
    cps.iter().filter(|c| c.size >= size).max_by_key(|c| c.size)
}

fn check_root(segs: &[Seg], tree: &Pruned<'_>, cp: &Cp) -> Result<(), VerifyError> {
    if tree.size() < cp.size {
        return Err(VerifyError::Truncated {
            segment: segs.last().map_or_else(String::new, |s| s.label.clone()),
            records: tree.size(),
            checkpoint: cp.label.clone(),
            covers: cp.size,
        });
    }
    if tree.root(cp.size) != Some(cp.root) {
        return Err(VerifyError::RootMismatch {
            segment: segs.first().map_or_else(String::new, |s| s.label.clone()),
            checkpoint: cp.label.clone(),
            size: cp.size,
            from: 1,
        });
    }
    Ok(())
}

/// A hash in base64, as checkpoints and proofs write it.
pub fn b64(hash: &Hash) -> String {
    B64.encode(hash)
}

fn b64_list(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|h| B64.encode(h)).collect()
}

/// The inclusion proof of record `seq` against the latest checkpoint covering it:
/// `{"type": "inclusion", "record", "record_bytes", "seq", "leaf_index", "tree_size",
/// "audit_path", "checkpoint"}`. `record_bytes` (base64) are the exact payload bytes whose
/// RFC 6962 leaf hash the path starts from; `record` is the same bytes parsed, for reading.
pub fn prove(dir: &Path, seq: u64) -> Result<Value, VerifyError> {
    if seq == 0 {
        return Err(VerifyError::Usage(
            "records are numbered from 1: give a sequence number of 1 or more".into(),
        ));
    }
    let verifiers = ledger_verifiers(dir)?;
    let cps = ledger_checkpoints(dir, &verifiers)?;
    let segs = segment_list(dir)?;
    let st = start(dir, &segs, &verifiers)?;
    if seq <= st.base {
        return Err(VerifyError::Deleted {
            seq,
            first: st.base + 1,
        });
    }
    let Some(cp) = covering(&cps, seq) else {
        return Err(VerifyError::NotCovered {
            seq,
            latest: cps.iter().map(|c| c.size).max().unwrap_or(0),
        });
    };
    let (leaves, payload) = leaves(&segs, &st, cp.size, Some(seq))?;
    let tree = pruned(&st, &leaves);
    check_root(&segs, &tree, cp)?;
    let payload = payload.ok_or_else(|| VerifyError::Usage(format!("record {seq} not found")))?;
    let audit_path = tree
        .inclusion_proof(seq - 1, cp.size)
        .ok_or_else(|| VerifyError::Usage(format!("record {seq} not found")))?;
    let record: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    Ok(json!({
        "type": "inclusion",
        "record": record,
        "record_bytes": B64.encode(&payload),
        "seq": seq,
        "leaf_index": seq - 1,
        "tree_size": cp.size,
        "audit_path": b64_list(&audit_path),
        "checkpoint": cp.note,
    }))
}

/// The consistency proof that the ledger's checkpoint of `old_size` records is a prefix of its
/// checkpoint of `new_size` records (the latest when `None`): `{"type": "consistency",
/// "old_size", "new_size", "proof", "old_checkpoint", "new_checkpoint"}`.
pub fn consistency(dir: &Path, old_size: u64, new_size: Option<u64>) -> Result<Value, VerifyError> {
    let verifiers = ledger_verifiers(dir)?;
    let cps = ledger_checkpoints(dir, &verifiers)?;
    let new = match new_size {
        Some(n) => cps.iter().rev().find(|c| c.size == n),
        None => covering(&cps, 0),
    };
    let Some(new) = new else {
        return Err(VerifyError::Usage(format!(
            "the ledger has no checkpoint of {} records",
            new_size.unwrap_or(0)
        )));
    };
    let Some(old) = cps.iter().rev().find(|c| c.size == old_size) else {
        let sizes: Vec<String> = cps.iter().map(|c| c.size.to_string()).collect();
        return Err(VerifyError::Usage(format!(
            "the ledger has no checkpoint of {old_size} records; its checkpoints cover: {}",
            sizes.join(", ")
        )));
    };
    if old.size > new.size {
        return Err(VerifyError::Usage(format!(
            "the old checkpoint ({}) must not be larger than the new one ({})",
            old.size, new.size
        )));
    }
    let segs = segment_list(dir)?;
    let st = start(dir, &segs, &verifiers)?;
    for cp in [old, new] {
        if cp.size > 0 && cp.size < st.base {
            return Err(VerifyError::PredatesRetention {
                checkpoint: format!("the checkpoint of {} records ({})", cp.size, cp.label),
                size: cp.size,
                boundary: st.base,
            });
        }
    }
    let (leaves, _) = leaves(&segs, &st, new.size, None)?;
    let tree = pruned(&st, &leaves);
    check_root(&segs, &tree, new)?;
    check_root(&segs, &tree, old)?;
    let proof = tree.consistency_proof(old.size, new.size).ok_or_else(|| {
        VerifyError::Usage(format!(
            "no consistency proof from {} to {} records",
            old.size, new.size
        ))
    })?;
    Ok(json!({
        "type": "consistency",
        "old_size": old.size,
        "new_size": new.size,
        "proof": b64_list(&proof),
        "old_checkpoint": old.note,
        "new_checkpoint": new.note,
    }))
}

fn bad(why: impl Into<String>) -> VerifyError {
    VerifyError::BadProof(why.into())
}

fn hashes(v: &Value, field: &str) -> Result<Vec<Hash>, VerifyError> {
    v.get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("\"{field}\" is missing")))?
        .iter()
        .map(|h| {
            h.as_str()
                .and_then(|s| B64.decode(s).ok())
                .and_then(|b| <Hash>::try_from(b).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "\"{field}\" holds something that is not a base64 SHA-256 hash"
                    ))
                })
        })
        .collect()
}

fn number(v: &Value, field: &str) -> Result<u64, VerifyError> {
    v.get(field)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("\"{field}\" is missing or not a number")))
}

fn signed(v: &Value, field: &str, verifiers: &[Verifier]) -> Result<Checkpoint, VerifyError> {
    let note = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("\"{field}\" is missing")))?;
    note::verify(note, verifiers).map_err(|e| VerifyError::BadSignature {
        checkpoint: format!("the proof's {field}"),
        reason: format!("the checkpoint does not verify: {e}"),
    })
}

/// Checks a proof printed by [`prove`] or [`consistency`] with only the public key(s)
/// `vkeys`: the checkpoint signature(s), then the audit path from the leaf hash of the
/// record's exact bytes to the signed root (or the consistency of the two signed roots).
/// Returns the (newest) checkpoint the proof is against.
pub fn verify_proof(proof_json: &str, vkeys: &[String]) -> Result<Checkpoint, VerifyError> {
    let verifiers = parse_verifiers(vkeys)?;
    let v: Value = serde_json::from_str(proof_json)
        .map_err(|e| bad(format!("the file is not a proof (not JSON: {e})")))?;
    match v.get("type").and_then(Value::as_str).unwrap_or("inclusion") {
        "inclusion" => {
            let cp = signed(&v, "checkpoint", &verifiers)?;
            let bytes = v
                .get("record_bytes")
                .and_then(Value::as_str)
                .and_then(|s| B64.decode(s).ok())
                .ok_or_else(|| bad("\"record_bytes\" is missing or not base64"))?;
            let index = number(&v, "leaf_index")?;
            let size = number(&v, "tree_size")?;
            let path = hashes(&v, "audit_path")?;
            if size != cp.size {
                return Err(bad(format!(
                    "the proof claims a tree of {size} records but its checkpoint covers {}",
                    cp.size
                )));
            }
            // The record number a reader is told is the leaf's, never a claim of its own.
            if let Some(seq) = v.get("seq").filter(|s| !s.is_null()) {
                if seq.as_u64() != Some(index + 1) {
                    return Err(bad(format!(
                        "\"seq\" says {seq} but the proof places the record at leaf {index} (record {})",
                        index + 1
                    )));
                }
            }
            // A sealed record (encryption at rest) proves its ciphertext; it is read with the
            // key, not from the proof, so a readable `record` beside it is no part of the
            // proof and would be believed unchecked.
            if bytes.first() == Some(&crate::ledger_crypt::SEALED) {
                if v.get("record").is_some_and(|r| !r.is_null()) {
                    return Err(bad(
                        "the record is sealed, yet the proof carries a readable \"record\" that nothing proves: it was added",
                    ));
                }
            } else {
                let parsed: Value = serde_json::from_slice(&bytes)
                    .map_err(|_| bad("\"record_bytes\" is not the JSON of an audit event"))?;
                if v.get("record") != Some(&parsed) {
                    return Err(bad(
                        "\"record\" is not what \"record_bytes\" hold: the readable record was altered",
                    ));
                }
                let seq = parsed.get("seq").and_then(Value::as_u64);
                if seq != Some(index + 1) {
                    return Err(bad(format!(
                        "the record is number {} but the proof places it at leaf {index} (record {})",
                        seq.map_or_else(|| "(none)".to_string(), |s| s.to_string()),
                        index + 1
                    )));
                }
            }
            if !verify_inclusion(&leaf_hash(&bytes), index, size, &path, &cp.root) {
                return Err(bad(format!(
                    "the record and its audit path do not lead to the signed root of {size} records: the record or the path was altered"
                )));
            }
            Ok(cp)
        }
        "consistency" => {
            let old = signed(&v, "old_checkpoint", &verifiers)?;
            let new = signed(&v, "new_checkpoint", &verifiers)?;
            if number(&v, "old_size")? != old.size || number(&v, "new_size")? != new.size {
                return Err(bad("the sizes do not match the checkpoints"));
            }
            if old.origin != new.origin {
                return Err(bad(format!(
                    "the checkpoints are of two logs: {} and {}",
                    old.origin, new.origin
                )));
            }
            let proof = hashes(&v, "proof")?;
            if !verify_consistency(old.size, new.size, &old.root, &new.root, &proof) {
                return Err(bad(format!(
                    "the checkpoint of {} records is not a prefix of the checkpoint of {}: the ledger was rewritten between them, or the proof was altered",
                    old.size, new.size
                )));
            }
            Ok(new)
        }
        other => Err(bad(format!("unknown proof type {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSink;
    use crate::ledger::tests::copy_dir;
    use crate::ledger::{LedgerOptions, LedgerSink};
    use apiwarden_core::config::Durability;
    use apiwarden_core::event::{AuditEvent, EventKind};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "aw-lv-{tag}-{}-{}",
            std::process::id(),
            crate::ids::new_id().simple()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn latest_size(dir: &Path) -> u64 {
        std::fs::read_to_string(dir.join("checkpoint"))
            .ok()
            .and_then(|n| n.lines().nth(1).and_then(|l| l.parse().ok()))
            .unwrap_or(0)
    }

    /// A ledger of `n` events in several 16 KiB segments, a checkpoint covering them all.
    async fn build(n: u64) -> (PathBuf, PathBuf) {
        build_with(n, 16 << 10).await
    }

    /// [`build`] with segments of `segment_bytes`.
    async fn build_with(n: u64, segment_bytes: u64) -> (PathBuf, PathBuf) {
        let root = temp_dir("ledger");
        let dir = root.join("ledger");
        let copy = root.join("copy");
        let opened = LedgerSink::open(LedgerOptions {
            dir: dir.clone(),
            durability: Durability::Async,
            checkpoint_interval: Duration::from_millis(50),
            origin: "apiwarden/test".into(),
            copy_to: Some(copy.clone()),
            segment_bytes,
            segment_max_age: ledger::SEGMENT_MAX_AGE,
            retention: None,
            node: "test-node".into(),
            encryption: None,
        })
        .unwrap();
        let node: Arc<str> = Arc::from("test-node");
        for i in 0..n {
            if i == n / 2 {
                // A checkpoint half-way, for the consistency proof.
                opened.sink.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
            let mut e = AuditEvent::new(EventKind::System, crate::ids::new_id(), node.clone());
            e.message = Some(format!("event {i}"));
            opened.sink.record(Box::new(e));
            // Written in several batches, so that segments rotate near their size.
            if i % 200 == 199 {
                opened.sink.flush().await.unwrap();
            }
        }
        opened.sink.flush().await.unwrap();
        let t = Instant::now();
        while latest_size(&dir) < n {
            assert!(t.elapsed() < Duration::from_secs(10), "no checkpoint");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(opened);
        // Let the writer finish its last checkpoint after the channel closed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (dir, copy)
    }

    /// The contract `scan_leaves` relies on: when `next_is_buffered` says so, `next` reads
    /// nothing (so the buffer, and the ranges of the frames returned, stay put). Checked with a
    /// chunk boundary falling at every offset into a frame's header and just after it, where
    /// fewer bytes than a header plus checksum are left.
    #[test]
    fn a_frame_said_to_be_buffered_is_returned_without_reading() {
        let dir = temp_dir("reader");
        std::fs::create_dir_all(&dir).unwrap();
        for left in 0..=40usize {
            // Frames up to `CHUNK - left`, the next frame straddling the chunk boundary.
            let mut bytes = Vec::new();
            let mut seq = 1;
            while CHUNK - left - bytes.len() > 2 * (frame::OVERHEAD + 1000) {
                frame::encode(seq, &[b'x'; 1000], &mut bytes).unwrap();
                seq += 1;
            }
            let last = CHUNK - left - bytes.len() - frame::OVERHEAD;
            frame::encode(seq, &vec![b'y'; last], &mut bytes).unwrap();
            assert_eq!(bytes.len(), CHUNK - left);
            for _ in 0..3 {
                seq += 1;
                frame::encode(seq, &[b'z'; 500], &mut bytes).unwrap();
            }
            let path = dir.join("segment");
            std::fs::write(&path, &bytes).unwrap();
            let mut reader = FrameReader::new(File::open(&path).unwrap());
            let mut read = 0;
            let mut frames = 0;
            loop {
                let buffered = reader.next_is_buffered();
                let before = read;
                match reader.next(&mut read).unwrap() {
                    Next::Frame(..) => frames += 1,
                    Next::End => break,
                    Next::Bad { error, .. } => panic!("left {left}: {error}"),
                }
                if buffered {
                    assert_eq!(read, before, "left {left}: a buffered frame was read for");
                }
            }
            assert_eq!(frames, seq, "left {left}");
        }
    }

    /// Every record (segment index, seq, leaf) as the serial scan sees it, or its error.
    fn serial_leaves(segs: &[Seg]) -> Result<Vec<(usize, u64, Hash)>, String> {
        let mut out = Vec::new();
        scan(
            segs,
            1,
            &mut |_, _| {},
            &mut |si, seq, range, reader| {
                out.push((si, seq, leaf_hash(reader.payload(range))));
                Ok(true)
            },
            &mut |_| {},
        )
        .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[tokio::test]
    async fn leaves_hashed_in_the_readers_own_buffers_match_the_serial_scan() {
        // Segments larger than the reader's buffer, which it refills several times each.
        let (dir, _copy) = build_with(6000, 3 * CHUNK as u64).await;
        let segs = segment_list(&dir).unwrap();
        assert!(std::fs::metadata(&segs[0].path).unwrap().len() > 2 * CHUNK as u64);
        let serial = serial_leaves(&segs).unwrap();
        assert_eq!(serial.len(), 6000);
        // Batches cut when the reader refills its buffer, on one thread (no hashing threads:
        // the reading thread hashes everything) and on two.
        // Every record visited (segment index, seq, leaf), and how the scan ended.
        let parallel = |threads| {
            let mut visited = Vec::new();
            let end = scan_leaves(&segs, 1, threads, &mut |_, _| {}, &mut |si, seq, leaf| {
                visited.push((si, seq, *leaf));
                Ok(())
            })
            .map(|(last, _)| last)
            .map_err(|e| e.to_string());
            (visited, end)
        };
        for threads in [1, 2] {
            let (visited, end) = parallel(threads);
            assert_eq!(end, Ok(6000), "{threads} thread(s)");
            assert_eq!(visited, serial, "{threads} thread(s)");
        }

        // A record deleted early in the first segment: the records after it are read but not
        // visited (through refills of the reader's buffer), and the gap is reported as the
        // serial scan reports it, after every record before it was visited.
        let mut bytes = std::fs::read(&segs[0].path).unwrap();
        // The eleventh record (as ten records were stepped over before).
        let (_, start, end) = frame::spans(&bytes).unwrap()[10];
        bytes.drain(start..end);
        std::fs::write(&segs[0].path, &bytes).unwrap();
        let expected = serial_leaves(&segs).unwrap_err();
        for threads in [1, 2] {
            let (visited, end) = parallel(threads);
            assert_eq!(end, Err(expected.clone()), "{threads} thread(s)");
            assert_eq!(visited, serial[..10], "{threads} thread(s)");
        }
    }

    #[tokio::test]
    async fn leaves_hashed_on_several_threads_are_visited_in_order_and_the_first_error_wins() {
        let (dir, _copy) = build(3000).await;
        let segs = segment_list(&dir).unwrap();
        let mut serial = Vec::new();
        scan(
            &segs,
            1,
            &mut |_, _| {},
            &mut |si, seq, range, reader| {
                serial.push((si, seq, leaf_hash(reader.payload(range))));
                Ok(true)
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(serial.len(), 3000);
        // 16 KiB segments, a batch each, on 3 threads: many batches in flight.
        let mut parallel = Vec::new();
        let (last, _) = scan_leaves(&segs, 1, 3, &mut |_, _| {}, &mut |si, seq, leaf| {
            parallel.push((si, seq, *leaf));
            Ok(())
        })
        .unwrap();
        assert_eq!(last, 3000);
        assert_eq!(parallel, serial);

        // A visit that fails at record 1 000 stops the scan there, although later batches were
        // already hashed.
        let mut visited = 0u64;
        let err = scan_leaves(&segs, 1, 3, &mut |_, _| {}, &mut |_, seq, _| {
            visited = seq;
            if seq == 1000 {
                return Err(VerifyError::Usage("stop at 1000".into()));
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            VerifyError::Usage("stop at 1000".into()).to_string()
        );
        assert_eq!(visited, 1000);

        // Damage in the last segment: every record before it is visited first, and a visit
        // error before the damage is the one reported.
        let i = (0..segs.len())
            .rev()
            .find(|&i| std::fs::metadata(&segs[i].path).unwrap().len() > 100)
            .unwrap();
        let last_record = segs.get(i + 1).map_or(3000, |s| s.first - 1);
        let mut bytes = std::fs::read(&segs[i].path).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x55;
        std::fs::write(&segs[i].path, &bytes).unwrap();
        let mut visited = 0u64;
        let err = scan_leaves(&segs, 1, 3, &mut |_, _| {}, &mut |_, seq, _| {
            visited = seq;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, VerifyError::Modified { .. }), "{err}");
        assert_eq!(
            visited,
            last_record - 1,
            "every record before the damaged one was visited"
        );
        let err = scan_leaves(&segs, 1, 3, &mut |_, _| {}, &mut |_, seq, _| {
            if seq == 2000 {
                return Err(VerifyError::Usage("an earlier problem".into()));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, VerifyError::Usage(_)), "{err}");
    }

    #[tokio::test]
    async fn clean_ledger_verifies_and_proofs_round_trip() {
        let (dir, copy) = build(3000).await;
        assert!(segment_list(&dir).unwrap().len() > 3, "several segments");
        let mut calls = 0;
        let report = verify(&dir, None, &mut |read, total| {
            assert!(read <= total);
            calls += 1;
        })
        .unwrap();
        assert!(calls >= 2);
        assert_eq!(report.records, 3000);
        assert!(report.checkpoints_checked >= 2);
        assert_eq!(report.covered, 3000);
        assert_eq!(report.chain_checked_at, Some(3000));
        let held = std::fs::read_to_string(copy.join("checkpoint")).unwrap();
        let report = verify(&dir, Some(&held), &mut |_, _| {}).unwrap();
        assert_eq!(report.held, Some(3000));

        let vkeys = ledger::verifier_keys(&dir).unwrap();
        for seq in [1, 2, 1500, 2999, 3000] {
            let proof = prove(&dir, seq).unwrap();
            assert_eq!(proof["record"]["seq"], seq);
            let cp = verify_proof(&proof.to_string(), &vkeys).unwrap();
            assert_eq!(cp.size, 3000);
        }
        assert!(matches!(
            prove(&dir, 3001),
            Err(VerifyError::NotCovered { seq: 3001, .. })
        ));

        // A tampered proof is refused: the record, the path, the checkpoint, the key.
        let proof = prove(&dir, 77).unwrap();
        let mut p = proof.clone();
        let bytes = B64.decode(p["record_bytes"].as_str().unwrap()).unwrap();
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("event 76", "event 99");
        p["record"] = serde_json::from_str(&text).unwrap();
        p["record_bytes"] = B64.encode(text.as_bytes()).into();
        assert!(matches!(
            verify_proof(&p.to_string(), &vkeys),
            Err(VerifyError::BadProof(_))
        ));
        let mut p = proof.clone();
        p["record"]["message"] = "changed".into();
        assert!(matches!(
            verify_proof(&p.to_string(), &vkeys),
            Err(VerifyError::BadProof(_))
        ));
        let mut p = proof.clone();
        p["audit_path"][0] = B64.encode([7u8; 32]).into();
        assert!(matches!(
            verify_proof(&p.to_string(), &vkeys),
            Err(VerifyError::BadProof(_))
        ));
        let mut p = proof.clone();
        p["leaf_index"] = 77.into();
        assert!(verify_proof(&p.to_string(), &vkeys).is_err());
        let mut p = proof.clone();
        let note = p["checkpoint"]
            .as_str()
            .unwrap()
            .replacen("\n3000\n", "\n3001\n", 1);
        p["checkpoint"] = note.into();
        assert!(matches!(
            verify_proof(&p.to_string(), &vkeys),
            Err(VerifyError::BadSignature { .. })
        ));
        let other = apiwarden_core::ledger::note::NoteSigner::new("apiwarden/test", [9; 32])
            .unwrap()
            .verifier_key();
        assert!(matches!(
            verify_proof(&proof.to_string(), &[other]),
            Err(VerifyError::BadSignature { .. })
        ));

        // Consistency between the first checkpoint and the latest.
        let first = ledger_checkpoints(&dir, &ledger_verifiers(&dir).unwrap())
            .unwrap()
            .iter()
            .map(|c| c.size)
            .find(|s| *s > 0 && *s < 3000);
        {
            let old = first.expect("a checkpoint half-way");
            let c = consistency(&dir, old, None).unwrap();
            assert_eq!(verify_proof(&c.to_string(), &vkeys).unwrap().size, 3000);
            let mut bad = c.clone();
            bad["proof"][0] = B64.encode([1u8; 32]).into();
            assert!(matches!(
                verify_proof(&bad.to_string(), &vkeys),
                Err(VerifyError::BadProof(_))
            ));
        }
        let c = consistency(&dir, 3000, Some(3000)).unwrap();
        assert!(verify_proof(&c.to_string(), &vkeys).is_ok());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    /// A ledger of about `n` events in 8 KiB segments whose oldest ones retention deleted,
    /// then more events and checkpoints after that.
    async fn build_retained(n: u64) -> PathBuf {
        let dir = temp_dir("retained").join("ledger");
        let options = |retention| LedgerOptions {
            dir: dir.clone(),
            durability: Durability::Async,
            checkpoint_interval: Duration::from_millis(20),
            origin: "apiwarden/test".into(),
            copy_to: None,
            segment_bytes: 8 << 10,
            segment_max_age: ledger::SEGMENT_MAX_AGE,
            retention,
            node: "test-node".into(),
            encryption: None,
        };
        let opened = LedgerSink::open(options(Some(ledger::Retention {
            max_age: Duration::ZERO,
            requires_export: vec![],
        })))
        .unwrap();
        let node: Arc<str> = Arc::from("test-node");
        for i in 0..n {
            let mut e = AuditEvent::new(EventKind::System, crate::ids::new_id(), node.clone());
            e.message = Some(format!("event {i}"));
            opened.sink.record(Box::new(e));
            if i % 50 == 49 {
                opened.sink.flush().await.unwrap();
            }
            if i % 100 == 99 {
                // Checkpoints along the way.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if i == n / 2 {
                let t = Instant::now();
                // (Retention looks once a second.)
                while ledger::segments(&dir).unwrap()[0].0 < n / 4 {
                    assert!(t.elapsed() < Duration::from_secs(10), "no retention");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        opened.sink.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(opened);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // More records after a restart without retention: sealed segments after the boundary,
        // whenever retention last ran (its last pass may have deleted every sealed one).
        let opened = LedgerSink::open(options(None)).unwrap();
        for i in 0..100 {
            let mut e = AuditEvent::new(EventKind::System, crate::ids::new_id(), node.clone());
            e.message = Some(format!("event {} after the restart", n + i));
            opened.sink.record(Box::new(e));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(300)).await;
        dir
    }

    /// Signs `cp` with the key of the ledger in `dir`: what only the gateway can do.
    fn sign_as_ledger(dir: &Path, cp: &Checkpoint) -> String {
        let seed: [u8; 32] = std::fs::read(dir.join("signing.key"))
            .unwrap()
            .try_into()
            .unwrap();
        note::NoteSigner::new("apiwarden/test", seed)
            .unwrap()
            .sign(cp)
            .unwrap()
    }

    #[tokio::test]
    async fn verify_starts_at_the_retention_anchor_and_refuses_what_does_not_fit() {
        let dir = build_retained(1200).await;
        let root_dir = dir.parent().unwrap().to_path_buf();
        let segs = segment_list(&dir).unwrap();
        let first = segs[0].first;
        assert!(first > 1 && segs.len() >= 2, "first segment {first}");
        let report = verify(&dir, None, &mut |_, _| {}).unwrap();
        let b = report.retention.clone().expect("a boundary");
        assert_eq!(
            (b.anchor_size, b.first, b.leftover),
            (first - 1, first, None)
        );
        let sizes: Vec<u64> = ledger_checkpoints(&dir, &ledger_verifiers(&dir).unwrap())
            .unwrap()
            .iter()
            .map(|c| c.size)
            .collect();
        assert!(
            b.checkpoints_skipped > 0,
            "first {first}, checkpoints {sizes:?}"
        );
        assert!(report.checkpoints_checked > 0);
        assert_eq!(report.covered, report.records);
        let j = report.to_json();
        assert_eq!(j["retention"]["first_record"], first);

        // Proofs: of a record kept, from the anchor's frontier; of a deleted one, refused.
        let vkeys = ledger::verifier_keys(&dir).unwrap();
        for seq in [first, first + 1, report.records] {
            let proof = prove(&dir, seq).unwrap();
            assert_eq!(
                verify_proof(&proof.to_string(), &vkeys).unwrap().size,
                report.records
            );
        }
        let err = prove(&dir, 1).unwrap_err();
        assert!(matches!(err, VerifyError::Deleted { seq: 1, .. }), "{err}");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains(&format!(
                "deleted by retention (the ledger starts at record {first}"
            )),
            "{err}"
        );
        // Consistency from a checkpoint at or after the boundary; not from before it.
        let cps = ledger_checkpoints(&dir, &ledger_verifiers(&dir).unwrap()).unwrap();
        let after = cps
            .iter()
            .map(|c| c.size)
            .find(|s| *s >= first - 1 && *s < report.records)
            .expect("a checkpoint after the boundary");
        let c = consistency(&dir, after, None).unwrap();
        assert_eq!(
            verify_proof(&c.to_string(), &vkeys).unwrap().size,
            report.records
        );
        let before = cps
            .iter()
            .find(|c| c.size > 0 && c.size < first - 1)
            .unwrap();
        let err = consistency(&dir, before.size, None).unwrap_err();
        assert!(
            matches!(err, VerifyError::PredatesRetention { .. }),
            "{err}"
        );
        // A held checkpoint from before the boundary cannot be checked (exit 2, not 1).
        let err = verify(&dir, Some(&before.note), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(err, VerifyError::PredatesRetention { .. }),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("predates the retention boundary"),
            "{err}"
        );
        let latest = std::fs::read_to_string(dir.join("checkpoint")).unwrap();
        assert!(verify(&dir, Some(&latest), &mut |_, _| {}).is_ok());

        let case = |name: &str| {
            let d = root_dir.join(name);
            copy_dir(&dir, &d);
            d
        };
        let anchor_note = std::fs::read_to_string(ledger::anchor_path(&dir)).unwrap();
        let anchor = ledger::parse_anchor(&anchor_note, &ledger_verifiers(&dir).unwrap()).unwrap();

        // The anchor removed: records 1 .. first-1 are simply missing.
        let d = case("no-anchor");
        std::fs::remove_file(ledger::anchor_path(&d)).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(err, VerifyError::PrefixMissing { from: 1, .. }),
            "{err}"
        );
        assert_eq!(
            (err.exit_code(), err.kind(), err.seq()),
            (1, "missing", Some(1))
        );
        assert!(
            err.to_string()
                .contains(&format!("records 1 to {} are missing", first - 1)),
            "{err}"
        );
        assert!(prove(&d, first).is_err());

        // A byte of the anchor's signature changed.
        let d = case("anchor-signature");
        let (body, sig) = anchor_note.trim_end().rsplit_once(' ').unwrap();
        let mut raw = B64.decode(sig).unwrap();
        raw[10] ^= 1;
        std::fs::write(
            ledger::anchor_path(&d),
            format!("{body} {}\n", B64.encode(&raw)),
        )
        .unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("retention anchor"), "{err}");

        // Signed with the right key, but its frontier does not lead to its root.
        let d = case("anchor-frontier");
        let mut ext: Vec<String> = anchor_note
            .lines()
            .skip(3)
            .take_while(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let fake_frontier = |ext: &mut Vec<String>| {
            let n = anchor.frontier.len();
            let i = ext.iter().position(|l| l.starts_with("frontier")).unwrap();
            ext[i] = format!(
                "frontier{}",
                format!(" {}", B64.encode([5u8; 32])).repeat(n)
            );
        };
        fake_frontier(&mut ext);
        let cp = Checkpoint {
            origin: "apiwarden/test".into(),
            size: anchor.size,
            root: anchor.root,
            extensions: ext.clone(),
        };
        std::fs::write(ledger::anchor_path(&d), sign_as_ledger(&d, &cp)).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, VerifyError::BadAnchor { .. }), "{err}");
        assert!(err.to_string().contains("frontier does not lead"), "{err}");

        // Signed, self-consistent, but not the tree of the records: the first checkpoint after
        // it tells.
        let d = case("anchor-other-tree");
        let forged: Vec<Hash> = (0..anchor.frontier.len())
            .map(|i| [i as u8 + 1; 32])
            .collect();
        let cp = Checkpoint {
            origin: "apiwarden/test".into(),
            size: anchor.size,
            root: Tree::from_frontier(anchor.size, &forged).unwrap().root(),
            extensions: ext
                .iter()
                .map(|l| {
                    if l.starts_with("frontier") {
                        format!("frontier {}", b64_list(&forged).join(" "))
                    } else {
                        l.clone()
                    }
                })
                .collect(),
        };
        std::fs::write(ledger::anchor_path(&d), sign_as_ledger(&d, &cp)).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::RootMismatch { .. } | VerifyError::ChainMismatch { .. }
            ),
            "{err}"
        );

        // A segment's seal put in the anchor's place.
        let d = case("seal-as-anchor");
        let seal = std::fs::read_dir(d.join("seals"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(seal, ledger::anchor_path(&d)).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, VerifyError::BadAnchor { .. }), "{err}");
        assert!(err.to_string().contains("segment-seal"), "{err}");

        // The first segment kept deleted by hand: the anchor no longer reaches the start.
        let d = case("first-kept-deleted");
        std::fs::remove_file(d.join("segments").join(segs[0].path.file_name().unwrap())).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(err, VerifyError::PrefixMissing { from, .. } if from == first),
            "{err}"
        );
        assert!(err.to_string().contains("does not reach"), "{err}");

        // A segment in the middle deleted: missing, as ever.
        let d = case("middle-deleted");
        let mid = &segment_list(&d).unwrap()[1];
        std::fs::remove_file(&mid.path).unwrap();
        let err = verify(&d, None, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, VerifyError::Missing { .. }), "{err}");
        assert_eq!(err.seq(), Some(mid.first));
        let _ = std::fs::remove_dir_all(root_dir);
    }

    #[tokio::test]
    async fn a_prefix_deleted_without_retention_is_missing() {
        let (dir, _) = build(1000).await;
        let segs = segment_list(&dir).unwrap();
        std::fs::remove_file(&segs[0].path).unwrap();
        let err = verify(&dir, None, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(err, VerifyError::PrefixMissing { from: 1, .. }),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        assert!(msg.contains("there is no retention anchor"), "{msg}");
        assert!(msg.contains(&segs[1].label), "{msg}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[tokio::test]
    async fn damage_is_named_with_segment_and_sequence() {
        let (dir, _) = build(1000).await;
        let segs = segment_list(&dir).unwrap();
        // One flipped payload byte in the second segment.
        let mut bytes = std::fs::read(&segs[1].path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&segs[1].path, &bytes).unwrap();
        let err = verify(&dir, None, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, VerifyError::Modified { .. }), "{err}");
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        assert!(msg.contains(&segs[1].label), "{msg}");
        assert!(
            msg.contains(&format!("after sequence {}", segs[1].first - 1)),
            "{msg}"
        );
        assert_eq!(err.seq(), Some(segs[1].first));
        // A missing directory is a usage error.
        let err = verify(&dir.join("nope"), None, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
