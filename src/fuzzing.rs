//! The fuzz targets' harnesses (`fuzz/` runs them under libFuzzer with a nightly toolchain;
//! `tests/fuzz_corpus.rs` replays the checked-in corpus and random inputs through the same
//! functions on stable). Each returns normally for every input; a panic is a finding.

use std::os::fd::{AsFd, AsRawFd};

use crate::cluster::control;
use crate::protocol::Channel;
use crate::protocol::codec::{self, DEFAULT_MAX_FRAME};
use crate::protocol::message::{ToPrimary, ToWorker};

/// Decodes `data` as each message type; a message that decodes must encode to a frame that
/// decodes to the same message.
pub fn decode_frames(data: &[u8]) {
    if let Ok(m) = codec::decode::<ToPrimary>(data, DEFAULT_MAX_FRAME) {
        let again = codec::encode(&m, DEFAULT_MAX_FRAME).expect("a decoded message encodes");
        assert_eq!(codec::decode::<ToPrimary>(&again, DEFAULT_MAX_FRAME), Ok(m));
    }
    if let Ok(m) = codec::decode::<ToWorker>(data, DEFAULT_MAX_FRAME) {
        let again = codec::encode(&m, DEFAULT_MAX_FRAME).expect("a decoded message encodes");
        assert_eq!(codec::decode::<ToWorker>(&again, DEFAULT_MAX_FRAME), Ok(m));
    }
}

struct ChannelRig {
    _rt: tokio::runtime::Runtime,
    sender: Channel,
    receiver: Channel,
    pipe: std::os::fd::OwnedFd,
}

thread_local! {
    static RIG: std::cell::RefCell<Option<ChannelRig>> = const { std::cell::RefCell::new(None) };
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The channel's receive path with what a worker can send: the first byte picks how many
/// descriptors (0 to 63; past 16 the receiver's control buffer truncates them) ride with the
/// rest of the input, sent as one datagram. Whatever arrives, no descriptor may stay open.
pub fn channel_receive(data: &[u8]) {
    let Some((&n, payload)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(n % 64);
    RIG.with(|rig| {
        let mut rig = rig.borrow_mut();
        let rig = rig.get_or_insert_with(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let (sender, receiver) = {
                let _guard = rt.enter();
                Channel::pair().expect("channel pair")
            };
            let (r, _w) = nix::unistd::pipe().expect("pipe");
            ChannelRig {
                _rt: rt,
                sender,
                receiver,
                pipe: r,
            }
        });
        let before = open_fds();
        let fds: Vec<i32> = (0..nfds).map(|_| rig.pipe.as_raw_fd()).collect();
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let sent = nix::sys::socket::sendmsg::<()>(
            rig.sender.as_fd().as_raw_fd(),
            &[std::io::IoSlice::new(payload)],
            if fds.is_empty() { &[] } else { &cmsg },
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            None,
        );
        if sent.is_err() {
            return;
        }
        match rig.receiver.recv_now::<ToPrimary>() {
            Ok(Some((msg, fds))) => {
                // Only a message that declares no descriptor may arrive, with none.
                assert!(fds.is_empty(), "{msg:?} came with descriptors");
            }
            Ok(None) => {}
            Err(e) => {
                // A bad frame leaves the channel usable; only I/O errors end it.
                let _ = e.is_bad_frame();
            }
        }
        assert_eq!(open_fds(), before, "a received descriptor stayed open");
    });
}

/// One control request line: what parses must serialize back to the same request.
pub fn control_request(data: &[u8]) {
    if let Ok(req) = control::parse_request(data) {
        let again = serde_json::to_vec(&control::Envelope {
            version: control::CONTROL_VERSION,
            request: req.clone(),
        })
        .expect("a request serializes");
        assert_eq!(control::parse_request(&again), Ok(req));
    }
}

/// One `--listen` value (never resolving host names): no panic, a Unix path that is accepted
/// fits in `sun_path`, and a `systemd:NAME` accepted has a name systemd could have given.
pub fn listen_value(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if s == "systemd" || s.starts_with("systemd:") {
        // Never resolves: `systemd[:NAME]` is decided before any address is parsed.
        if let Ok(crate::cli::ListenSpec::Systemd(Some(name))) = crate::cli::parse_listen_spec(s) {
            assert!(!name.is_empty() && name.len() <= 255 && !name.contains(':'));
        }
        return;
    }
    let parsed = crate::cli::parse_listen_with(s, |_, _| Err("no resolver here".into()));
    if let Ok(crate::protocol::message::ListenTarget::Unix(p)) = parsed {
        assert!(p.as_os_str().len() <= crate::protocol::listening::MAX_UNIX_PATH);
    }
}
