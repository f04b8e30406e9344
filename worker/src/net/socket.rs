//! `net.Socket`: a connected TCP or Unix stream, readable and writable with tokio's
//! `AsyncRead`/`AsyncWrite`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connected stream socket (TCP or Unix), as handed to a server's connection handler.
#[derive(Debug)]
pub struct Socket {
    stream: Stream,
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        Self {
            stream: Stream::Tcp(stream),
        }
    }

    pub(crate) fn unix(stream: UnixStream) -> Self {
        Self {
            stream: Stream::Unix(stream),
        }
    }

    /// Placeholder until the full Socket lands: whether EOF from the peer ends our side too.
    pub fn set_allow_half_open(&mut self, _allow: bool) {}

    /// Sets `TCP_NODELAY` (no-op error for Unix sockets).
    pub fn set_no_delay(&self, no_delay: bool) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_nodelay(no_delay),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Sets `SO_KEEPALIVE` and the idle time.
    pub fn set_keep_alive(
        &self,
        enable: bool,
        initial_delay: std::time::Duration,
    ) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => {
                let sock = socket2::SockRef::from(s);
                sock.set_keepalive(enable)?;
                if enable && !initial_delay.is_zero() {
                    sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(initial_delay))?;
                }
                Ok(())
            }
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Placeholder: stop delivering data.
    pub fn pause(&mut self) {}

    /// Placeholder: deliver data again.
    pub fn resume(&mut self) {}

    /// The peer's address for TCP (`remoteAddress`/`remotePort`), `None` for Unix sockets.
    pub fn remote_address(&self) -> Option<SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// The local address for TCP (`localAddress`/`localPort`), `None` for Unix sockets.
    pub fn local_address(&self) -> Option<SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}
