//! The ACPI tables a Linux guest reads to find its vCPUs and interrupt
//! controllers: RSDP, XSDT, a hardware-reduced FADT with an empty DSDT, and a
//! MADT with one local APIC per vCPU and the IOAPIC.
//!
//! A stock kernel such as Debian's cloud kernel has no MP-table parser: the
//! MADT is what makes it see more than one vCPU and use the IOAPIC. castor
//! has no ACPI hardware (no PM timer, no SCI, no sleep states), so the FADT
//! declares the platform hardware-reduced, as Firecracker's does.
//!
//! The tables live in the BIOS area below 1 MiB, where Linux also scans for
//! the RSDP; the Linux loader passes [`RSDP_ADDR`] in the zero page too.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Where the RSDP is written (the tables follow it).
pub const RSDP_ADDR: u64 = 0x000E_0000;
/// One past the last byte the tables may use.
pub const ACPI_END: u64 = 0x0010_0000;
/// Where the local APICs are (KVM's default APIC base).
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// Where KVM's in-kernel IOAPIC is.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;

const OEM_ID: &[u8; 6] = b"CASTOR";
const OEM_TABLE_ID: &[u8; 8] = b"CASTORVM";
const CREATOR_ID: &[u8; 4] = b"CSTR";

/// FADT flags: power and sleep buttons are control methods (none here), and
/// the platform is hardware-reduced (no fixed ACPI hardware).
const FADT_FLAGS: u32 = (1 << 4) | (1 << 5) | (1 << 20);
/// IA-PC boot architecture flags: no VGA, no MSI (no PCI bus), no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// A table: the standard 36-byte header followed by `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len() as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn fadt(dsdt: u64) -> Vec<u8> {
    // Body offsets are the FADT offsets minus the 36-byte header.
    let mut b = vec![0u8; 276 - 36];
    b[109 - 36..111 - 36].copy_from_slice(&IAPC_BOOT_ARCH.to_le_bytes());
    b[112 - 36..116 - 36].copy_from_slice(&FADT_FLAGS.to_le_bytes());
    b[131 - 36] = 5; // FADT minor version: ACPI 6.5
    b[140 - 36..148 - 36].copy_from_slice(&dsdt.to_le_bytes()); // X_DSDT
    table(b"FACP", 6, &b)
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s too
    for i in 0..vcpus {
        // Processor local APIC: UID and APIC ID are the vCPU index (KVM's
        // default APIC ID, also what CPUID reports); enabled.
        b.extend_from_slice(&[0, 8, i as u8, i as u8]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // The IOAPIC: ID after the vCPUs', GSIs from 0 (ISA IRQs map 1:1, as
    // KVM's default routing does, so no overrides).
    b.extend_from_slice(&[1, 12, vcpus as u8, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    table(b"APIC", 5, &b)
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes the tables for `vcpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMem, vcpus: u32) -> Result<u64, vm_memory::GuestMemoryError> {
    let dsdt_addr = align16(RSDP_ADDR + 36);
    let dsdt = table(b"DSDT", 2, &[]); // no devices described in AML
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align16(madt_addr + madt.len() as u64);
    let mut entries = Vec::new();
    for a in [fadt_addr, madt_addr] {
        entries.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt = table(b"XSDT", 1, &entries);
    debug_assert!(xsdt_addr + xsdt.len() as u64 <= ACPI_END);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, with an XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    for (addr, bytes) in [
        (RSDP_ADDR, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    /// Follows RSDP -> XSDT -> tables as a kernel does, checking every
    /// checksum, and returns the tables found (signature, bytes).
    fn walk(mem: &GuestMem) -> Vec<([u8; 4], Vec<u8>)> {
        let rsdp = read(mem, RSDP_ADDR, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let len = u32::from_le_bytes(read(mem, xsdt_addr + 4, 4).try_into().unwrap());
        let xsdt = read(mem, xsdt_addr, len as usize);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        xsdt[36..]
            .chunks(8)
            .map(|c| {
                let a = u64::from_le_bytes(c.try_into().unwrap());
                let len = u32::from_le_bytes(read(mem, a + 4, 4).try_into().unwrap());
                let t = read(mem, a, len as usize);
                assert!(sums_to_zero(&t), "checksum of {:?}", &t[..4]);
                assert!(a + len as u64 <= ACPI_END);
                (t[..4].try_into().unwrap(), t)
            })
            .collect()
    }

    #[test]
    fn tables_chain_checksum_and_describe_every_vcpu() {
        let mem = memory::create(64 << 20).unwrap();
        for vcpus in [1u32, 4, crate::state::MAX_VCPUS as u32] {
            assert_eq!(write(&mem, vcpus).unwrap(), RSDP_ADDR);
            let tables = walk(&mem);
            let sigs: Vec<&[u8; 4]> = tables.iter().map(|(s, _)| s).collect();
            assert_eq!(sigs, [b"FACP", b"APIC"]);
            let fadt = &tables[0].1;
            let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
            assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
            let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
            assert_eq!(read(&mem, dsdt, 4), b"DSDT");
            assert!(sums_to_zero(&read(&mem, dsdt, 36)));
            let madt = &tables[1].1;
            let (mut lapics, mut ioapics, mut off) = (Vec::new(), 0, 44);
            while off < madt.len() {
                match madt[off] {
                    0 => {
                        assert_eq!(madt[off + 4] & 1, 1, "enabled");
                        lapics.push(madt[off + 3] as u32);
                    }
                    1 => {
                        ioapics += 1;
                        let a = u32::from_le_bytes(madt[off + 4..off + 8].try_into().unwrap());
                        assert_eq!(a, IOAPIC_ADDR);
                    }
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += madt[off + 1] as usize;
            }
            assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }
}
