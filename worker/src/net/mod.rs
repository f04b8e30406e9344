//! Node's `net` module in Rust: [`Server`], [`Socket`], [`ListenOptions`], [`connect`],
//! [`BlockList`], [`SocketAddress`], [`is_ip`].
//!
//! In a process started by a netcluster primary, a non-exclusive [`Server::listen`] shares the
//! primary's listening socket (see [`crate::cluster`]); elsewhere it binds its own.
//!
//! The seeds' echo server and its client:
//!
//! ```no_run
//! use netcluster_worker::net::{self, ListenOptions, Server};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn f() -> std::io::Result<()> {
//! // const server = net.createServer((c) => { c.write('hello\r\n'); c.pipe(c); });
//! let server = Server::new(|mut c| async move {
//!     let _ = c.write_all(b"hello\r\n").await;
//!     let (mut r, mut w) = tokio::io::split(c);
//!     let _ = tokio::io::copy(&mut r, &mut w).await;
//!     let _ = w.shutdown().await;
//! });
//! server.listen(ListenOptions::port(8124)).await?; // server.listen(8124)
//!
//! // const client = net.createConnection({ port: 8124 }, () => client.write('world!\r\n'));
//! let mut client = net::create_connection(8124).await?;
//! client.write(b"world!\r\n")?;
//! let mut buf = [0u8; 64];
//! let n = client.read(&mut buf).await?; // client.on('data', …)
//! println!("{}", String::from_utf8_lossy(&buf[..n]));
//! client.end(None).await?; // client.end()
//! # Ok(()) }
//! ```

mod blocklist;
mod connect;
mod encoding;
mod exclusive;
mod family;
mod from_fd;
mod idle;
mod intake;
mod ip;
mod listen;
mod server;
mod socket;
mod socket_address;
mod tcp;
mod wake_one;

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
pub use server::{DropInfo, Origin, RemoteCount, Server, ServerOptions};
pub use socket::Socket;
pub use socket::{AddressInfo, OnReadEnd, ReadyState};
pub use socket_address::{SocketAddress, SocketAddressError, SocketAddressOptions};
