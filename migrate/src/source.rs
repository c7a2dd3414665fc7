//! The source's shell: rounds of pre-copy from a running machine, then the
//! switch the planner chose (stop-and-copy, or post-copy and its page
//! service), over one mutual-TLS QUIC connection.
//!
//! The commit point is the source's `Go`: before it, any failure resumes
//! the guest here, unharmed; after it, the source runs the guest again only
//! if the destination never confirmed `Go` and a claim at the witness takes
//! the VM back from it ([`Switch::reclaim`]; pre-copy only: in post-copy a
//! failure of either side after `Go` loses the VM).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fgbi::Encoder;
use protocol::payload;
use tracing::{info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm::Machine;

use crate::io::{page_hash, Rx, Tx};
use crate::plan::{Decision, Planner, RoundFigures};
use crate::wire::{bitmap_of, Msg, MAX_CHUNK, MIGRATION_VERSION};
use crate::{MigrateError, PostcopyReport, Report, RoundReport, SourceConfig};

/// A failed migration: why, and whether the guest still runs here.
#[derive(Debug)]
pub struct Failure {
    /// Why.
    pub error: MigrateError,
    /// The guest was resumed on the source (a failure before the commit
    /// point); `false`: it is lost or its fate is unknown (after `Go`).
    pub running_here: bool,
}

/// Bytes a second the switch digest reads (xxh3 on two threads here, in
/// the pause — the guest's vCPU is stopped — on a loaded 2-core host:
/// 256 MiB in ~13-24 ms). Timing a sample while the guest runs was tried:
/// it read 2-8 times slower than the pause does (the vCPU and other work
/// share the cores then) and sent migrations that fit to post-copy.
const DIGEST_RATE: f64 = 16e9;

/// A connection silent this long is dead (QUIC keep-alives go every
/// 500 ms): the destination gives a dead source up after this, not after
/// the pair's 10 s.
pub const LINK_IDLE: Duration = Duration::from_secs(3);

/// How long the source waits for any one answer of the destination.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest this process may have been frozen (SIGSTOP, a stalled
/// host) between sending the switch and sending `Go`. The destination gives
/// a silent source up after [`LINK_IDLE`] (its keep-alives go every
/// 500 ms): after a freeze this long it may already have, and a `Go` sent
/// then may never arrive while the witness names the destination. The
/// source then sends no `Go`, takes the VM back ([`Switch::revoke`]) and
/// resumes the guest here.
pub const MAX_FREEZE_AT_SWITCH: Duration = Duration::from_millis(1500);

/// Notices that this process was frozen: a thread that ticks every 20 ms
/// and keeps the longest gap between its ticks since [`FreezeWatch::mark`]
/// (a frozen process runs no thread, while the monotonic clock goes on).
struct FreezeWatch {
    t0: Instant,
    last_ns: Arc<std::sync::atomic::AtomicU64>,
    max_gap_ns: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FreezeWatch {
    fn start() -> FreezeWatch {
        let t0 = Instant::now();
        let last_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let max_gap_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (last, gap, st) = (last_ns.clone(), max_gap_ns.clone(), stop.clone());
        let _ = std::thread::Builder::new()
            .name("freeze-watch".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    let now = t0.elapsed().as_nanos() as u64;
                    let prev = last.swap(now, Ordering::Relaxed);
                    gap.fetch_max(now.saturating_sub(prev), Ordering::Relaxed);
                }
            });
        FreezeWatch {
            t0,
            last_ns,
            max_gap_ns,
            stop,
        }
    }

    /// Starts a new span.
    fn mark(&self) {
        self.last_ns
            .store(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.max_gap_ns.store(0, Ordering::Relaxed);
    }

    /// The longest freeze since the mark, the one that may just have ended
    /// (before the thread ticked again) included.
    fn longest(&self) -> Duration {
        let now = self.t0.elapsed().as_nanos() as u64;
        let current = now.saturating_sub(self.last_ns.load(Ordering::Relaxed));
        Duration::from_nanos(self.max_gap_ns.load(Ordering::Relaxed).max(current))
    }
}

impl Drop for FreezeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Source<'a> {
    machine: &'a mut Machine,
    cfg: &'a SourceConfig,
    pages: u64,
    encoder: Encoder,
    bulk: Option<Tx>,
    ctl: Tx,
    rx: Rx,
    committed: bool,
    /// The destination claims the VM at the witness before it runs it
    /// (its `Verified` said so).
    dest_claims: bool,
    /// Sending `Go` failed (to a destination that claims): why.
    go_lost: Option<String>,
    switch: &'a dyn Switch,
    freeze: FreezeWatch,
}

/// The commit point as the source's owner sees it: whether the guest may
/// move (a primary hands the VM's ownership to the destination at the
/// witness first), and that it has.
pub trait Switch: Sync {
    /// Called with the guest paused here and the destination ready to run
    /// it, just before `Go`. `Ok`: send `Go`. An error: no `Go`; the guest
    /// resumes here — unless it is [`MigrateError::Fenced`]: another node
    /// owns the VM, and the guest stops here as well.
    fn approve(&self) -> Result<(), MigrateError> {
        Ok(())
    }

    /// Called after [`Switch::approve`] succeeded when `Go` is not sent
    /// after all (this process was frozen at the switch: the destination
    /// may have given the migration up, [`MAX_FREEZE_AT_SWITCH`]): take the
    /// VM back from the destination. `Ok`: the guest resumes here; an
    /// error ([`MigrateError::Fenced`]): it may not, and stops here.
    fn revoke(&self) -> Result<(), MigrateError> {
        Ok(())
    }

    /// Called when `Go` was sent but the destination's confirmation
    /// (`Finished`) never came: it may have read `Go` and run the guest, or
    /// never have read it (its link timed out while it was frozen). The
    /// source alone cannot tell the two apart; a primary asks the witness:
    /// a destination claims the VM there (from the token of the handover)
    /// before it runs the guest, and this races that claim with one of its
    /// own. `Ok(true)`: the VM was taken back, the guest resumes here;
    /// `Ok(false)`: the destination holds the VM (without a witness nobody
    /// can tell, and the move is counted as done); an error
    /// ([`MigrateError::Fenced`]): the guest stops here.
    fn reclaim(&self) -> Result<bool, MigrateError> {
        Ok(false)
    }

    /// The move is done: the guest never runs here again. A console
    /// service ends its stream here, so that clients move on to the
    /// destination.
    fn committed(&self) {}
}

/// A source with nothing to ask before `Go` and nothing to do after it.
pub struct NoGate;

impl Switch for NoGate {}

impl<F: Fn() + Sync> Switch for F {
    fn committed(&self) {
        self()
    }
}

/// Migrates `machine` (running) to the destination at `addr`. On success
/// the machine is stopped and the report says how it went; on failure
/// before the commit point the machine runs again here.
///
/// `switch` approves the move just before `Go` and hears that it
/// happened ([`Switch`]).
pub async fn migrate_out(
    machine: &mut Machine,
    addr: SocketAddr,
    tls: &transport::NodeTls,
    cfg: &SourceConfig,
    switch: &dyn Switch,
) -> Result<Report, Failure> {
    let t0 = Instant::now();
    let mut committed = false;
    let r = run(machine, addr, tls, cfg, t0, &mut committed, switch).await;
    match r {
        Ok(rep) => {
            machine.stop();
            Ok(rep)
        }
        Err(error) => {
            if let MigrateError::Fenced(why) = &error {
                warn!("migration stopped: {why}; this node's guest is stopped");
                machine.stop();
                Err(Failure {
                    error,
                    running_here: false,
                })
            } else if committed {
                warn!("migration failed after the commit point: {error}");
                machine.stop();
                Err(Failure {
                    error,
                    running_here: false,
                })
            } else {
                let _ = machine.set_dirty_tracking(false);
                let resumed = machine.resume();
                warn!("migration did not complete: {error}; the VM keeps running here");
                Err(Failure {
                    error,
                    running_here: resumed.is_ok(),
                })
            }
        }
    }
}

async fn run(
    machine: &mut Machine,
    addr: SocketAddr,
    tls: &transport::NodeTls,
    cfg: &SourceConfig,
    t0: Instant,
    committed: &mut bool,
    switch: &dyn Switch,
) -> Result<Report, MigrateError> {
    let (_endpoint, conn) = transport::connect_connection(addr, tls, LINK_IDLE)
        .await
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    let link = |e: quinn::ConnectionError| MigrateError::Link(e.to_string());
    let (ctl_tx, ctl_rx) = conn.open_bi().await.map_err(link)?;
    let _ = ctl_tx.set_priority(transport::CONTROL_PRIORITY);
    let bulk_tx = conn.open_uni().await.map_err(link)?;
    let pacer = Tx::pacer(cfg.link);
    let mut ctl = Tx::new(ctl_tx, pacer.clone(), cfg.link);
    let mut rx = Rx::new(ctl_rx);
    let mem_bytes = vmm::memory::ram_size(machine.memory());
    let pages = mem_bytes / 4096;
    ctl.msg(&Msg::Hello {
        version: MIGRATION_VERSION,
        node: cfg.node.clone(),
        mode: payload::mode_byte(cfg.mode),
        block_size: cfg.block_size as u32,
        memory_bytes: mem_bytes,
        vcpus: machine.vcpu_count() as u32,
    })
    .await?;
    match timeout(rx.next()).await? {
        Msg::Ready => {}
        Msg::Refused { reason } => return Err(MigrateError::Refused(reason)),
        other => return Err(unexpected(&other)),
    }
    let encoder = Encoder::new(
        fgbi::Config {
            mode: cfg.mode,
            block_size: cfg.block_size,
            budget_bytes: cfg.budget.unwrap_or(mem_bytes),
            key: rand::random(),
        },
        pages,
    )
    .map_err(|e| MigrateError::Config(e.to_string()))?;
    let mut s = Source {
        machine,
        cfg,
        pages,
        encoder,
        bulk: Some(Tx::new(bulk_tx, pacer, cfg.link)),
        ctl,
        rx,
        committed: false,
        dest_claims: false,
        go_lost: None,
        switch,
        freeze: FreezeWatch::start(),
    };
    let r = s.rounds(t0).await;
    *committed = s.committed;
    r
}

async fn timeout<T>(
    f: impl std::future::Future<Output = Result<T, MigrateError>>,
) -> Result<T, MigrateError> {
    tokio::time::timeout(ANSWER_TIMEOUT, f)
        .await
        .map_err(|_| MigrateError::Link(format!("no answer within {ANSWER_TIMEOUT:?}")))?
}

fn unexpected(m: &Msg) -> MigrateError {
    MigrateError::Protocol(format!("unexpected message {m:?}"))
}

trait OneRegion {
    fn num_regions_is_one(&self) -> bool;
}
impl OneRegion for vmm::memory::GuestMem {
    fn num_regions_is_one(&self) -> bool {
        vm_memory::GuestMemoryBackend::num_regions(self) == 1
    }
}

impl Source<'_> {
    fn bulk(&mut self) -> &mut Tx {
        self.bulk.as_mut().expect("the bulk stream")
    }

    async fn rounds(&mut self, t0: Instant) -> Result<Report, MigrateError> {
        if !self.machine.memory().num_regions_is_one() {
            return Err(MigrateError::Config(
                "migration supports guests of at most 3 GiB (RAM in one region)".into(),
            ));
        }
        self.machine.set_dirty_tracking(true)?;
        self.machine.harvest_dirty()?;
        let mut plan = self.cfg.plan.clone();
        if self.cfg.verify {
            // The digest reads all of RAM in the pause.
            plan.switch_cost += Duration::from_secs_f64(self.pages as f64 * 4096.0 / DIGEST_RATE);
        }
        let mut planner = Planner::new(plan);
        let mut to_send: Vec<u64> = (0..self.pages).collect();
        let mut round = 0u32;
        let mut reports = Vec::new();
        let decision = loop {
            round += 1;
            let t = Instant::now();
            let before = self.bulk().bytes;
            self.send_pages(round, &to_send).await?;
            self.bulk()
                .msg(&Msg::RoundEnd {
                    round,
                    pages: to_send.len() as u64,
                })
                .await?;
            let sent = t.elapsed();
            match timeout(self.rx.next()).await? {
                Msg::RoundAck { round: r } if r == round => {}
                Msg::Refused { reason } => return Err(MigrateError::Refused(reason)),
                other => return Err(unexpected(&other)),
            }
            let duration = t.elapsed();
            let dirty = self.machine.harvest_dirty()?;
            let n_sent = to_send.len() as u64;
            to_send = dirty.frames().filter(|&f| f < self.pages).collect();
            let fig = RoundFigures {
                pages: n_sent,
                bytes: self.bulk().bytes - before,
                duration,
                dirtied: to_send.len() as u64,
            };
            planner.observe(fig);
            let d = planner.decide(to_send.len() as u64);
            info!(
                round,
                pages = fig.pages,
                bytes = fig.bytes,
                ms = format!("{:.1}", duration.as_secs_f64() * 1e3),
                sent_ms = format!("{:.1}", sent.as_secs_f64() * 1e3),
                dirty = fig.dirtied,
                decision = ?d,
                "pre-copy round"
            );
            reports.push(RoundReport::from(fig));
            if !matches!(d, Decision::Continue { .. }) {
                break d;
            }
        };
        let mut report = Report {
            path: String::new(),
            mode: self.cfg.mode.to_string(),
            rounds: reports,
            bytes: 0,
            total_ms: 0.0,
            pause_ms: 0.0,
            predicted_ms: 0.0,
            final_pages: 0,
            digest: None,
            console_offset: 0,
            postcopy: None,
        };
        match decision {
            Decision::PostCopy { stop_and_copy } => {
                report.path = "post-copy".into();
                report.predicted_ms = stop_and_copy.as_secs_f64() * 1e3;
                self.postcopy(to_send, round + 1, &mut report).await?;
            }
            Decision::Stop { predicted } | Decision::StopAnyway { predicted } => {
                report.path = if matches!(decision, Decision::Stop { .. }) {
                    "pre-copy"
                } else {
                    "pre-copy (stopped anyway: not converging)"
                }
                .into();
                report.predicted_ms = predicted.as_secs_f64() * 1e3;
                if matches!(decision, Decision::StopAnyway { .. }) {
                    warn!(
                        predicted_ms = report.predicted_ms,
                        "pre-copy does not converge and post-copy is forbidden: stopping anyway; expect a stall of about {:.0} ms",
                        report.predicted_ms
                    );
                }
                self.stop_and_copy(to_send, round + 1, &mut report).await?;
            }
            Decision::Continue { .. } => unreachable!("the loop ends on another decision"),
        }
        report.bytes = self.bulk().bytes + self.ctl.bytes;
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        info!(
            path = %report.path,
            total_ms = format!("{:.1}", report.total_ms),
            pause_ms = format!("{:.1}", report.pause_ms),
            bytes = report.bytes,
            rounds = report.rounds.len(),
            "migration done"
        );
        Ok(report)
    }

    /// Encodes `frames` (read from the guest's RAM now) as round `round`.
    async fn send_pages(&mut self, round: u32, frames: &[u64]) -> Result<(), MigrateError> {
        let mut page = [0u8; 4096];
        let mut chunk = Vec::with_capacity(MAX_CHUNK);
        for &f in frames {
            self.machine
                .memory()
                .read_slice(&mut page, GuestAddress(f * 4096))
                .map_err(|e| MigrateError::Machine(format!("reading page {f}: {e}")))?;
            self.encoder.encode_page(f, &page, &mut chunk);
            if chunk.len() > MAX_CHUNK - (16 << 10) {
                let records = std::mem::replace(&mut chunk, Vec::with_capacity(MAX_CHUNK));
                self.bulk().msg(&Msg::Pages { round, records }).await?;
            }
        }
        if !chunk.is_empty() {
            self.bulk()
                .msg(&Msg::Pages {
                    round,
                    records: chunk,
                })
                .await?;
        }
        Ok(())
    }

    /// Pauses the guest and takes the pages dirty since the last round
    /// with those not yet sent; captures the machine state.
    fn pause_and_capture(
        &mut self,
        pending: Vec<u64>,
    ) -> Result<(Vec<u64>, Vec<u8>, u64), MigrateError> {
        self.machine.pause()?;
        let dirty = self.machine.harvest_dirty()?;
        let mut set: BTreeSet<u64> = pending.into_iter().collect();
        set.extend(dirty.frames().filter(|&f| f < self.pages));
        let state = self.machine.capture()?;
        Ok((
            set.into_iter().collect(),
            payload::pack_state(&state.encode()),
            state.console_offset,
        ))
    }

    /// The commit point: the owner approves, then `Go` — unless this
    /// process was frozen since the switch began, in which case the
    /// destination may have given the migration up: the VM is taken back
    /// and the guest resumes here.
    async fn go(&mut self) -> Result<(), MigrateError> {
        self.switch.approve()?;
        let frozen = self.freeze.longest();
        if frozen > MAX_FREEZE_AT_SWITCH {
            warn!(
                frozen_ms = frozen.as_millis() as u64,
                "this node was frozen at the switch: the destination may have given the migration up; no Go, taking the VM back"
            );
            self.switch.revoke()?;
            return Err(MigrateError::Link(format!(
                "this node was frozen for {} ms at the switch (the destination gives a silent source up after {} ms): no Go was sent, the VM was taken back",
                frozen.as_millis(),
                LINK_IDLE.as_millis()
            )));
        }
        self.committed = true;
        if let Err(e) = self.ctl.msg(&Msg::Go).await {
            if !self.dest_claims {
                return Err(e);
            }
            // The destination may or may not have it: the witness decides
            // ([`Source::confirm`]).
            self.go_lost = Some(e.to_string());
        }
        Ok(())
    }

    /// After `Go` (pre-copy): the destination's `Finished`, or, missing
    /// it, the witness's word on who holds the VM ([`Switch::reclaim`]).
    /// An error with `committed` cleared: the VM was taken back and the
    /// guest resumes here.
    async fn confirm(&mut self) -> Result<(), MigrateError> {
        let lost = if let Some(e) = self.go_lost.take() {
            Some(format!("sending Go failed: {e}"))
        } else {
            match timeout(self.rx.next()).await {
                Ok(Msg::Finished) => None,
                Ok(other) => Some(format!("{other:?} instead")),
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(why) = lost {
            if !self.dest_claims {
                // It runs the guest on `Go` without asking the witness: a
                // claim back could make two runners.
                warn!("after Go, the destination's confirmation did not come ({why}); it does not claim the VM at the witness, so the move counts as done");
                self.switch.committed();
                return Ok(());
            }
            warn!("after Go, the destination's confirmation did not come ({why}): asking the witness who holds the VM");
            if self.switch.reclaim()? {
                self.committed = false;
                return Err(MigrateError::Link(format!(
                    "the destination never confirmed Go ({why}) and had not claimed the VM: it was taken back at the witness and the guest resumes here"
                )));
            }
        }
        self.switch.committed();
        Ok(())
    }

    async fn stop_and_copy(
        &mut self,
        pending: Vec<u64>,
        round: u32,
        report: &mut Report,
    ) -> Result<(), MigrateError> {
        let tp = Instant::now();
        self.freeze.mark();
        let (last, state, offset) = self.pause_and_capture(pending)?;
        report.final_pages = last.len() as u64;
        report.console_offset = offset;
        self.send_pages(round, &last).await?;
        let verify = self.cfg.verify;
        self.bulk()
            .msg(&Msg::Switch {
                state,
                missing: Vec::new(),
                verify,
            })
            .await?;
        let td = Instant::now();
        if verify {
            let pages = self.pages;
            let digest = self
                .machine
                .with_ram_paused(|ram| digest_of(&ram[..(pages * 4096) as usize]))?;
            report.digest = Some(format!("{digest:032x}"));
            self.bulk()
                .msg(&Msg::Digest {
                    digest: digest.to_le_bytes(),
                })
                .await?;
        }
        let digest_ms = td.elapsed().as_secs_f64() * 1e3;
        match timeout(self.rx.next()).await? {
            Msg::Verified { claims } => self.dest_claims = claims,
            Msg::Refused { reason } => return Err(MigrateError::Refused(reason)),
            other => return Err(unexpected(&other)),
        }
        let verified_ms = tp.elapsed().as_secs_f64() * 1e3;
        self.go().await?;
        self.confirm().await?;
        report.pause_ms = tp.elapsed().as_secs_f64() * 1e3;
        info!(
            digest_ms = format!("{digest_ms:.1}"),
            verified_ms = format!("{verified_ms:.1}"),
            pause_ms = format!("{:.1}", report.pause_ms),
            "switch"
        );
        self.bulk().finish();
        Ok(())
    }

    async fn postcopy(
        &mut self,
        pending: Vec<u64>,
        round: u32,
        report: &mut Report,
    ) -> Result<(), MigrateError> {
        // While the guest still runs here: the destination drops its stale
        // copies of the pages dirtied in the last round (a system call a
        // page) before the pause, not in it.
        let bitmap = bitmap_of(pending.iter().copied(), self.pages);
        self.bulk().msg(&Msg::Discard { missing: bitmap }).await?;
        self.bulk().msg(&Msg::RoundEnd { round, pages: 0 }).await?;
        match timeout(self.rx.next()).await? {
            Msg::RoundAck { round: r } if r == round => {}
            Msg::Refused { reason } => return Err(MigrateError::Refused(reason)),
            other => return Err(unexpected(&other)),
        }
        let tp = Instant::now();
        self.freeze.mark();
        let (missing, state, offset) = self.pause_and_capture(pending)?;
        report.final_pages = missing.len() as u64;
        report.console_offset = offset;
        let bitmap = bitmap_of(missing.iter().copied(), self.pages);
        self.bulk()
            .msg(&Msg::Switch {
                state,
                missing: bitmap,
                verify: false,
            })
            .await?;
        match timeout(self.rx.next()).await? {
            Msg::Verified { .. } => {}
            Msg::Refused { reason } => return Err(MigrateError::Refused(reason)),
            other => return Err(unexpected(&other)),
        }
        self.go().await?;
        // The destination runs the guest before every page is there: the
        // source cannot take it back, and its console ends here now.
        self.switch.committed();
        report.pause_ms = tp.elapsed().as_secs_f64() * 1e3;
        info!(
            missing = missing.len(),
            "post-copy: the guest runs on the destination; pushing the rest"
        );
        let tg = Instant::now();
        // The background push runs on a task of its own (a write must never
        // be cancelled half-way through a frame); the demand service here.
        let sent: Arc<Vec<AtomicBool>> =
            Arc::new((0..self.pages).map(|_| AtomicBool::new(false)).collect());
        let mut bulk = self.bulk.take().expect("the bulk stream");
        let push = {
            let (mem, sent, missing) =
                (self.machine.memory().clone(), sent.clone(), missing.clone());
            tokio::spawn(async move {
                let mut pushed = 0u64;
                for chunk in missing.chunks(16) {
                    let mut frames = Vec::new();
                    for &f in chunk {
                        if sent[f as usize].swap(true, Ordering::Relaxed) {
                            continue;
                        }
                        Msg::Page {
                            page: f,
                            data: read_page(&mem, f)?,
                        }
                        .encode(&mut frames);
                        pushed += 1;
                    }
                    bulk.send(&frames).await?;
                }
                bulk.msg(&Msg::Done).await?;
                Ok::<_, MigrateError>((pushed, bulk))
            })
        };
        let mut demand = 0u64;
        loop {
            match self.rx.next().await? {
                Msg::Want { page } if page < self.pages => {
                    // Sent again even if the push took it already (it may
                    // still be on its way behind other pages).
                    if !sent[page as usize].swap(true, Ordering::Relaxed) {
                        demand += 1;
                    }
                    let data = read_page(self.machine.memory(), page)?;
                    self.ctl.msg(&Msg::Page { page, data }).await?;
                }
                Msg::Finished => break,
                other => return Err(unexpected(&other)),
            }
        }
        let (pushed, bulk) = push
            .await
            .map_err(|e| MigrateError::Link(format!("the push task: {e}")))??;
        self.bulk = Some(bulk);
        self.bulk().finish();
        report.postcopy = Some(PostcopyReport {
            missing: missing.len() as u64,
            demand,
            pushed,
            ms: tg.elapsed().as_secs_f64() * 1e3,
        });
        Ok(())
    }
}

fn read_page(mem: &vmm::memory::GuestMem, f: u64) -> Result<Vec<u8>, MigrateError> {
    let mut page = vec![0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(f * 4096))
        .map_err(|e| MigrateError::Machine(format!("reading page {f}: {e}")))?;
    if page.iter().all(|&b| b == 0) {
        page.clear();
    }
    Ok(page)
}

/// The digest of all of RAM — the wrapping sum of [`crate::page_hash`] over
/// its pages, which the destination keeps up to date as it applies — of RAM given as one slice, on two threads (the
/// guest is paused: its vCPUs' CPU time is free).
fn digest_of(ram: &[u8]) -> u128 {
    let half = (ram.len() / 4096 / 2) * 4096;
    let part = |base: u64, r: &[u8]| {
        r.chunks_exact(4096).enumerate().fold(0u128, |a, (i, p)| {
            a.wrapping_add(page_hash(base + i as u64, p))
        })
    };
    std::thread::scope(|s| {
        let hi = s.spawn(|| part((half / 4096) as u64, &ram[half..]));
        let lo = part(0, &ram[..half]);
        lo.wrapping_add(hi.join().expect("digest thread"))
    })
}
