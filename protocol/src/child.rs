//! What a worker process does between `fork` and `exec`, prepared by the primary before it
//! forks: the signal it gets when the primary dies (`PR_SET_PDEATHSIG`, checked against a
//! primary that died before the call), and the cgroup it moves into.
//!
//! Everything the hook needs is computed before `fork`; between `fork` and `exec` it makes
//! only async-signal-safe system calls (`prctl`, `getppid`, `write`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

/// What a new worker does before it executes its program.
#[derive(Debug)]
pub struct ChildSetup {
    /// The signal the worker gets when the primary dies (any cause, `SIGKILL` included).
    pub parent_death_signal: Option<Signal>,
    /// `cgroup.procs` of the worker's own cgroup, opened for writing: the worker moves itself
    /// in (so everything it starts is in it too).
    pub cgroup_procs: Option<OwnedFd>,
}

/// Installs `setup`'s move into its cgroup on `cmd`. Keep the returned guard until `cmd` has
/// been spawned: it holds the descriptor the hook writes to. Call it before any hook that
/// drops privileges (moving needs the primary's), and [`install_parent_death`] after them
/// (a change of credentials clears the parent-death signal).
pub fn install(cmd: &mut tokio::process::Command, setup: ChildSetup) -> ChildSetupGuard {
    if let Some(signal) = setup.parent_death_signal {
        // Registered here too for a caller with no credential hooks; a later call after them
        // sets it again, which is harmless.
        install_parent_death(cmd, signal);
    }
    let procs: Option<RawFd> = setup.cgroup_procs.as_ref().map(AsRawFd::as_raw_fd);
    if let Some(fd) = procs {
        // SAFETY: the hook runs in the child between fork and exec; it calls only write
        // (async-signal-safe), allocates nothing, takes no lock, and touches only the copied
        // integer it captured; the descriptor is kept open by the returned guard until the
        // spawn is done.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process. A failure leaves the worker where it is; the
                // primary still ends its tree by its process group.
                let _ = libc::write(fd, c"0".as_ptr().cast(), 1);
                Ok(())
            });
        }
    }
    ChildSetupGuard {
        _cgroup_procs: setup.cgroup_procs,
    }
}

/// Installs on `cmd` that the child gets `signal` when this process dies
/// (`PR_SET_PDEATHSIG`), failing the start if this process died already. Hooks run in the
/// order they were installed: install this after any that changes credentials.
pub fn install_parent_death(cmd: &mut tokio::process::Command, signal: Signal) {
    let parent = std::process::id();
    let sig = signal as libc::c_int;
    // SAFETY: the hook runs in the child between fork and exec. It calls only prctl and
    // getppid (async-signal-safe), allocates nothing, takes no lock, and touches only the
    // copied integers it captured.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The primary may have died before the prctl: then nobody will signal us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Keeps what a [`ChildSetup`] hook uses open until the child has been spawned.
#[derive(Debug)]
pub struct ChildSetupGuard {
    _cgroup_procs: Option<OwnedFd>,
}

/// Sends `signal` to every process of process group `pgid` (`kill(-pgid, signal)`).
///
/// # Errors
/// `ESRCH` when the group has no process left; `EINVAL` for a `pgid` that is not positive.
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let pgid = i32::try_from(pgid)
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal).map_err(io::Error::from)
}

/// The size of extended attribute `name` of `path` (not following a last symlink), or -1 when
/// it has none (`errno` says why, `ENODATA` when it is absent).
pub fn xattr_size(path: &std::ffi::CStr, name: &std::ffi::CStr) -> isize {
    // SAFETY: both strings are NUL-terminated and outlive the call; a NULL buffer of size 0
    // asks only for the size, so nothing is written.
    unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) }
}
