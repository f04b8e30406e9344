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
mod tests;
