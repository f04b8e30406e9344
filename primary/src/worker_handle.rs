//! [`WorkerHandle`]: one worker, as the library sees it (Node's `cluster.workers[id]`).

use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;

use netcluster_protocol::message::{HandleKind, ToWorker};
use netcluster_worker::net::{RemoteCount, Server, Socket};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::cluster::ClusterHandle;
use crate::command::Command;
use crate::error::Error;
use crate::event::WorkerInfo;
use crate::worker::state::WorkerState;

/// A handle to send to a worker with [`WorkerHandle::send_handle`].
#[derive(Debug)]
pub enum SendHandle {
    /// A listening server (its socket is duplicated; the server goes on here).
    Server(Server),
    /// A connected socket (boxed: a `Socket` is much larger than a server handle).
    Socket(Box<Socket>),
}

/// A worker, as the primary sees it (Node's `cluster.workers[id]`). Cheap to clone; stays
/// valid after the worker died (its state is then [`WorkerState::Dead`]).
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    id: u32,
    cluster: ClusterHandle,
}

impl WorkerHandle {
    pub(crate) fn new(id: u32, cluster: ClusterHandle) -> WorkerHandle {
        WorkerHandle { id, cluster }
    }

    /// The worker id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// What the primary knows of it now (`None` once it is long dead).
    pub async fn info(&self) -> Option<WorkerInfo> {
        self.cluster.worker_info(self.id).await
    }

    /// The process id.
    pub async fn pid(&self) -> Option<u32> {
        self.info().await.map(|i| i.pid)
    }

    /// Where the worker is in its life.
    pub async fn state(&self) -> WorkerState {
        self.info().await.map_or(WorkerState::Dead, |i| i.state)
    }

    /// `worker.exitedAfterDisconnect`: true once `disconnect()` was called (by either side),
    /// false after `kill()` or a crash.
    pub async fn exited_after_disconnect(&self) -> bool {
        self.info().await.is_some_and(|i| i.exited_after_disconnect)
    }

    async fn send_message(
        &self,
        msg: ToWorker,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), Error> {
        let worker = self.id;
        self.cluster
            .request(|reply| Command::Send {
                worker,
                msg,
                fds,
                reply,
            })
            .await?
    }

    /// Sends a user message (`worker.send(message)`); the worker receives it with
    /// `Worker::recv`. Returns once the message is queued for the worker.
    ///
    /// # Errors
    /// [`Error::Encode`] when the value cannot be encoded or is larger than a frame (64 KiB);
    /// [`Error::Disconnected`]; [`Error::Unresponsive`] when the worker does not read its
    /// channel (its queue is full: nothing waits for it).
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), Error> {
        let data = encode(message)?;
        self.send_message(ToWorker::Message { data }, Vec::new())
            .await
    }

    /// `worker.send(message, handle)`: sends a user message with a listening socket or a
    /// connected socket, which the worker receives with `Worker::recv_with_handle` as a
    /// `ReceivedHandle::Server` or `ReceivedHandle::Socket`.
    ///
    /// A socket follows Node's rule: with `keep_open` false it is closed here once sent (the
    /// sender stops counting it), the worker counts it until it closes, and the
    /// `getConnections()` of the server that accepted it here ([`Socket::origin`]) includes
    /// it for as long as the worker keeps it open. A server handle stays open here.
    ///
    /// # Errors
    /// As [`WorkerHandle::send`]; [`Error::InvalidInput`] when the server is not listening or
    /// the socket has no connection.
    pub async fn send_handle<T: Serialize + ?Sized>(
        &self,
        message: &T,
        handle: SendHandle,
        keep_open: bool,
    ) -> Result<(), Error> {
        let data = encode(message)?;
        match handle {
            SendHandle::Server(server) => {
                let address = server.address().ok_or_else(|| {
                    Error::InvalidInput("send_handle: the server is not listening".into())
                })?;
                let fd = server
                    .handle()
                    .map_err(|e| Error::io("send_handle: the server's socket", e))?;
                let msg = ToWorker::Handle {
                    data,
                    kind: HandleKind::Server { address },
                };
                self.send_message(msg, vec![fd]).await
            }
            SendHandle::Socket(mut socket) => {
                let origin = socket.origin();
                let fd = socket
                    .fd()
                    .ok_or_else(|| {
                        Error::InvalidInput("send_handle: the socket has no connection".into())
                    })?
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io("send_handle: duplicate the socket", e))?;
                let msg = ToWorker::Handle {
                    data,
                    kind: HandleKind::Socket {
                        origin: origin.as_ref().map(|o| o.id()),
                    },
                };
                self.send_message(msg, vec![fd]).await?;
                if let Some(origin) = origin {
                    origin.register(
                        u64::from(self.id),
                        Arc::new(SentCount {
                            cluster: self.cluster.clone(),
                            worker: self.id,
                            origin: origin.id(),
                        }),
                    );
                }
                if !keep_open {
                    socket.destroy(None);
                }
                Ok(())
            }
        }
    }

    /// `worker.disconnect()`: the worker closes its servers, waits for its connections to end
    /// (at most the drain deadline) and exits; [`WorkerHandle::exited_after_disconnect`]
    /// becomes true. It leaves every round-robin rotation at once. Its slot gets a new worker.
    ///
    /// # Errors
    /// [`Error::Disconnected`] when the worker is already disconnected.
    pub async fn disconnect(&self) -> Result<(), Error> {
        let worker = self.id;
        self.cluster
            .request(|reply| Command::Disconnect { worker, reply })
            .await?
    }

    /// `worker.kill(signal)`: sends `signal` to the process;
    /// [`WorkerHandle::exited_after_disconnect`] stays false, and the worker is not replaced
    /// (the application asked for it).
    ///
    /// # Errors
    /// [`Error::NoSuchWorker`] when the worker is dead; the error of `kill(2)`.
    pub async fn kill(&self, signal: Signal) -> Result<(), Error> {
        let worker = self.id;
        self.cluster
            .request(|reply| Command::Kill {
                worker,
                signal,
                reply,
            })
            .await?
    }
}

fn encode<T: Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, Error> {
    postcard::to_allocvec(message).map_err(|e| Error::Encode(e.to_string()))
}

/// Counts the sockets a primary's server sent to one worker, for that server's
/// `getConnections` (Node's rule).
struct SentCount {
    cluster: ClusterHandle,
    worker: u32,
    origin: u64,
}

impl RemoteCount for SentCount {
    fn count(&self) -> Pin<Box<dyn Future<Output = std::io::Result<Option<usize>>> + Send + '_>> {
        Box::pin(async move {
            let (worker, origin) = (self.worker, self.origin);
            let rx = self
                .cluster
                .request(|reply| Command::CountSent {
                    worker,
                    origin,
                    reply,
                })
                .await
                .map_err(std::io::Error::from)?;
            let Some(rx) = rx else {
                // The worker is gone, and the sockets with it.
                return Ok(None);
            };
            match rx.await {
                Ok(Ok(n)) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                Ok(Err(e)) => Err(std::io::Error::other(format!("getConnections: {e}"))),
                Err(_) => Ok(None),
            }
        })
    }
}
