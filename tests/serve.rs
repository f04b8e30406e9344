//! `netcluster serve` end to end: the real binary, real worker processes, real sockets.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);
const CLIENTS: usize = 200;
/// Extra waves of connections (of `WAVE` each) when the first burst went to one worker.
const WAVES: usize = 40;
const WAVE: usize = 5;

/// One echo client: expects `hello\r\n`, sends its own bytes, reads them back, and keeps the
/// connection open (returned) so the test can see which worker holds the other end.
async fn client<S>(mut stream: S, i: usize) -> S
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut hello = [0u8; 7];
    stream.read_exact(&mut hello).await.expect("hello");
    assert_eq!(&hello, b"hello\r\n", "client {i}");
    let mine = format!("client {i} says hi\r\n");
    stream.write_all(mine.as_bytes()).await.expect("write");
    let mut back = vec![0u8; mine.len()];
    stream.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, mine.as_bytes(), "client {i} got someone else's bytes");
    stream
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn start(listen: &str, workers: &str) -> (Running, String) {
    start_with(listen, workers, "shared")
}

fn start_with(listen: &str, workers: &str, policy: &str) -> (Running, String) {
    let mut r = Running::start(
        &netcluster_bin(),
        &[
            "serve",
            "--workers",
            workers,
            "--listen",
            listen,
            "--drain-timeout",
            "5",
            "--policy",
            policy,
        ],
    );
    let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
    let address = line.trim_start_matches("listening on ").to_string();
    (r, address)
}

/// Waits until `n` workers exist and each holds the listener `inode` (it came over SCM_RIGHTS:
/// the workers never bind).
fn workers_holding(r: &Running, n: usize, inode: u64) -> Vec<u32> {
    eventually(T, "every worker to hold the primary's listener", || {
        let workers = children_of(r.pid);
        (workers.len() == n && workers.iter().all(|&p| socket_inodes(p).contains(&inode)))
            .then_some(workers)
    })
}

#[test]
fn echo_over_tcp_is_served_by_several_workers_on_the_primarys_socket() {
    let (mut r, address) = start("127.0.0.1:0", "2");
    let addr: SocketAddr = address.parse().expect("a real address, port 0 resolved");
    assert_ne!(addr.port(), 0);

    let listener = tcp_listeners(addr.port())
        .into_iter()
        .next()
        .expect("a listening socket on the printed port");
    assert!(
        socket_inodes(r.pid).contains(&listener),
        "the primary holds the listener"
    );
    let workers = workers_holding(&r, 2, listener);

    let mut streams = many_clients(addr);
    assert_eq!(streams.len(), CLIENTS);
    assert_eq!(server_side_tcp(addr.port()).len(), CLIENTS);
    // Shared accept is the kernel's to balance: on a loaded machine one worker can take a
    // whole burst. Then more, smaller waves give the other its turn.
    for _ in 0..WAVES {
        let per_worker = holders(&workers, &server_side_tcp(addr.port()));
        if per_worker.values().filter(|&&n| n > 0).count() >= 2 {
            break;
        }
        streams.extend(runtime().block_on(async {
            let mut wave = Vec::new();
            for i in 0..WAVE {
                let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                wave.push(client(s, i).await);
            }
            wave
        }));
        std::thread::sleep(Duration::from_millis(50));
    }

    // The server side of every connection is held by exactly one worker process.
    let server_side = server_side_tcp(addr.port());
    assert_eq!(server_side.len(), streams.len());
    assert_spread(&holders(&workers, &server_side), streams.len());
    assert_eq!(
        holders(&[r.pid], &server_side)[&r.pid],
        0,
        "the primary accepts nothing"
    );

    drop(streams);
    r.signal(Signal::SIGTERM);
    let status = r.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{:#?}", r.stderr_seen);
    for w in workers {
        assert!(!alive(w), "worker {w} outlived the primary");
    }
}

#[test]
fn echo_over_a_unix_socket_then_sigterm_removes_the_file_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("echo.sock");
    let (mut r, address) = start(path.to_str().expect("utf-8"), "2");
    assert_eq!(address, format!("unix:{}", path.display()));
    assert!(path.exists());

    let path_str = path.to_string_lossy().to_string();
    let listener = unix_table()
        .into_iter()
        .find(|row| row.listening && row.path == path_str)
        .expect("a listening Unix socket at the path")
        .inode;
    assert!(socket_inodes(r.pid).contains(&listener));
    let workers = workers_holding(&r, 2, listener);

    let rt = runtime();
    let connect_unix = |first: usize, n: usize| {
        let path = path.clone();
        rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for i in first..first + n {
                let path = path.clone();
                set.spawn(async move {
                    let s = tokio::net::UnixStream::connect(&path)
                        .await
                        .expect("connect");
                    client(s, i).await
                });
            }
            set.join_all().await
        })
    };
    // Accepted Unix sockets carry the listener's path in /proc/net/unix.
    let per_worker = || {
        let server_side: HashSet<u64> = unix_table()
            .into_iter()
            .filter(|row| row.connected && !row.listening && row.path == path_str)
            .map(|row| row.inode)
            .collect();
        holders(&workers, &server_side)
    };
    let mut streams = connect_unix(0, CLIENTS);
    assert_eq!(per_worker().values().sum::<usize>(), CLIENTS);
    // Shared accept is the kernel's to balance: on a loaded machine one worker can take a
    // whole burst. Then more, smaller waves give the other its turn.
    for wave in 0..WAVES {
        if per_worker().values().filter(|&&n| n > 0).count() >= 2 {
            break;
        }
        streams.extend(connect_unix(CLIENTS + wave * WAVE, WAVE));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_spread(&per_worker(), streams.len());

    drop(streams);
    r.signal(Signal::SIGTERM);
    let status = r.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{:#?}", r.stderr_seen);
    assert!(!Path::new(&path).exists(), "the socket file is removed");
    for w in workers {
        assert!(!alive(w), "worker {w} outlived the primary");
    }
}

#[test]
fn sigterm_waits_for_open_connections_to_finish() {
    let (mut r, address) = start("127.0.0.1:0", "1");
    let addr: SocketAddr = address.parse().expect("addr");
    let rt = runtime();
    let mut stream = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client(s, 0).await
    });
    r.wait_stderr(T, |l| l.contains("worker online"));
    r.signal(Signal::SIGTERM);
    r.wait_stderr(T, |l| l.contains("asked to stop by the primary"));
    rt.block_on(async {
        // Still served while draining…
        stream.write_all(b"still there?").await.expect("write");
        let mut back = [0u8; 12];
        stream
            .read_exact(&mut back)
            .await
            .expect("echo while draining");
        assert_eq!(&back, b"still there?");
        // …while new connections are refused once the worker has closed its listener.
        let deadline = tokio::time::Instant::now() + T;
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting while draining"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Ending our side ends the worker's (allowHalfOpen false), and the worker can exit.
        stream.shutdown().await.expect("fin");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("eof");
    });
    let status = r.wait_exit(T);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn workers_stop_when_the_primary_is_killed() {
    let (r, address) = start("127.0.0.1:0", "2");
    let addr: SocketAddr = address.parse().expect("addr");
    let listener = tcp_listeners(addr.port())
        .into_iter()
        .next()
        .expect("listener");
    let workers = workers_holding(&r, 2, listener);
    let rt = runtime();
    let mut stream = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client(s, 0).await
    });
    r.signal(Signal::SIGKILL);
    // The worker with the open connection finishes it; then every worker exits.
    rt.block_on(async {
        stream.write_all(b"bye").await.expect("write");
        let mut back = [0u8; 3];
        stream
            .read_exact(&mut back)
            .await
            .expect("in-flight work finishes");
        stream.shutdown().await.expect("fin");
    });
    drop(stream);
    eventually(T, "every worker to exit after the primary died", || {
        workers.iter().all(|&w| !alive(w)).then_some(())
    });
}

/// Runs `CLIENTS` echo clients against `addr` at once; returns their open connections.
fn many_clients(addr: SocketAddr) -> Vec<tokio::net::TcpStream> {
    runtime().block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..CLIENTS {
            set.spawn(async move {
                let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                client(s, i).await
            });
        }
        set.join_all().await
    })
}

/// The inodes of the server side of every established connection on `port`.
fn server_side_tcp(port: u16) -> HashSet<u64> {
    tcp_table()
        .into_iter()
        .filter(|row| row.state == TCP_ESTABLISHED && row.local_port == port)
        .map(|row| row.inode)
        .collect()
}

/// How many of the server-side sockets on `port` each of `pids` holds.
fn connections_per_process(pids: &[u32], port: u16) -> std::collections::BTreeMap<u32, usize> {
    holders(pids, &server_side_tcp(port))
}

/// Every one of the `total` connections is held by a worker, and more than one worker holds
/// some.
fn assert_spread(per_worker: &std::collections::BTreeMap<u32, usize>, total: usize) {
    eprintln!("connections per worker pid: {per_worker:?}");
    assert_eq!(per_worker.values().sum::<usize>(), total, "{per_worker:?}");
    assert!(
        per_worker.values().filter(|&&n| n > 0).count() >= 2,
        "connections were served by one worker only: {per_worker:?}"
    );
}

#[test]
fn round_robin_hands_connections_to_every_worker_and_keeps_the_listener() {
    let (mut r, address) = start_with("127.0.0.1:0", "2", "round-robin");
    let addr: SocketAddr = address.parse().expect("addr");
    let listener = tcp_listeners(addr.port())
        .into_iter()
        .next()
        .expect("listener");
    let workers = eventually(T, "two workers", || {
        let w = children_of(r.pid);
        (w.len() == 2).then_some(w)
    });
    r.wait_stderr(T, |l| l.contains("worker listening"));
    r.wait_stderr(T, |l| l.contains("worker listening"));
    let streams = many_clients(addr);
    let per_worker = connections_per_process(&workers, addr.port());
    eprintln!("round robin, connections per worker pid: {per_worker:?}");
    assert_eq!(
        per_worker.values().sum::<usize>(),
        CLIENTS,
        "{per_worker:?}"
    );
    // Round robin: the workers take strict turns, so both got a fair share.
    assert!(
        per_worker.values().all(|&n| n >= CLIENTS / 4),
        "unbalanced: {per_worker:?}"
    );
    // Only the primary holds the listening socket.
    assert!(socket_inodes(r.pid).contains(&listener));
    for &w in &workers {
        assert!(
            !socket_inodes(w).contains(&listener),
            "worker {w} holds the listener"
        );
    }
    drop(streams);
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn shared_accept_wakes_one_worker_at_a_time_in_turn() {
    // Light load, one connection at a time: with every worker woken for each connection the
    // same one tends to win them all; with EPOLLEXCLUSIVE and re-registering after each
    // wake-up, the workers take turns.
    const WORKERS: usize = 4;
    const EACH: usize = 10;
    let (mut r, address) = start_with("127.0.0.1:0", "4", "shared");
    let addr: SocketAddr = address.parse().expect("addr");
    wait_listening(&r, WORKERS);
    let workers = worker_pids_of(&r);
    let streams: Vec<_> = runtime().block_on(async {
        let mut streams = Vec::new();
        for i in 0..WORKERS * EACH {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            streams.push(client(s, i).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        streams
    });
    let per_worker = connections_per_process(&workers, addr.port());
    eprintln!("shared, light load, connections per worker pid: {per_worker:?}");
    assert_eq!(per_worker.values().sum::<usize>(), WORKERS * EACH);
    assert_eq!(
        per_worker.len(),
        WORKERS,
        "a worker got none: {per_worker:?}"
    );
    assert!(
        per_worker.values().all(|&n| n >= EACH / 2),
        "unbalanced: {per_worker:?}"
    );
    drop(streams);
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn reuseport_gives_every_worker_its_own_socket_on_one_port() {
    let (mut r, address) = start_with("127.0.0.1:0", "2", "reuseport");
    let addr: SocketAddr = address.parse().expect("addr");
    let workers = eventually(T, "two workers listening", || {
        let w = children_of(r.pid);
        let listeners = tcp_listeners(addr.port());
        (w.len() == 2 && listeners.len() == 2).then_some(w)
    });
    let listeners: HashSet<u64> = tcp_listeners(addr.port()).into_iter().collect();
    let mut held = HashSet::new();
    for &w in &workers {
        let mine: Vec<u64> = socket_inodes(w).intersection(&listeners).copied().collect();
        assert_eq!(mine.len(), 1, "worker {w} listens on its own socket");
        held.insert(mine[0]);
    }
    assert_eq!(held.len(), 2, "each worker its own slot's socket");
    // The primary keeps every slot's socket, so a worker that exits never resets its queue.
    assert_eq!(socket_inodes(r.pid).intersection(&listeners).count(), 2);
    let streams = many_clients(addr);
    let per_worker = connections_per_process(&workers, addr.port());
    assert_eq!(
        per_worker.values().sum::<usize>(),
        CLIENTS,
        "{per_worker:?}"
    );
    drop(streams);
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(T).code(), Some(0));
}

#[test]
fn a_port_the_primary_cannot_bind_is_an_error_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (status, _out, err) = run_to_end(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", &addr.to_string()],
        T,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("listen {addr}: Address already in use")),
        "{err}"
    );
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let long = format!("/tmp/{}.sock", "x".repeat(120));
    let cases: [(&[&str], &str); 7] = [
        (
            &["serve", "--listen", "127.0.0.1:70000"],
            "invalid port \"70000\"",
        ),
        (&["serve", "--listen", "70000"], "0 to 65535"),
        (&["serve", "--listen", &long], "at most 107 fit in sun_path"),
        (&["serve", "--bogus"], "unexpected argument '--bogus'"),
        (&["serve", "--workers", "0"], "--workers"),
        (
            &["serve", "--drain-timeout", "soon"],
            "not a number of seconds",
        ),
        (
            &["serve", "--policy", "fastest"],
            "unknown scheduling policy",
        ),
    ];
    for (args, expected) in cases {
        let (status, _out, err) = run_to_end(&netcluster_bin(), args, T);
        assert_eq!(status.code(), Some(2), "{args:?}: {status:?} {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn no_worker_outlives_a_killed_primary_past_its_drain_deadline() {
    // A client keeps its connection open and idle forever; the worker still exits, at the
    // drain deadline (1 s here), after the primary is killed.
    let mut r = Running::start(
        &netcluster_bin(),
        &[
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1",
            "--policy",
            "shared",
        ],
    );
    let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
    let addr: SocketAddr = line
        .trim_start_matches("listening on ")
        .parse()
        .expect("addr");
    let listener = tcp_listeners(addr.port())
        .into_iter()
        .next()
        .expect("listener");
    let workers = workers_holding(&r, 1, listener);
    let rt = runtime();
    let held = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client(s, 0).await
    });
    r.signal(Signal::SIGKILL);
    eventually(
        T,
        "the worker to give up on the idle connection and exit",
        || (!alive(workers[0])).then_some(()),
    );
    drop(held);
}

#[test]
fn the_policy_environment_variable_sets_the_default() {
    // Like NODE_CLUSTER_SCHED_POLICY: no --policy, NETCLUSTER_SCHED_POLICY=shared.
    let mut cmd = std::process::Command::new(netcluster_bin());
    cmd.args(["serve", "--workers", "1", "--listen", "127.0.0.1:0"])
        .env("NETCLUSTER_SCHED_POLICY", "shared");
    let mut r = Running::from_command(cmd);
    let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
    let addr: SocketAddr = line
        .trim_start_matches("listening on ")
        .parse()
        .expect("addr");
    let listener = tcp_listeners(addr.port())
        .into_iter()
        .next()
        .expect("listener");
    // Shared: the worker holds the primary's listening socket (round robin would not).
    workers_holding(&r, 1, listener);
    r.wait_stderr(T, |l| l.contains("policy=shared"));
}

#[test]
fn the_control_socket_answers_with_typed_replies_in_either_version() {
    use netcluster::cluster::control::{self, ClientError, Reply, Request};
    use std::io::{Read, Write};
    let (r, _address) = start("127.0.0.1:0", "1");
    wait_listening(&r, 1);
    let path = r.control();
    let rt = runtime();
    // The library's client: the reply that answers the request, typed.
    let reply = rt
        .block_on(control::request(&path, Request::Status, T))
        .expect("status");
    let Reply::Status { result } = reply else {
        panic!("a status reply: {reply:?}");
    };
    assert_eq!(result.pid, r.pid);
    assert_eq!(result.workers.len(), 1);
    // A refusal is an error with the primary's reason, not a reply that says ok.
    let err = rt
        .block_on(control::request(&path, Request::Scale { workers: 0 }, T))
        .expect_err("no workers is refused");
    assert!(
        matches!(&err, ClientError::Refused { error } if error.contains("0 workers")),
        "{err}"
    );
    // A version 1 client is answered in version 1, in the shape it reads.
    #[derive(serde::Deserialize)]
    struct Version1 {
        version: u32,
        ok: bool,
        result: netcluster::cluster::Status,
    }
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    stream
        .write_all(b"{\"version\":1,\"command\":\"status\"}\n")
        .expect("write");
    let mut line = String::new();
    stream.read_to_string(&mut line).expect("read");
    let old: Version1 = serde_json::from_str(&line).expect("a version 1 reply");
    assert_eq!((old.version, old.ok, old.result.pid), (1, true, r.pid));
}
