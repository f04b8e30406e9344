//! The primary's table of shared listening sockets, one per [`ListenKey`].
//!
//! The first request for a key binds the socket (with that request's backlog and mode
//! options); later requests for the same key get the same socket. A failed bind is not
//! remembered, so a later request can retry. When the last member leaves, the socket is
//! closed and a Unix socket file the primary created is removed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use netcluster_protocol::handle::{self, ListenError};
use netcluster_protocol::message::{BoundAddress, ListenKey, ListenParams, ListenTarget};

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
}

/// Shared listening sockets by key.
#[derive(Debug, Default)]
pub struct Registry {
    handles: HashMap<ListenKey, Shared>,
}

impl Registry {
    /// Joins `member` to the socket for `key`, binding it first if nobody holds it, and returns
    /// a duplicate of the socket (to send) with its address.
    ///
    /// # Errors
    /// The bind error naming the address; nothing is remembered for the key.
    pub fn acquire(
        &mut self,
        key: &ListenKey,
        params: &ListenParams,
        member: Member,
    ) -> Result<(OwnedFd, BoundAddress), ListenError> {
        if let Some(shared) = self.handles.get_mut(key) {
            let dup = shared
                .fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| ListenError::new(&key.target, e))?;
            shared.members.insert(member);
            return Ok((dup, shared.address.clone()));
        }
        let (fd, address) = handle::bind_listener(&key.target, params)?;
        let dup = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| ListenError::new(&key.target, e))?;
        let unlink = match &key.target {
            ListenTarget::Unix(path) => Some(path.clone()),
            _ => None,
        };
        self.handles.insert(
            key.clone(),
            Shared {
                fd,
                address: address.clone(),
                members: HashSet::from([member]),
                unlink,
            },
        );
        Ok((dup, address))
    }

    /// `member` no longer uses `key`; the socket closes when nobody does.
    pub fn leave(&mut self, key: &ListenKey, member: Member) {
        let empty = match self.handles.get_mut(key) {
            Some(shared) => {
                shared.members.remove(&member);
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
        let (a, addr_a) = r.acquire(&tcp0(0), &p, Member::Worker(1)).expect("bind");
        let (b, addr_b) = r.acquire(&tcp0(0), &p, Member::Worker(2)).expect("share");
        assert_eq!(addr_a, addr_b);
        assert_eq!(inode(&a), inode(&b));
        let (c, addr_c) = r
            .acquire(&tcp0(1), &p, Member::Worker(1))
            .expect("second port");
        assert_ne!(addr_a, addr_c);
        assert_ne!(inode(&a), inode(&c));
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

    fn libc_eaddrinuse() -> i32 {
        nix::errno::Errno::EADDRINUSE as i32
    }
}
