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

#[allow(clippy::wildcard_imports)]
use super::*;

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

/// A slot being replaced.
#[derive(Debug)]
pub(super) struct Replacing {
    new: u32,
    timer: delay_queue::Key,
}

/// A reload under way.
#[derive(Debug)]
pub(super) struct Reloading {
    generation: u64,
    todo: VecDeque<usize>,
    running: BTreeMap<usize, Replacing>,
    /// Old workers told to drain, to see exit.
    draining: BTreeSet<u32>,
    replaced: Vec<(usize, Option<u32>, u32)>,
    replies: Vec<Reply<Result<ReloadReport, Error>>>,
    started: Instant,
    /// When the last slot switched to the new generation.
    serving: Option<Instant>,
}

impl Supervisor {
    /// A reload was asked for.
    pub(super) fn reload(&mut self, reply: Reply<Result<ReloadReport, Error>>) {
        if self.stopping.is_some() {
            let _ = reply.send(Err(Error::Stopping));
            return;
        }
        if self.reloading.is_some() {
            tracing::info!("a reload is running; this one runs after it");
            self.reload_queued.push(reply);
            return;
        }
        self.generation = self.generation.saturating_add(1);
        let todo: VecDeque<usize> = self.slots.keys().copied().collect();
        tracing::info!(
            generation = self.generation,
            slots = todo.len(),
            batch = self.settings.reload_batch,
            "reloading"
        );
        self.last_reload = None;
        self.reloading = Some(Reloading {
            generation: self.generation,
            todo,
            running: BTreeMap::new(),
            draining: BTreeSet::new(),
            replaced: Vec::new(),
            replies: vec![reply],
            started: Instant::now(),
            serving: None,
        });
        self.notify_reloading();
        self.reload_progress();
    }

    /// Starts what the batch allows, switches slots whose new worker is ready, and finishes
    /// the reload when every slot is replaced and every old worker has exited.
    pub(super) fn reload_progress(&mut self) {
        let Some(r) = &self.reloading else {
            return;
        };
        // Switch the slots whose new worker is ready.
        let ready: Vec<(usize, u32)> = r
            .running
            .iter()
            .filter(|(_, rep)| self.ready(rep.new) && self.holds_what_its_slot_held(rep.new))
            .map(|(&slot, rep)| (slot, rep.new))
            .collect();
        for (slot, new) in ready {
            self.switch(slot, new);
        }
        // Start more, up to the batch.
        loop {
            let Some(r) = &mut self.reloading else {
                return;
            };
            if r.running.len() >= self.settings.reload_batch.max(1) {
                break;
            }
            let Some(slot) = r.todo.pop_front() else {
                break;
            };
            if !self.slots.contains_key(&slot) {
                continue; // scaled away meanwhile
            }
            match self.spawn_worker(slot, true) {
                Ok(info) => {
                    let timer = self.timers.insert(
                        Timer::ReloadReady { worker: info.id },
                        self.settings.timeouts.ready,
                    );
                    if let Some(r) = &mut self.reloading {
                        r.running.insert(
                            slot,
                            Replacing {
                                new: info.id,
                                timer,
                            },
                        );
                    }
                }
                Err(e) => {
                    self.fail_reload(slot, &e.to_string());
                    return;
                }
            }
        }
        self.finish_reload_if_done();
    }

    /// Whether native worker `new` holds every listener its slot's current worker holds.
    fn holds_what_its_slot_held(&self, new: u32) -> bool {
        let Some(w) = self.workers.get(&new) else {
            return false;
        };
        let old = w
            .slot
            .and_then(|s| self.slots.get(&s))
            .and_then(|s| s.worker)
            .and_then(|old| self.workers.get(&old));
        match old {
            Some(old) if old.kind == WorkerKind::Native => old.listeners.is_subset(&w.listeners),
            _ => true,
        }
    }

    /// `new` is ready: it takes `slot` over, and the slot's old worker drains.
    fn switch(&mut self, slot: usize, new: u32) {
        let Some(r) = &mut self.reloading else {
            return;
        };
        let Some(rep) = r.running.remove(&slot) else {
            return;
        };
        self.timers.try_remove(&rep.timer);
        let old = self.slots.get(&slot).and_then(|s| s.worker);
        if let Some(s) = self.slots.get_mut(&slot) {
            s.worker = Some(new);
            if let Some((_, key)) = s.next_attempt.take() {
                self.timers.try_remove(&key);
            }
        }
        tracing::info!(slot, old = ?old, new, "slot reloaded");
        if let Some(r) = &mut self.reloading {
            r.replaced.push((slot, old, new));
            r.serving = Some(Instant::now());
            if let Some(old) = old {
                r.draining.insert(old);
            }
        }
        if let Some(old) = old {
            if let Some(w) = self.workers.get_mut(&old) {
                w.slot = None;
            }
            self.drain(old, DrainReason::Replaced);
        }
    }

    /// Finishes the reload if nothing is left to do or to wait for.
    pub(super) fn finish_reload_if_done(&mut self) {
        let done = self.reloading.as_ref().is_some_and(|r| {
            r.todo.is_empty()
                && r.running.is_empty()
                && r.draining.iter().all(|w| !self.workers.contains_key(w))
        });
        if !done {
            return;
        }
        let Some(r) = self.reloading.take() else {
            return;
        };
        let report = ReloadReport {
            generation: r.generation,
            replaced: r.replaced,
            serving_ms: millis(
                r.serving
                    .unwrap_or(r.started)
                    .saturating_duration_since(r.started),
            ),
            took_ms: millis(r.started.elapsed()),
        };
        tracing::info!(
            generation = report.generation,
            slots = report.replaced.len(),
            "reloaded in {} ms",
            report.took_ms
        );
        for reply in r.replies {
            let _ = reply.send(Ok(report.clone()));
        }
        self.notify_reload_done(None);
        self.next_reload();
    }

    /// Runs the reload asked for during the last one.
    fn next_reload(&mut self) {
        let mut queued = std::mem::take(&mut self.reload_queued);
        if let Some(first) = queued.pop() {
            self.reload(first);
            if let Some(r) = &mut self.reloading {
                r.replies.extend(queued);
            }
        }
    }

    /// The reload stops: `slot`'s new worker failed. Slots not replaced keep their workers.
    pub(super) fn fail_reload(&mut self, slot: usize, why: &str) {
        let Some(r) = self.reloading.take() else {
            return;
        };
        let kept = r.todo.len() + r.running.len();
        let message = format!(
            "reload to generation {} failed: the new worker of slot {slot} {why}; {} slot(s) \
             replaced, {kept} keep their old workers",
            r.generation,
            r.replaced.len(),
        );
        tracing::error!("{message}");
        for (_, rep) in r.running {
            self.timers.try_remove(&rep.timer);
            // Stopped like any worker, not killed: a program has its listeners from the start
            // and may have accepted connections before it said it was ready.
            if let Some(w) = self.workers.get_mut(&rep.new) {
                w.slot = None;
            }
            self.drain(rep.new, DrainReason::Replaced);
        }
        self.last_reload = Some(message.clone());
        for reply in r.replies {
            let _ = reply.send(Err(Error::NotReady(message.clone())));
        }
        self.notify_reload_done(Some(&message));
        self.next_reload();
    }

    /// Worker `id` exited: a reload waiting for it to become ready fails; one waiting for it
    /// to drain goes on.
    pub(super) fn reload_worker_exited(&mut self, id: u32, how: &str) {
        let Some(r) = &self.reloading else {
            return;
        };
        let failed = r
            .running
            .iter()
            .find(|(_, rep)| rep.new == id)
            .map(|(&slot, _)| slot);
        match failed {
            Some(slot) => self.fail_reload(slot, &format!("exited ({how}) before it was ready")),
            None => self.finish_reload_if_done(),
        }
    }

    /// A new worker was not ready in time.
    pub(super) fn reload_ready_timeout(&mut self, id: u32) {
        let Some(r) = &self.reloading else {
            return;
        };
        let slot = r
            .running
            .iter()
            .find(|(_, rep)| rep.new == id)
            .map(|(&slot, _)| slot);
        if let Some(slot) = slot {
            let t = self.settings.timeouts.ready;
            self.fail_reload(slot, &format!("was not ready within {t:?}"));
        }
    }

    /// A stop ends the reload: its replies get [`Error::Stopping`].
    pub(super) fn abandon_reload(&mut self) {
        if let Some(r) = self.reloading.take() {
            for (_, rep) in r.running {
                self.timers.try_remove(&rep.timer);
            }
            for reply in r.replies {
                let _ = reply.send(Err(Error::Stopping));
            }
        }
        for reply in std::mem::take(&mut self.reload_queued) {
            let _ = reply.send(Err(Error::Stopping));
        }
    }

    /// For `status`: the reload under way (generation, slots done, slots in all), if any.
    pub(super) fn reload_state(&self) -> Option<(u64, usize, usize)> {
        self.reloading.as_ref().map(|r| {
            let total = r.replaced.len() + r.running.len() + r.todo.len();
            (r.generation, r.replaced.len(), total)
        })
    }
}
