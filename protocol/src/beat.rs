//! Heartbeats on their own path: small UDP datagrams, one every few
//! milliseconds each way, outside the QUIC connection.
//!
//! On the connection, a heartbeat shares the congestion window with
//! checkpoint data and waits behind a lost packet of its stream until it is
//! retransmitted (head-of-line blocking): under a heavy writer, with the
//! connection in loss recovery, 30 ms without a heartbeat happen while both
//! nodes are alive. A datagram on its own socket is neither queued behind
//! data nor retransmitted; losing one loses one heartbeat.
//!
//! Each datagram is authenticated: a 128-bit keyed blake3 MAC under a key
//! the primary sends in its `Hello` (over the mutual-TLS stream), so nobody
//! else can fake a node's liveness. Sequence numbers only grow; a replayed
//! or reordered datagram is ignored by the receiver ([`BeatWindow`]).

use crate::WireError;

/// Bytes of a heartbeat datagram.
pub const BEAT_LEN: usize = 8 + 8 + 16;

/// One heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Grows by one per datagram sent.
    pub seq: u64,
    /// The sender's clock, µs (echoed for round trips).
    pub sent_us: u64,
}

fn mac(key: &[u8; 32], body: &[u8]) -> [u8; 16] {
    let h = blake3::keyed_hash(key, body);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

impl Beat {
    /// The datagram.
    pub fn seal(&self, key: &[u8; 32]) -> [u8; BEAT_LEN] {
        let mut d = [0u8; BEAT_LEN];
        d[..8].copy_from_slice(&self.seq.to_le_bytes());
        d[8..16].copy_from_slice(&self.sent_us.to_le_bytes());
        let m = mac(key, &d[..16]);
        d[16..].copy_from_slice(&m);
        d
    }

    /// A datagram's heartbeat, if it is one sealed with `key`.
    pub fn open(key: &[u8; 32], d: &[u8]) -> Result<Beat, WireError> {
        if d.len() != BEAT_LEN {
            return Err(WireError::BadValue {
                field: "heartbeat datagram length",
                value: d.len() as u64,
            });
        }
        if mac(key, &d[..16]) != d[16..] {
            return Err(WireError::BadValue {
                field: "heartbeat datagram MAC",
                value: 0,
            });
        }
        Ok(Beat {
            seq: u64::from_le_bytes(d[..8].try_into().expect("8")),
            sent_us: u64::from_le_bytes(d[8..16].try_into().expect("8")),
        })
    }
}

/// Accepts each heartbeat once, in order: a replayed or older one is not
/// proof of life.
#[derive(Debug, Default, Clone)]
pub struct BeatWindow {
    last: u64,
}

impl BeatWindow {
    /// True for a fresh heartbeat (and remembers it).
    pub fn accept(&mut self, b: &Beat) -> bool {
        if b.seq > self.last {
            self.last = b.seq;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fresh_heartbeats_sealed_with_the_key_count() {
        let key = [7u8; 32];
        let b = Beat {
            seq: 5,
            sent_us: 99,
        };
        let d = b.seal(&key);
        assert_eq!(Beat::open(&key, &d).unwrap(), b);
        // Another key, a flipped bit, a short datagram: refused.
        assert!(Beat::open(&[8u8; 32], &d).is_err());
        let mut bad = d;
        bad[3] ^= 1;
        assert!(Beat::open(&key, &bad).is_err());
        assert!(Beat::open(&key, &d[..20]).is_err());
        let mut w = BeatWindow::default();
        assert!(w.accept(&b));
        assert!(!w.accept(&b), "a replay");
        assert!(!w.accept(&Beat { seq: 4, sent_us: 0 }), "an older one");
        assert!(w.accept(&Beat { seq: 9, sent_us: 0 }));
    }
}
