//! Round-robin hand-off (Node's `SCHED_RR`, its default on Linux): the primary accepts every
//! connection on a listener and hands it to the next idle worker.
//!
//! - At most one hand-off is in flight per worker: a worker is offered the next connection
//!   only after it answered the previous one.
//! - A worker answers accepted or not accepted (it is closing, or at `maxConnections`); a
//!   connection that is not accepted goes to another worker, and one that every worker refused
//!   is closed.
//! - The primary keeps its copy of a handed-off connection until the worker says it accepted
//!   it, so a worker that dies mid-hand-off loses no connection: it goes to the next worker.
//! - Accept errors (`ECONNABORTED`, `EMFILE`) are logged and skipped.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcluster_protocol::Channel;
use netcluster_protocol::message::{BoundAddress, ToWorker};
use tokio::sync::Notify;

/// Finds a worker's channel by id.
pub type ChannelLookup = Arc<dyn Fn(u32) -> Option<Arc<Channel>> + Send + Sync>;

/// One round-robin listener.
pub struct RoundRobin {
    handle: u64,
    address: BoundAddress,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl std::fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("RoundRobin")
            .field("handle", &self.handle)
            .field("address", &self.address)
            .field("members", &inner.members)
            .field("free", &inner.free)
            .field("pending", &inner.pending.len())
            .field("in_flight", &inner.in_flight.len())
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    members: BTreeSet<u32>,
    free: VecDeque<u32>,
    pending: VecDeque<Pending>,
    in_flight: HashMap<u32, InFlight>,
    next_seq: u64,
    closed: bool,
}

/// An accepted connection waiting for a worker.
struct Pending {
    fd: Arc<OwnedFd>,
    /// Workers that answered "not accepted" for it.
    refused: HashSet<u32>,
}

struct InFlight {
    seq: u64,
    conn: Pending,
}

enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Acceptor {
    fn new(fd: OwnedFd, address: &BoundAddress) -> io::Result<Acceptor> {
        Ok(match address {
            BoundAddress::Tcp(_) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Acceptor::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            BoundAddress::Unix(_) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Acceptor::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    async fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Acceptor::Tcp(l) => Ok(OwnedFd::from(l.accept().await?.0.into_std()?)),
            Acceptor::Unix(l) => Ok(OwnedFd::from(l.accept().await?.0.into_std()?)),
        }
    }
}

impl RoundRobin {
    /// Starts accepting on `listener` (a duplicate the hand-off task owns) and handing
    /// connections to the members as they join.
    ///
    /// # Errors
    /// When the listener cannot be registered with tokio.
    pub fn start(
        handle: u64,
        listener: OwnedFd,
        address: BoundAddress,
        lookup: ChannelLookup,
    ) -> io::Result<Arc<RoundRobin>> {
        let acceptor = Acceptor::new(listener, &address)?;
        let rr = Arc::new(RoundRobin {
            handle,
            address,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        });
        tokio::spawn(rr.clone().run(acceptor, lookup));
        Ok(rr)
    }

    /// The listener's id in `Grant::RoundRobin` and `Connection` messages.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Worker `id` listens: it joins the rotation.
    pub fn add(&self, id: u32) {
        let mut inner = lock(&self.inner);
        if inner.members.insert(id) {
            inner.free.push_back(id);
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Worker `id` left (closed its server, or died): it leaves the rotation and a connection
    /// handed to it but not yet accepted goes to another worker.
    pub fn remove(&self, id: u32) {
        let mut inner = lock(&self.inner);
        inner.members.remove(&id);
        inner.free.retain(|&w| w != id);
        if let Some(lost) = inner.in_flight.remove(&id) {
            inner.pending.push_front(lost.conn);
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Worker `id` answered hand-off `seq`.
    pub fn ack(&self, id: u32, seq: u64, accepted: bool) {
        let mut inner = lock(&self.inner);
        match inner.in_flight.remove(&id) {
            Some(f) if f.seq == seq => {
                if accepted {
                    // The worker holds the connection now; the primary closes its copy.
                    drop(f.conn);
                } else {
                    let mut conn = f.conn;
                    conn.refused.insert(id);
                    inner.pending.push_front(conn);
                }
            }
            Some(other) => {
                tracing::warn!(worker = id, seq, "answer to an unknown hand-off ignored");
                inner.in_flight.insert(id, other);
                return;
            }
            None => {
                tracing::debug!(worker = id, seq, "answer to a hand-off no longer in flight");
            }
        }
        if inner.members.contains(&id) && !inner.free.contains(&id) {
            inner.free.push_back(id);
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Stops accepting; pending connections are closed.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>, acceptor: Acceptor, lookup: ChannelLookup) {
        loop {
            tokio::select! {
                accepted = acceptor.accept() => match accepted {
                    Ok(fd) => lock(&self.inner).pending.push_back(Pending {
                        fd: Arc::new(fd),
                        refused: HashSet::new(),
                    }),
                    Err(e) => {
                        tracing::warn!(address = %self.address, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = self.wake.notified() => {}
            }
            if lock(&self.inner).closed {
                break;
            }
            self.dispatch(&lookup).await;
        }
        let mut inner = lock(&self.inner);
        inner.pending.clear();
        inner.in_flight.clear();
    }

    /// Hands pending connections to free workers until one of the two runs out.
    async fn dispatch(&self, lookup: &ChannelLookup) {
        loop {
            let (id, seq, fd) = {
                let mut inner = lock(&self.inner);
                if inner.closed {
                    return;
                }
                let Some(conn) = inner.pending.front() else {
                    return;
                };
                if !inner.members.is_empty()
                    && inner.members.iter().all(|m| conn.refused.contains(m))
                {
                    tracing::warn!(
                        address = %self.address,
                        "every worker refused a connection (closing or at maxConnections); closing it"
                    );
                    inner.pending.pop_front();
                    continue;
                }
                let Some(pos) = inner.free.iter().position(|w| !conn.refused.contains(w)) else {
                    return;
                };
                let (Some(id), Some(conn)) = (inner.free.remove(pos), inner.pending.pop_front())
                else {
                    return;
                };
                inner.next_seq += 1;
                let seq = inner.next_seq;
                let fd = conn.fd.clone();
                inner.in_flight.insert(id, InFlight { seq, conn });
                (id, seq, fd)
            };
            let message = ToWorker::Connection {
                handle: self.handle,
                seq,
            };
            let sent = match lookup(id) {
                Some(channel) => channel
                    .send(&message, &[fd.as_fd()])
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no channel".to_string()),
            };
            drop(fd);
            if let Err(e) = sent {
                tracing::warn!(worker = id, "cannot hand off a connection: {e}");
                // The worker is gone or going: requeue and take it out of the rotation.
                self.remove(id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netcluster_protocol::message::ToWorker;
    use std::io::{Read, Write};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);

    /// A round-robin listener on loopback and fake workers (the far ends of channel pairs).
    struct Rig {
        rr: Arc<RoundRobin>,
        addr: std::net::SocketAddr,
        workers: HashMap<u32, Channel>,
    }

    fn rig(ids: &[u32]) -> Rig {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut ours = HashMap::new();
        let mut theirs = HashMap::new();
        for &id in ids {
            let (a, b) = Channel::pair().expect("pair");
            ours.insert(id, Arc::new(a));
            theirs.insert(id, b);
        }
        let lookup: ChannelLookup = Arc::new(move |id| ours.get(&id).cloned());
        let rr =
            RoundRobin::start(1, listener.into(), BoundAddress::Tcp(addr), lookup).expect("start");
        Rig {
            rr,
            addr,
            workers: theirs,
        }
    }

    async fn next_handoff(worker: &Channel) -> (u64, OwnedFd) {
        let (msg, mut fds) = tokio::time::timeout(T, worker.recv::<ToWorker>())
            .await
            .expect("a hand-off in time")
            .expect("recv")
            .expect("open");
        let ToWorker::Connection { handle: 1, seq } = msg else {
            panic!("unexpected {msg:?}");
        };
        (seq, fds.pop().expect("the connection"))
    }

    fn client(addr: std::net::SocketAddr) -> std::net::TcpStream {
        let c = std::net::TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(T)).expect("timeout");
        c
    }

    /// Writes `text` on the handed-off server side and checks the client reads it.
    fn same_connection(server_side: OwnedFd, client: &mut std::net::TcpStream, text: &[u8]) {
        let mut s = std::net::TcpStream::from(server_side);
        s.write_all(text).expect("write");
        let mut buf = vec![0u8; text.len()];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(buf, text);
    }

    #[tokio::test]
    async fn connections_go_to_workers_in_turn_one_in_flight_each() {
        let rig = rig(&[1, 2]);
        rig.rr.add(1);
        rig.rr.add(2);
        let mut c1 = client(rig.addr);
        let mut c2 = client(rig.addr);
        let _c3 = client(rig.addr);
        let (s1, fd1) = next_handoff(&rig.workers[&1]).await;
        let (s2, fd2) = next_handoff(&rig.workers[&2]).await;
        // Both workers have one in flight: the third waits.
        assert!(
            tokio::time::timeout(
                Duration::from_millis(100),
                rig.workers[&1].recv::<ToWorker>()
            )
            .await
            .is_err()
        );
        same_connection(fd1, &mut c1, b"one");
        same_connection(fd2, &mut c2, b"two");
        rig.rr.ack(1, s1, true);
        let (_s3, _fd3) = next_handoff(&rig.workers[&1]).await;
        rig.rr.ack(2, s2, true);
    }

    #[tokio::test]
    async fn a_refused_connection_goes_to_another_worker() {
        let rig = rig(&[1, 2]);
        rig.rr.add(1);
        let mut c = client(rig.addr);
        let (seq, refused_copy) = next_handoff(&rig.workers[&1]).await;
        drop(refused_copy);
        rig.rr.add(2);
        rig.rr.ack(1, seq, false);
        let (_, fd) = next_handoff(&rig.workers[&2]).await;
        same_connection(fd, &mut c, b"rerouted");
    }

    #[tokio::test]
    async fn a_worker_that_dies_mid_handoff_loses_no_connection() {
        let rig = rig(&[1, 2]);
        rig.rr.add(1);
        let mut c = client(rig.addr);
        let (_seq, dying_copy) = next_handoff(&rig.workers[&1]).await;
        drop(dying_copy);
        rig.rr.add(2);
        rig.rr.remove(1); // worker 1 exited without answering
        let (_, fd) = next_handoff(&rig.workers[&2]).await;
        same_connection(fd, &mut c, b"survived");
    }

    // Multi-threaded: the test blocks in a plain read while the hand-off task closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_every_worker_refuses_is_closed() {
        let rig = rig(&[1]);
        rig.rr.add(1);
        let mut c = client(rig.addr);
        let (seq, copy) = next_handoff(&rig.workers[&1]).await;
        drop(copy);
        rig.rr.ack(1, seq, false);
        let mut buf = [0u8; 1];
        let n = c.read(&mut buf).expect("EOF, not a time-out");
        assert_eq!(n, 0, "closed, not left hanging");
    }
}
