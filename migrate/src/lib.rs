//! castor's live migration (`castor migrate`): moves a running VM to
//! another castor node over the pair's mutual-TLS QUIC channel.
//!
//! - [`plan`]: the pure planner — rounds, when to stop, pre-copy or
//!   post-copy — from the history of the writable working set.
//! - [`wire`]: the migration's messages (docs/protocol.md, "Live migration").
//! - [`source`] and [`dest`]: the thin I/O shells of each side.
//!
//! The commands (`castor migrate`, `migrate-run`, `migrate-listen`) live in
//! the `castor` binary; a primary daemon moves its guest through
//! [`source::migrate_out`] on a control request.
//!
//! # A migration
//! ```text
//! source (guest running)                               destination
//!   |--- Hello (control) ------------------------------>|  allocate RAM, prepare a VM over it
//!   |<-- Ready -----------------------------------------|
//!   |--- Pages(1)… RoundEnd(1) (bulk) ----------------->|  apply; keep a digest page by page
//!   |<-- RoundAck(1) -----------------------------------|
//!   |  harvest the dirty log; the planner decides        |
//!   |--- Pages(k)… RoundEnd(k) ------------------------>|  … while it says "continue"
//!   |  pause; last dirty pages; machine state            |
//!   |--- Pages(k+1)…, Switch(state), Digest ----------->|  compare digests
//!   |<-- Verified --------------------------------------|  (or Refused: the source resumes)
//!   |--- Go (the commit point) ------------------------>|  restore the state, run the guest
//!   |<-- Finished --------------------------------------|
//! ```
//! In post-copy, `Switch` carries the bitmap of the pages the destination
//! lacks; after `Go` the destination fetches the ones its guest touches
//! (`Want` → `Page` on the control stream) while the source pushes the rest
//! (`Page`… `Done` on the bulk stream); `Finished` when all arrived.
#![forbid(unsafe_code)]

pub mod dest;
mod io;
pub mod plan;
pub mod source;
pub mod wire;

use std::time::Duration;

pub use io::page_hash;
pub use plan::{Decision, PlanConfig, Planner, RoundFigures};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The connection failed, broke or timed out.
    #[error("link: {0}")]
    Link(String),
    /// The peer sent something out of order or malformed.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The destination refused (its reason).
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The destination's memory differs from the source's at the switch.
    #[error(
        "memory digest mismatch at the switch: the destination's RAM differs from the source's"
    )]
    DigestMismatch,
    /// Settings that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The machine failed.
    #[error("machine: {0}")]
    Machine(String),
    /// The VM's ownership could not be handed to the destination: the
    /// guest stays here (the witness did not answer).
    #[error("handing the VM to the destination: {0}")]
    Handover(String),
    /// Another node owns the VM (the witness says so): the guest must not
    /// run here nor move.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl From<vmm::MachineError> for MigrateError {
    fn from(e: vmm::MachineError) -> Self {
        MigrateError::Machine(e.to_string())
    }
}

impl From<vmm::uffd::UffdError> for MigrateError {
    fn from(e: vmm::uffd::UffdError) -> Self {
        MigrateError::Machine(e.to_string())
    }
}

/// The source's settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This node's name (its certificate's).
    pub node: String,
    /// How pages are encoded.
    pub mode: fgbi::Mode,
    /// fgbi block size.
    pub block_size: usize,
    /// The planner's settings.
    pub plan: PlanConfig,
    /// Emulated link (rate; delay on the messages that end a step).
    pub link: transport::link::LinkShape,
    /// Send a digest of all of RAM at a pre-copy switch for the
    /// destination to check before it runs the guest.
    pub verify: bool,
    /// Memory the encoder may keep about the destination's RAM (default:
    /// the guest's RAM size, a copy of every page sent: a rewritten page is
    /// then compared with its copy instead of with block digests).
    pub budget: Option<u64>,
}

/// One pre-copy round, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    /// Pages sent.
    pub pages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// First byte to ack, ms.
    pub ms: f64,
    /// Pages dirtied meanwhile.
    pub dirtied: u64,
}

impl From<RoundFigures> for RoundReport {
    fn from(r: RoundFigures) -> Self {
        RoundReport {
            pages: r.pages,
            bytes: r.bytes,
            ms: r.duration.as_secs_f64() * 1e3,
            dirtied: r.dirtied,
        }
    }
}

/// Post-copy figures of the source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PostcopyReport {
    /// Pages the destination lacked at the switch.
    pub missing: u64,
    /// Of them, sent on demand before the push reached them.
    pub demand: u64,
    /// Of them, pushed in the background.
    pub pushed: u64,
    /// From `Go` to the destination's `Finished`, ms.
    pub ms: f64,
}

/// How a migration went, from the source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// `pre-copy`, `post-copy`, or `pre-copy (stopped anyway…)`.
    pub path: String,
    /// Encoding.
    pub mode: String,
    /// The pre-copy rounds.
    pub rounds: Vec<RoundReport>,
    /// Bytes sent in all.
    pub bytes: u64,
    /// From the connection to the end, ms.
    pub total_ms: f64,
    /// The source paused → the destination runs the guest (its
    /// `Finished` in pre-copy, `Go` sent in post-copy), ms.
    pub pause_ms: f64,
    /// The stall the planner predicted for its choice, ms.
    pub predicted_ms: f64,
    /// Pages sent in the pause (pre-copy) or missing (post-copy).
    pub final_pages: u64,
    /// The memory digest at the switch (pre-copy).
    pub digest: Option<String>,
    /// The console offset at the switch.
    pub console_offset: u64,
    /// Post-copy figures.
    pub postcopy: Option<PostcopyReport>,
}

/// The default limit on the stall.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
