//! Rolling reload under load: a client inside the test keeps a steady mixed HTTP load (new
//! connections and keep-alive requests) while the test performs 20 rolling reloads, for each
//! policy that applies, with the built-in HTTP app (native workers) and with the Node.js
//! example (a program worker). Every request is counted: the number refused, reset, failed or
//! timed out must be 0; every reload gives new pids; the primary's descriptor count is the
//! same before and after.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const RELOADS: usize = 20;

fn reload_under_load(args: &[&str]) {
    let mut all = vec![
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "10",
    ];
    all.extend_from_slice(args);
    let mut r = Running::start(&netcluster_bin(), &all);
    let addr = listening_addr(&mut r);
    wait_listening(&r, 2);
    // Idle to idle: under round robin the primary holds the connections it is handing off.
    let fds_before = settled_fd_count(r.pid);
    let load = HttpLoad::start(addr, 3, 3, Duration::from_millis(2));
    load.wait_for_more(100, T);
    let mut generations = Vec::new();
    for i in 0..RELOADS {
        let before = worker_pids_of(&r);
        let (status, out, err) = ctl(&r, &["reload"]);
        assert!(status.success(), "reload {i}: {out}{err}");
        let after = worker_pids_of(&r);
        assert_eq!(after.len(), 2, "reload {i}: {after:?}");
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "reload {i} gave new pids: {before:?} -> {after:?}"
        );
        generations.push(out.trim().to_string());
        load.wait_for_more(20, T);
    }
    let report = load.stop();
    eprintln!(
        "{args:?}: {RELOADS} reloads, {} requests served, {} failed; last: {}",
        report.ok,
        report.failed,
        generations.last().unwrap()
    );
    assert_eq!(report.failed, 0, "{args:?}: {report:?}");
    assert!(report.ok > 1000, "{report:?}");
    assert!(
        generations
            .last()
            .unwrap()
            .contains(&format!("to generation {}", RELOADS + 1)),
        "{generations:?}"
    );
    let fds_after = eventually(T, "the primary's descriptors to settle", || {
        let n = fd_count(r.pid);
        (n == fds_before).then_some(n)
    });
    assert_eq!(fds_after, fds_before);
}

#[test]
fn native_round_robin_reloads_fail_no_request() {
    reload_under_load(&["--app", "http", "--policy", "round-robin"]);
}

#[test]
fn native_shared_reloads_fail_no_request() {
    reload_under_load(&["--app", "http", "--policy", "shared"]);
}

#[test]
fn native_reuseport_reloads_fail_no_request() {
    reload_under_load(&["--app", "http", "--policy", "reuseport"]);
}

#[test]
fn node_shared_reloads_fail_no_request() {
    reload_under_load(&["--policy", "shared", "--", "node", &node_app()]);
}

#[test]
fn node_reuseport_reloads_fail_no_request() {
    reload_under_load(&["--policy", "reuseport", "--", "node", &node_app()]);
}
