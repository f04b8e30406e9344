//! Round-robin hand-off (Node's `SCHED_RR`, its default on Linux): the primary accepts every
//! connection on a listener and hands it to the next free worker.
//!
//! This module holds the state machine ([`RoundRobin`]) — pure bookkeeping the supervisor
//! drives, unit-tested without processes — and the accept task ([`spawn_acceptor`]).
//!
//! - Each connection goes to the next worker in turn, which may have up to [`WINDOW`]
//!   hand-offs in flight (a stuck worker is skipped once its window is full): with no load
//!   that is plain round robin, one at a time; under load several connections travel in one
//!   message ([`BATCH`] descriptors in one `sendmsg`) and
//!   the worker answers them in one message, which is where the primary's cost per
//!   connection goes down.
//! - A worker answers accepted or not accepted (it is closing, or at `maxConnections`); a
//!   connection that is not accepted goes to another worker, and one that every worker refused
//!   is closed.
//! - The primary keeps its copy of a handed-off connection until the worker says it accepted
//!   it, so a worker that dies mid-hand-off loses no connection: it goes to the next worker.
//! - A hand-off has a deadline. Past it the connection goes to another worker and the silent
//!   worker is paused (out of the rotation) until it proves alive; the worker itself refuses
//!   a hand-off it reads after the deadline, so a connection is never served twice.
//! - The accept task takes at most [`Gate`]'s limit of connections ahead of the workers (a
//!   window per worker in rotation plus a few); the rest wait in the kernel's backlog. Accept errors
//!   (`EMFILE`, `ECONNABORTED`) back the accept task off without delaying hand-offs, which the
//!   supervisor does.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

/// Connections in flight to one worker at most: sent and not answered yet. Under load a
/// worker has several, so hand-offs travel several to a message and answers come back several
/// to a message; an idle worker is still preferred (see [`RoundRobin::next_batches`]).
pub(crate) const WINDOW: usize = 8;

/// A worker with hand-offs in flight that has answered none for this long gets no more until
/// it does: a stopped or busy worker holds a connection or two, not a whole window, while the
/// others take its turns.
pub(crate) const STALL: Duration = Duration::from_millis(100);

/// Connections in one message at most (within the channel's descriptor limit).
pub(crate) const BATCH: usize = 8;

const _: () = assert!(BATCH <= netcluster_protocol::fd::MAX_FDS_PER_MESSAGE);

#[derive(Debug)]
struct Waiting {
    conn: Conn,
    /// Workers that answered "not accepted" (or stayed silent) for it.
    refused: Vec<u32>,
}

#[derive(Debug)]
struct InFlight {
    worker: u32,
    /// The message it went in (its first hand-off number).
    batch: u64,
    waiting: Waiting,
}

/// A worker's hand-offs in flight.
#[derive(Debug, Clone, Copy)]
struct Load {
    n: usize,
    /// When it last answered (or, with nothing in flight before, was sent one).
    progress: Instant,
}

impl Load {
    fn has_room(&self, now: Instant) -> bool {
        self.n < WINDOW && now.saturating_duration_since(self.progress) < STALL
    }
}

/// One message's hand-offs still unanswered.
#[derive(Debug, Clone, Copy)]
struct Sent {
    worker: u32,
    /// Its last hand-off number.
    last: u64,
    unanswered: usize,
}

/// Hand-offs to make in one message: send `fds` to `worker` as hand-offs `seqs` of this
/// listener. `id` (the first number) names the message for [`RoundRobin::expire`].
#[derive(Debug)]
pub(crate) struct Batch {
    pub worker: u32,
    pub id: u64,
    pub seqs: Vec<u64>,
    pub fds: Vec<Arc<OwnedFd>>,
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
    /// Members not paused, in turn order: the next connection goes to the first of those with
    /// room in its window, which then moves to the back.
    turn: VecDeque<u32>,
    /// Members out of the rotation until they prove alive.
    paused: BTreeSet<u32>,
    pending: VecDeque<Waiting>,
    in_flight: BTreeMap<u64, InFlight>,
    /// Connections in flight per worker (at most [`WINDOW`]).
    load: HashMap<u32, Load>,
    /// Messages with hand-offs still unanswered, by id.
    sent: HashMap<u64, Sent>,
    next_seq: u64,
    /// Connections closed because every worker refused them.
    pub refused_closed: u64,
}

impl RoundRobin {
    /// A listener whose accept task takes at most `ahead` connections beyond the workers'
    /// windows.
    pub fn new(gate: Arc<Gate>, ahead: usize) -> RoundRobin {
        gate.set_limit(ahead);
        RoundRobin {
            gate,
            ahead,
            members: BTreeSet::new(),
            turn: VecDeque::new(),
            paused: BTreeSet::new(),
            pending: VecDeque::new(),
            in_flight: BTreeMap::new(),
            load: HashMap::new(),
            sent: HashMap::new(),
            next_seq: 0,
            refused_closed: 0,
        }
    }

    fn update_limit(&self) {
        self.gate.set_limit(
            self.members
                .len()
                .saturating_mul(WINDOW)
                .saturating_add(self.ahead),
        );
    }

    /// Worker `id` joins the rotation.
    pub fn join(&mut self, id: u32) {
        if self.members.insert(id) {
            self.turn.push_back(id);
            self.update_limit();
        }
    }

    /// Takes hand-off `seq` out of flight: the worker's load and its message's count go down.
    /// Returns it and, if it was its message's last, the message's id.
    fn land(&mut self, seq: u64) -> Option<(InFlight, Option<u64>)> {
        let f = self.in_flight.remove(&seq)?;
        if let Some(l) = self.load.get_mut(&f.worker) {
            l.n = l.n.saturating_sub(1);
            if l.n == 0 {
                self.load.remove(&f.worker);
            }
        }
        let mut done = None;
        if let Some(s) = self.sent.get_mut(&f.batch) {
            s.unanswered = s.unanswered.saturating_sub(1);
            if s.unanswered == 0 {
                self.sent.remove(&f.batch);
                done = Some(f.batch);
            }
        }
        Some((f, done))
    }

    /// Puts every connection in flight to `worker` (in message `batch` only, if given) back at
    /// the front of the queue, in order; with `refused`, marked as refused by it.
    fn requeue(&mut self, worker: u32, batch: Option<u64>, refused: bool) -> usize {
        let seqs: Vec<u64> = match batch.and_then(|b| self.sent.get(&b).map(|s| (b, s.last))) {
            Some((first, last)) => self
                .in_flight
                .range(first..=last)
                .filter(|(_, f)| f.worker == worker && f.batch == first)
                .map(|(&seq, _)| seq)
                .collect(),
            None if batch.is_some() => Vec::new(),
            None => self
                .in_flight
                .iter()
                .filter(|(_, f)| f.worker == worker)
                .map(|(&seq, _)| seq)
                .collect(),
        };
        for &seq in seqs.iter().rev() {
            if let Some((f, _)) = self.land(seq) {
                let mut waiting = f.waiting;
                if refused {
                    waiting.refused.push(worker);
                }
                self.pending.push_front(waiting);
            }
        }
        seqs.len()
    }

    /// Worker `id` leaves (closed its server, is draining, died): the connections handed to it
    /// and not yet accepted go to the next workers.
    pub fn leave(&mut self, id: u32) {
        self.members.remove(&id);
        self.paused.remove(&id);
        self.turn.retain(|&w| w != id);
        self.requeue(id, None, false);
        self.update_limit();
    }

    /// Worker `id` is stopping: it gets no new connection, but hand-offs in flight to it stay
    /// in flight until it answers (it may still accept them), they expire, or it dies — so a
    /// connection is never given to two workers.
    pub fn retire(&mut self, id: u32) {
        self.members.remove(&id);
        self.paused.remove(&id);
        self.turn.retain(|&w| w != id);
        self.update_limit();
    }

    /// Worker `id` stays a member but gets nothing until [`RoundRobin::resume`].
    pub fn pause(&mut self, id: u32) {
        if self.members.contains(&id) {
            self.paused.insert(id);
            self.turn.retain(|&w| w != id);
        }
    }

    /// Worker `id` proved alive: back in turn.
    pub fn resume(&mut self, id: u32) {
        if self.paused.remove(&id) && self.members.contains(&id) && !self.turn.contains(&id) {
            self.turn.push_back(id);
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

    /// The hand-offs to make now, grouped in messages: each waiting connection, in order, goes
    /// to the next worker in turn that has room in its window ([`WINDOW`]), has answered
    /// within [`STALL`] if it has hand-offs in flight, and has not refused it; that worker then
    /// moves to the back of the turn. So the workers take strict turns, one connection each,
    /// under light load and under heavy load alike (even counts), and one that is stopped or
    /// busy is skipped after a connection or two. A connection that every member refused is
    /// closed on the way.
    pub fn next_batches(&mut self) -> Vec<Batch> {
        self.next_batches_at(Instant::now())
    }

    /// [`RoundRobin::next_batches`] at `now`.
    fn next_batches_at(&mut self, now: Instant) -> Vec<Batch> {
        let mut out: Vec<Batch> = Vec::new();
        while let Some(front) = self.pending.front() {
            if !self.members.is_empty() && self.members.iter().all(|m| front.refused.contains(m)) {
                self.pending.pop_front();
                self.refused_closed = self.refused_closed.saturating_add(1);
                tracing::warn!(
                    "every worker refused a connection (closing or at maxConnections); closing it"
                );
                continue;
            }
            let load = &self.load;
            let Some(pos) = self.turn.iter().position(|w| {
                load.get(w).is_none_or(|l| l.has_room(now)) && !front.refused.contains(w)
            }) else {
                break;
            };
            let Some(worker) = self.turn.remove(pos) else {
                break;
            };
            self.turn.push_back(worker);
            let Some(waiting) = self.pending.pop_front() else {
                break;
            };
            self.next_seq = self.next_seq.wrapping_add(1);
            let seq = self.next_seq;
            self.load
                .entry(worker)
                .or_insert(Load {
                    n: 0,
                    progress: now,
                })
                .n += 1;
            let i = match out
                .iter()
                .position(|b| b.worker == worker && b.seqs.len() < BATCH)
            {
                Some(i) => i,
                None => {
                    out.push(Batch {
                        worker,
                        id: seq,
                        seqs: Vec::with_capacity(1),
                        fds: Vec::with_capacity(1),
                    });
                    out.len() - 1
                }
            };
            let batch = &mut out[i];
            batch.seqs.push(seq);
            batch.fds.push(waiting.conn.fd.clone());
            self.in_flight.insert(
                seq,
                InFlight {
                    worker,
                    batch: batch.id,
                    waiting,
                },
            );
        }
        for b in &out {
            self.sent.insert(
                b.id,
                Sent {
                    worker: b.worker,
                    last: b.seqs.last().copied().unwrap_or(b.id),
                    unanswered: b.seqs.len(),
                },
            );
        }
        out
    }

    /// Message `batch` could not be queued for `worker`: its connections wait again at the
    /// front. With `pause`, the worker is not reading and is paused; otherwise it is gone.
    pub fn not_sent(&mut self, worker: u32, batch: u64, pause: bool) {
        self.requeue(worker, Some(batch), false);
        if pause {
            self.pause(worker);
        } else {
            self.leave(worker);
        }
    }

    /// Worker `worker` answered hand-off `seq`. Returns the id of the message it was in when
    /// it was that message's last unanswered one (its deadline no longer matters).
    ///
    /// # Errors
    /// [`UnknownHandoff`] when nothing with that number is in flight to it (a late answer to a
    /// hand-off that expired, or a forged one); nothing changes then.
    pub fn ack(
        &mut self,
        worker: u32,
        seq: u64,
        accepted: bool,
    ) -> Result<Option<u64>, UnknownHandoff> {
        match self.in_flight.get(&seq) {
            Some(f) if f.worker == worker => {}
            _ => return Err(UnknownHandoff { worker, seq }),
        }
        let Some((f, done)) = self.land(seq) else {
            return Err(UnknownHandoff { worker, seq });
        };
        if let Some(l) = self.load.get_mut(&worker) {
            l.progress = Instant::now();
        }
        if !accepted {
            let mut waiting = f.waiting;
            waiting.refused.push(worker);
            self.pending.push_front(waiting);
        }
        // Accepted: the worker holds the connection now; dropping `f` closed the primary's copy.
        Ok(done)
    }

    /// Message `batch` to `worker` passed its deadline: what of it is still in flight goes to
    /// other workers and `worker` is paused. True if anything was.
    pub fn expire(&mut self, worker: u32, batch: u64) -> bool {
        if self.sent.get(&batch).is_none_or(|s| s.worker != worker) {
            return false;
        }
        let n = self.requeue(worker, Some(batch), true);
        self.sent.remove(&batch);
        if n > 0 {
            self.pause(worker);
        }
        n > 0
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
        self.load.clear();
        self.sent.clear();
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
    ///
    /// Other tests of this binary spawn processes, and a child holds copies of every descriptor
    /// between its fork and its exec: give such a copy a moment to go away.
    fn closed(peer: &std::os::unix::net::UnixStream) -> bool {
        use std::io::Read;
        peer.set_nonblocking(true).expect("nb");
        for _ in 0..200 {
            if matches!((&*peer).read(&mut [0u8; 1]), Ok(0)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The far end is open (a fork's copy can only delay a close, never cause one).
    fn open(peer: &std::os::unix::net::UnixStream) -> bool {
        use std::io::Read;
        peer.set_nonblocking(true).expect("nb");
        matches!((&*peer).read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn push(
        rr: &mut RoundRobin,
        gate: &Arc<Gate>,
        n: usize,
    ) -> Vec<std::os::unix::net::UnixStream> {
        (0..n)
            .map(|_| {
                let (c, p) = conn(gate);
                rr.push(c);
                p
            })
            .collect()
    }

    /// (worker, number of hand-offs) of each message.
    fn shape(batches: &[Batch]) -> Vec<(u32, usize)> {
        batches.iter().map(|b| (b.worker, b.seqs.len())).collect()
    }

    #[test]
    fn one_at_a_time_the_workers_take_turns() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        rr.join(3);
        assert_eq!(gate.limit.load(Ordering::Relaxed), 3 * WINDOW + 4);
        let mut order = Vec::new();
        let _peers: Vec<_> = (0..6)
            .map(|_| {
                let (c, p) = conn(&gate);
                rr.push(c);
                let b = rr.next_batches();
                assert_eq!(b.len(), 1);
                order.push(b[0].worker);
                rr.ack(b[0].worker, b[0].seqs[0], true)
                    .expect("ack")
                    .expect("the message is answered");
                p
            })
            .collect();
        assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
        assert!(rr.is_idle());
        assert_eq!(gate.outstanding(), 0);
    }

    #[test]
    fn a_burst_goes_round_robin_in_one_message_per_worker() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let peers = push(&mut rr, &gate, 5);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 3), (2, 2)]);
        // Turn by turn: 1 took the 1st, 3rd and 5th connections.
        assert_eq!(b[0].seqs, vec![1, 3, 5]);
        assert_eq!(b[1].seqs, vec![2, 4]);
        assert_eq!(b[0].id, 1);
        assert_eq!(b[0].fds.len(), 3);
        let (first, ids) = (b[0].seqs.clone(), (b[0].id, b[1].id));
        drop(b);
        assert_eq!(rr.ack(1, first[0], true), Ok(None));
        assert!(
            closed(&peers[0]),
            "the primary's copy is closed after the ack"
        );
        assert!(open(&peers[2]), "not the others'");
        assert_eq!(rr.ack(1, first[1], true), Ok(None));
        assert_eq!(rr.ack(1, first[2], true), Ok(Some(ids.0)));
        assert_eq!(gate.outstanding(), 2);
    }

    #[test]
    fn a_window_per_worker_and_the_rest_waits() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let _peers = push(&mut rr, &gate, 2 * WINDOW + 3);
        let b = rr.next_batches();
        let per_worker = |w: u32| -> usize {
            b.iter()
                .filter(|b| b.worker == w)
                .map(|b| b.seqs.len())
                .sum()
        };
        assert_eq!((per_worker(1), per_worker(2)), (WINDOW, WINDOW));
        assert!(b.iter().all(|b| b.seqs.len() <= BATCH));
        assert_eq!(rr.pending(), 3);
        assert!(rr.next_batches().is_empty(), "every window is full");
        let seq = b[0].seqs[0];
        drop(b);
        rr.ack(1, seq, true).expect("ack");
        assert_eq!(shape(&rr.next_batches()), vec![(1, 1)]);
    }

    #[test]
    fn strict_turns_and_a_worker_with_a_full_window_is_skipped() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let _peers = push(&mut rr, &gate, 4);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 2), (2, 2)]);
        // 2 answers, 1 does not: turns stay strict while 1 has room.
        for &seq in &b[1].seqs {
            rr.ack(2, seq, true).expect("ack");
        }
        let _more = push(&mut rr, &gate, 2 * WINDOW);
        let b = rr.next_batches();
        let to = |w: u32| -> usize {
            b.iter()
                .filter(|b| b.worker == w)
                .map(|b| b.seqs.len())
                .sum()
        };
        // 1 fills its window (2 already in flight), 2 takes its turns and then the rest.
        assert_eq!((to(1), to(2)), (WINDOW - 2, WINDOW));
        assert_eq!(rr.pending(), 2);
    }

    #[test]
    fn a_worker_that_stops_answering_is_skipped_after_a_while() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let t0 = Instant::now();
        let _peers = push(&mut rr, &gate, 2);
        let b = rr.next_batches_at(t0);
        assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
        // 2 answers; 1 is silent. Within STALL, 1 still gets its turns.
        rr.ack(2, b[1].seqs[0], true).expect("ack");
        let _more = push(&mut rr, &gate, 2);
        let b = rr.next_batches_at(t0);
        assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
        rr.ack(2, b[1].seqs[0], true).expect("ack");
        // Past it, 1 gets nothing while 2, which answers, takes everything.
        let _more = push(&mut rr, &gate, 3);
        let later = Instant::now() + STALL;
        assert_eq!(shape(&rr.next_batches_at(later)), vec![(2, 3)]);
    }

    #[test]
    fn a_refused_connection_goes_to_another_worker_and_one_every_worker_refuses_is_closed() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let (c, peer) = conn(&gate);
        rr.push(c);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 1)]);
        let seq = b[0].seqs[0];
        drop(b);
        rr.ack(1, seq, false).expect("refused");
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(2, 1)]);
        let seq = b[0].seqs[0];
        drop(b);
        rr.ack(2, seq, false).expect("refused");
        assert!(rr.next_batches().is_empty());
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
        let peers = push(&mut rr, &gate, 3);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 3)]);
        drop(b);
        rr.leave(1);
        assert!(peers.iter().all(open));
        rr.join(2);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(2, 3)]);
        assert_eq!(b[0].seqs, vec![4, 5, 6], "new numbers, same order");
    }

    #[test]
    fn an_expired_message_goes_elsewhere_and_pauses_the_silent_worker() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let _peers = push(&mut rr, &gate, 3);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 2), (2, 1)]);
        let (late, id, two) = (b[0].seqs.clone(), b[0].id, b[1].seqs[0]);
        drop(b);
        // 1 answered one of its two in time.
        rr.ack(1, late[0], true).expect("ack");
        assert!(!rr.expire(2, id), "not 2's message");
        assert!(rr.expire(1, id));
        assert!(!rr.expire(1, id), "only once");
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(2, 1)], "1 is paused");
        let moved = b[0].seqs[0];
        drop(b);
        // A late answer from the silent worker is refused and changes nothing.
        assert_eq!(
            rr.ack(1, late[1], true),
            Err(UnknownHandoff {
                worker: 1,
                seq: late[1]
            })
        );
        rr.ack(2, two, true).expect("ack");
        rr.ack(2, moved, true).expect("ack");
        let _more = push(&mut rr, &gate, 1);
        assert_eq!(
            shape(&rr.next_batches()),
            vec![(2, 1)],
            "paused 1 is skipped"
        );
        rr.resume(1);
        let _more = push(&mut rr, &gate, 2);
        assert_eq!(
            shape(&rr.next_batches()),
            vec![(2, 1), (1, 1)],
            "1 is back, at the end of the turn"
        );
    }

    #[test]
    fn forged_and_duplicate_answers_are_refused() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        assert!(rr.ack(1, 77, true).is_err(), "never sent");
        let _peers = push(&mut rr, &gate, 2);
        let b = rr.next_batches();
        let (one, two) = (b[0].seqs[0], b[1].seqs[0]);
        drop(b);
        assert!(rr.ack(1, two, true).is_err(), "another worker's");
        assert!(rr.ack(1, one + 10, true).is_err(), "wrong number");
        rr.ack(1, one, true).expect("right number");
        assert!(rr.ack(1, one, true).is_err(), "twice");
        assert!(rr.ack(9, two, true).is_err(), "not a member");
        assert!(!rr.expire(9, two), "not a member's message");
        rr.ack(2, two, true).expect("still 2's");
    }

    #[test]
    fn a_retired_worker_keeps_its_handoffs_until_it_answers() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let _peers = push(&mut rr, &gate, 1);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 1)]);
        let seq = b[0].seqs[0];
        drop(b);
        rr.retire(1);
        assert!(
            rr.next_batches().is_empty(),
            "not given to another worker while 1 may take it"
        );
        rr.ack(1, seq, false).expect("1 refuses while stopping");
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(2, 1)], "now to 2");
        rr.ack(2, b[0].seqs[0], true).expect("ack");
        let _more = push(&mut rr, &gate, 2);
        assert_eq!(
            shape(&rr.next_batches()),
            vec![(2, 2)],
            "1 gets nothing new"
        );
    }

    #[test]
    fn a_full_queue_pauses_and_requeues() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        rr.join(2);
        let _peers = push(&mut rr, &gate, 2);
        let b = rr.next_batches();
        assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
        let (one, two) = (b[0].id, b[1].id);
        drop(b);
        rr.not_sent(1, one, true);
        rr.not_sent(2, two, false);
        assert_eq!(rr.members().collect::<Vec<_>>(), vec![1]);
        assert!(rr.next_batches().is_empty(), "1 is paused, 2 is gone");
        assert_eq!(rr.pending(), 2);
        rr.resume(1);
        assert_eq!(shape(&rr.next_batches()), vec![(1, 2)]);
    }

    #[test]
    fn close_pending_forgets_everything() {
        let gate = Gate::new(0);
        let mut rr = RoundRobin::new(gate.clone(), 4);
        rr.join(1);
        let peers = push(&mut rr, &gate, WINDOW + 2);
        drop(rr.next_batches());
        assert_eq!(rr.close_pending(), WINDOW + 2);
        assert!(rr.is_idle());
        assert!(peers.iter().all(closed));
        assert_eq!(gate.outstanding(), 0);
        let _more = push(&mut rr, &gate, 1);
        assert_eq!(
            shape(&rr.next_batches()),
            vec![(1, 1)],
            "a full window again"
        );
    }
}
