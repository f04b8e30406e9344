//! What the cluster reports: [`Event`]s (Node's cluster events), delivered to every
//! [`Events`] subscriber, and [`WorkerInfo`].

use std::io;
use std::sync::Arc;

use netcluster_protocol::message::BoundAddress;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use crate::worker::state::WorkerState;

/// A user message from a worker, as sent with `Worker::send`; decode it with
/// [`UserMessage::decode`]. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMessage(Arc<[u8]>);

impl UserMessage {
    pub(crate) fn new(data: Vec<u8>) -> UserMessage {
        UserMessage(data.into())
    }

    /// Decodes the message as `T` (the type the worker sent).
    ///
    /// # Errors
    /// `InvalidData` naming `T` when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> io::Result<T> {
        postcard::from_bytes(&self.0).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message is not a {}: {e}", std::any::type_name::<T>()),
            )
        })
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
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
