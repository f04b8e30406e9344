//! A worker's life, as a table of transitions.
//!
//! [`WorkerState`] is Node's `worker.state` (what the API reports); [`Phase`] is the same life
//! with the data each state carries (when it began, why a drain started and its deadline, how
//! the process ended). Every change goes through [`Phase::next`], which either gives the new
//! phase or refuses the transition; there is no other way to change a worker's state, so no
//! path can skip the rules (a late `Listening` cannot undo a drain; nothing leaves `Dead`).

use std::time::Instant;

/// Where a worker is in its life (Node's `worker.state`): `None → Online → Listening →
/// Disconnecting → Disconnected → Dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::None => "starting",
            WorkerState::Online => "online",
            WorkerState::Listening => "listening",
            WorkerState::Disconnecting => "draining",
            WorkerState::Disconnected => "disconnected",
            WorkerState::Dead => "dead",
        })
    }
}

/// Why a worker is draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The worker disconnected by itself.
    ByWorker,
    /// `worker.disconnect()` from the library.
    Disconnect,
    /// Its slot was scaled away.
    ScaleDown,
    /// A worker of a newer generation took its slot over.
    Replaced,
    /// The cluster is stopping.
    Stop,
}

/// How a worker's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
}

/// A worker's state with the data that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forked; no handshake yet.
    Starting,
    /// Handshake done.
    Online,
    /// Holds at least one listener.
    Listening,
    /// Stopping: closing its servers and finishing connections until `deadline`.
    Draining {
        /// Why.
        reason: DrainReason,
        /// When the primary kills it if it is still running.
        deadline: Instant,
    },
    /// Channel closed; the process has not been reaped yet.
    Disconnected {
        /// Whether it was draining when the channel closed.
        draining: bool,
    },
    /// Reaped.
    Dead(Exit),
}

/// Something that happens to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It sent its Hello.
    Hello,
    /// It was granted a listener.
    Listened,
    /// It is to stop.
    Drain {
        /// Why.
        reason: DrainReason,
        /// Kill deadline.
        deadline: Instant,
    },
    /// Its channel closed.
    ChannelClosed,
    /// Its process was reaped.
    Exited(Exit),
}

/// A transition the table does not allow from the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{transition:?} is not allowed while the worker is {from:?}")]
pub struct Refused {
    /// The phase it was in.
    pub from: Phase,
    /// What was refused.
    pub transition: Transition,
}

impl Phase {
    /// Node's name for the phase.
    pub fn state(&self) -> WorkerState {
        match self {
            Phase::Starting => WorkerState::None,
            Phase::Online => WorkerState::Online,
            Phase::Listening => WorkerState::Listening,
            Phase::Draining { .. } => WorkerState::Disconnecting,
            Phase::Disconnected { .. } => WorkerState::Disconnected,
            Phase::Dead(_) => WorkerState::Dead,
        }
    }

    /// The transition table: the phase after `t`, or why not.
    ///
    /// | from \ to | Hello | Listened | Drain | ChannelClosed | Exited |
    /// |---|---|---|---|---|---|
    /// | Starting | Online | refused | Draining | Disconnected | Dead |
    /// | Online | refused | Listening | Draining | Disconnected | Dead |
    /// | Listening | refused | Listening | Draining | Disconnected | Dead |
    /// | Draining | refused | refused | Draining (earlier deadline) | Disconnected | Dead |
    /// | Disconnected | refused | refused | Disconnected | refused | Dead |
    /// | Dead | refused | refused | refused | refused | refused |
    ///
    /// # Errors
    /// [`Refused`] for the cells marked so: a second Hello, a listen before the handshake or
    /// while stopping, anything after death.
    pub fn next(self, t: Transition) -> Result<Phase, Refused> {
        use Phase as P;
        use Transition as T;
        let refused = Err(Refused {
            from: self,
            transition: t,
        });
        match (self, t) {
            (P::Dead(_), _) => refused,
            (_, T::Exited(exit)) => Ok(P::Dead(exit)),
            (P::Starting, T::Hello) => Ok(P::Online),
            (_, T::Hello) => refused,
            (P::Online | P::Listening, T::Listened) => Ok(P::Listening),
            (_, T::Listened) => refused,
            (P::Starting | P::Online | P::Listening, T::Drain { reason, deadline }) => {
                Ok(P::Draining { reason, deadline })
            }
            (
                P::Draining {
                    reason,
                    deadline: old,
                },
                T::Drain { deadline, .. },
            ) => Ok(P::Draining {
                reason,
                deadline: old.min(deadline),
            }),
            (P::Disconnected { draining }, T::Drain { .. }) => Ok(P::Disconnected { draining }),
            (P::Draining { .. }, T::ChannelClosed) => Ok(P::Disconnected { draining: true }),
            (P::Starting | P::Online | P::Listening, T::ChannelClosed) => {
                Ok(P::Disconnected { draining: false })
            }
            (P::Disconnected { .. }, T::ChannelClosed) => refused,
        }
    }

    /// Whether the worker may be given work (new connections, listeners).
    pub fn serving(&self) -> bool {
        matches!(self, Phase::Online | Phase::Listening)
    }

    /// Whether its channel is still open.
    pub fn connected(&self) -> bool {
        !matches!(self, Phase::Disconnected { .. } | Phase::Dead(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn drain(at: Instant) -> Transition {
        Transition::Drain {
            reason: DrainReason::Stop,
            deadline: at,
        }
    }

    const EXIT: Exit = Exit {
        code: Some(0),
        signal: None,
    };

    #[test]
    fn the_normal_life() {
        let at = Instant::now();
        let mut p = Phase::Starting;
        for (t, want) in [
            (Transition::Hello, WorkerState::Online),
            (Transition::Listened, WorkerState::Listening),
            (Transition::Listened, WorkerState::Listening),
            (drain(at), WorkerState::Disconnecting),
            (Transition::ChannelClosed, WorkerState::Disconnected),
            (Transition::Exited(EXIT), WorkerState::Dead),
        ] {
            p = p.next(t).expect("allowed");
            assert_eq!(p.state(), want);
        }
    }

    #[test]
    fn refused_transitions() {
        let at = Instant::now();
        let dead = Phase::Dead(EXIT);
        let draining = Phase::Draining {
            reason: DrainReason::Stop,
            deadline: at,
        };
        let cases = [
            (Phase::Starting, Transition::Listened),
            (Phase::Online, Transition::Hello),
            (Phase::Listening, Transition::Hello),
            (draining, Transition::Listened),
            (draining, Transition::Hello),
            (
                Phase::Disconnected { draining: false },
                Transition::Listened,
            ),
            (
                Phase::Disconnected { draining: true },
                Transition::ChannelClosed,
            ),
            (dead, Transition::Hello),
            (dead, Transition::Listened),
            (dead, drain(at)),
            (dead, Transition::ChannelClosed),
            (dead, Transition::Exited(EXIT)),
        ];
        for (from, t) in cases {
            let err = from.next(t).expect_err("refused");
            assert_eq!((err.from, err.transition), (from, t));
        }
    }

    #[test]
    fn a_drain_keeps_the_earlier_deadline_and_its_reason() {
        let now = Instant::now();
        let p = Phase::Listening
            .next(Transition::Drain {
                reason: DrainReason::ScaleDown,
                deadline: now + Duration::from_secs(5),
            })
            .expect("drain");
        let p = p.next(drain(now + Duration::from_secs(9))).expect("again");
        assert_eq!(
            p,
            Phase::Draining {
                reason: DrainReason::ScaleDown,
                deadline: now + Duration::from_secs(5)
            }
        );
        let p = p.next(drain(now)).expect("sooner");
        assert!(matches!(p, Phase::Draining { deadline, .. } if deadline == now));
    }

    #[test]
    fn exit_is_allowed_from_every_live_phase_and_a_crash_skips_the_channel_close() {
        let now = Instant::now();
        for from in [
            Phase::Starting,
            Phase::Online,
            Phase::Listening,
            Phase::Draining {
                reason: DrainReason::Stop,
                deadline: now,
            },
            Phase::Disconnected { draining: false },
        ] {
            assert_eq!(
                from.next(Transition::Exited(EXIT)).expect("exit"),
                Phase::Dead(EXIT)
            );
        }
    }

    #[test]
    fn serving_and_connected() {
        assert!(!Phase::Starting.serving());
        assert!(Phase::Online.serving() && Phase::Listening.serving());
        assert!(
            !Phase::Draining {
                reason: DrainReason::Stop,
                deadline: Instant::now()
            }
            .serving()
        );
        assert!(Phase::Starting.connected());
        assert!(!Phase::Disconnected { draining: true }.connected());
        assert!(!Phase::Dead(EXIT).connected());
    }
}
