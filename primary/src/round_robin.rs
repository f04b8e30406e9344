//! Round-robin hand-off (Node's `SCHED_RR`, its default on Linux): the primary accepts every
//! connection on a listener and hands it to the next free worker.
//!
//! This module holds the state machine ([`RoundRobin`]) — pure bookkeeping the supervisor
//! drives, unit-tested without processes — and the accept task ([`spawn_acceptor`]).
//!
//! - At most one hand-off is in flight per worker: a worker is offered the next connection
//!   only after it answered the previous one.
//! - A worker answers accepted or not accepted (it is closing, or at `maxConnections`); a
//!   connection that is not accepted goes to another worker, and one that every worker refused
//!   is closed.
//! - The primary keeps its copy of a handed-off connection until the worker says it accepted
//!   it, so a worker that dies mid-hand-off loses no connection: it goes to the next worker.
//! - A hand-off has a deadline. Past it the connection goes to another worker and the silent
//!   worker is paused (out of the rotation) until it proves alive; the worker itself refuses
//!   a hand-off it reads after the deadline, so a connection is never served twice.
//! - The accept task takes at most [`Gate`]'s limit of connections ahead of the workers (one
//!   per worker in rotation plus a few); the rest wait in the kernel's backlog. Accept errors
//!   (`EMFILE`, `ECONNABORTED`) back the accept task off without delaying hand-offs, which the
//!   supervisor does.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netcluster_protocol::fd::{accept_nonblocking, register_async};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Bounds the connections a listener has accepted but not finished handing off.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    outstanding: AtomicUsize,
    limit: AtomicUsize,
    closed: AtomicBool,
    stop: CancellationToken,
    room: Notify,
}

impl Gate {
    pub fn new(limit: usize) -> Arc<Gate> {
        Arc::new(Gate {
            limit: AtomicUsize::new(limit),
            ..Gate::default()
        })
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
        self.room.notify_one();
    }

    /// Stops the accept task.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.stop.cancel();
        self.room.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Waits until one more connection may be accepted; false once closed.
    async fn room(&self) -> bool {
        loop {
            if self.is_closed() {
                return false;
            }
            if self.outstanding.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed) {
                return true;
            }
            self.room.notified().await;
        }
    }

    fn ticket(self: &Arc<Self>) -> Ticket {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ticket(self.clone())
    }
}

/// One accepted connection's place under the gate; given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.0.room.notify_one();
    }
}

/// A connection the primary accepted and has not finished handing off.
#[derive(Debug)]
pub(crate) struct Conn {
    pub fd: Arc<OwnedFd>,
    _ticket: Ticket,
}

/// What an accept task sends the supervisor.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The listener's id.
    pub listener: u64,
    /// A connection, or `None` when the task has stopped and closed its copy of the listening
    /// socket (the supervisor's copy is then the last: it drains the backlog and closes it
    /// with nothing in between, so no connection that completed its handshake is reset).
    pub conn: Option<Conn>,
}

/// Starts accepting on `fd` (a duplicate the task owns) for listener `listener`, within
/// `gate`; accepted connections go to `to`. Ends when the gate closes or `to` closes.
///
/// # Errors
/// When the listener cannot be registered with tokio.
pub(crate) fn spawn_acceptor(
    listener: u64,
    fd: OwnedFd,
    address: String,
    gate: Arc<Gate>,
    to: mpsc::Sender<Accepted>,
) -> io::Result<()> {
    let io = register_async(fd, tokio::io::Interest::READABLE)?;
    tokio::spawn(async move {
        run_acceptor(listener, io, address, gate.clone(), to.clone()).await;
        let _ = to
            .send(Accepted {
                listener,
                conn: None,
            })
            .await;
    });
    Ok(())
}

async fn run_acceptor(
    listener: u64,
    io: tokio::io::unix::AsyncFd<OwnedFd>,
    address: String,
    gate: Arc<Gate>,
    to: mpsc::Sender<Accepted>,
) {
    {
        let mut backoff = Duration::ZERO;
        let mut warned = None::<Instant>;
        loop {
            if !gate.room().await {
                break;
            }
            let accepted = tokio::select! {
                guard = io.readable() => match guard {
                    Ok(mut guard) => match guard.try_io(|io| accept_nonblocking(io.get_ref().as_fd())) {
                        Ok(result) => result,
                        Err(_would_block) => continue,
                    },
                    Err(e) => Err(e),
                },
                () = gate.stop.cancelled() => break,
            };
            match accepted {
                Ok(fd) => {
                    backoff = Duration::ZERO;
                    let conn = Conn {
                        fd: Arc::new(fd),
                        _ticket: gate.ticket(),
                    };
                    if to
                        .send(Accepted {
                            listener,
                            conn: Some(conn),
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    // EMFILE/ENFILE clear when connections close; ECONNABORTED concerns one
                    // connection. Back off this task only: hand-offs go on in the supervisor.
                    let fatal_for_now = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE)
                            | Some(libc::ENFILE)
                            | Some(libc::ENOBUFS)
                            | Some(libc::ENOMEM)
                    );
                    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(%address, "accept failed: {e}");
                        warned = Some(Instant::now());
                    }
                    if fatal_for_now {
                        backoff = (backoff * 2)
                            .clamp(Duration::from_millis(5), Duration::from_millis(500));
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = gate.room.notified() => {}
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct Waiting {
    conn: Conn,
    /// Workers that answered "not accepted" (or stayed silent) for it.
    refused: Vec<u32>,
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    waiting: Waiting,
}

/// A hand-off to make: send `fd` to `worker` as hand-off `seq` of this listener.
#[derive(Debug)]
pub(crate) struct Handoff {
    pub worker: u32,
    pub seq: u64,
    pub fd: Arc<OwnedFd>,
}

/// An answer that does not match a hand-off in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("worker {worker} answered hand-off {seq}, which is not in flight to it")]
pub(crate) struct UnknownHandoff {
    pub worker: u32,
    pub seq: u64,
}

/// One round-robin listener's bookkeeping.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    gate: Arc<Gate>,
    ahead: usize,
    /// Workers in the rotation.
    members: BTreeSet<u32>,
    /// Members with no hand-off in flight, in turn order.
    free: VecDeque<u32>,
    /// Members out of the rotation until they prove alive.
    paused: BTreeSet<u32>,
    pending: VecDeque<Waiting>,
    in_flight: HashMap<u32, InFlight>,
    next_seq: u64,
    /// Connections closed because every worker refused them.
    pub refused_closed: u64,
}

impl RoundRobin {
    /// A listener whose accept task takes at most `ahead` connections beyond one per member.
    pub fn new(gate: Arc<Gate>, ahead: usize) -> RoundRobin {
        gate.set_limit(ahead);
        RoundRobin {
            gate,
            ahead,
            members: BTreeSet::new(),
            free: VecDeque::new(),
            paused: BTreeSet::new(),
            pending: VecDeque::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            refused_closed: 0,
        }
    }

    fn update_limit(&self) {
        self.gate
            .set_limit(self.members.len().saturating_add(self.ahead));
    }

    /// Worker `id` joins the rotation.
    pub fn join(&mut self, id: u32) {
        if self.members.insert(id) {
            self.free.push_back(id);
            self.update_limit();
        }
    }

    /// Worker `id` leaves (closed its server, is draining, died): a connection handed to it
    /// and not yet accepted goes to the next worker.
    pub fn leave(&mut self, id: u32) {
        self.members.remove(&id);
        self.paused.remove(&id);
        self.free.retain(|&w| w != id);
        if let Some(lost) = self.in_flight.remove(&id) {
            self.pending.push_front(lost.waiting);
        }
        self.update_limit();
    }

    /// Worker `id` is stopping: it gets no new connection, but a hand-off in flight to it stays
    /// in flight until it answers (it may still accept it), the hand-off expires, or it dies —
    /// so a connection is never given to two workers.
    pub fn retire(&mut self, id: u32) {
        self.members.remove(&id);
        self.paused.remove(&id);
        self.free.retain(|&w| w != id);
        self.update_limit();
    }

    /// Worker `id` stays a member but gets nothing until [`RoundRobin::resume`].
    pub fn pause(&mut self, id: u32) {
        if self.members.contains(&id) {
            self.paused.insert(id);
            self.free.retain(|&w| w != id);
        }
    }

    /// Worker `id` proved alive: back in turn (once its hand-off in flight is answered).
    pub fn resume(&mut self, id: u32) {
        if self.paused.remove(&id)
            && self.members.contains(&id)
            && !self.in_flight.contains_key(&id)
            && !self.free.contains(&id)
        {
            self.free.push_back(id);
        }
    }

    /// A newly accepted connection.
    pub fn push(&mut self, conn: Conn) {
        self.pending.push_back(Waiting {
            conn,
            refused: Vec::new(),
        });
    }

    /// A connection the supervisor accepted itself (from the backlog, at a stop).
    pub fn push_fd(&mut self, fd: OwnedFd) {
        let conn = Conn {
            fd: Arc::new(fd),
            _ticket: self.gate.ticket(),
        };
        self.push(conn);
    }

    /// The next hand-off to make, if a connection waits and a worker is free. A connection
    /// that every member refused is closed on the way.
    pub fn next(&mut self) -> Option<Handoff> {
        loop {
            let front = self.pending.front()?;
            if !self.members.is_empty() && self.members.iter().all(|m| front.refused.contains(m)) {
                self.pending.pop_front();
                self.refused_closed = self.refused_closed.saturating_add(1);
                tracing::warn!(
                    "every worker refused a connection (closing or at maxConnections); closing it"
                );
                continue;
            }
            let pos = self.free.iter().position(|w| !front.refused.contains(w))?;
            let worker = self.free.remove(pos)?;
            let waiting = self.pending.pop_front()?;
            self.next_seq = self.next_seq.wrapping_add(1);
            let seq = self.next_seq;
            let fd = waiting.conn.fd.clone();
            self.in_flight.insert(worker, InFlight { seq, waiting });
            return Some(Handoff { worker, seq, fd });
        }
    }

    /// The hand-off could not be queued for its worker: the connection waits again at the
    /// front. With `paused`, the worker is not reading and is paused.
    pub fn not_sent(&mut self, worker: u32, seq: u64, pause: bool) {
        if let Some(f) = self.in_flight.remove(&worker) {
            if f.seq == seq {
                self.pending.push_front(f.waiting);
            } else {
                self.in_flight.insert(worker, f);
            }
        }
        if pause {
            self.pause(worker);
        } else {
            self.leave(worker);
        }
    }

    /// Worker `worker` answered hand-off `seq`.
    ///
    /// # Errors
    /// [`UnknownHandoff`] when nothing with that number is in flight to it (a late answer to a
    /// hand-off that expired, or a forged one); nothing changes then.
    pub fn ack(&mut self, worker: u32, seq: u64, accepted: bool) -> Result<(), UnknownHandoff> {
        match self.in_flight.get(&worker) {
            Some(f) if f.seq == seq => {}
            _ => return Err(UnknownHandoff { worker, seq }),
        }
        let Some(f) = self.in_flight.remove(&worker) else {
            return Err(UnknownHandoff { worker, seq });
        };
        if accepted {
            // The worker holds the connection now; dropping closes the primary's copy.
            drop(f.waiting);
        } else {
            let mut waiting = f.waiting;
            waiting.refused.push(worker);
            self.pending.push_front(waiting);
        }
        if self.members.contains(&worker) && !self.paused.contains(&worker) {
            self.free.push_back(worker);
        }
        Ok(())
    }

    /// Hand-off `seq` to `worker` passed its deadline: if it is still in flight, the
    /// connection goes to another worker and `worker` is paused. True if it was.
    pub fn expire(&mut self, worker: u32, seq: u64) -> bool {
        match self.in_flight.get(&worker) {
            Some(f) if f.seq == seq => {}
            _ => return false,
        }
        if let Some(f) = self.in_flight.remove(&worker) {
            let mut waiting = f.waiting;
            waiting.refused.push(worker);
            self.pending.push_front(waiting);
        }
        self.pause(worker);
        true
    }

    /// Whether no connection waits and none is in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.in_flight.is_empty()
    }

    /// Connections accepted and not handed off yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Workers in the rotation.
    #[cfg(test)]
    pub fn members(&self) -> impl Iterator<Item = u32> + '_ {
        self.members.iter().copied()
    }

    /// Stops accepting (the accept task ends and closes its copy of the listener).
    pub fn stop_accepting(&self) {
        self.gate.close();
    }

    /// Closes every connection waiting or in flight.
    pub fn close_pending(&mut self) -> usize {
        let n = self.pending.len() + self.in_flight.len();
        self.pending.clear();
        self.in_flight.clear();
        n
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.gate.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(gate: &Arc<Gate>) -> (Conn, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        (
            Conn {
                fd: Arc::new(a.into()),
                _ticket: gate.ticket(),
            },
            b,
        )
    }

    /// True once the far end sees the primary's copy closed (and no one else holds it).
    fn closed(peer: &std::os::unix::net::UnixStream) -> bool {
        use std::io::Read;
        peer.set_nonblocking(true).expect("nb");
        matches!((&*peer).read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn workers_in_turn_one_in_flight_each() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        assert_eq!(gate.limit.load(Ordering::Relaxed), 6);
        let peers: Vec<_> = (0..3)
            .map(|_| {
                let (c, p) = conn(&gate);
                rr.push(c);
                p
            })
            .collect();
        let a = rr.next().expect("first");
        let b = rr.next().expect("second");
        assert_eq!((a.worker, b.worker), (1, 2));
        assert!(rr.next().is_none(), "both have one in flight");
        drop((a.fd, b.fd));
        rr.ack(1, a.seq, true).expect("ack");
        assert!(
            closed(&peers[0]),
            "the primary's copy is closed after the ack"
        );
        let c = rr.next().expect("third goes to the free worker");
        assert_eq!(c.worker, 1);
        assert_eq!(gate.outstanding(), 2);
    }

    #[test]
    fn a_refused_connection_goes_to_another_worker_and_one_every_worker_refuses_is_closed() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let (c, peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        drop(h.fd);
        rr.ack(1, h.seq, false).expect("refused");
        let h = rr.next().expect("to 2");
        assert_eq!(h.worker, 2);
        drop(h.fd);
        rr.ack(2, h.seq, false).expect("refused");
        assert!(rr.next().is_none());
        assert!(closed(&peer));
        assert_eq!(rr.refused_closed, 1);
        assert!(rr.is_idle());
        assert_eq!(gate.outstanding(), 0);
    }

    #[test]
    fn a_worker_that_leaves_mid_handoff_loses_nothing() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        let (c, peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        drop(h.fd);
        rr.leave(1);
        assert!(!closed(&peer));
        rr.join(2);
        let h = rr.next().expect("to 2");
        assert_eq!(h.worker, 2);
    }

    #[test]
    fn an_expired_handoff_goes_elsewhere_and_pauses_the_silent_worker() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let (c, _peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        let (seq, _) = (h.seq, h.fd);
        assert!(rr.expire(1, seq));
        assert!(!rr.expire(1, seq), "only once");
        let h2 = rr.next().expect("to 2");
        assert_eq!(h2.worker, 2);
        // A late answer from the silent worker is refused and changes nothing.
        assert_eq!(rr.ack(1, seq, true), Err(UnknownHandoff { worker: 1, seq }));
        rr.ack(2, h2.seq, true).expect("ack");
        let (c, _peer) = conn(&gate);
        rr.push(c);
        assert_eq!(rr.next().expect("paused 1 is skipped").worker, 2);
        rr.resume(1);
        let (c, _peer) = conn(&gate);
        rr.push(c);
        assert_eq!(rr.next().expect("1 is back").worker, 1);
    }

    #[test]
    fn forged_and_duplicate_answers_are_refused() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        assert!(rr.ack(1, 77, true).is_err(), "never sent");
        let (c, _peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        assert!(rr.ack(1, h.seq + 1, true).is_err(), "wrong number");
        rr.ack(1, h.seq, true).expect("right number");
        assert!(rr.ack(1, h.seq, true).is_err(), "twice");
        assert!(rr.ack(9, 1, true).is_err(), "not a member");
    }

    #[test]
    fn a_retired_worker_keeps_its_handoff_until_it_answers() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let (c, _peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        assert_eq!(h.worker, 1);
        rr.retire(1);
        assert!(
            rr.next().is_none(),
            "not given to another worker while 1 may take it"
        );
        rr.ack(1, h.seq, false).expect("1 refuses while stopping");
        let h2 = rr.next().expect("now to 2");
        assert_eq!(h2.worker, 2);
        rr.ack(2, h2.seq, true).expect("ack");
        let (c, _peer) = conn(&gate);
        rr.push(c);
        assert_eq!(rr.next().expect("1 gets nothing new").worker, 2);
    }

    #[test]
    fn a_full_queue_pauses_and_requeues() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let (c, _peer) = conn(&gate);
        rr.push(c);
        let h = rr.next().expect("to 1");
        rr.not_sent(1, h.seq, true);
        let h = rr.next().expect("to 2 instead");
        assert_eq!(h.worker, 2);
        rr.not_sent(2, h.seq, false);
        assert_eq!(rr.members().collect::<Vec<_>>(), vec![1]);
        assert!(rr.next().is_none(), "1 is paused, 2 is gone");
        assert_eq!(rr.pending(), 1);
    }
}
