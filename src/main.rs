//! The `netcluster` command.
//!
//! - `netcluster serve` runs a primary that binds the listeners and re-executes itself as
//!   worker processes, which serve a built-in app (the seeds' echo server, or HTTP) on the
//!   shared sockets. It restarts crashed workers, scales on `SIGTTIN`/`SIGTTOU` and on
//!   request, stops gracefully on `SIGTERM`/`SIGINT`, and answers on a control socket.
//! - `netcluster check` checks `serve`'s options (a `--config` file and flags) without starting
//!   or binding anything.
//! - `netcluster status|scale|stop|reload|upgrade` talk to a running primary over its control
//!   socket; `netcluster ls` lists the running primaries.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use netcluster::apps::App;
use netcluster::cli::{ListenSpec, parse_secs};
use netcluster::cluster::control::{self, Reply, Request};
use netcluster::cluster::{
    self, Cluster, Incoming, Readiness, Role, Settings, Upgrader, WorkerKind, WorkerUser,
};
use netcluster::config::{self, ConfigFile, FdStore, Layer, Serve, ServeOptions};
use netcluster::net::ListenOptions;
use netcluster::protocol::message::{ListenParams, ListenTarget};
use netcluster::serve::{Planned, SERVE_APP_ENV, SERVE_LISTEN_ENV};

/// Node.js-style cluster: a primary shares listening sockets with worker processes.
#[derive(Debug, Parser)]
#[command(name = "netcluster", version = cluster::VERSION_LINE, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in app (the echo server of Node's `net` docs, or HTTP) across worker
    /// processes that share the primary's listening sockets.
    Serve(ServeArgs),
    /// Check serve's options — a --config file and the flags over it — as serve would, without
    /// starting or binding anything: exit 0 with a one-line summary, or 2 with what is wrong and
    /// where (FILE:LINE:COL: key `x`: …).
    Check(ServeArgs),
    /// List the running primaries of this user: name, pid, version, policy, workers ready /
    /// wanted, generation, listeners.
    Ls {
        /// Print them as JSON: {"primaries": [...], "skipped": [...]}.
        #[arg(long)]
        json: bool,
        /// Also list the stale sockets (left by primaries that died).
        #[arg(short, long)]
        verbose: bool,
        /// Seconds to wait for each primary's answer.
        #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_secs)]
        timeout: Duration,
    },
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
    /// Replace the primary with the netcluster binary now on disk, without closing a listener:
    /// the new primary takes every socket over and starts its workers, and once they are ready
    /// the old one drains its own and exits. Returns once the new primary serves (or says why
    /// not: the old one then serves on).
    Upgrade {
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Clone, Args)]
struct ControlArgs {
    /// The primary's name (`netcluster serve --name NAME`); its socket is NAME.sock in the
    /// first of $XDG_RUNTIME_DIR/netcluster, /run/user/UID/netcluster, /run/netcluster (root),
    /// /tmp/netcluster-UID where a primary answers [default: $NETCLUSTER_CONTROL, else
    /// `default`].
    #[arg(long, value_name = "NAME", value_parser = netcluster::cli::parse_name, conflicts_with = "control")]
    name: Option<String>,

    /// The primary's control socket, instead of finding it by name.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_secs)]
    timeout: Duration,
}

/// `serve`'s and `check`'s arguments: a configuration file and the options over it.
#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// Read the options from this TOML file: each key is a flag's name without `--`
    /// (`drain-timeout = 20`), the program is `command = ["PROGRAM", "ARG", …]`. Flags
    /// override the file (a --listen flag replaces the file's list); see docs/operations.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    options: ServeOptions,
}

impl ServeArgs {
    /// The file read and the flags stacked over it, checked.
    fn resolve(&self) -> Result<Serve, config::ConfigError> {
        let file = self.config.as_deref().map(ConfigFile::read).transpose()?;
        config::resolve(self.options.clone(), file.as_ref())
    }
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => without_dash_dash_tip(e).exit(),
    };
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
            Role::Primary => match args.resolve() {
                Ok(serve) => runtime.block_on(primary(serve)),
                Err(e) => return bad_configuration(&e),
            },
            // A worker never reads the file again: what it needs comes from its primary.
            Role::Worker { id } => runtime
                .block_on(worker(args.options))
                .with_context(|| format!("worker {id}")),
        },
        Command::Check(args) => return check(&args),
        Command::Ls {
            json,
            verbose,
            timeout,
        } => runtime.block_on(ls(json, verbose, timeout)),
        Command::Status { json, control } => runtime.block_on(status(json, control)),
        Command::Scale { workers, control } => runtime.block_on(scale(workers, control)),
        Command::Stop { control } => runtime.block_on(stop(control)),
        Command::Reload { control } => runtime.block_on(reload(control)),
        Command::Upgrade { control } => runtime.block_on(upgrade(control)),
    };
    netcluster::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "netcluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// clap's exit code for a bad argument, which a bad configuration is too.
const EXIT_USAGE: u8 = 2;

/// Says what is wrong with the configuration; exit 2.
fn bad_configuration(e: &config::ConfigError) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "netcluster: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// `netcluster check`: the configuration as `serve` would take it, nothing started or bound.
fn check(args: &ServeArgs) -> ExitCode {
    match args.resolve() {
        Ok(serve) => {
            let what = args.config.as_ref().map_or_else(
                || "the command line".to_string(),
                |p| p.display().to_string(),
            );
            println!("{what}: ok: {}", serve.summary());
            ExitCode::SUCCESS
        }
        Err(e) => bad_configuration(&e),
    }
}

/// clap's answer to an unknown option where a COMMAND may follow (`serve --workrs 2 -- app`)
/// ends with "tip: to pass '--workrs' as a value, use '-- --workrs'": followed, it would make
/// the mistyped option the worker program. That tip is replaced by where options go.
fn without_dash_dash_tip(mut e: clap::Error) -> clap::Error {
    use clap::builder::StyledStr;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return e;
    }
    let Some(ContextValue::StyledStrs(tips)) = e.remove(ContextKind::Suggested) else {
        return e;
    };
    let mut kept: Vec<StyledStr> = tips
        .into_iter()
        .filter(|t| !t.to_string().contains("as a value, use '--"))
        .collect();
    kept.push(StyledStr::from(
        "netcluster's options go before `--`; what follows `--` is the worker program and its \
         arguments",
    ));
    e.insert(ContextKind::Suggested, ContextValue::StyledStrs(kept));
    e
}

async fn primary(args: Serve) -> anyhow::Result<()> {
    // Who the workers run as, resolved before anything is bound: an unknown name is a bad
    // argument (clap's exit code), and a primary that cannot start its workers binds nothing.
    let user = match args.user.as_deref().map(WorkerUser::resolve) {
        None => None,
        Some(Ok(user)) => match user.check_privileged() {
            Ok(()) => Some(user),
            Err(e) => exit_bad_argument(&e),
        },
        Some(Err(e)) => exit_bad_argument(&e),
    };
    // The binary to start at an upgrade: this path, read now (an install replaces the file
    // behind it).
    let upgrader =
        Upgrader::from_current_exe(args.ready_timeout).context("cannot find this executable")?;
    // Started by an upgrade: the old primary's listeners, its generation and worker count.
    let mut incoming = Incoming::receive().await?;
    let mut settings = Settings::from_current_exe().context("cannot find this executable")?;
    if let Some(n) = args.workers {
        settings.workers = n as usize;
    }
    settings.drain_timeout = args.drain_timeout;
    if let Some(backoff) = &mut settings.respawn {
        backoff.max = args.restart_max.max(backoff.initial);
        backoff.reset_after = backoff.reset_after.max(backoff.max);
        backoff.give_up_after = (args.max_restarts > 0).then_some(args.max_restarts);
    }
    settings.timeouts.ready = args.ready_timeout;
    settings.stop_signal = args.stop_signal;
    settings.prefix_output = !args.no_prefix;
    settings.reload_batch = args.reload_batch as usize;
    settings.user = user;
    settings.rlimit_nofile = args.rlimit_nofile;
    settings.recycle = args.recycle;
    settings.watchdog = args.watchdog;
    let program = args.is_program();
    match args.fd_store {
        FdStore::Auto => {}
        FdStore::Yes => settings.fd_store = true,
        FdStore::No => settings.fd_store = false,
    }
    if let Some(after) = args.ready_after {
        settings.readiness = Readiness::After(after);
    }
    if let Some((exec, rest)) = args.command.split_first() {
        settings.exec = exec.into();
        settings.args = rest.to_vec();
        if program {
            settings.kind = WorkerKind::Program;
        }
    }
    // (`config::resolve` refused round robin for a program.)
    settings.policy = args.policy();
    if args.command.is_empty() {
        settings
            .env
            .push((SERVE_APP_ENV.into(), args.app.to_string().into()));
    }
    // The listeners: handed over by the old primary, or from the --listen values (binding
    // them, or taking systemd's).
    let listeners: Vec<Planned> = match &mut incoming {
        Some(inc) => {
            inc.configure(&mut settings);
            inc.take_listeners()
                .into_iter()
                .map(Planned::Adopt)
                .collect()
        }
        None => {
            let plan =
                netcluster::serve::plan(&args.listen, cluster::systemd::sockets(), settings.policy)
                    .map_err(anyhow::Error::msg)?;
            for (number, name, fd) in plan.unclaimed {
                tracing::info!(fd = number, %name, "closing a socket systemd passed that no --listen claims");
                drop(fd);
            }
            plan.listeners
        }
    };
    // The built-in workers listen on the same keys (a systemd socket's is its address).
    let keys: Vec<&ListenTarget> = listeners.iter().map(Planned::target).collect();
    settings.env.push((
        SERVE_LISTEN_ENV.into(),
        serde_json::to_string(&keys)?.into(),
    ));
    let workers = settings.workers;
    let mut cluster = Cluster::new(settings);
    // An upgrade starts this binary again (it takes the hand-over above).
    cluster.set_upgrader(upgrader);
    // Nothing here reads events: keep none (the log says what happens).
    drop(cluster.take_events());
    let handle = cluster.handle();
    let control_path =
        control::Target::resolve(args.control.as_deref(), args.name.as_deref()).server_path();
    // The control socket first: a second primary on the same path fails before it binds
    // anything, and once `listening on` is printed the primary answers `netcluster status`.
    // A primary taking over from an upgrade serves it only once it is the primary.
    let mut control = match &incoming {
        Some(_) => None,
        None => {
            let c = control::serve(&control_path, handle.clone())?;
            tracing::info!("control socket at {}", c.path().display());
            Some(c)
        }
    };
    let mut failure = None;
    {
        let mut out = std::io::stdout().lock();
        for planned in listeners {
            let address = match planned {
                Planned::Share { name, target } => {
                    handle.share(target, ListenParams::default(), name).await
                }
                Planned::Adopt(adopt) => handle.adopt(adopt).await,
            };
            match address {
                Ok(address) => writeln!(out, "listening on {address}")?,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        out.flush()?;
    }
    if let Some(e) = failure {
        if let Some(inc) = incoming {
            let e = inc.abandon(&handle, &e.to_string()).await;
            cluster.wait().await;
            return Err(e.into());
        }
        return Err(e.into());
    }
    if incoming.is_none() {
        cluster::signals::spawn(handle.clone()).context("cannot install signal handlers")?;
    }
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
    match incoming {
        None => match handle.scale(workers).await {
            Ok(_) => tracing::info!("{workers} workers ready"),
            Err(e) => tracing::error!("workers not ready: {e}"),
        },
        // The new primary of an upgrade: ready, then it takes over (or is called off) and
        // serves the control socket in place of the old primary's.
        Some(inc) => {
            let serve =
                |h: &cluster::ClusterHandle| control::serve_replacing(&control_path, h.clone());
            match inc.take_over(&handle, serve).await {
                Ok(c) => control = Some(c),
                Err(e) => {
                    cluster.wait().await;
                    return Err(e.into());
                }
            }
            cluster::signals::spawn(handle.clone()).context("cannot install signal handlers")?;
        }
    }
    cluster.wait().await;
    if let Some(c) = control {
        c.close(Duration::from_secs(2)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Says what is wrong with an argument and exits with clap's code for a bad one (2).
fn exit_bad_argument(e: &dyn std::fmt::Display) -> ! {
    eprintln!("netcluster: {e}");
    std::process::exit(2)
}

async fn worker(args: ServeOptions) -> anyhow::Result<()> {
    let me = cluster::worker()
        .await?
        .context("started as a worker without a channel")?;
    // The primary's app (the flag's, else the default, for a worker started by hand).
    let app: App = match std::env::var(SERVE_APP_ENV) {
        Ok(name) => name
            .parse()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{SERVE_APP_ENV} from the primary"))?,
        Err(_) => args.app.unwrap_or_default(),
    };
    // The primary's keys: a `systemd:NAME` value is the address systemd's socket is bound to.
    let targets: Vec<ListenTarget> = match std::env::var(SERVE_LISTEN_ENV) {
        Ok(json) => serde_json::from_str(&json)
            .with_context(|| format!("{SERVE_LISTEN_ENV} from the primary"))?,
        Err(_) => args
            .listen
            .over(ServeOptions::defaults().listen)
            .iter()
            .filter_map(|spec| match spec {
                ListenSpec::Address { target, .. } => Some(target.clone()),
                ListenSpec::Systemd(_) => None,
            })
            .collect(),
    };
    let mut servers = Vec::new();
    for target in &targets {
        let server = app.server(Some(me.clone()));
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

/// Sends `request` to the primary and returns its reply (the one that answers `request`: the
/// client checks).
async fn ask(control: &ControlArgs, request: Request) -> anyhow::Result<Reply> {
    let target = control::Target::resolve(control.control.as_deref(), control.name.as_deref());
    Ok(control::request_to(&target, request, control.timeout)
        .await?
        .1)
}

async fn ls(json: bool, verbose: bool, timeout: Duration) -> anyhow::Result<()> {
    let found = control::scan(timeout).await;
    let text = if json {
        let mut j = serde_json::to_string_pretty(&netcluster::instances::json(&found))?;
        j.push('\n');
        j
    } else {
        netcluster::instances::table(&found, verbose)
    };
    // Not print!: a closed pipe (`| head`) is an error to report, not a panic.
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The primary answered `request` with another reply than the one for it (which
/// [`control::request`] refuses: this is never reached).
fn unexpected(reply: &Reply) -> anyhow::Error {
    anyhow::anyhow!("the primary answered with a {:?} reply", reply.name())
}

async fn status(json: bool, control: ControlArgs) -> anyhow::Result<()> {
    let status = match ask(&control, Request::Status).await? {
        Reply::Status { result } => result,
        other => return Err(unexpected(&other)),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", status.table());
    let failed: Vec<String> = status
        .slots
        .iter()
        .filter(|s| s.failed)
        .map(|s| s.slot.to_string())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "slot{} {} failed: given up after too many restarts in a row",
            if failed.len() == 1 { "" } else { "s" },
            failed.join(", ")
        );
    }
    Ok(())
}

async fn scale(workers: u32, control: ControlArgs) -> anyhow::Result<()> {
    let request = Request::Scale {
        workers: workers as usize,
    };
    let report = match ask(&control, request).await? {
        Reply::Scaled { result } => result,
        other => return Err(unexpected(&other)),
    };
    println!(
        "scaled from {} to {} workers (started {:?}, stopped {:?})",
        report.from, report.to, report.started, report.stopped
    );
    Ok(())
}

async fn reload(control: ControlArgs) -> anyhow::Result<()> {
    let report = match ask(&control, Request::Reload).await? {
        Reply::Reloaded { result } => result,
        other => return Err(unexpected(&other)),
    };
    println!(
        "reloaded {} slots to generation {} in {} ms (all new serving after {} ms)",
        report.replaced.len(),
        report.generation,
        report.took_ms,
        report.serving_ms
    );
    Ok(())
}

/// `netcluster 0.1.0, commit 1a2b3c4` of the primary answering at `control` now, if it says.
async fn running_version(control: &ControlArgs) -> Option<String> {
    let status = match ask(control, Request::Status).await {
        Ok(Reply::Status { result }) => result,
        _ => return None,
    };
    status.version_text().map(|v| format!("netcluster {v}"))
}

async fn upgrade(control: ControlArgs) -> anyhow::Result<()> {
    let before = running_version(&control).await;
    let report = match ask(&control, Request::Upgrade).await? {
        Reply::Upgraded { result } => result,
        other => return Err(unexpected(&other)),
    };
    let after = running_version(&control).await;
    let version = |v: &Option<String>| v.as_ref().map_or_else(String::new, |v| format!(" ({v})"));
    let plural = |n: usize, one: &'static str, many: &'static str| if n == 1 { one } else { many };
    println!(
        "upgraded: primary {}{} → {}{} (generation {}), {} {} ({} {}) handed over in {} ms; \
         the old primary drains its workers and exits",
        report.old_pid,
        version(&before),
        report.new_pid,
        version(&after),
        report.generation,
        report.listeners,
        plural(report.listeners, "listener", "listeners"),
        report.sockets,
        plural(report.sockets, "socket", "sockets"),
        report.took_ms
    );
    Ok(())
}

async fn stop(control: ControlArgs) -> anyhow::Result<()> {
    let n = match ask(&control, Request::Stop).await? {
        Reply::Stopped { result } => result.workers_exited,
        other => return Err(unexpected(&other)),
    };
    println!(
        "stopped ({n} {} exited)",
        if n == 1 { "worker" } else { "workers" }
    );
    Ok(())
}
