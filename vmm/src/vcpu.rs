//! vCPUs: set-up, the run loop on its own thread, the pause protocol, and
//! saving/restoring architectural state in the order documented in
//! [`crate::state`].
//!
//! # Pausing
//! The controller sets the shared pause flag and sends each vCPU thread a
//! real-time signal. The signal handler sets `immediate_exit` in the thread's
//! `kvm_run`, so a thread that was about to enter `KVM_RUN` returns at once
//! with `EINTR` instead of running the guest until its next exit. A thread that
//! sees the flag first completes any pending I/O by running once more with
//! `immediate_exit` set (KVM completes the I/O, then returns `EINTR`); only
//! then is its state consistent and may be saved. It reports `Paused` and
//! serves requests (capture, resume, exit) until resumed.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_mp_state, kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use tracing::{debug, warn};

use crate::console::{Console, MMIO_CONSOLE_BASE, MMIO_CONSOLE_LEN};
use crate::serial::SerialDevice;
use crate::state::VcpuState;
use crate::virtio_blk::{BlockDevice, BLK_MMIO_BASE, BLK_MMIO_LEN};
use crate::virtio_net::{NetDevice, NET_MMIO_BASE, NET_MMIO_LEN};

/// Errors of vCPU set-up, save and restore; one variant per failing ioctl.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("creating vCPU {0}: {1}")]
    Create(u32, kvm_ioctls::Error),
    /// A KVM_GET_* ioctl failed.
    #[error("vCPU {index}: reading {what}: {err}")]
    Get {
        /// vCPU index.
        index: u32,
        /// Which state item.
        what: &'static str,
        /// The ioctl's error.
        err: kvm_ioctls::Error,
    },
    /// A KVM_SET_* ioctl failed.
    #[error("vCPU {index}: restoring {what}: {err}")]
    Set {
        /// vCPU index.
        index: u32,
        /// Which state item.
        what: &'static str,
        /// The ioctl's error.
        err: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("vCPU {index}: {what} stopped at MSR {stopped_at:#x} ({done} of {total} done)")]
    MsrsIncomplete {
        /// vCPU index.
        index: u32,
        /// "reading" or "writing".
        what: &'static str,
        /// The MSR KVM refused.
        stopped_at: u32,
        /// How many were done.
        done: usize,
        /// How many were asked.
        total: usize,
    },
    /// The FAM wrapper could not be built.
    #[error("vCPU {0}: too many MSRs or CPUID entries for KVM")]
    Fam(u32),
}

/// How a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Stopped by castor.
    Stopped,
    /// The guest shut down (triple fault or reset).
    Shutdown,
    /// KVM or castor failed; the message says how.
    Error(String),
}

/// Messages from vCPU threads to the machine.
#[derive(Debug)]
pub(crate) enum Event {
    Paused(u32),
    Exited(u32, ExitReason),
}

/// Requests to a paused vCPU thread.
pub(crate) enum Request {
    Capture(Sender<Result<VcpuState, VcpuError>>),
    Resume,
    Exit,
}

/// Flags every vCPU thread reads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub pause: AtomicBool,
    pub exit: AtomicBool,
}

/// Nice value of vCPU threads started from now on (0: inherit).
pub(crate) static VCPU_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Sets the scheduling nice value of vCPU threads started from now on. An HA
/// daemon on a small host runs its guest's vCPUs below its own replication
/// threads, so heartbeats and checkpoints are not delayed by a spinning guest.
pub fn set_vcpu_nice(nice: i32) {
    VCPU_NICE.store(nice.clamp(-20, 19), Ordering::Relaxed);
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal castor uses to kick vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // KVM reads `immediate_exit` on the next KVM_RUN of this thread.
            // SAFETY: `run` is this thread's live kvm_run mapping (cleared before
            // the VcpuFd drops); a volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (idempotent).
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    match ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| e.errno())
    }) {
        Ok(()) => Ok(()),
        Err(e) => Err(std::io::Error::from_raw_os_error(*e)),
    }
}

/// The CPUID table for vCPU `index` of `count`.
pub(crate) fn cpuid_for(kvm: &Kvm, index: u32, count: u32) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_FFFF) | (index << 24) | (count.min(255) << 16);
                e.ecx |= 1 << 24; // TSC-deadline timer (KVM emulates it with the in-kernel LAPIC)
                e.ecx |= 1 << 31; // running on a hypervisor
                e.ecx &= !(1 << 13); // CMPXCHG16B: kvm_pvm's emulator cannot run it
                e.edx |= 1 << 28; // HTT: the logical count above is valid
            }
            0xB | 0x1F => e.edx = index,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// LAPIC LINT0 as ExtINT and LINT1 as NMI (virtual-wire mode), as a BIOS would.
pub(crate) fn set_lint(fd: &VcpuFd, index: u32) -> Result<(), VcpuError> {
    let mut lapic = fd.get_lapic().map_err(|err| VcpuError::Get {
        index,
        what: "LAPIC",
        err,
    })?;
    let reg = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, f: &dyn Fn(u32) -> u32| {
        let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
        let v = f(u32::from_le_bytes(b)).to_le_bytes();
        for (i, b) in v.into_iter().enumerate() {
            l.regs[off + i] = b as _;
        }
    };
    reg(&mut lapic, 0x350, &|v| (v & !0x700) | 0x700); // LINT0: ExtINT
    reg(&mut lapic, 0x360, &|v| (v & !0x700) | 0x400); // LINT1: NMI
    fd.set_lapic(&lapic).map_err(|err| VcpuError::Set {
        index,
        what: "LAPIC",
        err,
    })
}

/// Saves a vCPU's state, in the documented order.
pub(crate) fn capture(fd: &VcpuFd, index: u32, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    let get = |what| move |err| VcpuError::Get { index, what, err };
    let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
    let regs = fd.get_regs().map_err(get("regs"))?;
    let sregs = fd.get_sregs().map_err(get("sregs"))?;
    let xsave = fd.get_xsave().map_err(get("xsave"))?;
    let xcrs = fd.get_xcrs().map_err(get("xcrs"))?;
    let debugregs = fd.get_debug_regs().map_err(get("debug registers"))?;
    let lapic = fd.get_lapic().map_err(get("LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Fam(index))?;
    let n = fd.get_msrs(&mut msrs).map_err(get("MSRs"))?;
    if n != entries.len() {
        return Err(VcpuError::MsrsIncomplete {
            index,
            what: "reading",
            stopped_at: entries[n].index,
            done: n,
            total: entries.len(),
        });
    }
    let tsc_khz = fd.get_tsc_khz().map_err(get("TSC frequency"))?;
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(get("CPUID"))?;
    let events = fd.get_vcpu_events().map_err(get("vCPU events"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
        tsc_khz,
    })
}

/// Restores a vCPU's state into a fresh vCPU, in the documented order.
pub(crate) fn restore(fd: &VcpuFd, index: u32, s: &VcpuState) -> Result<(), VcpuError> {
    let set = |what| move |err| VcpuError::Set { index, what, err };
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::Fam(index))?;
    fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
    // Only the host's TSC frequency is accepted here (no TSC scaling).
    if fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
        fd.set_tsc_khz(s.tsc_khz).map_err(set("TSC frequency"))?;
    }
    fd.set_mp_state(s.mp_state).map_err(set("MP state"))?;
    fd.set_regs(&s.regs).map_err(set("regs"))?;
    fd.set_sregs(&s.sregs).map_err(set("sregs"))?;
    // KVM_SET_XSAVE copies the vCPU's uabi XSAVE size, which exceeds 4 KiB
    // only for dynamically enabled XSTATE features (e.g. AMX), and those need
    // the process to ask for them with arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM),
    // which castor never does. (KVM_CAP_XSAVE2 is only queried for that
    // size; castor does not query it.)
    // SAFETY: `s.xsave` is a whole 4 KiB `kvm_xsave` (read with KVM_GET_XSAVE,
    // or decoded from exactly that many bytes), no less than KVM reads (above).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(set("xsave"))?;
    fd.set_xcrs(&s.xcrs).map_err(set("xcrs"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(set("debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(set("LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::Fam(index))?;
    let n = fd.set_msrs(&msrs).map_err(set("MSRs"))?;
    if n != s.msrs.len() {
        return Err(VcpuError::MsrsIncomplete {
            index,
            what: "writing",
            stopped_at: s.msrs[n].index,
            done: n,
            total: s.msrs.len(),
        });
    }
    fd.set_vcpu_events(&s.events).map_err(set("vCPU events"))?;
    // Tells the guest's kvmclock that the vCPU was paused; guests without
    // kvmclock make it fail with EINVAL, which is expected.
    if let Err(e) = fd.kvmclock_ctrl() {
        debug!(index, "KVMCLOCK_CTRL: {e} (ignored)");
    }
    Ok(())
}

/// Marks vCPU `index` runnable (KVM leaves APs waiting for a SIPI).
pub(crate) fn make_runnable(fd: &VcpuFd, index: u32) -> Result<(), VcpuError> {
    fd.set_mp_state(kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|err| VcpuError::Set {
        index,
        what: "MP state",
        err,
    })
}

pub(crate) struct VcpuThread {
    pub fd: VcpuFd,
    pub index: u32,
    pub shared: Arc<Shared>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub console: Console,
    pub net: Option<Arc<NetDevice>>,
    pub blk: Option<Arc<BlockDevice>>,
    pub events: Sender<Event>,
    pub requests: Receiver<Request>,
    pub msr_list: Arc<Vec<u32>>,
}

enum Flow {
    Continue,
    Exit(ExitReason),
}

impl VcpuThread {
    pub fn run(mut self) {
        let nice = VCPU_NICE.load(Ordering::Relaxed);
        if nice != 0 {
            // SAFETY: setpriority and gettid take plain integers and touch no
            // memory of ours; on Linux PRIO_PROCESS with a thread id sets that
            // thread's nice value only.
            let r = unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice)
            };
            if r != 0 {
                debug!(
                    index = self.index,
                    "could not set the vCPU thread's nice value to {nice}"
                );
            }
        }
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let reason = self.run_loop();
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        debug!(index = self.index, ?reason, "vCPU thread exits");
        let _ = self.events.send(Event::Exited(self.index, reason));
    }

    fn run_loop(&mut self) -> ExitReason {
        loop {
            if self.shared.pause.load(Ordering::Acquire) || self.shared.exit.load(Ordering::Acquire)
            {
                if let Some(r) = self.park() {
                    return r;
                }
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Flow::Exit(r) = handle_exit(
                        exit,
                        self.index,
                        &self.serial,
                        &self.console,
                        self.net.as_deref(),
                        self.blk.as_deref(),
                    ) {
                        return r;
                    }
                }
                Err(e) if e.errno() == libc::EINTR => self.fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return ExitReason::Error(format!("vCPU {}: KVM_RUN: {e}", self.index)),
            }
        }
    }

    /// Reaches a clean point (a KVM_RUN that returned EINTR), reports Paused
    /// and serves requests until resumed. Returns Some on exit.
    fn park(&mut self) -> Option<ExitReason> {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Ok(exit) => {
                    if let Flow::Exit(r) = handle_exit(
                        exit,
                        self.index,
                        &self.serial,
                        &self.console,
                        self.net.as_deref(),
                        self.blk.as_deref(),
                    ) {
                        self.fd.set_kvm_immediate_exit(0);
                        return Some(r);
                    }
                }
                Err(e) => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Some(ExitReason::Error(format!(
                        "vCPU {}: KVM_RUN: {e}",
                        self.index
                    )));
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        if self.shared.exit.load(Ordering::Acquire) {
            return Some(ExitReason::Stopped);
        }
        if self.events.send(Event::Paused(self.index)).is_err() {
            return Some(ExitReason::Stopped);
        }
        loop {
            match self.requests.recv() {
                Ok(Request::Capture(reply)) => {
                    let _ = reply.send(capture(&self.fd, self.index, &self.msr_list));
                }
                Ok(Request::Resume) => return None,
                Ok(Request::Exit) | Err(_) => return Some(ExitReason::Stopped),
            }
        }
    }
}

fn handle_exit(
    exit: VcpuExit<'_>,
    index: u32,
    serial: &Mutex<SerialDevice>,
    console: &Console,
    net: Option<&NetDevice>,
    blk: Option<&BlockDevice>,
) -> Flow {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if let Some(off) = crate::serial::port_offset(port) {
                if let Some(&b) = data.first() {
                    serial.lock().expect("serial lock").write(off, b);
                }
            }
            Flow::Continue
        }
        VcpuExit::IoIn(port, data) => {
            let v = match crate::serial::port_offset(port) {
                Some(off) => serial.lock().expect("serial lock").read(off),
                None => 0xFF,
            };
            data.fill(v);
            Flow::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            match net {
                Some(n) if (NET_MMIO_BASE..NET_MMIO_BASE + NET_MMIO_LEN).contains(&addr) => {
                    n.mmio_read(addr - NET_MMIO_BASE, data)
                }
                _ => match blk {
                    Some(b) if (BLK_MMIO_BASE..BLK_MMIO_BASE + BLK_MMIO_LEN).contains(&addr) => {
                        b.mmio_read(addr - BLK_MMIO_BASE, data)
                    }
                    _ => data.fill(0xFF),
                },
            }
            Flow::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if (MMIO_CONSOLE_BASE..MMIO_CONSOLE_BASE + MMIO_CONSOLE_LEN).contains(&addr) {
                let n = ((addr - MMIO_CONSOLE_BASE) / 8 + 1) as usize;
                console.write(&data[..n.min(data.len())]);
            } else if (NET_MMIO_BASE..NET_MMIO_BASE + NET_MMIO_LEN).contains(&addr) {
                if let Some(n) = net {
                    n.mmio_write(addr - NET_MMIO_BASE, data);
                }
            } else if (BLK_MMIO_BASE..BLK_MMIO_BASE + BLK_MMIO_LEN).contains(&addr) {
                if let Some(b) = blk {
                    b.mmio_write(addr - BLK_MMIO_BASE, data);
                }
            }
            Flow::Continue
        }
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Flow::Continue,
        VcpuExit::Hlt => Flow::Continue,
        VcpuExit::Shutdown => Flow::Exit(ExitReason::Shutdown),
        VcpuExit::SystemEvent(..) => Flow::Exit(ExitReason::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Flow::Exit(ExitReason::Error(format!(
            "vCPU {index}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => Flow::Exit(ExitReason::Error(format!(
            "vCPU {index}: KVM internal error (an instruction kvm_pvm cannot emulate?)"
        ))),
        other => {
            warn!(index, "unexpected vCPU exit: {other:?}");
            Flow::Exit(ExitReason::Error(format!(
                "vCPU {index}: unexpected exit {other:?}"
            )))
        }
    }
}
