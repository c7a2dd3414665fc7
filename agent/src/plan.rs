//! What one host's agent does next: a pure function of the fleet as read
//! from etcd and of the role processes it runs ([`decide`]).
//!
//! It never stops a process that runs a guest, except for a VM that was
//! deleted: a backup that has just taken over is running the only copy of
//! its VM, whatever the placement (which follows the witness a tick later)
//! still says. A guest moves only by the witness: a takeover its backup
//! wins, or a migration whose handover the witness approves.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use node::Role;

use crate::keys::FleetView;

/// What kind of role process runs for a VM here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `castor primary`: it booted the guest.
    Primary,
    /// `castor backup`, paired with this primary host.
    Backup {
        /// Its peer: the only host its primary may be.
        peer: String,
    },
    /// `castor primary --incoming`: a migration's destination.
    Incoming {
        /// The source host.
        from: String,
    },
}

/// A role process of this host, as the shell sees it this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    /// What was started.
    pub kind: Kind,
    /// What its control socket answered (`None`: nothing yet).
    pub role: Option<Role>,
    /// The backup its guest is protected toward (`NODE@ADDR`), if it runs one.
    pub backup: Option<String>,
    /// A migration asked of it is under way.
    pub migrating: bool,
}

impl Child {
    /// It runs (or may be running) a guest.
    pub fn runs_guest(&self) -> bool {
        match self.role {
            Some(r) => r.runs_guest(),
            // Not answering: a primary or a destination may be running
            // one; a backup that did not answer yet has none.
            None => !matches!(self.kind, Kind::Backup { .. }),
        }
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Boot the VM here (it never ran: the witness has no owner).
    StartPrimary {
        /// The VM.
        vm: String,
        /// Its backup, if one is placed and alive.
        backup: Option<(String, SocketAddr)>,
    },
    /// Start its backup, paired with `peer`.
    StartBackup {
        /// The VM.
        vm: String,
        /// Its primary's host.
        peer: String,
    },
    /// Wait for the VM that `from` moves here, protected toward `backup`.
    StartIncoming {
        /// The VM.
        vm: String,
        /// Its source host.
        from: String,
        /// Its backup.
        backup: (String, SocketAddr),
    },
    /// Tell the primary to protect toward this backup.
    Protect {
        /// The VM.
        vm: String,
        /// The backup's host.
        peer: String,
        /// Where it listens.
        to: SocketAddr,
    },
    /// Ask the primary to move the guest to `dest`.
    Migrate {
        /// The VM.
        vm: String,
        /// The destination host.
        dest: String,
        /// Where it waits.
        to: SocketAddr,
    },
    /// Ask the backup to take over now: a planned switchover, how a
    /// drain moves a VM whose disk live migration cannot move.
    Takeover {
        /// The VM.
        vm: String,
    },
    /// Stop the process (SIGTERM).
    Stop {
        /// The VM.
        vm: String,
        /// Why, for the log.
        why: String,
    },
}

/// What host `me` does next, given the fleet and its processes.
/// `migration_ready`: the VMs whose destination has had time to listen.
pub fn decide(
    me: &str,
    view: &FleetView,
    children: &BTreeMap<String, Child>,
    migration_ready: &dyn Fn(&str) -> bool,
) -> Vec<Action> {
    let mut out = Vec::new();
    for vm in children.keys() {
        if !view.vms.contains_key(vm) {
            out.push(Action::Stop {
                vm: vm.clone(),
                why: "the VM was deleted".into(),
            });
        }
    }
    for (vm, spec) in &view.vms {
        let has_disk = spec.value.disk_bytes.is_some();
        let Some(a) = view.placements.get(vm).map(|a| &a.value) else {
            continue;
        };
        let child = children.get(vm);
        let owner = view.owners.get(vm).map(|o| o.value.owner.as_str());
        let backup = a
            .backup
            .as_ref()
            .filter(|b| b.as_str() != me)
            .and_then(|b| Some((b.clone(), view.quic_addr(b, vm)?)));
        let me_primary = a.primary.as_deref() == Some(me);
        let me_backup = a.backup.as_deref() == Some(me);
        let me_dest = a.moving_to.as_deref() == Some(me);
        match child {
            None => {
                if me_primary && owner.is_none() {
                    out.push(Action::StartPrimary {
                        vm: vm.clone(),
                        backup,
                    });
                } else if me_backup {
                    if let Some(p) = a.primary.as_ref().filter(|p| p.as_str() != me) {
                        // Paired with the owner the witness names: the
                        // primary may only be that host.
                        if owner.is_none_or(|o| o == p) {
                            out.push(Action::StartBackup {
                                vm: vm.clone(),
                                peer: p.clone(),
                            });
                        }
                    }
                } else if me_dest && !has_disk {
                    if let (Some(from), Some(backup)) = (&a.primary, backup) {
                        out.push(Action::StartIncoming {
                            vm: vm.clone(),
                            from: from.clone(),
                            backup,
                        });
                    }
                }
            }
            Some(c)
                if matches!(c.kind, Kind::Incoming { .. })
                    && c.role.is_none()
                    && !me_dest
                    && owner != Some(me) =>
            {
                // A destination still waiting for a guest the witness never
                // handed to it: the move was called off (or became a
                // switchover), and it holds the VM's port here.
                out.push(Action::Stop {
                    vm: vm.clone(),
                    why: "the migration here was called off".into(),
                });
            }
            Some(c) if c.runs_guest() => {
                if !me_primary || c.migrating || c.role.is_none() {
                    // A takeover the placement has not caught up with, a
                    // source that exits once its guest moved, a fenced
                    // primary that stops by itself: left alone.
                    continue;
                }
                if let Some((peer, to)) = &backup {
                    if c.backup.as_deref() != Some(&format!("{peer}@{to}")) {
                        out.push(Action::Protect {
                            vm: vm.clone(),
                            peer: peer.clone(),
                            to: *to,
                        });
                        continue;
                    }
                }
                if let Some(dest) = a.moving_to.as_ref().filter(|_| !has_disk) {
                    if let Some(to) = view.quic_addr(dest, vm) {
                        if migration_ready(vm) {
                            out.push(Action::Migrate {
                                vm: vm.clone(),
                                dest: dest.clone(),
                                to,
                            });
                        }
                    }
                }
            }
            Some(c) => match &c.kind {
                Kind::Backup { .. }
                    if me_backup
                        && has_disk
                        && a.moving_to.is_some()
                        && c.role == Some(Role::Backup)
                        && !c.migrating
                        && migration_ready(vm) =>
                {
                    // A drain of a VM with a disk: live migration does not
                    // move disks, so its backup takes over (a switchover
                    // from the last committed checkpoint; the old primary
                    // is fenced by the witness).
                    out.push(Action::Takeover { vm: vm.clone() });
                }
                Kind::Backup { peer } => {
                    if !me_backup {
                        out.push(Action::Stop {
                            vm: vm.clone(),
                            why: "this host is no longer its backup".into(),
                        });
                    } else if a.primary.as_ref() != Some(peer) && owner != Some(peer) {
                        out.push(Action::Stop {
                            vm: vm.clone(),
                            why: format!(
                                "its primary is {} now, not {peer}: started again paired with it",
                                a.primary.as_deref().unwrap_or("none")
                            ),
                        });
                    }
                }
                // A destination that does not run a guest did not answer
                // yet: handled above.
                _ => {}
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{At, HostRecord, VmSpec};
    use node::fleet::Assignment;

    fn view(primary: &str, backup: &str, owner: Option<&str>) -> FleetView {
        let mut v = FleetView::default();
        for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
            v.hosts.insert(
                h.to_string(),
                HostRecord {
                    name: h.to_string(),
                    addr: format!("10.0.0.{}", i + 1).parse().unwrap(),
                    domain: String::new(),
                    mem_bytes: 1 << 30,
                    vcpus: 4,
                    images: vec![],
                    port_base: 7400,
                },
            );
        }
        v.vms.insert(
            "a".into(),
            At {
                value: VmSpec {
                    name: "a".into(),
                    slot: 0,
                    mem_bytes: 32 << 20,
                    vcpus: 1,
                    workload: "counter".into(),
                    kernel: None,
                    cmdline: String::new(),
                    initrd: None,
                    disk_bytes: None,
                    epoch_ms: "25".into(),
                },
                rev: 1,
            },
        );
        v.placements.insert(
            "a".into(),
            At {
                value: Assignment {
                    primary: Some(primary.into()),
                    backup: (!backup.is_empty()).then(|| backup.into()),
                    moving_to: None,
                },
                rev: 2,
            },
        );
        if let Some(o) = owner {
            v.owners.insert(
                "a".into(),
                At {
                    value: witness::Owner {
                        owner: o.into(),
                        token: 1,
                    },
                    rev: 3,
                },
            );
        }
        v
    }

    fn child(kind: Kind, role: Option<Role>, backup: Option<&str>) -> BTreeMap<String, Child> {
        BTreeMap::from([(
            "a".to_string(),
            Child {
                kind,
                role,
                backup: backup.map(str::to_string),
                migrating: false,
            },
        )])
    }

    const READY: &dyn Fn(&str) -> bool = &|_| true;

    #[test]
    fn a_drain_of_a_vm_with_a_disk_is_a_switchover_to_its_backup() {
        let mut v = view("h1", "h2", Some("h1"));
        v.vms.get_mut("a").unwrap().value.disk_bytes = Some(1 << 20);
        v.placements.get_mut("a").unwrap().value.moving_to = Some("h3".into());
        // The source does not migrate it.
        let c = child(Kind::Primary, Some(Role::Primary), Some("h2@10.0.0.2:7400"));
        assert!(decide("h1", &v, &c, READY).is_empty());
        // Its backup takes over.
        let b = child(Kind::Backup { peer: "h1".into() }, Some(Role::Backup), None);
        assert_eq!(
            decide("h2", &v, &b, READY),
            vec![Action::Takeover { vm: "a".into() }]
        );
        assert!(decide("h2", &v, &b, &|_| false).is_empty());
        // No destination waits for it.
        assert!(decide("h3", &v, &BTreeMap::new(), READY).is_empty());
    }

    #[test]
    fn a_destination_left_waiting_is_stopped_once_the_move_is_called_off() {
        let v = view("h1", "h3", Some("h1"));
        let c = child(Kind::Incoming { from: "h1".into() }, None, None);
        assert!(matches!(
            &decide("h3", &v, &c, READY)[..],
            [Action::Stop { .. }]
        ));
        // Not once the witness gave it the guest (its socket not up yet).
        let v = view("h1", "h2", Some("h3"));
        assert!(decide("h3", &v, &c, READY).is_empty());
    }

    #[test]
    fn a_new_vm_is_booted_on_its_primary_and_backed_up_on_its_backup() {
        let v = view("h1", "h2", None);
        let none = BTreeMap::new();
        assert_eq!(
            decide("h1", &v, &none, READY),
            vec![Action::StartPrimary {
                vm: "a".into(),
                backup: Some(("h2".into(), "10.0.0.2:7400".parse().unwrap()))
            }]
        );
        assert_eq!(
            decide("h2", &v, &none, READY),
            vec![Action::StartBackup {
                vm: "a".into(),
                peer: "h1".into()
            }]
        );
        assert!(decide("h3", &v, &none, READY).is_empty());
    }

    #[test]
    fn a_guest_is_never_booted_again_where_the_witness_names_an_owner() {
        // The primary's process is gone but the witness names h1: booting
        // a new generation would throw the guest's state away.
        let v = view("h1", "h2", Some("h1"));
        assert!(decide("h1", &v, &BTreeMap::new(), READY).is_empty());
    }

    #[test]
    fn a_backup_that_took_over_is_never_stopped_and_is_given_its_new_backup() {
        // h2 took over; the placement still names h1 as primary and h2 as
        // backup: nothing is stopped.
        let v = view("h1", "h2", Some("h2"));
        let c = child(
            Kind::Backup { peer: "h1".into() },
            Some(Role::TakenOver),
            None,
        );
        assert!(decide("h2", &v, &c, READY).is_empty());
        // Nor when the placement drops it as backup.
        let v = view("h1", "h3", Some("h2"));
        assert!(decide("h2", &v, &c, READY).is_empty());
        // Once the placement follows the witness: protect toward h3.
        let v = view("h2", "h3", Some("h2"));
        assert_eq!(
            decide("h2", &v, &c, READY),
            vec![Action::Protect {
                vm: "a".into(),
                peer: "h3".into(),
                to: "10.0.0.3:7400".parse().unwrap()
            }]
        );
        // ... once.
        let c = child(
            Kind::Backup { peer: "h1".into() },
            Some(Role::TakenOver),
            Some("h3@10.0.0.3:7400"),
        );
        assert!(decide("h2", &v, &c, READY).is_empty());
    }

    #[test]
    fn a_backup_moved_away_or_paired_with_an_old_primary_is_stopped() {
        let c = child(Kind::Backup { peer: "h1".into() }, Some(Role::Backup), None);
        let v = view("h1", "h3", Some("h1"));
        assert!(matches!(
            &decide("h2", &v, &c, READY)[..],
            [Action::Stop { .. }]
        ));
        // The guest moved to h3 (witness and placement): the backup is
        // started again, paired with h3.
        let v = view("h3", "h2", Some("h3"));
        assert!(matches!(
            &decide("h2", &v, &c, READY)[..],
            [Action::Stop { .. }]
        ));
        // Not while the witness still names its peer.
        let v = view("h3", "h2", Some("h1"));
        assert!(decide("h2", &v, &c, READY).is_empty());
    }

    #[test]
    fn a_deleted_vm_is_stopped_whatever_it_runs() {
        let mut v = view("h1", "h2", Some("h1"));
        v.vms.clear();
        let c = child(Kind::Primary, Some(Role::Primary), None);
        assert!(matches!(
            &decide("h1", &v, &c, READY)[..],
            [Action::Stop { .. }]
        ));
    }

    #[test]
    fn a_drain_migrates_once_the_destination_is_ready() {
        let mut v = view("h1", "h2", Some("h1"));
        v.placements.get_mut("a").unwrap().value.moving_to = Some("h3".into());
        assert_eq!(
            decide("h3", &v, &BTreeMap::new(), READY),
            vec![Action::StartIncoming {
                vm: "a".into(),
                from: "h1".into(),
                backup: ("h2".into(), "10.0.0.2:7400".parse().unwrap())
            }]
        );
        let c = child(Kind::Primary, Some(Role::Primary), Some("h2@10.0.0.2:7400"));
        assert!(decide("h1", &v, &c, &|_| false).is_empty());
        assert_eq!(
            decide("h1", &v, &c, READY),
            vec![Action::Migrate {
                vm: "a".into(),
                dest: "h3".into(),
                to: "10.0.0.3:7400".parse().unwrap()
            }]
        );
    }
}
