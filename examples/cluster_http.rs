//! The multi-core scaling demo: N worker processes serving HTTP "hello" with hyper on one
//! address shared by the primary.
//!
//! ```text
//! cargo run --release --example cluster_http -- --workers 4 --policy round-robin --listen 127.0.0.1:8080
//! wrk -t4 -c64 -d10s http://127.0.0.1:8080/
//! ```
//!
//! On start the primary prints `listening on ADDRESS` (the real port for port 0). On SIGINT or
//! SIGTERM the cluster stops gracefully (keep-alive connections are closed after their current
//! request) and every worker prints `worker <id> pid <pid> connections <n>`: the connections it
//! accepted, so the policy's fairness can be read off.
//!
//! Options: `--workers N` (default: one per core), `--policy round-robin|shared|reuseport`
//! (default round-robin), `--listen HOST:PORT` (default 127.0.0.1:8080).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use netcluster::cluster::{self, Cluster, Event, Role, SchedulingPolicy};
use netcluster::net::{ListenOptions, Server};
use netcluster::protocol::message::{ListenParams, ListenTarget};
use tokio::signal::unix::{SignalKind, signal};

struct Args {
    workers: Option<usize>,
    policy: SchedulingPolicy,
    listen: SocketAddr,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: None,
        policy: SchedulingPolicy::RoundRobin,
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--workers" => {
                let v = value()?;
                args.workers = Some(v.parse().map_err(|_| format!("--workers {v:?}"))?);
            }
            "--policy" => args.policy = value()?.parse()?,
            "--listen" => {
                let v = value()?;
                args.listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v:?}: expected HOST:PORT"))?;
            }
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
            eprintln!("cluster_http: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cluster::role() {
        Role::Primary => primary(args).await,
        Role::Worker { id } => worker(id, args).await,
    };
    netcluster::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster_http: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn primary(args: Args) -> std::io::Result<()> {
    let mut builder = Cluster::builder()?.policy(args.policy);
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    let mut cluster = builder.build();
    // Bind (or, for reuseport, reserve) before the workers start, so port 0 is known.
    let address = cluster
        .share(ListenTarget::Tcp(args.listen), &ListenParams::default())
        .await?;
    println!("listening on {address}");
    cluster.start().await?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            Some(event) = cluster.next_event() => {
                if let Event::Exit { id, code, signal, .. } = event {
                    tracing::warn!(worker = id, ?code, ?signal, "worker exited");
                    if cluster.workers().await.is_empty() {
                        return Err(std::io::Error::other("every worker exited"));
                    }
                }
            }
        }
    }
    cluster.disconnect().await;
    Ok(())
}

async fn worker(id: u32, args: Args) -> std::io::Result<()> {
    let me = cluster::worker()
        .await?
        .ok_or_else(|| std::io::Error::other("no channel to the primary"))?;
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let stopping = me.clone();
    let server = Server::new(move |socket| {
        counter.fetch_add(1, Ordering::Relaxed);
        // The built-in HTTP app: on stop it finishes the request in progress and closes the
        // keep-alive connection.
        netcluster::apps::http::serve_connection(socket, Some(stopping.clone()))
    });
    server.listen(ListenOptions::from(args.listen)).await?;
    me.shutdown_requested().await;
    server.closed().await;
    println!(
        "worker {id} pid {} connections {}",
        std::process::id(),
        accepted.load(Ordering::Relaxed)
    );
    Ok(())
}
