//! `net.Socket`: a TCP or Unix stream connection, with Node's state, options and events in
//! Rust form.
//!
//! A [`Socket`] is a tokio [`AsyncRead`] + [`AsyncWrite`], so `tokio::io` utilities (`split`,
//! `copy`, `read_to_end`, …) work on it, and it also has Node's own methods. Node's events map
//! like this:
//!
//! | Node | Rust |
//! |---|---|
//! | `'connect'`, `'ready'` | [`Socket::connect`] / [`connect`](super::connect) resolving, or [`Socket::connected`] after [`Socket::start_connect`] |
//! | `'lookup'` (err, address, family, host) | the [`ConnectOptions::on_lookup`] callback, given a [`LookupEvent`](super::LookupEvent) |
//! | `'data'` | a read returning bytes (`AsyncRead`), [`Socket::read_text`] after [`Socket::set_encoding`], or the [`Socket::on_read`] callback |
//! | `'end'` | a read returning end of stream (0 bytes, or `Ok(None)` from `read_text`) |
//! | `'drain'` | [`Socket::drained`] completing |
//! | `'error'` | the `Err` of whichever call met it; an error given to [`Socket::destroy`] is returned by the next call (or [`Socket::take_error`]) |
//! | `'close'` (hadError) | [`Socket::closed`] resolving to `had_error` |
//! | `'timeout'` | [`IdleTimeout::expired`] completing (from [`Socket::idle_timeout`]) |
//!
//! Dropping a `Socket` closes it, like [`Socket::destroy`].

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use nix::libc;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::connect::ConnectOptions;
use super::encoding::{Encoding, TextDecoder};
use super::from_fd::{self, FromFdOptions, SocketType};
use super::idle::{Activity, IdleTimeout};
use super::tcp::Tcp;

/// A stream socket (`net.Socket`): TCP or Unix, connected by [`Socket::connect`], made from a
/// descriptor by [`Socket::from_fd`], or handed to a server's connection handler.
///
/// The seeds' echo client:
///
/// ```no_run
/// use netcluster_worker::net::{self, ConnectOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let mut client = net::create_connection(ConnectOptions::port(8124)).await?;
/// println!("connected to server!");
/// client.write(b"world!\r\n")?;
/// if let Some(data) = client.read_text().await? {
///     println!("{data}");
/// }
/// client.end(None).await?;
/// while client.read_text().await?.is_some() {}
/// println!("disconnected from server");
/// # Ok(()) }
/// ```
///
/// # Writing
///
/// [`Socket::write`] is Node's `socket.write`: it never waits. It hands what it can to the
/// kernel and queues the rest in the socket, returning whether everything went out;
/// [`Socket::buffer_size`] is the queue's length and [`Socket::drained`] waits until it is
/// empty. Queued bytes also move on whenever the socket is polled for reading or writing. The
/// `AsyncWrite` side sends queued bytes first, so bytes are never reordered between the two.
///
/// # Ending
///
/// [`Socket::end`] (or `AsyncWriteExt::shutdown`) sends FIN after the queue, half-closing the
/// socket: reading goes on. When the peer's FIN arrives (a read returns end of stream), a socket
/// without [`allow_half_open`](Socket::set_allow_half_open) ends its own side too, after its
/// queue; later writes fail with `BrokenPipe`. Once both sides have ended, the socket closes
/// itself ([`Socket::destroyed`] becomes true) and later reads keep returning end of stream.
pub struct Socket {
    io: Io,
    /// The kind of the current (or last) connection.
    kind: Option<SocketType>,
    allow_half_open: bool,
    /// Node's `readable`: the read side is open.
    readable: bool,
    /// Node's `writable`: the write side is open (no end asked for).
    writable: bool,
    /// `readable` option of a socket made from a descriptor.
    readable_option: bool,
    /// `writable` option of a socket made from a descriptor.
    writable_option: bool,
    /// The end of the stream was read (or reading is disabled): reads return 0 bytes.
    read_eof: bool,
    /// An end was asked for and FIN waits for the queue.
    end_pending: bool,
    /// FIN was sent.
    fin_sent: bool,
    /// The write side was ended because the peer ended and `allow_half_open` is false.
    ended_by_peer: bool,
    paused: bool,
    read_waker: Option<Waker>,
    queue: WriteQueue,
    bytes_read: u64,
    bytes_written: u64,
    destroyed: bool,
    had_error: bool,
    /// Closed because both sides ended, not by `destroy` or an error.
    closed_cleanly: bool,
    /// An error to report from the next call (an error given to `destroy`, or one met where
    /// it could not be returned).
    error: Option<io::Error>,
    /// `reset_and_destroy` was called while connecting.
    reset_on_connect: bool,
    /// The connect under way is to a Unix path.
    connecting_unix: bool,
    /// Another descriptor of the connection may outlive ours (made from a caller's
    /// descriptor, or handed over by the primary, which closes its copy once it hears we took
    /// the connection): close it down with `shutdown`, or it stays open after ours is closed.
    shared_fd: bool,
    activity: std::sync::Arc<Activity>,
    encoding: Option<Encoding>,
    decoder: TextDecoder,
    /// `set_no_delay` / `set_keep_alive` made before the connection exists.
    pending_options: Mutex<PendingOptions>,
    /// The server that accepted this connection, if one did.
    origin: Option<crate::net::server::Origin>,
    /// Runs once when the socket closes (a received socket's count goes down).
    close_hook: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// Node's `signal`: completes when the connect options' token is cancelled.
    abort: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

enum Io {
    /// `new net.Socket()`: no connection yet.
    Unconnected,
    /// `socket.connect()` under way; the mutex only makes the socket `Sync` (it is reached
    /// with `get_mut`, never locked).
    Connecting(Mutex<ConnectFuture>),
    Open(Stream),
    /// Destroyed, failed, or closed after both sides ended.
    Closed,
}

/// The connection under a socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(Tcp),
    Unix(UnixStream),
}

impl Stream {
    /// The socket, for `setsockopt`, `send` and `shutdown`; `None` once a TCP connection
    /// that failed to register with the event loop has lost its descriptor.
    fn sock(&self) -> Option<SockRef<'_>> {
        match self {
            Stream::Tcp(s) => s.sock(),
            Stream::Unix(s) => Some(SockRef::from(s)),
        }
    }

    fn kind(&self) -> SocketType {
        match self {
            Stream::Tcp(s) => match s.local_addr() {
                Ok(a) if a.is_ipv6() => SocketType::Tcp6,
                _ => SocketType::Tcp4,
            },
            Stream::Unix(_) => SocketType::Unix,
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => s.poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// One non-blocking `send`, bypassing tokio's readiness (which may not know yet that the
    /// socket is writable). A `WouldBlock` here is harmless to tokio: its next poll meets the
    /// same `EAGAIN`, clears readiness and waits for the kernel.
    fn send_now(&self, data: &[u8]) -> io::Result<usize> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let flags = libc::MSG_NOSIGNAL;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let flags = 0;
        self.sock()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?
            .send_with_flags(data, flags)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        let Some(sock) = self.sock() else {
            return Ok(());
        };
        match sock.shutdown(Shutdown::Write) {
            // The peer is gone already: nothing left to end.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            r => r,
        }
    }
}

#[derive(Debug, Default)]
struct PendingOptions {
    no_delay: Option<bool>,
    keep_alive: Option<(bool, Duration)>,
}

/// Bytes accepted by [`Socket::write`] that the kernel has not taken yet.
#[derive(Debug, Default)]
struct WriteQueue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already sent.
    offset: usize,
    len: usize,
}

impl WriteQueue {
    fn push(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.chunks.push_back(data.to_vec());
            self.len += data.len();
        }
    }

    fn front(&self) -> Option<&[u8]> {
        self.chunks.front().map(|c| &c[self.offset..])
    }

    fn advance(&mut self, n: usize) {
        self.offset += n;
        self.len -= n;
        if self.chunks.front().is_some_and(|c| self.offset >= c.len()) {
            self.chunks.pop_front();
            self.offset = 0;
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.offset = 0;
        self.len = 0;
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Node's `socket.readyState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadyState {
    /// Connecting (`'opening'`).
    Opening,
    /// Readable and writable (`'open'`).
    Open,
    /// Readable, the write side ended (`'readOnly'`).
    ReadOnly,
    /// Writable, the read side ended (`'writeOnly'`).
    WriteOnly,
    /// Neither: not connected yet, destroyed, or closed (`'closed'`).
    Closed,
}

impl ReadyState {
    /// Node's string: `"opening"`, `"open"`, `"readOnly"`, `"writeOnly"` or `"closed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyState::Opening => "opening",
            ReadyState::Open => "open",
            ReadyState::ReadOnly => "readOnly",
            ReadyState::WriteOnly => "writeOnly",
            ReadyState::Closed => "closed",
        }
    }
}

impl fmt::Display for ReadyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `socket.address()` returns: `{ port: 12346, family: 'IPv4', address: '127.0.0.1' }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressInfo {
    /// The IP address.
    pub address: IpAddr,
    /// `"IPv4"` or `"IPv6"`.
    pub family: &'static str,
    /// The port.
    pub port: u16,
}

impl From<SocketAddr> for AddressInfo {
    fn from(a: SocketAddr) -> Self {
        AddressInfo {
            address: a.ip(),
            family: family_name(a),
            port: a.port(),
        }
    }
}

/// Why [`Socket::on_read`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReadEnd {
    /// The peer ended the stream (`'end'`).
    Eof,
    /// The callback returned `false` (or the socket was paused): the socket is paused; call
    /// [`Socket::resume`] and `on_read` again to go on.
    Paused,
}

impl Default for Socket {
    fn default() -> Self {
        Socket::new()
    }
}

impl Socket {
    /// `new net.Socket()`: a socket with no connection yet ([`Socket::pending`], ready state
    /// `Closed`); connect it with [`Socket::start_connect`].
    pub fn new() -> Socket {
        Socket {
            io: Io::Unconnected,
            kind: None,
            allow_half_open: false,
            readable: false,
            writable: false,
            readable_option: true,
            writable_option: true,
            read_eof: false,
            end_pending: false,
            fin_sent: false,
            ended_by_peer: false,
            paused: false,
            read_waker: None,
            queue: WriteQueue::default(),
            bytes_read: 0,
            bytes_written: 0,
            destroyed: false,
            had_error: false,
            closed_cleanly: false,
            error: None,
            reset_on_connect: false,
            connecting_unix: false,
            shared_fd: false,
            activity: Activity::new(),
            encoding: None,
            decoder: TextDecoder::default(),
            pending_options: Mutex::new(PendingOptions::default()),
            origin: None,
            close_hook: None,
            abort: None,
        }
    }

    /// An accepted TCP connection (must be called within a tokio runtime, as the stream was
    /// made in one).
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        Socket::open(Stream::Tcp(Tcp::registered(stream)))
    }

    /// A TCP connection accepted on a listener of family `kind`, which an accepted socket
    /// shares: no `getsockname` to tell it. `stream` is in non-blocking mode; it registers
    /// with the event loop only once it has to wait (see [`Tcp`]).
    pub(crate) fn accepted_tcp(stream: std::net::TcpStream, kind: SocketType) -> Self {
        let mut socket = Socket::new();
        socket.writable = true;
        socket.install_as(Stream::Tcp(Tcp::direct(stream)), kind);
        socket
    }

    /// An accepted Unix connection.
    pub(crate) fn unix(stream: UnixStream) -> Self {
        Socket::open(Stream::Unix(stream))
    }

    /// A connected stream socket received from another process (TCP or Unix, told by the
    /// socket's own family); must be called within a tokio runtime.
    ///
    /// # Errors
    /// When the descriptor is not a stream socket, or cannot be registered with tokio.
    pub(crate) fn from_received(fd: std::os::fd::OwnedFd) -> io::Result<Socket> {
        let sock = socket2::SockRef::from(&fd);
        if sock.r#type()? != socket2::Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the received descriptor is not a stream socket",
            ));
        }
        if sock.domain()? == socket2::Domain::UNIX {
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true)?;
            Ok(Socket::unix(UnixStream::from_std(std)?))
        } else {
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true)?;
            Ok(Socket::open(Stream::Tcp(Tcp::direct(std))))
        }
    }

    /// The server that accepted this connection, if a server of this process did: its
    /// [`Origin::id`](crate::net::Origin::id) is the [`Server::id`](crate::net::Server::id).
    pub fn origin(&self) -> Option<crate::net::Origin> {
        self.origin.clone()
    }

    pub(crate) fn set_origin(&mut self, origin: Option<crate::net::server::Origin>) {
        self.origin = origin;
    }

    /// Another process holds a copy of this connection's descriptor for a while (a primary
    /// that handed it over): closing sends FIN with `shutdown` first, so the connection ends
    /// when this socket closes, not when the last copy does. The primary's later `close` then
    /// only frees what is left: the teardown's cost lands in this worker, not in the primary
    /// that every connection goes through.
    pub(crate) fn close_with_shutdown(&mut self) {
        self.shared_fd = true;
    }

    /// Runs `hook` once when the socket closes (destroyed, failed, or dropped).
    pub(crate) fn on_close(&mut self, hook: impl FnOnce() + Send + Sync + 'static) {
        self.close_hook = Some(Box::new(hook));
    }

    fn open(stream: Stream) -> Socket {
        let mut socket = Socket::new();
        socket.writable = true;
        socket.install(stream);
        socket
    }

    /// `net.connect(options)` as a future: connects a new socket and resolves once it is
    /// connected (Node's `'connect'` and `'ready'`).
    ///
    /// # Errors
    /// `InvalidInput` for invalid options (no port nor path, a `family` other than 0/4/6,
    /// unknown `hints`, a Unix path too long), naming the option; the lookup's error naming
    /// the host; otherwise a [`ConnectError`](super::ConnectError) (`ConnectionRefused`,
    /// `AddrInUse` for a busy `local_port`, …) naming the address.
    pub async fn connect(options: impl Into<ConnectOptions>) -> io::Result<Socket> {
        let mut socket = Socket::new();
        socket.start_connect(options)?;
        socket.connected().await?;
        Ok(socket)
    }

    /// `socket.connect(options)`: starts connecting and returns at once, as Node does; the
    /// socket is then [`connecting`](Socket::connecting) with ready state `Opening`.
    ///
    /// The connect makes progress when the socket is polled: await [`Socket::connected`] (the
    /// `'connect'` event), or just read or write — writes made meanwhile are queued and sent
    /// once connected. `options.timeout` is set at once, so an [`IdleTimeout`] also covers a
    /// connect that takes too long. `options.allow_half_open = true` turns half-open mode on.
    /// A socket that was destroyed or closed may connect again (Node's reconnect after
    /// `'close'`); its counters start over.
    ///
    /// # Errors
    /// Invalid options, checked here (see [`Socket::connect`]); `AlreadyExists` if the socket
    /// is connected, `Other` if it is already connecting (Node's `ERR_SOCKET_CONNECTING`).
    /// Network errors come from [`Socket::connected`].
    pub fn start_connect(&mut self, options: impl Into<ConnectOptions>) -> io::Result<()> {
        let options = options.into();
        match &self.io {
            Io::Connecting(_) => return Err(io::Error::other("socket is already connecting")),
            Io::Open(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "socket is already connected ({}); destroy it before connecting again",
                        self.describe_peer()
                    ),
                ));
            }
            Io::Unconnected | Io::Closed => {}
        }
        let plan = options.plan()?;
        if options.signal.as_ref().is_some_and(|t| t.is_cancelled()) {
            return Err(aborted());
        }
        self.reset_for_connect();
        self.abort = options
            .signal
            .clone()
            .map(|token| Box::pin(token.cancelled_owned()));
        if options.allow_half_open {
            self.allow_half_open = true;
        }
        if let Some(timeout) = options.timeout {
            self.activity
                .set_timeout((!timeout.is_zero()).then_some(timeout));
        }
        {
            let mut pending = lock(&self.pending_options);
            if options.no_delay {
                pending.no_delay = Some(true);
            }
            if options.keep_alive {
                pending.keep_alive = Some((true, options.keep_alive_initial_delay));
            }
        }
        self.connecting_unix = plan.is_unix();
        self.io = Io::Connecting(Mutex::new(Box::pin(plan.establish())));
        self.writable = true;
        self.activity.touch();
        Ok(())
    }

    /// Completes when the connect started by [`Socket::start_connect`] has succeeded (Node's
    /// `'connect'`, then `'ready'`); at once if the socket is connected.
    ///
    /// # Errors
    /// The connect's error (the socket is then destroyed, with `had_error`);
    /// `ConnectionAborted` if [`Socket::reset_and_destroy`] was called while connecting;
    /// `NotConnected` for a socket that never started connecting or is destroyed.
    pub async fn connected(&mut self) -> io::Result<()> {
        poll_fn(|cx| match &self.io {
            Io::Connecting(_) if self.abort.is_some() => match self.poll_abort(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => self.poll_connect(cx),
            },
            Io::Connecting(_) => self.poll_connect(cx),
            Io::Open(_) => Poll::Ready(Ok(())),
            Io::Unconnected => Poll::Ready(Err(not_connected("wait for a connection"))),
            Io::Closed => Poll::Ready(Err(self
                .error
                .take()
                .unwrap_or_else(|| self.gone("wait for a connection")))),
        })
        .await
    }

    /// `new net.Socket({fd, allowHalfOpen, readable, writable})`: a socket over a connected
    /// TCP or Unix stream socket this process has (inherited, or from `socketpair`).
    ///
    /// The socket works on a duplicate (`F_DUPFD_CLOEXEC`) and makes the descriptor
    /// non-blocking (a flag the duplicate shares with the original). The original number stays
    /// open and is the caller's to close; so that the peer still sees the connection end when
    /// this socket is destroyed or dropped, the socket then shuts the connection down
    /// (`shutdown(SHUT_RDWR)`), which affects the original too. Must be called within a tokio
    /// runtime.
    ///
    /// # Errors
    /// Naming the descriptor: not open (`fd 999999 is not an open descriptor`), not a socket
    /// (`fd 5 is not a socket: it is a regular file`), not a stream socket, a listening socket,
    /// not connected (`NotConnected`), or not the [`SocketType`] asked for; an error when
    /// called outside a tokio runtime.
    pub fn from_fd(options: impl Into<FromFdOptions>) -> io::Result<Socket> {
        let options = options.into();
        let (stream, _) = from_fd::adopt(&options)?;
        let mut socket = Socket::new();
        socket.shared_fd = true;
        socket.allow_half_open = options.allow_half_open;
        socket.readable_option = options.readable;
        socket.writable_option = options.writable;
        socket.writable = options.writable;
        socket.install(stream);
        Ok(socket)
    }

    /// Makes `stream` the socket's connection and applies options set before it existed.
    fn install(&mut self, stream: Stream) {
        let kind = stream.kind();
        self.install_as(stream, kind);
    }

    /// [`Socket::install`] of a stream whose type is known.
    fn install_as(&mut self, stream: Stream, kind: SocketType) {
        self.kind = Some(kind);
        let pending = std::mem::take(&mut *lock(&self.pending_options));
        if let Some(sock) = stream.sock().filter(|_| matches!(stream, Stream::Tcp(_))) {
            if let Some(no_delay) = pending.no_delay {
                if let Err(e) = sock.set_tcp_nodelay(no_delay) {
                    tracing::debug!("setNoDelay after connect: {e}");
                }
            }
            if let Some((enable, delay)) = pending.keep_alive {
                if let Err(e) = apply_keep_alive(&sock, enable, delay) {
                    tracing::debug!("setKeepAlive after connect: {e}");
                }
            }
        }
        self.io = Io::Open(stream);
        self.readable = self.readable_option;
        self.read_eof = !self.readable_option;
        self.activity.touch();
    }

    fn reset_for_connect(&mut self) {
        self.kind = None;
        self.readable = false;
        self.writable = false;
        self.readable_option = true;
        self.writable_option = true;
        self.read_eof = false;
        self.end_pending = false;
        self.fin_sent = false;
        self.ended_by_peer = false;
        self.queue.clear();
        self.bytes_read = 0;
        self.bytes_written = 0;
        self.destroyed = false;
        self.had_error = false;
        self.closed_cleanly = false;
        self.error = None;
        self.reset_on_connect = false;
        self.shared_fd = false;
        self.decoder = TextDecoder::default();
        if let Some(encoding) = self.encoding {
            self.decoder.set_encoding(encoding);
        }
    }

    fn poll_connect(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Io::Connecting(connecting) = &mut self.io else {
            return Poll::Ready(Ok(()));
        };
        let future = connecting.get_mut().unwrap_or_else(PoisonError::into_inner);
        match ready!(future.as_mut().poll(cx)) {
            Ok(stream) => {
                self.install(stream);
                if self.reset_on_connect {
                    self.reset_now();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "connection was reset by reset_and_destroy() while connecting",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                self.close_now(true, true);
                Poll::Ready(Err(e))
            }
        }
    }

    /// Reads without handing out bytes the text decoder holds.
    fn poll_read_raw(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        if self.paused {
            self.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if self.read_eof {
            return Poll::Ready(Ok(()));
        }
        match &self.io {
            Io::Connecting(_) => ready!(self.poll_connect(cx))?,
            Io::Open(_) => {}
            Io::Unconnected => return Poll::Ready(Err(not_connected("read"))),
            Io::Closed => return Poll::Ready(Err(self.gone("read"))),
        }
        if self.read_eof {
            return Poll::Ready(Ok(()));
        }
        // Queued writes move on whenever the socket is polled (without taking the waker of a
        // task that polls for writing).
        if let Err(e) = self.progress_writes_now() {
            return Poll::Ready(Err(e));
        }
        let Io::Open(stream) = &mut self.io else {
            return Poll::Ready(Err(self.gone("read")));
        };
        let asked = buf.remaining();
        let before = buf.filled().len();
        match stream.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    self.bytes_read += n as u64;
                    self.activity.touch();
                } else if asked > 0 {
                    self.on_eof();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.fail(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The peer's FIN arrived.
    fn on_eof(&mut self) {
        self.read_eof = true;
        self.readable = false;
        if !self.allow_half_open && self.writable {
            self.writable = false;
            self.ended_by_peer = true;
            self.end_pending = true;
        }
        if let Err(e) = self.progress_writes_now() {
            self.error = Some(e);
        }
        self.maybe_close();
    }

    /// Sends what the kernel takes now of the queue (and the pending FIN), without waiting or
    /// registering a waker.
    fn progress_writes_now(&mut self) -> io::Result<()> {
        let Io::Open(stream) = &self.io else {
            return Ok(());
        };
        let mut failure = None;
        let mut sent_any = false;
        while let Some(chunk) = self.queue.front() {
            match stream.send_now(chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.queue.advance(n);
                    self.bytes_written += n as u64;
                    sent_any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() && self.queue.is_empty() && self.end_pending && !self.fin_sent {
            match stream.shutdown_write() {
                Ok(()) => {
                    self.fin_sent = true;
                    self.end_pending = false;
                }
                Err(e) => failure = Some(e),
            }
        }
        if sent_any {
            self.activity.touch();
        }
        if let Some(e) = failure {
            return Err(self.fail(e));
        }
        self.maybe_close();
        Ok(())
    }

    /// Sends the queue (and the pending FIN), waiting for the kernel as needed.
    fn poll_progress(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Io::Open(stream) = &mut self.io else {
                return Poll::Ready(Ok(()));
            };
            let Some(chunk) = self.queue.front() else {
                break;
            };
            match stream.poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes");
                    return Poll::Ready(Err(self.fail(e)));
                }
                Poll::Ready(Ok(n)) => {
                    self.queue.advance(n);
                    self.bytes_written += n as u64;
                    self.activity.touch();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.end_pending && !self.fin_sent {
            if let Io::Open(stream) = &self.io {
                if let Err(e) = stream.shutdown_write() {
                    return Poll::Ready(Err(self.fail(e)));
                }
                self.fin_sent = true;
                self.end_pending = false;
            }
        }
        self.maybe_close();
        Poll::Ready(Ok(()))
    }

    /// Closes the socket once both sides have ended.
    fn maybe_close(&mut self) {
        let write_done = self.fin_sent || !self.writable_option;
        if matches!(self.io, Io::Open(_))
            && self.read_eof
            && write_done
            && !self.end_pending
            && self.queue.is_empty()
        {
            self.closed_cleanly = true;
            self.close_now(false, true);
        }
    }

    /// Closes the connection now. `shut_down` sends FIN first for a socket made from a
    /// descriptor (whose original keeps the connection open otherwise).
    fn close_now(&mut self, had_error: bool, shut_down: bool) {
        if let Io::Open(stream) = &self.io {
            if let Some(sock) = stream
                .sock()
                .filter(|_| self.shared_fd && shut_down && !(self.fin_sent && self.read_eof))
            {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        self.io = Io::Closed;
        self.destroyed = true;
        self.had_error |= had_error;
        if let Some(hook) = self.close_hook.take() {
            hook();
        }
        self.readable = false;
        self.writable = false;
        self.end_pending = false;
        self.queue.clear();
        self.activity.set_timeout(None);
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    /// An I/O error: the socket is destroyed with `had_error`, and the error goes to the
    /// caller.
    fn fail(&mut self, e: io::Error) -> io::Error {
        self.close_now(true, true);
        e
    }

    fn reset_now(&mut self) {
        if let Io::Open(stream) = &self.io {
            // SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            if let Some(Err(e)) = stream.sock().map(|s| s.set_linger(Some(Duration::ZERO))) {
                tracing::debug!("resetAndDestroy: SO_LINGER: {e}");
            }
        }
        self.close_now(false, false);
    }

    fn gone(&self, what: &str) -> io::Error {
        let state = if self.closed_cleanly {
            "closed"
        } else {
            "destroyed"
        };
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("cannot {what}: the socket is {state}"),
        )
    }

    fn write_error(&self) -> io::Error {
        let broken = |msg: &str| io::Error::new(io::ErrorKind::BrokenPipe, msg.to_owned());
        if !self.writable_option {
            broken("cannot write: the socket was made with writable: false")
        } else if self.ended_by_peer {
            broken(
                "cannot write: the socket was ended by the other party (allow_half_open is false)",
            )
        } else if self.end_pending || self.fin_sent {
            broken("write after end")
        } else if matches!(self.io, Io::Unconnected) {
            not_connected("write")
        } else {
            self.gone("write")
        }
    }

    /// `socket.write(data)`: sends `data` now as far as the kernel takes it and queues the
    /// rest. Returns `true` when all of it was handed to the kernel, `false` when some is
    /// queued (then [`Socket::drained`] is the `'drain'` event). Never waits.
    ///
    /// While connecting everything is queued. Queued bytes go out before any later write,
    /// whichever way it is made.
    ///
    /// # Errors
    /// `BrokenPipe` after [`Socket::end`] (`write after end`), after the peer ended a socket
    /// without `allow_half_open`, or with `writable: false`; `NotConnected` for a socket that
    /// is not connected or is destroyed; the OS error (`EPIPE`, `ECONNRESET`) when sending
    /// fails, which destroys the socket.
    pub fn write(&mut self, data: impl AsRef<[u8]>) -> io::Result<bool> {
        let data = data.as_ref();
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let connecting = matches!(self.io, Io::Connecting(_));
        if !self.writable || !(connecting || matches!(self.io, Io::Open(_))) {
            return Err(self.write_error());
        }
        self.activity.touch();
        if connecting {
            self.queue.push(data);
            return Ok(self.queue.is_empty());
        }
        self.progress_writes_now()?;
        if !self.queue.is_empty() {
            self.queue.push(data);
            return Ok(false);
        }
        let Io::Open(stream) = &self.io else {
            return Err(self.write_error());
        };
        let mut sent = 0;
        let mut failure = None;
        while sent < data.len() {
            match stream.send_now(&data[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        self.bytes_written += sent as u64;
        if let Some(e) = failure {
            return Err(self.fail(e));
        }
        if sent < data.len() {
            self.queue.push(&data[sent..]);
            return Ok(false);
        }
        Ok(true)
    }

    /// Bytes queued by [`Socket::write`] and not yet handed to the kernel (`bufferSize`,
    /// `writableLength`).
    pub fn buffer_size(&self) -> usize {
        self.queue.len
    }

    /// Completes when everything queued by [`Socket::write`] has been handed to the kernel
    /// (Node's `'drain'`); at once when nothing is queued.
    ///
    /// # Errors
    /// The error that stopped the sending (the socket is then destroyed); `NotConnected` when
    /// the socket was destroyed with bytes still queued.
    pub async fn drained(&mut self) -> io::Result<()> {
        poll_fn(|cx| {
            if let Some(e) = self.error.take() {
                return Poll::Ready(Err(e));
            }
            match &self.io {
                Io::Connecting(_) => ready!(self.poll_connect(cx))?,
                Io::Open(_) => {}
                Io::Unconnected => return Poll::Ready(Ok(())),
                Io::Closed if self.closed_cleanly => return Poll::Ready(Ok(())),
                Io::Closed => return Poll::Ready(Err(self.gone("drain"))),
            }
            self.poll_progress(cx)
        })
        .await
    }

    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        if self.fin_sent {
            return Poll::Ready(Ok(()));
        }
        match &self.io {
            Io::Connecting(_) => ready!(self.poll_connect(cx))?,
            Io::Open(_) => {}
            Io::Unconnected => return Poll::Ready(Err(not_connected("end"))),
            Io::Closed if self.closed_cleanly => return Poll::Ready(Ok(())),
            Io::Closed => return Poll::Ready(Err(self.gone("end"))),
        }
        if !self.writable_option {
            return Poll::Ready(Ok(()));
        }
        self.writable = false;
        if !self.fin_sent {
            self.end_pending = true;
        }
        self.poll_progress(cx)
    }

    /// `socket.end([data])`: writes `data` if given, then half-closes: FIN goes out after
    /// everything queued, and completes once it has (Node's `'finish'`). Reading goes on; the
    /// ready state becomes `ReadOnly`. Ending twice is fine.
    ///
    /// # Errors
    /// As [`Socket::write`] for `data`; the error that stopped the sending; `NotConnected` for
    /// a socket that is not connected or was destroyed.
    pub async fn end(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        if let Some(data) = data {
            self.write(data)?;
        }
        poll_fn(|cx| self.poll_end(cx)).await
    }

    /// `socket.destroy([error])`: closes the connection now, dropping anything queued. With
    /// an error, that error is Node's `'error'` event: the next call on the socket returns it
    /// (or [`Socket::take_error`] takes it) and [`Socket::closed`] says `had_error`.
    /// Destroying twice does nothing.
    pub fn destroy(&mut self, error: Option<io::Error>) {
        if self.destroyed {
            return;
        }
        let had_error = error.is_some();
        self.close_now(had_error, true);
        self.error = error;
    }

    /// `socket.resetAndDestroy()`: closes a TCP connection with RST instead of FIN (the peer's
    /// reads fail with `ECONNRESET`) and destroys the socket. While connecting, the reset
    /// happens when the connect completes (in [`Socket::connected`], which then returns
    /// `ConnectionAborted`). On a socket with no connection it is `destroy` with a "socket is
    /// closed" error (Node's `ERR_SOCKET_CLOSED`).
    ///
    /// For a socket made with [`Socket::from_fd`] the RST goes out when the last descriptor of
    /// the connection is closed, the caller's original included.
    ///
    /// # Errors
    /// `InvalidInput` for a Unix socket (Node's `ERR_INVALID_HANDLE_TYPE`); the socket is left
    /// as it was.
    pub fn reset_and_destroy(&mut self) -> io::Result<()> {
        let not_tcp = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "reset_and_destroy() needs a TCP socket; this is a Unix socket",
            )
        };
        match &self.io {
            Io::Open(Stream::Unix(_)) => Err(not_tcp()),
            Io::Connecting(_) if self.connecting_unix => Err(not_tcp()),
            Io::Connecting(_) => {
                self.reset_on_connect = true;
                Ok(())
            }
            Io::Open(Stream::Tcp(_)) => {
                self.reset_now();
                Ok(())
            }
            Io::Unconnected | Io::Closed => {
                self.destroy(Some(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "socket is closed",
                )));
                Ok(())
            }
        }
    }

    /// Completes when the socket is fully closed (Node's `'close'`), with `had_error`: whether
    /// it closed because of an error.
    ///
    /// It drives the socket there: it finishes the queue and the FIN of an end, and reads
    /// until the peer ends, discarding what arrives (as Node does with data nobody listens
    /// to). A socket that never connected returns `false` at once. A socket that stays open
    /// never completes this: one paused, or one with `allow_half_open` whose peer ended and
    /// whose own side was not ended.
    pub async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 8192];
        poll_fn(|cx| self.poll_closed(cx, &mut scratch)).await
    }

    fn poll_closed(&mut self, cx: &mut Context<'_>, scratch: &mut [u8]) -> Poll<bool> {
        loop {
            match &self.io {
                Io::Closed => return Poll::Ready(self.had_error),
                Io::Unconnected => return Poll::Ready(false),
                Io::Connecting(_) => match self.poll_connect(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        self.error = Some(e);
                        continue;
                    }
                    Poll::Ready(Ok(())) => continue,
                },
                Io::Open(_) => {}
            }
            if let Poll::Ready(Err(e)) = self.poll_progress(cx) {
                self.error = Some(e);
                continue;
            }
            if !matches!(self.io, Io::Open(_)) {
                continue;
            }
            if self.read_eof {
                // Only the queue (whose waker is registered) or the application's end remain.
                return Poll::Pending;
            }
            let mut discard = ReadBuf::new(scratch);
            match self.poll_read_raw(cx, &mut discard) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    if matches!(self.io, Io::Open(_)) {
                        self.close_now(true, true);
                    }
                    self.error = Some(e);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The error given to [`Socket::destroy`] (or met while no call could return it), if no
    /// call has returned it yet.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// `socket.pause()`: no more bytes are read (reads wait) until [`Socket::resume`]; the
    /// kernel's buffer then fills and the peer is slowed down.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// `socket.resume()`: reading goes on after [`Socket::pause`].
    pub fn resume(&mut self) {
        self.paused = false;
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    /// Whether the socket is paused (`socket.isPaused()`).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// `allowHalfOpen`: when `false` (the default), the socket ends its writable side once the
    /// peer ends, after its queue.
    pub fn set_allow_half_open(&mut self, allow: bool) {
        self.allow_half_open = allow;
    }

    /// Whether the socket stays half-open when the peer ends.
    pub fn allow_half_open(&self) -> bool {
        self.allow_half_open
    }

    /// `socket.setTimeout(ms)`: a `'timeout'` event ([`IdleTimeout::expired`]) comes after the
    /// socket was idle that long; the socket is not closed. [`Duration::ZERO`] disables it.
    /// Does nothing on a destroyed socket.
    pub fn set_timeout(&self, timeout: Duration) {
        if self.destroyed {
            return;
        }
        self.activity
            .set_timeout((!timeout.is_zero()).then_some(timeout));
    }

    /// `socket.timeout`: the idle timeout, `None` when not set.
    pub fn timeout(&self) -> Option<Duration> {
        self.activity.timeout()
    }

    /// A handle whose [`IdleTimeout::expired`] is the `'timeout'` event. It does not borrow
    /// the socket, so it can be awaited next to reads in `tokio::select!`.
    pub fn idle_timeout(&self) -> IdleTimeout {
        IdleTimeout::new(self.activity.clone())
    }

    /// `socket.setNoDelay(noDelay)`: sets `TCP_NODELAY` (`true` disables Nagle's algorithm).
    /// Before the connection exists it is remembered and applied on connect; on a Unix socket
    /// it does nothing.
    ///
    /// # Errors
    /// The `setsockopt` error.
    pub fn set_no_delay(&self, no_delay: bool) -> io::Result<()> {
        match &self.io {
            Io::Open(Stream::Tcp(s)) => match s.sock() {
                Some(sock) => sock
                    .set_tcp_nodelay(no_delay)
                    .map_err(|e| io::Error::new(e.kind(), format!("setNoDelay({no_delay}): {e}"))),
                None => Ok(()),
            },
            Io::Open(Stream::Unix(_)) | Io::Closed => Ok(()),
            Io::Unconnected | Io::Connecting(_) => {
                lock(&self.pending_options).no_delay = Some(no_delay);
                Ok(())
            }
        }
    }

    /// `socket.setKeepAlive(enable, initialDelay)`. Enabling sets `SO_KEEPALIVE=1`,
    /// `TCP_KEEPIDLE` = `initial_delay` in whole seconds (below one second: left as it was),
    /// `TCP_KEEPCNT=10` and `TCP_KEEPINTVL=1`; disabling sets `SO_KEEPALIVE=0`. Before the
    /// connection exists it is remembered and applied on connect; on a Unix socket it does
    /// nothing.
    ///
    /// # Errors
    /// The `setsockopt` error.
    pub fn set_keep_alive(&self, enable: bool, initial_delay: Duration) -> io::Result<()> {
        match &self.io {
            Io::Open(Stream::Tcp(s)) => s
                .sock()
                .map_or(Ok(()), |sock| {
                    apply_keep_alive(&sock, enable, initial_delay)
                })
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("setKeepAlive({enable}, {initial_delay:?}): {e}"),
                    )
                }),
            Io::Open(Stream::Unix(_)) | Io::Closed => Ok(()),
            Io::Unconnected | Io::Connecting(_) => {
                lock(&self.pending_options).keep_alive = Some((enable, initial_delay));
                Ok(())
            }
        }
    }

    /// `socket.setEncoding(encoding)`: [`Socket::read_text`] decodes with `encoding`.
    /// Changing it keeps bytes held back from the last read. Reads through `AsyncRead` stay
    /// bytes (held-back bytes are handed out first).
    pub fn set_encoding(&mut self, encoding: Encoding) {
        self.encoding = Some(encoding);
        self.decoder.set_encoding(encoding);
    }

    /// The encoding set by [`Socket::set_encoding`] (`readableEncoding`).
    pub fn encoding(&self) -> Option<Encoding> {
        self.encoding
    }

    /// Reads the next chunk as text in the [`set_encoding`](Socket::set_encoding) encoding
    /// (UTF-8 when none was set), Node's `'data'` with a string. A character split across
    /// reads is held back and returned whole with the next chunk; invalid bytes become
    /// U+FFFD. Returns `None` at the end of the stream (`'end'`), after any held-back
    /// remainder.
    ///
    /// # Errors
    /// As reading through `AsyncRead`.
    pub async fn read_text(&mut self) -> io::Result<Option<String>> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut chunk);
                ready!(self.poll_read_raw(cx, &mut buf))?;
                Poll::Ready(Ok::<_, io::Error>(buf.filled().len()))
            })
            .await?;
            if n == 0 {
                let rest = self.decoder.finish();
                return Ok((!rest.is_empty()).then_some(rest));
            }
            let text = self.decoder.decode(&chunk[..n]);
            if !text.is_empty() {
                return Ok(Some(text));
            }
        }
    }

    /// Node's `onread` option: reads into the one buffer `buf` again and again, calling
    /// `callback` with the bytes of each read (`&buf[..nread]`), until the peer ends
    /// ([`OnReadEnd::Eof`]). When `callback` returns `false` the socket is paused and this
    /// returns [`OnReadEnd::Paused`]; it also returns that at once if the socket is paused.
    ///
    /// # Errors
    /// `InvalidInput` for an empty `buf`; read errors.
    pub async fn on_read<F>(&mut self, buf: &mut [u8], mut callback: F) -> io::Result<OnReadEnd>
    where
        F: FnMut(&[u8]) -> bool,
    {
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "on_read needs a buffer of at least one byte",
            ));
        }
        loop {
            if self.paused {
                return Ok(OnReadEnd::Paused);
            }
            let n = poll_fn(|cx| {
                let mut read = ReadBuf::new(buf);
                ready!(Pin::new(&mut *self).poll_read(cx, &mut read))?;
                Poll::Ready(Ok::<_, io::Error>(read.filled().len()))
            })
            .await?;
            if n == 0 {
                return Ok(OnReadEnd::Eof);
            }
            if !callback(&buf[..n]) {
                self.pause();
                return Ok(OnReadEnd::Paused);
            }
        }
    }

    /// `socket.connecting`: a connect was started and has not completed.
    pub fn connecting(&self) -> bool {
        matches!(self.io, Io::Connecting(_))
    }

    /// `socket.pending`: not connected yet — never connected, or still connecting.
    pub fn pending(&self) -> bool {
        matches!(self.io, Io::Unconnected | Io::Connecting(_))
    }

    /// `socket.destroyed`: destroyed, failed, or closed after both sides ended; no more data
    /// can be transferred.
    pub fn destroyed(&self) -> bool {
        self.destroyed
    }

    /// `socket.readyState`.
    pub fn ready_state(&self) -> ReadyState {
        if self.connecting() {
            return ReadyState::Opening;
        }
        match (self.readable, self.writable) {
            (true, true) => ReadyState::Open,
            (true, false) => ReadyState::ReadOnly,
            (false, true) => ReadyState::WriteOnly,
            (false, false) => ReadyState::Closed,
        }
    }

    /// The type of the connection (`'tcp4'`, `'tcp6'` or `'unix'`); `None` before the first
    /// connection. It stays after the socket closes.
    pub fn socket_type(&self) -> Option<SocketType> {
        self.kind
    }

    /// The peer's address for TCP (`remoteAddress`/`remotePort`), `None` for Unix sockets and
    /// when not connected (destroyed included).
    pub fn remote_address(&self) -> Option<SocketAddr> {
        match &self.io {
            Io::Open(Stream::Tcp(s)) => s.peer_addr().ok(),
            _ => None,
        }
    }

    /// `socket.remotePort`.
    pub fn remote_port(&self) -> Option<u16> {
        self.remote_address().map(|a| a.port())
    }

    /// `socket.remoteFamily`: `"IPv4"` or `"IPv6"`.
    pub fn remote_family(&self) -> Option<&'static str> {
        self.remote_address().map(family_name)
    }

    /// The local address for TCP (`localAddress`/`localPort`), `None` for Unix sockets and
    /// when not connected.
    pub fn local_address(&self) -> Option<SocketAddr> {
        match &self.io {
            Io::Open(Stream::Tcp(s)) => s.local_addr().ok(),
            _ => None,
        }
    }

    /// `socket.localPort`.
    pub fn local_port(&self) -> Option<u16> {
        self.local_address().map(|a| a.port())
    }

    /// `socket.localFamily`: `"IPv4"` or `"IPv6"`.
    pub fn local_family(&self) -> Option<&'static str> {
        self.local_address().map(family_name)
    }

    /// `socket.address()`: the local address, family and port as the OS reports them (TCP).
    pub fn address(&self) -> Option<AddressInfo> {
        self.local_address().map(AddressInfo::from)
    }

    /// `socket.bytesRead`: bytes received.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// `socket.bytesWritten`: bytes handed to the kernel. (Node also counts bytes still
    /// queued; that is `bytes_written() + buffer_size()`.)
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The connection's descriptor (for `getsockopt` and the like), `None` when there is no
    /// connection.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.io {
            Io::Open(Stream::Tcp(s)) => s.fd(),
            Io::Open(Stream::Unix(s)) => Some(s.as_fd()),
            _ => None,
        }
    }

    /// `socket.setSecure()`, deprecated since Node 0.3 and gone since: TLS is a separate
    /// layer. Always an error.
    ///
    /// # Errors
    /// Always `Unsupported`.
    #[deprecated(note = "removed from Node in 0.3; wrap the socket in a TLS stream instead")]
    pub fn set_secure(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "setSecure() was removed; wrap the socket in a TLS stream instead",
        ))
    }

    fn describe_peer(&self) -> String {
        match (&self.io, self.remote_address()) {
            (_, Some(a)) => a.to_string(),
            (Io::Open(Stream::Unix(s)), None) => s
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "unix".to_owned()),
            _ => "-".to_owned(),
        }
    }
}

impl From<TcpStream> for Socket {
    /// Wraps a connected tokio TCP stream.
    fn from(stream: TcpStream) -> Self {
        Socket::tcp(stream)
    }
}

impl From<UnixStream> for Socket {
    /// Wraps a connected tokio Unix stream.
    fn from(stream: UnixStream) -> Self {
        Socket::unix(stream)
    }
}

impl AsFd for Socket {
    /// The connection's descriptor, so `socket2::SockRef::from(&socket)` and the like work.
    ///
    /// # Panics
    /// When the socket has no connection (never connected, still connecting, or destroyed);
    /// [`Socket::fd`] is the fallible form.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.fd() {
            Some(fd) => fd,
            None => panic!("Socket::as_fd: the socket has no connection ({self:?})"),
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if !self.destroyed {
            self.close_now(false, true);
        }
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("type", &self.kind.map(SocketType::as_str))
            .field("ready_state", &self.ready_state().as_str())
            .field("local", &self.local_address())
            .field("remote", &self.describe_peer())
            .field("bytes_read", &self.bytes_read)
            .field("bytes_written", &self.bytes_written)
            .field("buffer_size", &self.queue.len)
            .field("paused", &self.paused)
            .field("allow_half_open", &self.allow_half_open)
            .field("destroyed", &self.destroyed)
            .finish()
    }
}

/// The error of a socket destroyed by its `signal`.
fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "The operation was aborted (AbortError): the socket's signal was cancelled",
    )
}

impl AsyncRead for Socket {
    /// Node's `'data'`: bytes read; 0 bytes is `'end'`. Waits while paused.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_abort(cx) {
            return Poll::Ready(Err(e));
        }
        let held = this.decoder.pending();
        if !held.is_empty() && buf.remaining() > 0 && !this.paused {
            let n = held.len().min(buf.remaining());
            buf.put_slice(&held[..n]);
            this.decoder.consume_pending(n);
            return Poll::Ready(Ok(()));
        }
        this.poll_read_raw(cx, buf)
    }
}

impl Socket {
    /// Destroys the socket once its `signal` is cancelled (and registers `cx` to hear of it).
    fn poll_abort(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let fired = self
            .abort
            .as_mut()
            .is_some_and(|f| f.as_mut().poll(cx).is_ready());
        if !fired {
            return None;
        }
        self.abort = None;
        self.close_now(true, true);
        Some(aborted())
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.poll_abort(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        if matches!(self.io, Io::Connecting(_)) {
            ready!(self.poll_connect(cx))?;
        }
        if !self.writable || !matches!(self.io, Io::Open(_)) {
            return Poll::Ready(Err(self.write_error()));
        }
        self.poll_progress(cx)
    }
}

impl AsyncWrite for Socket {
    /// Writes after anything [`Socket::write`] queued.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_write_ready(cx))?;
        let Io::Open(stream) = &mut this.io else {
            return Poll::Ready(Err(this.write_error()));
        };
        match stream.poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.bytes_written += n as u64;
                if n > 0 {
                    this.activity.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.fail(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Sends the queue.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        match &this.io {
            Io::Connecting(_) => ready!(this.poll_connect(cx))?,
            Io::Open(_) => {}
            Io::Unconnected => return Poll::Ready(Ok(())),
            Io::Closed if this.closed_cleanly => return Poll::Ready(Ok(())),
            Io::Closed => return Poll::Ready(Err(this.gone("flush"))),
        }
        ready!(this.poll_progress(cx))?;
        match &mut this.io {
            Io::Open(stream) => stream.poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// [`Socket::end`] without data.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_end(cx)
    }
}

fn apply_keep_alive(sock: &SockRef<'_>, enable: bool, initial_delay: Duration) -> io::Result<()> {
    if !enable {
        return sock.set_keepalive(false);
    }
    let mut params = TcpKeepalive::new()
        .with_interval(Duration::from_secs(1))
        .with_retries(10);
    let secs = initial_delay.as_secs();
    if secs > 0 {
        params = params.with_time(Duration::from_secs(secs));
    }
    sock.set_tcp_keepalive(&params)
}

fn family_name(a: SocketAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn not_connected(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("cannot {what}: the socket is not connected (start_connect was not called)"),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;
