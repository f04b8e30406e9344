//! What the cluster reports: [`Event`]s (Node's cluster events), delivered to every
//! [`Events`] subscriber, and [`WorkerInfo`]; the handles workers send with their messages
//! ([`MessageHandle`]) and how many of them one worker may make the primary hold.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use netcluster_protocol::channel::ChannelError;
use netcluster_protocol::listening;
use netcluster_protocol::message::{BoundAddress, HandleKind};
use netcluster_worker::net::{FromFdOptions, Socket};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use crate::worker::state::WorkerState;

/// The most handles that one worker's messages make the primary hold at once: those in events
/// that some subscriber has not yet read and dropped (the events queue holds
/// [`Limits::events`](crate::Limits::events) at most). Past it, a message arrives without its
/// handle, which is closed.
pub const MAX_HELD_HANDLES: usize = 64;

/// A user message from a worker, as sent with `Worker::send` or `Worker::send_handle`; decode it
/// with [`UserMessage::decode`], take the handle sent with it from [`UserMessage::handle`].
/// Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMessage {
    data: Arc<[u8]>,
    handle: Option<MessageHandle>,
}

impl UserMessage {
    pub(crate) fn new(data: Vec<u8>, handle: Option<MessageHandle>) -> UserMessage {
        UserMessage {
            data: data.into(),
            handle,
        }
    }

    /// The handle the worker sent with the message (the second argument of Node's
    /// `worker.on('message', (message, handle) => …)`), `None` for a message sent without one
    /// — or whose handle the primary refused because the worker already had
    /// [`MAX_HELD_HANDLES`] held here.
    pub fn handle(&self) -> Option<&MessageHandle> {
        self.handle.as_ref()
    }

    /// Decodes the message as `T` (the type the worker sent).
    ///
    /// # Errors
    /// `InvalidData` naming `T` when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> io::Result<T> {
        postcard::from_bytes(&self.data).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message is not a {}: {e}", std::any::type_name::<T>()),
            )
        })
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// A handle a worker sent with a message (`Worker::send_handle`, Node's
/// `process.send(message, handle)` in a worker): a listening socket or a connected socket,
/// checked by the primary to be what the worker says it is.
///
/// Every clone (every subscriber's copy of the event) shares one descriptor, which is closed
/// when the last clone is dropped: keep the handle, or take a descriptor of your own with
/// [`MessageHandle::try_clone_fd`] or [`MessageHandle::to_socket`], or listen on it with
/// `Server::listen_handle(&handle)`. The descriptor is the worker's socket too (a duplicate of
/// it): both processes can use it, and flags such as `O_NONBLOCK` are shared.
///
/// A worker is not trusted with what the primary holds: at most [`MAX_HELD_HANDLES`] of one
/// worker's handles are held at once (beyond, a message arrives without its handle), an event
/// that no subscriber is there to take is dropped with its handle at once, and a descriptor
/// that is not what the message says is closed and counted against the worker like any bad
/// frame.
#[derive(Debug, Clone)]
pub struct MessageHandle {
    kind: MessageHandleKind,
    fd: Arc<HeldFd>,
}

/// What a [`MessageHandle`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageHandleKind {
    /// A listening socket (a worker's `net.Server`), bound to this address (read from the
    /// socket itself).
    Server {
        /// Where it is bound.
        address: BoundAddress,
    },
    /// A connected TCP or Unix stream socket (a `net.Socket`).
    Socket,
}

impl MessageHandle {
    /// What the handle is.
    pub fn kind(&self) -> &MessageHandleKind {
        &self.kind
    }

    /// A descriptor of its own for the caller (`dup`), open for as long as the caller keeps it.
    ///
    /// # Errors
    /// The error of `fcntl(F_DUPFD_CLOEXEC)` (`EMFILE`).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.fd.try_clone()
    }

    /// A [`Socket`] on a duplicate of a connected socket (must be called within a tokio
    /// runtime).
    ///
    /// # Errors
    /// `InvalidInput` for a server handle; otherwise as [`Socket::from_fd`].
    pub fn to_socket(&self) -> io::Result<Socket> {
        if let MessageHandleKind::Server { address } = &self.kind {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the handle is a server listening on {address}, not a socket"),
            ));
        }
        Socket::from_fd(FromFdOptions::new(self.fd.fd.as_raw_fd()))
    }
}

impl AsFd for MessageHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.fd.as_fd()
    }
}

/// Two handles are equal when they are clones of one (the same descriptor from one message).
impl PartialEq for MessageHandle {
    fn eq(&self, other: &MessageHandle) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }
}

impl Eq for MessageHandle {}

/// A descriptor held for a worker, counted in its [`HeldHandles`] until it is closed.
#[derive(Debug)]
struct HeldFd {
    fd: OwnedFd,
    held: Arc<AtomicUsize>,
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The handles one worker's messages make the primary hold, kept by that worker's reader task
/// (the only one that adds to them; they leave wherever their last clone is dropped).
#[derive(Debug, Default)]
pub(crate) struct HeldHandles {
    held: Arc<AtomicUsize>,
    refused: u64,
}

impl HeldHandles {
    /// Takes `fd`, which worker `id` sent with a message as `kind`: the handle; `Ok(None)`
    /// (the descriptor closed, and said at the 1st, 2nd, 4th, 8th, … time) when the worker
    /// already has [`MAX_HELD_HANDLES`] held; [`ChannelError::BadHandle`] (closed) when the
    /// descriptor is not what `kind` says.
    pub(crate) fn take(
        &mut self,
        id: u32,
        kind: &HandleKind,
        fd: OwnedFd,
    ) -> Result<Option<MessageHandle>, ChannelError> {
        let checked = match kind {
            HandleKind::Server { .. } => listening::check_listening(fd.as_fd())
                .map(|address| MessageHandleKind::Server { address }),
            HandleKind::Socket { .. } => {
                listening::check_connected(fd.as_fd()).map(|_| MessageHandleKind::Socket)
            }
        };
        let kind = checked.map_err(|e| ChannelError::BadHandle {
            kind: "ToPrimary",
            detail: e.to_string(),
        })?;
        if self.held.load(Ordering::Relaxed) >= MAX_HELD_HANDLES {
            self.refused = self.refused.saturating_add(1);
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    worker = id,
                    refused = self.refused,
                    "a handle sent with a message was closed: the worker already has \
                     {MAX_HELD_HANDLES} held in events not yet read"
                );
            }
            return Ok(None);
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        Ok(Some(MessageHandle {
            kind,
            fd: Arc::new(HeldFd {
                fd,
                held: self.held.clone(),
            }),
        }))
    }

    /// How many are held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Something that happened to a worker (Node's cluster events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `'fork'`: the process was started.
    Fork {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// `'online'`: the worker completed the handshake.
    Online {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// `'listening'`: the worker received a listening socket.
    Listening {
        /// Worker id.
        id: u32,
        /// The socket's address (`address.port()`, `address.family()` give Node's fields).
        address: BoundAddress,
        /// The primary's descriptor number, for `listen({fd})`.
        fd: Option<i32>,
    },
    /// `'message'`: the worker sent a user message.
    Message {
        /// Worker id.
        id: u32,
        /// The message.
        message: UserMessage,
    },
    /// `'disconnect'`: the worker's channel closed.
    Disconnect {
        /// Worker id.
        id: u32,
    },
    /// `'exit'`: the process exited.
    Exit {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
        /// Whether it exited after a disconnect (`worker.exitedAfterDisconnect`): true after
        /// `disconnect()` and every stop the primary asked for, false after `kill()` or a
        /// crash.
        exited_after_disconnect: bool,
    },
    /// This subscriber fell behind and `missed` events were dropped for it (it reads more
    /// slowly than workers produce events; the queue is bounded so that no worker can make
    /// the primary hold an unbounded amount of memory).
    Lagged {
        /// How many events this subscriber lost.
        missed: u64,
    },
}

/// What the primary knows of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker id (1, 2, …; never reused).
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// The slot it serves (1..=N), `None` for a worker that left its slot (scaled down).
    pub slot: Option<usize>,
    /// The generation it was started in (1, then one more per rolling reload).
    pub generation: u64,
    /// Whether the handshake has completed.
    pub online: bool,
    /// Where it is in its life.
    pub state: WorkerState,
    /// Whether it exited (or will exit) after a disconnect the primary or the worker asked for.
    pub exited_after_disconnect: bool,
}

/// A subscription to a cluster's events; each subscriber sees every event from the moment it
/// subscribed, independently of the others.
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<Event>) -> Events {
        Events { rx }
    }

    /// The next event; [`Event::Lagged`] if this subscriber fell behind; `None` once the
    /// cluster has stopped and every event was read.
    ///
    /// # Cancel safety
    /// Cancel safe: it is tokio's `broadcast::Receiver::recv`, which takes an event only in
    /// the poll that returns it. A dropped future loses no event; the next call returns it.
    pub async fn next(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(ev) => Some(ev),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn claimed_server() -> HandleKind {
        // What the worker says is never used: the address is read from the socket.
        HandleKind::Server {
            address: BoundAddress::Tcp("10.9.8.7:6".parse().expect("addr")),
        }
    }

    const SOCKET: HandleKind = HandleKind::Socket { origin: None };

    /// True once every copy of the pipe's read end is closed (writing then fails with EPIPE).
    fn read_end_closed(w: &mut std::fs::File) -> bool {
        matches!(w.write(b"x"), Err(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }

    #[test]
    fn a_listening_socket_is_taken_with_its_real_address() {
        let mut held = HeldHandles::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = held
            .take(1, &claimed_server(), OwnedFd::from(listener))
            .expect("a listening socket")
            .expect("under the cap");
        assert_eq!(
            handle.kind(),
            &MessageHandleKind::Server {
                address: BoundAddress::Tcp(addr)
            }
        );
        assert_eq!(held.held(), 1);
        // The primary's copy accepts.
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let fd = handle.try_clone_fd().expect("dup");
        let (_conn, _) = std::net::TcpListener::from(fd).accept().expect("accept");
        assert!(handle.to_socket().is_err(), "a server is not a socket");
        drop(handle);
        assert_eq!(held.held(), 0);
    }

    #[tokio::test]
    async fn a_connected_socket_is_taken_and_works() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut held = HeldHandles::default();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let handle = held
            .take(1, &SOCKET, OwnedFd::from(ours))
            .expect("a connected socket")
            .expect("under the cap");
        assert_eq!(handle.kind(), &MessageHandleKind::Socket);
        let copy = handle.clone();
        assert_eq!(copy, handle);
        let mut socket = handle.to_socket().expect("socket");
        socket.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        theirs.write_all(b"pong").expect("write");
        socket.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong");
        drop((handle, copy));
        assert_eq!(held.held(), 0, "the socket of its own does not count");
    }

    #[test]
    fn what_is_not_what_the_message_says_is_refused_and_closed() {
        let mut held = HeldHandles::default();
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut w = std::fs::File::from(w);
        let err = held.take(3, &SOCKET, r).expect_err("a pipe");
        assert!(err.is_bad_frame());
        assert_eq!(
            err.to_string(),
            "the handle sent with a ToPrimary message is refused: a pipe, not a connected \
             stream socket"
        );
        assert!(read_end_closed(&mut w), "the refused descriptor is closed");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = held
            .take(3, &SOCKET, OwnedFd::from(listener))
            .expect_err("a listening socket is not a connection");
        assert!(err.to_string().contains("a listening TCP socket"), "{err}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let err = held
            .take(3, &claimed_server(), OwnedFd::from(a))
            .expect_err("a connection is not a server");
        assert!(
            err.to_string().contains("not a listening stream socket"),
            "{err}"
        );
        assert_eq!(held.held(), 0);
    }

    #[test]
    fn one_worker_makes_the_primary_hold_at_most_the_cap() {
        let mut held = HeldHandles::default();
        let mut peers = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..MAX_HELD_HANDLES {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
            peers.push(b);
            kept.push(
                held.take(1, &SOCKET, OwnedFd::from(a))
                    .expect("ok")
                    .expect("under the cap"),
            );
        }
        assert_eq!(held.held(), MAX_HELD_HANDLES);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(
            held.take(1, &SOCKET, OwnedFd::from(a))
                .expect("ok")
                .is_none()
        );
        let mut buf = [0u8; 1];
        assert_eq!(
            b.read(&mut buf).expect("eof"),
            0,
            "the refused one is closed"
        );
        kept.pop();
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(
            held.take(1, &SOCKET, OwnedFd::from(a))
                .expect("ok")
                .is_some(),
            "room again once one is dropped"
        );
    }
}
