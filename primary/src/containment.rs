//! Containment: a worker is a process tree, not a pid, and nothing of it outlives its slot's
//! worker or the primary.
//!
//! - Each worker is the leader of its own **process group** (a terminal's `SIGINT`/`SIGHUP`
//!   reach only the primary, which turns them into its graceful stop or reload), and, where the
//!   primary can make cgroup v2 groups (a writable cgroup2 mount, or a delegated cgroup under
//!   systemd's `Delegate=yes`), it runs in a **cgroup** of its own, which `cgroup.kill` ends
//!   whole.
//! - The primary is a **child subreaper** (`PR_SET_CHILD_SUBREAPER`): what a worker's tree
//!   orphans (a daemonizing program's `setsid` child) comes back to it. Every worker carries
//!   [`TREE_ENV`] in its environment, so an orphan tells whose it is; [`Containment::sweep`]
//!   reaps the orphans that exited and kills those whose worker is gone.
//! - When a worker exits, is killed at its drain deadline, or fails, what is left of its tree
//!   is killed: its process group, its cgroup, its orphans.
//! - Each worker gets `PR_SET_PDEATHSIG` (its stop signal), and a **guardian** process
//!   ([`netcluster_protocol::guardian`]) outlives the primary to stop the rest of the trees and
//!   kill what is left at the drain timeout, when the primary dies of anything.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use netcluster_protocol::child::{ChildSetup, signal_group};
use netcluster_protocol::guardian::{
    self, BYE, GUARDIAN_DRAIN_ENV, GUARDIAN_ENV, GUARDIAN_SIGNAL_ENV,
};
use nix::sys::signal::Signal;

pub use netcluster_protocol::guardian::TREE_ENV;

/// Children of this process that their spawner waits for (workers, a new primary of an
/// upgrade, the guardian): the sweep never reaps them.
fn claimed() -> &'static Mutex<BTreeSet<u32>> {
    static CLAIMED: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    CLAIMED.get_or_init(|| Mutex::new(BTreeSet::new()))
}

fn with_claimed<T>(f: impl FnOnce(&mut BTreeSet<u32>) -> T) -> T {
    let mut guard = match claimed().lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    f(&mut guard)
}

/// Marks child `pid` as waited for by whoever spawned it: the sweep leaves it alone.
pub fn claim(pid: u32) {
    with_claimed(|c| c.insert(pid));
}

/// Child `pid` was reaped by whoever spawned it.
pub fn release(pid: u32) {
    with_claimed(|c| c.remove(&pid));
}

/// A worker's tree.
#[derive(Debug)]
struct Tree {
    pid: u32,
    cgroup: Option<PathBuf>,
}

/// The cgroup under which the primary makes its workers' cgroups.
#[derive(Debug)]
struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    /// A directory for this primary's workers under its own cgroup v2 group, if it may make
    /// one there.
    fn detect() -> Option<Cgroups> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        if under_systemd_without_delegation(&own_dir) {
            return None;
        }
        remove_stale(&own_dir, "netcluster-", |dir| {
            // A primary's cgroups: its workers' groups, then its own (all empty by now).
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().join("cgroup.procs").exists() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        });
        let root = own_dir.join(format!("netcluster-{}", std::process::id()));
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::debug!("no cgroup per worker ({}: {e})", root.display());
                return None;
            }
        }
        if !root.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&root);
            tracing::debug!("no cgroup per worker: this kernel has no cgroup.kill");
            return None;
        }
        Some(Cgroups { root })
    }
}

/// Removes, with `remove`, what primaries that are gone left in `parent` under names
/// `PREFIX<pid>` or `PREFIX<pid>-…` (a primary killed with its guardian, or one of an older
/// build): the primary whose pid it names no longer runs.
pub(crate) fn remove_stale(parent: &Path, prefix: &str, remove: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone && u32::try_from(pid).ok() != Some(std::process::id()) {
            remove(&e.path());
        }
    }
}

/// Whether `dir` is a systemd unit's cgroup that systemd did not delegate (`Delegate=yes`
/// marks it with the `trusted.delegate` or `user.delegate` attribute): making groups under it
/// would fight systemd.
fn under_systemd_without_delegation(dir: &Path) -> bool {
    let unit = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".service") || n.ends_with(".scope"));
    if !unit {
        return false;
    }
    let delegated = ["trusted.delegate", "user.delegate"]
        .into_iter()
        .any(|attr| has_xattr(dir, attr));
    !delegated
}

fn has_xattr(path: &Path, name: &str) -> bool {
    // getxattr with a zero-sized buffer tells whether the attribute exists.
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    netcluster_protocol::child::xattr_size(&path, &name) >= 0
}

/// The containment of one primary's workers.
#[derive(Debug)]
pub(crate) struct Containment {
    cgroups: Option<Cgroups>,
    trees: BTreeMap<u32, Tree>,
    /// Cgroups of ended trees, removed once empty.
    ended: Vec<PathBuf>,
    guardian: Option<Guardian>,
    drain: Duration,
    stop_signal: Signal,
    /// Orphans already reported, so each is logged once.
    seen: BTreeSet<u32>,
    /// Directories the guardian removes once the primary is gone.
    remove: Vec<PathBuf>,
}

#[derive(Debug)]
struct Guardian {
    child: std::process::Child,
    pipe: std::fs::File,
}

impl Containment {
    /// Makes this process a child subreaper and finds whether it may make cgroups.
    pub fn new(drain: Duration, stop_signal: Signal) -> Containment {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("cannot become a child subreaper ({e}): orphans of workers go to init");
        }
        let cgroups = Cgroups::detect();
        match &cgroups {
            Some(c) => tracing::debug!(
                "each worker runs in its own process group and cgroup (under {})",
                c.root.display()
            ),
            None => tracing::debug!("each worker runs in its own process group (no cgroups)"),
        }
        Containment {
            cgroups,
            trees: BTreeMap::new(),
            ended: Vec::new(),
            guardian: None,
            drain,
            stop_signal,
            seen: BTreeSet::new(),
            remove: Vec::new(),
        }
    }

    /// Directory `path` is removed once the primary is gone, whatever way it goes (its
    /// guardian removes it).
    pub fn remove_when_gone(&mut self, path: &Path) {
        if !self.remove.iter().any(|p| p == path) {
            self.remove.push(path.to_path_buf());
            self.tell(&guardian::remove_line(path));
        }
    }

    /// What worker `id` is started with: [`TREE_ENV`], and its parent-death signal and cgroup.
    pub fn prepare(&mut self, id: u32, stop_signal: Signal) -> ((String, String), ChildSetup) {
        let cgroup_procs = self.cgroups.as_ref().and_then(|c| {
            let dir = c.root.join(format!("w{id}"));
            let _ = std::fs::create_dir(&dir);
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map(OwnedFd::from)
                .inspect_err(|e| tracing::debug!("cannot use {}: {e}", dir.display()))
                .ok()
        });
        let env = (TREE_ENV.to_string(), format!("{}:{id}", std::process::id()));
        (
            env,
            ChildSetup {
                parent_death_signal: Some(stop_signal),
                cgroup_procs,
            },
        )
    }

    /// Worker `id` started as process (and process group) `pid`.
    pub fn started(&mut self, id: u32, pid: u32) {
        claim(pid);
        let cgroup = self.cgroups.as_ref().map(|c| c.root.join(format!("w{id}")));
        self.tell(&guardian::started_line(pid, cgroup.as_deref()));
        self.trees.insert(id, Tree { pid, cgroup });
    }

    /// A worker could not be started: its cgroup goes.
    pub fn not_started(&mut self, id: u32) {
        if let Some(c) = &self.cgroups {
            let _ = std::fs::remove_dir(c.root.join(format!("w{id}")));
        }
    }

    /// Kills every process of worker `id`'s tree (its deadline passed, or it misbehaved).
    pub fn kill(&mut self, id: u32) {
        let Some(tree) = self.trees.get(&id) else {
            return;
        };
        let _ = signal_group(tree.pid, Signal::SIGKILL);
        if let Some(dir) = &tree.cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        self.kill_orphans(|tree| tree == id);
    }

    /// Worker `id` exited and was reaped: what is left of its tree is killed, and the tree is
    /// forgotten.
    pub fn ended(&mut self, id: u32) {
        self.kill(id);
        if let Some(tree) = self.trees.remove(&id) {
            release(tree.pid);
            self.tell(&guardian::ended_line(tree.pid));
            self.ended.extend(tree.cgroup);
        }
        self.remove_empty_cgroups();
    }

    /// Reaps the orphans that exited and kills the live ones whose worker is gone.
    pub fn sweep(&mut self) {
        self.reap_orphans();
        let live: BTreeSet<u32> = self.trees.keys().copied().collect();
        self.kill_orphans(|tree| !live.contains(&tree));
        self.remove_empty_cgroups();
        self.check_guardian();
    }

    /// The primary exits in good order: the guardian goes, and so do the cgroups.
    pub fn close(&mut self) {
        for id in self.trees.keys().copied().collect::<Vec<_>>() {
            self.kill(id);
        }
        self.kill_orphans(|_| true);
        if let Some(mut g) = self.guardian.take() {
            let _ = g.pipe.write_all(BYE.as_bytes());
            drop(g.pipe);
            let _ = g.child.wait();
            release(g.child.id());
        }
        self.ended
            .extend(self.trees.values_mut().filter_map(|t| t.cgroup.take()));
        self.remove_empty_cgroups();
        if let Some(c) = &self.cgroups {
            let _ = std::fs::remove_dir(&c.root);
        }
    }

    fn remove_empty_cgroups(&mut self) {
        self.ended.retain(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => false,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        });
    }

    /// Kills the live orphans of the trees `which` picks (by worker id).
    fn kill_orphans(&mut self, which: impl Fn(u32) -> bool) {
        for (pid, tree) in orphans() {
            let Some(tree) = tree else {
                if self.seen.insert(pid) {
                    tracing::debug!(pid, "a child of the primary that is not a worker's");
                }
                continue;
            };
            if which(tree) {
                if self.seen.insert(pid) {
                    tracing::info!(pid, worker = tree, "killing what the worker left behind");
                }
                let _ = nix::sys::signal::kill(pid_of(pid), Signal::SIGKILL);
            }
        }
    }

    /// Waits for the children that exited and that nobody else waits for.
    fn reap_orphans(&mut self) {
        for pid in children() {
            if with_claimed(|c| c.contains(&pid)) {
                continue;
            }
            if guardian::stat(pid).is_some_and(|(state, _)| state == 'Z') {
                let _ = nix::sys::wait::waitpid(
                    pid_of(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                self.seen.remove(&pid);
            }
        }
    }

    fn tell(&mut self, line: &str) {
        if self.guardian.is_none() {
            self.guardian = start_guardian(self.drain, self.stop_signal)
                .inspect_err(|e| {
                    tracing::warn!("cannot start the guardian ({e}): if the primary dies, its workers' children may outlive it");
                })
                .ok();
            if self.guardian.is_some() {
                let mut lines: Vec<String> = self
                    .trees
                    .values()
                    .map(|t| guardian::started_line(t.pid, t.cgroup.as_deref()))
                    .collect();
                lines.extend(self.remove.iter().map(|p| guardian::remove_line(p)));
                if let Some(c) = &self.cgroups {
                    lines.push(guardian::remove_line(&c.root));
                }
                for l in lines {
                    self.write_guardian(&l);
                }
            }
        }
        self.write_guardian(line);
    }

    fn write_guardian(&mut self, line: &str) {
        if let Some(g) = &mut self.guardian {
            if let Err(e) = g.pipe.write_all(line.as_bytes()) {
                tracing::warn!("the guardian does not listen ({e}); starting another");
                self.guardian = None;
            }
        }
    }

    /// A guardian that died is replaced.
    fn check_guardian(&mut self) {
        let dead = self
            .guardian
            .as_mut()
            .is_some_and(|g| !matches!(g.child.try_wait(), Ok(None)));
        if dead {
            if let Some(g) = self.guardian.take() {
                release(g.child.id());
            }
            tracing::warn!("the guardian exited; starting another");
            self.tell("");
        }
    }
}

fn pid_of(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// This process's children, from `/proc/self/task/*/children`.
fn children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// The live children that are no worker nor anything else the primary waits for, with the
/// worker id their environment names (if it names one of this primary's).
fn orphans() -> Vec<(u32, Option<u32>)> {
    let marker = format!("{TREE_ENV}={}:", std::process::id());
    children()
        .into_iter()
        .filter(|pid| !with_claimed(|c| c.contains(pid)))
        .filter(|&pid| guardian::stat(pid).is_some_and(|(state, _)| state != 'Z'))
        .map(|pid| {
            let tree = std::fs::read(format!("/proc/{pid}/environ"))
                .ok()
                .and_then(|env| {
                    env.split(|&b| b == 0).find_map(|v| {
                        std::str::from_utf8(v.strip_prefix(marker.as_bytes())?)
                            .ok()?
                            .parse::<u32>()
                            .ok()
                    })
                });
            (pid, tree)
        })
        .collect()
}

fn start_guardian(drain: Duration, stop_signal: Signal) -> io::Result<Guardian> {
    use command_fds::{CommandFdExt, FdMapping};
    use std::os::unix::process::CommandExt;

    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let target = 3;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.env(GUARDIAN_ENV, target.to_string())
        .env(GUARDIAN_DRAIN_ENV, drain.as_millis().to_string())
        .env(GUARDIAN_SIGNAL_ENV, (stop_signal as i32).to_string())
        .stdin(std::process::Stdio::null())
        .process_group(0);
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: read,
        child_fd: target,
    }])
    .map_err(io::Error::other)?;
    let child = cmd.spawn()?;
    claim(child.id());
    let pipe = std::fs::File::from(write);
    // A guardian that stops reading must not stall the primary.
    let flags = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    nix::fcntl::fcntl(
        &pipe,
        nix::fcntl::FcntlArg::F_SETFL(
            nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK,
        ),
    )
    .map_err(io::Error::from)?;
    Ok(Guardian { child, pipe })
}
