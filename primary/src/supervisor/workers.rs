//! A worker's life in the loop: starting it, its handshake, its misbehaviour, draining,
//! its exit, and restarting its slot.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Supervisor {
    /// Adds a slot and starts a worker in it (Node's `cluster.fork()`).
    pub(super) fn fork(&mut self) -> Result<WorkerInfo, Error> {
        if self.stopping.is_some() {
            return Err(Error::Stopping);
        }
        if self.slots.len() >= MAX_WORKERS {
            return Err(Error::BadWorkerCount(self.slots.len() + 1));
        }
        let slot = (1..)
            .find(|s| !self.slots.contains_key(s) && !self.is_retiring(*s))
            .unwrap_or(1);
        self.slots.insert(slot, Slot::default());
        match self.spawn_into(slot) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.slots.remove(&slot);
                Err(e)
            }
        }
    }

    /// The listeners a worker of `slot` gets at descriptors 3, 4, …: the operator's, in the
    /// order they were configured (round-robin ones stay in the primary, and a native worker
    /// under round robin gets none).
    fn passed_listeners(&mut self, slot: usize) -> Result<Vec<spawn::Passed>, Error> {
        let ids: Vec<u64> = self
            .registry
            .iter()
            .filter(|l| l.pinned && !matches!(l.mode, Mode::RoundRobin(_)))
            .map(|l| l.id)
            .collect();
        let mut passed = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(l) = self.registry.get_mut(id) else {
                continue;
            };
            let name = l.fdname.clone();
            let what = l.address.to_string();
            let fd = match l.slot_socket(slot)? {
                Some(fd) => fd.try_clone_to_owned(),
                None => match l.socket() {
                    Some(fd) => fd.try_clone_to_owned(),
                    None => continue,
                },
            }
            .map_err(|e| Error::io(format!("pass {what} to a worker"), e))?;
            passed.push(spawn::Passed { fd, name });
        }
        Ok(passed)
    }

    /// The private directory of the notification sockets, made on first use.
    fn notify_dir(&mut self) -> Result<std::path::PathBuf, Error> {
        if self.notify_dir.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("netcluster-notify-")
                .tempdir()
                .map_err(|e| Error::io("make a directory for notification sockets", e))?;
            self.notify_dir = Some(dir);
        }
        Ok(self
            .notify_dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default())
    }

    /// Starts a worker for `slot`, which it serves at once.
    pub(super) fn spawn_into(&mut self, slot: usize) -> Result<WorkerInfo, Error> {
        self.spawn_worker(slot, false)
    }

    /// Starts a worker for `slot`; an `incoming` one (a reload's) takes the slot over only
    /// once it is ready.
    pub(super) fn spawn_worker(
        &mut self,
        slot: usize,
        incoming: bool,
    ) -> Result<WorkerInfo, Error> {
        let id = self.next_id;
        let kind = self.settings.kind;
        let listeners = self.passed_listeners(slot)?;
        if self.settings.fd_store && !listeners.is_empty() {
            // A program's slot sockets were just made: systemd keeps them too.
            let reuseport: Vec<u64> = self
                .registry
                .iter()
                .filter(|l| matches!(l.mode, Mode::ReusePort(_)))
                .map(|l| l.id)
                .collect();
            for l in reuseport {
                self.store_in_systemd(l);
            }
        }
        let notify_dir = match kind {
            WorkerKind::Program => self.notify_dir()?,
            WorkerKind::Native => std::path::PathBuf::new(),
        };
        let mut spawned = spawn::spawn(spawn::Spec {
            settings: &self.settings,
            id,
            slot,
            generation: self.generation,
            listeners,
            notify_dir: &notify_dir,
        })
        .map_err(|error| Error::Spawn {
            slot,
            program: self.settings.exec.clone(),
            error,
        })?;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let prefix = format!("[slot {slot}] ");
        if let Some(out) = spawned.child.stdout.take() {
            tokio::spawn(conn::forward_output(out, prefix.clone(), false));
        }
        if let Some(err) = spawned.child.stderr.take() {
            tokio::spawn(conn::forward_output(err, prefix, true));
        }
        let notify = spawned.notify.take().map(|(sock, path)| {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(conn::run_notify(
                id,
                sock,
                path,
                self.from_workers_tx.clone(),
                stop.clone(),
            ));
            stop.drop_guard()
        });
        let (tx, task) = match spawned.channel {
            Some(channel) => {
                let channel = Arc::new(channel);
                let tx = conn::start_writer(channel.clone(), self.settings.limits.queue, id);
                let task = self.tasks.spawn(conn::run_reader(
                    id,
                    spawned.child,
                    channel,
                    self.from_workers_tx.clone(),
                ));
                (tx, task)
            }
            None => {
                let task = self.tasks.spawn(conn::run_program(
                    id,
                    spawned.child,
                    self.from_workers_tx.clone(),
                ));
                (conn::closed_tx(), task)
            }
        };
        self.task_workers.insert(task.id(), id);
        if let (WorkerKind::Program, Readiness::After(after)) = (kind, self.settings.readiness) {
            self.timers.insert(Timer::ReadyAfter { worker: id }, after);
        }
        let worker = Worker {
            id,
            pid: spawned.pid,
            slot: Some(slot),
            generation: self.generation,
            started: Instant::now(),
            phase: Phase::Starting,
            tx,
            listeners: BTreeSet::new(),
            exited_after_disconnect: false,
            expected_exit: false,
            stopped_itself: false,
            requests: 0,
            over_limit: 0,
            silent_handoffs: 0,
            violations: 0,
            ping: None,
            kill_timer: None,
            task: task.id(),
            since: Instant::now(),
            kind,
            ready: false,
            status_text: None,
            _notify: notify,
        };
        let info = worker.info();
        self.workers.insert(id, worker);
        if !incoming {
            if let Some(s) = self.slots.get_mut(&slot) {
                s.worker = Some(id);
                s.next_attempt = None;
            }
        }
        tracing::info!(
            worker = id,
            pid = spawned.pid,
            slot,
            generation = self.generation,
            "worker started"
        );
        self.emit(Event::Fork {
            id,
            pid: spawned.pid,
        });
        Ok(info)
    }

    /// A datagram on worker `id`'s notification socket: `READY=1`, `STATUS=…`, `STOPPING=1`
    /// (one per line; others are ignored, as systemd ignores what it does not know).
    pub(super) fn notified(&mut self, id: u32, text: &str) {
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => self.mark_ready(id, "it said READY=1"),
                Some(("STATUS", status)) => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.status_text = Some(status.chars().take(200).collect());
                    }
                }
                Some(("STOPPING", "1")) => {
                    tracing::info!(worker = id, "the worker says it is stopping");
                }
                _ => {}
            }
        }
    }

    /// A program worker is ready: it counts as online and listening.
    pub(super) fn mark_ready(&mut self, id: u32, why: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.ready || w.kind != WorkerKind::Program {
            return;
        }
        w.ready = true;
        let fresh = w.phase == Phase::Starting;
        if fresh && w.apply(Transition::Hello).is_ok() {
            let _ = w.apply(Transition::Listened);
            let pid = w.pid;
            tracing::info!(worker = id, pid, "worker ready: {why}");
            self.emit(Event::Online { id, pid });
            let addresses: Vec<BoundAddress> = self
                .registry
                .iter()
                .filter(|l| l.pinned)
                .map(|l| l.address.clone())
                .collect();
            for address in addresses {
                self.emit(Event::Listening {
                    id,
                    address,
                    fd: None,
                });
            }
        }
        self.check_scales();
        self.reload_progress();
    }

    /// Whether worker `id` is ready: handshake done and listening on every pinned listener.
    pub(super) fn ready(&self, id: u32) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        if w.kind == WorkerKind::Program {
            return w.ready && w.phase.serving();
        }
        w.phase.serving()
            && self
                .registry
                .iter()
                .filter(|l| l.pinned)
                .all(|l| w.listeners.contains(&l.id))
    }

    /// Worker `id` said it is stopping by itself (`disconnect()` if `disconnect`, else a signal
    /// it got): it drains like a worker told to, and its slot gets a new worker, as after a
    /// crash. A worker the primary already told to stop (a stop, a reload, a scale-down) stays
    /// as it was: its exit is the one the primary asked for, whatever else reached it since.
    pub(super) fn stopping_by_itself(&mut self, id: u32, disconnect: bool) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.expected_exit {
            return;
        }
        w.stopped_itself = true;
        self.drain(id, DrainReason::ByWorker);
        if let Some(w) = self.workers.get_mut(&id) {
            w.expected_exit = false;
            // Node's `exitedAfterDisconnect` is for `disconnect()` (and the primary's own
            // stops), not for a worker that a signal stopped.
            w.exited_after_disconnect = disconnect;
        }
    }

    /// Tells worker `id` to stop: it leaves every round-robin rotation at once, gets
    /// `Shutdown`, and is killed if it is still running past the drain deadline.
    pub(super) fn drain(&mut self, id: u32, reason: DrainReason) {
        let drain = self.settings.drain_timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let deadline = Instant::now() + drain + KILL_GRACE;
        let was_serving = w.phase.serving() || w.phase == Phase::Starting;
        if w.apply(Transition::Drain { reason, deadline }).is_err() {
            return;
        }
        w.expected_exit = true;
        w.exited_after_disconnect = true;
        if w.kind == WorkerKind::Program {
            // No channel: the stop signal, then SIGKILL at the deadline.
            if let Err(e) = signal_pid(w.pid, self.settings.stop_signal) {
                tracing::debug!(worker = id, "cannot signal the worker: {e}");
            }
        } else if was_serving || reason != DrainReason::ByWorker {
            let drain_timeout_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
            if let Err(e) =
                w.tx.try_send(ToWorker::Shutdown { drain_timeout_ms }, Vec::new())
            {
                tracing::warn!(
                    worker = id,
                    "cannot tell the worker to stop ({e:?}); it is killed at its deadline"
                );
            }
        }
        if w.kill_timer.is_none() {
            w.kill_timer = Some(
                self.timers
                    .insert_at(Timer::Kill { worker: id }, deadline.into()),
            );
        }
        let listeners: Vec<u64> = w.listeners.iter().copied().collect();
        for l in listeners {
            if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                rr.retire(id);
            }
            self.dispatch(l);
        }
    }

    pub(super) fn hello(&mut self, id: u32, version: u8, pid: u32, worker_id: u32) {
        if version != PROTOCOL_VERSION {
            tracing::error!(
                worker = id,
                "refused: the worker speaks protocol {version}, this primary {PROTOCOL_VERSION}"
            );
            self.kill(id, "it speaks another protocol version");
            return;
        }
        let drain_timeout_ms =
            u64::try_from(self.settings.drain_timeout.as_millis()).unwrap_or(u64::MAX);
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.apply(Transition::Hello).is_err() {
            self.violation(id, "a second Hello");
            return;
        }
        if worker_id != id || pid != w.pid {
            tracing::warn!(
                worker = id,
                pid = w.pid,
                "Hello claims worker {worker_id} pid {pid}; using what the primary knows"
            );
        }
        let welcome = ToWorker::Welcome {
            version: PROTOCOL_VERSION,
            drain_timeout_ms,
        };
        if let Err(e) = w.tx.try_send(welcome, Vec::new()) {
            tracing::warn!(worker = id, "cannot welcome: {e:?}");
            return;
        }
        let pid = w.pid;
        tracing::info!(worker = id, pid, "worker online");
        self.emit(Event::Online { id, pid });
        self.check_scales();
        self.reload_progress();
    }

    /// Worker `id` did something it must not (a bad frame, a second Hello, over a limit).
    /// Past [`Limits::violations`](crate::Limits::violations) of them it is killed (and, like
    /// any worker that dies unasked, replaced).
    pub(super) fn violation(&mut self, id: u32, what: &str) {
        let limit = self.settings.limits.violations;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.violations = w.violations.saturating_add(1);
        let n = w.violations;
        if n <= 3 {
            tracing::warn!(worker = id, "{what}");
        }
        if n == limit.saturating_add(1) {
            self.kill(
                id,
                &format!("{n} bad frames or requests over its limits (last: {what})"),
            );
        }
    }

    /// Kills worker `id` for misbehaving; it is replaced like a crashed worker.
    pub(super) fn kill(&mut self, id: u32, why: &str) {
        if let Some(w) = self.workers.get_mut(&id) {
            tracing::error!(worker = id, pid = w.pid, "killing the worker: {why}");
            w.expected_exit = false;
            w.exited_after_disconnect = false;
            let _ = signal_pid(w.pid, Signal::SIGKILL);
        }
    }

    /// Worker `id` did not read its queue or answer a hand-off: out of every rotation until it
    /// answers a ping, killed if it does not in time.
    pub(super) fn suspect(&mut self, id: u32) {
        let ping_timeout = self.settings.timeouts.ping;
        let seq = self.next_seq();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let listeners: Vec<u64> = w.listeners.iter().copied().collect();
        if w.ping.is_none() {
            // Queued if there is room; if the queue is full the worker cannot answer in time.
            let _ = w.tx.try_send(ToWorker::Ping { seq }, Vec::new());
            let key = self
                .timers
                .insert(Timer::Ping { worker: id, seq }, ping_timeout);
            w.ping = Some((seq, key));
            tracing::warn!(
                worker = id,
                pid = w.pid,
                "unresponsive: out of rotation until it answers a ping"
            );
        }
        for l in listeners {
            if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                rr.pause(id);
            }
        }
    }

    pub(super) fn resume(&mut self, id: u32) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if !w.phase.serving() {
            return;
        }
        let listeners: Vec<u64> = w.listeners.iter().copied().collect();
        for l in listeners {
            if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                rr.resume(id);
            }
            self.dispatch(l);
        }
    }

    pub(super) fn channel_closed(&mut self, id: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.apply(Transition::ChannelClosed).is_err() {
            return;
        }
        tracing::debug!(worker = id, "channel closed");
        let listeners: Vec<u64> = std::mem::take(&mut w.listeners).into_iter().collect();
        for l in listeners {
            self.leave(l, id);
        }
        for done in self.counts.worker_gone(id) {
            self.deliver(done);
        }
        let statuses: Vec<u64> = self
            .statuses
            .iter_mut()
            .filter_map(|(&seq, s)| s.remaining.remove(&id).then_some(seq))
            .collect();
        for seq in statuses {
            self.check_status(seq);
        }
        self.emit(Event::Disconnect { id });
        self.check_flushed();
    }

    pub(super) fn exited(&mut self, id: u32, exit: Exit) {
        if self.workers.get(&id).is_some_and(|w| w.phase.connected()) {
            self.channel_closed(id);
        }
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        if w.apply(Transition::Exited(exit)).is_err() {
            w.phase = Phase::Dead(exit);
        }
        self.task_workers.remove(&w.task);
        if let Some(key) = w.kill_timer.take() {
            self.timers.try_remove(&key);
        }
        if let Some((_, key)) = w.ping.take() {
            self.timers.try_remove(&key);
        }
        self.forget_handoff_timers(|_, worker| worker == id);
        let how = describe_exit(exit);
        match exit_note(
            w.expected_exit,
            w.stopped_itself,
            exit,
            self.stopping.is_some(),
        ) {
            ExitNote::Expected => tracing::info!(worker = id, pid = w.pid, "worker exited ({how})"),
            ExitNote::ByItself => tracing::info!(
                worker = id,
                pid = w.pid,
                "worker exited after stopping by itself ({how})"
            ),
            ExitNote::WhileStopping => tracing::info!(
                worker = id,
                pid = w.pid,
                "worker exited while the primary stops ({how})"
            ),
            ExitNote::Unexpected => tracing::warn!(
                worker = id,
                pid = w.pid,
                "worker exited unexpectedly ({how})"
            ),
        }
        let event = Event::Exit {
            id,
            pid: w.pid,
            code: exit.code,
            signal: exit.signal,
            exited_after_disconnect: w.exited_after_disconnect,
        };
        if let Some(s) = &mut self.stopping {
            s.exits.push(event.clone());
        }
        self.emit(event);
        self.graveyard.push_back(Dead { info: w.info() });
        while self.graveyard.len() > GRAVEYARD {
            self.graveyard.pop_front();
        }
        if let Some(slot) = w.slot {
            let its_slot = self.slots.get(&slot).is_some_and(|s| s.worker == Some(id));
            if its_slot && !w.expected_exit {
                self.fail_scales_for(slot, &format!("exited ({how})"));
            }
            self.slot_lost_worker(slot, &w, &how);
        }
        self.retired_worker_exited(id);
        self.check_scales();
        self.reload_worker_exited(id, &how);
        self.check_flushed();
    }

    /// `slot`'s worker `w` exited: schedule its next start if nobody asked it to stop.
    pub(super) fn slot_lost_worker(&mut self, slot: usize, w: &Worker, how: &str) {
        let Some(backoff) = self.settings.respawn else {
            if let Some(s) = self.slots.get_mut(&slot) {
                if s.worker == Some(w.id) {
                    s.worker = None;
                }
            }
            if !w.expected_exit {
                // Node's behaviour: the slot is gone with its worker.
                self.slots.remove(&slot);
            }
            return;
        };
        let stopping = self.stopping.is_some();
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        if s.worker != Some(w.id) {
            return;
        }
        s.worker = None;
        if stopping {
            return;
        }
        if w.expected_exit {
            // Asked to stop while still in its slot (a library `disconnect()`): the slot is
            // refilled at once.
            s.attempt = 0;
        }
        if w.started.elapsed() >= backoff.reset_after {
            s.attempt = 0;
        }
        let delay = if w.expected_exit {
            Duration::ZERO
        } else {
            backoff.delay(s.attempt)
        };
        if !w.expected_exit {
            s.attempt = s.attempt.saturating_add(1);
            s.restarts = s.restarts.saturating_add(1);
            s.last_exit = Some(how.to_string());
        }
        let at = Instant::now() + delay;
        let key = self.timers.insert_at(Timer::Respawn { slot }, at.into());
        s.next_attempt = Some((at, key));
        if !w.expected_exit {
            tracing::info!(slot, "restarting in {delay:?}");
        }
    }

    pub(super) fn respawn(&mut self, slot: usize) {
        if self.stopping.is_some() {
            return;
        }
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        s.next_attempt = None;
        if s.worker.is_some() {
            return;
        }
        if let Err(e) = self.spawn_into(slot) {
            tracing::error!(slot, "{e}");
            let Some(backoff) = self.settings.respawn else {
                return;
            };
            if let Some(s) = self.slots.get_mut(&slot) {
                let delay = backoff.delay(s.attempt);
                s.attempt = s.attempt.saturating_add(1);
                s.restarts = s.restarts.saturating_add(1);
                s.last_exit = Some(e.to_string());
                let at = Instant::now() + delay;
                let key = self.timers.insert_at(Timer::Respawn { slot }, at.into());
                s.next_attempt = Some((at, key));
            }
        }
    }
}

/// How a worker's exit is told in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExitNote {
    /// The primary asked it to stop (or killed it at a stop).
    Expected,
    /// It said it was stopping (`Disconnect`: its own `disconnect()`; `Stopping`: the
    /// `SIGINT` or `SIGTERM` it got) and then exited cleanly. Its slot is refilled as after a
    /// crash.
    ByItself,
    /// It exited cleanly, or of `SIGINT`/`SIGTERM`, while the primary stops: a Ctrl-C in a
    /// terminal reaches every process of the group, and a program worker may stop on it before
    /// the primary has told it to.
    WhileStopping,
    /// Anything else: a crash, a kill, an exit nobody asked for.
    Unexpected,
}

/// How a worker's `exit` is told: whether the primary asked it to stop (`expected`), whether
/// it said it stops by itself, and whether the primary is stopping.
pub(super) fn exit_note(
    expected: bool,
    stopped_itself: bool,
    exit: Exit,
    stopping: bool,
) -> ExitNote {
    let clean = exit.code == Some(0);
    let stop_signal = matches!(
        exit.signal.and_then(|s| Signal::try_from(s).ok()),
        Some(Signal::SIGINT | Signal::SIGTERM)
    );
    if expected {
        ExitNote::Expected
    } else if stopped_itself && clean {
        ExitNote::ByItself
    } else if stopping && (clean || stop_signal) {
        ExitNote::WhileStopping
    } else {
        ExitNote::Unexpected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: Exit = Exit {
        code: Some(0),
        signal: None,
    };
    const FAILED: Exit = Exit {
        code: Some(1),
        signal: None,
    };
    const fn killed(sig: Signal) -> Exit {
        Exit {
            code: None,
            signal: Some(sig as i32),
        }
    }

    #[test]
    fn an_exit_the_primary_asked_for_is_expected() {
        for exit in [CLEAN, FAILED, killed(Signal::SIGKILL)] {
            assert_eq!(exit_note(true, true, exit, false), ExitNote::Expected);
        }
    }

    #[test]
    fn a_worker_that_said_it_stops_and_exits_cleanly_stopped_by_itself() {
        assert_eq!(exit_note(false, true, CLEAN, false), ExitNote::ByItself);
        // Not cleanly: a crash on the way out.
        assert_eq!(exit_note(false, true, FAILED, false), ExitNote::Unexpected);
    }

    #[test]
    fn a_clean_or_interrupted_exit_during_a_stop_is_no_surprise() {
        for exit in [CLEAN, killed(Signal::SIGINT), killed(Signal::SIGTERM)] {
            assert_eq!(exit_note(false, false, exit, true), ExitNote::WhileStopping);
        }
        // A crash is one, stop or not.
        for exit in [FAILED, killed(Signal::SIGSEGV), killed(Signal::SIGKILL)] {
            assert_eq!(exit_note(false, false, exit, true), ExitNote::Unexpected);
        }
    }

    #[test]
    fn an_exit_nobody_announced_is_unexpected() {
        for exit in [CLEAN, FAILED, killed(Signal::SIGTERM)] {
            assert_eq!(exit_note(false, false, exit, false), ExitNote::Unexpected);
        }
    }
}
