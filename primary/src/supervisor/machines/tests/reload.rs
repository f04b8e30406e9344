//! The reload machine.

use tokio::sync::oneshot;

use super::{World, arms, drains, reload_answers, spawns};
use crate::error::Error;
use crate::supervisor::effect::{Effect, Happening, Machine, Note};
use crate::supervisor::machines::reload::{ReloadReport, Reloads};
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;

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
    let effects = r.on(&Happening::Stopping { successor: None }, &w.view());
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

#[test]
fn a_failed_reload_leaves_the_serving_generation_and_says_why() {
    let mut w = World::with_workers(1);
    let mut r = Reloads::default();
    let (effects, mut rx) = request_reload(&mut r, &w);
    assert!(matches!(effects[0], Effect::Generation(2)));
    let new = start_incoming(&mut r, &mut w, &effects)[0].0;
    let effects = w.exit(new, &mut r);
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Generation(1))),
        "back to the generation that serves: {effects:?}"
    );
    assert!(r.last_error().is_some_and(|e| e.contains("generation 2")));
    assert!(reload_answers(effects, std::slice::from_mut(&mut rx))[0].is_err());
}

#[test]
fn reloads_waiting_when_an_upgrade_takes_over_name_the_new_primary() {
    let w = World::with_workers(1);
    let mut r = Reloads::default();
    let (_, first) = request_reload(&mut r, &w);
    let (_, queued) = request_reload(&mut r, &w);
    let effects = r.on(
        &Happening::Stopping {
            successor: Some(77),
        },
        &w.view(),
    );
    let mut rxs = [first, queued];
    let answers = reload_answers(effects, &mut rxs);
    assert_eq!(answers.len(), 2);
    for a in answers {
        let e = a.expect_err("ended");
        assert!(e.contains("handed over to the new primary (pid 77)"), "{e}");
    }
    let (effects, mut rx) = request_reload(&mut r, &w);
    let late = reload_answers(effects, std::slice::from_mut(&mut rx));
    assert!(late[0].as_ref().is_err_and(|e| e.contains("pid 77")));
}
