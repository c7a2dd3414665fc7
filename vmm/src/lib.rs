//! castor's KVM machine: boots a multiboot guest on KVM, runs its vCPUs on
//! threads, serves its serial console, tracks the pages it dirties, and
//! captures and restores its complete state.
//!
//! This is the only castor crate with `unsafe` code; every block carries a
//! `// SAFETY:` comment (enforced by `clippy::undocumented_unsafe_blocks`).
//!
//! - [`machine`]: the VM as a whole ([`Machine`]): boot, pause, capture,
//!   dirty harvest, restore.
//! - [`state`]: the one list of saved state, its order and its encoding.
//! - [`snapshot`]: machine state plus RAM in a directory.
//! - [`boot`], [`memory`], [`console`], [`serial`], [`msr`]: the parts.

pub mod boot;
pub mod console;
pub mod machine;
pub mod memory;
pub mod msr;
pub mod serial;
pub mod snapshot;
pub mod state;
mod vcpu;

pub use machine::{host_tsc_khz, DirtyPages, KvmKind, Machine, MachineConfig, MachineError};
pub use state::MachineState;
pub use vcpu::{ExitReason, VcpuError};
