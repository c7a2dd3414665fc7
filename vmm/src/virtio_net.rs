//! A virtio-net device (virtio 1.x over virtio-mmio) with one receive and one
//! transmit queue, rust-vmm's `virtio-queue` for the rings.
//!
//! # Where it is
//! [`NET_MMIO_BASE`] (4 KiB, in the MMIO hole beside castor's console
//! window), interrupt on GSI [`NET_GSI`]. A Linux guest finds it with
//! `virtio_mmio.device=4K@0xfeb01000:5`; castor's guest polls it from ring 3
//! and needs no interrupt.
//!
//! # Data path
//! - **Transmit**: the guest's notify of queue 1 exits to its vCPU thread,
//!   which copies each frame out of its descriptor chain and hands it to the
//!   [`NetBackend`] in order (a tap, or a primary's hold that releases the
//!   frames of an epoch when the backup has that epoch's checkpoint).
//! - **Receive**: a thread reads the tap and writes each frame into the next
//!   receive buffer. Writes go through the `GuestMemory` API, so castor's own
//!   dirty bitmap records them and the next checkpoint carries them.
//! - **Pause**: [`crate::Machine::pause`] quiesces the device after the vCPUs:
//!   no receive is in progress while a checkpoint is taken, so the queue
//!   indices in the captured [`NetState`] match the rings in guest memory.
//!   Frames arriving meanwhile wait (a few hundred at most) and are delivered
//!   at resume; frames beyond that are dropped, as a busy NIC drops them.
//!
//! # Bad input from the guest
//! A descriptor chain outside guest memory, too long, looping or of the wrong
//! direction fails that one request: the frame is dropped, the chain is
//! returned used with length 0, the error is counted ([`NetStats::bad_chains`])
//! and logged. A queue whose rings themselves are unreadable is not touched
//! again until the driver resets the device (status `DEVICE_NEEDS_RESET`).
//! Nothing the guest writes can make the device write outside guest memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;
use crate::tap::{Tap, MAX_FRAME};

/// Guest-physical base of the device's virtio-mmio window.
pub const NET_MMIO_BASE: u64 = 0xFEB0_1000;
/// Size of the window.
pub const NET_MMIO_LEN: u64 = 0x1000;
/// GSI of the device's interrupt.
pub const NET_GSI: u32 = 5;
/// Entries per queue the device offers.
pub const QUEUE_MAX: u16 = 256;
/// Bytes of the virtio-net header in front of every frame (VERSION_1).
pub const NET_HDR_LEN: usize = 12;
/// Frames kept while the device cannot deliver them (paused, no buffers).
pub const MAX_PENDING_RX: usize = 256;
/// Frames kept while no backend is attached yet (after a restore).
pub const MAX_PENDING_TX: usize = 1024;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5453_4341; // "ACST"
const DEVICE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;
/// Features the device offers.
pub const DEVICE_FEATURES: u64 = F_MAC | F_STATUS | F_VERSION_1;
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;
const RX: usize = 0;
const TX: usize = 1;

/// Where the device sends the frames the guest transmits.
pub trait NetBackend: Send + Sync {
    /// One Ethernet frame, without the virtio-net header, in the order the
    /// guest sent them. Called on a vCPU thread: must not block for long.
    fn transmit(&self, frame: &[u8]);
}

impl NetBackend for Tap {
    fn transmit(&self, frame: &[u8]) {
        self.write_frame(frame);
    }
}

/// A backend that drops every frame (a node without a tap for this guest).
#[derive(Debug, Default)]
pub struct Discard;

impl NetBackend for Discard {
    fn transmit(&self, _frame: &[u8]) {}
}

/// One queue's registers and ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Entries the driver chose (a power of two, at most [`QUEUE_MAX`]).
    pub size: u16,
    /// The driver finished setting it up.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// ... of the driver (available) ring.
    pub avail: u64,
    /// ... of the device (used) ring.
    pub used: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
}

/// The device's saved state: registers, negotiated features, both queues and
/// what it learnt of the guest. Frames waiting in the device are not saved:
/// a restored device starts with none, as if the network had dropped them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
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
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Receive queue, transmit queue.
    pub queues: [QueueRegs; 2],
    /// The IPv4 address the guest sends from (learnt from its frames; used
    /// to announce it after a failover).
    pub guest_ipv4: Option<[u8; 4]>,
}

impl NetState {
    /// A fresh device with this MAC.
    pub fn new(mac: [u8; 6]) -> Self {
        NetState {
            mac,
            ..Default::default()
        }
    }

    /// Checks what a restore relies on (addresses against guest memory are
    /// checked when the device is built over it).
    pub fn validate(&self) -> Result<(), String> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.size > QUEUE_MAX || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(format!("virtio-net queue {i}: size {}", q.size));
            }
            if q.ready && q.size == 0 {
                return Err(format!("virtio-net queue {i}: ready with size 0"));
            }
        }
        Ok(())
    }
}

/// Counters of the device's data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the network dropped (no buffer, device not ready, too many waiting).
    pub rx_dropped: u64,
    /// Frames the guest sent that were dropped (no backend yet and too many waiting).
    pub tx_dropped: u64,
    /// Requests refused for a bad descriptor chain or frame.
    pub bad_chains: u64,
}

struct Inner {
    regs: NetState,
    queues: [Queue; 2],
    /// A queue whose rings could not be read: not touched until a reset.
    broken: [bool; 2],
    paused: bool,
    pending_rx: VecDeque<Vec<u8>>,
    pending_tx: VecDeque<Vec<u8>>,
    backend: Option<Arc<dyn NetBackend>>,
    stats: NetStats,
}

/// The device. Shared by the vCPU threads (register access, transmit), the
/// receive thread and the machine (pause, capture).
pub struct NetDevice {
    inner: Mutex<Inner>,
    mem: GuestMem,
    irq: EventFd,
    stop: AtomicBool,
    rx_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice").finish_non_exhaustive()
    }
}

impl QueueRegs {
    /// A `virtio-queue` queue in these registers over `mem`; `what` names it
    /// in errors ("virtio-net queue 1"). Rings marked ready must lie in
    /// guest memory.
    pub(crate) fn queue(&self, mem: &GuestMem, what: &str) -> Result<Queue, String> {
        let bad = |e: virtio_queue::Error| format!("{what}: {e}");
        let mut q = Queue::new(QUEUE_MAX).map_err(bad)?;
        if self.size != 0 {
            q.try_set_size(self.size).map_err(bad)?;
        }
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(bad)?;
        q.set_ready(self.ready);
        if self.ready && !q.is_valid(mem) {
            return Err(format!(
                "{what}: rings at {:#x}/{:#x}/{:#x} (size {}) are not in guest memory",
                self.desc, self.avail, self.used, self.size
            ));
        }
        Ok(q)
    }

    /// The registers and ring positions of `q`.
    pub(crate) fn of(q: &Queue) -> QueueRegs {
        QueueRegs {
            size: q.size(),
            ready: q.ready(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }
}

impl NetDevice {
    /// A device over `mem` in `state` (a fresh one: [`NetState::new`]),
    /// raising its interrupt through `irq`.
    pub(crate) fn new(state: &NetState, mem: GuestMem, irq: EventFd) -> Result<NetDevice, String> {
        state.validate()?;
        let queues = [
            state.queues[RX].queue(&mem, "virtio-net queue 0")?,
            state.queues[TX].queue(&mem, "virtio-net queue 1")?,
        ];
        Ok(NetDevice {
            inner: Mutex::new(Inner {
                regs: state.clone(),
                queues,
                broken: [false; 2],
                paused: false,
                pending_rx: VecDeque::new(),
                pending_tx: VecDeque::new(),
                backend: None,
                stats: NetStats::default(),
            }),
            mem,
            irq,
            stop: AtomicBool::new(false),
            rx_thread: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's state now (call while the machine is paused).
    pub fn state(&self) -> NetState {
        let i = self.lock();
        let mut s = i.regs.clone();
        s.queues = [QueueRegs::of(&i.queues[RX]), QueueRegs::of(&i.queues[TX])];
        s
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.lock().regs.mac
    }

    /// The data path's counters.
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// Sends the guest's frames to `backend` from now on (frames it sent
    /// before, while no backend was attached, go first), and delivers frames
    /// read from `rx` to the guest on a thread of its own.
    ///
    /// The guest is announced on `rx` first, now and twice more (50 and
    /// 200 ms later) as QEMU does after a migration: a bridge may still
    /// point the guest's MAC at another node's port (after a takeover, or
    /// a pair started again on the same bridge).
    pub fn attach(self: &Arc<Self>, backend: Arc<dyn NetBackend>, rx: Option<Arc<Tap>>) {
        if let Some(tap) = &rx {
            announce(tap.clone(), self.announcement());
        }
        {
            let mut i = self.lock();
            for f in i.pending_tx.drain(..) {
                backend.transmit(&f);
            }
            i.backend = Some(backend);
        }
        if let Some(tap) = rx {
            let dev = self.clone();
            let t = std::thread::Builder::new()
                .name("castor-net-rx".into())
                .spawn(move || dev.receive_loop(&tap));
            match t {
                Ok(t) => *self.rx_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t),
                Err(e) => warn!(
                    "cannot start the network receive thread: {e}; the guest receives nothing"
                ),
            }
        }
    }

    /// Stops the receive thread (the machine is stopping).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let t = self
            .rx_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn receive_loop(&self, tap: &Tap) {
        let mut buf = vec![0u8; MAX_FRAME];
        while !self.stop.load(Ordering::Acquire) {
            if !tap.wait_readable(100) {
                continue;
            }
            loop {
                match tap.read_frame(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.deliver(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(
                            tap = tap.name(),
                            "reading the tap: {e}; the guest receives nothing more"
                        );
                        return;
                    }
                }
            }
        }
    }

    /// Quiesces (true) or resumes (false) the device with the machine. While
    /// quiesced no frame is written into guest memory.
    pub(crate) fn set_paused(&self, paused: bool) {
        let mut i = self.lock();
        i.paused = paused;
        if !paused && !i.pending_rx.is_empty() {
            self.flush_rx(&mut i);
        }
    }

    /// Delivers one frame from the network to the guest (or keeps it while
    /// the device is paused or the guest has no buffer, or drops it).
    pub fn deliver(&self, frame: &[u8]) {
        let mut i = self.lock();
        if i.paused || !i.pending_rx.is_empty() || !self.rx_ready(&i) {
            if i.pending_rx.len() >= MAX_PENDING_RX || (!i.paused && !self.driver_ok(&i)) {
                i.stats.rx_dropped += 1;
                return;
            }
            i.pending_rx.push_back(frame.to_vec());
            if !i.paused {
                self.flush_rx(&mut i);
            }
            return;
        }
        if self.put_rx(&mut i, frame) {
            self.interrupt(&mut i);
        } else {
            i.pending_rx.push_back(frame.to_vec());
        }
    }

    fn driver_ok(&self, i: &Inner) -> bool {
        i.regs.status & S_DRIVER_OK != 0 && i.regs.status & S_NEEDS_RESET == 0
    }

    fn rx_ready(&self, i: &Inner) -> bool {
        self.driver_ok(i) && i.queues[RX].ready() && !i.broken[RX]
    }

    /// Delivers waiting frames while there are buffers.
    fn flush_rx(&self, i: &mut Inner) {
        if i.paused || !self.rx_ready(i) {
            return;
        }
        let mut any = false;
        while let Some(f) = i.pending_rx.pop_front() {
            if !self.put_rx(i, &f) {
                i.pending_rx.push_front(f);
                break;
            }
            any = true;
        }
        if any {
            self.interrupt(i);
        }
    }

    /// Writes `frame` into the next receive buffer. False: no buffer.
    fn put_rx(&self, i: &mut Inner, frame: &[u8]) -> bool {
        let mem = &self.mem;
        let chain = match i.queues[RX].iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                self.break_queue(i, RX, &e.to_string());
                return false;
            }
        };
        let Some(chain) = chain else {
            return false;
        };
        let head = chain.head_index();
        let mut len = 0u32;
        match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + frame.len() => {
                // flags, gso_type, hdr_len, gso_size, csum_start,
                // csum_offset: 0; num_buffers: 1.
                let mut hdr = [0u8; NET_HDR_LEN];
                hdr[10] = 1;
                let ok = std::io::Write::write_all(&mut w, &hdr).is_ok()
                    && std::io::Write::write_all(&mut w, frame).is_ok();
                if ok {
                    len = (NET_HDR_LEN + frame.len()) as u32;
                    i.stats.rx_frames += 1;
                } else {
                    self.bad_chain(i, RX, head, "writing the frame failed");
                }
            }
            Ok(w) => {
                let room = w.available_bytes();
                self.bad_chain(
                    i,
                    RX,
                    head,
                    &format!(
                        "receive buffer of {room} bytes for a frame of {} bytes",
                        frame.len()
                    ),
                );
                i.stats.rx_dropped += 1;
            }
            Err(e) => {
                self.bad_chain(i, RX, head, &e.to_string());
                i.stats.rx_dropped += 1;
            }
        }
        if let Err(e) = i.queues[RX].add_used(mem, head, len) {
            self.break_queue(i, RX, &e.to_string());
        }
        true
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&self, i: &mut Inner) {
        if !self.driver_ok(i) || !i.queues[TX].ready() || i.broken[TX] {
            return;
        }
        let mem = &self.mem;
        let mut any = false;
        loop {
            let chain = match i.queues[TX].iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.break_queue(i, TX, &e.to_string());
                    break;
                }
            };
            let Some(chain) = chain else { break };
            any = true;
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(r) if r.available_bytes() < NET_HDR_LEN + 14 => {
                    let n = r.available_bytes();
                    self.bad_chain(
                        i,
                        TX,
                        head,
                        &format!("a frame of {n} bytes with its header"),
                    );
                }
                Ok(r) if r.available_bytes() > NET_HDR_LEN + MAX_FRAME => {
                    let n = r.available_bytes();
                    self.bad_chain(
                        i,
                        TX,
                        head,
                        &format!("a frame of {n} bytes (at most {MAX_FRAME})"),
                    );
                }
                Ok(mut r) => {
                    let mut buf = vec![0u8; r.available_bytes()];
                    match std::io::Read::read_exact(&mut r, &mut buf) {
                        Ok(()) => self.send(i, &buf[NET_HDR_LEN..]),
                        Err(e) => self.bad_chain(i, TX, head, &e.to_string()),
                    }
                }
                Err(e) => self.bad_chain(i, TX, head, &e.to_string()),
            }
            if let Err(e) = i.queues[TX].add_used(mem, head, 0) {
                self.break_queue(i, TX, &e.to_string());
                break;
            }
        }
        if any {
            self.interrupt(i);
        }
    }

    fn send(&self, i: &mut Inner, frame: &[u8]) {
        i.stats.tx_frames += 1;
        learn_ipv4(&mut i.regs, frame);
        match &i.backend {
            Some(b) => b.transmit(frame),
            None if i.pending_tx.len() < MAX_PENDING_TX => i.pending_tx.push_back(frame.to_vec()),
            None => i.stats.tx_dropped += 1,
        }
    }

    fn bad_chain(&self, i: &mut Inner, q: usize, head: u16, why: &str) {
        i.stats.bad_chains += 1;
        if i.stats.bad_chains <= 10 || i.stats.bad_chains.is_power_of_two() {
            warn!(
                queue = q,
                head,
                total = i.stats.bad_chains,
                "virtio-net: bad request from the guest ({why}); dropped"
            );
        }
    }

    fn break_queue(&self, i: &mut Inner, q: usize, why: &str) {
        if !i.broken[q] {
            warn!(queue = q, "virtio-net: the guest's rings cannot be used ({why}); the queue stops until the driver resets the device");
        }
        i.broken[q] = true;
        i.regs.status |= S_NEEDS_RESET;
        i.regs.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    fn interrupt(&self, i: &mut Inner) {
        i.regs.interrupt_status |= 1;
        let _ = self.irq.write(1);
    }

    fn reset(&self, i: &mut Inner) {
        let mac = i.regs.mac;
        let ip = i.regs.guest_ipv4;
        i.regs = NetState::new(mac);
        i.regs.guest_ipv4 = ip;
        for q in i.queues.iter_mut() {
            q.reset();
        }
        i.broken = [false; 2];
        i.pending_rx.clear();
        debug!("virtio-net: device reset by the driver");
    }

    /// A guest read of the window at `offset`.
    pub(crate) fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let i = self.lock();
        if offset >= 0x100 {
            let mut cfg = [0u8; 8];
            cfg[..6].copy_from_slice(&i.regs.mac);
            cfg[6] = 1; // status: link up
            for (k, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + k).copied().unwrap_or(0);
            }
            return;
        }
        let q = i.queues.get(i.regs.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => DEVICE_NET,
            0x00c => VENDOR,
            0x010 => match i.regs.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |q| q.max_size() as u32),
            0x044 => q.map_or(0, |q| q.ready() as u32),
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
        let mut i = self.lock();
        if offset >= 0x100 {
            return; // the configuration is read-only
        }
        let mut b = [0u8; 4];
        for (k, d) in data.iter().take(4).enumerate() {
            b[k] = *d;
        }
        let v = u32::from_le_bytes(b);
        let i = &mut *i;
        let sel = i.regs.queue_sel as usize;
        // Queue set-up is allowed only before DRIVER_OK (virtio 1.x 4.2.2.2).
        let setup = i.regs.status & S_DRIVER_OK == 0;
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
            0x038 if setup => {
                if let Some(q) = i.queues.get_mut(sel) {
                    q.set_size(v as u16);
                }
            }
            0x044 if setup => {
                if let Some(q) = i.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&self.mem) {
                        warn!(queue = sel, "virtio-net: the driver's queue set-up is invalid (size or rings outside guest memory)");
                        q.set_ready(false);
                    }
                }
            }
            0x050 => match v as usize {
                TX => self.transmit(i),
                RX => self.flush_rx(i),
                _ => {}
            },
            0x064 => i.regs.interrupt_status &= !v,
            0x070 => self.set_status(i, v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup => {
                if let Some(q) = i.queues.get_mut(sel) {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
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
                    "virtio-net: the driver accepted features the device does not offer, or not VERSION_1"
                );
                v &= !S_FEATURES_OK;
            }
        }
        i.regs.status = v | (i.regs.status & S_NEEDS_RESET);
        if i.regs.status & S_DRIVER_OK != 0 {
            self.flush_rx(i);
        }
    }

    /// Frames announcing the guest at this node (after a failover): a
    /// gratuitous ARP for the guest's IPv4 address when it is known, else a
    /// RARP broadcast as QEMU sends, so that switches learn the new port.
    pub fn announcement(&self) -> Vec<u8> {
        let i = self.lock();
        announcement(i.regs.mac, i.regs.guest_ipv4)
    }
}

/// Writes `frame` to `tap` now, 50 ms and 200 ms later.
fn announce(tap: Arc<Tap>, frame: Vec<u8>) {
    tap.write_frame(&frame);
    debug!(tap = tap.name(), "announced the guest on this port");
    let _ = std::thread::Builder::new()
        .name("castor-announce".into())
        .spawn(move || {
            for wait in [50, 150] {
                std::thread::sleep(std::time::Duration::from_millis(wait));
                tap.write_frame(&frame);
            }
        });
}

/// Learns the guest's IPv4 address from a frame it sent from its own MAC.
fn learn_ipv4(regs: &mut NetState, frame: &[u8]) {
    if frame.len() < 34 || frame[6..12] != regs.mac {
        return;
    }
    let ip = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0806 if frame.len() >= 42 => [frame[28], frame[29], frame[30], frame[31]],
        0x0800 => [frame[26], frame[27], frame[28], frame[29]],
        _ => return,
    };
    if ip != [0; 4] {
        regs.guest_ipv4 = Some(ip);
    }
}

/// See [`NetDevice::announcement`].
pub fn announcement(mac: [u8; 6], ip: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    let (ethertype, op, ip) = match ip {
        Some(ip) => (0x0806u16, 1u16, ip), // gratuitous ARP request
        None => (0x8035, 3, [0; 4]),       // RARP request
    };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn device() -> (NetDevice, GuestMem) {
        let mem = crate::memory::create(16 << 20).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = NetDevice::new(&NetState::new([2, 0, 0, 0, 0, 1]), mem.clone(), irq).unwrap();
        (d, mem)
    }

    fn w32(d: &NetDevice, off: u64, v: u32) {
        d.mmio_write(off, &v.to_le_bytes());
    }

    fn r32(d: &NetDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drives the device as a driver would: features, both queues at fixed
    /// addresses, DRIVER_OK.
    fn bring_up(d: &NetDevice) {
        assert_eq!(r32(d, 0), MAGIC);
        assert_eq!(r32(d, 8), DEVICE_NET);
        w32(d, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        w32(d, 0x24, 1);
        w32(d, 0x20, 1); // VERSION_1
        w32(d, 0x24, 0);
        w32(d, 0x20, F_MAC as u32);
        w32(d, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r32(d, 0x70) & S_FEATURES_OK, 0);
        for (q, base) in [(0u32, 0x10000u32), (1, 0x20000)] {
            w32(d, 0x30, q);
            w32(d, 0x38, 16);
            w32(d, 0x80, base);
            w32(d, 0x90, base + 0x1000);
            w32(d, 0xa0, base + 0x2000);
            w32(d, 0x44, 1);
            assert_eq!(r32(d, 0x44), 1);
        }
        w32(
            d,
            0x70,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    /// Posts descriptor `idx` (addr, len, flags) as available entry `slot`.
    fn post(mem: &GuestMem, base: u64, slot: u16, idx: u16, addr: u64, len: u32, flags: u16) {
        let d = base + idx as u64 * 16;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        let avail = base + 0x1000;
        mem.write_obj(idx, GuestAddress(avail + 4 + 2 * (slot as u64 % 16)))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(avail + 2)).unwrap();
    }

    struct Collect(Mutex<Vec<Vec<u8>>>);
    impl NetBackend for Collect {
        fn transmit(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    #[test]
    fn transmits_frames_in_order_and_refuses_bad_chains() {
        let (d, mem) = device();
        let d = Arc::new(d);
        bring_up(&d);
        let out = Arc::new(Collect(Mutex::new(Vec::new())));
        d.attach(out.clone(), None);
        let frame: Vec<u8> = (0..60u8).collect();
        let mut buf = vec![0u8; NET_HDR_LEN];
        buf.extend_from_slice(&frame);
        mem.write_slice(&buf, GuestAddress(0x30000)).unwrap();
        post(&mem, 0x20000, 0, 0, 0x30000, buf.len() as u32, 0);
        // A chain pointing outside guest memory, and a runt.
        post(&mem, 0x20000, 1, 1, 0xFFFF_0000, 100, 0);
        post(&mem, 0x20000, 2, 2, 0x30000, 4, 0);
        w32(&d, 0x50, 1);
        assert_eq!(*out.0.lock().unwrap(), vec![frame]);
        let s = d.stats();
        assert_eq!((s.tx_frames, s.bad_chains), (1, 2));
        // Every chain was returned: used idx 3.
        let used: u16 = mem.read_obj(GuestAddress(0x22002)).unwrap();
        assert_eq!(used, 3);
        assert_eq!(d.state().queues[TX].next_avail, 3);
    }

    #[test]
    fn receives_into_buffers_and_waits_while_paused() {
        let (d, mem) = device();
        let d = Arc::new(d);
        bring_up(&d);
        post(&mem, 0x10000, 0, 0, 0x40000, 2048, 2); // write-only
        d.set_paused(true);
        d.deliver(&[7u8; 100]);
        let used: u16 = mem.read_obj(GuestAddress(0x12002)).unwrap();
        assert_eq!(used, 0, "nothing is written while paused");
        d.set_paused(false);
        let used: u16 = mem.read_obj(GuestAddress(0x12002)).unwrap();
        assert_eq!(used, 1);
        let len: u32 = mem.read_obj(GuestAddress(0x12004 + 4)).unwrap();
        assert_eq!(len as usize, NET_HDR_LEN + 100);
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x40000 + NET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, [7u8; 100]);
        // No buffer left: the next frame waits, and is delivered when the
        // driver posts one and notifies.
        d.deliver(&[8u8; 60]);
        post(&mem, 0x10000, 1, 1, 0x41000, 2048, 2);
        w32(&d, 0x50, 0);
        let used: u16 = mem.read_obj(GuestAddress(0x12002)).unwrap();
        assert_eq!(used, 2);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let (d, mem) = device();
        bring_up(&d);
        let s = d.state();
        assert!(s.queues[RX].ready && s.queues[TX].ready);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d2 = NetDevice::new(&s, mem.clone(), irq).unwrap();
        assert_eq!(d2.state(), s);
        let mut bad = s.clone();
        bad.queues[TX].used = 0xFFFF_F000;
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let e = NetDevice::new(&bad, mem.clone(), irq).unwrap_err();
        assert!(e.contains("not in guest memory"), "{e}");
        let mut bad = s;
        bad.queues[RX].size = 3;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn features_the_device_does_not_offer_are_refused() {
        let (d, _mem) = device();
        w32(&d, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        w32(&d, 0x24, 0);
        w32(&d, 0x20, 1 << 0); // CSUM: not offered
        w32(&d, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(r32(&d, 0x70) & S_FEATURES_OK, 0);
    }

    #[test]
    fn announcements_name_the_guest() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut regs = NetState::new(mac);
        let mut udp = vec![0u8; 42];
        udp[6..12].copy_from_slice(&mac);
        udp[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        udp[26..30].copy_from_slice(&[10, 77, 0, 2]);
        learn_ipv4(&mut regs, &udp);
        assert_eq!(regs.guest_ipv4, Some([10, 77, 0, 2]));
        let garp = announcement(mac, regs.guest_ipv4);
        assert_eq!(&garp[12..14], &[8, 6]);
        assert_eq!(&garp[28..32], &[10, 77, 0, 2]);
        assert_eq!(&garp[38..42], &[10, 77, 0, 2]);
        let rarp = announcement(mac, None);
        assert_eq!(&rarp[12..14], &[0x80, 0x35]);
    }
}
