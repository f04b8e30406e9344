//! Listeners: pinning (`--listen`, `Cluster::share`), adoption and export (upgrades,
//! systemd), systemd's file-descriptor store, and a worker's listen and close.

use std::os::fd::AsFd;

use netcluster_protocol::listening::{self, ListenError};
use netcluster_protocol::message::{BoundAddress, ListenKey, ListenParams, ListenTarget, ToWorker};

use crate::error::Error;
use crate::event::Event;
use crate::registry::Mode;
use crate::round_robin;
use crate::settings::WorkerKind;
use crate::supervisor::Supervisor;
use crate::supervisor::effect::Happening;
use crate::worker::conn::{OutFd, SendFailed};
use crate::worker::state::{Phase, Transition};

impl Supervisor {
    /// Pins a listener for the primary's lifetime (`--listen`, `Cluster::share`).
    pub(super) fn share(
        &mut self,
        target: ListenTarget,
        params: &ListenParams,
        name: Option<String>,
    ) -> Result<BoundAddress, Error> {
        if self.stop.active() {
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
    pub(super) fn adopt(
        &mut self,
        listener: netcluster_protocol::handover::ListenerRecord,
    ) -> Result<BoundAddress, Error> {
        if self.stop.active() {
            return Err(Error::Stopping);
        }
        let key = ListenKey {
            target: listener.info.target.clone(),
            ordinal: listener.info.ordinal,
        };
        if self.registry.find(&key).is_some() {
            return Err(Error::InvalidInput(format!(
                "{} is already a listener of this primary",
                key.target
            )));
        }
        let bound = self.registry.adopt(listener)?;
        let id = self.start_acceptor(bound, &key.target)?;
        if matches!(&key.target, ListenTarget::Tcp(a) if a.port() == 0) {
            self.port0_shares = self.port0_shares.max(key.ordinal.saturating_add(1));
        }
        self.store_in_systemd(id);
        self.registry
            .get(id)
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
        self.start_acceptor(bound, &key.target)
    }

    /// Starts the accept task of a round-robin listener just bound or adopted (the one place
    /// it starts); a listener whose task cannot start goes again.
    pub(super) fn start_acceptor(
        &mut self,
        bound: crate::registry::Bound,
        target: &ListenTarget,
    ) -> Result<u64, ListenError> {
        if let Some((fd, gate)) = bound.acceptor {
            let address = target.to_string();
            let to = self.accepts_tx.clone();
            if let Err(e) = round_robin::spawn_acceptor(bound.id, fd, address, gate, to) {
                drop(self.registry.remove(bound.id));
                return Err(ListenError::new(target, e));
            }
        }
        Ok(bound.id)
    }

    pub(super) fn listen(&mut self, id: u32, seq: u64, key: ListenKey, params: &ListenParams) {
        let refuse = |this: &mut Self, errno: i32, message: String| {
            if let Some(w) = this.table.get(id) {
                let _ = w.send(
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
        let Some(w) = self.table.get(id) else {
            return;
        };
        if !w.phase().serving() {
            let why = if w.phase() == Phase::Starting {
                "listen before the handshake"
            } else {
                "the worker is stopping"
            };
            refuse(self, 0, why.into());
            if self
                .table
                .get(id)
                .is_some_and(|w| w.phase() == Phase::Starting)
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
        if self.stop.active() {
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
        let slot = self.table.get(id).and_then(|w| w.slot);
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
        let Some(w) = self.table.get_mut(id) else {
            return;
        };
        if let Err(e) = w.send(reply, fds) {
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
        self.offer(&Happening::Progress);
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
        let forget = self.handoffs.forget(id, Some(l));
        self.apply(forget);
        drop(self.registry.leave(l, id));
        self.dispatch(l);
    }
}

fn inode(fd: impl AsFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd.as_fd())
        .ok()
        .map(|s| (s.st_dev, s.st_ino))
}
