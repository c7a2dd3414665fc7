//! Fuzzes fgbi's apply: any byte string as an epoch, against a small replica.
//! It must never panic, never allocate without bound, and a refused epoch
//! must leave the replica exactly as it was.
//!
//! The body is `fgbi::fuzzing::apply_target`, which `fgbi/tests/fuzz_corpus.rs`
//! also runs over the seeds on stable.
//!
//! Run (from `fuzz/`): `cargo +nightly fuzz run fgbi_apply seeds/fgbi_apply -- -runs=1000000`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fgbi::fuzzing::apply_target(data);
});
