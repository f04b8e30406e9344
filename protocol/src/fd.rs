//! File-descriptor passing over Unix sockets: `sendmsg`/`recvmsg` with `SCM_RIGHTS`.
//!
//! This is the only module of netcluster that contains `unsafe` code; every block carries a
//! `// SAFETY:` comment.
//!
//! # Why not `sendfd`, and why not nix's `recvmsg`
//!
//! * The [`sendfd`](https://docs.rs/sendfd) crate receives without `MSG_CMSG_CLOEXEC`, so a
//!   received descriptor is inheritable until someone sets `FD_CLOEXEC` on it — a window in
//!   which a concurrently spawned child leaks it (pingora#959, libuv#993). It also does not
//!   report `MSG_CTRUNC`, so descriptors silently dropped by the kernel under `RLIMIT_NOFILE`
//!   pressure go unnoticed.
//! * nix's [`sendmsg`] is a safe, complete wrapper, so sending goes
//!   through it.
//! * nix's `recvmsg` refuses to iterate the control messages once `MSG_CTRUNC` is set (it returns
//!   `ENOBUFS`). On Linux the kernel has by then already installed the descriptors that did fit
//!   into our table; refusing to look at them leaks them. Receiving therefore calls
//!   `libc::recvmsg` directly and walks the control buffer with the `CMSG_*` macros, turning
//!   every descriptor into an [`OwnedFd`] before anything else happens, so every later error
//!   path (truncation, wrong count, bad frame) closes them by dropping.
//!
//! Received descriptors always have `FD_CLOEXEC` set (`MSG_CMSG_CLOEXEC`).

#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// The most descriptors one message may carry.
///
/// The kernel's own limit (`SCM_MAX_FD`) is 253; netcluster messages carry one or two, so a
/// small bound keeps the control buffer on the stack.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Bytes of control buffer needed for [`MAX_FDS_PER_MESSAGE`] descriptors, rounded up to
/// whole `u64`s so the buffer is aligned for `cmsghdr`.
const CMSG_WORDS: usize = 16 / 8 + MAX_FDS_PER_MESSAGE * mem::size_of::<RawFd>() / 8 + 2;

/// What one call of [`recv_with_fds`] returned.
#[derive(Debug)]
pub struct Received {
    /// Length of the datagram as sent. Larger than the buffer when [`Received::truncated`].
    pub len: usize,
    /// The descriptors that arrived, each already owned (and close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the datagram did not fit in the buffer; its tail was discarded.
    pub truncated: bool,
    /// `MSG_CTRUNC`: the control buffer was too small; descriptors that did not fit were
    /// discarded by the kernel (those in [`Received::fds`] did arrive and will be closed when
    /// dropped).
    pub control_truncated: bool,
}

/// Sends one datagram with `data` and, if `fds` is not empty, one `SCM_RIGHTS` control message
/// carrying duplicates of `fds`.
///
/// The descriptors stay owned by the caller. `MSG_NOSIGNAL` is set, so a closed peer gives
/// `EPIPE` instead of raising `SIGPIPE`.
///
/// # Errors
/// `InvalidInput` when more than [`MAX_FDS_PER_MESSAGE`] descriptors are given; otherwise the
/// error of `sendmsg(2)` (`WouldBlock` on a non-blocking socket whose buffer is full).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot send {} file descriptors in one message (at most {MAX_FDS_PER_MESSAGE})",
                fds.len()
            ),
        ));
    }
    let raw: [RawFd; MAX_FDS_PER_MESSAGE] =
        std::array::from_fn(|i| fds.get(i).map_or(-1, AsRawFd::as_raw_fd));
    let raw = &raw[..fds.len()];
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram into `buf` together with at most `max_fds` descriptors.
///
/// Uses `MSG_CMSG_CLOEXEC`, so the descriptors are close-on-exec from the moment they exist,
/// and `MSG_TRUNC`, so [`Received::len`] is the real size of an oversized datagram. Every
/// descriptor is wrapped in an [`OwnedFd`] before this function looks at anything else; the
/// caller decides what truncation means, and dropping the result closes them.
///
/// A return with `len == 0` and no descriptors on a `SOCK_SEQPACKET` socket means the peer
/// closed the connection.
///
/// # Errors
/// The error of `recvmsg(2)` (`WouldBlock` on a non-blocking socket with nothing queued).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    let mut cmsg_buf = [0u64; CMSG_WORDS];
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let cmsg_space =
        unsafe { libc::CMSG_SPACE((max_fds * mem::size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(cmsg_space <= mem::size_of_val(&cmsg_buf));

    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space as _;
    }

    let n = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`, valid for `buf.len()` bytes) and
        // at `cmsg_buf` (valid and u64-aligned for `cmsg_space` bytes); all outlive the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };

    let mut fds = Vec::new();
    if max_fds > 0 {
        // SAFETY: `msg` was filled in by a successful recvmsg; CMSG_FIRSTHDR only reads
        // msg_control/msg_controllen, which the kernel set to the bytes it wrote.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a complete
            // cmsghdr inside `cmsg_buf`.
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: pure computation.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let count =
                    (hdr.cmsg_len as usize).saturating_sub(header_len) / mem::size_of::<RawFd>();
                // SAFETY: `cmsg` points at a complete SCM_RIGHTS control message.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: the kernel wrote `count` ints after the header (cmsg_len covers
                    // them); the data may be unaligned, hence read_unaligned.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in this process for
                    // this call alone; nothing else owns it, so taking ownership is sound.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: `msg` and `cmsg` are as above; CMSG_NXTHDR bounds-checks against
            // msg_controllen and returns null at the end.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }

    Ok(Received {
        len: n,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Duplicates descriptor number `fd` of this process (`F_DUPFD_CLOEXEC`) into a new
/// [`OwnedFd`], leaving the original alone. This is how `listen({fd: n})` takes hold of a
/// descriptor it does not own.
///
/// # Errors
/// `EBADF` when `fd` is negative or not open (the caller names the number).
pub fn dup_raw(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; a number that is not open gives
    // EBADF and no descriptor is touched.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just created `new` for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Registers an owned descriptor with the current tokio reactor.
///
/// Since tokio 1.54 `AsyncFd::register_with_interest` is `unsafe` (it cannot see whether the
/// value really owns its descriptor); taking an [`OwnedFd`] makes that true by construction.
///
/// # Errors
/// The error of registering (no runtime, or `epoll_ctl` failing).
pub fn register_async(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an OwnedFd: it owns a valid open descriptor, which the AsyncFd now owns
    // and neither replaces nor closes while registered.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) };
    // The error carries the descriptor back; dropping it closes the descriptor.
    registered.map_err(io::Error::from)
}

/// Takes ownership of descriptor number `fd`, inherited across `exec` (the channel a primary
/// hands its worker), and marks it close-on-exec so it goes no further.
///
/// Each number can be claimed once per process: a second claim is refused, so two
/// [`OwnedFd`]s never own one descriptor.
///
/// # Errors
/// `EBADF` when `fd` is negative or not open; `AlreadyExists` when it was claimed before.
pub fn claim_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static CLAIMED: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let mut claimed = CLAIMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let claimed = claimed.get_or_insert_with(HashSet::new);
    if claimed.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("fd {fd} was already claimed"),
        ));
    }
    // SAFETY: F_SETFD only changes the flags of the descriptor; EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    claimed.insert(fd);
    // SAFETY: the descriptor is open (F_SETFD succeeded), was inherited for this process to own
    // (the caller's contract with its parent), and the CLAIMED set makes this the only OwnedFd
    // ever created for this number here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether descriptor number `fd` is open and is a Unix `SOCK_SEQPACKET` socket (a worker's
/// channel), without taking ownership of it.
pub fn is_seqpacket(fd: RawFd) -> bool {
    if socket_type(fd) != Some(libc::SOCK_SEQPACKET) {
        return false;
    }
    let mut domain: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, a c_int we own; `fd` is an
    // open socket (its SO_TYPE was read).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut domain).cast(),
            &mut len,
        )
    };
    rc == 0 && domain == libc::AF_UNIX
}

/// Accepts one connection on a listening socket with `accept4(SOCK_CLOEXEC | SOCK_NONBLOCK)`:
/// the descriptor is ready to be passed to a worker as is (no `fcntl` there, no epoll
/// registration here).
///
/// # Errors
/// The error of `accept4(2)` (`WouldBlock` when no connection is waiting).
pub fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4 with null address pointers writes nothing but the new descriptor, which
    // is returned to us alone.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 just created `fd`; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether descriptor number `fd` is open in this process.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; a number that is not open gives EBADF.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

/// The pid of the process that created the peer end of Unix socket number `fd` (for a
/// socketpair: the process that called `socketpair`), from `SO_PEERCRED`.
pub fn peer_pid(fd: RawFd) -> Option<u32> {
    if fd < 0 {
        return None;
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred we own; a number that
    // is not an open Unix socket gives an error and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then(|| cred.pid.unsigned_abs())
}

/// Sets `FD_CLOEXEC` on descriptor number `fd` if it is open, leaving its ownership alone.
pub(crate) fn set_cloexec_raw(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: F_SETFD only changes the descriptor's flags; a number that is not open gives
        // EBADF and changes nothing.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Marks a worker's channel (named by [`crate::env::CHANNEL_FD`]) close-on-exec, if it really
/// is a `SOCK_SEQPACKET` socket. Called before `main` by [`crate::start`].
pub(crate) fn cloexec_channel_at_start() {
    let Some(value) = std::env::var_os(crate::env::CHANNEL_FD) else {
        return;
    };
    let Some(fd) = value.to_str().and_then(|v| v.parse::<RawFd>().ok()) else {
        return;
    };
    if is_seqpacket(fd) {
        set_cloexec_raw(fd);
    }
}

/// Marks a native worker's listeners (`3 .. 3 + LISTEN_FDS`) close-on-exec. Only where the
/// layout is the primary's: [`crate::env::CHANNEL_FD`] names a `SOCK_SEQPACKET` socket right
/// after them, and each is a socket. Called before `main` by [`crate::start`].
pub(crate) fn cloexec_listeners_at_start() {
    let number = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
    };
    let (Some(channel), Some(n)) = (
        number(crate::env::CHANNEL_FD),
        number(crate::env::LISTEN_FDS),
    ) else {
        return;
    };
    if n < 1 || channel != n.saturating_add(3) || !is_seqpacket(channel) {
        return;
    }
    for fd in 3..channel {
        if is_socket(fd) {
            set_cloexec_raw(fd);
        }
    }
}

/// Whether descriptor number `fd` is an open socket.
fn is_socket(fd: RawFd) -> bool {
    socket_type(fd).is_some()
}

/// The type (`SO_TYPE`) of socket `fd`, or `None` when it is no open socket.
fn socket_type(fd: RawFd) -> Option<libc::c_int> {
    if fd < 0 {
        return None;
    }
    let mut ty: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a c_int we own; a number that
    // is not an open socket gives EBADF or ENOTSOCK and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(ty)
}

/// Clears `O_NONBLOCK` on descriptor number `fd` if it is an open socket (what systemd passes
/// is blocking). The flag belongs to the open file description: every copy of the socket,
/// in every process, sees the change.
pub(crate) fn set_blocking_raw(fd: RawFd) {
    if !is_socket(fd) {
        return;
    }
    // SAFETY: F_GETFL only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
        // SAFETY: F_SETFL only changes the status flags of an open descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2");
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    #[test]
    fn pipe_read_end_survives_the_trip() {
        let (a, b) = pair();
        let (r, mut w) = pipe();
        send_with_fds(a.as_fd(), b"pipe", &[r.as_fd()]).expect("send");
        drop(r);
        let mut buf = [0u8; 16];
        let got = recv_with_fds(b.as_fd(), &mut buf, 4).expect("recv");
        assert_eq!(&buf[..got.len], b"pipe");
        assert!(!got.truncated && !got.control_truncated);
        assert_eq!(got.fds.len(), 1);
        w.write_all(b"through the fd").expect("write");
        drop(w);
        let mut received = std::fs::File::from(got.fds.into_iter().next().expect("one fd"));
        let mut text = String::new();
        received.read_to_string(&mut text).expect("read");
        assert_eq!(text, "through the fd");
    }

    #[test]
    fn received_fds_are_cloexec_and_keep_nonblock() {
        let (a, b) = pair();
        let (r, _w) = pipe();
        send_with_fds(a.as_fd(), b"x", &[r.as_fd()]).expect("send");
        let mut buf = [0u8; 4];
        let got = recv_with_fds(b.as_fd(), &mut buf, 1).expect("recv");
        let fd = &got.fds[0];
        let fd_flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).expect("getfd"));
        assert!(fd_flags.contains(FdFlag::FD_CLOEXEC));
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("getfl"));
        assert!(fl.contains(OFlag::O_NONBLOCK));
    }

    #[test]
    fn several_fds_in_one_message_arrive_in_order() {
        let (a, b) = pair();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        send_with_fds(a.as_fd(), b"three", &fds).expect("send");
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS_PER_MESSAGE).expect("recv");
        assert_eq!(got.fds.len(), 3);
        for (i, ((_, w), fd)) in pipes.iter().zip(got.fds).enumerate() {
            (&*w).write_all(&[i as u8]).expect("write");
            let mut f = std::fs::File::from(fd);
            let mut byte = [0u8; 1];
            f.read_exact(&mut byte).expect("read");
            assert_eq!(byte[0], i as u8, "fd {i} is the read end of pipe {i}");
        }
    }

    #[test]
    fn zero_fd_message() {
        let (a, b) = pair();
        send_with_fds(a.as_fd(), b"plain", &[]).expect("send");
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, 4).expect("recv");
        assert_eq!(&buf[..got.len], b"plain");
        assert!(got.fds.is_empty());
        assert!(!got.control_truncated);
    }

    /// True once every copy of the pipe's read end is closed: writing then fails with EPIPE
    /// (Rust ignores SIGPIPE).
    fn read_end_closed(w: &std::fs::File) -> bool {
        matches!((&*w).write(b"x"), Err(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }

    #[test]
    fn too_small_control_buffer_sets_ctrunc_and_closes_everything() {
        let (a, b) = pair();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        send_with_fds(a.as_fd(), b"three", &fds).expect("send");
        let writers: Vec<_> = pipes.into_iter().map(|(_, w)| w).collect();
        let mut buf = [0u8; 8];
        // Room for one descriptor (CMSG_SPACE rounds up to two); three were sent.
        let got = recv_with_fds(b.as_fd(), &mut buf, 1).expect("recv");
        assert!(got.control_truncated, "MSG_CTRUNC must be reported");
        assert!(got.fds.len() < 3);
        // The ones that did arrive are owned: dropping them closes them, and the kernel closed
        // the rest, so no read end is left open anywhere.
        drop(got);
        for (i, w) in writers.iter().enumerate() {
            assert!(read_end_closed(w), "read end of pipe {i} leaked");
        }
    }

    #[test]
    fn no_control_buffer_at_all_sets_ctrunc() {
        let (a, b) = pair();
        let (r, _w) = pipe();
        send_with_fds(a.as_fd(), b"one", &[r.as_fd()]).expect("send");
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, 0).expect("recv");
        assert!(got.control_truncated);
        assert!(got.fds.is_empty());
    }

    #[test]
    fn oversized_datagram_reports_its_real_length() {
        let (a, b) = pair();
        let big = vec![7u8; 1000];
        send_with_fds(a.as_fd(), &big, &[]).expect("send");
        let mut buf = [0u8; 100];
        let got = recv_with_fds(b.as_fd(), &mut buf, 0).expect("recv");
        assert!(got.truncated);
        assert_eq!(got.len, 1000);
    }

    #[test]
    fn too_many_fds_is_refused_before_sending() {
        let (a, _b) = pair();
        let (r, _w) = pipe();
        let fds = vec![r.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        let err = send_with_fds(a.as_fd(), b"x", &fds).expect_err("too many");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("17 file descriptors"), "{err}");
    }

    #[test]
    fn dup_raw_refuses_a_closed_fd() {
        let err = dup_raw(-1).expect_err("negative");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let (r, _w) = pipe();
        let raw = r.as_raw_fd();
        let dup = dup_raw(raw).expect("dup");
        assert_ne!(dup.as_raw_fd(), raw);
        // Far above anything a test process opens, so never open.
        let err = dup_raw(999_999).expect_err("not open");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn peer_close_reads_as_empty() {
        let (a, b) = pair();
        drop(a);
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, 1).expect("recv");
        assert_eq!(got.len, 0);
        assert!(got.fds.is_empty());
    }
}
