//! A TCP connection that registers with tokio's reactor only once it has to wait.
//!
//! An accepted connection is often served whole without ever waiting: on a busy server the
//! request is already queued when the connection is accepted, and the answer fits in the
//! socket's send buffer. Registering such a connection with the reactor costs an `epoll_ctl`
//! to add it, another to delete it before `close`, and a turn of the event loop before the
//! first read. So [`Tcp`] reads and writes straight away and registers only when a read or a
//! write would block. A connection served without waiting costs the worker `accept4`,
//! `recvfrom`, `sendto` and `close`; nginx adds an `epoll_ctl` to those.
//!
//! Two details keep the registration away from connections that do not need it:
//! - a read that took less than it asked means the socket's queue is empty, so the next read
//!   does not make the call (as tokio's readiness does);
//! - a read that finds the queue empty lets the task run on once (it wakes itself and returns
//!   `Pending`) before registering: an HTTP server polls the connection for the client's close
//!   while it writes the answer, and with `Connection: close` it then closes it without that
//!   read ever being needed.
//!
//! Connections made by `connect` wait for the handshake, so they are registered from the start
//! ([`Tcp::registered`]).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a read before registration asks for: the part of the caller's buffer it zeroes
/// (safe code cannot read into uninitialised memory), so it stays small; a longer message
/// takes several reads, and a connection busy enough for that soon registers anyway.
const DIRECT_READ: usize = 16 * 1024;

/// A connected TCP socket (see the module).
#[derive(Debug)]
pub(crate) struct Tcp(State);

#[derive(Debug)]
enum State {
    /// Not registered: every call goes to the kernel. `drained`: the last read took less
    /// than it asked or would have blocked, so the next one would block. `yielded`: a read
    /// found it drained and let the task run on once before registering.
    Direct {
        io: std::net::TcpStream,
        drained: bool,
        yielded: bool,
    },
    Registered(tokio::net::TcpStream),
    /// Registering failed, which closed the descriptor.
    Gone,
}

impl Tcp {
    /// A connection in non-blocking mode, not registered yet.
    pub(crate) fn direct(io: std::net::TcpStream) -> Tcp {
        Tcp(State::Direct {
            io,
            drained: false,
            yielded: false,
        })
    }

    /// A connection registered with the reactor already.
    pub(crate) fn registered(io: tokio::net::TcpStream) -> Tcp {
        Tcp(State::Registered(io))
    }

    /// The descriptor, unless registering failed and closed it.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            State::Direct { io, .. } => Some(io.as_fd()),
            State::Registered(s) => Some(s.as_fd()),
            State::Gone => None,
        }
    }

    /// The socket, for socket options, `send` and `shutdown`; `None` as for [`Tcp::fd`].
    pub(crate) fn sock(&self) -> Option<SockRef<'_>> {
        match &self.0 {
            State::Direct { io, .. } => Some(SockRef::from(io)),
            State::Registered(s) => Some(SockRef::from(s)),
            State::Gone => None,
        }
    }

    /// The peer's address (`getpeername`).
    pub(crate) fn peer_addr(&self) -> io::Result<SocketAddr> {
        match &self.0 {
            State::Direct { io, .. } => io.peer_addr(),
            State::Registered(s) => s.peer_addr(),
            State::Gone => Err(gone()),
        }
    }

    /// The local address (`getsockname`).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.0 {
            State::Direct { io, .. } => io.local_addr(),
            State::Registered(s) => s.local_addr(),
            State::Gone => Err(gone()),
        }
    }

    /// Whether the connection has registered with the reactor.
    #[cfg(test)]
    pub(crate) fn is_registered(&self) -> bool {
        matches!(self.0, State::Registered(_))
    }

    /// Registers with the reactor (once), for a caller about to wait.
    fn register(&mut self) -> io::Result<&mut tokio::net::TcpStream> {
        if let State::Direct { .. } = self.0 {
            if let State::Direct { io, .. } = std::mem::replace(&mut self.0, State::Gone) {
                self.0 = State::Registered(tokio::net::TcpStream::from_std(io)?);
            }
        }
        match &mut self.0 {
            State::Registered(s) => Ok(s),
            _ => Err(gone()),
        }
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let State::Direct {
            io,
            drained,
            yielded,
        } = &mut self.0
        {
            if !*drained {
                let asked = buf.remaining().min(DIRECT_READ);
                let mut reader: &std::net::TcpStream = io;
                loop {
                    match reader.read(buf.initialize_unfilled_to(asked)) {
                        Ok(n) => {
                            buf.advance(n);
                            *drained = n < asked;
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            *drained = true;
                            break;
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            // Before paying for the registration, let the task go on once: a caller that
            // polls for more (an HTTP server watching for the client's close while it
            // answers) often finishes the connection without the read.
            if !*yielded {
                *yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let stream = self.register()?;
        Pin::new(stream).poll_read(cx, buf)
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let State::Direct { io, .. } = &self.0 {
            let mut writer: &std::net::TcpStream = io;
            loop {
                match writer.write(data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        let stream = self.register()?;
        Pin::new(stream).poll_write(cx, data)
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            State::Registered(s) => Pin::new(s).poll_flush(cx),
            // Nothing is buffered above the kernel.
            State::Direct { .. } | State::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection could not be registered with the event loop and was closed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    fn pair() -> (Tcp, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (server, _) = l.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        (Tcp::direct(server), client)
    }

    async fn read(tcp: &mut Tcp, len: usize) -> io::Result<Vec<u8>> {
        let mut storage = vec![0u8; len];
        let mut buf = ReadBuf::new(&mut storage);
        poll_fn(|cx| tcp.poll_read(cx, &mut buf)).await?;
        let n = buf.filled().len();
        storage.truncate(n);
        Ok(storage)
    }

    #[tokio::test]
    async fn a_connection_served_without_waiting_never_registers() {
        let (mut tcp, mut client) = pair();
        client.write_all(b"request").expect("send");
        // Let loopback deliver it.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(read(&mut tcp, 64).await.expect("read"), b"request");
        let n = poll_fn(|cx| tcp.poll_write(cx, b"answer"))
            .await
            .expect("write");
        assert_eq!(n, 6);
        assert!(!tcp.is_registered());
        drop(tcp);
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read to end");
        assert_eq!(got, b"answer");
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_and_wakes_when_data_comes() {
        let (mut tcp, mut client) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            client.write_all(b"late").expect("send");
            client
        });
        let got = tokio::time::timeout(Duration::from_secs(5), read(&mut tcp, 64))
            .await
            .expect("woken")
            .expect("read");
        assert_eq!(got, b"late");
        assert!(tcp.is_registered());
        let _client = writer.join().expect("writer");
    }

    #[tokio::test]
    async fn after_a_short_read_the_next_waits_registered() {
        let (mut tcp, mut client) = pair();
        client.write_all(b"one").expect("send");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(read(&mut tcp, 64).await.expect("read"), b"one");
        assert!(
            !tcp.is_registered(),
            "the first read went straight to the kernel"
        );
        // The queue is empty: the next read registers (data arriving meanwhile is not
        // missed: adding a ready socket to epoll reports it at once).
        client.write_all(b"two").expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), read(&mut tcp, 64))
            .await
            .expect("woken")
            .expect("read");
        assert_eq!(got, b"two");
        assert!(tcp.is_registered());
    }

    #[tokio::test]
    async fn a_full_send_buffer_registers_and_resumes_when_the_peer_reads() {
        let (mut tcp, client) = pair();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        // Fill the socket's buffers until a write would block (and registers).
        while !tcp.is_registered() {
            let n = poll_fn(|cx| match tcp.poll_write(cx, &chunk) {
                Poll::Pending => Poll::Ready(Ok(0)),
                other => other,
            })
            .await
            .expect("write");
            sent += n;
        }
        let reader = std::thread::spawn(move || {
            let mut client = client;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            loop {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let more = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| tcp.poll_write(cx, &chunk)),
        )
        .await
        .expect("resumed")
        .expect("write");
        assert!(more > 0);
        drop(tcp);
        assert_eq!(reader.join().expect("reader"), sent + more);
    }
}
