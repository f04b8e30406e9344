//! Listeners and connections: pinning, a worker's listen and close, round-robin hand-offs,
//! and cluster-wide connection counts.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Supervisor {
    /// Pins a listener for the primary's lifetime (`--listen`, `Cluster::share`).
    pub(super) fn share(
        &mut self,
        target: ListenTarget,
        params: &ListenParams,
        name: Option<String>,
    ) -> Result<BoundAddress, Error> {
        if self.stopping.is_some() {
            return Err(Error::Stopping);
        }
        if self.settings.kind == WorkerKind::Program
            && self.settings.policy == crate::SchedulingPolicy::RoundRobin
        {
            return Err(Error::InvalidInput(
                "round robin needs netcluster's protocol, which a program worker does not speak: \
                 use the reuseport policy (each worker its own socket, balanced by the kernel) \
                 or shared"
                    .into(),
            ));
        }
        // A relative Unix path is the primary's: its workers resolve theirs against their own
        // directory and must find the same key.
        let target = match target {
            ListenTarget::Unix(path) if path.is_relative() => ListenTarget::Unix(
                std::env::current_dir()
                    .map_err(|e| Error::io("current directory", e))?
                    .join(path),
            ),
            other => other,
        };
        let port0 = matches!(&target, ListenTarget::Tcp(a) if a.port() == 0)
            || target == ListenTarget::TcpAny(0);
        let key = ListenKey {
            target,
            ordinal: if port0 { self.port0_shares } else { 0 },
        };
        let name = name.unwrap_or_else(|| key.target.to_string());
        let id = match self.registry.find(&key) {
            Some(id) => {
                if let Some(l) = self.registry.get_mut(id) {
                    l.pinned = true;
                    l.name = name;
                }
                id
            }
            None => self.bind(&key, params, Some(name))?,
        };
        if port0 {
            self.port0_shares += 1;
        }
        self.store_in_systemd(id);
        self.registry
            .get(id)
            .map(|l| l.address.clone())
            .ok_or_else(|| Error::InvalidInput("the listener closed".into()))
    }

    /// Takes a listening socket over (systemd's, the store's, a predecessor's) as a pinned
    /// listener.
    pub(super) fn adopt(&mut self, adopt: crate::registry::Adopt) -> Result<BoundAddress, Error> {
        if self.stopping.is_some() {
            return Err(Error::Stopping);
        }
        let key = ListenKey {
            target: adopt.target.clone(),
            ordinal: adopt.ordinal,
        };
        if self.registry.find(&key).is_some() {
            return Err(Error::InvalidInput(format!(
                "{} is already a listener of this primary",
                key.target
            )));
        }
        let target = key.target.clone();
        let bound = self.registry.adopt(adopt)?;
        if let Some((fd, gate)) = bound.acceptor {
            if let Err(e) = round_robin::spawn_acceptor(
                bound.id,
                fd,
                target.to_string(),
                gate,
                self.accepts_tx.clone(),
            ) {
                drop(self.registry.remove(bound.id));
                return Err(Error::Listen(ListenError::new(&target, e)));
            }
        }
        if matches!(&target, ListenTarget::Tcp(a) if a.port() == 0) {
            self.port0_shares = self.port0_shares.max(key.ordinal.saturating_add(1));
        }
        self.store_in_systemd(bound.id);
        self.registry
            .get(bound.id)
            .map(|l| l.address.clone())
            .ok_or_else(|| Error::InvalidInput("the listener closed".into()))
    }

    /// This primary is the one serving now (the new primary of an upgrade, after `TakeOver`):
    /// systemd hears `READY=1` once every worker is ready; the sockets it owns take new
    /// connections even if the old primary began a stop meanwhile; and the listeners the old
    /// primary's workers had opened that none of this one's uses close.
    pub(super) fn took_over(&mut self) {
        self.settings.announce_ready = true;
        self.announce_ready_if_ready();
        for l in self.registry.iter() {
            if l.owned {
                for fd in l.listening() {
                    if let Err(e) = listening::accept_new_connections(fd) {
                        tracing::debug!(listener = %l.address, "cannot clear a socket filter: {e}");
                    }
                }
            }
        }
        let unused: Vec<u64> = self
            .registry
            .iter()
            .filter(|l| !l.pinned && l.members.is_empty())
            .map(|l| l.id)
            .collect();
        for id in unused {
            self.maybe_close(id);
        }
    }

    /// Duplicates of every listener's sockets, with their keys and names, for the primary that
    /// takes over (an upgrade).
    pub(super) fn export(&self) -> Result<Vec<crate::command::Exported>, Error> {
        let mut out = Vec::new();
        for l in self.registry.iter() {
            let dup = |fd: std::os::fd::BorrowedFd<'_>| {
                fd.try_clone_to_owned()
                    .map_err(|e| Error::io(format!("duplicate the socket of {}", l.address), e))
            };
            let socket = l.socket().map(dup).transpose()?;
            let slots = match &l.mode {
                Mode::ReusePort(slots) => slots
                    .group
                    .iter()
                    // A slot being retired keeps its socket only until its queue is empty.
                    .filter(|s| self.slots.contains_key(s))
                    .filter_map(|&s| slots.get(s).map(|fd| (s, fd)))
                    .map(|(s, fd)| dup(fd).map(|fd| (s, fd)))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            out.push(crate::command::Exported {
                target: l.key.target.clone(),
                ordinal: l.key.ordinal,
                name: l.name.clone(),
                fdname: l.fdname.clone(),
                pinned: l.pinned,
                owned: l.owned,
                reuseport: matches!(l.mode, Mode::ReusePort(_)),
                socket,
                slots,
            });
        }
        Ok(out)
    }

    /// Gives listener `id`'s sockets to systemd's file-descriptor store, when it keeps them:
    /// the pinned ones this primary (or its predecessor) made — systemd's own sockets are in
    /// its socket units already. A reuseport listener's slots go as `NAME.slotN`; each socket is
    /// given once.
    pub(super) fn store_in_systemd(&mut self, id: u64) {
        if !self.settings.fd_store {
            return;
        }
        let Some(l) = self.registry.get(id) else {
            return;
        };
        if !l.pinned || !l.owned {
            return;
        }
        let sockets: Vec<(Option<usize>, std::os::fd::BorrowedFd<'_>)> = match &l.mode {
            Mode::ReusePort(slots) => slots.sockets().map(|(s, fd)| (Some(s), fd)).collect(),
            _ => l.socket().map(|fd| (None, fd)).into_iter().collect(),
        };
        let mut stored = Vec::new();
        for (slot, fd) in sockets {
            if self.stored.contains(&(id, slot)) {
                continue;
            }
            let name = match slot {
                Some(s) => format!("{}.slot{s}", l.fdname),
                None => l.fdname.clone(),
            };
            match crate::systemd::store(fd, &name) {
                Ok(()) => stored.push((id, slot)),
                Err(e) => tracing::warn!(
                    listener = %l.address,
                    "cannot give the listener to systemd's file-descriptor store: {e}"
                ),
            }
        }
        self.stored.extend(stored);
    }

    /// Binds `key` and starts its accept task if it is round robin.
    pub(super) fn bind(
        &mut self,
        key: &ListenKey,
        params: &ListenParams,
        pinned: Option<String>,
    ) -> Result<u64, ListenError> {
        let bound = self.registry.bind(key, params, pinned)?;
        if let Some((fd, gate)) = bound.acceptor {
            if let Err(e) = round_robin::spawn_acceptor(
                bound.id,
                fd,
                key.target.to_string(),
                gate,
                self.accepts_tx.clone(),
            ) {
                drop(self.registry.remove(bound.id));
                return Err(ListenError::new(&key.target, e));
            }
        }
        Ok(bound.id)
    }

    pub(super) fn listen(&mut self, id: u32, seq: u64, key: ListenKey, params: &ListenParams) {
        let refuse = |this: &mut Self, errno: i32, message: String| {
            if let Some(w) = this.workers.get(&id) {
                let _ = w.tx.try_send(
                    ToWorker::ListenErr {
                        seq,
                        address: key.target.to_string(),
                        errno,
                        message,
                    },
                    Vec::new(),
                );
            }
        };
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if !w.phase.serving() {
            let why = if w.phase == Phase::Starting {
                "listen before the handshake"
            } else {
                "the worker is stopping"
            };
            refuse(self, 0, why.into());
            if self
                .workers
                .get(&id)
                .is_some_and(|w| w.phase == Phase::Starting)
            {
                self.violation(id, "listen before Hello");
            }
            return;
        }
        let limit = self.settings.limits.listen_keys;
        if w.listeners.len() >= limit {
            refuse(
                self,
                libc::EMFILE,
                format!("a worker may hold at most {limit} listeners"),
            );
            self.violation(id, "too many listen keys");
            return;
        }
        if self.stopping.is_some() {
            refuse(self, 0, "the cluster is stopping".into());
            return;
        }
        // `{fd}` names a descriptor the primary was given, and it must be a listening socket
        // (netcluster-isolation finding 5).
        let listener = match &key.target {
            ListenTarget::Fd(fd) => match self.fd_listener(*fd, &key, params) {
                Ok(l) => Ok(l),
                Err(e) => Err(e),
            },
            _ => match self.registry.find(&key) {
                Some(l) => Ok(l),
                None => self.bind(&key, params, None),
            },
        };
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(worker = id, "{e}");
                refuse(self, e.errno().unwrap_or(0), e.source.to_string());
                return;
            }
        };
        let slot = self.workers.get(&id).and_then(|w| w.slot);
        let grant = match self.registry.grant(listener, slot) {
            Ok(g) => g,
            Err(e) => {
                refuse(self, e.errno().unwrap_or(0), e.source.to_string());
                self.maybe_close(listener);
                return;
            }
        };
        let (address, grant, fd) = grant;
        let reply = ToWorker::ListenOk {
            seq,
            address: address.clone(),
            grant,
        };
        let fds = fd.into_iter().map(OutFd::Owned).collect();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if let Err(e) = w.tx.try_send(reply, fds) {
            tracing::warn!(worker = id, "cannot send the listener ({e:?})");
            self.maybe_close(listener);
            if e == SendFailed::Full {
                self.suspect(id);
            }
            return;
        }
        let _ = w.apply(Transition::Listened);
        w.listeners.insert(listener);
        let new_slot_socket = slot.is_some_and(|s| !self.stored.contains(&(listener, Some(s))));
        let paused = w.ping.is_some();
        if let Some(l) = self.registry.get_mut(listener) {
            l.members.insert(id);
            // The grant is queued ahead of any connection: the worker knows the handle before a
            // hand-off for it can arrive.
            if let Some(rr) = l.round_robin() {
                rr.join(id);
                if paused {
                    rr.pause(id);
                }
            }
        }
        if new_slot_socket {
            self.store_in_systemd(listener);
        }
        tracing::info!(worker = id, %address, "worker listening");
        let fd = match key.target {
            ListenTarget::Fd(fd) => Some(fd),
            _ => None,
        };
        self.emit(Event::Listening { id, address, fd });
        self.dispatch(listener);
        self.check_scales();
        self.reload_progress();
    }

    /// The listener for `listen({fd})`: the registry's own listener when `fd` is one of the
    /// primary's listening sockets, or a new one on a descriptor the primary was given.
    pub(super) fn fd_listener(
        &mut self,
        fd: i32,
        key: &ListenKey,
        params: &ListenParams,
    ) -> Result<u64, ListenError> {
        let named = |e: std::io::Error| ListenError::new(&key.target, e);
        if !self.settings.may_listen_on(fd) {
            return Err(named(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the primary was not given this descriptor (only inherited or given descriptors may be named)",
            )));
        }
        let dup = netcluster_protocol::fd::dup_raw(fd).map_err(named)?;
        listening::check_listening(dup.as_fd()).map_err(named)?;
        let ino = inode(dup.as_fd());
        if let Some(l) = self
            .registry
            .iter()
            .find(|l| ino.is_some() && l.socket().and_then(inode) == ino)
        {
            return Ok(l.id);
        }
        match self.registry.find(key) {
            Some(l) => Ok(l),
            None => self.bind(key, params, None),
        }
    }

    /// Closes listener `l` if it has no member and no operator pinned it.
    pub(super) fn maybe_close(&mut self, l: u64) {
        let empty = self
            .registry
            .get(l)
            .is_some_and(|l| l.members.is_empty() && !l.pinned);
        if empty {
            drop(self.registry.remove(l));
        }
    }

    /// Worker `id` no longer uses listener `l`.
    pub(super) fn leave(&mut self, l: u64, id: u32) {
        self.forget_handoff_timers(|(listener, _), worker| listener == l && worker == id);
        drop(self.registry.leave(l, id));
        self.dispatch(l);
    }

    pub(super) fn count_request(&mut self, id: u32, seq: u64, key: &ListenKey) {
        let limit = self.settings.limits.requests;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.requests >= limit {
            let _ = w.tx.try_send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::TooMany { limit }),
                },
                Vec::new(),
            );
            // A burst past the limit is refused, not punished; a worker that does nothing but
            // push past it is flooding.
            w.over_limit = w.over_limit.saturating_add(1);
            if w.over_limit > OVER_LIMIT_STREAK {
                self.kill(
                    id,
                    &format!(
                        "{OVER_LIMIT_STREAK} count requests in a row over its limit of {limit}"
                    ),
                );
            }
            return;
        }
        w.over_limit = 0;
        if self.stopping.is_some() {
            let _ = w.tx.try_send(
                ToWorker::CountResult {
                    seq,
                    result: Err(CountError::Stopping),
                },
                Vec::new(),
            );
            return;
        }
        w.requests += 1;
        match self.registry.find(key) {
            Some(l) => self.ask_count(l, Asker::Worker { id, seq }),
            None => self.deliver(Answered {
                asker: Asker::Worker { id, seq },
                result: Ok(0),
                timer: None,
            }),
        }
    }

    /// Asks every member of listener `l` for its open connections, for `asker`.
    pub(super) fn ask_count(&mut self, l: u64, asker: Asker) {
        let Some(listener) = self.registry.get(l) else {
            self.deliver(Answered {
                asker,
                result: Ok(0),
                timer: None,
            });
            return;
        };
        let members = listener.members.clone();
        let key = listener.key.clone();
        match self.counts.ask(members.clone(), asker) {
            Ok(seq) => {
                self.arm_count(seq);
                for w in members {
                    self.send_or_fail_count(
                        w,
                        seq,
                        ToWorker::CountQuery {
                            seq,
                            key: key.clone(),
                        },
                    );
                }
            }
            Err(done) => self.deliver(done),
        }
    }

    pub(super) fn arm_count(&mut self, seq: u64) {
        let key = self
            .timers
            .insert(Timer::Count { seq }, self.settings.timeouts.count);
        self.counts.set_timer(seq, key);
    }

    pub(super) fn send_or_fail_count(&mut self, worker: u32, seq: u64, msg: ToWorker) {
        let failed = match self.workers.get(&worker) {
            Some(w) => match w.tx.try_send(msg, Vec::new()) {
                Ok(()) => None,
                Err(SendFailed::Full) => Some(CountError::Unresponsive { worker }),
                Err(SendFailed::Closed) => Some(CountError::WorkerExited { worker }),
            },
            None => Some(CountError::WorkerExited { worker }),
        };
        if let Some(err) = failed {
            if let Some(done) = self.counts.fail(seq, err) {
                self.deliver(done);
            }
        }
    }

    /// Gives a finished count to whoever asked.
    pub(super) fn deliver(&mut self, done: Answered) {
        if let Some(key) = &done.timer {
            self.timers.try_remove(key);
        }
        match done.asker {
            Asker::Api(tx) | Asker::Sent(tx) => {
                let _ = tx.send(done.result);
            }
            Asker::Worker { id, seq } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.requests = w.requests.saturating_sub(1);
                    let _ = w.tx.try_send(
                        ToWorker::CountResult {
                            seq,
                            result: done.result,
                        },
                        Vec::new(),
                    );
                }
            }
        }
    }

    /// Connections the accept tasks took: this one and every other already queued (an accept
    /// task takes what the backlog holds in one go), then one dispatch per listener, so that
    /// the connections of a burst travel several to a message.
    pub(super) fn accepted(&mut self, first: Accepted) {
        let mut touched: Vec<u64> = Vec::new();
        let mut next = Some(first);
        let mut taken = 0usize;
        while let Some(accepted) = next.take() {
            taken += 1;
            match accepted.conn {
                None => self.acceptor_done(accepted.listener),
                Some(conn) => {
                    if let Some(rr) = self
                        .registry
                        .get_mut(accepted.listener)
                        .and_then(|l| l.round_robin())
                    {
                        rr.push(conn);
                        if !touched.contains(&accepted.listener) {
                            touched.push(accepted.listener);
                        }
                    }
                }
            }
            // Bounded, so that commands and workers' messages are not held up by a flood.
            if taken < ACCEPTED_AT_ONCE {
                next = self.accepts.try_recv().ok();
            }
        }
        for l in touched {
            self.dispatch(l);
        }
    }

    /// A round-robin listener's accept task has stopped and closed its copy of the socket.
    /// At a stop the primary's copy is now the last: take the backlog, then close it, with
    /// nothing in between.
    pub(super) fn acceptor_done(&mut self, id: u64) {
        if self.stopping.is_none() {
            return;
        }
        let Some(l) = self.registry.get_mut(id) else {
            return;
        };
        let fd = l.close_socket();
        let handover = self.stopping.as_ref().is_some_and(|s| s.handover);
        // Under a hand-over the backlog is the next primary's, which accepts from it.
        if let (false, Some(rr), Some(fd)) = (handover, l.round_robin(), &fd) {
            for _ in 0..BACKLOG_DRAIN {
                match netcluster_protocol::fd::accept_nonblocking(fd.as_fd()) {
                    Ok(conn) => rr.push_fd(conn),
                    Err(_) => break,
                }
            }
        }
        drop(fd);
        self.dispatch(id);
        self.check_flushed();
    }

    /// Worker `id` answered hand-offs of round-robin listener `handle`. Every number is checked
    /// against what is in flight to it; an answer to anything else changes nothing.
    pub(super) fn answered(&mut self, id: u32, handle: u64, accepted: &[u64], refused: &[u64]) {
        let Some(rr) = self.registry.get_mut(handle).and_then(|l| l.round_robin()) else {
            tracing::debug!(worker = id, handle, "answer for a closed listener");
            return;
        };
        let mut known = false;
        let mut unknown = None;
        let mut done = Vec::new();
        let answers = accepted
            .iter()
            .map(|&s| (s, true))
            .chain(refused.iter().map(|&s| (s, false)));
        for (seq, took) in answers {
            match rr.ack(id, seq, took) {
                Ok(finished) => {
                    known = true;
                    done.extend(finished);
                }
                Err(e) => unknown = Some(e),
            }
        }
        if let Some(e) = unknown {
            tracing::debug!("{e}");
        }
        for batch in done {
            if let Some((_, key)) = self.handoff_timers.remove(&(handle, batch)) {
                self.timers.try_remove(&key);
            }
        }
        if known {
            if let Some(w) = self.workers.get_mut(&id) {
                w.silent_handoffs = 0;
            }
            self.dispatch(handle);
            self.check_flushed();
        }
    }

    /// Removes the hand-off deadlines that `which((listener, message), worker)` picks.
    pub(super) fn forget_handoff_timers(&mut self, which: impl Fn((u64, u64), u32) -> bool) {
        let keys: Vec<(u64, u64)> = self
            .handoff_timers
            .iter()
            .filter(|&(&k, &(worker, _))| which(k, worker))
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            if let Some((_, key)) = self.handoff_timers.remove(&k) {
                self.timers.try_remove(&key);
            }
        }
    }

    /// Hands listener `l`'s waiting connections to its workers, several to a message when
    /// several wait for the same worker.
    pub(super) fn dispatch(&mut self, l: u64) {
        let handoff_ms =
            u64::try_from(self.settings.timeouts.handoff.as_millis()).unwrap_or(u64::MAX);
        loop {
            let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) else {
                return;
            };
            let batches = rr.next_batches();
            if batches.is_empty() {
                return;
            }
            // A message that could not be queued puts its connections back: go round again
            // (its worker is paused or gone, so this ends).
            let mut requeued = false;
            let expires_ms = monotonic_ms().saturating_add(handoff_ms);
            for b in batches {
                let sent = match self.workers.get(&b.worker) {
                    Some(w) => {
                        let msg = ToWorker::Connections {
                            listener: l,
                            seqs: b.seqs,
                            expires_ms,
                        };
                        let fds = b.fds.into_iter().map(OutFd::Shared).collect();
                        w.tx.try_send(msg, fds)
                    }
                    None => Err(SendFailed::Closed),
                };
                match sent {
                    Ok(()) => {
                        let key = self.timers.insert(
                            Timer::Handoff {
                                listener: l,
                                worker: b.worker,
                                batch: b.id,
                            },
                            self.settings.timeouts.handoff + HANDOFF_GRACE,
                        );
                        if let Some((_, old)) =
                            self.handoff_timers.insert((l, b.id), (b.worker, key))
                        {
                            self.timers.try_remove(&old);
                        }
                    }
                    Err(e) => {
                        requeued = true;
                        let full = e == SendFailed::Full;
                        if let Some(rr) = self.registry.get_mut(l).and_then(|l| l.round_robin()) {
                            rr.not_sent(b.worker, b.id, full);
                        }
                        if full {
                            self.suspect(b.worker);
                        }
                    }
                }
            }
            if !requeued {
                return;
            }
        }
    }
}
