//! Live migration on real KVM over loopback (`castor migrate` →
//! `castor migrate-listen`): the console continues on the destination
//! without a gap or a duplicate, the destination's memory matches the
//! source's digest at the switch, a guest moves back and forth without
//! corruption, a non-converging guest finishes by post-copy, and a
//! destination killed during pre-copy leaves the guest running at the source.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    certs: PathBuf,
}

fn env() -> Env {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = lab::pair::make_certs(&dir.join("pki"), ["node-a", "node-b"]).unwrap();
    Env {
        _tmp: tmp,
        dir,
        certs,
    }
}

/// A castor process, SIGKILLed if still running when dropped.
struct Proc {
    child: Child,
    out: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn line(&self, tag: &str) -> Option<String> {
        self.stdout()
            .lines()
            .find(|l| l.starts_with(tag))
            .map(|l| l[tag.len()..].trim().to_string())
    }
    fn wait_line(&self, tag: &str, secs: u64) -> Option<String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Some(l) = self.line(tag) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn spawn(e: &Env, name: &str, args: &[String]) -> Proc {
    let out = e.dir.join(format!("{name}.out"));
    let child = castor()
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(e.dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    Proc { child, out }
}

fn tls(e: &Env, node: &str, peer: &str) -> Vec<String> {
    vec![
        "--certs".into(),
        e.certs.display().to_string(),
        "--node".into(),
        node.into(),
        "--peer".into(),
        peer.into(),
    ]
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A destination listening at `listen`, serving the guest's console at
/// `console` once it arrives, then (with `to`) moving it on after `after`.
fn listener(
    e: &Env,
    name: &str,
    me: (&str, &str),
    listen: SocketAddr,
    console: SocketAddr,
    then: Option<(SocketAddr, &str)>,
    extra: &[&str],
) -> Proc {
    let mut a = args(&["migrate-listen"]);
    a.extend(tls(e, me.0, me.1));
    a.extend(args(&[
        "--listen",
        &listen.to_string(),
        "--console",
        &console.to_string(),
    ]));
    if let Some((to, after)) = then {
        a.extend(args(&["--to", &to.to_string(), "--after", after]));
    }
    a.extend(args(extra));
    spawn(e, name, &a)
}

/// A source booting `workload` and moving it to `to` after `after`.
fn source(
    e: &Env,
    workload: &str,
    mem: &str,
    to: SocketAddr,
    console: SocketAddr,
    after: &str,
    extra: &[&str],
) -> Proc {
    let mut a = args(&["migrate-run"]);
    a.extend(tls(e, "node-a", "node-b"));
    a.extend(args(&[
        "--workload",
        workload,
        "--mem",
        mem,
        "--vcpus",
        "1",
        "--to",
        &to.to_string(),
        "--after",
        after,
        "--console",
        &console.to_string(),
    ]));
    a.extend(args(extra));
    spawn(e, "source", &a)
}

fn port(udp: bool) -> SocketAddr {
    lab::pair::free_port(udp).unwrap()
}

/// Follows the console across `consoles` in order: each one until its
/// stream ends (the guest moved on), then the next from the same offset.
/// Returns the whole stream and, per hop, the arrival of its first bytes
/// and of the previous hop's last bytes.
fn follow_chain(consoles: &[SocketAddr], until: Instant) -> (Vec<u8>, Vec<Duration>) {
    let mut buf = Vec::new();
    let mut stalls = Vec::new();
    let mut last: Option<Instant> = None;
    for &c in consoles {
        let arrivals = loop {
            if Instant::now() > until {
                return (buf, stalls);
            }
            match lab::pair::follow_console(c, buf.len() as u64, &mut buf, until) {
                Ok(a) => break a,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        if let (Some(l), Some((_, first))) = (last, arrivals.first()) {
            stalls.push(first.saturating_duration_since(l));
        }
        if let Some((_, t)) = arrivals.last() {
            last = Some(*t);
        }
    }
    (buf, stalls)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn migrate_once(workload: &str) {
    let e = env();
    let (listen, c_src, c_dst) = (port(true), port(false), port(false));
    let dst = listener(
        &e,
        "dest",
        ("node-b", "node-a"),
        listen,
        c_dst,
        None,
        &["--duration", "2s"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let src = source(&e, workload, "128M", listen, c_src, "1500ms", &[]);
    let (stream, stalls) = follow_chain(&[c_src, c_dst], Instant::now() + Duration::from_secs(20));
    let rep = json(
        &src.wait_line("MIGRATED", 20)
            .expect("the source did not migrate"),
    );
    let arrived = json(
        &dst.wait_line("ARRIVED", 5)
            .expect("the destination got nothing"),
    );
    assert_eq!(rep["path"], "pre-copy", "{rep}");
    assert!(rep["digest"].is_string());
    assert_eq!(arrived["verified"], true, "{arrived}");
    let lines = progress(&stream);
    assert_gap_free(&lines, 1);
    let offset = rep["console_offset"].as_u64().unwrap();
    let after = progress(&stream[offset as usize..]);
    assert!(
        after.len() >= 10,
        "only {} lines from the destination",
        after.len()
    );
    assert!(
        lines.len() > after.len() + 5,
        "the source printed too little"
    );
    eprintln!(
        "{workload}: {} lines, stall seen by the console client {:?}, report {rep}",
        lines.len(),
        stalls
    );
}

#[test]
fn a_counter_migrates_with_its_console_gap_free_and_its_memory_verified() {
    migrate_once("counter");
}

#[test]
fn a_sparse_writer_migrates_with_its_console_gap_free_and_its_memory_verified() {
    migrate_once("sparse,rate=50000,mib=64,interval_ms=10");
}

#[test]
fn ten_moves_back_and_forth_of_a_verify_workload_corrupt_nothing() {
    let e = env();
    let ports = [port(true), port(true)];
    let consoles: Vec<SocketAddr> = (0..12).map(|_| port(false)).collect();
    let names = [("node-b", "node-a"), ("node-a", "node-b")];
    let moves = 10;
    // Listener i (1..=moves) runs on node i % 2, listens on ports[i % 2],
    // and moves the guest on to ports[(i + 1) % 2], except the last.
    let mut procs: Vec<Proc> = Vec::new();
    let start = |i: usize| -> Proc {
        let then = (i < moves).then_some((ports[(i + 1) % 2], "800ms"));
        let extra: &[&str] = if i == moves {
            &["--duration", "1500ms"]
        } else {
            &[]
        };
        listener(
            &e,
            &format!("hop{i}"),
            names[(i + 1) % 2],
            ports[i % 2],
            consoles[i],
            then,
            extra,
        )
    };
    procs.push(start(1));
    std::thread::sleep(Duration::from_millis(300));
    let src = source(
        &e,
        "verify,rate=3000,mib=16",
        "64M",
        ports[1],
        consoles[0],
        "800ms",
        &[],
    );
    let follower = {
        let cs = consoles[..=moves].to_vec();
        std::thread::spawn(move || follow_chain(&cs, Instant::now() + Duration::from_secs(50)))
    };
    let mut reports = vec![json(
        &src.wait_line("MIGRATED", 30)
            .expect("the source did not migrate"),
    )];
    for i in 1..=moves {
        // Hop i runs the guest; the next hop reuses the port of hop i - 1,
        // which has moved the guest on and exited.
        if i < moves {
            if i >= 2 {
                let prev = &mut procs[i - 2];
                let t0 = Instant::now();
                while prev.child.try_wait().unwrap().is_none() && t0.elapsed().as_secs() < 20 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            procs.push(start(i + 1));
            let m = procs[i - 1]
                .wait_line("MIGRATED", 30)
                .unwrap_or_else(|| panic!("hop {i} did not move the guest on"));
            reports.push(json(&m));
        }
    }
    let (stream, stalls) = follower.join().unwrap();
    let text = String::from_utf8_lossy(&stream);
    assert!(!text.contains("CORRUPT"), "corruption after the moves");
    let lines = progress(&stream);
    assert_gap_free(&lines, 1);
    assert_eq!(reports.len(), moves);
    // A move finishes by pre-copy (memory checked against the source's
    // digest before the switch) or, when the planner predicts no
    // convergence on a loaded host, by post-copy.
    for r in &reports {
        match r["path"].as_str() {
            Some("pre-copy") => assert!(r["digest"].is_string(), "{r}"),
            Some("post-copy") => {}
            _ => panic!("{r}"),
        }
    }
    assert_eq!(stalls.len(), moves, "the console reached every hop");
    eprintln!(
        "{} lines over {moves} moves; console stalls {:?}",
        lines.len(),
        stalls
    );
}

#[test]
fn a_guest_dirtying_faster_than_the_link_finishes_by_post_copy() {
    let e = env();
    let (listen, c_src, c_dst) = (port(true), port(false), port(false));
    let dst = listener(
        &e,
        "dest",
        ("node-b", "node-a"),
        listen,
        c_dst,
        None,
        &["--duration", "4s"],
    );
    std::thread::sleep(Duration::from_millis(300));
    // 20 k fresh pages/s (80 MB/s) over a 200 Mbit/s (25 MB/s) link.
    let src = source(
        &e,
        "pages,rate=20000,mib=32",
        "64M",
        listen,
        c_src,
        "1s",
        &["--link-rate", "200mbit"],
    );
    let (stream, _) = follow_chain(&[c_src, c_dst], Instant::now() + Duration::from_secs(40));
    let rep = json(
        &src.wait_line("MIGRATED", 40)
            .expect("the source did not migrate"),
    );
    assert_eq!(rep["path"], "post-copy", "{rep}");
    assert!(dst.wait_line("POSTCOPY_COMPLETE", 20).is_some());
    let pc = &rep["postcopy"];
    assert_eq!(
        pc["missing"].as_u64().unwrap(),
        pc["demand"].as_u64().unwrap() + pc["pushed"].as_u64().unwrap(),
        "{pc}"
    );
    let lines = progress(&stream);
    assert_gap_free(&lines, 1);
    let offset = rep["console_offset"].as_u64().unwrap() as usize;
    assert!(
        progress(&stream[offset..]).len() >= 3,
        "the guest made progress on the destination"
    );
}

#[test]
fn killing_the_destination_during_pre_copy_leaves_the_guest_running_at_the_source() {
    let e = env();
    let (listen, c_src, c_dst) = (port(true), port(false), port(false));
    let mut dst = listener(&e, "dest", ("node-b", "node-a"), listen, c_dst, None, &[]);
    std::thread::sleep(Duration::from_millis(300));
    // Round 1 of 64 MiB of fresh pages at 50 Mbit/s takes ~10 s.
    let src = source(
        &e,
        "pages,rate=1000,mib=48",
        "64M",
        listen,
        c_src,
        "500ms",
        &["--link-rate", "50mbit", "--duration", "30s"],
    );
    let log = e.dir.join("dest.err");
    assert!(
        wait_text(&log, "migration hello", 15),
        "the migration did not start"
    );
    std::thread::sleep(Duration::from_millis(700));
    dst.child.kill().unwrap();
    dst.child.wait().unwrap();
    let failed = src
        .wait_line("MIGRATION_FAILED", 25)
        .expect("the source did not notice");
    eprintln!("source: {failed}");
    // The guest still runs at the source: its console keeps growing.
    let mut buf = Vec::new();
    let _ = lab::pair::follow_console(c_src, 0, &mut buf, Instant::now() + Duration::from_secs(1));
    let n = progress(&buf).len();
    let mut more = Vec::new();
    let _ = lab::pair::follow_console(
        c_src,
        0,
        &mut more,
        Instant::now() + Duration::from_millis(1500),
    );
    assert!(
        progress(&more).len() > n,
        "the guest did not go on at the source"
    );
    assert_gap_free(&progress(&more), 1);
}

fn wait_text(path: &Path, text: &str, secs: u64) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn without_post_copy_a_non_converging_guest_is_stopped_anyway_and_verified() {
    let e = env();
    let (listen, c_src, c_dst) = (port(true), port(false), port(false));
    let dst = listener(
        &e,
        "dest",
        ("node-b", "node-a"),
        listen,
        c_dst,
        None,
        &["--duration", "2s"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let src = source(
        &e,
        "pages,rate=20000,mib=32",
        "64M",
        listen,
        c_src,
        "1s",
        &["--link-rate", "200mbit", "--no-postcopy"],
    );
    let (stream, _) = follow_chain(&[c_src, c_dst], Instant::now() + Duration::from_secs(40));
    let rep = json(
        &src.wait_line("MIGRATED", 40)
            .expect("the source did not migrate"),
    );
    assert!(
        rep["path"]
            .as_str()
            .unwrap()
            .starts_with("pre-copy (stopped anyway"),
        "{rep}"
    );
    // The stall to expect was said, and it is far above the limit.
    assert!(rep["predicted_ms"].as_f64().unwrap() > 50.0, "{rep}");
    let arrived = json(&dst.wait_line("ARRIVED", 5).expect("nothing arrived"));
    assert_eq!(arrived["verified"], true);
    assert_gap_free(&progress(&stream), 1);
}

#[test]
fn a_source_killed_during_pre_copy_leaves_the_destination_waiting_for_the_next() {
    let e = env();
    let (listen, c_src, c_dst) = (port(true), port(false), port(false));
    let dst = listener(
        &e,
        "dest",
        ("node-b", "node-a"),
        listen,
        c_dst,
        None,
        &["--duration", "2s"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut first = source(
        &e,
        "pages,rate=1000,mib=48",
        "64M",
        listen,
        c_src,
        "300ms",
        &["--link-rate", "50mbit"],
    );
    assert!(
        wait_text(&e.dir.join("dest.err"), "migration hello", 15),
        "the first migration did not start"
    );
    std::thread::sleep(Duration::from_millis(500));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed = Instant::now();
    drop(first);
    // The destination gives the broken migration up (the migration's QUIC
    // idle timeout, 3 s: one migration at a time) and takes the next one.
    assert!(
        wait_text(
            &e.dir.join("dest.err"),
            "waiting for the next migration",
            25
        ),
        "the destination did not give the broken migration up"
    );
    let gave_up = killed.elapsed();
    assert!(
        gave_up < Duration::from_secs(8),
        "the destination waited {gave_up:?} for a dead source"
    );
    eprintln!("the destination gave the dead source up after {gave_up:?}");
    let c2 = port(false);
    let second = source(&e, "counter", "64M", listen, c2, "300ms", &[]);
    let rep = json(
        &second
            .wait_line("MIGRATED", 40)
            .expect("the second migration did not happen"),
    );
    assert_eq!(rep["path"], "pre-copy");
    let arrived = json(&dst.wait_line("ARRIVED", 5).expect("nothing arrived"));
    assert_eq!(arrived["verified"], true);
}
