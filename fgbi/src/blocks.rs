//! Facts about the blocks of the page being encoded, computed once and
//! passed to every step that needs them: which blocks changed and which of
//! those are zero ([`BlockMasks`]), and their digests, computed on first use
//! ([`PageDigests`]).
//!
//! A page has at most 64 blocks (blocks are at least 64 bytes), so a mask is
//! a `u64` with bit `b` for block `b`.

use crate::codec::{chunk_eq, is_zero};
use crate::digest::Digester;
use crate::PAGE_SIZE;

/// The mask of every block of a page of `nb` blocks.
pub(crate) fn all_blocks(nb: usize) -> u64 {
    u64::MAX >> (64 - nb)
}

/// The blocks of `bs` bytes that contain a set bit of `chunks`, a mask of
/// 64-byte chunks.
pub(crate) fn blocks_from_chunks(chunks: u64, bs: usize) -> u64 {
    let per = bs / 64; // chunks per block, at most 16
    if per == 1 {
        return chunks;
    }
    let nb = PAGE_SIZE / bs;
    let block_mask = (1u64 << per) - 1;
    (0..nb)
        .filter(|b| (chunks >> (b * per)) & block_mask != 0)
        .fold(0, |m, b| m | 1 << b)
}

/// The blocks of `bs` bytes all of whose 64-byte chunks are set in `chunks`.
fn blocks_all_set(chunks: u64, bs: usize) -> u64 {
    let per = bs / 64;
    if per == 1 {
        return chunks;
    }
    let block_mask = (1u64 << per) - 1;
    (0..PAGE_SIZE / bs)
        .filter(|b| (chunks >> (b * per)) & block_mask == block_mask)
        .fold(0, |m, b| m | 1 << b)
}

/// The 64-byte chunks in which `new` differs from `old`.
pub(crate) fn chunks_changed(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE]) -> u64 {
    let (oc, _) = old.as_chunks::<64>();
    let (nc, _) = new.as_chunks::<64>();
    let mut mask = 0u64;
    for (c, (x, y)) in oc.iter().zip(nc).enumerate() {
        if !chunk_eq(x, y) {
            mask |= 1 << c;
        }
    }
    mask
}

/// The blocks whose digest differs between two digest sets of a page.
pub(crate) fn digests_changed(old: &[u128], new: &[u128]) -> u64 {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .fold(0, |m, (b, _)| m | 1 << b)
}

/// The set bits of `mask`, lowest first.
pub(crate) fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let b = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            b
        })
    })
}

/// Which blocks of a page changed, and which of those are now zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockMasks {
    /// Blocks whose content differs from what the backup holds.
    pub changed: u64,
    /// Changed blocks that are all zero (a subset of `changed`).
    pub zero: u64,
}

impl BlockMasks {
    /// The masks for the `changed` blocks of `data`: each changed block is
    /// tested for zero once, here.
    pub(crate) fn new(changed: u64, data: &[u8; PAGE_SIZE], bs: usize) -> Self {
        let (chunks, _) = data.as_chunks::<64>();
        let per = bs / 64;
        let nb = PAGE_SIZE / bs;
        let zero = if changed == all_blocks(nb) {
            // Every block changed (a rewritten or unknown page): one
            // branch-free pass over the page.
            let mut zc = 0u64;
            for (i, c) in chunks.iter().enumerate() {
                zc |= (chunk_eq(c, &[0; 64]) as u64) << i;
            }
            blocks_all_set(zc, bs)
        } else {
            let mut zero = 0u64;
            for b in bits(changed) {
                if chunks[b * per..(b + 1) * per]
                    .iter()
                    .all(|c| chunk_eq(c, &[0; 64]))
                {
                    zero |= 1 << b;
                }
            }
            zero
        };
        BlockMasks { changed, zero }
    }

    /// Whether block `b` changed.
    pub(crate) fn changed(&self, b: usize) -> bool {
        self.changed >> b & 1 != 0
    }

    /// Whether block `b` changed and is now zero.
    pub(crate) fn zero(&self, b: usize) -> bool {
        self.zero >> b & 1 != 0
    }

    /// Whether the whole page is zero: every changed block is, and so is
    /// every unchanged one (tested only when the changed ones are all zero).
    pub(crate) fn page_is_zero(&self, data: &[u8; PAGE_SIZE], bs: usize) -> bool {
        let nb = PAGE_SIZE / bs;
        self.zero == self.changed
            && bits(all_blocks(nb) & !self.changed).all(|b| is_zero(&data[b * bs..(b + 1) * bs]))
    }
}

/// The digests of the blocks of the page being encoded, each computed at
/// most once per page: on first use ([`Self::of`]) or all at once, batched
/// ([`Self::all`]). Which ones have been computed is itself used: the
/// pipeline indexes only sampled blocks whose digest it needed anyway.
pub(crate) struct PageDigests {
    digester: Digester,
    bs: usize,
    /// The page being encoded; an entry is valid when stamped with it.
    stamp: u64,
    cache: Vec<(u64, u128)>,
    batch: Vec<u128>,
}

impl PageDigests {
    pub(crate) fn new(digester: Digester, bs: usize) -> Self {
        let nb = PAGE_SIZE / bs;
        PageDigests {
            digester,
            bs,
            stamp: 0,
            cache: vec![(0, 0); nb],
            batch: vec![0; nb],
        }
    }

    /// Starts a new page: no digest is known.
    pub(crate) fn start_page(&mut self) {
        self.stamp += 1;
    }

    /// The digest of block `b` of `data` (the page being encoded).
    pub(crate) fn of(&mut self, data: &[u8; PAGE_SIZE], b: usize) -> u128 {
        if let Some(d) = self.known(b) {
            return d;
        }
        let d = self.digester.one(&data[b * self.bs..(b + 1) * self.bs]);
        self.cache[b] = (self.stamp, d);
        d
    }

    /// The digest of block `b`, if computed for this page.
    pub(crate) fn known(&self, b: usize) -> Option<u128> {
        let (st, d) = self.cache[b];
        (st == self.stamp).then_some(d)
    }

    /// Computes the digests of every block of `data` at once (batched).
    pub(crate) fn all(&mut self, data: &[u8; PAGE_SIZE]) -> &[u128] {
        self.digester.page(data, self.bs, &mut self.batch);
        for (c, d) in self.cache.iter_mut().zip(&self.batch) {
            *c = (self.stamp, *d);
        }
        &self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::random_page as page;

    #[test]
    fn masks_match_a_block_by_block_comparison() {
        let old = page(1);
        for bs in [64, 128, 256, 512, 1024] {
            let nb = PAGE_SIZE / bs;
            let mut new = old;
            new[5] ^= 1; // block 0
            new[PAGE_SIZE - 1] ^= 1; // last block
            new[2 * bs..3 * bs].fill(0); // block 2, now zero
            let changed = blocks_from_chunks(chunks_changed(&old, &new), bs);
            let m = BlockMasks::new(changed, &new, bs);
            for b in 0..nb {
                let r = b * bs..(b + 1) * bs;
                assert_eq!(
                    m.changed(b),
                    old[r.clone()] != new[r.clone()],
                    "bs {bs} b {b}"
                );
                assert_eq!(m.zero(b), m.changed(b) && is_zero(&new[r]), "bs {bs} b {b}");
            }
            assert_eq!(m.zero & !m.changed, 0);
            assert_eq!(bits(m.changed).collect::<Vec<_>>(), [0, 2, nb - 1]);
            assert!(!m.page_is_zero(&new, bs));
            assert_eq!(all_blocks(nb).count_ones() as usize, nb);
            // Every block changed: the one-pass path gives the same zero mask.
            let all = BlockMasks::new(all_blocks(nb), &new, bs);
            for b in 0..nb {
                assert_eq!(
                    all.zero(b),
                    is_zero(&new[b * bs..(b + 1) * bs]),
                    "bs {bs} b {b}"
                );
            }
            let mut z = new;
            z[bs..].fill(0);
            let all = BlockMasks::new(all_blocks(nb), &z, bs);
            assert_eq!(all.zero, all_blocks(nb) & !1);
            assert!(!all.page_is_zero(&z, bs));
            z[..bs].fill(0);
            assert!(BlockMasks::new(all_blocks(nb), &z, bs).page_is_zero(&z, bs));
        }
    }

    #[test]
    fn page_is_zero_checks_the_unchanged_blocks_too() {
        let bs = 64;
        let mut data = [0u8; PAGE_SIZE];
        let m = BlockMasks::new(0b110, &data, bs);
        assert!(m.page_is_zero(&data, bs));
        data[10 * bs] = 1; // an unchanged block that is not zero
        let m = BlockMasks::new(0b110, &data, bs);
        assert_eq!(m.zero, 0b110);
        assert!(!m.page_is_zero(&data, bs));
    }

    #[test]
    fn digests_are_computed_once_per_page_and_forgotten_after() {
        let key = [9; 32];
        let bs = 256;
        let mut pd = PageDigests::new(Digester::new(key), bs);
        let a = page(1);
        pd.start_page();
        assert_eq!(pd.known(3), None);
        let d3 = pd.of(&a, 3);
        assert_eq!(d3, Digester::new(key).one(&a[3 * bs..4 * bs]));
        assert_eq!(pd.known(3), Some(d3));
        assert_eq!(pd.known(4), None);
        let all = pd.all(&a).to_vec();
        assert_eq!(all[3], d3);
        assert!((0..PAGE_SIZE / bs).all(|b| pd.known(b) == Some(all[b])));
        pd.start_page();
        assert_eq!(pd.known(3), None);
        let b = page(2);
        let new = pd.all(&b).to_vec();
        assert_eq!(digests_changed(&all, &new), all_blocks(PAGE_SIZE / bs));
        assert_eq!(digests_changed(&all, &all), 0);
    }
}
