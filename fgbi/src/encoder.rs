//! The primary side: what the backup holds, and the smallest record for
//! each dirty page.

use std::collections::HashMap;

use crate::codec::{is_zero, put_varint, xor_rle_encode};
use crate::{kind, Config, ConfigError, Mode, PAGE_SIZE};

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
const NONE: u64 = u64::MAX;

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
    nblocks: usize,
    know: Vec<Know>,
    copies: Vec<u8>,
    copy_owner: Vec<u64>,
    copy_used: Vec<bool>,
    hand: usize,
    digests: Vec<u128>,
    digest_owner: Vec<u64>,
    dhand: usize,
    share: HashMap<u128, (u64, u16)>,
    share_cap: usize,
    stats: EncodeStats,
    // scratch
    page_digests: Vec<u128>,
    changed: Vec<bool>,
    tmp: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("mode", &self.cfg.mode)
            .field("block_size", &self.bs)
            .field("copy_slots", &self.copy_owner.len())
            .field("digest_slots", &self.digest_owner.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for a replica of `pages` pages, all zero at the start.
    pub fn new(cfg: Config, pages: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let bs = cfg.block_size;
        let nblocks = PAGE_SIZE / bs;
        let budget = cfg.budget_bytes;
        let (copy_slots, digest_slots, share_cap) = match cfg.mode {
            Mode::Remus => (0, 0, 0),
            Mode::Xbzrle => ((budget / PAGE_SIZE as u64) as usize, 0, 0),
            // Three quarters for copies, a fifth for digests (a page's digests
            // cost a quarter of a copy at 64 B blocks), the rest for sharing.
            Mode::Fgbi => (
                (budget * 3 / 4 / PAGE_SIZE as u64) as usize,
                (budget / 5 / (16 * nblocks as u64)) as usize,
                (budget / 20 / 48) as usize,
            ),
        };
        let copy_slots = copy_slots.min(pages as usize);
        let digest_slots = digest_slots.min(pages as usize);
        Ok(Encoder {
            bs,
            nblocks,
            know: vec![Know::Zero; pages as usize],
            copies: vec![0; copy_slots * PAGE_SIZE],
            copy_owner: vec![NONE; copy_slots],
            copy_used: vec![false; copy_slots],
            hand: 0,
            digests: vec![0; digest_slots * nblocks],
            digest_owner: vec![NONE; digest_slots],
            dhand: 0,
            share: HashMap::new(),
            share_cap,
            stats: EncodeStats::default(),
            page_digests: vec![0; nblocks],
            changed: vec![false; nblocks],
            tmp: Vec::with_capacity(2 * PAGE_SIZE),
            cfg,
        })
    }

    /// Totals so far.
    pub fn stats(&self) -> EncodeStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes of memory the encoder's knowledge takes (copies, digests, index).
    pub fn memory_bytes(&self) -> u64 {
        (self.copies.len() + self.digests.len() * 16 + self.share.capacity() * 48 + self.know.len() * 8) as u64
    }

    /// Appends the record(s) describing `data`, the current content of
    /// `page`, to `out`. Nothing is appended if the backup already holds it.
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

    /// XOR page if it beats `limit` bytes of payload; returns whether emitted.
    fn try_xor_page(&mut self, page: u64, old: &[u8], data: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
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

    /// lz4 if smaller than raw, else raw.
    fn emit_whole(&mut self, page: u64, data: &[u8], out: &mut Vec<u8>) {
        let mut buf = std::mem::take(&mut self.tmp);
        buf.clear();
        buf.resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
        let n = lz4_flex::block::compress_into(data, &mut buf).unwrap_or(usize::MAX);
        if n + 3 < PAGE_SIZE {
            Self::header(page, kind::LZ4_PAGE, out);
            put_varint(out, n as u64);
            out.extend_from_slice(&buf[..n]);
            self.stats.lz4_pages += 1;
        } else {
            self.emit_raw(page, data, out);
        }
        self.tmp = buf;
    }

    // ---- xbzrle: QEMU's scheme, direct-mapped cache ----

    fn encode_xbzrle(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        if is_zero(data) {
            if self.know[page as usize] != Know::Zero {
                self.emit_zero(page, out);
            }
            self.drop_copy(page);
            self.know[page as usize] = Know::Zero;
            return;
        }
        let slots = self.copy_owner.len();
        if slots == 0 {
            self.emit_raw(page, data, out);
            self.know[page as usize] = Know::Unknown;
            return;
        }
        let slot = (page % slots as u64) as usize;
        let hit = self.copy_owner[slot] == page;
        let sent = hit && {
            let old = self.copies[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].to_vec();
            old[..] == data[..] || self.try_xor_page(page, &old, data, PAGE_SIZE - 8, out)
        };
        if !sent {
            self.emit_raw(page, data, out);
        }
        if !hit && self.copy_owner[slot] != NONE {
            let prev = self.copy_owner[slot];
            self.know[prev as usize] = Know::Unknown;
        }
        self.copy_owner[slot] = page;
        self.copies[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(data);
        self.know[page as usize] = Know::Copy(slot as u32);
    }

    fn drop_copy(&mut self, page: u64) {
        match self.know[page as usize] {
            Know::Copy(s) => self.copy_owner[s as usize] = NONE,
            Know::Digest(s) => self.digest_owner[s as usize] = NONE,
            _ => {}
        }
    }

    // ---- fgbi ----

    fn digest(&self, block: &[u8]) -> u128 {
        let h = blake3::keyed_hash(&self.cfg.key, block);
        u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
    }

    /// Whether the backup's block (`page`, `b`) holds content with digest `d`
    /// equal to `content`, per the encoder's knowledge before this record.
    fn backup_block_is(&self, page: u64, b: usize, d: u128, content: &[u8]) -> bool {
        let bs = self.bs;
        match self.know.get(page as usize) {
            Some(Know::Copy(s)) => {
                let o = *s as usize * PAGE_SIZE + b * bs;
                self.copies[o..o + bs] == *content
            }
            Some(Know::Digest(s)) => self.digests[*s as usize * self.nblocks + b] == d,
            _ => false,
        }
    }

    fn lookup_share(&mut self, d: u128, content: &[u8]) -> Option<(u64, usize)> {
        let &(p, b) = self.share.get(&d)?;
        if self.backup_block_is(p, b as usize, d, content) {
            Some((p, b as usize))
        } else {
            self.share.remove(&d);
            None
        }
    }

    fn remember_share(&mut self, d: u128, page: u64, b: usize) {
        if self.share_cap == 0 {
            return;
        }
        if self.share.len() >= self.share_cap {
            self.share.clear();
        }
        self.share.insert(d, (page, b as u16));
    }

    fn encode_fgbi(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        let bs = self.bs;
        let nb = self.nblocks;
        let know = self.know[page as usize];
        let old: Option<Vec<u8>> = match know {
            Know::Zero => None,
            Know::Copy(s) => {
                let o = s as usize * PAGE_SIZE;
                self.copy_used[s as usize] = true;
                if self.copies[o..o + PAGE_SIZE] == data[..] {
                    return;
                }
                Some(self.copies[o..o + PAGE_SIZE].to_vec())
            }
            _ => None,
        };
        if is_zero(data) {
            if know != Know::Zero {
                self.emit_zero(page, out);
                self.drop_copy(page);
                self.know[page as usize] = Know::Zero;
            }
            return;
        }
        let old_bytes: Option<&[u8]> = match know {
            Know::Zero => Some(&ZERO_PAGE),
            Know::Copy(_) => old.as_deref(),
            _ => None,
        };
        // Which blocks changed, and digests where they are needed.
        let mut digests_known = vec![false; nb];
        match (old_bytes, know) {
            (Some(o), _) => {
                for b in 0..nb {
                    self.changed[b] = o[b * bs..(b + 1) * bs] != data[b * bs..(b + 1) * bs];
                }
            }
            (None, Know::Digest(s)) => {
                for b in 0..nb {
                    let d = self.digest(&data[b * bs..(b + 1) * bs]);
                    self.page_digests[b] = d;
                    digests_known[b] = true;
                    self.changed[b] = d != self.digests[s as usize * nb + b];
                }
            }
            _ => {
                for b in 0..nb {
                    self.page_digests[b] = self.digest(&data[b * bs..(b + 1) * bs]);
                    digests_known[b] = true;
                    self.changed[b] = true;
                }
            }
        }
        if !self.changed.iter().any(|&c| c) {
            self.store_copy(page, data);
            return;
        }
        // Per changed block: zero, reference, or (later) XOR/raw.
        #[derive(Clone, Copy)]
        enum B {
            Keep,
            Zero,
            Ref(u64, usize),
            Data,
        }
        let mut plan = vec![B::Keep; nb];
        let mut special = 0;
        for b in 0..nb {
            if !self.changed[b] {
                continue;
            }
            let blk = &data[b * bs..(b + 1) * bs];
            if is_zero(blk) {
                plan[b] = B::Zero;
                special += 1;
                continue;
            }
            // Sharing targets moved or duplicated content: a block most of whose
            // words changed. A few changed words are cheaper as a delta.
            let worth = match old_bytes {
                Some(o) => {
                    let ob = &o[b * bs..(b + 1) * bs];
                    let diff = ob.chunks_exact(8).zip(blk.chunks_exact(8)).filter(|(x, y)| x != y).count();
                    diff * 2 >= bs / 8
                }
                None => true,
            };
            plan[b] = B::Data;
            if worth {
                if !digests_known[b] {
                    self.page_digests[b] = self.digest(blk);
                    digests_known[b] = true;
                }
                if let Some((sp, sb)) = self.lookup_share(self.page_digests[b], blk) {
                    plan[b] = B::Ref(sp, sb);
                    special += 1;
                }
            }
        }
        let before = out.len();
        let mut done = false;
        if let (Some(o), 0) = (old_bytes, special) {
            // No zero or shared blocks: a whole-page delta is the best candidate.
            done = self.try_xor_page(page, o, data, PAGE_SIZE - 8, out);
        }
        if !done {
            // A block list, compared with the whole page (lz4 or raw).
            let mut rec = Vec::with_capacity(PAGE_SIZE + 64);
            let count = plan.iter().filter(|p| !matches!(p, B::Keep)).count();
            put_varint(&mut rec, count as u64);
            let mut refs = 0;
            for (b, p) in plan.iter().enumerate() {
                let blk = &data[b * bs..(b + 1) * bs];
                match *p {
                    B::Keep => continue,
                    B::Zero => {
                        put_varint(&mut rec, b as u64);
                        rec.push(kind::B_ZERO);
                    }
                    B::Ref(sp, sb) => {
                        put_varint(&mut rec, b as u64);
                        rec.push(kind::B_REF);
                        put_varint(&mut rec, sp);
                        put_varint(&mut rec, sb as u64);
                        refs += 1;
                    }
                    B::Data => {
                        put_varint(&mut rec, b as u64);
                        let mut x = Vec::new();
                        let xor = old_bytes.and_then(|o| xor_rle_encode(&o[b * bs..(b + 1) * bs], blk, &mut x, bs - 4));
                        match xor {
                            Some(n) => {
                                rec.push(kind::B_XOR);
                                put_varint(&mut rec, n as u64);
                                rec.extend_from_slice(&x);
                            }
                            None => {
                                rec.push(kind::B_RAW);
                                rec.extend_from_slice(blk);
                            }
                        }
                    }
                }
            }
            let mut whole = Vec::new();
            self.emit_whole(page, data, &mut whole);
            if rec.len() + 2 < whole.len() {
                // emit_whole counted a page it did not send
                self.uncount_whole(&whole, page);
                Self::header(page, kind::BLOCKS, out);
                out.extend_from_slice(&rec);
                self.stats.block_pages += 1;
                self.stats.ref_blocks += refs;
            } else {
                out.extend_from_slice(&whole);
            }
        }
        debug_assert!(out.len() > before);
        for b in 0..nb {
            if self.changed[b] && digests_known[b] {
                let d = self.page_digests[b];
                self.remember_share(d, page, b);
            }
        }
        self.store_copy(page, data);
    }

    fn uncount_whole(&mut self, whole: &[u8], page: u64) {
        let mut h = Vec::new();
        put_varint(&mut h, page);
        if whole.get(h.len()) == Some(&kind::LZ4_PAGE) {
            self.stats.lz4_pages -= 1;
        } else {
            self.stats.raw_pages -= 1;
        }
    }

    /// Records that the backup now holds `data` for `page`: a copy in the
    /// CLOCK cache, evicting another page's copy down to digests.
    fn store_copy(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        if let Know::Copy(s) = self.know[page as usize] {
            let o = s as usize * PAGE_SIZE;
            self.copies[o..o + PAGE_SIZE].copy_from_slice(data);
            self.copy_used[s as usize] = true;
            return;
        }
        if let Know::Digest(s) = self.know[page as usize] {
            self.digest_owner[s as usize] = NONE;
        }
        let slots = self.copy_owner.len();
        if slots == 0 {
            self.store_digests_of(page, data);
            return;
        }
        // CLOCK: skip recently used slots once.
        let slot = loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % slots;
            if self.copy_owner[s] == NONE || !self.copy_used[s] {
                break s;
            }
            self.copy_used[s] = false;
        };
        let victim = self.copy_owner[slot];
        if victim != NONE {
            let o = slot * PAGE_SIZE;
            let vdata: [u8; PAGE_SIZE] = self.copies[o..o + PAGE_SIZE].try_into().expect("page");
            self.know[victim as usize] = Know::Unknown;
            self.store_digests_of(victim, &vdata);
        }
        let o = slot * PAGE_SIZE;
        self.copies[o..o + PAGE_SIZE].copy_from_slice(data);
        self.copy_owner[slot] = page;
        self.copy_used[slot] = true;
        self.know[page as usize] = Know::Copy(slot as u32);
    }

    fn store_digests_of(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        let slots = self.digest_owner.len();
        if slots == 0 {
            self.know[page as usize] = Know::Unknown;
            return;
        }
        let slot = self.dhand;
        self.dhand = (self.dhand + 1) % slots;
        let victim = self.digest_owner[slot];
        if victim != NONE {
            self.know[victim as usize] = Know::Unknown;
        }
        let nb = self.nblocks;
        for b in 0..nb {
            self.digests[slot * nb + b] = self.digest(&data[b * self.bs..(b + 1) * self.bs]);
        }
        self.digest_owner[slot] = page;
        self.know[page as usize] = Know::Digest(slot as u32);
    }
}
