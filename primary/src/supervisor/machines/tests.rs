//! The machines on their own: events in, effects out, no process, no socket.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::command::{ScaleReport, StopMode};
use crate::error::Error;
use crate::registry::{Registry, SchedulingPolicy};
use crate::settings::{Backoff, Settings};
use crate::supervisor::effect::{Answer, Effect, Happening, Machine, Note, View};
use crate::supervisor::machines::handoff::{HANDOFF_GRACE, Handoffs, Verdict};
use crate::supervisor::machines::reload::{ReloadReport, Reloads};
use crate::supervisor::machines::restart::Restarts;
use crate::supervisor::machines::retire::Retires;
use crate::supervisor::machines::scale::{ScaleWait, Scales};
use crate::supervisor::machines::stop::{KILL_GRACE, Stop, StopPhase};
use crate::supervisor::timers::Timer;
use crate::worker::state::{DrainReason, Transition};
use crate::worker::table::tests::native;
use crate::worker::table::{Slot, StopCause, Table, Worker};

/// A table, listeners and settings for machines to read.
struct World {
    table: Table,
    registry: Registry,
    settings: Settings,
    now: Instant,
}

impl World {
    fn new() -> World {
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
    fn with_workers(n: usize) -> World {
        let mut w = World::new();
        for slot in 1..=n {
            w.table.slots.insert(slot, Slot::default());
            w.add(slot, false, true);
        }
        w
    }

    /// Starts a worker for `slot` (online if `online`); returns its id.
    fn add(&mut self, slot: usize, incoming: bool, online: bool) -> u32 {
        let id = self.table.take_id();
        let (mut worker, _rx) = native(id, slot);
        if online {
            worker.apply(Transition::Hello).expect("hello");
        }
        self.table.insert(worker, incoming);
        id
    }

    fn online(&mut self, id: u32) {
        if let Some(w) = self.table.get_mut(id) {
            w.apply(Transition::Hello).expect("hello");
        }
    }

    fn view(&self) -> View<'_> {
        View {
            table: &self.table,
            registry: &self.registry,
            settings: &self.settings,
            now: self.now,
        }
    }

    /// Removes worker `id` as exited; offers the exit to `m`.
    fn exit(&mut self, id: u32, m: &mut dyn Machine) -> Vec<Effect> {
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
    fn switch(&mut self, effects: &[Effect]) {
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

fn cause(w: &mut Worker, c: StopCause) {
    w.stop = Some(c);
}

fn arms(effects: &[Effect]) -> Vec<(Timer, Instant)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Arm { timer, at } => Some((timer, at)),
            _ => None,
        })
        .collect()
}

fn spawns(effects: &[Effect]) -> Vec<(usize, bool)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Spawn { slot, incoming } => Some((slot, incoming)),
            _ => None,
        })
        .collect()
}

fn drains(effects: &[Effect]) -> Vec<(u32, DrainReason)> {
    effects
        .iter()
        .filter_map(|e| match *e {
            Effect::Drain { worker, reason } => Some((worker, reason)),
            _ => None,
        })
        .collect()
}

/// The reload replies among `effects`, sent and read back.
fn reload_answers(
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

fn scale_answers(effects: Vec<Effect>) -> Vec<Result<ScaleReport, String>> {
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
    let effects = r.on(&Happening::Stopping, &w.view());
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
    let answers = scale_answers(s.on(&Happening::Stopping, &w.view()));
    assert_eq!(answers, [Err(Error::Stopping.to_string())]);
}

// ---- reload ----

/// Asks `r` for a reload; the world's table gets the workers it starts (`online` or not).
fn request_reload(
    r: &mut Reloads,
    w: &World,
) -> (Vec<Effect>, oneshot::Receiver<Result<ReloadReport, Error>>) {
    let (reply, rx) = oneshot::channel();
    (r.request(reply, 1, &w.view()), rx)
}

/// Starts the workers `effects` ask for, as `apply` would, and tells `r`.
fn start_incoming(r: &mut Reloads, w: &mut World, effects: &[Effect]) -> Vec<(u32, Vec<Effect>)> {
    spawns(effects)
        .into_iter()
        .map(|(slot, incoming)| {
            assert!(incoming);
            assert!(r.awaits_spawn(slot));
            let id = w.add(slot, true, false);
            let e = r.on(
                &Happening::Spawned {
                    slot,
                    worker: id,
                    incoming: true,
                },
                &w.view(),
            );
            (id, e)
        })
        .collect()
}

#[test]
fn a_reload_replaces_one_slot_at_a_time_new_worker_first() {
    let mut w = World::with_workers(2);
    let mut r = Reloads::default();
    let (effects, mut rx) = request_reload(&mut r, &w);
    assert!(matches!(effects[0], Effect::Generation(2)));
    assert!(matches!(effects[1], Effect::Notify(Note::Reloading)));
    assert_eq!(spawns(&effects), [(1, true)], "a batch of one");
    let started = start_incoming(&mut r, &mut w, &effects);
    let (new1, armed) = &started[0];
    assert_eq!(
        arms(armed),
        [(
            Timer::ReloadReady { worker: *new1 },
            w.now + w.settings.timeouts.ready
        )]
    );
    // Ready: it takes slot 1 over, the old worker drains, slot 2 starts.
    w.online(*new1);
    let effects = r.on(&Happening::Progress, &w.view());
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Switch { slot: 1, new } if new == new1))
    );
    assert_eq!(spawns(&effects), [(2, true)]);
    w.switch(&effects);
    assert_eq!(
        drains(&effects),
        [],
        "the switch's apply drains the old worker"
    );
    let started = start_incoming(&mut r, &mut w, &effects);
    let new2 = started[0].0;
    w.online(new2);
    let effects = r.on(&Happening::Progress, &w.view());
    w.switch(&effects);
    assert_eq!(r.progress_report().map(|p| (p.done, p.total)), Some((2, 2)));
    // Done once both old workers have exited.
    assert!(reload_answers(w.exit(1, &mut r), std::slice::from_mut(&mut rx)).is_empty());
    let effects = w.exit(2, &mut r);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Notify(Note::ReloadDone(None))))
    );
    let answers = reload_answers(effects, std::slice::from_mut(&mut rx));
    let report = answers[0].clone().expect("reloaded");
    assert_eq!(report.generation, 2);
    assert_eq!(report.replaced, [(1, Some(1), *new1), (2, Some(2), new2)]);
    assert!(r.progress_report().is_none());
}

#[test]
fn a_reload_batch_starts_that_many_at_once() {
    let mut w = World::with_workers(3);
    w.settings.reload_batch = 2;
    let mut r = Reloads::default();
    let (effects, _rx) = request_reload(&mut r, &w);
    assert_eq!(spawns(&effects), [(1, true), (2, true)]);
}

#[test]
fn a_new_worker_that_exits_before_it_is_ready_fails_the_reload_and_the_old_ones_stay() {
    let mut w = World::with_workers(2);
    let mut r = Reloads::default();
    let (effects, mut rx) = request_reload(&mut r, &w);
    let new = start_incoming(&mut r, &mut w, &effects)[0].0;
    let effects = w.exit(new, &mut r);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Notify(Note::ReloadDone(Some(_)))))
    );
    let answers = reload_answers(effects, std::slice::from_mut(&mut rx));
    let err = answers[0].clone().expect_err("failed");
    assert!(
        err.contains("slot 1") && err.contains("before it was ready"),
        "{err}"
    );
    assert!(
        err.contains("0 slot(s) replaced, 2 keep their old workers"),
        "{err}"
    );
    assert_eq!(w.table.slot_worker(1), Some(1));
    assert!(r.last_error().is_some_and(|e| e.contains("generation 2")));
}

#[test]
fn a_new_worker_not_ready_in_time_is_drained_and_fails_the_reload() {
    let mut w = World::with_workers(1);
    let mut r = Reloads::default();
    let (effects, mut rx) = request_reload(&mut r, &w);
    let new = start_incoming(&mut r, &mut w, &effects)[0].0;
    let effects = r.on(
        &Happening::Timer(Timer::ReloadReady { worker: new }),
        &w.view(),
    );
    assert_eq!(drains(&effects), [(new, DrainReason::Replaced)]);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Detach { worker } if *worker == new))
    );
    let err = reload_answers(effects, std::slice::from_mut(&mut rx))[0]
        .clone()
        .expect_err("failed");
    assert!(err.contains("was not ready within"), "{err}");
}

#[test]
fn a_failed_start_fails_the_reload_and_later_spawns_are_not_wanted() {
    let mut w = World::with_workers(2);
    w.settings.reload_batch = 2;
    let mut r = Reloads::default();
    let (_effects, mut rx) = request_reload(&mut r, &w);
    let effects = r.on(
        &Happening::SpawnFailed {
            slot: 1,
            incoming: true,
            why: "cannot execute".into(),
        },
        &w.view(),
    );
    assert!(
        !r.awaits_spawn(2),
        "the second start of the batch is dropped"
    );
    let err = reload_answers(effects, std::slice::from_mut(&mut rx))[0]
        .clone()
        .expect_err("failed");
    assert!(err.contains("cannot execute"), "{err}");
}

#[test]
fn reloads_asked_for_during_one_run_after_it_as_one() {
    let mut w = World::with_workers(1);
    let mut r = Reloads::default();
    let (effects, mut first) = request_reload(&mut r, &w);
    let (queued, mut second) = request_reload(&mut r, &w);
    let (_, mut third) = request_reload(&mut r, &w);
    assert!(queued.is_empty());
    let new = start_incoming(&mut r, &mut w, &effects)[0].0;
    w.online(new);
    let effects = r.on(&Happening::Progress, &w.view());
    w.switch(&effects);
    let effects = w.exit(1, &mut r);
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Generation(3))),
        "the next one starts"
    );
    assert_eq!(spawns(&effects), [(1, true)]);
    let mut rxs = [first, second, third];
    let answers = reload_answers(effects, &mut rxs);
    assert_eq!(answers.len(), 1, "only the first is answered");
    [first, second, third] = rxs;
    let _ = (first, &mut second, &mut third);
    assert_eq!(r.progress_report().map(|p| p.generation), Some(3));
}

#[test]
fn a_stop_answers_every_reload_and_refuses_new_ones() {
    let w = World::with_workers(1);
    let mut r = Reloads::default();
    let (_, first) = request_reload(&mut r, &w);
    let (_, second) = request_reload(&mut r, &w);
    let effects = r.on(&Happening::Stopping, &w.view());
    let mut rxs = [first, second];
    let answers = reload_answers(effects, &mut rxs);
    assert_eq!(answers.len(), 2);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_err_and(|e| e.contains("stopping")))
    );
    let (effects, mut rx) = request_reload(&mut r, &w);
    assert_eq!(
        reload_answers(effects, std::slice::from_mut(&mut rx)).len(),
        1
    );
}

// ---- retire ----

#[test]
fn a_leaving_slot_without_reuseport_sockets_drains_its_worker_at_once() {
    let w = World::with_workers(2);
    let mut r = Retires::default();
    let effects = r.retire(2, Some(2), &w.view());
    assert_eq!(drains(&effects), [(2, DrainReason::ScaleDown)]);
    assert!(!r.is_retiring(2));
    assert!(r.leaving().is_empty());
}

// ---- stop ----

#[test]
fn a_graceful_stop_refuses_then_flushes_then_drains_then_kills() {
    let w = World::with_workers(2);
    let mut s = Stop::default();
    let effects = s.begin(StopMode::Graceful, None, &w.view());
    assert!(matches!(
        effects[0],
        Effect::Notify(Note::Stopping { handover: false })
    ));
    assert!(matches!(effects[1], Effect::RefuseNew));
    assert_eq!(
        arms(&effects),
        [(Timer::StopGrace, w.now + Duration::from_millis(100))]
    );
    assert_eq!(s.phase(), Some(StopPhase::Refusing));
    // No listener: nothing to flush, the workers drain at once.
    let effects = s.on(&Happening::Timer(Timer::StopGrace), &w.view());
    assert!(matches!(effects[0], Effect::StopAccepting));
    assert!(effects.iter().any(|e| matches!(e, Effect::CloseQueues)));
    assert_eq!(
        drains(&effects),
        [(1, DrainReason::Stop), (2, DrainReason::Stop)]
    );
    assert!(arms(&effects).contains(&(
        Timer::StopKill,
        w.now + w.settings.drain_timeout + KILL_GRACE
    )));
    assert_eq!(s.phase(), Some(StopPhase::Draining));
    // What still runs at the deadline is killed; then the stop gives up on it.
    let effects = s.on(&Happening::Timer(Timer::StopKill), &w.view());
    let killed: Vec<u32> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Kill { worker } => Some(*worker),
            _ => None,
        })
        .collect();
    assert_eq!(killed, [1, 2]);
    assert!(!s.finish(&w.view()));
    let _ = s.on(&Happening::Timer(Timer::StopGiveUp), &w.view());
    assert!(s.finish(&w.view()));
}

#[test]
fn a_stop_is_done_when_every_worker_exited_and_replies_with_their_exits() {
    let mut w = World::with_workers(1);
    let mut s = Stop::default();
    let (reply, mut rx) = oneshot::channel();
    let _ = s.begin(StopMode::Graceful, Some(reply), &w.view());
    let exit = crate::event::Event::Exit {
        id: 1,
        pid: 10_001,
        code: Some(0),
        signal: None,
        exited_after_disconnect: true,
    };
    s.record_exit(&exit);
    let _ = w.exit(1, &mut s);
    assert!(s.finish(&w.view()));
    let exits = rx.try_recv().expect("answered");
    assert_eq!(exits.len(), 1);
}

#[test]
fn a_stop_now_kills_every_worker_and_a_later_now_kills_again() {
    let w = World::with_workers(2);
    let mut s = Stop::default();
    let effects = s.begin(StopMode::Now, None, &w.view());
    assert!(effects.iter().any(|e| matches!(e, Effect::KillAll)));
    assert!(arms(&effects).iter().any(|(t, _)| *t == Timer::StopGiveUp));
    let mut g = Stop::default();
    let _ = g.begin(StopMode::Graceful, None, &w.view());
    let effects = g.begin(StopMode::Now, None, &w.view());
    assert!(matches!(effects[0], Effect::KillAll), "{effects:?}");
    assert!(g.begin(StopMode::Graceful, None, &w.view()).is_empty());
}

#[test]
fn a_handover_leaves_the_sockets_to_the_next_primary() {
    let w = World::with_workers(1);
    let mut s = Stop::default();
    let effects = s.begin(StopMode::Handover, None, &w.view());
    assert!(s.handover());
    assert!(matches!(
        effects[0],
        Effect::Notify(Note::Stopping { handover: true })
    ));
    assert!(effects.iter().any(|e| matches!(e, Effect::KeepSocketFiles)));
    assert!(!effects.iter().any(|e| matches!(e, Effect::RefuseNew)));
    assert_eq!(drains(&effects), [(1, DrainReason::Stop)]);
}

#[test]
fn a_stop_does_nothing_before_it_begins() {
    let w = World::with_workers(1);
    let mut s = Stop::default();
    assert!(
        s.on(&Happening::Timer(Timer::StopKill), &w.view())
            .is_empty()
    );
    assert!(!s.finish(&w.view()));
}

// ---- hand-off deadlines ----

#[test]
fn a_hand_off_is_due_by_its_deadline_and_an_answer_disarms_it() {
    let mut h = Handoffs::default();
    let now = Instant::now();
    let effects = h.sent(5, 1, 100, Duration::from_secs(6), now);
    let t = Timer::Handoff {
        listener: 5,
        worker: 1,
        batch: 100,
    };
    assert_eq!(
        arms(&effects),
        [(t, now + Duration::from_secs(6) + HANDOFF_GRACE)]
    );
    let effects = h.answered(5, &[100, 999]);
    assert!(matches!(effects[..], [Effect::Disarm(d)] if d == t));
    assert_eq!(h.len(), 0);
}

#[test]
fn a_message_sent_again_to_another_worker_moves_its_deadline() {
    let mut h = Handoffs::default();
    let now = Instant::now();
    let _ = h.sent(5, 1, 100, Duration::from_secs(6), now);
    let effects = h.sent(5, 2, 100, Duration::from_secs(6), now);
    assert!(matches!(
        effects[0],
        Effect::Disarm(Timer::Handoff { worker: 1, .. })
    ));
    assert_eq!(h.len(), 1);
}

#[test]
fn a_worker_that_goes_forgets_only_its_deadlines() {
    let mut h = Handoffs::default();
    let now = Instant::now();
    let d = Duration::from_secs(1);
    let _ = h.sent(5, 1, 1, d, now);
    let _ = h.sent(6, 1, 2, d, now);
    let _ = h.sent(5, 2, 3, d, now);
    assert_eq!(h.forget(1, Some(6)).len(), 1, "one listener left");
    assert_eq!(h.forget(1, None).len(), 1, "it exited");
    assert_eq!(h.len(), 1);
}

#[test]
fn hand_offs_let_expire_in_a_row_get_a_worker_suspected_then_killed() {
    let mut h = Handoffs::default();
    let verdicts: Vec<Verdict> = (1..=3)
        .map(|streak| h.expired(5, streak.into(), streak))
        .collect();
    assert_eq!(
        verdicts,
        [Verdict::Suspect, Verdict::Suspect, Verdict::Kill]
    );
}
