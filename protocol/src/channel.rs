//! An async message channel over a `SOCK_SEQPACKET` Unix socket.
//!
//! One message is one datagram, and the descriptors sent with it ride in that same datagram, so
//! they can never be detached from their bytes (a hazard of fd passing over `SOCK_STREAM`).
//! The socket is registered with tokio through [`AsyncFd`]; each operation first tries the
//! system call directly and only waits for readiness when the kernel says `EAGAIN`, so a
//! message costs one `sendmsg` and one `recvmsg` when the other side keeps up.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::codec::{self, CodecError, DEFAULT_MAX_FRAME};
use crate::fd::{self, MAX_FDS_PER_MESSAGE};
use crate::message::Frame;

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("channel I/O error: {0}")]
    Io(io::Error),
    /// The frame could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The kernel dropped descriptors because the control buffer was too small (or the receiver
    /// hit `RLIMIT_NOFILE`).
    #[error(
        "descriptors were truncated in transit (MSG_CTRUNC); {received} arrived and were closed"
    )]
    ControlTruncated {
        /// How many descriptors did arrive (all closed).
        received: usize,
    },
    /// The message declares a different number of descriptors than arrived with it.
    #[error("{kind} message declares {declared} file descriptors but {received} arrived")]
    FdCountMismatch {
        /// Message type.
        kind: &'static str,
        /// What the message says.
        declared: usize,
        /// What arrived (all closed).
        received: usize,
    },
    /// The descriptor that came with a message is not what the message says it is (the
    /// receiver checks it after [`Channel::recv`] and closes it).
    #[error("the handle sent with a {kind} message is refused: {detail}")]
    BadHandle {
        /// Message type.
        kind: &'static str,
        /// What the descriptor is instead.
        detail: String,
    },
    /// The descriptor handed to [`Channel::from_fd`] is not a Unix `SOCK_SEQPACKET` socket.
    #[error("fd {fd} is not a Unix SOCK_SEQPACKET socket: {detail}")]
    NotSeqPacket {
        /// The descriptor number.
        fd: i32,
        /// What it is instead.
        detail: String,
    },
}

// By hand rather than `#[from]`, which would also make the I/O error the `source`: the message
// already says it, and an error chain would say it twice.
impl From<io::Error> for ChannelError {
    fn from(e: io::Error) -> ChannelError {
        ChannelError::Io(e)
    }
}

impl ChannelError {
    /// True when the error is about one bad frame and the channel can go on being used.
    pub fn is_bad_frame(&self) -> bool {
        matches!(
            self,
            ChannelError::Codec(_)
                | ChannelError::ControlTruncated { .. }
                | ChannelError::FdCountMismatch { .. }
                | ChannelError::BadHandle { .. }
        )
    }
}

/// One end of a primary↔worker channel.
///
/// `send` and `recv` take `&self`, so one task can receive while others send.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use netcluster_protocol::channel::Channel;
/// use netcluster_protocol::message::ToWorker;
///
/// let (primary, worker) = Channel::pair()?;
/// primary.send(&ToWorker::Shutdown { drain_timeout_ms: 1000 }, &[]).await?;
/// let (msg, fds) = worker.recv::<ToWorker>().await?.expect("not closed");
/// assert_eq!(msg, ToWorker::Shutdown { drain_timeout_ms: 1000 });
/// assert!(fds.is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Channel {
    io: AsyncFd<OwnedFd>,
    max_frame: usize,
    send_buf: Mutex<Vec<u8>>,
    recv_buf: Mutex<Vec<u8>>,
}

/// A connected `SOCK_SEQPACKET` socketpair, both ends `CLOEXEC | NONBLOCK`.
///
/// # Errors
/// The error of `socketpair(2)`.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

impl Channel {
    /// Two connected channel ends (for tests and in-process use).
    ///
    /// # Errors
    /// The error of `socketpair(2)`, or of registering with tokio (no runtime).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = seqpacket_pair()?;
        Ok((Channel::new(a)?, Channel::new(b)?))
    }

    /// Wraps a descriptor known to be a non-blocking `SOCK_SEQPACKET` socket.
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel {
            io: fd::register_async(fd, Interest::READABLE | Interest::WRITABLE)?,
            max_frame: DEFAULT_MAX_FRAME,
            send_buf: Mutex::new(Vec::with_capacity(256)),
            recv_buf: Mutex::new(vec![0; DEFAULT_MAX_FRAME]),
        })
    }

    /// Adopts a descriptor (one inherited from the primary, say) after checking that it is a
    /// Unix `SOCK_SEQPACKET` socket; sets `O_NONBLOCK` and `FD_CLOEXEC` on it.
    ///
    /// # Errors
    /// [`ChannelError::NotSeqPacket`] naming the descriptor when it is not such a socket (a
    /// closed descriptor, a file, a TCP socket); I/O errors from `fcntl` or tokio.
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, ChannelError> {
        let raw = fd.as_raw_fd();
        let not = |detail: String| ChannelError::NotSeqPacket { fd: raw, detail };
        let sock = SockRef::from(&fd);
        let ty = sock.r#type().map_err(|e| not(e.to_string()))?;
        if ty != socket2::Type::SEQPACKET {
            return Err(not(format!("its type is {ty:?}")));
        }
        let domain = sock.domain().map_err(|e| not(e.to_string()))?;
        if domain != socket2::Domain::UNIX {
            return Err(not(format!("its family is {domain:?}")));
        }
        let fl = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
        fcntl(&fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
        Ok(Channel::new(fd)?)
    }

    /// Sets the largest frame this end sends or accepts (default
    /// [`DEFAULT_MAX_FRAME`]).
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.max_frame = max.max(16);
        self.recv_buf = Mutex::new(vec![0; self.max_frame]);
        self
    }

    /// Sends `msg` with `fds` (duplicated into the peer; the caller keeps its copies).
    ///
    /// # Errors
    /// [`ChannelError::FdCountMismatch`] when `fds.len()` differs from what `msg` declares,
    /// [`ChannelError::Codec`] for an oversized frame, [`ChannelError::Io`] when the socket
    /// fails (`EPIPE`: the peer is gone).
    ///
    /// # Cancel safety
    /// Cancel safe: the message and its descriptors go out in one `sendmsg` of one datagram,
    /// made in the same poll that finds the socket writable, so a dropped future has sent
    /// either all of it or nothing (it was waiting for room in the socket's buffer). Dropping
    /// it therefore loses the message, never a part of it.
    pub async fn send<M: Frame>(
        &self,
        msg: &M,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        if msg.fd_count() != fds.len() {
            return Err(ChannelError::FdCountMismatch {
                kind: M::NAME,
                declared: msg.fd_count(),
                received: fds.len(),
            });
        }
        let frame = {
            let mut buf = lock(&self.send_buf);
            codec::encode_into(msg, &mut buf, self.max_frame)?;
            std::mem::take(&mut *buf)
        };
        let result = self.send_frame(&frame, fds).await;
        *lock(&self.send_buf) = frame;
        result
    }

    async fn send_frame(&self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        match fd::send_with_fds(self.io.get_ref().as_fd(), frame, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other.map(drop).map_err(Into::into),
        }
        loop {
            let mut guard = self.io.writable().await?;
            match guard.try_io(|io| fd::send_with_fds(io.get_ref().as_fd(), frame, fds)) {
                Ok(result) => return result.map(drop).map_err(Into::into),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives the next message and the descriptors that came with it; `Ok(None)` when the
    /// peer has closed its end.
    ///
    /// # Errors
    /// A bad frame ([`ChannelError::is_bad_frame`]): it is consumed, every descriptor that came
    /// with it is closed, and the channel can be read on. [`ChannelError::Io`] when the socket
    /// fails.
    ///
    /// # Cancel safety
    /// Cancel safe (it is awaited in `tokio::select!` by the primary's reader of each worker):
    /// the only await is for readiness, and the datagram is received, decoded and returned in
    /// one synchronous step of the poll that finds it, so a dropped future has taken nothing
    /// from the socket; the next `recv` gets the message.
    pub async fn recv<M: Frame>(&self) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        // No speculative receive first: the reactor's readiness is still set after the last
        // message, so `readable` returns at once when something may be queued, and a receive
        // that finds nothing clears it. A speculative one cost a second `EAGAIN` `recvmsg` per
        // message (benches/compare: 3 `recvmsg` per round-robin hand-off in the primary, 2
        // without it).
        loop {
            let mut guard = self.io.readable().await?;
            match guard.try_io(|_| match self.try_recv::<M>() {
                Err(ChannelError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
                other => Ok(other),
            }) {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    fn try_recv<M: Frame>(&self) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        let mut buf = lock(&self.recv_buf);
        let got = fd::recv_with_fds(self.io.get_ref().as_fd(), &mut buf, MAX_FDS_PER_MESSAGE)?;
        // From here on every descriptor is owned by `got.fds`: each early return closes them.
        if got.len == 0 && got.fds.is_empty() && !got.control_truncated {
            return Ok(None);
        }
        if got.truncated || got.len > self.max_frame {
            return Err(CodecError::TooLarge {
                size: got.len,
                max: self.max_frame,
            }
            .into());
        }
        if got.control_truncated {
            return Err(ChannelError::ControlTruncated {
                received: got.fds.len(),
            });
        }
        let msg: M = codec::decode(&buf[..got.len], self.max_frame)?;
        if msg.fd_count() != got.fds.len() {
            return Err(ChannelError::FdCountMismatch {
                kind: M::NAME,
                declared: msg.fd_count(),
                received: got.fds.len(),
            });
        }
        Ok(Some((msg, got.fds)))
    }

    /// One receive without waiting: what [`Channel::recv`] would return, or
    /// `Err(ChannelError::Io(WouldBlock))` when nothing is queued (for the fuzzers, which drive
    /// the receive path without a reactor loop).
    ///
    /// # Errors
    /// As [`Channel::recv`].
    #[doc(hidden)]
    pub fn recv_now<M: Frame>(&self) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        self.try_recv()
    }

    /// Sends raw bytes with descriptors, bypassing the codec (for tests of the receiving side's
    /// checks).
    ///
    /// # Errors
    /// The error of `sendmsg(2)`.
    #[doc(hidden)]
    pub async fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        self.send_frame(bytes, fds).await
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these buffers leaves nothing inconsistent: they are scratch space.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BoundAddress, Grant, PROTOCOL_VERSION, ToPrimary, ToWorker};
    use std::io::{Read, Write};

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe2");
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    /// True once every copy of the pipe's read end is closed: writing then fails with EPIPE
    /// (Rust ignores SIGPIPE).
    fn read_end_closed(w: &std::fs::File) -> bool {
        matches!((&*w).write(b"x"), Err(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }

    #[tokio::test]
    async fn message_with_fd_round_trips() {
        let (a, b) = Channel::pair().expect("pair");
        let (r, mut w) = pipe();
        let msg = ToWorker::ListenOk {
            seq: 3,
            address: BoundAddress::Tcp("127.0.0.1:80".parse().expect("addr")),
            grant: Grant::Shared,
        };
        a.send(&msg, &[r.as_fd()]).await.expect("send");
        let (got, fds) = b.recv::<ToWorker>().await.expect("recv").expect("open");
        assert_eq!(got, msg);
        w.write_all(b"ok").expect("write");
        drop(w);
        let mut s = String::new();
        std::fs::File::from(fds.into_iter().next().expect("fd"))
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "ok");
    }

    #[tokio::test]
    async fn declared_count_is_enforced_on_send() {
        let (a, _b) = Channel::pair().expect("pair");
        let err = a
            .send(
                &ToWorker::ListenOk {
                    seq: 1,
                    address: BoundAddress::Unix("/x".into()),
                    grant: Grant::Shared,
                },
                &[],
            )
            .await
            .expect_err("missing fd");
        assert!(matches!(
            err,
            ChannelError::FdCountMismatch {
                declared: 1,
                received: 0,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn fds_on_a_message_that_declares_none_are_closed() {
        let (a, b) = Channel::pair().expect("pair");
        let (r, w) = pipe();
        let frame = codec::encode(
            &ToWorker::Shutdown {
                drain_timeout_ms: 1,
            },
            1024,
        )
        .expect("enc");
        a.send_raw(&frame, &[r.as_fd(), r.as_fd()])
            .await
            .expect("send");
        drop(r);
        let err = b.recv::<ToWorker>().await.expect_err("mismatch");
        assert!(err.is_bad_frame());
        assert_eq!(
            err.to_string(),
            "ToWorker message declares 0 file descriptors but 2 arrived"
        );
        assert!(read_end_closed(&w), "received fds must be closed");
        // The channel goes on working after a bad frame.
        a.send(
            &ToWorker::Shutdown {
                drain_timeout_ms: 2,
            },
            &[],
        )
        .await
        .expect("send");
        let (m, _) = b.recv::<ToWorker>().await.expect("recv").expect("open");
        assert_eq!(
            m,
            ToWorker::Shutdown {
                drain_timeout_ms: 2
            }
        );
    }

    #[tokio::test]
    async fn garbage_with_an_fd_is_an_error_and_closes_the_fd() {
        let (a, b) = Channel::pair().expect("pair");
        let (r, w) = pipe();
        a.send_raw(&[PROTOCOL_VERSION, 200, 1, 2, 3], &[r.as_fd()])
            .await
            .expect("send");
        drop(r);
        let err = b.recv::<ToPrimary>().await.expect_err("garbage");
        assert!(err.is_bad_frame(), "{err}");
        assert!(read_end_closed(&w), "received fd must be closed");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_by_the_receiver() {
        let (a, b) = Channel::pair().expect("pair");
        let b = b.with_max_frame(64);
        a.send_raw(&[0u8; 1000], &[]).await.expect("send");
        let err = b.recv::<ToWorker>().await.expect_err("too large");
        assert_eq!(
            err.to_string(),
            "frame of 1000 bytes exceeds the limit of 64 bytes"
        );
    }

    #[tokio::test]
    async fn closed_peer_is_none() {
        let (a, b) = Channel::pair().expect("pair");
        drop(a);
        assert!(b.recv::<ToWorker>().await.expect("recv").is_none());
    }

    #[tokio::test]
    async fn from_fd_rejects_what_is_not_seqpacket() {
        let (r, _w) = pipe();
        let raw = r.as_raw_fd();
        let err = Channel::from_fd(OwnedFd::from(r)).expect_err("pipe");
        assert!(
            err.to_string()
                .starts_with(&format!("fd {raw} is not a Unix SOCK_SEQPACKET socket")),
            "{err}"
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = Channel::from_fd(OwnedFd::from(tcp)).expect_err("tcp");
        assert!(
            err.to_string().contains("not a Unix SOCK_SEQPACKET"),
            "{err}"
        );
        let (x, _y) = seqpacket_pair().expect("pair");
        Channel::from_fd(x).expect("a seqpacket socket is adopted");
    }

    #[tokio::test]
    async fn many_messages_in_flight_keep_their_boundaries_and_fds() {
        let (a, b) = Channel::pair().expect("pair");
        let (r, _w) = pipe();
        let sender = async {
            for seq in 0..500u64 {
                let msg = ToWorker::ListenOk {
                    seq,
                    address: BoundAddress::Unix(format!("/tmp/{seq}").into()),
                    grant: Grant::Shared,
                };
                a.send(&msg, &[r.as_fd()]).await.expect("send");
            }
        };
        let receiver = async {
            for seq in 0..500u64 {
                let (m, fds) = b.recv::<ToWorker>().await.expect("recv").expect("open");
                assert!(matches!(m, ToWorker::ListenOk { seq: s, .. } if s == seq));
                assert_eq!(fds.len(), 1);
            }
        };
        tokio::join!(sender, receiver);
    }
}
