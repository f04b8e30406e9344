//! Who workers run as and what they may open: [`WorkerUser`] (`netcluster serve --user
//! USER[:GROUP]`) and [`Settings::rlimit_nofile`] (`--rlimit-nofile N`).
//!
//! The primary binds (port 80 as root, say) and starts its workers as the user: its uid, its
//! gid (or GROUP's), its supplementary groups, and `PR_SET_NO_NEW_PRIVS`. Names are resolved
//! when the settings are made, before anything binds or forks; the child between `fork` and
//! `exec` only makes system calls on the numbers
//! ([`netcluster_protocol::privileges`]). The control socket stays the primary's user's.
//!
//! What the user needs: to execute the worker's program — a native worker re-executes
//! [`Settings::exec`] (the netcluster binary), so every directory on its path must be
//! searchable by the user and the file executable (a binary under `/root` is neither) — and,
//! for a program that opens files by relative path, to read the working directory. A program
//! worker's `NOTIFY_SOCKET` is made the user's (its directory searchable by the user's group).

use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use netcluster_protocol::privileges::{ChildCredentials, Ids};
use nix::unistd::{Gid, Group, Uid, User};

use crate::settings::Settings;

/// A user workers run as, resolved from its name (and a group's) to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// The user's name, as the password database has it.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// The group id workers run with: the user's own, or the GROUP given.
    pub gid: u32,
    /// The supplementary groups: the user's (`getgrouplist`), with [`WorkerUser::gid`].
    pub groups: Vec<u32>,
    /// Its home directory (the workers' `HOME`).
    pub home: PathBuf,
}

/// Why a `USER[:GROUP]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// No such user in the password database.
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    /// No such group in the group database.
    #[error("--user: no such group: {0}")]
    NoSuchGroup(String),
    /// An empty user or group.
    #[error("--user {0:?}: write USER or USER:GROUP")]
    Malformed(String),
    /// The databases could not be read.
    #[error("--user {name}: cannot look it up: {error}")]
    Lookup {
        /// What was looked up.
        name: String,
        /// Why it failed.
        error: nix::Error,
    },
    /// This process cannot change a child's user.
    #[error(
        "--user {name}: only root can start workers as another user (this process runs as \
         uid {uid})"
    )]
    NotPrivileged {
        /// The user asked for.
        name: String,
        /// This process's effective uid.
        uid: u32,
    },
}

impl WorkerUser {
    /// Resolves `USER` or `USER:GROUP` (names, or numeric ids of existing entries).
    ///
    /// ```
    /// use netcluster_primary::WorkerUser;
    /// let root = WorkerUser::resolve("root").unwrap();
    /// assert_eq!((root.uid, root.gid), (0, 0));
    /// assert!(WorkerUser::resolve("no-such-user").unwrap_err().to_string().contains("no-such-user"));
    /// ```
    ///
    /// # Errors
    /// [`CredentialsError`], naming the user or group that does not exist.
    pub fn resolve(spec: &str) -> Result<WorkerUser, CredentialsError> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(CredentialsError::Malformed(spec.to_string()));
        }
        let lookup = |error| CredentialsError::Lookup {
            name: spec.to_string(),
            error,
        };
        let by_name = User::from_name(user).map_err(lookup)?;
        let entry = match (by_name, user.parse::<u32>()) {
            (Some(u), _) => u,
            (None, Ok(uid)) => User::from_uid(Uid::from_raw(uid))
                .map_err(lookup)?
                .ok_or_else(|| CredentialsError::NoSuchUser(user.to_string()))?,
            (None, Err(_)) => return Err(CredentialsError::NoSuchUser(user.to_string())),
        };
        let gid = match group {
            None => entry.gid,
            Some(g) => {
                let by_name = Group::from_name(g).map_err(lookup)?;
                match (by_name, g.parse::<u32>()) {
                    (Some(found), _) => found.gid,
                    (None, Ok(gid)) => {
                        Group::from_gid(Gid::from_raw(gid))
                            .map_err(lookup)?
                            .ok_or_else(|| CredentialsError::NoSuchGroup(g.to_string()))?
                            .gid
                    }
                    (None, Err(_)) => return Err(CredentialsError::NoSuchGroup(g.to_string())),
                }
            }
        };
        let cname = CString::new(entry.name.as_str())
            .map_err(|_| CredentialsError::Malformed(spec.into()))?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, gid)
            .map_err(lookup)?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        Ok(WorkerUser {
            name: entry.name,
            uid: entry.uid.as_raw(),
            gid: gid.as_raw(),
            groups,
            home: entry.dir,
        })
    }

    /// Whether this process can start workers as this user: it is root, or it is this user
    /// with this group already (then nothing changes but `PR_SET_NO_NEW_PRIVS`).
    ///
    /// # Errors
    /// [`CredentialsError::NotPrivileged`].
    pub fn check_privileged(&self) -> Result<(), CredentialsError> {
        if Uid::effective().is_root() || self.is_current() {
            return Ok(());
        }
        Err(CredentialsError::NotPrivileged {
            name: self.name.clone(),
            uid: Uid::effective().as_raw(),
        })
    }

    /// Whether this process already runs as this user and group.
    fn is_current(&self) -> bool {
        Uid::effective().as_raw() == self.uid && Gid::effective().as_raw() == self.gid
    }
}

/// Makes a worker's `cmd` run as [`Settings::user`] with [`Settings::rlimit_nofile`]: sets
/// `USER`, `LOGNAME` and `HOME` (unless [`Settings::env`] does) and registers the hook that
/// changes the child's credentials. Call it after every other `pre_exec` hook.
pub(crate) fn apply(cmd: &mut tokio::process::Command, settings: &Settings) {
    let mut creds = ChildCredentials {
        ids: None,
        no_new_privs: false,
        nofile: settings.rlimit_nofile,
    };
    if let Some(user) = &settings.user {
        let given = |name: &str| settings.env.iter().any(|(k, _)| k == name);
        for (name, value) in [
            ("USER", user.name.as_str().as_ref()),
            ("LOGNAME", user.name.as_str().as_ref()),
            ("HOME", user.home.as_os_str()),
        ] {
            if !given(name) {
                cmd.env(name, value);
            }
        }
        // An unprivileged primary that already is the user changes nothing (and could not
        // call setgroups); any other gets EPERM from the spawn.
        if Uid::effective().is_root() || !user.is_current() {
            creds.ids = Some(Ids {
                uid: user.uid,
                gid: user.gid,
                groups: user.groups.clone(),
            });
        }
        creds.no_new_privs = true;
    }
    netcluster_protocol::privileges::apply_before_exec(cmd, creds);
}

/// Opens the primary's private notification directory (0700) to [`Settings::user`]: owned by
/// the user's group and searchable by it (0710), so the workers reach their sockets and nobody
/// else lists or enters it. Without a user, nothing changes.
///
/// # Errors
/// The error of `chown` or `chmod`.
pub(crate) fn open_notify_dir(dir: &Path, settings: &Settings) -> io::Result<()> {
    let Some(user) = &settings.user else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, None, Some(user.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
}

/// Gives a program worker's notification socket to [`Settings::user`], so the worker (and any
/// process of it) can send to it. Without a user, nothing changes.
///
/// # Errors
/// The error of `chown`.
pub(crate) fn give_notify_socket(path: &Path, settings: &Settings) -> io::Result<()> {
    match &settings.user {
        Some(user) => std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve_and_unknown_ones_are_named() {
        let root = WorkerUser::resolve("root").expect("root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(WorkerUser::resolve("0").expect("uid 0").name, root.name);
        let with_group = WorkerUser::resolve("root:0").expect("root:0");
        assert_eq!(with_group.gid, 0);
        let e = WorkerUser::resolve("no-such-user-xyz").expect_err("unknown");
        assert!(e.to_string().contains("no-such-user-xyz"), "{e}");
        let e = WorkerUser::resolve("root:no-such-group-xyz").expect_err("unknown group");
        assert!(e.to_string().contains("no-such-group-xyz"), "{e}");
        for bad in ["", ":", "root:", ":root"] {
            let e = WorkerUser::resolve(bad).expect_err("malformed");
            assert!(e.to_string().contains("USER:GROUP"), "{bad:?}: {e}");
        }
    }
}
