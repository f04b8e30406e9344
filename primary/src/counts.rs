//! Cluster-wide connection counts (`getConnections` across workers, which Node cannot do:
//! nodejs/node#48333): the primary asks every worker that shares a socket and sums the answers.
//!
//! [`Counts`] is the bookkeeping of the questions in flight; the supervisor sends the questions
//! and feeds the answers in. Every value from a worker is checked: an answer to a question
//! never asked, a second answer, or a count of `u64::MAX` changes nothing it should not (sums
//! saturate).

use std::collections::{BTreeSet, HashMap};

use netcluster_protocol::message::CountError;
use tokio::sync::oneshot;

/// Who waits for a count.
#[derive(Debug)]
pub(crate) enum Asker {
    /// The library (`Cluster::get_connections`), for one listener of several being summed.
    Api(oneshot::Sender<Result<u64, CountError>>),
    /// A worker's `server.getConnections()` across the cluster: answered with
    /// `ToWorker::CountResult`.
    Worker {
        /// The worker that asked.
        id: u32,
        /// Its request number.
        seq: u64,
    },
    /// A primary's server counting the sockets it sent to one worker (`CountSent`).
    Sent(oneshot::Sender<Result<u64, CountError>>),
}

#[derive(Debug)]
struct Question {
    remaining: BTreeSet<u32>,
    total: u64,
    asker: Asker,
    timer: Option<crate::supervisor::timers::Timer>,
}

/// A question whose answer is complete (or failed).
#[derive(Debug)]
pub(crate) struct Answered {
    pub asker: Asker,
    pub result: Result<u64, CountError>,
    /// Its deadline, to cancel.
    pub timer: Option<crate::supervisor::timers::Timer>,
}

/// What an answer did.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Not a question in flight to that worker (never asked, answered twice, or late).
    Unexpected,
    /// Counted; others are still to answer.
    Counted,
    /// That was the last answer.
    Done(Answered),
}

/// Questions in flight.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    questions: HashMap<u64, Question>,
    next_seq: u64,
}

impl Counts {
    /// Records a question to `workers` for `asker`; returns its number, or the answer at once
    /// when nobody is to be asked.
    pub fn ask(&mut self, workers: BTreeSet<u32>, asker: Asker) -> Result<u64, Answered> {
        if workers.is_empty() {
            return Err(Answered {
                asker,
                result: Ok(0),
                timer: None,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        self.questions.insert(
            seq,
            Question {
                remaining: workers,
                total: 0,
                asker,
                timer: None,
            },
        );
        Ok(seq)
    }

    /// Attaches question `seq`'s deadline.
    pub fn set_timer(&mut self, seq: u64, key: crate::supervisor::timers::Timer) {
        if let Some(q) = self.questions.get_mut(&seq) {
            q.timer = Some(key);
        }
    }

    /// Worker `from` answered question `seq` with `count`.
    pub fn answer(&mut self, from: u32, seq: u64, count: u64) -> Outcome {
        let Some(q) = self.questions.get_mut(&seq) else {
            return Outcome::Unexpected;
        };
        if !q.remaining.remove(&from) {
            return Outcome::Unexpected;
        }
        q.total = q.total.saturating_add(count);
        if !q.remaining.is_empty() {
            return Outcome::Counted;
        }
        match self.questions.remove(&seq) {
            Some(q) => Outcome::Done(Answered {
                asker: q.asker,
                result: Ok(q.total),
                timer: q.timer,
            }),
            None => Outcome::Unexpected,
        }
    }

    /// Question `seq` fails with `err` (a worker could not be asked).
    pub fn fail(&mut self, seq: u64, err: CountError) -> Option<Answered> {
        self.questions.remove(&seq).map(|q| Answered {
            asker: q.asker,
            result: Err(err),
            timer: q.timer,
        })
    }

    /// Question `seq`'s deadline passed.
    pub fn expire(&mut self, seq: u64, timeout_ms: u64) -> Option<Answered> {
        let q = self.questions.remove(&seq)?;
        Some(Answered {
            asker: q.asker,
            result: Err(CountError::TimedOut {
                workers: q.remaining.into_iter().collect(),
                timeout_ms,
            }),
            timer: None,
        })
    }

    /// Worker `id` is gone: every question still waiting for it fails (Node's
    /// `ERR_CHILD_CLOSED_BEFORE_REPLY`), and the questions it asked are dropped.
    pub fn worker_gone(&mut self, id: u32) -> Vec<Answered> {
        let failed: Vec<u64> = self
            .questions
            .iter()
            .filter(|(_, q)| q.remaining.contains(&id))
            .map(|(&seq, _)| seq)
            .collect();
        let mut out: Vec<Answered> = failed
            .into_iter()
            .filter_map(|seq| self.fail(seq, CountError::WorkerExited { worker: id }))
            .collect();
        let asked: Vec<u64> = self
            .questions
            .iter()
            .filter(|(_, q)| matches!(q.asker, Asker::Worker { id: w, .. } if w == id))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in asked {
            if let Some(q) = self.questions.remove(&seq) {
                out.push(Answered {
                    asker: q.asker,
                    result: Err(CountError::WorkerExited { worker: id }),
                    timer: q.timer,
                });
            }
        }
        out
    }

    /// Questions in flight.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.questions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> (Asker, oneshot::Receiver<Result<u64, CountError>>) {
        let (tx, rx) = oneshot::channel();
        (Asker::Api(tx), rx)
    }

    fn result(a: Answered) -> Result<u64, CountError> {
        a.result
    }

    #[test]
    fn counts_add_up_over_the_workers_that_answer() {
        let mut c = Counts::default();
        let (asker, _rx) = api();
        let seq = c.ask(BTreeSet::from([1, 2, 3]), asker).expect("asked");
        assert!(matches!(c.answer(1, seq, 10), Outcome::Counted));
        assert!(
            matches!(c.answer(1, seq, 10), Outcome::Unexpected),
            "a duplicate counts once"
        );
        assert!(
            matches!(c.answer(9, seq, 100), Outcome::Unexpected),
            "not asked"
        );
        assert!(
            matches!(c.answer(2, seq + 1, 5), Outcome::Unexpected),
            "another question"
        );
        assert!(matches!(c.answer(2, seq, 5), Outcome::Counted));
        let Outcome::Done(done) = c.answer(3, seq, 0) else {
            panic!("complete")
        };
        assert_eq!(result(done), Ok(15));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        let mut c = Counts::default();
        let (asker, _rx) = api();
        let seq = c.ask(BTreeSet::from([1, 2]), asker).expect("asked");
        c.answer(1, seq, u64::MAX);
        let Outcome::Done(done) = c.answer(2, seq, u64::MAX) else {
            panic!("complete")
        };
        assert_eq!(result(done), Ok(u64::MAX));
    }

    #[test]
    fn a_worker_that_exits_before_replying_fails_the_count() {
        let mut c = Counts::default();
        let (a, _rx) = api();
        let (b, _rx2) = api();
        let seven = c.ask(BTreeSet::from([1, 2]), a).expect("asked");
        let eight = c.ask(BTreeSet::from([1]), b).expect("asked");
        c.answer(1, seven, 3);
        let failed = c.worker_gone(2);
        assert_eq!(failed.len(), 1);
        let err = failed
            .into_iter()
            .next()
            .map(result)
            .expect("one")
            .expect_err("failed");
        assert_eq!(
            err.to_string(),
            "worker 2 exited before replying (ERR_CHILD_CLOSED_BEFORE_REPLY)"
        );
        // Questions that did not wait for worker 2 go on.
        let Outcome::Done(done) = c.answer(1, eight, 4) else {
            panic!("complete")
        };
        assert_eq!(result(done), Ok(4));
    }

    #[test]
    fn questions_a_dead_worker_asked_are_dropped_and_timeouts_name_the_silent() {
        let mut c = Counts::default();
        let seq = c
            .ask(BTreeSet::from([1, 2]), Asker::Worker { id: 5, seq: 1 })
            .expect("asked");
        assert_eq!(c.worker_gone(5).len(), 1);
        assert_eq!(c.len(), 0);
        let (a, _rx) = api();
        let seq2 = c.ask(BTreeSet::from([1, 2]), a).expect("asked");
        assert_ne!(seq, seq2);
        c.answer(1, seq2, 1);
        let err = c
            .expire(seq2, 5000)
            .map(result)
            .expect("expired")
            .expect_err("timed out");
        assert_eq!(
            err,
            CountError::TimedOut {
                workers: vec![2],
                timeout_ms: 5000
            }
        );
        assert!(c.expire(seq2, 5000).is_none());
    }

    #[test]
    fn nobody_to_ask_is_zero_at_once() {
        let mut c = Counts::default();
        let (a, _rx) = api();
        let done = c.ask(BTreeSet::new(), a).expect_err("answered at once");
        assert_eq!(result(done), Ok(0));
    }
}
