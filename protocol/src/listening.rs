//! Listening sockets: bind one for a [`ListenTarget`], or validate a descriptor someone handed
//! us, with the options Node uses (`SO_REUSEADDR`, backlog 511, `CLOEXEC | NONBLOCK`).
//!
//! Both the primary (shared handles) and a worker (exclusive listens) bind through here.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::message::{BoundAddress, ListenParams, ListenTarget};

/// Bytes of a Unix socket path that fit in `sockaddr_un.sun_path`, leaving room for the NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// A listen that failed, with the address it was for.
///
/// It converts into an [`io::Error`] of the same kind, and keeps the OS error number
/// ([`ListenError::errno`]) so a primary can forward it to a worker.
///
/// Its message already contains the OS error's, so it reports no separate
/// [`source`](std::error::Error::source): an error chain (`anyhow`'s `{:#}`) says the reason
/// once.
#[derive(Debug)]
pub struct ListenError {
    /// The address, path or descriptor that could not be listened on.
    pub address: String,
    /// What the OS (or the validation) said.
    pub source: io::Error,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listen {}: {}", self.address, self.source)
    }
}

impl std::error::Error for ListenError {}

impl ListenError {
    /// Builds an error for `address`.
    pub fn new(address: impl fmt::Display, source: io::Error) -> Self {
        Self {
            address: address.to_string(),
            source,
        }
    }

    /// The OS error number, when there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl From<ListenError> for io::Error {
    fn from(e: ListenError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Checks that a Unix socket path fits in `sun_path`.
///
/// # Errors
/// `InvalidInput` naming the path and its length: a longer path is never silently truncated.
pub fn check_unix_path(path: &Path) -> io::Result<()> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Unix socket path is empty",
        ));
    }
    if len > MAX_UNIX_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "Unix socket path {} is {len} bytes long; at most {MAX_UNIX_PATH} fit in sun_path",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Binds and listens on `target` with `params`, returning the listening socket (`CLOEXEC |
/// NONBLOCK`) and the address it is bound to (with the real port for port 0).
///
/// TCP sockets get `SO_REUSEADDR`; an IPv6 socket is dual-stack unless `params.ipv6_only`.
/// [`ListenTarget::TcpAny`] tries `[::]` and falls back to `0.0.0.0` when IPv6 is unavailable.
/// A Unix socket's file gets the `readable_all` / `writable_all` mode bits; an existing file at
/// the path is `EADDRINUSE` (as in Node: stale sockets are the caller's to remove).
/// [`ListenTarget::Fd`] is validated with [`adopt_listener`] after duplicating the descriptor.
///
/// # Errors
/// A [`ListenError`] naming the target, with the OS error (`EADDRINUSE`, `EACCES`, …).
pub fn bind_listener(
    target: &ListenTarget,
    params: &ListenParams,
) -> Result<(OwnedFd, BoundAddress), ListenError> {
    let named = |e: io::Error| ListenError::new(target, e);
    match target {
        ListenTarget::Tcp(addr) => bind_tcp(*addr, params).map_err(named),
        ListenTarget::TcpAny(port) => on_any_host(*port, |a| bind_tcp(a, params)).map_err(named),
        ListenTarget::Unix(path) => bind_unix(path, params).map_err(named),
        ListenTarget::Fd(fd) => {
            let owned = crate::fd::dup_raw(*fd).map_err(named)?;
            adopt_listener(owned, params.backlog).map_err(named)
        }
    }
}

/// Reserves `target`'s port for a reusePort group: a TCP socket with `SO_REUSEADDR` and
/// `SO_REUSEPORT`, bound but never listening, so it holds the port (port 0 becomes a real one)
/// without taking any of the group's connections. Workers then bind the returned address with
/// `SO_REUSEPORT` and listen.
///
/// # Errors
/// A [`ListenError`] naming the target; `InvalidInput` for targets that are not TCP.
pub fn reserve_reuse_port(
    target: &ListenTarget,
    params: &ListenParams,
) -> Result<(OwnedFd, BoundAddress), ListenError> {
    let reserve = |addr: SocketAddr| -> io::Result<(OwnedFd, BoundAddress)> {
        let reuse = ListenParams {
            reuse_port: true,
            ..params.clone()
        };
        let socket = bound_tcp(addr, &reuse)?;
        let bound = local_address(&socket)?;
        Ok((socket.into(), bound))
    };
    let named = |e: io::Error| ListenError::new(target, e);
    match target {
        ListenTarget::Tcp(addr) => reserve(*addr).map_err(named),
        ListenTarget::TcpAny(port) => on_any_host(*port, reserve).map_err(named),
        ListenTarget::Unix(_) | ListenTarget::Fd(_) => Err(named(io::Error::new(
            io::ErrorKind::InvalidInput,
            "reusePort applies to TCP addresses only",
        ))),
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn backlog(params: &ListenParams) -> i32 {
    i32::try_from(params.backlog).unwrap_or(i32::MAX)
}

/// A TCP socket (`CLOEXEC | NONBLOCK`, `SO_REUSEADDR`, `SO_REUSEPORT` if asked, dual stack
/// unless `ipv6_only`) bound to `addr`, not listening yet.
fn bound_tcp(addr: SocketAddr, params: &ListenParams) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if params.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(params.ipv6_only)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Runs `bind` on `[::]:port`, and on `0.0.0.0:port` when IPv6 is unavailable (a listen with
/// the host omitted).
fn on_any_host<T>(port: u16, bind: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<T> {
    match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Err(e) if ipv6_unavailable(&e) => bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
        other => other,
    }
}

fn bind_tcp(addr: SocketAddr, params: &ListenParams) -> io::Result<(OwnedFd, BoundAddress)> {
    let socket = bound_tcp(addr, params)?;
    socket.listen(backlog(params))?;
    let bound = local_address(&socket)?;
    Ok((socket.into(), bound))
}

/// A name for `path` that fits in `sun_path`: the path itself when it fits; for a longer
/// absolute path, the shorter of it and its form relative to the current directory, or else
/// `/proc/self/fd/N/NAME` through a descriptor of its directory (kept open, returned, until the
/// bind is done). Cluster workers resolve relative paths against their own directory, so the
/// primary gets absolute paths that can be longer than the path the user wrote.
fn bindable_unix_path(path: &Path) -> io::Result<(std::borrow::Cow<'_, Path>, Option<OwnedFd>)> {
    use std::borrow::Cow;
    if path.as_os_str().len() <= MAX_UNIX_PATH || !path.is_absolute() {
        check_unix_path(path)?;
        return Ok((Cow::Borrowed(path), None));
    }
    if let Ok(cwd) = std::env::current_dir() {
        if let Ok(rel) = path.strip_prefix(&cwd) {
            if !rel.as_os_str().is_empty() && rel.as_os_str().len() <= MAX_UNIX_PATH {
                return Ok((Cow::Owned(rel.to_path_buf()), None));
            }
        }
    }
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        use nix::fcntl::{OFlag, open};
        let dirfd = open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(io::Error::from)?;
        let via = Path::new("/proc/self/fd")
            .join(std::os::fd::AsRawFd::as_raw_fd(&dirfd).to_string())
            .join(name);
        if via.as_os_str().len() <= MAX_UNIX_PATH {
            return Ok((Cow::Owned(via), Some(dirfd)));
        }
    }
    check_unix_path(path)?;
    Ok((Cow::Borrowed(path), None))
}

fn bind_unix(path: &Path, params: &ListenParams) -> io::Result<(OwnedFd, BoundAddress)> {
    let (bind_path, _dirfd) = bindable_unix_path(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.bind(&SockAddr::unix(&*bind_path)?)?;
    if params.readable_all || params.writable_all {
        let mut bits = 0;
        if params.readable_all {
            bits |= 0o444;
        }
        if params.writable_all {
            bits |= 0o222;
        }
        let set = std::fs::metadata(path).and_then(|m| {
            let mode = m.permissions().mode() | bits;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        });
        if let Err(e) = set {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    if let Err(e) = socket.listen(backlog(params)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok((socket.into(), BoundAddress::Unix(path.to_path_buf())))
}

/// The address a socket is bound to.
fn local_address(socket: &Socket) -> io::Result<BoundAddress> {
    let addr = socket.local_addr()?;
    if let Some(sa) = addr.as_socket() {
        return Ok(BoundAddress::Tcp(sa));
    }
    Ok(BoundAddress::Unix(
        addr.as_pathname()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    ))
}

/// Validates a descriptor for `listen({fd})` / `listen(handle)` and makes it a listener: it must
/// be a socket, of stream type, bound (listening already, or listenable — then `listen(backlog)`
/// is called). It is made non-blocking.
///
/// The errors do not name the descriptor (the caller knows which number the user gave, which
/// may differ from `fd`'s own after a `dup`); [`bind_listener`] and the servers wrap them in a
/// [`ListenError`] naming it.
///
/// # Errors
/// `InvalidInput` when it is not a socket (a regular file, a pipe, a terminal) or not a stream
/// socket; the OS error of `listen(2)` otherwise.
pub fn adopt_listener(fd: OwnedFd, backlog: u32) -> io::Result<(OwnedFd, BoundAddress)> {
    let socket = Socket::from(fd);
    let ty = socket.r#type().map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            io::Error::new(io::ErrorKind::InvalidInput, "not a socket")
        } else {
            e
        }
    })?;
    if ty != Type::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a stream socket ({ty:?})"),
        ));
    }
    let bound = local_address(&socket)?;
    let unbound = match &bound {
        BoundAddress::Tcp(a) => a.port() == 0,
        BoundAddress::Unix(p) => p.as_os_str().is_empty(),
    };
    if unbound {
        // listen(2) on an unbound TCP socket binds it to a random port on every interface:
        // never what someone who passed a descriptor meant.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not bound to an address", describe(&socket)),
        ));
    }
    if !socket.is_listener()? {
        socket
            .listen(i32::try_from(backlog).unwrap_or(i32::MAX))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen: {e}")))?;
    }
    socket.set_nonblocking(true)?;
    Ok((socket.into(), bound))
}

/// Makes a listening TCP socket start no new handshake: a socket filter drops every packet
/// that opens a connection (SYN without ACK), while the handshakes already under way complete
/// (their final ACK passes) and join the accept queue, and what is queued stays to be accepted.
/// Give in-flight handshakes a moment (a round trip), then drain the socket and close it: no
/// connection completes its handshake only to be reset by the close, and a client whose SYN was
/// dropped retries and finds the port closed. Unix sockets are left alone.
///
/// The filter reads the TCP flags at offset 13 of the TCP header, where the kernel's socket
/// filter for TCP starts (`tcp_filter`).
///
/// # Errors
/// The error of `setsockopt(SO_ATTACH_FILTER)`.
pub fn refuse_new_connections(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use socket2::SockFilter;
    let sock = socket2::SockRef::from(&fd);
    match sock.domain()? {
        Domain::IPV4 | Domain::IPV6 => sock.attach_filter(&[
            // A = the TCP flags byte.
            SockFilter::new(0x30, 0, 0, 13), // BPF_LD | BPF_B | BPF_ABS
            // A &= SYN | ACK.
            SockFilter::new(0x54, 0, 0, 0x12), // BPF_ALU | BPF_AND | BPF_K
            // SYN alone: drop; anything else: keep.
            SockFilter::new(0x15, 0, 1, 0x02), // BPF_JMP | BPF_JEQ | BPF_K
            SockFilter::new(0x06, 0, 0, 0),    // BPF_RET | BPF_K: drop
            SockFilter::new(0x06, 0, 0, u32::MAX), // BPF_RET | BPF_K: keep all
        ]),
        _ => Ok(()),
    }
}

/// Removes a socket filter left by [`refuse_new_connections`] (a socket inherited from a
/// primary that stopped, or from systemd's store); a socket without one is fine.
///
/// # Errors
/// The error of `setsockopt(SO_DETACH_FILTER)` other than "no filter".
pub fn accept_new_connections(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let sock = socket2::SockRef::from(&fd);
    match sock.detach_filter() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Checks that `fd` is a listening stream socket (TCP or Unix) and returns its address, without
/// changing it: for descriptors handed to a primary (inherited ones, systemd's), which must
/// already listen.
///
/// # Errors
/// `InvalidInput` saying what the descriptor is instead ("a pipe", "a UDP socket", "a TCP
/// socket that is not listening", …).
pub fn check_listening(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<BoundAddress> {
    check_stream(fd, true)
}

/// Checks that `fd` is a TCP or Unix stream socket and returns the address it is bound to,
/// whether or not it listens (a reuseport reservation does not).
///
/// # Errors
/// `InvalidInput` saying what the descriptor is instead; the error of `getsockname(2)`.
pub fn check_bound(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<BoundAddress> {
    check_stream(fd, false)
}

/// Checks that `fd` is a connected TCP or Unix stream socket (what a `net.Socket` handle sent
/// with a message must be): not listening, with a peer. Returns its local address.
///
/// # Errors
/// `InvalidInput` saying what the descriptor is instead ("a pipe", "a listening TCP socket",
/// "a TCP socket that is not listening" for one with no peer, …).
pub fn check_connected(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<BoundAddress> {
    let not = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}, not a connected stream socket", describe_fd(fd)),
        )
    };
    let address = check_stream(fd, false).map_err(|_| not())?;
    let sock = socket2::SockRef::from(&fd);
    if sock.is_listener().map_err(|_| not())? || sock.peer_addr().is_err() {
        return Err(not());
    }
    Ok(address)
}

/// [`check_listening`] (with `listening`) or [`check_bound`].
fn check_stream(fd: std::os::fd::BorrowedFd<'_>, listening: bool) -> io::Result<BoundAddress> {
    let not = || {
        let what = if listening {
            "a listening stream socket"
        } else {
            "a stream socket"
        };
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}, not {what}", describe_fd(fd)),
        )
    };
    let sock = socket2::SockRef::from(&fd);
    if sock.r#type().map_err(|_| not())? != Type::STREAM {
        return Err(not());
    }
    let domain = sock.domain().map_err(|_| not())?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 && domain != Domain::UNIX {
        return Err(not());
    }
    if listening && !sock.is_listener().map_err(|_| not())? {
        return Err(not());
    }
    let addr = sock.local_addr()?;
    Ok(match addr.as_socket() {
        Some(sa) => BoundAddress::Tcp(sa),
        None => BoundAddress::Unix(
            addr.as_pathname()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ),
    })
}

/// What a descriptor is, in words, for error messages: "a regular file", "a pipe", "a UDP
/// socket", "a TCP socket that is not listening", "a listening Unix stream socket", "not open".
pub fn describe_fd(fd: std::os::fd::BorrowedFd<'_>) -> String {
    use nix::sys::stat::{SFlag, fstat};
    let st = match fstat(fd) {
        Ok(st) => st,
        Err(e) => return format!("not usable ({e})"),
    };
    let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let kind = match fmt {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFSOCK => return describe(&socket2::SockRef::from(&fd)),
        _ => "an unknown kind of file",
    };
    kind.to_string()
}

fn describe(sock: &Socket) -> String {
    let family = match sock.domain() {
        Ok(Domain::IPV4) | Ok(Domain::IPV6) => "",
        Ok(Domain::UNIX) => "Unix ",
        Ok(_) => "other-family ",
        Err(_) => "",
    };
    let (kind, stream) = match sock.r#type() {
        Ok(Type::STREAM) if family.is_empty() => ("TCP socket", true),
        Ok(Type::STREAM) => ("stream socket", true),
        Ok(Type::DGRAM) if family.is_empty() => ("UDP socket", false),
        Ok(Type::DGRAM) => ("datagram socket", false),
        Ok(Type::SEQPACKET) => ("seqpacket socket", false),
        Ok(_) | Err(_) => ("socket", false),
    };
    if stream {
        match sock.is_listener() {
            Ok(true) => format!("a listening {family}{kind}"),
            _ => format!("a {family}{kind} that is not listening"),
        }
    } else {
        format!("a {family}{kind}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn params() -> ListenParams {
        ListenParams::default()
    }

    #[test]
    fn tcp_port_zero_reports_the_real_port_and_sets_options() {
        let (fd, bound) = bind_listener(
            &ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")),
            &params(),
        )
        .expect("bind");
        let BoundAddress::Tcp(addr) = bound else {
            panic!("not tcp")
        };
        assert_ne!(addr.port(), 0);
        let s = Socket::from(fd);
        assert!(s.reuse_address().expect("opt"));
        assert!(s.is_listener().expect("opt"));
        assert!(s.nonblocking().expect("opt"));
        std::net::TcpStream::connect(addr).expect("connect");
    }

    #[test]
    fn tcp_in_use_is_eaddrinuse_naming_the_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let err = bind_listener(&ListenTarget::Tcp(addr), &params()).expect_err("in use");
        assert_eq!(err.errno(), Some(libc::EADDRINUSE));
        assert!(
            err.to_string().starts_with(&format!("listen {addr}: ")),
            "{err}"
        );
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn reuse_port_lets_two_sockets_share_a_port() {
        let p = ListenParams {
            reuse_port: true,
            ..params()
        };
        let (a, bound) =
            bind_listener(&ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")), &p)
                .expect("first");
        let BoundAddress::Tcp(addr) = bound else {
            panic!("not tcp")
        };
        let (b, _) = bind_listener(&ListenTarget::Tcp(addr), &p).expect("second on the same port");
        assert!(socket2::SockRef::from(&a).reuse_port().expect("opt"));
        assert!(socket2::SockRef::from(&b).reuse_port().expect("opt"));
        let err = bind_listener(&ListenTarget::Tcp(addr), &params()).expect_err("without it");
        assert_eq!(err.errno(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn a_reservation_holds_the_port_without_taking_connections() {
        let p = ListenParams {
            reuse_port: true,
            ..params()
        };
        let (_reserved, bound) =
            reserve_reuse_port(&ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")), &p)
                .expect("reserve");
        let BoundAddress::Tcp(addr) = bound else {
            panic!("not tcp")
        };
        assert_ne!(addr.port(), 0);
        // Nobody listens yet: connecting is refused, not queued in the reservation.
        assert!(std::net::TcpStream::connect(addr).is_err());
        let (_l, _) = bind_listener(&ListenTarget::Tcp(addr), &p).expect("join the group");
        std::net::TcpStream::connect(addr).expect("the listener takes it");
        let err = bind_listener(&ListenTarget::Tcp(addr), &params()).expect_err("outsider");
        assert_eq!(err.errno(), Some(libc::EADDRINUSE));
        assert!(reserve_reuse_port(&ListenTarget::Fd(3), &p).is_err());
    }

    #[test]
    fn any_host_binds_dual_stack_or_v4() {
        let (_fd, bound) = bind_listener(&ListenTarget::TcpAny(0), &params()).expect("bind");
        let BoundAddress::Tcp(addr) = bound else {
            panic!("not tcp")
        };
        assert!(addr.ip().is_unspecified());
        std::net::TcpStream::connect(("127.0.0.1", addr.port())).expect("v4 reaches it");
    }

    #[test]
    fn unix_path_too_long_is_refused_not_truncated() {
        let long = format!("/tmp/{}", "x".repeat(120));
        let err = bind_listener(&ListenTarget::Unix(long.clone().into()), &params())
            .expect_err("too long");
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidInput);
        assert!(!Path::new(&long).exists());
        let err = check_unix_path(Path::new(&long)).expect_err("too long");
        assert!(
            err.to_string().contains("125 bytes long; at most 107"),
            "{err}"
        );
    }

    #[test]
    fn a_long_absolute_path_is_bound_through_a_shorter_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut deep = dir.path().to_path_buf();
        while deep.as_os_str().len() < 150 {
            deep.push("a-directory-with-a-long-name");
        }
        std::fs::create_dir_all(&deep).expect("mkdir");
        let path = deep.join("s.sock");
        assert!(path.as_os_str().len() > MAX_UNIX_PATH);
        let (_fd, bound) =
            bind_listener(&ListenTarget::Unix(path.clone()), &params()).expect("bind");
        assert_eq!(bound, BoundAddress::Unix(path.clone()));
        assert!(path.exists(), "the socket file is at the long path");
        let err = bind_listener(&ListenTarget::Unix(path.clone()), &params()).expect_err("in use");
        assert_eq!(err.errno(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn unix_socket_gets_mode_bits_and_existing_file_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let p = ListenParams {
            readable_all: true,
            writable_all: true,
            ..params()
        };
        let (_fd, bound) = bind_listener(&ListenTarget::Unix(path.clone()), &p).expect("bind");
        assert_eq!(bound, BoundAddress::Unix(path.clone()));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o666, 0o666, "mode {mode:o}");
        let err = bind_listener(&ListenTarget::Unix(path.clone()), &params()).expect_err("in use");
        assert_eq!(err.errno(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn adopt_rejects_files_and_datagram_sockets() {
        let file = tempfile::tempfile().expect("file");
        let err = adopt_listener(file.into(), 511).expect_err("file");
        assert_eq!(err.to_string(), "not a socket");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let err = adopt_listener(udp.into(), 511).expect_err("udp");
        assert!(err.to_string().starts_with("not a stream socket"), "{err}");
    }

    #[test]
    fn adopt_listens_on_a_bound_socket() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let (fd, bound) = adopt_listener(s.into(), 16).expect("adopt");
        let BoundAddress::Tcp(addr) = bound else {
            panic!("not tcp")
        };
        assert!(Socket::from(fd).is_listener().expect("opt"));
        assert_ne!(addr.port(), 0);
    }

    #[test]
    fn adopt_refuses_an_unbound_socket() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let err = adopt_listener(s.into(), 16).expect_err("unbound");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "a TCP socket that is not listening is not bound to an address"
        );
    }

    #[test]
    fn check_connected_takes_only_a_connected_stream_socket() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (served, _) = listener.accept().expect("accept");
        assert_eq!(
            check_connected(served.as_fd()).expect("accepted"),
            BoundAddress::Tcp(addr)
        );
        check_connected(client.as_fd()).expect("connected");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(
            check_connected(a.as_fd()).expect("unix pair"),
            BoundAddress::Unix(Default::default())
        );
        let err = check_connected(listener.as_fd()).expect_err("listening");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "a listening TCP socket, not a connected stream socket"
        );
        let unconnected = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let err = check_connected(unconnected.as_fd()).expect_err("no peer");
        assert_eq!(
            err.to_string(),
            "a TCP socket that is not listening, not a connected stream socket"
        );
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let err = check_connected(r.as_fd()).expect_err("pipe");
        assert_eq!(err.to_string(), "a pipe, not a connected stream socket");
    }

    #[test]
    fn check_listening_says_what_a_descriptor_is() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(
            check_listening(l.as_fd()).expect("listening"),
            BoundAddress::Tcp(l.local_addr().expect("addr"))
        );
        let file = tempfile::tempfile().expect("file");
        assert_eq!(
            check_listening(file.as_fd()).expect_err("file").to_string(),
            "a regular file, not a listening stream socket"
        );
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert_eq!(describe_fd(r.as_fd()), "a pipe");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert_eq!(describe_fd(udp.as_fd()), "a UDP socket");
        let bound = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        bound
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        assert_eq!(
            check_listening(bound.as_fd())
                .expect_err("not listening")
                .to_string(),
            "a TCP socket that is not listening, not a listening stream socket"
        );
        let dir = tempfile::tempdir().expect("dir");
        let u = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("unix");
        assert_eq!(describe_fd(u.as_fd()), "a listening Unix stream socket");
    }

    #[test]
    fn a_refusing_listener_keeps_its_queue_and_completes_no_new_handshake() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let queued = std::net::TcpStream::connect(addr).expect("connect");
        refuse_new_connections(l.as_fd()).expect("filter");
        // The one already queued is still there to accept.
        let (mut served, _) = l.accept().expect("accept the queued one");
        std::io::Write::write_all(&mut served, b"x").expect("write");
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut &queued, &mut b).expect("read");
        // A new one does not complete its handshake.
        let late =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300));
        assert!(late.is_err(), "a handshake completed through the filter");
        accept_new_connections(l.as_fd()).expect("detach");
        accept_new_connections(l.as_fd()).expect("detach twice is fine");
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .expect("accepting again");
    }

    #[test]
    fn a_listen_error_says_its_reason_once_in_a_chain() {
        let e = ListenError::new(
            "127.0.0.1:80",
            io::Error::from_raw_os_error(libc::EADDRINUSE),
        );
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(
            e.to_string(),
            "listen 127.0.0.1:80: Address already in use (os error 98)"
        );
    }

    #[test]
    fn fd_target_names_a_closed_fd_and_a_file() {
        let err = bind_listener(&ListenTarget::Fd(999_999), &params()).expect_err("closed");
        assert_eq!(
            err.to_string(),
            "listen fd 999999: Bad file descriptor (os error 9)"
        );
        let file = tempfile::tempfile().expect("file");
        let raw = file.as_raw_fd();
        let err = bind_listener(&ListenTarget::Fd(raw), &params()).expect_err("file");
        assert_eq!(err.to_string(), format!("listen fd {raw}: not a socket"));
    }
}
