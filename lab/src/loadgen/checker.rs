//! The checker of a key-value history: pure (it is fed the client's sends
//! and the replies it receives, with their times), so that its logic is
//! tested on made-up histories.
//!
//! It knows, per key, the last acknowledged PUT (value and version) and the
//! highest version any reply has shown, and raises a [`Violation`] when:
//!
//! - [`ViolationKind::StaleReply`] (a): a reply to a request sent after an
//!   earlier reply had shown version v of a key shows a lower version: one
//!   of the two came from state that was later lost. A request sent before
//!   the client saw v may show less (it was concurrent with what made v),
//!   and so may a late copy of a reply to it: a failed-over primary that
//!   resumes releases the replies of the epochs its backup acknowledged
//!   before it took over, and one of them can arrive after the survivor's
//!   newer replies (seen in `tests/pair.rs` after a paused primary's
//!   resume: a retried GET's second reply, "absent" as its first was, came
//!   1 s late, after a PUT on the survivor).
//! - [`ViolationKind::LostWrite`] (b): a GET's reply does not show the last
//!   PUT acknowledged before the GET was first sent (an older version, or
//!   the same version with another value): an acknowledged write was lost.
//! - [`ViolationKind::BadPutReply`] (c): a PUT's reply shows a value other
//!   than the one sent, or a version no higher than the one acknowledged
//!   before the PUT was sent (the PUT was not applied).
//! - [`ViolationKind::PhantomWrite`]: a GET's reply shows a version newer
//!   than the last acknowledged PUT while no PUT of ours on that key was in
//!   flight: a write applied twice, or another writer (one client per
//!   service).
//!
//! A key's first reply, before any PUT of ours was acknowledged, is taken as
//! its starting state (the service may hold values from an earlier run).
//! Retries of a request (same id), duplicate replies and lost replies are
//! normal; a duplicate or late reply is still checked against (a).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use super::wire::{Op, Reply, Request, STATUS_OK};

/// What kind of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ViolationKind {
    /// (a) A reply shows a lower version than an earlier reply did.
    StaleReply,
    /// (b) A GET does not show the last PUT acknowledged before it was sent.
    LostWrite,
    /// (c) A PUT's reply does not show the value sent, or no new version.
    BadPutReply,
    /// A GET shows a version no PUT of ours explains.
    PhantomWrite,
}

/// One violation, with what was expected and what was seen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    /// Its kind.
    pub kind: ViolationKind,
    /// The key.
    pub key: u64,
    /// The id of the request whose reply showed it.
    pub req: u64,
    /// When the reply arrived, seconds since the start.
    pub at_s: f64,
    /// Expected and seen values and versions.
    pub detail: String,
}

/// A PUT acknowledged to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The value written.
    pub value: u64,
    /// The version the reply gave it.
    pub version: u64,
    /// The PUT's request id.
    pub req: u64,
    /// When the acknowledgement arrived.
    pub at: Duration,
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    acked: Option<Acked>,
    /// Highest version any reply showed, with that reply's request id and time.
    max_version: u64,
    max_req: u64,
    max_at: Duration,
    /// The first request id sent after `max_version` was seen: replies to
    /// it and later requests must show at least that version.
    max_from_req: u64,
    puts_in_flight: u32,
    put_sends: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    op: Op,
    key: u64,
    value: u64,
    first_sent: Duration,
    /// The last acknowledged PUT when this request was first sent.
    acked_at_send: Option<Acked>,
    puts_in_flight_at_send: u32,
    put_sends_at_send: u64,
}

/// What [`Checker::on_send`] made of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// A new request.
    First,
    /// A retry of a pending request.
    Retry,
    /// Not a valid send (another client, a key out of range, or a retry
    /// that differs from the first send); ignored.
    Rejected,
}

/// What [`Checker::on_reply`] made of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// It completed a pending request.
    Completed {
        /// The op.
        op: Op,
        /// The key.
        key: u64,
        /// The reply's status ([`STATUS_OK`] or an error, in which case
        /// nothing was checked or recorded).
        status: u32,
        /// From the request's first send to this reply.
        latency: Duration,
        /// Violations this reply raised.
        violations: u32,
    },
    /// A reply to a request already completed (a retry's or a late one).
    Duplicate {
        /// Violations it raised (it is checked against (a)).
        violations: u32,
    },
    /// A reply naming a pending request but another key or op; ignored.
    Mismatched,
    /// Another client's reply, or a key out of range; ignored.
    Foreign,
}

/// Counts kept by the checker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CheckCounts {
    /// Requests first sent.
    pub sent: u64,
    /// Retries.
    pub retries: u64,
    /// Requests completed with status ok.
    pub acked: u64,
    /// Of which PUTs.
    pub puts_acked: u64,
    /// Of which GETs.
    pub gets_acked: u64,
    /// Requests completed with an error status.
    pub error_replies: u64,
    /// Duplicate or late replies.
    pub duplicate_replies: u64,
    /// Replies naming a pending request with another key or op.
    pub mismatched_replies: u64,
    /// Other clients' replies or keys out of range.
    pub foreign_replies: u64,
    /// Sends rejected by [`Checker::on_send`].
    pub rejected_sends: u64,
}

/// The checker. Memory: one small record per key (keys are `1..=keys`)
/// and one per pending request.
#[derive(Debug, Clone)]
pub struct Checker {
    client: u64,
    keys: Vec<KeyState>,
    pending: HashMap<u64, Pending>,
    violations: Vec<Violation>,
    violation_count: u64,
    keep: usize,
    counts: CheckCounts,
    /// The highest request id sent so far.
    max_sent_req: u64,
}

impl Checker {
    /// A checker for `client`'s requests on keys `1..=keys`, keeping the
    /// first `keep` violations in full (all are counted).
    pub fn new(client: u64, keys: u64, keep: usize) -> Checker {
        Checker {
            client,
            keys: vec![KeyState::default(); keys as usize],
            pending: HashMap::new(),
            violations: Vec::new(),
            violation_count: 0,
            keep,
            counts: CheckCounts::default(),
            max_sent_req: 0,
        }
    }

    fn key_index(&self, key: u64) -> Option<usize> {
        (key >= 1 && key <= self.keys.len() as u64).then(|| (key - 1) as usize)
    }

    /// Records a send at `at` (since the start): the first send of a new
    /// request id, or a retry of a pending one.
    pub fn on_send(&mut self, q: &Request, at: Duration) -> SendOutcome {
        let Some(ki) = self.key_index(q.key).filter(|_| q.client == self.client) else {
            self.counts.rejected_sends += 1;
            return SendOutcome::Rejected;
        };
        if let Some(p) = self.pending.get(&q.req) {
            if p.op == q.op && p.key == q.key && p.value == q.value {
                self.counts.retries += 1;
                return SendOutcome::Retry;
            }
            self.counts.rejected_sends += 1;
            return SendOutcome::Rejected;
        }
        let ks = &mut self.keys[ki];
        let p = Pending {
            op: q.op,
            key: q.key,
            value: q.value,
            first_sent: at,
            acked_at_send: ks.acked,
            puts_in_flight_at_send: ks.puts_in_flight,
            put_sends_at_send: ks.put_sends,
        };
        if q.op == Op::Put {
            ks.puts_in_flight += 1;
            ks.put_sends += 1;
        }
        self.pending.insert(q.req, p);
        self.max_sent_req = self.max_sent_req.max(q.req);
        self.counts.sent += 1;
        SendOutcome::First
    }

    /// Forgets a pending request that will never be retried (its PUT stays
    /// counted as in flight for the key, since it may yet be applied).
    pub fn abandon(&mut self, req: u64) {
        self.pending.remove(&req);
    }

    fn violate(&mut self, kind: ViolationKind, key: u64, req: u64, at: Duration, detail: String) {
        self.violation_count += 1;
        if self.violations.len() < self.keep {
            self.violations.push(Violation {
                kind,
                key,
                req,
                at_s: at.as_secs_f64(),
                detail,
            });
        }
    }

    /// Checks (a) and records the reply's version as seen.
    fn check_version(&mut self, r: &Reply, ki: usize, at: Duration) -> u32 {
        let ks = &self.keys[ki];
        let mut n = 0;
        if r.version < ks.max_version && r.req >= ks.max_from_req {
            let detail = format!(
                "{:?} reply shows version {} (value {:#x}) but the reply to req {} at {:.3}s \
                 showed version {}",
                r.op,
                r.version,
                r.value,
                ks.max_req,
                ks.max_at.as_secs_f64(),
                ks.max_version
            );
            self.violate(ViolationKind::StaleReply, r.key, r.req, at, detail);
            n += 1;
        }
        let ks = &mut self.keys[ki];
        if r.version > ks.max_version {
            ks.max_version = r.version;
            ks.max_req = r.req;
            ks.max_at = at;
            ks.max_from_req = self.max_sent_req + 1;
        }
        n
    }

    /// Records a reply received at `at` and checks it.
    pub fn on_reply(&mut self, r: &Reply, at: Duration) -> ReplyOutcome {
        let Some(ki) = self.key_index(r.key).filter(|_| r.client == self.client) else {
            self.counts.foreign_replies += 1;
            return ReplyOutcome::Foreign;
        };
        let Some(p) = self.pending.get(&r.req) else {
            self.counts.duplicate_replies += 1;
            let violations = if r.status == STATUS_OK {
                self.check_version(r, ki, at)
            } else {
                0
            };
            return ReplyOutcome::Duplicate { violations };
        };
        if p.key != r.key || p.op != r.op {
            self.counts.mismatched_replies += 1;
            return ReplyOutcome::Mismatched;
        }
        let Some(p) = self.pending.remove(&r.req) else {
            return ReplyOutcome::Mismatched;
        };
        let latency = at.saturating_sub(p.first_sent);
        if p.op == Op::Put {
            let ks = &mut self.keys[ki];
            ks.puts_in_flight = ks.puts_in_flight.saturating_sub(1);
        }
        if r.status != STATUS_OK {
            self.counts.error_replies += 1;
            return ReplyOutcome::Completed {
                op: p.op,
                key: p.key,
                status: r.status,
                latency,
                violations: 0,
            };
        }
        self.counts.acked += 1;
        let mut violations = self.check_version(r, ki, at);
        match p.op {
            Op::Put => {
                self.counts.puts_acked += 1;
                let before = p.acked_at_send.map_or(0, |a| a.version);
                if r.value != p.value || (p.acked_at_send.is_some() && r.version <= before) {
                    let detail = format!(
                        "PUT of {:#x} replied value {:#x} version {} (version acknowledged \
                         before it was sent: {})",
                        p.value, r.value, r.version, before
                    );
                    self.violate(ViolationKind::BadPutReply, r.key, r.req, at, detail);
                    violations += 1;
                }
                let ks = &mut self.keys[ki];
                if ks.acked.is_none_or(|a| r.version >= a.version) {
                    ks.acked = Some(Acked {
                        value: p.value,
                        version: r.version,
                        req: r.req,
                        at,
                    });
                }
            }
            Op::Get => {
                self.counts.gets_acked += 1;
                if let Some(a) = p.acked_at_send {
                    let ks = &self.keys[ki];
                    let concurrent =
                        p.puts_in_flight_at_send > 0 || ks.put_sends > p.put_sends_at_send;
                    let what = format!(
                        "GET first sent at {:.3}s shows value {:#x} version {}; PUT req {} of \
                         {:#x} was acknowledged with version {} at {:.3}s, before it",
                        p.first_sent.as_secs_f64(),
                        r.value,
                        r.version,
                        a.req,
                        a.value,
                        a.version,
                        a.at.as_secs_f64()
                    );
                    let kind = if r.version < a.version
                        || (r.version == a.version && r.value != a.value)
                    {
                        Some(ViolationKind::LostWrite)
                    } else if r.version > a.version && !concurrent {
                        Some(ViolationKind::PhantomWrite)
                    } else {
                        None
                    };
                    if let Some(kind) = kind {
                        self.violate(kind, r.key, r.req, at, what);
                        violations += 1;
                    }
                }
            }
        }
        ReplyOutcome::Completed {
            op: p.op,
            key: p.key,
            status: r.status,
            latency,
            violations,
        }
    }

    /// The last acknowledged PUT of `key`.
    pub fn acked(&self, key: u64) -> Option<Acked> {
        self.key_index(key).and_then(|i| self.keys[i].acked)
    }

    /// Keys with an acknowledged PUT.
    pub fn acked_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.acked.is_some())
            .map(|(i, _)| i as u64 + 1)
    }

    /// Whether a request is pending.
    pub fn is_pending(&self, req: u64) -> bool {
        self.pending.contains_key(&req)
    }

    /// Pending requests.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// All violations counted.
    pub fn violation_count(&self) -> u64 {
        self.violation_count
    }

    /// The first violations, in full.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The counts.
    pub fn counts(&self) -> CheckCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 0xc1;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn put(req: u64, key: u64, value: u64) -> Request {
        Request {
            op: Op::Put,
            client: C,
            req,
            key,
            value,
        }
    }

    fn get(req: u64, key: u64) -> Request {
        Request {
            op: Op::Get,
            client: C,
            req,
            key,
            value: 0,
        }
    }

    fn reply(q: &Request, value: u64, version: u64) -> Reply {
        Reply::ok_to(q, value, version)
    }

    fn kinds(c: &Checker) -> Vec<ViolationKind> {
        c.violations().iter().map(|v| v.kind).collect()
    }

    fn completed(o: ReplyOutcome) -> u32 {
        match o {
            ReplyOutcome::Completed { violations, .. } => violations,
            other => panic!("not completed: {other:?}"),
        }
    }

    #[test]
    fn clean_history_with_retries_duplicates_and_lost_replies() {
        let mut c = Checker::new(C, 4, 10);
        // A key written by an earlier run: its first GET sets the baseline.
        let g0 = get(1, 1);
        assert_eq!(c.on_send(&g0, ms(0)), SendOutcome::First);
        assert_eq!(completed(c.on_reply(&reply(&g0, 77, 9), ms(1))), 0);
        // A PUT whose first reply is lost: retried, the retry's reply
        // (deduplicated by the server) acknowledges it.
        let p1 = put(2, 1, 1000);
        assert_eq!(c.on_send(&p1, ms(2)), SendOutcome::First);
        assert_eq!(c.on_send(&p1, ms(52)), SendOutcome::Retry);
        match c.on_reply(&reply(&p1, 1000, 10), ms(53)) {
            ReplyOutcome::Completed {
                latency,
                violations,
                ..
            } => {
                assert_eq!(latency, ms(51), "latency runs from the first send");
                assert_eq!(violations, 0);
            }
            o => panic!("{o:?}"),
        }
        // The original's reply arrives late: a duplicate, consistent.
        assert_eq!(
            c.on_reply(&reply(&p1, 1000, 10), ms(54)),
            ReplyOutcome::Duplicate { violations: 0 }
        );
        assert_eq!(c.acked(1).map(|a| (a.value, a.version)), Some((1000, 10)));
        // GET reads it back, twice replied.
        let g2 = get(3, 1);
        c.on_send(&g2, ms(60));
        c.on_send(&g2, ms(110));
        assert_eq!(completed(c.on_reply(&reply(&g2, 1000, 10), ms(111))), 0);
        assert_eq!(
            c.on_reply(&reply(&g2, 1000, 10), ms(112)),
            ReplyOutcome::Duplicate { violations: 0 }
        );
        // A fresh key: first PUT gives version 1, a GET shows it.
        let p3 = put(4, 2, 5);
        c.on_send(&p3, ms(120));
        assert_eq!(completed(c.on_reply(&reply(&p3, 5, 1), ms(121))), 0);
        let p4 = put(5, 2, 6);
        c.on_send(&p4, ms(122));
        assert_eq!(completed(c.on_reply(&reply(&p4, 6, 2), ms(123))), 0);
        let g5 = get(6, 2);
        c.on_send(&g5, ms(124));
        assert_eq!(completed(c.on_reply(&reply(&g5, 6, 2), ms(125))), 0);
        // A GET of a never-written key.
        let g6 = get(7, 3);
        c.on_send(&g6, ms(130));
        assert_eq!(completed(c.on_reply(&reply(&g6, 0, 0), ms(131))), 0);
        // A request whose reply never comes stays pending, harmlessly.
        let p7 = put(8, 4, 9);
        c.on_send(&p7, ms(140));
        assert!(c.is_pending(8));
        assert_eq!(c.violation_count(), 0, "{:?}", c.violations());
        let n = c.counts();
        assert_eq!((n.sent, n.retries, n.acked), (8, 2, 7));
        assert_eq!(n.duplicate_replies, 2);
        assert_eq!(c.acked_keys().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_get_concurrent_with_a_put_may_see_either() {
        let mut c = Checker::new(C, 1, 10);
        let p1 = put(1, 1, 11);
        c.on_send(&p1, ms(0));
        c.on_reply(&reply(&p1, 11, 1), ms(1));
        // PUT 2 and a GET sent together; the GET is answered first with the
        // old value, then with the new one (another GET): both fine.
        let p2 = put(2, 1, 22);
        let g = get(3, 1);
        c.on_send(&p2, ms(2));
        c.on_send(&g, ms(2));
        assert_eq!(completed(c.on_reply(&reply(&g, 11, 1), ms(3))), 0);
        let g2 = get(4, 1);
        c.on_send(&g2, ms(3));
        assert_eq!(completed(c.on_reply(&reply(&g2, 22, 2), ms(4))), 0);
        assert_eq!(completed(c.on_reply(&reply(&p2, 22, 2), ms(5))), 0);
        assert_eq!(c.violation_count(), 0, "{:?}", c.violations());
    }

    #[test]
    fn a_late_copy_of_an_earlier_reply_is_not_stale() {
        let mut c = Checker::new(C, 1, 10);
        // GET 1 answered "version 0", then PUT 2 acknowledged at version 1.
        let g1 = get(1, 1);
        c.on_send(&g1, ms(0));
        c.on_reply(&reply(&g1, 0, 0), ms(1));
        let p2 = put(2, 1, 100);
        c.on_send(&p2, ms(2));
        c.on_reply(&reply(&p2, 100, 1), ms(3));
        // A second copy of GET 1's reply arrives late: it was computed
        // before the PUT, and is no sign of lost state.
        assert_eq!(
            c.on_reply(&reply(&g1, 0, 0), ms(50)),
            ReplyOutcome::Duplicate { violations: 0 }
        );
        // A request sent after version 1 was seen must show it.
        let g3 = get(3, 1);
        c.on_send(&g3, ms(51));
        assert_eq!(completed(c.on_reply(&reply(&g3, 0, 0), ms(52))), 2);
        assert_eq!(
            kinds(&c),
            vec![ViolationKind::StaleReply, ViolationKind::LostWrite]
        );
    }

    #[test]
    fn stale_reply_is_detected() {
        let mut c = Checker::new(C, 2, 10);
        // Baseline from GETs (no acknowledged PUT): version 3, then 2.
        let g1 = get(1, 1);
        c.on_send(&g1, ms(0));
        c.on_reply(&reply(&g1, 30, 3), ms(1));
        let g2 = get(2, 1);
        c.on_send(&g2, ms(2));
        assert_eq!(completed(c.on_reply(&reply(&g2, 20, 2), ms(3))), 1);
        assert_eq!(kinds(&c), vec![ViolationKind::StaleReply]);
        let v = &c.violations()[0];
        assert_eq!((v.key, v.req), (1, 2));
        assert!(v.detail.contains("version 2"), "{}", v.detail);
        // A late copy of a reply sent before a newer version was seen is
        // not (the network, or a resumed old primary, delivered it late);
        // a reply to a request sent after it, showing less, is.
        let p = put(3, 2, 5);
        c.on_send(&p, ms(4));
        c.on_reply(&reply(&p, 5, 1), ms(5));
        let p2 = put(4, 2, 6);
        c.on_send(&p2, ms(6));
        c.on_reply(&reply(&p2, 6, 2), ms(7));
        assert_eq!(
            c.on_reply(&reply(&p, 5, 1), ms(8)),
            ReplyOutcome::Duplicate { violations: 0 }
        );
        let g3 = get(5, 2);
        c.on_send(&g3, ms(9));
        c.on_reply(&reply(&g3, 5, 1), ms(10));
        assert_eq!(c.violation_count(), 3, "{:?}", c.violations());
    }

    #[test]
    fn lost_acknowledged_write_is_detected() {
        let mut c = Checker::new(C, 1, 10);
        let p1 = put(1, 1, 100);
        c.on_send(&p1, ms(0));
        c.on_reply(&reply(&p1, 100, 1), ms(1));
        let p2 = put(2, 1, 200);
        c.on_send(&p2, ms(2));
        c.on_reply(&reply(&p2, 200, 2), ms(3));
        // The service fails over to a state before PUT 2.
        let g = get(3, 1);
        c.on_send(&g, ms(10));
        assert_eq!(completed(c.on_reply(&reply(&g, 100, 1), ms(11))), 2);
        assert_eq!(
            kinds(&c),
            vec![ViolationKind::StaleReply, ViolationKind::LostWrite]
        );
        assert!(c.violations()[1].detail.contains("PUT req 2"));
    }

    #[test]
    fn lost_write_same_version_other_value() {
        // A failover to a state where another PUT produced the same version:
        // only the value tells.
        let mut c = Checker::new(C, 1, 10);
        let p1 = put(1, 1, 100);
        c.on_send(&p1, ms(0));
        c.on_reply(&reply(&p1, 100, 1), ms(1));
        let g = get(2, 1);
        c.on_send(&g, ms(2));
        assert_eq!(completed(c.on_reply(&reply(&g, 999, 1), ms(3))), 1);
        assert_eq!(kinds(&c), vec![ViolationKind::LostWrite]);
    }

    #[test]
    fn a_write_lost_after_a_get_was_sent_is_not_blamed_on_it() {
        // The PUT's ack arrives after the GET was sent: the GET may show the
        // older state (spec (b) only covers acks before the GET's send).
        let mut c = Checker::new(C, 1, 10);
        let p0 = put(1, 1, 1);
        c.on_send(&p0, ms(0));
        c.on_reply(&reply(&p0, 1, 1), ms(1));
        let p1 = put(2, 1, 2);
        let g = get(3, 1);
        c.on_send(&p1, ms(2));
        c.on_send(&g, ms(3));
        assert_eq!(completed(c.on_reply(&reply(&g, 1, 1), ms(4))), 0);
        assert_eq!(completed(c.on_reply(&reply(&p1, 2, 2), ms(5))), 0);
        assert_eq!(c.violation_count(), 0);
    }

    #[test]
    fn bad_put_reply_is_detected() {
        let mut c = Checker::new(C, 1, 10);
        let p1 = put(1, 1, 100);
        c.on_send(&p1, ms(0));
        assert_eq!(completed(c.on_reply(&reply(&p1, 101, 1), ms(1))), 1);
        assert_eq!(kinds(&c), vec![ViolationKind::BadPutReply]);
        // A PUT acknowledged without a new version: not applied.
        let p2 = put(2, 1, 200);
        c.on_send(&p2, ms(2));
        assert_eq!(completed(c.on_reply(&reply(&p2, 200, 1), ms(3))), 1);
        assert_eq!(c.violation_count(), 2);
    }

    #[test]
    fn phantom_write_is_detected() {
        let mut c = Checker::new(C, 1, 10);
        let p1 = put(1, 1, 100);
        c.on_send(&p1, ms(0));
        c.on_reply(&reply(&p1, 100, 1), ms(1));
        let g = get(2, 1);
        c.on_send(&g, ms(2));
        assert_eq!(completed(c.on_reply(&reply(&g, 100, 2), ms(3))), 1);
        assert_eq!(kinds(&c), vec![ViolationKind::PhantomWrite]);
    }

    #[test]
    fn errors_foreign_and_mismatched_replies_change_nothing() {
        let mut c = Checker::new(C, 2, 10);
        let p1 = put(1, 1, 100);
        c.on_send(&p1, ms(0));
        // Table full: completes, records nothing.
        let mut r = reply(&p1, 0, 0);
        r.status = super::super::wire::STATUS_TABLE_FULL;
        assert!(matches!(
            c.on_reply(&r, ms(1)),
            ReplyOutcome::Completed { status: 1, .. }
        ));
        assert_eq!(c.acked(1), None);
        let p2 = put(2, 1, 7);
        c.on_send(&p2, ms(2));
        let mut other = reply(&p2, 7, 1);
        other.client = C + 1;
        assert_eq!(c.on_reply(&other, ms(3)), ReplyOutcome::Foreign);
        let mut far = reply(&p2, 7, 1);
        far.key = 3;
        assert_eq!(c.on_reply(&far, ms(3)), ReplyOutcome::Foreign);
        let mut zero = reply(&p2, 7, 1);
        zero.key = 0;
        assert_eq!(c.on_reply(&zero, ms(3)), ReplyOutcome::Foreign);
        let mut wrong_key = reply(&p2, 7, 1);
        wrong_key.key = 2;
        assert_eq!(c.on_reply(&wrong_key, ms(3)), ReplyOutcome::Mismatched);
        let mut wrong_op = reply(&p2, 7, 1);
        wrong_op.op = Op::Get;
        assert_eq!(c.on_reply(&wrong_op, ms(3)), ReplyOutcome::Mismatched);
        assert!(c.is_pending(2));
        assert_eq!(completed(c.on_reply(&reply(&p2, 7, 1), ms(4))), 0);
        // Bad sends are rejected.
        assert_eq!(c.on_send(&put(9, 0, 1), ms(5)), SendOutcome::Rejected);
        assert_eq!(c.on_send(&put(9, 3, 1), ms(5)), SendOutcome::Rejected);
        c.on_send(&put(10, 2, 1), ms(5));
        assert_eq!(c.on_send(&put(10, 2, 2), ms(6)), SendOutcome::Rejected);
        assert_eq!(c.violation_count(), 0);
        let n = c.counts();
        assert_eq!((n.foreign_replies, n.mismatched_replies), (3, 2));
        assert_eq!((n.error_replies, n.rejected_sends), (1, 3));
    }

    #[test]
    fn violations_are_all_counted_but_few_kept() {
        let mut c = Checker::new(C, 100, 3);
        for k in 1..=10 {
            let p = put(k, k, k);
            c.on_send(&p, ms(k));
            c.on_reply(&reply(&p, k + 1, 1), ms(k));
        }
        assert_eq!(c.violation_count(), 10);
        assert_eq!(c.violations().len(), 3);
    }
}
