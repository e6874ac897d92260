//! Reading a chunk's raw bytes from the source: positioned reads (`pread` straight into a
//! reused buffer), memory mappings for large files, holes found with `SEEK_DATA`, and content
//! the scan already holds in memory (a git directory's refs, [`crate::scan`]).
//!
//! Everything unsafe on the sender lives here, each block with its reason. A source that
//! vanished or shrank since the scan is a live source changing, not a broken disk: those
//! errors are recognised by [`source_gone`] and make the driver restart the pass.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::wire::Hash;

/// Files at least this large are read through a memory mapping (see [`read_chunk`]).
pub const MMAP_MIN_FILE_SIZE: u64 = 16 << 20;

/// Where a chunk's bytes come from.
pub enum ChunkSource {
    File(PathBuf),
    /// Content the scan already read (a git directory's refs).
    Memory(bytes::Bytes),
}

/// A chunk's raw bytes, as read.
pub enum RawChunk {
    /// The range is a hole of a sparse file: all zeros, nothing was read.
    Hole,
    /// Read into the caller's buffer.
    InBuffer,
    /// Mapped or held in memory: usable as a payload without a copy.
    Borrowed(bytes::Bytes),
}

/// True when a read failed because the source vanished or shrank since the scan.
pub fn source_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
    ) || e.raw_os_error() == Some(libc::ENOTDIR)
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "file shrank while being read (source changed)",
    )
}

/// Reads `[offset, offset + len)` of `source`, into `buf` (cleared first) or as borrowed
/// bytes. Runs on a blocking thread.
pub fn read_chunk(
    source: &ChunkSource,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> io::Result<RawChunk> {
    let path = match source {
        ChunkSource::Memory(content) => {
            let end = offset.checked_add(len).ok_or_else(shrank)?;
            if (content.len() as u64) < end {
                return Err(shrank());
            }
            return Ok(RawChunk::Borrowed(
                content.slice(offset as usize..end as usize),
            ));
        }
        ChunkSource::File(path) => path,
    };
    let file = File::open(path)?;
    if is_hole(&file, offset, len) {
        return Ok(RawChunk::Hole);
    }
    let size = file.metadata()?.len();
    if size < offset.saturating_add(len) {
        return Err(shrank());
    }
    // Large files (packs) are mapped: hashing and quinn read the page cache directly, saving
    // the pread copy (~15% of the sender's CPU, measured with perf). Git never truncates a
    // pack in place; a file truncated under the mapping would kill us with SIGBUS, which is
    // why small, mutable files (refs, config, index) are read with pread instead.
    if size >= MMAP_MIN_FILE_SIZE {
        // SAFETY: see above; the length was checked against the file size just before.
        let m = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len as usize)
                .populate()
                .map(&file)?
        };
        return Ok(RawChunk::Borrowed(bytes::Bytes::from_owner(m)));
    }
    read_exact_at_uninit(&file, buf, len as usize, offset)?;
    Ok(RawChunk::InBuffer)
}

/// True when `[offset, offset + len)` of `file` is entirely a hole (sparse file).
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a valid fd; an error (ENXIO past the last data) is handled below.
    let next_data =
        unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next_data < 0 {
        // ENXIO: no data at or after offset. Anything else: be safe, read it.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next_data as u64 >= offset.saturating_add(len)
}

/// BLAKE3 of `len` zero bytes (a hole's chunk hash), without allocating `len` bytes.
pub fn zero_hash(len: u64) -> Hash {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// Reads exactly `len` bytes at `offset` into `buf` (cleared first) without zero-filling it:
/// `pread` writes straight into the spare capacity. A file ending early is
/// `UnexpectedEof` (it shrank since the scan).
fn read_exact_at_uninit(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    buf.clear();
    buf.reserve(len);
    let mut done = 0usize;
    while done < len {
        // SAFETY: the destination is within buf's reserved capacity (len - done bytes from
        // done); pread writes at most that many bytes and we only extend the length by what
        // it reports as written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(shrank());
        }
        done += n as usize;
        // SAFETY: pread initialised bytes [0, done).
        unsafe { buf.set_len(done) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_holes_and_memory_and_reports_a_shrunk_or_vanished_source() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let src = ChunkSource::File(p.clone());
        let mut buf = Vec::new();
        assert!(matches!(
            read_chunk(&src, 1000, 5000, &mut buf).unwrap(),
            RawChunk::InBuffer
        ));
        assert_eq!(buf, &data[1000..6000]);

        let e = read_chunk(&src, 150_000, 60_000, &mut buf).err().unwrap();
        assert!(source_gone(&e), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = read_chunk(&src, 0, 10, &mut buf).err().unwrap();
        assert!(source_gone(&e), "{e}");

        let mem = ChunkSource::Memory(bytes::Bytes::from_static(b"0123456789"));
        match read_chunk(&mem, 2, 3, &mut buf).unwrap() {
            RawChunk::Borrowed(b) => assert_eq!(&b[..], b"234"),
            _ => panic!("memory content is borrowed"),
        }
        assert!(source_gone(
            &read_chunk(&mem, 8, 3, &mut buf).err().unwrap()
        ));
        assert!(source_gone(
            &read_chunk(&mem, u64::MAX, 3, &mut buf).err().unwrap()
        ));

        // A sparse file: its hole is reported, not read.
        let sparse = t.path().join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(8 << 20).unwrap();
        let src = ChunkSource::File(sparse);
        assert!(matches!(
            read_chunk(&src, 1 << 20, 1 << 20, &mut buf).unwrap(),
            RawChunk::Hole
        ));
        assert_eq!(zero_hash(1000), *blake3::hash(&[0u8; 1000]).as_bytes());
    }
}
