//! Deterministic check of the encoder's output: runs every mode over seeded
//! synthetic traces and prints a blake3 of all records per (trace, mode,
//! block size, budget) with byte counts and stats. Same output before and
//! after a refactor = same encoding. Every epoch is also applied and checked.
//!
//! Run: `cargo run --release -p castor-fgbi --example golden`

use castor_fgbi::{apply, Config, Encoder, Mode, PAGE_SIZE};

const PAGES: usize = 1024;
const EPOCHS: usize = 8;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn fill_random(p: &mut [u8], r: &mut Rng) {
    for c in p.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
}

fn fill_text(p: &mut [u8], r: &mut Rng) {
    const WORDS: &[&str] = &[
        "the ", "replica ", "page ", "of ", "memory ", "epoch ", "a ",
    ];
    let mut i = 0;
    while i < p.len() {
        let w = WORDS[r.below(WORDS.len())].as_bytes();
        let n = w.len().min(p.len() - i);
        p[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

fn page(mem: &mut [u8], p: usize) -> &mut [u8] {
    &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
}

type Epoch = fn(&mut [u8], &mut Rng, usize) -> Vec<usize>;

fn sparse(mem: &mut [u8], r: &mut Rng, words: usize, ws: usize, e: usize) -> Vec<usize> {
    let n = PAGES / 2;
    let start = (e * n) % ws;
    let pages: Vec<usize> = (0..n).map(|i| (start + i) % ws).collect();
    for &p in &pages {
        for _ in 0..words {
            let w = r.below(PAGE_SIZE / 8);
            let o = p * PAGE_SIZE + w * 8;
            mem[o..o + 8].copy_from_slice(&r.next().to_le_bytes());
        }
    }
    pages
}

fn traces() -> Vec<(&'static str, bool, Epoch)> {
    vec![
        ("sparse words", false, |m, r, e| sparse(m, r, 4, PAGES, e)),
        ("sparse 20%", false, |m, r, e| sparse(m, r, 100, PAGES, e)),
        ("whole rewrites", false, |m, r, _| {
            let v: Vec<usize> = (0..PAGES / 2).map(|_| r.below(PAGES)).collect();
            for &p in &v {
                fill_random(page(m, p), r);
            }
            v
        }),
        ("zero and refill", false, |m, r, e| {
            let v: Vec<usize> = (0..PAGES / 2).collect();
            for &p in &v {
                match (p + e) % 4 {
                    0 => page(m, p).fill(0),
                    1 => {
                        // some zeroed blocks inside a changed page
                        let b = r.below(PAGE_SIZE / 64);
                        page(m, p)[b * 64..b * 64 + 256.min(PAGE_SIZE - b * 64)].fill(0);
                        let w = r.below(PAGE_SIZE / 8);
                        page(m, p)[w * 8..w * 8 + 8].copy_from_slice(&r.next().to_le_bytes());
                    }
                    _ => fill_random(page(m, p), r),
                }
            }
            v
        }),
        ("duplicated pages", false, |m, r, _| {
            let v: Vec<usize> = (0..PAGES / 4).map(|_| r.below(PAGES / 2)).collect();
            for &p in &v {
                let s = PAGES / 2 + r.below(PAGES / 2);
                m.copy_within(s * PAGE_SIZE..(s + 1) * PAGE_SIZE, p * PAGE_SIZE);
            }
            v
        }),
        ("moved runs", false, |m, r, _| {
            let mut v = Vec::new();
            for _ in 0..64 {
                let len = 64 * (1 + r.below(128));
                let src = 64 * r.below((PAGES * PAGE_SIZE - len) / 64);
                let dst = 64 * r.below((PAGES * PAGE_SIZE - len) / 64) + 8 * (r.below(4) / 3);
                let dst = dst.min(PAGES * PAGE_SIZE - len);
                m.copy_within(src..src + len, dst);
                v.extend(dst / PAGE_SIZE..=(dst + len - 1) / PAGE_SIZE);
                // and a small edit somewhere in the copy
                let w = (dst + r.below(len)) & !7;
                if w + 8 <= PAGES * PAGE_SIZE {
                    m[w..w + 8].copy_from_slice(&r.next().to_le_bytes());
                    v.push(w / PAGE_SIZE);
                }
            }
            v.sort_unstable();
            v.dedup();
            v
        }),
        ("text pages", true, |m, r, _| {
            let v: Vec<usize> = (0..PAGES / 2).map(|_| r.below(PAGES)).collect();
            for &p in &v {
                if r.below(2) == 0 {
                    fill_text(page(m, p), r);
                } else {
                    let w = r.below(PAGE_SIZE / 8);
                    page(m, p)[w * 8..w * 8 + 8].copy_from_slice(b"epochs! ");
                }
            }
            v
        }),
        ("repeat same", false, |m, r, _| {
            // dirty pages whose content did not change, and rewritten back
            let v: Vec<usize> = (0..PAGES / 4).map(|_| r.below(PAGES)).collect();
            if r.below(2) == 0 {
                let p = v[0];
                fill_random(page(m, p), r);
            }
            v
        }),
    ]
}

fn main() {
    let mut all = blake3::Hasher::new();
    for (name, text, epoch) in traces() {
        for bs in [64usize, 256] {
            // budget: 1.25x the image, and a quarter of it (working set beyond the budget)
            for budget_pages in [PAGES * 5 / 4, PAGES / 4, 0] {
                for mode in [Mode::Remus, Mode::Xbzrle, Mode::Fgbi] {
                    let mut r = Rng(0x1234_5678_9ABC_DEF1);
                    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
                    for (i, p) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        if i % 7 == 3 {
                            continue; // some zero pages
                        }
                        if text {
                            fill_text(p, &mut r);
                        } else {
                            fill_random(p, &mut r);
                        }
                    }
                    let cfg = Config {
                        mode,
                        block_size: bs,
                        budget_bytes: (budget_pages * PAGE_SIZE) as u64,
                        key: [42; 32],
                    };
                    let mut enc = Encoder::new(cfg, PAGES as u64).unwrap();
                    let mut replica = vec![0u8; PAGES * PAGE_SIZE];
                    let mut h = blake3::Hasher::new();
                    let mut sizes = Vec::new();
                    let mut out = Vec::new();
                    for e in 0..=EPOCHS {
                        let dirty: Vec<usize> = if e == 0 {
                            (0..PAGES).collect()
                        } else {
                            epoch(&mut mem, &mut r, e)
                        };
                        out.clear();
                        for &p in &dirty {
                            enc.encode_page(
                                p as u64,
                                mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap(),
                                &mut out,
                            );
                        }
                        apply(&mut replica, bs, &out).unwrap();
                        assert!(replica == mem, "{name} {mode} bs {bs}: replica differs");
                        h.update(&(out.len() as u64).to_le_bytes());
                        h.update(&out);
                        sizes.push(out.len());
                    }
                    let hash = h.finalize();
                    all.update(hash.as_bytes());
                    println!(
                        "{name:16} {mode:6} bs {bs:4} budget {budget_pages:4}p  {}  bytes {:?}  mem {}",
                        &hash.to_hex()[..16],
                        sizes,
                        enc.memory_bytes()
                    );
                    println!("    {:?}", enc.stats());
                }
            }
        }
    }
    println!("ALL {}", all.finalize().to_hex());
}
