//! Stopping the cluster without losing a connection.
//!
//! A graceful stop goes through three phases:
//! 1. **Refusing**: no new handshake starts on the primary's own sockets; those under way get
//!    a round trip ([`HANDSHAKE_GRACE`]) to land in the accept queues.
//! 2. **Flushing**: round-robin listeners stop accepting and what they accepted is handed off;
//!    the workers keep accepting from shared and reuseport sockets until their queues are
//!    empty (looked at every [`QUEUE_POLL`]), for at most the drain timeout.
//! 3. **Draining**: every worker is told to stop and finishes its connections; what still runs
//!    at the drain timeout (plus [`KILL_GRACE`]) is killed, and workers not reaped 5 s later are
//!    given up on.
//!
//! A stop `Now` kills every worker at once. A `Handover` (an upgrade) leaves the sockets to
//! the next primary: nothing is filtered and nothing waits for their queues.

use std::time::Duration;

use crate::command::{Reply, StopMode};
use crate::event::Event;
use crate::supervisor::effect::{Effect, Happening, Machine, Note, View};
use crate::supervisor::machines::retire::{HANDSHAKE_GRACE, QUEUE_POLL};
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;

/// Time beyond the drain deadline before a worker still running is killed.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long after the `SIGKILL`s the stop waits for the workers to be reaped.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);

/// Where a stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopPhase {
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

/// The stop machine.
#[derive(Debug, Default)]
pub(crate) struct Stop {
    state: Option<Stopping>,
}

impl Stop {
    /// Whether a stop is under way.
    pub fn active(&self) -> bool {
        self.state.is_some()
    }

    /// Whether the stop is an upgrade's hand-over.
    pub fn handover(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.handover)
    }

    /// The stop's phase.
    #[cfg(test)]
    pub fn phase(&self) -> Option<StopPhase> {
        self.state.as_ref().map(|s| s.phase)
    }

    /// Remembers a worker's exit for the stop's reply.
    pub fn record_exit(&mut self, event: &Event) {
        if let Some(s) = &mut self.state {
            s.exits.push(event.clone());
        }
    }

    /// Whether the stop is done (every worker gone, or given up on); if so, its replies get
    /// the exits.
    pub fn finish(&mut self, view: &View<'_>) -> bool {
        let Some(s) = &mut self.state else {
            return false;
        };
        if !view.table.workers.is_empty() && !s.given_up {
            return false;
        }
        for reply in s.replies.drain(..) {
            let _ = reply.send(s.exits.clone());
        }
        true
    }

    /// A stop was asked for. The first one starts the stop; a later one waits for it too (and
    /// a later `Now` kills what runs).
    pub fn begin(
        &mut self,
        mode: StopMode,
        reply: Option<Reply<Vec<Event>>>,
        view: &View<'_>,
    ) -> Vec<Effect> {
        if let Some(s) = &mut self.state {
            s.replies.extend(reply);
            if mode == StopMode::Now {
                tracing::warn!("stopping now: killing every worker");
                return self.kill_all(view);
            }
            return Vec::new();
        }
        tracing::info!(?mode, "stopping");
        let handover = mode == StopMode::Handover;
        self.state = Some(Stopping {
            phase: StopPhase::Refusing,
            replies: reply.into_iter().collect(),
            exits: Vec::new(),
            given_up: false,
            polling: false,
            handover,
        });
        let mut effects = vec![Effect::Notify(Note::Stopping { handover })];
        if handover {
            // The sockets are the next primary's now: nothing is filtered, no socket file is
            // removed, and nothing waits for the queues it keeps accepting from.
            effects.push(Effect::KeepSocketFiles);
            effects.extend(self.close_listeners(view));
            return effects;
        }
        effects.push(Effect::RefuseNew);
        if mode == StopMode::Now {
            effects.extend(self.close_listeners(view));
            effects.extend(self.kill_all(view));
        } else {
            effects.push(Effect::Arm {
                timer: Timer::StopGrace,
                at: view.now + HANDSHAKE_GRACE,
            });
        }
        effects
    }

    /// The handshake grace is over: round-robin listeners stop accepting and what they took is
    /// handed off; the workers are told to drain once that is done.
    fn close_listeners(&mut self, view: &View<'_>) -> Vec<Effect> {
        if let Some(s) = &mut self.state {
            if s.phase == StopPhase::Refusing {
                s.phase = StopPhase::Flushing;
            }
        }
        let mut effects = vec![
            Effect::StopAccepting,
            Effect::Arm {
                timer: Timer::StopFlush,
                at: view.now + view.settings.drain_timeout,
            },
        ];
        effects.extend(self.check_flushed(view));
        effects
    }

    /// Once every round-robin connection is handed off and the queues are empty, the workers
    /// drain.
    fn check_flushed(&mut self, view: &View<'_>) -> Vec<Effect> {
        let Some(s) = &mut self.state else {
            return Vec::new();
        };
        if s.phase != StopPhase::Flushing {
            return Vec::new();
        }
        let idle = view.handed_off();
        if !view.serving() || (idle && (s.handover || view.queues_empty())) {
            return self.begin_drain(view);
        }
        if idle && !s.polling {
            // The workers are still taking what waits in the shared or reuseport queues.
            s.polling = true;
            return vec![Effect::Arm {
                timer: Timer::StopPoll,
                at: view.now + QUEUE_POLL,
            }];
        }
        Vec::new()
    }

    fn begin_drain(&mut self, view: &View<'_>) -> Vec<Effect> {
        if let Some(s) = &mut self.state {
            if s.phase == StopPhase::Draining {
                return Vec::new();
            }
            s.phase = StopPhase::Draining;
        }
        let mut effects = vec![Effect::CloseQueues];
        effects.extend(view.workers().into_iter().map(|worker| Effect::Drain {
            worker,
            reason: DrainReason::Stop,
        }));
        effects.push(Effect::Arm {
            timer: Timer::StopKill,
            at: view.now + view.settings.drain_timeout.saturating_add(KILL_GRACE),
        });
        effects
    }

    fn kill_all(&mut self, view: &View<'_>) -> Vec<Effect> {
        if let Some(s) = &mut self.state {
            s.phase = StopPhase::Draining;
        }
        vec![
            Effect::KillAll,
            Effect::Arm {
                timer: Timer::StopGiveUp,
                at: view.now + GIVE_UP_AFTER,
            },
        ]
    }
}

impl Machine for Stop {
    fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) -> Vec<Effect> {
        if self.state.is_none() {
            return Vec::new();
        }
        match happening {
            Happening::Timer(Timer::StopGrace) => self.close_listeners(view),
            Happening::Timer(Timer::StopPoll) => {
                if let Some(s) = &mut self.state {
                    s.polling = false;
                }
                self.check_flushed(view)
            }
            Happening::Timer(Timer::StopFlush) => self.begin_drain(view),
            Happening::Timer(Timer::StopKill) => {
                let mut effects: Vec<Effect> = view
                    .workers()
                    .into_iter()
                    .map(|worker| Effect::Kill { worker })
                    .collect();
                effects.push(Effect::Arm {
                    timer: Timer::StopGiveUp,
                    at: view.now + GIVE_UP_AFTER,
                });
                effects
            }
            Happening::Timer(Timer::StopGiveUp) => {
                if let Some(s) = &mut self.state {
                    if !view.table.workers.is_empty() {
                        tracing::error!(
                            workers = view.table.workers.len(),
                            "workers were not reaped after SIGKILL; giving up on them"
                        );
                    }
                    s.given_up = true;
                }
                Vec::new()
            }
            Happening::Exited { .. } | Happening::Flushed => self.check_flushed(view),
            _ => Vec::new(),
        }
    }
}
