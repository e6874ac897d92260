//! Which chunks the receiver holds verified, and the checks every chunk frame header must
//! pass before a byte of its payload is written.
//!
//! Sans-io: the receiver's data-stream tasks call [`ChunkTracker::check_header`] on every
//! frame, then [`ChunkTracker::mark_verified`] once the decoded bytes hashed to the header's
//! hash and were written. The root hash is computed from the hashes held here, in manifest
//! order, so it covers chunks verified in earlier attempts (resume) without re-reading them.
//! A chunk whose bytes fail verification is counted ([`ChunkTracker::record_mismatch`]):
//! it is asked for again until [`MAX_CHUNK_ATTEMPTS`] failures, then the transfer fails.

use std::collections::HashMap;

use thiserror::Error;

use crate::manifest::{chunk_count, chunk_len, Manifest};
use crate::wire::{ChunkHeader, Codec, EntryKind, Hash, RootHasher};

/// A frame header that no honest sender produces.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("chunk frame for entry {0}, which does not exist")]
    NoSuchFile(u64),
    #[error("chunk frame for entry {0}, which is not a regular file")]
    NotAFile(u64),
    #[error("chunk {chunk} of entry {file} lies past the end of its {size}-byte file")]
    PastEnd { file: u64, chunk: u64, size: u64 },
    #[error("chunk {chunk} of entry {file}: offset {offset} does not match the chunk index")]
    Offset { file: u64, chunk: u64, offset: u64 },
    #[error("chunk {chunk} of entry {file}: length {got} but the manifest implies {expected}")]
    Length {
        file: u64,
        chunk: u64,
        expected: u64,
        got: u64,
    },
    #[error("chunk {chunk} of entry {file}: payload of {payload} bytes invalid for codec {codec:?} and {raw} raw bytes")]
    Payload {
        file: u64,
        chunk: u64,
        codec: Codec,
        payload: u64,
        raw: u64,
    },
}

/// A chunk failing verification this many times fails the transfer: the path corrupts data
/// persistently, and asking again forever would only hide it.
pub const MAX_CHUNK_ATTEMPTS: u32 = 3;

/// What to do about a chunk whose bytes did not hash to its header's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// Ask the sender for it again; this was failure number `attempts`.
    Retry { attempts: u32 },
    /// It failed [`MAX_CHUNK_ATTEMPTS`] times: fail the transfer.
    GiveUp { attempts: u32 },
}

/// Whether a checked frame carries something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Missing,
    /// Already verified (a retry raced with the original): read and drop the payload.
    AlreadyVerified,
}

#[derive(Debug, Clone)]
struct FileChunks {
    size: u64,
    is_file: bool,
    hashes: Vec<Option<Hash>>,
}

/// Verified-chunk bookkeeping for one transfer.
#[derive(Debug, Clone)]
pub struct ChunkTracker {
    chunk_size: u64,
    files: Vec<FileChunks>,
    total_chunks: u64,
    verified_chunks: u64,
    verified_bytes: u64,
    /// Failed verifications per (file, chunk), for chunks that failed at least once.
    mismatches: HashMap<(u64, u64), u32>,
}

impl ChunkTracker {
    pub fn new(manifest: &Manifest) -> Self {
        let files: Vec<FileChunks> = manifest
            .entries
            .iter()
            .map(|e| {
                let is_file = e.kind == EntryKind::File;
                let n = if is_file {
                    chunk_count(e.size, manifest.chunk_size)
                } else {
                    0
                };
                FileChunks {
                    size: e.size,
                    is_file,
                    hashes: vec![None; n as usize],
                }
            })
            .collect();
        let total_chunks = files.iter().map(|f| f.hashes.len() as u64).sum();
        ChunkTracker {
            chunk_size: manifest.chunk_size,
            files,
            total_chunks,
            verified_chunks: 0,
            verified_bytes: 0,
            mismatches: HashMap::new(),
        }
    }

    /// Validates a frame header against the manifest.
    pub fn check_header(&self, h: &ChunkHeader) -> Result<ChunkState, HeaderError> {
        let f = self
            .files
            .get(usize::try_from(h.file).unwrap_or(usize::MAX))
            .ok_or(HeaderError::NoSuchFile(h.file))?;
        if !f.is_file {
            return Err(HeaderError::NotAFile(h.file));
        }
        let expected = chunk_len(f.size, self.chunk_size, h.chunk).ok_or(HeaderError::PastEnd {
            file: h.file,
            chunk: h.chunk,
            size: f.size,
        })?;
        if h.chunk.checked_mul(self.chunk_size) != Some(h.offset) {
            return Err(HeaderError::Offset {
                file: h.file,
                chunk: h.chunk,
                offset: h.offset,
            });
        }
        if h.raw_len != expected {
            return Err(HeaderError::Length {
                file: h.file,
                chunk: h.chunk,
                expected,
                got: h.raw_len,
            });
        }
        let payload_ok = match h.codec {
            Codec::Raw => h.payload_len == h.raw_len,
            // The sender only compresses when it shrinks the chunk.
            Codec::Zstd => h.payload_len < h.raw_len,
            Codec::Zero => h.payload_len == 0,
        };
        if !payload_ok {
            return Err(HeaderError::Payload {
                file: h.file,
                chunk: h.chunk,
                codec: h.codec,
                payload: h.payload_len,
                raw: h.raw_len,
            });
        }
        Ok(if f.hashes[h.chunk as usize].is_some() {
            ChunkState::AlreadyVerified
        } else {
            ChunkState::Missing
        })
    }

    /// Records a verified chunk (its index must have passed [`Self::check_header`] or come
    /// from the journal). Returns false when it was already recorded or does not exist.
    pub fn mark_verified(&mut self, file: u64, chunk: u64, hash: Hash) -> bool {
        let Some(f) = self.files.get_mut(file as usize) else {
            return false;
        };
        let Some(slot) = f.hashes.get_mut(chunk as usize) else {
            return false;
        };
        if slot.is_some() {
            return false;
        }
        *slot = Some(hash);
        self.verified_chunks += 1;
        self.verified_bytes += chunk_len(f.size, self.chunk_size, chunk).unwrap_or(0);
        true
    }

    /// Counts a failed verification of a chunk (one that passed [`Self::check_header`]).
    pub fn record_mismatch(&mut self, file: u64, chunk: u64) -> Mismatch {
        let attempts = self.mismatches.entry((file, chunk)).or_insert(0);
        *attempts = attempts.saturating_add(1);
        if *attempts >= MAX_CHUNK_ATTEMPTS {
            Mismatch::GiveUp {
                attempts: *attempts,
            }
        } else {
            Mismatch::Retry {
                attempts: *attempts,
            }
        }
    }

    pub fn is_complete(&self) -> bool {
        self.verified_chunks == self.total_chunks
    }

    pub fn verified_chunks(&self) -> u64 {
        self.verified_chunks
    }

    pub fn verified_bytes(&self) -> u64 {
        self.verified_bytes
    }

    pub fn total_chunks(&self) -> u64 {
        self.total_chunks
    }

    /// Verified chunks of `file` with their hashes.
    pub fn verified_of(&self, file: usize) -> Vec<(u64, Hash)> {
        self.files.get(file).map_or_else(Vec::new, |f| {
            f.hashes
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i as u64, h)))
                .collect()
        })
    }

    /// The root hash, once every chunk is verified.
    pub fn root_hash(&self, manifest_hash: &Hash) -> Option<Hash> {
        let mut root = RootHasher::new(manifest_hash);
        for f in &self.files {
            for h in &f.hashes {
                root.add_chunk(h.as_ref()?);
            }
        }
        Some(root.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Entry, RootKind};

    fn manifest() -> Manifest {
        let f = |path: &str, kind, size| Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime_sec: 0,
            mtime_nsec: 0,
            size,
            link_target: vec![],
            ino: 0,
            ctime_sec: 0,
            ctime_nsec: 0,
            attrs: None,
        };
        Manifest::from_scan(
            RootKind::Dir,
            1 << 16,
            vec![
                f("d", EntryKind::Dir, 0),
                f("d/a", EntryKind::File, (1 << 16) + 10),
                f("e", EntryKind::File, 0),
            ],
        )
    }

    fn header(file: u64, chunk: u64, raw_len: u64) -> ChunkHeader {
        ChunkHeader {
            file,
            chunk,
            offset: chunk << 16,
            raw_len,
            codec: Codec::Raw,
            payload_len: raw_len,
            hash: [0; 32],
        }
    }

    #[test]
    fn refuses_frames_that_do_not_fit_the_manifest() {
        let t = ChunkTracker::new(&manifest());
        assert_eq!(t.total_chunks(), 2);
        assert_eq!(
            t.check_header(&header(1, 0, 1 << 16)),
            Ok(ChunkState::Missing)
        );
        assert_eq!(t.check_header(&header(1, 1, 10)), Ok(ChunkState::Missing));
        assert!(matches!(
            t.check_header(&header(1, 2, 10)),
            Err(HeaderError::PastEnd { .. })
        ));
        assert!(matches!(
            t.check_header(&header(2, 0, 0)),
            Err(HeaderError::PastEnd { .. })
        ));
        assert_eq!(
            t.check_header(&header(0, 0, 1)),
            Err(HeaderError::NotAFile(0))
        );
        assert_eq!(
            t.check_header(&header(9, 0, 1)),
            Err(HeaderError::NoSuchFile(9))
        );
        assert!(matches!(
            t.check_header(&header(1, 1, 11)),
            Err(HeaderError::Length { .. })
        ));
        let mut h = header(1, 1, 10);
        h.offset = 5;
        assert!(matches!(
            t.check_header(&h),
            Err(HeaderError::Offset { .. })
        ));
        let mut h = header(1, 1, 10);
        h.payload_len = 11;
        assert!(matches!(
            t.check_header(&h),
            Err(HeaderError::Payload { .. })
        ));
        h.codec = Codec::Zstd;
        assert!(t.check_header(&h).is_err(), "zstd payload must be smaller");
        h.codec = Codec::Zero;
        h.payload_len = 0;
        assert!(t.check_header(&h).is_ok());
        let mut h = header(1, u64::MAX, 10);
        h.offset = 0;
        assert!(t.check_header(&h).is_err());
    }

    #[test]
    fn root_hash_needs_every_chunk_and_matches_the_sender_order() {
        let m = manifest();
        let mut t = ChunkTracker::new(&m);
        assert!(t.mark_verified(1, 1, [2; 32]));
        assert!(!t.mark_verified(1, 1, [2; 32]));
        assert!(!t.mark_verified(1, 7, [2; 32]));
        assert_eq!(t.root_hash(&m.manifest_hash), None);
        assert_eq!(
            t.check_header(&header(1, 1, 10)),
            Ok(ChunkState::AlreadyVerified)
        );
        assert!(t.mark_verified(1, 0, [1; 32]));
        assert!(t.is_complete());
        assert_eq!(t.verified_bytes(), (1 << 16) + 10);
        let mut r = RootHasher::new(&m.manifest_hash);
        r.add_chunk(&[1; 32]);
        r.add_chunk(&[2; 32]);
        assert_eq!(t.root_hash(&m.manifest_hash), Some(r.finish()));
        assert_eq!(t.verified_of(1), vec![(0, [1; 32]), (1, [2; 32])]);
    }

    #[test]
    fn a_chunk_is_asked_for_again_until_the_attempt_limit() {
        let mut t = ChunkTracker::new(&manifest());
        assert_eq!(t.record_mismatch(1, 0), Mismatch::Retry { attempts: 1 });
        assert_eq!(t.record_mismatch(1, 1), Mismatch::Retry { attempts: 1 });
        assert_eq!(t.record_mismatch(1, 0), Mismatch::Retry { attempts: 2 });
        assert_eq!(
            t.record_mismatch(1, 0),
            Mismatch::GiveUp {
                attempts: MAX_CHUNK_ATTEMPTS
            }
        );
    }
}
