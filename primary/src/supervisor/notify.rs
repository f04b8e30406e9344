//! What the loop tells systemd (see [`crate::systemd`]): `READY=1` once every slot's worker is
//! ready, `RELOADING=1` and `READY=1` around a reload, `STOPPING=1`, and a `STATUS=` line kept
//! up to date.

use crate::supervisor::Supervisor;
use crate::supervisor::effect::View;

impl Supervisor {
    /// The `STATUS=` line: workers ready of wanted, generation, and what is under way.
    pub(super) fn systemd_status_line(&self) -> String {
        let view = self.view();
        let ready = self
            .table
            .slots
            .keys()
            .filter(|&&s| view.slot_ready(s))
            .count();
        let wanted = self.table.slots.len();
        let mut line = format!(
            "{ready} of {wanted} workers ready, generation {}",
            self.generation
        );
        let failed: Vec<String> = self.restarts.failed().map(|s| s.to_string()).collect();
        if !failed.is_empty() {
            line.push_str(&format!(
                ", FAILED slot{} {} (gave up restarting; `netcluster reload` retries)",
                if failed.len() == 1 { "" } else { "s" },
                failed.join(", ")
            ));
        }
        if self.stop.active() {
            line.push_str(", stopping");
        } else if let Some((generation, done, total)) = self.reload_state() {
            line = format!(
                "reloading to generation {generation}: {done} of {total} slots replaced; {line}"
            );
        }
        line
    }

    /// Sends `STATUS=` if it changed since the last one.
    pub(super) fn send_systemd_status(&mut self) {
        if self.notifier.is_none() {
            return;
        }
        let line = self.systemd_status_line();
        if line != self.systemd_status {
            if let Some(n) = &self.notifier {
                n.status(&line);
            }
            self.systemd_status = line;
        }
    }

    /// Sends `READY=1` the first time every slot's worker is ready (once the program allows it:
    /// [`Settings::announce_ready`]).
    pub(super) fn announce_ready_if_ready(&mut self) {
        if self.ready_announced
            || !self.settings.announce_ready
            || self.stop.active()
            || self.table.slots.is_empty()
        {
            return;
        }
        let view = View::of(&self.table, &self.registry, &self.settings);
        let all = self.table.slots.keys().all(|&s| view.slot_ready(s));
        if !all {
            return;
        }
        self.ready_announced = true;
        let line = self.systemd_status_line();
        if let Some(n) = &self.notifier {
            n.ready(&line);
        }
        self.systemd_status = line;
    }

    /// A reload starts: `RELOADING=1` with `MONOTONIC_USEC`.
    pub(super) fn notify_reloading(&mut self) {
        let line = self.systemd_status_line();
        if let Some(n) = &self.notifier {
            n.reloading(&line);
        }
        self.systemd_status = line;
    }

    /// A reload ended (done or failed: the service runs either way): `READY=1`, with what
    /// happened in `STATUS=`.
    pub(super) fn notify_reload_done(&mut self, failure: Option<&str>) {
        let mut line = self.systemd_status_line();
        if let Some(why) = failure {
            line = format!("{line}; {why}");
        }
        if let Some(n) = &self.notifier {
            n.ready(&line);
        }
        self.systemd_status = line;
    }

    /// A stop begins: `STOPPING=1` — unless another primary took over (an upgrade), which is
    /// systemd's main process now and is not stopping: this one falls silent instead.
    pub(super) fn notify_stopping(&mut self, handover: bool) {
        if handover {
            self.notifier = None;
            return;
        }
        if let Some(n) = &self.notifier {
            n.stopping();
        }
    }
}
