//! Scales waiting to be done: the slots added must have a ready worker, the workers of the
//! slots removed must have exited. A scale fails if a new slot's worker exits before it is
//! ready, or is not ready in time, or the cluster stops.

use std::collections::BTreeSet;

use crate::command::{Reply, ScaleReport};
use crate::error::Error;
use crate::supervisor::effect::{Answer, Effect, Happening, Machine, View};
use crate::supervisor::timers::Timer;

/// A scale waiting for workers to become ready or to exit.
#[derive(Debug)]
pub(crate) struct ScaleWait {
    /// Its number (for its timer).
    pub id: u64,
    /// What it reports when done.
    pub report: ScaleReport,
    /// Slots whose workers must become ready.
    pub up: Vec<usize>,
    /// Workers that must exit.
    pub down: BTreeSet<u32>,
    /// Who asked.
    pub reply: Reply<Result<ScaleReport, Error>>,
}

/// The scale machine.
#[derive(Debug, Default)]
pub(crate) struct Scales {
    waits: Vec<ScaleWait>,
}

impl Scales {
    /// Waits for `wait` to be done (it may be at once).
    pub fn wait(&mut self, wait: ScaleWait, view: &View<'_>) -> Vec<Effect> {
        let mut effects = Vec::new();
        if !wait.up.is_empty() {
            effects.push(Effect::Arm {
                timer: Timer::Ready { wait: wait.id },
                at: view.now + view.settings.timeouts.ready,
            });
        }
        self.waits.push(wait);
        effects.extend(self.check(view));
        effects
    }

    /// Completes the scales whose workers are all ready or gone.
    fn check(&mut self, view: &View<'_>) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut i = 0;
        while i < self.waits.len() {
            let wait = &self.waits[i];
            let all_up = wait.up.iter().all(|&slot| view.slot_ready(slot));
            let all_down = wait.down.iter().all(|&w| view.table.get(w).is_none());
            if !(all_up && all_down) {
                i += 1;
                continue;
            }
            let mut wait = self.waits.swap_remove(i);
            for &slot in &wait.up {
                if let Some(w) = view.table.slot_worker(slot) {
                    wait.report.started.push(w);
                }
            }
            if !wait.up.is_empty() {
                effects.push(Effect::Disarm(Timer::Ready { wait: wait.id }));
            }
            tracing::info!(workers = wait.report.to, "scaled");
            effects.push(Effect::Reply(Answer::Scale(wait.reply, Ok(wait.report))));
        }
        effects
    }

    /// Fails the scales waiting for `slot`'s worker to be ready.
    fn fail_for(&mut self, slot: usize, why: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut i = 0;
        while i < self.waits.len() {
            if self.waits[i].up.contains(&slot) {
                let wait = self.waits.swap_remove(i);
                effects.push(Effect::Disarm(Timer::Ready { wait: wait.id }));
                effects.push(Effect::Reply(Answer::Scale(
                    wait.reply,
                    Err(Error::NotReady(format!(
                        "the worker of slot {slot} {why} before it was ready"
                    ))),
                )));
            } else {
                i += 1;
            }
        }
        effects
    }
}

/// Why an operation ends at a stop: the stop, or the primary that took over.
pub(crate) fn stopping(successor: Option<u32>) -> Error {
    successor.map_or(Error::Stopping, Error::HandedOver)
}

impl Machine for Scales {
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect> {
        match *happening {
            Happening::Progress => self.check(view),
            Happening::Exited {
                worker,
                its_slot,
                how,
            } => {
                let mut effects = Vec::new();
                if let (true, false, Some(slot)) = (its_slot, worker.expected_exit(), worker.slot) {
                    effects.extend(self.fail_for(slot, &format!("exited ({how})")));
                }
                effects.extend(self.check(view));
                effects
            }
            Happening::Timer(Timer::Ready { wait }) => {
                let Some(i) = self.waits.iter().position(|s| s.id == wait) else {
                    return Vec::new();
                };
                let w = self.waits.swap_remove(i);
                let not_ready: Vec<String> =
                    w.up.iter()
                        .filter(|&&slot| !view.slot_ready(slot))
                        .map(ToString::to_string)
                        .collect();
                vec![Effect::Reply(Answer::Scale(
                    w.reply,
                    Err(Error::NotReady(format!(
                        "slots {} were not ready within {:?}",
                        not_ready.join(", "),
                        view.settings.timeouts.ready
                    ))),
                ))]
            }
            Happening::Stopping { successor } => self
                .waits
                .drain(..)
                .flat_map(|w| {
                    [
                        Effect::Disarm(Timer::Ready { wait: w.id }),
                        Effect::Reply(Answer::Scale(w.reply, Err(stopping(successor)))),
                    ]
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}
