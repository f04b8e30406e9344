//! The commands the supervisor takes. Every operation — from the library
//! ([`ClusterHandle`](crate::ClusterHandle)), OS signals ([`signals`](crate::signals)) and the
//! control socket ([`control`](crate::control)) — is one of these, sent to the one loop that
//! owns the workers and listeners, with a oneshot for its reply.

use std::os::fd::OwnedFd;

use netcluster_protocol::handover::ListenerRecord;
use netcluster_protocol::message::{
    BoundAddress, CountError, ListenParams, ListenTarget, ToWorker,
};
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::event::{Event, WorkerInfo};
use crate::status::Status;

/// A command's reply channel.
pub(crate) type Reply<T> = oneshot::Sender<T>;

/// The answers to come of a cluster-wide count, one per listener at the address.
pub(crate) type CountAnswers = Vec<oneshot::Receiver<Result<u64, CountError>>>;

/// How many workers to scale to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    /// Exactly this many.
    Exactly(usize),
    /// This many more (or fewer, when negative); never below one.
    By(i64),
}

/// What a scale did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScaleReport {
    /// Workers wanted before.
    pub from: usize,
    /// Workers wanted now.
    pub to: usize,
    /// Workers started, now ready.
    pub started: Vec<u32>,
    /// Workers drained and exited.
    pub stopped: Vec<u32>,
}

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Stop accepting, hand off what was accepted, let workers finish their connections up to
    /// the drain deadline, then kill what is left.
    Graceful,
    /// Kill every worker now.
    Now,
    /// Another primary has taken the listeners over (an upgrade): this one lets its workers
    /// finish, but leaves the sockets as they are — no filter, no waiting for their queues —
    /// since they go on accepting for the new primary.
    Handover,
}

/// One operation for the supervisor.
#[derive(Debug)]
pub(crate) enum Command {
    Share {
        target: ListenTarget,
        params: ListenParams,
        name: Option<String>,
        reply: Reply<Result<BoundAddress, Error>>,
    },
    Start {
        reply: Reply<Result<Vec<WorkerInfo>, Error>>,
    },
    Fork {
        reply: Reply<Result<WorkerInfo, Error>>,
    },
    Scale {
        to: ScaleTo,
        reply: Reply<Result<ScaleReport, Error>>,
    },
    Workers {
        reply: Reply<Vec<WorkerInfo>>,
    },
    Worker {
        id: u32,
        reply: Reply<Option<WorkerInfo>>,
    },
    Status {
        reply: Reply<Status>,
    },
    Count {
        address: BoundAddress,
        reply: Reply<Result<CountAnswers, Error>>,
    },
    CountSent {
        worker: u32,
        origin: u64,
        reply: Reply<Option<oneshot::Receiver<Result<u64, CountError>>>>,
    },
    Send {
        worker: u32,
        msg: ToWorker,
        fds: Vec<OwnedFd>,
        reply: Reply<Result<(), Error>>,
    },
    Disconnect {
        worker: u32,
        reply: Reply<Result<(), Error>>,
    },
    Kill {
        worker: u32,
        signal: Signal,
        reply: Reply<Result<(), Error>>,
    },
    Stop {
        mode: StopMode,
        reply: Option<Reply<Vec<Event>>>,
    },
    /// Another primary (process `successor`) took the listeners over: stop as
    /// [`StopMode::Handover`], and say who serves now.
    HandOver {
        successor: u32,
    },
    Reload {
        reply: Reply<Result<crate::supervisor::ReloadReport, Error>>,
    },
    Adopt {
        listener: ListenerRecord,
        reply: Reply<Result<BoundAddress, Error>>,
    },
    Export {
        reply: Reply<Result<Export, Error>>,
    },
    AnnounceReady,
}

/// What a primary hands the next one (an upgrade): its listeners, and how far it got.
#[derive(Debug)]
pub struct Export {
    /// Every listener, with duplicates of its sockets.
    pub listeners: Vec<ListenerRecord>,
    /// The generation its workers run.
    pub generation: u64,
    /// How many workers it runs (its slots).
    pub workers: usize,
}
