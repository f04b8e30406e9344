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

use netcluster_protocol::listening::{self, ListenError};
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
use crate::settings::{MAX_WORKERS, Readiness, Settings, WorkerKind};
use crate::spawn;
use crate::status::{ListenerStatus, STATUS_SCHEMA, SlotStatus, Status, WorkerStatus};
use crate::worker::conn::{self, FromWorker, OutFd, SendFailed, WorkerTx};
use crate::worker::state::{DrainReason, Exit, Phase, Transition};

mod listen;
mod notify;
mod ops;
mod reload;
mod retire;
mod workers;

pub use reload::ReloadReport;

/// How long after a hand-off's deadline the primary gives its connection to another worker:
/// the worker refuses a hand-off it reads after the deadline, and this margin covers the time
/// between its check and its answer.
const HANDOFF_GRACE: Duration = Duration::from_secs(1);

/// Accepted connections the loop takes from its queue in one turn at most.
const ACCEPTED_AT_ONCE: usize = 256;
/// Time beyond the drain deadline before a worker still running is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long `status` waits for workers' figures.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Dead workers remembered for `WorkerHandle` look-ups.
const GRAVEYARD: usize = 256;
/// Connections taken from a round-robin listener's backlog when it closes at a stop.
const BACKLOG_DRAIN: usize = 4096;
/// How often the primary looks at accept queues it waits to see emptied.
const QUEUE_POLL: Duration = Duration::from_millis(20);
/// At a stop, how long handshakes under way get to land in the accept queues after new ones
/// are refused (a round trip, with room).
const HANDSHAKE_GRACE: Duration = Duration::from_millis(100);
/// Requests over a limit refused in a row before the worker counts as flooding and is killed.
const OVER_LIMIT_STREAK: u32 = 1000;
/// Messages of hand-offs a worker may let expire in a row before it is killed (it answers
/// pings but not hand-offs).
const SILENT_HANDOFFS: u32 = 3;
/// How often systemd's `STATUS=` line is brought up to date (when it changed).
const SYSTEMD_STATUS_EVERY: Duration = Duration::from_secs(1);

/// Deadlines the loop keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Respawn {
        slot: usize,
    },
    /// A message of round-robin hand-offs (named by its first hand-off number).
    Handoff {
        listener: u64,
        worker: u32,
        batch: u64,
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
    ReadyAfter {
        worker: u32,
    },
    ReloadReady {
        worker: u32,
    },
    StopGrace,
    StopPoll,
    RetirePoll,
    StopFlush,
    StopKill,
    StopGiveUp,
    /// `WATCHDOG=1` to systemd.
    Watchdog,
    /// `STATUS=` to systemd, when it changed.
    SystemdStatus,
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
    /// It said it is stopping by itself (`Disconnect`, `Stopping`).
    stopped_itself: bool,
    /// Count requests it has in flight.
    requests: u32,
    /// Requests refused in a row for being over a limit; reset by one within the limits.
    over_limit: u32,
    /// Messages of hand-offs it let expire in a row; reset by an answer in time.
    silent_handoffs: u32,
    violations: u32,
    /// A ping it has not answered yet.
    ping: Option<(u64, delay_queue::Key)>,
    kill_timer: Option<delay_queue::Key>,
    task: tokio::task::Id,
    /// When it entered its current phase.
    since: Instant,
    /// Native (channel) or program (systemd-style descriptors, no channel).
    kind: WorkerKind,
    /// A program worker said `READY=1` (or its `--ready-after` time passed).
    ready: bool,
    /// Its last `STATUS=` notification.
    status_text: Option<String>,
    /// Stops its notification reader (and removes the socket) when the record goes.
    _notify: Option<tokio_util::sync::DropGuard>,
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
    /// A queue poll is armed.
    polling: bool,
    /// Another primary took the listeners over (an upgrade): they are left as they are.
    handover: bool,
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
    /// The deadline of every message of hand-offs not wholly answered, by (listener, message).
    handoff_timers: HashMap<(u64, u64), (u32, delay_queue::Key)>,
    statuses: HashMap<u64, StatusWait>,
    scales: Vec<ScaleWait>,
    next_seq: u64,
    port0_shares: u32,
    stopping: Option<Stopping>,
    /// A private directory (0700) for program workers' notification sockets, made on first use.
    notify_dir: Option<tempfile::TempDir>,
    reloading: Option<reload::Reloading>,
    /// Reloads asked for during the running one.
    reload_queued: Vec<Reply<Result<ReloadReport, Error>>>,
    /// Why the last reload failed, until the next one.
    last_reload: Option<String>,
    /// Reuseport slots leaving (scale down), emptied before their sockets close.
    retiring: BTreeMap<usize, retire::Retiring>,
    retire_polling: bool,
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
        let (from_workers_tx, from_workers) = mpsc::channel(1024);
        let (accepts_tx, accepts) = mpsc::channel(1024);
        let registry = Registry::new(settings.policy, settings.limits.accept_ahead);
        let notifier = crate::systemd::Notifier::from_env();
        let mut timers = DelayQueue::new();
        if let Some(every) = notifier.as_ref().and_then(|n| n.watchdog_interval()) {
            timers.insert(Timer::Watchdog, every);
        }
        if notifier.is_some() {
            timers.insert(Timer::SystemdStatus, SYSTEMD_STATUS_EVERY);
        }
        let generation = settings.generation.max(1);
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
            workers: BTreeMap::new(),
            graveyard: VecDeque::new(),
            slots: BTreeMap::new(),
            next_id: 1,
            generation,
            registry,
            counts: Counts::default(),
            handoff_timers: HashMap::new(),
            statuses: HashMap::new(),
            scales: Vec::new(),
            next_seq: 0,
            port0_shares: 0,
            stopping: None,
            notify_dir: None,
            reloading: None,
            reload_queued: Vec::new(),
            last_reload: None,
            retiring: BTreeMap::new(),
            retire_polling: false,
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
                    Some(w) if w.kind == WorkerKind::Program => Err(Error::InvalidInput(format!(
                        "worker {worker} runs a program without netcluster's channel: it cannot \
                         receive messages"
                    ))),
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
            Command::Reload { reply } => self.reload(reply),
            Command::Adopt { adopt, reply } => {
                let _ = reply.send(self.adopt(adopt));
            }
            Command::Export { reply } => {
                let result = self.export().map(|listeners| crate::command::Export {
                    listeners,
                    generation: self.generation,
                    workers: self.slots.len(),
                });
                let _ = reply.send(result);
            }
            Command::AnnounceReady => self.took_over(),
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

    fn worker_said(&mut self, id: u32, msg: FromWorker) {
        if !self.workers.contains_key(&id) {
            return;
        }
        match msg {
            FromWorker::Message(m, handle) => self.message(id, m, handle),
            FromWorker::BadFrame(e) => self.violation(id, &format!("dropped a bad frame: {e}")),
            FromWorker::Closed => self.channel_closed(id),
            FromWorker::Notify(text) => self.notified(id, &text),
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

    fn message(&mut self, id: u32, msg: ToPrimary, handle: Option<crate::event::MessageHandle>) {
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
            // With no subscriber the event, and the handle with it, is dropped at once.
            ToPrimary::Message { data, .. } => self.emit(Event::Message {
                id,
                message: UserMessage::new(data, handle),
            }),
            ToPrimary::Disconnect => self.stopping_by_itself(id, true),
            ToPrimary::Stopping { signal } => {
                // Told once, and not for a worker already stopping at the primary's word: a
                // worker repeating itself does not fill the log.
                if self
                    .workers
                    .get(&id)
                    .is_some_and(|w| !w.stopped_itself && !w.expected_exit)
                {
                    let name = Signal::try_from(signal)
                        .map_or_else(|_| format!("signal {signal}"), |s| s.to_string());
                    tracing::info!(worker = id, "worker stopping on {name}");
                }
                self.stopping_by_itself(id, false);
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
                listener,
                accepted,
                refused,
            } => self.answered(id, listener, &accepted, &refused),
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

    fn timer(&mut self, t: Timer) {
        match t {
            Timer::Respawn { slot } => self.respawn(slot),
            Timer::Handoff {
                listener,
                worker,
                batch,
            } => {
                self.handoff_timers.remove(&(listener, batch));
                let expired = self
                    .registry
                    .get_mut(listener)
                    .and_then(|l| l.round_robin())
                    .is_some_and(|rr| rr.expire(worker, batch));
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
            Timer::ReadyAfter { worker } => self.mark_ready(worker, "its ready-after time passed"),
            Timer::ReloadReady { worker } => self.reload_ready_timeout(worker),
            Timer::StopGrace => self.close_listeners(),
            Timer::RetirePoll => self.retire_poll(),
            Timer::StopPoll => {
                if let Some(s) = &mut self.stopping {
                    s.polling = false;
                }
                self.check_flushed();
            }
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
            Timer::Watchdog => {
                if let Some(n) = &self.notifier {
                    n.watchdog();
                    if let Some(every) = n.watchdog_interval() {
                        self.timers.insert(Timer::Watchdog, every);
                    }
                }
            }
            Timer::SystemdStatus => {
                if self.notifier.is_some() {
                    self.send_systemd_status();
                    self.timers
                        .insert(Timer::SystemdStatus, SYSTEMD_STATUS_EVERY);
                }
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
