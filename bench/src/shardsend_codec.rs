//! The chunk codec `shardsend` uses on the wire.
//!
//! shardsend compresses each chunk on its own (so chunks stay independently verifiable and
//! resumable): zstd at [`transfer::compress::DEFAULT_LEVEL`] on chunks of
//! [`transfer::send::DEFAULT_CHUNK_SIZE`], and a chunk whose compressed form is not smaller is
//! sent raw. The constants and the bounded decoder come from the `transfer` crate, so the
//! benchmark measures what shardsend does; the encoder repeats its three-line rule because
//! shardsend's own encoder also reads, hashes and maps files.

use std::io;

/// Chunk size of the streaming codec.
pub const SHARDSEND_CHUNK: usize = transfer::send::DEFAULT_CHUNK_SIZE as usize;
/// zstd level of the streaming codec.
pub const SHARDSEND_LEVEL: i32 = transfer::compress::DEFAULT_LEVEL;

/// How a chunk went on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkCodec {
    Raw,
    Zstd,
}

/// Reusable (de)compression contexts, as a sender and a receiver would keep.
pub struct ChunkCodecState {
    c: zstd::bulk::Compressor<'static>,
    d: zstd::bulk::Decompressor<'static>,
}

impl ChunkCodecState {
    pub fn new() -> io::Result<Self> {
        Ok(ChunkCodecState {
            c: zstd::bulk::Compressor::new(SHARDSEND_LEVEL)?,
            d: zstd::bulk::Decompressor::new()?,
        })
    }
}

/// Encode one chunk into `out` (cleared first): zstd, or raw if that is not smaller.
/// SWAP POINT: replace the body with the transfer crate's chunk encoder.
pub fn shardsend_encode_chunk(
    st: &mut ChunkCodecState,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<ChunkCodec> {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    st.c.compress_to_buffer(raw, out)?;
    if out.len() < raw.len() {
        Ok(ChunkCodec::Zstd)
    } else {
        out.clear();
        out.extend_from_slice(raw);
        Ok(ChunkCodec::Raw)
    }
}

/// Decode one chunk of known raw length into `out` (cleared first).
/// SWAP POINT: replace the body with the transfer crate's chunk decoder.
pub fn shardsend_decode_chunk(
    st: &mut ChunkCodecState,
    codec: ChunkCodec,
    payload: &[u8],
    raw_len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    match codec {
        ChunkCodec::Raw => out.extend_from_slice(payload),
        ChunkCodec::Zstd => {
            transfer::compress::decompress_into(&mut st.d, payload, raw_len as u64, out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
    }
    if out.len() != raw_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("chunk decoded to {} bytes, expected {raw_len}", out.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_text_and_random() {
        let mut st = ChunkCodecState::new().unwrap();
        let text = b"fn main() { println!(\"hello\"); }\n".repeat(1000);
        let mut random = vec![0u8; 100_000];
        let mut x = 1u64;
        for b in random.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        for (data, want) in [
            (&text[..], ChunkCodec::Zstd),
            (&random[..], ChunkCodec::Raw),
        ] {
            let (mut enc, mut dec) = (Vec::new(), Vec::new());
            let c = shardsend_encode_chunk(&mut st, data, &mut enc).unwrap();
            assert_eq!(c, want);
            shardsend_decode_chunk(&mut st, c, &enc, data.len(), &mut dec).unwrap();
            assert_eq!(dec, data);
        }
    }
}
