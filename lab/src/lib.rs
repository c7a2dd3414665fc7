//! castor's lab: everything that runs castor rather than being castor.
//!
//! - [`pair`]: the local HA pair (a backup and a primary as child processes
//!   of the castor binary, certificates, ports, logs) and its typed status
//!   readers; used by demo, drill, bench and the end-to-end tests.
//! - [`console`]: the guest's progress lines and the one continuity check.
//! - [`demo`]: `castor demo`, one failover with its report.
//! - [`drill`]: `castor drill`, repeated failovers (also the bench's drills).
//! - [`faults`]: `castor drill --faults …`, rounds of kills, pauses and
//!   witness outages, each checked for one history and one primary.
//! - [`bench`]: `castor bench`, the measurement matrix; produces a
//!   [`model::Results`].
//! - [`netbench`]: `castor bench --net` and `--reuse`, the network and
//!   memory-reuse sections.
//! - [`netns`]: two network namespaces whose replication link can be cut.
//! - [`netlab`]: `castor net up|down`, the guest network (bridge, taps,
//!   client namespace).
//! - [`loadgen`]: `castor loadgen`, the key-value client and its checker
//!   of acknowledged writes.
//! - [`linearize`]: the check of a whole key-value history for
//!   linearizability (per key, Porcupine's algorithm), run after the load.
//! - [`model`]: the results model that the report and the plots read.
//! - [`report`]: CSV, JSON and the markdown summary.
//! - [`plots`]: the PNG plots.
//! - [`cli`]: parsers of command-line values, shared with the daemons'
//!   commands.
//!
//! Percentiles come from [`node::stats::percentile`] throughout.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod console;
pub mod demo;
pub mod diskbench;
pub mod drill;
pub mod faults;
pub mod fleetdemo;
pub mod fleetlab;
pub mod linearize;
pub mod loadgen;
pub mod migration_bench;
pub mod model;
pub mod netbench;
pub mod netlab;
pub mod netns;
pub mod pair;
pub mod plots;
pub mod report;
pub mod stop;

pub use bench::{bench, BenchArgs};
pub use demo::{demo, DemoArgs};
pub use drill::{drill, DrillArgs};
