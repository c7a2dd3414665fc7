//! [`crate::Mode::Fgbi`]: the per-page choice of record.
//!
//! For each dirty page, in order:
//! 1. **What the backup holds** ([`Knowledge`]): zero, a copy, digests or
//!    nothing. Hits, ghost hits and misses steer the knowledge budget.
//! 2. **Which blocks changed** ([`BlockMasks`]): against known bytes (zero
//!    or a copy), the whole-page XOR-RLE encoding finds them while it
//!    encodes; against digests, by digesting the page; with nothing known,
//!    every block. No changed block: no record. Changed blocks are tested for
//!    zero once, here; an all-zero page becomes `ZeroPage`.
//! 3. **Sharing** ([`SharingIndex`]), unless the delta against known bytes is
//!    small (under 512 bytes): up to `blocks / 4` changed blocks that were
//!    rewritten (not merely edited) and are not zero are looked up, first to
//!    last, until one names a block the backup verifiably holds; that gives a
//!    source page and a block offset. The digests of the sampled blocks
//!    that were rewritten are computed, for the index.
//! 4. **The record**: a `CopyPage` if the source is at offset 0, is another
//!    page held as a copy, and equals this page; else, with no source and no zeroed block, the whole-page
//!    XOR-RLE delta when it fit, or the whole page (lz4 or raw) when the page
//!    was known but its delta did not fit; else a block list (zero blocks,
//!    references to the source at the same offset, XOR-RLE or raw blocks)
//!    or the whole page, whichever is smaller.
//! 5. **Afterwards**: the sampled blocks whose digest was computed (new or
//!    rewritten content) and are not zero go into the sharing index, and the
//!    new content into the knowledge budget (a zero page is known as zero).
//!
//! The budget is split 95 % for copies and digest sets, 5 % for the sharing
//! index (~48 B an entry).

use crate::blocks::{
    all_blocks, bits, blocks_from_chunks, chunks_changed, digests_changed, BlockMasks, PageDigests,
};
use crate::codec::{put_varint, xor_rle_encode, xor_rle_encode_mask};
use crate::digest::Digester;
use crate::knowledge::{Know, Knowledge};
use crate::record::EncodeStats;
use crate::record::{self, WholePage};
use crate::sharing::{SharingIndex, ENTRY_BYTES};
use crate::{kind, Config, PAGE_SIZE};

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Sampled (indexed) blocks per page: blocks `0, w, 2w, 3w` with
/// `w = blocks / SAMPLES`. Any `w` consecutive blocks of moved content meet
/// an indexed block of the source for any block-aligned shift.
const SAMPLES: usize = 4;

/// What became of a page.
enum Outcome {
    /// The backup already holds it: no record.
    Unchanged,
    /// Sent as `ZeroPage`.
    Zero,
    /// Sent otherwise; the masks are those it was encoded with.
    Sent(BlockMasks),
}

/// The fgbi encoder: knowledge budget, sharing index and per-page scratch.
pub(crate) struct FgbiPipeline {
    bs: usize,
    nb: usize,
    knowledge: Knowledge,
    index: SharingIndex,
    digests: PageDigests,
    whole: WholePage,
    /// The whole-page XOR-RLE delta of the page being encoded, then block deltas.
    delta: Vec<u8>,
    /// The block list being built.
    rec: Vec<u8>,
}

impl FgbiPipeline {
    /// A pipeline for a replica of `pages` pages, all zero.
    pub(crate) fn new(cfg: &Config, pages: u64) -> Self {
        let bs = cfg.block_size;
        let budget = cfg.budget_bytes;
        let digester = Digester::new(cfg.key);
        FgbiPipeline {
            bs,
            nb: PAGE_SIZE / bs,
            knowledge: Knowledge::new(pages, bs, budget * 19 / 20, digester.clone()),
            index: SharingIndex::new((budget / 20 / ENTRY_BYTES) as usize),
            digests: PageDigests::new(digester, bs),
            whole: WholePage::new(),
            delta: Vec::with_capacity(2 * PAGE_SIZE),
            rec: Vec::with_capacity(2 * PAGE_SIZE),
        }
    }

    /// Copies held by the knowledge budget.
    pub(crate) fn n_copies(&self) -> usize {
        self.knowledge.n_copies()
    }

    /// Digest sets held by the knowledge budget.
    pub(crate) fn n_digests(&self) -> usize {
        self.knowledge.n_digests()
    }

    /// Bytes of copies, digest sets and index entries.
    pub(crate) fn bytes(&self) -> u64 {
        self.knowledge.bytes() + self.index.len() as u64 * ENTRY_BYTES
    }

    /// Appends the record for `data`, the current content of `page`, if the
    /// backup does not hold it already.
    /// See [`crate::Encoder::replica_unknown`].
    pub(crate) fn all_unknown(&mut self) {
        self.knowledge.all_unknown();
    }

    pub(crate) fn encode(
        &mut self,
        page: u64,
        data: &[u8; PAGE_SIZE],
        stats: &mut EncodeStats,
        out: &mut Vec<u8>,
    ) {
        self.digests.start_page();
        let know = self.knowledge.get(page);
        match know {
            Know::Copy(s) => {
                stats.copy_hits += 1;
                self.knowledge.copy_hit(s);
            }
            Know::Digest(s) => {
                stats.digest_hits += 1;
                self.knowledge.digest_hit(s);
            }
            Know::Unknown => {
                stats.misses += 1;
                self.knowledge.miss();
            }
            Know::Zero => {}
        }
        match self.choose(page, data, know, stats, out) {
            Outcome::Unchanged => {}
            Outcome::Zero => self.knowledge.set_zero(page),
            Outcome::Sent(m) => {
                for i in 0..SAMPLES {
                    let b = i * self.nb / SAMPLES;
                    if let (true, Some(d)) = (m.changed(b) && !m.zero(b), self.digests.known(b)) {
                        self.index.insert(d, page, b);
                    }
                }
                self.knowledge.store(page, data);
            }
        }
    }

    /// Steps 2 to 4: appends the record (if any) and says what it was.
    fn choose(
        &mut self,
        page: u64,
        data: &[u8; PAGE_SIZE],
        know: Know,
        stats: &mut EncodeStats,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let FgbiPipeline {
            bs,
            nb,
            knowledge,
            index,
            digests,
            whole,
            delta,
            rec,
        } = self;
        let (bs, nb, knowledge) = (*bs, *nb, &*knowledge);
        // The old content, where it is known byte for byte.
        let old: Option<&[u8; PAGE_SIZE]> = match know {
            Know::Zero => Some(&ZERO_PAGE),
            Know::Copy(s) => Some(knowledge.copy(s)),
            _ => None,
        };
        // Which blocks changed. Against known bytes, the whole-page XOR-RLE
        // scan finds them while it encodes (one pass over the page).
        let mut xor_len: Option<usize> = None;
        let changed = match (old, know) {
            (Some(o), _) => {
                delta.clear();
                let mut chunks = 0u64;
                xor_len = xor_rle_encode_mask(o, data, delta, PAGE_SIZE - 8, &mut chunks);
                if xor_len.is_none() {
                    chunks = chunks_changed(o, data);
                }
                blocks_from_chunks(chunks, bs)
            }
            (None, Know::Digest(s)) => digests_changed(knowledge.digest_set(s), digests.all(data)),
            _ => all_blocks(nb),
        };
        if changed == 0 {
            return Outcome::Unchanged;
        }
        let m = BlockMasks::new(changed, data, bs);
        if m.page_is_zero(data, bs) {
            // A page known to be zero that is still zero has no changed block.
            debug_assert_ne!(know, Know::Zero);
            record::zero(page, stats, out);
            return Outcome::Zero;
        }
        // Step 3: a source page for references, from changed blocks that were
        // rewritten (moved or duplicated content rewrites most of a block; a
        // few changed words are cheaper as a delta and are not looked up).
        let mut source: Option<(u64, isize)> = None;
        // A page whose delta against known bytes is small has little left to
        // share: skip the lookups (and their per-block checks) for it.
        let small_delta = matches!(xor_len, Some(n) if n < PAGE_SIZE / 8);
        if index.enabled() && !small_delta {
            // A page unknown or mostly rewritten gets all its digests at once
            // (batched); a page known by digests has them already.
            if !matches!(know, Know::Digest(_)) && (old.is_none() || xor_len.is_none()) {
                digests.all(data);
            }
            let window = nb / SAMPLES;
            let mut looked = 0;
            for b in bits(m.changed) {
                if looked == window || source.is_some() {
                    break;
                }
                if m.zero(b) || !mostly_changed(old, data, b, bs) {
                    continue;
                }
                looked += 1;
                let d = digests.of(data, b);
                let verify = |q, qb| backup_block_is(knowledge, digests, bs, (q, qb), data, b);
                if let Some((q, qb)) = index.lookup(d, verify) {
                    source = Some((q, qb as isize - b as isize));
                }
            }
            // Digests of the rewritten sampled blocks, to index them.
            for i in 0..SAMPLES {
                let b = i * window;
                if m.changed(b)
                    && !m.zero(b)
                    && digests.known(b).is_none()
                    && mostly_changed(old, data, b, bs)
                {
                    digests.of(data, b);
                }
            }
        }
        // Step 4. The whole page is a copy of another page the backup holds.
        if let Some((q, 0)) = source {
            if let Know::Copy(s) = knowledge.get(q) {
                if q != page && knowledge.copy(s) == data {
                    record::copy(page, q, stats, out);
                    return Outcome::Sent(m);
                }
            }
        }
        // No shared content and no zeroed block: the whole-page delta is the
        // best candidate when it fits; when it did not fit against known
        // bytes, no block list beats the whole page either.
        if source.is_none() && m.zero == 0 && old.is_some() {
            if xor_len.is_some() {
                record::xor(page, delta, stats, out);
            } else {
                whole.prepare(data);
                whole.emit(page, data, stats, out);
            }
            return Outcome::Sent(m);
        }
        // A block list: decide every changed block first (references are
        // verified here), then write them.
        let mut refs = [None; PAGE_SIZE / 64];
        if let Some((q, shift)) = source {
            for b in bits(m.changed & !m.zero) {
                let qb = b as isize + shift;
                if (0..nb as isize).contains(&qb)
                    && backup_block_is(knowledge, digests, bs, (q, qb as usize), data, b)
                {
                    refs[b] = Some((q, qb as usize));
                }
            }
        }
        rec.clear();
        put_varint(rec, m.changed.count_ones() as u64);
        let mut n_refs = 0;
        for b in bits(m.changed) {
            let blk = &data[b * bs..(b + 1) * bs];
            put_varint(rec, b as u64);
            if m.zero(b) {
                rec.push(kind::B_ZERO);
            } else if let Some((q, qb)) = refs[b] {
                rec.push(kind::B_REF);
                put_varint(rec, q);
                put_varint(rec, qb as u64);
                n_refs += 1;
            } else {
                delta.clear();
                let xor =
                    old.and_then(|o| xor_rle_encode(&o[b * bs..(b + 1) * bs], blk, delta, bs - 4));
                match xor {
                    Some(n) => {
                        rec.push(kind::B_XOR);
                        put_varint(rec, n as u64);
                        rec.extend_from_slice(delta);
                    }
                    None => {
                        rec.push(kind::B_RAW);
                        rec.extend_from_slice(blk);
                    }
                }
            }
            if rec.len() > PAGE_SIZE {
                break; // the whole page wins anyway
            }
        }
        // The block list, or the whole page, whichever is smaller.
        let n = whole.prepare(data);
        let whole_len = if whole.is_lz4() { n + 2 } else { PAGE_SIZE };
        if rec.len() < whole_len {
            record::header(page, kind::BLOCKS, out);
            out.extend_from_slice(rec);
            stats.block_pages += 1;
            stats.ref_blocks += n_refs;
        } else {
            whole.emit(page, data, stats, out);
        }
        Outcome::Sent(m)
    }
}

/// Whether the backup's block `qb` of page `q` holds block `b` of `data`, as
/// far as the encoder knows before this record: compared byte for byte where
/// a copy is held (for the page being encoded, its old copy), by digest where
/// digests are, and false otherwise.
fn backup_block_is(
    knowledge: &Knowledge,
    digests: &mut PageDigests,
    bs: usize,
    (q, qb): (u64, usize),
    data: &[u8; PAGE_SIZE],
    b: usize,
) -> bool {
    match knowledge.get(q) {
        Know::Copy(s) => knowledge.copy(s)[qb * bs..(qb + 1) * bs] == data[b * bs..(b + 1) * bs],
        Know::Digest(s) => knowledge.digest_set(s)[qb] == digests.of(data, b),
        _ => false,
    }
}

/// Whether block `b` of `data` was rewritten — at least 7 of every 8 of its
/// words differ from the old content, as when content moves — rather than
/// edited in a few places; true where the old content is not known.
fn mostly_changed(
    old: Option<&[u8; PAGE_SIZE]>,
    data: &[u8; PAGE_SIZE],
    b: usize,
    bs: usize,
) -> bool {
    let Some(o) = old else { return true };
    let r = b * bs..(b + 1) * bs;
    let diff = o[r.clone()]
        .chunks_exact(8)
        .zip(data[r].chunks_exact(8))
        .filter(|(x, y)| x != y)
        .count();
    diff * 8 >= bs / 8 * 7
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply;
    use crate::codec::get_varint;

    const PAGES: u64 = 16;

    use crate::testing::random_page as random;

    /// A pipeline, the primary's memory and the backup's replica.
    struct Rig {
        enc: FgbiPipeline,
        stats: EncodeStats,
        mem: Vec<u8>,
        replica: Vec<u8>,
        bs: usize,
    }

    impl Rig {
        fn new(bs: usize, budget_pages: u64) -> Self {
            let cfg = Config {
                mode: crate::Mode::Fgbi,
                block_size: bs,
                budget_bytes: budget_pages * PAGE_SIZE as u64,
                key: [5; 32],
            };
            Rig {
                enc: FgbiPipeline::new(&cfg, PAGES),
                stats: EncodeStats::default(),
                mem: vec![0; PAGES as usize * PAGE_SIZE],
                replica: vec![0; PAGES as usize * PAGE_SIZE],
                bs,
            }
        }

        fn page(&mut self, p: u64) -> &mut [u8] {
            let p = p as usize;
            &mut self.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        }

        /// Encodes page `p` alone, applies it, checks the replica; returns the
        /// record.
        fn send(&mut self, p: u64) -> Vec<u8> {
            let mut out = Vec::new();
            let data: [u8; PAGE_SIZE] = self.page(p).try_into().unwrap();
            self.enc.encode(p, &data, &mut self.stats, &mut out);
            assert!(out.len() <= 2 + PAGE_SIZE, "record of {} bytes", out.len());
            apply(&mut self.replica, self.bs, &out).unwrap();
            assert!(self.replica == self.mem, "replica differs after page {p}");
            out
        }
    }

    /// The record kind (after the page varint), or `None` for no record.
    fn kind_of(rec: &[u8]) -> Option<u8> {
        let mut pos = 0;
        get_varint(rec, &mut pos).ok()?;
        rec.get(pos).copied()
    }

    #[test]
    fn each_kind_of_change_gets_its_record() {
        let mut r = Rig::new(64, 2 * PAGES);
        // A fresh replica is zero: an unchanged zero page sends nothing.
        assert_eq!(kind_of(&r.send(0)), None);
        // Random content over zero: raw (lz4 does not pay).
        r.page(1).copy_from_slice(&random(1));
        assert_eq!(kind_of(&r.send(1)), Some(kind::RAW_PAGE));
        // Unchanged: nothing. A few words against the held copy: XOR page.
        assert_eq!(kind_of(&r.send(1)), None);
        r.page(1)[100..108].copy_from_slice(&[9; 8]);
        let rec = r.send(1);
        assert_eq!(kind_of(&rec), Some(kind::XOR_PAGE));
        assert!(rec.len() < 20);
        // An edit and a zeroed block: a block list.
        r.page(1)[8..16].copy_from_slice(&[7; 8]);
        r.page(1)[640..704].fill(0);
        assert_eq!(kind_of(&r.send(1)), Some(kind::BLOCKS));
        // A duplicate of a held page: CopyPage.
        let dup: [u8; PAGE_SIZE] = r.page(1).try_into().unwrap();
        r.page(2).copy_from_slice(&dup);
        assert_eq!(kind_of(&r.send(2)), Some(kind::COPY_PAGE));
        // Compressible content: lz4.
        let text: Vec<u8> = (0..PAGE_SIZE).map(|i| b"the page "[i % 9]).collect();
        r.page(3).copy_from_slice(&text);
        assert_eq!(kind_of(&r.send(3)), Some(kind::LZ4_PAGE));
        // Zeroed: ZeroPage, then nothing.
        r.page(1).fill(0);
        assert_eq!(kind_of(&r.send(1)), Some(kind::ZERO_PAGE));
        assert_eq!(kind_of(&r.send(1)), None);
        let st = r.stats;
        assert_eq!(
            (st.raw_pages, st.xor_pages, st.block_pages, st.copy_pages),
            (1, 1, 1, 1)
        );
        assert_eq!((st.lz4_pages, st.zero_pages), (1, 1));
    }

    #[test]
    fn moved_content_becomes_references_to_the_source() {
        for bs in [64, 256, 1024] {
            let mut r = Rig::new(bs, 2 * PAGES);
            r.page(4).copy_from_slice(&random(4));
            r.send(4);
            // Page 5 takes page 4's content shifted by one block, and a new
            // last block. (The first `blocks / 4` rewritten blocks are looked
            // up: with 1 KiB blocks, only the first.)
            let src: [u8; PAGE_SIZE] = r.page(4).try_into().unwrap();
            r.page(5)[..PAGE_SIZE - bs].copy_from_slice(&src[bs..]);
            r.page(5)[PAGE_SIZE - bs..].copy_from_slice(&random(9)[..bs]);
            let rec = r.send(5);
            assert_eq!(kind_of(&rec), Some(kind::BLOCKS), "bs {bs}");
            assert_eq!(r.stats.ref_blocks as usize, PAGE_SIZE / bs - 1, "bs {bs}");
            assert!(rec.len() < 64 + bs + 8 * (PAGE_SIZE / bs), "bs {bs}");
        }
    }

    #[test]
    fn stale_index_entries_are_never_used() {
        let mut r = Rig::new(64, 2 * PAGES);
        r.page(6).copy_from_slice(&random(6));
        r.send(6);
        let old: [u8; PAGE_SIZE] = r.page(6).try_into().unwrap();
        // Page 6 changes completely: the index still names its old blocks.
        r.page(6).copy_from_slice(&random(60));
        r.send(6);
        // Page 7 takes page 6's *old* content: no reference may point at page 6.
        r.page(7).copy_from_slice(&old);
        let rec = r.send(7);
        assert_ne!(kind_of(&rec), Some(kind::COPY_PAGE));
        assert_eq!(r.stats.ref_blocks, 0);
    }

    #[test]
    fn pages_known_by_digests_or_not_at_all_stay_exact() {
        // No budget at all, and a budget of 2 copies or 11 digest sets for
        // 16 pages (every page is touched, then 8 of them over and over).
        for budget_pages in [0, 3] {
            let mut r = Rig::new(64, budget_pages);
            for p in 0..PAGES {
                r.page(p).copy_from_slice(&random(p + 100));
                r.send(p);
            }
            for round in 0..6u64 {
                for p in 0..PAGES / 2 {
                    let w = ((p * 37 + round * 11) % 512) as usize * 8;
                    r.page(p)[w..w + 8].copy_from_slice(&(round + 1).to_le_bytes());
                    r.send(p);
                }
            }
            assert!(r.enc.bytes() <= budget_pages * PAGE_SIZE as u64);
            if budget_pages == 0 {
                assert_eq!(r.stats.digest_hits + r.stats.copy_hits, 0);
            } else {
                assert!(r.stats.digest_hits > 0 && r.stats.misses > 0);
                // A known page with one changed word: one block, not the page.
                assert!(r.stats.block_pages > 0);
            }
        }
    }
}
