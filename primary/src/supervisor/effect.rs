//! What machines see and what they ask for.
//!
//! A machine ([`Machine`]) is offered every [`Happening`] — a worker ready, a worker exited and
//! why, a worker started or not, a timer, a stop — with a read-only [`View`] of the worker
//! table and the listeners, and answers with [`Effect`]s. The supervisor's `apply` is the one
//! place that carries effects out: it starts, signals and forgets processes, arms timers and
//! sends replies.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::command::{Reply, ScaleReport};
use crate::error::Error;
use crate::registry::{Mode, Registry};
use crate::settings::Settings;
use crate::supervisor::ReloadReport;
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;
use crate::worker::table::{Table, Worker};

/// Something that happened, offered to every machine.
#[derive(Debug)]
pub(crate) enum Happening<'a> {
    /// A worker may have become ready (its handshake, a listen, `READY=1`).
    Progress,
    /// A worker's process exited; it is out of the table already.
    Exited {
        /// Its last record.
        worker: &'a Worker,
        /// It was its slot's serving worker when it exited.
        its_slot: bool,
        /// How it ended, for messages.
        how: &'a str,
    },
    /// A worker started for `slot`.
    Spawned {
        /// The slot.
        slot: usize,
        /// The new worker.
        worker: u32,
        /// A reload's worker, which takes the slot over once ready.
        incoming: bool,
    },
    /// A worker for `slot` could not be started.
    SpawnFailed {
        /// The slot.
        slot: usize,
        /// A reload's worker.
        incoming: bool,
        /// Why.
        why: String,
    },
    /// A timer fired.
    Timer(Timer),
    /// The cluster began to stop: every operation under way ends.
    Stopping {
        /// The primary that took over (an upgrade), which what was asked is referred to.
        successor: Option<u32>,
    },
    /// Something a stop waits for moved (a hand-off answered, a channel closed, a backlog taken).
    Flushed,
}

/// What a machine asks the supervisor to do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Start a worker for `slot`; an `incoming` one takes the slot over only once ready.
    Spawn {
        /// The slot.
        slot: usize,
        /// A reload's worker.
        incoming: bool,
    },
    /// Tell a worker to stop.
    Drain {
        /// The worker.
        worker: u32,
        /// Why.
        reason: DrainReason,
    },
    /// `SIGKILL` a worker that is past its deadline.
    Kill {
        /// The worker.
        worker: u32,
    },
    /// `SIGKILL` every worker: the exits are asked for.
    KillAll,
    /// Arm a timer.
    Arm {
        /// Which.
        timer: Timer,
        /// When it fires.
        at: Instant,
    },
    /// Disarm a timer.
    Disarm(Timer),
    /// Answer a request.
    Reply(Answer),
    /// Tell systemd.
    Notify(Note),
    /// `new` serves `slot` from now on; the slot's worker before it leaves the slot.
    Switch {
        /// The slot.
        slot: usize,
        /// Its new worker.
        new: u32,
    },
    /// The worker leaves its slot (its reload failed).
    Detach {
        /// The worker.
        worker: u32,
    },
    /// The slot leaves the pool (a crash without respawn, as Node does).
    RemoveSlot {
        /// The slot.
        slot: usize,
    },
    /// The generation new workers run.
    Generation(u64),
    /// Spread reuseport groups' new connections over the slots that stay.
    Resteer,
    /// Close a leaving slot's reuseport sockets.
    CloseSlotSockets {
        /// The slot.
        slot: usize,
    },
    /// A stop: new handshakes are refused on the primary's own sockets.
    RefuseNew,
    /// A hand-over: the sockets are the next primary's (no socket file is removed).
    KeepSocketFiles,
    /// A stop: round-robin listeners stop accepting, what was accepted is handed off.
    StopAccepting,
    /// A stop: what is left unhanded closes, and the primary's copies of sockets go.
    CloseQueues,
}

/// A reply to send.
#[derive(Debug)]
pub(crate) enum Answer {
    /// To a reload.
    Reload(
        Reply<Result<ReloadReport, Error>>,
        Result<ReloadReport, Error>,
    ),
    /// To a scale.
    Scale(
        Reply<Result<ScaleReport, Error>>,
        Result<ScaleReport, Error>,
    ),
}

impl Answer {
    /// Sends it (a requester that went away is no error).
    pub fn send(self) {
        match self {
            Answer::Reload(reply, r) => drop(reply.send(r)),
            Answer::Scale(reply, r) => drop(reply.send(r)),
        }
    }
}

/// What systemd is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    /// A reload starts (`RELOADING=1`).
    Reloading,
    /// A reload ended (`READY=1`), with why it failed.
    ReloadDone(Option<String>),
    /// A stop begins (`STOPPING=1`), or another primary took over (`handover`).
    Stopping {
        /// An upgrade's hand-over.
        handover: bool,
    },
}

/// What a machine may read: the worker table, the listeners, the settings and the time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    /// Every worker and slot.
    pub table: &'a Table,
    /// Every listener.
    pub registry: &'a Registry,
    /// The cluster's settings.
    pub settings: &'a Settings,
    /// Now.
    pub now: Instant,
}

impl<'a> View<'a> {
    /// A view of these, now.
    pub fn of(table: &'a Table, registry: &'a Registry, settings: &'a Settings) -> View<'a> {
        View {
            table,
            registry,
            settings,
            now: Instant::now(),
        }
    }

    /// Whether worker `id` is ready: handshake done and listening on every pinned listener
    /// (a program worker: it said `READY=1`, or its `--ready-after` passed).
    pub fn ready(&self, id: u32) -> bool {
        let Some(w) = self.table.get(id) else {
            return false;
        };
        match &w.io {
            crate::worker::table::Io::Program { ready, .. } => *ready && w.phase().serving(),
            crate::worker::table::Io::Native { .. } => {
                w.phase().serving()
                    && self
                        .registry
                        .iter()
                        .filter(|l| l.pinned)
                        .all(|l| w.listeners.contains(&l.id))
            }
        }
    }

    /// Whether slot `slot`'s serving worker is ready.
    pub fn slot_ready(&self, slot: usize) -> bool {
        self.table.slot_worker(slot).is_some_and(|w| self.ready(w))
    }

    /// Whether native worker `new` holds every listener its slot's current worker holds.
    pub fn holds_what_its_slot_held(&self, new: u32) -> bool {
        let Some(w) = self.table.get(new) else {
            return false;
        };
        let old = w
            .slot
            .and_then(|s| self.table.slot_worker(s))
            .and_then(|old| self.table.get(old));
        match old {
            Some(old) if !old.is_program() => old.listeners.is_subset(&w.listeners),
            _ => true,
        }
    }

    /// Whether slot `slot` has reuseport sockets.
    pub fn has_slot_sockets(&self, slot: usize) -> bool {
        self.registry.iter().any(|l| match &l.mode {
            Mode::ReusePort(slots) => slots.get(slot).is_some(),
            _ => false,
        })
    }

    /// Whether every reuseport socket of `slot` has an empty accept queue.
    pub fn slot_queues_empty(&self, slot: usize) -> bool {
        self.registry.iter().all(|l| match &l.mode {
            Mode::ReusePort(slots) => slots.get(slot).is_none_or(|fd| {
                netcluster_protocol::steer::accept_queue_len(fd).map_or(true, |n| n == 0)
            }),
            _ => true,
        })
    }

    /// Whether any worker still serves.
    pub fn serving(&self) -> bool {
        self.table.workers.values().any(|w| w.phase().serving())
    }

    /// Whether every round-robin listener is closed (its backlog taken) with nothing left to
    /// hand off.
    pub fn handed_off(&self) -> bool {
        self.registry.iter().all(|l| match &l.mode {
            Mode::RoundRobin(rr) => rr.is_idle() && l.socket().is_none(),
            _ => true,
        })
    }

    /// Whether every shared or reuseport socket the primary owns has an empty accept queue.
    pub fn queues_empty(&self) -> bool {
        self.registry.iter().all(|l| {
            matches!(l.mode, Mode::RoundRobin(_))
                || !l.owned
                || l.listening().into_iter().all(|fd| {
                    netcluster_protocol::steer::accept_queue_len(fd).map_or(true, |n| n == 0)
                })
        })
    }

    /// Every live worker's id.
    pub fn workers(&self) -> BTreeSet<u32> {
        self.table.workers.keys().copied().collect()
    }
}

/// A long operation: it reacts to what happens by returning effects.
pub(crate) trait Machine {
    /// `happening` happened; what should be done.
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect>;
}
