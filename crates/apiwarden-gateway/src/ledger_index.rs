//! The search index of the audit ledger: one sidecar file per segment
//! (`segments/<first seq>.idx` beside `<first seq>.seg`) with a fixed-size entry per record,
//! so that `audit search` (and the admin API's) reads a few bytes per event instead of parsing
//! every record.
//!
//! ```text
//! header (16 bytes): b"AWIX", version 1, 3 zero bytes, key check u64 LE
//! entry  (36 bytes): seq u64 | time ms i64 | frame offset u32 | consumer u32 | key id u32 |
//!                    client ip u32 | status u16 | outcome u8 (0 none, 1 allow, 2 deny) | 0
//! ```
//!
//! The consumer, key id and client IP are stored as 32-bit keyed hashes (SipHash-1-3 under an
//! *index key*), never as text: an encrypted ledger's index, whose key derives from the master
//! key, tells nothing about who called without that key; a clear ledger's derives from its
//! salt. A hash only narrows the search: every candidate record is read, opened and checked
//! against the filter itself, so collisions, a stale entry or a tampered index can hide an
//! event from a search but never show a wrong one. Integrity is `audit verify`'s job, which
//! never reads the index.
//!
//! The writer appends the entries of the segment it writes (no fsync: the index is derived
//! data); a search builds the missing sidecar of a sealed segment once (and keeps it), and
//! reads records past the last entry of the segment being written directly.

use crate::ledger::{segments, LedgerError, SearchFilter};
use crate::ledger_crypt::Opener;
use apiwarden_core::event::{AuditEvent, Outcome};
use apiwarden_core::ledger::frame::{self, FrameError};
use siphasher::sip::SipHasher13;
use std::fs::File;
use std::hash::Hasher;
use std::io::Read;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 4] = b"AWIX";
const VERSION: u8 = 1;
/// Bytes of the sidecar's header.
pub const HEADER_LEN: usize = 16;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 36;

/// The key of the index's hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IndexKey([u8; 16]);

/// Never the key itself.
impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(..)")
    }
}

impl IndexKey {
    fn derive(secret: &[u8]) -> IndexKey {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&k, b"apiwarden ledger index v1");
        IndexKey(tag.as_ref()[..16].try_into().expect("16 bytes"))
    }

    /// The key of an encrypted ledger's index, from its master key.
    pub fn from_master(master: &[u8; 32]) -> IndexKey {
        IndexKey::derive(master)
    }

    /// The key of a clear ledger's index, from its salt.
    pub fn from_salt(salt: &[u8]) -> IndexKey {
        IndexKey::derive(salt)
    }

    fn hasher(&self) -> SipHasher13 {
        let (a, b) = self.0.split_at(8);
        SipHasher13::new_with_keys(
            u64::from_le_bytes(a.try_into().expect("8 bytes")),
            u64::from_le_bytes(b.try_into().expect("8 bytes")),
        )
    }

    /// A value's 32-bit hash under this key; never 0, which means "absent".
    fn term(&self, field: u8, value: &[u8]) -> u32 {
        let mut h = self.hasher();
        h.write_u8(field);
        h.write(value);
        (h.finish() as u32).max(1)
    }

    fn consumer(&self, v: Option<&str>) -> u32 {
        v.map_or(0, |v| self.term(b'c', v.as_bytes()))
    }

    fn key_id(&self, v: Option<&str>) -> u32 {
        v.map_or(0, |v| self.term(b'k', v.as_bytes()))
    }

    fn ip(&self, v: Option<IpAddr>) -> u32 {
        match v {
            None => 0,
            Some(IpAddr::V4(a)) => self.term(b'i', &a.octets()),
            Some(IpAddr::V6(a)) => self.term(b'i', &a.octets()),
        }
    }

    /// What the sidecar's header holds, to tell which key its hashes were made with.
    fn check(&self) -> u64 {
        let mut h = self.hasher();
        h.write(b"check");
        h.finish()
    }

    /// A sidecar's header for this key.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[8..].copy_from_slice(&self.check().to_le_bytes());
        h
    }
}

/// The sidecar of the segment at `segment` (`….seg` → `….idx`).
pub fn sidecar_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

/// One record's entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: i64,
    pub offset: u32,
    pub consumer: u32,
    pub key_id: u32,
    pub ip: u32,
    pub status: u16,
    pub outcome: u8,
}

fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn outcome_code(o: Option<&str>) -> u8 {
    match o {
        Some("allow") => 1,
        Some("deny") => 2,
        _ => 0,
    }
}

impl Entry {
    /// The entry of an event the writer is about to write at `offset` of its segment.
    pub fn of_event(e: &AuditEvent, offset: u64, key: &IndexKey) -> Entry {
        Entry {
            seq: e.seq,
            time_ms: millis(e.time),
            offset: offset as u32,
            consumer: key.consumer(e.identity.consumer.as_deref()),
            key_id: key.key_id(e.identity.key_id.as_deref()),
            ip: key.ip(e.client.ip),
            status: e.response.status,
            outcome: match e.decision.outcome {
                Outcome::Allow => 1,
                Outcome::Deny => 2,
            },
        }
    }

    /// The entry of a record read back (the event's JSON), the same as [`Entry::of_event`]
    /// made when it was written.
    pub fn of_json(seq: u64, offset: u64, e: &serde_json::Value, key: &IndexKey) -> Entry {
        Entry {
            seq,
            time_ms: e["time"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .map_or(0, millis),
            offset: offset as u32,
            consumer: key.consumer(e["identity"]["consumer"].as_str()),
            key_id: key.key_id(e["identity"]["key_id"].as_str()),
            ip: key.ip(e["client"]["ip"].as_str().and_then(|s| s.parse().ok())),
            status: e["response"]["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
            outcome: outcome_code(e["decision"]["outcome"].as_str()),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.consumer.to_le_bytes());
        out.extend_from_slice(&self.key_id.to_le_bytes());
        out.extend_from_slice(&self.ip.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        out.push(self.outcome);
        out.push(0);
    }

    pub fn decode(b: &[u8; ENTRY_LEN]) -> Entry {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Entry {
            seq: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            time_ms: i64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u32_at(16),
            consumer: u32_at(20),
            key_id: u32_at(24),
            ip: u32_at(28),
            status: u16::from_le_bytes(b[32..34].try_into().expect("2 bytes")),
            outcome: b[34],
        }
    }
}

/// The entries of a sidecar's bytes, if its header is valid and made with `key`.
fn entries_of(bytes: &[u8], key: &IndexKey) -> Option<Vec<Entry>> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != key.header() {
        return None;
    }
    Some(
        bytes[HEADER_LEN..]
            .chunks_exact(ENTRY_LEN)
            .map(|c| Entry::decode(c.try_into().expect("ENTRY_LEN bytes")))
            .collect(),
    )
}

/// A search, with its filter turned into what the entries can be compared with.
struct Probe<'a> {
    filter: &'a SearchFilter,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    outcome: Option<u8>,
}

impl Probe<'_> {
    fn new(filter: &SearchFilter) -> Probe<'_> {
        Probe {
            filter,
            // Entries keep milliseconds; events keep microseconds: compare loosely here, the
            // event itself decides.
            since_ms: filter.since.map(|t| millis(t) - 1),
            until_ms: filter.until.map(|t| millis(t) + 1),
            outcome: filter.decision.as_deref().map(|d| outcome_code(Some(d))),
        }
    }

    /// Whether the entry may be of an event that passes; `false` only when it cannot.
    fn may_pass(&self, e: &Entry, key: &IndexKey) -> bool {
        let f = self.filter;
        if f.status.is_some_and(|s| s != e.status)
            || self.outcome.is_some_and(|o| o != e.outcome)
            || self.since_ms.is_some_and(|t| e.time_ms < t)
            || self.until_ms.is_some_and(|t| e.time_ms > t)
        {
            return false;
        }
        if f.consumer
            .as_deref()
            .is_some_and(|c| key.consumer(Some(c)) != e.consumer)
            || f.key
                .as_deref()
                .is_some_and(|k| key.key_id(Some(k)) != e.key_id)
        {
            return false;
        }
        // An IP written another way than the ledger does is left to the event check.
        match f.ip.as_deref().map(|ip| ip.parse::<IpAddr>()) {
            Some(Ok(ip)) => key.ip(Some(ip)) == e.ip,
            _ => true,
        }
    }
}

/// What a search did, for `--stats`, the benchmark and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Segments looked at.
    pub segments: u64,
    /// Index entries compared.
    pub entries: u64,
    /// Records read because their entry may match.
    pub candidates: u64,
    /// Records read one after another because no entry covered them (the segment being
    /// written past its index, or a segment whose index could not be made).
    pub scanned: u64,
    /// Sidecars made during this search.
    pub built: u64,
    /// Events that passed the filter.
    pub found: u64,
}

/// The keys a search can read sidecars with: the master key's (encrypted ledgers), then the
/// salt's. The first is the one a search builds missing sidecars with.
fn keys(dir: &Path, opener: Option<&Opener>) -> Vec<IndexKey> {
    let mut out = Vec::new();
    if let Some(o) = opener {
        out.push(o.index_key());
    }
    if let Ok(salt) = std::fs::read(dir.join("salt")) {
        if salt.len() == 32 {
            out.push(IndexKey::from_salt(&salt));
        }
    }
    out
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LedgerError + '_ {
    move |e| LedgerError::Io {
        path: path.to_path_buf(),
        error: e,
    }
}

/// Whether `entries` (read as a search reads them: stale entries, numbers already passed or
/// offsets past the segment's `len`, skipped) name every record from `first` on, one after
/// another.
fn gapless(entries: &[Entry], first: u64, len: u64) -> bool {
    let mut expect = first;
    for e in entries {
        if e.seq < expect || u64::from(e.offset) >= len {
            continue;
        }
        if e.seq != expect {
            return false;
        }
        expect += 1;
    }
    true
}

/// Every event of the ledger in `dir` that passes `filter`, in order, at most `limit`: `f`
/// gets its sequence number, its plaintext (JSON) and the parsed event. Sealed records are
/// opened with `opener`. Uses the segments' sidecars, and builds those of sealed segments
/// that have none (when the directory is writable).
pub fn search(
    dir: &Path,
    opener: Option<&Opener>,
    filter: &SearchFilter,
    limit: usize,
    mut f: impl FnMut(u64, &[u8], &serde_json::Value),
) -> Result<SearchStats, LedgerError> {
    search_until(dir, opener, filter, limit, |seq, plain, e| {
        f(seq, plain, e);
        ControlFlow::Continue(())
    })
}

/// [`search`], ended early (after the event it was given) when `f` breaks: a page full by
/// another measure than `limit`.
pub fn search_until(
    dir: &Path,
    opener: Option<&Opener>,
    filter: &SearchFilter,
    limit: usize,
    mut f: impl FnMut(u64, &[u8], &serde_json::Value) -> ControlFlow<()>,
) -> Result<SearchStats, LedgerError> {
    let mut stats = SearchStats::default();
    let probe = Probe::new(filter);
    let keys = keys(dir, opener);
    let segs = segments(dir)?;
    let last = segs.len().saturating_sub(1);
    let mut next_seq = 0u64;
    let mut emit =
        |seq: u64, payload: &[u8], stats: &mut SearchStats| -> Result<bool, LedgerError> {
            let plain = crate::ledger_crypt::open_with(opener, seq, payload)?;
            let Ok(e) = serde_json::from_slice::<serde_json::Value>(&plain) else {
                return Ok(false);
            };
            if filter.passes(&e) {
                stats.found += 1;
                if f(seq, &plain, &e).is_break() {
                    return Ok(true);
                }
            }
            Ok(stats.found as usize >= limit)
        };
    if limit == 0 {
        return Ok(stats);
    }
    // Records up to `after` are passed over: whole segments without reading them.
    let after = filter.after.unwrap_or(0);
    for (i, (first, path)) in segs.iter().enumerate() {
        if segs
            .get(i + 1)
            .is_some_and(|(next, _)| *next <= after.saturating_add(1))
        {
            next_seq = segs[i + 1].0;
            continue;
        }
        stats.segments += 1;
        let side = sidecar_path(path);
        let len = std::fs::metadata(path).map_err(io(path))?.len();
        // A sidecar is only trusted when its entries name every record from the segment's
        // first on, without a gap: an entry deleted (or a sidecar restored from an older
        // backup) must not hide an event from a search. Otherwise the segment is read whole.
        let mut found: Option<(Vec<Entry>, IndexKey)> = std::fs::read(&side)
            .ok()
            .and_then(|b| keys.iter().find_map(|k| entries_of(&b, k).map(|e| (e, *k))))
            .filter(|(entries, _)| gapless(entries, *first, len));
        if found.is_none() && i != last {
            if let Some(key) = keys.first() {
                if let Ok(entries) = build(path, opener, key) {
                    stats.built += 1;
                    found = Some((entries, *key));
                }
            }
        }
        // Records from `from` (a file offset) on are read one after another.
        let mut from = 0u64;
        if let Some((entries, key)) = &found {
            let file = File::open(path).map_err(io(path))?;
            let mut buf = Vec::new();
            let mut covered_to = 0u64;
            let mut mismatch = false;
            for e in entries {
                stats.entries += 1;
                // Stale entries (records cut after a crash, whose numbers were used again)
                // come before the current ones: only increasing numbers count.
                if e.seq < next_seq || u64::from(e.offset) >= len {
                    continue;
                }
                next_seq = e.seq + 1;
                covered_to = u64::from(e.offset);
                if e.seq <= after || !probe.may_pass(e, key) {
                    continue;
                }
                match read_frame(&file, u64::from(e.offset), &mut buf) {
                    Some((seq, range)) if seq == e.seq => {
                        stats.candidates += 1;
                        if emit(seq, &buf[range], &mut stats)? {
                            return Ok(stats);
                        }
                    }
                    // Not the record the entry names: the sidecar is wrong from here on, so
                    // the segment is read from its start, past the records already seen.
                    _ => {
                        next_seq = e.seq;
                        mismatch = true;
                        break;
                    }
                }
            }
            // The rest of the segment, past the last entry (the writer's index may lag its
            // records by a moment, or stop early after a failure), is read one record after
            // another; for a whole index that is the last record, already seen.
            if !mismatch {
                from = covered_to;
            }
        }
        let mut bytes = Vec::new();
        let mut file = File::open(path).map_err(io(path))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(from)).map_err(io(path))?;
        file.read_to_end(&mut bytes).map_err(io(path))?;
        let mut offset = 0usize;
        while offset < bytes.len() {
            let (fr, used) = match frame::decode(&bytes[offset..]) {
                Ok(r) => r,
                Err(FrameError::Truncated { .. }) if i == last => break,
                Err(error) => {
                    return Err(LedgerError::Corrupt {
                        segment: path.clone(),
                        after_seq: next_seq.saturating_sub(1),
                        offset: from + offset as u64,
                        error,
                    })
                }
            };
            offset += used;
            if fr.seq < next_seq {
                continue;
            }
            next_seq = fr.seq + 1;
            if fr.seq <= after {
                continue;
            }
            stats.scanned += 1;
            if emit(fr.seq, fr.payload, &mut stats)? {
                return Ok(stats);
            }
        }
    }
    Ok(stats)
}

/// Reads the frame at `offset` of `file` into `buf`: its sequence number and where its payload
/// is in `buf`; `None` when no whole, valid record starts there.
fn read_frame(
    file: &File,
    offset: u64,
    buf: &mut Vec<u8>,
) -> Option<(u64, std::ops::Range<usize>)> {
    let mut head = [0u8; frame::HEADER_LEN];
    if file.read_exact_at(&mut head, offset).is_err() || head[0] != frame::MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
    if len > frame::MAX_RECORD {
        return None;
    }
    buf.resize(frame::OVERHEAD + len, 0);
    file.read_exact_at(buf, offset).ok()?;
    let (fr, _) = frame::decode(buf).ok()?;
    Some((
        fr.seq,
        frame::HEADER_LEN..frame::HEADER_LEN + fr.payload.len(),
    ))
}

/// Makes the sidecar of a sealed segment from its records (kept when the directory is
/// writable), and returns its entries.
pub fn build(
    segment: &Path,
    opener: Option<&Opener>,
    key: &IndexKey,
) -> Result<Vec<Entry>, LedgerError> {
    let bytes = std::fs::read(segment).map_err(io(segment))?;
    let mut entries = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Ok((fr, used)) = frame::decode(&bytes[offset..]) else {
            break;
        };
        let plain = crate::ledger_crypt::open_with(opener, fr.seq, fr.payload)?;
        let e =
            serde_json::from_slice::<serde_json::Value>(&plain).unwrap_or(serde_json::Value::Null);
        entries.push(Entry::of_json(fr.seq, offset as u64, &e, key));
        offset += used;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&key.header());
    for e in &entries {
        e.encode(&mut out);
    }
    let side = sidecar_path(segment);
    let tmp = side.with_extension("idx.tmp");
    let written = crate::ledger::create_private(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &out));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, &side);
    }
    Ok(entries)
}

/// The writer's side: the sidecar of the segment being written, with the entries of the
/// records it holds so far (made again from the records after a crash).
pub struct SidecarWriter {
    file: File,
    pending: Vec<u8>,
}

impl SidecarWriter {
    /// Opens the sidecar of `segment` (`segment_len` bytes of whole records) to append to:
    /// entries of records past the end (cut after a crash) are dropped, and records without an
    /// entry (the index lags the records by a write) get theirs. `None` when that cannot be
    /// done: searches then read the segment's records one after another.
    pub fn open(
        segment: &Path,
        segment_len: u64,
        key: IndexKey,
        opener: Option<&Opener>,
    ) -> Option<SidecarWriter> {
        let side = sidecar_path(segment);
        let old = std::fs::read(&side).unwrap_or_default();
        let mut keep: Vec<Entry> = entries_of(&old, &key)
            .unwrap_or_default()
            .into_iter()
            .take_while(|e| u64::from(e.offset) < segment_len)
            .collect();
        // Entries are made again for the records after the last entry kept.
        let bytes = match std::fs::read(segment) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(_) => return None,
        };
        let mut offset = 0usize;
        if let Some(last) = keep.last() {
            match frame::decode(&bytes[last.offset as usize..]) {
                Ok((fr, used)) if fr.seq == last.seq => offset = last.offset as usize + used,
                _ => keep.clear(),
            }
        }
        while offset < (segment_len as usize).min(bytes.len()) {
            let Ok((fr, used)) = frame::decode(&bytes[offset..]) else {
                break;
            };
            let plain = crate::ledger_crypt::open_with(opener, fr.seq, fr.payload).ok()?;
            let e = serde_json::from_slice::<serde_json::Value>(&plain)
                .unwrap_or(serde_json::Value::Null);
            keep.push(Entry::of_json(fr.seq, offset as u64, &e, &key));
            offset += used;
        }
        let mut out = Vec::with_capacity(HEADER_LEN + keep.len() * ENTRY_LEN);
        out.extend_from_slice(&key.header());
        for e in &keep {
            e.encode(&mut out);
        }
        let tmp = side.with_extension("idx.tmp");
        std::io::Write::write_all(&mut crate::ledger::create_private(&tmp).ok()?, &out).ok()?;
        std::fs::rename(&tmp, &side).ok()?;
        let file = std::fs::OpenOptions::new().append(true).open(&side).ok()?;
        Some(SidecarWriter {
            file,
            pending: Vec::with_capacity(64 * 1024),
        })
    }

    /// A new, empty sidecar for a new segment.
    pub fn create(segment: &Path, key: IndexKey) -> Option<SidecarWriter> {
        let side = sidecar_path(segment);
        let mut file = crate::ledger::create_private(&side).ok()?;
        std::io::Write::write_all(&mut file, &key.header()).ok()?;
        Some(SidecarWriter {
            file,
            pending: Vec::with_capacity(64 * 1024),
        })
    }

    /// Notes the entry of `e`, written at `offset` of the segment.
    /// Notes the entry of a record just framed (made by the recording thread with
    /// [`Entry::of_event`] under the same key, its sequence number and offset filled in).
    pub fn push_entry(&mut self, entry: Entry) {
        entry.encode(&mut self.pending);
    }

    /// Writes the entries noted, once their records are written (after a failed write of the
    /// records, the entries wait with them). `false` on failure: the caller stops indexing
    /// this segment.
    pub fn write(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let ok = std::io::Write::write_all(&mut self.file, &self.pending).is_ok();
        self.pending.clear();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSink;
    use crate::ledger::{read_plain, LedgerOptions, LedgerSink};
    use apiwarden_core::config::Durability;
    use apiwarden_core::event::{EventKind, Reason};
    use std::sync::Arc;
    use std::time::Duration;

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("aw-index-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn options(dir: &Path, encryption: Option<[u8; 32]>) -> LedgerOptions {
        LedgerOptions {
            dir: dir.join("ledger"),
            durability: Durability::Batched,
            checkpoint_interval: Duration::from_millis(50),
            origin: "apiwarden/test".into(),
            copy_to: None,
            segment_bytes: 16 * 1024,
            segment_max_age: crate::ledger::SEGMENT_MAX_AGE,
            retention: None,
            node: "test".into(),
            encryption,
        }
    }

    const T0: u64 = 1_790_000_000;

    /// Request events of five consumers, their keys, IPv4 and IPv6 clients, statuses and
    /// decisions, one second apart.
    fn event(i: u64) -> Box<AuditEvent> {
        let mut e = AuditEvent::new(EventKind::Request, crate::ids::new_id(), Arc::from("t"));
        e.time = UNIX_EPOCH + Duration::from_millis(T0 * 1000 + i * 1000 + i % 7);
        if !i.is_multiple_of(6) {
            e.identity.consumer = Some(format!("consumer-{}", i % 5));
            e.identity.key_id = Some(format!("awk_{}", i % 11));
        }
        e.client.ip = Some(if i.is_multiple_of(3) {
            format!("2001:db8::{}", i % 4).parse().unwrap()
        } else {
            format!("203.0.113.{}", i % 9).parse().unwrap()
        });
        e.request.path = Some(format!("/orders/{i}"));
        e.response.status = [200, 201, 401, 403, 429, 404][(i % 6) as usize];
        if e.response.status >= 400 {
            e.decision.outcome = Outcome::Deny;
            e.decision.reason = Reason::RouteNotFound;
        }
        Box::new(e)
    }

    async fn write(opts: &LedgerOptions, range: std::ops::Range<u64>) {
        let opened = LedgerSink::open(opts.clone()).unwrap();
        for i in range {
            opened.sink.record(event(i));
            // Written in several batches, so that segments rotate near their size.
            if i % 200 == 199 {
                opened.sink.flush().await.unwrap();
            }
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    fn at(i: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + i)
    }

    fn filters() -> Vec<SearchFilter> {
        let s = |v: &str| Some(v.to_string());
        vec![
            SearchFilter::default(),
            SearchFilter {
                consumer: s("consumer-3"),
                ..Default::default()
            },
            SearchFilter {
                consumer: s("nobody"),
                ..Default::default()
            },
            SearchFilter {
                key: s("awk_7"),
                ..Default::default()
            },
            SearchFilter {
                ip: s("203.0.113.4"),
                ..Default::default()
            },
            SearchFilter {
                ip: s("2001:db8::2"),
                ..Default::default()
            },
            SearchFilter {
                status: Some(429),
                ..Default::default()
            },
            SearchFilter {
                decision: s("deny"),
                ..Default::default()
            },
            SearchFilter {
                decision: s("allow"),
                consumer: s("consumer-1"),
                ..Default::default()
            },
            SearchFilter {
                since: Some(at(1500)),
                until: Some(at(1600)),
                ..Default::default()
            },
            SearchFilter {
                since: Some(at(2990)),
                ..Default::default()
            },
            SearchFilter {
                consumer: s("consumer-2"),
                key: s("awk_2"),
                status: Some(201),
                since: Some(at(100)),
                ..Default::default()
            },
        ]
    }

    /// What a search must find: every record read and checked.
    fn truth(dir: &Path, opener: Option<&Opener>, f: &SearchFilter) -> Vec<u64> {
        let mut out = Vec::new();
        read_plain(dir, opener, |seq, p| {
            if f.passes(&serde_json::from_slice(p).unwrap()) {
                out.push(seq);
            }
        })
        .unwrap();
        out
    }

    fn found(dir: &Path, opener: Option<&Opener>, f: &SearchFilter) -> (Vec<u64>, SearchStats) {
        let mut out = Vec::new();
        let stats = search(dir, opener, f, usize::MAX, |seq, _, _| out.push(seq)).unwrap();
        (out, stats)
    }

    #[tokio::test]
    async fn the_index_finds_what_reading_every_record_finds_and_reads_little() {
        let dir = temp();
        let opts = options(&dir, None);
        write(&opts, 0..3000).await;
        let ledger = dir.join("ledger");
        let segs = segments(&ledger).unwrap();
        assert!(segs.len() > 5, "{} segments", segs.len());
        for f in filters() {
            let want = truth(&ledger, None, &f);
            let (got, stats) = found(&ledger, None, &f);
            assert_eq!(got, want);
            assert_eq!(stats.found as usize, want.len());
            assert_eq!(stats.built, 0, "the writer indexed every segment");
            // Only records that may match are read (and at most a few past the index).
            assert!(
                stats.candidates + stats.scanned <= want.len() as u64 + 50,
                "{stats:?} for {} events",
                want.len()
            );
        }
        // The limit stops early.
        let mut n = 0;
        let f = SearchFilter {
            decision: Some("deny".into()),
            ..Default::default()
        };
        let stats = search(&ledger, None, &f, 10, |_, _, _| n += 1).unwrap();
        assert_eq!((n, stats.found), (10, 10));
        // So does the caller (a page full by its bytes): nothing is read past the event it
        // stopped at (the admin API's page read on to `limit` behind a full page).
        let mut n = 0;
        let stats = search_until(&ledger, None, &f, 1000, |_, _, _| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!((n, stats.found), (3, 3));
        assert!(stats.candidates + stats.scanned <= 3 + 50, "{stats:?}");
        // Pages: each one after the last record of the one before finds the rest, in order,
        // and skips the segments wholly before it.
        for f in filters() {
            let want = truth(&ledger, None, &f);
            let mut pages = Vec::new();
            let mut after = None;
            loop {
                let mut page = Vec::new();
                let paged = SearchFilter { after, ..f.clone() };
                let stats = search(&ledger, None, &paged, 97, |seq, _, _| page.push(seq)).unwrap();
                if after.is_some_and(|a| a > segs[1].0) {
                    assert!(
                        stats.segments < segs.len() as u64,
                        "{stats:?} after {after:?}"
                    );
                }
                pages.extend_from_slice(&page);
                if page.len() < 97 {
                    break;
                }
                after = page.last().copied();
            }
            assert_eq!(pages, want);
        }
        // From a segment's first record, and past the end.
        let from = segs[3].0;
        let (got, _) = found(
            &ledger,
            None,
            &SearchFilter {
                after: Some(from - 1),
                ..Default::default()
            },
        );
        assert_eq!(got.first(), Some(&from));
        assert_eq!(got.len() as u64, 3000 + 1 - from);
        let (got, _) = found(
            &ledger,
            None,
            &SearchFilter {
                after: Some(3000),
                ..Default::default()
            },
        );
        assert!(got.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn missing_sidecars_are_made_and_a_damaged_one_never_shows_a_wrong_event() {
        let dir = temp();
        let opts = options(&dir, None);
        write(&opts, 0..2000).await;
        let ledger = dir.join("ledger");
        let segs = segments(&ledger).unwrap();
        for (_, p) in &segs {
            std::fs::remove_file(sidecar_path(p)).unwrap();
        }
        let f = SearchFilter {
            consumer: Some("consumer-4".into()),
            ..Default::default()
        };
        let want = truth(&ledger, None, &f);
        let (got, stats) = found(&ledger, None, &f);
        assert_eq!(got, want);
        assert_eq!(
            stats.built as usize,
            segs.len() - 1,
            "sealed segments get theirs"
        );
        assert!(sidecar_path(&segs[0].1).exists());
        let (again, stats) = found(&ledger, None, &f);
        assert_eq!((again, stats.built), (want.clone(), 0));

        // Entries overwritten with noise (valid header): what is found is still right.
        let side = sidecar_path(&segs[1].1);
        let mut bytes = std::fs::read(&side).unwrap();
        for (i, b) in bytes[HEADER_LEN..].iter_mut().enumerate() {
            *b = (i * 131 % 251) as u8;
        }
        std::fs::write(&side, &bytes).unwrap();
        for f in filters() {
            let want = truth(&ledger, None, &f);
            let (got, _) = found(&ledger, None, &f);
            assert_eq!(got, want, "nothing wrong is shown, and nothing hidden");
        }

        // One entry taken out of the middle of a sidecar (its header still valid): the
        // record it named is still found, the segment being read whole.
        let side = sidecar_path(&segs[0].1);
        let mut bytes = std::fs::read(&side).unwrap();
        let at = HEADER_LEN + 10 * ENTRY_LEN;
        bytes.drain(at..at + ENTRY_LEN);
        std::fs::write(&side, &bytes).unwrap();
        let all = SearchFilter::default();
        let want = truth(&ledger, None, &all);
        let (got, _) = found(&ledger, None, &all);
        assert_eq!(got, want, "the record of the missing entry is found");
        assert!(got.contains(&(segs[0].0 + 10)), "{got:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn after_a_crash_the_writer_mends_the_index_of_its_segment() {
        let dir = temp();
        let mut opts = options(&dir, None);
        opts.segment_bytes = 1 << 30;
        write(&opts, 0..300).await;
        let ledger = dir.join("ledger");
        let seg = segments(&ledger).unwrap().pop().unwrap().1;
        let side = sidecar_path(&seg);
        // The index lost its last 40 entries (the crash came between the two writes), and has
        // entries of records past the end of the segment (cut as torn).
        let mut bytes = std::fs::read(&side).unwrap();
        bytes.truncate(bytes.len() - 40 * ENTRY_LEN);
        let stale = Entry {
            seq: 301,
            offset: std::fs::metadata(&seg).unwrap().len() as u32,
            status: 201,
            ..Default::default()
        };
        stale.encode(&mut bytes);
        std::fs::write(&side, &bytes).unwrap();
        write(&opts, 300..400).await;
        let entries = entries_of(
            &std::fs::read(&side).unwrap(),
            &IndexKey::from_salt(&std::fs::read(ledger.join("salt")).unwrap()),
        )
        .unwrap();
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=400).collect::<Vec<u64>>(),
            "one entry per record, in order"
        );
        for f in filters() {
            let (got, stats) = found(&ledger, None, &f);
            assert_eq!(got, truth(&ledger, None, &f));
            assert!(stats.scanned <= 1, "{stats:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_encrypted_ledger_s_index_needs_the_master_key() {
        let dir = temp();
        let master = [7u8; 32];
        let opts = options(&dir, Some(master));
        write(&opts, 0..1500).await;
        let ledger = dir.join("ledger");
        let opener = Opener::load(&ledger, &master).unwrap();
        for f in filters() {
            let (got, stats) = found(&ledger, Some(&opener), &f);
            assert_eq!(got, truth(&ledger, Some(&opener), &f));
            assert_eq!(stats.built, 0);
        }
        // The sidecars are keyed by the master key, not by the salt that lies beside them.
        let seg = &segments(&ledger).unwrap()[0].1;
        let bytes = std::fs::read(sidecar_path(seg)).unwrap();
        assert!(entries_of(&bytes, &opener.index_key()).is_some());
        if let Ok(salt) = std::fs::read(ledger.join("salt")) {
            assert!(entries_of(&bytes, &IndexKey::from_salt(&salt)).is_none());
        }
        // Without the key a search refuses rather than guessing.
        let f = SearchFilter {
            consumer: Some("consumer-1".into()),
            ..Default::default()
        };
        assert!(search(&ledger, None, &f, 10, |_, _, _| {}).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
