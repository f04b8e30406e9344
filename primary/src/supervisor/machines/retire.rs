//! A reuseport slot leaving (scale down) without resetting a connection.
//!
//! Closing a socket of a reuseport group resets what waits in its accept queue. So a leaving
//! slot's sockets first get no new connections — a classic-BPF reuseport program spreads the
//! group's new connections over the sockets that stay ([`steer`](netcluster_protocol::steer))
//! — while the slot's worker keeps accepting what is queued. Once its queues are empty (after
//! a grace for handshakes under way), the worker drains like any stopping worker; the sockets
//! close once it has exited (a worker that still uses a socket never sees it shut under it),
//! and the program is updated for the group that remains.
//!
//! Where the kernel refuses reuseport programs, the leaving sockets drop new SYNs instead:
//! clients whose connection hashes there retry (after a second) and land on a socket that
//! stays once the leaving one has closed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::supervisor::effect::{Effect, Happening, Machine, View};
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;

/// How often the leaving slots' accept queues are looked at.
pub(crate) const QUEUE_POLL: Duration = Duration::from_millis(20);
/// How long handshakes under way get to land in an accept queue (a round trip, with room).
pub(crate) const HANDSHAKE_GRACE: Duration = Duration::from_millis(100);

/// A slot whose reuseport sockets are being emptied before they close.
#[derive(Debug)]
struct Retiring {
    worker: Option<u32>,
    since: Instant,
    deadline: Instant,
    /// Its worker has been told to drain; the sockets close when it exits.
    draining: bool,
}

/// The retire machine.
#[derive(Debug, Default)]
pub(crate) struct Retires {
    retiring: BTreeMap<usize, Retiring>,
    polling: bool,
}

impl Retires {
    /// Slot `slot` (already out of the slot table) leaves; its worker is `worker`.
    pub fn retire(&mut self, slot: usize, worker: Option<u32>, view: &View<'_>) -> Vec<Effect> {
        if !view.has_slot_sockets(slot) {
            return worker
                .map(|worker| Effect::Drain {
                    worker,
                    reason: DrainReason::ScaleDown,
                })
                .into_iter()
                .collect();
        }
        self.retiring.insert(
            slot,
            Retiring {
                worker,
                since: view.now,
                deadline: view.now + view.settings.drain_timeout,
                draining: false,
            },
        );
        let mut effects = vec![Effect::Resteer];
        if !self.polling {
            self.polling = true;
            effects.push(Effect::Arm {
                timer: Timer::RetirePoll,
                at: view.now + QUEUE_POLL,
            });
        }
        effects
    }

    /// The slots leaving.
    pub fn leaving(&self) -> BTreeSet<usize> {
        self.retiring.keys().copied().collect()
    }

    /// Whether slot number `slot` is still leaving (it cannot be given to a new slot yet).
    pub fn is_retiring(&self, slot: usize) -> bool {
        self.retiring.contains_key(&slot)
    }

    /// Looks at the leaving slots' queues: an empty one (or a deadline passed) lets its worker
    /// drain.
    fn poll(&mut self, view: &View<'_>) -> Vec<Effect> {
        self.polling = false;
        let now = view.now;
        let ready: Vec<usize> = self
            .retiring
            .iter()
            .filter(|(_, r)| !r.draining)
            .filter(|&(&slot, r)| {
                now >= r.deadline
                    || (now.saturating_duration_since(r.since) >= HANDSHAKE_GRACE
                        && view.slot_queues_empty(slot))
            })
            .map(|(&slot, _)| slot)
            .collect();
        let mut effects = Vec::new();
        for slot in ready {
            let worker = self.retiring.get_mut(&slot).and_then(|r| {
                r.draining = true;
                r.worker
            });
            match worker.filter(|&w| view.table.get(w).is_some()) {
                Some(worker) => effects.push(Effect::Drain {
                    worker,
                    reason: DrainReason::ScaleDown,
                }),
                None => {
                    self.retiring.remove(&slot);
                    effects.push(Effect::CloseSlotSockets { slot });
                }
            }
        }
        if self.retiring.values().any(|r| !r.draining) {
            self.polling = true;
            effects.push(Effect::Arm {
                timer: Timer::RetirePoll,
                at: now + QUEUE_POLL,
            });
        }
        effects
    }
}

impl Machine for Retires {
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect> {
        match *happening {
            Happening::Timer(Timer::RetirePoll) => self.poll(view),
            Happening::Exited { worker, .. } => {
                let slot = self
                    .retiring
                    .iter()
                    .find(|(_, r)| r.worker == Some(worker.id))
                    .map(|(&s, _)| s);
                match slot {
                    Some(slot) => {
                        self.retiring.remove(&slot);
                        vec![Effect::CloseSlotSockets { slot }]
                    }
                    None => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }
}
