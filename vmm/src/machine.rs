//! The machine: a KVM VM with guest RAM, an in-kernel irqchip and PIT, a
//! serial console and vCPU threads; paused, captured, dirty-tracked and
//! restored as a whole.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use tracing::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::console::Console;
use crate::disk::Disk;
use crate::memory::{self, GuestMem, MemoryError, VcpuLease, PAGE_SIZE};
use crate::serial::{IrqTrigger, SerialDevice, COM1_GSI};
use crate::state::{MachineState, VcpuState, VmState};
use crate::vcpu::{self, Event, ExitReason, Request, Shared, VcpuError, VcpuThread};
use crate::virtio_blk::{BlkState, BlockDevice, BLK_GSI};
use crate::virtio_net::{NetDevice, NetState, NET_GSI};

/// How long a vCPU may take to leave KVM_RUN before pausing is declared failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const TSS_ADDRESS: usize = 0xFFFB_D000;

/// Errors of the machine, matchable by callers.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The KVM device cannot be opened.
    #[error("cannot open {}: {err}. castor needs KVM: load the kvm module (kvm_intel, kvm_amd or kvm_pvm) and run as a user who may open /dev/kvm", path.display())]
    NoKvm {
        /// The device path.
        path: PathBuf,
        /// The open error.
        err: kvm_ioctls::Error,
    },
    /// A capability castor needs is missing.
    #[error("KVM lacks {0}, which castor needs")]
    MissingCap(&'static str),
    /// A VM-level ioctl failed.
    #[error("{what}: {err}")]
    Kvm {
        /// What castor was doing.
        what: &'static str,
        /// The ioctl's error.
        err: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU operation.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Bad configuration.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// A vCPU did not pause in time.
    #[error("vCPU did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The operation needs a paused machine.
    #[error("the machine must be paused for this")]
    NotPaused,
    /// The guest or a vCPU thread stopped.
    #[error("the machine has stopped: {0:?}")]
    Exited(ExitReason),
    /// Creating a thread or eventfd failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MachineError {
    move |err| MachineError::Kvm { what, err }
}

/// What kind of KVM this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// VMX or SVM.
    HardwareAssisted,
    /// kvm_pvm: no hardware virtualization; guest ring 0 is emulated.
    Pvm,
    /// /dev/kvm missing.
    Absent,
}

impl KvmKind {
    /// Probes /dev/kvm and the loaded modules.
    pub fn detect() -> Self {
        if !std::path::Path::new("/dev/kvm").exists() {
            return KvmKind::Absent;
        }
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            KvmKind::Pvm
        } else {
            KvmKind::HardwareAssisted
        }
    }

    /// A sentence for the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            KvmKind::HardwareAssisted => "/dev/kvm is hardware-assisted (VMX/SVM)",
            KvmKind::Pvm => "/dev/kvm is kvm_pvm (no hardware virtualization: guest ring 0 is emulated, ring 3 runs natively)",
            KvmKind::Absent => "/dev/kvm is absent",
        }
    }
}

/// Shape of a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Start with KVM's dirty log on.
    pub dirty_tracking: bool,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// A virtio-net card with this MAC address ([`crate::virtio_net`]).
    pub net: Option<[u8; 6]>,
    /// Guest RAM in this file (created, or emptied, for the boot), which
    /// outlives the process ([`crate::image`]); `None`: anonymous memory.
    pub ram_file: Option<PathBuf>,
    /// A virtio-blk disk over this image ([`crate::virtio_blk`]).
    pub disk: Option<Arc<Disk>>,
}

impl MachineConfig {
    /// `vcpus` vCPUs, `mem_bytes` of RAM, dirty log off, `/dev/kvm`.
    pub fn new(mem_bytes: u64, vcpus: u32) -> Self {
        MachineConfig {
            mem_bytes,
            vcpus,
            dirty_tracking: false,
            kvm_device: PathBuf::from("/dev/kvm"),
            net: None,
            ram_file: None,
            disk: None,
        }
    }
}

/// Pages dirtied since the previous harvest: a bitmap over guest frame numbers.
#[derive(Debug, Clone, Default)]
pub struct DirtyPages {
    /// Bit `f` set: guest frame `f` (address `f * 4096`) was written.
    pub bitmap: Vec<u64>,
}

impl DirtyPages {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// Dirty frame numbers, ascending.
    pub fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        memory::frames_of(&self.bitmap)
    }
    /// Whether frame `f` is dirty.
    pub fn contains(&self, f: u64) -> bool {
        self.bitmap
            .get((f / 64) as usize)
            .is_some_and(|w| w & (1 << (f % 64)) != 0)
    }
}

struct Slot {
    index: u32,
    gpa: u64,
    size: u64,
    host: u64,
}

struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    requests: Sender<Request>,
}

/// A running (or paused) KVM guest.
pub struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    slots: Vec<Slot>,
    serial: Arc<Mutex<SerialDevice>>,
    console: Console,
    shared: Arc<Shared>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<Event>,
    pending_dirty: Vec<u64>,
    tracking: bool,
    paused: bool,
    exited: Option<ExitReason>,
    _serial_evt: EventFd,
    net: Option<Arc<NetDevice>>,
    blk: Option<Arc<BlockDevice>>,
    /// Held until the vCPU threads are joined (in `Drop`, before the fields
    /// drop): see [`memory::with_ram_mut`].
    _vcpu_lease: VcpuLease,
}

struct Parts {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    msr_list: Arc<Vec<u32>>,
}

/// A VM prepared over guest RAM before it is needed (a backup's standby):
/// see [`Machine::prepare_standby`].
pub struct Standby {
    // Field order: the VM (inside `parts`) is dropped before its memory.
    parts: Parts,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("slots", &self.slots.len())
            .finish()
    }
}

fn open_kvm(device: &Path) -> Result<Kvm, MachineError> {
    let c = std::ffi::CString::new(device.as_os_str().as_encoded_bytes())
        .map_err(|_| MachineError::Config(format!("bad KVM device path {}", device.display())))?;
    Kvm::new_with_path(&c).map_err(|err| MachineError::NoKvm {
        path: device.to_path_buf(),
        err,
    })
}

/// The host TSC frequency in kHz, as KVM gives it to a new vCPU.
pub fn host_tsc_khz(device: &Path) -> Result<u32, MachineError> {
    let kvm = open_kvm(device)?;
    let vm = kvm.create_vm().map_err(kvm_err("creating a probe VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| VcpuError::Create(0, e))?;
    vcpu.get_tsc_khz().map_err(|err| {
        VcpuError::Get {
            index: 0,
            what: "TSC frequency",
            err,
        }
        .into()
    })
}

fn open_vm(device: &Path, mem_bytes: u64) -> Result<Parts, MachineError> {
    let mem = memory::create(mem_bytes)?;
    open_vm_with(device, mem)
}

fn open_vm_with(device: &Path, mem: GuestMem) -> Result<Parts, MachineError> {
    let kvm = open_kvm(device)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::ImmediateExit, "immediate exit"),
        (Cap::UserMemory, "user memory"),
        (Cap::Xsave, "XSAVE state"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(MachineError::MissingCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("setting the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("creating the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("creating the PIT"))?;
    let list = kvm.get_msr_index_list().map_err(kvm_err("listing MSRs"))?;
    let msr_list = Arc::new(crate::msr::to_save(list.as_slice()));
    Ok(Parts {
        kvm,
        vm,
        mem,
        msr_list,
    })
}

fn slots_of(mem: &GuestMem) -> Vec<Slot> {
    mem.iter()
        .enumerate()
        .map(|(i, r)| Slot {
            index: i as u32,
            gpa: r.start_addr().0,
            size: r.len(),
            host: r.as_ptr() as u64,
        })
        .collect()
}

fn register_slots(vm: &VmFd, slots: &[Slot], tracking: bool) -> Result<(), MachineError> {
    for s in slots {
        let region = kvm_userspace_memory_region {
            slot: s.index,
            flags: if tracking { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host,
        };
        // The mapping must stay mapped while KVM may access it through this
        // slot, i.e. while the VM lives. The VM lives while its fd or any of
        // its vCPU fds is open. Machine joins its vCPU threads (which own the
        // vCPU fds) in `Drop` (and when starting fails) before its fields
        // drop, and declares its VM fd before its GuestMem; a Standby has no
        // vCPUs and declares its VM fd before its GuestMem too (see `Parts`).
        // The mapping itself is unmapped only when the last clone of the
        // GuestMem drops, so it outlives that VM fd.
        // SAFETY: `host..host + size` is a live read-write mapping of guest
        // RAM that outlives the VM (above); the slots don't overlap (the
        // layout's regions are disjoint).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("registering guest memory"))?;
    }
    Ok(())
}

impl Machine {
    /// Boots `kernel` (multiboot v1) with `cmdline` on a fresh VM.
    pub fn boot(
        config: &MachineConfig,
        kernel: &[u8],
        cmdline: &str,
        console: Console,
    ) -> Result<Machine, MachineError> {
        Machine::boot_image(config, kernel, None, cmdline, console)
    }

    /// Boots `kernel` with `cmdline` on a fresh VM; the format is recognised
    /// by content ([`boot::load_kernel`]): multiboot v1, or a Linux bzImage or
    /// vmlinux with the initramfs `initrd`.
    pub fn boot_image(
        config: &MachineConfig,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
        console: Console,
    ) -> Result<Machine, MachineError> {
        if config.vcpus == 0 || config.vcpus as usize > crate::state::MAX_VCPUS {
            return Err(MachineError::Config(format!(
                "{} vCPUs (1..={} supported)",
                config.vcpus,
                crate::state::MAX_VCPUS
            )));
        }
        let t0 = Instant::now();
        let p = match &config.ram_file {
            Some(path) => {
                let (mem, _) = crate::image::ram_in_file(path, config.mem_bytes, false)
                    .map_err(|e| MachineError::Config(e.to_string()))?;
                open_vm_with(&config.kvm_device, mem)?
            }
            None => open_vm(&config.kvm_device, config.mem_bytes)?,
        };
        let (format, entry) = boot::load_kernel(&p.mem, kernel, initrd, cmdline, config.vcpus)?;
        info!(%format, "kernel loaded");
        let lease = VcpuLease::acquire(&p.mem)?;
        let mut fds = Vec::new();
        for i in 0..config.vcpus {
            let fd =
                p.vm.create_vcpu(i as u64)
                    .map_err(|e| VcpuError::Create(i, e))?;
            let cpuid = vcpu::cpuid_for(&p.kvm, i, config.vcpus)
                .map_err(kvm_err("reading supported CPUID"))?;
            fd.set_cpuid2(&cpuid).map_err(|err| VcpuError::Set {
                index: i,
                what: "CPUID",
                err,
            })?;
            vcpu::set_lint(&fd, i)?;
            let sregs = fd.get_sregs().map_err(|err| VcpuError::Get {
                index: i,
                what: "sregs",
                err,
            })?;
            // A Linux AP stays as KVM created it, waiting for INIT/SIPI.
            if let Some((regs, sregs)) = boot::vcpu_start(&entry, i, sregs) {
                fd.set_sregs(&sregs).map_err(|err| VcpuError::Set {
                    index: i,
                    what: "sregs",
                    err,
                })?;
                fd.set_regs(&regs).map_err(|err| VcpuError::Set {
                    index: i,
                    what: "regs",
                    err,
                })?;
                vcpu::make_runnable(&fd, i)?;
            }
            fds.push(fd);
        }
        let net = config.net.map(NetState::new);
        let blk = config
            .disk
            .as_ref()
            .map(|d| (BlkState::new(d.bytes()), d.clone()));
        let m = Machine::start_on(
            p,
            lease,
            None,
            fds,
            config.dirty_tracking,
            console,
            None,
            net,
            blk,
        )?;
        debug!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            "machine booted"
        );
        Ok(m)
    }

    /// Restores `state` into a fresh VM. `fill` writes the guest RAM contents
    /// (for instance from a snapshot file) before any vCPU runs. `disk`: the
    /// image for the state's disk, if it has one (of the same size).
    pub fn restore(
        state: &MachineState,
        fill: impl FnOnce(&GuestMem) -> std::io::Result<()>,
        console_sink: Box<dyn crate::console::ConsoleSink>,
        dirty_tracking: bool,
        kvm_device: &Path,
        disk: Option<Arc<Disk>>,
    ) -> Result<Machine, MachineError> {
        state
            .validate()
            .map_err(|e| MachineError::Config(e.to_string()))?;
        disk_matches(state, disk.as_deref())?;
        let mem = memory::create(state.memory_size())?;
        fill(&mem).map_err(|e| MachineError::Os("filling guest memory", e))?;
        Machine::restore_on(state, mem, console_sink, dirty_tracking, kvm_device, disk)
    }

    /// Restores `state` into a fresh VM whose RAM is `mem`, used as it is —
    /// the backup's warm replica: no copy, no first touch.
    pub fn restore_on(
        state: &MachineState,
        mem: GuestMem,
        console_sink: Box<dyn crate::console::ConsoleSink>,
        dirty_tracking: bool,
        kvm_device: &Path,
        disk: Option<Arc<Disk>>,
    ) -> Result<Machine, MachineError> {
        disk_matches(state, disk.as_deref())?;
        let standby = Machine::prepare_standby(mem, kvm_device)?;
        Machine::restore_standby(standby, state, console_sink, dirty_tracking, disk)
    }

    /// Creates a VM over `mem` ahead of a failover: the VM, its irqchip and
    /// PIT, and its memory slots (registering a slot is most of a restore's
    /// cost here: 3.5-7.5 ms for 256 MiB on kvm_pvm). No vCPU exists until
    /// [`Machine::restore_standby`], so `mem` may change meanwhile, also
    /// through [`memory::with_ram_mut`].
    pub fn prepare_standby(mem: GuestMem, kvm_device: &Path) -> Result<Standby, MachineError> {
        let parts = open_vm_with(kvm_device, mem)?;
        let slots = slots_of(&parts.mem);
        register_slots(&parts.vm, &slots, false)?;
        Ok(Standby { parts, slots })
    }

    /// Restores `state` onto a standby VM and runs it: only the machine
    /// state is set here.
    pub fn restore_standby(
        standby: Standby,
        state: &MachineState,
        console_sink: Box<dyn crate::console::ConsoleSink>,
        dirty_tracking: bool,
        disk: Option<Arc<Disk>>,
    ) -> Result<Machine, MachineError> {
        let t0 = std::time::Instant::now();
        state
            .validate()
            .map_err(|e| MachineError::Config(e.to_string()))?;
        disk_matches(state, disk.as_deref())?;
        let Standby { parts: p, slots } = standby;
        if memory::ram_size(&p.mem) != state.memory_size() {
            return Err(MachineError::Config(format!(
                "replica has {} bytes of RAM, the machine state {}",
                memory::ram_size(&p.mem),
                state.memory_size()
            )));
        }
        // Writes done before the guest runs are not guest changes.
        let mut scratch = vec![0u64; memory::frame_limit(&p.mem).div_ceil(64) as usize];
        memory::drain_vmm_writes(&p.mem, &mut scratch);
        // VM-wide state first: irqchip, PIT, clock.
        for chip in [&state.vm.pic_master, &state.vm.pic_slave, &state.vm.ioapic] {
            p.vm.set_irqchip(chip)
                .map_err(kvm_err("restoring the irqchip"))?;
        }
        p.vm.set_pit2(&state.vm.pit)
            .map_err(kvm_err("restoring the PIT"))?;
        let clock = kvm_clock_data {
            clock: state.vm.clock.clock,
            flags: 0,
            ..Default::default()
        };
        p.vm.set_clock(&clock)
            .map_err(kvm_err("restoring kvmclock"))?;
        let lease = VcpuLease::acquire(&p.mem)?;
        let mut fds = Vec::new();
        for (i, s) in state.vcpus.iter().enumerate() {
            let i = i as u32;
            let fd =
                p.vm.create_vcpu(i as u64)
                    .map_err(|e| VcpuError::Create(i, e))?;
            vcpu::restore(&fd, i, s)?;
            fds.push(fd);
        }
        let console = Console::new(console_sink, state.console_offset);
        let m = Machine::start_on(
            p,
            lease,
            Some(slots),
            fds,
            dirty_tracking,
            console,
            Some(state),
            state.net.clone(),
            state.disk.clone().zip(disk),
        );
        debug!(
            us = t0.elapsed().as_micros() as u64,
            "machine state restored onto a standby VM"
        );
        m
    }

    /// Starts the vCPU threads; `registered`: the memory slots, if they are
    /// registered already (without dirty logging); `net`: the network card's
    /// state, if the machine has one; `blk`: the disk's state and image.
    #[allow(clippy::too_many_arguments)]
    fn start_on(
        p: Parts,
        lease: VcpuLease,
        registered: Option<Vec<Slot>>,
        fds: Vec<VcpuFd>,
        tracking: bool,
        console: Console,
        state: Option<&MachineState>,
        net: Option<NetState>,
        blk: Option<(BlkState, Arc<Disk>)>,
    ) -> Result<Machine, MachineError> {
        vcpu::install_kick_handler()
            .map_err(|e| MachineError::Os("installing the vCPU kick signal handler", e))?;
        let slots = match registered {
            Some(slots) => {
                if tracking {
                    register_slots(&p.vm, &slots, true)?;
                }
                slots
            }
            None => {
                let slots = slots_of(&p.mem);
                register_slots(&p.vm, &slots, tracking)?;
                slots
            }
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| MachineError::Os("creating an eventfd", e))?;
        p.vm.register_irqfd(&evt, COM1_GSI)
            .map_err(kvm_err("registering the serial irqfd"))?;
        let trigger = IrqTrigger(
            evt.try_clone()
                .map_err(|e| MachineError::Os("cloning an eventfd", e))?,
        );
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            trigger,
            console.writer(),
            state.map(|s| &s.serial),
        )));
        let net = match net {
            Some(n) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| MachineError::Os("creating an eventfd", e))?;
                p.vm.register_irqfd(&evt, NET_GSI)
                    .map_err(kvm_err("registering the network card's irqfd"))?;
                let dev = NetDevice::new(&n, p.mem.clone(), evt).map_err(MachineError::Config)?;
                Some(Arc::new(dev))
            }
            None => None,
        };
        let blk = match blk {
            Some((s, disk)) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| MachineError::Os("creating an eventfd", e))?;
                p.vm.register_irqfd(&evt, BLK_GSI)
                    .map_err(kvm_err("registering the disk's irqfd"))?;
                let dev = Arc::new(
                    BlockDevice::new(&s, p.mem.clone(), evt, disk).map_err(MachineError::Config)?,
                );
                dev.start()
                    .map_err(|e| MachineError::Os("spawning the disk's worker thread", e))?;
                Some(dev)
            }
            None => None,
        };
        let shared = Arc::new(Shared::default());
        let (ev_tx, ev_rx) = mpsc::channel();
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let (req_tx, req_rx) = mpsc::channel();
            let t = VcpuThread {
                fd,
                index: i as u32,
                shared: shared.clone(),
                serial: serial.clone(),
                console: console.clone(),
                net: net.clone(),
                blk: blk.clone(),
                events: ev_tx.clone(),
                requests: req_rx,
                msr_list: p.msr_list.clone(),
            };
            let thread = match std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || t.run())
            {
                Ok(t) => t,
                Err(e) => {
                    // The threads started so far run the guest: stop them
                    // before the VM, its memory and the vCPU lease go.
                    stop_vcpus(&shared, &mut vcpus);
                    if let Some(b) = &blk {
                        b.stop();
                    }
                    return Err(MachineError::Os("spawning a vCPU thread", e));
                }
            };
            vcpus.push(VcpuHandle {
                thread: Some(thread),
                requests: req_tx,
            });
        }
        let frames = memory::frame_limit(&p.mem);
        Ok(Machine {
            _kvm: p.kvm,
            vm: p.vm,
            mem: p.mem,
            slots,
            serial,
            console,
            shared,
            vcpus,
            events: ev_rx,
            pending_dirty: vec![0; frames.div_ceil(64) as usize],
            tracking,
            paused: false,
            exited: None,
            _serial_evt: evt,
            net,
            blk,
            _vcpu_lease: lease,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The console stream.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The network card, if the machine has one.
    pub fn net(&self) -> Option<&Arc<NetDevice>> {
        self.net.as_ref()
    }

    /// The disk, if the machine has one.
    pub fn disk(&self) -> Option<&Arc<BlockDevice>> {
        self.blk.as_ref()
    }

    /// Reads guest RAM as one slice while the machine is paused (a guest of
    /// at most 3 GiB: one region). For work over all of RAM in a pause,
    /// such as digesting every page, without a copy.
    pub fn with_ram_paused<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused);
        }
        if self.mem.num_regions() != 1 {
            return Err(MemoryError::NotOneRegion(memory::ram_size(&self.mem)).into());
        }
        let r = self.mem.iter().next().expect("one region");
        // `ptr..ptr + len` is the live mapping of the only region, kept
        // mapped by the borrow of `self` (which owns a clone of the memory)
        // for as long as the slice lives (it cannot escape `f`). Nothing
        // writes it meanwhile: the vCPUs are parked outside KVM_RUN (paused,
        // and `&self` keeps `resume` from being called), the network card is
        // quiesced (no receive in progress, none until the resume), and the
        // rest of castor writes guest RAM only through this machine while
        // paused (`&self` excludes that) or through `with_ram_mut`, which
        // refuses RAM a machine holds a vCPU lease on.
        // SAFETY: a live mapping of `len` bytes with no writer while `f` runs.
        let ram = unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, r.len() as usize) };
        Ok(f(ram))
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU at a consistent point (out of KVM_RUN, pending I/O
    /// completed). Returns how long that took.
    pub fn pause(&mut self) -> Result<Duration, MachineError> {
        if let Some(r) = &self.exited {
            return Err(MachineError::Exited(r.clone()));
        }
        if self.paused {
            return Ok(Duration::ZERO);
        }
        let t0 = Instant::now();
        self.shared
            .pause
            .store(true, std::sync::atomic::Ordering::Release);
        for v in &self.vcpus {
            if let Some(t) = &v.thread {
                // A failed kill means the thread has already exited; that is
                // reported through its Exited event below.
                let _ = t.kill(vcpu::kick_signal());
            }
        }
        let mut paused = 0;
        while paused < self.vcpus.len() {
            let left = PAUSE_TIMEOUT.saturating_sub(t0.elapsed());
            match self.events.recv_timeout(left) {
                Ok(Event::Paused(i)) => {
                    paused += 1;
                    tracing::trace!(vcpu = i, "paused");
                }
                Ok(Event::Exited(i, r)) => {
                    warn!(vcpu = i, ?r, "vCPU exited while pausing");
                    self.exited = Some(r.clone());
                    return Err(MachineError::Exited(r));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MachineError::PauseTimeout(PAUSE_TIMEOUT))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MachineError::Exited(ExitReason::Error(
                        "vCPU threads vanished".into(),
                    )))
                }
            }
        }
        // After the vCPUs: no frame is written into guest memory until the
        // resume, so the queue positions captured match the rings.
        if let Some(n) = &self.net {
            n.set_paused(true);
        }
        // The disk finishes the request it is serving (data, status, used
        // ring) and pops no other: none is half done in the checkpoint.
        if let Some(b) = &self.blk {
            b.set_paused(true);
        }
        self.paused = true;
        self.console.flush();
        Ok(t0.elapsed())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        if !self.paused {
            return Ok(());
        }
        // Clear the flag before waking the threads, or they would pause again.
        self.shared
            .pause
            .store(false, std::sync::atomic::Ordering::Release);
        if let Some(n) = &self.net {
            n.set_paused(false);
        }
        if let Some(b) = &self.blk {
            b.set_paused(false);
        }
        for v in &self.vcpus {
            let _ = v.requests.send(Request::Resume);
        }
        self.paused = false;
        Ok(())
    }

    /// Captures the whole machine state; the machine must be paused. vCPUs
    /// save their own state on their threads, in parallel.
    pub fn capture(&mut self) -> Result<MachineState, MachineError> {
        if !self.paused {
            return Err(MachineError::NotPaused);
        }
        let mut replies = Vec::new();
        for v in &self.vcpus {
            let (tx, rx) = mpsc::channel();
            let _ = v.requests.send(Request::Capture(tx));
            replies.push(rx);
        }
        let vm = self.capture_vm()?;
        let mut vcpus: Vec<VcpuState> = Vec::new();
        for rx in replies {
            let s = rx.recv_timeout(PAUSE_TIMEOUT).map_err(|_| {
                MachineError::Exited(ExitReason::Error(
                    "vCPU did not answer a capture request".into(),
                ))
            })??;
            vcpus.push(s);
        }
        let serial = self.serial.lock().expect("serial lock").regs();
        Ok(MachineState {
            memory: self.slots.iter().map(|s| (s.gpa, s.size)).collect(),
            vcpus,
            vm,
            serial,
            console_offset: self.console.offset(),
            net: self.net.as_ref().map(|n| n.state()),
            disk: self.blk.as_ref().map(|b| b.state()),
        })
    }

    fn capture_vm(&self) -> Result<VmState, MachineError> {
        let chip = |id| -> Result<kvm_irqchip, MachineError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(kvm_err("reading the irqchip"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(kvm_err("reading the PIT"))?,
            clock: self.vm.get_clock().map_err(kvm_err("reading kvmclock"))?,
        })
    }

    /// Turns KVM's dirty log on or off for all of guest RAM. Turning it on
    /// starts a fresh KVM log (every page clean); castor's own writes through
    /// the GuestMemory API since the last harvest (e.g. loading the kernel)
    /// are still reported by the next [`Machine::harvest_dirty`].
    pub fn set_dirty_tracking(&mut self, on: bool) -> Result<(), MachineError> {
        if on != self.tracking {
            register_slots(&self.vm, &self.slots, on)?;
            self.tracking = on;
        }
        Ok(())
    }

    /// Whether KVM's dirty log is on.
    pub fn dirty_tracking(&self) -> bool {
        self.tracking
    }

    /// The pages dirtied since the previous harvest, by the guest (KVM's log)
    /// or by castor itself (through the GuestMemory API). Call it while paused
    /// for an exact epoch boundary.
    ///
    /// If it fails part-way, the bits already fetched (KVM clears them as it
    /// hands them out) stay pending and are returned by the next harvest.
    pub fn harvest_dirty(&mut self) -> Result<DirtyPages, MachineError> {
        if !self.tracking {
            return Err(MachineError::Config("dirty tracking is off".into()));
        }
        for s in &self.slots {
            let bits = self
                .vm
                .get_dirty_log(s.index, s.size as usize)
                .map_err(kvm_err("reading the dirty log"))?;
            let first = (s.gpa / PAGE_SIZE) as usize;
            debug_assert_eq!(first % 64, 0);
            for (i, w) in bits.into_iter().enumerate() {
                self.pending_dirty[first / 64 + i] |= w;
            }
        }
        memory::drain_vmm_writes(&self.mem, &mut self.pending_dirty);
        let fresh = vec![0u64; self.pending_dirty.len()];
        Ok(DirtyPages {
            bitmap: std::mem::replace(&mut self.pending_dirty, fresh),
        })
    }

    /// Waits up to `timeout` for the guest to stop by itself (shutdown or an
    /// error). Only meaningful while running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitReason> {
        if let Some(r) = &self.exited {
            return Some(r.clone());
        }
        match self.events.recv_timeout(timeout) {
            Ok(Event::Exited(i, r)) => {
                info!(vcpu = i, ?r, "vCPU stopped");
                self.exited = Some(r.clone());
                Some(r)
            }
            Ok(Event::Paused(_)) => None,
            Err(_) => None,
        }
    }

    /// Stops the vCPU threads and waits for them.
    pub fn stop(&mut self) {
        stop_vcpus(&self.shared, &mut self.vcpus);
        if let Some(n) = &self.net {
            n.stop();
        }
        if let Some(b) = &self.blk {
            b.stop();
        }
        self.console.flush();
    }
}

/// A state with a disk needs a disk of its size; a state without one, none.
fn disk_matches(state: &MachineState, disk: Option<&Disk>) -> Result<(), MachineError> {
    match (&state.disk, disk) {
        (None, None) => Ok(()),
        (Some(s), Some(d)) if s.capacity_bytes == d.bytes() => Ok(()),
        (Some(s), Some(d)) => Err(MachineError::Config(format!(
            "the machine state's disk has {} bytes, the disk {} has {} bytes",
            s.capacity_bytes,
            d.path().display(),
            d.bytes()
        ))),
        (Some(s), None) => Err(MachineError::Config(format!(
            "the machine state has a disk of {} bytes and no disk was given (--disk)",
            s.capacity_bytes
        ))),
        (None, Some(d)) => Err(MachineError::Config(format!(
            "the machine state has no disk, and the disk {} was given",
            d.path().display()
        ))),
    }
}

/// Asks every vCPU thread to exit, kicks it out of `KVM_RUN` and joins it.
fn stop_vcpus(shared: &Shared, vcpus: &mut [VcpuHandle]) {
    shared
        .exit
        .store(true, std::sync::atomic::Ordering::Release);
    for v in vcpus.iter() {
        let _ = v.requests.send(Request::Exit);
        if let Some(t) = &v.thread {
            let _ = t.kill(vcpu::kick_signal());
        }
    }
    for v in vcpus.iter_mut() {
        if let Some(t) = v.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}
