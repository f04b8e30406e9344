//! One worker as the primary sees it: its [`state`] machine, the [`handle`] the library gives
//! out, and the tasks that carry its channel ([`conn`]).

pub mod conn;
pub mod handle;
pub mod state;
