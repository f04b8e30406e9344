//! The loop's deadlines: [`Timer`] names one, [`Timers`] keeps them.
//!
//! A timer is known by its value: arming one that is already armed moves it, and disarming
//! needs nothing but the value. Machines name the timers they want in [`Effect::Arm`] and
//! [`Effect::Disarm`](super::effect::Effect::Disarm) and never hold a queue key.
//!
//! [`Effect::Arm`]: super::effect::Effect::Arm

use std::collections::HashMap;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_util::time::{DelayQueue, delay_queue};

/// A deadline the loop keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// Slot `slot`'s next start after a back-off.
    Respawn {
        /// The slot.
        slot: usize,
    },
    /// A message of round-robin hand-offs (named by its first hand-off number).
    Handoff {
        /// The round-robin listener.
        listener: u64,
        /// The worker it went to.
        worker: u32,
        /// The message.
        batch: u64,
    },
    /// A cluster-wide count's deadline.
    Count {
        /// The count.
        seq: u64,
    },
    /// How long `status` waits for workers' figures.
    Status {
        /// The status request.
        seq: u64,
    },
    /// A suspected worker's ping.
    Ping {
        /// The worker.
        worker: u32,
        /// The ping.
        seq: u64,
    },
    /// A draining worker's kill deadline.
    Kill {
        /// The worker.
        worker: u32,
    },
    /// A scale's ready deadline.
    Ready {
        /// The scale.
        wait: u64,
    },
    /// A program worker counts as ready (`--ready-after`).
    ReadyAfter {
        /// The worker.
        worker: u32,
    },
    /// A program worker that has not said `READY=1` by now is told about in the log and the
    /// status.
    ReadyHint {
        /// The worker.
        worker: u32,
    },
    /// A reload's new worker must be ready by now.
    ReloadReady {
        /// The new worker.
        worker: u32,
    },
    /// The stop's handshake grace is over.
    StopGrace,
    /// The stop looks at the accept queues again.
    StopPoll,
    /// Leaving reuseport slots' queues are looked at again.
    RetirePoll,
    /// The stop stops waiting for hand-offs and queues and drains the workers.
    StopFlush,
    /// The stop kills what still runs.
    StopKill,
    /// The stop gives up on workers that were not reaped.
    StopGiveUp,
    /// Orphans of workers are reaped, or killed when their worker is gone.
    Sweep,
    /// Workers are measured for recycling (connections served, memory).
    RecycleCheck,
    /// A program worker's `WATCHDOG=1` is due.
    WatchdogDue {
        /// The worker.
        worker: u32,
    },
    /// `WATCHDOG=1` to systemd.
    Watchdog,
    /// `STATUS=` to systemd, when it changed.
    SystemdStatus,
}

/// The armed timers, by value.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    queue: DelayQueue<Timer>,
    keys: HashMap<Timer, (delay_queue::Key, Instant)>,
}

impl Timers {
    /// Arms `timer` to fire at `at` (moves it if it is armed).
    pub fn arm_at(&mut self, timer: Timer, at: Instant) {
        match self.keys.get_mut(&timer) {
            Some((key, when)) => {
                self.queue.reset_at(key, at.into());
                *when = at;
            }
            None => {
                let key = self.queue.insert_at(timer, at.into());
                self.keys.insert(timer, (key, at));
            }
        }
    }

    /// Arms `timer` to fire after `after`.
    pub fn arm(&mut self, timer: Timer, after: Duration) {
        self.arm_at(timer, Instant::now() + after);
    }

    /// Disarms `timer` if it is armed.
    pub fn disarm(&mut self, timer: Timer) {
        if let Some((key, _)) = self.keys.remove(&timer) {
            self.queue.try_remove(&key);
        }
    }

    /// Whether `timer` is armed.
    pub fn is_armed(&self, timer: Timer) -> bool {
        self.keys.contains_key(&timer)
    }

    /// When `timer` fires, if it is armed.
    #[cfg(test)]
    pub fn when(&self, timer: Timer) -> Option<Instant> {
        self.keys.get(&timer).map(|&(_, at)| at)
    }

    /// The next timer that fired.
    ///
    /// # Cancel safety
    /// Cancel safe: a timer leaves the queue only in the poll that returns it.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Option<Timer>> {
        match self.queue.poll_expired(cx) {
            Poll::Ready(Some(expired)) => {
                let timer = expired.into_inner();
                self.keys.remove(&timer);
                Poll::Ready(Some(timer))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Timer, Timers};

    #[tokio::test]
    async fn a_timer_is_known_by_its_value() {
        let mut t = Timers::default();
        let k = Timer::Kill { worker: 1 };
        t.arm(k, Duration::from_secs(3600));
        t.arm(k, Duration::from_millis(5));
        assert!(t.is_armed(k));
        assert!(
            t.when(k)
                .is_some_and(|at| at < Instant::now() + Duration::from_secs(60))
        );
        t.arm(Timer::StopGrace, Duration::from_millis(1));
        t.disarm(Timer::StopGrace);
        let fired = std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert_eq!(fired, Some(k), "moved to the earlier deadline, fired once");
        assert!(!t.is_armed(k));
        assert_eq!(std::future::poll_fn(|cx| t.poll_expired(cx)).await, None);
    }
}
