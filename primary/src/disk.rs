//! The guest's disk in a checkpoint: the blocks written in the epoch, and
//! for a session's first checkpoint the blocks that differ from the
//! backup's disk.
//!
//! While a session lasts, the disk device keeps the content of every block
//! the guest writes (`vmm::virtio_blk::BlockDevice::record`, turned on with
//! the guest paused, so no request is half done at that instant). At each
//! pause the epoch's blocks are taken (a swap) with the disk's digest sum;
//! after the resume they are encoded into the checkpoint.
//!
//! **The first checkpoint over the backup's disk.** The backup offers a
//! digest of each of its blocks; while the guest runs, the primary compares
//! them with its own (kept up to date by the device on every write) and
//! reads the blocks that differ ([`Diff::read`]). At the pause, the blocks
//! written since recording began replace those reads. That is exact: a
//! block written after its read, or after the comparison, was written after
//! recording began, so its content at the pause is in the epoch's writes; a
//! block written in neither window has the content read, or the content the
//! backup already has (equal digests). When checkpoint 1 commits, the
//! backup's disk is the primary's at that pause, and both sides check it by
//! the digest sum (`protocol::disk::DiskCommit`).

use std::collections::BTreeMap;
use std::ops::Range;

use protocol::disk::{encode_block, DiskCommit, BLOCK};
use vmm::disk::Disk;
use vmm::virtio_blk::DiskWrites;

/// Most bytes of written blocks the device keeps for one epoch; past it the
/// guest's disk writes wait for the next checkpoint.
pub const MAX_EPOCH_DISK_BYTES: u64 = 256 << 20;

/// The blocks of the primary's disk that differ from the backup's offer,
/// read while the guest ran, encoded.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    records: Vec<u8>,
    at: Vec<(u64, Range<usize>)>,
    /// Blocks compared.
    pub compared: u64,
}

impl Diff {
    /// Every block whose digest differs from `offer` (`None`: the backup
    /// offered nothing; every block), read now.
    pub fn read(disk: &Disk, offer: Option<&[u64]>) -> std::io::Result<Diff> {
        let mine = disk.digests();
        let mut d = Diff {
            compared: mine.len() as u64,
            ..Diff::default()
        };
        let mut buf = [0u8; BLOCK];
        for (b, &m) in mine.iter().enumerate() {
            let b = b as u64;
            if offer.is_some_and(|o| o.get(b as usize) == Some(&m)) {
                continue;
            }
            disk.read_block(b, &mut buf)?;
            let start = d.records.len();
            encode_block(b, &buf, &mut d.records);
            d.at.push((b, start..d.records.len()));
        }
        Ok(d)
    }

    /// Blocks that differ.
    pub fn blocks(&self) -> u64 {
        self.at.len() as u64
    }
}

/// One epoch's disk part, taken in the pause.
pub(crate) struct Taken {
    pub writes: DiskWrites,
    pub sum: u64,
}

/// The epoch's disk records: `diff` (a session's first checkpoint) merged
/// with the epoch's writes, which win, in ascending block order. Returns
/// the records, the commit's disk part and the blocks they carry.
pub(crate) fn encode(taken: Taken, diff: Option<Diff>) -> (Vec<u8>, DiskCommit, u64) {
    let Taken { writes, sum } = taken;
    let commit = DiskCommit {
        sum,
        flushed: writes.flushed,
    };
    let blocks: BTreeMap<u64, Box<[u8; BLOCK]>> = writes.blocks;
    let mut out = Vec::with_capacity(blocks.len() * 64);
    let mut n = 0u64;
    match diff {
        None => {
            for (b, data) in &blocks {
                encode_block(*b, data, &mut out);
                n += 1;
            }
        }
        Some(d) => {
            let mut w = blocks.iter().peekable();
            for (b, range) in &d.at {
                while let Some((&wb, data)) = w.next_if(|(&wb, _)| wb < *b) {
                    encode_block(wb, data, &mut out);
                    n += 1;
                }
                if let Some((&wb, data)) = w.next_if(|(&wb, _)| wb == *b) {
                    encode_block(wb, data, &mut out);
                } else {
                    out.extend_from_slice(&d.records[range.clone()]);
                }
                n += 1;
            }
            for (&wb, data) in w {
                encode_block(wb, data, &mut out);
                n += 1;
            }
        }
    }
    (out, commit, n)
}
