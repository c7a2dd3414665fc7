//! A seeded simulation of the fleet's placement.
//!
//! A small world — 3 to 5 hosts, sometimes labelled with two failure
//! domains, and 4 to 12 VMs of small random sizes, each of which fits on
//! any host — is driven from one seed, under [`Policy::default`] or limits
//! drawn at random. Each step may bring one event (a
//! host is lost, a lost host returns with the images of the VMs it had a
//! role for, a host is drained or undrained); then [`place`] computes the
//! next placement, [`check`] judges it against the previous one, and the
//! world reacts as agents and the witness would:
//!
//! - replicas sync: the hosts of a running primary, of its backup and of
//!   its migration's destination keep the VM's image, and that backup holds
//!   a current replica;
//! - a never-booted VM boots on its primary (the witness names it owner);
//! - a VM whose owner's host is lost is taken over by its backup if that
//!   host is alive and holds a current replica (one that never synced waits
//!   with the VM for its host); the placement must still name that backup:
//!   a backup is never swapped while its primary is lost;
//! - a migration whose source and destination are alive completes (the
//!   destination becomes the owner).
//!
//! The owner changes only in those three ways: to its primary at boot, to
//! its backup at a takeover, to its destination at a migration — "never two
//! primaries" in the model's terms, asserted at every step. The last
//! [`QUIET`] steps bring no event; a run at least that long must then end
//! at a fixed point (placing again changes nothing, the world does not
//! move) where every VM that can be protected is: any VM not
//! [`Health::Protected`] (or [`Health::Lost`], its owner's host gone with
//! its backup) is an error if some alive, undrained host has room for what
//! it lacks, and so is a role left on a drained host that another host has
//! room for.
//!
//! The same seed replays the same run; an error names the seed, the step
//! and the trace of the last events and changes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use crate::rng::Rng;

use super::{
    check, health, place, started_moves, Assignment, Fleet, Health, HostView, Kind, Policy, VmView,
};

/// The steps at the end of a run with no event. Enough to settle: one
/// move a step can need two steps a VM (a backup moved out of the way, then
/// the migration) for a drained host that runs all 12 VMs; 100,000 seeds
/// settled within 30.
pub const QUIET: usize = 30;

const GIB: u64 = 1 << 30;
const TRACE: usize = 60;

/// What a clean run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Steps run.
    pub steps: usize,
    /// Events injected (host lost, returned, drained, undrained).
    pub events: usize,
    /// Takeovers: a backup became the owner.
    pub takeovers: usize,
    /// Migrations completed: a destination became the owner.
    pub migrations: usize,
    /// Backups moved by rebalancing.
    pub rebalances: usize,
}

impl std::ops::AddAssign<&SimReport> for SimReport {
    fn add_assign(&mut self, o: &SimReport) {
        self.steps += o.steps;
        self.events += o.events;
        self.takeovers += o.takeovers;
        self.migrations += o.migrations;
        self.rebalances += o.rebalances;
    }
}

/// A placement function: [`place`], or a broken one to show that the
/// simulation finds it.
pub(super) type Placer = fn(
    &[HostView],
    &[VmView],
    &BTreeMap<String, Assignment>,
    &Policy,
) -> BTreeMap<String, Assignment>;

struct World {
    seed: u64,
    step: usize,
    hosts: Vec<HostView>,
    vms: Vec<VmView>,
    placement: BTreeMap<String, Assignment>,
    /// The backup that holds a current replica of each VM.
    synced: BTreeMap<String, String>,
    trace: VecDeque<String>,
}

impl World {
    fn new(rng: &mut Rng, seed: u64) -> World {
        let labelled = rng.chance(500);
        // Hosts of 4-12 GiB (capacity decides) or, in half the worlds,
        // 24-48 GiB (room for most); VMs of 0.5-4 GiB.
        let (least, most) = if rng.chance(500) { (48, 96) } else { (8, 24) };
        let hosts = (0..rng.range_inclusive(3, 5))
            .map(|i| HostView {
                name: format!("h{i}"),
                domain: if labelled {
                    format!("r{}", rng.below(2))
                } else {
                    String::new()
                },
                mem_bytes: rng.range_inclusive(least, most) * GIB / 2,
                vcpus: rng.range_inclusive(8, 16) as u32,
                images: Default::default(),
                alive: true,
                drained: false,
            })
            .collect();
        let vms = (0..rng.range_inclusive(4, 12))
            .map(|i| VmView {
                name: format!("vm{i}"),
                mem_bytes: rng.range_inclusive(1, 8) * GIB / 2,
                vcpus: rng.range_inclusive(1, 4) as u32,
                owner: None,
            })
            .collect();
        World {
            seed,
            step: 0,
            hosts,
            vms,
            placement: BTreeMap::new(),
            synced: BTreeMap::new(),
            trace: VecDeque::new(),
        }
    }

    fn note(&mut self, line: String) {
        if self.trace.len() >= TRACE {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>4}  {line}", self.step));
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        let mut s = format!(
            "seed {} step {}: {what}\nreplay: castor_node::fleet::simulate({}, steps)\nhosts:\n",
            self.seed, self.step, self.seed
        );
        for h in &self.hosts {
            let _ = writeln!(
                s,
                "  {} domain {:?} {:.1} GiB {} vCPUs{}{}",
                h.name,
                h.domain,
                h.mem_bytes as f64 / GIB as f64,
                h.vcpus,
                if h.alive { "" } else { " LOST" },
                if h.drained { " drained" } else { "" }
            );
        }
        s.push_str("vms:\n");
        for v in &self.vms {
            let _ = writeln!(
                s,
                "  {} {:.1} GiB {} vCPUs owner {:?}: {:?}",
                v.name,
                v.mem_bytes as f64 / GIB as f64,
                v.vcpus,
                v.owner,
                self.placement.get(&v.name)
            );
        }
        s.push_str("last events:\n");
        for l in &self.trace {
            let _ = writeln!(s, "  {l}");
        }
        s
    }

    fn host_mut(&mut self, name: &str) -> &mut HostView {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .expect("a host of the world")
    }

    fn alive(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.name == name && h.alive)
    }

    /// Maybe one event; whether one happened.
    fn event(&mut self, rng: &mut Rng) -> bool {
        let mut kind = rng.below(4);
        // A fleet down to its last two hosts more often gets one back than
        // loses another.
        let alive = self.hosts.iter().filter(|h| h.alive).count();
        if kind == 0 && alive <= 2 && rng.chance(600) {
            kind = 1;
        }
        let cands: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| match kind {
                0 => h.alive,
                1 => !h.alive,
                2 => h.alive && !h.drained,
                _ => h.drained,
            })
            .map(|h| h.name.clone())
            .collect();
        if cands.is_empty() {
            return false;
        }
        let name = cands[rng.below(cands.len() as u64) as usize].clone();
        let held: Vec<String> = self
            .placement
            .iter()
            .filter(|(_, a)| Kind::ALL.iter().any(|k| k.of(a) == Some(name.as_str())))
            .map(|(vm, _)| vm.clone())
            .collect();
        let h = self.host_mut(&name);
        let what = match kind {
            0 => {
                h.alive = false;
                "lost"
            }
            1 => {
                h.alive = true;
                h.images.extend(held);
                "returns"
            }
            2 => {
                h.drained = true;
                "drained"
            }
            _ => {
                h.drained = false;
                "undrained"
            }
        };
        self.note(format!("event: host {name} {what}"));
        true
    }

    /// Trace what changed from the current placement to `next`.
    fn note_changes(&mut self, next: &BTreeMap<String, Assignment>) {
        let mut lines = Vec::new();
        for (vm, a) in next {
            let was = self.placement.get(vm).cloned().unwrap_or_default();
            for kind in Kind::ALL {
                if kind.of(&was) != kind.of(a) {
                    lines.push(format!(
                        "place: {vm} {} {:?} -> {:?}",
                        kind.name(),
                        kind.of(&was),
                        kind.of(a)
                    ));
                }
            }
        }
        for l in lines {
            self.note(l);
        }
    }

    /// Replicas sync, then owners change; whether an owner changed.
    fn react(&mut self, report: &mut SimReport) -> Result<bool, String> {
        for i in 0..self.vms.len() {
            let vm = self.vms[i].name.clone();
            let Some(o) = self.vms[i].owner.clone() else {
                continue;
            };
            if !self.alive(&o) {
                continue;
            }
            let a = self.placement[&vm].clone();
            self.host_mut(&o).images.insert(vm.clone());
            // The replica is the placed backup's: one dropped is stopped.
            match a.backup.filter(|b| self.alive(b)) {
                Some(b) => {
                    self.host_mut(&b).images.insert(vm.clone());
                    self.synced.insert(vm.clone(), b);
                }
                None => {
                    self.synced.remove(&vm);
                }
            }
            if let Some(t) = a.moving_to.filter(|t| self.alive(t)) {
                self.host_mut(&t).images.insert(vm.clone());
            }
        }
        let mut changed = false;
        for i in 0..self.vms.len() {
            let vm = self.vms[i].name.clone();
            let a = self.placement[&vm].clone();
            let old = self.vms[i].owner.clone();
            let (new, why) = match old.as_deref() {
                None => (a.primary.clone().filter(|p| self.alive(p)), "boots"),
                Some(o) if !self.alive(o) => {
                    // Only a backup with a current replica takes over; one
                    // that never synced waits with the VM for its host.
                    let synced = self.synced.get(&vm).filter(|s| self.alive(s)).cloned();
                    if let Some(s) = &synced {
                        if a.backup.as_ref() != Some(s) {
                            return Err(self.fail(format!(
                                "{vm}: its primary {o} is lost and the placement dropped {s}, the backup holding its replica, for {:?}",
                                a.backup
                            )));
                        }
                        self.synced.remove(&vm);
                        report.takeovers += 1;
                    }
                    (synced, "takeover")
                }
                Some(_) => {
                    let t = a.moving_to.clone().filter(|t| self.alive(t));
                    if t.is_some() {
                        report.migrations += 1;
                    }
                    (t, "migrated")
                }
            };
            let Some(new) = new else {
                continue;
            };
            // The model's "never two primaries": the owner moves only to
            // its primary at boot, to its backup, or to its destination.
            let allowed = match old {
                None => a.primary.as_ref() == Some(&new),
                Some(_) => a.backup.as_ref() == Some(&new) || a.moving_to.as_ref() == Some(&new),
            };
            if !allowed {
                return Err(self.fail(format!(
                    "{vm}: its owner goes from {old:?} to {new}, neither its backup nor its destination"
                )));
            }
            self.note(format!("world: {vm} {why}: owner {old:?} -> {new}"));
            self.vms[i].owner = Some(new);
            changed = true;
        }
        Ok(changed)
    }

    /// At the end: every VM that can be protected is, and no role stays on
    /// a drained host that another host has room for.
    fn settled(&self) -> Result<(), String> {
        let by_name: BTreeMap<&str, &VmView> =
            self.vms.iter().map(|v| (v.name.as_str(), v)).collect();
        let f = Fleet::with_roles(&self.hosts, &by_name, &self.placement);
        let room = |vm: &VmView, kind: Kind, not: &[Option<&str>]| {
            self.hosts
                .iter()
                .find(|h| {
                    h.alive
                        && !h.drained
                        && !not.contains(&Some(h.name.as_str()))
                        && f.fits(&h.name, vm, kind)
                })
                .map(|h| h.name.clone())
        };
        for vm in &self.vms {
            let a = &self.placement[&vm.name];
            let (p, b, t) = (
                a.primary.as_deref(),
                a.backup.as_deref(),
                a.moving_to.as_deref(),
            );
            let lacking = match health(&self.hosts, vm, a) {
                Health::Protected | Health::Lost => None,
                Health::Unplaced => {
                    room(vm, Kind::Primary, &[]).map(|h| format!("{h} has room for it"))
                }
                Health::Booting => Some("still booting".to_owned()),
                Health::Moving => Some("still moving".to_owned()),
                Health::Unprotected if vm.owner.as_deref().is_some_and(|o| self.alive(o)) => {
                    room(vm, Kind::Backup, &[p, t]).map(|h| format!("{h} has room for a backup"))
                }
                // Its backup never synced: it waits for the owner's host.
                Health::Unprotected => None,
            };
            if let Some(why) = lacking {
                return Err(self.fail(format!(
                    "{}: {:?} at the end: {why}",
                    vm.name,
                    health(&self.hosts, vm, a)
                )));
            }
            let drained = |h: Option<&str>| {
                h.is_some_and(|h| {
                    self.hosts
                        .iter()
                        .any(|x| x.name == h && x.alive && x.drained)
                })
            };
            // (A lost primary's backup stays where it is, drained or not.)
            let runs = vm.owner.as_deref().is_none_or(|o| self.alive(o));
            let left = if !runs {
                None
            } else if drained(b) {
                room(vm, Kind::Backup, &[p, t]).map(|h| ("backup", h))
            } else if drained(p) {
                room(vm, Kind::MovingTo, &[p, b]).map(|h| ("primary", h))
            } else {
                None
            };
            if let Some((role, h)) = left {
                return Err(self.fail(format!(
                    "{}: its {role} stays on a drained host although {h} has room",
                    vm.name
                )));
            }
        }
        Ok(())
    }
}

/// Run the fleet's world from `seed` for `steps` steps, with
/// [`Policy::default`] or, for half the seeds, limits drawn at random (1-3
/// moves a step, 1-2 migrations per host). The last [`QUIET`] steps bring
/// no event and a run of at least [`QUIET`] steps must end at a fixed point
/// where every VM that can be protected is. An error names the seed, the
/// step and a trace.
pub fn simulate(seed: u64, steps: usize) -> Result<SimReport, String> {
    run(seed, steps, place)
}

/// [`simulate`] with a given placement function.
pub(super) fn run(seed: u64, steps: usize, placer: Placer) -> Result<SimReport, String> {
    let mut rng = Rng::new(seed ^ 0xf1ee7);
    let mut w = World::new(&mut rng, seed);
    // The default policy, or one step's limits drawn at random.
    let policy = if rng.chance(500) {
        Policy::default()
    } else {
        Policy {
            max_moves: rng.range_inclusive(1, 3) as usize,
            migrations_per_host: rng.range_inclusive(1, 2) as usize,
        }
    };
    let mut report = SimReport {
        steps,
        ..SimReport::default()
    };
    let mut stable = false;
    for step in 0..steps {
        w.step = step;
        if step + QUIET < steps && rng.chance(300) && w.event(&mut rng) {
            report.events += 1;
        }
        let next = placer(&w.hosts, &w.vms, &w.placement, &policy);
        if let Err(v) = check(&w.hosts, &w.vms, &w.placement, &next, &policy) {
            w.note_changes(&next);
            return Err(w.fail(v));
        }
        report.rebalances += started_moves(&w.hosts, &w.placement, &next).1;
        w.note_changes(&next);
        let same = next == w.placement;
        w.placement = next;
        let moved = w.react(&mut report)?;
        stable = same && !moved;
    }
    if steps >= QUIET {
        w.step = steps;
        let again = placer(&w.hosts, &w.vms, &w.placement, &policy);
        if !stable || again != w.placement {
            w.note_changes(&again);
            return Err(w.fail(format!("no fixed point {QUIET} steps after the last event")));
        }
        w.settled()?;
    }
    Ok(report)
}
