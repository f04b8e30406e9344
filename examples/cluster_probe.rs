//! A scriptable cluster, for trying the cluster API by hand and for the integration tests.
//!
//! Every line it prints on stdout is a typed value of `cluster_probe/lines.rs` ([`Line`]): the
//! variant's name, then its value as JSON, so that the tests read back the same types instead of
//! text. The primary prints every worker event as an `event` line
//! (`event {"type":"online","id":1,"pid":4242}`,
//! `event {"type":"message","id":1,"message":{"Ok":{"Text":"hi"}},"handle":null}`,
//! `event {"type":"exit","id":1,"pid":4242,"code":0,"signal":null,"exited_after_disconnect":true}`)
//! and reads commands on stdin:
//!
//! | command | does |
//! |---|---|
//! | `send ID TEXT` | `worker.send(Text(TEXT))`; the worker answers `Text("echo TEXT")` |
//! | `disconnect ID` | `worker.disconnect()`, then prints `disconnecting {"id":ID,"state":…}` |
//! | `kill ID SIGNAL` | `worker.kill(SIGNAL)` (`TERM`, `KILL`, …) |
//! | `state ID` | prints `state {"id":ID,"state":…,"exited_after_disconnect":…}` |
//! | `relay` | starts a server in the primary whose connections are sent to the workers in turn with `send_handle` (`relay-listening`); a worker greets them with `hello from worker ID` and echoes |
//! | `relay-count` | that server's `getConnections()` (`relay-count {"Ok":N}`), which counts the sockets the workers still hold |
//! | `send-server ID` | sends a listening server to worker ID (`sent-server`), which serves the echo app on it (`worker-serving-sent-server`) |
//! | `count ADDRESS` | `cluster.get_connections(ADDRESS)`: prints `count {"Ok":N}` or `count {"Err":E}` |
//! | `stop` | `cluster.disconnect()` (its exits as `event` lines), then `stopped` and exit |
//!
//! A command that fails prints an `error` line. `--crash` makes every worker exit with code 1
//! at once; `--respawn-max-ms N` restarts exited workers (`--respawn-initial-ms`, default
//! 50 ms, doubling, capped at N ms); without it the probe prints `all-dead` and exits once no
//! worker is left. Fork events carry `at_ms`, the time since the start. `--child-fds` makes each
//! worker, before it touches the cluster API, start this program with `--list-fds` and print
//! what the child inherited (`worker-child-fds`: descriptor to `/proc` link target, and the
//! worker's channel's target).
//!
//! `--abandon HOST:PORT` makes each worker start a listen and give it up before the answer
//! (`worker-abandoned {"id":ID,"abandoned":true,"listening":false}`). `--abandon-handshake`
//! makes each worker's first use of the cluster API a listen given up while the handshake with
//! the primary is under way (`worker-handshake-abandoned`); the worker then goes on as usual.
//! `--churn` makes each worker listen on port 0, close, and listen again (twice) before the
//! rest (`worker-churn-ok` with the four addresses); `--spawn-child` makes it start this
//! program with `--whoami` and print what the child thinks it is (`worker-child-says`, role
//! `primary`).
//!
//! A worker sent `server-back` listens on a port of its own, sends that server to the primary
//! with `send_handle` (`Text("server back")`) and closes its own (`Text("closed its copy")`
//! once it has); sent `socket-back ADDRESS`, it
//! connects there and sends the socket (`Text("socket back")`); sent `bad-handle`, it sends a
//! message whose "socket" is a pipe, then `Text("after bad handle")`. The primary's `message`
//! event says which handle came with a message (`"handle":{"server":{"address":…}}` or
//! `"handle":"socket"`), and the primary serves the handle itself: it greets with `hello from
//! the primary` and echoes.
//!
//! A worker sent `garbage` sends the primary four bad frames, then `Text("still here")`. A
//! worker sent `close` closes its servers and answers `closed`; sent `disconnect`, it calls
//! `cluster.worker.disconnect()` itself. A worker sent `count` answers `cluster-count N` with its servers' cluster-wide counts.
//!
//! Every worker sends `Cmd { cmd: "NODE_CLUSTER" }` when it starts (a message that would be an
//! internal one under Node's `NODE_` prefix rule) and listens on each `--listen` value
//! (`worker-listening`, or `worker-listen-error` and exit code 3):
//! `HOST:PORT`, a Unix socket path or `fd:N` (the primary's descriptor N), `exclusive` with
//! `--exclusive`, and `--readable-all`/`--writable-all` for Unix sockets. With
//! `--policy round-robin|shared|reuseport` picks the scheduling policy; `--max-connections N`
//! sets each worker server's `maxConnections` (with `--drop-max`, `dropMaxConnection`), and a
//! dropped connection prints `worker-drop`. With `--primary-listener` the primary binds
//! `127.0.0.1:0` itself, prints `primary-fd {"fd":N,"address":…}`, and its workers listen on
//! `fd:N`.
//!
//! ```text
//! cargo run --example cluster_probe -- --workers 2 --listen 127.0.0.1:0
//! ```

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use netcluster::cluster::{
    self, Backoff, Cluster, Event, MessageHandle, MessageHandleKind, ReceivedHandle, Role,
    SchedulingPolicy, SendHandle, WorkerHandle,
};
use netcluster::net::{BoundAddress, ListenOptions, Server, ServerOptions};
use netcluster::protocol::ListenError;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What this program prints, as types (the tests read the same types back).
#[path = "cluster_probe/lines.rs"]
#[allow(dead_code)] // `Line::parse` is for the tests.
mod lines;

use lines::{Dropped, Line, Msg, ProbeEvent, ProbeRole, SentHandle};

/// Prints one line of stdout.
fn say(line: Line) {
    println!("{}", line.to_line());
}

#[derive(Debug, Default, Clone)]
struct Args {
    workers: usize,
    listen: Vec<String>,
    exclusive: bool,
    readable_all: bool,
    writable_all: bool,
    primary_listener: bool,
    policy: Option<SchedulingPolicy>,
    max_connections: Option<usize>,
    drop_max: bool,
    churn: bool,
    abandon: Option<String>,
    abandon_handshake: bool,
    spawn_child: bool,
    whoami: bool,
    crash: bool,
    respawn_max_ms: Option<u64>,
    respawn_initial_ms: Option<u64>,
    child_fds: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 2,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--workers" => {
                let v = it.next().ok_or("--workers needs a value")?;
                args.workers = v.parse().map_err(|_| format!("--workers {v:?}"))?;
            }
            "--listen" => args.listen.push(it.next().ok_or("--listen needs a value")?),
            "--exclusive" => args.exclusive = true,
            "--readable-all" => args.readable_all = true,
            "--writable-all" => args.writable_all = true,
            "--primary-listener" => args.primary_listener = true,
            "--policy" => {
                let v = it.next().ok_or("--policy needs a value")?;
                args.policy = Some(v.parse()?);
            }
            "--max-connections" => {
                let v = it.next().ok_or("--max-connections needs a value")?;
                args.max_connections =
                    Some(v.parse().map_err(|_| format!("--max-connections {v:?}"))?);
            }
            "--drop-max" => args.drop_max = true,
            "--churn" => args.churn = true,
            "--abandon" => args.abandon = Some(it.next().ok_or("--abandon needs a value")?),
            "--abandon-handshake" => args.abandon_handshake = true,
            "--spawn-child" => args.spawn_child = true,
            "--whoami" => args.whoami = true,
            "--crash" => args.crash = true,
            "--child-fds" => args.child_fds = true,
            "--respawn-initial-ms" => {
                let v = it.next().ok_or("--respawn-initial-ms needs a value")?;
                args.respawn_initial_ms = Some(
                    v.parse()
                        .map_err(|_| format!("--respawn-initial-ms {v:?}"))?,
                );
            }
            "--respawn-max-ms" => {
                let v = it.next().ok_or("--respawn-max-ms needs a value")?;
                args.respawn_max_ms =
                    Some(v.parse().map_err(|_| format!("--respawn-max-ms {v:?}"))?);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    netcluster::init_tracing();
    if std::env::args().nth(1).as_deref() == Some("--list-fds") {
        // The descriptors this process holds, as `FD=TARGET` (the runtime's own are there
        // too: an inherited channel shows as a `socket:`).
        let fds: std::collections::BTreeMap<i32, String> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| {
                    let fd: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
                    Some((fd, target.to_string_lossy().into_owned()))
                })
                .collect()
            })
            .unwrap_or_default();
        println!("{}", serde_json::to_string(&fds).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster_probe: {e}");
            return ExitCode::from(2);
        }
    };
    started();
    if args.whoami {
        let role = ProbeRole::from(cluster::role());
        println!("{}", serde_json::to_string(&role).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let result = match cluster::role() {
        Role::Primary => primary(args).await,
        Role::Worker { id } => worker(id, args).await,
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster_probe: {e}");
            ExitCode::FAILURE
        }
    };
    // Exit now: tokio's stdin reader is a blocking thread that would hold up the runtime's
    // shutdown until stdin closes.
    netcluster::flush_logs();
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 })
}

async fn primary(args: Args) -> std::io::Result<ExitCode> {
    // Node's behaviour by default: a worker that exits stays dead (the tests follow Node's
    // cases); `--respawn-max-ms` restarts it, from 50 ms doubling up to that cap.
    let respawn = args.respawn_max_ms.map(|max| Backoff {
        initial: std::time::Duration::from_millis(args.respawn_initial_ms.unwrap_or(50)),
        max: std::time::Duration::from_millis(max),
        reset_after: std::time::Duration::from_secs(60),
        give_up_after: None,
    });
    let mut builder = Cluster::builder()?
        .workers(args.workers)
        .respawn(respawn)
        .drain_timeout(std::time::Duration::from_secs(5));
    if let Some(policy) = args.policy {
        builder = builder.policy(policy);
    }
    // Given to the cluster: workers listen on the primary's descriptor with `{fd}`.
    if args.primary_listener {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let fd = l.as_raw_fd();
        say(Line::PrimaryFd {
            fd,
            address: l.local_addr()?,
        });
        let worker_args = std::env::args()
            .skip(1)
            .chain(["--listen".to_string(), format!("fd:{fd}")]);
        builder = builder.args(worker_args).give_fd(l);
    }
    let mut cluster = builder.build();
    cluster.start().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut relay = None;
    let mut sent_back = Vec::new();
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line? {
                Some(line) => {
                    if command(&mut cluster, &mut relay, line.trim()).await? {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                None => stdin_open = false,
            },
            Some(event) = cluster.next_event() => {
                print_event(&event);
                if let Event::Message { message, .. } = &event {
                    if let Some(handle) = message.handle() {
                        serve_sent_back(handle, &mut sent_back).await;
                    }
                }
                let respawning = args.respawn_max_ms.is_some();
                if matches!(event, Event::Exit { .. })
                    && !respawning
                    && cluster.workers().await.is_empty()
                {
                    say(Line::AllDead);
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
}

/// Runs one stdin command; true means "exit now".
async fn command(
    cluster: &mut Cluster,
    relay: &mut Option<Server>,
    line: &str,
) -> std::io::Result<bool> {
    if line == "relay" {
        // A server in the primary whose connections are sent to the workers in turn.
        let mut workers: Vec<WorkerHandle> = Vec::new();
        for w in cluster.workers().await {
            workers.extend(cluster.worker(w.id).await);
        }
        let workers = Arc::new(workers);
        let turn = Arc::new(AtomicUsize::new(0));
        let server = Server::new(move |socket| {
            let workers = workers.clone();
            let turn = turn.clone();
            async move {
                let w = &workers[turn.fetch_add(1, Ordering::Relaxed) % workers.len()];
                if let Err(e) = w
                    .send_handle(
                        &Msg::Text("relay".into()),
                        SendHandle::Socket(Box::new(socket)),
                        false,
                    )
                    .await
                {
                    say(Line::Error(format!("send_handle {}: {e}", w.id())));
                }
            }
        });
        let address = server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await?;
        say(Line::RelayListening { address });
        *relay = Some(server);
        return Ok(false);
    }
    if line == "relay-count" {
        if let Some(server) = relay {
            let count = server.get_connections().await.map_err(|e| e.to_string());
            say(Line::RelayCount(count));
        }
        return Ok(false);
    }
    if let Some(id) = line.strip_prefix("send-server ") {
        let w = match id.parse() {
            Ok(id) => cluster.worker(id).await,
            Err(_) => None,
        };
        let Some(w) = w else {
            say(Line::Error(format!("no worker {id}")));
            return Ok(false);
        };
        let server = Server::new(|_socket| async {});
        let address = server
            .listen(ListenOptions::port(0).host("127.0.0.1"))
            .await?;
        w.send_handle(
            &Msg::Text("server".into()),
            SendHandle::Server(server.clone()),
            false,
        )
        .await?;
        server.close()?;
        say(Line::SentServer { address });
        return Ok(false);
    }
    if let Some(address) = line.strip_prefix("count ") {
        let address = match address.parse::<std::net::SocketAddr>() {
            Ok(a) => BoundAddress::Tcp(a),
            Err(_) => BoundAddress::Unix(address.into()),
        };
        let count = cluster.get_connections(&address).await;
        say(Line::Count(count.map_err(|e| e.to_string())));
        return Ok(false);
    }
    let mut words = line.splitn(3, ' ');
    let verb = words.next().unwrap_or("");
    let id: Option<u32> = words.next().and_then(|w| w.parse().ok());
    let rest = words.next().unwrap_or("");
    let handle = match id {
        Some(id) => cluster.worker(id).await,
        None => None,
    };
    match (verb, handle) {
        ("stop", _) => {
            for exit in cluster.disconnect().await {
                print_event(&exit);
            }
            say(Line::Stopped);
            return Ok(true);
        }
        ("send", Some(w)) => {
            if let Err(e) = w.send(&Msg::Text(rest.to_string())).await {
                say(Line::Error(format!("send {}: {e}", w.id())));
            }
        }
        ("disconnect", Some(w)) => match w.disconnect().await {
            Ok(()) => say(Line::Disconnecting {
                id: w.id(),
                state: w.state().await,
            }),
            Err(e) => say(Line::Error(format!("disconnect {}: {e}", w.id()))),
        },
        ("kill", Some(w)) => {
            let signal = format!("SIG{rest}")
                .parse::<nix::sys::signal::Signal>()
                .unwrap_or(nix::sys::signal::Signal::SIGTERM);
            if let Err(e) = w.kill(signal).await {
                say(Line::Error(format!("kill {}: {e}", w.id())));
            }
        }
        ("state", Some(w)) => say(Line::State {
            id: w.id(),
            state: w.state().await,
            exited_after_disconnect: w.exited_after_disconnect().await,
        }),
        _ => say(Line::Error(format!("unknown command {line:?}"))),
    }
    Ok(false)
}

/// The primary serves a handle a worker sent it: a server on its socket, or the socket itself;
/// either way it greets with `hello from the primary` and echoes.
async fn serve_sent_back(handle: &MessageHandle, servers: &mut Vec<Server>) {
    async fn greet(mut socket: netcluster::net::Socket) {
        if socket.write(b"hello from the primary\r\n").is_ok() {
            netcluster::apps::echo::pipe_back(socket).await;
        }
    }
    match handle.kind() {
        MessageHandleKind::Server { .. } => {
            let server = Server::new(greet);
            match server.listen_handle(handle).await {
                Ok(_) => servers.push(server),
                Err(e) => say(Line::Error(format!("serving a sent server: {e}"))),
            }
        }
        MessageHandleKind::Socket => match handle.to_socket() {
            Ok(socket) => {
                tokio::spawn(greet(socket));
            }
            Err(e) => say(Line::Error(format!("taking a sent socket: {e}"))),
        },
    }
}

/// When the program started (fork lines carry the time since, so intervals can be read off).
fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

fn print_event(event: &Event) {
    let event = match event {
        Event::Fork { id, pid } => ProbeEvent::Fork {
            id: *id,
            pid: *pid,
            at_ms: u64::try_from(started().elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        Event::Online { id, pid } => ProbeEvent::Online { id: *id, pid: *pid },
        Event::Listening { id, address, fd } => ProbeEvent::Listening {
            id: *id,
            address: address.clone(),
            fd: *fd,
        },
        Event::Message { id, message } => ProbeEvent::Message {
            id: *id,
            message: message.decode::<Msg>().map_err(|e| e.to_string()),
            handle: message.handle().map(|handle| match handle.kind() {
                MessageHandleKind::Server { address } => SentHandle::Server {
                    address: address.clone(),
                },
                MessageHandleKind::Socket => SentHandle::Socket,
            }),
        },
        Event::Disconnect { id } => ProbeEvent::Disconnect { id: *id },
        Event::Exit {
            id,
            pid,
            code,
            signal,
            exited_after_disconnect,
        } => ProbeEvent::Exit {
            id: *id,
            pid: *pid,
            code: *code,
            signal: *signal,
            exited_after_disconnect: *exited_after_disconnect,
        },
        Event::Lagged { missed } => ProbeEvent::Lagged { missed: *missed },
    };
    say(Line::Event(event));
}

/// test-cluster-child-index-net: listen(0), close, listen(0) again, twice over, in a worker;
/// every listen succeeds.
async fn churn(id: u32) -> std::io::Result<()> {
    let mut ports = Vec::new();
    for _ in 0..2 {
        let server = Server::new(|_socket| async {});
        ports.push(server.listen(ListenOptions::port(0)).await?);
        server.close()?;
        let server2 = Server::new(|_socket| async {});
        ports.push(server2.listen(ListenOptions::port(0)).await?);
        server2.close()?;
        server.closed().await;
        server2.closed().await;
    }
    say(Line::WorkerChurnOk {
        id,
        addresses: ports,
    });
    Ok(())
}

async fn worker(id: u32, args: Args) -> std::io::Result<ExitCode> {
    if args.crash {
        // A program that fails at once, every time.
        std::process::exit(1);
    }
    if args.child_fds {
        // Before anything touches the cluster API: what does a child inherit?
        let out = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--list-fds")
            .output()
            .await?;
        let channel = std::env::var(netcluster::protocol::env::CHANNEL_FD)
            .ok()
            .and_then(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let child = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
        say(Line::WorkerChildFds { id, child, channel });
    }
    if args.abandon_handshake {
        // The first listen starts the handshake with the primary; it is dropped while the
        // handshake waits for the primary's Welcome. The connection must survive it.
        let server = Server::new(|_socket| async {});
        let mut listen = Box::pin(server.listen(ListenOptions::port(0).host("127.0.0.1")));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(listen.as_mut().poll(cx))).await;
        drop(listen);
        say(Line::WorkerHandshakeAbandoned {
            id,
            abandoned: first.is_pending(),
        });
    }
    let me = cluster::worker()
        .await?
        .ok_or_else(|| std::io::Error::other("no channel to the primary"))?;
    let pid = std::process::id();
    me.send(&Msg::Cmd {
        cmd: "NODE_CLUSTER".into(),
    })
    .await?;
    if args.churn {
        churn(id).await?;
    }
    if let Some(addr) = &args.abandon {
        // test-net-server-close-before-ipc-response: the listen is given up before the
        // primary answers; the late answer must be closed and the membership given back.
        let addr: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| std::io::Error::other("--abandon HOST:PORT"))?;
        let server = Server::new(|_socket| async {});
        // Poll the listen once (it sends the query), then drop it unanswered.
        let mut listen = Box::pin(server.listen(addr));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(listen.as_mut().poll(cx))).await;
        let gave_up = first.is_pending();
        drop(listen);
        say(Line::WorkerAbandoned {
            id,
            abandoned: gave_up,
            listening: server.listening(),
        });
    }
    if args.spawn_child {
        // The child inherits this worker's environment, but it is not a worker.
        let out = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--whoami")
            .output()
            .await?;
        let role = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
        say(Line::WorkerChildSays { id, role });
    }
    let mut servers = Vec::new();
    for value in &args.listen {
        let options = match value.strip_prefix("fd:") {
            Some(n) => ListenOptions::fd(n.parse().map_err(|_| std::io::Error::other("fd:N"))?),
            None => match value.parse::<std::net::SocketAddr>() {
                Ok(addr) => ListenOptions::from(addr),
                Err(_) => ListenOptions::path(value),
            },
        }
        .exclusive(args.exclusive)
        .readable_all(args.readable_all)
        .writable_all(args.writable_all);
        let server = Server::with_options(
            ServerOptions {
                drop_max_connection: args.drop_max,
                ..ServerOptions::default()
            },
            netcluster::apps::echo::serve_connection,
        );
        server.set_max_connections(args.max_connections);
        server.on_drop(move |info| {
            let info = info.map(|i| Dropped {
                local_address: i.local_address,
                local_port: i.local_port,
                local_family: i.local_family.to_string(),
                remote_address: i.remote_address,
                remote_port: i.remote_port,
                remote_family: i.remote_family.to_string(),
            });
            say(Line::WorkerDrop { id, info });
        });
        match server.listen(options).await {
            Ok(address) => say(Line::WorkerListening { id, pid, address }),
            Err(e) => {
                let listen = e.get_ref().and_then(|e| e.downcast_ref::<ListenError>());
                say(Line::WorkerListenError {
                    id,
                    pid,
                    address: listen.map(|l| l.address.clone()),
                    errno: listen.and_then(ListenError::errno),
                    error: e.to_string(),
                });
                return Ok(ExitCode::from(3));
            }
        }
        servers.push(server);
    }
    loop {
        tokio::select! {
            msg = me.recv_with_handle::<Msg>() => match msg? {
                Some((_, Some(ReceivedHandle::Socket(socket)))) => {
                    // A connection the primary's relay server accepted.
                    tokio::spawn(async move {
                        let mut socket = *socket;
                        let greeting = format!("hello from worker {id}\r\n");
                        if socket.write(greeting.as_bytes()).is_ok() {
                            netcluster::apps::echo::pipe_back(socket).await;
                        }
                    });
                }
                Some((_, Some(ReceivedHandle::Server(sent)))) => {
                    let address = sent.address().clone();
                    let server = sent.serve(netcluster::apps::echo::serve_connection).await?;
                    say(Line::WorkerServingSentServer { id, address });
                    servers.push(server);
                }
                Some((Msg::Text(text), None)) if text == "count" => {
                    let mut counts = Vec::new();
                    for server in &servers {
                        counts.push(match server.get_cluster_connections().await {
                            Ok(n) => n.to_string(),
                            Err(e) => format!("error {e}"),
                        });
                    }
                    me.send(&Msg::Text(format!("cluster-count {}", counts.join(" ")))).await?;
                }
                Some((Msg::Text(text), None)) if text == "close" => {
                    for server in &servers {
                        let _ = server.close();
                    }
                    me.send(&Msg::Text("closed".into())).await?;
                }
                Some((Msg::Text(text), None)) if text == "disconnect" => me.disconnect().await,
                Some((Msg::Text(text), None)) if text == "server-back" => {
                    let server = Server::new(netcluster::apps::echo::serve_connection);
                    server
                        .listen(ListenOptions::port(0).host("127.0.0.1").exclusive(true))
                        .await?;
                    me.send_handle(&Msg::Text("server back".into()), server.clone(), false)
                        .await?;
                    // From now on only the primary accepts on it.
                    server.close()?;
                    server.closed().await;
                    me.send(&Msg::Text("closed its copy".into())).await?;
                }
                Some((Msg::Text(text), None)) if text.starts_with("socket-back ") => {
                    let to = text.trim_start_matches("socket-back ");
                    let to: std::net::SocketAddr = to
                        .parse()
                        .map_err(|_| std::io::Error::other("socket-back HOST:PORT"))?;
                    let socket = netcluster::net::connect(to).await?;
                    me.send_handle(&Msg::Text("socket back".into()), socket, false)
                        .await?;
                }
                Some((Msg::Text(text), None)) if text == "bad-handle" => {
                    // A message that says a socket rides with it; a pipe does.
                    use netcluster::protocol::message::{HandleKind, ToPrimary};
                    use netcluster::protocol::codec::{DEFAULT_MAX_FRAME, encode};
                    let (r, _w) = nix::unistd::pipe()?;
                    let lie = ToPrimary::Message {
                        data: Vec::new(),
                        handle: Some(HandleKind::Socket { origin: None }),
                    };
                    let frame = encode(&lie, DEFAULT_MAX_FRAME).map_err(std::io::Error::other)?;
                    me.send_raw_frame(&frame, &[std::os::fd::AsFd::as_fd(&r)]).await?;
                    me.send(&Msg::Text("after bad handle".into())).await?;
                }
                Some((Msg::Text(text), None)) if text == "garbage" => {
                    // Frames a broken worker could send: another protocol version, an unknown
                    // message, a truncated one, and a descriptor on a message that has none.
                    let stdin = std::io::stdin();
                    let v = netcluster::protocol::PROTOCOL_VERSION;
                    me.send_raw_frame(&[99, 0, 0], &[]).await?;
                    me.send_raw_frame(&[v, 120, 1, 2], &[]).await?;
                    me.send_raw_frame(&[v], &[]).await?;
                    me.send_raw_frame(&[v, 4], &[std::os::fd::AsFd::as_fd(&stdin)]).await?;
                    me.send(&Msg::Text("still here".into())).await?;
                }
                Some((Msg::Text(text), None)) => me.send(&Msg::Text(format!("echo {text}"))).await?,
                Some((message, None)) => say(Line::WorkerGot { id, message }),
                None => break,
            },
            _ = me.shutdown_requested() => break,
        }
    }
    for server in &servers {
        server.closed().await;
    }
    say(Line::WorkerDone { id, pid });
    Ok(ExitCode::SUCCESS)
}
