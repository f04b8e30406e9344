//! Restarting a slot whose worker exited unasked, with exponential back-off
//! ([`Backoff`](crate::Backoff)): the delay grows with each exit in a row and starts over once
//! a worker has lasted `reset_after`. Without a back-off policy (Node's behaviour) a slot whose
//! worker exits unasked leaves the pool.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::settings::Backoff;
use crate::supervisor::effect::{Effect, Happening, Machine, View};
use crate::supervisor::timers::Timer;

/// One slot's restarts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SlotRestarts {
    /// Restarts so far.
    pub restarts: u32,
    /// Exponent of the next restart delay.
    attempt: u32,
    /// When the next start is due.
    pub next_attempt: Option<Instant>,
    /// Why its last worker ended (or could not start).
    pub last_exit: Option<String>,
    /// It was given up on (too many exits in a row): not started again until a reload.
    pub failed: bool,
}

/// The restart machine.
#[derive(Debug)]
pub(crate) struct Restarts {
    policy: Option<Backoff>,
    slots: BTreeMap<usize, SlotRestarts>,
    stopping: bool,
}

impl Restarts {
    /// Restarts by `policy`, or none.
    pub fn new(policy: Option<Backoff>) -> Restarts {
        Restarts {
            policy,
            slots: BTreeMap::new(),
            stopping: false,
        }
    }

    /// Slot `slot`'s restarts.
    pub fn get(&self, slot: usize) -> Option<&SlotRestarts> {
        self.slots.get(&slot)
    }

    /// Slot `slot` left the pool (scaled away): no start is due for it.
    pub fn forget(&mut self, slot: usize) -> Vec<Effect> {
        self.slots.remove(&slot);
        vec![Effect::Disarm(Timer::Respawn { slot })]
    }

    fn schedule(&mut self, slot: usize, delay: Duration, now: Instant) -> Vec<Effect> {
        let at = now + delay;
        self.slots.entry(slot).or_default().next_attempt = Some(at);
        vec![Effect::Arm {
            timer: Timer::Respawn { slot },
            at,
        }]
    }
}

/// Whether slot `slot` is given up on now: `s.attempt` exits in a row reached the limit.
fn give_up(slot: usize, s: &mut SlotRestarts, backoff: Backoff) -> bool {
    let Some(limit) = backoff.give_up_after else {
        return false;
    };
    if s.attempt < limit {
        return false;
    }
    s.failed = true;
    s.next_attempt = None;
    tracing::error!(
        slot,
        "slot {slot} failed: {} exits in a row, none lasting {:?} (last: {}); not starting it \
         again until a reload (`netcluster reload`)",
        s.attempt,
        backoff.reset_after,
        s.last_exit.as_deref().unwrap_or("unknown")
    );
    true
}

impl Machine for Restarts {
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect> {
        match *happening {
            Happening::Exited {
                worker,
                its_slot: true,
                how,
            } => {
                let Some(slot) = worker.slot else {
                    return Vec::new();
                };
                let expected = worker.expected_exit();
                let Some(backoff) = self.policy else {
                    // Node's behaviour: the slot is gone with its worker.
                    return if expected {
                        Vec::new()
                    } else {
                        vec![Effect::RemoveSlot { slot }]
                    };
                };
                if self.stopping || !view.table.slots.contains_key(&slot) {
                    return Vec::new();
                }
                let s = self.slots.entry(slot).or_default();
                if expected
                    || view.now.saturating_duration_since(worker.started) >= backoff.reset_after
                {
                    // Asked to stop while still in its slot (a library `disconnect()`): the
                    // slot is refilled at once.
                    s.attempt = 0;
                }
                let delay = if expected {
                    Duration::ZERO
                } else {
                    let delay = backoff.delay(s.attempt);
                    s.attempt = s.attempt.saturating_add(1);
                    s.last_exit = Some(how.to_string());
                    if give_up(slot, s, backoff) {
                        return Vec::new();
                    }
                    s.restarts = s.restarts.saturating_add(1);
                    tracing::info!(slot, "restarting in {delay:?}");
                    delay
                };
                self.schedule(slot, delay, view.now)
            }
            Happening::Timer(Timer::Respawn { slot }) => {
                if let Some(s) = self.slots.get_mut(&slot) {
                    s.next_attempt = None;
                }
                let vacant = view
                    .table
                    .slots
                    .get(&slot)
                    .is_some_and(|s| s.worker.is_none());
                if self.stopping || !vacant {
                    return Vec::new();
                }
                vec![Effect::Spawn {
                    slot,
                    incoming: false,
                }]
            }
            Happening::Spawned {
                slot,
                incoming: false,
                ..
            } => self.cancel(slot),
            Happening::SpawnFailed {
                slot,
                incoming: false,
                ref why,
            } => {
                let Some(backoff) = self.policy else {
                    return Vec::new();
                };
                if self.stopping || !view.table.slots.contains_key(&slot) {
                    return Vec::new();
                }
                let s = self.slots.entry(slot).or_default();
                let delay = backoff.delay(s.attempt);
                s.attempt = s.attempt.saturating_add(1);
                s.last_exit = Some(why.clone());
                if give_up(slot, s, backoff) {
                    return Vec::new();
                }
                s.restarts = s.restarts.saturating_add(1);
                self.schedule(slot, delay, view.now)
            }
            Happening::Stopping { .. } => {
                self.stopping = true;
                self.slots
                    .iter_mut()
                    .filter_map(|(&slot, s)| {
                        s.next_attempt
                            .take()
                            .map(|_| Effect::Disarm(Timer::Respawn { slot }))
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

impl Restarts {
    /// A reload's worker took `slot` over: a slot given up on is tried again from the start.
    pub fn revive(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.failed {
                s.failed = false;
                s.attempt = 0;
            }
        }
    }

    /// The slots given up on.
    pub fn failed(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .filter(|(_, s)| s.failed)
            .map(|(&slot, _)| slot)
    }

    /// A reload's worker took `slot` over: a start due for it is not needed any more.
    pub fn cancel(&mut self, slot: usize) -> Vec<Effect> {
        let due = self
            .slots
            .get_mut(&slot)
            .and_then(|s| s.next_attempt.take());
        due.map(|_| Effect::Disarm(Timer::Respawn { slot }))
            .into_iter()
            .collect()
    }
}
