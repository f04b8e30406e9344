//! The `netcluster` command.
//!
//! - `netcluster serve` runs a primary that binds the listeners and re-executes itself as
//!   worker processes, which serve a built-in app (the seeds' echo server, or HTTP) on the
//!   shared sockets. It restarts crashed workers, scales on `SIGTTIN`/`SIGTTOU` and on
//!   request, stops gracefully on `SIGTERM`/`SIGINT`, and answers on a control socket.
//! - `netcluster status|scale|stop` talk to a running primary over its control socket.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use netcluster::apps::App;
use netcluster::cluster::control::{self, Request};
use netcluster::cluster::{self, Cluster, Role, SchedulingPolicy, Settings};
use netcluster::net::ListenOptions;
use netcluster::protocol::handle::check_unix_path;
use netcluster::protocol::message::{ListenParams, ListenTarget};

/// Node.js-style cluster: a primary shares listening sockets with worker processes.
#[derive(Debug, Parser)]
#[command(name = "netcluster", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in app (the echo server of Node's `net` docs, or HTTP) across worker
    /// processes that share the primary's listening sockets.
    Serve(ServeArgs),
    /// Show a running primary's listeners, slots and workers.
    Status {
        /// Print the status as JSON (the schema is in docs/operations.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Run N workers; returns once they are ready (or says why not).
    Scale {
        /// The number of workers.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
        workers: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Stop a running primary gracefully; returns once it has stopped.
    Stop {
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Clone, Args)]
struct ControlArgs {
    /// The primary's control socket [default: $NETCLUSTER_CONTROL, else
    /// $XDG_RUNTIME_DIR/netcluster/control.sock, else /tmp/netcluster-UID/control.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_secs)]
    timeout: Duration,
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

    /// The app the workers run: echo (the seeds' echo server) or http (hello, keep-alive).
    #[arg(long, value_name = "APP", default_value = "echo")]
    app: App,

    /// How connections reach the workers: round-robin (the primary accepts and hands each
    /// connection to the next idle worker; Node's default on Linux), shared (every worker
    /// accepts on the primary's socket) or reuseport (each worker binds its own socket with
    /// SO_REUSEPORT). Default: $NETCLUSTER_SCHED_POLICY, else round-robin.
    #[arg(long, value_name = "POLICY")]
    policy: Option<SchedulingPolicy>,

    /// Seconds a stopping worker may spend finishing its open connections.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    drain_timeout: Duration,

    /// The control socket for `netcluster status|scale|stop` [default: as for those].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Longest delay between restarts of a worker that keeps crashing (seconds; the delay
    /// starts at 0.1 s and doubles).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    restart_max: Duration,

    /// Seconds a new worker has to become ready (listening on every listener).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    ready_timeout: Duration,
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

/// The longest duration any option takes: a day.
const MAX_SECS: f64 = 86_400.0;

/// Parses seconds (`10`, `0.5`), refusing what is not a duration a primary can wait for.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration in seconds"));
    }
    if secs > MAX_SECS {
        return Err(format!(
            "{s} seconds is longer than the maximum of {MAX_SECS} (a day)"
        ));
    }
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
    // Before anything is opened: the descriptors this process was given.
    cluster::inherited_fds();
    let cli = Cli::parse();
    netcluster::init_tracing();
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
    let result = match cli.command {
        Command::Serve(args) => match cluster::role() {
            Role::Primary => runtime.block_on(primary(args)),
            Role::Worker { id } => runtime
                .block_on(worker(args))
                .with_context(|| format!("worker {id}")),
        },
        Command::Status { json, control } => runtime.block_on(status(json, control)),
        Command::Scale { workers, control } => runtime.block_on(scale(workers, control)),
        Command::Stop { control } => runtime.block_on(stop(control)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "netcluster: {e:#}");
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
    if let Some(backoff) = &mut settings.respawn {
        backoff.max = args.restart_max.max(backoff.initial);
        backoff.reset_after = backoff.reset_after.max(backoff.max);
    }
    settings.timeouts.ready = args.ready_timeout;
    let workers = settings.workers;
    let mut cluster = Cluster::new(settings);
    // Nothing here reads events: keep none (the log says what happens).
    drop(cluster.take_events());
    let handle = cluster.handle();
    // The control socket first: a second primary on the same path fails before it binds
    // anything, and once `listening on` is printed the primary answers `netcluster status`.
    let control_path = args.control.clone().unwrap_or_else(control::default_path);
    let control = control::serve(
        &control_path,
        handle.clone(),
        Arc::new(control::NoOperations),
    )?;
    tracing::info!("control socket at {}", control.path().display());
    {
        let mut out = std::io::stdout().lock();
        for target in &args.listen {
            let address = handle
                .share(target.clone(), ListenParams::default(), None)
                .await?;
            writeln!(out, "listening on {address}")?;
        }
        out.flush()?;
    }
    cluster::signals::spawn(handle.clone(), cluster::signals::Hooks::default())
        .context("cannot install signal handlers")?;
    tracing::info!(workers, policy = %cluster.settings().policy, app = %args.app, "starting workers");
    match handle.scale(workers).await {
        Ok(_) => tracing::info!("{workers} workers ready"),
        Err(e) => tracing::error!("workers not ready: {e}"),
    }
    cluster.wait().await;
    control.close(Duration::from_secs(2)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn worker(args: ServeArgs) -> anyhow::Result<()> {
    let me = cluster::worker()
        .await?
        .context("started as a worker without a channel")?;
    let mut servers = Vec::new();
    for target in &args.listen {
        let server = args.app.server(Some(me.clone()));
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

async fn ask(control: &ControlArgs, request: Request) -> anyhow::Result<serde_json::Value> {
    let path = control
        .control
        .clone()
        .unwrap_or_else(control::default_path);
    let reply = control::request(&path, request, control.timeout).await?;
    if !reply.ok {
        bail!(
            reply
                .error
                .unwrap_or_else(|| "the primary refused without a reason".into())
        );
    }
    Ok(reply.result.unwrap_or(serde_json::Value::Null))
}

async fn status(json: bool, control: ControlArgs) -> anyhow::Result<()> {
    let value = ask(&control, Request::Status).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let status: cluster::Status =
        serde_json::from_value(value).context("the primary's status has an unknown shape")?;
    print!("{}", status.table());
    Ok(())
}

async fn scale(workers: u32, control: ControlArgs) -> anyhow::Result<()> {
    let value = ask(
        &control,
        Request::Scale {
            workers: workers as usize,
        },
    )
    .await?;
    let report: cluster::ScaleReport =
        serde_json::from_value(value).context("the primary's reply has an unknown shape")?;
    println!(
        "scaled from {} to {} workers (started {:?}, stopped {:?})",
        report.from, report.to, report.started, report.stopped
    );
    Ok(())
}

async fn stop(control: ControlArgs) -> anyhow::Result<()> {
    let value = ask(&control, Request::Stop).await?;
    let n = value
        .get("workers_exited")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    println!("stopped ({n} workers exited)");
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

    #[test]
    fn durations_are_capped_at_parse_time() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("86400"), Ok(Duration::from_secs(86_400)));
        let e = parse_secs("1e19").expect_err("too long");
        assert_eq!(
            e,
            "1e19 seconds is longer than the maximum of 86400 (a day)"
        );
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("inf").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("ten").is_err());
    }
}
