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
    assert!(why.contains(&format!("the limit is {LIMIT} bytes")), "{why}");
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
    eprintln!("after the kill: role {:?}, owner {owner:?} (before {owner_before:?})", b.role);
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
        assert!(
            blog.contains("nothing committed")
                || blog.contains("witness gives the VM")
                || blog.contains("not take over")
                || blog.contains("no takeover"),
            "the backup neither took over nor said why:\n{blog}"
        );
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
