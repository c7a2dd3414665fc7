//! Writing whole-page records (see the crate documentation for the format),
//! shared by every mode. Each writer counts its record in [`EncodeStats`].

use crate::codec::put_varint;
use crate::{kind, PAGE_SIZE};

/// Running totals of the encoder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages given to [`crate::Encoder::encode_page`].
    pub pages: u64,
    /// Bytes of records produced.
    pub bytes_out: u64,
    /// Pages whose content had not changed (no record).
    pub unchanged: u64,
    /// `ZeroPage` records.
    pub zero_pages: u64,
    /// `RawPage` records.
    pub raw_pages: u64,
    /// `Lz4Page` records.
    pub lz4_pages: u64,
    /// `XorPage` records.
    pub xor_pages: u64,
    /// `Blocks` records.
    pub block_pages: u64,
    /// Blocks sent as references.
    pub ref_blocks: u64,
    /// `CopyPage` records (whole duplicated pages).
    pub copy_pages: u64,
    /// Pages encoded against a held copy (fgbi mode only).
    pub copy_hits: u64,
    /// Pages encoded against held digests (fgbi mode only).
    pub digest_hits: u64,
    /// Pages the encoder had forgotten, encoded with every block counted as
    /// changed (fgbi mode only).
    pub misses: u64,
}

/// Appends a record header: the page and the record kind.
pub(crate) fn header(page: u64, k: u8, out: &mut Vec<u8>) {
    put_varint(out, page);
    out.push(k);
}

/// Appends a `RawPage` record.
pub(crate) fn raw(page: u64, data: &[u8], stats: &mut EncodeStats, out: &mut Vec<u8>) {
    header(page, kind::RAW_PAGE, out);
    out.extend_from_slice(data);
    stats.raw_pages += 1;
}

/// Appends a `ZeroPage` record.
pub(crate) fn zero(page: u64, stats: &mut EncodeStats, out: &mut Vec<u8>) {
    header(page, kind::ZERO_PAGE, out);
    stats.zero_pages += 1;
}

/// Appends an `XorPage` record whose body is `delta` (an XOR-RLE delta).
pub(crate) fn xor(page: u64, delta: &[u8], stats: &mut EncodeStats, out: &mut Vec<u8>) {
    header(page, kind::XOR_PAGE, out);
    put_varint(out, delta.len() as u64);
    out.extend_from_slice(delta);
    stats.xor_pages += 1;
}

/// Appends a `CopyPage` record: `page` becomes a copy of page `src`.
pub(crate) fn copy(page: u64, src: u64, stats: &mut EncodeStats, out: &mut Vec<u8>) {
    header(page, kind::COPY_PAGE, out);
    put_varint(out, src);
    stats.copy_pages += 1;
}

/// The whole page as one record: lz4 when that is smaller than raw, else raw.
/// Holds the lz4 output between [`WholePage::prepare`] and [`WholePage::emit`].
pub(crate) struct WholePage {
    lz4: Vec<u8>,
    len: usize,
    kind: u8,
}

impl WholePage {
    pub(crate) fn new() -> Self {
        WholePage {
            lz4: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            len: PAGE_SIZE,
            kind: kind::RAW_PAGE,
        }
    }

    /// Compresses `data`; returns the length of the record body [`Self::emit`]
    /// will write for it, less the length varint (lz4 is chosen only when
    /// its body, varint included, is smaller than raw).
    pub(crate) fn prepare(&mut self, data: &[u8]) -> usize {
        (self.len, self.kind) = match lz4_flex::block::compress_into(data, &mut self.lz4) {
            Ok(n) if n + 3 < PAGE_SIZE => (n, kind::LZ4_PAGE),
            _ => (PAGE_SIZE, kind::RAW_PAGE),
        };
        self.len
    }

    /// Whether [`Self::prepare`] chose lz4.
    pub(crate) fn is_lz4(&self) -> bool {
        self.kind == kind::LZ4_PAGE
    }

    /// Appends the record for `data`, which [`Self::prepare`] was last given.
    pub(crate) fn emit(&self, page: u64, data: &[u8], stats: &mut EncodeStats, out: &mut Vec<u8>) {
        if self.is_lz4() {
            header(page, kind::LZ4_PAGE, out);
            put_varint(out, self.len as u64);
            out.extend_from_slice(&self.lz4[..self.len]);
            stats.lz4_pages += 1;
        } else {
            raw(page, data, stats, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::get_varint;

    #[test]
    fn records_have_their_documented_layout() {
        let mut st = EncodeStats::default();
        let mut out = Vec::new();
        zero(300, &mut st, &mut out);
        assert_eq!(out, [0xAC, 0x02, kind::ZERO_PAGE]);
        out.clear();
        copy(1, 2, &mut st, &mut out);
        assert_eq!(out, [1, kind::COPY_PAGE, 2]);
        out.clear();
        xor(5, &[0, 1, 9], &mut st, &mut out);
        assert_eq!(out, [5, kind::XOR_PAGE, 3, 0, 1, 9]);
        out.clear();
        raw(7, &[3; PAGE_SIZE], &mut st, &mut out);
        assert_eq!(out.len(), 2 + PAGE_SIZE);
        assert_eq!(
            (st.zero_pages, st.copy_pages, st.xor_pages, st.raw_pages),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn whole_page_is_lz4_only_when_smaller_than_raw() {
        let mut w = WholePage::new();
        let mut st = EncodeStats::default();
        // Compressible: lz4, and the body decodes back.
        let text: Vec<u8> = (0..PAGE_SIZE).map(|i| b"abcd"[i % 4]).collect();
        let n = w.prepare(&text);
        assert!(w.is_lz4() && n + 3 < PAGE_SIZE);
        let mut out = Vec::new();
        w.emit(9, &text, &mut st, &mut out);
        assert_eq!(&out[..2], [9, kind::LZ4_PAGE]);
        let mut pos = 2;
        assert_eq!(get_varint(&out, &mut pos).unwrap(), n as u64);
        let back = lz4_flex::block::decompress(&out[pos..], PAGE_SIZE).unwrap();
        assert_eq!(back, text);
        // Incompressible: raw.
        let mut s = 1u64;
        let rnd: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        assert_eq!(w.prepare(&rnd), PAGE_SIZE);
        assert!(!w.is_lz4());
        out.clear();
        w.emit(9, &rnd, &mut st, &mut out);
        assert_eq!(out.len(), 2 + PAGE_SIZE);
        assert_eq!((st.lz4_pages, st.raw_pages), (1, 1));
    }
}
