//! The whole loop with a fake launcher: commands, workers' messages, exits and timers are fed
//! by hand, and what the supervisor does is read off the workers' queues, the signals it sent
//! and its events. No process is started.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use netcluster_protocol::message::{PROTOCOL_VERSION, ToPrimary, ToWorker};
use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Command, Event, FromWorker, Inputs, Settings, Supervisor, Timer};
use crate::command::{ScaleTo, StopMode};
use crate::error::Error;
use crate::event::WorkerInfo;
use crate::settings::{Backoff, WorkerKind};
use crate::worker::launch::fake::Fake;
use crate::worker::state::DrainReason;
use crate::worker::state::WorkerState;
use crate::worker::table::StopCause;

struct Harness {
    sup: Supervisor,
    fake: Fake,
    events: broadcast::Receiver<Event>,
    _commands: mpsc::Sender<Command>,
}

impl Harness {
    fn new(workers: usize, edit: impl FnOnce(&mut Settings)) -> Harness {
        let mut settings = Settings::from_current_exe().expect("current exe");
        settings.workers = workers;
        settings.fd_store = false;
        settings.respawn = Some(Backoff::default());
        edit(&mut settings);
        let (tx, rx) = mpsc::channel(8);
        let (events, events_rx) = broadcast::channel(1024);
        let fake = Fake::default();
        let sup = Supervisor::with_launcher(
            settings,
            Inputs { commands: rx },
            events,
            Box::new(fake.clone()),
        );
        Harness {
            sup,
            fake,
            events: events_rx,
            _commands: tx,
        }
    }

    /// `cluster.start()`: every worker started and online.
    fn started(workers: usize, edit: impl FnOnce(&mut Settings)) -> Harness {
        let mut h = Harness::new(workers, edit);
        let (reply, mut rx) = oneshot::channel();
        h.sup.command(Command::Start { reply });
        let infos: Vec<WorkerInfo> = rx.try_recv().expect("answered").expect("started");
        for i in infos {
            h.hello(i.id);
        }
        h
    }

    fn hello(&mut self, id: u32) {
        self.say(
            id,
            ToPrimary::Hello {
                version: PROTOCOL_VERSION,
                pid: 10_000 + id,
                worker_id: id,
            },
        );
    }

    fn say(&mut self, id: u32, msg: ToPrimary) {
        self.sup.worker_said(id, FromWorker::Message(msg, None));
    }

    fn exit(&mut self, id: u32, code: i32) {
        self.sup
            .worker_said(id, FromWorker::Exited(Ok(ExitStatus::from_raw(code << 8))));
    }

    fn killed(&mut self, id: u32, signal: Signal) {
        self.sup.worker_said(
            id,
            FromWorker::Exited(Ok(ExitStatus::from_raw(signal as i32))),
        );
    }

    /// A timer fires (it must be armed).
    fn fire(&mut self, timer: Timer) {
        assert!(self.sup.timers.is_armed(timer), "{timer:?} is not armed");
        self.sup.timers.disarm(timer);
        self.sup.timer(timer);
    }

    /// What worker `id` was sent since the last look.
    fn sent(&mut self, id: u32) -> Vec<ToWorker> {
        let mut seen = self.fake.seen();
        let mut out = Vec::new();
        if let Some(q) = seen.queues.get_mut(&id) {
            while let Ok(o) = q.try_recv() {
                out.push(o.msg);
            }
        }
        out
    }

    fn shutdown_sent(&mut self, id: u32) -> bool {
        self.sent(id)
            .iter()
            .any(|m| matches!(m, ToWorker::Shutdown { .. }))
    }

    fn signals(&self) -> Vec<(u32, Signal)> {
        std::mem::take(&mut self.fake.seen().signals)
    }

    fn started_ids(&self) -> Vec<u32> {
        self.fake.seen().started.iter().map(|s| s.0).collect()
    }

    fn state(&self, id: u32) -> Option<WorkerState> {
        self.sup.table.info(id).map(|i| i.state)
    }

    /// `status`, with every native worker answering at once with no listener figures.
    fn status(&mut self) -> crate::status::Status {
        let (reply, mut rx) = oneshot::channel();
        self.sup.command(Command::Status { reply });
        let ids: Vec<u32> = self.sup.table.workers.keys().copied().collect();
        for id in ids {
            for m in self.sent(id) {
                if let ToWorker::StatsQuery { seq } = m {
                    self.say(
                        id,
                        ToPrimary::Stats {
                            seq,
                            listeners: Vec::new(),
                        },
                    );
                }
            }
        }
        rx.try_recv().expect("answered")
    }

    fn exits(&mut self) -> Vec<(u32, bool)> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            if let Event::Exit {
                id,
                exited_after_disconnect,
                ..
            } = e
            {
                out.push((id, exited_after_disconnect));
            }
        }
        out
    }
}

#[tokio::test]
async fn start_fills_every_slot_with_a_worker_of_the_first_generation() {
    let h = Harness::started(3, |_| {});
    assert_eq!(h.fake.seen().started, [(1, 1, 1), (2, 2, 1), (3, 3, 1)]);
    for id in 1..=3 {
        assert_eq!(h.state(id), Some(WorkerState::Online));
    }
}

#[tokio::test]
async fn a_crashed_worker_is_replaced_after_its_back_off() {
    let mut h = Harness::started(1, |_| {});
    h.killed(1, Signal::SIGSEGV);
    assert_eq!(h.exits(), [(1, false)]);
    assert_eq!(h.state(1), Some(WorkerState::Dead));
    assert_eq!(h.sup.table.slot_worker(1), None);
    h.fire(Timer::Respawn { slot: 1 });
    assert_eq!(h.started_ids(), [1, 2]);
    assert_eq!(h.sup.table.slot_worker(1), Some(2));
    assert_eq!(h.sup.restarts.get(1).map(|r| r.restarts), Some(1));
}

#[tokio::test]
async fn a_worker_that_cannot_be_started_is_tried_again() {
    let mut h = Harness::started(1, |_| {});
    h.exit(1, 1);
    h.fake.seen().fail = true;
    h.fire(Timer::Respawn { slot: 1 });
    assert!(h.sup.timers.is_armed(Timer::Respawn { slot: 1 }));
    let last = h.sup.restarts.get(1).and_then(|r| r.last_exit.clone());
    assert!(last.is_some_and(|l| l.contains("no such program")));
    h.fake.seen().fail = false;
    h.fire(Timer::Respawn { slot: 1 });
    assert_eq!(h.sup.table.slot_worker(1), Some(2));
}

#[tokio::test]
async fn a_drained_worker_is_told_to_stop_and_killed_at_its_deadline() {
    let mut h = Harness::started(2, |_| {});
    let _ = h.sent(1);
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Disconnect { worker: 1, reply });
    assert!(rx.try_recv().expect("answered").is_ok());
    assert!(h.shutdown_sent(1));
    assert_eq!(h.state(1), Some(WorkerState::Disconnecting));
    h.fire(Timer::Kill { worker: 1 });
    assert_eq!(h.signals(), [(10_001, Signal::SIGKILL)]);
    h.killed(1, Signal::SIGKILL);
    assert_eq!(h.exits(), [(1, true)], "exitedAfterDisconnect");
    assert!(!h.sup.timers.is_armed(Timer::Kill { worker: 1 }));
    // Asked to stop in its slot: the slot is refilled at once, without counting a restart.
    assert!(h.sup.timers.is_armed(Timer::Respawn { slot: 1 }));
    assert_eq!(h.sup.restarts.get(1).map(|r| r.restarts), Some(0));
}

#[tokio::test]
async fn exits_in_every_phase_end_the_worker_and_free_its_slot() {
    // Starting (before its Hello), online, draining, disconnected.
    let mut h = Harness::new(4, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Start { reply });
    let _ = rx.try_recv();
    h.hello(2);
    h.hello(3);
    h.hello(4);
    h.sup.drain(3, DrainReason::Stop);
    h.sup.worker_said(4, FromWorker::Closed);
    assert_eq!(h.state(4), Some(WorkerState::Disconnected));
    for id in 1..=4 {
        h.exit(id, 1);
        assert_eq!(h.state(id), Some(WorkerState::Dead), "worker {id}");
    }
    assert!(h.sup.table.workers.is_empty());
    // Unasked exits restart their slots; the drained worker's exit was asked for.
    let restarts: Vec<u32> = (1..=4)
        .map(|s| h.sup.restarts.get(s).map_or(0, |r| r.restarts))
        .collect();
    assert_eq!(restarts, [1, 1, 0, 1]);
    // A second exit report for a dead worker changes nothing.
    h.exit(1, 1);
    assert_eq!(h.exits().len(), 4);
}

#[tokio::test]
async fn a_worker_killed_on_request_exits_as_asked_without_disconnect() {
    let mut h = Harness::started(1, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Kill {
        worker: 1,
        signal: Signal::SIGTERM,
        reply,
    });
    assert!(rx.try_recv().expect("answered").is_ok());
    assert_eq!(h.signals(), [(10_001, Signal::SIGTERM)]);
    h.killed(1, Signal::SIGTERM);
    assert_eq!(h.exits(), [(1, false)]);
    assert_eq!(h.sup.restarts.get(1).map_or(0, |r| r.restarts), 0);
}

#[tokio::test]
async fn a_worker_stopping_on_a_signal_drains_and_its_slot_is_refilled_as_after_a_crash() {
    let mut h = Harness::started(1, |_| {});
    h.say(1, ToPrimary::Stopping { signal: 15 });
    assert_eq!(h.state(1), Some(WorkerState::Disconnecting));
    assert!(h.shutdown_sent(1), "told to drain like any serving worker");
    h.exit(1, 0);
    assert_eq!(h.exits(), [(1, false)]);
    assert_eq!(h.sup.restarts.get(1).map(|r| r.restarts), Some(1));
}

#[tokio::test]
async fn a_worker_that_disconnects_by_itself_exited_after_disconnect() {
    let mut h = Harness::started(1, |_| {});
    h.say(1, ToPrimary::Disconnect);
    h.exit(1, 0);
    assert_eq!(h.exits(), [(1, true)]);
}

#[tokio::test]
async fn a_signal_to_a_worker_the_primary_drains_changes_nothing() {
    let mut h = Harness::started(2, |_| {});
    h.sup.drain(2, DrainReason::ScaleDown);
    h.say(2, ToPrimary::Stopping { signal: 15 });
    assert_eq!(
        h.sup.table.get(2).and_then(|w| w.stop),
        Some(StopCause::Drained(DrainReason::ScaleDown))
    );
}

#[tokio::test]
async fn a_worker_past_its_violations_is_killed_and_replaced() {
    let mut h = Harness::started(1, |s| s.limits.violations = 2);
    for _ in 0..3 {
        h.hello(1); // a second Hello is a violation
    }
    assert_eq!(h.signals(), [(10_001, Signal::SIGKILL)]);
    assert_eq!(
        h.sup.table.get(1).and_then(|w| w.stop),
        Some(StopCause::Misbehaved)
    );
    h.killed(1, Signal::SIGKILL);
    assert_eq!(h.sup.restarts.get(1).map(|r| r.restarts), Some(1));
}

#[tokio::test]
async fn a_worker_of_another_protocol_is_killed() {
    let mut h = Harness::new(1, |_| {});
    let (reply, _rx) = oneshot::channel();
    h.sup.command(Command::Start { reply });
    h.say(
        1,
        ToPrimary::Hello {
            version: PROTOCOL_VERSION.wrapping_add(1),
            pid: 10_001,
            worker_id: 1,
        },
    );
    assert_eq!(h.signals(), [(10_001, Signal::SIGKILL)]);
}

#[tokio::test]
async fn a_reload_replaces_every_worker_and_reports_it() {
    let mut h = Harness::started(2, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Reload { reply });
    assert_eq!(h.sup.generation, 2);
    // One at a time: worker 3 for slot 1, of generation 2.
    assert_eq!(h.fake.seen().started.last(), Some(&(3, 1, 2)));
    assert_eq!(
        h.sup.table.slot_worker(1),
        Some(1),
        "not before it is ready"
    );
    let _ = h.sent(1);
    h.hello(3);
    assert_eq!(h.sup.table.slot_worker(1), Some(3));
    assert!(h.shutdown_sent(1));
    assert_eq!(h.fake.seen().started.last(), Some(&(4, 2, 2)));
    h.hello(4);
    assert!(h.shutdown_sent(2));
    h.exit(1, 0);
    h.exit(2, 0);
    let report = rx.try_recv().expect("answered").expect("reloaded");
    assert_eq!(report.replaced, [(1, Some(1), 3), (2, Some(2), 4)]);
    assert_eq!(h.sup.restarts.get(1).map_or(0, |r| r.restarts), 0);
}

#[tokio::test]
async fn a_reload_whose_new_worker_crashes_keeps_the_old_ones() {
    let mut h = Harness::started(2, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Reload { reply });
    h.exit(3, 1);
    let err = rx.try_recv().expect("answered").expect_err("failed");
    assert!(err.to_string().contains("slot 1"), "{err}");
    assert_eq!(h.sup.table.slot_worker(1), Some(1));
    assert_eq!(h.sup.table.slot_worker(2), Some(2));
    assert_eq!(h.started_ids(), [1, 2, 3], "no further worker started");
    assert!(h.sup.reloads.last_error().is_some());
}

#[tokio::test]
async fn a_scale_up_and_down_waits_for_ready_and_for_exits() {
    let mut h = Harness::started(1, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Scale {
        to: ScaleTo::Exactly(3),
        reply,
    });
    assert!(
        rx.try_recv().is_err(),
        "not before the new workers are ready"
    );
    h.hello(2);
    h.hello(3);
    let report = rx.try_recv().expect("answered").expect("scaled");
    assert_eq!(report.started, [2, 3]);
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Scale {
        to: ScaleTo::By(-2),
        reply,
    });
    assert!(h.shutdown_sent(3) && h.shutdown_sent(2));
    assert_eq!(h.sup.table.slots.len(), 1);
    h.exit(3, 0);
    assert!(rx.try_recv().is_err());
    h.exit(2, 0);
    let report = rx.try_recv().expect("answered").expect("scaled");
    assert_eq!(report.stopped, [3, 2]);
    assert!(!h.sup.timers.is_armed(Timer::Respawn { slot: 2 }));
}

#[tokio::test]
async fn a_graceful_stop_drains_every_worker_and_answers_with_their_exits() {
    let mut h = Harness::started(2, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Stop {
        mode: StopMode::Graceful,
        reply: Some(reply),
    });
    let (reply, mut refused) = oneshot::channel();
    h.sup.command(Command::Reload { reply });
    assert!(matches!(refused.try_recv(), Ok(Err(Error::Stopping))));
    h.fire(Timer::StopGrace);
    assert!(h.shutdown_sent(1) && h.shutdown_sent(2));
    h.exit(1, 0);
    assert!(!h.sup.finished());
    h.exit(2, 0);
    assert!(
        !h.sup.timers.is_armed(Timer::Respawn { slot: 1 }),
        "no respawn while stopping"
    );
    assert!(h.sup.finished());
    assert_eq!(rx.try_recv().expect("answered").len(), 2);
}

#[tokio::test]
async fn a_stop_now_kills_every_worker() {
    let mut h = Harness::started(2, |_| {});
    h.sup.command(Command::Stop {
        mode: StopMode::Now,
        reply: None,
    });
    assert_eq!(
        h.signals(),
        [(10_001, Signal::SIGKILL), (10_002, Signal::SIGKILL)]
    );
    h.killed(1, Signal::SIGKILL);
    h.killed(2, Signal::SIGKILL);
    assert!(h.sup.finished());
}

#[tokio::test]
async fn a_program_worker_is_ready_when_it_says_so_and_stops_on_its_signal() {
    let mut h = Harness::new(1, |s| {
        s.kind = WorkerKind::Program;
        s.stop_signal = Signal::SIGINT;
    });
    let (reply, _rx) = oneshot::channel();
    h.sup.command(Command::Start { reply });
    assert_eq!(h.state(1), Some(WorkerState::None));
    h.sup
        .worker_said(1, FromWorker::Notify("STATUS=warming up\nREADY=1".into()));
    assert_eq!(h.state(1), Some(WorkerState::Listening));
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Status { reply });
    let status = rx
        .try_recv()
        .expect("answered at once: a program has no channel");
    assert_eq!(status.workers[0].status_text.as_deref(), Some("warming up"));
    assert_eq!(status.workers[0].kind, "program");
    h.sup.drain(1, DrainReason::Stop);
    assert_eq!(h.signals(), [(10_001, Signal::SIGINT)]);
}

#[tokio::test]
async fn status_waits_for_the_workers_figures_and_no_longer_than_its_timeout() {
    let mut h = Harness::started(2, |_| {});
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Status { reply });
    assert!(rx.try_recv().is_err());
    let seq = h
        .sent(1)
        .iter()
        .find_map(|m| match m {
            ToWorker::StatsQuery { seq } => Some(*seq),
            _ => None,
        })
        .expect("asked");
    h.say(
        1,
        ToPrimary::Stats {
            seq,
            listeners: Vec::new(),
        },
    );
    assert!(rx.try_recv().is_err(), "worker 2 has not answered");
    h.fire(Timer::Status { seq });
    let status = rx.try_recv().expect("answered");
    let responsive: Vec<bool> = status.workers.iter().map(|w| w.responsive).collect();
    assert_eq!(responsive, [true, false]);
}

#[tokio::test]
async fn a_program_that_never_says_ready_is_told_about_in_the_status() {
    let mut h = Harness::new(1, |s| s.kind = WorkerKind::Program);
    let (reply, _rx) = oneshot::channel();
    h.sup.command(Command::Start { reply });
    h.fire(Timer::ReadyHint { worker: 1 });
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Status { reply });
    let status = rx.try_recv().expect("answered");
    let note = status.workers[0].note.clone().expect("a note");
    assert!(
        note.contains("READY=1") && note.contains("--ready-after"),
        "{note}"
    );
    assert!(note.contains("systemd-notify --ready"), "{note}");
    // Once it says it, the note goes.
    h.sup.worker_said(1, FromWorker::Notify("READY=1".into()));
    let (reply, mut rx) = oneshot::channel();
    h.sup.command(Command::Status { reply });
    assert_eq!(rx.try_recv().expect("answered").workers[0].note, None);
}

#[tokio::test]
async fn a_failed_reload_reports_the_generation_that_serves() {
    let mut h = Harness::started(1, |_| {});
    let (reply, _rx) = oneshot::channel();
    h.sup.command(Command::Reload { reply });
    h.exit(2, 1);
    let status = h.status();
    assert_eq!(status.generation, 1);
    assert!(
        status
            .last_reload_error
            .is_some_and(|e| e.contains("generation 2")),
    );
}

#[tokio::test]
async fn a_crash_looping_slot_is_shown_failed_and_a_reload_tries_it_again() {
    let mut h = Harness::started(1, |s| {
        s.respawn = Some(Backoff {
            give_up_after: Some(2),
            ..Backoff::default()
        });
    });
    h.exit(1, 1);
    h.fire(Timer::Respawn { slot: 1 });
    h.exit(2, 1);
    assert!(!h.sup.timers.is_armed(Timer::Respawn { slot: 1 }));
    let status = h.status();
    assert!(status.slots[0].failed, "{:?}", status.slots);
    assert!(h.sup.systemd_status_line().contains("FAILED slot 1"));
    let (reply, _rx) = oneshot::channel();
    h.sup.command(Command::Reload { reply });
    h.hello(3);
    assert_eq!(h.sup.table.slot_worker(1), Some(3));
    assert_eq!(h.sup.restarts.failed().count(), 0);
}
