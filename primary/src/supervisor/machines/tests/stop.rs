//! The stop machine, a leaving slot (retire), and hand-off deadlines.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{World, arms, drains};
use crate::command::StopMode;
use crate::supervisor::effect::{Effect, Happening, Machine, Note};
use crate::supervisor::machines::handoff::{HANDOFF_GRACE, Handoffs, Verdict};
use crate::supervisor::machines::retire::Retires;
use crate::supervisor::machines::stop::{KILL_GRACE, Stop, StopPhase};
use crate::supervisor::timers::Timer;
use crate::worker::state::DrainReason;

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
