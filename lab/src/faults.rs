//! `castor drill --faults …`: rounds of faults on a real pair with a real
//! etcd witness, each checked as a user of an HA system would check it.
//!
//! The nodes run in network namespaces of their own ([`crate::netns`]), so
//! that the replication link can be cut, cut one way or flapped while both
//! still reach the witness and their console clients. Each round injects one
//! fault into the protected pair — a SIGKILL or a SIGSTOP of either node, the
//! witness killed for a while, its leader killed during a claim, its disk
//! made slow, or the link cut — into whichever node runs the guest at that
//! moment, then waits until exactly one node runs it, restarts a node that
//! died as a backup, and checks:
//! - one history: the console stream a client followed across the round is
//!   gap- and duplicate-free on every vCPU, and the serving node's console
//!   agrees with it byte for byte where they overlap;
//! - the replica verifies (the daemons run with `--verify`; a mismatch fails
//!   the round);
//! - with the `net` or `kvdisk` workload, a key-value client runs through
//!   every round: no acknowledged write lost, no reply from lost state, every
//!   acknowledged key read back after the round, and the whole history
//!   linearizable at the end (`kvdisk`: also from a fresh guest booted on the
//!   survivor's disk alone);
//! - exactly one node runs the guest at the end, and the pair is protected
//!   again.
//!
//! A failed round stops the drill and keeps everything in its folder: both
//! nodes' logs, the console stream (`console.bin`), etcd's logs and the
//! client's history (`client-history.jsonl`, one operation a line, which
//! `castor linearize` checks again; also kept when the check of a long run
//! was undecided).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng as _;

use crate::console::continuity;
use crate::drill::{client_round, cold_boot, ClientRound};
use crate::pair::{read_console, Daemon, Follower, Pair};

/// A fault a round injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL the primary.
    Kill,
    /// SIGKILL the backup.
    KillBackup,
    /// SIGSTOP the primary for the fault's length.
    PausePrimary,
    /// SIGSTOP the backup for the fault's length.
    PauseBackup,
    /// Kill the witness (every etcd member) for the fault's length while the
    /// pair runs.
    WitnessDown,
    /// Cut the replication link both ways for the fault's length.
    Partition,
    /// A one-way partition: what the primary sends the backup is lost; the
    /// primary still hears the backup.
    OneWay,
    /// The other way: what the backup sends the primary is lost; the backup
    /// still hears the primary.
    OneWayBack,
    /// The replication link flaps: down and up every 100-300 ms for the
    /// fault's length.
    Flap,
    /// SIGKILL the primary, then the etcd leader while the backup's claim is
    /// in flight (a three-member cluster); the member returns after the
    /// fault's length.
    EtcdLeader,
    /// etcd's disk made slow (every fsync 1 s longer, on every member) for
    /// the fault's length, and the primary SIGKILLed during it: a claim that
    /// takes a second.
    SlowEtcd,
}

impl Fault {
    /// Every fault, in the order a full drill runs them.
    pub const ALL: [Fault; 11] = [
        Fault::Kill,
        Fault::KillBackup,
        Fault::PausePrimary,
        Fault::PauseBackup,
        Fault::WitnessDown,
        Fault::Partition,
        Fault::OneWay,
        Fault::OneWayBack,
        Fault::Flap,
        Fault::EtcdLeader,
        Fault::SlowEtcd,
    ];

    /// Whether it needs a three-member etcd cluster.
    fn needs_cluster(self) -> bool {
        matches!(self, Fault::EtcdLeader | Fault::SlowEtcd)
    }
}

/// What one round saw.
#[derive(Debug, Clone)]
pub struct FaultRound {
    /// Round number, from 1.
    pub round: u32,
    /// The fault.
    pub fault: Fault,
    /// The node that ran the guest when the fault began.
    pub primary: String,
    /// The node that runs it after the round.
    pub serving: Option<String>,
    /// The fault's start → the serving node's first new console byte, ms.
    pub recovered_ms: Option<f64>,
    /// The fault's end (a kill ends at once; a pause, a partition or the
    /// witness's outage after the fault's length) → protected again, ms.
    pub protected_ms: Option<f64>,
    /// With a key-value workload: what the client saw.
    pub client: Option<ClientRound>,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
    /// Why "serving again" was not measured, when it was not.
    pub note: Option<String>,
}

impl FaultRound {
    /// Whether the round passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a fault drill does.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// The faults, in turn.
    pub faults: Vec<Fault>,
    /// Rounds in all.
    pub rounds: u32,
    /// The guest's workload (`net` and `kvdisk` get a key-value client).
    pub workload: guest::Workload,
    /// Guest RAM.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Flags for both daemons (`--verify` is added).
    pub extra: Vec<String>,
    /// Each node's disk in MiB (`kvdisk`).
    pub disk_mib: u64,
    /// How long a lasting fault (a pause, a partition, an outage) lasts.
    pub length: Duration,
}

/// What a fault drill saw in all.
#[derive(Debug, Clone, Default)]
pub struct FaultReport {
    /// Every round, in order.
    pub rounds: Vec<FaultRound>,
    /// The key-value client's final report (its whole history checked).
    pub client: Option<crate::loadgen::Report>,
    /// `kvdisk`: acknowledged keys read back from a fresh guest on the
    /// survivor's disk alone (read back, in all).
    pub cold_boot: Option<(u64, u64)>,
    /// A signal stopped the drill before its last round.
    pub stopped: bool,
}

/// The etcd witness of a drill: one member, or three when a fault needs a
/// cluster.
struct Witness {
    etcd: witness::server::EtcdCluster,
}

struct Nodes {
    pair: Pair,
    d: [Option<Daemon>; 2],
    /// The node that runs the guest.
    primary: usize,
    extra: Vec<String>,
    logs: u32,
}

impl Nodes {
    /// Forgets the nodes whose process has exited.
    fn reap(&mut self) {
        for d in &mut self.d {
            if d.as_mut()
                .is_some_and(|d| d.child.try_wait().ok().flatten().is_some())
            {
                *d = None;
            }
        }
    }

    fn daemon(&self, i: usize) -> Result<&Daemon> {
        self.d[i]
            .as_ref()
            .with_context(|| format!("{} is not running", self.pair.names[i]))
    }

    fn restart_backup(&mut self, i: usize) -> Result<()> {
        self.logs += 1;
        let log = format!("{}-{}.log", self.pair.names[i], self.logs);
        self.d[i] = Some(self.pair.start_backup(i, &self.extra, &log)?);
        Ok(())
    }

    /// Each node's status (None: gone or not answering).
    fn statuses(&self) -> [Option<node::Status>; 2] {
        [0, 1].map(|i| self.d[i].as_ref().and_then(Daemon::status))
    }

    /// Node `p` runs the guest, protected, and the other is its backup, as
    /// both say now.
    fn roles_hold(&self, p: usize) -> bool {
        let st = self.statuses();
        st[p]
            .as_ref()
            .is_some_and(|s| s.role.runs_guest() && s.protected())
            && st[1 - p]
                .as_ref()
                .is_some_and(|s| s.role == node::Role::Backup)
    }

    /// Waits until exactly one node runs the guest, protected for at least
    /// ten epochs, whichever node that is (a backup may take over during a
    /// resync; a fenced node exits and comes back as a backup). Two nodes
    /// running the guest for 5 s is a failure.
    fn settle(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut two_since: Option<Instant> = None;
        loop {
            self.reap();
            let st = self.statuses();
            let running: Vec<usize> = (0..2)
                .filter(|&i| st[i].as_ref().is_some_and(|s| s.role.runs_guest()))
                .collect();
            match running[..] {
                [r] => {
                    two_since = None;
                    self.primary = r;
                    if self.d[1 - r].is_none() {
                        self.restart_backup(1 - r)?;
                    }
                    if st[r].as_ref().is_some_and(crate::pair::protected_after(10)) {
                        return Ok(());
                    }
                }
                [_, _] => {
                    let since = *two_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(5) {
                        bail!("two nodes ran the guest for 5 s");
                    }
                }
                _ => two_since = None,
            }
            if Instant::now() > deadline {
                bail!(
                    "no node ran the guest protected within {within:?}: roles {:?}",
                    st.map(|s| s.map(|s| s.role))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The key-value history, one operation a line as JSON (what `castor
/// linearize` reads), for a failed drill's folder.
fn write_history(path: &Path, ops: &[crate::linearize::Op]) {
    if let Err(e) = crate::loadgen::write_history(path, ops) {
        tracing::warn!(path = %path.display(), "could not keep the client's history: {e:#}");
    }
}

/// Runs a fault drill in `dir` (kept by the caller when it fails):
/// `plan.rounds` rounds cycling through `plan.faults`; `on_round` sees every
/// round as it ends.
pub fn run(
    dir: &Path,
    plan: &FaultPlan,
    on_round: &mut dyn FnMut(&FaultRound),
) -> Result<FaultReport> {
    if plan.faults.is_empty() {
        bail!("a fault drill needs at least one fault");
    }
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?;
    let net = std::sync::Arc::new(
        crate::netns::Net::create()
            .context("the fault drill runs the nodes in network namespaces (needs root)")?,
    );
    let members = if plan.faults.iter().any(|f| f.needs_cluster()) {
        3
    } else {
        1
    };
    let mut w = Witness {
        etcd: witness::server::EtcdCluster::start(&dir.join("etcd"), members, &net.root_addrs())
            .context("starting the witness (a local etcd)")?,
    };
    let pair = pair.in_namespaces(net.clone(), &w.etcd);
    // A key-value workload: a guest network with a client namespace; each
    // node reaches it from its namespace through a tap and a veth.
    let mut workload = plan.workload.clone();
    let disk = workload.kind.name() == "kvdisk";
    let lab = if workload.kind == guest::Kind::Net || disk {
        let pid = std::process::id();
        let lab = crate::netlab::NetLab::unique(
            &format!("cf{}", pid % 100_000),
            (78, (pid % 200 + 20) as u8),
        )
        .up_scoped()
        .context("the key-value workload's drill sets up a guest network (needs root)")?;
        net.attach_guest_net(&lab)
            .context("joining the nodes' namespaces to the guest network")?;
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
                .and_then(|h| h.set_len(plan.disk_mib << 20))
                .with_context(|| format!("creating the drill's disk {}", f.display()))?;
            files.push(f);
        }
        pair.with_disks([files[0].clone(), files[1].clone()])
    } else {
        pair
    };
    let guest = crate::pair::guest_args(plan.mem, plan.vcpus, &workload);
    let mut extra = plan.extra.clone();
    extra.push("--verify".into());
    let (b, p) = pair.start(&extra, &guest, ["node-b-0.log", "node-a-0.log"])?;
    let mut n = Nodes {
        pair,
        d: [Some(p), Some(b)],
        primary: 0,
        extra,
        logs: 0,
    };
    let mut client: Option<crate::loadgen::Handle> = None;
    let mut stream = Vec::new();
    let mut report = FaultReport::default();
    let mut rng = rand::rng();
    let fail = |stream: &[u8], client: &Option<crate::loadgen::Handle>| {
        let _ = std::fs::write(dir.join("console.bin"), stream);
        if let Some(c) = client {
            write_history(&dir.join("client-history.jsonl"), &c.history());
        }
    };
    // A folder reused from an earlier run must not show its history.
    let _ = std::fs::remove_file(dir.join("client-history.jsonl"));
    crate::stop::install();
    for round in 1..=plan.rounds {
        if crate::stop::requested() {
            eprintln!("stopping after round {}: asked by a signal", round - 1);
            report.stopped = true;
            break;
        }
        let fault = plan.faults[(round as usize - 1) % plan.faults.len()];
        if let Err(e) = n.settle(Duration::from_secs(60)) {
            fail(&stream, &client);
            bail!("round {round} ({fault:?}), before the fault: {e:#}");
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
        let offset = stream.len() as u64;
        let run_for = Duration::from_millis(rng.random_range(300..1200));
        if let Err(e) = read_console(
            n.daemon(n.primary)?.console,
            offset,
            &mut stream,
            Instant::now() + run_for,
            u64::MAX,
        ) {
            fail(&stream, &client);
            bail!("round {round} ({fault:?}), before the fault: the client's read: {e:#}");
        }
        let label = format!("round {round}");
        let mut r = round_of(&mut n, &mut w, plan, fault, round, &mut stream, || {
            if let Some(c) = &client {
                c.mark(label.clone());
            }
        })?;
        if let (Some(c), true) = (&client, r.ok()) {
            let cr = client_round(c, &label)?;
            if cr.gap_ms.is_none() {
                r.problems
                    .push("the client had no reply within 10 s of the fault".into());
            }
            if cr.violations > 0 {
                let first = c.report_so_far().first_violations;
                r.problems.push(format!(
                    "the client saw {} violations, first {:?}",
                    cr.violations,
                    &first[..first.len().min(3)]
                ));
            }
            if !cr.verify.as_ref().is_some_and(|v| v.ok()) {
                r.problems.push(format!(
                    "reading back every acknowledged key failed: {:?}",
                    cr.verify
                ));
            }
            r.client = Some(cr);
        }
        on_round(&r);
        let ok = r.ok();
        report.rounds.push(r);
        if !ok {
            fail(&stream, &client);
            bail!("round {round} ({fault:?}) failed");
        }
    }
    if let (Some(c), Some(l), true) = (&client, &lab, disk) {
        // Everything stops; a fresh guest boots from the survivor's disk
        // alone (its RAM thrown away) and must answer for every write.
        let survivor = n.primary;
        n.d = [None, None];
        let file = n.pair.disks.as_ref().expect("disks")[survivor].clone();
        match cold_boot(
            &file,
            &l.taps[survivor],
            plan.mem,
            plan.vcpus,
            &workload,
            dir,
            c,
        ) {
            Ok((v, mut g)) => {
                let ok = v.ok();
                report.cold_boot = Some((v.checked, v.keys));
                let c = client.take().expect("a client");
                let (r, ops) = c.stop_with_history();
                let _ = g.kill();
                let _ = g.wait();
                if !ok || !r.ok() || r.undecided() {
                    write_history(&dir.join("client-history.jsonl"), &ops);
                }
                if !ok {
                    bail!("after a cold boot from the survivor's disk, acknowledged writes are missing: {v:?}");
                }
                report.client = Some(r);
            }
            Err(e) => {
                fail(&stream, &client);
                bail!("cold boot from the survivor's disk: {e:#}");
            }
        }
    }
    if let Some(c) = client.take() {
        let (r, ops) = c.stop_with_history();
        if !r.ok() || r.undecided() {
            write_history(&dir.join("client-history.jsonl"), &ops);
        }
        report.client = Some(r);
    }
    Ok(report)
}

fn round_of(
    n: &mut Nodes,
    w: &mut Witness,
    plan: &FaultPlan,
    fault: Fault,
    round: u32,
    stream: &mut Vec<u8>,
    at_start: impl FnOnce(),
) -> Result<FaultRound> {
    let len = plan.length;
    // Both consoles are followed from the fault's start for its length, a
    // takeover after it and an etcd restart.
    let follow = len + Duration::from_millis(2500);
    let net = n.pair.net.clone().expect("a pair in namespaces");
    let mut rng = rand::rng();
    // Found before the fault begins: the claim that follows a kill is
    // quick, and the leader must die while it is in flight.
    let leader = if fault == Fault::EtcdLeader {
        Some(w.etcd.leader().context("the etcd cluster has no leader")?)
    } else {
        None
    };
    let slow = if fault == Fault::SlowEtcd {
        let d = Duration::from_secs(1);
        let guards = (0..w.etcd.members())
            .map(|i| w.etcd.slow_disk(i, d))
            .collect::<Result<Vec<_>, _>>()
            .context("slowing etcd's disk")?;
        std::thread::sleep(Duration::from_millis(200));
        Some(guards)
    } else {
        None
    };
    // The roles again, just before the fault: a takeover while the round
    // waited (a host stall can make one) changes which node the fault must
    // hit. Without this, a kill of "the backup" once killed the node that
    // had just taken over — the only one running the guest.
    if !n.roles_hold(n.primary) {
        n.settle(Duration::from_secs(60))
            .context("the roles changed before the fault")?;
    }
    let (p, b) = (n.primary, 1 - n.primary);
    let t = Instant::now();
    at_start();
    let mark = stream.len() as u64;
    // Both consoles are followed from the client's offset while the fault
    // runs, so "serving again" is when the serving node's first new byte
    // came, not when the fault's injection ended.
    let followers: Vec<Option<Follower>> = (0..2)
        .map(|i| {
            n.d[i]
                .as_ref()
                .map(|d| Follower::start(d.console, stream.clone(), t + follow))
        })
        .collect();
    match fault {
        // SIGKILL only: the loop below reaps the process, so a large
        // guest's exit is not counted as time to serve again.
        Fault::Kill | Fault::KillBackup => {
            let who = if fault == Fault::Kill { p } else { b };
            if let Some(d) = n.d[who].as_mut() {
                let _ = d.child.kill();
            }
        }
        Fault::PausePrimary | Fault::PauseBackup => {
            let who = if fault == Fault::PausePrimary { p } else { b };
            let d = n.daemon(who)?;
            d.signal(rustix::process::Signal::STOP)?;
            std::thread::sleep(len);
            d.signal(rustix::process::Signal::CONT)?;
        }
        Fault::WitnessDown => {
            for i in 0..w.etcd.members() {
                w.etcd.kill(i);
            }
            std::thread::sleep(len);
            w.etcd.restart_all()?;
        }
        Fault::Partition => {
            net.cut()?;
            std::thread::sleep(len);
            net.heal()?;
        }
        Fault::OneWay | Fault::OneWayBack => {
            let (from, to) = if fault == Fault::OneWay {
                (p, b)
            } else {
                (b, p)
            };
            net.cut_one_way(from, to)?;
            std::thread::sleep(len);
            net.heal_one_way()?;
        }
        Fault::Flap => {
            let end = Instant::now() + len;
            while Instant::now() < end {
                net.cut()?;
                std::thread::sleep(Duration::from_millis(rng.random_range(100..300)));
                net.heal()?;
                std::thread::sleep(Duration::from_millis(rng.random_range(100..300)));
            }
        }
        Fault::EtcdLeader => {
            if let Some(d) = n.d[p].as_mut() {
                let _ = d.child.kill();
            }
            // The backup's detector fires after 30 ms of silence and its
            // claim follows at once: the leader dies just before or while
            // it is in flight, so the claim meets a cluster electing a new
            // leader.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..35)));
            let l = leader.expect("found above");
            w.etcd.kill(l);
            std::thread::sleep(len);
            w.etcd.restart(l)?;
        }
        Fault::SlowEtcd => {
            if let Some(d) = n.d[p].as_mut() {
                let _ = d.child.kill();
            }
            std::thread::sleep(len);
            drop(slow);
        }
    }
    let ended = Instant::now();
    let mut problems = Vec::new();
    // Exactly one node runs the guest; a fenced one exits.
    let deadline = Instant::now() + Duration::from_secs(15);
    let server = loop {
        n.reap();
        let running: Vec<usize> = (0..2)
            .filter(|&i| {
                n.d[i]
                    .as_ref()
                    .is_some_and(|d| d.status().is_some_and(|s| s.role.runs_guest()))
            })
            .collect();
        if running.len() == 1 {
            break Some(running[0]);
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "{} nodes run the guest 15 s after the fault",
                running.len()
            ));
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut recovered_ms = None;
    let mut note = None;
    if let Some(s) = server {
        n.primary = s;
        let d = n.d[s].as_ref().expect("serving");
        // The survivor of a takeover serves the committed replica, then its
        // own history from where it resumed; the old primary, what it
        // releases past the client's offset.
        let new_from = if s == p {
            mark
        } else {
            d.status()
                .and_then(|st| st.resumed_at)
                .unwrap_or(mark)
                .max(mark)
        };
        let mut followers = followers;
        if let Some(f) = followers[s].take() {
            while f.first_past(new_from).is_none() && Instant::now() < t + follow {
                std::thread::sleep(Duration::from_millis(5));
            }
            recovered_ms = f
                .first_past(new_from)
                .map(|at| (at - t).as_secs_f64() * 1e3);
            let (seen, refused) = f.finish();
            if let Some(why) = refused {
                problems.push(format!(
                    "the serving node refused the client's offset: {why}"
                ));
            }
            if recovered_ms.is_none() {
                let past = &seen[(mark as usize).min(seen.len())..];
                note = Some(format!(
                    "no byte past {new_from} on {}'s console (the client's offset {mark}, resumed at {:?}): it sent {} bytes past the offset: {:?}",
                    n.pair.names[s],
                    d.status().and_then(|st| st.resumed_at),
                    past.len(),
                    String::from_utf8_lossy(&past[..past.len().min(160)])
                ));
            }
            if seen.len() > stream.len() {
                *stream = seen;
            }
        }
        for f in followers.into_iter().flatten() {
            let _ = f.finish();
        }
        if let Err(e) = read_console(
            d.console,
            stream.len() as u64,
            stream,
            Instant::now() + Duration::from_millis(300),
            u64::MAX,
        ) {
            problems.push(format!("reading on after the fault: {e:#}"));
        }
        // The serving node's own console agrees with what the client saw
        // (its last 4 KiB: a node keeps the history a backup receives).
        let from = stream.len().saturating_sub(4 << 10) as u64;
        let mut theirs = stream[..from as usize].to_vec();
        match read_console(
            d.console,
            from,
            &mut theirs,
            Instant::now() + Duration::from_millis(200),
            u64::MAX,
        ) {
            Err(e) => problems.push(format!("re-reading the client's last 4 KiB: {e:#}")),
            Ok(_) => {
                let k = theirs.len().min(stream.len());
                if theirs[..k] != stream[..k] {
                    problems
                        .push("the serving node's console differs from the client's stream".into());
                }
            }
        }
        if let Some(m) = d
            .status()
            .and_then(|s| s.backup)
            .map(|b| b.verify_mismatches)
            .filter(|&m| m > 0)
        {
            problems.push(format!("{m} replica mismatches"));
        }
    }
    let c = continuity(stream);
    problems.extend(c.problems);
    // The other node settles — a backup, or gone (a fenced primary exits
    // once it learns it lost), or the one running the guest again (a
    // backup that took over after the fault, e.g. when the host stalled
    // the serving node: the next step checks that only one runs it) — and
    // a gone node comes back as a backup; protection returns.
    let mut protected_ms = None;
    if let (true, Some(s)) = (problems.is_empty(), server) {
        let other = 1 - s;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            n.reap();
            if n.d[other].is_none() {
                n.restart_backup(other)?;
                break;
            }
            let d = n.d[other].as_ref().expect("running");
            match d.status().map(|st| st.role) {
                Some(node::Role::Backup) => break,
                // A takeover after the serving node was chosen counts only
                // once that node has stopped running the guest (gone, or
                // says so): never two runners settled as one.
                Some(node::Role::TakenOver) => {
                    let serving_stopped = n.d[s]
                        .as_ref()
                        .is_none_or(|sd| sd.status().is_some_and(|st| !st.role.runs_guest()));
                    if serving_stopped {
                        note = Some(format!(
                            "{} took the guest over after {} served it (a second takeover)",
                            n.pair.names[other], n.pair.names[s]
                        ));
                        break;
                    }
                }
                _ => {}
            }
            if Instant::now() > deadline {
                problems.push("the other node neither became a backup nor exited".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if problems.is_empty() {
        // Protection again: whichever node runs the guest (a backup started
        // after the fault may take over from a primary that is slow during
        // its resync, and a fenced node may learn it late), with a backup
        // beside it, and never two nodes running the guest for long.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut two_since: Option<Instant> = None;
        loop {
            n.reap();
            let st: Vec<Option<node::Status>> = (0..2)
                .map(|i| n.d[i].as_ref().and_then(|d| d.status()))
                .collect();
            let running: Vec<usize> = (0..2)
                .filter(|&i| st[i].as_ref().is_some_and(|s| s.role.runs_guest()))
                .collect();
            if running.len() == 2 {
                // A node that learnt late that it lost stops its guest
                // within moments: allow it 5 s.
                let since = *two_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    problems.push("two nodes ran the guest for 5 s".into());
                    break;
                }
            } else if (0..2).all(|i| n.d[i].is_none() || st[i].is_some()) {
                // Only a node known not to run the guest ends the count: a
                // status that did not answer (a busy control socket) is not
                // a sign that a second runner stopped.
                two_since = None;
            }
            if let [r] = running[..] {
                n.primary = r;
                if n.d[1 - r].is_none() {
                    n.restart_backup(1 - r)?;
                }
                if st[r].as_ref().is_some_and(|s| s.protected()) {
                    protected_ms = Some(ended.elapsed().as_secs_f64() * 1e3);
                    break;
                }
            }
            if Instant::now() > deadline {
                problems.push(format!(
                    "not protected again 60 s after the fault; nodes running the guest: {running:?}"
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(FaultRound {
        round,
        fault,
        primary: n.pair.names[p].clone(),
        serving: server.map(|s| n.pair.names[s].clone()),
        recovered_ms,
        protected_ms,
        client: None,
        problems,
        note,
    })
}
