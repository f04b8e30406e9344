//! The library used the way Node's cluster is (`examples/cluster.rs`): workers' own listens
//! are shared through the primary.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

#[test]
fn listen_on_port_0_in_every_worker_lands_on_one_port() {
    let mut r = Running::start(
        &example_bin("cluster"),
        &["--workers", "3", "--listen", "127.0.0.1:0"],
    );
    let mut addresses = BTreeSet::new();
    for _ in 0..3 {
        let line = r.wait_stdout(T, |l| l.contains(" listening on "));
        let (_, address) = line.split_once(" listening on ").expect("address");
        addresses.insert(address.to_string());
    }
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    let address = addresses.pop_first().expect("one");
    assert!(!address.ends_with(":0"), "{address}");
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0), "{:#?}", r.stderr_seen);
}

#[test]
fn a_bind_error_in_the_primary_reaches_the_workers_listen_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let mut r = Running::start(
        &example_bin("cluster"),
        &["--workers", "1", "--listen", &addr.to_string()],
    );
    let line = r.wait_stdout(T, |l| l.contains("listen error"));
    assert!(
        line.ends_with(&format!(
            "listen error: listen {addr}: Address already in use (os error 98)"
        )),
        "{line}"
    );
    // The worker gives up (exit 3) and the primary, with no worker left, exits non-zero.
    let status = r.wait_exit(T);
    assert_eq!(status.code(), Some(1));
    assert!(
        r.stdout_seen
            .iter()
            .any(|l| l.contains("worker 1 exited (code Some(3)")),
        "{:#?}",
        r.stdout_seen
    );
}

#[test]
fn a_unix_path_is_shared_and_removed_when_the_cluster_stops() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.sock");
    let mut r = Running::start(
        &example_bin("cluster"),
        &["--workers", "2", "--listen", path.to_str().expect("utf-8")],
    );
    for _ in 0..2 {
        let line = r.wait_stdout(T, |l| l.contains(" listening on "));
        assert!(
            line.ends_with(&format!("listening on unix:{}", path.display())),
            "{line}"
        );
    }
    assert!(path.exists());
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0));
    assert!(
        !path.exists(),
        "the primary removes the socket file it created"
    );
}
