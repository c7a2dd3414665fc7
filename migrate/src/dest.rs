//! The destination's shell: receives the rounds into fresh RAM, keeps a
//! digest of that RAM page by page, and at the switch verifies it against
//! the source's (pre-copy) or registers the missing pages for faults
//! (post-copy), then restores the machine state onto a VM prepared over
//! that RAM and runs it once the source says `Go`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::console::ConsoleLog;
use protocol::payload;
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use vmm::uffd::MissingPages;
use vmm::{Machine, MachineState};

use crate::io::{page_hash, Rx, Tx};
use crate::wire::{frames_of, Msg, MIGRATION_VERSION};
use crate::MigrateError;

/// The destination's settings.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// KVM device.
    pub kvm_device: PathBuf,
    /// Largest guest RAM accepted.
    pub max_memory: u64,
}

/// What the destination measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestReport {
    /// Rounds applied.
    pub rounds: u32,
    /// Whether the memory digest matched (pre-copy).
    pub verified: bool,
    /// From `Go` to the guest running here, in ms.
    pub resume_ms: f64,
    /// Post-copy: pages the destination lacked at the switch.
    pub missing: u64,
}

/// How the destination's owner takes the guest in at the switch.
#[derive(Default)]
pub struct Arrival {
    /// The console log the guest writes to, reset to the switch's offset
    /// (a daemon's, already served); `None`: a new one.
    pub log: Option<Arc<ConsoleLog>>,
    /// Asked after `Go`, before the guest runs here: claims the VM at the
    /// witness, from the token the handover gave this node (a primary's
    /// `claim_arrival`). `Verified` tells the source that this node claims
    /// ([`crate::wire::Msg::Verified`]), so it must be a claim, not a
    /// read. An error: the guest does not run here — the source, which
    /// never heard `Finished`, took the VM back with a claim from the same
    /// token, or the witness did not answer (then the VM may be lost: the
    /// price of never running a guest this node may not own).
    #[allow(clippy::type_complexity)]
    pub claim: Option<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    /// A fault for the tests: stop this process (SIGSTOP) right after
    /// answering `Verified`, before reading `Go`
    /// ([`FAULT_STOP_AFTER_VERIFIED`]).
    pub stop_after_verified: bool,
}

/// A guest that arrived and runs here.
pub struct Incoming {
    /// The running machine.
    pub machine: Machine,
    /// Its console, from the offset it had at the switch.
    pub log: Arc<ConsoleLog>,
    /// Figures.
    pub report: DestReport,
    /// Post-copy: the page service, alive as long as the machine.
    pub postcopy: Option<Postcopy>,
}

/// The destination's half of a post-copy: the fault thread and the
/// receiving task.
pub struct Postcopy {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    complete: Arc<AtomicBool>,
    demand: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Postcopy {
    /// The source or the link failed before every page arrived: the guest
    /// cannot go on (the VM is lost).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Every missing page has arrived.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// Pages fetched on demand so far.
    pub fn demand(&self) -> u64 {
        self.demand.load(Ordering::Relaxed)
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that makes a destination stop itself (SIGSTOP)
/// right after it answered `Verified`, before it reads `Go`, if its value
/// is the node's certificate directory: the tests' way to freeze the
/// destination at the handover ([`Arrival::stop_after_verified`]).
pub const FAULT_STOP_AFTER_VERIFIED: &str = "CASTOR_FAULT_STOP_AFTER_VERIFIED";

async fn timeout<T>(
    f: impl std::future::Future<Output = Result<T, MigrateError>>,
) -> Result<T, MigrateError> {
    tokio::time::timeout(ANSWER_TIMEOUT, f)
        .await
        .map_err(|_| MigrateError::Link(format!("no message within {ANSWER_TIMEOUT:?}")))?
}

fn unexpected(m: &Msg) -> MigrateError {
    MigrateError::Protocol(format!("unexpected message {m:?}"))
}

/// Waits for one incoming migration on `listener` and runs its guest.
/// Refused handshakes are skipped; a migration that fails before the
/// switch is returned as an error (the source keeps its guest).
pub async fn accept_one(
    listener: &transport::Listener,
    cfg: &DestConfig,
    arrival: &Arrival,
) -> Result<Incoming, MigrateError> {
    let conn = loop {
        match listener.accept_connection().await {
            Ok(c) => break c,
            Err(transport::TransportError::Refused { .. }) => continue,
            Err(e) => return Err(MigrateError::Link(e.to_string())),
        }
    };
    info!(peer = %conn.remote_address(), "incoming migration");
    migrate_in(conn, cfg, arrival).await
}

/// Receives one guest on an authenticated connection.
pub async fn migrate_in(
    conn: quinn::Connection,
    cfg: &DestConfig,
    arrival: &Arrival,
) -> Result<Incoming, MigrateError> {
    let link = |e: quinn::ConnectionError| MigrateError::Link(e.to_string());
    let (ctl_tx, ctl_rx) = conn.accept_bi().await.map_err(link)?;
    let mut ctl = Tx::new(
        ctl_tx,
        Tx::pacer(Default::default()),
        transport::link::LinkShape::default(),
    );
    let mut rx = Rx::new(ctl_rx);
    let p = match prepare(&conn, &mut ctl, &mut rx, cfg, arrival).await {
        Ok(p) => p,
        Err(e) => {
            if !matches!(e, MigrateError::Link(_)) {
                let _ = ctl
                    .msg(&Msg::Refused {
                        reason: e.to_string(),
                    })
                    .await;
                ctl.finish();
                // Closing now could drop the refusal unsent: wait for the
                // source to read it and go (at most a second).
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            }
            warn!("incoming migration failed before the switch: {e}");
            return Err(e);
        }
    };
    run_here(p, conn, ctl, rx, arrival).await
}

/// Everything up to the source's `Go`.
struct Prepared {
    state: MachineState,
    standby: vmm::Standby,
    report: DestReport,
    /// Post-copy: the registered RAM, the missing pages and the bulk stream.
    post: Option<(Arc<MissingPages>, Arc<Vec<AtomicBool>>, Rx)>,
    pages: u64,
}

async fn prepare(
    conn: &quinn::Connection,
    ctl: &mut Tx,
    rx: &mut Rx,
    cfg: &DestConfig,
    arrival: &Arrival,
) -> Result<Prepared, MigrateError> {
    let (memory_bytes, mode, block_size) = match timeout(rx.next()).await? {
        Msg::Hello {
            version,
            memory_bytes,
            mode,
            block_size,
            node,
            vcpus,
        } => {
            if version != MIGRATION_VERSION {
                return Err(MigrateError::Config(format!(
                    "the source speaks migration version {version}, this node {MIGRATION_VERSION}"
                )));
            }
            info!(%node, memory_mib = memory_bytes >> 20, vcpus, "migration hello");
            (memory_bytes, mode, block_size)
        }
        other => return Err(unexpected(&other)),
    };
    payload::mode_from_byte(mode).map_err(|e| MigrateError::Config(e.to_string()))?;
    if memory_bytes == 0
        || memory_bytes % 4096 != 0
        || memory_bytes > cfg.max_memory
        || memory_bytes > vmm::memory::MMIO_HOLE_START
    {
        return Err(MigrateError::Config(format!(
            "guest RAM of {memory_bytes} bytes: this node takes multiples of 4 KiB up to {} bytes (and 3 GiB)",
            cfg.max_memory
        )));
    }
    let pages = memory_bytes / 4096;
    let mut mem =
        vmm::memory::create(memory_bytes).map_err(|e| MigrateError::Machine(e.to_string()))?;
    // The digest of all-zero RAM, kept up to date page by page.
    let zero = [0u8; 4096];
    let mut hashes: Vec<u128> = (0..pages).map(|f| page_hash(f, &zero)).collect();
    let mut sum = hashes.iter().fold(0u128, |a, &h| a.wrapping_add(h));
    let standby = Machine::prepare_standby(mem.clone(), &cfg.kvm_device)?;
    ctl.msg(&Msg::Ready).await?;
    let bulk = conn
        .accept_uni()
        .await
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    let mut brx = Rx::new(bulk);
    let mut rounds = 0;
    // Post-copy: the RAM registered for faults, and the pages discarded.
    let mut registered: Option<Registered> = None;
    let mut n_missing = 0u64;
    let (state, missing, verify) = loop {
        match timeout(brx.next()).await? {
            Msg::Pages { .. } if registered.is_some() => {
                // Writing a discarded page would wait for a fault handler
                // that does not run yet.
                return Err(MigrateError::Protocol(
                    "pages after a post-copy discard".into(),
                ));
            }
            Msg::Pages { records, .. } => {
                vmm::memory::with_ram_mut(&mut mem, |ram| {
                    let st = fgbi::apply(ram, block_size as usize, &records)?;
                    for &p in &st.pages {
                        let i = p as usize;
                        let h = page_hash(p, &ram[i * 4096..(i + 1) * 4096]);
                        sum = sum.wrapping_sub(hashes[i]).wrapping_add(h);
                        hashes[i] = h;
                    }
                    Ok::<_, fgbi::ApplyError>(())
                })
                .map_err(|e| MigrateError::Machine(e.to_string()))?
                .map_err(|e| MigrateError::Protocol(format!("records refused: {e}")))?;
            }
            Msg::Discard { missing } => discard(&mem, &missing, &mut registered, &mut n_missing)?,
            Msg::RoundEnd { round, .. } => {
                rounds = round;
                ctl.msg(&Msg::RoundAck { round }).await?;
            }
            Msg::Switch {
                state,
                missing,
                verify,
            } => break (state, missing, verify),
            other => return Err(unexpected(&other)),
        }
    };
    let raw = payload::unpack_state(&state, vmm::state::MAX_PAYLOAD as usize + 64)
        .map_err(|e| MigrateError::Protocol(e.to_string()))?;
    let state = MachineState::decode(&raw).map_err(|e| MigrateError::Protocol(e.to_string()))?;
    if state.memory_size() != memory_bytes {
        return Err(MigrateError::Protocol(format!(
            "the machine state has {} bytes of RAM, the hello {memory_bytes}",
            state.memory_size()
        )));
    }
    let mut report = DestReport {
        rounds,
        ..Default::default()
    };
    if !missing.is_empty() {
        discard(&mem, &missing, &mut registered, &mut n_missing)?;
    }
    let post = if registered.is_some() && missing.is_empty() {
        return Err(MigrateError::Protocol(
            "pages were discarded for a post-copy, then a pre-copy switch".into(),
        ));
    } else if missing.is_empty() && !verify {
        warn!("the source sent no digest (--no-verify): the memory is not checked");
        None
    } else if missing.is_empty() {
        let want = match timeout(brx.next()).await? {
            Msg::Digest { digest } => u128::from_le_bytes(digest),
            other => return Err(unexpected(&other)),
        };
        if want != sum {
            error!(
                "VERIFY: the received memory differs from the source's (digest {sum:032x}, source {want:032x}); refusing the switch"
            );
            return Err(MigrateError::DigestMismatch);
        }
        report.verified = true;
        None
    } else {
        let (uffd, bits) = registered.take().expect("discarded above");
        report.missing = n_missing;
        Some((uffd, bits, brx))
    };
    ctl.msg(&Msg::Verified {
        claims: arrival.claim.is_some(),
    })
    .await?;
    if arrival.stop_after_verified {
        // `Verified` is only queued on the stream: let the connection's
        // task send it before this process stops (else the source never
        // reads it, and the fault is one before the switch).
        tokio::time::sleep(Duration::from_millis(200)).await;
        warn!("fault injection: stopping this process (SIGSTOP) after Verified");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }
    match timeout(rx.next()).await? {
        Msg::Go => {}
        other => return Err(unexpected(&other)),
    }
    Ok(Prepared {
        state,
        standby,
        report,
        post,
        pages,
    })
}

/// The RAM registered for post-copy faults, and which pages were dropped.
type Registered = (Arc<MissingPages>, Arc<Vec<AtomicBool>>);

/// Drops the destination's copies of the pages in `bitmap` (registering
/// the RAM for faults first, once).
fn discard(
    mem: &vmm::memory::GuestMem,
    bitmap: &[u8],
    post: &mut Option<Registered>,
    n: &mut u64,
) -> Result<(), MigrateError> {
    let pages = vmm::memory::ram_size(mem) / 4096;
    if post.is_none() {
        let uffd = Arc::new(MissingPages::register(mem)?);
        let bits: Arc<Vec<AtomicBool>> =
            Arc::new((0..pages).map(|_| AtomicBool::new(false)).collect());
        *post = Some((uffd, bits));
    }
    let (uffd, bits) = post.as_ref().expect("registered above");
    for f in frames_of(bitmap).filter(|&f| f < pages) {
        if !bits[f as usize].swap(true, Ordering::Relaxed) {
            uffd.discard(f)?;
            *n += 1;
        }
    }
    Ok(())
}

/// After `Go`: the guest runs here (and, in post-copy, its missing pages
/// are fetched and received in the background).
async fn run_here(
    p: Prepared,
    conn: quinn::Connection,
    mut ctl: Tx,
    mut rx: Rx,
    arrival: &Arrival,
) -> Result<Incoming, MigrateError> {
    let Prepared {
        state,
        standby,
        mut report,
        post,
        pages,
    } = p;
    let t = Instant::now();
    if let Some(claim) = &arrival.claim {
        if let Err(why) = claim() {
            error!("the guest arrived but may not run here: {why}; it is not started");
            return Err(MigrateError::Fenced(why));
        }
    }
    let log = match &arrival.log {
        Some(log) => {
            log.reset(state.console_offset);
            log.clone()
        }
        None => ConsoleLog::new(state.console_offset),
    };
    log.set_hold(false);
    let Some((uffd, missing, mut brx)) = post else {
        let machine = Machine::restore_standby(
            standby,
            &state,
            node::console::sink(log.clone()),
            false,
            None,
        )?;
        report.resume_ms = t.elapsed().as_secs_f64() * 1e3;
        // The guest runs here now (its claim, if any, won): a confirmation
        // that cannot go out must not throw it away. A source that misses
        // it finds this node named at the witness and stops.
        if let Err(e) = ctl.msg(&Msg::Finished).await {
            warn!("the guest runs here, but Finished could not be sent to the source: {e}");
        }
        ctl.finish();
        info!(
            console_offset = state.console_offset,
            resume_ms = format!("{:.2}", report.resume_ms),
            "migration in: memory verified, the guest runs here"
        );
        // Let the source read the confirmation before the connection goes.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(conn);
        });
        return Ok(Incoming {
            machine,
            log,
            report,
            postcopy: None,
        });
    };
    let received: Arc<Vec<AtomicBool>> =
        Arc::new((0..pages).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let complete = Arc::new(AtomicBool::new(false));
    let demand = Arc::new(AtomicU64::new(0));
    let (want_tx, mut want_rx) = mpsc::unbounded_channel::<u64>();
    let thread = {
        let (uffd, missing, received, stop, demand) = (
            uffd.clone(),
            missing.clone(),
            received.clone(),
            stop.clone(),
            demand.clone(),
        );
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                let _ = vmm::set_current_thread_realtime(vmm::priority::PAUSE);
                while !stop.load(Ordering::Relaxed) {
                    let f = match uffd.next_fault(Duration::from_millis(50)) {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(e) => {
                            error!("post-copy fault handler: {e}");
                            break;
                        }
                    };
                    let i = f as usize;
                    if !missing[i].load(Ordering::Relaxed) {
                        // Never touched here and never sent: a zero page.
                        let _ = uffd.fill(f, None);
                    } else if received[i].load(Ordering::Relaxed) {
                        let _ = uffd.wake(f);
                    } else {
                        demand.fetch_add(1, Ordering::Relaxed);
                        let _ = want_tx.send(f);
                    }
                }
            })
            .map_err(|e| MigrateError::Machine(format!("starting the fault thread: {e}")))?
    };
    let machine = Machine::restore_standby(
        standby,
        &state,
        node::console::sink(log.clone()),
        false,
        None,
    )?;
    report.resume_ms = t.elapsed().as_secs_f64() * 1e3;
    let n_missing = report.missing;
    info!(
        missing = n_missing,
        "post-copy: the guest runs here; pages it lacks are fetched on demand"
    );
    {
        let (failed, complete) = (failed.clone(), complete.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let mut got = 0u64;
            let mut done = false;
            let place = |page: u64, data: Vec<u8>, got: &mut u64| -> Result<(), MigrateError> {
                if page >= pages {
                    return Err(MigrateError::Protocol(format!("page {page} out of range")));
                }
                let d: Option<&[u8; 4096]> = if data.is_empty() {
                    None
                } else {
                    Some(data.as_slice().try_into().expect("4096 bytes (decoder)"))
                };
                uffd.fill(page, d)?;
                if missing[page as usize].load(Ordering::Relaxed)
                    && !received[page as usize].swap(true, Ordering::Relaxed)
                {
                    *got += 1;
                }
                Ok(())
            };
            let r: Result<(), MigrateError> = async {
                while !(done && got >= n_missing) {
                    tokio::select! {
                        biased;
                        m = rx.next() => match m? {
                            Msg::Page { page, data } => place(page, data, &mut got)?,
                            other => return Err(unexpected(&other)),
                        },
                        Some(f) = want_rx.recv() => {
                            if !received[f as usize].load(Ordering::Relaxed) {
                                ctl.msg(&Msg::Want { page: f }).await?;
                            }
                        }
                        m = brx.next(), if !done => match m? {
                            Msg::Page { page, data } => place(page, data, &mut got)?,
                            Msg::Done => done = true,
                            other => return Err(unexpected(&other)),
                        },
                    }
                }
                ctl.msg(&Msg::Finished).await?;
                ctl.finish();
                Ok(())
            }
            .await;
            match r {
                Ok(()) => {
                    complete.store(true, Ordering::Relaxed);
                    info!(
                        pages = got,
                        ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
                        "post-copy complete: every page is here"
                    );
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    error!("post-copy failed before every page arrived: {e}; the VM is lost");
                }
            }
            drop(conn);
        });
    }
    Ok(Incoming {
        machine,
        log,
        report,
        postcopy: Some(Postcopy {
            stop,
            failed,
            complete,
            demand,
            thread: Some(thread),
        }),
    })
}
