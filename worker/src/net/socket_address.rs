//! Node's `net.SocketAddress`: an IP address with its family, port and IPv6 flow label, built
//! from [`SocketAddressOptions`] or parsed from `1.2.3.4:80` / `[::1]:80` text.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

use super::Family;
use super::ip::{node_ip_string, parse_ip, parse_ipv6};

/// The largest IPv6 flow label: 20 bits.
const MAX_FLOWLABEL: u32 = 0xF_FFFF;

/// The options of Node's `new net.SocketAddress([options])`.
///
/// Every field may be left at its default: `family` is `ipv4` when `None`, `address` is
/// `127.0.0.1` for `ipv4` and `::` for `ipv6` when `None`, `flowlabel` and `port` are 0. As in
/// Node, the family is not guessed from the address: `::1` needs `family: Some(Ipv6)`.
///
/// ```
/// use netcluster_worker::net::{Family, SocketAddressOptions};
///
/// let address = SocketAddressOptions::default()
///     .address("::1")
///     .family(Family::Ipv6)
///     .port(8080)
///     .flowlabel(7)
///     .build()?;
/// assert_eq!(address.to_string(), "[::1]:8080");
/// assert_eq!(address.flowlabel(), 7);
/// # Ok::<(), netcluster_worker::net::SocketAddressError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SocketAddressOptions {
    /// The IP address text, parsed in `family`; an IPv6 address may carry a zone index
    /// (`fe80::1%eth0`). `None`: `127.0.0.1` for `ipv4`, `::` for `ipv6`.
    pub address: Option<String>,
    /// The address family. `None`: `ipv4`.
    pub family: Option<Family>,
    /// The IPv6 flow label, 0 to `0xFFFFF`; must be 0 for `ipv4`.
    pub flowlabel: u32,
    /// The port.
    pub port: u16,
}

impl SocketAddressOptions {
    /// Sets the address text.
    #[must_use]
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Sets the family.
    #[must_use]
    pub fn family(mut self, family: Family) -> Self {
        self.family = Some(family);
        self
    }

    /// Sets the IPv6 flow label.
    #[must_use]
    pub fn flowlabel(mut self, flowlabel: u32) -> Self {
        self.flowlabel = flowlabel;
        self
    }

    /// Sets the port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Validates the options into a [`SocketAddress`]; the same as [`SocketAddress::new`].
    ///
    /// # Errors
    ///
    /// As [`SocketAddress::new`].
    pub fn build(self) -> Result<SocketAddress, SocketAddressError> {
        SocketAddress::new(self)
    }
}

/// Why a [`SocketAddress`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketAddressError {
    /// The address text is not an address of the family (Node's `ERR_INVALID_ADDRESS`).
    #[error("invalid {family} address {address:?}")]
    InvalidAddress {
        /// The text given.
        address: String,
        /// The family it was parsed in.
        family: Family,
    },
    /// A flow label over 20 bits. (Node aborts the process on this.)
    #[error("flow label {0:#x} is out of range: it must be 0 to 0xfffff")]
    FlowlabelOutOfRange(u32),
    /// A non-zero flow label for an IPv4 address, which has none. (Node ignores it.)
    #[error("flow label {0:#x} given for an ipv4 address: only ipv6 addresses have one")]
    FlowlabelWithoutIpv6(u32),
    /// Text for [`SocketAddress::parse`] that is not `address`, `address:port`, `[address]`
    /// or `[address]:port`.
    #[error("invalid socket address {0:?}: expected 1.2.3.4, 1.2.3.4:80, [::1] or [::1]:80")]
    InvalidSocketAddress(String),
    /// The port of text for [`SocketAddress::parse`] is not a decimal number from 0 to 65535.
    #[error("invalid port {port:?} in socket address {input:?}: expected 0 to 65535")]
    InvalidPort {
        /// The whole text given.
        input: String,
        /// Its port part.
        port: String,
    },
}

/// Node's `net.SocketAddress`: an IPv4 or IPv6 address with a port and, for IPv6, a flow
/// label (and a scope id, which Node keeps but does not show).
///
/// ```
/// use std::net::SocketAddr;
/// use netcluster_worker::net::{Family, SocketAddress, SocketAddressOptions};
///
/// let default = SocketAddress::new(SocketAddressOptions::default())?;
/// assert_eq!(default.address(), "127.0.0.1");
/// assert_eq!(default.family(), Family::Ipv4);
/// assert_eq!((default.port(), default.flowlabel()), (0, 0));
///
/// let parsed = SocketAddress::parse("[::1]:443")?;
/// assert_eq!(parsed.address(), "::1");
/// assert_eq!(parsed.family(), Family::Ipv6);
/// assert_eq!(parsed.port(), 443);
/// assert_eq!(SocketAddr::from(parsed), "[::1]:443".parse::<SocketAddr>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketAddress {
    ip: IpAddr,
    port: u16,
    flowlabel: u32,
    scope_id: u32,
}

impl SocketAddress {
    /// Node's `new net.SocketAddress(options)`.
    ///
    /// An IPv6 zone index in the address is accepted; a numeric one (`%2`) becomes the scope
    /// id, a name (`%eth0`) is dropped (scope id 0).
    ///
    /// # Errors
    ///
    /// [`SocketAddressError::InvalidAddress`] if the address is not one of the family,
    /// [`SocketAddressError::FlowlabelOutOfRange`] for a flow label over `0xFFFFF`, and
    /// [`SocketAddressError::FlowlabelWithoutIpv6`] for a non-zero flow label with `ipv4`.
    pub fn new(options: SocketAddressOptions) -> Result<Self, SocketAddressError> {
        let family = options.family.unwrap_or_default();
        let address = options.address.as_deref().unwrap_or(match family {
            Family::Ipv4 => "127.0.0.1",
            Family::Ipv6 => "::",
        });
        let (ip, zone) =
            parse_ip(address, family).ok_or_else(|| SocketAddressError::InvalidAddress {
                address: address.to_owned(),
                family,
            })?;
        Self::from_parts(ip, options.port, options.flowlabel, scope_id(zone))
    }

    /// Node 23's `SocketAddress.parse(input)`, for the plain forms: `1.2.3.4`, `1.2.3.4:80`,
    /// `[::1]`, `[::1]:80` (a zone index inside the brackets is taken as by [`new`]). No port
    /// means port 0.
    ///
    /// ```
    /// use netcluster_worker::net::{Family, SocketAddress};
    ///
    /// let v4 = SocketAddress::parse("127.0.0.1:80")?;
    /// assert_eq!((v4.address(), v4.port(), v4.family()), ("127.0.0.1".to_owned(), 80, Family::Ipv4));
    /// let v6: SocketAddress = "[1::8]".parse()?;
    /// assert_eq!((v6.address(), v6.port(), v6.family()), ("1::8".to_owned(), 0, Family::Ipv6));
    /// assert!(SocketAddress::parse("::1").is_err(), "IPv6 needs brackets");
    /// # Ok::<(), netcluster_worker::net::SocketAddressError>(())
    /// ```
    ///
    /// [`new`]: Self::new
    ///
    /// # Errors
    ///
    /// [`SocketAddressError::InvalidSocketAddress`] if the text is none of those forms or its
    /// address does not parse, [`SocketAddressError::InvalidPort`] if the port is not a decimal
    /// number from 0 to 65535.
    pub fn parse(input: &str) -> Result<Self, SocketAddressError> {
        let invalid = || SocketAddressError::InvalidSocketAddress(input.to_owned());
        let (ip, zone, port) = if let Some(rest) = input.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(invalid)?;
            let (ip, zone) = parse_ipv6(host).ok_or_else(invalid)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(invalid)?),
            };
            (IpAddr::V6(ip), zone, port)
        } else {
            let (host, port) = match input.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (input, None),
            };
            let ip: Ipv4Addr = host.parse().map_err(|_| invalid())?;
            (IpAddr::V4(ip), None, port)
        };
        let port = match port {
            None => 0,
            Some(port) => parse_port(port).ok_or_else(|| SocketAddressError::InvalidPort {
                input: input.to_owned(),
                port: port.to_owned(),
            })?,
        };
        Self::from_parts(ip, port, 0, scope_id(zone))
    }

    fn from_parts(
        ip: IpAddr,
        port: u16,
        flowlabel: u32,
        scope_id: u32,
    ) -> Result<Self, SocketAddressError> {
        match ip {
            IpAddr::V4(_) if flowlabel != 0 => {
                Err(SocketAddressError::FlowlabelWithoutIpv6(flowlabel))
            }
            IpAddr::V6(_) if flowlabel > MAX_FLOWLABEL => {
                Err(SocketAddressError::FlowlabelOutOfRange(flowlabel))
            }
            _ => Ok(Self {
                ip,
                port,
                flowlabel,
                scope_id,
            }),
        }
    }

    /// Node's `socketaddress.address`: the address as Node writes it (`127.0.0.1`, `::1`,
    /// `::ffff:1.2.3.4`).
    pub fn address(&self) -> String {
        node_ip_string(self.ip)
    }

    /// The address as a std [`IpAddr`].
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Node's `socketaddress.family`.
    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }

    /// Node's `socketaddress.flowlabel`: the IPv6 flow label, 0 for IPv4.
    pub fn flowlabel(&self) -> u32 {
        self.flowlabel
    }

    /// Node's `socketaddress.port`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The IPv6 scope id (interface index) of a link-local address, 0 when none (and for
    /// IPv4). Node keeps it internally without showing it.
    pub fn scope_id(&self) -> u32 {
        self.scope_id
    }
}

/// The scope id of a zone index: its number if it is one, else 0 (names are not looked up).
fn scope_id(zone: Option<&str>) -> u32 {
    zone.and_then(|zone| {
        if zone.bytes().all(|b| b.is_ascii_digit()) {
            zone.parse().ok()
        } else {
            None
        }
    })
    .unwrap_or(0)
}

/// A decimal port: ASCII digits only (no sign), 0 to 65535.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl Default for SocketAddress {
    /// `127.0.0.1`, port 0: Node's `new net.SocketAddress()`.
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            flowlabel: 0,
            scope_id: 0,
        }
    }
}

impl TryFrom<SocketAddressOptions> for SocketAddress {
    type Error = SocketAddressError;

    fn try_from(options: SocketAddressOptions) -> Result<Self, Self::Error> {
        Self::new(options)
    }
}

impl FromStr for SocketAddress {
    type Err = SocketAddressError;

    /// As [`SocketAddress::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SocketAddress {
    /// `1.2.3.4:80`, or `[::1]:80` for IPv6 (with `%scope` inside the brackets when the scope
    /// id is not 0), as Node's C++ `SocketAddress::ToString`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.address();
        match self.ip {
            IpAddr::V4(_) => write!(f, "{address}:{}", self.port),
            IpAddr::V6(_) if self.scope_id != 0 => {
                write!(f, "[{address}%{}]:{}", self.scope_id, self.port)
            }
            IpAddr::V6(_) => write!(f, "[{address}]:{}", self.port),
        }
    }
}

impl From<SocketAddress> for SocketAddr {
    /// The std socket address; for IPv6 the flow label becomes the flow info.
    fn from(address: SocketAddress) -> Self {
        match address.ip {
            IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, address.port)),
            IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(
                ip,
                address.port,
                address.flowlabel,
                address.scope_id,
            )),
        }
    }
}

impl TryFrom<SocketAddr> for SocketAddress {
    type Error = SocketAddressError;

    /// Takes the address, port, and for IPv6 the flow info as flow label, and the scope id.
    ///
    /// # Errors
    ///
    /// [`SocketAddressError::FlowlabelOutOfRange`] if an IPv6 flow info is over `0xFFFFF`.
    fn try_from(address: SocketAddr) -> Result<Self, Self::Error> {
        match address {
            SocketAddr::V4(v4) => Self::from_parts(IpAddr::V4(*v4.ip()), v4.port(), 0, 0),
            SocketAddr::V6(v6) => Self::from_parts(
                IpAddr::V6(*v6.ip()),
                v6.port(),
                v6.flowinfo(),
                v6.scope_id(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn options() -> SocketAddressOptions {
        SocketAddressOptions::default()
    }

    /// test-socketaddress.js: "has reasonable defaults".
    #[test]
    fn defaults_are_nodes() {
        for address in [
            SocketAddress::new(options()).expect("defaults are valid"),
            SocketAddress::default(),
            options().build().expect("defaults are valid"),
        ] {
            assert_eq!(address.address(), "127.0.0.1");
            assert_eq!(address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
            assert_eq!(address.port(), 0);
            assert_eq!(address.family(), Family::Ipv4);
            assert_eq!(address.flowlabel(), 0);
            assert_eq!(address.scope_id(), 0);
        }
        assert_eq!(
            SocketAddress::new(options()).expect("valid"),
            SocketAddress::default()
        );
    }

    /// test-socketaddress.js: "interprets simple ipv4 correctly", "sets the port correctly".
    #[test]
    fn ipv4_with_port() {
        let address = options().address("123.123.123.123").build().expect("valid");
        assert_eq!(address.address(), "123.123.123.123");
        assert_eq!(address.port(), 0);
        assert_eq!(address.family(), Family::Ipv4);
        assert_eq!(address.flowlabel(), 0);

        let address = options()
            .address("123.123.123.123")
            .port(80)
            .build()
            .expect("valid");
        assert_eq!(address.port(), 80);
        assert_eq!(address.to_string(), "123.123.123.123:80");

        let address = options().port(65535).build().expect("valid");
        assert_eq!(address.port(), 65535);
    }

    /// test-socketaddress.js: "interprets simple ipv6 correctly", "uses the flowlabel
    /// correctly".
    #[test]
    fn ipv6_defaults_and_flowlabel() {
        let address = options().family(Family::Ipv6).build().expect("valid");
        assert_eq!(address.address(), "::");
        assert_eq!(address.port(), 0);
        assert_eq!(address.family(), Family::Ipv6);
        assert_eq!(address.flowlabel(), 0);

        let address = options()
            .family(Family::Ipv6)
            .flowlabel(1)
            .build()
            .expect("valid");
        assert_eq!(address.address(), "::");
        assert_eq!(address.flowlabel(), 1);

        let address = options()
            .family(Family::Ipv6)
            .flowlabel(0xF_FFFF)
            .build()
            .expect("largest flow label");
        assert_eq!(address.flowlabel(), 0xF_FFFF);
    }

    #[test]
    fn ipv6_address_text_is_nodes() {
        for (input, expected) in [
            ("::FFFF:1.2.3.4", "::ffff:1.2.3.4"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("::ffff:0:0", "::ffff:0.0.0.0"),
            ("::0:102:304", "::1.2.3.4"),
            ("1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:102:304"),
            ("fe80::1%eth0", "fe80::1"),
        ] {
            let address = options()
                .family(Family::Ipv6)
                .address(input)
                .build()
                .expect(input);
            assert_eq!(address.address(), expected, "{input}");
        }
    }

    #[test]
    fn zone_index_sets_a_numeric_scope_id() {
        let address = options()
            .family(Family::Ipv6)
            .address("fe80::1%3")
            .port(9)
            .build()
            .expect("numeric zone");
        assert_eq!(address.scope_id(), 3);
        assert_eq!(address.address(), "fe80::1");
        assert_eq!(address.to_string(), "[fe80::1%3]:9");
        assert_eq!(
            SocketAddr::from(address),
            "[fe80::1%3]:9"
                .parse::<SocketAddr>()
                .expect("std parses it")
        );

        let named = options()
            .family(Family::Ipv6)
            .address("fe80::1%eth0")
            .build()
            .expect("named zone");
        assert_eq!(named.scope_id(), 0);
        assert_eq!(named.to_string(), "[fe80::1]:0");

        let huge = options()
            .family(Family::Ipv6)
            .address("fe80::1%99999999999")
            .build()
            .expect("zone too big for a scope id");
        assert_eq!(huge.scope_id(), 0);
    }

    /// test-socketaddress.js: "validates input correctly", for what Rust's types leave open.
    #[test]
    fn invalid_addresses_name_address_and_family() {
        for (text, family) in [
            ("1.2.3", Family::Ipv4),
            ("01.2.3.4", Family::Ipv4),
            ("", Family::Ipv4),
            ("::1", Family::Ipv4),
            ("localhost", Family::Ipv4),
            ("1.2.3.4", Family::Ipv6),
            ("[::1]", Family::Ipv6),
            ("fe80::1%", Family::Ipv6),
            ("", Family::Ipv6),
        ] {
            let err = options()
                .address(text)
                .family(family)
                .build()
                .expect_err(text);
            assert_eq!(
                err,
                SocketAddressError::InvalidAddress {
                    address: text.to_owned(),
                    family,
                }
            );
            let message = err.to_string();
            assert!(message.contains(&format!("{text:?}")), "{message}");
            assert!(message.contains(family.as_str()), "{message}");
        }
        // Without a family, the address is read as IPv4, as in Node.
        assert!(matches!(
            options().address("::1").build(),
            Err(SocketAddressError::InvalidAddress {
                family: Family::Ipv4,
                ..
            })
        ));
    }

    #[test]
    fn flowlabel_errors() {
        let err = options()
            .family(Family::Ipv6)
            .flowlabel(0x10_0000)
            .build()
            .expect_err("21 bits");
        assert_eq!(err, SocketAddressError::FlowlabelOutOfRange(0x10_0000));
        assert!(err.to_string().contains("0x100000"), "{err}");
        assert_eq!(
            options().family(Family::Ipv6).flowlabel(u32::MAX).build(),
            Err(SocketAddressError::FlowlabelOutOfRange(u32::MAX))
        );

        let err = options().flowlabel(5).build().expect_err("ipv4");
        assert_eq!(err, SocketAddressError::FlowlabelWithoutIpv6(5));
        assert!(err.to_string().contains("ipv4"), "{err}");
    }

    #[test]
    fn try_from_options() {
        let address = SocketAddress::try_from(options().port(1)).expect("valid");
        assert_eq!(address.port(), 1);
        assert!(SocketAddress::try_from(options().address("x")).is_err());
    }

    /// The plain-form cases of Node 23's test-socketaddress.js "SocketAddress.parse()".
    #[test]
    fn parse_plain_forms() {
        for (input, address, port, family) in [
            ("1.2.3.4", "1.2.3.4", 0, Family::Ipv4),
            ("[1:0::]", "1::", 0, Family::Ipv6),
            ("[1::8]:123", "1::8", 123, Family::Ipv6),
            ("127.0.0.1:80", "127.0.0.1", 80, Family::Ipv4),
            ("127.0.0.1:443", "127.0.0.1", 443, Family::Ipv4),
            ("[::1]:80", "::1", 80, Family::Ipv6),
            ("[::1]:443", "::1", 443, Family::Ipv6),
            ("[::ffff:1.2.3.4]:1", "::ffff:1.2.3.4", 1, Family::Ipv6),
            ("0.0.0.0:65535", "0.0.0.0", 65535, Family::Ipv4),
            ("1.2.3.4:080", "1.2.3.4", 80, Family::Ipv4),
        ] {
            let parsed = SocketAddress::parse(input).expect(input);
            assert_eq!(parsed.address(), address, "{input}");
            assert_eq!(parsed.port(), port, "{input}");
            assert_eq!(parsed.family(), family, "{input}");
            assert_eq!(parsed.flowlabel(), 0, "{input}");
            assert_eq!(
                input.parse::<SocketAddress>(),
                Ok(parsed),
                "FromStr {input}"
            );
        }
        let zoned = SocketAddress::parse("[fe80::1%4]:22").expect("zone in brackets");
        assert_eq!((zoned.address().as_str(), zoned.scope_id()), ("fe80::1", 4));
    }

    /// Node 23's bad cases, plus forms outside the plain ones.
    #[test]
    fn parse_rejects_other_text() {
        for input in [
            "not an ip",
            "abc.123",
            "259.1.1.1",
            "12:12:12",
            "",
            "::1",
            "[::1",
            "::1]:80",
            "[1.2.3.4]:80",
            "[::1]80",
            "[::1]x",
            "01.2.3.4:80",
            "localhost:80",
            "user:80@1.2.3.4",
            "256",
            "0xffffffff",
            " 1.2.3.4",
        ] {
            assert_eq!(
                SocketAddress::parse(input),
                Err(SocketAddressError::InvalidSocketAddress(input.to_owned())),
                "{input}"
            );
        }
        let message = SocketAddress::parse("nope").expect_err("nope").to_string();
        assert!(message.contains("\"nope\""), "{message}");
    }

    #[test]
    fn parse_rejects_bad_ports() {
        for (input, port) in [
            ("1.2.3.4:", ""),
            ("1.2.3.4:65536", "65536"),
            ("1.2.3.4:-1", "-1"),
            ("1.2.3.4:+80", "+80"),
            ("1.2.3.4:8o", "8o"),
            ("[::1]:", ""),
            ("[::1]:99999999999999999999", "99999999999999999999"),
            ("[::1]: 80", " 80"),
            ("[::1]:80:80", "80:80"),
            ("1.2.3.4:80:80", "80:80"),
        ] {
            let err = SocketAddress::parse(input).expect_err(input);
            assert_eq!(
                err,
                SocketAddressError::InvalidPort {
                    input: input.to_owned(),
                    port: port.to_owned(),
                },
                "{input}"
            );
            assert!(err.to_string().contains(&format!("{port:?}")), "{err}");
        }
    }

    #[test]
    fn display_and_parse_round_trip() {
        for text in [
            "1.2.3.4:80",
            "[::1]:443",
            "[::ffff:1.2.3.4]:0",
            "[fe80::1%7]:22",
            "[::1.2.3.4]:5",
        ] {
            let parsed = SocketAddress::parse(text).expect(text);
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn converts_to_and_from_std() {
        let v4 = SocketAddress::parse("10.0.0.1:8080").expect("valid");
        let std_v4 = SocketAddr::from(v4);
        assert_eq!(
            std_v4,
            "10.0.0.1:8080".parse::<SocketAddr>().expect("literal")
        );
        assert_eq!(SocketAddress::try_from(std_v4), Ok(v4));

        let v6 = options()
            .family(Family::Ipv6)
            .address("fe80::1%2")
            .port(443)
            .flowlabel(0xABCDE)
            .build()
            .expect("valid");
        let SocketAddr::V6(std_v6) = SocketAddr::from(v6) else {
            panic!("an IPv6 SocketAddress converts to SocketAddr::V6");
        };
        assert_eq!(
            *std_v6.ip(),
            "fe80::1".parse::<Ipv6Addr>().expect("literal")
        );
        assert_eq!(std_v6.port(), 443);
        assert_eq!(std_v6.flowinfo(), 0xABCDE);
        assert_eq!(std_v6.scope_id(), 2);
        assert_eq!(SocketAddress::try_from(SocketAddr::V6(std_v6)), Ok(v6));
    }

    #[test]
    fn try_from_std_rejects_wide_flowinfo() {
        let std_v6 = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0x10_0000, 0);
        assert_eq!(
            SocketAddress::try_from(SocketAddr::V6(std_v6)),
            Err(SocketAddressError::FlowlabelOutOfRange(0x10_0000))
        );
    }
}
