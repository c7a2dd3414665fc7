//! A protected guest's disk, end to end: real daemons, real KVM, real disk
//! files, a real etcd, the `kvdisk` workload (a key-value service whose
//! every PUT is appended to a log on the disk and flushed before its reply)
//! and a client in a network namespace. Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{castor_bin, outcome, run, strings};
use lab::loadgen::{Config, Loadgen};
use lab::netlab::NetLab;
use lab::pair::{self, wait_status, Pair};
use witness::server::EtcdServer;

const DISK_MIB: u64 = 64;
const BLOCKS: u64 = DISK_MIB * 256;

fn new_disk(path: &Path) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    path.to_path_buf()
}

/// The wrapping sum of every block's digest of a disk file, as castor
/// computes it (`vmm::disk::Disk::sum`).
fn file_sum(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.chunks(4096)
        .enumerate()
        .map(|(b, c)| vmm::disk::block_digest(b as u64, c))
        .fold(0u64, u64::wrapping_add)
}

/// `key=value` fields of the log lines containing `what`.
fn fields(log: &Path, what: &str) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(what))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    lab: lab::netlab::NetGuard,
    _etcd: EtcdServer,
    pair: Pair,
    guest: Vec<String>,
}

fn setup(tag: u8) -> Setup {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pid = std::process::id();
    let lab = NetLab::unique(
        &format!("dk{}{}", tag, pid % 10_000),
        (81 + tag, (pid % 200 + 20) as u8),
    )
    .up_scoped()
    .expect("a guest network (this test needs root)");
    let etcd = EtcdServer::start(&dir.join("etcd")).expect("etcd starts");
    let disks = [new_disk(&dir.join("a.img")), new_disk(&dir.join("b.img"))];
    let pair = Pair::in_dir(&dir, ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint())
        .with_taps([lab.taps[0].clone(), lab.taps[1].clone()])
        .with_disks(disks);
    let guest = strings(&[
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        &format!("kvdisk,ip={}", lab.guest_addr),
    ]);
    Setup {
        _tmp: tmp,
        dir,
        lab,
        _etcd: etcd,
        pair,
        guest,
    }
}

fn client(s: &Setup, rate: f64) -> lab::loadgen::Handle {
    Loadgen::start(Config {
        target: s.lab.guest_service(),
        netns: Some(s.lab.netns.clone()),
        rate,
        keys: 200,
        // Open loop: new PUTs keep coming while replies are held.
        concurrency: 256,
        ..Default::default()
    })
    .unwrap()
}

/// Boots a fresh guest (no RAM kept) on `disk` alone, on node `i`'s tap:
/// its log replay must give back every acknowledged write.
fn cold_boot(s: &Setup, disk: &Path, i: usize) -> std::process::Child {
    let mut a = vec![
        "run".to_string(),
        "--disk".into(),
        disk.display().to_string(),
        "--tap".into(),
        s.lab.taps[i].clone(),
        "--duration".into(),
        "60s".into(),
    ];
    a.extend(s.guest.iter().cloned());
    std::process::Command::new(castor_bin())
        .args(&a)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(s.dir.join("cold.out")).unwrap())
        .stderr(std::fs::File::create(s.dir.join("cold.log")).unwrap())
        .spawn()
        .unwrap()
}

/// SIGKILL of the primary while its guest writes: the backup's disk is the
/// primary's disk at the last committed checkpoint's pause — not as it was
/// at the kill — and every acknowledged write is there, on the survivor and
/// after a cold boot from the survivor's disk alone. The killed node then
/// comes back as the new backup with 1 % of its disk changed behind
/// castor's back: about that much is sent.
#[test]
fn a_failover_runs_on_the_disk_of_the_last_committed_checkpoint() {
    let s = setup(0);
    // The primary logs each checkpoint's disk sum (debug, target castor::disk).
    std::env::set_var("RUST_LOG", "info,castor::disk=debug");
    let (backup, mut primary) = s
        .pair
        .start(
            &strings(&["--epoch-ms", "25"]),
            &s.guest,
            ["b.log", "a.log"],
        )
        .unwrap();
    std::env::remove_var("RUST_LOG");
    wait_status(
        &primary,
        "protected",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    let c = client(&s, 400.0);
    std::thread::sleep(Duration::from_secs(2));
    let before = c.report_so_far();
    assert!(before.counts.acked > 100, "the service answers: {before:?}");
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    wait_status(&backup, "the takeover", Duration::from_secs(10), |st| {
        st.role.runs_guest()
    })
    .unwrap();
    let taken = fields(
        &s.dir.join("b.log"),
        "the disk at the checkpoint taken over",
    );
    assert_eq!(taken.len(), 1, "one takeover");
    let epoch: u64 = taken[0]["epoch"].parse().unwrap();
    let sums: std::collections::HashMap<u64, String> =
        fields(&s.dir.join("a.log"), "disk checkpoint")
            .into_iter()
            .map(|f| (f["epoch"].parse().unwrap(), f["sum"].clone()))
            .collect();
    assert_eq!(
        sums.get(&epoch),
        Some(&taken[0]["disk_sum"]),
        "the backup's disk at the takeover is the primary's at epoch {epoch}'s pause"
    );
    // Usually the primary's disk at the kill is ahead of that checkpoint
    // (the guest wrote in epochs never committed); not always — the last
    // PUTs may all be in committed epochs — so this is reported, not
    // asserted. What is asserted: the disk taken over is the checkpoint's.
    let at_kill = format!("{:#018x}", file_sum(&s.dir.join("a.img")));
    println!(
        "the primary's disk at the kill {} the checkpoint taken over",
        if at_kill == taken[0]["disk_sum"] {
            "equals"
        } else {
            "is ahead of"
        }
    );
    let v = c.verify_all().unwrap();
    assert!(
        v.ok() && v.keys > 50,
        "every acknowledged write on the survivor: {v:?}"
    );

    // The killed node returns as the backup, its disk changed in 1 % of
    // its blocks while it was down: the survivor sends about that.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.dir.join("a.img"))
            .unwrap();
        for i in 0..BLOCKS / 100 {
            let b = (i * 97 + 13) % BLOCKS;
            f.write_all_at(&[0xA5; 4096], b * 4096).unwrap();
        }
    }
    let newb = s.pair.start_backup(0, &[], "a-2.log").unwrap();
    let st = wait_status(
        &backup,
        "protected again",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    let diff = fields(&s.dir.join("b.log"), "disk blocks that differ");
    let differ: u64 = diff.last().unwrap()["differ"].parse().unwrap();
    assert!(
        (BLOCKS / 100..BLOCKS / 100 + 400).contains(&differ),
        "about 1 % of {BLOCKS} blocks sent, not {differ}"
    );
    let resync = st.primary.and_then(|p| p.last_resync).unwrap();
    println!(
        "re-protection: {differ} of {BLOCKS} disk blocks, {} bytes in the first checkpoint",
        resync.bytes
    );
    let v = c.verify_all().unwrap();
    assert!(v.ok(), "{v:?}");

    // Everything stops; a fresh guest boots from the survivor's disk alone
    // and answers for every acknowledged write.
    drop(newb);
    let mut backup = backup;
    backup.kill();
    let mut cold = cold_boot(&s, &s.dir.join("b.img"), 1);
    let t = Instant::now();
    while !std::fs::read_to_string(s.dir.join("cold.out"))
        .unwrap_or_default()
        .contains("replayed")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the cold guest replays its log: {}",
            std::fs::read_to_string(s.dir.join("cold.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = c.verify_all().unwrap();
    // The client's own last check (at its stop) reads from the cold guest too.
    let report = c.stop();
    let _ = cold.kill();
    let _ = cold.wait();
    assert!(
        v.ok() && v.checked == v.keys,
        "every acknowledged write after a cold boot from the survivor's disk: {v:?}\n{}\n{}",
        std::fs::read_to_string(s.dir.join("cold.out")).unwrap_or_default(),
        std::fs::read_to_string(s.dir.join("cold.log")).unwrap_or_default()
    );
    assert!(report.ok(), "{}", report.summary());
}

/// A backup killed again and again while checkpoints with disk blocks are
/// committed comes back each time (its journal finished or dropped), is
/// resynced, and the final failover still has every acknowledged write.
#[test]
fn a_backup_killed_during_commits_comes_back_and_resyncs() {
    let s = setup(1);
    let (mut backup, primary) = s
        .pair
        .start(
            &strings(&["--epoch-ms", "10"]),
            &s.guest,
            ["b.log", "a.log"],
        )
        .unwrap();
    wait_status(
        &primary,
        "protected",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    let c = client(&s, 800.0);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(300 + 170 * round));
        let _ = backup.child.kill();
        let _ = backup.child.wait();
        backup = s
            .pair
            .start_backup(1, &[], &format!("b-{round}.log"))
            .unwrap();
        // Wait on the new backup itself: the primary may still call
        // itself protected by the killed process's session for a moment.
        wait_status(
            &backup,
            "the resync's first commit",
            Duration::from_secs(60),
            pair::backup_committed(1),
        )
        .unwrap();
        wait_status(
            &primary,
            "protected again",
            Duration::from_secs(60),
            pair::protected,
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut primary = primary;
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    wait_status(&backup, "the takeover", Duration::from_secs(10), |st| {
        st.role.runs_guest()
    })
    .unwrap();
    let v = c.verify_all().unwrap();
    assert!(v.ok() && v.keys > 50, "{v:?}");
    let r = c.stop();
    assert!(r.ok(), "{}", r.summary());
}

/// Disks that do not match are refused with the reason, before anything
/// is replicated: a backup without a disk, one of another size, an image
/// whose size is not whole blocks.
#[test]
fn mismatched_disks_are_refused_with_the_reason() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Not whole 4 KiB blocks: refused at start.
    let odd = dir.join("odd.img");
    std::fs::File::create(&odd)
        .unwrap()
        .set_len((1 << 20) + 512)
        .unwrap();
    let pki = pair::make_certs(&dir.join("pki"), ["a", "b"]).unwrap();
    let o = run(&[
        "backup",
        "--certs",
        &pki.display().to_string(),
        "--node",
        "b",
        "--peer",
        "a",
        "--listen",
        "127.0.0.1:1",
        "--console",
        "127.0.0.1:2",
        "--witness",
        "none",
        "--control",
        &dir.join("x.sock").display().to_string(),
        "--disk",
        &odd.display().to_string(),
    ]);
    let (ok, text) = outcome(&o);
    assert!(
        !ok && text.contains("odd.img") && text.contains("4096"),
        "{text}"
    );

    // A backup with a smaller disk, then one without: the primary is
    // refused, names both sizes, and stays unprotected.
    for (backup_disk, want) in [(Some(32u64), "33554432"), (None, "0 (0: none)")] {
        let sub = dir.join(format!("p{}", backup_disk.unwrap_or(0)));
        std::fs::create_dir_all(&sub).unwrap();
        let a = new_disk(&sub.join("a.img"));
        let b = sub.join("b.img");
        let disks = match backup_disk {
            Some(mib) => {
                std::fs::File::create(&b)
                    .unwrap()
                    .set_len(mib << 20)
                    .unwrap();
                [a, b]
            }
            None => [a, b],
        };
        let pair = Pair::in_dir(&sub, ["a", "b"]).unwrap();
        let bargs = match backup_disk {
            Some(_) => strings(&["--disk", &disks[1].display().to_string()]),
            None => Vec::new(),
        };
        let backup = pair.start_backup(1, &bargs, "b.log").unwrap();
        let mut pargs = strings(&["--disk", &disks[0].display().to_string()]);
        pargs.extend(strings(&["--mem", "64M", "--workload", "counter"]));
        let primary = pair.start_primary(0, &pargs, "a.log").unwrap();
        let t = Instant::now();
        loop {
            let log = std::fs::read_to_string(sub.join("a.log")).unwrap_or_default();
            if log.contains("both nodes need a disk of the same size") {
                assert!(log.contains(want), "{log}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no refusal: {log}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(primary.status().is_some_and(|s| !pair::protected(&s)));
        drop(backup);
    }
}

/// Live migration does not move disks: a primary with one refuses, says
/// why, and its guest stays there, protected.
#[test]
fn a_guest_with_a_disk_is_not_migrated_and_stays_protected() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pair = Pair::in_dir(dir, ["a", "b"])
        .unwrap()
        .with_disks([new_disk(&dir.join("a.img")), new_disk(&dir.join("b.img"))]);
    let (_backup, primary) = pair
        .start(
            &[],
            &strings(&["--mem", "64M", "--workload", "counter"]),
            ["b.log", "a.log"],
        )
        .unwrap();
    wait_status(
        &primary,
        "protected",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    let o = run(&[
        "migrate",
        "--control",
        &primary.control.display().to_string(),
        "--to",
        "127.0.0.1:9",
        "--dest",
        "c",
    ]);
    let (ok, text) = outcome(&o);
    assert!(!ok && text.contains("does not move disks"), "{text}");
    let st = primary.status().unwrap();
    assert!(st.role.runs_guest() && pair::protected(&st), "{st:?}");
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The backup's file system is full under its disk and journal: the first
/// checkpoint is refused with the reason (the backup's status names it),
/// the primary is never protected, and the backup, whose replica is at no
/// checkpoint, never takes over.
#[test]
fn a_full_file_system_under_the_backups_disk_is_refused_and_named() {
    use std::os::unix::fs::FileExt;
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a small tmpfs (this test needs root)");
    let _m = Mount(small.clone());
    // The primary's disk holds 4 MiB of data the backup's lacks: the first
    // checkpoint's journal does not fit in 2 MiB.
    let a = new_disk(&dir.join("a.img"));
    {
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        let mut x = 7u64;
        for b in 0..1024u64 {
            let block: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            f.write_all_at(&block, b * 4096).unwrap();
        }
    }
    let b = new_disk(&small.join("b.img"));
    let etcd = EtcdServer::start(&dir.join("etcd")).expect("etcd starts");
    let pair = Pair::in_dir(dir, ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint())
        .with_disks([a, b]);
    let (backup, mut primary) = pair
        .start(
            &[],
            &strings(&["--mem", "64M", "--workload", "counter"]),
            ["b.log", "a.log"],
        )
        .unwrap();
    let st = wait_status(&backup, "the refusal", Duration::from_secs(30), |s| {
        s.backup.as_ref().is_some_and(|b| b.last_refusal.is_some())
    })
    .unwrap();
    let why = st.backup.unwrap().last_refusal.unwrap();
    assert!(why.contains("No space left on device"), "{why}");
    assert!(
        primary.status().is_some_and(|s| !pair::protected(&s)),
        "never protected"
    );
    // Nobody takes over from a replica at no checkpoint.
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    let st = backup.status().unwrap();
    assert_eq!(st.role, node::Role::Backup, "{st:?}");
    drop(etcd);
}
