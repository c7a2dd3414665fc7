//! The failure detector's shell: a 1 ms timer that feeds the
//! [`node::ha::BackupCore`] the time and the connection's liveness, and
//! carries out its takeover decision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node::ha::{BackupAction, BackupInput};
use protocol::EndReason;

use crate::replica::Shared;

/// A takeover decided by the core.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision {
    pub epoch: u64,
    pub silent: Duration,
    pub asked: bool,
}

/// Ticks until the core decides to take over; then ends the session with
/// [`EndReason::TakenOver`] (a live primary learns it is fenced and stops
/// its guest) and reports the decision.
pub(crate) async fn watchdog(shared: Arc<Shared>, decided: std::sync::mpsc::Sender<Decision>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_rx = 0u64;
    let mut last_tick = Instant::now();
    loop {
        tick.tick().await;
        // A watchdog that woke late was starved itself: the primary's
        // packets may be waiting unread.
        let late = last_tick.elapsed() > Duration::from_millis(5);
        last_tick = Instant::now();
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
                shared.heard();
            }
        }
        // Decide under the replica lock: a commit updates the core under it
        // before publishing its state.
        let actions = {
            let _r = shared.replica();
            let now = shared.now();
            shared.core().on(BackupInput::Tick { now, late })
        };
        for action in actions {
            if let BackupAction::TakeOver {
                epoch,
                silent,
                asked,
                ..
            } = action
            {
                if let Some(c) = closer.as_ref() {
                    c.close(&EndReason::TakenOver);
                }
                let _ = decided.send(Decision {
                    epoch,
                    silent,
                    asked,
                });
                return;
            }
        }
    }
}
