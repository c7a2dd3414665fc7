//! A deterministic simulator of castor's HA logic.
//!
//! Two nodes run the real role state machines ([`PrimaryCore`],
//! [`BackupCore`]) inside small shells that mirror the daemons' (epochs,
//! heartbeats, the failure detector's timer, the witness's claims), over a
//! simulated network, witness and clock, all driven from one seed. Faults
//! are injected at random: crashes, process pauses, partitions, message
//! delays, lost witness answers and witness outages. After every step the
//! simulator checks what a client could observe:
//!
//! - no two nodes ever release different output at the same console offset
//!   (one history: everything released is a prefix of one committed history);
//! - a takeover resumes from a checkpoint the primary committed;
//! - once faults stop, exactly one node serves again and its output grows.
//!
//! The same seed replays the same run exactly; a failure names its seed and
//! the trace of its last events. The guest is modelled by its console: one
//! output unit per epoch, identified by the history it belongs to.

use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use protocol::EndReason;

use crate::rng::Rng;

use crate::ha::{
    BackupAction, BackupCore, BackupInput, Claim, PrimaryAction, PrimaryCore, PrimaryInput,
    Timeouts,
};

/// Virtual time in microseconds.
type Us = u64;

const MS: Us = 1000;
const EPOCH: Us = 25 * MS;
const HEARTBEAT: Us = 5 * MS;
const WATCH_TICK: Us = MS;
const PRIMARY_TIMEOUT: Us = 1000 * MS;
const CONNECT_RETRY: Us = 200 * MS;
const CLAIM_RETRY: Us = 100 * MS;
const WITNESS_TIMEOUT: Us = 500 * MS;
const HOLD_LIMIT: usize = 40;
const MAX_IN_FLIGHT: usize = 4;
const TIMEOUTS: Timeouts = Timeouts {
    silence: Duration::from_millis(30),
    after_resync: Duration::from_millis(500),
    resync_grace: Duration::from_secs(2),
};

/// A bug planted in a shell, to show that the simulator finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The primary releases an epoch's output when it sends the checkpoint,
    /// not when the backup acks it.
    ReleaseBeforeAck,
    /// The backup takes over without asking the witness.
    TakeoverWithoutWitness,
    /// The backup keeps committing and acking while its claim is pending.
    NoFreeze,
}

/// What a run does.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The seed.
    pub seed: u64,
    /// A witness decides role changes (`false`: `--witness none`).
    pub witness: bool,
    /// Inject pauses, partitions, delays and witness outages (`false`:
    /// crashes only).
    pub all_faults: bool,
    /// Virtual time during which faults are injected.
    pub fault_time: Duration,
    /// Virtual time after the faults stop, for recovery.
    pub calm_time: Duration,
    /// A planted bug.
    pub bug: Option<Bug>,
    /// Put the messages sent (but heartbeats and acks) in the trace.
    pub trace_messages: bool,
}

impl Settings {
    /// A witnessed run with every kind of fault.
    pub fn new(seed: u64) -> Settings {
        Settings {
            seed,
            witness: true,
            all_faults: true,
            fault_time: Duration::from_secs(20),
            calm_time: Duration::from_secs(15),
            bug: None,
            trace_messages: false,
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Safety (two histories, a takeover behind what the world saw) or
    /// liveness (nobody serves after the faults stopped).
    pub safety: bool,
    /// The seed that replays it.
    pub seed: u64,
    /// Virtual time, µs.
    pub at: u64,
    /// What broke.
    pub what: String,
    /// The last events before it.
    pub trace: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} at {:.3} s: {}\nreplay: CASTOR_SIM_SEED={} cargo test -p castor-node --test sim\nlast events:\n{}",
            self.seed,
            self.at as f64 / 1e6,
            self.what,
            self.seed,
            self.trace
        )
    }
}

/// What a clean run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Takeovers.
    pub takeovers: u32,
    /// Nodes fenced.
    pub fences: u32,
    /// Faults injected.
    pub faults: u32,
    /// Output units released to the world.
    pub released: usize,
}

/// One unit of console output: which history, which position.
type Unit = (u32, usize);

#[derive(Debug, Clone)]
enum Msg {
    Hello { session: u64, token: u64 },
    Checkpoint { epoch: u64, history: Vec<Unit> },
    Ack { epoch: u64 },
    Heartbeat,
    Close(EndReason),
}

#[derive(Debug, Clone)]
enum Ev {
    Epoch(usize),
    Heartbeat(usize),
    Watch(usize),
    Connect(usize),
    Deliver { to: usize, conn: u64, msg: Msg },
    ClaimAnswer { node: usize, claim: Claim },
    Fault,
    Restart(usize),
    Resume(usize),
    Heal,
    WitnessBack,
}

struct Queued {
    at: Us,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct PrimaryShell {
    core: PrimaryCore<()>,
    branch: u32,
    history: Vec<Unit>,
    released: usize,
    next_epoch: u64,
    last_heard: Us,
    held_pause: bool,
}

struct BackupShell {
    core: BackupCore,
    replica: Option<Vec<Unit>>,
    last_tick: Us,
    /// When it last received anything from the primary (for the trace).
    last_msg: Us,
}

enum Role {
    Primary(Box<PrimaryShell>),
    Backup(Box<BackupShell>),
    Down,
}

struct Node {
    role: Role,
    /// This node took over as a backup: its listener refuses every session
    /// (`AlreadyTakenOver`) until it is restarted.
    refuses: bool,
    /// The connection this node is in, if any.
    conn: Option<u64>,
    /// Paused until then (SIGSTOP).
    paused_until: Option<Us>,
}

/// The simulated world.
pub struct Sim {
    s: Settings,
    rng: Rng,
    now: Us,
    seq: u64,
    queue: BinaryHeap<Queued>,
    nodes: [Node; 2],
    next_conn: u64,
    /// The link is cut until then.
    partitioned_until: Option<Us>,
    /// Messages from node `i` are slowed by `slow[i].1` until `slow[i].0`.
    slow: [(Us, Us); 2],
    /// The last delivery time of each direction (a stream keeps its order).
    last_at: [Us; 2],
    witness_up: bool,
    /// Faults stop here.
    fault_end: Us,
    owner: (usize, u64),
    world: Vec<Unit>,
    branches: u32,
    trace: VecDeque<String>,
    report: Report,
}

impl Sim {
    /// A pair: node 0 boots the guest (token 1 at the witness), node 1 is
    /// its backup.
    pub fn new(s: Settings) -> Sim {
        let mut sim = Sim {
            s,
            rng: Rng::new(s.seed ^ 0x5eed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: [
                Node {
                    role: Role::Down,
                    refuses: false,
                    conn: None,
                    paused_until: None,
                },
                Node {
                    role: Role::Down,
                    refuses: false,
                    conn: None,
                    paused_until: None,
                },
            ],
            next_conn: 0,
            partitioned_until: None,
            slow: [(0, 0); 2],
            last_at: [0; 2],
            witness_up: true,
            fault_end: s.fault_time.as_micros() as Us,
            owner: (0, 1),
            world: Vec::new(),
            branches: 0,
            trace: VecDeque::new(),
            report: Report::default(),
        };
        let token = if s.witness { 1 } else { 0 };
        sim.become_primary(0, Vec::new(), token);
        sim.become_backup(1);
        sim
    }

    fn at(&mut self, after: Us, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + after,
            seq: self.seq,
            ev,
        });
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= 400 {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("{:>10.3} ms  {line}", self.now as f64 / 1e3));
    }

    fn violation(&self, what: String) -> Violation {
        let mut trace = String::new();
        for l in &self.trace {
            let _ = writeln!(trace, "  {l}");
        }
        Violation {
            safety: true,
            seed: self.s.seed,
            at: self.now,
            what,
            trace,
        }
    }

    fn become_primary(&mut self, n: usize, history: Vec<Unit>, token: u64) {
        self.branches += 1;
        let released = history.len();
        self.nodes[n].role = Role::Primary(Box::new(PrimaryShell {
            core: PrimaryCore::new(MAX_IN_FLIGHT, self.s.witness, token),
            branch: self.branches,
            history,
            released,
            next_epoch: 1,
            last_heard: self.now,
            held_pause: false,
        }));
        self.nodes[n].conn = None;
        self.at(EPOCH, Ev::Epoch(n));
        self.at(HEARTBEAT, Ev::Heartbeat(n));
        self.at(0, Ev::Connect(n));
    }

    fn become_backup(&mut self, n: usize) {
        self.nodes[n].refuses = false;
        self.nodes[n].role = Role::Backup(Box::new(BackupShell {
            core: BackupCore::new(TIMEOUTS, self.s.witness),
            replica: None,
            last_tick: self.now,
            last_msg: self.now,
        }));
        self.nodes[n].conn = None;
        self.at(WATCH_TICK, Ev::Watch(n));
    }

    /// Output released by node `n` up to `upto` of `history`: checked
    /// against everything the world has seen.
    fn release(
        &mut self,
        n: usize,
        history: &[Unit],
        from: usize,
        upto: usize,
    ) -> Result<(), Violation> {
        for (o, &u) in history.iter().enumerate().take(upto).skip(from) {
            match self.world.get(o) {
                Some(&w) if w != u => {
                    return Err(self.violation(format!(
                        "two histories: node {n} released {u:?} at offset {o}, the world saw {w:?}"
                    )))
                }
                Some(_) => {}
                None => {
                    debug_assert_eq!(o, self.world.len());
                    self.world.push(u);
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, from: usize, msg: Msg) {
        let Some(conn) = self.nodes[from].conn else {
            return;
        };
        let to = 1 - from;
        let mut delay = self.rng.range(100, 3 * MS);
        if self.s.all_faults && self.now < self.fault_end && self.rng.chance(5) {
            delay += self.rng.range(10 * MS, 300 * MS);
        }
        if self.slow[from].0 > self.now {
            delay += self.slow[from].1;
        }
        // One stream: deliveries keep the order of sending.
        let at = (self.now + delay).max(self.last_at[from]);
        self.last_at[from] = at;
        if self.s.trace_messages && !matches!(msg, Msg::Heartbeat | Msg::Ack { .. }) {
            let line = format!("send {from}->{to} conn {conn} at {at} {msg:?}");
            let line: String = line.chars().take(120).collect();
            self.log(line);
        }
        self.at(at - self.now, Ev::Deliver { to, conn, msg });
    }

    fn end_session(&mut self, n: usize, why: EndReason) {
        if self.nodes[n].conn.is_some() {
            self.send(n, Msg::Close(why));
            self.nodes[n].conn = None;
        }
    }

    /// Runs to the end; the first violation, or what happened.
    pub fn run(mut self) -> Result<Report, Violation> {
        let fault_end = self.s.fault_time.as_micros() as Us;
        let end = fault_end + self.s.calm_time.as_micros() as Us;
        self.schedule_faults(fault_end);
        let mut released_at_calm = None;
        while let Some(q) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = q.at;
            if self.now >= fault_end + 10_000 * MS && released_at_calm.is_none() {
                released_at_calm = Some(self.world.len());
            }
            self.step(q.ev)?;
        }
        self.now = end;
        // Liveness: one node serves, and its output grew after the faults.
        let serving: Vec<usize> = (0..2)
            .filter(|&n| matches!(&self.nodes[n].role, Role::Primary(p) if !p.core.fenced()))
            .collect();
        for n in 0..2 {
            let state = match &self.nodes[n].role {
                Role::Primary(p) => format!(
                    "primary token {} in_session {} claiming {} protected {} in_flight {} released {} of {} fenced {}",
                    p.core.token(),
                    p.core.in_session(),
                    p.core.claiming(),
                    p.core.protected(),
                    p.core.in_flight(),
                    p.released,
                    p.history.len(),
                    p.core.fenced()
                ),
                Role::Backup(b) => format!(
                    "backup token {} committed {:?} frozen {} can_take_over {}",
                    b.core.token(),
                    b.core.committed(),
                    b.core.frozen(),
                    b.core.can_take_over()
                ),
                Role::Down => "down".into(),
            };
            let conn = self.nodes[n].conn;
            self.log(format!("END node {n}: {state}, conn {conn:?}"));
        }
        let liveness = |v: Violation| Violation { safety: false, ..v };
        if serving.len() != 1 {
            return Err(liveness(self.violation(format!(
                "{} nodes run the guest {:.0} s after the faults stopped",
                serving.len(),
                self.s.calm_time.as_secs_f64()
            ))));
        }
        if released_at_calm.is_some_and(|r| self.world.len() <= r) {
            return Err(liveness(self.violation(
                "no output released in the last seconds after the faults stopped".into(),
            )));
        }
        self.report.released = self.world.len();
        Ok(self.report)
    }

    fn schedule_faults(&mut self, until: Us) {
        let mut t = self.rng.range(2000 * MS, 4000 * MS);
        while t < until {
            self.at(t, Ev::Fault);
            t += self.rng.range(1000 * MS, 4000 * MS);
        }
    }

    /// Node `n` could serve the guest if the other one died.
    fn could_serve(&self, n: usize) -> bool {
        // With a witness, only from the current token: an older one is
        // doomed to be fenced.
        let current = |token: u64| !self.s.witness || token == self.owner.1;
        match &self.nodes[n].role {
            Role::Primary(p) => !p.core.fenced() && current(p.core.token()),
            Role::Backup(b) => b.core.can_take_over() && current(b.core.token()),
            Role::Down => false,
        }
    }

    fn inject_fault(&mut self) {
        self.report.faults += 1;
        let n = self.rng.below(2) as usize;
        let mut kind = if self.s.all_faults {
            self.rng.below(6)
        } else {
            0
        };
        // A crash only where the other node could serve, and not of a node
        // whose claim may have won at the witness: two failures at once
        // lose the VM whatever castor does (safety holds; the run would
        // only show that).
        let claiming = match &self.nodes[n].role {
            Role::Primary(p) => p.core.claiming(),
            Role::Backup(b) => b.core.frozen(),
            Role::Down => false,
        };
        if kind == 0
            && (claiming || !self.could_serve(1 - n) || self.nodes[1 - n].paused_until.is_some())
        {
            if !self.s.all_faults {
                return;
            }
            kind = 1;
        }
        match kind {
            0 => {
                self.log(format!("FAULT crash node {n}"));
                self.nodes[n].role = Role::Down;
                self.nodes[n].conn = None;
                self.nodes[n].paused_until = None;
                let after = self.rng.range(300 * MS, 2000 * MS);
                self.at(after, Ev::Restart(n));
            }
            1 | 2 => {
                let d = self.rng.range(50 * MS, 3000 * MS);
                self.log(format!("FAULT pause node {n} for {} ms", d / MS));
                self.nodes[n].paused_until = Some(self.now + d);
                self.at(d, Ev::Resume(n));
            }
            3 => {
                let d = self.rng.range(50 * MS, 4000 * MS);
                self.log(format!("FAULT partition for {} ms", d / MS));
                let until = (self.now + d).max(self.partitioned_until.unwrap_or(0));
                self.partitioned_until = Some(until);
                self.at(until - self.now, Ev::Heal);
            }
            4 => {
                let d = self.rng.range(100 * MS, 3000 * MS);
                self.log(format!("FAULT witness down for {} ms", d / MS));
                self.witness_up = false;
                self.at(d, Ev::WitnessBack);
            }
            _ => {
                let d = self.rng.range(20 * MS, 500 * MS);
                let for_ = self.rng.range(100 * MS, 2000 * MS);
                self.log(format!(
                    "FAULT node {n}'s messages late by {} ms for {} ms",
                    d / MS,
                    for_ / MS
                ));
                self.slow[n] = (self.now + for_, d);
            }
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), Violation> {
        // The world's own events.
        match &ev {
            Ev::Fault => {
                self.inject_fault();
                return Ok(());
            }
            Ev::Restart(n) => {
                let n = *n;
                if matches!(self.nodes[n].role, Role::Down) {
                    self.log(format!("node {n} restarts as a backup"));
                    self.become_backup(n);
                }
                return Ok(());
            }
            Ev::Resume(n) => {
                self.log(format!("node {n} resumes"));
                if self.nodes[*n].paused_until.is_some_and(|t| t <= self.now) {
                    self.nodes[*n].paused_until = None;
                }
                return Ok(());
            }
            Ev::Heal => {
                if self.partitioned_until.is_some_and(|t| t <= self.now) {
                    self.log("partition healed".into());
                    self.partitioned_until = None;
                }
                return Ok(());
            }
            Ev::WitnessBack => {
                self.log("witness back".into());
                self.witness_up = true;
                return Ok(());
            }
            _ => {}
        }
        let n = match &ev {
            Ev::Epoch(n) | Ev::Heartbeat(n) | Ev::Watch(n) | Ev::Connect(n) => *n,
            Ev::Deliver { to, .. } => *to,
            Ev::ClaimAnswer { node, .. } => *node,
            _ => unreachable!(),
        };
        // A paused node handles nothing until it resumes; a partition
        // holds messages until it heals.
        if let Some(until) = self.nodes[n].paused_until {
            self.at(until.saturating_sub(self.now) + 1, ev);
            return Ok(());
        }
        if let (Some(until), Ev::Deliver { .. }) = (self.partitioned_until, &ev) {
            // Held, in order, until the partition heals.
            self.at(until - self.now + 1, ev);
            return Ok(());
        }
        match (&mut self.nodes[n].role, ev) {
            (Role::Down, _) => Ok(()),
            (Role::Primary(_), Ev::Epoch(_)) => self.primary_epoch(n),
            (Role::Primary(_), Ev::Heartbeat(_)) => self.primary_heartbeat(n),
            (Role::Primary(_), Ev::Connect(_)) => self.connect(n),
            (Role::Primary(_), Ev::Deliver { conn, msg, .. }) => self.primary_msg(n, conn, msg),
            (Role::Primary(_), Ev::ClaimAnswer { claim, .. }) => {
                self.primary_feed(n, PrimaryInput::Claimed(claim))
            }
            (Role::Backup(_), Ev::Watch(_)) => self.backup_tick(n),
            (Role::Backup(_), Ev::Deliver { conn, msg, .. }) => self.backup_msg(n, conn, msg),
            (Role::Backup(_), Ev::ClaimAnswer { claim, .. }) => {
                self.backup_feed(n, BackupInput::Claimed(claim))
            }
            // A node that changed role since: the event is stale.
            _ => Ok(()),
        }
    }

    fn primary(&mut self, n: usize) -> &mut PrimaryShell {
        match &mut self.nodes[n].role {
            Role::Primary(p) => p,
            _ => unreachable!("node {n} is a primary"),
        }
    }

    fn primary_token(&self, n: usize) -> u64 {
        match &self.nodes[n].role {
            Role::Primary(p) => p.core.token(),
            _ => 0,
        }
    }

    fn backup(&mut self, n: usize) -> &mut BackupShell {
        match &mut self.nodes[n].role {
            Role::Backup(b) => b,
            _ => unreachable!("node {n} is a backup"),
        }
    }

    fn claim(&mut self, node: usize, expected: u64, retry: bool) {
        let me = node;
        let wait = if retry { CLAIM_RETRY } else { 0 };
        let latency = self.rng.range(MS, 20 * MS);
        let claim = if !self.s.witness {
            unreachable!("claims need a witness")
        } else if !self.witness_up {
            self.at(
                wait + WITNESS_TIMEOUT,
                Ev::ClaimAnswer {
                    node,
                    claim: Claim::Unreachable,
                },
            );
            return;
        } else {
            // The compare-and-swap happens now (when it reaches the witness).
            let (owner, token) = self.owner;
            if owner == me && token == expected + 1 {
                Claim::Won { token }
            } else if token != expected {
                Claim::Lost {
                    owner: format!("node {owner}"),
                    token,
                }
            } else {
                self.owner = (me, expected + 1);
                Claim::Won {
                    token: expected + 1,
                }
            }
        };
        self.log(format!(
            "node {node} claims from token {expected}: {claim:?}"
        ));
        // The answer may be lost after the swap happened.
        let claim = if self.s.all_faults && self.now < self.fault_end && self.rng.chance(20) {
            self.log(format!("node {node}: the witness's answer is lost"));
            Claim::Unreachable
        } else {
            claim
        };
        self.at(wait + latency, Ev::ClaimAnswer { node, claim });
    }

    // --- the primary's shell (primary/src/epoch.rs, net.rs) ---

    fn primary_epoch(&mut self, n: usize) -> Result<(), Violation> {
        self.at(EPOCH, Ev::Epoch(n));
        let bug = self.s.bug;
        let p = self.primary(n);
        if p.core.fenced() {
            return Ok(());
        }
        // The guest runs: one unit of output this epoch, unless paused
        // because the hold is full.
        let held = p.history.len() - p.released;
        p.held_pause = p.core.claiming() && (p.held_pause || held >= HOLD_LIMIT);
        if !p.held_pause {
            let unit = (p.branch, p.history.len());
            p.history.push(unit);
        }
        if !p.core.holding() {
            let (h, from) = (p.history.clone(), p.released);
            p.released = h.len();
            return self.release(n, &h, from, h.len());
        }
        if !(p.core.in_session() && p.core.may_send()) {
            return Ok(());
        }
        let epoch = p.next_epoch;
        p.next_epoch += 1;
        let history = p.history.clone();
        let release_to = history.len();
        self.send(
            n,
            Msg::Checkpoint {
                epoch,
                history: history.clone(),
            },
        );
        self.primary_feed(
            n,
            PrimaryInput::Sent {
                epoch,
                release_to: release_to as u64,
                meta: (),
            },
        )?;
        if bug == Some(Bug::ReleaseBeforeAck) {
            let p = self.primary(n);
            let from = p.released;
            p.released = release_to;
            return self.release(n, &history, from, release_to);
        }
        Ok(())
    }

    fn primary_heartbeat(&mut self, n: usize) -> Result<(), Violation> {
        self.at(HEARTBEAT, Ev::Heartbeat(n));
        if self.nodes[n].conn.is_none() {
            return Ok(());
        }
        let silent = self.now - self.primary(n).last_heard;
        if silent > PRIMARY_TIMEOUT {
            let why = EndReason::Silent(Duration::from_micros(silent));
            self.end_session(n, why.clone());
            return self.primary_ended(n, why);
        }
        self.send(n, Msg::Heartbeat);
        Ok(())
    }

    fn connect(&mut self, n: usize) -> Result<(), Violation> {
        let p = self.primary(n);
        if p.core.fenced() || self.nodes[n].conn.is_some() {
            return Ok(());
        }
        let peer = 1 - n;
        let reachable = self.partitioned_until.is_none() && self.nodes[peer].paused_until.is_none();
        match &self.nodes[peer].role {
            Role::Backup(_) if reachable && self.nodes[peer].conn.is_none() => {
                self.next_conn += 1;
                let c = self.next_conn;
                self.nodes[n].conn = Some(c);
                self.nodes[peer].conn = Some(c);
                self.primary(n).last_heard = self.now;
                self.log(format!("node {n} connects to node {peer} (conn {c})"));
                self.primary_feed(n, PrimaryInput::Connected)
            }
            Role::Primary(q) if reachable && self.nodes[peer].refuses => {
                // Its listener, left from its days as a backup, refuses:
                // fencing a primary older than its takeover.
                let (mine, theirs) = (self.primary_token(n), q.core.token());
                self.log(format!(
                    "node {n} (token {mine}): node {peer} (token {theirs}) refuses, it has taken over"
                ));
                let why = if mine > theirs {
                    EndReason::Refused("not a backup".into())
                } else {
                    EndReason::AlreadyTakenOver
                };
                self.primary_feed(n, PrimaryInput::Connected)?;
                self.primary_ended(n, why)
            }
            _ => {
                self.at(CONNECT_RETRY, Ev::Connect(n));
                Ok(())
            }
        }
    }

    fn primary_msg(&mut self, n: usize, conn: u64, msg: Msg) -> Result<(), Violation> {
        if self.nodes[n].conn != Some(conn) {
            return Ok(());
        }
        self.primary(n).last_heard = self.now;
        match msg {
            Msg::Ack { epoch } => self.primary_feed(n, PrimaryInput::Ack { epoch }),
            Msg::Close(why) => {
                self.nodes[n].conn = None;
                // What the peer's close code reads as.
                let read = EndReason::from_close(why.code(), why.to_string().as_bytes());
                self.primary_ended(n, read)
            }
            _ => Ok(()),
        }
    }

    fn primary_ended(&mut self, n: usize, why: EndReason) -> Result<(), Violation> {
        self.nodes[n].conn = None;
        self.log(format!("node {n} (primary): session ended: {why}"));
        self.primary_feed(n, PrimaryInput::Ended(why))?;
        if matches!(&self.nodes[n].role, Role::Primary(p) if !p.core.fenced()) {
            self.at(CONNECT_RETRY, Ev::Connect(n));
        }
        Ok(())
    }

    fn primary_feed(&mut self, n: usize, input: PrimaryInput<()>) -> Result<(), Violation> {
        let actions = self.primary(n).core.on(input);
        for a in actions {
            if !matches!(self.nodes[n].role, Role::Primary(_)) {
                break;
            }
            match a {
                PrimaryAction::StartSession => {
                    let p = self.primary(n);
                    p.next_epoch = 1;
                    let token = p.core.token();
                    let session = self.rng.next_u64();
                    self.send(n, Msg::Hello { session, token });
                    // The full resync goes out at the next epoch.
                }
                PrimaryAction::Protected => self.log(format!("node {n}: protected")),
                PrimaryAction::Release { upto, .. } => {
                    if self.s.bug == Some(Bug::ReleaseBeforeAck) {
                        continue;
                    }
                    let p = self.primary(n);
                    let (h, from) = (p.history.clone(), p.released);
                    let upto = (upto as usize).max(from);
                    p.released = upto;
                    self.release(n, &h, from, upto)?;
                }
                PrimaryAction::EndSession(why) => {
                    self.end_session(n, why.clone());
                    self.primary_ended(n, why)?;
                }
                PrimaryAction::Unprotected(why) => {
                    self.log(format!("node {n}: carries on alone ({why})"));
                    let p = self.primary(n);
                    let (h, from) = (p.history.clone(), p.released);
                    p.released = h.len();
                    p.held_pause = false;
                    self.release(n, &h, from, h.len())?;
                }
                PrimaryAction::Fence(why) => {
                    self.log(format!("node {n}: FENCED ({why})"));
                    self.report.fences += 1;
                    self.end_session(n, EndReason::Local("fenced".into()));
                    // The process exits; an operator restarts it as a backup.
                    self.nodes[n].role = Role::Down;
                    let after = self.rng.range(300 * MS, 2000 * MS);
                    self.at(after, Ev::Restart(n));
                    return Ok(());
                }
                PrimaryAction::Claim { expected, retry } => self.claim(n, expected, retry),
            }
        }
        Ok(())
    }

    // --- the backup's shell (backup/src/net.rs, replica.rs, watch.rs) ---

    fn backup_tick(&mut self, n: usize) -> Result<(), Violation> {
        self.at(WATCH_TICK, Ev::Watch(n));
        let now = self.now;
        let b = self.backup(n);
        let gap = now - b.last_tick;
        let stalled = if gap > 5 * MS { gap - WATCH_TICK } else { 0 };
        b.last_tick = now;
        self.backup_feed(
            n,
            BackupInput::Tick {
                now: Duration::from_micros(now),
                stalled: Duration::from_micros(stalled),
            },
        )
    }

    fn backup_msg(&mut self, n: usize, conn: u64, msg: Msg) -> Result<(), Violation> {
        if self.nodes[n].conn != Some(conn) {
            return Ok(());
        }
        let now = Duration::from_micros(self.now);
        self.backup(n).last_msg = self.now;
        self.backup(n).core.on(BackupInput::Heard { now });
        match msg {
            Msg::Hello { session, token } => {
                let a = self.backup(n).core.on(BackupInput::SessionStarted {
                    session,
                    token,
                    now,
                });
                if let Some(BackupAction::Refuse(why)) = a.into_iter().next() {
                    self.log(format!("node {n} refuses a session: {why}"));
                    self.end_session(n, why.clone());
                    self.backup(n)
                        .core
                        .on(BackupInput::SessionEnded { reason: why });
                } else {
                    self.log(format!("node {n} (backup): new session, token {token}"));
                    self.backup(n).replica = None;
                }
                Ok(())
            }
            Msg::Checkpoint { epoch, history } => {
                let b = self.backup(n);
                if b.core.taken_over() {
                    return Ok(());
                }
                if b.core.frozen() {
                    if self.s.bug == Some(Bug::NoFreeze) {
                        // Acks what it does not commit.
                        self.send(n, Msg::Ack { epoch });
                        return Ok(());
                    }
                    let why = EndReason::Refused("the backup is claiming the VM".into());
                    self.end_session(n, why.clone());
                    self.backup(n)
                        .core
                        .on(BackupInput::SessionEnded { reason: why });
                    return Ok(());
                }
                if epoch != 1 && b.replica.is_none() {
                    // A session's first checkpoint is its full resync.
                    return Ok(());
                }
                if epoch == 1 {
                    self.log(format!("node {n} (backup): full resync committed"));
                }
                let b = self.backup(n);
                let from = b.replica.as_ref().map_or(0, Vec::len);
                b.replica = Some(history.clone());
                b.core.on(BackupInput::Committed { epoch, now });
                // The backup's console serves committed output.
                self.release(n, &history, from.min(history.len()), history.len())?;
                self.send(n, Msg::Ack { epoch });
                Ok(())
            }
            Msg::Close(why) => {
                self.nodes[n].conn = None;
                let read = EndReason::from_close(why.code(), why.to_string().as_bytes());
                self.log(format!("node {n} (backup): session ended: {read}"));
                self.backup_feed(n, BackupInput::SessionEnded { reason: read })
            }
            Msg::Heartbeat => {
                self.send(n, Msg::Heartbeat);
                Ok(())
            }
            Msg::Ack { .. } => Ok(()),
        }
    }

    fn backup_feed(&mut self, n: usize, input: BackupInput) -> Result<(), Violation> {
        let actions = self.backup(n).core.on(input);
        for a in actions {
            match a {
                BackupAction::TakeOver { epoch, token, .. } => {
                    let replica = self.backup(n).replica.clone().unwrap_or_default();
                    self.log(format!(
                        "node {n}: TAKES OVER at epoch {epoch} (offset {}, token {token})",
                        replica.len()
                    ));
                    self.report.takeovers += 1;
                    // It resumes from what it committed: everything the
                    // world saw must be in it.
                    if self.world.len() > replica.len() {
                        return Err(self.violation(format!(
                            "node {n} takes over at offset {} but the world saw up to {}",
                            replica.len(),
                            self.world.len()
                        )));
                    }
                    self.release(n, &replica, 0, replica.len())?;
                    self.end_session(n, EndReason::TakenOver);
                    self.become_primary(n, replica, token);
                    self.nodes[n].refuses = true;
                    return Ok(());
                }
                BackupAction::Claim { expected, retry } => {
                    if self.s.bug == Some(Bug::TakeoverWithoutWitness) {
                        return self.backup_feed(
                            n,
                            BackupInput::Claimed(Claim::Won {
                                token: expected + 1,
                            }),
                        );
                    }
                    if !retry {
                        let silent = (self.now - self.backup(n).last_msg) / MS;
                        self.log(format!("node {n} (backup): primary silent for {silent} ms"));
                    }
                    self.claim(n, expected, retry);
                }
                BackupAction::Refuse(_) => {}
            }
        }
        Ok(())
    }
}

/// Runs the simulation of `s`.
pub fn run(s: Settings) -> Result<Report, Violation> {
    Sim::new(s).run()
}
