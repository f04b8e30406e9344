//! Recycling: replacing a worker though nothing is wrong with it — after a number of
//! connections, above a memory size, after an age — and replacing a program worker that stopped
//! saying `WATCHDOG=1` (a hung one).
//!
//! This machine only decides *which slot is due, and why*; the replacement itself is the
//! reload's one-slot rolling replacement ([`Reloads::recycle`](super::reload::Reloads::recycle)):
//! the new worker starts first, takes the slot over once ready, and the old one drains. So
//! never more slots at once than `--reload-batch`, and a recycle due during a reload or an
//! upgrade waits for it. Each worker draws its own jitter, so that slots started together do
//! not come due together.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::settings::Recycle;
use crate::supervisor::effect::{Happening, View};

/// What a worker is recycled at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    /// After this many connections.
    pub requests: Option<u64>,
    /// At this time.
    pub at: Option<Instant>,
}

/// The recycle machine.
#[derive(Debug, Default)]
pub(crate) struct Recycles {
    policy: Recycle,
    /// The limits each serving worker drew.
    due: BTreeMap<u32, Due>,
    /// Workers already asked to be recycled (each once).
    asked: BTreeSet<u32>,
    /// Why each slot was last recycled.
    last: BTreeMap<usize, String>,
}

/// A number in `0..=max`, different for each call.
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % (max + 1)
}

impl Recycles {
    /// Recycles by `policy`.
    pub fn new(policy: Recycle) -> Recycles {
        Recycles {
            policy,
            ..Recycles::default()
        }
    }

    /// Whether anything recycles workers.
    pub fn active(&self) -> bool {
        self.policy.any()
    }

    /// What recycles worker `id`, if anything.
    pub fn due(&self, id: u32) -> Option<Due> {
        self.due.get(&id).copied()
    }

    /// Why slot `slot` was last recycled.
    pub fn last_reason(&self, slot: usize) -> Option<&str> {
        self.last.get(&slot).map(String::as_str)
    }

    /// Worker `id` started: it draws its limits.
    fn started(&mut self, id: u32, now: Instant) {
        let p = self.policy;
        let requests = p
            .max_requests
            .map(|n| n.saturating_add(jitter(p.max_requests_jitter)));
        let at = p.max_age.map(|age| {
            let extra = u64::try_from(p.max_age_jitter.as_millis()).unwrap_or(u64::MAX);
            now + age + Duration::from_millis(jitter(extra))
        });
        self.due.insert(id, Due { requests, at });
    }

    /// Follows what happens to workers.
    pub fn on(&mut self, happening: &Happening<'_>, view: &View<'_>) {
        match *happening {
            Happening::Spawned { worker, .. } if self.active() => self.started(worker, view.now),
            Happening::Exited { worker, .. } => {
                self.due.remove(&worker.id);
                self.asked.remove(&worker.id);
            }
            _ => {}
        }
    }

    /// The slots whose worker is due now, with why: `served` and `rss` are what was last
    /// measured of each worker (connections; bytes of its whole tree).
    pub fn check(
        &mut self,
        view: &View<'_>,
        served: &BTreeMap<u32, u64>,
        rss: &BTreeMap<u32, u64>,
    ) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (&slot, s) in &view.table.slots {
            let Some(id) = s.worker else { continue };
            if self.asked.contains(&id) || !view.ready(id) {
                continue;
            }
            let Some(due) = self.due.get(&id) else {
                continue;
            };
            let why = if let (Some(limit), Some(&n)) = (due.requests, served.get(&id)) {
                (n >= limit).then(|| format!("served {n} connections (--max-requests {limit})"))
            } else {
                None
            };
            let why = why.or_else(|| {
                due.at
                    .filter(|&at| view.now >= at)
                    .map(|_| "reached its age (--max-age)".to_string())
            });
            let why = why.or_else(|| {
                let limit = self.policy.max_rss?;
                let &bytes = rss.get(&id)?;
                (bytes > limit).then(|| {
                    format!(
                        "its process tree uses {} MiB (--max-rss {} MiB)",
                        bytes / (1024 * 1024),
                        limit / (1024 * 1024)
                    )
                })
            });
            if let Some(why) = why {
                self.asked.insert(id);
                self.last.insert(slot, why.clone());
                out.push((slot, why));
            }
        }
        out
    }

    /// Slot `slot`'s worker `id` is replaced for `why` (a hung program): remembered as the
    /// slot's last reason, and not asked again.
    pub fn replaced_for(&mut self, slot: usize, id: u32, why: &str) {
        self.asked.insert(id);
        self.last.insert(slot, why.to_string());
    }
}
