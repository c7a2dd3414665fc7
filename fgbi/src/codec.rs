//! Byte-level codecs: LEB128 varints, the zero test, and XOR-RLE — an
//! XBZRLE-style delta of a new buffer against an old one, as runs of
//! unchanged bytes (skipped) and changed bytes (sent as their new values).
//!
//! XOR-RLE format: repeated `varint(unchanged) varint(changed) changed bytes`.
//! Trailing unchanged bytes are not encoded. Decoding never reads or writes
//! outside the buffers and refuses runs that overflow the target.

use crate::ApplyError;

/// Appends `v` as LEB128.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint (at most 10 bytes) at `*pos`.
#[inline]
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ApplyError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*pos).ok_or(ApplyError::Truncated("varint"))?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err(ApplyError::Malformed("varint overflows 64 bits"));
        }
        v |= ((b & 0x7F) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ApplyError::Malformed("varint longer than 10 bytes"))
}

/// Whether every byte is zero.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Whether two 64-byte chunks are equal (branch-free OR of XORs; vectorises).
#[inline(always)]
pub fn chunk_eq(a: &[u8; 64], b: &[u8; 64]) -> bool {
    let mut acc = 0u64;
    for i in 0..8 {
        acc |= word(a, i * 8) ^ word(b, i * 8);
    }
    acc == 0
}

/// Encodes `new` against `old` (same length, a multiple of 64) into `out`.
/// Returns the number of bytes appended. Stops early and returns `None` once
/// the output would exceed `limit` bytes (the caller then sends something else).
pub fn xor_rle_encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    xor_rle_encode_mask(old, new, out, limit, &mut 0)
}

/// [`xor_rle_encode`], also setting bit `c` of `mask` for every 64-byte
/// chunk `c` that differs (complete only when it returns `Some`; at most 64
/// chunks are tracked).
pub fn xor_rle_encode_mask(
    old: &[u8],
    new: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
    mask: &mut u64,
) -> Option<usize> {
    debug_assert_eq!(old.len(), new.len());
    debug_assert_eq!(new.len() % 64, 0);
    // Runs are assembled in a stack buffer and appended once: per-run
    // `extend_from_slice` calls cost more than the bytes they copy.
    let mut buf = [0u8; 4096 + 64];
    let cap = limit.min(4096) + 32;
    let mut pos = 0usize;
    let n = new.len();
    let (oc, _) = old.as_chunks::<64>();
    let (nc, _) = new.as_chunks::<64>();
    let mut i = 0; // byte offset, a multiple of 8
    let mut last_end = 0usize; // byte offset after the previous changed run
    while i < n {
        if i % 64 == 0 && chunk_eq(&oc[i / 64], &nc[i / 64]) {
            i += 64;
            continue;
        }
        if word(old, i) == word(new, i) {
            i += 8;
            continue;
        }
        // A run of changed words; one equal word inside does not end it
        // (restarting costs two varints, about as much as 8 bytes).
        let mut e = i + 8;
        while e < n {
            if word(old, e) != word(new, e) {
                e += 8;
            } else if e + 8 < n && word(old, e + 8) != word(new, e + 8) {
                e += 16;
            } else {
                break;
            }
        }
        let mut s = i;
        while old[s] == new[s] {
            s += 1;
        }
        let mut t = e;
        while old[t - 1] == new[t - 1] {
            t -= 1;
        }
        for c in s / 64..=(t - 1) / 64 {
            *mask |= 1u64.checked_shl(c as u32).unwrap_or(0);
        }
        let len = t - s;
        if pos + 20 + len > cap {
            return None;
        }
        pos = put_varint_at(&mut buf, pos, (s - last_end) as u64);
        pos = put_varint_at(&mut buf, pos, len as u64);
        buf[pos..pos + len].copy_from_slice(&new[s..t]);
        pos += len;
        last_end = t;
        i = e;
        if pos > limit {
            return None;
        }
    }
    out.extend_from_slice(&buf[..pos]);
    Some(pos)
}

#[inline(always)]
fn put_varint_at(buf: &mut [u8], mut pos: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        buf[pos] = (v as u8) | 0x80;
        v >>= 7;
        pos += 1;
    }
    buf[pos] = v as u8;
    pos + 1
}

/// Checks an XOR-RLE delta against a target of `len` bytes without applying
/// it: the same checks as [`xor_rle_decode`].
pub fn xor_rle_check(delta: &[u8], len: usize) -> Result<(), ApplyError> {
    let mut pos = 0;
    let mut at = 0u64;
    while pos < delta.len() {
        let skip = get_varint(delta, &mut pos)?;
        let n = get_varint(delta, &mut pos)?;
        let e = at
            .checked_add(skip)
            .and_then(|s| s.checked_add(n))
            .ok_or(ApplyError::Malformed("XOR-RLE run overflows"))?;
        if e > len as u64 {
            return Err(ApplyError::Malformed(
                "XOR-RLE run past the end of its target",
            ));
        }
        if n == 0 {
            return Err(ApplyError::Malformed("empty XOR-RLE run"));
        }
        if (delta.len() - pos) < n as usize {
            return Err(ApplyError::Truncated("XOR-RLE literal"));
        }
        pos += n as usize;
        at = e;
    }
    Ok(())
}

/// Applies an XOR-RLE delta to `target` (which holds the old content).
pub fn xor_rle_decode(delta: &[u8], target: &mut [u8]) -> Result<(), ApplyError> {
    let mut pos = 0;
    let mut at = 0usize;
    while pos < delta.len() {
        let skip = get_varint(delta, &mut pos)?;
        let n = get_varint(delta, &mut pos)?;
        let s = (at as u64)
            .checked_add(skip)
            .ok_or(ApplyError::Malformed("XOR-RLE run overflows"))?;
        let e = s
            .checked_add(n)
            .ok_or(ApplyError::Malformed("XOR-RLE run overflows"))?;
        if e > target.len() as u64 {
            return Err(ApplyError::Malformed(
                "XOR-RLE run past the end of its target",
            ));
        }
        if n == 0 {
            return Err(ApplyError::Malformed("empty XOR-RLE run"));
        }
        let (s, e) = (s as usize, e as usize);
        let src = delta
            .get(pos..pos + (e - s))
            .ok_or(ApplyError::Truncated("XOR-RLE literal"))?;
        target[s..e].copy_from_slice(src);
        pos += e - s;
        at = e;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_refuse_garbage() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut p = 0;
            assert_eq!(get_varint(&b, &mut p).unwrap(), v);
            assert_eq!(p, b.len());
        }
        let mut p = 0;
        assert!(get_varint(&[0xFF; 11], &mut p).is_err());
        let mut p = 0;
        assert!(get_varint(&[0x80], &mut p).is_err());
    }

    #[test]
    fn xor_rle_round_trips_and_stays_small() {
        let old = vec![7u8; 4096];
        let mut new = old.clone();
        new[100] = 1;
        new[4095] = 9;
        let mut d = Vec::new();
        let n = xor_rle_encode(&old, &new, &mut d, 4096).unwrap();
        assert!(n <= 8, "{n}");
        let mut t = old.clone();
        xor_rle_decode(&d, &mut t).unwrap();
        assert_eq!(t, new);
        assert_eq!(xor_rle_encode(&old, &old, &mut Vec::new(), 4096), Some(0));
        // Over the limit: nothing appended.
        let rnd: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut d = vec![1, 2];
        assert_eq!(xor_rle_encode(&old, &rnd, &mut d, 100), None);
        assert_eq!(d, vec![1, 2]);
    }

    #[test]
    fn xor_rle_refuses_runs_outside_the_target() {
        let mut t = vec![0u8; 64];
        assert!(xor_rle_decode(&[60, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &mut t).is_err());
        assert!(xor_rle_decode(&[0, 4, 1, 2], &mut t).is_err());
        assert!(xor_rle_decode(&[0, 0], &mut t).is_err());
        assert!(is_zero(&t));
    }
}
