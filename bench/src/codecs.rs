//! Streaming a directory as tar through a codec and back, measuring every stage.
//!
//! The pipeline, all in one thread unless the codec has its own workers:
//! `tar::Builder` (reads the files) -> 1 MiB buffer -> encoder -> byte counter -> decoder ->
//! byte counter. Nothing is stored: memory stays bounded (a few MiB plus the codec's window)
//! whatever the repository size, and a 2 GB repository never sits in RAM. Time spent inside
//! the encoder's and decoder's `write` calls is accumulated separately, so one pass yields
//! tar time, compression time and decompression time. Decompressed bytes are counted and
//! must equal the tar size, a cheap check that every codec round-trips.
//!
//! Slow codecs (zstd -19) can be measured on a sample of the tar stream (evenly spaced
//! 4 MiB blocks adding up to about `limit` bytes) and extrapolated linearly; results say so.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::shardsend_codec::{
    shardsend_decode_chunk, shardsend_encode_chunk, ChunkCodecState, SHARDSEND_CHUNK,
};

/// A candidate way of sending the tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Plain tar.
    None,
    /// gzip (flate2, zlib-rs backend) at a level.
    Gzip(u32),
    /// zstd single-threaded at a level.
    Zstd(i32),
    /// zstd at a level with N worker threads (`zstdmt`).
    ZstdMt(i32, u32),
    /// shardsend's per-chunk zstd -3 on 4 MiB chunks, incompressible chunks raw.
    Shardsend,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => write!(f, "tar"),
            Codec::Gzip(l) => write!(f, "gzip-{l}"),
            Codec::Zstd(l) => write!(f, "zstd-{l}"),
            Codec::ZstdMt(l, n) => write!(f, "zstd-{l}-mt{n}"),
            Codec::Shardsend => write!(f, "shardsend"),
        }
    }
}

/// The default comparison set.
pub const DEFAULT_CODECS: &[Codec] = &[
    Codec::None,
    Codec::Gzip(6),
    Codec::Zstd(1),
    Codec::Zstd(3),
    Codec::Zstd(9),
    Codec::Zstd(19),
    Codec::ZstdMt(3, 2),
    Codec::Shardsend,
];

/// One codec's figures on one input.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub codec: Codec,
    /// Tar stream bytes (input of the codec).
    pub input_bytes: u64,
    /// Bytes on the wire.
    pub output_bytes: u64,
    /// Time to produce the tar stream (reading files), not counting the codec.
    pub tar_secs: f64,
    pub compress_secs: f64,
    pub decompress_secs: f64,
    /// Measured on a prefix and scaled to the whole input.
    pub extrapolated: bool,
}

impl Measurement {
    pub fn saved_bytes(&self) -> i64 {
        self.input_bytes as i64 - self.output_bytes as i64
    }

    /// Link speed (bytes/s) below which this codec beats plain tar, counting compression
    /// and decompression time; `None` if it never does (saves nothing).
    pub fn breakpoint(&self) -> Option<f64> {
        breakpoint(
            self.saved_bytes(),
            self.compress_secs + self.decompress_secs,
        )
    }

    /// Same, counting compression time only (the original runbook's method).
    pub fn breakpoint_compress_only(&self) -> Option<f64> {
        breakpoint(self.saved_bytes(), self.compress_secs)
    }

    /// Effective transfer time over a link of `link` bytes/s, serial model:
    /// tar + compress + bytes/link + decompress.
    pub fn effective_secs(&self, link: f64) -> f64 {
        self.tar_secs + self.compress_secs + self.output_bytes as f64 / link + self.decompress_secs
    }
}

fn breakpoint(saved: i64, extra_secs: f64) -> Option<f64> {
    if saved <= 0 {
        return None;
    }
    if extra_secs <= 0.0 {
        return Some(f64::INFINITY);
    }
    Some(saved as f64 / extra_secs)
}

/// Counts bytes; the end of every pipeline.
#[derive(Debug, Default)]
pub struct Counter {
    pub bytes: u64,
}

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accumulates the time spent inside the inner writer and counts bytes written to it.
pub struct Timed<W> {
    pub inner: W,
    pub spent: Duration,
    pub bytes: u64,
}

impl<W> Timed<W> {
    pub fn new(inner: W) -> Self {
        Timed {
            inner,
            spent: Duration::ZERO,
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Timed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = Instant::now();
        let r = self.inner.write(buf);
        self.spent += t.elapsed();
        if let Ok(n) = r {
            self.bytes += n as u64;
        }
        r
    }
    fn flush(&mut self) -> io::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.spent += t.elapsed();
        r
    }
}

/// Passes only evenly spaced blocks of the stream to `inner` (a sample), swallowing the
/// rest, so the tar builder always completes normally. Blocks spread over the whole stream
/// keep the sample representative: a prefix would be whatever directory tar reads first
/// (all text, or all pack).
struct Sampler<W> {
    inner: W,
    /// Stream position.
    pos: u64,
    /// Pass bytes whose `pos % period < block`.
    period: u64,
    block: u64,
}

impl<W: Write> Write for Sampler<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let phase = self.pos % self.period;
        let n = if phase < self.block {
            let take = (buf.len() as u64).min(self.block - phase) as usize;
            self.inner.write(&buf[..take])?
        } else {
            (buf.len() as u64).min(self.period - phase) as usize
        };
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sampling block size: small enough that a sample has many blocks (a sample of a few large
/// blocks over-weights whichever file they land in), large enough for the codec's matches.
pub const SAMPLE_BLOCK: u64 = 4 << 20;

/// Decoder side: decoder writing into a [`Counter`] of decompressed bytes.
struct GzDec(flate2::write::GzDecoder<Counter>);
struct ZstdDec(zstd::stream::write::Decoder<'static, Counter>);

impl Write for GzDec {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl Write for ZstdDec {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Count of decompressed bytes, shared out of the boxed decoder at the end.
struct DecOut {
    bytes: u64,
}

trait Decoder: Write {
    fn finish_dec(self: Box<Self>) -> io::Result<DecOut>;
}
impl Decoder for GzDec {
    fn finish_dec(self: Box<Self>) -> io::Result<DecOut> {
        let c = self.0.finish()?;
        Ok(DecOut { bytes: c.bytes })
    }
}
impl Decoder for ZstdDec {
    fn finish_dec(mut self: Box<Self>) -> io::Result<DecOut> {
        self.0.flush()?;
        Ok(DecOut {
            bytes: self.0.get_ref().bytes,
        })
    }
}

type DecSide = Timed<Box<dyn Decoder>>;

trait Encoder: Write {
    fn finish_enc(self: Box<Self>) -> io::Result<DecSide>;
}
struct GzEnc(flate2::write::GzEncoder<DecSide>);
struct ZstdEnc(zstd::stream::write::Encoder<'static, DecSide>);
impl Write for GzEnc {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl Write for ZstdEnc {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl Encoder for GzEnc {
    fn finish_enc(self: Box<Self>) -> io::Result<DecSide> {
        self.0.finish()
    }
}
impl Encoder for ZstdEnc {
    fn finish_enc(self: Box<Self>) -> io::Result<DecSide> {
        self.0.finish()
    }
}

/// shardsend's chunked codec as a writer: encodes and decodes each 4 MiB chunk, timing both.
struct ChunkedPipe {
    st: ChunkCodecState,
    buf: Vec<u8>,
    enc: Vec<u8>,
    dec: Vec<u8>,
    out_bytes: u64,
    dec_bytes: u64,
    comp: Duration,
    decomp: Duration,
}

impl ChunkedPipe {
    fn new() -> io::Result<Self> {
        Ok(ChunkedPipe {
            st: ChunkCodecState::new()?,
            buf: Vec::with_capacity(SHARDSEND_CHUNK),
            enc: Vec::new(),
            dec: Vec::new(),
            out_bytes: 0,
            dec_bytes: 0,
            comp: Duration::ZERO,
            decomp: Duration::ZERO,
        })
    }

    fn chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let codec = shardsend_encode_chunk(&mut self.st, &self.buf, &mut self.enc)?;
        self.comp += t.elapsed();
        self.out_bytes += self.enc.len() as u64;
        let t = Instant::now();
        shardsend_decode_chunk(
            &mut self.st,
            codec,
            &self.enc,
            self.buf.len(),
            &mut self.dec,
        )?;
        self.decomp += t.elapsed();
        self.dec_bytes += self.dec.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl Write for ChunkedPipe {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(SHARDSEND_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SHARDSEND_CHUNK {
            self.chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write `dir` as a tar stream into `w` (symlinks stored as links, not followed).
pub fn tar_into<W: Write>(dir: &Path, w: W) -> io::Result<W> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir)?;
    b.into_inner()
}

/// Tar `dir` into a byte counter: (bytes, seconds). Also warms the page cache.
pub fn measure_tar(dir: &Path) -> io::Result<(u64, f64)> {
    let t = Instant::now();
    let w = tar_into(
        dir,
        io::BufWriter::with_capacity(1 << 20, Counter::default()),
    )?;
    let c = w.into_inner().map_err(|e| e.into_error())?;
    Ok((c.bytes, t.elapsed().as_secs_f64()))
}

/// Stream `dir` as tar through `codec` and back. `tar_bytes`/`tar_secs` come from
/// [`measure_tar`]; `limit` caps the bytes fed to the codec, taken as evenly spaced blocks
/// (then figures are scaled).
pub fn measure(
    dir: &Path,
    codec: Codec,
    tar_bytes: u64,
    tar_secs: f64,
    limit: Option<u64>,
) -> io::Result<Measurement> {
    if codec == Codec::None {
        return Ok(Measurement {
            codec,
            input_bytes: tar_bytes,
            output_bytes: tar_bytes,
            tar_secs,
            compress_secs: 0.0,
            decompress_secs: 0.0,
            extrapolated: false,
        });
    }
    let limit = limit.filter(|&l| l < tar_bytes);
    // (fed bytes, out bytes, decoded bytes, encoder-side secs incl. decoder, decoder secs)
    let (fed, out, decoded, enc_secs, dec_secs) = if codec == Codec::Shardsend {
        let pipe = Timed::new(ChunkedPipe::new()?);
        let mut pipe = run_tar(dir, pipe, tar_bytes, limit)?;
        let t = Instant::now();
        pipe.inner.chunk()?;
        pipe.spent += t.elapsed();
        let p = &pipe.inner;
        (
            pipe.bytes,
            p.out_bytes,
            p.dec_bytes,
            pipe.spent.as_secs_f64(),
            p.decomp.as_secs_f64(),
        )
    } else {
        let dec: Box<dyn Decoder> = match codec {
            Codec::Gzip(_) => Box::new(GzDec(flate2::write::GzDecoder::new(Counter::default()))),
            _ => {
                let mut d = zstd::stream::write::Decoder::new(Counter::default())?;
                d.window_log_max(31)?;
                Box::new(ZstdDec(d))
            }
        };
        let dec_side: DecSide = Timed::new(dec);
        let enc: Box<dyn Encoder> = match codec {
            Codec::Gzip(l) => Box::new(GzEnc(flate2::write::GzEncoder::new(
                dec_side,
                flate2::Compression::new(l),
            ))),
            Codec::Zstd(l) => Box::new(ZstdEnc(zstd::stream::write::Encoder::new(dec_side, l)?)),
            Codec::ZstdMt(l, n) => {
                let mut e = zstd::stream::write::Encoder::new(dec_side, l)?;
                e.multithread(n)?;
                Box::new(ZstdEnc(e))
            }
            Codec::None | Codec::Shardsend => unreachable!("handled above"),
        };
        let enc_side = Timed::new(enc);
        let mut enc_side = run_tar(dir, enc_side, tar_bytes, limit)?;
        let fed = enc_side.bytes;
        let t = Instant::now();
        let Timed {
            inner: dec,
            spent: mut dec_spent,
            bytes: wire_bytes,
        } = enc_side.inner.finish_enc()?;
        let tf = Instant::now();
        let dec_out = dec.finish_dec()?;
        dec_spent += tf.elapsed();
        enc_side.spent += t.elapsed();
        (
            fed,
            wire_bytes,
            dec_out.bytes,
            enc_side.spent.as_secs_f64(),
            dec_spent.as_secs_f64(),
        )
    };
    if decoded != fed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{codec}: decoded {decoded} bytes, fed {fed}: codec did not round-trip"),
        ));
    }
    let comp = (enc_secs - dec_secs).max(0.0);
    let scale = if fed > 0 && fed < tar_bytes {
        tar_bytes as f64 / fed as f64
    } else {
        1.0
    };
    Ok(Measurement {
        codec,
        input_bytes: tar_bytes,
        output_bytes: (out as f64 * scale).round() as u64,
        tar_secs,
        compress_secs: comp * scale,
        decompress_secs: dec_secs * scale,
        extrapolated: scale != 1.0,
    })
}

/// Run the tar builder into `w` (through a 1 MiB buffer). With `limit`, only about
/// `limit` bytes in evenly spaced [`SAMPLE_BLOCK`]s of a `total`-byte stream are passed on.
fn run_tar<W: Write>(dir: &Path, w: W, total: u64, limit: Option<u64>) -> io::Result<W> {
    let (period, block) = match limit {
        Some(l) if l < total => {
            let block = SAMPLE_BLOCK.min(l).max(1);
            let blocks = (l / block).max(1);
            ((total / blocks).max(block), block)
        }
        _ => (u64::MAX, u64::MAX),
    };
    let sampler = Sampler {
        inner: w,
        pos: 0,
        period,
        block,
    };
    let buf = tar_into(dir, io::BufWriter::with_capacity(1 << 20, sampler))?;
    let sampler = buf.into_inner().map_err(|e| e.into_error())?;
    Ok(sampler.inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_codecs_roundtrip_on_a_small_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello world\n".repeat(50_000)).unwrap();
        let mut r = vec![0u8; 300_000];
        let mut x = 7u64;
        for b in r.iter_mut() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (x >> 56) as u8;
        }
        std::fs::write(dir.path().join("b.bin"), &r).unwrap();
        let (bytes, secs) = measure_tar(dir.path()).unwrap();
        assert!(bytes > 900_000);
        for &c in DEFAULT_CODECS {
            let m = measure(dir.path(), c, bytes, secs, None).unwrap();
            assert!(!m.extrapolated);
            if c != Codec::None {
                assert!(m.output_bytes < bytes, "{c} should shrink text");
            }
        }
        let m = measure(dir.path(), Codec::Zstd(3), bytes, secs, Some(200_000)).unwrap();
        assert!(m.extrapolated);
        // A sample spread over text and random data lands between the two ratios.
        let big = tempfile::tempdir().unwrap();
        std::fs::write(big.path().join("a.txt"), "text ".repeat(8 << 20)).unwrap();
        let mut noise = vec![0u8; 40 << 20];
        for c in noise.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        std::fs::write(big.path().join("b.bin"), noise).unwrap();
        let (bytes, secs) = measure_tar(big.path()).unwrap();
        let whole = measure(big.path(), Codec::Zstd(1), bytes, secs, None).unwrap();
        let sampled = measure(big.path(), Codec::Zstd(1), bytes, secs, Some(32 << 20)).unwrap();
        assert!(sampled.extrapolated);
        let (w, s) = (whole.output_bytes as f64, sampled.output_bytes as f64);
        assert!((s - w).abs() / w < 0.35, "sampled {s} vs whole {w}");
    }
}
