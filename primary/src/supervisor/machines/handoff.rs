//! Deadlines of round-robin hand-offs: every message of connections sent to a worker must be
//! answered by its deadline (plus [`HANDOFF_GRACE`]); one that is not gives its connections to
//! another worker, and a worker that lets [`SILENT_HANDOFFS`] messages in a row expire is
//! killed (it answers pings, but not hand-offs). Short of that it is suspected: out of every
//! rotation until it answers a ping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::supervisor::effect::Effect;
use crate::supervisor::timers::Timer;

/// How long after a hand-off's deadline the primary gives its connection to another worker:
/// the worker refuses a hand-off it reads after the deadline, and this margin covers the time
/// between its check and its answer.
pub(crate) const HANDOFF_GRACE: Duration = Duration::from_secs(1);
/// Messages of hand-offs a worker may let expire in a row before it is killed.
pub(crate) const SILENT_HANDOFFS: u32 = 3;

/// What to do with a worker that let a hand-off expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Out of rotation until it answers a ping.
    Suspect,
    /// Killed (and replaced).
    Kill,
}

/// The hand-off deadline machine: which worker each message not wholly answered went to.
#[derive(Debug, Default)]
pub(crate) struct Handoffs {
    /// By (listener, message): the worker.
    pending: HashMap<(u64, u64), u32>,
}

impl Handoffs {
    /// A message `batch` of listener `listener`'s connections went to `worker`.
    pub fn sent(
        &mut self,
        listener: u64,
        worker: u32,
        batch: u64,
        timeout: Duration,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(old) = self.pending.insert((listener, batch), worker) {
            if old != worker {
                effects.push(Effect::Disarm(Timer::Handoff {
                    listener,
                    worker: old,
                    batch,
                }));
            }
        }
        effects.push(Effect::Arm {
            timer: Timer::Handoff {
                listener,
                worker,
                batch,
            },
            at: now + timeout + HANDOFF_GRACE,
        });
        effects
    }

    /// Messages `batches` of `listener` were wholly answered.
    pub fn answered(&mut self, listener: u64, batches: &[u64]) -> Vec<Effect> {
        batches
            .iter()
            .filter_map(|&batch| {
                self.pending.remove(&(listener, batch)).map(|worker| {
                    Effect::Disarm(Timer::Handoff {
                        listener,
                        worker,
                        batch,
                    })
                })
            })
            .collect()
    }

    /// Forgets the deadlines of `worker` (of `listener` only, if given): it left or exited.
    pub fn forget(&mut self, worker: u32, listener: Option<u64>) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.pending.retain(|&(l, batch), &mut w| {
            let forget = w == worker && listener.is_none_or(|x| x == l);
            if forget {
                effects.push(Effect::Disarm(Timer::Handoff {
                    listener: l,
                    worker: w,
                    batch,
                }));
            }
            !forget
        });
        effects
    }

    /// A deadline passed; `streak` is how many messages in a row the worker let expire now.
    pub fn expired(&mut self, listener: u64, batch: u64, streak: u32) -> Verdict {
        self.pending.remove(&(listener, batch));
        if streak >= SILENT_HANDOFFS {
            Verdict::Kill
        } else {
            Verdict::Suspect
        }
    }

    /// Deadlines armed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}
