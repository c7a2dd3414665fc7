//! The primary side: what the backup holds, and the smallest record for
//! each dirty page.
//!
//! # Knowledge and the budget
//! For each page the encoder knows one of: zero, a full copy, the page's
//! block digests, or nothing. Copies and digest sets share one budget
//! (measured in units of one digest set, `16 × blocks` bytes; a copy costs
//! `4096 / (16 × blocks)` units). The number of copies is capped adaptively,
//! as ARC balances its lists: encoding a page the encoder had forgotten (a
//! miss) lowers the cap, so more of the budget becomes digests and covers a
//! larger working set; a digest hit on a page demoted within the last `cap_max`
//! demotions raises it, since a larger copy cache would have kept that page
//! and a copy encodes a change about five times smaller than digests do. Evicted copies (CLOCK) are demoted to digests; evicted
//! digests (FIFO) to nothing. Whatever is forgotten, the next change of that
//! page is sent whole: exactness never depends on the budget.
//!
//! # Sharing
//! Four sampled blocks of every page sent are indexed by keyed digest. A
//! changed page whose sampled block matches a block on the backup gets every
//! other changed block compared with the block at the same relative position
//! in that source page (bytes where a copy is held, digests otherwise); equal
//! ones become references. Sampling keeps hashing to a few blocks per page,
//! and catches duplicated pages, moved pages and block-aligned moved runs.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::codec::{chunk_eq, is_zero, put_varint, xor_rle_encode, xor_rle_encode_mask};
use crate::digest::Digester;
use crate::{kind, Config, ConfigError, Mode, PAGE_SIZE};

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
const NONE: u64 = u64::MAX;
const SAMPLES: usize = 4;

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

type ShareIndex = HashMap<u128, (u64, u16), BuildHasherDefault<DigestHasher>>;

/// What the encoder knows about one page of the backup's replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Know {
    /// Nothing: the next change is sent whole.
    Unknown,
    /// All zero (every page starts so: a fresh replica is zeroed).
    Zero,
    /// A full copy in copy slot `n`.
    Copy(u32),
    /// Block digests in digest slot `n`.
    Digest(u32),
}

/// Running totals of the encoder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages given to [`Encoder::encode_page`].
    pub pages: u64,
    /// Bytes of records produced.
    pub bytes_out: u64,
    /// Pages whose content had not changed (no record).
    pub unchanged: u64,
    /// `ZeroPage` records.
    pub zero_pages: u64,
    /// `RawPage` records.
    pub raw_pages: u64,
    /// `Lz4Page` records.
    pub lz4_pages: u64,
    /// `XorPage` records.
    pub xor_pages: u64,
    /// `Blocks` records.
    pub block_pages: u64,
    /// Blocks sent as references.
    pub ref_blocks: u64,
    /// `CopyPage` records (whole duplicated pages).
    pub copy_pages: u64,
    /// Pages encoded against a held copy.
    pub copy_hits: u64,
    /// Pages encoded against held digests.
    pub digest_hits: u64,
    /// Pages the encoder had forgotten (sent whole).
    pub misses: u64,
}

/// Encodes dirty pages into records for [`crate::apply`], tracking what the
/// backup will hold once they are applied, within the memory budget.
///
/// Every record returned must reach the backup and be applied, in order: the
/// encoder's knowledge assumes so. After a lost epoch, start a new encoder
/// (and a full resync).
pub struct Encoder {
    cfg: Config,
    bs: usize,
    nb: usize,
    know: Vec<Know>,
    // copies
    copies: Vec<Option<Box<[u8; PAGE_SIZE]>>>,
    copy_owner: Vec<u64>,
    copy_used: Vec<bool>,
    copy_free: Vec<u32>,
    n_copies: usize,
    hand: usize,
    copy_cap: usize,
    copy_cap_max: usize,
    copy_cap_min: usize,
    demotions: u64,
    // digests
    digest_sets: Vec<Option<Box<[u128]>>>,
    digest_owner: Vec<u64>,
    digest_born: Vec<u64>,
    digest_free: Vec<u32>,
    rng: u64,
    n_digests: usize,
    // budget, in units of one digest set
    budget_units: usize,
    copy_cost: usize,
    // sharing: two generations; when the young one fills, it becomes the old
    share: ShareIndex,
    share_old: ShareIndex,
    share_cap: usize,
    digester: Digester,
    stats: EncodeStats,
    // scratch: digests of the page being encoded, valid where stamped
    digests: Vec<(u64, u128)>,
    stamp: u64,
    page_digests: Vec<u128>,
    lz4buf: Vec<u8>,
    changed: Vec<bool>,
    tmp: Vec<u8>,
    rec: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("mode", &self.cfg.mode)
            .field("block_size", &self.bs)
            .field("copies", &self.n_copies)
            .field("digest_sets", &self.n_digests)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Plan {
    Keep,
    Zero,
    Ref(u64, usize),
    Data,
}

impl Encoder {
    /// An encoder for a replica of `pages` pages, all zero at the start.
    pub fn new(cfg: Config, pages: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let bs = cfg.block_size;
        let nb = PAGE_SIZE / bs;
        let unit = 16 * nb;
        let copy_cost = PAGE_SIZE / unit;
        let budget = cfg.budget_bytes;
        let (budget_units, share_cap, direct_slots) = match cfg.mode {
            Mode::Remus => (0, 0, 0),
            Mode::Xbzrle => (
                0,
                0,
                ((budget / PAGE_SIZE as u64) as usize).min(pages as usize),
            ),
            // 95 % for copies and digests, 5 % for the sharing index (~48 B an entry).
            Mode::Fgbi => (
                (budget * 19 / 20 / unit as u64) as usize,
                (budget / 20 / 48) as usize,
                0,
            ),
        };
        let copy_cap_max = (budget_units / copy_cost).min(pages as usize);
        let mut e = Encoder {
            bs,
            nb,
            know: vec![Know::Zero; pages as usize],
            copies: Vec::new(),
            copy_owner: Vec::new(),
            copy_used: Vec::new(),
            copy_free: Vec::new(),
            n_copies: 0,
            hand: 0,
            copy_cap: copy_cap_max,
            copy_cap_max,
            copy_cap_min: (copy_cap_max / 16).max(copy_cap_max.min(1)),
            demotions: 0,
            digest_sets: Vec::new(),
            digest_owner: Vec::new(),
            digest_born: Vec::new(),
            digest_free: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
            n_digests: 0,
            budget_units,
            copy_cost,
            share: ShareIndex::default(),
            share_old: ShareIndex::default(),
            share_cap,
            digester: Digester::new(cfg.key),
            stats: EncodeStats::default(),
            digests: vec![(0, 0); nb],
            stamp: 0,
            page_digests: vec![0; nb],
            lz4buf: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            changed: vec![false; nb],
            tmp: Vec::with_capacity(2 * PAGE_SIZE),
            rec: Vec::with_capacity(2 * PAGE_SIZE),
            cfg,
        };
        if direct_slots > 0 {
            e.copies = (0..direct_slots).map(|_| None).collect();
            e.copy_owner = vec![NONE; direct_slots];
        }
        Ok(e)
    }

    /// Totals so far.
    pub fn stats(&self) -> EncodeStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes the encoder's knowledge of the backup takes now: copies, digest
    /// sets and the sharing index (the per-page state, 8 bytes a page, aside).
    pub fn memory_bytes(&self) -> u64 {
        let copies = self.copies.iter().filter(|c| c.is_some()).count() * PAGE_SIZE;
        (copies + self.n_digests * 16 * self.nb + (self.share.len() + self.share_old.len()) * 48)
            as u64
    }

    /// Appends the record describing `data`, the current content of `page`,
    /// to `out`. Nothing is appended if the backup already holds it.
    pub fn encode_page(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        let start = out.len();
        self.stats.pages += 1;
        match self.cfg.mode {
            Mode::Remus => self.emit_raw(page, data, out),
            Mode::Xbzrle => self.encode_xbzrle(page, data, out),
            Mode::Fgbi => self.encode_fgbi(page, data, out),
        }
        if out.len() == start {
            self.stats.unchanged += 1;
        }
        self.stats.bytes_out += (out.len() - start) as u64;
    }

    fn header(page: u64, k: u8, out: &mut Vec<u8>) {
        put_varint(out, page);
        out.push(k);
    }

    fn emit_raw(&mut self, page: u64, data: &[u8], out: &mut Vec<u8>) {
        Self::header(page, kind::RAW_PAGE, out);
        out.extend_from_slice(data);
        self.stats.raw_pages += 1;
    }

    fn emit_zero(&mut self, page: u64, out: &mut Vec<u8>) {
        Self::header(page, kind::ZERO_PAGE, out);
        self.stats.zero_pages += 1;
    }

    /// XOR page if its payload is under `limit` bytes; returns whether emitted.
    fn try_xor_page(
        &mut self,
        page: u64,
        old: &[u8],
        data: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        self.tmp.clear();
        match xor_rle_encode(old, data, &mut self.tmp, limit) {
            Some(n) if n < limit => {
                Self::header(page, kind::XOR_PAGE, out);
                put_varint(out, n as u64);
                out.extend_from_slice(&self.tmp);
                self.stats.xor_pages += 1;
                true
            }
            _ => false,
        }
    }

    /// Compresses the page into `lz4buf`; returns the size of the whole-page
    /// record body (lz4 if smaller than raw, else raw) and its kind.
    fn whole_page(&mut self, data: &[u8]) -> (usize, u8) {
        match lz4_flex::block::compress_into(data, &mut self.lz4buf) {
            Ok(n) if n + 3 < PAGE_SIZE => (n, kind::LZ4_PAGE),
            _ => (PAGE_SIZE, kind::RAW_PAGE),
        }
    }

    /// Emits the whole page as [`Self::whole_page`] prepared it.
    fn emit_whole(&mut self, page: u64, data: &[u8], n: usize, k: u8, out: &mut Vec<u8>) {
        Self::header(page, k, out);
        if k == kind::LZ4_PAGE {
            put_varint(out, n as u64);
            out.extend_from_slice(&self.lz4buf[..n]);
            self.stats.lz4_pages += 1;
        } else {
            out.extend_from_slice(data);
            self.stats.raw_pages += 1;
        }
    }

    // ---- xbzrle: QEMU's scheme, a direct-mapped cache ----

    fn encode_xbzrle(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        let p = page as usize;
        let slots = self.copy_owner.len();
        let slot = if slots > 0 {
            (page % slots as u64) as usize
        } else {
            0
        };
        if is_zero(data) {
            if self.know[p] != Know::Zero {
                self.emit_zero(page, out);
            }
            if let Know::Copy(s) = self.know[p] {
                self.copy_owner[s as usize] = NONE;
            }
            self.know[p] = Know::Zero;
            return;
        }
        if slots == 0 {
            self.emit_raw(page, data, out);
            self.know[p] = Know::Unknown;
            return;
        }
        let mut sent = false;
        if self.copy_owner[slot] == page {
            let old = self.copies[slot].take().expect("owned slot holds a copy");
            sent =
                old[..] == data[..] || self.try_xor_page(page, &old[..], data, PAGE_SIZE - 8, out);
            self.copies[slot] = Some(old);
        } else if self.copy_owner[slot] != NONE {
            let prev = self.copy_owner[slot];
            self.know[prev as usize] = Know::Unknown;
        }
        if !sent {
            self.emit_raw(page, data, out);
        }
        self.copy_owner[slot] = page;
        match &mut self.copies[slot] {
            Some(c) => c.copy_from_slice(data),
            none => *none = Some(Box::new(*data)),
        }
        self.know[p] = Know::Copy(slot as u32);
    }

    // ---- fgbi ----

    fn digest_of(&mut self, data: &[u8], b: usize) -> u128 {
        let (st, d) = self.digests[b];
        if st == self.stamp {
            return d;
        }
        let d = self.digester.one(&data[b * self.bs..(b + 1) * self.bs]);
        self.digests[b] = (self.stamp, d);
        d
    }

    fn digest_known(&self, b: usize) -> Option<u128> {
        let (st, d) = self.digests[b];
        (st == self.stamp).then_some(d)
    }

    /// Digests every block of the page at once (batched).
    fn digest_all(&mut self, data: &[u8; PAGE_SIZE]) {
        let mut pd = std::mem::take(&mut self.page_digests);
        self.digester.page(data, self.bs, &mut pd);
        for (b, d) in pd.iter().enumerate() {
            self.digests[b] = (self.stamp, *d);
        }
        self.page_digests = pd;
    }

    fn share_get(&self, d: u128) -> Option<(u64, u16)> {
        self.share
            .get(&d)
            .or_else(|| self.share_old.get(&d))
            .copied()
    }

    fn share_remove(&mut self, d: u128) {
        if self.share.remove(&d).is_none() {
            self.share_old.remove(&d);
        }
    }

    fn share_insert(&mut self, d: u128, page: u64, b: usize) {
        if self.share_cap == 0 {
            return;
        }
        // Keep an existing entry: it names content that has stayed put (a
        // duplicate's fresh location is more likely to change again).
        if self.share.contains_key(&d) {
            return;
        }
        let v = self.share_old.remove(&d).unwrap_or((page, b as u16));
        if self.share.len() >= self.share_cap / 2 {
            self.share_old = std::mem::take(&mut self.share);
        }
        self.share.insert(d, v);
    }

    /// Whether the backup's block (`q`, `qb`) holds block `b` of `data`, per
    /// the encoder's knowledge before this record. `cur` is the page being
    /// encoded and its old copy (taken out of its slot meanwhile).
    fn backup_block_is(&mut self, q: u64, qb: usize, data: &[u8], b: usize, cur: Cur<'_>) -> bool {
        let bs = self.bs;
        match self.know.get(q as usize).copied() {
            Some(Know::Copy(s)) => {
                let c: &[u8] = if q == cur.0 {
                    match cur.1 {
                        Some(c) => &c[..],
                        None => return false,
                    }
                } else {
                    match self.copies[s as usize].as_ref() {
                        Some(c) => &c[..],
                        None => return false,
                    }
                };
                c[qb * bs..(qb + 1) * bs] == data[b * bs..(b + 1) * bs]
            }
            Some(Know::Digest(s)) => {
                let d = self.digest_of(data, b);
                self.digest_sets[s as usize].as_ref().expect("digest slot")[qb] == d
            }
            _ => false,
        }
    }

    fn encode_fgbi(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        let p = page as usize;
        let (bs, nb) = (self.bs, self.nb);
        let know = self.know[p];
        self.stamp += 1;
        // The old content, where it is known byte for byte.
        let old: Option<Box<[u8; PAGE_SIZE]>> = match know {
            Know::Copy(s) => {
                self.copy_used[s as usize] = true;
                self.stats.copy_hits += 1;
                self.copies[s as usize].take()
            }
            _ => None,
        };
        let result = self.encode_fgbi_with(page, data, know, old.as_deref(), out);
        if let (Know::Copy(s), Some(o)) = (know, old) {
            self.copies[s as usize] = Some(o);
        }
        match result {
            Outcome::Unchanged => {}
            Outcome::Zero => {
                self.forget(p);
                self.know[p] = Know::Zero;
            }
            Outcome::Sent => {
                // Index the sampled blocks of the new content.
                for i in 0..SAMPLES {
                    let b = i * nb / SAMPLES;
                    // Sampled blocks whose digest was computed: new or rewritten content.
                    if let (true, Some(d)) = (self.changed[b], self.digest_known(b)) {
                        if !is_zero(&data[b * bs..(b + 1) * bs]) {
                            self.share_insert(d, page, b);
                        }
                    }
                }
                self.store_copy(page, data);
            }
        }
    }

    fn encode_fgbi_with(
        &mut self,
        page: u64,
        data: &[u8; PAGE_SIZE],
        know: Know,
        copy: Option<&[u8; PAGE_SIZE]>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let (bs, nb) = (self.bs, self.nb);
        let old: Option<&[u8; PAGE_SIZE]> = match know {
            Know::Zero => Some(&ZERO_PAGE),
            Know::Copy(_) => copy,
            _ => None,
        };
        // Which blocks changed. Against known bytes, the whole-page XOR-RLE
        // scan finds them while it encodes (one pass over the page).
        let mut xor_len: Option<usize> = None;
        match (old, know) {
            (Some(o), _) => {
                self.tmp.clear();
                let mut mask = 0u64;
                xor_len = xor_rle_encode_mask(o, data, &mut self.tmp, PAGE_SIZE - 8, &mut mask);
                if xor_len.is_none() {
                    let (oc, _) = o.as_chunks::<64>();
                    let (nc, _) = data.as_chunks::<64>();
                    mask = 0;
                    for (c, (x, y)) in oc.iter().zip(nc).enumerate() {
                        if !chunk_eq(x, y) {
                            mask |= 1 << c;
                        }
                    }
                }
                let per = bs / 64;
                let block_mask = (1u64 << per) - 1; // per <= 16
                for b in 0..nb {
                    self.changed[b] = (mask >> (b * per)) & block_mask != 0;
                }
            }
            (None, Know::Digest(s)) => {
                self.stats.digest_hits += 1;
                // Demoted so recently that copies alone (the whole budget as
                // copies) would have kept it: more copies pay (ARC's ghost hit).
                if self.demotions - self.digest_born[s as usize] <= self.copy_cap_max as u64 {
                    self.copy_cap = (self.copy_cap + 1).min(self.copy_cap_max);
                }
                self.digest_all(data);
                let set = self.digest_sets[s as usize].as_ref().expect("digest slot");
                for (b, c) in self.changed.iter_mut().enumerate() {
                    *c = set[b] != self.digests[b].1;
                }
            }
            _ => {
                self.stats.misses += 1;
                self.copy_cap = self.copy_cap.saturating_sub(1).max(self.copy_cap_min);
                self.changed.iter_mut().for_each(|c| *c = true);
            }
        }
        if xor_len == Some(0) || !self.changed.iter().any(|&c| c) {
            return Outcome::Unchanged;
        }
        if is_zero(data) {
            if know == Know::Zero {
                return Outcome::Unchanged;
            }
            self.emit_zero(page, out);
            return Outcome::Zero;
        }
        // A source page for references, from sampled blocks that were
        // rewritten (moved or duplicated content rewrites most of a block; a
        // few changed words are cheaper as a delta and are not looked up).
        let mut source: Option<(u64, isize)> = None;
        // A page whose delta against known bytes is small has little left to
        // share: skip the lookups (and their per-block checks) for it.
        let small_delta = matches!(xor_len, Some(n) if n < PAGE_SIZE / 8);
        if self.share_cap > 0 && !small_delta {
            // The index holds every (nb / SAMPLES)-th block of each page, so a
            // window of that many consecutive blocks meets an indexed block for
            // any block-aligned shift of the content.
            // A page mostly rewritten gets all its digests at once (batched).
            if !matches!(know, Know::Digest(_)) && (old.is_none() || xor_len.is_none()) {
                self.digest_all(data);
            }
            let window = nb / SAMPLES;
            let mut looked = 0;
            for b in 0..nb {
                let blk = &data[b * bs..(b + 1) * bs];
                if looked == window || source.is_some() {
                    break;
                }
                if !self.changed[b] || !mostly_changed(old, blk, b * bs) || is_zero(blk) {
                    continue;
                }
                looked += 1;
                let d = self.digest_of(data, b);
                if let Some((q, qb)) = self.share_get(d) {
                    if self.backup_block_is(q, qb as usize, data, b, (page, copy)) {
                        source = Some((q, qb as isize - b as isize));
                    } else {
                        self.share_remove(d);
                    }
                }
            }
            // Digests of the rewritten sampled blocks, to index them.
            for i in 0..SAMPLES {
                let b = i * window;
                let blk = &data[b * bs..(b + 1) * bs];
                if self.changed[b]
                    && self.digest_known(b).is_none()
                    && mostly_changed(old, blk, b * bs)
                    && !is_zero(blk)
                {
                    self.digest_of(data, b);
                }
            }
        }
        // The whole page is a copy of a page the backup holds.
        if let Some((q, 0)) = source {
            let same = match self.know[q as usize] {
                Know::Copy(s) if q != page => self.copies[s as usize].as_deref() == Some(data),
                _ => false,
            };
            if same {
                Self::header(page, kind::COPY_PAGE, out);
                put_varint(out, q);
                self.stats.copy_pages += 1;
                return Outcome::Sent;
            }
        }
        // No shared content and no zeroed block: the whole-page delta is the
        // best candidate when it fits; when it did not fit against known
        // bytes, no block list beats the whole page either.
        let zero_block = (0..nb).any(|b| self.changed[b] && is_zero(&data[b * bs..(b + 1) * bs]));
        if source.is_none() && !zero_block && old.is_some() {
            if let Some(n) = xor_len {
                Self::header(page, kind::XOR_PAGE, out);
                put_varint(out, n as u64);
                out.extend_from_slice(&self.tmp);
                self.stats.xor_pages += 1;
            } else {
                let (n, k) = self.whole_page(data);
                self.emit_whole(page, data, n, k, out);
            }
            return Outcome::Sent;
        }
        let mut plan = [Plan::Keep; PAGE_SIZE / 64];
        for b in 0..nb {
            if !self.changed[b] {
                continue;
            }
            if is_zero(&data[b * bs..(b + 1) * bs]) {
                plan[b] = Plan::Zero;
                continue;
            }
            plan[b] = Plan::Data;
            if let Some((q, delta)) = source {
                let qb = b as isize + delta;
                if (0..nb as isize).contains(&qb)
                    && self.backup_block_is(q, qb as usize, data, b, (page, copy))
                {
                    plan[b] = Plan::Ref(q, qb as usize);
                }
            }
        }
        // A block list, or the whole page, whichever is smaller.
        let mut rec = std::mem::take(&mut self.rec);
        rec.clear();
        let count = plan[..nb]
            .iter()
            .filter(|p| !matches!(p, Plan::Keep))
            .count();
        put_varint(&mut rec, count as u64);
        let mut refs = 0;
        for (b, pl) in plan[..nb].iter().enumerate() {
            let blk = &data[b * bs..(b + 1) * bs];
            match *pl {
                Plan::Keep => continue,
                Plan::Zero => {
                    put_varint(&mut rec, b as u64);
                    rec.push(kind::B_ZERO);
                }
                Plan::Ref(q, qb) => {
                    put_varint(&mut rec, b as u64);
                    rec.push(kind::B_REF);
                    put_varint(&mut rec, q);
                    put_varint(&mut rec, qb as u64);
                    refs += 1;
                }
                Plan::Data => {
                    put_varint(&mut rec, b as u64);
                    self.tmp.clear();
                    let xor = old.and_then(|o| {
                        xor_rle_encode(&o[b * bs..(b + 1) * bs], blk, &mut self.tmp, bs - 4)
                    });
                    match xor {
                        Some(n) => {
                            rec.push(kind::B_XOR);
                            put_varint(&mut rec, n as u64);
                            rec.extend_from_slice(&self.tmp);
                        }
                        None => {
                            rec.push(kind::B_RAW);
                            rec.extend_from_slice(blk);
                        }
                    }
                }
            }
            if rec.len() > PAGE_SIZE {
                break; // the whole page wins anyway
            }
        }
        let (n, k) = self.whole_page(data);
        let whole_len = if k == kind::LZ4_PAGE {
            n + 2
        } else {
            PAGE_SIZE
        };
        if rec.len() < whole_len {
            Self::header(page, kind::BLOCKS, out);
            out.extend_from_slice(&rec);
            self.stats.block_pages += 1;
            self.stats.ref_blocks += refs;
        } else {
            self.emit_whole(page, data, n, k, out);
        }
        self.rec = rec;
        Outcome::Sent
    }

    // ---- knowledge within the budget ----

    fn units_used(&self) -> usize {
        self.n_copies * self.copy_cost + self.n_digests
    }

    /// Drops whatever is held for page `p` (its state is set by the caller).
    fn forget(&mut self, p: usize) {
        match self.know[p] {
            Know::Copy(s) => {
                self.copies[s as usize] = None;
                self.copy_owner[s as usize] = NONE;
                self.copy_free.push(s);
                self.n_copies -= 1;
            }
            Know::Digest(s) => {
                self.digest_sets[s as usize] = None;
                self.digest_owner[s as usize] = NONE;
                self.digest_free.push(s);
                self.n_digests -= 1;
            }
            _ => {}
        }
        self.know[p] = Know::Unknown;
    }

    /// Records that the backup now holds `data` for `page`.
    fn store_copy(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        let p = page as usize;
        if let Know::Copy(s) = self.know[p] {
            self.copies[s as usize]
                .as_mut()
                .expect("copy slot")
                .copy_from_slice(data);
            self.copy_used[s as usize] = true;
            return;
        }
        self.forget(p);
        if self.copy_cap == 0 {
            self.store_digests(page, data);
            return;
        }
        // Make room: demote copies beyond the cap, then evict digests.
        while self.n_copies >= self.copy_cap
            || self.units_used() + self.copy_cost > self.budget_units
        {
            if self.n_copies > 0 && (self.n_copies >= self.copy_cap || self.n_digests == 0) {
                self.demote_one_copy();
            } else if self.n_digests > 0 {
                self.evict_random_digests();
            } else {
                self.store_digests(page, data);
                return;
            }
        }
        let slot = match self.copy_free.pop() {
            Some(s) => s as usize,
            None => {
                self.copies.push(None);
                self.copy_owner.push(NONE);
                self.copy_used.push(false);
                self.copies.len() - 1
            }
        };
        self.copies[slot] = Some(Box::new(*data));
        self.copy_owner[slot] = page;
        self.copy_used[slot] = true;
        self.n_copies += 1;
        self.know[p] = Know::Copy(slot as u32);
    }

    /// CLOCK: the first copy not used since the hand last passed, to digests.
    fn demote_one_copy(&mut self) {
        let slots = self.copies.len();
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % slots;
            if self.copy_owner[s] == NONE {
                continue;
            }
            if self.copy_used[s] {
                self.copy_used[s] = false;
                continue;
            }
            let victim = self.copy_owner[s];
            let data = self.copies[s].take().expect("owned slot holds a copy");
            self.demotions += 1;
            self.forget(victim as usize);
            self.store_digests(victim, &data);
            return;
        }
    }

    /// Evicts a random digest set. Random replacement, unlike FIFO or LRU,
    /// keeps a share of hits when a cyclic working set exceeds the budget.
    fn evict_random_digests(&mut self) {
        let n = self.digest_sets.len() as u64;
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let s = (self.rng % n) as usize;
            let owner = self.digest_owner[s];
            if owner != NONE {
                self.forget(owner as usize);
                return;
            }
        }
    }

    fn store_digests(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        while self.units_used() + 1 > self.budget_units {
            if self.n_digests == 0 {
                self.know[page as usize] = Know::Unknown;
                return;
            }
            self.evict_random_digests();
        }
        let mut set: Box<[u128]> = vec![0; self.nb].into_boxed_slice();
        self.digester.page(data, self.bs, &mut set);
        let slot = match self.digest_free.pop() {
            Some(s) => s as usize,
            None => {
                self.digest_sets.push(None);
                self.digest_owner.push(NONE);
                self.digest_born.push(0);
                self.digest_sets.len() - 1
            }
        };
        self.digest_born[slot] = self.demotions;
        self.digest_sets[slot] = Some(set);
        self.digest_owner[slot] = page;
        self.n_digests += 1;
        self.know[page as usize] = Know::Digest(slot as u32);
    }
}

/// Whether block `blk` (at `off` in the page) was rewritten — at least 7 of
/// every 8 of its words differ from the old content, as when content moves —
/// rather than edited in a few places; true where the old content is not known.
fn mostly_changed(old: Option<&[u8; PAGE_SIZE]>, blk: &[u8], off: usize) -> bool {
    let Some(o) = old else { return true };
    let ob = &o[off..off + blk.len()];
    let diff = ob
        .chunks_exact(8)
        .zip(blk.chunks_exact(8))
        .filter(|(x, y)| x != y)
        .count();
    diff * 8 >= blk.len() / 8 * 7
}

/// The page being encoded and its old copy, if held.
type Cur<'a> = (u64, Option<&'a [u8; PAGE_SIZE]>);

enum Outcome {
    Unchanged,
    Zero,
    Sent,
}
