//! What `examples/cluster_probe.rs` prints on stdout, as types. The probe writes every line with
//! [`Line::to_line`]; the tests read them back with [`Line::parse`] and assert on fields and
//! enum values, never on the text (`tests/common/mod.rs` includes this file with `#[path]`).
//!
//! A line is the [`Line`] variant's name in kebab-case, then its value as JSON:
//! `event {"type":"exit","id":1,"pid":4242,"code":0,"signal":null,"exited_after_disconnect":true}`,
//! `state {"id":1,"state":"listening","exited_after_disconnect":false}`; a variant without a
//! value is its name alone (`all-dead`, `stopped`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use netcluster::cluster::WorkerState;
use netcluster::net::BoundAddress;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The user messages of the probe, both ways between the primary and a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Free text.
    Text(String),
    /// A message shaped like one of Node's internal ones.
    Cmd {
        /// Node's `cmd` field.
        cmd: String,
    },
}

/// A cluster event the primary saw (`netcluster::cluster::Event`, whose message and handle are
/// not data, as data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ProbeEvent {
    /// `'fork'`, with the milliseconds since the probe started (restart delays are read off).
    Fork { id: u32, pid: u32, at_ms: u64 },
    /// `'online'`.
    Online { id: u32, pid: u32 },
    /// `'listening'`.
    Listening {
        id: u32,
        address: BoundAddress,
        fd: Option<i32>,
    },
    /// `'message'`: the message decoded as a [`Msg`] (or why it could not be), and the handle
    /// that came with it.
    Message {
        id: u32,
        message: Result<Msg, String>,
        handle: Option<SentHandle>,
    },
    /// `'disconnect'`.
    Disconnect { id: u32 },
    /// `'exit'`.
    Exit {
        id: u32,
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
        exited_after_disconnect: bool,
    },
    /// The probe fell behind and missed this many events.
    Lagged { missed: u64 },
}

/// A handle a worker sent with a message (`netcluster::cluster::MessageHandleKind`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SentHandle {
    /// A listening socket bound to this address.
    Server { address: BoundAddress },
    /// A connected socket.
    Socket,
}

/// `netcluster::cluster::Role`, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeRole {
    /// Not a worker.
    Primary,
    /// A worker with this id.
    Worker { id: u32 },
}

impl From<netcluster::cluster::Role> for ProbeRole {
    fn from(role: netcluster::cluster::Role) -> Self {
        match role {
            netcluster::cluster::Role::Primary => ProbeRole::Primary,
            netcluster::cluster::Role::Worker { id } => ProbeRole::Worker { id },
        }
    }
}

/// `netcluster::net::DropInfo` (Node's `'drop'` event), as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub local_address: String,
    pub local_port: u16,
    pub local_family: String,
    pub remote_address: String,
    pub remote_port: u16,
    pub remote_family: String,
}

/// Every line the probe prints on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Line {
    /// A cluster event in the primary.
    Event(ProbeEvent),
    /// The answer to `state ID`.
    State {
        id: u32,
        state: WorkerState,
        exited_after_disconnect: bool,
    },
    /// The answer to `disconnect ID`: the worker's state right after the call.
    Disconnecting { id: u32, state: WorkerState },
    /// A command failed, or was not understood (for whoever reads along).
    Error(String),
    /// `--primary-listener`: the descriptor the primary bound and gives its workers.
    PrimaryFd { fd: i32, address: SocketAddr },
    /// The answer to `relay`: where the relay server listens.
    RelayListening { address: BoundAddress },
    /// The answer to `relay-count`: the relay server's `getConnections()`.
    RelayCount(Result<usize, String>),
    /// The answer to `send-server ID`: the server sent (the primary has closed its copy).
    SentServer { address: BoundAddress },
    /// The answer to `count ADDRESS`: `cluster.get_connections(ADDRESS)`.
    Count(Result<usize, String>),
    /// Every worker exited (and none is restarted): the probe exits.
    AllDead,
    /// `stop` is done: the probe exits.
    Stopped,
    /// A worker listens on a `--listen` value.
    WorkerListening {
        id: u32,
        pid: u32,
        address: BoundAddress,
    },
    /// A worker's listen on a `--listen` value failed: the address and OS error number of the
    /// `ListenError`, when it is one, and the whole message.
    WorkerListenError {
        id: u32,
        pid: u32,
        address: Option<String>,
        errno: Option<i32>,
        error: String,
    },
    /// A worker's server dropped a connection at `maxConnections` (`'drop'`).
    WorkerDrop { id: u32, info: Option<Dropped> },
    /// A worker received a message it has no answer for.
    WorkerGot { id: u32, message: Msg },
    /// `--churn`: the four listens on port 0 all succeeded, on these addresses.
    WorkerChurnOk {
        id: u32,
        addresses: Vec<BoundAddress>,
    },
    /// `--abandon`: whether the listen was given up before the answer, and whether the server
    /// listens after that.
    WorkerAbandoned {
        id: u32,
        abandoned: bool,
        listening: bool,
    },
    /// `--abandon-handshake`: whether the first listen was given up during the handshake.
    WorkerHandshakeAbandoned { id: u32, abandoned: bool },
    /// `--spawn-child`: what a program the worker started thinks it is.
    WorkerChildSays { id: u32, role: ProbeRole },
    /// `--child-fds`: the descriptors a program the worker started inherited (number to
    /// `/proc` link target), and the link target of the worker's channel.
    WorkerChildFds {
        id: u32,
        child: BTreeMap<i32, String>,
        channel: String,
    },
    /// `send-server ID`: the worker serves the server it was sent.
    WorkerServingSentServer { id: u32, address: BoundAddress },
    /// The worker's channel closed or it was asked to stop, and its servers have closed.
    WorkerDone { id: u32, pid: u32 },
}

impl Line {
    /// The line as printed: the variant's name, then its value as JSON.
    pub fn to_line(&self) -> String {
        match serde_json::to_value(self) {
            Ok(Value::String(name)) => name,
            Ok(Value::Object(map)) => map
                .into_iter()
                .map(|(name, value)| format!("{name} {value}"))
                .collect(),
            Ok(other) => other.to_string(),
            Err(e) => format!("error {}", Value::String(e.to_string())),
        }
    }

    /// Reads a line the probe printed.
    ///
    /// # Errors
    /// Why it is no [`Line`], with the line.
    pub fn parse(line: &str) -> Result<Line, String> {
        let value = match line.split_once(' ') {
            None => Value::String(line.to_string()),
            Some((name, json)) => {
                let value: Value =
                    serde_json::from_str(json).map_err(|e| format!("{e} in {line:?}"))?;
                Value::Object(Map::from_iter([(name.to_string(), value)]))
            }
        };
        serde_json::from_value(value).map_err(|e| format!("{e} in {line:?}"))
    }
}
