//! The seeds' examples, run as real programs and talked to the way the seeds' text does.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

fn expect_hello_and_echo(mut s: impl Read + Write) {
    s.write_all(b"ping\r\n").expect("write");
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).expect("hello + echo");
    assert_eq!(&buf, b"hello\r\nping\r\n");
}

#[test]
fn echo_server_on_a_unix_path_echoes_and_removes_the_file_on_sigint() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("echo.sock");
    let mut r = Running::start(
        &example_bin("echo_server"),
        &[path.to_str().expect("utf-8")],
    );
    r.wait_stdout(T, |l| l.starts_with("server bound on unix:"));
    let s = UnixStream::connect(&path).expect("nc -U");
    s.set_read_timeout(Some(T)).expect("timeout");
    expect_hello_and_echo(&s);
    r.wait_stdout(T, |l| l == "client connected");
    drop(s);
    r.wait_stdout(T, |l| l == "client disconnected");
    r.signal(Signal::SIGINT);
    assert_eq!(r.wait_exit(T).code(), Some(0));
    assert!(!path.exists(), "close() unlinks the socket file");
}

#[test]
fn random_port_prints_nodes_address_object() {
    let mut r = Running::start(&example_bin("random_port"), &[]);
    let line = r.wait_stdout(T, |l| l.starts_with("opened server on "));
    // opened server on { port: 41234, family: 'IPv6', address: '::' }
    let port: u16 = line
        .split("port: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert_ne!(port, 0);
    assert!(line.contains("family: 'IPv"), "{line}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert_eq!(text, "goodbye\n");
}

/// Starts `listen_fd` with `listener` at fd 3, as systemd would.
fn listen_fd_with(listener: TcpListener) -> Running {
    // Running::start cannot map fds; spawn directly and wrap the output the same way.
    let bin = example_bin("listen_fd");
    let mut cmd = Command::new(&bin);
    cmd.env("LISTEN_FDS", "1").stdout(Stdio::piped());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: listener.into(),
        child_fd: 3,
    }])
    .expect("fd mapping");
    Running::from_command(cmd)
}

#[test]
fn listen_fd_serves_on_an_inherited_descriptor() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut r = listen_fd_with(listener);
    let line = r.wait_stdout(T, |l| l.starts_with("server bound on "));
    assert!(line.contains(&addr.to_string()), "{line}");
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    expect_hello_and_echo(&s);
}

#[test]
fn listen_fd_without_a_socket_at_fd_3_says_so() {
    let file = tempfile::tempfile().expect("file");
    let bin = example_bin("listen_fd");
    let mut cmd = Command::new(&bin);
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: file.into(),
        child_fd: 3,
    }])
    .expect("fd mapping");
    let out = cmd.output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen fd 3: not a socket"), "{err}");
}

#[test]
fn listen_fd_under_systemd_socket_activate() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        eprintln!("skipped: systemd-socket-activate is not installed");
        return;
    };
    // A free port: bind, note it, release it (a small race a retry would cover).
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let bin = example_bin("listen_fd");
    let listen = addr.to_string();
    let mut r = Running::start(
        std::path::Path::new(activate),
        &["-l", &listen, bin.to_str().expect("utf-8")],
    );
    let s = eventually(T, "systemd-socket-activate to listen", || {
        TcpStream::connect(addr).ok()
    });
    s.set_read_timeout(Some(T)).expect("timeout");
    expect_hello_and_echo(&s);
    r.wait_stdout(T, |l| l.contains("(fd 3)"));
}

#[test]
fn echo_client_talks_to_echo_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("echo.sock");
    let path_s = path.to_str().expect("utf-8");
    let mut server = Running::start(&example_bin("echo_server"), &[path_s]);
    server.wait_stdout(T, |l| l.starts_with("server bound on unix:"));
    let (status, out, err) = run_to_end(&example_bin("echo_client"), &[path_s], T);
    assert_eq!(status.code(), Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"connected to server!"), "{out}");
    assert!(out.contains("hello"), "{out}");
    assert_eq!(lines.last(), Some(&"disconnected from server"), "{out}");
    server.wait_stdout(T, |l| l == "client disconnected");
}

#[test]
fn echo_client_names_the_address_it_cannot_reach() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("nobody.sock");
    let (status, _out, err) = run_to_end(
        &example_bin("echo_client"),
        &[path.to_str().expect("utf-8")],
        T,
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("nobody.sock"), "{err}");
}

/// The benchmark's hand-off floor serves HTTP through its workers, keep-alive and
/// `Connection: close`, with and without answers.
#[test]
fn handoff_floor_serves_http_through_its_workers() {
    for mode in [&["2"][..], &["2", "--no-ack"][..]] {
        let mut r = Running::start(&example_bin("handoff_floor"), mode);
        let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
        let addr: SocketAddr = line["listening on ".len()..].parse().expect("address");
        // Keep-alive: two requests on one connection, each answered.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(T)).expect("timeout");
        for _ in 0..2 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).expect("read");
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\nhello\n"), "{text}");
        }
        // `Connection: close`: one answer, then the end of the stream.
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read to the end");
            assert!(text.contains("connection: close\r\n"), "{text}");
            assert!(text.ends_with("hello\n"), "{text}");
        }
        r.signal(Signal::SIGKILL);
        r.wait_exit(T);
    }
}
