//! Thin async glue between quinn streams and the sans-io [`crate::wire`] codec, plus the
//! send-rate limiter. Nothing here interprets messages.

use std::time::{Duration, Instant};

use quinn::{ReadExactError, RecvStream, SendStream};

use crate::error::Error;
use crate::wire::{control_frame_len, ChunkHeader, ControlMsg};

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

fn lost(e: impl Into<LostError>) -> Error {
    match e.into() {
        LostError::Read(quinn::ReadError::ConnectionLost(c))
        | LostError::Write(quinn::WriteError::ConnectionLost(c)) => connection_error(&c),
        LostError::Read(e) => Error::Interrupted(e.to_string()),
        LostError::Write(e) => Error::Interrupted(e.to_string()),
    }
}

/// The stream errors that end a transfer.
pub enum LostError {
    Read(quinn::ReadError),
    Write(quinn::WriteError),
}

impl From<quinn::ReadError> for LostError {
    fn from(e: quinn::ReadError) -> Self {
        LostError::Read(e)
    }
}

impl From<quinn::WriteError> for LostError {
    fn from(e: quinn::WriteError) -> Self {
        LostError::Write(e)
    }
}

/// Reads one control message; `Ok(None)` when the peer finished the stream cleanly.
pub async fn read_control(recv: &mut RecvStream) -> Result<Option<ControlMsg>, Error> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(Error::Wire(crate::wire::WireError::Truncated {
                needed: (4 - n) as u64,
            }))
        }
        Err(ReadExactError::ReadError(e)) => return Err(lost(e)),
    }
    let len = control_frame_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(n) => Error::Wire(crate::wire::WireError::Truncated {
            needed: (len - n) as u64,
        }),
        ReadExactError::ReadError(e) => lost(e),
    })?;
    Ok(Some(ControlMsg::decode_body(&body)?))
}

/// Writes one control message.
pub async fn write_control(send: &mut SendStream, msg: &ControlMsg) -> Result<(), Error> {
    let mut buf = Vec::with_capacity(64);
    msg.encode_frame(&mut buf);
    send.write_all(&buf).await.map_err(lost)
}

/// Writes several control messages in one buffer (the manifest: many small frames).
pub async fn write_controls<'a>(
    send: &mut SendStream,
    msgs: impl IntoIterator<Item = &'a ControlMsg>,
) -> Result<(), Error> {
    let mut buf = Vec::with_capacity(64 * 1024);
    for m in msgs {
        m.encode_frame(&mut buf);
        if buf.len() >= 60 * 1024 {
            send.write_all(&buf).await.map_err(lost)?;
            buf.clear();
        }
    }
    send.write_all(&buf).await.map_err(lost)
}

/// Reads one chunk frame header; `Ok(None)` at a clean end of stream.
pub async fn read_chunk_header(recv: &mut RecvStream) -> Result<Option<ChunkHeader>, Error> {
    let mut buf = [0u8; ChunkHeader::LEN];
    match recv.read_exact(&mut buf).await {
        Ok(()) => Ok(Some(ChunkHeader::decode(&buf)?)),
        Err(ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            Err(Error::Wire(crate::wire::WireError::Truncated {
                needed: (ChunkHeader::LEN - n) as u64,
            }))
        }
        Err(ReadExactError::ReadError(e)) => Err(lost(e)),
    }
}

/// Reads exactly `buf.len()` payload bytes.
pub async fn read_payload(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), Error> {
    let len = buf.len();
    recv.read_exact(buf).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(n) => Error::Wire(crate::wire::WireError::Truncated {
            needed: (len - n) as u64,
        }),
        ReadExactError::ReadError(e) => lost(e),
    })
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
