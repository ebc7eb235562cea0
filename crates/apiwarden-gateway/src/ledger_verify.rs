//! `apiwarden audit verify`, `prove`, `consistency` and `verify-proof`: read-only checks of a
//! ledger written by [`crate::ledger`] (its layout is documented there).
//!
//! [`verify`] streams every segment once, in order, keeping O(log n) memory (the Merkle
//! frontier and the chain head): framing and checksums, segment names against their first
//! record, sequence continuity from 1, the hash chain against the `state` file, the Merkle
//! root at the size of every checkpoint in `checkpoints.log` and `checkpoint` (each signature
//! verified first, against `keys/*.vkey`), and optionally a checkpoint held elsewhere. It
//! never changes a file: a torn last record that the gateway would cut on its next start is
//! reported too.
//!
//! [`prove`] and [`consistency`] keep the leaf hashes (32 bytes a record) of the records a
//! checkpoint covers and print RFC 6962 proofs; [`verify_proof`] checks either kind of proof
//! with nothing but the public key(s).

use crate::ledger;
use apiwarden_core::ledger::frame::{self, FrameError, CHAIN_START, HEADER_LEN};
use apiwarden_core::ledger::merkle::{
    consistency_proof, inclusion_proof, leaf_hash, root, verify_consistency, verify_inclusion,
    Hash, Tree, EMPTY_ROOT,
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
            VerifyError::Io { .. } | VerifyError::Usage(_) | VerifyError::NotCovered { .. } => 2,
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
            | VerifyError::Truncated { segment, .. } => Some(segment),
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
            VerifyError::NotCovered { seq, .. } => Some(*seq),
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
            for (i, line) in text.lines().enumerate() {
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
            buf: Vec::with_capacity(CHUNK),
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
            let len = self.buf.len();
            let grow = CHUNK.max(want - len);
            self.buf.resize(len + grow, 0);
            let n = self.file.read(&mut self.buf[len..])?;
            self.buf.truncate(len + n);
            if n == 0 {
                self.eof = true;
            }
            total += n;
        }
        Ok(total)
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

/// What [`scan`] calls for each record: (segment index, seq, payload) → go on?
type Visit<'a> = dyn FnMut(usize, u64, &[u8]) -> Result<bool, VerifyError> + 'a;

/// Streams every record of the ledger in order, checking framing, segment names and sequence
/// continuity, and calls `visit(segment index, seq, payload)` for each (until it returns
/// `false`). Returns the number of records visited.
fn scan(
    segs: &[Seg],
    progress: &mut dyn FnMut(u64, u64),
    visit: &mut Visit<'_>,
) -> Result<(u64, u64), VerifyError> {
    let total: u64 = segs
        .iter()
        .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut read = 0u64;
    let mut last_report = 0u64;
    let mut expected = 1u64;
    // A record numbered above the next expected one: a gap, unless the missing numbers turn
    // up later (then the records were reordered). (segment label, expected, found)
    let mut gap: Option<(String, u64, u64)> = None;
    progress(0, total);
    for (si, seg) in segs.iter().enumerate() {
        let file = File::open(&seg.path).map_err(io(&seg.path))?;
        let mut reader = FrameReader::new(file);
        let mut first_in_segment = true;
        loop {
            let next = reader.next(&mut read).map_err(io(&seg.path))?;
            if read - last_report >= 4 << 20 {
                last_report = read;
                progress(read, total);
            }
            match next {
                Next::End => break,
                Next::Bad {
                    offset,
                    error,
                    torn,
                } => {
                    if let Some((segment, expected, found)) = gap {
                        return Err(VerifyError::Missing {
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
                    return Err(VerifyError::Modified {
                        segment: seg.label.clone(),
                        after_seq: expected - 1,
                        offset,
                        reason,
                    });
                }
                Next::Frame(seq, range) => {
                    if let Some((segment, exp, found)) = &gap {
                        if (*exp..*found).contains(&seq) {
                            return Err(VerifyError::Reordered {
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
                            return Err(VerifyError::Misnamed {
                                segment: seg.label.clone(),
                                named: seg.first,
                                first: seq,
                            });
                        }
                    }
                    if seq < expected {
                        return Err(VerifyError::Reordered {
                            segment: seg.label.clone(),
                            seq,
                            after: expected - 1,
                        });
                    }
                    if seq > expected {
                        gap = Some((seg.label.clone(), expected, seq));
                        continue;
                    }
                    if !visit(si, seq, &reader.buf[range])? {
                        progress(total, total);
                        return Ok((expected, read));
                    }
                    expected += 1;
                }
            }
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

/// The `state` file's chain head: (size, chain).
fn read_state(dir: &Path) -> Option<(u64, Hash)> {
    let text = std::fs::read_to_string(dir.join("state")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let size = v.get("size")?.as_u64()?;
    let chain = B64.decode(v.get("chain")?.as_str()?).ok()?;
    Some((size, chain.try_into().ok()?))
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
    // Checkpoints in the order the scan reaches them; the ledger's own before a held one of
    // the same size.
    let mut order: Vec<usize> = (0..cps.len()).collect();
    order.sort_by_key(|&i| (cps[i].size, cps[i].held, i));
    let state = read_state(dir);
    let first_label = segs
        .first()
        .map_or_else(|| "segments/".to_string(), |s| s.label.clone());
    let mut next = 0;
    let mut good = 0u64;
    let mut checked = 0usize;
    while next < order.len() && cps[order[next]].size == 0 {
        let cp = &cps[order[next]];
        if cp.root != EMPTY_ROOT {
            return Err(VerifyError::RootMismatch {
                segment: first_label,
                checkpoint: cp.label.clone(),
                size: 0,
                from: 1,
            });
        }
        checked += 1;
        next += 1;
    }
    let mut tree = Tree::new();
    let mut chain = CHAIN_START;
    let mut chain_checked_at = None;
    // The first record of each segment reached, to name the segment of a record.
    let mut starts: Vec<(u64, usize)> = Vec::new();
    let segment_of = |starts: &[(u64, usize)], seq: u64| -> String {
        let i = starts.partition_point(|(first, _)| *first <= seq);
        let si = if i == 0 { 0 } else { starts[i - 1].1 };
        segs.get(si).map_or_else(String::new, |s| s.label.clone())
    };
    let (records, bytes) = scan(&segs, progress, &mut |si, seq, payload| {
        if starts.last().is_none_or(|(_, s)| *s != si) {
            starts.push((seq, si));
        }
        let leaf = leaf_hash(payload);
        chain = frame::chain_next(&chain, &leaf);
        tree.push(leaf);
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
        Ok(true)
    })?;
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
    })
}

/// The leaf hashes of the first `size` records, and the payload of record `want` if asked.
fn leaves(
    segs: &[Seg],
    size: u64,
    want: Option<u64>,
) -> Result<(Vec<Hash>, Option<Vec<u8>>), VerifyError> {
    let mut out = Vec::with_capacity(size.min(1 << 24) as usize);
    let mut payload = None;
    if size == 0 {
        return Ok((out, payload));
    }
    scan(segs, &mut |_, _| {}, &mut |_, seq, p| {
        out.push(leaf_hash(p));
        if Some(seq) == want {
            payload = Some(p.to_vec());
        }
        Ok(seq < size)
    })?;
    Ok((out, payload))
}

/// The checkpoint to prove against: the largest one of the ledger covering `size` records
/// (the last written of equal ones).
fn covering(cps: &[Cp], size: u64) -> Option<&Cp> {
    cps.iter().filter(|c| c.size >= size).max_by_key(|c| c.size)
}

fn check_root(segs: &[Seg], leaves: &[Hash], cp: &Cp) -> Result<(), VerifyError> {
    if (leaves.len() as u64) < cp.size {
        return Err(VerifyError::Truncated {
            segment: segs.last().map_or_else(String::new, |s| s.label.clone()),
            records: leaves.len() as u64,
            checkpoint: cp.label.clone(),
            covers: cp.size,
        });
    }
    if root(leaves) != cp.root {
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
    let Some(cp) = covering(&cps, seq) else {
        return Err(VerifyError::NotCovered {
            seq,
            latest: cps.iter().map(|c| c.size).max().unwrap_or(0),
        });
    };
    let segs = segment_list(dir)?;
    let (leaves, payload) = leaves(&segs, cp.size, Some(seq))?;
    check_root(&segs, &leaves, cp)?;
    let payload = payload.ok_or_else(|| VerifyError::Usage(format!("record {seq} not found")))?;
    let record: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    Ok(json!({
        "type": "inclusion",
        "record": record,
        "record_bytes": B64.encode(&payload),
        "seq": seq,
        "leaf_index": seq - 1,
        "tree_size": cp.size,
        "audit_path": b64_list(&inclusion_proof(&leaves, seq - 1)),
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
    let (leaves, _) = leaves(&segs, new.size, None)?;
    check_root(&segs, &leaves, new)?;
    check_root(&segs, &leaves[..old.size as usize], old)?;
    Ok(json!({
        "type": "consistency",
        "old_size": old.size,
        "new_size": new.size,
        "proof": b64_list(&consistency_proof(&leaves, old.size)),
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
            // A sealed record (encryption at rest) proves its ciphertext; it is read with the
            // key, not from the proof.
            if bytes.first() != Some(&crate::ledger_crypt::SEALED) {
                let parsed: Value = serde_json::from_slice(&bytes)
                    .map_err(|_| bad("\"record_bytes\" is not the JSON of an audit event"))?;
                if v.get("record") != Some(&parsed) {
                    return Err(bad(
                        "\"record\" is not what \"record_bytes\" hold: the readable record was altered",
                    ));
                }
                if let Some(seq) = parsed.get("seq").and_then(Value::as_u64) {
                    if seq != index + 1 {
                        return Err(bad(format!(
                            "the record is number {seq} but the proof places it at leaf {index} (record {})",
                            index + 1
                        )));
                    }
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

    /// A ledger of `n` events in several 64 KiB segments, a checkpoint covering them all.
    async fn build(n: u64) -> (PathBuf, PathBuf) {
        let root = temp_dir("ledger");
        let dir = root.join("ledger");
        let copy = root.join("copy");
        let opened = LedgerSink::open(LedgerOptions {
            dir: dir.clone(),
            durability: Durability::Async,
            checkpoint_interval: Duration::from_millis(50),
            origin: "apiwarden/test".into(),
            copy_to: Some(copy.clone()),
            segment_bytes: 64 << 10,
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
