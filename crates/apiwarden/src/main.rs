//! The `apiwarden` binary: command line, runtime and wiring. No logic of its own lives here.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use apiwarden_core::config::{parse, Config};
use apiwarden_gateway::audit::AuditSink;
use apiwarden_gateway::ledger::{LedgerOptions, LedgerSink};
use apiwarden_gateway::{Gateway, Options};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod access;
mod audit;
mod block;
mod consumers;
mod keys;

/// mimalloc: the request path allocates small objects on worker threads that the audit
/// writer frees on its own thread; glibc's allocator pays for that with lock and arena
/// traffic (measured in BENCHMARKS.md), mimalloc's thread-free lists do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// apiwarden: a security gateway for HTTP APIs with a tamper-evident audit trail.
#[derive(Parser)]
#[command(name = "apiwarden", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a demo on embedded defaults: a temporary data directory, a built-in echo upstream
    /// and a generated config. Prints what it serves and curl commands; stops on Ctrl-C.
    Demo {
        /// Port of the API listener (the admin listener takes the next one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run the gateway and the admin listener.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "apiwarden.toml")]
        config: PathBuf,
        /// Overrides storage.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a configuration file: exit 0 when valid, 1 when not, with every error's file,
    /// line and column.
    Check {
        /// Configuration file.
        #[arg(long, default_value = "apiwarden.toml")]
        config: PathBuf,
    },
    /// API keys: issue, list, rotate, revoke (stored as keyed hashes in the data directory).
    Keys {
        /// Configuration file (names the data directory, the pepper and the consumers).
        #[arg(long, default_value = "apiwarden.toml", global = true)]
        config: PathBuf,
        /// Overrides storage.data_dir.
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Consumers kept in the store (beside those of the config file): add, list, remove.
    Consumers {
        /// Configuration file (names the store).
        #[arg(long, default_value = "apiwarden.toml", global = true)]
        config: PathBuf,
        /// Overrides storage.data_dir.
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: consumers::ConsumersCommand,
    },
    /// Access review: per consumer, scopes granted but unused in the window (from the audit
    /// trail), keys never used, keys overdue for rotation.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// The block list: client IPs, API keys and consumers refused with 403 (shared through
    /// Redis when storage.redis is set).
    Block {
        /// Configuration file (names the store).
        #[arg(long, default_value = "apiwarden.toml", global = true)]
        config: PathBuf,
        /// Overrides storage.data_dir.
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: block::BlockCommand,
    },
    /// The tamper-evident audit ledger: verify it, prove that a record is in it, export its
    /// public key. Exit 0 intact, 1 tampered, 2 usage or I/O error.
    Audit {
        /// Configuration file (names the data directory and audit.checkpoint_copy).
        #[arg(long, default_value = "apiwarden.toml", global = true)]
        config: PathBuf,
        /// Overrides storage.data_dir (without a config file: the data directory to check).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Review least privilege per consumer (a table, or JSON lines with --json).
    Review {
        /// The window, in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// One JSON object per consumer.
        #[arg(long)]
        json: bool,
        /// Configuration file.
        #[arg(long, default_value = "apiwarden.toml")]
        config: PathBuf,
        /// Overrides storage.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Check { config } => return check(&config),
        Command::Serve { config, data_dir } => {
            load_with(&config, data_dir).and_then(|cfg| run(cfg, Some(config), None))
        }
        Command::Demo { port } => demo(port),
        Command::Keys {
            config,
            data_dir,
            command,
        } => load_with(&config, data_dir).and_then(|cfg| keys::run(command, &cfg)),
        Command::Consumers {
            config,
            data_dir,
            command,
        } => load_with(&config, data_dir).and_then(|cfg| consumers::run(command, &cfg)),
        Command::Access {
            command:
                AccessCommand::Review {
                    days,
                    json,
                    config,
                    data_dir,
                },
        } => load_with(&config, data_dir).and_then(|cfg| access::run(&cfg, days, json)),
        Command::Block {
            config,
            data_dir,
            command,
        } => load_with(&config, data_dir).and_then(|cfg| block::run(command, &cfg)),
        Command::Audit {
            config,
            data_dir,
            command,
        } => audit::run(command, &config, data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let level = match std::env::var("APIWARDEN_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the config file {}: pass --config FILE to name another",
            path.display()
        )
    })
}

fn load(path: &Path) -> Result<Config> {
    let text = read(path)?;
    parse(&text, &path.display().to_string()).map_err(|e| anyhow::anyhow!("{e}\nthe configuration is invalid; `apiwarden check --config {}` lists the same errors", path.display()))
}

/// `load`, with `--data-dir` overriding `storage.data_dir`.
fn load_with(path: &Path, data_dir: Option<PathBuf>) -> Result<Config> {
    let mut cfg = load(path)?;
    if let Some(d) = data_dir {
        cfg.storage.data_dir = d;
    }
    Ok(cfg)
}

fn check(path: &Path) -> ExitCode {
    let text = match read(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match parse(&text, &path.display().to_string()) {
        Ok(cfg) => {
            println!(
                "{}: valid ({} upstreams, {} routes, {} limits, {} consumers)",
                path.display(),
                cfg.upstreams.len(),
                cfg.routes.len(),
                cfg.limits.len(),
                cfg.consumers.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), path.display());
            ExitCode::FAILURE
        }
    }
}

fn node_name(cfg: &Config) -> String {
    cfg.gateway.node.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "apiwarden".into())
    })
}

/// Called once the gateway listens.
type OnReady = Box<dyn FnOnce(&Gateway) + Send>;

/// Runs the gateway until SIGTERM or Ctrl-C. `on_ready` runs once it listens (the demo prints).
fn run(cfg: Config, config_path: Option<PathBuf>, on_ready: Option<OnReady>) -> Result<()> {
    // This runtime is the control plane (admin listener, reloads, signals); the gateway runs
    // its own worker threads, one per core unless gateway.worker_threads says otherwise.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let node = node_name(&cfg);
        let opened = LedgerSink::open(LedgerOptions {
            dir: cfg.storage.data_dir.join("ledger"),
            durability: cfg.audit.durability,
            checkpoint_interval: cfg.audit.checkpoint_interval,
            origin: format!("apiwarden/{node}"),
            copy_to: cfg.audit.checkpoint_copy.clone(),
            segment_bytes: cfg.audit.segment_size,
            segment_max_age: cfg.audit.segment_max_age,
            retention: cfg.audit.retention.map(|max_age| apiwarden_gateway::ledger::Retention {
                max_age,
                requires_export: cfg.audit.retention_requires_export.clone(),
            }),
            node: Arc::from(node.as_str()),
            encryption: cfg.audit.encryption_key.as_ref().map(master_key).transpose()?,
        })
        .context("cannot open the audit ledger; check storage.data_dir")?;
        tracing::info!(dir = %opened.sink.dir().display(), records = opened.records, "audit events go to the ledger");
        if let Some(c) = &opened.cut {
            // Never silently: what the crash cost is itself a record, queued before anything
            // else can fail (a gateway that then cannot start still writes it on its way out).
            let message = format!(
                "audit ledger recovered from a crash: a torn record after sequence {} ({} bytes, {}) was cut from {}",
                c.after_seq,
                c.bytes,
                c.error,
                c.segment.display()
            );
            tracing::warn!("{message}");
            let mut e = apiwarden_core::event::AuditEvent::new(
                apiwarden_core::event::EventKind::System,
                apiwarden_gateway::ids::new_id(),
                Arc::from(node.as_str()),
            );
            e.decision.outcome = apiwarden_core::event::Outcome::Deny;
            e.decision.reason = apiwarden_core::event::Reason::LedgerRecordCut;
            e.message = Some(message);
            opened.sink.record(Box::new(e));
        }
        let sink: Arc<dyn AuditSink> = Arc::new(opened.sink);
        warn_unenforced(&cfg);
        let gw = match Gateway::start(Options {
            config: cfg,
            config_path,
            sink: sink.clone(),
            node,
        })
        .await
        {
            Ok(gw) => gw,
            Err(e) => {
                // What is queued (a cut torn record's event) is written before the process
                // ends.
                let _ = tokio::time::timeout(Duration::from_secs(5), sink.flush()).await;
                return Err(e.into());
            }
        };
        if let Some(f) = on_ready {
            f(&gw);
        }
        let gw = Arc::new(gw);
        gw.watch_config(Duration::from_secs(1));
        wait_for_stop().await;
        tracing::info!("stopping: finishing requests in flight");
        match Arc::try_unwrap(gw) {
            Ok(gw) => gw.shutdown().await,
            Err(_) => anyhow::bail!("internal error: gateway still referenced at shutdown"),
        }
        Ok(())
    })
}

/// The ledger's master key from where `audit.encryption_key` says.
pub fn master_key(source: &apiwarden_core::config::SecretSource) -> Result<[u8; 32]> {
    Ok(apiwarden_gateway::ledger_crypt::master_from(source)?)
}

/// The opener of a ledger's sealed records, when the config sets `audit.encryption_key`.
pub fn ledger_opener(
    cfg: &Config,
    dir: &Path,
) -> Result<Option<apiwarden_gateway::ledger_crypt::Opener>> {
    match &cfg.audit.encryption_key {
        None => Ok(None),
        Some(source) => Ok(Some(apiwarden_gateway::ledger_crypt::Opener::load(
            dir,
            &master_key(source)?,
        )?)),
    }
}

fn warn_unenforced(cfg: &Config) {
    // Not an error (a route may list mtls among other methods), but without client_ca no
    // client can present a certificate.
    if cfg
        .gateway
        .tls
        .as_ref()
        .and_then(|t| t.client_ca.as_ref())
        .is_none()
    {
        for r in cfg
            .routes
            .iter()
            .filter(|r| r.auth.contains(&apiwarden_core::config::AuthMethod::Mtls))
        {
            tracing::warn!(route = %r.name, "the route accepts mtls but gateway.tls.client_ca is not set: no client certificate can be presented");
        }
    }
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term_fut = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term_fut => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn demo(port: u16) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("apiwarden-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The echo upstream runs on its own small runtime so the gateway's config can name it.
    let echo_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let echo_addr = echo_rt
        .block_on(apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into()))
        .context("cannot start the echo upstream")?;
    // Port 0 picks free ports for both listeners.
    let admin_port = if port == 0 {
        0
    } else {
        port.checked_add(1).context("--port is too large")?
    };
    let text = format!(
        r#"# Generated by `apiwarden demo`. Edit and save: the gateway reloads it.
[gateway]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin_port}"

[storage]
data_dir = "{data}"

[[upstreams]]
name = "echo"
url = "http://{echo_addr}"

[[routes]]
name = "echo"
path_prefix = "/echo"
upstream = "echo"
auth = ["none"]

[[routes]]
name = "order"
path = "/orders/{{id}}"
methods = ["GET"]
upstream = "echo"
auth = ["api_key"]
scopes = ["orders:read"]

[[routes]]
name = "limited"
path_prefix = "/limited"
upstream = "echo"
auth = ["none"]
limits = ["five-per-10s"]

[[routes]]
name = "admin-api"
path_prefix = "/admin"
upstream = "echo"
auth = ["api_key"]
scopes = ["admin"]

[[consumers]]
name = "billing"
scopes = ["orders:read"]

[[consumers]]
name = "ops"
scopes = ["orders:read", "admin"]

[limits.five-per-10s]
rate = "30/m"
burst = 5
key = "ip"
"#,
        data = dir.join("data").display()
    );
    let config_path = dir.join("apiwarden.toml");
    std::fs::write(&config_path, &text)?;
    let cfg = parse(&text, &config_path.display().to_string())
        .map_err(|e| anyhow::anyhow!("the demo config is invalid: {e}"))?;
    // Two consumers with a key each, issued now and shown once below.
    let mut store = apiwarden_gateway::keystore::KeyStore::open(&cfg)
        .context("cannot open the demo's key store")?;
    store.set_actor("demo");
    let (_, billing_key) = store.create(&cfg, "billing", None, None)?;
    let (_, ops_key) = store.create(&cfg, "ops", None, None)?;
    drop(store);
    let shown_dir = dir.clone();
    let on_ready: OnReady = Box::new(move |gw: &Gateway| {
        let a = gw.addr;
        let m = gw.admin_addr;
        println!(
            r#"
apiwarden demo is running.

  API listener    http://{a}
  admin listener  http://{m}   (/healthz, /readyz, /metrics)
  echo upstream   http://{echo_addr}
  config          {cfg}   (edit it: the gateway reloads on save)
  audit events    {audit}

  billing key     {billing_key}   (scopes: orders:read)
  ops key         {ops_key}   (scopes: orders:read, admin)

Try:
  curl -i http://{a}/echo/hello?name=ada
  curl -i -H "Authorization: Bearer {billing_key}" http://{a}/orders/42
  curl -i -H "X-API-Key: {billing_key}" http://{a}/admin/users     # 403: billing lacks scope admin
  curl -i -H "X-API-Key: {ops_key}" http://{a}/admin/users         # 200
  curl -i http://{a}/orders/42                 # 401: no key
  curl -i -X POST --data-binary 'hello body' http://{a}/echo/upload
  curl -i http://{a}/nope                      # 404, audited
  curl -i http://{a}/echo/%2e%2e/admin         # normalised to /admin before routing
  for i in $(seq 7); do curl -s -o /dev/null -w '%{{http_code}} ' http://{a}/limited; done; echo
                                               # 5 pass, then 429 with Retry-After (30/m, burst 5)
  apiwarden block add ip 127.0.0.1 --for 1m --reason demo --config {cfg}   # then: 403
  apiwarden keys list --config {cfg}
  curl -s http://{m}/metrics | grep apiwarden_requests_total
  apiwarden audit verify --config {cfg}     # the ledger: {audit}

Ctrl-C stops it.
"#,
            cfg = shown_dir.join("apiwarden.toml").display(),
            audit = shown_dir.join("data").join("ledger").display(),
        );
    });
    let result = run(cfg, Some(config_path), Some(on_ready)).with_context(|| {
        format!(
            "the demo could not start on port {port}; `apiwarden demo --port 0` picks free ports"
        )
    });
    drop(echo_rt);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
