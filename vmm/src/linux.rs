//! Booting a Linux kernel: a bzImage or an uncompressed 64-bit vmlinux (ELF),
//! loaded with rust-vmm's `linux-loader`, with an initramfs, and entered the
//! way the Linux x86 64-bit boot protocol asks (Documentation/arch/x86/boot.rst,
//! "64-bit Boot Protocol"): long mode, identity-mapped page tables, a flat
//! GDT, interrupts off, `rsi` = the zero page.
//!
//! Guest memory the loader uses below 1 MiB (the kernel is placed at or
//! above 1 MiB, the initramfs at the top of RAM below 3 GiB):
//!
//! | address             | what                                           |
//! |---------------------|------------------------------------------------|
//! | `0x500`             | GDT (null, code64, data, TSS)                  |
//! | `0x520`             | IDT (empty; the kernel loads its own)          |
//! | `0x7000`            | zero page (`struct boot_params`)               |
//! | below `0x8FF0`      | boot stack                                     |
//! | `0x9000`-`0xEFFF`   | page tables: PML4, PDPT, 4 PDs (4 GiB, 2 MiB pages) |
//! | `0x20000`           | kernel command line                            |
//! | `0x9FC00`-`0xFFFFF` | reserved in the e820 map; ACPI tables at `0xE0000` |
//!
//! The non-boot vCPUs are left as KVM creates them: waiting for INIT/SIPI,
//! which the kernel sends through its local APIC as on real hardware (it
//! finds them in the ACPI MADT, see [`crate::acpi`]).

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::console::{MMIO_CONSOLE_BASE, MMIO_CONSOLE_LEN};
use crate::memory::{GuestMem, MMIO_HOLE_START, PAGE_SIZE};
use crate::virtio_net::{NET_MMIO_BASE, NET_MMIO_LEN};

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const ZERO_PAGE_ADDR: u64 = 0x7000;
const STACK_TOP: u64 = 0x8FF0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xA000;
const PD_ADDR: u64 = 0xB000;
/// Gibibytes identity-mapped by the boot page tables (one PD each).
const MAPPED_GIB: u64 = 4;
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Start of the extended BIOS data area: RAM below it, reserved above.
const EBDA_START: u64 = 0x9_FC00;
/// Where RAM above the BIOS area starts; nothing of the kernel goes lower.
const HIGH_MEMORY: u64 = 0x10_0000;
/// Longest command line (Linux's COMMAND_LINE_SIZE on x86 is 2048 with the NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Where the 64-bit entry is in a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY64: u64 = 0x200;
/// Highest initramfs end when the kernel does not say (`initrd_addr_max`).
const INITRD_ADDR_MAX: u64 = 0x7FFF_FFFF;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xAA55;
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
const XLF_KERNEL_64: u16 = 1;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const ELF_PT_LOAD: u32 = 1;
const ELF_PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;

/// A kernel image format castor recognises by content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A multiboot v1 kernel (castor's own guest): see [`crate::boot`].
    Multiboot,
    /// A compressed Linux kernel with its real-mode setup header.
    BzImage,
    /// An uncompressed 64-bit Linux kernel (ELF); `pvh`: it carries the PVH
    /// entry note (castor enters it through the 64-bit entry regardless).
    Vmlinux {
        /// Whether the Xen PVH entry note is present.
        pvh: bool,
    },
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFormat::Multiboot => write!(f, "multiboot v1"),
            KernelFormat::BzImage => write!(f, "Linux bzImage (64-bit boot protocol)"),
            KernelFormat::Vmlinux { pvh } => write!(
                f,
                "Linux vmlinux ELF (64-bit boot protocol{})",
                if *pvh { "; has a PVH note" } else { "" }
            ),
        }
    }
}

/// Why a Linux kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// Not a format castor knows.
    #[error("unrecognised kernel image ({0}): castor boots multiboot v1 kernels, Linux bzImages (setup header 'HdrS') and 64-bit x86 vmlinux ELF files")]
    UnknownFormat(&'static str),
    /// The file ends before what its headers describe.
    #[error("truncated kernel image: {0}")]
    Truncated(String),
    /// A bzImage castor cannot enter in 64-bit mode.
    #[error("unsupported Linux kernel: {0}")]
    Unsupported(String),
    /// The kernel, its working area or the initramfs does not fit.
    #[error("{what} needs guest memory up to {need:#x}, but RAM below the MMIO hole ends at {have:#x}: raise --mem")]
    TooLarge {
        /// What does not fit.
        what: &'static str,
        /// One past the last byte it needs.
        need: u64,
        /// One past the last byte of low RAM.
        have: u64,
    },
    /// An ELF segment would overwrite the loader's area below 1 MiB.
    #[error("kernel segment at {0:#x} lies below 1 MiB, where the loader keeps the zero page, page tables and ACPI tables")]
    BelowHighMemory(u64),
    /// The command line is too long.
    #[error("kernel command line of {len} bytes is longer than the kernel's {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// `linux-loader` refused the image.
    #[error("loading the kernel: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// Writing guest memory failed.
    #[error("writing the boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts a Linux kernel.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// 64-bit entry point (physical; identity-mapped).
    pub rip: u64,
    /// The zero page, passed in `rsi`.
    pub zero_page: u64,
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Recognises a kernel image by its content: a bzImage by its setup header
/// ("HdrS" at 0x202 and the boot flag 0xAA55 at 0x1FE), a multiboot kernel by
/// its header in the first 8 KiB (checked by [`crate::boot::load`]), a
/// vmlinux as a 64-bit little-endian x86-64 ELF executable.
pub fn detect(image: &[u8]) -> Result<KernelFormat, LinuxError> {
    if le32(image, 0x202) == Some(HDRS_MAGIC) && le16(image, 0x1FE) == Some(BOOT_FLAG) {
        return Ok(KernelFormat::BzImage);
    }
    if crate::boot::has_multiboot_header(image) {
        return Ok(KernelFormat::Multiboot);
    }
    if image.len() < 4 {
        return Err(LinuxError::UnknownFormat("shorter than any header"));
    }
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(LinuxError::UnknownFormat(
            "no multiboot header, no bzImage setup header, no ELF magic",
        ));
    }
    if image.len() < 64 {
        return Err(LinuxError::Truncated(format!(
            "{} bytes: shorter than an ELF header",
            image.len()
        )));
    }
    if image[4] != 2 || image[5] != 1 || le16(image, 18) != Some(EM_X86_64) {
        return Err(LinuxError::UnknownFormat(
            "an ELF file without a multiboot header that is not 64-bit little-endian x86-64",
        ));
    }
    let pvh = elf_segments(image)?
        .iter()
        .filter(|s| s.kind == ELF_PT_NOTE)
        .any(|s| has_pvh_note(image, s));
    Ok(KernelFormat::Vmlinux { pvh })
}

#[derive(Debug)]
struct Segment {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The program headers of a 64-bit ELF, each checked to lie in the file.
fn elf_segments(image: &[u8]) -> Result<Vec<Segment>, LinuxError> {
    let bad = |what: String| LinuxError::Truncated(format!("{what} ({} bytes)", image.len()));
    let phoff = le64(image, 32).ok_or_else(|| bad("ELF header".into()))?;
    let phentsize = le16(image, 54).ok_or_else(|| bad("ELF header".into()))? as u64;
    let phnum = le16(image, 56).ok_or_else(|| bad("ELF header".into()))? as u64;
    if phentsize != 56 || phnum == 0 {
        return Err(LinuxError::UnknownFormat(
            "ELF without a valid program header table",
        ));
    }
    (0..phnum)
        .map(|i| {
            let at = phoff
                .checked_add(i * phentsize)
                .and_then(|a| usize::try_from(a).ok())
                .filter(|&a| a.checked_add(56).is_some_and(|e| e <= image.len()))
                .ok_or_else(|| bad(format!("program header {i} lies past the end of the file")))?;
            let s = Segment {
                kind: le32(image, at).unwrap_or(0),
                offset: le64(image, at + 8).unwrap_or(0),
                paddr: le64(image, at + 24).unwrap_or(0),
                filesz: le64(image, at + 32).unwrap_or(0),
                memsz: le64(image, at + 40).unwrap_or(0),
            };
            if s.offset
                .checked_add(s.filesz)
                .is_none_or(|e| e > image.len() as u64)
            {
                return Err(bad(format!(
                    "segment {i} (file bytes {:#x}..{:#x}) lies past the end of the file",
                    s.offset,
                    s.offset.saturating_add(s.filesz)
                )));
            }
            Ok(s)
        })
        .collect()
}

/// Whether a PT_NOTE segment holds the "Xen" PHYS32_ENTRY (PVH) note.
fn has_pvh_note(image: &[u8], s: &Segment) -> bool {
    let notes = &image[s.offset as usize..(s.offset + s.filesz) as usize];
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = le32(notes, off).unwrap_or(0) as usize;
        let descsz = le32(notes, off + 4).unwrap_or(0) as usize;
        let kind = le32(notes, off + 8).unwrap_or(0);
        let name = notes.get(off + 12..off + 12 + namesz);
        if kind == 18 && name == Some(b"Xen\0") {
            return true;
        }
        off += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
    }
    false
}

/// One past the last byte of RAM below the MMIO hole.
fn low_ram_end(mem: &GuestMem) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0)
        .min(MMIO_HOLE_START)
}

fn fits(what: &'static str, need: u64, have: u64) -> Result<(), LinuxError> {
    if need <= have {
        Ok(())
    } else {
        Err(LinuxError::TooLarge { what, need, have })
    }
}

/// What loading the kernel itself gave: where to enter, where its memory
/// ends, and (bzImage) its setup header.
struct Loaded {
    rip: u64,
    end: u64,
    header: Option<setup_header>,
}

fn load_vmlinux(mem: &GuestMem, image: &[u8], have: u64) -> Result<Loaded, LinuxError> {
    let mut end = 0u64;
    for s in elf_segments(image)?
        .iter()
        .filter(|s| s.kind == ELF_PT_LOAD)
    {
        if s.paddr < HIGH_MEMORY {
            return Err(LinuxError::BelowHighMemory(s.paddr));
        }
        let seg_end = s.paddr.saturating_add(s.memsz.max(s.filesz));
        fits("the kernel", seg_end, have)?;
        end = end.max(seg_end);
    }
    let r = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_MEMORY)),
    )?;
    Ok(Loaded {
        rip: r.kernel_load.0,
        end,
        header: None,
    })
}

fn load_bzimage(mem: &GuestMem, image: &[u8], have: u64) -> Result<Loaded, LinuxError> {
    let version = le16(image, 0x206).unwrap_or(0);
    let setup_sects = match image.get(0x1F1) {
        Some(0) => 4,
        Some(&n) => n as u64,
        None => return Err(LinuxError::Truncated("no setup header".into())),
    };
    if version < 0x020C {
        return Err(LinuxError::Unsupported(format!(
            "boot protocol {}.{:02} is older than 2.12, which has the 64-bit entry",
            version >> 8,
            version & 0xFF
        )));
    }
    let xloadflags = le16(image, 0x236).unwrap_or(0);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::Unsupported(
            "the bzImage has no 64-bit entry point (a 32-bit kernel?)".into(),
        ));
    }
    let setup_size = (setup_sects + 1) * 512;
    let syssize = le32(image, 0x1F4).unwrap_or(0) as u64 * 16;
    if (image.len() as u64) < setup_size + syssize {
        return Err(LinuxError::Truncated(format!(
            "the bzImage header describes {} bytes, the file has {}",
            setup_size + syssize,
            image.len()
        )));
    }
    let load = le32(image, 0x214).unwrap_or(0) as u64; // code32_start
    let pref = le64(image, 0x258).unwrap_or(0);
    let init_size = le32(image, 0x260).unwrap_or(0) as u64;
    fits(
        "the compressed kernel",
        load + image.len() as u64 - setup_size,
        have,
    )?;
    // The decompressor works in place from max(load address, preferred
    // address) for init_size bytes.
    let end = load.max(pref) + init_size;
    fits("the kernel while it decompresses (init_size)", end, have)?;
    let r = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_MEMORY)),
    )?;
    Ok(Loaded {
        rip: r.kernel_load.0 + BZIMAGE_ENTRY64,
        end,
        header: r.setup_header,
    })
}

/// The e820 map of a guest: RAM below the BIOS area, the BIOS area
/// reserved (ACPI tables), RAM from 1 MiB to the MMIO hole, castor's MMIO
/// console window and virtio-net window reserved (a Linux guest finds the
/// card with `virtio_mmio.device=4K@0xfeb01000:5`), RAM above 4 GiB.
pub fn e820_map(mem: &GuestMem) -> Vec<boot_e820_entry> {
    let e = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        e(0, EBDA_START, E820_RAM),
        e(EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
    ];
    for (i, r) in mem.iter().enumerate() {
        let (start, len) = (r.start_addr().0, r.len());
        if i == 0 {
            map.push(e(HIGH_MEMORY, len - HIGH_MEMORY, E820_RAM));
        } else {
            map.push(e(start, len, E820_RAM));
        }
    }
    let console_len = MMIO_CONSOLE_LEN.next_multiple_of(PAGE_SIZE);
    map.push(e(MMIO_CONSOLE_BASE, console_len, E820_RESERVED));
    map.push(e(NET_MMIO_BASE, NET_MMIO_LEN, E820_RESERVED));
    map.sort_by_key(|e| e.addr);
    map
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first
/// [`MAPPED_GIB`] GiB with 2 MiB pages.
fn write_cpu_tables(mem: &GuestMem) -> Result<(), LinuxError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_ADDR))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for g in 0..MAPPED_GIB {
        let pd = PD_ADDR + g * PAGE_SIZE;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPT_ADDR + g * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | PRESENT_RW | HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

/// Loads a Linux kernel (`format` from [`detect`], not multiboot), its
/// initramfs and command line, and writes the zero page, e820 map, ACPI
/// tables for `vcpus` vCPUs, page tables and GDT.
pub fn load(
    mem: &GuestMem,
    format: KernelFormat,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    vcpus: u32,
) -> Result<Entry, LinuxError> {
    let have = low_ram_end(mem);
    let loaded = match format {
        KernelFormat::BzImage => load_bzimage(mem, image, have)?,
        KernelFormat::Vmlinux { .. } => load_vmlinux(mem, image, have)?,
        KernelFormat::Multiboot => {
            return Err(LinuxError::UnknownFormat("a multiboot kernel, not Linux"))
        }
    };
    let mut params = boot_params::default();
    let max_cmdline = match &loaded.header {
        Some(h) => {
            params.hdr = *h;
            (h.cmdline_size as usize).clamp(255, MAX_CMDLINE)
        }
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = 0x100_0000;
            MAX_CMDLINE
        }
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    if cmdline.len() > max_cmdline {
        return Err(LinuxError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_cmdline,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxError::CmdlineNul);
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE_ADDR))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(initrd) = initrd {
        let max = match &loaded.header {
            Some(h) if h.initrd_addr_max != 0 => h.initrd_addr_max as u64,
            _ => INITRD_ADDR_MAX,
        };
        let top = have.min(max + 1);
        let size = initrd.len() as u64;
        let start = top.checked_sub(size).map(|s| s & !(PAGE_SIZE - 1));
        match start {
            Some(s) if s >= loaded.end.next_multiple_of(PAGE_SIZE) => {
                mem.write_slice(initrd, GuestAddress(s))?;
                params.hdr.ramdisk_image = s as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            _ => {
                return Err(LinuxError::TooLarge {
                    what: "the kernel and the initramfs",
                    need: loaded.end.next_multiple_of(PAGE_SIZE) + size,
                    have: top,
                })
            }
        }
    }

    let map = e820_map(mem);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.acpi_rsdp_addr = crate::acpi::write(mem, vcpus)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    write_cpu_tables(mem)?;
    Ok(Entry {
        rip: loaded.rip,
        zero_page: ZERO_PAGE_ADDR,
    })
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
    gdt_entry(0x808B, 0, 0xFFFFF),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xFF00_0000) << 32)
        | ((flags as u64 & 0xF0FF) << 40)
        | ((limit as u64 & 0xF_0000) << 32)
        | ((base as u64 & 0x00FF_FFFF) << 16)
        | (limit as u64 & 0xFFFF)
}

/// The KVM segment a GDT entry describes, with `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit = (((entry >> 32) & 0xF_0000) | (entry & 0xFFFF)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        limit: if g == 1 { (limit << 12) | 0xFFF } else { limit },
        selector,
        type_: ((entry >> 40) & 0xF) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The boot vCPU's initial state for the 64-bit boot protocol: long mode
/// with paging on the identity map, the boot GDT's flat segments,
/// interrupts off, `rsi` = zero page. `sregs` is the vCPU's current sregs,
/// to keep what KVM set up (APIC base and so on).
pub fn initial_state(entry: Entry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let code = segment(GDT[1], 0x08);
    let data = segment(GDT[2], 0x10);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], 0x18);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LMA | LME
    let regs = kvm_regs {
        rip: entry.rip,
        rsi: entry.zero_page,
        rsp: STACK_TOP,
        rbp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    /// A minimal vmlinux: one PT_LOAD of `code` at `paddr`, entry there, and
    /// optionally a PVH note.
    fn vmlinux(paddr: u64, code: &[u8], memsz: u64, pvh: bool) -> Vec<u8> {
        let note: Vec<u8> = if pvh {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&18u32.to_le_bytes());
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&(paddr as u32).to_le_bytes());
            n
        } else {
            Vec::new()
        };
        let phnum: u16 = if pvh { 2 } else { 1 };
        let code_off = 64 + 56 * phnum as u64;
        let note_off = code_off + code.len() as u64;
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let ph = |kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let mut p = Vec::new();
            p.extend_from_slice(&kind.to_le_bytes());
            p.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, filesz, memsz, 0x1000] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p
        };
        f.extend(ph(ELF_PT_LOAD, code_off, paddr, code.len() as u64, memsz));
        if pvh {
            f.extend(ph(ELF_PT_NOTE, note_off, 0, note.len() as u64, 0));
        }
        f.extend_from_slice(code);
        f.extend_from_slice(&note);
        f
    }

    /// A minimal bzImage: setup header with 64-bit entry, 4 setup sectors,
    /// `payload` as the protected-mode kernel.
    fn bzimage(payload: &[u8], init_size: u32) -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512];
        f[0x1F1] = 4;
        f[0x1F4..0x1F8].copy_from_slice(&(payload.len() as u32).div_ceil(16).to_le_bytes());
        f[0x1FE..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        f[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        f[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        f[0x211] = 1; // LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[0x22C..0x230].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        f[0x236..0x238].copy_from_slice(&0x7Fu16.to_le_bytes());
        f[0x238..0x23C].copy_from_slice(&2047u32.to_le_bytes());
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        f.extend_from_slice(payload);
        f.resize(5 * 512 + payload.len().next_multiple_of(16), 0);
        f
    }

    fn zero_page(mem: &GuestMem) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    #[test]
    fn recognises_formats_by_content() {
        assert_eq!(detect(guest::KERNEL).unwrap(), KernelFormat::Multiboot);
        assert_eq!(
            detect(&vmlinux(0x100_0000, &[0xF4], 1, false)).unwrap(),
            KernelFormat::Vmlinux { pvh: false }
        );
        assert_eq!(
            detect(&vmlinux(0x100_0000, &[0xF4], 1, true)).unwrap(),
            KernelFormat::Vmlinux { pvh: true }
        );
        assert_eq!(
            detect(&bzimage(&[0xF4; 64], 0x1000)).unwrap(),
            KernelFormat::BzImage
        );
        for bad in [
            &b""[..],
            b"MZ",
            &[0u8; 8192],
            b"#!/bin/sh\necho not a kernel\n",
        ] {
            assert!(
                matches!(detect(bad), Err(LinuxError::UnknownFormat(_))),
                "{bad:?}"
            );
        }
        let mut elf32 = vmlinux(0x100_0000, &[0xF4], 1, false);
        elf32[4] = 1;
        assert!(matches!(detect(&elf32), Err(LinuxError::UnknownFormat(_))));
        let msg = detect(b"hello").unwrap_err().to_string();
        assert!(msg.contains("unrecognised kernel image"), "{msg}");
    }

    #[test]
    fn loads_a_vmlinux_with_initrd_and_writes_the_zero_page() {
        let mem = memory::create(256 << 20).unwrap();
        let image = vmlinux(0x100_0000, &[0x90, 0xF4], 0x20_0000, true);
        let format = detect(&image).unwrap();
        let initrd = vec![0xA5u8; 10_000];
        let e = load(
            &mem,
            format,
            &image,
            Some(&initrd),
            "console=ttyS0 quiet",
            2,
        )
        .unwrap();
        assert_eq!(e.rip, 0x100_0000);
        assert_eq!(e.zero_page, ZERO_PAGE_ADDR);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_0001)).unwrap(), 0xF4);
        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!(hdr.type_of_loader, 0xFF);
        let mut c = vec![0u8; 20];
        mem.read_slice(&mut c, GuestAddress(hdr.cmd_line_ptr as u64))
            .unwrap();
        assert_eq!(&c, b"console=ttyS0 quiet\0");
        // The initramfs is at the top of RAM, page-aligned, intact.
        let (rd, rd_len) = (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64);
        assert_eq!(rd_len, 10_000);
        assert_eq!(rd % PAGE_SIZE, 0);
        assert!(rd + rd_len <= 256 << 20 && rd + rd_len + PAGE_SIZE > 256 << 20);
        let mut back = vec![0u8; 10_000];
        mem.read_slice(&mut back, GuestAddress(rd)).unwrap();
        assert_eq!(back, initrd);
        // e820: low RAM, BIOS area, RAM to the end, castor's device windows.
        let map: Vec<(u64, u64, u32)> = p.e820_table[..p.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
                (HIGH_MEMORY, (256 << 20) - HIGH_MEMORY, E820_RAM),
                (MMIO_CONSOLE_BASE, PAGE_SIZE, E820_RESERVED),
                (NET_MMIO_BASE, NET_MMIO_LEN, E820_RESERVED),
            ]
        );
        assert_eq!({ p.acpi_rsdp_addr }, crate::acpi::RSDP_ADDR);
        // Identity map: the PD entry for 16 MiB maps 16 MiB.
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 8)).unwrap();
        assert_eq!(pde, 0x100_0000 | 0x83);
        let pde: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * PAGE_SIZE + 511 * 8))
            .unwrap();
        assert_eq!(pde, ((4 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn e820_covers_ram_above_4_gib() {
        let mem = memory::create(4 << 30).unwrap();
        let map = e820_map(&mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_MEMORY - EBDA_START));
        assert_eq!({ map.last().unwrap().addr }, memory::HIGH_RAM_START);
    }

    #[test]
    fn loads_a_bzimage_and_enters_its_64_bit_entry() {
        let mem = memory::create(64 << 20).unwrap();
        let image = bzimage(&[0xF4; 100], 0x10_0000);
        let e = load(&mem, KernelFormat::BzImage, &image, None, "x", 1).unwrap();
        assert_eq!(e.rip, 0x10_0000 + 0x200);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xF4);
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.version }, 0x020F);
        assert_eq!({ hdr.ramdisk_image }, 0);
    }

    #[test]
    fn bad_images_give_clear_errors() {
        let mem = memory::create(32 << 20).unwrap();
        // Truncated vmlinux: the segment runs past the end of the file.
        let mut image = vmlinux(0x100_0000, &[0x90; 4096], 4096, false);
        image.truncate(image.len() - 100);
        let e = detect(&image).and_then(|f| load(&mem, f, &image, None, "", 1));
        assert!(matches!(e, Err(LinuxError::Truncated(_))), "{e:?}");
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("truncated kernel image"));
        // Truncated bzImage.
        let mut image = bzimage(&[0xF4; 4096], 0x1000);
        image.truncate(3000);
        let e = load(&mem, KernelFormat::BzImage, &image, None, "", 1);
        assert!(matches!(e, Err(LinuxError::Truncated(_))), "{e:?}");
        // Too large for the memory: a kernel ending past 32 MiB of RAM.
        let image = vmlinux(0x100_0000, &[0x90; 16], 0x110_0000, false);
        let e = load(&mem, detect(&image).unwrap(), &image, None, "", 1).unwrap_err();
        assert!(matches!(e, LinuxError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("raise --mem"), "{e}");
        // The decompressor's init_size does not fit.
        let image = bzimage(&[0xF4; 64], 0x200_0000);
        let e = load(&mem, KernelFormat::BzImage, &image, None, "", 1);
        assert!(matches!(e, Err(LinuxError::TooLarge { .. })), "{e:?}");
        // The initramfs does not fit above the kernel.
        let image = vmlinux(0x100_0000, &[0x90; 16], 0x100_0000, false);
        let initrd = vec![0u8; 1 << 20];
        let e = load(&mem, detect(&image).unwrap(), &image, Some(&initrd), "", 1);
        assert!(matches!(e, Err(LinuxError::TooLarge { .. })), "{e:?}");
        // A segment in the loader's area below 1 MiB.
        let image = vmlinux(0x8000, &[0x90; 16], 16, false);
        let e = load(&mem, detect(&image).unwrap(), &image, None, "", 1);
        assert!(
            matches!(e, Err(LinuxError::BelowHighMemory(0x8000))),
            "{e:?}"
        );
        // A 32-bit-only bzImage, an old boot protocol.
        let mut image = bzimage(&[0xF4; 64], 0x1000);
        image[0x236] = 0;
        let e = load(&mem, KernelFormat::BzImage, &image, None, "", 1);
        assert!(matches!(e, Err(LinuxError::Unsupported(_))), "{e:?}");
        image[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        let e = load(&mem, KernelFormat::BzImage, &image, None, "", 1);
        assert!(matches!(e, Err(LinuxError::Unsupported(_))), "{e:?}");
        // Command line too long for the kernel.
        let image = vmlinux(0x100_0000, &[0x90; 16], 16, false);
        let e = load(
            &mem,
            detect(&image).unwrap(),
            &image,
            None,
            &"x".repeat(3000),
            1,
        );
        assert!(matches!(e, Err(LinuxError::CmdlineTooLong { .. })), "{e:?}");
    }

    #[test]
    fn boot_vcpu_enters_long_mode_with_the_zero_page_in_rsi() {
        let entry = Entry {
            rip: 0x100_0000,
            zero_page: ZERO_PAGE_ADDR,
        };
        let (regs, sregs) = initial_state(entry, kvm_sregs::default());
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, 0x7000, 2));
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.type_), (1, 0, 0xB));
        assert_eq!(
            (sregs.ds.limit, sregs.ds.g, sregs.ds.type_),
            (0xFFFF_FFFF, 1, 3)
        );
        assert_eq!((sregs.tr.type_, sregs.tr.s, sregs.tr.present), (0xB, 0, 1));
    }
}
