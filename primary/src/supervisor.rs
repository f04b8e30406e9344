//! The supervisor: the one loop that owns every worker, slot and listener.
//!
//! Everything reaches it as an input on a channel — commands (from the library, signals, the
//! control socket), what workers say (from their reader tasks), connections accepted by
//! round-robin accept tasks, and timers — and it handles each to completion without awaiting
//! anything: sends to workers are only *queued* ([`WorkerTx::try_send`]), so no worker can make
//! the loop wait, and no operation on one worker waits on another. Long operations (scale,
//! stop, status) are state the loop keeps and finishes when the inputs that complete them
//! arrive.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netcluster_protocol::handle::{self, ListenError};
use netcluster_protocol::message::{
    BoundAddress, CountError, ListenKey, ListenParams, ListenTarget, ListenerStats,
    PROTOCOL_VERSION, ToPrimary, ToWorker, monotonic_ms,
};
use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::command::{Command, Reply, ScaleReport, ScaleTo, StopMode};
use crate::counts::{Answered, Asker, Counts, Outcome};
use crate::error::Error;
use crate::event::{Event, UserMessage, WorkerInfo};
use crate::registry::{Mode, Registry};
use crate::round_robin::{self, Accepted};
use crate::settings::{MAX_WORKERS, Settings};
use crate::spawn;
use crate::status::{ListenerStatus, STATUS_SCHEMA, SlotStatus, Status, WorkerStatus};
use crate::worker::conn::{self, FromWorker, OutFd, SendFailed, WorkerTx};
use crate::worker::state::{DrainReason, Exit, Phase, Transition};

/// How long after a hand-off's deadline the primary gives its connection to another worker:
/// the worker refuses a hand-off it reads after the deadline, and this margin covers the time
/// between its check and its answer.
const HANDOFF_GRACE: Duration = Duration::from_secs(1);
/// Time beyond the drain deadline before a worker still running is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long `status` waits for workers' figures.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Dead workers remembered for `WorkerHandle` look-ups.
const GRAVEYARD: usize = 256;
/// Connections taken from a round-robin listener's backlog when it closes at a stop.
const BACKLOG_DRAIN: usize = 4096;
/// At a stop, how long handshakes under way get to land in the accept queues after new ones
/// are refused (a round trip, with room).
const HANDSHAKE_GRACE: Duration = Duration::from_millis(100);
/// Requests over a limit refused in a row before the worker counts as flooding and is killed.
const OVER_LIMIT_STREAK: u32 = 1000;
/// Hand-offs a worker may let expire in a row before it is killed (it answers pings but not
/// hand-offs).
const SILENT_HANDOFFS: u32 = 3;

/// Deadlines the loop keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Respawn {
        slot: usize,
    },
    Handoff {
        listener: u64,
        worker: u32,
        seq: u64,
    },
    Count {
        seq: u64,
    },
    Status {
        seq: u64,
    },
    Ping {
        worker: u32,
        seq: u64,
    },
    Kill {
        worker: u32,
    },
    Ready {
        wait: u64,
    },
    StopGrace,
    StopFlush,
    StopKill,
    StopGiveUp,
}

/// A live worker.
#[derive(Debug)]
struct Worker {
    id: u32,
    pid: u32,
    slot: Option<usize>,
    generation: u64,
    started: Instant,
    phase: Phase,
    tx: WorkerTx,
    /// Listeners it holds, by id.
    listeners: BTreeSet<u64>,
    exited_after_disconnect: bool,
    /// The primary (or the library) asked it to stop: no respawn.
    expected_exit: bool,
    /// Count requests it has in flight.
    requests: u32,
    /// Requests refused in a row for being over a limit; reset by one within the limits.
    over_limit: u32,
    /// Hand-offs it let expire in a row; reset by an answer in time.
    silent_handoffs: u32,
    violations: u32,
    /// A ping it has not answered yet.
    ping: Option<(u64, delay_queue::Key)>,
    kill_timer: Option<delay_queue::Key>,
    task: tokio::task::Id,
    /// When it entered its current phase.
    since: Instant,
}

impl Worker {
    /// The one way a worker's phase changes: by the transition table.
    fn apply(&mut self, t: Transition) -> Result<(), crate::worker::state::Refused> {
        self.phase = self.phase.next(t)?;
        self.since = Instant::now();
        Ok(())
    }

    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.id,
            pid: self.pid,
            slot: self.slot,
            generation: self.generation,
            online: self.phase != Phase::Starting,
            state: self.phase.state(),
            exited_after_disconnect: self.exited_after_disconnect,
        }
    }
}

/// A place in the pool.
#[derive(Debug, Default)]
struct Slot {
    worker: Option<u32>,
    restarts: u32,
    /// Exponent of the next restart delay.
    attempt: u32,
    next_attempt: Option<(Instant, delay_queue::Key)>,
    last_exit: Option<String>,
}

/// A scale waiting for workers to become ready or to exit.
#[derive(Debug)]
struct ScaleWait {
    id: u64,
    report: ScaleReport,
    /// Slots whose workers must become ready.
    up: Vec<usize>,
    /// Workers that must exit.
    down: BTreeSet<u32>,
    timer: Option<delay_queue::Key>,
    reply: Reply<Result<ScaleReport, Error>>,
}

/// `status` waiting for workers' figures.
#[derive(Debug)]
struct StatusWait {
    remaining: BTreeSet<u32>,
    stats: HashMap<u32, Vec<ListenerStats>>,
    reply: Reply<Status>,
    timer: delay_queue::Key,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopPhase {
    /// No new handshake starts; those under way land in the accept queues.
    Refusing,
    /// Round-robin connections already accepted are being handed off.
    Flushing,
    /// Workers are finishing their connections.
    Draining,
}

#[derive(Debug)]
struct Stopping {
    phase: StopPhase,
    replies: Vec<Reply<Vec<Event>>>,
    exits: Vec<Event>,
    given_up: bool,
}

/// A dead worker, remembered for look-ups.
#[derive(Debug, Clone)]
struct Dead {
    info: WorkerInfo,
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
    timers: DelayQueue<Timer>,
    tasks: JoinSet<()>,
    task_workers: HashMap<tokio::task::Id, u32>,
    events: broadcast::Sender<Event>,
    workers: BTreeMap<u32, Worker>,
    graveyard: VecDeque<Dead>,
    slots: BTreeMap<usize, Slot>,
    next_id: u32,
    generation: u64,
    registry: Registry,
    counts: Counts,
    handoff_timers: HashMap<(u64, u32), delay_queue::Key>,
    statuses: HashMap<u64, StatusWait>,
    scales: Vec<ScaleWait>,
    next_seq: u64,
    port0_shares: u32,
    stopping: Option<Stopping>,
}

impl Supervisor {
    pub fn new(settings: Settings, inputs: Inputs, events: broadcast::Sender<Event>) -> Supervisor {
        let (from_workers_tx, from_workers) = mpsc::channel(1024);
        let (accepts_tx, accepts) = mpsc::channel(1024);
        let registry = Registry::new(settings.policy, settings.limits.accept_ahead);
        Supervisor {
            settings,
            started: Instant::now(),
            commands: inputs.commands,
            commands_open: true,
            from_workers_tx,
            from_workers,
            accepts_tx,
            accepts,
            timers: DelayQueue::new(),
            tasks: JoinSet::new(),
            task_workers: HashMap::new(),
            events,
            workers: BTreeMap::new(),
            graveyard: VecDeque::new(),
            slots: BTreeMap::new(),
            next_id: 1,
            generation: 1,
            registry,
            counts: Counts::default(),
            handoff_timers: HashMap::new(),
            statuses: HashMap::new(),
            scales: Vec::new(),
            next_seq: 0,
            port0_shares: 0,
            stopping: None,
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
                        self.stop(StopMode::Graceful, None);
                    }
                },
                Some((id, msg)) = self.from_workers.recv() => self.worker_said(id, msg),
                Some(accepted) = self.accepts.recv() => self.accepted(accepted),
                Some(expired) = std::future::poll_fn(|cx| self.timers.poll_expired(cx)) => {
                    self.timer(expired.into_inner());
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.task_ended(joined);
                }
            }
        }
        self.registry.close_all();
        tracing::debug!("supervisor stopped");
    }

    fn finished(&mut self) -> bool {
        let Some(stopping) = &self.stopping else {
            return false;
        };
        if !self.workers.is_empty() && !stopping.given_up {
            return false;
        }
        if let Some(mut s) = self.stopping.take() {
            self.registry.close_all();
            for reply in s.replies.drain(..) {
                let _ = reply.send(s.exits.clone());
            }
            self.stopping = Some(s);
        }
        true
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    // ---- commands ----------------------------------------------------------------------

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
                let _ = reply.send(self.workers.values().map(Worker::info).collect());
            }
            Command::Worker { id, reply } => {
                let info = self.workers.get(&id).map(Worker::info).or_else(|| {
                    self.graveyard
                        .iter()
                        .find(|d| d.info.id == id)
                        .map(|d| d.info.clone())
                });
                let _ = reply.send(info);
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
                    .workers
                    .get(&worker)
                    .is_some_and(|w| w.phase.connected());
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
                let result = match self.workers.get(&worker) {
                    None => Err(self.gone(worker)),
                    Some(w) if !w.phase.connected() => Err(Error::Disconnected(worker)),
                    Some(w) => {
                        w.tx.try_send(msg, fds.into_iter().map(OutFd::Owned).collect())
                            .map_err(|e| match e {
                                SendFailed::Full => Error::Unresponsive(worker),
                                SendFailed::Closed => Error::Disconnected(worker),
                            })
                    }
                };
                let _ = reply.send(result);
            }
            Command::Disconnect { worker, reply } => {
                let result = match self.workers.get(&worker) {
                    None => Err(self.gone(worker)),
                    Some(w) if !w.phase.connected() => Err(Error::Disconnected(worker)),
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
                let result = match self.workers.get_mut(&worker) {
                    None => Err(Error::NoSuchWorker(worker)),
                    Some(w) => {
                        w.exited_after_disconnect = false;
                        w.expected_exit = true;
                        signal_pid(w.pid, signal)
                            .map_err(|e| Error::io(format!("kill worker {worker}"), e))
                    }
                };
                let _ = reply.send(result);
            }
            Command::Stop { mode, reply } => self.stop(mode, reply),
        }
    }

    /// The error for a worker that is not live: dead (disconnected) or unknown.
    fn gone(&self, id: u32) -> Error {
        if self.graveyard.iter().any(|d| d.info.id == id) {
            Error::Disconnected(id)
        } else {
            Error::NoSuchWorker(id)
        }
    }

    /// Pins a listener for the primary's lifetime (`--listen`, `Cluster::share`).
    fn share(
        &mut self,
        target: ListenTarget,
        params: &ListenParams,
        name: Option<String>,
    ) -> Result<BoundAddress, Error> {
        if self.stopping.is_some() {
            return Err(Error::Stopping);
        }
        // A relative Unix path is the primary's: its workers resolve theirs against their own
        // directory and must find the same key.
        let target = match target {
            ListenTarget::Unix(path) if path.is_relative() => ListenTarget::Unix(
                std::env::current_dir()
                    .map_err(|e| Error::io("current directory", e))?
                    .join(path),
            ),
            other => other,
        };
        let port0 = matches!(&target, ListenTarget::Tcp(a) if a.port() == 0)
            || target == ListenTarget::TcpAny(0);
        let key = ListenKey {
            target,
            ordinal: if port0 { self.port0_shares } else { 0 },
        };
        let name = name.unwrap_or_else(|| key.target.to_string());
        let id = match self.registry.find(&key) {
            Some(id) => {
                if let Some(l) = self.registry.get_mut(id) {
                    l.pinned = true;
                    l.name = name;
                }
                id
            }
            None => self.bind(&key, params, Some(name))?,
        };
        if port0 {
            self.port0_shares += 1;
        }
        self.registry
            .get(id)
            .map(|l| l.address.clone())
            .ok_or_else(|| Error::InvalidInput("the listener closed".into()))
    }

    /// Binds `key` and starts its accept task if it is round robin.
    fn bind(
        &mut self,
        key: &ListenKey,
        params: &ListenParams,
        pinned: Option<String>,
    ) -> Result<u64, ListenError> {
        let bound = self.registry.bind(key, params, pinned)?;
        if let Some((fd, gate)) = bound.acceptor {
            if let Err(e) = round_robin::spawn_acceptor(
                bound.id,
                fd,
                key.target.to_string(),
                gate,
                self.accepts_tx.clone(),
            ) {
                drop(self.registry.remove(bound.id));
                return Err(ListenError::new(&key.target, e));
            }
        }
        Ok(bound.id)
    }

    /// Adds a slot and starts a worker in it (Node's `cluster.fork()`).
    fn fork(&mut self) -> Result<WorkerInfo, Error> {
        if self.stopping.is_some() {
            return Err(Error::Stopping);
        }
        if self.slots.len() >= MAX_WORKERS {
            return Err(Error::BadWorkerCount(self.slots.len() + 1));
        }
        let slot = (1..).find(|s| !self.slots.contains_key(s)).unwrap_or(1);
        self.slots.insert(slot, Slot::default());
        match self.spawn_into(slot) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.slots.remove(&slot);
                Err(e)
            }
        }
    }

    /// Starts a worker for `slot`.
    fn spawn_into(&mut self, slot: usize) -> Result<WorkerInfo, Error> {
        let id = self.next_id;
        let spawned =
            spawn::spawn_native(&self.settings, id, slot, self.generation).map_err(|error| {
                Error::Spawn {
                    slot,
                    program: self.settings.exec.clone(),
                    error,
                }
            })?;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let channel = Arc::new(spawned.channel);
        let tx = conn::start_writer(channel.clone(), self.settings.limits.queue, id);
        let task = self.tasks.spawn(conn::run_reader(
            id,
            spawned.child,
            channel,
            self.from_workers_tx.clone(),
        ));
        self.task_workers.insert(task.id(), id);
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
            requests: 0,
            over_limit: 0,
            silent_handoffs: 0,
            violations: 0,
            ping: None,
            kill_timer: None,
            task: task.id(),
            since: Instant::now(),
        };
        let info = worker.info();
        self.workers.insert(id, worker);
        if let Some(s) = self.slots.get_mut(&slot) {
            s.worker = Some(id);
            s.next_attempt = None;
        }
        tracing::info!(worker = id, pid = spawned.pid, slot, "worker started");
        self.emit(Event::Fork {
            id,
            pid: spawned.pid,
        });
        Ok(info)
    }

    fn scale(&mut self, to: ScaleTo, reply: Reply<Result<ScaleReport, Error>>) {
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
                        self.drain(w, DrainReason::ScaleDown);
                    }
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

    /// Whether worker `id` is ready: handshake done and listening on every pinned listener.
    fn ready(&self, id: u32) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        w.phase.serving()
            && self
                .registry
                .iter()
                .filter(|l| l.pinned)
                .all(|l| w.listeners.contains(&l.id))
    }

    /// Completes the scales whose workers are all ready or gone.
    fn check_scales(&mut self) {
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
    }

    /// Fails the scales waiting on `slot`'s worker, which exited before it was ready.
    fn fail_scales_for(&mut self, slot: usize, why: &str) {
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

    fn status(&mut self, reply: Reply<Status>) {
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

    fn check_status(&mut self, seq: u64) {
        let done = self
            .statuses
            .get(&seq)
            .is_some_and(|s| s.remaining.is_empty());
        if done {
            self.finish_status(seq);
        }
    }

    fn finish_status(&mut self, seq: u64) {
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
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                address: l.address.to_string(),
                pinned: l.pinned,
                workers: l.members.len(),
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
                WorkerStatus {
                    slot: w.slot,
                    id: w.id,
                    pid: w.pid,
                    generation: w.generation,
                    state: w.phase.state().to_string(),
                    responsive: stats.is_some() && w.ping.is_none(),
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
            listeners,
            slots,
            workers,
        };
        let _ = wait.reply.send(status);
    }

    // ---- stopping ------------------------------------------------------------------------

    fn stop(&mut self, mode: StopMode, reply: Option<Reply<Vec<Event>>>) {
        if let Some(s) = &mut self.stopping {
            s.replies.extend(reply);
            if mode == StopMode::Now {
                tracing::warn!("stopping now: killing every worker");
                self.kill_all();
            }
            return;
        }
        tracing::info!(?mode, "stopping");
        self.stopping = Some(Stopping {
            phase: StopPhase::Refusing,
            replies: reply.into_iter().collect(),
            exits: Vec::new(),
            given_up: false,
        });
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
        // First no new handshake starts on the primary's own sockets; the handshakes under way
        // get a round trip to land in the accept queues, where they will be served.
        for l in self.registry.iter() {
            if let (true, Some(fd)) = (l.owned, l.socket()) {
                if let Err(e) = handle::refuse_new_connections(fd) {
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

    /// The stop's handshake grace is over: every listener closes its socket, round-robin ones
    /// once their accept task has let go (then the primary takes what waits in the backlog and
    /// closes it at once, [`Supervisor::acceptor_done`]), and what was accepted is handed off
    /// before the workers are told to drain. Workers drain their own copies as they stop.
    fn close_listeners(&mut self) {
        if let Some(s) = &mut self.stopping {
            if s.phase == StopPhase::Refusing {
                s.phase = StopPhase::Flushing;
            }
        }
        for l in self.registry.iter_mut() {
            match &mut l.mode {
                Mode::RoundRobin(rr) => rr.stop_accepting(),
                _ => drop(l.close_socket()),
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

    /// Once every round-robin connection is handed off, tells the workers to drain.
    fn check_flushed(&mut self) {
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
        if idle || !serving {
            self.begin_drain();
        }
    }

    fn begin_drain(&mut self) {
        if let Some(s) = &mut self.stopping {
            if s.phase == StopPhase::Draining {
                return;
            }
            s.phase = StopPhase::Draining;
        }
        let mut closed = 0;
        for l in self.registry.iter_mut() {
            if let Mode::RoundRobin(rr) = &mut l.mode {
                closed += rr.close_pending();
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

    fn kill_all(&mut self) {
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

    /// Tells worker `id` to stop: it leaves every round-robin rotation at once, gets
    /// `Shutdown`, and is killed if it is still running past the drain deadline.
    fn drain(&mut self, id: u32, reason: DrainReason) {
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
        if was_serving || reason != DrainReason::ByWorker {
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

    // ---- what workers say ---------------------------------------------------------------

    fn worker_said(&mut self, id: u32, msg: FromWorker) {
        if !self.workers.contains_key(&id) {
            return;
        }
        match msg {
            FromWorker::Message(m) => self.message(id, m),
            FromWorker::BadFrame(e) => self.violation(id, &format!("dropped a bad frame: {e}")),
            FromWorker::Closed => self.channel_closed(id),
            FromWorker::Exited(status) => {
                let exit = match status {
                    Ok(s) => Exit {
                        code: s.code(),
                        signal: std::os::unix::process::ExitStatusExt::signal(&s),
                    },
                    Err(e) => {
                        tracing::warn!(worker = id, "cannot wait for the worker: {e}");
                        Exit {
                            code: None,
                            signal: None,
                        }
                    }
                };
                self.exited(id, exit);
            }
        }
    }

    fn message(&mut self, id: u32, msg: ToPrimary) {
        match msg {
            ToPrimary::Hello {
                version,
                pid,
                worker_id,
            } => self.hello(id, version, pid, worker_id),
            ToPrimary::Listen { seq, key, params } => self.listen(id, seq, key, &params),
            ToPrimary::Close { key } => {
                if let Some(l) = self.registry.find(&key) {
                    let held = self
                        .workers
                        .get_mut(&id)
                        .is_some_and(|w| w.listeners.remove(&l));
                    if held {
                        self.leave(l, id);
                    }
                }
            }
            ToPrimary::Message { data } => self.emit(Event::Message {
                id,
                message: UserMessage::new(data),
            }),
            ToPrimary::Disconnect => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.exited_after_disconnect = true;
                }
                self.drain(id, DrainReason::ByWorker);
                // It asked itself: its slot gets a new worker, as after a crash.
                if let Some(w) = self.workers.get_mut(&id) {
                    w.expected_exit = false;
                }
            }
            ToPrimary::CountReply { seq, count } => match self.counts.answer(id, seq, count) {
                Outcome::Done(done) => self.deliver(done),
                Outcome::Counted => {}
                Outcome::Unexpected => {
                    tracing::debug!(worker = id, seq, "count reply to no question in flight");
                }
            },
            ToPrimary::CountRequest { seq, key } => self.count_request(id, seq, &key),
            ToPrimary::Accepted {
                handle,
                seq,
                accepted,
            } => {
                let result = self
                    .registry
                    .get_mut(handle)
                    .and_then(|l| l.round_robin())
                    .map(|rr| rr.ack(id, seq, accepted));
                match result {
                    Some(Ok(())) => {
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.silent_handoffs = 0;
                        }
                        if let Some(key) = self.handoff_timers.remove(&(handle, id)) {
                            self.timers.try_remove(&key);
                        }
                        self.dispatch(handle);
                        self.check_flushed();
                    }
                    Some(Err(e)) => {
                        tracing::debug!("{e}");
                    }
                    None => tracing::debug!(worker = id, handle, "answer for a closed listener"),
                }
            }
            ToPrimary::Pong { seq } => {
                let answered = self
                    .workers
                    .get_mut(&id)
                    .and_then(|w| w.ping.take_if(|(s, _)| *s == seq));
                if let Some((_, key)) = answered {
                    self.timers.try_remove(&key);
                    tracing::info!(worker = id, "answered its ping; back in rotation");
                    self.resume(id);
                }
            }
            ToPrimary::Stats { seq, mut listeners } => {
                if let Some(wait) = self.statuses.get_mut(&seq) {
                    if wait.remaining.remove(&id) {
                        listeners.truncate(self.settings.limits.listen_keys);
                        wait.stats.insert(id, listeners);
                    }
                    self.check_status(seq);
                }
            }
        }
    }

    fn hello(&mut self, id: u32, version: u8, pid: u32, worker_id: u32) {
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
    }

    fn listen(&mut self, id: u32, seq: u64, key: ListenKey, params: &ListenParams) {
        let refuse = |this: &mut Self, errno: i32, message: String| {
            if let Some(w) = this.workers.get(&id) {
                let _ = w.tx.try_send(
                    ToWorker::ListenErr {
                        seq,
                        address: key.target.to_string(),
                        errno,
                        message,
                    },
                    Vec::new(),
                );
            }
        };
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if !w.phase.serving() {
            let why = if w.phase == Phase::Starting {
                "listen before the handshake"
            } else {
                "the worker is stopping"
            };
            refuse(self, 0, why.into());
            if self
                .workers
                .get(&id)
                .is_some_and(|w| w.phase == Phase::Starting)
            {
                self.violation(id, "listen before Hello");
            }
            return;
        }
        let limit = self.settings.limits.listen_keys;
        if w.listeners.len() >= limit {
            refuse(
                self,
                libc::EMFILE,
                format!("a worker may hold at most {limit} listeners"),
            );
            self.violation(id, "too many listen keys");
            return;
        }
        if self.stopping.is_some() {
            refuse(self, 0, "the cluster is stopping".into());
            return;
        }
        // `{fd}` names a descriptor the primary was given, and it must be a listening socket
        // (netcluster-isolation finding 5).
        let listener = match &key.target {
            ListenTarget::Fd(fd) => match self.fd_listener(*fd, &key, params) {
                Ok(l) => Ok(l),
                Err(e) => Err(e),
            },
            _ => match self.registry.find(&key) {
                Some(l) => Ok(l),
                None => self.bind(&key, params, None),
            },
        };
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(worker = id, "{e}");
                refuse(self, e.errno().unwrap_or(0), e.source.to_string());
                return;
            }
        };
        let grant = match self.registry.grant(listener) {
            Ok(g) => g,
            Err(e) => {
                refuse(self, e.errno().unwrap_or(0), e.source.to_string());
                self.maybe_close(listener);
                return;
            }
        };
        let (address, grant, fd) = grant;
        let reply = ToWorker::ListenOk {
            seq,
            address: address.clone(),
            grant,
        };
        let fds = fd.into_iter().map(OutFd::Owned).collect();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if let Err(e) = w.tx.try_send(reply, fds) {
            tracing::warn!(worker = id, "cannot send the listener ({e:?})");
            self.maybe_close(listener);
            if e == SendFailed::Full {
                self.suspect(id);
            }
            return;
        }
        let _ = w.apply(Transition::Listened);
        w.listeners.insert(listener);
        let paused = w.ping.is_some();
        if let Some(l) = self.registry.get_mut(listener) {
            l.members.insert(id);
            // The grant is queued ahead of any connection: the worker knows the handle before a
            // hand-off for it can arrive.
            if let Some(rr) = l.round_robin() {
                rr.join(id);
                if paused {
                    rr.pause(id);
                }
            }
        }
        tracing::info!(worker = id, %address, "worker listening");
        let fd = match key.target {
            ListenTarget::Fd(fd) => Some(fd),
            _ => None,
        };
        self.emit(Event::Listening { id, address, fd });
        self.dispatch(listener);
        self.check_scales();
    }

    /// The listener for `listen({fd})`: the registry's own listener when `fd` is one of the
    /// primary's listening sockets, or a new one on a descriptor the primary was given.
    fn fd_listener(
        &mut self,
        fd: i32,
        key: &ListenKey,
        params: &ListenParams,
    ) -> Result<u64, ListenError> {
        let named = |e: std::io::Error| ListenError::new(&key.target, e);
        if !self.settings.may_listen_on(fd) {
            return Err(named(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the primary was not given this descriptor (only inherited or given descriptors may be named)",
            )));
        }
        let dup = netcluster_protocol::fd::dup_raw(fd).map_err(named)?;
        handle::check_listening(dup.as_fd()).map_err(named)?;
        let ino = inode(dup.as_fd());
        if let Some(l) = self
            .registry
            .iter()
            .find(|l| ino.is_some() && l.socket().and_then(inode) == ino)
        {
            return Ok(l.id);
        }
        match self.registry.find(key) {
            Some(l) => Ok(l),
            None => self.bind(key, params, None),
        }
    }

    /// Closes listener `l` if it has no member and no operator pinned it.
    fn maybe_close(&mut self, l: u64) {
        let empty = self
            .registry
            .get(l)
            .is_some_and(|l| l.members.is_empty() && !l.pinned);
        if empty {
            drop(self.registry.remove(l));
        }
    }

    /// Worker `id` no longer uses listener `l`.
    fn leave(&mut self, l: u64, id: u32) {
        if let Some(key) = self.handoff_timers.remove(&(l, id)) {
            self.timers.try_remove(&key);
        }
        drop(self.registry.leave(l, id));
        self.dispatch(l);
    }

    fn count_request(&mut self, id: u32, seq: u64, key: &ListenKey) {
        let limit = self.settings.limits.requests;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.requests >= limit {
            let _ = w.tx.try_send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::TooMany { limit }),
                },
                Vec::new(),
            );
            // A burst past the limit is refused, not punished; a worker that does nothing but
            // push past it is flooding.
            w.over_limit = w.over_limit.saturating_add(1);
            if w.over_limit > OVER_LIMIT_STREAK {
                self.kill(
                    id,
                    &format!(
                        "{OVER_LIMIT_STREAK} count requests in a row over its limit of {limit}"
                    ),
                );
            }
            return;
        }
        w.over_limit = 0;
        if self.stopping.is_some() {
            let _ = w.tx.try_send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::Stopping),
                },
                Vec::new(),
            );
            return;
        }
        w.requests += 1;
        match self.registry.find(key) {
            Some(l) => self.ask_count(l, Asker::Worker { id, seq }),
            None => self.deliver(Answered {
                asker: Asker::Worker { id, seq },
                result: Ok(0),
                timer: None,
            }),
        }
    }

    /// Asks every member of listener `l` for its open connections, for `asker`.
    fn ask_count(&mut self, l: u64, asker: Asker) {
        let Some(listener) = self.registry.get(l) else {
            self.deliver(Answered {
                asker,
                result: Ok(0),
                timer: None,
            });
            return;
        };
        let members = listener.members.clone();
        let key = listener.key.clone();
        match self.counts.ask(members.clone(), asker) {
            Ok(seq) => {
                self.arm_count(seq);
                for w in members {
                    self.send_or_fail_count(
                        w,
                        seq,
                        ToWorker::CountQuery {
                            seq,
                            key: key.clone(),
                        },
                    );
                }
            }
            Err(done) => self.deliver(done),
        }
    }

    fn arm_count(&mut self, seq: u64) {
        let key = self
            .timers
            .insert(Timer::Count { seq }, self.settings.timeouts.count);
        self.counts.set_timer(seq, key);
    }

    fn send_or_fail_count(&mut self, worker: u32, seq: u64, msg: ToWorker) {
        let failed = match self.workers.get(&worker) {
            Some(w) => match w.tx.try_send(msg, Vec::new()) {
                Ok(()) => None,
                Err(SendFailed::Full) => Some(CountError::Unresponsive { worker }),
                Err(SendFailed::Closed) => Some(CountError::WorkerExited { worker }),
            },
            None => Some(CountError::WorkerExited { worker }),
        };
        if let Some(err) = failed {
            if let Some(done) = self.counts.fail(seq, err) {
                self.deliver(done);
            }
        }
    }

    /// Gives a finished count to whoever asked.
    fn deliver(&mut self, done: Answered) {
        if let Some(key) = &done.timer {
            self.timers.try_remove(key);
        }
        match done.asker {
            Asker::Api(tx) | Asker::Sent(tx) => {
                let _ = tx.send(done.result);
            }
            Asker::Worker { id, seq } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.requests = w.requests.saturating_sub(1);
                    let _ = w.tx.try_send(
                        ToWorker::CountResult {
                            seq,
                            result: done.result,
                        },
                        Vec::new(),
                    );
                }
            }
        }
    }

    /// Worker `id` did something it must not (a bad frame, a second Hello, over a limit).
    /// Past [`Limits::violations`](crate::Limits::violations) of them it is killed (and, like
    /// any worker that dies unasked, replaced).
    fn violation(&mut self, id: u32, what: &str) {
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
    fn kill(&mut self, id: u32, why: &str) {
        if let Some(w) = self.workers.get_mut(&id) {
            tracing::error!(worker = id, pid = w.pid, "killing the worker: {why}");
            w.expected_exit = false;
            w.exited_after_disconnect = false;
            let _ = signal_pid(w.pid, Signal::SIGKILL);
        }
    }

    /// Worker `id` did not read its queue or answer a hand-off: out of every rotation until it
    /// answers a ping, killed if it does not in time.
    fn suspect(&mut self, id: u32) {
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

    fn resume(&mut self, id: u32) {
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

    fn channel_closed(&mut self, id: u32) {
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

    fn exited(&mut self, id: u32, exit: Exit) {
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
        let handoffs: Vec<(u64, u32)> = self
            .handoff_timers
            .keys()
            .filter(|(_, worker)| *worker == id)
            .copied()
            .collect();
        for k in handoffs {
            if let Some(key) = self.handoff_timers.remove(&k) {
                self.timers.try_remove(&key);
            }
        }
        let how = describe_exit(exit);
        if w.expected_exit {
            tracing::info!(worker = id, pid = w.pid, "worker exited ({how})");
        } else {
            tracing::warn!(
                worker = id,
                pid = w.pid,
                "worker exited unexpectedly ({how})"
            );
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
            if self.slots.contains_key(&slot) && !w.expected_exit {
                self.fail_scales_for(slot, &format!("exited ({how})"));
            }
            self.slot_lost_worker(slot, &w, &how);
        }
        self.check_scales();
        self.check_flushed();
    }

    /// `slot`'s worker `w` exited: schedule its next start if nobody asked it to stop.
    fn slot_lost_worker(&mut self, slot: usize, w: &Worker, how: &str) {
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

    fn respawn(&mut self, slot: usize) {
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

    /// A worker's reader task ended; if it panicked, the worker is killed and reported dead
    /// (never left running unsupervised, never ended without an exit event).
    fn task_ended(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let Err(e) = joined else {
            return;
        };
        let Some(id) = self.task_workers.remove(&e.id()) else {
            return;
        };
        if self.workers.contains_key(&id) {
            tracing::error!(worker = id, "the worker's channel task failed: {e}");
            if let Some(w) = self.workers.get(&id) {
                let _ = signal_pid(w.pid, Signal::SIGKILL);
            }
            self.exited(
                id,
                Exit {
                    code: None,
                    signal: Some(Signal::SIGKILL as i32),
                },
            );
        }
    }

    // ---- round robin ---------------------------------------------------------------------

    fn accepted(&mut self, accepted: Accepted) {
        let Some(conn) = accepted.conn else {
            self.acceptor_done(accepted.listener);
            return;
        };
        let Some(rr) = self
            .registry
            .get_mut(accepted.listener)
            .and_then(|l| l.round_robin())
        else {
            return;
        };
        rr.push(conn);
        self.dispatch(accepted.listener);
    }

    /// A round-robin listener's accept task has stopped and closed its copy of the socket.
    /// At a stop the primary's copy is now the last: take the backlog, then close it, with
    /// nothing in between.
    fn acceptor_done(&mut self, id: u64) {
        if self.stopping.is_none() {
            return;
        }
        let Some(l) = self.registry.get_mut(id) else {
            return;
        };
        let fd = l.close_socket();
        if let (Some(rr), Some(fd)) = (l.round_robin(), &fd) {
            for _ in 0..BACKLOG_DRAIN {
                match netcluster_protocol::fd::accept_nonblocking(fd.as_fd()) {
                    Ok(conn) => rr.push_fd(conn),
                    Err(_) => break,
                }
            }
        }
        drop(fd);
        self.dispatch(id);
        self.check_flushed();
    }

    /// Hands listener `l`'s waiting connections to its free workers.
    fn dispatch(&mut self, l: u64) {
        let handoff_ms =
            u64::try_from(self.settings.timeouts.handoff.as_millis()).unwrap_or(u64::MAX);
        loop {
            let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) else {
                return;
            };
            let Some(h) = rr.next() else {
                return;
            };
            let Some(w) = self.workers.get(&h.worker) else {
                rr.not_sent(h.worker, h.seq, false);
                continue;
            };
            let msg = ToWorker::Connection {
                handle: l,
                seq: h.seq,
                expires_ms: monotonic_ms().saturating_add(handoff_ms),
            };
            match w.tx.try_send(msg, vec![OutFd::Shared(h.fd)]) {
                Ok(()) => {
                    let key = self.timers.insert(
                        Timer::Handoff {
                            listener: l,
                            worker: h.worker,
                            seq: h.seq,
                        },
                        self.settings.timeouts.handoff + HANDOFF_GRACE,
                    );
                    if let Some(old) = self.handoff_timers.insert((l, h.worker), key) {
                        self.timers.try_remove(&old);
                    }
                }
                Err(e) => {
                    let full = e == SendFailed::Full;
                    if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                        rr.not_sent(h.worker, h.seq, full);
                    }
                    if full {
                        self.suspect(h.worker);
                    }
                }
            }
        }
    }

    // ---- timers --------------------------------------------------------------------------

    fn timer(&mut self, t: Timer) {
        match t {
            Timer::Respawn { slot } => self.respawn(slot),
            Timer::Handoff {
                listener,
                worker,
                seq,
            } => {
                self.handoff_timers.remove(&(listener, worker));
                let expired = self
                    .registry
                    .get_mut(listener)
                    .and_then(|l| l.round_robin())
                    .is_some_and(|rr| rr.expire(worker, seq));
                if expired {
                    tracing::warn!(
                        worker,
                        "did not answer a hand-off in time; its connection goes to another worker"
                    );
                    let streak = self.workers.get_mut(&worker).map_or(0, |w| {
                        w.silent_handoffs = w.silent_handoffs.saturating_add(1);
                        w.silent_handoffs
                    });
                    if streak >= SILENT_HANDOFFS {
                        self.kill(
                            worker,
                            &format!("it let {streak} hand-offs in a row expire"),
                        );
                    } else if self.workers.get(&worker).is_some_and(|w| w.phase.serving()) {
                        self.suspect(worker);
                    }
                    self.dispatch(listener);
                }
            }
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
                let silent = self
                    .workers
                    .get(&worker)
                    .is_some_and(|w| w.ping.is_some_and(|(s, _)| s == seq));
                if silent {
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.ping = None;
                    }
                    let timeout = self.settings.timeouts.ping;
                    self.kill(worker, &format!("it answered no ping within {timeout:?}"));
                }
            }
            Timer::Kill { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.kill_timer = None;
                    tracing::warn!(
                        worker,
                        pid = w.pid,
                        "still running past its drain deadline; killing it"
                    );
                    let _ = signal_pid(w.pid, Signal::SIGKILL);
                }
            }
            Timer::Ready { wait } => {
                if let Some(i) = self.scales.iter().position(|s| s.id == wait) {
                    let w = self.scales.swap_remove(i);
                    let not_ready: Vec<String> =
                        w.up.iter()
                            .filter(|slot| {
                                !self
                                    .slots
                                    .get(slot)
                                    .and_then(|s| s.worker)
                                    .is_some_and(|w| self.ready(w))
                            })
                            .map(ToString::to_string)
                            .collect();
                    let _ = w.reply.send(Err(Error::NotReady(format!(
                        "slots {} were not ready within {:?}",
                        not_ready.join(", "),
                        self.settings.timeouts.ready
                    ))));
                }
            }
            Timer::StopGrace => self.close_listeners(),
            Timer::StopFlush => self.begin_drain(),
            Timer::StopKill => {
                for w in self.workers.values() {
                    tracing::warn!(
                        worker = w.id,
                        pid = w.pid,
                        "still running at the stop deadline; killing it"
                    );
                    let _ = signal_pid(w.pid, Signal::SIGKILL);
                }
                self.timers
                    .insert(Timer::StopGiveUp, Duration::from_secs(5));
            }
            Timer::StopGiveUp => {
                if let Some(s) = &mut self.stopping {
                    if !self.workers.is_empty() {
                        tracing::error!(
                            workers = self.workers.len(),
                            "workers were not reaped after SIGKILL; giving up on them"
                        );
                    }
                    s.given_up = true;
                }
            }
        }
    }
}

fn signal_pid(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(std::io::Error::from)
}

fn describe_exit(exit: Exit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "unknown status".to_string(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn inode(fd: impl AsFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd.as_fd())
        .ok()
        .map(|s| (s.st_dev, s.st_ino))
}
