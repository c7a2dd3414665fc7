//! Step 1 of an epoch: the copies of the dirty pages.
//!
//! Pages are copied into staging slots, page `frames[i]` at slot `i`. With
//! the pre-copy, the pages dirtied so far are harvested and copied while the
//! guest still runs; the pause then copies only the pages dirtied since
//! (again, for those copied before). A page written after the pre-copy's
//! harvest is in the pause's harvest (KVM write-protects it before the
//! ioctl returns), so every copy is final when the guest resumes.

use std::time::{Duration, Instant};

use tracing::info;
use vm_memory::{Bytes, GuestAddress};
use vmm::Machine;

use crate::PrimaryError;

/// Largest staging buffer kept after a full resync.
const STAGING_KEEP: usize = 64 << 20;
const NO_SLOT: u32 = u32::MAX;

/// The copies of one epoch's dirty pages.
pub(crate) struct Staging {
    pages: u64,
    /// Copies (reused from epoch to epoch, so that a pause does not
    /// first-touch fresh memory).
    buf: Vec<u8>,
    /// The epoch's pages in slot order; the first ones were pre-copied.
    frames: Vec<u64>,
    /// Slot of each guest page this epoch, or `NO_SLOT`.
    slot_of: Vec<u32>,
    /// Of `frames`, those copied before the pause.
    precopied: usize,
    /// This epoch is a full resync.
    resync: bool,
    /// The most slots an ordinary epoch used lately (decaying), which the
    /// buffer is grown ahead of while the guest runs.
    peak: usize,
}

/// A staging buffer with address space reserved for every page of the
/// guest (reserved, not touched: it costs no memory until used), so that
/// growing it never moves the copies already made. Without the reservation
/// (a host that refuses it) it grows by reallocation.
fn reserved(pages: u64) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = v.try_reserve_exact((pages as usize).saturating_mul(4096));
    v
}

impl Staging {
    /// Staging for a guest of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Staging {
            pages,
            buf: reserved(pages),
            frames: Vec::new(),
            slot_of: vec![NO_SLOT; pages as usize],
            precopied: 0,
            resync: false,
            peak: 0,
        }
    }

    /// The epoch's pages, in slot order.
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// How many of them were copied before the pause.
    pub fn precopied(&self) -> u64 {
        self.precopied as u64
    }

    /// The copy in slot `i`.
    pub fn page(&self, i: usize) -> &[u8; 4096] {
        self.buf[i * 4096..(i + 1) * 4096]
            .try_into()
            .expect("a page")
    }

    /// Empties the epoch (after the resume, or when a new session resyncs
    /// everything). The buffer is kept for the next epoch — a fresh one
    /// would be first-touched inside the next pause — unless a full resync
    /// made it huge (a large dirty set of an ordinary epoch keeps it).
    pub fn clear(&mut self) {
        for &f in &self.frames {
            self.slot_of[f as usize] = NO_SLOT;
        }
        let used = self.frames.len();
        self.frames.clear();
        self.precopied = 0;
        if std::mem::take(&mut self.resync) {
            if self.buf.len() > STAGING_KEEP {
                self.buf = reserved(self.pages);
            }
            return;
        }
        // Grown ahead, while the guest runs, to twice what epochs used
        // lately: a pause then only writes copies into memory already
        // touched (growing inside the pause first-touched, and without the
        // reservation moved, megabytes: a 10-22 ms pause each time the dirty
        // set passed a power of two).
        self.peak = used.max(self.peak - self.peak / 16);
        let ahead = (self.peak * 2).min(self.pages as usize) * 4096;
        if self.buf.len() < ahead {
            self.buf.resize(ahead, 0);
        }
    }

    /// The pre-copy, while the guest runs: harvests the pages dirtied so
    /// far in this epoch and copies the new ones.
    pub fn precopy(&mut self, machine: &mut Machine) -> Result<(), PrimaryError> {
        let dirty = machine.harvest_dirty()?;
        let start = self.frames.len();
        let pages = self.pages;
        for f in dirty.frames().filter(|&f| f < pages) {
            self.slot(f);
        }
        self.precopied = self.frames.len();
        self.copy(machine, start..self.frames.len(), false)?;
        Ok(())
    }

    /// In the pause: takes the harvest `dirty` and copies every page dirtied
    /// since the pre-copy. Returns the copy time.
    pub fn in_pause(
        &mut self,
        machine: &Machine,
        dirty: impl Iterator<Item = u64>,
    ) -> Result<Duration, PrimaryError> {
        let t = Instant::now();
        let pages = self.pages;
        for f in dirty.filter(|&f| f < pages) {
            let slot = self.slot(f);
            self.copy_slot(machine, slot)?;
        }
        Ok(t.elapsed())
    }

    /// The full resync's copy, while the guest runs (dirty tracking on):
    /// clears the dirty log, then copies every page. The pause then copies
    /// again only the pages written since ([`Staging::in_pause`] with its
    /// harvest): a page written before its copy here is copied with the
    /// write, and one written after is in that harvest. Copying everything
    /// inside the pause (first-touching a buffer the size of the guest)
    /// stopped a 128 MiB guest for ~360 ms at every re-protection.
    pub fn precopy_everything(&mut self, machine: &mut Machine) -> Result<Duration, PrimaryError> {
        let t = Instant::now();
        self.clear();
        self.resync = true;
        machine.harvest_dirty()?;
        for f in 0..self.pages {
            self.slot(f);
        }
        self.precopied = self.frames.len();
        self.copy(machine, 0..self.pages as usize, true)?;
        Ok(t.elapsed())
    }

    /// The slot of page `f` this epoch (a new one if it has none).
    fn slot(&mut self, f: u64) -> usize {
        match self.slot_of[f as usize] {
            NO_SLOT => {
                self.slot_of[f as usize] = self.frames.len() as u32;
                self.frames.push(f);
                self.frames.len() - 1
            }
            s => s as usize,
        }
    }

    fn copy(
        &mut self,
        machine: &Machine,
        slots: std::ops::Range<usize>,
        log_progress: bool,
    ) -> Result<(), PrimaryError> {
        let n = slots.len();
        let quarter = (n / 4).max(1);
        for (i, slot) in slots.enumerate() {
            if log_progress && i > 0 && i % quarter == 0 {
                info!(percent = 100 * i / n, pages = i, "full resync: copying");
            }
            self.copy_slot(machine, slot)?;
        }
        Ok(())
    }

    fn copy_slot(&mut self, machine: &Machine, slot: usize) -> Result<(), PrimaryError> {
        let end = (slot + 1) * 4096;
        if self.buf.len() < end {
            // Within the reservation: no copy moves.
            let doubled = (self.buf.len() * 2).min(self.buf.capacity());
            self.buf.resize(end.max(doubled), 0);
        }
        let f = self.frames[slot];
        machine
            .memory()
            .read_slice(&mut self.buf[slot * 4096..end], GuestAddress(f * 4096))
            .map_err(|e| vmm::MachineError::Config(format!("reading guest page {f}: {e}")))?;
        Ok(())
    }
}
