//! The body of the `protocol_frames` fuzz target, in one place: `fuzz/` runs
//! it under libFuzzer (nightly) and `protocol/tests/fuzz_corpus.rs` replays
//! the checked-in seeds through it on stable, so the two cannot drift.
//!
//! Not part of the protocol's API: it exists for fuzzing and its tests.

use crate::message::MAX_FRAME;
use crate::{Event, FrameDecoder, Receiver};

/// Most bytes of one epoch the target's receiver stages.
pub const MAX_EPOCH_BYTES: usize = 1 << 20;

/// What one input did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fed {
    /// Bytes per piece fed to the decoder (1 + the first byte).
    pub piece: usize,
    /// Messages decoded and accepted by the receiver.
    pub messages: usize,
    /// Checkpoints the receiver handed over (committed and digest-checked).
    pub checkpoints: usize,
    /// Why the stream stopped early: a frame that does not decode or a
    /// message the receiver refuses. `None`: every byte was consumed.
    pub refused: Option<String>,
}

/// The `protocol_frames` target: the first byte selects the piece size
/// (1 to 256 bytes), the rest is a byte stream from a primary, fed to a
/// [`FrameDecoder`] in pieces of that size, each decoded message to a
/// backup's [`Receiver`]. It must never panic, and the decoder never buffers
/// more than one frame plus the piece just fed (asserted here: a violation
/// panics).
pub fn frames_target(data: &[u8]) -> Fed {
    let Some((&sel, stream)) = data.split_first() else {
        return Fed::default();
    };
    let piece = 1 + sel as usize;
    let mut fed = Fed {
        piece,
        ..Fed::default()
    };
    let mut d = FrameDecoder::new();
    let mut rx = Receiver::new(MAX_EPOCH_BYTES);
    for chunk in stream.chunks(piece) {
        d.push(chunk);
        assert!(
            d.buffered() <= MAX_FRAME + 4 + piece,
            "decoder buffered {} bytes",
            d.buffered()
        );
        loop {
            match d.next_message() {
                Ok(Some(m)) => match rx.on_message(m) {
                    Ok(event) => {
                        fed.messages += 1;
                        if matches!(event, Event::Checkpoint(_)) {
                            fed.checkpoints += 1;
                        }
                    }
                    Err(e) => {
                        fed.refused = Some(e.to_string());
                        return fed;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    fed.refused = Some(e.to_string());
                    return fed;
                }
            }
        }
    }
    fed
}
