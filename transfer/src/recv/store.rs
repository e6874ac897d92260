//! Storing one chunk on the receiver: decode (zstd output bounded by the declared length),
//! hash, compare with the sender's hash, and write it with a positioned write (or punch a
//! hole for an all-zero chunk). CPU and disk work, run on a blocking thread; journaling and
//! what the result means for the transfer are the driver's and the session's business.

use std::path::Path;

use crate::compress::decompress_into;
use crate::staging::Staging;
use crate::wire::{hex, ChunkHeader, Codec, Hash};

/// What became of one chunk frame.
#[derive(Debug)]
pub enum Stored {
    /// Decoded bytes hashed to the header's hash and were written.
    Verified(Hash),
    /// Undecodable, or a different hash: nothing was written.
    Mismatch(String),
    /// The write failed (ENOSPC is the one the session treats apart).
    WriteFailed(std::io::Error),
}

/// Decodes, hashes and compares a chunk whose header passed the tracker's checks, and writes
/// it to `path` when it matches.
pub fn store_chunk(h: &ChunkHeader, payload: &[u8], path: &Path) -> Stored {
    let mut decoded = Vec::new();
    let raw: &[u8] = match h.codec {
        Codec::Raw => payload,
        Codec::Zero => {
            decoded.resize(h.raw_len as usize, 0);
            &decoded
        }
        Codec::Zstd => {
            thread_local! {
                static DEC: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            let r = DEC.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = zstd::bulk::Decompressor::new().ok();
                }
                match d.as_mut() {
                    Some(dec) => decompress_into(dec, payload, h.raw_len, &mut decoded)
                        .map_err(|e| e.to_string()),
                    None => Err("cannot create a zstd decompressor".into()),
                }
            });
            if let Err(e) = r {
                return Stored::Mismatch(format!("undecodable payload: {e}"));
            }
            &decoded
        }
    };
    let got = *blake3::hash(raw).as_bytes();
    if got != h.hash {
        return Stored::Mismatch(format!(
            "hash {} differs from the sender's {}",
            &hex(&got)[..16],
            &hex(&h.hash)[..16]
        ));
    }
    let written = if h.codec == Codec::Zero {
        // Holes stay holes: punch one (a resumed staged file may hold stale bytes there).
        Staging::zero_range(path, h.offset, h.raw_len)
    } else {
        Staging::write_chunk(path, h.offset, raw)
    };
    match written {
        Ok(()) => Stored::Verified(got),
        Err(e) => Stored::WriteFailed(e),
    }
}
