//! castor's lab: the local HA pair behind `castor demo` and `castor drill`,
//! shared with the end-to-end tests, and the `castor bench` suite with its
//! report and plots.

pub mod bench;
pub mod cli;
pub mod pair;
pub mod plots;
pub mod report;
