//! netcluster side by side with what its users would pick instead — Node's cluster (round robin
//! and shared), nginx, a Node.js program run by netcluster, and a single-process tokio server
//! of ours as the zero-overhead baseline — on the same machine, in the same run, interleaved.
//!
//! Run it through `benches/compare.sh` (which installs the peers and builds the release
//! binaries); see `benches/README.md`. Arguments: `--quick` (under 2 minutes), `--write FILE`
//! (replace the section between the compare markers of FILE with the report).
//!
//! What it measures, for each server and worker count, the median of the repetitions:
//! throughput, p50/p99 latency, and the **server's CPU time per connection or request**
//! (`/proc/PID/task/*/schedstat` of the primary and every worker, over the load window) — which
//! does not depend on whether the client, sharing the same cores, is the bottleneck. Then
//! fairness (connections per worker, max/min), peak RSS, and for netcluster the time a rolling
//! reload takes and the p99 latency during reloads next to steady state.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    quick: bool,
    write: Option<PathBuf>,
    /// Seconds per load window.
    secs: f64,
    reps: usize,
    workers: Vec<usize>,
    root: PathBuf,
    /// `--only`: the servers to run (all when empty).
    only: Vec<Kind>,
}

impl Opts {
    fn parse() -> Opts {
        let mut quick = false;
        let mut write = None;
        let mut only = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--write" => write = args.next().map(PathBuf::from),
                "--only" => {
                    for name in args.next().unwrap_or_default().split(',') {
                        match KINDS.iter().find(|k| k.short() == name) {
                            Some(k) => only.push(*k),
                            None => {
                                eprintln!(
                                    "compare: --only takes {}",
                                    KINDS.map(Kind::short).join(",")
                                );
                                std::process::exit(2);
                            }
                        }
                    }
                }
                "--bench" => {} // cargo bench passes it
                other => {
                    eprintln!(
                        "compare: unknown argument {other:?} (--quick, --write FILE, --only A,B)"
                    );
                    std::process::exit(2);
                }
            }
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if quick {
            Opts {
                quick,
                write,
                secs: 0.6,
                reps: 3,
                workers: vec![2],
                root,
                only,
            }
        } else {
            Opts {
                quick,
                write,
                secs: 1.5,
                reps: 3,
                workers: vec![2, 8],
                root,
                only,
            }
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        KINDS
            .into_iter()
            .filter(|k| {
                if self.only.is_empty() {
                    // The quick run (within 2 minutes) leaves out the Node.js program worker,
                    // the slowest to start, and the floor without answers.
                    !(self.quick && matches!(k, Kind::NodeProgram | Kind::FloorNoAck))
                } else {
                    self.only.contains(k)
                }
            })
            .collect()
    }

    fn netcluster(&self) -> PathBuf {
        self.root.join("target/release/netcluster")
    }

    fn baseline(&self) -> PathBuf {
        self.root.join("target/release/examples/tokio_baseline")
    }

    fn floor(&self) -> PathBuf {
        self.root.join("target/release/examples/handoff_floor")
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Rr,
    Shared,
    ReusePort,
    NodeProgram,
    NodeRr,
    NodeNone,
    Nginx,
    Tokio,
    Floor,
    FloorNoAck,
}

const KINDS: [Kind; 10] = [
    Kind::Rr,
    Kind::Shared,
    Kind::ReusePort,
    Kind::NodeProgram,
    Kind::NodeRr,
    Kind::NodeNone,
    Kind::Nginx,
    Kind::Tokio,
    Kind::Floor,
    Kind::FloorNoAck,
];

impl Kind {
    /// The name `--only` takes.
    fn short(self) -> &'static str {
        match self {
            Kind::Rr => "rr",
            Kind::Shared => "shared",
            Kind::ReusePort => "reuseport",
            Kind::NodeProgram => "node-program",
            Kind::NodeRr => "node-rr",
            Kind::NodeNone => "node-none",
            Kind::Nginx => "nginx",
            Kind::Tokio => "tokio",
            Kind::Floor => "floor",
            Kind::FloorNoAck => "floor-no-ack",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Rr => "netcluster round-robin",
            Kind::Shared => "netcluster shared",
            Kind::ReusePort => "netcluster reuseport",
            Kind::NodeProgram => "netcluster -- node app.js",
            Kind::NodeRr => "Node cluster rr",
            Kind::NodeNone => "Node cluster none",
            Kind::Nginx => "nginx",
            Kind::Tokio => "tokio, one process",
            Kind::Floor => "hand-off floor",
            Kind::FloorNoAck => "hand-off floor, no answers",
        }
    }

    fn policy(self) -> Option<&'static str> {
        match self {
            Kind::Rr => Some("round-robin"),
            Kind::Shared => Some("shared"),
            Kind::ReusePort => Some("reuseport"),
            _ => None,
        }
    }

    fn serves(self, app: App) -> bool {
        match self {
            Kind::NodeProgram | Kind::Nginx | Kind::Floor | Kind::FloorNoAck => app == App::Http,
            _ => true,
        }
    }

    fn is_netcluster(self) -> bool {
        matches!(
            self,
            Kind::Rr | Kind::Shared | Kind::ReusePort | Kind::NodeProgram
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum App {
    Echo,
    Http,
}

impl App {
    fn name(self) -> &'static str {
        match self {
            App::Echo => "echo",
            App::Http => "http",
        }
    }
}

struct Server {
    kind: Kind,
    child: Child,
    addr: SocketAddr,
    control: PathBuf,
    _dir: tempfile::TempDir,
    stdout: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Server {
    fn start(opts: &Opts, kind: Kind, app: App, workers: usize) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let mut cmd = match kind {
            Kind::Rr | Kind::Shared | Kind::ReusePort => {
                let mut c = Command::new(opts.netcluster());
                c.args(["serve", "--listen", "127.0.0.1:0", "--app", app.name()])
                    .args(["--workers", &workers.to_string()])
                    .args(["--policy", kind.policy().unwrap()])
                    .arg("--control")
                    .arg(&control);
                c
            }
            Kind::NodeProgram => {
                let mut c = Command::new(opts.netcluster());
                c.args(["serve", "--listen", "127.0.0.1:0"])
                    .args(["--workers", &workers.to_string()])
                    .arg("--control")
                    .arg(&control)
                    .args(["--", "node"])
                    .arg(opts.root.join("examples/node-worker/app.js"));
                c
            }
            Kind::NodeRr | Kind::NodeNone => {
                let mut c = Command::new("node");
                c.arg(opts.root.join("benches/node_cluster.js"))
                    .args([app.name(), &workers.to_string()])
                    .env(
                        "NODE_CLUSTER_SCHED_POLICY",
                        if kind == Kind::NodeRr { "rr" } else { "none" },
                    );
                c
            }
            Kind::Nginx => {
                let port = free_port();
                let conf = dir.path().join("nginx.conf");
                let d = dir.path().display();
                std::fs::write(
                    &conf,
                    format!(
                        "worker_processes {workers};\n\
                         daemon off;\n\
                         master_process on;\n\
                         pid {d}/nginx.pid;\n\
                         error_log {d}/error.log warn;\n\
                         events {{ worker_connections 4096; }}\n\
                         http {{\n  access_log off;\n  client_body_temp_path {d};\n  \
                         proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  \
                         uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
                         keepalive_requests 1000000;\n  \
                         server {{\n    listen 127.0.0.1:{port};\n    \
                         location / {{ default_type text/plain; return 200 \"hello\\n\"; }}\n  \
                         }}\n}}\n"
                    ),
                )
                .unwrap();
                let mut c = Command::new("nginx");
                c.arg("-c").arg(&conf).arg("-p").arg(dir.path());
                c.env("NGINX_BENCH_PORT", port.to_string());
                c
            }
            Kind::Tokio => {
                let mut c = Command::new(opts.baseline());
                c.args([app.name(), &workers.to_string()]);
                c
            }
            Kind::Floor | Kind::FloorNoAck => {
                let mut c = Command::new(opts.floor());
                c.arg(workers.to_string());
                if kind == Kind::FloorNoAck {
                    c.arg("--no-ack");
                }
                c
            }
        };
        cmd.env("NETCLUSTER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.name()));
        let stdout = lines_of(child.stdout.take().unwrap());
        let mut server = Server {
            kind,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            control,
            _dir: dir,
            stdout,
        };
        server.addr = if kind == Kind::Nginx {
            let port: u16 = cmd
                .get_envs()
                .find(|(k, _)| *k == "NGINX_BENCH_PORT")
                .and_then(|(_, v)| v?.to_str()?.parse().ok())
                .unwrap();
            SocketAddr::from(([127, 0, 0, 1], port))
        } else {
            let line = server
                .stdout
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{} did not say where it listens", kind.name()));
            line.trim_start_matches("listening on ").parse().unwrap()
        };
        server.wait_ready(workers);
        server
    }

    fn wait_ready(&self, workers: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "{} did not get ready",
                self.kind.name()
            );
            let ready = if self.kind.is_netcluster() {
                self.status().is_some_and(|s| {
                    s["workers"].as_array().is_some_and(|w| {
                        w.len() == workers && w.iter().all(|w| w["state"] == "listening")
                    })
                })
            } else {
                TcpStream::connect(self.addr).is_ok()
                    && (self.kind == Kind::Tokio || self.worker_pids().len() >= workers)
            };
            if ready {
                // Let the first connection's effects (lazy initialisation) pass.
                thread::sleep(Duration::from_millis(100));
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/netcluster"),
        )
        .args(["status", "--json", "--control"])
        .arg(&self.control)
        .output()
        .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The primary's descendants (workers, and whatever they started).
    fn worker_pids(&self) -> Vec<u32> {
        descendants(self.pid())
    }

    /// CPU time (ns) of the primary and of each worker.
    fn cpu(&self) -> Cpu {
        let workers = self
            .worker_pids()
            .into_iter()
            .map(|p| (p, cpu_ns(p)))
            .collect();
        Cpu {
            primary: cpu_ns(self.pid()),
            workers,
        }
    }

    /// Connections each worker accepted so far, where the server can tell: netcluster's
    /// `status`, Node's workers on SIGUSR2.
    fn served(&mut self) -> Option<BTreeMap<u32, u64>> {
        match self.kind {
            Kind::Rr | Kind::Shared | Kind::ReusePort => {
                let s = self.status()?;
                Some(
                    s["workers"]
                        .as_array()?
                        .iter()
                        .filter_map(|w| Some((w["pid"].as_u64()? as u32, w["served"].as_u64()?)))
                        .collect(),
                )
            }
            Kind::NodeRr | Kind::NodeNone => {
                while self.stdout.try_recv().is_ok() {}
                let n = self.worker_pids().len();
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid() as i32),
                    nix::sys::signal::Signal::SIGUSR2,
                )
                .ok()?;
                let mut out = BTreeMap::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                while out.len() < n && Instant::now() < deadline {
                    if let Ok(line) = self.stdout.recv_timeout(Duration::from_millis(100)) {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        if f.len() == 3 && f[0] == "served" {
                            out.insert(f[1].parse().ok()?, f[2].parse().ok()?);
                        }
                    }
                }
                Some(out)
            }
            _ => None,
        }
    }

    /// Peak resident memory (`VmHWM`) of the primary and of the largest worker, in KiB.
    fn peak_rss(&self) -> (u64, u64) {
        let primary = vm_hwm(self.pid());
        let worker = self
            .worker_pids()
            .into_iter()
            .map(vm_hwm)
            .max()
            .unwrap_or(0);
        (primary, worker)
    }
}

struct Cpu {
    primary: u64,
    workers: BTreeMap<u32, u64>,
}

impl Cpu {
    /// ns spent between `self` and `later`: (primary, workers).
    fn until(&self, later: &Cpu) -> (u64, u64) {
        let primary = later.primary.saturating_sub(self.primary);
        let workers = later
            .workers
            .iter()
            .map(|(p, ns)| ns.saturating_sub(*self.workers.get(p).unwrap_or(&0)))
            .sum();
        (primary, workers)
    }

    fn per_worker_until(&self, later: &Cpu) -> BTreeMap<u32, u64> {
        later
            .workers
            .iter()
            .map(|(p, ns)| (*p, ns.saturating_sub(*self.workers.get(p).unwrap_or(&0))))
            .collect()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every descendant of `root`, from `/proc/*/stat`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.first() == Some(&"Z") {
                continue;
            }
            if let Some(ppid) = f.get(1).and_then(|p| p.parse::<u32>().ok()) {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &parent {
            if *pp == p {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Time on CPU of every thread of `pid`, in ns (`schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Loads

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    /// wrk, `Connection: close`: one request per connection.
    HttpClose,
    /// Echo: connect, greeting, one round trip, close.
    EchoChurn,
    /// wrk, keep-alive.
    HttpKeepAlive,
    /// Echo: round trips on open connections.
    EchoPersistent,
}

const LOADS: [Load; 4] = [
    Load::HttpClose,
    Load::EchoChurn,
    Load::HttpKeepAlive,
    Load::EchoPersistent,
];

impl Load {
    fn app(self) -> App {
        match self {
            Load::HttpClose | Load::HttpKeepAlive => App::Http,
            Load::EchoChurn | Load::EchoPersistent => App::Echo,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Load::HttpClose => "HTTP `Connection: close`",
            Load::EchoChurn => "echo churn",
            Load::HttpKeepAlive => "HTTP keep-alive",
            Load::EchoPersistent => "echo round trips",
        }
    }

    /// What one unit is.
    fn unit(self) -> &'static str {
        match self {
            Load::HttpClose | Load::EchoChurn => "conn",
            Load::HttpKeepAlive => "req",
            Load::EchoPersistent => "round trip",
        }
    }
}

/// What one load window gave.
#[derive(Clone, Debug, Default)]
struct Sample {
    ops: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    cpu_primary_ns: u64,
    cpu_workers_ns: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn cpu_us_per_op(&self) -> f64 {
        (self.cpu_primary_ns + self.cpu_workers_ns) as f64 / 1000.0 / self.ops.max(1) as f64
    }
    fn primary_us_per_op(&self) -> f64 {
        self.cpu_primary_ns as f64 / 1000.0 / self.ops.max(1) as f64
    }
    /// Share of the machine's cores the server used.
    fn server_cores(&self) -> f64 {
        (self.cpu_primary_ns + self.cpu_workers_ns) as f64 / 1e9 / self.secs
    }
}

/// Latencies, in µs: p50 and p99.
fn percentiles(mut v: Vec<u32>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64;
    (at(0.50), at(0.99))
}

/// The client side of an echo load on `threads` threads for `secs`; returns (ops, errors,
/// latencies in µs).
/// Loopback source addresses a churning client spreads its connections over.
const SOURCES: usize = 200;

/// Connects to `addr` from loopback source address number `n` (127.0.0.2 and up, in turn).
///
/// One source address has about 28 000 ephemeral ports, and a port in `TIME_WAIT` can be
/// reused a second later at the earliest: from one address, connections churned faster than
/// that make `connect` search for a port and stall for tens of milliseconds (seen as 15–20 ms
/// p99s that followed whichever server ran after another churning one). Many source
/// addresses take that limit away, and look more like many clients.
fn connect_from(addr: SocketAddr, n: usize) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let SocketAddr::V4(to) = addr else {
        return TcpStream::connect(addr);
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // The port is chosen at connect, for the whole address pair, not at bind.
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
    let host = u8::try_from(2 + n % SOURCES).unwrap_or(2);
    let from = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, host), 0);
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(from),
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

fn echo_load(
    addr: SocketAddr,
    churn: bool,
    threads: usize,
    secs: f64,
    pause: Duration,
) -> (u64, u64, Vec<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|thread_no| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut source = thread_no;
                let mut lat = Vec::with_capacity(1 << 16);
                let mut ops = 0u64;
                let mut errors = 0u64;
                let timeout = Some(Duration::from_secs(5));
                if churn {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        source = source.wrapping_add(threads);
                        let ok = (|| -> std::io::Result<()> {
                            let mut s = connect_from(addr, source)?;
                            s.set_read_timeout(timeout)?;
                            s.set_nodelay(true)?;
                            let mut hello = [0u8; 7];
                            s.read_exact(&mut hello)?;
                            s.write_all(b"x\n")?;
                            let mut back = [0u8; 2];
                            s.read_exact(&mut back)?;
                            Ok(())
                        })();
                        match ok {
                            Ok(()) => {
                                ops += 1;
                                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                            Err(_) => errors += 1,
                        }
                        if !pause.is_zero() {
                            thread::sleep(pause);
                        }
                    }
                } else {
                    let mut run = || -> std::io::Result<()> {
                        let mut s = TcpStream::connect(addr)?;
                        s.set_read_timeout(timeout)?;
                        s.set_nodelay(true)?;
                        let mut hello = [0u8; 7];
                        s.read_exact(&mut hello)?;
                        let msg = b"0123456789abcde\n";
                        let mut back = [0u8; 16];
                        while !stop.load(Ordering::Relaxed) {
                            let t = Instant::now();
                            s.write_all(msg)?;
                            s.read_exact(&mut back)?;
                            ops += 1;
                            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        Ok(())
                    };
                    if run().is_err() {
                        errors += 1;
                    }
                }
                (ops, errors, lat)
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    let mut errors = 0;
    let mut lat = Vec::new();
    for h in handles {
        let (o, e, l) = h.join().unwrap();
        ops += o;
        errors += e;
        lat.extend(l);
    }
    (ops, errors, lat)
}

/// wrk's figures: (requests, seconds, p50 µs, p99 µs, errors).
fn wrk(addr: SocketAddr, close: bool, secs: f64, connections: usize) -> (u64, f64, f64, f64, u64) {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{connections}"), "--latency"])
        .arg(format!("-d{}s", secs.ceil() as u64));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(format!("http://{addr}/")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let dur = |s: &str| -> f64 {
        let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
        let n: f64 = num.parse().unwrap_or(0.0);
        match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            "m" => n * 60e6,
            _ => n,
        }
    };
    let mut requests = 0;
    let mut secs_run = secs;
    let (mut p50, mut p99) = (0.0, 0.0);
    let mut errors = 0u64;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => p50 = dur(v),
            ["99%", v] => p99 = dur(v),
            [n, "requests", "in", t, ..] => {
                requests = n.parse().unwrap_or(0);
                secs_run = dur(t.trim_end_matches(',')) / 1e6;
            }
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    (requests, secs_run, p50, p99, errors)
}

fn run_load(server: &Server, load: Load, secs: f64) -> Sample {
    let before = server.cpu();
    let (ops, secs_run, p50, p99, errors) = match load {
        Load::HttpClose => wrk(server.addr, true, secs, 32),
        Load::HttpKeepAlive => wrk(server.addr, false, secs, 64),
        Load::EchoChurn | Load::EchoPersistent => {
            let churn = load == Load::EchoChurn;
            let threads = if churn { 16 } else { 32 };
            let t = Instant::now();
            let (ops, errors, lat) = echo_load(server.addr, churn, threads, secs, Duration::ZERO);
            let took = t.elapsed().as_secs_f64();
            let (p50, p99) = percentiles(lat);
            (ops, took, p50, p99, errors)
        }
    };
    let after = server.cpu();
    let (primary, workers) = before.until(&after);
    Sample {
        ops,
        secs: secs_run,
        p50_us: p50,
        p99_us: p99,
        errors,
        cpu_primary_ns: primary,
        cpu_workers_ns: workers,
    }
}

// ---------------------------------------------------------------------------------------------
// Fairness, reload

/// max/min of connections per worker under a light churn (2 clients, a pause between
/// connections) or a heavy one (16 clients, no pause). Where the server cannot count, workers'
/// CPU time stands in (marked `cpu`).
fn fairness(opts: &Opts, kind: Kind, workers: usize, heavy: bool) -> Option<(f64, bool, u64)> {
    if !kind.serves(App::Echo) || kind == Kind::Tokio {
        return None;
    }
    let mut server = Server::start(opts, kind, App::Echo, workers);
    let before_counts = server.served();
    let before_cpu = server.cpu();
    let secs = if opts.quick { 1.0 } else { 4.0 };
    let (threads, pause) = if heavy {
        (16, Duration::ZERO)
    } else {
        (2, Duration::from_millis(1))
    };
    let (_ops, _errors, _lat) = echo_load(server.addr, true, threads, secs, pause);
    thread::sleep(Duration::from_millis(100));
    let after_counts = server.served();
    let (values, by_cpu): (Vec<f64>, bool) = match (before_counts, after_counts) {
        (Some(b), Some(a)) if !a.is_empty() => (
            a.iter()
                .map(|(p, n)| n.saturating_sub(*b.get(p).unwrap_or(&0)) as f64)
                .collect(),
            false,
        ),
        _ => (
            before_cpu
                .per_worker_until(&server.cpu())
                .values()
                .map(|&v| v as f64)
                .collect(),
            true,
        ),
    };
    if values.len() < workers {
        return None;
    }
    let max = values.iter().cloned().fold(f64::MIN, f64::max);
    let min = values.iter().cloned().fold(f64::MAX, f64::min);
    let total = if by_cpu {
        0
    } else {
        values.iter().sum::<f64>() as u64
    };
    Some((max / min.max(1.0), by_cpu, total))
}

/// Fairness runs: (workers, heavy, server) → (max/min, counted by CPU time, connections
/// counted) per run.
type Fairness = BTreeMap<(usize, bool, Kind), Vec<(f64, bool, u64)>>;

/// The median max/min of `n` connections given to `workers` at random, each worker equally
/// likely (what a hash of the connection's addresses does, `SO_REUSEPORT`'s way): the spread
/// that chance alone gives for that many connections.
fn uniform_spread(n: u64, workers: usize) -> f64 {
    if n == 0 || workers == 0 {
        return f64::NAN;
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut ratios: Vec<f64> = (0..501)
        .map(|_| {
            let mut bins = vec![0u64; workers];
            for _ in 0..n {
                bins[(next() % workers as u64) as usize] += 1;
            }
            let max = *bins.iter().max().unwrap_or(&0) as f64;
            let min = *bins.iter().min().unwrap_or(&0) as f64;
            max / min.max(1.0)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

struct ReloadFigures {
    steady_p99_us: f64,
    during_p99_us: f64,
    reloads: usize,
    failed_requests: u64,
    serving_ms: Vec<u64>,
    took_ms: Vec<u64>,
}

/// Under a steady keep-alive HTTP load: p99 with no reload, then p99 while reloading back to
/// back, and each reload's time to all-new-serving.
fn reload(opts: &Opts, kind: Kind, workers: usize) -> ReloadFigures {
    let server = Server::start(opts, kind, App::Http, workers);
    let secs = if opts.quick { 1.0 } else { 2.0 };
    // Steady and reloading windows take turns, three of each: each p99 is the median of its
    // three, so one hiccup of the shared machine does not decide the ratio.
    let mut steady = Vec::new();
    let mut during = Vec::new();
    let mut failed = 0;
    let mut serving_ms = Vec::new();
    let mut took_ms = Vec::new();
    for _ in 0..3 {
        let (_, _, _, p99, errors) = wrk(server.addr, false, secs, 32);
        steady.push(p99);
        failed += errors;
        let stop = Arc::new(AtomicBool::new(false));
        let control = server.control.clone();
        let bin = opts.netcluster();
        let flag = stop.clone();
        let reloads = thread::spawn(move || {
            let mut serving = Vec::new();
            let mut took = Vec::new();
            thread::sleep(Duration::from_millis(200));
            while !flag.load(Ordering::Relaxed) {
                let out = Command::new(&bin)
                    .args(["reload", "--control"])
                    .arg(&control)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                // "reloaded to generation G in T ms (all new serving after S ms)"
                let num_after = |key: &str| -> Option<u64> {
                    let i = text.find(key)? + key.len();
                    text[i..]
                        .split(|c: char| !c.is_ascii_digit())
                        .find(|s| !s.is_empty())?
                        .parse()
                        .ok()
                };
                if let (Some(t), Some(s)) = (num_after(" in "), num_after("serving after ")) {
                    took.push(t);
                    serving.push(s);
                }
                thread::sleep(Duration::from_millis(100));
            }
            (serving, took)
        });
        let (_, _, _, p99, errors) = wrk(server.addr, false, secs, 32);
        during.push(p99);
        failed += errors;
        stop.store(true, Ordering::Relaxed);
        let (serving, took) = reloads.join().unwrap();
        serving_ms.extend(serving);
        took_ms.extend(took);
    }
    ReloadFigures {
        steady_p99_us: median(steady),
        during_p99_us: median(during),
        reloads: serving_ms.len(),
        failed_requests: failed,
        serving_ms,
        took_ms,
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_u(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "not found".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "| | |\n|---|---|\n| CPUs | {cores} ({cpu}) |\n| kernel | {} |\n| rustc | {} |\n\
         | wrk | {} |\n| nginx | {} |\n| node | {} |\n| load average at start | {} |\n",
        cmd_out("uname", &["-r"]),
        cmd_out("rustc", &["--version"]),
        cmd_out("wrk", &["--version"]),
        cmd_out("nginx", &["-v"]),
        cmd_out("node", &["--version"]),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn main() {
    let opts = Opts::parse();
    for bin in [opts.netcluster(), opts.baseline(), opts.floor()] {
        assert!(
            bin.exists(),
            "{} is missing: run benches/compare.sh (it builds the release binaries)",
            bin.display()
        );
    }
    let started = Instant::now();
    let machine = machine();
    // samples[(workers, load, kind)] = one Sample per repetition
    let mut samples: BTreeMap<(usize, Load, Kind), Vec<Sample>> = BTreeMap::new();
    let mut rss: BTreeMap<(usize, Kind), (u64, u64)> = BTreeMap::new();
    for rep in 0..opts.reps {
        for &workers in &opts.workers {
            for kind in opts.kinds() {
                for app in [App::Http, App::Echo] {
                    if !kind.serves(app) {
                        continue;
                    }
                    let server = Server::start(&opts, kind, app, workers);
                    for &load in LOADS.iter().filter(|l| l.app() == app) {
                        let s = run_load(&server, load, opts.secs);
                        eprintln!(
                            "[{:>5.1}s] rep {rep} workers {workers} {:<28} {:<26} {:>9.0}/s {:>6.1} µs/{} p99 {:>7.0} µs{}",
                            started.elapsed().as_secs_f64(),
                            kind.name(),
                            load.title(),
                            s.rate(),
                            s.cpu_us_per_op(),
                            load.unit(),
                            s.p99_us,
                            if s.errors > 0 {
                                format!(" ERRORS {}", s.errors)
                            } else {
                                String::new()
                            }
                        );
                        samples.entry((workers, load, kind)).or_default().push(s);
                    }
                    let (p, w) = server.peak_rss();
                    let e = rss.entry((workers, kind)).or_insert((0, 0));
                    e.0 = e.0.max(p);
                    e.1 = e.1.max(w);
                }
            }
        }
    }
    // Fairness.
    let fair_workers: Vec<usize> = if opts.quick { vec![4] } else { vec![4, 8] };
    let mut fair: Fairness = BTreeMap::new();
    {
        for &w in &fair_workers {
            for heavy in [false, true] {
                for kind in opts.kinds() {
                    if let Some(f) = fairness(&opts, kind, w, heavy) {
                        eprintln!(
                            "[{:>5.1}s] fairness {} workers {w} {}: {:.2}",
                            started.elapsed().as_secs_f64(),
                            kind.name(),
                            if heavy { "heavy" } else { "light" },
                            f.0
                        );
                        fair.entry((w, heavy, kind)).or_default().push(f);
                    }
                }
            }
        }
    }
    // Reload.
    let reload_kinds: &[Kind] = if opts.quick {
        &[Kind::Rr]
    } else {
        &[Kind::Rr, Kind::Shared, Kind::ReusePort]
    };
    let mut reloads = Vec::new();
    for &kind in reload_kinds.iter().filter(|k| opts.kinds().contains(k)) {
        let r = reload(&opts, kind, 2);
        eprintln!(
            "[{:>5.1}s] reload {}: {} reloads, p99 {:.0} → {:.0} µs",
            started.elapsed().as_secs_f64(),
            kind.name(),
            r.reloads,
            r.steady_p99_us,
            r.during_p99_us
        );
        reloads.push((kind, r));
    }
    let report = report(&opts, &machine, &samples, &rss, &fair, &reloads, started);
    println!("{report}");
    if let Some(path) = &opts.write {
        write_between_markers(path, &report);
        eprintln!("wrote {}", path.display());
    }
}

fn report(
    opts: &Opts,
    machine: &str,
    samples: &BTreeMap<(usize, Load, Kind), Vec<Sample>>,
    rss: &BTreeMap<(usize, Kind), (u64, u64)>,
    fair: &Fairness,
    reloads: &[(Kind, ReloadFigures)],
    started: Instant,
) -> String {
    let mut r = String::new();
    let med = |w: usize, l: Load, k: Kind, f: &dyn Fn(&Sample) -> f64| -> Option<f64> {
        let v = samples.get(&(w, l, k))?;
        Some(median(v.iter().map(f).collect()))
    };
    let _ = writeln!(
        r,
        "Command: `bash benches/compare.sh{}` — {} repetitions, interleaved (every server \
         in turn, then again), {} s per load window (wrk's: {} s, it counts whole seconds); \
         every figure is the median of the repetitions. The run took {:.0} s.\n",
        if opts.quick { " --quick" } else { "" },
        opts.reps,
        opts.secs,
        opts.secs.ceil(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(r, "{machine}");
    let _ = writeln!(
        r,
        "Loads (client on the same cores as the server): HTTP with wrk (2 threads; 32 \
         connections with `Connection: close`, 64 with keep-alive); echo with 16 client \
         threads that each connect (from 200 loopback source addresses in turn), read the \
         greeting, make one round trip and close (churn), or 32 open connections making \
         16-byte round trips. New connections from one address are limited by its ephemeral \
         ports (28 232 here, each reusable a second after its `TIME_WAIT` began): wrk's \
         `Connection: close` load tops out near 28 000–31 000 connections/s whatever the \
         server. **Server CPU** is the time on CPU \
         of the primary and every worker (`/proc/PID/task/*/schedstat`) over the window, \
         divided by the connections or requests served: it does not depend on whether the \
         client is the limit. **cores** is the server's share of the machine over the window \
         (of {} cores): well below the core count means the client, not the server, was the \
         limit.\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    for &w in &opts.workers {
        let _ = writeln!(r, "### {w} workers\n");
        for load in LOADS {
            let anchor = if load.app() == App::Http {
                Kind::Nginx
            } else {
                Kind::Tokio
            };
            let a_cpu = med(w, load, anchor, &Sample::cpu_us_per_op);
            let a_rate = med(w, load, anchor, &Sample::rate);
            let _ = writeln!(
                r,
                "**{}** (anchor: {})\n\n| server | {}/s | × anchor | server CPU µs/{} | × anchor | \
                 of which primary | p50 µs | p99 µs | cores | errors |\n|---|---|---|---|---|---|---|---|---|---|",
                load.title(),
                anchor.name(),
                load.unit(),
                load.unit()
            );
            for kind in KINDS {
                let Some(rate) = med(w, load, kind, &Sample::rate) else {
                    continue;
                };
                let cpu = med(w, load, kind, &Sample::cpu_us_per_op).unwrap_or(f64::NAN);
                let prim = med(w, load, kind, &Sample::primary_us_per_op).unwrap_or(f64::NAN);
                let p50 = med(w, load, kind, &|s| s.p50_us).unwrap_or(f64::NAN);
                let p99 = med(w, load, kind, &|s| s.p99_us).unwrap_or(f64::NAN);
                let cores = med(w, load, kind, &Sample::server_cores).unwrap_or(f64::NAN);
                let errors: u64 = samples
                    .get(&(w, load, kind))
                    .map_or(0, |v| v.iter().map(|s| s.errors).sum());
                let primary = if kind.is_netcluster()
                    || matches!(
                        kind,
                        Kind::NodeRr
                            | Kind::NodeNone
                            | Kind::Nginx
                            | Kind::Floor
                            | Kind::FloorNoAck
                    ) {
                    format!("{prim:.1}")
                } else {
                    "–".into()
                };
                // An anchor left out (`--only`) leaves its ratio column empty.
                let ratio =
                    |x: f64, a: Option<f64>| a.map_or("–".into(), |a| format!("{:.2}", x / a));
                let _ = writeln!(
                    r,
                    "| {} | {:.0} | {} | {:.1} | {} | {} | {:.0} | {:.0} | {:.2} | {} |",
                    kind.name(),
                    rate,
                    ratio(rate, a_rate),
                    cpu,
                    ratio(cpu, a_cpu),
                    primary,
                    p50,
                    p99,
                    cores,
                    errors
                );
            }
            let _ = writeln!(r);
        }
        let close = Load::HttpClose;
        let prim = |k: Kind| med(w, close, k, &Sample::primary_us_per_op);
        if let (Some(rr), Some(floor)) = (prim(Kind::Rr), prim(Kind::Floor)) {
            let _ = writeln!(
                r,
                "Round robin's primary, HTTP `Connection: close`: {rr:.1} µs per hand-off; the \
                 hand-off floor (a bare `epoll_wait` loop making the same system calls: \
                 `accept4`, `sendmsg` of up to 8 descriptors, the worker's answer, `close`) \
                 {floor:.1} µs in the same run: {:.2}×{}.\n",
                rr / floor,
                prim(Kind::FloorNoAck).map_or(String::new(), |n| format!(
                    "; the floor without answers (its copies closed once sent) {n:.1} µs"
                ))
            );
        }
        let _ = writeln!(
            r,
            "Peak RSS (`VmHWM`), KiB:\n\n| server | primary | largest worker |\n|---|---|---|"
        );
        for kind in KINDS {
            if let Some((p, wk)) = rss.get(&(w, kind)) {
                let _ = writeln!(
                    r,
                    "| {} | {p} | {} |",
                    kind.name(),
                    if kind == Kind::Tokio {
                        "–".to_string()
                    } else {
                        wk.to_string()
                    }
                );
            }
        }
        let _ = writeln!(r);
    }
    let _ = writeln!(
        r,
        "### Fairness: connections per worker, max/min\n\nEcho churn for {} s; light: 2 \
         clients with 1 ms between connections; heavy: 16 clients back to back. Counted by \
         the workers themselves (netcluster's `status`, Node's workers on `SIGUSR2`). nginx \
         serves no echo and is not in this table. The last row is the median max/min of \
         that many connections given to the workers at random (501 draws): the spread chance \
         alone gives, which a kernel hash (`SO_REUSEPORT`) cannot beat.\n",
        if opts.quick { 1.0 } else { 4.0 }
    );
    let fw: Vec<usize> = fair
        .keys()
        .map(|(w, _, _)| *w)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut head = "| server |".to_string();
    let mut sep = "|---|".to_string();
    for w in &fw {
        for heavy in [false, true] {
            let _ = write!(
                head,
                " {w} workers, {} |",
                if heavy { "heavy" } else { "light" }
            );
            sep.push_str("---|");
        }
    }
    let _ = writeln!(r, "{head}\n{sep}");
    for kind in KINDS {
        if !fair.keys().any(|(_, _, k)| *k == kind) {
            continue;
        }
        let mut row = format!("| {} |", kind.name());
        for w in &fw {
            for heavy in [false, true] {
                match fair.get(&(*w, heavy, kind)) {
                    Some(v) => {
                        let m = median(v.iter().map(|x| x.0).collect());
                        let cpu = v.iter().any(|x| x.1);
                        let _ = write!(row, " {m:.2}{} |", if cpu { " *cpu*" } else { "" });
                    }
                    None => row.push_str(" – |"),
                }
            }
        }
        let _ = writeln!(r, "{row}");
    }
    // What chance alone gives for as many connections as reuseport's workers counted: a
    // kernel hash spreads connections no better than this.
    let mut row = "| *any random spread of as many connections (reuseport's count)* |".to_string();
    let mut counts = "| *connections counted (reuseport)* |".to_string();
    for w in &fw {
        for heavy in [false, true] {
            match fair.get(&(*w, heavy, Kind::ReusePort)) {
                Some(v) if v.iter().all(|x| x.2 > 0) => {
                    let n = median_u(&v.iter().map(|x| x.2).collect::<Vec<_>>());
                    let _ = write!(row, " {:.2} |", uniform_spread(n, *w));
                    let _ = write!(counts, " {n} |");
                }
                _ => {
                    row.push_str(" – |");
                    counts.push_str(" – |");
                }
            }
        }
    }
    if fair.keys().any(|(_, _, k)| *k == Kind::ReusePort) {
        let _ = writeln!(r, "{counts}\n{row}");
    }
    let _ = writeln!(
        r,
        "\n### Rolling reload under load (2 workers, HTTP keep-alive, wrk 32 connections)\n\n\
         Three steady windows and three windows with reloads back to back, taking turns, {} s \
         each; each p99 is the median of its three windows.\n\n\
         | policy | reloads | all new serving, median ms | reload incl. drain, median ms | p99 steady µs | p99 during reloads µs | × steady | failed requests |\n|---|---|---|---|---|---|---|---|",
        // wrk counts whole seconds.
        if opts.quick { 1 } else { 2 }
    );
    for (kind, f) in reloads {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {} |",
            kind.name(),
            f.reloads,
            median_u(&f.serving_ms),
            median_u(&f.took_ms),
            f.steady_p99_us,
            f.during_p99_us,
            f.during_p99_us / f.steady_p99_us.max(1.0),
            f.failed_requests
        );
    }
    r
}

const BEGIN: &str = "<!-- compare:begin (written by benches/compare.sh) -->";
const END: &str = "<!-- compare:end -->";

fn write_between_markers(path: &Path, report: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{report}\n{}", &text[..b], &text[e..]),
        _ => format!("{text}\n{BEGIN}\n{report}\n{END}\n"),
    };
    std::fs::write(path, new).unwrap();
}
