//! Kernel help for changing who accepts without losing a connection: the length of a
//! listener's accept queue, and steering a `SO_REUSEPORT` group away from some of its sockets.
//!
//! Taking a socket out of a reuseport group by closing it resets what waits in its accept queue
//! (the hazard nginx documents for reuseport). Instead: [`steer`] makes the group's new
//! connections go only to the sockets that stay (a classic-BPF reuseport program), the
//! socket's own worker accepts what is queued ([`accept_queue_len`] tells when it is done),
//! and only then does the socket stop listening. Where the kernel refuses the program, the
//! caller falls back to dropping new SYNs on the leaving socket (see
//! [`crate::listening::refuse_new_connections`]): clients retry after a second and land on a
//! socket that stays. With `net.ipv4.tcp_migrate_req = 1` the kernel also moves a closing
//! listener's queue to the others by itself.

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `SO_DETACH_REUSEPORT_BPF` (asm-generic/socket.h).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
/// The longest classic-BPF program (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

/// How many connections wait in a listening TCP socket's accept queue (`tcpi_unacked` of
/// `TCP_INFO`, which is the accept-queue length for a listener).
///
/// # Errors
/// The error of `getsockopt(TCP_INFO)`.
pub fn accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info: libc::tcp_info = unsafe_zeroed_tcp_info();
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

fn unsafe_zeroed_tcp_info() -> libc::tcp_info {
    // SAFETY: tcp_info is a plain C struct of integers, for which all-zero is a valid value.
    unsafe { mem::zeroed() }
}

/// Makes the reuseport group of `member` send new connections only to the sockets at the group
/// indices `keep` (in the kernel's order: the order the sockets started listening), spreading
/// them by the packet's hash. `group_len` is the number of sockets in the group.
///
/// # Errors
/// `InvalidInput` when `keep` is empty or too long for one program; otherwise the error of
/// `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` (a kernel or sandbox without it).
pub fn steer(member: BorrowedFd<'_>, keep: &[u32]) -> io::Result<()> {
    if keep.is_empty() || keep.len() * 2 + 3 > MAX_INSNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot steer to {} sockets", keep.len()),
        ));
    }
    let n = u32::try_from(keep.len()).unwrap_or(u32::MAX);
    const SKF_AD_OFF: i32 = -0x1000;
    const SKF_AD_RXHASH: i32 = 32;
    let mut prog: Vec<libc::sock_filter> = Vec::with_capacity(keep.len() * 2 + 3);
    let insn = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // A = the packet's hash (the ancillary load the kernel fills in).
    prog.push(insn(
        0x20,
        0,
        0,
        u32::from_ne_bytes((SKF_AD_OFF + SKF_AD_RXHASH).to_ne_bytes()),
    ));
    // A %= n.
    prog.push(insn(0x94, 0, 0, n));
    // if A == i: return keep[i].
    for (i, &index) in keep.iter().enumerate() {
        prog.push(insn(0x15, 0, 1, u32::try_from(i).unwrap_or(u32::MAX)));
        prog.push(insn(0x06, 0, 0, index));
    }
    // Not reached; to be safe, the first kept socket.
    prog.push(insn(0x06, 0, 0, keep[0]));
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).unwrap_or(u16::MAX),
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: setsockopt reads `fprog` (and through it `prog`, alive for the call), the size
    // given; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the group's reuseport program: the kernel spreads by hash over every socket again.
/// A group without one is fine.
///
/// # Errors
/// The error of `setsockopt(SO_DETACH_REUSEPORT_BPF)` other than "none attached".
pub fn unsteer(member: BorrowedFd<'_>) -> io::Result<()> {
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt reads the int we own.
    let rc = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&raw const zero).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Stops a listening socket now, for every process that holds it: it leaves its reuseport
/// group (the last socket of the group takes its index) and refuses new connections. What
/// still waits in its queue is reset, so drain it first.
///
/// # Errors
/// The error of `shutdown(2)`.
pub fn stop_listening(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown only changes the socket's state.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn reuseport(addr: SocketAddr) -> TcpListener {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_reuse_port(true).expect("reuseport");
        s.bind(&addr.into()).expect("bind");
        s.listen(128).expect("listen");
        s.into()
    }

    #[test]
    fn steering_sends_nothing_to_the_leaving_socket_and_its_queue_is_read() {
        let a = reuseport("127.0.0.1:0".parse().expect("addr"));
        let addr = a.local_addr().expect("addr");
        let b = reuseport(addr);
        let c = reuseport(addr);
        let connect = |n: usize| -> Vec<TcpStream> {
            (0..n)
                .map(|_| {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")
                })
                .collect()
        };
        let _before = connect(30);
        let queued: Vec<u32> = [&a, &b, &c]
            .iter()
            .map(|l| accept_queue_len(l.as_fd()).expect("len"))
            .collect();
        assert_eq!(queued.iter().sum::<u32>(), 30, "{queued:?}");
        for l in [&a, &b, &c] {
            l.set_nonblocking(true).expect("nb");
            while l.accept().is_ok() {}
        }
        // Steer away from `a` (index 0).
        if let Err(e) = steer(a.as_fd(), &[1, 2]) {
            eprintln!("skipped: the kernel refuses reuseport programs ({e})");
            return;
        }
        let _after = connect(30);
        assert_eq!(accept_queue_len(a.as_fd()).expect("len"), 0);
        let rest =
            accept_queue_len(b.as_fd()).expect("len") + accept_queue_len(c.as_fd()).expect("len");
        assert_eq!(rest, 30);
        unsteer(a.as_fd()).expect("unsteer");
        unsteer(a.as_fd()).expect("twice");
        stop_listening(a.as_fd()).expect("stop");
        let _later = connect(10);
        let rest =
            accept_queue_len(b.as_fd()).expect("len") + accept_queue_len(c.as_fd()).expect("len");
        assert_eq!(rest, 40, "a stopped socket takes nothing");
    }
}
