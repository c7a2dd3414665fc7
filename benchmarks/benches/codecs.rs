//! Criterion microbenchmarks of fgbi's building blocks on one 4 KiB page.
use criterion::{criterion_main, Criterion, Throughput};
use fgbi::codec::xor_rle_encode;

fn page(seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..512)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s.to_le_bytes()
        })
        .collect()
}

fn codecs(c: &mut Criterion) {
    let old = page(1);
    let mut new5 = old.clone();
    for i in (0..512).step_by(20) {
        new5[i * 8] ^= 0x5A; // 5 % of the words
    }
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("memcpy", |b| {
        let mut dst = vec![0u8; 4096];
        b.iter(|| dst.copy_from_slice(std::hint::black_box(&new5)))
    });
    g.bench_function("xor_rle_encode 5%", |b| {
        let mut out = Vec::with_capacity(8192);
        b.iter(|| {
            out.clear();
            xor_rle_encode(&old, std::hint::black_box(&new5), &mut out, 4096)
        })
    });
    g.bench_function("blake3 keyed 64 B blocks", |b| {
        b.iter(|| {
            std::hint::black_box(&new5)
                .chunks_exact(64)
                .map(|c| blake3::keyed_hash(&[7; 32], c).as_bytes()[0] as u64)
                .sum::<u64>()
        })
    });
    g.bench_function("lz4 random page", |b| {
        b.iter(|| lz4_flex::block::compress(std::hint::black_box(&new5)))
    });
    g.finish();
}

// criterion_group! generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::codecs);
}
use group::benches;
criterion_main!(benches);
