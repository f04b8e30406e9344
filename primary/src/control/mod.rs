//! The control socket: how `netcluster status|scale|stop|reload|upgrade` talk to a running
//! primary.
//!
//! **Protocol.** A Unix stream socket; the client sends one request as one line of JSON and
//! reads one line of JSON back. JSON lines rather than the workers' postcard codec because this
//! is an operator's interface: `socat - UNIX-CONNECT:PATH` or any language's JSON library can
//! speak it, and the `status` reply is the same document `netcluster status --json` prints.
//! Both sides carry a `version` ([`CONTROL_VERSION`]); a request of another version gets an
//! error reply.
//!
//! ```text
//! → {"version":2,"command":"status"}
//! ← {"version":2,"ok":true,"reply":"status","result":{"schema":1,"pid":4242,…}}
//! → {"version":2,"command":"scale","workers":4}
//! ← {"version":2,"ok":false,"reply":"error","error":"the worker of slot 3 exited (exit code 1) before it was ready"}
//! ```
//!
//! A reply is a [`Reply`]: one variant per outcome, so a reply that says `ok` cannot carry an
//! error, nor an error a result; `ok` on the wire is derived from the variant (for scripts),
//! and a reply whose `ok` disagrees with it is refused.
//!
//! **Version 1** (before `reply` named the variant) is still spoken, both ways: a request of
//! version 1 is answered in version 1 (the same document under `"version":1`, which version 1
//! clients read as before), and [`request`] asks a primary that answers in version 1 again in
//! version 1 — the case of a new `netcluster upgrade` asking the old primary.
//!
//! **Where.** One socket per named instance (`netcluster serve --name NAME`, default
//! `default`): `NAME.sock` in the user's runtime directory ([`paths`]); `--control PATH` or
//! `$NETCLUSTER_CONTROL` name a path instead. A client tries every place a primary of its user
//! may have used ([`paths::candidate_dirs`]), and [`scan`] finds every running primary.
//!
//! **Safety.** The socket is created mode 0600 (before it listens, so there is no window in
//! which it is open to others), in a directory of the primary's user (or root's) that others
//! cannot write to (or that is sticky, like `/tmp`), and the peer's uid (`SO_PEERCRED`) must be
//! the primary's or root's; anyone else is refused and logged. The client checks the server the
//! same way before it sends anything: a socket served by another user is refused.
//!
//! A request is at most [`MAX_REQUEST`] bytes and must arrive within [`REQUEST_TIMEOUT`]. At
//! most [`MAX_CLIENTS`] connections are held at once; when a new one arrives and all are held,
//! the oldest that has not yet sent its request is closed to make room, so connections that
//! say nothing cannot lock out `netcluster status`. Each client is served in its own task, so a
//! slow, silent or malformed client never holds up the supervisor or another client: what one
//! client can make the primary hold is one descriptor, one task and [`MAX_REQUEST`] bytes, for
//! at most [`REQUEST_TIMEOUT`] until it has asked.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::cluster::ClusterHandle;
use crate::command::ScaleTo;
use crate::error::Error;

mod client;
pub mod paths;
mod scan;
mod wire;

pub use client::{ClientError, connect, locate, request, request_to};
pub use paths::Target;
pub use scan::{Found, scan};
use wire::reply_version;
pub use wire::{
    Envelope, Reply, Request, Response, StopReport, decode_reply, parse_envelope, parse_request,
};

/// The version of the control protocol: 2 since replies are a [`Reply`] named by their
/// `reply` field.
pub const CONTROL_VERSION: u32 = 2;
/// The earlier version still spoken (see the module documentation).
pub const CONTROL_VERSION_1: u32 = 1;
/// The largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once (each: one descriptor, one task, at most [`MAX_REQUEST`] bytes).
/// When all are held, the oldest that has not sent its request yet makes room for a new one.
pub const MAX_CLIENTS: usize = 64;
/// The environment variable that names the control socket (before the default).
pub const CONTROL_ENV: &str = "NETCLUSTER_CONTROL";

/// The control socket path of the default instance: `$NETCLUSTER_CONTROL`, else
/// `default.sock` in [`paths::server_dir`] (`$XDG_RUNTIME_DIR/netcluster`, `/run/netcluster`
/// for root, else `/tmp/netcluster-UID`) — a directory of the user's own, so primaries of
/// different users never collide. See [`Target`] for named instances.
pub fn default_path() -> PathBuf {
    Target::resolve(None, None).server_path()
}

/// A running control socket; dropping it (or [`ControlSocket::close`]) removes the file —
/// unless another primary's socket has replaced it there (an upgrade).
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    /// The socket file's device and inode, to remove only our own.
    inode: (u64, u64),
    task: tokio::task::JoinHandle<()>,
    clients: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl ControlSocket {
    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, gives the clients being served up to `grace` to get their replies
    /// (a `stop` request is answered as the primary stops), and removes the socket file.
    pub async fn close(self, grace: Duration) {
        self.task.abort();
        let clients = self.clients.clone();
        let _ = tokio::time::timeout(grace, async move {
            let mut clients = clients.lock().await;
            while clients.join_next().await.is_some() {}
        })
        .await;
        // Drop removes the file.
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An error about the control socket at `path`, saying what failed.
fn named(path: &Path, what: &str, e: io::Error) -> Error {
    Error::io(format!("control socket {}: {what}", path.display()), e)
}

/// Makes sure the directory `path` goes in is private to this user (created `0700`).
fn in_private_dir(path: &Path) -> Result<(), Error> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => private_dir(dir).map_err(|e| named(path, "its directory", e)),
        None => Ok(()),
    }
}

/// Creates the control socket at `path` and serves it for `cluster`.
///
/// A socket file left by a primary that died is replaced; one that a running primary answers
/// on is an error that says so. When `path` is the default, its directory is created `0700`.
///
/// # Errors
/// [`Error::Io`] naming the path: in use, not a socket, a directory that is not the user's.
pub fn serve(path: &Path, cluster: ClusterHandle) -> Result<ControlSocket, Error> {
    let named = |what: &str, e: io::Error| named(path, what, e);
    in_private_dir(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                return Err(named(
                    "exists",
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a file that is not a socket is in the way",
                    ),
                ));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(named(
                        "in use",
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another primary answers on it; give this one another name with --name NAME (or its own --control PATH)",
                        ),
                    ));
                }
                Err(_) => {
                    std::fs::remove_file(path).map_err(|e| named("remove the stale socket", e))?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named("stat", e)),
    }
    let (listener, inode) = bind_private(path).map_err(|(what, e)| named(what, e))?;
    Ok(start(path, inode, listener, cluster))
}

/// Creates the control socket at `path` in place of the one there — a running primary's —
/// atomically (bound beside it, then renamed over it): a client connects to one primary or the
/// other, never to none. For the new primary of an upgrade, once it serves.
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn serve_replacing(path: &Path, cluster: ClusterHandle) -> Result<ControlSocket, Error> {
    let named = |what: &str, e: io::Error| named(path, what, e);
    in_private_dir(path)?;
    let mut beside = path.as_os_str().to_owned();
    beside.push(format!(".{}.new", std::process::id()));
    let beside = PathBuf::from(beside);
    let _ = std::fs::remove_file(&beside);
    let (listener, inode) = bind_private(&beside).map_err(|(what, e)| named(what, e))?;
    if let Err(e) = std::fs::rename(&beside, path) {
        let _ = std::fs::remove_file(&beside);
        return Err(named("rename over the old one", e));
    }
    Ok(start(path, inode, listener, cluster))
}

/// A failed step of [`bind_private`]: what was being done, and the OS's answer.
type StepError = (&'static str, io::Error);

/// Binds a Unix socket at `path`, makes it 0600, and only then listens: nobody can connect in
/// between. Returns the listener and the socket file's (device, inode).
fn bind_private(path: &Path) -> Result<(UnixListener, (u64, u64)), StepError> {
    let socket = socket2::Socket::new(
        socket2::Domain::UNIX,
        socket2::Type::STREAM.cloexec().nonblocking(),
        None,
    )
    .map_err(|e| ("socket", e))?;
    let addr = socket2::SockAddr::unix(path).map_err(|e| ("address", e))?;
    socket.bind(&addr).map_err(|e| ("bind", e))?;
    let undo = |what: &'static str| {
        move |e: io::Error| {
            let _ = std::fs::remove_file(path);
            (what, e)
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(undo("chmod 0600"))?;
    let meta = std::fs::symlink_metadata(path).map_err(undo("stat"))?;
    socket.listen(64).map_err(undo("listen"))?;
    let std_listener: std::os::unix::net::UnixListener = socket.into();
    let listener = UnixListener::from_std(std_listener).map_err(undo("register"))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

fn start(
    path: &Path,
    inode: (u64, u64),
    listener: UnixListener,
    cluster: ClusterHandle,
) -> ControlSocket {
    let clients = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    let task = tokio::spawn(accept_loop(listener, cluster, clients.clone()));
    ControlSocket {
        path: path.to_path_buf(),
        inode,
        task,
        clients,
    }
}

/// Creates `dir` mode 0700 if missing; an existing one must belong to this user (or root)
/// and be closed to others: not writable by group or others, unless sticky (as `/tmp` is:
/// there nobody else can remove or replace the socket).
fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a directory",
                ));
            }
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me && meta.uid() != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} belongs to uid {}, not to uid {me}",
                        dir.display(),
                        meta.uid()
                    ),
                ));
            }
            check_closed(dir, meta.mode())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Refuses a directory of mode `mode` that others can write to (put their own socket in,
/// rename ours away) unless it is sticky.
fn check_closed(dir: &Path, mode: u32) -> io::Result<()> {
    const STICKY: u32 = 0o1000;
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is mode {:04o}: others can write to it (and put a socket of their own in \
                 place of the primary's); make it 0700 (chmod go-w {}) or choose another \
                 directory",
                dir.display(),
                mode & 0o7777,
                dir.display()
            ),
        ));
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

/// The connections held, and which of them have not sent their request yet.
#[derive(Debug, Default)]
struct Held {
    /// Connections counted against [`MAX_CLIENTS`].
    count: usize,
    /// The next connection's number (connections are evicted oldest first).
    next: u64,
    /// Those still waiting for their request, by number: closed to make room when full.
    waiting: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

/// A connection's place among the [`Held`]; gives it back when dropped.
struct Place {
    held: Arc<std::sync::Mutex<Held>>,
    number: u64,
    /// It has its request: no longer in `waiting`, still counted.
    asked: bool,
}

impl Place {
    /// Marks the request as read; `false` if the connection was evicted meanwhile.
    fn asked(&mut self) -> bool {
        let mut held = lock(&self.held);
        if held.waiting.remove(&self.number).is_some() {
            self.asked = true;
            true
        } else {
            false
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        // An evicted connection was uncounted when it was evicted.
        if self.asked || held.waiting.remove(&self.number).is_some() {
            held.count -= 1;
        }
    }
}

/// The lock, also after a panic elsewhere (the counts stay consistent: every change is one
/// step under the lock).
fn lock(held: &std::sync::Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Admits a new connection: a place, and the signal that it was evicted; or `None` when every
/// place is held by a connection that has asked (and is being answered).
fn admit(
    held: &Arc<std::sync::Mutex<Held>>,
) -> Option<(Place, tokio::sync::oneshot::Receiver<()>)> {
    let mut h = lock(held);
    if h.count >= MAX_CLIENTS {
        let (_, evict) = h.waiting.pop_first()?;
        h.count -= 1;
        let _ = evict.send(());
    }
    let number = h.next;
    h.next += 1;
    h.count += 1;
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.waiting.insert(number, tx);
    Some((
        Place {
            held: held.clone(),
            number,
            asked: false,
        },
        rx,
    ))
}

async fn accept_loop(
    listener: UnixListener,
    cluster: ClusterHandle,
    clients: Arc<tokio::sync::Mutex<JoinSet<()>>>,
) {
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((place, evicted)) = admit(&held) else {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = write_reply_within(
                    &mut stream,
                    &Response::new(Reply::error(format!(
                        "too many control clients at once ({MAX_CLIENTS} requests under way); \
                         try again"
                    ))),
                    EVICT_WRITE,
                )
                .await;
            });
            continue;
        };
        let cluster = cluster.clone();
        let mut set = clients.lock().await;
        while set.try_join_next().is_some() {}
        set.spawn(serve_client(stream, cluster, place, evicted));
    }
}

/// How long a refused or evicted client's reply may take to write.
const EVICT_WRITE: Duration = Duration::from_millis(100);

async fn serve_client(
    mut stream: UnixStream,
    cluster: ClusterHandle,
    mut place: Place,
    evicted: tokio::sync::oneshot::Receiver<()>,
) {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = ?cred.pid(),
                "control socket: refused a client of another user"
            );
            let _ = write_reply(
                &mut stream,
                &Response::new(Reply::error("permission denied: not the primary's user")),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read the client's credentials: {e}");
            return;
        }
    }
    let read = tokio::select! {
        read = read_request(&mut stream) => Some(read),
        _ = evicted => None,
    };
    let envelope = match read {
        Some(Ok(envelope)) if place.asked() => envelope,
        Some(Err((version, why))) if place.asked() => {
            tracing::info!("control socket: {why}");
            let reply = Response {
                version,
                reply: Reply::error(why),
            };
            let _ = write_reply(&mut stream, &reply).await;
            return;
        }
        _ => {
            tracing::debug!("control socket: closed a silent client to make room");
            let reply = Response::new(Reply::error(format!(
                "closed: {MAX_CLIENTS} control clients were connected and this one, the oldest, \
                 had not sent its request"
            )));
            let _ = write_reply_within(&mut stream, &reply, EVICT_WRITE).await;
            return;
        }
    };
    let reply = Response {
        // A client of version 1 reads the same document: `reply` is a field it ignores.
        version: envelope.version,
        reply: answer(envelope.request, &cluster).await,
    };
    let _ = write_reply(&mut stream, &reply).await;
}

/// Reads one request line: at most [`MAX_REQUEST`] bytes within [`REQUEST_TIMEOUT`]. An error
/// comes with the version to answer it in.
async fn read_request(stream: &mut UnixStream) -> Result<Envelope, (u32, String)> {
    let mut line = Vec::new();
    let read = async {
        let mut reader = BufReader::new(&mut *stream).take(MAX_REQUEST as u64 + 1);
        reader.read_until(b'\n', &mut line).await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => {
            return Err((
                CONTROL_VERSION,
                format!("no request within {REQUEST_TIMEOUT:?}"),
            ));
        }
        Ok(Err(e)) => {
            return Err((CONTROL_VERSION, format!("cannot read the request: {e}")));
        }
        Ok(Ok(_)) => {}
    }
    parse_envelope(&line).map_err(|why| (reply_version(&line), why))
}

async fn write_reply(stream: &mut UnixStream, reply: &Response) -> io::Result<()> {
    write_reply_within(stream, reply, REQUEST_TIMEOUT).await
}

/// Writes `reply` and closes the writing side, giving up after `within`.
async fn write_reply_within(
    stream: &mut UnixStream,
    reply: &Response,
    within: Duration,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    tokio::time::timeout(within, stream.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read"))??;
    let _ = stream.shutdown().await;
    Ok(())
}

async fn answer(request: Request, cluster: &ClusterHandle) -> Reply {
    let reply = match request {
        Request::Status => cluster
            .status()
            .await
            .map(|result| Reply::Status { result }),
        Request::Scale { workers } => cluster
            .scale_to(ScaleTo::Exactly(workers))
            .await
            .map(|result| Reply::Scaled { result }),
        Request::Stop => cluster.stop().await.map(|exits| Reply::Stopped {
            result: StopReport {
                workers_exited: exits.len(),
            },
        }),
        Request::Reload => cluster
            .reload()
            .await
            .map(|result| Reply::Reloaded { result }),
        Request::Upgrade => cluster
            .upgrade()
            .await
            .map(|result| Reply::Upgraded { result }),
    };
    reply.unwrap_or_else(Reply::error)
}

#[cfg(test)]
mod tests;
