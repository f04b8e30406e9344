//! The control socket's client: what `netcluster status|scale|stop|reload|upgrade` run.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{CONTROL_VERSION, CONTROL_VERSION_1, Envelope, Reply, Request, decode_reply};

/// Why a control request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the path.
    #[error(
        "no primary at {}: {error} (is `netcluster serve` running? pass its --control PATH)",
        path.display()
    )]
    NoPrimary {
        /// The path tried.
        path: PathBuf,
        /// What `connect` said.
        error: io::Error,
    },
    /// The primary did not answer in time.
    #[error("the primary at {} did not answer within {timeout:?}", path.display())]
    Timeout {
        /// The path.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The exchange failed.
    #[error("control socket {}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// The primary answered with an error: its reason.
    #[error("{error}")]
    Refused {
        /// Why, in the primary's words.
        error: String,
    },
    /// The reply was not JSON of the expected shape.
    #[error("control socket {}: bad reply: {detail}", path.display())]
    BadReply {
        /// The path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Sends `request` to the primary at `path` and returns its reply, waiting at most `timeout`
/// for it. A primary that speaks only version 1 of the protocol is asked again in version 1.
///
/// # Errors
/// [`ClientError`], naming the path; [`ClientError::Refused`] with the primary's reason when it
/// answers with [`Reply::Error`].
pub async fn request(
    path: &Path,
    request: Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let bad = |detail: String| ClientError::BadReply {
        path: path.to_path_buf(),
        detail,
    };
    let line = exchange(path, CONTROL_VERSION, &request, timeout).await?;
    let mut response = decode_reply(&request, &line).map_err(bad)?;
    if response.version == CONTROL_VERSION_1 && !response.reply.is_ok() {
        // It refused version 2: a primary from before it (the old one, during an upgrade).
        let line = exchange(path, CONTROL_VERSION_1, &request, timeout).await?;
        response = decode_reply(&request, &line).map_err(bad)?;
    }
    match response.reply {
        Reply::Error { error } => Err(ClientError::Refused { error }),
        reply if reply.name() == Reply::name_for(&request) => Ok(reply),
        other => Err(bad(format!(
            "a {:?} reply to a {:?} request",
            other.name(),
            Reply::name_for(&request)
        ))),
    }
}

/// One request of `version` and the line that answers it.
async fn exchange(
    path: &Path,
    version: u32,
    request: &Request,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let io_err = |error: io::Error| ClientError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|error| ClientError::NoPrimary {
            path: path.to_path_buf(),
            error,
        })?;
    let mut line = serde_json::to_vec(&Envelope {
        version,
        request: request.clone(),
    })
    .map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    let exchange = async {
        // A primary that refuses the client answers before reading: the reply is still there
        // to read when the write finds the connection closed.
        if let Err(e) = stream.write_all(&line).await {
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                return Err(e);
            }
        }
        let mut reply = Vec::new();
        BufReader::new(&mut stream)
            .take(16 * 1024 * 1024)
            .read_until(b'\n', &mut reply)
            .await?;
        Ok::<_, io::Error>(reply)
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            path: path.to_path_buf(),
            timeout,
        })?
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(ClientError::BadReply {
            path: path.to_path_buf(),
            detail: "the primary closed the connection without a reply".into(),
        });
    }
    Ok(reply)
}
