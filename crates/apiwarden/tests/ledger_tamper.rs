//! The tamper matrix: a ledger of 100 000 events, tampered with in every way an insider with
//! write access to the data directory (but not the signing key) might try, each caught by
//! `apiwarden audit verify` (exit 1) with the right explanation; the untouched ledger verifies
//! clean (exit 0).

mod support;

use apiwarden_core::config::Durability;
use apiwarden_core::event::{AuditEvent, EventKind};
use apiwarden_core::ledger::frame::{self, CHAIN_START, HEADER_LEN};
use apiwarden_core::ledger::merkle::{leaf_hash, Tree};
use apiwarden_gateway::audit::AuditSink;
use apiwarden_gateway::ledger::{LedgerOptions, LedgerSink};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{bin, temp_dir};

const EVENTS: u64 = 100_000;
const ROLLBACK: u64 = 1_000;

fn latest(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|t| {
            if file == "state" {
                serde_json::from_str::<serde_json::Value>(&t).ok()?["size"].as_u64()
            } else {
                t.lines().nth(1)?.parse().ok()
            }
        })
        .unwrap_or(0)
}

/// Appends `n` events to the ledger in `data/ledger`, waits for a checkpoint covering them
/// and for the writer to stop.
fn append(data: &Path, copy: &Path, n: u64, total: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = data.join("ledger");
    rt.block_on(async {
        let opened = LedgerSink::open(LedgerOptions {
            dir: dir.clone(),
            durability: Durability::Async,
            checkpoint_interval: Duration::from_millis(100),
            origin: "apiwarden/tamper-test".into(),
            copy_to: Some(copy.to_path_buf()),
            segment_bytes: 1 << 20,
            segment_max_age: apiwarden_gateway::ledger::SEGMENT_MAX_AGE,
            retention: None,
            node: "tamper-node".into(),
            encryption: None,
        })
        .unwrap();
        let node: Arc<str> = Arc::from("tamper-node");
        for i in 0..n {
            // Checkpoints along the way: a pause longer than the checkpoint interval every
            // 10 000 events.
            if i > 0 && i % 10_000 == 0 {
                opened.sink.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
            let mut e = AuditEvent::new(
                EventKind::System,
                apiwarden_gateway::ids::new_id(),
                node.clone(),
            );
            e.message = Some(format!("event {i} of the tamper matrix"));
            opened.sink.record(Box::new(e));
        }
        opened.sink.flush().await.unwrap();
        drop(opened);
    });
    // The writer writes a last checkpoint (and the state) when its channel closes.
    let t = Instant::now();
    while latest(&dir, "checkpoint") < total || latest(&dir, "state") < total {
        assert!(t.elapsed() < Duration::from_secs(20), "no final checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The segment files in order.
fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("ledger/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Every record of a segment: (seq, frame start, frame end).
fn frames(bytes: &[u8]) -> Vec<(u64, usize, usize)> {
    frame::spans(bytes).unwrap()
}

/// The segment holding record `seq`, its bytes and its frames.
fn find(data: &Path, seq: u64) -> (PathBuf, Vec<u8>, Vec<(u64, usize, usize)>) {
    for path in segments(data) {
        let bytes = std::fs::read(&path).unwrap();
        let fr = frames(&bytes);
        if fr.iter().any(|f| f.0 == seq) {
            return (path, bytes, fr);
        }
    }
    panic!("record {seq} not found");
}

fn name(p: &Path) -> String {
    format!("segments/{}", p.file_name().unwrap().to_string_lossy())
}

/// Runs `apiwarden audit verify`: (exit code, stdout, stderr).
fn verify(config: &Path, data: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = bin()
        .args(["audit", "verify"])
        .args(extra)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tampered(config: &Path, data: &Path, extra: &[&str], expect: &[&str]) {
    let (code, out, err) = verify(config, data, extra);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    eprintln!("  -> {}", err.trim());
}

/// The insider who rewrites the ledger with a forged record: new frames with valid checksums,
/// renumbered records (and their `seq` fields), renamed segments, a recomputed chain in
/// `state`. Only the signed checkpoints cannot be recomputed.
fn insert_forged(data: &Path, at: u64) {
    let mut records: Vec<Vec<u8>> = Vec::new();
    let mut per_segment = Vec::new();
    for path in segments(data) {
        let bytes = std::fs::read(&path).unwrap();
        let fr = frames(&bytes);
        per_segment.push(fr.len());
        for (_, s, e) in fr {
            records.push(bytes[s + HEADER_LEN..e - 4].to_vec());
        }
        std::fs::remove_file(&path).unwrap();
    }
    let mut forged = records[at as usize - 1].clone();
    let text = String::from_utf8(forged.clone()).unwrap();
    forged = text
        .replace("tamper matrix", "tamper MATRIX (forged)")
        .into_bytes();
    assert_ne!(forged, records[at as usize - 1]);
    records.insert(at as usize - 1, forged);
    for (i, r) in records.iter_mut().enumerate().skip(at as usize) {
        let text = String::from_utf8(r.clone()).unwrap();
        // `seq` is the record's last field.
        let old = format!("\"seq\":{}}}", i);
        assert!(text.ends_with(&old), "{text}");
        *r = text
            .replacen(&old, &format!("\"seq\":{}}}", i + 1), 1)
            .into_bytes();
    }
    // The segment holding the forged record gets one more.
    let mut first = 1u64;
    let mut idx = 0usize;
    let mut tree = Tree::new();
    let mut chain = CHAIN_START;
    for mut count in per_segment {
        if idx < at as usize && at as usize <= idx + count {
            count += 1;
        }
        let mut out = Vec::new();
        for (k, r) in records[idx..idx + count].iter().enumerate() {
            frame::encode(first + k as u64, r, &mut out).unwrap();
            let leaf = leaf_hash(r);
            chain = frame::chain_next(&chain, &leaf);
            tree.push(leaf);
        }
        let path = data
            .join("ledger/segments")
            .join(format!("{first:020}.seg"));
        std::fs::write(path, out).unwrap();
        first += count as u64;
        idx += count;
    }
    assert_eq!(idx, records.len());
    let state = serde_json::json!({
        "size": tree.size(),
        "chain": B64.encode(chain),
        "frontier": tree.frontier().iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
    });
    std::fs::write(data.join("ledger/state"), state.to_string()).unwrap();
}

#[test]
fn tamper_matrix_every_change_is_detected_and_explained() {
    let root = temp_dir("tamper");
    let pristine = root.join("pristine");
    let copy = root.join("copy");
    let config = root.join("apiwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = \"{}\"\n\n[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\nauth = [\"none\"]\n",
            pristine.display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    append(&pristine, &copy, EVENTS - ROLLBACK, EVENTS - ROLLBACK);
    let earlier = root.join("earlier");
    copy_dir(&pristine, &earlier);
    append(&pristine, &copy, ROLLBACK, EVENTS);
    eprintln!(
        "built a ledger of {EVENTS} events in {} segments in {:?}",
        segments(&pristine).len(),
        t.elapsed()
    );
    assert!(segments(&pristine).len() >= 5);
    let held = copy.join("checkpoint");
    let held = held.to_str().unwrap();

    // Untouched: intact, also against the checkpoint held elsewhere.
    let t = Instant::now();
    let (code, out, err) = verify(&config, &pristine, &[]);
    let took = t.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("intact: {EVENTS} records")), "{out}");
    eprintln!("audit verify of {EVENTS} events (debug build, whole process): {took:?}");
    let (code, out, err) = verify(&config, &pristine, &["--from-checkpoint", held]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consistent with the checkpoint held"), "{out}");
    let (code, out, _) = verify(&config, &pristine, &["--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "intact");
    assert_eq!(v["records"], EVENTS);

    let case = |tag: &str| -> PathBuf {
        let d = root.join(tag);
        copy_dir(&pristine, &d);
        d
    };

    // 1. One byte of one record's payload changed.
    eprintln!("modify one byte:");
    let d = case("modify");
    let (path, mut bytes, fr) = find(&d, 50_000);
    let (_, s, _) = fr.iter().find(|f| f.0 == 50_000).copied().unwrap();
    bytes[s + HEADER_LEN + 20] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    tampered(
        &config,
        &d,
        &[],
        &[
            &name(&path),
            "record after sequence 49999",
            "modified",
            "checksum",
        ],
    );
    let (code, out, _) = verify(&config, &d, &["--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kind"], "modified");
    assert_eq!(v["seq"], 50_000);
    assert_eq!(v["segment"], name(&path));
    std::fs::remove_dir_all(&d).unwrap();

    // 2. One record deleted (its frame cut out).
    eprintln!("delete a record:");
    let d = case("delete");
    let (path, mut bytes, fr) = find(&d, 50_000);
    let (_, s, e) = fr.iter().find(|f| f.0 == 50_000).copied().unwrap();
    bytes.drain(s..e);
    std::fs::write(&path, &bytes).unwrap();
    tampered(
        &config,
        &d,
        &[],
        &[
            &name(&path),
            "record 50000 is missing",
            "from record 49999 to record 50001",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();

    // 3. A forged record inserted, everything after renumbered, checksums and chain redone.
    eprintln!("insert a forged record with a recomputed chain:");
    let d = case("insert");
    insert_forged(&d, 50_000);
    let (code, out, err) = verify(&config, &d, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("were changed, inserted or removed and their chain recomputed"),
        "{err}"
    );
    let from: u64 = err
        .split("(between ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(from <= 50_000, "{err}");
    eprintln!("  -> {}", err.trim());
    std::fs::remove_dir_all(&d).unwrap();

    // 4. Two records swapped.
    eprintln!("swap two records:");
    let d = case("swap");
    let (path, bytes, fr) = find(&d, 50_000);
    let a = fr.iter().position(|f| f.0 == 50_000).unwrap();
    assert!(a + 1 < fr.len(), "records 50000 and 50001 share a segment");
    let (_, s1, e1) = fr[a];
    let (_, s2, e2) = fr[a + 1];
    let mut swapped = bytes[..s1].to_vec();
    swapped.extend_from_slice(&bytes[s2..e2]);
    swapped.extend_from_slice(&bytes[s1..e1]);
    swapped.extend_from_slice(&bytes[e2..]);
    std::fs::write(&path, &swapped).unwrap();
    tampered(
        &config,
        &d,
        &[],
        &[
            &name(&path),
            "record 50001 comes after record 49999",
            "reordered",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();

    // 5. The tail cut off: the last 10 records; the checkpoint log is left as it was.
    eprintln!("truncate the tail:");
    let d = case("truncate");
    let mut segs = segments(&d);
    while std::fs::metadata(segs.last().unwrap()).unwrap().len() == 0 {
        std::fs::remove_file(segs.pop().unwrap()).unwrap();
    }
    let last = segs.pop().unwrap();
    let bytes = std::fs::read(&last).unwrap();
    let fr = frames(&bytes);
    let cut = fr.len().min(10);
    let keep = fr[fr.len() - cut].1;
    std::fs::write(&last, &bytes[..keep]).unwrap();
    tampered(
        &config,
        &d,
        &[],
        &[
            &name(&last),
            &format!("the ledger ends at record {}", EVENTS - cut as u64),
            &format!("covers {EVENTS}: records were cut off"),
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();

    // 6. A checkpoint's signature replaced (other bytes under the real key's name and id).
    eprintln!("replace a checkpoint signature:");
    let d = case("signature");
    let log = d.join("ledger/checkpoints.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(lines.len() >= 3, "{text}");
    let v: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    let note = v["note"].as_str().unwrap();
    let (body, sig_line) = note.trim_end().rsplit_once('\n').unwrap();
    let (prefix, sig) = sig_line.rsplit_once(' ').unwrap();
    let mut raw = B64.decode(sig).unwrap();
    // 64 bytes that are not the key's signature of this text.
    let fake = ring::digest::digest(&ring::digest::SHA512, body.as_bytes());
    raw[4..].copy_from_slice(fake.as_ref());
    let replaced = format!("{body}\n{prefix} {}\n", B64.encode(&raw));
    lines[2] = serde_json::json!({ "note": replaced }).to_string();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    tampered(
        &config,
        &d,
        &[],
        &["checkpoints.log line 3", "does not verify", "altered"],
    );
    std::fs::remove_dir_all(&d).unwrap();

    // 7. The whole ledger rolled back to an earlier consistent copy (taken 1 000 events
    // earlier): its own checkpoints agree, so only the checkpoint held elsewhere tells.
    eprintln!("roll the whole ledger back:");
    let (code, out, err) = verify(&config, &earlier, &[]);
    assert_eq!(
        code, 0,
        "the earlier copy is consistent in itself: {out}{err}"
    );
    assert!(out.contains(&format!("intact: {} records", EVENTS - ROLLBACK)));
    tampered(
        &config,
        &earlier,
        &["--from-checkpoint", held],
        &[
            "the ledger was rolled back",
            &format!("ends at record {}", EVENTS - ROLLBACK),
            &format!("covers {EVENTS}"),
        ],
    );

    // Usage and I/O errors exit 2.
    let (code, _, err) = verify(&config, &root.join("nothing-here"), &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = verify(&config, &pristine, &["--from-checkpoint", "/nonexistent"]);
    assert_eq!(code, 2, "{err}");

    let _ = std::fs::remove_dir_all(&root);
}

/// `audit prove` and `audit verify-proof` with only the public key, through the binary.
#[test]
fn prove_and_verify_proof_through_the_cli() {
    let root = temp_dir("prove");
    let data = root.join("data");
    let copy = root.join("copy");
    append(&data, &copy, 500, 500);
    let config = root.join("none.toml");
    let run = |args: &[&str]| {
        let out = bin()
            .arg("audit")
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, key, err) = run(&["public-key"]);
    assert_eq!(code, 0, "{err}");
    assert!(key.starts_with("apiwarden/tamper-test+"), "{key}");
    let key_file = root.join("ledger.vkey");
    std::fs::write(&key_file, &key).unwrap();
    let key_file = key_file.to_str().unwrap();

    // Verify says whose keys it trusted: the ledger's own (replaceable by whoever can write
    // its directory) unless they are pinned.
    let (code, out, err) = run(&["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pass --public-key"), "{out}");
    let (code, out, err) = run(&["verify", "--public-key", key_file]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("pass --public-key"), "{out}");
    // A configured checkpoint copy that is not there is said to be missing.
    let with_copy = root.join("with-copy.toml");
    std::fs::write(
        &with_copy,
        format!(
            "[audit]\ncheckpoint_copy = \"{}\"\n",
            root.join("not-mounted").display()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["audit", "verify", "--config"])
        .arg(&with_copy)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text.contains("not-mounted/checkpoint (audit.checkpoint_copy) is missing"),
        "{text}"
    );

    let (code, proof, err) = run(&["prove", "123"]);
    assert_eq!(code, 0, "{err}");
    let proof_file = root.join("proof.json");
    std::fs::write(&proof_file, &proof).unwrap();
    let proof_file_s = proof_file.to_str().unwrap();
    let verify_proof = || {
        bin()
            .args([
                "audit",
                "verify-proof",
                proof_file_s,
                "--public-key",
                key_file,
            ])
            .output()
            .unwrap()
    };
    let out = verify_proof();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 123 is in the ledger"));

    let mut v: serde_json::Value = serde_json::from_str(&proof).unwrap();
    v["record"]["message"] = "something else".into();
    std::fs::write(&proof_file, v.to_string()).unwrap();
    let out = verify_proof();
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The number shown is the leaf's: a proof whose `seq` claims another is refused.
    let mut v: serde_json::Value = serde_json::from_str(&proof).unwrap();
    v["seq"] = 124.into();
    std::fs::write(&proof_file, v.to_string()).unwrap();
    let out = verify_proof();
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let (code, _, err) = run(&["prove", "501"]);
    assert_eq!(code, 2);
    assert!(err.contains("wait for the next checkpoint"), "{err}");

    let (code, c, err) = run(&["consistency", "500"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(&proof_file, &c).unwrap();
    let out = verify_proof();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let _ = std::fs::remove_dir_all(&root);
}
