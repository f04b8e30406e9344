//! Starting worker processes: the descriptor layout and the environment they get.
//!
//! A native worker (a program using `netcluster::cluster`) is [`Settings::exec`] with
//! [`Settings::args`], the channel at [`env::DEFAULT_CHANNEL_FD`], and in its environment
//! [`env::WORKER_ID`], [`env::CHANNEL_FD`], [`env::PRIMARY_PID`], plus `NETCLUSTER_SLOT` and
//! `NETCLUSTER_GENERATION` for the program's own use. Nothing else of the primary's is
//! inherited: every descriptor the primary opens is close-on-exec, and the channel is mapped
//! by `command-fds`.

use std::io;
use std::process::Stdio;

use command_fds::{CommandFdExt, FdMapping};
use netcluster_protocol::channel::{self, Channel};
use netcluster_protocol::env;

use crate::settings::Settings;

/// The environment variable naming the slot a worker serves.
pub const SLOT_ENV: &str = "NETCLUSTER_SLOT";
/// The environment variable naming the generation a worker belongs to.
pub const GENERATION_ENV: &str = "NETCLUSTER_GENERATION";

/// A started worker process and the primary's end of its channel.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub child: tokio::process::Child,
    pub channel: Channel,
}

/// Starts worker `id` for `slot` of `generation`.
///
/// # Errors
/// The error of `socketpair`, `fork` or `exec`.
pub(crate) fn spawn_native(
    settings: &Settings,
    id: u32,
    slot: usize,
    generation: u64,
) -> io::Result<Spawned> {
    let (ours, theirs) = channel::seqpacket_pair()?;
    let mut cmd = tokio::process::Command::new(&settings.exec);
    cmd.args(&settings.args)
        .envs(settings.env.iter().map(|(k, v)| (k, v)))
        .env(env::WORKER_ID, id.to_string())
        .env(env::CHANNEL_FD, env::DEFAULT_CHANNEL_FD.to_string())
        .env(env::PRIMARY_PID, std::process::id().to_string())
        .env(SLOT_ENV, slot.to_string())
        .env(GENERATION_ENV, generation.to_string());
    if settings.silent {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    if let Some(cwd) = &settings.cwd {
        cmd.current_dir(cwd);
    }
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs,
        child_fd: env::DEFAULT_CHANNEL_FD,
    }])
    .map_err(io::Error::other)?;
    let child = cmd.spawn()?;
    // Dropping the command closes our copy of the worker's end of the channel, so the channel
    // reports EOF when the worker dies.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let channel = Channel::from_fd(ours).map_err(io::Error::other)?;
    Ok(Spawned {
        pid,
        child,
        channel,
    })
}
