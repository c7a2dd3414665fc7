//! fgbi: what goes on the wire each epoch, and how the backup applies it.
//!
//! A pure library (no I/O, no threads). The primary's [`Encoder`] turns the
//! pages dirtied in an epoch into a small, exact description of the
//! change relative to what the backup holds; the backup's [`apply`] makes its
//! replica bit-identical to the primary's memory at that checkpoint.
//!
//! # Ideas (from FGBI, XBZRLE and Remus)
//! - **Fine-grained block identification**: a dirty page is split into
//!   blocks (64 B by default, 64–1024); only blocks whose content changed are
//!   sent. Changed blocks are found by comparing with the previous copy where
//!   one is held, and by keyed 128-bit blake3 digests where it is not.
//! - **Block sharing**: a content index of sampled blocks (four per page)
//!   the backup holds; a page whose rewritten blocks are found there (moved
//!   or duplicated content) gets its blocks compared with the source page at
//!   the same offset, and equal ones are sent as references (or the page as a
//!   copy). References are checked against what the encoder knows the backup
//!   holds at that point of the stream (bytes where a copy is held, digests
//!   otherwise), so a stale index entry is never used; the key is per session
//!   and secret, so a guest cannot craft colliding blocks.
//! - **Hybrid compression**: per page, one of zero, XOR-RLE against the
//!   previous version (XBZRLE-style), a block list, lz4, and raw: a block
//!   list is compared with the whole page (lz4 or raw) and the smaller sent;
//!   a small whole-page delta is sent without trying the others. Output is
//!   never larger than raw plus a few bytes of header.
//! - **Memory budget**: what the encoder keeps about the backup's memory
//!   (copies, digests, the sharing index) stays within
//!   [`Config::budget_bytes`] (plus a few bytes a page of per-page state);
//!   past it the encoder stays exact and only sends more bytes.
//!
//! # Modules
//! [`Encoder`] dispatches on the mode. fgbi mode is the pipeline
//! (`pipeline.rs`: the per-page choice of record) over the knowledge budget
//! (`knowledge.rs`: zero / copy / digests / unknown per page, CLOCK and random
//! eviction, the adaptive copy/digest split), the sharing index
//! (`sharing.rs`) and per-page block masks and digests (`blocks.rs`);
//! xbzrle mode is a direct-mapped cache (`xbzrle.rs`); record writers are in
//! `record.rs`, the byte codecs in [`codec`], the backup side in [`apply()`].
//!
//! # Modes
//! One encoder, three modes, so one run compares them side by side:
//! [`Mode::Remus`] (whole dirty pages, raw), [`Mode::Xbzrle`] (whole-page
//! XOR-RLE against a QEMU-like direct-mapped page cache of the budget's
//! size, raw on a miss, zero pages detected), [`Mode::Fgbi`] (all of the
//! above). [`apply`] reads all of them.
//!
//! # Wire records
//! An epoch is a concatenation of records, one per page that changed:
//!
//! ```text
//! record  = varint(page) kind body
//! kind 1  ZeroPage                       the page is all zero
//! kind 2  RawPage   4096 bytes
//! kind 3  Lz4Page   varint(len) bytes    lz4 block that decodes to exactly 4096 bytes
//! kind 4  XorPage   varint(len) bytes    XOR-RLE against the page's current content
//! kind 5  Blocks    varint(count) count × block, block indices strictly increasing
//! kind 6  CopyPage  varint(src_page)     a copy of another page as it was before this record
//! block   = varint(index) bkind body
//! bkind 0 Zero
//! bkind 1 Raw       block_size bytes
//! bkind 2 Ref       varint(src_page) varint(src_block)   copy of a block as it was before this record
//! bkind 3 Xor       varint(len) bytes    XOR-RLE against the block's current content
//! ```
//! Varints are LEB128. Records are applied in order; a `Ref` reads its source
//! as it stood before the record that contains it.
#![forbid(unsafe_code)]

mod apply;
mod blocks;
pub mod codec;
mod digest;
mod encoder;
#[doc(hidden)]
pub mod fuzzing;
mod knowledge;
mod pipeline;
mod record;
mod sharing;
mod xbzrle;

/// Shared by the modules' tests.
#[cfg(test)]
mod testing {
    use crate::PAGE_SIZE;

    /// A page of xorshift noise from `seed`.
    pub fn random_page(seed: u64) -> [u8; PAGE_SIZE] {
        let mut s = seed | 1;
        let mut p = [0u8; PAGE_SIZE];
        for c in p.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            c.copy_from_slice(&s.to_le_bytes());
        }
        p
    }
}

pub use apply::{apply, ApplyStats};
pub use encoder::Encoder;
pub use record::EncodeStats;

/// Guest page size: the unit of dirty tracking.
pub const PAGE_SIZE: usize = 4096;

/// Record kinds (see the crate documentation).
pub mod kind {
    /// The page is all zero.
    pub const ZERO_PAGE: u8 = 1;
    /// 4096 raw bytes.
    pub const RAW_PAGE: u8 = 2;
    /// lz4 block of the page.
    pub const LZ4_PAGE: u8 = 3;
    /// XOR-RLE of the page against its current content.
    pub const XOR_PAGE: u8 = 4;
    /// A list of changed blocks.
    pub const BLOCKS: u8 = 5;
    /// A copy of another page.
    pub const COPY_PAGE: u8 = 6;
    /// Block: all zero.
    pub const B_ZERO: u8 = 0;
    /// Block: raw bytes.
    pub const B_RAW: u8 = 1;
    /// Block: copy of another block.
    pub const B_REF: u8 = 2;
    /// Block: XOR-RLE against its current content.
    pub const B_XOR: u8 = 3;
}

/// How changes are described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Remus: every dirty page, whole and raw.
    Remus,
    /// QEMU's XBZRLE: XOR-RLE against a direct-mapped cache of previous page
    /// versions (of the budget's size), raw on a miss; zero pages detected.
    Xbzrle,
    /// castor: fine-grained blocks, sharing, hybrid compression.
    Fgbi,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "remus" => Ok(Mode::Remus),
            "xbzrle" => Ok(Mode::Xbzrle),
            "fgbi" => Ok(Mode::Fgbi),
            _ => Err(format!("unknown mode '{s}' (choose remus, xbzrle or fgbi)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Remus => "remus",
            Mode::Xbzrle => "xbzrle",
            Mode::Fgbi => "fgbi",
        })
    }
}

/// Encoder settings; the backup needs the same `block_size`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The mode.
    pub mode: Mode,
    /// Block size in bytes: a power of two from 64 to 1024.
    pub block_size: usize,
    /// Bytes the encoder may keep about the backup's memory.
    pub budget_bytes: u64,
    /// The session's secret key for block digests.
    pub key: [u8; 32],
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Block size out of range.
    #[error("block size {0} is not a power of two from 64 to 1024")]
    BlockSize(usize),
}

impl Config {
    /// Checks the block size.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_block_size(self.block_size)
    }
}

/// Checks that `bs` is a power of two from 64 to 1024.
pub fn check_block_size(bs: usize) -> Result<(), ConfigError> {
    if bs.is_power_of_two() && (64..=1024).contains(&bs) {
        Ok(())
    } else {
        Err(ConfigError::BlockSize(bs))
    }
}

/// Why an epoch was refused by [`apply`]. The replica is unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The stream ended inside a record.
    #[error("truncated record: the stream ends inside its {0}")]
    Truncated(&'static str),
    /// A record refers to a page outside the replica.
    #[error("page {page} is outside the replica ({pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Replica size in pages.
        pages: u64,
    },
    /// A block index outside the page.
    #[error("block {block} is outside a page of {blocks} blocks")]
    BlockOutOfRange {
        /// The block.
        block: u64,
        /// Blocks per page.
        blocks: u64,
    },
    /// An unknown record or block kind.
    #[error("unknown {what} kind {kind}")]
    UnknownKind {
        /// "record" or "block".
        what: &'static str,
        /// The kind byte.
        kind: u8,
    },
    /// A length, run or count that does not fit.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    /// The block size is not supported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The replica is not a whole number of pages.
    #[error("replica of {0} bytes is not a whole number of pages")]
    ReplicaSize(usize),
}
