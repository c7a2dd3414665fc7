//! The fleet's placement: where each VM's primary and backup run.
//!
//! One agent runs per host; the desired state is in etcd and a leader agent
//! computes, step after step, the next [`Assignment`] of every VM from the
//! hosts it sees ([`HostView`]), the VMs ([`VmView`], with the witness's
//! owner) and the current assignments. [`place`] is that computation, as a
//! pure function: no I/O, no clock, no thread, and the same input gives the
//! same output (maps in name order, ties broken by name). [`check`] states
//! its invariants and [`health`] what a placement means for one VM; both
//! are used by the unit tests and by a seeded simulation of the fleet
//! ([`sim`]).
//!
//! # The rules of [`place`]
//!
//! - **One entry per VM** in `vms`; the entries of VMs no longer there are
//!   dropped (their roles free their hosts at once).
//! - **Capacity.** A host's used memory is the sum of `mem_bytes` of the VMs
//!   it is primary, backup or migration destination (`moving_to`) of; its
//!   used vCPUs count only the VMs it is primary or destination of (a
//!   backup runs no vCPU until a takeover). A *new* role is given to a host
//!   only if it is alive, not drained and the VM fits in what is left: its
//!   memory, and for a primary or a destination its vCPUs too. Existing
//!   roles that over-commit a host (a takeover turned a backup into a
//!   primary) are kept, and nothing that needs what is over-committed is
//!   added there: no role at all over its memory, no primary or destination
//!   over its vCPUs — but a backup, which runs none, may still come (a VM
//!   protected on an over-committed host beats one not protected).
//! - **The primary follows the witness**, never the other way round. With
//!   `owner = Some(h)` the primary is `h`, whether `h` is alive or not: only
//!   the witness can move it. If `h` was the backup, the backup is dropped
//!   (and a new one chosen); if `h` was the destination, the migration is
//!   done. With `owner = None` (never booted) the current primary is kept if
//!   its host is alive and not drained; otherwise one is chosen: the
//!   eligible host (alive, not drained, the VM fits) with the largest
//!   fraction of its memory free, then by name, if possible another than the
//!   backup. A VM that fits nowhere has no role at all.
//! - **A migration is asked only while its reason lasts:** `moving_to` is
//!   kept while the primary's host is alive and drained, owns the VM at the
//!   witness, and the destination is alive, not drained and not the primary
//!   or the backup. Otherwise it is cleared (the agent aborts it; one that
//!   completed anyway shows as the new owner, which the primary follows).
//! - **The backup** is kept if its host is alive, not drained and neither
//!   the primary nor the destination (for a drained host, see *Drain*).
//!   Otherwise one is chosen at once (healing
//!   is not limited by [`Policy`]): among eligible hosts other than the
//!   primary and the destination where the VM's memory fits, **outside the
//!   primary's failure domain whenever such a host exists**, then ranked by
//!   keeping an image of the VM (a resync by reuse), by being in another
//!   labelled domain than the primary's, by the fraction of memory free, by
//!   name. If the primary's host is not alive, the backup is kept as it is
//!   (it is about to take over) and none is chosen.
//! - **Domains.** Two hosts share a failure domain when both labels are
//!   equal and non-empty; `""` is in no domain. The domain rule comes before
//!   the image: a backup in the primary's domain is chosen only when no
//!   eligible host in another one has room.
//! - **Drain.** A VM whose primary's host is alive, drained and the owner
//!   gets `moving_to`: an eligible host other than the primary and the
//!   backup where both memory and vCPUs fit, chosen like a backup (outside
//!   the backup's domain when possible) but with no regard for images. At
//!   most [`Policy::migrations_per_host`] migrations leave one host at a
//!   time, and at most [`Policy::max_moves`] moves start per step. A drained
//!   host's backups are replaced like a dead host's, at once; one that no
//!   other host has room for stays until one has (a drain never leaves a VM
//!   unprotected), like a primary that cannot migrate.
//! - **Rebalance**, with what is left of [`Policy::max_moves`], only in a
//!   step in which no backup had to be chosen, and only for VMs to which
//!   nothing else happened in the step (primary alive, no migration): a
//!   backup moves from host S to host T (alive, not drained, not the
//!   primary, outside the primary's domain and no worse for it than S, the
//!   VM fits) when `(used_S - m)/cap_S >= (used_T + m)/cap_T` in fractions
//!   of memory. S stays at least as loaded as T, so the move never comes
//!   back, and `Σ used²/cap` falls at every move: rebalancing stops (a
//!   fixed point). VMs whose image T keeps go first, then the most loaded S,
//!   then the least loaded T. This is how a host that returns empty gets
//!   backups again.
//! - **Never** primary = backup, backup = destination or destination =
//!   primary.
//!
//! [`check`] asserts what a step must keep: those three distinct; every role
//! given in `next` that `prev` did not have (but the primary the owner
//! forces) on an alive, undrained host, and such a host not over-committed
//! in memory, nor in vCPUs if the new role is a primary or a destination;
//! the primary equal to the owner whenever there is one; at most
//! [`Policy::max_moves`] migrations and rebalancing moves started and at
//! most [`Policy::migrations_per_host`] migrations away from a host that
//! starts one; and the domain rule for every backup newly chosen.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub mod sim;

pub use sim::{simulate, SimReport};

/// A host as the placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// The host's name (unique in the fleet).
    pub name: String,
    /// Failure-domain label (rack, zone); "" = none.
    pub domain: String,
    /// RAM it offers to VMs, bytes.
    pub mem_bytes: u64,
    /// vCPUs it offers to VMs.
    pub vcpus: u32,
    /// VMs whose image (RAM + generations, from an earlier role) it keeps: a
    /// backup there resyncs by reuse.
    pub images: BTreeSet<String>,
    /// Its lease in etcd is live.
    pub alive: bool,
    /// `castor host drain`: it takes no new role and its roles are moved
    /// away.
    pub drained: bool,
}

/// A VM as the placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// The VM's name (unique in the fleet).
    pub name: String,
    /// Its guest RAM, bytes.
    pub mem_bytes: u64,
    /// Its vCPUs.
    pub vcpus: u32,
    /// The witness's owner: the host that may run it as primary now (None:
    /// never booted).
    pub owner: Option<String>,
}

/// Where one VM's roles are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The host that runs the guest (the witness's owner once booted).
    pub primary: Option<String>,
    /// The host that keeps its replica.
    pub backup: Option<String>,
    /// A live migration of the primary to this host is asked (drain).
    pub moving_to: Option<String>,
}

/// Limits on one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Rebalancing moves (a backup relocated to a less loaded host, a
    /// drain's migration) started per step. Default 2.
    pub max_moves: usize,
    /// Migrations away from one host at a time. Default 1.
    pub migrations_per_host: usize,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            max_moves: 2,
            migrations_per_host: 1,
        }
    }
}

/// A VM's state under a placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Never booted and no host has room for it.
    Unplaced,
    /// Never booted; a primary is chosen, the witness names no owner yet.
    Booting,
    /// Its owner's host is alive and a backup on another alive host keeps
    /// its replica.
    Protected,
    /// Runs without a live backup, or its owner's host is lost and a live
    /// backup is about to take over.
    Unprotected,
    /// Its owner's host is alive and a migration away is asked.
    Moving,
    /// Its owner's host is not alive and no live backup can take over: only
    /// that host's return (or the witness) can bring it back.
    Lost,
}

/// An invariant a placement breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A VM has no entry in the placement.
    #[error("VM {0} has no entry in the placement")]
    Missing(String),
    /// The placement has an entry for a VM that does not exist.
    #[error("the placement has an entry for {0}, which is not a VM")]
    Unknown(String),
    /// Two roles of one VM on one host.
    #[error("VM {vm}: its {roles} are both on host {host}")]
    SharedHost {
        /// The VM.
        vm: String,
        /// The host.
        host: String,
        /// Which two roles.
        roles: &'static str,
    },
    /// The primary is not the witness's owner.
    #[error("VM {vm}: the witness's owner is {owner} but the primary is {primary:?}")]
    NotOwner {
        /// The VM.
        vm: String,
        /// The owner at the witness.
        owner: String,
        /// The placement's primary.
        primary: Option<String>,
    },
    /// A new role on a host that may not take one.
    #[error("VM {vm}: a new {role} role on host {host}, which is {why}")]
    Ineligible {
        /// The VM.
        vm: String,
        /// The role ("primary", "backup", "moving_to").
        role: &'static str,
        /// The host.
        host: String,
        /// Why it may not: "not a host", "not alive", "drained".
        why: &'static str,
    },
    /// A host given a new role is over-committed in what the role needs.
    #[error("host {host}: given a new role with its {what} over-committed ({used} used of {cap})")]
    OverCommitted {
        /// The host.
        host: String,
        /// "memory" or "vCPUs".
        what: &'static str,
        /// Used under the placement.
        used: u64,
        /// What the host offers.
        cap: u64,
    },
    /// More moves started in a step than the policy allows.
    #[error(
        "{moves} migrations and rebalancing moves started in one step, more than the {max} allowed"
    )]
    TooManyMoves {
        /// Moves started.
        moves: usize,
        /// [`Policy::max_moves`].
        max: usize,
    },
    /// More migrations away from one host than the policy allows.
    #[error("host {host}: {migrations} migrations away at once, more than the {max} allowed")]
    TooManyMigrations {
        /// The source host.
        host: String,
        /// Migrations away from it.
        migrations: usize,
        /// [`Policy::migrations_per_host`].
        max: usize,
    },
    /// A new backup in the primary's domain although another domain had room.
    #[error(
        "VM {vm}: its new backup {backup} is in its primary's domain {domain} although host {instead}, outside it, has room"
    )]
    Domain {
        /// The VM.
        vm: String,
        /// The backup chosen.
        backup: String,
        /// The primary's (and the backup's) domain.
        domain: String,
        /// An eligible host outside that domain with room for it.
        instead: String,
    },
}

/// One of a VM's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Primary,
    Backup,
    MovingTo,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Primary, Kind::Backup, Kind::MovingTo];

    /// The role runs the guest's vCPUs on its host.
    fn runs(self) -> bool {
        !matches!(self, Kind::Backup)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Primary => "primary",
            Kind::Backup => "backup",
            Kind::MovingTo => "moving_to",
        }
    }

    fn of(self, a: &Assignment) -> Option<&str> {
        match self {
            Kind::Primary => a.primary.as_deref(),
            Kind::Backup => a.backup.as_deref(),
            Kind::MovingTo => a.moving_to.as_deref(),
        }
    }
}

/// Both labels are set and equal.
fn same_domain(a: &str, b: &str) -> bool {
    !a.is_empty() && a == b
}

/// Both labels are set and differ.
fn separated(a: &str, b: &str) -> bool {
    !a.is_empty() && !b.is_empty() && a != b
}

/// How well a backup on a host of domain `b` is apart from a primary of
/// domain `p`: 0 in its domain, 1 unknown (a label is empty), 2 apart.
fn apartness(p: &str, b: &str) -> u8 {
    if same_domain(p, b) {
        0
    } else if separated(p, b) {
        2
    } else {
        1
    }
}

/// A non-negative fraction, compared exactly.
#[derive(Debug, Clone, Copy)]
struct Frac {
    num: u128,
    den: u128,
}

impl Frac {
    /// `num / cap`; a host that offers nothing counts as offering 1 byte.
    fn new(num: u64, cap: u64) -> Frac {
        Frac {
            num: num.into(),
            den: cap.max(1).into(),
        }
    }
}

impl PartialEq for Frac {
    fn eq(&self, o: &Frac) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Frac {}
impl PartialOrd for Frac {
    fn partial_cmp(&self, o: &Frac) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Frac {
    fn cmp(&self, o: &Frac) -> Ordering {
        (self.num * o.den).cmp(&(o.num * self.den))
    }
}

/// What a host's roles use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Used {
    mem: u64,
    vcpus: u64,
}

/// The hosts and what the roles counted so far use on each.
struct Fleet<'a> {
    hosts: BTreeMap<&'a str, &'a HostView>,
    used: BTreeMap<&'a str, Used>,
}

impl<'a> Fleet<'a> {
    fn new(hosts: &'a [HostView]) -> Fleet<'a> {
        Fleet {
            hosts: hosts.iter().map(|h| (h.name.as_str(), h)).collect(),
            used: BTreeMap::new(),
        }
    }

    /// The hosts, with every role of `placement` (for the VMs in `vms`)
    /// counted.
    fn with_roles(
        hosts: &'a [HostView],
        vms: &BTreeMap<&str, &VmView>,
        placement: &BTreeMap<String, Assignment>,
    ) -> Fleet<'a> {
        let mut f = Fleet::new(hosts);
        for (name, a) in placement {
            if let Some(vm) = vms.get(name.as_str()) {
                f.add_all(vm, a);
            }
        }
        f
    }

    fn host(&self, h: &str) -> Option<&'a HostView> {
        self.hosts.get(h).copied()
    }

    fn alive(&self, h: &str) -> bool {
        self.host(h).is_some_and(|h| h.alive)
    }

    /// Alive and not drained: it may take a new role.
    fn eligible(&self, h: &str) -> bool {
        self.host(h).is_some_and(|h| h.alive && !h.drained)
    }

    fn domain(&self, h: &str) -> &'a str {
        self.host(h).map_or("", |h| h.domain.as_str())
    }

    /// Every host's use now (a copy, for a ranking made while roles change).
    fn clone_used(&self) -> BTreeMap<String, Used> {
        self.used.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn used(&self, h: &str) -> Used {
        self.used.get(h).copied().unwrap_or_default()
    }

    /// Count (or, `sign = false`, uncount) one role of `vm` on `h`; roles on
    /// hosts the fleet does not know use nothing.
    fn count(&mut self, h: &str, vm: &VmView, kind: Kind, sign: bool) {
        let Some(host) = self.host(h) else {
            return;
        };
        let u = self.used.entry(host.name.as_str()).or_default();
        let vcpus = if kind.runs() { u64::from(vm.vcpus) } else { 0 };
        if sign {
            u.mem = u.mem.saturating_add(vm.mem_bytes);
            u.vcpus = u.vcpus.saturating_add(vcpus);
        } else {
            u.mem = u.mem.saturating_sub(vm.mem_bytes);
            u.vcpus = u.vcpus.saturating_sub(vcpus);
        }
    }

    fn add(&mut self, h: &str, vm: &VmView, kind: Kind) {
        self.count(h, vm, kind, true);
    }

    fn remove(&mut self, h: &str, vm: &VmView, kind: Kind) {
        self.count(h, vm, kind, false);
    }

    fn add_all(&mut self, vm: &VmView, a: &Assignment) {
        for kind in Kind::ALL {
            if let Some(h) = kind.of(a) {
                self.add(h, vm, kind);
            }
        }
    }

    /// A new `kind` role of `vm` fits in what `h` has left.
    fn fits(&self, h: &str, vm: &VmView, kind: Kind) -> bool {
        let Some(host) = self.host(h) else {
            return false;
        };
        let u = self.used(h);
        u.mem.saturating_add(vm.mem_bytes) <= host.mem_bytes
            && (!kind.runs() || u.vcpus.saturating_add(vm.vcpus.into()) <= host.vcpus.into())
    }

    /// The fraction of `h`'s memory free.
    fn free(&self, h: &str) -> Frac {
        let cap = self.host(h).map_or(0, |h| h.mem_bytes);
        Frac::new(cap.saturating_sub(self.used(h).mem), cap)
    }

    /// The fraction of `h`'s memory used, once `plus` bytes are added and
    /// `minus` taken away.
    fn load(&self, h: &str, plus: u64, minus: u64) -> Frac {
        let cap = self.host(h).map_or(0, |h| h.mem_bytes);
        let used = self.used(h).mem.saturating_add(plus).saturating_sub(minus);
        Frac::new(used, cap)
    }

    /// The host for a new `kind` role of `vm`: eligible, not in `exclude`,
    /// the VM fits; outside `avoid`'s domain if any such host fits; then
    /// ranked by keeping the VM's image (if `by_image`), by a labelled
    /// domain other than `avoid`, by fewest `pairs` (for a backup: the
    /// backups it already holds of the same primary host's VMs, so that a
    /// host's loss spreads its primaries over the others), by the fraction
    /// of memory free, by name.
    fn choose(
        &self,
        vm: &VmView,
        kind: Kind,
        exclude: &[Option<&str>],
        avoid: &str,
        by_image: bool,
        pairs: &dyn Fn(&str) -> usize,
    ) -> Option<&'a str> {
        let cands: Vec<&'a HostView> = self
            .hosts
            .values()
            .copied()
            .filter(|h| {
                h.alive
                    && !h.drained
                    && !exclude.contains(&Some(h.name.as_str()))
                    && self.fits(&h.name, vm, kind)
            })
            .collect();
        let outside = cands.iter().any(|h| !same_domain(avoid, &h.domain));
        let image = |h: &HostView| by_image && h.images.contains(&vm.name);
        cands
            .into_iter()
            .filter(|h| !outside || !same_domain(avoid, &h.domain))
            .min_by(|a, b| {
                image(b)
                    .cmp(&image(a))
                    .then(separated(avoid, &b.domain).cmp(&separated(avoid, &a.domain)))
                    .then(pairs(&a.name).cmp(&pairs(&b.name)))
                    .then(self.free(&b.name).cmp(&self.free(&a.name)))
                    .then(a.name.cmp(&b.name))
            })
            .map(|h| h.name.as_str())
    }
}

/// `cur` with every role that may not stay removed or corrected: the
/// primary follows the owner, a migration ends when its reason does, a
/// backup on a host that may not keep it goes (unless the primary is lost).
fn reconcile(f: &Fleet, vm: &VmView, cur: &Assignment) -> Assignment {
    let mut a = cur.clone();
    match vm.owner.as_deref() {
        Some(o) => {
            a.primary = Some(o.to_owned());
            if a.backup.as_deref() == Some(o) {
                a.backup = None;
            }
            if a.moving_to.as_deref() == Some(o) {
                a.moving_to = None;
            }
        }
        None => {
            if !a.primary.as_deref().is_some_and(|p| f.eligible(p)) {
                a.primary = None;
            }
        }
    }
    if let Some(t) = a.moving_to.as_deref() {
        let asked = a.primary.as_deref().is_some_and(|p| {
            f.host(p).is_some_and(|h| h.alive && h.drained)
                && vm.owner.as_deref() == Some(p)
                && p != t
        }) && f.eligible(t)
            && a.backup.as_deref() != Some(t);
        if !asked {
            a.moving_to = None;
        }
    }
    if let Some(b) = a.backup.as_deref() {
        let primary_lost = a.primary.as_deref().is_some_and(|p| !f.alive(p));
        // A drained host's backup stays until healing finds another.
        let keep = primary_lost
            || (f.alive(b) && a.primary.as_deref() != Some(b) && a.moving_to.as_deref() != Some(b));
        if !keep {
            a.backup = None;
        }
    }
    a
}

/// The next placement: a pure function (see the module's rules).
pub fn place(
    hosts: &[HostView],
    vms: &[VmView],
    current: &BTreeMap<String, Assignment>,
    policy: &Policy,
) -> BTreeMap<String, Assignment> {
    let vms: BTreeMap<&str, &VmView> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut f = Fleet::new(hosts);
    let mut next: BTreeMap<String, Assignment> = BTreeMap::new();
    for (&name, &vm) in &vms {
        let cur = current.get(name).cloned().unwrap_or_default();
        next.insert(name.to_owned(), reconcile(&f, vm, &cur));
    }
    for (name, a) in &next {
        f.add_all(vms[name.as_str()], a);
    }
    // VMs given a new role or changed this step: not rebalanced.
    let mut touched: BTreeSet<&str> = BTreeSet::new();

    // A primary for the VMs never booted that lost theirs.
    for (&name, &vm) in &vms {
        let a = next.get_mut(name).expect("one entry per VM");
        if vm.owner.is_some() || a.primary.is_some() {
            continue;
        }
        touched.insert(name);
        // Primaries spread by the vCPUs they run (backups run none).
        let used = f.clone_used();
        let running = |h: &str| used.get(h).map_or(0, |u| u.vcpus as usize);
        let mut pick = f.choose(
            vm,
            Kind::Primary,
            &[a.backup.as_deref()],
            "",
            false,
            &running,
        );
        if pick.is_none() {
            // Only the backup's host may have room: the backup gives way
            // (and a VM with no primary holds nothing).
            if let Some(b) = a.backup.take() {
                f.remove(&b, vm, Kind::Backup);
                pick = f.choose(vm, Kind::Primary, &[], "", false, &running);
            }
        }
        if let Some(p) = pick {
            f.add(p, vm, Kind::Primary);
            a.primary = Some(p.to_owned());
        }
    }

    // Heal: a backup for every VM whose primary is alive and has none, or
    // has it on a drained host.
    let mut healed = false;
    for (&name, &vm) in &vms {
        let a = &next[name];
        let Some(p) = a.primary.clone() else {
            continue;
        };
        if a.backup.as_deref().is_some_and(|b| f.eligible(b)) || !f.alive(&p) {
            continue;
        }
        let pairs = |h: &str| {
            next.values()
                .filter(|o| {
                    o.primary.as_deref() == Some(p.as_str()) && o.backup.as_deref() == Some(h)
                })
                .count()
        };
        let exclude = [
            Some(p.as_str()),
            a.moving_to.as_deref(),
            a.backup.as_deref(),
        ];
        let pick = f.choose(vm, Kind::Backup, &exclude, f.domain(&p), true, &pairs);
        touched.insert(name);
        let a = next.get_mut(name).expect("one entry per VM");
        if let Some(b) = pick {
            if let Some(old) = a.backup.take() {
                f.remove(&old, vm, Kind::Backup);
            }
            f.add(b, vm, Kind::Backup);
            a.backup = Some(b.to_owned());
            healed = true;
        }
    }

    // Drain: migrations away from drained hosts, within the limits.
    let mut moves = 0;
    let mut away: BTreeMap<String, usize> = BTreeMap::new();
    for a in next.values() {
        if let (Some(p), Some(_)) = (&a.primary, &a.moving_to) {
            *away.entry(p.clone()).or_default() += 1;
        }
    }
    for (&name, &vm) in &vms {
        if moves >= policy.max_moves {
            break;
        }
        let a = next.get_mut(name).expect("one entry per VM");
        let Some(p) = a.primary.clone() else {
            continue;
        };
        let draining = f.host(&p).is_some_and(|h| h.alive && h.drained);
        if !draining || vm.owner.as_deref() != Some(p.as_str()) || a.moving_to.is_some() {
            continue;
        }
        let n = away.entry(p.clone()).or_default();
        if *n >= policy.migrations_per_host {
            continue;
        }
        let exclude = [Some(p.as_str()), a.backup.as_deref()];
        let avoid = a.backup.as_deref().map_or("", |b| f.domain(b));
        if let Some(t) = f.choose(vm, Kind::MovingTo, &exclude, avoid, false, &|_| 0) {
            f.add(t, vm, Kind::MovingTo);
            a.moving_to = Some(t.to_owned());
            touched.insert(name);
            *n += 1;
            moves += 1;
        }
    }

    // Rebalance with what is left, once nothing had to be healed: a
    // healing choice was made against the loads it saw, which a move away
    // would lower under it.
    if !healed {
        while moves < policy.max_moves {
            let Some((name, t)) = best_move(&f, &vms, &next, current, &touched) else {
                break;
            };
            let vm = vms[name];
            let a = next.get_mut(name).expect("one entry per VM");
            let s = a.backup.replace(t.to_owned()).expect("a move has a source");
            f.remove(&s, vm, Kind::Backup);
            f.add(t, vm, Kind::Backup);
            touched.insert(name);
            moves += 1;
        }
    }
    next
}

/// The best rebalancing move: a VM untouched this step whose backup may go
/// to a less loaded host without the move ever coming back, and that host.
fn best_move<'v, 'a>(
    f: &Fleet<'a>,
    vms: &BTreeMap<&'v str, &'v VmView>,
    next: &BTreeMap<String, Assignment>,
    current: &BTreeMap<String, Assignment>,
    touched: &BTreeSet<&str>,
) -> Option<(&'v str, &'a str)> {
    // (image kept, S's load, T's load, VM, T): the best is the largest
    // image, largest S load, smallest T load, then first names.
    let mut best: Option<(bool, Frac, Frac, &'v str, &'a str)> = None;
    for (&name, &vm) in vms {
        let a = &next[name];
        if touched.contains(name) || current.get(name) != Some(a) || vm.mem_bytes == 0 {
            continue;
        }
        let (Some(p), Some(s), None) = (a.primary.as_deref(), a.backup.as_deref(), &a.moving_to)
        else {
            continue;
        };
        if !f.alive(p) {
            continue;
        }
        let here = apartness(f.domain(p), f.domain(s));
        let s_after = f.load(s, 0, vm.mem_bytes);
        for t in f.hosts.values() {
            let tn = t.name.as_str();
            if !t.alive || t.drained || tn == p || tn == s || !f.fits(tn, vm, Kind::Backup) {
                continue;
            }
            let there = apartness(f.domain(p), &t.domain);
            if there == 0 || there < here {
                continue;
            }
            if s_after < f.load(tn, vm.mem_bytes, 0) {
                continue;
            }
            // Never gather one primary host's backups on one host: its
            // loss would land all of them there.
            let pairs = |h: &str| {
                next.values()
                    .filter(|o| o.primary.as_deref() == Some(p) && o.backup.as_deref() == Some(h))
                    .count()
            };
            if pairs(tn) >= pairs(s) {
                continue;
            }
            let cand = (
                t.images.contains(name),
                f.load(s, 0, 0),
                f.load(tn, 0, 0),
                name,
                tn,
            );
            let better = match &best {
                None => true,
                Some(b) => cand
                    .0
                    .cmp(&b.0)
                    .then(cand.1.cmp(&b.1))
                    .then(b.2.cmp(&cand.2))
                    .then(b.3.cmp(cand.3))
                    .then(b.4.cmp(cand.4))
                    .is_gt(),
            };
            if better {
                best = Some(cand);
            }
        }
    }
    best.map(|b| (b.3, b.4))
}

/// A VM's state under a placement: judged from the witness's owner once the
/// VM has booted (see [`Health`]).
pub fn health(hosts: &[HostView], vm: &VmView, a: &Assignment) -> Health {
    let alive = |h: &str| hosts.iter().any(|x| x.name == h && x.alive);
    let Some(owner) = vm.owner.as_deref() else {
        return if a.primary.is_some() {
            Health::Booting
        } else {
            Health::Unplaced
        };
    };
    let backup = a.backup.as_deref().is_some_and(|b| b != owner && alive(b));
    if !alive(owner) {
        return if backup {
            Health::Unprotected
        } else {
            Health::Lost
        };
    }
    if a.moving_to.is_some() {
        Health::Moving
    } else if backup {
        Health::Protected
    } else {
        Health::Unprotected
    }
}

/// The moves `next` starts over `prev`: (migrations, rebalancing moves). A
/// rebalancing move is a backup that changed although the old one could
/// have stayed (its host alive, undrained, neither primary nor
/// destination); a changed backup that could not is healing.
fn started_moves(
    hosts: &[HostView],
    prev: &BTreeMap<String, Assignment>,
    next: &BTreeMap<String, Assignment>,
) -> (usize, usize) {
    let f = Fleet::new(hosts);
    let (mut migrations, mut rebalances) = (0, 0);
    for (name, a) in next {
        let Some(was) = prev.get(name) else {
            continue;
        };
        if a.moving_to.is_some() && a.moving_to != was.moving_to {
            migrations += 1;
        }
        if let (Some(s), Some(t)) = (was.backup.as_deref(), a.backup.as_deref()) {
            let could_stay = f.eligible(s)
                && a.primary.as_deref() != Some(s)
                && a.moving_to.as_deref() != Some(s);
            if s != t && could_stay {
                rebalances += 1;
            }
        }
    }
    (migrations, rebalances)
}

/// The invariants of `next` given the previous placement `prev` (see the
/// module's doc); used by the tests and the simulation.
pub fn check(
    hosts: &[HostView],
    vms: &[VmView],
    prev: &BTreeMap<String, Assignment>,
    next: &BTreeMap<String, Assignment>,
    policy: &Policy,
) -> Result<(), Violation> {
    let by_name: BTreeMap<&str, &VmView> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    for name in by_name.keys() {
        if !next.contains_key(*name) {
            return Err(Violation::Missing(name.to_string()));
        }
    }
    if let Some(name) = next.keys().find(|n| !by_name.contains_key(n.as_str())) {
        return Err(Violation::Unknown(name.clone()));
    }
    let f = Fleet::with_roles(hosts, &by_name, next);
    // Hosts given a new role: whether one of them runs the guest.
    let mut receiving: BTreeMap<&str, bool> = BTreeMap::new();
    for (&name, &vm) in &by_name {
        let a = &next[name];
        let pairs = [
            (&a.primary, &a.backup, "primary and backup"),
            (
                &a.primary,
                &a.moving_to,
                "primary and migration destination",
            ),
            (&a.backup, &a.moving_to, "backup and migration destination"),
        ];
        for (x, y, roles) in pairs {
            if let (Some(x), Some(y)) = (x, y) {
                if x == y {
                    return Err(Violation::SharedHost {
                        vm: name.to_owned(),
                        host: x.clone(),
                        roles,
                    });
                }
            }
        }
        if let Some(o) = &vm.owner {
            if a.primary.as_ref() != Some(o) {
                return Err(Violation::NotOwner {
                    vm: name.to_owned(),
                    owner: o.clone(),
                    primary: a.primary.clone(),
                });
            }
        }
        let was = prev.get(name).cloned().unwrap_or_default();
        for kind in Kind::ALL {
            let Some(h) = kind.of(a) else {
                continue;
            };
            if kind.of(&was) == Some(h) || (kind == Kind::Primary && vm.owner.as_deref() == Some(h))
            {
                continue;
            }
            let why = match f.host(h) {
                None => Some("not a host"),
                Some(host) if !host.alive => Some("not alive"),
                Some(host) if host.drained => Some("drained"),
                Some(host) => {
                    *receiving.entry(host.name.as_str()).or_default() |= kind.runs();
                    None
                }
            };
            if let Some(why) = why {
                return Err(Violation::Ineligible {
                    vm: name.to_owned(),
                    role: kind.name(),
                    host: h.to_owned(),
                    why,
                });
            }
        }
    }
    for (h, runs) in receiving {
        let (host, u) = (f.host(h).expect("a known host"), f.used(h));
        let mut over = vec![("memory", u.mem, host.mem_bytes)];
        if runs {
            over.push(("vCPUs", u.vcpus, u64::from(host.vcpus)));
        }
        if let Some((what, used, cap)) = over.into_iter().find(|(_, used, cap)| used > cap) {
            return Err(Violation::OverCommitted {
                host: h.to_string(),
                what,
                used,
                cap,
            });
        }
    }
    let (migrations, rebalances) = started_moves(hosts, prev, next);
    if migrations + rebalances > policy.max_moves {
        return Err(Violation::TooManyMoves {
            moves: migrations + rebalances,
            max: policy.max_moves,
        });
    }
    let mut away: BTreeMap<&str, (usize, bool)> = BTreeMap::new();
    for (name, a) in next {
        if let (Some(p), Some(t)) = (a.primary.as_deref(), a.moving_to.as_deref()) {
            let e = away.entry(p).or_default();
            e.0 += 1;
            e.1 |= prev.get(name).and_then(|w| w.moving_to.as_deref()) != Some(t);
        }
    }
    for (host, (migrations, new)) in away {
        if new && migrations > policy.migrations_per_host {
            return Err(Violation::TooManyMigrations {
                host: host.to_owned(),
                migrations,
                max: policy.migrations_per_host,
            });
        }
    }
    for (&name, &vm) in &by_name {
        let a = &next[name];
        let (Some(p), Some(b)) = (a.primary.as_deref(), a.backup.as_deref()) else {
            continue;
        };
        let was = prev.get(name).and_then(|w| w.backup.as_deref());
        let domain = f.domain(p);
        if was == Some(b) || !same_domain(domain, f.domain(b)) {
            continue;
        }
        let instead = f.hosts.values().find(|h| {
            let n = h.name.as_str();
            h.alive
                && !h.drained
                && n != p
                && n != b
                && a.moving_to.as_deref() != Some(n)
                && !same_domain(domain, &h.domain)
                && f.fits(n, vm, Kind::Backup)
        });
        if let Some(h) = instead {
            return Err(Violation::Domain {
                vm: name.to_owned(),
                backup: b.to_owned(),
                domain: domain.to_owned(),
                instead: h.name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(name: &str, domain: &str, gib: u64, vcpus: u32) -> HostView {
        HostView {
            name: name.into(),
            domain: domain.into(),
            mem_bytes: gib * GIB,
            vcpus,
            images: BTreeSet::new(),
            alive: true,
            drained: false,
        }
    }

    fn vm(name: &str, gib: u64, vcpus: u32) -> VmView {
        VmView {
            name: name.into(),
            mem_bytes: gib * GIB,
            vcpus,
            owner: None,
        }
    }

    fn vms(n: usize, gib: u64, vcpus: u32) -> Vec<VmView> {
        (0..n).map(|i| vm(&format!("vm{i}"), gib, vcpus)).collect()
    }

    fn hosts3(gib: u64) -> Vec<HostView> {
        ["a", "b", "c"].map(|n| host(n, "", gib, 16)).to_vec()
    }

    fn find<'a>(hosts: &'a mut [HostView], name: &str) -> &'a mut HostView {
        hosts.iter_mut().find(|h| h.name == name).unwrap()
    }

    fn alive(hosts: &[HostView], name: &str) -> bool {
        hosts.iter().any(|h| h.name == name && h.alive)
    }

    /// `place`, then `check` against the previous placement.
    fn step(
        hosts: &[HostView],
        vms: &[VmView],
        cur: &BTreeMap<String, Assignment>,
        policy: &Policy,
    ) -> BTreeMap<String, Assignment> {
        let next = place(hosts, vms, cur, policy);
        if let Err(v) = check(hosts, vms, cur, &next, policy) {
            panic!("{v}\nfrom {cur:#?}\nto {next:#?}");
        }
        assert_eq!(next, place(hosts, vms, cur, policy), "deterministic");
        next
    }

    /// The world's answer: never-booted VMs boot on their primary, a lost
    /// owner's live backup takes over, migrations complete; hosts keep the
    /// images of the VMs they hold. Whether an owner changed.
    fn react(hosts: &mut [HostView], vms: &mut [VmView], p: &BTreeMap<String, Assignment>) -> bool {
        let mut changed = false;
        for vm in vms.iter_mut() {
            let a = &p[&vm.name];
            for h in [&a.primary, &a.backup, &a.moving_to].into_iter().flatten() {
                if alive(hosts, h) {
                    find(hosts, h).images.insert(vm.name.clone());
                }
            }
            let new = match vm.owner.as_deref() {
                None => a.primary.clone().filter(|h| alive(hosts, h)),
                Some(o) if !alive(hosts, o) => a.backup.clone().filter(|h| alive(hosts, h)),
                Some(_) => a.moving_to.clone().filter(|h| alive(hosts, h)),
            };
            if new.is_some() {
                vm.owner = new;
                changed = true;
            }
        }
        changed
    }

    /// Steps until a fixed point: placing again changes nothing and the
    /// world does not move. The number of steps it took.
    fn settle(
        hosts: &mut [HostView],
        vms: &mut [VmView],
        cur: &mut BTreeMap<String, Assignment>,
        policy: &Policy,
    ) -> usize {
        for n in 0..50 {
            let next = step(hosts, vms, cur, policy);
            let same = next == *cur;
            *cur = next;
            if !react(hosts, vms, cur) && same {
                return n;
            }
        }
        panic!("no fixed point in 50 steps: {cur:#?}");
    }

    /// Roles per host: (primaries, backups, destinations).
    fn roles(p: &BTreeMap<String, Assignment>, h: &str) -> (usize, usize, usize) {
        let n = |f: fn(&Assignment) -> &Option<String>| {
            p.values().filter(|a| f(a).as_deref() == Some(h)).count()
        };
        (n(|a| &a.primary), n(|a| &a.backup), n(|a| &a.moving_to))
    }

    fn healths(
        hosts: &[HostView],
        vms: &[VmView],
        p: &BTreeMap<String, Assignment>,
    ) -> Vec<Health> {
        vms.iter().map(|v| health(hosts, v, &p[&v.name])).collect()
    }

    fn used(
        hosts: &[HostView],
        vms: &[VmView],
        p: &BTreeMap<String, Assignment>,
    ) -> Vec<(u64, u64)> {
        let by_name = vms.iter().map(|v| (v.name.as_str(), v)).collect();
        let f = Fleet::with_roles(hosts, &by_name, p);
        hosts
            .iter()
            .map(|h| (f.used(&h.name).mem, f.used(&h.name).vcpus))
            .collect()
    }

    #[test]
    fn primary_and_backup_never_share_a_host() {
        let policy = Policy::default();
        let mut hosts = vec![host("a", "", 16, 16), host("b", "", 16, 16)];
        let mut vms = vms(3, 1, 1);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        for a in p.values() {
            assert!(a.primary.is_some() && a.backup.is_some() && a.primary != a.backup);
        }
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 3]);
        // One host alive: nowhere to put a backup but the primary's host.
        find(&mut hosts, "b").alive = false;
        settle(&mut hosts, &mut vms, &mut p, &policy);
        for (vm, a) in &p {
            assert_eq!(a.primary.as_deref(), Some("a"), "{vm}");
            assert_eq!(a.backup, None, "{vm}");
        }
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Unprotected; 3]);
    }

    #[test]
    fn failure_domains_are_respected_when_the_labels_allow() {
        let policy = Policy::default();
        // a1 and a2 share rack r1, b1 is alone in r2 and the most loaded.
        let mut hosts = vec![
            host("a1", "r1", 16, 16),
            host("a2", "r1", 16, 16),
            host("b1", "r2", 16, 16),
        ];
        let mut vms = vec![vm("big", 8, 1), vm("x", 1, 1)];
        vms[0].owner = Some("b1".into());
        vms[1].owner = Some("a1".into());
        // a2 is emptier and keeps x's image: the domain still wins.
        find(&mut hosts, "a2").images.insert("x".into());
        let p = step(&hosts, &vms, &BTreeMap::new(), &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("b1"));
        // b1 cannot take it (lost): the rule gives way, a2 (its image) is chosen.
        find(&mut hosts, "b1").alive = false;
        let p = step(&hosts, &vms, &p, &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("a2"));
        // Back, but full: still in r1.
        let b1 = find(&mut hosts, "b1");
        b1.alive = true;
        b1.mem_bytes = 8 * GIB;
        let p = step(&hosts, &vms, &p, &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("a2"));
        // An unlabelled host is outside every domain.
        hosts.push(host("z", "", 16, 16));
        let mut cur = p.clone();
        cur.get_mut("x").unwrap().backup = None;
        let p = step(&hosts, &vms, &cur, &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("z"));
    }

    #[test]
    fn failure_domains_are_ignored_when_they_cannot_be_kept() {
        let policy = Policy::default();
        // Everyone in one rack, or no labels at all: backups go by room.
        for label in ["r1", ""] {
            let mut hosts = ["a", "b", "c"].map(|n| host(n, label, 16, 16)).to_vec();
            let mut vms = vms(4, 2, 1);
            let mut p = BTreeMap::new();
            settle(&mut hosts, &mut vms, &mut p, &policy);
            assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 4]);
        }
    }

    #[test]
    fn six_vms_on_three_equal_hosts_spread_by_free_memory() {
        let policy = Policy::default();
        let mut hosts = hosts3(16);
        let mut vms = vms(6, 2, 2);
        let mut p = BTreeMap::new();
        let first = step(&hosts, &vms, &p, &policy);
        assert_eq!(healths(&hosts, &vms, &first), vec![Health::Booting; 6]);
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert_eq!(p, first, "protected at the first step, nothing moves after");
        for h in ["a", "b", "c"] {
            assert_eq!(roles(&p, h), (2, 2, 0), "{h}: {p:#?}");
        }
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 6]);
    }

    #[test]
    fn a_hosts_primaries_have_their_backups_spread_over_the_others() {
        // 12 VMs on 4 hosts, placed one at a time as `castor vm create`
        // adds them: a host's loss must not land all its primaries on one
        // survivor.
        let policy = Policy::default();
        let mut hosts: Vec<HostView> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| host(n, "", 16, 16))
            .collect();
        let all = vms(12, 1, 1);
        let mut placed: Vec<VmView> = Vec::new();
        let mut p = BTreeMap::new();
        for v in all {
            placed.push(v);
            settle(&mut hosts, &mut placed, &mut p, &policy);
        }
        for h in ["a", "b", "c", "d"] {
            assert_eq!(roles(&p, h).0, 3, "{h}: primaries spread by vCPUs: {p:#?}");
            let backups: BTreeSet<&str> = p
                .values()
                .filter(|a| a.primary.as_deref() == Some(h))
                .filter_map(|a| a.backup.as_deref())
                .collect();
            let primaries = roles(&p, h).0;
            assert!(
                primaries < 2 || backups.len() >= 2,
                "{h}'s {primaries} primaries are all backed up on {backups:?}: {p:#?}"
            );
        }
    }

    #[test]
    fn capacity_is_never_exceeded_and_a_vm_that_fits_nowhere_is_unplaced() {
        let policy = Policy::default();
        let mut hosts = vec![host("a", "", 4, 4), host("b", "", 4, 4)];
        let mut vms = vec![
            vm("big", 5, 1),
            vm("m1", 3, 1),
            vm("m2", 3, 1),
            vm("cpu", 1, 5),
        ];
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert_eq!(p["big"], Assignment::default());
        assert_eq!(p["cpu"], Assignment::default(), "5 vCPUs fit on no host");
        assert_eq!(
            healths(&hosts, &vms, &p),
            vec![
                Health::Unplaced,
                Health::Unprotected,
                Health::Unprotected,
                Health::Unplaced
            ]
        );
        assert_ne!(p["m1"].primary, p["m2"].primary);
        for ((mem, vcpus), h) in used(&hosts, &vms, &p).into_iter().zip(&hosts) {
            assert!(
                mem <= h.mem_bytes && vcpus <= u64::from(h.vcpus),
                "{}",
                h.name
            );
        }
        // A backup uses no vCPU: two 3-vCPU guests protect each other on 4-vCPU hosts.
        let mut vms = vec![vm("p", 1, 3), vm("q", 1, 3)];
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 2]);
        // Its takeover over-commits b's vCPUs: kept, and b is given nothing new.
        let b_primary = p
            .iter()
            .find(|(_, a)| a.primary.as_deref() == Some("b"))
            .unwrap()
            .0
            .clone();
        let on_a = if b_primary == "p" { "q" } else { "p" };
        find(&mut hosts, "a").alive = false;
        react(&mut hosts, &mut vms, &p);
        assert_eq!(
            vms.iter()
                .find(|v| v.name == on_a)
                .unwrap()
                .owner
                .as_deref(),
            Some("b")
        );
        let p = step(&hosts, &vms, &p, &policy);
        assert_eq!(used(&hosts, &vms, &p)[1].1, 6, "6 vCPUs used of b's 4");
        // b takes no new primary; a backup runs no vCPU, its memory fits.
        hosts.push(host("c", "", 4, 4));
        let mut extra = vms.clone();
        extra.push(vm("new", 1, 1));
        let p = step(&hosts, &extra, &p, &policy);
        assert_eq!(p["new"].primary.as_deref(), Some("c"));
        assert_eq!(p["new"].backup.as_deref(), Some("b"));
        assert_eq!(p["p"].backup.as_deref(), Some("c"));
        assert_eq!(p["q"].backup.as_deref(), Some("c"));
        // A host over-committed in memory gets nothing.
        let mut fat = extra.clone();
        fat.push(vm("fat", 3, 1));
        let mut over = p.clone();
        over.insert(
            "fat".into(),
            Assignment {
                primary: Some("b".into()),
                backup: None,
                moving_to: None,
            },
        );
        fat[3].owner = Some("b".into());
        over.get_mut("new").unwrap().backup = None;
        let p = step(&hosts, &fat, &over, &policy);
        assert_eq!(p["new"].backup, None, "b: 5 GiB used of 4, c runs new");
    }

    #[test]
    fn moves_are_limited_per_step() {
        let mut hosts = hosts3(32);
        let mut vms = vms(9, 1, 1);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &Policy::default());
        find(&mut hosts, "a").drained = true;
        let loose = Policy {
            max_moves: 2,
            migrations_per_host: 5,
        };
        let next = step(&hosts, &vms, &p, &loose);
        assert_eq!(roles(&next, "b").2 + roles(&next, "c").2, 2, "max_moves");
        let next = step(&hosts, &vms, &p, &Policy::default());
        assert_eq!(
            roles(&next, "b").2 + roles(&next, "c").2,
            1,
            "migrations_per_host"
        );
        let none = Policy {
            max_moves: 0,
            migrations_per_host: 1,
        };
        let next = step(&hosts, &vms, &p, &none);
        assert!(next.values().all(|a| a.moving_to.is_none()));
        // Healing is not limited: a's three backups are replaced at once.
        assert_eq!(roles(&next, "a").1, 0);
        // Two drained hosts, two migrations at once, one from each.
        find(&mut hosts, "b").drained = true;
        hosts.push(host("d", "", 32, 16));
        let next = step(&hosts, &vms, &p, &Policy::default());
        let sources: BTreeSet<_> = next
            .values()
            .filter(|a| a.moving_to.is_some())
            .map(|a| a.primary.clone().unwrap())
            .collect();
        assert_eq!(sources, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn healing_after_a_host_loss_prefers_a_host_keeping_the_image() {
        let policy = Policy::default();
        let mut hosts = ["a", "b", "c", "d"].map(|n| host(n, "", 16, 16)).to_vec();
        let mut vms = vec![vm("x", 2, 1), vm("y", 2, 1)];
        vms[0].owner = Some("a".into());
        vms[1].owner = Some("c".into());
        let a = |p: &str, b: &str| Assignment {
            primary: Some(p.into()),
            backup: Some(b.into()),
            moving_to: None,
        };
        let cur = BTreeMap::from([("x".to_owned(), a("a", "b")), ("y".to_owned(), a("c", "a"))]);
        find(&mut hosts, "b").alive = false;
        // d has the most room (c runs y), c keeps x's image from an earlier role.
        find(&mut hosts, "c").images.insert("x".into());
        let p = step(&hosts, &vms, &cur, &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("c"));
        // Without the image, the most room.
        find(&mut hosts, "c").images.clear();
        let p = step(&hosts, &vms, &cur, &policy);
        assert_eq!(p["x"].backup.as_deref(), Some("d"));
        // The primary lost too: the backup is kept as it is, nothing chosen.
        find(&mut hosts, "a").alive = false;
        find(&mut hosts, "b").alive = true;
        let p = step(&hosts, &vms, &cur, &policy);
        assert_eq!(p["x"], cur["x"]);
        assert_eq!(health(&hosts, &vms[0], &p["x"]), Health::Unprotected);
        find(&mut hosts, "b").alive = false;
        assert_eq!(health(&hosts, &vms[0], &p["x"]), Health::Lost);
        let p = step(&hosts, &vms, &cur, &policy);
        assert_eq!(
            p["x"], cur["x"],
            "a lost backup stays too: only it can take over"
        );
    }

    #[test]
    fn a_takeover_gives_a_new_backup() {
        let policy = Policy::default();
        let mut hosts = hosts3(16);
        let mut vms = vms(1, 2, 1);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        let (old_p, old_b) = (
            p["vm0"].primary.clone().unwrap(),
            p["vm0"].backup.clone().unwrap(),
        );
        find(&mut hosts, &old_p).alive = false;
        // The witness names the backup.
        vms[0].owner = Some(old_b.clone());
        let next = step(&hosts, &vms, &p, &policy);
        assert_eq!(next["vm0"].primary, Some(old_b.clone()));
        let new_b = next["vm0"].backup.clone().unwrap();
        assert!(new_b != old_b && new_b != old_p);
        assert_eq!(health(&hosts, &vms[0], &next["vm0"]), Health::Protected);
        // Had the old primary been alive, it could have been chosen: it keeps the image.
        find(&mut hosts, &old_p).alive = true;
        let next = step(&hosts, &vms, &p, &policy);
        assert_eq!(next["vm0"].backup, Some(old_p));
    }

    #[test]
    fn the_primary_follows_the_witness() {
        let policy = Policy::default();
        let mut hosts = hosts3(16);
        let mut vms = vms(1, 2, 1);
        // The owner's host is lost: it stays the primary, only the witness moves it.
        vms[0].owner = Some("a".into());
        find(&mut hosts, "a").alive = false;
        let p = step(&hosts, &vms, &BTreeMap::new(), &policy);
        assert_eq!(
            p["vm0"],
            Assignment {
                primary: Some("a".into()),
                ..Default::default()
            }
        );
        assert_eq!(health(&hosts, &vms[0], &p["vm0"]), Health::Lost);
        // An owner no host of the fleet knows is followed as well.
        vms[0].owner = Some("gone".into());
        let q = step(&hosts, &vms, &p, &policy);
        assert_eq!(q["vm0"].primary.as_deref(), Some("gone"));
        // A migration is done when the destination owns the VM.
        find(&mut hosts, "a").alive = true;
        find(&mut hosts, "a").drained = true;
        vms[0].owner = Some("a".into());
        let cur = BTreeMap::from([(
            "vm0".to_owned(),
            Assignment {
                primary: Some("a".into()),
                backup: Some("b".into()),
                moving_to: Some("c".into()),
            },
        )]);
        assert_eq!(step(&hosts, &vms, &cur, &policy), cur, "under way");
        assert_eq!(health(&hosts, &vms[0], &cur["vm0"]), Health::Moving);
        vms[0].owner = Some("c".into());
        let done = step(&hosts, &vms, &cur, &policy);
        assert_eq!(
            done["vm0"],
            Assignment {
                primary: Some("c".into()),
                backup: Some("b".into()),
                moving_to: None
            }
        );
        // A destination lost, drained, or no longer needed (undrained) is cleared.
        vms[0].owner = Some("a".into());
        find(&mut hosts, "c").alive = false;
        assert_eq!(step(&hosts, &vms, &cur, &policy)["vm0"].moving_to, None);
        find(&mut hosts, "c").alive = true;
        find(&mut hosts, "c").drained = true;
        assert_eq!(step(&hosts, &vms, &cur, &policy)["vm0"].moving_to, None);
        find(&mut hosts, "c").drained = false;
        find(&mut hosts, "a").drained = false;
        assert_eq!(step(&hosts, &vms, &cur, &policy)["vm0"].moving_to, None);
        // A takeover by the backup: the backup is freed for a new one.
        vms[0].owner = Some("b".into());
        let t = step(&hosts, &vms, &cur, &policy);
        assert_eq!(t["vm0"].primary.as_deref(), Some("b"));
        assert!(t["vm0"].backup.is_some() && t["vm0"].backup.as_deref() != Some("b"));
    }

    #[test]
    fn deleted_vms_are_dropped_and_new_ones_placed() {
        let policy = Policy::default();
        let mut hosts = hosts3(16);
        let mut vms = vms(3, 2, 1);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        vms.remove(1);
        vms.push(vm("late", 2, 1));
        let next = step(&hosts, &vms, &p, &policy);
        assert_eq!(
            next.keys().collect::<Vec<_>>(),
            ["late", "vm0", "vm2"].iter().collect::<Vec<_>>()
        );
        assert_eq!(health(&hosts, &vms[2], &next["late"]), Health::Booting);
    }

    #[test]
    fn drain_moves_primaries_away_within_the_limits_and_empties_the_host() {
        let policy = Policy::default();
        let mut hosts = hosts3(32);
        hosts.push(host("d", "", 32, 16));
        let mut vms = vms(8, 2, 2);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert_eq!(roles(&p, "a"), (2, 2, 0));
        find(&mut hosts, "a").drained = true;
        let mut steps = 0;
        loop {
            let next = step(&hosts, &vms, &p, &policy);
            let (primaries, backups, dests) = roles(&next, "a");
            assert_eq!((backups, dests), (0, 0), "a's backups are replaced at once");
            let moving: Vec<&Assignment> =
                next.values().filter(|a| a.moving_to.is_some()).collect();
            assert!(moving.len() <= 1, "one migration away from a at a time");
            for a in &moving {
                assert_eq!(a.primary.as_deref(), Some("a"));
                assert!(a.moving_to != a.backup);
            }
            p = next;
            let moved = react(&mut hosts, &mut vms, &p);
            steps += 1;
            if primaries == 0 && !moved {
                break;
            }
            assert!(steps < 10);
        }
        assert_eq!(roles(&p, "a"), (0, 0, 0));
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 8]);
        // Nothing more: a drained host holds nothing and gets nothing.
        assert!(settle(&mut hosts, &mut vms, &mut p, &policy) <= 2);
        assert_eq!(roles(&p, "a"), (0, 0, 0));
        // Undrained, it receives backups again.
        find(&mut hosts, "a").drained = false;
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert!(roles(&p, "a").1 > 0);
    }

    #[test]
    fn a_returning_host_receives_backups_again_then_the_placement_rests() {
        let policy = Policy::default();
        let mut hosts = hosts3(16);
        let mut vms = vms(6, 2, 2);
        let mut p = BTreeMap::new();
        settle(&mut hosts, &mut vms, &mut p, &policy);
        let held: BTreeSet<String> = p
            .iter()
            .filter(|(_, a)| a.primary.as_deref() == Some("c") || a.backup.as_deref() == Some("c"))
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(held.len(), 4);
        // c is lost: takeovers, then healing on a and b.
        find(&mut hosts, "c").alive = false;
        settle(&mut hosts, &mut vms, &mut p, &policy);
        assert_eq!(roles(&p, "a").0 + roles(&p, "b").0, 6);
        assert_eq!(roles(&p, "c"), (0, 0, 0));
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 6]);
        // c returns empty but with the images of the 4 VMs it held.
        let c = find(&mut hosts, "c");
        c.alive = true;
        c.images = held.clone();
        let mut moves = Vec::new();
        for _ in 0..10 {
            let next = step(&hosts, &vms, &p, &policy);
            let moved: Vec<String> = next
                .iter()
                .filter(|(n, a)| a.backup != p[*n].backup)
                .map(|(n, _)| n.clone())
                .collect();
            assert!(moved.len() <= policy.max_moves);
            p = next;
            react(&mut hosts, &mut vms, &p);
            if moved.is_empty() {
                break;
            }
            moves.push(moved);
        }
        let all: Vec<&String> = moves.iter().flatten().collect();
        assert!(all.len() >= 2, "{moves:?}");
        // Images first: the first moves are VMs whose image c keeps.
        assert!(
            moves[0].iter().all(|n| held.contains(n)),
            "{moves:?} {held:?}"
        );
        // Balanced: 2 GiB × 12 roles over 3 hosts.
        for h in ["a", "b", "c"] {
            let (pr, b, _) = roles(&p, h);
            assert_eq!(pr + b, 4, "{h}: {p:#?}");
        }
        // A fixed point: nothing moves any more.
        assert_eq!(settle(&mut hosts, &mut vms, &mut p, &policy), 0);
        assert_eq!(healths(&hosts, &vms, &p), vec![Health::Protected; 6]);
    }

    #[test]
    fn rebalancing_never_brings_a_backup_into_the_primarys_domain() {
        let policy = Policy::default();
        // x runs in r1 with its backup in r2, on a loaded host; an empty
        // host in r1 would balance better but is in x's domain.
        let hosts = vec![
            host("p", "r1", 16, 16),
            host("q", "r2", 16, 16),
            host("e", "r1", 16, 16),
        ];
        let mut vms = vec![vm("x", 4, 1), vm("y", 4, 1), vm("z", 4, 1)];
        vms[0].owner = Some("p".into());
        vms[1].owner = Some("q".into());
        vms[2].owner = Some("q".into());
        let cur = BTreeMap::from([
            (
                "x".to_owned(),
                Assignment {
                    primary: Some("p".into()),
                    backup: Some("q".into()),
                    moving_to: None,
                },
            ),
            (
                "y".to_owned(),
                Assignment {
                    primary: Some("q".into()),
                    backup: Some("p".into()),
                    moving_to: None,
                },
            ),
            (
                "z".to_owned(),
                Assignment {
                    primary: Some("q".into()),
                    backup: Some("e".into()),
                    moving_to: None,
                },
            ),
        ]);
        let next = step(&hosts, &vms, &cur, &policy);
        assert_eq!(next["x"].backup.as_deref(), Some("q"));
    }

    #[test]
    fn check_names_what_a_placement_breaks() {
        let policy = Policy::default();
        let mut hosts = hosts3(4);
        hosts[0].domain = "r1".into();
        hosts[1].domain = "r1".into();
        hosts[2].domain = "r2".into();
        let mut vms = vms(2, 2, 1);
        vms[0].owner = Some("a".into());
        let a = |p: &str, b: Option<&str>, t: Option<&str>| Assignment {
            primary: Some(p.into()),
            backup: b.map(Into::into),
            moving_to: t.map(Into::into),
        };
        let prev = BTreeMap::from([
            ("vm0".to_owned(), a("a", Some("c"), None)),
            ("vm1".to_owned(), Assignment::default()),
        ]);
        let with = |vm0: Assignment, vm1: Assignment| {
            BTreeMap::from([("vm0".to_owned(), vm0), ("vm1".to_owned(), vm1)])
        };
        let ok = with(a("a", Some("c"), None), a("b", Some("c"), None));
        assert_eq!(check(&hosts, &vms, &prev, &ok, &policy), Ok(()));
        let err = |next: BTreeMap<String, Assignment>| {
            check(&hosts, &vms, &prev, &next, &policy).unwrap_err()
        };

        let mut missing = ok.clone();
        missing.remove("vm1");
        assert_eq!(err(missing), Violation::Missing("vm1".into()));
        let mut extra = ok.clone();
        extra.insert("ghost".into(), Assignment::default());
        assert_eq!(err(extra), Violation::Unknown("ghost".into()));
        let v = err(with(a("a", Some("a"), None), Assignment::default()));
        assert!(
            matches!(v, Violation::SharedHost { ref host, .. } if host == "a"),
            "{v}"
        );
        assert!(v.to_string().contains("vm0") && v.to_string().contains("primary and backup"));
        let v = err(with(a("b", Some("c"), None), Assignment::default()));
        assert!(matches!(v, Violation::NotOwner { .. }), "{v}");
        let mut dead = hosts.clone();
        dead[1].alive = false;
        let v = check(
            &dead,
            &vms,
            &prev,
            &with(a("a", Some("c"), None), a("b", None, None)),
            &policy,
        )
        .unwrap_err();
        assert_eq!(
            v,
            Violation::Ineligible {
                vm: "vm1".into(),
                role: "primary",
                host: "b".into(),
                why: "not alive"
            }
        );
        // c holds vm0's backup (2 of 4 GiB): a 3 GiB VM more over-commits it.
        let mut big = vms.clone();
        big[1].mem_bytes = 3 * GIB;
        let v = check(
            &hosts,
            &big,
            &prev,
            &with(a("a", Some("c"), None), a("c", None, None)),
            &policy,
        )
        .unwrap_err();
        assert!(
            matches!(v, Violation::OverCommitted { ref host, what: "memory", .. } if host == "c"),
            "{v}"
        );
        // A new backup in the primary's rack r1 while c (r2) has room.
        let v = err(with(a("a", Some("c"), None), a("a", Some("b"), None)));
        assert!(
            matches!(v, Violation::Domain { ref instead, .. } if instead == "c"),
            "{v}"
        );
        // Too many moves and migrations.
        let mut drained = hosts.clone();
        drained[0].drained = true;
        let two = with(a("a", Some("c"), Some("b")), Assignment::default());
        let strict = Policy {
            max_moves: 0,
            migrations_per_host: 1,
        };
        assert!(matches!(
            check(&drained, &vms, &prev, &two, &strict),
            Err(Violation::TooManyMoves { moves: 1, max: 0 })
        ));
        let mut both = vms.clone();
        both[1].owner = Some("a".into());
        let prev2 = with(a("a", Some("c"), None), a("a", Some("c"), None));
        let next2 = with(a("a", Some("c"), Some("b")), a("a", Some("c"), Some("b")));
        let mut roomy = drained.clone();
        roomy[1].mem_bytes = 16 * GIB;
        assert!(matches!(
            check(&roomy, &both, &prev2, &next2, &policy),
            Err(Violation::TooManyMigrations {
                migrations: 2,
                max: 1,
                ..
            })
        ));
    }

    #[test]
    fn health_names_each_state() {
        let mut hosts = hosts3(16);
        let mut v = vm("v", 1, 1);
        let a = |p: Option<&str>, b: Option<&str>, t: Option<&str>| Assignment {
            primary: p.map(Into::into),
            backup: b.map(Into::into),
            moving_to: t.map(Into::into),
        };
        assert_eq!(health(&hosts, &v, &a(None, None, None)), Health::Unplaced);
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), None)),
            Health::Booting
        );
        v.owner = Some("a".into());
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), None)),
            Health::Protected
        );
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), None, None)),
            Health::Unprotected
        );
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), Some("c"))),
            Health::Moving
        );
        find(&mut hosts, "b").alive = false;
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), None)),
            Health::Unprotected
        );
        find(&mut hosts, "a").alive = false;
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), None)),
            Health::Lost
        );
        find(&mut hosts, "b").alive = true;
        assert_eq!(
            health(&hosts, &v, &a(Some("a"), Some("b"), None)),
            Health::Unprotected
        );
        assert_eq!(
            serde_json::to_string(&Health::Unprotected).unwrap(),
            "\"unprotected\""
        );
    }

    /// 200 seeds; `CASTOR_FLEET_SEED=N` replays one, `CASTOR_FLEET_SEEDS=N`
    /// runs N.
    fn seeds() -> std::ops::Range<u64> {
        let var = |v: &str| std::env::var(v).ok().and_then(|s| s.parse().ok());
        match (var("CASTOR_FLEET_SEED"), var("CASTOR_FLEET_SEEDS")) {
            (Some(seed), _) => seed..seed + 1,
            (None, n) => 0..n.unwrap_or(200),
        }
    }

    #[test]
    fn two_hundred_seeded_fleets_keep_the_invariants_and_settle() {
        let mut total = SimReport::default();
        for seed in seeds() {
            match simulate(seed, 200) {
                Ok(r) => total += &r,
                Err(e) => panic!("{e}"),
            }
        }
        println!("{total:?}");
        if seeds().count() > 1 {
            assert!(total.events > 0 && total.takeovers > 0);
            assert!(total.migrations > 0 && total.rebalances > 0);
        }
    }

    #[test]
    fn the_same_seed_replays_the_same_run() {
        assert_eq!(simulate(7, 120), simulate(7, 120));
        assert_ne!(simulate(7, 120), simulate(8, 120));
    }

    /// A leader that swaps a backup whose primary is lost for a fresh one
    /// (within every limit `check` knows): that backup has no replica to
    /// take over from, and the one that had it is stopped.
    fn swaps_a_lost_primarys_backup(
        hosts: &[HostView],
        vms: &[VmView],
        cur: &BTreeMap<String, Assignment>,
        policy: &Policy,
    ) -> BTreeMap<String, Assignment> {
        let mut next = place(hosts, vms, cur, policy);
        let by_name = vms.iter().map(|v| (v.name.as_str(), v)).collect();
        for vm in vms {
            let moves = started_moves(hosts, cur, &next);
            if moves.0 + moves.1 >= policy.max_moves {
                break;
            }
            let f = Fleet::with_roles(hosts, &by_name, &next);
            let a = &next[&vm.name];
            let (Some(p), Some(b)) = (a.primary.as_deref(), a.backup.as_deref()) else {
                continue;
            };
            if f.alive(p) || !f.eligible(b) {
                continue;
            }
            let exclude = [Some(p), Some(b), a.moving_to.as_deref()];
            if let Some(t) = f.choose(vm, Kind::Backup, &exclude, f.domain(p), true, &|_| 0) {
                let t = t.to_owned();
                next.get_mut(&vm.name).unwrap().backup = Some(t);
            }
        }
        next
    }

    /// A leader that leaves backups on drained hosts: nothing new is given
    /// there, so `check` passes; the end state does not.
    fn keeps_drained_backups(
        hosts: &[HostView],
        vms: &[VmView],
        cur: &BTreeMap<String, Assignment>,
        policy: &Policy,
    ) -> BTreeMap<String, Assignment> {
        let mut next = place(hosts, vms, cur, policy);
        for (name, a) in next.iter_mut() {
            let Some(was) = cur.get(name).and_then(|w| w.backup.as_deref()) else {
                continue;
            };
            let drained = hosts.iter().any(|h| h.name == was && h.alive && h.drained);
            if drained && a.primary.as_deref() != Some(was) && a.moving_to.as_deref() != Some(was) {
                a.backup = Some(was.to_owned());
            }
        }
        next
    }

    /// A leader that does not see drains: it gives drained hosts new roles.
    fn ignores_drains(
        hosts: &[HostView],
        vms: &[VmView],
        cur: &BTreeMap<String, Assignment>,
        policy: &Policy,
    ) -> BTreeMap<String, Assignment> {
        let undrained: Vec<HostView> = hosts
            .iter()
            .map(|h| HostView {
                drained: false,
                ..h.clone()
            })
            .collect();
        place(&undrained, vms, cur, policy)
    }

    #[test]
    fn the_simulation_finds_planted_bugs() {
        let bugs: [(&str, sim::Placer, &str); 3] = [
            (
                "swaps_a_lost_primarys_backup",
                swaps_a_lost_primarys_backup,
                "the backup holding its replica",
            ),
            (
                "keeps_drained_backups",
                keeps_drained_backups,
                "stays on a drained host",
            ),
            ("ignores_drains", ignores_drains, "which is drained"),
        ];
        for (bug, placer, says) in bugs {
            let found = (0..200).find_map(|seed| sim::run(seed, 200, placer).err());
            let e = found.unwrap_or_else(|| panic!("{bug}: not found in 200 seeds"));
            let first = e.lines().next().unwrap();
            println!("{bug}: {first}");
            assert!(first.contains(says), "{bug}: {e}");
        }
    }
}
