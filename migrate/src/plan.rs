//! The planner: a pure, sans-IO decision over the rounds of a pre-copy.
//!
//! After each round the shell tells the planner what the round carried
//! (pages, bytes on the wire, time from its first byte to the
//! destination's ack) and how many pages are dirty now (the harvest that
//! ends the round); the planner answers: another round, stop and copy the
//! rest (pre-copy converged), switch to post-copy, or stop anyway.
//!
//! # The model (seed 001: adaptive downtime control from the writable
//! working set)
//! - **Bandwidth** `B`: the link's rate when known, else the best
//!   throughput a round achieved (bytes ÷ time to ack).
//! - **Bytes per dirty page** `b`: of the latest round after the first (the
//!   encoder's ratio for this workload: fgbi sends tens of bytes for a page
//!   with a few 8-byte writes, remus always 4 KiB + header); a raw page
//!   until a second round (round 1 is mostly never-written pages).
//! - **Time per page** `p`: what a round took beyond its bytes on the link,
//!   per page (reading, encoding, applying; the round trip spread over it):
//!   the stop-and-copy pays it too.
//! - **Writable working set** `W(T)`: pages dirtied during a round of
//!   length `T`. Each round k gives a point `(T_k, d_{k+1})` (the pages
//!   harvested at its end were dirtied while it ran). `W` is fitted by
//!   least squares over the history as a power law, `ln d = ln c + α·ln T`
//!   (one point: linear through the origin), `α` clamped to `[0.1, 1]`. A
//!   straight line `d = a + c·T` (the seed's) gets a positive intercept
//!   from a concave working set (random writes saturate) and then predicts
//!   that short rounds dirty many pages: it gave up on guests that
//!   converge. The power law goes through the origin and bends.
//! - **Stall** of stopping with `d` dirty pages:
//!   `switch_cost + d·(p + b / B)` (pause, state, digest, restore and round
//!   trips are the fixed `switch_cost`).
//!
//! Decision, with `d` pages dirty now: stop if the stall of `d` fits
//! `max_downtime`. Otherwise iterate the model forward (`T = d·(p + b/B)`,
//! `d' = W(T)`) for the rounds left: if some predicted round's
//! stall fits, continue; if the dirty set stops shrinking first, the
//! migration does not converge — switch to post-copy, or, when post-copy
//! is forbidden, stop now and report the stall to expect (waiting longer
//! would only move more bytes). A hard bound of `max_rounds` ends every
//! pre-copy.

use std::time::Duration;

/// A raw page record on the wire: the page and its header.
const RAW_PAGE: f64 = 4096.0 + 16.0;

/// The time a dirty page is assumed to cost (encoding a page of fresh
/// data here: reading, trying the encodings, applying) until a second round
/// measures it, in seconds.
pub const FIRST_ROUND_PAGE_TIME: f64 = 20e-6;

/// The share of `--max-downtime` the planner aims a stop at while more
/// rounds are predicted to get there: the pause's cost per page is above the
/// rounds' (the pages are read and encoded cold, on a host whose load
/// varies), and a margin keeps the stall under the limit. A stop that fits
/// the limit but not the aim is taken when no further round would help.
pub const AIM: f64 = 0.75;

/// The planner's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    /// The stall to stay within.
    pub max_downtime: Duration,
    /// Whether the planner may switch to post-copy.
    pub postcopy: bool,
    /// Most pre-copy rounds (round 1, every page, included).
    pub max_rounds: u32,
    /// Fixed part of a stall: pause, machine state, restore on the
    /// destination, the final round trips.
    pub switch_cost: Duration,
    /// The link's rate, if known (bytes/s): used until a round measured it.
    pub link_rate: Option<u64>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            max_downtime: Duration::from_millis(50),
            postcopy: true,
            max_rounds: 30,
            switch_cost: Duration::from_millis(8),
            link_rate: None,
        }
    }
}

/// What one round carried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundFigures {
    /// Pages encoded.
    pub pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// From the round's first byte to the destination's ack.
    pub duration: Duration,
    /// Pages dirtied while it ran (the harvest at its end).
    pub dirtied: u64,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send another round of the pages dirty now.
    Continue {
        /// Rounds the model expects before the stall fits.
        rounds_to_fit: u32,
    },
    /// Pre-copy converged: pause, send the rest and the state.
    Stop {
        /// The stall the model expects.
        predicted: Duration,
    },
    /// It will not converge: resume on the destination now and fetch the
    /// rest on demand.
    PostCopy {
        /// The stall a stop-and-copy now would have cost.
        stop_and_copy: Duration,
    },
    /// It will not converge and post-copy is forbidden: stop anyway.
    StopAnyway {
        /// The stall to expect.
        predicted: Duration,
    },
}

/// A writable working set `d = c·T^α` (T in seconds), `0.1 ≤ α ≤ 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Pages dirtied in one second.
    pub c: f64,
    /// How the working set grows with the round's length: 1 for a guest
    /// that keeps dirtying new pages, less as it re-dirties the same ones.
    pub alpha: f64,
}

impl Fit {
    /// Pages dirtied in a round of `t`.
    pub fn at(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        if t <= 0.0 {
            return 0.0;
        }
        self.c * t.powf(self.alpha)
    }
}

/// The planner: history in, decisions out; no clock, no I/O.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlanConfig,
    rounds: Vec<RoundFigures>,
}

impl Planner {
    /// A planner with no history.
    pub fn new(cfg: PlanConfig) -> Self {
        Planner {
            cfg,
            rounds: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PlanConfig {
        &self.cfg
    }

    /// The rounds so far.
    pub fn rounds(&self) -> &[RoundFigures] {
        &self.rounds
    }

    /// Records a finished round.
    pub fn observe(&mut self, r: RoundFigures) {
        self.rounds.push(r);
    }

    /// Bytes per second the link carries: the link's rate when known,
    /// else the best a round achieved (rounds of at least 64 KiB).
    pub fn bandwidth(&self) -> f64 {
        if let Some(r) = self.cfg.link_rate {
            return r as f64;
        }
        let measured = self
            .rounds
            .iter()
            .filter(|r| r.bytes >= 64 << 10 && !r.duration.is_zero())
            .map(|r| r.bytes as f64 / r.duration.as_secs_f64())
            .fold(0.0, f64::max);
        if measured > 0.0 {
            measured
        } else {
            125e6
        }
    }

    /// Bytes a dirty page costs on the wire: from the latest round after
    /// the first that sent pages. Round 1 carries every page, most of them
    /// never written (zero, or cheap for the encoder), so it says nothing
    /// about dirty pages: until a second round, a raw page is assumed.
    pub fn bytes_per_page(&self) -> f64 {
        self.rounds
            .iter()
            .skip(1)
            .rev()
            .find(|r| r.pages > 0)
            .map(|r| r.bytes as f64 / r.pages as f64)
            .unwrap_or(RAW_PAGE)
    }

    /// Time a page costs besides its bytes on the link (reading, encoding,
    /// applying, the round trip spread over the round): the faster of the
    /// latest two rounds after the first of at least 64 pages. A stall of
    /// the host or the process only ever makes a round slower (a CPU taken
    /// away for ~100 ms turned a 28 ms round into 141 ms and a stop into a
    /// post-copy), so one slow round does not set the price alone. Round
    /// 1's pages are mostly never written and cheap to encode; until a
    /// second round, at least [`FIRST_ROUND_PAGE_TIME`] is assumed for a
    /// dirty page.
    pub fn page_time(&self) -> f64 {
        let b = self.bandwidth();
        let per = |r: &RoundFigures| {
            (r.duration.as_secs_f64() - r.bytes as f64 / b).max(0.0) / r.pages as f64
        };
        let measured = self
            .rounds
            .iter()
            .skip(1)
            .rev()
            .filter(|r| r.pages >= 64)
            .take(2)
            .map(per)
            .reduce(f64::min);
        match measured {
            Some(t) => t,
            None => self
                .rounds
                .first()
                .filter(|r| r.pages > 0)
                .map(per)
                .unwrap_or(0.0)
                .max(FIRST_ROUND_PAGE_TIME),
        }
    }

    /// How long sending `pages` dirty pages takes.
    pub fn send_time(&self, pages: f64) -> Duration {
        Duration::from_secs_f64(
            pages * (self.page_time() + self.bytes_per_page() / self.bandwidth()),
        )
    }

    /// The writable working set fitted over the history, if there is one.
    pub fn fit(&self) -> Option<Fit> {
        if self.rounds.is_empty() {
            return None;
        }
        let pts: Vec<(f64, f64)> = self
            .rounds
            .iter()
            .filter(|r| r.dirtied > 0 && !r.duration.is_zero())
            .map(|r| (r.duration.as_secs_f64().ln(), (r.dirtied as f64).ln()))
            .collect();
        let Some(line) = fit_line(&pts) else {
            // Nothing dirtied in any round.
            return Some(Fit { c: 0.0, alpha: 1.0 });
        };
        Some(match line {
            // One length only: linear through the origin and their mean.
            Line { slope: None, mean } => Fit {
                c: (mean.1 - mean.0).exp(),
                alpha: 1.0,
            },
            Line {
                slope: Some((_, b)),
                mean,
            } => {
                // The working set grows at most linearly and at least a
                // little: clamp the exponent, refit the factor at the mean.
                let alpha = b.clamp(0.1, 1.0);
                Fit {
                    c: (mean.1 - alpha * mean.0).exp(),
                    alpha,
                }
            }
        })
    }

    /// The stall of stopping with `pages` dirty pages.
    pub fn stall(&self, pages: u64) -> Duration {
        self.cfg.switch_cost + self.send_time(pages as f64)
    }

    /// The decision after the latest round, with `dirty` pages dirty now.
    pub fn decide(&self, dirty: u64) -> Decision {
        let now = self.stall(dirty);
        let fits = now <= self.cfg.max_downtime;
        if now <= self.aim() {
            return Decision::Stop { predicted: now };
        }
        let done = self.rounds.len() as u32;
        let give_up = |predicted| {
            if fits {
                Decision::Stop { predicted }
            } else if self.cfg.postcopy {
                Decision::PostCopy {
                    stop_and_copy: predicted,
                }
            } else {
                Decision::StopAnyway { predicted }
            }
        };
        if done >= self.cfg.max_rounds {
            return give_up(now);
        }
        let left = self.cfg.max_rounds - done;
        if let Some(n) = self.rounds_to_fit(dirty, left, self.aim()) {
            return Decision::Continue { rounds_to_fit: n };
        }
        if fits {
            // Within the limit, and no round would bring it to the aim.
            return Decision::Stop { predicted: now };
        }
        match self.rounds_to_fit(dirty, left, self.cfg.max_downtime) {
            Some(n) => Decision::Continue { rounds_to_fit: n },
            // Round 1 is the whole RAM and says little about dirty pages,
            // and one later round may have been stalled by the host: give up
            // only on two rounds measured after the first.
            None if done < 3 => Decision::Continue { rounds_to_fit: 0 },
            None => give_up(now),
        }
    }

    /// The stall a stop aims at while further rounds can still shrink it
    /// ([`AIM`] of the limit).
    fn aim(&self) -> Duration {
        self.cfg.max_downtime.mul_f64(AIM)
    }

    /// How many more rounds, per the model, until a stop's stall is within
    /// `limit` (within `left` rounds); `None` if the dirty set stops
    /// shrinking first.
    pub fn rounds_to_fit(&self, dirty: u64, left: u32, limit: Duration) -> Option<u32> {
        let fit = self.fit()?;
        let mut d = dirty as f64;
        for i in 1..=left {
            let next = fit.at(self.send_time(d));
            if self.stall(next.ceil() as u64) <= limit {
                return Some(i);
            }
            if next >= d * 0.99 {
                return None;
            }
            d = next;
        }
        None
    }
}

/// A least-squares line over points: `y = a + b·x`, or only the points'
/// mean when they share one `x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    /// `(a, b)`, if the points have more than one `x`.
    pub slope: Option<(f64, f64)>,
    /// The mean point.
    pub mean: (f64, f64),
}

fn mean_of(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    )
}

/// Least squares over `(x, y)` points (seed 001's regression; the planner
/// runs it on logarithms, which fits a power law).
pub fn fit_line(pts: &[(f64, f64)]) -> Option<Line> {
    if pts.is_empty() {
        return None;
    }
    let (mx, my) = mean_of(pts);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= 1e-12 * pts.len() as f64 {
        return Some(Line {
            slope: None,
            mean: (mx, my),
        });
    }
    let b = sxy / sxx;
    Some(Line {
        slope: Some((my - b * mx, b)),
        mean: (mx, my),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A guest dirtying `rate` distinct pages a second out of `pages`
    /// (random writes: the working set saturates), a link of `bw` bytes a
    /// second with `rtt`, an encoder costing `bpp` bytes a page: the rounds
    /// the planner asks for, and its final decision.
    fn simulate(
        cfg: PlanConfig,
        pages: u64,
        rate: f64,
        bw: f64,
        bpp: f64,
        rtt: Duration,
    ) -> (Vec<RoundFigures>, Decision) {
        let wws = |t: Duration| -> u64 {
            let p = pages as f64;
            (p * (1.0 - (-rate * t.as_secs_f64() / p).exp())).round() as u64
        };
        let mut planner = Planner::new(cfg);
        let mut to_send = pages;
        loop {
            let bytes = (to_send as f64 * bpp) as u64;
            let duration = Duration::from_secs_f64(bytes as f64 / bw) + rtt;
            let dirtied = wws(duration);
            planner.observe(RoundFigures {
                pages: to_send,
                bytes,
                duration,
                dirtied,
            });
            match planner.decide(dirtied) {
                Decision::Continue { .. } => to_send = dirtied,
                d => return (planner.rounds().to_vec(), d),
            }
        }
    }

    #[test]
    fn the_fit_recovers_a_power_law_and_a_single_point_is_linear() {
        let l = fit_line(&[(1.0, 12.0), (2.0, 22.0), (3.0, 32.0)]).unwrap();
        let (a, b) = l.slope.unwrap();
        assert!((a - 2.0).abs() < 1e-9 && (b - 10.0).abs() < 1e-9);
        assert!(fit_line(&[]).is_none());
        let round = |ms: u64, dirtied: u64| RoundFigures {
            pages: 1000,
            bytes: 1 << 20,
            duration: Duration::from_millis(ms),
            dirtied,
        };
        // d = 4000·T^0.5
        let mut p = Planner::new(PlanConfig::default());
        assert!(p.fit().is_none());
        p.observe(round(1000, 4000));
        let f = p.fit().unwrap();
        assert_eq!(f.alpha, 1.0);
        assert!((f.at(Duration::from_millis(500)) - 2000.0).abs() < 1e-6);
        p.observe(round(250, 2000));
        let f = p.fit().unwrap();
        assert!(
            (f.alpha - 0.5).abs() < 1e-9 && (f.c - 4000.0).abs() < 1e-6,
            "{f:?}"
        );
        // A working set cannot grow faster than its round: clamped.
        p.observe(round(125, 100));
        assert!(p.fit().unwrap().alpha <= 1.0);
    }

    #[test]
    fn an_idle_guest_stops_after_the_first_round() {
        // 256 MiB, a counter dirtying ~10 pages a second, 1 Gbit/s, mostly
        // zero pages (fgbi: a few bytes each).
        let (rounds, d) = simulate(PlanConfig::default(), 65536, 10.0, 125e6, 40.0, MS);
        assert_eq!(rounds.len(), 1);
        assert!(matches!(d, Decision::Stop { predicted } if predicted <= 50 * MS));
    }

    #[test]
    fn sparse_writes_with_fgbi_converge_in_a_few_rounds() {
        // 50 k random 8-byte writes/s over 256 MiB, fgbi ~20 B a page.
        let (rounds, d) = simulate(PlanConfig::default(), 65536, 50e3, 125e6, 20.0, MS);
        assert!(rounds.len() <= 3, "{rounds:?}");
        assert!(matches!(d, Decision::Stop { predicted } if predicted <= 50 * MS));
    }

    #[test]
    fn whole_pages_faster_than_the_link_switch_to_post_copy_without_looping() {
        // 40 k fresh pages/s (160 MB/s) over a 125 MB/s link: never converges.
        let (rounds, d) = simulate(PlanConfig::default(), 65536, 40e3, 125e6, 4112.0, MS);
        assert!(rounds.len() <= 3, "gave up after {} rounds", rounds.len());
        assert!(matches!(d, Decision::PostCopy { stop_and_copy } if stop_and_copy > 50 * MS));
    }

    #[test]
    fn without_post_copy_a_non_converging_migration_stops_anyway_and_says_how_long() {
        let cfg = PlanConfig {
            postcopy: false,
            ..PlanConfig::default()
        };
        let (rounds, d) = simulate(cfg, 65536, 40e3, 125e6, 4112.0, MS);
        assert!(rounds.len() <= 3);
        match d {
            Decision::StopAnyway { predicted } => {
                // Tens of thousands of pages at 125 MB/s: over a second.
                assert!(predicted > Duration::from_millis(500), "{predicted:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slowly_converging_migration_keeps_going_while_the_model_says_it_will_fit() {
        // remus (whole pages) with 5 k pages/s over 1 Gbit/s: each round
        // shrinks (20 MB/s of new dirt against 125 MB/s).
        let (rounds, d) = simulate(PlanConfig::default(), 65536, 5e3, 125e6, 4112.0, MS);
        assert!(rounds.len() >= 3, "{rounds:?}");
        assert!(matches!(d, Decision::Stop { .. }), "{d:?}");
    }

    #[test]
    fn a_measured_sparse_writer_is_expected_to_converge() {
        // Measured on this machine (fgbi, sparse 50 k/s over 192 MiB, a
        // loaded host): round 1 565 ms, 21,496 pages dirtied meanwhile;
        // round 2 of them 319 ms (~15 us a page, encoding-bound), 13,655
        // dirtied. A straight-line fit (intercept ~3,500 pages) predicted
        // no convergence and chose post-copy; the power law continues.
        let mut p = Planner::new(PlanConfig {
            link_rate: Some(125_000_000),
            switch_cost: Duration::from_millis(8),
            ..PlanConfig::default()
        });
        p.observe(RoundFigures {
            pages: 65536,
            bytes: 1_427_105,
            duration: Duration::from_millis(565),
            dirtied: 21496,
        });
        p.observe(RoundFigures {
            pages: 21496,
            bytes: 950_931,
            duration: Duration::from_millis(319),
            dirtied: 13655,
        });
        assert!(
            matches!(p.decide(13655), Decision::Continue { .. }),
            "{:?} {:?}",
            p.decide(13655),
            p.fit()
        );
    }

    #[test]
    fn within_the_limit_it_stops_when_no_round_would_reach_the_aim() {
        // A working set that does not shrink with shorter rounds: ~8 us a
        // page, 5,000 pages, ~48 ms — within 50, above the aim of 37.5.
        let mut p = Planner::new(PlanConfig {
            link_rate: Some(125_000_000),
            ..PlanConfig::default()
        });
        for (pages, ms) in [(65536u64, 300u64), (5000, 40)] {
            p.observe(RoundFigures {
                pages,
                bytes: pages * 40,
                duration: Duration::from_millis(ms),
                dirtied: 5000,
            });
        }
        let s = p.stall(5000);
        assert!(s > p.aim() && s <= Duration::from_millis(50), "{s:?}");
        assert!(matches!(p.decide(5000), Decision::Stop { .. }));
    }

    #[test]
    fn max_rounds_bounds_every_pre_copy() {
        let cfg = PlanConfig {
            max_rounds: 2,
            postcopy: false,
            max_downtime: Duration::from_micros(1),
            ..PlanConfig::default()
        };
        let (rounds, d) = simulate(cfg, 65536, 5e3, 125e6, 4112.0, MS);
        assert_eq!(rounds.len(), 2);
        assert!(matches!(d, Decision::StopAnyway { .. }));
    }

    #[test]
    fn bandwidth_comes_from_the_best_round_and_the_hint_before_any() {
        let mut p = Planner::new(PlanConfig::default());
        assert_eq!(p.bandwidth(), 125e6);
        assert_eq!(p.bytes_per_page(), 4112.0);
        p.observe(RoundFigures {
            pages: 100,
            bytes: 1 << 20,
            duration: Duration::from_secs(1),
            dirtied: 10,
        });
        p.observe(RoundFigures {
            pages: 10,
            bytes: 100,
            duration: MS,
            dirtied: 10,
        });
        assert_eq!(p.bandwidth(), (1 << 20) as f64);
        assert_eq!(p.bytes_per_page(), 10.0);
        let hinted = Planner::new(PlanConfig {
            link_rate: Some(1000),
            ..PlanConfig::default()
        });
        assert_eq!(hinted.bandwidth(), 1000.0);
    }

    #[test]
    fn encoding_time_counts_in_the_stall() {
        // Rounds whose time is mostly per-page work, not bytes.
        let mut p = Planner::new(PlanConfig {
            link_rate: Some(125_000_000),
            ..PlanConfig::default()
        });
        for (pages, ms, dirtied) in [(65536u64, 300u64, 12000u64), (12000, 90, 4000)] {
            p.observe(RoundFigures {
                pages,
                bytes: pages * 40,
                duration: Duration::from_millis(ms),
                dirtied,
            });
        }
        // ~7.5 us a page: 4000 pages cost ~30 ms on top of the switch.
        let s = p.stall(4000);
        assert!(
            s > Duration::from_millis(35) && s < Duration::from_millis(40),
            "{s:?}"
        );
        // Within the limit but above the aim (37.5 ms), and a round of
        // them (~30 ms, ~1,500 dirtied) would get there: one more round.
        assert_eq!(p.decide(4000), Decision::Continue { rounds_to_fit: 1 });
        // ~3,000 pages (~30 ms) fit the aim: stop.
        assert!(matches!(p.decide(3000), Decision::Stop { .. }));
        // 8000 pages (~60 ms) do not fit; a round of them leaves ~2900.
        assert_eq!(p.decide(8000), Decision::Continue { rounds_to_fit: 1 });
    }

    #[test]
    fn one_round_stalled_by_the_host_does_not_end_the_pre_copy() {
        // A sparse writer: round 2 should take ~25 ms, but the host took
        // the CPU away for ~100 ms in the middle of it.
        let mut p = Planner::new(PlanConfig {
            link_rate: Some(125_000_000),
            ..PlanConfig::default()
        });
        let round = |pages: u64, ms: u64, dirtied: u64| RoundFigures {
            pages,
            bytes: pages * 40,
            duration: Duration::from_millis(ms),
            dirtied,
        };
        p.observe(round(65536, 300, 1500));
        p.observe(round(1500, 141, 2500));
        // Priced by the stalled round alone, 2,500 pages cost ~240 ms and
        // nothing converges; one round is not enough to give up on.
        assert!(p.stall(2500) > Duration::from_millis(200));
        assert_eq!(p.decide(2500), Decision::Continue { rounds_to_fit: 0 });
        // The next round runs at the guest's own pace: the faster of the
        // two prices the stop, and it fits.
        p.observe(round(2500, 28, 600));
        let d = p.decide(600);
        assert!(
            matches!(d, Decision::Stop { predicted } if predicted < 20 * MS),
            "{d:?}"
        );
        // A stalled round after a normal one: the normal one prices the
        // stop (~16 us a page, so 1,500 pages fit), where the stalled one
        // alone (~235 us a page) would have meant a post-copy.
        let mut p = Planner::new(p.config().clone());
        p.observe(round(65536, 300, 1500));
        p.observe(round(1500, 25, 600));
        p.observe(round(600, 141, 1500));
        let d = p.decide(1500);
        assert!(
            matches!(d, Decision::Stop { predicted } if predicted < 40 * MS),
            "{d:?}"
        );
    }
}
