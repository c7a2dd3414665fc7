//! The backup role's settings and errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use node::ha::Timeouts;
use transport::NodeTls;

/// Backup settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen for the primary.
    pub listen: SocketAddr,
    /// Certificates and the primary's expected name.
    pub tls: NodeTls,
    /// The failure detector's timeouts.
    pub timeouts: Timeouts,
    /// The KVM device for the VM after a takeover.
    pub kvm_device: PathBuf,
    /// Most bytes one checkpoint may stage (less for a small guest:
    /// [`protocol::staging_bound`] of its RAM).
    pub max_epoch_bytes: usize,
    /// Largest guest RAM this backup accepts to replicate.
    pub max_memory_bytes: u64,
    /// Most vCPUs of a guest this backup accepts.
    pub max_vcpus: u32,
    /// This node's name (it becomes the VM's owner at the witness when it
    /// takes over).
    pub node: String,
    /// The witness; `None`: take over on silence alone (`--witness none`).
    pub witness: Option<witness::Etcd>,
    /// Where this node keeps the VM's image (`--image-dir`): the replica's
    /// RAM and generations in files that outlive the process. `None`: in
    /// this process's memory.
    pub image: Option<vmm::image::ImagePaths>,
    /// Offer the image found in `image` at start-up to the primary
    /// (`--reuse`), so that only the pages that differ are sent.
    pub reuse: bool,
    /// The guest's disk on this node (`--disk`): kept at the last committed
    /// checkpoint, the guest's disk after a takeover. The primary's must be
    /// of the same size.
    pub disk: Option<std::sync::Arc<vmm::disk::Disk>>,
    /// Packet faults on what this node sends to the primary — its QUIC
    /// packets and heartbeat datagrams (`--link-faults`; tests and drills).
    pub link_faults: transport::lossy::LinkFaults,
}

impl Config {
    /// What a primary's hello is checked against: these limits, and the
    /// peer name its certificate was verified for.
    pub fn limits(&self) -> protocol::Limits {
        protocol::Limits {
            max_epoch_bytes: self.max_epoch_bytes,
            max_memory_bytes: self.max_memory_bytes,
            max_vcpus: self.max_vcpus,
            peer_name: Some(self.tls.peer_name.clone()),
            disk_bytes: self.disk.as_ref().map_or(0, |d| d.bytes()),
        }
    }
}

/// Errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Transport set-up.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The restored machine failed to start.
    #[error("failover failed: {0}")]
    Failover(#[from] vmm::MachineError),
    /// The failure detector's thread did not start.
    #[error("starting the failure detector's thread: {0}")]
    Watchdog(std::io::Error),
    /// The disk's journal could not be read or finished.
    #[error("the disk's journal {path}: {err}")]
    Journal {
        /// The journal.
        path: std::path::PathBuf,
        /// The error.
        err: std::io::Error,
    },
}
