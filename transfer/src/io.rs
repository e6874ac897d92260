//! Thin async glue between byte streams and the sans-io [`crate::wire`] codec, plus the
//! send-rate limiter and the chunk buffer pool. Nothing here interprets messages.
//!
//! The frame helpers are generic over tokio's `AsyncRead`/`AsyncWrite`: the drivers use them on
//! quinn's streams, and protocol tests on in-memory pipes (`tokio::io::duplex`), no socket.
//! An I/O error that wraps one of quinn's stream errors is mapped back to what the connection
//! says ([`connection_error`]), so a refused key still reads as one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::wire::{control_frame_len, ChunkHeader, ControlMsg, WireError};

/// Maps a lost connection to an error; a TLS alert means the peer refused our key.
pub fn connection_error(e: &quinn::ConnectionError) -> Error {
    if let quinn::ConnectionError::ConnectionClosed(close) = e {
        let code = u64::from(close.error_code);
        if (0x100..0x200).contains(&code) {
            return Error::Connect {
                addr: "the receiver".into(),
                reason: format!(
                    "it refused our key (TLS alert {}): is our fingerprint in its allow-list? \
                     `shardsend fingerprint --identity KEY` prints it",
                    code - 0x100
                ),
            };
        }
    }
    Error::Interrupted(e.to_string())
}

/// Maps a stream I/O error: quinn's (wrapped by its `AsyncRead`/`AsyncWrite`) by what the
/// connection says, any other as an interruption.
pub fn stream_error(e: io::Error) -> Error {
    if let Some(inner) = e.get_ref() {
        if let Some(quinn::ReadError::ConnectionLost(c)) = inner.downcast_ref::<quinn::ReadError>()
        {
            return connection_error(c);
        }
        if let Some(quinn::WriteError::ConnectionLost(c)) =
            inner.downcast_ref::<quinn::WriteError>()
        {
            return connection_error(c);
        }
    }
    Error::Interrupted(e.to_string())
}

/// Fills `buf` from `r`. `Ok(false)` when the stream ended cleanly before its first byte;
/// an end after some bytes is a truncated frame.
async fn read_frame_part<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<bool, Error> {
    read_counting(r, buf, None).await
}

/// [`read_frame_part`], adding each read's length to `counter` as the bytes arrive.
async fn read_counting<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    counter: Option<&AtomicU64>,
) -> Result<bool, Error> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await.map_err(stream_error)?;
        if let Some(c) = counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(Error::Wire(WireError::Truncated {
                needed: (buf.len() - filled) as u64,
            }));
        }
        filled += n;
    }
    Ok(true)
}

/// Buffer of a control stream's reader: many small frames are read with one call into the
/// stream (whose every read takes the connection's lock).
pub const CONTROL_READ_BUFFER: usize = 64 * 1024;

/// Reads one control message; `Ok(None)` when the peer finished the stream cleanly.
pub async fn read_control<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<ControlMsg>, Error> {
    let mut prefix = [0u8; 4];
    if !read_frame_part(r, &mut prefix).await? {
        return Ok(None);
    }
    let len = control_frame_len(prefix)?;
    let mut body = vec![0u8; len];
    read_payload(r, &mut body).await?;
    Ok(Some(ControlMsg::decode_body(&body)?))
}

/// Writes one control message.
pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMsg,
) -> Result<(), Error> {
    let mut buf = Vec::with_capacity(64);
    msg.encode_frame(&mut buf);
    w.write_all(&buf).await.map_err(stream_error)
}

/// Writes several control messages in one buffer (the manifest: many small frames).
pub async fn write_controls<'a, W: AsyncWrite + Unpin>(
    w: &mut W,
    msgs: impl IntoIterator<Item = &'a ControlMsg>,
) -> Result<(), Error> {
    let mut buf = Vec::with_capacity(64 * 1024);
    for m in msgs {
        m.encode_frame(&mut buf);
        if buf.len() >= 60 * 1024 {
            w.write_all(&buf).await.map_err(stream_error)?;
            buf.clear();
        }
    }
    w.write_all(&buf).await.map_err(stream_error)
}

/// Reads one chunk frame header; `Ok(None)` at a clean end of stream.
pub async fn read_chunk_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<ChunkHeader>, Error> {
    let mut buf = [0u8; ChunkHeader::LEN];
    if !read_frame_part(r, &mut buf).await? {
        return Ok(None);
    }
    Ok(Some(ChunkHeader::decode(&buf)?))
}

/// Reads exactly `buf.len()` payload bytes.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), Error> {
    read_payload_counting(r, buf, None).await
}

/// [`read_payload`], adding each read's length to `counter` as the bytes arrive: the
/// receiver's count of wire bytes, which the sender's link estimate needs per read rather
/// than per whole chunk (a 2 MiB chunk is a second on a 16 Mbit/s link).
pub async fn read_payload_counting<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    counter: Option<&AtomicU64>,
) -> Result<(), Error> {
    if buf.is_empty() || read_counting(r, buf, counter).await? {
        return Ok(());
    }
    Err(Error::Wire(WireError::Truncated {
        needed: buf.len() as u64,
    }))
}

/// Paces writes to at most `rate` bytes/s (`--bwlimit`), shared by all data streams.
///
/// A virtual clock: each reservation pushes `next_free` forward by `bytes / rate` and the
/// caller sleeps until the *end* of its slot, so after any number of writes the elapsed time
/// is at least `bytes written / rate` (a token bucket that starts empty). Callers reserve in
/// pieces of at most [`RateLimiter::PIECE`] bytes, which keeps bursts short.
pub struct RateLimiter {
    rate: u64,
    next_free: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            next_free: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Largest write paced as one unit.
    pub const PIECE: usize = 256 * 1024;

    pub async fn reserve(&self, bytes: u64) {
        let slot_end = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            *next
        };
        tokio::time::sleep_until(slot_end.into()).await;
    }
}

/// A small pool of chunk-sized buffers, so steady-state transfers allocate (and page-fault)
/// nothing per chunk. Bounded: buffers beyond `max` are freed instead of kept.
#[derive(Clone)]
pub struct BufferPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    max: usize,
}

impl BufferPool {
    pub fn new(max: usize) -> Self {
        BufferPool {
            free: Default::default(),
            max,
        }
    }

    /// A buffer from the pool (or a new empty one). Its length is what the previous user
    /// left, so callers `resize` or `clear` it as they need.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default()
    }

    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.max {
                f.push(buf);
            }
        }
    }

    /// Wraps `buf` as `Bytes` that return the buffer to this pool when quinn drops them
    /// (after the peer acknowledged the data).
    pub fn into_bytes(&self, buf: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(PooledBuf {
            buf,
            pool: self.clone(),
        })
    }
}

struct PooledBuf {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_payload_is_counted_as_its_pieces_arrive_not_once_whole() {
        let (mut w, mut r) = tokio::io::duplex(1 << 16);
        let counter = std::sync::Arc::new(AtomicU64::new(0));
        let reader = {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut payload = vec![0u8; 3000];
                read_payload_counting(&mut r, &mut payload, Some(&counter))
                    .await
                    .map(|()| payload)
            })
        };
        w.write_all(&[1u8; 1000]).await.unwrap();
        // The first piece is counted while the rest has not been sent yet.
        let mut seen = 0;
        for _ in 0..1000 {
            seen = counter.load(Ordering::Relaxed);
            if seen == 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(seen, 1000);
        assert!(!reader.is_finished());
        w.write_all(&[2u8; 2000]).await.unwrap();
        let payload = reader.await.unwrap().unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 3000);
        assert_eq!(&payload[..1000], &[1u8; 1000][..]);
        assert_eq!(&payload[1000..], &[2u8; 2000][..]);
    }

    #[tokio::test]
    async fn frames_cross_an_in_memory_pipe_and_a_cut_one_is_an_error() {
        let (mut w, mut r) = tokio::io::duplex(1 << 16);
        let msgs = [
            ControlMsg::Accept { verified_bytes: 7 },
            ControlMsg::Done { root_hash: [3; 32] },
        ];
        write_controls(&mut w, &msgs).await.unwrap();
        write_control(&mut w, &ControlMsg::Staged { root_hash: [1; 32] })
            .await
            .unwrap();
        let header = ChunkHeader {
            file: 1,
            chunk: 2,
            offset: 3,
            raw_len: 4,
            codec: crate::wire::Codec::Raw,
            payload_len: 4,
            hash: [9; 32],
        };
        w.write_all(&header.encode()).await.unwrap();
        w.write_all(b"abcd").await.unwrap();
        drop(w);
        assert_eq!(read_control(&mut r).await.unwrap(), Some(msgs[0].clone()));
        assert_eq!(read_control(&mut r).await.unwrap(), Some(msgs[1].clone()));
        assert!(matches!(
            read_control(&mut r).await.unwrap(),
            Some(ControlMsg::Staged { .. })
        ));
        assert_eq!(read_chunk_header(&mut r).await.unwrap(), Some(header));
        let mut payload = [0u8; 4];
        read_payload(&mut r, &mut payload).await.unwrap();
        assert_eq!(&payload, b"abcd");
        // A clean end between frames.
        assert_eq!(read_control(&mut r).await.unwrap(), None);

        // Cut inside a frame: truncated, not a clean end.
        let (mut w, mut r) = tokio::io::duplex(1 << 16);
        let mut frame = Vec::new();
        ControlMsg::Accept { verified_bytes: 1 }.encode_frame(&mut frame);
        w.write_all(&frame[..frame.len() - 2]).await.unwrap();
        drop(w);
        assert!(matches!(
            read_control(&mut r).await,
            Err(Error::Wire(WireError::Truncated { needed: 2 }))
        ));
        // A length prefix over the limit is refused before any allocation.
        let (mut w, mut r) = tokio::io::duplex(64);
        w.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(matches!(
            read_control(&mut r).await,
            Err(Error::Wire(WireError::FrameTooLarge(_)))
        ));
    }
}
