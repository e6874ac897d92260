//! Turning a chunk's raw bytes into a frame payload: hash (BLAKE3 of the raw bytes, which the
//! receiver checks), all-zero detection, and zstd when the compression decision says so or
//! when the chunk is sampled to measure zstd for `auto` ([`crate::compress`]; a sampled chunk
//! is sent compressed when that is smaller, the work being done). A compressed form that is
//! not smaller goes raw.
//!
//! The buffers and zstd contexts are reused chunk after chunk ([`Buffers`], one set per data
//! stream): they are the bulk of the sender's memory, which therefore does not grow with the
//! transfer. Payloads leave as `Bytes` without a copy: borrowed (mapped or in-memory) bytes
//! as they are, buffers through the shared [`BufferPool`], which gets them back once quinn
//! dropped them.

use std::io;

use crate::compress::CodecSample;
use crate::io::BufferPool;
use crate::wire::{Codec, Hash};

use super::source::{read_chunk, zero_hash, ChunkSource, RawChunk};

/// Buffers and codec contexts an encoder reuses for every chunk.
pub struct Buffers {
    read: Vec<u8>,
    compressed: Vec<u8>,
    /// Decompression target when sampling (measuring) the codec.
    scratch: Vec<u8>,
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Buffers {
    /// Buffers whose read buffer comes from `pool`.
    pub fn new(pool: &BufferPool) -> Self {
        Buffers {
            read: pool.take(),
            compressed: Vec::new(),
            scratch: Vec::new(),
            compressor: None,
            decompressor: None,
        }
    }
}

/// What to do with one chunk.
#[derive(Debug, Clone, Copy)]
pub struct EncodeChoice {
    /// Compress (the decision of [`crate::compress::AutoDecider`] or a fixed policy).
    pub compress: bool,
    /// Measure zstd on this chunk even if it is not sent compressed.
    pub sample: bool,
    pub level: i32,
}

/// One encoded chunk; its payload is taken with [`Encoded::take_payload`].
pub struct Encoded {
    pub codec: Codec,
    pub hash: Hash,
    pub sample: Option<CodecSample>,
    payload: Payload,
}

enum Payload {
    /// `Codec::Zero`: nothing.
    Empty,
    /// The raw bytes in `Buffers::read`.
    ReadBuffer,
    /// The zstd frame in `Buffers::compressed`.
    Compressed,
    /// Mapped or in-memory raw bytes.
    Borrowed(bytes::Bytes),
}

impl Encoded {
    /// The frame payload. A buffer leaves with it (quinn holds it until acknowledged) and
    /// `bufs` gets a pooled one for the next chunk.
    pub fn take_payload(self, bufs: &mut Buffers, pool: &BufferPool) -> bytes::Bytes {
        match self.payload {
            Payload::Empty => bytes::Bytes::new(),
            Payload::Borrowed(b) => b,
            Payload::ReadBuffer => pool.into_bytes(std::mem::replace(&mut bufs.read, pool.take())),
            Payload::Compressed => pool.into_bytes(std::mem::take(&mut bufs.compressed)),
        }
    }
}

/// Reads, hashes and (maybe) compresses one chunk. Runs on a blocking thread. A source that
/// vanished or shrank since the scan fails with an error that
/// [`super::source::source_gone`] recognises.
pub fn encode_chunk(
    source: &ChunkSource,
    offset: u64,
    len: u64,
    choice: EncodeChoice,
    bufs: &mut Buffers,
) -> io::Result<Encoded> {
    let Buffers {
        read,
        compressed,
        scratch,
        compressor,
        decompressor,
    } = bufs;
    let borrowed = match read_chunk(source, offset, len, read)? {
        RawChunk::Hole => {
            return Ok(Encoded {
                codec: Codec::Zero,
                hash: zero_hash(len),
                sample: None,
                payload: Payload::Empty,
            })
        }
        RawChunk::InBuffer => None,
        RawChunk::Borrowed(b) => Some(b),
    };
    let raw: &[u8] = borrowed.as_deref().unwrap_or(&read[..]);
    let hash = *blake3::hash(raw).as_bytes();
    let raw_payload = |borrowed: Option<bytes::Bytes>| match borrowed {
        Some(b) => Payload::Borrowed(b),
        None => Payload::ReadBuffer,
    };
    if raw.iter().all(|b| *b == 0) {
        return Ok(Encoded {
            codec: Codec::Zero,
            hash,
            sample: None,
            payload: Payload::Empty,
        });
    }
    if !choice.sample && scratch.capacity() > 0 {
        *scratch = Vec::new(); // sampling is over for now: give the memory back
    }
    if !choice.compress && !choice.sample {
        return Ok(Encoded {
            codec: Codec::Raw,
            hash,
            sample: None,
            payload: raw_payload(borrowed),
        });
    }
    // Contexts and buffers are made before the clocks start: a sample times zstd's work on
    // the chunk, not the one-off setup, which on small files of source text weighed enough
    // to pull the breakpoint under `compress::OPTIMISTIC_LINK` (bench/RESULTS.md, "WAN auto
    // matrix": the start then went raw until the link was measured).
    compressed.clear();
    compressed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    if compressor.as_ref().map(|(l, _)| *l) != Some(choice.level) {
        *compressor = Some((choice.level, zstd::bulk::Compressor::new(choice.level)?));
    }
    if choice.sample && decompressor.is_none() {
        *decompressor = Some(zstd::bulk::Decompressor::new()?);
    }
    let (_, comp) = compressor
        .as_mut()
        .ok_or_else(|| io::Error::other("no compressor"))?;
    let t0 = thread_cpu_secs();
    comp.compress_to_buffer(raw, compressed)?;
    let compress_secs = thread_cpu_secs() - t0;
    let mut sample = None;
    if choice.sample {
        let dec = decompressor
            .as_mut()
            .ok_or_else(|| io::Error::other("no decompressor"))?;
        let t1 = thread_cpu_secs();
        crate::compress::decompress_into(dec, compressed, len, scratch)
            .map_err(|e| io::Error::other(format!("zstd round trip failed: {e}")))?;
        sample = Some(CodecSample {
            raw_bytes: len,
            compressed_bytes: (compressed.len() as u64).min(len),
            compress_secs,
            decompress_secs: thread_cpu_secs() - t1,
        });
    }
    // A sampled chunk goes compressed too when that is smaller: the work is done.
    if compressed.len() < raw.len() {
        return Ok(Encoded {
            codec: Codec::Zstd,
            hash,
            sample,
            payload: Payload::Compressed,
        });
    }
    Ok(Encoded {
        codec: Codec::Raw,
        hash,
        sample,
        payload: raw_payload(borrowed),
    })
}

/// CPU time of the calling thread, in seconds. Codec samples are timed in CPU time, not wall
/// time: on a busy machine wall time would charge compression for other processes' work and
/// flip `auto` at random.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(data: &[u8], choice: EncodeChoice) -> (Encoded, bytes::Bytes) {
        let pool = BufferPool::new(2);
        let mut bufs = Buffers::new(&pool);
        let src = ChunkSource::Memory(bytes::Bytes::copy_from_slice(data));
        let e = encode_chunk(&src, 0, data.len() as u64, choice, &mut bufs).unwrap();
        let codec = e.codec;
        let hash = e.hash;
        let sample = e.sample;
        let payload = e.take_payload(&mut bufs, &pool);
        (
            Encoded {
                codec,
                hash,
                sample,
                payload: Payload::Empty,
            },
            payload,
        )
    }

    const RAW: EncodeChoice = EncodeChoice {
        compress: false,
        sample: false,
        level: 3,
    };

    #[test]
    fn text_compresses_noise_goes_raw_zeros_go_empty() {
        let text = b"fn item(x: u64) -> u64 { x }\n".repeat(2000);
        let (e, payload) = encode(
            &text,
            EncodeChoice {
                compress: true,
                ..RAW
            },
        );
        assert_eq!(e.codec, Codec::Zstd);
        assert!(payload.len() < text.len() / 10);
        assert_eq!(
            e.hash,
            *blake3::hash(&text).as_bytes(),
            "hash of the raw bytes"
        );

        // Sampled: measured, and sent compressed since the work is done.
        let (e, payload) = encode(
            &text,
            EncodeChoice {
                sample: true,
                ..RAW
            },
        );
        assert_eq!(e.codec, Codec::Zstd);
        assert!(payload.len() < text.len());
        let s = e.sample.unwrap();
        assert_eq!(s.raw_bytes, text.len() as u64);
        assert!(s.compressed_bytes < s.raw_bytes);

        // Incompressible: raw even when compression is on.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let (e, payload) = encode(
            &noise,
            EncodeChoice {
                compress: true,
                ..RAW
            },
        );
        assert_eq!(e.codec, Codec::Raw);
        assert_eq!(&payload[..], &noise[..]);

        let zeros = vec![0u8; 70_000];
        let (e, payload) = encode(&zeros, RAW);
        assert_eq!(e.codec, Codec::Zero);
        assert!(payload.is_empty());
        assert_eq!(e.hash, zero_hash(70_000));
    }
}
