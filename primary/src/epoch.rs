//! The epoch loop: when to pre-copy, pause, checkpoint and send; network
//! events fed to the [`PrimaryCore`] and its actions carried out.
//!
//! Every epoch: (pre-copy while the guest runs) → pause → harvest → copy
//! the dirty pages → capture the machine state → note the console offset →
//! resume → encode → send. The console bytes of epoch `k` are released when
//! the core says so: on the backup's ack of `k`.
//!
//! How long each epoch is, and its pre-copy window, is the [`pace`] module's.

mod pace;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::console::ConsoleLog;
use node::ha::{PrimaryAction, PrimaryCore, PrimaryInput};
use node::packets::PacketHold;
use protocol::EndReason;
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};
use vmm::Machine;

use crate::checkpoint::Session;
use crate::copy::Staging;
use crate::net::{NetEvent, Outgoing};
use crate::{Config, EpochFigures, Metrics, PrimaryError};

/// Real-time priority of the epoch thread while the guest is paused.
const PAUSE_PRIORITY: i32 = vmm::priority::PAUSE;

/// How long a new session waits for the backup's reuse offer before it
/// sends a full resync instead.
const OFFER_WAIT: Duration = Duration::from_secs(10);

/// A session whose hello is sent, waiting for the backup's reuse offer.
pub(crate) struct Awaiting {
    session: Session,
    offer: protocol::reuse::Assembler,
}

/// The wait before asking an unreachable witness again.
pub(crate) const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What the shell keeps with a checkpoint in flight: when it was committed
/// to the network, and when its pause began.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    sent: Instant,
    paused: Instant,
    /// The guest's network frames up to the end of this epoch: released
    /// with its console bytes.
    net_upto: u64,
}

pub(crate) struct EpochLoop<'a> {
    pub cfg: &'a Config,
    pub machine: Machine,
    pub log: Arc<ConsoleLog>,
    /// The guest's network output, if it has a card: held and released
    /// exactly as the console.
    pub packets: Option<Arc<PacketHold>>,
    pub metrics: Arc<Metrics>,
    pub out: mpsc::Sender<Outgoing>,
    pub core: PrimaryCore<InFlight>,
    pub pages: u64,
    pub session: Option<Session>,
    pub staging: Staging,
    /// This thread is at real-time priority for the pause.
    pub rt_pause: bool,
    /// Where the witness's answers go (the loop's own event channel).
    pub claims: std_mpsc::Sender<NetEvent>,
    /// The runtime that runs claims (blocking calls to the witness).
    pub rt: tokio::runtime::Handle,
    /// The guest is paused because the hold is full while the witness decides.
    pub held_pause: bool,
    /// The heartbeat path's port and key (for the hello).
    pub beat: (u16, [u8; 32]),
    /// The generation of every page: the tag of the checkpoint that last
    /// carried it (`vmm::image`).
    pub gens: Arc<vmm::image::GenTable>,
    /// A session waiting for the backup's reuse offer.
    pub awaiting: Option<Awaiting>,
    /// When the current session's hello went out (for `protected_ms`).
    pub hello_at: Option<Instant>,
    /// The network task (with a backup).
    pub net: Option<crate::net::NetTask>,
    /// A migration asked on the control socket, for the loop to carry out
    /// between epochs.
    pub migration: Option<Box<crate::migration::Order>>,
    /// The backup protected toward (`cfg.backup` at first, then what the
    /// control socket asks for); `None`: unprotected.
    pub target: Option<crate::retarget::Target>,
    /// A change of backup asked on the control socket, for the loop to
    /// carry out between epochs.
    pub retarget: Option<Box<crate::retarget::Order>>,
    /// The disk blocks that differ from the backup's, read for the
    /// session's first checkpoint ([`crate::disk`]).
    pub disk_diff: Option<crate::disk::Diff>,
    /// This loop's sign of progress for the heartbeat thread.
    pub alive: Arc<crate::net::Alive>,
    /// The protocol versions the next hello offers (5 alone to a castor
    /// 0.1 backup, which refuses later ones).
    pub versions: protocol::version::Fallback,
}

impl EpochLoop<'_> {
    /// Runs until `stop`, the guest stops, or this node is fenced.
    pub fn run(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<(), PrimaryError> {
        let mut pace = pace::Pacer::new(self.cfg.epoch, self.cfg.precopy);
        // The next deadline after an epoch that was due at `ended`.
        let after = |ended: Instant, len: Duration| {
            let next = ended + len;
            let now = Instant::now();
            if now > next {
                now + len
            } else {
                next
            }
        };
        let mut next = Instant::now() + pace.len();
        self.set_hold(false);
        warn!("UNPROTECTED: no backup yet; the guest runs, output is released at once");

        let mut pre_done = false;
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            self.alive.touch();
            if let Some(r) = self.machine.wait_exit(Duration::ZERO) {
                return Err(PrimaryError::GuestStopped(r));
            }
            if let Some(order) = self.migration.take() {
                if self.migrate(*order, events)? {
                    // The guest runs on the destination now.
                    return Ok(());
                }
                next = Instant::now() + pace.len();
                pre_done = false;
                waited = Duration::ZERO;
                continue;
            }
            if let Some(order) = self.retarget.take() {
                self.retarget(*order, events)?;
                next = Instant::now() + pace.len();
                pre_done = false;
                waited = Duration::ZERO;
                continue;
            }
            if self
                .awaiting
                .as_ref()
                .is_some_and(|_| self.hello_at.is_some_and(|t| t.elapsed() > OFFER_WAIT))
            {
                self.offer_overdue()?;
            }
            // The next deadline: the pre-copy point, then the epoch's end.
            let precopy = pace.precopy();
            let pre_at = (!pre_done && self.session.is_some() && !precopy.is_zero())
                .then(|| next.checked_sub(precopy))
                .flatten();
            let deadline = pre_at.unwrap_or(next);
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
                    next = next.max(Instant::now() + precopy);
                }
                waited += w;
                pre_done = true;
                if self.session.is_some() {
                    self.staging.precopy(&mut self.machine)?;
                }
                continue;
            }
            pre_done = false;
            let ended = next;
            next = after(ended, pace.len());
            if self.session.is_none() {
                waited = Duration::ZERO;
                continue;
            }
            let w = Instant::now();
            if !self.wait_in_flight(events, stop)? {
                return Ok(());
            }
            waited += w.elapsed();
            let Some(session) = self.session.as_ref().map(Session::id) else {
                continue;
            };
            let start = Instant::now();
            if let Some(mut f) = self.epoch(std::mem::take(&mut waited))? {
                // The next epoch's length: the same, or auto's new choice.
                if pace.done(session, start, &mut f) {
                    next = after(ended, pace.len());
                }
                self.metrics.pace(pace.chosen(), pace.choice());
                self.metrics.epoch(f);
            }
        }
        Ok(())
    }

    /// A planned stop (the loop's end, or a migration): the network task
    /// says goodbye naming the last checkpoint queued, so that the backup
    /// ends the session only once it has committed it — and stands down
    /// at once — and finishes the data stream behind it; then the task
    /// ends. Waits while the queue is full (bounded: a stopping network
    /// task gives up after [`crate::net::GOODBYE_WAIT`] and drops the
    /// queue). The session's end and the acks arrive as events.
    pub fn end_protection(&mut self) {
        let Some(net) = self.net.take() else {
            return;
        };
        net.stopping();
        let last_epoch = self.session.as_ref().map_or(0, Session::last_epoch);
        net.farewell.set(last_epoch);
        let _ = self.out.blocking_send(Outgoing::Goodbye { last_epoch });
        net.finish(&self.rt);
    }

    /// Protection again after [`Self::end_protection`] (a migration that
    /// failed before the switch): a new network task, whose connection
    /// starts a new session.
    pub fn restart_protection(&mut self) -> Result<(), PrimaryError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let cfg = crate::Config {
            backup: Some(target.addr),
            tls: target.tls.clone(),
            ..self.cfg.clone()
        };
        let (task, ends) = crate::net::NetTask::spawn(
            &cfg,
            target.addr,
            &self.rt,
            self.claims.clone(),
            self.alive.clone(),
        )?;
        self.out = ends.out;
        self.beat = ends.beat;
        self.net = Some(task);
        Ok(())
    }

    /// Bounded in-flight checkpoints: waits (handling events) until the core
    /// lets another one go. False: stop, or the network task is gone.
    fn wait_in_flight(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<bool, PrimaryError> {
        while self.core.in_session() && !self.core.may_send() {
            self.alive.touch();
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

    pub(crate) fn on_event(&mut self, ev: NetEvent) -> Result<(), PrimaryError> {
        let input = match ev {
            NetEvent::Connected => PrimaryInput::Connected,
            NetEvent::Ack(epoch) => PrimaryInput::Ack { epoch },
            NetEvent::Ended(reason) => {
                self.versions_after(&reason);
                PrimaryInput::Ended(reason)
            }
            NetEvent::Claimed(claim) => PrimaryInput::Claimed(claim),
            NetEvent::Offer(m) => return self.on_offer(m),
            NetEvent::Migrate(order) => {
                if self.migration.is_some() {
                    order.refuse("a migration is already asked");
                } else {
                    self.migration = Some(order);
                }
                return Ok(());
            }
            NetEvent::Protect(order) => {
                if self.retarget.is_some() {
                    order.refuse("a change of backup is already asked");
                } else {
                    self.retarget = Some(order);
                }
                return Ok(());
            }
        };
        self.feed(input)?;
        self.bound_the_hold()
    }

    /// While the witness decides, output is held and the guest runs on; when
    /// the hold is full the guest is paused until the decision.
    fn bound_the_hold(&mut self) -> Result<(), PrimaryError> {
        let held = self.log.end() - self.log.released();
        if self.core.claiming() && !self.held_pause && held > self.cfg.hold_limit {
            warn!(
                held,
                "the witness has not decided and the output hold is full: pausing the guest"
            );
            self.machine.pause()?;
            self.held_pause = true;
        } else if !self.core.claiming() && self.held_pause {
            info!("the witness decided: the guest runs again");
            self.machine.resume()?;
            self.held_pause = false;
        }
        Ok(())
    }

    /// Holds (or releases and stops holding) the console and the network.
    fn set_hold(&self, hold: bool) {
        self.log.set_hold(hold);
        if let Some(p) = &self.packets {
            p.set_hold(hold);
        }
    }

    /// Asks the witness, off this thread; the answer comes back as an event.
    fn claim(&self, expected: u64, retry: bool) {
        let Some(w) = self.cfg.witness.clone() else {
            unreachable!("the core claims only with a witness");
        };
        let me = self.cfg.node.clone();
        let answer = self.claims.clone();
        self.rt.spawn_blocking(move || {
            if retry {
                std::thread::sleep(CLAIM_RETRY);
            }
            let claim = w.claim(&me, expected);
            if claim == node::ha::Claim::Unreachable {
                if !retry {
                    warn!(witness = %w.describe(), "the witness does not answer; holding output and asking again");
                }
            } else {
                info!(expected, ?claim, "witness claim");
            }
            let _ = answer.send(NetEvent::Claimed(claim));
        });
    }

    /// Gives the core an input and carries out its actions.
    pub(crate) fn feed(&mut self, input: PrimaryInput<InFlight>) -> Result<(), PrimaryError> {
        for action in self.core.on(input) {
            match action {
                PrimaryAction::StartSession => self.start_session()?,
                PrimaryAction::Protected => {
                    self.metrics.set_protected(true);
                    if let Some(t) = self.hello_at.take() {
                        self.metrics
                            .resync_protected(t.elapsed().as_secs_f64() * 1e3);
                    }
                    info!("PROTECTED: the backup committed a checkpoint it may resume from");
                }
                PrimaryAction::Release { upto, acked } => {
                    self.log.release(upto);
                    if let (Some(p), Some(net)) =
                        (&self.packets, acked.iter().map(|(_, f)| f.net_upto).max())
                    {
                        p.release(net);
                    }
                    for (_, f) in acked {
                        self.metrics.ack(f.sent.elapsed());
                        self.metrics.release(f.paused.elapsed());
                    }
                }
                PrimaryAction::EndSession(reason) => {
                    self.awaiting = None;
                    warn!("ending the session with the backup: {reason}");
                    let _ = self.out.blocking_send(Outgoing::End(reason));
                }
                PrimaryAction::Unprotected(reason) => {
                    self.session_over()?;
                    self.metrics.set_protected(false);
                    error!("UNPROTECTED: lost the backup ({reason}); the guest keeps running, output is released at once; waiting for a backup to re-protect");
                    self.set_hold(false);
                }
                PrimaryAction::Claim { expected, retry } => {
                    self.awaiting = None;
                    if !retry {
                        self.session_over()?;
                        self.metrics.set_protected(false);
                        if self.core.holding() {
                            warn!("lost the backup: asking the witness whether this node may carry on alone; output is held meanwhile");
                        } else {
                            warn!("lost the backup before it held a checkpoint to resume from: asking the witness whether this node may carry on alone; output is not held");
                        }
                    }
                    self.claim(expected, retry);
                }
                PrimaryAction::Fence(reason) => {
                    // Held output stays held: the other node continues from
                    // its last committed checkpoint; this guest must not be seen.
                    self.session_over()?;
                    if let Some(p) = &self.packets {
                        p.close();
                    }
                    error!("FENCED: {reason}; stopping this guest");
                    return Err(PrimaryError::Fenced(reason));
                }
            }
        }
        Ok(())
    }

    /// A new backup: a new session, whose hello asks the backup for the
    /// image it keeps; its first checkpoint follows the answer ([`Self::resync`]).
    fn start_session(&mut self) -> Result<(), PrimaryError> {
        // Output is not held yet: from the pause the core names on
        // (`hold_from_pause`, in `checkpoint`), it waits for acks.
        let (from, history) = self.log.history(crate::checkpoint::BACKUP_HISTORY);
        let out_start = from + history.len() as u64;
        // Released from here on before it is checkpointed (the v7 resync):
        // kept until a checkpoint carries it.
        self.log.keep_from(Some(out_start));
        let vcpus = self.machine.vcpu_count() as u32;
        let token = self.core.token();
        let disk_bytes = self.machine.disk().map_or(0, |d| d.disk().bytes());
        let (mut session, hello) = Session::start(
            self.cfg,
            self.pages,
            vcpus,
            disk_bytes,
            out_start,
            history,
            token,
            self.beat,
            self.versions.offer(),
        )?;
        // A v5 hello's session is at version 5; a later one's, at the
        // version the backup's answer names.
        self.metrics.set_protocol(session.sender().version());
        // Every block the guest writes from here on is kept for the
        // checkpoints; turned on paused, so no request is half done.
        self.record_disk(true)?;
        if self.out.blocking_send(Outgoing::Hello(hello)).is_err() {
            self.log.keep_from(None);
            self.set_hold(false);
            self.record_disk(false)?;
            return Ok(());
        }
        self.hello_at = Some(Instant::now());
        self.awaiting = Some(Awaiting {
            offer: protocol::reuse::Assembler::new(
                session.id(),
                self.pages,
                disk_bytes / protocol::disk::BLOCK as u64,
            ),
            session,
        });
        Ok(())
    }

    /// Starts (keeping nothing from before) or stops the disk's recording of
    /// written blocks for the checkpoints.
    fn record_disk(&mut self, on: bool) -> Result<(), PrimaryError> {
        let Some(d) = self.machine.disk().cloned() else {
            return Ok(());
        };
        self.disk_diff = None;
        if on {
            let was = self.machine.is_paused();
            self.machine.pause()?;
            d.record(true, crate::disk::MAX_EPOCH_DISK_BYTES);
            if !was {
                self.machine.resume()?;
            }
        } else {
            d.record(false, 0);
        }
        Ok(())
    }

    /// The session is over (for now): no checkpoint will carry the disk's
    /// writes until the next one.
    fn session_over(&mut self) -> Result<(), PrimaryError> {
        self.log.keep_from(None);
        self.metrics.set_protocol(None);
        self.awaiting = None;
        self.session = None;
        // An epoch's pre-copy the session's end interrupted leaves copies
        // taken then: no later checkpoint may carry them.
        self.staging.clear();
        self.record_disk(false)
    }

    /// The session ended: which versions the next hello offers.
    fn versions_after(&mut self, why: &EndReason) {
        let Some(s) = self
            .awaiting
            .as_mut()
            .map(|a| &mut a.session)
            .or(self.session.as_mut())
        else {
            return;
        };
        let (offered, answered) = (s.sender().offered(), s.sender().answered());
        self.versions
            .ended(offered, answered, matches!(why, EndReason::Incompatible(_)));
        if self.versions.offer() != protocol::version::SUPPORTED {
            warn!(
                "the backup refused a hello of version {} without answering it ({why}): it speaks version {} alone (castor 0.1); the next hello speaks {}",
                offered.highest,
                protocol::version::V5,
                protocol::version::V5
            );
        }
    }

    /// No reuse offer within [`OFFER_WAIT`]: a full resync, unless the
    /// backup has not even answered the hello's versions. Then the session's
    /// version is not known, nor whether its checkpoints must say they may
    /// be resumed from (a v7 backup would take none of them for one), so
    /// the session ends and the next connection starts again.
    fn offer_overdue(&mut self) -> Result<(), PrimaryError> {
        let unanswered = self.awaiting.as_mut().is_some_and(|a| {
            let s = a.session.sender();
            s.hello().version >= protocol::version::NEGOTIATED && !s.answered()
        });
        if !unanswered {
            return self.resync(protocol::reuse::Answer::None(format!(
                "the backup sent no reuse offer within {OFFER_WAIT:?}"
            )));
        }
        self.awaiting = None;
        let why = format!("the backup did not answer the hello's versions within {OFFER_WAIT:?}");
        warn!("ending the session with the backup: {why}");
        let _ = self.out.blocking_send(Outgoing::End(EndReason::Local(why)));
        Ok(())
    }

    /// A piece of the backup's reuse offer (or the answer to the hello).
    fn on_offer(&mut self, m: protocol::Message) -> Result<(), PrimaryError> {
        let Some(a) = self.awaiting.as_mut() else {
            // An answer to a session that already ended or was resynced.
            return Ok(());
        };
        if let protocol::Message::Versions {
            version,
            lowest,
            highest,
        } = m
        {
            match a.session.sender().on_versions(version, lowest, highest) {
                Ok(v) => {
                    info!(
                        version = v,
                        "protocol version {v} for this session (the backup speaks {lowest} to {highest})"
                    );
                    self.metrics.set_protocol(Some(v));
                }
                Err(why) => {
                    self.awaiting = None;
                    warn!("ending the session with the backup: {why}");
                    let _ = self
                        .out
                        .blocking_send(Outgoing::End(EndReason::Incompatible(why.to_string())));
                }
            }
            return Ok(());
        }
        match a.offer.on(m) {
            Ok(None) => Ok(()),
            Ok(Some(answer)) => self.resync(answer),
            Err(why) => {
                warn!("the backup's reuse offer is malformed ({why}): a full resync instead");
                self.resync(protocol::reuse::Answer::None(format!(
                    "malformed reuse offer: {why}"
                )))
            }
        }
    }

    /// Digests of every page, read while the guest runs (each page copied
    /// out first: the guest may be writing it), and the pages dirtied while
    /// reading (whose digests are not to be trusted), as a bitmap.
    fn digest_running(&mut self) -> Result<(Vec<u64>, Vec<u64>), PrimaryError> {
        use vm_memory::Bytes;
        let t = Instant::now();
        // A fresh dirty log: what the guest writes from here on.
        let _ = self.machine.harvest_dirty()?;
        // On every core: the sooner the pair is protected the better, and
        // the guest only shares the CPUs for this short while.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8) as u64;
        let mem = self.machine.memory();
        let per = self.pages.div_ceil(threads);
        let parts: Vec<Result<Vec<u64>, String>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (from, to) = (t * per, ((t + 1) * per).min(self.pages));
                    sc.spawn(move || {
                        let mut page = [0u8; 4096];
                        let mut out = Vec::with_capacity((to - from) as usize);
                        for p in from..to {
                            mem.read_slice(&mut page, vm_memory::GuestAddress(p * 4096))
                                .map_err(|e| format!("reading guest page {p}: {e}"))?;
                            out.push(vmm::image::page_digest(&page));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a digest thread panicked".into()))
                })
                .collect()
        });
        let mut out = Vec::with_capacity(self.pages as usize);
        for part in parts {
            out.extend(part.map_err(vmm::MachineError::Config)?);
        }
        let dirty = self.machine.harvest_dirty()?.bitmap;
        debug!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "digested the guest's pages while it ran"
        );
        Ok((out, dirty))
    }

    /// The session's first checkpoint, paused: every page (a full resync),
    /// or over the backup's image only the pages that differ.
    fn resync(&mut self, answer: protocol::reuse::Answer) -> Result<(), PrimaryError> {
        let Some(mut a) = self.awaiting.take() else {
            return Ok(());
        };
        let disk_offer = a.offer.take_disk();
        let offer_ms = self
            .hello_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let mut session = a.session;
        let (offer, why_full) = match answer {
            protocol::reuse::Answer::Image(o) => (Some(o), String::new()),
            protocol::reuse::Answer::None(reason) => {
                info!("full resync: {reason}");
                (None, reason)
            }
        };
        if offer.is_some() {
            session.replica_unknown();
            // The offer's own transfer on an emulated link (the shaping
            // applies to checkpoint data; this keeps measurements honest).
            if let Some(rate) = self.cfg.link.rate_bytes_per_s.filter(|&r| r > 0) {
                let bytes = self.pages * 8;
                std::thread::sleep(Duration::from_secs_f64(bytes as f64 / rate as f64));
            }
        }
        self.session = Some(session);
        // Nothing staged before this resync may go out with it: a copy from
        // an interrupted epoch's pre-copy is older than the pause, and a
        // page the reuse plan keeps (equal on the backup now) would be
        // overwritten there with it.
        self.staging.clear();
        let span = info_span!("resync");
        let _g = span.enter();
        let t = Instant::now();
        self.machine.set_dirty_tracking(true)?;
        // Over an offered image: digest every page while the guest runs
        // (pages written meanwhile are found by the harvest in the pause and
        // digested again there), so the pause only compares.
        let pre = match &offer {
            Some(_) => Some(self.digest_running()?),
            None => None,
        };
        // No image to reuse: every page, copied while the guest runs; the
        // pause copies only what is written meanwhile.
        if offer.is_none() {
            let copied = self.staging.precopy_everything(&mut self.machine)?;
            debug!(
                ms = copied.as_secs_f64() * 1e3,
                pages = self.pages,
                "full resync: every page copied while the guest ran"
            );
        }
        // The disk's blocks that differ from the backup's, read while the
        // guest runs; the pause adds what was written since recording began.
        if let Some(d) = self.machine.disk() {
            let td = Instant::now();
            if disk_offer.is_none() {
                warn!("the backup offered no disk digests: every block of the disk is sent");
            }
            let diff = crate::disk::Diff::read(d.disk(), disk_offer.as_deref())
                .map_err(|e| PrimaryError::Disk(format!("reading the disk for the resync: {e}")))?;
            info!(
                differ = diff.blocks(),
                of = diff.compared,
                ms = td.elapsed().as_secs_f64() * 1e3,
                "disk blocks that differ from the backup's, read"
            );
            self.disk_diff = Some(diff);
        }
        self.machine.pause()?;
        let t0 = Instant::now();
        let mut plan = None;
        let r = self
            .machine
            .harvest_dirty()
            .map_err(PrimaryError::from)
            .and_then(|last| match &offer {
                None => self.staging.in_pause(&self.machine, last.frames()),
                Some(o) => {
                    let tp = Instant::now();
                    let (pre, mut changed) = pre.expect("digested while running");
                    let tags = self.gens.tags();
                    let tags_ms = tp.elapsed().as_secs_f64() * 1e3;
                    // Written while the digests were read (`changed`), or
                    // since, up to the pause (`last`): digested again here.
                    for (c, w) in changed.iter_mut().zip(&last.bitmap) {
                        *c |= w;
                    }
                    let rehashed = changed.iter().map(|w| w.count_ones() as u64).sum::<u64>();
                    let p = self.machine.with_ram_paused(|ram| {
                        protocol::reuse::plan(&tags, o, |pg| {
                            let dirty = changed
                                .get((pg / 64) as usize)
                                .is_some_and(|w| w & (1 << (pg % 64)) != 0);
                            match pre.get(pg as usize) {
                                Some(&d) if !dirty => d,
                                _ => {
                                    let at = pg as usize * 4096;
                                    vmm::image::page_digest(&ram[at..at + 4096])
                                }
                            }
                        })
                    })?;
                    let plan_ms = tp.elapsed().as_secs_f64() * 1e3 - tags_ms;
                    let copy = self.staging.in_pause(&self.machine, p.send.iter().copied());
                    debug!(
                        harvest_ms = (tp - t0).as_secs_f64() * 1e3,
                        rehashed,
                        tags_ms,
                        plan_ms,
                        copy_ms = copy.as_ref().map_or(0.0, |c| c.as_secs_f64() * 1e3),
                        "reuse plan, paused"
                    );
                    plan = Some(p);
                    copy
                }
            })
            .and_then(|copy| self.checkpoint(t0, Duration::ZERO, copy, Duration::ZERO));
        self.staging.clear();
        if r.is_err() && self.machine.is_paused() {
            self.machine.resume()?;
        }
        let Some(f) = r? else {
            // The network task ended: the core ends the session.
            return Ok(());
        };
        let (bytes, pause) = (f.bytes, f.pause);
        let (disk_blocks_sent, disk_bytes) = (f.disk_blocks, f.disk_bytes);
        self.metrics.epoch(f);
        let mut status = node::ResyncStatus {
            pages: self.pages,
            pages_sent: self.pages,
            bytes,
            pause_ms: pause.as_secs_f64() * 1e3,
            offer_ms,
            disk_blocks: self.machine.disk().map_or(0, |d| d.disk().blocks()),
            disk_blocks_sent,
            disk_bytes,
            ..Default::default()
        };
        match plan {
            Some(p) => {
                status.reused = true;
                status.pages_sent = p.send.len() as u64;
                status.by_generation = p.by_generation;
                status.stale = p.stale;
                if p.stale > 0 {
                    info!(
                        stale = p.stale,
                        "pages whose generation is equal on both nodes but whose content differs (written after their last checkpoint on either node, or changed behind castor's back): resent"
                    );
                }
                info!(
                    sent = p.send.len(),
                    of = self.pages,
                    by_generation = p.by_generation,
                    stale = p.stale,
                    bytes,
                    pause_ms = pause.as_secs_f64() * 1e3,
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "resync by reuse of the backup's image sent"
                );
            }
            None => {
                status.reason = why_full;
                info!(
                    pages = self.pages,
                    bytes,
                    pause_ms = pause.as_secs_f64() * 1e3,
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "full resync sent"
                );
            }
        }
        self.metrics.resync(status);
        Ok(())
    }

    /// One epoch: its figures, unless the network task ended meanwhile.
    fn epoch(&mut self, wait: Duration) -> Result<Option<EpochFigures>, PrimaryError> {
        // The pause runs at real-time priority (below the heartbeat threads):
        // on a small, busy host the guest must not stay stopped while this
        // thread waits for a CPU. Back to normal at resume (in checkpoint).
        self.rt_pause = vmm::set_current_thread_realtime(PAUSE_PRIORITY).is_ok();
        let r = self.paused_epoch(wait);
        self.end_rt_pause();
        r
    }

    fn end_rt_pause(&mut self) {
        if std::mem::take(&mut self.rt_pause) {
            let _ = vmm::set_current_thread_normal();
        }
    }

    fn paused_epoch(&mut self, wait: Duration) -> Result<Option<EpochFigures>, PrimaryError> {
        let t0 = Instant::now();
        self.machine.pause()?;
        let t1 = Instant::now();
        let r = self
            .machine
            .harvest_dirty()
            .map_err(PrimaryError::from)
            .and_then(|dirty| {
                let harvest = t1.elapsed();
                let copy = self.staging.in_pause(&self.machine, dirty.frames())?;
                self.checkpoint(t0, harvest, copy, wait)
            });
        if r.is_err() && self.machine.is_paused() {
            self.machine.resume()?;
        }
        // After the resume: the slots are free for the next epoch.
        self.staging.clear();
        r
    }

    /// With the dirty pages staged: captures the state and the console
    /// offset, resumes, encodes and sends. Paused on entry (since `t0`),
    /// running on return. Returns the checkpoint's figures (for the caller
    /// to record; its length not filled in), or `None` if the network task
    /// ended.
    fn checkpoint(
        &mut self,
        t0: Instant,
        harvest: Duration,
        copy: Duration,
        wait: Duration,
    ) -> Result<Option<EpochFigures>, PrimaryError> {
        let tcap = Instant::now();
        let state = self.machine.capture()?;
        let capture = tcap.elapsed();
        let out_end = self.log.end();
        debug_assert_eq!(out_end, state.console_offset);
        // Paused: no frame is being sent, this is the epoch's exact end.
        let net_upto = self.packets.as_ref().map_or(0, |p| p.end());
        // Paused, the disk quiesced: the blocks written in the epoch and the
        // disk's digest sum are those of this instant.
        let taken = self.machine.disk().map(|d| crate::disk::Taken {
            writes: d.take_writes(),
            sum: d.disk().sum(),
        });
        // Whether output is held from this pause on, which makes the
        // checkpoint one to resume from: still paused, so nothing the guest
        // writes after this instant is released before its ack. (The
        // session's version is known here: a resync waits for the answer to
        // the hello, `offer_overdue`.)
        let (epoch, marks) = self
            .session
            .as_mut()
            .map_or((0, false), |s| (s.next_epoch(), s.sender().marks_held()));
        let held = self
            .core
            .hold_from_pause(epoch, marks && self.cfg.resync_releases_output);
        if held {
            self.set_hold(true);
        }
        self.machine.resume()?;
        let pause = t0.elapsed();
        self.end_rt_pause();

        let disk = taken.map(|t| crate::disk::encode(t, self.disk_diff.take()));
        let session = self.session.as_mut().expect("a session");
        let built = session.checkpoint(
            &self.staging,
            &state.encode(),
            &self.log,
            out_end,
            disk.as_ref().map(|(r, c, _)| (&r[..], *c)),
            held && marks,
        )?;
        if let Some((r, c, n)) = &disk {
            debug!(
                target: "castor::disk",
                epoch = built.epoch,
                sum = format!("{:#018x}", c.sum),
                blocks = n,
                bytes = r.len(),
                flushed = c.flushed,
                "disk checkpoint"
            );
        }
        // These pages' contents are now those of this checkpoint.
        let tag = vmm::image::tag(session.id(), built.epoch);
        for &f in self.staging.frames() {
            self.gens.set(f, tag);
        }
        let sent = built.frames.len() as u64;
        let dirty = self.staging.frames().len() as u64;
        let in_flight = InFlight {
            sent: Instant::now(),
            paused: t0,
            net_upto,
        };
        if self
            .out
            .blocking_send(Outgoing::Frames(built.frames))
            .is_err()
        {
            self.feed(PrimaryInput::Ended(EndReason::Local(
                "the network task ended".into(),
            )))?;
            return Ok(None);
        }
        self.feed(PrimaryInput::Sent {
            epoch: built.epoch,
            release_to: out_end,
            meta: in_flight,
        })?;
        Ok(Some(EpochFigures {
            epoch: built.epoch,
            pause,
            harvest,
            copy,
            capture,
            encode: built.encode,
            dirty_pages: dirty,
            bytes: sent,
            raw_bytes: dirty * 4096,
            wait,
            precopied: self.staging.precopied(),
            len: Duration::ZERO,
            planned: Duration::ZERO,
            probe: false,
            disk_blocks: disk.as_ref().map_or(0, |d| d.2),
            disk_bytes: disk.as_ref().map_or(0, |d| d.0.len() as u64),
        }))
    }
}
