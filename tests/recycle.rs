//! Recycling and hang detection: workers replaced after N connections, above a memory size,
//! after an age, or for missing their watchdog — each through the reload's path (the new
//! worker first), under a steady load that counts every request.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

fn program(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn serve(args: &[&str]) -> (Running, std::net::SocketAddr) {
    let mut cmd = Command::new(netcluster_bin());
    cmd.arg("serve").args(args);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    (r, addr)
}

/// `slot recycled` lines the primary logged so far.
fn recycled(r: &mut Running) -> usize {
    r.drain_stderr()
        .iter()
        .filter(|l| l.contains("slot recycled"))
        .count()
}

#[test]
fn native_workers_recycled_after_their_requests_fail_no_request() {
    let (mut r, addr) = serve(&[
        "--app",
        "http",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--max-requests",
        "100",
        "--max-requests-jitter",
        "20",
    ]);
    wait_listening(&r, 2);
    let load = HttpLoad::start(addr, 4, 2, Duration::from_millis(1));
    let deadline = Instant::now() + T;
    let mut most_at_once = 0;
    while recycled(&mut r) < 50 {
        assert!(Instant::now() < deadline, "fewer than 50 recycles in {T:?}");
        // Never more than one slot replaced at a time (--reload-batch 1): at most one worker
        // beyond the two slots' is starting or serving.
        let s = status(&r);
        let live = s
            .workers
            .iter()
            .filter(|w| w.state != "draining" && w.state != "disconnected")
            .count();
        most_at_once = most_at_once.max(live);
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(report.ok > 1000, "{report:?}");
    assert!(most_at_once <= 3, "{most_at_once} workers at once");
    let s = status(&r);
    assert!(
        s.slots.iter().any(|sl| sl
            .last_recycle
            .as_deref()
            .is_some_and(|w| w.contains("--max-requests"))),
        "{:?}",
        s.slots
    );
}

#[test]
fn a_program_is_recycled_by_age_and_no_request_fails() {
    let (mut r, addr) = serve(&[
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--max-age",
        "2s",
        "--max-age-jitter",
        "500ms",
        "--",
        "node",
        &node_app(),
    ]);
    wait_listening(&r, 2);
    let load = HttpLoad::start(addr, 2, 2, Duration::from_millis(2));
    eventually(T, "4 age recycles", || {
        (recycled(&mut r) >= 4).then_some(())
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}

#[test]
fn a_program_that_leaks_memory_is_recycled_above_its_limit() {
    let (mut r, addr) = serve(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--max-rss",
        "80M",
        "--",
        "node",
        &program("grow.js"),
    ]);
    wait_listening(&r, 1);
    let load = HttpLoad::start(addr, 1, 1, Duration::from_millis(5));
    eventually(T, "a recycle for memory", || {
        (recycled(&mut r) >= 1).then_some(())
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    let s = status(&r);
    let why = s.slots[0].last_recycle.clone().unwrap_or_default();
    assert!(why.contains("--max-rss 80 MiB"), "{why}");
    // Recycled within 2 s of crossing: measured once a second, so the tree was at most a
    // few seconds' growth (4 MB a second) above the limit.
    let mib: u64 = why
        .split("uses ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the size in the reason");
    assert!(mib <= 80 + 12, "{why}");
}

#[test]
fn a_hung_program_is_replaced_within_two_watchdog_intervals() {
    let dir = tempfile::tempdir().expect("dir");
    let mark = dir.path().join("hung");
    let mut cmd = Command::new(netcluster_bin());
    cmd.env("HANG_MARK", &mark).args([
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--watchdog",
        "1",
        "--",
        "python3",
        &program("watchdog.py"),
    ]);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    let first = wait_listening(&r, 2);
    let hung = first
        .workers
        .iter()
        .find(|w| w.slot == Some(1))
        .expect("slot 1")
        .pid;
    let load = HttpLoad::start(addr, 2, 0, Duration::from_millis(5));
    // It stops pinging a second after it started; its watchdog interval is 1 s.
    let started = Instant::now();
    r.wait_stderr(T, |l| l.contains("missed its watchdog"));
    let replaced = eventually(
        Duration::from_secs(10),
        "slot 1 to have a new worker",
        || {
            let s = status(&r);
            s.workers
                .iter()
                .find(|w| w.slot == Some(1) && w.pid != hung && w.state == "listening")
                .map(|_| Instant::now())
        },
    );
    assert!(
        replaced.duration_since(started)
            <= Duration::from_secs(1) + 2 * Duration::from_secs(1) + Duration::from_millis(500),
        "replaced {:?} after it stopped answering",
        replaced.duration_since(started)
    );
    eventually(
        Duration::from_secs(10),
        "the hung process to be gone",
        || (!alive(hung)).then_some(()),
    );
    load.wait_for_more(20, T);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}

#[test]
fn bad_recycle_values_exit_2_with_the_reason() {
    let cases: [(&[&str], &str); 5] = [
        (&["--max-rss", "12Q"], "12Q"),
        (&["--max-requests", "0"], "0 connections"),
        (
            &["--max-requests", "10", "--max-requests-jitter", "20"],
            "larger than --max-requests",
        ),
        (
            &["--max-age", "1s", "--max-age-jitter", "2s"],
            "longer than --max-age",
        ),
        (
            &["--max-requests", "10", "--", "python3", "app.py"],
            "--max-rss",
        ),
    ];
    for (args, says) in cases {
        let out = Command::new(netcluster_bin())
            .arg("serve")
            .args(args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A slot whose program keeps exiting at once is given up after --max-restarts exits in a row:
/// `status` says FAILED and exits 1, and names how to try again.
#[test]
fn a_crash_looping_slot_is_given_up_and_status_says_so() {
    let (r, _addr) = serve(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--max-restarts",
        "2",
        "--restart-max",
        "0.2",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let (status, out, err) = eventually(T, "the slot to fail", || {
        let (status, out, err) = ctl(&r, &["status"]);
        out.contains("FAILED").then_some((status, out, err))
    });
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.contains("netcluster reload"), "{out}");
    assert!(err.contains("slot 1 failed"), "{err}");
    let s: netcluster::cluster::Status = {
        let (_, json, _) = ctl(&r, &["status", "--json"]);
        serde_json::from_str(&json).expect("status JSON")
    };
    assert!(s.slots[0].failed, "{:?}", s.slots);
}
