//! Fault injection: a cluster in which worker 1 is hostile. It speaks the wire protocol by hand
//! on its channel and, once the file named by `HOSTILE_GO` exists, performs one attack on the
//! primary; every other worker (and whatever replaces worker 1) is an ordinary echo worker.
//! `tests/isolation.rs` runs each attack with a client load on the listener and checks that the
//! primary survives, the healthy workers serve every request, and the primary's descriptors and
//! memory return to their baseline once the hostile worker is gone.
//!
//! ```text
//! HOSTILE_GO=/tmp/go cargo run --example hostile -- --attack freeze
//! ```
//!
//! Attacks (`--attack`): `none`, `garbage` (bad frames: garbage, wrong version, unknown
//! variant, truncated, oversized, a regular file, a pipe, 250 descriptors), `freeze` (stops
//! reading its channel), `silent` (answers pings but never a hand-off), `fd-scan`
//! (`listen({fd})` on 0..64), `keys` (3000 listen keys), `counts` (100,000 count requests),
//! `count-max` (answers every count with 2^64−1, twice, and counts never asked), `messages`
//! (120 MB of user messages), `acks` (answers to hand-offs and counts never sent),
//! `hello-twice`, `old-version` (a Hello of protocol 1), `listen-first` (listens before Hello).
//!
//! The primary prints `listening on ADDRESS`, `primary pid PID`, `fork ID PID` and
//! `exit ID …` lines, and takes commands on stdin: `count` (`count N` / `count-error E`),
//! `status` (`status {JSON}`), `flood ID N SIZE` (N user messages of SIZE bytes to worker ID:
//! `flooded ID ok=… refused=…`), `stop` (`stopped in MS ms`). Options: `--workers N` (2),
//! `--policy P`, `--handoff-ms N` (1000), `--ping-ms N` (1000), `--lazy-events` (keep an event
//! subscription and never read it).

use std::io::Write as _;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netcluster::cluster::{
    self, Backoff, Cluster, Event, Limits, Role, SchedulingPolicy, Timeouts,
};
use netcluster::net::ListenOptions;
use netcluster::protocol::message::{
    ListenKey, ListenParams, ListenTarget, PROTOCOL_VERSION, ToPrimary, ToWorker,
};
use netcluster::protocol::{Channel, env};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Clone)]
struct Args {
    workers: usize,
    attack: String,
    listen: String,
    policy: Option<SchedulingPolicy>,
    handoff_ms: u64,
    ping_ms: u64,
    lazy_events: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 2,
        attack: "none".into(),
        listen: "127.0.0.1:0".into(),
        policy: None,
        handoff_ms: 1000,
        ping_ms: 1000,
        lazy_events: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--workers" => args.workers = value()?.parse().map_err(|e| format!("{e}"))?,
            "--attack" => args.attack = value()?,
            "--listen" => args.listen = value()?,
            "--policy" => args.policy = Some(value()?.parse()?),
            "--handoff-ms" => args.handoff_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--ping-ms" => args.ping_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--lazy-events" => args.lazy_events = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    netcluster::init_tracing();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hostile: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cluster::role() {
        Role::Primary => primary(args).await,
        Role::Worker { id } if id == 1 && args.attack != "none" => hostile(&args.attack).await,
        Role::Worker { id } => healthy(id, &args).await,
    };
    netcluster::flush_logs();
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("hostile: {e}");
            std::process::exit(1)
        }
    }
}

fn target(listen: &str) -> Result<ListenTarget, String> {
    listen
        .parse()
        .map(ListenTarget::Tcp)
        .map_err(|_| format!("--listen {listen:?}: HOST:PORT"))
}

async fn primary(args: Args) -> std::io::Result<()> {
    let timeouts = Timeouts {
        handoff: Duration::from_millis(args.handoff_ms),
        ping: Duration::from_millis(args.ping_ms),
        ready: Duration::from_secs(30),
        count: Duration::from_secs(5),
    };
    let mut builder = Cluster::builder()?
        .workers(args.workers)
        .drain_timeout(Duration::from_secs(2))
        .timeouts(timeouts)
        .limits(Limits::default())
        .respawn(Some(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            reset_after: Duration::from_secs(60),
            give_up_after: None,
        }));
    if let Some(p) = args.policy {
        builder = builder.policy(p);
    }
    let mut cluster = builder.build();
    let handle = cluster.handle();
    let address = handle
        .share(
            target(&args.listen).map_err(std::io::Error::other)?,
            ListenParams::default(),
            None,
        )
        .await?;
    println!("listening on {address}");
    println!("primary pid {}", std::process::id());
    // Events: printed as they come, or (with --lazy-events) held and never read.
    let _held = if args.lazy_events {
        Some(cluster.take_events())
    } else {
        let mut events = cluster.take_events();
        tokio::spawn(async move {
            while let Some(ev) = match &mut events {
                Some(e) => e.next().await,
                None => None,
            } {
                match ev {
                    Event::Fork { id, pid } => println!("fork {id} {pid}"),
                    Event::Exit {
                        id, code, signal, ..
                    } => println!("exit {id} code={code:?} signal={signal:?}"),
                    _ => {}
                }
            }
        });
        None
    };
    handle.start().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["count"] => match handle.get_connections(&address).await {
                Ok(n) => println!("count {n}"),
                Err(e) => println!("count-error {e}"),
            },
            ["status"] => match handle.status().await {
                Ok(s) => println!(
                    "status {}",
                    serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                ),
                Err(e) => println!("status-error {e}"),
            },
            ["flood", id, n, size] => {
                let (Ok(id), Ok(n), Ok(size)) =
                    (id.parse::<u32>(), n.parse::<usize>(), size.parse::<usize>())
                else {
                    println!("error flood ID N SIZE");
                    continue;
                };
                let (mut ok, mut refused) = (0, 0);
                if let Some(w) = handle.worker(id).await {
                    let body = vec![7u8; size];
                    for _ in 0..n {
                        match w.send(&body).await {
                            Ok(()) => ok += 1,
                            Err(_) => refused += 1,
                        }
                    }
                }
                println!("flooded {id} ok={ok} refused={refused}");
            }
            ["stop"] => {
                let t = Instant::now();
                let _ = handle.stop().await;
                cluster.wait().await;
                println!("stopped in {} ms", t.elapsed().as_millis());
                return Ok(());
            }
            _ => println!("error unknown command {line:?}"),
        }
    }
    Ok(())
}

/// An ordinary worker: the echo app on the shared listener.
async fn healthy(id: u32, args: &Args) -> std::io::Result<()> {
    let me = cluster::worker()
        .await?
        .ok_or_else(|| std::io::Error::other("no channel"))?;
    let server = netcluster::apps::echo::server();
    let addr: std::net::SocketAddr = args.listen.parse().map_err(std::io::Error::other)?;
    server.listen(ListenOptions::from(addr)).await?;
    println!("healthy {id} pid {} listening", std::process::id());
    me.shutdown_requested().await;
    server.closed().await;
    Ok(())
}

/// Worker 1: waits for the go file, then attacks.
async fn hostile(attack: &str) -> std::io::Result<()> {
    if let Some(go) = std::env::var_os("HOSTILE_GO") {
        while !std::path::Path::new(&go).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let fd: i32 = std::env::var(env::CHANNEL_FD)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("no channel fd"))?;
    let ch = Channel::from_fd(netcluster::protocol::fd::claim_inherited(fd)?)
        .map_err(std::io::Error::other)?;
    let id: u32 = std::env::var(env::WORKER_ID)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pid = std::process::id();
    let send = |m: ToPrimary| {
        let ch = &ch;
        async move { ch.send(&m, &[]).await.map_err(std::io::Error::other) }
    };
    let hello = ToPrimary::Hello {
        version: PROTOCOL_VERSION,
        pid,
        worker_id: id,
    };
    let key = |target: ListenTarget, ordinal: u32| ListenKey { target, ordinal };
    let addr_key = || -> std::io::Result<ListenKey> {
        let listen = std::env::args()
            .skip_while(|a| a != "--listen")
            .nth(1)
            .unwrap_or_else(|| "127.0.0.1:0".into());
        Ok(key(target(&listen).map_err(std::io::Error::other)?, 0))
    };
    println!("hostile {id} pid {pid} attacks: {attack}");
    match attack {
        "listen-first" => {
            for seq in 0..40 {
                let _ = send(ToPrimary::Listen {
                    seq,
                    key: addr_key()?,
                    params: ListenParams::default(),
                })
                .await;
            }
            idle(&ch).await
        }
        "old-version" => {
            send(ToPrimary::Hello {
                version: 1,
                pid,
                worker_id: id,
            })
            .await?;
            idle(&ch).await
        }
        _ => {
            send(hello.clone()).await?;
            wait_for(&ch, |m| matches!(m, ToWorker::Welcome { .. })).await?;
            match attack {
                "hello-twice" => {
                    for _ in 0..40 {
                        let _ = send(hello.clone()).await;
                    }
                    idle(&ch).await
                }
                "fd-scan" => {
                    let mut granted = 0;
                    for fd in 0..64 {
                        send(ToPrimary::Listen {
                            seq: fd as u64,
                            key: key(ListenTarget::Fd(fd), 0),
                            params: ListenParams::default(),
                        })
                        .await?;
                        let reply = wait_for(&ch, |m| {
                            matches!(m, ToWorker::ListenOk { .. } | ToWorker::ListenErr { .. })
                        })
                        .await?;
                        if matches!(reply, ToWorker::ListenOk { .. }) {
                            granted += 1;
                        }
                    }
                    println!("hostile fd-scan granted {granted} of 64");
                    idle(&ch).await
                }
                "keys" => {
                    let sender = async {
                        for ordinal in 0..3000u32 {
                            let k = key(
                                ListenTarget::Tcp(
                                    "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
                                ),
                                ordinal,
                            );
                            if send(ToPrimary::Listen {
                                seq: u64::from(ordinal),
                                key: k,
                                params: ListenParams::default(),
                            })
                            .await
                            .is_err()
                            {
                                break;
                            }
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    let (_, counted) = tokio::join!(sender, count_replies(&ch, 3000));
                    println!("hostile keys ok={} err={}", counted.0, counted.1);
                    idle(&ch).await
                }
                _ => {
                    // The rest listen first, as a worker would.
                    send(ToPrimary::Listen {
                        seq: 1,
                        key: addr_key()?,
                        params: ListenParams::default(),
                    })
                    .await?;
                    wait_for(&ch, |m| matches!(m, ToWorker::ListenOk { .. })).await?;
                    match attack {
                        "freeze" => loop {
                            // Never reads its channel again.
                            std::thread::sleep(Duration::from_secs(3600));
                        },
                        "silent" => serve_badly(&ch, Badly::NoAcks).await,
                        "count-max" => {
                            println!("hostile count-max answering");
                            serve_badly(&ch, Badly::MaxCounts).await
                        }
                        "garbage" => {
                            garbage(&ch).await;
                            idle(&ch).await
                        }
                        "counts" => {
                            let k = addr_key()?;
                            let sender = async {
                                for seq in 0..100_000u64 {
                                    if send(ToPrimary::CountRequest {
                                        seq,
                                        key: k.clone(),
                                    })
                                    .await
                                    .is_err()
                                    {
                                        break;
                                    }
                                }
                            };
                            let (_, counted) = tokio::join!(sender, count_replies(&ch, 100_000));
                            println!("hostile counts ok={} err={}", counted.0, counted.1);
                            idle(&ch).await
                        }
                        "messages" => {
                            let data = vec![0x5a; 60 * 1024];
                            let sender = async {
                                for _ in 0..2000 {
                                    if send(ToPrimary::Message {
                                        data: data.clone(),
                                        handle: None,
                                    })
                                    .await
                                    .is_err()
                                    {
                                        break;
                                    }
                                }
                            };
                            tokio::join!(sender, refuse_connections(&ch, Duration::from_secs(5)));
                            println!("hostile messages sent");
                            idle(&ch).await
                        }
                        "acks" => {
                            let sender = async {
                                // Hand-offs never sent: listeners that do not exist, and
                                // numbers far past any sent on the real one. (An answer to
                                // its own hand-off in flight would just be accepting it.)
                                for seq in 0..10_000u64 {
                                    let _ = send(ToPrimary::Accepted {
                                        listener: 1000 + seq % 7,
                                        accepted: vec![seq],
                                        refused: vec![seq + 1],
                                    })
                                    .await;
                                    let _ = send(ToPrimary::Accepted {
                                        listener: 1,
                                        accepted: (0..64).map(|i| u64::MAX - seq - i).collect(),
                                        refused: vec![u64::MAX - seq; 64],
                                    })
                                    .await;
                                    let _ = send(ToPrimary::CountReply {
                                        seq,
                                        count: u64::MAX,
                                    })
                                    .await;
                                    let _ = send(ToPrimary::Pong { seq }).await;
                                    let _ = send(ToPrimary::Stats {
                                        seq,
                                        listeners: Vec::new(),
                                    })
                                    .await;
                                }
                            };
                            tokio::join!(sender, refuse_connections(&ch, Duration::from_secs(5)));
                            println!("hostile acks sent");
                            idle(&ch).await
                        }
                        other => Err(std::io::Error::other(format!("unknown attack {other:?}"))),
                    }
                }
            }
        }
    }
}

/// Reads until a message matching `want` arrives (answering pings meanwhile).
async fn wait_for(ch: &Channel, want: impl Fn(&ToWorker) -> bool) -> std::io::Result<ToWorker> {
    loop {
        match ch.recv::<ToWorker>().await {
            Ok(Some((m, _fds))) => {
                if want(&m) {
                    return Ok(m);
                }
                if let ToWorker::Ping { seq } = m {
                    let _ = ch.send(&ToPrimary::Pong { seq }, &[]).await;
                }
            }
            Ok(None) => return Err(std::io::Error::other("the primary closed the channel")),
            Err(e) if e.is_bad_frame() => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Counts ListenOk/CountResult Ok (first) and errors (second) among up to `n` replies.
async fn count_replies(ch: &Channel, n: usize) -> (usize, usize) {
    let (mut ok, mut err) = (0, 0);
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    while ok + err < n {
        tokio::select! {
            () = &mut deadline => break,
            m = ch.recv::<ToWorker>() => match m {
                Ok(Some((ToWorker::ListenOk { .. }, _))) => ok += 1,
                Ok(Some((ToWorker::ListenErr { .. }, _))) => err += 1,
                Ok(Some((ToWorker::CountResult { result, .. }, _))) => {
                    if result.is_ok() { ok += 1 } else { err += 1 }
                }
                Ok(Some((ToWorker::Ping { seq }, _))) => {
                    let _ = ch.send(&ToPrimary::Pong { seq }, &[]).await;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.is_bad_frame() => {}
                Err(_) => break,
            }
        }
    }
    (ok, err)
}

/// Refuses every hand-off (so connections go to the healthy worker) and answers pings, for
/// `for_how_long`.
async fn refuse_connections(ch: &Channel, for_how_long: Duration) {
    let _ = tokio::time::timeout(for_how_long, serve_badly(ch, Badly::Refuse)).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Badly {
    /// Answers pings, never a hand-off.
    NoAcks,
    /// Answers every count with 2^64−1, twice, plus a count nobody asked for.
    MaxCounts,
    /// Refuses hand-offs, answers pings.
    Refuse,
}

async fn serve_badly(ch: &Channel, how: Badly) -> std::io::Result<()> {
    loop {
        let (msg, _fds) = match ch.recv::<ToWorker>().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) if e.is_bad_frame() => continue,
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let reply = |m: ToPrimary| async move { ch.send(&m, &[]).await };
        match msg {
            ToWorker::Ping { seq } => {
                let _ = reply(ToPrimary::Pong { seq }).await;
            }
            ToWorker::Connections { listener, seqs, .. } if how != Badly::NoAcks => {
                let _ = reply(ToPrimary::Accepted {
                    listener,
                    accepted: Vec::new(),
                    refused: seqs,
                })
                .await;
            }
            ToWorker::CountQuery { seq, .. } | ToWorker::CountSent { seq, .. }
                if how == Badly::MaxCounts =>
            {
                for _ in 0..2 {
                    let _ = reply(ToPrimary::CountReply {
                        seq,
                        count: u64::MAX,
                    })
                    .await;
                }
                let _ = reply(ToPrimary::CountReply {
                    seq: seq.wrapping_add(1000),
                    count: u64::MAX,
                })
                .await;
            }
            ToWorker::CountQuery { seq, .. } => {
                let _ = reply(ToPrimary::CountReply { seq, count: 0 }).await;
            }
            ToWorker::StatsQuery { seq } => {
                let _ = reply(ToPrimary::Stats {
                    seq,
                    listeners: Vec::new(),
                })
                .await;
            }
            ToWorker::Shutdown { .. } => return Ok(()),
            _ => {}
        }
    }
}

/// Answers pings and refuses hand-offs until the primary closes the channel.
async fn idle(ch: &Channel) -> std::io::Result<()> {
    serve_badly(ch, Badly::Refuse).await
}

/// Every kind of bad frame a broken worker could send.
async fn garbage(ch: &Channel) {
    let v = PROTOCOL_VERSION;
    let file = std::fs::File::open("/proc/self/status").ok();
    let (pipe_r, _pipe_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(_) => return,
    };
    let mut frames: Vec<Vec<u8>> = vec![
        vec![99, 0, 0],     // another protocol version
        vec![v, 120, 1, 2], // an unknown variant
        vec![v],            // truncated
        vec![
            v, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ], // a bad varint
        vec![0u8; 70 * 1024], // oversized
    ];
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..60 {
        let len = (x % 200) as usize;
        let mut f = Vec::with_capacity(len + 1);
        f.push(v);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f.push(x as u8);
        }
        frames.push(f);
    }
    for f in &frames {
        let _ = ch.send_raw(f, &[]).await;
    }
    // A message that declares no descriptor, with a regular file and with a pipe.
    let disconnect =
        netcluster::protocol::codec::encode(&ToPrimary::Disconnect, 64).unwrap_or_default();
    if let Some(file) = &file {
        let _ = ch.send_raw(&disconnect, &[file.as_fd()]).await;
    }
    let _ = ch.send_raw(&disconnect[..1], &[pipe_r.as_fd()]).await;
    // 250 descriptors on one datagram (more than the receiver's control buffer holds).
    let raw: Vec<i32> = (0..250)
        .map(|_| std::os::fd::AsRawFd::as_raw_fd(&pipe_r))
        .collect();
    let _ = nix::sys::socket::sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&ch.as_fd()),
        &[std::io::IoSlice::new(&[v, 4])],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    );
    println!("hostile garbage sent {} frames", frames.len() + 3);
}
