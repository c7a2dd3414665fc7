//! Little-endian reading and writing with one error for running out of
//! input, in the style of quinn-proto's `coding.rs`.

use crate::WireError;

/// Appends fixed-size little-endian values and length-prefixed bytes.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// A `u16`.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes of a known length.
    pub fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// `u32` length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
}

/// Reads what [`Writer`] wrote, never past the end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated(field))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated(field))?;
        self.pos = end;
        Ok(s)
    }
    /// A `u8`.
    pub fn u8(&mut self, f: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, f)?[0])
    }
    /// A `u16`.
    pub fn u16(&mut self, f: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, f)?.try_into().expect("2")))
    }
    /// A `u32`.
    pub fn u32(&mut self, f: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().expect("4")))
    }
    /// A `u64`.
    pub fn u64(&mut self, f: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().expect("8")))
    }
    /// `N` raw bytes.
    pub fn array<const N: usize>(&mut self, f: &'static str) -> Result<[u8; N], WireError> {
        Ok(self.take(N, f)?.try_into().expect("N"))
    }
    /// Length-prefixed bytes of at most `max`; the length is checked before
    /// anything is allocated.
    pub fn bytes(&mut self, f: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
        let n = self.u32(f)? as usize;
        if n > max {
            return Err(WireError::TooLong {
                field: f,
                len: n as u64,
                max: max as u64,
            });
        }
        Ok(self.take(n, f)?.to_vec())
    }
    /// `n` bytes in place.
    pub fn raw(&mut self, n: usize, f: &'static str) -> Result<&'a [u8], WireError> {
        self.take(n, f)
    }
    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// Fails unless every byte was read.
    pub fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                message: what,
                extra: self.buf.len() - self.pos,
            })
        }
    }
}
