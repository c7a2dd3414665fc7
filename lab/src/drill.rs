//! `castor drill`: repeated failovers of a local pair. Each round SIGKILLs
//! the current primary at a random moment, lets the backup take over,
//! checks the console's continuity, and starts a new backup where the dead
//! primary was. The bench's failover drills run here too.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use guest::Workload;
use rand::Rng;

use crate::console::continuity;
use crate::faults::{self, Fault, FaultPlan, FaultRound};
use crate::pair::{
    self, guest_args, kill_and_follow, read_console, start_witness, wait_status, Daemon, GuestArgs,
    Pair, WitnessKind,
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
    /// turn into whichever node runs the guest (with an etcd witness and
    /// --verify; the nodes run in network namespaces: needs root): kill,
    /// kill-backup, pause-primary, pause-backup, witness-down, partition,
    /// one-way (the primary's packets to the backup lost), one-way-back
    /// (the backup's to the primary lost), flap (the link down and up every
    /// 100-300 ms), etcd-leader (the primary killed, then the etcd leader
    /// during the claim; three etcd members), slow-etcd (every etcd fsync
    /// 1 s longer, the primary killed meanwhile), or all.
    #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
    pub faults: Vec<FaultSet>,
    /// How long a lasting fault (a pause, a partition, a flapping link, an
    /// outage of etcd or of its leader) lasts, e.g. 2s or 800ms.
    #[arg(long, default_value = "2s", value_parser = crate::cli::parse_duration)]
    pub fault_length: Duration,
    /// Keep the drill's folder (logs, console stream, etcd's data, the
    /// client's history) here; by default a temporary folder, kept only
    /// when a round fails.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Each killed node restarts as the new backup offering the image it
    /// kept (`--image-dir`, `--reuse`): only the pages that changed since
    /// are sent. Without it every re-protection is a full resync.
    #[arg(long)]
    pub reuse: bool,
    /// The disk of each node, in MiB, for a workload with a disk
    /// (`kvdisk`): fresh sparse files in the drill's folder. After the last
    /// round the drill boots a fresh guest from the survivor's disk alone
    /// and reads back every acknowledged key.
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u64,
    /// Packet faults on the replication path for the whole drill, passed to
    /// both daemons (`castor primary --link-faults`), e.g.
    /// loss=2%,dup=1%,reorder=5%.
    #[arg(long)]
    pub link_faults: Option<String>,
    /// What a re-protection's full resync does with the guest's output,
    /// passed to both daemons (`castor primary --resync-output`): `release`
    /// (the default) or `hold`, to measure one against the other.
    #[arg(long, default_value = "release", value_parser = ["release", "hold"])]
    pub resync_output: String,
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
    /// With the `net` workload: what the client saw.
    pub client: Option<ClientRound>,
    /// The pair protected again after the failover (a new backup started
    /// where the killed primary was).
    pub reprotect: Option<Reprotect>,
    /// Before this round's kill, the backup had taken over from a live
    /// primary it found silent (safe with a witness; counted).
    pub false_takeover: bool,
}

/// Re-protection after a failover: the unprotected window.
#[derive(Debug, Clone)]
pub struct Reprotect {
    /// SIGKILL of the primary → the survivor protected again, ms (the new
    /// backup's start-up included).
    pub after_kill_ms: f64,
    /// The new session's first checkpoint: full, or by reuse of the
    /// restarted node's image.
    pub resync: Option<node::ResyncStatus>,
}

/// A round as the key-value client saw it (`net` workload).
#[derive(Debug, Clone)]
pub struct ClientRound {
    /// Last reply before the kill → first reply after it, ms.
    pub gap_ms: Option<f64>,
    /// Violations so far: acknowledged writes lost, replies from lost state.
    pub violations: u64,
    /// Reading back every acknowledged key after the failover.
    pub verify: Option<crate::loadgen::VerifyReport>,
}

impl ClientRound {
    fn ok(&self) -> bool {
        self.gap_ms.is_some()
            && self.violations == 0
            && self.verify.as_ref().is_some_and(|v| v.ok())
    }
}

impl Round {
    /// Whether the round passed: output from the survivor, a continuous
    /// console and no mismatch.
    pub fn ok(&self) -> bool {
        self.failed_over() && self.reprotect.is_some()
    }

    /// The failover part of [`Round::ok`]: output from the survivor, a
    /// continuous console, no mismatch, the client's writes all there.
    pub fn failed_over(&self) -> bool {
        self.failover_ms.is_some()
            && self.problems.is_empty()
            && self.mismatches == 0
            && self.client.as_ref().is_none_or(ClientRound::ok)
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
    /// Restarted nodes offer the image they kept (`--image-dir`, `--reuse`):
    /// re-protection sends only the pages that changed.
    pub reuse: bool,
    /// Each node's disk in MiB, for a workload with a disk (`kvdisk`).
    pub disk_mib: u64,
}

/// Runs a drill; `on_round` sees every round as it ends. Stops at the first
/// failed round and returns an error naming the kept logs.
pub fn run_drill(
    p: &DrillPlan,
    on_round: &mut dyn FnMut(&Round),
    on_client: &mut dyn FnMut(&crate::loadgen::Report),
) -> Result<Vec<Round>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?;
    let (pair, _etcd) = start_witness(p.witness, pair, dir)?;
    let mut extra = p.protect_args.clone();
    if p.reuse {
        extra.extend([
            "--image-dir".to_string(),
            dir.join("images").display().to_string(),
        ]);
    }
    let extra = &extra;
    // The net workload: a guest network with a client namespace, each node
    // with a tap, and a key-value client checking every acknowledged write.
    let mut workload = p.workload.clone();
    let disk = workload.kind.name() == "kvdisk";
    let lab = if workload.kind == guest::Kind::Net || disk {
        let pid = std::process::id();
        let lab = crate::netlab::NetLab::unique(
            &format!("cd{}", pid % 100_000),
            (79, (pid % 200 + 20) as u8),
        )
        .up_scoped()
        .context("the net workload's drill sets up a guest network (needs root)")?;
        workload.ip = Some(lab.guest_addr.octets());
        Some(lab)
    } else {
        None
    };
    let pair = match &lab {
        Some(l) => pair.with_taps([l.taps[0].clone(), l.taps[1].clone()]),
        None => pair,
    };
    let pair = if disk {
        let mut files = Vec::new();
        for n in ["a", "b"] {
            let f = dir.join(format!("disk-{n}.img"));
            std::fs::File::create(&f)
                .and_then(|h| h.set_len(p.disk_mib << 20))
                .with_context(|| format!("creating the drill's disk {}", f.display()))?;
            files.push(f);
        }
        pair.with_disks([files[0].clone(), files[1].clone()])
    } else {
        pair
    };
    // Node b backs up node a, and after a takeover protects toward node a's port.
    let guest = guest_args(p.mem, p.vcpus, &workload);
    let (mut backup, mut primary) = pair.start(extra, &guest, ["b-0.log", "a-0.log"])?;
    let mut client: Option<crate::loadgen::Handle> = None;
    let mut primary_idx = 0usize;
    let mut stream = Vec::new();
    let mut rounds = Vec::new();
    let mut rng = rand::rng();
    crate::stop::install();
    for round in 1..=p.rounds {
        if crate::stop::requested() {
            eprintln!("stopping after round {}: asked by a signal", round - 1);
            break;
        }
        let mut false_takeover = false;
        // The round kills whichever node runs the guest: the backup may
        // have taken over from a primary it found silent during or right
        // after its resync (safe with a witness: the other node is fenced
        // and exits). That is counted, and the fenced node comes back as
        // the backup.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            let runs = |d: &Daemon| d.status().is_some_and(|s| s.role.runs_guest());
            if runs(&backup) && !runs(&primary) {
                false_takeover = true;
                println!(
                    "  (before round {round}: {} took over from {}, which it found silent; {} restarts as the backup)",
                    pair.names[1 - primary_idx], pair.names[primary_idx], pair.names[primary_idx]
                );
                std::mem::swap(&mut primary, &mut backup);
                primary_idx = 1 - primary_idx;
            }
            if backup.child.try_wait()?.is_some() {
                let mut backup_args = extra.clone();
                if p.reuse {
                    backup_args.push("--reuse".into());
                }
                let i = 1 - primary_idx;
                backup = pair.start_backup(
                    i,
                    &backup_args,
                    &format!("{}-{round}r.log", &pair.names[i][5..]),
                )?;
            }
            if runs(&primary) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
        if let (Some(l), None) = (&lab, &client) {
            client = Some(crate::loadgen::Loadgen::start(crate::loadgen::Config {
                target: l.guest_service(),
                netns: Some(l.netns.clone()),
                rate: 500.0,
                // A fresh guest: every key absent before our first PUT.
                fresh: true,
                ..Default::default()
            })?);
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
        let label = format!("kill round {round}");
        let killed_at = Instant::now();
        if let Some(c) = &client {
            c.mark_at(label.clone(), killed_at);
        }
        let takeover = kill_and_follow(
            &mut primary,
            &backup,
            &mut stream,
            Duration::from_millis(700),
        )?;
        let client_round = match &client {
            Some(c) => Some(client_round(c, &label)?),
            None => None,
        };
        let problems = continuity(&stream).problems;
        let survivor = backup.status();
        let mut r = Round {
            round,
            killed: pair.names[primary_idx].clone(),
            ran_for: run_for,
            failover_ms: takeover.ms(),
            problems,
            mismatches: survivor
                .and_then(|s| s.backup)
                .map_or(0, |b| b.verify_mismatches),
            client: client_round,
            reprotect: None,
            false_takeover,
        };
        if r.failed_over() {
            // The survivor is the primary now; a new backup starts where the
            // dead primary was, and the pair is protected again.
            let dead = primary_idx;
            primary_idx = 1 - primary_idx;
            let mut backup_args = extra.clone();
            if p.reuse {
                backup_args.push("--reuse".into());
            }
            let new_backup = pair.start_backup(
                dead,
                &backup_args,
                &format!("{}-{round}.log", &pair.names[dead][5..]),
            )?;
            primary = std::mem::replace(&mut backup, new_backup);
            if let Ok(s) = wait_status(
                &primary,
                "protected again",
                Duration::from_secs(60),
                pair::protected,
            ) {
                r.reprotect = Some(Reprotect {
                    after_kill_ms: killed_at.elapsed().as_secs_f64() * 1e3,
                    resync: s.primary.and_then(|p| p.last_resync),
                });
            }
        }
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
    }
    let mut cold = None;
    if let (Some(c), Some(l), true) = (&client, &lab, disk) {
        // Everything stops; a fresh guest boots from the survivor's disk
        // alone (its RAM thrown away) and must answer for every write.
        drop(primary);
        drop(backup);
        let survivor = pair.disks.as_ref().expect("disks")[primary_idx].clone();
        let v = cold_boot(
            &survivor,
            &l.taps[primary_idx],
            p.mem,
            p.vcpus,
            &workload,
            dir,
            c,
        );
        match v {
            Ok((v, child)) if v.ok() => {
                cold = Some(child);
                println!(
                "  cold boot from the survivor's disk alone ({}): {}/{} acknowledged keys read back",
                pair.names[primary_idx], v.checked, v.keys
            )
            }
            Ok((v, mut g)) => {
                let _ = g.kill();
                let _ = g.wait();
                bail!(
                "after a cold boot from the survivor's disk, acknowledged writes are missing: {v:?}\nlogs kept in {}",
                tmp.keep().display()
            )
            }
            Err(e) => bail!(
                "cold boot from the survivor's disk: {e}\nlogs kept in {}",
                tmp.keep().display()
            ),
        }
    }
    if let Some(c) = client {
        // With a disk, its final check reads from the cold-booted guest.
        let r = c.stop();
        if let Some(mut g) = cold.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        on_client(&r);
        if !r.ok() {
            let lin = r.linearizability.as_ref().map_or(String::new(), |l| {
                format!("\n{}\n  {}", l.line, l.detail.join("\n  "))
            });
            bail!(
                "the key-value client saw {} violations: {:?}{lin}\nlogs kept in {}",
                r.violations,
                r.first_violations,
                tmp.keep().display()
            );
        }
    }
    if std::env::var_os("CASTOR_KEEP_LOGS").is_some() {
        println!("drill logs kept in {}", tmp.keep().display());
    }
    Ok(rounds)
}

/// Boots a fresh guest (`castor run`) on `disk` alone, waits for its log
/// replay, and reads back every key the client had acknowledged; returns
/// that and the guest, still running.
pub(crate) fn cold_boot(
    disk: &std::path::Path,
    tap: &str,
    mem: u64,
    vcpus: u32,
    workload: &Workload,
    dir: &std::path::Path,
    c: &crate::loadgen::Handle,
) -> Result<(crate::loadgen::VerifyReport, std::process::Child)> {
    let out = dir.join("cold-boot.console");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--disk".into(),
        disk.display().to_string(),
        "--tap".into(),
        tap.into(),
        "--duration".into(),
        "120s".into(),
    ];
    args.extend(guest_args(mem, vcpus, workload));
    let mut child = std::process::Command::new(pair::castor_exe()?)
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(dir.join("cold-boot.log"))?)
        .spawn()
        .context("starting castor run for the cold boot")?;
    let t = Instant::now();
    let r = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("replayed") {
            break c.verify_all();
        }
        // (A guest that never replays is stopped below.)
        if t.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "the guest did not replay its log (see {})",
                dir.join("cold-boot.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match r {
        Ok(v) => Ok((v, child)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// After a failover: waits (up to 10 s) for the client's first reply after
/// the kill, then reads back every acknowledged key.
pub(crate) fn client_round(c: &crate::loadgen::Handle, label: &str) -> Result<ClientRound> {
    let t = Instant::now();
    let gap = loop {
        let r = c.report_so_far();
        let m = r.marks.iter().find(|m| m.label == label).cloned();
        if let Some(g) = m.as_ref().and_then(|m| m.gap_ms) {
            break Some(g);
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let verify = c.verify_all().ok();
    // Read again: a reply already on its way at the kill may have come
    // first, with the outage behind it.
    let gap = gap.and(
        c.report_so_far()
            .marks
            .iter()
            .find(|m| m.label == label)
            .and_then(|m| m.gap_ms),
    );
    Ok(ClientRound {
        gap_ms: gap,
        violations: c.report_so_far().violations,
        verify,
    })
}

/// The flags both daemons of a drill get: the mode, and the link's faults.
fn daemon_flags(a: &DrillArgs) -> Vec<String> {
    let mut f = vec![
        "--mode".to_string(),
        a.guest.mode.to_string(),
        "--resync-output".to_string(),
        a.resync_output.clone(),
    ];
    if let Some(l) = &a.link_faults {
        f.extend(["--link-faults".to_string(), l.clone()]);
    }
    f
}

/// Faults named on the command line: one, or `all`.
#[derive(Debug, Clone)]
pub struct FaultSet(pub Vec<Fault>);

fn parse_fault(s: &str) -> Result<FaultSet, String> {
    use clap::ValueEnum as _;
    if s == "all" {
        return Ok(FaultSet(Fault::ALL.to_vec()));
    }
    Fault::from_str(s, false)
        .map(|f| FaultSet(vec![f]))
        .map_err(|_| {
            let names: Vec<String> = Fault::value_variants()
                .iter()
                .filter_map(|f| f.to_possible_value().map(|v| v.get_name().to_string()))
                .collect();
            format!("unknown fault {s:?}: one of {}, or all", names.join(", "))
        })
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1} ms"))
}

/// `castor drill --faults …`.
fn fault_drill(a: &DrillArgs) -> Result<()> {
    let faults: Vec<Fault> = a.faults.iter().flat_map(|s| s.0.iter().copied()).collect();
    let names: Vec<String> = faults.iter().map(|f| format!("{f:?}")).collect();
    println!(
        "castor drill: {} rounds of {} on {} on {} vCPU(s), mode {}, etcd witness, verifying, faults lasting {:?}, resync output {}",
        a.rounds,
        names.join(", "),
        a.guest.workload,
        a.guest.vcpus,
        a.guest.mode,
        a.fault_length,
        a.resync_output,
    );
    let (tmp, dir) = match &a.out {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating the drill's folder {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::tempdir()?;
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    let plan = FaultPlan {
        faults: faults.clone(),
        rounds: a.rounds,
        workload: a.guest.workload.clone(),
        mem: a.guest.mem,
        vcpus: a.guest.vcpus,
        extra: daemon_flags(a),
        disk_mib: a.disk_mib,
        length: a.fault_length,
    };
    let mut seen: Vec<FaultRound> = Vec::new();
    let result = faults::run(&dir, &plan, &mut |r| {
        println!(
            "  round {:>3}  {:<13} on {} -> {}: serving again after {:>9}, protected {:>10} after it ended{}  {}",
            r.round,
            format!("{:?}", r.fault),
            r.primary,
            r.serving.as_deref().unwrap_or("nobody"),
            ms(r.recovered_ms),
            ms(r.protected_ms),
            r.client.as_ref().map_or(String::new(), |c| format!(
                ", client gap {}",
                ms(c.gap_ms)
            )),
            if r.problems.is_empty() {
                "one history, one primary".to_string()
            } else {
                r.problems.join("; ")
            }
        );
        if let Some(note) = &r.note {
            println!("             {note}");
        }
        seen.push(r.clone());
    });
    println!();
    let mut kinds = faults.clone();
    kinds.sort_by_key(|f| faults.iter().position(|g| g == f));
    kinds.dedup();
    for f in &kinds {
        let rs: Vec<&FaultRound> = seen.iter().filter(|r| r.fault == *f).collect();
        if rs.is_empty() {
            println!("  {:<13} not reached", format!("{f:?}"));
            continue;
        }
        let ok = rs.iter().filter(|r| r.ok()).count();
        let rec: Vec<f64> = rs.iter().filter_map(|r| r.recovered_ms).collect();
        let pro: Vec<f64> = rs.iter().filter_map(|r| r.protected_ms).collect();
        let gap: Vec<f64> = rs
            .iter()
            .filter_map(|r| r.client.as_ref().and_then(|c| c.gap_ms))
            .collect();
        let p = |v: &[f64], q: f64| percentile(&mut v.to_vec(), q);
        let unmeasured = if rec.len() < rs.len() {
            format!(" (measured in {} of {})", rec.len(), rs.len())
        } else {
            String::new()
        };
        println!(
            "  {:<13} {ok} of {} rounds passed; serving again p50 {:.1} / p99 {:.1} ms{unmeasured}; protected again (after the fault) p50 {:.0} / p99 {:.0} ms{}",
            format!("{f:?}"),
            rs.len(),
            p(&rec, 0.5),
            p(&rec, 0.99),
            p(&pro, 0.5),
            p(&pro, 0.99),
            if gap.is_empty() {
                String::new()
            } else {
                format!(
                    "; client gap p50 {:.1} / p99 {:.1} ms",
                    p(&gap, 0.5),
                    p(&gap, 0.99)
                )
            }
        );
    }
    let mut failed = result.is_err();
    let mut undecided = false;
    if let Ok(rep) = &result {
        if let Some((checked, keys)) = rep.cold_boot {
            println!(
                "  cold boot from the survivor's disk alone: {checked}/{keys} acknowledged keys read back"
            );
        }
        if let Some(c) = &rep.client {
            println!(
                "  key-value client: {} requests acknowledged ({} PUTs), {} violations",
                c.counts.acked, c.counts.puts_acked, c.violations
            );
            if let Some(l) = &c.linearizability {
                println!("  key-value history: {}", l.line);
                for d in &l.detail {
                    println!("    {d}");
                }
            }
            failed |= !c.ok();
            undecided |= c.undecided();
        }
    }
    if failed || undecided || a.out.is_some() {
        let kept = match tmp {
            Some(t) => t.keep(),
            None => dir,
        };
        println!("logs kept in {}", kept.display());
        let history = kept.join("client-history.jsonl");
        if history.exists() {
            // The drill's guest starts empty.
            println!(
                "the client's history: {} (`castor linearize --fresh FILE` checks it again)",
                history.display()
            );
        }
    }
    match result {
        Err(e) => Err(e),
        Ok(_) if failed => bail!("the key-value client's history was not clean"),
        Ok(rep) if rep.stopped => bail!(
            "stopped by a signal after {} of {} rounds",
            rep.rounds.len(),
            a.rounds
        ),
        Ok(_) => Ok(()),
    }
}

/// `castor drill`.
pub fn drill(a: DrillArgs) -> Result<()> {
    if !a.faults.is_empty() {
        return fault_drill(&a);
    }
    let mut extra = daemon_flags(&a);
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
        reuse: a.reuse,
        disk_mib: a.disk_mib,
    };
    let mut seen = Vec::new();
    let mut false_takeovers = 0;
    let mut gaps = Vec::new();
    let mut windows = Vec::new();
    let mut client = None;
    let result = run_drill(
        &plan,
        &mut |r| {
            print_round(r);
            false_takeovers += u32::from(r.false_takeover);
            if r.ok() {
                seen.extend(r.failover_ms);
                gaps.extend(r.client.as_ref().and_then(|c| c.gap_ms));
                windows.extend(r.reprotect.as_ref().map(|p| p.after_kill_ms));
            }
        },
        &mut |r| client = Some(r.clone()),
    );
    println!();
    println!(
        "castor drill: {} of {} rounds passed{}",
        seen.len(),
        a.rounds,
        failover_figures(&seen)
    );
    println!("  false takeovers (a backup taking over from a live primary): {false_takeovers}");
    if !windows.is_empty() {
        println!(
            "  unprotected window (SIGKILL -> protected again, the new backup's start included): p50 {:.0} ms, max {:.0} ms",
            percentile(&mut windows.clone(), 0.5),
            windows.iter().cloned().fold(0.0, f64::max)
        );
    }
    if let Some(c) = client {
        println!(
            "  key-value client: {} requests acknowledged ({} PUTs), {} violations (acknowledged writes lost, replies from lost state), every acknowledged key read back after each failover: {}",
            c.counts.acked,
            c.counts.puts_acked,
            c.violations,
            if c.ok() { "yes" } else { "NO" }
        );
        // The whole history, checked once the client stopped.
        if let Some(l) = &c.linearizability {
            println!("  key-value history: {}", l.line);
            for d in &l.detail {
                println!("    {d}");
            }
        }
        if !gaps.is_empty() {
            println!(
                "  client-seen failover gap (last reply before the kill -> first after): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; latency p50 {:.2} ms, p99 {:.2} ms",
                percentile(&mut gaps.clone(), 0.5),
                percentile(&mut gaps.clone(), 0.99),
                gaps.iter().cloned().fold(0.0, f64::max),
                c.latency.p50_ms,
                c.latency.p99_ms
            );
        }
    }
    result.map(|_| ())
}

fn print_round(r: &Round) {
    match r.failover_ms {
        Some(ms) => println!(
            "  round {:>3}: primary {} killed after {:>4} ms, failover {ms:6.1} ms, {}",
            r.round,
            r.killed,
            r.ran_for.as_millis(),
            if !r.problems.is_empty() {
                "CONSOLE BROKEN"
            } else if r.ok() {
                "console continuous"
            } else {
                "console continuous, ROUND FAILED"
            }
        ),
        None => println!(
            "  round {:>3}: primary {} killed, NO OUTPUT from the survivor",
            r.round, r.killed
        ),
    }
    if let Some(c) = &r.client {
        println!(
            "             client gap {}, {} violations, read back {}",
            c.gap_ms.map_or("NONE".into(), |g| format!("{g:.1} ms")),
            c.violations,
            c.verify.as_ref().map_or("FAILED".into(), |v| format!(
                "{}/{} keys{}",
                v.checked,
                v.keys,
                if v.ok() { "" } else { " (MISMATCH)" }
            ))
        );
    }
    if let Some(p) = &r.reprotect {
        let how = match &p.resync {
            Some(s) if s.reused => format!(
                "reuse: {} of {} pages sent ({} stale), {:.1} MiB",
                s.pages_sent,
                s.pages,
                s.stale,
                s.bytes as f64 / (1 << 20) as f64
            ),
            Some(s) => format!(
                "full resync, {:.1} MiB ({})",
                s.bytes as f64 / (1 << 20) as f64,
                s.reason
            ),
            None => "?".into(),
        };
        println!(
            "             protected again {:.0} ms after the kill ({how})",
            p.after_kill_ms
        );
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
