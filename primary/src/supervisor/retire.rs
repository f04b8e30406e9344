//! A reuseport slot leaving (scale down) without resetting a connection.
//!
//! Closing a socket of a reuseport group resets what waits in its accept queue. So a leaving
//! slot's sockets first get no new connections — a classic-BPF reuseport program spreads the
//! group's new connections over the sockets that stay ([`steer`]) — while the slot's worker
//! keeps accepting what is queued. Once its queues are empty (after a grace for handshakes under
//! way), the worker drains like any stopping worker; the sockets close once it has exited (a
//! worker that still uses a socket never sees it shut under it), and the program is updated
//! for the group that remains.
//!
//! Where the kernel refuses reuseport programs, the leaving sockets drop new SYNs instead
//! ([`listening::refuse_new_connections`]): clients whose connection hashes there retry (after
//! a second) and land on a socket that stays once the leaving one has closed.

#[allow(clippy::wildcard_imports)]
use super::*;
use netcluster_protocol::steer;

/// A slot whose reuseport sockets are being emptied before they close.
#[derive(Debug)]
pub(super) struct Retiring {
    worker: Option<u32>,
    since: Instant,
    deadline: Instant,
    /// Its worker has been told to drain; the sockets close when it exits.
    draining: bool,
}

impl Supervisor {
    /// Whether slot `slot` has reuseport sockets.
    fn has_slot_sockets(&self, slot: usize) -> bool {
        self.registry.iter().any(|l| match &l.mode {
            Mode::ReusePort(slots) => slots.get(slot).is_some(),
            _ => false,
        })
    }

    /// Slot `slot` (already out of the slot table) leaves; its worker is `worker`.
    pub(super) fn retire_slot(&mut self, slot: usize, worker: Option<u32>) {
        if !self.has_slot_sockets(slot) {
            if let Some(w) = worker {
                self.drain(w, DrainReason::ScaleDown);
            }
            return;
        }
        let now = Instant::now();
        self.retiring.insert(
            slot,
            Retiring {
                worker,
                since: now,
                deadline: now + self.settings.drain_timeout,
                draining: false,
            },
        );
        self.resteer();
        if !self.retire_polling {
            self.retire_polling = true;
            self.timers.insert(Timer::RetirePoll, QUEUE_POLL);
        }
    }

    /// Spreads every reuseport group's new connections over the sockets of slots that stay.
    fn resteer(&mut self) {
        let leaving: BTreeSet<usize> = self.retiring.keys().copied().collect();
        for l in self.registry.iter() {
            let Mode::ReusePort(slots) = &l.mode else {
                continue;
            };
            let Some(&first) = slots.group.first() else {
                continue;
            };
            let Some(member) = slots.get(first) else {
                continue;
            };
            let keep: Vec<u32> = slots
                .group
                .iter()
                .enumerate()
                .filter(|(_, s)| !leaving.contains(s))
                .filter_map(|(i, _)| u32::try_from(i).ok())
                .collect();
            let result = if leaving.iter().all(|s| slots.get(*s).is_none()) {
                steer::unsteer(member)
            } else if keep.is_empty() {
                Ok(())
            } else {
                steer::steer(member, &keep)
            };
            if let Err(e) = result {
                tracing::warn!(
                    listener = %l.address,
                    "cannot steer connections away from leaving slots ({e}); dropping their new \
                     SYNs instead (clients retry after a second)"
                );
                for s in &leaving {
                    if let Some(fd) = slots.get(*s) {
                        let _ = listening::refuse_new_connections(fd);
                    }
                }
            }
        }
    }

    /// Looks at the leaving slots' queues: an empty one (or a deadline passed) lets its worker
    /// drain.
    pub(super) fn retire_poll(&mut self) {
        self.retire_polling = false;
        let now = Instant::now();
        let ready: Vec<usize> = self
            .retiring
            .iter()
            .filter(|(_, r)| !r.draining)
            .filter(|(slot, r)| {
                now >= r.deadline
                    || (now.saturating_duration_since(r.since) >= HANDSHAKE_GRACE
                        && self.slot_queues_empty(**slot))
            })
            .map(|(&slot, _)| slot)
            .collect();
        for slot in ready {
            let worker = match self.retiring.get_mut(&slot) {
                Some(r) => {
                    r.draining = true;
                    r.worker
                }
                None => None,
            };
            match worker.filter(|w| self.workers.contains_key(w)) {
                Some(w) => self.drain(w, DrainReason::ScaleDown),
                None => self.close_retired(slot),
            }
        }
        if self.retiring.values().any(|r| !r.draining) {
            self.retire_polling = true;
            self.timers.insert(Timer::RetirePoll, QUEUE_POLL);
        }
    }

    fn slot_queues_empty(&self, slot: usize) -> bool {
        self.registry.iter().all(|l| match &l.mode {
            Mode::ReusePort(slots) => slots
                .get(slot)
                .is_none_or(|fd| steer::accept_queue_len(fd).map_or(true, |n| n == 0)),
            _ => true,
        })
    }

    /// Worker `id` exited: if it was a leaving slot's, that slot's sockets close now.
    pub(super) fn retired_worker_exited(&mut self, id: u32) {
        let slot = self
            .retiring
            .iter()
            .find(|(_, r)| r.worker == Some(id))
            .map(|(&s, _)| s);
        if let Some(slot) = slot {
            self.close_retired(slot);
        }
    }

    /// Closes the leaving slot's sockets (the kernel takes them out of their groups) and steers
    /// the groups that remain.
    fn close_retired(&mut self, slot: usize) {
        self.retiring.remove(&slot);
        for l in self.registry.iter_mut() {
            if let Mode::ReusePort(slots) = &mut l.mode {
                drop(slots.remove(slot));
            }
        }
        self.resteer();
    }

    /// Whether slot number `slot` is still leaving (it cannot be given to a new slot yet).
    pub(super) fn is_retiring(&self, slot: usize) -> bool {
        self.retiring.contains_key(&slot)
    }
}
