//! The [`Cluster`]: starts worker processes, answers their listen requests from the shared
//! [`Registry`], reports their lifecycle as [`Event`]s, and stops them gracefully.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use netcluster_protocol::channel::{self, Channel, ChannelError};
use netcluster_protocol::env;
use netcluster_protocol::handle::ListenError;
use netcluster_protocol::message::{
    BoundAddress, HandleKind, ListenKey, ListenParams, ListenTarget, PROTOCOL_VERSION, ToPrimary,
    ToWorker,
};
use netcluster_worker::net::{RemoteCount, Server, Socket, register_remote_count};
use nix::sys::signal::Signal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::os::fd::AsFd;
use tokio::sync::{mpsc, oneshot};

use crate::registry::{Member, Registry, SchedulingPolicy};
use crate::round_robin::ChannelLookup;

/// Default time workers get to finish open connections when they are stopped.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a cluster starts its workers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The program each worker runs (default: this executable).
    pub exec: PathBuf,
    /// Its arguments (default: this process's arguments).
    pub args: Vec<OsString>,
    /// Extra environment variables (the rest of the environment passes through).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory (default: inherited).
    pub cwd: Option<PathBuf>,
    /// How many workers [`Cluster::start`] forks.
    pub workers: usize,
    /// How long a stopping worker may finish its connections.
    pub drain_timeout: Duration,
    /// How listening sockets are shared (default round robin, as Node on Linux; overridden by
    /// the `NETCLUSTER_SCHED_POLICY` environment variable).
    pub policy: SchedulingPolicy,
    /// Node's `silent`: workers' stdin, stdout and stderr go to `/dev/null` instead of the
    /// primary's.
    pub silent: bool,
}

impl Settings {
    /// Settings that re-execute this program with its own arguments, one worker per core.
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn from_current_exe() -> io::Result<Settings> {
        Ok(Settings {
            exec: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            env: Vec::new(),
            cwd: None,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            policy: SchedulingPolicy::from_env().unwrap_or_default(),
            silent: false,
        })
    }
}

/// Where a worker is in its life (Node's `worker.state`): `None → Online → Listening →
/// Disconnecting → Disconnected → Dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Started, handshake not done yet.
    None,
    /// Handshake done.
    Online,
    /// Received at least one listening socket.
    Listening,
    /// Asked to disconnect (or disconnecting by itself): closing servers, finishing connections.
    Disconnecting,
    /// Its channel is closed; the process may still be finishing.
    Disconnected,
    /// The process has exited.
    Dead,
}

/// A user message from a worker, as sent with `Worker::send`; decode it with
/// [`UserMessage::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMessage(Vec<u8>);

impl UserMessage {
    /// Decodes the message as `T` (the type the worker sent).
    ///
    /// # Errors
    /// `InvalidData` naming `T` when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> io::Result<T> {
        postcard::from_bytes(&self.0).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message is not a {}: {e}", std::any::type_name::<T>()),
            )
        })
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Builds a [`Cluster`] (Node's `cluster.setupPrimary(settings)`).
///
/// ```no_run
/// use netcluster_primary::{Cluster, SchedulingPolicy};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let mut cluster = Cluster::builder()?
///     .workers(4)
///     .policy(SchedulingPolicy::RoundRobin)
///     .env("APP_MODE", "worker")
///     .build();
/// cluster.start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    settings: Settings,
}

impl ClusterBuilder {
    /// The program each worker runs (Node's `exec`).
    #[must_use]
    pub fn exec(mut self, program: impl Into<PathBuf>) -> Self {
        self.settings.exec = program.into();
        self
    }

    /// The workers' arguments (Node's `args`), replacing this process's.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.settings.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// One more environment variable for the workers (Node's `env`).
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.settings.env.push((key.into(), value.into()));
        self
    }

    /// The workers' working directory (Node's `cwd`).
    #[must_use]
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.settings.cwd = Some(dir.into());
        self
    }

    /// Node's `silent`: the workers' stdio goes to `/dev/null`.
    #[must_use]
    pub fn silent(mut self, silent: bool) -> Self {
        self.settings.silent = silent;
        self
    }

    /// How many workers [`Cluster::start`] forks.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = n;
        self
    }

    /// The scheduling policy (Node's `cluster.schedulingPolicy`).
    #[must_use]
    pub fn policy(mut self, policy: SchedulingPolicy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// How long a stopping worker may finish its connections.
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = timeout;
        self
    }

    /// The cluster, with no worker started yet.
    pub fn build(self) -> Cluster {
        Cluster::new(self.settings)
    }
}

/// Something that happened to a worker (Node's cluster events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `'fork'`: the process was started.
    Fork {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// `'online'`: the worker completed the handshake.
    Online {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// `'listening'`: the worker received a listening socket.
    Listening {
        /// Worker id.
        id: u32,
        /// The socket's address (`address.port()`, `address.family()` give Node's fields).
        address: BoundAddress,
        /// The primary's descriptor number, for `listen({fd})`.
        fd: Option<i32>,
    },
    /// `'message'`: the worker sent a user message.
    Message {
        /// Worker id.
        id: u32,
        /// The message.
        message: UserMessage,
    },
    /// `'disconnect'`: the worker's channel closed.
    Disconnect {
        /// Worker id.
        id: u32,
    },
    /// `'exit'`: the process exited.
    Exit {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
        /// Whether it exited after a disconnect (`worker.exitedAfterDisconnect`): true after
        /// `disconnect()`, false after `kill()` or a crash.
        exited_after_disconnect: bool,
    },
}

/// What the primary knows of a live worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker id (1, 2, …).
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Whether the handshake has completed.
    pub online: bool,
    /// Where it is in its life.
    pub state: WorkerState,
}

#[derive(Debug)]
struct Slot {
    pid: u32,
    state: WorkerState,
    exited_after_disconnect: bool,
    channel: Arc<Channel>,
}

#[derive(Debug, Default)]
struct State {
    registry: Mutex<Registry>,
    workers: Mutex<BTreeMap<u32, Slot>>,
    queries: Mutex<HashMap<u64, CountQuery>>,
    next_query: AtomicU64,
}

impl State {
    /// The state of a cluster with `policy`; its round-robin listeners reach the workers'
    /// channels through a weak reference back to it.
    fn new(policy: SchedulingPolicy) -> Arc<State> {
        Arc::new_cyclic(|weak: &std::sync::Weak<State>| {
            let weak = weak.clone();
            let lookup: ChannelLookup = Arc::new(move |id| {
                let state = weak.upgrade()?;
                let workers = lock(&state.workers);
                workers
                    .get(&id)
                    .filter(|s| s.state != WorkerState::Dead)
                    .map(|s| s.channel.clone())
            });
            State {
                registry: Mutex::new(Registry::new(policy, Some(lookup))),
                ..State::default()
            }
        })
    }
}

/// A connection count being gathered from the workers that share a socket.
#[derive(Debug)]
struct CountQuery {
    remaining: HashSet<u32>,
    total: u64,
    done: Option<oneshot::Sender<Result<u64, String>>>,
}

/// How long workers get to answer a connection count.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sums the open connections on `key` over the workers sharing it, by asking each one.
async fn count_connections(state: &State, key: &ListenKey) -> Result<u64, String> {
    let members = lock(&state.registry).worker_members(key);
    if members.is_empty() {
        return Ok(0);
    }
    let seq = state.next_query.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock(&state.queries).insert(
        seq,
        CountQuery {
            remaining: members.iter().copied().collect(),
            total: 0,
            done: Some(tx),
        },
    );
    for id in members {
        let channel = lock(&state.workers).get(&id).map(|s| s.channel.clone());
        let sent = match channel {
            Some(c) => c
                .send(
                    &ToWorker::CountQuery {
                        seq,
                        key: key.clone(),
                    },
                    &[],
                )
                .await
                .map_err(|e| e.to_string()),
            None => Err("gone".into()),
        };
        if let Err(e) = sent {
            fail_query(state, seq, format!("worker {id} cannot be asked: {e}"));
        }
    }
    match tokio::time::timeout(COUNT_TIMEOUT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the count was abandoned".into()),
        Err(_) => {
            let waiting = lock(&state.queries)
                .remove(&seq)
                .map(|q| q.remaining)
                .unwrap_or_default();
            Err(format!(
                "workers {waiting:?} did not answer within {COUNT_TIMEOUT:?}"
            ))
        }
    }
}

fn fail_query(state: &State, seq: u64, why: String) {
    if let Some(mut q) = lock(&state.queries).remove(&seq) {
        if let Some(done) = q.done.take() {
            let _ = done.send(Err(why));
        }
    }
}

/// How many sockets sent to worker `id` from the primary's server `origin` are still open
/// there; 0 once the worker is gone (its sockets went with it).
async fn count_sent(state: &State, id: u32, origin: u64) -> io::Result<usize> {
    let channel = lock(&state.workers)
        .get(&id)
        .filter(|s| !matches!(s.state, WorkerState::Dead | WorkerState::Disconnected))
        .map(|s| s.channel.clone());
    let Some(channel) = channel else {
        return Ok(0);
    };
    let seq = state.next_query.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock(&state.queries).insert(
        seq,
        CountQuery {
            remaining: HashSet::from([id]),
            total: 0,
            done: Some(tx),
        },
    );
    if let Err(e) = channel
        .send(&ToWorker::CountSent { seq, origin }, &[])
        .await
    {
        fail_query(state, seq, format!("worker {id} cannot be asked: {e}"));
    }
    let result = match tokio::time::timeout(COUNT_TIMEOUT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the count was abandoned".into()),
        Err(_) => {
            lock(&state.queries).remove(&seq);
            Err(format!(
                "worker {id} did not answer within {COUNT_TIMEOUT:?}"
            ))
        }
    };
    result
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        .map_err(|e| io::Error::other(format!("getConnections: {e}")))
}

/// Worker `id` answered count query `seq`.
fn count_reply(state: &State, id: u32, seq: u64, count: u64) {
    let mut queries = lock(&state.queries);
    let finished = match queries.get_mut(&seq) {
        Some(q) => {
            if q.remaining.remove(&id) {
                q.total += count;
            }
            q.remaining.is_empty()
        }
        None => false,
    };
    if finished {
        if let Some(mut q) = queries.remove(&seq) {
            if let Some(done) = q.done.take() {
                let _ = done.send(Ok(q.total));
            }
        }
    }
}

/// Worker `id` is gone: every count still waiting for it fails, as Node's
/// `ERR_CHILD_CLOSED_BEFORE_REPLY`.
fn fail_queries_of(state: &State, id: u32) {
    let waiting: Vec<u64> = lock(&state.queries)
        .iter()
        .filter(|(_, q)| q.remaining.contains(&id))
        .map(|(&seq, _)| seq)
        .collect();
    for seq in waiting {
        fail_query(
            state,
            seq,
            format!("worker {id} exited before replying (ERR_CHILD_CLOSED_BEFORE_REPLY)"),
        );
    }
}

/// A primary and its workers.
///
/// ```no_run
/// use netcluster_primary::{Cluster, Settings};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let mut settings = Settings::from_current_exe()?;
/// settings.workers = 4;
/// let mut cluster = Cluster::new(settings);
/// cluster.start()?;
/// tokio::signal::ctrl_c().await?;
/// cluster.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Cluster {
    settings: Settings,
    state: Arc<State>,
    next_id: u32,
    port0_shares: u32,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
}

impl Cluster {
    /// A cluster with these settings and no workers yet.
    pub fn new(settings: Settings) -> Cluster {
        let policy = settings.policy;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Cluster {
            settings,
            state: State::new(policy),
            next_id: 1,
            port0_shares: 0,
            events_tx,
            events_rx,
        }
    }

    /// A builder whose defaults re-execute this program with its own arguments, one worker
    /// per core, round robin (or `NETCLUSTER_SCHED_POLICY`).
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn builder() -> io::Result<ClusterBuilder> {
        Ok(ClusterBuilder {
            settings: Settings::from_current_exe()?,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Binds `target` in the primary now (as the first worker's listen would) and keeps it open
    /// for the cluster's lifetime; workers that listen on the same key share it. Returns the
    /// bound address, with the real port for port 0.
    ///
    /// Port-0 targets are numbered in call order, like a worker's port-0 listens: a worker
    /// whose Nth `listen(0)` matches the Nth port-0 share gets that socket.
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub fn share(
        &mut self,
        target: ListenTarget,
        params: &ListenParams,
    ) -> Result<BoundAddress, ListenError> {
        let ordinal = match &target {
            ListenTarget::Tcp(a) if a.port() == 0 => self.port0_shares,
            ListenTarget::TcpAny(0) => self.port0_shares,
            _ => 0,
        };
        let key = ListenKey { target, ordinal };
        let address = lock(&self.state.registry)
            .acquire(&key, params, Member::Primary)?
            .address;
        if matches!(&key.target, ListenTarget::Tcp(a) if a.port() == 0)
            || key.target == ListenTarget::TcpAny(0)
        {
            self.port0_shares += 1;
        }
        Ok(address)
    }

    /// The live workers (every state but [`WorkerState::Dead`]).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        lock(&self.state.workers)
            .iter()
            .filter(|(_, s)| s.state != WorkerState::Dead)
            .map(|(&id, s)| WorkerInfo {
                id,
                pid: s.pid,
                online: s.state != WorkerState::None,
                state: s.state,
            })
            .collect()
    }

    /// A handle to worker `id` (live or dead), `None` if no such worker was forked.
    pub fn worker(&self, id: u32) -> Option<WorkerHandle> {
        lock(&self.state.workers)
            .contains_key(&id)
            .then(|| WorkerHandle {
                id,
                state: self.state.clone(),
                drain: self.settings.drain_timeout,
            })
    }

    /// `server.getConnections()` for the whole cluster: the open connections on the socket
    /// bound to `address`, summed over every worker that shares it (Node cannot do this:
    /// nodejs/node#48333). The primary asks each worker when called rather than having workers
    /// push a message on every accept and close, so the connection hot path carries no extra
    /// traffic.
    ///
    /// # Errors
    /// When a worker exits before replying (Node's `ERR_CHILD_CLOSED_BEFORE_REPLY`) or does
    /// not answer within 5 s; `NotFound` when no shared socket has that address.
    pub async fn get_connections(&self, address: &BoundAddress) -> io::Result<usize> {
        let keys = lock(&self.state.registry).keys_at(address);
        if keys.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("getConnections: no shared socket is bound to {address}"),
            ));
        }
        let mut total = 0u64;
        for key in keys {
            total += count_connections(&self.state, &key)
                .await
                .map_err(|e| io::Error::other(format!("getConnections {address}: {e}")))?;
        }
        Ok(usize::try_from(total).unwrap_or(usize::MAX))
    }

    fn live(&self) -> usize {
        lock(&self.state.workers)
            .values()
            .filter(|s| s.state != WorkerState::Dead)
            .count()
    }

    /// Forks [`Settings::workers`] workers.
    ///
    /// # Errors
    /// The first worker that cannot be started.
    pub fn start(&mut self) -> io::Result<Vec<WorkerInfo>> {
        (0..self.settings.workers).map(|_| self.fork()).collect()
    }

    /// Starts one worker process: re-executes [`Settings::exec`] with the channel at fd 3 and
    /// the worker id in the environment.
    ///
    /// # Errors
    /// When the process cannot be started (the message names the program).
    pub fn fork(&mut self) -> io::Result<WorkerInfo> {
        let id = self.next_id;
        self.next_id += 1;
        let (ours, theirs) = channel::seqpacket_pair()?;
        let mut cmd = tokio::process::Command::new(&self.settings.exec);
        cmd.args(&self.settings.args)
            .envs(self.settings.env.iter().map(|(k, v)| (k, v)))
            .env(env::WORKER_ID, id.to_string())
            .env(env::CHANNEL_FD, env::DEFAULT_CHANNEL_FD.to_string())
            .env(env::PRIMARY_PID, std::process::id().to_string())
            .kill_on_drop(true);
        if self.settings.silent {
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
        if let Some(cwd) = &self.settings.cwd {
            cmd.current_dir(cwd);
        }
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: theirs,
            child_fd: env::DEFAULT_CHANNEL_FD,
        }])
        .map_err(io::Error::other)?;
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start worker {id} ({}): {e}",
                    self.settings.exec.display()
                ),
            )
        })?;
        // Dropping the command closes our copy of the worker's end of the channel, so the
        // channel reports EOF when the worker dies.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let channel = Arc::new(Channel::from_fd(ours).map_err(io::Error::other)?);
        lock(&self.state.workers).insert(
            id,
            Slot {
                pid,
                state: WorkerState::None,
                exited_after_disconnect: false,
                channel: channel.clone(),
            },
        );
        let _ = self.events_tx.send(Event::Fork { id, pid });
        tokio::spawn(supervise(
            self.state.clone(),
            id,
            pid,
            child,
            channel,
            self.events_tx.clone(),
            self.settings.drain_timeout,
        ));
        Ok(WorkerInfo {
            id,
            pid,
            online: false,
            state: WorkerState::None,
        })
    }

    /// The next worker event; never `None` while the cluster exists.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events_rx.recv().await
    }

    /// Disconnects every worker (`cluster.disconnect()`) and completes when they have exited:
    /// each is told to stop accepting and finish its connections within
    /// [`Settings::drain_timeout`]; a worker still alive a little after that is killed. The
    /// primary closes its shared sockets (removing the Unix socket files it created) before
    /// telling the workers, so the listeners are gone once the workers close their copies.
    /// Returns the exit events of the workers.
    pub async fn disconnect(&mut self) -> Vec<Event> {
        let drain = self.settings.drain_timeout;
        let handles: Vec<WorkerHandle> = lock(&self.state.workers)
            .iter()
            .filter(|(_, s)| s.state != WorkerState::Dead)
            .map(|(&id, _)| WorkerHandle {
                id,
                state: self.state.clone(),
                drain,
            })
            .collect();
        // Stop accepting cluster-wide first: once the workers close their copies, no socket is
        // left in which new connections could queue up unanswered.
        lock(&self.state.registry).close_all();
        for handle in &handles {
            if let Err(e) = handle.disconnect().await {
                tracing::debug!(worker = handle.id, "cannot send Shutdown: {e}");
            }
        }
        let mut exits = Vec::new();
        let grace = drain + Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + grace;
        while self.live() > 0 {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(ev @ Event::Exit { .. })) => exits.push(ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let stragglers: Vec<(u32, u32)> = lock(&self.state.workers)
            .iter()
            .filter(|(_, s)| s.state != WorkerState::Dead)
            .map(|(&id, s)| (id, s.pid))
            .collect();
        for (id, pid) in stragglers {
            tracing::warn!(
                worker = id,
                pid,
                "still running {grace:?} after Shutdown; killing"
            );
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let kill_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.live() > 0 {
            match tokio::time::timeout_at(kill_deadline, self.events_rx.recv()).await {
                Ok(Some(ev @ Event::Exit { .. })) => exits.push(ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        exits
    }

    /// Another name for [`Cluster::disconnect`]: the graceful stop on `SIGTERM`.
    pub async fn shutdown(&mut self) -> Vec<Event> {
        self.disconnect().await
    }
}

/// A handle to send to a worker with [`WorkerHandle::send_handle`].
#[derive(Debug)]
pub enum SendHandle {
    /// A listening server (its socket is duplicated; the server goes on here).
    Server(Server),
    /// A connected socket (boxed: a `Socket` is much larger than a server handle).
    Socket(Box<Socket>),
}

/// A worker, as the primary sees it (Node's `cluster.workers[id]`). Cheap to clone; stays
/// valid after the worker died.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    id: u32,
    state: Arc<State>,
    drain: Duration,
}

impl WorkerHandle {
    /// The worker id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.state.workers).get(&self.id).map(|s| s.pid)
    }

    /// Where the worker is in its life.
    pub fn state(&self) -> WorkerState {
        lock(&self.state.workers)
            .get(&self.id)
            .map_or(WorkerState::Dead, |s| s.state)
    }

    /// `worker.exitedAfterDisconnect`: true once `disconnect()` was called (by either side),
    /// false after `kill()`.
    pub fn exited_after_disconnect(&self) -> bool {
        lock(&self.state.workers)
            .get(&self.id)
            .is_some_and(|s| s.exited_after_disconnect)
    }

    fn channel(&self) -> io::Result<Arc<Channel>> {
        lock(&self.state.workers)
            .get(&self.id)
            .filter(|s| !matches!(s.state, WorkerState::Dead | WorkerState::Disconnected))
            .map(|s| s.channel.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("worker {} is disconnected", self.id),
                )
            })
    }

    /// Sends a user message (`worker.send(message)`); the worker receives it with
    /// `Worker::recv`.
    ///
    /// # Errors
    /// `InvalidData` when the value cannot be encoded or is larger than a frame (64 KiB);
    /// `NotConnected` when the worker is disconnected.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> io::Result<()> {
        let data = postcard::to_allocvec(message)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message: {e}")))?;
        self.channel()?
            .send(&ToWorker::Message { data }, &[])
            .await
            .map_err(|e| io::Error::other(format!("worker {}: send: {e}", self.id)))
    }

    /// `worker.send(message, handle)`: sends a user message with a listening socket or a
    /// connected socket, which the worker receives with `Worker::recv_with_handle` as a
    /// `ReceivedHandle::Server` or `ReceivedHandle::Socket`.
    ///
    /// A socket follows Node's rule: with `keep_open` false it is closed here once sent (the
    /// sender stops counting it), the worker counts it until it closes, and the
    /// `getConnections()` of the server that accepted it here ([`Socket::origin`]) includes
    /// it for as long as the worker keeps it open. A server handle stays open here.
    ///
    /// # Errors
    /// `NotConnected` when the worker is disconnected; `InvalidInput` when the server is not
    /// listening or the socket has no connection; the message's encoding errors.
    pub async fn send_handle<T: Serialize + ?Sized>(
        &self,
        message: &T,
        handle: SendHandle,
        keep_open: bool,
    ) -> io::Result<()> {
        let data = postcard::to_allocvec(message)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message: {e}")))?;
        let channel = self.channel()?;
        match handle {
            SendHandle::Server(server) => {
                let address = server.address().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "send_handle: the server is not listening",
                    )
                })?;
                let fd = server.handle()?;
                let msg = ToWorker::Handle {
                    data,
                    kind: HandleKind::Server { address },
                };
                channel
                    .send(&msg, &[fd.as_fd()])
                    .await
                    .map_err(|e| io::Error::other(format!("worker {}: send_handle: {e}", self.id)))
            }
            SendHandle::Socket(mut socket) => {
                let origin = socket.origin();
                let Some(fd) = socket.fd() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "send_handle: the socket has no connection",
                    ));
                };
                let msg = ToWorker::Handle {
                    data,
                    kind: HandleKind::Socket { origin },
                };
                channel.send(&msg, &[fd]).await.map_err(|e| {
                    io::Error::other(format!("worker {}: send_handle: {e}", self.id))
                })?;
                if let Some(origin) = origin {
                    let state = Arc::downgrade(&self.state);
                    let id = self.id;
                    let count: RemoteCount = Arc::new(move || {
                        let state = state.clone();
                        Box::pin(async move {
                            match state.upgrade() {
                                Some(state) => count_sent(&state, id, origin).await,
                                None => Ok(0),
                            }
                        })
                    });
                    register_remote_count(origin, u64::from(id), count);
                }
                if !keep_open {
                    socket.destroy(None);
                }
                Ok(())
            }
        }
    }

    /// `worker.disconnect()`: the worker closes its servers, waits for its connections to end
    /// (at most the drain deadline) and exits; [`WorkerHandle::exited_after_disconnect`]
    /// becomes true.
    ///
    /// # Errors
    /// `NotConnected` when the worker is already disconnected.
    pub async fn disconnect(&self) -> io::Result<()> {
        let channel = {
            let mut workers = lock(&self.state.workers);
            let slot = workers
                .get_mut(&self.id)
                .filter(|s| !matches!(s.state, WorkerState::Dead | WorkerState::Disconnected))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("worker {} is disconnected", self.id),
                    )
                })?;
            slot.exited_after_disconnect = true;
            slot.state = WorkerState::Disconnecting;
            slot.channel.clone()
        };
        let drain_timeout_ms = u64::try_from(self.drain.as_millis()).unwrap_or(u64::MAX);
        channel
            .send(&ToWorker::Shutdown { drain_timeout_ms }, &[])
            .await
            .map_err(|e| io::Error::other(format!("worker {}: disconnect: {e}", self.id)))
    }

    /// `worker.kill(signal)`: sends `signal` to the process;
    /// [`WorkerHandle::exited_after_disconnect`] stays false.
    ///
    /// # Errors
    /// `NotFound` when the worker is dead; the error of `kill(2)`.
    pub fn kill(&self, signal: Signal) -> io::Result<()> {
        let pid = {
            let mut workers = lock(&self.state.workers);
            let slot = workers
                .get_mut(&self.id)
                .filter(|s| s.state != WorkerState::Dead)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("worker {} is dead", self.id),
                    )
                })?;
            slot.exited_after_disconnect = false;
            slot.pid
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("kill worker {}: {e}", self.id),
            )
        })
    }
}

/// One worker's task: answers its messages until it exits.
async fn supervise(
    state: Arc<State>,
    id: u32,
    pid: u32,
    mut child: tokio::process::Child,
    channel: Arc<Channel>,
    events: mpsc::UnboundedSender<Event>,
    drain: Duration,
) {
    let mut open = true;
    let mut status = None;
    while status.is_none() {
        tokio::select! {
            // Messages first: what a worker said before it exited (a Disconnect, say) is
            // handled before its exit is.
            biased;
            msg = channel.recv::<ToPrimary>(), if open => {
                open = receive(&state, id, pid, &channel, msg, &events, drain).await;
            }
            s = child.wait() => status = Some(s),
        }
    }
    // The process is gone: read what it sent before it went. Its end of the channel is closed,
    // so this reaches the end quickly (the time limit covers a descendant that kept a copy).
    while open {
        match tokio::time::timeout(Duration::from_secs(1), channel.recv::<ToPrimary>()).await {
            Ok(msg) => open = receive(&state, id, pid, &channel, msg, &events, drain).await,
            Err(_) => break,
        }
    }
    let status = status.unwrap_or_else(|| Err(io::Error::other("no exit status")));
    lock(&state.registry).leave_all(Member::Worker(id));
    fail_queries_of(&state, id);
    if open {
        // The process is gone, so is its end of the channel.
        let _ = events.send(Event::Disconnect { id });
    }
    let exited_after_disconnect = {
        let mut workers = lock(&state.workers);
        match workers.get_mut(&id) {
            Some(slot) => {
                slot.state = WorkerState::Dead;
                slot.exited_after_disconnect
            }
            None => false,
        }
    };
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(e) => {
            tracing::warn!(worker = id, pid, "cannot wait for the worker: {e}");
            (None, None)
        }
    };
    tracing::info!(
        worker = id,
        pid,
        ?code,
        ?signal,
        exited_after_disconnect,
        "worker exited"
    );
    let _ = events.send(Event::Exit {
        id,
        pid,
        code,
        signal,
        exited_after_disconnect,
    });
}

/// Handles one receive from a worker's channel; returns whether the channel is still open.
async fn receive(
    state: &Arc<State>,
    id: u32,
    pid: u32,
    channel: &Arc<Channel>,
    msg: Result<Option<(ToPrimary, Vec<std::os::fd::OwnedFd>)>, ChannelError>,
    events: &mpsc::UnboundedSender<Event>,
    drain: Duration,
) -> bool {
    match msg {
        Ok(Some((msg, _no_fds))) => {
            handle(state, id, pid, channel, msg, events, drain).await;
            true
        }
        Err(e) if e.is_bad_frame() => {
            // One bad frame never takes the primary down; the rest of the channel is good.
            tracing::warn!(worker = id, pid, "dropped a bad frame: {e}");
            true
        }
        closed => {
            match closed {
                Err(e) => tracing::warn!(worker = id, pid, "channel failed: {e}"),
                _ => tracing::debug!(worker = id, "channel closed"),
            }
            lock(&state.registry).leave_all(Member::Worker(id));
            set_state(state, id, WorkerState::Disconnected);
            fail_queries_of(state, id);
            let _ = events.send(Event::Disconnect { id });
            false
        }
    }
}

async fn handle(
    state: &Arc<State>,
    id: u32,
    pid: u32,
    channel: &Arc<Channel>,
    msg: ToPrimary,
    events: &mpsc::UnboundedSender<Event>,
    drain: Duration,
) {
    match msg {
        ToPrimary::Hello {
            version,
            pid: their_pid,
            worker_id,
        } => {
            if worker_id != id || their_pid != pid {
                tracing::warn!(
                    worker = id,
                    pid,
                    "Hello claims worker {worker_id} pid {their_pid}; using what the primary knows"
                );
            }
            let welcome = ToWorker::Welcome {
                version: PROTOCOL_VERSION,
                drain_timeout_ms: u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
            };
            if version != PROTOCOL_VERSION {
                tracing::warn!(
                    worker = id,
                    "speaks protocol {version}, primary {PROTOCOL_VERSION}"
                );
            }
            if let Err(e) = channel.send(&welcome, &[]).await {
                tracing::warn!(worker = id, "cannot welcome: {e}");
                return;
            }
            set_state(state, id, WorkerState::Online);
            tracing::info!(worker = id, pid, "worker online");
            let _ = events.send(Event::Online { id, pid });
        }
        ToPrimary::Listen { seq, key, params } => {
            let result = lock(&state.registry).acquire(&key, &params, Member::Worker(id));
            match result {
                Ok(granted) => {
                    let address = granted.address.clone();
                    let reply = ToWorker::ListenOk {
                        seq,
                        address: address.clone(),
                        grant: granted.grant,
                    };
                    let fds: Vec<std::os::fd::BorrowedFd<'_>> =
                        granted.fd.iter().map(std::os::fd::AsFd::as_fd).collect();
                    match channel.send(&reply, &fds).await {
                        Ok(()) => {
                            tracing::info!(worker = id, %address, grant = ?granted.grant, "worker listening");
                            if let Some(rr) = &granted.round_robin {
                                rr.add(id);
                            }
                            set_state(state, id, WorkerState::Listening);
                            let fd = match key.target {
                                ListenTarget::Fd(fd) => Some(fd),
                                _ => None,
                            };
                            let _ = events.send(Event::Listening { id, address, fd });
                        }
                        Err(e) => {
                            tracing::warn!(worker = id, "cannot send listener: {e}");
                            lock(&state.registry).leave(&key, Member::Worker(id));
                        }
                    }
                }
                Err(e) => {
                    tracing::info!(worker = id, "{e}");
                    let reply = ToWorker::ListenErr {
                        seq,
                        address: e.address.clone(),
                        errno: e.errno().unwrap_or(0),
                        message: e.source.to_string(),
                    };
                    if let Err(e) = channel.send(&reply, &[]).await {
                        tracing::warn!(worker = id, "cannot send listen error: {e}");
                    }
                }
            }
        }
        ToPrimary::Close { key } => {
            lock(&state.registry).leave(&key, Member::Worker(id));
        }
        ToPrimary::Message { data } => {
            let _ = events.send(Event::Message {
                id,
                message: UserMessage(data),
            });
        }
        ToPrimary::CountReply { seq, count } => count_reply(state, id, seq, count),
        ToPrimary::Accepted {
            handle,
            seq,
            accepted,
        } => {
            let rr = lock(&state.registry).round_robin(handle);
            match rr {
                Some(rr) => rr.ack(id, seq, accepted),
                None => tracing::debug!(worker = id, handle, "answer for a closed listener"),
            }
        }
        ToPrimary::CountRequest { seq, key } => {
            // Gathered in its own task: this worker's own reply arrives through this very
            // loop, which must keep reading.
            let state = state.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                let result = count_connections(&state, &key).await;
                if let Err(e) = channel
                    .send(&ToWorker::CountResult { seq, result }, &[])
                    .await
                {
                    tracing::debug!(worker = id, "cannot answer a count request: {e}");
                }
            });
        }
        ToPrimary::Disconnect => {
            if let Some(slot) = lock(&state.workers).get_mut(&id) {
                slot.exited_after_disconnect = true;
                slot.state = WorkerState::Disconnecting;
            }
        }
    }
}

/// Moves worker `id` to `to`, never backwards out of the disconnect states (a late `Listening`
/// does not undo a `Disconnecting`).
fn set_state(state: &State, id: u32, to: WorkerState) {
    if let Some(slot) = lock(&state.workers).get_mut(&id) {
        let rank = |s: WorkerState| match s {
            WorkerState::None => 0,
            WorkerState::Online => 1,
            WorkerState::Listening => 2,
            WorkerState::Disconnecting => 3,
            WorkerState::Disconnected => 4,
            WorkerState::Dead => 5,
        };
        if rank(to) >= rank(slot.state) {
            slot.state = to;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(state: &State, seq: u64, workers: &[u32]) -> oneshot::Receiver<Result<u64, String>> {
        let (tx, rx) = oneshot::channel();
        lock(&state.queries).insert(
            seq,
            CountQuery {
                remaining: workers.iter().copied().collect(),
                total: 0,
                done: Some(tx),
            },
        );
        rx
    }

    #[tokio::test]
    async fn counts_add_up_over_the_workers_that_answer() {
        let state = State::default();
        let rx = query(&state, 1, &[1, 2, 3]);
        count_reply(&state, 1, 1, 10);
        count_reply(&state, 1, 1, 10); // a duplicate answer counts once
        count_reply(&state, 2, 1, 5);
        count_reply(&state, 9, 1, 100); // not asked
        count_reply(&state, 3, 1, 0);
        assert_eq!(rx.await.expect("done"), Ok(15));
        assert!(lock(&state.queries).is_empty());
    }

    #[tokio::test]
    async fn a_worker_that_exits_before_replying_fails_the_count() {
        let state = State::default();
        let rx = query(&state, 7, &[1, 2]);
        let other = query(&state, 8, &[1]);
        count_reply(&state, 1, 7, 3);
        fail_queries_of(&state, 2);
        let err = rx.await.expect("done").expect_err("worker 2 died");
        assert_eq!(
            err,
            "worker 2 exited before replying (ERR_CHILD_CLOSED_BEFORE_REPLY)"
        );
        // Queries that did not wait for worker 2 go on.
        count_reply(&state, 1, 8, 4);
        assert_eq!(other.await.expect("done"), Ok(4));
    }
}
