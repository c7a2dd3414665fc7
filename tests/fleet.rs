//! The fleet end to end: host agents (`castor agent`), each in a network
//! namespace of its own, a three-member etcd (Debian's etcd-server) holding
//! the desired state, the membership and the witness, real KVM guests.
//! Needs root (namespaces), like the other namespace tests.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agent::keys::VmLine;
use common::castor_bin;
use lab::fleetlab::{describe, protected, FleetLab, FleetSpec};

const VM_FLAGS: &[&str] = &[
    "--mem",
    "32M",
    "--workload",
    "counter,interval_ms=10",
    "--epoch-ms",
    "50",
];

fn lab(dir: &std::path::Path, hosts: usize) -> FleetLab {
    castor_bin();
    FleetLab::start(
        dir,
        &FleetSpec {
            hosts,
            etcd_members: 3,
            host_mem: 1 << 30,
            agent_flags: common::strings(&[
                "--lease-ttl",
                "2",
                "--tick-ms",
                "250",
                // Above the host's stalls: this machine is itself a VM
                // whose CPUs its hypervisor takes away for ~100 ms at a
                // time under load (steal time; castor logs each as "…
                // woke late"). A 100 ms detector took those for dead
                // primaries, and these tests assert which host runs what.
                "--backup-flag=--heartbeat-timeout-ms=400",
            ]),
        },
    )
    .expect("a fleet lab (this test needs root and etcd-server)")
}

/// A directory for the lab: removed afterwards unless CASTOR_KEEP is set
/// (then its path is printed, with every agent's and role's log).
fn workdir() -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("CASTOR_KEEP").is_some() {
        let p = tmp.keep();
        eprintln!("the lab's files are kept in {}", p.display());
        (None, p)
    } else {
        let p = tmp.path().to_path_buf();
        (Some(tmp), p)
    }
}

fn create(lab: &FleetLab, name: &str) {
    let mut args = vec!["vm", "create", name];
    args.extend_from_slice(VM_FLAGS);
    lab.castor(&args).unwrap();
}

fn all_protected(n: usize) -> impl Fn(&[VmLine]) -> bool {
    move |v: &[VmLine]| v.len() == n && v.iter().all(protected)
}

/// Every one of `n` VMs protected, with no role on `host`.
fn protected_off(n: usize, host: &str) -> impl Fn(&[VmLine]) -> bool + '_ {
    move |v: &[VmLine]| {
        all_protected(n)(v)
            && v.iter().all(|l| {
                l.placement.primary.as_deref() != Some(host)
                    && l.placement.backup.as_deref() != Some(host)
            })
    }
}

/// One history: what clients saw (`seen`, from offset 0) is a prefix of
/// what the VM's primary keeps now, which goes on past it, continuously.
fn assert_one_history(name: &str, v: &VmLine, seen: &[u8], fleet: &str) {
    let (from, now) = console_kept(v, Duration::from_millis(300));
    let from = from as usize;
    assert!(
        from <= seen.len() && from + now.len() > seen.len(),
        "{name}: the console does not grow past what clients saw ({} bytes then; now {} from offset {from}): {fleet}",
        seen.len(),
        now.len(),
    );
    assert_eq!(
        &now[..seen.len() - from],
        &seen[from..],
        "{name}: two histories"
    );
    let c = lab::console::continuity(&now);
    assert!(c.ok(), "{name}: {:?}", c.problems);
}

/// The console of a VM's primary from offset 0, read for `for_`.
fn console(v: &VmLine, for_: Duration) -> Vec<u8> {
    let r = v.report.as_ref().expect("a report");
    let mut s = Vec::new();
    let _ = lab::pair::read_console(r.console, 0, &mut s, Instant::now() + for_, u64::MAX);
    s
}

/// The console a VM's primary keeps, read for `for_`: (the offset of its
/// first byte, the bytes). A node's log starts where its history of the
/// guest began (a backup that joined a running guest: up to 1 MiB of
/// released history before its first session), and offset 0 is then
/// refused with the oldest it keeps.
fn console_kept(v: &VmLine, for_: Duration) -> (u64, Vec<u8>) {
    let r = v.report.as_ref().expect("a report");
    let mut s = Vec::new();
    let refused = lab::pair::read_console(
        r.console,
        0,
        &mut s,
        Instant::now() + Duration::from_millis(100),
        u64::MAX,
    )
    .err()
    .and_then(|e| e.downcast::<lab::pair::ConsoleRefused>().ok());
    let Some(oldest) = refused.as_ref().and_then(|e| {
        e.why
            .strip_prefix("error: offset 0 is older than the oldest kept, ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.trim_end_matches(',').parse::<u64>().ok())
    }) else {
        return (0, console(v, for_));
    };
    let mut b = Vec::new();
    let _ = lab::pair::read_console(r.console, oldest, &mut b, Instant::now() + for_, u64::MAX);
    (oldest, b)
}

fn by_name(v: Vec<VmLine>) -> BTreeMap<String, VmLine> {
    v.into_iter().map(|l| (l.name.clone(), l)).collect()
}

#[test]
fn a_lost_host_is_healed_and_receives_backups_again_when_it_returns() {
    let (_tmp, dir) = workdir();
    let mut lab = lab(&dir, 3);
    let names: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
    for n in &names {
        create(&lab, n);
    }
    lab.wait_vms(
        "6 VMs protected",
        Duration::from_secs(120),
        all_protected(6),
    )
    .unwrap();
    let before = by_name(lab.vms().unwrap());
    // Spread: each host runs two primaries and two backups.
    for h in ["h0", "h1", "h2"] {
        let count = |f: fn(&VmLine) -> &Option<String>| {
            before
                .values()
                .filter(|v| f(v).as_deref() == Some(h))
                .count()
        };
        let (p, b) = (
            count(|v| &v.placement.primary),
            count(|v| &v.placement.backup),
        );
        assert_eq!((p, b), (2, 2), "{h}: {}", describe(&lab.vms().unwrap()));
    }
    let seen: BTreeMap<String, Vec<u8>> = before
        .iter()
        .map(|(n, v)| (n.clone(), console(v, Duration::from_millis(200))))
        .collect();
    let tokens: BTreeMap<String, u64> = before
        .iter()
        .map(|(n, v)| (n.clone(), v.owner.as_ref().unwrap().1))
        .collect();

    let lost = Instant::now();
    lab.kill_host(0).unwrap();
    // Every VM serves again, protected, on the two hosts left.
    let healed = lab
        .wait_vms(
            "every VM protected on h1/h2",
            Duration::from_secs(90),
            |v| protected_off(6, "h0")(v),
        )
        .unwrap();
    eprintln!(
        "healed {:.1} s after the loss",
        lost.elapsed().as_secs_f64()
    );
    let after = by_name(lab.vms().unwrap());
    for (n, v) in &after {
        let was = &before[n];
        let r = v.report.as_ref().unwrap();
        if was.placement.primary.as_deref() == Some("h0") {
            // Taken over by its backup: a new generation at the witness.
            assert_eq!(Some(&r.host), was.placement.backup.as_ref(), "{n}");
            assert_eq!(v.owner.as_ref().unwrap().1, tokens[n] + 1, "{n}");
            assert!(r.failover.is_some(), "{n}: no failover reported");
        } else {
            assert_eq!(Some(&r.host), was.placement.primary.as_ref(), "{n}");
        }
        // One history: what clients saw before is a prefix of what the
        // VM's primary serves now, and its console is continuous.
        assert_one_history(n, v, &seen[n], &describe(&lab.vms().unwrap()));
    }
    let _ = healed;

    // h0 returns: it receives backups again, resynced by reuse of the
    // images it kept.
    lab.return_host(0).unwrap();
    lab.wait_vms(
        "h0 holds backups again, resynced by reuse",
        Duration::from_secs(90),
        |v| {
            all_protected(6)(v)
                && v.iter().any(|l| {
                    l.placement.backup.as_deref() == Some("h0")
                        && l.report
                            .as_ref()
                            .is_some_and(|r| r.resync.is_some_and(|(reused, _, _)| reused))
                })
        },
    )
    .unwrap();
    // A backup moved to h0 was stood down by its primary with a goodbye
    // (a change of backup): it must not have taken over. Every VM's owner
    // is the host it was once healed (its token may have grown: a primary
    // whose session ended claims the VM to carry on alone).
    let back = by_name(lab.vms().unwrap());
    for (n, v) in &back {
        let owner = |l: &VmLine| l.owner.as_ref().map(|o| o.0.clone());
        assert_eq!(
            owner(v),
            owner(&after[n]),
            "{n}: a backup stood down took over"
        );
    }
}

#[test]
fn a_drained_host_is_emptied_by_live_migration_with_gap_free_consoles() {
    let (_tmp, dir) = workdir();
    let lab = lab(&dir, 3);
    for n in ["d0", "d1", "d2"] {
        create(&lab, n);
    }
    lab.wait_vms(
        "3 VMs protected",
        Duration::from_secs(120),
        all_protected(3),
    )
    .unwrap();
    let before = by_name(lab.vms().unwrap());
    let (vm, v) = before.iter().next().unwrap();
    let host = v.placement.primary.clone().unwrap();
    // Follow the console of the VM that moves, from its source, until the
    // source stops serving it.
    let src = v.report.as_ref().unwrap().console;
    let follower = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = lab::pair::read_console(
            src,
            0,
            &mut s,
            Instant::now() + Duration::from_secs(60),
            u64::MAX,
        );
        s
    });
    let out = lab
        .castor(&["host", "drain", &host, "--timeout", "150s"])
        .unwrap();
    assert!(out.contains("is drained"), "{out}");
    lab.wait_vms(
        "every VM protected off the drained host",
        Duration::from_secs(60),
        |v| protected_off(3, &host)(v),
    )
    .unwrap();
    let after = by_name(lab.vms().unwrap());
    let moved = &after[vm];
    let r = moved.report.as_ref().unwrap();
    assert_ne!(r.host, host);
    assert!(
        r.failover.is_none(),
        "{vm} moved by a failover, not a migration"
    );
    // Gap-free: what the source served, then what the destination serves
    // from there on.
    let mut stream = follower.join().unwrap();
    let _ = lab::pair::read_console(
        r.console,
        stream.len() as u64,
        &mut stream,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    );
    let c = lab::console::continuity(&stream);
    assert!(
        c.ok() && c.lines > 10,
        "{vm}: {:?} ({} lines)",
        c.problems,
        c.lines
    );
    // Undrained, it takes roles again.
    lab.castor(&["host", "undrain", &host]).unwrap();

    // A deleted VM's roles stop on every host, and its images go.
    let gone = "d2";
    assert!(lab.image_dir().join(gone).exists());
    lab.castor(&["vm", "delete", gone]).unwrap();
    let err = lab.castor(&["vm", "delete", gone]).unwrap_err().to_string();
    assert!(err.contains("no VM named d2"), "{err}");
    let t = Instant::now();
    loop {
        let v = lab.view().unwrap();
        let files_left = lab.image_dir().join(gone).exists();
        if !v.placements.contains_key(gone) && !v.owners.contains_key(gone) && !files_left {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "d2 not gone: placement {} owner {} files {files_left}",
            v.placements.contains_key(gone),
            v.owners.contains_key(gone)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.wait_vms(
        "the other VMs still protected",
        Duration::from_secs(30),
        all_protected(2),
    )
    .unwrap();
}

#[test]
fn two_creates_of_one_name_one_wins_and_the_other_is_told() {
    castor_bin();
    let (_tmp, dir) = workdir();
    let etcd = witness::server::EtcdCluster::start(&dir.join("etcd"), 1, &[]).unwrap();
    let spec = etcd.spec_on(None);
    for round in 0..5 {
        let name = format!("race{round}");
        let spawn = || {
            common::castor()
                .args(["vm", "create", &name, "--witness", &spec])
                .output()
                .unwrap()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(spawn);
            let b = s.spawn(spawn);
            (a.join().unwrap(), b.join().unwrap())
        });
        let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
        assert_eq!(ok, 1, "round {round}: {a:?} {b:?}");
        let loser = if a.status.success() { &b } else { &a };
        let err = String::from_utf8_lossy(&loser.stderr);
        assert!(
            err.contains("exists already") || err.contains("created by someone else"),
            "{err}"
        );
    }
    // Every VM has its own port slot.
    let view =
        agent::keys::FleetView::read(&witness::store::Store::new(&etcd.endpoints()).unwrap())
            .unwrap();
    let slots: std::collections::BTreeSet<u32> = view.vms.values().map(|v| v.value.slot).collect();
    assert_eq!(slots.len(), 5);
    assert_eq!(view.slots.len(), 5, "a loser's slot was given back");
}

#[test]
fn one_etcd_member_down_changes_nothing_and_a_lost_quorum_changes_no_role() {
    let (_tmp, dir) = workdir();
    let mut lab = lab(&dir, 3);
    for n in ["q0", "q1", "q2"] {
        create(&lab, n);
    }
    lab.wait_vms(
        "3 VMs protected",
        Duration::from_secs(120),
        all_protected(3),
    )
    .unwrap();
    let before = by_name(lab.vms().unwrap());
    let roles =
        |v: &BTreeMap<String, VmLine>| -> Vec<(String, Option<String>, Option<String>, u64)> {
            v.values()
                .map(|l| {
                    (
                        l.name.clone(),
                        l.placement.primary.clone(),
                        l.placement.backup.clone(),
                        l.owner.as_ref().unwrap().1,
                    )
                })
                .collect()
        };
    // One member down: nothing changes.
    lab.etcd.kill(0);
    std::thread::sleep(Duration::from_secs(5));
    let one_down = by_name(lab.vms().unwrap());
    assert_eq!(roles(&before), roles(&one_down));
    assert!(
        one_down.values().all(protected),
        "{}",
        describe(&lab.vms().unwrap())
    );
    // Quorum lost: leases cannot be renewed, nothing can be read; for
    // longer than a lease the daemons run on as they are.
    let consoles: Vec<(String, std::net::SocketAddr, usize)> = before
        .values()
        .map(|v| {
            (
                v.name.clone(),
                v.report.as_ref().unwrap().console,
                console(v, Duration::from_millis(100)).len(),
            )
        })
        .collect();
    lab.etcd.kill(1);
    std::thread::sleep(Duration::from_secs(6));
    for (n, at, len) in &consoles {
        // Served by the same primary, still growing: its output is still
        // released, i.e. its backup still commits (etcd is not on the
        // epoch's path).
        let mut s = Vec::new();
        let _ = lab::pair::read_console(
            *at,
            0,
            &mut s,
            Instant::now() + Duration::from_millis(300),
            u64::MAX,
        );
        assert!(
            s.len() > *len,
            "{n}: its console stopped while etcd had no quorum"
        );
    }
    lab.etcd.restart(0).unwrap();
    lab.etcd.restart(1).unwrap();
    lab.wait_vms(
        "the fleet answers again",
        Duration::from_secs(30),
        all_protected(3),
    )
    .unwrap();
    let after = by_name(lab.vms().unwrap());
    assert_eq!(roles(&before), roles(&after), "a role changed");
}

#[test]
fn a_primary_started_before_its_etcd_waits_for_it_then_boots() {
    castor_bin();
    let (_tmp, dir) = workdir();
    let mut etcd = witness::server::EtcdCluster::start(&dir.join("etcd"), 1, &[]).unwrap();
    etcd.kill(0);
    let names = ["a", "b"].map(String::from);
    transport::certs::create(&dir.join("pki"), &names, false).unwrap();
    let log = dir.join("a.log");
    let mut child = common::castor()
        .args(["primary", "--node", "a", "--peer", "b", "--vm", "early"])
        .arg("--certs")
        .arg(dir.join("pki"))
        .args(["--witness", &etcd.spec_on(None)])
        .arg("--control")
        .arg(dir.join("a.sock"))
        .args(["--mem", "32M", "--vcpus", "1", "--workload", "counter"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("a.err")).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "it gave up instead of waiting"
    );
    let said = std::fs::read_to_string(dir.join("a.err")).unwrap()
        + &std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("waiting for it"), "{said}");
    etcd.restart(0).unwrap();
    let w = witness::Etcd::new(&etcd.endpoints(), "early").unwrap();
    let t = Instant::now();
    let owner = loop {
        if let Ok(Some((o, _))) = w.read() {
            break o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "it never claimed the VM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(owner.owner, "a");
    // It boots and runs: its control socket answers as a primary.
    let t = Instant::now();
    loop {
        if let Some(s) = lab::pair::status(&dir.join("a.sock")) {
            assert!(s.role.runs_guest());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no primary answers");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_vm_with_a_disk_is_protected_and_drained_by_a_switchover() {
    let (_tmp, dir) = workdir();
    let lab = lab(&dir, 3);
    let mut args = vec!["vm", "create", "k0", "--disk", "16M"];
    args.extend_from_slice(VM_FLAGS);
    lab.castor(&args).unwrap();
    lab.wait_vms(
        "the VM with a disk protected",
        Duration::from_secs(120),
        all_protected(1),
    )
    .unwrap();
    let before = by_name(lab.vms().unwrap());
    let v = &before["k0"];
    let host = v.placement.primary.clone().unwrap();
    let backup = v.placement.backup.clone().unwrap();
    // Each role's host keeps its own copy of the disk.
    for h in [&host, &backup] {
        let f = lab.image_dir().join("k0").join(format!("{h}.disk"));
        assert_eq!(
            std::fs::metadata(&f).unwrap().len(),
            16 << 20,
            "{}",
            f.display()
        );
    }
    let seen = console(v, Duration::from_millis(300));
    // Live migration does not move disks: the drain is a switchover to
    // the backup, from its last committed checkpoint.
    let out = lab
        .castor(&["host", "drain", &host, "--timeout", "150s"])
        .unwrap();
    assert!(out.contains("is drained"), "{out}");
    lab.wait_vms(
        "protected off the drained host",
        Duration::from_secs(60),
        |v| protected_off(1, &host)(v),
    )
    .unwrap();
    let after = by_name(lab.vms().unwrap());
    let v = &after["k0"];
    let r = v.report.as_ref().unwrap();
    assert_eq!(r.host, backup, "the backup took over");
    assert!(
        r.failover.is_some(),
        "a switchover is reported as a failover"
    );
    assert_one_history("k0", v, &seen, &describe(&lab.vms().unwrap()));
}
