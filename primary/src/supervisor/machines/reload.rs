//! Rolling reload: every slot gets a worker of a new generation, a few slots at a time, and no
//! connection is refused or lost on the way.
//!
//! For each slot of a batch (`Settings::reload_batch`): a new worker starts beside the old
//! one; once it is ready (a native worker listening on every listener the old one held, a
//! program worker having said `READY=1` or lasted `--ready-after`), it takes the slot over and
//! the old worker drains: round robin stops handing it connections at once, a reuseport slot's
//! socket is already the new worker's too (the socket belongs to the slot), and under shared
//! the old worker stops accepting from the socket the others keep accepting from. The old
//! worker finishes its connections up to the drain deadline and is then killed.
//!
//! At most `reload_batch` extra workers are ever alive. A reload asked for while one runs
//! waits for it and runs next (several such requests make one). If a new worker exits or is
//! not ready in time, the reload stops: the slots not replaced keep their old workers, and the
//! reply (and the log, and `status`) says which slot failed and why.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::command::Reply;
use crate::error::Error;
use crate::supervisor::effect::{Answer, Effect, Happening, Machine, Note, View};
use crate::supervisor::machines::scale::stopping;
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// The generation every slot runs now.
    pub generation: u64,
    /// `(slot, old worker, new worker)` for every slot replaced.
    pub replaced: Vec<(usize, Option<u32>, u32)>,
    /// From the request until every slot was served by the new generation, in milliseconds.
    pub serving_ms: u64,
    /// From the request to the last old worker's exit, in milliseconds.
    pub took_ms: u64,
}

type ReloadReply = Reply<Result<ReloadReport, Error>>;

/// A reload under way.
#[derive(Debug)]
struct Reload {
    generation: u64,
    todo: VecDeque<usize>,
    /// Slots being replaced, with their new worker once it started.
    running: BTreeMap<usize, Option<u32>>,
    /// Old workers told to drain, to see exit.
    draining: BTreeSet<u32>,
    replaced: Vec<(usize, Option<u32>, u32)>,
    replies: Vec<ReloadReply>,
    started: Instant,
    /// When the last slot switched to the new generation.
    serving: Option<Instant>,
    /// A recycle (see [`Reloads::recycle`]): no new generation, nobody to answer.
    recycle: bool,
}

/// The reload machine: the reload under way, those asked for meanwhile, and why the last one
/// failed.
#[derive(Debug, Default)]
pub(crate) struct Reloads {
    current: Option<Reload>,
    queued: Vec<ReloadReply>,
    last_error: Option<String>,
    /// A stop began (with the primary that took over, in an upgrade).
    stopping: Option<Option<u32>>,
    /// Slots due for a recycle, with why, waiting for the reload under way.
    recycles: Vec<(usize, String)>,
}

/// For `status`: the reload under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The generation it brings.
    pub generation: u64,
    /// Slots replaced.
    pub done: usize,
    /// Slots in all.
    pub total: usize,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Reloads {
    /// A reload was asked for; `generation` is the one the cluster runs now.
    pub fn request(&mut self, reply: ReloadReply, generation: u64, view: &View<'_>) -> Vec<Effect> {
        if let Some(successor) = self.stopping {
            return vec![Effect::Reply(Answer::Reload(
                reply,
                Err(stopping(successor)),
            ))];
        }
        if self.current.is_some() {
            tracing::info!("a reload is running; this one runs after it");
            self.queued.push(reply);
            return Vec::new();
        }
        self.start(vec![reply], generation, view)
    }

    fn start(
        &mut self,
        replies: Vec<ReloadReply>,
        generation: u64,
        view: &View<'_>,
    ) -> Vec<Effect> {
        let generation = generation.saturating_add(1);
        let todo: VecDeque<usize> = view.table.slots.keys().copied().collect();
        tracing::info!(
            generation,
            slots = todo.len(),
            batch = view.settings.reload_batch,
            "reloading"
        );
        self.last_error = None;
        self.current = Some(Reload {
            generation,
            todo,
            running: BTreeMap::new(),
            draining: BTreeSet::new(),
            replaced: Vec::new(),
            replies,
            started: view.now,
            serving: None,
            recycle: false,
        });
        let mut effects = vec![
            Effect::Generation(generation),
            Effect::Notify(Note::Reloading),
        ];
        effects.extend(self.progress(view));
        effects
    }

    /// Replaces `slots` (due for a recycle, or hung) one by one as a reload does — the new
    /// worker first — but in the generation that runs, with nobody to answer; after the reload
    /// under way, if there is one. `generation` is the one the cluster runs now.
    pub fn recycle(
        &mut self,
        slots: Vec<(usize, String)>,
        generation: u64,
        view: &View<'_>,
    ) -> Vec<Effect> {
        if self.stopping.is_some() {
            return Vec::new();
        }
        for (slot, why) in slots {
            if !self.recycles.iter().any(|(s, _)| *s == slot) {
                tracing::info!(slot, "recycling slot {slot}: its worker {why}");
                self.recycles.push((slot, why));
            }
        }
        if self.current.is_some() {
            return Vec::new();
        }
        self.start_recycle(generation, view)
    }

    fn start_recycle(&mut self, generation: u64, view: &View<'_>) -> Vec<Effect> {
        let todo: VecDeque<usize> = self
            .recycles
            .drain(..)
            .map(|(slot, _)| slot)
            .filter(|slot| view.table.slots.contains_key(slot))
            .collect();
        if todo.is_empty() {
            return Vec::new();
        }
        self.current = Some(Reload {
            generation,
            todo,
            running: BTreeMap::new(),
            draining: BTreeSet::new(),
            replaced: Vec::new(),
            replies: Vec::new(),
            started: view.now,
            serving: None,
            recycle: true,
        });
        self.progress(view)
    }

    /// The reload under way, for `status`.
    pub fn progress_report(&self) -> Option<Progress> {
        self.current.as_ref().map(|r| Progress {
            generation: r.generation,
            done: r.replaced.len(),
            total: r.replaced.len() + r.running.len() + r.todo.len(),
        })
    }

    /// Why the last reload failed, until the next one.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Switches slots whose new worker is ready, starts what the batch allows, and finishes
    /// when every slot is replaced and every old worker has exited.
    fn progress(&mut self, view: &View<'_>) -> Vec<Effect> {
        let Some(r) = &mut self.current else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        let ready: Vec<(usize, u32)> = r
            .running
            .iter()
            .filter_map(|(&slot, &new)| new.map(|new| (slot, new)))
            .filter(|&(_, new)| view.ready(new) && view.holds_what_its_slot_held(new))
            .collect();
        for (slot, new) in ready {
            r.running.remove(&slot);
            effects.push(Effect::Disarm(Timer::ReloadReady { worker: new }));
            let old = view.table.slot_worker(slot);
            tracing::info!(slot, old = ?old, new, "slot reloaded");
            r.replaced.push((slot, old, new));
            r.serving = Some(view.now);
            if let Some(old) = old {
                r.draining.insert(old);
            }
            effects.push(Effect::Switch { slot, new });
        }
        while r.running.len() < view.settings.reload_batch.max(1) {
            let Some(slot) = r.todo.pop_front() else {
                break;
            };
            if !view.table.slots.contains_key(&slot) {
                continue; // scaled away meanwhile
            }
            r.running.insert(slot, None);
            effects.push(Effect::Spawn {
                slot,
                incoming: true,
            });
        }
        effects.extend(self.finish_if_done(view));
        effects
    }

    fn finish_if_done(&mut self, view: &View<'_>) -> Vec<Effect> {
        let done = self.current.as_ref().is_some_and(|r| {
            r.todo.is_empty()
                && r.running.is_empty()
                && r.draining.iter().all(|&w| view.table.get(w).is_none())
        });
        if !done {
            return Vec::new();
        }
        let Some(r) = self.current.take() else {
            return Vec::new();
        };
        if r.recycle {
            for &(slot, old, new) in &r.replaced {
                tracing::info!(slot, old = ?old, new, "slot recycled");
            }
            return self.next(r.generation, view);
        }
        let report = ReloadReport {
            generation: r.generation,
            replaced: r.replaced,
            serving_ms: millis(
                r.serving
                    .unwrap_or(r.started)
                    .saturating_duration_since(r.started),
            ),
            took_ms: millis(view.now.saturating_duration_since(r.started)),
        };
        tracing::info!(
            generation = report.generation,
            slots = report.replaced.len(),
            "reloaded in {} ms",
            report.took_ms
        );
        let mut effects: Vec<Effect> = r
            .replies
            .into_iter()
            .map(|reply| Effect::Reply(Answer::Reload(reply, Ok(report.clone()))))
            .collect();
        effects.push(Effect::Notify(Note::ReloadDone(None)));
        effects.extend(self.next(report.generation, view));
        effects
    }

    /// Runs the reloads asked for during the last one, as one; else the recycles that came
    /// due meanwhile.
    fn next(&mut self, generation: u64, view: &View<'_>) -> Vec<Effect> {
        let mut queued = std::mem::take(&mut self.queued);
        let Some(first) = queued.pop() else {
            return self.start_recycle(generation, view);
        };
        queued.insert(0, first);
        self.start(queued, generation, view)
    }

    /// The reload stops: `slot`'s new worker failed. Slots not replaced keep their workers.
    fn fail(&mut self, slot: usize, why: &str, view: &View<'_>) -> Vec<Effect> {
        let Some(r) = self.current.take() else {
            return Vec::new();
        };
        if r.recycle {
            tracing::error!(
                "recycling slot {slot} failed: its new worker {why}; the slot keeps its worker"
            );
            let mut effects = stand_down(r.running);
            effects.extend(self.next(r.generation, view));
            return effects;
        }
        let kept = r.todo.len() + r.running.len();
        let message = format!(
            "reload to generation {} failed: the new worker of slot {slot} {why}; {} slot(s) \
             replaced, {kept} keep their old workers",
            r.generation,
            r.replaced.len(),
        );
        tracing::error!("{message}");
        let mut effects = stand_down(r.running);
        self.last_error = Some(message.clone());
        // The generation that serves is the one before: what failed stays in last_error.
        let serving = r.generation.saturating_sub(1).max(1);
        effects.push(Effect::Generation(serving));
        for reply in r.replies {
            effects.push(Effect::Reply(Answer::Reload(
                reply,
                Err(Error::NotReady(message.clone())),
            )));
        }
        effects.push(Effect::Notify(Note::ReloadDone(Some(message))));
        effects.extend(self.next(serving, view));
        effects
    }

    /// Whether the reload waits for a worker to be started for `slot` (an effect it asked for
    /// may be overtaken by the reload's failure).
    pub fn awaits_spawn(&self, slot: usize) -> bool {
        self.current
            .as_ref()
            .is_some_and(|r| r.running.get(&slot) == Some(&None))
    }

    fn running_slot(&self, worker: u32) -> Option<usize> {
        self.current.as_ref().and_then(|r| {
            r.running
                .iter()
                .find(|&(_, &new)| new == Some(worker))
                .map(|(&slot, _)| slot)
        })
    }
}

/// The new workers of a reload that failed leave their slots and drain: stopped like any
/// worker, not killed (a program has its listeners from the start and may have accepted
/// connections before it said it was ready).
fn stand_down(running: BTreeMap<usize, Option<u32>>) -> Vec<Effect> {
    running
        .into_values()
        .flatten()
        .flat_map(|new| {
            [
                Effect::Disarm(Timer::ReloadReady { worker: new }),
                Effect::Detach { worker: new },
                Effect::Drain {
                    worker: new,
                    reason: DrainReason::Replaced,
                },
            ]
        })
        .collect()
}

impl Machine for Reloads {
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect> {
        match *happening {
            Happening::Progress => self.progress(view),
            Happening::Spawned {
                slot,
                worker,
                incoming: true,
            } => {
                let Some(r) = &mut self.current else {
                    return Vec::new();
                };
                if let Some(new) = r.running.get_mut(&slot) {
                    *new = Some(worker);
                }
                vec![Effect::Arm {
                    timer: Timer::ReloadReady { worker },
                    at: view.now + view.settings.timeouts.ready,
                }]
            }
            Happening::SpawnFailed {
                slot,
                incoming: true,
                ref why,
            } => {
                if let Some(r) = &mut self.current {
                    r.running.remove(&slot);
                }
                self.fail(slot, why, view)
            }
            Happening::Exited { worker, how, .. } => match self.running_slot(worker.id) {
                Some(slot) => self.fail(slot, &format!("exited ({how}) before it was ready"), view),
                None => self.finish_if_done(view),
            },
            Happening::Timer(Timer::ReloadReady { worker }) => match self.running_slot(worker) {
                Some(slot) => {
                    let t = view.settings.timeouts.ready;
                    self.fail(slot, &format!("was not ready within {t:?}"), view)
                }
                None => Vec::new(),
            },
            Happening::Stopping { successor } => {
                self.stopping = Some(successor);
                self.recycles.clear();
                let mut effects = Vec::new();
                if let Some(r) = self.current.take() {
                    for new in r.running.into_values().flatten() {
                        effects.push(Effect::Disarm(Timer::ReloadReady { worker: new }));
                    }
                    for reply in r.replies {
                        effects.push(Effect::Reply(Answer::Reload(
                            reply,
                            Err(stopping(successor)),
                        )));
                    }
                }
                for reply in self.queued.drain(..) {
                    effects.push(Effect::Reply(Answer::Reload(
                        reply,
                        Err(stopping(successor)),
                    )));
                }
                effects
            }
            _ => Vec::new(),
        }
    }
}
