//! `castor migrate` asks a running, protected primary to move its guest:
//! real daemons, real KVM, a real etcd as the witness (Debian's
//! etcd-server, started here), a `castor migrate-listen` destination.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{castor_bin, exited, follow_from_start, strings};
use lab::console::continuity;
use lab::pair::{self, read_console, wait_status, Daemon, Pair};
use node::Role;
use witness::server::EtcdServer;

const GUEST: &[&str] = &[
    "--mem",
    "128M",
    "--vcpus",
    "1",
    "--workload",
    "counter,interval_ms=2",
];

/// Nodes a (primary) and b (backup) protected, with etcd as the witness,
/// and certificates for nodes c and d from the same CA.
fn protected_pair(dir: &std::path::Path) -> (EtcdServer, Pair, Daemon, Daemon) {
    protected_pair_of(dir, GUEST)
}

/// [`protected_pair`] with the guest `guest`.
fn protected_pair_of(dir: &std::path::Path, guest: &[&str]) -> (EtcdServer, Pair, Daemon, Daemon) {
    castor_bin();
    let etcd = EtcdServer::start(&dir.join("etcd")).expect("etcd starts");
    let names = ["a", "b", "c", "d"].map(String::from);
    transport::certs::create(&dir.join("pki"), &names, false).unwrap();
    let pair = Pair::new(&dir.join("pki"), ["a", "b"], dir)
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let (backup, primary) = pair
        .start(&[], &strings(guest), ["b.log", "a.log"])
        .unwrap();
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected_after(20),
    )
    .unwrap();
    (etcd, pair, backup, primary)
}

/// The VM's owner at the witness.
fn owner_now(etcd: &EtcdServer) -> witness::Owner {
    etcd.client("castor").unwrap().read().unwrap().unwrap().0
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `castor migrate-listen` as node c, accepting a.
fn destination(dir: &std::path::Path, listen: SocketAddr, console: SocketAddr) -> Proc {
    let log = std::fs::File::create(dir.join("c.log")).unwrap();
    let child = Command::new(castor_bin())
        .args(["migrate-listen", "--certs"])
        .arg(dir.join("pki"))
        .args([
            "--node",
            "c",
            "--peer",
            "a",
            "--listen",
            &listen.to_string(),
        ])
        .args(["--console", &console.to_string(), "--duration", "60s"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// After a failed migration: the guest runs on a, protected again by the
/// same backup, a still owns the VM, and its console is one history.
fn stays_protected_here(primary: &Daemon, backup: &Daemon, etcd: &EtcdServer) {
    wait_status(
        primary,
        "re-protection",
        Duration::from_secs(30),
        pair::protected_after(10),
    )
    .unwrap();
    assert_eq!(backup.status().unwrap().role, Role::Backup);
    assert_eq!(owner_now(etcd).owner, "a");
    let mut s = Vec::new();
    let _ = read_console(
        primary.console,
        0,
        &mut s,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    );
    let c = continuity(&s);
    assert!(c.ok(), "{:?}", c.problems);
    assert!(c.lines > 10, "{} progress lines", c.lines);
}

/// `castor migrate` asking `primary` to move its guest to c at `to`.
fn ask(primary: &Daemon, to: SocketAddr, extra: &[&str]) -> (bool, String) {
    ask_at(&primary.control, to, extra)
}

/// [`ask`] by the primary's control socket.
fn ask_at(control: &std::path::Path, to: SocketAddr, extra: &[&str]) -> (bool, String) {
    let o = Command::new(castor_bin())
        .args(["migrate", "--control"])
        .arg(control)
        .args(["--to", &to.to_string(), "--dest", "c"])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn a_protected_primary_moves_its_guest_hands_it_over_and_its_backup_stands_down() {
    let tmp = tempfile::tempdir().unwrap();
    let (etcd, _pair, backup, mut primary) = protected_pair(tmp.path());
    let token_before = owner_now(&etcd);
    assert_eq!(token_before.owner, "a");
    let listen = pair::free_port(true).unwrap();
    let c_console = pair::free_port(false).unwrap();
    let _dest = destination(tmp.path(), listen, c_console);
    std::thread::sleep(Duration::from_millis(300));

    // A console client on the source from the start, to the end of its stream.
    let follower = follow_from_start(primary.console, Duration::from_secs(60));
    let (ok, text) = ask(&primary, listen, &["--max-downtime", "50ms"]);
    assert!(ok, "castor migrate failed: {text}");
    assert!(text.contains("MIGRATED"), "{text}");
    let report: serde_json::Value = serde_json::from_str(
        text.lines()
            .find_map(|l| l.strip_prefix("MIGRATED "))
            .unwrap(),
    )
    .unwrap();
    assert!(report["digest"].is_string(), "a verified switch: {report}");

    // The source stops; the backup stood down and stays a backup.
    assert!(
        exited(&mut primary, Duration::from_secs(10)),
        "the source kept running"
    );
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(log.contains("MIGRATED"), "{log}");
    std::thread::sleep(Duration::from_secs(2));
    let b = backup.status().expect("the backup answers");
    assert_eq!(b.role, Role::Backup, "the stood-down backup took over");

    // The witness names the destination, with the next tokens: one for the
    // source carrying on alone after the goodbye, one for the handover.
    let owner = owner_now(&etcd);
    assert_eq!(owner.owner, "c");
    assert!(owner.token > token_before.token, "{owner:?}");
    // A takeover asked of the old backup now is refused by the witness.
    let _ = backup.control(&node::control::Request::Takeover);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(owner_now(&etcd).owner, "c");
    assert_ne!(backup.status().map(|s| s.role), Some(Role::TakenOver));

    // One console history: the source's up to the switch, then the
    // destination's from that offset on.
    let mut stream = follower.join().unwrap();
    let offset = stream.len() as u64;
    assert_eq!(offset, report["console_offset"].as_u64().unwrap());
    let _ = read_console(
        c_console,
        offset,
        &mut stream,
        Instant::now() + Duration::from_millis(1500),
        u64::MAX,
    );
    assert!(
        stream.len() as u64 > offset,
        "the destination's console is silent"
    );
    let c = continuity(&stream);
    assert!(c.ok(), "{:?}", c.problems);
    assert!(c.lines > 100);
}

#[test]
fn a_migration_that_cannot_reach_its_destination_leaves_the_guest_protected_here() {
    let tmp = tempfile::tempdir().unwrap();
    let (etcd, _pair, backup, primary) = protected_pair(tmp.path());
    let nobody = pair::free_port(true).unwrap();
    let t = Instant::now();
    let (ok, text) = ask(&primary, nobody, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("runs on here"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    stays_protected_here(&primary, &backup, &etcd);
}

#[test]
fn a_protected_guest_moves_into_another_protected_pair_and_fails_over_there() {
    let tmp = tempfile::tempdir().unwrap();
    let (etcd, _pair, old_backup, mut a) = protected_pair(tmp.path());
    // The second pair: c waits for the guest, d is its backup.
    let pair2 = Pair::new(&tmp.path().join("pki"), ["c", "d"], tmp.path())
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let d = pair2.start_backup(1, &[], "d.log").unwrap();
    let listen = pair::free_port(true).unwrap();
    let incoming = strings(&["--incoming", &listen.to_string(), "--incoming-from", "a"]);
    let mut c = pair2.start_primary(0, &incoming, "c.log").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let follower = follow_from_start(a.console, Duration::from_secs(60));
    let (ok, text) = ask(&a, listen, &[]);
    // The report (pause_ms: from the pause to c's Finished, its claim at
    // the witness included).
    eprintln!("castor migrate: {text}");
    assert!(ok, "castor migrate failed: {text}");
    assert!(
        exited(&mut a, Duration::from_secs(10)),
        "the source kept running"
    );

    // c protects the guest toward d; the witness names c; b stood down.
    wait_status(
        &c,
        "protection at the destination",
        Duration::from_secs(30),
        pair::protected_after(10),
    )
    .unwrap();
    let owner = owner_now(&etcd);
    assert_eq!(owner.owner, "c");
    assert_eq!(old_backup.status().unwrap().role, Role::Backup);

    // The destination pair fails over as any pair: d takes over from c.
    let mut stream = follower.join().unwrap();
    let _ = read_console(
        c.console,
        stream.len() as u64,
        &mut stream,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    );
    c.kill();
    wait_status(&d, "the takeover", Duration::from_secs(10), |s| {
        s.role == Role::TakenOver
    })
    .unwrap();
    assert_eq!(owner_now(&etcd).owner, "d");
    // One history across both moves: a, then c, then d. Output commit at
    // the destination: nothing c released is missing from d's checkpoint.
    let resumed = d.status().unwrap().resumed_at.unwrap();
    assert!(
        stream.len() as u64 <= resumed,
        "clients saw {} bytes from c, d resumed at {resumed}",
        stream.len()
    );
    let _ = read_console(
        d.console,
        stream.len() as u64,
        &mut stream,
        Instant::now() + Duration::from_millis(1000),
        u64::MAX,
    );
    let cont = continuity(&stream);
    assert!(cont.ok(), "{:?}", cont.problems);
    assert!(cont.lines > 100);
}

#[test]
fn killing_the_destination_during_pre_copy_leaves_the_guest_protected_here() {
    let tmp = tempfile::tempdir().unwrap();
    // 48 MiB of fresh pages over a slow link: the first round takes seconds.
    let guest = [
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--workload",
        "pages,rate=1000,mib=48",
    ];
    let (etcd, _pair, backup, primary) = protected_pair_of(tmp.path(), &guest);
    let listen = pair::free_port(true).unwrap();
    let mut dest = destination(tmp.path(), listen, pair::free_port(false).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let control = primary.control.clone();
    let asking = std::thread::spawn(move || ask_at(&control, listen, &["--link-rate", "40mbit"]));
    // Kill the destination once the guest's pages are flowing.
    let log = tmp.path().join("c.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("migration hello")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "no migration began");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    dest.0.kill().unwrap();
    let (ok, text) = asking.join().unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("runs on here"), "{text}");
    stays_protected_here(&primary, &backup, &etcd);
}

#[test]
fn a_source_that_lost_the_vm_at_the_witness_during_pre_copy_is_fenced_and_the_guest_runs_nowhere_new(
) {
    let tmp = tempfile::tempdir().unwrap();
    let guest = [
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--workload",
        "pages,rate=1000,mib=48",
    ];
    let (etcd, _pair, backup, mut primary) = protected_pair_of(tmp.path(), &guest);
    let listen = pair::free_port(true).unwrap();
    let _dest = destination(tmp.path(), listen, pair::free_port(false).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let control = primary.control.clone();
    let asking = std::thread::spawn(move || ask_at(&control, listen, &["--link-rate", "40mbit"]));
    let log = tmp.path().join("c.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("migration hello")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "no migration began");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another node takes the VM at the witness while the pages flow.
    let w = etcd.client("castor").unwrap();
    let token = w.acquire("x", true).unwrap();
    let (ok, text) = asking.join().unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("fenced"), "{text}");
    // The source stops its guest; the destination never runs it.
    assert!(
        exited(&mut primary, Duration::from_secs(10)),
        "the fenced source kept running"
    );
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting for the next migration")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the destination did not give the migration up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dest_log = std::fs::read_to_string(&log).unwrap();
    assert!(!dest_log.contains("the guest runs here"), "{dest_log}");
    let owner = owner_now(&etcd);
    assert_eq!((owner.owner.as_str(), owner.token), ("x", token));
    assert_eq!(backup.status().unwrap().role, Role::Backup);
}
