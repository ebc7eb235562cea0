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
    /// Find events: every filter given must match. A table, or NDJSON with --json. Reads the
    /// ledger from the start (no index yet).
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
    /// Stream every event (from --since on) in a SIEM format. `json` (NDJSON, the ledger's
    /// own records) is built; `ocsf`, `ecs`, `cef` and `leef` are not yet.
    Export {
        #[arg(long, default_value = "json")]
        format: String,
        /// From this time on: a duration back from now (`24h`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
}

/// `1h` (that long ago) or an RFC 3339 time.
fn when(flag: &str, text: &str) -> std::time::SystemTime {
    if let Ok(d) = humantime::parse_duration(text) {
        return std::time::SystemTime::now()
            .checked_sub(d)
            .unwrap_or(std::time::UNIX_EPOCH);
    }
    humantime::parse_rfc3339_weak(text).unwrap_or_else(|_| {
        usage(format!(
            "--{flag} {text:?}: write a duration back from now (1h, 30m) or a time (2026-11-25T10:00:00Z)"
        ))
    })
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
            };
            let (dir, _) = ledger_dir(config, data_dir);
            let limit = limit.unwrap_or(usize::MAX);
            let mut found = 0usize;
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
            apiwarden_gateway::ledger::read_plain(&dir, opener.as_ref(), |seq, payload| {
                if found >= limit {
                    return;
                }
                let Ok(e) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    return;
                };
                if !filter.passes(&e) {
                    return;
                }
                found += 1;
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
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            drop(out);
            if !json {
                eprintln!("{found} events");
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
        AuditCommand::Export { format, since } => {
            if format != "json" {
                usage(format!(
                    "--format {format:?} is not built yet: this version exports json (NDJSON) only"
                ));
            }
            let since = since.map(|s| when("since", &s));
            let filter = apiwarden_gateway::ledger::SearchFilter {
                consumer: None,
                key: None,
                ip: None,
                status: None,
                decision: None,
                since,
                until: None,
            };
            let (dir, _) = ledger_dir(config, data_dir);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            use std::io::Write;
            let opener = opener_for(config, data_dir_for_opener.clone(), &dir);
            apiwarden_gateway::ledger::read_plain(&dir, opener.as_ref(), |_, payload| {
                let pass = since.is_none()
                    || serde_json::from_slice::<serde_json::Value>(payload)
                        .is_ok_and(|e| filter.passes(&e));
                if pass {
                    let _ = out.write_all(payload);
                    let _ = out.write_all(b"\n");
                }
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
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
                    let what = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                        .map_or_else(
                            || "the older checkpoint is a prefix of the newer one".to_string(),
                            |seq| format!("record {seq} is in the ledger"),
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

fn verify(
    dir: &Path,
    from_checkpoint: Option<PathBuf>,
    copy: Option<PathBuf>,
    public_key: &[PathBuf],
    json: bool,
) -> Result<()> {
    let held_path = match from_checkpoint {
        Some(p) => Some(p),
        None => copy.map(|c| c.join("checkpoint")).filter(|p| p.exists()),
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
                v["seconds"] = started.elapsed().as_secs_f64().into();
                println!("{v}");
                return Ok(());
            }
            println!(
                "intact: {} records in {} segments ({}), {} signed checkpoints checked, root {}",
                report.records,
                report.segments,
                human_bytes(report.bytes),
                report.checkpoints_checked,
                ledger_verify::b64(&report.last_root)
            );
            if let (Some(size), Some(p)) = (report.held, &held_path) {
                println!(
                    "consistent with the checkpoint held at {} ({size} records)",
                    p.display()
                );
            } else {
                println!("no checkpoint held elsewhere was given (--from-checkpoint): a rollback of the whole ledger cannot be ruled out");
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
