//! The netcluster supervisor: a [`Cluster`] starts worker processes, shares listening sockets
//! with them over a channel (`SCM_RIGHTS`), restarts them when they crash, scales them, and
//! stops them gracefully.
//!
//! One loop owns every worker, slot and listener (`supervisor.rs` in the
//! source); everything else sends it commands through a [`ClusterHandle`]:
//!
//! - [`Cluster`], [`ClusterHandle`], [`WorkerHandle`]: the library API (Node's `cluster`).
//! - [`Settings`], [`ClusterBuilder`], [`Backoff`], [`Limits`], [`Timeouts`], [`WorkerUser`].
//! - [`Event`], [`Events`]: Node's cluster events, to any number of subscribers.
//! - [`signals`]: OS signals as commands. [`control`]: the control socket and its client.
//! - [`Status`]: what `netcluster status` shows.
//! - [`systemd`]: socket activation, `sd_notify`, the file-descriptor store.
//! - [`upgrade`]: replacing the primary's own binary without closing a listener.
//! - [`registry`]: listeners and the [`SchedulingPolicy`]; a [`ListenerRecord`] is a listener
//!   as it passes between owners (export, hand-over, adoption).

/// This crate's version (the workspace's: the `netcluster` binary's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this was built from (`git rev-parse --short HEAD` at build time), or `unknown`.
pub const COMMIT: &str = env!("NETCLUSTER_COMMIT");
/// `0.1.0 (commit 1a2b3c4)`: what `netcluster --version` prints after the name.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NETCLUSTER_COMMIT"),
    ")"
);

mod cluster;
mod command;
mod containment;
pub mod control;
mod counts;
mod credentials;
mod error;
mod event;
pub mod output;
pub mod registry;
mod round_robin;
mod settings;
pub mod signals;
mod spawn;
mod status;
mod supervisor;
pub mod systemd;
pub mod upgrade;
mod worker;
mod worker_handle;

pub use cluster::{Cluster, ClusterHandle};
pub use command::{Export, ScaleReport, ScaleTo, StopMode};
pub use credentials::{CredentialsError, WorkerUser};
pub use error::Error;
pub use event::{
    Event, Events, MAX_HELD_HANDLES, MessageHandle, MessageHandleKind, UserMessage, WorkerInfo,
};
pub use netcluster_protocol::handover::{ListenerInfo, ListenerRecord};
pub use registry::SchedulingPolicy;
pub use settings::{
    Backoff, ClusterBuilder, DEFAULT_DRAIN_TIMEOUT, Limits, MAX_WORKERS, Readiness, Recycle,
    Settings, Timeouts, Watchdog, WorkerKind, inherited_fds,
};
pub use spawn::{GENERATION_ENV, SLOT_ENV};
pub use status::{ListenerStatus, ReloadStatus, STATUS_SCHEMA, SlotStatus, Status, WorkerStatus};
pub use supervisor::ReloadReport;
pub use upgrade::{Incoming, UpgradeReport, Upgrader};
pub use worker::state::WorkerState;
pub use worker_handle::{SendHandle, WorkerHandle};
