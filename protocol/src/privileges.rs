//! What a worker process becomes between `fork` and `exec`: another user (uid, gid,
//! supplementary groups), `PR_SET_NO_NEW_PRIVS`, and a descriptor limit.
//!
//! Everything is resolved in the parent (names to numbers, the group list allocated) and handed
//! over as plain numbers; the hook in the child makes only raw system calls — async-signal-safe,
//! as a child of a multi-threaded parent must be. The order matters: the limit first (raising a
//! hard limit needs root), then the groups, the gid and the uid (dropping the uid last, since
//! it takes away the right to change the others), then `PR_SET_NO_NEW_PRIVS`.

#![allow(unsafe_code)]

use std::io;

/// What a child process is made before it executes its program. The default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildCredentials {
    /// Become this user, with this group and these supplementary groups (`setgroups`,
    /// `setresgid`, `setresuid`): only a privileged parent can.
    pub ids: Option<Ids>,
    /// Set `PR_SET_NO_NEW_PRIVS`: no set-user-id program or file capability gives the child,
    /// or anything it executes, more than it has.
    pub no_new_privs: bool,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: Option<u64>,
}

/// A user's numbers, resolved from names before the fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// The supplementary groups.
    pub groups: Vec<u32>,
}

impl ChildCredentials {
    /// Whether this changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ids.is_none() && !self.no_new_privs && self.nofile.is_none()
    }
}

/// Makes `cmd`'s child take on `creds` right before it executes its program (after every hook
/// registered before this one, so call it last: a hook after it runs without the privileges
/// it drops). Nothing is registered when `creds` changes nothing.
///
/// A failing call fails the spawn with its error (`EPERM` from `setresuid` in an unprivileged
/// parent, say).
pub fn apply_before_exec(cmd: &mut tokio::process::Command, creds: ChildCredentials) {
    if creds.is_empty() {
        return;
    }
    let ChildCredentials {
        ids,
        no_new_privs,
        nofile,
    } = creds;
    let groups: Vec<libc::gid_t> = ids.as_ref().map(|i| i.groups.clone()).unwrap_or_default();
    let hook = move || -> io::Result<()> {
        if let Some(n) = nofile {
            let n: libc::rlim_t = n;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit reads the struct we own; async-signal-safe.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(ids) = &ids {
            // SAFETY: setgroups reads `groups.len()` gids from a Vec allocated before the fork
            // and alive for the hook's life; the other calls take plain numbers. All are raw
            // system calls, async-signal-safe.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
                    || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        if no_new_privs {
            // SAFETY: prctl with integer arguments only; async-signal-safe.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and only makes system calls on
    // values moved into it before the fork (no allocation, no lock; `last_os_error` reads
    // errno into a value without allocating).
    unsafe {
        cmd.pre_exec(hook);
    }
}
