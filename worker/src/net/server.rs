//! `net.Server`, the Node API: [`ServerOptions`], `listen` in its forms, `close`/`closed`,
//! `address`, `getConnections` (with [`Origin`] and [`RemoteCount`] for sockets sent to other
//! processes), `maxConnections` and the `'drop'` callback ([`DropInfo`]).
//!
//! Node's events map to Rust like this: [`Server::listen`] resolving is `'listening'`, the
//! handler given to [`Server::new`] is the `'connection'` listener, [`Server::closed`]
//! completing is `'close'`, and errors are `Result`s.
//!
//! A listen ends here with a socket (or a round-robin grant) acquired and the server's state
//! set; the connections themselves — accept loops, the primary's hand-offs and their answers,
//! drops at `maxConnections`, the counters — are the intake's (`intake.rs`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcluster_protocol::listening::ListenError;
use netcluster_protocol::message::{BoundAddress, ListenKey};
use tokio::sync::{oneshot, watch};

use super::intake::{self, Listener, Shared, Stops};
use super::listen::{self, ListenOptions};
use super::socket::Socket;
use crate::cluster::{self, Worker};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
type Handler = Arc<dyn Fn(Socket) -> BoxFuture + Send + Sync>;
type DropHandler = Arc<dyn Fn(Option<DropInfo>) + Send + Sync>;

/// Options of `net.createServer(options)`, applied to every accepted connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Keep the writable side open after the peer ends its side (default false: the socket
    /// ends when the peer's FIN arrives).
    pub allow_half_open: bool,
    /// Hand connections to the handler paused: no byte is read until `socket.resume()`.
    pub pause_on_connect: bool,
    /// Set `TCP_NODELAY` on accepted TCP connections.
    pub no_delay: bool,
    /// Set `SO_KEEPALIVE` on accepted TCP connections.
    pub keep_alive: bool,
    /// Idle time before the first keep-alive probe (with `keep_alive`).
    pub keep_alive_initial_delay: Duration,
    /// Node's `server.dropMaxConnection`, for round-robin cluster workers: at
    /// `maxConnections`, accept a handed-over connection and drop it (with a `'drop'` event)
    /// instead of sending it back to the primary for another worker.
    pub drop_max_connection: bool,
}

/// What Node's `'drop'` event carries: the addresses of a connection refused because the
/// server was at `maxConnections`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropInfo {
    /// `localAddress`.
    pub local_address: String,
    /// `localPort`.
    pub local_port: u16,
    /// `localFamily`: `"IPv4"` or `"IPv6"`.
    pub local_family: &'static str,
    /// `remoteAddress`.
    pub remote_address: String,
    /// `remotePort`.
    pub remote_port: u16,
    /// `remoteFamily`: `"IPv4"` or `"IPv6"`.
    pub remote_family: &'static str,
}

impl DropInfo {
    pub(super) fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let family = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        DropInfo {
            local_address: local.ip().to_string(),
            local_port: local.port(),
            local_family: family(&local),
            remote_address: remote.ip().to_string(),
            remote_port: remote.port(),
            remote_family: family(&remote),
        }
    }
}

/// "No limit" in the `max_connections` atomic.
const UNLIMITED: usize = usize::MAX;

/// Counts the sockets a server accepted and sent to another process that are still open there
/// (Node's rule for `subprocess.send(message, socket)`): registered on the server through the
/// socket's [`Origin`] by whoever sent it (the cluster's `send_handle`).
pub trait RemoteCount: Send + Sync + 'static {
    /// How many are still open there; `Ok(None)` once that process is gone, after which the
    /// server forgets this counter.
    ///
    /// # Errors
    /// When the process cannot answer (Node's `ERR_CHILD_CLOSED_BEFORE_REPLY`).
    fn count(&self) -> Pin<Box<dyn Future<Output = io::Result<Option<usize>>> + Send + '_>>;
}

/// Remote counters of one server, by a tag naming the process asked (e.g. a worker id).
type Remotes = Mutex<std::collections::HashMap<u64, Arc<dyn RemoteCount>>>;

/// The server that accepted a socket ([`Socket::origin`]): lets the code that sends the socket
/// to another process keep it in the server's [`Server::get_connections`]. Holds no strong
/// reference: a server that is gone simply ignores registrations.
#[derive(Clone)]
pub struct Origin {
    id: u64,
    remotes: std::sync::Weak<Remotes>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("id", &self.id).finish()
    }
}

impl Origin {
    /// The server's id ([`Server::id`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Counts `count`'s sockets in the server's `getConnections`; a second registration with
    /// the same `tag` replaces the first.
    pub fn register(&self, tag: u64, count: Arc<dyn RemoteCount>) {
        if let Some(remotes) = self.remotes.upgrade() {
            lock(&remotes).insert(tag, count);
        }
    }
}

static NEXT_SERVER_ID: AtomicUsize = AtomicUsize::new(1);

/// A stream server (`net.createServer(connectionListener)`).
///
/// Cloning gives another handle to the same server.
///
/// The seeds' echo server:
///
/// ```no_run
/// use netcluster_worker::net::{ListenOptions, Server};
/// use tokio::io::AsyncWriteExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let server = Server::new(|mut socket| async move {
///     println!("client connected");
///     let _ = socket.write_all(b"hello\r\n").await;
///     let (mut reader, mut writer) = tokio::io::split(socket);
///     let _ = tokio::io::copy(&mut reader, &mut writer).await; // c.pipe(c)
///     let _ = writer.shutdown().await;
///     println!("client disconnected");
/// });
/// let address = server.listen(ListenOptions::port(8124)).await?;
/// println!("server bound on {address}");
/// server.closed().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("address", &self.address())
            .field("connections", &self.connections())
            .finish()
    }
}

/// What a server's handles share with its accept loops and connection tasks.
pub(super) struct Inner {
    pub(super) id: u64,
    pub(super) handler: Handler,
    pub(super) options: ServerOptions,
    pub(super) max_connections: AtomicUsize,
    pub(super) on_drop: Mutex<Option<DropHandler>>,
    pub(super) state: Mutex<Option<Listening>>,
    /// Accept loops plus open connections; `closed()` waits for zero.
    pub(super) active: watch::Sender<usize>,
    pub(super) connections: watch::Sender<usize>,
    /// Connections accepted (and not dropped at `maxConnections`) since the server was made.
    pub(super) served: Arc<std::sync::atomic::AtomicU64>,
    /// Counters of sockets this server accepted that other processes hold.
    remotes: Arc<Remotes>,
    generation: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// The [`Origin`] its accepted sockets carry.
    pub(super) fn origin(&self) -> Origin {
        Origin {
            id: self.id,
            remotes: Arc::downgrade(&self.remotes),
        }
    }
}

/// A server's listen, while it lasts.
pub(super) struct Listening {
    address: BoundAddress,
    /// The key under which the primary shares this socket, in a cluster worker.
    shared_key: Option<ListenKey>,
    /// The listening socket's descriptor number, open for as long as this state exists (the
    /// accept loop closes it only after the state is taken); `None` for a round-robin listener,
    /// whose socket stays in the primary.
    fd: Option<RawFd>,
    /// Which listen of this server this is, so a late stop of an old accept loop cannot end a
    /// newer listen.
    pub(super) generation: u64,
    /// The cluster worker this process is, when it is one.
    worker: Option<Arc<Worker>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    /// A server that runs `handler` for every connection (Node's `'connection'` listener).
    pub fn new<F, Fut>(handler: F) -> Server
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Server::with_options(ServerOptions::default(), handler)
    }

    /// A server with options (`net.createServer(options, connectionListener)`).
    pub fn with_options<F, Fut>(options: ServerOptions, handler: F) -> Server
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |socket| Box::pin(handler(socket)));
        Server {
            inner: Arc::new(Inner {
                id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed) as u64,
                handler,
                options,
                max_connections: AtomicUsize::new(UNLIMITED),
                on_drop: Mutex::new(None),
                state: Mutex::new(None),
                active: watch::Sender::new(0),
                connections: watch::Sender::new(0),
                served: Arc::new(std::sync::atomic::AtomicU64::new(0)),
                remotes: Arc::new(Mutex::new(std::collections::HashMap::new())),
                generation: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Starts listening (`server.listen(...)`); resolving is Node's `'listening'` event. Returns
    /// the bound address, with the real port when port 0 was asked for.
    ///
    /// In a cluster worker a non-exclusive listen asks the primary for the shared socket, so
    /// every worker listening on the same address (port 0 included) accepts on one socket.
    ///
    /// # Errors
    /// `AddrInUse` when the server is already listening (Node's `ERR_SERVER_ALREADY_LISTEN`);
    /// otherwise the bind error (`EADDRINUSE`, `EACCES`, …) naming the address, in a worker the
    /// primary's.
    ///
    /// # Cancel safety
    /// Cancel safe: a listen dropped before it resolves leaves the server not listening and
    /// holds nothing. A host-name lookup is abandoned; a socket bound here is closed with the
    /// future; the cluster handshake (on a worker's first listen) finishes in its own task; a
    /// request to the primary that was not sent yet is forgotten, and the answer to one that
    /// was is closed on arrival, after which the worker tells the primary it does not use the
    /// socket (as Node does when a server closes before the primary's answer). The server's
    /// state is set and its accept loop started in one step, with no await between them.
    ///
    /// One message can be lost: when a listen fails after the primary granted it (binding a
    /// granted reusePort address failed, or a concurrent listen on the same server won) and
    /// the future is dropped while the channel to the primary is full, the `Close` that gives
    /// the grant back is not sent, and the primary counts this worker on that listener until
    /// the worker exits.
    pub async fn listen(&self, options: impl Into<ListenOptions>) -> io::Result<BoundAddress> {
        let options = options.into();
        if let Some(l) = lock(&self.inner.state).as_ref() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("server is already listening on {}", l.address),
            ));
        }
        let acquired = listen::acquire(&options).await?;
        self.start(acquired, options.signal).await
    }

    /// Listens on an existing listening (or bound, listenable) socket: another server's
    /// [`Server::handle`], a [`Socket`]'s descriptor, or any descriptor (`server.listen(handle)`).
    /// The descriptor is duplicated and validated; the caller keeps its own. In a cluster
    /// worker it is listened on directly, never sent to the primary.
    ///
    /// # Errors
    /// `InvalidInput` naming the descriptor when it is not a stream socket (a regular file, a
    /// pipe, a datagram socket); the OS error when it cannot listen; `AddrInUse` when this
    /// server is already listening.
    ///
    /// # Cancel safety
    /// Cancel safe: its only await is the cluster handshake (see [`Server::listen`]); the
    /// duplicate is closed with a dropped future and the caller's descriptor is untouched.
    pub async fn listen_handle(&self, handle: impl AsFd) -> io::Result<BoundAddress> {
        let raw = handle.as_fd().as_raw_fd();
        let named = |e: io::Error| io::Error::from(ListenError::new(format!("fd {raw}"), e));
        let dup = handle.as_fd().try_clone_to_owned().map_err(named)?;
        let (fd, address) = netcluster_protocol::listening::adopt_listener(
            dup,
            netcluster_protocol::message::DEFAULT_BACKLOG,
        )
        .map_err(named)?;
        let acquired = listen::Acquired {
            source: listen::Source::Socket(fd),
            address,
            shared_key: None,
            unlink: None,
            // Served here, but it stops with the worker like every server of the process.
            worker: cluster::worker().await?,
        };
        self.start(acquired, None).await
    }

    /// A duplicate of the listening socket (Node's `server._handle`), to listen on elsewhere
    /// with [`Server::listen_handle`] or to pass to another process.
    ///
    /// # Errors
    /// `NotConnected` when the server is not listening; `EMFILE` when out of descriptors.
    pub fn handle(&self) -> io::Result<OwnedFd> {
        let state = lock(&self.inner.state);
        let Some(l) = state.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "server is not running",
            ));
        };
        let Some(fd) = l.fd else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "server on {} is served round-robin by the primary: this process holds no listening socket",
                    l.address
                ),
            ));
        };
        netcluster_protocol::fd::dup_raw(fd)
    }

    async fn start(
        &self,
        acquired: listen::Acquired,
        cancel: Option<tokio_util::sync::CancellationToken>,
    ) -> io::Result<BoundAddress> {
        let worker = acquired.worker.clone();
        let stop_signal = worker.as_ref().map(|w| w.stop_signal());
        let (stop_tx, stop_rx) = oneshot::channel();
        let address = acquired.address.clone();
        let fd = match &acquired.source {
            listen::Source::Socket(fd) | listen::Source::Shared(fd) => Some(fd.as_raw_fd()),
            listen::Source::RoundRobin(..) => None,
        };
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
        let raced = {
            let mut state = lock(&self.inner.state);
            match state.as_ref() {
                // A concurrent listen won the race; ours is closed by dropping it.
                Some(l) => Some(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("server is already listening on {}", l.address),
                )),
                None => {
                    *state = Some(Listening {
                        address: address.clone(),
                        shared_key: acquired.shared_key.clone(),
                        fd,
                        generation,
                        worker: worker.clone(),
                        stop: Some(stop_tx),
                    });
                    None
                }
            }
        };
        if let Some(err) = raced {
            intake::leave_shared(worker.as_ref(), acquired.shared_key).await;
            return Err(err);
        }
        let listener = match Listener::new(acquired.source, &address, worker.clone()) {
            Ok(l) => l,
            Err(e) => {
                *lock(&self.inner.state) = None;
                intake::leave_shared(worker.as_ref(), acquired.shared_key).await;
                return Err(e);
            }
        };
        if let (Some(key), Some(worker)) = (&acquired.shared_key, &worker) {
            worker.register_counter(
                key.clone(),
                self.inner.connections.subscribe(),
                self.inner.served.clone(),
            );
        }
        self.inner.active.send_modify(|n| *n += 1);
        tokio::spawn(intake::accept_loop(
            self.inner.clone(),
            listener,
            Stops {
                close: stop_rx,
                worker: stop_signal,
                cancel,
            },
            generation,
            Shared {
                key: acquired.shared_key,
                worker,
            },
            acquired.unlink,
        ));
        Ok(address)
    }

    /// The bound address (`server.address()`), `None` when not listening.
    pub fn address(&self) -> Option<BoundAddress> {
        lock(&self.inner.state).as_ref().map(|l| l.address.clone())
    }

    /// Whether the server is listening (`server.listening`).
    pub fn listening(&self) -> bool {
        lock(&self.inner.state).is_some()
    }

    /// Open connections of this server in this process (`server.getConnections()`, and the
    /// deprecated `server.connections`).
    pub fn connections(&self) -> usize {
        *self.inner.connections.borrow()
    }

    /// This server's id, unique in this process (sockets it accepted carry it as their
    /// [`Socket::origin`]).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// `server.getConnections(callback)`: the open connections of this server in this process,
    /// plus, as in Node, the sockets it accepted and sent to other processes that are still
    /// open there (registered through the socket's [`Origin`]; the cluster's `send_handle` does).
    ///
    /// # Errors
    /// When a process holding sent sockets exits before it replies (Node's
    /// `ERR_CHILD_CLOSED_BEFORE_REPLY`).
    pub async fn get_connections(&self) -> io::Result<usize> {
        let remote: Vec<(u64, Arc<dyn RemoteCount>)> = lock(&self.inner.remotes)
            .iter()
            .map(|(tag, c)| (*tag, c.clone()))
            .collect();
        let mut total = self.connections();
        for (tag, count) in remote {
            match count.count().await? {
                Some(n) => total = total.saturating_add(n),
                // That process is gone, and its sockets with it.
                None => {
                    lock(&self.inner.remotes).remove(&tag);
                }
            }
        }
        Ok(total)
    }

    /// The open connections on this server's socket summed over every process of the cluster
    /// that shares it — Node has no such call (nodejs/node#48333). The primary asks each worker
    /// sharing the socket and adds up their answers. Outside a cluster, or for an exclusive
    /// listen, it is [`Server::connections`].
    ///
    /// # Errors
    /// When a worker exits before replying (Node's `ERR_CHILD_CLOSED_BEFORE_REPLY`) or does not
    /// answer in time, or the primary is gone.
    pub async fn get_cluster_connections(&self) -> io::Result<usize> {
        let shared = lock(&self.inner.state)
            .as_ref()
            .and_then(|l| Some((l.shared_key.clone()?, l.worker.clone()?)));
        match shared {
            Some((key, worker)) => worker.cluster_connections(&key).await,
            None => Ok(self.connections()),
        }
    }

    /// `server.maxConnections`: at the limit, new connections are closed at once and the
    /// [`Server::on_drop`] callback runs; `Some(0)` drops everything, `None` (the default)
    /// means no limit.
    pub fn set_max_connections(&self, max: Option<usize>) {
        self.inner
            .max_connections
            .store(max.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    /// The current `maxConnections`.
    pub fn max_connections(&self) -> Option<usize> {
        match self.inner.max_connections.load(Ordering::Relaxed) {
            UNLIMITED => None,
            n => Some(n),
        }
    }

    /// Node's `'drop'` event: `callback` runs for every connection dropped at
    /// `maxConnections`, with its addresses for TCP and `None` for Unix sockets.
    pub fn on_drop(&self, callback: impl Fn(Option<DropInfo>) + Send + Sync + 'static) {
        *lock(&self.inner.on_drop) = Some(Arc::new(callback));
    }

    /// Stops accepting new connections (`server.close()`); open connections go on, and
    /// [`Server::closed`] completes when the last one ends.
    ///
    /// # Errors
    /// `NotConnected` when the server is not listening (Node's `ERR_SERVER_NOT_RUNNING`).
    pub fn close(&self) -> io::Result<()> {
        let listening = lock(&self.inner.state).take();
        match listening {
            Some(mut l) => {
                if let Some(stop) = l.stop.take() {
                    let _ = stop.send(());
                }
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "server is not running",
            )),
        }
    }

    /// Completes when the server has stopped listening and its last connection has ended
    /// (Node's `'close'` event).
    pub async fn closed(&self) {
        let mut rx = self.inner.active.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Like [`Server::closed`], but gives up after `deadline`; returns whether it closed.
    pub async fn closed_within(&self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.closed()).await.is_ok()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::SocketType;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn echo() -> Server {
        Server::new(|mut socket| async move {
            let _ = socket.write_all(b"hello\r\n").await;
            let (mut r, mut w) = tokio::io::split(socket);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }

    #[tokio::test]
    async fn echo_over_tcp_then_close_waits_for_the_connection() {
        let server = echo();
        let addr = server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await
            .expect("listen");
        let BoundAddress::Tcp(sa) = addr else {
            panic!("tcp")
        };
        assert_ne!(sa.port(), 0);
        assert!(server.listening());
        let mut c = tokio::net::TcpStream::connect(sa).await.expect("connect");
        let mut hello = [0u8; 7];
        c.read_exact(&mut hello).await.expect("hello");
        assert_eq!(&hello, b"hello\r\n");
        assert_eq!(server.connections(), 1);
        server.close().expect("close");
        assert!(!server.listening());
        assert!(server.address().is_none());
        // Closed to new connections, the old one still echoes.
        assert!(!server.closed_within(Duration::from_millis(50)).await);
        c.write_all(b"ping").await.expect("write");
        let mut ping = [0u8; 4];
        c.read_exact(&mut ping).await.expect("echo");
        assert_eq!(&ping, b"ping");
        c.shutdown().await.expect("fin");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("eof");
        assert!(server.closed_within(Duration::from_secs(5)).await);
        assert_eq!(server.connections(), 0);
        assert!(tokio::net::TcpStream::connect(sa).await.is_err());
    }

    #[tokio::test]
    async fn unix_socket_file_is_removed_on_close() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("echo.sock");
        let server = echo();
        let addr = server.listen(path.clone()).await.expect("listen");
        assert_eq!(addr, BoundAddress::Unix(path.clone()));
        let mut c = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let mut hello = [0u8; 7];
        c.read_exact(&mut hello).await.expect("hello");
        drop(c);
        server.close().expect("close");
        assert!(server.closed_within(Duration::from_secs(5)).await);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn listen_twice_and_close_twice_are_errors_and_relisten_works() {
        let server = echo();
        server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await
            .expect("listen");
        let err = server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await
            .expect_err("twice");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("already listening"), "{err}");
        server.close().expect("close");
        let err = server.close().expect_err("not running");
        assert_eq!(err.to_string(), "server is not running");
        server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await
            .expect("again");
        server.close().expect("close");
    }

    fn local() -> ListenOptions {
        ListenOptions::port(0).host("127.0.0.1")
    }

    fn tcp_addr(a: BoundAddress) -> SocketAddr {
        match a {
            BoundAddress::Tcp(sa) => sa,
            BoundAddress::Unix(p) => panic!("not tcp: {}", p.display()),
        }
    }

    async fn hello(addr: SocketAddr) -> tokio::net::TcpStream {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 7];
        c.read_exact(&mut buf).await.expect("hello");
        c
    }

    #[tokio::test]
    async fn max_connections_drops_with_addresses_and_zero_drops_everything() {
        let server = echo();
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        server.on_drop(move |info| {
            let _ = tx.send(info);
        });
        server.set_max_connections(Some(1));
        assert_eq!(server.max_connections(), Some(1));
        let _first = hello(addr).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let info = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("drop event")
            .expect("open")
            .expect("TCP drops carry addresses");
        assert_eq!(info.local_port, addr.port());
        assert_eq!(info.local_address, "127.0.0.1");
        assert_eq!(info.local_family, "IPv4");
        assert_eq!(info.remote_port, second.local_addr().expect("addr").port());
        assert_eq!(info.remote_family, "IPv4");
        let mut buf = Vec::new();
        let n = second.read_to_end(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "a dropped connection gets no hello");
        assert_eq!(server.connections(), 1);

        server.set_max_connections(Some(0));
        let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(rx.recv().await.expect("open").is_some());
        assert_eq!(third.read_to_end(&mut buf).await.unwrap_or(0), 0);
        server.set_max_connections(None);
        assert_eq!(server.max_connections(), None);
        let _fourth = hello(addr).await;
    }

    #[tokio::test]
    async fn unix_drops_carry_no_addresses() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.sock");
        let server = echo();
        server.listen(path.clone()).await.expect("listen");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        server.on_drop(move |info| {
            let _ = tx.send(info);
        });
        server.set_max_connections(Some(0));
        let _c = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let info = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("drop event")
            .expect("open");
        assert_eq!(info, None);
    }

    #[tokio::test]
    async fn no_delay_and_keep_alive_apply_to_accepted_connections() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let options = ServerOptions {
            no_delay: true,
            keep_alive: true,
            keep_alive_initial_delay: Duration::from_secs(7),
            ..ServerOptions::default()
        };
        let server = Server::with_options(options, move |socket| {
            let tx = tx.clone();
            async move {
                let sock = socket2::SockRef::from(&socket);
                let _ = tx.send((
                    sock.tcp_nodelay().expect("nodelay"),
                    sock.keepalive().expect("keepalive"),
                    sock.tcp_keepalive_time().expect("keepidle"),
                ));
            }
        });
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (nodelay, keepalive, idle) = rx.recv().await.expect("handler ran");
        assert!(nodelay);
        assert!(keepalive);
        assert_eq!(idle, Duration::from_secs(7));
    }

    #[tokio::test]
    async fn accepted_sockets_have_their_listeners_type() {
        // Told by the listener's family, with no getsockname: an IPv6 socket's IPv4 clients
        // are tcp6 too (mapped addresses), as getsockname would say.
        async fn accepted_type(
            listen: ListenOptions,
            connect: Option<SocketAddr>,
        ) -> Option<SocketType> {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let server = Server::new(move |socket| {
                let tx = tx.clone();
                async move {
                    let local = socket.local_address();
                    let _ = tx.send((socket.socket_type(), local));
                }
            });
            let bound = server.listen(listen).await.ok()?;
            let addr = match (bound, connect) {
                (BoundAddress::Tcp(sa), None) => sa,
                (BoundAddress::Tcp(sa), Some(to)) => SocketAddr::new(to.ip(), sa.port()),
                (BoundAddress::Unix(p), _) => {
                    let _c = tokio::net::UnixStream::connect(&p).await.expect("connect");
                    return rx.recv().await.expect("handler ran").0;
                }
            };
            let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (kind, local) = rx.recv().await.expect("handler ran");
            let local = local.expect("a TCP socket has a local address");
            let by_getsockname = if local.is_ipv6() {
                SocketType::Tcp6
            } else {
                SocketType::Tcp4
            };
            assert_eq!(kind, Some(by_getsockname));
            kind
        }
        assert_eq!(accepted_type(local(), None).await, Some(SocketType::Tcp4));
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(
            accepted_type(dir.path().join("t.sock").into(), None).await,
            Some(SocketType::Unix)
        );
        let v4 = SocketAddr::from(([127, 0, 0, 1], 0));
        if let Some(kind) = accepted_type(ListenOptions::port(0).host("::"), Some(v4)).await {
            assert_eq!(
                kind,
                SocketType::Tcp6,
                "an IPv4 client of a dual-stack socket"
            );
        }
    }

    /// A server whose handler reads to EOF, then (a little later) writes "late".
    fn late_writer(allow_half_open: bool) -> Server {
        let options = ServerOptions {
            allow_half_open,
            ..ServerOptions::default()
        };
        Server::with_options(options, |mut socket| async move {
            let mut sink = Vec::new();
            let _ = socket.read_to_end(&mut sink).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = socket.write_all(b"late").await;
            let _ = socket.shutdown().await;
        })
    }

    async fn after_our_fin(addr: SocketAddr) -> Vec<u8> {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.shutdown().await.expect("fin");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .expect("the server ends its side");
        got
    }

    #[tokio::test]
    async fn allow_half_open_false_ends_our_side_when_the_peer_ends() {
        let server = late_writer(false);
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        assert_eq!(
            after_our_fin(addr).await,
            b"",
            "no byte after the peer's FIN"
        );
    }

    #[tokio::test]
    async fn allow_half_open_true_keeps_our_side_writable() {
        let server = late_writer(true);
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        assert_eq!(after_our_fin(addr).await, b"late");
    }

    #[tokio::test]
    async fn pause_on_connect_reads_nothing_until_resumed() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let options = ServerOptions {
            pause_on_connect: true,
            ..ServerOptions::default()
        };
        let server = Server::with_options(options, move |mut socket| {
            let tx = tx.clone();
            async move {
                let paused = socket.is_paused();
                let mut byte = [0u8; 1];
                let early =
                    tokio::time::timeout(Duration::from_millis(100), socket.read(&mut byte))
                        .await
                        .is_ok();
                socket.resume();
                let n = socket.read(&mut byte).await.unwrap_or(0);
                let _ = tx.send((paused, early, n, byte[0]));
            }
        });
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"x").await.expect("write");
        let (paused, early, n, byte) = rx.recv().await.expect("handler ran");
        assert!(paused, "handed over paused");
        assert!(!early, "no byte was read while paused");
        assert_eq!((n, byte), (1, b'x'), "resume() delivers it");
    }

    #[tokio::test]
    async fn ipv6_only_refuses_ipv4_clients() {
        let server = echo();
        let bound = server
            .listen(ListenOptions::port(0).host("::").ipv6_only(true))
            .await;
        let Ok(bound) = bound else {
            return; // no IPv6 on this machine
        };
        let port = tcp_addr(bound).port();
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        );
        let dual = echo();
        let port = tcp_addr(
            dual.listen(ListenOptions::port(0).host("::"))
                .await
                .expect("dual stack"),
        )
        .port();
        let _v4 = hello(SocketAddr::from(([127, 0, 0, 1], port))).await;
    }

    #[tokio::test]
    async fn readable_all_and_writable_all_set_the_socket_files_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rw.sock");
        let server = echo();
        server
            .listen(
                ListenOptions::path(&path)
                    .readable_all(true)
                    .writable_all(true),
            )
            .await
            .expect("listen");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o666, 0o666, "mode {mode:o}");
    }

    #[tokio::test]
    async fn listen_on_another_servers_handle() {
        let first = echo();
        let addr = tcp_addr(first.listen(local()).await.expect("listen"));
        let second = echo();
        let handle = first.handle().expect("handle");
        let bound = second
            .listen_handle(&handle)
            .await
            .expect("listen on the handle");
        assert_eq!(tcp_addr(bound), addr);
        first.close().expect("close the first");
        // The socket lives on in the second server.
        let _c = hello(addr).await;
        second.close().expect("close");
        let err = second.handle().expect_err("not listening");
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    }

    #[tokio::test]
    async fn listen_handle_rejects_what_is_not_a_stream_socket_naming_the_fd() {
        let file = tempfile::tempfile().expect("file");
        let server = echo();
        let err = server.listen_handle(&file).await.expect_err("a file");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            format!("listen fd {}: not a socket", file.as_raw_fd())
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let err = server.listen_handle(&udp).await.expect_err("udp");
        assert!(
            err.to_string().starts_with(&format!(
                "listen fd {}: not a stream socket",
                udp.as_raw_fd()
            )),
            "{err}"
        );
        let err = server
            .listen(ListenOptions::fd(999_999))
            .await
            .expect_err("closed fd");
        assert_eq!(
            err.to_string(),
            "listen fd 999999: Bad file descriptor (os error 9)"
        );
        assert!(!server.listening());
    }

    #[tokio::test]
    async fn listen_on_fd_0_names_it_when_it_is_not_a_socket() {
        // fd 0 (stdin) is a terminal, a pipe or /dev/null here; if a test runner made it a
        // socket there is nothing to check.
        if socket2::SockRef::from(&std::io::stdin()).r#type().is_ok() {
            return;
        }
        let server = echo();
        let err = server.listen(ListenOptions::fd(0)).await.expect_err("fd 0");
        assert_eq!(err.to_string(), "listen fd 0: not a socket");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn listen_on_an_fd_number() {
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std.local_addr().expect("addr");
        let server = echo();
        let bound = server
            .listen(ListenOptions::fd(std.as_raw_fd()))
            .await
            .expect("listen {fd}");
        assert_eq!(tcp_addr(bound), addr);
        drop(std);
        let _c = hello(addr).await;
    }

    #[tokio::test]
    async fn signal_closes_the_server() {
        let token = tokio_util::sync::CancellationToken::new();
        let server = echo();
        server
            .listen(local().signal(token.clone()))
            .await
            .expect("listen");
        token.cancel();
        assert!(server.closed_within(Duration::from_secs(5)).await);
        assert!(!server.listening());
    }

    #[tokio::test]
    async fn reuse_port_servers_share_a_port() {
        let a = echo();
        let addr = tcp_addr(a.listen(local().reuse_port(true)).await.expect("first"));
        let b = echo();
        let bound = b
            .listen(ListenOptions::from(addr).reuse_port(true))
            .await
            .expect("second on the same port");
        assert_eq!(tcp_addr(bound), addr);
        let c = echo();
        let err = c.listen(addr).await.expect_err("no reusePort");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn host_omitted_listens_on_every_interface() {
        let server = echo();
        let addr = tcp_addr(server.listen(ListenOptions::port(0)).await.expect("listen"));
        assert!(addr.ip().is_unspecified());
        let _v4 = hello(SocketAddr::from(([127, 0, 0, 1], addr.port()))).await;
        assert_eq!(server.get_connections().await.expect("count"), 1);
    }

    /// The backlog of the listening TCP socket on `port`, as `ss` reports it (its Send-Q);
    /// `None` when `ss` (iproute2) is not installed.
    pub(crate) fn backlog_of(port: u16) -> Option<u32> {
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().nth(2)?.parse().ok()
    }

    #[tokio::test]
    async fn backlog_defaults_to_511_and_can_be_set() {
        let default = echo();
        let port = tcp_addr(default.listen(local()).await.expect("listen")).port();
        let Some(backlog) = backlog_of(port) else {
            eprintln!("skipped: `ss` (iproute2) is not installed");
            return;
        };
        assert_eq!(backlog, 511);
        let small = echo();
        let port = tcp_addr(small.listen(local().backlog(7)).await.expect("listen")).port();
        assert_eq!(backlog_of(port), Some(7));
    }

    #[tokio::test]
    async fn listen_with_no_port_path_or_fd_picks_a_random_port_on_every_interface() {
        // Node's `server.listen()` without arguments.
        let server = echo();
        let addr = tcp_addr(
            server
                .listen(ListenOptions::default())
                .await
                .expect("listen"),
        );
        assert!(addr.ip().is_unspecified());
        assert_ne!(addr.port(), 0);
    }

    #[tokio::test]
    async fn net_connect_with_options_and_allow_half_open() {
        // The server writes, then ends its side; a half-open client can still write back.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = Server::with_options(
            ServerOptions {
                allow_half_open: true,
                ..ServerOptions::default()
            },
            move |mut socket| {
                let tx = tx.clone();
                async move {
                    let _ = socket.write_all(b"bye").await;
                    let _ = socket.shutdown().await;
                    let mut rest = Vec::new();
                    let _ = socket.read_to_end(&mut rest).await;
                    let _ = tx.send(rest);
                }
            },
        );
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        let options = crate::net::ConnectOptions::port(addr.port())
            .host("127.0.0.1")
            .allow_half_open(true);
        let mut client = crate::net::connect(options)
            .await
            .expect("net.connect(options)");
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .await
            .expect("read to the server's end");
        assert_eq!(got, b"bye");
        // Half-open: our side is still writable after the server's FIN.
        client.write_all(b"after").await.expect("still writable");
        client.end(None).await.expect("end");
        let rest = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("server saw our end")
            .expect("open");
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn a_sockets_signal_destroys_it_and_fails_the_waiting_read() {
        let server = Server::new(|socket| async move {
            // Hold the connection open without writing.
            let mut socket = socket;
            let mut sink = Vec::new();
            let _ = socket.read_to_end(&mut sink).await;
        });
        let addr = tcp_addr(server.listen(local()).await.expect("listen"));
        let token = tokio_util::sync::CancellationToken::new();
        let options = crate::net::ConnectOptions::port(addr.port())
            .host("127.0.0.1")
            .signal(token.clone());
        let mut client = crate::net::connect(options).await.expect("connect");
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the read ends when the signal fires")
            .expect_err("aborted");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(err.to_string().contains("AbortError"), "{err}");
        assert!(client.destroyed());
        // A token cancelled before connecting fails the connect.
        let err = crate::net::connect(
            crate::net::ConnectOptions::port(addr.port())
                .host("127.0.0.1")
                .signal(token),
        )
        .await
        .expect_err("already aborted");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn address_is_none_before_listening() {
        let server = echo();
        assert!(server.address().is_none());
        assert!(!server.listening());
        assert_eq!(
            server.close().expect_err("not running").kind(),
            io::ErrorKind::NotConnected
        );
    }

    #[tokio::test]
    async fn bind_error_names_the_address_and_leaves_the_server_reusable() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let server = echo();
        let err = server.listen(addr).await.expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(!server.listening());
        server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await
            .expect("retry");
    }
}
