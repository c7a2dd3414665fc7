//! `castor drill`: repeated failovers of a local pair. Each round SIGKILLs
//! the current primary at a random moment, lets the backup take over,
//! checks the console's continuity, and starts a new backup where the dead
//! primary was. The bench's failover drills run here too.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use guest::Workload;
use rand::Rng;

use crate::console::continuity;
use crate::faults::{self, Fault, FaultRound};
use crate::pair::{
    self, guest_args, kill_and_follow, read_console, start_witness, wait_status, GuestArgs, Pair,
    WitnessKind,
};
use node::stats::percentile;

/// `castor drill` settings.
#[derive(Args)]
pub struct DrillArgs {
    /// Number of failovers.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// The guest and its encoding.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Send memory digests with every checkpoint and count mismatches.
    #[arg(long)]
    pub verify: bool,
    /// The pair's witness: a local etcd started for the drill, or none.
    #[arg(long, value_enum, default_value = "etcd")]
    pub witness: WitnessKind,
    /// Instead of killing the primary every round, inject these faults in
    /// turn (with an etcd witness and --verify): kill, kill-backup,
    /// pause-primary, pause-backup, witness-down, partition (the nodes then
    /// run in network namespaces; needs root).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Fault>,
}

/// One failover of a drill.
#[derive(Debug, Clone)]
pub struct Round {
    /// Round number, from 1.
    pub round: u32,
    /// The node whose primary was killed.
    pub killed: String,
    /// How long after re-protection (and the settle time) it was killed.
    pub ran_for: Duration,
    /// Failover time: SIGKILL → first console byte the survivor produced.
    pub failover_ms: Option<f64>,
    /// Console gaps or duplicates seen so far.
    pub problems: Vec<String>,
    /// Replica mismatches the survivor reports (with --verify).
    pub mismatches: u64,
}

impl Round {
    /// Whether the round passed: output from the survivor, a continuous
    /// console and no mismatch.
    pub fn ok(&self) -> bool {
        self.failover_ms.is_some() && self.problems.is_empty() && self.mismatches == 0
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
    /// The pair's witness.
    pub witness: WitnessKind,
}

/// Runs a drill; `on_round` sees every round as it ends. Stops at the first
/// failed round and returns an error naming the kept logs.
pub fn run_drill(p: &DrillPlan, on_round: &mut dyn FnMut(&Round)) -> Result<Vec<Round>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?;
    let (pair, _etcd) = start_witness(p.witness, pair, dir)?;
    let extra = &p.protect_args;
    // Node b backs up node a, and after a takeover protects toward node a's port.
    let guest = guest_args(p.mem, p.vcpus, &p.workload);
    let (mut backup, mut primary) = pair.start(extra, &guest, ["b-0.log", "a-0.log"])?;
    let mut primary_idx = 0usize;
    let mut stream = Vec::new();
    let mut rounds = Vec::new();
    let mut rng = rand::rng();
    for round in 1..=p.rounds {
        let protected = wait_status(
            &primary,
            "the primary to be protected",
            Duration::from_secs(60),
            pair::protected_after(10),
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
        let takeover = kill_and_follow(
            &mut primary,
            &backup,
            &mut stream,
            Duration::from_millis(700),
        )?;
        let problems = continuity(&stream).problems;
        let survivor = backup.status();
        let r = Round {
            round,
            killed: pair.names[primary_idx].clone(),
            ran_for: run_for,
            failover_ms: takeover.ms(),
            problems,
            mismatches: survivor
                .and_then(|s| s.backup)
                .map_or(0, |b| b.verify_mismatches),
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
        let new_backup = pair.start_backup(
            dead,
            extra,
            &format!("{}-{round}.log", &pair.names[dead][5..]),
        )?;
        primary = std::mem::replace(&mut backup, new_backup);
    }
    if std::env::var_os("CASTOR_KEEP_LOGS").is_some() {
        println!("drill logs kept in {}", tmp.keep().display());
    }
    Ok(rounds)
}

/// `castor drill --faults …`.
fn fault_drill(a: &DrillArgs) -> Result<()> {
    let names: Vec<String> = a.faults.iter().map(|f| format!("{f:?}")).collect();
    println!(
        "castor drill: {} rounds of {} on {} on {} vCPU(s), mode {}, etcd witness, verifying",
        a.rounds,
        names.join(", "),
        a.guest.workload,
        a.guest.vcpus,
        a.guest.mode
    );
    let tmp = tempfile::tempdir()?;
    let guest = guest_args(a.guest.mem, a.guest.vcpus, &a.guest.workload);
    let extra = vec!["--mode".to_string(), a.guest.mode.to_string()];
    let mut seen: Vec<FaultRound> = Vec::new();
    let result = faults::run(tmp.path(), &a.faults, a.rounds, &guest, &extra, &mut |r| {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        println!(
            "  round {:>3}  {:<13} serving again after {:>9}, protected {:>10} after it ended  {}",
            r.round,
            format!("{:?}", r.fault),
            f(r.recovered_ms),
            f(r.protected_ms),
            if r.problems.is_empty() {
                "one history, one primary".to_string()
            } else {
                r.problems.join("; ")
            }
        );
        seen.push(r.clone());
    });
    println!();
    let mut kinds = a.faults.clone();
    kinds.dedup();
    kinds.sort_by_key(|f| a.faults.iter().position(|g| g == f));
    kinds.dedup();
    for f in &kinds {
        let rs: Vec<&FaultRound> = seen.iter().filter(|r| r.fault == *f).collect();
        let ok = rs.iter().filter(|r| r.problems.is_empty()).count();
        let mut rec: Vec<f64> = rs.iter().filter_map(|r| r.recovered_ms).collect();
        let mut pro: Vec<f64> = rs.iter().filter_map(|r| r.protected_ms).collect();
        println!(
            "  {:<13} {ok} of {} rounds passed; serving again p50 {:.1} / p99 {:.1} ms; protected again (after the fault) p50 {:.0} / p99 {:.0} ms",
            format!("{f:?}"),
            rs.len(),
            percentile(&mut rec.clone(), 0.5),
            percentile(&mut rec, 0.99),
            percentile(&mut pro.clone(), 0.5),
            percentile(&mut pro, 0.99),
        );
    }
    if result.is_err() {
        println!("logs kept in {}", tmp.keep().display());
    }
    result.map(|_| ())
}

/// `castor drill`.
pub fn drill(a: DrillArgs) -> Result<()> {
    if !a.faults.is_empty() {
        return fault_drill(&a);
    }
    let mut extra: Vec<String> = vec!["--mode".into(), a.guest.mode.to_string()];
    if a.verify {
        extra.push("--verify".into());
    }
    println!(
        "castor drill: {} rounds, {} on {} vCPU(s), mode {}, witness {:?}{}",
        a.rounds,
        a.guest.workload,
        a.guest.vcpus,
        a.guest.mode,
        a.witness,
        if a.verify { ", verifying" } else { "" }
    );
    let plan = DrillPlan {
        rounds: a.rounds,
        workload: a.guest.workload.clone(),
        mem: a.guest.mem,
        vcpus: a.guest.vcpus,
        protect_args: extra,
        settle: Duration::ZERO,
        witness: a.witness,
    };
    let mut seen = Vec::new();
    let result = run_drill(&plan, &mut |r| {
        print_round(r);
        if r.ok() {
            seen.extend(r.failover_ms);
        }
    });
    println!();
    println!(
        "castor drill: {} of {} rounds passed{}",
        seen.len(),
        a.rounds,
        failover_figures(&seen)
    );
    result.map(|_| ())
}

fn print_round(r: &Round) {
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
    if r.mismatches > 0 {
        println!("             VERIFY: {} replica mismatches", r.mismatches);
    }
}

/// `; failover p50 …, p99 …, max …` over the failovers that passed (nothing
/// when none did).
fn failover_figures(ms: &[f64]) -> String {
    if ms.is_empty() {
        return String::new();
    }
    let mut v = ms.to_vec();
    format!(
        "; failover p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&mut v, 0.5),
        percentile(&mut v, 0.99),
        ms.iter().cloned().fold(0.0, f64::max),
    )
}
