//! The messages a primary and its workers exchange, in both directions.
//!
//! [`ToPrimary`] travels worker → primary, [`ToWorker`] primary → worker. Every message declares
//! how many file descriptors ride with it ([`Frame::fd_count`]); the channel rejects a datagram
//! whose descriptor count differs.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the wire protocol. Every frame starts with it, and the handshake repeats it.
///
/// A primary and a worker of different versions refuse each other at the handshake. Version 6:
/// a worker's [`ToPrimary::Message`] may carry a handle (one descriptor) as
/// [`ToWorker::Handle`] does, and the round-robin listener id is named `listener` (it was
/// `handle`; the name is not encoded).
pub const PROTOCOL_VERSION: u8 = 6;

/// This host's `CLOCK_MONOTONIC` in milliseconds: the clock of hand-off deadlines. Every process
/// on one host (in one time namespace) reads the same clock, so a primary and its workers agree
/// on it.
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let ms = u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000;
        secs.saturating_mul(1000).saturating_add(ms)
    })
}

/// Default listen backlog, as in Node (`net.Server.listen`).
pub const DEFAULT_BACKLOG: u32 = 511;

/// A message type that can travel over a [`Channel`](crate::channel::Channel).
pub trait Frame: Serialize + DeserializeOwned {
    /// Name used in error messages ("ToWorker", "ToPrimary").
    const NAME: &'static str;
    /// The version byte its frames start with (default [`PROTOCOL_VERSION`]; the primary
    /// hand-over of an upgrade has its own, so that the worker protocol can change between
    /// two binaries that still hand over to each other).
    const VERSION: u8 = PROTOCOL_VERSION;
    /// Number of enum variants; a frame naming a higher variant index is an unknown variant.
    const VARIANTS: u32;
    /// How many file descriptors travel with this message.
    fn fd_count(&self) -> usize;
}

/// What a listen request is for: an IP address and port, a Unix socket path, or a descriptor
/// that the primary already holds (`listen({fd})`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenTarget {
    /// TCP on an address and port; the family is the address's. Port 0 asks for a random port.
    Tcp(SocketAddr),
    /// TCP on every interface (host omitted): `::` dual-stack, falling back to `0.0.0.0` where
    /// IPv6 is unavailable.
    TcpAny(u16),
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// The primary's own descriptor with this number.
    Fd(i32),
}

impl std::fmt::Display for ListenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenTarget::Tcp(addr) => write!(f, "{addr}"),
            ListenTarget::TcpAny(port) => write!(f, "[::]:{port}"),
            ListenTarget::Unix(path) => write!(f, "{}", path.display()),
            ListenTarget::Fd(fd) => write!(f, "fd {fd}"),
        }
    }
}

/// The key under which the primary shares one listening socket among workers.
///
/// Node's key is `address:port:addressType:fd`; `ordinal` numbers a process's port-0 listens,
/// so the Nth `listen(0)` of every worker shares one port while two in one worker get two.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// Where to listen.
    pub target: ListenTarget,
    /// For port 0: which port-0 listen of the process this is (0 for every other target).
    pub ordinal: u32,
}

impl std::fmt::Display for ListenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.target)
    }
}

/// Options that travel with a listen request. They are not part of the key: the first request
/// for a key decides them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListenParams {
    /// Maximum length of the queue of pending connections.
    pub backlog: u32,
    /// Unix sockets: make the socket file readable by everyone.
    pub readable_all: bool,
    /// Unix sockets: make the socket file writable by everyone.
    pub writable_all: bool,
    /// TCP on `::`: accept IPv6 only (no dual stack).
    pub ipv6_only: bool,
    /// TCP: set `SO_REUSEPORT`, so several sockets can bind the same port and the kernel
    /// balances connections among them.
    pub reuse_port: bool,
}

impl Default for ListenParams {
    fn default() -> Self {
        Self {
            backlog: DEFAULT_BACKLOG,
            readable_all: false,
            writable_all: false,
            ipv6_only: false,
            reuse_port: false,
        }
    }
}

/// The address a listening socket is bound to, as `server.address()` reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub enum BoundAddress {
    /// An IP socket and its real port.
    Tcp(SocketAddr),
    /// A Unix socket's path (empty for an unnamed socket).
    Unix(PathBuf),
}

impl BoundAddress {
    /// The port (`address().port`), `None` for a Unix socket.
    pub fn port(&self) -> Option<u16> {
        match self {
            BoundAddress::Tcp(a) => Some(a.port()),
            BoundAddress::Unix(_) => None,
        }
    }

    /// The family as Node names it (`'IPv4'`, `'IPv6'`), `None` for a Unix socket.
    pub fn family(&self) -> Option<&'static str> {
        match self {
            BoundAddress::Tcp(SocketAddr::V4(_)) => Some("IPv4"),
            BoundAddress::Tcp(SocketAddr::V6(_)) => Some("IPv6"),
            BoundAddress::Unix(_) => None,
        }
    }

    /// The IP address as text, or the Unix socket's path (what Node's `address()` returns
    /// for a pipe).
    pub fn address(&self) -> String {
        match self {
            BoundAddress::Tcp(a) => a.ip().to_string(),
            BoundAddress::Unix(p) => p.display().to_string(),
        }
    }

    /// Node's printed form of `server.address()`: `{ port: 8124, family: 'IPv4', address:
    /// '127.0.0.1' }` for IP sockets, `'/tmp/echo.sock'` for Unix sockets.
    pub fn to_node_string(&self) -> String {
        match self {
            BoundAddress::Tcp(a) => format!(
                "{{ port: {}, family: '{}', address: '{}' }}",
                a.port(),
                if a.is_ipv4() { "IPv4" } else { "IPv6" },
                a.ip()
            ),
            BoundAddress::Unix(p) => format!("'{}'", p.display()),
        }
    }
}

impl std::fmt::Display for BoundAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddress::Tcp(addr) => write!(f, "{addr}"),
            BoundAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How the primary shares a listening socket with a worker (the scheduling policy).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grant {
    /// The listening socket itself rides with the reply; the worker accepts on it (Node's
    /// `SCHED_NONE`).
    Shared,
    /// The primary accepts and hands each connection to a worker in turn, as
    /// `ToWorker::Connections` messages for this listener (Node's `SCHED_RR`).
    RoundRobin {
        /// The primary's id for the listener.
        listener: u64,
    },
    /// The worker binds the granted address itself with `SO_REUSEPORT` and the kernel
    /// balances connections.
    ReusePort,
    /// The listening socket rides with the reply and is this worker's alone: its reuseport
    /// slot, which the kernel balances against the other slots. The worker accepts on it
    /// without coordinating with other workers (no `EPOLLEXCLUSIVE` turn-taking).
    Slot,
}

impl Grant {
    /// Whether the listening socket rides with the reply.
    pub fn carries_socket(self) -> bool {
        matches!(self, Grant::Shared | Grant::Slot)
    }
}

/// What kind of handle rides with a `ToWorker::Handle` or a `ToPrimary::Message`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HandleKind {
    /// A listening socket (a `net.Server`), bound to this address.
    Server {
        /// Where it is bound.
        address: BoundAddress,
    },
    /// A connected socket (a `net.Socket`).
    Socket {
        /// The sender's server that accepted it, if any: that server's `getConnections` goes
        /// on counting the socket while the receiver keeps it open.
        origin: Option<u64>,
    },
}

/// Worker → primary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ToPrimary {
    /// First message of a worker: who it is and which protocol it speaks.
    Hello {
        /// The worker's [`PROTOCOL_VERSION`].
        version: u8,
        /// The worker's process id.
        pid: u32,
        /// The id the primary gave the worker in its environment.
        worker_id: u32,
    },
    /// Please share the listening socket for `key` (answered by `ListenOk` or `ListenErr` with
    /// the same `seq`).
    Listen {
        /// Request number, echoed in the answer.
        seq: u64,
        /// What to listen on.
        key: ListenKey,
        /// Backlog and socket-file options; the first request for a key decides them.
        params: ListenParams,
    },
    /// The worker closed its server for `key`; the primary closes the socket when no member is
    /// left.
    Close {
        /// The key of the closed server.
        key: ListenKey,
    },
    /// A user message (`process.send(value)`, or `process.send(value, handle)` with a handle):
    /// the postcard encoding of the user's value. User messages have their own variant, so no
    /// user value can be taken for an internal message (Node needs a `NODE_` prefix rule for
    /// that).
    Message {
        /// The encoded value.
        data: Vec<u8>,
        /// What the one descriptor that rides with the message is, when one does. The primary
        /// checks the descriptor against it and does not take the worker's word for anything
        /// (a server's address is read from the socket). A socket's `origin` is not used: the
        /// sending worker's server stops counting a socket it sent.
        handle: Option<HandleKind>,
    },
    /// The worker is disconnecting by itself (`cluster.worker.disconnect()`): it closes its
    /// servers, finishes its connections and exits.
    Disconnect,
    /// Answer to `CountQuery`: this worker's open connections on the key.
    CountReply {
        /// The query this answers.
        seq: u64,
        /// Open connections.
        count: u64,
    },
    /// Please count the open connections on `key` across the whole cluster (answered by
    /// `CountResult` with the same `seq`).
    CountRequest {
        /// Request number.
        seq: u64,
        /// The listener.
        key: ListenKey,
    },
    /// Answers to `ToWorker::Connections` on one listener, several at once: a connection in
    /// `refused` (the server is closing, or at its `maxConnections`) goes to another worker.
    Accepted {
        /// The listener ([`Grant::RoundRobin`]'s id).
        listener: u64,
        /// Hand-offs the worker took.
        accepted: Vec<u64>,
        /// Hand-offs the worker did not take.
        refused: Vec<u64>,
    },
    /// Answer to `ToWorker::Ping`: the worker's channel task is alive and reading.
    Pong {
        /// The ping answered.
        seq: u64,
    },
    /// Answer to `ToWorker::StatsQuery`: what this worker's servers that share the primary's
    /// sockets have done.
    Stats {
        /// The query answered.
        seq: u64,
        /// One entry per shared listener this worker serves.
        listeners: Vec<ListenerStats>,
    },
    /// The worker is stopping by itself because it got `SIGINT` or `SIGTERM` (a Ctrl-C in a
    /// terminal reaches the primary and every worker; an operator may signal one worker): it
    /// closes its servers, finishes its connections and exits. Unlike `Disconnect` it is not
    /// Node's `disconnect()`: the exit does not count as one after a disconnect.
    Stopping {
        /// The signal's number.
        signal: i32,
    },
}

/// One listener's figures in a worker, for `netcluster status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListenerStats {
    /// The listener's key.
    pub key: ListenKey,
    /// Connections open now.
    pub open: u64,
    /// Connections accepted since the worker started.
    pub served: u64,
}

/// Why a cluster-wide connection count has no answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountError {
    /// A worker sharing the socket exited before it replied (Node's
    /// `ERR_CHILD_CLOSED_BEFORE_REPLY`).
    #[error("worker {worker} exited before replying (ERR_CHILD_CLOSED_BEFORE_REPLY)")]
    WorkerExited {
        /// The worker.
        worker: u32,
    },
    /// These workers did not answer within the deadline.
    #[error("workers {workers:?} did not answer within {timeout_ms} ms")]
    TimedOut {
        /// The workers that stayed silent.
        workers: Vec<u32>,
        /// The deadline.
        timeout_ms: u64,
    },
    /// A worker cannot be asked: its queue is full (it does not read its channel).
    #[error("worker {worker} is not reading its channel")]
    Unresponsive {
        /// The worker.
        worker: u32,
    },
    /// The asking worker has too many requests in flight.
    #[error("too many count requests in flight (at most {limit})")]
    TooMany {
        /// The limit per worker.
        limit: u32,
    },
    /// The cluster is stopping.
    #[error("the cluster is stopping")]
    Stopping,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_address_in_nodes_shape() {
        let a = BoundAddress::Tcp("127.0.0.1:12346".parse().expect("addr"));
        assert_eq!(a.port(), Some(12346));
        assert_eq!(a.family(), Some("IPv4"));
        assert_eq!(a.address(), "127.0.0.1");
        assert_eq!(
            a.to_node_string(),
            "{ port: 12346, family: 'IPv4', address: '127.0.0.1' }"
        );
        let v6 = BoundAddress::Tcp("[::]:80".parse().expect("addr"));
        assert_eq!(v6.family(), Some("IPv6"));
        assert_eq!(v6.address(), "::");
        let u = BoundAddress::Unix("/tmp/echo.sock".into());
        assert_eq!((u.port(), u.family()), (None, None));
        assert_eq!(u.address(), "/tmp/echo.sock");
        assert_eq!(u.to_node_string(), "'/tmp/echo.sock'");
    }
}

impl Frame for ToPrimary {
    const NAME: &'static str = "ToPrimary";
    const VARIANTS: u32 = 11;
    fn fd_count(&self) -> usize {
        match self {
            ToPrimary::Message {
                handle: Some(_), ..
            } => 1,
            _ => 0,
        }
    }
}

/// Primary → worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Answer to `Hello`: the worker is online.
    Welcome {
        /// The primary's [`PROTOCOL_VERSION`].
        version: u8,
        /// How long a draining worker may keep open connections before it exits anyway.
        drain_timeout_ms: u64,
    },
    /// The listen of request `seq` succeeded; with [`Grant::Shared`] or [`Grant::Slot`] the
    /// listening socket rides with it (one descriptor), otherwise none.
    ListenOk {
        /// The request this answers.
        seq: u64,
        /// The address the socket is bound to.
        address: BoundAddress,
        /// How the socket is shared.
        grant: Grant,
    },
    /// Request `seq` failed in the primary.
    ListenErr {
        /// The request this answers.
        seq: u64,
        /// The address, path or descriptor that could not be listened on.
        address: String,
        /// The OS error number (`EADDRINUSE`, `EACCES`, …), 0 when there is none.
        errno: i32,
        /// What went wrong (used when there is no errno).
        message: String,
    },
    /// Stop accepting, finish open connections within the deadline, exit
    /// (`worker.disconnect()` in the primary).
    Shutdown {
        /// Deadline for open connections, in milliseconds.
        drain_timeout_ms: u64,
    },
    /// A user message (`worker.send(value)`): the postcard encoding of the user's value.
    Message {
        /// The encoded value.
        data: Vec<u8>,
    },
    /// A user message with a handle (`worker.send(message, handle)`); carries the handle's
    /// descriptor.
    Handle {
        /// The encoded value.
        data: Vec<u8>,
        /// What the descriptor is.
        kind: HandleKind,
    },
    /// How many sockets sent to this worker from the primary's server `origin` are still
    /// open? (answered by `ToPrimary::CountReply`)
    CountSent {
        /// Query number.
        seq: u64,
        /// The sender's server.
        origin: u64,
    },
    /// Connections the primary accepted on round-robin listener `listener`: one descriptor per
    /// hand-off number, in order (at most [`MAX_FDS_PER_MESSAGE`](crate::fd::MAX_FDS_PER_MESSAGE)).
    /// Answered by `ToPrimary::Accepted`.
    Connections {
        /// The listener ([`Grant::RoundRobin`]'s id).
        listener: u64,
        /// Hand-off numbers, echoed in the answer; the i-th descriptor is the i-th number's.
        seqs: Vec<u64>,
        /// `CLOCK_MONOTONIC` milliseconds (see [`monotonic_ms`]) after which the primary may
        /// give the connections to other workers: a worker that reads the hand-off later must
        /// close its copies and refuse them, so no connection is ever served twice.
        expires_ms: u64,
    },
    /// How many connections are open on `key` in this worker? (answered by `CountReply`)
    CountQuery {
        /// Query number.
        seq: u64,
        /// The listener.
        key: ListenKey,
    },
    /// Answer to `CountRequest`: the cluster-wide count, or why there is none.
    CountResult {
        /// The request this answers.
        seq: u64,
        /// The sum over every worker, or why there is none.
        result: Result<u64, CountError>,
    },
    /// Are you alive? (answered by `ToPrimary::Pong`)
    Ping {
        /// Ping number.
        seq: u64,
    },
    /// What have your servers done? (answered by `ToPrimary::Stats`)
    StatsQuery {
        /// Query number.
        seq: u64,
    },
}

impl Frame for ToWorker {
    const NAME: &'static str = "ToWorker";
    const VARIANTS: u32 = 12;
    fn fd_count(&self) -> usize {
        match self {
            ToWorker::ListenOk { grant, .. } if grant.carries_socket() => 1,
            ToWorker::Connections { seqs, .. } => seqs.len(),
            ToWorker::Handle { .. } => 1,
            _ => 0,
        }
    }
}
