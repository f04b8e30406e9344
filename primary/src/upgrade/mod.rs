//! Primary upgrade: a running primary starts the binary now on disk as a new primary, hands it
//! every listening socket (the [`handover`](netcluster_protocol::handover) protocol), and once
//! the new primary's workers are ready it drains its own and exits — without closing a
//! listening socket at any moment, so the accept queues never go away and no connection is
//! refused. Node cannot do this (nodejs/node-v0.x-archive#5050); nginx, HAProxy and einhorn can.
//!
//! **The old primary** ([`ClusterHandle::upgrade`], which runs the [`Upgrader`] the program gave
//! its cluster; `SIGUSR2` and the control socket's `upgrade` call it, as they call
//! [`ClusterHandle::reload`]):
//! 1. tells systemd `RELOADING=1` (with `MONOTONIC_USEC`), and duplicates every listener's
//!    sockets ([`ClusterHandle::export`]);
//! 2. starts the binary with its own arguments and environment, plus
//!    [`UPGRADE_FD_ENV`] naming the new
//!    primary's end of a `SOCK_SEQPACKET` socketpair, and sends the hand-over;
//! 3. waits for `Ready` (the new workers are ready) — if the new primary exits, says `Failed`,
//!    or is not ready in time, the upgrade fails: the new primary is told to abort (it stops its
//!    workers without touching a socket), and the old one goes on serving as before;
//! 4. tells systemd `MAINPID=` the new primary, sends `TakeOver`, and waits for `Serving` (the
//!    new primary answers on the control socket, which it has renamed over the old one's);
//! 5. hands over ([`ClusterHandle::hand_over`]): its workers drain as at a graceful stop, but
//!    the sockets are left as they are for the new primary, and it exits once they have.
//!
//! **The new primary** ([`Incoming`]): receives and checks the hand-over
//! ([`Incoming::receive`]), takes its settings ([`Incoming::configure`]: the next generation, as
//! many workers) and adopts every listener ([`Incoming::take_listeners`],
//! [`ClusterHandle::adopt`]: the same keys, so its workers share the same sockets); then
//! [`Incoming::take_over`] starts its workers, says `Ready`, and on `TakeOver` serves the control
//! socket and tells systemd `READY=1`. If the old primary goes away before `TakeOver`, it takes
//! over anyway: serving beats leaving the sockets to nobody. Any program whose primary is a
//! [`Cluster`](crate::Cluster) does the same:
//!
//! ```no_run
//! use netcluster_primary::{Cluster, Incoming, Settings, Upgrader, control};
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let mut incoming = Incoming::receive().await?; // before anything is bound
//! let mut settings = Settings::from_current_exe()?;
//! if let Some(inc) = &incoming {
//!     inc.configure(&mut settings);
//! }
//! let mut cluster = Cluster::new(settings);
//! // What an upgrade of this primary starts: this program again.
//! cluster.set_upgrader(Upgrader::from_current_exe(cluster.settings().timeouts.ready)?);
//! let handle = cluster.handle();
//! let path = control::default_path();
//! let _control = match incoming {
//!     Some(mut inc) => {
//!         for listener in inc.take_listeners() {
//!             handle.adopt(listener).await?;
//!         }
//!         // Ready, then the control socket in place of the old primary's.
//!         match inc.take_over(&handle, |h| control::serve_replacing(&path, h.clone())).await {
//!             Ok(c) => c,
//!             Err(e) => {
//!                 cluster.wait().await; // its workers stop; the old primary serves on
//!                 return Err(e.into());
//!             }
//!         }
//!     }
//!     None => {
//!         let c = control::serve(&path, handle.clone())?;
//!         // ... share the listeners ...
//!         handle.scale(4).await?;
//!         c
//!     }
//! };
//! cluster.wait().await;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use netcluster_protocol::channel::{self, Channel};
use netcluster_protocol::handover::{Handover, UPGRADE_FD_ENV};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;

use crate::cluster::ClusterHandle;
use crate::error::Error;

/// The descriptor number of the hand-over in the new primary.
const UPGRADE_FD: i32 = 3;
/// How long the new primary has to start, receive the listeners and say `Received`.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time beyond the new primary's ready timeout for it to start and say `Ready`.
const START_GRACE: Duration = Duration::from_secs(30);
/// How long the new primary has to serve the control socket after `TakeOver`.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an aborted new primary has to stop its workers before it is killed.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);

/// What an upgrade did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The primary that handed over (and is draining its workers).
    pub old_pid: u32,
    /// The primary that serves now.
    pub new_pid: u32,
    /// The generation the new primary's workers run.
    pub generation: u64,
    /// Listeners handed over.
    pub listeners: usize,
    /// Sockets handed over (a reuseport listener has one per slot).
    pub sockets: usize,
    /// From the request to `Serving`, in milliseconds.
    pub took_ms: u64,
}

/// Carries out primary upgrades for a running primary: the binary to start and its arguments.
/// One upgrade runs at a time. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    exe: PathBuf,
    args: Vec<OsString>,
    ready_timeout: Duration,
    busy: AtomicBool,
}

/// Marks the upgrader free again when an upgrade ends, however it ends.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Upgrader {
    /// An upgrader that starts `exe` with `args`; the new primary has `ready_timeout` to get its
    /// workers ready (beyond the time it needs to start).
    pub fn new(exe: impl Into<PathBuf>, args: Vec<OsString>, ready_timeout: Duration) -> Upgrader {
        Upgrader {
            inner: Arc::new(Inner {
                exe: exe.into(),
                args,
                ready_timeout,
                busy: AtomicBool::new(false),
            }),
        }
    }

    /// An upgrader that starts this program again by the path it was started as, with this
    /// process's arguments: `argv[0]` when it is a path (made absolute now), so that a binary
    /// installed over it — or a symlink switched to another — is the one started; else the
    /// executable's own path, read now.
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn from_current_exe(ready_timeout: Duration) -> std::io::Result<Upgrader> {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from);
        let path = std::env::var_os("PATH");
        let exe = match invoked_path(argv0.as_deref(), path.as_deref(), &std::env::current_dir()?) {
            Some(p) => p,
            None => std::env::current_exe()?,
        };
        Ok(Upgrader::new(exe, args.collect(), ready_timeout))
    }

    /// Upgrades the primary running `cluster`: returns once the new primary serves (this one
    /// is then draining its workers and exits when they have), or why not — in which case this
    /// primary serves on as before.
    ///
    /// # Errors
    /// [`Error::Upgrade`] saying what failed.
    pub async fn upgrade(&self, cluster: &ClusterHandle) -> Result<UpgradeReport, Error> {
        if self.inner.busy.swap(true, Ordering::SeqCst) {
            return Err(Error::Upgrade("an upgrade is already under way".into()));
        }
        let _busy = Busy(&self.inner.busy);
        let notifier = crate::systemd::Notifier::from_env();
        if let Some(n) = &notifier {
            n.reloading("upgrading the primary");
        }
        tracing::info!(exe = %self.inner.exe.display(), "upgrading the primary");
        let result = self.run(cluster).await;
        match &result {
            Ok(r) => tracing::info!(
                new_pid = r.new_pid,
                generation = r.generation,
                "the new primary serves; draining this one's workers"
            ),
            Err(e) => {
                tracing::error!("{e}");
                if let Some(n) = &notifier {
                    n.ready(&format!("{e}"));
                }
            }
        }
        result
    }

    async fn run(&self, cluster: &ClusterHandle) -> Result<UpgradeReport, Error> {
        let started = Instant::now();
        let export = cluster.export().await?;
        let (ours, theirs) =
            channel::seqpacket_pair().map_err(|e| Error::io("make the hand-over socketpair", e))?;
        let mut cmd = tokio::process::Command::new(&self.inner.exe);
        cmd.args(&self.inner.args)
            .env(UPGRADE_FD_ENV, UPGRADE_FD.to_string())
            // systemd's watchdog belongs to whichever primary is its main process.
            .env_remove("WATCHDOG_PID");
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: theirs,
            child_fd: UPGRADE_FD,
        }])
        .map_err(|e| Error::io("map the hand-over descriptor", std::io::Error::other(e)))?;
        let mut child = cmd.spawn().map_err(|e| {
            Error::Upgrade(format!(
                "cannot start the new primary {}: {e}",
                self.inner.exe.display()
            ))
        })?;
        // Our copy of its end goes: when it exits, the channel says so.
        drop(cmd);
        let new_pid = child.id().unwrap_or(0);
        // Its parent waits for it: the orphan sweep leaves it alone.
        crate::containment::claim(new_pid);
        let channel = Channel::from_fd(ours)
            .map_err(|e| Error::io("the hand-over channel", std::io::Error::other(e)))?;
        let listeners = export.listeners.len();
        let generation = export.generation.saturating_add(1);
        let mut up = Upgrade {
            child: &mut child,
            channel: &channel,
            new_pid,
            acknowledged: false,
            exe: &self.inner.exe,
        };
        let handover = async {
            let sockets = send_handover(&channel, export)
                .await
                .map_err(|e| format!("cannot send the listeners: {e}"))?;
            match recv(&channel).await? {
                Some(Handover::Received) => Ok(sockets),
                Some(Handover::Failed { reason }) => {
                    Err(format!("the new primary refused the hand-over: {reason}"))
                }
                Some(other) => Err(format!(
                    "the new primary said {other:?} instead of Received"
                )),
                None => Err("the new primary closed the hand-over".to_string()),
            }
        };
        let sockets = match up.within(HANDOVER_TIMEOUT, handover).await {
            Ok(Ok(n)) => n,
            Ok(Err(why)) => {
                // A channel error because the process is gone says less than that it is gone.
                let why = up.exited_instead(why, "before it took the hand-over").await;
                return Err(up.abort(why).await);
            }
            Err(why) => return Err(up.abort(why).await),
        };
        up.acknowledged = true;
        // Its workers start and get ready.
        let wait = self.inner.ready_timeout.saturating_add(START_GRACE);
        match up.within(wait, recv(&channel)).await {
            Ok(Ok(Some(Handover::Ready { pid }))) if pid == new_pid => {}
            Ok(Ok(Some(Handover::Failed { reason }))) => {
                return Err(up
                    .reap(format!("the new primary could not start: {reason}"))
                    .await);
            }
            Ok(Ok(Some(other))) => {
                return Err(up
                    .abort(format!("the new primary said {other:?} instead of Ready"))
                    .await);
            }
            Ok(Ok(None)) => {
                return Err(up
                    .reap("the new primary closed the hand-over before it was ready".into())
                    .await);
            }
            Ok(Err(e)) => {
                let why = up
                    .exited_instead(format!("hand-over channel: {e}"), "before it was ready")
                    .await;
                return Err(up.abort(why).await);
            }
            Err(why) => return Err(up.abort(why).await),
        }
        if cluster.status().await.map_or(true, |s| s.stopping) {
            return Err(up.abort("this primary began to stop".into()).await);
        }
        // From here systemd follows the new primary.
        if crate::systemd::Notifier::from_env().is_some() {
            if let Err(e) = crate::systemd::main_pid(new_pid) {
                tracing::warn!("cannot tell systemd the new MAINPID: {e}");
            }
        }
        if let Err(e) = channel.send(&Handover::TakeOver, &[]).await {
            return Err(up.revert(format!("cannot send TakeOver: {e}")).await);
        }
        match up.within(SERVING_TIMEOUT, recv(&channel)).await {
            Ok(Ok(Some(Handover::Serving))) => {}
            Ok(Ok(Some(Handover::Failed { reason }))) => {
                return Err(up
                    .revert(format!("the new primary could not serve: {reason}"))
                    .await);
            }
            Ok(Ok(other)) => {
                return Err(up
                    .revert(format!("the new primary said {other:?} instead of Serving"))
                    .await);
            }
            Ok(Err(e)) => return Err(up.revert(format!("hand-over channel: {e}")).await),
            Err(why) => return Err(up.revert(why).await),
        }
        cluster.hand_over_to(new_pid).await?;
        Ok(UpgradeReport {
            old_pid: std::process::id(),
            new_pid,
            generation,
            listeners,
            sockets,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// The path this program was invoked by, as the shell found it, without following a symlink:
/// `argv[0]` when it is a path (made absolute against `cwd`; `./netcluster` stays
/// `/srv/app/netcluster`), else the first executable file of that name on `path` (`$PATH`).
/// `None` when neither tells.
fn invoked_path(
    argv0: Option<&std::path::Path>,
    path: Option<&std::ffi::OsStr>,
    cwd: &std::path::Path,
) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let argv0 = argv0.filter(|p| !p.as_os_str().is_empty())?;
    if argv0.components().count() > 1 {
        // `components` leaves out `.`.
        return Some(cwd.join(argv0).components().collect());
    }
    std::env::split_paths(path?)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                cwd.to_path_buf()
            } else {
                cwd.join(dir)
            }
        })
        .map(|dir| dir.join(argv0))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|p| p.components().collect())
}

/// An upgrade under way, from the old primary's side: the new primary's process and channel.
struct Upgrade<'a> {
    child: &'a mut tokio::process::Child,
    channel: &'a Channel,
    new_pid: u32,
    /// It received the hand-over: it speaks the protocol, and may have workers to stop.
    acknowledged: bool,
    exe: &'a std::path::Path,
}

impl Upgrade<'_> {
    /// Runs `fut` unless the new primary exits or `limit` passes first (then says which).
    async fn within<T>(
        &mut self,
        limit: Duration,
        fut: impl Future<Output = T>,
    ) -> Result<T, String> {
        tokio::select! {
            biased;
            v = fut => Ok(v),
            status = self.child.wait() => Err(match status {
                Ok(s) => format!("the new primary exited before it was ready ({s})"),
                Err(e) => format!("cannot wait for the new primary: {e}"),
            }),
            () = tokio::time::sleep(limit) => Err(format!(
                "the new primary did not answer within {limit:?}"
            )),
        }
    }

    /// `why`, or that the new primary exited `when` if it has (its exit status follows in the
    /// error).
    /// A process closes its descriptors a moment before it is a zombie: a peer that reset
    /// the channel is given 100 ms to be seen exiting.
    async fn exited_instead(&mut self, why: String, when: &str) -> String {
        match tokio::time::timeout(Duration::from_millis(100), self.child.wait()).await {
            Ok(Ok(_)) => format!("the new primary exited {when}"),
            _ => why,
        }
    }

    /// The new primary said it failed or closed the channel: waits for it to exit (killing it
    /// if it does not, or at once if it never received the hand-over: it has no workers).
    async fn reap(&mut self, why: String) -> Error {
        let limit = if self.acknowledged {
            ABORT_TIMEOUT
        } else {
            Duration::from_millis(200)
        };
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => format!("it exited ({status})"),
            Ok(Err(e)) => format!("cannot wait for it: {e}"),
            Err(_) => {
                tracing::warn!(
                    pid = self.new_pid,
                    "the new primary does not exit; killing it"
                );
                let _ = self.child.kill().await;
                "it was killed".to_string()
            }
        };
        Error::Upgrade(format!(
            "{why} (the new primary {}, pid {}: {status}); this primary serves on",
            self.exe.display(),
            self.new_pid
        ))
    }

    /// Calls the upgrade off: the new primary stops its workers without touching a socket and
    /// exits.
    async fn abort(&mut self, why: String) -> Error {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.channel.send(
                &Handover::Abort {
                    reason: why.clone(),
                },
                &[],
            ),
        )
        .await;
        self.reap(why).await
    }

    /// `TakeOver` was sent but the new primary did not serve: systemd follows this primary
    /// again, and the new one is called off.
    async fn revert(&mut self, why: String) -> Error {
        if crate::systemd::Notifier::from_env().is_some() {
            let _ = crate::systemd::main_pid(std::process::id());
        }
        self.abort(why).await
    }
}

async fn recv(channel: &Channel) -> Result<Option<Handover>, String> {
    match channel.recv::<Handover>().await {
        Ok(Some((msg, _fds))) => Ok(Some(msg)),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends `Hello`, every listener with its sockets, and `Done`; returns the number of sockets.
async fn send_handover(
    channel: &Channel,
    export: crate::command::Export,
) -> Result<usize, netcluster_protocol::ChannelError> {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    channel
        .send(
            &Handover::Hello {
                pid: std::process::id(),
                generation: export.generation,
                workers: count(export.workers.max(1)),
                listeners: count(export.listeners.len()),
            },
            &[],
        )
        .await?;
    let mut sockets = 0usize;
    for (index, l) in export.listeners.iter().enumerate() {
        let index = count(index);
        let listener = Handover::Listener {
            index,
            info: l.info.clone(),
            sockets: count(l.sockets()),
        };
        channel.send(&listener, &[]).await?;
        let own = l.socket.iter().map(|fd| (None, fd));
        let slots = l.slots.iter().map(|(slot, fd)| (Some(count(*slot)), fd));
        for (slot, fd) in own.chain(slots) {
            let frame = Handover::Socket {
                listener: index,
                slot,
            };
            channel.send(&frame, &[fd.as_fd()]).await?;
            sockets += 1;
        }
    }
    channel
        .send(
            &Handover::Done {
                listeners: count(export.listeners.len()),
                sockets: count(sockets),
            },
            &[],
        )
        .await?;
    Ok(sockets)
}

mod incoming;

pub use incoming::Incoming;

#[cfg(test)]
mod tests;
