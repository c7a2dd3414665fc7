//! The primary daemon: runs the guest and keeps it protected.
//!
//! Every epoch: pause → harvest the dirty pages → copy them → capture the
//! machine state → note the console bytes produced since the last epoch →
//! resume → encode the copies with fgbi → send the checkpoint → commit. The
//! console bytes of epoch `k` stay invisible to clients until the backup acks
//! checkpoint `k` (output commit): whatever the world saw, the backup can
//! continue from. At most `max_in_flight` checkpoints are unacknowledged;
//! past that the next epoch waits, and the wait is counted.
//!
//! Without a backup the guest keeps running, the daemon says loudly that it
//! is unprotected, releases output at once, and keeps trying to reach the
//! backup; a backup that comes (back) gets a full resync.

mod metrics;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fgbi::{Encoder, Mode};
use node::console::ConsoleLog;
use protocol::link::{DelayLine, LinkShape, Pacer, PIECE};
use protocol::message::CAP_VERIFY;
use protocol::transport::{self, NodeTls};
use protocol::{Hello, Message, Sender, VERSION};
use tokio::sync::mpsc;
use tracing::{error, info, info_span, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm::console::{Console, ConsoleSink};
use vmm::{Machine, MachineConfig};

pub use metrics::{EpochFigures, Metrics};

/// Primary errors.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// The console service could not start.
    #[error("console service: {0}")]
    Console(std::io::Error),
    /// Runtime set-up.
    #[error("starting the network runtime: {0}")]
    Runtime(std::io::Error),
    /// fgbi configuration.
    #[error(transparent)]
    Fgbi(#[from] fgbi::ConfigError),
    /// Guest memory layout not supported for replication.
    #[error("replication needs a guest of at most 3 GiB (one memory region)")]
    Layout,
    /// Protocol misuse (a bug) or a bad ack.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The guest stopped.
    #[error("the guest stopped: {0:?}")]
    GuestStopped(vmm::ExitReason),
    /// The backup took over from this node while it was alive; its guest was
    /// stopped so that only one runs.
    #[error(
        "fenced: the backup has taken over from this node ({0}); this node's guest was stopped"
    )]
    Fenced(String),
}

/// Primary settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The VM.
    pub machine: MachineConfig,
    /// Kernel image.
    pub kernel: Vec<u8>,
    /// Its command line.
    pub cmdline: String,
    /// This node's name (in the hello; its certificate must match).
    pub node: String,
    /// Where the backup listens.
    pub backup: SocketAddr,
    /// Certificates and the backup's expected name.
    pub tls: NodeTls,
    /// Epoch length.
    pub epoch: Duration,
    /// fgbi mode.
    pub mode: Mode,
    /// fgbi block size.
    pub block_size: usize,
    /// fgbi memory budget in bytes; `None`: half the guest's RAM (the
    /// machine actually protected, which after a failover is the replica).
    pub budget_bytes: Option<u64>,
    /// Most unacknowledged checkpoints.
    pub max_in_flight: usize,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// The backup is declared lost after this long without an answer.
    pub backup_timeout: Duration,
    /// Console service address.
    pub console: SocketAddr,
    /// Send memory digests for the backup to verify.
    pub verify: bool,
    /// Link emulation applied to the replication traffic (benchmarks).
    pub link: LinkShape,
    /// Pre-copy window: this long before each epoch ends, the dirty pages so
    /// far are harvested and copied while the guest runs, so that the pause
    /// copies only the pages dirtied since. Zero: everything in the pause.
    pub precopy: Duration,
}

/// The machine's console goes into the log, invisible until released.
struct LogSink(Arc<ConsoleLog>);

impl ConsoleSink for LogSink {
    fn write(&mut self, _offset: u64, bytes: &[u8]) {
        self.0.append(bytes);
    }
}

enum NetEvent {
    Connected,
    Ack(u64),
    Lost(String),
}

/// Boots the guest and runs the primary until `stop` is set or the guest stops.
pub fn run(cfg: Config, stop: Arc<AtomicBool>) -> Result<Arc<Metrics>, PrimaryError> {
    if cfg.machine.mem_bytes > vmm::memory::MMIO_HOLE_START {
        return Err(PrimaryError::Layout);
    }
    let rt = runtime()?;
    let log = ConsoleLog::new(0);
    let metrics = Arc::new(Metrics::new(cfg.mode, cfg.epoch));
    let status: node::console::Commands = {
        let m = metrics.clone();
        let log = log.clone();
        Arc::new(move |word: &str| match word {
            "status" => Some(
                node::Status {
                    role: node::Role::Primary,
                    console_released: log.released(),
                    console_end: log.end(),
                    resumed_at: None,
                    primary: Some(m.figures()),
                    backup: None,
                }
                .to_json(),
            ),
            "reset" => {
                m.reset();
                Some("ok: figures reset".into())
            }
            "takeover" => {
                Some("error: this node is the primary; send takeover to its backup".into())
            }
            _ => None,
        })
    };
    let console = rt
        .block_on(node::console::serve(cfg.console, log.clone(), status))
        .map_err(PrimaryError::Console)?;
    info!(%console, "console service");
    let machine = Machine::boot(
        &cfg.machine,
        &cfg.kernel,
        &cfg.cmdline,
        Console::new(Box::new(LogSink(log.clone())), 0),
    )?;
    protect(&rt, &cfg, machine, log, metrics, stop)
}

/// Protects an already running `machine` whose console goes to `log` (a
/// backup that has just taken over calls this): connects to `cfg.backup`,
/// resyncs, and checkpoints until `stop` is set or the guest stops. The
/// console service is the caller's.
pub fn run_machine(
    cfg: &Config,
    machine: Machine,
    log: Arc<ConsoleLog>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Metrics>, PrimaryError> {
    let rt = runtime()?;
    protect(&rt, cfg, machine, log, metrics, stop)
}

/// The log sink for a machine whose output must wait for output commit.
pub fn console_sink(log: Arc<ConsoleLog>) -> Box<dyn ConsoleSink> {
    Box::new(LogSink(log))
}

fn runtime() -> Result<tokio::runtime::Runtime, PrimaryError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("castor-net")
        .on_thread_start(|| {
            // Heartbeats and acks must not wait behind a spinning guest.
            let _ = vmm::set_current_thread_realtime(10);
        })
        .build()
        .map_err(PrimaryError::Runtime)
}

fn protect(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    machine: Machine,
    log: Arc<ConsoleLog>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Metrics>, PrimaryError> {
    let pages = vmm::memory::ram_size(machine.memory()) / 4096;
    // Dirty tracking starts with the first session (a full resync copies
    // everything anyway): after a failover the guest runs at once, without
    // waiting for KVM to re-register its memory with dirty logging.
    let (frames_tx, frames_rx) = mpsc::channel::<Vec<u8>>(cfg.max_in_flight.max(1) + 1);
    let (events_tx, events_rx) = std_mpsc::channel::<NetEvent>();
    rt.spawn(network(cfg.clone(), frames_rx, events_tx, stop.clone()));
    let mut lp = EpochLoop {
        cfg,
        machine,
        log: log.clone(),
        metrics: metrics.clone(),
        frames: frames_tx,
        pages,
        session: None,
        staging: Vec::new(),
        pre_frames: Vec::new(),
        slot_of: vec![NO_SLOT; pages as usize],
        rt_pause: false,
    };
    let result = lp.run(&events_rx, &stop);
    // Let the network task tell the backup this is a planned stop.
    stop.store(true, Ordering::Relaxed);
    // (The future is built inside the runtime: tokio's sleep needs its context.)
    let pause = cfg.heartbeat * 4 + Duration::from_millis(20);
    rt.block_on(async move { tokio::time::sleep(pause).await });
    lp.machine.stop();
    if result.is_ok() {
        // A planned stop: the backup does not take over, the output stands.
        log.release(log.end());
    }
    log.close();
    result.map(|()| metrics)
}

/// Largest dirty-page staging buffer kept after a full resync.
const STAGING_KEEP: usize = 64 << 20;

struct Session {
    sender: Sender,
    encoder: Encoder,
    /// (epoch, console offset it releases, commit time, pause start)
    in_flight: VecDeque<(u64, u64, Instant, Instant)>,
    next_epoch: u64,
    out_start: u64,
}

struct EpochLoop<'a> {
    cfg: &'a Config,
    machine: Machine,
    log: Arc<ConsoleLog>,
    metrics: Arc<Metrics>,
    frames: mpsc::Sender<Vec<u8>>,
    pages: u64,
    session: Option<Session>,
    /// Copies of the dirty pages (reused): page `frames[i]` at slot `i`.
    staging: Vec<u8>,
    /// Pages copied before the pause in this epoch (slots 0..).
    pre_frames: Vec<u64>,
    /// Staging slot of each guest page this epoch, or `NO_SLOT`.
    slot_of: Vec<u32>,
    /// This thread is at real-time priority for the pause.
    rt_pause: bool,
}

/// Real-time priority of the epoch thread while the guest is paused (the
/// network threads have 10).
const PAUSE_PRIORITY: i32 = 5;

const NO_SLOT: u32 = u32::MAX;

impl EpochLoop<'_> {
    fn run(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<(), PrimaryError> {
        let mut next = Instant::now() + self.cfg.epoch;
        self.log.set_hold(false);
        warn!("UNPROTECTED: no backup yet; the guest runs, output is released at once");
        let mut pre_done = false;
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            if let Some(r) = self.machine.wait_exit(Duration::ZERO) {
                return Err(PrimaryError::GuestStopped(r));
            }
            // The next deadline: the pre-copy point, then the epoch's end.
            let pre_at = (!pre_done && self.session.is_some() && !self.cfg.precopy.is_zero())
                .then(|| next.checked_sub(self.cfg.precopy))
                .flatten();
            let deadline = pre_at.unwrap_or(next);
            // Network events: acks release output; (dis)connections.
            let timeout = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(timeout) {
                Ok(ev) => {
                    self.on_event(ev)?;
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if pre_at.is_some() {
                // A checkpoint may only go out when fewer than the limit are
                // in flight: wait for that before the pre-copy, so that the
                // pages it copies are those of the pause that follows.
                let w = Instant::now();
                if !self.wait_in_flight(events, stop)? {
                    return Ok(());
                }
                let w = w.elapsed();
                if w > Duration::from_micros(100) {
                    next = next.max(Instant::now() + self.cfg.precopy);
                }
                waited += w;
                pre_done = true;
                if self.session.is_some() {
                    self.precopy()?;
                }
                continue;
            }
            pre_done = false;
            next += self.cfg.epoch;
            if Instant::now() > next {
                next = Instant::now() + self.cfg.epoch;
            }
            if self.session.is_none() {
                waited = Duration::ZERO;
                continue;
            }
            let w = Instant::now();
            if !self.wait_in_flight(events, stop)? {
                return Ok(());
            }
            waited += w.elapsed();
            if self.session.is_some() {
                self.epoch(std::mem::take(&mut waited))?;
            }
        }
        Ok(())
    }

    /// Bounded in-flight checkpoints: waits (handling events) until fewer
    /// than the limit are unacknowledged. False: stop, or the network task
    /// is gone.
    fn wait_in_flight(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<bool, PrimaryError> {
        while self
            .session
            .as_ref()
            .is_some_and(|s| s.in_flight.len() >= self.cfg.max_in_flight)
        {
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => self.on_event(ev)?,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn on_event(&mut self, ev: NetEvent) -> Result<(), PrimaryError> {
        match ev {
            NetEvent::Connected => self.start_session()?,
            NetEvent::Ack(k) => {
                if let Some(s) = self.session.as_mut() {
                    s.sender.on_ack(k)?;
                    if !self.metrics.protected() {
                        // The backup holds a committed checkpoint: it can take over.
                        self.metrics.set_protected(true);
                        info!(epoch = k, "PROTECTED: the backup committed the full resync");
                    }
                    while s.in_flight.front().is_some_and(|f| f.0 <= k) {
                        let (_, release, at, paused) = s.in_flight.pop_front().expect("front");
                        self.log.release(release);
                        self.metrics.ack(at.elapsed());
                        self.metrics.release(paused.elapsed());
                    }
                }
            }
            NetEvent::Lost(why) if why.contains(transport::TAKEN_OVER) => {
                // Held output stays held: the backup continues from its
                // last committed checkpoint, this guest must not be seen.
                error!("FENCED: the backup has taken over while this node was alive; stopping this guest");
                return Err(PrimaryError::Fenced(why));
            }
            NetEvent::Lost(why) => {
                if self.session.take().is_some() {
                    error!("UNPROTECTED: lost the backup ({why}); the guest keeps running, output is released at once; waiting for a backup to re-protect");
                    self.metrics.set_protected(false);
                }
                self.log.set_hold(false);
            }
        }
        Ok(())
    }

    /// A new backup: new session, full resync as the first epoch.
    fn start_session(&mut self) -> Result<(), PrimaryError> {
        let cfg = self.cfg;
        // From here on output waits for acks; everything before is released.
        self.log.set_hold(true);
        let out_start = self.log.released();
        let hello = Hello {
            version: VERSION,
            session: rand::random(),
            node: cfg.node.clone(),
            capabilities: if cfg.verify { CAP_VERIFY } else { 0 },
            mode: match cfg.mode {
                Mode::Remus => 0,
                Mode::Xbzrle => 1,
                Mode::Fgbi => 2,
            },
            block_size: cfg.block_size as u32,
            memory_bytes: self.pages * 4096,
            vcpus: self.machine.vcpu_count() as u32,
            output_offset: out_start,
        };
        let fcfg = fgbi::Config {
            mode: cfg.mode,
            block_size: cfg.block_size,
            budget_bytes: cfg.budget_bytes.unwrap_or(self.pages * 4096 / 2),
            key: rand::random(),
        };
        let encoder = Encoder::new(fcfg, self.pages)?;
        let (sender, hello_frame) = Sender::new(hello);
        if self.frames.blocking_send(hello_frame).is_err() {
            self.log.set_hold(false);
            return Ok(());
        }
        self.session = Some(Session {
            sender,
            encoder,
            in_flight: VecDeque::new(),
            next_epoch: 1,
            out_start,
        });
        // Full resync: every page, encoded while paused.
        let span = info_span!("resync");
        let _g = span.enter();
        let t = Instant::now();
        self.forget_precopy();
        self.machine.set_dirty_tracking(true)?;
        self.machine.pause()?;
        self.machine.harvest_dirty()?;
        let all: Vec<u64> = (0..self.pages).collect();
        let t0 = Instant::now();
        let r = self
            .copy_pages(all.iter().copied().enumerate(), true)
            .and_then(|copy| self.checkpoint(&all, t0, Duration::ZERO, copy, Duration::ZERO, 0));
        if r.is_err() {
            self.machine.resume()?;
        }
        r?;
        info!(
            pages = self.pages,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "full resync sent"
        );
        Ok(())
    }

    /// Forgets this epoch's pre-copied pages (a new session resyncs all).
    fn forget_precopy(&mut self) {
        for &f in &self.pre_frames {
            self.slot_of[f as usize] = NO_SLOT;
        }
        self.pre_frames.clear();
    }

    /// Copies guest pages into staging slots: `(slot, frame)` pairs. Grows
    /// the buffer if needed (only until it has a working set's size).
    fn copy_pages(
        &mut self,
        pages: impl ExactSizeIterator<Item = (usize, u64)>,
        log_progress: bool,
    ) -> Result<Duration, PrimaryError> {
        let t = Instant::now();
        let n = pages.len();
        let quarter = (n / 4).max(1);
        for (i, (slot, f)) in pages.enumerate() {
            if log_progress && i > 0 && i % quarter == 0 {
                info!(percent = 100 * i / n, pages = i, "full resync: copying");
            }
            let end = (slot + 1) * 4096;
            if self.staging.len() < end {
                self.staging.resize(end.max(self.staging.len() * 2), 0);
            }
            self.machine
                .memory()
                .read_slice(&mut self.staging[slot * 4096..end], GuestAddress(f * 4096))
                .map_err(|e| vmm::MachineError::Config(format!("reading guest page {f}: {e}")))?;
        }
        Ok(t.elapsed())
    }

    /// The pre-copy, while the guest runs: harvests the pages dirtied so far
    /// in this epoch and copies them. A page written after this harvest is
    /// in the next one (KVM write-protects before the ioctl returns), so its
    /// copy is redone in the pause; every other copy is already final.
    fn precopy(&mut self) -> Result<(), PrimaryError> {
        let dirty = self.machine.harvest_dirty()?;
        let start = self.pre_frames.len();
        for f in dirty.frames().filter(|&f| f < self.pages) {
            if self.slot_of[f as usize] == NO_SLOT {
                self.slot_of[f as usize] = self.pre_frames.len() as u32;
                self.pre_frames.push(f);
            }
        }
        let new: Vec<(usize, u64)> = (start..self.pre_frames.len())
            .map(|i| (i, self.pre_frames[i]))
            .collect();
        self.copy_pages(new.into_iter(), false)?;
        Ok(())
    }

    fn epoch(&mut self, wait: Duration) -> Result<(), PrimaryError> {
        // The pause runs at real-time priority (below the heartbeat threads):
        // on a small, busy host the guest must not stay stopped while this
        // thread waits for a CPU. Back to normal at resume.
        self.rt_pause = vmm::set_current_thread_realtime(PAUSE_PRIORITY).is_ok();
        let r = self.paused_epoch(wait);
        self.end_rt_pause();
        r
    }

    fn paused_epoch(&mut self, wait: Duration) -> Result<(), PrimaryError> {
        let t0 = Instant::now();
        self.machine.pause()?;
        let t1 = Instant::now();
        let dirty = match self.machine.harvest_dirty() {
            Ok(d) => d,
            Err(e) => {
                self.machine.resume()?;
                return Err(e.into());
            }
        };
        let harvest = t1.elapsed();
        // The epoch's pages: the pre-copied ones, then the new ones; every
        // page dirtied since the pre-copy is copied (again) now.
        let mut frames = std::mem::take(&mut self.pre_frames);
        let precopied = frames.len();
        let mut now: Vec<(usize, u64)> = Vec::new();
        for f in dirty.frames().filter(|&f| f < self.pages) {
            let slot = match self.slot_of[f as usize] {
                NO_SLOT => {
                    frames.push(f);
                    frames.len() - 1
                }
                s => s as usize,
            };
            now.push((slot, f));
        }
        let copied = self.copy_pages(now.into_iter(), false);
        let r = copied
            .and_then(|copy| self.checkpoint(&frames, t0, harvest, copy, wait, precopied as u64));
        if r.is_err() && self.machine.is_paused() {
            self.machine.resume()?;
        }
        // After the resume: the slots are free for the next epoch.
        for &f in &frames {
            self.slot_of[f as usize] = NO_SLOT;
        }
        frames.clear();
        self.pre_frames = frames;
        r
    }

    fn end_rt_pause(&mut self) {
        if std::mem::take(&mut self.rt_pause) {
            let _ = vmm::set_current_thread_normal();
        }
    }

    /// With the copies of `frames` in the staging slots: captures the state
    /// and the console range, resumes, encodes and sends. The machine is
    /// paused on entry (since `t0`) and running on return.
    /// `precopied` of them were copied before the pause.
    fn checkpoint(
        &mut self,
        frames: &[u64],
        t0: Instant,
        harvest: Duration,
        copy: Duration,
        wait: Duration,
        precopied: u64,
    ) -> Result<(), PrimaryError> {
        let copies = std::mem::take(&mut self.staging);
        let tcap = Instant::now();
        let state = self.machine.capture()?;
        let capture = tcap.elapsed();
        let out_end = self.log.end();
        debug_assert_eq!(out_end, state.console_offset);
        self.machine.resume()?;
        let pause = t0.elapsed();
        self.end_rt_pause();

        let s = self.session.as_mut().expect("session");
        let te = Instant::now();
        let mut records = Vec::with_capacity(frames.len() * 64);
        let mut touched = Vec::new();
        for (i, &f) in frames.iter().enumerate() {
            let page: &[u8; 4096] = copies[i * 4096..(i + 1) * 4096].try_into().expect("page");
            let before = records.len();
            s.encoder.encode_page(f, page, &mut records);
            if records.len() > before {
                touched.push(i);
            }
        }
        let memory_digest = self.cfg.verify.then(|| {
            let mut h = blake3::Hasher::new();
            for &i in &touched {
                h.update(&copies[i * 4096..(i + 1) * 4096]);
            }
            *h.finalize().as_bytes()
        });
        let encode = te.elapsed();
        // Keep the buffer for the next epoch (a fresh one would be
        // first-touched inside the next pause), unless a resync made it huge.
        if copies.len() <= STAGING_KEEP || (frames.len() as u64) < self.pages {
            self.staging = copies;
        }
        let epoch = s.next_epoch;
        s.next_epoch += 1;
        let output = self.log.slice(s.out_start, out_end);
        s.out_start = out_end;
        // The state is mostly zeros and repeats: lz4 (size-prefixed).
        let state_bytes = lz4_flex::block::compress_prepend_size(&state.encode());
        let mut f = Vec::with_capacity(records.len() + state_bytes.len() + output.len() + 256);
        s.sender.begin(
            epoch,
            frames.len() as u32,
            frames.len() as u64 * 4096,
            &mut f,
        )?;
        s.sender.records(&records, &mut f)?;
        s.sender.state(&state_bytes, &mut f)?;
        s.sender.output(&output, &mut f)?;
        s.sender.commit(memory_digest, &mut f)?;
        s.in_flight.push_back((epoch, out_end, Instant::now(), t0));
        let sent = f.len() as u64;
        if self.frames.blocking_send(f).is_err() {
            self.session = None;
        }
        self.metrics.epoch(EpochFigures {
            epoch,
            pause,
            harvest,
            copy,
            capture,
            encode,
            dirty_pages: frames.len() as u64,
            bytes: sent,
            raw_bytes: frames.len() as u64 * 4096,
            wait,
            precopied,
        });
        Ok(())
    }
}

/// Connects (and reconnects) to the backup; moves frames out and acks in.
async fn network(
    cfg: Config,
    mut frames: mpsc::Receiver<Vec<u8>>,
    events: std_mpsc::Sender<NetEvent>,
    stop: Arc<AtomicBool>,
) {
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let link = match transport::connect(cfg.backup, &cfg.tls).await {
            Ok(l) => l,
            Err(e) => {
                if !warned {
                    warn!("cannot reach the backup at {}: {e}; retrying", cfg.backup);
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        warned = false;
        info!(backup = %link.remote(), "connected to the backup");
        // Drop frames of an earlier session.
        while frames.try_recv().is_ok() {}
        if events.send(NetEvent::Connected).is_err() {
            return;
        }
        let why = session(&cfg, link, &mut frames, &events, &stop).await;
        let _ = events.send(NetEvent::Lost(why));
    }
}

async fn session(
    cfg: &Config,
    mut link: transport::Link,
    frames: &mut mpsc::Receiver<Vec<u8>>,
    events: &std_mpsc::Sender<NetEvent>,
    stop: &AtomicBool,
) -> String {
    let mut data = link.data_tx.take().expect("primary link has a data stream");
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    let (ctl_tx, ctl_rx) = (&mut link.ctl_tx, &mut link.ctl_rx);
    let shape = cfg.link;
    let writer = async {
        if !shape.is_shaped() {
            while let Some(f) = frames.recv().await {
                if let Err(e) = data.send(&f).await {
                    return format!("sending a checkpoint: {e}");
                }
            }
            return "the epoch loop ended".to_string();
        }
        // Emulated link: each frame is stamped as it arrives, held for the
        // one-way delay, then paced to the rate in pieces.
        let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let stamper = async move {
            while let Some(f) = frames.recv().await {
                if tx
                    .send((tokio::time::Instant::now() + shape.delay, f))
                    .is_err()
                {
                    break;
                }
            }
        };
        let sender = async {
            let mut pacer = Pacer::new(shape.rate_bytes_per_s);
            while let Some((due, f)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                for piece in f.chunks(PIECE) {
                    let at = pacer.book(piece.len(), tokio::time::Instant::now());
                    tokio::time::sleep_until(at).await;
                    if let Err(e) = data.send(piece).await {
                        return format!("sending a checkpoint: {e}");
                    }
                }
            }
            "the epoch loop ended".to_string()
        };
        tokio::pin!(stamper);
        tokio::pin!(sender);
        tokio::select! {
            why = &mut sender => why,
            _ = &mut stamper => (&mut sender).await,
        }
    };
    // Acks held for the emulated link's one-way delay.
    let mut acks: DelayLine<u64> = DelayLine::new(shape.delay);
    tokio::pin!(writer);
    loop {
        tokio::select! {
            why = &mut writer => return why,
            _ = tokio::time::sleep_until(acks.next_due().unwrap_or_else(tokio::time::Instant::now)), if !acks.is_empty() => {
                while let Some(epoch) = acks.pop_due(tokio::time::Instant::now()) {
                    if events.send(NetEvent::Ack(epoch)).is_err() {
                        return "the epoch loop ended".into();
                    }
                }
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    let _ = ctl_tx.send_message(&Message::Goodbye { reason: "primary shutting down".into() }).await;
                    link.close("shutdown");
                    return "shutting down".into();
                }
                if last_heard.elapsed() > cfg.backup_timeout {
                    link.close("backup timed out");
                    return format!("no answer from the backup for {:?}", cfg.backup_timeout);
                }
                seq += 1;
                let now = Instant::now().elapsed().as_micros() as u64;
                if let Err(e) = ctl_tx.send_message(&Message::Heartbeat { seq, sent_us: now }).await {
                    return format!("sending a heartbeat: {e}");
                }
            }
            m = ctl_rx.next() => match m {
                Ok(Some(Message::Ack { epoch })) => {
                    last_heard = Instant::now();
                    if !shape.delay.is_zero() {
                        acks.push(epoch, tokio::time::Instant::now());
                    } else if events.send(NetEvent::Ack(epoch)).is_err() {
                        return "the epoch loop ended".into();
                    }
                }
                Ok(Some(Message::HeartbeatEcho { .. })) => last_heard = Instant::now(),
                Ok(Some(Message::Heartbeat { seq, sent_us })) => {
                    last_heard = Instant::now();
                    let _ = ctl_tx.send_message(&Message::HeartbeatEcho { seq, sent_us }).await;
                }
                Ok(Some(Message::Goodbye { reason })) => return format!("the backup said goodbye: {reason}"),
                Ok(Some(other)) => return format!("unexpected {} from the backup", other.name()),
                Ok(None) => return "the backup closed the control stream".into(),
                Err(e) => return e.to_string(),
            }
        }
    }
}
