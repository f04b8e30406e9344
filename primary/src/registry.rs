//! The primary's table of shared listening sockets, one per [`ListenKey`], and the scheduling
//! policy that decides how each is shared.
//!
//! The first request for a key binds the socket (with that request's backlog and mode
//! options); later requests for the same key get the same socket. A failed bind is not
//! remembered, so a later request can retry. When the last member leaves, the socket is
//! closed and a Unix socket file the primary created is removed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use std::sync::Arc;

use netcluster_protocol::handle::{self, ListenError};
use netcluster_protocol::message::{BoundAddress, Grant, ListenKey, ListenParams, ListenTarget};

use crate::round_robin::{ChannelLookup, RoundRobin};

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

/// What a listen request was granted.
#[derive(Debug)]
pub struct Granted {
    /// The listening socket to send (only with [`Grant::Shared`]).
    pub fd: Option<OwnedFd>,
    /// The bound address.
    pub address: BoundAddress,
    /// How the socket is shared.
    pub grant: Grant,
    /// With [`Grant::RoundRobin`], the hand-off loop: add the worker to its rotation with
    /// [`RoundRobin::add`] once the grant has reached the worker, so no connection arrives
    /// before the worker knows the handle.
    pub round_robin: Option<Arc<RoundRobin>>,
}

#[derive(Debug)]
enum Mode {
    Shared,
    RoundRobin(Arc<RoundRobin>),
    /// The socket is a bound, never listening reservation of the port.
    ReusePort,
}

/// Who holds a shared socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Member {
    /// The primary itself (listeners bound before any worker asked, e.g. from the command line).
    Primary,
    /// A worker, by id.
    Worker(u32),
}

#[derive(Debug)]
struct Shared {
    fd: OwnedFd,
    address: BoundAddress,
    members: HashSet<Member>,
    unlink: Option<PathBuf>,
    mode: Mode,
}

impl Shared {
    fn grant(&self, key: &ListenKey) -> Result<Granted, ListenError> {
        let (fd, grant, round_robin) = match &self.mode {
            Mode::Shared => (
                Some(
                    self.fd
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| ListenError::new(&key.target, e))?,
                ),
                Grant::Shared,
                None,
            ),
            Mode::RoundRobin(rr) => (
                None,
                Grant::RoundRobin {
                    handle: rr.handle(),
                },
                Some(rr.clone()),
            ),
            Mode::ReusePort => (None, Grant::ReusePort, None),
        };
        Ok(Granted {
            fd,
            address: self.address.clone(),
            grant,
            round_robin,
        })
    }
}

/// Shared listening sockets by key.
pub struct Registry {
    handles: HashMap<ListenKey, Shared>,
    policy: SchedulingPolicy,
    lookup: Option<ChannelLookup>,
    next_handle: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("handles", &self.handles)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for Registry {
    /// A registry that shares sockets ([`SchedulingPolicy::Shared`]).
    fn default() -> Self {
        Registry::new(SchedulingPolicy::Shared, None)
    }
}

impl Registry {
    /// A registry sharing sockets by `policy`; round robin needs `lookup` to reach the workers
    /// (without it, round robin falls back to shared sockets).
    pub fn new(policy: SchedulingPolicy, lookup: Option<ChannelLookup>) -> Registry {
        Registry {
            handles: HashMap::new(),
            policy,
            lookup,
            next_handle: 1,
        }
    }

    /// The scheduling policy.
    pub fn policy(&self) -> SchedulingPolicy {
        self.policy
    }

    /// Joins `member` to the socket for `key`, binding it first if nobody holds it, and returns
    /// what the member was granted: the socket itself (shared), a round-robin handle, or the
    /// address to bind with `SO_REUSEPORT`.
    ///
    /// # Errors
    /// The bind error naming the address; nothing is remembered for the key.
    pub fn acquire(
        &mut self,
        key: &ListenKey,
        params: &ListenParams,
        member: Member,
    ) -> Result<Granted, ListenError> {
        if let Some(shared) = self.handles.get_mut(key) {
            let granted = shared.grant(key)?;
            shared.members.insert(member);
            return Ok(granted);
        }
        let tcp = matches!(key.target, ListenTarget::Tcp(_) | ListenTarget::TcpAny(_));
        let (fd, address, mode) = match (self.policy, &self.lookup) {
            (SchedulingPolicy::ReusePort, _) if tcp => {
                let (fd, address) = handle::reserve_reuse_port(&key.target, params)?;
                (fd, address, Mode::ReusePort)
            }
            (SchedulingPolicy::RoundRobin, Some(lookup)) => {
                let (fd, address) = handle::bind_listener(&key.target, params)?;
                let dup = fd
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| ListenError::new(&key.target, e))?;
                let handle = self.next_handle;
                self.next_handle += 1;
                let rr = RoundRobin::start(handle, dup, address.clone(), lookup.clone())
                    .map_err(|e| ListenError::new(&key.target, e))?;
                (fd, address, Mode::RoundRobin(rr))
            }
            _ => {
                let (fd, address) = handle::bind_listener(&key.target, params)?;
                (fd, address, Mode::Shared)
            }
        };
        let unlink = match &key.target {
            ListenTarget::Unix(path) => Some(path.clone()),
            _ => None,
        };
        let shared = Shared {
            fd,
            address,
            members: HashSet::from([member]),
            unlink,
            mode,
        };
        let granted = shared.grant(key);
        if granted.is_err() {
            close(shared);
            return granted;
        }
        self.handles.insert(key.clone(), shared);
        granted
    }

    /// The round-robin listener with this handle id.
    pub fn round_robin(&self, handle: u64) -> Option<Arc<RoundRobin>> {
        self.handles.values().find_map(|s| match &s.mode {
            Mode::RoundRobin(rr) if rr.handle() == handle => Some(rr.clone()),
            _ => None,
        })
    }

    /// `member` no longer uses `key`; the socket closes when nobody does.
    pub fn leave(&mut self, key: &ListenKey, member: Member) {
        let empty = match self.handles.get_mut(key) {
            Some(shared) => {
                shared.members.remove(&member);
                if let (Mode::RoundRobin(rr), Member::Worker(id)) = (&shared.mode, member) {
                    rr.remove(id);
                }
                shared.members.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some(shared) = self.handles.remove(key) {
                close(shared);
            }
        }
    }

    /// `member` (an exited worker) leaves every socket it held.
    pub fn leave_all(&mut self, member: Member) {
        let keys: Vec<ListenKey> = self
            .handles
            .iter()
            .filter(|(_, s)| s.members.contains(&member))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.leave(&key, member);
        }
    }

    /// Closes every socket (removing Unix socket files the primary created).
    pub fn close_all(&mut self) {
        for (_, shared) in self.handles.drain() {
            close(shared);
        }
    }

    /// The addresses of the sockets held, with their member counts.
    pub fn listeners(&self) -> Vec<(ListenKey, BoundAddress, usize)> {
        self.handles
            .iter()
            .map(|(k, s)| (k.clone(), s.address.clone(), s.members.len()))
            .collect()
    }

    /// The workers that hold the socket for `key`.
    pub fn worker_members(&self, key: &ListenKey) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .handles
            .get(key)
            .map(|s| {
                s.members
                    .iter()
                    .filter_map(|m| match m {
                        Member::Worker(id) => Some(*id),
                        Member::Primary => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// The keys whose socket is bound to `address`.
    pub fn keys_at(&self, address: &BoundAddress) -> Vec<ListenKey> {
        self.handles
            .iter()
            .filter(|(_, s)| &s.address == address)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The socket for `key`, if held (for inspection).
    pub fn get(&self, key: &ListenKey) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.handles.get(key).map(|s| s.fd.as_fd())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.close_all();
    }
}

fn close(shared: Shared) {
    if let Mode::RoundRobin(rr) = &shared.mode {
        rr.close();
    }
    drop(shared.fd);
    if let Some(path) = shared.unlink {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inode(fd: &impl AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("stat fd")
    }

    fn tcp0(ordinal: u32) -> ListenKey {
        ListenKey {
            target: ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")),
            ordinal,
        }
    }

    #[test]
    fn same_key_same_socket_other_ordinal_other_port() {
        let mut r = Registry::default();
        let p = ListenParams::default();
        let a = r.acquire(&tcp0(0), &p, Member::Worker(1)).expect("bind");
        let b = r.acquire(&tcp0(0), &p, Member::Worker(2)).expect("share");
        assert_eq!(a.address, b.address);
        assert_eq!((a.grant, b.grant), (Grant::Shared, Grant::Shared));
        let (a_fd, b_fd) = (a.fd.expect("fd"), b.fd.expect("fd"));
        assert_eq!(inode(&a_fd), inode(&b_fd));
        let c = r
            .acquire(&tcp0(1), &p, Member::Worker(1))
            .expect("second port");
        assert_ne!(a.address, c.address);
        assert_ne!(inode(&a_fd), inode(&c.fd.expect("fd")));
    }

    #[test]
    fn last_member_leaving_closes_and_unlinks() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sock");
        let key = ListenKey {
            target: ListenTarget::Unix(path.clone()),
            ordinal: 0,
        };
        let mut r = Registry::default();
        let p = ListenParams::default();
        drop(r.acquire(&key, &p, Member::Worker(1)).expect("bind"));
        drop(r.acquire(&key, &p, Member::Worker(2)).expect("share"));
        r.leave(&key, Member::Worker(1));
        assert!(path.exists());
        r.leave_all(Member::Worker(2));
        assert!(!path.exists());
        assert!(r.get(&key).is_none());
    }

    #[test]
    fn failed_bind_is_forgotten_and_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let key = ListenKey {
            target: ListenTarget::Tcp(addr),
            ordinal: 0,
        };
        let mut r = Registry::default();
        let err = r
            .acquire(&key, &ListenParams::default(), Member::Worker(1))
            .expect_err("in use");
        assert_eq!(err.errno(), Some(libc_eaddrinuse()));
        assert!(err.to_string().contains(&addr.to_string()));
        assert!(r.get(&key).is_none());
        drop(taken);
        r.acquire(&key, &ListenParams::default(), Member::Worker(1))
            .expect("retry succeeds once the port is free");
    }

    #[test]
    fn reuse_port_policy_grants_an_address_and_keeps_a_reservation() {
        let mut r = Registry::new(SchedulingPolicy::ReusePort, None);
        let p = ListenParams::default();
        let a = r.acquire(&tcp0(0), &p, Member::Worker(1)).expect("reserve");
        let b = r.acquire(&tcp0(0), &p, Member::Worker(2)).expect("same");
        assert_eq!((a.grant, b.grant), (Grant::ReusePort, Grant::ReusePort));
        assert!(a.fd.is_none());
        assert_eq!(a.address, b.address);
        assert_ne!(a.address.port(), Some(0));
        // Unix sockets cannot reuse ports: they are shared.
        let dir = tempfile::tempdir().expect("tmp");
        let unix = ListenKey {
            target: ListenTarget::Unix(dir.path().join("u.sock")),
            ordinal: 0,
        };
        let u = r.acquire(&unix, &p, Member::Worker(1)).expect("unix");
        assert_eq!(u.grant, Grant::Shared);
    }

    #[test]
    fn the_first_request_for_a_key_decides_the_backlog() {
        let mut r = Registry::default();
        let first = ListenParams {
            backlog: 5,
            ..ListenParams::default()
        };
        let later = ListenParams {
            backlog: 100,
            ..ListenParams::default()
        };
        let a = r
            .acquire(&tcp0(0), &first, Member::Worker(1))
            .expect("bind");
        let b = r
            .acquire(&tcp0(0), &later, Member::Worker(2))
            .expect("share");
        assert_eq!(a.address, b.address);
        let port = a.address.port().expect("tcp");
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output();
        let Ok(out) = out else {
            eprintln!("skipped: `ss` (iproute2) is not installed");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().nth(2), Some("5"), "{text}");
    }

    #[test]
    fn policy_names() {
        assert_eq!("rr".parse(), Ok(SchedulingPolicy::RoundRobin));
        assert_eq!("none".parse(), Ok(SchedulingPolicy::Shared));
        assert_eq!("ReusePort".parse(), Ok(SchedulingPolicy::ReusePort));
        assert!("fastest".parse::<SchedulingPolicy>().is_err());
        assert_eq!(SchedulingPolicy::default(), SchedulingPolicy::RoundRobin);
    }

    fn libc_eaddrinuse() -> i32 {
        nix::errno::Errno::EADDRINUSE as i32
    }
}
