//! `netcluster status`: what the primary reports about itself, its listeners, slots and
//! workers. [`Status`] is the stable JSON schema of `netcluster status --json` (documented in
//! `docs/operations.md`); [`Status::table`] is the human form.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The version of the [`Status`] schema. Fields are only ever added within a version.
pub const STATUS_SCHEMA: u32 = 1;

/// A snapshot of a running primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// [`STATUS_SCHEMA`].
    pub schema: u32,
    /// The primary's process id.
    pub pid: u32,
    /// The primary's version ([`crate::VERSION`]); empty from a primary before it was added.
    #[serde(default)]
    pub version: String,
    /// The commit the primary was built from ([`crate::COMMIT`]: `unknown` when not built
    /// from a git checkout); empty from a primary before it was added.
    #[serde(default)]
    pub commit: String,
    /// Milliseconds since the primary started.
    pub uptime_ms: u64,
    /// The scheduling policy (`round-robin`, `shared`, `reuseport`).
    pub policy: String,
    /// The newest generation of workers (1, then one more per rolling reload).
    pub generation: u64,
    /// How many workers the primary keeps running.
    pub workers_wanted: usize,
    /// Whether it is stopping.
    pub stopping: bool,
    /// The rolling reload under way, if any.
    pub reload: Option<ReloadStatus>,
    /// Why the last reload failed (until the next one starts).
    pub last_reload_error: Option<String>,
    /// Every listener.
    pub listeners: Vec<ListenerStatus>,
    /// Every slot (a place in the pool, 1..=N).
    pub slots: Vec<SlotStatus>,
    /// Every live worker.
    pub workers: Vec<WorkerStatus>,
    /// Lines of program workers' output dropped since the primary started (the dead workers'
    /// too) because the primary's stdout or stderr did not keep up. Added within schema 1.
    #[serde(default)]
    pub output_dropped_lines: u64,
    /// The primary's own log lines dropped because its stderr did not keep up. Added within
    /// schema 1.
    #[serde(default)]
    pub log_dropped_lines: u64,
}

/// A rolling reload under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// The generation the slots move to.
    pub generation: u64,
    /// Slots replaced so far.
    pub done: usize,
    /// Slots in all.
    pub slots: usize,
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// The operator's name for it (`--listen NAME=ADDR`), or its address as given.
    pub name: String,
    /// Where it is bound (`127.0.0.1:8124`, `unix:/run/app.sock`).
    pub address: String,
    /// Configured by the operator (open for as long as the primary runs).
    pub pinned: bool,
    /// Workers listening on it.
    pub workers: usize,
    /// Open connections on it, summed over the workers that answered.
    pub connections: u64,
    /// Connections accepted by the primary and waiting for a worker (round robin).
    pub queued: usize,
}

/// One slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Its number (1..=N).
    pub slot: usize,
    /// The worker serving it now, if any.
    pub worker: Option<u32>,
    /// Workers of this slot that exited unasked and were (or will be) started again.
    pub restarts: u32,
    /// When the next start is due, in milliseconds from now, while the slot waits to restart.
    pub next_attempt_ms: Option<u64>,
    /// How the slot's last worker ended, when one ended unasked.
    pub last_exit: Option<String>,
    /// The slot was given up on (its workers kept exiting): no worker is started for it until
    /// a reload.
    #[serde(default)]
    pub failed: bool,
    /// Why its worker was last recycled (replaced though nothing was wrong with it), or
    /// replaced for missing its watchdog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recycle: Option<String>,
}

/// One live worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its slot (`None` once it left the slot to be replaced or scaled away).
    pub slot: Option<usize>,
    /// Worker id.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// `native` (netcluster's channel) or `program` (systemd-style descriptors).
    pub kind: String,
    /// `starting`, `online`, `listening`, `draining`, `disconnected`.
    pub state: String,
    /// A program worker's last `STATUS=` notification.
    pub status_text: Option<String>,
    /// Whether it answered the primary's last question in time.
    pub responsive: bool,
    /// Open connections, `None` when it did not answer.
    pub connections: Option<u64>,
    /// Connections accepted since it started, `None` when it did not answer.
    pub served: Option<u64>,
    /// Restarts of its slot so far.
    pub restarts: u32,
    /// Milliseconds since it was started.
    pub uptime_ms: u64,
    /// Milliseconds since it entered its current state.
    pub in_state_ms: u64,
    /// Resident memory in bytes, when `/proc` tells.
    pub rss_bytes: Option<u64>,
    /// What will recycle it, and how far it is (`--max-requests`, `--max-age`, `--max-rss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle: Option<String>,
    /// Resident memory of its whole process tree in bytes, when the primary measures it
    /// (`--max-rss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_rss_bytes: Option<u64>,
    /// What the primary has to say about it (a program that has not said `READY=1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Lines of its output (a program worker's, prefixed) the primary dropped because its own
    /// stdout or stderr did not keep up. Added within schema 1.
    #[serde(default)]
    pub output_dropped_lines: u64,
}

impl Status {
    /// `0.1.0, commit 1a2b3c4`, or `None` from a primary that did not say.
    pub fn version_text(&self) -> Option<String> {
        match (self.version.as_str(), self.commit.as_str()) {
            ("", "") => None,
            (v, "") => Some(v.to_string()),
            ("", c) => Some(format!("commit {c}")),
            (v, c) => Some(format!("{v}, commit {c}")),
        }
    }

    /// The human-readable form of `netcluster status`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "primary pid {}{}, up {}, policy {}, generation {}, {} worker{} wanted{}",
            self.pid,
            self.version_text()
                .map_or_else(String::new, |v| format!(" (netcluster {v})")),
            human_ms(self.uptime_ms),
            self.policy,
            self.generation,
            self.workers_wanted,
            if self.workers_wanted == 1 { "" } else { "s" },
            if self.stopping { ", stopping" } else { "" }
        );
        if let Some(r) = &self.reload {
            let _ = writeln!(
                out,
                "reloading to generation {}: {} of {} slots done",
                r.generation, r.done, r.slots
            );
        }
        if let Some(e) = &self.last_reload_error {
            let _ = writeln!(out, "last reload: {e}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<20} {:<32} {:>7} {:>11} {:>6}",
            "LISTENER", "ADDRESS", "WORKERS", "CONNECTIONS", "QUEUED"
        );
        for l in &self.listeners {
            let _ = writeln!(
                out,
                "{:<20} {:<32} {:>7} {:>11} {:>6}",
                l.name, l.address, l.workers, l.connections, l.queued
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>4} {:>5} {:>8} {:>4} {:<13} {:>6} {:>8} {:>8} {:>9} {:>9}",
            "SLOT", "ID", "PID", "GEN", "STATE", "CONNS", "SERVED", "RESTARTS", "UPTIME", "RSS"
        );
        for w in &self.workers {
            let dash = || "-".to_string();
            let _ = writeln!(
                out,
                "{:>4} {:>5} {:>8} {:>4} {:<13} {:>6} {:>8} {:>8} {:>9} {:>9}",
                w.slot.map_or_else(dash, |s| s.to_string()),
                w.id,
                w.pid,
                w.generation,
                if w.responsive {
                    w.state.clone()
                } else {
                    format!("{}!", w.state)
                },
                w.connections.map_or_else(dash, |n| n.to_string()),
                w.served.map_or_else(dash, |n| n.to_string()),
                w.restarts,
                human_ms(w.uptime_ms),
                w.rss_bytes.map_or_else(dash, human_bytes),
            );
        }
        let waiting: Vec<&SlotStatus> = self.slots.iter().filter(|s| s.worker.is_none()).collect();
        if !waiting.is_empty() {
            let _ = writeln!(out);
            for s in waiting {
                if s.failed {
                    let _ = writeln!(
                        out,
                        "slot {}: FAILED after {} restart{}, given up on (last exit: {}); \
                         `netcluster reload` starts it again",
                        s.slot,
                        s.restarts,
                        if s.restarts == 1 { "" } else { "s" },
                        s.last_exit.as_deref().unwrap_or("unknown"),
                    );
                    continue;
                }
                let _ = writeln!(
                    out,
                    "slot {}: no worker; {} restart{} so far{}{}",
                    s.slot,
                    s.restarts,
                    if s.restarts == 1 { "" } else { "s" },
                    s.next_attempt_ms
                        .map(|ms| format!(", next attempt in {}", human_ms(ms)))
                        .unwrap_or_default(),
                    s.last_exit
                        .as_ref()
                        .map(|e| format!(", last exit: {e}"))
                        .unwrap_or_default(),
                );
            }
        }
        for w in self.workers.iter().filter(|w| w.status_text.is_some()) {
            let _ = writeln!(
                out,
                "worker {} says: {}",
                w.id,
                w.status_text.as_deref().unwrap_or_default()
            );
        }
        if self.output_dropped_lines > 0 || self.log_dropped_lines > 0 {
            let by_worker: Vec<String> = self
                .workers
                .iter()
                .filter(|w| w.output_dropped_lines > 0)
                .map(|w| format!("worker {}: {}", w.id, w.output_dropped_lines))
                .collect();
            let _ = writeln!(
                out,
                "output dropped (the primary's stdout/stderr did not keep up): {} worker line{}{}, {} log line{}",
                self.output_dropped_lines,
                if self.output_dropped_lines == 1 {
                    ""
                } else {
                    "s"
                },
                if by_worker.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", by_worker.join(", "))
                },
                self.log_dropped_lines,
                if self.log_dropped_lines == 1 { "" } else { "s" },
            );
        }
        for w in &self.workers {
            if let Some(note) = &w.note {
                let _ = writeln!(out, "worker {}: {note}", w.id);
            }
        }
        if self.workers.iter().any(|w| !w.responsive) {
            let _ = writeln!(out, "\n! = did not answer the primary in time");
        }
        out
    }
}

fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn human_bytes(b: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if b >= 10 * MIB {
        format!("{}M", b / MIB)
    } else {
        format!("{:.1}M", b as f64 / MIB as f64)
    }
}

/// Resident memory of process `pid`, from `/proc/PID/stat`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    Some(procfs::WithCurrentSystemInfo::get(stat.rss_bytes()))
}

/// Resident memory of worker `pid`'s process tree: every process of its process group (the
/// worker leads one), in bytes.
pub(crate) fn tree_rss_bytes(pid: u32) -> Option<u64> {
    let pgid = i32::try_from(pid).ok()?;
    let mut total = 0u64;
    let mut found = false;
    for p in procfs::process::all_processes().ok()?.flatten() {
        let Ok(stat) = p.stat() else { continue };
        if stat.pgrp == pgid {
            found = true;
            total = total.saturating_add(procfs::WithCurrentSystemInfo::get(stat.rss_bytes()));
        }
    }
    found.then_some(total)
}

/// What is said of a program worker that has not said `READY=1` for a while.
pub(crate) fn waiting_for_ready() -> &'static str {
    "waits for READY=1 on its NOTIFY_SOCKET (`systemd-notify --ready`, or sd_notify); a program \
     that never says it should run with --ready-after SECS"
}

/// What a [`Status`] is built from: the loop's state and the workers' answers.
pub(crate) struct Build<'a> {
    /// Every worker and slot.
    pub table: &'a crate::worker::table::Table,
    /// Every listener.
    pub registry: &'a crate::registry::Registry,
    /// The slots' restarts.
    pub restarts: &'a crate::supervisor::machines::restart::Restarts,
    /// What each worker that answered said of its listeners.
    pub stats: &'a std::collections::HashMap<u32, Vec<netcluster_protocol::message::ListenerStats>>,
    /// When the primary started.
    pub started: std::time::Instant,
    /// How connections are spread.
    pub policy: crate::registry::SchedulingPolicy,
    /// The generation new workers run.
    pub generation: u64,
    /// A stop is under way.
    pub stopping: bool,
    /// A reload under way.
    pub reload: Option<crate::supervisor::machines::reload::Progress>,
    /// Why the last reload failed.
    pub last_reload_error: Option<&'a str>,
    /// What recycles workers.
    pub recycles: &'a crate::supervisor::machines::recycle::Recycles,
    /// Connections each native worker had served at the last sample.
    pub served: &'a std::collections::BTreeMap<u32, u64>,
    /// Each worker tree's memory at the last sample.
    pub rss: &'a std::collections::BTreeMap<u32, u64>,
    /// `--max-rss`.
    pub max_rss: Option<u64>,
}

impl Build<'_> {
    /// What will recycle worker `id`, and how far it is.
    fn recycle_line(&self, id: u32, now: std::time::Instant) -> Option<String> {
        let mut parts = Vec::new();
        let due = self.recycles.due(id);
        if let Some(limit) = due.and_then(|d| d.requests) {
            let so_far = self.served.get(&id).copied().unwrap_or(0);
            parts.push(format!("at {limit} connections ({so_far} so far)"));
        }
        if let Some(at) = due.and_then(|d| d.at) {
            let left = at.saturating_duration_since(now);
            parts.push(format!("in {} ms (age)", left.as_millis()));
        }
        if let Some(limit) = self.max_rss {
            let mib = |b: u64| b / (1024 * 1024);
            match self.rss.get(&id) {
                Some(&now) => {
                    parts.push(format!("above {} MiB ({} MiB now)", mib(limit), mib(now)))
                }
                None => parts.push(format!("above {} MiB", mib(limit))),
            }
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// The status.
    pub fn status(&self) -> Status {
        use crate::registry::Mode;
        use netcluster_protocol::message::ListenerStats;

        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let now = std::time::Instant::now();
        let mut listeners = Vec::new();
        for l in self.registry.iter() {
            let connections = self
                .stats
                .values()
                .flatten()
                .filter(|s| s.key == l.key)
                .fold(0u64, |acc, s| acc.saturating_add(s.open));
            let queued = match &l.mode {
                Mode::RoundRobin(rr) => rr.pending(),
                _ => 0,
            };
            // Program workers hold every pinned listener from their start (they are no members:
            // they never asked over a channel).
            let programs = if l.pinned && !matches!(l.mode, Mode::RoundRobin(_)) {
                self.table
                    .workers
                    .values()
                    .filter(|w| w.is_program() && w.phase().serving())
                    .count()
            } else {
                0
            };
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                address: l.address.to_string(),
                pinned: l.pinned,
                workers: l.members.len() + programs,
                connections,
                queued,
            });
        }
        let slots = self
            .table
            .slots
            .iter()
            .map(|(&slot, s)| {
                let restarts = self.restarts.get(slot);
                SlotStatus {
                    slot,
                    worker: s.worker,
                    restarts: restarts.map_or(0, |r| r.restarts),
                    next_attempt_ms: restarts
                        .and_then(|r| r.next_attempt)
                        .map(|at| millis(at.saturating_duration_since(now))),
                    last_exit: restarts.and_then(|r| r.last_exit.clone()),
                    failed: restarts.is_some_and(|r| r.failed),
                    last_recycle: self.recycles.last_reason(slot).map(str::to_string),
                }
            })
            .collect();
        let mut workers: Vec<WorkerStatus> = self
            .table
            .workers
            .values()
            .map(|w| {
                let stats = self.stats.get(&w.id);
                let sum = |f: fn(&ListenerStats) -> u64| {
                    stats.map(|s| s.iter().fold(0u64, |acc, x| acc.saturating_add(f(x))))
                };
                let (kind, status_text, note, output_dropped_lines) = match &w.io {
                    crate::worker::table::Io::Program {
                        status_text,
                        ready,
                        dropped,
                        ..
                    } => (
                        "program",
                        status_text.clone(),
                        (!ready && w.waited_long).then(|| waiting_for_ready().to_string()),
                        dropped.lines(),
                    ),
                    crate::worker::table::Io::Native { .. } => ("native", None, None, 0),
                };
                WorkerStatus {
                    slot: w.slot,
                    id: w.id,
                    pid: w.pid,
                    generation: w.generation,
                    kind: kind.to_string(),
                    state: w.phase().state().to_string(),
                    status_text,
                    // A program worker has no channel to answer on.
                    responsive: w.is_program() || (stats.is_some() && w.ping.is_none()),
                    connections: sum(|s| s.open),
                    served: sum(|s| s.served),
                    restarts: w
                        .slot
                        .and_then(|s| self.restarts.get(s))
                        .map_or(0, |r| r.restarts),
                    uptime_ms: millis(now.saturating_duration_since(w.started)),
                    in_state_ms: millis(now.saturating_duration_since(w.since())),
                    rss_bytes: rss_bytes(w.pid),
                    recycle: self.recycle_line(w.id, now),
                    tree_rss_bytes: self.rss.get(&w.id).copied(),
                    note,
                    output_dropped_lines,
                }
            })
            .collect();
        // By slot, then age; workers without a slot (being replaced or drained) last.
        workers.sort_by_key(|w| (w.slot.unwrap_or(usize::MAX), w.id));
        Status {
            schema: STATUS_SCHEMA,
            pid: std::process::id(),
            version: crate::VERSION.to_string(),
            commit: crate::COMMIT.to_string(),
            uptime_ms: millis(now.saturating_duration_since(self.started)),
            policy: self.policy.to_string(),
            generation: self.generation,
            workers_wanted: self.table.slots.len(),
            stopping: self.stopping,
            reload: self.reload.map(|p| ReloadStatus {
                generation: p.generation,
                done: p.done,
                slots: p.total,
            }),
            last_reload_error: self.last_reload_error.map(str::to_string),
            listeners,
            slots,
            workers,
            output_dropped_lines: crate::output::dropped_lines(),
            log_dropped_lines: crate::output::log_dropped_lines(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(human_ms(450), "450ms");
        assert_eq!(human_ms(61_000), "1m01s");
        assert_eq!(human_ms(7_200_000), "2h00m");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5M");
        assert_eq!(human_bytes(64 * 1024 * 1024), "64M");
    }

    #[test]
    fn a_status_without_the_dropped_counts_still_reads() {
        // As a primary from before the counts were added says it.
        let old = r#"{"schema":1,"pid":7,"uptime_ms":5,"policy":"round-robin","generation":1,
            "workers_wanted":1,"stopping":false,"reload":null,"last_reload_error":null,
            "listeners":[],"slots":[],"workers":[{"slot":1,"id":1,"pid":8,"generation":1,
            "kind":"program","state":"listening","status_text":null,"responsive":true,
            "connections":null,"served":null,"restarts":0,"uptime_ms":5,"in_state_ms":5,
            "rss_bytes":null}]}"#;
        let s: Status = serde_json::from_str(old).expect("an older status reads");
        assert_eq!((s.output_dropped_lines, s.log_dropped_lines), (0, 0));
        assert_eq!(s.workers[0].output_dropped_lines, 0);
        assert!(!s.table().contains("dropped"));
        let shown = Status {
            output_dropped_lines: 12,
            log_dropped_lines: 1,
            ..s
        };
        assert!(
            shown
                .table()
                .contains("output dropped (the primary's stdout/stderr did not keep up): 12 worker lines, 1 log line"),
            "{}",
            shown.table()
        );
    }

    #[test]
    fn this_process_has_an_rss() {
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }
}
