//! Helpers for the multi-process tests: start the real binary or an example in its own process
//! group (killed on drop), read its output with deadlines, and look at processes and sockets
//! through `/proc`.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use netcluster::cluster::Status;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// What `examples/cluster_probe.rs` prints, as the types it prints them from.
#[path = "../../examples/cluster_probe/lines.rs"]
pub mod probe;

/// The `netcluster` binary built for these tests.
pub fn netcluster_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netcluster"))
}

/// An example built next to the binary (cargo builds examples for `cargo test`).
pub fn example_bin(name: &str) -> PathBuf {
    let bin = netcluster_bin();
    let dir = bin.parent().expect("target dir");
    dir.join("examples").join(name)
}

/// A started process group: the primary and its workers. Dropping it kills them all.
pub struct Running {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    pub pid: u32,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    pub stdout_seen: Vec<String>,
    pub stderr_seen: Vec<String>,
    /// A directory of this process's own (its control socket lives there unless the test
    /// chose one); removed on drop.
    pub dir: tempfile::TempDir,
}

impl Running {
    /// Starts `program args` in a new process group with piped output.
    pub fn start(program: &Path, args: &[&str]) -> Running {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Running::from_command(cmd)
    }

    /// Starts `program args` with a pipe to its stdin (see [`Running::send_line`]).
    pub fn start_interactive(program: &Path, args: &[&str]) -> Running {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::piped());
        let mut r = Running::spawn(cmd);
        r.stdin = r.child.as_mut().and_then(|c| c.stdin.take());
        r
    }

    /// Starts a prepared command with a pipe to its stdin.
    pub fn start_interactive_command(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::piped());
        let mut r = Running::spawn(cmd);
        r.stdin = r.child.as_mut().and_then(|c| c.stdin.take());
        r
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("started with start_interactive");
        writeln!(stdin, "{line}").expect("write to stdin");
        stdin.flush().expect("flush");
    }

    /// Starts a prepared command in a new process group with piped output.
    pub fn from_command(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::null());
        Running::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Running {
        let dir = tempfile::tempdir().expect("temp dir");
        let chose = cmd
            .get_envs()
            .any(|(k, _)| k == std::ffi::OsStr::new("NETCLUSTER_CONTROL"));
        if !chose {
            // Tests run in parallel: each primary gets its own control socket.
            cmd.env("NETCLUSTER_CONTROL", dir.path().join("control.sock"));
        }
        let mut child = cmd
            .env("NETCLUSTER_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Running {
            pid: child.id(),
            stdin: None,
            child: Some(child),
            stdout,
            stderr,
            stdout_seen: Vec::new(),
            stderr_seen: Vec::new(),
            dir,
        }
    }

    /// Waits for a stdout line matching `pred`, failing the test after `timeout`.
    pub fn wait_stdout(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(why) => {
                    // Say whether the output closed (and how the process ended) or time ran out.
                    let status = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    std::thread::sleep(Duration::from_millis(200));
                    self.drain_stderr();
                    panic!(
                        "no matching stdout line ({why:?} after {:?} of {timeout:?}; process status {status:?})\nstdout: {:#?}\nstderr: {:#?}",
                        timeout - deadline.saturating_duration_since(Instant::now()),
                        self.stdout_seen,
                        self.stderr_seen
                    );
                }
            }
        }
    }

    /// The first stdout line so far matching `pred`, or else the next one that arrives.
    pub fn seen_or_wait(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.stdout_seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        self.wait_stdout(timeout, pred)
    }

    /// Waits until every line of `lines` has appeared on stdout (in any order, before or after
    /// this call).
    pub fn wait_lines(&mut self, timeout: Duration, lines: &[&str]) {
        for line in lines {
            if !self.stdout_seen.iter().any(|l| l == line) {
                self.wait_stdout(timeout, |l| l == *line);
            }
        }
    }

    /// Waits for a `cluster_probe` line matching `pred`, read as a [`probe::Line`] (a stdout
    /// line that is none fails the test).
    pub fn wait_probe(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&probe::Line) -> bool,
    ) -> probe::Line {
        let line = self.wait_stdout(timeout, |l| pred(&probe_line(l)));
        probe_line(&line)
    }

    /// The `cluster_probe` lines so far, read as [`probe::Line`]s.
    pub fn probe_seen(&self) -> Vec<probe::Line> {
        self.stdout_seen.iter().map(|l| probe_line(l)).collect()
    }

    /// The first `cluster_probe` line so far matching `pred`, or else the next one that
    /// arrives.
    pub fn probe_seen_or_wait(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&probe::Line) -> bool,
    ) -> probe::Line {
        if let Some(line) = self.probe_seen().into_iter().find(|l| pred(l)) {
            return line;
        }
        self.wait_probe(timeout, pred)
    }

    /// Waits for a `cluster_probe` event matching `pred`.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&probe::ProbeEvent) -> bool,
    ) -> probe::ProbeEvent {
        match self.wait_probe(timeout, |l| matches!(l, probe::Line::Event(e) if pred(e))) {
            probe::Line::Event(e) => e,
            other => panic!("not an event: {other:?}"),
        }
    }

    /// Waits until every one of `lines` has appeared (in any order, before or after this
    /// call).
    pub fn wait_probe_lines(&mut self, timeout: Duration, lines: &[probe::Line]) {
        for line in lines {
            if !self.probe_seen().contains(line) {
                self.wait_probe(timeout, |l| l == line);
            }
        }
    }

    /// Collects the stdout lines that have arrived so far.
    pub fn drain_stdout(&mut self) -> &[String] {
        while let Ok(line) = self.stdout.try_recv() {
            self.stdout_seen.push(line);
        }
        &self.stdout_seen
    }

    /// Collects the stderr lines that have arrived so far.
    pub fn drain_stderr(&mut self) -> &[String] {
        while let Ok(line) = self.stderr.try_recv() {
            self.stderr_seen.push(line);
        }
        &self.stderr_seen
    }

    /// Waits for a stderr line matching `pred`.
    pub fn wait_stderr(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no matching stderr line within {timeout:?}\nstderr: {:#?}",
                    self.stderr_seen
                ),
            }
        }
    }

    /// The control socket of this process (unless the test chose another).
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Sends `sig` to the primary only.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid as i32), sig).expect("kill");
    }

    /// Waits for the primary to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                // Read what is left, until the pipes close or stay quiet (a worker may still
                // hold them).
                while let Ok(line) = self.stdout.recv_timeout(Duration::from_millis(300)) {
                    self.stdout_seen.push(line);
                }
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(300)) {
                    self.stderr_seen.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                self.drain_stderr();
                panic!(
                    "process {} still running after {timeout:?}\nstderr: {:#?}",
                    self.pid, self.stderr_seen
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The whole group: the primary and every worker.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// A stdout line of `cluster_probe`, read as the [`probe::Line`] it was printed from; a line
/// that is none fails the test.
pub fn probe_line(line: &str) -> probe::Line {
    probe::Line::parse(line).unwrap_or_else(|e| panic!("not a cluster_probe line: {e}"))
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs `program args` to completion (bounded by `timeout`) and returns its status and output.
pub fn run_to_end(
    program: &Path,
    args: &[&str],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let mut r = Running::start(program, args);
    let status = r.wait_exit(timeout);
    (status, r.stdout_seen.join("\n"), r.stderr_seen.join("\n"))
}

/// Processes whose parent is `ppid`, but for a primary's guardian (the process that stops the
/// workers' trees if the primary dies: it is no worker).
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let parent: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if parent == Some(ppid) && !is_guardian(pid) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Whether `pid` is a primary's guardian.
pub fn is_guardian(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|&b| b == 0)
            .any(|v| v.starts_with(b"NETCLUSTER_GUARDIAN_FD="))
    })
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Socket inodes of every descriptor process `pid` holds.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                if let Ok(ino) = n.parse() {
                    out.insert(ino);
                }
            }
        }
    }
    out
}

/// A row of `/proc/net/tcp{,6}`: local port, remote port, state, inode.
#[derive(Debug, Clone, Copy)]
pub struct TcpRow {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: u8,
    pub inode: u64,
}

/// TCP state numbers of `/proc/net/tcp`.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// Every IPv4 and IPv6 TCP socket of this network namespace.
pub fn tcp_table() -> Vec<TcpRow> {
    let mut rows = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |s: &str| {
                u16::from_str_radix(s.rsplit_once(':').map_or("0", |(_, p)| p), 16).unwrap_or(0)
            };
            rows.push(TcpRow {
                local_port: port(f[1]),
                remote_port: port(f[2]),
                state: u8::from_str_radix(f[3], 16).unwrap_or(0),
                inode: f[9].parse().unwrap_or(0),
            });
        }
    }
    rows
}

/// The inodes of the TCP sockets listening on `port`.
pub fn tcp_listeners(port: u16) -> Vec<u64> {
    tcp_table()
        .into_iter()
        .filter(|row| row.state == TCP_LISTEN && row.local_port == port)
        .map(|row| row.inode)
        .collect()
}

/// A row of `/proc/net/unix`: inode, state, whether it is listening, path.
#[derive(Debug, Clone)]
pub struct UnixRow {
    pub inode: u64,
    pub listening: bool,
    pub connected: bool,
    pub path: String,
}

/// Every Unix socket of this network namespace.
pub fn unix_table() -> Vec<UnixRow> {
    let text = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode [Path]
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 7 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
            Some(UnixRow {
                inode: f[6].parse().ok()?,
                listening: flags & 0x0001_0000 != 0,
                connected: f[5] == "03",
                path: f.get(7).map(|s| (*s).to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// For each pid, how many of `inodes` it holds.
pub fn holders(pids: &[u32], inodes: &HashSet<u64>) -> BTreeMap<u32, usize> {
    pids.iter()
        .map(|&pid| (pid, socket_inodes(pid).intersection(inodes).count()))
        .collect()
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `check` until it gives a value, or `None` after `timeout`.
pub fn eventually_or<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a client load saw: every request counted.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests answered correctly.
    pub ok: u64,
    /// Requests refused, reset, failed or timed out.
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
}

impl LoadReport {
    fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.failed += other.failed;
        for e in other.errors {
            if self.errors.len() < 20 {
                self.errors.push(e);
            }
        }
    }
}

/// A steady client load in threads of the test: echo clients ([`Load::echo`]: connect, read
/// `hello\r\n`, send a line, read it back, close, pause, again) or HTTP clients
/// ([`Load::start`], also known as [`HttpLoad`]). Every request is counted.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<thread::JoinHandle<LoadReport>>,
}

impl Load {
    /// `clients` echo clients on `addr`, each pausing `pause` between requests.
    pub fn echo(addr: std::net::SocketAddr, clients: usize, pause: Duration) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ok = std::sync::Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|c| {
                let stop = stop.clone();
                let ok = ok.clone();
                thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match echo_request(addr, &format!("client {c} request {n}\n")) {
                            Ok(()) => {
                                report.ok += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                report.failed += 1;
                                if report.errors.len() < 20 {
                                    report.errors.push(e.to_string());
                                }
                            }
                        }
                        thread::sleep(pause);
                    }
                    report
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Requests answered so far.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` further requests have been answered (the load is flowing).
    pub fn wait_for_more(&self, more: u64, timeout: Duration) {
        let target = self.ok_so_far() + more;
        eventually(timeout, "the client load to make progress", || {
            (self.ok_so_far() >= target).then_some(())
        });
    }

    /// Stops the clients and returns what they saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for t in self.threads {
            total.merge(t.join().expect("client thread"));
        }
        total
    }
}

/// One echo exchange: `hello\r\n`, then `line` back.
pub fn echo_request(addr: std::net::SocketAddr, line: &str) -> std::io::Result<()> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; 7];
    s.read_exact(&mut hello)?;
    if &hello != b"hello\r\n" {
        return Err(std::io::Error::other(format!("greeting {hello:?}")));
    }
    s.write_all(line.as_bytes())?;
    let mut back = vec![0u8; line.len()];
    s.read_exact(&mut back)?;
    if back != line.as_bytes() {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Runs `netcluster ARGS --control <r's control socket>` to completion.
pub fn ctl(r: &Running, args: &[&str]) -> (ExitStatus, String, String) {
    let control = r.control();
    let mut all: Vec<&str> = args.to_vec();
    let control = control.to_string_lossy().to_string();
    all.extend(["--control", control.as_str()]);
    let out = Command::new(netcluster_bin())
        .args(&all)
        .output()
        .expect("run netcluster");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `netcluster status --json` of `r`'s primary, read as the library's [`Status`]: the schema
/// the tests rely on is the type's.
pub fn status(r: &Running) -> Status {
    let (status, out, err) = ctl(r, &["status", "--json"]);
    assert!(status.success(), "status failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"))
}

/// `netcluster status --json --control CONTROL`, read as the library's [`Status`], or `None`
/// while no primary answers there yet (for a primary the test started on a control socket of
/// its own choosing, polled with [`eventually`]). An answer that is not a [`Status`] fails the
/// test at once rather than being polled again.
pub fn try_status_at(control: &Path) -> Option<Status> {
    let out = Command::new(netcluster_bin())
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}\n{text}")))
}

/// Waits until `r`'s primary reports `n` workers, all listening; its status then.
pub fn wait_listening(r: &Running, n: usize) -> Status {
    eventually(Duration::from_secs(30), "the workers to listen", || {
        let s = status(r);
        (s.workers.len() == n && s.workers.iter().all(|w| w.state == "listening")).then_some(s)
    })
}

/// The `listening on ADDRESS` line's address.
pub fn listening_addr(r: &mut Running) -> std::net::SocketAddr {
    let line = r.wait_stdout(Duration::from_secs(30), |l| l.starts_with("listening on "));
    line.trim_start_matches("listening on ")
        .parse()
        .expect("address")
}

/// A steady mixed HTTP load: `fresh` clients open a new connection per request (`Connection:
/// close`), `kept` clients keep one connection for many requests (reconnecting only when the
/// server says `Connection: close`). Every request is counted; nothing is retried.
///
/// The same client threads as [`Load`] (counted, waited for and stopped the same way).
pub type HttpLoad = Load;

impl Load {
    /// Starts the clients; each pauses `pause` between requests.
    pub fn start(addr: std::net::SocketAddr, fresh: usize, kept: usize, pause: Duration) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ok = std::sync::Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..fresh + kept {
            let keep_alive = i >= fresh;
            let stop = stop.clone();
            let ok = ok.clone();
            threads.push(thread::spawn(move || {
                let mut report = LoadReport::default();
                let mut conn: Option<std::net::TcpStream> = None;
                while !stop.load(Ordering::Relaxed) {
                    match http_request(addr, &mut conn, keep_alive) {
                        Ok(()) => {
                            report.ok += 1;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            conn = None;
                            report.failed += 1;
                            if report.errors.len() < 20 {
                                let what = if keep_alive {
                                    "keep-alive"
                                } else {
                                    "new connection"
                                };
                                report.errors.push(format!("{what}: {e}"));
                            }
                        }
                    }
                    thread::sleep(pause);
                }
                report
            }));
        }
        Load { stop, ok, threads }
    }
}

/// One `GET /` on `conn` (opened if `None`; kept for the next request when `keep_alive` and
/// the server does not say `Connection: close`). The answer must be a 200 with `hello` in it.
pub fn http_request(
    addr: std::net::SocketAddr,
    conn: &mut Option<std::net::TcpStream>,
    keep_alive: bool,
) -> std::io::Result<()> {
    use std::io::Read;
    let mut stream = match conn.take() {
        Some(s) => s,
        None => {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            s
        }
    };
    let req: &[u8] = if keep_alive {
        b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    };
    stream.write_all(req)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of the answer", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other(format!("answer {head:?}")));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no content-length in {head:?}")))?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in the body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !String::from_utf8_lossy(&buf[head_end..]).starts_with("hello") {
        return Err(std::io::Error::other("the body is not hello"));
    }
    let closing = head.lines().any(|l| l.trim() == "connection: close");
    if keep_alive && !closing {
        *conn = Some(stream);
    }
    Ok(())
}

/// Descriptors process `pid` holds.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Descriptors process `pid` holds once the count is steady (the same over 200 ms): a control
/// client just answered leaves its connection open for a moment.
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The pids of `r`'s workers, by slot.
pub fn worker_pids_of(r: &Running) -> Vec<u32> {
    status(r).workers.iter().map(|w| w.pid).collect()
}

/// A copy of the `netcluster` binary in `dir`, to be replaced by an upgrade test the way an
/// install does (a new file renamed over the path).
pub fn copy_binary(dir: &Path) -> PathBuf {
    let path = dir.join("netcluster");
    std::fs::copy(netcluster_bin(), &path).expect("copy the binary");
    path
}

/// Replaces the file at `path` with `contents` (mode 0755) the way an install does: written
/// beside it, then renamed over it (a running binary cannot be written in place).
pub fn install_over(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let beside = path.with_extension("new");
    std::fs::write(&beside, contents).expect("write the new binary");
    std::fs::set_permissions(&beside, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&beside, path).expect("rename over");
}

/// The pid of `r`'s primary now (it changes with an upgrade).
pub fn primary_pid(r: &Running) -> u32 {
    status(r).pid
}

/// What each descriptor of process `pid` is (`readlink /proc/PID/fd/N`), by number.
pub fn fd_table(pid: u32) -> BTreeMap<u32, String> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(d) => d,
        Err(e) => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            return BTreeMap::from([(u32::MAX, format!("cannot read: {e}; status: {status}"))]);
        }
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let n: u32 = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        Some((n, target.to_string_lossy().into_owned()))
    })
    .collect()
}

/// The path of the Node.js example program (`examples/node-worker/app.js`).
pub fn node_app() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/node-worker/app.js")
        .to_string_lossy()
        .into_owned()
}
