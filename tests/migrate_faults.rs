//! Faults in the middle of `castor migrate` (issue "Proof under faults",
//! item 3): the source primary or the destination frozen by SIGSTOP during
//! pre-copy, briefly (less than the migration link's idle timeout, 3 s) or
//! for longer, and the source frozen right at the handover (after the
//! witness named the destination, before `Go`). Real daemons, real KVM, a
//! real etcd as the witness.
//!
//! What an HA user expects whatever happened: exactly one node runs the
//! guest at the end and the witness names it; the console is one history;
//! a migration that did not finish leaves the guest protected again by its
//! backup with the owner unchanged; one that finished leaves the source
//! gone; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{castor_bin, exited, follow_from_start, strings};
use lab::console::continuity;
use lab::pair::{self, read_console, wait_status, Daemon, Pair};
use node::Role;
use witness::server::EtcdServer;

/// 48 MiB of fresh pages over a 40 Mbit/s link: pre-copy lasts seconds.
const BUSY_GUEST: &[&str] = &[
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--workload",
    "pages,rate=1000,mib=48",
];

/// A guest that migrates in well under a second.
const SMALL_GUEST: &[&str] = &[
    "--mem",
    "128M",
    "--vcpus",
    "1",
    "--workload",
    "counter,interval_ms=2",
];

/// Longer than the migration link's idle timeout (3 s).
const LONG_STOP: Duration = Duration::from_secs(5);
/// Shorter than it.
const SHORT_STOP: Duration = Duration::from_secs(2);

/// The environment variable that stops a primary right after the handover
/// (primary/src/migration.rs).
const FAULT_STOP_AFTER_HANDOVER: &str = "CASTOR_FAULT_STOP_AFTER_HANDOVER";

/// The environment variable that stops a destination right after it
/// answered `Verified` (migrate/src/dest.rs), if its value is the node's
/// certificate directory.
const FAULT_STOP_AFTER_VERIFIED: &str = "CASTOR_FAULT_STOP_AFTER_VERIFIED";

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    etcd: EtcdServer,
    _pair: Pair,
    backup: Daemon,
    primary: Daemon,
    token_before: witness::Owner,
}

/// Nodes a (primary) and b (backup) protected, etcd as the witness, and
/// certificates for c too. `fault`: the primary stops itself right after
/// a handover ([`FAULT_STOP_AFTER_HANDOVER`], set to this test's
/// certificate directory, which other tests' daemons do not have).
fn protected_pair(guest: &[&str], fault: bool) -> Setup {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let etcd = EtcdServer::start(&dir.join("etcd")).expect("etcd starts");
    let names = ["a", "b", "c", "d"].map(String::from);
    transport::certs::create(&dir.join("pki"), &names, false).unwrap();
    let pair = Pair::new(&dir.join("pki"), ["a", "b"], &dir)
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let (backup, primary) = {
        // The daemons inherit this process's environment: a test's fault
        // is set and its daemons started under one lock, so that tests
        // running at the same time do not overwrite each other's.
        static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        if fault {
            std::env::set_var(FAULT_STOP_AFTER_HANDOVER, dir.join("pki"));
        }
        pair.start(&[], &strings(guest), ["b.log", "a.log"])
            .unwrap()
    };
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected_after(20),
    )
    .unwrap();
    let token_before = owner_now(&etcd);
    assert_eq!(token_before.owner, "a");
    Setup {
        _tmp: tmp,
        dir,
        etcd,
        _pair: pair,
        backup,
        primary,
        token_before,
    }
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
fn destination(dir: &Path, listen: SocketAddr, console: SocketAddr) -> Proc {
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
        .args(["--console", &console.to_string(), "--duration", "120s"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    lab::pair::signal_pid(pid, sig).unwrap();
}

/// `castor migrate` asking a's control socket to move its guest to c at
/// `to`, on a thread: its answer within `within`, or a failure (a hang).
fn ask_bounded(
    control: &Path,
    to: SocketAddr,
    extra: &[&str],
) -> mpsc::Receiver<(bool, String, Duration)> {
    let (tx, rx) = mpsc::channel();
    let control = control.to_path_buf();
    let extra: Vec<String> = strings(extra);
    std::thread::spawn(move || {
        let t = Instant::now();
        let o = Command::new(castor_bin())
            .args(["migrate", "--control"])
            .arg(&control)
            .args(["--to", &to.to_string(), "--dest", "c"])
            .args(&extra)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = tx.send((o.status.success(), text, t.elapsed()));
    });
    rx
}

/// Waits until `log` has `what` (at most `secs`).
fn wait_log(log: &Path, what: &str, secs: u64) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(what)
    {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{} never logged {what:?}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination runs the guest (its log says so).
fn dest_runs_guest(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("c.log"))
        .unwrap_or_default()
        .contains("the guest runs here")
}

/// The end state after a migration that may or may not have finished,
/// checked as an HA user would: exactly one runner, named by the witness,
/// one console history.
fn one_runner(
    s: &mut Setup,
    answer: (bool, String, Duration),
    follower: std::thread::JoinHandle<Vec<u8>>,
    c_console: SocketAddr,
) -> bool {
    let (ok, text, took) = answer;
    eprintln!("castor migrate answered after {took:?}: ok={ok} {text}");
    if ok {
        assert!(text.contains("MIGRATED"), "{text}");
        assert!(
            exited(&mut s.primary, Duration::from_secs(10)),
            "the source kept running after the move"
        );
        assert!(dest_runs_guest(&s.dir), "MIGRATED, but c does not run it");
        let owner = owner_now(&s.etcd);
        assert_eq!(owner.owner, "c", "{owner:?}");
        assert!(owner.token > s.token_before.token);
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            s.backup.status().expect("the backup answers").role,
            Role::Backup,
            "the stood-down backup took over"
        );
        let mut stream = follower.join().unwrap();
        let offset = stream.len() as u64;
        let _ = read_console(
            c_console,
            offset,
            &mut stream,
            Instant::now() + Duration::from_millis(1500),
            u64::MAX,
        );
        assert!(stream.len() as u64 > offset, "c's console is silent");
        let c = continuity(&stream);
        assert!(c.ok(), "{:?}", c.problems);
    } else {
        assert!(text.contains("runs on here"), "{text}");
        // Protected again by the same backup, a still the owner (with the
        // tokens of carrying on alone and of any handover taken back), c
        // never ran the guest.
        wait_status(
            &s.primary,
            "re-protection",
            Duration::from_secs(30),
            pair::protected_after(10),
        )
        .unwrap();
        assert_eq!(s.backup.status().unwrap().role, Role::Backup);
        let owner = owner_now(&s.etcd);
        assert_eq!(owner.owner, "a", "{owner:?}");
        assert!(
            !dest_runs_guest(&s.dir),
            "c runs the guest too; c.log:\n{}",
            std::fs::read_to_string(s.dir.join("c.log")).unwrap_or_default()
        );
        drop(follower);
        let mut stream = Vec::new();
        let _ = read_console(
            s.primary.console,
            0,
            &mut stream,
            Instant::now() + Duration::from_millis(500),
            u64::MAX,
        );
        let c = continuity(&stream);
        assert!(c.ok(), "{:?}", c.problems);
        assert!(c.lines > 10, "{} progress lines", c.lines);
        // Protection works as before: the backup's claim expects a's token.
        // (Its own checkpoints go on: 10 more epochs acked.)
        let e = s.primary.status().unwrap().figures().epochs;
        wait_status(
            &s.primary,
            "more protected epochs",
            Duration::from_secs(10),
            pair::protected_after(e + 10),
        )
        .unwrap();
    }
    ok
}

/// Freezes `who` (the source a or the destination c) for `stop` once the
/// pages flow, then checks the end state.
fn freeze_during_precopy(source: bool, stop: Duration) -> bool {
    let mut s = protected_pair(BUSY_GUEST, false);
    let listen = pair::free_port(true).unwrap();
    let c_console = pair::free_port(false).unwrap();
    let dest = destination(&s.dir, listen, c_console);
    std::thread::sleep(Duration::from_millis(300));
    let follower = follow_from_start(s.primary.console, Duration::from_secs(90));
    let answer = ask_bounded(&s.primary.control, listen, &["--link-rate", "40mbit"]);
    wait_log(&s.dir.join("c.log"), "migration hello", 20);
    std::thread::sleep(Duration::from_millis(500));
    let pid = if source {
        s.primary.child.id()
    } else {
        dest.0.id()
    };
    signal(pid, rustix::process::Signal::STOP);
    std::thread::sleep(stop);
    signal(pid, rustix::process::Signal::CONT);
    let answer = answer
        .recv_timeout(Duration::from_secs(90))
        .expect("castor migrate hung (no answer within 90 s)");
    let moved = one_runner(&mut s, answer, follower, c_console);
    if !moved {
        // The destination gave the migration up and waits for the next.
        wait_log(&s.dir.join("c.log"), "waiting for the next migration", 15);
    }
    moved
}

#[test]
fn the_source_frozen_briefly_during_pre_copy_leaves_one_runner() {
    let moved = freeze_during_precopy(true, SHORT_STOP);
    eprintln!("moved: {moved}");
}

#[test]
fn the_source_frozen_past_the_link_timeout_during_pre_copy_keeps_its_guest_protected() {
    // The destination gives the silent source up after 3 s: the migration
    // cannot finish, the guest must stay here.
    assert!(!freeze_during_precopy(true, LONG_STOP));
}

#[test]
fn the_destination_frozen_briefly_during_pre_copy_leaves_one_runner() {
    let moved = freeze_during_precopy(false, SHORT_STOP);
    eprintln!("moved: {moved}");
}

#[test]
fn the_destination_frozen_past_the_link_timeout_during_pre_copy_keeps_the_guest_here() {
    assert!(!freeze_during_precopy(false, LONG_STOP));
}

/// Stops the source at the handover (it stops itself right after the
/// witness named c, before `Go`) for `stop`, then lets it go on.
fn freeze_at_handover(stop: Duration) -> (Setup, bool) {
    let mut s = protected_pair(SMALL_GUEST, true);
    let listen = pair::free_port(true).unwrap();
    let c_console = pair::free_port(false).unwrap();
    let dest = destination(&s.dir, listen, c_console);
    std::thread::sleep(Duration::from_millis(300));
    let follower = follow_from_start(s.primary.console, Duration::from_secs(90));
    let answer = ask_bounded(&s.primary.control, listen, &[]);
    let t = Instant::now();
    while owner_now(&s.etcd).owner != "c" {
        assert!(t.elapsed() < Duration::from_secs(30), "no handover");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    while !std::fs::read_to_string(&s.primary.log)
        .unwrap_or_default()
        .contains("fault injection")
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the fault did not fire"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(stop);
    // Meanwhile c never ran the guest: no Go yet.
    assert!(!dest_runs_guest(&s.dir));
    signal(s.primary.child.id(), rustix::process::Signal::CONT);
    let answer = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("castor migrate hung (no answer within 60 s)");
    let moved = one_runner(&mut s, answer, follower, c_console);
    drop(dest);
    (s, moved)
}

#[test]
fn the_source_frozen_at_the_handover_takes_the_vm_back_and_nothing_is_lost() {
    // Stopped past the destination's link timeout: c gave the migration up
    // while the witness names it. Before the fix the source sent Go into
    // the dead link and stopped its guest: the VM ran nowhere.
    let (s, moved) = freeze_at_handover(LONG_STOP);
    assert!(!moved, "c ran a guest it never got Go for");
    let log = std::fs::read_to_string(&s.primary.log).unwrap();
    assert!(log.contains("no Go"), "{log}");
}

#[test]
fn the_source_frozen_briefly_at_the_handover_moves_the_guest() {
    // A second: the destination still waits; Go goes, the guest moves.
    let (_s, moved) = freeze_at_handover(Duration::from_secs(1));
    assert!(moved, "a brief freeze at the handover called the move off");
}

/// c — a primary whose guest arrives by migration, with the witness, so
/// that it claims the VM there before it runs the guest — stops itself
/// right after `Verified`; a hands the VM over at the witness and sends
/// `Go` into c's frozen socket; c stays stopped past the link timeout. a
/// never hears `Finished`: it takes the VM back at the witness (a claim
/// from the handover's token, the one c must win before it runs the
/// guest), and the guest runs on there, protected again; c, thawed, finds
/// its link gone or its own claim lost, and never runs it. Before the fix
/// a counted the lost confirmation as a move and stopped its guest, while
/// c's connection had timed out before it read `Go`: the witness named c
/// and the guest ran nowhere.
#[test]
fn the_destination_frozen_at_the_handover_leaves_the_guest_on_the_source() {
    let mut s = protected_pair(SMALL_GUEST, false);
    // d, c's backup, is never started: c would run the guest unprotected.
    let pair2 = Pair::new(&s.dir.join("pki"), ["c", "d"], &s.dir)
        .unwrap()
        .with_etcd(&s.etcd.endpoint());
    let listen = pair::free_port(true).unwrap();
    let incoming = strings(&["--incoming", &listen.to_string(), "--incoming-from", "a"]);
    // Only a node with this test's certificate directory takes the fault.
    std::env::set_var(FAULT_STOP_AFTER_VERIFIED, s.dir.join("pki"));
    let c = pair2.start_primary(0, &incoming, "c.log").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let follower = follow_from_start(s.primary.console, Duration::from_secs(90));
    let answer = ask_bounded(&s.primary.control, listen, &[]);
    wait_log(&s.dir.join("c.log"), "fault injection", 30);
    std::thread::sleep(LONG_STOP);
    c.signal(rustix::process::Signal::CONT).unwrap();
    let answer = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("castor migrate hung (no answer within 60 s)");
    // c, thawed, has had time to read whatever reached it.
    std::thread::sleep(Duration::from_secs(2));
    let moved = one_runner(&mut s, answer, follower, c.console);
    assert!(!moved, "c ran the guest though a never heard Finished");
    let log = std::fs::read_to_string(&s.primary.log).unwrap();
    assert!(log.contains("had not claimed"), "{log}");
}
