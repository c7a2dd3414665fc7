//! The network path of a protected guest, end to end: real daemons, real
//! KVM, real taps on a bridge, a client in a network namespace. Needs root.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{castor_bin, outcome, run};
use lab::netlab::NetLab;
use lab::pair::{self, wait_status, Pair};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

const MAGIC: u32 = 0x4B56_5331;

fn put(req: u64, key: u64, value: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    for v in [9u64, req, key, value] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The request id of a reply, if it is one.
fn reply_req(b: &[u8]) -> Option<u64> {
    (b.len() == 56 && b[..4] == MAGIC.to_le_bytes())
        .then(|| u64::from_le_bytes(b[24..32].try_into().unwrap()))
}

/// While the backup withholds its acks (stopped), no reply of the guest
/// reaches the network; once it acks, every held reply does, in order.
#[test]
fn the_guests_frames_leave_only_after_the_backup_has_their_epoch() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let lab = NetLab::unique(
        &format!("ct{}", pid % 100_000),
        (80, (pid % 200 + 20) as u8),
    )
    .up_scoped()
    .expect("a guest network (this test needs root)");
    let pair = Pair::in_dir(tmp.path(), ["a", "b"])
        .unwrap()
        .with_taps([lab.taps[0].clone(), lab.taps[1].clone()]);
    // Slow failure detectors on both sides: a stopped backup is not a lost one here.
    let ip = lab.guest_addr.to_string();
    let primary_args = strings(&[
        "--backup-timeout-ms",
        "8000",
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        &format!("net,ip={ip}"),
    ]);
    let backup = pair
        .start_backup(1, &strings(&["--heartbeat-timeout-ms", "8000"]), "b.log")
        .unwrap();
    let primary = pair.start_primary(0, &primary_args, "a.log").unwrap();
    wait_status(
        &primary,
        "protected",
        Duration::from_secs(60),
        pair::protected,
    )
    .unwrap();
    let target = lab.guest_service();
    let backup_pid = backup.child.id() as i32;
    let outcome = lab
        .in_client_ns(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            // The service answers (an epoch and an ack later).
            let t = Instant::now();
            let mut first = None;
            while first.is_none() && t.elapsed() < Duration::from_secs(10) {
                s.send_to(&put(1, 1, 1), target).unwrap();
                let mut b = [0u8; 128];
                if let Ok(n) = s.recv(&mut b) {
                    first = reply_req(&b[..n]);
                }
            }
            assert_eq!(first, Some(1), "the guest's service answers");
            std::thread::sleep(Duration::from_millis(100));
            while s.recv(&mut [0u8; 128]).is_ok() {}
            // Stop the backup: no acks from now on.
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(backup_pid).unwrap(),
                rustix::process::Signal::STOP,
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            for req in 10..30u64 {
                s.send_to(&put(req, req, req * 100), target).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut during = Vec::new();
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(700) {
                let mut b = [0u8; 128];
                if let Ok(n) = s.recv(&mut b) {
                    during.extend(reply_req(&b[..n]));
                }
            }
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(backup_pid).unwrap(),
                rustix::process::Signal::CONT,
            )
            .unwrap();
            let mut after = Vec::new();
            let t = Instant::now();
            while after.len() < 20 && t.elapsed() < Duration::from_secs(5) {
                let mut b = [0u8; 128];
                if let Ok(n) = s.recv(&mut b) {
                    after.extend(reply_req(&b[..n]));
                }
            }
            (during, after)
        })
        .unwrap();
    let (during, after) = outcome;
    assert!(
        during.is_empty(),
        "replies reached the network while the backup withheld its acks: {during:?}"
    );
    assert_eq!(
        after,
        (10..30).collect::<Vec<u64>>(),
        "after the ack every held reply arrives, in order"
    );
    let s = primary.status().unwrap();
    let net = s
        .primary
        .as_ref()
        .and_then(|p| p.net)
        .expect("network figures");
    assert!(
        net.frames >= 21 && net.held == 0 && net.dropped == 0,
        "{net:?}"
    );
    assert!(s.protected(), "still protected: {s:?}");
    drop(backup);
}

/// Failovers under client load: every acknowledged write survives, no reply
/// comes from state that was lost, and re-protection reuses the restarted
/// node's image.
#[test]
fn a_net_drill_loses_no_acknowledged_write_and_reprotects_by_reuse() {
    let (ok, out) = outcome(&run(&[
        "drill",
        "--rounds",
        "2",
        "--workload",
        "net",
        "--mem",
        "128M",
        "--reuse",
        "--verify",
    ]));
    assert!(ok, "{out}");
    assert!(out.contains("2 of 2 rounds passed"), "{out}");
    assert!(
        out.contains(" 0 violations (acknowledged writes lost"),
        "{out}"
    );
    assert!(
        out.contains("every acknowledged key read back after each failover: yes"),
        "{out}"
    );
    assert_eq!(out.matches("ms after the kill (").count(), 2, "{out}");
    assert_eq!(out.matches("(reuse: ").count(), 2, "{out}");
}
