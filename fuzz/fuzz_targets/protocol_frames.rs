//! Fuzzes frame decoding and the backup's session state machine: any byte
//! stream, fed in pieces. It must never panic and never buffer more than one
//! frame's worth plus the piece just fed.
//!
//! Run: `cargo +nightly fuzz run protocol_frames fuzz/seeds/protocol_frames -- -runs=1000000`
//! (from `fuzz/`: `seeds/protocol_frames`; the seeds are a valid session).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::message::MAX_FRAME;
use protocol::{FrameDecoder, Receiver};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::new();
    let mut rx = Receiver::new(1 << 20);
    let piece = 1 + data.first().copied().unwrap_or(0) as usize;
    for chunk in data.chunks(piece) {
        d.push(chunk);
        assert!(d.buffered() <= MAX_FRAME + 4 + piece, "decoder buffered {} bytes", d.buffered());
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    if rx.on_message(m).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
