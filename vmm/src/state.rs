//! The one list of machine state castor saves, and its binary encoding.
//!
//! # What is saved
//!
//! | owner | items |
//! |---|---|
//! | each vCPU ([`VcpuState`]) | CPUID, MP state, regs, sregs, xsave, xcrs, debug registers, LAPIC, MSRs ([`crate::msr`]), vCPU events, TSC frequency |
//! | the VM ([`VmState`]) | PIC master, PIC slave, IOAPIC, PIT2, kvmclock |
//! | devices | the 8250 serial port's registers ([`SerialRegs`]), the console stream offset, the virtio-net device ([`crate::virtio_net::NetState`]: registers, features, queue addresses and ring positions), the virtio-blk device ([`crate::virtio_blk::BlkState`]: the same, and the disk's size; the disk's contents live in its image) |
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
//!  8     4   format version (little endian), currently 3
//! 12     4   reserved, 0
//! 16     8   payload length in bytes (at most MAX_PAYLOAD)
//! 24     4   CRC-32 (IEEE) of the payload
//! 28     4   reserved, 0
//! 32     ... payload: postcard encoding of MachineState
//! ```
//! Decoding checks, in order, the magic, the version, the length, the
//! checksum, the payload's structure and then the values' ranges; each failure
//! has its own [`StateError`] variant. While the payload is decoded, each list
//! is refused from its declared length if that is over its limit (the limits
//! [`MachineState::validate`] checks: the error is then
//! [`StateError::Invalid`]), before anything is allocated for it, and each
//! kvm struct must come with exactly its size in bytes.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// First bytes of an encoded machine state.
pub const MAGIC: [u8; 8] = *b"CASTORMS";
/// The format version this castor writes and reads.
pub const VERSION: u32 = 3;
/// Largest payload accepted (far above any real state: guards allocation).
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Most vCPUs a state may describe.
pub const MAX_VCPUS: usize = 64;
const MAX_CPUID: usize = 512;
const MAX_MSRS: usize = 2048;
const MAX_SERIAL_IN: usize = 64;
const HEADER: usize = 32;

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    #[serde(deserialize_with = "cpuid_entries")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI, ...
    #[serde(deserialize_with = "kvm_struct")]
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    #[serde(deserialize_with = "kvm_struct")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    #[serde(deserialize_with = "kvm_struct")]
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (the 4 KiB legacy area).
    #[serde(deserialize_with = "kvm_struct")]
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    #[serde(deserialize_with = "kvm_struct")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(deserialize_with = "kvm_struct")]
    pub debugregs: kvm_debugregs,
    /// Local APIC registers (timer included).
    #[serde(deserialize_with = "kvm_struct")]
    pub lapic: kvm_lapic_state,
    /// Serializable MSRs, sorted by index.
    #[serde(deserialize_with = "msr_entries")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    #[serde(deserialize_with = "kvm_struct")]
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// The VM-wide in-kernel devices.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// 8259 master.
    #[serde(deserialize_with = "kvm_struct")]
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    #[serde(deserialize_with = "kvm_struct")]
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    #[serde(deserialize_with = "kvm_struct")]
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    #[serde(deserialize_with = "kvm_struct")]
    pub pit: kvm_pit_state2,
    /// kvmclock.
    #[serde(deserialize_with = "kvm_struct")]
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
    #[serde(deserialize_with = "serial_input")]
    pub in_buffer: Vec<u8>,
}

/// Everything but RAM contents: enough, with RAM, to resume the guest.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM regions as (guest physical address, size in bytes).
    #[serde(deserialize_with = "memory_regions")]
    pub memory: Vec<(u64, u64)>,
    /// vCPUs, by index.
    #[serde(deserialize_with = "vcpu_list")]
    pub vcpus: Vec<VcpuState>,
    /// VM-wide devices.
    pub vm: VmState,
    /// The serial port.
    pub serial: SerialRegs,
    /// Offset in the console stream of the next byte the guest writes.
    pub console_offset: u64,
    /// The network card, if the machine has one.
    pub net: Option<crate::virtio_net::NetState>,
    /// The disk, if the machine has one (format version 3).
    pub disk: Option<crate::virtio_blk::BlkState>,
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

// Checks made while the payload is decoded, before anything is built from
// it: a list longer than its limit is refused from its declared length
// (before allocating: a few payload bytes can describe kilobytes of state),
// and a kvm struct must come with exactly its size in bytes (kvm-bindings
// would silently zero-pad or cut it). postcard drops the messages of such
// errors, so the refusal is kept here for `decode` to return.
thread_local! {
    static REFUSAL: std::cell::RefCell<Option<StateError>> = const { std::cell::RefCell::new(None) };
}

fn refuse<E: de::Error>(why: StateError) -> E {
    let e = E::custom(&why);
    REFUSAL.with(|r| *r.borrow_mut() = Some(why));
    e
}

struct BoundedVec<T> {
    max: usize,
    what: &'static str,
    elem: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let too_many = |n: usize| {
            refuse(StateError::Invalid(format!(
                "{n} {} ({} at most)",
                self.what, self.max
            )))
        };
        let declared = seq.size_hint().unwrap_or(0);
        if declared > self.max {
            return Err(too_many(declared));
        }
        let mut v = Vec::with_capacity(declared);
        while let Some(x) = seq.next_element()? {
            if v.len() == self.max {
                return Err(too_many(v.len() + 1));
            }
            v.push(x);
        }
        Ok(v)
    }
}

macro_rules! bounded_vec {
    ($name:ident, $max:expr, $what:literal) => {
        fn $name<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
            d.deserialize_seq(BoundedVec {
                max: $max,
                what: $what,
                elem: std::marker::PhantomData,
            })
        }
    };
}

bounded_vec!(memory_regions, 2, "memory regions");
bounded_vec!(vcpu_list, MAX_VCPUS, "vCPUs");
bounded_vec!(cpuid_entries, MAX_CPUID, "CPUID entries");
bounded_vec!(msr_entries, MAX_MSRS, "MSRs");
bounded_vec!(
    serial_input,
    MAX_SERIAL_IN,
    "bytes in the serial input buffer"
);

struct ExactBytes<T>(std::marker::PhantomData<T>);

impl<T: DeserializeOwned> Visitor<'_> for ExactBytes<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", std::mem::size_of::<T>())
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<T, E> {
        let want = std::mem::size_of::<T>();
        if b.len() != want {
            let name = std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("?");
            return Err(refuse(StateError::Malformed(format!(
                "{name} of {} bytes, expected {want}",
                b.len()
            ))));
        }
        T::deserialize(de::value::BytesDeserializer::<E>::new(b))
    }
}

/// A kvm-bindings struct, which must come with exactly its size in bytes.
fn kvm_struct<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    d.deserialize_bytes(ExactBytes(std::marker::PhantomData))
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
        REFUSAL.with(|r| r.borrow_mut().take());
        let (state, rest): (MachineState, _) = postcard::take_from_bytes(payload).map_err(|e| {
            REFUSAL
                .with(|r| r.borrow_mut().take())
                .unwrap_or_else(|| StateError::Malformed(e.to_string()))
        })?;
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
        let Some(size) = self.memory.iter().try_fold(0u64, |a, r| a.checked_add(r.1)) else {
            return bad(format!(
                "memory regions {:x?} add up to more than 2^64 bytes",
                self.memory
            ));
        };
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
            if v.msrs.len() > MAX_MSRS || v.cpuid.len() > MAX_CPUID {
                return bad(format!(
                    "vCPU {i}: {} MSRs, {} CPUID entries",
                    v.msrs.len(),
                    v.cpuid.len()
                ));
            }
        }
        if let Some(n) = &self.net {
            n.validate().map_err(StateError::Invalid)?;
        }
        if let Some(d) = &self.disk {
            d.validate().map_err(StateError::Invalid)?;
        }
        if self.serial.in_buffer.len() > MAX_SERIAL_IN {
            return bad(format!(
                "serial input buffer of {} bytes",
                self.serial.in_buffer.len()
            ));
        }
        Ok(())
    }

    /// Total guest RAM in bytes (saturating: [`MachineState::validate`]
    /// refuses region sizes whose sum overflows).
    pub fn memory_size(&self) -> u64 {
        self.memory.iter().fold(0, |a, r| a.saturating_add(r.1))
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
            net: Some(crate::virtio_net::NetState {
                status: 15,
                driver_features: 1 << 32,
                queues: [
                    crate::virtio_net::QueueRegs {
                        size: 16,
                        ready: true,
                        desc: 0x1000,
                        avail: 0x2000,
                        used: 0x3000,
                        next_avail: 7,
                        next_used: 5,
                    },
                    Default::default(),
                ],
                guest_ipv4: Some([10, 77, 0, 2]),
                ..crate::virtio_net::NetState::new([2, 0, 0, 0, 0, 1])
            }),
            disk: Some(crate::virtio_blk::BlkState {
                status: 15,
                driver_features: (1 << 32) | (1 << 9),
                queue: crate::virtio_net::QueueRegs {
                    size: 256,
                    ready: true,
                    desc: 0x4000,
                    avail: 0x5000,
                    used: 0x6000,
                    next_avail: 9,
                    next_used: 9,
                },
                interrupt_status: 1,
                ..crate::virtio_blk::BlkState::new(1 << 30)
            }),
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
        assert_eq!(d.net, s.net);
        assert_eq!(d.disk, s.disk);
        assert!(d.disk.is_some());
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

    /// A xorshift64 generator: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Iterations of the mutation tests: `CASTOR_STATE_FUZZ_ITERS`, or `default`.
    fn iterations(default: usize) -> usize {
        std::env::var("CASTOR_STATE_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Damages `payload` in one of several ways: overwritten bytes (random or
    /// boundary values), a planted large varint (postcard lengths and integers
    /// are varints), inserted or deleted bytes, truncation.
    fn mutate(payload: &mut Vec<u8>, rng: &mut Rng) {
        for _ in 0..=rng.below(4) {
            let pos = rng.below(payload.len());
            match rng.below(7) {
                0 | 1 => payload[pos] = rng.next() as u8,
                2 => payload[pos] = [0x00, 0x01, 0x7F, 0x80, 0xFF][rng.below(5)],
                3 => {
                    let v: &[u8] = match rng.below(4) {
                        0 => &[0xFF, 0xFF, 0xFF, 0xFF, 0x0F],
                        1 => &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
                        2 => &[
                            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
                        ],
                        _ => &[0x80, 0x80, 0x04],
                    };
                    let end = (pos + v.len()).min(payload.len());
                    payload[pos..end].copy_from_slice(&v[..end - pos]);
                }
                4 => {
                    let n = 1 + rng.below(16);
                    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    payload.splice(pos..pos, bytes);
                }
                5 => {
                    let end = (pos + 1 + rng.below(64)).min(payload.len());
                    payload.drain(pos..end);
                }
                _ => payload.truncate(pos),
            }
            if payload.is_empty() {
                return;
            }
        }
    }

    /// Frames `payload` with a correct header (length and CRC), as `encode` does.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + payload.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// Mutated payloads in a valid frame reach the payload decoder and the
    /// range checks; none may panic, and each is either refused with a
    /// reason or decodes to a state that passes `validate`.
    #[test]
    fn mutated_payloads_reach_the_decoder_and_never_panic() {
        let good = sample().encode();
        assert_eq!(frame(&good[HEADER..]), good, "frame() matches encode()");
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let (mut ok, mut malformed, mut invalid) = (0usize, 0usize, 0usize);
        for _ in 0..iterations(20_000) {
            let mut payload = good[HEADER..].to_vec();
            mutate(&mut payload, &mut rng);
            match MachineState::decode(&frame(&payload)) {
                Ok(s) => {
                    s.validate().expect("decode returns only valid states");
                    ok += 1;
                }
                Err(StateError::Malformed(m)) => {
                    assert!(!m.is_empty());
                    malformed += 1;
                }
                Err(StateError::Invalid(m)) => {
                    assert!(!m.is_empty());
                    invalid += 1;
                }
                Err(e) => panic!("a valid frame was refused by the frame checks: {e}"),
            }
        }
        eprintln!("mutated payloads: {ok} decoded, {malformed} malformed, {invalid} invalid");
        assert!(malformed > 0 && ok + invalid > 0, "the decoder was reached");
    }

    /// The same mutations without fixing the header: the frame checks refuse
    /// them (length, then CRC) before the payload decoder sees a byte.
    #[test]
    fn mutated_payloads_without_a_new_crc_are_refused_by_the_frame() {
        let good = sample().encode();
        let mut rng = Rng(0x0fed_cba9_8765_4321);
        for _ in 0..iterations(20_000) / 4 {
            let mut payload = good[HEADER..].to_vec();
            mutate(&mut payload, &mut rng);
            if payload == good[HEADER..] {
                continue;
            }
            let mut b = good[..HEADER].to_vec();
            b.extend_from_slice(&payload);
            match MachineState::decode(&b) {
                Err(StateError::BadChecksum { .. }) => {
                    assert_eq!(payload.len(), good.len() - HEADER)
                }
                Err(StateError::LengthMismatch { .. }) => {
                    assert_ne!(payload.len(), good.len() - HEADER)
                }
                other => panic!("damage not caught by the frame: {other:?}"),
            }
        }
    }

    /// Arbitrary bytes, and damaged headers, never panic either.
    #[test]
    fn random_bytes_never_panic() {
        let good = sample().encode();
        let mut rng = Rng(0x1234_5678_9abc_def0);
        for i in 0..iterations(20_000) / 4 {
            let mut b = good.clone();
            for _ in 0..(i % 8 + 1) {
                let pos = rng.below(b.len());
                b[pos] = rng.next() as u8;
            }
            let cut = if i % 3 == 0 {
                rng.below(b.len())
            } else {
                b.len()
            };
            let _ = MachineState::decode(&b[..cut]);
            let n = rng.below(256);
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let _ = MachineState::decode(&noise);
            let _ = MachineState::decode(&frame(&noise));
        }
    }

    /// A hand-made payload: `vcpus` vCPUs and the VM with every kvm struct
    /// given as `kvm_len` bytes (0xAA), no CPUID entries or MSRs.
    fn handmade(vcpus: usize, kvm_len: usize) -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push(v as u8 | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        let kvm = |out: &mut Vec<u8>| {
            varint(out, kvm_len as u64);
            out.extend(std::iter::repeat_n(0xAA, kvm_len));
        };
        let mut p = Vec::new();
        varint(&mut p, 1); // memory: one region
        varint(&mut p, 0);
        varint(&mut p, 64 << 20);
        varint(&mut p, vcpus as u64);
        for _ in 0..vcpus {
            varint(&mut p, 0); // cpuid
            for _ in 0..7 {
                kvm(&mut p); // mp_state, regs, sregs, xsave, xcrs, debugregs, lapic
            }
            varint(&mut p, 0); // msrs
            kvm(&mut p); // events
            varint(&mut p, 2_600_000); // tsc_khz
        }
        for _ in 0..5 {
            kvm(&mut p); // pic master, pic slave, ioapic, pit, clock
        }
        p.extend_from_slice(&[0; 9]); // serial registers
        varint(&mut p, 0); // serial input buffer
        varint(&mut p, 0); // console offset
        p
    }

    #[test]
    fn region_sizes_that_overflow_are_refused() {
        let mut s = sample();
        s.memory = vec![(0, u64::MAX / 2 + 1), (HIGH, u64::MAX / 2 + 1)];
        assert!(matches!(
            MachineState::decode(&s.encode()),
            Err(StateError::Invalid(_))
        ));
        assert_eq!(s.memory_size(), u64::MAX);
    }
    const HIGH: u64 = crate::memory::HIGH_RAM_START;

    #[test]
    fn counts_over_the_limits_are_refused_before_allocating() {
        // 1 MiB of payload that claims 100 000 vCPUs: ~11 bytes each, but
        // ~6 KiB each once decoded; refused at the count.
        let p = handmade(100_000, 0);
        assert!(p.len() < 2 << 20);
        let e = MachineState::decode(&frame(&p)).unwrap_err();
        // Refused by the decoder from the declared count, not by `validate`
        // after decoding ("(1..=64 supported)").
        assert_eq!(
            e,
            StateError::Invalid("100000 vCPUs (64 at most)".into()),
            "{e}"
        );
        // A declared count within the limit, but more elements than that.
        let mut p = handmade(65, 0);
        p[3] = 1; // the vCPU count varint (65 is one byte): claims 1
        assert!(MachineState::decode(&frame(&p)).is_err());
    }

    #[test]
    fn kvm_structs_of_the_wrong_size_are_refused() {
        // Empty and over-long byte strings where a kvm struct belongs.
        assert_eq!(
            MachineState::decode(&frame(&handmade(1, 0))).unwrap_err(),
            StateError::Malformed("kvm_mp_state of 0 bytes, expected 4".into())
        );
        assert_eq!(
            MachineState::decode(&frame(&handmade(1, 5000))).unwrap_err(),
            StateError::Malformed("kvm_mp_state of 5000 bytes, expected 4".into())
        );
    }
}
