//! `shardsend`: scan, connect, send what the receiver lacks, verify, report.
//!
//! This is the async driver; the protocol's decisions live in [`session::SenderSession`]
//! (sans-io). One attempt: scan the source ([`crate::scan`]), connect with the pinned key,
//! write the session's manifest, then loop: feed the session every event (control messages,
//! read by their own task; timeouts) and carry out its outputs (write a control message,
//! enqueue the plan, re-stat the sources, report progress, finish). The data streams feed
//! the session what they did (chunk written, source vanished) under its lock, without waking
//! the control loop, and pass on what it then asks. Each data stream is a worker: an encoder
//! ([`codec`], reading through [`source`]) feeding a writer through a one-slot channel, so the
//! next chunk is read while the current one is written; chunks come from the shared
//! [`queue::WorkQueue`].
//!
//! Around attempts ([`send`]): an attempt whose source changed is abandoned and a resumed one
//! starts (the changed files are re-sent whole, everything else is kept): up to
//! [`MAX_ATTEMPTS`] for an installing pass, [`MAX_STAGE_ATTEMPTS`] with a pause between them
//! for a pre-copy, whose last attempt ends partial rather than failed.
//!
//! A connection lost mid-transfer (a cut link, a receiver that restarted) is connected again
//! and resumed, within `retry_for` per outage; [`reconnect`] decides when, what is worth it,
//! and when to give up. Each new connection asks to resume, so the receiver's `Have` leaves
//! out every chunk it verified before the loss.
//!
//! A receiver at its transfer limit puts us in line and says where we stand (`Queued`,
//! protocol version 2; see [`crate::admission`]): we report it ([`SendEvent`]) and wait, up to
//! `wait_for`, for its `Accept`.
//!
//! Resume never re-reads verified data: the root hash uses the chunk hashes the receiver
//! reports, which it journaled only after they matched the hashes we sent at the time.
//!
//! Memory: each worker owns one read buffer and one compression buffer of `chunk_size`;
//! quinn buffers at most its send window. Neither grows with the transfer's size.

pub mod codec;
pub mod fault;
pub mod progress;
pub mod queue;
pub mod reconnect;
pub mod session;
pub mod source;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::compress::{AutoDecider, CompressPolicy, Decision, Handed};
use crate::error::Error;
use crate::gitdir::{GitFormats, GitMode};
use crate::identity::{client_crypto, Fingerprint, Identity};
use crate::io::{read_control, write_control, BufferPool, RateLimiter};
use crate::path_memory::Ending as PathEnding;
use crate::scan::{changed_since_scan, scan, Scan, ScanOptions};
use crate::wire::{hex, ChunkHeader, Codec, ControlMsg, EntryKind, OwnerPolicy};

use codec::{encode_chunk, Buffers, EncodeChoice};
pub use fault::Fault;
use fault::FaultInjector;
use queue::WorkQueue;
use reconnect::{Reconnector, Verdict};
use session::{Ending, SenderInput, SenderOutput, SenderSession, SenderSessionConfig, SenderStats};
use source::{source_gone, ChunkSource};

/// Default chunk size: large enough to amortise per-frame cost, small enough that a resume
/// re-sends little (at most `streams` chunks were in flight).
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;
/// Default number of parallel data streams.
pub const DEFAULT_STREAMS: usize = 4;
/// Attempts of an installing pass when the source keeps changing under us (it should be
/// frozen: changes mean someone is still writing).
pub const MAX_ATTEMPTS: u32 = 3;
/// Attempts of a pre-copy (`--stage-only`) whose source files vanish while being read (a
/// `git gc` deleting packs it has just rewritten). Each attempt re-sends only what changed,
/// after a pause that lets the gc finish ([`stage_backoff`]); if the source still has not
/// held still, the last attempt ends with a partial pre-copy rather than an error.
pub const MAX_STAGE_ATTEMPTS: u32 = 8;
/// Default of `shardsend --wait-for`: how long a sender waits in a busy receiver's line.
pub const DEFAULT_WAIT_FOR: Duration = Duration::from_secs(600);
/// How long the sender lets its endpoint driver flush CONNECTION_CLOSE before returning.
const CLOSE_FLUSH: Duration = Duration::from_millis(3);

/// Everything `shardsend` needs for one transfer.
pub struct SendConfig {
    pub src: PathBuf,
    /// `HOST:PORT` of the receiver.
    pub addr: String,
    pub dest: String,
    pub identity: Arc<Identity>,
    /// The receiver's key fingerprints we accept (`--peer`, repeatable), preferred first: the
    /// server name asks for them in this order ([`crate::identity::server_name_for`]).
    pub peers: Vec<Fingerprint>,
    pub compress: CompressPolicy,
    pub streams: usize,
    pub bwlimit: Option<u64>,
    pub resume: bool,
    pub chunk_size: u64,
    pub progress: bool,
    pub fault: Option<Fault>,
    /// Verify into the receiver's staging area without installing (pre-copy).
    pub stage_only: bool,
    /// Git directory rules ([`crate::gitdir`]).
    pub git: GitMode,
    /// How long to wait for the receiver to answer the handshake.
    pub connect_timeout: Duration,
    /// How long to wait in line when the receiver is at its transfer limit (0: not at all).
    pub wait_for: Duration,
    /// Where to report what happens while we wait ([`SendEvent`]).
    pub events: Option<EventSink>,
    /// Congestion controller and other transport choices.
    pub transport: crate::quic::TransportOptions,
    /// How long one outage may last while we reconnect to resume (0: fail at once);
    /// see [`reconnect`].
    pub retry_for: Duration,
    /// Who should own the installed files ([`crate::owner`]).
    pub owner: OwnerPolicy,
    /// Absolute directories symlinks leaving the tree may point into
    /// (`--allow-external-link`; checked by both sides).
    pub external_links: Vec<Vec<u8>>,
    /// Make a repository that borrows objects (alternates) self-contained on the receiver
    /// ([`crate::dissociate`]).
    pub dissociate: bool,
    /// The orchestrator's transfer ticket, for a receiver that requires one
    /// ([`crate::ticket`]).
    pub ticket: Option<String>,
    /// In git mode, wait up to this long before sending while git's gc/repack rewrites the
    /// repository ([`crate::git_maintenance`]); `None`: do not look.
    pub repack_wait: Option<Duration>,
    /// In git mode, where to remember loose-object directories between passes
    /// ([`crate::scan_cache`]); `None`: every pass reads every directory.
    pub scan_cache: Option<PathBuf>,
    /// Where to remember each receiver's path (window, minimum RTT) so the next transfer
    /// there starts near that rate ([`crate::path_memory`]); `None`: always start cold.
    pub path_memory: Option<PathBuf>,
}

/// Something worth showing while a transfer runs; `shardsend` prints each on stderr (one
/// JSON object per line with `--json`, whose stdout holds only the summary).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SendEvent {
    /// The receiver runs `active` transfers, its `limit`: we wait, `position` in line.
    Queued {
        position: u64,
        active: u64,
        limit: u64,
        waited_seconds: f64,
    },
    /// The receiver took us after we waited in line.
    Admitted { waited_seconds: f64 },
    /// The connection to the receiver was lost (or a new one got no answer): we connect
    /// again to resume, try `try_number` of this outage, which began `waited_seconds` ago.
    Reconnecting {
        reason: String,
        try_number: u32,
        waited_seconds: f64,
        retry_for_seconds: f64,
    },
    /// Connected again after an outage of `waited_seconds`; resuming.
    Reconnected { waited_seconds: f64, tries: u32 },
    /// Bytes done of the tree (resumed ones included) and this run's rate (resumed ones
    /// excluded): at the receiver's `Accept`, on each of its progress reports, and once it
    /// verified everything ([`progress`]).
    Progress(progress::ProgressReport),
}

/// Receives [`SendEvent`]s.
pub type EventSink = Arc<dyn Fn(&SendEvent) + Send + Sync>;

/// The `--json` summary (read back by `shardmove`, hence `Deserialize`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    /// Bytes sent in this run (`sent_bytes`) over wall time, MB/s (10^6): what an earlier
    /// run left verified (`resumed_bytes`) is not in it.
    pub mb_per_s: f64,
    pub streams: usize,
    pub bwlimit: Option<u64>,
    pub compression: Decision,
    pub root_hash: String,
    pub attempts: u32,
    pub skipped: Vec<String>,
    /// True when the source was sent as a git directory (transient files left out).
    pub git: bool,
    /// git's transient files and directories left out (quarantines, locks, temporary packs).
    pub transient_skipped: u64,
    /// Who owns the installed files: `receiver` (the user running shardrecv), `preserve`
    /// (numeric ids as here), or `preserve, mapping ...` (`--chown`, `--map-owner`).
    #[serde(default)]
    pub owner: String,
    /// Paths sent as hardlinks to an earlier path of the same file.
    #[serde(default)]
    pub hardlinks: u64,
    /// Symlinks leaving the tree, sent because `--allow-external-link` allowed them.
    #[serde(default)]
    pub external_links: u64,
    /// Objects the repository borrowed through its alternates, sent in an extra pack
    /// (`--dissociate`; 0 when it borrows none).
    #[serde(default)]
    pub borrowed_objects: u64,
    /// False only for a pre-copy whose source never held still over all its attempts: the
    /// receiver keeps what was verified, and the final pass sends the rest.
    pub complete: bool,
    /// Seconds spent waiting in the receiver's line (included in `seconds`).
    pub queued_seconds: f64,
    /// Times the connection was made again after it was lost (each attempt after it resumed).
    #[serde(default)]
    pub reconnects: u32,
    /// QUIC path statistics of the last attempt, for diagnosing slow links.
    pub quic: QuicStats,
    /// In git mode: the repository's formats, read from its config (what git on the
    /// receiving host must read).
    #[serde(default)]
    pub git_formats: Option<GitFormats>,
    /// With `--repack-wait`: the git gc/repack the send waited for before it began, if any,
    /// and how long it waited (included in `seconds`).
    #[serde(default)]
    pub waited_for: Option<String>,
    #[serde(default)]
    pub waited_seconds: f64,
    /// The receiver's key in the last attempt (one of `--peer`): during a key rotation, which
    /// of the pinned keys it presented.
    #[serde(default)]
    pub receiver_key: String,
    /// The protocol version spoken in the last attempt, as negotiated with the receiver:
    /// the previous one ([`crate::wire::PREVIOUS_PROTOCOL_VERSION`]) with an older receiver.
    #[serde(default)]
    pub protocol_version: u16,
    /// In git mode: loose-object directories whose listing from the previous pass was
    /// reused instead of read ([`crate::scan_cache`]).
    #[serde(default)]
    pub scan_cached_dirs: u64,
}

/// What quinn saw of the path.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QuicStats {
    pub mtu: u16,
    pub rtt_ms: f64,
    pub cwnd: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    /// The window the connection started from, remembered from an earlier transfer to this
    /// receiver ([`crate::path_memory`]); `None`: it started cold.
    #[serde(default)]
    pub resumed_window: Option<u64>,
}

impl QuicStats {
    fn of(conn: &quinn::Connection, ending: Option<PathEnding>) -> Self {
        let p = conn.stats().path;
        QuicStats {
            mtu: p.current_mtu,
            rtt_ms: p.rtt.as_secs_f64() * 1e3,
            cwnd: p.cwnd,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            congestion_events: p.congestion_events,
            resumed_window: ending.and_then(|e| e.jumped),
        }
    }
}

/// The file remembering the path to `addr` for the controller the transfer uses there, if
/// it remembers paths and memory is on.
fn path_memory_file(cfg: &SendConfig, addr: SocketAddr) -> Option<PathBuf> {
    let congestion = cfg.transport.congestion.for_peer(addr.ip());
    let dir = cfg.path_memory.as_ref()?;
    congestion
        .remembers_paths()
        .then(|| crate::path_memory::file_for(dir, addr, congestion.name()))
}

/// Sends `cfg.src`, retrying (with resume) when the source changes during the send or the
/// connection is lost.
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
    let before = before_sending_git(cfg).await?;
    let mut resume = cfg.resume;
    let mut totals = Totals::default();
    let max_attempts = if cfg.stage_only {
        MAX_STAGE_ATTEMPTS
    } else {
        MAX_ATTEMPTS
    };
    // Attempts restarted because the source changed (bounded by `max_attempts`); `attempts`
    // also counts those after a lost connection.
    let mut attempt = 1;
    let mut attempts = 1;
    let mut reconnector = Reconnector::new(cfg.retry_for);
    let mut connect_timeout = cfg.connect_timeout;
    loop {
        let last = attempt >= max_attempts;
        let link = Link {
            connect_timeout,
            reconnector: &mut reconnector,
        };
        let result = attempt_once(cfg, resume, last, link, &mut totals).await;
        connect_timeout = cfg.connect_timeout;
        match result {
            Ok(mut summary) => {
                summary.attempts = attempts;
                summary.reconnects = reconnector.reconnects();
                if let Some(git) = &before {
                    summary.git_formats = Some(git.formats.clone());
                    summary.waited_for = git.waited.as_ref().and_then(|w| w.process.clone());
                    summary.waited_seconds = git.waited.as_ref().map_or(0.0, |w| w.seconds);
                }
                summary.seconds = started.elapsed().as_secs_f64();
                // What this run moved: bytes resumed from an earlier run are not in it.
                summary.mb_per_s = summary.sent_bytes as f64 / summary.seconds.max(1e-9) / 1e6;
                return Ok(summary);
            }
            Err(Error::SourceChanged(paths)) if !last => {
                tracing::warn!(%paths, attempt, "source changed during the send; resending changed files");
                resume = true;
                if cfg.stage_only {
                    tokio::time::sleep(stage_backoff(attempt)).await;
                }
                attempt += 1;
            }
            Err(Error::SourceChanged(paths)) => {
                return Err(Error::SourceChanged(format!(
                    "the source kept changing over {max_attempts} attempts (last: {paths}); \
                     freeze it (maintenance mode) and retry"
                )))
            }
            Err(e) => match reconnector.failed(e, Instant::now(), cfg.connect_timeout) {
                Verdict::GiveUp(e) => return Err(e),
                Verdict::Retry {
                    pause,
                    connect_timeout: timeout,
                    event,
                } => {
                    if let SendEvent::Reconnecting {
                        reason, try_number, ..
                    } = &event
                    {
                        tracing::info!(%reason, try_number, "connection to the receiver lost; reconnecting to resume");
                    }
                    report(cfg, &event);
                    tokio::time::sleep(pause).await;
                    connect_timeout = timeout;
                    resume = true;
                }
            },
        }
        attempts += 1;
    }
}

/// What [`before_sending_git`] learnt of a git source.
struct GitSource {
    formats: GitFormats,
    waited: Option<crate::git_maintenance::Waited>,
}

/// For a git directory: waits out git's gc/repack (`cfg.repack_wait`), then reads its
/// formats. `None` for any other source.
async fn before_sending_git(cfg: &SendConfig) -> Result<Option<GitSource>, Error> {
    let src = cfg.src.clone();
    let is_git = match cfg.git {
        GitMode::Off => false,
        GitMode::On => true,
        GitMode::Auto => crate::gitdir::looks_like_git_dir(&src),
    };
    if !is_git {
        if cfg.repack_wait.is_some() && cfg.git == GitMode::Off {
            return Err(Error::Input(
                "--repack-wait needs git mode (not --git off)".into(),
            ));
        }
        return Ok(None);
    }
    let max = cfg.repack_wait;
    tokio::task::spawn_blocking(move || {
        let waited = match max {
            Some(max) => match crate::git_maintenance::wait_until_idle(&src, max)
                .map_err(|e| Error::io(&src, e))?
            {
                Ok(waited) => Some(waited),
                Err(what) => {
                    return Err(Error::SourceBusy(format!(
                        "{} is still being rewritten by git after {} s ({what}): a pre-copy \
                         beside a gc/repack copies the repository twice, a final pass fails; \
                         retry when it ends, or wait longer (--repack-wait)",
                        src.display(),
                        max.as_secs_f64()
                    )))
                }
            },
            None => None,
        };
        let config = match std::fs::read(src.join("config")) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(src.join("config"), e)),
        };
        Ok(Some(GitSource {
            formats: GitFormats::of_config(&config),
            waited,
        }))
    })
    .await
    .map_err(|e| Error::Other(e.to_string()))?
}

/// Passes `event` to the caller's sink, if any.
fn report(cfg: &SendConfig, event: &SendEvent) {
    if let Some(sink) = &cfg.events {
        sink(event);
    }
}

/// How one attempt connects: its connect timeout, and who hears that it did.
struct Link<'a> {
    connect_timeout: Duration,
    reconnector: &'a mut Reconnector,
}

/// Pause before pre-copy attempt `attempt + 1`: 100 ms, doubling, at most 2 s.
pub fn stage_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(2))
}

/// Counters summed over attempts.
#[derive(Default)]
struct Totals {
    queued_seconds: f64,
    sent_bytes: u64,
    wire_bytes: u64,
    chunks_sent: u64,
    chunks_retried: u64,
}

impl Totals {
    fn add(&mut self, stats: &SenderStats) {
        self.queued_seconds += stats.queued_seconds;
        self.sent_bytes += stats.sent_bytes;
        self.wire_bytes += stats.wire_bytes;
        self.chunks_sent += stats.chunks_sent;
        self.chunks_retried += stats.chunks_retried;
    }
}

/// State shared by the control loop and the data streams of one attempt.
struct Shared {
    scan: Arc<Scan>,
    queue: WorkQueue,
    decider: Mutex<AutoDecider>,
    limiter: Option<RateLimiter>,
    /// Chunks handed to encoders so far (which ones to sample).
    encoded: AtomicU64,
    started: Instant,
    /// Chunk buffers shared by the encoders; at most one spare per stream is kept.
    pool: BufferPool,
    /// Frame bytes handed to quinn so far: with the receiver's count, the backlog that tells
    /// `auto` whether the link or the encoders are the bottleneck, and that it bounds. And
    /// the raw bytes of the chunks handed compressed and as they are, whose rates `auto`
    /// compares.
    handed_wire_compressed: AtomicU64,
    handed_wire_plain: AtomicU64,
    handed_raw_compressed: AtomicU64,
    fault: Option<FaultInjector>,
    /// The protocol state. The data streams feed it their chunks directly (a lock per
    /// chunk, no wake-up of the control loop), and pass on what it asks, which is rare.
    session: Mutex<SenderSession>,
    /// Where the data streams pass the session's requests to the control loop.
    events: mpsc::UnboundedSender<DriverEvent>,
}

impl Shared {
    /// Feeds the session from a data stream; its requests go to the control loop. False when
    /// the control loop is gone.
    fn feed(&self, input: SenderInput) -> bool {
        let outputs = match self.session.lock() {
            Ok(mut s) => s.handle(input, Instant::now()),
            Err(_) => return false,
        };
        outputs.is_empty() || self.events.send(DriverEvent::Outputs(outputs)).is_ok()
    }

    /// Counts a frame handed to quinn.
    fn hand(&self, header: &ChunkHeader, wire_len: u64) {
        if header.codec == Codec::Zstd {
            self.handed_wire_compressed
                .fetch_add(wire_len, Ordering::Relaxed);
            self.handed_raw_compressed
                .fetch_add(header.raw_len, Ordering::Relaxed);
        } else {
            self.handed_wire_plain
                .fetch_add(wire_len, Ordering::Relaxed);
        }
    }

    fn handed(&self) -> Handed {
        Handed {
            wire_compressed: self.handed_wire_compressed.load(Ordering::Relaxed),
            wire_plain: self.handed_wire_plain.load(Ordering::Relaxed),
            raw_compressed: self.handed_raw_compressed.load(Ordering::Relaxed),
        }
    }

    /// How long a writer must wait before handing quinn its next frame (`auto`'s bound on
    /// the backlog); `None`: now.
    fn write_delay(&self, conn: &quinn::Connection) -> Option<Duration> {
        let d = self.decider.lock().ok()?;
        let now = self.started.elapsed().as_secs_f64();
        let sent = conn.stats().udp_tx.bytes;
        d.write_delay(now, self.handed().wire(), sent)
            .map(Duration::from_secs_f64)
    }

    fn handle(&self, input: SenderInput) -> Vec<SenderOutput> {
        match self.session.lock() {
            Ok(mut s) => s.handle(input, Instant::now()),
            Err(_) => vec![SenderOutput::Finished(Err(Error::Other(
                "sender session lock poisoned".into(),
            )))],
        }
    }
}

/// What reaches the control loop.
enum DriverEvent {
    Input(SenderInput),
    /// What the session asked while fed by a data stream.
    Outputs(Vec<SenderOutput>),
    /// Reading the control stream failed.
    Failed(Error),
}

/// A name that does not resolve is `Unreachable`: while a lost connection is retried, the
/// resolver may be cut off too; a first attempt reports it at once either way.
async fn resolve(addr: &str) -> Result<std::net::SocketAddr, Error> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Unreachable {
            addr: addr.to_string(),
            reason: format!("cannot resolve: {e} (expected HOST:PORT)"),
        })?;
    addrs.next().ok_or_else(|| Error::Unreachable {
        addr: addr.to_string(),
        reason: "resolves to no address".into(),
    })
}

/// One attempt: scan, handshake, send, and the receiver's verdict. `last` is the last
/// attempt a pre-copy gets: one whose source files vanish then ends partial, not failed.
async fn attempt_once(
    cfg: &SendConfig,
    resume: bool,
    last: bool,
    link: Link<'_>,
    totals: &mut Totals,
) -> Result<SendSummary, Error> {
    let src = cfg.src.clone();
    let cache_file = cfg
        .scan_cache
        .as_ref()
        .filter(|_| cfg.git != GitMode::Off)
        .map(|dir| crate::scan_cache::cache_file(dir, &cfg.src));
    let opts = ScanOptions {
        chunk_size: cfg.chunk_size,
        git: cfg.git,
        external_links: cfg.external_links.clone(),
        dissociate: cfg.dissociate,
        cache_file: cache_file.clone(),
        save_cache: cfg.stage_only,
    };
    let scanning = async {
        tokio::task::spawn_blocking(move || scan(&src, opts))
            .await
            .map_err(|e| Error::Other(e.to_string()))?
    };
    // The handshake runs while the source is scanned: a round trip or two less inside a
    // final pass's read-only window. Whichever fails first ends the attempt.
    let connecting = async {
        let addr = resolve(&cfg.addr).await?;
        let crypto = client_crypto(&cfg.identity, &cfg.peers)?;
        let server_name = crate::identity::server_name_for(&cfg.peers);
        let memory = path_memory_file(cfg, addr);
        let transport = crate::quic::TransportOptions {
            resume: memory
                .as_deref()
                .and_then(|file| crate::path_memory::load(file, SystemTime::now())),
            ..cfg.transport
        };
        let (endpoint, conn) =
            crate::quic::connect(addr, crypto, &server_name, link.connect_timeout, &transport)
                .await?;
        Ok::<_, Error>((endpoint, conn, memory))
    };
    let (scanned, (endpoint, conn, memory)) = tokio::try_join!(scanning, connecting)?;
    // An installing pass needs a frozen source: something vanishing while we list it means
    // it is not. A pre-copy just leaves the vanished entries out.
    if !scanned.vanished.is_empty() && !cfg.stage_only {
        conn.close(1u32.into(), b"source changed");
        let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
        return Err(Error::SourceChanged(format!(
            "{} vanished during the scan",
            scanned.vanished.join(", ")
        )));
    }
    let receiver_key = crate::quic::peer_fingerprint(&conn)
        .map(|fp| fp.to_string())
        .unwrap_or_default();
    // The receiver picked the protocol (ALPN): the previous version when it is one release
    // older (the upgrade rule in `wire`).
    let negotiated = crate::quic::negotiated(&conn)?;
    if negotiated.version != crate::wire::PROTOCOL_VERSION {
        tracing::info!(
            version = negotiated.version,
            alpn = %negotiated.alpn_text(),
            "the receiver speaks an earlier protocol version; speaking it"
        );
    }
    if let Some(event) = link.reconnector.connected(Instant::now()) {
        tracing::info!(?event, "connected to the receiver again; resuming");
        report(cfg, &event);
    }
    let session = SenderSession::new(
        &scanned.manifest,
        SenderSessionConfig {
            dest: cfg.dest.as_bytes().to_vec(),
            resume,
            stage_only: cfg.stage_only,
            last_attempt: last,
            wait_for: cfg.wait_for,
            sender_info: format!(
                "shardsend {} compress={}",
                env!("CARGO_PKG_VERSION"),
                cfg.compress
            ),
            git: scanned.git,
            owner: cfg.owner.clone(),
            external_links: cfg.external_links.clone(),
            ticket: cfg.ticket.clone().unwrap_or_default().into_bytes(),
            version: negotiated.version,
        },
    );
    let result = attempt_on(cfg, session, Arc::new(scanned), &conn, totals).await;
    // The receiver has answered (installed, staged or failed), or we give up: either way it
    // must hear CONNECTION_CLOSE now, which the endpoint driver sends on its next poll (a
    // process that exits without it is noticed only at the receiver's idle timeout, holding
    // a slot or a place in line). Waiting out the whole draining period (3 PTOs, ~80 ms even
    // on loopback) would only add to every pass, and a migration's final pass runs while
    // the repository is read-only.
    let (code, reason): (u32, &[u8]) = match &result {
        Ok(_) => (0, b"done"),
        Err(_) => (1, b"sender stopped"),
    };
    let ending = crate::quic::path_ending(&conn);
    let quic = QuicStats::of(&conn, ending);
    conn.close(code.into(), reason);
    let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
    // Only a transfer that ended well says what the path carries.
    if let (Ok(_), Some(file), Some(ending)) = (&result, &memory, ending) {
        if let Err(e) = crate::path_memory::remember(file, ending, SystemTime::now()) {
            tracing::debug!(file = %file.display(), error = %e, "cannot remember the path");
        }
    }
    let (stats, ending, scan) = result?;
    let (root, path, replaced) = match ending.decision {
        Ending::Verified {
            root_hash,
            path,
            replaced,
        } => (Some(root_hash), path, replaced),
        Ending::Partial => (None, Vec::new(), None),
    };
    // Installed: no later pass needs what this source's directories held.
    if let Some(file) = cache_file.filter(|_| root.is_some() && !cfg.stage_only) {
        let _ = std::fs::remove_file(file);
    }
    let m = &scan.manifest;
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
        resumed_bytes: stats.resumed_bytes,
        wire_bytes: totals.wire_bytes,
        chunk_size: m.chunk_size,
        chunks: m.total_chunks(),
        chunks_sent: totals.chunks_sent,
        chunks_resumed: stats.chunks_resumed,
        chunks_retried: totals.chunks_retried,
        seconds: 0.0,
        mb_per_s: 0.0,
        streams: cfg.streams,
        bwlimit: cfg.bwlimit,
        compression: ending.compression,
        root_hash: root.as_ref().map(hex).unwrap_or_default(),
        attempts: 1,
        skipped: scan.skipped.clone(),
        git: scan.git,
        transient_skipped: scan.transient_skipped,
        owner: crate::owner::describe(&cfg.owner),
        hardlinks: scan.hardlinks,
        external_links: scan.external_links,
        borrowed_objects: scan.borrowed.as_ref().map_or(0, |b| b.objects),
        complete: root.is_some(),
        queued_seconds: totals.queued_seconds,
        reconnects: 0,
        quic,
        git_formats: None,
        waited_for: None,
        waited_seconds: 0.0,
        receiver_key,
        protocol_version: negotiated.version,
        scan_cached_dirs: scan.cached_dirs,
    })
}

/// How an attempt ended, with the compression decision at that point.
struct AttemptEnd {
    decision: Ending,
    compression: Decision,
}

/// The part of an attempt that runs on a connection: the control loop.
async fn attempt_on(
    cfg: &SendConfig,
    session: SenderSession,
    scan: Arc<Scan>,
    conn: &quinn::Connection,
    totals: &mut Totals,
) -> Result<(SenderStats, AttemptEnd, Arc<Scan>), Error> {
    let (mut ctl_send, ctl_recv) = conn
        .open_bi()
        .await
        .map_err(|e| crate::io::connection_error(&e))?;
    tokio::io::AsyncWriteExt::write_all(&mut ctl_send, &session.start_frames(&scan.manifest))
        .await
        .map_err(crate::io::stream_error)?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    // The control stream has its own reader: a read is not cancel-safe, and the loop below
    // waits on several things at once.
    let reader = tokio::spawn(read_controls(ctl_recv, events_tx.clone()));
    let shared = Arc::new(Shared {
        queue: WorkQueue::default(),
        decider: Mutex::new({
            let send_window = cfg.transport.window.unwrap_or(crate::quic::SEND_WINDOW);
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            let d = AutoDecider::new(cfg.compress, cfg.bwlimit, send_window)
                .with_cores(cores.min(cfg.streams));
            if conn.remote_address().ip().is_loopback() {
                d.on_loopback()
            } else {
                d
            }
        }),
        limiter: cfg.bwlimit.map(RateLimiter::new),
        encoded: AtomicU64::new(0),
        started: Instant::now(),
        pool: BufferPool::new(cfg.streams),
        handed_wire_compressed: AtomicU64::new(0),
        handed_wire_plain: AtomicU64::new(0),
        handed_raw_compressed: AtomicU64::new(0),
        fault: cfg.fault.map(FaultInjector::new),
        session: Mutex::new(session),
        events: events_tx,
        scan: scan.clone(),
    });
    let stats = || {
        shared
            .session
            .lock()
            .map(|s| s.stats().clone())
            .unwrap_or_default()
    };
    let progress = make_progress_bar(cfg.progress, scan.manifest.total_bytes);
    let mut workers = tokio::task::JoinSet::new();
    let mut pending: VecDeque<SenderOutput> = VecDeque::new();
    let result: Result<Ending, Error> = loop {
        if let Some(output) = pending.pop_front() {
            match output {
                SenderOutput::Send(msg) => {
                    let is_fail = matches!(msg, ControlMsg::Fail { .. });
                    if matches!(msg, ControlMsg::Done { .. }) {
                        progress.set_message("verifying and installing");
                    }
                    match write_control(&mut ctl_send, &msg).await {
                        // Our own `Fail` is a courtesy: the attempt ends either way.
                        Err(e) if !is_fail => break Err(e),
                        _ => {}
                    }
                }
                SenderOutput::Enqueue(plan) => {
                    let stats = stats();
                    tracing::info!(
                        chunks = scan.manifest.total_chunks(),
                        to_send = plan.len(),
                        resumed_bytes = stats.resumed_bytes,
                        "receiver accepted"
                    );
                    if let Some(f) = &shared.fault {
                        f.aim(&plan);
                    }
                    shared.queue.extend(plan);
                    if workers.is_empty() {
                        for _ in 0..cfg.streams {
                            workers.spawn(worker(conn.clone(), shared.clone()));
                        }
                    }
                }
                SenderOutput::Resend {
                    file,
                    chunk,
                    reason,
                } => {
                    tracing::warn!(file, chunk, %reason, "receiver asked for a chunk again");
                    shared.queue.retry((file, chunk));
                }
                SenderOutput::CheckSource => {
                    let s = scan.clone();
                    match tokio::task::spawn_blocking(move || changed_since_scan(&s)).await {
                        Ok(changed) => {
                            let input = SenderInput::SourceChecked { changed };
                            pending.extend(shared.handle(input));
                        }
                        Err(e) => break Err(Error::Other(format!("source check failed: {e}"))),
                    }
                }
                SenderOutput::Progress { wire_bytes, .. } => {
                    let handed = shared.handed();
                    if let Ok(mut d) = shared.decider.lock() {
                        let now = shared.started.elapsed().as_secs_f64();
                        let more = !shared.queue.is_empty();
                        d.observe_progress(now, handed, wire_bytes, conn.rtt().as_secs_f64(), more);
                    }
                }
                SenderOutput::Event(event) => {
                    if let SendEvent::Queued {
                        position,
                        active,
                        limit,
                        ..
                    } = &event
                    {
                        tracing::info!(
                            position,
                            active,
                            limit,
                            "receiver at its limit: waiting in line"
                        );
                    }
                    if let SendEvent::Progress(r) = &event {
                        show_progress(&progress, r);
                    }
                    report(cfg, &event);
                }
                SenderOutput::Finished(result) => break result,
            }
            continue;
        }
        let timeout = shared.session.lock().ok().and_then(|s| s.poll_timeout());
        let input = tokio::select! {
            event = events.recv() => match event {
                Some(DriverEvent::Input(input)) => input,
                Some(DriverEvent::Outputs(outputs)) => {
                    pending.extend(outputs);
                    continue;
                }
                Some(DriverEvent::Failed(e)) => break Err(e),
                None => SenderInput::ControlClosed,
            },
            () = sleep_until(timeout) => SenderInput::Timeout,
            Some(joined) = workers.join_next() => match joined {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(Error::Other(format!("data stream task failed: {e}"))),
            },
        };
        pending.extend(shared.handle(input));
    };
    shared.queue.close();
    reader.abort();
    progress.finish_and_clear();
    let compression = shared
        .decider
        .lock()
        .map(|d| d.decide())
        .map_err(|_| Error::Other("decider lock poisoned".into()));
    // Workers blocked on a write end when the connection closes; the caller closes it.
    workers.abort_all();
    // What went out counts whether or not the attempt ended well (a lost connection, a
    // changed source): the summary reports what this run put on the wire.
    let stats = stats();
    totals.add(&stats);
    let decision = result?;
    Ok((
        stats,
        AttemptEnd {
            decision,
            compression: compression?,
        },
        scan,
    ))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads the control stream into the control loop until it ends.
async fn read_controls(recv: quinn::RecvStream, tx: mpsc::UnboundedSender<DriverEvent>) {
    // Buffered: a resumed pass reads one `Have` per file (200k in a busy repository), and
    // each unbuffered read locks the connection.
    let mut recv = tokio::io::BufReader::with_capacity(crate::io::CONTROL_READ_BUFFER, recv);
    loop {
        let event = match read_control(&mut recv).await {
            Ok(Some(msg)) => DriverEvent::Input(SenderInput::Control(msg)),
            Ok(None) => DriverEvent::Input(SenderInput::ControlClosed),
            Err(e) => DriverEvent::Failed(e),
        };
        let last = !matches!(event, DriverEvent::Input(SenderInput::Control(_)));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

fn make_progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {prefix} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Draws a [`progress::ProgressReport`]: the bar's own rate estimator would count resumed
/// bytes as if they had just arrived, so the text comes from the report.
fn show_progress(bar: &indicatif::ProgressBar, r: &progress::ProgressReport) {
    use indicatif::{HumanBytes, HumanDuration};
    bar.set_position(r.done_bytes);
    let eta = r.eta_seconds.map_or_else(
        || "-".to_string(),
        |s| HumanDuration(Duration::from_secs_f64(s.min(1e7))).to_string(),
    );
    bar.set_prefix(format!(
        "{}/{} {}/s ETA {eta}",
        HumanBytes(r.done_bytes),
        HumanBytes(r.total_bytes),
        HumanBytes(r.bytes_per_second as u64),
    ));
}

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
    let (tx, mut rx) = mpsc::channel::<Frame>(1);
    let encoder = tokio::spawn(encoder(shared.clone(), tx));
    let lost = |e: quinn::WriteError| match e {
        quinn::WriteError::ConnectionLost(c) => crate::io::connection_error(&c),
        other => Error::Interrupted(other.to_string()),
    };
    loop {
        let Some(frame) = rx.recv().await else {
            break;
        };
        let h = &frame.header;
        let wire_len = ChunkHeader::LEN as u64 + h.payload_len;
        // `auto` bounds what waits in quinn, so its next decision applies to data about to
        // leave (the encoder behind us waits too: its frame is already encoded).
        while let Some(wait) = shared.write_delay(&conn) {
            tokio::time::sleep(wait).await;
        }
        shared.hand(h, wire_len);
        let header = bytes::Bytes::copy_from_slice(&h.encode());
        let payload = match &shared.fault {
            None => frame.payload,
            Some(f) => f.apply((h.file, h.chunk), frame.payload),
        };
        match &shared.limiter {
            None => {
                let mut parts = [header, payload];
                stream.write_all_chunks(&mut parts).await.map_err(lost)?;
            }
            Some(limiter) => {
                // Paced in small pieces (zero-copy slices) so a capped send has no bursts.
                stream.write_all(&header).await.map_err(lost)?;
                limiter.reserve(header.len() as u64).await;
                let mut at = 0;
                while at < payload.len() {
                    let end = (at + RateLimiter::PIECE).min(payload.len());
                    limiter.reserve((end - at) as u64).await;
                    stream
                        .write_chunk(payload.slice(at..end))
                        .await
                        .map_err(lost)?;
                    at = end;
                }
            }
        }
        let written = SenderInput::ChunkWritten {
            file: h.file,
            chunk: h.chunk,
            hash: h.hash,
            raw_len: h.raw_len,
            wire_len,
        };
        if !shared.feed(written) {
            break;
        }
    }
    let _ = stream.finish();
    encoder
        .await
        .map_err(|e| Error::Other(format!("encoder task failed: {e}")))?
}

async fn encoder(shared: Arc<Shared>, tx: mpsc::Sender<Frame>) -> Result<(), Error> {
    // Payloads stay alive in quinn until acknowledged; the shared pool gets them back then.
    let pool = shared.pool.clone();
    let mut bufs = Buffers::new(&pool);
    while let Some((file, chunk)) = shared.queue.next().await {
        let m = &shared.scan.manifest;
        let len = m
            .chunk_len(file as usize, chunk)
            .ok_or_else(|| Error::Other(format!("chunk {chunk} of entry {file} does not exist")))?;
        let offset = chunk * m.chunk_size;
        let path = shared.scan.sources[file as usize].clone();
        let source = match shared.scan.captured.get(&(file as usize)) {
            Some(content) => ChunkSource::Memory(content.clone()),
            None => ChunkSource::File(path.clone()),
        };
        let n = shared.encoded.fetch_add(1, Ordering::Relaxed);
        let choice = {
            let d = shared
                .decider
                .lock()
                .map_err(|_| Error::Other("decider lock poisoned".into()))?;
            EncodeChoice {
                compress: d.decide().compress,
                sample: d.should_sample(n),
                level: d.level(),
            }
        };
        let (b, encoded) = tokio::task::spawn_blocking(move || {
            let r = encode_chunk(&source, offset, len, choice, &mut bufs);
            (bufs, r)
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
        bufs = b;
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) if source_gone(&e) => {
                tracing::info!(path = %path.display(), error = %e, "source vanished or shrank since the scan");
                let gone = SenderInput::ChunkVanished {
                    file,
                    chunk,
                    path: path.display().to_string(),
                };
                if !shared.feed(gone) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        if let (Some(s), Ok(mut d)) = (encoded.sample, shared.decider.lock()) {
            d.add_sample(s);
        }
        let header = ChunkHeader {
            file,
            chunk,
            offset,
            raw_len: len,
            codec: encoded.codec,
            payload_len: 0,
            hash: encoded.hash,
        };
        let payload = encoded.take_payload(&mut bufs, &pool);
        let frame = Frame {
            header: ChunkHeader {
                payload_len: payload.len() as u64,
                ..header
            },
            payload,
        };
        if tx.send(frame).await.is_err() {
            break; // the writer stopped: its error is the one reported
        }
    }
    Ok(())
}
