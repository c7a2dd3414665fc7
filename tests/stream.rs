//! The replication stream's rules end to end: a hello beyond the backup's
//! limits is refused and the primary says why; an orderly stop under a
//! full link ends with the backup holding the primary's last checkpoint
//! and standing down (no takeover).

mod common;

use std::time::{Duration, Instant};

use common::castor_bin;
use lab::pair::{self, wait_status, Daemon, Pair};
use node::Role;

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn log_of(d: &Daemon) -> String {
    std::fs::read_to_string(&d.log).unwrap()
}

#[test]
fn a_guest_over_the_backups_memory_limit_is_refused_and_the_primary_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    castor_bin();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"]).unwrap();
    let backup = pair
        .start_backup(1, &strings(&["--max-memory", "64M"]), "b.log")
        .unwrap();
    let primary = pair
        .start_primary(
            0,
            &strings(&["--mem", "128M", "--vcpus", "1", "--workload", "counter"]),
            "a.log",
        )
        .unwrap();
    wait_status(
        &primary,
        "the primary to run",
        Duration::from_secs(30),
        |s| s.console_released > 0,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = primary.status().unwrap();
    assert!(pair::unprotected(&s), "{s:?}");
    let b = backup.status().unwrap();
    assert_eq!(b.role, Role::Backup, "{b:?}");
    assert_eq!(b.backup.unwrap().committed_epoch, 0, "nothing committed");
    let blog = log_of(&backup);
    assert!(
        blog.contains(
            "134217728 bytes of RAM, over this backup's limit of 67108864 (--max-memory)"
        ),
        "{blog}"
    );
    let plog = log_of(&primary);
    assert!(
        plog.contains("incompatible: the primary's guest has 134217728 bytes of RAM"),
        "the primary logs the backup's reason:\n{plog}"
    );
}

#[test]
fn an_orderly_stop_under_a_full_link_leaves_the_backup_at_the_last_checkpoint_and_standing_down() {
    let tmp = tempfile::tempdir().unwrap();
    castor_bin();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"]).unwrap();
    // A writer flat out over a slow emulated link: checkpoints queue on the
    // data stream behind each other, and a goodbye on the control stream
    // would overtake them.
    let (backup, mut primary) = pair
        .start(
            &[],
            &strings(&[
                "--mem",
                "128M",
                "--vcpus",
                "1",
                "--workload",
                "pages,mib=2,rate=0",
                "--link-rate",
                "100mbit",
            ]),
            ["b.log", "a.log"],
        )
        .unwrap();
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected_after(20),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    primary.signal(rustix::process::Signal::TERM).unwrap();
    let t = Instant::now();
    while primary.child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the primary did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Give a (wrong) takeover its chance.
    std::thread::sleep(Duration::from_millis(500));
    let plog = log_of(&primary);
    let blog = log_of(&backup);
    let last: u64 = plog
        .split("waiting for the backup to commit checkpoint ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no goodbye in the primary's log:\n{plog}"));
    assert!(!blog.contains("FAILOVER"), "{blog}");
    assert!(!blog.contains("silent"), "{blog}");
    let b = backup.status().unwrap();
    assert_eq!(b.role, Role::Backup, "the backup stood down: {b:?}");
    assert_eq!(
        b.backup.as_ref().unwrap().committed_epoch,
        last,
        "the backup committed the last checkpoint the goodbye named:\n{blog}"
    );
    assert!(
        plog.contains("the backup committed the last checkpoint and ended the session"),
        "{plog}"
    );
    // The goodbye overtook checkpoints (the case this is about): the backup
    // stood down on it and committed the rest before ending the session.
    assert!(
        blog.contains("the primary is stopping: standing down"),
        "the goodbye did not overtake any checkpoint (the link was not full):\n{blog}"
    );
    assert!(
        blog.contains("the primary's last checkpoint is committed"),
        "{blog}"
    );
}
