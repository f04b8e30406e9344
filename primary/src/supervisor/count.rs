//! Cluster-wide connection counts (`server.getConnections()` across processes): a worker's
//! or the library's question goes to every member of the listener, and the answers are summed
//! ([`Counts`](crate::counts::Counts)).

use netcluster_protocol::message::{CountError, ListenKey, ToWorker};

use crate::counts::{Answered, Asker};
use crate::supervisor::timers::Timer;
use crate::supervisor::{OVER_LIMIT_STREAK, Supervisor};
use crate::worker::conn::SendFailed;

impl Supervisor {
    pub(super) fn count_request(&mut self, id: u32, seq: u64, key: &ListenKey) {
        let limit = self.settings.limits.requests;
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        if w.requests >= limit {
            let _ = w.send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::TooMany { limit }),
                },
                Vec::new(),
            );
            // A burst past the limit is refused, not punished; a worker that does nothing but
            // push past it is flooding.
            w.over_limit = w.over_limit.saturating_add(1);
            if w.over_limit > OVER_LIMIT_STREAK {
                self.kill(
                    id,
                    &format!(
                        "{OVER_LIMIT_STREAK} count requests in a row over its limit of {limit}"
                    ),
                );
            }
            return;
        }
        w.over_limit = 0;
        if self.stop.active() {
            let _ = w.send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::Stopping),
                },
                Vec::new(),
            );
            return;
        }
        w.requests += 1;
        match self.registry.find(key) {
            Some(l) => self.ask_count(l, Asker::Worker { id, seq }),
            None => self.deliver(Answered {
                asker: Asker::Worker { id, seq },
                result: Ok(0),
                timer: None,
            }),
        }
    }

    /// Asks every member of listener `l` for its open connections, for `asker`.
    pub(super) fn ask_count(&mut self, l: u64, asker: Asker) {
        let Some(listener) = self.registry.get(l) else {
            self.deliver(Answered {
                asker,
                result: Ok(0),
                timer: None,
            });
            return;
        };
        let members = listener.members.clone();
        let key = listener.key.clone();
        match self.counts.ask(members.clone(), asker) {
            Ok(seq) => {
                self.arm_count(seq);
                for w in members {
                    self.send_or_fail_count(
                        w,
                        seq,
                        ToWorker::CountQuery {
                            seq,
                            key: key.clone(),
                        },
                    );
                }
            }
            Err(done) => self.deliver(done),
        }
    }

    pub(super) fn arm_count(&mut self, seq: u64) {
        let timer = Timer::Count { seq };
        self.timers.arm(timer, self.settings.timeouts.count);
        self.counts.set_timer(seq, timer);
    }

    pub(super) fn send_or_fail_count(&mut self, worker: u32, seq: u64, msg: ToWorker) {
        let failed = match self.table.get(worker) {
            Some(w) => match w.send(msg, Vec::new()) {
                Ok(()) => None,
                Err(SendFailed::Full) => Some(CountError::Unresponsive { worker }),
                Err(SendFailed::Closed) => Some(CountError::WorkerExited { worker }),
            },
            None => Some(CountError::WorkerExited { worker }),
        };
        if let Some(err) = failed {
            if let Some(done) = self.counts.fail(seq, err) {
                self.deliver(done);
            }
        }
    }

    /// Gives a finished count to whoever asked.
    pub(super) fn deliver(&mut self, done: Answered) {
        if let Some(timer) = done.timer {
            self.timers.disarm(timer);
        }
        match done.asker {
            Asker::Api(tx) | Asker::Sent(tx) => {
                let _ = tx.send(done.result);
            }
            Asker::Worker { id, seq } => {
                if let Some(w) = self.table.get_mut(id) {
                    w.requests = w.requests.saturating_sub(1);
                    let _ = w.send(
                        ToWorker::CountResult {
                            seq,
                            result: done.result,
                        },
                        Vec::new(),
                    );
                }
            }
        }
    }
}
