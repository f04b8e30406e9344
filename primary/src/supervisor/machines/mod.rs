//! The long operations, each a machine that owns its state and answers what happens with
//! effects ([`Machine`](super::effect::Machine)): rolling [`reload`], [`scale`], [`stop`],
//! [`retire`] (a reuseport slot leaving), [`restart`] back-off, [`handoff`] deadlines, and
//! [`recycle`] (which slots are due for a replacement, and why).

pub(crate) mod handoff;
pub(crate) mod recycle;
pub(crate) mod reload;
pub(crate) mod restart;
pub(crate) mod retire;
pub(crate) mod scale;
pub(crate) mod stop;

#[cfg(test)]
mod tests;
