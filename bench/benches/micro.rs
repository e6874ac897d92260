//! Criterion micro-benchmarks: BLAKE3 (one thread, all threads) and zstd per level on a
//! 4 MiB chunk of a real pack versus a 4 MiB chunk of source-like text.
//!
//! The pack chunk comes from `BENCH_PACK_FILE` if set (any file; its middle 4 MiB are used),
//! otherwise from a small bare fixture generated in a temporary directory with the fixtures
//! library (the pack's middle), or random bytes if git is unavailable.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const CHUNK: usize = 4 << 20;

fn middle(data: &[u8]) -> Vec<u8> {
    if data.len() <= CHUNK {
        return data.to_vec();
    }
    let start = (data.len() - CHUNK) / 2;
    data[start..start + CHUNK].to_vec()
}

fn random_chunk() -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

fn pack_chunk() -> (Vec<u8>, &'static str) {
    if let Ok(p) = std::env::var("BENCH_PACK_FILE") {
        if let Ok(d) = std::fs::read(&p) {
            return (middle(&d), "pack");
        }
        eprintln!("BENCH_PACK_FILE={p} unreadable; generating a fixture");
    }
    let Ok(dir) = tempfile::tempdir() else {
        return (random_chunk(), "random");
    };
    let spec = fixtures::FixtureSpec::new(
        fixtures::Kind::Bare,
        Some(12 << 20),
        dir.path().join("bare"),
    );
    match fixtures::make(&spec) {
        Ok(_) => {
            let packs = dir.path().join("bare/objects/pack");
            let pack = std::fs::read_dir(&packs).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "pack"))
            });
            match pack.and_then(|p| std::fs::read(p).ok()) {
                Some(d) => (middle(&d), "pack"),
                None => (random_chunk(), "random"),
            }
        }
        Err(e) => {
            eprintln!("cannot make a fixture ({e}); using random bytes");
            (random_chunk(), "random")
        }
    }
}

fn text_chunk() -> Vec<u8> {
    use fixtures::rng::Rng;
    use fixtures::text::{FileCtx, Lang, Vocab};
    let mut rng = Rng::new(4);
    let vocab = Vocab::new(&mut rng);
    let mut out = Vec::with_capacity(CHUNK + 65536);
    let mut i = 0u64;
    while out.len() < CHUNK {
        let lang = Lang::ALL[(i % 5) as usize];
        let ctx = FileCtx::new(&vocab, lang, i);
        let size = 2_000 + rng.below(30_000);
        out.extend(ctx.file(&mut rng, size));
        i += 1;
    }
    out.truncate(CHUNK);
    out
}

fn blake3_benches(c: &mut Criterion) {
    let data = random_chunk();
    let big: Vec<u8> = data.iter().cycle().take(64 << 20).copied().collect();
    let mut g = c.benchmark_group("blake3");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(20);
    g.bench_function("update_1_thread_64MiB", |b| {
        b.iter(|| blake3::Hasher::new().update(black_box(&big)).finalize())
    });
    g.bench_function("update_rayon_64MiB", |b| {
        b.iter(|| {
            blake3::Hasher::new()
                .update_rayon(black_box(&big))
                .finalize()
        })
    });
    if let Ok(f) = tempfile::NamedTempFile::new() {
        if std::fs::write(f.path(), &big).is_ok() {
            g.bench_function("update_mmap_rayon_64MiB_file", |b| {
                b.iter(|| {
                    let mut h = blake3::Hasher::new();
                    h.update_mmap_rayon(f.path()).map(|h| h.finalize())
                })
            });
        }
    }
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("update_1_thread_4MiB_chunk", |b| {
        b.iter(|| blake3::hash(black_box(&data)))
    });
    g.finish();
}

fn zstd_benches(c: &mut Criterion) {
    let (pack, pack_name) = pack_chunk();
    let text = text_chunk();
    for (name, data) in [(pack_name, &pack), ("text", &text)] {
        let mut g = c.benchmark_group(format!("zstd_{name}_4MiB"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        for level in [1, 3, 9, 19] {
            g.sample_size(if level >= 19 { 10 } else { 20 });
            let compressed = zstd::bulk::compress(data, level).unwrap_or_default();
            eprintln!(
                "zstd-{level} on {name}: {} -> {} bytes ({:.2}x)",
                data.len(),
                compressed.len(),
                data.len() as f64 / compressed.len().max(1) as f64
            );
            let mut comp = zstd::bulk::Compressor::new(level).ok();
            g.bench_with_input(BenchmarkId::new("compress", level), data, |b, d| {
                b.iter(|| comp.as_mut().map(|c| c.compress(black_box(d))))
            });
            let mut dec = zstd::bulk::Decompressor::new().ok();
            g.bench_with_input(
                BenchmarkId::new("decompress", level),
                &compressed,
                |b, z| b.iter(|| dec.as_mut().map(|d| d.decompress(black_box(z), CHUNK))),
            );
        }
        g.finish();
    }
}

/// The wire format's hot path: one chunk header per chunk, control frames per message.
fn frame_benches(c: &mut Criterion) {
    use transfer::wire::{ChunkHeader, Codec, ControlMsg};
    let header = ChunkHeader {
        file: 12,
        chunk: 3456,
        offset: 3456 << 21,
        raw_len: 2 << 20,
        codec: Codec::Raw,
        payload_len: 2 << 20,
        hash: [7; 32],
    };
    let encoded = header.encode();
    let mut g = c.benchmark_group("frames");
    g.bench_function("chunk header encode", |b| {
        b.iter(|| std::hint::black_box(header.encode()))
    });
    g.bench_function("chunk header decode", |b| {
        b.iter(|| ChunkHeader::decode(std::hint::black_box(&encoded)).expect("valid"))
    });
    let progress = ControlMsg::Progress {
        verified_chunks: 1,
        verified_bytes: 2,
        wire_bytes: 3,
    };
    let mut frame = Vec::new();
    progress.encode_frame(&mut frame);
    g.bench_function("control frame decode", |b| {
        b.iter(|| ControlMsg::decode_body(std::hint::black_box(&frame[4..])).expect("valid"))
    });
    g.finish();
}

/// The `auto` decision runs once per chunk encoded: it must cost nothing next to a chunk.
fn auto_decision_benches(c: &mut Criterion) {
    use transfer::compress::{AutoDecider, CodecSample, CompressPolicy, Handed};
    let mut d = AutoDecider::new(CompressPolicy::Auto, None, 16 << 20);
    for _ in 0..4 {
        d.add_sample(CodecSample {
            raw_bytes: 2 << 20,
            compressed_bytes: 1 << 20,
            compress_secs: 0.01,
            decompress_secs: 0.003,
        });
    }
    let handed = |wire| Handed {
        wire_compressed: wire,
        raw_compressed: 2 * wire,
        wire_plain: 0,
    };
    d.observe_progress(0.0, handed(8 << 20), 0, 0.02, true);
    d.observe_progress(1.0, handed(108 << 20), 100_000_000, 0.02, true);
    c.bench_function("auto decide", |b| {
        b.iter(|| std::hint::black_box(d.decide()))
    });
    // Once per frame a writer hands to quinn.
    c.bench_function("auto write delay", |b| {
        b.iter(|| std::hint::black_box(d.write_delay(1.1, std::hint::black_box(110 << 20), 0)))
    });
}

criterion_group!(
    benches,
    blake3_benches,
    zstd_benches,
    frame_benches,
    auto_decision_benches
);
criterion_main!(benches);
