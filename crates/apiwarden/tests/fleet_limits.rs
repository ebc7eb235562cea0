//! Fleet mode: three gateway processes share one budget in the Redis on 127.0.0.1:6379.
//!
//! Without that Redis the test says so loudly and passes, unless `CI` is set, where it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn redis_available() -> bool {
    if TcpStream::connect("127.0.0.1:6379").is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("Redis on 127.0.0.1:6379 is required under CI");
    }
    eprintln!("\n*** SKIPPED: no Redis on 127.0.0.1:6379; the fleet limit test did not run ***\n");
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    child: Child,
    addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path, i: usize, common: &str) -> Node {
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "node {i} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    node
}

/// One keep-alive HTTP/1.1 connection; returns the status of each GET.
struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn get(&mut self, path: &str) -> u16 {
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
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_budget_within_two_percent() {
    if !redis_available() {
        return;
    }
    let up = apiwarden_gateway::echo::spawn(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "aw-fleet-{}-{}",
        std::process::id(),
        apiwarden_gateway::ids::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // A prefix of its own, so that no other run shares this budget.
    let prefix = format!("test-{}", apiwarden_gateway::ids::new_id());
    let (rate, burst) = (200.0, 20.0);
    let common = format!(
        "redis = \"redis://127.0.0.1:6379/\"\nredis_prefix = \"{prefix}\"\n\n\
         [[upstreams]]\nname = \"echo\"\nurl = \"http://{up}\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"echo\"\nauth = [\"none\"]\nlimits = [\"global\"]\n\n\
         [limits.global]\nrate = \"200/s\"\nburst = 20\nkey = \"route\"\n"
    );
    let nodes: Vec<Node> = (0..3).map(|i| start_node(&dir, i, &common)).collect();

    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let run = Duration::from_secs(5);
    let mut clients = Vec::new();
    // Two clients per node, each at 250 requests a second: 1 500/s offered, 7.5 times the limit.
    for n in &nodes {
        for _ in 0..2 {
            let (addr, admitted, refused, stop) = (
                n.addr.clone(),
                admitted.clone(),
                refused.clone(),
                stop.clone(),
            );
            clients.push(std::thread::spawn(move || {
                let mut c = Conn::open(&addr);
                let mut next = Instant::now();
                let mut last = start;
                while start.elapsed() < run && !stop.load(Ordering::Relaxed) {
                    last = Instant::now();
                    match c.get("/api/x") {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        429 => refused.fetch_add(1, Ordering::Relaxed),
                        s => panic!("status {s}"),
                    };
                    next += Duration::from_millis(4);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                last
            }));
        }
    }
    let last = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .max()
        .unwrap();
    let span = last.duration_since(start).as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    let expected = burst + rate * span;
    let error = (admitted - expected).abs() / expected;
    println!(
        "3 nodes, {:.0} offered in {span:.2} s: admitted {admitted}, one global budget allows {expected:.1}, error {:.2}%",
        admitted + refused.load(Ordering::Relaxed) as f64,
        error * 100.0
    );
    assert!(
        refused.load(Ordering::Relaxed) as f64 > admitted,
        "the clients did offer well over the limit"
    );
    assert!(
        error <= 0.02,
        "admitted {admitted}, a single global limit allows {expected:.1}"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
