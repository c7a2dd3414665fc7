//! How long the epochs are: fixed (`--epoch-ms N`), or chosen after every
//! epoch by the writable-working-set model (`--epoch-ms auto`,
//! [`node::wws::EpochChooser`]) from the recent epochs' real figures.
//!
//! The epoch loop asks the [`Pacer`] for the length of the epoch it starts
//! and for its pre-copy window (which follows the length), and tells it each
//! epoch's figures; it measures each epoch's real length (pause start to
//! pause start) and, under auto, feeds the model and takes its choice for
//! the next epoch, in whole milliseconds. A session's first [`WARM_UP`]
//! epochs are not fed: the resync paused the guest and held the link, and
//! the epochs after it pay for warming up.

use std::time::{Duration, Instant};

use node::wws::{Bound, Choice, EpochChooser, EpochFigures as Sample};
use tracing::{debug, info, warn};

use crate::config::{precopy_window, EpochLength};
use crate::EpochFigures;

/// The epochs the model fits.
const WINDOW: usize = 16;

/// A session's epochs up to this one are not fed to the model: the first
/// is the resync, and the next ones pay for warming up (the staging buffer,
/// dropped after a full resync, is first-touched in their pauses: ~3 µs a
/// page, measured; their pauses pushed the pause share to 114 ms).
const WARM_UP: u64 = 8;

/// The regime is logged at `info` at most this often (a choice close to a
/// bound may flip between two); the one in force is always logged.
const REGIME_LOG_EVERY: Duration = Duration::from_secs(1);

/// What decided the length: logged at `info` when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Regime {
    bound: Bound,
    capped: bool,
    pause_over_target: bool,
}

impl Regime {
    fn of(c: &Choice) -> Self {
        Regime {
            bound: c.bound,
            capped: c.capped,
            pause_over_target: c.pause_over_target,
        }
    }
}

/// The model and what it chose.
struct Auto {
    chooser: EpochChooser,
    /// The last choice.
    choice: Option<Choice>,
    /// The regime last logged at `info`, and when.
    logged: Option<(Regime, Instant)>,
}

/// The length of the epochs.
pub(crate) struct Pacer {
    /// The epoch in progress, and the next ones until a new choice.
    len: Duration,
    /// It is auto's probe.
    probing: bool,
    /// The length chosen, probes aside.
    chosen: Duration,
    /// `--precopy-ms`, or the default (see [`precopy_window`]).
    precopy: Option<Duration>,
    auto: Option<Auto>,
    /// The last epoch seen: its session, number and pause start.
    last: Option<(u64, u64, Instant)>,
}

impl Pacer {
    /// A pacer for `epoch`, with the pre-copy `precopy` (`Config::precopy`).
    pub fn new(epoch: EpochLength, precopy: Option<Duration>) -> Self {
        Pacer {
            len: epoch.initial(),
            probing: false,
            chosen: epoch.initial(),
            precopy,
            auto: epoch.auto().map(|t| Auto {
                chooser: EpochChooser::new(*t, WINDOW),
                choice: None,
                logged: None,
            }),
            last: None,
        }
    }

    /// The epoch in progress's length.
    pub fn len(&self) -> Duration {
        self.len
    }

    /// Its pre-copy window.
    pub fn precopy(&self) -> Duration {
        precopy_window(self.precopy, self.len)
    }

    /// The length chosen, auto's probes aside (see [`EpochChooser::next_len`]).
    pub fn chosen(&self) -> Duration {
        self.chosen
    }

    /// Auto's last choice.
    pub fn choice(&self) -> Option<Choice> {
        self.auto.as_ref().and_then(|a| a.choice)
    }

    /// The epoch `f` of session `session`, whose pause began at `start`, is
    /// sent: fills in its real length (if the previous epoch seen was the
    /// one before it), the length it was planned for and whether it was a
    /// probe; under auto, feeds the model and takes its choice. True when
    /// the length changed.
    pub fn done(&mut self, session: u64, start: Instant, f: &mut EpochFigures) -> bool {
        f.planned = self.len;
        f.probe = self.probing;
        f.len = match self.last {
            Some((s, e, at)) if s == session && e + 1 == f.epoch => start - at,
            _ => Duration::ZERO,
        };
        self.last = Some((session, f.epoch, start));
        let Some(auto) = self.auto.as_mut() else {
            return false;
        };
        if f.len.is_zero() || f.epoch <= WARM_UP {
            return false;
        }
        auto.chooser.observe(Sample {
            len: f.len,
            pause: f.pause,
            bytes: f.bytes,
        });
        let Some(c) = auto.chooser.next_len() else {
            return false;
        };
        auto.choice = Some(c);
        let t = auto.chooser.target();
        // Whole milliseconds, within the bounds (which are whole too).
        let next = Duration::from_millis((c.len.as_secs_f64() * 1e3).round() as u64)
            .clamp(t.min, t.max.max(t.min));
        debug!(
            epoch = f.epoch,
            len_ms = f.len.as_secs_f64() * 1e3,
            dirty = f.dirty_pages,
            pause_us = f.pause.as_micros() as u64,
            bytes = f.bytes,
            next_ms = next.as_millis() as u64,
            bound = %c.bound,
            capped = c.capped,
            expected_pause_us = c.pause.as_micros() as u64,
            probe = c.probe,
            "auto epoch"
        );
        let regime = Regime::of(&c);
        let now = Instant::now();
        let due = match auto.logged {
            None => true,
            Some((r, at)) => r != regime && now.duration_since(at) >= REGIME_LOG_EVERY,
        };
        if due {
            auto.logged = Some((regime, now));
            let capped = match (c.capped, c.bound, next <= t.min) {
                (false, ..) => "",
                (true, Bound::PauseShare, _) if next < t.max => {
                    ", which no length keeps (the pause grows as fast): not lengthened for it"
                }
                (true, Bound::Link, true) => ", not kept even at the shortest allowed",
                (true, ..) => ", capped at the longest allowed (it asks for more)",
            };
            if c.pause_over_target {
                let conflict = match (c.bound, c.capped) {
                    (Bound::Shortest, _) | (Bound::PauseShare, true) => {
                        "even at the shortest epoch allowed".to_string()
                    }
                    (b, _) => format!("but a shorter epoch would break the {b}, which wins"),
                };
                warn!(
                    epoch_ms = next.as_millis() as u64,
                    expected_pause_us = c.pause.as_micros() as u64,
                    pause_target_us = t.pause.as_micros() as u64,
                    "auto epoch: the {} decides the length{capped}; the pause expected is over the target, {conflict}",
                    c.bound
                );
            } else {
                info!(
                    epoch_ms = next.as_millis() as u64,
                    expected_pause_us = c.pause.as_micros() as u64,
                    "auto epoch: the {} decides the length{capped}",
                    c.bound
                );
            }
        }
        let changed = next != self.len;
        self.len = next;
        self.probing = c.probe;
        if !c.probe {
            self.chosen = next;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node::wws::EpochTarget;

    const MS: Duration = Duration::from_millis(1);

    fn figures(epoch: u64, dirty: u64, pause: Duration, bytes: u64) -> EpochFigures {
        EpochFigures {
            epoch,
            pause,
            harvest: Duration::ZERO,
            copy: Duration::ZERO,
            capture: Duration::ZERO,
            encode: Duration::ZERO,
            dirty_pages: dirty,
            bytes,
            raw_bytes: dirty * 4096,
            wait: Duration::ZERO,
            precopied: 0,
            len: Duration::ZERO,
            planned: Duration::ZERO,
            probe: false,
            disk_blocks: 0,
            disk_bytes: 0,
        }
    }

    /// Epochs of a guest with a hot set of 2 k pages plus 10 k pages/s,
    /// whole pages (remus), each as long as the pacer says, and then more
    /// while the last was a probe; the next epoch number and the probes run.
    fn run(
        p: &mut Pacer,
        session: u64,
        epochs: std::ops::Range<u64>,
        t: &mut Instant,
    ) -> (u64, usize) {
        let (mut e, mut probes) = (epochs.start, 0);
        while e < epochs.end || p.choice().is_some_and(|c| c.probe) {
            probes += usize::from(p.choice().is_some_and(|c| c.probe));
            *t += p.len();
            let secs = p.len().as_secs_f64();
            let dirty = (2000.0 + 10_000.0 * secs) as u64;
            let mut f = figures(e, dirty, Duration::from_micros(300), dirty * 4112);
            p.done(session, *t, &mut f);
            e += 1;
        }
        (e, probes)
    }

    #[test]
    fn a_fixed_length_stays_and_its_epochs_are_measured() {
        let mut p = Pacer::new(EpochLength::Fixed(25 * MS), None);
        assert_eq!((p.len(), p.precopy()), (25 * MS, 5 * MS));
        let t = Instant::now();
        let mut f = figures(2, 10, MS, 100);
        assert!(!p.done(1, t, &mut f));
        assert_eq!((f.len, f.planned), (Duration::ZERO, 25 * MS));
        let mut f = figures(3, 10, MS, 100);
        assert!(!p.done(1, t + 27 * MS, &mut f));
        assert_eq!(f.len, 27 * MS);
        // A new session's epochs do not follow the old one's.
        let mut f = figures(4, 10, MS, 100);
        p.done(2, t + 60 * MS, &mut f);
        assert_eq!(f.len, Duration::ZERO);
        assert_eq!(p.len(), 25 * MS);
        assert!(p.choice().is_none());
    }

    #[test]
    fn auto_follows_the_model_and_the_precopy_follows_auto() {
        let mut p = Pacer::new(EpochLength::Auto(EpochTarget::default()), None);
        assert_eq!(p.len(), 25 * MS);
        let mut t = Instant::now();
        let (e, probes) = run(&mut p, 1, 2..80, &mut t);
        // Once the epochs are all about as long, one in a window is a probe
        // at half the length.
        assert!((2..=5).contains(&probes), "{probes} probes");
        assert_eq!(p.chosen(), p.len());
        // b·a / (budget − b·c) = 4112·2000 / (100e6 − 41.1e6) ≈ 140 ms.
        let len = p.len();
        assert!(len > 125 * MS && len < 155 * MS, "{len:?}");
        assert_eq!(len.subsec_nanos() % 1_000_000, 0, "whole milliseconds");
        assert_eq!(p.precopy(), 5 * MS);
        assert_eq!(p.choice().unwrap().bound, Bound::Link);
        // A new session: its first epoch is not fed (its length would
        // include the resync), the choice stays.
        t += Duration::from_secs(3);
        let mut f = figures(e, 50_000, 100 * MS, 1 << 30);
        assert!(!p.done(2, t, &mut f));
        assert_eq!(p.len(), len);
    }

    #[test]
    fn auto_stays_within_its_bounds() {
        let target = EpochTarget {
            min: 30 * MS,
            max: 60 * MS,
            ..EpochTarget::default()
        };
        let mut p = Pacer::new(EpochLength::Auto(target), Some(8 * MS));
        assert_eq!(p.len(), 30 * MS);
        let mut t = Instant::now();
        let mut e = 2;
        while e < 40 {
            e = run(&mut p, 1, e..e + 1, &mut t).0;
            assert!(p.len() >= 30 * MS && p.len() <= 60 * MS, "{:?}", p.len());
        }
        // The link asks for ~140 ms: capped at 60.
        assert_eq!(p.len(), 60 * MS);
        assert!(p.choice().unwrap().capped);
        assert_eq!(p.precopy(), 8 * MS);
    }
}
