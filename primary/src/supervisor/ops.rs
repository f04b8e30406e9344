//! The operations that span workers: scale, status, and stop.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Supervisor {
    pub(super) fn scale(&mut self, to: ScaleTo, reply: Reply<Result<ScaleReport, Error>>) {
        if self.stopping.is_some() {
            let _ = reply.send(Err(Error::Stopping));
            return;
        }
        let from = self.slots.len();
        let to = match to {
            ScaleTo::Exactly(n) => n,
            ScaleTo::By(d) => {
                let n = i64::try_from(from).unwrap_or(i64::MAX).saturating_add(d);
                usize::try_from(n.max(1)).unwrap_or(1)
            }
        };
        if to == 0 || to > MAX_WORKERS {
            let _ = reply.send(Err(Error::BadWorkerCount(to)));
            return;
        }
        tracing::info!(from, to, "scaling");
        let mut report = ScaleReport {
            from,
            to,
            started: Vec::new(),
            stopped: Vec::new(),
        };
        let mut up = Vec::new();
        let mut down = BTreeSet::new();
        if to > from {
            let mut failure = None;
            for _ in from..to {
                match self.fork() {
                    Ok(info) => {
                        if let Some(s) = info.slot {
                            up.push(s);
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failure {
                // The slots that did start stay (and respawn); say why the rest did not.
                let _ = reply.send(Err(e));
                return;
            }
        } else {
            let retire: Vec<usize> = self.slots.keys().rev().take(from - to).copied().collect();
            for slot in retire {
                if let Some(s) = self.slots.remove(&slot) {
                    if let Some((_, key)) = s.next_attempt {
                        self.timers.try_remove(&key);
                    }
                    if let Some(w) = s.worker {
                        if let Some(worker) = self.workers.get_mut(&w) {
                            worker.slot = None;
                        }
                        down.insert(w);
                        report.stopped.push(w);
                    }
                    self.retire_slot(slot, s.worker);
                }
            }
        }
        let id = self.next_seq();
        let timer = (!up.is_empty()).then(|| {
            self.timers
                .insert(Timer::Ready { wait: id }, self.settings.timeouts.ready)
        });
        self.scales.push(ScaleWait {
            id,
            report,
            up,
            down,
            timer,
            reply,
        });
        self.check_scales();
    }

    /// Completes the scales whose workers are all ready or gone.
    pub(super) fn check_scales(&mut self) {
        let mut i = 0;
        while i < self.scales.len() {
            let wait = &self.scales[i];
            let all_up = wait.up.iter().all(|slot| {
                self.slots
                    .get(slot)
                    .and_then(|s| s.worker)
                    .is_some_and(|w| self.ready(w))
            });
            let all_down = wait.down.iter().all(|w| !self.workers.contains_key(w));
            if all_up && all_down {
                let mut wait = self.scales.swap_remove(i);
                for slot in &wait.up {
                    if let Some(w) = self.slots.get(slot).and_then(|s| s.worker) {
                        wait.report.started.push(w);
                    }
                }
                if let Some(key) = wait.timer {
                    self.timers.try_remove(&key);
                }
                tracing::info!(workers = wait.report.to, "scaled");
                let _ = wait.reply.send(Ok(wait.report));
            } else {
                i += 1;
            }
        }
        self.announce_ready_if_ready();
    }

    /// Fails the scales waiting on `slot`'s worker, which exited before it was ready.
    pub(super) fn fail_scales_for(&mut self, slot: usize, why: &str) {
        let mut i = 0;
        while i < self.scales.len() {
            if self.scales[i].up.contains(&slot) {
                let wait = self.scales.swap_remove(i);
                if let Some(key) = wait.timer {
                    self.timers.try_remove(&key);
                }
                let _ = wait.reply.send(Err(Error::NotReady(format!(
                    "the worker of slot {slot} {why} before it was ready"
                ))));
            } else {
                i += 1;
            }
        }
    }

    pub(super) fn status(&mut self, reply: Reply<Status>) {
        let seq = self.next_seq();
        let mut remaining = BTreeSet::new();
        for w in self.workers.values() {
            if w.phase.connected()
                && w.phase != Phase::Starting
                && w.tx
                    .try_send(ToWorker::StatsQuery { seq }, Vec::new())
                    .is_ok()
            {
                remaining.insert(w.id);
            }
        }
        let timer = self.timers.insert(Timer::Status { seq }, STATUS_TIMEOUT);
        self.statuses.insert(
            seq,
            StatusWait {
                remaining,
                stats: HashMap::new(),
                reply,
                timer,
            },
        );
        self.check_status(seq);
    }

    pub(super) fn check_status(&mut self, seq: u64) {
        let done = self
            .statuses
            .get(&seq)
            .is_some_and(|s| s.remaining.is_empty());
        if done {
            self.finish_status(seq);
        }
    }

    pub(super) fn finish_status(&mut self, seq: u64) {
        let Some(wait) = self.statuses.remove(&seq) else {
            return;
        };
        self.timers.try_remove(&wait.timer);
        let now = Instant::now();
        let mut listeners = Vec::new();
        for l in self.registry.iter() {
            let connections = wait
                .stats
                .values()
                .flatten()
                .filter(|s| s.key == l.key)
                .fold(0u64, |acc, s| acc.saturating_add(s.open));
            let queued = match &l.mode {
                Mode::RoundRobin(rr) => rr.pending(),
                _ => 0,
            };
            // Program workers hold every pinned listener from their start (they are no members:
            // they never asked over a channel).
            let programs = if l.pinned && !matches!(l.mode, Mode::RoundRobin(_)) {
                self.workers
                    .values()
                    .filter(|w| w.kind == WorkerKind::Program && w.phase.serving())
                    .count()
            } else {
                0
            };
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                address: l.address.to_string(),
                pinned: l.pinned,
                workers: l.members.len() + programs,
                connections,
                queued,
            });
        }
        let slots = self
            .slots
            .iter()
            .map(|(&slot, s)| SlotStatus {
                slot,
                worker: s.worker,
                restarts: s.restarts,
                next_attempt_ms: s
                    .next_attempt
                    .map(|(at, _)| millis(at.saturating_duration_since(now))),
                last_exit: s.last_exit.clone(),
            })
            .collect();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|w| {
                let stats = wait.stats.get(&w.id);
                let sum = |f: fn(&ListenerStats) -> u64| {
                    stats.map(|s| s.iter().fold(0u64, |acc, x| acc.saturating_add(f(x))))
                };
                let program = w.kind == WorkerKind::Program;
                WorkerStatus {
                    slot: w.slot,
                    id: w.id,
                    pid: w.pid,
                    generation: w.generation,
                    kind: if program { "program" } else { "native" }.to_string(),
                    state: w.phase.state().to_string(),
                    status_text: w.status_text.clone(),
                    // A program worker has no channel to answer on.
                    responsive: program || (stats.is_some() && w.ping.is_none()),
                    connections: sum(|s| s.open),
                    served: sum(|s| s.served),
                    restarts: w
                        .slot
                        .and_then(|s| self.slots.get(&s))
                        .map_or(0, |s| s.restarts),
                    uptime_ms: millis(now.saturating_duration_since(w.started)),
                    in_state_ms: millis(now.saturating_duration_since(w.since)),
                    rss_bytes: crate::status::rss_bytes(w.pid),
                }
            })
            .collect();
        // By slot, then age; workers without a slot (being replaced or drained) last.
        workers.sort_by_key(|w| (w.slot.unwrap_or(usize::MAX), w.id));
        let status = Status {
            schema: STATUS_SCHEMA,
            pid: std::process::id(),
            uptime_ms: millis(now.saturating_duration_since(self.started)),
            policy: self.settings.policy.to_string(),
            generation: self.generation,
            workers_wanted: self.slots.len(),
            stopping: self.stopping.is_some(),
            reload: self.reload_state().map(|(generation, done, slots)| {
                crate::status::ReloadStatus {
                    generation,
                    done,
                    slots,
                }
            }),
            last_reload_error: self.last_reload.clone(),
            listeners,
            slots,
            workers,
        };
        let _ = wait.reply.send(status);
    }

    pub(super) fn stop(&mut self, mode: StopMode, reply: Option<Reply<Vec<Event>>>) {
        if let Some(s) = &mut self.stopping {
            s.replies.extend(reply);
            if mode == StopMode::Now {
                tracing::warn!("stopping now: killing every worker");
                self.kill_all();
            }
            return;
        }
        tracing::info!(?mode, "stopping");
        let handover = mode == StopMode::Handover;
        self.stopping = Some(Stopping {
            phase: StopPhase::Refusing,
            replies: reply.into_iter().collect(),
            exits: Vec::new(),
            given_up: false,
            polling: false,
            handover,
        });
        self.notify_stopping(handover);
        for (_, slot) in self.slots.iter_mut() {
            if let Some((_, key)) = slot.next_attempt.take() {
                self.timers.try_remove(&key);
            }
        }
        for wait in self.scales.drain(..) {
            if let Some(key) = wait.timer {
                self.timers.try_remove(&key);
            }
            let _ = wait.reply.send(Err(Error::Stopping));
        }
        self.abandon_reload();
        if handover {
            // The sockets are the next primary's now: nothing is filtered, no socket file is
            // removed, and nothing waits for the queues it keeps accepting from.
            self.registry.disarm_unlinks();
            self.close_listeners();
            return;
        }
        // First no new handshake starts on the primary's own sockets; the handshakes under way
        // get a round trip to land in the accept queues, where they will be served.
        for l in self.registry.iter() {
            if !l.owned {
                continue;
            }
            for fd in l.listening() {
                if let Err(e) = listening::refuse_new_connections(fd) {
                    tracing::debug!(listener = %l.address, "cannot filter new connections: {e}");
                }
            }
        }
        if mode == StopMode::Now {
            self.close_listeners();
            self.kill_all();
        } else {
            self.timers.insert(Timer::StopGrace, HANDSHAKE_GRACE);
        }
    }

    /// The stop's handshake grace is over. Round-robin listeners close once their accept task
    /// has let go (the primary takes what waits in the backlog and closes at once,
    /// [`Supervisor::acceptor_done`]), and what was accepted is handed off; the workers keep
    /// accepting from shared and reuseport sockets until their queues are empty. Only then
    /// are the workers told to drain.
    pub(super) fn close_listeners(&mut self) {
        if let Some(s) = &mut self.stopping {
            if s.phase == StopPhase::Refusing {
                s.phase = StopPhase::Flushing;
            }
        }
        for l in self.registry.iter_mut() {
            match &mut l.mode {
                Mode::RoundRobin(rr) => rr.stop_accepting(),
                // Not the primary's to empty: closing now changes nothing for the workers.
                _ if !l.owned => drop(l.close_socket()),
                _ => {}
            }
        }
        let ids: Vec<u64> = self.registry.iter().map(|l| l.id).collect();
        for id in ids {
            self.dispatch(id);
        }
        self.timers
            .insert(Timer::StopFlush, self.settings.drain_timeout);
        self.check_flushed();
    }

    /// Whether every shared or reuseport socket the primary owns has an empty accept queue
    /// (the workers took what was there).
    fn queues_empty(&self) -> bool {
        if self.stopping.as_ref().is_some_and(|s| s.handover) {
            return true;
        }
        self.registry.iter().all(|l| {
            matches!(l.mode, Mode::RoundRobin(_))
                || !l.owned
                || l.listening().into_iter().all(|fd| {
                    netcluster_protocol::steer::accept_queue_len(fd).map_or(true, |n| n == 0)
                })
        })
    }

    /// Once every round-robin connection is handed off, tells the workers to drain.
    pub(super) fn check_flushed(&mut self) {
        let Some(s) = &self.stopping else {
            return;
        };
        if s.phase != StopPhase::Flushing {
            return;
        }
        let serving = self.workers.values().any(|w| w.phase.serving());
        // Idle: every round-robin socket closed (its backlog taken) and nothing left to hand.
        let idle = self.registry.iter().all(|l| match &l.mode {
            Mode::RoundRobin(rr) => rr.is_idle() && l.socket().is_none(),
            _ => true,
        });
        if !serving || (idle && self.queues_empty()) {
            self.begin_drain();
        } else if idle {
            // The workers are still taking what waits in the shared or reuseport queues.
            if let Some(s) = &mut self.stopping {
                if !s.polling {
                    s.polling = true;
                    self.timers.insert(Timer::StopPoll, QUEUE_POLL);
                }
            }
        }
    }

    pub(super) fn begin_drain(&mut self) {
        if let Some(s) = &mut self.stopping {
            if s.phase == StopPhase::Draining {
                return;
            }
            s.phase = StopPhase::Draining;
        }
        let mut closed = 0;
        for l in self.registry.iter_mut() {
            match &mut l.mode {
                Mode::RoundRobin(rr) => closed += rr.close_pending(),
                // The primary's copies go; the workers close theirs as they drain.
                Mode::ReusePort(slots) => {
                    let all: Vec<usize> = slots.sockets().map(|(s, _)| s).collect();
                    for s in all {
                        drop(slots.remove(s));
                    }
                    drop(l.close_socket());
                }
                Mode::Shared => drop(l.close_socket()),
            }
        }
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "no worker took these accepted connections before the deadline; closing them"
            );
        }
        let ids: Vec<u32> = self.workers.keys().copied().collect();
        for id in ids {
            self.drain(id, DrainReason::Stop);
        }
        self.timers.insert(
            Timer::StopKill,
            self.settings.drain_timeout.saturating_add(KILL_GRACE),
        );
    }

    pub(super) fn kill_all(&mut self) {
        for w in self.workers.values_mut() {
            w.expected_exit = true;
            let _ = signal_pid(w.pid, Signal::SIGKILL);
        }
        if let Some(s) = &mut self.stopping {
            s.phase = StopPhase::Draining;
        }
        self.timers
            .insert(Timer::StopGiveUp, Duration::from_secs(5));
    }
}
