//! The address family of Node's `net` address APIs (`'ipv4'` or `'ipv6'`), shared by
//! [`BlockList`](super::BlockList) and [`SocketAddress`](super::SocketAddress).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP address family, Node's `'ipv4'` / `'ipv6'` strings.
///
/// Parses from those strings case-insensitively, as Node does (`"IPv6"` is `ipv6`), and
/// displays as the lower-case Node string. The default is [`Family::Ipv4`], Node's default
/// everywhere a family is optional.
///
/// ```
/// use netcluster_worker::net::Family;
/// let family: Family = "IPv6".parse()?;
/// assert_eq!(family, Family::Ipv6);
/// assert_eq!(family.to_string(), "ipv6");
/// assert!("ipx".parse::<Family>().is_err());
/// # Ok::<(), netcluster_worker::net::InvalidFamily>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4, Node's `'ipv4'`.
    #[default]
    Ipv4,
    /// IPv6, Node's `'ipv6'`.
    Ipv6,
}

impl Family {
    /// The Node string: `"ipv4"` or `"ipv6"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }

    /// The family of an address.
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv6Addr};
    /// use netcluster_worker::net::Family;
    /// assert_eq!(Family::of(IpAddr::V6(Ipv6Addr::LOCALHOST)), Family::Ipv6);
    /// ```
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// The largest CIDR prefix for the family: 32 or 128.
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }

    /// The label Node's `BlockList` rules use: `"IPv4"` or `"IPv6"`.
    pub(crate) fn rule_label(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Family {
    type Err = InvalidFamily;

    /// Parses `"ipv4"` or `"ipv6"`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("ipv4") {
            Ok(Family::Ipv4)
        } else if s.eq_ignore_ascii_case("ipv6") {
            Ok(Family::Ipv6)
        } else {
            Err(InvalidFamily(s.to_owned()))
        }
    }
}

/// A family string that is neither `"ipv4"` nor `"ipv6"` (Node's `ERR_INVALID_ARG_VALUE` for
/// `family`); holds the rejected string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address family {0:?}: expected \"ipv4\" or \"ipv6\"")]
pub struct InvalidFamily(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn parses_node_family_strings_ignoring_case() {
        for (text, family) in [
            ("ipv4", Family::Ipv4),
            ("IPV4", Family::Ipv4),
            ("IPv4", Family::Ipv4),
            ("ipv6", Family::Ipv6),
            ("IpV6", Family::Ipv6),
            ("IPV6", Family::Ipv6),
        ] {
            assert_eq!(text.parse::<Family>(), Ok(family), "{text}");
        }
    }

    #[test]
    fn rejects_other_strings_naming_them() {
        for text in ["", "foo", "ipv", "ipv5", " ipv4", "ipv4 ", "inet", "4", "6"] {
            let err = text.parse::<Family>().expect_err(text);
            assert_eq!(err, InvalidFamily(text.to_owned()));
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }

    #[test]
    fn displays_node_strings_and_defaults_to_ipv4() {
        assert_eq!(Family::Ipv4.to_string(), "ipv4");
        assert_eq!(Family::Ipv6.to_string(), "ipv6");
        assert_eq!(Family::default(), Family::Ipv4);
        assert_eq!(Family::Ipv4.rule_label(), "IPv4");
        assert_eq!(Family::Ipv6.rule_label(), "IPv6");
    }

    #[test]
    fn family_of_an_address_and_prefix_limits() {
        assert_eq!(Family::of(IpAddr::V4(Ipv4Addr::LOCALHOST)), Family::Ipv4);
        assert_eq!(Family::of(IpAddr::V6(Ipv6Addr::LOCALHOST)), Family::Ipv6);
        assert_eq!(Family::Ipv4.max_prefix(), 32);
        assert_eq!(Family::Ipv6.max_prefix(), 128);
    }
}
