//! What both of castor's roles share. A node starts as a primary or as a
//! backup, and a backup that takes over becomes a primary: the pieces here
//! belong to neither daemon.
//!
//! - [`console`]: the guest's console stream with byte offsets and output
//!   commit, served over TCP.
//! - [`status`]: the one typed status both roles report.
//! - [`stats`]: percentiles for figures.

pub mod console;
pub mod stats;
pub mod status;

pub use status::{BackupStatus, PrimaryStatus, Role, Status};
