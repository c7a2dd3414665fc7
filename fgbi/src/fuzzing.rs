//! The body of the `fgbi_apply` fuzz target, in one place: `fuzz/` runs it
//! under libFuzzer (nightly) and `fgbi/tests/fuzz_corpus.rs` replays the
//! checked-in seeds through it on stable, so the two cannot drift.
//!
//! Not part of fgbi's API: it exists for fuzzing and its tests.

use crate::{apply, ApplyError, ApplyStats, PAGE_SIZE};

/// Pages in the replica every input is applied to.
pub const REPLICA_PAGES: usize = 16;

/// The block sizes an input's first byte selects from (`byte % 5`).
pub const BLOCK_SIZES: [usize; 5] = [64, 128, 256, 512, 1024];

/// The replica every input starts from: [`REPLICA_PAGES`] pages of a fixed,
/// non-zero pattern.
pub fn initial_replica() -> Vec<u8> {
    (0..REPLICA_PAGES * PAGE_SIZE)
        .map(|i| (i * 31 / 7) as u8)
        .collect()
}

/// What one input did.
#[derive(Debug)]
pub struct Applied {
    /// The block size the first byte selected.
    pub block_size: usize,
    /// What `apply` returned.
    pub result: Result<ApplyStats, ApplyError>,
    /// The replica afterwards.
    pub replica: Vec<u8>,
}

/// The `fgbi_apply` target: the first byte selects a block size, the rest is
/// an epoch applied to [`initial_replica`]. It must never panic, never
/// allocate without bound, and a refused epoch must leave the replica exactly
/// as it was (asserted here: a violation panics). `None` for an empty input.
pub fn apply_target(data: &[u8]) -> Option<Applied> {
    let (&sel, epoch) = data.split_first()?;
    let block_size = BLOCK_SIZES[sel as usize % BLOCK_SIZES.len()];
    let mut replica = initial_replica();
    let result = apply(&mut replica, block_size, epoch);
    if result.is_err() {
        assert!(
            replica == initial_replica(),
            "a refused epoch changed the replica"
        );
    }
    Some(Applied {
        block_size,
        result,
        replica,
    })
}
