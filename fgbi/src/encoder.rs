//! The primary side: [`Encoder`] turns dirty pages into records, in the
//! configured mode, and keeps the running totals.
//!
//! The encoder is a thin composition: remus sends every page raw and keeps
//! nothing; xbzrle is the direct-mapped cache of `xbzrle.rs`; fgbi is the
//! pipeline of `pipeline.rs`, itself built on the knowledge budget
//! (`knowledge.rs`), the sharing index (`sharing.rs`) and the per-page block
//! masks (`blocks.rs`).

use crate::pipeline::FgbiPipeline;
use crate::record::{self, EncodeStats};
use crate::xbzrle::XbzrleCache;
use crate::{Config, ConfigError, Mode, PAGE_SIZE};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_counts_pages_and_stays_within_its_budget() {
        let pages = 32u64;
        let budget = 8 * PAGE_SIZE as u64;
        for mode in [Mode::Remus, Mode::Xbzrle, Mode::Fgbi] {
            let cfg = Config {
                mode,
                block_size: 128,
                budget_bytes: budget,
                key: [1; 32],
            };
            let mut enc = Encoder::new(cfg, pages).unwrap();
            let mut out = Vec::new();
            let mut s = 1u64;
            for round in 0..4 {
                for p in 0..pages {
                    let mut data = [0u8; PAGE_SIZE];
                    if round % 2 == 0 || p % 3 != 0 {
                        for c in data.chunks_exact_mut(8) {
                            s ^= s << 13;
                            s ^= s >> 7;
                            s ^= s << 17;
                            c.copy_from_slice(&s.to_le_bytes());
                        }
                    }
                    enc.encode_page(p, &data, &mut out);
                    assert!(enc.memory_bytes() <= budget, "{mode}");
                }
            }
            let st = enc.stats();
            assert_eq!(st.pages, 4 * pages);
            assert_eq!(st.bytes_out, out.len() as u64);
            let records = st.zero_pages
                + st.raw_pages
                + st.lz4_pages
                + st.xor_pages
                + st.block_pages
                + st.copy_pages;
            assert_eq!(records + st.unchanged, st.pages, "{mode}");
            if mode == Mode::Remus {
                assert_eq!(st.raw_pages, st.pages);
                assert_eq!(enc.memory_bytes(), 0);
            }
            assert!(format!("{enc:?}").contains(&format!("{mode:?}")));
        }
        let bad = Config {
            mode: Mode::Fgbi,
            block_size: 100,
            budget_bytes: 0,
            key: [0; 32],
        };
        assert_eq!(
            Encoder::new(bad, 1).err(),
            Some(ConfigError::BlockSize(100))
        );
    }
}
