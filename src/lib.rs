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
//! - [`config`]: `netcluster serve`'s options, from the command line and from a TOML file.
//! - [`instances`]: what `netcluster ls` prints.
//! - [`serve`]: how `netcluster serve` matches its `--listen` values with systemd's sockets.

// The README's Rust examples are compiled (not run) as doc tests of this crate.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod apps;
pub mod cli;
pub mod config;
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
        Events, Limits, Readiness, Recycle, ReloadReport, ScaleReport, ScaleTo, SchedulingPolicy,
        SendHandle, Settings, Status, StopMode, Timeouts, UserMessage, Watchdog, WorkerHandle,
        WorkerInfo, WorkerKind, WorkerState, inherited_fds,
    };
    pub use netcluster_primary::{COMMIT, VERSION, VERSION_LINE};
    pub use netcluster_primary::{CredentialsError, WorkerUser};
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
/// Log lines are written by a thread of their own (`tracing-appender`'s non-blocking writer,
/// lossy): a stderr that does not keep up (a full pipe nobody reads) never blocks the process,
/// its lines are dropped instead, at most [`LOG_QUEUE`] lines wait, and `netcluster status`
/// counts the dropped ones (`log_dropped_lines`). A line that cannot be written (a stderr whose
/// reader is gone: a dead `| tee`) is dropped silently: no log write may stand between a worker
/// and its shutdown. Call [`flush_logs`] before the process ends, or its last lines may be lost.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETCLUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE)
        .thread_name("netcluster-log")
        .finish(std::io::stderr());
    let drops = writer.error_counter();
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer)
        .log_internal_errors(false)
        .try_init();
    if installed.is_ok() {
        netcluster_primary::output::count_log_drops(move || drops.dropped_lines() as u64);
        if let Ok(mut held) = LOG_GUARD.lock() {
            *held = Some(guard);
        }
    }
}

/// How many log lines wait for a slow stderr before further ones are dropped.
pub const LOG_QUEUE: usize = 4096;

static LOG_GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes out the log lines still queued by [`init_tracing`]'s writer, waiting at most about a
/// second and a half (a stderr that does not take them costs no more); lines logged afterwards
/// are lost. For the end of `main`.
pub fn flush_logs() {
    let Some(guard) = LOG_GUARD.lock().ok().and_then(|mut g| g.take()) else {
        return;
    };
    // Dropping the guard flushes; it may print to stdout when it gives up, so it runs on a
    // thread of its own that this one waits for only so long.
    let (done, wait) = std::sync::mpsc::channel();
    let flushing = std::thread::Builder::new()
        .name("netcluster-log-flush".into())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    if flushing.is_ok() {
        let _ = wait.recv_timeout(std::time::Duration::from_millis(1500));
    }
}
