//! The writable-working-set model for choosing a protected pair's epoch
//! length (`castor primary --epoch-ms auto`; the primary's `pace` module
//! feeds it every epoch and runs the next one at its choice): seed 001's
//! straight-line model, applied to checkpoints.
//!
//! From the recent epochs it fits, by least squares:
//! - the pages an epoch of length `E` dirties, `d(E) = a + c·E`;
//! - the pause an epoch of `d` dirty pages costs, `p(d) = p0 + k·d`;
//! - the bytes a dirty page costs on the wire, `b`.
//!
//! and chooses the **shortest** epoch (output is held for an epoch, so
//! shorter is better for clients) that
//! - keeps the link's budget: `b·d(E) / E ≤ budget` (else checkpoints
//!   queue without bound), and
//! - keeps the pause's share of the guest's time: `p(d(E)) / E ≤ share`,
//!
//! within `[min, max]`; then checks the pause target `p(d(E)) ≤ target`,
//! which bounds `E` from above. When the link's bound and the pause
//! target conflict, the link wins (a backlog grows without end; a long
//! pause does not) and the choice says so.
//!
//! A fit needs points that differ: when the recent epochs' lengths (or
//! dirty counts) are all about the same, a fitted slope is noise, and the
//! model takes the quantity as constant at its mean instead. Each bound then
//! becomes a proportional step — e.g. the next length is this one times
//! the bytes a second sent over the budget — whose fixed point is the
//! fitted model's answer, so the choice converges without the epochs
//! having to vary. A negative slope (noise again: a longer epoch does not
//! dirty fewer pages) is taken as constant too.

use std::time::Duration;

/// Below this coefficient of variation of the `x`s a fit is a constant.
const MIN_SPREAD: f64 = 0.1;

/// What the chooser aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochTarget {
    /// The longest pause wanted.
    pub pause: Duration,
    /// Bytes a second the checkpoints may use.
    pub link_budget: f64,
    /// Largest share of time the guest may spend paused.
    pub pause_share: f64,
    /// Shortest epoch.
    pub min: Duration,
    /// Longest epoch.
    pub max: Duration,
}

impl Default for EpochTarget {
    fn default() -> Self {
        EpochTarget {
            pause: Duration::from_millis(2),
            link_budget: 0.8 * 125e6,
            pause_share: 0.05,
            min: Duration::from_millis(10),
            max: Duration::from_millis(200),
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochFigures {
    /// Its length.
    pub len: Duration,
    /// Pages it dirtied.
    pub dirty: u64,
    /// The pause it cost.
    pub pause: Duration,
    /// Bytes it sent.
    pub bytes: u64,
}

/// What decided a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Nothing asks for longer epochs than the shortest allowed.
    Shortest,
    /// The link's budget: shorter epochs would send more than it.
    Link,
    /// The pause's share of the guest's time.
    PauseShare,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bound::Shortest => "shortest allowed",
            Bound::Link => "link budget",
            Bound::PauseShare => "pause share",
        })
    }
}

/// The choice and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// The next epoch's length.
    pub len: Duration,
    /// The pause the model expects for it.
    pub pause: Duration,
    /// The link's bound forced a pause over the target.
    pub pause_over_target: bool,
    /// The bound that decided `len`.
    pub bound: Bound,
    /// That bound asks for epochs longer than the longest allowed (or
    /// cannot be kept at any length): `len` is the longest, and the bound
    /// is not kept.
    pub capped: bool,
}

/// Chooses epoch lengths from the last `window` epochs.
#[derive(Debug, Clone)]
pub struct EpochChooser {
    target: EpochTarget,
    window: usize,
    history: Vec<EpochFigures>,
}

/// `y = a + c·x` by least squares over `pts`, with `a, c ≥ 0`: the
/// constant `y = mean` when the `x`s hardly differ or the slope comes out
/// negative, the line through the origin when the intercept does.
fn fit(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    if pts.is_empty() {
        return None;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let constant = (my.max(0.0), 0.0);
    if (sxx / n).sqrt() <= MIN_SPREAD * mx.abs() || sxx <= 1e-18 {
        return Some(constant);
    }
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let c = sxy / sxx;
    if c <= 0.0 {
        return Some(constant);
    }
    let a = my - c * mx;
    if a < 0.0 {
        let sxx0: f64 = pts.iter().map(|p| p.0 * p.0).sum();
        let sxy0: f64 = pts.iter().map(|p| p.0 * p.1).sum();
        return Some((0.0, (sxy0 / sxx0).max(0.0)));
    }
    Some((a, c))
}

impl EpochChooser {
    /// A chooser over the last `window` epochs (at least 2).
    pub fn new(target: EpochTarget, window: usize) -> Self {
        EpochChooser {
            target,
            window: window.max(2),
            history: Vec::new(),
        }
    }

    /// What it aims for.
    pub fn target(&self) -> &EpochTarget {
        &self.target
    }

    /// Records an epoch.
    pub fn observe(&mut self, f: EpochFigures) {
        self.history.push(f);
        if self.history.len() > self.window {
            self.history.remove(0);
        }
    }

    /// The next epoch's length (`None` until an epoch was observed).
    pub fn choose(&self) -> Option<Choice> {
        let h = &self.history;
        let (a, c) = fit(&h
            .iter()
            .map(|f| (f.len.as_secs_f64(), f.dirty as f64))
            .collect::<Vec<_>>())?;
        let (p0, k) = fit(&h
            .iter()
            .map(|f| (f.dirty as f64, f.pause.as_secs_f64()))
            .collect::<Vec<_>>())?;
        let dirty: u64 = h.iter().map(|f| f.dirty).sum();
        let b = h.iter().map(|f| f.bytes).sum::<u64>() as f64 / dirty.max(1) as f64;
        let t = &self.target;
        let (min, max) = (t.min.as_secs_f64(), t.max.as_secs_f64());
        let d = |e: f64| a + c * e;
        let pause = |e: f64| p0 + k * d(e);
        // Lower bounds: the link's budget and the pause's share. A bound
        // that no length keeps (its rate alone is over the budget) asks for
        // the longest: send, and pause, as rarely as allowed.
        let mut lo = min;
        let mut bound = Bound::Shortest;
        let mut ask = |need: f64, why: Bound| {
            if need > lo {
                lo = need;
                bound = why;
            }
        };
        let link_rate = b * c;
        if link_rate >= t.link_budget {
            ask(f64::INFINITY, Bound::Link);
        } else if b * a > 0.0 {
            ask(b * a / (t.link_budget - link_rate), Bound::Link);
        }
        let share_rate = k * c;
        if share_rate >= t.pause_share {
            ask(f64::INFINITY, Bound::PauseShare);
        } else {
            ask(
                (p0 + k * a) / (t.pause_share - share_rate),
                Bound::PauseShare,
            );
        }
        let e = lo.clamp(min, max);
        let p = pause(e);
        Some(Choice {
            len: Duration::from_secs_f64(e),
            pause: Duration::from_secs_f64(p),
            pause_over_target: p > t.pause.as_secs_f64(),
            bound,
            capped: lo > max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Epochs of 25, 50 and 100 ms of a guest dirtying `rate` pages a
    /// second (plus `base` each epoch), `b` bytes and `k` seconds a page.
    fn observe(ch: &mut EpochChooser, rate: f64, base: f64, b: f64, k: f64) {
        for ms in [25u64, 50, 100, 25, 50, 100] {
            let e = ms as f64 / 1e3;
            let dirty = (base + rate * e) as u64;
            ch.observe(EpochFigures {
                len: Duration::from_millis(ms),
                dirty,
                pause: Duration::from_secs_f64(0.0003 + k * dirty as f64),
                bytes: (b * dirty as f64) as u64,
            });
        }
    }

    #[test]
    fn a_small_working_set_gets_the_shortest_epoch() {
        // fgbi on sparse 50 k/s: ~20 B a page, 0.4 us a page.
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        assert!(ch.choose().is_none());
        observe(&mut ch, 40_000.0, 50.0, 20.0, 0.4e-6);
        let c = ch.choose().unwrap();
        assert_eq!(c.len, 10 * MS);
        assert!(!c.pause_over_target, "{c:?}");
    }

    #[test]
    fn whole_pages_lengthen_the_epoch_to_keep_the_link_budget() {
        // remus: 4 KiB a page; 10 k pages/s dirtied but ~2 k re-dirtied
        // pages each epoch at any length (a hot set): fewer, longer epochs
        // send the hot set less often.
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 10_000.0, 2_000.0, 4112.0, 0.1e-6);
        let c = ch.choose().unwrap();
        // b·a / (budget − b·c) = 4112·2000 / (100e6 − 41.1e6) ≈ 140 ms.
        assert!(c.len > 120 * MS && c.len < 160 * MS, "{c:?}");
        // Bytes a second at that length fit the budget.
        let e = c.len.as_secs_f64();
        assert!(4112.0 * (2000.0 + 10_000.0 * e) / e <= 100e6 * 1.001);
    }

    #[test]
    fn a_guest_faster_than_the_link_gets_the_longest_epoch() {
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 50_000.0, 0.0, 4112.0, 0.1e-6);
        assert_eq!(ch.choose().unwrap().len, 200 * MS);
    }

    #[test]
    fn a_costly_pause_lengthens_the_epoch_to_hold_its_share() {
        // 10 us a page and 2 k pages an epoch whatever its length: 20 ms
        // of pause needs epochs of 400 ms for 5 %; capped at the max, and
        // over the pause target.
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 0.0, 2_000.0, 20.0, 10e-6);
        let c = ch.choose().unwrap();
        assert_eq!(c.len, 200 * MS);
        assert!(c.pause_over_target);
        assert_eq!((c.bound, c.capped), (Bound::PauseShare, true));
    }

    /// A guest dirtying `a + c·E` pages an epoch of `E`, paced by the
    /// chooser from `start`, each epoch's length and counts off by up to
    /// `noise` (relative, deterministic): the lengths chosen.
    fn pace(target: EpochTarget, start: Duration, guest: [f64; 5], noise: f64) -> Vec<f64> {
        let [a, c, b, p0, k] = guest;
        let mut ch = EpochChooser::new(target, 16);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut jitter = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            1.0 + noise * ((seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        };
        let mut e = start.as_secs_f64();
        let mut out = Vec::new();
        for _ in 0..200 {
            let len = e * jitter();
            let dirty = ((a + c * len) * jitter()) as u64;
            ch.observe(EpochFigures {
                len: Duration::from_secs_f64(len),
                dirty,
                pause: Duration::from_secs_f64((p0 + k * dirty as f64) * jitter()),
                bytes: (b * dirty as f64) as u64,
            });
            e = ch.choose().unwrap().len.as_secs_f64();
            out.push(e);
        }
        out
    }

    #[test]
    fn noisy_epochs_of_one_length_do_not_throw_the_choice_about() {
        // Epochs of ~25 ms, lengths and counts off by up to 3 %: a fitted
        // slope would be noise. A hot set of 2 k whole pages plus 10 k
        // pages/s needs ~140 ms to fit 100 MB/s (as above); the choice gets
        // there and stays, from one length, without a wild step.
        let guest = [2_000.0, 10_000.0, 4112.0, 0.0003, 0.1e-6];
        let lens = pace(EpochTarget::default(), 25 * MS, guest, 0.03);
        let want = 4112.0 * 2000.0 / (100e6 - 4112.0 * 10_000.0);
        for (i, &e) in lens.iter().enumerate().skip(100) {
            assert!(
                (e - want).abs() < 0.1 * want,
                "epoch {i}: {e} s, want {want} s"
            );
        }
        // Never the longest on the way: proportional steps, not a jump.
        assert!(lens.iter().all(|&e| e < 0.2), "{lens:?}");
    }

    #[test]
    fn a_cheap_guest_settles_at_the_shortest_epoch_and_a_costly_pause_holds_its_share() {
        // fgbi, sparse: ~20 B a page, 0.4 us a page, 0.3 ms a pause.
        let lens = pace(
            EpochTarget::default(),
            25 * MS,
            [50.0, 40_000.0, 20.0, 0.0003, 0.4e-6],
            0.03,
        );
        assert!(lens[50..].iter().all(|&e| e == 0.010), "{lens:?}");
        // A pause of 1 ms + 1 us a page at 20 k pages/s: 5 % needs
        // (1 ms) / (5 % − 2 %) = 33 ms.
        let lens = pace(
            EpochTarget::default(),
            25 * MS,
            [0.0, 20_000.0, 20.0, 0.001, 1e-6],
            0.03,
        );
        let want = 0.001 / (0.05 - 0.02);
        for &e in &lens[100..] {
            assert!((e - want).abs() < 0.1 * want, "{e} s, want {want} s");
        }
    }

    #[test]
    fn the_choice_names_its_bound() {
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 10_000.0, 2_000.0, 4112.0, 0.1e-6);
        let c = ch.choose().unwrap();
        assert_eq!((c.bound, c.capped), (Bound::Link, false));
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 50_000.0, 0.0, 4112.0, 0.1e-6);
        let c = ch.choose().unwrap();
        assert_eq!((c.bound, c.capped), (Bound::Link, true));
        let mut ch = EpochChooser::new(EpochTarget::default(), 8);
        observe(&mut ch, 40_000.0, 50.0, 20.0, 0.4e-6);
        let c = ch.choose().unwrap();
        assert_eq!((c.bound, c.capped), (Bound::Shortest, false));
        assert_eq!(Bound::Link.to_string(), "link budget");
    }
}
