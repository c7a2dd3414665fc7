//! Fuzzes fgbi's apply: any byte string as an epoch, against a small replica.
//! It must never panic, never allocate without bound, and a refused epoch
//! must leave the replica exactly as it was.
//!
//! Run: `cargo +nightly fuzz run fgbi_apply -- -runs=1000000`
#![no_main]

use libfuzzer_sys::fuzz_target;

const PAGES: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, epoch)) = data.split_first() else { return };
    let bs = [64usize, 128, 256, 512, 1024][sel as usize % 5];
    let mut replica: Vec<u8> = (0..PAGES * fgbi::PAGE_SIZE).map(|i| (i * 31 / 7) as u8).collect();
    let before = replica.clone();
    match fgbi::apply(&mut replica, bs, epoch) {
        Ok(_) => {}
        Err(_) => assert!(replica == before, "a refused epoch changed the replica"),
    }
});
