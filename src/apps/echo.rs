//! The echo server of Node's `net` docs: on connect write `hello\r\n`, then send back every byte
//! received; when the client ends its side, end ours (`allowHalfOpen: false`).

use tokio::io::AsyncWriteExt;

use crate::net::{Server, Socket};

/// Serves one connection: `c.write('hello\r\n'); c.pipe(c);`.
pub async fn serve_connection(mut socket: Socket) {
    tracing::debug!(peer = ?socket.remote_address(), "client connected");
    if socket.write_all(b"hello\r\n").await.is_err() {
        return;
    }
    pipe_back(socket).await;
}

/// `c.pipe(c)`: sends back everything received until the peer ends, then ends.
pub async fn pipe_back(socket: Socket) {
    let peer = socket.remote_address();
    let (mut reader, mut writer) = tokio::io::split(socket);
    if let Err(e) = tokio::io::copy(&mut reader, &mut writer).await {
        tracing::debug!(?peer, "echo ended: {e}");
    }
    let _ = writer.shutdown().await;
    tracing::debug!(?peer, "client disconnected");
}

/// A [`Server`] running the echo application.
pub fn server() -> Server {
    Server::new(serve_connection)
}
