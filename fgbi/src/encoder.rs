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

    /// The replica is not zero at the start but an image the encoder has
    /// never seen (memory reuse: the backup kept an older image and gets
    /// only the pages that differ): every page's next change is encoded
    /// whole, never against an assumed zero page. Call before the first
    /// page is encoded.
    pub fn replica_unknown(&mut self) {
        match &mut self.engine {
            Engine::Remus => {}
            Engine::Xbzrle(c) => c.all_unknown(),
            Engine::Fgbi(e) => e.all_unknown(),
        }
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

    /// A replica that kept an older image: pages the primary never sends
    /// stay as they are, and the first change of each page is encoded
    /// whole — a page turning zero, or changing slightly, included.
    #[test]
    fn an_unknown_replica_is_never_assumed_zero() {
        let pages = 8u64;
        for mode in [Mode::Remus, Mode::Xbzrle, Mode::Fgbi] {
            let cfg = Config {
                mode,
                block_size: 128,
                budget_bytes: 64 * PAGE_SIZE as u64,
                key: [2; 32],
            };
            // The backup's old image: every page 0x55.
            let mut replica = vec![0x55u8; pages as usize * PAGE_SIZE];
            // The primary: page 0 turned zero, page 1 changed one byte,
            // page 2 is a fresh zero page over non-zero, the rest equal.
            let mut primary = replica.clone();
            primary[..PAGE_SIZE].fill(0);
            primary[PAGE_SIZE + 7] = 1;
            primary[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(0);
            let mut enc = Encoder::new(cfg.clone(), pages).unwrap();
            enc.replica_unknown();
            let mut out = Vec::new();
            for p in 0..3u64 {
                let page: &[u8; PAGE_SIZE] = primary[p as usize * PAGE_SIZE..][..PAGE_SIZE]
                    .try_into()
                    .unwrap();
                enc.encode_page(p, page, &mut out);
            }
            crate::apply(&mut replica, cfg.block_size, &out).unwrap();
            assert_eq!(replica, primary, "{mode}");
        }
    }
}
