//! `castor drill --faults …`: rounds of faults on a real pair with a real
//! etcd witness, each checked as a user of an HA system would check it.
//!
//! Each round injects one fault into the protected pair — a SIGKILL or a
//! SIGSTOP of either node, or the witness killed for a while — then waits
//! until exactly one node runs the guest, restarts the node that died as a
//! backup, and checks:
//! - one history: the console stream a client followed across the round is
//!   gap- and duplicate-free on every vCPU, and the serving node's console
//!   agrees with it byte for byte where they overlap;
//! - the replica verifies (the daemons run with `--verify`; a mismatch fails
//!   the round);
//! - exactly one node runs the guest at the end, and the pair is protected
//!   again.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng as _;

use crate::console::continuity;
use crate::pair::{read_console, wait_status, Daemon, Follower, Pair};

/// How long both consoles are followed from a fault's start: the longest
/// fault (2 s, plus an etcd restart) and a takeover after it.
const FOLLOW: Duration = Duration::from_millis(4500);

/// A fault a round injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL the primary.
    Kill,
    /// SIGKILL the backup.
    KillBackup,
    /// SIGSTOP the primary for 2 s.
    PausePrimary,
    /// SIGSTOP the backup for 2 s.
    PauseBackup,
    /// Kill the witness (etcd) for 2 s while the pair runs.
    WitnessDown,
    /// Cut the replication link for 2 s (the nodes run in network
    /// namespaces; both still reach the witness).
    Partition,
}

/// What one round saw.
#[derive(Debug, Clone)]
pub struct FaultRound {
    /// Round number, from 1.
    pub round: u32,
    /// The fault.
    pub fault: Fault,
    /// The fault's start → the serving node's first new console byte, ms.
    pub recovered_ms: Option<f64>,
    /// The fault's end (a kill ends at once; a pause, a partition or the
    /// witness's outage after 2 s) → protected again, ms.
    pub protected_ms: Option<f64>,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
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

    fn primary(&self) -> &Daemon {
        self.d[self.primary].as_ref().expect("a primary")
    }

    fn restart_backup(&mut self, i: usize) -> Result<()> {
        self.logs += 1;
        let log = format!("{}-{}.log", self.pair.names[i], self.logs);
        self.d[i] = Some(self.pair.start_backup(i, &self.extra, &log)?);
        Ok(())
    }
}

fn signal(d: &Daemon, sig: &str) -> Result<()> {
    let ok = std::process::Command::new("kill")
        .args([sig, &d.child.id().to_string()])
        .status()?
        .success();
    if !ok {
        bail!("kill {sig} {} failed", d.child.id());
    }
    Ok(())
}

/// Runs `rounds` rounds cycling through `faults` on a pair of `guest` with
/// `extra` flags for both daemons; `on_round` sees every round.
pub fn run(
    dir: &Path,
    faults: &[Fault],
    rounds: u32,
    guest: &[String],
    extra: &[String],
    on_round: &mut dyn FnMut(&FaultRound),
) -> Result<Vec<FaultRound>> {
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?;
    // Partitions need the nodes in network namespaces of their own.
    let net = faults
        .contains(&Fault::Partition)
        .then(crate::netns::Net::create)
        .transpose()?
        .map(std::sync::Arc::new);
    let also = net.as_ref().map(|n| n.root_addrs()).unwrap_or_default();
    let mut etcd = witness::server::EtcdServer::start_on(&dir.join("etcd"), &also)
        .context("starting the witness (a local etcd)")?;
    let pair = match &net {
        Some(net) => pair.in_namespaces(net.clone(), &etcd),
        None => pair.with_etcd(&etcd.endpoint()),
    };
    let mut extra = extra.to_vec();
    extra.push("--verify".into());
    let (b, p) = pair.start(&extra, guest, ["node-b-0.log", "node-a-0.log"])?;
    let mut n = Nodes {
        pair,
        d: [Some(p), Some(b)],
        primary: 0,
        extra,
        logs: 0,
    };
    let mut stream = Vec::new();
    let mut out = Vec::new();
    let mut rng = rand::rng();
    for round in 1..=rounds {
        let fault = faults[(round as usize - 1) % faults.len()];
        wait_status(
            n.primary(),
            "the primary to be protected",
            Duration::from_secs(60),
            crate::pair::protected_after(10),
        )
        .with_context(|| format!("round {round}: before the fault"))?;
        let offset = stream.len() as u64;
        let run_for = Duration::from_millis(rng.random_range(300..1200));
        read_console(
            n.primary().console,
            offset,
            &mut stream,
            Instant::now() + run_for,
            u64::MAX,
        )?;
        let r = round_of(&mut n, &mut etcd, fault, round, &mut stream)?;
        on_round(&r);
        let ok = r.problems.is_empty();
        out.push(r);
        if !ok {
            let _ = std::fs::write(dir.join("console.bin"), &stream);
            bail!("round {round} ({fault:?}) failed");
        }
    }
    Ok(out)
}

fn round_of(
    n: &mut Nodes,
    etcd: &mut witness::server::EtcdServer,
    fault: Fault,
    round: u32,
    stream: &mut Vec<u8>,
) -> Result<FaultRound> {
    let (p, b) = (n.primary, 1 - n.primary);
    let t = Instant::now();
    let mark = stream.len() as u64;
    // Both consoles are followed from the client's offset while the fault
    // runs, so "serving again" is when the serving node's first new byte
    // came, not when the fault's injection ended.
    let followers: Vec<Option<Follower>> = (0..2)
        .map(|i| {
            n.d[i]
                .as_ref()
                .map(|d| Follower::start(d.console, stream.clone(), t + FOLLOW))
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
            let d = n.d[who].as_ref().expect("running");
            signal(d, "-STOP")?;
            std::thread::sleep(Duration::from_secs(2));
            signal(d, "-CONT")?;
        }
        Fault::WitnessDown => {
            etcd.kill();
            std::thread::sleep(Duration::from_secs(2));
            etcd.restart()?;
        }
        Fault::Partition => {
            let net = n.pair.net.clone().expect("a pair in namespaces");
            net.cut()?;
            std::thread::sleep(Duration::from_secs(2));
            net.heal()?;
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
            while f.first_past(new_from).is_none() && Instant::now() < t + FOLLOW {
                std::thread::sleep(Duration::from_millis(5));
            }
            recovered_ms = f
                .first_past(new_from)
                .map(|at| (at - t).as_secs_f64() * 1e3);
            let seen = f.finish();
            if seen.len() > stream.len() {
                *stream = seen;
            }
        }
        for f in followers.into_iter().flatten() {
            f.finish();
        }
        read_console(
            d.console,
            stream.len() as u64,
            stream,
            Instant::now() + Duration::from_millis(300),
            u64::MAX,
        )?;
        // The serving node's own console agrees with what the client saw.
        let from = stream.len().saturating_sub(4 << 10) as u64;
        let mut theirs = stream[..from as usize].to_vec();
        read_console(
            d.console,
            from,
            &mut theirs,
            Instant::now() + Duration::from_millis(200),
            u64::MAX,
        )?;
        let k = theirs.len().min(stream.len());
        let refused = theirs[from as usize..].starts_with(b"error: offset");
        if !refused && theirs[..k] != stream[..k] {
            problems.push("the serving node's console differs from the client's stream".into());
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
    // once it learns it lost) — and a gone node comes back as a backup;
    // protection returns.
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
            if d.status().is_some_and(|st| st.role == node::Role::Backup) {
                break;
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
            } else {
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
        recovered_ms,
        protected_ms,
        problems,
    })
}
