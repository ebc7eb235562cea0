//! Listeners and lifecycle: start, serve connections (HTTP/1.1 and HTTP/2, TLS or plain),
//! reload the configuration, shut down gracefully.

use crate::audit::AuditSink;
use crate::h2watch::{H2Counts, H2Watch};
use crate::metrics::Metrics;
use crate::pipeline::{handle, record_h2_refused, record_unparsed, ConnInfo, Shared, State};
use crate::tls::{server_config, CertCheck, ClientCert, ServerConfigs, TlsError};
use apiwarden_core::config::{parse, Config, ConfigErrors};
use apiwarden_core::event::{Outcome, Reason};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// What a gateway is started with.
pub struct Options {
    pub config: Config,
    /// The file the config came from; when set, it is reloaded on SIGHUP and when it changes.
    pub config_path: Option<PathBuf>,
    pub sink: Arc<dyn AuditSink>,
    /// This node's name in audit events.
    pub node: String,
}

/// Errors starting a gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {error} (is another process using it?)")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Errors reloading the config.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("no config file to reload from")]
    NoFile,
    /// Caught between being emptied and written again (`cat new > apiwarden.toml`), most
    /// likely: an empty file would take every route away.
    #[error("{path} is empty; an empty configuration is not taken on reload")]
    Empty { path: PathBuf },
}

/// A running gateway.
pub struct Gateway {
    pub shared: Arc<Shared>,
    /// Where the API listener is bound.
    pub addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    config_path: Option<PathBuf>,
    reload_lock: Mutex<Option<SystemTime>>,
    stop: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    /// The admin listener's stop signal: the deadline of its drain (shutdown's start plus
    /// `gateway.shutdown_timeout`, shared with the workers' drain).
    admin_stop: watch::Sender<Option<Instant>>,
    acceptor_task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// The threads that follow the block list's store and the API keys.
    blocklist: (Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>),
    keys: (Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>),
    /// One per worker thread; each resolves when its worker has drained.
    workers: Vec<(
        std::thread::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the worker thread running the caller (0 outside workers).
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// How many worker threads a config asks for.
pub fn worker_count(config: &Config) -> usize {
    config
        .gateway
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The protocol a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Plain TCP with `gateway.h2c`: HTTP/1.1, or HTTP/2 with prior knowledge.
    Detect,
}

/// hyper refuses a head larger than its read buffer with its own bare 431; keep that buffer
/// above our limit so that the pipeline answers with the JSON error and the request id.
fn read_buffer(config: &Config) -> usize {
    (config.gateway.max_header_size * 2).max(16 * 1024) + 8 * 1024
}

/// HTTP/1.1 connections. No timer: their idle time and the time a request head takes are
/// bounded by the worker's idle check (`gateway.idle_timeout`, [`IdleWatch`]), which costs
/// nothing per request, where hyper's header-read timeout armed and dropped a timer for every
/// request head.
fn http1_builder(config: &Config) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(read_buffer(config)).keep_alive(true);
    b
}

fn http2_builder(config: &Config) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(read_buffer(config)).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    b
}

/// HTTP/2: streams per connection, and the pings that find dead peers (a peer that does not
/// answer a ping within the timeout is disconnected).
const H2_MAX_STREAMS: u32 = 256;
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

fn auto_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.gateway.idle_timeout)
        .max_buf_size(read_buffer(config))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(read_buffer(config)).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    b
}

impl Gateway {
    /// Binds the listeners and starts serving.
    pub async fn start(opts: Options) -> Result<Gateway, StartError> {
        let Options {
            config,
            config_path,
            sink,
            node,
        } = opts;
        let metrics = Metrics::new(worker_count(&config));
        let tls = match &config.gateway.tls {
            Some(t) => Some(server_config(t)?),
            None => None,
        };
        let api = TcpListener::bind(config.gateway.listen)
            .await
            .map_err(|error| StartError::Bind {
                addr: config.gateway.listen,
                error,
            })?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|error| StartError::Bind {
                addr: config.admin.listen,
                error,
            })?;
        let addr = api.local_addr().map_err(|error| StartError::Bind {
            addr: config.gateway.listen,
            error,
        })?;
        let admin_addr = admin.local_addr().map_err(|error| StartError::Bind {
            addr: config.admin.listen,
            error,
        })?;
        if !admin_addr.ip().is_loopback() && !config.admin.tokens.is_empty() {
            tracing::warn!(%admin_addr, "the admin listener is not on a loopback address and speaks plain HTTP: admin tokens cross the network in clear text; bind admin.listen to 127.0.0.1, or reach it through a tunnel or a TLS proxy");
        }

        let workers_n = worker_count(&config);
        let local_limits = Arc::new(crate::limit::LocalStore::new(config.storage.limit_keys));
        let state_data_dir = config.storage.data_dir.join("ledger");
        let strict = config.audit.durability == apiwarden_core::config::Durability::Strict;
        let state = State::compile(config, &metrics, None, workers_n);
        // Token issuers' keys are fetched in the background; `/readyz` waits for them.
        for issuer in &state.issuers {
            issuer.prefetch();
        }
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(state),
            sink,
            metrics,
            local_limits,
            blocks: ArcSwap::from_pointee(crate::blocklist::BlockSet::default()),
            keys: ArcSwap::from_pointee(crate::keystore::KeyRing::default()),
            node: Arc::from(node.as_str()),
            shutting_down: AtomicBool::new(false),
            strict,
            audit_hmac: match crate::ledger::salt(&state_data_dir) {
                Ok(salt) => Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the ledger's salt: audit.hmac_headers and audit.hmac_query values are recorded as REDACTED");
                    None
                }
            },
        });
        // The block list is in force before the first request is accepted.
        let blocklist = {
            let stop = Arc::new(AtomicBool::new(false));
            let (sh, st) = (shared.clone(), stop.clone());
            let first = tokio::task::spawn_blocking({
                let sh = shared.clone();
                move || {
                    let mut f = crate::blocklist::Follower::default();
                    let config = sh.state.load().config.clone();
                    if let Err(e) = f.round(&config, &sh) {
                        tracing::warn!(error = %e, "cannot read the block list at start; serving without it and trying again every 200 ms");
                    }
                    f
                }
            });
            let follower = first.await.unwrap_or_default();
            let thread = std::thread::Builder::new()
                .name("apiwarden-blocklist".into())
                .spawn(move || crate::blocklist::follow(sh, st, follower))
                .ok();
            (stop, thread)
        };
        // The API keys too: read before the first request, then followed. The key thread reads
        // them (a plain thread: the PostgreSQL client must never block a runtime's thread);
        // this waits for its first attempt without blocking, and at most 10 s (an unreachable
        // database: `/readyz` stays 503 until the keys could be read).
        let keys = {
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, first) = tokio::sync::oneshot::channel();
            let (sh, st) = (shared.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("apiwarden-keys".into())
                .spawn(move || crate::keystore::follow(sh, st, Some(ready)))
                .ok();
            let _ = tokio::time::timeout(Duration::from_secs(10), first).await;
            (stop, thread)
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut background = Vec::new();
        let acceptor = tls.map(|(sc, mut reloader)| {
            let mut stop = stop_rx.clone();
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(reloader.interval());
                loop {
                    tokio::select! {
                        _ = tick.tick() => reloader.check(),
                        _ = stop.changed() => return,
                    }
                }
            }));
            sc
        });
        // Thread per core: each worker runs its own single-threaded runtime. A connection,
        // its upstream connections and their tasks stay on one thread, so a request costs no
        // cross-thread wake-up. One acceptor hands each new connection to the worker with the
        // fewest open connections (a shared accept queue lets one eager thread take most).
        let mut workers = Vec::with_capacity(workers_n);
        let mut queues = Vec::with_capacity(workers_n);
        for index in 0..workers_n {
            let (shared, acceptor, stop) = (shared.clone(), acceptor.clone(), stop_rx.clone());
            let (conn_tx, conn_rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
            let live = Arc::new(());
            queues.push(WorkerQueue {
                tx: conn_tx,
                live: Arc::downgrade(&live),
                open: Arc::new(AtomicUsize::new(0)),
            });
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let thread = std::thread::Builder::new()
                .name(format!("apiwarden-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a worker runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        // `strict` answers reach this thread's requests through its relay.
                        crate::ledger::start_durable_relay();
                        // Installed before the first connection, so that a stop always
                        // finds the list; `run` fires its deadlines.
                        crate::wakeups::install();
                        tokio::spawn(crate::wakeups::run());
                        tokio::spawn(idle_check(shared.clone(), stop.clone()));
                        let sh = shared.clone();
                        worker_loop(conn_rx, shared, acceptor, stop, &live).await;
                        // The configuration in force at the stop (as the admin drain's).
                        let timeout = sh.state.load().config.gateway.shutdown_timeout;
                        drop(sh);
                        // Every connection holds a clone of `live` until it has closed.
                        let deadline = tokio::time::Instant::now() + timeout;
                        while Arc::strong_count(&live) > 1 && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if Arc::strong_count(&live) > 1 {
                            tracing::warn!(
                                worker = index,
                                connections = Arc::strong_count(&live) - 1,
                                "shutdown timeout reached with requests still in flight"
                            );
                        }
                    });
                    let _ = done_tx.send(());
                })
                .map_err(|error| StartError::Bind { addr, error })?;
            workers.push((thread, done_rx));
        }
        let admission = {
            let sh = shared.clone();
            Admission {
                max: Box::new(move || sh.state.load().config.gateway.max_connections),
                open: shared.metrics.connections_open.clone(),
                refused: shared.metrics.connections_refused.clone(),
            }
        };
        let acceptor_task = tokio::spawn(accept_loop(api, queues, admission, stop_rx.clone()));
        // The admin listener stops after the workers have drained (so /readyz answers 503
        // meanwhile) and before the last flush.
        let (admin_stop, admin_stop_rx) = watch::channel(None);
        let admin_task = tokio::spawn(crate::admin::serve(admin, shared.clone(), admin_stop_rx));
        shared.system_event(
            format!("gateway started on {addr}, admin on {admin_addr}"),
            Outcome::Allow,
            Reason::Ok,
        );
        tracing::info!(%addr, %admin_addr, "apiwarden gateway started");
        let gw = Gateway {
            shared,
            addr,
            admin_addr,
            reload_lock: Mutex::new(config_path.as_deref().and_then(modified)),
            config_path,
            stop,
            admin_task,
            admin_stop,
            acceptor_task,
            background,
            blocklist,
            keys,
            workers,
        };
        Ok(gw)
    }

    /// Starts the task that reloads the config on SIGHUP and when its file changes.
    pub fn watch_config(self: &Arc<Self>, interval: Duration) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let gw = Arc::downgrade(self);
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            let mut retried_empty = None;
            loop {
                #[cfg(unix)]
                let hup_fut = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hup_fut = std::future::pending::<Option<()>>();
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    _ = hup_fut => true,
                    _ = stop.changed() => return,
                };
                let Some(gw) = gw.upgrade() else { return };
                let (changed, now) = {
                    let mut last = gw.reload_lock.lock().expect("reload lock poisoned");
                    let now = modified(&path);
                    let changed = now != *last;
                    *last = now;
                    (changed, now)
                };
                if (forced || changed)
                    && matches!(gw.reload(), Err(ReloadError::Empty { .. }))
                    && retried_empty != Some(now)
                {
                    // Its writer may finish within the same tick of the file's clock: look
                    // again at the next check whatever the time says (once per file time).
                    retried_empty = Some(now);
                    *gw.reload_lock.lock().expect("reload lock poisoned") = None;
                }
            }
        });
    }

    /// Reads, validates and swaps in the config file. An invalid file keeps the old config;
    /// the errors are logged and recorded as a `system` audit event.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let result = std::fs::read_to_string(path)
            .map_err(|error| ReloadError::Read {
                path: path.clone(),
                error,
            })
            .and_then(|text| {
                if text.trim().is_empty() {
                    return Err(ReloadError::Empty { path: path.clone() });
                }
                parse(&text, &path.display().to_string()).map_err(ReloadError::Invalid)
            });
        match result {
            Ok(config) => {
                let old = self.shared.state.load();
                if config.gateway.listen != old.config.gateway.listen
                    || config.admin.listen != old.config.admin.listen
                    || config.gateway.tls != old.config.gateway.tls
                {
                    tracing::warn!("listen addresses and TLS settings change only on restart");
                }
                // The ledger is opened once, with these: a change waits for a restart (the
                // HMAC'd headers and query parameters are read per request and change now).
                let ledger_settings = |c: &Config| {
                    let a = &c.audit;
                    format!(
                        "{:?}",
                        (
                            &c.storage.data_dir,
                            &a.durability,
                            a.checkpoint_interval,
                            &a.checkpoint_copy,
                            &a.encryption_key,
                            a.segment_size,
                            a.segment_max_age,
                            a.retention,
                            &a.retention_requires_export,
                        )
                    )
                };
                if ledger_settings(&config) != ledger_settings(&old.config) {
                    tracing::warn!("storage.data_dir and the [audit] settings of the ledger (durability, checkpoints, encryption_key, segments, retention) change only on restart; the ledger keeps those it was opened with");
                    self.shared.system_event(
                        "configuration reloaded, but the ledger's settings ([audit], storage.data_dir) change only on restart: the ledger keeps those it was opened with".into(),
                        Outcome::Allow,
                        Reason::Ok,
                    );
                }
                let routes = config.routes.len();
                let state = State::compile(config, &self.shared.metrics, Some(&old), old.workers());
                for issuer in &state.issuers {
                    issuer.prefetch();
                }
                // Upstreams the new state does not keep: their pooled connections close now, and
                // those of requests still in flight close when they end.
                for u in old.upstreams() {
                    if !state.upstreams().iter().any(|n| Arc::ptr_eq(n, u)) {
                        u.retire();
                    }
                }
                self.shared.state.store(Arc::new(state));
                self.shared
                    .metrics
                    .reloads_ok
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(file = %path.display(), routes, "configuration reloaded");
                self.shared.system_event(
                    format!("configuration reloaded from {}", path.display()),
                    Outcome::Allow,
                    Reason::Ok,
                );
                Ok(())
            }
            Err(e) => {
                self.shared
                    .metrics
                    .reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(file = %path.display(), error = %e, "configuration reload refused; the previous configuration stays in force");
                self.shared.system_event(
                    format!("configuration reload refused, previous configuration kept: {e}"),
                    Outcome::Deny,
                    Reason::Ok,
                );
                Err(e)
            }
        }
    }

    /// Stops accepting, lets requests in flight finish within `gateway.shutdown_timeout`,
    /// then flushes the audit sink.
    pub async fn shutdown(self) {
        let deadline = Instant::now() + self.shared.state.load().config.gateway.shutdown_timeout;
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let _ = self.acceptor_task.await;
        for (thread, done) in self.workers {
            // Each worker stops accepting, drains within gateway.shutdown_timeout, then ends.
            let _ = done.await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        for t in self.background {
            t.abort();
        }
        // Then the admin listener (it answered /readyz with 503 while requests drained): its
        // requests in flight finish and its connections close before the last flush, so no
        // admin action is applied without its event.
        let _ = self.admin_stop.send(Some(deadline));
        let _ = self.admin_task.await;
        for (stop, thread) in [self.blocklist, self.keys] {
            stop.store(true, Ordering::Relaxed);
            if let Some(t) = thread {
                // The key thread writes `last_used` back one last time.
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        }
        self.shared
            .system_event("gateway stopped".into(), Outcome::Allow, Reason::Ok);
        let _ = self.shared.sink.flush().await;
        tracing::info!("apiwarden gateway stopped");
    }
}

fn modified(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Accepts connections and hands each to the worker with the fewest open ones; closes one
/// at once while `gateway.max_connections` are open.
async fn accept_loop(
    listener: TcpListener,
    queues: Vec<WorkerQueue>,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
) {
    let total = admission.open.clone();
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let max = (admission.max)();
        if total.load(Ordering::Relaxed) >= max {
            // Closed before any byte is read: no request, so no audit event (a flood of
            // connections cannot flood the ledger); counted, and logged once a second.
            drop(stream);
            admission.refused.fetch_add(1, Ordering::Relaxed);
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warning = Some(Instant::now());
                tracing::warn!(%peer, max_connections = max, "gateway.max_connections are open; closing new connections (see apiwarden_connections_refused_total)");
            }
            continue;
        }
        let _ = stream.set_nodelay(true);
        let Ok(std) = stream.into_std() else { continue };
        // A worker whose thread has ended (its `live` token is gone) takes no connections.
        let Some(queue) = queues
            .iter()
            .filter(|q| q.live.strong_count() > 0 && !q.tx.is_closed())
            .min_by_key(|q| q.open.load(Ordering::Relaxed))
        else {
            tracing::error!("no worker is running; refusing connections");
            continue;
        };
        // Counted here, not when the worker gets to it: a burst of connections (a load
        // generator opening 50 at once) would otherwise all go to the worker that looked
        // least loaded before the burst.
        let _ = queue
            .tx
            .send((std, peer, Assigned::new(&queue.open, &total)));
    }
}

/// How many client connections may be open, how many are, and the count of those refused.
struct Admission {
    /// `gateway.max_connections` of the configuration in force (a reload changes it).
    max: Box<dyn Fn() -> usize + Send>,
    open: Arc<AtomicUsize>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

/// What the acceptor knows of a worker.
struct WorkerQueue {
    tx: tokio::sync::mpsc::UnboundedSender<Handoff>,
    /// Gone once the worker's thread has ended.
    live: std::sync::Weak<()>,
    /// Connections handed to the worker and not yet closed, those still in its queue
    /// included. Not the count the worker waits for at shutdown (`live`'s): a connection
    /// queued as the worker stops may stay in the closed queue until the acceptor is gone.
    open: Arc<AtomicUsize>,
}

/// A connection on its way to a worker.
type Handoff = (std::net::TcpStream, SocketAddr, Assigned);

/// One connection counted in its worker's `open` until it is dropped (the connection has
/// closed, or never reached the worker).
/// The gateway's total (`apiwarden_connections_open`, read against `max_connections`) too.
/// Once served, the connection's `ConnInfo` holds it, so a WebSocket tunnel that outlives
/// hyper's connection stays counted until it closes.
pub(crate) struct Assigned(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Assigned {
    fn new(open: &Arc<AtomicUsize>, total: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
        Assigned(open.clone(), total.clone())
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A worker: serves the connections the acceptor hands it until the stop signal.
async fn worker_loop(
    mut conns: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    shared: Arc<Shared>,
    tls: Option<ServerConfigs>,
    mut stop: watch::Receiver<bool>,
    live: &Arc<()>,
) {
    // The worker's connections wait for the stop signal in its own wake-up list (see
    // `wakeups`): a poll of that wait reads a flag, where a poll of a wait on the gateway's
    // channel would take the channel's lock, shared by every worker's core.
    loop {
        let (std, peer, assigned) = tokio::select! {
            c = conns.recv() => match c {
                Some(c) => c,
                None => {
                    crate::wakeups::stop();
                    return;
                }
            },
            _ = stop.changed() => {
                crate::wakeups::stop();
                return;
            }
        };
        // A second handle on the socket, for the idle check.
        let idle_socket = std.try_clone().ok();
        let Ok(stream) = tokio::net::TcpStream::from_std(std) else {
            continue;
        };
        let shared = shared.clone();
        let watcher = Watcher {
            stop: stop.clone(),
            _live: live.clone(),
            assigned: Some(assigned),
        };
        match &tls {
            None => {
                let protocol = if shared.state.load().config.gateway.h2c {
                    Protocol::Detect
                } else {
                    Protocol::Http1
                };
                tokio::spawn(serve(
                    stream,
                    ConnInfo::new(peer, None),
                    shared,
                    watcher,
                    protocol,
                    idle_socket,
                ));
            }
            Some(configs) => {
                // The configuration in force now (a new client CA file swaps in another).
                let state = configs.load_full();
                let acceptor = TlsAcceptor::from(state.server.clone());
                let configs = configs.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            let version = match tls.get_ref().1.protocol_version() {
                                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                                _ => "TLSv1.2",
                            };
                            let protocol = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                                Protocol::Http2
                            } else {
                                Protocol::Http1
                            };
                            // rustls has verified the chain against client_ca; read the
                            // end-entity certificate once for the connection's requests.
                            let (client_cert, cert_check) = match tls
                                .get_ref()
                                .1
                                .peer_certificates()
                            {
                                Some(chain @ [der, ..]) => match ClientCert::parse(der.as_ref()) {
                                    Ok(c) => {
                                        tracing::debug!(%peer, subject = %c.subject, sha256 = %c.fingerprint, "client certificate verified");
                                        // Checked again at each request (expiry, a new CA).
                                        let check = CertCheck::new(
                                            chain,
                                            c.not_after,
                                            configs,
                                            state.generation,
                                        );
                                        (Some(Arc::new(c)), Some(check))
                                    }
                                    Err(e) => {
                                        tracing::warn!(%peer, error = %e, "a verified client certificate cannot be read; closing the connection");
                                        return;
                                    }
                                },
                                _ => (None, None),
                            };
                            serve(
                                tls,
                                ConnInfo::new(peer, Some(version))
                                    .with_client_cert(client_cert, cert_check),
                                shared,
                                watcher,
                                protocol,
                                idle_socket,
                            )
                            .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// What a connection needs to close gracefully: the stop signal, and a token whose count
/// tells the worker how many connections are still open. It also keeps the connection
/// counted in the acceptor's view of its worker's load.
struct Watcher {
    /// The gateway's stop channel: read once at the start, and waited on only off a worker
    /// thread (a worker's connections wait in its wake-up list).
    stop: watch::Receiver<bool>,
    _live: Arc<()>,
    /// Moved into the connection's `ConnInfo` when it is served.
    assigned: Option<Assigned>,
}

/// Drives a connection to its end; on the stop signal, or when the connection itself asks to
/// close (`ConnInfo::request_close`: a refused client certificate, an idle HTTP/2
/// connection), asks it to finish the requests in flight and close (HTTP/2: GOAWAY).
async fn drive<C, E>(
    conn: C,
    watcher: Watcher,
    close: Option<&tokio::sync::Notify>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let Watcher {
        mut stop, _live, ..
    } = watcher;
    let mut conn = std::pin::pin!(conn);
    if !*stop.borrow_and_update() {
        // The close branch is only polled on connections that can ask (not plain HTTP/1.1).
        tokio::select! {
            r = conn.as_mut() => return r,
            () = crate::wakeups::stopped(stop) => {}
            () = async { if let Some(n) = close { n.notified().await } }, if close.is_some() => {}
        }
    }
    shutdown(conn.as_mut());
    conn.await
}

async fn serve<I>(
    io: I,
    conn: ConnInfo,
    shared: Arc<Shared>,
    watcher: Watcher,
    protocol: Protocol,
    idle_socket: Option<std::net::TcpStream>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = conn;
    let mut watcher = watcher;
    // The worker counts this connection open until its last event below is recorded: a
    // shutdown flushes the ledger only after that.
    let _live = watcher._live.clone();
    conn.slot = watcher.assigned.take();
    if protocol != Protocol::Http1 || conn.cert_check.is_some() {
        conn.closing = Some(tokio::sync::Notify::new());
    }
    let conn = Arc::new(conn);
    // Dropped after the connection below, on this thread: the second handle on the socket
    // goes with it.
    let _idle = match (protocol, idle_socket) {
        (Protocol::Http1, Some(socket)) => IdleGuard::watch(conn.clone(), Some(socket), false),
        // HTTP/2 (and h2c detection): asked to close (GOAWAY) once idle, the socket shut
        // down only if that does not end it.
        (Protocol::Http2 | Protocol::Detect, socket) => {
            IdleGuard::watch(conn.clone(), socket, true)
        }
        _ => None,
    };
    let close = conn.closing.as_ref();
    // HTTP/2's frames are read on their way through, for the streams that never become
    // requests (see `h2watch`).
    let h2 = (protocol != Protocol::Http1).then(|| Arc::new(H2Counts::default()));
    let svc = {
        let shared = shared.clone();
        let conn = conn.clone();
        let h2 = h2.clone();
        service_fn(move |req| {
            // Counted when hyper hands the stream over, not when its task first runs: the
            // connection may end in between.
            if let Some(h2) = &h2 {
                h2.accepted();
            }
            handle(shared.clone(), conn.clone(), req)
        })
    };
    // The connection's settings are read from the config in force now; the config itself is
    // not held for the connection's life (each request loads the current one).
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = match (protocol, &h2) {
        (Protocol::Http1, _) | (_, None) => {
            let conn = http1_builder(&shared.state.load().config)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            drive(conn, watcher, close, |c| c.graceful_shutdown())
                .await
                .map_err(Into::into)
        }
        (Protocol::Http2, Some(h2)) => {
            let io = TokioIo::new(H2Watch::new(io, true, h2.clone()));
            let conn = http2_builder(&shared.state.load().config).serve_connection(io, svc);
            drive(conn, watcher, close, |c| c.graceful_shutdown())
                .await
                .map_err(Into::into)
        }
        (Protocol::Detect, Some(h2)) => {
            let io = TokioIo::new(H2Watch::new(io, false, h2.clone()));
            let builder = auto_builder(&shared.state.load().config);
            let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
            drive(conn, watcher, close, |c| c.graceful_shutdown()).await
        }
    };
    if let Some(summary) = h2.and_then(|h2| h2.summary()) {
        record_h2_refused(&shared, &conn, summary);
    }
    if let Err(e) = served {
        // hyper has already answered a request it could not parse; record it.
        if let Some(he) = e.downcast_ref::<hyper::Error>() {
            if he.is_parse_too_large() {
                record_unparsed(&shared, &conn, Reason::RequestHeadersTooLarge);
            } else if he.is_parse() {
                record_unparsed(&shared, &conn, Reason::RequestMalformed);
            }
        }
    }
}

/// How often each worker checks its connections for idleness.
const IDLE_CHECK: Duration = Duration::from_secs(1);

thread_local! {
    /// This worker thread's connections (each is served on one worker's runtime).
    static IDLE: std::cell::RefCell<IdleWatch> = std::cell::RefCell::default();
}

/// A worker's connections, and what its idle check last saw of each. A connection is idle
/// while none of its requests is open and no new one has begun (see `pipeline::Activity`);
/// once idle for `gateway.idle_timeout` an HTTP/1.1 connection's socket is shut down, which
/// ends it wherever hyper is: waiting for the next request of a kept-alive connection, or
/// reading a request head that comes too slowly. An HTTP/2 (or h2c) connection is first asked
/// to close (GOAWAY), and its socket shut down one `idle_timeout` later if it is still there.
/// A request whose upstream or body is slow is open, so its connection is never idle.
#[derive(Default)]
struct IdleWatch {
    conns: slab::Slab<Watched>,
}

struct Watched {
    conn: Arc<ConnInfo>,
    /// A second handle on the connection's socket; shutting it down ends the connection.
    socket: Option<std::net::TcpStream>,
    /// HTTP/2 and h2c: asked to close first (GOAWAY, `ConnInfo::request_close`), and its
    /// socket shut down only if it is still there one `idle_timeout` later (a client that
    /// never sent its preface, or ignores GOAWAY). Since when it was asked.
    graceful: bool,
    asked: Option<Instant>,
    /// Requests begun when last seen, and since when that has not changed with none open:
    /// the first check that found the connection idle (or its start), so that it is never
    /// closed sooner than `gateway.idle_timeout` after its last request ended.
    begun: u64,
    quiet_since: Option<Instant>,
    closed: bool,
}

/// Keeps one connection in its worker's [`IdleWatch`] while the connection is served.
struct IdleGuard(usize);

impl IdleGuard {
    fn watch(
        conn: Arc<ConnInfo>,
        socket: Option<std::net::TcpStream>,
        graceful: bool,
    ) -> Option<IdleGuard> {
        let (begun, _) = conn.activity.read();
        let entry = Watched {
            conn,
            socket,
            graceful,
            asked: None,
            begun,
            quiet_since: Some(Instant::now()),
            closed: false,
        };
        IDLE.try_with(|w| IdleGuard(w.borrow_mut().conns.insert(entry)))
            .ok()
    }
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        let _ = IDLE.try_with(|w| w.borrow_mut().conns.try_remove(self.0));
    }
}

/// A worker's idle check: once a second, closes the connections that have been idle for
/// `gateway.idle_timeout` (read from the configuration in force, so a reload changes it),
/// and this worker's pooled upstream connections unused for their `idle_timeout`.
async fn idle_check(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(IDLE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let state = shared.state.load();
        // This worker's upstream pools: connections unused for their `idle_timeout`.
        for u in state.upstreams() {
            let closed = u.sweep();
            if closed > 0 {
                tracing::debug!(upstream = %u.name, closed, "closed idle upstream connections");
            }
        }
        let timeout = state.config.gateway.idle_timeout;
        drop(state);
        let now = Instant::now();
        let _ = IDLE.try_with(|w| {
            for (_, c) in w.borrow_mut().conns.iter_mut() {
                let (begun, open) = c.conn.activity.read();
                if open || begun != c.begun {
                    c.begun = begun;
                    c.quiet_since = None;
                    continue;
                }
                let since = *c.quiet_since.get_or_insert(now);
                if !c.closed && now.duration_since(since) >= timeout {
                    if c.graceful && c.asked.is_none() {
                        tracing::debug!(peer = %c.conn.peer, "asking an idle connection to close");
                        c.conn.request_close();
                        c.asked = Some(now);
                        continue;
                    }
                    if c.asked.is_some_and(|at| now.duration_since(at) < timeout) {
                        continue;
                    }
                    tracing::debug!(peer = %c.conn.peer, "closing an idle connection");
                    if let Some(socket) = &c.socket {
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                    c.closed = true;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `n` hand-offs off the workers' queues, each with the index of its worker.
    async fn take(
        receivers: &mut [tokio::sync::mpsc::UnboundedReceiver<Handoff>],
        n: usize,
    ) -> Vec<(usize, Handoff)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the acceptor handed off {} of {n} connections",
                got.len()
            );
            for (i, rx) in receivers.iter_mut().enumerate() {
                if let Ok(h) = rx.try_recv() {
                    got.push((i, h));
                }
            }
            tokio::task::yield_now().await;
        }
        got
    }

    /// A burst of connections (a load generator opening its connections at once) is spread
    /// evenly over the workers even before any worker has picked one up, and a closed
    /// connection makes room on its worker again.
    #[tokio::test]
    async fn a_burst_of_connections_is_spread_evenly_over_the_workers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lives: Vec<Arc<()>> = (0..2).map(|_| Arc::new(())).collect();
        let mut receivers = Vec::new();
        let mut queues = Vec::new();
        for live in &lives {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
            receivers.push(rx);
            queues.push(WorkerQueue {
                tx,
                live: Arc::downgrade(live),
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let admission = Admission {
            max: Box::new(|| usize::MAX),
            open: Arc::default(),
            refused: Arc::default(),
        };
        let acceptor = tokio::spawn(accept_loop(listener, queues, admission, stop_rx));

        // The workers are busy: nobody takes a connection off its queue during the burst.
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut got: Vec<Vec<Handoff>> = vec![Vec::new(), Vec::new()];
        for (i, h) in take(&mut receivers, 10).await {
            got[i].push(h);
        }
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            [5, 5],
            "10 connections over 2 workers"
        );

        // Two of worker 0's connections close: the next two connections go to worker 0.
        got[0].truncate(3);
        for _ in 0..2 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let next = take(&mut receivers, 2).await;
        assert_eq!(next.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 0]);

        stop_tx.send(true).unwrap();
        acceptor.await.unwrap();
    }
}
