//! A checkpoint's disk blocks, sans I/O: the blocks the guest wrote in an
//! epoch travel in [`crate::Message::Disk`] chunks, each a run of records
//!
//! ```text
//!   u64 block | u8 kind | payload
//!     kind 0: a block of zeros (no payload)
//!     kind 1: raw, 4096 bytes
//!     kind 2: lz4, u32 length | that many bytes, decoding to 4096 bytes
//! ```
//!
//! Block numbers are strictly ascending across the epoch's chunks and below
//! the disk's size in blocks, so an epoch names each block at most once and
//! its decoded size is bounded by the disk's. The backup parses the whole
//! epoch ([`parse`]) before it writes anything: a malformed epoch is refused
//! and the disk is untouched. Nothing here touches a file.
//!
//! After every commit the backup's disk must equal the primary's disk at
//! that checkpoint's pause; [`DiskCommit::sum`] is the primary's wrapping
//! sum of the xxh3-64 digest of every block (seeded with its number) then,
//! which the backup compares with its own after applying.

use crate::WireError;

/// Bytes in a block: the unit of replication and of digests.
pub const BLOCK: usize = 4096;

const ZERO: u8 = 0;
const RAW: u8 = 1;
const LZ4: u8 = 2;

/// The disk part of a commit (present exactly when the hello has a disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCommit {
    /// Wrapping sum of every block's digest on the primary at the pause.
    pub sum: u64,
    /// The guest completed a FLUSH in this epoch: the backup makes the
    /// epoch's blocks durable (fdatasync) before it acks.
    pub flushed: bool,
}

/// Appends one block's record to `out`: the smallest of zero, lz4 and raw.
pub fn encode_block(block: u64, data: &[u8; BLOCK], out: &mut Vec<u8>) {
    out.extend_from_slice(&block.to_le_bytes());
    if data.iter().all(|&b| b == 0) {
        out.push(ZERO);
        return;
    }
    let packed = lz4_flex::block::compress(data);
    if packed.len() + 4 < BLOCK {
        out.push(LZ4);
        out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        out.extend_from_slice(&packed);
    } else {
        out.push(RAW);
        out.extend_from_slice(data);
    }
}

/// One block of a parsed epoch; its bytes stay in the staged buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The block's number.
    pub block: u64,
    kind: u8,
    payload: &'a [u8],
}

impl Entry<'_> {
    /// The block's content.
    pub fn content(&self, out: &mut [u8; BLOCK]) {
        match self.kind {
            ZERO => out.fill(0),
            RAW => out.copy_from_slice(self.payload),
            _ => {
                // Checked by `parse`: decodes to exactly one block.
                let n = lz4_flex::block::decompress_into(self.payload, out).unwrap_or(0);
                debug_assert_eq!(n, BLOCK);
            }
        }
    }
}

/// Why an epoch's disk records were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    /// The records do not decode.
    #[error("disk records: {0}")]
    Wire(#[from] WireError),
    /// A block beyond the disk.
    #[error("disk record for block {block}, beyond the disk's {blocks} blocks")]
    OutOfRange {
        /// The block named.
        block: u64,
        /// The disk's size in blocks.
        blocks: u64,
    },
    /// Blocks not strictly ascending.
    #[error(
        "disk record for block {block} after block {after}: blocks must be strictly ascending"
    )]
    NotAscending {
        /// The block named.
        block: u64,
        /// The one before it.
        after: u64,
    },
    /// An lz4 payload that does not decode to one block.
    #[error("disk record for block {0}: its lz4 payload does not decode to 4096 bytes")]
    BadLz4(u64),
}

/// Parses and validates an epoch's disk records (the concatenation of its
/// chunks) for a disk of `blocks` blocks, before anything is written.
pub fn parse(data: &[u8], blocks: u64) -> Result<Vec<Entry<'_>>, DiskError> {
    let mut out = Vec::new();
    let mut r = crate::codec::Reader::new(data);
    let mut last: Option<u64> = None;
    let mut scratch = [0u8; BLOCK];
    while !r.is_empty() {
        let block = r.u64("Disk.block")?;
        if block >= blocks {
            return Err(DiskError::OutOfRange { block, blocks });
        }
        if let Some(after) = last.filter(|&l| l >= block) {
            return Err(DiskError::NotAscending { block, after });
        }
        last = Some(block);
        let kind = r.u8("Disk.kind")?;
        let payload = match kind {
            ZERO => &[][..],
            RAW => r.raw(BLOCK, "Disk.raw")?,
            LZ4 => {
                let n = r.u32("Disk.lz4_len")? as usize;
                if n >= BLOCK {
                    return Err(WireError::TooLong {
                        field: "Disk.lz4",
                        len: n as u64,
                        max: BLOCK as u64 - 1,
                    }
                    .into());
                }
                let p = r.raw(n, "Disk.lz4")?;
                match lz4_flex::block::decompress_into(p, &mut scratch) {
                    Ok(BLOCK) => p,
                    _ => return Err(DiskError::BadLz4(block)),
                }
            }
            v => {
                return Err(WireError::BadValue {
                    field: "Disk.kind",
                    value: v as u64,
                }
                .into())
            }
        };
        out.push(Entry {
            block,
            kind,
            payload,
        });
    }
    Ok(out)
}

/// Where to cut `records` (whole records, as [`encode_block`] writes them)
/// for a chunk of about `target` bytes: the end of the first record that
/// ends at or past `target`, or the end.
pub fn chunk_end(records: &[u8], target: usize) -> usize {
    let mut at = 0;
    while at < records.len() && at < target {
        let kind = records.get(at + 8).copied().unwrap_or(RAW);
        at += 9 + match kind {
            ZERO => 0,
            LZ4 => {
                let n = records
                    .get(at + 9..at + 13)
                    .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4")) as usize);
                4 + n
            }
            _ => BLOCK,
        };
    }
    at.min(records.len())
}

/// Most bytes one block's record takes (a raw block with its header).
pub const MAX_RECORD: usize = BLOCK + 9;

/// Most bytes an epoch's disk records take for a disk of `disk_bytes`:
/// every block once, raw.
pub fn staging_bound(disk_bytes: u64) -> usize {
    usize::try_from(disk_bytes.div_ceil(BLOCK as u64))
        .unwrap_or(usize::MAX)
        .saturating_mul(MAX_RECORD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: impl Fn(usize) -> u8) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        for (i, x) in b.iter_mut().enumerate() {
            *x = fill(i);
        }
        b
    }

    #[test]
    fn blocks_round_trip_in_each_kind() {
        let zero = [0u8; BLOCK];
        let text = block(|i| if i < 100 { b'a' + (i % 26) as u8 } else { 0 });
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut noise = [0u8; BLOCK];
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut data = Vec::new();
        encode_block(3, &zero, &mut data);
        encode_block(7, &text, &mut data);
        encode_block(9, &noise, &mut data);
        let entries = parse(&data, 10).unwrap();
        let kinds: Vec<u8> = entries.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![ZERO, LZ4, RAW]);
        let mut out = [1u8; BLOCK];
        for (e, want) in entries.iter().zip([&zero, &text, &noise]) {
            e.content(&mut out);
            assert_eq!(&out, want, "block {}", e.block);
        }
        assert!(data.len() < 9 + 1000 + MAX_RECORD, "{} bytes", data.len());
    }

    #[test]
    fn hostile_records_are_refused_with_the_reason() {
        let b = block(|i| i as u8);
        let mut two = Vec::new();
        encode_block(5, &b, &mut two);
        encode_block(5, &b, &mut two);
        assert_eq!(
            parse(&two, 10),
            Err(DiskError::NotAscending { block: 5, after: 5 })
        );
        let mut far = Vec::new();
        encode_block(10, &b, &mut far);
        assert_eq!(
            parse(&far, 10),
            Err(DiskError::OutOfRange {
                block: 10,
                blocks: 10
            })
        );
        let mut cut = Vec::new();
        encode_block(1, &b, &mut cut);
        cut.truncate(cut.len() - 1);
        assert!(matches!(parse(&cut, 10), Err(DiskError::Wire(_))));
        let mut kind = 1u64.to_le_bytes().to_vec();
        kind.push(9);
        assert!(matches!(
            parse(&kind, 10),
            Err(DiskError::Wire(WireError::BadValue { .. }))
        ));
        // An lz4 payload that decodes to less than a block.
        let mut short = 1u64.to_le_bytes().to_vec();
        short.push(LZ4);
        let p = lz4_flex::block::compress(&[7u8; 100]);
        short.extend_from_slice(&(p.len() as u32).to_le_bytes());
        short.extend_from_slice(&p);
        assert_eq!(parse(&short, 10), Err(DiskError::BadLz4(1)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 4) as u8
                })
                .collect();
            let _ = parse(&data, 1 << 20);
        }
    }
}
