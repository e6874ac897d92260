//! `shardrecv serve`: the receiving daemon.
//!
//! One task per connection runs one transfer:
//! 1. control stream: `Hello` + entries + `ManifestEnd`, validated by
//!    [`crate::manifest::ManifestBuilder`] before anything touches the disk;
//! 2. the destination is claimed (in-process map, then the staging `flock`), free space is
//!    checked, staging is prepared ([`crate::staging`]) and what an earlier attempt verified
//!    is reported back (`Have`*, `Accept`);
//! 3. data streams carry chunk frames: header checked ([`crate::tracker`]), payload decoded,
//!    hashed, compared, written with a positioned write, journaled; a mismatch asks for the
//!    chunk again (`Retry`) up to [`MAX_CHUNK_ATTEMPTS`] times;
//! 4. on `Done` with every chunk verified and equal root hashes: metadata, `syncfs`, atomic
//!    install, `Installed`.
//!
//! Memory per transfer is bounded by the data streams (one chunk buffer each, at most
//! `MAX_CHUNK_SIZE`) plus quinn's receive window ([`crate::quic::CONNECTION_WINDOW`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::compress::decompress_into;
use crate::error::Error;
use crate::identity::{server_crypto, AllowList, Fingerprint, Identity};
use crate::io::{read_chunk_header, read_control, read_payload, write_control, write_controls};
use crate::manifest::{Manifest, ManifestBuilder};
use crate::staging::{PrepareError, Staging};
use crate::tracker::{ChunkState, ChunkTracker};
use crate::wire::{hex, ChunkHeader, Codec, ControlMsg, FailCode, Hash, MAX_HAVE_PER_FRAME};

/// A chunk failing verification this many times fails the transfer.
pub const MAX_CHUNK_ATTEMPTS: u32 = 3;

/// How `shardrecv serve` runs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    pub identity: Identity,
    pub allow: AllowList,
    /// Transfers served at once; more are refused as busy.
    pub max_transfers: usize,
    /// Congestion controller and other transport choices.
    pub transport: crate::quic::TransportOptions,
}

/// A running receiver; `local_addr` is useful when listening on port 0.
pub struct Receiver {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

struct Shared {
    root: PathBuf,
    max_transfers: usize,
    /// Destinations being received now, with the sender and connection holding each.
    active: Mutex<HashMap<Vec<u8>, ActiveTransfer>>,
}

struct ActiveTransfer {
    sender: Fingerprint,
    since: Instant,
    conn: quinn::Connection,
}

impl Receiver {
    pub fn bind(cfg: ServeConfig) -> Result<Receiver, Error> {
        std::fs::create_dir_all(&cfg.root).map_err(|e| Error::io(&cfg.root, e))?;
        let root = cfg
            .root
            .canonicalize()
            .map_err(|e| Error::io(&cfg.root, e))?;
        let crypto = server_crypto(&cfg.identity, Arc::new(cfg.allow))?;
        let endpoint = crate::quic::server_endpoint(cfg.listen, crypto, &cfg.transport)?;
        Ok(Receiver {
            endpoint,
            shared: Arc::new(Shared {
                root,
                max_transfers: cfg.max_transfers.max(1),
                active: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("endpoint", e))
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                () = &mut shutdown => break,
                inc = self.endpoint.accept() => match inc {
                    Some(i) => i,
                    None => break,
                },
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "handshake failed");
                        return;
                    }
                };
                let peer = peer_fingerprint(&conn);
                if let Err(e) = handle_connection(shared, conn.clone(), peer).await {
                    tracing::warn!(%remote, error = %e, "transfer ended with an error");
                }
                // The destination is released; let the sender read our last frame and close.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            });
        }
        self.endpoint.close(0u32.into(), b"receiver shutting down");
        self.endpoint.wait_idle().await;
    }
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_certificate(certs.first()?).ok()
}

/// Releases the in-process claim on a destination when the transfer ends.
struct Claim {
    shared: Arc<Shared>,
    dest: Vec<u8>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut a) = self.shared.active.lock() {
            a.remove(&self.dest);
        }
    }
}

async fn fail(send: &mut quinn::SendStream, code: FailCode, message: String) -> Error {
    tracing::warn!(?code, %message, "refusing transfer");
    let _ = write_control(
        send,
        &ControlMsg::Fail {
            code,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    Error::Refused { code, message }
}

/// How long a resumed attempt waits for the attempt it supersedes to let go.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(10);

/// Claims `dest` for this connection. A sender that comes back with `--resume` while its
/// previous attempt still holds the destination (a killed process leaves a QUIC connection
/// that only times out later) supersedes that attempt: same key, so same operator. Anyone
/// else is refused as busy.
async fn claim(
    shared: &Arc<Shared>,
    dest: &[u8],
    peer: Fingerprint,
    resume: bool,
    conn: &quinn::Connection,
) -> Result<Claim, String> {
    let dest_text = String::from_utf8_lossy(dest).into_owned();
    let deadline = Instant::now() + SUPERSEDE_WAIT;
    loop {
        {
            let mut active = shared
                .active
                .lock()
                .map_err(|_| "internal error: lock poisoned".to_string())?;
            match active.get(dest) {
                None if active.len() >= shared.max_transfers => {
                    return Err(format!(
                        "receiver is running {} transfers, its limit; retry later",
                        active.len()
                    ))
                }
                None => {
                    active.insert(
                        dest.to_vec(),
                        ActiveTransfer {
                            sender: peer,
                            since: Instant::now(),
                            conn: conn.clone(),
                        },
                    );
                    return Ok(Claim {
                        shared: shared.clone(),
                        dest: dest.to_vec(),
                    });
                }
                Some(t) if t.sender == peer && resume && Instant::now() < deadline => {
                    if t.conn.close_reason().is_none() {
                        tracing::info!(dest = %dest_text, "a resumed attempt supersedes the previous one");
                        t.conn
                            .close(1u32.into(), b"superseded by a resumed attempt of this transfer");
                    }
                }
                Some(t) => {
                    return Err(format!(
                        "destination {dest_text:?} is already being received (from sender {}, for {} s); \
                         retry when that transfer ends",
                        t.sender,
                        t.since.elapsed().as_secs()
                    ))
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn handle_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: Option<Fingerprint>,
) -> Result<(), Error> {
    let peer = peer.ok_or_else(|| Error::Other("peer presented no certificate".into()))?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))?;

    // 1. Manifest.
    let hello = match read_control(&mut recv).await? {
        Some(ControlMsg::Hello(h)) => h,
        other => {
            return Err(fail(
                &mut send,
                FailCode::BadRequest,
                format!("expected Hello, got {other:?}"),
            )
            .await)
        }
    };
    let dest_text = String::from_utf8_lossy(&hello.dest).into_owned();
    tracing::info!(dest = %dest_text, entries = hello.entry_count, bytes = hello.total_bytes,
        resume = hello.resume, sender = %hello.sender_info, %peer, "transfer requested");
    let mut builder = match ManifestBuilder::new(&hello) {
        Ok(b) => b,
        Err(e) => return Err(fail(&mut send, FailCode::BadRequest, e.to_string()).await),
    };

    // Claim the destination before reading a possibly long manifest.
    let _claim = match claim(&shared, &hello.dest, peer, hello.resume, &conn).await {
        Ok(c) => c,
        Err(msg) => return Err(fail(&mut send, FailCode::Busy, msg).await),
    };

    let manifest = loop {
        match read_control(&mut recv).await? {
            Some(ControlMsg::Entry(e)) => {
                if let Err(e) = builder.push(e) {
                    return Err(fail(&mut send, FailCode::BadRequest, e.to_string()).await);
                }
            }
            Some(ControlMsg::ManifestEnd { manifest_hash }) => match builder.finish(&manifest_hash)
            {
                Ok(m) => break m,
                Err(e) => return Err(fail(&mut send, FailCode::BadRequest, e.to_string()).await),
            },
            other => {
                return Err(fail(
                    &mut send,
                    FailCode::BadRequest,
                    format!("expected a manifest entry, got {other:?}"),
                )
                .await)
            }
        }
    };
    let manifest = Arc::new(manifest);

    // 2. Staging.
    let root = shared.root.clone();
    let dest = hello.dest.clone();
    let m2 = manifest.clone();
    let prepared =
        tokio::task::spawn_blocking(move || Staging::prepare(&root, &dest, &m2, hello.resume))
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
    let (staging, tracker) = match prepared {
        Ok(x) => x,
        Err(PrepareError::Busy) => {
            return Err(fail(
                &mut send,
                FailCode::Busy,
                format!("destination {dest_text:?} is locked by another receiver process"),
            )
            .await)
        }
        Err(PrepareError::NoSpace { needed, available }) => {
            return Err(fail(
                &mut send,
                FailCode::NoSpace,
                format!(
                    "not enough space on the receiver: need {needed} bytes, {available} available under {}",
                    shared.root.display()
                ),
            )
            .await)
        }
        Err(PrepareError::Io(e)) => {
            return Err(fail(&mut send, FailCode::Io, format!("cannot prepare staging: {e}")).await)
        }
    };
    let resumed_bytes = tracker.verified_bytes();
    let mut haves = Vec::new();
    for i in 0..manifest.entries.len() {
        for part in tracker.verified_of(i).chunks(MAX_HAVE_PER_FRAME) {
            haves.push(ControlMsg::Have {
                file: i as u64,
                chunks: part.to_vec(),
            });
        }
    }
    haves.push(ControlMsg::Accept {
        verified_bytes: resumed_bytes,
    });
    write_controls(&mut send, &haves).await?;
    tracing::info!(dest = %dest_text, resumed_bytes, chunks = tracker.total_chunks(), "accepted");

    // 3. Data.
    let state = Arc::new(TransferState {
        manifest: manifest.clone(),
        tracker: Mutex::new(tracker),
        staging: Mutex::new(Some(staging)),
        attempts: Mutex::new(HashMap::new()),
        progress: Notify::new(),
        wire_bytes: std::sync::atomic::AtomicU64::new(0),
        failure: Mutex::new(None),
    });
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<ControlMsg>();
    let acceptor = tokio::spawn(accept_data_streams(conn.clone(), state.clone(), retry_tx));

    let mut sender_root: Option<Hash> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let outcome: Result<(), (FailCode, String)> = loop {
        if let Some(f) = state.failure.lock().ok().and_then(|f| f.clone()) {
            break Err(f);
        }
        let complete = state
            .tracker
            .lock()
            .map(|t| t.is_complete())
            .unwrap_or(false);
        if complete {
            if let Some(root_hash) = sender_root {
                break check_root(&state, &root_hash);
            }
        }
        tokio::select! {
            msg = read_control(&mut recv) => match msg {
                Ok(Some(ControlMsg::Done { root_hash })) => sender_root = Some(root_hash),
                Ok(Some(ControlMsg::Fail { message, .. })) => {
                    acceptor.abort();
                    tracing::warn!(dest = %dest_text, %message, "sender aborted; staging kept for --resume");
                    return Err(Error::Refused { code: FailCode::Aborted, message });
                }
                Ok(Some(other)) => break Err((FailCode::BadRequest, format!("unexpected control message {other:?}"))),
                Ok(None) => {
                    acceptor.abort();
                    return Err(Error::Interrupted("sender closed the control stream".into()));
                }
                Err(e) => {
                    acceptor.abort();
                    tracing::warn!(dest = %dest_text, error = %e, "connection lost; staging kept for --resume");
                    return Err(e);
                }
            },
            Some(retry) = retry_rx.recv() => write_control(&mut send, &retry).await?,
            _ = tick.tick() => {
                let (verified_chunks, verified_bytes) = state.tracker.lock()
                    .map(|t| (t.verified_chunks(), t.verified_bytes())).unwrap_or((0, 0));
                let wire_bytes = state.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
                write_control(&mut send, &ControlMsg::Progress { verified_chunks, verified_bytes, wire_bytes }).await?;
            }
            () = state.progress.notified() => {}
        }
    };
    acceptor.abort();

    if let Err((code, message)) = outcome {
        if code == FailCode::NoSpace {
            if let Some(s) = state.staging.lock().ok().and_then(|mut s| s.take()) {
                s.discard();
            }
        }
        return Err(fail(&mut send, code, message).await);
    }

    // 4. Install, or keep the verified tree staged for a later `--resume` (pre-copy).
    if !hello.install {
        let root_hash = sender_root.unwrap_or_default();
        write_control(&mut send, &ControlMsg::Staged { root_hash }).await?;
        let _ = send.finish();
        tracing::info!(dest = %dest_text, root = %hex(&root_hash), "verified and kept staged (pre-copy)");
        return Ok(());
    }
    let staging = state
        .staging
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .ok_or_else(|| Error::Other("staging vanished".into()))?;
    let m2 = manifest.clone();
    let installed = tokio::task::spawn_blocking(move || staging.install(&m2))
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
    let (path, replaced) = match installed {
        Ok(x) => x,
        Err(e) => return Err(fail(&mut send, FailCode::Io, format!("install failed: {e}")).await),
    };
    let root_hash = sender_root.unwrap_or_default();
    use std::os::unix::ffi::OsStrExt;
    write_control(
        &mut send,
        &ControlMsg::Installed {
            root_hash,
            path: path.as_os_str().as_bytes().to_vec(),
            replaced: replaced.as_ref().map(|p| p.as_os_str().as_bytes().to_vec()),
        },
    )
    .await?;
    let _ = send.finish();
    tracing::info!(dest = %dest_text, path = %path.display(), replaced = ?replaced,
        root = %hex(&root_hash), "installed");
    Ok(())
}

fn check_root(state: &TransferState, sender_root: &Hash) -> Result<(), (FailCode, String)> {
    let ours = state
        .tracker
        .lock()
        .ok()
        .and_then(|t| t.root_hash(&state.manifest.manifest_hash));
    match ours {
        Some(h) if &h == sender_root => Ok(()),
        Some(h) => Err((
            FailCode::Verification,
            format!(
                "root hash mismatch: receiver {} vs sender {}",
                hex(&h),
                hex(sender_root)
            ),
        )),
        None => Err((FailCode::Verification, "chunks missing at Done".into())),
    }
}

struct TransferState {
    manifest: Arc<Manifest>,
    tracker: Mutex<ChunkTracker>,
    staging: Mutex<Option<Staging>>,
    attempts: Mutex<HashMap<(u64, u64), u32>>,
    progress: Notify,
    wire_bytes: std::sync::atomic::AtomicU64,
    failure: Mutex<Option<(FailCode, String)>>,
}

impl TransferState {
    fn set_failure(&self, code: FailCode, message: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert((code, message));
        }
        self.progress.notify_one();
    }
}

async fn accept_data_streams(
    conn: quinn::Connection,
    state: Arc<TransferState>,
    retry_tx: mpsc::UnboundedSender<ControlMsg>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok(stream) = conn.accept_uni().await {
        tasks.spawn(receive_stream(stream, state.clone(), retry_tx.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// What became of one chunk frame after decoding and hashing.
enum ChunkOutcome {
    Verified(Hash),
    Mismatch(String),
    WriteFailed(std::io::Error),
}

/// Chunks of one data stream being verified at once while the next frame is read: enough to
/// keep the stream flowing while hashing and writing, few enough to bound memory.
const CHUNKS_IN_PROCESS_PER_STREAM: usize = 2;

async fn receive_stream(
    mut stream: quinn::RecvStream,
    state: Arc<TransferState>,
    retry_tx: mpsc::UnboundedSender<ControlMsg>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CHUNKS_IN_PROCESS_PER_STREAM));
    let pool = crate::io::BufferPool::new(CHUNKS_IN_PROCESS_PER_STREAM + 1);
    let mut processing = tokio::task::JoinSet::new();
    loop {
        let header = match read_chunk_header(&mut stream).await {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(Error::Interrupted(_)) => break,
            Err(e) => {
                state.set_failure(FailCode::BadRequest, e.to_string());
                break;
            }
        };
        let check = state
            .tracker
            .lock()
            .map_err(|_| ())
            .map(|t| t.check_header(&header));
        let chunk_state = match check {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                state.set_failure(FailCode::BadRequest, e.to_string());
                break;
            }
            Err(()) => break,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Pooled buffers keep their initialised length: resizing to the usual chunk size
        // zero-fills nothing after the first use.
        let mut payload = pool.take();
        payload.resize(header.payload_len as usize, 0);
        if read_payload(&mut stream, &mut payload).await.is_err() {
            break;
        }
        state.wire_bytes.fetch_add(
            ChunkHeader::LEN as u64 + header.payload_len,
            std::sync::atomic::Ordering::Relaxed,
        );
        if chunk_state == ChunkState::AlreadyVerified {
            pool.give(payload);
            continue;
        }
        let path = {
            let Ok(staging) = state.staging.lock() else {
                break;
            };
            match staging.as_ref() {
                Some(s) => s.entry_path(&state.manifest, header.file as usize),
                None => break,
            }
        };
        let (state, retry_tx, pool) = (state.clone(), retry_tx.clone(), pool.clone());
        processing.spawn(async move {
            let h = header.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let outcome = verify_and_write(&h, &payload, &path);
                pool.give(payload);
                outcome
            })
            .await
            .unwrap_or_else(|e| ChunkOutcome::Mismatch(format!("worker panicked: {e}")));
            record_outcome(&state, &header, outcome, &retry_tx);
            drop(permit);
        });
        // Reap finished chunks so the set stays small.
        while processing.try_join_next().is_some() {}
    }
    while processing.join_next().await.is_some() {}
}

/// Journals a verified chunk, or asks for it again, or fails the transfer.
fn record_outcome(
    state: &TransferState,
    header: &ChunkHeader,
    outcome: ChunkOutcome,
    retry_tx: &mpsc::UnboundedSender<ControlMsg>,
) {
    match outcome {
        ChunkOutcome::Verified(hash) => {
            let journaled = state.staging.lock().ok().and_then(|mut s| {
                s.as_mut()
                    .map(|s| s.journal_append(header.file, header.chunk, &hash))
            });
            if let Some(Err(e)) = journaled {
                return state.set_failure(FailCode::Io, format!("journal write failed: {e}"));
            }
            if let Ok(mut t) = state.tracker.lock() {
                t.mark_verified(header.file, header.chunk, hash);
            }
            state.progress.notify_one();
        }
        ChunkOutcome::Mismatch(reason) => {
            let attempts = {
                let Ok(mut a) = state.attempts.lock() else {
                    return;
                };
                let n = a.entry((header.file, header.chunk)).or_insert(0);
                *n += 1;
                *n
            };
            let path = String::from_utf8_lossy(&state.manifest.entries[header.file as usize].path)
                .into_owned();
            tracing::warn!(file = %path, chunk = header.chunk, attempts, %reason, "chunk failed verification");
            if attempts >= MAX_CHUNK_ATTEMPTS {
                return state.set_failure(
                    FailCode::Verification,
                    format!(
                        "chunk {} of {path:?} failed verification {attempts} times ({reason}); \
                         the path corrupts data persistently",
                        header.chunk
                    ),
                );
            }
            let _ = retry_tx.send(ControlMsg::Retry {
                file: header.file,
                chunk: header.chunk,
                reason,
            });
        }
        ChunkOutcome::WriteFailed(e) => {
            let (code, msg) = if e.raw_os_error() == Some(libc::ENOSPC) {
                let remaining = state
                    .tracker
                    .lock()
                    .map(|t| state.manifest.total_bytes - t.verified_bytes())
                    .unwrap_or(state.manifest.total_bytes);
                (
                    FailCode::NoSpace,
                    format!(
                        "receiver disk full: at least {remaining} more bytes are needed; \
                         staging removed, target untouched"
                    ),
                )
            } else {
                (FailCode::Io, format!("write failed: {e}"))
            };
            state.set_failure(code, msg);
        }
    }
}

/// Decodes, hashes and compares a chunk, and writes it when it matches.
fn verify_and_write(h: &ChunkHeader, payload: &[u8], path: &std::path::Path) -> ChunkOutcome {
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
                return ChunkOutcome::Mismatch(format!("undecodable payload: {e}"));
            }
            &decoded
        }
    };
    let got = *blake3::hash(raw).as_bytes();
    if got != h.hash {
        return ChunkOutcome::Mismatch(format!(
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
        Ok(()) => ChunkOutcome::Verified(got),
        Err(e) => ChunkOutcome::WriteFailed(e),
    }
}
