//! The backup role's decisions: when the primary counts as lost, and the
//! takeover.
//!
//! The backup takes over only from a committed checkpoint that it may
//! resume from (one whose output the primary held from its pause on: from
//! protocol 7, not a session's full resync, during which the primary
//! releases output), and only when
//! the primary has been silent for the timeout (longer for a moment after a
//! full resync, while the primary catches up). It never takes over from a
//! primary that said goodbye, nor after ending a session itself (it refused
//! an epoch or found its replica differs): that primary is alive, has
//! released its held output and will resync. A primary's goodbye stands the
//! backup down as soon as it arrives ([`BackupInput::Leaving`]), although the
//! shell keeps committing the epochs the goodbye names. A replica found to
//! differ from the primary (`--verify`) is taken over by no one, not even an
//! operator, until a new session's full resync commits. An operator may ask
//! for a takeover, which skips the wait. A node that has taken over refuses
//! every later session, so a stale primary that reconnects is fenced.
//!
//! With a witness, a takeover happens only after winning the witness's
//! compare-and-swap from the token of the primary it follows
//! ([`BackupAction::Claim`]). While the claim is pending the replica is
//! frozen ([`BackupCore::frozen`]: nothing more is committed or acked, so
//! the primary releases nothing the takeover would not continue from). A
//! lost claim means the primary carries on: the backup waits for its next
//! session. An unreachable witness changes nothing: the claim is retried.
//! A session whose token is older than one already seen is refused
//! ([`EndReason::Superseded`]).

use std::time::Duration;

use protocol::EndReason;

use super::Claim;

/// The failure detector's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Silence after which the primary is lost.
    pub silence: Duration,
    /// The silence allowed right after a full resync was committed.
    pub after_resync: Duration,
    /// How long after a full resync `after_resync` applies.
    pub resync_grace: Duration,
}

/// What happened, as the backup role sees it. `now` is the shell's clock.
#[derive(Debug, Clone, PartialEq)]
pub enum BackupInput {
    /// A primary opened a session (its hello was accepted): the replica is
    /// replaced and nothing is committed until its full resync.
    SessionStarted {
        /// The session id.
        session: u64,
        /// The primary's fencing token (its hello's).
        token: u64,
        /// Now.
        now: Duration,
    },
    /// Something arrived from the primary (any packet proves it alive).
    Heard {
        /// Now.
        now: Duration,
    },
    /// Checkpoint `epoch` of the current session is committed on the replica.
    Committed {
        /// The epoch (1: the full resync).
        epoch: u64,
        /// The replica may resume from it: the primary held its output from
        /// the checkpoint's pause on (`Checkpoint::resumable`). If not, the
        /// replica holds nothing to take over from until one that is.
        resumable: bool,
        /// Now.
        now: Duration,
    },
    /// The session ended, for `reason` as the backup sees it: the primary's
    /// goodbye, the backup's own refusal, a broken connection.
    SessionEnded {
        /// Why.
        reason: EndReason,
    },
    /// The replica no longer holds the committed checkpoint (checkpoint
    /// `epoch` was written but its memory digest did not match): nothing to
    /// take over from until the next session's full resync commits.
    ReplicaInvalid {
        /// The checkpoint whose digest did not match.
        epoch: u64,
    },
    /// The primary said goodbye: it stops on purpose after `last_epoch`.
    /// The backup stands down at once (no takeover on its silence), and
    /// keeps committing up to `last_epoch` before the session ends.
    Leaving {
        /// The last epoch the primary sent.
        last_epoch: u64,
    },
    /// An operator asked for a takeover.
    TakeoverAsked,
    /// The witness answered a [`BackupAction::Claim`].
    Claimed(Claim),
    /// The clock. `stalled`: how much later than due the shell's own timer
    /// fired (zero when on time). The backup was paused or starved itself
    /// for that long and the primary's packets may be waiting unread: that
    /// time does not count as the primary's silence.
    Tick {
        /// Now.
        now: Duration,
        /// How late the tick came.
        stalled: Duration,
    },
}

/// What the backup role must do.
#[derive(Debug, Clone, PartialEq)]
pub enum BackupAction {
    /// Take over: end the session with [`EndReason::TakenOver`] (a live
    /// primary learns it is fenced), restore the committed checkpoint and
    /// run the guest.
    TakeOver {
        /// The committed epoch the guest resumes from.
        epoch: u64,
        /// Its session.
        session: u64,
        /// How long the primary had been silent.
        silent: Duration,
        /// An operator asked.
        asked: bool,
        /// The fencing token this node now holds (0 without a witness).
        token: u64,
    },
    /// Refuse a session (this node has taken over, or the primary's token
    /// is stale).
    Refuse(EndReason),
    /// Ask the witness to make this node the VM's owner if the token is
    /// still `expected` (the followed primary's); answer with
    /// [`BackupInput::Claimed`]. `retry`: the last attempt did not reach the
    /// witness; wait a little first. The replica stays frozen meanwhile.
    Claim {
        /// The followed primary's token.
        expected: u64,
        /// A retry after an unreachable witness.
        retry: bool,
    },
}

/// An answer to an operator's takeover request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverAnswer {
    /// It will happen at the next tick.
    Accepted,
    /// This node has already taken over.
    AlreadyTakenOver,
    /// No checkpoint is committed that may be resumed from: nothing to
    /// take over from.
    NothingCommitted,
    /// The replica differs from the primary (a `--verify` mismatch at
    /// this checkpoint): it is unusable until a new session's full resync
    /// commits.
    ReplicaInvalid {
        /// The checkpoint whose memory digest did not match.
        epoch: u64,
    },
}

impl std::fmt::Display for TakeoverAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeoverAnswer::Accepted => {
                f.write_str("ok: taking over from the last committed checkpoint")
            }
            TakeoverAnswer::AlreadyTakenOver => f.write_str("error: this node has already taken over"),
            TakeoverAnswer::NothingCommitted => {
                f.write_str("error: nothing committed yet that the guest may resume from (the first checkpoint after the full resync); nothing to take over")
            }
            TakeoverAnswer::ReplicaInvalid { epoch } => write!(
                f,
                "error: the replica differs from the primary since checkpoint {epoch} (verify mismatch); \
                 no takeover until a new session's full resync commits"
            ),
        }
    }
}

/// The backup role's state machine.
#[derive(Debug)]
pub struct BackupCore {
    timeouts: Timeouts,
    witness: bool,
    /// The newest token seen in a hello.
    token: u64,
    /// A claim is pending: (silence when decided, asked).
    claiming: Option<(Duration, bool)>,
    session: u64,
    committed: Option<u64>,
    /// The replica failed verification at this checkpoint; until a new
    /// session, nothing is committed or taken over.
    invalid: Option<u64>,
    last_heard: Duration,
    resync_at: Option<Duration>,
    /// The primary is alive and stopped the session on purpose (goodbye),
    /// or the backup ended it itself: no takeover until a new session.
    no_takeover: bool,
    asked: bool,
    taken_over: bool,
}

impl BackupCore {
    /// A backup with nothing committed; `witness`: a takeover needs the
    /// witness.
    pub fn new(timeouts: Timeouts, witness: bool) -> Self {
        BackupCore {
            timeouts,
            witness,
            token: 0,
            claiming: None,
            session: 0,
            committed: None,
            invalid: None,
            last_heard: Duration::ZERO,
            resync_at: None,
            no_takeover: false,
            asked: false,
            taken_over: false,
        }
    }

    /// The committed epoch, if any.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// This node has taken over.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// The newest fencing token it has seen (its primary's, or its own
    /// after a takeover).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// It would take over from its replica if the primary went silent now.
    pub fn can_take_over(&self) -> bool {
        self.committed.is_some() && self.invalid.is_none() && !self.no_takeover && !self.taken_over
    }

    /// The checkpoint at which the replica failed verification, if it did
    /// in the current session (no takeover until the next full resync).
    pub fn replica_invalid(&self) -> Option<u64> {
        self.invalid
    }

    /// Nothing may be committed or acked: a takeover was decided or is
    /// being claimed.
    pub fn frozen(&self) -> bool {
        self.taken_over || self.claiming.is_some()
    }

    /// An operator's takeover request: answers at once, acts at the next tick.
    pub fn ask_takeover(&mut self) -> TakeoverAnswer {
        if self.taken_over {
            TakeoverAnswer::AlreadyTakenOver
        } else if let Some(epoch) = self.invalid {
            TakeoverAnswer::ReplicaInvalid { epoch }
        } else if self.committed.is_none() {
            TakeoverAnswer::NothingCommitted
        } else {
            self.asked = true;
            TakeoverAnswer::Accepted
        }
    }

    /// The silence allowed at `now`.
    pub fn limit(&self, now: Duration) -> Duration {
        match self.resync_at {
            Some(at) if now.saturating_sub(at) < self.timeouts.resync_grace => {
                self.timeouts.silence.max(self.timeouts.after_resync)
            }
            _ => self.timeouts.silence,
        }
    }

    /// Takes one input; returns the actions.
    pub fn on(&mut self, input: BackupInput) -> Vec<BackupAction> {
        if self.taken_over {
            return match input {
                // A primary older than this node's takeover is stale and
                // must stop; a newer one (this node's own new backup that
                // took over from it meanwhile) must not be fenced by this
                // node's leftover listener.
                BackupInput::SessionStarted { token, .. } if token > self.token => {
                    vec![BackupAction::Refuse(EndReason::Refused(format!(
                        "this node runs the guest itself (token {}) and is not a backup",
                        self.token
                    )))]
                }
                BackupInput::SessionStarted { .. } => {
                    vec![BackupAction::Refuse(EndReason::AlreadyTakenOver)]
                }
                _ => Vec::new(),
            };
        }
        match input {
            BackupInput::SessionStarted { token, .. } if token < self.token => {
                vec![BackupAction::Refuse(EndReason::Superseded)]
            }
            BackupInput::SessionStarted { .. } if self.claiming.is_some() => {
                // Not while the witness decides who owns the VM.
                vec![BackupAction::Refuse(EndReason::Refused(
                    "the backup is claiming the VM at the witness".into(),
                ))]
            }
            BackupInput::SessionStarted {
                session,
                token,
                now,
            } => {
                self.token = token;
                self.session = session;
                self.committed = None;
                self.invalid = None;
                self.resync_at = None;
                self.no_takeover = false;
                self.last_heard = now;
                Vec::new()
            }
            BackupInput::Heard { now } => {
                self.last_heard = self.last_heard.max(now);
                Vec::new()
            }
            BackupInput::Committed { .. } if self.claiming.is_some() => {
                debug_assert!(false, "the shell commits nothing while frozen");
                Vec::new()
            }
            BackupInput::Committed { .. } if self.invalid.is_some() => {
                debug_assert!(false, "the shell commits nothing to an invalid replica");
                Vec::new()
            }
            BackupInput::Committed {
                epoch,
                resumable,
                now,
            } => {
                // The primary was alive when it sent this.
                self.last_heard = self.last_heard.max(now);
                if epoch == 1 {
                    self.resync_at = Some(now);
                }
                // The replica is at this checkpoint now, whichever it is: if
                // it may not be resumed from, there is nothing to take over
                // from (the earlier ones are overwritten).
                self.committed = resumable.then_some(epoch);
                Vec::new()
            }
            BackupInput::SessionEnded { reason } => {
                // A goodbye or the backup's own refusal: the primary lives
                // on. A broken or silent session: it may be dead, and the
                // silence decides.
                if reason.peer_alive() {
                    self.no_takeover = true;
                }
                Vec::new()
            }
            BackupInput::ReplicaInvalid { epoch } => {
                self.committed = None;
                self.invalid = Some(epoch);
                self.asked = false;
                Vec::new()
            }
            BackupInput::Leaving { .. } => {
                // Stand down now: the primary stops on purpose and releases
                // nothing more; its goodbye must not turn into a takeover
                // while the last checkpoints drain (or if the connection
                // breaks before they do).
                self.no_takeover = true;
                Vec::new()
            }
            BackupInput::TakeoverAsked => {
                self.ask_takeover();
                Vec::new()
            }
            BackupInput::Claimed(claim) => self.claimed(claim),
            BackupInput::Tick { now, stalled } => self.tick(now, stalled),
        }
    }

    fn claimed(&mut self, claim: Claim) -> Vec<BackupAction> {
        let Some((silent, asked)) = self.claiming else {
            return Vec::new();
        };
        match claim {
            Claim::Won { token } => {
                self.claiming = None;
                self.token = token;
                self.take_over(silent, asked)
            }
            Claim::Lost { token, .. } => {
                // The primary (or another node) owns the VM: it carries on
                // alone, releasing output this replica does not hold, so the
                // replica can never be taken over again — not even when an
                // operator asks later, from the winner's token (found by
                // the simulator: that switchover resumed behind what the
                // world saw). This backup waits for its next session.
                self.claiming = None;
                self.asked = false;
                self.no_takeover = true;
                self.committed = None;
                self.token = self.token.max(token);
                Vec::new()
            }
            Claim::Unreachable => vec![BackupAction::Claim {
                expected: self.token,
                retry: true,
            }],
        }
    }

    fn take_over(&mut self, silent: Duration, asked: bool) -> Vec<BackupAction> {
        let Some(epoch) = self.committed.filter(|_| self.invalid.is_none()) else {
            return Vec::new();
        };
        self.taken_over = true;
        vec![BackupAction::TakeOver {
            epoch,
            session: self.session,
            silent,
            asked,
            token: self.token,
        }]
    }

    fn tick(&mut self, now: Duration, stalled: Duration) -> Vec<BackupAction> {
        // The backup's own stall is not the primary's silence.
        self.last_heard = (self.last_heard + stalled).min(now);
        if self.committed.is_none() || self.invalid.is_some() || self.claiming.is_some() {
            return Vec::new();
        }
        if !self.asked && (!stalled.is_zero() || self.no_takeover) {
            return Vec::new();
        }
        let silent = now.saturating_sub(self.last_heard);
        let limit = if self.asked {
            Duration::ZERO
        } else {
            self.limit(now)
        };
        if silent < limit {
            return Vec::new();
        }
        if self.witness {
            self.claiming = Some((silent, self.asked));
            return vec![BackupAction::Claim {
                expected: self.token,
                retry: false,
            }];
        }
        self.take_over(silent, self.asked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackupAction as A;
    use BackupInput as I;

    const T: Timeouts = Timeouts {
        silence: Duration::from_millis(30),
        after_resync: Duration::from_millis(500),
        resync_grace: Duration::from_secs(2),
    };

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn tick(b: &mut BackupCore, at: u64) -> Vec<BackupAction> {
        b.on(I::Tick {
            now: ms(at),
            stalled: Duration::ZERO,
        })
    }

    /// A backup with session 7 committed up to epoch 3, the resync at 0 ms,
    /// last heard at `heard` ms.
    fn following(heard: u64) -> BackupCore {
        let mut b = BackupCore::new(T, false);
        b.on(I::SessionStarted {
            session: 7,
            token: 0,
            now: ms(0),
        });
        b.on(I::Committed {
            resumable: true,
            epoch: 1,
            now: ms(0),
        });
        b.on(I::Committed {
            resumable: true,
            epoch: 2,
            now: ms(heard),
        });
        b.on(I::Committed {
            resumable: true,
            epoch: 3,
            now: ms(heard),
        });
        b
    }

    #[test]
    fn takes_over_from_the_last_committed_checkpoint_after_the_timeout() {
        let mut b = following(3000);
        assert!(tick(&mut b, 3029).is_empty());
        assert_eq!(
            tick(&mut b, 3030),
            vec![A::TakeOver {
                epoch: 3,
                session: 7,
                silent: ms(30),
                asked: false,
                token: 0
            }]
        );
        assert!(b.taken_over());
        // Once.
        assert!(tick(&mut b, 4000).is_empty());
    }

    #[test]
    fn any_packet_postpones_the_takeover() {
        let mut b = following(3000);
        b.on(I::Heard { now: ms(3020) });
        assert!(tick(&mut b, 3040).is_empty());
        // Liveness never goes back in time (a late-delivered event).
        b.on(I::Heard { now: ms(3001) });
        assert!(tick(&mut b, 3049).is_empty());
        assert_eq!(tick(&mut b, 3050).len(), 1);
    }

    #[test]
    fn nothing_committed_means_no_takeover() {
        let mut b = BackupCore::new(T, false);
        assert!(tick(&mut b, 10_000).is_empty());
        b.on(I::SessionStarted {
            session: 1,
            token: 0,
            now: ms(0),
        });
        // Silence during the full resync: nothing to take over from.
        assert!(tick(&mut b, 10_000).is_empty());
        assert_eq!(b.ask_takeover(), TakeoverAnswer::NothingCommitted);
        assert!(tick(&mut b, 20_000).is_empty());
    }

    #[test]
    fn right_after_a_resync_the_longer_timeout_applies() {
        let mut b = following(0);
        assert_eq!(b.limit(ms(100)), ms(500));
        assert!(tick(&mut b, 499).is_empty());
        assert_eq!(tick(&mut b, 500).len(), 1);
        let mut b = following(2100);
        assert_eq!(b.limit(ms(2100)), ms(30));
        assert_eq!(tick(&mut b, 2130).len(), 1);
    }

    #[test]
    fn the_backups_own_stall_is_not_the_primarys_silence() {
        // Heard at 3000; the backup itself stopped from 3010 to 5010.
        let mut b = following(3000);
        assert!(b
            .on(I::Tick {
                now: ms(5010),
                stalled: ms(2000)
            })
            .is_empty());
        // 10 ms before and 19 after its stall: 29 ms of silence, not 2 s.
        assert!(tick(&mut b, 5029).is_empty());
        assert_eq!(tick(&mut b, 5030).len(), 1);
    }

    #[test]
    fn a_late_tick_decides_nothing_but_real_silence_still_counts() {
        // Heard at 3000; silent 40 ms, of which the backup itself stalled 10.
        let mut b = following(3000);
        assert!(b
            .on(I::Tick {
                now: ms(3040),
                stalled: ms(10)
            })
            .is_empty());
        assert_eq!(tick(&mut b, 3041).len(), 1);
    }

    #[test]
    fn a_session_ended_by_each_reason() {
        // The primary said goodbye, or the backup refused what it sent: the
        // primary is alive, no takeover however long the silence.
        for reason in [
            EndReason::Goodbye("stop".into()),
            EndReason::Refused("bad epoch".into()),
        ] {
            let mut b = following(3000);
            b.on(I::SessionEnded {
                reason: reason.clone(),
            });
            assert!(tick(&mut b, 60_000).is_empty(), "{reason:?}");
            // ...unless an operator asks.
            assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
            assert_eq!(tick(&mut b, 60_001).len(), 1);
        }
        // A broken or silent session: the primary may be dead; the silence decides.
        for reason in [
            EndReason::Broken("reset".into()),
            EndReason::Silent(ms(30)),
            EndReason::Local("stopping".into()),
        ] {
            let mut b = following(3000);
            b.on(I::SessionEnded {
                reason: reason.clone(),
            });
            assert!(tick(&mut b, 3010).is_empty(), "{reason:?}");
            assert_eq!(tick(&mut b, 3030).len(), 1, "{reason:?}");
        }
    }

    #[test]
    fn a_new_session_replaces_the_replica_and_clears_the_goodbye() {
        let mut b = following(3000);
        b.on(I::SessionEnded {
            reason: EndReason::Goodbye("restart".into()),
        });
        b.on(I::SessionStarted {
            session: 8,
            token: 0,
            now: ms(4000),
        });
        assert_eq!(b.committed(), None);
        assert!(tick(&mut b, 9000).is_empty());
        b.on(I::Committed {
            resumable: true,
            epoch: 1,
            now: ms(9000),
        });
        assert_eq!(
            tick(&mut b, 9500),
            vec![A::TakeOver {
                epoch: 1,
                session: 8,
                silent: ms(500),
                asked: false,
                token: 0
            }]
        );
    }

    #[test]
    fn an_invalid_replica_is_never_taken_over_until_a_resync_commits() {
        let mut b = following(3000);
        // An operator's request already accepted does not survive the mismatch.
        assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
        b.on(I::ReplicaInvalid { epoch: 4 });
        b.on(I::SessionEnded {
            reason: EndReason::Refused("replica mismatch".into()),
        });
        assert_eq!(b.committed(), None);
        assert_eq!(b.replica_invalid(), Some(4));
        assert!(!b.can_take_over());
        let answer = b.ask_takeover();
        assert_eq!(answer, TakeoverAnswer::ReplicaInvalid { epoch: 4 });
        let text = answer.to_string();
        assert!(
            text.starts_with("error:") && text.contains("checkpoint 4") && text.contains("resync"),
            "{text}"
        );
        assert!(tick(&mut b, 60_000).is_empty());
        // Silence after a broken session decides nothing either.
        b.on(I::SessionEnded {
            reason: EndReason::Broken("reset".into()),
        });
        assert!(tick(&mut b, 120_000).is_empty());
        // A new session: still nothing until its full resync commits...
        b.on(I::SessionStarted {
            session: 8,
            token: 0,
            now: ms(130_000),
        });
        assert_eq!(b.replica_invalid(), None);
        assert_eq!(b.ask_takeover(), TakeoverAnswer::NothingCommitted);
        assert!(tick(&mut b, 131_000).is_empty());
        // ...then the replica is usable again.
        b.on(I::Committed {
            resumable: true,
            epoch: 1,
            now: ms(131_000),
        });
        assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
        assert_eq!(
            tick(&mut b, 131_001),
            vec![A::TakeOver {
                epoch: 1,
                session: 8,
                silent: ms(1),
                asked: true,
                token: 0
            }]
        );
    }

    #[test]
    fn a_goodbye_stands_the_backup_down_before_the_session_ends() {
        let mut b = following(3000);
        // The goodbye arrives; the epochs it names are still draining, and
        // the primary then falls silent (or its connection breaks).
        b.on(I::Leaving { last_epoch: 5 });
        assert!(!b.can_take_over());
        b.on(I::Committed {
            resumable: true,
            epoch: 4,
            now: ms(3010),
        });
        assert!(tick(&mut b, 3100).is_empty());
        b.on(I::SessionEnded {
            reason: EndReason::Broken("reset".into()),
        });
        assert!(tick(&mut b, 60_000).is_empty());
        assert_eq!(b.committed(), Some(4));
        // An operator may still take over, from what was committed.
        assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
        assert!(matches!(
            tick(&mut b, 60_001)[..],
            [A::TakeOver { epoch: 4, .. }]
        ));
    }

    #[test]
    fn an_operator_takeover_skips_the_wait() {
        let mut b = following(3000);
        assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
        // Even on a late tick.
        assert_eq!(
            b.on(I::Tick {
                now: ms(3000),
                stalled: ms(2000)
            }),
            vec![A::TakeOver {
                epoch: 3,
                session: 7,
                silent: ms(0),
                asked: true,
                token: 0
            }]
        );
        assert_eq!(b.ask_takeover(), TakeoverAnswer::AlreadyTakenOver);
    }

    #[test]
    fn after_a_takeover_every_session_is_refused() {
        let mut b = following(3000);
        tick(&mut b, 4000);
        assert_eq!(
            b.on(I::SessionStarted {
                session: 9,
                token: 0,
                now: ms(4001)
            }),
            vec![A::Refuse(EndReason::AlreadyTakenOver)]
        );
        assert!(b
            .on(I::Committed {
                resumable: true,
                epoch: 4,
                now: ms(4002)
            })
            .is_empty());
        assert_eq!(b.committed(), Some(3));
    }

    /// A witnessed backup following session 7 of a primary with token 4,
    /// committed up to epoch 3, last heard at 3000 ms.
    fn witnessed() -> BackupCore {
        let mut b = BackupCore::new(T, true);
        b.on(I::SessionStarted {
            session: 7,
            token: 4,
            now: ms(0),
        });
        b.on(I::Committed {
            resumable: true,
            epoch: 1,
            now: ms(0),
        });
        b.on(I::Committed {
            resumable: true,
            epoch: 3,
            now: ms(3000),
        });
        b
    }

    #[test]
    fn with_a_witness_the_takeover_waits_for_the_claim_and_freezes_the_replica() {
        let mut b = witnessed();
        assert_eq!(
            tick(&mut b, 3030),
            vec![A::Claim {
                expected: 4,
                retry: false
            }]
        );
        assert!(b.frozen() && !b.taken_over());
        // Ticks decide nothing more while the witness answers.
        assert!(tick(&mut b, 4000).is_empty());
        // A session attempt meanwhile is refused without fencing.
        let r = b.on(I::SessionStarted {
            session: 8,
            token: 4,
            now: ms(4001),
        });
        assert!(matches!(&r[..], [A::Refuse(e)] if !e.fences()), "{r:?}");
        assert_eq!(
            b.on(I::Claimed(Claim::Won { token: 5 })),
            vec![A::TakeOver {
                epoch: 3,
                session: 7,
                silent: ms(30),
                asked: false,
                token: 5
            }]
        );
        assert!(b.taken_over());
    }

    #[test]
    fn a_lost_claim_means_the_primary_carries_on() {
        let mut b = witnessed();
        tick(&mut b, 3030);
        assert!(b
            .on(I::Claimed(Claim::Lost {
                owner: "a".into(),
                token: 5
            }))
            .is_empty());
        assert!(!b.frozen() && !b.taken_over());
        assert!(tick(&mut b, 60_000).is_empty());
        // The primary's next session (token 5) is followed; an older token is refused.
        assert_eq!(
            b.on(I::SessionStarted {
                session: 9,
                token: 4,
                now: ms(60_001)
            }),
            vec![A::Refuse(EndReason::Superseded)]
        );
        assert!(b
            .on(I::SessionStarted {
                session: 9,
                token: 5,
                now: ms(60_001)
            })
            .is_empty());
        b.on(I::Committed {
            resumable: true,
            epoch: 1,
            now: ms(60_002),
        });
        assert_eq!(
            tick(&mut b, 61_000),
            vec![A::Claim {
                expected: 5,
                retry: false
            }]
        );
    }

    #[test]
    fn after_a_lost_claim_not_even_an_operator_can_take_over() {
        let mut b = BackupCore::new(T, true);
        b.on(BackupInput::SessionStarted {
            session: 1,
            token: 1,
            now: ms(0),
        });
        b.on(BackupInput::Committed {
            resumable: true,
            epoch: 1,
            now: ms(0),
        });
        b.on(BackupInput::Committed {
            resumable: true,
            epoch: 2,
            now: ms(2500),
        });
        let a = b.on(BackupInput::Tick {
            now: ms(2600),
            stalled: Duration::ZERO,
        });
        assert!(
            matches!(a[..], [BackupAction::Claim { expected: 1, .. }]),
            "{a:?}"
        );
        // The primary won: it carries on alone, past epoch 2.
        let a = b.on(BackupInput::Claimed(Claim::Lost {
            owner: "a".into(),
            token: 2,
        }));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(b.ask_takeover(), TakeoverAnswer::NothingCommitted);
        for t in [2700, 5000, 20_000] {
            let a = b.on(BackupInput::Tick {
                now: ms(t),
                stalled: Duration::ZERO,
            });
            assert!(a.is_empty(), "{a:?}");
        }
        assert!(!b.can_take_over());
    }

    #[test]
    fn an_unreachable_witness_means_no_takeover_until_it_answers() {
        let mut b = witnessed();
        tick(&mut b, 3030);
        for _ in 0..3 {
            assert_eq!(
                b.on(I::Claimed(Claim::Unreachable)),
                vec![A::Claim {
                    expected: 4,
                    retry: true
                }]
            );
            assert!(b.frozen() && !b.taken_over());
        }
        assert_eq!(b.on(I::Claimed(Claim::Won { token: 5 })).len(), 1);
    }

    #[test]
    fn after_a_takeover_only_older_primaries_are_fenced() {
        let mut b = witnessed();
        tick(&mut b, 3030);
        b.on(I::Claimed(Claim::Won { token: 5 }));
        for old in [0, 4, 5] {
            assert_eq!(
                b.on(I::SessionStarted {
                    session: 9,
                    token: old,
                    now: ms(4000)
                }),
                vec![A::Refuse(EndReason::AlreadyTakenOver)],
                "{old}"
            );
        }
        let a = b.on(I::SessionStarted {
            session: 9,
            token: 6,
            now: ms(4000),
        });
        assert!(matches!(&a[..], [A::Refuse(e)] if !e.fences()), "{a:?}");
    }

    #[test]
    fn an_operator_takeover_also_needs_the_witness() {
        let mut b = witnessed();
        assert_eq!(b.ask_takeover(), TakeoverAnswer::Accepted);
        assert_eq!(
            b.on(I::Tick {
                now: ms(3001),
                stalled: ms(2000)
            }),
            vec![A::Claim {
                expected: 4,
                retry: false
            }]
        );
        assert_eq!(
            b.on(I::Claimed(Claim::Won { token: 5 })),
            vec![A::TakeOver {
                epoch: 3,
                session: 7,
                silent: ms(0),
                asked: true,
                token: 5
            }]
        );
    }

    #[test]
    fn a_checkpoint_that_may_not_be_resumed_from_leaves_nothing_to_take_over() {
        let mut b = BackupCore::new(T, false);
        b.on(I::SessionStarted {
            session: 9,
            token: 0,
            now: ms(0),
        });
        // The full resync of a v7 session: the primary released output while
        // it crossed, so the replica may not resume from it.
        b.on(I::Committed {
            epoch: 1,
            resumable: false,
            now: ms(10),
        });
        assert_eq!(b.committed(), None);
        assert!(!b.can_take_over());
        assert_eq!(b.ask_takeover(), TakeoverAnswer::NothingCommitted);
        assert!(
            tick(&mut b, 5_000).is_empty(),
            "silence alone takes nothing over"
        );
        // The first held checkpoint: a takeover may resume from it.
        b.on(I::Committed {
            epoch: 2,
            resumable: true,
            now: ms(5_010),
        });
        assert_eq!(b.committed(), Some(2));
        let a = tick(&mut b, 5_100);
        assert!(
            matches!(a.as_slice(), [A::TakeOver { epoch: 2, .. }]),
            "{a:?}"
        );
    }
}
