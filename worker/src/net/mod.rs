//! Node's `net` module in Rust: [`Server`], [`Socket`], [`ListenOptions`].
//!
//! In a process started by a netcluster primary, a non-exclusive [`Server::listen`] shares the
//! primary's listening socket (see [`crate::cluster`]); elsewhere it binds its own.

mod listen;
mod server;
mod socket;

pub use listen::ListenOptions;
pub use netcluster_protocol::message::BoundAddress;
pub use server::Server;
pub use socket::Socket;
