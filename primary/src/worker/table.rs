//! The worker table: every live worker's record, the slots of the pool, the recently dead
//! (for look-ups), and worker ids.
//!
//! The supervisor owns the table and is the only one to write it; the machines
//! ([`crate::supervisor`]) read it. A worker's phase changes only through
//! [`Worker::apply`], by the transition table of [`Phase`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use netcluster_protocol::message::ToWorker;

use crate::event::WorkerInfo;
use crate::worker::conn::{OutFd, SendFailed, WorkerTx};
use crate::worker::state::{DrainReason, Exit, Phase, Refused, Transition};

/// Dead workers remembered for `WorkerHandle` look-ups.
pub(crate) const GRAVEYARD: usize = 256;

/// Why a worker stops, once something said it should. There is one cause at a time; what
/// the exit means (asked for or not, Node's `exitedAfterDisconnect`) follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopCause {
    /// The primary told it to drain.
    Drained(DrainReason),
    /// Killed on request (`worker.kill()`, a stop that kills): an exit asked for.
    Killed {
        /// Node's `exitedAfterDisconnect` as it was when the kill came.
        after_disconnect: bool,
    },
    /// It said it stops by itself: its own `disconnect()` (`disconnect`), or a signal it got.
    /// Its slot is refilled as after a crash.
    ByItself {
        /// It called `disconnect()`.
        disconnect: bool,
    },
    /// The primary killed it for misbehaving: replaced like a crashed worker.
    Misbehaved,
}

impl StopCause {
    /// Whether the primary (or the library) asked for the exit: no respawn, no surprise.
    pub fn expected(self) -> bool {
        matches!(self, StopCause::Drained(_) | StopCause::Killed { .. })
    }

    /// Node's `worker.exitedAfterDisconnect`.
    pub fn after_disconnect(self) -> bool {
        match self {
            StopCause::Drained(_) => true,
            StopCause::Killed { after_disconnect } => after_disconnect,
            StopCause::ByItself { disconnect } => disconnect,
            StopCause::Misbehaved => false,
        }
    }
}

/// How the primary talks to a worker: a native worker has netcluster's channel; a program
/// worker has its notification socket and what it said there.
#[derive(Debug)]
pub(crate) enum Io {
    /// A native worker: its channel's queue.
    Native {
        /// The queue its writer drains.
        tx: WorkerTx,
    },
    /// A program worker (systemd-style descriptors, no channel).
    Program {
        /// It said `READY=1` (or its `--ready-after` time passed).
        ready: bool,
        /// Its last `STATUS=` notification.
        status_text: Option<String>,
        /// Stops its notification reader (and removes the socket) when the record goes.
        #[expect(dead_code, reason = "held for its Drop")]
        notify: Option<tokio_util::sync::DropGuard>,
        /// Lines of its output the primary dropped (its output did not keep up).
        dropped: std::sync::Arc<crate::output::Dropped>,
    },
}

/// A live worker.
#[derive(Debug)]
pub(crate) struct Worker {
    /// Its id (never reused).
    pub id: u32,
    /// Its process.
    pub pid: u32,
    /// The slot it serves; `None` once it was replaced or its slot scaled away.
    pub slot: Option<usize>,
    /// The generation it runs.
    pub generation: u64,
    /// When it started.
    pub started: Instant,
    phase: Phase,
    /// When it entered its current phase.
    since: Instant,
    /// How the primary talks to it.
    pub io: Io,
    /// Listeners it holds, by id.
    pub listeners: BTreeSet<u64>,
    /// Why it stops, once something said it should.
    pub stop: Option<StopCause>,
    /// Count requests it has in flight.
    pub requests: u32,
    /// Requests refused in a row for being over a limit; reset by one within the limits.
    pub over_limit: u32,
    /// Messages of hand-offs it let expire in a row; reset by an answer in time.
    pub silent_handoffs: u32,
    /// Bad frames and requests over its limits.
    pub violations: u32,
    /// The number of a ping it has not answered yet.
    pub ping: Option<u64>,
    /// Its channel task (native) or exit waiter (program), if it has one.
    pub task: Option<tokio::task::Id>,
    /// A program worker that has waited long for `READY=1` (the primary said so).
    pub waited_long: bool,
    /// A program worker that missed its watchdog: it gets the watchdog signal when it is
    /// drained.
    pub hung: bool,
}

impl Worker {
    /// A worker just started, in [`Phase::Starting`].
    pub fn new(id: u32, pid: u32, slot: usize, generation: u64, io: Io) -> Worker {
        let now = Instant::now();
        Worker {
            id,
            pid,
            slot: Some(slot),
            generation,
            started: now,
            phase: Phase::Starting,
            since: now,
            io,
            listeners: BTreeSet::new(),
            stop: None,
            requests: 0,
            over_limit: 0,
            silent_handoffs: 0,
            violations: 0,
            ping: None,
            task: None,
            waited_long: false,
            hung: false,
        }
    }

    /// Where it is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When it entered its current phase.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The one way a worker's phase changes: by the transition table.
    pub fn apply(&mut self, t: Transition) -> Result<(), Refused> {
        self.phase = self.phase.next(t)?;
        self.since = Instant::now();
        Ok(())
    }

    /// A program worker (no channel).
    pub fn is_program(&self) -> bool {
        matches!(self.io, Io::Program { .. })
    }

    /// Queues `msg` for a native worker; a program worker has no channel (`Closed`).
    pub fn send(&self, msg: ToWorker, fds: Vec<OutFd>) -> Result<(), SendFailed> {
        match &self.io {
            Io::Native { tx } => tx.try_send(msg, fds),
            Io::Program { .. } => Err(SendFailed::Closed),
        }
    }

    /// Whether the primary asked for its exit.
    pub fn expected_exit(&self) -> bool {
        self.stop.is_some_and(StopCause::expected)
    }

    /// Node's `worker.exitedAfterDisconnect`.
    pub fn exited_after_disconnect(&self) -> bool {
        self.stop.is_some_and(StopCause::after_disconnect)
    }

    /// What the library and the events say of it.
    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.id,
            pid: self.pid,
            slot: self.slot,
            generation: self.generation,
            online: self.phase != Phase::Starting,
            state: self.phase.state(),
            exited_after_disconnect: self.exited_after_disconnect(),
        }
    }
}

/// A place in the pool.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The worker serving it.
    pub worker: Option<u32>,
}

/// Every worker and slot.
#[derive(Debug)]
pub(crate) struct Table {
    /// Live workers by id.
    pub workers: BTreeMap<u32, Worker>,
    /// Slots by number (1..).
    pub slots: BTreeMap<usize, Slot>,
    graveyard: VecDeque<WorkerInfo>,
    next_id: u32,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            graveyard: VecDeque::new(),
            next_id: 1,
        }
    }
}

impl Table {
    /// The id the next worker gets.
    pub fn peek_id(&self) -> u32 {
        self.next_id
    }

    /// Takes the next id (ids wrap past `u32::MAX` to 1, never 0).
    pub fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// A live worker.
    pub fn get(&self, id: u32) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// A live worker, to change.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Worker> {
        self.workers.get_mut(&id)
    }

    /// The worker serving `slot`.
    pub fn slot_worker(&self, slot: usize) -> Option<u32> {
        self.slots.get(&slot).and_then(|s| s.worker)
    }

    /// Adds a started worker; unless it is `incoming` (a reload's, which takes its slot over
    /// once ready), it serves its slot at once.
    pub fn insert(&mut self, worker: Worker, incoming: bool) {
        if let (false, Some(slot)) = (incoming, worker.slot) {
            if let Some(s) = self.slots.get_mut(&slot) {
                s.worker = Some(worker.id);
            }
        }
        self.workers.insert(worker.id, worker);
    }

    /// Removes a worker that exited (`exit`), remembers it among the dead, and frees its
    /// slot.
    pub fn remove(&mut self, id: u32, exit: Exit) -> Option<Worker> {
        let mut w = self.workers.remove(&id)?;
        // Refused only from `Dead`, which no live worker is in.
        let _ = w.apply(Transition::Exited(exit));
        self.graveyard.push_back(w.info());
        while self.graveyard.len() > GRAVEYARD {
            self.graveyard.pop_front();
        }
        if let Some(slot) = w.slot.and_then(|s| self.slots.get_mut(&s)) {
            if slot.worker == Some(id) {
                slot.worker = None;
            }
        }
        Some(w)
    }

    /// What is known of worker `id`, live or recently dead.
    pub fn info(&self, id: u32) -> Option<WorkerInfo> {
        self.workers
            .get(&id)
            .map(Worker::info)
            .or_else(|| self.graveyard.iter().find(|d| d.id == id).cloned())
    }

    /// Whether worker `id` died recently.
    pub fn is_dead(&self, id: u32) -> bool {
        self.graveyard.iter().any(|d| d.id == id)
    }

    /// The lowest slot number that is free (neither in the pool nor in `taken`).
    pub fn free_slot(&self, taken: impl Fn(usize) -> bool) -> usize {
        (1..)
            .find(|s| !self.slots.contains_key(s) && !taken(*s))
            .unwrap_or(1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A native worker whose queue the test holds.
    pub(crate) fn native(
        id: u32,
        slot: usize,
    ) -> (
        Worker,
        tokio::sync::mpsc::Receiver<crate::worker::conn::Outbound>,
    ) {
        let (tx, rx) = WorkerTx::pair(64);
        (Worker::new(id, 10_000 + id, slot, 1, Io::Native { tx }), rx)
    }

    #[test]
    fn the_stop_cause_decides_what_an_exit_means() {
        let cases = [
            (StopCause::Drained(DrainReason::Stop), true, true),
            (
                StopCause::Killed {
                    after_disconnect: false,
                },
                true,
                false,
            ),
            (StopCause::ByItself { disconnect: true }, false, true),
            (StopCause::ByItself { disconnect: false }, false, false),
            (StopCause::Misbehaved, false, false),
        ];
        for (cause, expected, after) in cases {
            assert_eq!(cause.expected(), expected, "{cause:?}");
            assert_eq!(cause.after_disconnect(), after, "{cause:?}");
        }
    }

    #[test]
    fn a_removed_worker_frees_its_slot_and_is_remembered() {
        let mut t = Table::default();
        t.slots.insert(1, Slot::default());
        let id = t.take_id();
        let (w, _rx) = native(id, 1);
        t.insert(w, false);
        assert_eq!(t.slot_worker(1), Some(id));
        let w = t
            .remove(
                id,
                Exit {
                    code: Some(0),
                    signal: None,
                },
            )
            .expect("live");
        assert_eq!(
            w.phase(),
            Phase::Dead(Exit {
                code: Some(0),
                signal: None
            })
        );
        assert_eq!(
            t.info(id).map(|i| i.state),
            Some(crate::worker::state::WorkerState::Dead)
        );
        assert_eq!(t.slot_worker(1), None);
        assert!(t.is_dead(id));
        assert_eq!(t.info(id).map(|i| i.id), Some(id));
    }

    #[test]
    fn an_incoming_worker_does_not_take_its_slot() {
        let mut t = Table::default();
        t.slots.insert(1, Slot::default());
        let (w, _rx) = native(1, 1);
        t.insert(w, true);
        assert_eq!(t.slot_worker(1), None);
        assert_eq!(t.free_slot(|_| false), 2);
        assert_eq!(t.free_slot(|s| s == 2), 3);
    }

    #[test]
    fn ids_never_come_back_as_zero() {
        let mut t = Table {
            next_id: u32::MAX,
            ..Table::default()
        };
        assert_eq!(t.take_id(), u32::MAX);
        assert_eq!(t.take_id(), 1);
    }

    #[test]
    fn a_program_worker_has_no_channel() {
        let w = Worker::new(
            1,
            2,
            1,
            1,
            Io::Program {
                ready: false,
                status_text: None,
                notify: None,
                dropped: std::sync::Arc::default(),
            },
        );
        assert!(w.is_program());
        assert_eq!(
            w.send(ToWorker::Ping { seq: 1 }, Vec::new()),
            Err(SendFailed::Closed)
        );
    }
}
