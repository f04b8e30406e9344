//! One worker as the primary sees it: its [`state`] machine, its record in the worker
//! [`table`], how it is started ([`launch`]), and the tasks that carry its channel ([`conn`]).

pub mod conn;
pub mod launch;
pub mod state;
pub mod table;
