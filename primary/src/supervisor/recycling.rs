//! Measuring workers for recycling, and the watchdog of program workers; what is due goes to
//! the reload's one-slot replacement ([`Reloads::recycle`](super::machines::reload::Reloads)).

use netcluster_protocol::message::ToWorker;

use crate::supervisor::Supervisor;
use crate::supervisor::effect::View;
use crate::supervisor::timers::Timer;

impl Supervisor {
    /// Measures what recycling needs (native workers' connections, every worker tree's memory
    /// once a second) and hands the slots that are due to the reload machine.
    pub(super) fn recycle_check(&mut self) {
        self.samples = self.samples.wrapping_add(1);
        let live: Vec<(u32, u32, bool)> = self
            .table
            .workers
            .values()
            .map(|w| (w.id, w.pid, w.is_program()))
            .collect();
        self.served.retain(|id, _| live.iter().any(|l| l.0 == *id));
        self.rss.retain(|id, _| live.iter().any(|l| l.0 == *id));
        if self.settings.recycle.max_requests.is_some() {
            let seq = self.next_seq();
            self.sample_seq = Some(seq);
            for w in self.table.workers.values() {
                if !w.is_program() && w.phase().serving() {
                    let _ = w.send(ToWorker::StatsQuery { seq }, Vec::new());
                }
            }
        }
        if self.settings.recycle.max_rss.is_some() && self.samples % 4 == 0 {
            for &(id, pid, _) in &live {
                if let Some(bytes) = crate::status::tree_rss_bytes(pid) {
                    self.rss.insert(id, bytes);
                }
            }
        }
        if self.stop.active() {
            return;
        }
        let view = View::of(&self.table, &self.registry, &self.settings);
        let due = self.recycles.check(&view, &self.served, &self.rss);
        if due.is_empty() {
            return;
        }
        let effects = self.reloads.recycle(due, self.generation, &view);
        self.apply(effects);
    }

    /// Program worker `id` said `WATCHDOG=1`: its next one is due an interval from now.
    pub(super) fn watchdog_ping(&mut self, id: u32) {
        if let Some(wd) = self.settings.watchdog {
            if self.table.get(id).is_some_and(|w| w.phase().serving()) {
                self.timers
                    .arm(Timer::WatchdogDue { worker: id }, wd.interval);
            }
        }
    }

    /// Program worker `id` missed its watchdog (or said `WATCHDOG=trigger`): it is replaced,
    /// the new worker first; once that one serves, the hung one gets the watchdog signal and
    /// is killed after the grace.
    pub(super) fn watchdog_missed(&mut self, id: u32) {
        let Some(wd) = self.settings.watchdog else {
            return;
        };
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        if w.hung || !w.phase().serving() {
            return;
        }
        w.hung = true;
        let pid = w.pid;
        let Some(slot) = w.slot else {
            return;
        };
        let why = format!(
            "missed its watchdog (no WATCHDOG=1 within {:?})",
            wd.interval
        );
        tracing::warn!(worker = id, pid, "worker {why}; replacing it");
        self.recycles.replaced_for(slot, id, &why);
        let view = View::of(&self.table, &self.registry, &self.settings);
        let effects = self
            .reloads
            .recycle(vec![(slot, why)], self.generation, &view);
        self.apply(effects);
    }
}
