//! The primary role's settings and errors.

use std::net::SocketAddr;
use std::time::Duration;

use fgbi::Mode;
use node::wws::EpochTarget;
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
    /// Epoch length: fixed, or chosen by the working-set model.
    pub epoch: EpochLength,
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
    /// Packet faults on what this node sends to its backup — its QUIC
    /// packets and heartbeat datagrams (`--link-faults`; tests and drills).
    pub link_faults: transport::lossy::LinkFaults,
    /// Pre-copy window: this long before each epoch ends, the dirty pages so
    /// far are harvested and copied while the guest runs, so that the pause
    /// copies only the pages dirtied since. Zero: everything in the pause.
    /// `None`: a fifth of the epoch, at most 5 ms (following the length
    /// auto chooses); see [`precopy_window`].
    pub precopy: Option<Duration>,
    /// A new backup's full resync releases the guest's output as it is
    /// written (`--resync-output release`, the default; protocol 7 on both
    /// nodes): no client waits for the image to cross, and the backup can
    /// take over from the first checkpoint after the resync. `false`
    /// (`hold`): output is held from the resync's pause on, so the backup
    /// can take over from the resync itself, and clients wait for it.
    pub resync_releases_output: bool,
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

/// How long the epochs are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EpochLength {
    /// Every epoch this long (`--epoch-ms N`).
    Fixed(Duration),
    /// After every epoch the next one's length is chosen from the recent
    /// epochs' figures to meet the target ([`node::wws::EpochChooser`];
    /// `--epoch-ms auto`), in whole milliseconds. The first epochs are
    /// [`AUTO_START`] long (within the target's bounds).
    Auto(EpochTarget),
}

/// The first epochs' length under [`EpochLength::Auto`], until the model has
/// figures: castor's default fixed length.
pub const AUTO_START: Duration = Duration::from_millis(25);

impl EpochLength {
    /// The first epoch's length.
    pub fn initial(&self) -> Duration {
        match self {
            EpochLength::Fixed(d) => *d,
            EpochLength::Auto(t) => AUTO_START.clamp(t.min, t.max.max(t.min)),
        }
    }

    /// The target, under auto.
    pub fn auto(&self) -> Option<&EpochTarget> {
        match self {
            EpochLength::Fixed(_) => None,
            EpochLength::Auto(t) => Some(t),
        }
    }
}

/// The pre-copy window of an epoch of `epoch`, in whole milliseconds:
/// `setting` (`--precopy-ms`), by default a fifth of the epoch and at most
/// 5 ms; always shorter than the epoch.
pub fn precopy_window(setting: Option<Duration>, epoch: Duration) -> Duration {
    let ms = epoch.as_millis() as u64;
    let want = setting.map_or((ms / 5).min(5), |d| d.as_millis() as u64);
    Duration::from_millis(want.min(ms.saturating_sub(1)))
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
    /// The guest's disk could not be read for a checkpoint.
    #[error("disk: {0}")]
    Disk(String),
    /// The console log lost bytes a checkpoint must carry (a bug).
    #[error("console: {0}")]
    Console(String),
    /// Another node runs the guest; this node's guest was stopped so that
    /// only one runs.
    #[error("fenced: {0}; this node's guest was stopped")]
    Fenced(EndReason),
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_precopy_window_follows_the_epoch() {
        assert_eq!(precopy_window(None, 25 * MS), 5 * MS);
        assert_eq!(precopy_window(None, 10 * MS), 2 * MS);
        assert_eq!(precopy_window(None, 200 * MS), 5 * MS);
        assert_eq!(precopy_window(None, 4 * MS), Duration::ZERO);
        assert_eq!(precopy_window(Some(8 * MS), 100 * MS), 8 * MS);
        // Never as long as the epoch.
        assert_eq!(precopy_window(Some(8 * MS), 5 * MS), 4 * MS);
        assert_eq!(
            precopy_window(Some(Duration::ZERO), 25 * MS),
            Duration::ZERO
        );
    }

    #[test]
    fn auto_starts_at_the_default_length_within_its_bounds() {
        let t = EpochTarget::default();
        assert_eq!(EpochLength::Auto(t).initial(), AUTO_START);
        let t = EpochTarget {
            min: 40 * MS,
            max: 80 * MS,
            ..t
        };
        assert_eq!(EpochLength::Auto(t).initial(), 40 * MS);
        assert_eq!(EpochLength::Fixed(7 * MS).initial(), 7 * MS);
        assert!(EpochLength::Fixed(7 * MS).auto().is_none());
    }
}
