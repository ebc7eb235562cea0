//! Helpers of the black-box tests that run `apiwarden serve` processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_apiwarden"))
}

/// Runs `apiwarden SUBCOMMAND ARGS --config CONFIG`: (success, stdout, stderr).
pub fn cli(subcommand: &str, config: &Path, args: &[&str]) -> (bool, String, String) {
    cli_env(subcommand, config, args, &[])
}

/// `cli` with these environment variables set.
pub fn cli_env(
    subcommand: &str,
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let out = bin()
        .arg(subcommand)
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aw-{tag}-{}-{}",
        std::process::id(),
        apiwarden_gateway::ids::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn redis_available() -> bool {
    if TcpStream::connect("127.0.0.1:6379").is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("Redis on 127.0.0.1:6379 is required under CI");
    }
    eprintln!("\n*** SKIPPED: no Redis on 127.0.0.1:6379; the fleet limit test did not run ***\n");
    false
}

const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_admin() -> Result<postgres::Client, postgres::Error> {
    let mut c: postgres::Config = PG_BASE.parse()?;
    c.connect_timeout(Duration::from_secs(3));
    c.connect(postgres::NoTls)
}

/// Whether the PostgreSQL at 127.0.0.1:5432 (trust auth, user `postgres`, database `test`) can
/// be used; under CI it must.
pub fn postgres_available() -> bool {
    match pg_admin() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL at 127.0.0.1:5432 is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED: PostgreSQL not reachable at 127.0.0.1:5432 ({e}); the fleet key test did not run ***\n");
            false
        }
    }
}

/// A fresh schema in that PostgreSQL, dropped with everything in it at the end; `url` points
/// at it (through the `search_path` option), for `storage.database`.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub fn create() -> PgSchema {
        let schema = PgSchema::planned();
        schema.make();
        schema
    }

    /// The name and URL of a fresh schema that does not exist yet (`make` creates it).
    pub fn planned() -> PgSchema {
        let name = format!("aw_test_{}", apiwarden_gateway::ids::new_id().simple());
        let url = format!("{PG_BASE}?options=-csearch_path%3D{name}");
        PgSchema { name, url }
    }

    pub fn make(&self) {
        pg_admin()
            .unwrap()
            .batch_execute(&format!("CREATE SCHEMA {}", self.name))
            .unwrap();
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut admin) = pg_admin() {
            let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub child: Child,
    pub addr: String,
    pub admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_node(dir: &Path, i: usize, common: &str) -> Node {
    start_node_env(dir, i, common, &[])
}

/// `start_node` with these environment variables set for the node.
pub fn start_node_env(dir: &Path, i: usize, common: &str, env: &[(&str, &str)]) -> Node {
    let port = free_port();
    let admin = free_port();
    let path = dir.join(format!("node{i}.toml"));
    std::fs::write(
        &path,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nnode = \"node{i}\"\nworker_threads = 1\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [storage]\ndata_dir = \"data{i}\"\n{common}"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_apiwarden"))
        .args(["serve", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node {
        child,
        addr: format!("127.0.0.1:{port}"),
        admin: format!("127.0.0.1:{admin}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "node {i} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    node
}

/// A GET with a bearer key on a fresh connection: the status.
pub fn get_with_key(addr: &str, path: &str, key: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out[9..12].parse().unwrap()
}

/// One keep-alive HTTP/1.1 connection; returns the status of each GET.
pub struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    pub fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    pub fn get(&mut self, path: &str) -> u16 {
        self.request(path).0
    }

    /// A GET: the status and the body.
    pub fn request(&mut self, path: &str) -> (u16, String) {
        write!(self.w, "GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status = line[9..12].parse().unwrap();
        let mut length = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.r.read_exact(&mut body).unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Every audit event in the ledger of `data_dir`, one JSON document per line (what
/// `audit.ndjson` held before the ledger).
pub fn audit_text(data_dir: &Path) -> String {
    let mut out = String::new();
    apiwarden_gateway::ledger::read_records(&data_dir.join("ledger"), |_, payload| {
        out.push_str(&String::from_utf8_lossy(payload));
        out.push('\n');
    })
    .expect("the ledger reads");
    out
}

/// Waits up to 20 s for the gateway whose data directory is `data_dir` to have recorded its
/// start-up (its last start-up event, "gateway started", is in the ledger).
pub fn wait_started(data_dir: &Path) {
    let started = Instant::now();
    while !audit_text(data_dir).contains("gateway started") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no start-up event in the ledger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The project's echo upstream (`apiwarden_gateway::echo`) for a test without a runtime of its
/// own: it runs on a background thread for the rest of the test process.
pub fn echo_upstream() -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
                .await
                .unwrap();
            tx.send(up).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}
