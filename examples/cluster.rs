//! Node's cluster pattern in Rust: one program that is the primary or a worker depending on how
//! it was started.
//!
//! ```text
//! cargo run --example cluster -- --workers 3 --listen 127.0.0.1:0
//! ```
//!
//! The primary forks the workers and prints their lifecycle; every worker runs the seeds' echo
//! server and listens on each `--listen` address (`HOST:PORT` or a Unix socket path). Because a
//! worker's listen is shared through the primary, every worker's `listen(0)` lands on the same
//! port. Each worker prints `worker <id> pid <pid> listening on <address>`, or
//! `worker <id> pid <pid> listen error: <error>` and exits with code 3.

use std::net::SocketAddr;
use std::process::ExitCode;

use netcluster::cluster::{self, Cluster, Event, Role, Settings};
use netcluster::net::ListenOptions;
use tokio::signal::unix::{SignalKind, signal};

struct Args {
    workers: usize,
    listen: Vec<ListenOptions>,
}

fn parse_args() -> Result<Args, String> {
    let mut workers = 2;
    let mut listen = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--workers" => {
                let v = value()?;
                workers = v
                    .parse()
                    .map_err(|_| format!("--workers {v:?}: not a number"))?;
            }
            "--listen" => {
                let v = value()?;
                listen.push(match v.parse::<SocketAddr>() {
                    Ok(addr) => ListenOptions::from(addr),
                    Err(_) => ListenOptions::path(v),
                });
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if listen.is_empty() {
        listen.push(ListenOptions::port(8124).host("127.0.0.1"));
    }
    Ok(Args { workers, listen })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    netcluster::init_tracing();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match cluster::role() {
        Role::Primary => primary(args).await,
        Role::Worker { id } => worker(id, args).await,
    };
    netcluster::flush_logs();
    code
}

async fn primary(args: Args) -> ExitCode {
    let mut settings = match Settings::from_current_exe() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    settings.workers = args.workers;
    // Node's behaviour: a worker that exits stays dead (the primary reports it).
    settings.respawn = None;
    let mut cluster = Cluster::new(settings);
    if let Err(e) = cluster.start().await {
        eprintln!("cluster: {e}");
        return ExitCode::FAILURE;
    }
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("cluster: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let mut failed = false;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            Some(event) = cluster.next_event() => match event {
                Event::Online { id, pid } => println!("primary: worker {id} pid {pid} online"),
                Event::Exit { id, code, signal, .. } => {
                    println!("primary: worker {id} exited (code {code:?}, signal {signal:?})");
                    failed |= code != Some(0);
                    if cluster.workers().await.is_empty() {
                        break;
                    }
                }
                _ => {}
            },
        }
    }
    cluster.shutdown().await;
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn worker(id: u32, args: Args) -> ExitCode {
    let pid = std::process::id();
    let me = match cluster::worker().await {
        Ok(Some(w)) => w,
        Ok(None) | Err(_) => {
            eprintln!("worker {id}: no channel to the primary");
            return ExitCode::FAILURE;
        }
    };
    let mut servers = Vec::new();
    for options in args.listen {
        let server = netcluster::apps::echo::server();
        match server.listen(options).await {
            Ok(address) => println!("worker {id} pid {pid} listening on {address}"),
            Err(e) => {
                println!("worker {id} pid {pid} listen error: {e}");
                return ExitCode::from(3);
            }
        }
        servers.push(server);
    }
    me.shutdown_requested().await;
    for server in &servers {
        server.closed().await;
    }
    ExitCode::SUCCESS
}
