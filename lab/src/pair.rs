//! `castor demo`: a local HA pair on loopback, a failover, and its report.
//!
//! Runs two castor processes (backup, then primary) with certificates made
//! in a temporary directory, attaches a console client to the primary,
//! SIGKILLs the primary, re-attaches the client to the survivor at the next
//! byte offset, and reports what happened. It also serves as the building
//! block of `castor drill` and of the end-to-end tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use clap::Args;

use guest::Workload;

use crate::cli::{parse_duration, parse_size, parse_workload};

/// `castor demo` settings.
#[derive(Args)]
pub struct DemoArgs {
    /// How long the pair runs before the primary is killed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub run_for: Duration,
    /// How long the survivor is watched after the failover.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub watch_for: Duration,
    /// Workload of the guest.
    #[arg(long, default_value = "counter", value_parser = parse_workload)]
    pub workload: Workload,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Encoding.
    #[arg(long, default_value = "fgbi")]
    pub mode: fgbi::Mode,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
}

/// `castor drill` settings.
#[derive(Args)]
pub struct DrillArgs {
    /// Number of failovers.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Workload of the guest.
    #[arg(long, default_value = "counter", value_parser = parse_workload)]
    pub workload: Workload,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Encoding.
    #[arg(long, default_value = "fgbi")]
    pub mode: fgbi::Mode,
    /// Send memory digests with every checkpoint and count mismatches.
    #[arg(long)]
    pub verify: bool,
}

/// Picks a free port on loopback (UDP or TCP).
/// A free loopback port.
pub fn free_port(udp: bool) -> Result<SocketAddr> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?
    })
}

/// A daemon child process that is killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its console service.
    pub console: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The castor binary: this one, or CASTOR_BIN (tests run from their own binary).
pub fn castor_exe() -> Result<PathBuf> {
    match std::env::var_os("CASTOR_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().context("locating the castor binary"),
    }
}

fn spawn(args: &[String], console: SocketAddr, log: PathBuf) -> Result<Daemon> {
    let child = Command::new(castor_exe()?)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting a castor daemon")?;
    Ok(Daemon {
        child,
        console,
        log,
    })
}

/// Settings of one daemon of the local pair.
pub struct Node<'a> {
    /// Certificates.
    pub certs: &'a Path,
    /// Its name.
    pub name: &'a str,
    /// Its peer's name.
    pub peer: &'a str,
}

/// Starts `castor ROLE` as node `n` with `role_args`, a fresh console port
/// and `extra` flags, logging to `log`.
fn start(
    role: &str,
    n: &Node<'_>,
    role_args: &[String],
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    let console = free_port(false)?;
    let mut a: Vec<String> = vec![role.into(), "--certs".into(), n.certs.display().to_string()];
    a.extend([
        "--node".into(),
        n.name.into(),
        "--peer".into(),
        n.peer.into(),
    ]);
    a.extend(["--console".into(), console.to_string()]);
    a.extend(role_args.iter().cloned());
    a.extend(extra.iter().cloned());
    spawn(&a, console, log)
}

/// Starts a backup listening on `listen` that, after failover, protects
/// toward `then_protect`.
pub fn start_backup(
    n: &Node<'_>,
    listen: SocketAddr,
    then_protect: SocketAddr,
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    let role = [
        "--listen".into(),
        listen.to_string(),
        "--then-protect".into(),
        then_protect.to_string(),
    ];
    start("backup", n, &role, extra, log)
}

/// Starts a primary sending to `backup`.
pub fn start_primary(
    n: &Node<'_>,
    backup: SocketAddr,
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    start(
        "primary",
        n,
        &["--backup".into(), backup.to_string()],
        extra,
        log,
    )
}

/// One line of JSON from a daemon, or None if it does not answer.
pub fn status(console: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&console, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"status\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.trim().to_string())
}

/// A number field of a status line.
pub fn field(status: &str, key: &str) -> Option<f64> {
    let i = status.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &status[i..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().trim_matches('"').parse().ok()
}

/// Waits until `pred` holds for the daemon's status.
pub fn wait_status(
    d: &Daemon,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<String> {
    let t = Instant::now();
    loop {
        if let Some(s) = status(d.console) {
            if pred(&s) {
                return Ok(s);
            }
        }
        if t.elapsed() > timeout {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "timed out after {timeout:?} waiting for {what}; last status {:?}; {} ends with:\n{}",
                status(d.console),
                d.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a console from `offset` into `buf` (which holds the stream up to
/// `offset`) until the connection ends or `until` passes; returns when the
/// stream first went past offset `mark`, if it did.
pub fn read_console(
    addr: SocketAddr,
    offset: u64,
    buf: &mut Vec<u8>,
    until: Instant,
    mark: u64,
) -> Result<Option<Instant>> {
    let mut s =
        TcpStream::connect(addr).with_context(|| format!("attaching to the console at {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(format!("{offset}\n").as_bytes())?;
    let mut first = None;
    let mut chunk = [0u8; 8192];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(first);
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(100))))?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(first),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() as u64 > mark {
                    first.get_or_insert_with(Instant::now);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(first),
        }
    }
}

/// Checks the guest's progress lines: every vCPU's seq goes up by exactly one.
/// Returns (lines, problems).
pub fn continuity(stream: &[u8]) -> (usize, Vec<String>) {
    let text = String::from_utf8_lossy(stream);
    let mut last: std::collections::HashMap<u32, u64> = Default::default();
    let mut problems = Vec::new();
    let mut n = 0;
    for line in text.lines() {
        let Some(p) = guest::Progress::parse(line) else {
            continue;
        };
        n += 1;
        if let Some(prev) = last.insert(p.cpu, p.seq) {
            if p.seq != prev + 1 {
                problems.push(format!("vCPU {}: seq {} follows {}", p.cpu, p.seq, prev));
            }
        }
    }
    (n, problems)
}

/// `castor demo`.
pub fn demo(a: DemoArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    protocol::certs::create(&dir.join("pki"), &["node-a".into(), "node-b".into()], false)?;
    let certs = dir.join("pki");
    let (port_a, port_b) = (free_port(true)?, free_port(true)?);
    let a_node = Node {
        certs: &certs,
        name: "node-a",
        peer: "node-b",
    };
    let b_node = Node {
        certs: &certs,
        name: "node-b",
        peer: "node-a",
    };
    println!(
        "castor demo: a local HA pair on loopback (certificates in {})",
        certs.display()
    );
    let _backup = start_backup(&b_node, port_b, port_a, &[], dir.join("backup.log"))?;
    let guest_args: Vec<String> = vec![
        "--mem".into(),
        format!("{}M", a.mem >> 20),
        "--vcpus".into(),
        a.vcpus.to_string(),
        "--workload".into(),
        a.workload.to_string(),
        "--mode".into(),
        a.mode.to_string(),
        "--epoch-ms".into(),
        a.epoch_ms.to_string(),
    ];
    let mut primary = start_primary(&a_node, port_b, &guest_args, dir.join("primary.log"))?;
    let mut backup = _backup;
    let t_start = Instant::now();
    println!("  primary (node-a) and backup (node-b) starting; waiting for protection ...");
    wait_status(
        &primary,
        "the primary to be protected",
        Duration::from_secs(60),
        |s| s.contains("\"protected\":true"),
    )?;
    println!(
        "  protected after {:.1} s; running for {:?}",
        t_start.elapsed().as_secs_f64(),
        a.run_for
    );

    let mut stream = Vec::new();
    let reader_until = Instant::now() + a.run_for;
    read_console(primary.console, 0, &mut stream, reader_until, u64::MAX)?;
    let before = status(primary.console).unwrap_or_default();

    let killed = Instant::now();
    primary.kill();
    // What the backup had committed when the primary died: bytes up to there
    // may be served at once; the failover ends with the first byte after it.
    let committed = status(backup.console)
        .and_then(|s| field(&s, "console_end"))
        .unwrap_or(0.0) as u64;
    let offset = stream.len() as u64;
    let watch_until = Instant::now() + a.watch_for;
    let first = read_console(backup.console, offset, &mut stream, watch_until, committed)?;
    let after = status(backup.console).unwrap_or_default();

    let (lines, problems) = continuity(&stream);
    let f = |k: &str| field(&before, k).unwrap_or(f64::NAN);
    println!();
    println!("castor demo report");
    println!(
        "  workload            {} on {} vCPU(s), {} MiB, mode {}, {} ms epochs",
        a.workload,
        a.vcpus,
        a.mem >> 20,
        a.mode,
        a.epoch_ms
    );
    println!("  epochs              {:.0}", f("epochs"));
    println!(
        "  pause               p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        f("pause_p50_us"),
        f("pause_p99_us"),
        f("pause_max_us")
    );
    println!(
        "  bytes per epoch     {:.0} sent vs {:.0} raw ({:.1}x fewer), {:.1} dirty pages",
        f("bytes_per_epoch"),
        f("raw_bytes_per_epoch"),
        f("raw_bytes_per_epoch") / f("bytes_per_epoch").max(1.0),
        f("dirty_pages_mean")
    );
    println!(
        "  ack latency         p50 {:.0} us, p99 {:.0} us",
        f("ack_p50_us"),
        f("ack_p99_us")
    );
    match first {
        Some(t) => println!(
            "  failover            {:.1} ms (SIGKILL of the primary -> first console byte the survivor produced)",
            (t - killed).as_secs_f64() * 1e3
        ),
        None => println!("  failover            NO console output from the survivor within {:?}", a.watch_for),
    }
    println!("  survivor            {after}");
    println!(
        "  console             {} bytes, {} progress lines, {} before the kill",
        stream.len(),
        lines,
        offset
    );
    if problems.is_empty() && first.is_some() {
        println!("  continuity          OK: no gap, no duplicate on any vCPU");
    } else {
        for p in problems.iter().take(10) {
            println!("  continuity          BROKEN: {p}");
        }
    }
    backup.kill();
    if std::env::var_os("CASTOR_DEMO_KEEP").is_some() {
        println!("  logs                {}", tmp.keep().display());
        return Ok(());
    }
    if !problems.is_empty() || first.is_none() {
        bail!(
            "the demo failed: see the logs in {} (kept)",
            tmp.keep().display()
        );
    }
    Ok(())
}

/// Percentile of a sample (nearest rank; NaN when empty).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One failover of a drill.
#[derive(Debug, Clone)]
pub struct Round {
    /// Round number, from 1.
    pub round: u32,
    /// The node whose primary was killed.
    pub killed: &'static str,
    /// How long after re-protection (and the settle time) it was killed.
    pub ran_for: Duration,
    /// Failover time: SIGKILL → first console byte the survivor produced.
    pub failover_ms: Option<f64>,
    /// Console gaps or duplicates seen so far.
    pub problems: Vec<String>,
    /// Replica mismatches the survivor reports (with --verify).
    pub mismatches: f64,
}

impl Round {
    /// Whether the round passed: output from the survivor, a continuous
    /// console and no mismatch.
    pub fn ok(&self) -> bool {
        self.failover_ms.is_some() && self.problems.is_empty() && self.mismatches == 0.0
    }
}

/// What a drill does.
#[derive(Debug, Clone)]
pub struct DrillPlan {
    /// Number of failovers.
    pub rounds: u32,
    /// Guest workload.
    pub workload: Workload,
    /// Guest RAM.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Flags for both daemons (mode, epoch, verify, link ...).
    pub protect_args: Vec<String>,
    /// Each kill happens this long after re-protection, plus a random 0.3-1.5 s.
    pub settle: Duration,
}

/// Runs a drill; `on_round` sees every round as it ends. Stops at the first
/// failed round and returns an error naming the kept logs.
pub fn run_drill(p: &DrillPlan, on_round: &mut dyn FnMut(&Round)) -> Result<Vec<Round>> {
    use rand::Rng;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let certs = dir.join("pki");
    protocol::certs::create(&certs, &["node-a".into(), "node-b".into()], false)?;
    let names = ["node-a", "node-b"];
    let ports = [free_port(true)?, free_port(true)?];
    let extra = &p.protect_args;
    let node = |i: usize| Node {
        certs: &certs,
        name: names[i],
        peer: names[1 - i],
    };
    // Node b backs up node a, and after a takeover protects toward node a's port.
    let mut backup = start_backup(&node(1), ports[1], ports[0], extra, dir.join("b-0.log"))?;
    let mut guest_args = vec![
        "--mem".to_string(),
        format!("{}M", p.mem >> 20),
        "--vcpus".into(),
        p.vcpus.to_string(),
        "--workload".into(),
        p.workload.to_string(),
    ];
    guest_args.extend(extra.iter().cloned());
    let mut primary = start_primary(&node(0), ports[1], &guest_args, dir.join("a-0.log"))?;
    let mut primary_idx = 0usize;
    let mut stream = Vec::new();
    let mut rounds = Vec::new();
    let mut rng = rand::rng();
    for round in 1..=p.rounds {
        let protected = wait_status(
            &primary,
            "the primary to be protected",
            Duration::from_secs(60),
            |s| s.contains("\"protected\":true") && field(s, "epochs").unwrap_or(0.0) >= 10.0,
        );
        if let Err(e) = protected {
            let _ = std::fs::write(dir.join("console.bin"), &stream);
            bail!("round {round}: {e}\nlogs kept in {}", tmp.keep().display());
        }
        let run_for = p.settle + Duration::from_millis(rng.random_range(300..1500));
        let offset = stream.len() as u64;
        read_console(
            primary.console,
            offset,
            &mut stream,
            Instant::now() + run_for,
            u64::MAX,
        )?;
        let killed = Instant::now();
        primary.kill();
        let committed = status(backup.console)
            .and_then(|s| field(&s, "console_end"))
            .unwrap_or(0.0) as u64;
        let offset = stream.len() as u64;
        let first = read_console(
            backup.console,
            offset,
            &mut stream,
            Instant::now() + Duration::from_millis(700),
            committed,
        )?;
        let (_, problems) = continuity(&stream);
        let survivor = status(backup.console).unwrap_or_default();
        let r = Round {
            round,
            killed: names[primary_idx],
            ran_for: run_for,
            failover_ms: first.map(|t| (t - killed).as_secs_f64() * 1e3),
            problems,
            mismatches: field(&survivor, "verify_mismatches").unwrap_or(0.0),
        };
        on_round(&r);
        let ok = r.ok();
        rounds.push(r);
        if !ok {
            drop(primary);
            drop(backup);
            let _ = std::fs::write(dir.join("console.bin"), &stream);
            bail!(
                "drill round {round} failed: logs and the console stream (console.bin) kept in {}",
                tmp.keep().display()
            );
        }
        // The survivor is the primary now; a new backup starts where the dead primary was.
        let dead = primary_idx;
        primary_idx = 1 - primary_idx;
        let new_backup = start_backup(
            &node(dead),
            ports[dead],
            ports[1 - dead],
            extra,
            dir.join(format!("{}-{round}.log", &names[dead][5..])),
        )?;
        primary = std::mem::replace(&mut backup, new_backup);
    }
    if std::env::var_os("CASTOR_KEEP_LOGS").is_some() {
        println!("drill logs kept in {}", tmp.keep().display());
    }
    Ok(rounds)
}

/// `castor drill`.
pub fn drill(a: DrillArgs) -> Result<()> {
    let mut extra: Vec<String> = vec!["--mode".into(), a.mode.to_string()];
    if a.verify {
        extra.push("--verify".into());
    }
    println!(
        "castor drill: {} rounds, {} on {} vCPU(s), mode {}{}",
        a.rounds,
        a.workload,
        a.vcpus,
        a.mode,
        if a.verify { ", verifying" } else { "" }
    );
    let plan = DrillPlan {
        rounds: a.rounds,
        workload: a.workload.clone(),
        mem: a.mem,
        vcpus: a.vcpus,
        protect_args: extra,
        settle: Duration::ZERO,
    };
    let mut seen = Vec::new();
    let result = run_drill(&plan, &mut |r| {
        match r.failover_ms {
            Some(ms) => println!(
                "  round {:>3}: primary {} killed after {:>4} ms, failover {ms:6.1} ms, {}",
                r.round,
                r.killed,
                r.ran_for.as_millis(),
                if r.ok() {
                    "console continuous"
                } else {
                    "CONSOLE BROKEN"
                }
            ),
            None => println!(
                "  round {:>3}: primary {} killed, NO OUTPUT from the survivor",
                r.round, r.killed
            ),
        }
        for p in r.problems.iter().take(5) {
            println!("             {p}");
        }
        if r.mismatches > 0.0 {
            println!("             VERIFY: {} replica mismatches", r.mismatches);
        }
        if r.ok() {
            seen.extend(r.failover_ms);
        }
    });
    let mut f = seen.clone();
    println!();
    println!(
        "castor drill: {} of {} rounds passed; failover p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        seen.len(),
        a.rounds,
        pct(&mut f, 0.5),
        pct(&mut f, 0.99),
        seen.iter().cloned().fold(0.0, f64::max),
    );
    result.map(|_| ())
}
