//! `castor bench`: the downtime measurement suite.
//!
//! For every guest workload it runs, side by side in one run:
//! - the guest **unprotected** (`castor run`): the reference throughput;
//! - the guest with **dirty tracking only** (`castor run --track-ms E`):
//!   KVM's dirty log on and harvested every epoch, no checkpoint — the
//!   platform's cost of tracking, large on kvm_pvm;
//! - the real **pair** (`castor backup` + `castor primary` on loopback, mutual
//!   TLS QUIC, the emulated link) in every mode (remus / xbzrle / fgbi) and
//!   epoch length: pause and its parts, bytes per epoch, encode time, ack
//!   latency, output-commit delay, guest throughput;
//! - **failover drills** per mode: SIGKILL of the primary → first console
//!   byte from the survivor.
//!
//! Every point runs in fresh processes. Each point's figures cover only its
//! measurement window: the primary's figures are reset after the warm-up,
//! and guest throughput is read from the guest's own progress lines
//! (`ops=` counts over `t_us=` guest time) inside the window.
//!
//! Output: `points.csv`, `points.json`, `failover.csv`, `summary.md` and PNG
//! plots in `--out`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use node::stats::percentile;
use node::{PrimaryStatus, Role};

use crate::cli::{parse_duration, parse_rate, parse_size, parse_workload};
use crate::console::progress_lines;
use crate::drill::{run_drill, DrillPlan};
use crate::model::{Failover, Point, Results, Settings};
use crate::pair::{self, castor_exe, make_certs, read_console, wait_status, Pair, WitnessKind};

/// `castor bench` settings.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The smoke-test matrix (2 workloads x 3 modes x 25 ms, short windows,
    /// 3 failovers): under 3 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the results (created).
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Workloads, from: idle, sparse-50k, sparse-max, pages-1k, pages-max,
    /// kv, log (default: all; --quick: sparse-50k,pages-1k).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Further workloads of castor's guest as LABEL=SPEC, e.g.
    /// `--guest big=sparse,rate=300000,mib=128` (repeatable).
    #[arg(long = "guest", value_name = "LABEL=SPEC")]
    pub guests: Vec<String>,
    /// Benchmark this multiboot kernel too (throughput is read from its
    /// console lines if they carry `t_us=` and `ops=`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Command line of --kernel.
    #[arg(long, requires = "kernel", default_value = "")]
    pub cmdline: String,
    /// Modes to compare.
    #[arg(long, value_delimiter = ',', default_value = "remus,xbzrle,fgbi")]
    pub modes: Vec<fgbi::Mode>,
    /// Epoch lengths in milliseconds (default 25,50,100; --quick: 25).
    #[arg(long, value_delimiter = ',')]
    pub epochs: Vec<u64>,
    /// Measurement window of each point (default 5s; --quick: 2s).
    #[arg(long, value_parser = parse_duration)]
    pub measure: Option<Duration>,
    /// Warm-up before each window (default 2500ms; --quick: 1s).
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Emulated link rate for the replication traffic (`none`: loopback speed).
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    pub link_rate: crate::cli::LinkRate,
    /// Emulated link one-way delay.
    #[arg(long, default_value = "100us", value_parser = parse_duration)]
    pub link_delay: Duration,
    /// Failover drills per mode (default 10; --quick: 3 in fgbi mode only).
    #[arg(long)]
    pub failovers: Option<u32>,
    /// Skip the PNG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Only the network section: the guest's key-value service with a
    /// client in a network namespace — latency and rate unprotected and
    /// protected (fixed epochs from --epochs, default 10,25,50,100, then
    /// --epoch-ms auto with the epoch it chose), their parts, pause p50/p99,
    /// the link's bytes a second, the floor, and the client-seen failover
    /// gap (root; --out/net.md).
    #[arg(long, conflicts_with_all = ["reuse", "disk"])]
    pub net: bool,
    /// Only the disk section: the guest's durable key-value service
    /// (kvdisk: every PUT appended to a log on its disk and flushed before
    /// its reply) — durable writes a second and their latency unprotected
    /// and protected at 10/25/50 ms (or --epochs) and auto, bytes per epoch
    /// and the disk's share, the client-seen failover gap, and
    /// re-protection with 1 % and 10 % of a 1 GiB disk changed (root;
    /// --out/disk.md).
    #[arg(long, conflicts_with = "reuse")]
    pub disk: bool,
    /// Only the memory-reuse section: re-protecting a 1 GiB guest after a
    /// failover with 1 %, 10 % and 50 % of its pages changed, beside the
    /// full resync (--out/reuse.md).
    #[arg(long)]
    pub reuse: bool,
    /// Do not measure: re-render summary.md and the plots into --out from
    /// the points.json of an earlier run.
    #[arg(long, value_name = "POINTS_JSON")]
    pub from_json: Option<PathBuf>,
    /// The primaries' pre-copy window (see `castor primary --help`); 0 copies
    /// every dirty page in the pause. Default: the primary's.
    #[arg(long)]
    pub precopy_ms: Option<u64>,
    /// Measure live migration instead of the pair (`castor migrate`): idle,
    /// sparse 50 k/s, sparse flat out, pages 1 k/s and pages 50 k/s (above
    /// a 1 Gbit/s link) x --modes, through the emulated link; total time,
    /// the stall a console client sees, bytes, rounds, path. Writes
    /// migration.md and migration.json into --out (--workloads filters).
    #[arg(long)]
    pub migration: bool,
}

/// A workload of the matrix.
#[derive(Debug, Clone)]
struct Load {
    label: String,
    /// Guest arguments for `castor run` / `castor primary`.
    args: Vec<String>,
}

const CATALOGUE: [(&str, &str); 7] = [
    ("idle", "counter,interval_ms=100"),
    ("sparse-50k", "sparse,rate=50000"),
    ("sparse-max", "sparse,rate=0"),
    ("pages-1k", "pages,rate=1000"),
    ("pages-max", "pages,rate=0"),
    ("kv", "kv,rate=100000"),
    ("log", "log,rate=20000"),
];

fn guest_load(label: &str, spec: &str) -> Result<Load> {
    let w = parse_workload(spec).map_err(|e| anyhow::anyhow!("workload '{label}': {e}"))?;
    Ok(Load {
        label: label.to_string(),
        args: vec!["--workload".into(), w.to_string()],
    })
}

struct Plan {
    loads: Vec<Load>,
    modes: Vec<fgbi::Mode>,
    epochs: Vec<u64>,
    warmup: Duration,
    measure: Duration,
    failovers: u32,
    failover_modes: Vec<fgbi::Mode>,
    link_args: Vec<String>,
}

/// The workloads of the matrix: the catalogue's (named, or all by
/// default), then `--guest`s, then `--kernel`.
fn loads(a: &BenchArgs) -> Result<Vec<Load>> {
    let mut loads = Vec::new();
    let names: Vec<String> = if !a.workloads.is_empty() {
        a.workloads.clone()
    } else if a.quick {
        vec!["sparse-50k".into(), "pages-1k".into()]
    } else if a.guests.is_empty() && a.kernel.is_none() {
        CATALOGUE.iter().map(|(l, _)| l.to_string()).collect()
    } else {
        Vec::new()
    };
    for n in &names {
        let Some((_, spec)) = CATALOGUE.iter().find(|(l, _)| l == n) else {
            bail!(
                "unknown workload '{n}': choose from {} (or give --guest LABEL=SPEC)",
                CATALOGUE.map(|(l, _)| l).join(", ")
            );
        };
        loads.push(guest_load(n, spec)?);
    }
    for g in &a.guests {
        let Some((label, spec)) = g.split_once('=') else {
            bail!("--guest '{g}': expected LABEL=SPEC, e.g. big=sparse,rate=300000");
        };
        loads.push(guest_load(label, spec)?);
    }
    if let Some(k) = &a.kernel {
        if !k.is_file() {
            bail!("--kernel {}: no such file", k.display());
        }
        let label = k
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kernel".into());
        loads.push(Load {
            label,
            args: vec![
                "--kernel".into(),
                k.display().to_string(),
                "--cmdline".into(),
                a.cmdline.clone(),
            ],
        });
    }
    Ok(loads)
}

fn plan(a: &BenchArgs) -> Result<Plan> {
    let loads = loads(a)?;
    if a.modes.is_empty() {
        bail!("--modes: give at least one of remus, xbzrle, fgbi");
    }
    let epochs = if !a.epochs.is_empty() {
        a.epochs.clone()
    } else if a.quick {
        vec![25]
    } else {
        vec![25, 50, 100]
    };
    if let Some(e) = epochs.iter().find(|&&e| !(1..=10_000).contains(&e)) {
        bail!("--epochs: {e} ms is outside 1..=10000");
    }
    let (warmup, measure) = if a.quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_millis(2500), Duration::from_secs(5))
    };
    let measure = a.measure.unwrap_or(measure);
    if measure < Duration::from_millis(500) {
        bail!("--measure: at least 500ms, so that the guest prints in the window");
    }
    let mut link_args = vec!["--link-rate".to_string()];
    link_args.push(match a.link_rate.0 {
        Some(r) => format!("{}B", r),
        None => "none".into(),
    });
    link_args.extend([
        "--link-delay".to_string(),
        format!("{}us", a.link_delay.as_micros()),
    ]);
    if let Some(ms) = a.precopy_ms {
        link_args.extend(["--precopy-ms".to_string(), ms.to_string()]);
    }
    let failover_modes = if a.quick && a.failovers.is_none() {
        vec![fgbi::Mode::Fgbi]
    } else {
        a.modes.clone()
    };
    Ok(Plan {
        loads,
        modes: a.modes.clone(),
        epochs,
        warmup: a.warmup.unwrap_or(warmup),
        measure,
        failovers: a.failovers.unwrap_or(if a.quick { 3 } else { 10 }),
        failover_modes,
        link_args,
    })
}

/// Throughput from progress lines `(t_us, cpu, ops)` whose guest time is in
/// `[from_us, to_us]`: per vCPU Δops/Δt, summed. NaN without two lines.
fn throughput(lines: &[guest::Progress], from_us: u64, to_us: u64) -> f64 {
    let mut per: std::collections::BTreeMap<u32, (guest::Progress, guest::Progress)> =
        Default::default();
    for p in lines
        .iter()
        .filter(|p| p.t_us >= from_us && p.t_us <= to_us)
    {
        per.entry(p.cpu)
            .and_modify(|e| {
                if p.t_us < e.0.t_us {
                    e.0 = *p;
                }
                if p.t_us > e.1.t_us {
                    e.1 = *p;
                }
            })
            .or_insert((*p, *p));
    }
    let mut total = 0.0;
    let mut any = false;
    for (a, b) in per.values() {
        if b.t_us > a.t_us {
            total += (b.ops.saturating_sub(a.ops)) as f64 / ((b.t_us - a.t_us) as f64 / 1e6);
            any = true;
        }
    }
    if any {
        total
    } else {
        f64::NAN
    }
}

/// CPU time and run-queue wait (ns) of a process's vCPU threads, summed.
fn vcpu_sched(pid: u32) -> Option<(u64, u64)> {
    let mut run = 0;
    let mut wait = 0;
    let mut any = false;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let st = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        let mut f = st.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        run += f.next()?;
        wait += f.next()?;
        any = true;
    }
    any.then_some((run, wait))
}

/// Samples `vcpu_sched` of `pid` over a window; shares of `window`.
struct SchedWindow {
    start: Option<(u64, u64)>,
    t: Instant,
}

impl SchedWindow {
    fn start(pid: u32) -> Self {
        SchedWindow {
            start: vcpu_sched(pid),
            t: Instant::now(),
        }
    }

    fn finish(self, pid: u32, pt: &mut Point) {
        let (Some(a), Some(b)) = (self.start, vcpu_sched(pid)) else {
            return;
        };
        let w = self.t.elapsed().as_nanos() as f64;
        pt.vcpu_ran = b.0.saturating_sub(a.0) as f64 / w;
        pt.vcpu_waited = b.1.saturating_sub(a.1) as f64 / w;
    }
}

/// The guest alone: `castor run`, with dirty tracking if `track_ms` is set.
fn baseline(a: &BenchArgs, p: &Plan, load: &Load, track_ms: Option<u64>, log: &Path) -> Point {
    let config = if track_ms.is_some() {
        "tracking"
    } else {
        "unprotected"
    };
    let mut pt = Point::new(&load.label, config, track_ms.unwrap_or(0));
    let r = (|| -> Result<(f64, (f64, f64))> {
        let total = p.warmup + p.measure + Duration::from_millis(300);
        let mut cmd = Command::new(castor_exe()?);
        cmd.arg("run")
            .args(["--mem", &format!("{}M", a.mem >> 20)])
            .args(["--vcpus", &a.vcpus.to_string()])
            .args(&load.args)
            .args(["--duration", &format!("{}ms", total.as_millis())]);
        if let Some(e) = track_ms {
            cmd.args(["--track-ms", &e.to_string()]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting castor run")?;
        // The vCPUs' scheduling over the window, sampled beside the reader.
        let pid = child.id();
        let (warmup, measure) = (p.warmup, p.measure);
        let sampler = std::thread::spawn(move || {
            std::thread::sleep(warmup);
            let w = SchedWindow::start(pid);
            std::thread::sleep(measure);
            let mut x = Point::default();
            w.finish(pid, &mut x);
            (x.vcpu_ran, x.vcpu_waited)
        });
        let mut lines = Vec::new();
        let out = child.stdout.take().expect("piped");
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            lines.extend(guest::Progress::parse(&l));
        }
        let st = child.wait()?;
        if !st.success() {
            bail!("castor run failed ({st}); see {}", log.display());
        }
        let from = p.warmup.as_micros() as u64;
        let sched = sampler.join().unwrap_or((f64::NAN, f64::NAN));
        Ok((
            throughput(&lines, from, from + p.measure.as_micros() as u64),
            sched,
        ))
    })();
    match r {
        Ok((t, (ran, waited))) => {
            pt.ops_per_s = t;
            pt.vcpu_ran = ran;
            pt.vcpu_waited = waited;
        }
        Err(e) => pt.error = Some(format!("{e:#}")),
    }
    pt
}

/// The names of the pair's nodes in every point.
const NODES: [&str; 2] = ["node-a", "node-b"];

/// The fewest checkpoints a point's figures come from: a window in which
/// fewer were taken (a mode the link cannot carry) is read on, up to ten
/// times its length.
pub const MIN_POINT_CHECKPOINTS: u64 = 3;

/// The backup's failure detector in the checkpoint points (ms without a
/// heartbeat): above the host's CPU stalls, since a takeover there is not a
/// measurement but a failed point.
pub const POINT_DETECTOR_MS: u64 = 1000;

/// The pair: a backup and a primary, figures over the window.
fn protected(
    a: &BenchArgs,
    p: &Plan,
    load: &Load,
    mode: fgbi::Mode,
    epoch_ms: u64,
    certs: &Path,
    dir: &Path,
) -> Point {
    let mut pt = Point::new(&load.label, &mode.to_string(), epoch_ms);
    let r = measure_pair(a, p, load, mode, certs, dir, &mut pt);
    if let Err(e) = r {
        pt.error = Some(format!("{e:#}"));
    }
    pt
}

/// Runs the pair of one point: starts it, warms up, resets the primary's
/// figures, reads the console over the window and fills `pt`.
fn measure_pair(
    a: &BenchArgs,
    p: &Plan,
    load: &Load,
    mode: fgbi::Mode,
    certs: &Path,
    dir: &Path,
    pt: &mut Point,
) -> Result<()> {
    let tag = format!("{}-{}-{}", load.label, mode, pt.epoch_ms);
    let pair = Pair::new(certs, NODES, dir)?;
    let mut common: Vec<String> = vec![
        "--mode".into(),
        mode.to_string(),
        "--epoch-ms".into(),
        pt.epoch_ms.to_string(),
    ];
    common.extend(p.link_args.iter().cloned());
    let mut guest: Vec<String> = vec![
        "--mem".into(),
        format!("{}M", a.mem >> 20),
        "--vcpus".into(),
        a.vcpus.to_string(),
    ];
    guest.extend(load.args.iter().cloned());
    // Neither node's failure detector is part of what a point measures, and
    // the host these runs on takes a CPU away for ~100 ms now and then (steal,
    // docs/design.md, "the host's own stalls"), longer under a loaded test
    // run: with the backup's default 30 ms one such stall ends the point with
    // a false takeover, and with the primary's default 200 ms it ends the
    // session and the window measures a full resync. The failover rounds keep
    // the defaults: the detector is part of what they measure.
    let mut backup_args = common.clone();
    backup_args.extend([
        "--heartbeat-timeout-ms".into(),
        POINT_DETECTOR_MS.to_string(),
    ]);
    let backup = pair.start_backup(1, &backup_args, &format!("{tag}.backup.log"))?;
    let mut primary_args = common.clone();
    primary_args.extend(["--backup-timeout-ms".into(), POINT_DETECTOR_MS.to_string()]);
    primary_args.extend(guest.iter().cloned());
    let primary = pair.start_primary(0, &primary_args, &format!("{tag}.primary.log"))?;
    wait_status(
        &primary,
        "the primary to be protected",
        Duration::from_secs(90),
        pair::protected,
    )?;
    std::thread::sleep(p.warmup);
    reset_figures(&primary)?;
    let start = primary.status().context("the primary stopped answering")?;
    let mut buf = Vec::new();
    let sched = SchedWindow::start(primary.child.id());
    let window = Instant::now();
    read_console(
        primary.console,
        start.console_released,
        &mut buf,
        Instant::now() + p.measure,
        u64::MAX,
    )?;
    // A mode the link cannot carry (remus under a fast writer: its epochs
    // stretch to seconds, waiting for acks) may take no checkpoint within
    // the window. Read on until a few are in, within a bound, and say so.
    let cap = (p.measure * 10).max(Duration::from_secs(20));
    let samples = |st: &node::Status| st.primary.as_ref().map_or(0, |p| p.samples);
    while window.elapsed() >= p.measure.mul_f64(0.9) && window.elapsed() < cap {
        let st = primary.status().context("the primary stopped answering")?;
        if samples(&st) >= MIN_POINT_CHECKPOINTS || !st.protected() {
            break;
        }
        let from = start.console_released + buf.len() as u64;
        read_console(
            primary.console,
            from,
            &mut buf,
            Instant::now() + Duration::from_millis(250),
            u64::MAX,
        )?;
    }
    pt.window_ms = window.elapsed().as_secs_f64() * 1e3;
    sched.finish(primary.child.id(), pt);
    // A window cut short means the primary stopped: a failover, which
    // with both daemons alive is a false takeover. Not a measurement.
    if backup.status().is_some_and(|s| s.role == Role::TakenOver) {
        bail!(
            "the backup took over during the window although the primary was alive (a false takeover); see {} and {}",
            primary.log.display(),
            backup.log.display()
        );
    }
    if window.elapsed() < p.measure.mul_f64(0.9) {
        bail!(
            "the primary's console ended {:?} into the window; see {}",
            window.elapsed(),
            primary.log.display()
        );
    }
    let s = primary.status().context("the primary stopped answering")?;
    let sessions = |st: &node::Status| st.primary.as_ref().map_or(0, |p| p.sessions);
    if !s.protected() || sessions(&s) != sessions(&start) {
        bail!(
            "the primary lost its backup during the window{} ({}); see {}",
            if s.protected() { " and resynced" } else { "" },
            why_sessions_ended(&primary.log),
            primary.log.display()
        );
    }
    drop(backup);
    drop(primary);
    set_figures(pt, &s.figures());
    // Guest time of the window: from the first line's clock on.
    pt.ops_per_s = throughput(&progress_lines(&buf), 0, u64::MAX);
    if pt.epochs < 1.0 {
        bail!(
            "no checkpoint in {:.1} s (the window read on for up to ten times its length)",
            pt.window_ms / 1e3
        );
    }
    Ok(())
}

/// What a primary's log says about its sessions' ends (the last three
/// such lines), or that it says nothing.
fn why_sessions_ended(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ending the session") || l.contains("lost the backup"))
        .collect();
    if lines.is_empty() {
        return "its log does not say why".into();
    }
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Asks the primary to reset its figures (the window starts).
fn reset_figures(primary: &pair::Daemon) -> Result<()> {
    match primary
        .control(&node::control::Request::Reset)
        .context("resetting the primary's figures")?
    {
        node::control::Response::Ok(_) => Ok(()),
        other => bail!("the primary refused to reset its figures: {other:?}"),
    }
}

/// A point's checkpoint figures from the primary's over the window.
fn set_figures(pt: &mut Point, f: &PrimaryStatus) {
    pt.epochs = f.samples as f64;
    pt.pause_p50_us = f.pause_p50_us;
    pt.pause_p99_us = f.pause_p99_us;
    pt.pause_max_us = f.pause_max_us;
    pt.harvest_p50_us = f.harvest_p50_us;
    pt.copy_p50_us = f.copy_p50_us;
    pt.capture_p50_us = f.capture_p50_us;
    pt.encode_p50_us = f.encode_p50_us;
    pt.encode_p99_us = f.encode_p99_us;
    pt.dirty_pages = f.dirty_pages_mean;
    pt.bytes_per_epoch = f.bytes_per_epoch;
    pt.raw_per_epoch = f.raw_bytes_per_epoch;
    pt.ack_p50_us = f.ack_p50_us;
    pt.ack_p99_us = f.ack_p99_us;
    pt.release_p50_us = f.release_p50_us;
    pt.release_p99_us = f.release_p99_us;
    pt.epochs_waited = f.epochs_waited as f64;
    pt.precopied = f.precopied_mean;
}

fn now_utc() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

fn host() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb >> 20);
    format!(
        "{}; {cpus} CPUs, {mem} GiB",
        vmm::KvmKind::detect().describe()
    )
}

/// Writes the report (and the plots unless `--no-plots`) into `--out` and
/// prints the summary.
fn render(a: &BenchArgs, results: &Results) -> Result<()> {
    crate::report::write_all(&a.out, results)?;
    if !a.no_plots {
        crate::plots::draw_all(&a.out, results)?;
    }
    println!("{}", std::fs::read_to_string(a.out.join("summary.md"))?);
    Ok(())
}

fn create_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output directory {}", out.display()))
}

/// `--from-json`: the report and plots again from an earlier run's points.json.
fn rerender(a: &BenchArgs, from: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    let results = Results::from_json(&text).with_context(|| {
        format!(
            "{} is not the points.json of a castor bench run",
            from.display()
        )
    })?;
    create_out(&a.out)?;
    render(a, &results)
}

/// The progress bar, and the lines printed above it.
struct Ui {
    pb: ProgressBar,
}

impl Ui {
    fn new(total: u64) -> Ui {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Ui { pb }
    }

    /// Prints a line (above the bar, or plainly when there is no terminal).
    fn say(&self, s: String) {
        if self.pb.is_hidden() {
            println!("{s}");
        } else {
            self.pb.println(s);
        }
    }

    /// Prints a finished point and advances the bar.
    fn point(&self, pt: &Point) {
        self.say(point_line(pt));
        self.pb.inc(1);
    }
}

/// The progress line of a finished point.
fn point_line(pt: &Point) -> String {
    match &pt.error {
        Some(e) => format!(
            "  {:<11} {:<11} {:>3} ms  FAILED: {e}",
            pt.workload, pt.config, pt.epoch_ms
        ),
        None if pt.protected() => format!(
            "  {:<11} {:<11} {:>3} ms  {:>10.0} ops/s  pause p50 {:>6.2} p99 {:>6.2} ms  {:>9.0} B/epoch ({:.0} dirty pages)",
            pt.workload,
            pt.config,
            pt.epoch_ms,
            pt.ops_per_s,
            pt.pause_p50_us / 1e3,
            pt.pause_p99_us / 1e3,
            pt.bytes_per_epoch,
            pt.dirty_pages
        ),
        None => format!(
            "  {:<11} {:<11} {:>3} ms  {:>10.0} ops/s",
            pt.workload, pt.config, pt.epoch_ms, pt.ops_per_s
        ),
    }
}

/// Where the points' daemons log.
struct Dirs<'a> {
    /// The pair's certificates.
    certs: &'a Path,
    /// The logs directory in `--out`.
    logs: &'a Path,
}

/// The matrix: every workload unprotected, then per epoch length tracking
/// only and every mode.
fn run_matrix(a: &BenchArgs, p: &Plan, dirs: &Dirs<'_>, ui: &Ui) -> Vec<Point> {
    let mut points = Vec::new();
    for load in &p.loads {
        run_load(a, p, load, dirs, ui, &mut points);
    }
    points
}

/// One workload's points.
fn run_load(
    a: &BenchArgs,
    p: &Plan,
    load: &Load,
    dirs: &Dirs<'_>,
    ui: &Ui,
    points: &mut Vec<Point>,
) {
    ui.pb.set_message(format!("{} unprotected", load.label));
    let log = |name: String| dirs.logs.join(format!("{}-{name}.log", load.label));
    let base = baseline(a, p, load, None, &log("unprotected".into()));
    ui.point(&base);
    let unprotected = base.ops_per_s;
    points.push(base);
    for &e in &p.epochs {
        ui.pb.set_message(format!("{} tracking {e} ms", load.label));
        let mut tr = baseline(a, p, load, Some(e), &log(format!("tracking-{e}")));
        tr.vs_unprotected = tr.ops_per_s / unprotected;
        ui.point(&tr);
        let tracking = tr.ops_per_s;
        points.push(tr);
        for &m in &p.modes {
            ui.pb.set_message(format!("{} {m} {e} ms", load.label));
            let mut pt = protected(a, p, load, m, e, dirs.certs, dirs.logs);
            pt.vs_unprotected = pt.ops_per_s / unprotected;
            pt.vs_tracking = pt.ops_per_s / tracking;
            ui.point(&pt);
            points.push(pt);
        }
    }
}

/// The failover drills, outside the post-resync grace (see docs/design.md):
/// the failovers measured, and the drills that failed.
fn run_drills(a: &BenchArgs, p: &Plan, ui: &Ui) -> (Vec<Failover>, Vec<String>) {
    let mut failovers = Vec::new();
    let mut failover_errors = Vec::new();
    if p.failovers == 0 {
        return (failovers, failover_errors);
    }
    // Every mode with the etcd witness (the product's default); the first
    // also without one, to show what the witness costs.
    let mut runs: Vec<(fgbi::Mode, WitnessKind)> = p
        .failover_modes
        .iter()
        .map(|&m| (m, WitnessKind::Etcd))
        .collect();
    if let Some(&m) = p.failover_modes.first() {
        runs.push((m, WitnessKind::None));
    }
    for (m, w) in runs {
        let (got, r) = drill_mode(a, p, m, w, ui);
        failovers.extend(got);
        if let Err(e) = r {
            let label = failover_label(m, w);
            ui.say(format!("  failover    {label}: FAILED: {e:#}"));
            failover_errors.push(format!("{label}: {e:#}"));
        }
    }
    (failovers, failover_errors)
}

/// A drill's row in the results: the mode, and "(no witness)" without one
/// (no comma: it is a CSV field).
fn failover_label(m: fgbi::Mode, w: WitnessKind) -> String {
    match w {
        WitnessKind::Etcd => m.to_string(),
        WitnessKind::None => format!("{m} (no witness)"),
    }
}

/// The drill of one mode: its failovers, and whether it ran to the end.
fn drill_mode(
    a: &BenchArgs,
    p: &Plan,
    m: fgbi::Mode,
    witness: WitnessKind,
    ui: &Ui,
) -> (Vec<Failover>, Result<()>) {
    let label = failover_label(m, witness);
    ui.pb.set_message(format!("failover drill {label}"));
    let epoch = p.epochs[0];
    let mut args = vec![
        "--mode".to_string(),
        m.to_string(),
        "--epoch-ms".into(),
        epoch.to_string(),
    ];
    args.extend(p.link_args.iter().cloned());
    let plan = DrillPlan {
        rounds: p.failovers,
        workload: parse_workload("sparse,rate=50000,interval_ms=2").expect("valid workload"),
        mem: a.mem,
        vcpus: a.vcpus,
        protect_args: args,
        settle: Duration::from_millis(2500),
        witness,
        reuse: false,
        disk_mib: 0,
    };
    let mut got = Vec::new();
    let r = run_drill(
        &plan,
        &mut |r| {
            ui.pb.inc(1);
            if let Some(ms) = r.failover_ms.filter(|_| r.ok()) {
                got.push(Failover {
                    mode: label.clone(),
                    round: r.round,
                    ms,
                });
            }
        },
        &mut |_| {},
    );
    let mut v: Vec<f64> = got.iter().map(|f| f.ms).collect();
    let figures = if v.is_empty() {
        String::new()
    } else {
        format!(
            ": p50 {:.1} ms, p99 {:.1} ms",
            percentile(&mut v, 0.5),
            percentile(&mut v, 0.99)
        )
    };
    ui.say(format!(
        "  failover    {:<11} {epoch:>3} ms  {} rounds{figures}",
        label,
        got.len(),
    ));
    (got, r.map(|_| ()))
}

/// The settings recorded with the results.
fn settings(a: &BenchArgs, p: &Plan) -> Settings {
    Settings {
        mem_mib: a.mem >> 20,
        vcpus: a.vcpus,
        link: link(a).to_string(),
        warmup_ms: p.warmup.as_millis() as u64,
        measure_ms: p.measure.as_millis() as u64,
        workloads: p
            .loads
            .iter()
            .map(|l| (l.label.clone(), l.args.join(" ")))
            .collect(),
        point_detector_ms: POINT_DETECTOR_MS,
    }
}

fn link(a: &BenchArgs) -> transport::link::LinkShape {
    transport::link::LinkShape {
        rate_bytes_per_s: a.link_rate.0,
        delay: a.link_delay,
    }
}

/// `castor bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    if a.migration {
        return crate::migration_bench::run(&a);
    }
    if let Some(from) = &a.from_json {
        return rerender(&a, from);
    }
    let p = plan(&a)?;
    if a.net {
        return crate::netbench::net(&a, &p.link_args, a.link_rate.0);
    }
    if a.disk {
        return crate::diskbench::disk(&a, &p.link_args, a.link_rate.0);
    }
    if a.reuse {
        return crate::netbench::reuse(&a, &p.link_args);
    }
    let t0 = Instant::now();
    create_out(&a.out)?;
    let logs = a.out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let tmp = tempfile::tempdir()?;
    let certs = make_certs(&tmp.path().join("pki"), NODES)?;

    let per_load = 1 + p.epochs.len() * (1 + p.modes.len());
    // (The first failover mode is drilled twice: with and without a witness.)
    let drills = p.failover_modes.len() + usize::from(!p.failover_modes.is_empty());
    let total = (p.loads.len() * per_load) as u64 + p.failovers as u64 * drills as u64;
    let ui = Ui::new(total);
    ui.say(format!(
        "castor bench: {} workloads x {} modes x {:?} ms epochs, {} MiB, {} vCPU(s), link {}; window {:?} after {:?} warm-up; results in {}",
        p.loads.len(),
        p.modes.len(),
        p.epochs,
        a.mem >> 20,
        a.vcpus,
        link(&a),
        p.measure,
        p.warmup,
        a.out.display()
    ));
    let dirs = Dirs {
        certs: &certs,
        logs: &logs,
    };
    let points = run_matrix(&a, &p, &dirs, &ui);
    let (failovers, failover_errors) = run_drills(&a, &p, &ui);
    ui.pb.finish_and_clear();

    let results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started: now_utc(),
        host: host(),
        settings: settings(&a, &p),
        points,
        failovers,
        failover_errors,
        wall_s: t0.elapsed().as_secs_f64(),
    };
    render(&a, &results)?;
    println!(
        "castor bench: {} points, {} failovers in {:.0} s; results in {}",
        results.points.len(),
        results.failovers.len(),
        results.wall_s,
        a.out.display()
    );
    let failed = results.points.iter().filter(|p| !p.ok()).count();
    if failed > 0 || !results.failover_errors.is_empty() {
        bail!(
            "{} points and {} drills failed (see summary.md and {})",
            failed,
            results.failover_errors.len(),
            logs.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cpu: u32, t_us: u64, ops: u64) -> guest::Progress {
        guest::Progress {
            cpu,
            seq: 0,
            t_us,
            ops,
        }
    }

    #[test]
    fn throughput_sums_vcpus_inside_the_window() {
        let l = [
            line(0, 0, 0),
            line(0, 1_000_000, 100),
            line(0, 2_000_000, 300),
            line(1, 1_000_000, 50),
            line(1, 3_000_000, 250),
        ];
        // cpu 0: 200 ops over 1 s; cpu 1: 200 over 2 s.
        let t = throughput(&l, 1_000_000, 3_000_000);
        assert!((t - 300.0).abs() < 1e-9, "{t}");
        assert!(throughput(&l, 5_000_000, 6_000_000).is_nan());
    }

    #[test]
    fn unknown_workloads_and_bad_flags_are_named() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            b: BenchArgs,
        }
        let a = T::parse_from(["t", "--workloads", "nope"]).b;
        let e = plan(&a).err().expect("refused").to_string();
        assert!(
            e.contains("unknown workload 'nope'") && e.contains("sparse-50k"),
            "{e}"
        );
        let a = T::parse_from(["t", "--guest", "oops"]).b;
        assert!(plan(&a)
            .err()
            .expect("refused")
            .to_string()
            .contains("LABEL=SPEC"));
        let a = T::parse_from(["t", "--guest", "x=sparse,rate=zz"]).b;
        assert!(plan(&a)
            .err()
            .expect("refused")
            .to_string()
            .contains("workload 'x'"));
        let a = T::parse_from(["t", "--quick"]).b;
        let p = plan(&a).expect("quick plan");
        assert_eq!(p.loads.len(), 2);
        assert_eq!(p.epochs, vec![25]);
        assert_eq!(p.failover_modes, vec![fgbi::Mode::Fgbi]);
        assert!(T::try_parse_from(["t", "--link-rate", "fast"]).is_err());
    }
}
