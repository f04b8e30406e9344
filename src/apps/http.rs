//! A minimal HTTP/1.1 application: answers every request with `200 OK` and `hello\n`, with
//! keep-alive.
//!
//! When the worker stops, no request is lost: the request in progress is finished, every
//! response from then on carries `Connection: close` (so a client that keeps its connection
//! busy learns of the close with its answer and opens its next connection elsewhere), and a
//! connection still idle after [`IDLE_GRACE`] is closed. Closing an idle keep-alive connection
//! at once would race with a client sending its next request on it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::cluster::Worker;
use crate::net::{Server, Socket};

/// How long a keep-alive connection may stay idle once the worker stops.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Serves HTTP on one connection until the client closes it or `worker` (if any) stops.
pub async fn serve_connection(socket: Socket, worker: Option<Arc<Worker>>) {
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
        let closing = flag.load(Ordering::Relaxed);
        async move {
            let mut res = Response::new(Full::new(Bytes::from_static(b"hello\n")));
            if closing {
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(res)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(CloseOnDrop(socket)), service);
    tokio::pin!(conn);
    let stop = async {
        match &worker {
            Some(w) => {
                w.shutdown_requested().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = conn.as_mut() => return,
        () = stop => {}
    }
    // Stopping: answers say `Connection: close` from now on; a connection left idle that long
    // is closed.
    stopping.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(IDLE_GRACE) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A [`Server`] running the HTTP application (for a cluster worker, pass it so keep-alive
/// connections close when it stops).
pub fn server(worker: Option<Arc<Worker>>) -> Server {
    Server::new(move |socket| serve_connection(socket, worker.clone()))
}

/// The connection as hyper sees it, minus one system call per connection: hyper shuts the
/// write side down when it is done with a connection and drops it right after, and the drop
/// (`close`) sends the same FIN. So the shutdown only flushes.
struct CloseOnDrop(Socket);

impl tokio::io::AsyncRead for CloseOnDrop {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CloseOnDrop {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
}
