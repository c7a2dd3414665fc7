//! Telling a stalled host from a dead peer, after the fact.
//!
//! A liveness thread (the primary's heartbeat sender, the backup's
//! watchdog) sleeps a few milliseconds at a time at real-time priority. When
//! it wakes much later than it asked, the host itself stalled: on a virtual
//! machine the hypervisor took the CPU away (*steal time*, counted by the
//! kernel in `/proc/stat`), or the kernel ran something it does not preempt.
//! Nothing a thread does can prevent that, and a failure detector shorter
//! than the stall takes the stall for a dead primary. [`StallWatch`] notices
//! such wake-ups and says how much of the time the hypervisor stole, so an
//! operator can tell a false takeover from a real one and size
//! `--heartbeat-timeout-ms` above what the host does.

use std::time::{Duration, Instant};

/// A wake-up later than this after the time asked for is reported: under
/// the default 30 ms heartbeat timeout, so that every stall that can cause
/// a takeover at the defaults is in the log.
pub const REPORTED: Duration = Duration::from_millis(20);

/// The host's steal time so far, summed over its CPUs (`None`: not known,
/// e.g. not Linux or not a virtual machine that reports it).
pub fn host_steal() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal(&stat)
}

/// The steal field of `/proc/stat`'s first line, in USER_HZ (100 per second
/// on every Linux castor runs on) ticks, as a duration.
fn parse_steal(stat: &str) -> Option<Duration> {
    let line = stat.lines().next()?;
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    let steal: u64 = f.nth(7)?.parse().ok()?;
    Some(Duration::from_millis(steal.saturating_mul(10)))
}

/// A late wake-up of a liveness thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// How much later than asked the thread woke.
    pub late: Duration,
    /// The host's steal time over the last second or so (all CPUs), if the
    /// kernel reports it.
    pub stolen: Option<Duration>,
    /// Stalls since the previous one reported and not reported themselves
    /// (at most one report per [`QUIET`]).
    pub unreported: u64,
}

impl Stall {
    /// Logs the stall of `thread` (a warning: a backup whose heartbeat
    /// timeout is shorter than `late` takes a stalled primary for a dead
    /// one). Without steal, the process itself was stopped or starved
    /// rather than the host.
    pub fn log(&self, thread: &str) {
        tracing::warn!(
            late_ms = self.late.as_millis() as u64,
            host_steal_ms = self.stolen.map(|d| d.as_millis() as u64),
            more_since_last = self.unreported,
            "{thread} woke late: this host or this process stalled (host_steal_ms: the hypervisor's share); a backup whose heartbeat timeout is shorter takes such a stall of its primary for a dead one"
        );
    }
}

/// At most one report per this long: a host that stalls often is said to,
/// without a log line per stall.
pub const QUIET: Duration = Duration::from_secs(1);

/// Watches the wake-ups of one thread that sleeps in a loop.
#[derive(Debug)]
pub struct StallWatch {
    /// The steal time at `steal_at`, refreshed about once a second.
    steal: Option<Duration>,
    steal_at: Instant,
    reported_at: Option<Instant>,
    unreported: u64,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch::new()
    }
}

impl StallWatch {
    /// A watch with no stall seen yet.
    pub fn new() -> StallWatch {
        let now = Instant::now();
        StallWatch {
            steal: host_steal(),
            steal_at: now,
            reported_at: None,
            unreported: 0,
        }
    }

    /// The thread slept `slept` when it asked for `asked` (only the sleep:
    /// a wait for a lock is not the host's stall). A stall — more than
    /// [`REPORTED`] late — is returned for the log unless one was within
    /// [`QUIET`]. Reads `/proc/stat` about once a second, and at a stall.
    pub fn woke(&mut self, slept: Duration, asked: Duration) -> Option<Stall> {
        let now = Instant::now();
        let late = slept.saturating_sub(asked);
        if late <= REPORTED {
            if now.duration_since(self.steal_at) >= Duration::from_secs(1) {
                (self.steal, self.steal_at) = (host_steal(), now);
            }
            return None;
        }
        if self
            .reported_at
            .is_some_and(|t| now.duration_since(t) < QUIET)
        {
            self.unreported += 1;
            return None;
        }
        let steal = host_steal();
        let stolen = match (self.steal, steal) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        (self.steal, self.steal_at) = (steal, now);
        self.reported_at = Some(now);
        Some(Stall {
            late,
            stolen,
            unreported: std::mem::take(&mut self.unreported),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steal_field_is_the_eighth_number_in_ticks() {
        let stat = "cpu  1389358 2419285 822864 3874526 20238 0 57448 56297 99748 1735537\n\
                    cpu0 694379 1193339 411546 1958345 6597 0 26754 28092 49256 859306\n";
        assert_eq!(parse_steal(stat), Some(Duration::from_millis(562_970)));
        assert_eq!(parse_steal("cpu  1 2 3\n"), None);
        assert_eq!(parse_steal("intr 1 2 3 4 5 6 7 8 9\n"), None);
        assert_eq!(parse_steal(""), None);
    }

    #[test]
    fn a_wake_up_on_time_is_no_stall_and_a_late_one_is() {
        let ms = Duration::from_millis;
        let mut w = StallWatch::new();
        assert_eq!(w.woke(ms(2), ms(2)), None);
        assert_eq!(w.woke(ms(21), ms(1)), None, "20 ms late is not reported");
        let s = w.woke(ms(60), ms(1)).expect("59 ms late");
        assert_eq!(s.late, ms(59));
        assert_eq!(s.unreported, 0);
        // The next within QUIET is counted, not reported; the one after
        // QUIET carries the count.
        assert_eq!(w.woke(ms(100), ms(1)), None);
        w.reported_at = Some(Instant::now() - QUIET);
        let s = w.woke(ms(100), ms(5)).expect("reported again");
        assert_eq!((s.late, s.unreported), (ms(95), 1), "{s:?}");
    }
}
