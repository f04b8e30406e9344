//! The primary's listening sockets, one per [`ListenKey`], and the scheduling policy that
//! decides how each is shared.
//!
//! A listener is either **pinned** — configured by the operator (`--listen`,
//! [`Cluster::share`](crate::Cluster::share), later systemd) and open for as long as the
//! primary runs, whether or not a worker is listening on it at the moment — or created by a
//! worker's listen, in which case it closes (and a Unix socket file the primary created is
//! removed) when its last member leaves. The first request for a key binds the socket with that
//! request's backlog and mode options; later requests share it. A failed bind is not remembered,
//! so a later request can retry.
//!
//! A listener goes in by a bind, or by the adoption of a
//! [`ListenerRecord`] (systemd's socket, the store's, a predecessor's), both through one insert;
//! at an upgrade every listener goes out as a record (an export) for the next primary to adopt.
//!
//! The registry starts no task by itself: for a round-robin listener it returns the accept
//! task's descriptor and gate, and the supervisor starts it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use netcluster_protocol::handover::{ListenerInfo, ListenerRecord};
use netcluster_protocol::listening::{self, ListenError};
use netcluster_protocol::message::{BoundAddress, Grant, ListenKey, ListenParams, ListenTarget};

use crate::error::Error;
use crate::round_robin::{Gate, RoundRobin};

/// How a cluster shares a listening socket among its workers (Node's `cluster.schedulingPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulingPolicy {
    /// The primary binds and sends the listening socket; every worker accepts on it (Node's
    /// `SCHED_NONE`). Fast, but the kernel may favour some workers.
    Shared,
    /// The primary accepts and hands each connection to the next idle worker (Node's
    /// `SCHED_RR`, its default on Linux).
    #[default]
    RoundRobin,
    /// Each worker binds its own socket with `SO_REUSEPORT` and the kernel balances (Node ≥
    /// 22.12's `reusePort`). Applies to TCP; Unix sockets and `{fd}` listens are shared.
    ReusePort,
}

impl SchedulingPolicy {
    /// The environment variable that overrides a cluster's policy (like Node's
    /// `NODE_CLUSTER_SCHED_POLICY`): `rr`/`round-robin`, `none`/`shared`, `reuseport`.
    pub const ENV: &'static str = "NETCLUSTER_SCHED_POLICY";

    /// The policy named by [`SchedulingPolicy::ENV`], if set to a known name.
    pub fn from_env() -> Option<SchedulingPolicy> {
        std::env::var(Self::ENV).ok()?.parse().ok()
    }
}

impl std::str::FromStr for SchedulingPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rr" | "round-robin" | "roundrobin" => Ok(SchedulingPolicy::RoundRobin),
            "none" | "shared" => Ok(SchedulingPolicy::Shared),
            "reuseport" | "reuse-port" => Ok(SchedulingPolicy::ReusePort),
            other => Err(format!(
                "unknown scheduling policy {other:?} (expected round-robin, shared or reuseport)"
            )),
        }
    }
}

impl std::fmt::Display for SchedulingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchedulingPolicy::Shared => "shared",
            SchedulingPolicy::RoundRobin => "round-robin",
            SchedulingPolicy::ReusePort => "reuseport",
        })
    }
}

/// How one listener is shared.
#[derive(Debug)]
pub(crate) enum Mode {
    Shared,
    RoundRobin(Box<RoundRobin>),
    /// The listener's own socket is a bound, never listening reservation of the port; each
    /// slot has its own `SO_REUSEPORT` socket on it, which belongs to the slot (the primary
    /// keeps it, so a worker that exits or is replaced never closes it and its queued
    /// connections wait for the slot's next worker).
    ReusePort(Slots),
}

/// A reuseport listener's sockets, one per slot.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    sockets: BTreeMap<usize, OwnedFd>,
    /// The slots in the order of the kernel's reuseport group (the order the sockets started
    /// listening; a socket that leaves is replaced by the last), for steering.
    pub group: Vec<usize>,
    params: ListenParams,
}

impl Slots {
    /// Slot `slot`'s socket, if it has one.
    pub fn get(&self, slot: usize) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.sockets.get(&slot).map(AsFd::as_fd)
    }

    /// Every slot's socket.
    pub fn sockets(&self) -> impl Iterator<Item = (usize, std::os::fd::BorrowedFd<'_>)> {
        self.sockets.iter().map(|(&s, fd)| (s, fd.as_fd()))
    }

    /// Takes slot `slot`'s socket out of the listener (and out of the group order, as the
    /// kernel does once it stops listening: the last socket takes its place).
    pub fn remove(&mut self, slot: usize) -> Option<OwnedFd> {
        if let Some(i) = self.group.iter().position(|&s| s == slot) {
            self.group.swap_remove(i);
        }
        self.sockets.remove(&slot)
    }
}

/// One listening socket of the primary.
#[derive(Debug)]
pub(crate) struct Listener {
    pub id: u64,
    pub key: ListenKey,
    /// The operator's name for it (`--listen NAME=ADDR`), or the address as given.
    pub name: String,
    /// Its name in a worker's `LISTEN_FDNAMES` (no `:`).
    pub fdname: String,
    pub address: BoundAddress,
    /// The socket; `None` once closed at a stop (the listener's other state lives on until
    /// its connections are handed off).
    fd: Option<OwnedFd>,
    /// Configured by the operator: open for as long as the primary runs.
    pub pinned: bool,
    /// The primary made this socket (it was not given to it: `{fd}`, systemd), so it may
    /// change it (e.g. refuse new connections at a stop).
    pub owned: bool,
    /// Workers that listen on it.
    pub members: BTreeSet<u32>,
    /// A Unix socket file the primary created, removed when the listener closes.
    unlink: Option<PathBuf>,
    pub mode: Mode,
}

impl Listener {
    /// The listening socket, while it is open (for reuseport: the reservation of the port).
    pub fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Every socket of the listener that listens: its own, or each slot's.
    pub fn listening(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        match &self.mode {
            Mode::ReusePort(slots) => slots.sockets().map(|(_, fd)| fd).collect(),
            _ => self.socket().into_iter().collect(),
        }
    }

    /// Slot `slot`'s socket of a reuseport listener, made (bound and listening with
    /// `SO_REUSEPORT`) when the slot has none yet.
    ///
    /// # Errors
    /// When the socket cannot be made (`EMFILE`), naming the address.
    pub fn slot_socket(
        &mut self,
        slot: usize,
    ) -> Result<Option<std::os::fd::BorrowedFd<'_>>, ListenError> {
        let Mode::ReusePort(slots) = &mut self.mode else {
            return Ok(None);
        };
        if !slots.sockets.contains_key(&slot) {
            let BoundAddress::Tcp(addr) = self.address else {
                return Ok(None);
            };
            let params = ListenParams {
                reuse_port: true,
                ..slots.params.clone()
            };
            let (fd, _) = listening::bind_listener(&ListenTarget::Tcp(addr), &params)?;
            slots.sockets.insert(slot, fd);
            slots.group.push(slot);
        }
        Ok(slots.get(slot))
    }

    /// Closes the primary's copy of the socket (workers keep theirs); a Unix socket file is
    /// removed when the listener is dropped.
    pub fn close_socket(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// What describes it, for its record.
    pub fn info(&self) -> ListenerInfo {
        ListenerInfo {
            target: self.key.target.clone(),
            ordinal: self.key.ordinal,
            name: Some(self.name.clone()),
            fdname: Some(self.fdname.clone()),
            pinned: self.pinned,
            owned: self.owned,
            reuseport: matches!(self.mode, Mode::ReusePort(_)),
        }
    }

    /// The round-robin state, if the listener is round robin.
    pub fn round_robin(&mut self) -> Option<&mut RoundRobin> {
        match &mut self.mode {
            Mode::RoundRobin(rr) => Some(rr),
            _ => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = self.unlink.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// How a listener about to go in is shared (its state comes with it in [`Mode`]).
#[derive(Debug)]
enum Sharing {
    Shared,
    RoundRobin,
    /// With the slot state to put the slot sockets in.
    ReusePort(Slots),
}

/// A listener about to go in: what bind or adopt found out about it.
#[derive(Debug)]
struct New {
    key: ListenKey,
    address: BoundAddress,
    socket: Option<OwnedFd>,
    /// A reuseport listener's slot sockets, in the kernel's group order.
    slots: Vec<(usize, OwnedFd)>,
    /// The operator's name (`None`: its address).
    name: Option<String>,
    /// Its `LISTEN_FDNAMES` name (`None`: made from the name).
    fdname: Option<String>,
    pinned: bool,
    owned: bool,
    unlink: Option<PathBuf>,
    sharing: Sharing,
}

/// A listener just bound; for round robin, what the accept task needs.
#[derive(Debug)]
pub(crate) struct Bound {
    pub id: u64,
    pub acceptor: Option<(OwnedFd, Arc<Gate>)>,
}

/// The listeners by key.
#[derive(Debug)]
pub(crate) struct Registry {
    listeners: BTreeMap<u64, Listener>,
    by_key: HashMap<ListenKey, u64>,
    next_id: u64,
    policy: SchedulingPolicy,
    accept_ahead: usize,
}

impl Registry {
    /// An empty registry sharing sockets by `policy`; round-robin listeners accept at most
    /// `accept_ahead` connections beyond one per worker in rotation.
    pub fn new(policy: SchedulingPolicy, accept_ahead: usize) -> Registry {
        Registry {
            listeners: BTreeMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            policy,
            accept_ahead,
        }
    }

    /// The listener for `key`, if bound.
    pub fn find(&self, key: &ListenKey) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// Binds the socket for `key` (it must not be bound yet). `pinned` carries the operator's
    /// name for a listener that stays open for the primary's lifetime; such a Unix socket
    /// replaces a stale socket file that nothing listens on.
    ///
    /// # Errors
    /// The bind error naming the address; nothing is remembered for the key.
    pub fn bind(
        &mut self,
        key: &ListenKey,
        params: &ListenParams,
        pinned: Option<String>,
    ) -> Result<Bound, ListenError> {
        let tcp = matches!(key.target, ListenTarget::Tcp(_) | ListenTarget::TcpAny(_));
        let stale_ok = pinned.is_some();
        let (fd, address, sharing) = match self.policy {
            SchedulingPolicy::ReusePort if tcp => {
                let (fd, address) = listening::reserve_reuse_port(&key.target, params)?;
                let slots = Slots {
                    params: params.clone(),
                    ..Slots::default()
                };
                (fd, address, Sharing::ReusePort(slots))
            }
            SchedulingPolicy::RoundRobin => {
                let (fd, address) = bind(&key.target, params, stale_ok)?;
                (fd, address, Sharing::RoundRobin)
            }
            _ => {
                let (fd, address) = bind(&key.target, params, stale_ok)?;
                (fd, address, Sharing::Shared)
            }
        };
        self.insert(New {
            key: key.clone(),
            address,
            socket: Some(fd),
            slots: Vec::new(),
            pinned: pinned.is_some(),
            name: pinned,
            fdname: None,
            owned: !matches!(key.target, ListenTarget::Fd(_)),
            unlink: match &key.target {
                ListenTarget::Unix(path) => Some(path.clone()),
                _ => None,
            },
            sharing,
        })
    }

    /// Takes `record`'s sockets over as the listener of its key (the key must not be bound).
    ///
    /// # Errors
    /// When the record has no socket, a socket is not bound, a reuseport listener does not fit
    /// the policy, or a socket cannot be duplicated for a round-robin accept task.
    pub fn adopt(&mut self, record: ListenerRecord) -> Result<Bound, ListenError> {
        let ListenerRecord {
            info,
            socket,
            slots,
        } = record;
        let key = ListenKey {
            target: info.target,
            ordinal: info.ordinal,
        };
        let named = |e: io::Error| ListenError::new(&key.target, e);
        let first_slot = slots.first().map(|(_, fd)| fd.as_fd());
        let address = match (&socket, first_slot) {
            (Some(fd), _) => listening::check_bound(fd.as_fd()),
            (None, Some(fd)) => listening::check_bound(fd),
            (None, None) => Err(io::Error::new(io::ErrorKind::InvalidInput, "no socket")),
        }
        .map_err(named)?;
        let every = || socket.iter().chain(slots.iter().map(|(_, fd)| fd));
        if info.owned {
            // A primary that stopped gracefully left its filter refusing new connections on
            // the sockets it gave systemd's store: this one takes connections again.
            for fd in every() {
                listening::accept_new_connections(fd.as_fd()).map_err(named)?;
            }
        }
        let tcp = matches!(address, BoundAddress::Tcp(_));
        let sharing = match self.policy {
            _ if info.reuseport && !(tcp && self.policy == SchedulingPolicy::ReusePort) => {
                return Err(named(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a reuseport listener cannot be taken over under the {} policy",
                        self.policy
                    ),
                )));
            }
            SchedulingPolicy::RoundRobin => Sharing::RoundRobin,
            SchedulingPolicy::ReusePort if info.reuseport => Sharing::ReusePort(Slots::default()),
            // One socket given, not made per slot: it is shared (a systemd socket).
            _ => Sharing::Shared,
        };
        // Only the primary's own accept task needs the socket non-blocking (systemd passes its
        // sockets blocking). `O_NONBLOCK` is the socket's, not this descriptor's: a shared or
        // reuseport socket is left as it is, since the old primary's program workers may be
        // accepting on it in a blocking loop right now (an upgrade), and native workers make it
        // non-blocking themselves.
        if matches!(sharing, Sharing::RoundRobin) {
            for fd in every() {
                socket2::SockRef::from(fd)
                    .set_nonblocking(true)
                    .map_err(named)?;
            }
        }
        self.insert(New {
            // A socket file the predecessor made is this primary's to remove; systemd's are
            // systemd's.
            unlink: match (&key.target, info.owned) {
                (ListenTarget::Unix(path), true) => Some(path.clone()),
                _ => None,
            },
            key,
            address,
            socket,
            slots,
            name: info.name,
            fdname: info.fdname,
            pinned: info.pinned,
            owned: info.owned,
            sharing,
        })
    }

    /// Adds a listener that bind or adopt made ready: the one place a listener goes in. A
    /// round-robin listener comes back with what its accept task needs.
    ///
    /// # Errors
    /// When a round-robin listener has no socket, or it cannot be duplicated (`EMFILE`).
    fn insert(&mut self, new: New) -> Result<Bound, ListenError> {
        let named = |e: io::Error| ListenError::new(&new.key.target, e);
        let (mode, acceptor) = match new.sharing {
            Sharing::RoundRobin => {
                let fd = new.socket.as_ref().ok_or_else(|| {
                    named(io::Error::new(io::ErrorKind::InvalidInput, "no socket"))
                })?;
                let gate = Gate::new(self.accept_ahead);
                let dup = fd.as_fd().try_clone_to_owned().map_err(named)?;
                (
                    Mode::RoundRobin(Box::new(RoundRobin::new(gate.clone(), self.accept_ahead))),
                    Some((dup, gate)),
                )
            }
            Sharing::ReusePort(mut slots) => {
                for (slot, fd) in new.slots {
                    slots.group.push(slot);
                    slots.sockets.insert(slot, fd);
                }
                (Mode::ReusePort(slots), None)
            }
            Sharing::Shared => (Mode::Shared, None),
        };
        let id = self.next_id;
        self.next_id += 1;
        let name = new.name.unwrap_or_else(|| new.key.target.to_string());
        let fdname = new.fdname.unwrap_or_else(|| fd_name(&name, id));
        self.by_key.insert(new.key.clone(), id);
        self.listeners.insert(
            id,
            Listener {
                id,
                key: new.key,
                name,
                fdname,
                address: new.address,
                fd: new.socket,
                pinned: new.pinned,
                owned: new.owned,
                members: BTreeSet::new(),
                unlink: new.unlink,
                mode,
            },
        );
        Ok(Bound { id, acceptor })
    }

    /// Duplicates of every listener's sockets with what describes them, for the primary that
    /// takes over (an upgrade); of a reuseport listener's slots, those `keep` keeps (a slot
    /// being retired keeps its socket only until its queue is empty).
    ///
    /// # Errors
    /// When a socket cannot be duplicated (`EMFILE`), naming the listener.
    pub fn export(&self, keep: impl Fn(usize) -> bool) -> Result<Vec<ListenerRecord>, Error> {
        let mut out = Vec::new();
        for l in self.listeners.values() {
            let dup = |fd: BorrowedFd<'_>| {
                fd.try_clone_to_owned()
                    .map_err(|e| Error::io(format!("duplicate the socket of {}", l.address), e))
            };
            let socket = l.socket().map(dup).transpose()?;
            let slots = match &l.mode {
                Mode::ReusePort(slots) => slots
                    .group
                    .iter()
                    .filter(|&&s| keep(s))
                    .filter_map(|&s| slots.get(s).map(|fd| (s, fd)))
                    .map(|(s, fd)| dup(fd).map(|fd| (s, fd)))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            out.push(ListenerRecord {
                info: l.info(),
                socket,
                slots,
            });
        }
        Ok(out)
    }

    pub fn get(&self, id: u64) -> Option<&Listener> {
        self.listeners.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Listener> {
        self.listeners.get_mut(&id)
    }

    /// What a worker of `slot` is granted for listener `id`: the socket itself (shared; for
    /// reuseport, the slot's socket) or a round-robin listener id.
    ///
    /// # Errors
    /// When the socket cannot be made or duplicated (`EMFILE`), naming the address.
    pub fn grant(
        &mut self,
        id: u64,
        slot: Option<usize>,
    ) -> Result<(BoundAddress, Grant, Option<OwnedFd>), ListenError> {
        if let (Some(l), Some(slot)) = (self.listeners.get_mut(&id), slot) {
            if let Some(fd) = l.slot_socket(slot)? {
                let dup = fd
                    .try_clone_to_owned()
                    .map_err(|e| ListenError::new(&l.key.target, e))?;
                return Ok((l.address.clone(), Grant::Slot, Some(dup)));
            }
        }
        let Some(l) = self.listeners.get(&id) else {
            return Err(ListenError::new(
                format!("listener {id}"),
                io::Error::new(io::ErrorKind::NotFound, "closed"),
            ));
        };
        Ok(match &l.mode {
            Mode::Shared => {
                let fd = l.socket().ok_or_else(|| {
                    ListenError::new(
                        &l.key.target,
                        io::Error::new(io::ErrorKind::NotConnected, "the listener is closed"),
                    )
                })?;
                (
                    l.address.clone(),
                    Grant::Shared,
                    Some(
                        fd.try_clone_to_owned()
                            .map_err(|e| ListenError::new(&l.key.target, e))?,
                    ),
                )
            }
            Mode::RoundRobin(_) => (l.address.clone(), Grant::RoundRobin { listener: id }, None),
            // A worker without a slot: the port, to bind itself.
            Mode::ReusePort(_) => (l.address.clone(), Grant::ReusePort, None),
        })
    }

    /// `worker` no longer uses listener `id` (it left the round-robin rotation too); returns
    /// the listener if that closed it (the last member of a listener no operator pinned).
    pub fn leave(&mut self, id: u64, worker: u32) -> Option<Listener> {
        let l = self.listeners.get_mut(&id)?;
        l.members.remove(&worker);
        if let Some(rr) = l.round_robin() {
            rr.leave(worker);
        }
        if l.members.is_empty() && !l.pinned {
            return self.remove(id);
        }
        None
    }

    /// Removes listener `id`; dropping what is returned closes it.
    pub fn remove(&mut self, id: u64) -> Option<Listener> {
        let l = self.listeners.remove(&id)?;
        self.by_key.remove(&l.key);
        Some(l)
    }

    /// The listeners.
    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.listeners.values()
    }

    /// The listeners, to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Listener> {
        self.listeners.values_mut()
    }

    /// The listeners bound to `address`.
    pub fn at_address(&self, address: &BoundAddress) -> Vec<u64> {
        self.listeners
            .values()
            .filter(|l| &l.address == address)
            .map(|l| l.id)
            .collect()
    }

    /// Leaves every Unix socket file in place when the listeners close: another primary serves
    /// them now (an upgrade).
    pub fn disarm_unlinks(&mut self) {
        for l in self.listeners.values_mut() {
            l.unlink = None;
        }
    }

    /// Closes every listener (removing the Unix socket files the primary created).
    pub fn close_all(&mut self) {
        self.by_key.clear();
        self.listeners.clear();
    }
}

/// A `LISTEN_FDNAMES` name for a listener: the operator's name when it is one (letters,
/// digits, `-`, `_`, `.`), else `listenN`.
fn fd_name(name: &str, id: u64) -> String {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        name.to_string()
    } else {
        format!("listen{id}")
    }
}

/// Binds `target`; with `stale_ok`, a Unix socket file that nothing listens on (left by a
/// primary that crashed) is removed and the bind retried, and one that something listens on is
/// an error that says so.
fn bind(
    target: &ListenTarget,
    params: &ListenParams,
    stale_ok: bool,
) -> Result<(OwnedFd, BoundAddress), ListenError> {
    match listening::bind_listener(target, params) {
        Err(e) if stale_ok && e.errno() == Some(libc::EADDRINUSE) => {
            let ListenTarget::Unix(path) = target else {
                return Err(e);
            };
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                .unwrap_or(false);
            if !is_socket {
                return Err(e);
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(ListenError::new(
                    target,
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    ),
                )),
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(
                        "removing {}: a stale socket file nothing listens on",
                        path.display()
                    );
                    std::fs::remove_file(path).map_err(|r| ListenError::new(target, r))?;
                    listening::bind_listener(target, params)
                }
                Err(_) => Err(e),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
