//! The process seam: how the supervisor starts and signals worker processes.
//!
//! [`Launcher`] is all the supervisor asks of the operating system about a worker: start one
//! (and the tasks that carry its channel, its output and its notifications) and send one a
//! signal. [`Processes`] does it for real; the supervisor's unit tests use a fake that starts
//! nothing, hands the test each worker's queue and records the signals (the way watchexec's
//! `testchild` makes its supervisor testable).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::containment::Containment;
use crate::output::{self, Stream};
use crate::settings::Readiness;
use crate::spawn;
use crate::worker::conn::{self, FromWorker};
use crate::worker::table::Io;

/// What the supervisor gives a launcher to wire a new worker to the loop.
pub(crate) struct Plumbing<'a> {
    /// The loop's set of worker tasks (a task that panics is reported as the worker's end).
    pub tasks: &'a mut JoinSet<()>,
    /// Where the worker's messages, notifications and exit go.
    pub to_supervisor: &'a mpsc::Sender<(u32, FromWorker)>,
}

/// A started worker.
#[derive(Debug)]
pub(crate) struct Launched {
    /// Its process id.
    pub pid: u32,
    /// How the primary talks to it.
    pub io: Io,
    /// The task that reports its exit.
    pub task: Option<tokio::task::Id>,
}

/// Starts and signals worker processes.
pub(crate) trait Launcher: Send {
    /// Starts worker `spec.id`.
    ///
    /// # Errors
    /// Why the process could not be started.
    fn launch(&mut self, spec: spawn::Spec<'_>, plumbing: Plumbing<'_>) -> io::Result<Launched>;

    /// Sends `signal` to process `pid`.
    ///
    /// # Errors
    /// The error of `kill(2)`.
    fn signal(&mut self, pid: u32, signal: Signal) -> io::Result<()>;

    /// Kills every process of worker `id`'s tree (`pid` is the worker's own): its deadline
    /// passed, or it misbehaved.
    fn kill_tree(&mut self, id: u32, pid: u32);

    /// Worker `id` exited and was reaped: what is left of its tree is killed.
    fn tree_ended(&mut self, id: u32);

    /// Reaps orphans that exited, and kills those whose worker is gone.
    fn sweep(&mut self);

    /// The primary is done: what is left goes, and so does the guardian.
    fn close(&mut self);
}

/// Real processes.
#[derive(Debug, Default)]
pub(crate) struct Processes {
    /// A private directory (0700) for program workers' notification sockets, made on first use.
    notify_dir: Option<tempfile::TempDir>,
    /// Process groups, cgroups, orphans and the guardian; set up with the first worker.
    containment: Option<Containment>,
}

impl Processes {
    fn notify_dir(&mut self) -> io::Result<PathBuf> {
        if self.notify_dir.is_none() {
            // Named by this primary's pid, so that what a primary that is gone left behind
            // can be told and removed.
            crate::containment::remove_stale(&std::env::temp_dir(), "netcluster-notify-", |d| {
                let _ = std::fs::remove_dir_all(d);
            });
            self.notify_dir = Some(
                tempfile::Builder::new()
                    .prefix(&format!("netcluster-notify-{}-", std::process::id()))
                    .tempdir()?,
            );
        }
        Ok(self
            .notify_dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default())
    }
}

impl Launcher for Processes {
    fn launch(
        &mut self,
        mut spec: spawn::Spec<'_>,
        plumbing: Plumbing<'_>,
    ) -> io::Result<Launched> {
        let program = spec.settings.kind == crate::settings::WorkerKind::Program;
        let notify_dir = if program {
            let dir = self.notify_dir()?;
            crate::credentials::open_notify_dir(&dir, spec.settings)?;
            dir
        } else {
            PathBuf::new()
        };
        let id = spec.id;
        let slot = spec.slot;
        let queue = spec.settings.limits.queue;
        let containment = self.containment.get_or_insert_with(|| {
            Containment::new(spec.settings.drain_timeout, spec.settings.stop_signal)
        });
        if program {
            // Gone with the primary, even one killed with SIGKILL.
            containment.remove_when_gone(&notify_dir);
        }
        spec.notify_dir = notify_dir;
        // A native worker stops on SIGTERM (gracefully, as on its primary's Shutdown); a
        // program on its stop signal.
        let on_parent_death = if program {
            spec.settings.stop_signal
        } else {
            Signal::SIGTERM
        };
        let (tree_env, setup) = containment.prepare(id, on_parent_death);
        spec.tree_env = Some(tree_env);
        spec.child_setup = Some(setup);
        let mut spawned = match spawn::spawn(spec) {
            Ok(s) => s,
            Err(e) => {
                containment.not_started(id);
                return Err(e);
            }
        };
        containment.started(id, spawned.pid);
        let prefix = format!("[slot {slot}] ");
        let dropped = Arc::new(output::Dropped::default());
        if let Some(out) = spawned.child.stdout.take() {
            tokio::spawn(output::forward(
                out,
                prefix.clone(),
                Stream::Stdout,
                dropped.clone(),
            ));
        }
        if let Some(err) = spawned.child.stderr.take() {
            tokio::spawn(output::forward(
                err,
                prefix,
                Stream::Stderr,
                dropped.clone(),
            ));
        }
        let notify = spawned.notify.take().map(|(sock, path)| {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(conn::run_notify(
                id,
                sock,
                path,
                plumbing.to_supervisor.clone(),
                stop.clone(),
            ));
            stop.drop_guard()
        });
        let (io, task) = match spawned.channel {
            Some(channel) => {
                let channel = Arc::new(channel);
                let tx = conn::start_writer(channel.clone(), queue, id);
                let task = plumbing.tasks.spawn(conn::run_reader(
                    id,
                    spawned.child,
                    channel,
                    plumbing.to_supervisor.clone(),
                ));
                (Io::Native { tx }, task)
            }
            None => {
                let task = plumbing.tasks.spawn(conn::run_program(
                    id,
                    spawned.child,
                    plumbing.to_supervisor.clone(),
                ));
                (
                    Io::Program {
                        ready: false,
                        status_text: None,
                        notify,
                        dropped,
                    },
                    task,
                )
            }
        };
        Ok(Launched {
            pid: spawned.pid,
            io,
            task: Some(task.id()),
        })
    }

    fn signal(&mut self, pid: u32, signal: Signal) -> io::Result<()> {
        signal_pid(pid, signal)
    }

    fn kill_tree(&mut self, id: u32, pid: u32) {
        let _ = signal_pid(pid, Signal::SIGKILL);
        if let Some(c) = &mut self.containment {
            c.kill(id);
        }
    }

    fn tree_ended(&mut self, id: u32) {
        if let Some(c) = &mut self.containment {
            c.ended(id);
        }
    }

    fn sweep(&mut self) {
        if let Some(c) = &mut self.containment {
            c.sweep();
        }
    }

    fn close(&mut self) {
        if let Some(c) = &mut self.containment {
            c.close();
        }
    }
}

/// Sends `signal` to process `pid` (never to a process group: `pid` must be positive).
pub(crate) fn signal_pid(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(io::Error::from)
}

/// Whether a program worker of these settings counts as ready after a time of its own.
pub(crate) fn ready_after(
    kind: crate::settings::WorkerKind,
    readiness: Readiness,
) -> Option<std::time::Duration> {
    match (kind, readiness) {
        (crate::settings::WorkerKind::Program, Readiness::After(after)) => Some(after),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A launcher that starts nothing.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::worker::conn::{Outbound, WorkerTx};

    /// What the fake saw, shared with the test.
    #[derive(Debug, Default)]
    pub(crate) struct Seen {
        /// Each start: (worker id, slot, generation).
        pub started: Vec<(u32, usize, u64)>,
        /// The queue of every native worker started, by id.
        pub queues: BTreeMap<u32, mpsc::Receiver<Outbound>>,
        /// Every signal: (pid, signal).
        pub signals: Vec<(u32, Signal)>,
        /// Trees killed whole, by worker id.
        pub trees_killed: Vec<u32>,
        /// Trees ended (their worker reaped), by worker id.
        pub trees_ended: Vec<u32>,
        /// Sweeps.
        pub sweeps: u32,
        /// Starts to fail from now on.
        pub fail: bool,
    }

    /// The fake launcher: worker `id` gets pid `10_000 + id`.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct Fake(pub Arc<Mutex<Seen>>);

    impl Fake {
        pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
            match self.0.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            }
        }
    }

    impl Launcher for Fake {
        fn launch(&mut self, spec: spawn::Spec<'_>, _: Plumbing<'_>) -> io::Result<Launched> {
            let mut seen = self.seen();
            if seen.fail {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such program"));
            }
            seen.started.push((spec.id, spec.slot, spec.generation));
            let io = match spec.settings.kind {
                crate::settings::WorkerKind::Native => {
                    let (tx, rx) = WorkerTx::pair(spec.settings.limits.queue);
                    seen.queues.insert(spec.id, rx);
                    Io::Native { tx }
                }
                crate::settings::WorkerKind::Program => Io::Program {
                    ready: false,
                    status_text: None,
                    notify: None,
                    dropped: Arc::default(),
                },
            };
            Ok(Launched {
                pid: 10_000 + spec.id,
                io,
                task: None,
            })
        }

        fn signal(&mut self, pid: u32, signal: Signal) -> io::Result<()> {
            self.seen().signals.push((pid, signal));
            Ok(())
        }

        fn kill_tree(&mut self, id: u32, pid: u32) {
            let mut seen = self.seen();
            seen.signals.push((pid, Signal::SIGKILL));
            seen.trees_killed.push(id);
        }

        fn tree_ended(&mut self, id: u32) {
            self.seen().trees_ended.push(id);
        }

        fn sweep(&mut self) {
            self.seen().sweeps += 1;
        }

        fn close(&mut self) {}
    }
}
