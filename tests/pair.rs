//! The HA pair end to end: real daemons, real KVM, real QUIC on loopback.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{castor_bin, outcome, run};
use lab::console::continuity;
use lab::pair::{self, kill_and_follow, read_console, status, wait_status, Daemon, Node, Pair};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Nodes "a" and "b" with certificates in `dir/pki`, started from the
/// castor binary under test.
fn pair_in(dir: &Path) -> Pair {
    castor_bin();
    Pair::in_dir(dir, ["a", "b"]).unwrap()
}

/// A backup "b" and a primary "a" on loopback: `both` go to both daemons,
/// `primary` to the primary alone.
fn start_pair(dir: &Path, both: &[&str], primary: &[&str]) -> (Daemon, Daemon) {
    pair_in(dir)
        .start(&strings(both), &strings(primary), ["b.log", "a.log"])
        .unwrap()
}

#[test]
fn drill_failovers_keep_the_console_continuous() {
    let (ok, out) = outcome(&run(&["drill", "--rounds", "3"]));
    assert!(ok, "{out}");
    assert!(out.contains("3 of 3 rounds passed"), "{out}");
    assert_eq!(out.matches("console continuous").count(), 3, "{out}");
}

/// The fault drill's output: every round passed ("one history, one
/// primary"), and every fault ran and passed all its `per_fault` rounds.
fn assert_fault_drill(out: &str, rounds: usize, per_fault: usize) {
    assert_eq!(
        out.matches("one history, one primary").count(),
        rounds,
        "{out}"
    );
    let n = per_fault.to_string();
    for f in [
        "Kill",
        "KillBackup",
        "PausePrimary",
        "PauseBackup",
        "WitnessDown",
        "Partition",
        "OneWay",
        "OneWayBack",
        "Flap",
        "EtcdLeader",
        "SlowEtcd",
    ] {
        let want = [f, &n, "of", &n, "rounds", "passed;"];
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().take(6).eq(want.iter().copied())),
            "{f}: {out}"
        );
    }
}

/// Every fault once on the counter guest (as under the two key-value
/// drills below; the 1,100-round runs of docs/bench/drill.md repeat each
/// 100 times): a kill, a pause or a
/// partition (both ways, one way, flapping) of either node, the witness
/// down, its leader killed during the claim, its disk slow — whichever node
/// runs the guest at the time; one history and one primary every round.
#[test]
fn a_fault_drill_keeps_one_history_and_one_primary() {
    let (ok, out) = outcome(&run(&[
        "drill",
        "--faults",
        "all",
        "--rounds",
        "11",
        "--fault-length",
        "1s",
        "--mem",
        "128M",
    ]));
    assert!(ok, "{out}");
    assert_fault_drill(&out, 11, 1);
}

/// Every fault once under a key-value client (the `net` workload): no
/// acknowledged write lost, no reply from lost state, every key read back
/// after every round, the whole history linearizable. Before the tap was
/// drained at a takeover, the first kill failed here: the backup's tap had
/// queued the client's requests while it was a backup, and the resumed
/// guest applied them a second time.
#[test]
fn a_fault_drill_under_a_key_value_client_keeps_every_acknowledged_write() {
    let (ok, out) = outcome(&run(&[
        "drill",
        "--workload",
        "net",
        "--faults",
        "all",
        "--rounds",
        "11",
        "--fault-length",
        "1s",
        "--mem",
        "128M",
    ]));
    assert!(ok, "{out}");
    assert_fault_drill(&out, 11, 1);
    assert!(out.contains(", 0 violations"), "{out}");
    assert!(
        out.contains("key-value history: linearizable: yes"),
        "{out}"
    );
}

/// Every fault once with a disk (`kvdisk`: PUTs durable on the guest's
/// disk before their reply); at the end a fresh guest booted on the
/// survivor's disk alone reads back every acknowledged key.
#[test]
fn a_fault_drill_with_a_disk_keeps_every_acknowledged_write_on_it() {
    let (ok, out) = outcome(&run(&[
        "drill",
        "--workload",
        "kvdisk",
        "--faults",
        "all",
        "--rounds",
        "11",
        "--fault-length",
        "1s",
        "--mem",
        "128M",
    ]));
    assert!(ok, "{out}");
    assert_fault_drill(&out, 11, 1);
    assert!(
        out.contains("key-value history: linearizable: yes"),
        "{out}"
    );
    let cold = out
        .lines()
        .find(|l| l.contains("cold boot from the survivor's disk alone"))
        .unwrap_or_else(|| panic!("no cold boot: {out}"));
    let (read, keys) = cold
        .split(": ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.split_once('/'))
        .unwrap_or_else(|| panic!("{cold}"));
    assert_eq!(read, keys, "{cold}");
}

#[test]
fn verification_finds_no_mismatch_in_any_mode() {
    for mode in ["remus", "xbzrle", "fgbi"] {
        let tmp = tempfile::tempdir().unwrap();
        let both = ["--verify", "--mode", mode];
        let (backup, primary) = start_pair(
            tmp.path(),
            &both,
            &[
                "--mem",
                "128M",
                "--vcpus",
                "1",
                "--workload",
                "sparse,rate=50000,mib=16",
            ],
        );
        wait_status(&primary, "40 epochs", Duration::from_secs(60), |s| {
            s.figures().epochs >= 40
        })
        .unwrap();
        let s = backup.status().unwrap();
        let b = s.backup.as_ref().unwrap();
        assert!(b.verifying, "{mode}: {s:?}");
        assert!(b.checkpoints_applied >= 30, "{mode}: {s:?}");
        assert_eq!(b.verify_mismatches, 0, "{mode}: {s:?}");
        let p = primary.status().unwrap().figures();
        assert!(
            p.dirty_pages_mean > 10.0,
            "{mode}: the workload dirtied memory: {p:?}"
        );
        // Most pages were copied by the pre-copy, before the pause: the
        // verified replicas include pages copied while the guest ran.
        assert!(
            p.precopied_mean > 0.5 * p.dirty_pages_mean,
            "{mode}: the pre-copy took part: {p:?}"
        );
    }
}

fn console_grows(control: &std::path::Path) -> bool {
    let end = || status(control).map_or(0, |s| s.console_released);
    let a = end();
    std::thread::sleep(Duration::from_millis(300));
    end() > a
}

#[test]
fn the_primary_survives_its_backup_and_reprotects() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_in(tmp.path());
    let mut backup = pair.start_backup(1, &[], "b1.log").unwrap();
    let primary = pair
        .start_primary(
            0,
            &strings(&[
                "--mem",
                "128M",
                "--vcpus",
                "1",
                "--backup-timeout-ms",
                "300",
            ]),
            "a.log",
        )
        .unwrap();
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    backup.kill();
    wait_status(
        &primary,
        "the primary to notice",
        Duration::from_secs(10),
        pair::unprotected,
    )
    .unwrap();
    assert!(
        console_grows(&primary.control),
        "the unprotected guest keeps running and its output flows"
    );
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(
        log.contains("UNPROTECTED: lost the backup"),
        "says so loudly:\n{log}"
    );
    // A new backup comes: full resync, protected again.
    let _backup2 = pair.start_backup(1, &[], "b2.log").unwrap();
    let t = Instant::now();
    wait_status(
        &primary,
        "re-protection",
        Duration::from_secs(30),
        pair::protected,
    )
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(console_grows(&primary.control));
}

#[test]
fn a_backup_with_the_wrong_certificate_is_refused_and_the_primary_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_in(tmp.path());
    let other = tmp.path().join("other");
    transport::certs::create(&other, &["b".into()], false).unwrap();
    // The impostor presents "b" from another CA (trusting ours to get that far).
    std::fs::copy(pair.certs.join("ca.pem"), other.join("ca.pem")).unwrap();
    let _impostor = pair::start_backup(
        &Node {
            certs: &other,
            name: "b",
            peer: "a",
            witness: "none",
            place: None,
            tap: None,
            disk: None,
        },
        pair.ports[1],
        pair.ports[0],
        &[],
        tmp.path().join("impostor.log"),
    )
    .unwrap();
    let primary = pair
        .start_primary(0, &strings(&["--mem", "128M", "--vcpus", "1"]), "a.log")
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
    assert!(console_grows(&primary.control), "the primary stays up");
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(
        log.contains("cannot reach the backup"),
        "the refusal is logged:\n{log}"
    );
}

#[test]
fn the_console_continues_across_a_failover_in_every_mode() {
    for mode in ["remus", "xbzrle", "fgbi"] {
        let tmp = tempfile::tempdir().unwrap();
        let primary_args = [
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--workload",
            "verify,rate=2000,mib=4,interval_ms=20",
        ];
        let (backup, mut primary) = start_pair(tmp.path(), &["--mode", mode], &primary_args);
        wait_status(
            &primary,
            "protection",
            Duration::from_secs(60),
            pair::protected,
        )
        .unwrap();
        let mut stream = Vec::new();
        read_console(
            primary.console,
            0,
            &mut stream,
            Instant::now() + Duration::from_millis(800),
            u64::MAX,
        )
        .unwrap();
        let t = kill_and_follow(
            &mut primary,
            &backup,
            &mut stream,
            Duration::from_millis(1000),
        )
        .unwrap();
        assert!(t.first.is_some(), "{mode}: the survivor produced output");
        let c = continuity(&stream);
        assert!(c.ok(), "{mode}: {:?}", c.problems);
        assert!(c.lines > 40, "{mode}: {} lines", c.lines);
        let text = String::from_utf8_lossy(&stream);
        assert!(
            !text.contains("CORRUPT"),
            "{mode}: the guest's self-check found corruption after failover"
        );
        assert!(text.contains("errors=0"));
    }
}

#[test]
fn a_config_file_and_a_takeover_on_command() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_in(tmp.path());
    let backup = pair.start_backup(1, &[], "b.log").unwrap();
    let cfg = tmp.path().join("primary.toml");
    std::fs::write(&cfg, "mem = \"128M\"\nvcpus = 1\nworkload = \"counter\"\nmode = \"xbzrle\"\nepoch-ms = 20\nverify = true\n").unwrap();
    // The command line overrides the file: epoch 20 -> 30.
    let args: Vec<String> = vec![
        "--config".into(),
        cfg.display().to_string(),
        "--epoch-ms".into(),
        "30".into(),
    ];
    let mut primary = pair.start_primary(0, &args, "a.log").unwrap();
    let s = wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    assert_eq!(s.figures().mode, "xbzrle", "{s:?}");
    assert_eq!(s.figures().epoch_ms, 30, "{s:?}");
    assert!(backup.status().unwrap().backup.unwrap().verifying);
    let mut stream = Vec::new();
    read_console(
        primary.console,
        0,
        &mut stream,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    )
    .unwrap();

    // The primary refuses; the backup takes over.
    let (ok, out) = outcome(&run(&[
        "takeover",
        "--control",
        &primary.control.display().to_string(),
    ]));
    assert!(!ok && out.contains("this node runs the guest"), "{out}");
    // The summary a person reads, and the typed status.
    let (ok, out) = outcome(&run(&[
        "status",
        "--control",
        &backup.control.display().to_string(),
    ]));
    assert!(
        ok && out.contains("role       backup") && out.contains("replica    epoch"),
        "{out}"
    );
    let (ok, out) = outcome(&run(&[
        "status",
        "--json",
        "--control",
        &backup.control.display().to_string(),
    ]));
    assert!(ok && node::Status::from_json(&out).is_ok(), "{out}");
    let (ok, out) = outcome(&run(&[
        "takeover",
        "--control",
        &backup.control.display().to_string(),
    ]));
    assert!(ok && out.contains("ok: taking over"), "{out}");
    // The old primary is fenced: its guest stops and the process exits.
    let t = Instant::now();
    let code = loop {
        if let Some(c) = primary.child.try_wait().unwrap() {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the old primary kept running after the takeover"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!code.success());
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(log.contains("FENCED"), "{log}");
    // Its console, then the survivor's: continuous.
    read_console(
        primary.console,
        stream.len() as u64,
        &mut stream,
        Instant::now() + Duration::from_millis(100),
        u64::MAX,
    )
    .ok();
    let off = stream.len() as u64;
    let first = read_console(
        backup.console,
        off,
        &mut stream,
        Instant::now() + Duration::from_millis(800),
        off,
    )
    .unwrap();
    assert!(first.is_some(), "the survivor produced output");
    let c = continuity(&stream);
    assert!(
        c.ok() && c.lines > 20,
        "{} lines, {:?}",
        c.lines,
        c.problems
    );
}
