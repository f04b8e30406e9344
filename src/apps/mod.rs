//! Built-in applications that `netcluster serve` runs in its workers.

pub mod echo;
