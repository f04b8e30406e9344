//! Frame encoding: one version byte ([`Frame::VERSION`]) followed by the postcard encoding of a
//! [`Frame`].
//!
//! Decoding checks, in this order, the size limit, the version byte, the enum variant index and
//! then the body, so each kind of bad input gets its own [`CodecError`].

use crate::message::Frame;
#[cfg(test)]
use crate::message::PROTOCOL_VERSION;

/// Largest frame accepted by default (64 KiB). Control messages are far smaller.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The frame is larger than the limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the frame.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The frame ended before the message did.
    #[error("truncated {kind} frame: the message ends after {len} bytes")]
    Truncated {
        /// Message type expected.
        kind: &'static str,
        /// Bytes the frame had.
        len: usize,
    },
    /// The frame names a message this side does not know.
    #[error("unknown {kind} variant {index} (this side knows {known})")]
    UnknownVariant {
        /// Message type expected.
        kind: &'static str,
        /// Variant index found in the frame.
        index: u64,
        /// Number of variants this side knows.
        known: u32,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {theirs}, this side speaks {ours}")]
    VersionMismatch {
        /// Our version ([`PROTOCOL_VERSION`](crate::message::PROTOCOL_VERSION) for the worker
        /// protocol).
        ours: u8,
        /// The version byte found in the frame.
        theirs: u8,
    },
    /// The body does not decode as the message type.
    #[error("malformed {kind} frame: {detail}")]
    Malformed {
        /// Message type expected.
        kind: &'static str,
        /// What the decoder said.
        detail: String,
    },
}

/// Encodes `msg` into `out` (cleared first), refusing frames larger than `max`.
///
/// # Errors
/// [`CodecError::TooLarge`] when the encoding exceeds `max`; [`CodecError::Malformed`] if serde
/// cannot serialize the value.
pub fn encode_into<M: Frame>(msg: &M, out: &mut Vec<u8>, max: usize) -> Result<(), CodecError> {
    out.clear();
    out.push(M::VERSION);
    let body =
        postcard::to_extend(msg, std::mem::take(out)).map_err(|e| CodecError::Malformed {
            kind: M::NAME,
            detail: e.to_string(),
        })?;
    *out = body;
    if out.len() > max {
        return Err(CodecError::TooLarge {
            size: out.len(),
            max,
        });
    }
    Ok(())
}

/// Encodes `msg` as a new frame, refusing frames larger than `max`.
///
/// ```
/// use netcluster_protocol::codec::{decode, encode, DEFAULT_MAX_FRAME};
/// use netcluster_protocol::message::ToWorker;
///
/// let msg = ToWorker::Shutdown { drain_timeout_ms: 10_000 };
/// let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
/// assert_eq!(decode::<ToWorker>(&frame, DEFAULT_MAX_FRAME).unwrap(), msg);
/// ```
///
/// # Errors
/// As [`encode_into`].
pub fn encode<M: Frame>(msg: &M, max: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, &mut out, max)?;
    Ok(out)
}

/// Decodes one frame.
///
/// # Errors
/// Every [`CodecError`] but `TooLarge` on the encode side: too large, empty or truncated,
/// version mismatch, unknown variant, malformed body or trailing bytes.
pub fn decode<M: Frame>(frame: &[u8], max: usize) -> Result<M, CodecError> {
    if frame.len() > max {
        return Err(CodecError::TooLarge {
            size: frame.len(),
            max,
        });
    }
    let Some((&version, body)) = frame.split_first() else {
        return Err(CodecError::Truncated {
            kind: M::NAME,
            len: 0,
        });
    };
    if version != M::VERSION {
        return Err(CodecError::VersionMismatch {
            ours: M::VERSION,
            theirs: version,
        });
    }
    match read_varint(body) {
        None => {
            return Err(CodecError::Truncated {
                kind: M::NAME,
                len: frame.len(),
            });
        }
        Some(index) if index >= u64::from(M::VARIANTS) => {
            return Err(CodecError::UnknownVariant {
                kind: M::NAME,
                index,
                known: M::VARIANTS,
            });
        }
        Some(_) => {}
    }
    match postcard::take_from_bytes::<M>(body) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(CodecError::Malformed {
            kind: M::NAME,
            detail: format!("{} trailing bytes after the message", rest.len()),
        }),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(CodecError::Truncated {
            kind: M::NAME,
            len: frame.len(),
        }),
        Err(e) => Err(CodecError::Malformed {
            kind: M::NAME,
            detail: e.to_string(),
        }),
    }
}

/// Reads postcard's LEB128 varint (the enum variant index); `None` if the bytes end first or it
/// runs past ten bytes.
fn read_varint(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{
        BoundAddress, Grant, HandleKind, ListenKey, ListenParams, ListenTarget, ToPrimary, ToWorker,
    };

    const MAX: usize = DEFAULT_MAX_FRAME;

    fn all_messages() -> (Vec<ToPrimary>, Vec<ToWorker>) {
        let key = ListenKey {
            target: ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")),
            ordinal: 2,
        };
        (
            vec![
                ToPrimary::Hello {
                    version: PROTOCOL_VERSION,
                    pid: 42,
                    worker_id: 7,
                },
                ToPrimary::Listen {
                    seq: 9,
                    key: key.clone(),
                    params: ListenParams::default(),
                },
                ToPrimary::Close { key },
                ToPrimary::Message {
                    data: vec![1, 2, 3],
                    handle: None,
                },
                ToPrimary::Disconnect,
                ToPrimary::Stopping { signal: 15 },
                ToPrimary::CountReply { seq: 1, count: 2 },
                ToPrimary::Accepted {
                    listener: 2,
                    accepted: vec![5, 6],
                    refused: vec![7],
                },
                ToPrimary::CountRequest {
                    seq: 3,
                    key: ListenKey {
                        target: ListenTarget::Fd(3),
                        ordinal: 0,
                    },
                },
                ToPrimary::Pong { seq: 11 },
                ToPrimary::Stats {
                    seq: 12,
                    listeners: vec![crate::message::ListenerStats {
                        key: ListenKey {
                            target: ListenTarget::Unix("/run/x.sock".into()),
                            ordinal: 0,
                        },
                        open: 3,
                        served: u64::MAX,
                    }],
                },
            ],
            vec![
                ToWorker::Welcome {
                    version: PROTOCOL_VERSION,
                    drain_timeout_ms: 10_000,
                },
                ToWorker::ListenOk {
                    seq: 9,
                    address: BoundAddress::Unix("/tmp/x.sock".into()),
                    grant: Grant::RoundRobin { listener: 2 },
                },
                ToWorker::ListenErr {
                    seq: 9,
                    address: "127.0.0.1:8124".into(),
                    errno: 98,
                    message: "Address already in use".into(),
                },
                ToWorker::Shutdown {
                    drain_timeout_ms: 1,
                },
                ToWorker::Message { data: Vec::new() },
                ToWorker::Handle {
                    data: vec![7],
                    kind: HandleKind::Socket { origin: Some(3) },
                },
                ToWorker::CountSent { seq: 8, origin: 3 },
                ToWorker::Connections {
                    listener: 2,
                    seqs: vec![5],
                    expires_ms: 1234,
                },
                ToWorker::CountQuery {
                    seq: 4,
                    key: ListenKey {
                        target: ListenTarget::TcpAny(80),
                        ordinal: 0,
                    },
                },
                ToWorker::CountResult {
                    seq: 4,
                    result: Err(crate::message::CountError::WorkerExited { worker: 2 }),
                },
                ToWorker::Ping { seq: 1 },
                ToWorker::StatsQuery { seq: 2 },
            ],
        )
    }

    #[test]
    fn every_message_round_trips() {
        let (up, down) = all_messages();
        assert_eq!(up.len() as u32, ToPrimary::VARIANTS);
        assert_eq!(down.len() as u32, ToWorker::VARIANTS);
        for m in up {
            assert_eq!(
                decode::<ToPrimary>(&encode(&m, MAX).expect("enc"), MAX),
                Ok(m)
            );
        }
        for m in down {
            assert_eq!(
                decode::<ToWorker>(&encode(&m, MAX).expect("enc"), MAX),
                Ok(m)
            );
        }
    }

    #[test]
    fn a_workers_message_with_a_handle_round_trips_and_declares_its_descriptor() {
        let plain = ToPrimary::Message {
            data: vec![1],
            handle: None,
        };
        assert_eq!(plain.fd_count(), 0);
        for kind in [
            HandleKind::Server {
                address: BoundAddress::Tcp("127.0.0.1:8124".parse().expect("addr")),
            },
            HandleKind::Socket { origin: None },
        ] {
            let m = ToPrimary::Message {
                data: vec![4],
                handle: Some(kind),
            };
            assert_eq!(m.fd_count(), 1);
            assert_eq!(
                decode::<ToPrimary>(&encode(&m, MAX).expect("enc"), MAX),
                Ok(m)
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let m = ToWorker::ListenErr {
            seq: 1,
            address: String::new(),
            errno: 0,
            message: "x".repeat(200),
        };
        assert!(matches!(
            encode(&m, 100),
            Err(CodecError::TooLarge { max: 100, .. })
        ));
        let frame = encode(&m, MAX).expect("enc");
        let err = decode::<ToWorker>(&frame, 100).expect_err("too large");
        assert_eq!(
            err.to_string(),
            format!(
                "frame of {} bytes exceeds the limit of 100 bytes",
                frame.len()
            )
        );
    }

    #[test]
    fn truncated_frames_say_so() {
        let m = ToPrimary::Hello {
            version: PROTOCOL_VERSION,
            pid: 123_456,
            worker_id: 1,
        };
        let frame = encode(&m, MAX).expect("enc");
        for cut in 0..frame.len() {
            let err = decode::<ToPrimary>(&frame[..cut], MAX).expect_err("truncated");
            assert!(
                matches!(err, CodecError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn unknown_variant_is_named() {
        let frame = [PROTOCOL_VERSION, 19, 0, 0];
        let err = decode::<ToWorker>(&frame, MAX).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown ToWorker variant 19 (this side knows 12)"
        );
    }

    #[test]
    fn version_mismatch_is_named() {
        let mut frame = encode(
            &ToWorker::Shutdown {
                drain_timeout_ms: 5,
            },
            MAX,
        )
        .expect("enc");
        frame[0] = PROTOCOL_VERSION + 1;
        let err = decode::<ToWorker>(&frame, MAX).expect_err("version");
        assert_eq!(
            err,
            CodecError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            }
        );
    }

    #[test]
    fn garbage_never_panics_and_always_errors_or_decodes() {
        // A small deterministic generator (xorshift) instead of a dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len % 40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode::<ToWorker>(&bytes, MAX);
            let _ = decode::<ToPrimary>(&bytes, MAX);
        }
        let err = decode::<ToPrimary>(&[PROTOCOL_VERSION, 0, 0xff, 0xff], MAX).expect_err("bad");
        assert!(
            matches!(
                err,
                CodecError::Malformed { .. } | CodecError::Truncated { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode(
            &ToWorker::Shutdown {
                drain_timeout_ms: 5,
            },
            MAX,
        )
        .expect("enc");
        frame.push(0);
        let err = decode::<ToWorker>(&frame, MAX).expect_err("trailing");
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    }
}
