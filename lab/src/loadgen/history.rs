//! The load generator's history for [`crate::linearize`]: every request
//! with its first send, and its reply, recorded as a register operation.
//! Pure (fed sends and replies with their times), like the checker.
//!
//! - A request is invoked at its first send; it returns at its first reply
//!   with status ok (a GET reads the reply's value, or absent at version
//!   0). A retry reuses the request, so it is one operation.
//! - An error reply (table or log full, bad request): the service did not
//!   apply it, [`Outcome::Fail`].
//! - No reply (still outstanding at the end, or a verification GET
//!   abandoned): [`Outcome::Unknown`]; a reply arriving later completes it.
//! - A further ok reply to a GET already answered (to a retry: the server
//!   ran it again) is one more read, invoked at the first send.
//! - After `limit` operations nothing more is recorded (counted in
//!   [`Recorder::dropped`]). With at most one request outstanding per key,
//!   the operations kept are, on every key, all before those dropped, so
//!   the kept history is linearizable if the whole one is.

use std::time::Duration;

use super::wire::{Op as WireOp, Reply, Request, STATUS_OK};
use crate::linearize::{Kind, Op, Outcome};

/// The recorder.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    ops: Vec<Op>,
    /// The request id of each of `ops` (increasing).
    reqs: Vec<u64>,
    /// Further reads (replies to retried GETs).
    extra: Vec<Op>,
    limit: usize,
    dropped: u64,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128 - 1) as u64
}

impl Recorder {
    /// A recorder keeping `limit` operations at most (0: none).
    pub fn new(limit: usize) -> Recorder {
        Recorder {
            limit,
            ..Recorder::default()
        }
    }

    fn full(&mut self) -> bool {
        if self.ops.len() + self.extra.len() >= self.limit {
            self.dropped += 1;
            return true;
        }
        false
    }

    /// A request's first send at `at` (ids must increase).
    pub fn sent(&mut self, q: &Request, at: Duration) {
        if self.full() || self.reqs.last().is_some_and(|&r| r >= q.req) {
            return;
        }
        self.ops.push(Op {
            client: 0,
            key: q.key,
            kind: match q.op {
                WireOp::Put => Kind::Put(q.value),
                WireOp::Get => Kind::Get,
            },
            invoke: ns(at),
            ret: None,
            outcome: Outcome::Unknown,
        });
        self.reqs.push(q.req);
    }

    fn find(&self, r: &Reply) -> Option<usize> {
        let i = self.reqs.binary_search(&r.req).ok()?;
        let o = &self.ops[i];
        let op = match o.kind {
            Kind::Put(_) => WireOp::Put,
            Kind::Get => WireOp::Get,
        };
        (o.key == r.key && op == r.op).then_some(i)
    }

    fn result(r: &Reply) -> Outcome {
        match r.op {
            WireOp::Put => Outcome::Ok(None),
            WireOp::Get => Outcome::Ok((r.version != 0).then_some(r.value)),
        }
    }

    /// The reply at `at` that completed a pending request.
    pub fn completed(&mut self, r: &Reply, at: Duration) {
        let Some(i) = self.find(r) else { return };
        let o = &mut self.ops[i];
        o.ret = Some(ns(at));
        o.outcome = if r.status == STATUS_OK {
            Self::result(r)
        } else {
            Outcome::Fail
        };
    }

    /// A reply at `at` to a request already completed or abandoned.
    pub fn duplicate(&mut self, r: &Reply, at: Duration) {
        if r.status != STATUS_OK {
            return;
        }
        let Some(i) = self.find(r) else { return };
        let o = self.ops[i];
        if !matches!(o.outcome, Outcome::Ok(_)) {
            // Abandoned (or answered with an error first, yet applied).
            let o = &mut self.ops[i];
            o.ret = Some(ns(at));
            o.outcome = Self::result(r);
        } else if o.kind == Kind::Get && !self.full() {
            self.extra.push(Op {
                ret: Some(ns(at)),
                outcome: Self::result(r),
                ..o
            });
        }
    }

    /// Operations recorded.
    pub fn len(&self) -> usize {
        self.ops.len() + self.extra.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Operations not recorded (past the limit).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The history.
    pub fn history(&self) -> Vec<Op> {
        self.ops.iter().chain(&self.extra).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::STATUS_TABLE_FULL;
    use super::*;
    use crate::linearize;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn q(op: WireOp, req: u64, key: u64, value: u64) -> Request {
        Request {
            op,
            client: 1,
            req,
            key,
            value,
        }
    }

    fn reply(q: &Request, value: u64, version: u64) -> Reply {
        Reply::ok_to(q, value, version)
    }

    #[test]
    fn linearize_history_records_requests_as_operations() {
        let mut h = Recorder::new(100);
        let p = q(WireOp::Put, 1, 5, 0xaa);
        let g0 = q(WireOp::Get, 2, 6, 0);
        let g = q(WireOp::Get, 3, 5, 0);
        let full = q(WireOp::Put, 4, 7, 0xbb);
        let lost = q(WireOp::Put, 5, 8, 0xcc);
        h.sent(&p, ms(1));
        h.sent(&g0, ms(1));
        h.completed(&reply(&p, 0xaa, 1), ms(2));
        h.completed(&reply(&g0, 0, 0), ms(2));
        h.sent(&g, ms(3));
        h.completed(&reply(&g, 0xaa, 1), ms(4));
        // The retried GET's second reply: another read.
        h.duplicate(&reply(&g, 0xaa, 1), ms(6));
        h.sent(&full, ms(7));
        let mut e = reply(&full, 0, 0);
        e.status = STATUS_TABLE_FULL;
        h.completed(&e, ms(8));
        h.sent(&lost, ms(9));
        // A reply naming another key is not ours.
        let mut wrong = reply(&g, 1, 1);
        wrong.key = 9;
        h.completed(&wrong, ms(9));
        let ops = h.history();
        assert_eq!(ops.len(), 6);
        let ms_ns = |n: u64| n * 1_000_000;
        assert_eq!(ops[0], linearize::Op::put(0, 5, 0xaa, ms_ns(1), ms_ns(2)));
        assert_eq!(ops[1], linearize::Op::get(0, 6, None, ms_ns(1), ms_ns(2)));
        assert_eq!(ops[2].outcome, Outcome::Ok(Some(0xaa)));
        assert_eq!(ops[3].outcome, Outcome::Fail);
        assert_eq!(ops[4].outcome, Outcome::Unknown);
        assert_eq!((ops[5].invoke, ops[5].ret), (ms_ns(3), Some(ms_ns(6))));
        let r = linearize::check(&ops).unwrap();
        assert_eq!(r.to_string(), "linearizable: yes (6 ops, 4 keys)");
    }

    #[test]
    fn linearize_history_late_reply_completes_an_abandoned_get() {
        let mut h = Recorder::new(100);
        let g = q(WireOp::Get, 1, 1, 0);
        h.sent(&g, ms(1));
        h.duplicate(&reply(&g, 7, 3), ms(50));
        assert_eq!(
            h.history(),
            vec![linearize::Op::get(0, 1, Some(7), 1_000_000, 50_000_000)]
        );
    }

    #[test]
    fn linearize_history_stops_at_its_limit() {
        let mut h = Recorder::new(2);
        for i in 1..=4 {
            let p = q(WireOp::Put, i, i, i);
            h.sent(&p, ms(i));
            h.completed(&reply(&p, i, 1), ms(i));
        }
        assert_eq!((h.len(), h.dropped()), (2, 2));
        assert!(Recorder::new(0).is_empty());
    }

    #[test]
    fn linearize_history_of_a_lost_write_fails() {
        // PUT acknowledged, then the service fails over to before it.
        let mut h = Recorder::new(100);
        let p1 = q(WireOp::Put, 1, 1, 10);
        let p2 = q(WireOp::Put, 2, 1, 20);
        let g = q(WireOp::Get, 3, 1, 0);
        h.sent(&p1, ms(1));
        h.completed(&reply(&p1, 10, 1), ms(2));
        h.sent(&p2, ms(3));
        h.completed(&reply(&p2, 20, 2), ms(4));
        h.sent(&g, ms(5));
        h.completed(&reply(&g, 10, 1), ms(6));
        let v = linearize::check(&h.history()).unwrap_err();
        assert_eq!(v.key, 1);
        assert_eq!(v.ops.len(), 3, "{v}");
    }
}
