//! How the parts of a checkpoint are represented inside its messages: the
//! machine state's compression, the replica's memory digest, the mode byte.
//! Both daemons use these; nothing else knows the representation.

use crate::WireError;

/// Packs an encoded machine state for a `State` message: lz4, with its
/// uncompressed size first (the state is mostly zeros and repeats).
pub fn pack_state(raw: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(raw)
}

/// Unpacks [`pack_state`]'s output. The declared size is checked against
/// `max` before anything is allocated.
pub fn unpack_state(packed: &[u8], max: usize) -> Result<Vec<u8>, WireError> {
    let (size, _) = lz4_flex::block::uncompressed_size(packed)
        .map_err(|_| WireError::Truncated("State: the size of the machine state"))?;
    if size > max {
        return Err(WireError::TooLong {
            field: "State: the machine state",
            len: size as u64,
            max: max as u64,
        });
    }
    lz4_flex::block::decompress_size_prepended(packed).map_err(|_| WireError::BadValue {
        field: "State: lz4 data of the machine state",
        value: packed.len() as u64,
    })
}

/// The memory digest of a checkpoint (`Commit.memory_digest`): blake3 over
/// the pages it wrote, in the order they were written (ascending frame
/// numbers for castor's encoder). The primary hashes its copies, the backup
/// its replica after applying.
pub fn memory_digest<'a>(pages: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in pages {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// The `Hello.mode` byte of an encoding mode.
pub fn mode_byte(mode: fgbi::Mode) -> u8 {
    match mode {
        fgbi::Mode::Remus => 0,
        fgbi::Mode::Xbzrle => 1,
        fgbi::Mode::Fgbi => 2,
    }
}

/// The encoding mode of a `Hello.mode` byte.
pub fn mode_from_byte(b: u8) -> Result<fgbi::Mode, WireError> {
    match b {
        0 => Ok(fgbi::Mode::Remus),
        1 => Ok(fgbi::Mode::Xbzrle),
        2 => Ok(fgbi::Mode::Fgbi),
        _ => Err(WireError::BadValue {
            field: "Hello.mode",
            value: b.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_hostile_sizes_are_refused_before_allocating() {
        let raw: Vec<u8> = (0..10_000u32).map(|i| (i % 7) as u8).collect();
        let packed = pack_state(&raw);
        assert!(packed.len() < raw.len());
        assert_eq!(unpack_state(&packed, raw.len()).unwrap(), raw);
        assert!(matches!(
            unpack_state(&packed, raw.len() - 1),
            Err(WireError::TooLong { .. })
        ));
        // A claimed 4 GiB state in 4 bytes.
        let e = unpack_state(&[0xff, 0xff, 0xff, 0xff, 0], 1 << 20).unwrap_err();
        assert!(e.to_string().contains("machine state"), "{e}");
        assert!(unpack_state(&[1, 2], 100).is_err());
        let mut bad = packed.clone();
        bad.truncate(packed.len() / 2);
        assert!(unpack_state(&bad, raw.len()).is_err());
    }

    #[test]
    fn mode_byte_both_ways() {
        for m in [fgbi::Mode::Remus, fgbi::Mode::Xbzrle, fgbi::Mode::Fgbi] {
            assert_eq!(mode_from_byte(mode_byte(m)).unwrap(), m);
        }
        assert!(mode_from_byte(3)
            .unwrap_err()
            .to_string()
            .contains("Hello.mode"));
    }

    #[test]
    fn digest_is_over_the_pages_in_order() {
        let (a, b) = ([1u8; 4096], [2u8; 4096]);
        assert_eq!(
            memory_digest([&a[..], &b[..]]),
            memory_digest([&a[..], &b[..]])
        );
        assert_ne!(
            memory_digest([&a[..], &b[..]]),
            memory_digest([&b[..], &a[..]])
        );
    }
}
