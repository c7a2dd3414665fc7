//! A deterministic simulator of castor's HA logic.
//!
//! Three hosts run the real role state machines ([`PrimaryCore`],
//! [`BackupCore`], [`handover`]) inside small shells that mirror the
//! daemons' (epochs, heartbeats, the failure detector's timer, the
//! witness's claims, goodbyes, `--verify`, the migration's commit point),
//! over a simulated network, witness and clock, all driven from one seed.
//! Node 0 boots the guest, node 1 is its backup, node 2 is a spare host: a
//! change of backup or a migration goes there. Faults are injected at
//! random: crashes, process pauses, partitions, message delays, lost
//! witness answers, witness outages, checkpoints applied wrongly on the
//! backup; and so are planned operations: a change of backup, a live
//! migration (with a fault at one step of its handover), an operator's
//! switchover, a planned stop of the VM. After every step the simulator
//! checks what a client could observe:
//!
//! - no two nodes ever release different output at the same offset of the
//!   console or of the guest's network output (one history: everything
//!   released is a prefix of one history);
//! - a takeover resumes from a checkpoint the primary committed: one that
//!   holds everything the world saw, with the primary's memory (not a
//!   replica that failed verification);
//! - a backup that has its primary's goodbye never starts a takeover of its
//!   own (an operator's request aside);
//! - a migration's source sends `Go` only while the witness names the
//!   destination, and a destination runs the guest only while it does;
//! - once faults stop, exactly one node serves again and its output grows
//!   (unless the VM was stopped on purpose, or lost as documented: a crash
//!   of an unprotected guest's host during a migration).
//!
//! The same seed replays the same run exactly; a failure names its seed and
//! the trace of its last events. The guest is modelled by its output: one
//! console unit and up to two network frames per epoch, each identified by
//! the history (branch) it belongs to and its position.

use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use protocol::EndReason;

use crate::rng::Rng;

use crate::ha::{
    handover, BackupAction, BackupCore, BackupInput, Claim, Handover, PrimaryAction, PrimaryCore,
    PrimaryInput, Timeouts,
};

/// Virtual time in microseconds.
type Us = u64;

const MS: Us = 1000;
/// `--epoch-ms` (25).
const EPOCH: Us = 25 * MS;
/// `--heartbeat-ms` (5).
const HEARTBEAT: Us = 5 * MS;
/// The failure detector's tick (backup/src/watch.rs).
const WATCH_TICK: Us = MS;
/// `--backup-timeout-ms` (200).
const PRIMARY_TIMEOUT: Us = 200 * MS;
/// The wait before connecting again (primary/src/net.rs).
const CONNECT_RETRY: Us = 200 * MS;
/// The first and the longest wait before connecting again to a backup that
/// refused soon after the session began (primary/src/net.rs).
const REFUSED_BACKOFF: Us = 200 * MS;
const REFUSED_BACKOFF_MAX: Us = 1000 * MS;
/// The wait before asking an unreachable witness again.
const CLAIM_RETRY: Us = 100 * MS;
/// `witness::REQUEST_TIMEOUT`.
const WITNESS_TIMEOUT: Us = 500 * MS;
/// Output units held while the witness decides before the guest pauses
/// (the daemons' 4 MiB).
const HOLD_LIMIT: usize = 40;
/// The longest a full resync's image takes to cross the link (the
/// heartbeat echoes wait behind it here, as they do not on the daemons'
/// own path: kept below the primary's timeout).
const RESYNC_CROSSING: Us = 80 * MS;
/// `--max-in-flight` (4).
const MAX_IN_FLIGHT: usize = 4;
/// How long a stopping primary waits for its backup to end the session
/// (primary/src/net.rs `GOODBYE_WAIT`), and a little more before its
/// process exits.
const GOODBYE_WAIT: Us = 2000 * MS;
const GOODBYE_EXIT: Us = 500 * MS;
/// How long a stand-down may wait for the witness (primary/src/migration.rs).
const STAND_DOWN_WAIT: Us = 10_000 * MS;
/// How long the handover asks an unreachable witness (primary/src/migration.rs).
const HANDOVER_WAIT: Us = 10_000 * MS;
/// How long a destination asks an unreachable witness whether it owns the
/// VM (src/migrate_cmd.rs `owned_token`).
const ADMIT_WAIT: Us = 60_000 * MS;
/// A migration link silent this long is dead (migrate/src/source.rs).
const LINK_IDLE: Us = 3000 * MS;
/// How long a migration's source waits for any one answer.
const ANSWER_TIMEOUT: Us = 30_000 * MS;

/// `--heartbeat-timeout-ms` (30) and the longer timeout after a resync
/// (src/main.rs: 500 ms without a witness, the same 30 ms with one).
fn timeouts(witness: bool) -> Timeouts {
    let silence = Duration::from_millis(30);
    Timeouts {
        silence,
        after_resync: if witness {
            silence
        } else {
            Duration::from_millis(500)
        },
        resync_grace: Duration::from_secs(2),
    }
}

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
    /// The backup ignores its primary's goodbye (it does not stand down,
    /// and reads the goodbye's close as a broken connection).
    TakeoverAfterGoodbye,
    /// The backup keeps a checkpoint whose memory digest did not match (it
    /// commits and acks it as if it had).
    IgnoreMismatch,
    /// A migration's source sends `Go` when the witness did not answer its
    /// handover claim.
    GoWithoutSwap,
    /// The primary releases held network frames up to everything the guest
    /// sent so far on any ack, not up to the acked epoch's end.
    PacketsBeforeAck,
    /// A migration's destination runs the guest on `Go` once a read of the
    /// witness names it, without claiming the VM from the handover's token
    /// (so a source that never heard `Finished` and takes the VM back
    /// cannot be told apart).
    AdmitByRead,
    /// The backup resumes from any committed checkpoint, also one whose
    /// output the primary did not hold (a protocol-7 full resync, during
    /// which the primary releases output).
    ResumeUnheld,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 9] = [
        Bug::ReleaseBeforeAck,
        Bug::TakeoverWithoutWitness,
        Bug::NoFreeze,
        Bug::TakeoverAfterGoodbye,
        Bug::IgnoreMismatch,
        Bug::GoWithoutSwap,
        Bug::PacketsBeforeAck,
        Bug::AdmitByRead,
        Bug::ResumeUnheld,
    ];
}

/// What a run does.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The seed.
    pub seed: u64,
    /// A witness decides role changes (`false`: `--witness none`).
    pub witness: bool,
    /// Checkpoints carry memory digests (`--verify`); checkpoints applied
    /// wrongly on the backup are injected only then.
    pub verify: bool,
    /// Inject pauses, partitions, delays, witness outages (`false`:
    /// crashes only).
    pub all_faults: bool,
    /// Planned operations: changes of backup, migrations, switchovers (with
    /// a witness), planned stops.
    pub operations: bool,
    /// An operator's switchover may be asked of a backup at any time, as
    /// `castor takeover` allows (`false`: only of a backup that follows a
    /// session and could take over on its own, as a drain asks it). See
    /// docs/simulator.md: with `true` the simulator finds a split.
    pub switchover_any_time: bool,
    /// Witness answers lost after the swap happened, per mille, while
    /// faults are injected.
    pub lost_answers: u64,
    /// Virtual time during which faults are injected.
    pub fault_time: Duration,
    /// Virtual time after the faults stop, for recovery.
    pub calm_time: Duration,
    /// The pair speaks protocol 7: the primary releases output during a
    /// session's full resync and holds it from the first pause after the
    /// resync's ack, and only checkpoints from there on may be resumed
    /// from (`false`: protocol 6, held from the resync's pause on).
    pub releases_during_resync: bool,
    /// A planted bug.
    pub bug: Option<Bug>,
    /// Put the messages sent (but heartbeats and acks) in the trace.
    pub trace_messages: bool,
}

impl Settings {
    /// A witnessed, verifying run with every kind of fault and operation.
    pub fn new(seed: u64) -> Settings {
        Settings {
            seed,
            witness: true,
            verify: true,
            all_faults: true,
            operations: true,
            switchover_any_time: false,
            lost_answers: 20,
            fault_time: Duration::from_secs(20),
            calm_time: Duration::from_secs(15),
            releases_during_resync: true,
            bug: None,
            trace_messages: false,
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Safety (two histories, a takeover behind what the world saw, a
    /// broken rule of the goodbye or the handover) or liveness (nobody
    /// serves after the faults stopped).
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
    /// Console output units released to the world.
    pub released: usize,
    /// Network frames released to the world.
    pub frames: usize,
    /// Sessions a backup ended on its primary's goodbye.
    pub goodbyes: u32,
    /// Checkpoints that failed verification on the backup.
    pub mismatches: u32,
    /// Changes of backup carried out.
    pub retargets: u32,
    /// Migrations that reached `Go`.
    pub migrations: u32,
    /// Handovers that stayed on the source (no `Go`).
    pub stays: u32,
    /// Migrations whose source, never hearing `Finished` after `Go`, took
    /// the VM back at the witness (the destination had not claimed it).
    pub taken_back: u32,
    /// The VM was stopped on purpose.
    pub stopped: bool,
    /// Why the VM was lost, if it was (a documented loss: liveness is not
    /// checked).
    pub lost: Option<String>,
}

/// One unit of output: which history, which position.
type Unit = (u32, usize);

/// The guest's output so far, one stream per kind: its state, as far as a
/// client can tell.
#[derive(Debug, Clone, Default, PartialEq)]
struct Guest {
    console: Vec<Unit>,
    net: Vec<Unit>,
}

const CONSOLE: usize = 0;
const NET: usize = 1;

impl Guest {
    fn stream(&self, s: usize) -> &[Unit] {
        if s == CONSOLE {
            &self.console
        } else {
            &self.net
        }
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Hello {
        session: u64,
        token: u64,
    },
    Checkpoint {
        epoch: u64,
        guest: Guest,
        /// The primary held output from its pause on: it may be resumed
        /// from (`Held`).
        resumable: bool,
        /// It carries the memory digest (`--verify`).
        digest: bool,
        /// A fault: the backup will apply it wrongly (its memory will
        /// differ from the primary's).
        corrupt: bool,
    },
    Ack {
        epoch: u64,
    },
    Heartbeat,
    /// A planned stop, on the control stream (it may overtake checkpoints).
    Goodbye {
        last_epoch: u64,
    },
    /// The end of the data stream, behind its last checkpoint.
    DataEnd,
    Close(EndReason),
    // The migration's connection.
    Switch {
        guest: Guest,
    },
    Verified,
    Go,
    /// The destination runs the guest (it won its claim).
    Finished,
}

/// Who a claim is for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ClaimFor {
    /// The node's role core.
    Core,
    /// The handover of migration `id` (the owner becomes the destination).
    Handover(u64),
    /// The destination of migration `id` claims the VM on `Go`.
    Admit(u64),
    /// The source of migration `id`, missing `Finished`, takes it back.
    Reclaim(u64),
}

#[derive(Debug, Clone)]
enum Ev {
    Epoch(usize),
    Heartbeat(usize),
    Watch(usize),
    Connect(usize),
    Deliver {
        to: usize,
        conn: u64,
        msg: Msg,
    },
    /// A claim reaches the witness.
    ClaimAt {
        node: usize,
        owner: usize,
        expected: u64,
        for_: ClaimFor,
    },
    ClaimAnswer {
        node: usize,
        claim: Claim,
        for_: ClaimFor,
    },
    Fault,
    Restart(usize),
    Resume(usize),
    Heal,
    WitnessBack,
    /// The VM is stopped on purpose.
    Stop,
    /// The migration's pre-copy is done: the switch.
    Precopied {
        node: usize,
        id: u64,
    },
    /// The migration's connection broke (its other end crashed).
    MigrationBroke {
        node: usize,
        id: u64,
    },
    /// A destination asks the witness whether it owns the VM.
    Admit {
        node: usize,
        id: u64,
        deadline: Us,
    },
    /// A migration's source has waited [`LINK_IDLE`] more for `Finished`.
    Unconfirmed {
        node: usize,
        id: u64,
        since: Us,
    },
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

/// What a primary is standing down for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    /// The VM stops: the process exits once the session is over.
    Stop,
    /// A change of backup to this node.
    Retarget(usize),
    /// A migration to this node.
    Migrate(usize),
}

#[derive(Debug, Clone, Copy)]
struct Leaving {
    plan: Plan,
    since: Us,
}

struct PrimaryShell {
    /// Checkpoints in flight keep the guest's frame count at their end.
    core: PrimaryCore<u64>,
    branch: u32,
    guest: Guest,
    released: usize,
    net_released: usize,
    next_epoch: u64,
    last_heard: Us,
    held_pause: bool,
    /// The backup it protects toward.
    target: usize,
    /// When the current session began, and the wait after a refusal.
    session_at: Us,
    backoff: Us,
    /// A planned stop or a stand-down under way.
    leaving: Option<Leaving>,
    /// The guest is paused for a migration's switch.
    switching: bool,
    /// Its output is closed: never released again (a planned stop, `Go`).
    closed: bool,
    /// A fault: the next checkpoint is applied wrongly on the backup.
    corrupt_next: bool,
}

struct Replica {
    guest: Guest,
    /// Its memory differs from the primary's at that checkpoint.
    corrupt: bool,
}

struct BackupShell {
    core: BackupCore,
    replica: Option<Replica>,
    last_tick: Us,
    /// When it last received anything from the primary (for the trace).
    last_msg: Us,
    /// The primary of its session.
    primary: Option<usize>,
    /// The current session's goodbye reached this node (the simulator's
    /// knowledge, whatever the shell does with it).
    got_goodbye: bool,
    /// The goodbye's last epoch: the session ends once it is committed.
    goodbye_due: Option<u64>,
    /// The session's data stream is still open.
    data_open: bool,
    /// An operator asked this node to take over.
    asked: bool,
    /// Its failure detector's timer runs. With nothing committed a tick
    /// decides nothing (the core returns at once, and the next commit
    /// resets the liveness it would have moved): the timer then stops,
    /// and starts again at the next commit, which saves the simulator
    /// most of an idle backup's events.
    ticking: bool,
}

/// A migration's destination, waiting for the guest.
struct DestShell {
    id: u64,
    guest: Option<Guest>,
    /// The migration's source, and the backup host it protects toward.
    source: usize,
    target: usize,
    /// The token the witness gave this node at the handover, claimed from
    /// on `Go` (0: not read yet).
    handed: u64,
    /// How long it asks a silent witness.
    deadline: Us,
}

enum Role {
    Primary(Box<PrimaryShell>),
    Backup(Box<BackupShell>),
    Dest(Box<DestShell>),
    Down,
}

struct Node {
    role: Role,
    /// This node took over as a backup: its listener refuses every session
    /// (`AlreadyTakenOver`) until it is restarted.
    refuses: bool,
    /// The replication connection this node is in, and its peer.
    conn: Option<(u64, usize)>,
    /// Paused until then (SIGSTOP).
    paused_until: Option<Us>,
}

/// A fault planted at one step of a migration's handover.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// When the destination has verified the state, before the claim.
    Claim,
    /// The witness names the destination; `Go` not sent yet.
    Swapped,
    /// `Go` is sent; the destination has not run the guest yet.
    Go,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HandoverFault {
    None,
    WitnessDown(Step),
    /// The witness silent for longer than the handover asks (10.5–15 s),
    /// from before the handover's claim: the guest stays on the source.
    WitnessDownLong,
    CrashSource(Step),
    CrashDest(Step),
    /// The destination paused for longer than the migration link's idle
    /// timeout (3.5–6 s): right after `Verified`, or (`Step::Go`) on `Go`,
    /// between its read of the witness and its claim.
    PauseDest(Step),
}

struct Migration {
    id: u64,
    source: usize,
    dest: usize,
    fault: HandoverFault,
    /// The handover's deadline for an unreachable witness.
    deadline: Us,
    /// The source's token at the handover.
    token: u64,
    /// `Go` was sent: the source runs the guest again only if it takes the
    /// VM back at the witness, missing `Finished`.
    committed: bool,
    /// The source asks the witness for the VM back until then (0: not).
    reclaim_deadline: Us,
}

/// The simulated world.
pub struct Sim {
    s: Settings,
    rng: Rng,
    now: Us,
    seq: u64,
    queue: BinaryHeap<Queued>,
    nodes: Vec<Node>,
    next_conn: u64,
    /// The network between the hosts is cut until then (the witness stays
    /// reachable).
    partitioned_until: Option<Us>,
    /// Messages from node `i` are slowed by `slow[i].1` until `slow[i].0`.
    slow: [(Us, Us); 3],
    /// The last delivery time of each direction (a stream keeps its order).
    last_at: [[Us; 3]; 3],
    witness_up: bool,
    /// Faults stop here.
    fault_end: Us,
    owner: (usize, u64),
    /// What the world saw of each stream (`None`: a frame never sent).
    world: [Vec<Option<Unit>>; 2],
    branches: u32,
    migration: Option<Migration>,
    /// Corrupt checkpoints sent and not yet delivered.
    corrupt_in_flight: u32,
    trace: VecDeque<String>,
    report: Report,
}

impl Sim {
    /// Node 0 boots the guest (token 1 at the witness) toward node 1, its
    /// backup; node 2 is a spare host (a backup nobody protects toward).
    pub fn new(s: Settings) -> Sim {
        let node = || Node {
            role: Role::Down,
            refuses: false,
            conn: None,
            paused_until: None,
        };
        let mut sim = Sim {
            s,
            rng: Rng::new(s.seed ^ 0x5eed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: vec![node(), node(), node()],
            next_conn: 0,
            partitioned_until: None,
            slow: [(0, 0); 3],
            last_at: [[0; 3]; 3],
            witness_up: true,
            fault_end: s.fault_time.as_micros() as Us,
            owner: (0, 1),
            world: [Vec::new(), Vec::new()],
            branches: 0,
            migration: None,
            corrupt_in_flight: 0,
            trace: VecDeque::new(),
            report: Report::default(),
        };
        let token = if s.witness { 1 } else { 0 };
        sim.become_primary(0, Guest::default(), token, 1);
        sim.become_backup(1);
        sim.become_backup(2);
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

    fn become_primary(&mut self, n: usize, guest: Guest, token: u64, target: usize) {
        self.branches += 1;
        let (released, net_released) = (guest.console.len(), guest.net.len());
        self.nodes[n].role = Role::Primary(Box::new(PrimaryShell {
            core: PrimaryCore::new(MAX_IN_FLIGHT, self.s.witness, token),
            branch: self.branches,
            guest,
            released,
            net_released,
            next_epoch: 1,
            last_heard: self.now,
            held_pause: false,
            target,
            session_at: self.now,
            backoff: REFUSED_BACKOFF,
            leaving: None,
            switching: false,
            closed: false,
            corrupt_next: false,
        }));
        self.nodes[n].conn = None;
        self.at(EPOCH, Ev::Epoch(n));
        self.at(HEARTBEAT, Ev::Heartbeat(n));
        self.at(0, Ev::Connect(n));
    }

    fn become_backup(&mut self, n: usize) {
        self.nodes[n].refuses = false;
        self.nodes[n].role = Role::Backup(Box::new(BackupShell {
            core: BackupCore::new(timeouts(self.s.witness), self.s.witness),
            replica: None,
            last_tick: self.now,
            last_msg: self.now,
            primary: None,
            got_goodbye: false,
            goodbye_due: None,
            data_open: true,
            asked: false,
            ticking: true,
        }));
        self.nodes[n].conn = None;
        self.at(WATCH_TICK, Ev::Watch(n));
    }

    /// Output of stream `s` released by node `n`, from `from` up to `upto`
    /// of `history`: checked against everything the world has seen.
    fn release(
        &mut self,
        n: usize,
        s: usize,
        history: &[Unit],
        from: usize,
        upto: usize,
    ) -> Result<(), Violation> {
        let name = if s == CONSOLE { "console" } else { "network" };
        for (o, &u) in history.iter().enumerate().take(upto).skip(from) {
            let world = &mut self.world[s];
            if world.len() <= o {
                world.resize(o + 1, None);
            }
            match world[o] {
                Some(w) if w != u => {
                    return Err(self.violation(format!(
                        "two histories: node {n} released {u:?} at {name} offset {o}, the world saw {w:?}"
                    )))
                }
                Some(_) => {}
                None => world[o] = Some(u),
            }
        }
        Ok(())
    }

    /// Every stream of primary `n` released up to its end (unprotected).
    fn release_all(&mut self, n: usize) -> Result<(), Violation> {
        let p = self.primary(n);
        if p.closed {
            return Ok(());
        }
        let (g, from, net_from) = (p.guest.clone(), p.released, p.net_released);
        p.released = g.console.len();
        p.net_released = g.net.len();
        self.release(n, CONSOLE, &g.console, from, g.console.len())?;
        self.release(n, NET, &g.net, net_from, g.net.len())
    }

    fn delay(&mut self, from: usize) -> Us {
        let mut delay = self.rng.range(100, 3 * MS);
        if self.s.all_faults && self.now < self.fault_end && self.rng.chance(5) {
            delay += self.rng.range(10 * MS, 300 * MS);
        }
        if self.slow[from].0 > self.now {
            delay += self.slow[from].1;
        }
        delay
    }

    /// Sends on connection `conn` from `from` to `to`, in order.
    fn send_to(&mut self, from: usize, to: usize, conn: u64, msg: Msg) {
        let mut delay = self.delay(from);
        if let Msg::Checkpoint { epoch: 1, .. } = msg {
            // A full resync: the whole image crosses the link.
            delay += self.rng.range(5 * MS, RESYNC_CROSSING);
        }
        // One stream: deliveries keep the order of sending.
        let at = (self.now + delay).max(self.last_at[from][to]);
        self.last_at[from][to] = at;
        if self.s.trace_messages && !matches!(msg, Msg::Heartbeat | Msg::Ack { .. }) {
            let line = format!("send {from}->{to} conn {conn} at {at} {msg:?}");
            let line: String = line.chars().take(120).collect();
            self.log(line);
        }
        if matches!(msg, Msg::Checkpoint { corrupt: true, .. }) {
            self.corrupt_in_flight += 1;
        }
        self.at(at - self.now, Ev::Deliver { to, conn, msg });
    }

    /// Sends on node `from`'s replication connection, if any.
    fn send(&mut self, from: usize, msg: Msg) {
        let Some((conn, to)) = self.nodes[from].conn else {
            return;
        };
        if let Msg::Goodbye { .. } = msg {
            // The control stream: not behind the checkpoints it names.
            let at = self.now + self.delay(from);
            if self.s.trace_messages {
                self.log(format!("send {from}->{to} conn {conn} at {at} {msg:?}"));
            }
            self.at(at - self.now, Ev::Deliver { to, conn, msg });
            return;
        }
        self.send_to(from, to, conn, msg);
    }

    fn end_session(&mut self, n: usize, why: EndReason) {
        if self.nodes[n].conn.is_some() {
            self.send(n, Msg::Close(why));
            self.nodes[n].conn = None;
        }
    }

    /// Runs to the end; the first violation, or what happened.
    pub fn run(mut self) -> Result<Report, Violation> {
        let fault_end = self.fault_end;
        let end = fault_end + self.s.calm_time.as_micros() as Us;
        self.schedule_faults(fault_end);
        let mut released_at_calm = None;
        while let Some(q) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = q.at;
            if self.now >= fault_end + 10_000 * MS && released_at_calm.is_none() {
                released_at_calm = Some(self.world[CONSOLE].len());
            }
            self.step(q.ev)?;
        }
        self.now = end;
        // Liveness: one node serves, and its output grew after the faults.
        let serving: Vec<usize> = (0..3)
            .filter(|&n| matches!(&self.nodes[n].role, Role::Primary(p) if !p.core.fenced()))
            .collect();
        for n in 0..3 {
            let state = match &self.nodes[n].role {
                Role::Primary(p) => format!(
                    "primary token {} target {} in_session {} claiming {} protected {} in_flight {} released {} of {} fenced {} leaving {:?}",
                    p.core.token(),
                    p.target,
                    p.core.in_session(),
                    p.core.claiming(),
                    p.core.protected(),
                    p.core.in_flight(),
                    p.released,
                    p.guest.console.len(),
                    p.core.fenced(),
                    p.leaving.map(|l| l.plan),
                ),
                Role::Backup(b) => format!(
                    "backup token {} committed {:?} frozen {} can_take_over {} goodbye {}",
                    b.core.token(),
                    b.core.committed(),
                    b.core.frozen(),
                    b.core.can_take_over(),
                    b.got_goodbye,
                ),
                Role::Dest(_) => "destination".into(),
                Role::Down => "down".into(),
            };
            let conn = self.nodes[n].conn;
            self.log(format!("END node {n}: {state}, conn {conn:?}"));
        }
        self.report.released = self.world[CONSOLE].len();
        self.report.frames = self.world[NET].iter().filter(|u| u.is_some()).count();
        if self.report.lost.is_some() || (self.report.stopped && serving.is_empty()) {
            return Ok(self.report);
        }
        let liveness = |v: Violation| Violation { safety: false, ..v };
        if serving.len() != 1 {
            return Err(liveness(self.violation(format!(
                "{} nodes run the guest {:.0} s after the faults stopped",
                serving.len(),
                self.s.calm_time.as_secs_f64()
            ))));
        }
        if released_at_calm.is_some_and(|r| self.world[CONSOLE].len() <= r) {
            return Err(liveness(self.violation(
                "no output released in the last seconds after the faults stopped".into(),
            )));
        }
        Ok(self.report)
    }

    fn schedule_faults(&mut self, until: Us) {
        let mut t = self.rng.range(2000 * MS, 4000 * MS);
        while t < until {
            self.at(t, Ev::Fault);
            t += self.rng.range(1000 * MS, 4000 * MS);
        }
        if self.s.operations && self.rng.chance(150) {
            let t = self.rng.range(3000 * MS, until.max(3001 * MS));
            self.at(t, Ev::Stop);
        }
    }

    /// Node `n` could serve the guest if the node running it died.
    fn could_serve(&self, n: usize) -> bool {
        // With a witness, only from the current token: an older one is
        // doomed to be fenced.
        let current = |token: u64| !self.s.witness || token == self.owner.1;
        match &self.nodes[n].role {
            Role::Primary(p) => !p.core.fenced() && !p.closed && current(p.core.token()),
            Role::Backup(b) => b.core.can_take_over() && current(b.core.token()),
            Role::Dest(_) | Role::Down => false,
        }
    }

    /// The primary that runs the guest now, if any.
    fn current_primary(&self) -> Option<usize> {
        (0..3).find(|&n| {
            matches!(&self.nodes[n].role, Role::Primary(p)
                if !p.core.fenced() && !p.closed
                    && (!self.s.witness || p.core.token() == self.owner.1))
        })
    }

    fn crash(&mut self, n: usize) {
        self.log(format!("FAULT crash node {n}"));
        // The VM is lost if it ran here and no other node could serve it
        // (an unprotected guest's host). A destination after `Go` has not
        // run the guest before its claim won: the source takes the VM back
        // unless that claim did (`reclaim_answer`).
        let ran_here = match &self.nodes[n].role {
            Role::Primary(p) => !p.core.fenced() && !p.closed,
            _ => false,
        };
        if ran_here && self.report.lost.is_none() && !(0..3).any(|m| m != n && self.could_serve(m))
        {
            self.report.lost = Some(format!("node {n} crashed while nobody else could serve"));
            self.log(format!(
                "the VM is lost: {}",
                self.report.lost.clone().unwrap_or_default()
            ));
        }
        self.nodes[n].role = Role::Down;
        self.nodes[n].conn = None;
        self.nodes[n].paused_until = None;
        // The migration's other end sees its connection break.
        let other = self.migration.as_ref().and_then(|m| {
            if m.source == n {
                Some((m.id, m.dest))
            } else if m.dest == n {
                Some((m.id, m.source))
            } else {
                None
            }
        });
        if let Some((id, node)) = other {
            self.at(50 * MS, Ev::MigrationBroke { node, id });
        }
        let after = self.rng.range(300 * MS, 2000 * MS);
        self.at(after, Ev::Restart(n));
    }

    fn inject_fault(&mut self) {
        self.report.faults += 1;
        if self.s.operations && self.rng.chance(250) {
            self.operation();
            return;
        }
        let n = self.rng.below(3) as usize;
        let mut kind = if self.s.all_faults {
            self.rng.below(7)
        } else {
            0
        };
        if kind == 6 && !self.s.verify {
            kind = 1;
        }
        // A crash only where another node could serve, and not of a node
        // whose claim may have won at the witness, nor of a primary whose
        // wrongly applied checkpoint is on its way: two failures at once
        // lose the VM whatever castor does (safety holds; the run would
        // only show that).
        let busy = match &self.nodes[n].role {
            Role::Primary(p) => {
                p.core.claiming() || p.leaving.is_some() || self.corrupt_in_flight > 0
            }
            Role::Backup(b) => b.core.frozen(),
            Role::Dest(_) => true,
            Role::Down => false,
        };
        let migrating = self
            .migration
            .as_ref()
            .is_some_and(|m| m.source == n || m.dest == n);
        let others_serve =
            (0..3).any(|m| m != n && self.could_serve(m) && self.nodes[m].paused_until.is_none());
        let runs = matches!(&self.nodes[n].role, Role::Primary(p) if !p.core.fenced());
        if kind == 0 && (busy || migrating || (runs && !others_serve)) {
            if !self.s.all_faults {
                return;
            }
            kind = 1;
        }
        match kind {
            0 => self.crash(n),
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
            4 => self.witness_down(),
            5 => {
                let d = self.rng.range(20 * MS, 500 * MS);
                let for_ = self.rng.range(100 * MS, 2000 * MS);
                self.log(format!(
                    "FAULT node {n}'s messages late by {} ms for {} ms",
                    d / MS,
                    for_ / MS
                ));
                self.slow[n] = (self.now + for_, d);
            }
            _ => {
                // The next checkpoint is applied wrongly on the backup.
                if let Some(p) = self.current_primary() {
                    self.log(format!(
                        "FAULT node {p}'s next checkpoint is applied wrongly on its backup"
                    ));
                    self.primary(p).corrupt_next = true;
                }
            }
        }
    }

    fn witness_down(&mut self) {
        let d = self.rng.range(100 * MS, 3000 * MS);
        self.witness_down_for(d);
    }

    fn witness_down_for(&mut self, d: Us) {
        self.log(format!("FAULT witness down for {} ms", d / MS));
        self.witness_up = false;
        self.at(d, Ev::WitnessBack);
    }

    /// A planned operation on the primary that runs the guest.
    fn operation(&mut self) {
        let Some(p) = self.current_primary() else {
            return;
        };
        let (target, busy) = {
            let s = self.primary(p);
            (
                s.target,
                s.leaving.is_some() || s.switching || s.core.claiming(),
            )
        };
        if busy || self.migration.is_some() {
            return;
        }
        let spare = 3 - p - target;
        let spare_free = matches!(self.nodes[spare].role, Role::Backup(_))
            && self.nodes[spare].conn.is_none()
            && self.nodes[spare].paused_until.is_none();
        match self.rng.below(3) {
            0 if spare_free => {
                self.log(format!(
                    "OP node {p}: change of backup from node {target} to node {spare}"
                ));
                self.stand_down(p, Plan::Retarget(spare));
            }
            1 if spare_free => {
                // Half the migrations meet a fault at one step of their
                // handover: mostly a witness outage, now and then a crash
                // (which loses the VM, as documented, unless the
                // destination crashes before the commit point).
                let step = [Step::Claim, Step::Swapped, Step::Go][self.rng.below(3) as usize];
                let fault = match self.rng.below(18) {
                    0..=7 => HandoverFault::None,
                    12..=13 if step == Step::Claim => HandoverFault::WitnessDownLong,
                    8..=13 => HandoverFault::WitnessDown(step),
                    14 => HandoverFault::CrashSource(step),
                    15 => HandoverFault::CrashDest(step),
                    _ => HandoverFault::PauseDest(step),
                };
                self.next_conn += 1;
                let id = self.next_conn;
                self.log(format!(
                    "OP node {p}: migration {id} to node {spare} (fault {fault:?})"
                ));
                self.nodes[spare].role = Role::Dest(Box::new(DestShell {
                    id,
                    guest: None,
                    source: p,
                    target,
                    handed: 0,
                    deadline: 0,
                }));
                self.migration = Some(Migration {
                    id,
                    source: p,
                    dest: spare,
                    fault,
                    deadline: 0,
                    token: 0,
                    committed: false,
                    reclaim_deadline: 0,
                });
                self.stand_down(p, Plan::Migrate(spare));
            }
            _ if self.s.witness => {
                // An operator's switchover: the backup takes over now.
                let any_time = self.s.switchover_any_time;
                if let Role::Backup(b) = &mut self.nodes[target].role {
                    if !any_time && !b.core.can_take_over() {
                        return;
                    }
                    let answer = b.core.ask_takeover();
                    b.asked |= answer == crate::ha::TakeoverAnswer::Accepted;
                    self.log(format!("OP node {target}: takeover asked: {answer}"));
                }
            }
            _ => {}
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), Violation> {
        // The world's own events.
        match &ev {
            Ev::Fault => {
                self.inject_fault();
                return Ok(());
            }
            Ev::Stop => {
                if let Some(p) = self.current_primary() {
                    if self.primary(p).leaving.is_none() && self.migration.is_none() {
                        self.log(format!("OP node {p}: the VM is stopped"));
                        self.stand_down(p, Plan::Stop);
                    }
                }
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
            Ev::ClaimAt { node, .. }
            | Ev::ClaimAnswer { node, .. }
            | Ev::Precopied { node, .. }
            | Ev::MigrationBroke { node, .. }
            | Ev::Admit { node, .. }
            | Ev::Unconfirmed { node, .. } => *node,
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
        if let Ev::Deliver {
            msg: Msg::Checkpoint { corrupt: true, .. },
            ..
        } = &ev
        {
            self.corrupt_in_flight -= 1;
        }
        if let Ev::ClaimAt {
            node,
            owner,
            expected,
            for_,
        } = ev
        {
            if matches!(self.nodes[node].role, Role::Down) {
                return Ok(());
            }
            self.witness_claim(node, owner, expected, for_);
            return Ok(());
        }
        if let Ev::Deliver {
            to,
            conn,
            msg: Msg::Go,
        } = &ev
        {
            if !matches!(&self.nodes[*to].role, Role::Dest(d) if d.id == *conn) {
                // Nobody reads it: the source never hears `Finished`.
                self.log(format!("node {to}: Go arrives, but no destination waits"));
                return Ok(());
            }
        }
        match (&mut self.nodes[n].role, ev) {
            (Role::Down, _) => Ok(()),
            (
                Role::Primary(_),
                Ev::Deliver {
                    conn,
                    msg: Msg::Verified,
                    ..
                },
            ) => self.verified(n, conn),
            (
                Role::Primary(_),
                Ev::Deliver {
                    conn,
                    msg: Msg::Finished,
                    ..
                },
            ) => {
                self.finished(n, conn);
                Ok(())
            }
            (Role::Primary(_), Ev::Epoch(_)) => self.primary_epoch(n),
            (Role::Primary(_), Ev::Heartbeat(_)) => self.primary_heartbeat(n),
            (Role::Primary(_), Ev::Connect(_)) => self.connect(n),
            (Role::Primary(_), Ev::Deliver { conn, msg, .. }) => self.primary_msg(n, conn, msg),
            (
                Role::Primary(_),
                Ev::ClaimAnswer {
                    claim,
                    for_: ClaimFor::Core,
                    ..
                },
            ) => {
                self.primary_feed(n, PrimaryInput::Claimed(claim))?;
                self.stand_down_progress(n)
            }
            (
                Role::Primary(_),
                Ev::ClaimAnswer {
                    claim,
                    for_: ClaimFor::Handover(id),
                    ..
                },
            ) => self.handover_answer(n, id, claim),
            (
                Role::Primary(_),
                Ev::ClaimAnswer {
                    claim,
                    for_: ClaimFor::Reclaim(id),
                    ..
                },
            ) => self.reclaim_answer(n, id, claim),
            (Role::Primary(_), Ev::Unconfirmed { id, since, .. }) => self.unconfirmed(n, id, since),
            (Role::Primary(_), Ev::Precopied { id, .. }) => self.precopied(n, id),
            (Role::Primary(_), Ev::MigrationBroke { id, .. }) => self.migration_broke(n, id),
            (Role::Backup(_), Ev::Watch(_)) => self.backup_tick(n),
            (Role::Backup(_), Ev::Deliver { conn, msg, .. }) => self.backup_msg(n, conn, msg),
            (
                Role::Backup(_),
                Ev::ClaimAnswer {
                    claim,
                    for_: ClaimFor::Core,
                    ..
                },
            ) => self.backup_feed(n, BackupInput::Claimed(claim)),
            (Role::Dest(_), Ev::Deliver { conn, msg, .. }) => self.dest_msg(n, conn, msg),
            (Role::Dest(_), Ev::Admit { id, deadline, .. }) => self.admit(n, id, deadline),
            (
                Role::Dest(_),
                Ev::ClaimAnswer {
                    claim,
                    for_: ClaimFor::Admit(id),
                    ..
                },
            ) => self.dest_claimed(n, id, claim),
            (Role::Dest(_), Ev::MigrationBroke { id, .. }) => {
                // The source is gone before `Go`: this host is spare again.
                if matches!(&self.nodes[n].role, Role::Dest(d) if d.id == id)
                    && self.migration.as_ref().is_some_and(|m| !m.committed)
                {
                    self.log(format!("node {n}: migration {id} called off"));
                    self.migration = None;
                    self.become_backup(n);
                }
                Ok(())
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

    /// Node `node` asks the witness to name `owner` (itself, or a
    /// migration's destination) if the token is still `expected`.
    fn claim(&mut self, node: usize, owner: usize, expected: u64, retry: bool, for_: ClaimFor) {
        assert!(self.s.witness, "claims need a witness");
        let wait = if retry { CLAIM_RETRY } else { 0 };
        self.at(
            wait,
            Ev::ClaimAt {
                node,
                owner,
                expected,
                for_,
            },
        );
    }

    /// The compare-and-swap, when the request reaches the witness.
    fn witness_claim(&mut self, node: usize, me: usize, expected: u64, for_: ClaimFor) {
        let latency = self.rng.range(MS, 20 * MS);
        if !self.witness_up {
            self.at(
                WITNESS_TIMEOUT,
                Ev::ClaimAnswer {
                    node,
                    claim: Claim::Unreachable,
                    for_,
                },
            );
            return;
        }
        let (owner, token) = self.owner;
        let claim = if owner == me && token == expected + 1 {
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
        };
        self.log(format!(
            "node {node} claims for node {me} from token {expected}: {claim:?}"
        ));
        // The answer may be lost after the swap happened.
        let lost = self.s.lost_answers;
        let claim = if self.s.all_faults && self.now < self.fault_end && self.rng.chance(lost) {
            self.log(format!("node {node}: the witness's answer is lost"));
            Claim::Unreachable
        } else {
            claim
        };
        self.at(latency, Ev::ClaimAnswer { node, claim, for_ });
    }

    // --- the primary's shell (primary/src/epoch.rs, net.rs, migration.rs) ---

    fn primary_epoch(&mut self, n: usize) -> Result<(), Violation> {
        self.at(EPOCH, Ev::Epoch(n));
        let bug = self.s.bug;
        let frames = self.rng.below(3) as usize;
        let p = self.primary(n);
        if p.core.fenced() || p.closed || p.switching {
            return Ok(());
        }
        // The guest runs: one unit of console output and some frames this
        // epoch, unless paused because the hold is full.
        let held = p.guest.console.len() - p.released;
        p.held_pause = p.core.claiming() && (p.held_pause || held >= HOLD_LIMIT);
        if !p.held_pause {
            let unit = (p.branch, p.guest.console.len());
            p.guest.console.push(unit);
            for _ in 0..frames {
                let unit = (p.branch, p.guest.net.len());
                p.guest.net.push(unit);
            }
        }
        if !p.core.holding() {
            // Not held: released as the guest writes it.
            self.release_all(n)?;
        }
        let marks = self.s.releases_during_resync;
        let p = self.primary(n);
        // Standing down: the epoch loop waits for the session's end.
        if p.leaving.is_some() || !(p.core.in_session() && p.core.may_send()) {
            return Ok(());
        }
        let epoch = p.next_epoch;
        p.next_epoch += 1;
        // The pause: held from here on, or not (before the guest resumes).
        let resumable = p.core.hold_from_pause(epoch, marks);
        let guest = p.guest.clone();
        let corrupt = std::mem::take(&mut p.corrupt_next);
        let (release_to, net_upto) = (guest.console.len(), guest.net.len());
        self.send(
            n,
            Msg::Checkpoint {
                epoch,
                guest: guest.clone(),
                resumable,
                digest: self.s.verify,
                corrupt,
            },
        );
        self.primary_feed(
            n,
            PrimaryInput::Sent {
                epoch,
                release_to: release_to as u64,
                meta: net_upto as u64,
            },
        )?;
        if bug == Some(Bug::ReleaseBeforeAck) {
            let p = self.primary(n);
            let from = p.released;
            p.released = release_to;
            return self.release(n, CONSOLE, &guest.console, from, release_to);
        }
        Ok(())
    }

    fn primary_heartbeat(&mut self, n: usize) -> Result<(), Violation> {
        self.at(HEARTBEAT, Ev::Heartbeat(n));
        if let Some(l) = self.primary(n).leaving {
            let since = self.now - l.since;
            if l.plan == Plan::Stop
                && (self.nodes[n].conn.is_none() || since > GOODBYE_WAIT + GOODBYE_EXIT)
            {
                // The process exits; the VM stays stopped.
                self.log(format!(
                    "node {n}: the primary process exits (the VM is stopped)"
                ));
                self.end_session(n, EndReason::Goodbye("primary shutting down".into()));
                self.nodes[n].role = Role::Down;
                self.report.stopped = true;
                return Ok(());
            }
            if self.nodes[n].conn.is_some() && since > GOODBYE_WAIT {
                // Closed as a goodbye: the backup stands down.
                let why = EndReason::Goodbye(
                    "primary shutting down; the backup did not confirm within 2000 ms".into(),
                );
                self.end_session(n, why.clone());
                self.primary_ended(n, why)?;
            }
            self.stand_down_progress(n)?;
        }
        if self.nodes[n].conn.is_none() || !matches!(self.nodes[n].role, Role::Primary(_)) {
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
        let migrating = self.migration.as_ref().is_some_and(|m| m.source == n);
        let connected = self.nodes[n].conn.is_some();
        let p = self.primary(n);
        if p.core.fenced() || p.leaving.is_some() || p.closed || connected || migrating {
            return Ok(());
        }
        let peer = p.target;
        let reachable = self.partitioned_until.is_none() && self.nodes[peer].paused_until.is_none();
        match &self.nodes[peer].role {
            Role::Backup(_) if reachable && self.nodes[peer].conn.is_none() => {
                self.next_conn += 1;
                let c = self.next_conn;
                self.nodes[n].conn = Some((c, peer));
                self.nodes[peer].conn = Some((c, n));
                let now = self.now;
                let p = self.primary(n);
                p.last_heard = now;
                p.session_at = now;
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
        if self.nodes[n].conn.map(|c| c.0) != Some(conn) {
            return Ok(());
        }
        self.primary(n).last_heard = self.now;
        match msg {
            Msg::Ack { epoch } => {
                if self
                    .primary(n)
                    .leaving
                    .is_some_and(|l| l.plan == Plan::Stop)
                {
                    // The epoch loop has ended: nothing more is released.
                    return Ok(());
                }
                self.primary_feed(n, PrimaryInput::Ack { epoch })
            }
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
        if self
            .primary(n)
            .leaving
            .is_some_and(|l| l.plan == Plan::Stop)
        {
            // The epoch loop has ended: the core hears nothing more.
            return Ok(());
        }
        // A backup that refused soon after the session began is given a
        // longer wait, doubling.
        let now = self.now;
        let p = self.primary(n);
        let refused = matches!(why, EndReason::Refused(_) | EndReason::Incompatible(_))
            && now - p.session_at < REFUSED_BACKOFF_MAX;
        let wait = if refused {
            let w = p.backoff;
            p.backoff = (p.backoff * 2).min(REFUSED_BACKOFF_MAX);
            w
        } else {
            p.backoff = REFUSED_BACKOFF;
            CONNECT_RETRY
        };
        self.primary_feed(n, PrimaryInput::Ended(why))?;
        if matches!(&self.nodes[n].role, Role::Primary(p) if !p.core.fenced()) {
            self.at(wait, Ev::Connect(n));
        }
        Ok(())
    }

    fn primary_feed(&mut self, n: usize, input: PrimaryInput<u64>) -> Result<(), Violation> {
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
                PrimaryAction::Release { upto, acked } => {
                    let bug = self.s.bug;
                    let p = self.primary(n);
                    if p.closed {
                        continue;
                    }
                    let g = p.guest.clone();
                    let net = if bug == Some(Bug::PacketsBeforeAck) {
                        Some(g.net.len() as u64)
                    } else {
                        acked.iter().map(|&(_, net)| net).max()
                    };
                    if let Some(net) = net {
                        let from = p.net_released;
                        let upto = (net as usize).max(from);
                        p.net_released = upto;
                        self.release(n, NET, &g.net, from, upto)?;
                    }
                    if bug == Some(Bug::ReleaseBeforeAck) {
                        continue;
                    }
                    let p = self.primary(n);
                    let from = p.released;
                    let upto = (upto as usize).max(from);
                    p.released = upto;
                    self.release(n, CONSOLE, &g.console, from, upto)?;
                }
                PrimaryAction::EndSession(why) => {
                    self.end_session(n, why.clone());
                    self.primary_ended(n, why)?;
                }
                PrimaryAction::Unprotected(why) => {
                    self.log(format!("node {n}: carries on alone ({why})"));
                    self.primary(n).held_pause = false;
                    self.release_all(n)?;
                }
                PrimaryAction::Fence(why) => {
                    self.log(format!("node {n}: FENCED ({why})"));
                    self.report.fences += 1;
                    self.end_session(n, EndReason::Local("fenced".into()));
                    // The process exits; an operator restarts it as a backup.
                    self.nodes[n].role = Role::Down;
                    if let Some(m) = self.migration.as_ref().filter(|m| m.source == n) {
                        let (id, dest) = (m.id, m.dest);
                        self.at(50 * MS, Ev::MigrationBroke { node: dest, id });
                    }
                    let after = self.rng.range(300 * MS, 2000 * MS);
                    self.at(after, Ev::Restart(n));
                    return Ok(());
                }
                PrimaryAction::Claim { expected, retry } => {
                    self.claim(n, n, expected, retry, ClaimFor::Core)
                }
            }
        }
        Ok(())
    }

    /// A planned stop, a change of backup or a migration begins: the
    /// session ends with a goodbye naming the last checkpoint queued
    /// (`EpochLoop::end_protection`, `stand_down`).
    fn stand_down(&mut self, n: usize, plan: Plan) {
        let now = self.now;
        let p = self.primary(n);
        p.leaving = Some(Leaving { plan, since: now });
        if plan == Plan::Stop {
            // The epoch loop has ended: the guest's output from here on is
            // never released.
            p.closed = true;
        }
        let last_epoch = if p.core.in_session() {
            p.next_epoch - 1
        } else {
            0
        };
        if self.nodes[n].conn.is_some() {
            self.send(n, Msg::Goodbye { last_epoch });
            self.send(n, Msg::DataEnd);
        }
        if plan != Plan::Stop {
            let _ = self.stand_down_progress(n);
        }
    }

    /// A stand-down settles once the session is over and the witness has
    /// let this node carry on alone; then its plan goes ahead.
    fn stand_down_progress(&mut self, n: usize) -> Result<(), Violation> {
        let now = self.now;
        if !matches!(self.nodes[n].role, Role::Primary(_)) {
            return Ok(());
        }
        let connected = self.nodes[n].conn.is_some();
        let p = self.primary(n);
        let Some(l) = p.leaving else {
            return Ok(());
        };
        if l.plan == Plan::Stop || p.core.fenced() {
            return Ok(());
        }
        if now - l.since > STAND_DOWN_WAIT && !connected && p.core.in_session() {
            // The network task ended without reporting the session's end
            // (the core started one the network never had).
            self.primary_feed(
                n,
                PrimaryInput::Ended(EndReason::Goodbye(
                    "stood down (a migration or a change of backup)".into(),
                )),
            )?;
            if !matches!(self.nodes[n].role, Role::Primary(_)) {
                return Ok(());
            }
        }
        let p = self.primary(n);
        if p.core.in_session() || p.core.claiming() || connected {
            if p.core.claiming() && now - l.since > STAND_DOWN_WAIT {
                // The witness did not decide: the guest stays, protection
                // restarts once the claim is decided.
                p.leaving = None;
                self.log(format!(
                    "node {n}: the stand-down did not settle; the guest stays"
                ));
                self.abandon_migration(n);
                self.at(0, Ev::Connect(n));
            }
            return Ok(());
        }
        p.leaving = None;
        match l.plan {
            Plan::Stop => unreachable!(),
            Plan::Retarget(to) => {
                self.log(format!("node {n}: protects toward node {to} now"));
                self.primary(n).target = to;
                self.report.retargets += 1;
                self.at(0, Ev::Connect(n));
            }
            Plan::Migrate(dest) => {
                if !self
                    .migration
                    .as_ref()
                    .is_some_and(|m| m.source == n && m.dest == dest)
                {
                    // Called off meanwhile (the destination crashed).
                    self.at(0, Ev::Connect(n));
                    return Ok(());
                }
                // Pre-copy: the guest runs here unprotected meanwhile.
                let id = self.migration.as_ref().map_or(0, |m| m.id);
                let d = self.rng.range(100 * MS, 800 * MS);
                self.log(format!(
                    "node {n}: backup stood down; pre-copy to node {dest}"
                ));
                self.at(d, Ev::Precopied { node: n, id });
            }
        }
        Ok(())
    }

    /// The migration from `n` ends before its commit point: the guest runs
    /// on here, the destination's host is spare again.
    fn abandon_migration(&mut self, n: usize) {
        let Some(m) = self.migration.take_if(|m| m.source == n) else {
            return;
        };
        self.log(format!(
            "node {n}: migration {} failed; the guest runs on here",
            m.id
        ));
        // After `Go` the destination learns from the witness (its claim
        // loses), as the daemons' does.
        if !m.committed && matches!(&self.nodes[m.dest].role, Role::Dest(d) if d.id == m.id) {
            self.become_backup(m.dest);
        }
        if matches!(self.nodes[n].role, Role::Primary(_)) {
            let p = self.primary(n);
            p.switching = false;
            p.leaving = None;
            self.at(0, Ev::Connect(n));
        }
    }

    /// Migration `id`, if it is still under way with node `n` its source.
    fn source_migration(&self, n: usize, id: u64) -> Option<&Migration> {
        self.migration
            .as_ref()
            .filter(|m| m.id == id && m.source == n)
    }

    fn precopied(&mut self, n: usize, id: u64) -> Result<(), Violation> {
        let Some(m) = self.source_migration(n, id) else {
            return Ok(());
        };
        let dest = m.dest;
        // Stop-and-copy: the guest pauses; everything it wrote is out
        // (unprotected, nothing is held).
        self.release_all(n)?;
        let p = self.primary(n);
        p.switching = true;
        let guest = p.guest.clone();
        self.send_to(n, dest, id, Msg::Switch { guest });
        Ok(())
    }

    fn migration_broke(&mut self, n: usize, id: u64) -> Result<(), Violation> {
        let Some(m) = self.source_migration(n, id) else {
            return Ok(());
        };
        if m.committed {
            // After `Go`: the destination may or may not have claimed the VM.
            self.reclaim(n, id);
            return Ok(());
        }
        self.abandon_migration(n);
        Ok(())
    }

    /// The source has waited [`LINK_IDLE`] more for `Finished`: the link is
    /// dead if the destination fell silent (down, paused, cut off), and an
    /// answer is overdue after [`ANSWER_TIMEOUT`].
    fn unconfirmed(&mut self, n: usize, id: u64, since: Us) -> Result<(), Violation> {
        let Some(m) = self
            .migration
            .as_ref()
            .filter(|m| m.id == id && m.source == n && m.committed && m.reclaim_deadline == 0)
        else {
            return Ok(());
        };
        let dest = m.dest;
        let silent = matches!(self.nodes[dest].role, Role::Down)
            || self.nodes[dest].paused_until.is_some()
            || self.partitioned_until.is_some();
        if silent || self.now >= since + ANSWER_TIMEOUT {
            self.reclaim(n, id);
        } else {
            self.at(LINK_IDLE, Ev::Unconfirmed { node: n, id, since });
        }
        Ok(())
    }

    /// `Go` was sent and `Finished` did not come: the source claims the VM
    /// back from the handover's token (`Switch::reclaim`); without a
    /// witness the move counts as done.
    fn reclaim(&mut self, n: usize, id: u64) {
        if !self.s.witness {
            let dest = self
                .migration
                .as_ref()
                .filter(|m| m.id == id)
                .map(|m| m.dest);
            if dest.is_some_and(|d| matches!(self.nodes[d].role, Role::Down))
                && self.report.lost.is_none()
            {
                self.report.lost =
                    Some("without a witness, the destination was lost after Go".into());
            }
            self.finished(n, id);
            return;
        }
        let now = self.now;
        let Some(m) = self.migration.as_mut().filter(|m| m.id == id) else {
            return;
        };
        if m.reclaim_deadline != 0 {
            return;
        }
        m.reclaim_deadline = now + HANDOVER_WAIT;
        let handed = m.token + 1;
        self.log(format!(
            "node {n}: no Finished after Go: claims the VM back from token {handed}"
        ));
        self.claim(n, n, handed, false, ClaimFor::Reclaim(id));
    }

    fn reclaim_answer(&mut self, n: usize, id: u64, claim: Claim) -> Result<(), Violation> {
        let Some(m) = self.source_migration(n, id) else {
            return Ok(());
        };
        let (dest, handed, past) = (m.dest, m.token + 1, self.now >= m.reclaim_deadline);
        match claim {
            Claim::Won { token } => {
                self.log(format!(
                    "node {n}: took the VM back (token {token}); the guest resumes here"
                ));
                self.report.taken_back += 1;
                let p = self.primary(n);
                p.closed = false;
                p.core.took_back(token);
                self.abandon_migration(n);
            }
            Claim::Lost { owner, token } if owner == format!("node {dest}") => {
                self.log(format!(
                    "node {n}: the destination claimed the VM (token {token}); the source stops"
                ));
                if matches!(self.nodes[dest].role, Role::Down) && self.report.lost.is_none() {
                    self.report.lost =
                        Some("the destination claimed the VM and crashed before it ran it".into());
                }
                self.finished(n, id);
            }
            Claim::Lost { owner, token } => {
                self.log(format!(
                    "node {n}: FENCED after Go: the witness names {owner} (token {token})"
                ));
                self.report.fences += 1;
                self.finished(n, id);
            }
            Claim::Unreachable if past => {
                self.log(format!(
                    "node {n}: the witness did not answer the claim back; the source stops"
                ));
                if self.report.lost.is_none() {
                    self.report.lost =
                        Some("the witness did not answer the source's claim back after Go".into());
                }
                self.finished(n, id);
            }
            Claim::Unreachable => self.claim(n, n, handed, true, ClaimFor::Reclaim(id)),
        }
        Ok(())
    }

    /// The move is over for the source (`Finished`, or the witness names
    /// the destination): its process exits.
    fn finished(&mut self, n: usize, id: u64) {
        if self
            .migration
            .take_if(|m| m.id == id && m.source == n)
            .is_none()
        {
            return;
        }
        if matches!(self.nodes[n].role, Role::Primary(_)) {
            self.nodes[n].role = Role::Down;
            let after = self.rng.range(300 * MS, 2000 * MS);
            self.at(after, Ev::Restart(n));
        }
    }

    /// The handover fault planted at `step`, if any.
    fn handover_fault(&mut self, step: Step) -> Option<HandoverFault> {
        let m = self.migration.as_ref()?;
        let f = m.fault;
        let (source, dest) = (m.source, m.dest);
        match f {
            HandoverFault::WitnessDown(s) if s == step => {
                self.log(format!("FAULT at the handover's {step:?} step"));
                self.witness_down();
            }
            HandoverFault::WitnessDownLong if step == Step::Claim => {
                self.log(format!("FAULT at the handover's {step:?} step"));
                let d = self
                    .rng
                    .range(HANDOVER_WAIT + 500 * MS, HANDOVER_WAIT + 5000 * MS);
                self.witness_down_for(d);
            }
            HandoverFault::CrashSource(s) if s == step => {
                self.log(format!("FAULT at the handover's {step:?} step"));
                self.crash(source);
            }
            HandoverFault::CrashDest(s) if s == step && step != Step::Claim => {
                self.log(format!("FAULT at the handover's {step:?} step"));
                self.crash(dest);
            }
            _ => return None,
        }
        Some(f)
    }

    /// The destination has the state: the commit point.
    fn verified(&mut self, n: usize, id: u64) -> Result<(), Violation> {
        if !self
            .migration
            .as_ref()
            .is_some_and(|m| m.id == id && m.source == n)
        {
            return Ok(());
        }
        self.handover_fault(Step::Claim);
        if !matches!(self.nodes[n].role, Role::Primary(_)) || self.migration.is_none() {
            return Ok(());
        }
        if !self.s.witness {
            return self.go(n, id);
        }
        let token = self.primary(n).core.token();
        let now = self.now;
        let m = self.migration.as_mut().expect("a migration");
        m.deadline = now + HANDOVER_WAIT;
        m.token = token;
        let dest = m.dest;
        self.claim(n, dest, token, false, ClaimFor::Handover(id));
        Ok(())
    }

    fn handover_answer(&mut self, n: usize, id: u64, claim: Claim) -> Result<(), Violation> {
        let Some(m) = self.source_migration(n, id) else {
            return Ok(());
        };
        let (dest, token, past) = (m.dest, m.token, self.now >= m.deadline);
        if self.s.bug == Some(Bug::GoWithoutSwap) && claim == Claim::Unreachable {
            return self.go(n, id);
        }
        match handover(claim, &format!("node {dest}"), past) {
            Handover::Go { .. } => {
                if self.handover_fault(Step::Swapped).is_some()
                    && !matches!(self.nodes[n].role, Role::Primary(_))
                {
                    return Ok(());
                }
                self.go(n, id)
            }
            Handover::Retry => {
                self.claim(n, dest, token, true, ClaimFor::Handover(id));
                Ok(())
            }
            Handover::Stay(why) => {
                self.log(format!("node {n}: no Go: {why}"));
                self.report.stays += 1;
                self.abandon_migration(n);
                Ok(())
            }
            Handover::Fenced(why) => {
                self.log(format!("node {n}: FENCED at the handover ({why})"));
                self.report.fences += 1;
                self.migration = None;
                if matches!(&self.nodes[dest].role, Role::Dest(d) if d.id == id) {
                    self.become_backup(dest);
                }
                self.nodes[n].role = Role::Down;
                let after = self.rng.range(300 * MS, 2000 * MS);
                self.at(after, Ev::Restart(n));
                Ok(())
            }
        }
    }

    /// `Go`: the source stops for good; the destination may run the guest.
    fn go(&mut self, n: usize, id: u64) -> Result<(), Violation> {
        let m = self.migration.as_mut().expect("a migration");
        m.committed = true;
        let dest = m.dest;
        if self.s.witness && self.owner.0 != dest {
            return Err(self.violation(format!(
                "node {n} sends Go, but the witness names node {} (token {}), not the destination node {dest}",
                self.owner.0, self.owner.1
            )));
        }
        self.log(format!(
            "node {n}: Go to node {dest}; the source waits, paused, for Finished"
        ));
        self.report.migrations += 1;
        let p = self.primary(n);
        p.closed = true;
        self.send_to(n, dest, id, Msg::Go);
        let since = self.now;
        self.at(LINK_IDLE, Ev::Unconfirmed { node: n, id, since });
        self.handover_fault(Step::Go);
        Ok(())
    }

    // --- the destination's shell (migrate/src/dest.rs, src/migrate_cmd.rs) ---

    fn dest_msg(&mut self, n: usize, conn: u64, msg: Msg) -> Result<(), Violation> {
        let Role::Dest(d) = &mut self.nodes[n].role else {
            unreachable!()
        };
        if d.id != conn {
            return Ok(());
        }
        match msg {
            Msg::Switch { guest } => {
                d.guest = Some(guest);
                let m = self.migration.as_ref().filter(|m| m.id == conn);
                let (source, fault) = (m.map(|m| m.source), m.map(|m| m.fault));
                if fault == Some(HandoverFault::CrashDest(Step::Claim)) {
                    // Before it answers: the source reads a broken
                    // connection instead of `Verified`.
                    self.log("FAULT at the handover's Claim step".into());
                    self.crash(n);
                    return Ok(());
                }
                if let Some(source) = source {
                    self.send_to(n, source, conn, Msg::Verified);
                }
                if matches!(fault, Some(HandoverFault::PauseDest(s)) if s != Step::Go) {
                    let d = self.rng.range(3500 * MS, 6000 * MS);
                    self.log(format!(
                        "FAULT at the handover: node {n} paused after Verified for {} ms",
                        d / MS
                    ));
                    self.nodes[n].paused_until = Some(self.now + d);
                    self.at(d, Ev::Resume(n));
                }
                Ok(())
            }
            Msg::Go => {
                if self.s.witness {
                    let deadline = self.now + ADMIT_WAIT;
                    self.admit(n, conn, deadline)
                } else {
                    self.arrive(n, conn, 0)
                }
            }
            _ => Ok(()),
        }
    }

    /// The destination asks the witness whether it owns the VM.
    fn admit(&mut self, n: usize, id: u64, deadline: Us) -> Result<(), Violation> {
        if !self.witness_up {
            if self.now >= deadline {
                self.dest_lost(
                    n,
                    "the witness did not answer the destination in time".into(),
                );
                return Ok(());
            }
            self.at(
                CLAIM_RETRY,
                Ev::Admit {
                    node: n,
                    id,
                    deadline,
                },
            );
            return Ok(());
        }
        let (owner, token) = self.owner;
        if owner != n {
            self.dest_lost(n, format!("the witness names node {owner} (token {token})"));
            return Ok(());
        }
        if let Role::Dest(d) = &mut self.nodes[n].role {
            d.handed = token;
            d.deadline = deadline;
        }
        if let Some(m) = self
            .migration
            .as_mut()
            .filter(|m| m.id == id && m.fault == HandoverFault::PauseDest(Step::Go))
        {
            m.fault = HandoverFault::None;
            let d = self.rng.range(3500 * MS, 6000 * MS);
            self.log(format!(
                "FAULT at the handover: node {n} paused on Go, after its read, for {} ms",
                d / MS
            ));
            self.nodes[n].paused_until = Some(self.now + d);
            self.at(d, Ev::Resume(n));
        }
        if self.s.bug == Some(Bug::AdmitByRead) {
            // Runs on the read alone (after any pause).
            self.at(
                0,
                Ev::ClaimAnswer {
                    node: n,
                    claim: Claim::Won { token },
                    for_: ClaimFor::Admit(id),
                },
            );
            return Ok(());
        }
        // The claim from the handover's token (`claim_arrival`): only it
        // tells this node from a source taking the VM back.
        self.claim(n, n, token, false, ClaimFor::Admit(id));
        Ok(())
    }

    fn dest_claimed(&mut self, n: usize, id: u64, claim: Claim) -> Result<(), Violation> {
        let Role::Dest(d) = &self.nodes[n].role else {
            unreachable!()
        };
        if d.id != id {
            return Ok(());
        }
        let (handed, deadline) = (d.handed, d.deadline);
        match claim {
            Claim::Won { token } => self.arrive(n, id, token),
            Claim::Lost { owner, token } => {
                // The source took the VM back: this process exits, its
                // host is spare again.
                self.log(format!(
                    "node {n}: the guest arrived but the witness gives the VM to {owner} (token {token})"
                ));
                self.nodes[n].role = Role::Down;
                let after = self.rng.range(300 * MS, 2000 * MS);
                self.at(after, Ev::Restart(n));
                Ok(())
            }
            Claim::Unreachable if self.now >= deadline => {
                self.dest_lost(
                    n,
                    "the witness did not answer the destination's claim in time".into(),
                );
                Ok(())
            }
            Claim::Unreachable => {
                self.claim(n, n, handed, true, ClaimFor::Admit(id));
                Ok(())
            }
        }
    }

    fn dest_lost(&mut self, n: usize, why: String) {
        self.log(format!(
            "node {n}: the guest arrived but may not run here: {why}"
        ));
        // The source, still waiting for `Finished`, decides by its claim
        // back whether the VM is lost (`reclaim_answer`).
        self.nodes[n].role = Role::Down;
        let after = self.rng.range(300 * MS, 2000 * MS);
        self.at(after, Ev::Restart(n));
    }

    /// The guest runs on the destination, unprotected, toward the old
    /// backup.
    fn arrive(&mut self, n: usize, id: u64, token: u64) -> Result<(), Violation> {
        let Role::Dest(d) = &mut self.nodes[n].role else {
            unreachable!()
        };
        let guest = d.guest.take().unwrap_or_default();
        let (source, target) = (d.source, d.target);
        if self.s.witness && self.owner != (n, token) {
            return Err(self.violation(format!(
                "node {n} runs the migrated guest with token {token}, but the witness names node {} (token {})",
                self.owner.0, self.owner.1
            )));
        }
        self.log(format!(
            "node {n}: the migrated guest runs here (token {token}), toward node {target}"
        ));
        self.become_primary(n, guest, token, target);
        // `Finished`: the source's process exits when it hears it.
        self.send_to(n, source, id, Msg::Finished);
        self.release_all(n)
    }

    // --- the backup's shell (backup/src/net.rs, replica.rs, watch.rs) ---

    fn backup_tick(&mut self, n: usize) -> Result<(), Violation> {
        let b = self.backup(n);
        if b.core.committed().is_none() && !b.core.frozen() {
            b.ticking = false;
            return Ok(());
        }
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

    /// The backup ends its session (`run_session`: the core hears why).
    fn backup_end(&mut self, n: usize, why: EndReason) -> Result<(), Violation> {
        if matches!(why, EndReason::Goodbye(_)) {
            self.report.goodbyes += 1;
        }
        self.end_session(n, why.clone());
        self.backup_feed(n, BackupInput::SessionEnded { reason: why })
    }

    fn backup_msg(&mut self, n: usize, conn: u64, msg: Msg) -> Result<(), Violation> {
        if self.nodes[n].conn.map(|c| c.0) != Some(conn) {
            return Ok(());
        }
        let now = Duration::from_micros(self.now);
        self.backup(n).last_msg = self.now;
        self.backup(n).core.on(BackupInput::Heard { now });
        let bye = || EndReason::Goodbye("primary shutting down".into());
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
                    let peer = self.nodes[n].conn.map(|c| c.1);
                    let b = self.backup(n);
                    b.replica = None;
                    b.primary = peer;
                    b.got_goodbye = false;
                    b.goodbye_due = None;
                    b.data_open = true;
                    b.asked = false;
                }
                Ok(())
            }
            Msg::Checkpoint {
                epoch,
                guest,
                resumable,
                digest,
                corrupt,
            } => {
                let resumable = resumable || self.s.bug == Some(Bug::ResumeUnheld);
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
                    return self.backup_end(n, why);
                }
                if epoch != 1 && b.replica.is_none() {
                    // A session's first checkpoint is its full resync.
                    return Ok(());
                }
                if corrupt && digest && self.s.bug != Some(Bug::IgnoreMismatch) {
                    // The RAM was written: the replica is at no checkpoint.
                    self.log(format!(
                        "node {n} (backup): VERIFY mismatch at checkpoint {epoch}: replica invalid"
                    ));
                    self.report.mismatches += 1;
                    let b = self.backup(n);
                    b.replica = None;
                    b.core.on(BackupInput::ReplicaInvalid { epoch });
                    return self.backup_end(
                        n,
                        EndReason::Refused(format!("replica mismatch at epoch {epoch}")),
                    );
                }
                if epoch == 1 {
                    self.log(format!("node {n} (backup): full resync committed"));
                }
                let t = self.now;
                let b = self.backup(n);
                let from = b.replica.as_ref().map_or(0, |r| r.guest.console.len());
                let was_corrupt = epoch != 1 && b.replica.as_ref().is_some_and(|r| r.corrupt);
                b.replica = Some(Replica {
                    guest: guest.clone(),
                    corrupt: corrupt || was_corrupt,
                });
                b.core.on(BackupInput::Committed {
                    epoch,
                    resumable,
                    now,
                });
                if !std::mem::replace(&mut b.ticking, true) {
                    b.last_tick = t;
                    self.at(WATCH_TICK, Ev::Watch(n));
                }
                // The backup's console serves committed output.
                let len = guest.console.len();
                self.release(n, CONSOLE, &guest.console, from.min(len), len)?;
                self.send(n, Msg::Ack { epoch });
                if self.backup(n).goodbye_due.is_some_and(|e| epoch >= e) {
                    self.log(format!(
                        "node {n} (backup): the primary's last checkpoint is committed: goodbye"
                    ));
                    return self.backup_end(n, bye());
                }
                Ok(())
            }
            Msg::Goodbye { last_epoch } => {
                self.backup(n).got_goodbye = true;
                if self.s.bug == Some(Bug::TakeoverAfterGoodbye) {
                    return Ok(());
                }
                let b = self.backup(n);
                b.core.on(BackupInput::Leaving { last_epoch });
                b.goodbye_due = Some(last_epoch);
                let committed = b.core.committed().unwrap_or(0);
                let data_open = b.data_open;
                self.log(format!(
                    "node {n} (backup): goodbye after checkpoint {last_epoch} (committed {committed}): standing down"
                ));
                if committed >= last_epoch || !data_open {
                    return self.backup_end(n, bye());
                }
                Ok(())
            }
            Msg::DataEnd => {
                let b = self.backup(n);
                if b.goodbye_due.is_some() {
                    return self.backup_end(n, bye());
                }
                b.data_open = false;
                Ok(())
            }
            Msg::Close(why) => {
                self.nodes[n].conn = None;
                let mut read = EndReason::from_close(why.code(), why.to_string().as_bytes());
                if self.s.bug == Some(Bug::TakeoverAfterGoodbye)
                    && matches!(read, EndReason::Goodbye(_))
                {
                    read = EndReason::Broken("the connection closed".into());
                }
                self.log(format!("node {n} (backup): session ended: {read}"));
                self.backup_feed(n, BackupInput::SessionEnded { reason: read })
            }
            Msg::Heartbeat => {
                self.send(n, Msg::Heartbeat);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn backup_feed(&mut self, n: usize, input: BackupInput) -> Result<(), Violation> {
        let actions = self.backup(n).core.on(input);
        for a in actions {
            match a {
                BackupAction::TakeOver {
                    epoch,
                    token,
                    asked,
                    ..
                } => {
                    let b = self.backup(n);
                    let (guest, corrupt) = b
                        .replica
                        .as_ref()
                        .map_or((Guest::default(), false), |r| (r.guest.clone(), r.corrupt));
                    let (got_goodbye, target) = (b.got_goodbye, b.primary.unwrap_or((n + 1) % 3));
                    self.log(format!(
                        "node {n}: TAKES OVER at epoch {epoch} (offset {}, token {token}, asked {asked})",
                        guest.console.len()
                    ));
                    self.report.takeovers += 1;
                    if !self.s.witness && got_goodbye && !asked {
                        return Err(self.violation(format!(
                            "node {n} takes over after its primary's goodbye"
                        )));
                    }
                    if corrupt {
                        return Err(self.violation(format!(
                            "node {n} takes over from a replica whose memory differs from the primary's (it failed verification)"
                        )));
                    }
                    // It resumes from what it committed: everything the
                    // world saw must be in it.
                    for s in [CONSOLE, NET] {
                        let (seen, has) = (self.world[s].len(), guest.stream(s).len());
                        if seen > has {
                            let name = if s == CONSOLE { "console" } else { "network" };
                            return Err(self.violation(format!(
                                "node {n} takes over at {name} offset {has} but the world saw up to {seen}"
                            )));
                        }
                    }
                    self.release(n, CONSOLE, &guest.console, 0, guest.console.len())?;
                    // Frames the old primary held are never sent; those it
                    // sent are checked.
                    let seen = self.world[NET].len();
                    for (o, &u) in guest.net.iter().enumerate().take(seen) {
                        if self.world[NET][o].is_some_and(|w| w != u) {
                            return Err(self.violation(format!(
                                "node {n} takes over with frame {u:?} at network offset {o}, the world saw {:?}",
                                self.world[NET][o]
                            )));
                        }
                    }
                    self.end_session(n, EndReason::TakenOver);
                    self.become_primary(n, guest, token, target);
                    self.nodes[n].refuses = true;
                    return Ok(());
                }
                BackupAction::Claim { expected, retry } => {
                    if !retry && self.backup(n).got_goodbye && !self.backup(n).asked {
                        return Err(self.violation(format!(
                            "node {n} claims the VM (a takeover) after its primary's goodbye"
                        )));
                    }
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
                    self.claim(n, n, expected, retry, ClaimFor::Core);
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
