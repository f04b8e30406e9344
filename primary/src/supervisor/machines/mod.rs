//! The long operations, each a machine that owns its state and answers what happens with
//! effects ([`Machine`](super::effect::Machine)): rolling [`reload`], [`scale`], [`stop`],
//! [`retire`] (a reuseport slot leaving), [`restart`] back-off, and [`handoff`] deadlines.

pub(crate) mod handoff;
pub(crate) mod reload;
pub(crate) mod restart;
pub(crate) mod retire;
pub(crate) mod scale;
pub(crate) mod stop;

#[cfg(test)]
mod tests;
