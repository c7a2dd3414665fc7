//! `castor bench --migration`: live migration measured as an observer sees
//! it. Each point is fresh processes: `castor migrate-listen` and `castor
//! migrate` on loopback through the emulated link (the bench's
//! `--link-rate`, 1 Gbit/s by default), a console client following the
//! guest across the move. Per workload and encoding: total time, the stall
//! the console client saw (last bytes from the source → first bytes from
//! the destination), the guest's own gap (its clock across the switch),
//! bytes, rounds, and the path that finished it (pre-copy / post-copy).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::BenchArgs;
use crate::pair::{castor_exe, follow_console, free_port, make_certs};

/// The workloads of the migration section: (label, spec). Every one prints
/// a progress line each 10 ms, so the console shows stalls to ~10 ms.
pub const MIGRATION_LOADS: [(&str, &str); 5] = [
    ("idle", "counter,interval_ms=10"),
    ("sparse-50k", "sparse,rate=50000,mib=192,interval_ms=10"),
    ("sparse-max", "sparse,rate=0,mib=192,interval_ms=10"),
    ("pages-1k", "pages,rate=1000,mib=192,interval_ms=10"),
    // 50 k fresh pages/s is 205 MB/s: more than a 1 Gbit/s link carries.
    ("pages-50k", "pages,rate=50000,mib=192,interval_ms=10"),
];

/// One migration measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationPoint {
    /// Workload label.
    pub workload: String,
    /// Encoding.
    pub mode: String,
    /// pre-copy / post-copy / … (or `failed`).
    pub path: String,
    /// From the source's connection to the end (post-copy: the last page), ms.
    pub total_ms: f64,
    /// Last console bytes from the source → first from the destination, as
    /// a console client saw them, ms.
    pub stall_client_ms: Option<f64>,
    /// The guest's clock across the switch minus one line interval, ms.
    pub stall_guest_ms: Option<f64>,
    /// The source's pause → the destination runs (its report), ms.
    pub pause_ms: f64,
    /// The planner's predicted stall for its choice, ms.
    pub predicted_ms: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Pre-copy rounds.
    pub rounds: usize,
    /// Post-copy: pages fetched on demand.
    pub demand: Option<u64>,
    /// The console stayed gap- and duplicate-free.
    pub continuous: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

fn rate_arg(a: &BenchArgs) -> String {
    match a.link_rate.0 {
        Some(r) => format!("{}kbit", r * 8 / 1000),
        None => "none".into(),
    }
}

/// Runs the migration section into `a.out` (migration.md, migration.json).
pub fn run(a: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(a.out.join("logs"))?;
    let tmp = tempfile::tempdir()?;
    let certs = make_certs(&tmp.path().join("pki"), ["node-a", "node-b"])?;
    let loads: Vec<(&str, &str)> = if a.workloads.is_empty() {
        MIGRATION_LOADS.to_vec()
    } else {
        MIGRATION_LOADS
            .iter()
            .copied()
            .filter(|(l, _)| a.workloads.iter().any(|w| w == l))
            .collect()
    };
    println!(
        "castor bench --migration: {} workloads x {:?}, {} MiB, link {}",
        loads.len(),
        a.modes,
        a.mem >> 20,
        rate_arg(a)
    );
    let mut points = Vec::new();
    for (label, spec) in &loads {
        for mode in &a.modes {
            let p = point(a, &certs, label, spec, *mode).unwrap_or_else(|e| MigrationPoint {
                workload: label.to_string(),
                mode: mode.to_string(),
                path: "failed".into(),
                total_ms: 0.0,
                stall_client_ms: None,
                stall_guest_ms: None,
                pause_ms: 0.0,
                predicted_ms: 0.0,
                bytes: 0,
                rounds: 0,
                demand: None,
                continuous: false,
                error: Some(format!("{e:#}")),
            });
            println!("{}", row(&p));
            points.push(p);
        }
    }
    let md = table(a, &points, t0.elapsed());
    std::fs::write(a.out.join("migration.md"), &md)?;
    std::fs::write(
        a.out.join("migration.json"),
        serde_json::to_string_pretty(&points)?,
    )?;
    println!("\n{md}");
    Ok(())
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

fn row(p: &MigrationPoint) -> String {
    format!(
        "| {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |{}",
        p.workload,
        p.mode,
        p.path,
        p.total_ms,
        ms(p.stall_client_ms),
        ms(p.stall_guest_ms),
        p.pause_ms,
        p.predicted_ms,
        p.bytes as f64 / 1e6,
        p.rounds,
        p.demand
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into()),
        if p.continuous { "yes" } else { "NO" },
        p.error
            .as_deref()
            .map(|e| format!(" {e}"))
            .unwrap_or_default()
    )
}

fn table(a: &BenchArgs, points: &[MigrationPoint], wall: Duration) -> String {
    let mut s = format!(
        "# castor bench --migration\n\n{} MiB guest, 1 vCPU, link {} (castor's link emulation), --max-downtime 50ms; {} points in {:.0} s.\n\
         Stall (client): last console bytes from the source → first from the destination, as a console client saw them \
         (lines every 10 ms). Stall (guest): the guest's clock across the switch minus one line interval.\n\n\
         | workload | mode | path | total ms | stall (client) ms | stall (guest) ms | pause ms | predicted ms | MB sent | rounds | demand pages | console continuous |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        a.mem >> 20,
        rate_arg(a),
        points.len(),
        wall.as_secs_f64()
    );
    for p in points {
        s.push_str(&row(p));
        s.push('\n');
    }
    s
}

fn point(
    a: &BenchArgs,
    certs: &Path,
    label: &str,
    spec: &str,
    mode: fgbi::Mode,
) -> Result<MigrationPoint> {
    let exe = castor_exe()?;
    let logs = a.out.join("logs");
    let (listen, c_src, c_dst) = (free_port(true)?, free_port(false)?, free_port(false)?);
    let tls = |node: &str, peer: &str| -> Vec<String> {
        vec![
            "--certs".into(),
            certs.display().to_string(),
            "--node".into(),
            node.into(),
            "--peer".into(),
            peer.into(),
        ]
    };
    let name = format!("migration-{label}-{mode}");
    let file = |suffix: &str| std::fs::File::create(logs.join(format!("{name}-{suffix}")));
    let mut dest = Command::new(&exe)
        .arg("migrate-listen")
        .args(tls("node-b", "node-a"))
        .args(["--listen", &listen.to_string()])
        .args(["--console", &c_dst.to_string()])
        .args(["--duration", "1500ms"])
        .stdout(file("dest.out")?)
        .stderr(file("dest.log")?)
        .spawn()
        .context("starting the destination")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut src = Command::new(&exe)
        .arg("migrate-run")
        .args(tls("node-a", "node-b"))
        .args(["--workload", spec, "--mem", &format!("{}", a.mem)])
        .args(["--vcpus", "1", "--to", &listen.to_string(), "--after", "2s"])
        .args(["--mode", &mode.to_string(), "--link-rate", &rate_arg(a)])
        .args(["--link-delay", &format!("{}us", a.link_delay.as_micros())])
        .args(["--console", &c_src.to_string(), "--duration", "120s"])
        .stdout(file("source.out")?)
        .stderr(file("source.log")?)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the source")?;
    let until = Instant::now() + Duration::from_secs(150);
    let (stream, hop) = follow(&[c_src, c_dst], until);
    let _ = src.wait();
    let _ = dest.wait();
    let out = std::fs::read_to_string(logs.join(format!("{name}-source.out")))?;
    let Some(json) = out.lines().find_map(|l| l.strip_prefix("MIGRATED ")) else {
        anyhow::bail!(
            "no migration: {}",
            out.lines().last().unwrap_or("the source printed nothing")
        );
    };
    let r: serde_json::Value = serde_json::from_str(json)?;
    let offset = r["console_offset"].as_u64().unwrap_or(0) as usize;
    let lines_before = crate::console::progress_lines(&stream[..offset.min(stream.len())]);
    let lines_after = crate::console::progress_lines(&stream[offset.min(stream.len())..]);
    let stall_guest_ms = match (lines_before.last(), lines_after.first()) {
        (Some(x), Some(y)) => Some((y.t_us as f64 - x.t_us as f64) / 1e3 - 10.0),
        _ => None,
    };
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let total_ms = f("total_ms");
    Ok(MigrationPoint {
        workload: label.to_string(),
        mode: mode.to_string(),
        path: r["path"].as_str().unwrap_or("?").to_string(),
        total_ms,
        stall_client_ms: hop.map(|d| d.as_secs_f64() * 1e3),
        stall_guest_ms,
        pause_ms: f("pause_ms"),
        predicted_ms: f("predicted_ms"),
        bytes: r["bytes"].as_u64().unwrap_or(0),
        rounds: r["rounds"].as_array().map(|v| v.len()).unwrap_or(0),
        demand: r["postcopy"]["demand"].as_u64(),
        continuous: crate::console::continuity(&stream).ok() && !lines_after.is_empty(),
        error: None,
    })
}

/// Follows the console across the two nodes; returns the stream and the
/// gap between the source's last bytes and the destination's first.
fn follow(consoles: &[SocketAddr; 2], until: Instant) -> (Vec<u8>, Option<Duration>) {
    let mut buf = Vec::new();
    let mut last = None;
    let mut hop = None;
    for (i, &c) in consoles.iter().enumerate() {
        let arrivals = loop {
            if Instant::now() > until {
                return (buf, hop);
            }
            match follow_console(c, buf.len() as u64, &mut buf, until) {
                Ok(a) => break a,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        if i == 1 {
            if let (Some(l), Some((_, first))) = (last, arrivals.first()) {
                hop = Some(first.saturating_duration_since(l));
            }
        }
        last = arrivals.last().map(|(_, t)| *t);
    }
    (buf, hop)
}
