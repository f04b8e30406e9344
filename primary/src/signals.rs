//! OS signals as commands to the supervisor ([`spawn`]); what each signal means is the pure
//! function [`action`].
//!
//! | signal | action |
//! |---|---|
//! | `SIGTERM` | graceful stop (drain deadline, then kill) |
//! | `SIGINT` | graceful stop; a second one stops now |
//! | `SIGQUIT` | stop now: every worker is killed |
//! | `SIGTTIN` / `SIGTTOU` | one worker more / fewer (never below one) |
//! | `SIGHUP` | rolling reload |
//! | `SIGUSR2` | primary upgrade |
//! | `SIGUSR1` | logs the status |
//!
//! None of them kills the primary by its default action: each has a handler.

use std::io;

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

use crate::cluster::ClusterHandle;
use crate::command::{ScaleTo, StopMode};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop, gracefully or now.
    Stop(StopMode),
    /// One worker more (+1) or fewer (−1).
    Scale(i64),
    /// A rolling reload.
    Reload,
    /// A primary upgrade.
    Upgrade,
    /// Log the status.
    LogStatus,
}

/// The signals the primary handles.
pub const HANDLED: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// What `signal` means, given how many `SIGINT`s came before it.
pub fn action(signal: Signal, interrupts_before: u32) -> Option<Action> {
    Some(match signal {
        Signal::SIGTERM => Action::Stop(StopMode::Graceful),
        Signal::SIGINT if interrupts_before == 0 => Action::Stop(StopMode::Graceful),
        Signal::SIGINT | Signal::SIGQUIT => Action::Stop(StopMode::Now),
        Signal::SIGHUP => Action::Reload,
        Signal::SIGUSR2 => Action::Upgrade,
        Signal::SIGUSR1 => Action::LogStatus,
        Signal::SIGTTIN => Action::Scale(1),
        Signal::SIGTTOU => Action::Scale(-1),
        _ => return None,
    })
}

/// Handles [`HANDLED`] for `cluster` until it stops: each action is a call on the handle
/// ([`ClusterHandle::reload`], [`ClusterHandle::upgrade`], …) in a task of its own, whose
/// outcome is logged.
///
/// # Errors
/// When a handler cannot be installed.
pub fn spawn(cluster: ClusterHandle) -> io::Result<tokio::task::JoinHandle<()>> {
    let on = |sig: Signal| signal(SignalKind::from_raw(sig as i32));
    let mut term = on(Signal::SIGTERM)?;
    let mut int = on(Signal::SIGINT)?;
    let mut quit = on(Signal::SIGQUIT)?;
    let mut hup = on(Signal::SIGHUP)?;
    let mut usr1 = on(Signal::SIGUSR1)?;
    let mut usr2 = on(Signal::SIGUSR2)?;
    let mut ttin = on(Signal::SIGTTIN)?;
    let mut ttou = on(Signal::SIGTTOU)?;
    Ok(tokio::spawn(async move {
        let mut interrupts = 0u32;
        loop {
            let sig = tokio::select! {
                Some(()) = term.recv() => Signal::SIGTERM,
                Some(()) = int.recv() => Signal::SIGINT,
                Some(()) = quit.recv() => Signal::SIGQUIT,
                Some(()) = hup.recv() => Signal::SIGHUP,
                Some(()) = usr1.recv() => Signal::SIGUSR1,
                Some(()) = usr2.recv() => Signal::SIGUSR2,
                Some(()) = ttin.recv() => Signal::SIGTTIN,
                Some(()) = ttou.recv() => Signal::SIGTTOU,
                else => return,
            };
            let Some(act) = action(sig, interrupts) else {
                continue;
            };
            if sig == Signal::SIGINT {
                interrupts = interrupts.saturating_add(1);
            }
            tracing::info!("{sig}: {act:?}");
            let cluster = cluster.clone();
            match act {
                Action::Stop(mode) => cluster.stop_nowait(mode),
                Action::Scale(by) => {
                    tokio::spawn(async move {
                        match cluster.scale_to(ScaleTo::By(by)).await {
                            Ok(r) => tracing::info!("{sig}: {} → {} workers", r.from, r.to),
                            Err(e) => tracing::warn!("{sig}: scale failed: {e}"),
                        }
                    });
                }
                Action::Reload => {
                    tokio::spawn(async move {
                        match cluster.reload().await {
                            Ok(r) => tracing::info!(
                                "{sig}: reloaded to generation {} in {} ms",
                                r.generation,
                                r.took_ms
                            ),
                            Err(e) => tracing::error!("{sig}: {e}"),
                        }
                    });
                }
                Action::Upgrade => {
                    tokio::spawn(async move {
                        // The upgrade logs its outcome, either way.
                        let _ = cluster.upgrade().await;
                    });
                }
                Action::LogStatus => {
                    tokio::spawn(async move {
                        if let Ok(status) = cluster.status().await {
                            tracing::info!("status:\n{}", status.table());
                        }
                    });
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signal_table() {
        assert_eq!(
            action(Signal::SIGTERM, 0),
            Some(Action::Stop(StopMode::Graceful))
        );
        assert_eq!(
            action(Signal::SIGTERM, 3),
            Some(Action::Stop(StopMode::Graceful))
        );
        assert_eq!(
            action(Signal::SIGINT, 0),
            Some(Action::Stop(StopMode::Graceful))
        );
        assert_eq!(action(Signal::SIGINT, 1), Some(Action::Stop(StopMode::Now)));
        assert_eq!(
            action(Signal::SIGQUIT, 0),
            Some(Action::Stop(StopMode::Now))
        );
        assert_eq!(action(Signal::SIGTTIN, 0), Some(Action::Scale(1)));
        assert_eq!(action(Signal::SIGTTOU, 0), Some(Action::Scale(-1)));
        assert_eq!(action(Signal::SIGHUP, 0), Some(Action::Reload));
        assert_eq!(action(Signal::SIGUSR2, 0), Some(Action::Upgrade));
        assert_eq!(action(Signal::SIGUSR1, 0), Some(Action::LogStatus));
        assert_eq!(action(Signal::SIGCHLD, 0), None);
        for sig in HANDLED {
            assert!(action(sig, 0).is_some(), "{sig} is handled");
        }
    }
}
