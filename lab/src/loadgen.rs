//! `castor loadgen`: the client of the guest's key-value service over UDP,
//! and the checker of what it was told.
//!
//! It sends PUTs (fresh random values) and GETs at a set rate to random keys
//! `1..=keys`, with at most one request outstanding per key (so a key's
//! operations are sequential) and at most `concurrency` in all; a request
//! not answered within the timeout is sent again with the same id. Every
//! reply goes through the [`checker::Checker`], which records every
//! acknowledged write and raises a violation as soon as a reply shows that
//! an acknowledged write was lost or that a reply came from state that was
//! later lost. [`Handle::verify_all`] (also run when the generator stops)
//! reads back every acknowledged key.
//!
//! Every request is also recorded, with its first send and its reply, in a
//! [`history::Recorder`]; when the generator stops, the whole history is
//! checked for linearizability against a register per key
//! ([`crate::linearize`]): [`Report::linearizability`].
//!
//! As a library, for a drill:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use castor_lab::loadgen::{Config, Loadgen};
//! let lg = Loadgen::start(Config {
//!     netns: Some("castor-client".into()),
//!     ..Config::default()
//! })?;
//! // … kill the primary …
//! lg.mark("killed primary");
//! // … wait for the backup to take over …
//! let v = lg.verify_all()?;
//! assert!(v.ok());
//! let report = lg.stop();
//! assert!(report.ok(), "{}", report.summary());
//! # Ok(()) }
//! ```

pub mod checker;
pub mod history;
pub mod wire;

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::Serialize;

use crate::cli::parse_duration;
use crate::linearize;
use checker::{CheckCounts, Checker, ReplyOutcome, SendOutcome, Violation};
use wire::{Op, Reply, Request, STATUS_OK};

/// The load generator's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The key-value service.
    pub target: SocketAddr,
    /// Run in this network namespace (`ip netns` name); `None`: here.
    pub netns: Option<String>,
    /// Requests per second (first sends); 0: as fast as `concurrency` allows.
    pub rate: f64,
    /// Keys `1..=keys`.
    pub keys: u64,
    /// Fraction of requests that are PUTs.
    pub put_ratio: f64,
    /// Stop by itself after this long (then drain and verify); `None`: run
    /// until [`Handle::stop`].
    pub duration: Option<Duration>,
    /// Resend a request (same id) when it has no reply after this long.
    pub timeout: Duration,
    /// Requests outstanding at most.
    pub concurrency: usize,
    /// Before a verification or the end, wait this long at most for the
    /// outstanding requests' replies.
    pub drain_timeout: Duration,
    /// A verification gives up on keys without a reply after this long.
    pub verify_timeout: Duration,
    /// Read back every acknowledged key when stopping.
    pub verify_on_stop: bool,
    /// Violations kept in full in the report (all are counted).
    pub keep_violations: usize,
    /// Operations recorded at most for the linearizability check at the
    /// end (each about 80 bytes); 0: no history, no check.
    pub history_limit: usize,
    /// The service started empty (a fresh guest): the history check takes
    /// every key as absent before the first PUT, so a read of a value
    /// nobody wrote is caught. Otherwise a key's first read gives its
    /// starting value.
    pub fresh: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            target: SocketAddr::from(([10, 77, 0, 2], 7000)),
            netns: None,
            rate: 1000.0,
            keys: 1000,
            put_ratio: 0.5,
            duration: None,
            timeout: Duration::from_millis(50),
            concurrency: 16,
            drain_timeout: Duration::from_secs(5),
            verify_timeout: Duration::from_secs(10),
            verify_on_stop: true,
            keep_violations: 20,
            history_limit: 4_000_000,
            fresh: false,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<()> {
        if self.keys == 0 || self.keys > 1 << 24 {
            bail!("--keys must be 1 to 16777216, not {}", self.keys);
        }
        if !(0.0..=1.0).contains(&self.put_ratio) {
            bail!(
                "--put-ratio must be between 0 and 1, not {}",
                self.put_ratio
            );
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            bail!("--rate must be 0 (unlimited) or more, not {}", self.rate);
        }
        if self.concurrency == 0 || self.concurrency > 65536 {
            bail!("--concurrency must be 1 to 65536, not {}", self.concurrency);
        }
        if self.timeout.is_zero() {
            bail!("the retry timeout must be more than 0");
        }
        Ok(())
    }
}

/// Latency histogram: exact below 64 µs, then 32 buckets per power of two
/// (about 3 % resolution); bounded memory whatever the run's length.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; 64 + 58 * 32],
            total: 0,
            max_us: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < 64 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as u64; // >= 6
        let m = (us >> (e - 5)) - 32; // 0..32
        (64 + (e - 6) * 32 + m) as usize
    }

    /// The middle of a bucket, in µs.
    fn value(i: usize) -> f64 {
        if i < 64 {
            return i as f64;
        }
        let e = (i - 64) / 32 + 6;
        let m = ((i - 64) % 32) as u64;
        let lo = (32 + m) << (e - 5);
        lo as f64 + (1u64 << (e - 5)) as f64 / 2.0
    }

    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.counts[Self::index(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The `p` quantile in ms (0 if empty).
    fn quantile_ms(&self, p: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((p.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (Self::value(i).min(self.max_us as f64)) / 1000.0;
            }
        }
        self.max_us as f64 / 1000.0
    }
}

/// Latency figures, from a request's first send to its reply, in ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Replies measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// An event marked by the caller (e.g. "killed the primary") with the
/// replies around it.
#[derive(Debug, Clone, Serialize)]
pub struct MarkReport {
    /// The caller's label.
    pub label: String,
    /// When, seconds since the start.
    pub at_s: f64,
    /// The last reply at or before it.
    pub last_reply_before_s: Option<f64>,
    /// The first reply after it (`None`: none yet).
    pub first_reply_after_s: Option<f64>,
    /// First reply after minus last reply before: the client-seen gap.
    pub gap_ms: Option<f64>,
    /// First reply after minus the mark.
    pub after_mark_ms: Option<f64>,
}

/// The outcome of reading back every acknowledged key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// When it started, seconds since the start.
    pub at_s: f64,
    /// How long it took (draining included), ms.
    pub took_ms: f64,
    /// Keys with an acknowledged PUT.
    pub keys: u64,
    /// Of which read back (a GET reply with status ok).
    pub checked: u64,
    /// Violations raised by those replies.
    pub violations: u64,
    /// Keys whose GET got an error status.
    pub errors: u64,
    /// Keys not read back: a request of theirs still outstanding after the
    /// drain, or no reply before the verification's timeout.
    pub unresolved: u64,
}

impl VerifyReport {
    /// Every acknowledged key read back, with its value, and no violation.
    pub fn ok(&self) -> bool {
        self.violations == 0 && self.errors == 0 && self.unresolved == 0
    }
}

/// What the load generator saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The client id (random per run).
    pub client: u64,
    /// The service.
    pub target: String,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Requests sent (first sends), retries, replies, as counted by the
    /// checker.
    #[serde(flatten)]
    pub counts: CheckCounts,
    /// Datagrams that are not replies (wrong size, magic, op or pad).
    pub malformed: u64,
    /// Datagrams from an address other than the target.
    pub wrong_source: u64,
    /// Sends the socket refused (e.g. no route; retried).
    pub send_errors: u64,
    /// Requests outstanding now.
    pub outstanding: u64,
    /// Acknowledged requests per second over the run.
    pub requests_per_s: f64,
    /// First send to reply.
    pub latency: Latency,
    /// The longest time without a reply between two replies (from the
    /// start for the first), ms.
    pub longest_gap_ms: f64,
    /// When it began (the reply before it), seconds since the start.
    pub longest_gap_start_s: f64,
    /// Time since the last reply (or since the start), ms.
    pub since_last_reply_ms: f64,
    /// The caller's marks.
    pub marks: Vec<MarkReport>,
    /// All violations counted.
    pub violations: u64,
    /// The first ones, in full.
    pub first_violations: Vec<Violation>,
    /// Each verification, the one at the stop last.
    pub verifies: Vec<VerifyReport>,
    /// The check of the whole history, when the generator stopped (`None`
    /// in a report so far, or without a history).
    pub linearizability: Option<Linearizability>,
}

/// What the linearizability check of the whole history found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LinVerdict {
    /// Linearizable: every key decided.
    Yes,
    /// Not linearizable.
    No,
    /// No violation, but the search ran out of its budget on some keys.
    Undecided,
}

/// The linearizability check of the history ([`crate::linearize`]).
#[derive(Debug, Clone, Serialize)]
pub struct Linearizability {
    /// Its verdict.
    pub verdict: LinVerdict,
    /// Operations recorded (failed ones and unknown GETs, in it, are not
    /// used by the check).
    pub ops: u64,
    /// Keys.
    pub keys: u64,
    /// Operations not recorded (past [`Config::history_limit`]): the check
    /// covers the ones before.
    pub dropped: u64,
    /// One line: `linearizable: yes (N ops, K keys)`, or the violation.
    pub line: String,
    /// A violation's smallest failing sub-history, one operation a line.
    pub detail: Vec<String>,
    /// How long the check took, ms.
    pub took_ms: f64,
}

impl Report {
    /// No violation, every verification read back every key, and the
    /// history (if checked) not found non-linearizable.
    pub fn ok(&self) -> bool {
        self.violations == 0
            && self.verifies.iter().all(VerifyReport::ok)
            && self
                .linearizability
                .as_ref()
                .is_none_or(|l| l.verdict != LinVerdict::No)
    }

    /// Whether the check of the whole history ran out of its budget on
    /// some key (no violation found, not every key decided).
    pub fn undecided(&self) -> bool {
        self.linearizability
            .as_ref()
            .is_some_and(|l| l.verdict == LinVerdict::Undecided)
    }

    /// The report as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A human summary, several lines.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let c = &self.counts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadgen client {:#018x} -> {}, {:.1} s",
            self.client, self.target, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "requests: {} sent, {} acked ({} PUT, {} GET), {} retries, {} error replies, \
             {} outstanding; {:.0} req/s",
            c.sent,
            c.acked,
            c.puts_acked,
            c.gets_acked,
            c.retries,
            c.error_replies,
            self.outstanding,
            self.requests_per_s
        );
        let _ = writeln!(
            s,
            "other datagrams: {} duplicate, {} mismatched, {} foreign, {} malformed, {} from \
             another address; {} send errors",
            c.duplicate_replies,
            c.mismatched_replies,
            c.foreign_replies,
            self.malformed,
            self.wrong_source,
            self.send_errors
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} replies)",
            l.p50_ms, l.p99_ms, l.max_ms, l.count
        );
        let _ = writeln!(
            s,
            "longest gap between replies: {:.1} ms from {:.3} s; {:.1} ms since the last reply",
            self.longest_gap_ms, self.longest_gap_start_s, self.since_last_reply_ms
        );
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.3}{unit}"));
        for m in &self.marks {
            let _ = writeln!(
                s,
                "mark {:?} at {:.3} s: last reply before {}, first after {}, gap {}",
                m.label,
                m.at_s,
                opt(m.last_reply_before_s, " s"),
                opt(m.first_reply_after_s, " s"),
                opt(m.gap_ms, " ms")
            );
        }
        for v in &self.verifies {
            let _ = writeln!(
                s,
                "verify at {:.3} s: {}/{} acknowledged keys read back, {} violations, {} errors, \
                 {} unresolved ({:.0} ms){}",
                v.at_s,
                v.checked,
                v.keys,
                v.violations,
                v.errors,
                v.unresolved,
                v.took_ms,
                if v.ok() { "" } else { "  FAILED" }
            );
        }
        let _ = writeln!(s, "violations: {}", self.violations);
        for v in &self.first_violations {
            let _ = writeln!(
                s,
                "  {:?} key {} req {} at {:.3} s: {}",
                v.kind, v.key, v.req, v.at_s, v.detail
            );
        }
        if let Some(l) = &self.linearizability {
            let _ = writeln!(s, "{} [checked in {:.0} ms]", l.line, l.took_ms);
            for d in &l.detail {
                let _ = writeln!(s, "  {d}");
            }
        }
        s
    }
}

#[derive(Debug, Clone)]
struct Mark {
    label: String,
    at: Duration,
    last_before: Option<Duration>,
    first_after: Option<Duration>,
    /// The longest time between consecutive replies from `last_before` on,
    /// within [`MARK_WINDOW`] after the mark: a reply already on its way at
    /// the mark does not hide the outage behind it.
    longest: Duration,
    /// The last reply folded into `longest`.
    prev: Option<Duration>,
}

/// How long after a mark its gap is tracked.
const MARK_WINDOW: Duration = Duration::from_secs(10);

impl Mark {
    fn fold(&mut self, reply: Duration) {
        if reply <= self.at || reply > self.at + MARK_WINDOW {
            return;
        }
        let prev = self.prev.or(self.last_before).unwrap_or(self.at);
        self.longest = self.longest.max(reply.saturating_sub(prev));
        self.prev = Some(reply);
        self.first_after.get_or_insert(reply);
    }
}

/// Reply times kept to place marks made for a past instant.
const RECENT_REPLIES: usize = 4096;

/// State shared between the generator's thread and its handle.
struct Core {
    checker: Checker,
    start: Instant,
    client: u64,
    target: SocketAddr,
    malformed: u64,
    wrong_source: u64,
    send_errors: u64,
    latency: Histogram,
    last_reply: Option<Duration>,
    recent: VecDeque<Duration>,
    longest_gap: Duration,
    longest_gap_start: Duration,
    marks: Vec<Mark>,
    verifies: Vec<VerifyReport>,
    history: history::Recorder,
    history_limit: usize,
    fresh: bool,
}

impl Core {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn reply_seen(&mut self, at: Duration) {
        let prev = self.last_reply.unwrap_or_default();
        let gap = at.saturating_sub(prev);
        if gap > self.longest_gap {
            self.longest_gap = gap;
            self.longest_gap_start = prev;
        }
        self.last_reply = Some(at);
        if self.recent.len() == RECENT_REPLIES {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
        for m in self.marks.iter_mut() {
            m.fold(at);
        }
    }

    fn mark(&mut self, label: String, at: Duration) {
        let last_before = self.recent.iter().rev().find(|&&t| t <= at).copied();
        let mut m = Mark {
            label,
            at,
            last_before,
            first_after: None,
            longest: Duration::ZERO,
            prev: None,
        };
        for &t in self.recent.iter().filter(|&&t| t > at) {
            m.fold(t);
        }
        self.marks.push(m);
    }

    fn report(&self) -> Report {
        let now = self.now();
        let counts = self.checker.counts();
        let s = |d: Duration| d.as_secs_f64();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Report {
            client: self.client,
            target: self.target.to_string(),
            elapsed_s: s(now),
            counts,
            malformed: self.malformed,
            wrong_source: self.wrong_source,
            send_errors: self.send_errors,
            outstanding: self.checker.pending() as u64,
            requests_per_s: if now.is_zero() {
                0.0
            } else {
                counts.acked as f64 / s(now)
            },
            latency: Latency {
                count: self.latency.total,
                p50_ms: self.latency.quantile_ms(0.5),
                p99_ms: self.latency.quantile_ms(0.99),
                max_ms: self.latency.max_us as f64 / 1000.0,
            },
            longest_gap_ms: ms(self.longest_gap),
            longest_gap_start_s: s(self.longest_gap_start),
            since_last_reply_ms: ms(now.saturating_sub(self.last_reply.unwrap_or_default())),
            marks: self
                .marks
                .iter()
                .map(|m| MarkReport {
                    label: m.label.clone(),
                    at_s: s(m.at),
                    last_reply_before_s: m.last_before.map(s),
                    first_reply_after_s: m.first_after.map(s),
                    gap_ms: m.first_after.map(|_| ms(m.longest)),
                    after_mark_ms: m.first_after.map(|f| ms(f.saturating_sub(m.at))),
                })
                .collect(),
            violations: self.checker.violation_count(),
            first_violations: self.checker.violations().to_vec(),
            verifies: self.verifies.clone(),
            linearizability: None,
        }
    }

    /// Checks the whole history (none recorded: `None`).
    fn linearize(&self) -> Option<Linearizability> {
        if self.history_limit == 0 {
            return None;
        }
        let h = self.history.history();
        let config = linearize::Config {
            init: if self.fresh {
                linearize::Init::Absent
            } else {
                linearize::Init::Any
            },
            ..linearize::Config::for_history(h.len())
        };
        let t = Instant::now();
        let r = linearize::check_with(&h, &config);
        let took_ms = t.elapsed().as_secs_f64() * 1000.0;
        let dropped = self.history.dropped();
        let cut = if dropped > 0 {
            format!(
                " [the first {} operations: {dropped} more not recorded, past the history limit]",
                h.len()
            )
        } else {
            String::new()
        };
        let mut keys: Vec<u64> = h.iter().map(|o| o.key).collect();
        keys.sort_unstable();
        keys.dedup();
        let (verdict, line, detail) = match r {
            Ok(r) if r.complete() => (LinVerdict::Yes, r.to_string(), Vec::new()),
            Ok(r) => (LinVerdict::Undecided, r.to_string(), Vec::new()),
            Err(v) => {
                let mut line = v.line();
                if v.init == linearize::Init::Absent {
                    line.push_str(", the key absent at the start");
                }
                (
                    LinVerdict::No,
                    line,
                    v.ops.iter().map(|o| o.to_string()).collect(),
                )
            }
        };
        Some(Linearizability {
            verdict,
            ops: h.len() as u64,
            keys: keys.len() as u64,
            dropped,
            line: line + &cut,
            detail,
            took_ms,
        })
    }

    /// The final report, with the history's check.
    fn final_report(&self) -> Report {
        let mut r = self.report();
        r.linearizability = self.linearize();
        r
    }
}

enum Cmd {
    Verify(mpsc::Sender<VerifyReport>),
    Stop,
}

/// The load generator.
pub struct Loadgen;

impl Loadgen {
    /// Starts the generator on a thread of its own (moved into
    /// `config.netns` if set) and returns once its socket is bound.
    pub fn start(config: Config) -> Result<Handle> {
        config.validate()?;
        let client = loop {
            let c: u64 = rand::rng().random();
            if c != 0 {
                break c;
            }
        };
        let start = Instant::now();
        let core = Arc::new(Mutex::new(Core {
            checker: Checker::new(client, config.keys, config.keep_violations),
            start,
            client,
            target: config.target,
            malformed: 0,
            wrong_source: 0,
            send_errors: 0,
            latency: Histogram::new(),
            last_reply: None,
            recent: VecDeque::with_capacity(RECENT_REPLIES),
            longest_gap: Duration::ZERO,
            longest_gap_start: Duration::ZERO,
            marks: Vec::new(),
            verifies: Vec::new(),
            history: history::Recorder::new(config.history_limit),
            history_limit: config.history_limit,
            fresh: config.fresh,
        }));
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let core2 = core.clone();
        let thread = std::thread::Builder::new()
            .name("loadgen".into())
            .spawn(move || {
                let socket = match open_socket(&config) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(s.local_addr().ok()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                Runner::new(config, socket, core2, cmd_rx, client).run();
            })
            .context("spawning the load generator's thread")?;
        let local = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                bail!("the load generator's thread died while starting");
            }
        };
        Ok(Handle {
            core,
            cmd: cmd_tx,
            thread: Some(thread),
            start,
            local,
            client,
        })
    }
}

fn open_socket(config: &Config) -> Result<UdpSocket> {
    if let Some(ns) = &config.netns {
        crate::netlab::enter_netns(ns)?;
    }
    let any: SocketAddr = match config.target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).with_context(|| format!("binding a UDP socket on {any}"))?;
    Ok(s)
}

/// A running load generator.
pub struct Handle {
    core: Arc<Mutex<Core>>,
    cmd: mpsc::Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
    start: Instant,
    local: Option<SocketAddr>,
    client: u64,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handle {
    /// The report so far (the run goes on).
    pub fn report_so_far(&self) -> Report {
        lock(&self.core).report()
    }

    /// Marks an event now (e.g. "killed the primary"); the report gives the
    /// last reply before it and the first after.
    pub fn mark(&self, label: impl Into<String>) {
        self.mark_at(label, Instant::now());
    }

    /// Marks an event that happened at `at` (recent: the last
    /// 4096 replies are kept to place it).
    pub fn mark_at(&self, label: impl Into<String>, at: Instant) {
        let at = at.saturating_duration_since(self.start);
        lock(&self.core).mark(label.into(), at);
    }

    /// Stops sending new requests, waits for the outstanding ones (up to
    /// the drain timeout), reads back every acknowledged key, and resumes.
    /// Blocks until done.
    pub fn verify_all(&self) -> Result<VerifyReport> {
        let (tx, rx) = mpsc::channel();
        self.cmd
            .send(Cmd::Verify(tx))
            .map_err(|_| anyhow!("the load generator has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow!("the load generator stopped during the verification"))
    }

    /// When the generator started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// The socket's local address (in the generator's namespace).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// This run's client id.
    pub fn client(&self) -> u64 {
        self.client
    }

    /// Whether the generator has finished (its duration passed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops: drains the outstanding requests, verifies every acknowledged
    /// key if configured, checks the whole history for linearizability,
    /// and returns the final report.
    pub fn stop(mut self) -> Report {
        self.finish()
    }

    /// Waits for a generator with a duration to finish by itself.
    pub fn wait(mut self) -> Report {
        self.join();
        lock(&self.core).final_report()
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// [`Handle::stop`], and the whole history recorded: what the check at
    /// the stop saw, the drain and the final verification included.
    pub fn stop_with_history(mut self) -> (Report, Vec<linearize::Op>) {
        let report = self.finish();
        let history = lock(&self.core).history.history();
        (report, history)
    }

    /// [`Handle::wait`], and the whole history recorded.
    pub fn wait_with_history(mut self) -> (Report, Vec<linearize::Op>) {
        self.join();
        let core = lock(&self.core);
        let report = core.final_report();
        (report, core.history.history())
    }

    /// The history recorded so far (for [`crate::linearize::check`]).
    pub fn history(&self) -> Vec<linearize::Op> {
        lock(&self.core).history.history()
    }

    fn finish(&mut self) -> Report {
        let _ = self.cmd.send(Cmd::Stop);
        self.join();
        lock(&self.core).final_report()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Stops (drains, verifies) without the history's check: nobody
        // would read it.
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Outstanding {
    q: Request,
    next_retry: Instant,
    verify: bool,
}

enum Mode {
    Running,
    /// No new requests; waiting for the outstanding ones.
    Draining {
        until: Instant,
    },
    Verifying {
        queue: Vec<u64>,
        deadline: Instant,
        started: Instant,
        report: VerifyReport,
    },
}

struct Runner {
    config: Config,
    socket: UdpSocket,
    core: Arc<Mutex<Core>>,
    cmds: mpsc::Receiver<Cmd>,
    client: u64,
    out: Vec<Outstanding>,
    busy: Vec<bool>,
    next_req: u64,
    next_send: Instant,
    stopping: bool,
    waiters: Vec<mpsc::Sender<VerifyReport>>,
    mode: Mode,
    rng: rand::rngs::ThreadRng,
}

impl Runner {
    fn new(
        config: Config,
        socket: UdpSocket,
        core: Arc<Mutex<Core>>,
        cmds: mpsc::Receiver<Cmd>,
        client: u64,
    ) -> Runner {
        let keys = config.keys as usize;
        Runner {
            config,
            socket,
            core,
            cmds,
            client,
            out: Vec::new(),
            busy: vec![false; keys + 1],
            next_req: 1,
            next_send: Instant::now(),
            stopping: false,
            waiters: Vec::new(),
            mode: Mode::Running,
            rng: rand::rng(),
        }
    }

    fn run(mut self) {
        let start = lock(&self.core).start;
        let end = self.config.duration.map(|d| start + d);
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Verify(tx)) => self.waiters.push(tx),
                    Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => self.stopping = true,
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if end.is_some_and(|e| now >= e) {
                self.stopping = true;
            }
            if self.advance(now) {
                break;
            }
            self.send_new(now);
            self.retry(now);
            // Sleep in recv until the next send, retry or command check (a
            // command waits 5 ms at most).
            let mut wake = now + Duration::from_millis(5);
            if matches!(self.mode, Mode::Running) && self.out.len() < self.config.concurrency {
                wake = wake.min(self.next_send);
            }
            if let Some(r) = self.out.iter().map(|o| o.next_retry).min() {
                wake = wake.min(r);
            }
            let wait = wake
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(100));
            let _ = self.socket.set_read_timeout(Some(wait));
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.on_datagram(&buf[..n], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // E.g. an ICMP error reported on the socket: not fatal.
                    tracing::debug!("loadgen recv: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        for w in self.waiters.drain(..) {
            drop(w);
        }
    }

    /// Moves between running, draining and verifying, as far as it can
    /// now; true when done.
    fn advance(&mut self, now: Instant) -> bool {
        loop {
            let before = std::mem::discriminant(&self.mode);
            if self.advance_once(now) {
                return true;
            }
            if std::mem::discriminant(&self.mode) == before {
                return false;
            }
        }
    }

    fn advance_once(&mut self, now: Instant) -> bool {
        match &mut self.mode {
            Mode::Running => {
                if self.stopping || !self.waiters.is_empty() {
                    self.mode = Mode::Draining {
                        until: now + self.config.drain_timeout,
                    };
                }
                false
            }
            Mode::Draining { until } => {
                if !self.out.is_empty() && now < *until {
                    return false;
                }
                let verify = !self.waiters.is_empty() || self.config.verify_on_stop;
                if self.stopping && !verify {
                    return true;
                }
                let core = lock(&self.core);
                let at = core.now();
                let mut unresolved = 0;
                let queue: Vec<u64> = core
                    .checker
                    .acked_keys()
                    .filter(|&k| {
                        let b = self.busy[k as usize];
                        unresolved += b as u64;
                        !b
                    })
                    .collect();
                drop(core);
                let report = VerifyReport {
                    at_s: at.as_secs_f64(),
                    keys: queue.len() as u64 + unresolved,
                    unresolved,
                    ..VerifyReport::default()
                };
                self.mode = Mode::Verifying {
                    queue,
                    deadline: now + self.config.verify_timeout,
                    started: now,
                    report,
                };
                false
            }
            Mode::Verifying {
                queue,
                deadline,
                started,
                report,
            } => {
                let left = self.out.iter().filter(|o| o.verify).count() as u64;
                if !(queue.is_empty() && left == 0) && now < *deadline {
                    return false;
                }
                let mut report = std::mem::take(report);
                report.unresolved += queue.len() as u64 + left;
                report.took_ms = now.duration_since(*started).as_secs_f64() * 1000.0;
                // Verification GETs still outstanding are abandoned.
                let mut core = lock(&self.core);
                let busy = &mut self.busy;
                self.out.retain(|o| {
                    if o.verify {
                        core.checker.abandon(o.q.req);
                        busy[o.q.key as usize] = false;
                    }
                    !o.verify
                });
                core.verifies.push(report.clone());
                drop(core);
                for w in self.waiters.drain(..) {
                    let _ = w.send(report.clone());
                }
                if self.stopping {
                    return true;
                }
                self.mode = Mode::Running;
                self.next_send = now;
                false
            }
        }
    }

    fn pick_key(&mut self) -> Option<u64> {
        let keys = self.config.keys;
        for _ in 0..16 {
            let k = self.rng.random_range(1..=keys);
            if !self.busy[k as usize] {
                return Some(k);
            }
        }
        let s = self.rng.random_range(1..=keys);
        (0..keys)
            .map(|i| (s - 1 + i) % keys + 1)
            .find(|&k| !self.busy[k as usize])
    }

    fn send_new(&mut self, now: Instant) {
        let period = if self.config.rate > 0.0 {
            Some(Duration::from_secs_f64(1.0 / self.config.rate))
        } else {
            None
        };
        match &mut self.mode {
            Mode::Running => {
                // Do not make up more than a second of lost sending.
                if now.saturating_duration_since(self.next_send) > Duration::from_secs(1) {
                    self.next_send = now;
                }
                while self.out.len() < self.config.concurrency
                    && (period.is_none() || self.next_send <= now)
                {
                    let Some(key) = self.pick_key() else { break };
                    let put = self.rng.random_bool(self.config.put_ratio);
                    let (op, value) = if put {
                        (Op::Put, self.rng.random())
                    } else {
                        (Op::Get, 0)
                    };
                    self.send_first(op, key, value, false, now);
                    match period {
                        Some(p) => self.next_send += p,
                        None => self.next_send = now,
                    }
                }
            }
            Mode::Verifying { queue, .. } => {
                let mut keys = Vec::new();
                while self.out.len() + keys.len() < self.config.concurrency {
                    match queue.pop() {
                        Some(k) => keys.push(k),
                        None => break,
                    }
                }
                for k in keys {
                    self.send_first(Op::Get, k, 0, true, now);
                }
            }
            Mode::Draining { .. } => {}
        }
    }

    fn send_first(&mut self, op: Op, key: u64, value: u64, verify: bool, now: Instant) {
        let q = Request {
            op,
            client: self.client,
            req: self.next_req,
            key,
            value,
        };
        self.next_req += 1;
        let mut core = lock(&self.core);
        let at = core.now();
        if core.checker.on_send(&q, at) != SendOutcome::First {
            return;
        }
        core.history.sent(&q, at);
        drop(core);
        self.busy[key as usize] = true;
        self.out.push(Outstanding {
            q,
            next_retry: now + self.config.timeout,
            verify,
        });
        self.transmit(&q);
    }

    fn transmit(&mut self, q: &Request) {
        if let Err(e) = self.socket.send_to(&q.encode(), self.config.target) {
            tracing::debug!("loadgen send to {}: {e}", self.config.target);
            lock(&self.core).send_errors += 1;
        }
    }

    fn retry(&mut self, now: Instant) {
        let due: Vec<Request> = self
            .out
            .iter_mut()
            .filter(|o| o.next_retry <= now)
            .map(|o| {
                o.next_retry = now + self.config.timeout;
                o.q
            })
            .collect();
        for q in due {
            let mut core = lock(&self.core);
            let at = core.now();
            core.checker.on_send(&q, at);
            drop(core);
            self.transmit(&q);
        }
    }

    fn on_datagram(&mut self, b: &[u8], from: SocketAddr) {
        let mut core = lock(&self.core);
        let at = core.now();
        let r = match Reply::decode(b) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("loadgen: malformed datagram from {from}: {e}");
                core.malformed += 1;
                return;
            }
        };
        if from != self.config.target {
            core.wrong_source += 1;
            return;
        }
        match core.checker.on_reply(&r, at) {
            ReplyOutcome::Completed {
                key,
                status,
                latency,
                violations,
                ..
            } => {
                core.history.completed(&r, at);
                core.reply_seen(at);
                core.latency.record(latency);
                let verify = self
                    .out
                    .iter()
                    .position(|o| o.q.req == r.req)
                    .map(|i| self.out.swap_remove(i).verify);
                if let Some(b) = self.busy.get_mut(key as usize) {
                    *b = false;
                }
                if verify == Some(true) {
                    if let Mode::Verifying { report, .. } = &mut self.mode {
                        if status == STATUS_OK {
                            report.checked += 1;
                        } else {
                            report.errors += 1;
                        }
                        report.violations += u64::from(violations);
                    }
                }
            }
            ReplyOutcome::Duplicate { .. } => {
                core.history.duplicate(&r, at);
                core.reply_seen(at);
            }
            ReplyOutcome::Mismatched | ReplyOutcome::Foreign => {}
        }
    }
}

/// `castor loadgen`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// The guest's key-value service (UDP).
    #[arg(long, default_value = "10.77.0.2:7000")]
    pub target: SocketAddr,
    /// Run inside this network namespace (`castor net up` makes
    /// castor-client); default: the current one.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Requests per second (new requests, retries not counted); 0: as fast
    /// as --concurrency allows.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Keys 1..=KEYS, chosen at random.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Fraction of requests that are PUTs (of a fresh random value); the
    /// rest are GETs.
    #[arg(long, default_value_t = 0.5)]
    pub put_ratio: f64,
    /// How long to send (e.g. 500ms, 10s, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Resend a request with the same id when it has no reply after this
    /// many milliseconds.
    #[arg(long, default_value_t = 50)]
    pub timeout_ms: u64,
    /// Requests outstanding at most (and at most one per key).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// At the end, wait this long at most for outstanding replies.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub drain_timeout: Duration,
    /// Do not read back every acknowledged key at the end.
    #[arg(long)]
    pub no_verify: bool,
    /// Record at most this many operations for the linearizability check
    /// of the whole history at the end (about 80 bytes each); 0: none.
    #[arg(long, default_value_t = 4_000_000)]
    pub history_limit: usize,
    /// The service started empty: the history check then takes every key
    /// as absent before the first PUT (otherwise a key's first read gives
    /// its starting value).
    #[arg(long)]
    pub fresh: bool,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Write the recorded history here at the end, one operation a line as
    /// JSON (`castor linearize FILE` checks it again).
    #[arg(long, value_name = "FILE")]
    pub history_out: Option<std::path::PathBuf>,
}

impl LoadgenArgs {
    /// The generator's settings.
    pub fn config(&self) -> Config {
        Config {
            target: self.target,
            netns: self.netns.clone(),
            rate: self.rate,
            keys: self.keys,
            put_ratio: self.put_ratio,
            duration: Some(self.duration),
            timeout: Duration::from_millis(self.timeout_ms),
            concurrency: self.concurrency,
            drain_timeout: self.drain_timeout,
            verify_on_stop: !self.no_verify,
            history_limit: self.history_limit,
            fresh: self.fresh,
            ..Config::default()
        }
    }
}

/// Runs `castor loadgen`: prints the report, fails if it found a violation,
/// a history that is not linearizable, or could not read back every
/// acknowledged key.
pub fn loadgen(args: LoadgenArgs) -> Result<()> {
    let handle = Loadgen::start(args.config())?;
    let report = match &args.history_out {
        None => handle.wait(),
        Some(path) => {
            let (report, history) = handle.wait_with_history();
            write_history(path, &history)?;
            eprintln!(
                "history: {} operations in {}",
                history.len(),
                path.display()
            );
            report
        }
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    if report.violations > 0 {
        bail!(
            "{} violations: acknowledged writes lost or replies from lost state",
            report.violations
        );
    }
    if let Some(l) = report
        .linearizability
        .as_ref()
        .filter(|l| l.verdict == LinVerdict::No)
    {
        bail!("the history is not linearizable: {}", l.line);
    }
    if !report.ok() {
        bail!("the verification could not read back every acknowledged key");
    }
    if report.counts.acked == 0 {
        bail!(
            "no reply from {} (is the service up and reachable?)",
            args.target
        );
    }
    Ok(())
}

/// Writes a history, one operation a line as JSON.
pub fn write_history(path: &std::path::Path, ops: &[linearize::Op]) -> Result<()> {
    use std::io::Write as _;
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    for o in ops {
        serde_json::to_writer(&mut w, o)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a history written by [`write_history`]; a line that is not an
/// operation is an error naming it.
pub fn read_history(path: &std::path::Path) -> Result<Vec<linearize::Op>> {
    use std::io::BufRead as _;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut ops = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let op: linearize::Op = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not an operation of a history: {}",
                path.display(),
                n + 1,
                snippet(&line)
            )
        })?;
        ops.push(op);
    }
    Ok(ops)
}

fn snippet(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// `castor linearize`: check a recorded key-value history again.
#[derive(clap::Args, Debug, Clone)]
pub struct LinearizeArgs {
    /// The history: one operation a line as JSON, as `castor loadgen
    /// --history-out` and a drill's `client-history.jsonl` write it.
    pub file: std::path::PathBuf,
    /// The service started empty: every key is absent before its first
    /// PUT (otherwise a key's first read gives its starting value).
    #[arg(long)]
    pub fresh: bool,
    /// Model steps the search may take per key before the key is
    /// undecided.
    #[arg(long, default_value_t = linearize::Config::default().max_steps_per_key)]
    pub max_steps_per_key: u64,
    /// Model steps in all; once spent, the keys left are undecided
    /// (default: 100 per operation, and at least the library's default and
    /// --max-steps-per-key).
    #[arg(long)]
    pub max_steps: Option<u64>,
}

/// Runs `castor linearize`: prints the verdict; fails if the history is not
/// linearizable. For undecided keys it prints their shape: operations, PUTs
/// of unknown outcome, and the most operations open at one instant.
pub fn linearize_file(a: LinearizeArgs) -> Result<()> {
    let h = read_history(&a.file)?;
    let base = linearize::Config::for_history(h.len());
    let config = linearize::Config {
        init: if a.fresh {
            linearize::Init::Absent
        } else {
            linearize::Init::Any
        },
        max_steps_per_key: a.max_steps_per_key,
        max_steps: a
            .max_steps
            .unwrap_or(base.max_steps.max(a.max_steps_per_key)),
        ..base
    };
    let t = Instant::now();
    let r = linearize::check_with(&h, &config);
    let took = t.elapsed();
    match r {
        Ok(r) => {
            println!("{r}");
            println!(
                "  {} operations checked, {} PUTs of unknown outcome ({} never read: left out), {} reads implied by another (left out), {} model steps, {:.1} s",
                r.checked,
                r.unknown_puts,
                r.unread_unknown_puts,
                r.implied_reads,
                r.steps,
                took.as_secs_f64()
            );
            for &k in r.undecided.iter().take(20) {
                println!("  undecided key {k}: {}", key_shape(&h, k));
            }
            Ok(())
        }
        Err(v) => {
            println!("{v}");
            bail!("the history is not linearizable: {}", v.line())
        }
    }
}

/// A key's operations (those the check uses: not failed ones, not GETs of
/// unknown outcome), its PUTs of unknown outcome, and the most of those
/// operations open at one instant (an unknown PUT open from its invoke on).
fn key_shape(h: &[linearize::Op], key: u64) -> String {
    let ops: Vec<&linearize::Op> = h.iter().filter(|o| o.key == key && o.counts()).collect();
    let unknown = ops
        .iter()
        .filter(|o| o.outcome == linearize::Outcome::Unknown)
        .count();
    let mut ev: Vec<(u64, i32)> = Vec::with_capacity(2 * ops.len());
    for o in &ops {
        ev.push((o.invoke, 1));
        ev.push((o.ret_time().saturating_add(1), -1));
    }
    ev.sort_unstable();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, d) in ev {
        open += d;
        most = most.max(open);
    }
    format!(
        "{} operations checked, {unknown} PUTs of unknown outcome, at most {most} open at once",
        ops.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_is_written_and_read_back_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.jsonl");
        let ops = vec![
            linearize::Op::put(1, 5, 0xaa, 10, 20),
            linearize::Op::put_unknown(2, 5, 0xbb, 15),
            linearize::Op::get(1, 5, Some(0xaa), 30, 40),
        ];
        write_history(&p, &ops).unwrap();
        assert_eq!(read_history(&p).unwrap(), ops);
        std::fs::write(&p, "{\"client\":1}\n").unwrap();
        let e = format!("{:#}", read_history(&p).unwrap_err());
        assert!(e.contains("line 1: not an operation"), "{e}");
        let e = format!("{:#}", read_history(&dir.path().join("none")).unwrap_err());
        assert!(e.contains("cannot open"), "{e}");
    }

    #[test]
    fn histogram_quantiles_within_a_few_percent() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile_ms(0.5), 0.0);
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_ms(0.5);
        let p99 = h.quantile_ms(0.99);
        assert!((p50 - 5.0).abs() / 5.0 < 0.04, "{p50}");
        assert!((p99 - 9.9).abs() / 9.9 < 0.04, "{p99}");
        assert_eq!(h.quantile_ms(1.0), 10.0);
        h.record(Duration::from_secs(1 << 40));
        assert!(h.quantile_ms(1.0) > 1e9);
        for us in [0u64, 63, 64, 65, 1000, u64::MAX] {
            let i = Histogram::index(us);
            assert!(i < h.counts.len(), "{us}");
            assert!(Histogram::value(i) <= us as f64 * 1.04 + 1.0);
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        for c in [
            Config {
                keys: 0,
                ..Config::default()
            },
            Config {
                put_ratio: 1.5,
                ..Config::default()
            },
            Config {
                concurrency: 0,
                ..Config::default()
            },
            Config {
                rate: f64::NAN,
                ..Config::default()
            },
        ] {
            assert!(Loadgen::start(c).is_err());
        }
    }
}
