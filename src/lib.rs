//! netcluster: Node.js's `net` module and its cluster-style handle passing, in Rust.
//!
//! A primary process binds listening sockets and passes their descriptors to worker processes
//! over Unix sockets (`SCM_RIGHTS`); workers serve connections with a Node-shaped
//! [`net::Server`]. The same program is both: [`cluster::role`] tells which side it is on.
//!
//! - [`net`]: `Server`, `Socket`, `ListenOptions` (crate `netcluster-worker`).
//! - [`cluster`]: the primary's [`cluster::Cluster`] (crate `netcluster-primary`) and the
//!   worker's connection to it ([`cluster::worker`]).
//! - [`protocol`]: the wire protocol (crate `netcluster-protocol`).
//! - [`apps`]: the applications `netcluster serve` runs.
//! - [`cli`]: the command line's value parsers.
//! - [`instances`]: what `netcluster ls` prints.
//! - [`serve`]: how `netcluster serve` matches its `--listen` values with systemd's sockets.

// The README's Rust examples are compiled (not run) as doc tests of this crate.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod apps;
pub mod cli;
#[doc(hidden)]
pub mod fuzzing;
pub mod instances;
pub mod serve;

pub use netcluster_protocol as protocol;
pub use netcluster_worker::net;

/// Both sides of a cluster: the primary's supervisor and the worker's view.
pub mod cluster {
    pub use netcluster_primary::{
        Backoff, Cluster, ClusterBuilder, ClusterHandle, DEFAULT_DRAIN_TIMEOUT, Error, Event,
        Events, Limits, Readiness, ReloadReport, ScaleReport, ScaleTo, SchedulingPolicy,
        SendHandle, Settings, Status, StopMode, Timeouts, UserMessage, WorkerHandle, WorkerInfo,
        WorkerKind, WorkerState, inherited_fds,
    };
    pub use netcluster_primary::{COMMIT, VERSION, VERSION_LINE};
    pub use netcluster_primary::{
        Export, Incoming, ListenerInfo, ListenerRecord, UpgradeReport, Upgrader, control, registry,
        signals, systemd, upgrade,
    };
    pub use netcluster_primary::{
        ListenerStatus, ReloadStatus, STATUS_SCHEMA, SlotStatus, WorkerStatus,
    };
    pub use netcluster_primary::{MAX_HELD_HANDLES, MessageHandle, MessageHandleKind};
    pub use netcluster_worker::cluster::{
        OutgoingHandle, ReceivedHandle, ReceivedServer, Role, StopReason, Worker, is_worker, role,
        worker,
    };
}

/// Sends `tracing` output to stderr, filtered by `NETCLUSTER_LOG` (default `info`), with colours
/// only on a terminal. For the `netcluster` binary and the examples.
///
/// A log line that cannot be written (a stderr whose reader is gone: a dead `| tee`) is dropped
/// silently: no log write may stand between a worker and its shutdown.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETCLUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}
