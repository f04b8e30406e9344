//! What workers say: their messages over the channel, notifications, bad frames, the
//! channel's close and the process's exit, each dispatched to what handles it.

use netcluster_protocol::message::ToPrimary;
use nix::sys::signal::Signal;

use crate::counts::Outcome;
use crate::event::{Event, UserMessage};
use crate::supervisor::Supervisor;
use crate::supervisor::timers::Timer;
use crate::worker::conn::FromWorker;
use crate::worker::state::Exit;
use crate::worker::table::StopCause;

impl Supervisor {
    pub(super) fn worker_said(&mut self, id: u32, msg: FromWorker) {
        if self.table.get(id).is_none() {
            return;
        }
        match msg {
            FromWorker::Message(m, handle) => self.message(id, m, handle),
            FromWorker::BadFrame(e) => self.violation(id, &format!("dropped a bad frame: {e}")),
            FromWorker::Closed => self.channel_closed(id),
            FromWorker::Notify(text) => self.notified(id, &text),
            FromWorker::Exited(status) => {
                let exit = match status {
                    Ok(s) => Exit {
                        code: s.code(),
                        signal: std::os::unix::process::ExitStatusExt::signal(&s),
                    },
                    Err(e) => {
                        tracing::warn!(worker = id, "cannot wait for the worker: {e}");
                        Exit {
                            code: None,
                            signal: None,
                        }
                    }
                };
                self.exited(id, exit);
            }
        }
    }

    pub(super) fn message(
        &mut self,
        id: u32,
        msg: ToPrimary,
        handle: Option<crate::event::MessageHandle>,
    ) {
        match msg {
            ToPrimary::Hello {
                version,
                pid,
                worker_id,
            } => self.hello(id, version, pid, worker_id),
            ToPrimary::Listen { seq, key, params } => self.listen(id, seq, key, &params),
            ToPrimary::Close { key } => {
                if let Some(l) = self.registry.find(&key) {
                    let held = self
                        .table
                        .get_mut(id)
                        .is_some_and(|w| w.listeners.remove(&l));
                    if held {
                        self.leave(l, id);
                    }
                }
            }
            // With no subscriber the event, and the handle with it, is dropped at once.
            ToPrimary::Message { data, .. } => self.emit(Event::Message {
                id,
                message: UserMessage::new(data, handle),
            }),
            ToPrimary::Disconnect => self.stopping_by_itself(id, true),
            ToPrimary::Stopping { signal } => {
                // Told once, and not for a worker already stopping at the primary's word: a
                // worker repeating itself does not fill the log.
                if self
                    .table
                    .get(id)
                    .is_some_and(|w| matches!(w.stop, None | Some(StopCause::Misbehaved)))
                {
                    let name = Signal::try_from(signal)
                        .map_or_else(|_| format!("signal {signal}"), |s| s.to_string());
                    tracing::info!(worker = id, "worker stopping on {name}");
                }
                self.stopping_by_itself(id, false);
            }
            ToPrimary::CountReply { seq, count } => match self.counts.answer(id, seq, count) {
                Outcome::Done(done) => self.deliver(done),
                Outcome::Counted => {}
                Outcome::Unexpected => {
                    tracing::debug!(worker = id, seq, "count reply to no question in flight");
                }
            },
            ToPrimary::CountRequest { seq, key } => self.count_request(id, seq, &key),
            ToPrimary::Accepted {
                listener,
                accepted,
                refused,
            } => self.answered(id, listener, &accepted, &refused),
            ToPrimary::Pong { seq } => {
                let answered = self
                    .table
                    .get_mut(id)
                    .and_then(|w| w.ping.take_if(|s| *s == seq));
                if answered.is_some() {
                    self.timers.disarm(Timer::Ping { worker: id, seq });
                    tracing::info!(worker = id, "answered its ping; back in rotation");
                    self.resume(id);
                }
            }
            ToPrimary::Stats { seq, mut listeners } => {
                if self.sample_seq == Some(seq) {
                    let served = listeners
                        .iter()
                        .fold(0u64, |acc, l| acc.saturating_add(l.served));
                    self.served.insert(id, served);
                }
                if let Some(wait) = self.statuses.get_mut(&seq) {
                    if wait.remaining.remove(&id) {
                        listeners.truncate(self.settings.limits.listen_keys);
                        wait.stats.insert(id, listeners);
                    }
                    self.check_status(seq);
                }
            }
        }
    }
}
