//! What the encoder knows about the backup's replica, within a memory budget.
//!
//! For each page the encoder knows one of: zero, a full copy, the page's
//! block digests, or nothing ([`Know`]). Copies and digest sets share one
//! budget, counted in units of one digest set (`16 × blocks` bytes); a copy
//! costs `4096 / (16 × blocks)` units.
//!
//! # The adaptive split
//! The number of copies is capped, and the cap moves as ARC balances its
//! lists: a page the encoder had forgotten (a miss, [`Knowledge::miss`])
//! lowers the cap, so more of the budget becomes digests and covers a larger
//! working set; a digest hit on a page demoted within the last `cap_max`
//! demotions ([`Knowledge::digest_hit`], ARC's ghost hit) raises it, since a
//! larger copy cache would have kept that page and a copy encodes a change
//! several times smaller than digests do. The cap stays within
//! `[cap_max / 16, cap_max]` (at least 1 when copies fit at all), where
//! `cap_max` is the number of copies the whole budget holds.
//!
//! # Eviction
//! Copies beyond the cap or the budget are demoted to digest sets by CLOCK
//! (a copy used since the hand last passed gets a second chance). Digest
//! sets are evicted to nothing at random (a xorshift with a fixed seed, so
//! runs repeat): unlike FIFO or LRU, random replacement keeps a share of hits
//! when a cyclic working set exceeds the budget. Whatever is forgotten, the
//! next change of that page is encoded with every block counted as changed:
//! exactness never depends on the budget.
//!
//! # Invariants
//! - Units in use (copies × copy cost + digest sets) never exceed the budget.
//! - A page is `Copy(s)` exactly when copy slot `s` is owned by that page, and
//!   likewise for digest slots; a free slot holds nothing.
//! - A copy holds the page's content as last stored; a digest set holds the
//!   digests of that content.

use crate::digest::Digester;
use crate::PAGE_SIZE;

/// What the encoder knows about one page of the backup's replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Know {
    /// Nothing: the next change is encoded as if every block changed.
    Unknown,
    /// All zero (every page starts so: a fresh replica is zeroed).
    Zero,
    /// A full copy in copy slot `n`.
    Copy(u32),
    /// Block digests in digest slot `n`.
    Digest(u32),
}

/// Slots of items owned by pages. A freed slot is reused before the vector
/// grows (the last freed first); slots are never removed, so slot numbers
/// stay valid and the CLOCK hand and random eviction see a stable range.
struct Slots<T> {
    items: Vec<Option<(u64, T)>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slots<T> {
    fn new() -> Self {
        Slots {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `item` for `owner`; returns its slot.
    fn insert(&mut self, owner: u64, item: T) -> u32 {
        let s = match self.free.pop() {
            Some(s) => s as usize,
            None => {
                self.items.push(None);
                self.items.len() - 1
            }
        };
        self.items[s] = Some((owner, item));
        self.len += 1;
        s as u32
    }

    /// Frees slot `s`, returning its owner and item.
    fn remove(&mut self, s: u32) -> (u64, T) {
        let v = self.items[s as usize].take().expect("slot in use");
        self.free.push(s);
        self.len -= 1;
        v
    }

    fn get(&self, s: u32) -> &T {
        &self.items[s as usize].as_ref().expect("slot in use").1
    }

    fn get_mut(&mut self, s: u32) -> &mut T {
        &mut self.items[s as usize].as_mut().expect("slot in use").1
    }

    fn owner(&self, s: usize) -> Option<u64> {
        self.items[s].as_ref().map(|(o, _)| *o)
    }
}

/// A held copy and its CLOCK reference bit.
struct CopySlot {
    data: Box<[u8; PAGE_SIZE]>,
    used: bool,
}

/// A held digest set and the demotion count when it was made.
struct DigestSlot {
    digests: Box<[u128]>,
    born: u64,
}

/// Per-page knowledge of the backup, copies and digest sets within a budget.
pub(crate) struct Knowledge {
    bs: usize,
    nb: usize,
    know: Vec<Know>,
    copies: Slots<CopySlot>,
    /// CLOCK hand over the copy slots.
    hand: usize,
    cap: usize,
    cap_max: usize,
    cap_min: usize,
    /// Copies demoted so far (the clock of the ghost-hit test).
    demotions: u64,
    digests: Slots<DigestSlot>,
    rng: u64,
    budget_units: usize,
    copy_cost: usize,
    digester: Digester,
}

impl Knowledge {
    /// Forgets what every page holds, before anything was stored: the
    /// replica is an image the encoder has not seen (memory reuse).
    pub(crate) fn all_unknown(&mut self) {
        debug_assert!(self.copies.len == 0 && self.digests.len == 0);
        self.know.fill(Know::Unknown);
    }

    /// Knowledge of `pages` pages, all zero, keeping copies and digest sets of
    /// `bs`-byte blocks within `budget_bytes`.
    pub(crate) fn new(pages: u64, bs: usize, budget_bytes: u64, digester: Digester) -> Self {
        let nb = PAGE_SIZE / bs;
        let unit = 16 * nb;
        let copy_cost = PAGE_SIZE / unit;
        let budget_units = (budget_bytes / unit as u64) as usize;
        let cap_max = (budget_units / copy_cost).min(pages as usize);
        Knowledge {
            bs,
            nb,
            know: vec![Know::Zero; pages as usize],
            copies: Slots::new(),
            hand: 0,
            cap: cap_max,
            cap_max,
            cap_min: (cap_max / 16).max(cap_max.min(1)),
            demotions: 0,
            digests: Slots::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
            budget_units,
            copy_cost,
            digester,
        }
    }

    /// What is known about page `p` (nothing, for a page out of range).
    pub(crate) fn get(&self, p: u64) -> Know {
        self.know.get(p as usize).copied().unwrap_or(Know::Unknown)
    }

    /// The copy in slot `s`.
    pub(crate) fn copy(&self, s: u32) -> &[u8; PAGE_SIZE] {
        &self.copies.get(s).data
    }

    /// The digest set in slot `s`.
    pub(crate) fn digest_set(&self, s: u32) -> &[u128] {
        &self.digests.get(s).digests
    }

    /// Copies held.
    pub(crate) fn n_copies(&self) -> usize {
        self.copies.len
    }

    /// Digest sets held.
    pub(crate) fn n_digests(&self) -> usize {
        self.digests.len
    }

    /// Bytes the copies and digest sets take.
    pub(crate) fn bytes(&self) -> u64 {
        (self.copies.len * PAGE_SIZE + self.digests.len * 16 * self.nb) as u64
    }

    /// A page is being encoded against its copy in slot `s`: CLOCK's
    /// reference bit.
    pub(crate) fn copy_hit(&mut self, s: u32) {
        self.copies.get_mut(s).used = true;
    }

    /// A page is being encoded against its digest set in slot `s`. If it was
    /// demoted so recently that the whole budget as copies would have kept it,
    /// more copies pay: the cap rises.
    pub(crate) fn digest_hit(&mut self, s: u32) {
        if self.demotions - self.digests.get(s).born <= self.cap_max as u64 {
            self.cap = (self.cap + 1).min(self.cap_max);
        }
    }

    /// A page the encoder had forgotten is being encoded: the cap falls, so
    /// more of the budget goes to digests.
    pub(crate) fn miss(&mut self) {
        self.cap = self.cap.saturating_sub(1).max(self.cap_min);
    }

    /// Records that the backup's page `p` is now all zero.
    pub(crate) fn set_zero(&mut self, p: u64) {
        self.forget(p as usize);
        self.know[p as usize] = Know::Zero;
    }

    /// Records that the backup now holds `data` for `page`: as a copy if the
    /// cap and the budget allow (making room by demoting copies and evicting
    /// digest sets), else as digests, else nothing.
    pub(crate) fn store(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        let p = page as usize;
        if let Know::Copy(s) = self.know[p] {
            let c = self.copies.get_mut(s);
            c.data.copy_from_slice(data);
            c.used = true;
            return;
        }
        self.forget(p);
        if self.cap == 0 {
            self.store_digests(page, data);
            return;
        }
        // Make room: demote copies beyond the cap, then evict digests.
        while self.copies.len >= self.cap || self.units_used() + self.copy_cost > self.budget_units
        {
            if self.copies.len > 0 && (self.copies.len >= self.cap || self.digests.len == 0) {
                self.demote_one_copy();
            } else if self.digests.len > 0 {
                self.evict_random_digests();
            } else {
                self.store_digests(page, data);
                return;
            }
        }
        let slot = self.copies.insert(
            page,
            CopySlot {
                data: Box::new(*data),
                used: true,
            },
        );
        self.know[p] = Know::Copy(slot);
    }

    fn units_used(&self) -> usize {
        self.copies.len * self.copy_cost + self.digests.len
    }

    /// Drops whatever is held for page `p`, which becomes unknown.
    fn forget(&mut self, p: usize) {
        match self.know[p] {
            Know::Copy(s) => {
                self.copies.remove(s);
            }
            Know::Digest(s) => {
                self.digests.remove(s);
            }
            _ => {}
        }
        self.know[p] = Know::Unknown;
    }

    /// CLOCK: the first copy not used since the hand last passed, to digests.
    fn demote_one_copy(&mut self) {
        let slots = self.copies.items.len();
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % slots;
            let Some(c) = self.copies.items[s].as_mut() else {
                continue;
            };
            if c.1.used {
                c.1.used = false;
                continue;
            }
            let (victim, c) = self.copies.remove(s as u32);
            self.know[victim as usize] = Know::Unknown;
            self.demotions += 1;
            self.store_digests(victim, &c.data);
            return;
        }
    }

    /// Evicts a digest set chosen at random.
    fn evict_random_digests(&mut self) {
        let n = self.digests.items.len() as u64;
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            if let Some(owner) = self.digests.owner((self.rng % n) as usize) {
                self.forget(owner as usize);
                return;
            }
        }
    }

    /// Keeps the digests of `data` for `page` (evicting other digest sets to
    /// make room), or nothing if the budget holds no digest set at all. The
    /// page must be unknown on entry.
    fn store_digests(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        while self.units_used() + 1 > self.budget_units {
            if self.digests.len == 0 {
                self.know[page as usize] = Know::Unknown;
                return;
            }
            self.evict_random_digests();
        }
        let mut set: Box<[u128]> = vec![0; self.nb].into_boxed_slice();
        self.digester.page(data, self.bs, &mut set);
        let slot = self.digests.insert(
            page,
            DigestSlot {
                digests: set,
                born: self.demotions,
            },
        );
        self.know[page as usize] = Know::Digest(slot);
    }

    /// Checks every invariant in the module documentation against the
    /// content last stored for each page (`None`: zero).
    #[cfg(test)]
    fn check(&self, content: &[Option<[u8; PAGE_SIZE]>]) {
        assert!(self.units_used() <= self.budget_units, "over the budget");
        assert!(self.copies.len <= self.cap_max);
        assert!((self.cap_min..=self.cap_max).contains(&self.cap));
        let mut copies = 0;
        let mut digests = 0;
        for (p, k) in self.know.iter().enumerate() {
            match *k {
                Know::Copy(s) => {
                    copies += 1;
                    assert_eq!(self.copies.owner(s as usize), Some(p as u64));
                    assert_eq!(Some(*self.copy(s)), content[p]);
                }
                Know::Digest(s) => {
                    digests += 1;
                    assert_eq!(self.digests.owner(s as usize), Some(p as u64));
                    let mut want = vec![0; self.nb];
                    self.digester
                        .page(content[p].as_ref().unwrap(), self.bs, &mut want);
                    assert_eq!(self.digest_set(s), &want[..]);
                }
                Know::Zero => assert!(content[p].is_none()),
                Know::Unknown => {}
            }
        }
        assert_eq!((copies, digests), (self.copies.len, self.digests.len));
        let used = |items: usize, free: &[u32]| items - free.len();
        assert_eq!(used(self.copies.items.len(), &self.copies.free), copies);
        assert_eq!(used(self.digests.items.len(), &self.digests.free), digests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::random_page as page;

    /// Random stores, zeroes, hits and misses against many budgets: the
    /// invariants hold after every step.
    #[test]
    fn stays_within_the_budget_and_consistent() {
        let pages = 64u64;
        for bs in [64, 256, 1024] {
            let unit = 16 * (PAGE_SIZE / bs) as u64;
            for budget in [
                0,
                unit - 1,
                unit,
                3 * unit,
                PAGE_SIZE as u64,
                10 * 4096,
                80 * 4096,
            ] {
                let mut k = Knowledge::new(pages, bs, budget, Digester::new([3; 32]));
                let mut content: Vec<Option<[u8; PAGE_SIZE]>> = vec![None; pages as usize];
                let mut s = 0x1234_5678u64 + budget;
                for step in 0..600u64 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let p = s % pages;
                    match k.get(p) {
                        Know::Copy(c) => k.copy_hit(c),
                        Know::Digest(d) => k.digest_hit(d),
                        Know::Unknown => k.miss(),
                        Know::Zero => {}
                    }
                    if step % 7 == 0 {
                        k.set_zero(p);
                        content[p as usize] = None;
                    } else {
                        let d = page(s);
                        k.store(p, &d);
                        content[p as usize] = Some(d);
                    }
                    k.check(&content);
                }
                assert!(k.bytes() <= budget, "{} > {budget}", k.bytes());
            }
        }
    }

    #[test]
    fn copies_first_then_digests_then_nothing() {
        // 64 B blocks: a digest set is one 1 KiB unit, a copy 4 units; 10 units.
        let mut k = Knowledge::new(100, 64, 10 * 1024, Digester::new([1; 32]));
        assert_eq!(k.cap_max, 2);
        for p in 0..2 {
            k.store(p, &page(p));
            assert!(matches!(k.get(p), Know::Copy(_)));
        }
        // A third copy demotes one to digests (both were used: CLOCK clears
        // both bits and takes the first, page 0).
        k.store(2, &page(2));
        assert!(matches!(k.get(2), Know::Copy(_)));
        assert!(matches!(k.get(0), Know::Digest(_)));
        assert_eq!((k.n_copies(), k.n_digests()), (2, 1));
        // Misses lower the cap to its minimum (1): new pages demote copies
        // and fill the budget with digest sets, evicting some of them.
        for p in 3..20 {
            k.miss();
            k.store(p, &page(p));
        }
        assert_eq!(k.cap, 1);
        assert_eq!(k.n_copies(), 1);
        assert_eq!(k.units_used(), 10);
        let known = (0..20).filter(|&p| k.get(p) != Know::Unknown).count();
        assert_eq!(known, 1 + k.n_digests());
    }

    #[test]
    fn clock_spares_a_copy_used_since_the_hand_passed() {
        let mut k = Knowledge::new(10, 64, 32 * 1024, Digester::new([1; 32]));
        k.cap = 3;
        for p in 0..3 {
            k.store(p, &page(p));
        }
        for c in k.copies.items.iter_mut().flatten() {
            c.1.used = false;
        }
        let Know::Copy(s) = k.get(0) else {
            panic!("page 0 is a copy")
        };
        k.copy_hit(s);
        // The hand passes page 0 (clearing its bit) and demotes page 1.
        k.store(3, &page(3));
        assert!(matches!(k.get(1), Know::Digest(_)));
        for p in [0, 2, 3] {
            assert!(matches!(k.get(p), Know::Copy(_)), "page {p}");
        }
    }

    #[test]
    fn a_ghost_hit_raises_the_cap() {
        let mut k = Knowledge::new(10, 64, 16 * 1024, Digester::new([1; 32]));
        let max = k.cap_max;
        assert_eq!(max, 4);
        for _ in 0..3 {
            k.miss();
        }
        assert_eq!(k.cap, 1);
        k.store(0, &page(0));
        k.store(1, &page(1)); // demotes page 0
        let Know::Digest(d) = k.get(0) else {
            panic!("page 0 was demoted")
        };
        k.digest_hit(d);
        assert_eq!(k.cap, 2);
        for _ in 0..5 {
            k.digest_hit(d);
        }
        assert_eq!(k.cap, max, "never above cap_max");
        // Demoted longer ago than cap_max demotions: not a ghost hit.
        for _ in 0..5 {
            k.miss();
        }
        k.demotions += max as u64 + 1;
        k.digest_hit(d);
        assert_eq!(k.cap, 1);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut k = Knowledge::new(4, 64, 0, Digester::new([1; 32]));
        k.store(1, &page(1));
        assert_eq!(k.get(1), Know::Unknown);
        k.set_zero(1);
        assert_eq!(k.get(1), Know::Zero);
        assert_eq!(k.get(99), Know::Unknown);
        assert_eq!(k.bytes(), 0);
    }
}
