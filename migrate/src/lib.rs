//! castor's live migration (`castor migrate`): moves a running VM to
//! another castor node over the pair's mutual-TLS QUIC channel.
//!
//! - [`plan`]: the pure planner — rounds, when to stop, pre-copy or
//!   post-copy — from the history of the writable working set.
//! - [`wire`]: the migration's messages (docs/protocol.md, "Live migration").
//! - [`source`] and [`dest`]: the thin I/O shells of each side.
//! - [`cli`]: the `castor migrate` and `castor migrate-listen` commands.

pub mod plan;
pub mod wire;

pub use plan::{Decision, PlanConfig, Planner, RoundFigures};
