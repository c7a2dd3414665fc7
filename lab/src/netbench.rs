//! Two sections of `castor bench` beside its matrix, each run on its own:
//!
//! - `--net`: the guest's key-value service over its virtio-net card, with
//!   the load generator in a client namespace: request latency and rate
//!   unprotected and protected at several fixed epoch lengths and with
//!   `--epoch-ms auto` (the epoch it chose), the parts of the protected
//!   latency (pause, encode, ack, release), the link's bytes a second, the
//!   floor it is compared with (half an epoch, an ack round trip, the
//!   checkpoint's transmission) and the client-seen failover gap of a
//!   SIGKILL.
//! - `--reuse`: re-protection of a 1 GiB guest after a failover, when the
//!   killed node comes back as the backup over the image it kept, with 1 %,
//!   10 % and 50 % of the pages changed since, beside the full resync.
//!
//! Both print a Markdown table and write it to the output directory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::BenchArgs;
use crate::loadgen::{Config as LoadConfig, Loadgen};
use crate::netlab::NetLab;
use crate::pair::{self, start_witness, wait_status, Pair, WitnessKind};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Requests per second the client offers in the network section.
const RATE: f64 = 2000.0;
/// The measurement window.
const WINDOW: Duration = Duration::from_secs(5);

/// The guest service a section measures: `net` (in memory) or `kvdisk`
/// (every PUT appended to a log on the disk and flushed before its reply).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Service {
    /// The workload's name.
    pub workload: &'static str,
    /// Each node's disk in MiB (0: no disk).
    pub disk_mib: u64,
    /// Share of PUTs in the client's requests.
    pub put_ratio: f64,
    /// Requests a second the client offers (0: as many as its outstanding
    /// requests allow).
    pub rate: f64,
    /// Requests outstanding at most.
    pub concurrency: usize,
}

/// The network section's service.
pub(crate) const NET: Service = Service {
    workload: "net",
    disk_mib: 0,
    put_ratio: 0.5,
    rate: RATE,
    // Enough outstanding requests that the client never waits for a reply
    // to send (open loop): at 2,000 req/s a 50 ms epoch holds 100.
    concurrency: 256,
};

fn new_disk(path: &Path, mib: u64) -> Result<std::path::PathBuf> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(mib << 20))
        .with_context(|| format!("creating the disk {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// One row of the network section.
#[derive(Debug, Default)]
pub(crate) struct NetRow {
    pub(crate) setting: String,
    /// Protected: the epoch length (under auto, the p50 of those it chose).
    pub(crate) epoch_ms: Option<f64>,
    /// Under auto: the shortest and longest chosen, and what decided the last.
    pub(crate) auto: Option<(f64, f64, String)>,
    pub(crate) req_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) pause_p50_ms: f64,
    pub(crate) pause_p99_ms: f64,
    pub(crate) bytes_per_s: f64,
    pub(crate) encode_p50_ms: f64,
    pub(crate) ack_p50_ms: f64,
    pub(crate) release_p50_ms: f64,
    pub(crate) bytes_per_epoch: f64,
    pub(crate) disk_bytes_per_epoch: f64,
    pub(crate) disk_blocks: f64,
    pub(crate) gap_ms: Option<f64>,
    pub(crate) violations: u64,
    /// The check of the client's whole history (`None`: not run).
    pub(crate) linearizability: Option<crate::loadgen::Linearizability>,
}

impl NetRow {
    /// The client saw a violation, or its history is not linearizable.
    pub(crate) fn failed(&self) -> bool {
        self.violations > 0
            || self
                .linearizability
                .as_ref()
                .is_some_and(|l| l.verdict == crate::loadgen::LinVerdict::No)
    }
}

pub(crate) fn lab() -> Result<crate::netlab::NetGuard> {
    let pid = std::process::id();
    NetLab::unique(
        &format!("cb{}", pid % 100_000),
        (81, (pid % 200 + 20) as u8),
    )
    .up_scoped()
    .context("the network section sets up a guest network (needs root)")
}

fn load(lab: &NetLab, svc: &Service) -> LoadConfig {
    LoadConfig {
        target: lab.guest_service(),
        netns: Some(lab.netns.clone()),
        rate: svc.rate,
        put_ratio: svc.put_ratio,
        concurrency: svc.concurrency,
        timeout: Duration::from_millis(100),
        // Each row boots a fresh guest.
        fresh: true,
        ..Default::default()
    }
}

/// The unprotected guest: `castor run` with the tap, the client for a window.
/// With `track_ms`, KVM's dirty log is on and harvested every so many ms,
/// nothing checkpointed (`castor run --track-ms`): the platform's own cost.
pub(crate) fn unprotected(
    a: &BenchArgs,
    lab: &NetLab,
    logs: &Path,
    svc: &Service,
    track_ms: Option<u64>,
) -> Result<NetRow> {
    let ip = lab.guest_addr.to_string();
    let mut args = strings(&[
        "run",
        "--mem",
        &format!("{}M", a.mem >> 20),
        "--vcpus",
        "1",
        "--workload",
        &format!("{},ip={ip}", svc.workload),
        "--tap",
        &lab.taps[0],
    ]);
    if let Some(ms) = track_ms {
        args.extend(["--track-ms".into(), ms.to_string()]);
    }
    let tmp = tempfile::tempdir()?;
    if svc.disk_mib > 0 {
        let d = new_disk(&tmp.path().join("disk.img"), svc.disk_mib)?;
        args.extend(["--disk".into(), d.display().to_string()]);
    }
    let mut child = std::process::Command::new(pair::castor_exe()?)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(
            logs.join(format!("{}-unprotected.log", svc.workload)),
        )?)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let lg = Loadgen::start(load(lab, svc))?;
    // As the protected rows: acknowledged requests over the window, after
    // a second of warm-up.
    std::thread::sleep(Duration::from_secs(1));
    let before = lg.report_so_far();
    std::thread::sleep(WINDOW);
    let mid = lg.report_so_far();
    let r = lg.stop();
    let _ = child.kill();
    let _ = child.wait();
    let acked = mid.counts.acked.saturating_sub(before.counts.acked);
    Ok(NetRow {
        setting: match track_ms {
            None => "unprotected (castor run)".into(),
            Some(ms) => format!("dirty tracking only, {ms} ms"),
        },
        req_per_s: acked as f64 / WINDOW.as_secs_f64(),
        p50_ms: mid.latency.p50_ms,
        p99_ms: mid.latency.p99_ms,
        violations: r.violations,
        linearizability: r.linearizability,
        ..Default::default()
    })
}

/// An epoch setting of the section: fixed milliseconds, or `None`: auto.
pub(crate) type Epoch = Option<u64>;

pub(crate) fn epoch_arg(e: Epoch) -> String {
    e.map_or("auto".into(), |ms| ms.to_string())
}

/// The protected pair at `epoch`: a window of load, then a SIGKILL of the
/// primary with the load running.
pub(crate) fn protected(
    a: &BenchArgs,
    lab: &NetLab,
    epoch: Epoch,
    dir: &Path,
    link: &[String],
    svc: &Service,
) -> Result<NetRow> {
    let mut pair = Pair::in_dir(dir, ["node-a", "node-b"])?
        .with_taps([lab.taps[0].clone(), lab.taps[1].clone()]);
    if svc.disk_mib > 0 {
        pair = pair.with_disks([
            new_disk(&dir.join("a.img"), svc.disk_mib)?,
            new_disk(&dir.join("b.img"), svc.disk_mib)?,
        ]);
    }
    let (pair, _etcd) = start_witness(WitnessKind::Etcd, pair, dir)?;
    let mut both = strings(&["--epoch-ms", &epoch_arg(epoch)]);
    both.extend(link.iter().cloned());
    let ip = lab.guest_addr.to_string();
    let guest = strings(&[
        "--mem",
        &format!("{}M", a.mem >> 20),
        "--vcpus",
        "1",
        "--workload",
        &format!("{},ip={ip}", svc.workload),
    ]);
    let (backup, mut primary) = pair.start(&both, &guest, ["b.log", "a.log"])?;
    wait_status(
        &primary,
        "the primary to be protected",
        Duration::from_secs(90),
        pair::protected_after(20),
    )?;
    let lg = Loadgen::start(load(lab, svc))?;
    std::thread::sleep(Duration::from_secs(1));
    primary.control(&node::control::Request::Reset)?;
    let before = lg.report_so_far();
    std::thread::sleep(WINDOW);
    let mid = lg.report_so_far();
    let s = primary.status().context("the primary stopped answering")?;
    if !s.protected() {
        bail!("the primary lost its backup during the window");
    }
    let f = s.figures();
    // The failover, under load.
    lg.mark_at("kill", Instant::now());
    primary.kill();
    let t = Instant::now();
    let gap = loop {
        let r = lg.report_so_far();
        if let Some(g) = r.marks.first().and_then(|m| m.gap_ms) {
            break Some(g);
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Replies keep coming a while: the gap is the longest silence from
    // the last reply before the kill on.
    std::thread::sleep(Duration::from_secs(1));
    let gap = gap.and(lg.report_so_far().marks.first().and_then(|m| m.gap_ms));
    let end = lg.stop();
    drop(backup);
    let acked = mid.counts.acked.saturating_sub(before.counts.acked);
    let auto = f.epoch_auto.as_ref().map(|x| {
        (
            x.chosen_min_ms,
            x.chosen_max_ms,
            if x.capped {
                format!("{}, capped", x.bound)
            } else {
                x.bound.clone()
            },
        )
    });
    Ok(NetRow {
        setting: match epoch {
            Some(ms) => format!("protected, {ms} ms epochs"),
            None => "protected, auto epochs".into(),
        },
        epoch_ms: Some(match (&f.epoch_auto, epoch) {
            (Some(x), _) => x.chosen_p50_ms,
            (None, Some(ms)) => ms as f64,
            (None, None) => bail!("the primary did not report its auto epoch"),
        }),
        auto,
        req_per_s: acked as f64 / WINDOW.as_secs_f64(),
        // Latency over the whole run before the kill (the window and the
        // second before it).
        p50_ms: mid.latency.p50_ms,
        p99_ms: mid.latency.p99_ms,
        pause_p50_ms: f.pause_p50_us / 1e3,
        pause_p99_ms: f.pause_p99_us / 1e3,
        bytes_per_s: f.bytes_per_s,
        encode_p50_ms: f.encode_p50_us / 1e3,
        ack_p50_ms: f.ack_p50_us / 1e3,
        release_p50_ms: f.release_p50_us / 1e3,
        bytes_per_epoch: f.bytes_per_epoch,
        disk_bytes_per_epoch: f.disk_bytes_per_epoch,
        disk_blocks: f.disk_blocks_mean,
        gap_ms: gap,
        violations: end.violations,
        linearizability: end.linearizability,
    })
}

/// `castor bench --net`.
pub fn net(a: &BenchArgs, link: &[String], link_bytes_per_s: Option<u64>) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let logs = a.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let lab = lab()?;
    println!(
        "castor bench --net: the guest's key-value service, {} MiB, 1 vCPU; client {} req/s (open loop: up to 256 outstanding, retry after 100 ms), in a network namespace; replication link {}",
        a.mem >> 20,
        RATE,
        link.join(" ")
    );
    let mut rows = vec![unprotected(a, &lab, &logs, &NET, None)?];
    println!("  {}", row_line(&rows[0], link_bytes_per_s));
    // The fixed lengths, then auto.
    let fixed = if a.epochs.is_empty() {
        vec![10, 25, 50, 100]
    } else {
        a.epochs.clone()
    };
    for e in fixed.into_iter().map(Some).chain([None]) {
        let tmp = tempfile::tempdir()?;
        let r = protected(a, &lab, e, tmp.path(), link, &NET)
            .with_context(|| format!("protected at --epoch-ms {}", epoch_arg(e)))?;
        println!("  {}", row_line(&r, link_bytes_per_s));
        rows.push(r);
    }
    let md = net_table(&rows, link_bytes_per_s);
    println!("\n{md}");
    std::fs::write(a.out.join("net.md"), &md)?;
    if rows.iter().any(NetRow::failed) {
        bail!(
            "the client saw violations or a history that is not linearizable: see {} and the lines above",
            a.out.join("net.md").display()
        );
    }
    Ok(())
}

/// Half an epoch, an ack round trip and the checkpoint's transmission.
pub(crate) fn floor_ms(r: &NetRow, rate: Option<u64>) -> Option<f64> {
    let e = r.epoch_ms?;
    let tx = rate.map_or(0.0, |b| r.bytes_per_epoch / b as f64 * 1e3);
    Some(e / 2.0 + r.pause_p50_ms + r.ack_p50_ms + tx)
}

/// The epoch column: the length, or auto's p50, range and bound.
pub(crate) fn epoch_cell(r: &NetRow) -> String {
    match (r.epoch_ms, &r.auto) {
        (None, _) => "—".into(),
        (Some(e), None) => format!("{e:.0} ms"),
        (Some(e), Some((lo, hi, why))) => format!("{e:.0} ms ({lo:.0}–{hi:.0}; {why})"),
    }
}

pub(crate) fn row_line(r: &NetRow, rate: Option<u64>) -> String {
    format!(
        "{:<28} {:>7.0} req/s  latency p50 {:>6.2} ms, p99 {:>6.2} ms{}{}{}{}",
        r.setting,
        r.req_per_s,
        r.p50_ms,
        r.p99_ms,
        floor_ms(r, rate).map_or(String::new(), |f| format!(" (floor {f:.2} ms)")),
        r.epoch_ms.map_or(String::new(), |_| format!(
            "; epoch {}, pause p50 {:.2} / p99 {:.2} ms, {:.2} MB/s on the link",
            epoch_cell(r),
            r.pause_p50_ms,
            r.pause_p99_ms,
            r.bytes_per_s / 1e6
        )),
        r.gap_ms
            .map_or(String::new(), |g| format!("; failover gap {g:.1} ms")),
        r.linearizability.as_ref().map_or(String::new(), |l| {
            let mut s = format!("; {}", l.line);
            for d in &l.detail {
                s.push_str("\n      ");
                s.push_str(d);
            }
            s
        })
    )
}

fn net_table(rows: &[NetRow], rate: Option<u64>) -> String {
    let mut s = String::from(
        "| setting | epoch (auto: p50, range; bound) | req/s | latency p50 | p99 | floor | pause p50 | pause p99 | encode p50 | ack p50 | release p50 | wait for the epoch's end (p50 − release − pause) | link | client-seen failover gap | violations |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ms = |v: f64| format!("{v:.2} ms");
        let prot = r.epoch_ms.is_some();
        s.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.setting,
            epoch_cell(r),
            r.req_per_s,
            ms(r.p50_ms),
            ms(r.p99_ms),
            floor_ms(r, rate).map_or("—".into(), ms),
            if prot {
                ms(r.pause_p50_ms)
            } else {
                "—".into()
            },
            if prot {
                ms(r.pause_p99_ms)
            } else {
                "—".into()
            },
            if prot {
                ms(r.encode_p50_ms)
            } else {
                "—".into()
            },
            if prot { ms(r.ack_p50_ms) } else { "—".into() },
            if prot {
                ms(r.release_p50_ms)
            } else {
                "—".into()
            },
            if prot {
                ms((r.p50_ms - r.release_p50_ms - r.pause_p50_ms).max(0.0))
            } else {
                "—".into()
            },
            if prot {
                format!("{:.2} MB/s", r.bytes_per_s / 1e6)
            } else {
                "—".into()
            },
            r.gap_ms.map_or("—".into(), |g| format!("{g:.1} ms")),
            r.violations
        ));
    }
    s
}

/// One row of the reuse section.
#[derive(Debug)]
struct ReuseRow {
    changed: String,
    reused: bool,
    pages_sent: u64,
    pages: u64,
    bytes: u64,
    pause_ms: f64,
    offer_ms: f64,
    protected_ms: Option<f64>,
    window_ms: f64,
    /// The first session's full resync of the filled guest (same run).
    full: Option<node::ResyncStatus>,
}

/// A 1 GiB pair whose guest fills its RAM (the `verify` workload over
/// 1000 MiB: every 4 KiB block written at start) and then rewrites random
/// blocks at `rate` a second; the primary is killed, the survivor runs 2 s
/// alone, and the killed node comes back as the backup (over its image with
/// `reuse`).
fn reprotect(rate: u64, reuse: bool, dir: &Path, link: &[String]) -> Result<ReuseRow> {
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?;
    let (pair, _etcd) = start_witness(WitnessKind::Etcd, pair, dir)?;
    let mut both = strings(&["--image-dir", &dir.join("images").display().to_string()]);
    both.extend(link.iter().cloned());
    let guest = strings(&[
        "--mem",
        "1G",
        "--vcpus",
        "1",
        "--workload",
        &format!("verify,rate={rate},mib=1000"),
    ]);
    // The primary alone first, until its guest has filled its RAM (the
    // workload's first progress line): the backup then starts with a full
    // resync of a populated guest, as after any long unprotected run.
    let mut args = both.clone();
    args.extend(guest);
    let mut primary = pair.start_primary(0, &args, "a-0.log")?;
    let t = Instant::now();
    loop {
        let mut console = Vec::new();
        let _ = crate::pair::read_console(
            primary.console,
            0,
            &mut console,
            Instant::now() + Duration::from_millis(500),
            u64::MAX,
        );
        if crate::console::progress_lines(&console)
            .iter()
            .any(|p| p.seq >= 2)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the guest did not fill its RAM within 60 s");
        }
    }
    // A 200 ms failure detector on the backups: this section measures
    // re-protection under a writer of up to ~360 MB/s on 2 cores, where the
    // default 30 ms detector has taken over from a live primary (safely:
    // the witness fenced it) and spoilt the run.
    both.extend(strings(&["--heartbeat-timeout-ms", "200"]));
    let backup = pair.start_backup(1, &both, "b-0.log")?;
    let first = wait_status(
        &primary,
        "the primary to be protected",
        Duration::from_secs(120),
        pair::protected_after(10),
    )?;
    let full = first.primary.and_then(|p| p.last_resync);
    let killed = Instant::now();
    primary.kill();
    wait_status(&backup, "the takeover", Duration::from_secs(30), |s| {
        s.role == node::Role::TakenOver
    })?;
    // The survivor's guest rewrites its working set meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let mut args = both.clone();
    if reuse {
        args.push("--reuse".into());
    }
    let _new = pair.start_backup(0, &args, "a-1.log")?;
    let s = wait_status(
        &backup,
        "protected again",
        Duration::from_secs(120),
        pair::protected,
    )?;
    let r = s
        .primary
        .and_then(|p| p.last_resync)
        .context("no resync figures")?;
    Ok(ReuseRow {
        changed: String::new(),
        reused: r.reused,
        pages_sent: r.pages_sent,
        pages: r.pages,
        bytes: r.bytes,
        pause_ms: r.pause_ms,
        offer_ms: r.offer_ms,
        protected_ms: r.protected_ms,
        window_ms: killed.elapsed().as_secs_f64() * 1e3,
        full,
    })
}

/// `castor bench --reuse`.
pub fn reuse(a: &BenchArgs, link: &[String]) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    println!(
        "castor bench --reuse: a 1 GiB guest with its RAM filled, rewriting random 4 KiB blocks so that ~1 %, ~10 % or ~50 % change in 2 s; SIGKILL of the primary, 2 s alone, the killed node back as the backup; link {}",
        link.join(" ")
    );
    let mut rows = Vec::new();
    // The guest's pacing decides how many blocks change before the resync
    // pause; each row says what fraction was actually sent.
    for (label, rate, reuse) in [
        ("~1 %", 1_300u64, true),
        ("~10 %", 5_000, true),
        ("~50 %", 20_000, true),
    ] {
        let tmp = tempfile::tempdir()?;
        let mut r = match reprotect(rate, reuse, tmp.path(), link) {
            Ok(r) => {
                if std::env::var_os("CASTOR_KEEP_LOGS").is_some() {
                    println!("  logs kept in {}", tmp.keep().display());
                }
                r
            }
            Err(e) => {
                let kept = tmp.keep();
                return Err(e).with_context(|| {
                    format!(
                        "re-protection with {label} changed (logs kept in {})",
                        kept.display()
                    )
                });
            }
        };
        r.changed = if r.reused {
            format!(
                "{label} ({:.2} % of pages sent)",
                100.0 * r.pages_sent as f64 / r.pages.max(1) as f64
            )
        } else {
            format!("{label}, full resync")
        };
        println!(
            "  {:<20} {} {:>6} of {} pages, {:>7.1} MiB, pause {:>6.1} ms, offer {:>6.1} ms, hello -> protected {}, SIGKILL -> protected {:.0} ms",
            r.changed,
            if r.reused { "reuse" } else { "full " },
            r.pages_sent,
            r.pages,
            r.bytes as f64 / (1 << 20) as f64,
            r.pause_ms,
            r.offer_ms,
            r.protected_ms.map_or("-".into(), |m| format!("{m:.0} ms")),
            r.window_ms
        );
        rows.push(r);
    }
    if let Some(f) = rows.iter().find_map(|r| r.full.clone()) {
        rows.push(ReuseRow {
            changed: "(the filled guest's first session)".into(),
            reused: false,
            pages_sent: f.pages_sent,
            pages: f.pages,
            bytes: f.bytes,
            pause_ms: f.pause_ms,
            offer_ms: f.offer_ms,
            protected_ms: f.protected_ms,
            window_ms: f64::NAN,
            full: None,
        });
    }
    let mut md = String::from("| changed since the failover | first checkpoint | pages sent | bytes | guest paused | hello → offer | hello → protected | SIGKILL → protected |\n|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(
            &format!(
                "| {} | {} | {} of {} | {:.1} MiB | {:.1} ms | {} | {} | {:.0} ms |\n",
                r.changed,
                if r.reused { "reuse" } else { "full resync" },
                r.pages_sent,
                r.pages,
                r.bytes as f64 / (1 << 20) as f64,
                r.pause_ms,
                if r.reused {
                    format!("{:.1} ms", r.offer_ms)
                } else {
                    "—".into()
                },
                r.protected_ms.map_or("—".into(), |m| format!("{m:.0} ms")),
                r.window_ms
            )
            .replace("| NaN ms |", "| — |"),
        );
    }
    println!("\n{md}");
    std::fs::write(a.out.join("reuse.md"), &md)?;
    Ok(())
}
