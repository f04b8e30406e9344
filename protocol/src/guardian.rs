//! The guardian: a small process each primary starts, which outlives it to stop its workers'
//! process trees when the primary dies of anything, `SIGKILL` included.
//!
//! The primary tells the guardian, one line at a time on a pipe, which trees exist:
//! `+PGID CGROUP` when a worker starts (its process group, and its cgroup directory or `-`),
//! `-PGID` when it ended, `rm PATH` for a directory of the primary's to remove when it is gone
//! (its notification sockets, its cgroups), `bye` when the primary exits in good order: then
//! the guardian removes those directories and exits. End of file without
//! `bye` means the primary died. Then the guardian sends the stop signal to every process of
//! the trees but their leaders (the workers themselves get it from `PR_SET_PDEATHSIG`), waits
//! until they are gone or the drain timeout has passed, and kills what is left: the process
//! groups, the cgroups (`cgroup.kill`), and every process whose environment says it belongs to
//! one of the primary's trees ([`TREE_ENV`]).
//!
//! It runs before `main` (from [`crate::start`]) in a re-execution of the primary's own
//! executable with [`GUARDIAN_ENV`] set, single-threaded and with blocking calls only.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Names the descriptor a guardian reads its primary's lines from.
pub const GUARDIAN_ENV: &str = "NETCLUSTER_GUARDIAN_FD";
/// The drain timeout, in milliseconds.
pub const GUARDIAN_DRAIN_ENV: &str = "NETCLUSTER_GUARDIAN_DRAIN_MS";
/// The workers' stop signal, as a number.
pub const GUARDIAN_SIGNAL_ENV: &str = "NETCLUSTER_GUARDIAN_SIGNAL";
/// Set in every worker's environment (and so, unless they clear it, in everything it starts):
/// `PRIMARY_PID:WORKER_ID`.
pub const TREE_ENV: &str = "NETCLUSTER_TREE";

/// One tree the primary told of.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tree {
    cgroup: Option<PathBuf>,
}

/// Runs the guardian if this process was started as one; never returns then.
pub(crate) fn run_if_asked() {
    let Some(fd) = std::env::var(GUARDIAN_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
    else {
        return;
    };
    let drain = std::env::var(GUARDIAN_DRAIN_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let signal = std::env::var(GUARDIAN_SIGNAL_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .and_then(|n| Signal::try_from(n).ok())
        .unwrap_or(Signal::SIGTERM);
    let primary = std::os::unix::process::parent_id();
    // SAFETY: the primary mapped the read end of its pipe to this number for us, and nothing
    // else in this process owns it (we run before main).
    let pipe = unsafe { OwnedFd::from_raw_fd(fd) };
    let code = guard(pipe, primary, drain, signal);
    std::process::exit(code);
}

fn guard(pipe: OwnedFd, primary: u32, drain: Duration, signal: Signal) -> i32 {
    let mut trees: BTreeMap<u32, Tree> = BTreeMap::new();
    let mut remove: Vec<PathBuf> = Vec::new();
    let reader = io::BufReader::new(std::fs::File::from(pipe));
    for line in reader.lines() {
        let Ok(line) = line else { break };
        match parse(&line) {
            Some(Said::Started(pgid, tree)) => {
                trees.insert(pgid, tree);
            }
            Some(Said::Ended(pgid)) => {
                trees.remove(&pgid);
            }
            Some(Said::Remove(path)) if !remove.contains(&path) => remove.push(path),
            Some(Said::Remove(_)) => {}
            Some(Said::Bye) => {
                clean_up(&remove);
                return 0;
            }
            None => {}
        }
    }
    // The primary is gone.
    let code = stop_trees(primary, &trees, drain, signal);
    clean_up(&remove);
    code
}

/// Removes the primary's directories: a cgroup directory (one with `cgroup.procs`) with the
/// empty groups under it, waiting up to 2 s for them to empty; anything else whole.
fn clean_up(paths: &[PathBuf]) {
    let until = Instant::now() + Duration::from_secs(2);
    for path in paths {
        if !path.join("cgroup.procs").exists() {
            let _ = std::fs::remove_dir_all(path);
            continue;
        }
        loop {
            if let Ok(dir) = std::fs::read_dir(path) {
                for entry in dir.flatten() {
                    if entry.path().join("cgroup.procs").exists() {
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
            }
            if std::fs::remove_dir(path).is_ok() || !path.exists() || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops the trees of a primary that died: the stop signal to every process but the workers
/// (the kernel sent it to them), then `SIGKILL` to what is left at the drain timeout.
fn stop_trees(primary: u32, trees: &BTreeMap<u32, Tree>, drain: Duration, signal: Signal) -> i32 {
    let left = members(primary, trees);
    if trees.is_empty() && left.is_empty() {
        return 0;
    }
    eprintln!(
        "netcluster guardian: primary {primary} is gone; stopping {} worker tree(s)",
        trees.len()
    );
    for (pid, pgid) in &left {
        // The workers themselves (the group leaders) got the signal from the kernel.
        if !trees.contains_key(pid) || pgid != pid {
            let _ = kill(pid_of(*pid), signal);
        }
    }
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline {
        if members(primary, trees).is_empty() && trees.values().all(|t| !populated(t)) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pgid, tree) in trees {
        let _ = killpg(pid_of(*pgid), Signal::SIGKILL);
        if let Some(dir) = &tree.cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
    }
    for (pid, _) in members(primary, trees) {
        let _ = kill(pid_of(pid), Signal::SIGKILL);
    }
    eprintln!("netcluster guardian: killed what was left at the drain timeout ({drain:?})");
    0
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// What a line from the primary says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    Started(u32, Tree),
    Ended(u32),
    Remove(PathBuf),
    Bye,
}

fn parse(line: &str) -> Option<Said> {
    if line == "bye" {
        return Some(Said::Bye);
    }
    if let Some(path) = line.strip_prefix("rm ") {
        return (!path.is_empty()).then(|| Said::Remove(PathBuf::from(path)));
    }
    if let Some(rest) = line.strip_prefix('+') {
        let (pgid, cgroup) = rest.split_once(' ')?;
        let cgroup = (cgroup != "-").then(|| PathBuf::from(cgroup));
        return Some(Said::Started(pgid.parse().ok()?, Tree { cgroup }));
    }
    line.strip_prefix('-')?.parse().ok().map(Said::Ended)
}

/// The line that tells a guardian of a started tree.
pub fn started_line(pgid: u32, cgroup: Option<&std::path::Path>) -> String {
    match cgroup {
        Some(dir) => format!("+{pgid} {}\n", dir.display()),
        None => format!("+{pgid} -\n"),
    }
}

/// The line that tells a guardian a tree ended.
pub fn ended_line(pgid: u32) -> String {
    format!("-{pgid}\n")
}

/// The line that asks a guardian to remove directory `path` once the primary is gone.
pub fn remove_line(path: &std::path::Path) -> String {
    format!("rm {}\n", path.display())
}

/// The line a primary that exits in good order sends last.
pub const BYE: &str = "bye\n";

fn populated(tree: &Tree) -> bool {
    tree.cgroup.as_ref().is_some_and(|dir| {
        std::fs::read_to_string(dir.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
    })
}

/// Every live process of the trees: in one of their process groups, or carrying the
/// primary's [`TREE_ENV`]; as (pid, process group).
fn members(primary: u32, trees: &BTreeMap<u32, Tree>) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let marker = format!("{TREE_ENV}={primary}:");
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((state, pgid)) = stat(pid) else {
            continue;
        };
        if state == 'Z' {
            continue;
        }
        let ours = trees.contains_key(&pgid)
            || std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|v| v.starts_with(marker.as_bytes()))
            });
        if ours {
            out.push((pid, pgid));
        }
    }
    out
}

/// A process's state letter and process group, from `/proc/PID/stat`.
pub fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: read after the last ')'.
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((state, pgid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primarys_lines_are_read_back() {
        let dir = std::path::Path::new("/sys/fs/cgroup/x/w1");
        assert_eq!(
            parse(started_line(42, Some(dir)).trim_end()),
            Some(Said::Started(
                42,
                Tree {
                    cgroup: Some(dir.to_path_buf())
                }
            ))
        );
        assert_eq!(
            parse(started_line(7, None).trim_end()),
            Some(Said::Started(7, Tree { cgroup: None }))
        );
        assert_eq!(parse(ended_line(7).trim_end()), Some(Said::Ended(7)));
        assert_eq!(parse(BYE.trim_end()), Some(Said::Bye));
        assert_eq!(
            parse(remove_line(dir).trim_end()),
            Some(Said::Remove(dir.to_path_buf()))
        );
        assert_eq!(parse("+x -"), None);
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn a_process_state_and_group_are_read_from_proc() {
        let (state, pgid) = stat(std::process::id()).expect("own stat");
        assert!(matches!(state, 'R' | 'S'));
        assert_eq!(
            i32::try_from(pgid).ok(),
            Some(nix::unistd::getpgrp().as_raw())
        );
    }
}
