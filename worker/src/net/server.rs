//! `net.Server`: listens, runs a handler per connection, closes gracefully.
//!
//! Node's events map to Rust like this: [`Server::listen`] resolving is `'listening'`, the
//! handler given to [`Server::new`] is the `'connection'` listener, [`Server::closed`]
//! completing is `'close'`, and errors are `Result`s.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcluster_protocol::message::{BoundAddress, ListenKey};
use tokio::sync::{oneshot, watch};

use super::listen::{self, ListenOptions};
use super::socket::Socket;
use crate::cluster::{self, StopReason};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
type Handler = Arc<dyn Fn(Socket) -> BoxFuture + Send + Sync>;

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

struct Inner {
    handler: Handler,
    state: Mutex<Option<Listening>>,
    /// Accept loops plus open connections; `closed()` waits for zero.
    active: watch::Sender<usize>,
    connections: watch::Sender<usize>,
}

struct Listening {
    address: BoundAddress,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    /// A server that runs `handler` for every connection (Node's `'connection'` listener).
    pub fn new<F, Fut>(handler: F) -> Server
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |socket| Box::pin(handler(socket)));
        Server {
            inner: Arc::new(Inner {
                handler,
                state: Mutex::new(None),
                active: watch::Sender::new(0),
                connections: watch::Sender::new(0),
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
    pub async fn listen(&self, options: impl Into<ListenOptions>) -> io::Result<BoundAddress> {
        let options = options.into();
        if let Some(l) = lock(&self.inner.state).as_ref() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("server is already listening on {}", l.address),
            ));
        }
        let stop_signal = cluster::worker().await?.map(|w| w.stop_signal());
        let acquired = listen::acquire(&options).await?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let address = acquired.address.clone();
        {
            let mut state = lock(&self.inner.state);
            if let Some(l) = state.as_ref() {
                // A concurrent listen won the race; ours is closed by dropping it.
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("server is already listening on {}", l.address),
                ));
            }
            *state = Some(Listening {
                address: address.clone(),
                stop: Some(stop_tx),
            });
        }
        let listener = match Listener::from_fd(acquired.fd, &address) {
            Ok(l) => l,
            Err(e) => {
                *lock(&self.inner.state) = None;
                return Err(e);
            }
        };
        self.inner.active.send_modify(|n| *n += 1);
        tokio::spawn(accept_loop(
            self.inner.clone(),
            listener,
            stop_rx,
            stop_signal,
            acquired.shared_key,
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

    /// Open connections of this server in this process (`server.getConnections()`).
    pub fn connections(&self) -> usize {
        *self.inner.connections.borrow()
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

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    fn from_fd(fd: std::os::fd::OwnedFd, address: &BoundAddress) -> io::Result<Listener> {
        match address {
            BoundAddress::Tcp(_) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Listener::Tcp(tokio::net::TcpListener::from_std(std)?))
            }
            BoundAddress::Unix(_) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Listener::Unix(tokio::net::UnixListener::from_std(std)?))
            }
        }
    }

    async fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                Ok(Socket::tcp(s))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Socket::unix(s))
            }
        }
    }
}

/// Decrements the server's counters when a connection's task ends, however it ends.
struct ConnectionGuard(Arc<Inner>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n -= 1);
        self.0.active.send_modify(|n| *n -= 1);
    }
}

async fn accept_loop(
    inner: Arc<Inner>,
    listener: Listener,
    mut stop: oneshot::Receiver<()>,
    mut worker_stop: Option<watch::Receiver<Option<StopReason>>>,
    shared_key: Option<ListenKey>,
    unlink: Option<PathBuf>,
) {
    let worker_stopping = async {
        match worker_stop.as_mut() {
            Some(rx) => {
                let _ = rx.wait_for(Option::is_some).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(worker_stopping);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = &mut worker_stopping => {
                // The worker is stopping: this server closes like server.close().
                lock(&inner.state).take();
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok(socket) => {
                    inner.connections.send_modify(|n| *n += 1);
                    inner.active.send_modify(|n| *n += 1);
                    let guard = ConnectionGuard(inner.clone());
                    let fut = (inner.handler)(socket);
                    tokio::spawn(async move {
                        fut.await;
                        drop(guard);
                    });
                    // Accept one connection per turn (libuv's UV_TCP_SINGLE_ACCEPT idea): the
                    // new connection's task runs before this loop accepts again, which leaves
                    // other processes sharing the socket their chance at the queue instead of
                    // one process draining a whole burst.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection; EMFILE clears when
                    // connections close. Either way, keep accepting after a breath.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
    if let Some(path) = unlink {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!("cannot remove {}: {e}", path.display());
        }
    }
    if let Some(key) = shared_key {
        if let Ok(Some(worker)) = cluster::worker().await {
            worker.leave(key).await;
        }
    }
    inner.active.send_modify(|n| *n -= 1);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
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
