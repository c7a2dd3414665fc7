//! [`crate::Mode::Xbzrle`]: QEMU's XBZRLE scheme over a direct-mapped cache.
//!
//! The cache has `min(budget / 4096, pages)` slots; page `p` can only be held
//! in slot `p % slots`, so caching it evicts whichever page held that slot
//! (as QEMU's page cache does). A page whose previous version is in the cache
//! is sent as a whole-page XOR-RLE delta when that is under 4088 bytes, and
//! raw otherwise; a page not in the cache is sent raw. Either way the new
//! version takes the slot. Zero pages are sent as `ZeroPage` (and nothing if
//! the backup's page is known to be zero already); they leave the cache.
//!
//! # Invariants
//! - Page `p` is only ever in slot `p % slots`; a slot holds at most one page.
//! - A slot's bytes are what the backup holds for its owner.
//! - A page marked zero is zero on the backup.

use crate::codec::{is_zero, xor_rle_encode};
use crate::record::EncodeStats;
use crate::{record, PAGE_SIZE};

const NONE: u64 = u64::MAX;

/// The direct-mapped cache and the pages known to be zero.
pub(crate) struct XbzrleCache {
    /// Slot contents; a slot keeps its buffer once allocated, even unowned.
    slots: Vec<Option<Box<[u8; PAGE_SIZE]>>>,
    /// The page each slot holds, or `NONE`.
    owner: Vec<u64>,
    /// Pages the backup holds as zero (all of them at the start).
    zero: Vec<bool>,
    delta: Vec<u8>,
}

impl XbzrleCache {
    /// A cache of `min(budget_bytes / 4096, pages)` slots for a replica of
    /// `pages` pages, all zero.
    pub(crate) fn new(pages: u64, budget_bytes: u64) -> Self {
        let slots = ((budget_bytes / PAGE_SIZE as u64) as usize).min(pages as usize);
        XbzrleCache {
            slots: (0..slots).map(|_| None).collect(),
            owner: vec![NONE; slots],
            zero: vec![true; pages as usize],
            delta: Vec::with_capacity(2 * PAGE_SIZE),
        }
    }

    /// No page is known to be zero (a replica the encoder has not seen).
    pub(crate) fn all_unknown(&mut self) {
        self.zero.fill(false);
    }

    /// Bytes the cache takes (every allocated slot).
    pub(crate) fn bytes(&self) -> u64 {
        (self.slots.iter().filter(|c| c.is_some()).count() * PAGE_SIZE) as u64
    }

    /// The slot page `page` maps to, if the cache has any.
    fn slot_of(&self, page: u64) -> Option<usize> {
        let n = self.owner.len() as u64;
        (n > 0).then(|| (page % n) as usize)
    }

    /// Appends the record for `data`, the current content of `page`.
    pub(crate) fn encode(
        &mut self,
        page: u64,
        data: &[u8; PAGE_SIZE],
        stats: &mut EncodeStats,
        out: &mut Vec<u8>,
    ) {
        let p = page as usize;
        let slot = self.slot_of(page);
        if is_zero(data) {
            if !self.zero[p] {
                record::zero(page, stats, out);
            }
            if let Some(s) = slot.filter(|&s| self.owner[s] == page) {
                self.owner[s] = NONE;
            }
            self.zero[p] = true;
            return;
        }
        self.zero[p] = false;
        let Some(s) = slot else {
            record::raw(page, data, stats, out);
            return;
        };
        let mut sent = false;
        if self.owner[s] == page {
            let old = self.slots[s].as_deref().expect("owned slot holds a copy");
            if old[..] == data[..] {
                sent = true;
            } else {
                self.delta.clear();
                let limit = PAGE_SIZE - 8;
                if let Some(n) = xor_rle_encode(old, data, &mut self.delta, limit) {
                    if n < limit {
                        record::xor(page, &self.delta, stats, out);
                        sent = true;
                    }
                }
            }
        }
        if !sent {
            record::raw(page, data, stats, out);
        }
        self.owner[s] = page;
        match &mut self.slots[s] {
            Some(c) => c.copy_from_slice(data),
            none => *none = Some(Box::new(*data)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind;

    fn page(v: u8) -> [u8; PAGE_SIZE] {
        let mut p = [v; PAGE_SIZE];
        p[0] = v.wrapping_add(1);
        p
    }

    fn kind_of(out: &[u8]) -> u8 {
        out[1] // pages below 128: a one-byte varint
    }

    #[test]
    fn the_cache_is_direct_mapped() {
        let mut c = XbzrleCache::new(100, 4 * PAGE_SIZE as u64);
        assert_eq!(c.owner.len(), 4);
        let mut st = EncodeStats::default();
        let mut out = Vec::new();
        c.encode(1, &page(1), &mut st, &mut out);
        c.encode(5, &page(5), &mut st, &mut out); // slot 1 too: evicts page 1
        c.encode(2, &page(2), &mut st, &mut out);
        assert_eq!(c.owner, [NONE, 5, 2, NONE]);
        for (s, &o) in c.owner.iter().enumerate() {
            assert!(o == NONE || o % 4 == s as u64);
        }
        // Page 1 was evicted: raw. Page 2 is held: a small delta.
        let mut p1 = page(1);
        p1[9] = 0;
        out.clear();
        c.encode(1, &p1, &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::RAW_PAGE);
        let mut p2 = page(2);
        p2[9] = 0;
        out.clear();
        c.encode(2, &p2, &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::XOR_PAGE);
        assert!(out.len() < 16);
        // Unchanged and held: nothing.
        out.clear();
        c.encode(2, &p2, &mut st, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.bytes(), 2 * PAGE_SIZE as u64);
    }

    #[test]
    fn zero_pages_are_sent_once_and_leave_the_cache() {
        let mut c = XbzrleCache::new(8, 8 * PAGE_SIZE as u64);
        let mut st = EncodeStats::default();
        let mut out = Vec::new();
        // Every page starts zero: nothing to send.
        c.encode(3, &[0; PAGE_SIZE], &mut st, &mut out);
        assert!(out.is_empty());
        c.encode(3, &page(7), &mut st, &mut out);
        out.clear();
        c.encode(3, &[0; PAGE_SIZE], &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::ZERO_PAGE);
        assert_eq!(c.owner[3], NONE);
        // The next version is raw: the old one is no longer what the backup holds.
        out.clear();
        c.encode(3, &page(7), &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::RAW_PAGE);
    }

    #[test]
    fn no_slots_means_raw_or_zero() {
        let mut c = XbzrleCache::new(8, PAGE_SIZE as u64 - 1);
        let mut st = EncodeStats::default();
        let mut out = Vec::new();
        for _ in 0..2 {
            out.clear();
            c.encode(3, &page(7), &mut st, &mut out);
            assert_eq!(kind_of(&out), kind::RAW_PAGE);
        }
        out.clear();
        c.encode(3, &[0; PAGE_SIZE], &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::ZERO_PAGE);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_large_change_is_raw_even_when_held() {
        let mut c = XbzrleCache::new(8, 8 * PAGE_SIZE as u64);
        let mut st = EncodeStats::default();
        let mut out = Vec::new();
        c.encode(0, &page(1), &mut st, &mut out);
        out.clear();
        let mut s = 7u64;
        let mut rnd = [0u8; PAGE_SIZE];
        for b in rnd.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            b.copy_from_slice(&s.to_le_bytes());
        }
        c.encode(0, &rnd, &mut st, &mut out);
        assert_eq!(kind_of(&out), kind::RAW_PAGE);
        assert_eq!(c.slots[0].as_deref(), Some(&rnd));
    }
}
