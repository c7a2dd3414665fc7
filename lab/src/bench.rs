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
use serde::{Deserialize, Serialize};

use crate::cli::{parse_duration, parse_rate, parse_size, parse_workload};
use crate::pair::{self, castor_exe, field, free_port, read_console, status, wait_status, Node};

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
    /// Do not measure: re-render summary.md and the plots into --out from
    /// the points.json of an earlier run.
    #[arg(long, value_name = "POINTS_JSON")]
    pub from_json: Option<PathBuf>,
    /// The primaries' pre-copy window (see `castor primary --help`); 0 copies
    /// every dirty page in the pause. Default: the primary's.
    #[arg(long)]
    pub precopy_ms: Option<u64>,
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

/// Figures of one point of the matrix.
/// (Figures not measured are NaN, written as `null` in JSON.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Point {
    /// Workload label.
    pub workload: String,
    /// `unprotected`, `tracking`, or the mode of a protected run.
    pub config: String,
    /// Epoch length (0 when unprotected).
    pub epoch_ms: u64,
    /// Guest operations per second in the window (sum over vCPUs).
    pub ops_per_s: f64,
    /// Throughput / unprotected throughput.
    pub vs_unprotected: f64,
    /// Throughput / tracking-only throughput at the same epoch length.
    pub vs_tracking: f64,
    /// Checkpoints in the window.
    pub epochs: f64,
    /// Pause p50, µs.
    pub pause_p50_us: f64,
    /// Pause p99, µs.
    pub pause_p99_us: f64,
    /// Pause max, µs.
    pub pause_max_us: f64,
    /// Harvest p50, µs.
    pub harvest_p50_us: f64,
    /// Page copy p50, µs.
    pub copy_p50_us: f64,
    /// State capture p50, µs.
    pub capture_p50_us: f64,
    /// Encode p50, µs (after resume).
    pub encode_p50_us: f64,
    /// Encode p99, µs.
    pub encode_p99_us: f64,
    /// Dirty pages per epoch.
    pub dirty_pages: f64,
    /// Bytes sent per epoch.
    pub bytes_per_epoch: f64,
    /// Raw bytes of the dirty pages per epoch.
    pub raw_per_epoch: f64,
    /// Ack latency p50, µs (commit sent → ack).
    pub ack_p50_us: f64,
    /// Ack latency p99, µs.
    pub ack_p99_us: f64,
    /// Output-commit delay p50, µs (end of epoch → output released).
    pub release_p50_us: f64,
    /// Output-commit delay p99, µs.
    pub release_p99_us: f64,
    /// Epochs that waited for acks (link or backup too slow).
    pub epochs_waited: f64,
    /// Dirty pages per epoch copied before the pause (pre-copy).
    pub precopied: f64,
    /// Share of the window the guest's vCPU threads ran on a CPU (from
    /// /proc/PID/task/TID/schedstat; per vCPU, summed).
    pub vcpu_ran: f64,
    /// Share of the window they were runnable but waited for a CPU.
    pub vcpu_waited: f64,
    /// Why the point failed, if it did.
    pub error: Option<String>,
}

impl Default for Point {
    fn default() -> Self {
        let nan = f64::NAN;
        Point {
            workload: String::new(),
            config: String::new(),
            epoch_ms: 0,
            ops_per_s: nan,
            vs_unprotected: nan,
            vs_tracking: nan,
            epochs: nan,
            pause_p50_us: nan,
            pause_p99_us: nan,
            pause_max_us: nan,
            harvest_p50_us: nan,
            copy_p50_us: nan,
            capture_p50_us: nan,
            encode_p50_us: nan,
            encode_p99_us: nan,
            dirty_pages: nan,
            bytes_per_epoch: nan,
            raw_per_epoch: nan,
            ack_p50_us: nan,
            ack_p99_us: nan,
            release_p50_us: nan,
            release_p99_us: nan,
            epochs_waited: nan,
            precopied: nan,
            vcpu_ran: nan,
            vcpu_waited: nan,
            error: None,
        }
    }
}

impl Point {
    fn new(load: &Load, config: &str, epoch_ms: u64) -> Self {
        Point {
            workload: load.label.clone(),
            config: config.into(),
            epoch_ms,
            ..Point::default()
        }
    }

    /// Whether this is a protected (pair) point.
    pub fn protected(&self) -> bool {
        !matches!(self.config.as_str(), "unprotected" | "tracking")
    }
}

/// One failover of the drills.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failover {
    /// Mode.
    pub mode: String,
    /// Round.
    pub round: u32,
    /// SIGKILL → first console byte from the survivor, ms.
    pub ms: f64,
}

/// Everything a run produced.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// The command line.
    pub command: String,
    /// When it ran (UTC, from the system clock).
    pub started: String,
    /// KVM flavour and host.
    pub host: String,
    /// Settings.
    pub settings: Settings,
    /// The matrix.
    pub points: Vec<Point>,
    /// The drills.
    pub failovers: Vec<Failover>,
    /// Failed drills.
    pub failover_errors: Vec<String>,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
}

impl Results {
    /// The modes of the protected points, in the order they ran.
    pub fn modes(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for p in self.points.iter().filter(|p| p.protected()) {
            if !m.contains(&p.config) {
                m.push(p.config.clone());
            }
        }
        m
    }

    /// The epoch lengths of the protected points, ascending.
    pub fn epochs(&self) -> Vec<u64> {
        let mut e: Vec<u64> = self
            .points
            .iter()
            .filter(|p| p.protected())
            .map(|p| p.epoch_ms)
            .collect();
        e.sort_unstable();
        e.dedup();
        e
    }

    /// The epoch length the targets and plots are about: 25 ms if it ran.
    pub fn main_epoch(&self) -> u64 {
        let e = self.epochs();
        if e.contains(&25) {
            25
        } else {
            e.first().copied().unwrap_or(25)
        }
    }
}

/// The run's settings, as recorded with the results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Emulated link.
    pub link: String,
    /// Warm-up per point, ms.
    pub warmup_ms: u64,
    /// Window per point, ms.
    pub measure_ms: u64,
    /// Workloads: label → spec.
    pub workloads: Vec<(String, String)>,
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

fn plan(a: &BenchArgs) -> Result<Plan> {
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

fn progress_lines(bytes: &[u8]) -> Vec<guest::Progress> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(guest::Progress::parse)
        .collect()
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
    let mut pt = Point::new(load, config, track_ms.unwrap_or(0));
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
    let mut pt = Point::new(load, &mode.to_string(), epoch_ms);
    let tag = format!("{}-{}-{}", load.label, mode, epoch_ms);
    let r = (|| -> Result<()> {
        let port_a = free_port(true)?;
        let port_b = free_port(true)?;
        let a_node = Node {
            certs,
            name: "node-a",
            peer: "node-b",
        };
        let b_node = Node {
            certs,
            name: "node-b",
            peer: "node-a",
        };
        let mut common: Vec<String> = vec![
            "--mode".into(),
            mode.to_string(),
            "--epoch-ms".into(),
            epoch_ms.to_string(),
        ];
        common.extend(p.link_args.iter().cloned());
        let backup = pair::start_backup(
            &b_node,
            port_b,
            port_a,
            &common,
            dir.join(format!("{tag}.backup.log")),
        )?;
        let mut args: Vec<String> = vec![
            "--mem".into(),
            format!("{}M", a.mem >> 20),
            "--vcpus".into(),
            a.vcpus.to_string(),
        ];
        args.extend(load.args.iter().cloned());
        args.extend(common);
        let primary = pair::start_primary(
            &a_node,
            port_b,
            &args,
            dir.join(format!("{tag}.primary.log")),
        )?;
        wait_status(
            &primary,
            "the primary to be protected",
            Duration::from_secs(90),
            |s| s.contains("\"protected\":true"),
        )?;
        std::thread::sleep(p.warmup);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let said = rt
            .block_on(node::console::command(primary.console, "reset"))
            .context("resetting the primary's figures")?;
        if !said.starts_with("ok") {
            bail!("the primary refused to reset its figures: {said}");
        }
        let start = status(primary.console).context("the primary stopped answering")?;
        let offset = field(&start, "console_released").unwrap_or(0.0) as u64;
        let mut buf = Vec::new();
        let sched = SchedWindow::start(primary.child.id());
        let window = Instant::now();
        read_console(
            primary.console,
            offset,
            &mut buf,
            Instant::now() + p.measure,
            u64::MAX,
        )?;
        sched.finish(primary.child.id(), &mut pt);
        // A window cut short means the primary stopped: a failover, which
        // with both daemons alive is a false takeover. Not a measurement.
        let b = status(backup.console).unwrap_or_default();
        if b.contains("after failover") {
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
        let s = status(primary.console).context("the primary stopped answering")?;
        if !s.contains("\"protected\":true") {
            bail!(
                "the primary lost its backup during the window; see {}",
                primary.log.display()
            );
        }
        drop(backup);
        drop(primary);
        let f = |k: &str| field(&s, k).unwrap_or(f64::NAN);
        pt.epochs = f("samples");
        pt.pause_p50_us = f("pause_p50_us");
        pt.pause_p99_us = f("pause_p99_us");
        pt.pause_max_us = f("pause_max_us");
        pt.harvest_p50_us = f("harvest_p50_us");
        pt.copy_p50_us = f("copy_p50_us");
        pt.capture_p50_us = f("capture_p50_us");
        pt.encode_p50_us = f("encode_p50_us");
        pt.encode_p99_us = f("encode_p99_us");
        pt.dirty_pages = f("dirty_pages_mean");
        pt.bytes_per_epoch = f("bytes_per_epoch");
        pt.raw_per_epoch = f("raw_bytes_per_epoch");
        pt.ack_p50_us = f("ack_p50_us");
        pt.ack_p99_us = f("ack_p99_us");
        pt.release_p50_us = f("release_p50_us");
        pt.release_p99_us = f("release_p99_us");
        pt.epochs_waited = f("epochs_waited");
        pt.precopied = f("precopied_mean");
        // Guest time of the window: from the first line's clock on.
        let lines = progress_lines(&buf);
        pt.ops_per_s = throughput(&lines, 0, u64::MAX);
        if pt.epochs < 1.0 {
            bail!("no checkpoint in the window");
        }
        Ok(())
    })();
    if let Err(e) = r {
        pt.error = Some(format!("{e:#}"));
    }
    pt
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

/// The kind of each workload (sparse, pages, ...) from the recorded
/// settings (`--workload KIND,...`).
fn kinds_of(settings: &Settings) -> Vec<(String, String)> {
    settings
        .workloads
        .iter()
        .map(|(label, args)| {
            let kind = args
                .strip_prefix("--workload ")
                .and_then(|w| w.split(',').next())
                .unwrap_or("kernel");
            (label.clone(), kind.to_string())
        })
        .collect()
}

fn rerender(a: &BenchArgs, from: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    let bad = || {
        format!(
            "{} is not the points.json of a castor bench run",
            from.display()
        )
    };
    let mut v: serde_json::Value = serde_json::from_str(&text).with_context(bad)?;
    // NaN figures were written as null: drop them so that they read back as NaN.
    if let Some(points) = v.get_mut("points").and_then(|p| p.as_array_mut()) {
        for p in points.iter_mut().filter_map(|p| p.as_object_mut()) {
            p.retain(|_, x| !x.is_null());
        }
    }
    let results: Results = serde_json::from_value(v).with_context(bad)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating the output directory {}", a.out.display()))?;
    crate::report::write_all(&a.out, &results, &kinds_of(&results.settings))?;
    if !a.no_plots {
        crate::plots::draw_all(&a.out, &results)?;
    }
    println!("{}", std::fs::read_to_string(a.out.join("summary.md"))?);
    Ok(())
}

/// `castor bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    if let Some(from) = &a.from_json {
        return rerender(&a, from);
    }
    let p = plan(&a)?;
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating the output directory {}", a.out.display()))?;
    let logs = a.out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("pki");
    protocol::certs::create(&certs, &["node-a".into(), "node-b".into()], false)?;

    let per_load = 1 + p.epochs.len() * (1 + p.modes.len());
    let total =
        (p.loads.len() * per_load) as u64 + p.failovers as u64 * p.failover_modes.len() as u64;
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let say = |pb: &ProgressBar, s: String| {
        if pb.is_hidden() {
            println!("{s}");
        } else {
            pb.println(s);
        }
    };
    let link = protocol::link::LinkShape {
        rate_bytes_per_s: a.link_rate.0,
        delay: a.link_delay,
    };
    say(
        &pb,
        format!(
            "castor bench: {} workloads x {} modes x {:?} ms epochs, {} MiB, {} vCPU(s), link {link}; window {:?} after {:?} warm-up; results in {}",
            p.loads.len(),
            p.modes.len(),
            p.epochs,
            a.mem >> 20,
            a.vcpus,
            p.measure,
            p.warmup,
            a.out.display()
        ),
    );
    let mut points: Vec<Point> = Vec::new();
    let report = |pb: &ProgressBar, pt: &Point| {
        let line = match &pt.error {
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
        };
        say(pb, line);
    };
    for load in &p.loads {
        pb.set_message(format!("{} unprotected", load.label));
        let base = baseline(
            &a,
            &p,
            load,
            None,
            &logs.join(format!("{}-unprotected.log", load.label)),
        );
        report(&pb, &base);
        pb.inc(1);
        let unprotected = base.ops_per_s;
        points.push(base);
        for &e in &p.epochs {
            pb.set_message(format!("{} tracking {e} ms", load.label));
            let mut tr = baseline(
                &a,
                &p,
                load,
                Some(e),
                &logs.join(format!("{}-tracking-{e}.log", load.label)),
            );
            tr.vs_unprotected = tr.ops_per_s / unprotected;
            report(&pb, &tr);
            pb.inc(1);
            let tracking = tr.ops_per_s;
            points.push(tr);
            for &m in &p.modes {
                pb.set_message(format!("{} {m} {e} ms", load.label));
                let mut pt = protected(&a, &p, load, m, e, &certs, &logs);
                pt.vs_unprotected = pt.ops_per_s / unprotected;
                pt.vs_tracking = pt.ops_per_s / tracking;
                report(&pb, &pt);
                pb.inc(1);
                points.push(pt);
            }
        }
    }

    // Failover drills, outside the post-resync grace (see docs/design.md).
    let mut failovers = Vec::new();
    let mut failover_errors = Vec::new();
    let drill_load = parse_workload("sparse,rate=50000,interval_ms=2").expect("valid workload");
    let epoch = p.epochs[0];
    for &m in &p.failover_modes {
        if p.failovers == 0 {
            break;
        }
        pb.set_message(format!("failover drill {m}"));
        let mut args = vec![
            "--mode".to_string(),
            m.to_string(),
            "--epoch-ms".into(),
            epoch.to_string(),
        ];
        args.extend(p.link_args.iter().cloned());
        let plan = pair::DrillPlan {
            rounds: p.failovers,
            workload: drill_load.clone(),
            mem: a.mem,
            vcpus: a.vcpus,
            protect_args: args,
            settle: Duration::from_millis(2500),
        };
        let mut got = Vec::new();
        let r = pair::run_drill(&plan, &mut |r| {
            pb.inc(1);
            if let Some(ms) = r.failover_ms.filter(|_| r.ok()) {
                got.push(Failover {
                    mode: m.to_string(),
                    round: r.round,
                    ms,
                });
            }
        });
        let mut v: Vec<f64> = got.iter().map(|f| f.ms).collect();
        say(
            &pb,
            format!(
                "  failover    {:<11} {epoch:>3} ms  {} rounds: p50 {:.1} ms, p99 {:.1} ms",
                m.to_string(),
                got.len(),
                pair::pct(&mut v.clone(), 0.5),
                pair::pct(&mut v, 0.99)
            ),
        );
        failovers.extend(got);
        if let Err(e) = r {
            say(&pb, format!("  failover    {m}: FAILED: {e:#}"));
            failover_errors.push(format!("{m}: {e:#}"));
        }
    }
    pb.finish_and_clear();

    let results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started: now_utc(),
        host: host(),
        settings: Settings {
            mem_mib: a.mem >> 20,
            vcpus: a.vcpus,
            link: link.to_string(),
            warmup_ms: p.warmup.as_millis() as u64,
            measure_ms: p.measure.as_millis() as u64,
            workloads: p
                .loads
                .iter()
                .map(|l| (l.label.clone(), l.args.join(" ")))
                .collect(),
        },
        points,
        failovers,
        failover_errors,
        wall_s: t0.elapsed().as_secs_f64(),
    };
    crate::report::write_all(&a.out, &results, &kinds_of(&results.settings))?;
    if !a.no_plots {
        crate::plots::draw_all(&a.out, &results)?;
    }
    let md = std::fs::read_to_string(a.out.join("summary.md"))?;
    println!("{md}");
    println!(
        "castor bench: {} points, {} failovers in {:.0} s; results in {}",
        results.points.len(),
        results.failovers.len(),
        results.wall_s,
        a.out.display()
    );
    let failed: Vec<&Point> = results
        .points
        .iter()
        .filter(|p| p.error.is_some())
        .collect();
    if !failed.is_empty() || !results.failover_errors.is_empty() {
        bail!(
            "{} points and {} drills failed (see summary.md and {})",
            failed.len(),
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
