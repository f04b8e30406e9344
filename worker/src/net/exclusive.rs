//! Accepting on a listening socket that every worker shares (the `shared` policy) so that one
//! worker, not all of them, wakes for a connection, and the workers take turns — from a thread
//! of the worker. This is the fallback of [`super::wake_one`], which does the same from the
//! event loop itself (no thread, no hop between threads per connection) when the event loop's
//! registration of the socket can be found and changed.
//!
//! A socket registered with tokio sits in every worker's epoll set, and a connection wakes
//! them all; the one the scheduler happens to run first takes it, which under light load is
//! most often the same worker (10× more connections than another was measured with 4
//! workers). Linux's `EPOLLEXCLUSIVE` wakes one waiter instead — but only a thread waiting in
//! `epoll_wait` on that very epoll set counts as a waiter (an epoll set nested in tokio's does
//! not), and it always wakes the first one registered. So each shared listener gets a small
//! thread of its own that:
//!
//! 1. waits in `epoll_wait` on a private epoll set holding the socket with `EPOLLEXCLUSIVE`
//!    (and an eventfd to stop it),
//! 2. accepts what is queued (a bounded number, non-blocking, `SOCK_CLOEXEC|SOCK_NONBLOCK`)
//!    and passes the connections to the server's accept loop through a small bounded channel
//!    — a worker whose event loop is busy stops accepting after a handful and leaves the
//!    queue to the others (a blocked thread is not waiting in `epoll_wait`, so the kernel
//!    wakes another worker; a stopped process is not either),
//! 3. removes the socket from its set and adds it again, which puts this worker at the back
//!    of the socket's wake-up queue: the next connection wakes the next idle worker (what
//!    nginx does every 16 connections; here after every wake-up, as a wake-up under load
//!    takes many connections at once).
//!
//! Stopping ([`ExclusiveAccept::stop`]) hands over every connection the thread accepted, so
//! none is lost; what is still queued in the kernel stays for the other workers, or is taken
//! with [`ExclusiveAccept::accept_now`] when the worker drains its backlog.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use netcluster_protocol::fd::accept_nonblocking;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::mpsc;

/// Connections accepted ahead of the server's accept loop at most (one more waits with the
/// thread). The thread keeps waking while the worker's event loop is busy with something
/// else, so this is what a busy worker can take from the others: a handful, not a burst.
const AHEAD: usize = 4;
/// Connections one wake-up takes at most before the thread moves to the back of the queue.
const PER_WAKE: usize = 64;
/// Stack of the accept thread: it only calls the kernel.
const STACK: usize = 64 * 1024;

const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// A shared listening socket accepted on by a thread of its own (see the module).
#[derive(Debug)]
pub(crate) struct ExclusiveAccept {
    fd: Arc<OwnedFd>,
    rx: mpsc::Receiver<io::Result<OwnedFd>>,
    stop: Arc<Stop>,
}

#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl ExclusiveAccept {
    /// Starts accepting on `fd`, a listening socket in non-blocking mode.
    ///
    /// # Errors
    /// When the epoll set, the eventfd or the thread cannot be created; the caller then
    /// accepts through tokio as usual.
    pub(crate) fn start(fd: OwnedFd) -> io::Result<ExclusiveAccept> {
        let fd = Arc::new(fd);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io::Error::from)?;
        epoll
            .add(&event, EpollEvent::new(EpollFlags::EPOLLIN, STOP))
            .map_err(io::Error::from)?;
        epoll.add(fd.as_fd(), interest()).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("EPOLLEXCLUSIVE: {e}"))
        })?;
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            event,
        });
        let (tx, rx) = mpsc::channel(AHEAD);
        let (listener, stopping) = (fd.clone(), stop.clone());
        std::thread::Builder::new()
            .name("netcluster-accept".into())
            .stack_size(STACK)
            .spawn(move || run(&epoll, &listener, &stopping, &tx))?;
        Ok(ExclusiveAccept { fd, rx, stop })
    }

    /// The next connection the thread accepted; `None` once it stopped.
    ///
    /// Cancel safe (tokio's `mpsc::Receiver::recv`): a dropped future leaves the connection in
    /// the queue for the next call.
    pub(crate) async fn accept(&mut self) -> Option<io::Result<OwnedFd>> {
        self.rx.recv().await
    }

    /// A connection already accepted, or else one taken from the kernel's queue now, without
    /// waiting (used once the thread has stopped, to drain the backlog).
    pub(crate) fn accept_now(&mut self) -> Option<io::Result<OwnedFd>> {
        if let Ok(got) = self.rx.try_recv() {
            return Some(got);
        }
        accept_queued(self.fd.as_fd())
    }

    /// Stops the thread and returns every connection it had accepted.
    pub(crate) async fn stop(&mut self) -> Vec<io::Result<OwnedFd>> {
        self.stop.signal();
        let mut taken = Vec::new();
        // The thread drops its sender when it ends; until then it may still be handing over.
        while let Some(got) = self.rx.recv().await {
            taken.push(got);
        }
        taken
    }
}

impl Drop for ExclusiveAccept {
    fn drop(&mut self) {
        self.stop.signal();
    }
}

impl Stop {
    fn signal(&self) {
        self.flag.store(true, Ordering::Relaxed);
        if let Err(e) = self.event.write(1) {
            tracing::debug!("cannot wake the accept thread: {e}");
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// A connection waiting in `listener`'s queue, taken without waiting; `None` when the queue
/// is empty.
pub(crate) fn accept_queued(listener: BorrowedFd<'_>) -> Option<io::Result<OwnedFd>> {
    match accept_nonblocking(listener) {
        Ok(fd) => Some(Ok(fd)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => Some(Err(e)),
    }
}

fn interest() -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, LISTENER)
}

/// The accept thread.
fn run(epoll: &Epoll, listener: &OwnedFd, stop: &Stop, tx: &mpsc::Sender<io::Result<OwnedFd>>) {
    let mut events = [EpollEvent::empty(); 2];
    while !stop.requested() {
        match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("accept thread: epoll_wait failed: {e}");
                return;
            }
        }
        let mut taken = 0;
        while taken < PER_WAKE && !stop.requested() {
            match accept_nonblocking(listener.as_fd()) {
                Ok(fd) => {
                    taken += 1;
                    // Blocks while the server is behind: the rest of the queue is left to
                    // the other workers. Fails only when the server is gone.
                    if tx.blocking_send(Ok(fd)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ECONNABORTED) => {}
                Err(e) => {
                    // EMFILE and friends clear when connections close: report, breathe.
                    if tx.blocking_send(Err(e)).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        // To the back of the wake-up queue: the next connection wakes another worker.
        if taken > 0 {
            let readded = epoll
                .delete(listener.as_fd())
                .and_then(|()| epoll.add(listener.as_fd(), interest()));
            if let Err(e) = readded {
                tracing::warn!("accept thread: cannot re-register the listener: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (std::net::TcpListener, std::net::SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nb");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    #[tokio::test]
    async fn accepts_and_stops_without_losing_a_connection() {
        let (l, addr) = listener();
        let mut ex = ExclusiveAccept::start(l.into()).expect("start");
        let _a = std::net::TcpStream::connect(addr).expect("connect");
        let got = tokio::time::timeout(Duration::from_secs(5), ex.accept())
            .await
            .expect("in time")
            .expect("open")
            .expect("accepted");
        drop(got);
        let clients: Vec<_> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        // Whatever the thread took is handed back at the stop; the rest is still queued.
        let mut served = ex.stop().await.into_iter().filter(Result::is_ok).count();
        while let Some(got) = ex.accept_now() {
            got.expect("accepted");
            served += 1;
        }
        assert_eq!(served, clients.len());
        assert!(ex.accept().await.is_none(), "the thread has ended");
    }

    #[tokio::test]
    async fn a_busy_worker_takes_a_handful_and_leaves_the_rest() {
        let (l, addr) = listener();
        let dup = l.try_clone().expect("dup");
        // `busy` never takes what its thread accepted, like a worker whose event loop is
        // occupied.
        let mut busy = ExclusiveAccept::start(l.into()).expect("busy");
        let clients: Vec<_> = (0..20)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut other = ExclusiveAccept::start(dup.into()).expect("other");
        let mut took = 0;
        while tokio::time::timeout(Duration::from_millis(300), other.accept())
            .await
            .is_ok_and(|got| got.is_some_and(|r| r.is_ok()))
        {
            took += 1;
        }
        let hoarded = busy.stop().await.len();
        assert_eq!(took + hoarded, clients.len());
        // AHEAD in the channel and one held by the blocked thread.
        assert!(hoarded <= 5, "the busy one took {hoarded}");
    }

    #[tokio::test]
    async fn two_acceptors_on_one_socket_take_turns() {
        let (l, addr) = listener();
        let dup = l.try_clone().expect("dup");
        let mut one = ExclusiveAccept::start(l.into()).expect("one");
        let mut two = ExclusiveAccept::start(dup.into()).expect("two");
        let (mut a, mut b) = (0, 0);
        for _ in 0..20 {
            let _c = std::net::TcpStream::connect(addr).expect("connect");
            tokio::select! {
                got = one.accept() => { got.expect("open").expect("ok"); a += 1; }
                got = two.accept() => { got.expect("open").expect("ok"); b += 1; }
            }
            // Let the thread that accepted move to the back of the queue.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(a + b, 20);
        assert!(a >= 5 && b >= 5, "one {a}, two {b}");
    }
}
