//! The writable-working-set model for choosing a protected pair's epoch
//! length (`--epoch-ms auto`, not wired into the primary yet): the same
//! model as live migration's planner (`castor-migrate`, seed 001), applied
//! to checkpoints.
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

use std::time::Duration;

/// What the chooser aims for.
#[derive(Debug, Clone, PartialEq)]
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

/// The choice and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// The next epoch's length.
    pub len: Duration,
    /// The pause the model expects for it.
    pub pause: Duration,
    /// The link's bound forced a pause over the target.
    pub pause_over_target: bool,
}

/// Chooses epoch lengths from the last `window` epochs.
#[derive(Debug, Clone)]
pub struct EpochChooser {
    target: EpochTarget,
    window: usize,
    history: Vec<EpochFigures>,
}

fn fit(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    if pts.is_empty() {
        return None;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 1e-18 {
        // One length only: through the origin.
        return Some(if mx > 0.0 { (0.0, my / mx) } else { (my, 0.0) });
    }
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let c = sxy / sxx;
    Some((my - c * mx, c))
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
        let (p0, k) = (p0.max(0.0), k.max(0.0));
        let dirty: u64 = h.iter().map(|f| f.dirty).sum();
        let b = h.iter().map(|f| f.bytes).sum::<u64>() as f64 / dirty.max(1) as f64;
        let (a, c) = (a.max(0.0), c.max(0.0));
        let t = &self.target;
        let (min, max) = (t.min.as_secs_f64(), t.max.as_secs_f64());
        let d = |e: f64| a + c * e;
        let pause = |e: f64| p0 + k * d(e);
        // Lower bounds: the link's budget and the pause's share.
        let mut lo = min;
        let link_rate = b * c;
        if link_rate >= t.link_budget {
            lo = max; // even the longest epoch cannot keep up: send as rarely as allowed
        } else if b * a > 0.0 {
            lo = lo.max(b * a / (t.link_budget - link_rate));
        }
        let share_rate = k * c;
        if share_rate < t.pause_share {
            lo = lo.max((p0 + k * a) / (t.pause_share - share_rate));
        } else {
            lo = max;
        }
        let e = lo.clamp(min, max);
        let p = pause(e);
        Some(Choice {
            len: Duration::from_secs_f64(e),
            pause: Duration::from_secs_f64(p),
            pause_over_target: p > t.pause.as_secs_f64(),
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
    }
}
