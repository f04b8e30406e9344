//! The new primary's side of an upgrade: receiving the old primary's listeners and taking
//! over.

use std::time::Duration;

use netcluster_protocol::channel::Channel;
use netcluster_protocol::handover::{
    Handover, HandoverError, ListenerRecord, Received, Receiver, UPGRADE_FD_ENV,
};

use super::{HANDOVER_TIMEOUT, START_GRACE};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::settings::Settings;

/// The new primary's side of an upgrade: what the old primary handed over, and the channel to
/// finish the upgrade on.
#[derive(Debug)]
pub struct Incoming {
    pub(super) channel: Channel,
    pub(super) received: Received,
}

impl Incoming {
    /// When this process was started by an upgrade ([`UPGRADE_FD_ENV`] names its end of the
    /// hand-over, made by its parent): receives and checks the hand-over. `None` otherwise.
    ///
    /// # Errors
    /// [`Error::Upgrade`] when the descriptor is not the parent's `SOCK_SEQPACKET` socket, or the
    /// hand-over is truncated, malformed or late (the old primary is told `Failed`).
    pub async fn receive() -> Result<Option<Incoming>, Error> {
        let Some(value) = std::env::var_os(UPGRADE_FD_ENV) else {
            return Ok(None);
        };
        let fail = |why: String| Error::Upgrade(format!("{UPGRADE_FD_ENV}: {why}"));
        let fd: i32 = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| fail(format!("{value:?} is not a descriptor number")))?;
        let owned = netcluster_protocol::fd::claim_inherited(fd)
            .map_err(|e| fail(format!("descriptor {fd}: {e}")))?;
        let parent = u32::try_from(nix::unistd::getppid().as_raw()).unwrap_or(0);
        match netcluster_protocol::fd::peer_pid(fd) {
            Some(pid) if pid == parent => {}
            other => {
                return Err(fail(format!(
                    "descriptor {fd} was not made by this process's parent (pid {parent}; its \
                     maker is {other:?}): not started by an upgrading primary"
                )));
            }
        }
        let channel = Channel::from_fd(owned).map_err(|e| fail(e.to_string()))?;
        let received = match tokio::time::timeout(HANDOVER_TIMEOUT, receive_all(&channel)).await {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                let _ = channel
                    .send(
                        &Handover::Failed {
                            reason: why.clone(),
                        },
                        &[],
                    )
                    .await;
                return Err(fail(why));
            }
            Err(_) => {
                return Err(fail(format!(
                    "the hand-over did not arrive within {HANDOVER_TIMEOUT:?}"
                )));
            }
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.send(&Handover::Received, &[]),
        )
        .await;
        tracing::info!(
            from = received.pid,
            listeners = received.listeners.len(),
            generation = received.generation,
            "taking over from the old primary"
        );
        Ok(Some(Incoming { channel, received }))
    }

    /// The old primary's pid.
    pub fn old_pid(&self) -> u32 {
        self.received.pid
    }

    /// The generation the old primary's workers run.
    pub fn generation(&self) -> u64 {
        self.received.generation
    }

    /// How many workers the old primary runs.
    pub fn workers(&self) -> usize {
        self.received.workers as usize
    }

    /// Makes `settings` those of the primary taking over: its workers are the generation after
    /// the old primary's, as many as it runs, and systemd hears `READY=1` from this primary
    /// only once it is the service's main process ([`Incoming::take_over`] says it).
    pub fn configure(&self, settings: &mut Settings) {
        settings.generation = self.generation().saturating_add(1);
        settings.workers = self.workers();
        settings.announce_ready = false;
    }

    /// The listeners handed over (taken out: a second call gets none), to
    /// [`ClusterHandle::adopt`] in order.
    pub fn take_listeners(&mut self) -> Vec<ListenerRecord> {
        std::mem::take(&mut self.received.listeners)
    }

    /// Takes over, once the listeners are adopted ([`Incoming::take_listeners`]): starts as
    /// many workers as the old primary runs and waits until they are ready, says `Ready`, and
    /// on `TakeOver` calls `serve` — which serves the control socket in place of the old
    /// primary's ([`serve_replacing`](crate::control::serve_replacing)) — then says `Serving` and
    /// tells systemd `READY=1`. Returns what `serve` made.
    ///
    /// # Errors
    /// [`Error::Upgrade`] saying why this primary cannot take over: its workers were not ready,
    /// the old primary called the upgrade off, `serve` failed. The old primary serves on, and
    /// this cluster is handing over (its workers stop without touching a socket): wait for it
    /// ([`Cluster::wait`](crate::Cluster::wait)) and exit.
    pub async fn take_over<T>(
        self,
        cluster: &ClusterHandle,
        serve: impl FnOnce(&ClusterHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let workers = self.workers();
        match cluster.scale(workers).await {
            Ok(_) => tracing::info!("{workers} workers ready"),
            Err(e) => {
                tracing::error!("workers not ready: {e}");
                return Err(self.abandon(cluster, &e.to_string()).await);
            }
        }
        if let Err(e) = self.ready().await {
            cluster.hand_over().await.ok();
            return Err(e);
        }
        let served = match serve(cluster) {
            Ok(served) => served,
            Err(e) => return Err(self.abandon(cluster, &e.to_string()).await),
        };
        self.serving().await;
        cluster.announce_ready().await;
        tracing::info!("took over: this is the primary now");
        Ok(served)
    }

    /// Gives the upgrade up before taking over (a listener could not be adopted, the workers
    /// were not ready): tells the old primary, which serves on, and hands over — this cluster's
    /// workers stop without touching a socket. Returns the error to exit with, once the
    /// cluster has stopped ([`Cluster::wait`](crate::Cluster::wait)).
    pub async fn abandon(self, cluster: &ClusterHandle, why: &str) -> Error {
        self.failed(why).await;
        cluster.hand_over().await.ok();
        Error::Upgrade(format!("cannot take over from the old primary: {why}"))
    }

    /// Says `Ready` (every worker is ready) and waits for `TakeOver`. If the old primary went
    /// away meanwhile, this one takes over all the same.
    ///
    /// # Errors
    /// [`Error::Upgrade`] when the old primary called the upgrade off, or did not answer in
    /// time.
    async fn ready(&self) -> Result<(), Error> {
        let pid = std::process::id();
        if let Err(e) = self.channel.send(&Handover::Ready { pid }, &[]).await {
            tracing::warn!("cannot tell the old primary it is ready ({e}); taking over");
            return Ok(());
        }
        match tokio::time::timeout(START_GRACE, self.channel.recv::<Handover>()).await {
            Ok(Ok(Some((Handover::TakeOver, _)))) => Ok(()),
            Ok(Ok(Some((Handover::Abort { reason }, _)))) => Err(Error::Upgrade(format!(
                "the old primary called the upgrade off: {reason}"
            ))),
            Ok(Ok(Some((other, _)))) => Err(Error::Upgrade(format!(
                "the old primary said {other:?} instead of TakeOver"
            ))),
            Ok(Ok(None)) => {
                tracing::warn!(
                    old = self.received.pid,
                    "the old primary went away before it handed over; taking over"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(Error::Upgrade(format!("hand-over channel: {e}"))),
            Err(_) => Err(Error::Upgrade(format!(
                "the old primary did not answer Ready within {START_GRACE:?}"
            ))),
        }
    }

    /// Tells the old primary it serves (it may go now) and closes the hand-over.
    async fn serving(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.channel.send(&Handover::Serving, &[]),
        )
        .await;
    }

    /// Tells the old primary this one cannot take over (it serves on).
    async fn failed(self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.channel.send(
                &Handover::Failed {
                    reason: reason.to_string(),
                },
                &[],
            ),
        )
        .await;
    }
}

async fn receive_all(channel: &Channel) -> Result<Received, String> {
    let mut receiver = Receiver::new();
    while !receiver.is_done() {
        let (msg, fds) = match channel.recv::<Handover>().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the old primary closed the hand-over before Done".into()),
            Err(e) => return Err(format!("hand-over channel: {e}")),
        };
        receiver
            .take(msg, fds)
            .map_err(|e: HandoverError| e.to_string())?;
    }
    receiver.finish().map_err(|e| e.to_string())
}
