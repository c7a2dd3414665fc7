//! The backup side: applying an epoch's records to the replica.
//!
//! Two passes over the same parser: the first only validates (every length,
//! index, run and lz4 block is checked against the replica), the second writes.
//! So a malformed or hostile epoch is refused with the replica untouched. The
//! lz4 pages the first pass decodes are kept (up to [`LZ4_STASH_PAGES`]) so the
//! second pass copies them instead of decoding again; beyond that it decodes
//! again, so staging memory stays bounded whatever the epoch holds.

use crate::codec::{get_varint, xor_rle_check, xor_rle_decode};
use crate::{check_block_size, kind, ApplyError, PAGE_SIZE};

/// Most decoded lz4 pages kept between the two passes (16 MiB).
pub const LZ4_STASH_PAGES: usize = 4096;

/// What an applied epoch contained.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    /// Records (pages changed).
    pub records: u64,
    /// The pages the records wrote, in record order.
    pub pages: Vec<u64>,
    /// Blocks sent as references to other blocks.
    pub ref_blocks: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<u64, ApplyError> {
        get_varint(self.buf, &mut self.pos)
    }
    fn byte(&mut self, what: &'static str) -> Result<u8, ApplyError> {
        let b = *self.buf.get(self.pos).ok_or(ApplyError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }
    fn bytes(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], ApplyError> {
        let n = usize::try_from(n).map_err(|_| ApplyError::Truncated(what))?;
        let end = self.pos.checked_add(n).ok_or(ApplyError::Truncated(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(ApplyError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }
    fn sized(&mut self, max: u64, what: &'static str) -> Result<&'a [u8], ApplyError> {
        let n = self.varint()?;
        if n > max {
            return Err(ApplyError::Malformed("length exceeds its limit"));
        }
        self.bytes(n, what)
    }
}

/// Applies the records of one epoch to `replica` (the backup's copy of guest
/// RAM, a whole number of 4 KiB pages). On error the replica is unchanged.
pub fn apply(
    replica: &mut [u8],
    block_size: usize,
    epoch: &[u8],
) -> Result<ApplyStats, ApplyError> {
    check_block_size(block_size)?;
    if !replica.len().is_multiple_of(PAGE_SIZE) {
        return Err(ApplyError::ReplicaSize(replica.len()));
    }
    let mut scratch = Box::new([0u8; PAGE_SIZE]);
    let mut stash = Vec::new();
    run(replica, block_size, epoch, false, &mut scratch, &mut stash)?;
    run(replica, block_size, epoch, true, &mut scratch, &mut stash)
}

fn run(
    replica: &mut [u8],
    bs: usize,
    epoch: &[u8],
    write: bool,
    old: &mut [u8; PAGE_SIZE],
    stash: &mut Vec<Box<[u8; PAGE_SIZE]>>,
) -> Result<ApplyStats, ApplyError> {
    let mut lz4_seen = 0usize;
    let pages = (replica.len() / PAGE_SIZE) as u64;
    let nblocks = (PAGE_SIZE / bs) as u64;
    let mut c = Cursor { buf: epoch, pos: 0 };
    let mut stats = ApplyStats::default();
    let mut lz4_out = [0u8; PAGE_SIZE];
    while c.pos < epoch.len() {
        let page = c.varint()?;
        if page >= pages {
            return Err(ApplyError::PageOutOfRange { page, pages });
        }
        let at = page as usize * PAGE_SIZE;
        let k = c.byte("record kind")?;
        match k {
            kind::ZERO_PAGE => {
                if write {
                    replica[at..at + PAGE_SIZE].fill(0);
                }
            }
            kind::RAW_PAGE => {
                let data = c.bytes(PAGE_SIZE as u64, "raw page")?;
                if write {
                    replica[at..at + PAGE_SIZE].copy_from_slice(data);
                }
            }
            kind::LZ4_PAGE => {
                let data = c.sized(2 * PAGE_SIZE as u64, "lz4 page")?;
                let i = lz4_seen;
                lz4_seen += 1;
                if write && i < stash.len() {
                    replica[at..at + PAGE_SIZE].copy_from_slice(&stash[i][..]);
                } else {
                    let target: &mut [u8] = if write {
                        &mut replica[at..at + PAGE_SIZE]
                    } else {
                        &mut lz4_out
                    };
                    let n = lz4_flex::block::decompress_into(data, target)
                        .map_err(|_| ApplyError::Malformed("lz4 page does not decode"))?;
                    if n != PAGE_SIZE {
                        return Err(ApplyError::Malformed(
                            "lz4 page does not decode to 4096 bytes",
                        ));
                    }
                    if !write && stash.len() < LZ4_STASH_PAGES {
                        stash.push(Box::new(lz4_out));
                    }
                }
            }
            kind::XOR_PAGE => {
                let data = c.sized(2 * PAGE_SIZE as u64, "XOR page")?;
                if write {
                    xor_rle_decode(data, &mut replica[at..at + PAGE_SIZE])?;
                } else {
                    // Validate the runs only.
                    xor_rle_check(data, PAGE_SIZE)?;
                }
            }
            kind::COPY_PAGE => {
                let src = c.varint()?;
                if src >= pages {
                    return Err(ApplyError::PageOutOfRange { page: src, pages });
                }
                if write && src != page {
                    let so = src as usize * PAGE_SIZE;
                    replica.copy_within(so..so + PAGE_SIZE, at);
                }
            }
            kind::BLOCKS => {
                let count = c.varint()?;
                if count == 0 || count > nblocks {
                    return Err(ApplyError::Malformed(
                        "block count is zero or exceeds the blocks in a page",
                    ));
                }
                if write {
                    old.copy_from_slice(&replica[at..at + PAGE_SIZE]);
                }
                let mut next = 0u64;
                for _ in 0..count {
                    let b = c.varint()?;
                    if b >= nblocks {
                        return Err(ApplyError::BlockOutOfRange {
                            block: b,
                            blocks: nblocks,
                        });
                    }
                    if b < next {
                        return Err(ApplyError::Malformed(
                            "block indices not strictly increasing",
                        ));
                    }
                    next = b + 1;
                    let off = at + b as usize * bs;
                    match c.byte("block kind")? {
                        kind::B_ZERO => {
                            if write {
                                replica[off..off + bs].fill(0);
                            }
                        }
                        kind::B_RAW => {
                            let data = c.bytes(bs as u64, "raw block")?;
                            if write {
                                replica[off..off + bs].copy_from_slice(data);
                            }
                        }
                        kind::B_REF => {
                            let sp = c.varint()?;
                            let sb = c.varint()?;
                            if sp >= pages {
                                return Err(ApplyError::PageOutOfRange { page: sp, pages });
                            }
                            if sb >= nblocks {
                                return Err(ApplyError::BlockOutOfRange {
                                    block: sb,
                                    blocks: nblocks,
                                });
                            }
                            stats.ref_blocks += 1;
                            if write {
                                let so = sb as usize * bs;
                                if sp == page {
                                    replica[off..off + bs].copy_from_slice(&old[so..so + bs]);
                                } else {
                                    let src = sp as usize * PAGE_SIZE + so;
                                    replica.copy_within(src..src + bs, off);
                                }
                            }
                        }
                        kind::B_XOR => {
                            let data = c.sized(2 * bs as u64, "XOR block")?;
                            if write {
                                xor_rle_decode(data, &mut replica[off..off + bs])?;
                            } else {
                                xor_rle_check(data, bs)?;
                            }
                        }
                        other => {
                            return Err(ApplyError::UnknownKind {
                                what: "block",
                                kind: other,
                            })
                        }
                    }
                }
            }
            other => {
                return Err(ApplyError::UnknownKind {
                    what: "record",
                    kind: other,
                })
            }
        }
        stats.records += 1;
        if write {
            stats.pages.push(page);
        }
    }
    Ok(stats)
}
