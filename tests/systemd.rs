//! systemd integration, through the real `netcluster` binary and real systemd tools:
//!
//! - socket activation with `systemd-socket-activate` (two named sockets, the connection that
//!   triggered the activation is served, unknown names are errors that say what was passed);
//! - the notification protocol, received by a datagram socket of the test posing as systemd
//!   (`READY=1`, `RELOADING=1` with `MONOTONIC_USEC`, `READY=1`, `STOPPING=1` in order,
//!   `WATCHDOG=1` pings, `MAINPID=` and no `STOPPING=1` across a primary upgrade);
//! - the file-descriptor store (`FDSTORE=1` messages carry the listening sockets, and a primary
//!   started with them after the first was killed serves the connection that queued meanwhile);
//! - `systemd-analyze verify` on the unit files in `systemd/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

/// `systemd-socket-activate` with `n` listening sockets on loopback (named by `fdnames`),
/// starting `netcluster ARGS` on the first connection; and their addresses. The test's log and
/// control-socket settings are passed through (`-E`): the tool gives its child only the
/// variables it is told.
///
/// The tool cannot bind port 0, so the test picks free ports, and tries again should another
/// process take one in between.
fn activate(n: usize, fdnames: &str, args: &[&str]) -> (Running, Vec<SocketAddr>) {
    for _ in 0..10 {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let mut cmd = Command::new("systemd-socket-activate");
        for a in &addrs {
            cmd.arg("-l").arg(a.to_string());
        }
        cmd.arg(format!("--fdname={fdnames}"))
            .args([
                "-E",
                "NETCLUSTER_CONTROL",
                "-E",
                "NETCLUSTER_LOG",
                "-E",
                "PATH",
            ])
            .arg(netcluster_bin())
            .args(args);
        let r = Running::from_command(cmd);
        let listening = eventually_or(Duration::from_secs(10), || {
            if !alive(r.pid) {
                return Some(false);
            }
            let mine = socket_inodes(r.pid);
            let all = addrs.iter().all(|a| {
                tcp_listeners(a.port())
                    .iter()
                    .any(|inode| mine.contains(inode))
            });
            all.then_some(true)
        });
        if listening == Some(true) {
            return (r, addrs);
        }
    }
    panic!("systemd-socket-activate did not listen in 10 tries");
}

/// Connects and reads the echo app's greeting, then checks one echo.
fn echo_on(stream: &mut TcpStream, line: &str) {
    stream.set_read_timeout(Some(T)).unwrap();
    let mut hello = [0u8; 7];
    stream.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\r\n");
    stream.write_all(line.as_bytes()).unwrap();
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, line.as_bytes());
}

#[test]
fn socket_activation_serves_two_named_sockets_and_the_activating_connection() {
    let (mut r, addrs) = activate(
        2,
        "web:admin",
        &[
            "serve",
            "--workers",
            "2",
            "--listen",
            "systemd:admin",
            "--listen",
            "systemd:web",
        ],
    );
    let (web, admin) = (addrs[0], addrs[1]);
    // This connection starts the service (systemd-socket-activate execs netcluster with the
    // sockets on its first connection) and waits in the queue until a worker takes it.
    let mut first = TcpStream::connect(web).unwrap();
    echo_on(&mut first, "the activating connection\n");
    let listeners: Vec<String> = wait_listening(&r, 2)
        .listeners
        .into_iter()
        .map(|l| l.address)
        .collect();
    assert_eq!(
        listeners,
        vec![admin.to_string(), web.to_string()],
        "in the order of the --listen values"
    );
    for addr in [web, admin] {
        for i in 0..5 {
            echo_request(addr, &format!("{addr} {i}\n")).unwrap();
        }
    }
    // The variables are the primary's alone: its workers never see them.
    for w in worker_pids_of(&r) {
        let env = std::fs::read(format!("/proc/{w}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains("LISTEN_FDNAMES=web:admin"),
            "worker {w}: {env}"
        );
    }
    r.signal(Signal::SIGTERM);
    assert!(r.wait_exit(T).success());
}

#[test]
fn a_systemd_name_that_was_not_passed_is_an_error_naming_what_was() {
    let (mut r, addrs) = activate(
        1,
        "web",
        &["serve", "--workers", "1", "--listen", "systemd:admin"],
    );
    let addr = addrs[0];
    let _trigger = TcpStream::connect(addr).unwrap();
    let status = r.wait_exit(T);
    assert!(!status.success());
    let err = r.stderr_seen.join("\n");
    assert!(
        err.contains("--listen systemd:admin: systemd passed no socket named \"admin\"")
            && err.contains("\"web\""),
        "{err}"
    );
}

#[test]
fn listen_systemd_without_socket_activation_says_how_to_get_it() {
    let mut r = Running::start(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", "systemd"],
    );
    let status = r.wait_exit(T);
    assert!(!status.success());
    let err = r.stderr_seen.join("\n");
    assert!(
        err.contains("LISTEN_FDS is not set") && err.contains("systemd-socket-activate"),
        "{err}"
    );
}

/// A datagram socket posing as systemd's `NOTIFY_SOCKET`: every message, with the descriptors
/// it carried, in the order they came.
struct FakeSystemd {
    path: PathBuf,
    messages: mpsc::Receiver<(String, Vec<OwnedFd>)>,
    /// What arrived so far.
    seen: Vec<String>,
    /// The descriptors of `FDSTORE=1` messages so far: name, descriptor.
    stored: Vec<(String, OwnedFd)>,
    _dir: tempfile::TempDir,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                let Ok(got) = netcluster::protocol::fd::recv_with_fds(sock.as_fd(), &mut buf, 16)
                else {
                    return;
                };
                let text = String::from_utf8_lossy(&buf[..got.len.min(buf.len())]).into_owned();
                if tx.send((text, got.fds)).is_err() {
                    return;
                }
            }
        });
        FakeSystemd {
            path,
            messages: rx,
            seen: Vec::new(),
            stored: Vec::new(),
            _dir: dir,
        }
    }

    fn record(&mut self, text: String, mut fds: Vec<OwnedFd>) {
        if text.lines().any(|l| l == "FDSTORE=1") {
            let name = field(&text, "FDNAME").expect("FDSTORE=1 with FDNAME=");
            assert_eq!(fds.len(), 1, "{text}: one descriptor");
            self.stored.push((name.to_string(), fds.remove(0)));
        } else {
            assert!(fds.is_empty(), "{text}: descriptors only with FDSTORE=1");
        }
        self.seen.push(text);
    }

    /// Waits for a message with `field` (a whole line such as `READY=1`), failing after `T`.
    fn wait_for(&mut self, field: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok((text, fds)) => {
                    self.record(text.clone(), fds);
                    if text.lines().any(|l| l == field) {
                        return text;
                    }
                }
                Err(_) => panic!("no {field} within {T:?}; got {:#?}", self.seen),
            }
        }
    }

    /// Takes in everything that arrived so far (without waiting).
    fn drain(&mut self) {
        while let Ok((text, fds)) = self.messages.try_recv() {
            self.record(text, fds);
        }
    }

    /// The states (`READY`, `RELOADING`, `STOPPING`, `MAINPID`) in the order they came.
    fn states(&self) -> Vec<String> {
        self.seen
            .iter()
            .flat_map(|m| m.lines())
            .filter(|l| {
                ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l) || l.starts_with("MAINPID=")
            })
            .map(str::to_string)
            .collect()
    }
}

/// The value of `KEY=` in a notification.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

fn serve_notified(fake: &FakeSystemd, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(netcluster_bin());
    cmd.arg("serve").args(args).env("NOTIFY_SOCKET", &fake.path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Running::from_command(cmd)
}

#[test]
fn notifications_follow_start_reload_and_stop_in_order_with_watchdog_pings() {
    let mut fake = FakeSystemd::new();
    let mut r = serve_notified(
        &fake,
        &["--workers", "2", "--listen", "127.0.0.1:0"],
        &[("WATCHDOG_USEC", "200000")],
    );
    let ready = fake.wait_for("READY=1");
    assert_eq!(
        field(&ready, "STATUS"),
        Some("2 of 2 workers ready, generation 1"),
        "{ready}"
    );
    // Ready means ready: both workers listen already.
    let workers = status(&r).workers;
    assert!(
        workers.len() == 2 && workers.iter().all(|w| w.state == "listening"),
        "{workers:?}"
    );
    // Pings every 100 ms (half of WATCHDOG_USEC) while the loop runs.
    for _ in 0..3 {
        fake.wait_for("WATCHDOG=1");
    }
    // systemd's ReloadSignal in the unit we ship: ignored.
    r.signal(Signal::SIGWINCH);
    let before = monotonic_usec();
    r.signal(Signal::SIGHUP);
    let reloading = fake.wait_for("RELOADING=1");
    let after = monotonic_usec();
    let stamp: u64 = field(&reloading, "MONOTONIC_USEC")
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC {stamp} taken between {before} and {after}"
    );
    let done = fake.wait_for("READY=1");
    assert!(
        field(&done, "STATUS").is_some_and(|s| s.contains("generation 2")),
        "{done}"
    );
    r.signal(Signal::SIGTERM);
    fake.wait_for("STOPPING=1");
    assert!(r.wait_exit(T).success());
    fake.drain();
    assert_eq!(
        fake.states(),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{:#?}",
        fake.seen
    );
    assert!(
        r.stderr_seen.iter().all(|l| !l.contains("SIGWINCH")),
        "SIGWINCH did nothing: {:#?}",
        r.stderr_seen
    );
}

#[test]
fn an_upgrade_moves_mainpid_to_the_new_primary_which_says_ready_and_nobody_says_stopping() {
    let mut fake = FakeSystemd::new();
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--workers", "2", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &fake.path)
        .env("WATCHDOG_USEC", "1000000");
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    fake.wait_for("READY=1");
    let (status, out, err) = ctl(&r, &["upgrade"]);
    assert!(status.success(), "{out}{err}");
    let new = primary_pid(&r);
    assert_ne!(new, r.pid);
    fake.wait_for(&format!("MAINPID={new}"));
    let ready = fake.wait_for("READY=1");
    assert!(
        field(&ready, "STATUS").is_some_and(|s| s.contains("generation 2")),
        "{ready}"
    );
    // The old primary drains and exits without a word to systemd.
    r.wait_exit(T);
    echo_request(addr, "after the upgrade\n").unwrap();
    // The new primary pings the watchdog (it is the main process now).
    fake.wait_for("WATCHDOG=1");
    fake.drain();
    let states = fake.states();
    assert_eq!(
        states,
        [
            "READY=1".to_string(),
            "RELOADING=1".to_string(),
            format!("MAINPID={new}"),
            "READY=1".to_string()
        ],
        "{:#?}",
        fake.seen
    );
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    fake.wait_for("STOPPING=1");
    eventually(T, "the new primary to exit", || (!alive(new)).then_some(()));
    // The new primary is not the test's child: Running's drop kills its group (the old one's).
    let _ = nix::sys::signal::killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
}

/// The local address of `fd`, which must be a listening IPv4 socket.
fn listening_address(name: &str, fd: &OwnedFd) -> SocketAddr {
    assert!(
        getsockopt(fd, sockopt::AcceptConn).unwrap(),
        "{name}: a listening socket"
    );
    std::net::TcpListener::from(fd.try_clone().unwrap())
        .local_addr()
        .unwrap()
}

#[test]
fn the_fd_store_gets_every_listener_and_a_restarted_primary_serves_what_queued_meanwhile() {
    let mut fake = FakeSystemd::new();
    let mut r = serve_notified(
        &fake,
        &[
            "--workers",
            "2",
            "--listen",
            "web=127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--fd-store",
            "yes",
        ],
        &[],
    );
    let web = listening_addr(&mut r);
    let other = listening_addr(&mut r);
    fake.wait_for("READY=1");
    fake.drain();
    let stored: BTreeMap<String, SocketAddr> = fake
        .stored
        .iter()
        .map(|(name, fd)| (name.clone(), listening_address(name, fd)))
        .collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored.get("web"), Some(&web), "{stored:?}");
    let (other_name, _) = stored
        .iter()
        .find(|(_, a)| **a == other)
        .unwrap_or_else(|| panic!("{other} stored: {stored:?}"));
    assert!(other_name.starts_with("listen"), "{other_name}");

    // The primary dies with its workers (SIGKILL to the group): only the store holds the
    // sockets now, and a client's connection waits in the accept queue.
    drop(r);
    let mut queued = TcpStream::connect(web).unwrap();
    queued.write_all(b"queued while nobody ran\n").unwrap();

    // systemd starts the service again with the stored descriptors (LISTEN_FDS from 3, named).
    let names: Vec<String> = fake.stored.iter().map(|(n, _)| n.clone()).collect();
    let fds: Vec<OwnedFd> = std::mem::take(&mut fake.stored)
        .into_iter()
        .map(|(_, fd)| fd)
        .collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={}; exec \"$0\" \"$@\"",
            fds.len(),
            names.join(":")
        ))
        .arg(netcluster_bin())
        .args([
            "serve",
            "--workers",
            "2",
            "--listen",
            "web=127.0.0.1:0",
            "--listen",
            &other.to_string(),
            "--fd-store",
            "yes",
        ])
        .env("NOTIFY_SOCKET", &fake.path);
    let mappings = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    cmd.fd_mappings(mappings).unwrap();
    let mut again = Running::from_command(cmd);
    assert_eq!(listening_addr(&mut again), web, "web, taken back by name");
    assert_eq!(listening_addr(&mut again), other, "taken back by address");
    // The connection that queued is served; nothing was refused.
    queued.set_read_timeout(Some(T)).unwrap();
    let mut hello = [0u8; 7];
    queued.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\r\n");
    let mut back = vec![0u8; 24];
    queued.read_exact(&mut back).unwrap();
    assert_eq!(back, b"queued while nobody ran\n");
    echo_request(other, "the other one\n").unwrap();
    again.wait_stderr(T, |l| {
        l.contains("taking the listener back from systemd's store")
    });
}

#[test]
fn under_reuseport_every_slot_is_stored_under_its_own_name() {
    let mut fake = FakeSystemd::new();
    let mut r = serve_notified(
        &fake,
        &[
            "--workers",
            "3",
            "--policy",
            "reuseport",
            "--listen",
            "api=127.0.0.1:0",
        ],
        &[("FDSTORE", "16")],
    );
    let addr = listening_addr(&mut r);
    fake.wait_for("READY=1");
    fake.drain();
    let stored: BTreeMap<String, SocketAddr> = fake
        .stored
        .iter()
        .map(|(name, fd)| (name.clone(), listening_address(name, fd)))
        .collect();
    let want: BTreeMap<String, SocketAddr> = (1..=3)
        .map(|slot| (format!("api.slot{slot}"), addr))
        .collect();
    assert_eq!(stored, want, "FDSTORE set by systemd turns the store on");
}

fn write_units(dir: &Path) -> Vec<PathBuf> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let bin = netcluster_bin();
    let mut out = Vec::new();
    for name in ["netcluster.socket", "netcluster.service"] {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        // `verify` checks that ExecStart= exists: point it at the binary under test.
        let text = text.replace("/usr/local/bin/netcluster", &bin.to_string_lossy());
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        out.push(path);
    }
    out
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = write_units(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (CI installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // systemd before 253 does not know Type=notify-reload (and ReloadSignal=): it says so and
    // falls back, which the unit's comments explain. Anything else it says is a defect.
    let version = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap();
    let version: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let unexpected: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let known_old = version < 253
                && (l.contains("Failed to parse service type, ignoring: notify-reload")
                    || l.contains("Unknown key 'ReloadSignal'"));
            !known_old && !l.trim().is_empty()
        })
        .collect();
    assert!(unexpected.is_empty(), "systemd {version}: {unexpected:#?}");
}
