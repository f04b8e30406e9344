//! The supervisor: the one loop that owns every worker, slot and listener.
//!
//! Everything reaches it as an input on a channel — commands (from the library, signals, the
//! control socket), what workers say (from their reader tasks), connections accepted by
//! round-robin accept tasks, and timers — and it handles each to completion without awaiting
//! anything: sends to workers are only *queued* ([`WorkerTx::try_send`]), so no worker can make
//! the loop wait, and no operation on one worker waits on another.
//!
//! The long operations are machines ([`machines`]): each owns its state, is offered every
//! [`Happening`] and answers with [`Effect`]s, which [`Supervisor::apply`] alone carries out.
//! A new operation is a new machine and one line in [`Supervisor::offer`].
//!
//! [`WorkerTx::try_send`]: crate::worker::conn::WorkerTx::try_send

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use netcluster_protocol::message::{ListenerStats, ToWorker};
use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::command::{Command, Reply, StopMode};
use crate::counts::{Asker, Counts};
use crate::error::Error;
use crate::event::Event;
use crate::registry::Registry;
use crate::round_robin::Accepted;
use crate::settings::Settings;
use crate::status::Status;
use crate::worker::conn::{FromWorker, OutFd, SendFailed};
use crate::worker::launch::{Launcher, Processes};
use crate::worker::state::{DrainReason, Exit};
use crate::worker::table::{StopCause, Table};

use effect::{Effect, Happening, Machine, Note, View};
use machines::handoff::Handoffs;
use machines::recycle::Recycles;
use machines::reload::Reloads;
use machines::restart::Restarts;
use machines::retire::Retires;
use machines::scale::Scales;
use machines::stop::Stop;
use timers::Timer;

mod count;
pub(crate) mod effect;
mod handoff;
mod lifecycle;
mod listeners;
pub(crate) mod machines;
mod messages;
mod notify;
mod ops;
mod recycling;
pub(crate) mod timers;

pub use machines::reload::ReloadReport;

/// Accepted connections the loop takes from its queue in one turn at most.
const ACCEPTED_AT_ONCE: usize = 256;
/// How long `status` waits for workers' figures.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// Connections taken from a round-robin listener's backlog when it closes at a stop.
const BACKLOG_DRAIN: usize = 4096;
/// Requests over a limit refused in a row before the worker counts as flooding and is killed.
const OVER_LIMIT_STREAK: u32 = 1000;
/// How often workers are measured for recycling (memory every fourth time: once a second).
const RECYCLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How often orphans of workers are looked for.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often systemd's `STATUS=` line is brought up to date (when it changed).
const SYSTEMD_STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `status` waiting for workers' figures.
#[derive(Debug)]
struct StatusWait {
    remaining: BTreeSet<u32>,
    stats: HashMap<u32, Vec<ListenerStats>>,
    reply: Reply<Status>,
}

/// The channels into the loop.
pub(crate) struct Inputs {
    pub commands: mpsc::Receiver<Command>,
}

/// The loop's state.
pub(crate) struct Supervisor {
    settings: Settings,
    started: Instant,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    from_workers_tx: mpsc::Sender<(u32, FromWorker)>,
    from_workers: mpsc::Receiver<(u32, FromWorker)>,
    accepts_tx: mpsc::Sender<Accepted>,
    accepts: mpsc::Receiver<Accepted>,
    timers: timers::Timers,
    tasks: JoinSet<()>,
    task_workers: HashMap<tokio::task::Id, u32>,
    events: broadcast::Sender<Event>,
    launcher: Box<dyn Launcher>,
    table: Table,
    generation: u64,
    registry: Registry,
    counts: Counts,
    statuses: HashMap<u64, StatusWait>,
    next_seq: u64,
    port0_shares: u32,
    // The machines.
    reloads: Reloads,
    scales: Scales,
    restarts: Restarts,
    retires: Retires,
    stop: Stop,
    handoffs: Handoffs,
    recycles: Recycles,
    /// Connections each native worker had served at the last sample (for recycling).
    served: std::collections::BTreeMap<u32, u64>,
    /// Resident memory of each worker's process tree at the last sample (for recycling).
    rss: std::collections::BTreeMap<u32, u64>,
    /// The stats question of the sample under way.
    sample_seq: Option<u64>,
    /// Samples taken (memory is measured every fourth).
    samples: u64,
    /// systemd's notification socket, if it listens.
    notifier: Option<crate::systemd::Notifier>,
    /// `READY=1` was sent for the start.
    ready_announced: bool,
    /// The last `STATUS=` sent.
    systemd_status: String,
    /// Sockets given to systemd's file-descriptor store: (listener, slot).
    stored: std::collections::HashSet<(u64, Option<usize>)>,
}

impl Supervisor {
    pub fn new(settings: Settings, inputs: Inputs, events: broadcast::Sender<Event>) -> Supervisor {
        Supervisor::with_launcher(settings, inputs, events, Box::new(Processes::default()))
    }

    /// A supervisor that starts its workers with `launcher`.
    pub(crate) fn with_launcher(
        settings: Settings,
        inputs: Inputs,
        events: broadcast::Sender<Event>,
        launcher: Box<dyn Launcher>,
    ) -> Supervisor {
        let (from_workers_tx, from_workers) = mpsc::channel(1024);
        let (accepts_tx, accepts) = mpsc::channel(1024);
        let registry = Registry::new(settings.policy, settings.limits.accept_ahead);
        let notifier = crate::systemd::Notifier::from_env();
        let mut timers = timers::Timers::default();
        if let Some(every) = notifier.as_ref().and_then(|n| n.watchdog_interval()) {
            timers.arm(Timer::Watchdog, every);
        }
        if notifier.is_some() {
            timers.arm(Timer::SystemdStatus, SYSTEMD_STATUS_EVERY);
        }
        timers.arm(Timer::Sweep, SWEEP_EVERY);
        if settings.recycle.any() {
            timers.arm(Timer::RecycleCheck, RECYCLE_CHECK_EVERY);
        }
        let recycles = Recycles::new(settings.recycle);
        let generation = settings.generation.max(1);
        let restarts = Restarts::new(settings.respawn);
        Supervisor {
            settings,
            started: Instant::now(),
            commands: inputs.commands,
            commands_open: true,
            from_workers_tx,
            from_workers,
            accepts_tx,
            accepts,
            timers,
            tasks: JoinSet::new(),
            task_workers: HashMap::new(),
            events,
            launcher,
            table: Table::default(),
            generation,
            registry,
            counts: Counts::default(),
            statuses: HashMap::new(),
            next_seq: 0,
            port0_shares: 0,
            reloads: Reloads::default(),
            scales: Scales::default(),
            restarts,
            retires: Retires::default(),
            stop: Stop::default(),
            handoffs: Handoffs::default(),
            recycles,
            served: std::collections::BTreeMap::new(),
            rss: std::collections::BTreeMap::new(),
            sample_seq: None,
            samples: 0,
            notifier,
            ready_announced: false,
            systemd_status: String::new(),
            stored: std::collections::HashSet::new(),
        }
    }

    /// Runs until a stop completes (or every handle is dropped and the workers have stopped).
    pub async fn run(mut self) {
        loop {
            if self.finished() {
                break;
            }
            tokio::select! {
                cmd = self.commands.recv(), if self.commands_open => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => {
                        // Nobody can ask anything any more: stop gracefully.
                        self.commands_open = false;
                        self.stop(StopMode::Graceful, None, None);
                    }
                },
                Some((id, msg)) = self.from_workers.recv() => self.worker_said(id, msg),
                Some(accepted) = self.accepts.recv() => self.accepted(accepted),
                Some(timer) = std::future::poll_fn(|cx| self.timers.poll_expired(cx)) => {
                    self.timer(timer);
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.task_ended(joined);
                }
            }
        }
        self.registry.close_all();
        self.launcher.close();
        tracing::debug!("supervisor stopped");
    }

    /// What the machines may read.
    fn view(&self) -> View<'_> {
        View::of(&self.table, &self.registry, &self.settings)
    }

    fn finished(&mut self) -> bool {
        let view = View::of(&self.table, &self.registry, &self.settings);
        if self.stop.finish(&view) {
            self.registry.close_all();
            return true;
        }
        false
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Offers `happening` to every machine, carrying out what each answers before the next
    /// one sees it.
    fn offer(&mut self, happening: &Happening<'_>) {
        macro_rules! to {
            ($machine:ident) => {{
                let view = View::of(&self.table, &self.registry, &self.settings);
                let effects = self.$machine.on(happening, &view);
                self.apply(effects);
            }};
        }
        {
            let view = View::of(&self.table, &self.registry, &self.settings);
            self.recycles.on(happening, &view);
        }
        to!(scales);
        to!(restarts);
        to!(retires);
        to!(reloads);
        to!(stop);
        if matches!(happening, Happening::Progress | Happening::Exited { .. }) {
            self.announce_ready_if_ready();
        }
    }

    /// Carries out the machines' effects, in order.
    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Spawn { slot, incoming } => {
                    if incoming && !self.reloads.awaits_spawn(slot) {
                        continue; // the reload that asked for it has ended
                    }
                    // A worker that starts is offered to the machines by `spawn_worker`.
                    match self.spawn_worker(slot, incoming) {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(slot, "{e}");
                            self.offer(&Happening::SpawnFailed {
                                slot,
                                incoming,
                                why: e.to_string(),
                            });
                        }
                    }
                }
                Effect::Drain { worker, reason } => self.drain(worker, reason),
                Effect::Kill { worker } => {
                    if let Some(w) = self.table.get(worker) {
                        tracing::warn!(
                            worker,
                            pid = w.pid,
                            "still running at the stop deadline; killing it"
                        );
                        let pid = w.pid;
                        self.launcher.kill_tree(worker, pid);
                    }
                }
                Effect::KillAll => self.kill_all(),
                Effect::Arm { timer, at } => self.timers.arm_at(timer, at),
                Effect::Disarm(timer) => self.timers.disarm(timer),
                Effect::Reply(answer) => answer.send(),
                Effect::Notify(note) => self.notify(note),
                Effect::Switch { slot, new } => self.switch(slot, new),
                Effect::Detach { worker } => {
                    if let Some(w) = self.table.get_mut(worker) {
                        w.slot = None;
                    }
                }
                Effect::RemoveSlot { slot } => {
                    self.table.slots.remove(&slot);
                }
                Effect::Generation(g) => self.generation = g,
                Effect::Resteer => self.resteer(),
                Effect::CloseSlotSockets { slot } => self.close_slot_sockets(slot),
                Effect::RefuseNew => self.refuse_new(),
                Effect::KeepSocketFiles => self.registry.disarm_unlinks(),
                Effect::StopAccepting => self.stop_accepting(),
                Effect::CloseQueues => self.close_queues(),
            }
        }
    }

    /// `new` takes `slot` over (a reload); the slot's old worker drains.
    fn switch(&mut self, slot: usize, new: u32) {
        let old = self.table.slot_worker(slot);
        if let Some(s) = self.table.slots.get_mut(&slot) {
            s.worker = Some(new);
        }
        let cancel = self.restarts.cancel(slot);
        self.apply(cancel);
        self.restarts.revive(slot);
        if let Some(old) = old {
            if let Some(w) = self.table.get_mut(old) {
                w.slot = None;
            }
            self.drain(old, DrainReason::Replaced);
        }
    }

    fn notify(&mut self, note: Note) {
        match note {
            Note::Reloading => self.notify_reloading(),
            Note::ReloadDone(failure) => self.notify_reload_done(failure.as_deref()),
            Note::Stopping { handover } => self.notify_stopping(handover),
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Share {
                target,
                params,
                name,
                reply,
            } => {
                let _ = reply.send(self.share(target, &params, name));
            }
            Command::Start { reply } => {
                let n = self.settings.workers;
                let result = (0..n).map(|_| self.fork()).collect();
                let _ = reply.send(result);
            }
            Command::Fork { reply } => {
                let _ = reply.send(self.fork());
            }
            Command::Scale { to, reply } => self.scale(to, reply),
            Command::Workers { reply } => {
                let _ = reply.send(self.table.workers.values().map(|w| w.info()).collect());
            }
            Command::Worker { id, reply } => {
                let _ = reply.send(self.table.info(id));
            }
            Command::Status { reply } => self.status(reply),
            Command::Count { address, reply } => {
                let ids = self.registry.at_address(&address);
                if ids.is_empty() {
                    let _ = reply.send(Err(Error::NoListener(address)));
                    return;
                }
                let mut rxs = Vec::new();
                for id in ids {
                    let (tx, rx) = oneshot::channel();
                    self.ask_count(id, Asker::Api(tx));
                    rxs.push(rx);
                }
                let _ = reply.send(Ok(rxs));
            }
            Command::CountSent {
                worker,
                origin,
                reply,
            } => {
                let connected = self
                    .table
                    .get(worker)
                    .is_some_and(|w| w.phase().connected());
                if !connected {
                    let _ = reply.send(None);
                    return;
                }
                let (tx, rx) = oneshot::channel();
                match self.counts.ask(BTreeSet::from([worker]), Asker::Sent(tx)) {
                    Ok(seq) => {
                        self.arm_count(seq);
                        self.send_or_fail_count(worker, seq, ToWorker::CountSent { seq, origin });
                    }
                    Err(done) => self.deliver(done),
                }
                let _ = reply.send(Some(rx));
            }
            Command::Send {
                worker,
                msg,
                fds,
                reply,
            } => {
                let result = match self.table.get(worker) {
                    None => Err(self.gone(worker)),
                    Some(w) if w.is_program() => Err(Error::InvalidInput(format!(
                        "worker {worker} runs a program without netcluster's channel: it cannot \
                         receive messages"
                    ))),
                    Some(w) if !w.phase().connected() => Err(Error::Disconnected(worker)),
                    Some(w) => w
                        .send(msg, fds.into_iter().map(OutFd::Owned).collect())
                        .map_err(|e| match e {
                            SendFailed::Full => Error::Unresponsive(worker),
                            SendFailed::Closed => Error::Disconnected(worker),
                        }),
                };
                let _ = reply.send(result);
            }
            Command::Disconnect { worker, reply } => {
                let result = match self.table.get(worker) {
                    None => Err(self.gone(worker)),
                    Some(w) if !w.phase().connected() => Err(Error::Disconnected(worker)),
                    Some(_) => {
                        self.drain(worker, DrainReason::Disconnect);
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            Command::Kill {
                worker,
                signal,
                reply,
            } => {
                let result = match self.table.get_mut(worker) {
                    None => Err(Error::NoSuchWorker(worker)),
                    Some(w) => {
                        w.stop = Some(StopCause::Killed {
                            after_disconnect: false,
                        });
                        let pid = w.pid;
                        self.launcher
                            .signal(pid, signal)
                            .map_err(|e| Error::io(format!("kill worker {worker}"), e))
                    }
                };
                let _ = reply.send(result);
            }
            Command::Stop { mode, reply } => self.stop(mode, reply, None),
            Command::HandOver { successor } => {
                self.stop(StopMode::Handover, None, Some(successor));
            }
            Command::Reload { reply } => {
                let view = View::of(&self.table, &self.registry, &self.settings);
                let effects = self.reloads.request(reply, self.generation, &view);
                self.apply(effects);
            }
            Command::Adopt { listener, reply } => {
                let _ = reply.send(self.adopt(listener));
            }
            Command::Export { reply } => {
                let slots = &self.table.slots;
                let result =
                    self.registry
                        .export(|slot| slots.contains_key(&slot))
                        .map(|listeners| crate::command::Export {
                            listeners,
                            generation: self.generation,
                            workers: self.table.slots.len(),
                        });
                let _ = reply.send(result);
            }
            Command::AnnounceReady => self.took_over(),
        }
    }

    /// The error for a worker that is not live: dead (disconnected) or unknown.
    fn gone(&self, id: u32) -> Error {
        if self.table.is_dead(id) {
            Error::Disconnected(id)
        } else {
            Error::NoSuchWorker(id)
        }
    }

    /// A worker's reader task ended; if it panicked, the worker is killed and reported dead
    /// (never left running unsupervised, never ended without an exit event).
    fn task_ended(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let Err(e) = joined else {
            return;
        };
        let Some(id) = self.task_workers.remove(&e.id()) else {
            return;
        };
        if let Some(w) = self.table.get(id) {
            tracing::error!(worker = id, "the worker's channel task failed: {e}");
            let pid = w.pid;
            self.launcher.kill_tree(id, pid);
            self.exited(
                id,
                Exit {
                    code: None,
                    signal: Some(Signal::SIGKILL as i32),
                },
            );
        }
    }

    fn timer(&mut self, t: Timer) {
        match t {
            Timer::Handoff {
                listener,
                worker,
                batch,
            } => self.handoff_expired(listener, worker, batch),
            Timer::Count { seq } => {
                let ms =
                    u64::try_from(self.settings.timeouts.count.as_millis()).unwrap_or(u64::MAX);
                if let Some(mut done) = self.counts.expire(seq, ms) {
                    done.timer = None;
                    self.deliver(done);
                }
            }
            Timer::Status { seq } => self.finish_status(seq),
            Timer::Ping { worker, seq } => {
                let silent = self.table.get(worker).is_some_and(|w| w.ping == Some(seq));
                if silent {
                    if let Some(w) = self.table.get_mut(worker) {
                        w.ping = None;
                    }
                    let timeout = self.settings.timeouts.ping;
                    self.kill(worker, &format!("it answered no ping within {timeout:?}"));
                }
            }
            Timer::Kill { worker } => {
                if let Some(w) = self.table.get(worker) {
                    tracing::warn!(
                        worker,
                        pid = w.pid,
                        "still running past its drain deadline; killing it"
                    );
                    let pid = w.pid;
                    self.launcher.kill_tree(worker, pid);
                }
            }
            Timer::Sweep => {
                self.launcher.sweep();
                self.timers.arm(Timer::Sweep, SWEEP_EVERY);
            }
            Timer::RecycleCheck => {
                self.recycle_check();
                self.timers.arm(Timer::RecycleCheck, RECYCLE_CHECK_EVERY);
            }
            Timer::WatchdogDue { worker } => self.watchdog_missed(worker),
            Timer::ReadyAfter { worker } => self.mark_ready(worker, "its ready-after time passed"),
            Timer::ReadyHint { worker } => self.ready_hint(worker),
            Timer::Watchdog => {
                if let Some(n) = &self.notifier {
                    n.watchdog();
                    if let Some(every) = n.watchdog_interval() {
                        self.timers.arm(Timer::Watchdog, every);
                    }
                }
            }
            Timer::SystemdStatus => {
                if self.notifier.is_some() {
                    self.send_systemd_status();
                    self.timers.arm(Timer::SystemdStatus, SYSTEMD_STATUS_EVERY);
                }
            }
            Timer::Respawn { .. }
            | Timer::Ready { .. }
            | Timer::ReloadReady { .. }
            | Timer::StopGrace
            | Timer::StopPoll
            | Timer::RetirePoll
            | Timer::StopFlush
            | Timer::StopKill
            | Timer::StopGiveUp => self.offer(&Happening::Timer(t)),
        }
    }

    /// The reload under way, for `status` and systemd: (generation, slots done, slots in all).
    fn reload_state(&self) -> Option<(u64, usize, usize)> {
        self.reloads
            .progress_report()
            .map(|p| (p.generation, p.done, p.total))
    }
}

#[cfg(test)]
mod tests;
