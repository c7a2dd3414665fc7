//! Why a session ended, as both sides and the wire see it.
//!
//! Every end of a session has a typed [`EndReason`]. A side that closes the
//! connection sends the reason's [`EndReason::code`] and text; the other
//! side reads it back with [`EndReason::from_close`]. The HA decisions
//! branch on the variant (a primary that reads [`EndReason::TakenOver`]
//! stops its guest), never on a substring of a message.

use std::fmt;
use std::time::Duration;

/// Why a session between a primary and its backup ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The backup took over from the primary: the primary must stop its
    /// guest and never release the output it holds.
    TakenOver,
    /// The node connected to has already taken over: the primary that
    /// connects is stale and must stop.
    AlreadyTakenOver,
    /// The primary's fencing token is older than one the backup has seen:
    /// another node has owned the VM since, and this primary must stop.
    Superseded,
    /// The peer stopped on purpose (it said goodbye): no takeover.
    Goodbye(String),
    /// The peer refused what it received (a protocol violation, a refused
    /// checkpoint, a replica mismatch, a bad ack). The peer is alive.
    Refused(String),
    /// The backup cannot protect this primary's VM as described by its
    /// hello (another protocol version, a node name that is not the
    /// certificate's, a machine over the backup's limits, an unknown mode).
    /// The peer is alive; the same hello will be refused again until the
    /// configuration changes.
    Incompatible(String),
    /// No answer from the peer for this long.
    Silent(Duration),
    /// The connection broke (a transport error or an unknown close).
    Broken(String),
    /// This side ended it: it is stopping or its own loop ended.
    Local(String),
}

/// QUIC application close codes.
mod code {
    pub const LOCAL: u32 = 0;
    pub const GOODBYE: u32 = 1;
    pub const REFUSED: u32 = 2;
    pub const SILENT: u32 = 3;
    pub const INCOMPATIBLE: u32 = 4;
    pub const TAKEN_OVER: u32 = 7;
    pub const ALREADY_TAKEN_OVER: u32 = 8;
    pub const SUPERSEDED: u32 = 9;
}

impl EndReason {
    /// The close code sent with this reason.
    pub fn code(&self) -> u32 {
        match self {
            EndReason::TakenOver => code::TAKEN_OVER,
            EndReason::AlreadyTakenOver => code::ALREADY_TAKEN_OVER,
            EndReason::Superseded => code::SUPERSEDED,
            EndReason::Goodbye(_) => code::GOODBYE,
            EndReason::Refused(_) => code::REFUSED,
            EndReason::Silent(_) => code::SILENT,
            EndReason::Incompatible(_) => code::INCOMPATIBLE,
            EndReason::Broken(_) | EndReason::Local(_) => code::LOCAL,
        }
    }

    /// What the peer learns when this side closes with this reason.
    ///
    /// A goodbye reads as a goodbye; a refusal, or the peer giving up on a
    /// silent session, as a refusal (the peer is alive and ended it on
    /// purpose); a local stop as a broken session.
    pub fn from_close(code: u32, text: &[u8]) -> EndReason {
        let text = String::from_utf8_lossy(text).into_owned();
        match code {
            code::TAKEN_OVER => EndReason::TakenOver,
            code::ALREADY_TAKEN_OVER => EndReason::AlreadyTakenOver,
            code::SUPERSEDED => EndReason::Superseded,
            code::GOODBYE => EndReason::Goodbye(
                text.strip_prefix("the peer said goodbye: ")
                    .map_or(text.clone(), str::to_string),
            ),
            code::REFUSED => EndReason::Refused(
                text.strip_prefix("refused: ")
                    .map_or(text.clone(), str::to_string),
            ),
            code::SILENT => EndReason::Refused(format!("the peer stopped waiting: {text}")),
            code::INCOMPATIBLE => EndReason::Incompatible(
                text.strip_prefix("incompatible: ")
                    .map_or(text.clone(), str::to_string),
            ),
            _ => EndReason::Broken(format!("the peer closed the connection: {text}")),
        }
    }

    /// The receiver of this reason must stop running the guest: another
    /// node runs it.
    pub fn fences(&self) -> bool {
        matches!(
            self,
            EndReason::TakenOver | EndReason::AlreadyTakenOver | EndReason::Superseded
        )
    }

    /// The peer meant it (goodbye, refusal, incompatible hello): it is alive.
    pub fn peer_alive(&self) -> bool {
        matches!(
            self,
            EndReason::Goodbye(_) | EndReason::Refused(_) | EndReason::Incompatible(_)
        )
    }

    /// How a backup ends a session whose primary broke the protocol or sent
    /// a hello it cannot accept: [`EndReason::Incompatible`] for the hello
    /// (version, name, limits, mode), [`EndReason::Refused`] for the rest.
    pub fn for_protocol_error(e: &crate::ProtocolError) -> EndReason {
        if e.is_incompatible() {
            EndReason::Incompatible(e.to_string())
        } else {
            EndReason::Refused(e.to_string())
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::TakenOver => f.write_str("the backup has taken over"),
            EndReason::AlreadyTakenOver => f.write_str("that node has already taken over"),
            EndReason::Superseded => {
                f.write_str("a newer owner of the VM exists (this node's fencing token is stale)")
            }
            EndReason::Goodbye(r) => write!(f, "the peer said goodbye: {r}"),
            EndReason::Refused(r) => write!(f, "refused: {r}"),
            EndReason::Incompatible(r) => write!(f, "incompatible: {r}"),
            EndReason::Silent(d) => write!(f, "no answer for {} ms", d.as_millis()),
            EndReason::Broken(r) => write!(f, "connection broken: {r}"),
            EndReason::Local(r) => f.write_str(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_crosses_the_wire_as_the_peer_must_read_it() {
        let cases = [
            (EndReason::TakenOver, EndReason::TakenOver),
            (EndReason::AlreadyTakenOver, EndReason::AlreadyTakenOver),
            (EndReason::Superseded, EndReason::Superseded),
            (
                EndReason::Goodbye("stop".into()),
                EndReason::Goodbye("stop".into()),
            ),
            (
                EndReason::Refused("bad".into()),
                EndReason::Refused("bad".into()),
            ),
            (
                EndReason::Incompatible("too big".into()),
                EndReason::Incompatible("too big".into()),
            ),
        ];
        for (sent, read) in cases {
            let text = sent.to_string();
            let got = EndReason::from_close(sent.code(), text.as_bytes());
            // The reason's own words cross too, once.
            assert_eq!(got, read);
            assert_eq!(got.fences(), sent.fences());
            assert_eq!(got.peer_alive(), sent.peer_alive());
        }
        let silent = EndReason::Silent(Duration::from_millis(30));
        let got = EndReason::from_close(silent.code(), silent.to_string().as_bytes());
        assert!(
            matches!(got, EndReason::Refused(_)) && got.peer_alive(),
            "{got:?}"
        );
        for local in [
            EndReason::Local("stopping".into()),
            EndReason::Broken("reset".into()),
        ] {
            let got = EndReason::from_close(local.code(), local.to_string().as_bytes());
            assert!(matches!(got, EndReason::Broken(_)), "{got:?}");
            assert!(!got.fences() && !got.peer_alive());
        }
        // A close code this castor does not know is a broken session, not a fence.
        assert!(!EndReason::from_close(99, b"?").fences());
    }
}
