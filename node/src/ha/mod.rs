//! castor's HA decisions as pure state machines.
//!
//! Each role is a state machine that takes what happened — an ack, a
//! session's end and its [`EndReason`], the time — and returns what to do:
//! release output up to an offset, start a session, stop the guest, take
//! over. They do no I/O, read no clock and start no thread; the daemons are
//! thin shells that feed them events and carry out their actions, and the
//! unit tests (and a simulator) drive them with virtual time.
//!
//! - [`primary::PrimaryCore`]: output commit and fencing on a node that runs
//!   the guest.
//! - [`backup::BackupCore`]: the failure detector and the takeover decision
//!   on a node that keeps a replica.
//! - [`handover`]: a migrating primary hands the VM to its destination.
//!
//! Time is a [`Duration`](std::time::Duration) since an origin the shell
//! chooses (its start); only differences matter.

pub mod backup;
pub mod handover;
pub mod primary;

pub use backup::{BackupAction, BackupCore, BackupInput, TakeoverAnswer, Timeouts};
pub use handover::{handover, Handover};
pub use primary::{PrimaryAction, PrimaryCore, PrimaryInput};
pub use protocol::EndReason;

/// The witness's answer to a claim: a compare-and-swap of the VM's owner
/// and fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the VM now, with this token.
    Won {
        /// The new token (the old one plus one).
        token: u64,
    },
    /// Another node changed the owner first.
    Lost {
        /// The owner now.
        owner: String,
        /// Its token.
        token: u64,
    },
    /// The witness did not answer: nothing changed, ask again.
    Unreachable,
}
