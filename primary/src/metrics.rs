//! Per-epoch figures of the primary, their summary, and the status line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use node::stats::percentile as pct;
use node::wws::{Choice, EpochTarget};
use node::{AutoEpochStatus, PrimaryStatus};
use tracing::info;

use crate::config::EpochLength;

/// What one epoch cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochFigures {
    /// Epoch number.
    pub epoch: u64,
    /// The guest's pause (pause → resume).
    pub pause: Duration,
    /// Of which: dirty-log harvest.
    pub harvest: Duration,
    /// Of which: copying the dirty pages.
    pub copy: Duration,
    /// Of which: machine-state capture.
    pub capture: Duration,
    /// fgbi encoding (after resume).
    pub encode: Duration,
    /// Dirty pages.
    pub dirty_pages: u64,
    /// Bytes sent for the checkpoint.
    pub bytes: u64,
    /// Bytes the dirty pages would take raw.
    pub raw_bytes: u64,
    /// Time the epoch waited for in-flight checkpoints.
    pub wait: Duration,
    /// Of the dirty pages, those copied before the pause (pre-copy).
    pub precopied: u64,
    /// The epoch's real length: from the previous epoch's pause start to
    /// its own (zero for a session's first epochs).
    pub len: Duration,
    /// The length it was planned to have (fixed, or auto's choice).
    pub planned: Duration,
    /// Auto ran it at half its choice, for the model to see another length.
    pub probe: bool,
    /// Disk blocks the checkpoint carries.
    pub disk_blocks: u64,
    /// Of `bytes`, the disk's records.
    pub disk_bytes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    epochs: Vec<EpochFigures>,
    acks: Vec<Duration>,
    releases: Vec<Duration>,
    protected: bool,
    /// The backup protected toward, `NODE@ADDR`.
    backup: Option<String>,
    /// The session's protocol version.
    protocol: Option<u16>,
    /// `epochs[0]` is the last epoch before a reset, kept for the epoch
    /// count: not a sample. (Epochs are numbered per session, so a number
    /// cannot mark the reset: a session begun after it numbers from 1 again.)
    marker: bool,
    /// The last session's first checkpoint.
    resync: Option<node::ResyncStatus>,
    /// Sessions begun (resyncs).
    sessions: u64,
    /// The epoch length now.
    epoch_len: Duration,
    /// Auto's latest choice.
    choice: Option<Choice>,
}

/// The primary's running figures.
#[derive(Debug)]
pub struct Metrics {
    mode: fgbi::Mode,
    /// Auto's target, if the epoch length is chosen.
    auto: Option<EpochTarget>,
    inner: Mutex<Inner>,
    /// The node's Prometheus metrics, fed from here.
    exported: Arc<node::metrics::Metrics>,
}

const KEEP: usize = 1 << 16;

impl Metrics {
    /// Empty figures, which also feed the node's `exported` metrics.
    pub fn new(
        mode: fgbi::Mode,
        epoch: EpochLength,
        exported: Arc<node::metrics::Metrics>,
    ) -> Self {
        Metrics {
            mode,
            auto: epoch.auto().copied(),
            inner: Mutex::new(Inner {
                epoch_len: epoch.initial(),
                ..Inner::default()
            }),
            exported,
        }
    }

    /// The epoch length chosen from now on (auto's probes aside), and
    /// auto's choice that set it.
    pub fn pace(&self, len: Duration, choice: Option<Choice>) {
        let mut i = self.lock();
        i.epoch_len = len;
        if choice.is_some() {
            i.choice = choice;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an epoch and logs it.
    pub fn epoch(&self, f: EpochFigures) {
        tracing::debug!(
            epoch = f.epoch,
            pause_us = f.pause.as_micros() as u64,
            harvest_us = f.harvest.as_micros() as u64,
            copy_us = f.copy.as_micros() as u64,
            capture_us = f.capture.as_micros() as u64,
            encode_us = f.encode.as_micros() as u64,
            dirty = f.dirty_pages,
            bytes = f.bytes,
            len_us = f.len.as_micros() as u64,
            raw = f.raw_bytes,
            wait_us = f.wait.as_micros() as u64,
            "epoch"
        );
        self.exported.epoch(f.pause, f.bytes, f.dirty_pages);
        let mut i = self.lock();
        if i.epochs.len() >= KEEP {
            i.epochs.drain(..KEEP / 2);
            i.marker = false;
        }
        i.epochs.push(f);
        let n = i.epochs.len();
        drop(i);
        if n.is_multiple_of(200) {
            self.log_summary("protected");
        }
    }

    /// Logs the summary so far as one `info` line saying `what`.
    pub fn log_summary(&self, what: &str) {
        let s = self.figures();
        info!(
            epochs = s.epochs,
            pause_p50_us = s.pause_p50_us as u64,
            pause_p99_us = s.pause_p99_us as u64,
            bytes_per_epoch = s.bytes_per_epoch as u64,
            raw_per_epoch = s.raw_bytes_per_epoch as u64,
            ack_p50_us = s.ack_p50_us as u64,
            "{what}"
        );
    }

    /// Records an ack's latency (commit → ack).
    pub fn ack(&self, d: Duration) {
        self.exported.ack.observe(d.as_secs_f64());
        let mut i = self.lock();
        if i.acks.len() >= KEEP {
            i.acks.drain(..KEEP / 2);
        }
        i.acks.push(d);
    }

    /// Records an output-commit delay (pause start → output released).
    pub fn release(&self, d: Duration) {
        let mut i = self.lock();
        if i.releases.len() >= KEEP {
            i.releases.drain(..KEEP / 2);
        }
        i.releases.push(d);
    }

    /// Forgets the figures so far (a benchmark's warm-up); the epoch count
    /// and the protection state stay.
    pub fn reset(&self) {
        let mut i = self.lock();
        let last = i.epochs.last().copied();
        i.epochs.clear();
        i.acks.clear();
        i.releases.clear();
        // Keep the last epoch so the count survives; mark it as not a sample.
        if let Some(f) = last {
            i.epochs.push(f);
        }
        i.marker = last.is_some();
    }

    /// Whether the backup holds a committed checkpoint of this session.
    pub fn protected(&self) -> bool {
        self.lock().protected
    }

    /// Records how a session's first checkpoint went (its `protected_ms`
    /// is filled in by [`Metrics::resync_protected`]).
    pub fn resync(&self, r: node::ResyncStatus) {
        let mut i = self.lock();
        i.resync = Some(r);
        i.sessions += 1;
    }

    /// The first checkpoint of the session was acknowledged `ms` after the hello.
    pub fn resync_protected(&self, ms: f64) {
        if let Some(r) = self.lock().resync.as_mut() {
            r.protected_ms.get_or_insert(ms);
        }
    }

    /// The protocol version of the session with the backup (`None`: no
    /// session, or its version is not agreed yet).
    pub fn set_protocol(&self, v: Option<u16>) {
        self.lock().protocol = v;
    }

    /// Marks the pair protected or not.
    pub fn set_protected(&self, p: bool) {
        self.lock().protected = p;
    }

    /// The backup protected toward (`NODE@ADDR`), for the status.
    pub fn set_backup(&self, b: Option<String>) {
        self.lock().backup = b;
    }

    /// The figures for the status; each session's first epoch (its full
    /// resync) is left out of the pause and size figures.
    pub fn figures(&self) -> PrimaryStatus {
        let i = self.lock();
        let steady: Vec<&EpochFigures> = i
            .epochs
            .iter()
            .skip(usize::from(i.marker))
            .filter(|f| f.epoch > 1)
            .collect();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let part = |g: fn(&EpochFigures) -> Duration| -> Vec<f64> {
            steady.iter().map(|f| us(g(f))).collect()
        };
        let mut pause = part(|f| f.pause);
        let mut enc = part(|f| f.encode);
        let mut acks: Vec<f64> = i.acks.iter().map(|d| us(*d)).collect();
        let mut rel: Vec<f64> = i.releases.iter().map(|d| us(*d)).collect();
        let n = steady.len().max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timed: Vec<&&EpochFigures> = steady.iter().filter(|f| !f.len.is_zero()).collect();
        let mut lens: Vec<f64> = timed.iter().map(|f| ms(f.len)).collect();
        let timed_s: f64 = timed.iter().map(|f| f.len.as_secs_f64()).sum();
        let bytes_per_s = if timed_s > 0.0 {
            timed.iter().map(|f| f.bytes as f64).sum::<f64>() / timed_s
        } else {
            0.0
        };
        let epoch_auto = self.auto.map(|t| {
            // (A resync's checkpoint was not planned: zero.)
            let paced: Vec<&&EpochFigures> = steady
                .iter()
                .filter(|f| !f.planned.is_zero() && !f.probe)
                .collect();
            let mut planned: Vec<f64> = paced.iter().map(|f| ms(f.planned)).collect();
            let c = i.choice;
            AutoEpochStatus {
                min_ms: t.min.as_millis() as u64,
                max_ms: t.max.as_millis() as u64,
                pause_target_ms: ms(t.pause),
                link_budget: t.link_budget,
                pause_share: t.pause_share,
                bound: c.map_or(String::new(), |c| c.bound.to_string()),
                capped: c.is_some_and(|c| c.capped),
                expected_pause_ms: c.map_or(0.0, |c| ms(c.pause)),
                pause_over_target: c.is_some_and(|c| c.pause_over_target),
                chosen_min_ms: planned.iter().cloned().reduce(f64::min).unwrap_or(0.0),
                chosen_max_ms: planned.iter().cloned().reduce(f64::max).unwrap_or(0.0),
                changes: paced
                    .windows(2)
                    .filter(|w| w[0].planned != w[1].planned)
                    .count() as u64,
                chosen_p50_ms: pct(&mut planned, 0.5),
                probes: steady.iter().filter(|f| f.probe).count() as u64,
            }
        });
        // (+ 0.0: an empty sum is -0.0, which prints as "-0")
        PrimaryStatus {
            protected: i.protected,
            backup: i.backup.clone(),
            protocol: i.protocol,
            mode: self.mode.to_string(),
            epoch_ms: i.epoch_len.as_millis() as u64,
            epoch_auto,
            epoch_len_p50_ms: pct(&mut lens, 0.5),
            bytes_per_s,
            epochs: i.epochs.last().map_or(0, |f| f.epoch),
            pause_max_us: pause.iter().cloned().fold(0.0, f64::max),
            pause_p50_us: pct(&mut pause, 0.5),
            pause_p99_us: pct(&mut pause, 0.99),
            dirty_pages_mean: steady.iter().map(|f| f.dirty_pages as f64).sum::<f64>() / n + 0.0,
            bytes_per_epoch: steady.iter().map(|f| f.bytes as f64).sum::<f64>() / n + 0.0,
            raw_bytes_per_epoch: steady.iter().map(|f| f.raw_bytes as f64).sum::<f64>() / n + 0.0,
            disk_bytes_per_epoch: steady.iter().map(|f| f.disk_bytes as f64).sum::<f64>() / n + 0.0,
            disk_blocks_mean: steady.iter().map(|f| f.disk_blocks as f64).sum::<f64>() / n + 0.0,
            encode_p50_us: pct(&mut enc, 0.5),
            encode_p99_us: pct(&mut enc, 0.99),
            harvest_p50_us: pct(&mut part(|f| f.harvest), 0.5),
            copy_p50_us: pct(&mut part(|f| f.copy), 0.5),
            capture_p50_us: pct(&mut part(|f| f.capture), 0.5),
            release_p50_us: pct(&mut rel, 0.5),
            release_p99_us: pct(&mut rel, 0.99),
            samples: steady.len() as u64,
            precopied_mean: steady.iter().map(|f| f.precopied as f64).sum::<f64>() / n + 0.0,
            ack_p50_us: pct(&mut acks, 0.5),
            ack_p99_us: pct(&mut acks, 0.99),
            epochs_waited: steady
                .iter()
                .filter(|f| f.wait > Duration::from_micros(100))
                .count() as u64,
            net: None,
            last_resync: i.resync.clone(),
            sessions: i.sessions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(n: u64, pause_ms: u64) -> EpochFigures {
        EpochFigures {
            epoch: n,
            pause: Duration::from_millis(pause_ms),
            ..EpochFigures::default()
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(
            fgbi::Mode::Fgbi,
            EpochLength::Fixed(Duration::from_millis(25)),
            Arc::new(node::metrics::Metrics::new()),
        )
    }

    #[test]
    fn each_sessions_first_epoch_and_the_reset_marker_are_not_samples() {
        let m = metrics();
        for n in 1..=10 {
            m.epoch(epoch(n, 1));
        }
        // Epoch 1 is the resync.
        assert_eq!(m.figures().samples, 9);
        m.reset();
        assert_eq!(m.figures().samples, 0);
        assert_eq!(m.figures().epochs, 10, "the count survives a reset");
        m.epoch(epoch(11, 2));
        assert_eq!(m.figures().samples, 1);
        // The backup was lost and a new session numbers from 1 again: its
        // epochs after the resync are samples (a bench window that saw a
        // resync used to count none of them).
        for n in 1..=5 {
            m.epoch(epoch(n, 3));
        }
        let f = m.figures();
        assert_eq!(f.samples, 5, "epoch 11 and the new session's 2..=5");
        assert_eq!(f.pause_max_us, 3000.0);
    }
}
