//! The takeover: a standby VM kept ready over the replica RAM, and the
//! restore of the committed checkpoint onto it.

use std::path::Path;
use std::time::Instant;

use std::sync::Arc;

use tracing::{debug, info, warn};
use vmm::image::GenTable;
use vmm::Machine;

use crate::replica::Shared;
use crate::BackupError;

/// A VM created over the current session's replica RAM, so that a takeover
/// only sets the machine state (registering the RAM with KVM is most of a
/// restore's time).
#[derive(Default)]
pub(crate) struct Standby(Option<(u64, vmm::Standby)>);

impl Standby {
    /// Keeps a standby for the session the replica holds a committed
    /// checkpoint of; drops a stale one (it holds an old session's RAM).
    pub fn refresh(&mut self, shared: &Shared, kvm_device: &Path) {
        let current = {
            let r = shared.replica();
            r.state.as_ref().and(r.mem.clone()).map(|m| (r.session, m))
        };
        match current {
            Some((session, mem)) if self.0.as_ref().is_none_or(|s| s.0 != session) => {
                self.0 = None;
                let t = Instant::now();
                match Machine::prepare_standby(mem, kvm_device) {
                    Ok(s) => {
                        let us = t.elapsed().as_micros() as u64;
                        debug!(session, us, "standby VM ready");
                        self.0 = Some((session, s));
                    }
                    Err(e) => {
                        warn!("cannot prepare a standby VM ({e}); a takeover will create one")
                    }
                }
            }
            None => self.0 = None,
            _ => {}
        }
    }
}

/// Restores the committed checkpoint and runs it: on the standby VM when it
/// holds this session's RAM, on a new VM otherwise. Returns the machine, the
/// console offset it resumes at and the replica's generations.
pub(crate) fn restore(
    shared: &Shared,
    standby: Standby,
    log: &std::sync::Arc<node::console::ConsoleLog>,
    kvm_device: &Path,
) -> Result<(Machine, u64, Option<Arc<GenTable>>), BackupError> {
    let (mem, state, session, gens) = {
        let mut r = shared.replica();
        let session = r.session;
        if let Some(d) = &shared.disk {
            // Before the guest runs: the disk as the checkpoint left it.
            info!(
                epoch = r.epoch,
                disk_sum = format!("{:#018x}", d.disk().sum()),
                "the disk at the checkpoint taken over"
            );
        }
        let (Some(mem), Some(state)) = (r.mem.take(), r.state.take()) else {
            unreachable!("the core takes over only from a committed checkpoint");
        };
        (mem, state, session, r.gens.take())
    };
    // The guest runs on this RAM from now on: the tags describe it only up
    // to the checkpoint restored.
    if let Some(g) = &gens {
        g.set_header(false, session, g.header().epoch);
    }
    let disk = shared.disk.as_ref().map(|d| d.disk().clone());
    let offset = state.console_offset;
    // Bytes after the committed offset cannot exist on the backup.
    debug_assert_eq!(log.end(), offset);
    let sink = node::console::sink(log.clone());
    let machine = match standby.0 {
        Some((s, sb)) if s == session => {
            drop(mem); // the standby holds the same RAM
            Machine::restore_standby(sb, &state, sink, false, disk)?
        }
        _ => Machine::restore_on(&state, mem, sink, false, kvm_device, disk)?,
    };
    Ok((machine, offset, gens))
}
