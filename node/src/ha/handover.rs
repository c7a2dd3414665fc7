//! A migration's handover: the VM's ownership passes to the destination at
//! the witness before the destination may run the guest.
//!
//! With the guest paused on the source and the destination ready, the
//! source asks the witness to swap the owner from itself (its token `t`) to
//! the destination (`t + 1`), and sends `Go` only once that swap is won. So
//! at any time at most one node may run the guest: the owner the witness
//! names. A backup the source stood down, or any node still holding `t`,
//! loses every later claim.
//!
//! An unreachable witness is asked again until a deadline; then the guest
//! stays on the source (availability, never safety). A swap that reached
//! etcd but whose answer was lost is recognised by the next attempt
//! (`witness::Etcd::claim`), so retrying is safe.

use super::Claim;

/// What the source does with the witness's answer to its handover claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// The destination owns the VM (this token): send `Go`.
    Go {
        /// The destination's token.
        token: u64,
    },
    /// Another node owns the VM: this node was fenced; its guest must stop
    /// and must not move.
    Fenced(String),
    /// Ask again (after a short wait).
    Retry,
    /// The witness stayed silent past the deadline: no `Go`, the guest
    /// runs on here.
    Stay(String),
}

/// The next step, given the witness's answer and whether the deadline for
/// the handover has passed.
pub fn handover(claim: Claim, dest: &str, past_deadline: bool) -> Handover {
    match claim {
        Claim::Won { token } => Handover::Go { token },
        Claim::Lost { owner, token } => Handover::Fenced(format!(
            "the witness gives the VM to {owner} (token {token}), not to this node or {dest}"
        )),
        Claim::Unreachable if past_deadline => Handover::Stay(
            "the witness did not answer in time: the VM's ownership could not pass to the destination"
                .into(),
        ),
        Claim::Unreachable => Handover::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_only_once_the_witness_names_the_destination() {
        assert_eq!(
            handover(Claim::Won { token: 8 }, "c", false),
            Handover::Go { token: 8 }
        );
        // Won even past the deadline: the swap happened, the destination owns it.
        assert_eq!(
            handover(Claim::Won { token: 8 }, "c", true),
            Handover::Go { token: 8 }
        );
    }

    #[test]
    fn a_lost_handover_fences_the_source() {
        let h = handover(
            Claim::Lost {
                owner: "b".into(),
                token: 9,
            },
            "c",
            false,
        );
        assert!(matches!(h, Handover::Fenced(ref why) if why.contains("b (token 9)")));
    }

    #[test]
    fn an_unreachable_witness_is_asked_again_then_the_guest_stays() {
        assert_eq!(handover(Claim::Unreachable, "c", false), Handover::Retry);
        assert!(matches!(
            handover(Claim::Unreachable, "c", true),
            Handover::Stay(_)
        ));
    }
}
