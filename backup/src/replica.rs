//! The replica: guest RAM and machine state at the last committed
//! checkpoint, and the step that moves it to the next one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use node::ha::{BackupCore, BackupInput};
use protocol::{payload, EndReason, Hello};
use tracing::error;
use vmm::memory::GuestMem;
use vmm::MachineState;

/// The replica and the last committed checkpoint.
pub(crate) struct Replica {
    /// Guest RAM (taken by the takeover).
    pub mem: Option<GuestMem>,
    /// Machine state of the committed checkpoint.
    pub state: Option<MachineState>,
    pub block_size: usize,
    pub epoch: u64,
    pub session: u64,
    pub verifying: bool,
}

/// What the backup's tasks share.
pub(crate) struct Shared {
    /// Lock order: `replica`, then `core`.
    pub replica: Mutex<Replica>,
    pub core: Mutex<BackupCore>,
    pub t0: Instant,
    pub connected: AtomicBool,
    pub mismatches: AtomicU64,
    pub applied: AtomicU64,
    /// Ends the current session from the watchdog (a takeover).
    pub closer: Mutex<Option<transport::Closer>>,
    /// The node's metrics.
    pub metrics: Arc<node::metrics::Metrics>,
    /// The token of the last stale primary refused, so each counts once.
    stale_token: AtomicU64,
}

impl Shared {
    pub fn new(core: BackupCore, metrics: Arc<node::metrics::Metrics>) -> Arc<Shared> {
        Arc::new(Shared {
            replica: Mutex::new(Replica {
                mem: None,
                state: None,
                block_size: 64,
                epoch: 0,
                session: 0,
                verifying: false,
            }),
            core: Mutex::new(core),
            t0: Instant::now(),
            connected: AtomicBool::new(false),
            mismatches: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            closer: Mutex::new(None),
            metrics,
            stale_token: AtomicU64::new(u64::MAX),
        })
    }

    /// The backup's clock for its core.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn replica(&self) -> MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn core(&self) -> MutexGuard<'_, BackupCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something arrived from the primary.
    pub fn heard(&self) {
        let now = self.now();
        self.core().on(BackupInput::Heard { now });
    }

    /// A new session: a fresh replica of the hello's size, nothing committed.
    pub fn start_session(&self, h: &Hello) -> Result<(), EndReason> {
        let mut r = self.replica();
        let refused = self.core().on(BackupInput::SessionStarted {
            session: h.session,
            token: h.token,
            now: self.now(),
        });
        if let Some(node::ha::BackupAction::Refuse(why)) = refused.into_iter().next() {
            // The primary this node took over from is alive: the takeover
            // was for a pause, a partition or a false alarm. Counted once
            // per stale primary (it retries every 200 ms).
            if why == EndReason::AlreadyTakenOver
                && self.stale_token.swap(h.token, Ordering::Relaxed) != h.token
            {
                self.metrics.false_takeovers.inc();
            }
            return Err(why);
        }
        let mem = vmm::memory::create(h.memory_bytes)
            .map_err(|e| EndReason::Refused(format!("cannot allocate the replica: {e}")))?;
        *r = Replica {
            mem: Some(mem),
            state: None,
            block_size: h.block_size as usize,
            epoch: 0,
            session: h.session,
            verifying: h.capabilities & protocol::message::CAP_VERIFY != 0,
        };
        Ok(())
    }

    /// Applies a committed checkpoint to the replica: whole, or not at all
    /// (a refused checkpoint leaves the replica at the previous one and ends
    /// the session).
    pub fn commit(
        &self,
        log: &node::console::ConsoleLog,
        c: &protocol::Checkpoint,
    ) -> Result<(), EndReason> {
        let refuse = |what: String| EndReason::Refused(format!("checkpoint {}: {what}", c.epoch));
        let raw = payload::unpack_state(&c.state, vmm::state::MAX_PAYLOAD as usize + 64)
            .map_err(|e| refuse(e.to_string()))?;
        let state = MachineState::decode(&raw).map_err(|e| refuse(e.to_string()))?;
        let mut r = self.replica();
        {
            let core = self.core();
            if core.taken_over() {
                // The replica stays at the checkpoint the takeover chose.
                return Err(EndReason::TakenOver);
            }
            if core.frozen() {
                // Nothing more is committed (or acked) while the witness decides.
                return Err(EndReason::Refused(
                    "the backup is claiming the VM at the witness".into(),
                ));
            }
        }
        let bs = r.block_size;
        let Some(mem) = r.mem.as_mut() else {
            return Err(refuse(
                "no replica (before a session, or taken over)".into(),
            ));
        };
        let (_, digest) = vmm::memory::with_ram_mut(mem, |ram| {
            let stats = fgbi::apply(ram, bs, &c.records)?;
            let digest = c.memory_digest.map(|_| {
                payload::memory_digest(
                    stats
                        .pages
                        .iter()
                        .map(|&p| &ram[p as usize * 4096..(p as usize + 1) * 4096]),
                )
            });
            Ok::<_, fgbi::ApplyError>((stats, digest))
        })
        .map_err(|e| refuse(format!("replica: {e}")))?
        .map_err(|e| refuse(format!("refused, replica unchanged: {e}")))?;
        if let (Some(want), Some(got)) = (c.memory_digest, digest) {
            if want != got {
                // The RAM was written: the replica is at no checkpoint now.
                r.state = None;
                r.mem = None;
                self.core()
                    .on(BackupInput::ReplicaInvalid { epoch: c.epoch });
                self.mismatches.fetch_add(1, Ordering::Relaxed);
                error!(
                    epoch = c.epoch,
                    "VERIFY: replica differs from the primary after checkpoint {}; no takeover until the next session's full resync commits", c.epoch
                );
                return Err(EndReason::Refused(format!(
                    "replica mismatch at epoch {}",
                    c.epoch
                )));
            }
        }
        // The core learns of the commit under the replica lock, before the
        // state is published: the watchdog decides under the same lock, so
        // it never sees a fresh state with stale liveness.
        self.core().on(BackupInput::Committed {
            epoch: c.epoch,
            now: self.now(),
        });
        r.state = Some(state);
        r.epoch = c.epoch;
        self.applied.fetch_add(1, Ordering::Relaxed);
        log.append_released(&c.output);
        Ok(())
    }
}
