//! `net.connect` / `net.createConnection` / `socket.connect`: what to connect to
//! ([`ConnectOptions`]), how a host name is looked up ([`Lookup`], the `'lookup'` event as
//! [`OnLookup`]), and the connect itself.
//!
//! Node's three call shapes are the three `From` conversions into [`ConnectOptions`]:
//!
//! | Node | Rust |
//! |---|---|
//! | `net.connect({port: 8124, host})` | `net::connect(ConnectOptions::port(8124).host(host))` |
//! | `net.connect('/tmp/echo.sock')` | `net::connect(Path::new("/tmp/echo.sock"))` |
//! | `net.connect(8124, 'localhost')` | `net::connect((8124, "localhost"))`, or `net::connect(8124)` |

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use netcluster_protocol::listening::check_unix_path;
use tokio::net::{TcpSocket, UnixStream};

use super::socket::{Socket, Stream};
use super::tcp::Tcp;

/// `getaddrinfo` hint flags for [`ConnectOptions::hints`], with the values Node's
/// `dns.ADDRCONFIG`, `dns.V4MAPPED` and `dns.ALL` have on Linux.
pub mod hints {
    /// Return addresses of a family only when this host can use that family. The default
    /// resolver checks this by opening a loopback socket of the family (glibc instead looks for
    /// a configured non-loopback address).
    pub const ADDRCONFIG: i32 = 0x20;
    /// With family 6: when the name has no IPv6 address, return its IPv4 addresses as
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`).
    pub const V4MAPPED: i32 = 0x08;
    /// With [`V4MAPPED`]: return the IPv6 addresses and the mapped IPv4 addresses.
    pub const ALL: i32 = 0x10;

    pub(crate) const VALID: i32 = ADDRCONFIG | V4MAPPED | ALL;
}

type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static>>;

/// What a [`Lookup`] is asked for besides the host name: Node's `dns.lookup()` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookupOptions {
    /// 0 (any), 4 or 6: the family of addresses wanted.
    pub family: u8,
    /// `getaddrinfo` flags, a combination of the [`hints`] constants.
    pub hints: i32,
}

/// A custom host-name resolver (Node's `lookup` option): given the host name and
/// [`LookupOptions`], it returns the host's addresses, most preferred first.
///
/// The connect tries the addresses in order (skipping any of the wrong family); an `Err` fails
/// the connect with that error's kind, in a message naming the host.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use netcluster_worker::net::{ConnectOptions, Lookup};
/// let lookup = Lookup::new(|host, _options| async move {
///     match host.as_str() {
///         "db.internal" => Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
///         _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "unknown host")),
///     }
/// });
/// let options = ConnectOptions::port(5432).host("db.internal").lookup(lookup);
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct Lookup(Arc<dyn Fn(String, LookupOptions) -> LookupFuture + Send + Sync>);

impl Lookup {
    /// Wraps an async resolver function.
    pub fn new<F, Fut>(resolve: F) -> Lookup
    where
        F: Fn(String, LookupOptions) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        Lookup(Arc::new(move |host, options| {
            Box::pin(resolve(host, options))
        }))
    }

    /// The system resolver (`getaddrinfo`), Node's default `dns.lookup()`: addresses in the
    /// order the system gives them, filtered by `options.family`, with `options.hints` applied.
    ///
    /// # Errors
    /// The resolver's error (the host does not resolve), or `NotFound` when no address of the
    /// wanted family remains.
    pub async fn system(host: &str, options: LookupOptions) -> io::Result<Vec<IpAddr>> {
        let found: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
            .await?
            .map(|a| a.ip())
            .collect();
        let addresses = apply_hints(found, options);
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {} address", family_words(options.family)),
            ));
        }
        Ok(addresses)
    }

    async fn resolve(&self, host: String, options: LookupOptions) -> io::Result<Vec<IpAddr>> {
        (self.0)(host, options).await
    }
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lookup(..)")
    }
}

/// The arguments of Node's `'lookup'` event: `(err, address, family, host)`.
///
/// On success `error` is `None` and `address`/`family` name the address the connect tries
/// first; when the lookup failed, `error` is the error the connect returns and the others are
/// `None`.
#[derive(Debug)]
pub struct LookupEvent<'a> {
    /// The lookup error, if it failed.
    pub error: Option<&'a io::Error>,
    /// The address that will be connected to first.
    pub address: Option<IpAddr>,
    /// Its family: 4 or 6.
    pub family: Option<u8>,
    /// The host name that was looked up.
    pub host: &'a str,
}

/// A listener for the `'lookup'` event, called after a host name was resolved and before the
/// connect (not for IP addresses, which need no lookup, nor for Unix paths).
#[derive(Clone)]
pub struct OnLookup(Arc<dyn Fn(&LookupEvent<'_>) + Send + Sync>);

impl OnLookup {
    /// Wraps a callback.
    pub fn new<F>(callback: F) -> OnLookup
    where
        F: Fn(&LookupEvent<'_>) + Send + Sync + 'static,
    {
        OnLookup(Arc::new(callback))
    }

    fn emit(&self, event: &LookupEvent<'_>) {
        (self.0)(event);
    }
}

impl fmt::Debug for OnLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnLookup(..)")
    }
}

/// Options of `net.createConnection(options)` / `socket.connect(options)`: give a `port` (TCP,
/// with a `host` that defaults to `"localhost"`) or a `path` (Unix socket; then the TCP options
/// are ignored, as in Node).
///
/// ```
/// use std::time::Duration;
/// use netcluster_worker::net::ConnectOptions;
/// let tcp = ConnectOptions::port(8124)
///     .host("127.0.0.1")
///     .family(4)
///     .no_delay(true)
///     .keep_alive(true)
///     .keep_alive_initial_delay(Duration::from_secs(30))
///     .timeout(Duration::from_secs(10));
/// let unix = ConnectOptions::path("/tmp/echo.sock");
/// let shorthand: ConnectOptions = (8124, "example.com").into();
/// # let _ = (tcp, unix, shorthand);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// TCP port to connect to.
    pub port: Option<u16>,
    /// Host name or IP address; `None` means `"localhost"`.
    pub host: Option<String>,
    /// Unix socket path; when set, the TCP options are ignored.
    pub path: Option<PathBuf>,
    /// Local address to connect from (`localAddress`).
    pub local_address: Option<IpAddr>,
    /// Local port to connect from (`localPort`); without `local_address`, bound on the
    /// unspecified address of the target's family.
    pub local_port: Option<u16>,
    /// 0 (either), 4 or 6: which addresses of the host to use. Anything else is an error.
    pub family: u8,
    /// `getaddrinfo` hints for the lookup, a combination of the [`hints`] constants.
    pub hints: i32,
    /// A custom resolver instead of [`Lookup::system`].
    pub lookup: Option<Lookup>,
    /// The `'lookup'` event listener.
    pub on_lookup: Option<OnLookup>,
    /// Disable Nagle's algorithm once connected ([`Socket::set_no_delay`]).
    pub no_delay: bool,
    /// Enable keep-alive once connected ([`Socket::set_keep_alive`]).
    pub keep_alive: bool,
    /// The keep-alive initial delay (whole seconds are used; zero keeps the system's).
    pub keep_alive_initial_delay: Duration,
    /// An idle timeout set before connecting ([`Socket::set_timeout`]).
    pub timeout: Option<Duration>,
    /// Keep the writable side open after the peer ends ([`Socket::set_allow_half_open`]).
    pub allow_half_open: bool,
    /// Node's `signal`: cancelling the token destroys the socket ([`ConnectOptions::signal`]).
    pub signal: Option<tokio_util::sync::CancellationToken>,
}

impl ConnectOptions {
    /// Connect to a TCP port (on `"localhost"` unless [`ConnectOptions::host`] is set).
    pub fn port(port: u16) -> ConnectOptions {
        ConnectOptions {
            port: Some(port),
            ..ConnectOptions::default()
        }
    }

    /// Connect to a Unix socket path.
    pub fn path(path: impl Into<PathBuf>) -> ConnectOptions {
        ConnectOptions {
            path: Some(path.into()),
            ..ConnectOptions::default()
        }
    }

    /// Sets the host.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets `localAddress`.
    #[must_use]
    pub fn local_address(mut self, address: IpAddr) -> Self {
        self.local_address = Some(address);
        self
    }

    /// Sets `localPort`.
    #[must_use]
    pub fn local_port(mut self, port: u16) -> Self {
        self.local_port = Some(port);
        self
    }

    /// Sets `family`: 0, 4 or 6.
    #[must_use]
    pub fn family(mut self, family: u8) -> Self {
        self.family = family;
        self
    }

    /// Sets the lookup `hints`.
    #[must_use]
    pub fn hints(mut self, hints: i32) -> Self {
        self.hints = hints;
        self
    }

    /// Sets a custom resolver.
    #[must_use]
    pub fn lookup(mut self, lookup: Lookup) -> Self {
        self.lookup = Some(lookup);
        self
    }

    /// Sets the `'lookup'` event listener.
    #[must_use]
    pub fn on_lookup<F>(mut self, callback: F) -> Self
    where
        F: Fn(&LookupEvent<'_>) + Send + Sync + 'static,
    {
        self.on_lookup = Some(OnLookup::new(callback));
        self
    }

    /// Sets `noDelay`.
    #[must_use]
    pub fn no_delay(mut self, no_delay: bool) -> Self {
        self.no_delay = no_delay;
        self
    }

    /// Sets `keepAlive`.
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: bool) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Sets `keepAliveInitialDelay`.
    #[must_use]
    pub fn keep_alive_initial_delay(mut self, delay: Duration) -> Self {
        self.keep_alive_initial_delay = delay;
        self
    }

    /// Sets `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets `allowHalfOpen`.
    #[must_use]
    pub fn allow_half_open(mut self, allow: bool) -> Self {
        self.allow_half_open = allow;
        self
    }

    /// Sets `signal` (Node's `AbortSignal`): cancelling `token` destroys the socket; the read,
    /// write or connect waiting on it fails with `ConnectionAborted` ("AbortError"). A token
    /// cancelled before the connect fails the connect.
    #[must_use]
    pub fn signal(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.signal = Some(token);
        self
    }

    /// Checks the options (what Node checks synchronously) and turns them into a plan.
    pub(crate) fn plan(&self) -> io::Result<Plan> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if let Some(path) = &self.path {
            check_unix_path(path)?;
            return Ok(Plan::Unix(path.clone()));
        }
        let Some(port) = self.port else {
            return Err(invalid(
                "connect options: give a port (TCP) or a path (Unix socket)".to_owned(),
            ));
        };
        if !matches!(self.family, 0 | 4 | 6) {
            return Err(invalid(format!(
                "connect options: family must be 0, 4 or 6, not {}",
                self.family
            )));
        }
        if self.hints & !hints::VALID != 0 {
            return Err(invalid(format!(
                "connect options: invalid hints {:#x}: combine ADDRCONFIG, V4MAPPED and ALL",
                self.hints
            )));
        }
        let host = match self.host.as_deref() {
            None | Some("") => "localhost".to_owned(),
            Some(h) => h.to_owned(),
        };
        Ok(Plan::Tcp(TcpPlan {
            host,
            port,
            local_address: self.local_address,
            local_port: self.local_port,
            family: self.family,
            hints: self.hints,
            lookup: self.lookup.clone(),
            on_lookup: self.on_lookup.clone(),
        }))
    }
}

impl From<u16> for ConnectOptions {
    /// `net.connect(port)`: that port on `"localhost"`.
    fn from(port: u16) -> Self {
        ConnectOptions::port(port)
    }
}

impl From<(u16, &str)> for ConnectOptions {
    /// `net.connect(port, host)`.
    fn from((port, host): (u16, &str)) -> Self {
        ConnectOptions::port(port).host(host)
    }
}

impl From<(u16, String)> for ConnectOptions {
    /// `net.connect(port, host)`.
    fn from((port, host): (u16, String)) -> Self {
        ConnectOptions::port(port).host(host)
    }
}

impl From<(&str, u16)> for ConnectOptions {
    /// `(host, port)`, the order of Rust's `ToSocketAddrs`.
    fn from((host, port): (&str, u16)) -> Self {
        ConnectOptions::port(port).host(host)
    }
}

impl From<SocketAddr> for ConnectOptions {
    /// An IP address and port: no lookup.
    fn from(address: SocketAddr) -> Self {
        ConnectOptions::port(address.port()).host(address.ip().to_string())
    }
}

impl From<&Path> for ConnectOptions {
    /// `net.connect(path)`.
    fn from(path: &Path) -> Self {
        ConnectOptions::path(path)
    }
}

impl From<PathBuf> for ConnectOptions {
    /// `net.connect(path)`.
    fn from(path: PathBuf) -> Self {
        ConnectOptions::path(path)
    }
}

impl From<&PathBuf> for ConnectOptions {
    /// `net.connect(path)`.
    fn from(path: &PathBuf) -> Self {
        ConnectOptions::path(path.clone())
    }
}

/// `net.connect(...)`: connects a new [`Socket`]; completing is the `'connect'` (and
/// `'ready'`) event, an `Err` is the `'error'` event.
///
/// Takes any of Node's call shapes (see [`ConnectOptions`]):
///
/// ```no_run
/// use std::path::Path;
/// use netcluster_worker::net::{self, ConnectOptions};
/// use tokio::io::AsyncWriteExt;
///
/// # async fn f() -> std::io::Result<()> {
/// let mut client = net::connect(ConnectOptions::port(8124)).await?;
/// client.write_all(b"world!\r\n").await?;
/// let by_port_and_host = net::connect((8124, "localhost")).await?;
/// let by_path = net::connect(Path::new("/tmp/echo.sock")).await?;
/// # let _ = (by_port_and_host, by_path);
/// # Ok(()) }
/// ```
///
/// # Errors
/// See [`Socket::connect`].
pub async fn connect(options: impl Into<ConnectOptions>) -> io::Result<Socket> {
    Socket::connect(options).await
}

/// `net.createConnection(...)`, the same as [`connect`].
///
/// # Errors
/// See [`Socket::connect`].
pub async fn create_connection(options: impl Into<ConnectOptions>) -> io::Result<Socket> {
    Socket::connect(options).await
}

/// A connect that failed, naming the address (and the local address it was made from).
///
/// It travels inside an [`io::Error`] of the same kind; get it back with
/// `error.get_ref().and_then(|e| e.downcast_ref::<ConnectError>())`, e.g. for the OS error
/// number.
///
/// Its message already contains the OS error's, so it reports no separate
/// [`source`](std::error::Error::source): an error chain says the reason once.
#[derive(Debug)]
pub struct ConnectError {
    /// The address (`ip:port`) or Unix path the connect was for.
    pub address: String,
    /// The local address the connect was made from, when one was asked for.
    pub local_address: Option<SocketAddr>,
    /// What the OS said.
    pub source: io::Error,
}

impl std::error::Error for ConnectError {}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect {}", self.address)?;
        if let Some(local) = self.local_address {
            write!(f, " from {local}")?;
        }
        write!(f, ": {}", self.source)
    }
}

impl ConnectError {
    /// The OS error number (`ECONNREFUSED`, …), when there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// A validated connect.
#[derive(Debug)]
pub(crate) enum Plan {
    Unix(PathBuf),
    Tcp(TcpPlan),
}

#[derive(Debug)]
pub(crate) struct TcpPlan {
    host: String,
    port: u16,
    local_address: Option<IpAddr>,
    local_port: Option<u16>,
    family: u8,
    hints: i32,
    lookup: Option<Lookup>,
    on_lookup: Option<OnLookup>,
}

impl Plan {
    pub(crate) fn is_unix(&self) -> bool {
        matches!(self, Plan::Unix(_))
    }

    /// Resolves and connects.
    pub(crate) async fn establish(self) -> io::Result<Stream> {
        match self {
            Plan::Unix(path) => {
                UnixStream::connect(&path)
                    .await
                    .map(Stream::Unix)
                    .map_err(|source| {
                        ConnectError {
                            address: path.display().to_string(),
                            local_address: None,
                            source,
                        }
                        .into()
                    })
            }
            Plan::Tcp(plan) => plan
                .establish()
                .await
                .map(|s| Stream::Tcp(Tcp::registered(s))),
        }
    }
}

impl TcpPlan {
    async fn establish(self) -> io::Result<tokio::net::TcpStream> {
        let addresses = self.resolve().await?;
        let mut first_error = None;
        for ip in addresses {
            let local = self.local_for(ip);
            if let Some(local) = local {
                if local.is_ipv4() != ip.is_ipv4() {
                    continue;
                }
            }
            let remote = SocketAddr::new(ip, self.port);
            match connect_tcp(remote, local).await {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    tracing::debug!("{e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "connect {}:{}: no address of the host has the family of local address {}",
                    self.host,
                    self.port,
                    self.local_address
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                ),
            )
        }))
    }

    /// The local address to bind for a connect to `ip`, if any was asked for.
    fn local_for(&self, ip: IpAddr) -> Option<SocketAddr> {
        if self.local_address.is_none() && self.local_port.is_none() {
            return None;
        }
        let unspecified = if ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        Some(SocketAddr::new(
            self.local_address.unwrap_or(unspecified),
            self.local_port.unwrap_or(0),
        ))
    }

    /// The addresses to try: the host itself when it is an IP address (no lookup, no event),
    /// else the lookup's answer of the wanted family, announced with the `'lookup'` event.
    async fn resolve(&self) -> io::Result<Vec<IpAddr>> {
        let literal = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let options = LookupOptions {
            family: self.family,
            hints: self.hints,
        };
        let looked_up = match &self.lookup {
            Some(lookup) => lookup.resolve(self.host.clone(), options).await,
            None => Lookup::system(&self.host, options).await,
        };
        let result = looked_up
            .map(|mut found| {
                found.retain(|ip| match self.family {
                    4 => ip.is_ipv4(),
                    6 => ip.is_ipv6(),
                    _ => true,
                });
                found
            })
            .and_then(|found| {
                if found.is_empty() {
                    Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no {} address", family_words(self.family)),
                    ))
                } else {
                    Ok(found)
                }
            })
            .map_err(|e| {
                io::Error::new(e.kind(), format!("lookup of {:?} failed: {e}", self.host))
            });
        if let Some(on_lookup) = &self.on_lookup {
            let first = result
                .as_ref()
                .ok()
                .and_then(|found| found.first().copied());
            on_lookup.emit(&LookupEvent {
                error: result.as_ref().err(),
                address: first,
                family: first.map(|ip| if ip.is_ipv4() { 4 } else { 6 }),
                host: &self.host,
            });
        }
        result
    }
}

async fn connect_tcp(
    remote: SocketAddr,
    local: Option<SocketAddr>,
) -> io::Result<tokio::net::TcpStream> {
    let named = |source: io::Error| -> io::Error {
        ConnectError {
            address: remote.to_string(),
            local_address: local,
            source,
        }
        .into()
    };
    let socket = if remote.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(named)?;
    if let Some(local) = local {
        socket.bind(local).map_err(named)?;
    }
    socket.connect(remote).await.map_err(named)
}

fn family_words(family: u8) -> &'static str {
    match family {
        4 => "IPv4",
        6 => "IPv6",
        _ => "IP",
    }
}

/// Node's `dns.lookup` filtering: keep the wanted family, apply `V4MAPPED`/`ALL` and
/// `ADDRCONFIG`.
fn apply_hints(found: Vec<IpAddr>, options: LookupOptions) -> Vec<IpAddr> {
    let mapped = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        IpAddr::V6(_) => None,
    };
    let mut out: Vec<IpAddr> = match options.family {
        4 => found.iter().copied().filter(IpAddr::is_ipv4).collect(),
        6 => {
            let mut v6: Vec<IpAddr> = found.iter().copied().filter(IpAddr::is_ipv6).collect();
            let map = options.hints & hints::V4MAPPED != 0
                && (v6.is_empty() || options.hints & hints::ALL != 0);
            if map {
                v6.extend(found.iter().filter_map(mapped));
            }
            v6
        }
        _ => found,
    };
    if options.hints & hints::ADDRCONFIG != 0 {
        let v4 = family_usable(false);
        let v6 = family_usable(true);
        out.retain(|ip| if ip.is_ipv4() { v4 } else { v6 });
    }
    out
}

/// Whether this host can open sockets of the family (the `ADDRCONFIG` check).
fn family_usable(v6: bool) -> bool {
    let probe: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    std::net::UdpSocket::bind(probe).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_shapes_convert() {
        let o: ConnectOptions = 80.into();
        assert_eq!((o.port, o.host.as_deref()), (Some(80), None));
        let o: ConnectOptions = (80, "example.com").into();
        assert_eq!((o.port, o.host.as_deref()), (Some(80), Some("example.com")));
        let o: ConnectOptions = ("example.com", 81).into();
        assert_eq!((o.port, o.host.as_deref()), (Some(81), Some("example.com")));
        let o: ConnectOptions = Path::new("/tmp/s.sock").into();
        assert_eq!(o.path.as_deref(), Some(Path::new("/tmp/s.sock")));
        let o: ConnectOptions = SocketAddr::from(([127, 0, 0, 1], 9)).into();
        assert_eq!(o.host.as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn host_defaults_to_localhost_and_path_wins_over_port() {
        let Plan::Tcp(plan) = ConnectOptions::port(1).plan().expect("plan") else {
            panic!("tcp")
        };
        assert_eq!(plan.host, "localhost");
        let both = ConnectOptions {
            port: Some(1),
            path: Some("/tmp/x.sock".into()),
            ..ConnectOptions::default()
        };
        assert!(both.plan().expect("plan").is_unix());
    }

    #[test]
    fn invalid_options_are_named() {
        let err = ConnectOptions::default().plan().expect_err("nothing");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("port"), "{err}");
        let err = ConnectOptions::port(1)
            .family(5)
            .plan()
            .expect_err("family");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains("family must be 0, 4 or 6, not 5"),
            "{err}"
        );
        let err = ConnectOptions::port(1)
            .hints(0x4000)
            .plan()
            .expect_err("hints");
        assert!(err.to_string().contains("invalid hints 0x4000"), "{err}");
        let long = "x".repeat(200);
        let err = ConnectOptions::path(format!("/tmp/{long}"))
            .plan()
            .expect_err("long path");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains(&long), "{err}");
        ConnectOptions::port(1)
            .hints(hints::ADDRCONFIG | hints::V4MAPPED | hints::ALL)
            .plan()
            .expect("valid hints");
    }

    #[test]
    fn hints_filter_and_map_addresses() {
        let v4: IpAddr = "192.0.2.1".parse().expect("v4");
        let v6: IpAddr = "2001:db8::1".parse().expect("v6");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("mapped");
        let opts = |family, hints| LookupOptions { family, hints };
        assert_eq!(apply_hints(vec![v6, v4], opts(0, 0)), vec![v6, v4]);
        assert_eq!(apply_hints(vec![v6, v4], opts(4, 0)), vec![v4]);
        assert_eq!(apply_hints(vec![v6, v4], opts(6, 0)), vec![v6]);
        assert_eq!(apply_hints(vec![v4], opts(6, 0)), Vec::<IpAddr>::new());
        assert_eq!(
            apply_hints(vec![v4], opts(6, hints::V4MAPPED)),
            vec![mapped]
        );
        // V4MAPPED maps only when there is no IPv6 address, unless ALL is given too.
        assert_eq!(
            apply_hints(vec![v6, v4], opts(6, hints::V4MAPPED)),
            vec![v6]
        );
        assert_eq!(
            apply_hints(vec![v6, v4], opts(6, hints::V4MAPPED | hints::ALL)),
            vec![v6, mapped]
        );
        // This host has IPv4 loopback, so ADDRCONFIG keeps IPv4 addresses.
        assert_eq!(apply_hints(vec![v4], opts(4, hints::ADDRCONFIG)), vec![v4]);
    }

    #[tokio::test]
    async fn system_lookup_of_localhost_and_of_a_missing_family() {
        let found = Lookup::system(
            "localhost",
            LookupOptions {
                family: 4,
                hints: 0,
            },
        )
        .await
        .expect("localhost resolves");
        assert!(
            found.iter().all(|ip| ip.is_ipv4() && ip.is_loopback()),
            "{found:?}"
        );
        let err = Lookup::system(
            "127.0.0.1",
            LookupOptions {
                family: 6,
                hints: 0,
            },
        )
        .await
        .expect_err("no IPv6 address");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no IPv6 address"), "{err}");
    }
}
