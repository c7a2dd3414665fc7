//! Packet-level faults on the replication path, in user space: loss,
//! duplication and reordering of the UDP datagrams a node **sends** — the
//! QUIC connection's packets and the heartbeat datagrams alike
//! (`--link-faults`).
//!
//! Where: each daemon impairs what it sends, nothing it receives. With the
//! same `--link-faults` on both daemons both directions are impaired; on one
//! daemon, one direction. Every datagram offered to an impaired socket meets
//! one fate, drawn independently of the others:
//! - **lost** with probability `loss`: it is not sent;
//! - **duplicated** with probability `dup`: it is sent twice, back to back;
//! - **reordered** with probability `reorder`: it is held back and sent
//!   after the next 1 to 3 datagrams of the same socket (drawn), or once
//!   `hold` has passed (3 ms by default) if fewer follow — so on a quiet
//!   socket (heartbeats) it is merely late;
//! - otherwise sent as it comes.
//!
//! The fates exclude each other, so the three probabilities add up to at
//! most 100 %.
//!
//! QUIC: the endpoint gets its own [`quinn::AsyncUdpSocket`] wrapping the
//! runtime's socket. It asks quinn for one datagram per transmit (no GSO
//! batches), so every segment meets its own fate; a batch that comes anyway
//! is split into its segments. Receiving (GRO included) is the inner
//! socket's, untouched. Without faults the endpoint is made exactly as
//! before, with no wrapper: the normal path does not change.
//!
//! Seeds: the fates come from splitmix64 — the same generator as
//! `node::rng` (transport does not depend on `node`, which pulls in the
//! VMM: this is a copy of its dozen lines, and a seed gives the same
//! sequence). A daemon draws one seed at start-up unless given `seed=N`,
//! and logs it; every impaired socket it opens gets its own stream, numbered
//! in the order the sockets are made (`#0`, `#1`, …), derived from that
//! seed. A run replays roughly from its seed: the fates of each socket's
//! n-th datagram are the same, though timing decides which datagrams those
//! are.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tracing::{debug, info};

/// Probabilities are kept in parts per million.
const PPM: u32 = 1_000_000;

/// How long a reordered datagram is held at most, unless `hold=` says.
pub const DEFAULT_HOLD: Duration = Duration::from_millis(3);

/// A reordered datagram goes after at most this many later ones.
pub const MAX_OVERTAKEN: u64 = 3;

/// What happens to the datagrams a node sends (`--link-faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFaults {
    /// Chance that a datagram is lost, in parts per million.
    pub loss_ppm: u32,
    /// Chance that a datagram is sent twice, in parts per million.
    pub dup_ppm: u32,
    /// Chance that a datagram is held back behind later ones, in parts per
    /// million.
    pub reorder_ppm: u32,
    /// The longest a reordered datagram is held.
    pub hold: Duration,
    /// The generator's seed; `None`: drawn at start-up ([`Self::resolved`]).
    pub seed: Option<u64>,
}

impl Default for LinkFaults {
    fn default() -> Self {
        LinkFaults::NONE
    }
}

impl LinkFaults {
    /// No faults: every datagram goes out once, in order.
    pub const NONE: LinkFaults = LinkFaults {
        loss_ppm: 0,
        dup_ppm: 0,
        reorder_ppm: 0,
        hold: DEFAULT_HOLD,
        seed: None,
    };

    /// Whether any datagram may be lost, duplicated or reordered.
    pub fn is_active(&self) -> bool {
        self.loss_ppm > 0 || self.dup_ppm > 0 || self.reorder_ppm > 0
    }

    /// The same faults with a seed: the given one, else one drawn from the
    /// clock and the process id (to be logged, for a replay).
    pub fn resolved(self) -> LinkFaults {
        if self.seed.is_some() || !self.is_active() {
            return self;
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut r = Rng::new(t ^ (u64::from(std::process::id()) << 32));
        LinkFaults {
            seed: Some(r.next_u64()),
            ..self
        }
    }

    /// Parses `none`, or comma-separated `KEY=VALUE`s:
    /// `loss=P%`, `dup=P%`, `reorder=P%` (percentages from 0 to 100, the
    /// `%` optional, adding up to at most 100), `hold=DURATION` (the longest
    /// a reordered datagram is held: `3ms`, `500us`, `1s`, a bare number is
    /// milliseconds; at most 1 s) and `seed=N` (decimal or 0x hex).
    pub fn parse(s: &str) -> Result<LinkFaults, String> {
        let t = s.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("none") {
            return Ok(LinkFaults::NONE);
        }
        let mut f = LinkFaults::NONE;
        let mut seen: Vec<&str> = Vec::new();
        for item in t.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!(
                    "'{item}': expected KEY=VALUE (keys: loss, dup, reorder, hold, seed), e.g. loss=2%,dup=1%,reorder=5%"
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(format!("'{key}' is given twice"));
            }
            match key {
                "loss" => f.loss_ppm = parse_percent(key, value)?,
                "dup" => f.dup_ppm = parse_percent(key, value)?,
                "reorder" => f.reorder_ppm = parse_percent(key, value)?,
                "hold" => f.hold = parse_hold(value)?,
                "seed" => f.seed = Some(parse_seed(value)?),
                other => {
                    return Err(format!(
                        "unknown key '{other}' (keys: loss, dup, reorder, hold, seed)"
                    ))
                }
            }
            seen.push(key);
        }
        let sum = u64::from(f.loss_ppm) + u64::from(f.dup_ppm) + u64::from(f.reorder_ppm);
        if sum > u64::from(PPM) {
            return Err(format!(
                "loss, dup and reorder add up to {}%: a datagram meets one of them at most, so together at most 100%",
                Percent(sum)
            ));
        }
        Ok(f)
    }

    /// The fate of one datagram, from a draw.
    fn fate(&self, rng: &mut Rng) -> Fate {
        let u = rng.below(u64::from(PPM));
        let (l, d, r) = (
            u64::from(self.loss_ppm),
            u64::from(self.dup_ppm),
            u64::from(self.reorder_ppm),
        );
        if u < l {
            Fate::Lost
        } else if u < l + d {
            Fate::Twice
        } else if u < l + d + r {
            Fate::Held(1 + rng.below(MAX_OVERTAKEN))
        } else {
            Fate::Sent
        }
    }
}

impl fmt::Display for LinkFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_active() {
            return write!(f, "none");
        }
        write!(
            f,
            "loss {}%, dup {}%, reorder {}% (held behind 1..={MAX_OVERTAKEN} datagrams, at most {} us)",
            Percent(self.loss_ppm.into()),
            Percent(self.dup_ppm.into()),
            Percent(self.reorder_ppm.into()),
            self.hold.as_micros()
        )?;
        if let Some(s) = self.seed {
            write!(f, ", seed {s}")?;
        }
        Ok(())
    }
}

/// Parts per million shown as a percentage (`2`, `0.5`).
struct Percent(u64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0 as f64 / 10_000.0)
    }
}

fn parse_percent(key: &str, v: &str) -> Result<u32, String> {
    let num = v.strip_suffix('%').unwrap_or(v).trim();
    let p: f64 = num
        .parse()
        .map_err(|_| format!("{key}={v}: expected a percentage such as 2% or 0.5%"))?;
    if !(p.is_finite() && (0.0..=100.0).contains(&p)) {
        return Err(format!("{key}={v}: a percentage must be between 0 and 100"));
    }
    Ok((p * 10_000.0).round() as u32)
}

fn parse_hold(v: &str) -> Result<Duration, String> {
    let err = || format!("hold={v}: expected a duration such as 3ms, 500us or 1s");
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit.trim() {
        "" | "ms" => n / 1e3,
        "us" => n / 1e6,
        "s" => n,
        _ => return Err(err()),
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 1.0) {
        return Err(format!("hold={v}: must be more than 0 and at most 1 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_seed(v: &str) -> Result<u64, String> {
    let r = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|_| format!("seed={v}: expected a 64-bit number (decimal or 0x hex)"))
}

/// splitmix64, as `node::rng::Rng` (see the module's documentation).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What becomes of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Sent,
    Lost,
    Twice,
    /// Held until this many later datagrams have gone (or the hold passed).
    Held(u64),
}

/// What an impaired socket did, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Datagrams offered to the socket (each counted once).
    pub datagrams: u64,
    /// Of which lost.
    pub lost: u64,
    /// Of which sent twice.
    pub duplicated: u64,
    /// Of which held back behind later ones.
    pub reordered: u64,
}

impl fmt::Display for FaultStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} datagrams: {} lost, {} duplicated, {} reordered",
            self.datagrams, self.lost, self.duplicated, self.reordered
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    datagrams: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

impl Counters {
    fn get(&self) -> FaultStats {
        FaultStats {
            datagrams: self.datagrams.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
        }
    }
}

/// Where an impaired socket's datagrams go for real; held ones are sent
/// through it later, from the release timer.
trait Wire: Send + Sync + 'static {
    /// A copy of a datagram, kept while it is held.
    type Owned: Send + 'static;
    fn send_owned(&self, d: &Self::Owned) -> io::Result<()>;
}

struct Held<D> {
    due: Instant,
    after: u64,
    datagram: D,
}

struct State<D> {
    rng: Rng,
    held: Vec<Held<D>>,
}

/// The faults in front of one socket.
struct Impaired<W: Wire> {
    wire: W,
    faults: LinkFaults,
    what: &'static str,
    id: u64,
    state: Mutex<State<W::Owned>>,
    counts: Counters,
}

/// Impaired sockets made by this process: each one's number.
static SOCKETS: AtomicU64 = AtomicU64::new(0);

impl<W: Wire> Impaired<W> {
    fn new(wire: W, faults: &LinkFaults, what: &'static str) -> Arc<Self> {
        let id = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let base = faults.resolved().seed.unwrap_or(0);
        // Socket #id's stream: splitmix's own step, id times over.
        let seed = base ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        debug!(what, socket = id, faults = %faults, "an impaired socket");
        Arc::new(Impaired {
            wire,
            faults: *faults,
            what,
            id,
            state: Mutex::new(State {
                rng: Rng::new(seed),
                held: Vec::new(),
            }),
            counts: Counters::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<W::Owned>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers one datagram: `send` sends it now (and may be called twice),
    /// `own` copies it to be held. An error of the first `send` (a full
    /// socket buffer: `WouldBlock`) is returned, and the datagram counts
    /// as not offered: the caller offers it again.
    fn offer(
        self: &Arc<Self>,
        send: impl Fn() -> io::Result<()>,
        own: impl FnOnce() -> W::Owned,
    ) -> io::Result<()> {
        let fate = {
            let mut s = self.state();
            self.faults.fate(&mut s.rng)
        };
        match fate {
            Fate::Lost => {
                self.counts.lost.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Sent => send()?,
            Fate::Twice => {
                send()?;
                let _ = send();
                self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Held(after) => {
                let due = Instant::now() + self.faults.hold;
                self.state().held.push(Held {
                    due,
                    after,
                    datagram: own(),
                });
                self.counts.reordered.fetch_add(1, Ordering::Relaxed);
                let me: Weak<dyn Due> = Arc::downgrade(self) as Weak<dyn Due>;
                schedule(due, me);
            }
        }
        self.counts.datagrams.fetch_add(1, Ordering::Relaxed);
        if matches!(fate, Fate::Sent | Fate::Twice) {
            // One more datagram went: the held ones it overtook may follow.
            self.release(|h| {
                h.after -= 1;
                h.after == 0
            });
        }
        Ok(())
    }

    /// Sends (and forgets) the held datagrams `go` picks. A send that fails
    /// loses the datagram.
    fn release(&self, mut go: impl FnMut(&mut Held<W::Owned>) -> bool) {
        let out: Vec<Held<W::Owned>> = {
            let mut s = self.state();
            if s.held.is_empty() {
                return;
            }
            let mut out = Vec::new();
            let mut i = 0;
            while i < s.held.len() {
                if go(&mut s.held[i]) {
                    out.push(s.held.remove(i));
                } else {
                    i += 1;
                }
            }
            out
        };
        for h in out {
            let _ = self.wire.send_owned(&h.datagram);
        }
    }

    fn stats(&self) -> FaultStats {
        self.counts.get()
    }
}

impl<W: Wire> Drop for Impaired<W> {
    fn drop(&mut self) {
        let s = self.stats();
        if s.datagrams >= 1000 {
            info!(
                what = self.what,
                socket = self.id,
                "link faults on a socket now closed: {s}"
            );
        } else {
            debug!(
                what = self.what,
                socket = self.id,
                "link faults on a socket now closed: {s}"
            );
        }
    }
}

/// Something with held datagrams that may be due.
trait Due: Send + Sync {
    fn release_due(&self, now: Instant);
}

impl<W: Wire> Due for Impaired<W> {
    fn release_due(&self, now: Instant) {
        self.release(|h| h.due <= now);
    }
}

/// A held datagram's deadline, for the release timer.
struct Job {
    at: Instant,
    seq: u64,
    of: Weak<dyn Due>,
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        // Earliest first out of the max-heap.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A held datagram's deadline and its socket, as sent to the timer.
type Deadline = (Instant, Weak<dyn Due>);

/// Asks the process's release timer (one thread, started with the first
/// held datagram) to release `of`'s due datagrams at `at`.
fn schedule(at: Instant, of: Weak<dyn Due>) {
    static TIMER: OnceLock<Mutex<mpsc::Sender<Deadline>>> = OnceLock::new();
    let tx = TIMER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("castor-link-faults".into())
            .spawn(move || timer(rx));
        Mutex::new(tx)
    });
    let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send((at, of));
}

fn timer(rx: mpsc::Receiver<Deadline>) {
    let mut jobs = BinaryHeap::<Job>::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while jobs.peek().is_some_and(|j| j.at <= now) {
            if let Some(of) = jobs.pop().and_then(|j| j.of.upgrade()) {
                of.release_due(now);
            }
        }
        let next = match jobs.peek() {
            Some(j) => rx.recv_timeout(j.at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((at, of)) => {
                seq += 1;
                jobs.push(Job { at, seq, of });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A plain UDP socket's sends (the heartbeat path).
struct StdWire(std::net::UdpSocket);

impl Wire for StdWire {
    type Owned = (Vec<u8>, SocketAddr);
    fn send_owned(&self, (buf, to): &Self::Owned) -> io::Result<()> {
        self.0.send_to(buf, *to).map(drop)
    }
}

/// Sends datagrams from a UDP socket, through the faults if there are any
/// (the heartbeat path). Without faults it is the socket's `send_to`.
pub struct DatagramSender(Sender);

enum Sender {
    Plain(std::net::UdpSocket),
    Impaired(Arc<Impaired<StdWire>>),
}

impl fmt::Debug for DatagramSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Sender::Plain(s) => f.debug_tuple("DatagramSender").field(s).finish(),
            Sender::Impaired(i) => f
                .debug_struct("DatagramSender")
                .field("socket", &i.wire.0)
                .field("faults", &i.faults)
                .finish(),
        }
    }
}

impl DatagramSender {
    /// Sends through `sock` (a clone of the socket the caller reads, if it
    /// reads one), with `faults`; `what` names it in the logs.
    pub fn new(sock: std::net::UdpSocket, faults: &LinkFaults, what: &'static str) -> Self {
        if faults.is_active() {
            DatagramSender(Sender::Impaired(Impaired::new(StdWire(sock), faults, what)))
        } else {
            DatagramSender(Sender::Plain(sock))
        }
    }

    /// Sends `buf` to `to` — or loses, duplicates or holds it back.
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        match &self.0 {
            Sender::Plain(s) => s.send_to(buf, to).map(drop),
            Sender::Impaired(i) => i.offer(
                || i.wire.0.send_to(buf, to).map(drop),
                || (buf.to_vec(), to),
            ),
        }
    }

    /// What the faults did so far (`None` without faults).
    pub fn stats(&self) -> Option<FaultStats> {
        match &self.0 {
            Sender::Plain(_) => None,
            Sender::Impaired(i) => Some(i.stats()),
        }
    }
}

/// The QUIC endpoint's real socket, as the runtime wrapped it.
struct QuicWire(Arc<dyn AsyncUdpSocket>);

/// A QUIC datagram kept while it is held.
struct OwnedTransmit {
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    contents: Vec<u8>,
    src_ip: Option<IpAddr>,
}

impl Wire for QuicWire {
    type Owned = OwnedTransmit;
    fn send_owned(&self, t: &OwnedTransmit) -> io::Result<()> {
        self.0.try_send(&Transmit {
            destination: t.destination,
            ecn: t.ecn,
            contents: &t.contents,
            segment_size: None,
            src_ip: t.src_ip,
        })
    }
}

/// A QUIC endpoint's socket whose sends meet the faults.
pub struct ImpairedSocket(Arc<Impaired<QuicWire>>);

impl fmt::Debug for ImpairedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImpairedSocket")
            .field("inner", &self.0.wire.0)
            .field("faults", &self.0.faults)
            .finish()
    }
}

impl ImpairedSocket {
    /// Wraps `inner` (a runtime's socket) with `faults`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, faults: &LinkFaults) -> Self {
        ImpairedSocket(Impaired::new(QuicWire(inner), faults, "quic"))
    }

    /// What the faults did so far.
    pub fn stats(&self) -> FaultStats {
        self.0.stats()
    }

    fn offer_one(&self, t: &Transmit<'_>) -> io::Result<()> {
        let inner = &self.0.wire.0;
        self.0.offer(
            || inner.try_send(t),
            || OwnedTransmit {
                destination: t.destination,
                ecn: t.ecn,
                contents: t.contents.to_vec(),
                src_ip: t.src_ip,
            },
        )
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.wire.0.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        match t.segment_size {
            Some(size) if size > 0 && size < t.contents.len() => {
                // A batch (quinn was told not to make them): each segment
                // meets its own fate. Only the first one's error can be
                // returned (quinn then sends the batch again); a later
                // one that fails is lost.
                for (i, seg) in t.contents.chunks(size).enumerate() {
                    let one = Transmit {
                        contents: seg,
                        segment_size: None,
                        ..*t
                    };
                    let r = self.offer_one(&one);
                    if i == 0 {
                        r?;
                    }
                }
                Ok(())
            }
            _ => self.offer_one(&Transmit {
                segment_size: None,
                ..*t
            }),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.wire.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.wire.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // No GSO batches: one fate per datagram.
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.0.wire.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.wire.0.may_fragment()
    }
}

/// A QUIC endpoint bound to `addr` (a server if `server` is given), whose
/// sends meet `faults`; without faults, quinn's own endpoint, unchanged.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    faults: &LinkFaults,
) -> io::Result<quinn::Endpoint> {
    if !faults.is_active() {
        return match server {
            Some(s) => quinn::Endpoint::server(s, addr),
            None => quinn::Endpoint::client(addr),
        };
    }
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    let sock = runtime.wrap_udp_socket(std::net::UdpSocket::bind(addr)?)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        Arc::new(ImpairedSocket::new(sock, faults)),
        runtime,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<LinkFaults, String> {
        LinkFaults::parse(s)
    }

    #[test]
    fn the_flag_parses() {
        let f = p("loss=2%,dup=1%,reorder=5%").unwrap();
        assert_eq!(
            (f.loss_ppm, f.dup_ppm, f.reorder_ppm),
            (20_000, 10_000, 50_000)
        );
        assert_eq!((f.hold, f.seed), (DEFAULT_HOLD, None));
        assert!(f.is_active());
        let f = p(" loss = 0.5 , hold=10ms, seed=0x2a ").unwrap();
        assert_eq!(
            (f.loss_ppm, f.hold, f.seed),
            (5_000, Duration::from_millis(10), Some(42))
        );
        assert_eq!(p("hold=500us").unwrap().hold, Duration::from_micros(500));
        assert_eq!(p("hold=2").unwrap().hold, Duration::from_millis(2));
        assert_eq!(p("seed=7").unwrap().seed, Some(7));
        assert_eq!(p("none"), Ok(LinkFaults::NONE));
        assert_eq!(p(""), Ok(LinkFaults::NONE));
        assert!(!p("loss=0%").unwrap().is_active());
        assert_eq!(p("loss=100%").unwrap().loss_ppm, PPM);
    }

    #[test]
    fn a_bad_flag_says_what_is_wrong() {
        let e = |s| p(s).unwrap_err();
        assert!(
            e("drop=2%").contains("unknown key 'drop'"),
            "{}",
            e("drop=2%")
        );
        assert!(e("loss=120%").contains("between 0 and 100"));
        assert!(e("loss=-1%").contains("between 0 and 100"));
        assert!(e("loss=much").contains("expected a percentage"));
        assert!(e("loss").contains("expected KEY=VALUE"));
        assert!(e("loss=1%;dup=2%").contains("expected a percentage"));
        assert!(e("loss=1%,loss=2%").contains("twice"));
        assert!(e("loss=60%,dup=50%").contains("at most 100%"));
        assert!(e("hold=0ms").contains("more than 0"));
        assert!(e("hold=2s").contains("at most 1 s"));
        assert!(e("hold=fast").contains("expected a duration"));
        assert!(e("seed=x").contains("64-bit number"));
    }

    #[test]
    fn it_shows_what_it_does() {
        let f = p("loss=2%,dup=0.5%,reorder=5%,seed=9").unwrap();
        assert_eq!(
            f.to_string(),
            "loss 2%, dup 0.5%, reorder 5% (held behind 1..=3 datagrams, at most 3000 us), seed 9"
        );
        assert_eq!(LinkFaults::NONE.to_string(), "none");
        let r = p("loss=1%").unwrap().resolved();
        assert!(r.seed.is_some(), "a seed is drawn");
        assert_eq!(r.resolved(), r, "and kept");
        assert_eq!(LinkFaults::NONE.resolved().seed, None);
    }

    #[test]
    fn fates_come_in_their_proportions_and_a_seed_replays_them() {
        let f = p("loss=3%,dup=2%,reorder=5%").unwrap();
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..200_000).map(|_| f.fate(&mut r)).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let share = |pick: fn(&Fate) -> bool| a.iter().filter(|x| pick(x)).count() as f64 / 2000.0;
        let lost = share(|x| *x == Fate::Lost);
        let twice = share(|x| *x == Fate::Twice);
        let held = share(|x| matches!(x, Fate::Held(_)));
        assert!((lost - 3.0).abs() < 0.2, "{lost}%");
        assert!((twice - 2.0).abs() < 0.2, "{twice}%");
        assert!((held - 5.0).abs() < 0.2, "{held}%");
        assert!(a
            .iter()
            .all(|x| !matches!(x, Fate::Held(n) if !(1..=MAX_OVERTAKEN).contains(n))));
    }
}
