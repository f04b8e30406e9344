//! Parsing the `netcluster` command line's values, with messages that say what was wrong.
//! Kept in the library so that the parsers are unit-tested and fuzzed (`fuzz/`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::listening::check_unix_path;
use crate::protocol::message::ListenTarget;

/// The longest duration any option takes: a day.
pub const MAX_SECS: f64 = 86_400.0;

/// Parses a `--listen` value: `HOST:PORT`, `[IPV6]:PORT`, `PORT` (every interface) or a Unix
/// socket path. A host name is resolved with the system resolver.
///
/// ```
/// use netcluster::cli::parse_listen;
/// use netcluster::protocol::message::ListenTarget;
/// assert_eq!(parse_listen("8124"), Ok(ListenTarget::TcpAny(8124)));
/// assert!(parse_listen("127.0.0.1:70000").unwrap_err().contains("0 to 65535"));
/// ```
///
/// # Errors
/// What is wrong with the value, quoting it.
pub fn parse_listen(s: &str) -> Result<ListenTarget, String> {
    parse_listen_with(s, |host, port| {
        (host, port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|e| format!("cannot resolve {host:?}: {e}"))
    })
}

/// A `--listen` value with an optional name: `NAME=ADDR` (the name goes in a program worker's
/// `LISTEN_FDNAMES` and in `status`), or `ADDR`. A name is letters, digits, `-`, `_` and `.`;
/// anything else before a `=` (a path such as `/tmp/a=b.sock`) is part of the address.
///
/// ```
/// use netcluster::cli::parse_named_listen;
/// use netcluster::protocol::message::ListenTarget;
/// assert_eq!(
///     parse_named_listen("web=8080"),
///     Ok((Some("web".to_string()), ListenTarget::TcpAny(8080)))
/// );
/// assert_eq!(parse_named_listen("8080"), Ok((None, ListenTarget::TcpAny(8080))));
/// ```
///
/// # Errors
/// What is wrong with the address.
pub fn parse_named_listen(s: &str) -> Result<(Option<String>, ListenTarget), String> {
    if let Some((name, addr)) = s.split_once('=') {
        let is_name = !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if is_name {
            return Ok((Some(name.to_string()), parse_listen(addr)?));
        }
    }
    Ok((None, parse_listen(s)?))
}

/// One `--listen` value of `netcluster serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// `[NAME=]ADDR`: bind it (or take it back from systemd's file-descriptor store).
    Address {
        /// The operator's name (`LISTEN_FDNAMES`, `status`).
        name: Option<String>,
        /// Where.
        target: ListenTarget,
    },
    /// `systemd`: every socket systemd passed (`LISTEN_FDS`); `systemd:NAME`: those named
    /// NAME in `LISTEN_FDNAMES` (a socket unit's `FileDescriptorName=`).
    Systemd(Option<String>),
}

/// Parses a `--listen` value: `systemd`, `systemd:NAME`, or what [`parse_named_listen`] takes.
/// (A Unix socket file called `systemd` in the current directory is `./systemd`.)
///
/// ```
/// use netcluster::cli::{parse_listen_spec, ListenSpec};
/// assert_eq!(parse_listen_spec("systemd:web"), Ok(ListenSpec::Systemd(Some("web".into()))));
/// assert_eq!(parse_listen_spec("systemd"), Ok(ListenSpec::Systemd(None)));
/// assert!(parse_listen_spec("systemd:").unwrap_err().contains("name"));
/// ```
///
/// # Errors
/// What is wrong with the value.
pub fn parse_listen_spec(s: &str) -> Result<ListenSpec, String> {
    if s == "systemd" {
        return Ok(ListenSpec::Systemd(None));
    }
    if let Some(name) = s.strip_prefix("systemd:") {
        if name.is_empty() {
            return Err(
                "\"systemd:\" needs a name: systemd:NAME takes the sockets whose \
                 FileDescriptorName= is NAME (or write systemd for all of them)"
                    .into(),
            );
        }
        if name.len() > 255 || name.contains(':') || name.chars().any(char::is_control) {
            return Err(format!(
                "{s:?}: a systemd socket name is at most 255 characters, without ':' or control \
                 characters"
            ));
        }
        return Ok(ListenSpec::Systemd(Some(name.to_string())));
    }
    let (name, target) = parse_named_listen(s)?;
    Ok(ListenSpec::Address { name, target })
}

/// A signal by name, with or without `SIG` (`TERM`, `SIGQUIT`, `int`).
///
/// # Errors
/// When it names no signal.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse()
        .map_err(|_| format!("{s:?} is not a signal name (TERM, INT, QUIT, USR1, …)"))
}

/// [`parse_listen`] with the host name resolver given (the fuzzer's never resolves).
///
/// # Errors
/// As [`parse_listen`].
pub fn parse_listen_with(
    s: &str,
    resolve: impl Fn(&str, u16) -> Result<Vec<SocketAddr>, String>,
) -> Result<ListenTarget, String> {
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>().map_err(|_| {
            format!("invalid port {p:?} in {s:?}: a port is a whole number from 0 to 65535")
        })
    };
    if s.is_empty() {
        return Err("empty address".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: an IPv6 address is written [ADDRESS]:PORT"))?;
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        return Ok(ListenTarget::Tcp(SocketAddr::new(IpAddr::V6(ip), port(p)?)));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(ListenTarget::TcpAny(port(s)?));
    }
    if !s.contains('/') {
        if let Some((host, p)) = s.rsplit_once(':') {
            let p = port(p)?;
            if host.contains(':') {
                return Err(format!("{s:?}: write an IPv6 address as [ADDRESS]:PORT"));
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(ListenTarget::Tcp(SocketAddr::new(ip, p)));
            }
            if host.is_empty() {
                return Err(format!(
                    "{s:?}: the host is empty (write PORT for every interface)"
                ));
            }
            let addr = resolve(host, p)?
                .into_iter()
                .next()
                .ok_or_else(|| format!("{host:?} has no address"))?;
            return Ok(ListenTarget::Tcp(addr));
        }
    }
    if s.contains('\0') {
        return Err(format!("{s:?}: a path cannot contain a NUL byte"));
    }
    let path = PathBuf::from(s);
    check_unix_path(&path).map_err(|e| e.to_string())?;
    Ok(ListenTarget::Unix(path))
}

/// The most workers (and slots a reload replaces at a time) any option takes.
pub const MAX_WORKERS: u32 = 4096;

/// An instance name (`--name`): letters, digits, `_`, `.` and `-`, not `.` or `..` (see
/// [`control::paths::check_name`](crate::cluster::control::paths::check_name)).
///
/// # Errors
/// What is wrong with `s`.
pub fn parse_name(s: &str) -> Result<String, String> {
    crate::cluster::control::paths::check_name(s).map(|()| s.to_string())
}

/// A descriptor limit for the workers (`--rlimit-nofile`): a whole number, at least 16.
///
/// # Errors
/// What is wrong with `s`.
pub fn parse_nofile(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 16 => Ok(n),
        Ok(n) => Err(format!(
            "{n} descriptors are too few to run a worker (at least 16)"
        )),
        Err(_) => Err(format!("{s:?} is not a number of descriptors")),
    }
}

/// Parses a count of workers or slots: a whole number from 1 to [`MAX_WORKERS`].
///
/// ```
/// use netcluster::cli::parse_count;
/// assert_eq!(parse_count("4"), Ok(4));
/// assert!(parse_count("0").unwrap_err().contains("1 to 4096"));
/// ```
///
/// # Errors
/// What is wrong with the value.
pub fn parse_count(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a count: a whole number from 1 to {MAX_WORKERS}"
        )),
    }
}

/// Parses a size in bytes: a whole number with an optional unit, `K`, `M`, `G` (powers of
/// 1024; `KiB`, `MB`, … are read the same), as `--max-rss 80M`.
///
/// ```
/// use netcluster::cli::parse_size;
/// assert_eq!(parse_size("80M"), Ok(80 * 1024 * 1024));
/// assert_eq!(parse_size("4096"), Ok(4096));
/// assert!(parse_size("12Q").unwrap_err().contains("12Q"));
/// ```
///
/// # Errors
/// What is wrong with the value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(format!(
                "{s:?} is not a size: a whole number with K, M or G (as 80M)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size: a whole number with K, M or G (as 80M)"))?;
    match n.checked_mul(1u64 << shift) {
        Some(0) | None => Err(format!("{s:?} is not a size a worker can reach")),
        Some(bytes) => Ok(bytes),
    }
}

/// Parses a duration: seconds (`10`, `0.5`) or a number with a unit, `ms`, `s`, `m`, `h`
/// (`500ms`, `2s`, `1.5m`), at most [`MAX_SECS`].
///
/// ```
/// use netcluster::cli::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// ```
///
/// # Errors
/// What is wrong with the value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (as 2s, 500ms, 1.5m, or seconds)"))?;
    parse_secs(&(value * scale).to_string()).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses seconds (`10`, `0.5`), refusing what is not a duration a primary can wait for: at
/// most [`MAX_SECS`].
///
/// # Errors
/// What is wrong with the value.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration in seconds"));
    }
    if secs > MAX_SECS {
        return Err(format!(
            "{s} seconds is longer than the maximum of {MAX_SECS} (a day)"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a duration in seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("127.0.0.1:0"),
            Ok(ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")))
        );
        assert_eq!(
            parse_listen("[::1]:8124"),
            Ok(ListenTarget::Tcp("[::1]:8124".parse().expect("addr")))
        );
        assert_eq!(parse_listen("8124"), Ok(ListenTarget::TcpAny(8124)));
        assert_eq!(
            parse_listen("/tmp/echo.sock"),
            Ok(ListenTarget::Unix("/tmp/echo.sock".into()))
        );
        assert_eq!(
            parse_listen("echo.sock"),
            Ok(ListenTarget::Unix("echo.sock".into()))
        );
        assert!(
            matches!(parse_listen("localhost:80"), Ok(ListenTarget::Tcp(a)) if a.ip().is_loopback())
        );
    }

    #[test]
    fn bad_listen_values_say_what_is_wrong() {
        let e = parse_listen("127.0.0.1:70000").expect_err("port");
        assert!(e.contains("invalid port \"70000\""), "{e}");
        let e = parse_listen("70000").expect_err("port");
        assert!(e.contains("0 to 65535"), "{e}");
        let e = parse_listen(&format!("/tmp/{}", "x".repeat(200))).expect_err("long");
        assert!(e.contains("at most 107 fit in sun_path"), "{e}");
        let e = parse_listen("[::1]8124").expect_err("v6");
        assert!(e.contains("[ADDRESS]:PORT"), "{e}");
        let e = parse_listen("::1:80").expect_err("v6 without brackets");
        assert!(e.contains("[ADDRESS]:PORT"), "{e}");
        let e = parse_listen(":80").expect_err("no host");
        assert!(e.contains("the host is empty"), "{e}");
        let e = parse_listen("a\0b").expect_err("nul");
        assert!(e.contains("NUL"), "{e}");
    }

    #[test]
    fn systemd_listen_values() {
        assert_eq!(parse_listen_spec("systemd"), Ok(ListenSpec::Systemd(None)));
        assert_eq!(
            parse_listen_spec("systemd:admin"),
            Ok(ListenSpec::Systemd(Some("admin".into())))
        );
        assert!(parse_listen_spec("systemd:").is_err());
        assert!(parse_listen_spec("systemd:a:b").is_err());
        assert!(parse_listen_spec(&format!("systemd:{}", "x".repeat(256))).is_err());
        assert_eq!(
            parse_listen_spec("./systemd"),
            Ok(ListenSpec::Address {
                name: None,
                target: ListenTarget::Unix("./systemd".into())
            })
        );
        assert_eq!(
            parse_listen_spec("web=127.0.0.1:80"),
            Ok(ListenSpec::Address {
                name: Some("web".into()),
                target: ListenTarget::Tcp("127.0.0.1:80".parse().expect("addr"))
            })
        );
    }

    #[test]
    fn counts_are_whole_numbers_from_1_to_the_maximum() {
        assert_eq!(parse_count("1"), Ok(1));
        assert_eq!(parse_count("4096"), Ok(4096));
        for bad in ["0", "4097", "-1", "2.5", "two", ""] {
            let e = parse_count(bad).expect_err(bad);
            assert!(e.contains("1 to 4096"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_are_capped_at_parse_time() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("86400"), Ok(Duration::from_secs(86_400)));
        let e = parse_secs("1e19").expect_err("too long");
        assert_eq!(
            e,
            "1e19 seconds is longer than the maximum of 86400 (a day)"
        );
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("inf").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("ten").is_err());
    }
}
