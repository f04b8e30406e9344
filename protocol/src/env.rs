//! Names of the environment variables through which a primary tells a re-executed process that
//! it is a worker.

/// The worker's id (a positive integer). Its presence makes a process a worker.
pub const WORKER_ID: &str = "NETCLUSTER_WORKER_ID";

/// The primary's process id. A process is a worker only if its parent is this process, so a
/// program that a worker starts (which inherits the environment) is not taken for a worker.
pub const PRIMARY_PID: &str = "NETCLUSTER_PRIMARY_PID";

/// The number of the inherited descriptor of the worker's end of the channel.
pub const CHANNEL_FD: &str = "NETCLUSTER_CHANNEL_FD";

/// The descriptor number at which the primary places the channel in a worker.
pub const DEFAULT_CHANNEL_FD: i32 = 3;
