//! `apiwarden audit verify|prove|consistency|verify-proof|public-key`: checks of the
//! tamper-evident audit ledger that an auditor runs offline. The checks themselves are in
//! `apiwarden_gateway::ledger_verify`.
//!
//! Exit codes: 0 intact (or the proof holds), 1 tampered or damaged (with the explanation),
//! 2 usage or I/O errors.

use anyhow::Result;
use apiwarden_gateway::ledger;
use apiwarden_gateway::ledger_verify::{self, VerifyError};
use clap::Subcommand;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole ledger: framing and checksums, sequence numbers without gaps, the hash
    /// chain, the Merkle root at every signed checkpoint and the checkpoint signatures. Exit 0
    /// when intact, 1 when tampered or damaged (naming the segment file, the sequence number
    /// and what is wrong), 2 on usage or I/O errors.
    Verify {
        /// A checkpoint held elsewhere (e.g. the copy in audit.checkpoint_copy, or one an
        /// auditor saved earlier): the ledger must be consistent with it, which catches a
        /// truncated or rolled-back ledger. Defaults to audit.checkpoint_copy's copy, if set.
        #[arg(long, value_name = "FILE")]
        from_checkpoint: Option<PathBuf>,
        /// File(s) of trusted public keys (`apiwarden audit public-key` output); by default
        /// the ledger's own keys/*.vkey.
        #[arg(long, value_name = "FILE")]
        public_key: Vec<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the inclusion proof (JSON) of record SEQ against the latest checkpoint covering
    /// it: the record, its leaf index, the audit path and the signed checkpoint.
    Prove {
        /// The record's sequence number.
        seq: u64,
    },
    /// Print the proof (JSON) that the ledger's checkpoint of OLD records is a prefix of its
    /// checkpoint of NEW records (the latest by default): nothing before OLD was rewritten.
    Consistency {
        /// The size of the older checkpoint.
        old: u64,
        /// The size of the newer checkpoint; the latest when omitted.
        new: Option<u64>,
    },
    /// Check a proof printed by `audit prove` or `audit consistency` with only the public key:
    /// exit 0 when it holds, 1 when not. Needs no config and no ledger.
    VerifyProof {
        /// The proof (JSON); `-` reads standard input.
        file: PathBuf,
        /// File(s) of trusted public keys, one vkey a line (`apiwarden audit public-key`).
        #[arg(long, value_name = "FILE", required = true)]
        public_key: Vec<PathBuf>,
    },
    /// Print the public key(s) the ledger's checkpoints are signed with (every key it has used,
    /// one vkey a line), to give to auditors.
    PublicKey,
    /// Find events: every filter given must match. A table, or NDJSON with --json. Uses the
    /// ledger's search index (segments/*.idx; made for older segments on first use) and reads
    /// only the records that may match.
    Search {
        #[arg(long)]
        consumer: Option<String>,
        /// API key id.
        #[arg(long)]
        key: Option<String>,
        /// Client IP.
        #[arg(long)]
        ip: Option<String>,
        /// Response status.
        #[arg(long)]
        status: Option<u16>,
        /// `allow` or `deny`.
        #[arg(long)]
        decision: Option<String>,
        /// From this time on: a duration back from now (`1h`, `30m`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339, or a duration back from now).
        #[arg(long)]
        until: Option<String>,
        /// At most this many events (the first ones found).
        #[arg(long)]
        limit: Option<usize>,
        /// Only events after this sequence number (the SEQ column; the next page after a
        /// --limit).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print `hmac:<hex>` of VALUE under the ledger's salt: what `audit.hmac_headers` and
    /// `audit.hmac_query` record for that value, to search for it (`audit search --json |
    /// grep`).
    Hash { value: String },
    /// Master key rotation: wrap every data key of the ledger under the key in FILE (32
    /// bytes, raw or 64 hex digits) instead of the current `audit.encryption_key`; then point
    /// `audit.encryption_key` at FILE and destroy the old key.
    Rewrap {
        #[arg(long, value_name = "FILE")]
        new_key: PathBuf,
    },
    /// Stream the ledger's events to standard output, one line each, in a format a SIEM
    /// ingests directly (Splunk, Elastic, QRadar, ArcSight, an OCSF data lake). Values are the
    /// ledger's own: queries stay redacted, `hmac:` values stay HMACs. With --cursor, only
    /// what is new since the last run with the same NAME (at least once: a run that fails
    /// before its output is flushed exports the same events again next time).
    Export {
        /// The output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
        /// From this time on: a duration back from now (`24h`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// A named, persisted position: start after the sequence number saved in
        /// `<data_dir>/ledger/cursors/NAME` (no file: from the start) and, once the output is
        /// flushed, save there the last sequence number exported. NAME: letters, digits, `_`
        /// and `-`, at most 64.
        #[arg(long, value_name = "NAME", value_parser = cursor_name)]
        cursor: Option<String>,
    },
}

/// The formats of `audit export` (`apiwarden_core::siem` maps the events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// NDJSON: the ledger's records as they are.
    Json,
    /// OCSF API Activity (class 6003), one JSON object a line.
    Ocsf,
    /// Elastic Common Schema, one JSON document a line.
    Ecs,
    /// ArcSight Common Event Format (CEF:0).
    Cef,
    /// QRadar Log Event Extended Format 2.0, tab-delimited.
    Leef,
}

impl ExportFormat {
    fn siem(self) -> apiwarden_core::siem::Format {
        use apiwarden_core::siem::Format;
        match self {
            ExportFormat::Json => Format::Json,
            ExportFormat::Ocsf => Format::Ocsf,
            ExportFormat::Ecs => Format::Ecs,
            ExportFormat::Cef => Format::Cef,
            ExportFormat::Leef => Format::Leef,
        }
    }
}

/// `--cursor NAME`: `[A-Za-z0-9_-]{1,64}`, so it is always one plain file name.
fn cursor_name(name: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(name.to_string())
    } else {
        Err("a cursor name is 1 to 64 letters, digits, '_' or '-'".into())
    }
}

/// The sequence number saved in a cursor file; `None` when there is no file yet.
fn read_cursor(path: &Path) -> Option<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text.trim().parse().unwrap_or_else(|_| {
            usage(format!(
                "the cursor {} does not hold a sequence number ({:?}): fix or delete it",
                path.display(),
                text.trim()
            ))
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => usage(format!("cannot read the cursor {}: {e}", path.display())),
    }
}

/// Saves `seq` (decimal, a newline) in the cursor file, atomically and durably: a temporary
/// file, fsync, rename over the cursor, fsync of the directory. Retention reads these files
/// to know what was exported.
fn write_cursor(path: &Path, seq: u64) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ledger::private_dir(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("cursor");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = ledger::create_private(&tmp)?;
        f.write_all(format!("{seq}\n").as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `1h` (that long ago) or an RFC 3339 time.
fn when(flag: &str, text: &str) -> std::time::SystemTime {
    apiwarden_core::units::parse_time(text, std::time::SystemTime::now())
        .unwrap_or_else(|e| usage(format!("--{flag} {e}")))
}

/// Prints the error and exits: 1 for tampering, 2 for usage and I/O errors.
fn fail(e: &VerifyError, json: bool) -> ! {
    if json {
        println!("{}", e.to_json());
    }
    if e.exit_code() == 1 {
        eprintln!("TAMPERED: {e}");
    } else {
        eprintln!("error: {e}");
    }
    std::process::exit(e.exit_code())
}

fn usage(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

/// The ledger directory: `<data_dir>/ledger` of the config, or of `--data-dir` alone when
/// there is no config file (an auditor's copy of the data directory).
fn ledger_dir(config: &Path, data_dir: Option<PathBuf>) -> (PathBuf, Option<PathBuf>) {
    if let (Some(d), false) = (&data_dir, config.exists()) {
        return (d.join("ledger"), None);
    }
    match crate::load_with(config, data_dir) {
        Ok(cfg) => (
            cfg.storage.data_dir.join("ledger"),
            cfg.audit.checkpoint_copy.clone(),
        ),
        Err(e) => usage(format!("{e:#}")),
    }
}

/// The opener of sealed records, when the config sets `audit.encryption_key`.
fn opener_for(
    config: &Path,
    data_dir: Option<PathBuf>,
    dir: &Path,
) -> Option<apiwarden_gateway::ledger_crypt::Opener> {
    if !config.exists() {
        return None;
    }
    let cfg = crate::load_with(config, data_dir).unwrap_or_else(|e| usage(format!("{e:#}")));
    crate::ledger_opener(&cfg, dir).unwrap_or_else(|e| usage(format!("{e:#}")))
}

fn read_keys(files: &[PathBuf]) -> Vec<String> {
    let mut keys = Vec::new();
    for f in files {
        match std::fs::read_to_string(f) {
            Ok(text) => keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            ),
            Err(e) => usage(format!(
                "cannot read the public key file {}: {e}",
                f.display()
            )),
        }
    }
    keys
}

pub fn run(command: AuditCommand, config: &Path, data_dir: Option<PathBuf>) -> Result<()> {
    let data_dir_for_opener = data_dir.clone();
    match command {
        AuditCommand::Search {
            consumer,
            key,
            ip,
            status,
            decision,
            since,
            until,
            limit,
            after,
            json,
        } => {
            if let Some(d) = &decision {
                if d != "allow" && d != "deny" {
                    usage(format!("--decision {d:?}: write allow or deny"));
                }
            }
            let filter = apiwarden_gateway::ledger::SearchFilter {
                consumer,
                key,
                ip,
                status,
                decision,
                since: since.map(|s| when("since", &s)),
                until: until.map(|s| when("until", &s)),
                after,
            };
            let (dir, _) = ledger_dir(config, data_dir);
            let limit = limit.unwrap_or(usize::MAX);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            use std::io::Write;
            if !json {
                let _ = writeln!(
                    out,
                    "{:<8} {:<24} {:<7} {:>6} {:<24} {:<16} {:<14} {:<6} PATH",
                    "SEQ", "TIME", "KIND", "STATUS", "REASON", "CONSUMER", "KEY", "METHOD"
                );
            }
            let opener = opener_for(config, data_dir_for_opener.clone(), &dir);
            let stats = apiwarden_gateway::ledger_index::search(
                &dir,
                opener.as_ref(),
                &filter,
                limit,
                |seq, payload, e| {
                    if json {
                        let _ = out.write_all(payload);
                        let _ = out.write_all(b"\n");
                    } else {
                        let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
                        let _ = writeln!(
                            out,
                            "{:<8} {:<24} {:<7} {:>6} {:<24} {:<16} {:<14} {:<6} {}",
                            seq,
                            s(&e["time"]).get(..23).unwrap_or("-"),
                            s(&e["kind"]),
                            e["response"]["status"].as_u64().unwrap_or(0),
                            s(&e["decision"]["reason"]),
                            s(&e["identity"]["consumer"]),
                            s(&e["identity"]["key_id"]),
                            s(&e["request"]["method"]),
                            s(&e["request"]["path"]),
                        );
                    }
                },
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let found = stats.found;
            drop(out);
            if !json {
                eprintln!(
                    "{found} events ({} index entries compared, {} records read)",
                    stats.entries,
                    stats.candidates + stats.scanned
                );
            }
            Ok(())
        }
        AuditCommand::Rewrap { new_key } => {
            let cfg =
                crate::load_with(config, data_dir).unwrap_or_else(|e| usage(format!("{e:#}")));
            let Some(old) = &cfg.audit.encryption_key else {
                usage("audit.encryption_key is not set: the ledger is not encrypted".into());
            };
            let old = crate::master_key(old)?;
            let new =
                crate::master_key(&apiwarden_core::config::SecretSource::File(new_key.clone()))?;
            let dir = cfg.storage.data_dir.join("ledger");
            let n = apiwarden_gateway::ledger_crypt::rewrap(&dir, &old, &new)?;
            println!(
                "{n} data keys of {} are now wrapped by {}; set audit.encryption_key = \"file:{}\" and destroy the old key",
                dir.display(),
                new_key.display(),
                new_key.display()
            );
            Ok(())
        }
        AuditCommand::Hash { value } => {
            let (dir, _) = ledger_dir(config, data_dir);
            if !dir.join("salt").exists() {
                usage(format!(
                    "{} has no salt yet: start the gateway once (it makes one)",
                    dir.display()
                ));
            }
            let text = apiwarden_gateway::ledger::hmac_of(&dir, &value)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{text}");
            Ok(())
        }
        AuditCommand::Export {
            format,
            since,
            cursor,
        } => {
            let since = since.map(|s| when("since", &s));
            let filter = apiwarden_gateway::ledger::SearchFilter {
                since,
                ..Default::default()
            };
            let (dir, _) = ledger_dir(config, data_dir);
            let cursor_file = cursor.map(|name| ledger::cursor_path(&dir, &name));
            let after = cursor_file.as_deref().and_then(read_cursor);
            let opener = opener_for(config, data_dir_for_opener.clone(), &dir);
            export(
                &dir,
                opener.as_ref(),
                format,
                &filter,
                after,
                cursor_file.as_deref(),
            )
        }
        AuditCommand::Verify {
            from_checkpoint,
            public_key,
            json,
        } => {
            let (dir, copy) = ledger_dir(config, data_dir);
            verify(&dir, from_checkpoint, copy, &public_key, json)
        }
        AuditCommand::Prove { seq } => {
            let (dir, _) = ledger_dir(config, data_dir);
            match ledger_verify::prove(&dir, seq) {
                Ok(p) => println!("{}", serde_json::to_string_pretty(&p)?),
                Err(e) => fail(&e, false),
            }
            Ok(())
        }
        AuditCommand::Consistency { old, new } => {
            let (dir, _) = ledger_dir(config, data_dir);
            match ledger_verify::consistency(&dir, old, new) {
                Ok(p) => println!("{}", serde_json::to_string_pretty(&p)?),
                Err(e) => fail(&e, false),
            }
            Ok(())
        }
        AuditCommand::VerifyProof { file, public_key } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .unwrap_or_else(|e| usage(format!("cannot read standard input: {e}")));
                s
            } else {
                std::fs::read_to_string(&file).unwrap_or_else(|e| {
                    usage(format!("cannot read the proof {}: {e}", file.display()))
                })
            };
            let keys = read_keys(&public_key);
            match ledger_verify::verify_proof(&text, &keys) {
                Ok(cp) => {
                    // The number proven is the leaf's (the proof's own `seq` was checked to match).
                    let what = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("consistency"))
                        .and_then(|v| v.get("leaf_index").and_then(|s| s.as_u64()))
                        .map_or_else(
                            || "the older checkpoint is a prefix of the newer one".to_string(),
                            |leaf| format!("record {} is in the ledger", leaf + 1),
                        );
                    println!(
                        "valid: {what} (checkpoint {} of {} records, root {})",
                        cp.origin,
                        cp.size,
                        ledger_verify::b64(&cp.root)
                    );
                    Ok(())
                }
                Err(e) => fail(&e, false),
            }
        }
        AuditCommand::PublicKey => {
            let (dir, _) = ledger_dir(config, data_dir);
            let keys = ledger::verifier_keys(&dir).unwrap_or_else(|e| usage(e.to_string()));
            if keys.is_empty() {
                usage(format!(
                    "the ledger at {} has no signing key yet: start the gateway once (`apiwarden serve`) and it makes one",
                    dir.display()
                ));
            }
            for k in keys {
                println!("{k}");
            }
            Ok(())
        }
    }
}

/// `audit export`: every record after `after` that passes `filter`, one line each in
/// `format`; then, with a cursor file, the last sequence number written to it once the
/// output is flushed. A record that cannot be read or written stops the export (after saving
/// the cursor up to the records already out, when they were flushed): nothing is skipped.
fn export(
    dir: &Path,
    opener: Option<&apiwarden_gateway::ledger_crypt::Opener>,
    format: ExportFormat,
    filter: &apiwarden_gateway::ledger::SearchFilter,
    after: Option<u64>,
    cursor_file: Option<&Path>,
) -> Result<()> {
    let format = format.siem();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut last = None;
    let mut write_failed = None;
    let mut bad_record = None;
    let mut first_new = None;
    let mut line = |seq: u64, payload: &[u8], event: Option<&serde_json::Value>| {
        if write_failed.is_some() {
            return;
        }
        let written = match event {
            Some(e) if format != apiwarden_core::siem::Format::Json => {
                let mut line = apiwarden_core::siem::to_line(format, e);
                line.push('\n');
                out.write_all(line.as_bytes())
            }
            _ => out.write_all(payload).and_then(|_| out.write_all(b"\n")),
        };
        match written {
            Ok(()) => last = Some(seq),
            Err(e) => write_failed = Some(e),
        }
    };
    let read = if filter.since.is_some() {
        // The search index finds the records from that time on (and after the cursor) without
        // reading the others; each one it finds is checked against the time again.
        let filter = apiwarden_gateway::ledger::SearchFilter {
            after,
            ..filter.clone()
        };
        apiwarden_gateway::ledger_index::search(dir, opener, &filter, usize::MAX, |seq, p, e| {
            line(seq, p, Some(e))
        })
        .map(|_| ())
    } else {
        // Segments wholly at or below the cursor are not read.
        let from = after.map_or(0, |a| a.saturating_add(1));
        ledger::read_plain_from(dir, opener, from, |seq, payload| {
            if bad_record.is_some() || after.is_some_and(|a| seq <= a) {
                return;
            }
            first_new.get_or_insert(seq);
            let event = if format != apiwarden_core::siem::Format::Json {
                match serde_json::from_slice::<serde_json::Value>(payload) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        bad_record = Some(format!("record {seq} is not a JSON event: {e}"));
                        return;
                    }
                }
            } else {
                None
            };
            line(seq, payload, event.as_ref());
        })
        .map(|_| ())
    };
    let flushed = match write_failed {
        Some(e) => Err(e),
        None => out.flush(),
    };
    drop(out);
    if let Err(e) = flushed {
        // Which lines got out is unknown: the cursor stays, they are exported again.
        anyhow::bail!("cannot write the export: {e}");
    }
    if let (Some(file), Some(seq)) = (cursor_file, last) {
        write_cursor(file, seq).map_err(|e| {
            anyhow::anyhow!(
                "the events up to {seq} were exported but the cursor {} could not be saved ({e}): the next run exports them again",
                file.display()
            )
        })?;
    }
    // A cursor past the ledger's end (a ledger restored from a backup, or records cut after a
    // crash whose numbers are used again): the records numbered up to it would be skipped.
    // Looked at only when nothing was new (with `--since`, whether anything was new is not
    // known: always) and the cursor is past what the ledger's `state` says is durable; then
    // the last segment says where the ledger ends.
    if let (Some(a), None, Some(file)) = (after, first_new, cursor_file) {
        let durable = std::fs::read_to_string(dir.join("state"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("size").and_then(|s| s.as_u64()))
            .unwrap_or(0);
        let end = if a > durable {
            let last_first = ledger::segments(dir)
                .ok()
                .and_then(|s| s.last().map(|(first, _)| *first))
                .unwrap_or(0);
            let mut end = last_first.saturating_sub(1);
            let _ = ledger::read_records_from(dir, last_first, |seq, _| end = seq);
            end
        } else {
            a
        };
        if end < a {
            eprintln!(
                "warning: the cursor {} is at record {a}, but the ledger ends at record {end}: records {} to {a}, when they are written, will not be exported with it. If the ledger was restored or cut, write {end} into the cursor file to export from there",
                file.display(),
                end + 1
            );
        }
    }
    // Records after the cursor that retention deleted: the ledger now begins past them.
    let first_held = ledger::segments(dir)
        .ok()
        .and_then(|s| s.first().map(|(first, _)| *first));
    if let (Some(a), Some(first)) = (after, first_held) {
        if first > a.saturating_add(1) {
            eprintln!(
                "warning: records {} to {} are no longer in the ledger (retention deleted them) and were never exported with this cursor",
                a + 1,
                first - 1
            );
        }
    }
    read.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(msg) = bad_record {
        anyhow::bail!("{msg}");
    }
    Ok(())
}

fn verify(
    dir: &Path,
    from_checkpoint: Option<PathBuf>,
    copy: Option<PathBuf>,
    public_key: &[PathBuf],
    json: bool,
) -> Result<()> {
    // The configured copy, when it is not there (an unmounted share): said, not passed over.
    let mut copy_missing = None;
    let held_path = match from_checkpoint {
        Some(p) => Some(p),
        None => copy.map(|c| c.join("checkpoint")).and_then(|p| {
            if p.exists() {
                Some(p)
            } else {
                copy_missing = Some(p);
                None
            }
        }),
    };
    let held = held_path.as_ref().map(|p| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| usage(format!("cannot read the checkpoint {}: {e}", p.display())))
    });
    let keys = (!public_key.is_empty()).then(|| read_keys(public_key));
    let mut bar = Progress::new(!json && std::io::stderr().is_terminal());
    let started = Instant::now();
    let result = ledger_verify::verify_with(dir, held.as_deref(), keys.as_deref(), &mut |r, t| {
        bar.draw(r, t)
    });
    bar.finish();
    match result {
        Ok(report) => {
            if json {
                let mut v = report.to_json();
                v["held_checkpoint"] = held_path.map(|p| p.display().to_string()).into();
                v["checkpoint_copy_missing"] = copy_missing.map(|p| p.display().to_string()).into();
                v["keys_pinned"] = keys.is_some().into();
                v["seconds"] = started.elapsed().as_secs_f64().into();
                println!("{v}");
                return Ok(());
            }
            let records = match &report.retention {
                Some(b) if b.first > 1 => format!(
                    "records {} to {} ({} kept)",
                    b.first,
                    report.records,
                    (report.records + 1).saturating_sub(b.first)
                ),
                _ => format!("{} records", report.records),
            };
            println!(
                "intact: {records} in {} segments ({}), {} signed checkpoints checked, root {}",
                report.segments,
                human_bytes(report.bytes),
                report.checkpoints_checked,
                ledger_verify::b64(&report.last_root)
            );
            for id in &report.missing_data_keys {
                println!("warning: records sealed under data key {id:08x} can never be read: datakeys/{id:08x}.key is missing (restore it from a backup of the ledger directory)");
            }
            if let Some(b) = &report.retention {
                let signed = b
                    .anchor_time
                    .as_deref()
                    .map_or(String::new(), |t| format!(", signed {t}"));
                if b.anchor_checked {
                    println!(
                        "retention boundary: the retention anchor of {} records (root {}{signed}) matches the records; they are still here (a retention was interrupted) and the gateway deletes them on its next pass",
                        b.anchor_size,
                        ledger_verify::b64(&b.anchor_root)
                    );
                } else {
                    println!(
                        "retention boundary: records 1 to {} were deleted by retention; checked from the signed retention anchor of {} records (root {}{signed})",
                        b.anchor_size,
                        b.anchor_size,
                        ledger_verify::b64(&b.anchor_root)
                    );
                    if let Some((from, to)) = b.leftover {
                        println!("records {from} to {to} are left from an interrupted retention: their framing and sequence were checked, not their hashes (the anchor already covers them); the gateway deletes them on its next pass");
                    }
                    if b.checkpoints_skipped > 0 {
                        println!(
                            "{} older checkpoints (of fewer than {} records) predate the boundary and were skipped",
                            b.checkpoints_skipped, b.anchor_size
                        );
                    }
                }
            }
            if let (Some(size), Some(p)) = (report.held, &held_path) {
                println!(
                    "consistent with the checkpoint held at {} ({size} records)",
                    p.display()
                );
            } else if let Some(p) = &copy_missing {
                println!("the checkpoint copy {} (audit.checkpoint_copy) is missing (is its directory mounted?): a rollback of the whole ledger cannot be ruled out", p.display());
            } else {
                println!("no checkpoint held elsewhere was given (--from-checkpoint): a rollback of the whole ledger cannot be ruled out");
            }
            if keys.is_none() {
                println!("signatures were checked against the ledger's own public keys (keys/*.vkey in its directory), which whoever can write there can replace: pass --public-key with keys kept elsewhere to pin them");
            }
            if report.records > report.covered {
                println!(
                    "records {} to {} are not covered by a signed checkpoint yet",
                    report.covered + 1,
                    report.records
                );
            }
            Ok(())
        }
        Err(e) => fail(&e, json),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A one-line progress bar on stderr, redrawn at most 10 times a second, shown only on a
/// terminal and for ledgers above 64 MB.
struct Progress {
    on: bool,
    drawn: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(on: bool) -> Progress {
        Progress {
            on,
            drawn: false,
            last: None,
        }
    }

    fn draw(&mut self, read: u64, total: u64) {
        if !self.on || total < 64_000_000 {
            return;
        }
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
            && read < total
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (read.min(total) * 100).checked_div(total).unwrap_or(100);
        let filled = (pct / 5) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {pct:>3}% {} of {}",
            "#".repeat(filled),
            " ".repeat(20 - filled),
            human_bytes(read),
            human_bytes(total)
        );
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}
