//! The wire protocol between a netcluster primary and its workers.
//!
//! - [`message`]: the serde messages in both directions and the listen key.
//! - [`codec`]: postcard framing with a version byte and a size limit.
//! - [`fd`]: `sendmsg`/`recvmsg` with `SCM_RIGHTS`.
//! - [`channel`]: an async `SOCK_SEQPACKET` channel that sends a message plus descriptors.
//! - [`child`]: what a worker does between `fork` and `exec` (parent-death signal, cgroup).
//! - [`listening`]: binding and validating listening sockets.
//! - [`handover`]: how a primary hands its listeners to the next (a primary upgrade).
//! - [`env`](mod@env): the environment variables that make a process a worker.
//! - [`guardian`]: the process that stops the workers' trees when their primary dies.
//! - [`start`]: what runs before `main` (the channel's close-on-exec, the exec shim).
//! - [`steer`]: accept-queue lengths and reuseport steering, to move listeners without loss.
//! - [`privileges`]: what a worker becomes between `fork` and `exec` (another user, a
//!   descriptor limit).
//!
//! All of the project's `unsafe` code is in this crate, in [`fd`], [`start`], [`steer`],
//! [`child`], [`privileges`] and [`guardian`] (each block with its `SAFETY:` reason); every
//! other crate denies `unsafe_code`.

pub mod channel;
pub mod child;
pub mod codec;
pub mod env;
pub mod fd;
pub mod guardian;
pub mod handover;
pub mod listening;
pub mod message;
pub mod privileges;
pub mod start;
pub mod steer;

pub use channel::{Channel, ChannelError};
pub use codec::CodecError;
pub use listening::ListenError;
pub use message::{
    BoundAddress, Frame, Grant, HandleKind, ListenKey, ListenParams, ListenTarget,
    PROTOCOL_VERSION, ToPrimary, ToWorker,
};
