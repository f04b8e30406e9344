//! The control protocol on the wire: requests, the typed [`Reply`], the versioned
//! [`Response`] envelope, and how each side reads the other's line.

use serde::{Deserialize, Serialize};

use super::{CONTROL_VERSION, CONTROL_VERSION_1, MAX_REQUEST};
use crate::command::ScaleReport;
use crate::status::Status;
use crate::supervisor::ReloadReport;
use crate::upgrade::UpgradeReport;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// The primary's [`Status`].
    Status,
    /// Run this many workers; replies once they are ready (or why not).
    Scale {
        /// The number of workers.
        workers: usize,
    },
    /// Stop gracefully; replies once the workers have exited.
    Stop,
    /// Rolling reload; replies once every slot runs the new generation (or why not).
    Reload,
    /// Replace the primary with the binary on disk; replies once the new primary serves.
    Upgrade,
}

/// A request as it travels: its version and the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`CONTROL_VERSION`].
    pub version: u32,
    /// The request.
    #[serde(flatten)]
    pub request: Request,
}

/// What a primary answers: one variant per outcome, named on the wire by `reply`, with the
/// outcome under `result` (or the reason under `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    /// To [`Request::Status`].
    Status {
        /// The primary's status (the document of `netcluster status --json`).
        result: Status,
    },
    /// To [`Request::Scale`], once the workers are ready (or have exited).
    Scaled {
        /// What the scale did.
        result: ScaleReport,
    },
    /// To [`Request::Stop`], as the primary stops.
    Stopped {
        /// What the stop did.
        result: StopReport,
    },
    /// To [`Request::Reload`], once every slot runs the new generation.
    Reloaded {
        /// What the reload did.
        result: ReloadReport,
    },
    /// To [`Request::Upgrade`], once the new primary serves.
    Upgraded {
        /// What the upgrade did.
        result: UpgradeReport,
    },
    /// The request failed, or was refused.
    Error {
        /// Why, in words for the operator.
        error: String,
    },
}

impl Reply {
    /// An error reply.
    pub fn error(why: impl std::fmt::Display) -> Reply {
        Reply::Error {
            error: why.to_string(),
        }
    }

    /// Whether the request succeeded (the `ok` of the wire).
    pub fn is_ok(&self) -> bool {
        !matches!(self, Reply::Error { .. })
    }

    /// The `reply` name of the variant that answers `request` when it succeeds.
    pub fn name_for(request: &Request) -> &'static str {
        match request {
            Request::Status => "status",
            Request::Scale { .. } => "scaled",
            Request::Stop => "stopped",
            Request::Reload => "reloaded",
            Request::Upgrade => "upgraded",
        }
    }

    /// The `reply` name of this variant.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Status { .. } => "status",
            Reply::Scaled { .. } => "scaled",
            Reply::Stopped { .. } => "stopped",
            Reply::Reloaded { .. } => "reloaded",
            Reply::Upgraded { .. } => "upgraded",
            Reply::Error { .. } => "error",
        }
    }
}

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReport {
    /// Workers that exited during the stop.
    pub workers_exited: usize,
}

/// A reply as it travels: its version and the [`Reply`], with `ok` derived from the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// [`CONTROL_VERSION`] (or [`CONTROL_VERSION_1`], to a client of that version).
    pub version: u32,
    /// The reply.
    pub reply: Reply,
}

impl Response {
    /// `reply` in this primary's version.
    pub fn new(reply: Reply) -> Response {
        Response {
            version: CONTROL_VERSION,
            reply,
        }
    }
}

/// The wire form of a [`Response`], out.
#[derive(Serialize)]
struct ResponseOut<'a> {
    version: u32,
    ok: bool,
    #[serde(flatten)]
    reply: &'a Reply,
}

/// The wire form of a [`Response`], in.
#[derive(Deserialize)]
struct ResponseIn {
    version: u32,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(flatten)]
    reply: Reply,
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ResponseOut {
            version: self.version,
            ok: self.reply.is_ok(),
            reply: &self.reply,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = ResponseIn::deserialize(deserializer)?;
        if wire.ok.is_some_and(|ok| ok != wire.reply.is_ok()) {
            return Err(serde::de::Error::custom(format!(
                "a reply that says ok: {} and is {:?}",
                !wire.reply.is_ok(),
                wire.reply.name()
            )));
        }
        Ok(Response {
            version: wire.version,
            reply: wire.reply,
        })
    }
}

/// The version to answer a request line in: version 1 to a line that says it, else this
/// primary's.
pub(super) fn reply_version(line: &[u8]) -> u32 {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_slice::<Version>(line) {
        Ok(v) if v.version == CONTROL_VERSION_1 => CONTROL_VERSION_1,
        _ => CONTROL_VERSION,
    }
}

/// Parses one request line of the control protocol: at most [`MAX_REQUEST`] bytes of JSON with
/// a `version` this primary speaks ([`CONTROL_VERSION`] or [`CONTROL_VERSION_1`]).
///
/// ```
/// use netcluster_primary::control::{parse_request, Request};
/// assert_eq!(parse_request(br#"{"version":2,"command":"scale","workers":3}"#), Ok(Request::Scale { workers: 3 }));
/// assert!(parse_request(b"{").unwrap_err().starts_with("malformed request"));
/// ```
///
/// # Errors
/// What is wrong with it, in words for the reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    parse_envelope(line).map(|e| e.request)
}

/// [`parse_request`], keeping the version the request was made in.
///
/// # Errors
/// As [`parse_request`].
pub fn parse_envelope(line: &[u8]) -> Result<Envelope, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    if line.is_empty() {
        return Err("empty request".into());
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(CONTROL_VERSION) || v == u64::from(CONTROL_VERSION_1) => {}
        Some(v) => {
            return Err(format!(
                "control protocol version {v} is not spoken here (this primary speaks \
                 {CONTROL_VERSION_1} and {CONTROL_VERSION})"
            ));
        }
        None => return Err("the request has no version".into()),
    }
    serde_json::from_value::<Envelope>(value).map_err(|e| format!("malformed request: {e}"))
}

/// Decodes the line that answers `request`: a reply of this version, or one of version 1,
/// whose variant the request names (version 1 did not).
///
/// # Errors
/// What is wrong with it.
pub fn decode_reply(request: &Request, line: &[u8]) -> Result<Response, String> {
    /// A version 1 reply: `ok`, and a `result` or an `error`.
    #[derive(Deserialize)]
    struct Version1 {
        version: u32,
        ok: bool,
        #[serde(default)]
        result: Option<serde_json::Value>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        reply: Option<String>,
    }
    let named: Named = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if named.reply.is_some() {
        return serde_json::from_slice(line).map_err(|e| e.to_string());
    }
    let v1: Version1 = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if v1.version != CONTROL_VERSION_1 {
        return Err(format!("a version {} reply without `reply`", v1.version));
    }
    let reply = if v1.ok {
        let tagged = serde_json::json!({
            "reply": Reply::name_for(request),
            "result": v1.result.unwrap_or(serde_json::Value::Null),
        });
        serde_json::from_value(tagged).map_err(|e| e.to_string())?
    } else {
        Reply::error(
            v1.error
                .unwrap_or_else(|| "the primary refused without a reason".into()),
        )
    };
    Ok(Response {
        version: v1.version,
        reply,
    })
}
