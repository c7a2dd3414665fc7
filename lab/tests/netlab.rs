//! `castor net up` / `down` for real (needs root; skipped otherwise): the
//! devices and the namespace exist after `up` and are gone after `down`,
//! `up` completes a half-removed setup, a datagram from inside the client
//! namespace reaches a socket on the bridge's address, and the load
//! generator runs from inside the namespace.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use castor_lab::loadgen::{Config, Loadgen};
use castor_lab::netlab::{link_exists, netns_exists, NetLab};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Names and a subnet of this test process's own.
fn unique_lab(tag: u32) -> NetLab {
    let pid = std::process::id();
    let n = pid % 100_000;
    NetLab::unique(
        &format!("c{tag}{n}"),
        (
            70 + 40 * tag as u8 + ((pid / 250) % 40) as u8,
            (pid % 250) as u8,
        ),
    )
}

fn ip_out(args: &[&str]) -> (bool, String) {
    let o = Command::new("ip").args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Removes the lab even if the test fails.
struct Cleanup(NetLab);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

#[test]
fn net_up_and_down() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = unique_lab(1);
    let _cleanup = Cleanup(lab.clone());
    lab.up().unwrap();
    assert!(lab.exists());
    for dev in [&lab.bridge, &lab.bridge_port, &lab.taps[0], &lab.taps[1]] {
        let (ok, out) = ip_out(&["-d", "link", "show", "dev", dev]);
        assert!(ok, "{dev} missing");
        if dev != &lab.bridge {
            assert!(out.contains(&format!("master {}", lab.bridge)), "{out}");
        }
    }
    let (_, out) = ip_out(&["-d", "link", "show", "dev", &lab.taps[0]]);
    assert!(out.contains("tun type tap"), "{out}");
    let (_, out) = ip_out(&["addr", "show", "dev", &lab.bridge]);
    assert!(out.contains(&format!("{}/24", lab.bridge_addr)), "{out}");
    let (_, out) = ip_out(&["netns", "list"]);
    assert!(out
        .lines()
        .any(|l| l.split_whitespace().next() == Some(lab.netns.as_str())));
    let (ok, out) = ip_out(&["-n", &lab.netns, "addr", "show", "dev", &lab.client_if]);
    assert!(
        ok && out.contains(&format!("{}/24", lab.client_addr)),
        "{out}"
    );

    let v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", lab.bridge);
    if let Ok(v) = std::fs::read_to_string(&v6) {
        assert_eq!(v.trim(), "1", "IPv6 left on {}", lab.bridge);
    }
    // Idempotent, and completes a half-removed setup.
    lab.up().unwrap();
    Command::new("ip")
        .args(["netns", "del", &lab.netns])
        .status()
        .unwrap();
    Command::new("ip")
        .args(["link", "del", "dev", &lab.taps[1]])
        .status()
        .unwrap();
    assert!(!lab.exists());
    lab.up().unwrap();
    assert!(lab.exists());

    // A datagram from the client namespace reaches the bridge's address,
    // and the answer gets back.
    let host = UdpSocket::bind(SocketAddr::from((lab.bridge_addr, 0))).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let host_addr = host.local_addr().unwrap();
    let answer = std::thread::scope(|s| {
        let t = s.spawn(|| {
            lab.in_client_ns(|| {
                let c = UdpSocket::bind("0.0.0.0:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.send_to(b"hello from the client", host_addr).unwrap();
                let mut b = [0u8; 64];
                let (n, _) = c.recv_from(&mut b).unwrap();
                b[..n].to_vec()
            })
            .unwrap()
        });
        let mut b = [0u8; 64];
        let (n, from) = host.recv_from(&mut b).expect("datagram from the namespace");
        assert_eq!(&b[..n], b"hello from the client");
        assert_eq!(from.ip(), lab.client_addr);
        host.send_to(b"hello back", from).unwrap();
        t.join().unwrap()
    });
    assert_eq!(answer, b"hello back");

    lab.down().unwrap();
    assert!(!netns_exists(&lab.netns));
    for dev in [&lab.bridge, &lab.bridge_port, &lab.taps[0], &lab.taps[1]] {
        assert!(!link_exists(dev), "{dev} still there");
        assert!(!ip_out(&["link", "show", "dev", dev]).0);
    }
    let (_, out) = ip_out(&["netns", "list"]);
    assert!(!out.contains(&lab.netns), "{out}");
    // Down again: nothing to do, no error.
    lab.down().unwrap();
}

#[test]
fn loadgen_runs_inside_the_client_namespace() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = unique_lab(2).up_scoped().unwrap();
    // The "guest" here is a test server on the bridge's address.
    let server = common::Server::start(
        SocketAddr::from((lab.bridge_addr, 0)),
        common::State::default(),
    );
    let lg = Loadgen::start(Config {
        target: server.addr,
        netns: Some(lab.netns.clone()),
        rate: 500.0,
        keys: 100,
        ..Config::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let r = lg.stop();
    let text = r.summary();
    eprintln!("{text}");
    assert!(r.ok(), "{text}");
    assert!(r.counts.acked > 100, "{text}");
    assert_eq!(r.wrong_source, 0, "{text}");
    drop(server);
    let names = (lab.bridge.clone(), lab.netns.clone());
    drop(lab);
    assert!(!link_exists(&names.0) && !netns_exists(&names.1));
}
