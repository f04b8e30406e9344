//! systemd: the listeners it passes (socket activation, or its file-descriptor store), and the
//! notifications the primary sends it.
//!
//! **Intake.** `netcluster-protocol`'s pre-`main` constructor takes `LISTEN_FDS` (only when
//! `LISTEN_PID` is this process) with their `LISTEN_FDNAMES` and unsets the variables;
//! [`sockets`] hands them out and [`SystemdSocket::check`] validates each — a socket,
//! listening, of stream type, TCP or Unix — and names the descriptor and what it is when it is
//! not. A systemd listener is the
//! operator's: the primary never changes it (no socket filter at a stop, never shut down), it
//! only closes its own copy.
//!
//! **Notifications** (with `NOTIFY_SOCKET`, through the `sd-notify` crate): `READY=1` once every
//! worker is ready; `RELOADING=1` with `MONOTONIC_USEC` when a reload starts and `READY=1` when
//! it ends (`Type=notify-reload`); `STOPPING=1`; `STATUS=` with the worker count and generation;
//! `WATCHDOG=1` at half of `WATCHDOG_USEC` for as long as the supervisor's loop runs;
//! `MAINPID=` when a primary upgrade hands over; and, with the file-descriptor store enabled,
//! `FDSTORE=1` with `FDNAME=` and the listener itself, so that a primary restarted by systemd
//! gets the same sockets back and connections queue meanwhile instead of being refused.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use netcluster_protocol::listening;
use netcluster_protocol::message::BoundAddress;
use sd_notify::NotifyState;

use crate::error::Error;

/// A descriptor systemd passed (socket activation, or its file-descriptor store).
#[derive(Debug)]
pub struct SystemdSocket {
    /// The descriptor (close-on-exec).
    pub fd: OwnedFd,
    /// Its name (`FileDescriptorName=` of the socket unit, `FDNAME=` of the store; systemd's
    /// default is the socket unit's name, or `unknown`).
    pub name: String,
    /// The number it arrived as (3, 4, …), for messages.
    pub number: i32,
}

impl SystemdSocket {
    /// Checks that it is a listening TCP or Unix stream socket, bound to a path or an address
    /// (workers find it by where it is bound), and returns where.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the descriptor, its name and what it is instead.
    pub fn check(&self) -> Result<BoundAddress, Error> {
        let address = listening::check_listening(self.fd.as_fd()).map_err(|e| {
            Error::InvalidInput(format!(
                "systemd passed fd {} (named {:?}), which is {e}",
                self.number, self.name
            ))
        })?;
        if matches!(&address, BoundAddress::Unix(p) if p.as_os_str().is_empty()) {
            return Err(Error::InvalidInput(format!(
                "systemd passed fd {} (named {:?}), an abstract or unnamed Unix socket: \
                 netcluster shares sockets bound to a path or an address",
                self.number, self.name
            )));
        }
        Ok(address)
    }
}

/// The descriptors systemd passed this process, in order. The first call takes them; later
/// calls get none.
pub fn sockets() -> Vec<SystemdSocket> {
    netcluster_protocol::start::systemd_listeners()
        .into_iter()
        .map(|(fd, name)| SystemdSocket {
            number: fd.as_raw_fd(),
            fd,
            name,
        })
        .collect()
}

/// Sends notifications to systemd, when it listens (`NOTIFY_SOCKET`).
#[derive(Debug)]
pub(crate) struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier, if this process has a `NOTIFY_SOCKET`.
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os(netcluster_protocol::env::NOTIFY_SOCKET)?;
        Some(Notifier {
            watchdog: sd_notify::watchdog_enabled(),
        })
    }

    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
            .map(|d| (d / 2).max(Duration::from_millis(10)))
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("cannot notify systemd: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self, status: &str) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status(status)]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// Tells systemd that `pid` is the service's main process now (a primary upgrade).
///
/// # Errors
/// The error of sending to `NOTIFY_SOCKET`.
pub fn main_pid(pid: u32) -> io::Result<()> {
    sd_notify::notify(&[NotifyState::MainPid(pid)])
}

/// Whether systemd keeps descriptors for this service (`FDSTORE`, set by systemd ≥ 254 from
/// `FileDescriptorStoreMax=`).
pub fn fd_store_enabled() -> bool {
    std::env::var("FDSTORE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|n| n > 0)
}

/// Gives `fd` to systemd's file-descriptor store under `name` (`FDSTORE=1`, `FDNAME=`).
/// systemd keeps one copy of a socket however often it is given.
///
/// # Errors
/// The error of sending to `NOTIFY_SOCKET`; `NotFound` without one.
pub fn store(fd: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let path = std::env::var_os(netcluster_protocol::env::NOTIFY_SOCKET).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no NOTIFY_SOCKET: systemd is not listening",
        )
    })?;
    let sock = UnixDatagram::unbound()?;
    let path = std::path::PathBuf::from(path);
    match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(abstract_name) => {
            let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(abstract_name)?;
            sock.connect_addr(&addr)?;
        }
        None => sock.connect(&path)?,
    }
    let msg = format!("FDSTORE=1\nFDNAME={name}\n");
    netcluster_protocol::fd::send_with_fds(sock.as_fd(), msg.as_bytes(), &[fd])?;
    Ok(())
}
