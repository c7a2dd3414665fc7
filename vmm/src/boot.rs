//! Loading a multiboot v1 kernel: the ELF (32- or 64-bit program headers) or
//! a.out-kludge image, the multiboot information structure, and the initial
//! 32-bit protected-mode CPU state the specification requires.
//!
//! Guest low memory used by the loader (the kernel may not overlap it):
//! `0x7000` multiboot info, `0x7200` loader name, `0x7400` command line
//! (at most [`MAX_CMDLINE`] bytes), `0x8000` memory map.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::linux::{KernelFormat, LinuxError};
use crate::memory::{GuestMem, MMIO_HOLE_START};

/// Multiboot header magic, in the kernel image.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX the kernel receives from a multiboot loader.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// EAX castor gives the other vCPUs (castor's extension; EBX = vCPU index).
pub const AP_MAGIC: u32 = 0x4353_5452;
/// Longest kernel command line, in bytes.
pub const MAX_CMDLINE: usize = 3071;

const MBI_ADDR: u64 = 0x7000;
const LOADER_NAME_ADDR: u64 = 0x7200;
const CMDLINE_ADDR: u64 = 0x7400;
const MMAP_ADDR: u64 = 0x8000;
const RESERVED_LOW: std::ops::Range<u64> = 0x7000..0x9000;
const AOUT_KLUDGE: u32 = 1 << 16;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// No multiboot v1 header in the first 8 KiB.
    #[error("not a multiboot v1 kernel: no valid multiboot header in its first 8 KiB")]
    NotMultiboot,
    /// The header asks for something castor does not provide.
    #[error("the multiboot header asks for unsupported features (flags {0:#x}): castor supports page alignment, memory information and the a.out kludge")]
    UnsupportedFlags(u32),
    /// Malformed ELF or a.out kludge image.
    #[error("malformed kernel image: {0}")]
    BadImage(&'static str),
    /// A segment does not fit in guest RAM below the MMIO hole.
    #[error("kernel segment at {addr:#x} ({len} bytes) does not fit in guest RAM or overlaps the loader's area at 0x7000-0x9000")]
    SegmentOutOfRange {
        /// Its guest physical address.
        addr: u64,
        /// Its size in memory.
        len: u64,
    },
    /// The command line is too long.
    #[error("kernel command line of {0} bytes is longer than {MAX_CMDLINE}")]
    CmdlineTooLong(usize),
    /// Writing guest memory failed.
    #[error("writing the kernel into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Not a multiboot kernel, and not a Linux kernel castor can boot.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// An initramfs was given for a multiboot kernel.
    #[error("an initramfs is only passed to Linux kernels; this is a multiboot kernel (castor passes no multiboot modules)")]
    InitrdForMultiboot,
}

/// Where the kernel starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Entry point (32-bit, paging off).
    pub rip: u32,
    /// Address of the multiboot information structure.
    pub mbi: u32,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BootError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BootError::BadImage("truncated header"))
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BootError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or(BootError::BadImage("truncated header"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, BootError> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or(BootError::BadImage("truncated header"))
}

/// Finds the multiboot header: (offset in the file, flags).
fn find_header(image: &[u8]) -> Option<(usize, u32)> {
    let end = image.len().min(8192);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(image, off).ok()?;
        let flags = u32_at(image, off + 4).ok()?;
        let sum = u32_at(image, off + 8).ok()?;
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
            .then_some((off, flags))
    })
}

/// Whether `image` has a valid multiboot v1 header in its first 8 KiB.
pub fn has_multiboot_header(image: &[u8]) -> bool {
    find_header(image).is_some()
}

fn check_range(mem: &GuestMem, addr: u64, len: u64) -> Result<(), BootError> {
    let end = addr.checked_add(len);
    let ram_low_end = mem
        .iter()
        .next()
        .map(|r| r.len())
        .unwrap_or(0)
        .min(MMIO_HOLE_START);
    let ok = matches!(end, Some(e) if e <= ram_low_end)
        && (addr >= RESERVED_LOW.end || addr + len <= RESERVED_LOW.start);
    if ok {
        Ok(())
    } else {
        Err(BootError::SegmentOutOfRange { addr, len })
    }
}

fn load_segment(
    mem: &GuestMem,
    image: &[u8],
    file_off: u64,
    file_len: u64,
    addr: u64,
    mem_len: u64,
) -> Result<(), BootError> {
    if file_len > mem_len {
        return Err(BootError::BadImage(
            "segment file size larger than its memory size",
        ));
    }
    let data = usize::try_from(file_off)
        .ok()
        .zip(usize::try_from(file_len).ok())
        .and_then(|(o, l)| image.get(o..o.checked_add(l)?))
        .ok_or(BootError::BadImage("segment lies outside the file"))?;
    check_range(mem, addr, mem_len)?;
    mem.write_slice(data, GuestAddress(addr))?;
    let zero = vec![0u8; (mem_len - file_len) as usize];
    mem.write_slice(&zero, GuestAddress(addr + file_len))?;
    Ok(())
}

fn load_elf(mem: &GuestMem, image: &[u8]) -> Result<u32, BootError> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(BootError::BadImage(
            "not an ELF file and no a.out kludge in the header",
        ));
    }
    if image.get(5) != Some(&1) {
        return Err(BootError::BadImage("not a little-endian ELF"));
    }
    let class64 = match image.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(BootError::BadImage("unknown ELF class")),
    };
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(image, 24)?,
            u64_at(image, 32)?,
            u16_at(image, 54)?,
            u16_at(image, 56)?,
        )
    } else {
        (
            u32_at(image, 24)? as u64,
            u32_at(image, 28)? as u64,
            u16_at(image, 42)?,
            u16_at(image, 44)?,
        )
    };
    let min_ph = if class64 { 56 } else { 32 };
    if (phentsize as usize) < min_ph || phnum == 0 || phnum > 64 {
        return Err(BootError::BadImage("bad program header table"));
    }
    let mut loaded = 0;
    for i in 0..phnum as u64 {
        let ph = usize::try_from(phoff + i * phentsize as u64)
            .map_err(|_| BootError::BadImage("program header outside the file"))?;
        let p_type = u32_at(image, ph)?;
        if p_type != 1 {
            continue; // PT_LOAD only
        }
        let (off, paddr, filesz, memsz) = if class64 {
            (
                u64_at(image, ph + 8)?,
                u64_at(image, ph + 24)?,
                u64_at(image, ph + 32)?,
                u64_at(image, ph + 40)?,
            )
        } else {
            (
                u32_at(image, ph + 4)? as u64,
                u32_at(image, ph + 12)? as u64,
                u32_at(image, ph + 16)? as u64,
                u32_at(image, ph + 20)? as u64,
            )
        };
        load_segment(mem, image, off, filesz, paddr, memsz)?;
        loaded += 1;
    }
    if loaded == 0 {
        return Err(BootError::BadImage("no loadable segment"));
    }
    u32::try_from(entry).map_err(|_| BootError::BadImage("entry point above 4 GiB"))
}

fn load_aout_kludge(mem: &GuestMem, image: &[u8], hdr: usize) -> Result<u32, BootError> {
    let header_addr = u32_at(image, hdr + 12)? as u64;
    let load_addr = u32_at(image, hdr + 16)? as u64;
    let load_end = u32_at(image, hdr + 20)? as u64;
    let bss_end = u32_at(image, hdr + 24)? as u64;
    let entry = u32_at(image, hdr + 28)?;
    let file_off = (hdr as u64)
        .checked_sub(
            header_addr
                .checked_sub(load_addr)
                .ok_or(BootError::BadImage("header_addr below load_addr"))?,
        )
        .ok_or(BootError::BadImage(
            "a.out kludge addresses do not match the file",
        ))?;
    let file_len = if load_end == 0 {
        image.len() as u64 - file_off
    } else {
        load_end
            .checked_sub(load_addr)
            .ok_or(BootError::BadImage("load_end_addr below load_addr"))?
    };
    let mem_len = if bss_end == 0 {
        file_len
    } else {
        bss_end
            .checked_sub(load_addr)
            .ok_or(BootError::BadImage("bss_end_addr below load_addr"))?
    };
    load_segment(mem, image, file_off, file_len, load_addr, mem_len)?;
    Ok(entry)
}

/// Loads a multiboot v1 kernel and writes the multiboot information for it.
pub fn load(mem: &GuestMem, image: &[u8], cmdline: &str) -> Result<Entry, BootError> {
    let (hdr, flags) = find_header(image).ok_or(BootError::NotMultiboot)?;
    // Bits 0 (page-align modules) and 1 (memory info) are always satisfied; bit
    // 2 (video mode) is a request castor may ignore; other low bits are required.
    let required_unknown = flags & 0xFFF8;
    if required_unknown != 0 {
        return Err(BootError::UnsupportedFlags(flags));
    }
    let rip = if flags & AOUT_KLUDGE != 0 {
        load_aout_kludge(mem, image, hdr)?
    } else {
        load_elf(mem, image)?
    };
    if cmdline.len() > MAX_CMDLINE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE_ADDR))?;
    mem.write_slice(b"castor\0", GuestAddress(LOADER_NAME_ADDR))?;

    // Memory map: low 639 KiB, then each RAM region (type 1 = available).
    let mut mmap = Vec::new();
    let mut entry = |base: u64, len: u64| {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes());
    };
    entry(0, 0x9_FC00);
    let mut upper_kib = 0;
    for (i, r) in mem.iter().enumerate() {
        let (start, len) = (r.start_addr().0, r.len());
        if i == 0 {
            entry(0x10_0000, len - 0x10_0000);
            upper_kib = (len - 0x10_0000) / 1024;
        } else {
            entry(start, len);
        }
    }
    mem.write_slice(&mmap, GuestAddress(MMAP_ADDR))?;

    let mut mbi = [0u32; 22];
    mbi[0] = 1 | 4 | 0x40 | 0x200; // mem, cmdline, mmap, loader name
    mbi[1] = 639;
    mbi[2] = u32::try_from(upper_kib).unwrap_or(u32::MAX);
    mbi[4] = CMDLINE_ADDR as u32;
    mbi[11] = mmap.len() as u32;
    mbi[12] = MMAP_ADDR as u32;
    mbi[16] = LOADER_NAME_ADDR as u32;
    let bytes: Vec<u8> = mbi.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(MBI_ADDR))?;
    Ok(Entry {
        rip,
        mbi: MBI_ADDR as u32,
    })
}

/// Where and how the vCPUs start, per the kernel's boot protocol.
#[derive(Debug, Clone, Copy)]
pub enum BootEntry {
    /// Multiboot: every vCPU starts in 32-bit protected mode (the others
    /// with castor's AP convention).
    Multiboot(Entry),
    /// Linux: the boot vCPU starts at the 64-bit entry; the others wait for
    /// the kernel's INIT/SIPI, as on real hardware.
    Linux(crate::linux::Entry),
}

/// Recognises `image` by its content (see [`crate::linux::detect`]) and
/// loads it: a multiboot kernel as [`load`] does, a Linux kernel with
/// `initrd` and ACPI tables for `vcpus` vCPUs as [`crate::linux::load`] does.
pub fn load_kernel(
    mem: &GuestMem,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    vcpus: u32,
) -> Result<(KernelFormat, BootEntry), BootError> {
    let format = crate::linux::detect(image)?;
    let entry = match format {
        KernelFormat::Multiboot => {
            if initrd.is_some() {
                return Err(BootError::InitrdForMultiboot);
            }
            BootEntry::Multiboot(load(mem, image, cmdline)?)
        }
        _ => BootEntry::Linux(crate::linux::load(
            mem, format, image, initrd, cmdline, vcpus,
        )?),
    };
    Ok((format, entry))
}

/// The initial registers of vCPU `index`, or `None` if it is to wait for
/// INIT/SIPI (a Linux AP). `sregs`: the vCPU's current sregs.
pub fn vcpu_start(
    entry: &BootEntry,
    index: u32,
    sregs: kvm_sregs,
) -> Option<(kvm_regs, kvm_sregs)> {
    match entry {
        BootEntry::Multiboot(e) => Some(initial_state(*e, index, sregs)),
        BootEntry::Linux(e) => (index == 0).then(|| crate::linux::initial_state(*e, sregs)),
    }
}

fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The initial state of vCPU `index`: 32-bit protected mode, paging off, flat
/// segments, interrupts off; EAX/EBX per multiboot (BSP) or castor's AP
/// convention. `sregs` is the vCPU's current sregs, to keep what KVM set up
/// (APIC base, EFER and so on).
pub fn initial_state(entry: Entry, index: u32, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let code = flat_segment(0x08, true);
    let data = flat_segment(0x10, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0xFFFF,
        selector: 0x18,
        type_: 0xB,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        limit: 0xFFFF,
        ..Default::default()
    };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let (rax, rbx) = if index == 0 {
        (BOOT_MAGIC as u64, entry.mbi as u64)
    } else {
        (AP_MAGIC as u64, index as u64)
    };
    let regs = kvm_regs {
        rip: entry.rip as u64,
        rax,
        rbx,
        rflags: 0x2,
        ..Default::default()
    };
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn loads_castors_guest_and_writes_the_multiboot_info() {
        let mem = memory::create(64 << 20).unwrap();
        let e = load(&mem, guest::KERNEL, "castor-guest workload=counter").unwrap();
        assert_eq!(e.mbi, 0x7000);
        assert!(e.rip >= 0x10_0000);
        let flags: u32 = mem.read_obj(GuestAddress(0x7000)).unwrap();
        assert_eq!(flags & 0x45, 0x45);
        let upper: u32 = mem.read_obj(GuestAddress(0x7008)).unwrap();
        assert_eq!(upper as u64, (64 << 20) / 1024 - 1024);
        let mut c = [0u8; 29];
        mem.read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&c, b"castor-guest workload=counter");
    }

    #[test]
    fn refuses_bad_kernels_with_reasons() {
        let mem = memory::create(64 << 20).unwrap();
        assert!(matches!(
            load(&mem, b"hello", ""),
            Err(BootError::NotMultiboot)
        ));
        // A header with no ELF behind it and no a.out kludge.
        let mut img = vec![0u8; 64];
        img[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        img[8..12].copy_from_slice(&(HEADER_MAGIC.wrapping_neg()).to_le_bytes());
        assert!(matches!(load(&mem, &img, ""), Err(BootError::BadImage(_))));
        // Truncated ELF: cut the guest kernel in the middle of its segments.
        let cut = &guest::KERNEL[..guest::KERNEL.len() / 2];
        let err = load(&mem, cut, "").unwrap_err();
        assert!(matches!(err, BootError::BadImage(_)), "{err}");
        // A kernel larger than guest RAM.
        let small = memory::create(16 << 20).unwrap();
        let mut big = guest::KERNEL.to_vec();
        // Patch the bss segment's p_memsz (second program header) to 64 MiB.
        let phoff = u32::from_le_bytes(big[28..32].try_into().unwrap()) as usize;
        let ph2 = phoff + 32;
        big[ph2 + 20..ph2 + 24].copy_from_slice(&(64u32 << 20).to_le_bytes());
        assert!(matches!(
            load(&small, &big, ""),
            Err(BootError::SegmentOutOfRange { .. })
        ));
        assert!(matches!(
            load(&mem, guest::KERNEL, &"x".repeat(4000)),
            Err(BootError::CmdlineTooLong(_))
        ));
    }
}
