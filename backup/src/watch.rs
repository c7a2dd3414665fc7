//! The failure detector's shell: a 1 ms timer on a thread of its own that
//! feeds the [`node::ha::BackupCore`] the time and the connection's
//! liveness, and carries out its takeover decision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node::ha::{BackupAction, BackupInput, Claim};
use protocol::EndReason;
use tracing::{info, warn};

use crate::replica::Shared;

/// A takeover decided by the core.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision {
    pub epoch: u64,
    pub silent: Duration,
    pub asked: bool,
    pub token: u64,
    /// What had been heard from the primary when it was decided.
    pub heard: crate::replica::Heard,
}

/// The failure detector's period.
const TICK: Duration = Duration::from_millis(1);
/// A tick later than this after the previous one means this process
/// stalled (paused, starved): the time does not count as silence.
const STALL: Duration = Duration::from_millis(5);

/// The wait before asking an unreachable witness again.
const CLAIM_RETRY: Duration = Duration::from_millis(100);

/// Ticks until the core decides to take over (after the witness's yes, if
/// there is a witness); then ends the session with
/// [`EndReason::TakenOver`] (a live primary learns it is fenced and stops
/// its guest) and reports the decision. Returns when `stop` is set.
///
/// It runs on a thread of its own, not on the network runtime: it decides
/// under the replica lock, which a full resync being applied holds for
/// seconds, and a runtime worker blocked there would leave heartbeats and
/// the connection one worker to share — long enough, under a flat-out
/// writer's resync, for this very detector to find the primary silent.
pub(crate) fn watchdog(
    shared: Arc<Shared>,
    witness: Option<(witness::Etcd, String)>,
    decided: std::sync::mpsc::Sender<Decision>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut last_rx = 0u64;
    let mut last_tick = Instant::now();
    // When anything was last heard from the primary here, and whether this
    // silence was already reported as one this node cannot take over from.
    let (mut heard_at, mut told) = (Instant::now(), false);
    let (claimed_tx, claimed) = std::sync::mpsc::channel::<Claim>();
    let mut stalls = node::stall::StallWatch::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let slept = Instant::now();
        std::thread::sleep(TICK);
        if let Some(s) = stalls.woke(slept.elapsed(), TICK) {
            // Not counted as the primary's silence (see `stalled` below).
            s.log("the watchdog");
        }
        if let Ok(c) = claimed.try_recv() {
            let actions = {
                let _r = shared.replica();
                shared.core().on(BackupInput::Claimed(c))
            };
            if let Some(d) = act(&shared, actions, &witness, &claimed_tx) {
                let _ = decided.send(d);
                return;
            }
            continue;
        }
        // A watchdog that woke late was starved itself: the primary's
        // packets may be waiting unread.
        let gap = last_tick.elapsed();
        let stalled = if gap > STALL {
            gap - TICK
        } else {
            Duration::ZERO
        };
        // Any packet from the primary proves it alive, even while its
        // heartbeat waits behind checkpoint data on a busy host.
        let closer = shared
            .closer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(rx) = closer.as_ref().map(|c| c.datagrams_received()) {
            if rx != last_rx {
                last_rx = rx;
                shared.heard_datagram();
                (heard_at, told) = (Instant::now(), false);
            }
        }
        // Heartbeats the network runtime has not read yet (it may be busy
        // with a large checkpoint): read here, before judging silence.
        let beat = shared
            .beat_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|b| b.drain());
        if beat {
            shared.heard_beat();
            (heard_at, told) = (Instant::now(), false);
        }
        if !told && heard_at.elapsed() > SILENT_AND_NO_TAKEOVER {
            told = true;
            no_takeover_why(&shared, heard_at.elapsed());
        }
        // Decide under the replica lock: a commit updates the core under it
        // before publishing its state.
        let actions = {
            let _r = shared.replica();
            let now = shared.now();
            shared.core().on(BackupInput::Tick { now, stalled })
        };
        // The next gap is measured from here: waiting above for a
        // checkpoint being applied is not a stall (the primary's packets
        // are read meanwhile), and must not be credited as one.
        last_tick = Instant::now();
        if let Some(d) = act(&shared, actions, &witness, &claimed_tx) {
            let _ = decided.send(d);
            return;
        }
    }
}

/// Silence after which a backup that cannot take over says why (longer
/// than the primary's wait before it reconnects after a refusal, 1 s).
const SILENT_AND_NO_TAKEOVER: Duration = Duration::from_secs(3);

/// The primary is silent and this node will not take over: says why, once
/// per silence (an operator who lost the primary learns why the guest does
/// not come back here).
fn no_takeover_why(shared: &Shared, silent: Duration) {
    let (can, committed, invalid, session) = {
        let r = shared.replica();
        let core = shared.core();
        (
            core.can_take_over(),
            core.committed(),
            core.replica_invalid(),
            r.session,
        )
    };
    if can || session == 0 {
        // Protected (the core decides), or no primary ever came.
        return;
    }
    let why = if let Some(epoch) = invalid {
        format!("the replica failed verification at checkpoint {epoch}")
    } else if committed.is_none() {
        "nothing is committed in the current session (its first checkpoint never committed)".into()
    } else {
        "the last session ended with the primary alive (a goodbye, or this node refused it)".into()
    };
    let refusal = shared
        .last_refusal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    warn!(
        silent_ms = silent.as_millis() as u64,
        "the primary is silent, and this node does not take over: {why}{}",
        refusal.map_or(String::new(), |r| format!(
            "; the last checkpoint refused: {r}"
        ))
    );
}

/// Carries out the core's actions; a takeover ends the session with
/// [`EndReason::TakenOver`] and is returned.
fn act(
    shared: &Shared,
    actions: Vec<BackupAction>,
    witness: &Option<(witness::Etcd, String)>,
    claimed: &std::sync::mpsc::Sender<Claim>,
) -> Option<Decision> {
    for action in actions {
        match action {
            BackupAction::TakeOver {
                epoch,
                silent,
                asked,
                token,
                ..
            } => {
                let closer = shared
                    .closer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(c) = closer {
                    c.close(&EndReason::TakenOver);
                }
                return Some(Decision {
                    epoch,
                    silent,
                    asked,
                    token,
                    heard: shared.heard_log.at(shared.now()),
                });
            }
            BackupAction::Claim { expected, retry } => {
                let Some((w, me)) = witness.clone() else {
                    unreachable!("the core claims only with a witness");
                };
                if !retry {
                    let h = shared.heard_log.at(shared.now());
                    warn!(
                        expected,
                        beats = h.beats,
                        since_beat_ms = h.since_beat_ms,
                        since_datagram_ms = h.since_datagram_ms,
                        "the primary is silent: claiming the VM at the witness"
                    );
                }
                let answer = claimed.clone();
                std::thread::spawn(move || {
                    if retry {
                        std::thread::sleep(CLAIM_RETRY);
                    }
                    let c = w.claim(&me, expected);
                    if c == Claim::Unreachable {
                        if !retry {
                            warn!(witness = %w.describe(), "the witness does not answer; no takeover until it does");
                        }
                    } else {
                        info!(expected, claim = ?c, "witness claim");
                    }
                    let _ = answer.send(c);
                });
            }
            // Sessions are refused where they start (backup/src/net.rs).
            BackupAction::Refuse(_) => {}
        }
    }
    None
}
