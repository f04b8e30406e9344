//! The netcluster supervisor: a [`Cluster`] starts worker processes by re-executing a program
//! with a channel at fd 3, shares listening sockets with them over that channel
//! (`SCM_RIGHTS`), reports their lifecycle and stops them gracefully.
//!
//! - [`cluster`]: [`Cluster`], [`Settings`], [`Event`].
//! - [`registry`]: the shared listening sockets, one per listen key, and the
//!   [`SchedulingPolicy`].
//! - [`round_robin`]: the primary-side accept loop that hands connections to workers in turn.

pub mod cluster;
pub mod registry;
pub mod round_robin;

pub use cluster::{
    Cluster, ClusterBuilder, DEFAULT_DRAIN_TIMEOUT, Event, SendHandle, Settings, UserMessage,
    WorkerHandle, WorkerInfo, WorkerState,
};
pub use registry::SchedulingPolicy;
