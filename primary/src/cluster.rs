//! The [`Cluster`]: starts worker processes, answers their listen requests from the shared
//! [`Registry`], reports their lifecycle as [`Event`]s, and stops them gracefully.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use netcluster_protocol::channel::{self, Channel};
use netcluster_protocol::env;
use netcluster_protocol::handle::ListenError;
use netcluster_protocol::message::{
    BoundAddress, ListenKey, ListenParams, ListenTarget, PROTOCOL_VERSION, ToPrimary, ToWorker,
};
use tokio::sync::mpsc;

use crate::registry::{Member, Registry};

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
        })
    }
}

/// Something that happened to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The process was started.
    Fork {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// The worker completed the handshake.
    Online {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// The worker received a listening socket.
    Listening {
        /// Worker id.
        id: u32,
        /// The socket's address.
        address: BoundAddress,
    },
    /// The process exited.
    Exit {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
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
}

#[derive(Debug)]
struct Slot {
    pid: u32,
    online: bool,
    channel: Arc<Channel>,
}

#[derive(Debug, Default)]
struct State {
    registry: Mutex<Registry>,
    workers: Mutex<BTreeMap<u32, Slot>>,
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
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Cluster {
            settings,
            state: Arc::new(State::default()),
            next_id: 1,
            port0_shares: 0,
            events_tx,
            events_rx,
        }
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
        let (_dup, address) = lock(&self.state.registry).acquire(&key, params, Member::Primary)?;
        if matches!(&key.target, ListenTarget::Tcp(a) if a.port() == 0)
            || key.target == ListenTarget::TcpAny(0)
        {
            self.port0_shares += 1;
        }
        Ok(address)
    }

    /// The live workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        lock(&self.state.workers)
            .iter()
            .map(|(&id, s)| WorkerInfo {
                id,
                pid: s.pid,
                online: s.online,
            })
            .collect()
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
            .kill_on_drop(true);
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
                online: false,
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
        })
    }

    /// The next worker event; never `None` while the cluster exists.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events_rx.recv().await
    }

    /// Stops every worker gracefully: each is told to stop accepting and finish its connections
    /// within [`Settings::drain_timeout`]; a worker still alive a little after that is killed.
    /// The primary closes its shared sockets (removing the Unix socket files it created) before
    /// telling the workers, so the listeners are gone once the workers close their copies.
    /// Returns the exit events of the workers.
    pub async fn shutdown(&mut self) -> Vec<Event> {
        let drain = self.settings.drain_timeout;
        let channels: Vec<(u32, Arc<Channel>)> = lock(&self.state.workers)
            .iter()
            .map(|(&id, s)| (id, s.channel.clone()))
            .collect();
        let drain_timeout_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
        // Stop accepting cluster-wide first: once the workers close their copies, no socket is
        // left in which new connections could queue up unanswered.
        lock(&self.state.registry).close_all();
        for (id, channel) in &channels {
            if let Err(e) = channel
                .send(&ToWorker::Shutdown { drain_timeout_ms }, &[])
                .await
            {
                tracing::debug!(worker = id, "cannot send Shutdown: {e}");
            }
        }
        let mut exits = Vec::new();
        let grace = drain + Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + grace;
        while !lock(&self.state.workers).is_empty() {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(ev @ Event::Exit { .. })) => exits.push(ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let stragglers: Vec<(u32, u32)> = lock(&self.state.workers)
            .iter()
            .map(|(&id, s)| (id, s.pid))
            .collect();
        for (id, pid) in stragglers {
            tracing::warn!(
                worker = id,
                pid,
                "still running {grace:?} after Shutdown; killing"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let kill_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !lock(&self.state.workers).is_empty() {
            match tokio::time::timeout_at(kill_deadline, self.events_rx.recv()).await {
                Ok(Some(ev @ Event::Exit { .. })) => exits.push(ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        exits
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
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            msg = channel.recv::<ToPrimary>(), if open => match msg {
                Ok(Some((msg, _no_fds))) => {
                    handle(&state, id, pid, &channel, msg, &events, drain).await;
                }
                Ok(None) => {
                    open = false;
                    tracing::debug!(worker = id, "channel closed");
                    lock(&state.registry).leave_all(Member::Worker(id));
                }
                Err(e) if e.is_bad_frame() => {
                    // One bad frame never takes the primary down; the rest of the channel is
                    // still good.
                    tracing::warn!(worker = id, pid, "dropped a bad frame: {e}");
                }
                Err(e) => {
                    open = false;
                    tracing::warn!(worker = id, pid, "channel failed: {e}");
                    lock(&state.registry).leave_all(Member::Worker(id));
                }
            }
        }
    };
    lock(&state.registry).leave_all(Member::Worker(id));
    lock(&state.workers).remove(&id);
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(e) => {
            tracing::warn!(worker = id, pid, "cannot wait for the worker: {e}");
            (None, None)
        }
    };
    tracing::info!(worker = id, pid, ?code, ?signal, "worker exited");
    let _ = events.send(Event::Exit {
        id,
        pid,
        code,
        signal,
    });
}

async fn handle(
    state: &State,
    id: u32,
    pid: u32,
    channel: &Channel,
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
            if let Some(slot) = lock(&state.workers).get_mut(&id) {
                slot.online = true;
            }
            tracing::info!(worker = id, pid, "worker online");
            let _ = events.send(Event::Online { id, pid });
        }
        ToPrimary::Listen { seq, key, params } => {
            let result = lock(&state.registry).acquire(&key, &params, Member::Worker(id));
            match result {
                Ok((fd, address)) => {
                    let reply = ToWorker::ListenOk {
                        seq,
                        address: address.clone(),
                    };
                    match channel.send(&reply, &[std::os::fd::AsFd::as_fd(&fd)]).await {
                        Ok(()) => {
                            tracing::debug!(worker = id, %address, "shared listener sent");
                            let _ = events.send(Event::Listening { id, address });
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
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
