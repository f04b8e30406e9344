//! The netcluster supervisor: a [`Cluster`] starts worker processes by re-executing a program
//! with a channel at fd 3, shares listening sockets with them over that channel
//! (`SCM_RIGHTS`), reports their lifecycle and stops them gracefully.
//!
//! - [`cluster`]: [`Cluster`], [`Settings`], [`Event`].
//! - [`registry`]: the shared listening sockets, one per listen key.

pub mod cluster;
pub mod registry;

pub use cluster::{
    Cluster, DEFAULT_DRAIN_TIMEOUT, Event, Settings, UserMessage, WorkerHandle, WorkerInfo,
    WorkerState,
};
