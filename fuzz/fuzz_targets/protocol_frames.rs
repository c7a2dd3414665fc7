//! Fuzzes frame decoding and the backup's session state machine: any byte
//! stream, fed in pieces. It must never panic and never buffer more than one
//! frame's worth plus the piece just fed.
//!
//! The body is `protocol::fuzzing::frames_target`, which
//! `protocol/tests/fuzz_corpus.rs` also runs over the seeds on stable.
//!
//! Run (from `fuzz/`): `cargo +nightly fuzz run protocol_frames seeds/protocol_frames -- -runs=1000000`
//! (the seeds are valid sessions).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = protocol::fuzzing::frames_target(data);
});
