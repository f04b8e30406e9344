//! [`Settings`]: how a cluster starts its workers, how it restarts them, and the limits it
//! holds every worker to; [`ClusterBuilder`] to make them.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::registry::SchedulingPolicy;

/// Default time workers get to finish open connections when they are stopped.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The most workers a cluster runs.
pub const MAX_WORKERS: usize = 4096;

/// Restart delays of a slot whose worker keeps dying: `initial`, doubling per failure, at most
/// `max`; back to `initial` once a worker has stayed up for `reset_after`.
///
/// ```
/// use netcluster_primary::Backoff;
/// use std::time::Duration;
/// let b = Backoff::default();
/// assert_eq!(b.delay(0), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(800));
/// assert_eq!(b.delay(40), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A worker that stays up this long resets its slot's delay.
    pub reset_after: Duration,
    /// After this many exits (or failed starts) in a row, none of which lasted `reset_after`,
    /// the slot is given up on: it is shown as failed and not started again until a reload
    /// (pm2's `max_restarts`, supervisord's `startretries`). `None`: never give up.
    pub give_up_after: Option<u32>,
}

impl Default for Backoff {
    /// 100 ms, doubling, capped at 30 s; reset after 10 s of uptime; never give up (Node's
    /// cluster does not; `netcluster serve` gives up after 10, `--max-restarts`).
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
            give_up_after: None,
        }
    }
}

impl Backoff {
    /// The delay before restart number `attempt` (0 for the first restart after a stable run).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// What one worker can make the primary hold, and how many bad things it may do before it is
/// killed and replaced. See `docs/reliability.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Listen keys one worker may hold.
    pub listen_keys: usize,
    /// Count requests one worker may have in flight.
    pub requests: u32,
    /// Messages queued for one worker that it has not read yet; past this the worker is
    /// unresponsive: nothing more is queued for it and it leaves round-robin rotation.
    pub queue: usize,
    /// Bad frames and over-limit requests a worker may send before it is killed.
    pub violations: u32,
    /// Events kept for a subscriber that reads slowly (a slower one gets [`Event::Lagged`]).
    /// With user messages of up to 64 KiB, this bounds what a flood of them can make the
    /// primary hold for a subscriber that does not read: 256 × 64 KiB = 16 MiB by default.
    ///
    /// [`Event::Lagged`]: crate::Event::Lagged
    pub events: usize,
    /// Connections a round-robin listener accepts ahead of its workers (the rest wait in the
    /// kernel's backlog), on top of a window of hand-offs per worker in rotation.
    pub accept_ahead: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            listen_keys: 256,
            requests: 16,
            queue: 1024,
            violations: 32,
            events: 256,
            accept_ahead: 16,
        }
    }
}

/// Deadlines the primary holds workers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A round-robin hand-off not answered within this goes to another worker, and the silent
    /// worker leaves the rotation until it answers a ping.
    pub handoff: Duration,
    /// A worker that does not answer a ping within this is killed and replaced.
    pub ping: Duration,
    /// Workers being started (scale, start) must be ready within this.
    pub ready: Duration,
    /// Workers must answer a connection count within this.
    pub count: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handoff: Duration::from_secs(5),
            ping: Duration::from_secs(5),
            ready: Duration::from_secs(60),
            count: Duration::from_secs(5),
        }
    }
}

/// What kind of program the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerKind {
    /// A program that uses netcluster's cluster API (`netcluster::net`): it gets the channel
    /// and every feature of the protocol (round robin, shared listens, counts, messages).
    #[default]
    Native,
    /// Any program: it gets its listeners the systemd way (descriptors 3, 4, … with
    /// `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`) and a `NOTIFY_SOCKET` of its own, and
    /// nothing else of the primary's. Round robin is not available (it needs the protocol).
    Program,
}

/// When a program worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// When it sends `READY=1` to its `NOTIFY_SOCKET` (from any of its processes:
    /// `systemd-notify --ready` in a script works).
    #[default]
    Notify,
    /// When it is still running this long after it started (einhorn's timer), or sooner if it
    /// sends `READY=1`.
    After(Duration),
}

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
    /// How many workers [`Cluster::start`](crate::Cluster::start) forks.
    pub workers: usize,
    /// How long a stopping worker may finish its connections.
    pub drain_timeout: Duration,
    /// How listening sockets are shared (default round robin, as Node on Linux; overridden by
    /// the `NETCLUSTER_SCHED_POLICY` environment variable).
    pub policy: SchedulingPolicy,
    /// Node's `silent`: workers' stdin, stdout and stderr go to `/dev/null` instead of the
    /// primary's.
    pub silent: bool,
    /// Restart a worker that exits when nobody asked it to, in the same slot, with these
    /// delays; `None` leaves it dead (Node's behaviour).
    pub respawn: Option<Backoff>,
    /// What one worker can make the primary hold.
    pub limits: Limits,
    /// Deadlines workers are held to.
    pub timeouts: Timeouts,
    /// Descriptors workers may name in `listen({fd})` besides the ones this process inherited
    /// ([`inherited_fds`]); each must be a listening socket.
    pub given_fds: Vec<Arc<OwnedFd>>,
    /// Native workers (the default) or any program.
    pub kind: WorkerKind,
    /// When a program worker is ready.
    pub readiness: Readiness,
    /// The signal that asks a program worker to stop (it is killed at the drain deadline).
    pub stop_signal: nix::sys::signal::Signal,
    /// Prefix each line a program worker writes to stdout or stderr with `[slot N]`.
    pub prefix_output: bool,
    /// How many slots a rolling reload replaces at a time.
    pub reload_batch: usize,
    /// Give pinned listeners to systemd's file-descriptor store (default: when systemd keeps
    /// one for this service, `$FDSTORE`), so a primary systemd restarts gets them back.
    pub fd_store: bool,
    /// Tell systemd `READY=1` the first time every slot's worker is ready (default true). A
    /// primary taking over from another (an upgrade) holds it until the hand-over is done:
    /// see [`ClusterHandle::announce_ready`](crate::ClusterHandle::announce_ready).
    pub announce_ready: bool,
    /// The generation of the first workers (default 1; a primary that takes over from another
    /// continues its count).
    pub generation: u64,
    /// Run workers as this user (its uid, gid and supplementary groups, with
    /// `PR_SET_NO_NEW_PRIVS`) instead of the primary's (default: the primary's). Only root can;
    /// see [`WorkerUser`](crate::WorkerUser) for what the user needs.
    pub user: Option<crate::credentials::WorkerUser>,
    /// Workers' `RLIMIT_NOFILE`, soft and hard (default: the primary's, inherited).
    pub rlimit_nofile: Option<u64>,
    /// When a worker is replaced though nothing is wrong with it (default: never).
    pub recycle: Recycle,
    /// Hang detection for program workers (`WATCHDOG=1`, as systemd's); `None`: none.
    pub watchdog: Option<Watchdog>,
}

/// When a worker is replaced (recycled) though nothing is wrong with it: after a number of
/// connections, above a memory size, or after an age, each with jitter so that slots do not
/// come due together. A recycle is a one-slot rolling replacement, as a reload's: the new
/// worker starts first, takes the slot over once ready, and the old one drains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recycle {
    /// After this many connections (a native worker's count; gunicorn's `max_requests`).
    pub max_requests: Option<u64>,
    /// Up to this many more, drawn for each worker.
    pub max_requests_jitter: u64,
    /// When the resident memory of the worker's whole process tree is above this (bytes).
    pub max_rss: Option<u64>,
    /// After this long.
    pub max_age: Option<Duration>,
    /// Up to this much longer, drawn for each worker.
    pub max_age_jitter: Duration,
}

impl Recycle {
    /// Whether anything recycles workers.
    pub fn any(&self) -> bool {
        self.max_requests.is_some() || self.max_rss.is_some() || self.max_age.is_some()
    }
}

/// Hang detection for program workers: each gets `WATCHDOG_USEC` (and `WATCHDOG_PID`) and
/// must say `WATCHDOG=1` on its `NOTIFY_SOCKET` at least that often, as under systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    /// The longest a worker may go without `WATCHDOG=1`.
    pub interval: Duration,
    /// What a worker that missed it gets once its replacement serves (it is killed after
    /// [`Watchdog::grace`]); `SIGABRT` by default, so runtimes that dump a stack on it do.
    pub signal: nix::sys::signal::Signal,
    /// How long after that signal it is killed.
    pub grace: Duration,
}

impl Settings {
    /// Settings that re-execute this program with its own arguments, one worker per core,
    /// respawning crashed workers.
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn from_current_exe() -> io::Result<Settings> {
        inherited_fds();
        Ok(Settings {
            exec: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            env: Vec::new(),
            cwd: None,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            policy: SchedulingPolicy::from_env().unwrap_or_default(),
            silent: false,
            respawn: Some(Backoff::default()),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            given_fds: Vec::new(),
            kind: WorkerKind::Native,
            readiness: Readiness::Notify,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            prefix_output: true,
            reload_batch: 1,
            fd_store: crate::systemd::fd_store_enabled(),
            announce_ready: true,
            generation: 1,
            user: None,
            rlimit_nofile: None,
            recycle: Recycle::default(),
            watchdog: None,
        })
    }

    /// Whether workers may name descriptor `fd` in `listen({fd})`.
    pub(crate) fn may_listen_on(&self, fd: RawFd) -> bool {
        inherited_fds().contains(&fd) || self.given_fds.iter().any(|g| g.as_raw_fd() == fd)
    }
}

/// The descriptors above 2 this process had open the first time this was called: the ones it
/// was *given* (by a shell, a supervisor, systemd), which Node's rule lets workers name in
/// `listen({fd})`. Call it first thing in `main` (the `netcluster` binary does, and
/// [`Settings::from_current_exe`] calls it too) so that nothing the process opened itself is
/// counted.
pub fn inherited_fds() -> &'static [RawFd] {
    static FDS: OnceLock<Vec<RawFd>> = OnceLock::new();
    FDS.get_or_init(|| {
        let mut fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|&fd| fd > 2)
                    .collect()
            })
            .unwrap_or_default();
        // The directory's own descriptor was open while it was read; it is closed now. What
        // systemd passed is taken by `--listen systemd` (and the rest closed), and the end of
        // an upgrade's hand-over is the primary's own: neither is for workers to name.
        let upgrade: Option<RawFd> = std::env::var(netcluster_protocol::handover::UPGRADE_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        let systemd = netcluster_protocol::start::systemd_fd_numbers();
        fds.retain(|&fd| {
            netcluster_protocol::fd::is_open(fd) && !systemd.contains(&fd) && Some(fd) != upgrade
        });
        fds.sort_unstable();
        fds
    })
}

/// Builds a [`Cluster`](crate::Cluster) (Node's `cluster.setupPrimary(settings)`).
///
/// ```no_run
/// use netcluster_primary::{Cluster, SchedulingPolicy};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let cluster = Cluster::builder()?
///     .workers(4)
///     .policy(SchedulingPolicy::RoundRobin)
///     .env("APP_MODE", "worker")
///     .build();
/// cluster.start().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    pub(crate) settings: Settings,
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

    /// How many workers [`Cluster::start`](crate::Cluster::start) forks.
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

    /// Restart workers that exit unasked with these delays, or (`None`) never, as Node does.
    #[must_use]
    pub fn respawn(mut self, backoff: Option<Backoff>) -> Self {
        self.settings.respawn = backoff;
        self
    }

    /// What one worker can make the primary hold.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.settings.limits = limits;
        self
    }

    /// Deadlines workers are held to.
    #[must_use]
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.settings.timeouts = timeouts;
        self
    }

    /// Runs any `program` as the workers, with its listeners passed the systemd way (see
    /// [`WorkerKind::Program`]).
    #[must_use]
    pub fn program<I, S>(mut self, program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.settings.exec = program.into();
        self.settings.args = args.into_iter().map(Into::into).collect();
        self.settings.kind = WorkerKind::Program;
        self
    }

    /// When a program worker is ready.
    #[must_use]
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.settings.readiness = readiness;
        self
    }

    /// The signal that asks a program worker to stop.
    #[must_use]
    pub fn stop_signal(mut self, signal: nix::sys::signal::Signal) -> Self {
        self.settings.stop_signal = signal;
        self
    }

    /// How many slots a rolling reload replaces at a time (at least one).
    #[must_use]
    pub fn reload_batch(mut self, n: usize) -> Self {
        self.settings.reload_batch = n.max(1);
        self
    }

    /// Runs the workers as `user` ([`WorkerUser::resolve`](crate::WorkerUser::resolve) makes
    /// one from `USER[:GROUP]`), with `PR_SET_NO_NEW_PRIVS`.
    #[must_use]
    pub fn user(mut self, user: crate::credentials::WorkerUser) -> Self {
        self.settings.user = Some(user);
        self
    }

    /// The workers' `RLIMIT_NOFILE` (soft and hard).
    #[must_use]
    pub fn rlimit_nofile(mut self, n: u64) -> Self {
        self.settings.rlimit_nofile = Some(n);
        self
    }

    /// Gives the cluster a listening socket that workers may name in `listen({fd: N})`, N
    /// being its descriptor number here (`fd.as_raw_fd()` before the call).
    #[must_use]
    pub fn give_fd(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.settings.given_fds.push(Arc::new(fd.into()));
        self
    }

    /// The settings as built so far.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The cluster, with its supervisor running and no worker started yet. Must be called
    /// within a tokio runtime.
    pub fn build(self) -> crate::Cluster {
        crate::Cluster::new(self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            reset_after: Duration::from_secs(1),
            give_up_after: None,
        };
        let delays: Vec<u128> = (0..8).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn inherited_fds_are_above_stderr_and_open() {
        for &fd in inherited_fds() {
            assert!(fd > 2);
        }
    }
}
