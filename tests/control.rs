//! The control plane on real daemons: control requests only from the
//! daemon's own user, and a console port that idle connections cannot use
//! to stop a failover.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::castor_bin;
use lab::pair::{self, read_console, wait_status, Pair};

fn pair_in(dir: &Path) -> Pair {
    castor_bin();
    Pair::in_dir(dir, ["a", "b"]).unwrap()
}

/// `castor status --control PATH` run as the unprivileged user `nobody`.
fn status_as_nobody(control: &Path) -> (bool, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(castor_bin())
        .args(["status", "--control"])
        .arg(control)
        .output()
        .expect("setpriv (util-linux) runs castor as nobody");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// GET /metrics from `addr`: the whole HTTP response.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_control_request_from_another_user_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_in(tmp.path());
    let backup = pair.start_backup(1, &[], "b.log").unwrap();
    wait_status(&backup, "the backup", Duration::from_secs(20), |_| true).unwrap();
    let sock = backup.control.clone();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");

    // Another user can reach the directory but not the socket.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out) = status_as_nobody(&sock);
    assert!(!ok && out.contains("Permission denied"), "{out}");

    // Even with the socket's mode widened by hand, the daemon checks who
    // asks and refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, out) = status_as_nobody(&sock);
    assert!(
        !ok && out.contains("refused: control is for the daemon's own user"),
        "{out}"
    );
    let log = std::fs::read_to_string(&backup.log).unwrap();
    assert!(
        log.contains("control request from another user refused"),
        "{log}"
    );

    // The owner is answered, and the backup did not take over.
    let s = backup.status().expect("the owner gets the status");
    assert_eq!(s.role, node::Role::Backup);
}

#[test]
fn idle_console_connections_do_not_stop_a_failover() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_in(tmp.path());
    let metrics = pair::free_port(false).unwrap();
    let guest = ["--mem", "128M", "--workload", "counter"]
        .into_iter()
        .map(String::from)
        .chain(["--metrics".into(), metrics.to_string()])
        .collect::<Vec<_>>();
    let (backup, mut primary) = pair.start(&[], &guest, ["b.log", "a.log"]).unwrap();
    wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        pair::protected_after(10),
    )
    .unwrap();

    // The primary's Prometheus endpoint agrees with its status.
    let text = scrape(metrics);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for want in [
        "castor_role{role=\"primary\"} 1",
        "castor_protected 1",
        "castor_pause_seconds_bucket",
        "castor_ack_seconds_count",
        "# EOF",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let epochs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("castor_epochs_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("castor_epochs_total");
    assert!(epochs >= 10, "{epochs} epochs counted");

    // 2,000 connections that never send an offset: 1,000 to each node.
    let mut idle = Vec::new();
    for d in [&primary, &backup] {
        for _ in 0..1000 {
            if let Ok(s) = TcpStream::connect_timeout(&d.console, Duration::from_secs(1)) {
                idle.push(s);
            }
        }
    }
    assert!(idle.len() >= 1900, "{} idle connections made", idle.len());

    let killed = Instant::now();
    primary.kill();
    // The backup takes over at once; its control socket answers throughout.
    let s = wait_status(&backup, "the takeover", Duration::from_secs(5), |s| {
        s.role.runs_guest()
    })
    .unwrap();
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the takeover took {took:?} with 2,000 idle console connections"
    );
    let resumed = s.resumed_at.expect("a survivor says where it resumed");

    // Console clients get through once the idle connections time out (the
    // console gives each 2 s to send its offset).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = Vec::new();
    loop {
        stream.clear();
        // From where the survivor resumed: its own history.
        let first = read_console(
            backup.console,
            resumed,
            &mut stream,
            Instant::now() + Duration::from_millis(500),
            0,
        )
        .unwrap();
        if first.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no console client got the survivor's output within 10 s of the failover"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let c = lab::console::continuity(&stream);
    assert!(c.ok() && c.lines > 5, "{} lines, {:?}", c.lines, c.problems);
    drop(idle);
}
