//! Node's `net` module in Rust: [`Server`], [`Socket`], [`ListenOptions`].
//!
//! In a process started by a netcluster primary, a non-exclusive [`Server::listen`] shares the
//! primary's listening socket (see [`crate::cluster`]); elsewhere it binds its own.

mod blocklist;
mod connect;
mod encoding;
mod family;
mod from_fd;
mod idle;
mod ip;
mod listen;
mod server;
mod socket;
mod socket_address;

pub use blocklist::{AddressInput, BlockList, BlockListError};
pub use connect::{
    ConnectError, ConnectOptions, Lookup, LookupEvent, LookupOptions, OnLookup, connect,
    create_connection, hints,
};
pub use encoding::{Encoding, UnknownEncoding};
pub use family::{Family, InvalidFamily};
pub use from_fd::{FromFdOptions, SocketType};
pub use idle::IdleTimeout;
pub use ip::{is_ip, is_ipv4, is_ipv6};
pub use listen::ListenOptions;
pub use netcluster_protocol::message::BoundAddress;
pub use server::{DropInfo, RemoteCount, Server, ServerOptions, register_remote_count};
pub use socket::Socket;
pub use socket::{AddressInfo, OnReadEnd, ReadyState};
pub use socket_address::{SocketAddress, SocketAddressError, SocketAddressOptions};
