//! fgbi on synthetic traces, every mode side by side, with the memcpy of the
//! same dirty pages measured in the same run. Prints a markdown table.
//!
//! Run: `cargo bench -p castor-benchmarks --bench fgbi`
//! (`CASTOR_FGBI_TRACE=NAME` runs only the traces whose name contains NAME).
//!
//! Each trace has a memory image, a first epoch (the initial copy, not
//! measured) and then measured epochs of dirty pages. Bytes are per dirty
//! page; GB/s are dirty-page bytes per second on one core.

use std::time::Instant;

use fgbi::{apply, Config, Encoder, Mode, PAGE_SIZE};

const PAGES: usize = 16384; // 64 MiB image
const DIRTY: usize = 8192; // dirty pages per epoch
const EPOCHS: usize = 4;
const WARMUP: usize = 2; // epochs run before measuring, so adaptive state settles

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fill_random(p: &mut [u8], r: &mut Rng) {
    for c in p.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
}

fn fill_text(p: &mut [u8], r: &mut Rng) {
    const WORDS: &[&str] = &[
        "the ",
        "replica ",
        "page ",
        "of ",
        "memory ",
        "checkpoint ",
        "backup ",
        "and ",
        "epoch ",
        "a ",
    ];
    let mut i = 0;
    while i < p.len() {
        let w = WORDS[(r.next() % WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(p.len() - i);
        p[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// A trace: how the image starts, and how an epoch changes it (returns dirty pages).
struct Trace {
    name: &'static str,
    budget_pages: usize,
    init: fn(&mut [u8], &mut Rng),
    epoch: fn(&mut [u8], &mut Rng, usize) -> Vec<usize>,
}

fn init_random(mem: &mut [u8], r: &mut Rng) {
    fill_random(mem, r)
}
fn init_text(mem: &mut [u8], r: &mut Rng) {
    for p in mem.chunks_exact_mut(PAGE_SIZE) {
        fill_text(p, r);
    }
}

fn scattered(mem: &mut [u8], r: &mut Rng, pct: u64, ws_pages: usize, e: usize) -> Vec<usize> {
    // DIRTY pages from a working set of ws_pages, rotating each epoch.
    let start = (e * DIRTY) % ws_pages;
    let pages: Vec<usize> = (0..DIRTY).map(|i| (start + i) % ws_pages).collect();
    let words = PAGE_SIZE / 8;
    let n = (words as u64 * pct / 100).max(1);
    for &p in &pages {
        for _ in 0..n {
            let w = (r.next() % words as u64) as usize;
            let o = p * PAGE_SIZE + w * 8;
            mem[o..o + 8].copy_from_slice(&r.next().to_le_bytes());
        }
    }
    pages
}

fn traces() -> Vec<Trace> {
    vec![
        Trace {
            name: "scattered 1 %",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| scattered(m, r, 1, DIRTY, 0),
        },
        Trace {
            name: "scattered 5 %",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| scattered(m, r, 5, DIRTY, 0),
        },
        Trace {
            name: "scattered 20 %",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| scattered(m, r, 20, DIRTY, 0),
        },
        Trace {
            name: "scattered 50 %",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| scattered(m, r, 50, DIRTY, 0),
        },
        Trace {
            name: "random pages",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| {
                let v: Vec<usize> = (0..DIRTY).collect();
                for &p in &v {
                    fill_random(&mut m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], r);
                }
                v
            },
        },
        Trace {
            name: "zeroed pages",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, e| {
                let v: Vec<usize> = (0..DIRTY).collect();
                for &p in &v {
                    if e % 2 == 0 {
                        m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0);
                    } else {
                        fill_random(&mut m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], r);
                    }
                }
                v
            },
        },
        Trace {
            name: "duplicated pages",
            budget_pages: PAGES * 5 / 4,
            init: init_random,
            epoch: |m, r, _| {
                // Pages in the first half take copies of pages in the second half.
                let v: Vec<usize> = (0..DIRTY).collect();
                for &p in &v {
                    let s = PAGES / 2 + (r.next() % (PAGES / 2) as u64) as usize;
                    m.copy_within(s * PAGE_SIZE..(s + 1) * PAGE_SIZE, p * PAGE_SIZE);
                }
                v
            },
        },
        Trace {
            name: "text pages",
            budget_pages: PAGES * 5 / 4,
            init: init_text,
            epoch: |m, r, _| {
                let v: Vec<usize> = (0..DIRTY).collect();
                for &p in &v {
                    fill_text(&mut m[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], r);
                }
                v
            },
        },
        Trace {
            name: "5 %, working set 4x budget",
            budget_pages: PAGES / 4,
            init: init_random,
            epoch: |m, r, e| scattered(m, r, 5, PAGES, e),
        },
    ]
}

#[derive(Clone)]
struct Row {
    hits: String,
    bytes_per_page: f64,
    encode_gbs: f64,
    apply_gbs: f64,
    memcpy_gbs: f64,
}

fn measure(t: &Trace, mode: Mode) -> Row {
    let mut r = Rng(0x1234_5678_9ABC_DEF1);
    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
    (t.init)(&mut mem, &mut r);
    let cfg = Config {
        mode,
        block_size: 64,
        budget_bytes: (t.budget_pages * PAGE_SIZE) as u64,
        key: [42; 32],
    };
    let mut enc = Encoder::new(cfg, PAGES as u64).unwrap();
    let mut replica = vec![0u8; PAGES * PAGE_SIZE];
    let mut out = Vec::with_capacity(PAGES * (PAGE_SIZE + 8));
    for p in 0..PAGES {
        enc.encode_page(
            p as u64,
            mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap(),
            &mut out,
        );
    }
    apply(&mut replica, 64, &out).unwrap();
    for e in 0..WARMUP {
        let dirty = (t.epoch)(&mut mem, &mut r, e + 1);
        out.clear();
        for &p in &dirty {
            enc.encode_page(
                p as u64,
                mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap(),
                &mut out,
            );
        }
        apply(&mut replica, 64, &out).unwrap();
    }
    let before = enc.stats();
    let mut staging = vec![0u8; DIRTY * PAGE_SIZE];
    let (mut bytes, mut pages) = (0usize, 0usize);
    let (mut te, mut ta, mut tm) = (f64::MAX, f64::MAX, f64::MAX);
    for e in 0..EPOCHS {
        let dirty = (t.epoch)(&mut mem, &mut r, WARMUP + e + 1);
        // memcpy of the same pages, same run
        let t0 = Instant::now();
        for (i, &p) in dirty.iter().enumerate() {
            staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                .copy_from_slice(&mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
        }
        tm = tm.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(&staging);
        out.clear();
        let t0 = Instant::now();
        for &p in &dirty {
            enc.encode_page(
                p as u64,
                mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap(),
                &mut out,
            );
        }
        te = te.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        apply(&mut replica, 64, &out).unwrap();
        ta = ta.min(t0.elapsed().as_secs_f64());
        assert!(replica == mem, "{} {mode}: replica differs", t.name);
        bytes += out.len();
        pages += dirty.len();
    }
    let gb = (DIRTY * PAGE_SIZE) as f64 / 1e9;
    let st = enc.stats();
    let n = (st.pages - before.pages).max(1) as f64;
    let hits = if mode == Mode::Remus {
        "-".to_string()
    } else {
        format!(
            "{:.0} / {:.0} / {:.0}",
            100.0 * (st.copy_hits - before.copy_hits) as f64 / n,
            100.0 * (st.digest_hits - before.digest_hits) as f64 / n,
            100.0 * (st.misses - before.misses) as f64 / n
        )
    };
    Row {
        hits,
        bytes_per_page: bytes as f64 / pages as f64,
        encode_gbs: gb / te,
        apply_gbs: gb / ta,
        memcpy_gbs: gb / tm,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("# fgbi: bytes and speed per mode ({} MiB image, {DIRTY} dirty pages an epoch, 64 B blocks, best of {EPOCHS} epochs)\n", (PAGES * PAGE_SIZE) >> 20);
    println!("Budget = 1.25x the image unless the trace says otherwise (fgbi keeps 5 % of it for the sharing index); equal for xbzrle and fgbi. Every epoch's replica is checked equal to the source.\n");
    println!("| trace | mode | bytes/dirty page | vs remus | encode GB/s | apply GB/s | memcpy GB/s | encode time / memcpy | fgbi copy/digest/miss % |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // CASTOR_FGBI_TRACE=text runs only the traces whose name contains "text".
    let only = std::env::var("CASTOR_FGBI_TRACE").unwrap_or_default();
    for t in traces()
        .into_iter()
        .filter(|t| t.name.contains(only.as_str()))
    {
        let remus = measure(&t, Mode::Remus);
        for mode in [Mode::Remus, Mode::Xbzrle, Mode::Fgbi] {
            let row = if mode == Mode::Remus {
                remus.clone()
            } else {
                measure(&t, mode)
            };
            println!(
                "| {} | {mode} | {:.0} | {:.1}x fewer | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                t.name,
                row.bytes_per_page,
                remus.bytes_per_page / row.bytes_per_page,
                row.encode_gbs,
                row.apply_gbs,
                row.memcpy_gbs,
                row.memcpy_gbs / row.encode_gbs,
                if mode == Mode::Fgbi {
                    row.hits.as_str()
                } else {
                    ""
                }
            );
        }
    }
}
