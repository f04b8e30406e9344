//! A worker's life in the loop: starting it, its handshake, its misbehaviour, draining,
//! and its exit.

use std::time::Instant;

use netcluster_protocol::message::{BoundAddress, PROTOCOL_VERSION, ToWorker};
use nix::sys::signal::Signal;

use crate::error::Error;
use crate::event::{Event, WorkerInfo};
use crate::registry::Mode;
use crate::settings::MAX_WORKERS;
use crate::spawn;
use crate::supervisor::Supervisor;
use crate::supervisor::effect::Happening;
use crate::supervisor::machines::stop::KILL_GRACE;
use crate::supervisor::timers::Timer;
use crate::worker::launch::{Plumbing, ready_after};
use crate::worker::state::{DrainReason, Exit, Phase, Transition};
use crate::worker::table::{Io, Slot, StopCause, Worker};

/// How long a program worker may go without `READY=1` before the log and the status say what
/// it waits for (at most a quarter of the ready timeout).
const READY_HINT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

impl Supervisor {
    /// A program worker has not said `READY=1` for a while: the log and the status say what
    /// it waits for, and how to do without.
    pub(super) fn ready_hint(&mut self, id: u32) {
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        let Io::Program { ready: false, .. } = &w.io else {
            return;
        };
        w.waited_long = true;
        tracing::warn!(
            worker = id,
            pid = w.pid,
            "worker {id} {} (it is not ready until then)",
            crate::status::waiting_for_ready()
        );
    }

    /// Adds a slot and starts a worker in it (Node's `cluster.fork()`).
    pub(super) fn fork(&mut self) -> Result<WorkerInfo, Error> {
        if self.stop.active() {
            return Err(Error::Stopping);
        }
        if self.table.slots.len() >= MAX_WORKERS {
            return Err(Error::BadWorkerCount(self.table.slots.len() + 1));
        }
        let slot = self.table.free_slot(|s| self.retires.is_retiring(s));
        self.table.slots.insert(slot, Slot::default());
        match self.spawn_worker(slot, false) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.table.slots.remove(&slot);
                Err(e)
            }
        }
    }

    /// The listeners a program worker of `slot` gets at descriptors 3, 4, …: the operator's,
    /// in the order they were configured. A native worker gets none: its listeners come over
    /// its channel when it listens, and a copy it never uses would keep the port open (a SYN
    /// black hole) for as long as it, or anything it starts, lives.
    fn passed_listeners(&mut self, slot: usize) -> Result<Vec<spawn::Passed>, Error> {
        if self.settings.kind == crate::settings::WorkerKind::Native {
            return Ok(Vec::new());
        }
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

    /// Starts a worker for `slot`; an `incoming` one (a reload's) takes the slot over only
    /// once it is ready.
    pub(super) fn spawn_worker(
        &mut self,
        slot: usize,
        incoming: bool,
    ) -> Result<WorkerInfo, Error> {
        let id = self.table.peek_id();
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
        let spec = spawn::Spec {
            settings: &self.settings,
            id,
            slot,
            generation: self.generation,
            listeners,
            notify_dir: std::path::PathBuf::new(),
            tree_env: None,
            child_setup: None,
        };
        let plumbing = Plumbing {
            tasks: &mut self.tasks,
            to_supervisor: &self.from_workers_tx,
        };
        let launched = self
            .launcher
            .launch(spec, plumbing)
            .map_err(|error| Error::Spawn {
                slot,
                program: self.settings.exec.clone(),
                error,
            })?;
        let id = self.table.take_id();
        if let Some(task) = launched.task {
            self.task_workers.insert(task, id);
        }
        if let Some(after) = ready_after(self.settings.kind, self.settings.readiness) {
            self.timers.arm(Timer::ReadyAfter { worker: id }, after);
        } else if self.settings.kind == crate::settings::WorkerKind::Program {
            // Well before the ready timeout, say what the worker waits for.
            let hint = READY_HINT_AFTER.min(self.settings.timeouts.ready / 4);
            self.timers.arm(Timer::ReadyHint { worker: id }, hint);
        }
        let mut worker = Worker::new(id, launched.pid, slot, self.generation, launched.io);
        worker.task = launched.task;
        let info = worker.info();
        self.table.insert(worker, incoming);
        tracing::info!(
            worker = id,
            pid = launched.pid,
            slot,
            generation = self.generation,
            "worker started"
        );
        self.emit(Event::Fork {
            id,
            pid: launched.pid,
        });
        self.offer(&Happening::Spawned {
            slot,
            worker: id,
            incoming,
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
                    if let Some(Io::Program { status_text, .. }) =
                        self.table.get_mut(id).map(|w| &mut w.io)
                    {
                        *status_text = Some(status.chars().take(200).collect());
                    }
                }
                Some(("WATCHDOG", "1")) => self.watchdog_ping(id),
                Some(("WATCHDOG", "trigger")) => self.watchdog_missed(id),
                Some(("STOPPING", "1")) => {
                    tracing::info!(worker = id, "the worker says it is stopping");
                }
                _ => {}
            }
        }
    }

    /// A program worker is ready: it counts as online and listening.
    pub(super) fn mark_ready(&mut self, id: u32, why: &str) {
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        let Io::Program { ready, .. } = &mut w.io else {
            return;
        };
        if *ready {
            return;
        }
        *ready = true;
        w.waited_long = false;
        if let Some(wd) = self.settings.watchdog {
            self.timers
                .arm(Timer::WatchdogDue { worker: id }, wd.interval);
        }
        let fresh = w.phase() == Phase::Starting;
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
        self.offer(&Happening::Progress);
    }

    /// Worker `id` said it is stopping by itself (`disconnect()` if `disconnect`, else a signal
    /// it got): it drains like a worker told to, and its slot gets a new worker, as after a
    /// crash. A worker the primary already told to stop (a stop, a reload, a scale-down) stays
    /// as it was: its exit is the one the primary asked for, whatever else reached it since.
    pub(super) fn stopping_by_itself(&mut self, id: u32, disconnect: bool) {
        let Some(w) = self.table.get(id) else {
            return;
        };
        if w.expected_exit() {
            return;
        }
        self.drain(id, DrainReason::ByWorker);
        if let Some(w) = self.table.get_mut(id) {
            // Node's `exitedAfterDisconnect` is for `disconnect()` (and the primary's own
            // stops), not for a worker that a signal stopped.
            w.stop = Some(StopCause::ByItself { disconnect });
        }
    }

    /// Tells worker `id` to stop: it leaves every round-robin rotation at once, gets
    /// `Shutdown` (a program worker its stop signal), and is killed if it is still running
    /// past the drain deadline.
    pub(super) fn drain(&mut self, id: u32, reason: DrainReason) {
        let drain = self.settings.drain_timeout;
        let stop_signal = self.settings.stop_signal;
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        // A native worker ends its own connections at the drain timeout and exits; the kill is
        // its backstop, a grace later. A program has no such deadline of its own: it is
        // killed at the drain timeout, as documented for --drain-timeout.
        let grace = if w.is_program() {
            std::time::Duration::ZERO
        } else {
            KILL_GRACE
        };
        let deadline = match (w.hung, self.settings.watchdog) {
            (true, Some(wd)) => Instant::now() + wd.grace,
            _ => Instant::now() + drain + grace,
        };
        let was_serving = w.phase().serving() || w.phase() == Phase::Starting;
        if w.apply(Transition::Drain { reason, deadline }).is_err() {
            return;
        }
        w.stop = Some(StopCause::Drained(reason));
        let pid = w.pid;
        let hung = w.hung.then_some(self.settings.watchdog).flatten();
        if let Some(wd) = hung {
            // A hung program: the watchdog signal (a stack dump, for runtimes that make one),
            // then SIGKILL after the grace.
            if let Err(e) = self.launcher.signal(pid, wd.signal) {
                tracing::debug!(worker = id, "cannot signal the worker: {e}");
            }
        } else if w.is_program() {
            // No channel: the stop signal, then SIGKILL at the deadline.
            if let Err(e) = self.launcher.signal(pid, stop_signal) {
                tracing::debug!(worker = id, "cannot signal the worker: {e}");
            }
        } else if was_serving || reason != DrainReason::ByWorker {
            let drain_timeout_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
            if let Err(e) = w.send(ToWorker::Shutdown { drain_timeout_ms }, Vec::new()) {
                tracing::warn!(
                    worker = id,
                    "cannot tell the worker to stop ({e:?}); it is killed at its deadline"
                );
            }
        }
        let listeners: Vec<u64> = w.listeners.iter().copied().collect();
        let kill = Timer::Kill { worker: id };
        if !self.timers.is_armed(kill) {
            self.timers.arm_at(kill, deadline);
        }
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
        let Some(w) = self.table.get_mut(id) else {
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
        if let Err(e) = w.send(welcome, Vec::new()) {
            tracing::warn!(worker = id, "cannot welcome: {e:?}");
            return;
        }
        let pid = w.pid;
        tracing::info!(worker = id, pid, "worker online");
        self.emit(Event::Online { id, pid });
        self.offer(&Happening::Progress);
    }

    /// Worker `id` did something it must not (a bad frame, a second Hello, over a limit).
    /// Past [`Limits::violations`](crate::Limits::violations) of them it is killed (and, like
    /// any worker that dies unasked, replaced).
    pub(super) fn violation(&mut self, id: u32, what: &str) {
        let limit = self.settings.limits.violations;
        let Some(w) = self.table.get_mut(id) else {
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
        if let Some(w) = self.table.get_mut(id) {
            tracing::error!(worker = id, pid = w.pid, "killing the worker: {why}");
            w.stop = Some(StopCause::Misbehaved);
            let pid = w.pid;
            self.launcher.kill_tree(id, pid);
        }
    }

    /// Kills every worker at a stop: their exits are asked for.
    pub(super) fn kill_all(&mut self) {
        let mut trees = Vec::new();
        for w in self.table.workers.values_mut() {
            if !w.expected_exit() {
                w.stop = Some(StopCause::Killed {
                    after_disconnect: w.exited_after_disconnect(),
                });
            }
            trees.push((w.id, w.pid));
        }
        for (id, pid) in trees {
            self.launcher.kill_tree(id, pid);
        }
    }

    /// Worker `id` did not read its queue or answer a hand-off: out of every rotation until it
    /// answers a ping, killed if it does not in time.
    pub(super) fn suspect(&mut self, id: u32) {
        let ping_timeout = self.settings.timeouts.ping;
        let seq = self.next_seq();
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        let listeners: Vec<u64> = w.listeners.iter().copied().collect();
        if w.ping.is_none() {
            // Queued if there is room; if the queue is full the worker cannot answer in time.
            let _ = w.send(ToWorker::Ping { seq }, Vec::new());
            w.ping = Some(seq);
            tracing::warn!(
                worker = id,
                pid = w.pid,
                "unresponsive: out of rotation until it answers a ping"
            );
            self.timers
                .arm(Timer::Ping { worker: id, seq }, ping_timeout);
        }
        for l in listeners {
            if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                rr.pause(id);
            }
        }
    }

    pub(super) fn resume(&mut self, id: u32) {
        let Some(w) = self.table.get(id) else {
            return;
        };
        if !w.phase().serving() {
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
        let Some(w) = self.table.get_mut(id) else {
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
        self.offer(&Happening::Flushed);
    }

    pub(super) fn exited(&mut self, id: u32, exit: Exit) {
        if self.table.get(id).is_some_and(|w| w.phase().connected()) {
            self.channel_closed(id);
        }
        let its_slot = self
            .table
            .get(id)
            .and_then(|w| w.slot)
            .is_some_and(|s| self.table.slot_worker(s) == Some(id));
        let Some(w) = self.table.remove(id, exit) else {
            return;
        };
        if let Some(task) = w.task {
            self.task_workers.remove(&task);
        }
        self.timers.disarm(Timer::Kill { worker: id });
        self.timers.disarm(Timer::ReadyAfter { worker: id });
        self.timers.disarm(Timer::ReadyHint { worker: id });
        self.timers.disarm(Timer::WatchdogDue { worker: id });
        if let Some(seq) = w.ping {
            self.timers.disarm(Timer::Ping { worker: id, seq });
        }
        let forget = self.handoffs.forget(id, None);
        self.apply(forget);
        // Nothing of its tree outlives it.
        self.launcher.tree_ended(id);
        let how = describe_exit(exit);
        let pid = w.pid;
        match exit_note(w.stop, exit, self.stop.active()) {
            ExitNote::Expected => tracing::info!(worker = id, pid, "worker exited ({how})"),
            ExitNote::ByItself => tracing::info!(
                worker = id,
                pid,
                "worker exited after stopping by itself ({how})"
            ),
            ExitNote::WhileStopping => tracing::info!(
                worker = id,
                pid,
                "worker exited while the primary stops ({how})"
            ),
            ExitNote::Unexpected => {
                tracing::warn!(worker = id, pid, "worker exited unexpectedly ({how})");
            }
        }
        let event = Event::Exit {
            id,
            pid,
            code: exit.code,
            signal: exit.signal,
            exited_after_disconnect: w.exited_after_disconnect(),
        };
        self.stop.record_exit(&event);
        self.emit(event);
        self.offer(&Happening::Exited {
            worker: &w,
            its_slot,
            how: &how,
        });
    }
}

pub(super) fn describe_exit(exit: Exit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "unknown status".to_string(),
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

/// How a worker's `exit` is told, by why it stopped and whether the primary is stopping.
pub(super) fn exit_note(cause: Option<StopCause>, exit: Exit, stopping: bool) -> ExitNote {
    let clean = exit.code == Some(0);
    let stop_signal = matches!(
        exit.signal.and_then(|s| Signal::try_from(s).ok()),
        Some(Signal::SIGINT | Signal::SIGTERM)
    );
    match cause {
        Some(c) if c.expected() => ExitNote::Expected,
        Some(StopCause::ByItself { .. }) if clean => ExitNote::ByItself,
        _ if stopping && (clean || stop_signal) => ExitNote::WhileStopping,
        _ => ExitNote::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;

    use super::{ExitNote, exit_note};
    use crate::worker::state::{DrainReason, Exit};
    use crate::worker::table::StopCause;

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
    const ASKED: Option<StopCause> = Some(StopCause::Drained(DrainReason::Stop));
    const BY_ITSELF: Option<StopCause> = Some(StopCause::ByItself { disconnect: false });

    #[test]
    fn an_exit_the_primary_asked_for_is_expected() {
        for exit in [CLEAN, FAILED, killed(Signal::SIGKILL)] {
            assert_eq!(exit_note(ASKED, exit, false), ExitNote::Expected);
            let killed = Some(StopCause::Killed {
                after_disconnect: false,
            });
            assert_eq!(exit_note(killed, exit, true), ExitNote::Expected);
        }
    }

    #[test]
    fn a_worker_that_said_it_stops_and_exits_cleanly_stopped_by_itself() {
        assert_eq!(exit_note(BY_ITSELF, CLEAN, false), ExitNote::ByItself);
        // Not cleanly: a crash on the way out.
        assert_eq!(exit_note(BY_ITSELF, FAILED, false), ExitNote::Unexpected);
    }

    #[test]
    fn a_clean_or_interrupted_exit_during_a_stop_is_no_surprise() {
        for exit in [CLEAN, killed(Signal::SIGINT), killed(Signal::SIGTERM)] {
            assert_eq!(exit_note(None, exit, true), ExitNote::WhileStopping);
        }
        // A crash is one, stop or not.
        for exit in [FAILED, killed(Signal::SIGSEGV), killed(Signal::SIGKILL)] {
            assert_eq!(exit_note(None, exit, true), ExitNote::Unexpected);
        }
    }

    #[test]
    fn an_exit_nobody_announced_is_unexpected() {
        for exit in [CLEAN, FAILED, killed(Signal::SIGTERM)] {
            assert_eq!(exit_note(None, exit, false), ExitNote::Unexpected);
            assert_eq!(
                exit_note(Some(StopCause::Misbehaved), exit, false),
                ExitNote::Unexpected
            );
        }
    }
}
