//! `server.listen(options)`: what to listen on, and how a listen finds its socket — bound here,
//! or shared by the primary when this process is a cluster worker.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use netcluster_protocol::listening;
use netcluster_protocol::message::{
    BoundAddress, DEFAULT_BACKLOG, Grant, ListenKey, ListenParams, ListenTarget,
};

use crate::cluster;

/// Options of `server.listen(options)`, Node's `listen({port, host, path, fd, backlog,
/// exclusive, readableAll, writableAll, ipv6Only})`.
///
/// Give one of `port` (with an optional `host`), `path` or `fd`.
///
/// ```
/// use netcluster_worker::net::ListenOptions;
/// let tcp = ListenOptions::port(8124).host("127.0.0.1").backlog(128);
/// let unix = ListenOptions::path("/tmp/echo.sock");
/// let systemd = ListenOptions::fd(3);
/// # let _ = (tcp, unix, systemd);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ListenOptions {
    /// TCP port; 0 asks for a random one.
    pub port: Option<u16>,
    /// Host name or address; omitted means every interface (`::` dual-stack, else `0.0.0.0`).
    pub host: Option<String>,
    /// Unix socket path.
    pub path: Option<PathBuf>,
    /// An already open descriptor to listen on (`{fd: n}`); in a cluster worker, the
    /// primary's descriptor with this number.
    pub fd: Option<i32>,
    /// Pending-connection queue length (default 511).
    pub backlog: Option<u32>,
    /// In a cluster worker: bind in this process instead of sharing the primary's socket.
    pub exclusive: bool,
    /// Unix sockets: make the socket file readable for all users.
    pub readable_all: bool,
    /// Unix sockets: make the socket file writable for all users.
    pub writable_all: bool,
    /// TCP on `::`: IPv6 only, no dual stack.
    pub ipv6_only: bool,
    /// TCP: `SO_REUSEPORT`, so several sockets (processes) bind the same port and the kernel
    /// balances connections; in a cluster worker this binds in the worker, like `exclusive`.
    pub reuse_port: bool,
    /// Node's `signal` (an `AbortSignal`): cancelling the token closes the server.
    pub signal: Option<tokio_util::sync::CancellationToken>,
}

impl ListenOptions {
    /// Listen on a TCP port (0 for a random one) on every interface.
    pub fn port(port: u16) -> Self {
        Self {
            port: Some(port),
            ..Self::default()
        }
    }

    /// Listen on a Unix socket path.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            ..Self::default()
        }
    }

    /// Listen on an open descriptor (`{fd: n}`).
    pub fn fd(fd: i32) -> Self {
        Self {
            fd: Some(fd),
            ..Self::default()
        }
    }

    /// Sets the host.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets the backlog.
    #[must_use]
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = Some(backlog);
        self
    }

    /// Sets `exclusive`.
    #[must_use]
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }

    /// Sets `readableAll`.
    #[must_use]
    pub fn readable_all(mut self, yes: bool) -> Self {
        self.readable_all = yes;
        self
    }

    /// Sets `writableAll`.
    #[must_use]
    pub fn writable_all(mut self, yes: bool) -> Self {
        self.writable_all = yes;
        self
    }

    /// Sets `ipv6Only`.
    #[must_use]
    pub fn ipv6_only(mut self, yes: bool) -> Self {
        self.ipv6_only = yes;
        self
    }

    /// Sets `reusePort`.
    #[must_use]
    pub fn reuse_port(mut self, yes: bool) -> Self {
        self.reuse_port = yes;
        self
    }

    /// Sets `signal`: when `token` is cancelled, the server closes (as `server.close()`).
    #[must_use]
    pub fn signal(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.signal = Some(token);
        self
    }

    pub(crate) fn params(&self) -> ListenParams {
        ListenParams {
            backlog: self.backlog.unwrap_or(DEFAULT_BACKLOG),
            readable_all: self.readable_all,
            writable_all: self.writable_all,
            ipv6_only: self.ipv6_only,
            reuse_port: self.reuse_port,
        }
    }

    /// Resolves the options to a [`ListenTarget`] (looking up a host name).
    ///
    /// # Errors
    /// `InvalidInput` when the options name more than one of port, path and fd, or a host
    /// without a port, or a Unix path too long for `sun_path`; the lookup error for a host that
    /// does not resolve.
    pub async fn target(&self) -> io::Result<ListenTarget> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let given = [self.port.is_some(), self.path.is_some(), self.fd.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given > 1 {
            return Err(invalid(format!(
                "listen options: give one of port, path and fd, not several ({self:?})"
            )));
        }
        if let Some(path) = &self.path {
            listening::check_unix_path(path)?;
            return Ok(ListenTarget::Unix(path.clone()));
        }
        if let Some(fd) = self.fd {
            return Ok(ListenTarget::Fd(fd));
        }
        let port = self.port.unwrap_or(0);
        match self.host.as_deref() {
            None | Some("") => Ok(ListenTarget::TcpAny(port)),
            Some(host) => {
                if let Ok(ip) = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                {
                    return Ok(ListenTarget::Tcp(SocketAddr::new(ip, port)));
                }
                let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("listen: cannot resolve host {host:?}: {e}"),
                    )
                })?;
                addrs.next().map(ListenTarget::Tcp).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("listen: host {host:?} has no address"),
                    )
                })
            }
        }
    }
}

impl From<SocketAddr> for ListenOptions {
    fn from(addr: SocketAddr) -> Self {
        ListenOptions::port(addr.port()).host(addr.ip().to_string())
    }
}

impl From<(&str, u16)> for ListenOptions {
    fn from((host, port): (&str, u16)) -> Self {
        ListenOptions::port(port).host(host)
    }
}

impl From<u16> for ListenOptions {
    fn from(port: u16) -> Self {
        ListenOptions::port(port)
    }
}

impl From<&Path> for ListenOptions {
    fn from(path: &Path) -> Self {
        ListenOptions::path(path)
    }
}

impl From<PathBuf> for ListenOptions {
    fn from(path: PathBuf) -> Self {
        ListenOptions::path(path)
    }
}

/// Where a server's connections come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A listening socket this process accepts on (its own, or a reusePort one).
    Socket(OwnedFd),
    /// The primary's listening socket, which every worker accepts on (the `shared` policy).
    Shared(OwnedFd),
    /// The primary accepts and hands connections over on this round-robin listener.
    RoundRobin(u64, cluster::Handoffs),
}

/// A listening socket and how it was obtained.
#[derive(Debug)]
pub(crate) struct Acquired {
    pub source: Source,
    pub address: BoundAddress,
    /// Set when the primary shares this socket: the key to leave on close.
    pub shared_key: Option<ListenKey>,
    /// Set when this process created the Unix socket file and must unlink it on close.
    pub unlink: Option<PathBuf>,
    /// The cluster worker this process is, when it is one: every server of a worker stops
    /// with it, exclusive ones included.
    pub worker: Option<std::sync::Arc<cluster::Worker>>,
}

/// Obtains the listening socket for `options`: from the primary when this process is a cluster
/// worker and the listen is neither exclusive nor reusePort, bound here otherwise.
pub(crate) async fn acquire(options: &ListenOptions) -> io::Result<Acquired> {
    let target = options.target().await?;
    let params = options.params();
    let me = cluster::worker().await?;
    if !options.exclusive && !options.reuse_port {
        if let Some(worker) = &me {
            // The primary may run in another directory: a relative path means the worker's.
            let target = match target {
                ListenTarget::Unix(path) if path.is_relative() => {
                    ListenTarget::Unix(std::env::current_dir()?.join(path))
                }
                other => other,
            };
            let ordinal = match &target {
                ListenTarget::Tcp(a) if a.port() == 0 => worker.next_port0_ordinal(),
                ListenTarget::TcpAny(0) => worker.next_port0_ordinal(),
                _ => 0,
            };
            let key = ListenKey { target, ordinal };
            let granted = worker.query_listen(key.clone(), params.clone()).await?;
            let source = match (granted.grant, granted.fd, granted.handoffs) {
                (Grant::Shared, Some(fd), _) => Source::Shared(fd),
                // A reuseport slot: no other worker accepts on it (but for a moment, a
                // replacement of the same slot during a reload).
                (Grant::Slot, Some(fd), _) => Source::Socket(fd),
                (Grant::RoundRobin { listener }, _, Some(handoffs)) => {
                    Source::RoundRobin(listener, handoffs)
                }
                (Grant::ReusePort, _, _) => {
                    // The primary reserved the port; this worker joins the group on it.
                    let BoundAddress::Tcp(addr) = granted.address else {
                        worker.leave(key.clone()).await;
                        return Err(io::Error::other(format!(
                            "listen {}: the primary granted reusePort for a Unix socket",
                            key.target
                        )));
                    };
                    let params = ListenParams {
                        reuse_port: true,
                        ..params
                    };
                    match listening::bind_listener(&ListenTarget::Tcp(addr), &params) {
                        Ok((fd, _)) => Source::Socket(fd),
                        Err(e) => {
                            worker.leave(key.clone()).await;
                            return Err(e.into());
                        }
                    }
                }
                (Grant::Shared | Grant::Slot | Grant::RoundRobin { .. }, _, _) => {
                    return Err(io::Error::other(format!(
                        "listen {}: the primary's answer was incomplete",
                        key.target
                    )));
                }
            };
            return Ok(Acquired {
                source,
                address: granted.address,
                shared_key: Some(key),
                unlink: None,
                worker: me.clone(),
            });
        }
    }
    let (fd, address) = listening::bind_listener(&target, &params).map_err(io::Error::from)?;
    let unlink = match &target {
        ListenTarget::Unix(path) => Some(path.clone()),
        _ => None,
    };
    Ok(Acquired {
        source: Source::Socket(fd),
        address,
        shared_key: None,
        unlink,
        worker: me,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn targets() {
        assert_eq!(
            ListenOptions::port(0).target().await.expect("any"),
            ListenTarget::TcpAny(0)
        );
        assert_eq!(
            ListenOptions::port(80)
                .host("::1")
                .target()
                .await
                .expect("v6"),
            ListenTarget::Tcp("[::1]:80".parse().expect("addr"))
        );
        assert_eq!(
            ListenOptions::path("/tmp/s").target().await.expect("path"),
            ListenTarget::Unix("/tmp/s".into())
        );
        assert_eq!(
            ListenOptions::fd(3).target().await.expect("fd"),
            ListenTarget::Fd(3)
        );
        let both = ListenOptions {
            port: Some(1),
            path: Some("/x".into()),
            ..Default::default()
        };
        let err = both.target().await.expect_err("both");
        assert!(
            err.to_string().contains("give one of port, path and fd"),
            "{err}"
        );
        let long = ListenOptions::path(format!("/tmp/{}", "y".repeat(200)));
        assert_eq!(
            long.target().await.expect_err("long").kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[tokio::test]
    async fn localhost_resolves() {
        let t = ListenOptions::port(0)
            .host("localhost")
            .target()
            .await
            .expect("resolve");
        assert!(matches!(t, ListenTarget::Tcp(a) if a.ip().is_loopback()));
    }
}
