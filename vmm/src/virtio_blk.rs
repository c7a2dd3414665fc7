//! A virtio-blk device (virtio 1.x over virtio-mmio) over a [`Disk`], one
//! request queue on rust-vmm's `virtio-queue`, served by a worker thread.
//!
//! # Where it is
//! [`BLK_MMIO_BASE`] (4 KiB, beside the network card's window), interrupt on
//! GSI [`BLK_GSI`] (the serial port has 4, the network card 5). A Linux guest
//! finds it with `virtio_mmio.device=4K@0xfeb02000:6`; castor's guest polls
//! the used ring from ring 3 and needs no interrupt.
//!
//! Features: `VERSION_1`, `SEG_MAX` (254 data segments), `BLK_SIZE` (512-byte
//! logical blocks), `FLUSH`. No discard or write-zeroes. The configuration
//! space holds the capacity in 512-byte sectors, `seg_max` and `blk_size`.
//!
//! # Requests
//! A chain is a 16-byte device-readable header (type, reserved, sector),
//! data (device-readable for OUT, device-writable for IN and GET_ID), and a
//! final device-writable status byte. IN, OUT, FLUSH (`fdatasync`) and
//! GET_ID are served; any other type gets `UNSUPP`. The chain is parsed and
//! checked whole before any byte moves, as Firecracker's
//! `devices/virtio/block/virtio/request.rs` and rust-vmm's `virtio-blk`
//! `request.rs` do (what was taken from them: the header, data and status
//! layout and its checks — a readable header of at least 16 bytes, data
//! lengths in whole sectors, the range check `sector * 512 + len <=
//! capacity`, a writable status byte last, GET_ID's 20-byte id; the used
//! length counts the bytes the device wrote). Unlike them castor does not
//! allocate per request: data moves in pieces of at most 256 KiB with plain
//! `pread`/`pwrite` on the [`Disk`]. io_uring was not used: the image is a
//! page-cache-backed file and the guest here issues one request at a time
//! (it polls), so a synchronous `pwrite` of a few KiB (a few µs) is not where
//! the time goes; not measured against io_uring.
//!
//! # Off the vCPU thread
//! The guest's notify only wakes the worker thread (a condition variable):
//! the vCPU goes back into the guest at once and the worker pops chains,
//! does the I/O and writes data, status and the used ring. Everything the
//! device writes into guest RAM goes through the `GuestMemory` API, so
//! castor's dirty bitmap ([`crate::memory::VmmWriteBitmap`]) records it and
//! the next checkpoint carries it.
//!
//! # Quiesced at the pause
//! [`crate::Machine::pause`], after the vCPUs park, sets the device paused
//! and waits until no request is in flight: the worker finished every chain
//! it popped (data, status and used ring written), and pops nothing until
//! the resume. So a checkpoint never holds a half-done request: each one is
//! completed (in the used ring) or still in the available ring, and a
//! restored device resumes from `next_avail`.
//!
//! # Recording for replication
//! [`BlockDevice::record`] keeps the content of every 4 KiB block the guest
//! writes (one entry per block: its last content), taken with
//! [`BlockDevice::take_writes`] while the machine is paused. The buffer is
//! bounded: a write that would pass the bound is put back in the available
//! ring and waits, unpopped (so the pause does not wait for it), until the
//! buffer is taken — the guest's disk I/O slows, nothing is dropped.
//!
//! # Bad input from the guest
//! A chain outside guest memory, of the wrong direction, with a short header,
//! no status byte, data not in whole sectors, or a sector range past the end
//! gets status `IOERR` when a status byte can be written (else it is returned
//! used with length 0), is counted ([`BlkStats::bad_requests`]; host I/O
//! failures in [`BlkStats::io_errors`]) and logged (the first ten, then at
//! powers of two). Never a panic. A ring that cannot be read stops the queue
//! with `DEVICE_NEEDS_RESET` until the driver resets the device.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Disk, BLOCK};
use crate::memory::GuestMem;
use crate::virtio_net::QueueRegs;

/// Guest-physical base of the device's virtio-mmio window.
pub const BLK_MMIO_BASE: u64 = 0xFEB0_2000;
/// Size of the window.
pub const BLK_MMIO_LEN: u64 = 0x1000;
/// GSI of the device's interrupt.
pub const BLK_GSI: u32 = 6;
/// Entries the request queue offers.
pub const QUEUE_MAX: u16 = 256;
/// Data segments per request the device announces (`seg_max`).
pub const SEG_MAX: u32 = QUEUE_MAX as u32 - 2;
/// Bytes of a sector (the protocol's unit, and the logical block size).
pub const SECTOR: u64 = 512;
/// GET_ID's answer.
pub const DEVICE_ID: &[u8; 20] = b"castor-disk\0\0\0\0\0\0\0\0\0";

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x5453_4341;
const DEVICE_BLK: u32 = 2;
const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;
/// Features the device offers.
pub const DEVICE_FEATURES: u64 = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_VERSION_1;
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

/// Request types.
pub const T_IN: u32 = 0;
/// ...
pub const T_OUT: u32 = 1;
/// ...
pub const T_FLUSH: u32 = 4;
/// ...
pub const T_GET_ID: u32 = 8;
/// Status values.
pub const ST_OK: u8 = 0;
/// ...
pub const ST_IOERR: u8 = 1;
/// ...
pub const ST_UNSUPP: u8 = 2;

/// Largest piece of data moved at once.
const PIECE: usize = 256 << 10;

/// The device's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// The device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature word selectors.
    pub device_features_sel: u32,
    /// ...
    pub driver_features_sel: u32,
    /// Selected queue.
    pub queue_sel: u32,
    /// The request queue.
    pub queue: QueueRegs,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// The disk's size in bytes (a restore needs a disk of this size).
    pub capacity_bytes: u64,
}

impl BlkState {
    /// A fresh device over a disk of `bytes`.
    pub fn new(bytes: u64) -> Self {
        BlkState {
            capacity_bytes: bytes,
            ..Default::default()
        }
    }

    /// Checks what a restore relies on (ring addresses against guest memory
    /// are checked when the device is built over it).
    pub fn validate(&self) -> Result<(), String> {
        let q = &self.queue;
        if q.size > QUEUE_MAX || (q.size != 0 && !q.size.is_power_of_two()) {
            return Err(format!("virtio-blk queue: size {}", q.size));
        }
        if q.ready && q.size == 0 {
            return Err("virtio-blk queue: ready with size 0".into());
        }
        if self.capacity_bytes == 0 || !self.capacity_bytes.is_multiple_of(BLOCK) {
            return Err(format!(
                "virtio-blk: capacity of {} bytes",
                self.capacity_bytes
            ));
        }
        Ok(())
    }
}

/// Counters of the device's data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Requests refused for a bad chain or sector range.
    pub bad_requests: u64,
    /// Requests that failed on the host (the image's read, write or sync).
    pub io_errors: u64,
    /// Requests of a type the device does not serve.
    pub unsupported: u64,
    /// Times a write waited for the recording buffer to be taken.
    pub record_waits: u64,
}

/// The blocks written since the last [`BlockDevice::take_writes`].
#[derive(Debug, Default)]
pub struct DiskWrites {
    /// Block number → its content after the last write to it.
    pub blocks: BTreeMap<u64, Box<[u8; 4096]>>,
    /// A FLUSH completed since the last take.
    pub flushed: bool,
    /// Bytes held (4096 per block).
    pub bytes: u64,
}

struct Inner {
    regs: BlkState,
    queue: Queue,
    broken: bool,
    paused: bool,
    in_flight: bool,
    /// A notify not yet served.
    kicked: bool,
    /// Bumped by a reset: a request popped before it is not completed.
    generation: u64,
    stop: bool,
    /// A write waits for the recording buffer to be taken.
    full: bool,
    stats: BlkStats,
    record: Option<u64>,
    writes: DiskWrites,
}

/// The device. Shared by the vCPU threads (registers, notify), its worker
/// thread and the machine (pause, capture, recording).
pub struct BlockDevice {
    inner: Mutex<Inner>,
    cv: Condvar,
    mem: GuestMem,
    irq: EventFd,
    disk: Arc<Disk>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

/// A block written by a request, with its content after it.
type Written = (u64, Box<[u8; 4096]>);

/// A parsed request: what to do, and where its bytes are.
struct Request {
    head: u16,
    kind: u32,
    sector: u64,
    /// Data segments (address, length) after the header, before the status.
    data: Vec<(GuestAddress, usize)>,
    data_len: u64,
    /// The status byte, if the chain has a writable last byte.
    status: Option<GuestAddress>,
}

/// Why a chain was refused, and where its status byte is (if any).
struct Refused {
    head: u16,
    status: Option<GuestAddress>,
    why: String,
}

/// Reads and checks a whole chain; moves no data.
fn parse(
    chain: virtio_queue::DescriptorChain<&GuestMem>,
    mem: &GuestMem,
    capacity: u64,
) -> Result<Request, Refused> {
    let head = chain.head_index();
    let mut descs: Vec<(GuestAddress, usize, bool)> = Vec::new();
    for d in chain {
        descs.push((d.addr(), d.len() as usize, d.is_write_only()));
    }
    // The status byte: the last byte of the last descriptor, writable.
    let status = descs
        .last()
        .filter(|(a, l, w)| *w && *l >= 1 && GuestMemoryBackend::check_range(mem, *a, *l))
        .and_then(|(a, l, _)| a.checked_add(*l as u64 - 1));
    let refuse = |why: String| Refused { head, status, why };
    if descs.is_empty() {
        return Err(refuse("an empty chain".into()));
    }
    if status.is_none() {
        return Err(refuse(
            "no writable status byte at the end of the chain".into(),
        ));
    }
    for (a, l, _) in &descs {
        if !GuestMemoryBackend::check_range(mem, *a, *l) {
            return Err(refuse(format!(
                "a descriptor of {l} bytes at {:#x} outside guest memory",
                a.0
            )));
        }
    }
    // The header: 16 device-readable bytes in the first descriptor(s).
    let mut hdr = [0u8; 16];
    let mut got = 0;
    let mut i = 0;
    let mut first_off = 0usize;
    while got < 16 {
        let Some(&(a, l, w)) = descs.get(i) else {
            return Err(refuse(format!("a header of {got} bytes (16 needed)")));
        };
        if w {
            return Err(refuse(format!("a header of {got} bytes (16 needed)")));
        }
        let n = (16 - got).min(l);
        if mem.read_slice(&mut hdr[got..got + n], a).is_err() {
            return Err(refuse("the header cannot be read".into()));
        }
        got += n;
        if n < l {
            first_off = n;
        } else {
            i += 1;
        }
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    // Data: what lies between the header and the status byte.
    let mut data = Vec::new();
    let last = descs.len() - 1;
    let mut dir: Option<bool> = None;
    for (k, &(a, l, w)) in descs.iter().enumerate().skip(i) {
        let (mut a, mut l) = (a, l);
        if k == i && first_off > 0 {
            a = GuestAddress(a.0 + first_off as u64);
            l -= first_off;
        }
        if k == last {
            l -= 1; // the status byte
        }
        if l == 0 {
            continue;
        }
        if dir.is_some_and(|d| d != w) {
            return Err(refuse("data both device-readable and writable".into()));
        }
        dir = Some(w);
        data.push((a, l));
    }
    let data_len: u64 = data.iter().map(|(_, l)| *l as u64).sum();
    let want_write = match kind {
        T_IN | T_GET_ID => Some(true),
        T_OUT => Some(false),
        _ => None,
    };
    if let (Some(want), Some(d)) = (want_write, dir) {
        if want != d {
            return Err(refuse(format!(
                "request type {kind} with {} data",
                if d {
                    "device-writable"
                } else {
                    "device-readable"
                }
            )));
        }
    }
    if matches!(kind, T_IN | T_OUT) {
        if !data_len.is_multiple_of(SECTOR) {
            return Err(refuse(format!("{data_len} data bytes, not whole sectors")));
        }
        if data.len() > SEG_MAX as usize {
            return Err(refuse(format!("{} data segments", data.len())));
        }
        let ok = sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(data_len))
            .is_some_and(|end| end <= capacity);
        if !ok {
            return Err(refuse(format!(
                "sectors {sector}+{} past the end of the disk ({} sectors)",
                data_len / SECTOR,
                capacity / SECTOR
            )));
        }
    }
    Ok(Request {
        head,
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

impl BlockDevice {
    /// A device over `disk` and `mem` in `state` (a fresh one:
    /// [`BlkState::new`]), raising its interrupt through `irq`. Its worker
    /// starts with [`BlockDevice::start`].
    pub(crate) fn new(
        state: &BlkState,
        mem: GuestMem,
        irq: EventFd,
        disk: Arc<Disk>,
    ) -> Result<BlockDevice, String> {
        state.validate()?;
        if state.capacity_bytes != disk.bytes() {
            return Err(format!(
                "the machine state's disk has {} bytes, the disk {} has {} bytes",
                state.capacity_bytes,
                disk.path().display(),
                disk.bytes()
            ));
        }
        let queue = state.queue.queue(&mem, "virtio-blk queue")?;
        Ok(BlockDevice {
            inner: Mutex::new(Inner {
                regs: state.clone(),
                queue,
                broken: false,
                paused: false,
                in_flight: false,
                // A restored device may have requests waiting in its ring.
                kicked: true,
                generation: 0,
                stop: false,
                full: false,
                stats: BlkStats::default(),
                record: None,
                writes: DiskWrites::default(),
            }),
            cv: Condvar::new(),
            mem,
            irq,
            disk,
            worker: Mutex::new(None),
        })
    }

    /// Starts the worker thread.
    pub(crate) fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let dev = self.clone();
        let t = std::thread::Builder::new()
            .name("castor-blk".into())
            .spawn(move || dev.work())?;
        *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(())
    }

    /// Stops the worker (the machine is stopping); a request in flight is
    /// finished first.
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
        let t = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The data path's counters.
    pub fn stats(&self) -> BlkStats {
        self.lock().stats
    }

    /// The device's state now (call while the machine is paused).
    pub fn state(&self) -> BlkState {
        let i = self.lock();
        let mut s = i.regs.clone();
        s.queue = QueueRegs::of(&i.queue);
        s
    }

    /// Keep (true) or stop keeping (false) the content, after the write, of
    /// every 4 KiB block the guest writes. While on, at most `max_bytes` are
    /// kept; a write that would exceed it waits (the guest's disk I/O is
    /// slowed, never dropped) until take_writes empties the buffer.
    pub fn record(&self, on: bool, max_bytes: u64) {
        let mut i = self.lock();
        if on {
            if i.record.is_none() {
                i.writes = DiskWrites::default();
            }
            i.record = Some(max_bytes.max(BLOCK));
        } else {
            i.record = None;
            i.writes = DiskWrites::default();
        }
        i.full = false;
        drop(i);
        self.cv.notify_all();
    }

    /// Every block written since the last take (or since recording began),
    /// with its content now; call while the machine is paused.
    pub fn take_writes(&self) -> DiskWrites {
        let mut i = self.lock();
        let w = std::mem::take(&mut i.writes);
        i.full = false;
        drop(i);
        self.cv.notify_all();
        w
    }

    /// Quiesces (true: returns once no request is in flight) or resumes the
    /// device with the machine.
    pub(crate) fn set_paused(&self, paused: bool) {
        let mut i = self.lock();
        i.paused = paused;
        if paused {
            while i.in_flight {
                i = self.cv.wait(i).unwrap_or_else(|p| p.into_inner());
            }
        } else {
            i.kicked = true;
            drop(i);
            self.cv.notify_all();
        }
    }

    fn ready(&self, i: &Inner) -> bool {
        i.regs.status & S_DRIVER_OK != 0
            && i.regs.status & S_NEEDS_RESET == 0
            && i.queue.ready()
            && !i.broken
    }

    /// The worker: pops one chain at a time while running and not paused.
    fn work(&self) {
        let mut i = self.lock();
        loop {
            if i.stop {
                return;
            }
            if i.paused || !i.kicked || i.full || !self.ready(&i) {
                i = self.cv.wait(i).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let chain = match i.queue.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.break_queue(&mut i, &e.to_string());
                    continue;
                }
            };
            let Some(chain) = chain else {
                i.kicked = false;
                continue;
            };
            let capacity = self.disk.bytes();
            let req = match parse(chain, &self.mem, capacity) {
                Ok(r) => r,
                Err(r) => {
                    self.bad_request(&mut i, r.head, &r.why);
                    let wrote = r
                        .status
                        .is_some_and(|s| self.mem.write_obj(ST_IOERR, s).is_ok());
                    let len = u32::from(wrote);
                    self.complete(&mut i, r.head, len);
                    continue;
                }
            };
            if req.kind == T_OUT {
                if let Some(max) = i.record {
                    let first = req.sector * SECTOR / BLOCK;
                    let end = (req.sector * SECTOR + req.data_len).div_ceil(BLOCK);
                    let new = (first..end)
                        .filter(|b| !i.writes.blocks.contains_key(b))
                        .count() as u64
                        * BLOCK;
                    if i.writes.bytes > 0 && i.writes.bytes + new > max {
                        // Back into the ring, unpopped, until the take.
                        i.queue.go_to_previous_position();
                        i.full = true;
                        i.stats.record_waits += 1;
                        continue;
                    }
                }
            }
            i.in_flight = true;
            let generation = i.generation;
            let recording = i.record.is_some();
            drop(i);
            let (status, len, written) = self.serve(&req, recording);
            i = self.lock();
            if let Some(s) = req.status {
                // Checked inside guest memory by `parse`.
                let _ = self.mem.write_obj(status, s);
            }
            match status {
                ST_OK => match req.kind {
                    T_IN => {
                        i.stats.reads += 1;
                        i.stats.read_bytes += req.data_len;
                    }
                    T_OUT => {
                        i.stats.writes += 1;
                        i.stats.write_bytes += req.data_len;
                    }
                    T_FLUSH => {
                        i.stats.flushes += 1;
                        if i.record.is_some() {
                            i.writes.flushed = true;
                        }
                    }
                    _ => {}
                },
                ST_UNSUPP => i.stats.unsupported += 1,
                _ => {
                    i.stats.io_errors += 1;
                    let n = i.stats.io_errors;
                    if n <= 10 || n.is_power_of_two() {
                        warn!(disk = %self.disk.path().display(), head = req.head, total = n, "virtio-blk: the request failed on the host; IOERR to the guest");
                    }
                }
            }
            if i.record.is_some() {
                for (b, data) in written {
                    if i.writes.blocks.insert(b, data).is_none() {
                        i.writes.bytes += BLOCK;
                    }
                }
            }
            i.in_flight = false;
            if i.generation == generation {
                self.complete(&mut i, req.head, len + 1);
            }
            self.cv.notify_all();
        }
    }

    /// Does a parsed request's I/O (no lock held). Returns the status, the
    /// data bytes written into the guest, and (recording) the blocks written.
    fn serve(&self, req: &Request, recording: bool) -> (u8, u32, Vec<Written>) {
        let mut written = Vec::new();
        let mem = &self.mem;
        let disk = &self.disk;
        let mut buf = vec![0u8; PIECE.min(req.data_len as usize).max(1)];
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            debug!(head = req.head, "virtio-blk: {what}: {e}");
            (ST_IOERR, 0, Vec::new())
        };
        match req.kind {
            T_IN => {
                let mut off = req.sector * SECTOR;
                let mut total = 0u32;
                for &(a, l) in &req.data {
                    let mut done = 0;
                    while done < l {
                        let n = (l - done).min(PIECE);
                        if let Err(e) = disk.read_at(off, &mut buf[..n]) {
                            return failed("reading the disk", &e);
                        }
                        if let Err(e) = mem.write_slice(&buf[..n], GuestAddress(a.0 + done as u64))
                        {
                            return failed("writing guest memory", &e);
                        }
                        done += n;
                        off += n as u64;
                        total = total.saturating_add(n as u32);
                    }
                }
                (ST_OK, total, written)
            }
            T_OUT => {
                let start = req.sector * SECTOR;
                let mut off = start;
                let mut partial = BTreeSet::new();
                for &(a, l) in &req.data {
                    let mut done = 0;
                    while done < l {
                        let n = (l - done).min(PIECE);
                        if let Err(e) =
                            mem.read_slice(&mut buf[..n], GuestAddress(a.0 + done as u64))
                        {
                            return failed("reading guest memory", &e);
                        }
                        if let Err(e) = disk.write_at(off, &buf[..n]) {
                            return failed("writing the disk", &e);
                        }
                        if recording {
                            let end = off + n as u64;
                            for b in off / BLOCK..end.div_ceil(BLOCK) {
                                let bs = b * BLOCK;
                                if bs >= off && bs + BLOCK <= end {
                                    let s = (bs - off) as usize;
                                    let mut c = Box::new([0u8; 4096]);
                                    c.copy_from_slice(&buf[s..s + BLOCK as usize]);
                                    written.push((b, c));
                                } else {
                                    partial.insert(b);
                                }
                            }
                        }
                        done += n;
                        off += n as u64;
                    }
                }
                // Blocks written in part: their content now, read back.
                for b in partial {
                    let mut c = Box::new([0u8; 4096]);
                    if let Err(e) = disk.read_block(b, &mut c) {
                        return failed("reading back a block", &e);
                    }
                    written.retain(|(x, _)| *x != b);
                    written.push((b, c));
                }
                (ST_OK, 0, written)
            }
            T_FLUSH => match disk.sync() {
                Ok(()) => (ST_OK, 0, written),
                Err(e) => failed("fdatasync", &e),
            },
            T_GET_ID => {
                let mut left = DEVICE_ID.len();
                let mut total = 0u32;
                for &(a, l) in &req.data {
                    let n = l.min(left);
                    let s = DEVICE_ID.len() - left;
                    if let Err(e) = mem.write_slice(&DEVICE_ID[s..s + n], a) {
                        return failed("writing guest memory", &e);
                    }
                    left -= n;
                    total += n as u32;
                    if left == 0 {
                        break;
                    }
                }
                (ST_OK, total, written)
            }
            _ => (ST_UNSUPP, 0, written),
        }
    }

    fn complete(&self, i: &mut Inner, head: u16, len: u32) {
        if let Err(e) = i.queue.add_used(&self.mem, head, len) {
            self.break_queue(i, &e.to_string());
            return;
        }
        i.regs.interrupt_status |= 1;
        let _ = self.irq.write(1);
    }

    fn bad_request(&self, i: &mut Inner, head: u16, why: &str) {
        i.stats.bad_requests += 1;
        let n = i.stats.bad_requests;
        if n <= 10 || n.is_power_of_two() {
            warn!(
                head,
                total = n,
                "virtio-blk: bad request from the guest ({why}); IOERR"
            );
        }
    }

    fn break_queue(&self, i: &mut Inner, why: &str) {
        if !i.broken {
            warn!("virtio-blk: the guest's ring cannot be used ({why}); the queue stops until the driver resets the device");
        }
        i.broken = true;
        i.regs.status |= S_NEEDS_RESET;
        i.regs.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    fn reset(&self, i: &mut Inner) {
        i.regs = BlkState::new(self.disk.bytes());
        i.queue.reset();
        i.broken = false;
        i.full = false;
        i.generation += 1;
        debug!("virtio-blk: device reset by the driver");
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.disk.bytes() / SECTOR).to_le_bytes());
        // size_max (8..12): not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20): not offered.
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }

    /// A guest read of the window at `offset`.
    pub(crate) fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let cfg = self.config();
            for (k, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + k).copied().unwrap_or(0);
            }
            return;
        }
        let i = self.lock();
        let q0 = i.regs.queue_sel == 0;
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => DEVICE_BLK,
            0x00c => VENDOR,
            0x010 => match i.regs.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 if q0 => i.queue.max_size() as u32,
            0x044 if q0 => i.queue.ready() as u32,
            0x060 => i.regs.interrupt_status,
            0x070 => i.regs.status,
            0x0fc => i.regs.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (k, d) in data.iter_mut().enumerate() {
            *d = b.get(k).copied().unwrap_or(0);
        }
    }

    /// A guest write to the window at `offset`.
    pub(crate) fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // the configuration is read-only
        }
        let mut b = [0u8; 4];
        for (k, d) in data.iter().take(4).enumerate() {
            b[k] = *d;
        }
        let v = u32::from_le_bytes(b);
        let mut g = self.lock();
        let i = &mut *g;
        let q0 = i.regs.queue_sel == 0;
        let setup = i.regs.status & S_DRIVER_OK == 0 && q0;
        match offset {
            0x014 => i.regs.device_features_sel = v,
            0x020 => match i.regs.driver_features_sel {
                0 => i.regs.driver_features = (i.regs.driver_features & !0xFFFF_FFFF) | v as u64,
                1 => {
                    i.regs.driver_features =
                        (i.regs.driver_features & 0xFFFF_FFFF) | ((v as u64) << 32)
                }
                _ => {}
            },
            0x024 => i.regs.driver_features_sel = v,
            0x030 => i.regs.queue_sel = v,
            0x038 if setup => i.queue.set_size(v as u16),
            0x044 if setup => {
                i.queue.set_ready(v == 1);
                if v == 1 && !i.queue.is_valid(&self.mem) {
                    warn!("virtio-blk: the driver's queue set-up is invalid (size or rings outside guest memory)");
                    i.queue.set_ready(false);
                }
            }
            0x050 if v == 0 => {
                i.kicked = true;
                drop(g);
                self.cv.notify_all();
            }
            0x064 => i.regs.interrupt_status &= !v,
            0x070 => {
                self.set_status(i, v);
                drop(g);
                self.cv.notify_all();
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    0x080 => i.queue.set_desc_table_address(lo, hi),
                    0x090 => i.queue.set_avail_ring_address(lo, hi),
                    _ => i.queue.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    fn set_status(&self, i: &mut Inner, v: u32) {
        if v == 0 {
            self.reset(i);
            return;
        }
        let mut v = v & (S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK | S_FEATURES_OK | S_FAILED);
        if v & S_FEATURES_OK != 0 && i.regs.status & S_FEATURES_OK == 0 {
            let f = i.regs.driver_features;
            if f & !DEVICE_FEATURES != 0 || f & F_VERSION_1 == 0 {
                warn!(
                    features = format!("{f:#x}"),
                    "virtio-blk: the driver accepted features the device does not offer, or not VERSION_1"
                );
                v &= !S_FEATURES_OK;
            }
        }
        i.regs.status = v | (i.regs.status & S_NEEDS_RESET);
        i.kicked = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x11000;
    const USED: u64 = 0x12000;
    const MEM: u64 = 64 << 20;

    struct Rig {
        dev: Arc<BlockDevice>,
        mem: GuestMem,
        _dir: tempfile::TempDir,
        slot: u16,
        next_desc: u16,
    }

    fn rig(disk_bytes: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(disk_bytes)
            .unwrap();
        let disk = Arc::new(Disk::open(&p).unwrap());
        let mem = crate::memory::create(MEM).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(
            BlockDevice::new(&BlkState::new(disk.bytes()), mem.clone(), irq, disk).unwrap(),
        );
        dev.start().unwrap();
        bring_up(&dev);
        Rig {
            dev,
            mem,
            _dir: dir,
            slot: 0,
            next_desc: 0,
        }
    }

    fn w32(d: &BlockDevice, off: u64, v: u32) {
        d.mmio_write(off, &v.to_le_bytes());
    }

    fn r32(d: &BlockDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn bring_up(d: &BlockDevice) {
        assert_eq!(r32(d, 0), MAGIC);
        assert_eq!(r32(d, 8), DEVICE_BLK);
        w32(d, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        w32(d, 0x24, 1);
        w32(d, 0x20, 1);
        w32(d, 0x24, 0);
        w32(d, 0x20, (F_FLUSH | F_BLK_SIZE) as u32);
        w32(d, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r32(d, 0x70) & S_FEATURES_OK, 0);
        w32(d, 0x30, 0);
        w32(d, 0x38, 16);
        w32(d, 0x80, DESC as u32);
        w32(d, 0x90, AVAIL as u32);
        w32(d, 0xa0, USED as u32);
        w32(d, 0x44, 1);
        assert_eq!(r32(d, 0x44), 1);
        w32(
            d,
            0x70,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    impl Rig {
        /// Posts a chain of (addr, len, writable) descriptors; returns its head.
        fn post(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, w)) in descs.iter().enumerate() {
                let idx = self.next_desc % 16;
                let d = DESC + idx as u64 * 16;
                let more = k + 1 < descs.len();
                let flags = (more as u16) | if w { 2 } else { 0 };
                self.mem.write_obj(addr, GuestAddress(d)).unwrap();
                self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                self.mem
                    .write_obj((idx + 1) % 16, GuestAddress(d + 14))
                    .unwrap();
                self.next_desc += 1;
            }
            self.mem
                .write_obj(
                    head % 16,
                    GuestAddress(AVAIL + 4 + 2 * (self.slot as u64 % 16)),
                )
                .unwrap();
            self.slot += 1;
            self.mem
                .write_obj(self.slot, GuestAddress(AVAIL + 2))
                .unwrap();
            head % 16
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(at)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }

        fn kick(&self) {
            w32(&self.dev, 0x50, 0);
        }

        /// Waits for the used ring to hold `n` entries.
        fn wait_used(&self, n: u16) {
            let t0 = std::time::Instant::now();
            loop {
                let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
                if used == n {
                    return;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "used {used}, waiting for {n}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn status(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        /// One request: header at 0x20000, data at 0x30000, status at 0x2F000.
        fn request(&mut self, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> u8 {
            self.header(0x20000, kind, sector);
            self.mem.write_obj(0xFFu8, GuestAddress(0x2F000)).unwrap();
            let mut descs = vec![(0x20000, 16, false)];
            if let Some((d, w)) = data {
                self.mem.write_slice(d, GuestAddress(0x30000)).unwrap();
                descs.push((0x30000, d.len() as u32, w));
            }
            descs.push((0x2F000, 1, true));
            self.post(&descs);
            self.kick();
            self.wait_used(self.slot);
            self.status(0x2F000)
        }
    }

    #[test]
    fn a_write_then_a_read_returns_the_data_and_guest_writes_are_recorded() {
        let mut r = rig(1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|x| (x * 7) as u8).collect();
        assert_eq!(r.request(T_OUT, 8, Some((&data, false))), ST_OK);
        let mut back = vec![0u8; 8192];
        r.dev.disk().read_at(8 * 512, &mut back).unwrap();
        assert_eq!(back, data);
        // Forget the VMM writes so far, then read into clean memory.
        let mut bits = vec![0u64; (MEM / 4096 / 64) as usize];
        crate::memory::drain_vmm_writes(&r.mem, &mut bits);
        r.mem
            .write_slice(&[0u8; 8192], GuestAddress(0x40000))
            .unwrap();
        crate::memory::drain_vmm_writes(&r.mem, &mut vec![0u64; bits.len()]);
        r.header(0x20000, T_IN, 8);
        r.post(&[
            (0x20000, 16, false),
            (0x40000, 8192, true),
            (0x2F000, 1, true),
        ]);
        r.kick();
        r.wait_used(2);
        assert_eq!(r.status(0x2F000), ST_OK);
        let mut got = vec![0u8; 8192];
        r.mem.read_slice(&mut got, GuestAddress(0x40000)).unwrap();
        assert_eq!(got, data);
        let len: u32 = r.mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
        assert_eq!(len, 8193);
        let mut bits = vec![0u64; (MEM / 4096 / 64) as usize];
        crate::memory::drain_vmm_writes(&r.mem, &mut bits);
        let has = |a: u64| bits[(a / 4096 / 64) as usize] & (1 << ((a / 4096) % 64)) != 0;
        for a in [0x40000, 0x41000, 0x2F000, USED] {
            assert!(has(a), "the device's write at {a:#x} is in the VMM bitmap");
        }
        assert_eq!(r.request(T_FLUSH, 0, None), ST_OK);
        let mut id = [0u8; 20];
        assert_eq!(r.request(T_GET_ID, 0, Some((&id, true))), ST_OK);
        r.mem.read_slice(&mut id, GuestAddress(0x30000)).unwrap();
        assert_eq!(&id, DEVICE_ID);
        assert_eq!(r.request(99, 0, None), ST_UNSUPP);
        let s = r.dev.stats();
        assert_eq!((s.reads, s.writes, s.flushes, s.unsupported), (1, 1, 1, 1));
        assert_eq!((s.bad_requests, s.io_errors), (0, 0));
        r.dev.stop();
    }

    #[test]
    fn bad_requests_get_ioerr_and_are_counted() {
        let mut r = rig(64 << 10);
        // Past the end: 128 sectors on the disk.
        assert_eq!(r.request(T_OUT, 127, Some((&[1u8; 1024], false))), ST_IOERR);
        assert_eq!(
            r.request(T_IN, u64::MAX / 2, Some((&[0u8; 512], true))),
            ST_IOERR
        );
        // Not whole sectors; data of the wrong direction.
        assert_eq!(r.request(T_OUT, 0, Some((&[1u8; 100], false))), ST_IOERR);
        assert_eq!(r.request(T_IN, 0, Some((&[0u8; 512], false))), ST_IOERR);
        // A header too short.
        r.mem.write_obj(0xFFu8, GuestAddress(0x2F000)).unwrap();
        r.post(&[(0x20000, 8, false), (0x2F000, 1, true)]);
        r.kick();
        r.wait_used(r.slot);
        assert_eq!(r.status(0x2F000), ST_IOERR);
        // Data outside guest memory.
        r.mem.write_obj(0xFFu8, GuestAddress(0x2F000)).unwrap();
        r.header(0x20000, T_IN, 0);
        r.post(&[
            (0x20000, 16, false),
            (0xFFFF_0000, 512, true),
            (0x2F000, 1, true),
        ]);
        r.kick();
        r.wait_used(r.slot);
        assert_eq!(r.status(0x2F000), ST_IOERR);
        // No status byte (last descriptor readable), and a status outside
        // memory: returned used with length 0.
        r.post(&[(0x20000, 16, false), (0x30000, 512, false)]);
        r.post(&[(0x20000, 16, false), (0xFFFF_0000, 1, true)]);
        r.kick();
        r.wait_used(r.slot);
        let len: u32 = r
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * ((r.slot as u64 - 1) % 16) + 4))
            .unwrap();
        assert_eq!(len, 0);
        assert_eq!(r.dev.stats().bad_requests, 8);
        // The device still works.
        assert_eq!(r.request(T_OUT, 0, Some((&[5u8; 512], false))), ST_OK);
        r.dev.stop();
    }

    #[test]
    fn a_broken_ring_needs_a_reset() {
        let r = rig(64 << 10);
        // avail idx 100 ahead of next_avail 0 on a 16-entry queue.
        r.mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        r.kick();
        let t0 = std::time::Instant::now();
        while r32(&r.dev, 0x70) & S_NEEDS_RESET == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        w32(&r.dev, 0x70, 0);
        assert_eq!(r32(&r.dev, 0x70), 0);
        r.dev.stop();
    }

    #[test]
    fn recording_keeps_each_block_once_with_its_last_content() {
        let mut r = rig(1 << 20);
        r.dev.record(true, 1 << 20);
        assert_eq!(r.request(T_OUT, 0, Some((&[1u8; 8192], false))), ST_OK);
        assert_eq!(r.request(T_OUT, 8, Some((&[2u8; 4096], false))), ST_OK);
        // 512 bytes into block 3, unaligned within it.
        assert_eq!(
            r.request(T_OUT, 3 * 8 + 2, Some((&[3u8; 512], false))),
            ST_OK
        );
        assert_eq!(r.request(T_FLUSH, 0, None), ST_OK);
        let w = r.dev.take_writes();
        assert!(w.flushed);
        assert_eq!(w.blocks.keys().copied().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(w.bytes, 3 * 4096);
        assert_eq!(*w.blocks[&0], [1u8; 4096]);
        assert_eq!(*w.blocks[&1], [2u8; 4096]);
        let mut b3 = [0u8; 4096];
        b3[1024..1536].fill(3);
        assert_eq!(*w.blocks[&3], b3);
        let w = r.dev.take_writes();
        assert!(w.blocks.is_empty() && !w.flushed);
        // A bound of two blocks: the third waits until the take.
        r.dev.record(true, 2 * 4096);
        assert_eq!(r.request(T_OUT, 16, Some((&[4u8; 8192], false))), ST_OK);
        r.header(0x20000, T_OUT, 32);
        r.post(&[
            (0x20000, 16, false),
            (0x30000, 4096, false),
            (0x2F000, 1, true),
        ]);
        r.kick();
        std::thread::sleep(Duration::from_millis(50));
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, r.slot - 1, "the write waits for room");
        assert_eq!(r.dev.state().queue.next_avail, r.slot - 1, "unpopped");
        let w = r.dev.take_writes();
        assert_eq!(w.blocks.len(), 2);
        r.wait_used(r.slot);
        assert_eq!(
            r.dev
                .take_writes()
                .blocks
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![4]
        );
        assert!(r.dev.stats().record_waits >= 1);
        r.dev.record(false, 0);
        r.dev.stop();
    }

    #[test]
    fn pause_waits_for_the_request_in_flight_and_pops_nothing_while_paused() {
        let mut r = rig(64 << 20);
        // A large write keeps the worker busy for a while.
        let big = 32u32 << 20;
        r.header(0x20000, T_OUT, 0);
        r.mem.write_obj(0xFFu8, GuestAddress(0x2F000)).unwrap();
        r.post(&[
            (0x20000, 16, false),
            (0x100000, big, false),
            (0x2F000, 1, true),
        ]);
        r.kick();
        // Wait until it is popped, then pause: the pause returns only when
        // it is complete.
        let t0 = std::time::Instant::now();
        while !r.dev.lock().in_flight && r.dev.stats().writes == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::hint::spin_loop();
        }
        r.dev.set_paused(true);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1, "complete when the pause returns");
        assert_eq!(r.status(0x2F000), ST_OK);
        // Nothing is popped while paused.
        r.header(0x20040, T_FLUSH, 0);
        r.post(&[(0x20040, 16, false), (0x2F000, 1, true)]);
        r.kick();
        std::thread::sleep(Duration::from_millis(30));
        let s = r.dev.state();
        assert_eq!(s.queue.next_avail, 1);
        r.dev.set_paused(false);
        r.wait_used(2);
        r.dev.stop();
    }

    #[test]
    fn state_round_trips_and_a_disk_of_another_size_is_refused() {
        assert_eq!(BLK_MMIO_BASE, guest::BLK_MMIO_BASE, "guest and VMM agree");
        let r = rig(64 << 10);
        let s = r.dev.state();
        assert!(s.queue.ready);
        assert_eq!(s.capacity_bytes, 64 << 10);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d2 = BlockDevice::new(&s, r.mem.clone(), irq, r.dev.disk().clone()).unwrap();
        assert_eq!(d2.state(), s);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("other.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(128 << 10)
            .unwrap();
        let other = Arc::new(Disk::open(&p).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let e = BlockDevice::new(&s, r.mem.clone(), irq, other).unwrap_err();
        assert!(e.contains("65536 bytes") && e.contains("other.img"), "{e}");
        let mut bad = s.clone();
        bad.queue.size = 3;
        assert!(bad.validate().is_err());
        let mut bad = s;
        bad.capacity_bytes = 100;
        assert!(bad.validate().is_err());
        r.dev.stop();
    }
}
