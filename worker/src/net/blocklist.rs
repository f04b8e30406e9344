//! Node's `net.BlockList`: rules (single addresses, ranges, subnets) for refusing IP
//! addresses, and [`AddressInput`], the address forms its methods take.

use std::cmp::Ordering;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ip::{node_ip_string, parse_ip};
use super::{Family, InvalidFamily, SocketAddress};

/// An address given to a [`BlockList`] method: text to parse in the method's family, or an
/// address that already has one (Node's `string | net.SocketAddress`).
///
/// Made with `.into()` from `&str`, `&String`, [`IpAddr`], [`Ipv4Addr`], [`Ipv6Addr`] or
/// [`SocketAddress`]. As in Node, the family argument of a method only applies to text; an
/// address that is already parsed keeps its own family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressInput<'a> {
    /// Text, parsed in the family passed with it (an IPv6 zone index is accepted and ignored).
    Text(&'a str),
    /// An address of a known family.
    Ip(IpAddr),
}

impl<'a> From<&'a str> for AddressInput<'a> {
    fn from(text: &'a str) -> Self {
        AddressInput::Text(text)
    }
}

impl<'a> From<&'a String> for AddressInput<'a> {
    fn from(text: &'a String) -> Self {
        AddressInput::Text(text)
    }
}

impl From<IpAddr> for AddressInput<'_> {
    fn from(ip: IpAddr) -> Self {
        AddressInput::Ip(ip)
    }
}

impl From<Ipv4Addr> for AddressInput<'_> {
    fn from(ip: Ipv4Addr) -> Self {
        AddressInput::Ip(IpAddr::V4(ip))
    }
}

impl From<Ipv6Addr> for AddressInput<'_> {
    fn from(ip: Ipv6Addr) -> Self {
        AddressInput::Ip(IpAddr::V6(ip))
    }
}

impl From<SocketAddress> for AddressInput<'_> {
    fn from(address: SocketAddress) -> Self {
        AddressInput::Ip(address.ip())
    }
}

impl From<&SocketAddress> for AddressInput<'_> {
    fn from(address: &SocketAddress) -> Self {
        AddressInput::Ip(address.ip())
    }
}

impl AddressInput<'_> {
    /// The address, parsing text in `family`.
    fn resolve(self, family: Family) -> Result<IpAddr, BlockListError> {
        match self {
            AddressInput::Ip(ip) => Ok(ip),
            AddressInput::Text(text) => {
                parse_ip(text, family).map(|(ip, _zone)| ip).ok_or_else(|| {
                    BlockListError::InvalidAddress {
                        address: text.to_owned(),
                        family,
                    }
                })
            }
        }
    }
}

/// Why a [`BlockList`] refused a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockListError {
    /// The text is not an address of the family it was given with (Node's
    /// `ERR_INVALID_ADDRESS`).
    #[error("invalid {family} address {address:?}")]
    InvalidAddress {
        /// The text given.
        address: String,
        /// The family it was parsed in.
        family: Family,
    },
    /// A family string that is neither `"ipv4"` nor `"ipv6"` (Node's `ERR_INVALID_ARG_VALUE`);
    /// produced when a [`InvalidFamily`] from parsing a [`Family`] is converted with `?`.
    #[error(transparent)]
    InvalidFamily(#[from] InvalidFamily),
    /// A subnet prefix longer than the network's family allows (Node's `ERR_OUT_OF_RANGE`).
    #[error("subnet prefix {prefix} is out of range for {family}: it must be 0 to {max}")]
    PrefixOutOfRange {
        /// The prefix given.
        prefix: u8,
        /// The network address's family.
        family: Family,
        /// The largest prefix for that family (32 or 128).
        max: u8,
    },
    /// A range whose start comes after its end (Node's `ERR_INVALID_ARG_VALUE`, "must come
    /// before end").
    #[error("range start {start} must come before end {end}")]
    RangeStartAfterEnd {
        /// The range's start.
        start: IpAddr,
        /// The range's end.
        end: IpAddr,
    },
    /// A range from an IPv4 address to an IPv6 address that is not IPv4-mapped (or the
    /// reverse): no address lies between them. Node accepts such a range as a rule that never
    /// matches; this refuses it.
    #[error(
        "range start {start} and end {end} cannot be compared: an IPv4 address only orders against IPv4-mapped IPv6 addresses"
    )]
    RangeNotComparable {
        /// The range's start.
        start: IpAddr,
        /// The range's end.
        end: IpAddr,
    },
}

/// One rule, as Node's C++ `SocketAddressBlockList` keeps it: the addresses as given, so that
/// [`BlockList::rules`] shows them in their own family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Address(IpAddr),
    Range { start: IpAddr, end: IpAddr },
    Subnet { network: IpAddr, prefix: u8 },
}

impl Rule {
    fn matches(&self, ip: IpAddr) -> bool {
        match *self {
            Rule::Address(address) => widen(address) == widen(ip),
            Rule::Range { start, end } => matches!(
                (compare(ip, start), compare(ip, end)),
                (
                    Some(Ordering::Greater | Ordering::Equal),
                    Some(Ordering::Less | Ordering::Equal)
                )
            ),
            Rule::Subnet { network, prefix } => match network {
                IpAddr::V4(network) => ipv4_view(ip).is_some_and(|ip| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    u32::from(ip) & mask == u32::from(network) & mask
                }),
                IpAddr::V6(network) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                    widen(ip) & mask == u128::from(network) & mask
                }
            },
        }
    }

    /// Node's rule text, `Address: IPv4 1.2.3.4` and so on.
    fn describe(&self) -> String {
        match *self {
            Rule::Address(address) => format!(
                "Address: {} {}",
                Family::of(address).rule_label(),
                node_ip_string(address)
            ),
            Rule::Range { start, end } => format!(
                "Range: {} {}-{}",
                Family::of(start).rule_label(),
                node_ip_string(start),
                node_ip_string(end)
            ),
            Rule::Subnet { network, prefix } => format!(
                "Subnet: {} {}/{prefix}",
                Family::of(network).rule_label(),
                node_ip_string(network)
            ),
        }
    }
}

/// The address as 128 bits, an IPv4 address as its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`).
fn widen(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address as IPv4, if it is IPv4 or IPv4-mapped IPv6.
fn ipv4_view(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// Node's `SocketAddress::compare`: numeric order within a family; across families an IPv4
/// address orders against an IPv4-mapped IPv6 address by its IPv4 part, and against any other
/// IPv6 address not at all.
fn compare(a: IpAddr, b: IpAddr) -> Option<Ordering> {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Some(a.cmp(&b)),
        (IpAddr::V6(a), IpAddr::V6(b)) => Some(a.cmp(&b)),
        (IpAddr::V4(v4), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(|m| v4.cmp(&m)),
        (IpAddr::V6(v6), IpAddr::V4(v4)) => v6.to_ipv4_mapped().map(|m| m.cmp(&v4)),
    }
}

/// Node's `net.BlockList`: rules to refuse IP addresses, address ranges and subnets.
///
/// An IPv4 rule also matches the IPv4-mapped IPv6 form of its addresses (`::ffff:1.2.3.4`),
/// and an IPv6 rule over IPv4-mapped addresses matches the plain IPv4 ones, as in Node.
///
/// ```
/// use netcluster_worker::net::{BlockList, Family};
///
/// let mut list = BlockList::new();
/// list.add_address("123.123.123.123", Family::Ipv4)?;
/// list.add_range("10.0.0.1", "10.0.0.10", Family::Ipv4)?;
/// list.add_subnet("8592:757c:efae:4e45::", 64, Family::Ipv6)?;
///
/// assert!(list.check("123.123.123.123", Family::Ipv4));
/// assert!(list.check("10.0.0.3", Family::Ipv4));
/// assert!(!list.check("222.111.111.222", Family::Ipv4));
/// // IPv6 notation for IPv4 addresses works:
/// assert!(list.check("::ffff:7b7b:7b7b", Family::Ipv6));
/// assert!(list.check("::ffff:123.123.123.123", Family::Ipv6));
///
/// assert_eq!(
///     list.rules(),
///     [
///         "Subnet: IPv6 8592:757c:efae:4e45::/64",
///         "Range: IPv4 10.0.0.1-10.0.0.10",
///         "Address: IPv4 123.123.123.123",
///     ]
/// );
/// # Ok::<(), netcluster_worker::net::BlockListError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockList {
    /// Oldest first.
    rules: Vec<Rule>,
}

impl BlockList {
    /// An empty list, Node's `new net.BlockList()`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Node's `blockList.addAddress(address[, type])`: blocks one address.
    ///
    /// Text is parsed as `family`; an [`IpAddr`] or [`SocketAddress`] keeps its own family.
    /// Adding an address twice adds two rules, as in Node v19.
    ///
    /// # Errors
    ///
    /// [`BlockListError::InvalidAddress`] if the text is not a `family` address.
    pub fn add_address<'a>(
        &mut self,
        address: impl Into<AddressInput<'a>>,
        family: Family,
    ) -> Result<(), BlockListError> {
        let address = address.into().resolve(family)?;
        self.rules.push(Rule::Address(address));
        Ok(())
    }

    /// Node's `blockList.addRange(start, end[, type])`: blocks every address from `start` to
    /// `end`, both included.
    ///
    /// ```
    /// use netcluster_worker::net::{BlockList, BlockListError, Family};
    ///
    /// let mut list = BlockList::new();
    /// list.add_range("::1", "::f", Family::Ipv6)?;
    /// assert!(list.check("::a", Family::Ipv6));
    /// assert!(!list.check("::10", Family::Ipv6));
    ///
    /// assert!(matches!(
    ///     list.add_range("1.1.1.2", "1.1.1.1", Family::Ipv4),
    ///     Err(BlockListError::RangeStartAfterEnd { .. })
    /// ));
    /// # Ok::<(), BlockListError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`BlockListError::InvalidAddress`] if either text is not a `family` address,
    /// [`BlockListError::RangeStartAfterEnd`] if `start` comes after `end`, and
    /// [`BlockListError::RangeNotComparable`] for an IPv4 bound with an IPv6 bound that is
    /// not IPv4-mapped.
    pub fn add_range<'a, 'b>(
        &mut self,
        start: impl Into<AddressInput<'a>>,
        end: impl Into<AddressInput<'b>>,
        family: Family,
    ) -> Result<(), BlockListError> {
        let start = start.into().resolve(family)?;
        let end = end.into().resolve(family)?;
        match compare(start, end) {
            Some(Ordering::Greater) => Err(BlockListError::RangeStartAfterEnd { start, end }),
            None => Err(BlockListError::RangeNotComparable { start, end }),
            Some(Ordering::Less | Ordering::Equal) => {
                self.rules.push(Rule::Range { start, end });
                Ok(())
            }
        }
    }

    /// Node's `blockList.addSubnet(net, prefix[, type])`: blocks the addresses whose first
    /// `prefix` bits are those of `network`.
    ///
    /// The prefix's limit (32 or 128) is that of the network address's family. The network
    /// address is kept as given, host bits included, and shown so by [`rules`](Self::rules).
    ///
    /// # Errors
    ///
    /// [`BlockListError::InvalidAddress`] if the text is not a `family` address, and
    /// [`BlockListError::PrefixOutOfRange`] if `prefix` is over the limit.
    pub fn add_subnet<'a>(
        &mut self,
        network: impl Into<AddressInput<'a>>,
        prefix: u8,
        family: Family,
    ) -> Result<(), BlockListError> {
        let network = network.into().resolve(family)?;
        let family = Family::of(network);
        let max = family.max_prefix();
        if prefix > max {
            return Err(BlockListError::PrefixOutOfRange {
                prefix,
                family,
                max,
            });
        }
        self.rules.push(Rule::Subnet { network, prefix });
        Ok(())
    }

    /// Node's `blockList.check(address[, type])`: whether any rule matches the address.
    ///
    /// Text that is not a `family` address matches nothing (`false`), as in Node.
    pub fn check<'a>(&self, address: impl Into<AddressInput<'a>>, family: Family) -> bool {
        match address.into().resolve(family) {
            Ok(ip) => self.rules.iter().any(|rule| rule.matches(ip)),
            Err(_) => false,
        }
    }

    /// Node's `blockList.rules`: each rule as text, newest first — `Address: IPv4 1.2.3.4`,
    /// `Range: IPv4 10.0.0.1-10.0.0.10`, `Subnet: IPv6 8592:757c:efae:4e45::/64`.
    ///
    /// The family shown is that of the (start or network) address; addresses are written as
    /// Node writes them.
    pub fn rules(&self) -> Vec<String> {
        self.rules.iter().rev().map(Rule::describe).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::SocketAddressOptions;

    const V4: Family = Family::Ipv4;
    const V6: Family = Family::Ipv6;

    fn sa(address: &str, family: Family) -> SocketAddress {
        SocketAddress::new(SocketAddressOptions {
            address: Some(address.to_owned()),
            family: Some(family),
            ..SocketAddressOptions::default()
        })
        .expect("test socket address is valid")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address literal is valid")
    }

    #[test]
    fn new_list_is_empty_and_matches_nothing() {
        let list = BlockList::new();
        assert!(list.rules().is_empty());
        assert!(!list.check("1.1.1.1", V4));
        assert!(!list.check("::", V6));
        assert_eq!(list, BlockList::default());
    }

    /// test-blocklist.js: addresses, with IPv4-mapped IPv6 both ways.
    #[test]
    fn addresses_match_across_ipv4_mapping() {
        let mut list = BlockList::new();
        list.add_address("1.1.1.1", V4).expect("add");
        list.add_address("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V6)
            .expect("add");
        list.add_address("::ffff:1.1.1.2", V6).expect("add");

        assert!(list.check("1.1.1.1", V4));
        assert!(!list.check("1.1.1.1", V6), "not IPv6 text");
        assert!(!list.check("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V4));
        assert!(list.check("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V6));
        assert!(list.check("::ffff:1.1.1.1", V6));
        assert!(list.check("::ffff:101:101", V6));
        assert!(list.check("1.1.1.2", V4), "IPv6 mapped rule matches IPv4");
        assert!(!list.check("1.2.3.4", V4));
        assert!(!list.check("::1", V6));
        // IPv4-compatible (not mapped) addresses are different addresses.
        assert!(!list.check("::1.1.1.1", V6));
    }

    /// test-blocklist.js: the same with `SocketAddress` arguments.
    #[test]
    fn socket_addresses_and_ips_keep_their_own_family() {
        let mut list = BlockList::new();
        let sa1 = sa("1.1.1.1", V4);
        let sa2 = sa("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V6);
        let sa3 = sa("1.1.1.2", V4);
        list.add_address(sa1, V6).expect("family ignored");
        list.add_address(AddressInput::from(&sa2), V4)
            .expect("family ignored");
        list.add_address("::ffff:1.1.1.2", V6).expect("add");

        assert!(list.check("1.1.1.1", V4));
        assert!(list.check(sa1, V6));
        assert!(!list.check("1.1.1.1", V6));
        assert!(!list.check("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V4));
        assert!(list.check("8592:757c:efae:4e45:fb5d:d62a:0d00:8e17", V6));
        assert!(list.check(AddressInput::from(&sa2), V4));
        assert!(list.check("::ffff:1.1.1.1", V6));
        assert!(list.check(sa3, V4));
        assert!(list.check(Ipv4Addr::new(1, 1, 1, 2), V6));
        assert!(list.check(Ipv4Addr::new(1, 1, 1, 2).to_ipv6_mapped(), V4));
        assert!(!list.check(ip("1.2.3.4"), V4));
        assert!(!list.check(Ipv6Addr::LOCALHOST, V6));
        assert_eq!(
            list.rules(),
            [
                "Address: IPv6 ::ffff:1.1.1.2",
                "Address: IPv6 8592:757c:efae:4e45:fb5d:d62a:d00:8e17",
                "Address: IPv4 1.1.1.1",
            ]
        );
    }

    #[test]
    fn string_inputs_of_every_kind() {
        let mut list = BlockList::new();
        let owned = String::from("9.9.9.9");
        list.add_address(&owned, V4).expect("&String");
        list.add_address(ip("::2"), V4).expect("IpAddr");
        assert!(list.check(&owned, V4));
        assert!(list.check(owned.as_str(), V4));
        assert!(list.check("::2", V6));
    }

    #[test]
    fn zone_index_is_accepted_and_ignored() {
        let mut list = BlockList::new();
        list.add_address("fe80::1%eth0", V6).expect("zoned address");
        assert!(list.check("fe80::1", V6));
        assert!(list.check("fe80::1%lo", V6));
        assert!(list.check("fe80::1%2", V6));
        assert_eq!(list.rules(), ["Address: IPv6 fe80::1"]);
    }

    /// Node v19 keeps one rule per call; later versions drop duplicates.
    #[test]
    fn duplicate_rules_are_kept() {
        let mut list = BlockList::new();
        list.add_address("1.1.1.1", V4).expect("add");
        list.add_address("1.1.1.1", V4).expect("add");
        assert_eq!(
            list.rules(),
            ["Address: IPv4 1.1.1.1", "Address: IPv4 1.1.1.1"]
        );
    }

    /// test-blocklist.js: ranges, from text and from `SocketAddress`.
    #[test]
    fn ranges_include_both_ends() {
        let mut from_text = BlockList::new();
        from_text.add_range("1.1.1.1", "1.1.1.10", V4).expect("add");
        from_text.add_range("::1", "::f", V6).expect("add");

        let mut from_sa = BlockList::new();
        from_sa
            .add_range(sa("1.1.1.1", V4), sa("1.1.1.10", V4), V4)
            .expect("add");
        from_sa
            .add_range(sa("::1", V6), sa("::f", V6), V4)
            .expect("family ignored");

        for list in [&from_text, &from_sa] {
            assert!(!list.check("1.1.1.0", V4));
            for n in 1..=10 {
                assert!(list.check(format!("1.1.1.{n}").as_str(), V4), "1.1.1.{n}");
            }
            assert!(!list.check("1.1.1.11", V4));

            assert!(!list.check("::0", V6));
            for n in 0x1..=0xf {
                assert!(list.check(format!("::{n:x}").as_str(), V6), "::{n:x}");
            }
            assert!(!list.check("::10", V6));
        }
        assert_eq!(from_text.rules(), from_sa.rules());
        assert_eq!(
            from_text.rules(),
            ["Range: IPv6 ::1-::f", "Range: IPv4 1.1.1.1-1.1.1.10"]
        );
    }

    /// Regression test of nodejs/node#39074 in test-blocklist.js: ranges compare whole
    /// addresses, not their last byte.
    #[test]
    fn ranges_compare_numerically() {
        let mut list = BlockList::new();
        list.add_range("10.0.0.2", "10.0.0.10", V4).expect("add");

        assert!(list.check("10.0.0.2", V4));
        assert!(list.check("10.0.0.10", V4));
        assert!(!list.check("192.168.0.3", V4));
        assert!(!list.check("2.2.2.2", V4));
        assert!(!list.check("255.255.255.255", V4));

        assert!(list.check("::ffff:0a00:0002", V6));
        assert!(list.check("::ffff:0a00:000a", V6));
        assert!(!list.check("::ffff:c0a8:0003", V6));
        assert!(!list.check("::ffff:0202:0202", V6));
        assert!(!list.check("::ffff:ffff:ffff", V6));
    }

    #[test]
    fn ipv6_ranges_over_mapped_addresses_match_ipv4() {
        let mut list = BlockList::new();
        list.add_range("::ffff:1.0.0.0", "::ffff:1.0.0.9", V6)
            .expect("add");
        assert!(list.check("1.0.0.5", V4));
        assert!(!list.check("1.0.0.10", V4));

        // An IPv6 range of non-mapped addresses never holds an IPv4 address.
        let mut list = BlockList::new();
        list.add_range("::1", "::f", V6).expect("add");
        assert!(!list.check("0.0.0.5", V4));
        assert!(!list.check("::ffff:0.0.0.5", V6));
    }

    /// A range from an IPv4 address to an IPv4-mapped one is valid, as in Node (checked with
    /// Node v20: `'Range: IPv4 1.0.0.0-::ffff:2.0.0.0'`).
    #[test]
    fn mixed_family_range_over_mapped_addresses() {
        let mut list = BlockList::new();
        list.add_range(ip("1.0.0.0"), ip("::ffff:2.0.0.0"), V4)
            .expect("comparable bounds");
        assert!(list.check("1.5.0.0", V4));
        assert!(list.check("::ffff:1.5.0.0", V6));
        assert!(!list.check("2.0.0.1", V4));
        assert_eq!(list.rules(), ["Range: IPv4 1.0.0.0-::ffff:2.0.0.0"]);
    }

    #[test]
    fn single_address_range() {
        let mut list = BlockList::new();
        list.add_range("1.1.1.1", "1.1.1.1", V4)
            .expect("start == end");
        assert!(list.check("1.1.1.1", V4));
        assert!(!list.check("1.1.1.2", V4));
    }

    #[test]
    fn range_errors() {
        let mut list = BlockList::new();
        assert_eq!(
            list.add_range("1.1.1.2", "1.1.1.1", V4),
            Err(BlockListError::RangeStartAfterEnd {
                start: ip("1.1.1.2"),
                end: ip("1.1.1.1"),
            })
        );
        assert_eq!(
            list.add_range("::2", "::1", V6),
            Err(BlockListError::RangeStartAfterEnd {
                start: ip("::2"),
                end: ip("::1"),
            })
        );
        assert_eq!(
            list.add_range(ip("1.0.0.0"), ip("::1"), V4),
            Err(BlockListError::RangeNotComparable {
                start: ip("1.0.0.0"),
                end: ip("::1"),
            })
        );
        assert_eq!(
            list.add_range(ip("::1"), ip("1.0.0.0"), V4),
            Err(BlockListError::RangeNotComparable {
                start: ip("::1"),
                end: ip("1.0.0.0"),
            })
        );
        assert_eq!(
            list.add_range("1.1.1.1", "1.1.1", V4),
            Err(BlockListError::InvalidAddress {
                address: "1.1.1".to_owned(),
                family: V4,
            })
        );
        assert_eq!(
            list.add_range("x", "1.1.1.1", V4),
            Err(BlockListError::InvalidAddress {
                address: "x".to_owned(),
                family: V4,
            })
        );
        assert!(list.rules().is_empty(), "failed adds add nothing");

        let message = list
            .add_range("1.1.1.2", "1.1.1.1", V4)
            .expect_err("start after end")
            .to_string();
        assert!(
            message.contains("1.1.1.2") && message.contains("1.1.1.1"),
            "{message}"
        );
        let message = list
            .add_range(ip("1.0.0.0"), ip("::1"), V4)
            .expect_err("not comparable")
            .to_string();
        assert!(
            message.contains("1.0.0.0") && message.contains("::1"),
            "{message}"
        );
    }

    /// test-blocklist.js: subnets, from text and from `SocketAddress`.
    #[test]
    fn subnets_match_across_ipv4_mapping() {
        let mut list = BlockList::new();
        list.add_subnet("1.1.1.0", 16, V4).expect("add");
        list.add_subnet(sa("8592:757c:efae:4e45::", V6), 64, V4)
            .expect("family ignored");

        assert!(list.check("1.1.0.1", V4));
        assert!(list.check("1.1.1.1", V4));
        assert!(list.check(sa("1.1.1.1", V4), V6));
        assert!(!list.check("1.2.0.1", V4));
        assert!(list.check("::ffff:1.1.0.1", V6));
        assert!(
            !list.check("::1.1.0.1", V6),
            "IPv4-compatible is not mapped"
        );

        assert!(list.check("8592:757c:efae:4e45:f::", V6));
        assert!(list.check("8592:757c:efae:4e45::f", V6));
        assert!(!list.check("8592:757c:efae:4f45::f", V6));
        assert_eq!(
            list.rules(),
            [
                "Subnet: IPv6 8592:757c:efae:4e45::/64",
                "Subnet: IPv4 1.1.1.0/16"
            ]
        );
    }

    /// test-blocklist.js: prefixes that are not a whole number of bytes.
    #[test]
    fn unaligned_prefixes() {
        let mut list = BlockList::new();
        list.add_subnet("10.0.0.0", 27, V4).expect("add");
        list.add_subnet("8592:757c:efaf::", 51, V6).expect("add");

        for n in 0..=31 {
            assert!(list.check(format!("10.0.0.{n}").as_str(), V4), "10.0.0.{n}");
        }
        assert!(!list.check("10.0.0.32", V4));

        assert!(list.check("8592:757c:efaf:0:0:0:0:0", V6));
        assert!(list.check("8592:757c:efaf:1fff:ffff:ffff:ffff:ffff", V6));
        assert!(!list.check("8592:757c:efaf:2fff:ffff:ffff:ffff:ffff", V6));
    }

    /// Prefix 0 and the full length, checked against Node v20.
    #[test]
    fn extreme_prefixes() {
        let mut list = BlockList::new();
        list.add_subnet("1.2.3.4", 32, V4).expect("add");
        assert!(list.check("1.2.3.4", V4));
        assert!(list.check("::ffff:1.2.3.4", V6));
        assert!(!list.check("1.2.3.5", V4));
        assert!(!list.check("9.9.9.9", V4));

        let mut list = BlockList::new();
        list.add_subnet("0.0.0.0", 0, V4).expect("add");
        assert!(list.check("1.2.3.4", V4));
        assert!(list.check("255.255.255.255", V4));
        assert!(list.check("::ffff:1.2.3.4", V6));
        assert!(
            !list.check("::1", V6),
            "only IPv4 (or mapped) is in 0.0.0.0/0"
        );

        let mut list = BlockList::new();
        list.add_subnet("::1", 128, V6).expect("add");
        assert!(list.check("::1", V6));
        assert!(!list.check("::2", V6));

        let mut list = BlockList::new();
        list.add_subnet("::", 0, V6).expect("add");
        assert!(list.check("ffff::1", V6));
        assert!(list.check("1.2.3.4", V4), "IPv4 is mapped into ::/0");
        assert_eq!(list.rules(), ["Subnet: IPv6 ::/0"]);
    }

    #[test]
    fn ipv6_subnet_of_mapped_addresses_matches_ipv4() {
        let mut list = BlockList::new();
        list.add_subnet("::ffff:10.0.0.0", 104, V6).expect("add");
        assert!(list.check("10.1.2.3", V4));
        assert!(!list.check("11.0.0.0", V4));

        let mut list = BlockList::new();
        list.add_subnet("::ffff:0:0", 96, V6).expect("add");
        assert!(list.check("1.2.3.4", V4));
        assert!(!list.check("::1", V6));
    }

    #[test]
    fn subnet_keeps_host_bits_in_its_text() {
        let mut list = BlockList::new();
        list.add_subnet("10.1.2.3", 8, V4).expect("add");
        assert_eq!(list.rules(), ["Subnet: IPv4 10.1.2.3/8"]);
        assert!(list.check("10.9.9.9", V4));
    }

    /// test-blocklist.js: prefix limits follow the network's family.
    #[test]
    fn subnet_errors() {
        let mut list = BlockList::new();
        assert_eq!(
            list.add_subnet("1.1.1.1", 33, V4),
            Err(BlockListError::PrefixOutOfRange {
                prefix: 33,
                family: V4,
                max: 32,
            })
        );
        assert_eq!(
            list.add_subnet("::", 129, V6),
            Err(BlockListError::PrefixOutOfRange {
                prefix: 129,
                family: V6,
                max: 128,
            })
        );
        assert_eq!(
            list.add_subnet(ip("::"), 200, V4),
            Err(BlockListError::PrefixOutOfRange {
                prefix: 200,
                family: V6,
                max: 128,
            }),
            "the network's own family sets the limit"
        );
        assert_eq!(
            list.add_subnet("", 1, V4),
            Err(BlockListError::InvalidAddress {
                address: String::new(),
                family: V4,
            })
        );
        list.add_subnet(ip("1.0.0.0"), 32, V6).expect("32 is fine");
        list.add_subnet(ip("::"), 128, V4).expect("128 is fine");
        assert_eq!(list.rules().len(), 2);

        let message = list
            .add_subnet("1.1.1.1", 33, V4)
            .expect_err("too long")
            .to_string();
        assert!(
            message.contains("33") && message.contains("32"),
            "{message}"
        );
    }

    #[test]
    fn address_errors_name_the_address_and_family() {
        let mut list = BlockList::new();
        for (text, family) in [
            ("1.1.1", V4),
            ("01.1.1.1", V4),
            ("::1", V4),
            ("1.1.1.1", V6),
            ("fe80::1%", V6),
            ("[::1]", V6),
            ("", V6),
        ] {
            let err = list.add_address(text, family).expect_err(text);
            assert_eq!(
                err,
                BlockListError::InvalidAddress {
                    address: text.to_owned(),
                    family,
                }
            );
            let message = err.to_string();
            assert!(message.contains(&format!("{text:?}")), "{message}");
            assert!(message.contains(family.as_str()), "{message}");
        }
        assert!(list.rules().is_empty());
    }

    #[test]
    fn invalid_family_converts_with_question_mark() {
        fn add(list: &mut BlockList, family: &str) -> Result<(), BlockListError> {
            list.add_address("1.1.1.1", family.parse()?)
        }
        let mut list = BlockList::new();
        let err = add(&mut list, "foo").expect_err("bad family");
        assert_eq!(
            err,
            BlockListError::InvalidFamily(InvalidFamily("foo".to_owned()))
        );
        assert!(err.to_string().contains("\"foo\""), "{err}");
        add(&mut list, "IPV4").expect("family is case-insensitive");
        assert!(list.check("1.1.1.1", V4));
    }

    /// Node returns `false` for text that does not parse in the family.
    #[test]
    fn check_of_invalid_text_is_false() {
        let mut list = BlockList::new();
        list.add_subnet("::", 0, V6).expect("add");
        list.add_subnet("0.0.0.0", 0, V4).expect("add");
        assert!(!list.check("zzz", V4));
        assert!(!list.check("", V6));
        assert!(!list.check("::1", V4));
        assert!(!list.check("1.1.1.1", V6));
        assert!(list.check("1.1.1.1", V4));
    }

    /// test-blocklist.js: one of each rule, newest first, with a case-insensitive family.
    #[test]
    fn rules_are_listed_newest_first() {
        let mut list = BlockList::new();
        list.add_address("1.1.1.1", V4).expect("add");
        list.add_range("10.0.0.1", "10.0.0.10", V4).expect("add");
        list.add_subnet(
            "8592:757c:efae:4e45::",
            64,
            "IpV6".parse().expect("case-insensitive family"),
        )
        .expect("add");

        assert_eq!(
            list.rules(),
            [
                "Subnet: IPv6 8592:757c:efae:4e45::/64",
                "Range: IPv4 10.0.0.1-10.0.0.10",
                "Address: IPv4 1.1.1.1",
            ]
        );
        assert!(list.check("1.1.1.1", V4));
        assert!(list.check("10.0.0.5", V4));
        assert!(list.check("::ffff:10.0.0.5", V6));
        assert!(list.check("8592:757c:efae:4e45::f", V6));
        assert!(!list.check("123.123.123.123", V4));
        assert!(!list.check("8592:757c:efaf:4e45:fb5d:d62a:0d00:8e17", V6));
        assert!(!list.check("::ffff:123.123.123.123", V6));
    }

    #[test]
    fn rule_text_uses_node_address_forms() {
        let mut list = BlockList::new();
        list.add_address("::102:304", V6).expect("add");
        list.add_address("::FFFF:1.2.3.4", V6).expect("add");
        list.add_address("0:0:0:0:0:0:0:1", V6).expect("add");
        assert_eq!(
            list.rules(),
            [
                "Address: IPv6 ::1",
                "Address: IPv6 ::ffff:1.2.3.4",
                "Address: IPv6 ::1.2.3.4",
            ]
        );
    }

    #[test]
    fn clones_are_independent() {
        let mut list = BlockList::new();
        list.add_address("1.1.1.1", V4).expect("add");
        let mut copy = list.clone();
        copy.add_address("2.2.2.2", V4).expect("add");
        assert!(!list.check("2.2.2.2", V4));
        assert!(copy.check("1.1.1.1", V4));
        assert_ne!(list, copy);
        assert!(format!("{list:?}").contains("BlockList"));
    }
}
