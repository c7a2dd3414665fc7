//! Keyed 128-bit block digests: blake3 `keyed_hash` truncated to 128 bits.
//!
//! Whole pages are hashed with blake3's batched `hash_many` (several blocks
//! per SIMD pass, ~5x the per-call API here). That entry point is public but
//! documented as unstable, so the crate pins blake3's exact version and
//! `tests::batched_equals_keyed_hash` checks it byte for byte.

use blake3::platform::{words_from_le_bytes_32, Platform};

use crate::PAGE_SIZE;

const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const ROOT: u8 = 8;
const KEYED_HASH: u8 = 16;

/// Hashes blocks under the session key.
#[derive(Clone)]
pub(crate) struct Digester {
    key: [u8; 32],
    words: [u32; 8],
    platform: Platform,
}

fn truncate(b: &[u8]) -> u128 {
    u128::from_le_bytes(b[..16].try_into().expect("16 bytes"))
}

impl Digester {
    pub fn new(key: [u8; 32]) -> Self {
        Digester {
            key,
            words: words_from_le_bytes_32(&key),
            platform: Platform::detect(),
        }
    }

    /// The digest of one block.
    pub fn one(&self, block: &[u8]) -> u128 {
        truncate(blake3::keyed_hash(&self.key, block).as_bytes())
    }

    /// The digests of every `bs`-byte block of a page, into `out`.
    pub fn page(&self, data: &[u8; PAGE_SIZE], bs: usize, out: &mut [u128]) {
        match bs {
            64 => self.many::<64>(data, out),
            128 => self.many::<128>(data, out),
            256 => self.many::<256>(data, out),
            512 => self.many::<512>(data, out),
            1024 => self.many::<1024>(data, out),
            _ => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(bs)) {
                    *o = self.one(b);
                }
            }
        }
    }

    fn many<const N: usize>(&self, data: &[u8; PAGE_SIZE], out: &mut [u128]) {
        let (blocks, _) = data.as_chunks::<N>();
        let inputs: Vec<&[u8; N]> = blocks.iter().collect();
        let mut raw = [0u8; 32 * PAGE_SIZE / 64];
        let raw = &mut raw[..32 * inputs.len()];
        self.platform.hash_many(
            &inputs,
            &self.words,
            0,
            blake3::IncrementCounter::No,
            KEYED_HASH,
            CHUNK_START,
            CHUNK_END | ROOT,
            raw,
        );
        for (o, h) in out.iter_mut().zip(raw.chunks_exact(32)) {
            *o = truncate(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_equals_keyed_hash() {
        let key = [0x5Au8; 32];
        let d = Digester::new(key);
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7 + i / 64) as u8;
        }
        for bs in [64, 128, 256, 512, 1024] {
            let mut out = vec![0u128; PAGE_SIZE / bs];
            d.page(&page, bs, &mut out);
            for (i, got) in out.iter().enumerate() {
                let want =
                    truncate(blake3::keyed_hash(&key, &page[i * bs..(i + 1) * bs]).as_bytes());
                assert_eq!(*got, want, "block size {bs}, block {i}");
            }
        }
    }
}
