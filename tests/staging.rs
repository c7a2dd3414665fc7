//! The backup's staging memory refused under load (issue "Proof under
//! faults", item 3): `castor backup --max-epoch-bytes` below the size of
//! the writer guest's checkpoints. Real daemons, real KVM, etcd as the
//! witness.
//!
//! What must hold: the backup refuses the oversize checkpoint whole, with a
//! reason naming the limit and the size (its log and `castor status`), and
//! says when it cannot protect this guest with this limit; its replica is
//! only ever at a committed checkpoint (a takeover after the primary is
//! SIGKILLed resumes from one, with one console history, or is refused and
//! says why); its memory stays near its limit plus its replica; no panic,
//! no hang.

mod common;

use std::time::{Duration, Instant};

use common::{castor_bin, strings};
use lab::console::continuity;
use lab::pair::{read_console, wait_status, Daemon, Pair};
use node::Role;
use witness::server::EtcdServer;

/// A guest that rewrites 20 000 whole pages a second with fresh data:
/// ~2 MiB of raw pages in each 25 ms epoch.
const WRITER: &[&str] = &[
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--workload",
    "pages,rate=20000,mib=16",
];

const LIMIT: u64 = 1 << 20;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn log_of(d: &Daemon) -> String {
    std::fs::read_to_string(&d.log).unwrap_or_default()
}

fn tail(log: &str) -> String {
    let l: Vec<&str> = log.lines().collect();
    l[l.len().saturating_sub(40)..].join("\n")
}

/// The console of `d` from offset 0.
fn console(d: &Daemon, for_: Duration) -> Vec<u8> {
    let mut s = Vec::new();
    let _ = read_console(d.console, 0, &mut s, Instant::now() + for_, u64::MAX);
    s
}

fn oversize_checkpoints(verify: bool) {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&tmp.path().join("etcd")).unwrap();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let backup = pair
        .start_backup(1, &strings(&["--max-epoch-bytes", "1M"]), "b.log")
        .unwrap();
    let mut guest = strings(WRITER);
    if verify {
        guest.push("--verify".into());
    }
    let mut primary = pair.start_primary(0, &guest, "a.log").unwrap();

    // The refusal, in the log and in the status, names the limit and the size.
    let t = Instant::now();
    let mut rss_max = 0;
    let mut seen_refusal = None;
    while t.elapsed() < Duration::from_secs(40) {
        rss_max = rss_max.max(rss_kib(backup.child.id()));
        if let Some(r) = backup
            .status()
            .and_then(|s| s.backup)
            .and_then(|b| b.last_refusal)
        {
            if r.contains("cannot protect this guest") {
                seen_refusal = Some(r);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let blog = log_of(&backup);
    let why = seen_refusal.unwrap_or_else(|| {
        panic!(
            "no clear refusal in the status within 40 s: {:?}\n{blog}",
            backup.status().map(|s| s.to_json())
        )
    });
    eprintln!("refused: {why}");
    assert!(
        why.contains(&format!("the limit is {LIMIT} bytes")),
        "{why}"
    );
    assert!(why.contains("bytes staged"), "{why}");
    assert!(why.contains("--max-epoch-bytes"), "{why}");
    assert!(blog.contains("staging limit"), "{blog}");
    let o = std::process::Command::new(castor_bin())
        .args(["status", "--control"])
        .arg(&backup.control)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("refused") && summary.contains("staging limit"),
        "{summary}"
    );
    assert!(!blog.contains("panicked"), "{blog}");
    assert!(!log_of(&primary).contains("panicked"));

    // Never a second runner, the primary's console one history, and the
    // primary says it is unprotected.
    let b = backup.status().unwrap();
    assert_eq!(b.role, Role::Backup);
    let p = primary.status().expect("the primary answers");
    assert!(p.primary.is_some(), "{p:?}");
    let seen = console(&primary, Duration::from_millis(500));
    let c = continuity(&seen);
    assert!(c.ok() && c.lines > 10, "{:?}", c.problems);

    // Memory: the replica (the guest's 64 MiB at most), one staged epoch
    // (the limit), what the connection may buffer unread (its receive
    // window), plus the process itself (64 MiB of slack).
    for _ in 0..20 {
        rss_max = rss_max.max(rss_kib(backup.child.id()));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("backup RSS max {} MiB", rss_max >> 10);
    assert!(
        rss_max
            < (64 << 10) + (LIMIT >> 10) + 2 * (transport::STREAM_WINDOW as u64 >> 10) + (64 << 10),
        "the backup's RSS reached {rss_max} KiB"
    );

    // The primary dies while this goes on: the backup takes over from a
    // committed checkpoint (one history with what clients saw), or refuses
    // to and says why; never from a partial epoch.
    let seen = console(&primary, Duration::from_millis(300));
    let owner_before = etcd.client("castor").unwrap().read().unwrap().unwrap().0;
    primary.kill();
    std::thread::sleep(Duration::from_secs(5));
    let b = backup.status().expect("the backup answers after the kill");
    let blog = log_of(&backup);
    let owner = etcd.client("castor").unwrap().read().unwrap().unwrap().0;
    eprintln!(
        "after the kill: role {:?}, owner {owner:?} (before {owner_before:?})",
        b.role
    );
    if b.role == Role::TakenOver {
        assert_eq!(owner.owner, "b");
        let resumed = b.resumed_at.expect("resumed_at");
        assert!(
            seen.len() as u64 <= resumed,
            "clients saw {} bytes, the backup resumed at {resumed}: output of an unacked epoch was released",
            seen.len()
        );
        let survivor = console(&backup, Duration::from_millis(800));
        assert!(survivor.starts_with(&seen), "two histories");
        let c = continuity(&survivor);
        assert!(c.ok(), "{:?}", c.problems);
        let _ = wait_status(&backup, "the survivor runs", Duration::from_secs(5), |s| {
            s.primary.is_some()
        });
    } else {
        assert_eq!(b.role, Role::Backup);
        assert_ne!(owner.owner, "b");
        // It says why it does not take over.
        let why = blog
            .lines()
            .find(|l| l.contains("does not take over"))
            .unwrap_or_else(|| panic!("the backup neither took over nor said why:\n{blog}"));
        eprintln!("{why}");
    }
    assert!(!blog.contains("panicked"), "{blog}");
}

#[test]
fn an_oversize_checkpoint_is_refused_whole_and_said_so() {
    oversize_checkpoints(false);
}

#[test]
fn an_oversize_checkpoint_is_refused_whole_and_said_so_with_verify() {
    oversize_checkpoints(true);
}

#[test]
fn a_protected_pair_whose_checkpoint_outgrows_the_limit_stays_at_its_committed_checkpoint() {
    // 4 000 fresh pages a second over 4 MiB: 25 ms epochs of ~400 KiB fit
    // the 2 MiB limit; an epoch stretched by a backup frozen for 250 ms
    // (the primary waits for acks) does not.
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&tmp.path().join("etcd")).unwrap();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let backup = pair
        .start_backup(1, &strings(&["--max-epoch-bytes", "2M"]), "b.log")
        .unwrap();
    let guest = strings(&[
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--workload",
        "pages,rate=4000,mib=4",
        "--backup-timeout-ms",
        "1000",
    ]);
    let mut primary = pair.start_primary(0, &guest, "a.log").unwrap();
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        lab::pair::protected_after(20),
    )
    .unwrap();
    // Wait for the first refusal (freezing the backup now and then to
    // stretch an epoch if the guest's own do not outgrow the limit).
    let t = Instant::now();
    let mut tries = 0;
    while !log_of(&backup).contains("refusing the primary's session") {
        assert!(t.elapsed() < Duration::from_secs(40), "never refused");
        tries += 1;
        let _ = backup.signal(rustix::process::Signal::STOP);
        std::thread::sleep(Duration::from_millis(250));
        let _ = backup.signal(rustix::process::Signal::CONT);
        std::thread::sleep(Duration::from_millis(700));
    }
    let blog = log_of(&backup);
    let why = blog
        .lines()
        .find(|l| l.contains("refusing the primary's session"))
        .unwrap()
        .to_string();
    eprintln!("refused after {tries} freezes: {why}");
    assert!(why.contains("staging limit"), "{why}");
    assert!(
        why.contains("the last committed"),
        "a protected session's checkpoint: {why}\n{}\n{}",
        tail(&blog),
        tail(&log_of(&primary))
    );
    // The primary held that epoch's output until the witness let it carry
    // on alone.
    let plog = log_of(&primary);
    assert!(plog.contains("output is held meanwhile"), "{plog}");
    let blog = log_of(&backup);
    assert!(!blog.contains("FAILOVER"), "{blog}");
    // The guest runs on at the primary, one history, never a second runner.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(backup.status().unwrap().role, Role::Backup);
    let seen = console(&primary, Duration::from_millis(300));
    let c = continuity(&seen);
    assert!(c.ok() && c.lines > 10, "{:?}", c.problems);
    let p = primary.status().unwrap();
    eprintln!(
        "primary protected={} epochs={}",
        p.protected(),
        p.figures().epochs
    );
    // Killed now: a takeover only from a committed checkpoint, with what
    // clients saw in it; or none, said why.
    primary.kill();
    std::thread::sleep(Duration::from_secs(5));
    let b = backup.status().expect("the backup answers");
    let blog = log_of(&backup);
    if b.role == Role::TakenOver {
        let resumed = b.resumed_at.unwrap();
        assert!(seen.len() as u64 <= resumed, "{} > {resumed}", seen.len());
        let survivor = console(&backup, Duration::from_millis(800));
        assert!(survivor.starts_with(&seen), "two histories");
        let c = continuity(&survivor);
        assert!(c.ok(), "{:?}", c.problems);
    } else {
        let line = blog
            .lines()
            .find(|l| l.contains("does not take over"))
            .unwrap_or_else(|| panic!("neither a takeover nor why not:\n{blog}"));
        eprintln!("{line}");
    }
    assert!(!blog.contains("panicked"), "{blog}");
}
