//! `netcluster serve`'s options, from the command line and from a TOML file
//! (`netcluster serve --config netcluster.toml`, `netcluster check --config netcluster.toml`).
//!
//! One type, [`ServeOptions`], is both: clap reads it from the command line and serde from the
//! file, each value through the same parser of [`crate::cli`], so the file accepts exactly what
//! the flags accept. A key is its flag's name without the `--` (`drain-timeout = 20`), the
//! program is `command = ["python3", "app.py"]`. Unknown keys are errors.
//!
//! Every field of [`ServeOptions`] is "not given" by default (`None`, empty, `false`), and the
//! layers stack with [`ServeOptions::over`]: built-in defaults ([`ServeOptions::defaults`]) <
//! the file < the flags. A repeated option (`--listen`) given as a flag replaces the file's list.
//! [`resolve`] stacks them, checks the result the way `serve` would (an option that applies only
//! to programs without a program, …) and gives the [`Serve`] a primary runs, or a [`ConfigError`]
//! that names the flag, or the file, line, column and key.
//!
//! **Adding an option**: a field of [`ServeOptions`] (its `#[arg]`, its
//! `#[serde(deserialize_with)]` through the flag's own parser, its default in
//! [`ServeOptions::defaults`]), the field of [`Serve`] it resolves to with its line in
//! [`resolve`], and its rows in `docs/operations.md` and `examples/netcluster.toml` (a test
//! checks that both name every key).

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::apps::App;
use crate::cli::{ListenSpec, parse_count, parse_listen_spec, parse_secs, parse_signal};
use crate::cluster::SchedulingPolicy;

/// The listener `serve` binds when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8124";

/// Whether the primary gives its listeners to systemd's file-descriptor store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FdStore {
    /// When systemd keeps one for the service ($FDSTORE, set by systemd 254 and later from
    /// FileDescriptorStoreMax=).
    Auto,
    /// Always (systemd before 254 does not say whether it keeps one).
    Yes,
    /// Never.
    No,
}

impl std::fmt::Display for FdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FdStore::Auto => "auto",
            FdStore::Yes => "yes",
            FdStore::No => "no",
        })
    }
}

/// How a layer of options stacks over the one below it: a value given wins; a list given
/// replaces the list below (`--listen` flags replace the file's); a switch is on if either
/// turns it on.
pub trait Layer {
    /// `self` over `below`.
    fn over(self, below: Self) -> Self;
    /// Whether this layer gives a value.
    fn is_set(&self) -> bool;
}

impl<T> Layer for Option<T> {
    fn over(self, below: Self) -> Self {
        self.or(below)
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

impl<T> Layer for Vec<T> {
    fn over(self, below: Self) -> Self {
        if self.is_empty() { below } else { self }
    }
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl Layer for bool {
    fn over(self, below: Self) -> Self {
        self || below
    }
    fn is_set(&self) -> bool {
        *self
    }
}

/// Defines [`ServeOptions`] and what is generated from its field list (stacking, the keys), so
/// that a new option is one field.
macro_rules! serve_options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$fmeta])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// Every key a file may have, in the order of the fields: the flags' names without
            /// their `--` (`command` is what follows `--`).
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// `self` over `below`, option by option (see [`Layer`]).
            #[must_use]
            pub fn over(self, below: Self) -> Self {
                Self { $($field: Layer::over(self.$field, below.$field),)* }
            }

            /// Whether this layer gives the option `key` (a key as in the file, or a flag's name
            /// without `--`).
            pub fn is_set(&self, key: &str) -> bool {
                let field = key.replace('-', "_");
                $(
                    if field == stringify!($field) {
                        return Layer::is_set(&self.$field);
                    }
                )*
                false
            }
        }
    };
}

serve_options! {
    /// Every option of `netcluster serve`, each one optional: one layer (the flags, or the file).
    ///
    /// Read from the command line (`clap`, flattened into the `serve` and `check` commands) and
    /// from a TOML file ([`ConfigFile::read`]); stacked with [`ServeOptions::over`].
    #[derive(Debug, Clone, Default, PartialEq, clap::Args, serde::Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
    pub struct ServeOptions {
        /// Number of worker processes [default: one per available core].
        #[arg(long, value_name = "N", value_parser = parse_count)]
        #[serde(deserialize_with = "de::count")]
        pub workers: Option<u32>,

        /// Where to listen: [NAME=]HOST:PORT, [IPV6]:PORT, PORT (every interface) or a Unix
        /// socket path; `systemd` for every socket systemd passed (socket activation),
        /// `systemd:NAME` for those named NAME (FileDescriptorName=). Port 0 picks a free port.
        /// May be given more than once (given as flags, they replace the file's list); a program
        /// worker gets them at descriptors 3, 4, … in this order, NAME in LISTEN_FDNAMES
        /// [default: 127.0.0.1:8124].
        // The text is also `--help`'s, where `[IPV6]` is no link.
        #[allow(rustdoc::broken_intra_doc_links)]
        #[arg(long, value_name = "ADDR", value_parser = parse_listen_spec)]
        #[serde(deserialize_with = "de::listen")]
        pub listen: Vec<ListenSpec>,

        /// Give the listeners to systemd's file-descriptor store (FileDescriptorStoreMax= in the
        /// unit), so that a primary systemd restarts after a crash gets the same sockets back and
        /// connections wait in their queues meanwhile [default: auto].
        #[arg(long, value_name = "WHEN", value_enum)]
        #[serde(deserialize_with = "de::fd_store")]
        pub fd_store: Option<FdStore>,

        /// The app the workers run: echo (the seeds' echo server) or http (hello, keep-alive)
        /// [default: echo]. Not with COMMAND.
        #[arg(long, value_name = "APP")]
        #[serde(deserialize_with = "de::app")]
        pub app: Option<App>,

        /// How connections reach the workers: round-robin (the primary accepts and hands each
        /// connection to the next idle worker; Node's default on Linux), shared (every worker
        /// accepts on the primary's socket) or reuseport (each worker binds its own socket with
        /// SO_REUSEPORT). Default: $NETCLUSTER_SCHED_POLICY, else round-robin; reuseport for a
        /// COMMAND.
        #[arg(long, value_name = "POLICY")]
        #[serde(deserialize_with = "de::policy")]
        pub policy: Option<SchedulingPolicy>,

        /// Seconds a stopping worker may spend finishing its open connections [default: 10].
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        #[serde(deserialize_with = "de::secs")]
        pub drain_timeout: Option<Duration>,

        /// The control socket for `netcluster status|scale|stop` [default: as for those].
        #[arg(long, value_name = "PATH")]
        pub control: Option<PathBuf>,

        /// Longest delay between restarts of a worker that keeps crashing (seconds; the delay
        /// starts at 0.1 s and doubles) [default: 30].
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        #[serde(deserialize_with = "de::secs")]
        pub restart_max: Option<Duration>,

        /// Seconds a new worker has to become ready (listening on every listener; a program
        /// worker: READY=1 on its NOTIFY_SOCKET) [default: 60].
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        #[serde(deserialize_with = "de::secs")]
        pub ready_timeout: Option<Duration>,

        /// For a program that never says READY=1: it is ready once it has run this long.
        /// Only with COMMAND (not --native).
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        #[serde(deserialize_with = "de::secs")]
        pub ready_after: Option<Duration>,

        /// The signal that asks a program worker to stop (SIGKILL follows at the drain
        /// deadline) [default: TERM]. Only with COMMAND (not --native).
        #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
        #[serde(deserialize_with = "de::signal")]
        pub stop_signal: Option<Signal>,

        /// Pass a program worker's stdout and stderr through as they are, without the `[slot N]`
        /// prefix on each line. Only with COMMAND (not --native).
        #[arg(long)]
        pub no_prefix: bool,

        /// How many slots a rolling reload replaces at a time [default: 1].
        #[arg(long, value_name = "N", value_parser = parse_count)]
        #[serde(deserialize_with = "de::count")]
        pub reload_batch: Option<u32>,

        /// COMMAND is a program that uses netcluster's cluster API (it gets the channel, like the
        /// built-in apps), not any program. Only with COMMAND.
        #[arg(long)]
        pub native: bool,

        /// Give a slot up after N exits in a row of workers that did not last (pm2's
        /// max_restarts): it is shown as failed, `status` exits 1, and `netcluster reload`
        /// tries it again. 0: never give up [default: 10].
        #[arg(long, value_name = "N")]
        #[serde(deserialize_with = "de::whole")]
        pub max_restarts: Option<u32>,

        /// Run the workers as USER: its uid, its group (or GROUP's) and its supplementary
        /// groups, with PR_SET_NO_NEW_PRIVS. The primary binds (a port below 1024, as root) and
        /// keeps its own user, and so does the control socket. Needs root; USER must be able to
        /// execute the workers' program (for the built-in apps, this binary) and read their
        /// directory.
        #[arg(long, value_name = "USER[:GROUP]")]
        pub user: Option<String>,

        /// Recycle a native worker after it has served N connections (gunicorn's
        /// max_requests): it is replaced as at a reload, the new worker first, so no request
        /// fails. Not for a program (the primary cannot see its requests: use --max-rss,
        /// --max-age or --watchdog).
        #[arg(long, value_name = "N")]
        #[serde(deserialize_with = "de::whole64")]
        pub max_requests: Option<u64>,

        /// Up to this many more connections before a recycle, drawn for each worker, so that
        /// workers started together do not come due together.
        #[arg(long, value_name = "J")]
        #[serde(deserialize_with = "de::whole64")]
        pub max_requests_jitter: Option<u64>,

        /// Recycle a worker whose whole process tree uses more resident memory than SIZE
        /// (80M, 1G), measured every second (uWSGI's reload-on-rss, pm2's max_memory_restart).
        #[arg(long, value_name = "SIZE", value_parser = crate::cli::parse_size)]
        #[serde(deserialize_with = "de::size")]
        pub max_rss: Option<u64>,

        /// Recycle a worker after it has run this long (2s, 30m, 12h, or seconds).
        #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
        #[serde(deserialize_with = "de::duration")]
        pub max_age: Option<Duration>,

        /// Up to this much longer before an age recycle, drawn for each worker.
        #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
        #[serde(deserialize_with = "de::duration")]
        pub max_age_jitter: Option<Duration>,

        /// Hang detection for program workers: each gets WATCHDOG_USEC (and WATCHDOG_PID) and
        /// must say WATCHDOG=1 on its NOTIFY_SOCKET at least every SECS, as under systemd; one
        /// that does not is replaced (the new worker first) and gets --watchdog-signal.
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        #[serde(deserialize_with = "de::secs")]
        pub watchdog: Option<Duration>,

        /// What a worker that missed its watchdog gets once its replacement serves; it is
        /// killed 5 s later [default: ABRT, so runtimes that dump a stack on it do].
        #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
        #[serde(deserialize_with = "de::signal")]
        pub watchdog_signal: Option<Signal>,

        /// The workers' limit on open descriptors (RLIMIT_NOFILE, soft and hard), at least 16.
        #[arg(long, value_name = "N", value_parser = crate::cli::parse_nofile)]
        #[serde(deserialize_with = "de::nofile")]
        pub rlimit_nofile: Option<u64>,

        /// The name of this instance: its control socket is NAME.sock in the runtime
        /// directory, and `netcluster status --name NAME` finds it [default: default]. Not
        /// with `control`.
        #[arg(long, value_name = "NAME", value_parser = crate::cli::parse_name)]
        #[serde(deserialize_with = "de::name")]
        pub name: Option<String>,

        /// Run COMMAND [ARGS...] as each worker instead of a built-in app. Its listeners arrive
        /// the systemd way (descriptors 3, 4, … with LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID),
        /// and it says it is ready with READY=1 on NOTIFY_SOCKET (or see --ready-after). In the
        /// file: command = ["PROGRAM", "ARG", …].
        #[arg(last = true, value_name = "COMMAND")]
        #[serde(deserialize_with = "de::command")]
        pub command: Vec<OsString>,
    }
}

impl ServeOptions {
    /// The built-in defaults, as a layer: the bottom of the stack. What is left unset has no
    /// single default (`workers`: one per core; `policy`: by the environment and the kind of
    /// worker; `control`: by the environment; no `ready-after`, no program).
    pub fn defaults() -> ServeOptions {
        ServeOptions {
            listen: vec![ListenSpec::Address {
                name: None,
                target: crate::protocol::message::ListenTarget::Tcp(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    8124,
                ))),
            }],
            fd_store: Some(FdStore::Auto),
            app: Some(App::Echo),
            drain_timeout: Some(Duration::from_secs(10)),
            restart_max: Some(Duration::from_secs(30)),
            max_restarts: Some(10),
            ready_timeout: Some(Duration::from_secs(60)),
            stop_signal: Some(Signal::SIGTERM),
            reload_batch: Some(1),
            ..ServeOptions::default()
        }
    }
}

/// What `serve` runs: the options of every layer, stacked and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Serve {
    /// Worker processes; `None`: one per available core.
    pub workers: Option<u32>,
    /// The listeners, in order.
    pub listen: Vec<ListenSpec>,
    /// systemd's file-descriptor store.
    pub fd_store: FdStore,
    /// The built-in app (when there is no program).
    pub app: App,
    /// The policy asked for; `None`: see [`Serve::policy`].
    pub policy: Option<SchedulingPolicy>,
    /// How long a stopping worker may finish its connections.
    pub drain_timeout: Duration,
    /// The control socket; `None`: the default path.
    pub control: Option<PathBuf>,
    /// The instance's name (its control socket's); `None`: `default`.
    pub name: Option<String>,
    /// The longest delay between restarts.
    pub restart_max: Duration,
    /// Exits in a row before a slot is given up on; 0: never.
    pub max_restarts: u32,
    /// Who the workers run as (`USER[:GROUP]`); `None`: the primary's user.
    pub user: Option<String>,
    /// The workers' `RLIMIT_NOFILE`.
    pub rlimit_nofile: Option<u64>,
    /// When workers are recycled.
    pub recycle: crate::cluster::Recycle,
    /// Hang detection for program workers.
    pub watchdog: Option<crate::cluster::Watchdog>,
    /// How long a new worker has to become ready.
    pub ready_timeout: Duration,
    /// A program is ready once it has run this long.
    pub ready_after: Option<Duration>,
    /// The signal that stops a program worker.
    pub stop_signal: Signal,
    /// Pass a program's output through without the `[slot N]` prefix.
    pub no_prefix: bool,
    /// Slots a rolling reload replaces at a time.
    pub reload_batch: u32,
    /// The program speaks netcluster's protocol.
    pub native: bool,
    /// The program and its arguments; empty: the built-in app.
    pub command: Vec<OsString>,
}

impl Serve {
    /// Whether the workers run any program (not netcluster's protocol): `-- COMMAND` without
    /// `--native`.
    pub fn is_program(&self) -> bool {
        !self.command.is_empty() && !self.native
    }

    /// The scheduling policy the primary uses: the one asked for; else reuseport for a program
    /// (round robin needs netcluster's protocol); else `$NETCLUSTER_SCHED_POLICY`, else round
    /// robin.
    pub fn policy(&self) -> SchedulingPolicy {
        match self.policy {
            Some(p) => p,
            None if self.is_program() => SchedulingPolicy::ReusePort,
            None => SchedulingPolicy::from_env().unwrap_or_default(),
        }
    }

    /// One line for `netcluster check`: what would run, and where.
    pub fn summary(&self) -> String {
        let workers = match self.workers {
            Some(1) => "1 worker".to_string(),
            Some(n) => format!("{n} workers"),
            None => {
                let n = std::thread::available_parallelism().map_or(1, usize::from);
                format!("{n} workers (one per core)")
            }
        };
        let what = if self.command.is_empty() {
            format!("app {}", self.app)
        } else {
            let words: Vec<String> = self
                .command
                .iter()
                .map(|w| w.to_string_lossy().into_owned())
                .collect();
            let kind = if self.native {
                "native program"
            } else {
                "program"
            };
            format!("{kind} `{}`", words.join(" "))
        };
        let listen: Vec<String> = self.listen.iter().map(describe_listen).collect();
        let control = self
            .control
            .clone()
            .unwrap_or_else(crate::cluster::control::default_path);
        format!(
            "{what}, {workers}, policy {}, listen {}, control {}",
            self.policy(),
            listen.join(" "),
            control.display()
        )
    }
}

/// A `--listen` value as the operator wrote it (a resolved host name shows its address).
fn describe_listen(spec: &ListenSpec) -> String {
    match spec {
        ListenSpec::Address { name, target } => {
            let target = match target {
                crate::protocol::message::ListenTarget::Unix(p) => format!("unix:{}", p.display()),
                other => other.to_string(),
            };
            match name {
                Some(n) => format!("{n}={target}"),
                None => target,
            }
        }
        ListenSpec::Systemd(None) => "systemd".into(),
        ListenSpec::Systemd(Some(n)) => format!("systemd:{n}"),
    }
}

/// What is wrong with a configuration: where (`--flag`, or `FILE:LINE:COL: key `x``) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `--workers`, or `netcluster.toml:3:11: key `workers``, or `netcluster.toml` alone.
    pub place: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.place, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A configuration file, read and parsed.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from, as given.
    pub path: PathBuf,
    /// Its text (to find a key's line).
    text: String,
    /// Its options.
    pub options: ServeOptions,
}

impl ConfigFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// The file cannot be read, or is not a valid configuration: the error names the file, the
    /// line and column, and the key.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            place: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        ConfigFile::parse(path, text)
    }

    /// Parses `text`, read from `path`.
    ///
    /// # Errors
    /// As [`ConfigFile::read`].
    pub fn parse(path: &Path, text: String) -> Result<ConfigFile, ConfigError> {
        match toml::from_str::<ServeOptions>(&text) {
            Ok(options) => Ok(ConfigFile {
                path: path.to_path_buf(),
                text,
                options,
            }),
            Err(e) => {
                let span = e.span();
                let key = span.as_ref().and_then(|s| key_at(&text, s));
                Err(ConfigError {
                    place: place(path, &text, span.map(|s| s.start), key.as_deref()),
                    message: e.message().trim_end().replace('\n', "; "),
                })
            }
        }
    }

    /// Where `key` is in the file (`FILE:LINE:COL: key `x``), or the file's name.
    pub fn place_of(&self, key: &str) -> String {
        let at = toml::de::DeTable::parse(&self.text).ok().and_then(|table| {
            table
                .get_ref()
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == key)
                .map(|(k, _)| k.span().start)
        });
        place(&self.path, &self.text, at, Some(key))
    }
}

/// The top-level key whose name or value holds `span`.
fn key_at(text: &str, span: &Range<usize>) -> Option<String> {
    let (table, _) = toml::de::DeTable::parse_recoverable(text);
    table
        .get_ref()
        .iter()
        .find(|(k, v)| {
            let (k, v) = (k.span(), v.span());
            (k.start <= span.start && span.start < k.end.max(k.start + 1))
                || (v.start <= span.start && span.start < v.end.max(v.start + 1))
        })
        .map(|(k, _)| k.get_ref().to_string())
}

/// `FILE:LINE:COL: key `x`` (1-based; the column counts characters), as much as is known.
fn place(path: &Path, text: &str, at: Option<usize>, key: Option<&str>) -> String {
    let mut out = path.display().to_string();
    if let Some(at) = at {
        let at = at.min(text.len());
        let before = text.get(..at).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let col = before
            .rsplit_once('\n')
            .map_or(before, |(_, l)| l)
            .chars()
            .count()
            + 1;
        out.push_str(&format!(":{line}:{col}"));
    }
    if let Some(key) = key {
        out.push_str(&format!(": key `{key}`"));
    }
    out
}

/// Stacks the flags over the file over the defaults, and checks the result as `serve` would.
///
/// # Errors
/// What is wrong, naming the flag, or the file, line and key, that gave the value.
pub fn resolve(flags: ServeOptions, file: Option<&ConfigFile>) -> Result<Serve, ConfigError> {
    let fileopts = file.map(|f| f.options.clone()).unwrap_or_default();
    let o = flags.clone().over(fileopts).over(ServeOptions::defaults());
    // Blames `key` where its value came from: the flag, else the file.
    let blame = |key: &str, message: String| -> ConfigError {
        let place = match file {
            Some(f) if !flags.is_set(key) && f.options.is_set(key) => f.place_of(key),
            // What follows `--`.
            _ if key == "command" => "COMMAND".to_string(),
            _ => format!("--{key}"),
        };
        ConfigError { place, message }
    };
    if let Some(program) = o.command.first() {
        if program.as_encoded_bytes().starts_with(b"-") {
            return Err(blame(
                "command",
                format!(
                    "{:?} starts with '-': an option, not a program. netcluster's options go \
                     before `--`, and what follows `--` is the program and its arguments \
                     (netcluster serve --workers 2 -- PROGRAM ARGS)",
                    program.to_string_lossy()
                ),
            ));
        }
    }
    let program = !o.command.is_empty();
    let any_program = program && !o.native;
    for key in ["ready-after", "stop-signal", "no-prefix"] {
        if (flags.is_set(key) || fileopts_set(file, key)) && !any_program {
            let why = if program {
                "applies only to a program worker, and --native says COMMAND speaks \
                 netcluster's protocol (a native worker is ready once it listens and stops on \
                 the primary's word)"
            } else {
                "applies only to a program worker, and no program is given (`-- COMMAND` or \
                 `command = [...]`): the built-in app would ignore it"
            };
            return Err(blame(key, why.into()));
        }
    }
    for key in ["watchdog", "watchdog-signal"] {
        if (flags.is_set(key) || fileopts_set(file, key)) && !any_program {
            return Err(blame(
                key,
                "applies only to a program worker (it says WATCHDOG=1 on its NOTIFY_SOCKET); a \
                 native worker answers the primary's pings already"
                    .into(),
            ));
        }
    }
    if o.watchdog_signal.is_some() && o.watchdog.is_none() {
        return Err(blame(
            "watchdog-signal",
            "is what a worker that missed its watchdog gets, and --watchdog is not given".into(),
        ));
    }
    if let Some(n) = o.max_requests {
        if n == 0 {
            return Err(blame(
                "max-requests",
                "0 connections would recycle every worker at once: give 1 or more".into(),
            ));
        }
        if any_program {
            return Err(blame(
                "max-requests",
                "counts the connections a worker served, which only a native worker tells the \
                 primary: for a program use --max-rss SIZE (memory), --max-age DURATION (age) \
                 or --watchdog SECS (a hung program)"
                    .into(),
            ));
        }
    }
    match (o.max_requests, o.max_requests_jitter) {
        (None, Some(_)) => {
            return Err(blame(
                "max-requests-jitter",
                "spreads --max-requests, which is not given".into(),
            ));
        }
        (Some(n), Some(j)) if j > n => {
            return Err(blame(
                "max-requests-jitter",
                format!("{j} is larger than --max-requests {n}: the jitter must not exceed it"),
            ));
        }
        _ => {}
    }
    match (o.max_age, o.max_age_jitter) {
        (None, Some(_)) => {
            return Err(blame(
                "max-age-jitter",
                "spreads --max-age, which is not given".into(),
            ));
        }
        (Some(a), Some(j)) if j > a => {
            return Err(blame(
                "max-age-jitter",
                format!("{j:?} is longer than --max-age {a:?}: the jitter must not exceed it"),
            ));
        }
        (Some(a), _) if a.is_zero() => {
            return Err(blame(
                "max-age",
                "0 would recycle every worker at once: give a duration".into(),
            ));
        }
        _ => {}
    }
    if o.name.is_some() && o.control.is_some() {
        return Err(blame(
            "name",
            "and `control` both say where the control socket is: give one (the name puts it at \
             NAME.sock in the runtime directory)"
                .into(),
        ));
    }
    if o.native && !program {
        return Err(blame(
            "native",
            "says that COMMAND speaks netcluster's protocol, and no program is given \
             (`-- COMMAND` or `command = [...]`)"
                .into(),
        ));
    }
    if program && (flags.is_set("app") || fileopts_set(file, "app")) {
        return Err(blame(
            "app",
            "chooses a built-in app, and a program is given (`-- COMMAND` or `command`): the \
             workers run the program"
                .into(),
        ));
    }
    if program && !o.native && o.policy == Some(SchedulingPolicy::RoundRobin) {
        return Err(blame(
            "policy",
            "round-robin needs netcluster's protocol, which COMMAND does not speak: use \
             --policy reuseport (each worker its own socket, balanced by the kernel) or --policy \
             shared (one socket for all), or --native if COMMAND uses netcluster's cluster API"
                .into(),
        ));
    }
    // Every layer's value is set in `defaults`, so these hold; the fallbacks only keep this
    // function total.
    let d = ServeOptions::defaults();
    Ok(Serve {
        workers: o.workers,
        listen: o.listen,
        fd_store: o.fd_store.or(d.fd_store).unwrap_or(FdStore::Auto),
        app: o.app.unwrap_or_default(),
        policy: o.policy,
        drain_timeout: o.drain_timeout.or(d.drain_timeout).unwrap_or_default(),
        control: o.control,
        name: o.name,
        restart_max: o.restart_max.or(d.restart_max).unwrap_or_default(),
        max_restarts: o.max_restarts.or(d.max_restarts).unwrap_or(10),
        user: o.user,
        rlimit_nofile: o.rlimit_nofile,
        recycle: crate::cluster::Recycle {
            max_requests: o.max_requests,
            max_requests_jitter: o.max_requests_jitter.unwrap_or(0),
            max_rss: o.max_rss,
            max_age: o.max_age,
            max_age_jitter: o.max_age_jitter.unwrap_or_default(),
        },
        watchdog: o.watchdog.map(|interval| crate::cluster::Watchdog {
            interval,
            signal: o.watchdog_signal.unwrap_or(Signal::SIGABRT),
            grace: Duration::from_secs(5),
        }),
        ready_timeout: o.ready_timeout.or(d.ready_timeout).unwrap_or_default(),
        ready_after: o.ready_after,
        stop_signal: o.stop_signal.unwrap_or(Signal::SIGTERM),
        no_prefix: o.no_prefix,
        reload_batch: o.reload_batch.unwrap_or(1),
        native: o.native,
        command: o.command,
    })
}

/// Whether the file gives `key`.
fn fileopts_set(file: Option<&ConfigFile>, key: &str) -> bool {
    file.is_some_and(|f| f.options.is_set(key))
}

/// Reading the file's values through the flags' parsers.
mod de {
    use std::ffi::OsString;
    use std::time::Duration;

    use serde::Deserializer;
    use serde::de::{Error, SeqAccess, Visitor};

    use super::{App, FdStore, ListenSpec, SchedulingPolicy, Signal};

    /// A scalar as the text a flag would have: a string, or a number written out (`4`, `0.5`).
    struct Scalar;

    impl Visitor<'_> for Scalar {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    /// The value, read as the flag's text and parsed by the flag's parser.
    fn parsed<'de, D, T, E>(
        d: D,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        E: std::fmt::Display,
    {
        let text = d.deserialize_any(Scalar)?;
        parse(&text).map(Some).map_err(D::Error::custom)
    }

    pub(super) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        parsed(d, crate::cli::parse_count)
    }

    pub(super) fn name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        parsed(d, crate::cli::parse_name)
    }

    pub(super) fn whole64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        parsed(d, |s| {
            s.parse::<u64>()
                .map_err(|_| format!("{s:?} is not a whole number (0 or more)"))
        })
    }

    pub(super) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        parsed(d, crate::cli::parse_size)
    }

    pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        parsed(d, crate::cli::parse_duration)
    }

    pub(super) fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        parsed(d, |s| {
            s.parse::<u32>()
                .map_err(|_| format!("{s:?} is not a whole number (0 or more)"))
        })
    }

    pub(super) fn nofile<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        parsed(d, crate::cli::parse_nofile)
    }

    pub(super) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        parsed(d, crate::cli::parse_secs)
    }

    pub(super) fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Signal>, D::Error> {
        parsed(d, crate::cli::parse_signal)
    }

    pub(super) fn app<'de, D: Deserializer<'de>>(d: D) -> Result<Option<App>, D::Error> {
        parsed(d, str::parse::<App>)
    }

    pub(super) fn policy<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SchedulingPolicy>, D::Error> {
        parsed(d, str::parse::<SchedulingPolicy>)
    }

    pub(super) fn fd_store<'de, D: Deserializer<'de>>(d: D) -> Result<Option<FdStore>, D::Error> {
        parsed(d, |s| {
            <FdStore as clap::ValueEnum>::from_str(s, false)
                .map_err(|_| format!("{s:?} is not one of auto, yes, no"))
        })
    }

    /// `listen = "ADDR"` or `listen = ["NAME=ADDR", …]`.
    pub(super) fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ListenSpec>, D::Error> {
        struct Listen;
        impl<'de> Visitor<'de> for Listen {
            type Value = Vec<ListenSpec>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address, or an array of addresses")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                crate::cli::parse_listen_spec(v)
                    .map(|s| vec![s])
                    .map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    let spec = crate::cli::parse_listen_spec(&v).map_err(|e| {
                        A::Error::custom(format!("item {} ({v:?}): {e}", out.len() + 1))
                    })?;
                    out.push(spec);
                }
                if out.is_empty() {
                    return Err(A::Error::custom(
                        "an empty list: leave `listen` out for the default, 127.0.0.1:8124",
                    ));
                }
                Ok(out)
            }
        }
        d.deserialize_any(Listen)
    }

    /// `command = ["PROGRAM", "ARG", …]`.
    pub(super) fn command<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OsString>, D::Error> {
        let words: Vec<String> = serde::Deserialize::deserialize(d)?;
        if words.is_empty() {
            return Err(D::Error::custom(
                "an empty list names no program: leave `command` out for the built-in app",
            ));
        }
        Ok(words.into_iter().map(OsString::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::ListenTarget;

    fn file(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("n.toml"), text.to_string())
    }

    const EVERY_KEY: &str = r#"
workers = 3
listen = ["web=127.0.0.1:8080", "admin=/tmp/admin.sock", "systemd:api"]
fd-store = "no"
policy = "shared"
drain-timeout = 2.5
control = "/tmp/c.sock"
restart-max = "5"
ready-timeout = 20
ready-after = 0.5
stop-signal = "QUIT"
no-prefix = true
reload-batch = 2
max-restarts = 0
max-rss = "512M"
max-age = "12h"
max-age-jitter = "30m"
user = "nobody:nogroup"
rlimit-nofile = 4096
native = false
command = ["python3", "app.py", "--port", "x"]
"#;

    #[test]
    fn every_key_parses_through_the_flags_parsers() {
        let f = file(EVERY_KEY).expect("parses");
        let o = &f.options;
        assert_eq!(o.workers, Some(3));
        assert_eq!(
            o.listen,
            vec![
                ListenSpec::Address {
                    name: Some("web".into()),
                    target: ListenTarget::Tcp("127.0.0.1:8080".parse().expect("addr")),
                },
                ListenSpec::Address {
                    name: Some("admin".into()),
                    target: ListenTarget::Unix("/tmp/admin.sock".into()),
                },
                ListenSpec::Systemd(Some("api".into())),
            ]
        );
        assert_eq!(o.fd_store, Some(FdStore::No));
        assert_eq!(o.policy, Some(SchedulingPolicy::Shared));
        assert_eq!(o.drain_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.control, Some(PathBuf::from("/tmp/c.sock")));
        assert_eq!(o.restart_max, Some(Duration::from_secs(5)));
        assert_eq!(o.ready_timeout, Some(Duration::from_secs(20)));
        assert_eq!(o.ready_after, Some(Duration::from_millis(500)));
        assert_eq!(o.stop_signal, Some(Signal::SIGQUIT));
        assert!(o.no_prefix);
        assert_eq!(o.reload_batch, Some(2));
        assert_eq!(o.max_restarts, Some(0));
        assert_eq!(o.user.as_deref(), Some("nobody:nogroup"));
        assert_eq!(o.rlimit_nofile, Some(4096));
        assert!(!o.native);
        assert_eq!(o.command, ["python3", "app.py", "--port", "x"]);
        // `app` is for the built-in apps only: it parses, alone.
        assert_eq!(
            file("app = \"http\"").expect("app").options.app,
            Some(App::Http)
        );
        // --max-requests is for native workers only: it parses, alone.
        let mr = file("max-requests = 1000\nmax-requests-jitter = 100").expect("max-requests");
        assert_eq!(mr.options.max_requests, Some(1000));
        assert_eq!(mr.options.max_requests_jitter, Some(100));
        assert_eq!(o.max_rss, Some(512 * 1024 * 1024));
        assert_eq!(o.max_age, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(o.max_age_jitter, Some(Duration::from_secs(30 * 60)));
        // The watchdog is for a program only: it parses, alone.
        let wd = file("watchdog = 2\nwatchdog-signal = \"QUIT\"").expect("watchdog");
        assert_eq!(wd.options.watchdog, Some(Duration::from_secs(2)));
        assert_eq!(wd.options.watchdog_signal, Some(Signal::SIGQUIT));
        // `name` is not with `control`: it parses, alone.
        assert_eq!(
            file("name = \"web\"")
                .expect("name")
                .options
                .name
                .as_deref(),
            Some("web")
        );
        // Every key of the type is in this test (or the lines above).
        for key in ServeOptions::KEYS {
            let key = key.replace('_', "-");
            assert!(
                key == "app"
                    || key == "name"
                    || key.starts_with("watchdog")
                    || key.starts_with("max-requests")
                    || EVERY_KEY.contains(&format!("\n{key} = ")),
                "{key} is not tested"
            );
        }
        let serve = resolve(ServeOptions::default(), Some(&f)).expect("valid");
        assert!(serve.is_program());
        assert_eq!(serve.policy(), SchedulingPolicy::Shared);
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line_and_column() {
        let e = file("workers = 2\n\n  wrokers = 3\n").expect_err("unknown");
        assert_eq!(e.place, "n.toml:3:3: key `wrokers`", "{e}");
        assert!(e.message.contains("unknown field `wrokers`"), "{e}");
        let e = file("[serve]\nworkers = 2\n").expect_err("a table");
        assert!(e.to_string().starts_with("n.toml:1:"), "{e}");
        assert!(e.message.contains("serve"), "{e}");
    }

    #[test]
    fn a_bad_value_names_its_key_and_says_what_the_flag_would() {
        let cases = [
            ("workers = 0", "n.toml:1:11: key `workers`", "1 to 4096"),
            ("\nworkers = 2.5", "n.toml:2:11: key `workers`", "1 to 4096"),
            (
                "drain-timeout = 1e19",
                "n.toml:1:17: key `drain-timeout`",
                "longer than the maximum",
            ),
            (
                "listen = [\n  \"127.0.0.1:8080\",\n  \"127.0.0.1:70000\",\n]",
                "n.toml:1:10: key `listen`",
                "item 2 (\"127.0.0.1:70000\"): invalid port \"70000\"",
            ),
            ("listen = []", "n.toml:1:10: key `listen`", "empty list"),
            (
                "stop-signal = \"TREM\"",
                "key `stop-signal`",
                "not a signal name",
            ),
            (
                "policy = \"fastest\"",
                "key `policy`",
                "unknown scheduling policy",
            ),
            ("fd-store = \"maybe\"", "key `fd-store`", "auto, yes, no"),
            ("app = \"ftp\"", "key `app`", "unknown app"),
            ("native = \"yes\"", "key `native`", "expected a boolean"),
            ("command = \"python3 app.py\"", "key `command`", "sequence"),
            ("command = []", "key `command`", "names no program"),
        ];
        for (text, place, message) in cases {
            let e = file(text).expect_err(text);
            assert!(e.place.contains(place), "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
        }
        let e = file("workers = ").expect_err("syntax");
        assert!(e.place.starts_with("n.toml:1:"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_the_defaults() {
        let f = file(
            "workers = 3\nlisten = [\"a=127.0.0.1:1\", \"b=127.0.0.1:2\"]\ndrain-timeout = 4\n",
        )
        .expect("parses");
        let flags = ServeOptions {
            workers: Some(5),
            listen: vec![crate::cli::parse_listen_spec("c=127.0.0.1:3").expect("spec")],
            ..ServeOptions::default()
        };
        let s = resolve(flags, Some(&f)).expect("valid");
        assert_eq!(s.workers, Some(5), "the flag wins");
        assert_eq!(s.listen.len(), 1, "a flag's list replaces the file's");
        assert_eq!(s.drain_timeout, Duration::from_secs(4), "the file's");
        assert_eq!(s.ready_timeout, Duration::from_secs(60), "the default");
        let s = resolve(ServeOptions::default(), None).expect("defaults");
        assert_eq!(s.listen, ServeOptions::defaults().listen);
        assert_eq!(s.app, App::Echo);
        assert_eq!(s.stop_signal, Signal::SIGTERM);
        assert_eq!(s.reload_batch, 1);
        assert_eq!(
            ServeOptions::defaults().listen,
            vec![crate::cli::parse_listen_spec(DEFAULT_LISTEN).expect("default")]
        );
    }

    #[test]
    fn program_options_without_a_program_are_refused_where_they_were_given() {
        let f = file("workers = 2\nready-after = 1\n").expect("parses");
        let e = resolve(ServeOptions::default(), Some(&f)).expect_err("no program");
        assert_eq!(e.place, "n.toml:2:1: key `ready-after`");
        assert!(e.message.contains("no program is given"), "{e}");
        let flags = ServeOptions {
            stop_signal: Some(Signal::SIGINT),
            ..ServeOptions::default()
        };
        let e = resolve(flags, None).expect_err("no program");
        assert_eq!(e.place, "--stop-signal");
        // The file's program makes the flag right.
        let f = file("command = [\"python3\", \"app.py\"]").expect("parses");
        let flags = ServeOptions {
            no_prefix: true,
            ..ServeOptions::default()
        };
        assert!(resolve(flags, Some(&f)).is_ok());
        let flags = ServeOptions {
            native: true,
            ready_after: Some(Duration::from_secs(1)),
            ..ServeOptions::default()
        };
        let e = resolve(flags, Some(&f)).expect_err("native");
        assert_eq!(e.place, "--ready-after");
        assert!(e.message.contains("--native"), "{e}");
        let flags = ServeOptions {
            native: true,
            ..ServeOptions::default()
        };
        assert_eq!(resolve(flags, None).expect_err("native").place, "--native");
        let e = resolve(
            ServeOptions::default(),
            Some(&file("app = \"http\"\ncommand = [\"x\"]").expect("parses")),
        )
        .expect_err("app");
        assert_eq!(e.place, "n.toml:1:1: key `app`");
        let e = resolve(
            ServeOptions::default(),
            Some(&file("policy = \"round-robin\"\ncommand = [\"x\"]").expect("parses")),
        )
        .expect_err("round robin");
        assert!(e.message.contains("--policy reuseport"), "{e}");
    }

    #[test]
    fn a_command_that_starts_with_a_dash_is_an_option_in_the_wrong_place() {
        let flags = ServeOptions {
            command: vec!["--workers".into(), "2".into()],
            ..ServeOptions::default()
        };
        let e = resolve(flags, None).expect_err("dash");
        assert_eq!(e.place, "COMMAND");
        assert!(e.message.contains("\"--workers\""), "{e}");
        assert!(e.message.contains("before `--`"), "{e}");
    }
}
