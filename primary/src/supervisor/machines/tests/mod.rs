//! The machines on their own: events in, effects out, no process, no socket. Restart
//! back-off and scale here; [`reload`] and [`stop`] (with retire and hand-off deadlines) beside.

mod reload;
mod stop;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::command::ScaleReport;
use crate::error::Error;
use crate::registry::{Registry, SchedulingPolicy};
use crate::settings::{Backoff, Settings};
use crate::supervisor::effect::{Answer, Effect, Happening, Machine, View};
use crate::supervisor::machines::reload::ReloadReport;
use crate::supervisor::machines::restart::Restarts;
use crate::supervisor::machines::scale::{ScaleWait, Scales};
use crate::supervisor::timers::Timer;
use crate::worker::state::{DrainReason, Transition};
use crate::worker::table::tests::native;
use crate::worker::table::{Slot, StopCause, Table, Worker};

/// A table, listeners and settings for machines to read.
pub(super) struct World {
    pub(super) table: Table,
    pub(super) registry: Registry,
    pub(super) settings: Settings,
    pub(super) now: Instant,
}

impl World {
    pub(super) fn new() -> World {
        let mut settings = Settings::from_current_exe().expect("current exe");
        settings.fd_store = false;
        settings.reload_batch = 1;
        World {
            table: Table::default(),
            registry: Registry::new(SchedulingPolicy::Shared, 1),
            settings,
            now: Instant::now(),
        }
    }

    /// `n` slots, each served by a worker that is online.
    pub(super) fn with_workers(n: usize) -> World {
        let mut w = World::new();
        for slot in 1..=n {
            w.table.slots.insert(slot, Slot::default());
            w.add(slot, false, true);
        }
        w
    }

    /// Starts a worker for `slot` (online if `online`); returns its id.
    pub(super) fn add(&mut self, slot: usize, incoming: bool, online: bool) -> u32 {
        let id = self.table.take_id();
        let (mut worker, _rx) = native(id, slot);
        if online {
            worker.apply(Transition::Hello).expect("hello");
        }
        self.table.insert(worker, incoming);
        id
    }

    pub(super) fn online(&mut self, id: u32) {
        if let Some(w) = self.table.get_mut(id) {
            w.apply(Transition::Hello).expect("hello");
        }
    }

    pub(super) fn view(&self) -> View<'_> {
        View {
            table: &self.table,
            registry: &self.registry,
            settings: &self.settings,
            now: self.now,
        }
    }

    /// Removes worker `id` as exited; offers the exit to `m`.
    pub(super) fn exit(&mut self, id: u32, m: &mut dyn Machine) -> Vec<Effect> {
        let its_slot = self
            .table
            .get(id)
            .and_then(|w| w.slot)
            .is_some_and(|s| self.table.slot_worker(s) == Some(id));
        let exit = crate::worker::state::Exit {
            code: Some(1),
            signal: None,
        };
        let w = self.table.remove(id, exit).expect("live");
        m.on(
            &Happening::Exited {
                worker: &w,
                its_slot,
                how: "exit code 1",
            },
            &self.view(),
        )
    }

    /// Carries out the table's part of the effects (a reload's switch and detach).
    pub(super) fn switch(&mut self, effects: &[Effect]) {
        for e in effects {
            match *e {
                Effect::Switch { slot, new } => {
                    let old = self.table.slot_worker(slot);
                    if let Some(s) = self.table.slots.get_mut(&slot) {
                        s.worker = Some(new);
                    }
                    if let Some(w) = old.and_then(|o| self.table.get_mut(o)) {
                        w.slot = None;
                    }
                }
                Effect::Detach { worker } => {
                    if let Some(w) = self.table.get_mut(worker) {
                        w.slot = None;
                    }
                }
                _ => {}
            }
        }
    }
}

pub(super) fn cause(w: &mut Worker, c: StopCause) {
    w.stop = Some(c);
}

pub(super) fn arms(effects: &[Effect]) -> Vec<(Timer, Instant)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Arm { timer, at } => Some((timer, at)),
            _ => None,
        })
        .collect()
}

pub(super) fn spawns(effects: &[Effect]) -> Vec<(usize, bool)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Spawn { slot, incoming } => Some((slot, incoming)),
            _ => None,
        })
        .collect()
}

pub(super) fn drains(effects: &[Effect]) -> Vec<(u32, DrainReason)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Drain { worker, reason } => Some((worker, reason)),
            _ => None,
        })
        .collect()
}

/// The reload replies among `effects`, sent and read back.
pub(super) fn reload_answers(
    effects: Vec<Effect>,
    rxs: &mut [oneshot::Receiver<Result<ReloadReport, Error>>],
) -> Vec<Result<ReloadReport, String>> {
    for e in effects {
        if let Effect::Reply(a @ Answer::Reload(..)) = e {
            a.send();
        }
    }
    rxs.iter_mut()
        .filter_map(|rx| rx.try_recv().ok())
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

pub(super) fn scale_answers(effects: Vec<Effect>) -> Vec<Result<ScaleReport, String>> {
    let mut out = Vec::new();
    for e in effects {
        if let Effect::Reply(Answer::Scale(reply, r)) = e {
            drop(reply);
            out.push(r.map_err(|e| e.to_string()));
        }
    }
    out
}

// ---- restart back-off ----

#[test]
fn an_unexpected_exit_restarts_its_slot_after_a_growing_delay() {
    let mut w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff::default()));
    let mut delays = Vec::new();
    for _ in 0..3 {
        let id = w.table.slot_worker(1).expect("a worker");
        let effects = w.exit(id, &mut r);
        let [(Timer::Respawn { slot: 1 }, at)] = arms(&effects)[..] else {
            panic!("{effects:?}");
        };
        delays.push(at - w.now);
        let effects = r.on(&Happening::Timer(Timer::Respawn { slot: 1 }), &w.view());
        assert_eq!(spawns(&effects), [(1, false)]);
        w.add(1, false, true);
    }
    assert_eq!(
        delays,
        [100, 200, 400].map(Duration::from_millis),
        "100 ms, doubling"
    );
    let s = r.get(1).expect("slot 1");
    assert_eq!(s.restarts, 3);
    assert_eq!(s.last_exit.as_deref(), Some("exit code 1"));
}

#[test]
fn a_worker_that_lasted_resets_the_back_off() {
    let mut w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff::default()));
    let id = w.table.slot_worker(1).expect("a worker");
    let _ = w.exit(id, &mut r);
    w.add(1, false, true);
    w.now += Duration::from_secs(11);
    let id = w.table.slot_worker(1).expect("a worker");
    let effects = w.exit(id, &mut r);
    assert_eq!(arms(&effects)[0].1 - w.now, Duration::from_millis(100));
}

#[test]
fn an_exit_asked_for_in_its_slot_refills_it_at_once_without_counting() {
    let mut w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff::default()));
    let id = w.table.slot_worker(1).expect("a worker");
    cause(
        w.table.get_mut(id).expect("live"),
        StopCause::Drained(DrainReason::Disconnect),
    );
    let effects = w.exit(id, &mut r);
    assert_eq!(arms(&effects), [(Timer::Respawn { slot: 1 }, w.now)]);
    assert_eq!(r.get(1).map(|s| s.restarts), Some(0));
}

#[test]
fn without_a_back_off_a_crashed_workers_slot_leaves_the_pool() {
    let mut w = World::with_workers(2);
    let mut r = Restarts::new(None);
    let effects = w.exit(1, &mut r);
    assert!(matches!(effects[..], [Effect::RemoveSlot { slot: 1 }]));
    cause(
        w.table.get_mut(2).expect("live"),
        StopCause::Killed {
            after_disconnect: false,
        },
    );
    assert!(w.exit(2, &mut r).is_empty(), "an asked-for exit keeps it");
}

#[test]
fn a_respawn_is_only_for_a_vacant_slot_of_the_pool() {
    let mut w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff::default()));
    // Occupied: nothing.
    assert!(
        r.on(&Happening::Timer(Timer::Respawn { slot: 1 }), &w.view())
            .is_empty()
    );
    // Scaled away: nothing.
    w.table.slots.remove(&1);
    assert!(
        r.on(&Happening::Timer(Timer::Respawn { slot: 1 }), &w.view())
            .is_empty()
    );
}

#[test]
fn a_failed_start_is_tried_again_later_and_later() {
    let w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff::default()));
    let mut delays = Vec::new();
    for _ in 0..2 {
        let effects = r.on(
            &Happening::SpawnFailed {
                slot: 1,
                incoming: false,
                why: "no such program".into(),
            },
            &w.view(),
        );
        delays.push(arms(&effects)[0].1 - w.now);
    }
    assert_eq!(delays, [100, 200].map(Duration::from_millis));
    assert_eq!(
        r.get(1).and_then(|s| s.last_exit.clone()).as_deref(),
        Some("no such program")
    );
    // A start that works clears what was due.
    let effects = r.on(
        &Happening::Spawned {
            slot: 1,
            worker: 9,
            incoming: false,
        },
        &w.view(),
    );
    assert!(matches!(
        effects[..],
        [Effect::Disarm(Timer::Respawn { slot: 1 })]
    ));
    assert_eq!(r.get(1).and_then(|s| s.next_attempt), None);
}

#[test]
fn a_stop_cancels_the_restarts_due_and_refuses_new_ones() {
    let mut w = World::with_workers(2);
    let mut r = Restarts::new(Some(Backoff::default()));
    let _ = w.exit(1, &mut r);
    let effects = r.on(&Happening::Stopping { successor: None }, &w.view());
    assert!(matches!(
        effects[..],
        [Effect::Disarm(Timer::Respawn { slot: 1 })]
    ));
    assert!(w.exit(2, &mut r).is_empty());
    assert!(
        r.on(&Happening::Timer(Timer::Respawn { slot: 1 }), &w.view())
            .is_empty()
    );
}

// ---- scale ----

fn scale_wait(
    id: u64,
    up: Vec<usize>,
    down: BTreeSet<u32>,
) -> (ScaleWait, oneshot::Receiver<Result<ScaleReport, Error>>) {
    let (reply, rx) = oneshot::channel();
    let to = up.len();
    (
        ScaleWait {
            id,
            report: ScaleReport {
                from: 1,
                to,
                started: Vec::new(),
                stopped: down.iter().copied().collect(),
            },
            up,
            down,
            reply,
        },
        rx,
    )
}

#[test]
fn a_scale_up_is_done_when_its_new_workers_are_ready() {
    let mut w = World::with_workers(1);
    let mut s = Scales::default();
    w.table.slots.insert(2, Slot::default());
    let new = w.add(2, false, false);
    let (wait, _rx) = scale_wait(7, vec![2], BTreeSet::new());
    let effects = s.wait(wait, &w.view());
    assert_eq!(
        arms(&effects),
        [(Timer::Ready { wait: 7 }, w.now + w.settings.timeouts.ready)]
    );
    assert!(
        s.on(&Happening::Progress, &w.view()).is_empty(),
        "not ready yet"
    );
    w.online(new);
    let effects = s.on(&Happening::Progress, &w.view());
    assert!(matches!(
        effects[0],
        Effect::Disarm(Timer::Ready { wait: 7 })
    ));
    let answers = scale_answers(effects);
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].as_ref().map(|r| r.started.clone()),
        Ok(vec![new])
    );
}

#[test]
fn a_scale_fails_when_a_new_worker_exits_before_it_is_ready() {
    let mut w = World::with_workers(1);
    let mut s = Scales::default();
    w.table.slots.insert(2, Slot::default());
    let new = w.add(2, false, false);
    let (wait, _rx) = scale_wait(1, vec![2], BTreeSet::new());
    let _ = s.wait(wait, &w.view());
    let answers = scale_answers(w.exit(new, &mut s));
    assert_eq!(answers.len(), 1);
    let err = answers[0].clone().expect_err("failed");
    assert!(
        err.contains("slot 2") && err.contains("exit code 1"),
        "{err}"
    );
}

#[test]
fn a_scale_not_ready_in_time_names_its_slots() {
    let mut w = World::with_workers(1);
    let mut s = Scales::default();
    w.table.slots.insert(2, Slot::default());
    w.table.slots.insert(3, Slot::default());
    w.add(2, false, true);
    w.add(3, false, false);
    let (wait, _rx) = scale_wait(4, vec![2, 3], BTreeSet::new());
    let _ = s.wait(wait, &w.view());
    let answers = scale_answers(s.on(&Happening::Timer(Timer::Ready { wait: 4 }), &w.view()));
    let err = answers[0].clone().expect_err("timed out");
    assert!(err.contains("slots 3 were not ready"), "{err}");
}

#[test]
fn a_scale_down_is_done_when_its_workers_have_exited() {
    let mut w = World::with_workers(3);
    let mut s = Scales::default();
    let (wait, _rx) = scale_wait(2, Vec::new(), BTreeSet::from([2, 3]));
    let effects = s.wait(wait, &w.view());
    assert!(effects.is_empty(), "no ready timer for a scale down");
    assert!(scale_answers(w.exit(2, &mut s)).is_empty());
    let answers = scale_answers(w.exit(3, &mut s));
    assert_eq!(
        answers[0].as_ref().map(|r| r.stopped.clone()),
        Ok(vec![2, 3])
    );
}

#[test]
fn a_stop_fails_the_scales_under_way() {
    let mut w = World::with_workers(1);
    let mut s = Scales::default();
    w.table.slots.insert(2, Slot::default());
    w.add(2, false, false);
    let (wait, _rx) = scale_wait(1, vec![2], BTreeSet::new());
    let _ = s.wait(wait, &w.view());
    let answers = scale_answers(s.on(&Happening::Stopping { successor: None }, &w.view()));
    assert_eq!(answers, [Err(Error::Stopping.to_string())]);
}

#[test]
fn a_slot_whose_workers_keep_exiting_is_given_up_after_the_limit() {
    let mut w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff {
        give_up_after: Some(3),
        ..Backoff::default()
    }));
    for n in 1..=3 {
        let id = w.table.slot_worker(1).expect("a worker");
        let effects = w.exit(id, &mut r);
        if n < 3 {
            assert_eq!(arms(&effects).len(), 1, "exit {n} restarts");
            w.add(1, false, true);
        } else {
            assert!(
                effects.is_empty(),
                "the third exit in a row gives up: {effects:?}"
            );
        }
    }
    let s = r.get(1).expect("slot 1");
    assert!(s.failed);
    assert_eq!(s.next_attempt, None);
    assert_eq!(r.failed().collect::<Vec<_>>(), [1]);
    // A reload's worker takes the slot: tried again from the start.
    r.revive(1);
    assert!(!r.get(1).expect("slot 1").failed);
    assert_eq!(r.failed().count(), 0);
}

#[test]
fn failed_starts_count_toward_giving_up() {
    let w = World::with_workers(1);
    let mut r = Restarts::new(Some(Backoff {
        give_up_after: Some(2),
        ..Backoff::default()
    }));
    let failed = || Happening::SpawnFailed {
        slot: 1,
        incoming: false,
        why: "no such program".into(),
    };
    assert_eq!(arms(&r.on(&failed(), &w.view())).len(), 1);
    assert!(r.on(&failed(), &w.view()).is_empty());
    assert!(r.get(1).is_some_and(|s| s.failed));
}

#[test]
fn operations_ended_by_an_upgrade_name_the_new_primary() {
    let mut w = World::with_workers(1);
    let mut s = Scales::default();
    w.table.slots.insert(2, Slot::default());
    w.add(2, false, false);
    let (wait, _rx) = scale_wait(1, vec![2], BTreeSet::new());
    let _ = s.wait(wait, &w.view());
    let answers = scale_answers(s.on(
        &Happening::Stopping {
            successor: Some(4242),
        },
        &w.view(),
    ));
    assert_eq!(
        answers,
        [Err(
            "handed over to the new primary (pid 4242): ask it".to_string()
        )]
    );
}
