//! castor's KVM machine: boots a multiboot or Linux guest on KVM, runs its
//! vCPUs on threads, serves its serial console, tracks the pages it dirties,
//! and captures and restores its complete state.
//!
//! This is the only castor crate with `unsafe` code; every block carries a
//! `// SAFETY:` comment (enforced by `clippy::undocumented_unsafe_blocks`).
//!
//! - [`machine`]: the VM as a whole ([`Machine`]): boot, pause, capture,
//!   dirty harvest, restore.
//! - [`state`]: the one list of saved state, its order and its encoding.
//! - [`snapshot`]: machine state plus RAM in a directory.
//! - [`virtio_net`], [`tap`]: the network card and its host side.
//! - [`virtio_blk`], [`disk`]: the disk and its image (with block digests).
//! - [`image`]: guest RAM in a file that outlives the process, with per-page
//!   generations (memory reuse).
//! - [`boot`] (multiboot, and the dispatch by kernel format), [`linux`]
//!   (bzImage and vmlinux, with [`acpi`] tables), [`memory`], [`console`],
//!   [`serial`], [`msr`]: the parts.

pub mod acpi;
pub mod boot;
pub mod console;
pub mod disk;
pub mod image;
pub mod linux;
pub mod machine;
pub mod memory;
pub mod msr;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod tap;
pub mod uffd;
mod vcpu;
pub mod virtio_blk;
pub mod virtio_net;

pub use machine::{
    host_tsc_khz, DirtyPages, KvmKind, Machine, MachineConfig, MachineError, Standby,
};
pub use state::MachineState;
pub use vcpu::{set_vcpu_nice, ExitReason, VcpuError};

/// Real-time priorities castor's threads use, highest first. Threads at one
/// SCHED_RR priority share a CPU in 100 ms slices
/// (`/proc/sys/kernel/sched_rr_timeslice_ms`), so a liveness thread at the
/// priority of a busy network runtime — this process's or another VM's on
/// the same host — can wait a whole slice: a false takeover on a 30–100 ms
/// detector. The liveness threads are therefore above everything else:
/// they wake every few milliseconds for microseconds of work.
pub mod priority {
    /// The failure detector's threads: the primary's heartbeat sender and
    /// the backup's watchdog (which also reads the heartbeats).
    pub const LIVENESS: i32 = 20;
    /// The node's network runtime (QUIC, checkpoint frames, acks): a
    /// spinning guest must not delay it.
    pub const NETWORK: i32 = 10;
    /// The epoch thread while the guest is paused, and the post-copy fault
    /// thread: below the network, above every normal thread.
    pub const PAUSE: i32 = 5;
}

/// Gives the calling thread real-time round-robin scheduling at `priority`
/// (1..=99), as cluster managers do for their heartbeat threads, so that a
/// busy host cannot delay liveness traffic into a false failover. Needs
/// CAP_SYS_NICE; callers treat failure as "run at normal priority".
pub fn set_current_thread_realtime(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority.clamp(1, 99),
    };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; pid 0 names the calling thread; no other memory is touched.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Returns the calling thread to normal (SCHED_OTHER) scheduling, e.g.
/// after a short real-time section.
pub fn set_current_thread_normal() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; pid 0 names the calling thread; no other memory is touched.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
