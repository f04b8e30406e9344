//! The worker side of netcluster: the Node-shaped [`net`] API and the [`cluster`] connection to
//! the primary.
//!
//! A program written against [`net::Server`] runs the same alone or as a cluster worker: when a
//! netcluster primary started the process, `listen` shares the primary's socket instead of
//! binding its own.

pub mod cluster;
pub mod net;
