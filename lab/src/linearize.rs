//! Linearizability of a key-value history, checked after the run: pure (no
//! I/O, no clock), fed the operations a client recorded.
//!
//! The model is one register per key: `put(v)` sets it and returns ok,
//! `get` returns its value or "absent". A history is linearizable when
//! every operation can be given a point in time between its invoke and its
//! return at which it took effect, so that the operations, taken in the
//! order of their points, are a run of the register that gives each
//! operation the result it got.
//!
//! - An operation with an [`Outcome::Unknown`] outcome (its request timed
//!   out, the connection was lost at a failover) may have taken effect at
//!   any time after its invoke, or never: its return time is +∞ (Knossos'
//!   and Porcupine's `:info`). An unknown GET tells nothing and is left out.
//! - An [`Outcome::Fail`] (an error reply: the service said it did not
//!   apply it) took no effect and is left out; if it had, a later GET shows
//!   a value no operation in the history explains.
//! - A key starts absent ([`Init::Absent`]: a fresh service) or with any
//!   value, which its first read fixes ([`Init::Any`]: a service that may
//!   hold an earlier run's values).
//! - Intervals are closed: two operations whose intervals touch (one
//!   returns at the instant the other is invoked) are concurrent.
//!
//! The algorithm is Porcupine's (Athalye): Lowe's just-in-time
//! linearization (Wing & Gong's search, trying the operations in the order
//! of their invokes, an operation only before every return it must
//! precede) with memoisation of the configurations already explored (the
//! set of operations linearized, as a bitset, and the register's state),
//! and P-compositionality: a history is linearizable if and only if each
//! key's sub-history is, so each key is checked alone. Each key's history
//! is further cut at its quiescent points (an instant no operation spans:
//! every operation before it returned before every operation after it was
//! invoked) and searched one segment at a time, carrying the set of
//! register states in which a segment can end into the next one; so a
//! mostly sequential history costs time and memory linear in its length.
//!
//! Before a key is searched, two exact reductions take out what the search
//! need not see: PUTs of unknown outcome whose value no later GET read
//! (`unread_unknown_puts_left_out`), and GETs implied by another GET of the
//! same value within their interval (`implied_reads_left_out`: a retried
//! GET's further replies). Failovers leave many of both in a long run, and
//! each one the search had to carry or place multiplied its
//! configurations.
//!
//! The search is bounded ([`Config`]): a budget of model steps per key and
//! in all, and of memo bytes per segment. A key whose search exceeds it is
//! reported undecided ([`Report::undecided`]), never silently passed.
//!
//! A violation is reported with the smallest failing sub-history found: the
//! key's history up to the end of the first segment with no linearization,
//! narrowed to the shortest window before it that still fails, then shrunk
//! by removing chunks of operations, then single operations, while what is
//! left still fails (itself within a step budget). Every sub-history tried
//! is closed (it keeps the PUT of every value its GETs read, save PUTs of
//! unknown outcome invoked after the last read of their value, which the
//! check leaves out from the start: they explain no read), so that its
//! failure is one of the whole history's, not made by removing a write. It
//! is shrunk with [`Init::Any`] when it fails so (it then fails under
//! either), which keeps the operations that contradict each other rather
//! than a lone read on a key taken to start absent.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// What an operation asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Set the key to this value.
    Put(u64),
    /// Read the key.
    Get,
}

/// What an operation was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// It returned. A GET: the value read (`None`: the key absent). A PUT:
    /// ok (the value is ignored; use `Ok(None)`).
    Ok(Option<u64>),
    /// The service said it failed: it took no effect (left out).
    Fail,
    /// No answer: it may have taken effect at any time after its invoke, or
    /// never (its return is taken as +∞).
    Unknown,
}

/// One operation of a history. Times are in any unit (the load generator
/// uses nanoseconds since its start) from one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Op {
    /// Who invoked it (shown in a violation; not used by the check).
    pub client: u32,
    /// The key.
    pub key: u64,
    /// PUT or GET.
    pub kind: Kind,
    /// When it was invoked.
    pub invoke: u64,
    /// When it returned; `None`: never (+∞). Ignored for an unknown
    /// outcome; a return before the invoke is taken as at the invoke.
    pub ret: Option<u64>,
    /// Its outcome.
    pub outcome: Outcome,
}

impl Op {
    /// A PUT acknowledged at `ret`.
    pub fn put(client: u32, key: u64, value: u64, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            key,
            kind: Kind::Put(value),
            invoke,
            ret: Some(ret),
            outcome: Outcome::Ok(None),
        }
    }

    /// A PUT with no answer.
    pub fn put_unknown(client: u32, key: u64, value: u64, invoke: u64) -> Op {
        Op {
            client,
            key,
            kind: Kind::Put(value),
            invoke,
            ret: None,
            outcome: Outcome::Unknown,
        }
    }

    /// A GET that read `value` (`None`: absent), answered at `ret`.
    pub fn get(client: u32, key: u64, value: Option<u64>, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            key,
            kind: Kind::Get,
            invoke,
            ret: Some(ret),
            outcome: Outcome::Ok(value),
        }
    }

    /// Its return time for the check: +∞ (`u64::MAX`) when unknown.
    pub fn ret_time(&self) -> u64 {
        match (self.outcome, self.ret) {
            (Outcome::Unknown, _) | (_, None) => u64::MAX,
            (_, Some(r)) => r.max(self.invoke),
        }
    }

    /// Whether the check uses it (fails and unknown GETs say nothing).
    pub fn counts(&self) -> bool {
        match self.outcome {
            Outcome::Fail => false,
            Outcome::Unknown => matches!(self.kind, Kind::Put(_)),
            Outcome::Ok(_) => true,
        }
    }
}

impl fmt::Display for Op {
    /// One line: client, operation, result, interval (times shown as
    /// seconds, taking them as nanoseconds).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.kind, self.outcome) {
            (Kind::Put(v), Outcome::Ok(_)) => format!("put {v:#x} -> ok"),
            (Kind::Put(v), Outcome::Fail) => format!("put {v:#x} -> failed"),
            (Kind::Put(v), Outcome::Unknown) => format!("put {v:#x} -> unknown"),
            (Kind::Get, Outcome::Ok(Some(v))) => format!("get -> {v:#x}"),
            (Kind::Get, Outcome::Ok(None)) => "get -> absent".to_string(),
            (Kind::Get, Outcome::Fail) => "get -> failed".to_string(),
            (Kind::Get, Outcome::Unknown) => "get -> unknown".to_string(),
        };
        let s = |t: u64| format!("{}.{:09} s", t / 1_000_000_000, t % 1_000_000_000);
        let ret = match (self.outcome, self.ret) {
            (Outcome::Unknown, _) | (_, None) => "never".to_string(),
            (_, Some(r)) => s(r),
        };
        write!(
            f,
            "client {} key {} {:<33}  invoked {}, returned {}",
            self.client,
            self.key,
            what,
            s(self.invoke),
            ret
        )
    }
}

/// A key's value before the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Init {
    /// Absent: the service started empty.
    Absent,
    /// Any value (fixed by the first read): the service may hold values
    /// from before the history.
    Any,
}

/// The check's settings and bounds.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Every key's value before the history.
    pub init: Init,
    /// Model steps (one operation tried at one point) a key may take; past
    /// it the key is undecided.
    pub max_steps_per_key: u64,
    /// Model steps for the whole history; once spent, the keys left are
    /// undecided.
    pub max_steps: u64,
    /// Memo bytes one segment's search may hold; past it the key is
    /// undecided.
    pub max_memo_bytes: u64,
    /// Model steps the shrinking of a violation may take in all (past it,
    /// the sub-history found so far is reported, not known minimal).
    pub shrink_steps: u64,
}

impl Config {
    /// The default settings with a whole-history budget for `ops`
    /// operations: 100 steps each, at least the default's (a long drill's
    /// millions of operations; each key keeps its own budget).
    pub fn for_history(ops: usize) -> Config {
        let d = Config::default();
        Config {
            max_steps: (ops as u64).saturating_mul(100).max(d.max_steps),
            ..d
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            init: Init::Any,
            max_steps_per_key: 2_000_000,
            max_steps: 20_000_000,
            max_memo_bytes: 256 << 20,
            shrink_steps: 5_000_000,
        }
    }
}

/// A linearizable history (or one whose undecided keys are named).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Operations in the history.
    pub ops: usize,
    /// Of which checked (fails and unknown GETs are left out).
    pub checked: usize,
    /// Of which PUTs with an unknown outcome.
    pub unknown_puts: usize,
    /// Of those, left out of the search: no GET that returned after the
    /// PUT's invoke read its value (see `unread_unknown_puts_left_out`).
    pub unread_unknown_puts: usize,
    /// GETs left out of the search as implied by another GET of the same
    /// key and value within their interval (see `implied_reads_left_out`).
    pub implied_reads: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Keys whose search ran out of its budget: neither found linearizable
    /// nor not (the others all are).
    pub undecided: Vec<u64>,
    /// Model steps taken.
    pub steps: u64,
}

impl Report {
    /// Every key decided (and so linearizable).
    pub fn complete(&self) -> bool {
        self.undecided.is_empty()
    }
}

impl fmt::Display for Report {
    /// `linearizable: yes (N ops, K keys)`, or which keys are undecided.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.undecided.is_empty() {
            return write!(
                f,
                "linearizable: yes ({} ops, {} keys)",
                self.ops, self.keys
            );
        }
        let shown: Vec<String> = self.undecided.iter().take(8).map(u64::to_string).collect();
        write!(
            f,
            "linearizable: undecided for {} of {} keys (search budget exhausted: key {}{}), yes for \
             the others ({} ops)",
            self.undecided.len(),
            self.keys,
            shown.join(", "),
            if self.undecided.len() > 8 { ", …" } else { "" },
            self.ops
        )
    }
}

/// A history that is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The key shown: of those not linearizable, the one whose failure
    /// comes first (the invoke of the last operation of its first segment
    /// with no linearization).
    pub key: u64,
    /// The smallest failing sub-history of that key found, by invoke: it
    /// holds the PUT of every value its GETs read (see the module's text).
    pub ops: Vec<Op>,
    /// The model's start it fails with: [`Init::Any`] when it fails so.
    pub init: Init,
    /// Whether it is minimal: removing any one of its operations makes it
    /// linearizable (false: the shrinking ran out of its budget).
    pub minimal: bool,
    /// Operations of that key the search saw (checked ones, without those
    /// the exact reductions left out: PUTs of unknown outcome nobody read,
    /// reads implied by another).
    pub key_ops: usize,
    /// The other keys not linearizable (not shrunk).
    pub other_keys: Vec<u64>,
    /// Keys undecided (search budget exhausted).
    pub undecided: Vec<u64>,
    /// Operations in the history.
    pub history_ops: usize,
    /// Distinct keys in the history.
    pub keys: usize,
}

impl Violation {
    /// The first line of [`Violation`]'s display.
    pub fn line(&self) -> String {
        format!(
            "linearizable: NO ({} ops, {} keys): key {}{} has no linearization; smallest failing \
             sub-history found: {} of its {} ops{}",
            self.history_ops,
            self.keys,
            self.key,
            match self.other_keys.len() {
                0 => String::new(),
                1 => format!(" (and key {})", self.other_keys[0]),
                n => format!(" (and {n} other keys)"),
            },
            self.ops.len(),
            self.key_ops,
            if self.minimal { " (minimal)" } else { "" }
        )
    }
}

impl fmt::Display for Violation {
    /// [`Violation::line`], then one line per operation of the sub-history.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.line())?;
        if self.init == Init::Absent {
            write!(f, ", the key absent at the start")?;
        }
        for op in &self.ops {
            write!(f, "\n  {op}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Checks `history` with the default [`Config`] (any starting value).
pub fn check(history: &[Op]) -> Result<Report, Violation> {
    check_with(history, &Config::default())
}

/// Checks `history`: `Ok` if it is linearizable (but for the keys named
/// undecided), else the violation with the smallest failing sub-history
/// found.
pub fn check_with(history: &[Op], config: &Config) -> Result<Report, Violation> {
    let mut keys: Vec<u64> = history.iter().map(|o| o.key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut idx: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].counts())
        .collect();
    idx.sort_by_key(|&i| (history[i].key, history[i].invoke, i));
    let init = state_of(config.init);
    let mut total = Budget::new(config.max_steps, config.max_memo_bytes);
    let mut undecided = Vec::new();
    // Keys not linearizable: (key, its ops, where its failure ends).
    let mut failed: Vec<(u64, Vec<KOp>, usize)> = Vec::new();
    let mut unread_unknown_puts = 0;
    let mut implied_reads = 0;
    let mut start = 0;
    while start < idx.len() {
        let key = history[idx[start]].key;
        let mut end = start;
        while end < idx.len() && history[idx[end]].key == key {
            end += 1;
        }
        let all: Vec<KOp> = idx[start..end]
            .iter()
            .map(|&i| KOp::of(&history[i], i))
            .collect();
        let ops = unread_unknown_puts_left_out(all);
        unread_unknown_puts += (end - start) - ops.len();
        let n = ops.len();
        let ops = implied_reads_left_out(ops);
        implied_reads += n - ops.len();
        start = end;
        let mut b = Budget::new(
            config.max_steps_per_key.min(total.left()),
            config.max_memo_bytes,
        );
        let v = check_key(&ops, init, &mut b);
        total.steps += b.steps;
        match v {
            Verdict::Linearizable => {}
            Verdict::Undecided => undecided.push(key),
            Verdict::Fails { upto } => failed.push((key, ops, upto)),
        }
    }
    let checked = idx.len();
    let unknown_puts = idx
        .iter()
        .filter(|&&i| history[i].outcome == Outcome::Unknown)
        .count();
    if failed.is_empty() {
        return Ok(Report {
            ops: history.len(),
            checked,
            unknown_puts,
            unread_unknown_puts,
            implied_reads,
            keys: keys.len(),
            undecided,
            steps: total.steps,
        });
    }
    // Show the key whose failure comes first: its failing segment's last
    // invoke.
    let pick = (0..failed.len())
        .min_by_key(|&i| (failed[i].1[failed[i].2 - 1].invoke, failed[i].0))
        .unwrap_or(0);
    let (key, ops, upto) = failed.swap_remove(pick);
    let mut other_keys: Vec<u64> = failed.iter().map(|f| f.0).collect();
    other_keys.sort_unstable();
    let mut sb = Budget::new(config.shrink_steps, config.max_memo_bytes);
    let (kept, init_used, minimal) = shrink(&ops, upto, init, &mut sb);
    Err(Violation {
        key,
        ops: kept.iter().map(|&i| history[ops[i].idx]).collect(),
        init: match init_used {
            State::Any => Init::Any,
            State::Val(_) => Init::Absent,
        },
        minimal,
        key_ops: ops.len(),
        other_keys,
        undecided,
        history_ops: history.len(),
        keys: keys.len(),
    })
}

/// One key's operations without its PUTs of unknown outcome whose value no
/// GET read after their invoke (no GET reading it returned at or after
/// it). Such a PUT can be taken never to have taken effect: in any
/// linearization where it did, at some point `p` after its invoke, no GET
/// is placed between `p` and the next PUT (one placed there would read its
/// value and return after `p`), so the same order without it is one too.
/// The check is exact without them, and much cheaper: every PUT of unknown
/// outcome not yet placed is carried into every later segment's search
/// (a failover leaves a few on each key it hits, and a long run many).
fn unread_unknown_puts_left_out(ops: Vec<KOp>) -> Vec<KOp> {
    if !ops.iter().any(|o| o.unknown) {
        return ops;
    }
    // The latest return of a GET reading each value.
    let mut last_read: HashMap<u64, u64> = HashMap::new();
    for o in &ops {
        if let Act::Get(Some(v)) = o.act {
            let r = last_read.entry(v).or_insert(0);
            *r = (*r).max(o.ret);
        }
    }
    ops.into_iter()
        .filter(|o| match (o.unknown, o.act) {
            (true, Act::Put(v)) => last_read.get(&v).is_some_and(|&r| r >= o.invoke),
            _ => true,
        })
        .collect()
}

/// One key's operations without the GETs whose interval contains that of
/// another GET of the same value (of two with the same interval, the later
/// one). Such a GET is implied by the other: in any linearization of the
/// rest, the other is placed at a point of its interval with the register
/// holding that value, and placing this one right after it, at the same
/// point, changes nothing else; and any linearization of the whole is one
/// of the rest without it (a GET changes no state, but for fixing a
/// register of unknown start to its value: without it the register stays
/// unknown a little longer, which admits at least as much). So the check is
/// exact without them.
///
/// A retried GET's further replies ([`crate::loadgen::history`]) are such
/// reads: invoked at the first send, returned later, mostly with the same
/// value. A paused primary answers a burst of them when it resumes, and each
/// one the search had to place doubled its configurations.
fn implied_reads_left_out(ops: Vec<KOp>) -> Vec<KOp> {
    // The reads of each value: (invoke, ret, position).
    let mut reads: HashMap<Option<u64>, Vec<(u64, u64, usize)>> = HashMap::new();
    for (i, o) in ops.iter().enumerate() {
        if let Act::Get(v) = o.act {
            reads.entry(v).or_default().push((o.invoke, o.ret, i));
        }
    }
    if reads.values().all(|r| r.len() < 2) {
        return ops;
    }
    let mut implied = vec![false; ops.len()];
    for r in reads.values_mut() {
        // Latest invoke first, and of one invoke the earliest return: every
        // read seen before this one was invoked no earlier, so if one of
        // them also returned no later, this one's interval contains it.
        r.sort_unstable_by_key(|&(invoke, ret, i)| (std::cmp::Reverse(invoke), ret, i));
        let mut min_ret = u64::MAX;
        let mut first = true;
        for &(_, ret, i) in r.iter() {
            if !first && min_ret <= ret {
                implied[i] = true;
            }
            first = false;
            min_ret = min_ret.min(ret);
        }
    }
    ops.into_iter()
        .zip(implied)
        .filter(|(_, x)| !x)
        .map(|(o, _)| o)
        .collect()
}

/// The register's state in the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum State {
    /// Not known yet (the first read fixes it).
    Any,
    /// This value (`None`: absent).
    Val(Option<u64>),
}

fn state_of(init: Init) -> State {
    match init {
        Init::Absent => State::Val(None),
        Init::Any => State::Any,
    }
}

/// An operation as the search sees it.
#[derive(Debug, Clone, Copy)]
enum Act {
    Put(u64),
    Get(Option<u64>),
}

/// The model: the state after `a` from `s`, if `a`'s result is possible.
fn step(s: State, a: Act) -> Option<State> {
    match (a, s) {
        (Act::Put(v), _) => Some(State::Val(Some(v))),
        (Act::Get(x), State::Any) => Some(State::Val(x)),
        (Act::Get(x), State::Val(y)) => (x == y).then_some(s),
    }
}

#[derive(Debug, Clone, Copy)]
struct KOp {
    act: Act,
    invoke: u64,
    /// `u64::MAX`: +∞.
    ret: u64,
    /// A PUT of unknown outcome.
    unknown: bool,
    /// Its index in the history.
    idx: usize,
}

impl KOp {
    /// A PUT of unknown outcome: it need not take effect.
    fn optional(&self) -> bool {
        self.unknown
    }

    /// Its return as far as cutting segments goes: a PUT of unknown outcome
    /// does not hold a segment open.
    fn segment_ret(&self) -> u64 {
        if self.unknown {
            self.invoke
        } else {
            self.ret
        }
    }

    fn of(o: &Op, idx: usize) -> KOp {
        let act = match (o.kind, o.outcome) {
            (Kind::Put(v), _) => Act::Put(v),
            (Kind::Get, Outcome::Ok(x)) => Act::Get(x),
            // Not counted (filtered out before).
            (Kind::Get, _) => Act::Get(None),
        };
        KOp {
            act,
            invoke: o.invoke,
            ret: o.ret_time(),
            unknown: o.outcome == Outcome::Unknown,
            idx,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exhausted;

struct Budget {
    steps: u64,
    limit: u64,
    memo_limit: u64,
}

impl Budget {
    fn new(limit: u64, memo_limit: u64) -> Budget {
        Budget {
            steps: 0,
            limit,
            memo_limit,
        }
    }

    fn left(&self) -> u64 {
        self.limit.saturating_sub(self.steps)
    }

    fn step(&mut self) -> Result<(), Exhausted> {
        if self.steps >= self.limit {
            return Err(Exhausted);
        }
        self.steps += 1;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    /// `ops[..upto]` (a prefix ending at a quiescent point) already has no
    /// linearization.
    Fails {
        upto: usize,
    },
    Undecided,
}

/// A configuration between two segments: the register's state, and the
/// PUTs of unknown outcome invoked so far that have not taken effect (they
/// still may, in any later segment), by index in the key's operations.
type Config2 = (State, Vec<usize>);

/// One key's operations, sorted by invoke.
fn check_key(ops: &[KOp], init: State, budget: &mut Budget) -> Verdict {
    let mut configs: Vec<Config2> = vec![(init, Vec::new())];
    let mut start = 0;
    while start < ops.len() {
        let end = segment_end(ops, start);
        let last = end == ops.len();
        let mut carried: Vec<usize> = configs.iter().flat_map(|c| c.1.iter().copied()).collect();
        carried.sort_unstable();
        carried.dedup();
        let ends = if end - start == 1 && carried.is_empty() && !ops[start].optional() {
            // One operation alone: no search.
            let mut ends: Vec<Config2> = Vec::with_capacity(configs.len());
            for (s, _) in &configs {
                if budget.step().is_err() {
                    return Verdict::Undecided;
                }
                if let Some(n) = step(*s, ops[start].act) {
                    if !ends.iter().any(|e| e.0 == n) {
                        ends.push((n, Vec::new()));
                    }
                }
            }
            ends
        } else {
            match search(ops, start..end, &carried, &configs, last, budget) {
                Ok(e) => e,
                Err(Exhausted) => return Verdict::Undecided,
            }
        };
        if ends.is_empty() {
            return Verdict::Fails { upto: end };
        }
        configs = ends;
        start = end;
    }
    Verdict::Linearizable
}

/// The end of the segment starting at `start`: the first operation invoked
/// after every earlier one returned, a PUT of unknown outcome not counting
/// (it is carried into the following segments instead).
fn segment_end(ops: &[KOp], start: usize) -> usize {
    let mut max_ret = ops[start].segment_ret();
    let mut end = start + 1;
    while end < ops.len() && ops[end].invoke <= max_ret {
        max_ret = max_ret.max(ops[end].segment_ret());
        end += 1;
    }
    end
}

const NIL: usize = usize::MAX;

/// The configurations the segment `ops[seg]` can end in, from any of
/// `roots`, whose pending PUTs of unknown outcome are among `carried` (just
/// one end if `first_only`); empty: no linearization.
fn search(
    ops: &[KOp],
    seg: std::ops::Range<usize>,
    carried: &[usize],
    roots: &[Config2],
    first_only: bool,
    budget: &mut Budget,
) -> Result<Vec<Config2>, Exhausted> {
    // The segment's operations, then the carried ones (invoked before it).
    let local: Vec<usize> = seg.clone().chain(carried.iter().copied()).collect();
    let n = local.len();
    let optional: Vec<bool> = local.iter().map(|&g| ops[g].optional()).collect();
    let known_total = optional.iter().filter(|&&o| !o).count();
    // The events: calls and returns by time, a call before a return at the
    // same instant (touching intervals are concurrent). Node 0 is the
    // list's head; node k (1..=2n) is event k-1.
    let mut ev: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, &g) in local.iter().enumerate() {
        let o = &ops[g];
        let invoke = if seg.contains(&g) { o.invoke } else { 0 };
        ev.push((invoke, false, i));
        ev.push((o.ret, true, i));
    }
    ev.sort_unstable();
    let m = ev.len();
    let mut next: Vec<usize> = (1..=m + 1).collect();
    next[m] = NIL;
    let mut prev: Vec<usize> = (0..=m).map(|k| k.wrapping_sub(1)).collect();
    prev[0] = NIL;
    let mut call_node = vec![0usize; n];
    let mut ret_node = vec![0usize; n];
    for (k, &(_, is_ret, i)) in ev.iter().enumerate() {
        if is_ret {
            ret_node[i] = k + 1;
        } else {
            call_node[i] = k + 1;
        }
    }
    let is_call = |k: usize| !ev[k - 1].1;
    let op_of = |k: usize| ev[k - 1].2;
    let words = n.div_ceil(64);
    let entry_bytes = (words * 8 + 64) as u64;
    let mut memo_bytes = 0u64;
    let mut memo: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut lin = vec![0u64; words];
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut ends: Vec<Config2> = Vec::new();
    let mut seen_ends: HashSet<Config2> = HashSet::new();

    fn lift(next: &mut [usize], prev: &mut [usize], k: usize, r: usize) {
        for x in [k, r] {
            let (p, q) = (prev[x], next[x]);
            next[p] = q;
            if q != NIL {
                prev[q] = p;
            }
        }
    }
    fn unlift(next: &mut [usize], prev: &mut [usize], k: usize, r: usize) {
        for x in [r, k] {
            let (p, q) = (prev[x], next[x]);
            next[p] = x;
            if q != NIL {
                prev[q] = x;
            }
        }
    }
    let set = |lin: &mut [u64], i: usize| lin[i / 64] |= 1 << (i % 64);
    let clear = |lin: &mut [u64], i: usize| lin[i / 64] &= !(1 << (i % 64));

    for (root, pending) in roots {
        // Carried PUTs this root has already applied: linearized before.
        let pre: Vec<usize> = (seg.len()..n)
            .filter(|&i| pending.binary_search(&local[i]).is_err())
            .collect();
        for &i in &pre {
            set(&mut lin, i);
            lift(&mut next, &mut prev, call_node[i], ret_node[i]);
        }
        if memo.insert((lin.clone(), *root)) {
            let mut state = *root;
            let mut known_done = 0;
            let mut e = next[0];
            loop {
                if known_done == known_total {
                    // Every operation that must take effect has: an end
                    // (the PUTs of unknown outcome left carried on).
                    let mut left: Vec<usize> = (0..n)
                        .filter(|&i| optional[i] && lin[i / 64] & (1 << (i % 64)) == 0)
                        .map(|i| local[i])
                        .collect();
                    left.sort_unstable();
                    let end = (state, left);
                    if seen_ends.insert(end.clone()) {
                        ends.push(end);
                        if first_only {
                            return Ok(ends);
                        }
                    }
                    let Some((k, s)) = stack.pop() else { break };
                    let i = op_of(k);
                    clear(&mut lin, i);
                    unlift(&mut next, &mut prev, k, ret_node[i]);
                    known_done -= usize::from(!optional[i]);
                    state = s;
                    e = next[k];
                    continue;
                }
                // An operation that must take effect is left, so the list
                // ends with a return: `e` is a node here.
                if is_call(e) {
                    budget.step()?;
                    let i = op_of(e);
                    if let Some(ns) = step(state, ops[local[i]].act) {
                        set(&mut lin, i);
                        if memo.insert((lin.clone(), ns)) {
                            memo_bytes += entry_bytes;
                            if memo_bytes > budget.memo_limit {
                                return Err(Exhausted);
                            }
                            stack.push((e, state));
                            state = ns;
                            known_done += usize::from(!optional[i]);
                            lift(&mut next, &mut prev, e, ret_node[i]);
                            e = next[0];
                            continue;
                        }
                        clear(&mut lin, i);
                    }
                    e = next[e];
                } else {
                    // An operation that must precede this return is not
                    // linearized yet: undo the last choice.
                    let Some((k, s)) = stack.pop() else { break };
                    let i = op_of(k);
                    clear(&mut lin, i);
                    unlift(&mut next, &mut prev, k, ret_node[i]);
                    known_done -= usize::from(!optional[i]);
                    state = s;
                    e = next[k];
                }
            }
        }
        for &i in pre.iter().rev() {
            clear(&mut lin, i);
            unlift(&mut next, &mut prev, call_node[i], ret_node[i]);
        }
    }
    Ok(ends)
}

/// Whether `sub` (of `ops`, in order) fails: `Some(true)` not linearizable,
/// `Some(false)` linearizable, `None` undecided.
fn fails(ops: &[KOp], sub: &[usize], init: State, budget: &mut Budget) -> Option<bool> {
    let s: Vec<KOp> = sub.iter().map(|&i| ops[i]).collect();
    if s.is_empty() {
        return Some(false);
    }
    let mut b = Budget::new(budget.left(), budget.memo_limit);
    let v = check_key(&s, init, &mut b);
    budget.steps += b.steps;
    match v {
        Verdict::Linearizable => Some(false),
        Verdict::Fails { .. } => Some(true),
        Verdict::Undecided => None,
    }
}

/// Shrinks `ops[..upto]` (not linearizable from `init`) to a small failing
/// sub-history: its indices, the start it fails from, whether minimal.
///
/// Every sub-history tried is closed: it holds the PUTs of every value its
/// GETs read. A closed sub-history of a linearizable history is
/// linearizable (restrict a linearization to it: each GET still follows
/// the PUT it read, with no other PUT of the sub-history between), so a
/// closed one that fails shows the whole history fails for a reason it
/// contains, not for a write the shrinking took away.
fn shrink(ops: &[KOp], upto: usize, init: State, budget: &mut Budget) -> (Vec<usize>, State, bool) {
    let mut writers: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, o) in ops.iter().enumerate() {
        if let Act::Put(v) = o.act {
            writers.entry(v).or_default().push(i);
        }
    }
    let close = |sub: Vec<usize>| -> Vec<usize> {
        let mut out = sub.clone();
        for &i in &sub {
            if let Act::Get(Some(v)) = ops[i].act {
                out.extend(writers.get(&v).into_iter().flatten().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    };
    // (A closed superset of a failing prefix still fails: a GET of a value
    // whose PUT comes after the prefix read it before it was written.)
    let all = close((0..upto).collect());
    let init = if init != State::Any && fails(ops, &all, State::Any, budget) == Some(true) {
        State::Any
    } else {
        init
    };
    // The failing segment, and the shortest window of segments before it
    // that still fails.
    let mut seg_starts = vec![0];
    while let Some(&s) = seg_starts.last() {
        let e = segment_end(&ops[..upto], s);
        if e == upto {
            break;
        }
        seg_starts.push(e);
    }
    let last = seg_starts.len() - 1;
    let mut cand = all;
    let mut w = 0;
    while w < last {
        let window = close((seg_starts[last - w]..upto).collect());
        if fails(ops, &window, init, budget) == Some(true) {
            cand = window;
            break;
        }
        w = if w == 0 { 1 } else { w * 2 };
    }
    // Remove chunks, halving them, then single operations until none can go.
    let mut chunk = (cand.len() / 2).max(1);
    loop {
        let mut removed = false;
        let mut undecided = false;
        let mut i = 0;
        while i < cand.len() {
            if budget.left() == 0 {
                return (cand, init, false);
            }
            let j = (i + chunk).min(cand.len());
            let trial = close(cand[..i].iter().chain(&cand[j..]).copied().collect());
            if trial.len() >= cand.len() {
                i = j;
                continue;
            }
            match fails(ops, &trial, init, budget) {
                Some(true) => {
                    cand = trial;
                    removed = true;
                }
                Some(false) => i = j,
                None => {
                    undecided = true;
                    i = j;
                }
            }
        }
        if chunk == 1 && !removed {
            return (cand, init, !undecided);
        }
        if chunk > 1 {
            chunk = (chunk / 2).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node::rng::Rng;
    use std::time::Instant;

    const K: u64 = 1;

    fn absent() -> Config {
        Config {
            init: Init::Absent,
            ..Config::default()
        }
    }

    fn ok(h: &[Op], c: &Config) -> Report {
        match check_with(h, c) {
            Ok(r) => {
                assert!(r.complete(), "{r}");
                r
            }
            Err(v) => panic!("expected linearizable, got {v}"),
        }
    }

    fn bad(h: &[Op], c: &Config) -> Violation {
        match check_with(h, c) {
            Ok(r) => panic!("expected a violation, got {r}"),
            Err(v) => v,
        }
    }

    fn put(v: u64, a: u64, b: u64) -> Op {
        Op::put(0, K, v, a, b)
    }

    fn get(v: Option<u64>, a: u64, b: u64) -> Op {
        Op::get(1, K, v, a, b)
    }

    #[test]
    fn linearize_empty_and_sequential() {
        let r = ok(&[], &absent());
        assert_eq!((r.ops, r.keys), (0, 0));
        assert_eq!(r.to_string(), "linearizable: yes (0 ops, 0 keys)");
        let h = [
            get(None, 0, 1),
            put(1, 2, 3),
            get(Some(1), 4, 5),
            put(2, 6, 7),
            get(Some(2), 8, 9),
        ];
        let r = ok(&h, &absent());
        assert_eq!(r.to_string(), "linearizable: yes (5 ops, 1 keys)");
        // Touching intervals are concurrent: the GET may go first.
        ok(
            &[put(1, 0, 10), put(2, 10, 20), get(Some(1), 20, 30)],
            &absent(),
        );
    }

    #[test]
    fn linearize_concurrent_puts_either_order() {
        for v in [1, 2] {
            let h = [put(1, 0, 100), put(2, 10, 90), get(Some(v), 110, 120)];
            ok(&h, &absent());
        }
        // But then both readers agree.
        let h = [
            put(1, 0, 100),
            put(2, 10, 90),
            get(Some(1), 110, 120),
            get(Some(2), 130, 140),
        ];
        bad(&h, &absent());
    }

    #[test]
    fn linearize_get_overlapping_a_put_sees_either_value() {
        for v in [1, 2] {
            ok(
                &[put(1, 0, 10), put(2, 20, 40), get(Some(v), 30, 50)],
                &absent(),
            );
        }
        ok(&[put(2, 20, 40), get(None, 30, 50)], &absent());
        bad(
            &[put(1, 0, 10), put(2, 20, 40), get(Some(3), 30, 50)],
            &absent(),
        );
    }

    #[test]
    fn linearize_leaves_out_unknown_puts_nobody_read_and_so_decides_long_histories() {
        // A failover's lost replies: 60 PUTs of unknown outcome on one key,
        // each followed by a sequential write and a read of it; nothing
        // reads their values. Carried into every later segment, they made
        // the search explode; left out, the history is sequential.
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..60u64 {
            h.push(Op::put_unknown(0, K, 1000 + i, t));
            h.push(put(i, t + 1, t + 2));
            h.push(get(Some(i), t + 3, t + 4));
            t += 10;
        }
        let tight = Config {
            max_steps_per_key: 100_000,
            ..absent()
        };
        let r = ok(&h, &tight);
        assert_eq!((r.unknown_puts, r.unread_unknown_puts), (60, 60));
        assert!(r.steps < 1_000, "{} steps", r.steps);
        // One of them read later: it stays, and must have taken effect
        // before that read and after its invoke.
        h.push(get(Some(1030), t, t + 1));
        let r = ok(&h, &tight);
        assert_eq!(r.unread_unknown_puts, 59);
        // Read before its invoke: nothing explains the read.
        let late = Op::put_unknown(0, K, 5000, t + 10);
        let v = bad(&[put(1, 0, 1), get(Some(5000), 2, 3), late], &absent());
        assert!(v.ops.iter().any(|o| o.kind == Kind::Get), "{v}");
    }

    #[test]
    fn linearize_leaves_out_reads_implied_by_another_and_so_decides_bursts_of_retries() {
        // A primary paused for a while answers a burst of retries of one
        // GET when it resumes: further reads of the same request, invoked at
        // its first send, returned one after the other, with the value that
        // was there then. Two clients' PUTs on the key were in flight too,
        // and the one that landed first is read last.
        let mut h = Vec::new();
        let mut t = 0;
        for r in 0..50u64 {
            let (a, b) = (2 * r + 1, 2 * r + 2);
            h.push(put(a, t, t + 400));
            h.push(put(b, t + 1, t + 400));
            for k in 0..30 {
                h.push(get(Some(a), t + 2, t + 401 + k));
            }
            t += 500;
        }
        let tight = Config {
            max_steps_per_key: 200_000,
            ..absent()
        };
        let r = ok(&h, &tight);
        assert_eq!(r.implied_reads, 50 * 29, "{r:?}");
        assert!(r.steps < 5_000, "{} steps", r.steps);
        // Exact: a read implied by one that fails still fails.
        let mut h = vec![put(1, 0, 10), put(2, 20, 30)];
        h.push(get(Some(1), 40, 50));
        h.push(get(Some(1), 35, 60));
        let v = bad(&h, &absent());
        assert!(v.ops.contains(&h[2]), "{v}");
        // A read containing a read of another value is not implied by it:
        // the stale read of 1 is kept, and found.
        let h = [
            put(1, 0, 10),
            put(2, 20, 30),
            get(Some(1), 35, 60),
            get(Some(2), 40, 50),
        ];
        let v = bad(&h, &absent());
        assert!(v.ops.contains(&h[2]), "{v}");
    }

    #[test]
    fn linearize_unknown_puts_may_or_may_not_take_effect() {
        let unk = Op::put_unknown(0, K, 2, 20);
        // Never took effect.
        ok(
            &[
                put(1, 0, 10),
                unk,
                get(Some(1), 30, 40),
                get(Some(1), 1000, 1001),
            ],
            &absent(),
        );
        // Took effect, even long after its invoke.
        ok(
            &[
                put(1, 0, 10),
                unk,
                get(Some(1), 30, 40),
                get(Some(2), 1000, 1001),
            ],
            &absent(),
        );
        // But once seen it stays.
        let h = [
            put(1, 0, 10),
            unk,
            get(Some(2), 30, 40),
            get(Some(1), 50, 60),
        ];
        let v = bad(&h, &absent());
        assert_eq!(v.ops.len(), 4, "{v}");
        assert!(v.minimal);
        // Not before its invoke.
        bad(&[put(1, 0, 10), get(Some(2), 12, 15), unk], &absent());
        // An unknown or failed GET says nothing; a failed PUT took no effect.
        let mut g = get(Some(7), 30, 40);
        g.outcome = Outcome::Unknown;
        let mut f = put(9, 50, 60);
        f.outcome = Outcome::Fail;
        let r = ok(&[put(1, 0, 10), g, f, get(Some(1), 70, 80)], &absent());
        assert_eq!((r.ops, r.checked), (4, 2));
        bad(&[put(1, 0, 10), f, get(Some(9), 70, 80)], &absent());
        // A GET with a result but no return time is checked, open-ended.
        let mut late = get(Some(2), 5, 0);
        late.ret = None;
        ok(&[put(1, 0, 10), late, put(2, 20, 30)], &absent());
    }

    #[test]
    fn linearize_stale_read_after_a_completed_put() {
        let h = [put(1, 0, 10), put(2, 20, 30), get(Some(1), 40, 50)];
        let v = bad(&h, &absent());
        assert_eq!(v.key, K);
        assert!(v.minimal);
        assert_eq!(v.init, Init::Any);
        // Closed: PUT 1 stays, since the GET read it.
        assert_eq!(v.ops, h.to_vec(), "{v}");
        // A longer history shrinks to the same.
        let mut long = vec![put(7, 0, 1), get(Some(7), 2, 3)];
        long.extend(h.iter().map(|o| Op {
            invoke: o.invoke + 100,
            ret: o.ret.map(|r| r + 100),
            ..*o
        }));
        long.push(get(Some(1), 200, 210));
        long.push(put(3, 220, 230));
        let w = bad(&long, &absent());
        assert_eq!(w.ops, long[2..5].to_vec(), "{w}");
        assert_eq!(w.key_ops, 7);
        let text = v.to_string();
        assert!(
            text.starts_with("linearizable: NO (3 ops, 1 keys): key 1"),
            "{text}"
        );
        assert!(text.contains("put 0x2 -> ok"), "{text}");
        assert!(text.contains("get -> 0x1"), "{text}");
    }

    #[test]
    fn linearize_value_never_written() {
        // Fresh service: reading anything but absent first is wrong.
        let v = bad(&[get(Some(7), 0, 1)], &absent());
        assert_eq!(v.init, Init::Absent);
        assert!(v.to_string().contains("absent at the start"), "{v}");
        // Any start: the first read fixes it, but a later one cannot differ.
        ok(
            &[get(Some(7), 0, 1), get(Some(7), 2, 3)],
            &Config::default(),
        );
        let v = bad(
            &[get(Some(7), 0, 1), get(Some(8), 2, 3)],
            &Config::default(),
        );
        assert_eq!(v.ops.len(), 2);
        bad(&[put(1, 0, 10), get(Some(5), 20, 30)], &Config::default());
        // A read before the write was invoked.
        bad(&[get(Some(1), 0, 10), put(1, 20, 30)], &absent());
    }

    #[test]
    fn linearize_two_gets_new_then_old() {
        // PUT 2 is concurrent with both reads, which do not overlap.
        let h = [
            put(1, 0, 10),
            put(2, 20, 100),
            get(Some(2), 30, 40),
            get(Some(1), 50, 60),
        ];
        let v = bad(&h, &absent());
        assert!(v.minimal);
        assert_eq!(v.ops, h.to_vec(), "{v}");
        // Without the writes, under any start: the two reads alone.
        let v = bad(&h[2..], &Config::default());
        assert_eq!(v.ops, h[2..].to_vec(), "{v}");
        // Overlapping reads may see either order.
        let h = [
            put(1, 0, 10),
            put(2, 20, 100),
            get(Some(2), 30, 55),
            get(Some(1), 50, 60),
        ];
        ok(&h, &absent());
    }

    #[test]
    fn linearize_keys_are_independent() {
        let h = [
            Op::put(0, 1, 1, 0, 10),
            Op::put(0, 2, 5, 0, 10),
            Op::get(1, 1, Some(1), 20, 30),
            Op::put(0, 2, 6, 20, 30),
            Op::get(1, 2, Some(5), 40, 50),
            Op::get(1, 3, Some(1), 60, 70),
        ];
        let v = bad(&h, &absent());
        assert_eq!(v.key, 2);
        assert_eq!(v.other_keys, vec![3]);
        assert_eq!((v.history_ops, v.keys, v.key_ops), (6, 3, 3));
        assert!(v.line().contains("(and key 3)"), "{}", v.line());
        ok(&h[..4], &absent());
    }

    #[test]
    fn linearize_budget_makes_it_undecided_not_hang() {
        // 40 concurrent PUTs, then reads of values in an impossible order:
        // each subset of the PUTs is a configuration (2^40).
        let reads = |n: u64| {
            let mut h: Vec<Op> = (0..n).map(|i| put(i + 1, 0, 1000)).collect();
            for i in 0..n {
                h.push(get(Some(n - i), 1001 + 2 * i, 1002 + 2 * i));
            }
            h.push(Op::put(0, 2, 1, 0, 1));
            h
        };
        let h = reads(40);
        let c = Config {
            max_steps_per_key: 1000,
            ..absent()
        };
        let r = check_with(&h, &c).expect("undecided, not a violation");
        assert_eq!(r.undecided, vec![K]);
        assert!(!r.complete());
        assert!(
            r.to_string()
                .starts_with("linearizable: undecided for 1 of 2 keys"),
            "{r}"
        );
        let t = Instant::now();
        let r = check_with(&h, &absent()).expect("undecided");
        assert_eq!(r.undecided, vec![K]);
        eprintln!("{r}: {} steps in {:?}", r.steps, t.elapsed());
        // 10 PUTs are decided (the reads change value with no write between
        // them): PUT 10 and 9, read in the wrong order.
        let v = bad(&reads(10), &absent());
        assert_eq!(v.ops.len(), 4, "{v}");
        // The total budget too.
        let c = Config {
            max_steps: 10,
            ..absent()
        };
        let r = check_with(&h, &c).expect("undecided");
        assert_eq!(r.undecided, vec![K, 2]);
    }

    /// A history of a real register per key: each operation takes effect at
    /// a random point of its interval (an unknown PUT at any point after
    /// its invoke, or never), the intervals overlapping at random.
    fn generate(seed: u64, keys: u64, per_key: u64) -> Vec<Op> {
        let mut rng = Rng::new(seed);
        let mut h = Vec::new();
        let mut fresh = 0u64;
        for key in 1..=keys {
            let mut t = rng.below(1000);
            // (point, op index): applied in order of the points.
            let mut points: Vec<(u64, usize)> = Vec::new();
            let first = h.len();
            for j in 0..per_key {
                t += rng.below(50);
                let dur = if rng.below(20) == 0 {
                    rng.below(600)
                } else {
                    rng.below(40)
                };
                let point = t + rng.below(dur + 1);
                let client = (j % 7) as u32;
                let op = if rng.below(2) == 0 {
                    fresh += 1;
                    if rng.below(50) == 0 {
                        let op = Op::put_unknown(client, key, fresh, t);
                        // Took effect (maybe long after) or never.
                        if rng.below(2) == 0 {
                            points.push((t + rng.below(3000), h.len()));
                        }
                        op
                    } else {
                        points.push((point, h.len()));
                        Op::put(client, key, fresh, t, t + dur)
                    }
                } else {
                    let mut op = Op::get(client, key, None, t, t + dur);
                    if rng.below(50) == 0 {
                        op.outcome = Outcome::Unknown;
                        op.ret = None;
                    }
                    points.push((point, h.len()));
                    op
                };
                h.push(op);
            }
            points.sort();
            let mut reg = None;
            for (_, i) in points {
                match h[i].kind {
                    Kind::Put(v) => reg = Some(v),
                    Kind::Get => {
                        if h[i].outcome != Outcome::Unknown {
                            h[i].outcome = Outcome::Ok(reg);
                        }
                    }
                }
            }
            debug_assert!(h.len() - first == per_key as usize);
        }
        // Interleave the keys as a client would have recorded them.
        h.sort_by_key(|o| o.invoke);
        h
    }

    /// Makes one completed GET read the value of a PUT that another PUT
    /// completely followed, both before the GET: a stale read. Returns the
    /// GET's index.
    fn inject_stale_read(h: &mut [Op], seed: u64) -> usize {
        let mut rng = Rng::new(seed);
        loop {
            let g = rng.below(h.len() as u64) as usize;
            if h[g].kind != Kind::Get || !matches!(h[g].outcome, Outcome::Ok(_)) {
                continue;
            }
            let key = h[g].key;
            let done = |o: &Op, before: u64| {
                o.key == key
                    && matches!(o.kind, Kind::Put(_))
                    && o.outcome == Outcome::Ok(None)
                    && o.ret.is_some_and(|r| r < before)
            };
            let Some(p2) = (0..h.len()).rfind(|&i| done(&h[i], h[g].invoke)) else {
                continue;
            };
            let Some(p1) = (0..h.len()).rfind(|&i| done(&h[i], h[p2].invoke)) else {
                continue;
            };
            let Kind::Put(v) = h[p1].kind else { continue };
            h[g].outcome = Outcome::Ok(Some(v));
            return g;
        }
    }

    #[test]
    fn linearize_random_register_histories_are_linearizable() {
        for seed in 0..200 {
            let h = generate(seed, 3, 60);
            for init in [Init::Absent, Init::Any] {
                let c = Config { init, ..absent() };
                match check_with(&h, &c) {
                    Ok(r) => assert!(r.complete(), "seed {seed}: {r}"),
                    Err(v) => panic!("seed {seed}: {v}"),
                }
            }
        }
    }

    #[test]
    fn linearize_random_histories_with_a_stale_read_fail() {
        for seed in 0..200 {
            let mut h = generate(seed, 3, 60);
            let g = inject_stale_read(&mut h, seed);
            let v = bad(&h, &absent());
            assert_eq!(v.key, h[g].key, "seed {seed}: {v}");
            assert!(v.other_keys.is_empty(), "seed {seed}: {v}");
            // A write that completed before the read, and the read.
            assert!(v.minimal, "seed {seed}: {v}");
            assert!(v.ops.contains(&h[g]), "seed {seed}: {v}");
            assert!(v.ops.len() >= 2 && v.ops.len() <= 6, "seed {seed}: {v}");
            let r = check_with(
                &v.ops,
                &Config {
                    init: v.init,
                    ..absent()
                },
            );
            assert!(r.is_err(), "seed {seed}: the sub-history passes: {v}");
        }
    }

    /// Whether `h` (one key) is linearizable, by trying every order.
    fn brute_force(h: &[Op], init: Init) -> bool {
        fn go(h: &[Op], taken: &mut [bool], s: State) -> bool {
            let left: Vec<usize> = (0..h.len()).filter(|&i| !taken[i]).collect();
            if left.iter().all(|&i| h[i].outcome == Outcome::Unknown) {
                return true;
            }
            for &i in &left {
                // Next only if nothing left must come before it.
                if left
                    .iter()
                    .any(|&j| j != i && h[j].ret_time() < h[i].invoke)
                {
                    continue;
                }
                let a = KOp::of(&h[i], i).act;
                if let Some(n) = step(s, a) {
                    taken[i] = true;
                    let ok = go(h, taken, n);
                    taken[i] = false;
                    if ok {
                        return true;
                    }
                }
            }
            false
        }
        let h: Vec<Op> = h.iter().filter(|o| o.counts()).copied().collect();
        go(&h, &mut vec![false; h.len()], state_of(init))
    }

    #[test]
    fn linearize_agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng::new(99);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..4000 {
            let n = 1 + rng.below(7) as usize;
            let h: Vec<Op> = (0..n)
                .map(|_| {
                    let a = rng.below(30);
                    let b = a + rng.below(12);
                    let v = 1 + rng.below(3);
                    let mut o = match rng.below(5) {
                        0 | 1 => put(v, a, b),
                        2 => Op::put_unknown(0, K, v, a),
                        _ => get((rng.below(4) != 0).then_some(v), a, b),
                    };
                    if rng.below(15) == 0 {
                        o.ret = None;
                    }
                    if rng.below(20) == 0 {
                        o.outcome = Outcome::Fail;
                    }
                    o
                })
                .collect();
            for init in [Init::Absent, Init::Any] {
                let c = Config { init, ..absent() };
                let want = brute_force(&h, init);
                match check_with(&h, &c) {
                    Ok(r) => {
                        assert!(r.complete());
                        assert!(want, "{init:?} {h:#?}: said linearizable");
                        yes += 1;
                    }
                    Err(v) => {
                        assert!(!want, "{init:?} {h:#?}: said not: {v}");
                        // The sub-history fails, and is closed.
                        assert!(!brute_force(&v.ops, v.init), "{h:#?}\n{v}");
                        for g in &v.ops {
                            if let (Kind::Get, Outcome::Ok(Some(x))) = (g.kind, g.outcome) {
                                // A PUT of unknown outcome invoked after
                                // every read of its value explains none.
                                let last_read = h
                                    .iter()
                                    .filter(|o| {
                                        o.kind == Kind::Get && o.outcome == Outcome::Ok(Some(x))
                                    })
                                    .map(|o| o.ret_time())
                                    .max()
                                    .unwrap_or(0);
                                let writers = |ops: &[Op]| {
                                    ops.iter()
                                        .filter(|o| o.kind == Kind::Put(x) && o.counts())
                                        .filter(|o| {
                                            o.outcome != Outcome::Unknown || o.invoke <= last_read
                                        })
                                        .count()
                                };
                                assert_eq!(writers(&v.ops), writers(&h), "{h:#?}\n{v}");
                            }
                        }
                        assert!(v.minimal);
                        no += 1;
                    }
                }
            }
        }
        eprintln!("{yes} linearizable, {no} not");
        assert!(yes > 1000 && no > 1000);
    }

    #[test]
    fn linearize_100k_ops_over_1000_keys_is_fast() {
        let h = generate(42, 1000, 100);
        assert_eq!(h.len(), 100_000);
        let t = Instant::now();
        let r = check_with(&h, &absent()).unwrap_or_else(|v| panic!("{v}"));
        let took = t.elapsed();
        eprintln!("{r}: {} steps in {took:?}", r.steps);
        assert!(r.complete() && r.keys == 1000, "{r}");
        assert!(took.as_secs_f64() < 3.0, "{took:?}");
        // With a stale read: found and shrunk quickly too.
        let mut h = h;
        let g = inject_stale_read(&mut h, 7);
        let t = Instant::now();
        let v = bad(&h, &absent());
        let took = t.elapsed();
        eprintln!("{v}\n in {took:?}");
        assert_eq!(v.key, h[g].key);
        assert!(took.as_secs_f64() < 3.0, "{took:?}");
    }

    #[test]
    fn linearize_one_long_key_is_linear_not_quadratic() {
        // 50,000 sequential operations on one key: one segment each, so
        // linear. Then with a PUT of unknown outcome near the start, which
        // is concurrent with all the rest: it is carried from segment to
        // segment instead of making one segment of 50,000.
        let mut h: Vec<Op> = Vec::new();
        for i in 0..50_000u64 {
            let t = i * 10;
            if i % 2 == 0 {
                h.push(put(i + 1, t, t + 5));
            } else {
                h.push(get(Some(i), t, t + 5));
            }
        }
        let t = Instant::now();
        let r = ok(&h, &absent());
        eprintln!("{r}: {:?}", t.elapsed());
        assert!(t.elapsed().as_secs_f64() < 3.0);
        h.insert(1, Op::put_unknown(2, K, 999_999, 3));
        let t = Instant::now();
        let r = ok(&h, &absent());
        eprintln!("with an unknown PUT: {r} in {:?}", t.elapsed());
        assert!(t.elapsed().as_secs_f64() < 3.0);
        assert_eq!(r.unknown_puts, 1);
        // It may take effect at the end, but not be seen and then unseen.
        h.push(get(Some(999_999), 600_000, 600_001));
        ok(&h, &absent());
        h.push(get(Some(49_999), 600_010, 600_011));
        let v = bad(&h, &absent());
        assert_eq!(v.ops.len(), 4, "{v}");
    }
}
