//! Cluster semantics with real processes, driven through `examples/cluster_probe.rs`: Node's
//! cluster tests (test-cluster-*) as cases for our implementation.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::probe::{Line, Msg, ProbeEvent, ProbeRole, SentHandle};
use common::*;
use netcluster::cluster::WorkerState;
use netcluster::net::BoundAddress;
use nix::errno::Errno;

const T: Duration = Duration::from_secs(30);

fn probe(args: &[&str]) -> Running {
    Running::start_interactive(&example_bin("cluster_probe"), args)
}

/// Waits for `n` `worker-listening` lines; returns the addresses by worker.
fn listening(r: &mut Running, n: usize) -> Vec<BoundAddress> {
    (0..n)
        .map(
            |_| match r.wait_probe(T, |l| matches!(l, Line::WorkerListening { .. })) {
                Line::WorkerListening { address, .. } => address,
                other => panic!("not a worker-listening line: {other:?}"),
            },
        )
        .collect()
}

/// The IP address of a TCP listener.
fn tcp(address: &BoundAddress) -> SocketAddr {
    match address {
        BoundAddress::Tcp(a) => *a,
        other => panic!("not a TCP address: {other:?}"),
    }
}

/// `Msg::Text(text)`.
fn text(text: &str) -> Msg {
    Msg::Text(text.to_string())
}

/// The message Node would take for an internal one, which every worker sends first.
fn node_cluster() -> Msg {
    Msg::Cmd {
        cmd: "NODE_CLUSTER".to_string(),
    }
}

/// The `message` event of worker `id` with `msg` and no handle.
fn message(id: u32, msg: Msg) -> Line {
    Line::Event(ProbeEvent::Message {
        id,
        message: Ok(msg),
        handle: None,
    })
}

/// Whether `e` is worker `id`'s `exit` with this code, signal and `exitedAfterDisconnect`.
fn is_exit(
    e: &ProbeEvent,
    id: u32,
    code: Option<i32>,
    signal: Option<i32>,
    after_disconnect: bool,
) -> bool {
    matches!(e, ProbeEvent::Exit { id: i, code: c, signal: s, exited_after_disconnect: a, .. }
        if *i == id && *c == code && *s == signal && *a == after_disconnect)
}

/// A `worker-listen-error` line: the address and OS error number of its `ListenError`.
fn listen_error(r: &mut Running) -> (Option<String>, Option<i32>, String) {
    match r.wait_probe(T, |l| matches!(l, Line::WorkerListenError { .. })) {
        Line::WorkerListenError {
            address,
            errno,
            error,
            ..
        } => (address, errno, error),
        other => panic!("not a worker-listen-error line: {other:?}"),
    }
}

fn echo_once(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(b"x").expect("write");
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).expect("hello + echo");
    assert_eq!(&buf, b"hello\r\nx");
}

#[test]
fn cluster_basic_lifecycle_events_and_states() {
    // test-cluster-basic: fork → online → listening → disconnect → exit, in order.
    let mut r = probe(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    r.wait_event(T, |e| matches!(e, ProbeEvent::Fork { id: 1, .. }));
    r.wait_event(T, |e| matches!(e, ProbeEvent::Online { id: 1, .. }));
    r.wait_event(T, |e| {
        matches!(e, ProbeEvent::Listening { id: 1, address: BoundAddress::Tcp(a), .. }
            if a.ip() == Ipv4Addr::LOCALHOST)
    });
    r.send_line("state 1");
    let listening = Line::State {
        id: 1,
        state: WorkerState::Listening,
        exited_after_disconnect: false,
    };
    r.wait_probe(T, |l| *l == listening);
    r.send_line("disconnect 1");
    let disconnecting = Line::Disconnecting {
        id: 1,
        state: WorkerState::Disconnecting,
    };
    r.wait_probe(T, |l| *l == disconnecting);
    r.wait_event(T, |e| *e == ProbeEvent::Disconnect { id: 1 });
    r.wait_event(T, |e| is_exit(e, 1, Some(0), None, true));
    r.wait_probe(T, |l| *l == Line::AllDead);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn worker_kill_reports_the_signal_and_no_disconnect() {
    // test-cluster-worker-kill
    let mut r = probe(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    r.wait_event(T, |e| matches!(e, ProbeEvent::Listening { id: 1, .. }));
    r.send_line("kill 1 KILL");
    let sigkill = nix::sys::signal::Signal::SIGKILL as i32;
    r.wait_event(T, |e| is_exit(e, 1, None, Some(sigkill), false));
    r.wait_probe(T, |l| *l == Line::AllDead);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn messages_both_ways_and_node_prefixed_user_messages_are_delivered() {
    // test-cluster-message, test-cluster-invalid-message: a user message that looks internal
    // is still a user message.
    let mut r = probe(&["--workers", "2"]);
    let internal_looking = |e: &ProbeEvent| matches!(e, ProbeEvent::Message { message: Ok(m), .. } if *m == node_cluster());
    let mut seen = r
        .probe_seen()
        .iter()
        .filter(|l| matches!(l, Line::Event(e) if internal_looking(e)))
        .count();
    while seen < 2 {
        r.wait_event(T, internal_looking);
        seen += 1;
    }
    r.send_line("send 1 ping");
    r.send_line("send 2 pong");
    r.wait_probe_lines(
        T,
        &[message(1, text("echo ping")), message(2, text("echo pong"))],
    );
    r.send_line("stop");
    r.wait_probe(T, |l| *l == Line::Stopped);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn many_messages_in_both_directions_do_not_deadlock() {
    // test-cluster-send-deadlock: a burst of messages while the other side also sends.
    let mut r = probe(&["--workers", "1"]);
    r.wait_event(T, |e| matches!(e, ProbeEvent::Online { id: 1, .. }));
    for i in 0..300 {
        r.send_line(&format!("send 1 m{i}"));
    }
    let last = message(1, text("echo m299"));
    r.wait_probe(T, |l| *l == last);
    let seen = r.probe_seen();
    // The texts worker 1 answered with, in the order they arrived.
    let echoed: Vec<&String> = seen
        .iter()
        .filter_map(|l| match l {
            Line::Event(ProbeEvent::Message {
                id: 1,
                message: Ok(Msg::Text(t)),
                handle: None,
            }) if t.starts_with("echo m") => Some(t),
            _ => None,
        })
        .collect();
    // A subscriber that falls more than `Limits::events` (256) behind is told how many events
    // it missed instead (`lagged N`): on a loaded machine the probe's printing can lag this
    // burst. Every message is accounted for either way, and what arrived is in order.
    let missed: u64 = seen
        .iter()
        .filter_map(|l| match l {
            Line::Event(ProbeEvent::Lagged { missed }) => Some(*missed),
            _ => None,
        })
        .sum();
    assert_eq!(
        echoed.len() as u64 + missed,
        300,
        "every message answered: {echoed:?}"
    );
    let numbers: Vec<usize> = echoed
        .iter()
        .filter_map(|t| t.strip_prefix("echo m")?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "in order: {numbers:?}"
    );
}

#[test]
fn a_disconnected_worker_lives_until_its_connections_end() {
    // test-cluster-worker-no-exit: disconnect waits for open connections.
    let mut r = probe(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    let addr = tcp(&listening(&mut r, 1)[0]);
    let pid = match r.probe_seen_or_wait(T, |l| {
        matches!(l, Line::Event(ProbeEvent::Online { id: 1, .. }))
    }) {
        Line::Event(ProbeEvent::Online { pid, .. }) => pid,
        other => panic!("not an online event: {other:?}"),
    };
    let mut held = TcpStream::connect(addr).expect("connect");
    held.set_read_timeout(Some(T)).expect("timeout");
    let mut hello = [0u8; 7];
    held.read_exact(&mut hello).expect("hello");
    r.send_line("disconnect 1");
    let disconnecting = Line::Disconnecting {
        id: 1,
        state: WorkerState::Disconnecting,
    };
    r.wait_probe(T, |l| *l == disconnecting);
    // The listener is closed, the connection still works, the process is alive.
    eventually(T, "the worker to stop accepting", || {
        TcpStream::connect(addr).is_err().then_some(())
    });
    held.write_all(b"still").expect("write");
    let mut back = [0u8; 5];
    held.read_exact(&mut back)
        .expect("echo while disconnecting");
    assert!(alive(pid));
    drop(held);
    r.wait_event(T, |e| is_exit(e, 1, Some(0), None, true));
    assert!(!alive(pid));
}

#[test]
fn exclusive_listen_on_port_0_gives_each_worker_its_own_port() {
    // test-net-listen-exclusive-random-ports
    let mut r = probe(&["--workers", "3", "--listen", "127.0.0.1:0", "--exclusive"]);
    let ports: HashSet<BoundAddress> = listening(&mut r, 3).into_iter().collect();
    assert_eq!(ports.len(), 3, "{ports:?}");
}

#[test]
fn exclusive_listen_on_a_taken_port_fails_with_eaddrinuse() {
    // test-cluster-eaddrinuse / bind-twice with exclusive: the second bind fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut r = probe(&["--workers", "1", "--listen", &addr, "--exclusive"]);
    let (address, errno, error) = listen_error(&mut r);
    assert_eq!(address, Some(addr), "{error}");
    assert_eq!(errno, Some(Errno::EADDRINUSE as i32), "{error}");
}

#[test]
fn shared_listen_in_every_worker_shares_one_socket() {
    // test-net-listen-shared-ports
    let mut r = probe(&["--workers", "3", "--listen", "127.0.0.1:0"]);
    let addresses: HashSet<BoundAddress> = listening(&mut r, 3).into_iter().collect();
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    echo_once(tcp(addresses.iter().next().expect("one")));
}

#[test]
fn two_clusters_on_one_port_the_second_fails() {
    let mut first = probe(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    let addr = tcp(&listening(&mut first, 1)[0]).to_string();
    let mut second = probe(&["--workers", "1", "--listen", &addr]);
    let (_, errno, error) = listen_error(&mut second);
    assert_eq!(errno, Some(Errno::EADDRINUSE as i32), "{error}");
}

#[test]
fn listen_fd_in_a_worker_uses_the_primarys_descriptor() {
    // test-listen-fd-cluster
    let mut r = probe(&["--workers", "2", "--primary-listener"]);
    let (fd, addr) = match r.wait_probe(T, |l| matches!(l, Line::PrimaryFd { .. })) {
        Line::PrimaryFd { fd, address } => (fd, address),
        other => panic!("not a primary-fd line: {other:?}"),
    };
    let addresses: HashSet<BoundAddress> = listening(&mut r, 2).into_iter().collect();
    assert_eq!(addresses, HashSet::from([BoundAddress::Tcp(addr)]));
    let is_fd_event =
        |e: &ProbeEvent| matches!(e, ProbeEvent::Listening { fd: f, .. } if *f == Some(fd));
    let mut fd_events = r
        .probe_seen()
        .iter()
        .filter(|l| matches!(l, Line::Event(e) if is_fd_event(e)))
        .count();
    while fd_events < 2 {
        r.wait_event(T, is_fd_event);
        fd_events += 1;
    }
    echo_once(addr);
}

#[test]
fn a_relative_unix_path_resolves_against_the_workers_cwd_even_when_long() {
    // test-cluster-net-listen-relative-path: the absolute path is longer than sun_path.
    let dir = tempfile::tempdir().expect("tmp");
    let mut deep = dir.path().to_path_buf();
    while deep.as_os_str().len() < 120 {
        deep.push("long-directory-name");
    }
    std::fs::create_dir_all(&deep).expect("mkdir");
    let mut cmd = std::process::Command::new(example_bin("cluster_probe"));
    cmd.args(["--workers", "2", "--listen", "rel.sock"])
        .current_dir(&deep);
    let mut r = Running::from_command(cmd);
    let addresses: HashSet<BoundAddress> = listening(&mut r, 2).into_iter().collect();
    let expected = BoundAddress::Unix(deep.join("rel.sock"));
    assert_eq!(addresses, HashSet::from([expected]));
    assert!(deep.join("rel.sock").exists());
    // A client in that directory reaches it by the relative name.
    let mut c = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket;s=socket.socket(socket.AF_UNIX);s.connect('rel.sock');print(s.recv(7))",
        ])
        .current_dir(&deep)
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&c.stdout).trim(), "b'hello\\r\\n'");
    c.stdout.clear();
    r.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = r.wait_exit(T);
}

#[test]
fn pipe_readable_and_writable_all_set_the_socket_file_mode() {
    // test-cluster-listen-pipe-readable-writable
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rw.sock");
    let path_s = path.to_str().expect("utf-8");
    let mut r = probe(&[
        "--workers",
        "1",
        "--listen",
        path_s,
        "--readable-all",
        "--writable-all",
    ]);
    listening(&mut r, 1);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777 & 0o666, 0o666, "mode {mode:o}");
}

#[test]
fn get_connections_sums_every_workers_connections_round_robin() {
    get_connections_sums_every_workers_connections("round-robin");
}

#[test]
fn get_connections_sums_every_workers_connections_shared() {
    get_connections_sums_every_workers_connections("shared");
}

#[test]
fn get_connections_sums_every_workers_connections_reuseport() {
    get_connections_sums_every_workers_connections("reuseport");
}

/// child-process-fork-getconnections, for a cluster: Node has no such total (#48333). 100
/// connections over 4 workers give 100; closing 30 gives 70; killing a worker holding k gives
/// 70 - k.
fn get_connections_sums_every_workers_connections(policy: &str) {
    let mut r = probe(&[
        "--workers",
        "4",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        policy,
    ]);
    let addr = tcp(&listening(&mut r, 4)[0]);
    let online = |l: &Line| match l {
        Line::Event(ProbeEvent::Online { id, pid }) => Some((*pid, *id)),
        _ => None,
    };
    // Worker ids by pid.
    let mut pids: std::collections::BTreeMap<u32, u32> =
        r.probe_seen().iter().filter_map(online).collect();
    while pids.len() < 4 {
        let line = r.wait_probe(T, |l| online(l).is_some());
        pids.extend(online(&line));
    }
    let count = |r: &mut Running| -> usize {
        r.send_line(&format!("count {addr}"));
        match r.wait_probe(T, |l| matches!(l, Line::Count(_))) {
            Line::Count(Ok(n)) => n,
            other => panic!("count {addr}: {other:?}"),
        }
    };
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            let mut hello = [0u8; 7];
            s.read_exact(&mut hello).expect("hello");
            s
        })
        .collect();
    assert_eq!(count(&mut r), 100);

    // A worker asks for the cluster-wide total of its own server.
    r.send_line("send 1 count");
    let total = message(1, text("cluster-count 100"));
    r.wait_probe(T, |l| *l == total);

    conns.truncate(70);
    let mut n = 0;
    for _ in 0..200 {
        n = count(&mut r);
        if n == 70 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(n, 70, "closing 30 connections");

    // Kill the worker holding the most connections: the total falls by what it held.
    let server_side: std::collections::HashSet<u64> = tcp_table()
        .into_iter()
        .filter(|row| row.state == TCP_ESTABLISHED && row.local_port == addr.port())
        .map(|row| row.inode)
        .collect();
    let worker_pids: Vec<u32> = pids.keys().copied().collect();
    let held = holders(&worker_pids, &server_side);
    let (&victim, &k) = held.iter().max_by_key(|(_, n)| **n).expect("a worker");
    assert!(k > 0);
    r.send_line(&format!("kill {} KILL", pids[&victim]));
    let victim_id = pids[&victim];
    r.wait_event(
        T,
        |e| matches!(e, ProbeEvent::Exit { id, .. } if *id == victim_id),
    );
    let mut after = 0;
    for _ in 0..200 {
        after = count(&mut r);
        if after == 70 - k {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(after, 70 - k, "killing a worker holding {k}");
    drop(conns);
}

#[test]
fn round_robin_sends_a_connection_past_a_worker_at_max_connections() {
    // test-cluster-net-server-drop-connection, round-robin side: a worker at its limit answers
    // "not accepted" and another worker serves the connection.
    let mut r = probe(&[
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        "round-robin",
        "--max-connections",
        "1",
    ]);
    let addr = tcp(&listening(&mut r, 2)[0]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            let mut hello = [0u8; 7];
            s.read_exact(&mut hello).expect("each worker takes one");
            s
        })
        .collect();
    // Both workers are at their limit: the next connection is refused by both and closed.
    let mut third = TcpStream::connect(addr).expect("connect");
    third.set_read_timeout(Some(T)).expect("timeout");
    let mut buf = [0u8; 7];
    assert_eq!(third.read(&mut buf).expect("closed, not hung"), 0);
    assert!(
        !r.probe_seen()
            .iter()
            .any(|l| matches!(l, Line::WorkerDrop { .. })),
        "round robin re-routes; it does not drop in the worker"
    );
    drop(held);
}

#[test]
fn drop_max_connection_drops_in_the_worker_with_a_drop_event() {
    // test-cluster-net-server-drop-connection with dropMaxConnection: the worker accepts and
    // drops, emitting 'drop'.
    let mut r = probe(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        "round-robin",
        "--max-connections",
        "0",
        "--drop-max",
    ]);
    let addr = tcp(&listening(&mut r, 1)[0]);
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    let mut buf = [0u8; 7];
    assert_eq!(c.read(&mut buf).expect("dropped"), 0);
    let line = r.wait_probe(T, |l| {
        matches!(
            l,
            Line::WorkerDrop {
                id: 1,
                info: Some(_)
            }
        )
    });
    let Line::WorkerDrop {
        info: Some(info), ..
    } = line
    else {
        panic!("not a drop with its addresses: {line:?}");
    };
    assert_eq!(info.local_port, addr.port(), "{info:?}");
}

#[test]
fn listen_0_close_and_listen_0_again_in_a_worker() {
    // test-cluster-child-index-net
    let mut r = probe(&["--workers", "1", "--churn"]);
    let addresses = match r.wait_probe(T, |l| matches!(l, Line::WorkerChurnOk { id: 1, .. })) {
        Line::WorkerChurnOk { addresses, .. } => addresses,
        other => panic!("not a worker-churn-ok line: {other:?}"),
    };
    assert_eq!(addresses.len(), 4, "{addresses:?}");
    assert!(
        addresses.iter().all(|a| a.port().is_some_and(|p| p != 0)),
        "{addresses:?}"
    );
}

#[test]
fn a_program_started_by_a_worker_is_not_a_worker() {
    let mut r = probe(&["--workers", "1", "--spawn-child"]);
    let says = Line::WorkerChildSays {
        id: 1,
        role: ProbeRole::Primary,
    };
    r.wait_probe(T, |l| *l == says);
}

#[test]
fn binding_a_privileged_port_fails_in_the_worker_with_eacces() {
    // test-cluster-bind-privileged-port: the primary's EACCES reaches the worker's listen.
    let unprivileged_start: u32 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_start <= 42 {
        eprintln!(
            "skipped: ip_unprivileged_port_start is {unprivileged_start}, so port 42 is not privileged here"
        );
        return;
    }
    let mut cmd = std::process::Command::new(example_bin("cluster_probe"));
    cmd.args(["--workers", "1", "--listen", "127.0.0.1:42"]);
    if nix::unistd::Uid::effective().is_root() {
        // Run the cluster as nobody: root may bind anything.
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let mut r = Running::from_command(cmd);
    let (address, errno, error) = listen_error(&mut r);
    assert_eq!(address.as_deref(), Some("127.0.0.1:42"), "{error}");
    assert_eq!(errno, Some(Errno::EACCES as i32), "{error}");
}

#[test]
fn sockets_sent_to_workers_are_counted_by_the_sending_server() {
    // child-process-fork-getconnections: the primary's server sends each connection to a
    // worker; its getConnections counts them while the workers hold them open.
    let mut r = probe(&["--workers", "2"]);
    r.wait_probe_lines(T, &[message(1, node_cluster()), message(2, node_cluster())]);
    r.send_line("relay");
    let addr = match r.wait_probe(T, |l| matches!(l, Line::RelayListening { .. })) {
        Line::RelayListening { address } => tcp(&address),
        other => panic!("not a relay-listening line: {other:?}"),
    };
    let mut conns: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            let mut greeting = [0u8; 21];
            s.read_exact(&mut greeting).expect("greeting");
            assert!(greeting.starts_with(b"hello from worker "), "{greeting:?}");
            s
        })
        .collect();
    let count = |r: &mut Running| -> usize {
        r.send_line("relay-count");
        match r.wait_probe(T, |l| matches!(l, Line::RelayCount(_))) {
            Line::RelayCount(Ok(n)) => n,
            other => panic!("relay-count: {other:?}"),
        }
    };
    assert_eq!(count(&mut r), 10, "sent sockets still open in the workers");
    // The worker echoes on the socket it received.
    conns[0].write_all(b"ping").expect("write");
    let mut back = [0u8; 4];
    conns[0].read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"ping");
    conns.truncate(6);
    let mut n = 0;
    for _ in 0..200 {
        n = count(&mut r);
        if n == 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(n, 6, "closed sockets are no longer counted");
}

#[test]
fn a_server_sent_to_a_worker_is_served_there() {
    let mut r = probe(&["--workers", "1"]);
    r.wait_event(T, |e| matches!(e, ProbeEvent::Online { id: 1, .. }));
    r.send_line("send-server 1");
    let address = match r.wait_probe(T, |l| {
        matches!(l, Line::WorkerServingSentServer { id: 1, .. })
    }) {
        Line::WorkerServingSentServer { address, .. } => address,
        other => panic!("not a worker-serving-sent-server line: {other:?}"),
    };
    let sent = Line::SentServer {
        address: address.clone(),
    };
    r.probe_seen_or_wait(T, |l| *l == sent);
    // The primary closed its copy; the worker's serves.
    echo_once(tcp(&address));
}

fn a_late_listen_reply_is_closed_and_dropped(policy: &str) {
    // test-net-server-close-before-ipc-response
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let mut r = probe(&["--workers", "1", "--abandon", &addr, "--policy", policy]);
    let abandoned = Line::WorkerAbandoned {
        id: 1,
        abandoned: true,
        listening: false,
    };
    r.wait_probe(T, |l| *l == abandoned);
    // The primary bound the port for the abandoned listen; once the late answer is dropped
    // and the worker gives the membership back, the primary closes it.
    eventually(T, "the abandoned socket to be closed", || {
        TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
    // And the key can be listened on again (retried: another test's client may hold the
    // port for a moment as its ephemeral source port).
    eventually(T, "the port to be free again", || {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    });
}

#[test]
fn a_late_listen_reply_is_closed_and_dropped_shared() {
    a_late_listen_reply_is_closed_and_dropped("shared");
}

#[test]
fn a_late_listen_reply_is_closed_and_dropped_round_robin() {
    a_late_listen_reply_is_closed_and_dropped("round-robin");
}

#[test]
fn a_worker_can_disconnect_itself() {
    // cluster.worker.disconnect() in the worker: it exits after a disconnect.
    let mut r = probe(&["--workers", "1", "--listen", "127.0.0.1:0"]);
    listening(&mut r, 1);
    r.send_line("send 1 disconnect");
    r.wait_event(T, |e| is_exit(e, 1, Some(0), None, true));
}

#[test]
fn close_in_one_worker_leaves_the_socket_to_the_others_until_the_last_leaves() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("shared.sock");
    let path_s = path.to_str().expect("utf-8");
    let mut r = probe(&["--workers", "2", "--listen", path_s, "--policy", "shared"]);
    listening(&mut r, 2);
    r.send_line("send 1 close");
    let closed = message(1, text("closed"));
    r.wait_probe(T, |l| *l == closed);
    // Worker 2 still serves on the primary's socket.
    for _ in 0..5 {
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("still served");
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut hello = [0u8; 7];
        s.read_exact(&mut hello).expect("hello from worker 2");
    }
    r.send_line("send 2 close");
    let closed = message(2, text("closed"));
    r.wait_probe(T, |l| *l == closed);
    // The last member left: the primary closed the socket and removed its file.
    eventually(T, "the primary to remove the socket file", || {
        (!path.exists()).then_some(())
    });
}

#[test]
fn a_listen_dropped_during_the_handshake_leaves_the_worker_connected() {
    // Cancel safety of the first use of the cluster API: the handshake goes on in its own
    // task, so the worker keeps its channel and the primary keeps the worker.
    let mut r = probe(&["--workers", "1", "--abandon-handshake"]);
    let abandoned = Line::WorkerHandshakeAbandoned {
        id: 1,
        abandoned: true,
    };
    r.wait_probe(T, |l| *l == abandoned);
    r.wait_probe_lines(T, &[message(1, node_cluster())]);
    r.send_line("send 1 ping");
    let echo = message(1, text("echo ping"));
    r.wait_probe(T, |l| *l == echo);
}

#[test]
fn a_worker_sends_the_primary_a_server_and_a_socket_with_a_message() {
    // process.send(message, handle) from a worker: the primary's event has the handle, and the
    // descriptor works there.
    let mut r = probe(&["--workers", "1"]);
    r.wait_probe_lines(T, &[message(1, node_cluster())]);
    let greeted = |s: &mut TcpStream| {
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut hello = [0u8; 24];
        s.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello, b"hello from the primary\r\n");
        s.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"ping");
    };

    // A listening socket: the worker closes its own server, the primary serves on its copy.
    r.send_line("send 1 server-back");
    let server_back = |e: &ProbeEvent| match e {
        ProbeEvent::Message {
            id: 1,
            message: Ok(m),
            handle: Some(SentHandle::Server { address }),
        } if *m == text("server back") => Some(tcp(address)),
        _ => None,
    };
    let addr = server_back(&r.wait_event(T, |e| server_back(e).is_some())).expect("a server");
    let closed = message(1, text("closed its copy"));
    r.wait_probe(T, |l| *l == closed);
    for _ in 0..3 {
        greeted(&mut TcpStream::connect(addr).expect("connect"));
    }

    // A connected socket: the worker connects, sends it and closes its copy; the primary talks
    // on it.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    r.send_line(&format!(
        "send 1 socket-back {}",
        peer.local_addr().expect("addr")
    ));
    let socket_back = Line::Event(ProbeEvent::Message {
        id: 1,
        message: Ok(text("socket back")),
        handle: Some(SentHandle::Socket),
    });
    r.wait_probe(T, |l| *l == socket_back);
    let (mut s, _) = peer.accept().expect("accept");
    greeted(&mut s);

    // A descriptor that is not what the message says: refused and closed; the primary and the
    // worker go on.
    r.send_line("send 1 bad-handle");
    let after = message(1, text("after bad handle"));
    r.wait_probe(T, |l| *l == after);
    let refused = "the handle sent with a ToPrimary message is refused: a pipe";
    if !r.drain_stderr().iter().any(|l| l.contains(refused)) {
        r.wait_stderr(T, |l| l.contains(refused));
    }
    r.send_line("send 1 ping");
    let echo = message(1, text("echo ping"));
    r.wait_probe(T, |l| *l == echo);
    greeted(&mut TcpStream::connect(addr).expect("connect"));
}

#[test]
fn bad_frames_from_one_worker_hurt_neither_the_primary_nor_other_workers() {
    let mut r = probe(&["--workers", "2", "--listen", "127.0.0.1:0"]);
    let addr = tcp(&listening(&mut r, 2)[0]);
    r.send_line("send 1 garbage");
    let still_here = message(1, text("still here"));
    r.wait_probe(T, |l| *l == still_here);
    // The primary logs what it dropped (stderr may trail stdout a little).
    if !r
        .drain_stderr()
        .iter()
        .any(|l| l.contains("dropped a bad frame"))
    {
        r.wait_stderr(T, |l| l.contains("dropped a bad frame"));
    }
    // Both workers and the primary still work.
    r.send_line("send 2 ping");
    let echo = message(2, text("echo ping"));
    r.wait_probe(T, |l| *l == echo);
    r.send_line("send 1 ping");
    let echo = message(1, text("echo ping"));
    r.wait_probe(T, |l| *l == echo);
    echo_once(addr);
}
