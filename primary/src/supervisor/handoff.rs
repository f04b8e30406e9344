//! Round robin in the loop: connections from the accept tasks, hand-offs to workers, their
//! answers and deadlines ([`Handoffs`](crate::supervisor::machines::handoff::Handoffs)).

use std::os::fd::AsFd;

use netcluster_protocol::message::{ToWorker, monotonic_ms};

use crate::round_robin::Accepted;
use crate::supervisor::effect::Happening;
use crate::supervisor::machines::handoff::Verdict;
use crate::supervisor::{ACCEPTED_AT_ONCE, BACKLOG_DRAIN, Supervisor};
use crate::worker::conn::{OutFd, SendFailed};

impl Supervisor {
    /// Connections the accept tasks took: this one and every other already queued (an accept
    /// task takes what the backlog holds in one go), then one dispatch per listener, so that
    /// the connections of a burst travel several to a message.
    pub(super) fn accepted(&mut self, first: Accepted) {
        let mut touched: Vec<u64> = Vec::new();
        let mut next = Some(first);
        let mut taken = 0usize;
        while let Some(accepted) = next.take() {
            taken += 1;
            match accepted.conn {
                None => self.acceptor_done(accepted.listener),
                Some(conn) => {
                    if let Some(rr) = self
                        .registry
                        .get_mut(accepted.listener)
                        .and_then(|l| l.round_robin())
                    {
                        rr.push(conn);
                        if !touched.contains(&accepted.listener) {
                            touched.push(accepted.listener);
                        }
                    }
                }
            }
            // Bounded, so that commands and workers' messages are not held up by a flood.
            if taken < ACCEPTED_AT_ONCE {
                next = self.accepts.try_recv().ok();
            }
        }
        for l in touched {
            self.dispatch(l);
        }
    }

    /// A round-robin listener's accept task has stopped and closed its copy of the socket.
    /// At a stop the primary's copy is now the last: take the backlog, then close it, with
    /// nothing in between.
    pub(super) fn acceptor_done(&mut self, id: u64) {
        if !self.stop.active() {
            return;
        }
        let Some(l) = self.registry.get_mut(id) else {
            return;
        };
        let fd = l.close_socket();
        let handover = self.stop.handover();
        // Under a hand-over the backlog is the next primary's, which accepts from it.
        if let (false, Some(rr), Some(fd)) = (handover, l.round_robin(), &fd) {
            for _ in 0..BACKLOG_DRAIN {
                match netcluster_protocol::fd::accept_nonblocking(fd.as_fd()) {
                    Ok(conn) => rr.push_fd(conn),
                    Err(_) => break,
                }
            }
        }
        drop(fd);
        self.dispatch(id);
        self.offer(&Happening::Flushed);
    }

    /// Worker `id` answered hand-offs of round-robin listener `listener`. Every number is checked
    /// against what is in flight to it; an answer to anything else changes nothing.
    pub(super) fn answered(&mut self, id: u32, listener: u64, accepted: &[u64], refused: &[u64]) {
        let Some(rr) = self
            .registry
            .get_mut(listener)
            .and_then(|l| l.round_robin())
        else {
            tracing::debug!(worker = id, listener, "answer for a closed listener");
            return;
        };
        let mut known = false;
        let mut unknown = None;
        let mut done = Vec::new();
        let answers = accepted
            .iter()
            .map(|&s| (s, true))
            .chain(refused.iter().map(|&s| (s, false)));
        for (seq, took) in answers {
            match rr.ack(id, seq, took) {
                Ok(finished) => {
                    known = true;
                    done.extend(finished);
                }
                Err(e) => unknown = Some(e),
            }
        }
        if let Some(e) = unknown {
            tracing::debug!("{e}");
        }
        let disarm = self.handoffs.answered(listener, &done);
        self.apply(disarm);
        if known {
            if let Some(w) = self.table.get_mut(id) {
                w.silent_handoffs = 0;
            }
            self.dispatch(listener);
            self.offer(&Happening::Flushed);
        }
    }

    /// Hands listener `l`'s waiting connections to its workers, several to a message when
    /// several wait for the same worker.
    pub(super) fn dispatch(&mut self, l: u64) {
        let handoff_ms =
            u64::try_from(self.settings.timeouts.handoff.as_millis()).unwrap_or(u64::MAX);
        loop {
            let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) else {
                return;
            };
            let batches = rr.next_batches();
            if batches.is_empty() {
                return;
            }
            // A message that could not be queued puts its connections back: go round again
            // (its worker is paused or gone, so this ends).
            let mut requeued = false;
            let expires_ms = monotonic_ms().saturating_add(handoff_ms);
            for b in batches {
                let sent = match self.table.get(b.worker) {
                    Some(w) => {
                        let msg = ToWorker::Connections {
                            listener: l,
                            seqs: b.seqs,
                            expires_ms,
                        };
                        let fds = b.fds.into_iter().map(OutFd::Shared).collect();
                        w.send(msg, fds)
                    }
                    None => Err(SendFailed::Closed),
                };
                match sent {
                    Ok(()) => {
                        let arm = self.handoffs.sent(
                            l,
                            b.worker,
                            b.id,
                            self.settings.timeouts.handoff,
                            std::time::Instant::now(),
                        );
                        self.apply(arm);
                    }
                    Err(e) => {
                        requeued = true;
                        let full = e == SendFailed::Full;
                        if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                            rr.not_sent(b.worker, b.id, full);
                        }
                        if full {
                            self.suspect(b.worker);
                        }
                    }
                }
            }
            if !requeued {
                return;
            }
        }
    }

    /// The deadline of message `batch` of listener `listener`'s hand-offs to `worker` passed.
    pub(super) fn handoff_expired(&mut self, listener: u64, worker: u32, batch: u64) {
        let expired = self
            .registry
            .get_mut(listener)
            .and_then(|l| l.round_robin())
            .is_some_and(|rr| rr.expire(worker, batch));
        if !expired {
            self.handoffs.expired(listener, batch, 0);
            return;
        }
        tracing::warn!(
            worker,
            "did not answer a hand-off in time; its connection goes to another worker"
        );
        let streak = self.table.get_mut(worker).map_or(0, |w| {
            w.silent_handoffs = w.silent_handoffs.saturating_add(1);
            w.silent_handoffs
        });
        match self.handoffs.expired(listener, batch, streak) {
            Verdict::Kill => self.kill(
                worker,
                &format!("it let {streak} hand-offs in a row expire"),
            ),
            Verdict::Suspect => {
                if self.table.get(worker).is_some_and(|w| w.phase().serving()) {
                    self.suspect(worker);
                }
            }
        }
        self.dispatch(listener);
    }
}
