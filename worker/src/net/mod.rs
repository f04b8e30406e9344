//! Node's `net` module in Rust: [`Server`], [`Socket`], [`ListenOptions`].
//!
//! In a process started by a netcluster primary, a non-exclusive [`Server::listen`] shares the
//! primary's listening socket (see [`crate::cluster`]); elsewhere it binds its own.

mod blocklist;
mod family;
mod ip;
mod listen;
mod server;
mod socket;
mod socket_address;

pub use blocklist::{AddressInput, BlockList, BlockListError};
pub use family::{Family, InvalidFamily};
pub use ip::{is_ip, is_ipv4, is_ipv6};
pub use listen::ListenOptions;
pub use netcluster_protocol::message::BoundAddress;
pub use server::Server;
pub use socket::Socket;
pub use socket_address::{SocketAddress, SocketAddressError, SocketAddressOptions};
