//! The worker side of a cluster: which side a process is on, the handshake with the primary,
//! listen queries, and the shutdown signal.
//!
//! A process is a worker when the primary started it with [`env::WORKER_ID`] and
//! [`env::CHANNEL_FD`] in its environment. [`role`] tells which side a program is on (Node's
//! `cluster.isPrimary` / `cluster.isWorker`); [`worker`] connects to the primary the first time
//! it is called and returns the same connection afterwards.
//!
//! When the primary asks the worker to stop (or the channel closes because the primary died, or
//! the worker gets `SIGINT`/`SIGTERM`), [`Worker::shutdown_requested`] completes: every
//! [`Server`](crate::net::Server) of the process stops accepting and finishes its connections;
//! a worker still running when the drain deadline has passed exits anyway.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcluster_protocol::listening::ListenError;
use netcluster_protocol::message::{
    BoundAddress, CountError, Grant, HandleKind, ListenKey, ListenParams, ListenerStats,
    PROTOCOL_VERSION, ToPrimary, ToWorker, monotonic_ms,
};
use netcluster_protocol::{Channel, env};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, mpsc, oneshot, watch};

/// How long a worker stopping on `SIGINT`/`SIGTERM` waits to tell the primary so.
const SIGNAL_ANNOUNCE_TIMEOUT: Duration = Duration::from_millis(100);

/// Which side of a cluster this process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started by a primary: this process binds its own sockets (or is the primary).
    Primary,
    /// Started by a primary, with this worker id.
    Worker {
        /// The id the primary gave this worker (1, 2, …).
        id: u32,
    },
}

/// Tells which side this process is on, from its environment.
///
/// ```
/// use netcluster_worker::cluster::{role, Role};
/// if let Role::Worker { id } = role() {
///     println!("worker {id}");
/// }
/// ```
///
/// A process is a worker when its environment names a worker id and a channel descriptor that
/// really is a `SOCK_SEQPACKET` socket made by the primary named there (`SO_PEERCRED`); a
/// program a worker starts inherits the environment but not the channel (it is close-on-exec
/// from before `main`), so it is not a worker. A worker whose primary has died stays a worker
/// (and stops, finding the channel closed). The answer is decided on the first call and kept, so a worker whose primary
/// has died (and that was re-parented) does not turn into a primary.
pub fn role() -> Role {
    static ROLE: std::sync::OnceLock<Role> = std::sync::OnceLock::new();
    *ROLE.get_or_init(|| {
        let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
        let Some(id) = var(env::WORKER_ID) else {
            return Role::Primary;
        };
        let channel = std::env::var(env::CHANNEL_FD)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        // A worker id alone does not make a worker: without a channel to a primary the process
        // could do nothing a worker does.
        let Some(fd) = channel.filter(|&fd| netcluster_protocol::fd::is_seqpacket(fd)) else {
            return Role::Primary;
        };
        // The channel is a socketpair the primary made: its peer's credentials name the
        // primary, even after the primary died (a parent check would turn an orphaned worker
        // into a second primary).
        match var(env::PRIMARY_PID) {
            Some(primary) if netcluster_protocol::fd::peer_pid(fd) != Some(primary) => {
                Role::Primary
            }
            _ => Role::Worker { id },
        }
    })
}

/// True when this process was started by a netcluster primary.
pub fn is_worker() -> bool {
    matches!(role(), Role::Worker { .. })
}

/// Why the worker is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The primary sent `Shutdown`.
    Requested,
    /// The channel closed: the primary is gone.
    PrimaryGone,
    /// The worker received `SIGINT` or `SIGTERM`.
    Signal,
}

/// What the primary granted a listen: the socket itself (shared), a round-robin listener, or an
/// address to bind with `SO_REUSEPORT`.
#[derive(Debug)]
pub(crate) struct Granted {
    pub fd: Option<OwnedFd>,
    pub address: BoundAddress,
    pub grant: Grant,
    /// With a round-robin grant: the hand-offs, registered as the grant arrived so that no
    /// connection sent right after it finds nobody to take it.
    pub handoffs: Option<Handoffs>,
}

type Pending = HashMap<u64, (ListenKey, oneshot::Sender<io::Result<Granted>>)>;

/// A handle the primary sent with a message (`worker.send(message, handle)` in Node).
#[derive(Debug)]
pub enum ReceivedHandle {
    /// A listening socket: serve it with [`ReceivedServer::serve`].
    Server(ReceivedServer),
    /// A connected socket (boxed: a `Socket` is much larger than a listening handle).
    Socket(Box<crate::net::Socket>),
}

/// A handle to send to the primary with a message ([`Worker::send_handle`]); a
/// [`Server`](crate::net::Server) or a [`Socket`](crate::net::Socket) converts into one.
#[derive(Debug)]
pub enum OutgoingHandle {
    /// A listening server: its socket is duplicated, and the server goes on serving here.
    Server(crate::net::Server),
    /// A connected socket (boxed: a `Socket` is much larger than a server).
    Socket(Box<crate::net::Socket>),
}

impl From<crate::net::Server> for OutgoingHandle {
    fn from(server: crate::net::Server) -> OutgoingHandle {
        OutgoingHandle::Server(server)
    }
}

impl From<crate::net::Socket> for OutgoingHandle {
    fn from(socket: crate::net::Socket) -> OutgoingHandle {
        OutgoingHandle::Socket(Box::new(socket))
    }
}

/// A listening socket received from the primary.
#[derive(Debug)]
pub struct ReceivedServer {
    fd: OwnedFd,
    address: BoundAddress,
}

impl ReceivedServer {
    /// Where the socket is bound.
    pub fn address(&self) -> &BoundAddress {
        &self.address
    }

    /// A [`Server`](crate::net::Server) running `handler` on this socket.
    ///
    /// # Errors
    /// When the descriptor cannot listen (see [`Server::listen_handle`](crate::net::Server::listen_handle)).
    pub async fn serve<F, Fut>(self, handler: F) -> io::Result<crate::net::Server>
    where
        F: Fn(crate::net::Socket) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let server = crate::net::Server::new(handler);
        server.listen_handle(&self.fd).await?;
        Ok(server)
    }

    /// The descriptor itself.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// A user message as it arrived, with the handle sent along, if any.
type Incoming = (Vec<u8>, Option<ReceivedHandle>);

/// Connections handed over on one round-robin listener: (hand-off number, descriptor).
pub(crate) type Handoffs = mpsc::UnboundedReceiver<(u64, OwnedFd)>;

/// A server's figures on a shared listener, read when the primary asks.
#[derive(Debug)]
struct Counter {
    key: ListenKey,
    /// Open connections; the sender closes when the server and its connections are gone.
    open: watch::Receiver<usize>,
    /// Connections accepted.
    served: Arc<AtomicU64>,
}

/// This process's connection to its primary.
#[derive(Debug)]
pub struct Worker {
    id: u32,
    channel: Arc<Channel>,
    seq: AtomicU64,
    port0_ordinal: AtomicU32,
    pending: Mutex<Pending>,
    drain_timeout_ms: AtomicU64,
    stop: watch::Sender<Option<StopReason>>,
    /// Round-robin listeners of this process's servers, by the primary's listener id.
    round_robin: Mutex<HashMap<u64, mpsc::UnboundedSender<(u64, OwnedFd)>>>,
    /// Connection counters of the servers sharing a primary's socket, by key.
    counters: Mutex<Vec<Counter>>,
    /// Cluster-wide count requests waiting for the primary's answer.
    counts: Mutex<HashMap<u64, oneshot::Sender<Result<u64, CountError>>>>,
    /// Sockets received from the primary that are still open, by the primary's server.
    received: Arc<Mutex<HashMap<u64, usize>>>,
    /// Dropped when the channel closes, so `recv` then returns `None`.
    messages_tx: Mutex<Option<mpsc::UnboundedSender<Incoming>>>,
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
}

static WORKER: OnceCell<Arc<Worker>> = OnceCell::const_new();

/// This process's connection to the primary, made (handshake included) on the first call.
///
/// Returns `Ok(None)` when the process is not a worker.
///
/// # Errors
/// When the environment names a descriptor that is not a channel, or the handshake fails (the
/// primary speaks another protocol version, or closed the channel).
///
/// # Cancel safety
/// Cancel safe: the handshake runs in a task of its own, which finishes it and keeps the
/// connection even when the caller's future is dropped midway (a `listen` in a
/// `tokio::select!` that another branch won), so a later call gets the same connection.
pub async fn worker() -> io::Result<Option<Arc<Worker>>> {
    let Role::Worker { id } = role() else {
        return Ok(None);
    };
    if let Some(w) = WORKER.get() {
        return Ok(Some(w.clone()));
    }
    // The channel was claimed from the environment once and for all: a handshake dropped
    // halfway would close it and leave the process a worker with no way to its primary.
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other(format!(
            "worker {id}: the cluster connection needs a tokio runtime"
        ))
    })?;
    let connect = runtime.spawn(async move {
        WORKER
            .get_or_try_init(|| Worker::connect(id))
            .await
            .cloned()
    });
    match connect.await {
        Ok(result) => result.map(Some),
        Err(e) => Err(io::Error::other(format!(
            "worker {id}: the handshake task failed: {e}"
        ))),
    }
}

impl Worker {
    async fn connect(id: u32) -> io::Result<Arc<Worker>> {
        let fd_var = std::env::var(env::CHANNEL_FD).unwrap_or_default();
        let fd: i32 = fd_var.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}={fd_var:?} is not a descriptor number", env::CHANNEL_FD),
            )
        })?;
        let owned = netcluster_protocol::fd::claim_inherited(fd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}={fd}: cannot take the channel: {e}", env::CHANNEL_FD),
            )
        })?;
        let channel = Channel::from_fd(owned).map_err(io::Error::other)?;
        channel
            .send(
                &ToPrimary::Hello {
                    version: PROTOCOL_VERSION,
                    pid: std::process::id(),
                    worker_id: id,
                },
                &[],
            )
            .await
            .map_err(|e| io::Error::other(format!("worker {id}: handshake: {e}")))?;
        let drain = match channel.recv::<ToWorker>().await {
            Ok(Some((
                ToWorker::Welcome {
                    version,
                    drain_timeout_ms,
                },
                _,
            ))) => {
                if version != PROTOCOL_VERSION {
                    return Err(io::Error::other(format!(
                        "worker {id}: primary speaks protocol {version}, this worker {PROTOCOL_VERSION}"
                    )));
                }
                drain_timeout_ms
            }
            Ok(Some((other, _))) => {
                return Err(io::Error::other(format!(
                    "worker {id}: expected Welcome from the primary, got {other:?}"
                )));
            }
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("worker {id}: the primary closed the channel during the handshake"),
                ));
            }
            Err(e) => return Err(io::Error::other(format!("worker {id}: handshake: {e}"))),
        };
        let (stop, _) = watch::channel(None);
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let worker = Arc::new(Worker {
            id,
            channel: Arc::new(channel),
            seq: AtomicU64::new(1),
            port0_ordinal: AtomicU32::new(0),
            pending: Mutex::new(HashMap::new()),
            drain_timeout_ms: AtomicU64::new(drain),
            stop,
            round_robin: Mutex::new(HashMap::new()),
            counters: Mutex::new(Vec::new()),
            counts: Mutex::new(HashMap::new()),
            received: Arc::new(Mutex::new(HashMap::new())),
            messages_tx: Mutex::new(Some(messages_tx)),
            messages: tokio::sync::Mutex::new(messages),
        });
        tokio::spawn(Worker::read_loop(worker.clone()));
        tokio::spawn(Worker::watch_signals(worker.clone()));
        tokio::spawn(Worker::enforce_deadline(worker.clone()));
        tracing::debug!(worker = id, "connected to the primary");
        Ok(worker)
    }

    /// The id the primary gave this worker.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// How long open connections may take to finish once the worker stops.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms.load(Ordering::Relaxed))
    }

    /// Completes when the worker has been asked to stop, with the reason.
    ///
    /// # Cancel safety
    /// Cancel safe: it reads a state (the stop reason, once set, stays set) and takes nothing,
    /// so a dropped future loses nothing, and every call after the stop completes at once with
    /// the same reason.
    pub async fn shutdown_requested(&self) -> StopReason {
        let mut rx = self.stop.subscribe();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return StopReason::PrimaryGone;
            }
        }
    }

    /// Sends a message to the primary (Node's `process.send(message)`); it arrives there as a
    /// [`Event::Message`](../../netcluster_primary/cluster/enum.Event.html) from this worker.
    ///
    /// # Errors
    /// `InvalidData` when the value cannot be serialized, or its encoding is larger than a
    /// frame allows (64 KiB); the channel's error when the primary is gone.
    ///
    /// # Cancel safety
    /// As [`Channel::send`]: a dropped future has sent the whole message or none of it.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> io::Result<()> {
        let data = postcard::to_allocvec(message)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message: {e}")))?;
        self.channel
            .send(&ToPrimary::Message { data, handle: None }, &[])
            .await
            .map_err(|e| io::Error::other(format!("worker {}: send: {e}", self.id)))
    }

    /// `process.send(message, handle)`: sends a user message with a listening server or a
    /// connected socket; it arrives in the primary as an
    /// [`Event::Message`](../../netcluster_primary/cluster/enum.Event.html) whose message has
    /// the handle (`UserMessage::handle`).
    ///
    /// A server goes on listening here; the primary gets a duplicate of its socket. A socket is
    /// closed here once sent unless `keep_open` (Node's `{ keepOpen }`); either way the server
    /// that accepted it stops counting it (unlike Node, where the sending server's
    /// `getConnections` goes on counting a socket the other process keeps open).
    ///
    /// The primary checks the descriptor (a server must be listening, a socket connected) and
    /// holds at most 64 of one worker's handles at once (`MAX_HELD_HANDLES`): beyond, the
    /// message arrives without its handle.
    ///
    /// # Errors
    /// `InvalidInput` when the server is not listening or the socket has no connection;
    /// `Unsupported` for a server served round robin (the primary holds its socket, this
    /// process none); otherwise as [`Worker::send`].
    ///
    /// # Cancel safety
    /// As [`Worker::send`]; a socket is closed (without `keep_open`) only once it was sent.
    pub async fn send_handle<T: Serialize + ?Sized>(
        &self,
        message: &T,
        handle: impl Into<OutgoingHandle>,
        keep_open: bool,
    ) -> io::Result<()> {
        let data = postcard::to_allocvec(message)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message: {e}")))?;
        let sent = |e: netcluster_protocol::ChannelError| {
            io::Error::other(format!("worker {}: send_handle: {e}", self.id))
        };
        match handle.into() {
            OutgoingHandle::Server(server) => {
                let address = server.address().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "send_handle: the server is not listening",
                    )
                })?;
                let fd = server.handle()?;
                let msg = ToPrimary::Message {
                    data,
                    handle: Some(HandleKind::Server { address }),
                };
                self.channel.send(&msg, &[fd.as_fd()]).await.map_err(sent)
            }
            OutgoingHandle::Socket(mut socket) => {
                let fd = socket.fd().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "send_handle: the socket has no connection",
                    )
                })?;
                let msg = ToPrimary::Message {
                    data,
                    handle: Some(HandleKind::Socket { origin: None }),
                };
                self.channel.send(&msg, &[fd]).await.map_err(sent)?;
                if !keep_open {
                    socket.destroy(None);
                }
                Ok(())
            }
        }
    }

    /// The next message from the primary (Node's `process.on('message')`), decoded as `T`;
    /// `Ok(None)` once the primary is gone.
    ///
    /// # Errors
    /// `InvalidData` naming the type when the message does not decode as `T` (the message is
    /// consumed).
    /// A handle that came with the message is closed; use [`Worker::recv_with_handle`] to
    /// keep it.
    ///
    /// # Cancel safety
    /// As [`Worker::recv_with_handle`]: cancel safe.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<T>> {
        Ok(self
            .recv_with_handle()
            .await?
            .map(|(message, _handle)| message))
    }

    /// The next message from the primary with the handle sent along (Node's
    /// `process.on('message', (message, handle) => …)`); `Ok(None)` once the primary is gone.
    ///
    /// # Errors
    /// `InvalidData` naming the type when the message does not decode as `T` (the message and
    /// its handle are dropped).
    ///
    /// # Cancel safety
    /// Cancel safe: messages wait in a queue that the channel's task fills, and one is taken
    /// (tokio's `mpsc::Receiver::recv`, behind a `tokio::sync::Mutex` for concurrent callers)
    /// and decoded in the poll that returns it. A dropped future leaves every message, and its
    /// handle, queued for the next call.
    pub async fn recv_with_handle<T: DeserializeOwned>(
        &self,
    ) -> io::Result<Option<(T, Option<ReceivedHandle>)>> {
        let Some((data, handle)) = self.messages.lock().await.recv().await else {
            return Ok(None);
        };
        postcard::from_bytes(&data)
            .map(|m| Some((m, handle)))
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "message from the primary is not a {}: {e}",
                        std::any::type_name::<T>()
                    ),
                )
            })
    }

    /// Sends raw bytes (and descriptors) to the primary, bypassing the codec: for tests of the
    /// primary's handling of bad frames.
    ///
    /// # Errors
    /// The channel's error.
    #[doc(hidden)]
    pub async fn send_raw_frame(
        &self,
        bytes: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        self.channel
            .send_raw(bytes, fds)
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Disconnects from the primary by itself (`cluster.worker.disconnect()`): every server of
    /// this process closes, open connections finish (within the drain deadline), and the
    /// primary records that the worker exited after a disconnect.
    pub async fn disconnect(&self) {
        if let Err(e) = self.channel.send(&ToPrimary::Disconnect, &[]).await {
            tracing::debug!(worker = self.id, "cannot announce the disconnect: {e}");
        }
        self.request_stop(StopReason::Requested, None);
    }

    /// Receives the connections the primary hands over on round-robin listener `listener`.
    pub(crate) fn register_round_robin(&self, listener: u64) -> Handoffs {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.round_robin).insert(listener, tx);
        rx
    }

    /// No more connections for `listener` here (answered "not accepted" from now on).
    pub(crate) fn unregister_round_robin(&self, listener: u64) {
        lock(&self.round_robin).remove(&listener);
    }

    /// Answers round-robin hand-offs on `listener`, all in one message.
    pub(crate) async fn answer_handoffs(
        &self,
        listener: u64,
        accepted: Vec<u64>,
        refused: Vec<u64>,
    ) {
        if accepted.is_empty() && refused.is_empty() {
            return;
        }
        let reply = ToPrimary::Accepted {
            listener,
            accepted,
            refused,
        };
        if let Err(e) = self.channel.send(&reply, &[]).await {
            tracing::debug!(worker = self.id, "cannot answer a hand-off: {e}");
        }
    }

    /// Counts a server's connections under `key` when the primary asks.
    pub(crate) fn register_counter(
        &self,
        key: ListenKey,
        open: watch::Receiver<usize>,
        served: Arc<AtomicU64>,
    ) {
        lock(&self.counters).push(Counter { key, open, served });
    }

    /// This worker's open connections on `key` (servers that are gone are forgotten).
    fn local_count(&self, key: &ListenKey) -> u64 {
        let mut counters = lock(&self.counters);
        // A closed sender means the server and all its connections are gone.
        counters.retain(|c| c.open.has_changed().is_ok());
        counters
            .iter()
            .filter(|c| &c.key == key)
            .map(|c| *c.open.borrow() as u64)
            .sum()
    }

    /// Open and served connections per shared listener, for the primary's status.
    fn stats(&self) -> Vec<ListenerStats> {
        let mut counters = lock(&self.counters);
        counters.retain(|c| c.open.has_changed().is_ok());
        let mut out: Vec<ListenerStats> = Vec::new();
        for c in counters.iter() {
            let open = *c.open.borrow() as u64;
            let served = c.served.load(Ordering::Relaxed);
            match out.iter_mut().find(|s| s.key == c.key) {
                Some(s) => {
                    s.open = s.open.saturating_add(open);
                    s.served = s.served.saturating_add(served);
                }
                None => out.push(ListenerStats {
                    key: c.key.clone(),
                    open,
                    served,
                }),
            }
        }
        out
    }

    /// The open connections on `key` summed over every worker of the cluster (what Node
    /// cannot tell: nodejs/node#48333). The primary asks each worker sharing the key.
    ///
    /// # Errors
    /// When a worker exits before replying (Node's `ERR_CHILD_CLOSED_BEFORE_REPLY`), a worker
    /// does not answer in time, or the primary is gone.
    pub(crate) async fn cluster_connections(&self, key: &ListenKey) -> io::Result<usize> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.counts).insert(seq, tx);
        let request = ToPrimary::CountRequest {
            seq,
            key: key.clone(),
        };
        if let Err(e) = self.channel.send(&request, &[]).await {
            lock(&self.counts).remove(&seq);
            return Err(io::Error::other(format!("getConnections {key}: {e}")));
        }
        match rx.await {
            Ok(Ok(n)) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            Ok(Err(e)) => Err(io::Error::other(format!("getConnections {key}: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("getConnections {key}: the primary closed the channel before replying"),
            )),
        }
    }

    /// A receiver that changes once the worker is asked to stop (for servers to watch).
    pub(crate) fn stop_signal(&self) -> watch::Receiver<Option<StopReason>> {
        self.stop.subscribe()
    }

    fn request_stop(&self, reason: StopReason, drain_ms: Option<u64>) {
        if let Some(ms) = drain_ms {
            self.drain_timeout_ms.store(ms, Ordering::Relaxed);
        }
        self.stop.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The ordinal of the next port-0 listen of this process.
    pub(crate) fn next_port0_ordinal(&self) -> u32 {
        self.port0_ordinal.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the primary for the shared listening socket of `key`.
    pub(crate) async fn query_listen(
        &self,
        key: ListenKey,
        params: ListenParams,
    ) -> io::Result<Granted> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, (key.clone(), tx));
        let target = key.target.clone();
        // Dropped unsent (this future was, while the channel was full), the request is
        // forgotten; once sent, its entry stays for the answer (see below).
        let mut unsent = Unsent {
            pending: &self.pending,
            seq,
            armed: true,
        };
        let sent = self
            .channel
            .send(&ToPrimary::Listen { seq, key, params }, &[])
            .await;
        if let Err(e) = sent {
            return Err(io::Error::other(format!(
                "listen {target}: cannot ask the primary: {e}"
            )));
        }
        unsent.armed = false;
        // If this future is dropped (the listen was abandoned), `tx` finds the receiver gone and
        // the late descriptor is closed when the reply is dropped.
        rx.await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("listen {target}: the primary closed the channel before replying"),
            ))
        })
    }

    /// Tells the primary this worker no longer listens on `key`.
    pub(crate) async fn leave(&self, key: ListenKey) {
        if let Err(e) = self.channel.send(&ToPrimary::Close { key }, &[]).await {
            tracing::debug!(
                worker = self.id,
                "cannot tell the primary about a close: {e}"
            );
        }
    }

    async fn read_loop(self: Arc<Self>) {
        // However this task ends (the channel closes, or a panic unwinds it), the worker stops:
        // nothing between the primary's death and the worker's shutdown may fail.
        let _stop = StopWhenDone(&self);
        loop {
            match self.channel.recv::<ToWorker>().await {
                Ok(Some((msg, fds))) => self.dispatch(msg, fds).await,
                Ok(None) => break,
                Err(e) if e.is_bad_frame() => {
                    tracing::warn!(
                        worker = self.id,
                        "dropped a bad frame from the primary: {e}"
                    );
                }
                Err(e) => {
                    self.channel_gone();
                    tracing::warn!(worker = self.id, "channel to the primary failed: {e}");
                    return;
                }
            }
        }
        self.channel_gone();
        tracing::info!(worker = self.id, "the primary closed the channel; stopping");
    }

    /// The channel is gone: nobody will answer outstanding requests or send more messages, and
    /// the worker stops. Takes no lock that a panicking holder could leave unusable and writes
    /// no log.
    fn channel_gone(&self) {
        self.request_stop(StopReason::PrimaryGone, None);
        lock(&self.pending).clear();
        lock(&self.counts).clear();
        lock(&self.messages_tx).take();
    }

    async fn dispatch(&self, msg: ToWorker, fds: Vec<OwnedFd>) {
        match msg {
            ToWorker::ListenOk {
                seq,
                address,
                grant,
            } => {
                let Some((key, tx)) = lock(&self.pending).remove(&seq) else {
                    tracing::debug!(worker = self.id, seq, "reply to an unknown listen dropped");
                    return;
                };
                // The channel checked that a Shared grant brought exactly one descriptor.
                let handoffs = match grant {
                    Grant::RoundRobin { listener } => Some(self.register_round_robin(listener)),
                    _ => None,
                };
                let granted = Granted {
                    fd: fds.into_iter().next(),
                    address,
                    grant,
                    handoffs,
                };
                if let Err(Ok(granted)) = tx.send(Ok(granted)) {
                    if let Grant::RoundRobin { listener } = granted.grant {
                        self.unregister_round_robin(listener);
                    }
                    // The listen was abandoned (the server closed) before the answer came
                    // (test-net-server-close-before-ipc-response): the descriptor was closed
                    // with the dropped answer; give the membership back too.
                    tracing::debug!(
                        worker = self.id,
                        seq,
                        "late listen reply closed and dropped"
                    );
                    self.leave(key).await;
                }
            }
            ToWorker::Connections {
                listener,
                seqs,
                expires_ms,
            } => {
                // Past their deadline the primary may have given the connections to other
                // workers: close these copies and say no, so none is ever served twice.
                let late = monotonic_ms() > expires_ms;
                let mut refused = Vec::new();
                {
                    let servers = lock(&self.round_robin);
                    let tx = servers.get(&listener).filter(|_| !late);
                    // The channel checked that one descriptor came per number.
                    for (seq, fd) in seqs.into_iter().zip(fds) {
                        if tx.is_none_or(|tx| tx.send((seq, fd)).is_err()) {
                            refused.push(seq);
                        }
                    }
                }
                // No server takes them (it closed): the primary gives them to other workers.
                self.answer_handoffs(listener, Vec::new(), refused).await;
            }
            ToWorker::ListenErr {
                seq,
                address,
                errno,
                message,
            } => {
                if let Some((_, tx)) = lock(&self.pending).remove(&seq) {
                    let source = if errno != 0 {
                        io::Error::from_raw_os_error(errno)
                    } else {
                        io::Error::other(message)
                    };
                    let _ = tx.send(Err(ListenError::new(address, source).into()));
                }
            }
            ToWorker::Shutdown { drain_timeout_ms } => {
                tracing::info!(worker = self.id, "asked to stop by the primary");
                self.request_stop(StopReason::Requested, Some(drain_timeout_ms));
            }
            ToWorker::Message { data } => self.deliver(data, None),
            ToWorker::Handle { data, kind } => {
                // The channel checked that exactly one descriptor came with it.
                let Some(fd) = fds.into_iter().next() else {
                    return;
                };
                let handle = match kind {
                    HandleKind::Server { address } => {
                        ReceivedHandle::Server(ReceivedServer { fd, address })
                    }
                    HandleKind::Socket { origin } => match crate::net::Socket::from_received(fd) {
                        Ok(mut socket) => {
                            if let Some(origin) = origin {
                                // Counted for the sender's getConnections until it closes.
                                *lock(&self.received).entry(origin).or_default() += 1;
                                let received = self.received.clone();
                                socket.on_close(move || {
                                    if let Some(n) = lock(&received).get_mut(&origin) {
                                        *n = n.saturating_sub(1);
                                    }
                                });
                            }
                            ReceivedHandle::Socket(Box::new(socket))
                        }
                        Err(e) => {
                            tracing::warn!(worker = self.id, "a received socket is unusable: {e}");
                            return;
                        }
                    },
                };
                self.deliver(data, Some(handle));
            }
            ToWorker::CountSent { seq, origin } => {
                let count = lock(&self.received).get(&origin).copied().unwrap_or(0) as u64;
                if let Err(e) = self
                    .channel
                    .send(&ToPrimary::CountReply { seq, count }, &[])
                    .await
                {
                    tracing::debug!(worker = self.id, "cannot answer a count query: {e}");
                }
            }
            ToWorker::CountQuery { seq, key } => {
                let count = self.local_count(&key);
                if let Err(e) = self
                    .channel
                    .send(&ToPrimary::CountReply { seq, count }, &[])
                    .await
                {
                    tracing::debug!(worker = self.id, "cannot answer a count query: {e}");
                }
            }
            ToWorker::CountResult { seq, result } => {
                if let Some(tx) = lock(&self.counts).remove(&seq) {
                    let _ = tx.send(result);
                }
            }
            ToWorker::Ping { seq } => {
                if let Err(e) = self.channel.send(&ToPrimary::Pong { seq }, &[]).await {
                    tracing::debug!(worker = self.id, "cannot answer a ping: {e}");
                }
            }
            ToWorker::StatsQuery { seq } => {
                let listeners = self.stats();
                if let Err(e) = self
                    .channel
                    .send(&ToPrimary::Stats { seq, listeners }, &[])
                    .await
                {
                    tracing::debug!(worker = self.id, "cannot answer a stats query: {e}");
                }
            }
            ToWorker::Welcome { .. } => {
                tracing::warn!(worker = self.id, "unexpected second Welcome ignored");
            }
        }
    }

    /// Queues a user message for `recv` (nobody receiving yet is fine: it waits).
    fn deliver(&self, data: Vec<u8>, handle: Option<ReceivedHandle>) {
        if let Some(tx) = lock(&self.messages_tx).as_ref() {
            let _ = tx.send((data, handle));
        }
    }

    async fn watch_signals(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!(worker = self.id, "cannot install SIGINT/SIGTERM handlers");
            return;
        };
        let signal = tokio::select! {
            _ = int.recv() => nix::sys::signal::Signal::SIGINT as i32,
            _ = term.recv() => nix::sys::signal::Signal::SIGTERM as i32,
        };
        // Tell the primary first: it takes this worker out of its rotations at once and knows
        // the exit that follows was this worker's own (a Ctrl-C in a terminal reaches the
        // primary and every worker at the same moment). Bounded: a primary that does not read
        // (stopped) must not hold up the stop.
        let message = ToPrimary::Stopping { signal };
        let announce = self.channel.send(&message, &[]);
        match tokio::time::timeout(SIGNAL_ANNOUNCE_TIMEOUT, announce).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(worker = self.id, "cannot announce the stop: {e}"),
            Err(_) => tracing::debug!(
                worker = self.id,
                "the primary did not take the stop's announcement"
            ),
        }
        self.request_stop(StopReason::Signal, None);
    }

    /// Once a stop is requested, gives the process its drain deadline and then ends it.
    async fn enforce_deadline(self: Arc<Self>) {
        let reason = self.shutdown_requested().await;
        let deadline = self.drain_timeout();
        tokio::time::sleep(deadline).await;
        // Exits even if the log write below fails or panics (a stderr whose reader is gone).
        let _exit = ExitWhenDone;
        tracing::warn!(
            worker = self.id,
            ?reason,
            "connections still open after the {deadline:?} drain deadline; exiting"
        );
    }
}

/// Forgets listen request `seq` when dropped: one that never reached the primary gets no
/// answer.
struct Unsent<'a> {
    pending: &'a Mutex<Pending>,
    seq: u64,
    armed: bool,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.pending).remove(&self.seq);
        }
    }
}

/// Stops the worker when dropped: at the end of the channel task, however it ends.
struct StopWhenDone<'a>(&'a Worker);

impl Drop for StopWhenDone<'_> {
    fn drop(&mut self) {
        self.0.channel_gone();
    }
}

/// Ends the process when dropped (also while unwinding).
struct ExitWhenDone;

impl Drop for ExitWhenDone {
    fn drop(&mut self) {
        std::process::exit(0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
