//! Finding every running primary of this user: what `netcluster ls` shows.

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinSet;

use super::paths::{candidate_dirs, name_of};
use super::{CONTROL_ENV, ClientError, Reply, Request, request};
use crate::status::Status;

/// A control socket found by [`scan`], and what its primary answered.
#[derive(Debug)]
pub struct Found {
    /// The instance name (`NAME` of `NAME.sock`), or the path of a socket named by
    /// `$NETCLUSTER_CONTROL` whose file name is no instance name.
    pub name: String,
    /// The socket.
    pub path: PathBuf,
    /// Its primary's status, or why there is none (a stale socket: nobody answers).
    pub answer: Result<Status, ClientError>,
}

impl Found {
    /// Whether nobody answers on the socket: a primary that died left it.
    pub fn is_stale(&self) -> bool {
        matches!(&self.answer, Err(ClientError::NoPrimary { .. }))
    }
}

/// Every control socket in the places a primary of this user may have put one
/// ([`candidate_dirs`], and `$NETCLUSTER_CONTROL`), each asked for its status (at most
/// `timeout` each, all at once); by name, then path.
pub async fn scan(timeout: Duration) -> Vec<Found> {
    let mut sockets: Vec<(String, PathBuf)> = Vec::new();
    for dir in candidate_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_socket = entry
                .file_type()
                .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_socket(&t));
            if let (true, Some(name)) = (is_socket, name_of(&path)) {
                sockets.push((name, path));
            }
        }
    }
    if let Some(path) = std::env::var_os(CONTROL_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !sockets.iter().any(|(_, p)| *p == path) && path.exists() {
            let name = name_of(&path).unwrap_or_else(|| path.display().to_string());
            sockets.push((name, path));
        }
    }
    let mut asks = JoinSet::new();
    for (i, (_, path)) in sockets.iter().enumerate() {
        let path = path.clone();
        asks.spawn(async move {
            let answer = match request(&path, Request::Status, timeout).await {
                Ok(Reply::Status { result }) => Ok(result),
                Ok(other) => Err(ClientError::BadReply {
                    path,
                    detail: format!("a {:?} reply to a status request", other.name()),
                }),
                Err(e) => Err(e),
            };
            (i, answer)
        });
    }
    let mut answers: Vec<Option<Result<Status, ClientError>>> =
        sockets.iter().map(|_| None).collect();
    while let Some(done) = asks.join_next().await {
        if let Ok((i, answer)) = done {
            answers[i] = Some(answer);
        }
    }
    let mut found: Vec<Found> = sockets
        .into_iter()
        .zip(answers)
        .map(|((name, path), answer)| Found {
            answer: answer.unwrap_or_else(|| {
                Err(ClientError::BadReply {
                    path: path.clone(),
                    detail: "the query failed".into(),
                })
            }),
            name,
            path,
        })
        .collect();
    found.sort_by(|a, b| (&a.name, &a.path).cmp(&(&b.name, &b.path)));
    found
}
