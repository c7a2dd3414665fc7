//! Link emulation inside the transport: a rate limit and a one-way delay on
//! the replication traffic, for measuring castor as if its pair were joined
//! by a slower network than loopback (the papers assume 1 Gbit/s).
//!
//! The shaping is done by the primary, at its end of the link, at the level
//! of castor's messages:
//! - checkpoint frames are held for the one-way delay, then written in
//!   pieces of at most [`PIECE`] bytes no faster than the rate (a token
//!   bucket with one piece of burst), in order;
//! - acks are held for the one-way delay when they arrive (so an epoch's
//!   round trip is at least twice the delay);
//! - heartbeats and QUIC's own packets are not shaped, so failure detection
//!   is not slowed down by the emulation.
//!
//! Kernel shaping (tc/netem between network namespaces) would be the other
//! way; the kernels of this project's machines have no `sch_netem`.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Largest piece a paced write sends at once.
pub const PIECE: usize = 64 << 10;

/// What the emulated link does to the replication traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkShape {
    /// Bytes per second the data may flow at; `None`: as fast as the transport goes.
    pub rate_bytes_per_s: Option<u64>,
    /// One-way delay added to checkpoints and to acks.
    pub delay: Duration,
}

impl LinkShape {
    /// Whether the link is shaped at all.
    pub fn is_shaped(&self) -> bool {
        self.rate_bytes_per_s.is_some() || !self.delay.is_zero()
    }
}

impl fmt::Display for LinkShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate_bytes_per_s {
            Some(r) => write!(f, "{} Mbit/s", r * 8 / 1_000_000)?,
            None => write!(f, "unlimited")?,
        }
        if !self.delay.is_zero() {
            write!(f, ", {} us one-way delay", self.delay.as_micros())?;
        }
        Ok(())
    }
}

/// Paces writes to a rate: a token bucket whose burst is one piece.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u64>,
    /// When the link is free again.
    free_at: Instant,
}

impl Pacer {
    /// A pacer for `rate` bytes per second (`None`: no pacing).
    pub fn new(rate: Option<u64>) -> Self {
        Pacer {
            rate: rate.filter(|&r| r > 0),
            free_at: Instant::now(),
        }
    }

    /// How long sending `n` bytes occupies the link.
    pub fn cost(&self, n: usize) -> Duration {
        match self.rate {
            Some(r) => Duration::from_nanos((n as u128 * 1_000_000_000 / r as u128) as u64),
            None => Duration::ZERO,
        }
    }

    /// Books `n` bytes on the link; returns when they may be handed to the
    /// transport (at once if the link is idle).
    pub fn book(&mut self, n: usize, now: Instant) -> Instant {
        if self.rate.is_none() {
            return now;
        }
        let start = self.free_at.max(now);
        self.free_at = start + self.cost(n);
        start
    }
}

/// Items held for a fixed delay, released in arrival order.
#[derive(Debug)]
pub struct DelayLine<T> {
    delay: Duration,
    queue: VecDeque<(Instant, T)>,
}

impl<T> DelayLine<T> {
    /// An empty line with this delay.
    pub fn new(delay: Duration) -> Self {
        DelayLine {
            delay,
            queue: VecDeque::new(),
        }
    }

    /// Adds an item that arrived at `now`.
    pub fn push(&mut self, item: T, now: Instant) {
        self.queue.push_back((now + self.delay, item));
    }

    /// When the oldest item is due, if there is one.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// The oldest item, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.queue.pop_front().map(|(_, x)| x)
        } else {
            None
        }
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Parses a rate such as `1gbit`, `100mbit`, `500kbit`, `10MB` (bytes),
/// or `none`/`0` for no limit; returns bytes per second.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "none" || t == "0" || t == "unlimited" {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a number followed by gbit, mbit, kbit, bit, GB, MB, KB or B (per second), or 'none'"))?;
    let bits_per_unit: f64 = match unit.trim_end_matches("/s").trim_end_matches("ps") {
        "gbit" | "g" => 1e9,
        "mbit" | "m" => 1e6,
        "kbit" | "k" => 1e3,
        "bit" => 1.0,
        "gb" => 8e9,
        "mb" => 8e6,
        "kb" => 8e3,
        "b" => 8.0,
        other => {
            return Err(format!(
                "'{s}': unknown unit '{other}' (use gbit, mbit, kbit, bit, GB, MB, KB or B)"
            ))
        }
    };
    let bytes = n * bits_per_unit / 8.0;
    if !(bytes.is_finite() && (1000.0..=1e12).contains(&bytes)) {
        return Err(format!(
            "'{s}': the rate must be between 8 kbit/s and 8 Tbit/s"
        ));
    }
    Ok(Some(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("1gbit"), Ok(Some(125_000_000)));
        assert_eq!(parse_rate("100Mbit"), Ok(Some(12_500_000)));
        assert_eq!(parse_rate("10MB"), Ok(Some(10_000_000)));
        assert_eq!(parse_rate("none"), Ok(None));
        assert!(parse_rate("fast")
            .unwrap_err()
            .contains("expected a number"));
        assert!(parse_rate("3furlongs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_rate("1bit").unwrap_err().contains("between"));
    }

    #[test]
    fn pacer_spaces_writes_at_the_rate() {
        let mut p = Pacer::new(Some(1_000_000)); // 1 MB/s: 64 KiB takes 65.5 ms
        let t0 = Instant::now();
        assert_eq!(p.book(PIECE, t0), t0);
        let second = p.book(PIECE, t0);
        assert_eq!(second - t0, Duration::from_nanos(65_536_000));
        // After an idle spell the link is free at once, with no saved-up burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.book(PIECE, later), later);
        assert_eq!(p.book(1, later) - later, Duration::from_nanos(65_536_000));
        let mut free = Pacer::new(None);
        assert_eq!(free.book(1 << 30, t0), t0);
    }

    #[test]
    fn delay_line_keeps_order_and_time() {
        let t0 = Instant::now();
        let mut d = DelayLine::new(Duration::from_millis(5));
        d.push(1, t0);
        d.push(2, t0 + Duration::from_millis(1));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(4)), None);
        assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(5)));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(5)), Some(1));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(5)), None);
        assert_eq!(d.pop_due(t0 + Duration::from_millis(6)), Some(2));
        assert!(d.is_empty());
    }
}
