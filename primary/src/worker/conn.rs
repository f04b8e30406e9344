//! The two tasks that carry one worker's channel, so that the supervisor never awaits a worker:
//!
//! - the **writer** drains a bounded queue ([`WorkerTx`]) into the channel. The supervisor only
//!   ever *tries* to queue (never waits), so a worker that stops reading (SIGSTOP, a hung event
//!   loop) fills its own queue and nothing else: further sends to it fail at once with
//!   [`SendFailed::Full`].
//! - the **reader** forwards what the worker says ([`FromWorker`]) to the supervisor, waits for
//!   the process to exit, and reports the exit only after everything the worker said before it
//!   (a `Disconnect`, say), so the supervisor sees them in order.
//!
//! Neither task does arithmetic on what the worker sends or anything else that could panic; the
//! supervisor checks every value.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use netcluster_protocol::channel::{Channel, ChannelError};
use netcluster_protocol::message::{ToPrimary, ToWorker};
use tokio::sync::mpsc;

use crate::event::{HeldHandles, MessageHandle};

/// A descriptor that rides with a message: owned by the message, or shared with the sender
/// (a round-robin connection the primary keeps until the worker accepts it).
#[derive(Debug)]
pub(crate) enum OutFd {
    /// Closed once sent.
    Owned(OwnedFd),
    /// The primary keeps its own reference.
    Shared(Arc<OwnedFd>),
}

impl AsFd for OutFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            OutFd::Owned(fd) => fd.as_fd(),
            OutFd::Shared(fd) => fd.as_fd(),
        }
    }
}

/// A message queued for a worker.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub msg: ToWorker,
    pub fds: Vec<OutFd>,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFailed {
    /// The worker is not reading: its queue is at its limit.
    Full,
    /// The worker's channel is gone.
    Closed,
}

/// The sending side of a worker's queue. Queuing never waits.
#[derive(Debug, Clone)]
pub(crate) struct WorkerTx {
    tx: mpsc::Sender<Outbound>,
}

impl WorkerTx {
    /// Queues `msg` with `fds`.
    pub fn try_send(&self, msg: ToWorker, fds: Vec<OutFd>) -> Result<(), SendFailed> {
        self.tx
            .try_send(Outbound { msg, fds })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendFailed::Full,
                mpsc::error::TrySendError::Closed(_) => SendFailed::Closed,
            })
    }
}

impl WorkerTx {
    /// A queue of `queue` messages and its receiving end, for a writer (or a test) to drain.
    pub fn pair(queue: usize) -> (WorkerTx, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (WorkerTx { tx }, rx)
    }
}

/// What a worker's reader reports to the supervisor.
#[derive(Debug)]
pub(crate) enum FromWorker {
    /// A message, and the handle that came with a user message (checked, and counted against
    /// the worker's [`MAX_HELD_HANDLES`](crate::event::MAX_HELD_HANDLES)).
    Message(ToPrimary, Option<MessageHandle>),
    /// A frame that did not decode (its descriptors were closed).
    BadFrame(ChannelError),
    /// The channel closed (or failed).
    Closed,
    /// The process was reaped.
    Exited(io::Result<std::process::ExitStatus>),
    /// A datagram on its `NOTIFY_SOCKET` (`READY=1`, `STATUS=…`, …).
    Notify(String),
}

/// A program worker's reader: it has no channel, so this only waits for the exit.
pub(crate) async fn run_program(
    id: u32,
    mut child: tokio::process::Child,
    to_supervisor: mpsc::Sender<(u32, FromWorker)>,
) {
    let status = child.wait().await;
    let _ = to_supervisor.send((id, FromWorker::Exited(status))).await;
}

/// Reads a worker's notification socket until `stop` (the worker's record is gone), then
/// removes the socket file. Datagrams are read whole up to 4 KiB (systemd's own limit is
/// larger, but no notification of a worker needs more).
pub(crate) async fn run_notify(
    id: u32,
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
    to_supervisor: mpsc::Sender<(u32, FromWorker)>,
    stop: tokio_util::sync::CancellationToken,
) {
    let sock = match tokio::net::UnixDatagram::from_std(sock) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(worker = id, "cannot read the notification socket: {e}");
            let _ = std::fs::remove_file(&path);
            return;
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            got = sock.recv(&mut buf) => match got {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if to_supervisor.send((id, FromWorker::Notify(text))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(worker = id, "notification socket: {e}");
                    break;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Starts the writer and returns its queue. The writer ends when every [`WorkerTx`] is dropped
/// or the channel fails.
pub(crate) fn start_writer(channel: Arc<Channel>, queue: usize, id: u32) -> WorkerTx {
    let (tx, mut rx) = WorkerTx::pair(queue);
    tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(AsFd::as_fd).collect();
            match channel.send(&out.msg, &fds).await {
                Ok(()) => {}
                Err(e) if e.is_bad_frame() => {
                    tracing::warn!(
                        worker = id,
                        "a message for the worker could not be sent: {e}"
                    );
                }
                Err(e) => {
                    tracing::debug!(worker = id, "channel to the worker failed: {e}");
                    break;
                }
            }
        }
    });
    tx
}

/// The reader: forwards the worker's messages until its process exits, then what is left in
/// the channel (for at most a second: a descendant may hold a copy of the worker's end), then
/// the exit.
pub(crate) async fn run_reader(
    id: u32,
    mut child: tokio::process::Child,
    channel: Arc<Channel>,
    to_supervisor: mpsc::Sender<(u32, FromWorker)>,
) {
    let send = |msg: FromWorker| {
        let to = to_supervisor.clone();
        async move { to.send((id, msg)).await.is_ok() }
    };
    let mut open = true;
    let mut handles = HeldHandles::default();
    let status = loop {
        tokio::select! {
            // Messages first: what a worker said before it exited is handled before its exit.
            biased;
            msg = channel.recv::<ToPrimary>(), if open => {
                match classify(msg, id, &mut handles) {
                    Some(m) => {
                        if !send(m).await {
                            return;
                        }
                    }
                    None => {
                        open = false;
                        if !send(FromWorker::Closed).await {
                            return;
                        }
                    }
                }
            }
            status = child.wait() => break status,
        }
    };
    while open {
        match tokio::time::timeout(Duration::from_secs(1), channel.recv::<ToPrimary>()).await {
            Ok(msg) => match classify(msg, id, &mut handles) {
                Some(m) => {
                    if !send(m).await {
                        return;
                    }
                }
                None => {
                    open = false;
                    if !send(FromWorker::Closed).await {
                        return;
                    }
                }
            },
            Err(_) => break,
        }
    }
    if open {
        // The process is gone; a descendant holds the channel. It counts as closed.
        if !send(FromWorker::Closed).await {
            return;
        }
    }
    send(FromWorker::Exited(status)).await;
}

/// One receive as what to report; `None` when the channel is closed or failed.
fn classify(
    msg: Result<Option<(ToPrimary, Vec<OwnedFd>)>, ChannelError>,
    id: u32,
    handles: &mut HeldHandles,
) -> Option<FromWorker> {
    match msg {
        // Only a user message with a handle carries a descriptor (the channel checked the
        // count, and `MSG_CTRUNC`: a truncated one is a bad frame with every descriptor closed).
        // It is checked here; every path that does not keep it closes it by dropping it.
        Ok(Some((m, fds))) => {
            let handle = match (&m, fds.into_iter().next()) {
                (
                    ToPrimary::Message {
                        handle: Some(kind), ..
                    },
                    Some(fd),
                ) => match handles.take(id, kind, fd) {
                    Ok(handle) => handle,
                    Err(e) => return Some(FromWorker::BadFrame(e)),
                },
                _ => None,
            };
            Some(FromWorker::Message(m, handle))
        }
        Ok(None) => None,
        Err(e) if e.is_bad_frame() => Some(FromWorker::BadFrame(e)),
        Err(e) => {
            tracing::debug!("channel from a worker failed: {e}");
            None
        }
    }
}
