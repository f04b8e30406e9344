//! The floor of a round-robin hand-off, for `benches/compare`: what a primary that accepts
//! every connection and passes it to a worker costs when it does nothing but the system calls
//! the hand-off needs — no tokio, no supervisor, no bookkeeping beyond the copies it keeps.
//!
//! ```text
//! cargo run --release --example handoff_floor -- WORKERS [--no-ack]
//! ```
//!
//! The primary binds a free loopback port, prints `listening on ADDRESS`, and starts WORKERS
//! copies of itself, each with one end of a `SOCK_SEQPACKET` pair as its standard input. Its
//! loop is one `epoll_wait` for the listener and the workers' sockets; on the listener it
//! `accept4`s what is queued and sends it to the workers in strict turn, up to 8 descriptors
//! per `sendmsg` (as netcluster's round robin does); it keeps its copy of each connection
//! until the worker's answer (one `recvmsg`, which may answer several messages) and then
//! `close`s it — the same system calls netcluster's primary makes for a hand-off. With
//! `--no-ack` the worker answers nothing and the primary closes its copies as soon as they
//! are sent: the cheapest hand-off there is, which also loses every connection in flight to
//! a worker that dies.
//!
//! A worker answers every HTTP request on its connections with `200 OK` and `hello\n` (closing
//! after the answer when the request says `Connection: close`), from its own `epoll_wait`
//! loop, and closes a taken connection with `shutdown` first, as netcluster's workers do.
//!
//! It serves HTTP only, is not hardened against anything, and exists to be measured.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command, ExitCode, Stdio};

use netcluster_protocol::channel::seqpacket_pair;
use netcluster_protocol::fd::{accept_nonblocking, recv_with_fds, send_with_fds};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// Descriptors in one message at most (netcluster's `BATCH`).
const BATCH: usize = 8;
/// Connections taken from the backlog per wake-up at most.
const ACCEPT_AT_ONCE: usize = 64;
/// The response to a request that keeps its connection.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\ncontent-type: text/plain\r\n\r\nhello\n";
/// The response to a request that says `Connection: close`.
const RESPONSE_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 6\r\ncontent-type: text/plain\r\n\r\nhello\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ack = !args.iter().any(|a| a == "--no-ack");
    let result = if args.first().map(String::as_str) == Some("--worker") {
        worker(ack)
    } else {
        match args.first().map(|n| n.parse::<usize>()) {
            Some(Ok(n)) if n > 0 => primary(n, ack),
            _ => {
                eprintln!("usage: handoff_floor WORKERS [--no-ack]");
                return ExitCode::from(2);
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One worker as the primary sees it.
struct Peer {
    _child: Child,
    channel: OwnedFd,
    /// Copies of the connections sent and not answered, by message, oldest first.
    unanswered: VecDeque<Vec<OwnedFd>>,
}

fn primary(workers: usize, ack: bool) -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let exe = std::env::current_exe()?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, u64::MAX))?;
    let mut peers = Vec::with_capacity(workers);
    for i in 0..workers {
        let (ours, theirs) = seqpacket_pair()?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--worker").stdin(Stdio::from(theirs));
        if !ack {
            cmd.arg("--no-ack");
        }
        let child = cmd.spawn()?;
        epoll.add(&ours, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        peers.push(Peer {
            _child: child,
            channel: ours,
            unanswered: VecDeque::new(),
        });
    }
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut events = [EpollEvent::empty(); 64];
    let mut next = 0usize;
    let mut buf = [0u8; 256];
    loop {
        let n = epoll.wait(&mut events, EpollTimeout::NONE)?;
        for ev in &events[..n] {
            let token = ev.data();
            if token == u64::MAX {
                let mut taken = Vec::new();
                while taken.len() < ACCEPT_AT_ONCE {
                    match accept_nonblocking(listener.as_fd()) {
                        Ok(fd) => taken.push(fd),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("handoff_floor: accept: {e}");
                            break;
                        }
                    }
                }
                let mut rest = taken.into_iter().peekable();
                while rest.peek().is_some() {
                    let batch: Vec<OwnedFd> = rest.by_ref().take(BATCH).collect();
                    let peer = &mut peers[next % workers];
                    next = next.wrapping_add(1);
                    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(AsFd::as_fd).collect();
                    send_with_fds(peer.channel.as_fd(), &[0], &fds)?;
                    if ack {
                        peer.unanswered.push_back(batch);
                    }
                }
            } else if let Some(peer) = usize::try_from(token).ok().and_then(|i| peers.get_mut(i)) {
                loop {
                    match recv_with_fds(peer.channel.as_fd(), &mut buf, 0) {
                        Ok(r) if r.len == 0 => return Ok(()),
                        Ok(r) => {
                            // The answer says how many messages it answers.
                            for _ in 0..buf.get(..r.len.min(8)).map_or(0, answered) {
                                peer.unanswered.pop_front();
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

/// The count an answer carries (little-endian, up to 8 bytes).
fn answered(bytes: &[u8]) -> usize {
    let mut n = [0u8; 8];
    n[..bytes.len()].copy_from_slice(bytes);
    usize::try_from(u64::from_le_bytes(n)).unwrap_or(usize::MAX)
}

/// A connection a worker serves, with what it has read of the request being read.
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
}

fn worker(ack: bool) -> io::Result<()> {
    let stdin = io::stdin();
    let channel = stdin.as_fd();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(channel, EpollEvent::new(EpollFlags::EPOLLIN, u64::MAX))?;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut events = [EpollEvent::empty(); 64];
    let mut buf = [0u8; 64];
    let mut read_buf = vec![0u8; 16 * 1024];
    loop {
        let n = epoll.wait(&mut events, EpollTimeout::NONE)?;
        for ev in &events[..n] {
            let token = ev.data();
            if token == u64::MAX {
                let mut messages = 0u64;
                let mut arrived = Vec::new();
                loop {
                    match recv_with_fds(channel, &mut buf, BATCH) {
                        Ok(r) if r.len == 0 && r.fds.is_empty() => return Ok(()),
                        Ok(r) => {
                            messages += 1;
                            arrived.extend(r.fds);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                if ack && messages > 0 {
                    send_with_fds(channel, &messages.to_le_bytes(), &[])?;
                }
                for fd in arrived {
                    let mut conn = Conn {
                        stream: TcpStream::from(fd),
                        head: Vec::new(),
                    };
                    if serve(&mut conn, &mut read_buf) {
                        let key = conn.stream.as_raw_fd() as u64;
                        epoll.add(&conn.stream, EpollEvent::new(EpollFlags::EPOLLIN, key))?;
                        conns.insert(key, conn);
                    }
                }
            } else if let Some(conn) = conns.get_mut(&token) {
                if !serve(conn, &mut read_buf) {
                    // Out of the set before the close: the primary's copy may keep the socket
                    // (and so its registration) alive.
                    epoll.delete(&conn.stream)?;
                    conns.remove(&token);
                }
            }
        }
    }
}

/// Reads and answers what `conn` has sent; whether it stays open.
fn serve(conn: &mut Conn, buf: &mut [u8]) -> bool {
    loop {
        match conn.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => conn.head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
        while let Some(end) = conn.head.windows(4).position(|w| w == b"\r\n\r\n") {
            let close = String::from_utf8_lossy(&conn.head[..end])
                .to_ascii_lowercase()
                .contains("connection: close");
            conn.head.drain(..end + 4);
            let response = if close { RESPONSE_CLOSE } else { RESPONSE };
            if conn.stream.write_all(response).is_err() || close {
                let _ = conn.stream.shutdown(Shutdown::Both);
                return false;
            }
        }
        if conn.head.len() > 64 * 1024 {
            return false;
        }
    }
}
