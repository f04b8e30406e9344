//! Accepting on a listening socket every worker shares (the `shared` policy) from the event
//! loop itself, with the kernel waking one worker per connection, in turn.
//!
//! `EPOLLEXCLUSIVE` wakes one of the epoll sets that wait on a socket, and only a set with a
//! thread blocked in `epoll_wait` on it counts as waiting. tokio's event loop blocks in
//! `epoll_wait` on its own set, so a listener whose registration in that set carries
//! `EPOLLEXCLUSIVE` wakes one idle worker's event loop, as nginx's workers are woken. tokio
//! has no way to ask for the flag, so [`WakeOne`] registers the socket with tokio as usual
//! (`AsyncFd`), finds that registration in the event loop's epoll set
//! (`/proc/self/fdinfo`, which lists each set's descriptors with their flags and tokio's
//! token), and replaces it with the same token and `EPOLLIN | EPOLLET | EPOLLEXCLUSIVE`. tokio
//! sees its events as before, and removes the registration as before when the listener
//! closes.
//!
//! After each connection it takes, a worker removes the socket from its set and adds it back,
//! which puts it at the back of the socket's wake-up queue: the next connection wakes the next
//! idle worker (nginx does this every 16 connections). Adding a socket with connections still
//! queued reports it ready at once, so nothing waits for a new arrival. A worker whose event
//! loop is busy is not in `epoll_wait`, so the kernel passes it over: it takes nothing it
//! cannot serve now.
//!
//! Where the registration cannot be found or changed (a kernel before 4.5, no `/proc`),
//! [`WakeOne::start`] fails and the caller uses an accept thread instead
//! ([`super::exclusive`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use netcluster_protocol::fd::{accept_nonblocking, dup_raw, register_async};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::exclusive::accept_queued;

/// A shared listening socket in the event loop's epoll set with `EPOLLEXCLUSIVE` (see the
/// module).
#[derive(Debug)]
pub(crate) struct WakeOne {
    /// Declared first: tokio removes the registration before `epoll` closes.
    listener: AsyncFd<OwnedFd>,
    /// The event loop's epoll set (a duplicate descriptor of it).
    epoll: Epoll,
    /// tokio's token for the listener's registration.
    token: u64,
    /// The listener is out of the set: a connection was taken and the worker has not come
    /// back for the next one yet.
    left: bool,
}

impl WakeOne {
    /// Registers `fd`, a listening socket in non-blocking mode, with the current tokio
    /// runtime, waking this process only in its turn.
    ///
    /// # Errors
    /// When the registration cannot be found in `/proc/self/fdinfo` or `EPOLLEXCLUSIVE` is
    /// refused; `fd` is closed then (the caller keeps its own copy to fall back on).
    pub(crate) fn start(fd: OwnedFd) -> io::Result<WakeOne> {
        let listener = register_async(fd, Interest::READABLE)?;
        let (epfd, token) = find_registration(listener.get_ref())?;
        let epoll = Epoll(dup_raw(epfd)?);
        let mut one = WakeOne {
            listener,
            epoll,
            token,
            left: false,
        };
        one.leave()?;
        one.rejoin()?;
        Ok(one)
    }

    /// The next connection, when the kernel wakes this worker for one. The listener leaves
    /// the event loop's set with it: until [`WakeOne::rejoin`] (or the next `accept`), the
    /// kernel wakes and reports to the other workers only.
    ///
    /// Cancel safe (the accept loop awaits it in `tokio::select!`): the connection is accepted
    /// and returned in the same poll; a dropped future took none and leaves this worker in the
    /// wake-up queue, as the next `accept` would put it anyway.
    pub(crate) async fn accept(&mut self) -> io::Result<OwnedFd> {
        self.rejoin()?;
        loop {
            let mut ready = self.listener.readable().await?;
            match accept_nonblocking(self.listener.get_ref().as_fd()) {
                Ok(fd) => {
                    ready.clear_ready();
                    drop(ready);
                    if let Err(e) = self.leave() {
                        tracing::warn!("shared accept: cannot re-register the listener: {e}");
                    }
                    return Ok(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection waiting in the queue, taken now without waiting (to drain the backlog).
    pub(crate) fn accept_now(&mut self) -> Option<io::Result<OwnedFd>> {
        accept_queued(self.listener.get_ref().as_fd())
    }

    /// Takes the listener out of the event loop's set (tokio's registration stays).
    fn leave(&mut self) -> io::Result<()> {
        if !self.left {
            self.epoll
                .delete(self.listener.get_ref().as_fd())
                .map_err(io::Error::from)?;
            self.left = true;
        }
        Ok(())
    }

    /// Puts the listener back in the event loop's set, exclusive, with tokio's token: this
    /// worker is at the back of the socket's wake-up queue, and a connection still queued is
    /// reported at once. The accept loop calls it once the connection it took has had its
    /// turn to run, so that a worker busy with what it took leaves the queue to the others.
    pub(crate) fn rejoin(&mut self) -> io::Result<()> {
        if self.left {
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET | EpollFlags::EPOLLEXCLUSIVE;
            self.epoll
                .add(
                    self.listener.get_ref().as_fd(),
                    EpollEvent::new(flags, self.token),
                )
                .map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("EPOLLEXCLUSIVE: {e}"))
                })?;
            self.left = false;
        }
        Ok(())
    }
}

impl Drop for WakeOne {
    /// Back in the set before tokio removes the registration: tokio frees its record of the
    /// listener only when that removal succeeds.
    fn drop(&mut self) {
        if let Err(e) = self.rejoin() {
            tracing::debug!("shared accept: cannot re-register the listener to close it: {e}");
        }
    }
}

/// The epoll set holding `listener` and the token it is registered with: the only
/// registration of this process (told by descriptor number and inode: another set may hold
/// another file under the same number).
fn find_registration(listener: &OwnedFd) -> io::Result<(RawFd, u64)> {
    let fd = listener.as_raw_fd();
    let ino = nix::sys::stat::fstat(listener)
        .map_err(io::Error::from)?
        .st_ino;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if link.as_os_str() != "anon_inode:[eventpoll]" {
            continue;
        }
        let Some(epfd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")) else {
            continue;
        };
        if let Some(token) = token_of(&info, fd, ino) {
            found.push((epfd, token));
        }
    }
    // tokio's event loop keeps several descriptors of its one epoll set (mio duplicates it):
    // one registration, one token.
    found.sort_unstable_by_key(|&(_, token)| token);
    found.dedup_by_key(|(_, token)| *token);
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("listener fd {fd}: its registration is in no epoll set of /proc/self/fdinfo"),
        )),
        _ => Err(io::Error::other(format!(
            "listener fd {fd} is registered in {} epoll sets",
            found.len()
        ))),
    }
}

/// The token of descriptor `fd` with inode `ino` in an epoll set's fdinfo text (lines like
/// `tfd:        7 events: 80002001 data:     55d0c0a0b0c0  pos:0 ino:1edf3a7 sdev:9`, numbers
/// after `data:` and `ino:` in hexadecimal).
fn token_of(info: &str, fd: RawFd, ino: u64) -> Option<u64> {
    info.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"tfd:") || words.get(1)?.parse::<RawFd>().ok()? != fd {
            return None;
        }
        let inode = words.iter().find_map(|w| w.strip_prefix("ino:"))?;
        if u64::from_str_radix(inode, 16).ok()? != ino {
            return None;
        }
        let data = words.iter().position(|w| *w == "data:")?;
        u64::from_str_radix(words.get(data + 1)?, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tokens_are_read_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
                    tfd:        3 events: 80002019 data:                3  pos:0 ino:1edf3a7 sdev:9\n\
                    tfd:       12 events: 80002001 data:     55d0c0a0b0c0  pos:0 ino:1 sdev:9\n";
        assert_eq!(token_of(info, 12, 1), Some(0x55d0_c0a0_b0c0));
        assert_eq!(token_of(info, 3, 0x1ed_f3a7), Some(3));
        assert_eq!(
            token_of(info, 3, 0x1ed_f3a8),
            None,
            "another file under number 3"
        );
        assert_eq!(token_of(info, 4, 1), None);
        assert_eq!(token_of("tfd: x events: 1 data: zz ino:1", 1, 1), None);
    }

    fn listener() -> (std::net::TcpListener, std::net::SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nb");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    /// An event loop on a thread of its own, counting the connections it accepts.
    fn acceptor(
        fd: OwnedFd,
        count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut one = WakeOne::start(fd).expect("start");
                while let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_millis(500), one.accept()).await
                {
                    drop(conn);
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        })
    }

    #[test]
    fn two_event_loops_on_one_socket_take_turns() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (l, addr) = listener();
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let one = acceptor(l.try_clone().expect("dup").into(), a.clone());
        let two = acceptor(l.into(), b.clone());
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..20 {
            let _c = std::net::TcpStream::connect(addr).expect("connect");
            std::thread::sleep(Duration::from_millis(5));
        }
        one.join().expect("one");
        two.join().expect("two");
        let (a, b) = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
        assert_eq!(a + b, 20);
        assert!(a >= 8 && b >= 8, "one {a}, two {b}");
    }

    #[tokio::test]
    async fn connections_queued_at_once_are_all_taken() {
        let (l, addr) = listener();
        let mut one = WakeOne::start(l.into()).expect("start");
        let clients: Vec<_> = (0..10)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        for _ in 0..clients.len() {
            tokio::time::timeout(Duration::from_secs(5), one.accept())
                .await
                .expect("reported again after each re-add")
                .expect("accepted");
        }
        assert!(one.accept_now().is_none());
    }
}
