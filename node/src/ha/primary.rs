//! The primary role's decisions: output commit and fencing.
//!
//! The console bytes of epoch `k` are held until the backup acks checkpoint
//! `k`; then they are released. A node that learns another node runs the
//! guest ([`EndReason::fences`]) stops its guest and never releases what it
//! holds. A session that ends otherwise leaves the guest running
//! unprotected: held output is released and new output is not held, until
//! a backup returns and a new session starts with a full resync.
//!
//! When holding starts: a checkpoint may be resumed from only if the output
//! the world saw is all in it, so output is held from that checkpoint's
//! pause on ([`PrimaryCore::hold_from_pause`]). A session of protocol 7 or
//! later releases output at once during its full resync (which takes a
//! while: the whole image crosses the link) and holds it from the first
//! pause after the resync's ack; its checkpoints say which ones may be
//! resumed from (`Held`), and the resync may not. An older session holds
//! from its resync's pause, and every checkpoint may be resumed from. The
//! guest counts as protected once a checkpoint that may be resumed from is
//! acknowledged.

use std::collections::VecDeque;

use protocol::EndReason;

use super::Claim;

/// What happened, as the primary role sees it. `T` is what the shell keeps
/// with each checkpoint in flight (its timings), handed back on its ack.
#[derive(Debug, Clone, PartialEq)]
pub enum PrimaryInput<T> {
    /// A backup is connected and authenticated: a session can start.
    Connected,
    /// Checkpoint `epoch` went out; its ack releases the console up to
    /// `release_to`. Its output was held from its pause on or not, as
    /// [`PrimaryCore::hold_from_pause`] said at that pause.
    Sent {
        /// The epoch.
        epoch: u64,
        /// Console offset its output ends at.
        release_to: u64,
        /// Kept for the shell.
        meta: T,
    },
    /// The backup committed everything up to `epoch`.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// The session ended.
    Ended(EndReason),
    /// The witness answered a [`PrimaryAction::Claim`].
    Claimed(Claim),
}

/// What the primary role must do.
#[derive(Debug, Clone, PartialEq)]
pub enum PrimaryAction<T> {
    /// Start a session: send the hello and a full resync as its first
    /// checkpoint. Output is held from the pause that
    /// [`PrimaryCore::hold_from_pause`] names.
    StartSession,
    /// The backup committed a checkpoint it may resume from: the guest is
    /// protected.
    Protected,
    /// Release console output up to this offset; the acked checkpoints'
    /// `meta`, oldest first.
    Release {
        /// Offset.
        upto: u64,
        /// Acked checkpoints.
        acked: Vec<(u64, T)>,
    },
    /// End the session with this reason (the backup broke the protocol).
    EndSession(EndReason),
    /// The session is over and the guest runs on unprotected: release all
    /// held output and stop holding.
    Unprotected(EndReason),
    /// Another node runs the guest: stop this one's guest at once and never
    /// release the output it holds.
    Fence(EndReason),
    /// Ask the witness to make this node the VM's owner if its token is
    /// still `expected` (compare-and-swap); answer with
    /// [`PrimaryInput::Claimed`]. `retry`: the last attempt did not reach
    /// the witness; wait a little first.
    Claim {
        /// The token this node holds.
        expected: u64,
        /// A retry after an unreachable witness.
        retry: bool,
    },
}

#[derive(Debug)]
struct Session<T> {
    in_flight: VecDeque<(u64, u64, T)>,
    last_acked: u64,
    last_sent: u64,
    /// Output is held from this checkpoint's pause on: it and every later
    /// one may be resumed from. `None`: output is released at once.
    held_from: Option<u64>,
}

/// A session ended and the witness has not answered yet.
#[derive(Debug)]
struct Claiming {
    /// Why the session ended.
    reason: EndReason,
    /// A backup connected meanwhile: start its session once the claim is won.
    connected: bool,
    /// The session held output (a checkpoint that may be resumed from went
    /// out): what is held stays held until the witness answers.
    held: bool,
}

/// The primary role's state machine.
#[derive(Debug)]
pub struct PrimaryCore<T> {
    max_in_flight: usize,
    witness: bool,
    token: u64,
    session: Option<Session<T>>,
    claiming: Option<Claiming>,
    protected: bool,
    fenced: bool,
}

impl<T> PrimaryCore<T> {
    /// A primary without a backup yet; at most `max_in_flight` checkpoints
    /// unacknowledged. `witness`: role changes need the witness, and this
    /// node holds the VM's fencing token `token` (it won it at start or at
    /// its takeover); without one, `token` is 0.
    pub fn new(max_in_flight: usize, witness: bool, token: u64) -> Self {
        PrimaryCore {
            max_in_flight: max_in_flight.max(1),
            witness,
            token,
            session: None,
            claiming: None,
            protected: false,
            fenced: false,
        }
    }

    /// The fencing token this node holds (sent in its hello).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The VM's ownership came back to this node with `token`: a
    /// migration's handover taken back before its `Go` (the witness had
    /// named the destination with the token before it).
    pub fn took_back(&mut self, token: u64) {
        self.token = token;
    }

    /// Output must stay held: the session holds it (from a checkpoint that
    /// may be resumed from), or a claim after such a session is pending.
    pub fn holding(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.held_from.is_some())
            || self.claiming.as_ref().is_some_and(|c| c.held)
    }

    /// At checkpoint `epoch`'s pause, before the guest resumes: whether
    /// output is held from this pause on, so that the checkpoint may be
    /// resumed from (the shell then holds output before resuming, and says
    /// so in the checkpoint). `releases_during_resync`: the session's
    /// checkpoints say whether they may be resumed from (protocol 7 on):
    /// output is held only from the first pause after the full resync's
    /// ack. Otherwise it is held from the resync's pause. Once held, held
    /// to the session's end.
    pub fn hold_from_pause(&mut self, epoch: u64, releases_during_resync: bool) -> bool {
        let Some(s) = self.session.as_mut() else {
            return false;
        };
        if s.held_from.is_none() && (!releases_during_resync || s.last_acked >= 1) {
            s.held_from = Some(epoch);
        }
        s.held_from.is_some()
    }

    /// A claim is pending at the witness.
    pub fn claiming(&self) -> bool {
        self.claiming.is_some()
    }

    /// A session is open (checkpoints are to be taken and sent).
    pub fn in_session(&self) -> bool {
        self.session.is_some()
    }

    /// The backup holds a committed checkpoint of the current session that
    /// it may resume from.
    pub fn protected(&self) -> bool {
        self.protected
    }

    /// This node was fenced: its guest must not run.
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Checkpoints sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.in_flight.len())
    }

    /// Another checkpoint may go out now (bounded in-flight).
    pub fn may_send(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.in_flight.len() < self.max_in_flight)
    }

    /// Takes one input; returns the actions, in order.
    pub fn on(&mut self, input: PrimaryInput<T>) -> Vec<PrimaryAction<T>> {
        if self.fenced {
            return Vec::new();
        }
        match input {
            PrimaryInput::Connected => {
                if let Some(c) = self.claiming.as_mut() {
                    // Not before the witness confirms this node still owns the VM.
                    c.connected = true;
                    return Vec::new();
                }
                self.start()
            }
            PrimaryInput::Sent {
                epoch,
                release_to,
                meta,
            } => {
                if let Some(s) = self.session.as_mut() {
                    debug_assert!(epoch > s.last_sent, "epochs increase");
                    s.last_sent = epoch;
                    s.in_flight.push_back((epoch, release_to, meta));
                }
                Vec::new()
            }
            PrimaryInput::Ack { epoch } => self.ack(epoch),
            PrimaryInput::Ended(reason) => self.ended(reason),
            PrimaryInput::Claimed(claim) => self.claimed(claim),
        }
    }

    fn start(&mut self) -> Vec<PrimaryAction<T>> {
        // A new session replaces any earlier one: what that one held was
        // released, or is sent again in this one's resync.
        self.session = Some(Session {
            in_flight: VecDeque::new(),
            last_acked: 0,
            last_sent: 0,
            held_from: None,
        });
        self.protected = false;
        vec![PrimaryAction::StartSession]
    }

    fn claimed(&mut self, claim: Claim) -> Vec<PrimaryAction<T>> {
        let Some(c) = self.claiming.take() else {
            return Vec::new();
        };
        match claim {
            Claim::Won { token } => {
                self.token = token;
                let mut out = vec![PrimaryAction::Unprotected(c.reason)];
                if c.connected {
                    out.extend(self.start());
                }
                out
            }
            Claim::Lost { owner, token } => {
                self.fenced = true;
                vec![PrimaryAction::Fence(EndReason::Refused(format!(
                    "the witness gives the VM to {owner} (token {token})"
                )))]
            }
            Claim::Unreachable => {
                let expected = self.token;
                self.claiming = Some(c);
                vec![PrimaryAction::Claim {
                    expected,
                    retry: true,
                }]
            }
        }
    }

    fn ack(&mut self, epoch: u64) -> Vec<PrimaryAction<T>> {
        let Some(s) = self.session.as_mut() else {
            // An ack from a session that already ended: nothing to release.
            return Vec::new();
        };
        if epoch <= s.last_acked || epoch > s.last_sent {
            let why = format!(
                "ack for epoch {epoch}, but acked up to {} and sent up to {}",
                s.last_acked, s.last_sent
            );
            return vec![PrimaryAction::EndSession(EndReason::Refused(why))];
        }
        s.last_acked = epoch;
        let mut acked = Vec::new();
        let mut upto = None;
        while s.in_flight.front().is_some_and(|f| f.0 <= epoch) {
            let (e, release_to, meta) = s.in_flight.pop_front().expect("front");
            upto = Some(release_to);
            acked.push((e, meta));
        }
        let mut out = Vec::new();
        if !self.protected && s.held_from.is_some_and(|h| epoch >= h) {
            self.protected = true;
            out.push(PrimaryAction::Protected);
        }
        if let Some(upto) = upto {
            out.push(PrimaryAction::Release { upto, acked });
        }
        out
    }

    fn ended(&mut self, reason: EndReason) -> Vec<PrimaryAction<T>> {
        if reason.fences() {
            self.fenced = true;
            self.session = None;
            self.protected = false;
            return vec![PrimaryAction::Fence(reason)];
        }
        self.protected = false;
        let Some(s) = self.session.take() else {
            return Vec::new();
        };
        if !self.witness {
            return vec![PrimaryAction::Unprotected(reason)];
        }
        self.claiming = Some(Claiming {
            reason,
            connected: false,
            held: s.held_from.is_some(),
        });
        vec![PrimaryAction::Claim {
            expected: self.token,
            retry: false,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrimaryAction as A;
    use PrimaryInput as I;

    /// Checkpoint `epoch` goes out in a session below protocol 7 (output
    /// held from the resync's pause on).
    fn sent(core: &mut PrimaryCore<u64>, epoch: u64, release_to: u64) {
        assert!(core.hold_from_pause(epoch, false));
        sent_held(core, epoch, release_to);
    }

    fn sent_held(core: &mut PrimaryCore<u64>, epoch: u64, release_to: u64) {
        assert!(core.may_send());
        assert!(core
            .on(I::Sent {
                epoch,
                release_to,
                meta: epoch * 10
            })
            .is_empty());
    }

    #[test]
    fn output_is_released_only_on_the_ack_of_its_epoch() {
        let mut p = PrimaryCore::new(4, false, 0);
        assert!(!p.in_session() && !p.may_send());
        assert_eq!(p.on(I::Connected), vec![A::StartSession]);
        sent(&mut p, 1, 100);
        sent(&mut p, 2, 150);
        sent(&mut p, 3, 180);
        assert_eq!(p.in_flight(), 3);
        assert_eq!(
            p.on(I::Ack { epoch: 1 }),
            vec![
                A::Protected,
                A::Release {
                    upto: 100,
                    acked: vec![(1, 10)]
                }
            ]
        );
        assert!(p.protected());
        // An ack covers every epoch up to it.
        assert_eq!(
            p.on(I::Ack { epoch: 3 }),
            vec![A::Release {
                upto: 180,
                acked: vec![(2, 20), (3, 30)]
            }]
        );
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn in_flight_is_bounded() {
        let mut p = PrimaryCore::new(2, false, 0);
        p.on(I::Connected);
        sent(&mut p, 1, 1);
        sent(&mut p, 2, 2);
        assert!(!p.may_send());
        p.on(I::Ack { epoch: 1 });
        assert!(p.may_send());
    }

    #[test]
    fn an_ack_for_an_unknown_epoch_ends_the_session_and_releases_nothing() {
        for bad in [0, 1, 5] {
            let mut p = PrimaryCore::new(4, false, 0);
            p.on(I::Connected);
            sent(&mut p, 1, 10);
            sent(&mut p, 2, 20);
            p.on(I::Ack { epoch: 1 });
            let a = p.on(I::Ack { epoch: bad });
            assert!(
                matches!(&a[..], [A::EndSession(EndReason::Refused(why))] if why.contains(&format!("epoch {bad}"))),
                "{bad}: {a:?}"
            );
        }
        // An ack before anything was sent.
        let mut p: PrimaryCore<u64> = PrimaryCore::new(4, false, 0);
        p.on(I::Connected);
        assert!(matches!(&p.on(I::Ack { epoch: 1 })[..], [A::EndSession(_)]));
        // An ack with no session at all is ignored.
        let mut p: PrimaryCore<u64> = PrimaryCore::new(4, false, 0);
        assert!(p.on(I::Ack { epoch: 1 }).is_empty());
    }

    #[test]
    fn a_fencing_end_stops_the_guest_and_holds_output_for_ever() {
        for reason in [EndReason::TakenOver, EndReason::AlreadyTakenOver] {
            let mut p = PrimaryCore::new(4, false, 0);
            p.on(I::Connected);
            sent(&mut p, 1, 10);
            sent(&mut p, 2, 20);
            assert_eq!(p.on(I::Ended(reason.clone())), vec![A::Fence(reason)]);
            assert!(p.fenced() && !p.in_session() && !p.protected());
            // Nothing after a fence releases anything or starts a session.
            assert!(p.on(I::Ack { epoch: 2 }).is_empty());
            assert!(p.on(I::Connected).is_empty());
            assert!(p.on(I::Ended(EndReason::Broken("x".into()))).is_empty());
        }
    }

    #[test]
    fn any_other_end_leaves_the_guest_running_unprotected() {
        for reason in [
            EndReason::Goodbye("stopping".into()),
            EndReason::Refused("bad epoch".into()),
            EndReason::Silent(std::time::Duration::from_secs(1)),
            EndReason::Broken("reset".into()),
            EndReason::Local("the epoch loop ended".into()),
        ] {
            let mut p = PrimaryCore::new(4, false, 0);
            p.on(I::Connected);
            sent(&mut p, 1, 10);
            p.on(I::Ack { epoch: 1 });
            sent(&mut p, 2, 20);
            assert_eq!(p.on(I::Ended(reason.clone())), vec![A::Unprotected(reason)]);
            assert!(!p.in_session() && !p.protected() && !p.fenced());
            // A late ack of the old session releases nothing.
            assert!(p.on(I::Ack { epoch: 2 }).is_empty());
            // A second end without a session says nothing.
            assert!(p.on(I::Ended(EndReason::Broken("again".into()))).is_empty());
            // A backup returns: a new session, protected again after its resync.
            assert_eq!(p.on(I::Connected), vec![A::StartSession]);
            sent(&mut p, 1, 30);
            assert_eq!(
                p.on(I::Ack { epoch: 1 }),
                vec![
                    A::Protected,
                    A::Release {
                        upto: 30,
                        acked: vec![(1, 10)]
                    }
                ]
            );
        }
    }

    /// A witnessed primary with token 5 whose session (epochs 1, 2 sent,
    /// 1 acked) just ended for `reason`.
    fn lost_session(reason: EndReason) -> (PrimaryCore<u64>, Vec<PrimaryAction<u64>>) {
        let mut p = PrimaryCore::new(4, true, 5);
        p.on(I::Connected);
        sent(&mut p, 1, 10);
        p.on(I::Ack { epoch: 1 });
        sent(&mut p, 2, 20);
        let a = p.on(I::Ended(reason));
        (p, a)
    }

    #[test]
    fn with_a_witness_output_stays_held_until_the_claim_is_won() {
        let reason = EndReason::Broken("reset".into());
        let (mut p, a) = lost_session(reason.clone());
        assert_eq!(
            a,
            vec![A::Claim {
                expected: 5,
                retry: false
            }]
        );
        assert!(p.holding() && p.claiming() && !p.in_session());
        // A late ack releases nothing.
        assert!(p.on(I::Ack { epoch: 2 }).is_empty());
        // A backup that connects meanwhile waits for the claim.
        assert!(p.on(I::Connected).is_empty());
        assert_eq!(
            p.on(I::Claimed(Claim::Won { token: 6 })),
            vec![A::Unprotected(reason), A::StartSession]
        );
        assert_eq!(p.token(), 6);
        assert!(p.in_session() && !p.claiming());
    }

    #[test]
    fn a_handover_taken_back_is_the_token_the_next_claim_expects() {
        // Stood down (token 6), handed to the destination (7), taken back
        // before Go (8): the next lost backup is claimed from 8.
        let (mut p, _) = lost_session(EndReason::Goodbye("migration".into()));
        p.on(I::Claimed(Claim::Won { token: 6 }));
        p.took_back(8);
        assert_eq!(p.token(), 8);
        p.on(I::Connected);
        sent(&mut p, 1, 10);
        assert_eq!(
            p.on(I::Ended(EndReason::Broken("reset".into()))),
            vec![A::Claim {
                expected: 8,
                retry: false
            }]
        );
    }

    #[test]
    fn a_lost_claim_fences() {
        let (mut p, _) = lost_session(EndReason::Silent(std::time::Duration::from_secs(1)));
        let a = p.on(I::Claimed(Claim::Lost {
            owner: "node-b".into(),
            token: 6,
        }));
        assert!(
            matches!(&a[..], [A::Fence(r)] if r.to_string().contains("node-b")),
            "{a:?}"
        );
        assert!(p.fenced() && !p.holding());
        assert!(p.on(I::Connected).is_empty());
    }

    #[test]
    fn an_unreachable_witness_changes_nothing_and_is_asked_again() {
        let (mut p, _) = lost_session(EndReason::Refused("bad epoch".into()));
        for _ in 0..3 {
            assert_eq!(
                p.on(I::Claimed(Claim::Unreachable)),
                vec![A::Claim {
                    expected: 5,
                    retry: true
                }]
            );
            assert!(p.holding() && !p.fenced());
        }
        assert_eq!(p.on(I::Claimed(Claim::Won { token: 6 })).len(), 1);
        assert!(!p.holding());
        // An answer nobody asked for is ignored.
        assert!(p.on(I::Claimed(Claim::Won { token: 9 })).is_empty());
        assert_eq!(p.token(), 6);
    }

    #[test]
    fn with_a_witness_a_fencing_end_still_fences_at_once() {
        let (p, a) = lost_session(EndReason::TakenOver);
        assert_eq!(a, vec![A::Fence(EndReason::TakenOver)]);
        assert!(p.fenced());
    }

    #[test]
    fn a_new_connection_during_a_session_restarts_it_unprotected() {
        let mut p = PrimaryCore::new(4, false, 0);
        p.on(I::Connected);
        sent(&mut p, 1, 10);
        p.on(I::Ack { epoch: 1 });
        assert!(p.protected());
        assert_eq!(p.on(I::Connected), vec![A::StartSession]);
        assert!(!p.protected() && p.in_flight() == 0);
    }

    #[test]
    fn from_protocol_7_output_is_released_during_the_resync_and_held_from_the_next_pause() {
        let mut p = PrimaryCore::new(4, true, 5);
        assert_eq!(p.on(I::Connected), vec![A::StartSession]);
        assert!(
            !p.holding(),
            "nothing is held until a checkpoint may be resumed from"
        );
        // The resync's pause: output keeps flowing while the image crosses.
        assert!(!p.hold_from_pause(1, true));
        sent_held(&mut p, 1, 100);
        assert!(!p.holding());
        // A pause before the resync's ack: still not held.
        assert!(!p.hold_from_pause(2, true));
        sent_held(&mut p, 2, 120);
        // Its ack: not protected yet (the backup may not resume from it).
        assert_eq!(
            p.on(I::Ack { epoch: 1 }),
            vec![A::Release {
                upto: 100,
                acked: vec![(1, 10)]
            }]
        );
        assert!(!p.protected());
        // The next pause holds, for the rest of the session.
        assert!(p.hold_from_pause(3, true));
        assert!(p.holding());
        sent_held(&mut p, 3, 150);
        assert!(p.hold_from_pause(4, true));
        sent_held(&mut p, 4, 170);
        assert!(!p.on(I::Ack { epoch: 2 }).contains(&A::Protected));
        assert_eq!(
            p.on(I::Ack { epoch: 3 }),
            vec![
                A::Protected,
                A::Release {
                    upto: 150,
                    acked: vec![(3, 30)]
                }
            ]
        );
        assert!(p.protected());
        // Its loss: the claim keeps what is held held.
        let reason = EndReason::Silent(std::time::Duration::from_millis(200));
        assert_eq!(
            p.on(I::Ended(reason)),
            vec![A::Claim {
                expected: 5,
                retry: false
            }]
        );
        assert!(p.holding() && p.claiming());
    }

    #[test]
    fn a_session_lost_before_it_held_output_claims_without_holding() {
        let mut p = PrimaryCore::new(4, true, 5);
        p.on(I::Connected);
        assert!(!p.hold_from_pause(1, true));
        sent_held(&mut p, 1, 100);
        let reason = EndReason::Silent(std::time::Duration::from_millis(200));
        assert_eq!(p.on(I::Ended(reason)).len(), 1);
        // The backup has nothing it may resume from: what the guest prints
        // meanwhile need not wait for the witness.
        assert!(p.claiming() && !p.holding());
        // Below protocol 7 the resync's pause already holds.
        let mut old = PrimaryCore::new(4, true, 5);
        old.on(I::Connected);
        assert!(old.hold_from_pause(1, false));
        sent_held(&mut old, 1, 100);
        old.on(I::Ended(EndReason::Silent(
            std::time::Duration::from_millis(200),
        )));
        assert!(old.claiming() && old.holding());
    }
}
