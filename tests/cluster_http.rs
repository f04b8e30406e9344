//! `examples/cluster_http.rs`, the multi-core HTTP demo, under each scheduling policy.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);
const REQUESTS: usize = 60;

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    response
}

fn serves_and_reports_per_worker_connections(policy: &str) {
    let mut r = Running::start(
        &example_bin("cluster_http"),
        &[
            "--workers",
            "2",
            "--policy",
            policy,
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
    let addr: SocketAddr = line
        .trim_start_matches("listening on ")
        .parse()
        .expect("address");
    // Both workers are up before the load starts (under reuseport each binds its own socket
    // after the primary's grant: wait until one accepts).
    for _ in 0..2 {
        r.wait_stderr(T, |l| l.contains("worker listening"));
    }
    eventually(T, "a worker to accept", || TcpStream::connect(addr).ok());
    for _ in 0..REQUESTS {
        let response = get(addr);
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("hello\n"), "{response}");
    }
    r.signal(Signal::SIGTERM);
    let status = r.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{:#?}", r.stderr_seen);
    let reports: Vec<usize> = r
        .stdout_seen
        .iter()
        .filter(|l| l.starts_with("worker ") && l.contains(" connections "))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{l}"))
        })
        .collect();
    assert_eq!(
        reports.len(),
        2,
        "one line per worker: {:#?}",
        r.stdout_seen
    );
    // Every request, plus the probe connection that waited for a worker.
    assert_eq!(reports.iter().sum::<usize>(), REQUESTS + 1, "{reports:?}");
    eprintln!("{policy}: connections per worker {reports:?}");
}

#[test]
fn cluster_http_round_robin() {
    serves_and_reports_per_worker_connections("round-robin");
}

#[test]
fn cluster_http_shared() {
    serves_and_reports_per_worker_connections("shared");
}

#[test]
fn cluster_http_reuseport() {
    serves_and_reports_per_worker_connections("reuseport");
}
