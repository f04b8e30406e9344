//! The `netcluster` command.
//!
//! - `netcluster serve` runs a primary that binds the listeners and re-executes itself as
//!   worker processes, which serve a built-in app (the seeds' echo server, or HTTP) on the
//!   shared sockets. It restarts crashed workers, scales on `SIGTTIN`/`SIGTTOU` and on
//!   request, stops gracefully on `SIGTERM`/`SIGINT`, and answers on a control socket.
//! - `netcluster status|scale|stop` talk to a running primary over its control socket.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use netcluster::apps::App;
use netcluster::cli::{parse_named_listen, parse_secs, parse_signal};
use netcluster::cluster::control::{self, Request};
use netcluster::cluster::{self, Cluster, Readiness, Role, SchedulingPolicy, Settings, WorkerKind};
use netcluster::net::ListenOptions;
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
    /// Rolling reload: every slot gets a new worker, started before the old one drains;
    /// returns once every slot runs the new generation (or says why not).
    Reload {
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

    /// Where to listen: [NAME=]HOST:PORT, [IPV6]:PORT, PORT (every interface) or a Unix socket
    /// path. Port 0 picks a free port. May be given more than once; a program worker gets them
    /// at descriptors 3, 4, … in this order, NAME in LISTEN_FDNAMES.
    #[arg(long, value_name = "ADDR", value_parser = parse_named_listen, default_value = "127.0.0.1:8124")]
    listen: Vec<(Option<String>, ListenTarget)>,

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

    /// Seconds a new worker has to become ready (listening on every listener; a program
    /// worker: READY=1 on its NOTIFY_SOCKET).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    ready_timeout: Duration,

    /// For a program that never says READY=1: it is ready once it has run this long.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    ready_after: Option<Duration>,

    /// The signal that asks a program worker to stop (SIGKILL follows at the drain deadline).
    #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = parse_signal)]
    stop_signal: nix::sys::signal::Signal,

    /// Pass a program worker's stdout and stderr through as they are, without the `[slot N]`
    /// prefix on each line.
    #[arg(long)]
    no_prefix: bool,

    /// How many slots a rolling reload replaces at a time.
    #[arg(long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u32).range(1..=4096))]
    reload_batch: u32,

    /// COMMAND is a program that uses netcluster's cluster API (it gets the channel, like the
    /// built-in apps), not any program.
    #[arg(long, requires = "command")]
    native: bool,

    /// Run COMMAND [ARGS...] as each worker instead of a built-in app. Its listeners arrive the
    /// systemd way (descriptors 3, 4, … with LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), and it
    /// says it is ready with READY=1 on NOTIFY_SOCKET (or see --ready-after).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
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
        Command::Reload { control } => runtime.block_on(reload(control)),
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
    settings.stop_signal = args.stop_signal;
    settings.prefix_output = !args.no_prefix;
    settings.reload_batch = args.reload_batch as usize;
    if let Some(after) = args.ready_after {
        settings.readiness = Readiness::After(after);
    }
    if let Some((program, rest)) = args.command.split_first() {
        settings.exec = program.into();
        settings.args = rest.to_vec();
        if !args.native {
            settings.kind = WorkerKind::Program;
            match args.policy {
                Some(SchedulingPolicy::RoundRobin) => {
                    // clap's own exit code for a bad argument.
                    eprintln!(
                        "netcluster: --policy round-robin needs netcluster's protocol, which \
                         COMMAND does not speak: use --policy reuseport (each worker its own \
                         socket, balanced by the kernel) or --policy shared (one socket for \
                         all), or --native if COMMAND uses netcluster's cluster API"
                    );
                    std::process::exit(2);
                }
                Some(p) => settings.policy = p,
                None => settings.policy = SchedulingPolicy::ReusePort,
            }
        }
    }
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
        for (name, target) in &args.listen {
            let address = handle
                .share(target.clone(), ListenParams::default(), name.clone())
                .await?;
            writeln!(out, "listening on {address}")?;
        }
        out.flush()?;
    }
    cluster::signals::spawn(handle.clone(), cluster::signals::Hooks::default())
        .context("cannot install signal handlers")?;
    match cluster.settings().kind {
        WorkerKind::Program => tracing::info!(
            workers,
            policy = %cluster.settings().policy,
            program = %cluster.settings().exec.display(),
            "starting workers"
        ),
        WorkerKind::Native => tracing::info!(
            workers,
            policy = %cluster.settings().policy,
            app = %args.app,
            "starting workers"
        ),
    }
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
    for (_, target) in &args.listen {
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

async fn reload(control: ControlArgs) -> anyhow::Result<()> {
    let value = ask(&control, Request::Reload).await?;
    let report: cluster::ReloadReport =
        serde_json::from_value(value).context("the primary's reply has an unknown shape")?;
    println!(
        "reloaded {} slots to generation {} in {} ms (all new serving after {} ms)",
        report.replaced.len(),
        report.generation,
        report.took_ms,
        report.serving_ms
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
