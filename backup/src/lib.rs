//! The backup daemon: keeps a replica of the primary's guest at the last
//! committed checkpoint, and takes over when the primary is lost.
//!
//! - Each checkpoint is staged by the protocol's [`protocol::Receiver`] and
//!   handed over only at its commit, with a matching digest. It is then
//!   applied to the replica with `fgbi::apply`, which validates the whole
//!   epoch before writing a byte: the replica only ever moves from one
//!   committed checkpoint to the next. Then the backup acks.
//! - With verification on, the backup hashes the pages the checkpoint wrote
//!   and compares with the primary's digest; a mismatch ends the session
//!   (the primary then resyncs) and is counted.
//! - Any frame from the primary proves it alive; the primary heartbeats
//!   every few milliseconds on its own stream. After `heartbeat_timeout`
//!   without one, the backup restores the last committed machine state into a
//!   new KVM VM over the replica RAM (no copy: a warm standby) and runs it.
//!   The console stream continues at the committed offset. The survivor then
//!   acts as the primary, protecting the guest toward `failover_backup`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::console::ConsoleLog;
use protocol::transport::{Link, Listener, NodeTls};
use protocol::{Event, Message, Receiver};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use vmm::memory::GuestMem;
use vmm::{Machine, MachineState};

/// Backup settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen for the primary.
    pub listen: SocketAddr,
    /// Certificates and the primary's expected name.
    pub tls: NodeTls,
    /// Fail over after this long without hearing from the primary.
    pub heartbeat_timeout: Duration,
    /// Console service address.
    pub console: SocketAddr,
    /// The KVM device for the VM after failover.
    pub kvm_device: PathBuf,
    /// Most bytes one checkpoint may stage.
    pub max_epoch_bytes: usize,
    /// After a failover, protect the guest toward this backup (the settings
    /// of the primary role; its `backup` is the address). `None`: run unprotected.
    pub then_primary: Option<primary::Config>,
}

/// Errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Transport set-up.
    #[error(transparent)]
    Transport(#[from] protocol::transport::TransportError),
    /// The console service.
    #[error("console service: {0}")]
    Console(std::io::Error),
    /// Runtime.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    /// The restored machine failed to start.
    #[error("failover failed: {0}")]
    Failover(#[from] vmm::MachineError),
    /// After failover, the primary role failed.
    #[error(transparent)]
    Primary(#[from] primary::PrimaryError),
}

/// The replica and the last committed checkpoint.
struct Replica {
    mem: Option<GuestMem>,
    state: Option<MachineState>,
    block_size: usize,
    epoch: u64,
    session: u64,
    verifying: bool,
}

struct Shared {
    replica: Mutex<Replica>,
    last_heard_us: AtomicU64,
    connected: AtomicBool,
    /// The primary ended the session with Goodbye: a planned stop, no takeover.
    orderly: AtomicBool,
    failed_over: AtomicBool,
    mismatches: AtomicU64,
    applied: AtomicU64,
    t0: Instant,
    /// An operator asked this backup to take over (`castor takeover`).
    takeover: AtomicBool,
    /// The current connection, to read its packet counters and to close it
    /// with "taken over" on failover.
    conn: Mutex<Option<quinn::Connection>>,
    /// When the current session's full resync was committed (µs since t0; 0: not yet).
    resync_at_us: AtomicU64,
    /// After a failover: the console offset the guest resumed from.
    resumed_at: AtomicU64,
    /// After a failover: the primary role's figures and console log ends.
    as_primary: Mutex<Option<Arc<primary::Metrics>>>,
}

impl Shared {
    fn heard(&self) {
        self.last_heard_us
            .store(self.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the backup until `stop` is set (or, after a failover, until the
/// guest stops).
pub fn run(cfg: Config, stop: Arc<AtomicBool>) -> Result<(), BackupError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("castor-backup")
        .on_thread_start(|| {
            // The failure detector must not be starved into a false failover.
            let _ = vmm::set_current_thread_realtime(10);
        })
        .build()
        .map_err(BackupError::Runtime)?;
    let log = ConsoleLog::new(0);
    // Committed output is released explicitly; after a failover the primary
    // role decides.
    let shared = Arc::new(Shared {
        replica: Mutex::new(Replica {
            mem: None,
            state: None,
            block_size: 64,
            epoch: 0,
            session: 0,
            verifying: false,
        }),
        last_heard_us: AtomicU64::new(0),
        connected: AtomicBool::new(false),
        orderly: AtomicBool::new(false),
        failed_over: AtomicBool::new(false),
        mismatches: AtomicU64::new(0),
        applied: AtomicU64::new(0),
        t0: Instant::now(),
        as_primary: Mutex::new(None),
        resumed_at: AtomicU64::new(0),
        resync_at_us: AtomicU64::new(0),
        conn: Mutex::new(None),
        takeover: AtomicBool::new(false),
    });
    let status: node::console::Commands = {
        let (s, log) = (shared.clone(), log.clone());
        Arc::new(move |word: &str| {
            if word == "takeover" {
                if s.failed_over.load(Ordering::Relaxed) {
                    return Some("error: this node has already taken over".into());
                }
                if s.lock().state.is_none() {
                    return Some("error: nothing committed yet; nothing to take over".into());
                }
                s.takeover.store(true, Ordering::Relaxed);
                return Some("ok: taking over from the last committed checkpoint".into());
            }
            if word != "status" {
                return None;
            }
            let primary = s
                .as_primary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|m| m.figures());
            let taken_over = s.failed_over.load(Ordering::Relaxed);
            let r = s.lock();
            let status = node::Status {
                role: if taken_over {
                    node::Role::TakenOver
                } else {
                    node::Role::Backup
                },
                console_released: log.released(),
                console_end: log.end(),
                resumed_at: taken_over.then(|| s.resumed_at.load(Ordering::Relaxed)),
                backup: primary.is_none().then(|| node::BackupStatus {
                    connected: s.connected.load(Ordering::Relaxed),
                    verifying: r.verifying,
                    committed_epoch: r.epoch,
                    session: r.session,
                    checkpoints_applied: s.applied.load(Ordering::Relaxed),
                    verify_mismatches: s.mismatches.load(Ordering::Relaxed),
                }),
                primary,
            };
            Some(status.to_json())
        })
    };
    let console = rt
        .block_on(node::console::serve(cfg.console, log.clone(), status))
        .map_err(BackupError::Console)?;
    info!(%console, "console service");
    let listener = rt.block_on(async { Listener::bind(cfg.listen, &cfg.tls) })?;
    info!(listen = %listener.local_addr()?, peer = %cfg.tls.peer_name, "backup listening");

    let (failover_tx, failover_rx) = std::sync::mpsc::channel::<Duration>();
    rt.spawn(accept_loop(
        listener,
        shared.clone(),
        log.clone(),
        cfg.max_epoch_bytes,
    ));
    rt.spawn(watchdog(shared.clone(), cfg.heartbeat_timeout, failover_tx));

    // Wait for a failover or a stop; meanwhile keep a standby VM over the
    // session's replica RAM, so that a failover only sets machine state.
    let mut standby: Option<(u64, vmm::Standby)> = None;
    let silent = loop {
        if stop.load(Ordering::Relaxed) {
            log.close();
            return Ok(());
        }
        if let Ok(silent) = failover_rx.recv_timeout(Duration::from_millis(20)) {
            break silent;
        }
        let current = {
            let r = shared.lock();
            r.state.as_ref().and(r.mem.clone()).map(|m| (r.session, m))
        };
        match current {
            Some((session, mem)) if standby.as_ref().is_none_or(|s| s.0 != session) => {
                standby = None; // a stale one holds the old session's RAM
                let t = Instant::now();
                match Machine::prepare_standby(mem, &cfg.kvm_device) {
                    Ok(s) => {
                        debug!(
                            session,
                            us = t.elapsed().as_micros() as u64,
                            "standby VM ready"
                        );
                        standby = Some((session, s));
                    }
                    Err(e) => {
                        warn!("cannot prepare a standby VM ({e}); a failover will create one")
                    }
                }
            }
            None => standby = None,
            _ => {}
        }
    };
    let t = Instant::now();
    let (mem, state, session) = {
        let mut r = shared.lock();
        let session = r.session;
        (
            r.mem.take().expect("checked by the watchdog"),
            r.state.take().expect("checked by the watchdog"),
            session,
        )
    };
    let epoch = shared.lock().epoch;
    let offset = state.console_offset;
    shared.resumed_at.store(offset, Ordering::Relaxed);
    // Bytes appended after the committed offset cannot exist on the backup.
    debug_assert_eq!(log.end(), offset);
    let machine = match standby.take() {
        Some((s, sb)) if s == session => {
            drop(mem); // the standby holds the same RAM
            Machine::restore_standby(sb, &state, primary::console_sink(log.clone()), false)?
        }
        _ => Machine::restore_on(
            &state,
            mem,
            primary::console_sink(log.clone()),
            false,
            &cfg.kvm_device,
        )?,
    };
    warn!(
        epoch,
        console_offset = offset,
        silent_ms = silent.as_millis() as u64,
        restore_ms = t.elapsed().as_secs_f64() * 1e3,
        "FAILOVER: the primary is lost; the guest runs here from the last committed checkpoint"
    );
    match cfg.then_primary {
        Some(pcfg) => {
            let metrics = Arc::new(primary::Metrics::new(pcfg.mode, pcfg.epoch));
            *shared.as_primary.lock().unwrap_or_else(|e| e.into_inner()) = Some(metrics.clone());
            primary::run_machine(&pcfg, machine, log.clone(), metrics, stop)?;
        }
        None => {
            // Unprotected: output is released as it comes.
            let mut machine = machine;
            log.set_hold(false);
            while !stop.load(Ordering::Relaxed) {
                if machine.wait_exit(Duration::from_millis(20)).is_some() {
                    break;
                }
            }
            machine.stop();
        }
    }
    log.close();
    Ok(())
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    log: Arc<ConsoleLog>,
    max_epoch_bytes: usize,
) {
    loop {
        let link = match listener.accept().await {
            Ok(l) => l,
            Err(protocol::transport::TransportError::Closed) => return,
            Err(e) => {
                // Refused peers are logged by the transport; keep listening.
                warn!("{e}");
                continue;
            }
        };
        if shared.failed_over.load(Ordering::Relaxed) {
            link.close("this node has taken over");
            return;
        }
        let peer = link.remote();
        shared.heard();
        shared.orderly.store(false, Ordering::Relaxed);
        *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.conn.clone());
        shared.connected.store(true, Ordering::Relaxed);
        let why = session(link, &shared, &log, max_epoch_bytes).await;
        shared.connected.store(false, Ordering::Relaxed);
        if shared.failed_over.load(Ordering::Relaxed) {
            listener.close();
            return;
        }
        warn!(%peer, "session with the primary ended: {why}");
    }
}

async fn session(
    mut link: Link,
    shared: &Arc<Shared>,
    log: &Arc<ConsoleLog>,
    max_epoch_bytes: usize,
) -> String {
    let mut data = link.data_rx.take().expect("backup link has a data stream");
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut rx = Receiver::new(max_epoch_bytes);
    let (ctl_tx, ctl_rx) = (&mut link.ctl_tx, &mut link.ctl_rx);
    let control = async {
        loop {
            tokio::select! {
                a = ack_rx.recv() => match a {
                    Some(f) => if let Err(e) = ctl_tx.send(&f).await { return e.to_string() },
                    None => return "session over".to_string(),
                },
                m = ctl_rx.next() => match m {
                    Ok(Some(Message::Heartbeat { seq, sent_us })) => {
                        shared.heard();
                        if let Err(e) = ctl_tx.send_message(&Message::HeartbeatEcho { seq, sent_us }).await {
                            return e.to_string();
                        }
                    }
                    Ok(Some(Message::Goodbye { reason })) => {
                        shared.orderly.store(true, Ordering::Relaxed);
                        return format!("the primary said goodbye: {reason}");
                    }
                    Ok(Some(_)) => shared.heard(),
                    Ok(None) => return "the primary closed the control stream".into(),
                    Err(e) => return e.to_string(),
                },
            }
        }
    };
    let receive = async {
        loop {
            let m = match data.next().await {
                Ok(Some(m)) => m,
                Ok(None) => return "the primary closed the data stream".to_string(),
                Err(e) => return e.to_string(),
            };
            shared.heard();
            if shared.failed_over.load(Ordering::Relaxed) {
                return "failed over".into();
            }
            match rx.on_message(m) {
                Ok(Event::Hello(h)) => {
                    info!(node = %h.node, session = h.session, memory_mib = h.memory_bytes >> 20, mode = h.mode, "new session: full resync");
                    let mem = match vmm::memory::create(h.memory_bytes) {
                        Ok(m) => m,
                        Err(e) => return format!("cannot allocate the replica: {e}"),
                    };
                    let mut r = shared.lock();
                    *r = Replica {
                        mem: Some(mem),
                        state: None,
                        block_size: h.block_size as usize,
                        epoch: 0,
                        session: h.session,
                        verifying: h.capabilities & protocol::message::CAP_VERIFY != 0,
                    };
                    log.reset(h.output_offset);
                }
                Ok(Event::Checkpoint(c)) => {
                    // Applying can take a while (a full resync): off the
                    // runtime, so heartbeats keep being read meanwhile.
                    let epoch = c.epoch;
                    let (sh, lg) = (shared.clone(), log.clone());
                    match tokio::task::spawn_blocking(move || commit(&sh, &lg, &c)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return e,
                        Err(e) => return format!("applying checkpoint {epoch}: {e}"),
                    }
                    // The primary was alive when it sent this.
                    shared.heard();
                    let _ = ack_tx.send(rx.ack(epoch));
                }
                Ok(Event::Goodbye(reason)) => {
                    shared.orderly.store(true, Ordering::Relaxed);
                    return format!("the primary said goodbye: {reason}");
                }
                Ok(_) => {}
                Err(e) => {
                    error!("protocol violation from the primary: {e}");
                    return e.to_string();
                }
            }
        }
    };
    let why = tokio::select! {
        w = control => w,
        w = receive => w,
    };
    link.close(&why);
    why
}

/// Applies a committed checkpoint to the replica; Err ends the session.
fn commit(shared: &Shared, log: &ConsoleLog, c: &protocol::Checkpoint) -> Result<(), String> {
    // The state travels lz4-compressed with its size first; the size is
    // checked before anything is allocated.
    let size = lz4_flex::block::uncompressed_size(&c.state)
        .map_err(|e| format!("checkpoint {}: machine state: {e}", c.epoch))?
        .0;
    if size > vmm::state::MAX_PAYLOAD as usize + 64 {
        return Err(format!(
            "checkpoint {}: machine state of {size} bytes is over the limit",
            c.epoch
        ));
    }
    let raw = lz4_flex::block::decompress_size_prepended(&c.state)
        .map_err(|e| format!("checkpoint {}: machine state: {e}", c.epoch))?;
    let state = MachineState::decode(&raw).map_err(|e| format!("checkpoint {}: {e}", c.epoch))?;
    let mut r = shared.lock();
    let bs = r.block_size;
    let Some(mem) = r.mem.as_mut() else {
        return Err("checkpoint before a session".into());
    };
    let stats = vmm::memory::with_ram_mut(mem, |ram| {
        let stats = fgbi::apply(ram, bs, &c.records)?;
        let digest = c.memory_digest.map(|_| {
            let mut h = blake3::Hasher::new();
            for &p in &stats.pages {
                h.update(&ram[p as usize * 4096..(p as usize + 1) * 4096]);
            }
            *h.finalize().as_bytes()
        });
        Ok::<_, fgbi::ApplyError>((stats, digest))
    })
    .map_err(|e| format!("replica: {e}"))?
    .map_err(|e| format!("checkpoint {} refused, replica unchanged: {e}", c.epoch))?;
    if let (Some(want), Some(got)) = (c.memory_digest, stats.1) {
        if want != got {
            shared.mismatches.fetch_add(1, Ordering::Relaxed);
            error!(
                epoch = c.epoch,
                "VERIFY: replica differs from the primary after checkpoint {}", c.epoch
            );
            return Err(format!("replica mismatch at epoch {}", c.epoch));
        }
    }
    // Liveness first, then the state: the watchdog reads both under this
    // lock, so it never sees a fresh state with stale liveness.
    shared.heard();
    if c.epoch == 1 {
        shared
            .resync_at_us
            .store(shared.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    r.state = Some(state);
    r.epoch = c.epoch;
    shared.applied.fetch_add(1, Ordering::Relaxed);
    log.append_released(&c.output);
    Ok(())
}

/// The close reason a backup gives its primary when it takes over.
pub const TAKEN_OVER: &str = protocol::transport::TAKEN_OVER;
const TAKEN_OVER_CODE: u32 = 7;

/// How long after a full resync the longer timeout applies.
pub const RESYNC_GRACE: Duration = Duration::from_secs(2);
/// The heartbeat timeout during that time.
pub const RESYNC_TIMEOUT: Duration = Duration::from_millis(500);

async fn watchdog(
    shared: Arc<Shared>,
    timeout: Duration,
    failover: std::sync::mpsc::Sender<Duration>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_rx = 0u64;
    let mut last_tick = Instant::now();
    loop {
        tick.tick().await;
        // A watchdog that woke late was starved itself: the primary's packets
        // may be waiting unread. Decide only on a tick that came on time.
        let late = last_tick.elapsed() > Duration::from_millis(5);
        last_tick = Instant::now();
        if late && !shared.takeover.load(Ordering::Relaxed) {
            continue;
        }
        // A primary that said goodbye stopped on purpose: no takeover. One
        // that went silent, or whose connection broke, is lost. An operator
        // may also ask for a takeover.
        if shared.orderly.load(Ordering::Relaxed) && !shared.takeover.load(Ordering::Relaxed) {
            continue;
        }
        // Any packet from the primary proves it alive, even while its
        // heartbeat waits behind checkpoint data on a busy host.
        let rx = shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.stats().udp_rx.datagrams);
        if let Some(rx) = rx {
            if rx != last_rx {
                last_rx = rx;
                shared.heard();
            }
        }
        // Decide under the replica lock: commits update liveness under it
        // before publishing their state.
        let r = shared.lock();
        if r.state.is_none() {
            // Nothing committed yet: nothing to take over.
            continue;
        }
        let now = shared.t0.elapsed().as_micros() as u64;
        let silent =
            Duration::from_micros(now.saturating_sub(shared.last_heard_us.load(Ordering::Relaxed)));
        // Right after a full resync the primary catches up a backlog (its
        // guest was paused for the resync) and heartbeats can be late on a
        // loaded host: a longer timeout for a moment avoids a false takeover.
        let since_resync =
            Duration::from_micros(now.saturating_sub(shared.resync_at_us.load(Ordering::Relaxed)));
        let asked = shared.takeover.load(Ordering::Relaxed);
        let limit = if asked {
            Duration::ZERO
        } else if since_resync < RESYNC_GRACE {
            timeout.max(RESYNC_TIMEOUT)
        } else {
            timeout
        };
        if silent < limit {
            continue;
        }
        drop(r);
        shared.failed_over.store(true, Ordering::Relaxed);
        // Fence: a primary that is in fact alive learns it was replaced and
        // stops its guest (see castor-primary), so only one guest runs.
        if let Some(c) = shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.close(
                quinn::VarInt::from_u32(TAKEN_OVER_CODE),
                TAKEN_OVER.as_bytes(),
            );
        }
        let _ = failover.send(silent);
        return;
    }
}
