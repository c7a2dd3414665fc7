//! The `castor` package's library side: the local-pair orchestration behind
//! `castor demo` and `castor drill`, shared with the end-to-end tests.

pub mod cli;
pub mod pair;
