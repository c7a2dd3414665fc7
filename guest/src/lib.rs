//! castor's own guest: a small multiboot v1 kernel (freestanding C and
//! assembly under `c/`, built from source by `build.rs`) whose workloads run in
//! 64-bit ring 3, where kvm_pvm runs guest code at native speed.
//!
//! This crate carries the kernel image ([`KERNEL`]) and the description of the
//! workloads it runs ([`Workload`]): names, parameters, their defaults and
//! limits, and how they become the kernel command line. Parsing and validation
//! live here so that a bad workload parameter is refused by castor with a clear
//! message before a VM is created.
#![forbid(unsafe_code)]

use std::fmt;

/// The guest kernel: an ELF32 multiboot v1 image (64-bit code inside).
pub static KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/castor-guest.elf"));

/// `EAX` value castor gives application processors at the kernel entry
/// (castor's extension to multiboot; `EBX` holds the vCPU index).
pub const AP_MAGIC: u32 = 0x4353_5452;

/// Most vCPUs the guest kernel supports.
pub const MAX_CPUS: u32 = 16;

/// The workloads the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A progress line every `interval_ms` (10 ms by default), nothing else.
    Counter,
    /// Random 8-byte writes over `mib` MiB at `rate` writes/s (FGBI's best case).
    Sparse,
    /// Whole 4 KiB pages rewritten with fresh random data at `rate` pages/s (its worst case).
    Pages,
    /// A hash table of 64-byte records updated with Zipf(s=1) keys at `rate` updates/s.
    Kv,
    /// Sequential appends of `record`-byte records through a ring at `rate` records/s.
    Log,
    /// A self-checksummed area: each operation checks one 4 KiB block and rewrites it.
    Verify,
    /// A key-value service over UDP on the virtio-net card (vCPU 0; PUT and
    /// GET with request ids, replies sent after the update is in memory);
    /// `mib` MiB for the rings and the table, address `ip`, UDP `port`.
    Net,
    /// The `net` service made durable: every applied PUT is appended to a
    /// log on the virtio-blk disk and flushed before its reply (group commit
    /// per poll round); the log is replayed at boot. Same parameters and
    /// protocol as `net`; needs a disk (`--disk`) of at least
    /// [`KVDISK_MIN_BYTES`]. A PUT that finds the log full is answered with
    /// status 3 (log full) and not applied.
    KvDisk,
}

impl Kind {
    /// All workloads, in the order `--help` lists them.
    pub const ALL: [Kind; 8] = [
        Kind::Counter,
        Kind::Sparse,
        Kind::Pages,
        Kind::Kv,
        Kind::Log,
        Kind::Verify,
        Kind::Net,
        Kind::KvDisk,
    ];

    /// The workload's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Sparse => "sparse",
            Kind::Pages => "pages",
            Kind::Kv => "kv",
            Kind::Log => "log",
            Kind::Verify => "verify",
            Kind::Net => "net",
            Kind::KvDisk => "kvdisk",
        }
    }

    /// Parameters this workload accepts besides `interval_ms`, `seed` and `irq`.
    fn params(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &[],
            Kind::Log => &["rate", "mib", "record"],
            Kind::Net | Kind::KvDisk => &["mib", "ip", "port"],
            _ => &["rate", "mib"],
        }
    }
}

/// A workload with its parameters, as given by `--workload NAME[,key=value...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Which workload.
    pub kind: Kind,
    /// Target operations per second per vCPU (0: as fast as possible); `None`: the guest's default.
    pub rate: Option<u64>,
    /// Working set per vCPU in MiB; `None`: the guest's default.
    pub mib: Option<u64>,
    /// Period of the progress lines in milliseconds.
    pub interval_ms: Option<u64>,
    /// `log` record size in bytes (16..=4096, a multiple of 8).
    pub record: Option<u64>,
    /// Seed of the workload's random choices.
    pub seed: Option<u64>,
    /// Interrupt-driven mode: the counter runs in ring 0 on the local APIC timer.
    pub irq: bool,
    /// `net`: the guest's IPv4 address (default [`DEFAULT_IP`]).
    pub ip: Option<[u8; 4]>,
    /// `net`: the service's UDP port (default [`DEFAULT_PORT`]).
    pub port: Option<u16>,
}

/// Guest-physical address of the virtio-net card's window, as castor's VMM
/// places it (`vmm::virtio_net::NET_MMIO_BASE`; a vmm test checks they agree).
pub const NET_MMIO_BASE: u64 = 0xFEB0_1000;
/// Guest-physical address of the virtio-blk disk's window
/// (`vmm::virtio_blk::BLK_MMIO_BASE`; a vmm test checks they agree).
pub const BLK_MMIO_BASE: u64 = 0xFEB0_2000;
/// The smallest disk the `kvdisk` workload accepts (its log: 64-byte
/// records, 64 per 4 KiB block).
pub const KVDISK_MIN_BYTES: u64 = 1 << 20;
/// The `net` workload's address unless `ip=` says otherwise.
pub const DEFAULT_IP: [u8; 4] = [10, 77, 0, 2];
/// The `net` workload's UDP port unless `port=` says otherwise.
pub const DEFAULT_PORT: u16 = 7000;

/// Why a `--workload` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// The workload name is not one of ours.
    #[error(
        "unknown workload '{0}' (choose one of: counter, sparse, pages, kv, log, verify, net, kvdisk)"
    )]
    UnknownWorkload(String),
    /// A parameter this workload does not take.
    #[error("workload '{workload}' has no parameter '{param}' (it takes: {accepted})")]
    UnknownParam {
        /// The workload.
        workload: &'static str,
        /// The parameter given.
        param: String,
        /// What it accepts.
        accepted: String,
    },
    /// A parameter whose value is not a number in range.
    #[error("bad value '{value}' for '{param}': {why}")]
    BadValue {
        /// The parameter.
        param: String,
        /// Its value.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// `irq` on a workload other than `counter`.
    #[error("irq=1 (the interrupt-driven mode) is only for the counter workload")]
    IrqNotCounter,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            kind: Kind::Counter,
            rate: None,
            mib: None,
            interval_ms: None,
            record: None,
            seed: None,
            irq: false,
            ip: None,
            port: None,
        }
    }
}

impl Workload {
    /// Parses `NAME[,key=value...]`, e.g. `sparse,rate=200000,mib=256`.
    pub fn parse(spec: &str) -> Result<Self, WorkloadError> {
        let mut parts = spec.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| WorkloadError::UnknownWorkload(name.to_string()))?;
        let mut w = Workload {
            kind,
            ..Workload::default()
        };
        for part in parts.filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| WorkloadError::BadValue {
                    param: part.to_string(),
                    value: String::new(),
                    why: "expected key=value",
                })?;
            let num = |why| {
                value.parse::<u64>().map_err(|_| WorkloadError::BadValue {
                    param: key.to_string(),
                    value: value.to_string(),
                    why,
                })
            };
            let common = ["interval_ms", "seed", "irq"];
            if !kind.params().contains(&key) && !common.contains(&key) {
                let mut accepted: Vec<&str> = kind.params().to_vec();
                accepted.extend(common);
                return Err(WorkloadError::UnknownParam {
                    workload: kind.name(),
                    param: key.to_string(),
                    accepted: accepted.join(", "),
                });
            }
            match key {
                "rate" => w.rate = Some(num("expected operations per second, 0 for unlimited")?),
                "mib" => {
                    let v = num("expected MiB per vCPU, at least 1")?;
                    if v == 0 {
                        return Err(WorkloadError::BadValue {
                            param: key.into(),
                            value: value.into(),
                            why: "expected MiB per vCPU, at least 1",
                        });
                    }
                    w.mib = Some(v);
                }
                "interval_ms" => {
                    let v = num("expected milliseconds, 1..=60000")?;
                    if !(1..=60_000).contains(&v) {
                        return Err(WorkloadError::BadValue {
                            param: key.into(),
                            value: value.into(),
                            why: "expected milliseconds, 1..=60000",
                        });
                    }
                    w.interval_ms = Some(v);
                }
                "record" => {
                    let v = num("expected bytes, 16..=4096, a multiple of 8")?;
                    if !(16..=4096).contains(&v) || v % 8 != 0 {
                        return Err(WorkloadError::BadValue {
                            param: key.into(),
                            value: value.into(),
                            why: "expected bytes, 16..=4096, a multiple of 8",
                        });
                    }
                    w.record = Some(v);
                }
                "seed" => w.seed = Some(num("expected a number")?),
                "ip" => {
                    let ip: std::net::Ipv4Addr =
                        value.parse().map_err(|_| WorkloadError::BadValue {
                            param: key.into(),
                            value: value.into(),
                            why: "expected an IPv4 address such as 10.77.0.2",
                        })?;
                    w.ip = Some(ip.octets());
                }
                "port" => {
                    let v = num("expected a UDP port, 1..=65535")?;
                    if !(1..=65535).contains(&v) {
                        return Err(WorkloadError::BadValue {
                            param: key.into(),
                            value: value.into(),
                            why: "expected a UDP port, 1..=65535",
                        });
                    }
                    w.port = Some(v as u16);
                }
                "irq" => w.irq = num("expected 0 or 1")? != 0,
                _ => unreachable!("checked against the accepted list above"),
            }
        }
        if w.irq && kind != Kind::Counter {
            return Err(WorkloadError::IrqNotCounter);
        }
        Ok(w)
    }

    /// Working set per vCPU in MiB as the guest will use it (its default if unset).
    pub fn mib_per_vcpu(&self) -> u64 {
        self.mib.unwrap_or(match self.kind {
            Kind::Counter => 0,
            Kind::Log | Kind::Verify | Kind::Net | Kind::KvDisk => 16,
            _ => 64,
        })
    }

    /// The kernel command line for this workload on `vcpus` vCPUs with a TSC
    /// of `tsc_khz`; `mmio_console` is the guest-physical address of the VMM's
    /// console window for ring-3 output, if it has one.
    pub fn cmdline(&self, vcpus: u32, tsc_khz: u32, mmio_console: Option<u64>) -> String {
        let mut s = format!(
            "castor-guest workload={} cpus={vcpus} tsc_khz={tsc_khz}",
            self.kind.name()
        );
        if let Some(a) = mmio_console {
            s.push_str(&format!(" mmio_console={a}"));
        }
        let opt = [
            ("rate", self.rate),
            ("mib", self.mib),
            ("interval_ms", self.interval_ms),
            ("record", self.record),
            ("seed", self.seed),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                s.push_str(&format!(" {k}={v}"));
            }
        }
        if self.irq {
            s.push_str(" irq=1");
        }
        if matches!(self.kind, Kind::Net | Kind::KvDisk) {
            let ip = self.ip.unwrap_or(DEFAULT_IP);
            s.push_str(&format!(
                " net_mmio={NET_MMIO_BASE} ip={} port={}",
                u32::from_le_bytes(ip),
                self.port.unwrap_or(DEFAULT_PORT)
            ));
        }
        if self.kind == Kind::KvDisk {
            s.push_str(&format!(" blk_mmio={BLK_MMIO_BASE}"));
        }
        s
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        for (k, v) in [
            ("rate", self.rate),
            ("mib", self.mib),
            ("interval_ms", self.interval_ms),
            ("record", self.record),
            ("seed", self.seed),
        ] {
            if let Some(v) = v {
                write!(f, ",{k}={v}")?;
            }
        }
        if self.irq {
            f.write_str(",irq=1")?;
        }
        if let Some(ip) = self.ip {
            write!(f, ",ip={}", std::net::Ipv4Addr::from(ip))?;
        }
        if let Some(p) = self.port {
            write!(f, ",port={p}")?;
        }
        Ok(())
    }
}

/// One progress line of the guest, `cpu=C seq=S t_us=T ops=N ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// vCPU index.
    pub cpu: u32,
    /// Line number on that vCPU, starting at 1, up by exactly one per line.
    pub seq: u64,
    /// Microseconds since the workload started (by the guest's TSC).
    pub t_us: u64,
    /// Operations done so far on that vCPU.
    pub ops: u64,
}

impl Progress {
    /// Parses a progress line; `None` for any other line (banner, errors, partial lines).
    pub fn parse(line: &str) -> Option<Progress> {
        let mut cpu = None;
        let mut seq = None;
        let mut t_us = None;
        let mut ops = None;
        for tok in line.split_ascii_whitespace() {
            let (k, v) = tok.split_once('=')?;
            match k {
                "cpu" => cpu = v.parse().ok(),
                "seq" => seq = v.parse().ok(),
                "t_us" => t_us = v.parse().ok(),
                "ops" => ops = v.parse().ok(),
                _ => {}
            }
        }
        Some(Progress {
            cpu: cpu?,
            seq: seq?,
            t_us: t_us?,
            ops: ops?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_an_elf32_with_a_multiboot_header() {
        assert_eq!(&KERNEL[..4], b"\x7fELF");
        assert_eq!(KERNEL[4], 1, "ELFCLASS32 for multiboot loaders");
        let found = KERNEL[..KERNEL.len().min(8192 + 4096)]
            .windows(4)
            .any(|w| w == 0x1BAD_B002u32.to_le_bytes());
        assert!(found, "multiboot magic in the first 8 KiB of the file");
    }

    #[test]
    fn parses_workload_specs() {
        let w = Workload::parse("sparse,rate=200000,mib=256").unwrap();
        assert_eq!(w.kind, Kind::Sparse);
        assert_eq!(w.rate, Some(200_000));
        assert_eq!(w.mib, Some(256));
        assert_eq!(w.to_string(), "sparse,rate=200000,mib=256");
        assert_eq!(
            w.cmdline(2, 2_600_000, None),
            "castor-guest workload=sparse cpus=2 tsc_khz=2600000 rate=200000 mib=256"
        );
        assert!(w.cmdline(1, 1, Some(4096)).contains(" mmio_console=4096"));
        assert!(Workload::parse("counter,irq=1").unwrap().irq);
        let k = Workload::parse("kvdisk,port=7001").unwrap();
        assert_eq!(k.kind, Kind::KvDisk);
        let c = k.cmdline(1, 1, None);
        assert!(c.contains(" net_mmio=") && c.contains(" port=7001"), "{c}");
        assert!(c.ends_with(&format!(" blk_mmio={BLK_MMIO_BASE}")), "{c}");
        assert_eq!(Workload::parse("log,record=64").unwrap().record, Some(64));
    }

    #[test]
    fn refuses_bad_specs_with_reasons() {
        assert!(matches!(
            Workload::parse("spars"),
            Err(WorkloadError::UnknownWorkload(_))
        ));
        let e = Workload::parse("counter,rate=5").unwrap_err();
        assert!(e.to_string().contains("no parameter 'rate'"), "{e}");
        let e = Workload::parse("sparse,rate=fast").unwrap_err();
        assert!(e.to_string().contains("bad value 'fast' for 'rate'"), "{e}");
        assert!(Workload::parse("sparse,mib=0").is_err());
        assert!(Workload::parse("log,record=12").is_err());
        assert!(Workload::parse("sparse,rate").is_err());
        assert_eq!(
            Workload::parse("kv,irq=1"),
            Err(WorkloadError::IrqNotCounter)
        );
    }

    #[test]
    fn parses_progress_lines() {
        let p = Progress::parse("cpu=1 seq=42 t_us=420000 ops=42 mode=irq").unwrap();
        assert_eq!((p.cpu, p.seq, p.t_us, p.ops), (1, 42, 420_000, 42));
        assert!(Progress::parse("castor-guest: workload=counter cpus=2").is_none());
        assert!(Progress::parse("cpu=1 seq=4").is_none());
    }
}
