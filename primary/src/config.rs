//! The primary role's settings and errors.

use std::net::SocketAddr;
use std::time::Duration;

use fgbi::Mode;
use protocol::EndReason;
use transport::link::LinkShape;
use transport::NodeTls;

/// How a running guest is protected.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name (in the hello; its certificate must match).
    pub node: String,
    /// Where the backup listens; `None`: no backup, the guest runs
    /// unprotected (a survivor started without `--then-protect`).
    pub backup: Option<SocketAddr>,
    /// Certificates and the backup's expected name.
    pub tls: NodeTls,
    /// The `castor certs` directory `tls` came from: a migration loads
    /// this node's certificate from it to reach its destination.
    pub certs: std::path::PathBuf,
    /// Epoch length.
    pub epoch: Duration,
    /// Encoding mode.
    pub mode: Mode,
    /// fgbi block size.
    pub block_size: usize,
    /// fgbi memory budget in bytes; `None`: half the guest's RAM (the
    /// machine actually protected, which after a failover is the replica).
    pub budget_bytes: Option<u64>,
    /// Most unacknowledged checkpoints.
    pub max_in_flight: usize,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// The backup is declared lost after this long without an answer.
    pub backup_timeout: Duration,
    /// Send memory digests for the backup to verify.
    pub verify: bool,
    /// Link emulation applied to the replication traffic (benchmarks).
    pub link: LinkShape,
    /// Pre-copy window: this long before each epoch ends, the dirty pages so
    /// far are harvested and copied while the guest runs, so that the pause
    /// copies only the pages dirtied since. Zero: everything in the pause.
    pub precopy: Duration,
    /// The witness that decides who owns the VM; `None`: no witness
    /// (`--witness none`), a lost backup means carrying on at once.
    pub witness: Option<witness::Etcd>,
    /// Console bytes a primary may hold while the witness decides; past
    /// this the guest is paused until it has.
    pub hold_limit: u64,
    /// This node's tap for the guest's network card (`--tap`): its frames
    /// leave through it after output commit, and frames from it reach the
    /// guest. `None`: a card the guest has sends nowhere.
    pub tap: Option<std::sync::Arc<vmm::tap::Tap>>,
}

/// Primary errors.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// fgbi configuration.
    #[error(transparent)]
    Fgbi(#[from] fgbi::ConfigError),
    /// Guest memory layout not supported for replication.
    #[error("replication needs a guest of at most 3 GiB (one memory region)")]
    Layout,
    /// Building a checkpoint broke the protocol (a bug).
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The heartbeat path's socket.
    #[error("binding the heartbeat socket: {0}")]
    Beat(std::io::Error),
    /// The guest stopped.
    #[error("the guest stopped: {0:?}")]
    GuestStopped(vmm::ExitReason),
    /// A migration failed after the switch: the guest may be lost.
    #[error("migration: {0}")]
    Migration(String),
    /// Another node runs the guest; this node's guest was stopped so that
    /// only one runs.
    #[error("fenced: {0}; this node's guest was stopped")]
    Fenced(EndReason),
}
