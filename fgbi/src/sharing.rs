//! The sharing index: where the backup holds a block of some content.
//!
//! Maps a block's keyed digest to a (page, block) where the backup held that
//! content when it was indexed. Only sampled blocks are indexed (the pipeline
//! decides which), so the index stays small. Entries are hints, not facts: a
//! page may have changed since, so [`SharingIndex::lookup`] returns an entry
//! only once the caller has verified it against what it knows the backup holds
//! now, and drops entries that fail.
//!
//! # Two generations
//! Entries go into a young map; when it holds half the capacity, it becomes
//! the old map (the previous old map is dropped) and a new young map starts.
//! An entry found in the old map moves to the young one when it is indexed
//! again. So the index keeps at most `capacity` entries (two, when the
//! capacity is 1) and recently indexed content survives, without a per-entry
//! age.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Estimated bytes an index entry takes (key, value and hash table overhead).
pub(crate) const ENTRY_BYTES: u64 = 48;

/// The index keys are keyed blake3 digests: already uniform and secret, so
/// their low bits are the hash (no SipHash on the hot path).
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Map = HashMap<u128, (u64, u16), BuildHasherDefault<DigestHasher>>;

/// A two-generation index from block digest to (page, block).
pub(crate) struct SharingIndex {
    young: Map,
    old: Map,
    cap: usize,
}

impl SharingIndex {
    /// An index of at most `cap` entries; 0 disables it.
    pub(crate) fn new(cap: usize) -> Self {
        SharingIndex {
            young: Map::default(),
            old: Map::default(),
            cap,
        }
    }

    /// Whether the index is in use.
    pub(crate) fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// The entry for digest `d`, if `verify(page, block)` confirms that the
    /// backup still holds that content there; an entry that fails is removed.
    pub(crate) fn lookup(
        &mut self,
        d: u128,
        verify: impl FnOnce(u64, usize) -> bool,
    ) -> Option<(u64, usize)> {
        let (q, qb) = self.young.get(&d).or_else(|| self.old.get(&d)).copied()?;
        if verify(q, qb as usize) {
            Some((q, qb as usize))
        } else {
            if self.young.remove(&d).is_none() {
                self.old.remove(&d);
            }
            None
        }
    }

    /// Records that block `b` of `page` holds the content of digest `d`. An
    /// existing entry is kept: it names content that has stayed put (a
    /// duplicate's fresh location is more likely to change again).
    pub(crate) fn insert(&mut self, d: u128, page: u64, b: usize) {
        if self.cap == 0 || self.young.contains_key(&d) {
            return;
        }
        let v = self.old.remove(&d).unwrap_or((page, b as u16));
        if self.young.len() >= self.cap / 2 {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(d, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_returns_only_verified_entries_and_drops_stale_ones() {
        let mut ix = SharingIndex::new(100);
        ix.insert(1, 10, 3);
        ix.insert(2, 11, 0);
        assert_eq!(ix.lookup(1, |q, qb| (q, qb) == (10, 3)), Some((10, 3)));
        // Verification fails: nothing returned, and the entry is gone.
        assert_eq!(ix.lookup(2, |_, _| false), None);
        assert_eq!(ix.lookup(2, |_, _| true), None);
        assert_eq!(ix.lookup(99, |_, _| true), None);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn an_existing_entry_is_kept() {
        let mut ix = SharingIndex::new(100);
        ix.insert(7, 1, 1);
        ix.insert(7, 2, 2);
        assert_eq!(ix.lookup(7, |_, _| true), Some((1, 1)));
    }

    #[test]
    fn two_generations_bound_the_size_and_keep_recent_entries() {
        let cap = 10;
        let mut ix = SharingIndex::new(cap);
        for d in 0..1000u128 {
            ix.insert(d, d as u64, 0);
            assert!(ix.len() <= cap, "{} entries", ix.len());
            // The latest half-capacity of entries is always there.
            for r in d.saturating_sub(cap as u128 / 2 - 1)..=d {
                assert_eq!(ix.lookup(r, |_, _| true), Some((r as u64, 0)));
            }
        }
        // An old-generation entry indexed again moves to the young one, with
        // its original location, and so survives the next rotation.
        let mut ix = SharingIndex::new(4);
        ix.insert(1, 1, 0);
        ix.insert(2, 2, 0);
        ix.insert(3, 3, 0); // young held cap / 2: old {1, 2}, young {3}
        ix.insert(1, 9, 9); // 1 moves: old {2}, young {3, 1}
        ix.insert(4, 4, 0); // old {3, 1}, young {4}; 2 is dropped
        assert_eq!(ix.lookup(2, |_, _| true), None);
        assert_eq!(ix.lookup(1, |_, _| true), Some((1, 0)));
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn capacity_zero_disables_it() {
        let mut ix = SharingIndex::new(0);
        assert!(!ix.enabled());
        ix.insert(1, 1, 1);
        assert_eq!(ix.len(), 0);
        // Capacity 1: at most two entries (a young and an old one).
        let mut ix = SharingIndex::new(1);
        for d in 0..10 {
            ix.insert(d, 0, 0);
            assert!(ix.len() <= 2);
        }
    }
}
