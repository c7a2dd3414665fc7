//! What both of castor's roles share. A node starts as a primary or as a
//! backup, and a backup that takes over becomes a primary: the pieces here
//! belong to neither daemon.
//!
//! - [`console`]: the guest's console stream with byte offsets and output
//!   commit, served over TCP.
//! - [`control`]: status, takeover and reset as typed JSON on an owner-only
//!   Unix socket.
//! - [`metrics`]: Prometheus metrics, served when asked for.
//! - [`packets`]: output commit for the guest's network frames.
//! - [`services`]: the runtime, console log, control socket and metrics a
//!   node keeps across a change of role.
//! - [`status`]: the one typed status both roles report.
//! - [`stats`]: percentiles for figures.
//! - [`stall`]: a liveness thread's late wake-ups and the host's steal
//!   time, so a stalled host can be told from a dead peer.
//! - [`ha`]: the HA decisions of both roles, as pure state machines.
//! - [`sim`]: a deterministic simulator of the pair driving those machines.
//! - [`fleet`]: where each VM's primary and backup run in a fleet of hosts,
//!   as a pure function, with its invariants and a seeded simulation.
#![forbid(unsafe_code)]

pub mod console;
pub mod control;
pub mod fleet;
pub mod metrics;
pub mod packets;
pub mod rng;
pub mod services;
pub mod sim;
pub mod stall;
pub mod stats;
pub mod status;
pub mod wws;

pub use services::Services;
pub use status::{AutoEpochStatus, BackupStatus, PrimaryStatus, ResyncStatus, Role, Status};
pub mod ha;

/// What every listening service does when an accept fails (out of file
/// descriptors, say): log it, wait a moment, and go on accepting — a
/// service must outlive a bad moment, and a failover needs descriptors too.
pub(crate) async fn accept_failed(service: &str, e: std::io::Error) {
    tracing::warn!("{service}: accept failed: {e}; retrying");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
