//! `shardsend`: scan, connect, send what the receiver lacks, verify, report.
//!
//! Flow of one attempt: scan the source into a manifest ([`crate::scan`]), connect with the
//! pinned key, send `Hello` + manifest, read back what the receiver already verified
//! (`Have`*), then `streams` workers pull chunks from a shared [`WorkQueue`] and write chunk
//! frames on their own QUIC data stream, while the control loop reads `Progress` (link rate
//! for `auto` compression, progress bar) and `Retry` (corrupted chunks go back to the queue).
//! When every chunk has been written the source is re-checked (size, mtime, inode, ctime); if
//! a file changed during the send the attempt is abandoned and a new one starts with
//! `resume`, so the changed file is re-sent whole while everything else is kept. Otherwise
//! `Done` carries our root hash and we wait for `Installed`.
//!
//! Resume never re-reads verified data: the root hash uses the chunk hashes the receiver
//! reports, which it journaled only after they matched the hashes we sent at the time.
//!
//! Memory: each worker owns one read buffer and one compression buffer of `chunk_size`;
//! quinn buffers at most its send window. Neither grows with the transfer's size.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::compress::{AutoDecider, CodecSample, CompressPolicy, Decision};
use crate::error::Error;
use crate::identity::{client_crypto, Fingerprint, Identity};
use crate::io::{read_control, write_control, write_controls, RateLimiter};
use crate::scan::{changed_since_scan, scan, Scan};
use crate::wire::{
    hex, ChunkHeader, Codec, ControlMsg, EntryKind, FailCode, Hash, Hello, RootHasher,
    PROTOCOL_VERSION,
};

/// Default chunk size: large enough to amortise per-frame cost, small enough that a resume
/// re-sends little (at most `streams` chunks were in flight).
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;
/// Default number of parallel data streams.
pub const DEFAULT_STREAMS: usize = 4;
/// Attempts made when the source keeps changing under us.
pub const MAX_ATTEMPTS: u32 = 3;
/// How long the sender lets its endpoint driver flush CONNECTION_CLOSE before returning.
const CLOSE_FLUSH: Duration = Duration::from_millis(3);

/// Test-only fault injection (hidden `--inject-fault`): exercises the receiver's checks
/// with the real binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte of the first chunk's payload once: the receiver must ask again.
    CorruptOnce,
    /// Flip it every time: the receiver must give up with a clear error.
    CorruptAlways,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "corrupt-once" => Ok(Fault::CorruptOnce),
            "corrupt-always" => Ok(Fault::CorruptAlways),
            _ => Err(format!("unknown fault {s:?}")),
        }
    }
}

/// Everything `shardsend` needs for one transfer.
pub struct SendConfig {
    pub src: PathBuf,
    /// `HOST:PORT` of the receiver.
    pub addr: String,
    pub dest: String,
    pub identity: Arc<Identity>,
    pub peer: Fingerprint,
    pub compress: CompressPolicy,
    pub streams: usize,
    pub bwlimit: Option<u64>,
    pub resume: bool,
    pub chunk_size: u64,
    pub progress: bool,
    pub fault: Option<Fault>,
    /// Verify into the receiver's staging area without installing (pre-copy).
    pub stage_only: bool,
    /// How long to wait for the receiver to answer the handshake.
    pub connect_timeout: Duration,
    /// Congestion controller and other transport choices.
    pub transport: crate::quic::TransportOptions,
}

/// The `--json` summary.
#[derive(Debug, Clone, Serialize)]
pub struct SendSummary {
    pub source: String,
    pub receiver: String,
    pub dest: String,
    /// Where the tree was installed; empty for `--stage-only`.
    pub installed_path: String,
    /// True for a `--stage-only` pre-copy: verified, kept in staging, not installed.
    pub staged_only: bool,
    pub replaced: Option<String>,
    pub entries: u64,
    pub files: u64,
    /// Size of the tree (all file bytes).
    pub bytes: u64,
    /// Raw bytes sent in this run (excludes what an earlier attempt left verified).
    pub sent_bytes: u64,
    /// Bytes already verified on the receiver from an earlier attempt (`--resume`).
    pub resumed_bytes: u64,
    /// Bytes written to the data streams (headers + payloads, before QUIC/TLS overhead).
    pub wire_bytes: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub chunks_sent: u64,
    pub chunks_resumed: u64,
    pub chunks_retried: u64,
    pub seconds: f64,
    /// Tree size over wall time, MB/s (10^6).
    pub mb_per_s: f64,
    pub streams: usize,
    pub bwlimit: Option<u64>,
    pub compression: Decision,
    pub root_hash: String,
    pub attempts: u32,
    pub skipped: Vec<String>,
    /// QUIC path statistics of the last attempt, for diagnosing slow links.
    pub quic: QuicStats,
}

/// What quinn saw of the path.
#[derive(Debug, Clone, Serialize)]
pub struct QuicStats {
    pub mtu: u16,
    pub rtt_ms: f64,
    pub cwnd: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
}

impl QuicStats {
    fn of(conn: &quinn::Connection) -> Self {
        let p = conn.stats().path;
        QuicStats {
            mtu: p.current_mtu,
            rtt_ms: p.rtt.as_secs_f64() * 1e3,
            cwnd: p.cwnd,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            congestion_events: p.congestion_events,
        }
    }
}

/// Sends `cfg.src`, retrying (with resume) when the source changes during the send.
pub async fn send(cfg: &SendConfig) -> Result<SendSummary, Error> {
    if cfg.streams == 0 || cfg.streams > crate::quic::MAX_DATA_STREAMS as usize {
        return Err(Error::Input(format!(
            "--streams must be between 1 and {}",
            crate::quic::MAX_DATA_STREAMS
        )));
    }
    crate::manifest::validate_destination(cfg.dest.as_bytes())
        .map_err(|e| Error::Input(e.to_string()))?;
    let started = Instant::now();
    let mut resume = cfg.resume;
    let mut totals = Totals::default();
    for attempt in 1..=MAX_ATTEMPTS {
        match attempt_once(cfg, resume, &mut totals).await {
            Ok(mut summary) => {
                summary.attempts = attempt;
                summary.seconds = started.elapsed().as_secs_f64();
                summary.mb_per_s = summary.bytes as f64 / summary.seconds.max(1e-9) / 1e6;
                return Ok(summary);
            }
            Err(Error::SourceChanged(paths)) if attempt < MAX_ATTEMPTS => {
                tracing::warn!(%paths, attempt, "source changed during the send; resending changed files whole");
                resume = true;
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::SourceChanged(format!(
        "the source kept changing over {MAX_ATTEMPTS} attempts; freeze it (maintenance mode) and retry"
    )))
}

#[derive(Default)]
struct Totals {
    sent_bytes: u64,
    wire_bytes: u64,
    chunks_sent: u64,
    chunks_retried: u64,
}

/// Shared queue of chunks to send: retries first, then the plan in order.
struct WorkQueue {
    state: Mutex<QueueState>,
    wake_workers: Notify,
    drained: Notify,
}

struct QueueState {
    plan: Vec<(u64, u64)>,
    next: usize,
    retries: VecDeque<(u64, u64)>,
    in_flight: usize,
    closed: bool,
}

impl WorkQueue {
    fn new(plan: Vec<(u64, u64)>) -> Self {
        WorkQueue {
            state: Mutex::new(QueueState {
                plan,
                next: 0,
                retries: VecDeque::new(),
                in_flight: 0,
                closed: false,
            }),
            wake_workers: Notify::new(),
            drained: Notify::new(),
        }
    }

    async fn next(&self) -> Option<(u64, u64)> {
        loop {
            let notified = self.wake_workers.notified();
            {
                let mut s = self.state.lock().ok()?;
                if s.closed {
                    return None;
                }
                if let Some(item) = s.retries.pop_front() {
                    s.in_flight += 1;
                    return Some(item);
                }
                if s.next < s.plan.len() {
                    let item = s.plan[s.next];
                    s.next += 1;
                    s.in_flight += 1;
                    return Some(item);
                }
            }
            notified.await;
        }
    }

    fn complete(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 && s.retries.is_empty() && s.next == s.plan.len() {
                self.drained.notify_one();
            }
        }
    }

    fn is_drained(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.in_flight == 0 && s.retries.is_empty() && s.next == s.plan.len())
            .unwrap_or(true)
    }

    fn retry(&self, item: (u64, u64)) {
        if let Ok(mut s) = self.state.lock() {
            s.retries.push_back(item);
        }
        self.wake_workers.notify_one();
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.wake_workers.notify_waiters();
    }
}

/// What the receiver reported on success: its root hash, installed path, replaced path.
type Installed = (Hash, Vec<u8>, Option<Vec<u8>>);

/// State shared by the workers and the control loop of one attempt.
struct Shared {
    scan: Scan,
    queue: WorkQueue,
    hashes: Mutex<Vec<Vec<Option<Hash>>>>,
    decider: Mutex<AutoDecider>,
    limiter: Option<RateLimiter>,
    encoded: AtomicU64,
    sent_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    chunks_sent: AtomicU64,
    fault: Option<Fault>,
    fault_target: Option<(u64, u64)>,
    fault_fired: std::sync::atomic::AtomicBool,
    started: Instant,
    /// Chunk buffers shared by the encoders; at most one spare per stream is kept.
    pool: crate::io::BufferPool,
    /// Time the data streams spent blocked writing (link-bound) and waiting for a frame from
    /// their encoder (encoder-bound) since the last progress report, for `auto`.
    write_blocked_ns: AtomicU64,
    write_idle_ns: AtomicU64,
}

async fn resolve(addr: &str) -> Result<std::net::SocketAddr, Error> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Connect {
            addr: addr.to_string(),
            reason: format!("cannot resolve: {e} (expected HOST:PORT)"),
        })?;
    addrs.next().ok_or_else(|| Error::Connect {
        addr: addr.to_string(),
        reason: "resolves to no address".into(),
    })
}

async fn attempt_once(
    cfg: &SendConfig,
    resume: bool,
    totals: &mut Totals,
) -> Result<SendSummary, Error> {
    let src = cfg.src.clone();
    let chunk_size = cfg.chunk_size;
    let scanned = tokio::task::spawn_blocking(move || scan(&src, chunk_size))
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    let manifest = &scanned.manifest;
    let addr = resolve(&cfg.addr).await?;
    let crypto = client_crypto(&cfg.identity, cfg.peer)?;
    let (endpoint, conn) =
        crate::quic::connect(addr, crypto, cfg.connect_timeout, &cfg.transport).await?;
    let (mut ctl_send, mut ctl_recv) = conn
        .open_bi()
        .await
        .map_err(|e| crate::io::connection_error(&e))?;

    // Manifest.
    let mut msgs = Vec::with_capacity(manifest.entries.len() + 2);
    msgs.push(ControlMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        dest: cfg.dest.as_bytes().to_vec(),
        root_kind: manifest.root_kind,
        chunk_size: manifest.chunk_size,
        entry_count: manifest.entries.len() as u64,
        total_bytes: manifest.total_bytes,
        resume,
        install: !cfg.stage_only,
        sender_info: format!(
            "shardsend {} compress={}",
            env!("CARGO_PKG_VERSION"),
            cfg.compress
        ),
    }));
    msgs.extend(manifest.entries.iter().cloned().map(ControlMsg::Entry));
    msgs.push(ControlMsg::ManifestEnd {
        manifest_hash: manifest.manifest_hash,
    });
    write_controls(&mut ctl_send, &msgs).await?;
    drop(msgs);

    // What the receiver already has.
    let mut hashes: Vec<Vec<Option<Hash>>> = (0..manifest.entries.len())
        .map(|i| vec![None; manifest.chunk_count(i) as usize])
        .collect();
    let resumed_bytes = loop {
        match read_control(&mut ctl_recv).await? {
            Some(ControlMsg::Have { file, chunks }) => {
                let slot = hashes.get_mut(file as usize).ok_or_else(|| {
                    Error::Other(format!("receiver reported unknown entry {file}"))
                })?;
                for (chunk, hash) in chunks {
                    if let Some(s) = slot.get_mut(chunk as usize) {
                        *s = Some(hash);
                    }
                }
            }
            Some(ControlMsg::Accept { verified_bytes }) => break verified_bytes,
            Some(ControlMsg::Fail { code, message }) => {
                return Err(Error::Refused { code, message })
            }
            Some(other) => {
                return Err(Error::Other(format!(
                    "unexpected answer from the receiver: {other:?}"
                )))
            }
            None => {
                return Err(Error::Interrupted(
                    "receiver closed the control stream".into(),
                ))
            }
        }
    };
    let mut plan = Vec::new();
    let mut chunks_resumed = 0u64;
    for (f, per_file) in hashes.iter().enumerate() {
        for (c, h) in per_file.iter().enumerate() {
            if h.is_some() {
                chunks_resumed += 1;
            } else {
                plan.push((f as u64, c as u64));
            }
        }
    }
    let chunks_total = manifest.total_chunks();
    tracing::info!(
        chunks = chunks_total,
        to_send = plan.len(),
        resumed_bytes,
        "receiver accepted"
    );

    let progress = make_progress_bar(cfg.progress, manifest.total_bytes, resumed_bytes);
    let fault_target = plan.first().copied();
    let shared = Arc::new(Shared {
        queue: WorkQueue::new(plan),
        hashes: Mutex::new(hashes),
        decider: Mutex::new(AutoDecider::new(cfg.compress, cfg.bwlimit)),
        limiter: cfg.bwlimit.map(RateLimiter::new),
        encoded: AtomicU64::new(0),
        sent_bytes: AtomicU64::new(0),
        wire_bytes: AtomicU64::new(0),
        chunks_sent: AtomicU64::new(0),
        fault: cfg.fault,
        fault_target,
        fault_fired: std::sync::atomic::AtomicBool::new(false),
        started: Instant::now(),
        pool: crate::io::BufferPool::new(cfg.streams),
        write_blocked_ns: AtomicU64::new(0),
        write_idle_ns: AtomicU64::new(0),
        scan: scanned,
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.streams {
        workers.spawn(worker(conn.clone(), shared.clone()));
    }

    // Control loop.
    let mut done_sent = false;
    let mut chunks_retried = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let result: Result<Installed, Error> = loop {
        if !done_sent && shared.queue.is_drained() {
            // A pre-copy of a live tree may see it change: the final pass will resend those
            // files. Only an install needs a consistent snapshot.
            let s2 = shared.clone();
            let changed = if cfg.stage_only {
                Vec::new()
            } else {
                tokio::task::spawn_blocking(move || changed_since_scan(&s2.scan))
                    .await
                    .map_err(|e| Error::Other(e.to_string()))?
            };
            if !changed.is_empty() {
                let msg = format!("{} changed during the send", changed.join(", "));
                let _ = write_control(
                    &mut ctl_send,
                    &ControlMsg::Fail {
                        code: FailCode::Aborted,
                        message: msg.clone(),
                    },
                )
                .await;
                break Err(Error::SourceChanged(msg));
            }
            let root = root_hash(&shared)?;
            write_control(&mut ctl_send, &ControlMsg::Done { root_hash: root }).await?;
            done_sent = true;
            progress.set_message("verifying and installing");
        }
        tokio::select! {
            msg = read_control(&mut ctl_recv) => match msg? {
                Some(ControlMsg::Progress { verified_bytes, wire_bytes, .. }) => {
                    progress.set_position(resumed_bytes + verified_bytes);
                    let blocked = shared.write_blocked_ns.swap(0, Ordering::Relaxed);
                    let idle = shared.write_idle_ns.swap(0, Ordering::Relaxed);
                    if let Ok(mut d) = shared.decider.lock() {
                        d.observe_wire(shared.started.elapsed().as_secs_f64(), wire_bytes, blocked > idle);
                    }
                }
                Some(ControlMsg::Retry { file, chunk, reason }) => {
                    tracing::warn!(file, chunk, %reason, "receiver asked for a chunk again");
                    chunks_retried += 1;
                    done_sent = false;
                    shared.queue.retry((file, chunk));
                }
                Some(ControlMsg::Installed { root_hash, path, replaced }) => {
                    break Ok((root_hash, path, replaced));
                }
                Some(ControlMsg::Staged { root_hash }) if cfg.stage_only => {
                    break Ok((root_hash, Vec::new(), None));
                }
                Some(ControlMsg::Fail { code, message }) => break Err(match code {
                    FailCode::Verification => Error::Verification(message),
                    _ => Error::Refused { code, message },
                }),
                Some(other) => break Err(Error::Other(format!("unexpected message {other:?}"))),
                None => break Err(Error::Interrupted("receiver closed the control stream".into())),
            },
            () = shared.queue.drained.notified() => {}
            _ = tick.tick() => {}
            Some(joined) = workers.join_next() => {
                if let Ok(Err(e)) = joined {
                    break Err(e);
                }
            }
        }
    };
    shared.queue.close();
    progress.finish_and_clear();
    totals.sent_bytes += shared.sent_bytes.load(Ordering::Relaxed);
    totals.wire_bytes += shared.wire_bytes.load(Ordering::Relaxed);
    totals.chunks_sent += shared.chunks_sent.load(Ordering::Relaxed);
    totals.chunks_retried += chunks_retried;
    let outcome = result.and_then(|(their_root, path, replaced)| {
        let ours = root_hash(&shared)?;
        if ours != their_root {
            return Err(Error::Verification(format!(
                "receiver installed root hash {} but ours is {}",
                hex(&their_root),
                hex(&ours)
            )));
        }
        Ok((ours, path, replaced))
    });
    let quic = QuicStats::of(&conn);
    tracing::debug!(?quic, "path statistics");
    conn.close(0u32.into(), b"done");
    // The receiver already answered (installed, staged or failed), so nothing is left to
    // deliver but CONNECTION_CLOSE, which the endpoint driver sends on its next poll. Waiting
    // out the whole draining period (3 PTOs, ~80 ms even on loopback) would only add to every
    // pass, and a migration's final pass runs while the repository is read-only. If the close
    // is lost, the receiver drops the connection on its own after its 5 s grace.
    let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
    while workers.join_next().await.is_some() {}
    let (root, path, replaced) = outcome?;
    let m = &shared.scan.manifest;
    let decision = shared
        .decider
        .lock()
        .map(|d| d.decide_at(shared.started.elapsed().as_secs_f64()))
        .map_err(|_| Error::Other("decider lock poisoned".into()))?;
    Ok(SendSummary {
        source: cfg.src.display().to_string(),
        receiver: cfg.addr.clone(),
        dest: cfg.dest.clone(),
        installed_path: String::from_utf8_lossy(&path).into_owned(),
        staged_only: cfg.stage_only,
        replaced: replaced.map(|r| String::from_utf8_lossy(&r).into_owned()),
        entries: m.entries.len() as u64,
        files: m
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count() as u64,
        bytes: m.total_bytes,
        sent_bytes: totals.sent_bytes,
        resumed_bytes,
        wire_bytes: totals.wire_bytes,
        chunk_size: m.chunk_size,
        chunks: chunks_total,
        chunks_sent: totals.chunks_sent,
        chunks_resumed,
        chunks_retried: totals.chunks_retried,
        seconds: 0.0,
        mb_per_s: 0.0,
        streams: cfg.streams,
        bwlimit: cfg.bwlimit,
        compression: decision,
        root_hash: hex(&root),
        attempts: 1,
        skipped: shared.scan.skipped.clone(),
        quic,
    })
}

fn root_hash(shared: &Shared) -> Result<Hash, Error> {
    let hashes = shared
        .hashes
        .lock()
        .map_err(|_| Error::Other("hash table lock poisoned".into()))?;
    let mut root = RootHasher::new(&shared.scan.manifest.manifest_hash);
    for per_file in hashes.iter() {
        for h in per_file {
            root.add_chunk(
                h.as_ref()
                    .ok_or_else(|| Error::Other("a chunk has no hash at Done".into()))?,
            );
        }
    }
    Ok(root.finish())
}

fn make_progress_bar(enabled: bool, total: u64, start: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Buffers and codec contexts an encoder reuses for every chunk (one set per stream, rather
/// than per blocking thread: they are the bulk of the sender's memory).
struct Buffers {
    read: Vec<u8>,
    compressed: Vec<u8>,
    /// Decompression target when sampling (measuring) the codec.
    scratch: Vec<u8>,
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// What the blocking encoder decided for one chunk.
struct Encoded {
    codec: Codec,
    hash: Hash,
    sample: Option<CodecSample>,
    /// The raw bytes, when they were mapped rather than read into `Buffers::read`.
    mapped: Option<memmap2::Mmap>,
}

/// Files at least this large are read through a memory mapping (see `encode_chunk`).
const MMAP_MIN_FILE_SIZE: u64 = 16 << 20;

/// A chunk frame ready to be written.
struct Frame {
    header: ChunkHeader,
    payload: bytes::Bytes,
}

/// One data stream: an encoder task (read, hash, compress on a blocking thread) feeding a
/// writer (this task) through a one-slot channel, so the next chunk is read while the
/// current one is written. Payloads move into quinn as `Bytes`, without a copy.
async fn worker(conn: quinn::Connection, shared: Arc<Shared>) -> Result<(), Error> {
    let mut stream = conn
        .open_uni()
        .await
        .map_err(|e| crate::io::connection_error(&e))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(1);
    let encoder = tokio::spawn(encoder(shared.clone(), tx));
    let lost = |e: quinn::WriteError| match e {
        quinn::WriteError::ConnectionLost(c) => crate::io::connection_error(&c),
        other => Error::Interrupted(other.to_string()),
    };
    loop {
        let waited = Instant::now();
        let Some(frame) = rx.recv().await else {
            break;
        };
        shared
            .write_idle_ns
            .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let writing = Instant::now();
        let h = &frame.header;
        let wire = ChunkHeader::LEN as u64 + h.payload_len;
        let header = bytes::Bytes::copy_from_slice(&h.encode());
        match &shared.limiter {
            None => {
                let mut parts = [header, frame.payload.clone()];
                stream.write_all_chunks(&mut parts).await.map_err(lost)?;
            }
            Some(limiter) => {
                // Paced in small pieces (zero-copy slices) so a capped send has no bursts.
                stream.write_all(&header).await.map_err(lost)?;
                limiter.reserve(header.len() as u64).await;
                let mut at = 0;
                while at < frame.payload.len() {
                    let end = (at + RateLimiter::PIECE).min(frame.payload.len());
                    limiter.reserve((end - at) as u64).await;
                    stream
                        .write_chunk(frame.payload.slice(at..end))
                        .await
                        .map_err(lost)?;
                    at = end;
                }
            }
        }
        shared
            .write_blocked_ns
            .fetch_add(writing.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Ok(mut hashes) = shared.hashes.lock() {
            if let Some(slot) = hashes
                .get_mut(h.file as usize)
                .and_then(|v| v.get_mut(h.chunk as usize))
            {
                *slot = Some(h.hash);
            }
        }
        shared.sent_bytes.fetch_add(h.raw_len, Ordering::Relaxed);
        shared.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        shared.chunks_sent.fetch_add(1, Ordering::Relaxed);
        shared.queue.complete();
    }
    let _ = stream.finish();
    encoder
        .await
        .map_err(|e| Error::Other(format!("encoder task failed: {e}")))?
}

async fn encoder(shared: Arc<Shared>, tx: tokio::sync::mpsc::Sender<Frame>) -> Result<(), Error> {
    // Payloads stay alive in quinn until acknowledged; the shared pool gets them back then.
    let pool = shared.pool.clone();
    let mut bufs = Buffers {
        read: pool.take(),
        compressed: Vec::new(),
        scratch: Vec::new(),
        compressor: None,
        decompressor: None,
    };
    while let Some((file, chunk)) = shared.queue.next().await {
        let m = &shared.scan.manifest;
        let len = m
            .chunk_len(file as usize, chunk)
            .ok_or_else(|| Error::Other(format!("chunk {chunk} of entry {file} does not exist")))?;
        let offset = chunk * m.chunk_size;
        let path = shared.scan.sources[file as usize].clone();
        let n = shared.encoded.fetch_add(1, Ordering::Relaxed);
        let (compress, sample, level) = {
            let d = shared
                .decider
                .lock()
                .map_err(|_| Error::Other("decider lock poisoned".into()))?;
            let now = shared.started.elapsed().as_secs_f64();
            (d.decide_at(now).compress, d.should_sample(n), d.level())
        };
        let (b, encoded) = tokio::task::spawn_blocking(move || {
            let r = encode_chunk(&path, offset, len, compress, sample, level, &mut bufs);
            (bufs, r.map_err(|e| Error::io(&path, e)))
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
        bufs = b;
        let encoded = encoded?;
        if let (Some(s), Ok(mut d)) = (encoded.sample, shared.decider.lock()) {
            d.add_sample(s);
        }
        // The payload leaves with the frame; the next chunk takes a buffer from the pool.
        let mut encoded = encoded;
        if let Some(m) = encoded.mapped.take() {
            let frame = Frame {
                header: ChunkHeader {
                    file,
                    chunk,
                    offset,
                    raw_len: len,
                    codec: Codec::Raw,
                    payload_len: len,
                    hash: encoded.hash,
                },
                payload: bytes::Bytes::from_owner(m),
            };
            if shared.fault.is_none() {
                if tx.send(frame).await.is_err() {
                    break;
                }
                continue;
            }
            // Fault injection needs a mutable copy of the payload.
            bufs.read.clear();
            bufs.read.extend_from_slice(&frame.payload);
            encoded.codec = Codec::Raw;
        }
        let mut payload: Vec<u8> = match encoded.codec {
            Codec::Raw => {
                let mut v = std::mem::replace(&mut bufs.read, pool.take());
                v.truncate(len as usize);
                v
            }
            Codec::Zstd => std::mem::take(&mut bufs.compressed),
            Codec::Zero => Vec::new(),
        };
        if !sample && bufs.scratch.capacity() > 0 {
            bufs.scratch = Vec::new(); // sampling is over for now: give the memory back
        }
        if shared.fault.is_some()
            && shared.fault_target == Some((file, chunk))
            && !payload.is_empty()
        {
            let first = !shared.fault_fired.swap(true, Ordering::Relaxed);
            if first || shared.fault == Some(Fault::CorruptAlways) {
                tracing::warn!(file, chunk, "injecting a corrupted byte (test fault)");
                payload[0] ^= 0xff;
            }
        }
        let header = ChunkHeader {
            file,
            chunk,
            offset,
            raw_len: len,
            codec: encoded.codec,
            payload_len: payload.len() as u64,
            hash: encoded.hash,
        };
        let frame = Frame {
            header,
            payload: pool.into_bytes(payload),
        };
        if tx.send(frame).await.is_err() {
            break; // the writer stopped: its error is the one reported
        }
    }
    Ok(())
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
    next_data as u64 >= offset + len
}

fn zero_hash(len: u64) -> Hash {
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
/// `pread` writes straight into the spare capacity.
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
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += n as usize;
        // SAFETY: pread initialised bytes [0, done).
        unsafe { buf.set_len(done) };
    }
    Ok(())
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

/// Reads, hashes and (maybe) compresses one chunk into `bufs`. Runs on a blocking thread.
fn encode_chunk(
    path: &Path,
    offset: u64,
    len: u64,
    compress: bool,
    sample: bool,
    level: i32,
    bufs: &mut Buffers,
) -> io::Result<Encoded> {
    let file = File::open(path)?;
    let shrank = || io::Error::other("file shrank while being read (source changed)");
    if is_hole(&file, offset, len) {
        return Ok(Encoded {
            codec: Codec::Zero,
            hash: zero_hash(len),
            sample: None,
            mapped: None,
        });
    }
    let size = file.metadata()?.len();
    if size < offset + len {
        return Err(shrank());
    }
    // Large files (packs) are mapped: hashing and quinn read the page cache directly, saving
    // the pread copy (~15% of the sender's CPU, measured with perf). Git never truncates a
    // pack in place; a file truncated under the mapping would kill us with SIGBUS, which is
    // why small, mutable files (refs, config, index) are read with pread instead.
    let mapped = if size >= MMAP_MIN_FILE_SIZE {
        // SAFETY: see above; the length was checked against the file size just before.
        let m = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len as usize)
                .populate()
                .map(&file)?
        };
        Some(m)
    } else {
        read_exact_at_uninit(&file, &mut bufs.read, len as usize, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                shrank()
            } else {
                e
            }
        })?;
        None
    };
    let raw: &[u8] = match &mapped {
        Some(m) => m,
        None => &bufs.read[..],
    };
    let hash = *blake3::hash(raw).as_bytes();
    if raw.iter().all(|b| *b == 0) {
        return Ok(Encoded {
            codec: Codec::Zero,
            hash,
            sample: None,
            mapped: None,
        });
    }
    if !compress && !sample {
        return Ok(Encoded {
            codec: Codec::Raw,
            hash,
            sample: None,
            mapped,
        });
    }
    let t0 = thread_cpu_secs();
    let bound = zstd::zstd_safe::compress_bound(raw.len());
    bufs.compressed.clear();
    bufs.compressed.reserve(bound);
    if bufs.compressor.as_ref().map(|(l, _)| *l) != Some(level) {
        bufs.compressor = Some((level, zstd::bulk::Compressor::new(level)?));
    }
    let (_, comp) = bufs
        .compressor
        .as_mut()
        .ok_or_else(|| io::Error::other("no compressor"))?;
    comp.compress_to_buffer(raw, &mut bufs.compressed)?;
    let compress_secs = thread_cpu_secs() - t0;
    let mut sample_out = None;
    if sample {
        let t1 = thread_cpu_secs();
        if bufs.decompressor.is_none() {
            bufs.decompressor = Some(zstd::bulk::Decompressor::new()?);
        }
        let dec = bufs
            .decompressor
            .as_mut()
            .ok_or_else(|| io::Error::other("no decompressor"))?;
        crate::compress::decompress_into(dec, &bufs.compressed, len, &mut bufs.scratch)
            .map_err(|e| io::Error::other(format!("zstd round trip failed: {e}")))?;
        sample_out = Some(CodecSample {
            raw_bytes: len,
            compressed_bytes: (bufs.compressed.len() as u64).min(len),
            compress_secs,
            decompress_secs: thread_cpu_secs() - t1,
        });
    }
    let codec = if bufs.compressed.len() < raw.len() {
        Codec::Zstd
    } else {
        Codec::Raw
    };
    Ok(Encoded {
        codec,
        hash,
        sample: sample_out,
        mapped: mapped.filter(|_| codec == Codec::Raw),
    })
}
