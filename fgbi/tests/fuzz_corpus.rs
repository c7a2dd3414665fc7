//! The `fgbi_apply` fuzz target's checked-in seeds, replayed on stable as an
//! ordinary test through the same function the fuzz target runs
//! (`fgbi::fuzzing::apply_target`), plus any local libFuzzer corpus in
//! `fuzz/corpus/fgbi_apply`.
//!
//! The seeds are made by the encoder (below): valid epochs in every mode and
//! from a fresh encoder and as deltas, then truncated and mutated copies.
//! `CASTOR_WRITE_SEEDS=1 cargo test -p castor-fgbi --test fuzz_corpus`
//! rewrites them after a format change.

use std::path::{Path, PathBuf};

use castor_fgbi::fuzzing::{apply_target, initial_replica, BLOCK_SIZES, REPLICA_PAGES};
use castor_fgbi::{Config, Encoder, Mode, PAGE_SIZE};

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join("fgbi_apply")
}

fn files(d: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(d) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// An epoch encoded in `mode`, and the memory it describes. `delta`: the
/// encoder first learns the fuzz replica's contents, so it may send XORs and
/// references against them, and applying the epoch to that replica must give
/// exactly the memory returned; otherwise a fresh encoder (which assumes a
/// freshly booted, all-zero backup) describes it.
fn epoch(mode: Mode, block_size: usize, delta: bool) -> (Vec<u8>, Vec<u8>) {
    let cfg = Config {
        mode,
        block_size,
        budget_bytes: 64 * PAGE_SIZE as u64,
        key: [3; 32],
    };
    let mut enc = Encoder::new(cfg, REPLICA_PAGES as u64).unwrap();
    let mut src = initial_replica();
    let page = |m: &[u8], p: usize| -> [u8; PAGE_SIZE] {
        m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap()
    };
    if delta {
        let mut ignored = Vec::new();
        for p in 0..REPLICA_PAGES {
            enc.encode_page(p as u64, &page(&src, p), &mut ignored);
        }
    }
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    // Sparse 8-byte writes on pages 0-3 (XOR-RLE, small diffs).
    for _ in 0..24 {
        let w = (xorshift(&mut s) as usize) % (4 * PAGE_SIZE / 8);
        src[w * 8..w * 8 + 8].copy_from_slice(&xorshift(&mut s).to_le_bytes());
    }
    // Page 5 zeroed; page 6 fresh noise (raw); page 7 text-like (lz4).
    src[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0);
    for c in src[6 * PAGE_SIZE..7 * PAGE_SIZE].chunks_exact_mut(8) {
        c.copy_from_slice(&xorshift(&mut s).to_le_bytes());
    }
    for (i, b) in src[7 * PAGE_SIZE..8 * PAGE_SIZE].iter_mut().enumerate() {
        *b = b"castor seq=42 ops=17 "[i % 21];
    }
    // Content moved: page 9's first half copied into page 10 (references).
    src.copy_within(9 * PAGE_SIZE..9 * PAGE_SIZE + 2048, 10 * PAGE_SIZE + 512);
    let mut out = Vec::new();
    for p in [0usize, 1, 2, 3, 5, 6, 7, 10] {
        enc.encode_page(p as u64, &page(&src, p), &mut out);
    }
    (out, src)
}

/// The seeds: name and bytes (selector byte first).
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (mode, name) in [
        (Mode::Remus, "remus"),
        (Mode::Xbzrle, "xbzrle"),
        (Mode::Fgbi, "fgbi"),
    ] {
        for (sel, bs) in [(0u8, 64usize), (4, 1024)] {
            assert_eq!(BLOCK_SIZES[sel as usize], bs);
            for delta in [false, true] {
                if mode == Mode::Remus && (delta || bs != 64) {
                    continue; // remus ignores both
                }
                let (e, _) = epoch(mode, bs, delta);
                let what = if delta { "delta" } else { "full" };
                let mut seed = vec![sel];
                seed.extend_from_slice(&e);
                v.push((format!("valid-{name}-{what}-bs{bs}"), seed.clone()));
                if mode == Mode::Fgbi || !delta {
                    let cut = seed[..seed.len() / 2].to_vec();
                    v.push((format!("truncated-{name}-{what}-bs{bs}"), cut));
                    let mut m = seed.clone();
                    let n = m.len();
                    for i in [1, n / 3, n / 2, n - 1] {
                        m[i] ^= 0x5a;
                    }
                    v.push((format!("mutated-{name}-{what}-bs{bs}"), m));
                }
            }
        }
    }
    v.push(("empty-epoch".into(), vec![2]));
    v
}

#[test]
fn generated_seeds_apply_exactly() {
    for (mode, bs, delta) in [
        (Mode::Remus, 64, false),
        (Mode::Xbzrle, 64, true),
        (Mode::Xbzrle, 1024, true),
        (Mode::Fgbi, 64, true),
        (Mode::Fgbi, 1024, true),
    ] {
        let (e, want) = epoch(mode, bs, delta);
        let sel = BLOCK_SIZES.iter().position(|&b| b == bs).unwrap() as u8;
        let mut input = vec![sel];
        input.extend_from_slice(&e);
        let got = apply_target(&input).unwrap();
        got.result
            .unwrap_or_else(|err| panic!("{mode} bs {bs} delta {delta}: {err}"));
        assert!(
            got.replica == want,
            "{mode} bs {bs} delta {delta}: replica differs"
        );
    }
}

#[test]
fn checked_in_seeds_replay() {
    let seeds_dir = dir("seeds");
    if std::env::var_os("CASTOR_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&seeds_dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(seeds_dir.join(name), bytes).unwrap();
        }
    }
    let seeds = files(&seeds_dir);
    assert!(
        seeds.len() >= 10,
        "{}: {} seeds",
        seeds_dir.display(),
        seeds.len()
    );
    let (mut valid, mut refused) = (0, 0);
    for path in seeds.iter().chain(files(&dir("corpus")).iter()) {
        let data = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // apply_target panics where the fuzz target would report a crash.
        let applied = std::panic::catch_unwind(|| apply_target(&data))
            .unwrap_or_else(|_| panic!("{}: the fuzz target panics", path.display()));
        let Some(applied) = applied else { continue };
        if name.starts_with("valid-") || name == "empty-epoch" {
            applied
                .result
                .as_ref()
                .unwrap_or_else(|e| panic!("{name} is refused: {e}"));
            valid += 1;
        }
        if name.starts_with("truncated-") {
            assert!(applied.result.is_err(), "{name} was applied");
            assert!(applied.replica == initial_replica());
            refused += 1;
        }
    }
    assert!(
        valid >= 5 && refused >= 3,
        "{valid} valid, {refused} truncated"
    );
}
