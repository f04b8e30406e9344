//! Any program as a worker: `netcluster serve -- COMMAND`. The program here is
//! `tests/programs/worker.py` (Python, `socket.socket(fileno=3)`), a shell script using
//! `systemd-notify`, and the Node.js example.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

fn worker_py() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs/worker.py")
        .to_string_lossy()
        .into_owned()
}

fn serve_python(opts: &[&str], env: &[(&str, &str)]) -> (Running, std::net::SocketAddr) {
    let mut cmd = Command::new(netcluster_bin());
    cmd.arg("serve")
        .args(opts)
        .args(["--", "python3", &worker_py()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    (r, addr)
}

/// The `report {json}` line `tests/programs/worker.py` prints: what the program was given.
#[derive(Debug, serde::Deserialize)]
struct Report {
    pid: u32,
    /// `LISTEN_PID`, as the environment has it (a string).
    listen_pid: Option<String>,
    /// `LISTEN_FDS`.
    listen_fds: u32,
    /// `LISTEN_FDNAMES`.
    names: Option<String>,
    /// Every open descriptor and what it is (`readlink /proc/self/fd/N`).
    fds: std::collections::BTreeMap<u32, String>,
}

fn kill(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

#[test]
fn a_program_worker_sees_exactly_its_listeners() {
    // The primary itself inherits a descriptor (9) that is nobody's business but its own.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "exec 9</dev/null; exec {} serve --workers 2 --listen web=127.0.0.1:0 \
         --listen admin=127.0.0.1:0 --control {} -- python3 {}",
        netcluster_bin().display(),
        dir.path().join("c.sock").display(),
        worker_py()
    ));
    let mut r = Running::from_command(cmd);
    for _ in 0..2 {
        let line = r.wait_stdout(T, |l| l.contains("report {"));
        let json = line.split_once("report ").expect("a report line").1;
        let report: Report = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("the program's report: {e}\n{line}"));
        assert!(
            line.starts_with("[slot "),
            "output is prefixed by the slot: {line}"
        );
        assert_eq!(report.listen_fds, 2, "{report:?}");
        assert_eq!(report.names.as_deref(), Some("web:admin"), "{report:?}");
        assert_eq!(
            report.listen_pid,
            Some(report.pid.to_string()),
            "LISTEN_PID is the program's own pid: {report:?}"
        );
        // A BTreeMap: its keys come sorted.
        let numbers: Vec<u32> = report.fds.keys().copied().collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4], "no other descriptor: {report:?}");
        assert!(report.fds[&3].starts_with("socket:"), "{report:?}");
        assert!(report.fds[&4].starts_with("socket:"), "{report:?}");
    }
    // Both listeners serve, from the program's socket.socket(fileno=3) and (fileno=4).
    let mut addrs = Vec::new();
    while addrs.len() < 2 {
        let line = r.seen_or_wait(T, |l| {
            l.starts_with("listening on ")
                && !addrs.iter().any(|a: &String| l.ends_with(a.as_str()))
        });
        addrs.push(line.trim_start_matches("listening on ").to_string());
    }
    for a in addrs {
        echo_request(a.parse().unwrap(), "over a program's own socket\n").unwrap();
    }
}

#[test]
fn output_is_prefixed_by_slot_unless_asked_not_to() {
    let (mut r, _) = serve_python(&["--workers", "1", "--listen", "127.0.0.1:0"], &[]);
    r.wait_stdout(T, |l| l.starts_with("[slot 1] report {"));
    let (mut r, _) = serve_python(
        &["--workers", "1", "--listen", "127.0.0.1:0", "--no-prefix"],
        &[],
    );
    r.wait_stdout(T, |l| l.starts_with("report {"));
}

#[test]
fn round_robin_is_refused_for_a_program_with_what_to_use_instead() {
    let (status, _, err) = run_to_end(
        &netcluster_bin(),
        &["serve", "--policy", "round-robin", "--", "python3", "x.py"],
        T,
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--policy reuseport"), "{err}");
    assert!(err.contains("--policy shared"), "{err}");
}

#[test]
fn a_shell_script_says_ready_with_systemd_notify() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("w.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n# Ready from a child process of the worker, as a script would say it.\n\
         systemd-notify --ready --status=\"from a script\" || true\nexec sleep 3600\n",
    )
    .unwrap();
    let mut cmd = Command::new(netcluster_bin());
    cmd.args([
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--ready-timeout",
        "20",
    ])
    .args(["--", "sh"])
    .arg(&script);
    let mut r = Running::from_command(cmd);
    listening_addr(&mut r);
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    let s = status(&r);
    assert_eq!(
        s.workers.first().and_then(|w| w.status_text.as_deref()),
        Some("from a script"),
        "{s:#?}"
    );
}

#[test]
fn ready_after_is_for_programs_that_never_notify() {
    let (mut r, addr) = serve_python(
        &[
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--ready-after",
            "0.3",
        ],
        &[("NO_NOTIFY", "1")],
    );
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    assert!(
        r.stderr_seen
            .iter()
            .any(|l| l.contains("its ready-after time passed")),
        "{:#?}",
        r.stderr_seen
    );
    echo_request(addr, "ready after\n").unwrap();
}

#[test]
fn a_reload_whose_new_workers_exit_keeps_the_old_ones_serving() {
    let dir = tempfile::tempdir().unwrap();
    let fail = dir.path().join("fail");
    let (r, addr) = serve_python(
        &["--workers", "2", "--listen", "127.0.0.1:0"],
        &[("FAIL_IF", fail.to_str().unwrap())],
    );
    wait_listening(&r, 2);
    let before = worker_pids_of(&r);
    let load = Load::echo(addr, 4, Duration::from_millis(3));
    load.wait_for_more(50, T);
    std::fs::write(&fail, b"x").unwrap();
    let (status, out, err) = ctl(&r, &["reload"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("the new worker of slot 1 exited (exit code 1) before it was ready"),
        "{err}"
    );
    assert!(err.contains("2 keep their old workers"), "{err}");
    load.wait_for_more(50, T);
    eventually(T, "only the old workers", || {
        (worker_pids_of(&r) == before).then_some(())
    });
    let s = common::status(&r);
    assert!(
        s.last_reload_error
            .as_deref()
            .is_some_and(|e| e.contains("exit code 1")),
        "{s:#?}"
    );
    std::fs::remove_file(&fail).unwrap();
    let (status, out, err) = ctl(&r, &["reload"]);
    assert!(status.success(), "once the program is fixed: {out}{err}");
    load.wait_for_more(50, T);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
}

#[test]
fn a_reload_whose_new_workers_never_get_ready_keeps_the_old_ones_serving() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = dir.path().join("lazy");
    let (r, addr) = serve_python(
        &[
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "1",
        ],
        &[("NOT_READY_IF", lazy.to_str().unwrap())],
    );
    wait_listening(&r, 2);
    let before = worker_pids_of(&r);
    let load = Load::echo(addr, 4, Duration::from_millis(3));
    load.wait_for_more(50, T);
    std::fs::write(&lazy, b"x").unwrap();
    let (status, _, err) = ctl(&r, &["reload"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("was not ready within 1s"), "{err}");
    load.wait_for_more(50, T);
    // The new worker that was not ready is stopped gracefully (it may have accepted
    // connections already): once it has drained, the old workers are all there is.
    eventually(T, "the failed new worker to drain", || {
        (worker_pids_of(&r) == before).then_some(())
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
}

#[test]
fn a_reuseport_worker_killed_with_connections_queued_on_its_slot_resets_none() {
    let (r, addr) = serve_python(&["--workers", "2", "--listen", "127.0.0.1:0"], &[]);
    let victim = wait_listening(&r, 2).workers[0].pid;
    // Stopped, its slot's socket keeps taking connections into its queue.
    kill(victim, Signal::SIGSTOP);
    eventually(T, "the worker to be stopped", || {
        let stat = std::fs::read_to_string(format!("/proc/{victim}/stat")).ok()?;
        let state = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .to_string();
        (state == "T" || state == "t").then_some(())
    });
    let clients: Vec<_> = (0..24)
        .map(|i| std::thread::spawn(move || echo_request(addr, &format!("queued {i}\n"))))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    kill(victim, Signal::SIGKILL);
    // The slot's socket outlives its worker; the replacement takes the queue.
    let failed: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 24 failed: {failed:?}",
        failed.len()
    );
    let s = status(&r);
    assert_eq!(s.slots.first().map(|slot| slot.restarts), Some(1), "{s:#?}");
}

#[test]
fn scaling_reuseport_slots_down_under_load_resets_nothing() {
    let (r, addr) = serve_python(&["--workers", "4", "--listen", "127.0.0.1:0"], &[]);
    wait_listening(&r, 4);
    let load = Load::echo(addr, 6, Duration::from_millis(2));
    load.wait_for_more(100, T);
    for n in ["2", "4", "1", "3", "1"] {
        let (status, out, err) = ctl(&r, &["scale", n]);
        assert!(status.success(), "scale {n}: {out}{err}");
        load.wait_for_more(50, T);
    }
    let report = load.stop();
    eprintln!("reuseport scale 4-2-4-1-3-1: {report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
}

#[test]
fn the_node_worker_serves_and_says_ready() {
    let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node-worker/app.js");
    let mut cmd = Command::new(netcluster_bin());
    cmd.args([
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--",
        "node",
    ])
    .arg(&app);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    let mut conn = None;
    http_request(addr, &mut conn, true).unwrap();
    http_request(addr, &mut conn, true).unwrap();
    let s = status(&r);
    assert!(
        s.workers
            .first()
            .and_then(|w| w.status_text.as_deref())
            .is_some_and(|t| t.starts_with("serving")),
        "{s:#?}"
    );
}
