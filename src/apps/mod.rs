//! Built-in applications that `netcluster serve --app NAME` runs in its workers.

pub mod echo;
pub mod http;

use std::sync::Arc;

use crate::cluster::Worker;
use crate::net::Server;

/// A built-in application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum App {
    /// The seeds' echo server: `hello\r\n`, then every byte back.
    #[default]
    Echo,
    /// HTTP/1.1 `hello\n` with keep-alive.
    Http,
}

impl App {
    /// A server running this application.
    pub fn server(self, worker: Option<Arc<Worker>>) -> Server {
        match self {
            App::Echo => echo::server(),
            App::Http => http::server(worker),
        }
    }
}

impl std::str::FromStr for App {
    type Err = String;
    fn from_str(s: &str) -> Result<App, String> {
        match s {
            "echo" => Ok(App::Echo),
            "http" => Ok(App::Http),
            other => Err(format!("unknown app {other:?} (expected echo or http)")),
        }
    }
}

impl std::fmt::Display for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            App::Echo => "echo",
            App::Http => "http",
        })
    }
}
