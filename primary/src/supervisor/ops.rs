//! The commands that span workers — scale, status, stop — and what the machines ask of the
//! listeners (the stop's and a leaving slot's socket work).

use std::collections::{BTreeSet, HashMap};

use netcluster_protocol::listening;
use netcluster_protocol::message::ToWorker;
use netcluster_protocol::steer;

use crate::command::{Reply, ScaleReport, ScaleTo, StopMode};
use crate::error::Error;
use crate::event::Event;
use crate::registry::Mode;
use crate::settings::MAX_WORKERS;
use crate::status::{Build, Status};
use crate::supervisor::effect::{Effect, Happening, View};
use crate::supervisor::machines::scale::ScaleWait;
use crate::supervisor::timers::Timer;
use crate::supervisor::{STATUS_TIMEOUT, StatusWait, Supervisor};
use crate::worker::state::Phase;

impl Supervisor {
    pub(super) fn scale(&mut self, to: ScaleTo, reply: Reply<Result<ScaleReport, Error>>) {
        if self.stop.active() {
            let _ = reply.send(Err(Error::Stopping));
            return;
        }
        let from = self.table.slots.len();
        let to = match to {
            ScaleTo::Exactly(n) => n,
            ScaleTo::By(d) => {
                let n = i64::try_from(from).unwrap_or(i64::MAX).saturating_add(d);
                usize::try_from(n.max(1)).unwrap_or(1)
            }
        };
        if to == 0 || to > MAX_WORKERS {
            let _ = reply.send(Err(Error::BadWorkerCount(to)));
            return;
        }
        tracing::info!(from, to, "scaling");
        let mut report = ScaleReport {
            from,
            to,
            started: Vec::new(),
            stopped: Vec::new(),
        };
        let mut up = Vec::new();
        let mut down = BTreeSet::new();
        if to > from {
            for _ in from..to {
                match self.fork() {
                    Ok(info) => up.extend(info.slot),
                    Err(e) => {
                        // The slots that did start stay (and respawn); say why the rest did not.
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
        } else {
            let leaving: Vec<usize> = self
                .table
                .slots
                .keys()
                .rev()
                .take(from - to)
                .copied()
                .collect();
            for slot in leaving {
                let Some(s) = self.table.slots.remove(&slot) else {
                    continue;
                };
                let forget = self.restarts.forget(slot);
                self.apply(forget);
                if let Some(w) = s.worker {
                    if let Some(worker) = self.table.get_mut(w) {
                        worker.slot = None;
                    }
                    down.insert(w);
                    report.stopped.push(w);
                }
                let view = View::of(&self.table, &self.registry, &self.settings);
                let effects = self.retires.retire(slot, s.worker, &view);
                self.apply(effects);
            }
        }
        let wait = ScaleWait {
            id: self.next_seq(),
            report,
            up,
            down,
            reply,
        };
        let view = View::of(&self.table, &self.registry, &self.settings);
        let effects = self.scales.wait(wait, &view);
        self.apply(effects);
        self.announce_ready_if_ready();
    }

    pub(super) fn status(&mut self, reply: Reply<Status>) {
        let seq = self.next_seq();
        let mut remaining = BTreeSet::new();
        for w in self.table.workers.values() {
            if w.phase().connected()
                && w.phase() != Phase::Starting
                && w.send(ToWorker::StatsQuery { seq }, Vec::new()).is_ok()
            {
                remaining.insert(w.id);
            }
        }
        self.timers.arm(Timer::Status { seq }, STATUS_TIMEOUT);
        self.statuses.insert(
            seq,
            StatusWait {
                remaining,
                stats: HashMap::new(),
                reply,
            },
        );
        self.check_status(seq);
    }

    pub(super) fn check_status(&mut self, seq: u64) {
        let done = self
            .statuses
            .get(&seq)
            .is_some_and(|s| s.remaining.is_empty());
        if done {
            self.finish_status(seq);
        }
    }

    pub(super) fn finish_status(&mut self, seq: u64) {
        let Some(wait) = self.statuses.remove(&seq) else {
            return;
        };
        self.timers.disarm(Timer::Status { seq });
        let status = Build {
            table: &self.table,
            registry: &self.registry,
            restarts: &self.restarts,
            stats: &wait.stats,
            started: self.started,
            policy: self.settings.policy,
            generation: self.generation,
            stopping: self.stop.active(),
            reload: self.reloads.progress_report(),
            last_reload_error: self.reloads.last_error(),
            recycles: &self.recycles,
            served: &self.served,
            rss: &self.rss,
            max_rss: self.settings.recycle.max_rss,
        }
        .status();
        let _ = wait.reply.send(status);
    }

    /// Stops (`successor`: the primary that took over, in an upgrade).
    pub(super) fn stop(
        &mut self,
        mode: StopMode,
        reply: Option<Reply<Vec<Event>>>,
        successor: Option<u32>,
    ) {
        let first = !self.stop.active();
        let view = View::of(&self.table, &self.registry, &self.settings);
        let effects = self.stop.begin(mode, reply, &view);
        if first {
            // Every operation under way ends.
            self.offer(&Happening::Stopping { successor });
        }
        self.apply(effects);
    }

    /// No new handshake starts on the primary's own sockets; the handshakes under way land
    /// in the accept queues, where they will be served.
    pub(super) fn refuse_new(&mut self) {
        for l in self.registry.iter() {
            if !l.owned {
                continue;
            }
            for fd in l.listening() {
                if let Err(e) = listening::refuse_new_connections(fd) {
                    tracing::debug!(listener = %l.address, "cannot filter new connections: {e}");
                }
            }
        }
    }

    /// Round-robin listeners close once their accept task has let go (the primary takes what
    /// waits in the backlog and closes at once, [`Supervisor::acceptor_done`]), and what was
    /// accepted is handed off; the workers keep accepting from shared and reuseport sockets
    /// until their queues are empty.
    pub(super) fn stop_accepting(&mut self) {
        for l in self.registry.iter_mut() {
            match &mut l.mode {
                Mode::RoundRobin(rr) => rr.stop_accepting(),
                // Not the primary's to empty: closing now changes nothing for the workers.
                _ if !l.owned => drop(l.close_socket()),
                _ => {}
            }
        }
        let ids: Vec<u64> = self.registry.iter().map(|l| l.id).collect();
        for id in ids {
            self.dispatch(id);
        }
    }

    /// What no worker took closes; the primary's copies of shared and reuseport sockets go
    /// (the workers close theirs as they drain).
    pub(super) fn close_queues(&mut self) {
        let mut closed = 0;
        for l in self.registry.iter_mut() {
            match &mut l.mode {
                Mode::RoundRobin(rr) => closed += rr.close_pending(),
                Mode::ReusePort(slots) => {
                    let all: Vec<usize> = slots.sockets().map(|(s, _)| s).collect();
                    for s in all {
                        drop(slots.remove(s));
                    }
                    drop(l.close_socket());
                }
                Mode::Shared => drop(l.close_socket()),
            }
        }
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "no worker took these accepted connections before the deadline; closing them"
            );
        }
    }

    /// Spreads every reuseport group's new connections over the sockets of slots that stay.
    pub(super) fn resteer(&mut self) {
        let leaving = self.retires.leaving();
        for l in self.registry.iter() {
            let Mode::ReusePort(slots) = &l.mode else {
                continue;
            };
            let Some(&first) = slots.group.first() else {
                continue;
            };
            let Some(member) = slots.get(first) else {
                continue;
            };
            let keep: Vec<u32> = slots
                .group
                .iter()
                .enumerate()
                .filter(|(_, s)| !leaving.contains(s))
                .filter_map(|(i, _)| u32::try_from(i).ok())
                .collect();
            let result = if leaving.iter().all(|s| slots.get(*s).is_none()) {
                steer::unsteer(member)
            } else if keep.is_empty() {
                Ok(())
            } else {
                steer::steer(member, &keep)
            };
            if let Err(e) = result {
                tracing::warn!(
                    listener = %l.address,
                    "cannot steer connections away from leaving slots ({e}); dropping their new \
                     SYNs instead (clients retry after a second)"
                );
                for s in &leaving {
                    if let Some(fd) = slots.get(*s) {
                        let _ = listening::refuse_new_connections(fd);
                    }
                }
            }
        }
    }

    /// Closes a leaving slot's sockets (the kernel takes them out of their groups) and steers
    /// the groups that remain.
    pub(super) fn close_slot_sockets(&mut self, slot: usize) {
        for l in self.registry.iter_mut() {
            if let Mode::ReusePort(slots) = &mut l.mode {
                drop(slots.remove(slot));
            }
        }
        self.apply(vec![Effect::Resteer]);
    }
}
