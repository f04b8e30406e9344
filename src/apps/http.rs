//! A minimal HTTP/1.1 application: answers every request with `200 OK` and `hello\n`, with
//! keep-alive. On the worker's stop it finishes the request in progress and closes each
//! keep-alive connection (hyper's graceful shutdown), so a draining worker loses no request.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::cluster::Worker;
use crate::net::{Server, Socket};

async fn hello(_req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello\n"))))
}

/// Serves HTTP on one connection until the client closes it or `worker` (if any) stops.
pub async fn serve_connection(socket: Socket, worker: Option<Arc<Worker>>) {
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(socket), hyper::service::service_fn(hello));
    tokio::pin!(conn);
    let stopping = async {
        match &worker {
            Some(w) => {
                w.shutdown_requested().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        () = stopping => {
            // Finish the request in progress, then close the keep-alive connection.
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
