//! The hand-over of a primary upgrade: how a running primary gives every listening socket to
//! the new primary it started, over a `SOCK_SEQPACKET` [`Channel`](crate::channel::Channel)
//! with `SCM_RIGHTS`, and how the two agree on who serves.
//!
//! ```text
//! old → new   Hello { pid, generation, workers, listeners }
//! old → new   Listener { index 0, key, names, flags, sockets }   then its Socket frames (1 fd each)
//!             … one Listener and its sockets per listener …
//! old → new   Done { listeners, sockets }
//! new → old   Received                 (the hand-over checked out; its workers start)
//! new → old   Ready { pid }            (its workers are all ready)   or Failed { reason }
//! old → new   TakeOver                 (systemd's MAINPID is the new primary's now) or Abort
//! new → old   Serving                  (it answers on the control socket)
//! ```
//!
//! One descriptor rides with each `Socket` frame, so any number of listeners and reuseport
//! slots fit (the kernel's limit is 253 descriptors per message). Frames carry their own version
//! byte ([`HANDOVER_VERSION`]), independent of the worker protocol's.
//!
//! [`Receiver`] checks what arrives — the order of the frames, every count against what was
//! announced and against [`MAX_LISTENERS`] and [`MAX_SLOTS`], the lengths of names, and that
//! every descriptor is a bound socket (a listening one where it must listen) — and owns every
//! descriptor from the moment it arrives, so a truncated or malformed hand-over is an error
//! that closes what came and leaves the old primary serving.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::listening;
use crate::message::{Frame, ListenTarget};

/// The version byte of hand-over frames.
pub const HANDOVER_VERSION: u8 = 1;
/// The most listeners one hand-over carries.
pub const MAX_LISTENERS: u32 = 65_536;
/// The most reuseport slot sockets one listener carries.
pub const MAX_SLOTS: u32 = 4096;
/// The longest name (the operator's, or `LISTEN_FDNAMES`'s) accepted, in bytes.
pub const MAX_NAME: usize = 4096;
/// The environment variable naming the descriptor of the new primary's end of the hand-over.
pub const UPGRADE_FD_ENV: &str = "NETCLUSTER_UPGRADE_FD";

/// One frame of the hand-over.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Old → new, first: who hands over, and how much follows.
    Hello {
        /// The old primary's pid.
        pid: u32,
        /// The generation its workers run (the new primary's are the next).
        generation: u64,
        /// How many workers it runs.
        workers: u32,
        /// How many `Listener` frames follow.
        listeners: u32,
    },
    /// Old → new: one listener; `sockets` `Socket` frames follow with its descriptors.
    Listener {
        /// Its place in the hand-over, from 0.
        index: u32,
        /// What describes it (its record without the sockets).
        info: ListenerInfo,
        /// How many `Socket` frames follow for it.
        sockets: u32,
    },
    /// Old → new: one socket of the listener before it, with its descriptor.
    Socket {
        /// The listener's index.
        listener: u32,
        /// `None`: the listener's own socket; `Some(n)`: reuseport slot `n`'s, in the order of
        /// the kernel's group.
        slot: Option<u32>,
    },
    /// Old → new: everything was sent.
    Done {
        /// Listeners sent.
        listeners: u32,
        /// Sockets sent.
        sockets: u32,
    },
    /// New → old: the hand-over arrived whole and checked out; its workers start.
    Received,
    /// New → old: its workers are all ready; it waits for `TakeOver`.
    Ready {
        /// The new primary's pid.
        pid: u32,
    },
    /// New → old: it cannot take over, and exits.
    Failed {
        /// Why.
        reason: String,
    },
    /// Old → new: it is the primary now.
    TakeOver,
    /// Old → new: the upgrade is called off; the new primary stops its workers without
    /// touching the sockets and exits.
    Abort {
        /// Why.
        reason: String,
    },
    /// New → old: it serves (the control socket is its); the old primary may go.
    Serving,
}

impl Frame for Handover {
    const NAME: &'static str = "Handover";
    const VARIANTS: u32 = 11;
    const VERSION: u8 = HANDOVER_VERSION;
    fn fd_count(&self) -> usize {
        usize::from(matches!(self, Handover::Socket { .. }))
    }
}

/// Why a hand-over was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A frame that does not belong where it came.
    #[error("hand-over out of order: {0}")]
    Order(String),
    /// A count or a length past what is announced or allowed.
    #[error("hand-over over a limit: {0}")]
    Limit(String),
    /// A descriptor that is not the socket it should be.
    #[error("hand-over socket {what}: {error}")]
    Socket {
        /// Which socket.
        what: String,
        /// What is wrong with it.
        error: io::Error,
    },
}

/// What describes a listener apart from its sockets: the key workers share it by, its names,
/// and how it is owned and shared. It is the body of the [`Handover::Listener`] frame.
///
/// On the wire it is what version 1 of the hand-over has always sent, field by field; a name
/// that is `None` travels as an empty string (a listener the primary holds always has both
/// names), and an empty string arrives as `None`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// What workers listen on to share it (for an adopted socket: the address it is bound to).
    pub target: ListenTarget,
    /// For port 0: which port-0 listen of a worker it answers.
    pub ordinal: u32,
    /// The operator's name for it; `None`: its address.
    #[serde(with = "empty_is_none")]
    pub name: Option<String>,
    /// Its name in a program worker's `LISTEN_FDNAMES`; `None`: made from `name`.
    #[serde(with = "empty_is_none")]
    pub fdname: Option<String>,
    /// Configured by the operator: open for as long as the primary runs.
    pub pinned: bool,
    /// Made by a netcluster primary (this one, or the one it replaces), so the primary may
    /// change it (refuse new connections at a stop, remove its socket file). A systemd socket
    /// is not: it is the operator's.
    pub owned: bool,
    /// A reuseport listener: its own socket (if any) only reserves the port (bound, not
    /// listening), and its slots' sockets listen.
    pub reuseport: bool,
}

/// A listener as it passes from one owner to another — out of a primary's registry (an
/// export), across the hand-over of an upgrade, from systemd or its file-descriptor store —
/// and into a primary's registry (an adoption): what describes it, and its sockets.
#[derive(Debug)]
pub struct ListenerRecord {
    /// What describes it.
    pub info: ListenerInfo,
    /// Its own socket (for reuseport: the reservation of the port, if any).
    pub socket: Option<OwnedFd>,
    /// A reuseport listener's slot sockets, listening, in the kernel's group order.
    pub slots: Vec<(usize, OwnedFd)>,
}

impl ListenerRecord {
    /// A record of one socket (a listener that is not reuseport).
    pub fn new(info: ListenerInfo, socket: OwnedFd) -> ListenerRecord {
        ListenerRecord {
            info,
            socket: Some(socket),
            slots: Vec::new(),
        }
    }

    /// How many sockets it has: its own and its slots'.
    pub fn sockets(&self) -> usize {
        self.slots.len() + usize::from(self.socket.is_some())
    }
}

/// `Option<String>` as a string that is empty for `None`.
mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serializer};

    // The signature serde's `with` asks for.
    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(name: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name.as_deref().unwrap_or(""))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let name = String::deserialize(d)?;
        Ok((!name.is_empty()).then_some(name))
    }
}

/// A listener being received: its record, and how many sockets it announced.
#[derive(Debug)]
struct Pending {
    record: ListenerRecord,
    expected: u32,
}

/// Everything a hand-over carried.
#[derive(Debug)]
pub struct Received {
    /// The old primary's pid.
    pub pid: u32,
    /// The generation its workers run.
    pub generation: u64,
    /// How many workers it runs.
    pub workers: u32,
    /// The listeners, in the old primary's order, each with every socket it announced (each
    /// checked to be a bound socket, listening where it must).
    pub listeners: Vec<ListenerRecord>,
}

/// Checks and collects the frames of a hand-over, from `Hello` to `Done`.
#[derive(Debug, Default)]
pub struct Receiver {
    hello: Option<(u32, u64, u32, u32)>,
    listeners: Vec<Pending>,
    sockets: u32,
    done: bool,
}

impl Receiver {
    /// A receiver waiting for `Hello`.
    pub fn new() -> Receiver {
        Receiver::default()
    }

    /// Whether `Done` arrived and everything it announced did.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes one frame with the descriptors that came with it (the channel has matched their
    /// number to the frame's); a frame of the later phases (`TakeOver`, …) is out of order.
    ///
    /// # Errors
    /// [`HandoverError`] naming what is wrong; the descriptors are closed.
    pub fn take(&mut self, msg: Handover, mut fds: Vec<OwnedFd>) -> Result<(), HandoverError> {
        if self.done {
            return Err(HandoverError::Order(format!(
                "{} after Done",
                variant_name(&msg)
            )));
        }
        match msg {
            Handover::Hello {
                pid,
                generation,
                workers,
                listeners,
            } => {
                if self.hello.is_some() {
                    return Err(HandoverError::Order("a second Hello".into()));
                }
                if listeners > MAX_LISTENERS {
                    return Err(HandoverError::Limit(format!(
                        "{listeners} listeners announced (at most {MAX_LISTENERS})"
                    )));
                }
                if workers == 0 || workers > MAX_SLOTS {
                    return Err(HandoverError::Limit(format!(
                        "{workers} workers announced (1 to {MAX_SLOTS})"
                    )));
                }
                self.hello = Some((pid, generation, workers, listeners));
                Ok(())
            }
            Handover::Listener {
                index,
                info,
                sockets,
            } => {
                let announced = self.announced_listeners()?;
                self.check_last_complete()?;
                let expected = u32::try_from(self.listeners.len()).unwrap_or(u32::MAX);
                if index != expected || index >= announced {
                    return Err(HandoverError::Order(format!(
                        "listener {index} where listener {expected} of {announced} was due"
                    )));
                }
                let name = info.name.as_deref().unwrap_or_default();
                let fdname = info.fdname.as_deref().unwrap_or_default();
                if name.len() > MAX_NAME || fdname.len() > MAX_NAME {
                    return Err(HandoverError::Limit(format!(
                        "listener {index}'s name is longer than {MAX_NAME} bytes"
                    )));
                }
                if fdname.contains(':') || fdname.bytes().any(|b| b.is_ascii_control()) {
                    return Err(HandoverError::Limit(format!(
                        "listener {index}'s LISTEN_FDNAMES name {fdname:?} has a ':' or a \
                         control character"
                    )));
                }
                if sockets == 0 || sockets > MAX_SLOTS.saturating_add(1) {
                    return Err(HandoverError::Limit(format!(
                        "listener {index} announces {sockets} sockets (1 to {})",
                        MAX_SLOTS + 1
                    )));
                }
                self.listeners.push(Pending {
                    record: ListenerRecord {
                        info,
                        socket: None,
                        slots: Vec::new(),
                    },
                    expected: sockets,
                });
                Ok(())
            }
            Handover::Socket { listener, slot } => {
                // Owned before anything is checked: every early return closes it.
                let fd = fds.pop().ok_or_else(|| {
                    HandoverError::Order("a Socket frame without its descriptor".into())
                })?;
                let index =
                    u32::try_from(self.listeners.len().saturating_sub(1)).unwrap_or(u32::MAX);
                let Some(Pending {
                    record: l,
                    expected,
                }) = self.listeners.last_mut()
                else {
                    return Err(HandoverError::Order("a Socket before any Listener".into()));
                };
                if listener != index {
                    return Err(HandoverError::Order(format!(
                        "a socket of listener {listener} during listener {index}"
                    )));
                }
                let have = u32::try_from(l.sockets()).unwrap_or(u32::MAX);
                if have >= *expected {
                    return Err(HandoverError::Limit(format!(
                        "listener {index} announced {expected} sockets and sent more"
                    )));
                }
                let what = match slot {
                    None => format!("of listener {index} ({})", l.info.target),
                    Some(s) => format!("of slot {s} of listener {index} ({})", l.info.target),
                };
                let named = |error: io::Error| HandoverError::Socket {
                    what: what.clone(),
                    error,
                };
                match slot {
                    None => {
                        if l.socket.is_some() {
                            return Err(HandoverError::Order(format!(
                                "listener {index}'s own socket twice"
                            )));
                        }
                        // A reuseport reservation is bound, not listening; every other
                        // listener's own socket listens.
                        if l.info.reuseport {
                            listening::check_bound(fd.as_fd()).map_err(named)?;
                        } else {
                            listening::check_listening(fd.as_fd()).map_err(named)?;
                        }
                        l.socket = Some(fd);
                    }
                    Some(s) => {
                        if !l.info.reuseport {
                            return Err(HandoverError::Order(format!(
                                "a slot socket for listener {index}, which is not reuseport"
                            )));
                        }
                        let s = s as usize;
                        if l.slots.iter().any(|(have, _)| *have == s) {
                            return Err(HandoverError::Order(format!(
                                "slot {s} of listener {index} twice"
                            )));
                        }
                        listening::check_listening(fd.as_fd()).map_err(named)?;
                        l.slots.push((s, fd));
                    }
                }
                self.sockets = self.sockets.saturating_add(1);
                Ok(())
            }
            Handover::Done { listeners, sockets } => {
                let announced = self.announced_listeners()?;
                self.check_last_complete()?;
                let got = u32::try_from(self.listeners.len()).unwrap_or(u32::MAX);
                if got != announced || listeners != got || sockets != self.sockets {
                    return Err(HandoverError::Order(format!(
                        "Done after {got} listeners and {} sockets, announced {announced} \
                         listeners, Done says {listeners} and {sockets}",
                        self.sockets
                    )));
                }
                self.done = true;
                Ok(())
            }
            other => Err(HandoverError::Order(format!(
                "{} during the hand-over of the listeners",
                variant_name(&other)
            ))),
        }
    }

    fn announced_listeners(&self) -> Result<u32, HandoverError> {
        self.hello
            .map(|(_, _, _, n)| n)
            .ok_or_else(|| HandoverError::Order("a frame before Hello".into()))
    }

    /// The last listener got every socket it announced.
    fn check_last_complete(&self) -> Result<(), HandoverError> {
        match self.listeners.last() {
            Some(Pending { record, expected }) => {
                let have = u32::try_from(record.sockets()).unwrap_or(u32::MAX);
                if have == *expected {
                    Ok(())
                } else {
                    Err(HandoverError::Order(format!(
                        "listener {} ({}) got {have} of its {expected} sockets",
                        self.listeners.len() - 1,
                        record.info.target,
                    )))
                }
            }
            None => Ok(()),
        }
    }

    /// What arrived, once [`Receiver::is_done`].
    ///
    /// # Errors
    /// [`HandoverError::Order`] when `Done` has not arrived.
    pub fn finish(self) -> Result<Received, HandoverError> {
        if !self.done {
            return Err(HandoverError::Order(
                "the hand-over ended before Done".into(),
            ));
        }
        let Some((pid, generation, workers, _)) = self.hello else {
            return Err(HandoverError::Order("no Hello".into()));
        };
        Ok(Received {
            pid,
            generation,
            workers,
            listeners: self.listeners.into_iter().map(|p| p.record).collect(),
        })
    }
}

fn variant_name(msg: &Handover) -> &'static str {
    match msg {
        Handover::Hello { .. } => "Hello",
        Handover::Listener { .. } => "Listener",
        Handover::Socket { .. } => "Socket",
        Handover::Done { .. } => "Done",
        Handover::Received => "Received",
        Handover::Ready { .. } => "Ready",
        Handover::Failed { .. } => "Failed",
        Handover::TakeOver => "TakeOver",
        Handover::Abort { .. } => "Abort",
        Handover::Serving => "Serving",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channel;
    use crate::message::{BoundAddress, ListenParams};
    use std::net::SocketAddr;

    fn listener() -> (OwnedFd, SocketAddr) {
        let target = ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr"));
        let (fd, address) =
            listening::bind_listener(&target, &ListenParams::default()).expect("bind");
        let BoundAddress::Tcp(addr) = address else {
            panic!("tcp");
        };
        (fd, addr)
    }

    fn hello(listeners: u32) -> Handover {
        Handover::Hello {
            pid: 1,
            generation: 3,
            workers: 2,
            listeners,
        }
    }

    fn info(addr: SocketAddr, name: &str) -> ListenerInfo {
        ListenerInfo {
            target: ListenTarget::Tcp(addr),
            ordinal: 0,
            name: Some(name.into()),
            fdname: Some(name.into()),
            pinned: true,
            owned: true,
            reuseport: false,
        }
    }

    fn meta(index: u32, addr: SocketAddr, sockets: u32) -> Handover {
        Handover::Listener {
            index,
            info: info(addr, "web"),
            sockets,
        }
    }

    #[test]
    fn a_whole_hand_over_is_received() {
        let (a, addr_a) = listener();
        let (b, addr_b) = listener();
        let mut r = Receiver::new();
        r.take(hello(2), vec![]).expect("hello");
        r.take(meta(0, addr_a, 1), vec![]).expect("meta");
        r.take(
            Handover::Socket {
                listener: 0,
                slot: None,
            },
            vec![a],
        )
        .expect("socket");
        r.take(meta(1, addr_b, 1), vec![]).expect("meta");
        r.take(
            Handover::Socket {
                listener: 1,
                slot: None,
            },
            vec![b],
        )
        .expect("socket");
        r.take(
            Handover::Done {
                listeners: 2,
                sockets: 2,
            },
            vec![],
        )
        .expect("done");
        let got = r.finish().expect("finish");
        assert_eq!(got.generation, 3);
        assert_eq!(got.listeners.len(), 2);
        let second = &got.listeners[1];
        assert_eq!(second.info, info(addr_b, "web"));
        assert_eq!(second.sockets(), 1);
        let socket = second.socket.as_ref().expect("its socket").as_fd();
        assert_eq!(
            listening::check_listening(socket).expect("listening"),
            BoundAddress::Tcp(addr_b)
        );
    }

    /// The `Listener` frame as version 1 has always sent it, field by field.
    #[derive(Serialize)]
    enum Version1 {
        #[allow(dead_code)]
        Hello,
        Listener {
            index: u32,
            target: ListenTarget,
            ordinal: u32,
            name: String,
            fdname: String,
            pinned: bool,
            owned: bool,
            reuseport: bool,
            sockets: u32,
        },
    }

    #[test]
    fn the_listener_frame_is_what_version_1_sent() {
        let addr: SocketAddr = "127.0.0.1:8124".parse().expect("addr");
        let now = Handover::Listener {
            index: 2,
            info: ListenerInfo {
                ordinal: 1,
                reuseport: true,
                ..info(addr, "web")
            },
            sockets: 3,
        };
        let then = Version1::Listener {
            index: 2,
            target: ListenTarget::Tcp(addr),
            ordinal: 1,
            name: "web".into(),
            fdname: "web".into(),
            pinned: true,
            owned: true,
            reuseport: true,
            sockets: 3,
        };
        let now_bytes = postcard::to_stdvec(&now).expect("encode");
        assert_eq!(now_bytes, postcard::to_stdvec(&then).expect("encode"));
        let back: Handover = postcard::from_bytes(&now_bytes).expect("decode");
        assert_eq!(back, now);
    }

    #[test]
    fn a_name_left_out_travels_empty_and_arrives_left_out() {
        let addr: SocketAddr = "127.0.0.1:8124".parse().expect("addr");
        let unnamed = ListenerInfo {
            name: None,
            fdname: None,
            ..info(addr, "x")
        };
        let bytes = postcard::to_stdvec(&unnamed).expect("encode");
        let back: ListenerInfo = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, unnamed);
        let empty = Version1::Listener {
            index: 0,
            target: ListenTarget::Tcp(addr),
            ordinal: 0,
            name: String::new(),
            fdname: String::new(),
            pinned: true,
            owned: true,
            reuseport: false,
            sockets: 1,
        };
        let back: Handover =
            postcard::from_bytes(&postcard::to_stdvec(&empty).expect("encode")).expect("decode");
        let Handover::Listener { info: got, .. } = back else {
            panic!("a listener frame");
        };
        assert_eq!(got, unnamed);
    }

    #[test]
    fn a_record_counts_its_own_socket_and_its_slots() {
        let (a, addr) = listener();
        let (b, _) = listener();
        let one = ListenerRecord::new(info(addr, "web"), a);
        assert_eq!(one.sockets(), 1);
        let slots_only = ListenerRecord {
            info: ListenerInfo {
                reuseport: true,
                ..info(addr, "web")
            },
            socket: None,
            slots: vec![(1, b)],
        };
        assert_eq!(slots_only.sockets(), 1);
    }

    #[test]
    fn a_short_or_disordered_hand_over_is_refused() {
        let (a, addr) = listener();
        // Before Hello.
        let mut r = Receiver::new();
        assert!(matches!(
            r.take(meta(0, addr, 1), vec![]),
            Err(HandoverError::Order(_))
        ));
        // Done while a listener still misses its socket.
        let mut r = Receiver::new();
        r.take(hello(1), vec![]).expect("hello");
        r.take(meta(0, addr, 1), vec![]).expect("meta");
        let err = r
            .take(
                Handover::Done {
                    listeners: 1,
                    sockets: 0,
                },
                vec![],
            )
            .expect_err("short");
        assert!(err.to_string().contains("got 0 of its 1 sockets"), "{err}");
        // Truncated: no Done.
        assert!(r.finish().is_err());
        // A listener index skipped.
        let mut r = Receiver::new();
        r.take(hello(2), vec![]).expect("hello");
        assert!(r.take(meta(1, addr, 1), vec![]).is_err());
        // More sockets than announced.
        let mut r = Receiver::new();
        r.take(hello(1), vec![]).expect("hello");
        r.take(meta(0, addr, 1), vec![]).expect("meta");
        let dup = a.try_clone().expect("dup");
        r.take(
            Handover::Socket {
                listener: 0,
                slot: None,
            },
            vec![a],
        )
        .expect("socket");
        assert!(matches!(
            r.take(
                Handover::Socket {
                    listener: 0,
                    slot: Some(1)
                },
                vec![dup]
            ),
            Err(HandoverError::Limit(_))
        ));
        // Over the limits.
        let mut r = Receiver::new();
        assert!(matches!(
            r.take(hello(MAX_LISTENERS + 1), vec![]),
            Err(HandoverError::Limit(_))
        ));
        let mut r = Receiver::new();
        r.take(hello(1), vec![]).expect("hello");
        let long = Handover::Listener {
            index: 0,
            info: ListenerInfo {
                name: Some("x".repeat(MAX_NAME + 1)),
                ..info(addr, "x")
            },
            sockets: 1,
        };
        assert!(matches!(r.take(long, vec![]), Err(HandoverError::Limit(_))));
        // A later phase's frame.
        let mut r = Receiver::new();
        assert!(r.take(Handover::TakeOver, vec![]).is_err());
    }

    #[test]
    fn a_descriptor_that_is_not_a_listening_socket_is_named_and_closed() {
        let (_keep, addr) = listener();
        let (r_pipe, w) = nix::unistd::pipe().expect("pipe");
        let mut r = Receiver::new();
        r.take(hello(1), vec![]).expect("hello");
        r.take(meta(0, addr, 1), vec![]).expect("meta");
        let err = r
            .take(
                Handover::Socket {
                    listener: 0,
                    slot: None,
                },
                vec![r_pipe],
            )
            .expect_err("a pipe");
        assert!(err.to_string().contains("of listener 0"), "{err}");
        // The read end is gone: writing fails with EPIPE.
        assert_eq!(nix::unistd::write(&w, b"x"), Err(nix::errno::Errno::EPIPE));
    }

    #[tokio::test]
    async fn many_listeners_with_long_names_cross_a_channel() {
        let (old, new) = Channel::pair().expect("pair");
        let n = 150u32;
        let mut keep = Vec::new();
        let sender = async {
            old.send(&hello(n), &[]).await.expect("hello");
            for i in 0..n {
                let (fd, addr) = listener();
                let m = Handover::Listener {
                    index: i,
                    info: ListenerInfo {
                        name: Some(format!("{i}-{}", "n".repeat(1000))),
                        fdname: Some(format!("listener{i}")),
                        ..info(addr, "x")
                    },
                    sockets: 1,
                };
                old.send(&m, &[]).await.expect("meta");
                old.send(
                    &Handover::Socket {
                        listener: i,
                        slot: None,
                    },
                    &[fd.as_fd()],
                )
                .await
                .expect("socket");
                keep.push(fd);
            }
            old.send(
                &Handover::Done {
                    listeners: n,
                    sockets: n,
                },
                &[],
            )
            .await
            .expect("done");
        };
        let receiver = async {
            let mut r = Receiver::new();
            while !r.is_done() {
                let (msg, fds) = new.recv::<Handover>().await.expect("recv").expect("open");
                r.take(msg, fds).expect("valid");
            }
            r.finish().expect("finish")
        };
        let ((), got) = tokio::join!(sender, receiver);
        assert_eq!(got.listeners.len(), n as usize);
        assert!(
            got.listeners[149]
                .info
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("149-"))
        );
        assert!(got.listeners.iter().all(|l| l.socket.is_some()));
    }
}
