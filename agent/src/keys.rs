//! The fleet's keys in etcd and what they hold: desired state written by
//! operators (`castor vm create`, `castor host drain`), membership written
//! by the agents under their leases, the placement written by the leader,
//! and the witness's owners (`/castor/vm/NAME`, [`witness::Etcd`]).
//!
//! | key | holds | written by |
//! |---|---|---|
//! | `/castor/fleet/vms/NAME` | [`VmSpec`] | `castor vm create` (create-only), `vm delete` (at its revision) |
//! | `/castor/fleet/slots/N` | the VM holding port slot N | `castor vm create` (create-only) |
//! | `/castor/fleet/hosts/HOST` | [`HostRecord`], under the agent's lease | the host's agent |
//! | `/castor/fleet/drain/HOST` | `drained` | `castor host drain` / `undrain` |
//! | `/castor/fleet/leader` | the leader agent's name, under its lease | the agent that creates it first |
//! | `/castor/fleet/placement/NAME` | [`node::fleet::Assignment`] | the leader (compare-and-swap) |
//! | `/castor/fleet/reports/NAME` | [`Report`], under the agent's lease | the agent running the VM's primary |
//! | `/castor/vm/NAME` | owner and fencing token | the daemons ([`witness::Etcd::claim`]) |
//!
//! Everything is read in one request ([`FleetView::read`]: the range of
//! `/castor/`), so an agent's traffic is a constant per tick whatever its
//! number of VMs, and nothing is written per epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use node::fleet::{Assignment, HostView, VmView};
use serde::{Deserialize, Serialize};
use witness::store::{Kv, Store};
use witness::WitnessError;

/// Every castor key is under this prefix.
pub const ROOT: &str = "/castor/";
/// The fleet's keys.
pub const FLEET: &str = "/castor/fleet/";
/// The witness's owner keys.
pub const OWNERS: &str = "/castor/vm/";

/// A VM's desired-state key.
pub fn vm_key(vm: &str) -> String {
    format!("{FLEET}vms/{vm}")
}
/// A port slot's key.
pub fn slot_key(slot: u32) -> String {
    format!("{FLEET}slots/{slot}")
}
/// A host's membership key.
pub fn host_key(host: &str) -> String {
    format!("{FLEET}hosts/{host}")
}
/// A host's drain mark.
pub fn drain_key(host: &str) -> String {
    format!("{FLEET}drain/{host}")
}
/// The leader's key.
pub fn leader_key() -> String {
    format!("{FLEET}leader")
}
/// A VM's placement.
pub fn placement_key(vm: &str) -> String {
    format!("{FLEET}placement/{vm}")
}
/// A VM's report.
pub fn report_key(vm: &str) -> String {
    format!("{FLEET}reports/{vm}")
}
/// A VM's owner key at the witness.
pub fn owner_key(vm: &str) -> String {
    format!("{OWNERS}{vm}")
}

/// Whether `name` may name a VM or a host: a DNS label (it becomes a key,
/// a certificate's name and a file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A VM as asked for (`castor vm create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Its name: its key at the witness, its files' names.
    pub name: String,
    /// Its port slot: every host serves its roles of this VM on the ports
    /// [`ports`] derives from it.
    pub slot: u32,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// castor's guest with this workload (`castor run --help`), unless `kernel`.
    pub workload: String,
    /// A kernel to boot instead (a path on every host).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Its command line.
    #[serde(default)]
    pub cmdline: String,
    /// Its initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// A disk of this many bytes (each host keeps its copy beside the
    /// VM's image).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// `--epoch-ms` of its primary (`25`, `auto`, …).
    pub epoch_ms: String,
}

/// What an agent registers about its host, under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's name (its certificate's).
    pub name: String,
    /// The address its VMs' roles listen on.
    pub addr: IpAddr,
    /// Failure-domain label ("" = none).
    pub domain: String,
    /// RAM offered to VMs, bytes.
    pub mem_bytes: u64,
    /// vCPUs offered to VMs.
    pub vcpus: u32,
    /// VMs whose image this host keeps (a backup here resyncs by reuse).
    pub images: Vec<String>,
    /// The first port of its slots.
    pub port_base: u16,
}

/// The ports a host serves one VM's role on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// QUIC (UDP): a backup listens here, and so does a migration's
    /// destination (a host holds at most one role of a VM).
    pub quic: u16,
    /// The console service.
    pub console: u16,
}

/// Most slots (VMs) a fleet has: two ports each above the base.
pub const MAX_SLOTS: u32 = 4000;

/// The ports of slot `slot` above `base`.
pub fn ports(base: u16, slot: u32) -> Ports {
    let p = u32::from(base) + 2 * slot.min(MAX_SLOTS);
    Ports {
        quic: u16::try_from(p).unwrap_or(u16::MAX - 1),
        console: u16::try_from(p + 1).unwrap_or(u16::MAX),
    }
}

/// The last failover a VM had, as its new primary's agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// When the agent first saw the guest running there, ms since the epoch.
    pub at_unix_ms: u64,
    /// The host it ran on before.
    pub from: String,
    /// The host it runs on since.
    pub to: String,
}

/// What the agent running a VM's primary reports of it (written when it
/// changes, and with fresh figures every [`crate::REPORT_EVERY`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The host running the guest.
    pub host: String,
    /// Its role there.
    pub role: node::Role,
    /// A backup holds a committed checkpoint.
    pub protected: bool,
    /// The backup it protects toward, `NODE@ADDR`.
    pub backup: Option<String>,
    /// Its console service.
    pub console: SocketAddr,
    /// Console bytes released.
    pub console_released: u64,
    /// Epochs checkpointed.
    pub epochs: u64,
    /// Pause p50, µs.
    pub pause_p50_us: f64,
    /// Pause p99, µs.
    pub pause_p99_us: f64,
    /// Bytes per checkpoint, mean.
    pub bytes_per_epoch: f64,
    /// The last session's resync: by reuse, and pages sent of all.
    pub resync: Option<(bool, u64, u64)>,
    /// The last failover.
    pub failover: Option<Failover>,
    /// When written, ms since the epoch.
    pub at_unix_ms: u64,
}

/// A value and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// Its key's mod_revision (for a compare-and-swap).
    pub rev: i64,
}

/// The whole fleet as one read of etcd saw it.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// Live hosts (their lease holds).
    pub hosts: BTreeMap<String, HostRecord>,
    /// Hosts marked drained.
    pub drained: BTreeSet<String>,
    /// The VMs asked for.
    pub vms: BTreeMap<String, At<VmSpec>>,
    /// Port slots taken, and by which VM.
    pub slots: BTreeMap<u32, String>,
    /// The placement.
    pub placements: BTreeMap<String, At<Assignment>>,
    /// The witness's owners: host and token.
    pub owners: BTreeMap<String, At<witness::Owner>>,
    /// The leader agent.
    pub leader: Option<At<String>>,
    /// Reports of the VMs' primaries.
    pub reports: BTreeMap<String, Report>,
    /// Keys that did not parse (named in `castor vm list`).
    pub unreadable: Vec<String>,
}

impl FleetView {
    /// Reads everything under `/castor/` in one request.
    pub fn read(store: &Store) -> Result<FleetView, WitnessError> {
        let (kvs, _) = store.list(ROOT)?;
        Ok(Self::from_kvs(&kvs))
    }

    /// The view of these keys.
    pub fn from_kvs(kvs: &[Kv]) -> FleetView {
        let mut v = FleetView::default();
        for kv in kvs {
            if v.parse(kv).is_none() {
                v.unreadable.push(kv.key.clone());
            }
        }
        v
    }

    fn parse(&mut self, kv: &Kv) -> Option<()> {
        fn json<T: serde::de::DeserializeOwned>(kv: &Kv) -> Option<T> {
            serde_json::from_slice(&kv.value).ok()
        }
        let rev = kv.mod_revision;
        if let Some(vm) = kv.key.strip_prefix(OWNERS) {
            self.owners.insert(
                vm.to_string(),
                At {
                    value: json(kv)?,
                    rev,
                },
            );
            return Some(());
        }
        let rest = kv.key.strip_prefix(FLEET)?;
        if rest == "leader" {
            let name = String::from_utf8(kv.value.clone()).ok()?;
            self.leader = Some(At { value: name, rev });
            return Some(());
        }
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "vms" => {
                self.vms.insert(
                    name.into(),
                    At {
                        value: json(kv)?,
                        rev,
                    },
                );
            }
            "slots" => {
                let slot = name.parse().ok()?;
                self.slots
                    .insert(slot, String::from_utf8(kv.value.clone()).ok()?);
            }
            "hosts" => {
                self.hosts.insert(name.into(), json(kv)?);
            }
            "drain" => {
                self.drained.insert(name.into());
            }
            "placement" => {
                self.placements.insert(
                    name.into(),
                    At {
                        value: json(kv)?,
                        rev,
                    },
                );
            }
            "reports" => {
                self.reports.insert(name.into(), json(kv)?);
            }
            _ => return None,
        }
        Some(())
    }

    /// The placement's view of the hosts: every host registered or named
    /// by a placement (a lost host is still named, not alive).
    pub fn host_views(&self) -> Vec<HostView> {
        let mut names: BTreeSet<String> = self.hosts.keys().cloned().collect();
        for a in self.placements.values() {
            let a = &a.value;
            names.extend(
                [&a.primary, &a.backup, &a.moving_to]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        names
            .into_iter()
            .map(|name| match self.hosts.get(&name) {
                Some(h) => HostView {
                    name: name.clone(),
                    domain: h.domain.clone(),
                    mem_bytes: h.mem_bytes,
                    vcpus: h.vcpus,
                    images: h.images.iter().cloned().collect(),
                    alive: true,
                    drained: self.drained.contains(&name),
                },
                None => HostView {
                    name: name.clone(),
                    domain: String::new(),
                    mem_bytes: 0,
                    vcpus: 0,
                    images: BTreeSet::new(),
                    alive: false,
                    drained: self.drained.contains(&name),
                },
            })
            .collect()
    }

    /// The placement's view of the VMs, with their owners.
    pub fn vm_views(&self) -> Vec<VmView> {
        self.vms
            .values()
            .map(|s| VmView {
                name: s.value.name.clone(),
                mem_bytes: s.value.mem_bytes,
                vcpus: s.value.vcpus,
                owner: self
                    .owners
                    .get(&s.value.name)
                    .map(|o| o.value.owner.clone()),
            })
            .collect()
    }

    /// The current placement, without revisions.
    pub fn assignments(&self) -> BTreeMap<String, Assignment> {
        self.placements
            .iter()
            .map(|(k, a)| (k.clone(), a.value.clone()))
            .collect()
    }

    /// Where `host` serves `vm`'s QUIC port, if `host` is alive.
    pub fn quic_addr(&self, host: &str, vm: &str) -> Option<SocketAddr> {
        let h = self.hosts.get(host)?;
        let slot = self.vms.get(vm)?.value.slot;
        Some(SocketAddr::new(h.addr, ports(h.port_base, slot).quic))
    }

    /// The smallest free port slot.
    pub fn free_slot(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .slots
            .keys()
            .copied()
            .chain(self.vms.values().map(|v| v.value.slot))
            .collect();
        (0..MAX_SLOTS).find(|s| !used.contains(s))
    }
}

/// One VM as `castor vm list --json` prints it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmLine {
    /// The VM.
    pub name: String,
    /// Its health under the placement.
    pub health: node::fleet::Health,
    /// Its placement.
    pub placement: Assignment,
    /// The witness's owner and token.
    pub owner: Option<(String, u64)>,
    /// Its primary's report.
    pub report: Option<Report>,
}

/// Every VM of `view`, as `castor vm list` shows it.
pub fn vm_lines(view: &FleetView) -> Vec<VmLine> {
    let hosts = view.host_views();
    view.vm_views()
        .into_iter()
        .map(|v| {
            let placement = view
                .placements
                .get(&v.name)
                .map(|p| p.value.clone())
                .unwrap_or_default();
            VmLine {
                health: node::fleet::health(&hosts, &v, &placement),
                owner: view
                    .owners
                    .get(&v.name)
                    .map(|o| (o.value.owner.clone(), o.value.token)),
                report: view.reports.get(&v.name).cloned(),
                placement,
                name: v.name,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: 0,
        }
    }

    #[test]
    fn a_view_parses_every_kind_and_names_what_it_cannot() {
        let spec = VmSpec {
            name: "a".into(),
            slot: 3,
            mem_bytes: 32 << 20,
            vcpus: 1,
            workload: "counter".into(),
            kernel: None,
            cmdline: String::new(),
            initrd: None,
            disk_bytes: None,
            epoch_ms: "25".into(),
        };
        let host = HostRecord {
            name: "h1".into(),
            addr: "10.0.0.1".parse().unwrap(),
            domain: "r1".into(),
            mem_bytes: 1 << 30,
            vcpus: 4,
            images: vec!["a".into()],
            port_base: 7400,
        };
        let place = Assignment {
            primary: Some("h1".into()),
            backup: Some("h2".into()),
            moving_to: None,
        };
        let v = FleetView::from_kvs(&[
            kv(
                "/castor/fleet/vms/a",
                &serde_json::to_string(&spec).unwrap(),
                5,
            ),
            kv("/castor/fleet/slots/3", "a", 4),
            kv(
                "/castor/fleet/hosts/h1",
                &serde_json::to_string(&host).unwrap(),
                6,
            ),
            kv("/castor/fleet/drain/h2", "drained", 7),
            kv("/castor/fleet/leader", "h1", 8),
            kv(
                "/castor/fleet/placement/a",
                &serde_json::to_string(&place).unwrap(),
                9,
            ),
            kv("/castor/vm/a", r#"{"owner":"h1","token":2}"#, 10),
            kv("/castor/fleet/vms/b", "not json", 11),
            kv("/castor/fleet/what/x", "", 12),
        ]);
        assert_eq!(v.vms["a"].value, spec);
        assert_eq!(v.vms["a"].rev, 5);
        assert_eq!(v.slots[&3], "a");
        assert_eq!(v.leader.as_ref().unwrap().value, "h1");
        assert!(v.drained.contains("h2"));
        assert_eq!(v.owners["a"].value.token, 2);
        assert_eq!(
            v.unreadable,
            vec!["/castor/fleet/vms/b", "/castor/fleet/what/x"]
        );
        // h2 is named by a placement but not registered: a lost host.
        let hosts = v.host_views();
        assert_eq!(hosts.len(), 2);
        assert!(hosts[0].alive && hosts[0].images.contains("a"));
        assert!(!hosts[1].alive && hosts[1].drained);
        assert_eq!(v.vm_views()[0].owner.as_deref(), Some("h1"));
        assert_eq!(
            v.quic_addr("h1", "a"),
            Some("10.0.0.1:7406".parse().unwrap())
        );
        assert_eq!(v.quic_addr("h2", "a"), None);
        assert_eq!(v.free_slot(), Some(0));
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("vm-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("Vm"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("-a"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn slots_give_distinct_ports() {
        let a = ports(7400, 0);
        let b = ports(7400, 1);
        assert_eq!((a.quic, a.console, b.quic), (7400, 7401, 7402));
    }
}
