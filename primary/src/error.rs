//! The primary's error type.

use std::io;
use std::path::PathBuf;

use netcluster_protocol::listening::ListenError;
use netcluster_protocol::message::{BoundAddress, CountError};

/// What went wrong in a cluster operation.
///
/// Every variant names what it is about (a worker, a slot, an address) and says its cause in
/// its own message (so it reports no separate `source`, and an error chain says the cause
/// once); it converts into an [`io::Error`] of a matching kind for callers that deal in those.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No worker has this id (it never existed, or died long ago).
    #[error("no worker {0}")]
    NoSuchWorker(u32),
    /// The worker's channel is closed or it has exited.
    #[error("worker {0} is disconnected")]
    Disconnected(u32),
    /// The worker does not read its channel (stopped, hung): its queue is full.
    #[error("worker {0} is not reading its channel (its queue is full)")]
    Unresponsive(u32),
    /// A worker process could not be started.
    #[error("cannot start a worker for slot {slot} ({}): {error}", program.display())]
    Spawn {
        /// The slot it was for.
        slot: usize,
        /// The program.
        program: PathBuf,
        /// What `fork`/`exec` said.
        error: io::Error,
    },
    /// A listener could not be bound (its message names the address and the OS error).
    #[error("{0}")]
    Listen(ListenError),
    /// No listener is bound to this address.
    #[error("no listener is bound to {0}")]
    NoListener(BoundAddress),
    /// A cluster-wide connection count failed.
    #[error("getConnections {address}: {error}")]
    Count {
        /// The listener.
        address: BoundAddress,
        /// Why.
        error: CountError,
    },
    /// Workers did not become ready (listening on every listener, or `READY=1`).
    #[error("{0}")]
    NotReady(String),
    /// A worker count outside what the cluster accepts.
    #[error("{0} workers: the number of workers is 1 to {max}", max = crate::settings::MAX_WORKERS)]
    BadWorkerCount(usize),
    /// A user message could not be encoded (or is larger than a frame).
    #[error("message: {0}")]
    Encode(String),
    /// The operation needs something the worker does not hold (a server not listening, a
    /// socket without a connection).
    #[error("{0}")]
    InvalidInput(String),
    /// An OS call failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        error: io::Error,
    },
    /// The cluster is stopping: no new workers, no scaling.
    #[error("the cluster is stopping")]
    Stopping,
    /// Another primary took the cluster over (an upgrade): ask it.
    #[error("handed over to the new primary (pid {0}): ask it")]
    HandedOver(u32),
    /// The cluster's supervisor has ended.
    #[error("the cluster has stopped")]
    Stopped,
    /// A primary upgrade failed (the message says how, and that the old primary serves on).
    #[error("upgrade failed: {0}")]
    Upgrade(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, error: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            error,
        }
    }
}

impl From<ListenError> for Error {
    fn from(e: ListenError) -> Error {
        Error::Listen(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::NoSuchWorker(_) | Error::NoListener(_) => io::ErrorKind::NotFound,
            Error::Disconnected(_) | Error::Stopped => io::ErrorKind::NotConnected,
            Error::Unresponsive(_) => io::ErrorKind::WouldBlock,
            Error::Spawn { error, .. } | Error::Io { error, .. } => error.kind(),
            Error::Listen(l) => l.source.kind(),
            Error::Count { .. } => io::ErrorKind::Other,
            Error::NotReady(_) => io::ErrorKind::TimedOut,
            Error::BadWorkerCount(_) | Error::InvalidInput(_) => io::ErrorKind::InvalidInput,
            Error::Encode(_) => io::ErrorKind::InvalidData,
            Error::Stopping | Error::HandedOver(_) => io::ErrorKind::Interrupted,
            Error::Upgrade(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
