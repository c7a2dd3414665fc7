//! The one list of machine state castor saves, and its binary encoding.
//!
//! # What is saved
//!
//! | owner | items |
//! |---|---|
//! | each vCPU ([`VcpuState`]) | CPUID, MP state, regs, sregs, xsave, xcrs, debug registers, LAPIC, MSRs ([`crate::msr`]), vCPU events, TSC frequency |
//! | the VM ([`VmState`]) | PIC master, PIC slave, IOAPIC, PIT2, kvmclock |
//! | devices | the 8250 serial port's registers ([`SerialRegs`]), the console stream offset |
//! | memory layout | the guest RAM regions (their contents travel separately) |
//!
//! # Order
//!
//! Save, per vCPU (on the vCPU's own thread, after a `KVM_RUN` that returned
//! `EINTR`, never right after an I/O exit, whose completion is still pending):
//! MP state first (reading it can change the LAPIC), then regs, sregs, xsave,
//! xcrs, debugregs, LAPIC, MSRs, TSC frequency, CPUID, and vCPU events last.
//!
//! Restore, into a fresh VM: the VM first — irqchip (PIC master, PIC slave,
//! IOAPIC), PIT2, kvmclock (flags 0) — then per vCPU: CPUID, TSC frequency, MP
//! state, regs, sregs (carries EFER and the APIC base, so before the LAPIC),
//! xsave, xcrs, debugregs, LAPIC, MSRs (sorted: `IA32_TSC` before
//! `IA32_TSC_DEADLINE`), vCPU events, then `KVMCLOCK_CTRL` (its error ignored).
//!
//! # Encoding
//!
//! ```text
//! offset size
//!  0     8   magic "CASTORMS"
//!  8     4   format version (little endian), currently 1
//! 12     4   reserved, 0
//! 16     8   payload length in bytes (at most MAX_PAYLOAD)
//! 24     4   CRC-32 (IEEE) of the payload
//! 28     4   reserved, 0
//! 32     ... payload: postcard encoding of MachineState
//! ```
//! Decoding checks, in order, the magic, the version, the length, the
//! checksum, the payload's structure and then the values' ranges; each failure
//! has its own [`StateError`] variant.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// First bytes of an encoded machine state.
pub const MAGIC: [u8; 8] = *b"CASTORMS";
/// The format version this castor writes and reads.
pub const VERSION: u32 = 1;
/// Largest payload accepted (far above any real state: guards allocation).
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Most vCPUs a state may describe.
pub const MAX_VCPUS: usize = 64;
const HEADER: usize = 32;

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (the 4 KiB legacy area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers (timer included).
    pub lapic: kvm_lapic_state,
    /// Serializable MSRs, sorted by index.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// The VM-wide in-kernel devices.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// 8259 master.
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// The 8250 UART's registers (vm-superio's `SerialState`, with a stable layout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most 64).
    pub in_buffer: Vec<u8>,
}

/// Everything but RAM contents: enough, with RAM, to resume the guest.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM regions as (guest physical address, size in bytes).
    pub memory: Vec<(u64, u64)>,
    /// vCPUs, by index.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide devices.
    pub vm: VmState,
    /// The serial port.
    pub serial: SerialRegs,
    /// Offset in the console stream of the next byte the guest writes.
    pub console_offset: u64,
}

/// Why an encoded machine state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than the header.
    #[error("machine state truncated: {0} bytes, the header alone is 32")]
    TruncatedHeader(usize),
    /// Wrong magic.
    #[error("not a castor machine state (bad magic)")]
    BadMagic,
    /// A version this castor does not read.
    #[error(
        "machine state format version {0} is not supported (this castor reads version {VERSION})"
    )]
    UnsupportedVersion(u32),
    /// Payload larger than the limit.
    #[error("machine state payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    /// Fewer or more bytes than the header says.
    #[error(
        "machine state truncated or padded: header says {expected} payload bytes, found {found}"
    )]
    LengthMismatch {
        /// From the header.
        expected: u64,
        /// Present.
        found: u64,
    },
    /// Checksum mismatch.
    #[error("machine state is corrupt: checksum {found:#010x} does not match {expected:#010x}")]
    BadChecksum {
        /// From the header.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The payload does not decode.
    #[error("machine state payload is malformed: {0}")]
    Malformed(String),
    /// Values out of range.
    #[error("machine state is inconsistent: {0}")]
    Invalid(String),
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus.len())
            .field(
                "rips",
                &self.vcpus.iter().map(|v| v.regs.rip).collect::<Vec<_>>(),
            )
            .field("serial", &self.serial)
            .field("console_offset", &self.console_offset)
            .finish_non_exhaustive()
    }
}

impl MachineState {
    /// Encodes with header and checksum.
    pub fn encode(&self) -> Vec<u8> {
        let payload = postcard::to_allocvec(self).expect("serializing plain data cannot fail");
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes and validates; never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < HEADER {
            return Err(StateError::TruncatedHeader(bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let le32 = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let version = le32(8);
        if version != VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if len > MAX_PAYLOAD {
            return Err(StateError::TooLarge(len));
        }
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != len {
            return Err(StateError::LengthMismatch {
                expected: len,
                found: payload.len() as u64,
            });
        }
        let expected = le32(24);
        let found = crc32fast::hash(payload);
        if expected != found {
            return Err(StateError::BadChecksum { expected, found });
        }
        let (state, rest): (MachineState, _) =
            postcard::take_from_bytes(payload).map_err(|e| StateError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(StateError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        state.validate()?;
        Ok(state)
    }

    /// Checks ranges a restore relies on.
    pub fn validate(&self) -> Result<(), StateError> {
        let bad = |s: String| Err(StateError::Invalid(s));
        if self.vcpus.is_empty() || self.vcpus.len() > MAX_VCPUS {
            return bad(format!(
                "{} vCPUs (1..={MAX_VCPUS} supported)",
                self.vcpus.len()
            ));
        }
        if self.memory.is_empty() || self.memory.len() > 2 {
            return bad(format!("{} memory regions", self.memory.len()));
        }
        let size: u64 = self.memory.iter().map(|r| r.1).sum();
        match crate::memory::layout(size) {
            Ok(l)
                if l.iter()
                    .map(|(a, s)| (a.0, *s as u64))
                    .eq(self.memory.iter().copied()) => {}
            _ => {
                return bad(format!(
                    "memory regions {:x?} are not castor's layout",
                    self.memory
                ))
            }
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.msrs.len() > 2048 || v.cpuid.len() > 512 {
                return bad(format!(
                    "vCPU {i}: {} MSRs, {} CPUID entries",
                    v.msrs.len(),
                    v.cpuid.len()
                ));
            }
        }
        if self.serial.in_buffer.len() > 64 {
            return bad(format!(
                "serial input buffer of {} bytes",
                self.serial.in_buffer.len()
            ));
        }
        Ok(())
    }

    /// Total guest RAM in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory.iter().map(|r| r.1).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state with recognisable values in every item.
    pub(crate) fn sample() -> MachineState {
        MachineState {
            memory: vec![(0, 64 << 20)],
            vcpus: vec![sample_vcpu(), sample_vcpu()],
            vm: sample_vm(),
            serial: SerialRegs {
                line_control: 3,
                in_buffer: vec![1, 2],
                ..Default::default()
            },
            console_offset: 4242,
        }
    }

    fn sample_vcpu() -> VcpuState {
        let mut v = VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0x1234,
                rax: 7,
                rflags: 2,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x80050033,
                efer: 0x500,
                apic_base: 0xfee00900,
                ..Default::default()
            },
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            },
            debugregs: kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            },
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
            tsc_khz: 2_600_000,
        };
        v.xsave.region[5] = 0xabcd;
        v.lapic.regs[0x20] = 5;
        v.events.nmi.pending = 1;
        v
    }

    fn sample_vm() -> VmState {
        let mut pic = kvm_irqchip {
            chip_id: 0,
            ..Default::default()
        };
        // SAFETY: writing a plain byte array member of a C union we own.
        unsafe { pic.chip.dummy[3] = 9 };
        VmState {
            pic_master: pic,
            pic_slave: kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            },
            ioapic: kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            },
            pit: kvm_pit_state2 {
                flags: 1,
                ..Default::default()
            },
            clock: kvm_clock_data {
                clock: 123456,
                ..Default::default()
            },
        }
    }

    #[test]
    fn every_item_round_trips() {
        let s = sample();
        let bytes = s.encode();
        let d = MachineState::decode(&bytes).unwrap();
        assert_eq!(d.encode(), bytes, "re-encoding is byte-identical");
        assert_eq!(d.vcpus.len(), 2);
        let v = &d.vcpus[1];
        assert_eq!(v.cpuid[0].eax, 0x806f8);
        assert_eq!(v.mp_state.mp_state, 3);
        assert_eq!(v.regs.rip, 0x1234);
        assert_eq!(v.sregs.apic_base, 0xfee00900);
        assert_eq!(v.xsave.region[5], 0xabcd);
        assert_eq!(v.xcrs.nr_xcrs, 1);
        assert_eq!(v.debugregs.dr7, 0x400);
        assert_eq!(v.lapic.regs[0x20], 5);
        assert_eq!(v.msrs[0].data, 99);
        assert_eq!(v.events.nmi.pending, 1);
        assert_eq!(v.tsc_khz, 2_600_000);
        // SAFETY: reading a plain byte array member of a C union.
        assert_eq!(unsafe { d.vm.pic_master.chip.dummy[3] }, 9);
        assert_eq!(d.vm.ioapic.chip_id, 2);
        assert_eq!(d.vm.pit.flags, 1);
        assert_eq!(d.vm.clock.clock, 123456);
        assert_eq!(d.serial, s.serial);
        assert_eq!(d.console_offset, 4242);
    }

    #[test]
    fn refuses_damaged_encodings_with_the_reason() {
        let good = sample().encode();
        assert_eq!(
            MachineState::decode(&good[..10]).unwrap_err(),
            StateError::TruncatedHeader(10)
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(MachineState::decode(&b).unwrap_err(), StateError::BadMagic);
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(
            MachineState::decode(&b).unwrap_err(),
            StateError::UnsupportedVersion(9)
        );
        assert!(matches!(
            MachineState::decode(&good[..good.len() - 1]).unwrap_err(),
            StateError::LengthMismatch { .. }
        ));
        let mut b = good.clone();
        let n = b.len();
        b[n - 100] ^= 0x40;
        assert!(matches!(
            MachineState::decode(&b).unwrap_err(),
            StateError::BadChecksum { .. }
        ));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            MachineState::decode(&b).unwrap_err(),
            StateError::TooLarge(_)
        ));
        // A valid frame around a payload that is not a state.
        let payload = vec![0xFFu8; 40];
        let mut b = good[..32].to_vec();
        b[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        b[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        assert!(matches!(
            MachineState::decode(&b).unwrap_err(),
            StateError::Malformed(_)
        ));
        // Well-formed but inconsistent.
        let mut s = sample();
        s.memory = vec![(0, 12345)];
        assert!(matches!(
            MachineState::decode(&s.encode()).unwrap_err(),
            StateError::Invalid(_)
        ));
        let mut s = sample();
        s.vcpus.clear();
        assert!(matches!(
            MachineState::decode(&s.encode()).unwrap_err(),
            StateError::Invalid(_)
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let good = sample().encode();
        let mut x = 0x1234_5678_9abc_def0u64;
        for i in 0..2000 {
            let mut b = good.clone();
            for _ in 0..(i % 8 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pos = (x as usize) % b.len();
                b[pos] = (x >> 32) as u8;
            }
            let cut = if i % 3 == 0 {
                (x as usize >> 8) % b.len()
            } else {
                b.len()
            };
            let _ = MachineState::decode(&b[..cut]);
        }
    }
}
