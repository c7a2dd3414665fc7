//! Guest memory: the x86 layout castor uses, the bitmap that records the VMM's
//! own writes into guest RAM, and helpers to walk RAM page by page.
//!
//! Layout: RAM from 0 up to 3 GiB, then a hole for MMIO (IOAPIC at 0xFEC0_0000,
//! LAPIC at 0xFEE0_0000), then the rest of RAM from 4 GiB. Each region is one
//! KVM memory slot, numbered in address order.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Size of a guest page: the unit of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;
/// Where the MMIO hole below 4 GiB starts; RAM above it moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest castor creates.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest castor creates.
pub const MAX_MEM: u64 = 256 << 30;

/// castor's guest memory: anonymous mappings whose bitmap records VMM writes.
pub type GuestMem = vm_memory::GuestMemoryMmap<VmmWriteBitmap>;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is out of range or not page-aligned.
    #[error("guest memory of {0} bytes is not supported: give a multiple of 4 KiB between 16 MiB and 256 GiB")]
    BadSize(u64),
    /// mmap of guest RAM failed.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(#[from] vm_memory::mmap::FromRangesError),
    /// [`with_ram_mut`] needs RAM in one region (guests of at most 3 GiB).
    #[error("guest memory of {0} bytes is split around the MMIO hole: only guests of at most 3 GiB (one region) can be accessed as one slice")]
    NotOneRegion(u64),
    /// The RAM is in use in a way that excludes what was asked: see
    /// [`with_ram_mut`].
    #[error("guest memory is in use: {0}")]
    InUse(&'static str),
}

/// The regions (guest address, size) of a guest with `size` bytes of RAM.
pub fn layout(size: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(MIN_MEM..=MAX_MEM).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize(size));
    }
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(HIGH_RAM_START), (size - low) as usize));
    }
    Ok(regions)
}

/// Allocates zeroed guest memory of `size` bytes in castor's layout.
pub fn create(size: u64) -> Result<GuestMem, MemoryError> {
    Ok(GuestMem::from_ranges(&layout(size)?)?)
}

/// Total RAM in bytes.
pub fn ram_size(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// One past the highest guest page frame number: the length of a dirty bitmap
/// indexed by guest frame number.
pub fn frame_limit(mem: &GuestMem) -> u64 {
    mem.iter()
        .map(|r| (r.start_addr().0 + r.len()) / PAGE_SIZE)
        .max()
        .unwrap_or(0)
}

/// A vm-memory bitmap that records which pages the VMM itself wrote through
/// the `GuestMemory` API (KVM's dirty log never sees those writes).
///
/// Unlike vm-memory's `AtomicBitmap` it can be drained a word at a time, and a
/// summary flag makes draining free when nothing was written — it is read in
/// every checkpoint pause.
///
/// Being the one piece of per-region state castor owns that every clone of a
/// [`GuestMem`] shares (clones share their regions, `Arc`ed), it also carries
/// the region's lease word: whether a [`with_ram_mut`] slice is lent out, and
/// how many machines may run vCPUs over the region.
#[derive(Debug)]
pub struct VmmWriteBitmap {
    words: Vec<AtomicU64>,
    pages: usize,
    any: AtomicBool,
    lease: AtomicU32,
}

/// In a region's lease word: a [`with_ram_mut`] slice of it is alive. The
/// other bits count the [`VcpuLease`]s held on it.
const LENT: u32 = 1 << 31;

impl VmmWriteBitmap {
    fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE as usize);
        VmmWriteBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            any: AtomicBool::new(false),
            lease: AtomicU32::new(0),
        }
    }

    /// ORs the recorded pages into `out` (a bitmap over guest frames) starting
    /// at frame `first_frame`, and clears them. Bits are only cleared once they
    /// have been copied, so a write racing with this call is never lost.
    pub fn drain_into(&self, out: &mut [u64], first_frame: u64) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let bits = w.swap(0, Ordering::AcqRel);
            let mut b = bits;
            while b != 0 {
                let bit = b.trailing_zeros() as u64;
                b &= b - 1;
                let frame = first_frame + i as u64 * 64 + bit;
                out[(frame / 64) as usize] |= 1 << (frame % 64);
            }
        }
    }
}

impl Default for VmmWriteBitmap {
    fn default() -> Self {
        VmmWriteBitmap::new(0)
    }
}

impl NewBitmap for VmmWriteBitmap {
    fn with_len(len: usize) -> Self {
        VmmWriteBitmap::new(len)
    }
}

impl<'a> WithBitmapSlice<'a> for VmmWriteBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmWriteBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE as usize;
        let last = ((offset + len - 1) / PAGE_SIZE as usize).min(self.pages.saturating_sub(1));
        for p in first..=last {
            self.words[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
        self.any.store(true, Ordering::Release);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let p = offset / PAGE_SIZE as usize;
        p < self.pages && self.words[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

/// Drains the VMM-write bitmaps of every region into `out`, a bitmap over
/// guest frame numbers (see [`VmmWriteBitmap::drain_into`]).
pub fn drain_vmm_writes(mem: &GuestMem, out: &mut [u64]) {
    for r in mem.iter() {
        vm_memory::MmapRegion::bitmap(r).drain_into(out, r.start_addr().0 / PAGE_SIZE);
    }
}

/// Permission for vCPUs to run over a guest's RAM. A [`crate::Machine`]
/// takes one before it creates its first vCPU and holds it until its vCPU
/// threads have been joined (it is dropped with the machine), so while it
/// exists [`with_ram_mut`] refuses that RAM — and while a [`with_ram_mut`]
/// slice is alive no machine can be started over it.
#[derive(Debug)]
pub(crate) struct VcpuLease(GuestMem);

impl VcpuLease {
    /// Takes a lease on every region of `mem`; fails, taking none, while a
    /// [`with_ram_mut`] slice of any of them is alive.
    pub(crate) fn acquire(mem: &GuestMem) -> Result<VcpuLease, MemoryError> {
        let mut taken = Vec::new();
        for r in mem.iter() {
            let word = &vm_memory::MmapRegion::bitmap(r).lease;
            let ok = word
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    (v & LENT == 0).then_some(v + 1)
                })
                .is_ok();
            if !ok {
                for w in taken {
                    release(w);
                }
                return Err(MemoryError::InUse(
                    "a with_ram_mut slice of it is alive, so no vCPU may run over it",
                ));
            }
            taken.push(word);
        }
        Ok(VcpuLease(mem.clone()))
    }
}

fn release(word: &AtomicU32) {
    word.fetch_sub(1, Ordering::AcqRel);
}

impl Drop for VcpuLease {
    fn drop(&mut self) {
        for r in self.0.iter() {
            release(&vm_memory::MmapRegion::bitmap(r).lease);
        }
    }
}

/// Runs `f` over guest RAM as one mutable byte slice, indexed by guest
/// page number × 4096. Needs a single region (guests of at most 3 GiB): the
/// backup applies checkpoints to its replica this way. Writes through the
/// slice are recorded neither in the [`VmmWriteBitmap`] nor in KVM's dirty
/// log.
///
/// # Soundness
///
/// The slice must be the only access to the region's bytes while `f` runs.
/// `&mut GuestMem` alone does not give that: clones of a [`GuestMem`] share
/// their regions, and KVM may have the RAM registered in a VM. What makes it
/// hold:
///
/// - **No vCPU runs over this RAM** (checked). KVM reads and writes guest RAM
///   contents on behalf of vCPUs (guest code, instruction emulation, per-vCPU
///   pages such as kvmclock's that it updates around `KVM_RUN`); the VM-level
///   ioctls castor issues on a VM without vCPUs (memory slots, irqchip, PIT,
///   clock) do not touch them. A [`crate::Machine`] holds a vCPU lease on its
///   RAM from before it creates a vCPU until its vCPU threads are joined; this
///   function fails with [`MemoryError::InUse`] while one is held, and a
///   machine cannot start while a slice is lent. A [`crate::Standby`] VM (the
///   backup keeps one registered over its replica while it applies
///   checkpoints) has no vCPUs and takes the lease only in
///   [`crate::Machine::restore_standby`], so it may exist meanwhile.
/// - **No two slices** (checked): a second call on any clone of the same RAM
///   fails with [`MemoryError::InUse`] while the first slice lives.
/// - **Nothing else in this process touches the RAM meanwhile** (a contract
///   on the caller, *not* checked): no read or write through another clone's
///   `GuestMemory` API or a raw pointer, from `f` or from another thread, until
///   `f` returns. castor's backup keeps it: besides the replica it passes
///   here, its only handles to that RAM are the one inside its standby VM
///   (which reads nothing until `restore_standby`) and short-lived clones it
///   hands to `prepare_standby` (which only registers the addresses with
///   KVM). The RAM is a private anonymous mapping: no other process shares
///   it.
pub fn with_ram_mut<R>(
    mem: &mut GuestMem,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R, MemoryError> {
    if mem.num_regions() != 1 {
        return Err(MemoryError::NotOneRegion(ram_size(mem)));
    }
    let r = mem.iter().next().expect("one region");
    let word = &vm_memory::MmapRegion::bitmap(r).lease;
    if let Err(v) = word.compare_exchange(0, LENT, Ordering::AcqRel, Ordering::Acquire) {
        return Err(MemoryError::InUse(if v & LENT != 0 {
            "another with_ram_mut slice of it is alive"
        } else {
            "a machine may run vCPUs over it"
        }));
    }
    // Returns the slice even if `f` panics.
    struct Lent<'a>(&'a AtomicU32);
    impl Drop for Lent<'_> {
        fn drop(&mut self) {
            self.0.fetch_and(!LENT, Ordering::Release);
        }
    }
    let _lent = Lent(word);
    let (ptr, len) = (r.as_ptr(), r.len() as usize);
    // `ptr..ptr + len` is the live, writable (PROT_READ|PROT_WRITE),
    // page-aligned mapping of `mem`'s only region, kept mapped by the borrow
    // of `mem` for as long as the slice lives (the slice cannot escape `f`).
    // No other access aliases it while `f` runs: the lease word (set above,
    // cleared after `f`) shows no vCPU lease is held on the region and keeps
    // machines from taking one and other calls of this function from lending
    // it again; the remaining condition — nothing else in this process reads
    // or writes the RAM meanwhile — is this function's documented contract
    // (see "Soundness" above).
    // SAFETY: a live, exclusively lent mapping of `len` bytes (see above).
    let slice = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    Ok(f(slice))
}

/// The frame numbers whose bits are set in `bitmap`, ascending.
pub fn frames_of(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, &w)| {
        let mut b = w;
        std::iter::from_fn(move || {
            if b == 0 {
                return None;
            }
            let bit = b.trailing_zeros() as u64;
            b &= b - 1;
            Some(i as u64 * 64 + bit)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(layout(1 << 30).unwrap(), vec![(GuestAddress(0), 1 << 30)]);
        let l = layout(4 << 30).unwrap();
        assert_eq!(l[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(l[1], (GuestAddress(HIGH_RAM_START), (1 << 30) as usize));
        assert!(matches!(layout(1 << 20), Err(MemoryError::BadSize(_))));
        assert!(matches!(
            layout((64 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
    }

    #[test]
    fn vmm_writes_are_recorded_and_drained_once() {
        let mem = create(4 << 30).unwrap();
        mem.write_slice(&[1u8; 10], GuestAddress(0x5000 - 4))
            .unwrap();
        mem.write_obj(7u64, GuestAddress(HIGH_RAM_START + 3 * PAGE_SIZE))
            .unwrap();
        let mut out = vec![0u64; frame_limit(&mem).div_ceil(64) as usize];
        drain_vmm_writes(&mem, &mut out);
        let got: Vec<u64> = frames_of(&out).collect();
        assert_eq!(got, vec![4, 5, HIGH_RAM_START / PAGE_SIZE + 3]);
        let mut again = vec![0u64; out.len()];
        drain_vmm_writes(&mem, &mut again);
        assert!(again.iter().all(|&w| w == 0), "drained bits stay cleared");
    }

    #[test]
    fn ram_slice_is_exclusive_of_other_slices_and_of_vcpus() {
        let mut mem = create(MIN_MEM).unwrap();
        let mut clone = mem.clone();
        with_ram_mut(&mut mem, |ram| {
            ram[4096] = 7;
            // A clone shares the region: no second slice, no vCPU lease.
            assert!(matches!(
                with_ram_mut(&mut clone, |_| ()),
                Err(MemoryError::InUse(_))
            ));
            assert!(matches!(
                VcpuLease::acquire(&clone),
                Err(MemoryError::InUse(_))
            ));
        })
        .unwrap();
        assert_eq!(clone.read_obj::<u8>(GuestAddress(4096)).unwrap(), 7);
        // Released when `f` returns, also when it panics.
        with_ram_mut(&mut clone, |_| ()).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_ram_mut(&mut clone, |_| panic!("in f"))
        }));
        assert!(r.is_err());
        {
            let _a = VcpuLease::acquire(&mem).unwrap();
            let _b = VcpuLease::acquire(&clone).unwrap();
            assert!(matches!(
                with_ram_mut(&mut mem, |_| ()),
                Err(MemoryError::InUse(_))
            ));
            drop(_a);
            assert!(with_ram_mut(&mut mem, |_| ()).is_err(), "one lease left");
        }
        with_ram_mut(&mut mem, |_| ()).unwrap();
    }

    #[test]
    fn ram_slice_needs_one_region() {
        let mut mem = create(4 << 30).unwrap();
        assert!(matches!(
            with_ram_mut(&mut mem, |_| ()),
            Err(MemoryError::NotOneRegion(n)) if n == 4 << 30
        ));
    }
}
