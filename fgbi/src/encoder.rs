//! The primary side: [`Encoder`] turns dirty pages into records, in the
//! configured mode, and keeps the running totals.
//!
//! The encoder is a thin composition: [`crate::Mode::Remus`] sends every
//! page raw and keeps nothing; [`crate::Mode::Xbzrle`] is
//! [`crate::xbzrle::XbzrleCache`]; [`crate::Mode::Fgbi`] is
//! [`crate::pipeline::FgbiPipeline`], itself built on the knowledge budget
//! ([`crate::knowledge`]), the sharing index ([`crate::sharing`]) and the
//! per-page block masks ([`crate::blocks`]).

use crate::pipeline::FgbiPipeline;
use crate::xbzrle::XbzrleCache;
use crate::{record, Config, ConfigError, Mode, PAGE_SIZE};

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
    /// Pages encoded against a held copy (fgbi mode only).
    pub copy_hits: u64,
    /// Pages encoded against held digests (fgbi mode only).
    pub digest_hits: u64,
    /// Pages the encoder had forgotten, encoded with every block counted as
    /// changed (fgbi mode only).
    pub misses: u64,
}

/// The mode's own state.
enum Engine {
    Remus,
    Xbzrle(XbzrleCache),
    Fgbi(Box<FgbiPipeline>),
}

/// Encodes dirty pages into records for [`crate::apply`], tracking what the
/// backup will hold once they are applied, within the memory budget.
///
/// Every record returned must reach the backup and be applied, in order: the
/// encoder's knowledge assumes so. After a lost epoch, start a new encoder
/// (and a full resync).
pub struct Encoder {
    cfg: Config,
    stats: EncodeStats,
    engine: Engine,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (copies, digest_sets) = match &self.engine {
            Engine::Fgbi(e) => (e.n_copies(), e.n_digests()),
            _ => (0, 0),
        };
        f.debug_struct("Encoder")
            .field("mode", &self.cfg.mode)
            .field("block_size", &self.cfg.block_size)
            .field("copies", &copies)
            .field("digest_sets", &digest_sets)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for a replica of `pages` pages, all zero at the start.
    pub fn new(cfg: Config, pages: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let engine = match cfg.mode {
            Mode::Remus => Engine::Remus,
            Mode::Xbzrle => Engine::Xbzrle(XbzrleCache::new(pages, cfg.budget_bytes)),
            Mode::Fgbi => Engine::Fgbi(Box::new(FgbiPipeline::new(&cfg, pages))),
        };
        Ok(Encoder {
            cfg,
            stats: EncodeStats::default(),
            engine,
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

    /// Bytes the encoder's knowledge of the backup takes now: copies, digest
    /// sets and the sharing index (the per-page state, at most 8 bytes a
    /// page, aside).
    pub fn memory_bytes(&self) -> u64 {
        match &self.engine {
            Engine::Remus => 0,
            Engine::Xbzrle(c) => c.bytes(),
            Engine::Fgbi(e) => e.bytes(),
        }
    }

    /// Appends the record describing `data`, the current content of `page`,
    /// to `out`. Nothing is appended if the backup already holds it.
    pub fn encode_page(&mut self, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
        let start = out.len();
        let stats = &mut self.stats;
        stats.pages += 1;
        match &mut self.engine {
            Engine::Remus => record::raw(page, data, stats, out),
            Engine::Xbzrle(c) => c.encode(page, data, stats, out),
            Engine::Fgbi(e) => e.encode(page, data, stats, out),
        }
        if out.len() == start {
            stats.unchanged += 1;
        }
        stats.bytes_out += (out.len() - start) as u64;
    }
}
