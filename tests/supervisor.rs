//! The supervisor's operations, through the real `netcluster` binary: respawn with backoff,
//! scaling under load, the control socket, signals and stopping, and the bugs a new user hit.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::probe::{Line, ProbeEvent};
use common::*;
use netcluster::cluster::Status;
use netcluster::cluster::control::{Reply, Response};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

fn serve(args: &[&str]) -> (Running, SocketAddr) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let mut r = Running::start(&netcluster_bin(), &all);
    let addr = listening_addr(&mut r);
    (r, addr)
}

/// Each worker's slot (`None` once it left its slot) and pid, in the status's order.
fn worker_pids(status: &Status) -> Vec<(Option<usize>, u32)> {
    status.workers.iter().map(|w| (w.slot, w.pid)).collect()
}

fn kill_pid(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("kill");
}

#[test]
fn a_worker_killed_under_load_is_replaced_in_its_slot_and_the_new_one_serves() {
    let (r, addr) = serve(&["--workers", "2", "--listen", "127.0.0.1:0"]);
    let before = wait_listening(&r, 2);
    let load = Load::echo(addr, 4, Duration::from_millis(2));
    load.wait_for_more(50, T);
    let (slot, victim) = worker_pids(&before)[0];
    let slot = slot.expect("a listening worker has a slot");
    kill_pid(victim, Signal::SIGKILL);
    let after = eventually(T, "a new worker in the slot", || {
        let s = status(&r);
        let w = s
            .workers
            .iter()
            .find(|w| w.slot == Some(slot) && w.pid != victim && w.state == "listening")?
            .clone();
        Some((s, w))
    });
    let (status, replacement) = after;
    let slot_row = status
        .slots
        .iter()
        .find(|s| s.slot == slot)
        .expect("the slot is in the status");
    assert_eq!(slot_row.restarts, 1, "{status:#?}");
    assert_eq!(
        slot_row.last_exit.as_deref(),
        Some("killed by SIGKILL"),
        "{status:#?}"
    );
    // The replacement serves: its own count grows under the load.
    let id = replacement.id;
    eventually(T, "the replacement to serve", || {
        let s = common::status(&r);
        let w = s.workers.iter().find(|w| w.id == id)?;
        (w.served? > 5).then_some(())
    });
    let report = load.stop();
    eprintln!("load during the kill: {report:?}");
    assert!(report.ok > 100, "{report:?}");
}

#[test]
fn with_the_only_worker_dead_connections_wait_for_its_replacement() {
    for policy in ["round-robin", "shared"] {
        let (r, addr) = serve(&[
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy,
        ]);
        let (_, pid) = worker_pids(&wait_listening(&r, 1))[0];
        kill_pid(pid, Signal::SIGKILL);
        // No worker for a moment: the primary's listener stays open (it is the operator's),
        // so these connections queue and the next worker serves them; the port is the same.
        let clients: Vec<_> = (0..5)
            .map(|i| std::thread::spawn(move || echo_request(addr, &format!("queued {i}\n"))))
            .collect();
        for c in clients {
            c.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{policy}: {e}"));
        }
        let status = status(&r);
        assert_ne!(worker_pids(&status)[0].1, pid, "{policy}: replaced");
        assert_eq!(
            status.listeners[0].address,
            addr.to_string(),
            "{policy}: the port stays"
        );
    }
}

#[test]
fn a_crash_looping_worker_backs_off_with_growing_capped_delays() {
    // Every worker exits with code 1 at once; restarts wait 50, 100, 200, 400, 400… ms.
    let mut r = Running::start(
        &example_bin("cluster_probe"),
        &["--workers", "1", "--crash", "--respawn-max-ms", "400"],
    );
    let started = Instant::now();
    let mut forks: Vec<u64> = Vec::new();
    while forks.len() < 8 {
        match r.wait_probe(T, |l| matches!(l, Line::Event(ProbeEvent::Fork { .. }))) {
            Line::Event(ProbeEvent::Fork { at_ms, .. }) => forks.push(at_ms),
            other => panic!("not a fork event: {other:?}"),
        }
    }
    let intervals: Vec<u64> = forks.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("restart intervals (ms): {intervals:?}");
    let delays = [50, 100, 200, 400, 400, 400, 400];
    for (i, (&got, &want)) in intervals.iter().zip(&delays).enumerate() {
        // A delay is a floor: the restart never comes sooner. And the cap holds: never much
        // later (the slack covers a slow machine, not another doubling).
        assert!(
            got >= want,
            "restart {i} after {got} ms, before its {want} ms delay"
        );
        assert!(
            got < want + 1500,
            "restart {i} after {got} ms: the cap is 400 ms"
        );
    }
    // No spinning: 8 starts took at least the sum of the delays.
    assert!(started.elapsed() >= Duration::from_millis(delays.iter().sum::<u64>()));
}

#[test]
fn status_shows_restarts_and_the_next_attempt_of_a_slot_that_keeps_dying() {
    let (r, _addr) = serve(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--restart-max",
        "5",
    ]);
    let mut pid = worker_pids(&wait_listening(&r, 1))[0].1;
    // Kill each new worker as soon as it listens: 100, 200, 400, 800 ms…
    for killed in 1..=4u64 {
        kill_pid(pid, Signal::SIGKILL);
        if killed == 4 {
            break;
        }
        pid = eventually(T, "the next worker", || {
            let s = status(&r);
            let w = s.workers.first()?;
            (w.pid != pid && w.state == "listening").then_some(w.pid)
        });
    }
    // The fourth restart waits 800 ms: status shows the empty slot and when it retries.
    let s = eventually(T, "the slot to wait for its restart", || {
        let s = status(&r);
        (s.slots.first()?.worker.is_none()).then_some(s)
    });
    assert_eq!(s.slots[0].restarts, 4, "{s:#?}");
    let next = s.slots[0].next_attempt_ms.expect("next attempt");
    assert!(next <= 800, "{s:#?}");
    let (_, table, _) = ctl(&r, &["status"]);
    assert!(
        table.contains("slot 1: no worker; 4 restarts so far, next attempt in"),
        "{table}"
    );
    wait_listening(&r, 1);
}

#[test]
fn scale_2_to_4_to_1_under_load_fails_no_request() {
    let (r, addr) = serve(&["--workers", "2", "--listen", "127.0.0.1:0"]);
    wait_listening(&r, 2);
    let load = Load::echo(addr, 4, Duration::from_millis(3));
    load.wait_for_more(50, T);

    let (status, out, err) = ctl(&r, &["scale", "4"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("scaled from 2 to 4 workers"), "{out}");
    // Synchronous: the four are listening as the command returns.
    let s = common::status(&r);
    assert_eq!(s.workers_wanted, 4);
    assert_eq!(s.workers.len(), 4, "{s:#?}");
    assert!(s.workers.iter().all(|w| w.state == "listening"), "{s:#?}");
    load.wait_for_more(100, T);

    let (status, out, err) = ctl(&r, &["scale", "1"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("scaled from 4 to 1 workers"), "{out}");
    let s = common::status(&r);
    assert_eq!(s.workers.len(), 1, "{s:#?}");
    assert_eq!(s.workers[0].slot, Some(1), "the highest slots were drained");
    load.wait_for_more(50, T);

    // SIGTTIN and SIGTTOU scale by one.
    r.signal(Signal::SIGTTIN);
    wait_listening(&r, 2);
    r.signal(Signal::SIGTTOU);
    eventually(T, "one worker again", || {
        (common::status(&r).workers.len() == 1).then_some(())
    });
    load.wait_for_more(50, T);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok > 250, "{report:?}");

    // Bad input says what is wrong.
    let (status, _, err) = ctl(&r, &["scale", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
}

#[test]
fn the_control_socket_is_the_users_alone() {
    let (r, _addr) = serve(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    wait_listening(&r, 1);
    let path = r.control();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // Let another user reach the directory: the socket's own mode still refuses them.
    std::fs::set_permissions(r.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(netcluster_bin())
            .args(args)
            .arg("--control")
            .arg(&path)
            .output()
            .expect("setpriv (util-linux)")
    };
    let out = as_nobody(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // Even with the socket opened up by mistake, the peer's uid is checked.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["scale", "3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied: not the primary's user"),
        "{err}"
    );
    let mut r = r;
    r.wait_stderr(T, |l| {
        l.contains("refused a client of another user") && l.contains("uid=65534")
    });
    assert_eq!(status(&r).workers_wanted, 1, "nothing changed");
}

#[test]
fn bad_control_clients_are_answered_or_timed_out_and_never_block_others() {
    let (r, _addr) = serve(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    wait_listening(&r, 1);
    let path = r.control();
    // The line a client reads back.
    let read = |s: &mut UnixStream| {
        let mut out = String::new();
        s.read_to_string(&mut out).expect("the primary answers");
        out
    };
    // The reason of an error reply, read as the control protocol's typed Response (which also
    // refuses a reply whose `ok` disagrees with its variant).
    let error_of = |line: &str| match serde_json::from_str::<Response>(line) {
        Ok(Response {
            reply: Reply::Error { error },
            ..
        }) => error,
        Ok(other) => panic!("an error reply, not {other:?}"),
        Err(e) => panic!("not a control reply: {e}: {line}"),
    };
    // A silent client first: it holds a connection while the others are served.
    let mut silent = UnixStream::connect(&path).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    let silent_since = Instant::now();

    let mut garbage = UnixStream::connect(&path).unwrap();
    garbage.write_all(b"{not json\n").unwrap();
    let g = read(&mut garbage);
    // The wire format, checked on raw JSON on purpose (this once): scripts read `ok`, and the
    // typed Response would also accept a reply that leaves it out.
    let wire: serde_json::Value = serde_json::from_str(&g).expect("a JSON reply");
    assert_eq!(wire.get("ok"), Some(&serde_json::Value::Bool(false)), "{g}");
    let why = error_of(&g);
    assert!(why.starts_with("malformed request"), "{why}");

    let mut wrong = UnixStream::connect(&path).unwrap();
    wrong
        .write_all(b"{\"version\":9,\"command\":\"status\"}\n")
        .unwrap();
    let why = error_of(&read(&mut wrong));
    assert!(why.contains("version 9"), "{why}");

    let mut big = UnixStream::connect(&path).unwrap();
    let _ = big.write_all(&vec![b'x'; 70 * 1024]);
    let why = error_of(&read(&mut big));
    assert!(why.contains("larger than 65536 bytes"), "{why}");

    // A well-behaved client is answered at once meanwhile.
    let t = Instant::now();
    let s = status(&r);
    assert_eq!(s.workers.len(), 1, "{s:#?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "status waited for the silent client"
    );

    let why = error_of(&read(&mut silent));
    assert!(why.contains("no request within"), "{why}");
    assert!(silent_since.elapsed() >= Duration::from_secs(4));
    // The primary is unharmed.
    assert_eq!(status(&r).workers_wanted, 1);
}

#[test]
fn stop_waits_for_an_open_connection_but_not_past_the_deadline() {
    let (mut r, addr) = serve(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "1",
    ]);
    wait_listening(&r, 1);
    let mut held = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 7];
    held.read_exact(&mut hello).unwrap();
    let t = Instant::now();
    let (status, out, err) = ctl(&r, &["stop"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("stopped (1 worker exited)"), "{out}");
    let elapsed = t.elapsed();
    // The idle connection held the worker until the 1 s deadline, not the 10 s default.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn a_second_sigint_stops_at_once() {
    let (mut r, addr) = serve(&[
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "60",
    ]);
    wait_listening(&r, 2);
    let mut held = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 7];
    held.read_exact(&mut hello).unwrap();
    r.signal(Signal::SIGINT);
    r.wait_stderr(T, |l| l.contains("stopping"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(r.pid), "the first SIGINT drains (up to 60 s)");
    let t = Instant::now();
    r.signal(Signal::SIGINT);
    r.wait_exit(T);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A Ctrl-C in a terminal: SIGINT to the whole foreground process group. Each worker leads a
/// process group of its own, so only the primary gets it; it drains the workers, nothing in
/// the log calls their exits unexpected, and the primary exits 0.
#[test]
fn ctrl_c_to_the_whole_group_stops_without_warnings() {
    for policy in ["round-robin", "shared", "reuseport"] {
        let (mut r, _addr) = serve(&[
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy,
        ]);
        wait_listening(&r, 2);
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(r.pid as i32), Signal::SIGINT)
            .expect("killpg");
        assert_eq!(r.wait_exit(T).code(), Some(0), "{policy}");
        let log = r.drain_stderr().to_vec();
        assert!(
            !log.iter().any(|l| l.contains("worker stopping on SIGINT")),
            "{policy}: a worker got the terminal's SIGINT: {log:#?}"
        );
        assert!(
            log.iter()
                .any(|l| l.contains("asked to stop by the primary")),
            "{policy}: {log:#?}"
        );
        assert!(
            !log.iter()
                .any(|l| l.contains("WARN") || l.contains("ERROR")),
            "{policy}: {log:#?}"
        );
    }
}

/// `kill -TERM` on one worker: it says so, drains, and its slot gets a new worker; the exit is
/// not one after a `disconnect()` (Node's `exitedAfterDisconnect` stays false).
#[test]
fn a_worker_stopped_by_sigterm_is_replaced_quietly() {
    let (mut r, _addr) = serve(&["--workers", "2", "--listen", "127.0.0.1:0"]);
    let before = worker_pids(&wait_listening(&r, 2));
    let (slot, victim) = before[0];
    kill_pid(victim, Signal::SIGTERM);
    r.wait_stderr(T, |l| {
        l.contains("worker exited after stopping by itself (exit code 0)")
    });
    let after = eventually(T, "a new worker in the slot", || {
        let status = status(&r);
        let pids = worker_pids(&status);
        let listening =
            status.workers.len() == 2 && status.workers.iter().all(|w| w.state == "listening");
        (listening && pids.iter().any(|&(s, p)| s == slot && p != victim)).then_some(pids)
    });
    assert!(!after.iter().any(|&(_, p)| p == victim), "{after:?}");
    let log = r.drain_stderr().to_vec();
    assert!(
        log.iter().any(|l| l.contains("worker stopping on SIGTERM")),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("WARN")), "{log:#?}");
}

/// A worker the primary is already draining (a scale-down, with a connection it must finish)
/// that then gets SIGTERM keeps the primary's record: its exit is the one the primary asked
/// for, not one of its own.
#[test]
fn a_signal_to_a_worker_the_primary_drains_changes_nothing() {
    let (mut r, addr) = serve(&[
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        "shared",
    ]);
    wait_listening(&r, 2);
    // One open connection on each worker, so whichever is scaled down keeps draining.
    let mut held = Vec::new();
    eventually(T, "a connection on each worker", || {
        let mut s = TcpStream::connect(addr).ok()?;
        let mut hello = [0u8; 7];
        s.read_exact(&mut hello).ok()?;
        held.push(s);
        status(&r)
            .workers
            .iter()
            .all(|w| w.connections.unwrap_or(0) > 0)
            .then_some(())
    });
    // `scale` answers once the stopped worker has exited: it runs while the test goes on.
    let scale = Command::new(netcluster_bin())
        .args(["scale", "1", "--control"])
        .arg(r.control())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("netcluster scale");
    let line = r.wait_stderr(T, |l| l.contains("asked to stop by the primary"));
    let drained: u32 = line
        .split("worker=")
        .nth(1)
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // A draining worker is no longer in a slot (nor in `status`): its pid is in its start line.
    let started = format!("worker={drained} pid=");
    let pid: u32 = r
        .drain_stderr()
        .iter()
        .find(|l| l.contains("worker started") && l.contains(&started))
        .and_then(|l| {
            l.split(&started)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no start line for worker {drained}"));
    kill_pid(pid, Signal::SIGTERM);
    drop(held);
    r.wait_stderr(T, |l| {
        l.contains("worker exited") && l.contains(&format!("worker={drained} "))
    });
    let log = r.drain_stderr().to_vec();
    let exit = log
        .iter()
        .find(|l| l.contains("worker exited") && l.contains(&format!("worker={drained} ")))
        .expect("its exit");
    assert!(exit.contains("worker exited (exit code 0)"), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("worker stopping on SIGTERM")),
        "{log:#?}"
    );
    let out = scale.wait_with_output().expect("scale");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn sighup_and_sigusr1_never_kill_the_primary() {
    // SIGUSR2 starts an upgrade, which replaces this primary: tests/upgrade.rs covers it.
    let (mut r, addr) = serve(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    wait_listening(&r, 1);
    for sig in [Signal::SIGHUP, Signal::SIGUSR1] {
        r.signal(sig);
    }
    // The reload that SIGHUP started runs a second worker until the first has drained: wait
    // for it to finish before counting. The lines may come in either order.
    let wanted = ["status:", "SIGHUP: reloaded to generation 2"];
    let deadline = Instant::now() + T;
    while !wanted
        .iter()
        .all(|w| r.stderr_seen.iter().any(|l| l.contains(w)))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        r.wait_stderr(left, |_| true);
    }
    assert!(alive(r.pid));
    echo_request(addr, "still here\n").unwrap();
    assert_eq!(status(&r).workers.len(), 1);
}

#[test]
fn workers_stop_with_the_primary_even_when_their_stderr_reader_is_gone() {
    // Bug: a dead `| tee` made every log write fail; the failed write panicked before the
    // worker asked itself to stop, and the workers served the port forever.
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut child = Command::new(netcluster_bin())
        .args([
            "serve",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1",
            "--control",
        ])
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take()); // the reader dies
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    let pids: Vec<u32> = eventually(T, "two workers", || {
        let pids = worker_pids(&try_status_at(&control)?);
        (pids.len() == 2).then(|| pids.into_iter().map(|(_, p)| p).collect())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + T;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            let info: Vec<String> = pids
                .iter()
                .map(|p| {
                    let st =
                        std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                    let wchan =
                        std::fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default();
                    let stack =
                        std::fs::read_to_string(format!("/proc/{p}/stack")).unwrap_or_default();
                    format!("{p}: wchan={wchan} {st} {stack}")
                })
                .collect();
            panic!("workers still alive: {info:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_http_app_answers_with_keep_alive() {
    let (r, addr) = serve(&["--workers", "2", "--listen", "127.0.0.1:0", "--app", "http"]);
    wait_listening(&r, 2);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // Two requests on one connection, then one that closes it.
    for close in [false, false, true] {
        let req = if close {
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        };
        s.write_all(req.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"hello\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    }
    assert_eq!(
        s.read(&mut [0u8; 1]).unwrap(),
        0,
        "Connection: close is honoured"
    );
}

#[test]
fn a_relative_unix_path_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(netcluster_bin());
    cmd.args(["serve", "--workers", "2", "--listen", "rel.sock"])
        .current_dir(dir.path());
    let mut r = Running::from_command(cmd);
    let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
    let path = dir.path().join("rel.sock");
    assert_eq!(line, format!("listening on unix:{}", path.display()));
    wait_listening(&r, 2);
    for _ in 0..4 {
        let mut s = UnixStream::connect(&path).unwrap();
        let mut hello = [0u8; 7];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"hello\r\n");
    }
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0));
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn a_bind_error_says_its_reason_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (status, _, err) = run_to_end(
        &netcluster_bin(),
        &[
            "serve",
            "--workers",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        T,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(err.contains(&format!("listen 127.0.0.1:{port}")), "{err}");
}

#[test]
fn a_stale_unix_socket_is_replaced_and_a_live_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    // What a crashed primary leaves: a socket file nothing listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let p = path.to_string_lossy().to_string();
    let mut r = Running::start(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", &p],
    );
    r.wait_stdout(T, |l| l.starts_with("listening on unix:"));
    wait_listening(&r, 1);
    let mut s = UnixStream::connect(&path).unwrap();
    let mut hello = [0u8; 7];
    s.read_exact(&mut hello).unwrap();
    // A second primary on the same path must not steal it.
    let (status, _, err) = run_to_end(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", &p],
        T,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("another server is listening on this socket"),
        "{err}"
    );
    // And the first still serves.
    let mut s = UnixStream::connect(&path).unwrap();
    s.read_exact(&mut hello).unwrap();
}
