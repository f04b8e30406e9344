//! [`Cluster`] (runs the supervisor) and [`ClusterHandle`] (a cheap, cloneable sender of
//! commands: what the library, signals and the control socket all use).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use netcluster_protocol::handover::ListenerRecord;
use netcluster_protocol::listening::ListenError;
use netcluster_protocol::message::{BoundAddress, ListenParams, ListenTarget};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::command::{Command, ScaleReport, ScaleTo, StopMode};
use crate::error::Error;
use crate::event::{Event, Events, WorkerInfo};
use crate::settings::{ClusterBuilder, Settings};
use crate::status::Status;
use crate::supervisor::{Inputs, Supervisor};
use crate::upgrade::{UpgradeReport, Upgrader};
use crate::worker_handle::WorkerHandle;

/// Why an upgrade is refused by a cluster given no [`Upgrader`].
const NO_UPGRADER: &str = "upgrade is not available in this program (it set no upgrader: \
                           Cluster::set_upgrader)";

/// A cheap, cloneable handle to a running cluster: every operation is a command to its
/// supervisor, answered when done.
///
/// ```no_run
/// # async fn f(handle: netcluster_primary::ClusterHandle) -> Result<(), netcluster_primary::Error> {
/// let report = handle.scale(4).await?; // returns once 4 workers are ready
/// println!("{} → {} workers", report.from, report.to);
/// let status = handle.status().await?;
/// println!("{}", status.table());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::WeakSender<Event>,
    /// What a primary upgrade starts, shared by every handle of the cluster (or why there is
    /// nothing to start).
    upgrader: Arc<Mutex<Result<Upgrader, String>>>,
}

impl ClusterHandle {
    pub(crate) async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Follows the cluster's events from now on (every subscriber sees every event).
    pub fn subscribe(&self) -> Option<Events> {
        self.events.upgrade().map(|tx| Events::new(tx.subscribe()))
    }

    /// Binds `target` in the primary now (as a worker's listen would) and keeps it open for
    /// as long as the cluster runs, whether or not a worker listens on it at the moment;
    /// workers that listen on the same key share it. Returns the bound address, with the real
    /// port for port 0 (which keeps its number across respawns and reloads).
    ///
    /// Port-0 targets are numbered in call order, like a worker's port-0 listens: a worker
    /// whose Nth `listen(0)` matches the Nth port-0 share gets that socket. A relative Unix
    /// path is taken relative to the primary's directory.
    ///
    /// # Errors
    /// [`Error::Listen`] naming the address.
    pub async fn share(
        &self,
        target: ListenTarget,
        params: ListenParams,
        name: Option<String>,
    ) -> Result<BoundAddress, Error> {
        self.request(|reply| Command::Share {
            target,
            params,
            name,
            reply,
        })
        .await?
    }

    /// Starts [`Settings::workers`] workers, one per slot (they are not ready yet: follow
    /// [`Event::Online`] and [`Event::Listening`], or use [`ClusterHandle::scale`], which
    /// waits).
    ///
    /// # Errors
    /// The first worker that cannot be started.
    pub async fn start(&self) -> Result<Vec<WorkerInfo>, Error> {
        self.request(|reply| Command::Start { reply }).await?
    }

    /// Adds a slot and starts a worker in it (Node's `cluster.fork()`).
    ///
    /// # Errors
    /// When the process cannot be started, or the cluster is stopping.
    pub async fn fork(&self) -> Result<WorkerInfo, Error> {
        self.request(|reply| Command::Fork { reply }).await?
    }

    /// Runs exactly `workers` workers: new slots get workers and the call returns once they
    /// are ready (listening on every listener the operator configured); slots scaled away are
    /// drained (their workers finish their connections, up to the drain deadline) and the
    /// call returns once those have exited.
    ///
    /// # Errors
    /// [`Error::BadWorkerCount`], [`Error::NotReady`] naming the slot and why (its worker
    /// exited, or was not ready in time), [`Error::Stopping`].
    pub async fn scale(&self, workers: usize) -> Result<ScaleReport, Error> {
        self.scale_to(ScaleTo::Exactly(workers)).await
    }

    /// [`ClusterHandle::scale`] by a number of workers more (or fewer); never below one.
    ///
    /// # Errors
    /// As [`ClusterHandle::scale`].
    pub async fn scale_to(&self, to: ScaleTo) -> Result<ScaleReport, Error> {
        self.request(|reply| Command::Scale { to, reply }).await?
    }

    /// Rolling reload: every slot gets a worker of a new generation (see the module
    /// documentation of the reload in `docs/operations.md`); returns once every slot runs it and
    /// the old workers have drained.
    ///
    /// # Errors
    /// [`Error::NotReady`] naming the slot whose new worker failed and why (the slots not
    /// replaced keep their old workers); [`Error::Stopping`].
    pub async fn reload(&self) -> Result<crate::ReloadReport, Error> {
        self.request(|reply| Command::Reload { reply }).await?
    }

    /// Primary upgrade, for a cluster given an [`Upgrader`] ([`Cluster::set_upgrader`]): starts
    /// the program again as a new primary (the binary now on disk, by the path this one was
    /// started as, with its arguments),
    /// hands it every listening socket, and once its workers are ready and it serves, this
    /// primary drains its own workers and stops. No listening socket closes at any moment. The
    /// new primary must take the hand-over ([`Incoming`](crate::Incoming)), as `netcluster
    /// serve` does. Returns once the new primary serves.
    ///
    /// # Errors
    /// [`Error::Upgrade`] saying what failed — no upgrader was set, the new primary did not
    /// start, exited, was not ready in time, an upgrade is already under way — in which case
    /// this primary serves on as before.
    pub async fn upgrade(&self) -> Result<UpgradeReport, Error> {
        let upgrader = self
            .upgrader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .map_err(|why| {
                tracing::warn!("{why}");
                Error::Upgrade(why)
            })?;
        upgrader.upgrade(self).await
    }

    /// The live workers.
    ///
    /// # Errors
    /// [`Error::Stopped`] once the cluster has stopped.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        self.request(|reply| Command::Workers { reply }).await
    }

    /// A handle to worker `id` (live, or dead not long ago), `None` if there is no such worker.
    pub async fn worker(&self, id: u32) -> Option<WorkerHandle> {
        let info = self
            .request(|reply| Command::Worker { id, reply })
            .await
            .ok()??;
        Some(WorkerHandle::new(info.id, self.clone()))
    }

    pub(crate) async fn worker_info(&self, id: u32) -> Option<WorkerInfo> {
        self.request(|reply| Command::Worker { id, reply })
            .await
            .ok()?
    }

    /// A snapshot of the primary, its listeners, slots and workers (`netcluster status`).
    ///
    /// # Errors
    /// [`Error::Stopped`] once the cluster has stopped.
    pub async fn status(&self) -> Result<Status, Error> {
        self.request(|reply| Command::Status { reply }).await
    }

    /// `server.getConnections()` for the whole cluster: the open connections on the listener
    /// bound to `address`, summed over every worker that shares it (Node cannot do this:
    /// nodejs/node#48333). The primary asks each worker when called rather than having
    /// workers push a message on every accept and close, so the connection path carries no
    /// extra traffic.
    ///
    /// # Errors
    /// [`Error::Count`] when a worker exits before replying (Node's
    /// `ERR_CHILD_CLOSED_BEFORE_REPLY`), does not answer within its deadline, or does not read
    /// its channel; [`Error::NoListener`].
    pub async fn get_connections(&self, address: &BoundAddress) -> Result<u64, Error> {
        let address = address.clone();
        let rxs = self
            .request(|reply| Command::Count {
                address: address.clone(),
                reply,
            })
            .await??;
        let mut total = 0u64;
        for rx in rxs {
            let n = rx
                .await
                .map_err(|_| Error::Stopped)?
                .map_err(|error| Error::Count {
                    address: address.clone(),
                    error,
                })?;
            total = total.saturating_add(n);
        }
        Ok(total)
    }

    /// Stops the cluster gracefully: accepting stops, connections the primary accepted are
    /// handed off, workers finish their connections up to the drain deadline, then whatever
    /// is still running is killed. Returns the workers' exit events.
    ///
    /// # Errors
    /// [`Error::Stopped`] if it had already stopped.
    pub async fn stop(&self) -> Result<Vec<Event>, Error> {
        self.request(|reply| Command::Stop {
            mode: StopMode::Graceful,
            reply: Some(reply),
        })
        .await
    }

    /// Stops now: every worker is killed.
    ///
    /// # Errors
    /// [`Error::Stopped`] if it had already stopped.
    pub async fn stop_now(&self) -> Result<Vec<Event>, Error> {
        self.request(|reply| Command::Stop {
            mode: StopMode::Now,
            reply: Some(reply),
        })
        .await
    }

    /// Hands over to another primary (an upgrade): the workers drain as at a graceful stop,
    /// but the listening sockets are left exactly as they are — no filter, no waiting for
    /// their queues, no socket file removed — since the other primary accepts from them.
    /// Returns without waiting for the workers; [`Cluster::wait`] does.
    ///
    /// # Errors
    /// [`Error::Stopped`] if it had already stopped.
    pub async fn hand_over(&self) -> Result<(), Error> {
        self.commands
            .send(Command::Stop {
                mode: StopMode::Handover,
                reply: None,
            })
            .await
            .map_err(|_| Error::Stopped)
    }

    /// As [`ClusterHandle::hand_over`], naming the primary that took over: what was asked of
    /// this one meanwhile is answered [`Error::HandedOver`].
    pub(crate) async fn hand_over_to(&self, successor: u32) -> Result<(), Error> {
        self.commands
            .send(Command::HandOver { successor })
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Takes a listening socket over instead of binding one (systemd's, one from systemd's
    /// file-descriptor store, or a predecessor's in an upgrade) under the key of its record
    /// (`listener.info.target` and `ordinal`): workers that listen on that key share it.
    /// Returns the address it is bound to.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the key is taken, [`Error::Listen`] when the socket is not
    /// a bound socket, [`Error::Stopping`].
    pub async fn adopt(&self, listener: ListenerRecord) -> Result<BoundAddress, Error> {
        self.request(|reply| Command::Adopt { listener, reply })
            .await?
    }

    /// Duplicates of every listener's sockets with their keys and names, the generation and
    /// the number of workers: what the next primary needs to take over (an upgrade).
    ///
    /// # Errors
    /// When a socket cannot be duplicated (`EMFILE`).
    pub async fn export(&self) -> Result<crate::command::Export, Error> {
        self.request(|reply| Command::Export { reply }).await?
    }

    /// Sends systemd `READY=1` once every worker is ready (now, if they are): for a program
    /// that set [`Settings::announce_ready`] to false until it is the service's main process.
    pub async fn announce_ready(&self) {
        let _ = self.commands.send(Command::AnnounceReady).await;
    }

    /// Asks for a stop without waiting for it (for signal handlers).
    pub(crate) fn stop_nowait(&self, mode: StopMode) {
        let _ = self.commands.try_send(Command::Stop { mode, reply: None });
    }
}

/// A cluster: the primary side of Node's `cluster` module, run by a supervisor task.
///
/// ```no_run
/// use netcluster_primary::{Cluster, Event, Settings};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let mut settings = Settings::from_current_exe()?;
/// settings.workers = 2;
/// let mut cluster = Cluster::new(settings);
/// cluster.start().await?;
/// while let Some(event) = cluster.next_event().await {
///     if let Event::Online { id, pid } = event {
///         println!("worker {id} (pid {pid}) is online");
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Cluster {
    handle: ClusterHandle,
    settings: Settings,
    events: Option<Events>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// A cluster with these settings and no workers yet; its supervisor starts at once. Must
    /// be called within a tokio runtime.
    pub fn new(settings: Settings) -> Cluster {
        crate::settings::inherited_fds();
        let (commands_tx, commands) = mpsc::channel(256);
        let (events_tx, events_rx) = broadcast::channel(settings.limits.events.max(1));
        let weak = events_tx.downgrade();
        // The supervisor holds the only strong sender: when it ends, subscribers see the end.
        // Opt-in: a program that does not take the hand-over must not be started by one.
        let upgrader = Err(NO_UPGRADER.to_string());
        let supervisor = Supervisor::new(settings.clone(), Inputs { commands }, events_tx);
        let join = tokio::spawn(supervisor.run());
        Cluster {
            handle: ClusterHandle {
                commands: commands_tx,
                events: weak,
                upgrader: Arc::new(Mutex::new(upgrader)),
            },
            settings,
            events: Some(Events::new(events_rx)),
            supervisor: Some(join),
        }
    }

    /// A builder whose defaults re-execute this program with its own arguments, one worker
    /// per core, round robin (or `NETCLUSTER_SCHED_POLICY`), respawning crashed workers.
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn builder() -> io::Result<ClusterBuilder> {
        Ok(ClusterBuilder {
            settings: Settings::from_current_exe()?,
        })
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A handle for other tasks (signals, the control socket, the application).
    pub fn handle(&self) -> ClusterHandle {
        self.handle.clone()
    }

    /// What [`ClusterHandle::upgrade`] starts, for every handle of this cluster; without one,
    /// an upgrade is refused. Usually [`Upgrader::from_current_exe`], made at start (the path
    /// this program was started as, whatever is installed there later), for a program that
    /// takes the hand-over when it starts ([`Incoming`](crate::Incoming)).
    pub fn set_upgrader(&self, upgrader: Upgrader) {
        *self
            .handle
            .upgrader
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Ok(upgrader);
    }

    /// See [`ClusterHandle::share`].
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub async fn share(
        &self,
        target: ListenTarget,
        params: &ListenParams,
    ) -> Result<BoundAddress, ListenError> {
        self.handle
            .share(target.clone(), params.clone(), None)
            .await
            .map_err(|e| match e {
                Error::Listen(l) => l,
                other => ListenError::new(&target, io::Error::from(other)),
            })
    }

    /// Starts [`Settings::workers`] workers (see [`ClusterHandle::start`]).
    ///
    /// # Errors
    /// The first worker that cannot be started.
    pub async fn start(&self) -> io::Result<Vec<WorkerInfo>> {
        Ok(self.handle.start().await?)
    }

    /// Adds a worker (Node's `cluster.fork()`).
    ///
    /// # Errors
    /// When the process cannot be started.
    pub async fn fork(&self) -> io::Result<WorkerInfo> {
        Ok(self.handle.fork().await?)
    }

    /// The next event; `None` once the cluster has stopped and every event was read.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Events::next`]: an event leaves the queue only in the poll that
    /// returns it, so a `select!` that drops this future loses nothing.
    pub async fn next_event(&mut self) -> Option<Event> {
        match &mut self.events {
            Some(events) => events.next().await,
            None => None,
        }
    }

    /// Takes the cluster's own event subscription (made when the cluster was, so it misses
    /// nothing), to read it elsewhere — or to drop it, for a program that never reads events,
    /// so that no event is kept for it. [`Cluster::next_event`] returns `None` afterwards.
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    /// The live workers.
    pub async fn workers(&self) -> Vec<WorkerInfo> {
        self.handle.workers().await.unwrap_or_default()
    }

    /// A handle to worker `id` (live or dead not long ago).
    pub async fn worker(&self, id: u32) -> Option<WorkerHandle> {
        self.handle.worker(id).await
    }

    /// See [`ClusterHandle::get_connections`].
    ///
    /// # Errors
    /// As there.
    pub async fn get_connections(&self, address: &BoundAddress) -> io::Result<usize> {
        let n = self.handle.get_connections(address).await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Disconnects every worker (`cluster.disconnect()`) and completes when they have exited:
    /// the graceful stop of [`ClusterHandle::stop`]. Returns the workers' exit events.
    pub async fn disconnect(&mut self) -> Vec<Event> {
        let exits = self.handle.stop().await.unwrap_or_default();
        self.wait().await;
        exits
    }

    /// Another name for [`Cluster::disconnect`]: the graceful stop on `SIGTERM`.
    pub async fn shutdown(&mut self) -> Vec<Event> {
        self.disconnect().await
    }

    /// Waits until the supervisor has stopped (after a stop, from any handle).
    pub async fn wait(&mut self) {
        if let Some(join) = self.supervisor.take() {
            if let Err(e) = join.await {
                tracing::error!("the supervisor failed: {e}");
            }
        }
    }

    /// How long a stopping worker may finish its connections.
    pub fn drain_timeout(&self) -> Duration {
        self.settings.drain_timeout
    }
}
