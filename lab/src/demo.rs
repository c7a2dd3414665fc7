//! `castor demo`: a local HA pair on loopback, a failover, and its report.
//!
//! Runs two castor processes (backup, then primary) with certificates made
//! in a temporary directory, attaches a console client to the primary,
//! SIGKILLs the primary, re-attaches the client to the survivor at the next
//! byte offset, and reports what happened.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use node::{PrimaryStatus, Status};

use crate::cli::parse_duration;
use crate::console::{continuity, Continuity};
use crate::pair::{
    self, guest_args, kill_and_follow, read_console, start_witness, wait_status, GuestArgs, Pair,
    Takeover, WitnessKind,
};

/// `castor demo` settings.
#[derive(Args)]
pub struct DemoArgs {
    /// How long the pair runs before the primary is killed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub run_for: Duration,
    /// How long the survivor is watched after the failover.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub watch_for: Duration,
    /// The guest and its encoding.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// The pair's witness: a local etcd started for the demo, or none.
    #[arg(long, value_enum, default_value = "etcd")]
    pub witness: WitnessKind,
}

/// What the demo saw.
struct Seen {
    /// The primary's figures just before the kill (NaN when it did not answer).
    before: Option<PrimaryStatus>,
    /// The survivor's status after the watch.
    after: Option<Status>,
    takeover: Takeover,
    /// The whole console stream.
    stream: Vec<u8>,
    /// Bytes read from the primary before the kill.
    offset: u64,
    continuity: Continuity,
}

/// `castor demo`.
pub fn demo(a: DemoArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pair = Pair::in_dir(tmp.path(), ["node-a", "node-b"])?;
    let (pair, etcd) = start_witness(a.witness, pair, tmp.path())?;
    println!(
        "castor demo: a local HA pair on loopback (certificates in {}; witness: {})",
        pair.certs.display(),
        etcd.as_ref()
            .map_or("none".to_string(), |e| format!("etcd at {}", e.endpoint()))
    );
    let seen = run(&a, &pair)?;
    print_report(&a, &seen);
    let failed = !seen.continuity.ok() || seen.takeover.first.is_none();
    if std::env::var_os("CASTOR_DEMO_KEEP").is_some() {
        println!("  logs                {}", tmp.keep().display());
        return Ok(());
    }
    if failed {
        bail!(
            "the demo failed: see the logs in {} (kept)",
            tmp.keep().display()
        );
    }
    Ok(())
}

/// Starts the pair, runs it, kills the primary and watches the survivor.
fn run(a: &DemoArgs, pair: &Pair) -> Result<Seen> {
    let mut args = guest_args(a.guest.mem, a.guest.vcpus, &a.guest.workload);
    args.extend([
        "--mode".into(),
        a.guest.mode.to_string(),
        "--epoch-ms".into(),
        a.epoch_ms.to_string(),
    ]);
    let (mut backup, mut primary) = pair.start(&[], &args, ["backup.log", "primary.log"])?;
    let t_start = Instant::now();
    println!("  primary (node-a) and backup (node-b) starting; waiting for protection ...");
    wait_status(
        &primary,
        "the primary to be protected",
        Duration::from_secs(60),
        pair::protected,
    )?;
    println!(
        "  protected after {:.1} s; running for {:?}",
        t_start.elapsed().as_secs_f64(),
        a.run_for
    );
    let mut stream = Vec::new();
    read_console(
        primary.console,
        0,
        &mut stream,
        Instant::now() + a.run_for,
        u64::MAX,
    )?;
    let before = primary.status().map(|s| s.figures());
    let offset = stream.len() as u64;
    let takeover = kill_and_follow(&mut primary, &backup, &mut stream, a.watch_for)?;
    let after = backup.status();
    backup.kill();
    let continuity = continuity(&stream);
    Ok(Seen {
        before,
        after,
        takeover,
        stream,
        offset,
        continuity,
    })
}

fn print_report(a: &DemoArgs, seen: &Seen) {
    let nan = f64::NAN;
    let f = |g: fn(&PrimaryStatus) -> f64| seen.before.as_ref().map_or(nan, g);
    println!();
    println!("castor demo report");
    println!(
        "  workload            {} on {} vCPU(s), {} MiB, mode {}, {} ms epochs",
        a.guest.workload,
        a.guest.vcpus,
        a.guest.mem >> 20,
        a.guest.mode,
        a.epoch_ms
    );
    println!("  epochs              {:.0}", f(|p| p.epochs as f64));
    println!(
        "  pause               p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        f(|p| p.pause_p50_us),
        f(|p| p.pause_p99_us),
        f(|p| p.pause_max_us)
    );
    let (sent, raw) = (f(|p| p.bytes_per_epoch), f(|p| p.raw_bytes_per_epoch));
    println!(
        "  bytes per epoch     {:.0} sent vs {:.0} raw ({:.1}x fewer), {:.1} dirty pages",
        sent,
        raw,
        raw / sent.max(1.0),
        f(|p| p.dirty_pages_mean)
    );
    println!(
        "  ack latency         p50 {:.0} us, p99 {:.0} us",
        f(|p| p.ack_p50_us),
        f(|p| p.ack_p99_us)
    );
    match seen.takeover.ms() {
        Some(ms) => println!(
            "  failover            {ms:.1} ms (SIGKILL of the primary -> first console byte the survivor produced)"
        ),
        None => println!(
            "  failover            NO console output from the survivor within {:?}",
            a.watch_for
        ),
    }
    println!(
        "  survivor            {}",
        seen.after
            .as_ref()
            .map_or("did not answer".into(), |s| format!(
                "{}, resumed at console offset {}, {} bytes released since",
                s.role,
                s.resumed_at.unwrap_or_default(),
                s.console_released - s.resumed_at.unwrap_or_default()
            ))
    );
    println!(
        "  console             {} bytes, {} progress lines, {} before the kill",
        seen.stream.len(),
        seen.continuity.lines,
        seen.offset
    );
    if seen.continuity.ok() && seen.takeover.first.is_some() {
        println!("  continuity          OK: no gap, no duplicate on any vCPU");
    } else {
        for p in seen.continuity.problems.iter().take(10) {
            println!("  continuity          BROKEN: {p}");
        }
    }
}
