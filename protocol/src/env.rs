//! Names of the environment variables through which a primary tells a re-executed process that
//! it is a worker.

/// The worker's id (a positive integer). Its presence makes a process a worker.
pub const WORKER_ID: &str = "NETCLUSTER_WORKER_ID";

/// The primary's process id. A process is a worker only if its channel was made by this
/// process (`SO_PEERCRED`).
pub const PRIMARY_PID: &str = "NETCLUSTER_PRIMARY_PID";

/// The number of the inherited descriptor of the worker's end of the channel.
pub const CHANNEL_FD: &str = "NETCLUSTER_CHANNEL_FD";

/// The descriptor number at which the primary places the channel in a worker.
pub const DEFAULT_CHANNEL_FD: i32 = 3;

/// With `1`, the process sets `LISTEN_PID` to its own pid before `main` (see
/// [`crate::start`]).
pub const LISTEN_PID_SELF: &str = "NETCLUSTER_LISTEN_PID_SELF";

/// With `1`, the process is an exec shim: before `main` it sets `LISTEN_PID` to its own pid,
/// closes every descriptor past its listeners and executes its arguments after the first
/// (see [`crate::start`]).
pub const EXEC: &str = "NETCLUSTER_EXEC";

/// systemd's number of passed listeners (at descriptors 3, 4, …).
pub const LISTEN_FDS: &str = "LISTEN_FDS";

/// systemd's names of the passed listeners, separated by `:`.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The pid the passed listeners are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";

/// Where a worker sends `READY=1`, `STATUS=…`, `STOPPING=1` (systemd's notification socket).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
