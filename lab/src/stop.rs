//! Stopping a long lab run early: the first SIGINT or SIGTERM asks the run
//! to stop after the round in progress (its daemons, etcd and network
//! namespaces are then torn down as at a normal end, and the summary so far
//! is printed); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Installs the handlers (once; later calls do nothing). Without them a
/// signal ends the process at once and leaves its daemons running.
pub fn install() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // The second signal, once the flag is set, exits (status 1).
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, flag().clone());
            let _ = signal_hook::flag::register(sig, flag().clone());
        }
    });
}

/// Whether a stop was asked.
pub fn requested() -> bool {
    flag().load(Ordering::Relaxed)
}
