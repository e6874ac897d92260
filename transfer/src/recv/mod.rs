//! `shardrecv serve`: the receiving daemon.
//!
//! This is the async driver; the protocol's decisions live in [`session::ReceiverSession`]
//! (sans-io). One task per connection runs one transfer: it reads the sender's `Hello`,
//! claims the destination and waits for one of the `max_transfers` slots (first come first
//! served; see [`crate::admission`] for why the receiver queues rather than refuses), then
//! reads the rest of the control stream on its own task and loops: feed the session every
//! event (control messages, chunk frames and their results from the data streams, progress
//! ticks) and carry out its outputs (write a control message, prepare staging, accept data
//! streams, install, discard staging). Each data stream checks a frame header with the
//! session, then decodes, verifies, writes ([`store`]) and journals its payload on a
//! blocking thread.
//!
//! What is shared between connections lives here: the destination claims (a resumed
//! attempt of the same sender supersedes its previous connection) and the admissions.
//!
//! Memory per transfer is bounded by the data streams (two chunk buffers each, at most
//! `MAX_CHUNK_SIZE`) plus quinn's receive window ([`crate::quic::CONNECTION_WINDOW`]); a
//! transfer waiting in line holds only its unread manifest in quinn's stream buffer.
//!
//! For operators: the allow-list and the identities can be replaced while serving
//! ([`Receiver::allow_list`], [`Receiver::identities`], SIGHUP in `shardrecv`; a key rotation
//! serves two identities for a while, see [`crate::identity`]), counters are kept for `--metrics` ([`metrics`]), and the daemon's
//! settings can come from a file ([`config`]).

pub mod config;
pub mod metrics;
pub mod remembered;
pub mod session;
pub mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::admission::{Admission, Admissions, QueueFull, Ticket};
use crate::error::Error;
use crate::handshake_limit::{HandshakeLimiter, Verdict};
use crate::identity::{
    server_crypto, AllowList, Fingerprint, IdentitySet, LiveAllowList, LiveIdentities,
};
use crate::io::{
    read_chunk_header, read_control, read_payload_counting, write_control, write_controls,
};
use crate::manifest::Manifest;
use crate::space::{PromiseId, SpaceLedger};
use crate::staging::{PrepareError, Previous, Request, Staging};
use crate::wire::{hex, ChunkHeader, ControlMsg, FailCode};

use session::{Outcome, ReceiverInput, ReceiverOutput, ReceiverSession};
use store::{store_chunk, Stored};

/// How `shardrecv serve` runs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    /// The keys we present (the first is the primary), chosen per handshake.
    pub identities: IdentitySet,
    pub allow: AllowList,
    /// Transfers served at once; more wait in line.
    pub max_transfers: usize,
    /// Transfers waiting in line at most; more are refused as busy.
    pub max_queued: usize,
    /// Congestion controller and other transport choices.
    pub transport: crate::quic::TransportOptions,
    /// Where to serve Prometheus `/metrics` (TCP), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Orchestrator keys whose transfer tickets are honoured; when any is given, every
    /// transfer needs a ticket ([`crate::ticket`]); when none, the allow-list alone decides.
    pub ticket_signers: Vec<Fingerprint>,
    /// Bytes of the root's file system never promised to transfers ([`crate::space`]).
    pub keep_free: u64,
    /// Handshakes per second per source address (0: no limit), and in progress at once
    /// ([`crate::handshake_limit`]).
    pub handshake_rate: u32,
    pub max_handshakes: usize,
}

/// Default of `shardrecv serve --max-transfers`.
pub const DEFAULT_MAX_TRANSFERS: usize = 32;
/// Default of `shardrecv serve --max-queued`.
pub const DEFAULT_MAX_QUEUED: usize = 512;
/// A waiting sender hears from us at least this often (and whenever its place changes).
const QUEUE_HEARTBEAT: Duration = Duration::from_secs(2);

/// A running receiver; `local_addr` is useful when listening on port 0.
pub struct Receiver {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    metrics_listener: Option<tokio::net::TcpListener>,
}

struct Shared {
    root: PathBuf,
    /// Who may connect; replaced on reload.
    allow: Arc<LiveAllowList>,
    /// Who we are; replaced on reload.
    identities: Arc<LiveIdentities>,
    metrics: metrics::ReceiverMetrics,
    /// Transfer slots and the line of transfers waiting for one.
    admissions: Mutex<Admissions>,
    /// Woken whenever the line moves (a slot freed, a transfer admitted, a waiter left).
    line_moved: Notify,
    /// Destinations being received or waiting now, with the sender and connection holding
    /// each.
    active: Mutex<HashMap<Vec<u8>, ActiveTransfer>>,
    /// Tickets on: the trusted signers and the nonces spent by installs.
    tickets: Option<TicketState>,
    /// Disk space promised to the transfers in progress.
    space: Mutex<SpaceLedger>,
    /// Handshakes per address and at once, before any cryptography.
    handshakes: Mutex<HandshakeLimiter>,
    /// The pre-copies staged lately, for the final passes that follow ([`remembered`]).
    remembered: Mutex<remembered::RememberedAttempts>,
}

/// A receiver's ticket rules: whose signatures count, and what installs have spent.
struct TicketState {
    signers: Arc<HashSet<Fingerprint>>,
    spent: Arc<Mutex<crate::ticket::SpentNonces>>,
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
        let allow = Arc::new(LiveAllowList::new(cfg.allow));
        let identities = Arc::new(LiveIdentities::new(cfg.identities));
        let crypto = server_crypto(identities.clone(), allow.clone())?;
        let endpoint = crate::quic::server_endpoint(cfg.listen, crypto, &cfg.transport)?;
        let metrics_listener = cfg.metrics.map(metrics::bind).transpose()?;
        Ok(Receiver {
            endpoint,
            metrics_listener,
            shared: Arc::new(Shared {
                root,
                allow,
                identities,
                metrics: metrics::ReceiverMetrics::new(),
                admissions: Mutex::new(Admissions::new(
                    cfg.max_transfers.max(1) as u64,
                    cfg.max_queued as u64,
                )),
                line_moved: Notify::new(),
                active: Mutex::new(HashMap::new()),
                tickets: (!cfg.ticket_signers.is_empty()).then(|| TicketState {
                    signers: Arc::new(cfg.ticket_signers.iter().copied().collect()),
                    spent: Arc::new(Mutex::new(crate::ticket::SpentNonces::default())),
                }),
                space: Mutex::new(SpaceLedger::new(cfg.keep_free)),
                remembered: Mutex::new(remembered::RememberedAttempts::default()),
                handshakes: Mutex::new(HandshakeLimiter::new(
                    cfg.handshake_rate,
                    cfg.max_handshakes,
                )),
            }),
        })
    }

    /// The most transfers that were ever active at once (never above `max_transfers`).
    pub fn max_active(&self) -> u64 {
        self.shared
            .admissions
            .lock()
            .map(|a| a.max_active())
            .unwrap_or(0)
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("endpoint", e))
    }

    /// Where `/metrics` is served, with `ServeConfig::metrics`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The allow-list handshakes check: replace it to reload (transfers in flight go on).
    pub fn allow_list(&self) -> Arc<LiveAllowList> {
        self.shared.allow.clone()
    }

    /// The identities handshakes choose from: replace them to reload (connections already
    /// made keep their key).
    pub fn identities(&self) -> Arc<LiveIdentities> {
        self.shared.identities.clone()
    }

    /// What a scrape of `/metrics` shows now.
    pub fn render_metrics(&self) -> String {
        self.shared.render_metrics()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let metrics_task = self.metrics_listener.take().map(|listener| {
            let shared = self.shared.clone();
            tokio::spawn(metrics::serve(
                listener,
                Arc::new(move || shared.render_metrics()),
            ))
        });
        loop {
            let incoming = tokio::select! {
                () = &mut shutdown => break,
                inc = self.endpoint.accept() => match inc {
                    Some(i) => i,
                    None => break,
                },
            };
            let shared = self.shared.clone();
            let remote = incoming.remote_address();
            let verdict = match shared.handshakes.lock() {
                Ok(mut h) => h.admit(
                    remote.ip(),
                    incoming.remote_address_validated(),
                    Instant::now(),
                ),
                Err(_) => Verdict::Accept,
            };
            match verdict {
                Verdict::Accept => {}
                Verdict::Retry => {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                }
                Verdict::Refuse(why) => {
                    shared.metrics.handshake_refused(why);
                    tracing::debug!(%remote, reason = why.label(), "handshake refused");
                    incoming.refuse();
                    continue;
                }
            }
            tokio::spawn(async move {
                let handshake = incoming.await;
                if let Ok(mut h) = shared.handshakes.lock() {
                    h.finished(remote.ip(), handshake.is_err(), Instant::now());
                }
                let conn = match handshake {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "handshake failed");
                        return;
                    }
                };
                let peer = crate::quic::peer_fingerprint(&conn);
                if let Err(e) = handle_connection(shared, conn.clone(), peer).await {
                    tracing::warn!(%remote, error = %e, "transfer ended with an error");
                }
                // The destination is released; let the sender read our last frame and close.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            });
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        self.endpoint.close(0u32.into(), b"receiver shutting down");
        self.endpoint.wait_idle().await;
        tracing::info!(
            max_active = self.max_active(),
            "stopped; most transfers active at once"
        );
    }
}

impl Shared {
    /// The ticket rules for a connection from `sender`, when tickets are on.
    fn ticket_gate(&self, sender: Fingerprint) -> Option<session::TicketGate> {
        let tickets = self.tickets.as_ref()?;
        Some(session::TicketGate {
            signers: tickets.signers.clone(),
            spent: tickets.spent.clone(),
            sender,
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    fn render_metrics(&self) -> String {
        let (active, queued) = self
            .admissions
            .lock()
            .map(|a| (a.active(), a.queued()))
            .unwrap_or((0, 0));
        let promised = self.space.lock().map(|l| l.outstanding()).unwrap_or(0);
        self.metrics
            .space_promised
            .set(i64::try_from(promised).unwrap_or(i64::MAX));
        let identities = metrics::IdentityReport {
            served: self.identities.current().fingerprints(),
            presented: self.identities.presented(),
        };
        self.metrics
            .render(self.allow.refusals(), active, queued, &identities)
    }
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

/// One of the receiver's transfer slots, held while a transfer runs.
struct Slot {
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut a) = self.shared.admissions.lock() {
            a.release();
        }
        self.shared.line_moved.notify_waiters();
    }
}

/// Disk space promised to one transfer; the promise ends when this is dropped.
struct SpacePromise {
    shared: Arc<Shared>,
    id: PromiseId,
}

impl SpacePromise {
    /// `bytes` more were written.
    fn wrote(&self, bytes: u64) {
        if let Ok(mut l) = self.shared.space.lock() {
            l.wrote(self.id, bytes);
        }
    }
}

impl Drop for SpacePromise {
    fn drop(&mut self) {
        if let Ok(mut l) = self.shared.space.lock() {
            l.release(self.id);
        }
    }
}

/// A place in line; leaves the line when dropped before being admitted (the sender went
/// away, or the task was cancelled).
struct Waiter {
    shared: Arc<Shared>,
    ticket: Ticket,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let left = self
            .shared
            .admissions
            .lock()
            .map(|mut a| a.cancel(self.ticket))
            .unwrap_or(false);
        if left {
            self.shared.line_moved.notify_waiters();
        }
    }
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

/// State of one transfer, shared by its control loop and its data streams. Fields drop in
/// order: the staging lock goes before the slot and the destination claim, so the next
/// attempt of this destination (a sender restarting with `--resume`) can take all three,
/// however long aborted data-stream tasks keep this state alive.
struct Transfer {
    session: Mutex<ReceiverSession>,
    staging: Mutex<Option<Staging>>,
    manifest: Mutex<Option<Arc<Manifest>>>,
    /// Where the data streams send what the control loop must carry out.
    to_control: mpsc::UnboundedSender<ReceiverOutput>,
    slot: Mutex<Option<Slot>>,
    claim: Mutex<Option<Claim>>,
    /// Frame bytes read from the data streams, counted per read (reported in `Progress`).
    wire_read: AtomicU64,
    /// The disk space promised to this transfer, once staging is prepared.
    space: Mutex<Option<SpacePromise>>,
    /// The receiver's state, for its counters.
    shared: Arc<Shared>,
}

impl Transfer {
    /// The destination this transfer claimed (empty before the claim).
    fn claimed_dest(&self) -> Vec<u8> {
        self.claim
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.dest.clone()))
            .unwrap_or_default()
    }

    /// Feeds the session; the outputs are returned for the caller to carry out.
    fn handle(&self, input: ReceiverInput) -> Vec<ReceiverOutput> {
        match self.session.lock() {
            Ok(mut s) => s.handle(input),
            Err(_) => vec![ReceiverOutput::Finished(Err(Error::Other(
                "receiver session lock poisoned".into(),
            )))],
        }
    }

    /// Feeds the session from a data stream: what it asks is the control loop's to do.
    fn handle_for_control(&self, input: ReceiverInput) {
        for output in self.handle(input) {
            let _ = self.to_control.send(output);
        }
    }
}

/// What the control loop waits for.
enum Event {
    Input(ReceiverInput),
    Output(ReceiverOutput),
}

async fn handle_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: Option<Fingerprint>,
) -> Result<(), Error> {
    let peer = peer.ok_or_else(|| Error::Other("peer presented no certificate".into()))?;
    let negotiated = crate::quic::negotiated(&conn)?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))?;
    let (to_control, mut from_streams) = mpsc::unbounded_channel();
    let t = Arc::new(Transfer {
        session: Mutex::new(
            ReceiverSession::with_tickets(shared.ticket_gate(peer))
                .serving(negotiated.serves.clone()),
        ),
        staging: Mutex::new(None),
        manifest: Mutex::new(None),
        to_control,
        slot: Mutex::new(None),
        claim: Mutex::new(None),
        wire_read: AtomicU64::new(0),
        space: Mutex::new(None),
        shared: shared.clone(),
    });
    // The first message is read here: until a slot is ours, the rest of the control stream
    // (the manifest) stays unread in quinn's flow-controlled buffer.
    let first = control_input(read_control(&mut recv).await);
    if let ReceiverInput::Control(ControlMsg::Hello(h)) = &first {
        tracing::info!(dest = %String::from_utf8_lossy(&h.dest), entries = h.entry_count,
            bytes = h.total_bytes, resume = h.resume, version = h.version,
            alpn = %negotiated.alpn_text(), sender = %h.sender_info, %peer, "transfer requested");
    }
    let mut pending: VecDeque<ReceiverOutput> = t.handle(first).into();
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut recv = Some(recv);
    let mut reader: Option<tokio::task::JoinHandle<()>> = None;
    let mut acceptor: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(crate::wire::PROGRESS_INTERVAL);
    // Whether this end refused or failed the transfer (counted then, by its code).
    let mut fail_sent = false;
    let result = loop {
        if let Some(output) = pending.pop_front() {
            match output {
                ReceiverOutput::Send(msg) => {
                    // This message and the ones queued right behind it go out in one write: a
                    // resume answers with a `Have` per file (200k for a big repository), and
                    // as many small writes cost quinn far more than their bytes.
                    let mut batch = vec![msg];
                    while let Some(ReceiverOutput::Send(_)) = pending.front() {
                        if let Some(ReceiverOutput::Send(next)) = pending.pop_front() {
                            batch.push(next);
                        }
                    }
                    for msg in &batch {
                        fail_sent |= note_sent(&shared, &t, msg);
                    }
                    if let Err(e) = write_controls(&mut send, &batch).await {
                        pending.extend(t.handle(ReceiverInput::ConnectionLost(e.to_string())));
                    }
                }
                ReceiverOutput::Claim {
                    dest,
                    resume,
                    ticketed,
                } => {
                    let admitted = admit(
                        &shared,
                        &t,
                        &conn,
                        &mut send,
                        &dest,
                        (peer, resume, ticketed),
                        &mut pending,
                    )
                    .await;
                    if admitted {
                        if let Some(r) = recv.take() {
                            reader = Some(tokio::spawn(read_controls(r, events_tx.clone())));
                        }
                    }
                }
                ReceiverOutput::Prepare { manifest, request } => {
                    tracing::debug!(
                        entries = manifest.entries.len(),
                        "manifest received; preparing staging"
                    );
                    let input = prepare(&shared, &t, manifest, request).await;
                    pending.extend(t.handle(input));
                }
                ReceiverOutput::AcceptData => {
                    acceptor = Some(tokio::spawn(accept_data_streams(conn.clone(), t.clone())));
                }
                ReceiverOutput::Install => {
                    let started = Instant::now();
                    let input = install(&t).await;
                    shared
                        .metrics
                        .install_seconds
                        .observe(started.elapsed().as_secs_f64());
                    pending.extend(t.handle(input));
                }
                ReceiverOutput::DiscardStaging => {
                    if let Some(s) = t.staging.lock().ok().and_then(|mut s| s.take()) {
                        s.discard();
                    }
                }
                ReceiverOutput::Settle => settle(&t).await,
                // Only a data stream acts on these, for the frame it read.
                ReceiverOutput::StoreChunk(_) | ReceiverOutput::SkipChunk => {}
                ReceiverOutput::Finished(result) => break result,
            }
            continue;
        }
        let event = tokio::select! {
            e = events.recv() => e,
            o = from_streams.recv() => o.map(Event::Output),
            _ = tick.tick() => Some(Event::Input(ReceiverInput::Tick {
                wire_bytes: t.wire_read.load(Ordering::Relaxed),
            })),
        };
        match event {
            Some(Event::Input(input)) => pending.extend(t.handle(input)),
            Some(Event::Output(output)) => pending.push_back(output),
            None => pending.extend(t.handle(ReceiverInput::ConnectionLost(
                "control stream reader stopped".into(),
            ))),
        }
    };
    if let Some(a) = acceptor {
        a.abort();
    }
    if let Some(r) = reader {
        r.abort();
    }
    let _ = send.finish();
    // A sender that left before it was accepted (out of the line, a handshake cut short) is
    // neither refused nor failed.
    let accepted = t
        .session
        .lock()
        .map(|s| s.verified().is_some())
        .unwrap_or(false);
    match &result {
        Ok(Outcome::Installed { .. }) => shared.metrics.complete("installed"),
        Ok(Outcome::Staged { .. }) => shared.metrics.complete("staged"),
        Err(e) if accepted && !fail_sent => shared.metrics.fail(match e {
            Error::Refused {
                code: FailCode::Aborted,
                ..
            } => "aborted",
            Error::Interrupted(_) => "interrupted",
            _ => "other",
        }),
        Err(_) => {}
    }
    match result {
        Ok(Outcome::Installed {
            root_hash,
            path,
            replaced,
        }) => {
            tracing::info!(path = %String::from_utf8_lossy(&path),
                replaced = ?replaced.map(|r| String::from_utf8_lossy(&r).into_owned()),
                root = %hex(&root_hash), "installed");
            Ok(())
        }
        Ok(Outcome::Staged { root_hash }) => {
            tracing::info!(root = %hex(&root_hash), "verified and kept staged (pre-copy)");
            Ok(())
        }
        Err(Error::Refused {
            code: FailCode::Aborted,
            message,
        }) => {
            tracing::warn!(%message, "sender aborted; staging kept for --resume");
            Err(Error::Refused {
                code: FailCode::Aborted,
                message,
            })
        }
        Err(e) => Err(e),
    }
}

/// A control-stream read as a session input.
fn control_input(read: Result<Option<ControlMsg>, Error>) -> ReceiverInput {
    match read {
        Ok(Some(msg)) => ReceiverInput::Control(msg),
        Ok(None) => ReceiverInput::ControlClosed,
        Err(Error::Wire(e)) => ReceiverInput::ControlUnreadable(e.to_string()),
        Err(e) => ReceiverInput::ConnectionLost(e.to_string()),
    }
}

/// Reads the control stream into the control loop until it ends.
async fn read_controls(recv: quinn::RecvStream, tx: mpsc::UnboundedSender<Event>) {
    // Buffered: a manifest is one frame per entry (200k in a busy repository), and each
    // unbuffered read locks the connection.
    let mut recv = tokio::io::BufReader::with_capacity(crate::io::CONTROL_READ_BUFFER, recv);
    loop {
        let input = control_input(read_control(&mut recv).await);
        let last = !matches!(input, ReceiverInput::Control(_));
        if tx.send(Event::Input(input)).is_err() || last {
            return;
        }
    }
}

/// Claims the destination and waits for a slot, feeding the session where we stand and
/// writing what it says at once (`Queued`). Returns whether the transfer was admitted;
/// anything else the session asked is left in `pending`.
#[allow(clippy::too_many_arguments)]
async fn admit(
    shared: &Arc<Shared>,
    t: &Arc<Transfer>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    dest: &[u8],
    (peer, resume, ticketed): (Fingerprint, bool, bool),
    pending: &mut VecDeque<ReceiverOutput>,
) -> bool {
    let dest_text = String::from_utf8_lossy(dest).into_owned();
    let refused = |message: String| ReceiverInput::Refused(message);
    let claimed = match claim(shared, dest, peer, resume, conn).await {
        Ok(c) => c,
        Err(message) => {
            pending.extend(t.handle(refused(message)));
            return false;
        }
    };
    if let Ok(mut c) = t.claim.lock() {
        *c = Some(claimed);
    }
    if ticketed {
        // Claimed: no other transfer of ours changes the destination until we let go.
        let (exists, installed_root) = crate::staging::installed_root(&shared.root, dest);
        let outputs = t.handle(ReceiverInput::AtDestination {
            exists,
            installed_root,
        });
        let refused = !outputs.is_empty();
        pending.extend(outputs);
        if refused {
            return false;
        }
    }
    let slot = wait_for_slot(
        shared,
        conn,
        &dest_text,
        |position, active, limit| {
            t.handle(ReceiverInput::InLine {
                position,
                active,
                limit,
            })
        },
        send,
    )
    .await;
    match slot {
        Ok(slot) => {
            if let Ok(mut s) = t.slot.lock() {
                *s = Some(slot);
            }
            pending.extend(t.handle(ReceiverInput::Admitted));
            true
        }
        Err(SlotError::Refused(message)) => {
            pending.extend(t.handle(refused(message)));
            false
        }
        Err(SlotError::Lost(why)) => {
            pending.extend(t.handle(ReceiverInput::ConnectionLost(why)));
            false
        }
    }
}

/// Why no slot came.
enum SlotError {
    /// The line is full.
    Refused(String),
    /// The sender left (its connection closed, or writing to it failed).
    Lost(String),
}

/// Waits for a transfer slot, first come first served. `in_line` is told the place at every
/// move and every [`QUEUE_HEARTBEAT`]; what it returns (the session's `Queued`) is written.
async fn wait_for_slot(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    dest: &str,
    mut in_line: impl FnMut(u64, u64, u64) -> Vec<ReceiverOutput>,
    send: &mut quinn::SendStream,
) -> Result<Slot, SlotError> {
    let poisoned = || SlotError::Lost("admission lock poisoned".into());
    let ticket = match shared.admissions.lock().map_err(|_| poisoned())?.enqueue() {
        Ok(t) => t,
        Err(QueueFull { queued }) => {
            return Err(SlotError::Refused(format!(
                "receiver is at its transfer limit and {queued} transfers already wait in \
                 line, its limit; retry later"
            )))
        }
    };
    let waiter = Waiter {
        shared: shared.clone(),
        ticket,
    };
    let mut told: Option<(u64, Instant)> = None;
    loop {
        let line_moved = shared.line_moved.notified();
        tokio::pin!(line_moved);
        line_moved.as_mut().enable();
        let (admission, active, limit, queued, max_active) = {
            let mut a = shared.admissions.lock().map_err(|_| poisoned())?;
            (
                a.poll(ticket),
                a.active(),
                a.limit(),
                a.queued(),
                a.max_active(),
            )
        };
        match admission {
            Admission::Admitted => {
                shared.metrics.admitted.inc();
                // Out of the line (dropping the waiter cancels nothing now); the others
                // moved up.
                drop(waiter);
                shared.line_moved.notify_waiters();
                tracing::info!(dest, active, limit, queued, max_active, "transfer admitted");
                return Ok(Slot {
                    shared: shared.clone(),
                });
            }
            Admission::Waiting { position } => {
                let due =
                    told.is_none_or(|(p, at)| p != position || at.elapsed() >= QUEUE_HEARTBEAT);
                if due {
                    if told.is_none() {
                        tracing::info!(
                            dest,
                            position,
                            active,
                            limit,
                            "at the transfer limit: waiting in line"
                        );
                    }
                    for output in in_line(position, active, limit) {
                        if let ReceiverOutput::Send(msg) = output {
                            write_control(send, &msg)
                                .await
                                .map_err(|e| SlotError::Lost(e.to_string()))?;
                        }
                    }
                    told = Some((position, Instant::now()));
                }
                tokio::select! {
                    () = &mut line_moved => {}
                    () = tokio::time::sleep(QUEUE_HEARTBEAT) => {}
                    reason = conn.closed() => {
                        return Err(SlotError::Lost(format!("sender left the line: {reason}")));
                    }
                }
            }
        }
    }
}

/// Prepares staging for `manifest` on a blocking thread; the answer for the session.
async fn prepare(
    shared: &Arc<Shared>,
    t: &Arc<Transfer>,
    manifest: Arc<Manifest>,
    request: Request,
) -> ReceiverInput {
    let dest = t.claimed_dest();
    let dest_text = String::from_utf8_lossy(&dest).into_owned();
    let root = shared.root.clone();
    let m = manifest.clone();
    let remembered = shared
        .remembered
        .lock()
        .ok()
        .and_then(|mut r| r.take(&dest, Instant::now()));
    let prepared = tokio::task::spawn_blocking(move || {
        Staging::prepare_after(&root, &dest, &m, &request, remembered)
    })
    .await
    .map_err(|e| PrepareError::Io(Error::Other(e.to_string())));
    let failed = |code, message| ReceiverInput::PrepareFailed { code, message };
    match prepared.and_then(|r| r) {
        Ok((staging, tracker)) => {
            // Staging checked this transfer alone against the free space; the ledger checks
            // it beside every transfer in progress.
            let needed = crate::space::footprint(
                manifest
                    .total_bytes
                    .saturating_sub(tracker.verified_bytes()),
                manifest.entries.len() as u64,
                manifest
                    .total_chunks()
                    .saturating_sub(tracker.verified_chunks()),
            );
            match promise_space(shared, needed) {
                Ok(promise) => {
                    if let Ok(mut p) = t.space.lock() {
                        *p = Some(promise);
                    }
                }
                Err(message) => {
                    // Nothing carried over: no litter. Carried chunks stay for a resume.
                    if tracker.verified_chunks() == 0 {
                        staging.discard();
                    }
                    return failed(FailCode::NoSpace, message);
                }
            }
            if let Ok(mut s) = t.staging.lock() {
                *s = Some(staging);
            }
            if let Ok(mut m) = t.manifest.lock() {
                *m = Some(manifest);
            }
            ReceiverInput::Prepared(tracker)
        }
        Err(PrepareError::Busy) => failed(
            FailCode::Busy,
            format!("destination {dest_text:?} is locked by another receiver process"),
        ),
        Err(PrepareError::NoSpace { needed, available }) => failed(
            FailCode::NoSpace,
            format!(
                "not enough space on the receiver: need {needed} bytes, {available} available \
                 under {}",
                shared.root.display()
            ),
        ),
        Err(PrepareError::Refused(message)) => failed(FailCode::BadRequest, message),
        Err(PrepareError::Io(e)) => failed(FailCode::Io, format!("cannot prepare staging: {e}")),
    }
}

/// Promises `needed` bytes on the root's file system, or says why not.
fn promise_space(shared: &Arc<Shared>, needed: u64) -> Result<SpacePromise, String> {
    let available = crate::staging::available_bytes(&shared.root).map_err(|e| {
        format!(
            "cannot read the free space under {}: {e}",
            shared.root.display()
        )
    })?;
    let mut ledger = shared
        .space
        .lock()
        .map_err(|_| "internal error: space ledger lock poisoned".to_string())?;
    let id = ledger
        .try_promise(needed, available)
        .map_err(|shortfall| format!("{shortfall} under {}", shared.root.display()))?;
    Ok(SpacePromise {
        shared: shared.clone(),
        id,
    })
}

/// Counts and logs a control message the receiver is about to send; true for a `Fail`.
fn note_sent(shared: &Shared, t: &Transfer, msg: &ControlMsg) -> bool {
    match msg {
        ControlMsg::Fail { code, message } => {
            tracing::warn!(?code, %message, "refusing transfer");
            let accepted = t
                .session
                .lock()
                .map(|s| s.verified().is_some())
                .unwrap_or(true);
            let reason = metrics::reason_of(*code);
            if accepted {
                shared.metrics.fail(reason);
            } else {
                shared.metrics.refuse(reason);
            }
            return true;
        }
        ControlMsg::Retry { .. } => {
            shared.metrics.chunk_retries.inc();
        }
        ControlMsg::Accept { verified_bytes } => {
            tracing::info!(resumed_bytes = verified_bytes, "accepted");
        }
        _ => {}
    }
    false
}

/// A verified pre-copy's staged files get their final metadata, on a blocking thread, before
/// the sender hears `Staged` (so the final pass finds the staging settled and unlocked). A
/// failure is only logged: the install then applies what is missing.
async fn settle(t: &Arc<Transfer>) {
    let staging = t.staging.lock().ok().and_then(|mut s| s.take());
    let manifest = t.manifest.lock().ok().and_then(|m| m.clone());
    let (Some(mut staging), Some(manifest)) = (staging, manifest) else {
        return;
    };
    // The verified chunks, for the final pass's prepare (see `remembered`).
    let Some(tracker) = t.session.lock().ok().and_then(|s| s.tracker().cloned()) else {
        return;
    };
    let (root, dest) = (t.shared.root.clone(), t.claimed_dest());
    let started = Instant::now();
    let done = tokio::task::spawn_blocking(move || {
        let result = staging.settle(&manifest);
        let attempt = result
            .is_ok()
            .then(|| Previous::remember(&root, &dest, &manifest, &tracker));
        (staging, result, attempt, dest)
    })
    .await;
    match done {
        Ok((staging, result, attempt, dest)) => {
            if let (Some(attempt), Ok(mut r)) = (attempt, t.shared.remembered.lock()) {
                r.remember(&dest, attempt, Instant::now());
            }
            match result {
                Ok(()) => tracing::info!(
                    files = staging.settled_files(),
                    seconds = started.elapsed().as_secs_f64(),
                    "staged files given their final metadata (pre-copy)"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot settle the staged files' metadata; the install will")
                }
            }
            if let Ok(mut slot) = t.staging.lock() {
                *slot = Some(staging);
            }
        }
        Err(e) => tracing::warn!(error = %e, "settling the staged files' metadata panicked"),
    }
}

/// Installs the verified staging on a blocking thread; the answer for the session.
async fn install(t: &Arc<Transfer>) -> ReceiverInput {
    let staging = t.staging.lock().ok().and_then(|mut s| s.take());
    let manifest = t.manifest.lock().ok().and_then(|m| m.clone());
    let (Some(staging), Some(manifest)) = (staging, manifest) else {
        return ReceiverInput::InstallFailed("staging vanished".into());
    };
    // The recorded root of the tree being replaced goes first (see forget_installed_root).
    let dest = t.claimed_dest();
    if let Err(e) = crate::staging::forget_installed_root(&t.shared.root, &dest) {
        return ReceiverInput::InstallFailed(e.to_string());
    }
    match tokio::task::spawn_blocking(move || staging.install(&manifest)).await {
        Ok(Ok((path, replaced))) => {
            // With tickets on, what a `replace` ticket names, recorded before the sender hears
            // `Installed` (its next transfer may name it at once). Forgotten before every
            // install, tickets or not, so a record never outlives its tree.
            let root = t.session.lock().ok().and_then(|s| s.sender_root());
            if let (Some(_), Some(root)) = (&t.shared.tickets, root) {
                if let Err(e) = crate::staging::record_installed_root(&t.shared.root, &dest, &root)
                {
                    // Installed all the same; only a `replace` ticket for it is refused.
                    tracing::warn!(error = %e, "cannot record the installed tree's root hash");
                }
            }
            ReceiverInput::Installed {
                path: path.as_os_str().as_bytes().to_vec(),
                replaced: replaced.map(|p| p.as_os_str().as_bytes().to_vec()),
            }
        }
        Ok(Err(e)) => ReceiverInput::InstallFailed(e.to_string()),
        Err(e) => ReceiverInput::InstallFailed(e.to_string()),
    }
}

async fn accept_data_streams(conn: quinn::Connection, t: Arc<Transfer>) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok(stream) = conn.accept_uni().await {
        tasks.spawn(receive_stream(stream, t.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// Chunks of one data stream being verified at once while the next frame is read: enough to
/// keep the stream flowing while hashing and writing, few enough to bound memory.
const CHUNKS_IN_PROCESS_PER_STREAM: usize = 2;

async fn receive_stream(mut stream: quinn::RecvStream, t: Arc<Transfer>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CHUNKS_IN_PROCESS_PER_STREAM));
    let pool = crate::io::BufferPool::new(CHUNKS_IN_PROCESS_PER_STREAM + 1);
    let mut processing = tokio::task::JoinSet::new();
    loop {
        let header = match read_chunk_header(&mut stream).await {
            Ok(Some(h)) => {
                t.wire_read
                    .fetch_add(ChunkHeader::LEN as u64, Ordering::Relaxed);
                t.shared
                    .metrics
                    .received_bytes
                    .inc_by(ChunkHeader::LEN as u64);
                h
            }
            Ok(None) | Err(Error::Interrupted(_)) => break,
            Err(e) => {
                t.handle_for_control(ReceiverInput::FrameUnreadable(e.to_string()));
                break;
            }
        };
        // The session checks the header against the manifest before a byte of payload is
        // read; what it says beyond this frame is the control loop's to do.
        let mut store = None;
        for output in t.handle(ReceiverInput::ChunkFrame(header.clone())) {
            match output {
                ReceiverOutput::StoreChunk(_) => store = Some(true),
                ReceiverOutput::SkipChunk => store = Some(false),
                other => {
                    let _ = t.to_control.send(other);
                }
            }
        }
        let Some(store) = store else {
            break; // refused: the session ends the transfer
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Pooled buffers keep their initialised length: resizing to the usual chunk size
        // zero-fills nothing after the first use. The session checked the length against
        // the manifest (at most the chunk size).
        let mut payload = pool.take();
        payload.resize(header.payload_len as usize, 0);
        if read_payload_counting(&mut stream, &mut payload, Some(&t.wire_read))
            .await
            .is_err()
        {
            break;
        }
        t.shared.metrics.received_bytes.inc_by(header.payload_len);
        if !store {
            pool.give(payload);
            continue;
        }
        let path = {
            let Ok(staging) = t.staging.lock() else {
                break;
            };
            let manifest = t.manifest.lock().ok().and_then(|m| m.clone());
            match (staging.as_ref(), manifest) {
                (Some(s), Some(m)) => s.entry_path(&m, header.file as usize),
                _ => break,
            }
        };
        let (t, pool) = (t.clone(), pool.clone());
        processing.spawn(async move {
            let (file, chunk) = (header.file, header.chunk);
            let t2 = t.clone();
            let input = tokio::task::spawn_blocking(move || {
                let stored = store_chunk(&header, &payload, &path);
                pool.give(payload);
                match stored {
                    // Journaled only once written and verified.
                    Stored::Verified(hash) => match journal(&t2, file, chunk, &hash) {
                        Ok(()) => {
                            if let Some(p) = t2.space.lock().ok().as_ref().and_then(|p| p.as_ref())
                            {
                                p.wrote(header.raw_len);
                            }
                            ReceiverInput::ChunkStored { file, chunk, hash }
                        }
                        Err(e) => ReceiverInput::StoreFailed {
                            no_space: e.raw_os_error() == Some(libc::ENOSPC),
                            error: format!("journal: {e}"),
                        },
                    },
                    Stored::Mismatch(reason) => ReceiverInput::ChunkMismatch {
                        file,
                        chunk,
                        reason,
                    },
                    Stored::WriteFailed(e) => ReceiverInput::StoreFailed {
                        no_space: e.raw_os_error() == Some(libc::ENOSPC),
                        error: e.to_string(),
                    },
                }
            })
            .await
            .unwrap_or_else(|e| ReceiverInput::StoreFailed {
                no_space: false,
                error: format!("chunk worker failed: {e}"),
            });
            if let ReceiverInput::ChunkMismatch { reason, .. } = &input {
                tracing::warn!(file, chunk, %reason, "chunk failed verification");
                t.shared.metrics.verify_failures.inc();
            }
            t.handle_for_control(input);
            drop(permit);
        });
        // Reap finished chunks so the set stays small.
        while processing.try_join_next().is_some() {}
    }
    while processing.join_next().await.is_some() {}
}

fn journal(t: &Transfer, file: u64, chunk: u64, hash: &[u8; 32]) -> std::io::Result<()> {
    match t.staging.lock() {
        Ok(mut s) => match s.as_mut() {
            Some(s) => s.journal_append(file, chunk, hash),
            None => Err(std::io::Error::other("staging is gone")),
        },
        Err(_) => Err(std::io::Error::other("staging lock poisoned")),
    }
}
