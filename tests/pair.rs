//! The HA pair end to end: real daemons, real KVM, real QUIC on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use lab::pair::{
    continuity, field, free_port, read_console, start_backup, start_primary, status, wait_status,
    Daemon, Node,
};

fn castor_bin() {
    std::env::set_var("CASTOR_BIN", env!("CARGO_BIN_EXE_castor"));
}

fn run(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_castor"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn drill_failovers_keep_the_console_continuous() {
    let (ok, out) = run(&["drill", "--rounds", "3"]);
    assert!(ok, "{out}");
    assert!(out.contains("3 of 3 rounds passed"), "{out}");
    assert_eq!(out.matches("console continuous").count(), 3, "{out}");
}

#[test]
fn verification_finds_no_mismatch_in_any_mode() {
    castor_bin();
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
            field(s, "epochs").unwrap_or(0.0) >= 40.0
        })
        .unwrap();
        let s = status(backup.console).unwrap();
        assert!(s.contains("\"verifying\":true"), "{mode}: {s}");
        assert!(
            field(&s, "checkpoints_applied").unwrap() >= 30.0,
            "{mode}: {s}"
        );
        assert_eq!(field(&s, "verify_mismatches"), Some(0.0), "{mode}: {s}");
        let p = status(primary.console).unwrap();
        assert!(
            field(&p, "dirty_pages_mean").unwrap() > 10.0,
            "{mode}: the workload dirtied memory: {p}"
        );
        // Most pages were copied by the pre-copy, before the pause: the
        // verified replicas include pages copied while the guest ran.
        assert!(
            field(&p, "precopied_mean").unwrap() > 0.5 * field(&p, "dirty_pages_mean").unwrap(),
            "{mode}: the pre-copy took part: {p}"
        );
    }
}

fn console_grows(console: std::net::SocketAddr) -> bool {
    let end = |s: &str| field(s, "console_released").unwrap_or(0.0);
    let a = end(&status(console).unwrap_or_default());
    std::thread::sleep(Duration::from_millis(300));
    end(&status(console).unwrap_or_default()) > a
}

/// A backup "b" and a primary "a" on loopback: `both` go to both daemons,
/// `primary` to the primary alone.
fn start_pair(dir: &Path, both: &[&str], primary: &[&str]) -> (Daemon, Daemon) {
    let certs = certs_for(dir);
    let (pa, pb) = (free_port(true).unwrap(), free_port(true).unwrap());
    let both: Vec<String> = both.iter().map(|s| s.to_string()).collect();
    let backup = start_backup(
        &Node {
            certs: &certs,
            name: "b",
            peer: "a",
        },
        pb,
        pa,
        &both,
        dir.join("b.log"),
    )
    .unwrap();
    let mut args = both.clone();
    args.extend(primary.iter().map(|s| s.to_string()));
    let primary = start_primary(
        &Node {
            certs: &certs,
            name: "a",
            peer: "b",
        },
        pb,
        &args,
        dir.join("a.log"),
    )
    .unwrap();
    (backup, primary)
}

fn certs_for(dir: &Path) -> std::path::PathBuf {
    let certs = dir.join("pki");
    protocol::certs::create(&certs, &["a".into(), "b".into()], false).unwrap();
    certs
}

#[test]
fn the_primary_survives_its_backup_and_reprotects() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs_for(tmp.path());
    let (pa, pb) = (free_port(true).unwrap(), free_port(true).unwrap());
    let b = Node {
        certs: &certs,
        name: "b",
        peer: "a",
    };
    let mut backup = start_backup(&b, pb, pa, &[], tmp.path().join("b1.log")).unwrap();
    let primary = start_primary(
        &Node {
            certs: &certs,
            name: "a",
            peer: "b",
        },
        pb,
        &[
            "--mem".into(),
            "128M".into(),
            "--vcpus".into(),
            "1".into(),
            "--backup-timeout-ms".into(),
            "300".into(),
        ],
        tmp.path().join("a.log"),
    )
    .unwrap();
    wait_status(&primary, "protection", Duration::from_secs(60), |s| {
        s.contains("\"protected\":true")
    })
    .unwrap();
    backup.kill();
    wait_status(
        &primary,
        "the primary to notice",
        Duration::from_secs(10),
        |s| s.contains("\"protected\":false"),
    )
    .unwrap();
    assert!(
        console_grows(primary.console),
        "the unprotected guest keeps running and its output flows"
    );
    let log = std::fs::read_to_string(tmp.path().join("a.log")).unwrap();
    assert!(
        log.contains("UNPROTECTED: lost the backup"),
        "says so loudly:\n{log}"
    );
    // A new backup comes: full resync, protected again.
    let _backup2 = start_backup(&b, pb, pa, &[], tmp.path().join("b2.log")).unwrap();
    let t = Instant::now();
    wait_status(&primary, "re-protection", Duration::from_secs(30), |s| {
        s.contains("\"protected\":true")
    })
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(console_grows(primary.console));
}

#[test]
fn a_backup_with_the_wrong_certificate_is_refused_and_the_primary_stays_up() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs_for(tmp.path());
    let other = tmp.path().join("other");
    protocol::certs::create(&other, &["b".into()], false).unwrap();
    // The impostor presents "b" from another CA (trusting ours to get that far).
    std::fs::copy(certs.join("ca.pem"), other.join("ca.pem")).unwrap();
    let (pa, pb) = (free_port(true).unwrap(), free_port(true).unwrap());
    let _impostor = start_backup(
        &Node {
            certs: &other,
            name: "b",
            peer: "a",
        },
        pb,
        pa,
        &[],
        tmp.path().join("impostor.log"),
    )
    .unwrap();
    let primary = start_primary(
        &Node {
            certs: &certs,
            name: "a",
            peer: "b",
        },
        pb,
        &["--mem".into(), "128M".into(), "--vcpus".into(), "1".into()],
        tmp.path().join("a.log"),
    )
    .unwrap();
    wait_status(
        &primary,
        "the primary to run",
        Duration::from_secs(30),
        |s| field(s, "console_released").unwrap_or(0.0) > 0.0,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = status(primary.console).unwrap();
    assert!(s.contains("\"protected\":false"), "{s}");
    assert!(console_grows(primary.console), "the primary stays up");
    let log = std::fs::read_to_string(tmp.path().join("a.log")).unwrap();
    assert!(
        log.contains("cannot reach the backup"),
        "the refusal is logged:\n{log}"
    );
}

#[test]
fn the_console_continues_across_a_failover_in_every_mode() {
    castor_bin();
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
        wait_status(&primary, "protection", Duration::from_secs(60), |s| {
            s.contains("\"protected\":true")
        })
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
        primary.kill();
        let committed = field(&status(backup.console).unwrap(), "console_end").unwrap() as u64;
        let off = stream.len() as u64;
        let first = read_console(
            backup.console,
            off,
            &mut stream,
            Instant::now() + Duration::from_millis(1000),
            committed,
        )
        .unwrap();
        assert!(first.is_some(), "{mode}: the survivor produced output");
        let (lines, problems) = continuity(&stream);
        assert!(problems.is_empty(), "{mode}: {problems:?}");
        assert!(lines > 40, "{mode}: {lines} lines");
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
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs_for(tmp.path());
    let (pa, pb) = (free_port(true).unwrap(), free_port(true).unwrap());
    let backup = start_backup(
        &Node {
            certs: &certs,
            name: "b",
            peer: "a",
        },
        pb,
        pa,
        &[],
        tmp.path().join("b.log"),
    )
    .unwrap();
    let cfg = tmp.path().join("primary.toml");
    std::fs::write(&cfg, "mem = \"128M\"\nvcpus = 1\nworkload = \"counter\"\nmode = \"xbzrle\"\nepoch-ms = 20\nverify = true\n").unwrap();
    // The command line overrides the file: epoch 20 -> 30.
    let args: Vec<String> = vec![
        "--config".into(),
        cfg.display().to_string(),
        "--epoch-ms".into(),
        "30".into(),
    ];
    let mut primary = start_primary(
        &Node {
            certs: &certs,
            name: "a",
            peer: "b",
        },
        pb,
        &args,
        tmp.path().join("a.log"),
    )
    .unwrap();
    let s = wait_status(&primary, "protection", Duration::from_secs(60), |s| {
        s.contains("\"protected\":true")
    })
    .unwrap();
    assert!(s.contains("\"mode\":\"xbzrle\""), "{s}");
    assert!(s.contains("\"epoch_ms\":30"), "{s}");
    assert!(status(backup.console)
        .unwrap()
        .contains("\"verifying\":true"));
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
    let (ok, out) = run(&["takeover", "--console", &primary.console.to_string()]);
    assert!(!ok && out.contains("this node is the primary"), "{out}");
    let (ok, out) = run(&["takeover", "--console", &backup.console.to_string()]);
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
    let log = std::fs::read_to_string(tmp.path().join("a.log")).unwrap();
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
    let (lines, problems) = continuity(&stream);
    assert!(
        problems.is_empty() && lines > 20,
        "{lines} lines, {problems:?}"
    );
}
