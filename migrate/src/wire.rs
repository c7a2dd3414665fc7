//! The migration's wire messages: sans-IO encoding and a frame decoder.
//!
//! Same frame layout as the pair's protocol (`u32 length | u8 type |
//! payload`, little endian, `length` counting type and payload), with type
//! numbers of their own (64 and up), so that a migration frame can never be
//! read as a checkpoint. Documented in docs/protocol.md ("Live migration").

use protocol::codec::{Reader, Writer};
use protocol::WireError;

/// Version of the migration protocol.
/// 2: `Verified` says whether the destination claims the VM at the witness
/// before it runs the guest.
pub const MIGRATION_VERSION: u16 = 2;
/// Largest frame: a 1 MiB chunk of records or 16 MiB of state, plus headers.
pub const MAX_FRAME: usize = (16 << 20) + 1024;
/// Largest chunk of records in one `Pages` message.
pub const MAX_CHUNK: usize = 1 << 20;
/// Largest node name.
const MAX_NAME: usize = 255;

/// One migration message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Source → destination, first on the bulk stream: what is coming.
    Hello {
        /// [`MIGRATION_VERSION`].
        version: u16,
        /// The source node's name (must match its certificate).
        node: String,
        /// fgbi mode byte of the records (`protocol::payload::mode_byte`).
        mode: u8,
        /// fgbi block size.
        block_size: u32,
        /// Guest RAM in bytes.
        memory_bytes: u64,
        /// vCPUs.
        vcpus: u32,
    },
    /// Destination → source (control): RAM allocated, send the rounds.
    Ready,
    /// Source → destination (bulk): fgbi records of round `round`.
    Pages {
        /// Round number (1: every page).
        round: u32,
        /// fgbi records, at most [`MAX_CHUNK`].
        records: Vec<u8>,
    },
    /// Source → destination (bulk): round `round` is complete.
    RoundEnd {
        /// Round number.
        round: u32,
        /// Pages the round covered.
        pages: u64,
    },
    /// Destination → source (control): round `round` is applied.
    RoundAck {
        /// Round number.
        round: u32,
    },
    /// Source → destination (bulk): the guest is paused for good on the
    /// source; its last pages came before this, here is the machine state.
    Switch {
        /// Packed machine state (`protocol::payload::pack_state`).
        state: Vec<u8>,
        /// Post-copy: the pages the destination does not have yet, as a
        /// bitmap over guest frames (empty for a pre-copy switch).
        missing: Vec<u8>,
        /// Pre-copy: a `Digest` follows, to check before running the guest.
        verify: bool,
    },
    /// Source → destination (bulk, before a post-copy switch): the pages
    /// the destination will lack; it drops its copies now (the `Switch`
    /// then names these and the few dirtied since).
    Discard {
        /// Bitmap over guest frames.
        missing: Vec<u8>,
    },
    /// Source → destination (bulk, pre-copy only): digest of all of the
    /// source's RAM at the switch.
    Digest {
        /// xxh3-128 of the RAM, as 16 little-endian bytes.
        digest: [u8; 16],
    },
    /// Destination → source (control): ready to run (memory verified in a
    /// pre-copy switch).
    Verified {
        /// The destination claims the VM at the witness, from the token of
        /// the handover, before it runs the guest on `Go`: a source that
        /// then misses `Finished` may take the VM back with a claim of its
        /// own from the same token (exactly one wins). `false`: it runs the
        /// guest on `Go` alone, and the source may never run it again.
        claims: bool,
    },
    /// Destination → source (control): it will not run the guest.
    Refused {
        /// Why.
        reason: String,
    },
    /// Source → destination (control): the commit point. The source will
    /// never run the guest again; the destination resumes it.
    Go,
    /// Destination → source (control, post-copy): the guest needs this page.
    Want {
        /// Guest frame number.
        page: u64,
    },
    /// Source → destination (post-copy; control for a `Want`, bulk for the
    /// background push): a page's content.
    Page {
        /// Guest frame number.
        page: u64,
        /// Its 4096 bytes (empty: a zero page).
        data: Vec<u8>,
    },
    /// Source → destination (bulk, post-copy): every missing page was sent.
    Done,
    /// Destination → source (control): every page is in place; the source
    /// may go away.
    Finished,
}

mod ty {
    pub const HELLO: u8 = 64;
    pub const READY: u8 = 65;
    pub const PAGES: u8 = 66;
    pub const ROUND_END: u8 = 67;
    pub const ROUND_ACK: u8 = 68;
    pub const SWITCH: u8 = 69;
    pub const DIGEST: u8 = 70;
    pub const VERIFIED: u8 = 71;
    pub const REFUSED: u8 = 72;
    pub const GO: u8 = 73;
    pub const WANT: u8 = 74;
    pub const PAGE: u8 = 75;
    pub const DONE: u8 = 76;
    pub const FINISHED: u8 = 77;
    pub const DISCARD: u8 = 78;
}

impl Msg {
    /// Appends the message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::default();
        let t = match self {
            Msg::Hello {
                version,
                node,
                mode,
                block_size,
                memory_bytes,
                vcpus,
            } => {
                w.u16(*version);
                w.bytes(node.as_bytes());
                w.u8(*mode);
                w.u32(*block_size);
                w.u64(*memory_bytes);
                w.u32(*vcpus);
                ty::HELLO
            }
            Msg::Ready => ty::READY,
            Msg::Pages { round, records } => {
                w.u32(*round);
                w.bytes(records);
                ty::PAGES
            }
            Msg::RoundEnd { round, pages } => {
                w.u32(*round);
                w.u64(*pages);
                ty::ROUND_END
            }
            Msg::RoundAck { round } => {
                w.u32(*round);
                ty::ROUND_ACK
            }
            Msg::Switch {
                state,
                missing,
                verify,
            } => {
                w.bytes(state);
                w.bytes(missing);
                w.u8(u8::from(*verify));
                ty::SWITCH
            }
            Msg::Digest { digest } => {
                w.raw(digest);
                ty::DIGEST
            }
            Msg::Verified { claims } => {
                w.u8(u8::from(*claims));
                ty::VERIFIED
            }
            Msg::Refused { reason } => {
                let mut end = reason.len().min(1024);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                w.bytes(&reason.as_bytes()[..end]);
                ty::REFUSED
            }
            Msg::Go => ty::GO,
            Msg::Want { page } => {
                w.u64(*page);
                ty::WANT
            }
            Msg::Page { page, data } => {
                w.u64(*page);
                w.bytes(data);
                ty::PAGE
            }
            Msg::Done => ty::DONE,
            Msg::Discard { missing } => {
                w.bytes(missing);
                ty::DISCARD
            }
            Msg::Finished => ty::FINISHED,
        };
        out.extend_from_slice(&(w.0.len() as u32 + 1).to_le_bytes());
        out.push(t);
        out.extend_from_slice(&w.0);
    }

    /// The message as one frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame's type and payload.
    pub fn decode(t: u8, payload: &[u8]) -> Result<Msg, WireError> {
        let mut r = Reader::new(payload);
        let m = match t {
            ty::HELLO => Msg::Hello {
                version: r.u16("version")?,
                node: String::from_utf8_lossy(&r.bytes("node", MAX_NAME)?).into_owned(),
                mode: r.u8("mode")?,
                block_size: r.u32("block_size")?,
                memory_bytes: r.u64("memory_bytes")?,
                vcpus: r.u32("vcpus")?,
            },
            ty::READY => Msg::Ready,
            ty::PAGES => Msg::Pages {
                round: r.u32("round")?,
                records: r.bytes("records", MAX_CHUNK)?,
            },
            ty::ROUND_END => Msg::RoundEnd {
                round: r.u32("round")?,
                pages: r.u64("pages")?,
            },
            ty::ROUND_ACK => Msg::RoundAck {
                round: r.u32("round")?,
            },
            ty::SWITCH => Msg::Switch {
                state: r.bytes("state", 16 << 20)?,
                missing: r.bytes("missing", 8 << 20)?,
                verify: r.u8("verify")? != 0,
            },
            ty::DIGEST => Msg::Digest {
                digest: r.array("digest")?,
            },
            ty::VERIFIED => Msg::Verified {
                claims: r.u8("claims")? != 0,
            },
            ty::REFUSED => Msg::Refused {
                reason: String::from_utf8_lossy(&r.bytes("reason", 1024)?).into_owned(),
            },
            ty::GO => Msg::Go,
            ty::WANT => Msg::Want {
                page: r.u64("page")?,
            },
            ty::PAGE => {
                let page = r.u64("page")?;
                let data = r.bytes("page data", 4096)?;
                if !data.is_empty() && data.len() != 4096 {
                    return Err(WireError::Truncated("page data"));
                }
                Msg::Page { page, data }
            }
            ty::DONE => Msg::Done,
            ty::DISCARD => Msg::Discard {
                missing: r.bytes("missing", 8 << 20)?,
            },
            ty::FINISHED => Msg::Finished,
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish("message")?;
        Ok(m)
    }
}

/// Splits a byte stream into messages; checks each frame's length before
/// buffering it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if there is one.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, WireError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(WireError::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME as u64,
            });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let m = Msg::decode(avail[4], &avail[5..4 + len])?;
        self.pos += 4 + len;
        if self.pos > (8 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(m))
    }
}

/// A bitmap over guest frames: bit `f` of byte `f / 8`.
pub fn bitmap_of(frames: impl IntoIterator<Item = u64>, pages: u64) -> Vec<u8> {
    let mut b = vec![0u8; pages.div_ceil(8) as usize];
    for f in frames {
        if f < pages {
            b[(f / 8) as usize] |= 1 << (f % 8);
        }
    }
    b
}

/// The frames set in a bitmap made by [`bitmap_of`].
pub fn frames_of(bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, &byte)| {
        (0..8)
            .filter(move |b| byte & (1 << b) != 0)
            .map(move |b| i as u64 * 8 + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: MIGRATION_VERSION,
                node: "node-a".into(),
                mode: 2,
                block_size: 64,
                memory_bytes: 256 << 20,
                vcpus: 1,
            },
            Msg::Ready,
            Msg::Pages {
                round: 3,
                records: vec![1, 2, 3],
            },
            Msg::RoundEnd {
                round: 3,
                pages: 77,
            },
            Msg::RoundAck { round: 3 },
            Msg::Switch {
                state: vec![9; 100],
                missing: vec![0xff, 1],
                verify: true,
            },
            Msg::Digest { digest: [7; 16] },
            Msg::Verified { claims: true },
            Msg::Verified { claims: false },
            Msg::Refused {
                reason: "memory digest differs".into(),
            },
            Msg::Go,
            Msg::Want { page: 12345 },
            Msg::Page {
                page: 1,
                data: vec![5; 4096],
            },
            Msg::Page {
                page: 2,
                data: vec![],
            },
            Msg::Done,
            Msg::Finished,
            Msg::Discard {
                missing: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_the_decoder_in_pieces() {
        let mut stream = Vec::new();
        for m in all() {
            m.encode(&mut stream);
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(7) {
            d.push(piece);
            while let Some(m) = d.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all());
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 0]);
        assert!(d.next_msg().is_err());
        let mut d = Decoder::new();
        d.push(&u32::MAX.to_le_bytes());
        assert!(d.next_msg().is_err());
        // A pair message type is not a migration message.
        let mut d = Decoder::new();
        d.push(&[1, 0, 0, 0, 7]);
        assert!(matches!(d.next_msg(), Err(WireError::UnknownType(7))));
        // A page of the wrong size.
        let mut f = Vec::new();
        Msg::Page {
            page: 1,
            data: vec![1; 100],
        }
        .encode(&mut f);
        let mut d = Decoder::new();
        d.push(&f);
        assert!(d.next_msg().is_err());
        // Trailing bytes.
        let mut f = Msg::Go.to_frame();
        f[0] += 1;
        f.push(0);
        let mut d = Decoder::new();
        d.push(&f);
        assert!(d.next_msg().is_err());
    }

    #[test]
    fn bitmaps_round_trip() {
        let frames = [0u64, 7, 8, 63, 64, 999];
        let b = bitmap_of(frames, 1000);
        assert_eq!(b.len(), 125);
        assert_eq!(frames_of(&b).collect::<Vec<_>>(), frames);
    }
}
