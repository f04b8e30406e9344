//! `new net.Socket({fd, allowHalfOpen, readable, writable})`: a [`Socket`](super::Socket) over a
//! connected stream socket this process already has, validated first.

use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::str::FromStr;

use netcluster_protocol::fd::dup_raw;
use nix::libc;
use socket2::{Domain, Type};
use tokio::net::UnixStream;

use super::socket::Stream;
use super::tcp::Tcp;

/// The kind of a socket, as Node's early `new net.Socket({type})` named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketType {
    /// TCP over IPv4, `'tcp4'`.
    Tcp4,
    /// TCP over IPv6, `'tcp6'`.
    Tcp6,
    /// A Unix stream socket, `'unix'`.
    Unix,
}

impl SocketType {
    /// Node's name: `"tcp4"`, `"tcp6"` or `"unix"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketType::Tcp4 => "tcp4",
            SocketType::Tcp6 => "tcp6",
            SocketType::Unix => "unix",
        }
    }
}

impl fmt::Display for SocketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SocketType {
    type Err = io::Error;

    /// Parses `"tcp4"`, `"tcp6"` or `"unix"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp4" => Ok(SocketType::Tcp4),
            "tcp6" => Ok(SocketType::Tcp6),
            "unix" => Ok(SocketType::Unix),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid socket type {s:?}: expected \"tcp4\", \"tcp6\" or \"unix\""),
            )),
        }
    }
}

/// Options of `new net.Socket({fd, allowHalfOpen, readable, writable})` for
/// [`Socket::from_fd`](super::Socket::from_fd).
///
/// `readable` and `writable` default to `true`. (Node's documentation says `false`, but Node
/// only disables a side when the option is explicitly `false`; this follows what Node does.)
///
/// ```
/// use netcluster_worker::net::FromFdOptions;
/// let options = FromFdOptions::new(3).allow_half_open(true).writable(false);
/// assert!(options.readable && !options.writable);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromFdOptions {
    /// The descriptor: a connected TCP or Unix stream socket. The socket takes a duplicate;
    /// the number stays open and is still the caller's to close.
    pub fd: RawFd,
    /// Keep the writable side open after the peer ends.
    pub allow_half_open: bool,
    /// Read from the socket; when `false`, reads see the end of the stream at once.
    pub readable: bool,
    /// Write to the socket; when `false`, writes fail.
    pub writable: bool,
    /// When set, the descriptor must be a socket of this type.
    pub socket_type: Option<SocketType>,
}

impl FromFdOptions {
    /// Options for descriptor `fd`: readable, writable, not half-open.
    pub fn new(fd: RawFd) -> FromFdOptions {
        FromFdOptions {
            fd,
            allow_half_open: false,
            readable: true,
            writable: true,
            socket_type: None,
        }
    }

    /// Sets `allowHalfOpen`.
    #[must_use]
    pub fn allow_half_open(mut self, allow: bool) -> Self {
        self.allow_half_open = allow;
        self
    }

    /// Sets `readable`.
    #[must_use]
    pub fn readable(mut self, readable: bool) -> Self {
        self.readable = readable;
        self
    }

    /// Sets `writable`.
    #[must_use]
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Requires the descriptor to be a socket of this type (`type: 'tcp4' | 'tcp6' | 'unix'`).
    #[must_use]
    pub fn socket_type(mut self, socket_type: SocketType) -> Self {
        self.socket_type = Some(socket_type);
        self
    }
}

impl From<RawFd> for FromFdOptions {
    fn from(fd: RawFd) -> Self {
        FromFdOptions::new(fd)
    }
}

/// Duplicates and validates `options.fd` and registers the duplicate with tokio.
pub(crate) fn adopt(options: &FromFdOptions) -> io::Result<(Stream, SocketType)> {
    let fd = options.fd;
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(format!(
            "socket from fd {fd}: must be called within a tokio runtime"
        )));
    }
    let owned = dup_raw(fd)
        .map_err(|e| io::Error::new(e.kind(), format!("fd {fd} is not an open descriptor: {e}")))?;
    let socket = socket2::Socket::from(owned);
    let ty = match socket.r#type() {
        Ok(ty) => ty,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            let what = describe(OwnedFd::from(socket));
            return Err(invalid(format!("fd {fd} is not a socket: it is {what}")));
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("fd {fd}: {e}"))),
    };
    if ty != Type::STREAM {
        return Err(invalid(format!("fd {fd} is not a stream socket ({ty:?})")));
    }
    let domain = socket
        .domain()
        .map_err(|e| io::Error::new(e.kind(), format!("fd {fd}: {e}")))?;
    let kind = if domain == Domain::IPV4 {
        SocketType::Tcp4
    } else if domain == Domain::IPV6 {
        SocketType::Tcp6
    } else if domain == Domain::UNIX {
        SocketType::Unix
    } else {
        return Err(invalid(format!(
            "fd {fd} is a stream socket of an unsupported family ({domain:?})"
        )));
    };
    if let Some(wanted) = options.socket_type {
        if wanted != kind {
            return Err(invalid(format!(
                "fd {fd} is a {kind} socket, not the {wanted} socket asked for"
            )));
        }
    }
    if socket.is_listener().unwrap_or(false) {
        return Err(invalid(format!(
            "fd {fd} is a listening socket, not a connection (listen on it with ListenOptions::fd)"
        )));
    }
    if let Err(e) = socket.peer_addr() {
        return Err(if e.raw_os_error() == Some(libc::ENOTCONN) {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("fd {fd} is a {kind} socket that is not connected"),
            )
        } else {
            io::Error::new(e.kind(), format!("fd {fd}: {e}"))
        });
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| io::Error::new(e.kind(), format!("fd {fd}: {e}")))?;
    let owned = OwnedFd::from(socket);
    let stream = match kind {
        SocketType::Tcp4 | SocketType::Tcp6 => {
            Stream::Tcp(Tcp::direct(std::net::TcpStream::from(owned)))
        }
        SocketType::Unix => Stream::Unix(UnixStream::from_std(
            std::os::unix::net::UnixStream::from(owned),
        )?),
    };
    Ok((stream, kind))
}

/// What a descriptor that is not a socket is, for the error message.
fn describe(fd: OwnedFd) -> &'static str {
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return "not a socket";
    };
    let ft = meta.file_type();
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a pipe"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a socket"
    }
}
