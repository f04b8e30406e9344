//! The connection intake of a [`Server`](super::Server): where its connections come from and
//! what happens to each before the handler runs.
//!
//! - [`Listener`]: the sources — the server's own listening socket (TCP or Unix), the
//!   primary's shared socket accepted with `EPOLLEXCLUSIVE` ([`WakeOne`]) or by an accept
//!   thread ([`ExclusiveAccept`]), and round-robin hand-offs from the primary.
//! - [`accept_loop`]: one task per listen; it accepts until `close()`, the listen's `signal` or
//!   the worker's stop, then takes what already completed its handshake from the backlog,
//!   serves it, and gives the primary's socket back.
//! - Per connection (`serve_incoming`): `maxConnections` (a drop and Node's `'drop'` event, or
//!   for a round-robin hand-off a refusal that sends it to another worker), the server's
//!   options, the connection counters, and the answers to the primary's hand-offs, one message
//!   per message of hand-offs.
//!
//! The Node API that drives all this is in `server.rs`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use netcluster_protocol::fd::{accept_nonblocking, register_async};
use netcluster_protocol::message::{BoundAddress, ListenKey};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use super::listen;
use super::server::{DropInfo, Inner, ServerOptions, lock};
use super::socket::Socket;
use crate::cluster::{Handoffs, StopReason, Worker};
use crate::net::SocketType;
use crate::net::exclusive::{ExclusiveAccept, accept_queued};
use crate::net::wake_one::WakeOne;

/// Where a server's connections come from.
pub(super) enum Listener {
    /// With the family its connections have. Accepted with `accept4` as it stands (not
    /// tokio's `TcpListener`, which registers every connection with the event loop): a
    /// connection registers only once it has to wait (see `net::tcp`).
    Tcp(AsyncFd<OwnedFd>, SocketType),
    /// The primary's socket, shared by every worker, in this event loop's epoll set with
    /// `EPOLLEXCLUSIVE`: the kernel wakes one idle worker per connection, in turn.
    WakeOne(WakeOne, SocketType),
    /// The same, accepted on by a thread of this worker that the kernel wakes alone (where
    /// the event loop's registration cannot be changed).
    Exclusive(ExclusiveAccept, SocketType),
    Unix(tokio::net::UnixListener),
    /// Connections handed over by the primary (round robin).
    RoundRobin {
        /// The primary's id for the listener.
        id: u64,
        handoffs: Handoffs,
        kind: SocketType,
        worker: Arc<Worker>,
    },
}

/// An accepted connection, and for a round-robin hand-off the (listener id, seq) to answer.
struct Incoming {
    socket: Socket,
    handoff: Option<(u64, u64)>,
}

impl Listener {
    /// The intake for what a listen acquired.
    pub(super) fn new(
        source: listen::Source,
        address: &BoundAddress,
        worker: Option<Arc<Worker>>,
    ) -> io::Result<Listener> {
        let source = match source {
            listen::Source::Shared(fd) => {
                // The primary's socket, as it adopted it (systemd's arrive blocking): accepting
                // here never waits in accept(2).
                SockRef::from(&fd).set_nonblocking(true)?;
                let kind = match address {
                    BoundAddress::Tcp(a) => tcp_kind(a),
                    BoundAddress::Unix(_) => SocketType::Unix,
                };
                match fd.try_clone().and_then(WakeOne::start) {
                    Ok(one) => return Ok(Listener::WakeOne(one, kind)),
                    Err(e) => tracing::debug!("no EPOLLEXCLUSIVE in the event loop: {e}"),
                }
                match fd.try_clone().and_then(ExclusiveAccept::start) {
                    Ok(ex) => return Ok(Listener::Exclusive(ex, kind)),
                    Err(e) => {
                        // Accepting through tokio works too, only with every worker woken.
                        tracing::debug!("no exclusive accept on the shared socket: {e}");
                        listen::Source::Socket(fd)
                    }
                }
            }
            other => other,
        };
        match (source, address) {
            (listen::Source::Socket(fd), BoundAddress::Tcp(a)) => {
                SockRef::from(&fd).set_nonblocking(true)?;
                Ok(Listener::Tcp(
                    register_async(fd, Interest::READABLE)?,
                    tcp_kind(a),
                ))
            }
            (listen::Source::Socket(fd), BoundAddress::Unix(_)) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Listener::Unix(tokio::net::UnixListener::from_std(std)?))
            }
            (listen::Source::Shared(_), _) => Err(io::Error::other("a shared socket left over")),
            (listen::Source::RoundRobin(id, handoffs), address) => {
                let worker = worker.ok_or_else(|| {
                    io::Error::other("a round-robin grant outside a cluster worker")
                })?;
                let kind = match address {
                    BoundAddress::Tcp(a) => tcp_kind(a),
                    BoundAddress::Unix(_) => SocketType::Unix,
                };
                Ok(Listener::RoundRobin {
                    id,
                    handoffs,
                    kind,
                    worker,
                })
            }
        }
    }

    /// The next connection.
    ///
    /// Cancel safe for every connection (the accept loop awaits it in `tokio::select!` next to
    /// the stops): each source hands over a connection only in the poll that returns it. One
    /// answer can be lost: a round-robin hand-off whose descriptor is unusable is closed and
    /// refused here, and if the future is dropped while that refusal waits for room in the
    /// channel, the primary hears nothing; at the hand-off's deadline it gives the connection
    /// to another worker, so the client waits that long but is served once.
    async fn accept(&mut self) -> io::Result<Incoming> {
        match self {
            Listener::Tcp(l, kind) => loop {
                let mut ready = l.readable().await?;
                if let Ok(got) = ready.try_io(|l| accept_nonblocking(l.get_ref().as_fd())) {
                    return Ok(Incoming {
                        socket: accepted_socket(got?, *kind)?,
                        handoff: None,
                    });
                }
            },
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Incoming {
                    socket: Socket::unix(s),
                    handoff: None,
                })
            }
            Listener::WakeOne(one, kind) => Ok(Incoming {
                socket: accepted_socket(one.accept().await?, *kind)?,
                handoff: None,
            }),
            Listener::Exclusive(ex, kind) => match ex.accept().await {
                Some(got) => Ok(Incoming {
                    socket: accepted_socket(got?, *kind)?,
                    handoff: None,
                }),
                // The thread ended (it logged why): nothing more comes from it.
                None => std::future::pending().await,
            },
            Listener::RoundRobin {
                id,
                handoffs,
                kind,
                worker,
            } => loop {
                let Some((seq, fd)) = handoffs.recv().await else {
                    return std::future::pending().await;
                };
                match handed_over(*id, seq, fd, *kind) {
                    Some(incoming) => return Ok(incoming),
                    None => worker.answer_handoffs(*id, Vec::new(), vec![seq]).await,
                }
            },
        }
    }

    /// Back in the shared socket's wake-up queue after a connection's first turn (see
    /// `net::wake_one`).
    fn rejoin(&mut self) {
        if let Listener::WakeOne(one, _) = self {
            if let Err(e) = one.rejoin() {
                tracing::warn!("shared accept: cannot re-register the listener: {e}");
            }
        }
    }

    /// A hand-off that already arrived, without waiting (round robin only): the rest of the
    /// message the last one came in.
    fn handoff_now(&mut self, answers: &mut Answers) -> Option<Incoming> {
        let Listener::RoundRobin {
            id, handoffs, kind, ..
        } = self
        else {
            return None;
        };
        loop {
            let (seq, fd) = handoffs.try_recv().ok()?;
            match handed_over(*id, seq, fd, *kind) {
                Some(incoming) => return Some(incoming),
                None => answers.refused.push(seq),
            }
        }
    }

    /// A connection already waiting in the backlog, without waiting for one: `None` when there
    /// is none (or for round robin, whose backlog is the primary's).
    fn accept_now(&mut self) -> Option<io::Result<Incoming>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match self {
            Listener::Tcp(l, kind) => accept_queued(l.get_ref().as_fd()).map(|got| {
                Ok(Incoming {
                    socket: accepted_socket(got?, *kind)?,
                    handoff: None,
                })
            }),
            Listener::Unix(l) => match l.poll_accept(&mut cx) {
                std::task::Poll::Ready(Ok((s, _))) => Some(Ok(Incoming {
                    socket: Socket::unix(s),
                    handoff: None,
                })),
                std::task::Poll::Ready(Err(e)) => Some(Err(e)),
                std::task::Poll::Pending => None,
            },
            Listener::WakeOne(one, kind) => one.accept_now().map(|got| {
                Ok(Incoming {
                    socket: accepted_socket(got?, *kind)?,
                    handoff: None,
                })
            }),
            Listener::Exclusive(ex, kind) => ex.accept_now().map(|got| {
                Ok(Incoming {
                    socket: accepted_socket(got?, *kind)?,
                    handoff: None,
                })
            }),
            Listener::RoundRobin { .. } => None,
        }
    }

    /// Stops an accept thread and returns what it had accepted (to be served: those
    /// connections are this worker's now).
    async fn stop_intake(&mut self) -> Vec<Incoming> {
        let Listener::Exclusive(ex, kind) = self else {
            return Vec::new();
        };
        let kind = *kind;
        ex.stop()
            .await
            .into_iter()
            .filter_map(|got| match got.and_then(|fd| accepted_socket(fd, kind)) {
                Ok(socket) => Some(Incoming {
                    socket,
                    handoff: None,
                }),
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    None
                }
            })
            .collect()
    }

    /// Sends the answers to hand-offs (round robin only), in one message.
    async fn answer(&self, answers: Answers) {
        if let Listener::RoundRobin { worker, id, .. } = self {
            worker
                .answer_handoffs(*id, answers.accepted, answers.refused)
                .await;
        }
    }

    /// Stops round-robin intake: later hand-offs are answered "not accepted" by the worker,
    /// and those already queued here are answered now.
    async fn shut(self) {
        if let Listener::RoundRobin {
            id,
            mut handoffs,
            worker,
            ..
        } = self
        {
            worker.unregister_round_robin(id);
            handoffs.close();
            let mut refused = Vec::new();
            while let Some((seq, fd)) = handoffs.recv().await {
                drop(fd);
                refused.push(seq);
            }
            worker.answer_handoffs(id, Vec::new(), refused).await;
        }
    }
}

/// Hand-off `seq` of round-robin listener `id` as an incoming connection; `None` (logged) when
/// the descriptor is unusable, to be refused.
fn handed_over(id: u64, seq: u64, fd: OwnedFd, kind: SocketType) -> Option<Incoming> {
    match accepted_socket(fd, kind) {
        Ok(socket) => Some(Incoming {
            socket,
            handoff: Some((id, seq)),
        }),
        Err(e) => {
            tracing::warn!("a handed-over connection is unusable: {e}");
            None
        }
    }
}

/// A connection accepted with `SOCK_NONBLOCK` as a socket: by this process, by an accept
/// thread, or by the primary for a hand-off (the flag is one of the open file description,
/// which every copy shares), so it needs no `fcntl` here.
fn accepted_socket(fd: OwnedFd, kind: SocketType) -> io::Result<Socket> {
    if kind == SocketType::Unix {
        let std = std::os::unix::net::UnixStream::from(fd);
        Ok(Socket::unix(tokio::net::UnixStream::from_std(std)?))
    } else {
        Ok(Socket::accepted_tcp(std::net::TcpStream::from(fd), kind))
    }
}

/// The type of the connections a TCP listener bound to `address` accepts: its own family (an
/// IPv6 socket's IPv4 clients come as mapped addresses, still `tcp6`).
fn tcp_kind(address: &SocketAddr) -> SocketType {
    if address.is_ipv6() {
        SocketType::Tcp6
    } else {
        SocketType::Tcp4
    }
}

/// Answers to round-robin hand-offs, sent together.
#[derive(Debug, Default)]
struct Answers {
    accepted: Vec<u64>,
    refused: Vec<u64>,
}

impl Answers {
    fn note(&mut self, handoff: Option<(u64, u64)>, accepted: bool) {
        if let Some((_, seq)) = handoff {
            if accepted {
                self.accepted.push(seq);
            } else {
                self.refused.push(seq);
            }
        }
    }
}

/// Tells the primary this process no longer uses the shared socket of `key`.
pub(super) async fn leave_shared(worker: Option<&Arc<Worker>>, key: Option<ListenKey>) {
    if let (Some(worker), Some(key)) = (worker, key) {
        worker.leave(key).await;
    }
}

/// The primary's socket an accept loop serves, if it is one: left when the loop ends.
pub(super) struct Shared {
    pub key: Option<ListenKey>,
    pub worker: Option<Arc<Worker>>,
}

/// Ends the listening state if it is still this accept loop's (not a later listen's).
fn take_if_ours(inner: &Inner, generation: u64) {
    let mut state = lock(&inner.state);
    if state.as_ref().is_some_and(|l| l.generation == generation) {
        state.take();
    }
}

/// Applies the server's options to an accepted connection.
fn apply_options(options: &ServerOptions, socket: &mut Socket) {
    socket.set_allow_half_open(options.allow_half_open);
    if options.pause_on_connect {
        socket.pause();
    }
    if socket.socket_type() != Some(SocketType::Unix) {
        if options.no_delay {
            if let Err(e) = socket.set_no_delay(true) {
                tracing::debug!("TCP_NODELAY on an accepted socket: {e}");
            }
        }
        if options.keep_alive {
            if let Err(e) = socket.set_keep_alive(true, options.keep_alive_initial_delay) {
                tracing::debug!("SO_KEEPALIVE on an accepted socket: {e}");
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

/// The ways an accept loop is told to stop.
pub(super) struct Stops {
    /// `server.close()`.
    pub close: oneshot::Receiver<()>,
    /// The cluster worker is stopping.
    pub worker: Option<watch::Receiver<Option<StopReason>>>,
    /// The listen's `signal` was cancelled.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
}

/// Connections a stopping worker takes from a listener's backlog before closing it.
const BACKLOG_DRAIN: usize = 1024;

/// Notes a connection as taken; a round-robin one closes with `shutdown` from now on, since the
/// primary keeps its copy until it hears so.
fn taken(answers: &mut Answers, handoff: Option<(u64, u64)>, socket: &mut Socket) {
    answers.note(handoff, true);
    if handoff.is_some() {
        socket.close_with_shutdown();
    }
}

/// Runs the handler for an accepted connection, or drops it at `maxConnections`; the answer
/// to its hand-off (round robin) goes to `answers`.
fn serve_incoming(inner: &Arc<Inner>, incoming: Incoming, answers: &mut Answers) {
    let Incoming {
        mut socket,
        handoff,
    } = incoming;
    let max = inner.max_connections.load(Ordering::Relaxed);
    if *inner.connections.borrow() >= max {
        if handoff.is_some() && !inner.options.drop_max_connection {
            // Round robin: at the limit, another worker takes it.
            answers.note(handoff, false);
            return;
        }
        taken(answers, handoff, &mut socket);
        let info = match (socket.local_address(), socket.remote_address()) {
            (Some(local), Some(remote)) => Some(DropInfo::new(local, remote)),
            _ => None,
        };
        drop(socket);
        let callback = lock(&inner.on_drop).clone();
        if let Some(callback) = callback {
            callback(info);
        }
        return;
    }
    taken(answers, handoff, &mut socket);
    inner.served.fetch_add(1, Ordering::Relaxed);
    socket.set_origin(Some(inner.origin()));
    apply_options(&inner.options, &mut socket);
    inner.connections.send_modify(|n| *n += 1);
    inner.active.send_modify(|n| *n += 1);
    let guard = ConnectionGuard(inner.clone());
    let fut = (inner.handler)(socket);
    tokio::spawn(async move {
        fut.await;
        drop(guard);
    });
}

/// Accepts (or takes hand-offs) and serves until the server closes, the listen's signal
/// fires or the worker stops; then serves what already completed its handshake, gives the
/// shared socket back and counts itself out of [`Inner::active`].
pub(super) async fn accept_loop(
    inner: Arc<Inner>,
    mut listener: Listener,
    stops: Stops,
    generation: u64,
    shared: Shared,
    unlink: Option<PathBuf>,
) {
    let Stops {
        close: mut stop,
        worker: mut worker_stop,
        cancel,
    } = stops;
    let worker_stopping = async {
        match worker_stop.as_mut() {
            Some(rx) => {
                let _ = rx.wait_for(Option::is_some).await;
            }
            None => std::future::pending().await,
        }
    };
    let cancelled = async {
        match &cancel {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(worker_stopping, cancelled);
    // Once the worker stops: what already completed its handshake is taken from the backlog
    // and served (closing the listener would reset it), then the loop ends.
    let mut draining = 0usize;
    loop {
        if draining > 0 {
            draining -= 1;
            let Some(accepted) = listener.accept_now() else {
                break;
            };
            if let Ok(incoming) = accepted {
                serve_incoming(&inner, incoming, &mut Answers::default());
            }
            continue;
        }
        tokio::select! {
            _ = &mut stop => break,
            () = &mut worker_stopping => {
                // The worker is stopping: this server closes like server.close().
                take_if_ours(&inner, generation);
                for incoming in listener.stop_intake().await {
                    serve_incoming(&inner, incoming, &mut Answers::default());
                }
                draining = BACKLOG_DRAIN;
            }
            () = &mut cancelled => {
                // The listen's signal was aborted: close like server.close().
                take_if_ours(&inner, generation);
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok(incoming) => {
                    let mut answers = Answers::default();
                    let round_robin = incoming.handoff.is_some();
                    serve_incoming(&inner, incoming, &mut answers);
                    if round_robin {
                        // The rest of the primary's message is here already: serve it too and
                        // answer the whole message at once.
                        while let Some(incoming) = listener.handoff_now(&mut answers) {
                            serve_incoming(&inner, incoming, &mut answers);
                        }
                        listener.answer(answers).await;
                    } else {
                        // Accept one connection per turn (libuv's UV_TCP_SINGLE_ACCEPT idea):
                        // the new connection's task runs before this loop accepts again, which
                        // leaves other processes sharing the socket their chance at the queue
                        // instead of one process draining a whole burst.
                        tokio::task::yield_now().await;
                        listener.rejoin();
                    }
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
    // What an accept thread took is this worker's: served, not reset.
    for incoming in listener.stop_intake().await {
        serve_incoming(&inner, incoming, &mut Answers::default());
    }
    listener.shut().await;
    if let Some(path) = unlink {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!("cannot remove {}: {e}", path.display());
        }
    }
    leave_shared(shared.worker.as_ref(), shared.key).await;
    inner.active.send_modify(|n| *n -= 1);
}
