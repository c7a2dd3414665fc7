//! The epoch loop: when to pre-copy, pause, checkpoint and send; network
//! events fed to the [`PrimaryCore`] and its actions carried out.
//!
//! Every epoch: (pre-copy while the guest runs) → pause → harvest → copy
//! the dirty pages → capture the machine state → note the console offset →
//! resume → encode → send. The console bytes of epoch `k` are released when
//! the core says so: on the backup's ack of `k`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::console::ConsoleLog;
use node::ha::{PrimaryAction, PrimaryCore, PrimaryInput};
use node::packets::PacketHold;
use protocol::EndReason;
use tokio::sync::mpsc;
use tracing::{error, info, info_span, warn};
use vmm::Machine;

use crate::checkpoint::Session;
use crate::copy::Staging;
use crate::net::{NetEvent, Outgoing};
use crate::{Config, EpochFigures, Metrics, PrimaryError};

/// Real-time priority of the epoch thread while the guest is paused (the
/// network threads have 10).
const PAUSE_PRIORITY: i32 = 5;

/// The wait before asking an unreachable witness again.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

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
}

impl EpochLoop<'_> {
    /// Runs until `stop`, the guest stops, or this node is fenced.
    pub fn run(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<(), PrimaryError> {
        let mut next = Instant::now() + self.cfg.epoch;
        self.set_hold(false);
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
                    self.staging.precopy(&mut self.machine)?;
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

    /// A planned stop (or the loop's end): the network task says goodbye
    /// naming the last checkpoint queued, so that the backup ends the
    /// session only once it has committed it, and finishes the data stream
    /// behind it. Waits while the queue is full (bounded: a stopping
    /// network task gives up after [`crate::net::GOODBYE_WAIT`] and drops
    /// the queue).
    pub fn goodbye(&self, farewell: &crate::net::Farewell) {
        let last_epoch = self.session.as_ref().map_or(0, Session::last_epoch);
        farewell.set(last_epoch);
        let _ = self.out.blocking_send(Outgoing::Goodbye { last_epoch });
    }

    /// Bounded in-flight checkpoints: waits (handling events) until the core
    /// lets another one go. False: stop, or the network task is gone.
    fn wait_in_flight(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
        stop: &AtomicBool,
    ) -> Result<bool, PrimaryError> {
        while self.core.in_session() && !self.core.may_send() {
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
        let input = match ev {
            NetEvent::Connected => PrimaryInput::Connected,
            NetEvent::Ack(epoch) => PrimaryInput::Ack { epoch },
            NetEvent::Ended(reason) => PrimaryInput::Ended(reason),
            NetEvent::Claimed(claim) => PrimaryInput::Claimed(claim),
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
    fn feed(&mut self, input: PrimaryInput<InFlight>) -> Result<(), PrimaryError> {
        for action in self.core.on(input) {
            match action {
                PrimaryAction::StartSession => self.start_session()?,
                PrimaryAction::Protected => {
                    self.metrics.set_protected(true);
                    info!("PROTECTED: the backup committed the full resync");
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
                    warn!("ending the session with the backup: {reason}");
                    let _ = self.out.blocking_send(Outgoing::End(reason));
                }
                PrimaryAction::Unprotected(reason) => {
                    self.session = None;
                    self.metrics.set_protected(false);
                    error!("UNPROTECTED: lost the backup ({reason}); the guest keeps running, output is released at once; waiting for a backup to re-protect");
                    self.set_hold(false);
                }
                PrimaryAction::Claim { expected, retry } => {
                    if !retry {
                        self.session = None;
                        self.metrics.set_protected(false);
                        warn!("lost the backup: asking the witness whether this node may carry on alone; output is held meanwhile");
                    }
                    self.claim(expected, retry);
                }
                PrimaryAction::Fence(reason) => {
                    // Held output stays held: the other node continues from
                    // its last committed checkpoint; this guest must not be seen.
                    self.session = None;
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

    /// A new backup: new session, full resync as the first epoch.
    fn start_session(&mut self) -> Result<(), PrimaryError> {
        // From here on output waits for acks; everything before is released.
        self.set_hold(true);
        let out_start = self.log.released();
        let vcpus = self.machine.vcpu_count() as u32;
        let token = self.core.token();
        let (session, hello) =
            Session::start(self.cfg, self.pages, vcpus, out_start, token, self.beat)?;
        if self.out.blocking_send(Outgoing::Hello(hello)).is_err() {
            self.set_hold(false);
            return Ok(());
        }
        self.session = Some(session);
        // Full resync: every page, encoded while paused.
        let span = info_span!("resync");
        let _g = span.enter();
        let t = Instant::now();
        self.machine.set_dirty_tracking(true)?;
        self.machine.pause()?;
        let t0 = Instant::now();
        let r = self
            .machine
            .harvest_dirty()
            .map_err(PrimaryError::from)
            .and_then(|_| self.staging.everything(&self.machine))
            .and_then(|copy| self.checkpoint(t0, Duration::ZERO, copy, Duration::ZERO));
        self.staging.clear();
        if r.is_err() && self.machine.is_paused() {
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

    fn epoch(&mut self, wait: Duration) -> Result<(), PrimaryError> {
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

    fn paused_epoch(&mut self, wait: Duration) -> Result<(), PrimaryError> {
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
    /// running on return.
    fn checkpoint(
        &mut self,
        t0: Instant,
        harvest: Duration,
        copy: Duration,
        wait: Duration,
    ) -> Result<(), PrimaryError> {
        let tcap = Instant::now();
        let state = self.machine.capture()?;
        let capture = tcap.elapsed();
        let out_end = self.log.end();
        debug_assert_eq!(out_end, state.console_offset);
        // Paused: no frame is being sent, this is the epoch's exact end.
        let net_upto = self.packets.as_ref().map_or(0, |p| p.end());
        self.machine.resume()?;
        let pause = t0.elapsed();
        self.end_rt_pause();

        let session = self.session.as_mut().expect("a session");
        let built = session.checkpoint(&self.staging, &state.encode(), &self.log, out_end)?;
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
            return self.feed(PrimaryInput::Ended(EndReason::Local(
                "the network task ended".into(),
            )));
        }
        self.feed(PrimaryInput::Sent {
            epoch: built.epoch,
            release_to: out_end,
            meta: in_flight,
        })?;
        self.metrics.epoch(EpochFigures {
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
        });
        Ok(())
    }
}
