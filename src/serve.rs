//! How `netcluster serve` turns its `--listen` values into listeners: which it binds, which it
//! takes from systemd (socket activation, `--listen systemd[:NAME]`), and which it takes back
//! from systemd's file-descriptor store (a primary restarted after a crash gets the sockets its
//! predecessor stored, so connections queued meanwhile are served, not refused).
//!
//! [`plan`] is pure apart from checking the descriptors: it consumes what systemd passed and
//! returns one [`Planned`] per listener, in the order of the `--listen` values, plus the
//! descriptors nothing claimed (the caller closes them).

use std::os::fd::OwnedFd;

use crate::cli::ListenSpec;
use crate::cluster::SchedulingPolicy;
use crate::cluster::systemd::SystemdSocket;
use crate::cluster::{ListenerInfo, ListenerRecord};
use crate::protocol::message::{BoundAddress, ListenTarget};

/// The environment variable through which the primary gives its built-in workers the listen
/// keys, resolved (a `systemd:NAME` value becomes the address the socket is bound to).
pub const SERVE_LISTEN_ENV: &str = "NETCLUSTER_SERVE_LISTEN";

/// The environment variable through which the primary gives its built-in workers the app to run
/// (so that a worker never reads the configuration file again: it may have changed, or be
/// unreadable to the worker).
pub const SERVE_APP_ENV: &str = "NETCLUSTER_SERVE_APP";

/// One listener to set up.
#[derive(Debug)]
pub enum Planned {
    /// Bind it.
    Share {
        /// The operator's name.
        name: Option<String>,
        /// Where.
        target: ListenTarget,
    },
    /// Take this socket over.
    Adopt(ListenerRecord),
}

impl Planned {
    /// What workers listen on to share it.
    pub fn target(&self) -> &ListenTarget {
        match self {
            Planned::Share { target, .. } => target,
            Planned::Adopt(a) => &a.info.target,
        }
    }
}

/// What [`plan`] decided.
#[derive(Debug)]
pub struct Plan {
    /// The listeners, in the order of the `--listen` values.
    pub listeners: Vec<Planned>,
    /// What systemd passed that no `--listen` claims: `(fd number, name, socket)`, to close.
    pub unclaimed: Vec<(i32, String, OwnedFd)>,
}

/// Matches `specs` with the sockets systemd passed.
///
/// - `systemd` takes every socket systemd passed that is not one of netcluster's own from the
///   file-descriptor store; `systemd:NAME` those named NAME. Each must be a listening TCP or
///   Unix stream socket bound to an address or a path; it stays systemd's (never filtered or
///   shut down).
/// - `[NAME=]ADDR` takes back a socket from the store — named NAME (or `NAME.slotN`, a
///   reuseport slot's), or else bound to ADDR — and binds ADDR when there is none.
///
/// # Errors
/// What is wrong, naming the value and the descriptor: no socket passed for `systemd`, none
/// named NAME (with the names there are), a descriptor that is not a listening stream socket.
pub fn plan(
    specs: &[ListenSpec],
    sockets: Vec<SystemdSocket>,
    policy: SchedulingPolicy,
) -> Result<Plan, String> {
    let mut pool: Vec<Option<SystemdSocket>> = sockets.into_iter().map(Some).collect();
    let names: Vec<String> = pool.iter().flatten().map(|s| s.name.clone()).collect();
    // What each value stands for (`systemd` may stand for several sockets).
    let mut per_spec: Vec<Vec<Planned>> = specs.iter().map(|_| Vec::new()).collect();
    let mut port0 = 0u32;
    let mut ordinals = Vec::with_capacity(specs.len());
    for spec in specs {
        let is_port0 = matches!(spec, ListenSpec::Address { target: ListenTarget::Tcp(a), .. } if a.port() == 0)
            || matches!(
                spec,
                ListenSpec::Address {
                    target: ListenTarget::TcpAny(0),
                    ..
                }
            );
        ordinals.push(if is_port0 { port0 } else { 0 });
        if is_port0 {
            port0 += 1;
        }
    }
    // First the addresses take their sockets back from the store, so that `systemd` takes
    // only what is systemd's own.
    for (i, spec) in specs.iter().enumerate() {
        let ListenSpec::Address { name, target } = spec else {
            continue;
        };
        let target = absolute(target);
        let slot_prefix = name.as_ref().map(|n| format!("{n}.slot"));
        let mut slot_sockets: Vec<(usize, SystemdSocket)> = Vec::new();
        let mut own = None;
        for entry in &mut pool {
            let Some(s) = entry else { continue };
            let slot = slot_prefix
                .as_deref()
                .and_then(|p| s.name.strip_prefix(p))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|_| fits(s, &target));
            if let Some(slot) = slot {
                if let Some(s) = entry.take() {
                    slot_sockets.push((slot, s));
                }
                continue;
            }
            // By name only where it is bound as the value says (the unit may have changed
            // the address since the socket was stored).
            let by_name = name.as_deref() == Some(s.name.as_str()) && fits(s, &target);
            if own.is_none() && (by_name || bound_to(s, &target)) {
                own = entry.take();
            }
        }
        if own.is_none() && slot_sockets.is_empty() {
            per_spec[i].push(Planned::Share {
                name: name.clone(),
                target,
            });
            continue;
        }
        for (_, s) in &slot_sockets {
            s.check().map_err(|e| e.to_string())?;
        }
        if let Some(s) = &own {
            s.check().map_err(|e| e.to_string())?;
        }
        slot_sockets.sort_by_key(|(slot, _)| *slot);
        let reuseport = !slot_sockets.is_empty() && policy == SchedulingPolicy::ReusePort;
        let (socket, slot_fds) = if reuseport {
            (
                own.map(|s| s.fd),
                slot_sockets.into_iter().map(|(n, s)| (n, s.fd)).collect(),
            )
        } else {
            // Under another policy one socket serves: its own, else the first slot's (a
            // reuseport socket listens like any other); the other slots' queues are the
            // kernel's to reset when they close.
            let mut rest = slot_sockets.into_iter().map(|(_, s)| s);
            let socket = own.or_else(|| rest.next());
            for s in rest {
                tracing::warn!(
                    fd = s.number,
                    name = %s.name,
                    "a stored reuseport slot the {policy} policy does not use; closing it"
                );
            }
            (socket.map(|s| s.fd), Vec::new())
        };
        tracing::info!(listener = %target, "taking the listener back from systemd's store");
        per_spec[i].push(Planned::Adopt(ListenerRecord {
            info: ListenerInfo {
                target,
                ordinal: ordinals[i],
                name: name.clone(),
                fdname: name.clone(),
                pinned: true,
                owned: true,
                reuseport,
            },
            socket,
            slots: slot_fds,
        }));
    }
    for (i, spec) in specs.iter().enumerate() {
        let ListenSpec::Systemd(wanted) = spec else {
            continue;
        };
        let mut taken = Vec::new();
        for entry in &mut pool {
            if entry
                .as_ref()
                .is_some_and(|s| wanted.as_ref().is_none_or(|w| *w == s.name))
            {
                taken.extend(entry.take());
            }
        }
        if taken.is_empty() {
            return Err(match wanted {
                None if names.is_empty() => "--listen systemd: systemd passed no sockets \
                    (LISTEN_FDS is not set for this process): run it from a .socket unit, or \
                    under systemd-socket-activate"
                    .to_string(),
                None => "--listen systemd: the sockets systemd passed are all claimed by other \
                    --listen values"
                    .to_string(),
                Some(w) if names.is_empty() => format!(
                    "--listen systemd:{w}: systemd passed no sockets (LISTEN_FDS is not set for \
                     this process): run it from a .socket unit with FileDescriptorName={w}, or \
                     under systemd-socket-activate --fdname={w}"
                ),
                Some(w) => format!(
                    "--listen systemd:{w}: systemd passed no socket named {w:?} (it passed {})",
                    names
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        for s in taken {
            let address = s.check().map_err(|e| e.to_string())?;
            let target = match address {
                BoundAddress::Tcp(a) => ListenTarget::Tcp(a),
                BoundAddress::Unix(p) => ListenTarget::Unix(p),
            };
            let info = ListenerInfo {
                target,
                ordinal: 0,
                name: Some(s.name.clone()),
                fdname: Some(s.name),
                pinned: true,
                owned: false,
                reuseport: false,
            };
            per_spec[i].push(Planned::Adopt(ListenerRecord::new(info, s.fd)));
        }
    }
    let unclaimed = pool
        .into_iter()
        .flatten()
        .map(|s| (s.number, s.name, s.fd))
        .collect();
    Ok(Plan {
        listeners: per_spec.into_iter().flatten().collect(),
        unclaimed,
    })
}

/// A relative Unix path made absolute (the primary's directory), as the supervisor keys it.
fn absolute(target: &ListenTarget) -> ListenTarget {
    match target {
        ListenTarget::Unix(p) if p.is_relative() => match std::env::current_dir() {
            Ok(dir) => ListenTarget::Unix(dir.join(p)),
            Err(_) => target.clone(),
        },
        other => other.clone(),
    }
}

/// Whether `s` could be `target`'s socket: bound where it would bind, or for port 0, to its
/// address.
fn fits(s: &SystemdSocket, target: &ListenTarget) -> bool {
    let Ok(address) = crate::protocol::listening::check_bound(std::os::fd::AsFd::as_fd(&s.fd))
    else {
        return false;
    };
    match (target, &address) {
        (ListenTarget::Tcp(want), BoundAddress::Tcp(got)) if want.port() == 0 => {
            want.ip() == got.ip()
        }
        (ListenTarget::TcpAny(0), BoundAddress::Tcp(got)) => got.ip().is_unspecified(),
        _ => bound_to(s, target),
    }
}

/// Whether `s` is bound where `target` would bind.
fn bound_to(s: &SystemdSocket, target: &ListenTarget) -> bool {
    let Ok(address) = crate::protocol::listening::check_bound(std::os::fd::AsFd::as_fd(&s.fd))
    else {
        return false;
    };
    match (target, address) {
        (ListenTarget::Tcp(want), BoundAddress::Tcp(got)) => want.port() != 0 && *want == got,
        (ListenTarget::TcpAny(port), BoundAddress::Tcp(got)) => {
            *port != 0 && got.port() == *port && got.ip().is_unspecified()
        }
        (ListenTarget::Unix(want), BoundAddress::Unix(got)) => *want == got,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::listening::bind_listener;
    use crate::protocol::message::ListenParams;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    fn tcp(name: &str) -> (SystemdSocket, SocketAddr) {
        let target = ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr"));
        let (fd, address) = bind_listener(&target, &ListenParams::default()).expect("bind");
        let BoundAddress::Tcp(addr) = address else {
            panic!("tcp")
        };
        let number = fd.as_raw_fd();
        (
            SystemdSocket {
                fd,
                name: name.into(),
                number,
            },
            addr,
        )
    }

    fn spec(s: &str) -> ListenSpec {
        crate::cli::parse_listen_spec(s).expect("spec")
    }

    #[test]
    fn systemd_names_pick_their_sockets_in_order_and_the_rest_is_unclaimed() {
        let (web, web_addr) = tcp("web");
        let (admin, admin_addr) = tcp("admin");
        let (other, _) = tcp("other");
        let plan = plan(
            &[
                spec("systemd:admin"),
                spec("systemd:web"),
                spec("127.0.0.1:0"),
            ],
            vec![web, admin, other],
            SchedulingPolicy::RoundRobin,
        )
        .expect("plan");
        let targets: Vec<&ListenTarget> = plan.listeners.iter().map(Planned::target).collect();
        assert_eq!(targets[0], &ListenTarget::Tcp(admin_addr));
        assert_eq!(targets[1], &ListenTarget::Tcp(web_addr));
        assert!(matches!(plan.listeners[2], Planned::Share { .. }));
        let Planned::Adopt(a) = &plan.listeners[0] else {
            panic!("adopt")
        };
        assert!(!a.info.owned, "systemd's socket stays systemd's");
        assert_eq!(a.info.fdname.as_deref(), Some("admin"));
        assert_eq!(plan.unclaimed.len(), 1);
        assert_eq!(plan.unclaimed[0].1, "other");
    }

    #[test]
    fn a_missing_name_says_what_systemd_passed() {
        let (web, _) = tcp("web");
        let err = plan(
            &[spec("systemd:admin")],
            vec![web],
            SchedulingPolicy::Shared,
        )
        .expect_err("no admin");
        assert!(err.contains("no socket named \"admin\""), "{err}");
        assert!(err.contains("\"web\""), "{err}");
        let err = plan(&[spec("systemd")], vec![], SchedulingPolicy::Shared).expect_err("none");
        assert!(err.contains("LISTEN_FDS"), "{err}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_listener_is_named() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let number = r.as_raw_fd();
        let s = SystemdSocket {
            fd: r,
            name: "web".into(),
            number,
        };
        let err =
            plan(&[spec("systemd:web")], vec![s], SchedulingPolicy::Shared).expect_err("a pipe");
        assert!(err.contains(&format!("fd {number}")), "{err}");
        assert!(err.contains("a pipe"), "{err}");
    }

    #[test]
    fn stored_sockets_come_back_by_name_or_address() {
        let (stored, _) = tcp("api");
        let (moved, _) = tcp("old");
        let (by_addr, addr2) = tcp("listen7");
        let (slot2, _) = tcp("rp.slot2");
        let (slot1, _) = tcp("rp.slot1");
        let plan = plan(
            &[
                spec("api=127.0.0.1:0"),
                spec(&addr2.to_string()),
                spec("rp=127.0.0.1:0"),
                spec("old=127.0.0.1:9"),
            ],
            vec![stored, by_addr, slot2, slot1, moved],
            SchedulingPolicy::ReusePort,
        )
        .expect("plan");
        let Planned::Adopt(a) = &plan.listeners[0] else {
            panic!("adopt by name")
        };
        assert!(a.info.owned);
        assert_eq!(
            a.info.target,
            ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr"))
        );
        assert_eq!(a.info.ordinal, 0);
        let Planned::Adopt(b) = &plan.listeners[1] else {
            panic!("adopt by address")
        };
        assert_eq!(b.info.target, ListenTarget::Tcp(addr2));
        let Planned::Adopt(c) = &plan.listeners[2] else {
            panic!("adopt the slots")
        };
        assert!(c.info.reuseport);
        assert_eq!(c.info.ordinal, 1, "the second port-0 value");
        assert_eq!(
            c.slots.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // Stored under "old" but bound elsewhere than the value says: bound anew, and the
        // stored one closed.
        assert!(matches!(plan.listeners[3], Planned::Share { .. }));
        assert_eq!(plan.unclaimed.len(), 1);
        assert_eq!(plan.unclaimed[0].1, "old");
    }
}
