//! Starting worker processes: the descriptors and the environment they get.
//!
//! Every worker gets the operator's listeners the systemd way — descriptors 3, 4, … in the
//! order they were configured, `LISTEN_FDS`, `LISTEN_FDNAMES`, and `LISTEN_PID` set to **its own**
//! pid (by the pre-`main` constructor of `netcluster-protocol`, since a parent cannot know the
//! pid before it forks) — except a native worker under round robin, whose connections come from
//! the primary and which therefore holds no listening socket.
//!
//! - A **native** worker ([`WorkerKind::Native`]) is [`Settings::exec`] with [`Settings::args`];
//!   its channel sits right after its listeners (at `3 + LISTEN_FDS`, named by
//!   [`env::CHANNEL_FD`]), so the two numberings never collide, and its environment names its
//!   worker id, the primary's pid, its slot and generation.
//! - A **program** worker ([`WorkerKind::Program`]) starts as this executable in shim mode
//!   ([`env::EXEC`]): before `main`, the shim sets `LISTEN_PID`, closes every descriptor past
//!   the listeners and executes the program in place (same pid). It gets a `NOTIFY_SOCKET` of
//!   its own and no channel; nothing else of the primary's reaches it.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

use command_fds::{CommandFdExt, FdMapping};
use netcluster_protocol::channel::{self, Channel};
use netcluster_protocol::env;

use crate::settings::{Settings, WorkerKind};

/// The environment variable naming the slot a worker serves.
pub const SLOT_ENV: &str = "NETCLUSTER_SLOT";
/// The environment variable naming the generation a worker belongs to.
pub const GENERATION_ENV: &str = "NETCLUSTER_GENERATION";

/// One listener as a worker receives it, at descriptor `3 + index`.
#[derive(Debug)]
pub(crate) struct Passed {
    pub fd: OwnedFd,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
}

/// A started worker process.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub child: tokio::process::Child,
    /// The primary's end of a native worker's channel.
    pub channel: Option<Channel>,
    /// A program worker's notification socket (bound, not connected).
    pub notify: Option<(std::os::unix::net::UnixDatagram, PathBuf)>,
}

/// What a worker is started with.
#[derive(Debug)]
pub(crate) struct Spec<'a> {
    pub settings: &'a Settings,
    pub id: u32,
    pub slot: usize,
    pub generation: u64,
    pub listeners: Vec<Passed>,
    /// A private directory (0700) for notification sockets.
    pub notify_dir: PathBuf,
    /// What the worker's tree is known by ([`crate::containment::TREE_ENV`]).
    pub tree_env: Option<(String, String)>,
    /// What the worker does before it executes (parent-death signal, cgroup).
    pub child_setup: Option<netcluster_protocol::child::ChildSetup>,
}

/// Starts a worker.
///
/// # Errors
/// The error of `socketpair`, `bind`, `fork` or `exec` (a program that cannot be executed
/// exits with code 127 instead, having said why on its stderr).
pub(crate) fn spawn(spec: Spec<'_>) -> io::Result<Spawned> {
    let Spec {
        settings,
        id,
        slot,
        generation,
        listeners,
        notify_dir,
        tree_env,
        child_setup,
    } = spec;
    let n = listeners.len();
    let first = 3i32;
    let names: Vec<&str> = listeners.iter().map(|p| p.name.as_str()).collect();
    let names = names.join(":");
    let mut mappings: Vec<FdMapping> = Vec::with_capacity(n + 1);
    for (i, p) in listeners.into_iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: p.fd,
            child_fd: first + i32::try_from(i).unwrap_or(i32::MAX - first),
        });
    }
    let after_listeners = first + i32::try_from(n).unwrap_or(0);
    let mut cmd = match settings.kind {
        WorkerKind::Native => tokio::process::Command::new(&settings.exec),
        // The shim: this very executable, which executes the program in place before main.
        WorkerKind::Program => tokio::process::Command::new("/proc/self/exe"),
    };
    // What this process got from its own supervisor is not the workers'.
    for var in [
        env::LISTEN_FDS,
        env::LISTEN_FDNAMES,
        env::LISTEN_PID,
        env::NOTIFY_SOCKET,
        env::WORKER_ID,
        env::CHANNEL_FD,
        env::PRIMARY_PID,
        env::EXEC,
        env::LISTEN_PID_SELF,
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    if let (WorkerKind::Program, Some(wd)) = (settings.kind, settings.watchdog) {
        // The exec shim adds WATCHDOG_PID, the program's own pid.
        cmd.env("WATCHDOG_USEC", wd.interval.as_micros().to_string());
    }
    cmd.envs(settings.env.iter().map(|(k, v)| (k, v)))
        .env(SLOT_ENV, slot.to_string())
        .env(GENERATION_ENV, generation.to_string());
    if n > 0 {
        cmd.env(env::LISTEN_FDS, n.to_string())
            .env(env::LISTEN_FDNAMES, &names)
            .env(env::LISTEN_PID_SELF, "1");
    }
    let mut ours = None;
    let mut notify = None;
    match settings.kind {
        WorkerKind::Native => {
            let (primary_end, worker_end) = channel::seqpacket_pair()?;
            mappings.push(FdMapping {
                parent_fd: worker_end,
                child_fd: after_listeners,
            });
            ours = Some(primary_end);
            cmd.args(&settings.args)
                .env(env::WORKER_ID, id.to_string())
                .env(env::CHANNEL_FD, after_listeners.to_string())
                .env(env::PRIMARY_PID, std::process::id().to_string());
        }
        WorkerKind::Program => {
            let path = notify_dir.join(format!("w{id}.sock"));
            let _ = std::fs::remove_file(&path);
            let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
            crate::credentials::give_notify_socket(&path, settings)
                .inspect_err(|_| drop(std::fs::remove_file(&path)))?;
            sock.set_nonblocking(true)?;
            notify = Some((sock, path.clone()));
            let mut args: Vec<OsString> = vec![settings.exec.clone().into()];
            args.extend(settings.args.iter().cloned());
            cmd.args(args)
                .env(env::EXEC, "1")
                .env(env::NOTIFY_SOCKET, &path);
            if settings.prefix_output && !settings.silent {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
    }
    if settings.silent {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    if let Some(cwd) = &settings.cwd {
        cmd.current_dir(cwd);
    }
    if let Some((k, v)) = tree_env {
        cmd.env(k, v);
    }
    // Its own process group: a terminal's signals reach only the primary, and the group is
    // how the primary ends the whole tree.
    cmd.process_group(0);
    let parent_death = child_setup.as_ref().and_then(|s| s.parent_death_signal);
    let _setup = child_setup.map(|setup| netcluster_protocol::child::install(&mut cmd, setup));
    cmd.fd_mappings(mappings).map_err(io::Error::other)?;
    // Last of the pre-exec hooks: it drops the privileges the others may need.
    crate::credentials::apply(&mut cmd, settings);
    if let (Some(signal), true) = (parent_death, settings.user.is_some()) {
        // A change of credentials cleared the parent-death signal: set it again as the user.
        netcluster_protocol::child::install_parent_death(&mut cmd, signal);
    }
    let child = cmd.spawn().inspect_err(|_| {
        if let Some((_, path)) = &notify {
            let _ = std::fs::remove_file(path);
        }
    })?;
    // Dropping the command closes our copies of what the worker got, so its channel reports
    // EOF when it dies.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let channel = match ours {
        Some(fd) => Some(Channel::from_fd(fd).map_err(io::Error::other)?),
        None => None,
    };
    Ok(Spawned {
        pid,
        child,
        channel,
        notify,
    })
}
