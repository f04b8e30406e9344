//! Node's `net.isIP`, `net.isIPv4` and `net.isIPv6`, and the IP text parsing and formatting
//! that [`BlockList`](super::BlockList) and [`SocketAddress`](super::SocketAddress) share.
//!
//! Node checks with regular expressions; std's parsers accept exactly the same strings for
//! the address part (strict dot-decimal IPv4 without leading zeroes, RFC 4291 IPv6 text with
//! an optional trailing dotted IPv4), so these functions use them and add Node's zone-index
//! suffix for IPv6 (`fe80::1%eth0`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Family;

/// Node's `net.isIP(input)`: `4` for an IPv4 address in dot-decimal notation with no leading
/// zeroes, `6` for an IPv6 address, otherwise `0`.
///
/// ```
/// use netcluster_worker::net::is_ip;
/// assert_eq!(is_ip("::1"), 6);
/// assert_eq!(is_ip("127.0.0.1"), 4);
/// assert_eq!(is_ip("127.000.000.001"), 0);
/// assert_eq!(is_ip("127.0.0.1/24"), 0);
/// assert_eq!(is_ip("fhqwhgads"), 0);
/// ```
pub fn is_ip(input: &str) -> u8 {
    if is_ipv4(input) {
        4
    } else if is_ipv6(input) {
        6
    } else {
        0
    }
}

/// Node's `net.isIPv4(input)`: whether `input` is an IPv4 address in dot-decimal notation
/// (four decimal parts, each 0–255, with no leading zeroes).
///
/// ```
/// use netcluster_worker::net::is_ipv4;
/// assert!(is_ipv4("127.0.0.1"));
/// assert!(!is_ipv4("127.000.000.001"));
/// assert!(!is_ipv4("127.0.0.1/24"));
/// assert!(!is_ipv4("1.2.3"));
/// ```
pub fn is_ipv4(input: &str) -> bool {
    input.parse::<Ipv4Addr>().is_ok()
}

/// Node's `net.isIPv6(input)`: whether `input` is an IPv6 address, optionally with a zone
/// index (`%` then one or more ASCII letters, digits, `-`, `.` or `:`), as in `fe80::1%eth0`.
///
/// ```
/// use netcluster_worker::net::is_ipv6;
/// assert!(is_ipv6("::1"));
/// assert!(is_ipv6("::ffff:127.0.0.1"));
/// assert!(is_ipv6("fe80::1%eth0"));
/// assert!(!is_ipv6("127.0.0.1"));
/// assert!(!is_ipv6("fhqwhgads"));
/// ```
pub fn is_ipv6(input: &str) -> bool {
    parse_ipv6(input).is_some()
}

/// Parses IPv6 text the way [`is_ipv6`] accepts it; returns the address and the zone index
/// (without the `%`), if any.
pub(crate) fn parse_ipv6(input: &str) -> Option<(Ipv6Addr, Option<&str>)> {
    let (address, zone) = match input.split_once('%') {
        Some((address, zone)) => (address, Some(zone)),
        None => (input, None),
    };
    if let Some(zone) = zone {
        let zone_ok = !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
        if !zone_ok {
            return None;
        }
    }
    Some((address.parse().ok()?, zone))
}

/// Parses an address of the given family as Node's `SocketAddress` does: strict dot-decimal
/// for IPv4, [`is_ipv6`] text for IPv6. Returns the address and the IPv6 zone index, if any.
pub(crate) fn parse_ip(input: &str, family: Family) -> Option<(IpAddr, Option<&str>)> {
    match family {
        Family::Ipv4 => input.parse().ok().map(|ip| (IpAddr::V4(ip), None)),
        Family::Ipv6 => parse_ipv6(input).map(|(ip, zone)| (IpAddr::V6(ip), zone)),
    }
}

/// The text Node gives for an address (libuv's `uv_inet_ntop`).
///
/// Identical to std's `Display` except for IPv4-compatible IPv6 addresses (96 zero bits, then
/// 32 bits whose high half is not zero), which libuv writes with a dotted tail: Node shows
/// `::1.2.3.4` where std shows `::102:304`.
pub(crate) fn node_ip_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if segments[..6].iter().all(|&s| s == 0) && segments[6] != 0 {
                let [.., a, b, c, d] = v6.octets();
                format!("::{}", Ipv4Addr::new(a, b, c, d))
            } else {
                v6.to_string()
            }
        }
        IpAddr::V4(v4) => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node's documented examples (net.md, `net.isIP`, `net.isIPv4`, `net.isIPv6`).
    #[test]
    fn node_doc_examples() {
        assert_eq!(is_ip("::1"), 6);
        assert_eq!(is_ip("127.0.0.1"), 4);
        assert_eq!(is_ip("127.000.000.001"), 0);
        assert_eq!(is_ip("127.0.0.1/24"), 0);
        assert_eq!(is_ip("fhqwhgads"), 0);

        assert!(is_ipv4("127.0.0.1"));
        assert!(!is_ipv4("127.000.000.001"));
        assert!(!is_ipv4("127.0.0.1/24"));
        assert!(!is_ipv4("fhqwhgads"));

        assert!(is_ipv6("::1"));
        assert!(!is_ipv6("fhqwhgads"));
    }

    /// The string cases of Node's test/parallel/test-net-isip.js (the non-string ones, `null`,
    /// `123`, objects with `toString`, cannot be written against `&str`).
    #[test]
    fn node_isip_cases() {
        let cases: &[(&str, u8)] = &[
            ("127.0.0.1", 4),
            ("x127.0.0.1", 0),
            ("example.com", 0),
            ("0000:0000:0000:0000:0000:0000:0000:0000", 6),
            ("0000:0000:0000:0000:0000:0000:0000:0000::0000", 0),
            ("1050:0:0:0:5:600:300c:326b", 6),
            ("2001:252:0:1::2008:6", 6),
            ("2001:dead:beef:1::2008:6", 6),
            ("2001::", 6),
            ("2001:dead::", 6),
            ("2001:dead:beef::", 6),
            ("2001:dead:beef:1::", 6),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 6),
            (":2001:252:0:1::2008:6:", 0),
            (":2001:252:0:1::2008:6", 0),
            ("2001:252:0:1::2008:6:", 0),
            ("2001:252::1::2008:6", 0),
            ("::2001:252:1:2008:6", 6),
            ("::2001:252:1:1.1.1.1", 6),
            ("::2001:252:1:255.255.255.255", 6),
            ("::2001:252:1:255.255.255.255.76", 0),
            ("::anything", 0),
            ("::1", 6),
            ("::", 6),
            ("0000:0000:0000:0000:0000:0000:12345:0000", 0),
            ("0", 0),
            ("", 0),
        ];
        for &(input, expected) in cases {
            assert_eq!(is_ip(input), expected, "is_ip({input:?})");
            assert_eq!(is_ipv4(input), expected == 4, "is_ipv4({input:?})");
            assert_eq!(is_ipv6(input), expected == 6, "is_ipv6({input:?})");
        }
        assert!(!is_ipv4("2001:252:0:1::2008:6"));
        assert!(!is_ipv6("127.0.0.1"));
        assert!(is_ipv6("2001:252:0:1::2008:6"));
    }

    /// Node's test/parallel/test-net-isipv4.js.
    #[test]
    fn node_isipv4_cases() {
        let valid = [
            "0.0.0.0",
            "8.8.8.8",
            "127.0.0.1",
            "100.100.100.100",
            "192.168.0.1",
            "18.101.25.153",
            "123.23.34.2",
            "172.26.168.134",
            "212.58.241.131",
            "128.0.0.0",
            "23.71.254.72",
            "223.255.255.255",
            "192.0.2.235",
            "99.198.122.146",
            "46.51.197.88",
            "173.194.34.134",
            "255.255.255.255",
        ];
        let invalid = [
            ".100.100.100.100",
            "100..100.100.100.",
            "100.100.100.100.",
            "999.999.999.999",
            "256.256.256.256",
            "256.100.100.100.100",
            "123.123.123",
            "http://123.123.123",
            "1000.2.3.4",
            "999.2.3.4",
            "0000000192.168.0.200",
            "192.168.0.2000000000",
            // Leading zeroes, other notations, surrounding text.
            "127.000.000.001",
            "01.2.3.4",
            "1.2.3.04",
            "00.0.0.0",
            "0x7f.0.0.1",
            "2130706433",
            "1.2.3",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1.2.3.4\n",
            "+1.2.3.4",
            "1.2.3.-4",
            "1.2.3.4/32",
            "1.2.3.4:80",
            "1.2.3.4%eth0",
            "١.٢.٣.٤",
        ];
        for ip in valid {
            assert!(is_ipv4(ip), "{ip}");
            assert_eq!(is_ip(ip), 4, "{ip}");
            assert!(!is_ipv6(ip), "{ip}");
        }
        for ip in invalid {
            assert!(!is_ipv4(ip), "{ip}");
            assert_eq!(is_ip(ip), 0, "{ip}");
        }
    }

    /// Node's test/parallel/test-net-isipv6.js, valid addresses.
    #[test]
    fn node_isipv6_valid_cases() {
        let valid = [
            "::",
            "1::",
            "::1",
            "1::8",
            "1::7:8",
            "1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6::8",
            "1:2:3:4:5:6:7::",
            "1:2:3:4:5::7:8",
            "1:2:3:4:5::8",
            "1:2:3::8",
            "1::4:5:6:7:8",
            "1::6:7:8",
            "1::3:4:5:6:7:8",
            "1:2:3:4::6:7:8",
            "1:2::4:5:6:7:8",
            "::2:3:4:5:6:7:8",
            "1:2::8",
            "2001:0000:1234:0000:0000:C1C0:ABCD:0876",
            "3ffe:0b00:0000:0000:0001:0000:0000:000a",
            "FF02:0000:0000:0000:0000:0000:0000:0001",
            "0000:0000:0000:0000:0000:0000:0000:0001",
            "0000:0000:0000:0000:0000:0000:0000:0000",
            "::ffff:192.168.1.26",
            "2::10",
            "ff02::1",
            "fe80::",
            "2002::",
            "2001:db8::",
            "2001:0db8:1234::",
            "::ffff:0:0",
            "::ffff:192.168.1.1",
            "1:2:3:4::8",
            "1::2:3:4:5:6:7",
            "1::2:3:4:5:6",
            "1::2:3:4:5",
            "1::2:3:4",
            "1::2:3",
            "::2:3:4:5:6:7",
            "::2:3:4:5:6",
            "::2:3:4:5",
            "::2:3:4",
            "::2:3",
            "::8",
            "1:2:3:4:5:6::",
            "1:2:3:4:5::",
            "1:2:3:4::",
            "1:2:3::",
            "1:2::",
            "1:2:3:4::7:8",
            "1:2:3::7:8",
            "1:2::7:8",
            "1:2:3:4:5:6:1.2.3.4",
            "1:2:3:4:5::1.2.3.4",
            "1:2:3:4::1.2.3.4",
            "1:2:3::1.2.3.4",
            "1:2::1.2.3.4",
            "1::1.2.3.4",
            "1:2:3:4::5:1.2.3.4",
            "1:2:3::5:1.2.3.4",
            "1:2::5:1.2.3.4",
            "1::5:1.2.3.4",
            "1::5:11.22.33.44",
            "fe80::217:f2ff:254.7.237.98",
            "fe80::217:f2ff:fe07:ed62",
            "2001:DB8:0:0:8:800:200C:417A",
            "FF01:0:0:0:0:0:0:101",
            "0:0:0:0:0:0:0:1",
            "0:0:0:0:0:0:0:0",
            "2001:DB8::8:800:200C:417A",
            "FF01::101",
            "0:0:0:0:0:0:13.1.68.3",
            "0:0:0:0:0:FFFF:129.144.52.38",
            "::13.1.68.3",
            "::FFFF:129.144.52.38",
            "fe80:0000:0000:0000:0204:61ff:fe9d:f156",
            "fe80:0:0:0:204:61ff:fe9d:f156",
            "fe80::204:61ff:fe9d:f156",
            "fe80:0:0:0:204:61ff:254.157.241.86",
            "fe80::204:61ff:254.157.241.86",
            "fe80::1",
            "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
            "2001:db8:85a3:0:0:8a2e:370:7334",
            "2001:db8:85a3::8a2e:370:7334",
            "2001:0db8:0000:0000:0000:0000:1428:57ab",
            "2001:0db8:0000:0000:0000::1428:57ab",
            "2001:0db8:0:0:0:0:1428:57ab",
            "2001:0db8:0:0::1428:57ab",
            "2001:0db8::1428:57ab",
            "2001:db8::1428:57ab",
            "::ffff:12.34.56.78",
            "::ffff:0c22:384e",
            "2001:0db8:1234:0000:0000:0000:0000:0000",
            "2001:0db8:1234:ffff:ffff:ffff:ffff:ffff",
            "2001:db8:a::123",
            "::ffff:192.0.2.128",
            "::ffff:c000:280",
            "a:b:c:d:e:f:f1:f2",
            "a:b:c::d:e:f:f1",
            "a:b:c::d:e:f",
            "a:b:c::d:e",
            "a:b:c::d",
            "::a",
            "::a:b:c",
            "::a:b:c:d:e:f:f1",
            "a::",
            "a:b:c::",
            "a:b:c:d:e:f:f1::",
            "a:bb:ccc:dddd:000e:00f:0f::",
            "0:a:0:a:0:0:0:a",
            "0:a:0:0:a:0:0:a",
            "2001:db8:1:1:1:1:0:0",
            "2001:db8:1:1:1:0:0:0",
            "2001:db8:1:1:0:0:0:0",
            "2001:db8:1:0:0:0:0:0",
            "2001:db8:0:0:0:0:0:0",
            "2001:0:0:0:0:0:0:0",
            "A:BB:CCC:DDDD:000E:00F:0F::",
            "0:0:0:0:0:0:0:a",
            "0:0:0:0:a:0:0:0",
            "0:0:0:a:0:0:0:0",
            "a:0:0:a:0:0:a:a",
            "a:0:0:a:0:0:0:a",
            "a:0:0:0:a:0:0:a",
            "a:0:0:0:a:0:0:0",
            "a:0:0:0:0:0:0:0",
            "fe80::7:8%eth0",
            "fe80::7:8%1",
            // Zone indexes: any run of letters, digits, '-', '.' and ':'.
            "fe80::1%eth0",
            "::1%lo",
            "::1%a:b.c-d",
            "::ffff:1.2.3.4%en0",
        ];
        for ip in valid {
            assert!(is_ipv6(ip), "{ip}");
            assert_eq!(is_ip(ip), 6, "{ip}");
            assert!(!is_ipv4(ip), "{ip}");
        }
    }

    /// Node's test/parallel/test-net-isipv6.js, invalid strings.
    #[test]
    fn node_isipv6_invalid_cases() {
        let invalid = [
            "",
            "1:",
            ":1",
            "11:36:12",
            "02001:0000:1234:0000:0000:C1C0:ABCD:0876",
            "2001:0000:1234:0000:00001:C1C0:ABCD:0876",
            "2001:0000:1234: 0000:0000:C1C0:ABCD:0876",
            "2001:1:1:1:1:1:255Z255X255Y255",
            "3ffe:0b00:0000:0001:0000:0000:000a",
            "FF02:0000:0000:0000:0000:0000:0000:0000:0001",
            "3ffe:b00::1::a",
            "::1111:2222:3333:4444:5555:6666::",
            "1:2:3::4:5::7:8",
            "12345::6:7:8",
            "1::5:400.2.3.4",
            "1::5:260.2.3.4",
            "1::5:256.2.3.4",
            "1::5:1.256.3.4",
            "1::5:1.2.256.4",
            "1::5:1.2.3.256",
            "1::5:300.2.3.4",
            "1::5:1.300.3.4",
            "1::5:1.2.300.4",
            "1::5:1.2.3.300",
            "1::5:900.2.3.4",
            "1::5:1.900.3.4",
            "1::5:1.2.900.4",
            "1::5:1.2.3.900",
            "1::5:300.300.300.300",
            "1::5:3000.30.30.30",
            "1::400.2.3.4",
            "1::260.2.3.4",
            "1::256.2.3.4",
            "1::1.256.3.4",
            "1::1.2.256.4",
            "1::1.2.3.256",
            "1::300.2.3.4",
            "1::1.300.3.4",
            "1::1.2.300.4",
            "1::1.2.3.300",
            "1::900.2.3.4",
            "1::1.900.3.4",
            "1::1.2.900.4",
            "1::1.2.3.900",
            "1::300.300.300.300",
            "1::3000.30.30.30",
            "::400.2.3.4",
            "::260.2.3.4",
            "::256.2.3.4",
            "::1.256.3.4",
            "::1.2.256.4",
            "::1.2.3.256",
            "::300.2.3.4",
            "::1.300.3.4",
            "::1.2.300.4",
            "::1.2.3.300",
            "::900.2.3.4",
            "::1.900.3.4",
            "::1.2.900.4",
            "::1.2.3.900",
            "::300.300.300.300",
            "::3000.30.30.30",
            "2001:DB8:0:0:8:800:200C:417A:221",
            "FF01::101::2",
            "1111:2222:3333:4444::5555:",
            "1111:2222:3333::5555:",
            "1111:2222::5555:",
            "1111::5555:",
            "::5555:",
            ":::",
            "1111:",
            ":",
            ":1111:2222:3333:4444::5555",
            ":1111:2222:3333::5555",
            ":1111:2222::5555",
            ":1111::5555",
            ":::5555",
            "1.2.3.4:1111:2222:3333:4444::5555",
            "1.2.3.4:1111:2222:3333::5555",
            "1.2.3.4:1111:2222::5555",
            "1.2.3.4:1111::5555",
            "1.2.3.4::5555",
            "1.2.3.4::",
            "fe80:0000:0000:0000:0204:61ff:254.157.241.086",
            "123",
            "ldkfj",
            "2001::FFD3::57ab",
            "2001:db8:85a3::8a2e:37023:7334",
            "2001:db8:85a3::8a2e:370k:7334",
            "1:2:3:4:5:6:7:8:9",
            "1::2::3",
            "1:::3:4:5",
            "1:2:3::4:5:6:7:8:9",
            "::ffff:2.3.4",
            "::ffff:257.1.2.3",
            "::ffff:12345678901234567890.1.26",
            "2001:0000:1234:0000:0000:C1C0:ABCD:0876 0",
            "02001:0000:1234:0000:0000:C1C0:ABCD:0876",
            // Dotted tail too early or too late, brackets, zones Node's pattern refuses.
            "1:2:3:4:5:6:7:1.2.3.4",
            "1:2:3:4:5:6::1.2.3.4",
            "::1.2.3.4:5",
            "::ffff:01.2.3.4",
            "[::1]",
            "[::1]:80",
            "::1/128",
            "fe80::1%",
            "fe80::1%eth_0",
            "fe80::1%eth0%1",
            "fe80::1% eth0",
            "%eth0",
            "1.2.3.4%eth0",
            " ::1",
            "::1 ",
        ];
        for ip in invalid {
            assert!(!is_ipv6(ip), "{ip}");
            assert_eq!(is_ip(ip), 0, "{ip}");
        }
    }

    #[test]
    fn parse_ipv6_returns_the_zone() {
        let (ip, zone) = parse_ipv6("fe80::1%eth0").expect("zoned address parses");
        assert_eq!(ip, "fe80::1".parse::<Ipv6Addr>().expect("literal"));
        assert_eq!(zone, Some("eth0"));
        assert_eq!(
            parse_ipv6("::1").expect("plain address parses").1,
            None,
            "no zone"
        );
    }

    #[test]
    fn parse_ip_follows_the_family() {
        assert_eq!(
            parse_ip("1.2.3.4", Family::Ipv4),
            Some((IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)), None))
        );
        assert_eq!(parse_ip("1.2.3.4", Family::Ipv6), None);
        assert_eq!(parse_ip("::1", Family::Ipv4), None);
        assert_eq!(
            parse_ip("::1%2", Family::Ipv6),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), Some("2")))
        );
        assert_eq!(parse_ip("01.2.3.4", Family::Ipv4), None);
    }

    /// Compared with Node v20's `new net.SocketAddress({family: 'ipv6', address}).address`.
    #[test]
    fn node_ip_string_matches_libuv() {
        let cases = [
            ("::", "::"),
            ("::1", "::1"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("::0.0.0.1", "::1"),
            ("::0.1.0.0", "::0.1.0.0"),
            ("::102:304", "::1.2.3.4"),
            ("::1.2.3.4", "::1.2.3.4"),
            ("::ffff:0:0", "::ffff:0.0.0.0"),
            ("::FFFF:1.2.3.4", "::ffff:1.2.3.4"),
            ("::1:0:0:0", "::1:0:0:0"),
            ("1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:102:304"),
            ("8592:757c:efae:4e45::", "8592:757c:efae:4e45::"),
            (
                "8592:757c:efae:4e45:fb5d:d62a:0d00:8e17",
                "8592:757c:efae:4e45:fb5d:d62a:d00:8e17",
            ),
        ];
        for (input, expected) in cases {
            let ip: Ipv6Addr = input.parse().expect(input);
            assert_eq!(node_ip_string(IpAddr::V6(ip)), expected, "{input}");
        }
        assert_eq!(
            node_ip_string(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            "10.0.0.1"
        );
    }
}
