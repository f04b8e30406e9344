//! The `netcluster` command: `netcluster serve` runs a primary that binds the listeners and
//! re-executes itself as worker processes, which serve the seeds' echo server on the shared
//! sockets.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use netcluster::cluster::{self, Cluster, Event, Role, SchedulingPolicy, Settings};
use netcluster::net::ListenOptions;
use netcluster::protocol::handle::check_unix_path;
use netcluster::protocol::message::{ListenParams, ListenTarget};
use tokio::signal::unix::{SignalKind, signal};

/// Node.js-style cluster: a primary shares listening sockets with worker processes.
#[derive(Debug, Parser)]
#[command(name = "netcluster", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the echo server of Node's `net` docs across worker processes that share the
    /// primary's listening sockets.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// Number of worker processes [default: one per available core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    workers: Option<u32>,

    /// Where to listen: HOST:PORT, [IPV6]:PORT, PORT (every interface) or a Unix socket path.
    /// Port 0 picks a free port. May be given more than once.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen, default_value = "127.0.0.1:8124")]
    listen: Vec<ListenTarget>,

    /// How connections reach the workers: round-robin (the primary accepts and hands each
    /// connection to the next idle worker; Node's default on Linux), shared (every worker
    /// accepts on the primary's socket) or reuseport (each worker binds its own socket with
    /// SO_REUSEPORT). Default: $NETCLUSTER_SCHED_POLICY, else round-robin.
    #[arg(long, value_name = "POLICY")]
    policy: Option<SchedulingPolicy>,

    /// Seconds a stopping worker may spend finishing its open connections.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    drain_timeout: Duration,
}

/// Parses a `--listen` value into a target, with messages that name what was wrong.
fn parse_listen(s: &str) -> Result<ListenTarget, String> {
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>().map_err(|_| {
            format!("invalid port {p:?} in {s:?}: a port is a whole number from 0 to 65535")
        })
    };
    if s.is_empty() {
        return Err("empty address".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: an IPv6 address is written [ADDRESS]:PORT"))?;
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        return Ok(ListenTarget::Tcp(SocketAddr::new(IpAddr::V6(ip), port(p)?)));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(ListenTarget::TcpAny(port(s)?));
    }
    if !s.contains('/') {
        if let Some((host, p)) = s.rsplit_once(':') {
            let p = port(p)?;
            if host.contains(':') {
                return Err(format!("{s:?}: write an IPv6 address as [ADDRESS]:PORT"));
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(ListenTarget::Tcp(SocketAddr::new(ip, p)));
            }
            let addr = (host, p)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host:?} has no address"))?;
            return Ok(ListenTarget::Tcp(addr));
        }
    }
    let path = PathBuf::from(s);
    check_unix_path(&path).map_err(|e| e.to_string())?;
    Ok(ListenTarget::Unix(path))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a duration in seconds"))
}

/// The listen options a worker uses for a target: the same key the primary shared it under.
fn listen_options(target: &ListenTarget) -> ListenOptions {
    match target {
        ListenTarget::Tcp(addr) => ListenOptions::from(*addr),
        ListenTarget::TcpAny(port) => ListenOptions::port(*port),
        ListenTarget::Unix(path) => ListenOptions::path(path.clone()),
        ListenTarget::Fd(fd) => ListenOptions::fd(*fd),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netcluster::init_tracing();
    let Command::Serve(args) = cli.command;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netcluster: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cluster::role() {
        Role::Primary => runtime.block_on(primary(args)),
        Role::Worker { id } => runtime
            .block_on(worker(args))
            .with_context(|| format!("worker {id}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netcluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn primary(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = Settings::from_current_exe().context("cannot find this executable")?;
    if let Some(n) = args.workers {
        settings.workers = n as usize;
    }
    settings.drain_timeout = args.drain_timeout;
    if let Some(policy) = args.policy {
        settings.policy = policy;
    }
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;

    let mut cluster = Cluster::new(settings);
    {
        let mut out = std::io::stdout().lock();
        for target in &args.listen {
            let address = cluster.share(target.clone(), &ListenParams::default())?;
            writeln!(out, "listening on {address}")?;
        }
        out.flush()?;
    }
    tracing::info!(
        workers = cluster.settings().workers,
        policy = %cluster.settings().policy,
        "starting workers"
    );
    cluster.start()?;

    let mut failure = None;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            event = cluster.next_event() => {
                if let Some(Event::Exit { id, code, signal, .. }) = event {
                    tracing::warn!(worker = id, ?code, ?signal, "worker exited unexpectedly");
                    if cluster.workers().is_empty() {
                        failure = Some(format!(
                            "every worker has exited (the last, worker {id}, with code {code:?}, signal {signal:?})"
                        ));
                        break;
                    }
                }
            }
        }
    }
    tracing::info!("stopping: workers finish their connections");
    cluster.shutdown().await;
    if let Some(why) = failure {
        bail!(why);
    }
    Ok(())
}

async fn worker(args: ServeArgs) -> anyhow::Result<()> {
    let me = cluster::worker()
        .await?
        .context("started as a worker without a channel")?;
    let mut servers = Vec::new();
    for target in &args.listen {
        let server = netcluster::apps::echo::server();
        server.listen(listen_options(target)).await?;
        servers.push(server);
    }
    let reason = me.shutdown_requested().await;
    tracing::debug!(worker = me.id(), ?reason, "draining");
    // Each server closed itself when the stop was requested; wait for their connections (the
    // worker exits at the drain deadline regardless).
    for server in &servers {
        server.closed().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("127.0.0.1:0"),
            Ok(ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")))
        );
        assert_eq!(
            parse_listen("[::1]:8124"),
            Ok(ListenTarget::Tcp("[::1]:8124".parse().expect("addr")))
        );
        assert_eq!(parse_listen("8124"), Ok(ListenTarget::TcpAny(8124)));
        assert_eq!(
            parse_listen("/tmp/echo.sock"),
            Ok(ListenTarget::Unix("/tmp/echo.sock".into()))
        );
        assert_eq!(
            parse_listen("echo.sock"),
            Ok(ListenTarget::Unix("echo.sock".into()))
        );
        assert!(
            matches!(parse_listen("localhost:80"), Ok(ListenTarget::Tcp(a)) if a.ip().is_loopback())
        );
    }

    #[test]
    fn bad_listen_values_say_what_is_wrong() {
        let e = parse_listen("127.0.0.1:70000").expect_err("port");
        assert!(e.contains("invalid port \"70000\""), "{e}");
        let e = parse_listen("70000").expect_err("port");
        assert!(e.contains("0 to 65535"), "{e}");
        let e = parse_listen(&format!("/tmp/{}", "x".repeat(200))).expect_err("long");
        assert!(e.contains("at most 107 fit in sun_path"), "{e}");
        let e = parse_listen("[::1]8124").expect_err("v6");
        assert!(e.contains("[ADDRESS]:PORT"), "{e}");
        let e = parse_listen("::1:80").expect_err("v6 without brackets");
        assert!(e.contains("[ADDRESS]:PORT"), "{e}");
    }
}
