//! The control socket's client: what `netcluster status|scale|stop|reload|upgrade` run.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::paths::Target;
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
    /// No primary of that name answers in any of the places a primary may have put its
    /// socket.
    #[error(
        "no primary named {name:?} answers; tried {} (is `netcluster serve --name {name}` \
         running? `netcluster ls` lists the running ones; --control PATH names a socket)",
        list(tried)
    )]
    NotFound {
        /// The instance name.
        name: String,
        /// Every path tried, with why it did not answer.
        tried: Vec<(PathBuf, String)>,
    },
    /// The socket is there but this user may not connect to it.
    #[error(
        "control socket {}: {error}: it belongs to {}; run the command as the primary's user \
         (e.g. sudo -u {} netcluster …)",
        path.display(),
        who(*owner),
        user_or_uid(*owner)
    )]
    PermissionDenied {
        /// The path.
        path: PathBuf,
        /// The uid owning the socket (or the nearest directory above it that could be read).
        owner: u32,
        /// What `connect` said.
        error: io::Error,
    },
    /// The socket is served by a process of another user (not this user, not root): someone
    /// else's socket in the primary's place. Nothing was sent.
    #[error(
        "refusing the control socket {}: it is served by {} (pid {}), not by this user (uid \
         {me}) or root; another user may have put it there",
        path.display(),
        who(*uid),
        pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    Untrusted {
        /// The path.
        path: PathBuf,
        /// The server's uid.
        uid: u32,
        /// The server's pid, when known.
        pid: Option<i32>,
        /// This process's uid.
        me: u32,
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

/// `uid 0 (root)`, or `uid 1234` when the uid has no name.
fn who(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// The user's name, else `#UID` (as `sudo -u` takes it).
fn user_or_uid(uid: u32) -> String {
    user_name(uid).unwrap_or_else(|| format!("#{uid}"))
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// `a (why), b (why)`.
fn list(tried: &[(PathBuf, String)]) -> String {
    tried
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The owner of `path`, or of the nearest directory above it whose owner can be read.
fn owner_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    path.ancestors()
        .find_map(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.uid())
}

/// Connects to the control socket at `path` and checks who serves it: this user or root.
///
/// # Errors
/// [`ClientError::NoPrimary`] when nothing answers, [`ClientError::PermissionDenied`] when
/// this user may not connect, [`ClientError::Untrusted`] when another user serves it.
pub async fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            return Err(ClientError::PermissionDenied {
                path: path.to_path_buf(),
                owner: owner_of(path),
                error,
            });
        }
        Err(error) => {
            return Err(ClientError::NoPrimary {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    let cred = stream.peer_cred().map_err(|error| ClientError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me && cred.uid() != 0 {
        return Err(ClientError::Untrusted {
            path: path.to_path_buf(),
            uid: cred.uid(),
            pid: cred.pid(),
            me,
        });
    }
    Ok(stream)
}

/// Finds the primary `target` names: the first of its paths where a primary of this user (or
/// root) answers; its path and a connection to it.
///
/// # Errors
/// [`ClientError::NotFound`] listing the places tried; a socket of another user, or one this
/// user may not reach when no other place answers, is an error of its own.
pub async fn locate(target: &Target) -> Result<(PathBuf, UnixStream), ClientError> {
    let name = match target {
        Target::Path(path) => return Ok((path.clone(), connect(path).await?)),
        Target::Name(name) => name,
    };
    let mut tried = Vec::new();
    let mut denied = None;
    for path in target.client_paths() {
        match connect(&path).await {
            Ok(stream) => return Ok((path, stream)),
            Err(ClientError::NoPrimary { error, .. }) => {
                let why = match error.kind() {
                    io::ErrorKind::NotFound => "no socket".to_string(),
                    io::ErrorKind::ConnectionRefused => "stale: nobody answers".to_string(),
                    _ => error.to_string(),
                };
                tried.push((path, why));
            }
            Err(e @ ClientError::PermissionDenied { .. }) => {
                tried.push((path, "permission denied".into()));
                denied.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(denied.unwrap_or(ClientError::NotFound {
        name: name.clone(),
        tried,
    }))
}

/// Sends `request` to the primary at `path` and returns its reply, waiting at most `timeout`
/// for it. A primary that speaks only version 1 of the protocol is asked again in version 1.
/// The server must be this user's or root's (see [`connect`]).
///
/// # Errors
/// [`ClientError`], naming the path; [`ClientError::Refused`] with the primary's reason when it
/// answers with [`Reply::Error`].
pub async fn request(
    path: &Path,
    request: Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let stream = connect(path).await?;
    request_on(path, stream, request, timeout).await
}

/// [`request`] to the primary `target` names, found with [`locate`]; also returns the path
/// where it answered.
///
/// # Errors
/// As [`locate`] and [`request`].
pub async fn request_to(
    target: &Target,
    request: Request,
    timeout: Duration,
) -> Result<(PathBuf, Reply), ClientError> {
    let (path, stream) = locate(target).await?;
    let reply = request_on(&path, stream, request, timeout).await?;
    Ok((path, reply))
}

/// [`request`] on a connection already made.
async fn request_on(
    path: &Path,
    stream: UnixStream,
    request: Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let bad = |detail: String| ClientError::BadReply {
        path: path.to_path_buf(),
        detail,
    };
    let line = exchange(path, stream, CONTROL_VERSION, &request, timeout).await?;
    let mut response = decode_reply(&request, &line).map_err(bad)?;
    if response.version == CONTROL_VERSION_1 && !response.reply.is_ok() {
        // It refused version 2: a primary from before it (the old one, during an upgrade).
        let stream = connect(path).await?;
        let line = exchange(path, stream, CONTROL_VERSION_1, &request, timeout).await?;
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
    mut stream: UnixStream,
    version: u32,
    request: &Request,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let io_err = |error: io::Error| ClientError::Io {
        path: path.to_path_buf(),
        error,
    };
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
