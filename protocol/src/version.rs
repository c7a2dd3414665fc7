//! Protocol versions and their negotiation.
//!
//! Each castor speaks a range of protocol versions ([`SUPPORTED`]). Version
//! 5 is the format of castor 0.1, which knows no range: its hello carries
//! one version and it refuses any other. From version 6 on, a hello says
//! the highest version its sender speaks (its `version` field) and the
//! lowest (`lowest_version`), and the backup answers it first of all with
//! [`crate::Message::Versions`]: the version the session uses — the highest
//! both speak — or, with no version in common, it refuses the session
//! naming both ranges ([`crate::ProtocolError::NoCommonVersion`]).
//!
//! A castor 0.1 backup refuses a hello of version 6 (as incompatible). A
//! primary that speaks 5 and sees its hello of version 6 or more refused so,
//! before any answer, speaks 5 to that backup on the next connection (a
//! plain v5 hello, which castor 0.1 accepts): [`Fallback`]. A backup that
//! receives a v5 hello answers nothing (a castor 0.1 primary would not
//! understand an answer) and the session is at version 5.
//!
//! Versions 5 and 6 differ only in the hello's range and the answer: every
//! other message is the same. Version 7 adds [`crate::Message::Held`]: a
//! checkpoint may be resumed from only if it carries it (below 7, every
//! checkpoint may). The layout of a hello of version 6 or more is
//! frozen, so that any later castor can read the range of any hello and
//! answer it; what a later version changes comes after the answer.

use std::fmt;

/// The version of castor 0.1's protocol, the last without negotiation.
pub const V5: u16 = 5;
/// The first version whose hello carries the range and is answered.
pub const NEGOTIATED: u16 = 6;
/// The first version whose checkpoints say whether they may be resumed
/// from ([`crate::Message::Held`]): its primary releases output during the
/// session's full resync and holds it from the first pause after the
/// resync's ack.
pub const HELD: u16 = 7;

/// A range of protocol versions, `lowest..=highest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    /// The lowest version spoken.
    pub lowest: u16,
    /// The highest version spoken.
    pub highest: u16,
}

/// The versions this castor speaks.
pub const SUPPORTED: Range = Range {
    lowest: V5,
    highest: crate::message::VERSION,
};

impl Range {
    /// `lowest..=highest`; `None` if empty.
    pub fn new(lowest: u16, highest: u16) -> Option<Range> {
        (lowest <= highest).then_some(Range { lowest, highest })
    }

    /// Just `v`.
    pub fn only(v: u16) -> Range {
        Range {
            lowest: v,
            highest: v,
        }
    }

    /// `v` is in the range.
    pub fn contains(&self, v: u16) -> bool {
        (self.lowest..=self.highest).contains(&v)
    }

    /// The highest version in both ranges, if any.
    pub fn choose(&self, peer: &Range) -> Option<u16> {
        let v = self.highest.min(peer.highest);
        (v >= self.lowest.max(peer.lowest)).then_some(v)
    }

    /// The range a hello offers: `lowest_version..=version` (a v5 hello
    /// offers 5 alone).
    pub fn of_hello(h: &crate::Hello) -> Range {
        if h.version < NEGOTIATED {
            Range::only(h.version)
        } else {
            Range {
                lowest: h.lowest_version.min(h.version),
                highest: h.version,
            }
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lowest == self.highest {
            write!(f, "{} only", self.lowest)
        } else {
            write!(f, "{} to {}", self.lowest, self.highest)
        }
    }
}

/// What a primary writes in its hellos toward one backup: its whole range,
/// or version 5 alone to a backup that refused a hello of a later version
/// before answering it (castor 0.1). Sans I/O: the daemon tells it how each
/// session went.
#[derive(Debug, Clone)]
pub struct Fallback {
    ours: Range,
    /// The next hello speaks 5 alone.
    v5: bool,
}

impl Fallback {
    /// A primary speaking `ours`.
    pub fn new(ours: Range) -> Fallback {
        Fallback { ours, v5: false }
    }

    /// The range the next hello offers.
    pub fn offer(&self) -> Range {
        if self.v5 {
            Range::only(V5)
        } else {
            self.ours
        }
    }

    /// A session whose hello offered `offered` ended; `answered`: the
    /// backup's answer ([`crate::Message::Versions`]) had arrived;
    /// `incompatible`: the backup refused the hello as incompatible
    /// ([`crate::EndReason::Incompatible`]). A backup that does not
    /// negotiate refuses a hello of version 6 or more without answering it:
    /// the next hello then speaks 5 alone, if we speak it. (A backup that
    /// negotiates but refuses the hello for another reason may close before
    /// its answer arrives: the v5 hello is then refused for that reason
    /// too, and the one after offers the whole range again.) Any other end
    /// (and the end of a v5 session) goes back to offering the whole range,
    /// so a backup upgraded meanwhile is offered the newest version again.
    pub fn ended(&mut self, offered: Range, answered: bool, incompatible: bool) {
        self.v5 = offered.highest >= NEGOTIATED
            && !answered
            && incompatible
            && self.ours.contains(V5)
            && !self.v5;
    }
}

/// A hello's range and the backup's: the version the session uses, or a
/// refusal naming both ranges.
pub fn negotiate(primary: Range, backup: Range) -> Result<u16, crate::ProtocolError> {
    backup
        .choose(&primary)
        .ok_or(crate::ProtocolError::NoCommonVersion { primary, backup })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Hello, Message};
    use crate::session::{Event, Receiver, Sender};
    use crate::{EndReason, FrameDecoder, ProtocolError};

    fn hello(versions: Range) -> Hello {
        Hello {
            version: crate::VERSION,
            lowest_version: V5,
            session: 9,
            node: "a".into(),
            capabilities: crate::message::CAP_REUSE,
            mode: fgbi::Mode::Fgbi,
            block_size: 64,
            memory_bytes: 1 << 20,
            vcpus: 1,
            output_offset: 0,
            token: 1,
            beat_port: 0,
            beat_key: [0; 32],
            disk_bytes: 0,
        }
        .offering(versions)
    }

    /// Feeds a hello frame to a receiver speaking `backup`, as the backup's
    /// daemon does: the event, then the answer it sends first.
    fn receive(frame: &[u8], backup: Range) -> (Result<Event, ProtocolError>, Option<Message>) {
        let mut rx = Receiver::new(1 << 24).speaking(backup);
        let mut d = FrameDecoder::new();
        d.push(frame);
        let m = match d.next_message() {
            Ok(m) => m.expect("a whole frame"),
            Err(e) => return (Err(e.into()), None),
        };
        let e = rx.on_message(m);
        (e, rx.answer())
    }

    /// One session between a primary speaking `primary` and a backup
    /// speaking `backup`: the version both end up with, or the refusal.
    fn session(primary: Range, backup: Range) -> Result<u16, ProtocolError> {
        let (mut tx, frame) = Sender::new(hello(primary));
        let (event, answer) = receive(&frame, backup);
        event?;
        match answer {
            Some(Message::Versions {
                version,
                lowest,
                highest,
            }) => {
                assert_eq!(Range::new(lowest, highest), Some(backup));
                tx.on_versions(version, lowest, highest)
            }
            Some(other) => panic!("answered with {other:?}"),
            None => {
                assert_eq!(primary.highest, V5, "only a v5 hello goes unanswered");
                Ok(tx
                    .version()
                    .expect("a v5 session's version is known at once"))
            }
        }
    }

    /// How castor 0.1 (52a1c96) writes its hello: `version` 5, then the
    /// fields, no range.
    fn castor_0_1_hello(h: &Hello) -> Vec<u8> {
        let mut w = crate::codec::Writer(Vec::new());
        w.u16(5);
        w.u64(h.session);
        w.bytes(h.node.as_bytes());
        w.u64(h.capabilities);
        w.u8(crate::payload::mode_byte(h.mode));
        w.u32(h.block_size);
        w.u64(h.memory_bytes);
        w.u32(h.vcpus);
        w.u64(h.output_offset);
        w.u64(h.token);
        w.u16(h.beat_port);
        w.raw(&h.beat_key);
        w.u64(h.disk_bytes);
        let mut f = ((w.0.len() + 1) as u32).to_le_bytes().to_vec();
        f.push(1);
        f.extend_from_slice(&w.0);
        f
    }

    /// castor 0.1's check of a hello: version 5 exactly, read as v5.
    fn castor_0_1_accepts(frame: &[u8]) -> bool {
        u16::from_le_bytes([frame[5], frame[6]]) == V5
    }

    #[test]
    fn adjacent_and_distant_peers() {
        let r = |a, b| Range::new(a, b).unwrap();
        // Two of this castor: the newest.
        assert_eq!(session(SUPPORTED, SUPPORTED).unwrap(), 7);
        // This primary, a backup that speaks 5 alone (but negotiates).
        assert_eq!(session(SUPPORTED, Range::only(5)).unwrap(), 5);
        // A primary speaking 5 alone: a v5 hello, unanswered, a v5 session.
        assert_eq!(session(Range::only(5), SUPPORTED).unwrap(), 5);
        // The previous castor, speaking 5 to 6, either side.
        assert_eq!(session(r(5, 6), SUPPORTED).unwrap(), 6);
        assert_eq!(session(SUPPORTED, r(5, 6)).unwrap(), 6);
        // A newer castor speaking 5 to 8, or 7 to 9, either side.
        assert_eq!(session(r(5, 8), SUPPORTED).unwrap(), 7);
        assert_eq!(session(SUPPORTED, r(5, 8)).unwrap(), 7);
        assert_eq!(session(r(7, 9), SUPPORTED).unwrap(), 7);
        // A castor that speaks 8 alone: refused, both ranges named, on
        // either side; never a panic.
        for (p, b) in [(Range::only(8), SUPPORTED), (SUPPORTED, Range::only(8))] {
            let e = session(p, b).unwrap_err();
            assert_eq!(
                e,
                ProtocolError::NoCommonVersion {
                    primary: p,
                    backup: b
                }
            );
            let why = EndReason::for_protocol_error(&e);
            let EndReason::Incompatible(text) = &why else {
                panic!("{why:?}")
            };
            assert!(
                text.contains(&p.to_string()) && text.contains(&b.to_string()),
                "{text}"
            );
        }
    }

    #[test]
    fn a_castor_0_1_peer() {
        // castor 0.1's primary: its hello reads as a v5 session, and the
        // backup sends no answer (castor 0.1 would not know it).
        let h = hello(SUPPORTED);
        let (e, answer) = receive(&castor_0_1_hello(&h), SUPPORTED);
        match e.unwrap() {
            Event::Hello(got) => {
                assert_eq!((got.version, got.lowest_version), (5, 5));
                assert_eq!(got, h.clone().offering(Range::only(5)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(answer, None);

        // castor 0.1's backup refuses this castor's first hello (version
        // 7) as incompatible, without an answer; the next hello is v5,
        // byte for byte what castor 0.1 writes, and it is accepted.
        let mut fallback = Fallback::new(SUPPORTED);
        let (tx, frame) = Sender::new(hello(fallback.offer()));
        assert!(!castor_0_1_accepts(&frame));
        fallback.ended(tx.offered(), tx.answered(), true);
        assert_eq!(fallback.offer(), Range::only(V5));
        let (tx, frame) = Sender::new(hello(fallback.offer()));
        assert_eq!(frame, castor_0_1_hello(&h));
        assert!(castor_0_1_accepts(&frame));
        assert_eq!(tx.version(), Some(5));
        // That session ends: the next connection offers the whole range
        // again (the backup may have been upgraded meanwhile).
        fallback.ended(tx.offered(), tx.answered(), false);
        assert_eq!(fallback.offer(), SUPPORTED);
    }

    #[test]
    fn a_bad_answer_is_refused() {
        let (mut tx, _) = Sender::new(hello(SUPPORTED));
        assert_eq!(tx.version(), None);
        // A version the hello did not offer, or outside the backup's own range.
        assert!(matches!(
            tx.on_versions(8, 5, 8),
            Err(ProtocolError::BadVersionAnswer { chosen: 8, .. })
        ));
        assert!(tx.on_versions(6, 7, 5).is_err());
        assert!(tx.on_versions(5, 6, 6).is_err());
        assert_eq!(tx.on_versions(6, 5, 6), Ok(6));
        assert!(tx.answered());
        // Twice, or in a v5 session: out of place.
        assert!(matches!(
            tx.on_versions(6, 5, 6),
            Err(ProtocolError::Unexpected { .. })
        ));
        let (mut v5, _) = Sender::new(hello(Range::only(5)));
        assert!(!v5.answered());
        assert!(matches!(
            v5.on_versions(5, 5, 6),
            Err(ProtocolError::Unexpected { .. })
        ));
        // The backup refuses an answer sent to it.
        let mut rx = Receiver::new(1 << 20);
        rx.on_message(Message::Hello(hello(SUPPORTED))).unwrap();
        assert!(rx
            .on_message(Message::Versions {
                version: 6,
                lowest: 5,
                highest: 6
            })
            .is_err());
    }

    #[test]
    fn malformed_ranges_are_refused_not_panicked_on() {
        // A hello of version 6 whose lowest is above it.
        let mut f = Message::Hello(hello(SUPPORTED)).to_frame();
        f[7] = 9;
        let (e, _) = receive(&f, SUPPORTED);
        let e = e.unwrap_err();
        assert!(e.is_incompatible(), "{e:?}");
        // Truncated inside the range.
        let f = Message::Hello(hello(SUPPORTED)).to_frame();
        for cut in 5..12 {
            let body = &f[4..cut];
            assert!(Message::decode(body).is_err());
        }
        // The answer round-trips.
        let a = Message::Versions {
            version: 6,
            lowest: 5,
            highest: 6,
        };
        assert_eq!(Message::decode(&a.to_frame()[4..]).unwrap(), a);
    }

    #[test]
    fn the_highest_in_common_is_chosen() {
        let r = |a, b| Range::new(a, b).unwrap();
        assert_eq!(negotiate(r(5, 6), r(5, 6)).unwrap(), 6);
        assert_eq!(negotiate(r(5, 5), r(5, 6)).unwrap(), 5);
        assert_eq!(negotiate(r(5, 6), r(5, 5)).unwrap(), 5);
        assert_eq!(negotiate(r(5, 8), r(6, 7)).unwrap(), 7);
        assert_eq!(negotiate(r(6, 7), r(5, 6)).unwrap(), 6);
        let e = negotiate(r(7, 7), r(5, 6)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("7 only") && text.contains("5 to 6"),
            "both ranges named: {text}"
        );
        assert!(e.is_incompatible());
        assert!(Range::new(6, 5).is_none());
    }

    #[test]
    fn a_refusal_without_an_answer_falls_back_to_v5_once() {
        let mut f = Fallback::new(SUPPORTED);
        assert_eq!(f.offer(), SUPPORTED);
        // A castor 0.1 backup refuses the v6 hello without answering.
        f.ended(f.offer(), false, true);
        assert_eq!(f.offer(), Range::only(V5));
        // The v5 session ends (any way): the whole range next time.
        f.ended(f.offer(), false, true);
        assert_eq!(f.offer(), SUPPORTED);
        // A backup that answered, then refused: no fallback.
        f.ended(f.offer(), true, true);
        assert_eq!(f.offer(), SUPPORTED);
        // A broken connection before the answer: no fallback.
        f.ended(f.offer(), false, false);
        assert_eq!(f.offer(), SUPPORTED);
        // A primary that does not speak 5 never falls back to it.
        let mut g = Fallback::new(Range::only(6));
        g.ended(g.offer(), false, true);
        assert_eq!(g.offer(), Range::only(6));
    }
}
