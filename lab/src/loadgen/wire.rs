//! The key-value service's wire format: fixed-size little-endian UDP
//! datagrams.
//!
//! Request, 40 bytes: magic u32 [`MAGIC`], op u32 (1 PUT, 2 GET), client
//! u64, req u64 (unique per client, increasing; a retry reuses it), key u64,
//! value u64 (PUT; 0 for GET).
//!
//! Reply, 56 bytes: magic u32, op u32 (request op | [`REPLY_BIT`]), status
//! u32 ([`STATUS_OK`], [`STATUS_TABLE_FULL`], [`STATUS_BAD_REQUEST`]), pad
//! u32 (0), client u64, req u64, key u64, value u64 (the key's value after
//! the op; 0 if never written), version u64 (PUTs applied to the key).
//! The server replies to the request's source address and answers a
//! retried PUT (same client and req as the key's last applied PUT) with the
//! current value and version without applying it again.

use serde::Serialize;

/// "KVS1" read as a little-endian u32.
pub const MAGIC: u32 = 0x4B56_5331;
/// A request's size in bytes.
pub const REQUEST_LEN: usize = 40;
/// A reply's size in bytes.
pub const REPLY_LEN: usize = 56;
/// Set in a reply's op.
pub const REPLY_BIT: u32 = 0x80;
/// Reply status: done.
pub const STATUS_OK: u32 = 0;
/// Reply status: the server's table has no room for a new key.
pub const STATUS_TABLE_FULL: u32 = 1;
/// Reply status: the request was malformed.
pub const STATUS_BAD_REQUEST: u32 = 2;

/// An operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Op {
    /// Set a key's value.
    Put,
    /// Read a key's value.
    Get,
}

impl Op {
    /// Its code on the wire.
    pub fn code(self) -> u32 {
        match self {
            Op::Put => 1,
            Op::Get => 2,
        }
    }

    /// The op with this code.
    pub fn from_code(c: u32) -> Option<Op> {
        match c {
            1 => Some(Op::Put),
            2 => Some(Op::Get),
            _ => None,
        }
    }
}

/// Why a datagram is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong size.
    #[error("{0} bytes (a request is 40, a reply 56)")]
    Length(usize),
    /// Wrong magic.
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// Unknown op (or a reply without the reply bit, or the reverse).
    #[error("bad op {0:#x}")]
    Op(u32),
    /// A reply's pad is not 0.
    #[error("nonzero pad {0:#x}")]
    Pad(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// PUT or GET.
    pub op: Op,
    /// The client (random per load-generator run).
    pub client: u64,
    /// The request id (a retry reuses it).
    pub req: u64,
    /// The key.
    pub key: u64,
    /// The value to PUT (0 for GET).
    pub value: u64,
}

impl Request {
    /// Its 40 bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.code().to_le_bytes());
        b[8..16].copy_from_slice(&self.client.to_le_bytes());
        b[16..24].copy_from_slice(&self.req.to_le_bytes());
        b[24..32].copy_from_slice(&self.key.to_le_bytes());
        b[32..40].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Parses a request.
    pub fn decode(b: &[u8]) -> Result<Request, WireError> {
        if b.len() != REQUEST_LEN {
            return Err(WireError::Length(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let op = u32_at(b, 4);
        Ok(Request {
            op: Op::from_code(op).ok_or(WireError::Op(op))?,
            client: u64_at(b, 8),
            req: u64_at(b, 16),
            key: u64_at(b, 24),
            value: u64_at(b, 32),
        })
    }
}

/// A reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The request's op.
    pub op: Op,
    /// [`STATUS_OK`] or an error.
    pub status: u32,
    /// The request's client.
    pub client: u64,
    /// The request's id.
    pub req: u64,
    /// The request's key.
    pub key: u64,
    /// The key's value after the op (0 if never written).
    pub value: u64,
    /// PUTs applied to the key (0 if never written).
    pub version: u64,
}

impl Reply {
    /// Its 56 bytes.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.op.code() | REPLY_BIT).to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[16..24].copy_from_slice(&self.client.to_le_bytes());
        b[24..32].copy_from_slice(&self.req.to_le_bytes());
        b[32..40].copy_from_slice(&self.key.to_le_bytes());
        b[40..48].copy_from_slice(&self.value.to_le_bytes());
        b[48..56].copy_from_slice(&self.version.to_le_bytes());
        b
    }

    /// Parses a reply; anything else (garbage, a request, a wrong size)
    /// is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<Reply, WireError> {
        if b.len() != REPLY_LEN {
            return Err(WireError::Length(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let op = u32_at(b, 4);
        if op & REPLY_BIT == 0 {
            return Err(WireError::Op(op));
        }
        let pad = u32_at(b, 12);
        if pad != 0 {
            return Err(WireError::Pad(pad));
        }
        Ok(Reply {
            op: Op::from_code(op & !REPLY_BIT).ok_or(WireError::Op(op))?,
            status: u32_at(b, 8),
            client: u64_at(b, 16),
            req: u64_at(b, 24),
            key: u64_at(b, 32),
            value: u64_at(b, 40),
            version: u64_at(b, 48),
        })
    }
}

impl Reply {
    /// The guest's OK answer to `q` (for the checkers' tests).
    #[cfg(test)]
    pub(crate) fn ok_to(q: &Request, value: u64, version: u64) -> Reply {
        Reply {
            op: q.op,
            status: STATUS_OK,
            client: q.client,
            req: q.req,
            key: q.key,
            value,
            version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_layout() {
        let q = Request {
            op: Op::Put,
            client: 7,
            req: 9,
            key: 3,
            value: 0xdead_beef,
        };
        let b = q.encode();
        assert_eq!(&b[0..4], b"1SVK");
        assert_eq!(b[4], 1);
        assert_eq!(Request::decode(&b), Ok(q));
        let r = Reply {
            op: Op::Get,
            status: STATUS_OK,
            client: 7,
            req: 9,
            key: 3,
            value: 5,
            version: 2,
        };
        let b = r.encode();
        assert_eq!(b[4], 0x82);
        assert_eq!(u64_at(&b, 48), 2);
        assert_eq!(Reply::decode(&b), Ok(r));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(Reply::decode(&[]), Err(WireError::Length(0)));
        assert_eq!(Reply::decode(&[0; 56]), Err(WireError::Magic(0)));
        let mut b = Reply {
            op: Op::Put,
            status: 0,
            client: 1,
            req: 1,
            key: 1,
            value: 1,
            version: 1,
        }
        .encode();
        b[4] = 0x01; // no reply bit
        assert!(matches!(Reply::decode(&b), Err(WireError::Op(1))));
        b[4] = 0x83;
        assert!(matches!(Reply::decode(&b), Err(WireError::Op(0x83))));
        b[4] = 0x81;
        b[12] = 1;
        assert!(matches!(Reply::decode(&b), Err(WireError::Pad(1))));
        let q = Request {
            op: Op::Get,
            client: 1,
            req: 1,
            key: 1,
            value: 0,
        }
        .encode();
        assert!(Reply::decode(&q).is_err());
        for n in 0..200 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = Reply::decode(&junk);
            let _ = Request::decode(&junk);
        }
    }
}
