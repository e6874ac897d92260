//! The receiver's side of the protocol as a state machine: which message is allowed when,
//! what every chunk frame may do, when the tree is complete and verified, and how a
//! transfer ends.
//!
//! Deterministic and sans-io, in the style of quinn-proto: no sockets, no files, no clock
//! (progress is reported on the driver's [`ReceiverInput::Tick`]). The driver ([`super`])
//! feeds every event ([`ReceiverInput`]) and carries out what comes back
//! ([`ReceiverOutput`]): write a control message, claim the destination and wait for a slot,
//! prepare staging, store or skip a chunk, install, discard staging, finish. The I/O results
//! come back as inputs. The rules that keep a hostile sender harmless are all here, ahead of
//! any write: the manifest is validated ([`ManifestBuilder`]) before staging is prepared,
//! every frame header is checked against it ([`ChunkTracker::check_header`]) before its
//! payload is stored, and `Install` is asked for only once every chunk is verified and both
//! root hashes are equal (property-tested below, with real staging on disk).
//!
//! With tickets on ([`TicketGate`], [`crate::ticket`]) the `Hello` must carry a ticket that
//! opens with a trusted signer and names this destination, this sender and a time not past;
//! once the destination is claimed, what is installed there must fit the ticket's grant
//! ([`ReceiverInput::AtDestination`]); the manifest must be the one it names, if it names
//! one; and an install spends its nonce, so the ticket cannot serve another transfer.
//!
//! States: `AwaitHello` → `AwaitAdmission` (`Claim`; `Queued` to a version 2 sender while in
//! line) → `Manifest` (entries, `ManifestEnd`) → `Preparing` → `Receiving` (`Have`*, `Accept`;
//! frames, `Done`, `Progress` on ticks, `Retry` on mismatches) → `Installing` or `Staged` →
//! `Finished`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::identity::Fingerprint;
use crate::manifest::{Manifest, ManifestBuilder};
use crate::staging::Request;
use crate::ticket::{self, Refusal, SpentNonces, Ticket};
use crate::tracker::{ChunkState, ChunkTracker, Mismatch};
use crate::wire::{
    hex, ChunkHeader, ControlMsg, FailCode, Hash, HAVES_SINCE_VERSION, MAX_HAVE_PER_FRAME,
    QUEUED_SINCE_VERSION, TICKET_SINCE_VERSION,
};

/// What a receiver with tickets on checks each transfer against (see [`crate::ticket`]).
#[derive(Debug, Clone)]
pub struct TicketGate {
    /// Fingerprints of the orchestrator keys whose tickets are honoured.
    pub signers: Arc<HashSet<Fingerprint>>,
    /// Nonces of tickets whose transfer installed (shared by the receiver's transfers).
    pub spent: Arc<Mutex<SpentNonces>>,
    /// The TLS-authenticated sender of this connection.
    pub sender: Fingerprint,
    /// Unix seconds when the connection was accepted: the expiry is checked against it.
    pub now: u64,
}

/// What happened, for the session.
#[derive(Debug, Clone)]
pub enum ReceiverInput {
    /// A message from the sender's control stream.
    Control(ControlMsg),
    /// The sender finished its control stream.
    ControlClosed,
    /// The connection is gone.
    ConnectionLost(String),
    /// The control stream carried bytes that are not a valid message.
    ControlUnreadable(String),
    /// Still waiting for a transfer slot (after [`ReceiverOutput::Claim`]).
    InLine {
        position: u64,
        active: u64,
        limit: u64,
    },
    /// The destination is claimed and a slot is ours.
    Admitted,
    /// The destination is held by someone else, or the line is full.
    Refused(String),
    /// What is installed at the claimed destination (after [`ReceiverOutput::Claim`] with
    /// `ticketed`, before `Admitted`): whether anything is there, and the root hash (hex) the
    /// receiver recorded when it installed it.
    AtDestination {
        exists: bool,
        installed_root: Option<String>,
    },
    /// Staging is ready; the tracker holds what an earlier attempt verified.
    Prepared(ChunkTracker),
    PrepareFailed {
        code: FailCode,
        message: String,
    },
    /// A data stream's next frame header.
    ChunkFrame(ChunkHeader),
    /// A data stream carried bytes that are not a chunk frame.
    FrameUnreadable(String),
    /// A chunk decoded, hashed equal to its header, was written and journaled.
    ChunkStored {
        file: u64,
        chunk: u64,
        hash: Hash,
    },
    /// A chunk did not decode or hash to its header's hash.
    ChunkMismatch {
        file: u64,
        chunk: u64,
        reason: String,
    },
    /// Writing or journaling a chunk failed.
    StoreFailed {
        error: String,
        no_space: bool,
    },
    /// Time to report progress; `wire_bytes`: frame bytes read from the data streams so
    /// far, counted by the driver as they are read (a chunk still arriving counts its part,
    /// so the sender's link estimate is not quantised by whole chunks).
    Tick {
        wire_bytes: u64,
    },
    /// The tree was installed at `path` (an earlier one moved aside to `replaced`).
    Installed {
        path: Vec<u8>,
        replaced: Option<Vec<u8>>,
    },
    InstallFailed(String),
}

/// What the driver must do.
#[derive(Debug)]
pub enum ReceiverOutput {
    /// Write this on the control stream.
    Send(ControlMsg),
    /// Claim `dest` and wait for a transfer slot; answer `InLine`*, then `Admitted` or
    /// `Refused`. When `ticketed`, answer [`ReceiverInput::AtDestination`] first, once the
    /// destination is claimed.
    Claim {
        dest: Vec<u8>,
        resume: bool,
        ticketed: bool,
    },
    /// Prepare staging as the sender asked (owner check, space check, carry-over when
    /// resuming, with git's rules for a git directory); answer `Prepared` or `PrepareFailed`.
    Prepare {
        manifest: Arc<Manifest>,
        request: Request,
    },
    /// Data streams may flow: accept them.
    AcceptData,
    /// Read this frame's payload, decode, verify, write, journal; answer `ChunkStored`,
    /// `ChunkMismatch` or `StoreFailed`.
    StoreChunk(ChunkHeader),
    /// Read this frame's payload and drop it (the chunk is verified already).
    SkipChunk,
    /// Apply metadata, `syncfs`, install; answer `Installed` or `InstallFailed`.
    Install,
    /// A pre-copy verified: give the staged files their final metadata now, outside the
    /// read-only window ([`crate::staging::Staging::settle`]); no answer (a failure only
    /// leaves the work to the install).
    Settle,
    /// Remove the staging area (disk full: give the space back).
    DiscardStaging,
    /// The transfer is over.
    Finished(Result<Outcome, Error>),
}

/// How a transfer succeeded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Installed {
        root_hash: Hash,
        path: Vec<u8>,
        replaced: Option<Vec<u8>>,
    },
    /// Verified and kept in staging (a pre-copy).
    Staged { root_hash: Hash },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAdmission,
    Manifest,
    Preparing,
    Receiving,
    Installing,
    Finished,
}

/// The receiver's protocol state for one transfer.
pub struct ReceiverSession {
    state: State,
    /// The sender's protocol version, from its `Hello`.
    version: u16,
    /// The `Hello` versions this connection's handshake allows ([`crate::wire::Negotiated`]).
    serves: std::ops::RangeInclusive<u16>,
    install: bool,
    /// What the sender asked of staging and install (from its `Hello`).
    request: Request,
    builder: Option<ManifestBuilder>,
    manifest: Option<Arc<Manifest>>,
    tracker: Option<ChunkTracker>,
    sender_root: Option<Hash>,
    /// Tickets on: the rules, and the ticket this transfer carries once it passed them.
    gate: Option<TicketGate>,
    ticket: Option<Ticket>,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    pub fn new() -> Self {
        Self::with_tickets(None)
    }

    /// A session that requires a ticket passing `gate` (none: the allow-list alone decides).
    pub fn with_tickets(gate: Option<TicketGate>) -> Self {
        ReceiverSession {
            state: State::AwaitHello,
            version: 0,
            serves: crate::wire::MIN_PROTOCOL_VERSION..=crate::wire::PROTOCOL_VERSION,
            install: false,
            request: Request::default(),
            builder: None,
            manifest: None,
            tracker: None,
            sender_root: None,
            gate,
            ticket: None,
        }
    }

    /// Serves only the `Hello` versions the connection negotiated (by default every version
    /// this build knows, as for a connection without ALPN).
    pub fn serving(mut self, versions: std::ops::RangeInclusive<u16>) -> Self {
        self.serves = versions;
        self
    }

    /// The ticket this transfer carries, once it passed the checks.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// Refuses the transfer for its ticket: `Unauthorized` to senders that know the code.
    fn unauthorized(&mut self, refusal: Refusal, out: &mut Vec<ReceiverOutput>) {
        let code = if self.version >= TICKET_SINCE_VERSION {
            FailCode::Unauthorized
        } else {
            FailCode::BadRequest
        };
        self.fail(code, refusal.to_string(), out);
    }

    /// The `Hello`'s ticket against the gate: opened, for this destination and sender, not
    /// expired, not spent.
    fn admit_ticket(gate: &TicketGate, hello: &crate::wire::Hello) -> Result<Ticket, Refusal> {
        if hello.ticket.is_empty() {
            return Err(Refusal::Missing);
        }
        let text = std::str::from_utf8(&hello.ticket)
            .map_err(|_| Refusal::Malformed("not UTF-8 text".into()))?;
        let signed = ticket::open(text, &gate.signers)?;
        ticket::check(&signed.ticket, gate.now, &hello.dest, &gate.sender)?;
        let spent = gate
            .spent
            .lock()
            .map(|mut s| s.is_spent(&signed.ticket, gate.now))
            .unwrap_or(true);
        if spent {
            return Err(Refusal::Replayed);
        }
        Ok(signed.ticket)
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The validated manifest, once the sender's `ManifestEnd` was accepted.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// The root hash the sender announced (equal to ours once `Install` was asked for).
    pub fn sender_root(&self) -> Option<Hash> {
        self.sender_root
    }

    /// What is verified of each file, once staging is prepared.
    pub fn tracker(&self) -> Option<&ChunkTracker> {
        self.tracker.as_ref()
    }

    /// (verified chunks, verified bytes, total chunks), once staging is prepared.
    pub fn verified(&self) -> Option<(u64, u64, u64)> {
        self.tracker
            .as_ref()
            .map(|t| (t.verified_chunks(), t.verified_bytes(), t.total_chunks()))
    }

    /// Feeds one event; returns what to do, in order. After `Finished`, nothing.
    pub fn handle(&mut self, input: ReceiverInput) -> Vec<ReceiverOutput> {
        let mut out = Vec::new();
        if self.state != State::Finished {
            self.step(input, &mut out);
        }
        out
    }

    fn finish(&mut self, result: Result<Outcome, Error>, out: &mut Vec<ReceiverOutput>) {
        self.state = State::Finished;
        out.push(ReceiverOutput::Finished(result));
    }

    /// Refuses the transfer: tells the sender why, and ends.
    fn fail(&mut self, code: FailCode, message: String, out: &mut Vec<ReceiverOutput>) {
        out.push(ReceiverOutput::Send(ControlMsg::Fail {
            code,
            message: message.clone(),
        }));
        if code == FailCode::NoSpace {
            out.push(ReceiverOutput::DiscardStaging);
        }
        self.finish(Err(Error::Refused { code, message }), out);
    }

    fn step(&mut self, input: ReceiverInput, out: &mut Vec<ReceiverOutput>) {
        use ReceiverInput as In;
        match (self.state, input) {
            (State::Installing, In::Installed { path, replaced }) => {
                let root_hash = self.sender_root.unwrap_or_default();
                if let (Some(gate), Some(held)) = (&self.gate, &self.ticket) {
                    if let Ok(mut spent) = gate.spent.lock() {
                        spent.spend(held, gate.now);
                    }
                }
                out.push(ReceiverOutput::Send(ControlMsg::Installed {
                    root_hash,
                    path: path.clone(),
                    replaced: replaced.clone(),
                }));
                self.finish(
                    Ok(Outcome::Installed {
                        root_hash,
                        path,
                        replaced,
                    }),
                    out,
                );
            }
            (State::Installing, In::InstallFailed(e)) => {
                self.fail(FailCode::Io, format!("install failed: {e}"), out)
            }
            // Verified and installing: nothing the sender says changes that now.
            (State::Installing, _) => {}
            (_, In::ConnectionLost(why)) => self.finish(Err(Error::Interrupted(why)), out),
            (_, In::Control(ControlMsg::Fail { message, .. })) => self.finish(
                Err(Error::Refused {
                    code: FailCode::Aborted,
                    message,
                }),
                out,
            ),
            (_, In::ControlClosed) => self.finish(
                Err(Error::Interrupted(
                    "sender closed the control stream".into(),
                )),
                out,
            ),
            (_, In::ControlUnreadable(e)) => {
                self.fail(FailCode::BadRequest, format!("protocol error: {e}"), out)
            }
            (_, In::FrameUnreadable(e)) => {
                self.fail(FailCode::BadRequest, format!("protocol error: {e}"), out)
            }
            (State::AwaitHello, In::Control(ControlMsg::Hello(hello))) => {
                self.version = hello.version;
                let known = crate::wire::MIN_PROTOCOL_VERSION..=crate::wire::PROTOCOL_VERSION;
                if known.contains(&hello.version) && !self.serves.contains(&hello.version) {
                    let (low, high) = (self.serves.start(), self.serves.end());
                    return self.fail(
                        FailCode::BadRequest,
                        format!(
                            "the Hello says protocol version {} but the handshake negotiated \
                             {low}..={high} (a sender must speak the version its ALPN id names)",
                            hello.version
                        ),
                        out,
                    );
                }
                if let Some(gate) = &self.gate {
                    match Self::admit_ticket(gate, &hello) {
                        Ok(ticket) => self.ticket = Some(ticket),
                        Err(refusal) => return self.unauthorized(refusal, out),
                    }
                }
                match ManifestBuilder::new(&hello) {
                    Ok(b) => {
                        self.builder = Some(b);
                        self.install = hello.install;
                        self.request = Request::of(&hello);
                        self.state = State::AwaitAdmission;
                        out.push(ReceiverOutput::Claim {
                            dest: hello.dest,
                            resume: hello.resume,
                            ticketed: self.ticket.is_some(),
                        });
                    }
                    Err(e) => self.fail(FailCode::BadRequest, e.to_string(), out),
                }
            }
            (State::AwaitHello, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("expected Hello, got {}", other.brief()),
                out,
            ),
            (
                State::AwaitAdmission,
                In::InLine {
                    position,
                    active,
                    limit,
                },
            ) => {
                // A version 1 sender knows no `Queued`: it just waits for `Accept`.
                if self.version >= QUEUED_SINCE_VERSION {
                    out.push(ReceiverOutput::Send(ControlMsg::Queued {
                        position,
                        active,
                        limit,
                    }));
                }
            }
            (
                State::AwaitAdmission,
                In::AtDestination {
                    exists,
                    installed_root,
                },
            ) => {
                if let Some(held) = &self.ticket {
                    if let Err(refusal) =
                        ticket::check_grant(&held.grant, exists, installed_root.as_deref())
                    {
                        self.unauthorized(refusal, out);
                    }
                }
            }
            (State::AwaitAdmission, In::Admitted) => self.state = State::Manifest,
            (State::AwaitAdmission, In::Refused(message)) => {
                self.fail(FailCode::Busy, message, out)
            }
            (State::Manifest, In::Control(ControlMsg::Entry(entry))) => {
                let pushed = match self.builder.as_mut() {
                    Some(b) => b.push(entry).map_err(|e| e.to_string()),
                    None => Err("internal: no manifest builder".into()),
                };
                if let Err(e) = pushed {
                    self.fail(FailCode::BadRequest, e, out);
                }
            }
            (State::Manifest, In::Control(ControlMsg::ManifestEnd { manifest_hash })) => {
                let built = match self.builder.take() {
                    Some(b) => b.finish(&manifest_hash).map_err(|e| e.to_string()),
                    None => Err("internal: no manifest builder".into()),
                };
                if let (Ok(m), Some(t)) = (&built, &self.ticket) {
                    if let Err(refusal) = ticket::check_manifest(t, &m.manifest_hash) {
                        return self.unauthorized(refusal, out);
                    }
                }
                match built {
                    Ok(m) => {
                        let manifest = Arc::new(m);
                        self.manifest = Some(manifest.clone());
                        self.state = State::Preparing;
                        out.push(ReceiverOutput::Prepare {
                            manifest,
                            request: self.request.clone(),
                        });
                    }
                    Err(e) => self.fail(FailCode::BadRequest, e, out),
                }
            }
            (State::Manifest, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("expected a manifest entry, got {}", other.brief()),
                out,
            ),
            (State::Preparing, In::Prepared(tracker)) => self.accept(tracker, out),
            (State::Preparing, In::PrepareFailed { code, message }) => {
                self.fail(code, message, out)
            }
            (State::Receiving, In::ChunkFrame(header)) => self.frame(header, out),
            (State::Receiving, In::ChunkStored { file, chunk, hash }) => {
                if let Some(t) = self.tracker.as_mut() {
                    t.mark_verified(file, chunk, hash);
                }
                self.maybe_complete(out);
            }
            (
                State::Receiving,
                In::ChunkMismatch {
                    file,
                    chunk,
                    reason,
                },
            ) => self.mismatch(file, chunk, reason, out),
            (State::Receiving, In::StoreFailed { error, no_space }) => {
                if no_space {
                    let total = self.manifest.as_ref().map_or(0, |m| m.total_bytes);
                    let verified = self.tracker.as_ref().map_or(0, |t| t.verified_bytes());
                    let remaining = total.saturating_sub(verified);
                    self.fail(
                        FailCode::NoSpace,
                        format!(
                            "receiver disk full: at least {remaining} more bytes are needed; \
                             staging removed, target untouched"
                        ),
                        out,
                    );
                } else {
                    self.fail(FailCode::Io, format!("write failed: {error}"), out);
                }
            }
            (State::Receiving, In::Control(ControlMsg::Done { root_hash })) => {
                self.sender_root = Some(root_hash);
                self.maybe_complete(out);
            }
            (State::Receiving, In::Tick { wire_bytes }) => {
                if let Some(t) = &self.tracker {
                    out.push(ReceiverOutput::Send(ControlMsg::Progress {
                        verified_chunks: t.verified_chunks(),
                        verified_bytes: t.verified_bytes(),
                        wire_bytes,
                    }));
                }
            }
            (_, In::Tick { .. }) => {}
            (_, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("unexpected control message {}", other.brief()),
                out,
            ),
            (_, In::ChunkFrame(_)) => self.fail(
                FailCode::BadRequest,
                "chunk frame before the transfer was accepted".into(),
                out,
            ),
            (state, input) => self.fail(
                FailCode::Io,
                format!("internal: {input:?} does not fit the receiver's state {state:?}"),
                out,
            ),
        }
    }

    /// Staging is ready: tell the sender what it need not send, and let data flow.
    fn accept(&mut self, tracker: ChunkTracker, out: &mut Vec<ReceiverOutput>) {
        let Some(manifest) = self.manifest.clone() else {
            return self.fail(FailCode::Io, "internal: no manifest".into(), out);
        };
        if tracker.total_chunks() != manifest.total_chunks() {
            return self.fail(
                FailCode::Io,
                "internal: staging does not match the manifest".into(),
                out,
            );
        }
        if self.version >= HAVES_SINCE_VERSION {
            // Many files a frame, at most MAX_HAVE_PER_FRAME files and chunks in all.
            let mut files: Vec<(u64, Vec<(u64, Hash)>)> = Vec::new();
            let mut in_frame = 0;
            for i in 0..manifest.entries.len() {
                for part in tracker.verified_of(i).chunks(MAX_HAVE_PER_FRAME) {
                    if in_frame + part.len() > MAX_HAVE_PER_FRAME
                        || files.len() == MAX_HAVE_PER_FRAME
                    {
                        let full = std::mem::take(&mut files);
                        out.push(ReceiverOutput::Send(ControlMsg::Haves { files: full }));
                        in_frame = 0;
                    }
                    in_frame += part.len();
                    files.push((i as u64, part.to_vec()));
                }
            }
            if !files.is_empty() {
                out.push(ReceiverOutput::Send(ControlMsg::Haves { files }));
            }
        } else {
            for i in 0..manifest.entries.len() {
                for part in tracker.verified_of(i).chunks(MAX_HAVE_PER_FRAME) {
                    out.push(ReceiverOutput::Send(ControlMsg::Have {
                        file: i as u64,
                        chunks: part.to_vec(),
                    }));
                }
            }
        }
        out.push(ReceiverOutput::Send(ControlMsg::Accept {
            verified_bytes: tracker.verified_bytes(),
        }));
        out.push(ReceiverOutput::AcceptData);
        self.tracker = Some(tracker);
        self.state = State::Receiving;
        // Everything carried over and nothing to send: the sender's `Done` completes it.
    }

    fn frame(&mut self, header: ChunkHeader, out: &mut Vec<ReceiverOutput>) {
        let Some(tracker) = &self.tracker else {
            return self.fail(FailCode::Io, "internal: no tracker".into(), out);
        };
        match tracker.check_header(&header) {
            Ok(state) => {
                out.push(match state {
                    ChunkState::Missing => ReceiverOutput::StoreChunk(header),
                    // A retry raced with the original: read and drop the payload.
                    ChunkState::AlreadyVerified => ReceiverOutput::SkipChunk,
                });
            }
            Err(e) => self.fail(FailCode::BadRequest, e.to_string(), out),
        }
    }

    fn mismatch(&mut self, file: u64, chunk: u64, reason: String, out: &mut Vec<ReceiverOutput>) {
        let Some(tracker) = self.tracker.as_mut() else {
            return self.fail(FailCode::Io, "internal: no tracker".into(), out);
        };
        match tracker.record_mismatch(file, chunk) {
            Mismatch::Retry { .. } => out.push(ReceiverOutput::Send(ControlMsg::Retry {
                file,
                chunk,
                reason,
            })),
            Mismatch::GiveUp { attempts } => {
                let path = self
                    .manifest
                    .as_ref()
                    .and_then(|m| m.entries.get(usize::try_from(file).ok()?))
                    .map(|e| String::from_utf8_lossy(&e.path).into_owned())
                    .unwrap_or_default();
                self.fail(
                    FailCode::Verification,
                    format!(
                        "chunk {chunk} of {path:?} failed verification {attempts} times \
                         ({reason}); the path corrupts data persistently"
                    ),
                    out,
                );
            }
        }
    }

    /// Every chunk verified and the sender's root known: compare roots, then install or
    /// keep staged.
    fn maybe_complete(&mut self, out: &mut Vec<ReceiverOutput>) {
        let (Some(tracker), Some(manifest), Some(sender_root)) =
            (&self.tracker, &self.manifest, self.sender_root)
        else {
            return;
        };
        if !tracker.is_complete() {
            return;
        }
        match tracker.root_hash(&manifest.manifest_hash) {
            Some(ours) if ours == sender_root => {
                if self.install {
                    self.state = State::Installing;
                    out.push(ReceiverOutput::Install);
                } else {
                    out.push(ReceiverOutput::Settle);
                    out.push(ReceiverOutput::Send(ControlMsg::Staged { root_hash: ours }));
                    self.finish(Ok(Outcome::Staged { root_hash: ours }), out);
                }
            }
            Some(ours) => self.fail(
                FailCode::Verification,
                format!(
                    "root hash mismatch: receiver {} vs sender {}",
                    hex(&ours),
                    hex(&sender_root)
                ),
                out,
            ),
            None => self.fail(FailCode::Verification, "chunks missing at Done".into(), out),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The receiver session driven like the driver drives it, with real staging in a temp
    //! root: an honest transfer, the `Queued` rule, and the hostile-peer harness.

    use std::collections::VecDeque;
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;
    use crate::recv::store::{store_chunk, Stored};
    use crate::staging::Staging;
    use crate::wire::{Codec, Entry, EntryKind, Hello, RootHasher, RootKind, PROTOCOL_VERSION};

    const CHUNK: u64 = 64 * 1024;

    /// An honest sender's transfer: manifest, file contents, frames, root hash.
    struct Honest {
        manifest: Manifest,
        contents: Vec<Option<Vec<u8>>>,
        frames: Vec<(ChunkHeader, Vec<u8>)>,
        root: Hash,
    }

    fn entry(path: &str, kind: EntryKind, size: u64, target: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
            size,
            link_target: target.as_bytes().to_vec(),
            ino: 7,
            ctime_sec: 1,
            ctime_nsec: 0,
            attrs: None,
        }
    }

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn honest(seed: u64) -> Honest {
        let b = bytes(70_000, seed);
        let a = b"text compresses well\n".repeat(7_000);
        let zeros = vec![0u8; CHUNK as usize];
        let entries = vec![
            entry("", EntryKind::Dir, 0, ""),
            entry("b", EntryKind::File, b.len() as u64, ""),
            entry("d", EntryKind::Dir, 0, ""),
            entry("d/a", EntryKind::File, a.len() as u64, ""),
            entry("d/z", EntryKind::File, zeros.len() as u64, ""),
            entry("h", EntryKind::Hardlink, 0, "d/a"),
            entry("l", EntryKind::Symlink, 0, "b"),
        ];
        let contents = vec![None, Some(b), None, Some(a), Some(zeros), None, None];
        let manifest = Manifest::from_scan(RootKind::Dir, CHUNK, entries);
        let mut frames = Vec::new();
        let mut root = RootHasher::new(&manifest.manifest_hash);
        for (file, content) in contents.iter().enumerate() {
            let Some(content) = content else { continue };
            for (chunk, raw) in content.chunks(CHUNK as usize).enumerate() {
                let hash = *blake3::hash(raw).as_bytes();
                root.add_chunk(&hash);
                let (codec, payload) = if raw.iter().all(|b| *b == 0) {
                    (Codec::Zero, Vec::new())
                } else if file == 3 {
                    (Codec::Zstd, zstd::bulk::compress(raw, 3).unwrap())
                } else {
                    (Codec::Raw, raw.to_vec())
                };
                frames.push((
                    ChunkHeader {
                        file: file as u64,
                        chunk: chunk as u64,
                        offset: chunk as u64 * CHUNK,
                        raw_len: raw.len() as u64,
                        codec,
                        payload_len: payload.len() as u64,
                        hash,
                    },
                    payload,
                ));
            }
        }
        Honest {
            manifest,
            contents,
            frames,
            root: root.finish(),
        }
    }

    fn hello(h: &Honest, version: u16, install: bool) -> ControlMsg {
        ControlMsg::Hello(Hello {
            version,
            dest: b"r.git".to_vec(),
            root_kind: RootKind::Dir,
            chunk_size: CHUNK,
            entry_count: h.manifest.entries.len() as u64,
            total_bytes: h.manifest.total_bytes,
            resume: false,
            install,
            sender_info: "test".into(),
            git: false,
            owner: Default::default(),
            external_links: Vec::new(),
            ticket: Vec::new(),
        })
    }

    /// One step of what a sender does.
    #[derive(Debug, Clone)]
    enum Step {
        Msg(ControlMsg),
        Frame(ChunkHeader, Vec<u8>),
        Tick,
    }

    fn honest_script(h: &Honest, install: bool) -> Vec<Step> {
        let mut s = vec![Step::Msg(hello(h, PROTOCOL_VERSION, install))];
        s.extend(
            h.manifest
                .entries
                .iter()
                .cloned()
                .map(|e| Step::Msg(ControlMsg::Entry(e))),
        );
        s.push(Step::Msg(ControlMsg::ManifestEnd {
            manifest_hash: h.manifest.manifest_hash,
        }));
        s.extend(h.frames.iter().cloned().map(|(hd, p)| Step::Frame(hd, p)));
        s.push(Step::Msg(ControlMsg::Done { root_hash: h.root }));
        s
    }

    /// The driver, synchronous: carries out outputs with real staging under `root`.
    struct Driver {
        root: PathBuf,
        session: ReceiverSession,
        dest: Vec<u8>,
        staging: Option<Staging>,
        sent: Vec<ControlMsg>,
        in_line: u64,
        installed: bool,
        result: Option<Result<Outcome, Error>>,
        stores: u64,
    }

    impl Driver {
        fn new(root: &Path, in_line: u64) -> Self {
            Driver {
                root: root.to_path_buf(),
                session: ReceiverSession::new(),
                dest: Vec::new(),
                staging: None,
                sent: Vec::new(),
                in_line,
                installed: false,
                result: None,
                stores: 0,
            }
        }

        fn feed(&mut self, input: ReceiverInput, payload: &[u8]) {
            let was_finished = self.session.is_finished();
            let mut pending: VecDeque<ReceiverOutput> = self.session.handle(input).into();
            assert!(!was_finished || pending.is_empty(), "output after Finished");
            while let Some(o) = pending.pop_front() {
                let next = match o {
                    ReceiverOutput::Send(m) => {
                        self.sent.push(m);
                        continue;
                    }
                    ReceiverOutput::Claim { dest, .. } => {
                        self.dest = dest;
                        for position in (1..=self.in_line).rev() {
                            pending.extend(self.session.handle(ReceiverInput::InLine {
                                position,
                                active: 1,
                                limit: 1,
                            }));
                        }
                        ReceiverInput::Admitted
                    }
                    ReceiverOutput::Prepare { manifest, request } => {
                        match Staging::prepare(&self.root, &self.dest, &manifest, &request) {
                            Ok((s, t)) => {
                                self.staging = Some(s);
                                ReceiverInput::Prepared(t)
                            }
                            Err(e) => ReceiverInput::PrepareFailed {
                                code: FailCode::Io,
                                message: format!("{e:?}"),
                            },
                        }
                    }
                    ReceiverOutput::AcceptData | ReceiverOutput::SkipChunk => continue,
                    ReceiverOutput::StoreChunk(h) => {
                        self.stores += 1;
                        let manifest = self.session.manifest().cloned().expect("manifest");
                        let staging = self.staging.as_mut().expect("staging before frames");
                        let path = staging.entry_path(&manifest, h.file as usize);
                        assert_eq!(
                            payload.len() as u64,
                            h.payload_len,
                            "store of a checked header"
                        );
                        match store_chunk(&h, payload, &path) {
                            Stored::Verified(hash) => {
                                staging.journal_append(h.file, h.chunk, &hash).unwrap();
                                ReceiverInput::ChunkStored {
                                    file: h.file,
                                    chunk: h.chunk,
                                    hash,
                                }
                            }
                            Stored::Mismatch(reason) => ReceiverInput::ChunkMismatch {
                                file: h.file,
                                chunk: h.chunk,
                                reason,
                            },
                            Stored::WriteFailed(e) => ReceiverInput::StoreFailed {
                                error: e.to_string(),
                                no_space: false,
                            },
                        }
                    }
                    ReceiverOutput::Install => {
                        let manifest = self.session.manifest().cloned().expect("manifest");
                        let staging = self.staging.take().expect("staging to install");
                        self.installed = true;
                        match staging.install(&manifest) {
                            Ok((path, replaced)) => ReceiverInput::Installed {
                                path: path.as_os_str().as_encoded_bytes().to_vec(),
                                replaced: replaced
                                    .map(|p| p.as_os_str().as_encoded_bytes().to_vec()),
                            },
                            Err(e) => ReceiverInput::InstallFailed(e.to_string()),
                        }
                    }
                    ReceiverOutput::DiscardStaging => {
                        if let Some(s) = self.staging.take() {
                            s.discard();
                        }
                        continue;
                    }
                    ReceiverOutput::Settle => {
                        let manifest = self.session.manifest().cloned().expect("manifest");
                        let staging = self.staging.as_mut().expect("staging to settle");
                        staging.settle(&manifest).expect("settle");
                        continue;
                    }
                    ReceiverOutput::Finished(r) => {
                        assert!(self.result.is_none(), "finished twice");
                        self.result = Some(r);
                        continue;
                    }
                };
                pending.extend(self.session.handle(next));
            }
        }

        fn run(&mut self, script: &[Step]) {
            for step in script {
                match step {
                    Step::Msg(m) => self.feed(ReceiverInput::Control(m.clone()), &[]),
                    Step::Frame(h, p) => self.feed(ReceiverInput::ChunkFrame(h.clone()), p),
                    Step::Tick => self.feed(ReceiverInput::Tick { wire_bytes: 0 }, &[]),
                }
            }
            self.feed(ReceiverInput::ControlClosed, &[]);
            // Staging is released as the driver's state would be.
            self.staging = None;
        }
    }

    /// Every path under `root` outside the staging directory.
    fn outside_staging(root: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p == root.join(crate::manifest::STAGING_DIR_NAME) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p.clone());
                }
                found.push(p);
            }
        }
        found
    }

    /// The installed tree is the honest one, byte for byte.
    fn assert_installed(root: &Path, h: &Honest) {
        let base = root.join("r.git");
        for (e, content) in h.manifest.entries.iter().zip(&h.contents) {
            let p = base.join(std::str::from_utf8(&e.path).unwrap());
            match e.kind {
                EntryKind::File => {
                    assert_eq!(&std::fs::read(&p).unwrap(), content.as_ref().unwrap())
                }
                EntryKind::Dir => assert!(p.is_dir()),
                EntryKind::Symlink => assert_eq!(std::fs::read_link(&p).unwrap(), Path::new("b")),
                EntryKind::Hardlink => {
                    use std::os::unix::fs::MetadataExt;
                    let first = std::fs::metadata(base.join("d/a")).unwrap();
                    let link = std::fs::metadata(&p).unwrap();
                    assert_eq!((link.ino(), link.nlink()), (first.ino(), 2));
                }
            }
        }
    }

    #[test]
    fn an_honest_transfer_is_installed_and_a_precopy_kept_staged() {
        let h = honest(1);
        for install in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let mut d = Driver::new(t.path(), 0);
            d.run(&honest_script(&h, install));
            let result = d.result.take().unwrap();
            if install {
                assert!(
                    matches!(result, Ok(Outcome::Installed { root_hash, .. }) if root_hash == h.root)
                );
                assert_installed(t.path(), &h);
                assert!(matches!(d.sent.last(), Some(ControlMsg::Installed { .. })));
            } else {
                assert!(matches!(result, Ok(Outcome::Staged { .. })));
                assert!(outside_staging(t.path()).is_empty());
                assert!(matches!(d.sent.last(), Some(ControlMsg::Staged { .. })));
            }
            assert!(matches!(
                d.sent[0],
                ControlMsg::Accept { verified_bytes: 0 }
            ));
        }
    }

    #[test]
    fn what_staging_holds_goes_as_haves_to_new_senders_and_as_have_to_old_ones() {
        let h = honest(3);
        for version in [PROTOCOL_VERSION, HAVES_SINCE_VERSION - 1] {
            let t = tempfile::tempdir().unwrap();
            // A pre-copy, then the final pass of the same tree, resumed.
            Driver::new(t.path(), 0).run(&honest_script(&h, false));
            let mut d = Driver::new(t.path(), 0);
            let mut script = honest_script(&h, true);
            let ControlMsg::Hello(mut hello) = hello(&h, version, true) else {
                unreachable!()
            };
            hello.resume = true;
            script[0] = Step::Msg(ControlMsg::Hello(hello));
            d.run(&script);
            assert!(matches!(d.result, Some(Ok(Outcome::Installed { .. }))));
            assert_eq!(d.stores, 0, "everything was held");
            let accept = d
                .sent
                .iter()
                .position(|m| matches!(m, ControlMsg::Accept { .. }))
                .unwrap();
            let held: Vec<(u64, usize)> = d.sent[..accept]
                .iter()
                .flat_map(|m| match m {
                    ControlMsg::Haves { files } => {
                        assert!(version >= HAVES_SINCE_VERSION);
                        files.iter().map(|(f, c)| (*f, c.len())).collect()
                    }
                    ControlMsg::Have { file, chunks } => {
                        assert!(version < HAVES_SINCE_VERSION);
                        vec![(*file, chunks.len())]
                    }
                    other => panic!("{other:?} before Accept"),
                })
                .collect();
            // b: 2 chunks, d/a: 3, d/z: 1.
            assert_eq!(held, [(1, 2), (3, 3), (4, 1)], "version {version}");
            let frames = if version >= HAVES_SINCE_VERSION { 1 } else { 3 };
            assert_eq!(accept, frames);
        }
    }

    #[test]
    fn queued_goes_only_to_senders_that_understand_it() {
        let h = honest(2);
        for (version, expect_queued) in [(1, false), (PROTOCOL_VERSION, true)] {
            let t = tempfile::tempdir().unwrap();
            let mut d = Driver::new(t.path(), 3);
            let mut script = honest_script(&h, true);
            script[0] = Step::Msg(hello(&h, version, true));
            d.run(&script);
            let queued: Vec<u64> = d
                .sent
                .iter()
                .filter_map(|m| match m {
                    ControlMsg::Queued { position, .. } => Some(*position),
                    _ => None,
                })
                .collect();
            if expect_queued {
                assert_eq!(queued, [3, 2, 1]);
            } else {
                assert!(queued.is_empty(), "version 1 got {queued:?}");
            }
            assert!(matches!(d.result, Some(Ok(Outcome::Installed { .. }))));
        }
    }

    #[test]
    fn a_hello_must_carry_the_version_its_connection_negotiated() {
        use crate::wire::{Negotiated, PREVIOUS_PROTOCOL_VERSION};
        let h = honest(2);
        let current = Negotiated::from_alpn(Some(&crate::wire::alpn_id(PROTOCOL_VERSION)))
            .unwrap()
            .serves;
        let legacy = Negotiated::from_alpn(Some(crate::wire::LEGACY_ALPN))
            .unwrap()
            .serves;
        for (serves, version, ok) in [
            (current.clone(), PROTOCOL_VERSION, true),
            (current, PREVIOUS_PROTOCOL_VERSION, false),
            (legacy.clone(), PREVIOUS_PROTOCOL_VERSION, true),
            (legacy.clone(), 1, true),
            (legacy, PROTOCOL_VERSION, false),
        ] {
            let t = tempfile::tempdir().unwrap();
            let mut d = Driver::new(t.path(), 0);
            d.session = ReceiverSession::new().serving(serves.clone());
            let mut script = honest_script(&h, true);
            script[0] = Step::Msg(hello(&h, version, true));
            d.run(&script);
            let case = format!("version {version} on a connection serving {serves:?}");
            if ok {
                assert!(
                    matches!(d.result, Some(Ok(Outcome::Installed { .. }))),
                    "{case}"
                );
            } else {
                assert!(
                    matches!(&d.sent[0], ControlMsg::Fail { code: FailCode::BadRequest, message }
                        if message.contains("negotiated")),
                    "{case}: {:?}",
                    d.sent
                );
                assert!(outside_staging(t.path()).is_empty(), "{case}");
            }
        }
    }

    #[test]
    fn a_corrupted_chunk_is_asked_for_again_then_the_transfer_fails() {
        let h = honest(3);
        let t = tempfile::tempdir().unwrap();
        let mut d = Driver::new(t.path(), 0);
        let mut script = honest_script(&h, true);
        let at = script
            .iter()
            .position(|s| matches!(s, Step::Frame(..)))
            .unwrap();
        let Step::Frame(hd, mut p) = script[at].clone() else {
            unreachable!()
        };
        p[0] ^= 1;
        for _ in 0..crate::tracker::MAX_CHUNK_ATTEMPTS {
            script.insert(at, Step::Frame(hd.clone(), p.clone()));
        }
        d.run(&script);
        let retries = d
            .sent
            .iter()
            .filter(|m| matches!(m, ControlMsg::Retry { .. }))
            .count();
        assert_eq!(retries as u32, crate::tracker::MAX_CHUNK_ATTEMPTS - 1);
        assert!(matches!(
            d.result,
            Some(Err(Error::Refused {
                code: FailCode::Verification,
                ..
            }))
        ));
        assert!(outside_staging(t.path()).is_empty());
    }

    /// The two sessions against each other, no socket: the control messages go through the
    /// `io` helpers over in-memory pipes, the source is a real scanned tree read by the
    /// sender's codec, and the receiver stores into real staging and installs.
    #[tokio::test]
    async fn a_sender_and_a_receiver_session_talk_over_in_memory_pipes() {
        use crate::io::{read_control, write_control, write_controls};
        use crate::send::codec::{encode_chunk, Buffers, EncodeChoice};
        use crate::send::session::{
            Ending, SenderInput, SenderOutput, SenderSession, SenderSessionConfig,
        };
        use crate::send::source::ChunkSource;

        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("objects")).unwrap();
        std::fs::write(src.path().join("objects/pack"), bytes(300_000, 9)).unwrap();
        std::fs::write(src.path().join("config"), b"[core]\n".repeat(5_000)).unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("config", src.path().join("link")).unwrap();
        let scan = crate::scan::scan(
            src.path(),
            crate::scan::ScanOptions {
                chunk_size: CHUNK,
                git: crate::gitdir::GitMode::Off,
                ..Default::default()
            },
        )
        .unwrap();
        let m = &scan.manifest;
        let mut sender = SenderSession::new(
            m,
            SenderSessionConfig {
                dest: b"r.git".to_vec(),
                resume: false,
                stage_only: false,
                last_attempt: true,
                wait_for: std::time::Duration::from_secs(60),
                sender_info: "pair".into(),
                git: false,
                owner: crate::wire::OwnerPolicy::Receiver,
                external_links: Vec::new(),
                ticket: Vec::new(),
                version: crate::wire::PROTOCOL_VERSION,
            },
        );
        let (mut to_receiver, mut receiver_in) = tokio::io::duplex(1 << 20);
        let (mut to_sender, mut sender_in) = tokio::io::duplex(1 << 20);
        let start = sender.start(m);
        write_controls(&mut to_receiver, &start).await.unwrap();
        let mut in_flight_to_receiver = start.len();
        let root = tempfile::tempdir().unwrap();
        let mut receiver = Driver::new(root.path(), 1);
        let mut bufs = Buffers::new(&crate::io::BufferPool::new(1));
        let pool = crate::io::BufferPool::new(1);
        let now = std::time::Instant::now();
        let mut ending = None;
        let mut rounds = 0;
        while ending.is_none() || !receiver.session.is_finished() {
            rounds += 1;
            assert!(rounds < 100, "no progress");
            // The receiver reads what was written to it and answers.
            for _ in 0..std::mem::take(&mut in_flight_to_receiver) {
                let msg = read_control(&mut receiver_in).await.unwrap().unwrap();
                receiver.feed(ReceiverInput::Control(msg), &[]);
            }
            let answers = std::mem::take(&mut receiver.sent);
            for msg in &answers {
                write_control(&mut to_sender, msg).await.unwrap();
            }
            // The sender reads them and carries out what its session says.
            let mut pending = std::collections::VecDeque::new();
            for _ in 0..answers.len() {
                let msg = read_control(&mut sender_in).await.unwrap().unwrap();
                pending.extend(sender.handle(SenderInput::Control(msg), now));
            }
            while let Some(output) = pending.pop_front() {
                match output {
                    SenderOutput::Send(msg) => {
                        write_control(&mut to_receiver, &msg).await.unwrap();
                        in_flight_to_receiver += 1;
                    }
                    SenderOutput::Enqueue(plan) => {
                        for (file, chunk) in plan {
                            let len = m.chunk_len(file as usize, chunk).unwrap();
                            let source = ChunkSource::File(scan.sources[file as usize].clone());
                            let choice = EncodeChoice {
                                compress: true,
                                sample: false,
                                level: 3,
                            };
                            let offset = chunk * m.chunk_size;
                            let e = encode_chunk(&source, offset, len, choice, &mut bufs).unwrap();
                            let (codec, hash) = (e.codec, e.hash);
                            let payload = e.take_payload(&mut bufs, &pool);
                            let header = ChunkHeader {
                                file,
                                chunk,
                                offset,
                                raw_len: len,
                                codec,
                                payload_len: payload.len() as u64,
                                hash,
                            };
                            receiver.feed(ReceiverInput::ChunkFrame(header.clone()), &payload);
                            pending.extend(sender.handle(
                                SenderInput::ChunkWritten {
                                    file,
                                    chunk,
                                    hash,
                                    raw_len: len,
                                    wire_len: ChunkHeader::LEN as u64 + header.payload_len,
                                },
                                now,
                            ));
                        }
                    }
                    SenderOutput::CheckSource => {
                        let changed = crate::scan::changed_since_scan(&scan);
                        pending.extend(sender.handle(SenderInput::SourceChecked { changed }, now));
                    }
                    SenderOutput::Finished(r) => ending = Some(r.unwrap()),
                    SenderOutput::Resend { .. } => panic!("nothing was corrupted"),
                    SenderOutput::Progress { .. } | SenderOutput::Event(_) => {}
                }
            }
        }
        assert!(matches!(ending, Some(Ending::Verified { .. })));
        assert!(matches!(
            receiver.result,
            Some(Ok(Outcome::Installed { .. }))
        ));
        let installed = root.path().join("r.git");
        for name in ["objects/pack", "config", "empty"] {
            assert_eq!(
                std::fs::read(installed.join(name)).unwrap(),
                std::fs::read(src.path().join(name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(
            std::fs::read_link(installed.join("link")).unwrap(),
            Path::new("config")
        );
        assert_eq!(sender.stats().chunks_sent, m.total_chunks());
    }

    fn nasty_path() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"../x".to_vec()),
            Just(b"/etc/x".to_vec()),
            Just(b"d/../../x".to_vec()),
            Just(b".shardrecv/x".to_vec()),
            Just(b"d//x".to_vec()),
            Just(b"b".to_vec()),
            Just(b"d/new".to_vec()),
            Just(b"nodir/x".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ]
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            nasty_path(),
            0u8..4,
            prop_oneof![Just(0u64), Just(10), Just(CHUNK + 1), any::<u64>()],
            prop_oneof![
                Just(b"b".to_vec()),
                Just(b"d".to_vec()),
                Just(b"d/a".to_vec()),
                Just(b"../../etc".to_vec()),
                Just(b"/etc".to_vec()),
                Just(b"/etc/passwd".to_vec()),
                Just(b"d/../..".to_vec())
            ],
        )
            .prop_map(|(path, kind, size, target)| {
                let kind = [
                    EntryKind::File,
                    EntryKind::Dir,
                    EntryKind::Symlink,
                    EntryKind::Hardlink,
                ][kind as usize];
                let mut e = entry("", kind, size, "");
                e.path = path;
                e.link_target = target;
                e
            })
    }

    fn arb_msg(root: Hash, manifest_hash: Hash) -> impl Strategy<Value = ControlMsg> {
        let hash = prop_oneof![Just(root), Just(manifest_hash), any::<[u8; 32]>()];
        prop_oneof![
            (
                nasty_path(),
                any::<bool>(),
                any::<bool>(),
                0u16..4,
                prop_oneof![Just(CHUNK), any::<u64>()],
                0u64..8,
                any::<u64>()
            )
                .prop_map(
                    |(dest, resume, install, version, chunk_size, entry_count, total_bytes)| {
                        ControlMsg::Hello(Hello {
                            version,
                            dest,
                            root_kind: RootKind::Dir,
                            chunk_size,
                            entry_count,
                            total_bytes,
                            resume,
                            install,
                            sender_info: String::new(),
                            git: false,
                            owner: Default::default(),
                            external_links: Vec::new(),
                            ticket: Vec::new(),
                        })
                    }
                ),
            arb_entry().prop_map(ControlMsg::Entry),
            hash.clone()
                .prop_map(|h| ControlMsg::ManifestEnd { manifest_hash: h }),
            hash.clone().prop_map(|h| ControlMsg::Done { root_hash: h }),
            Just(ControlMsg::Accept { verified_bytes: 0 }),
            hash.prop_map(|h| ControlMsg::Staged { root_hash: h }),
            Just(ControlMsg::Fail {
                code: FailCode::Aborted,
                message: "bye".into()
            }),
            (0u64..9, 0u64..4).prop_map(|(file, chunk)| ControlMsg::Retry {
                file,
                chunk,
                reason: String::new()
            }),
        ]
    }

    /// A frame no honest sender makes: any entry and chunk, any offset and lengths, any
    /// codec, a payload that may or may not hash to the header's hash.
    fn arb_frame() -> impl Strategy<Value = (ChunkHeader, Vec<u8>)> {
        (
            0u64..8,
            prop_oneof![0u64..3, any::<u64>()],
            any::<bool>(),
            prop_oneof![Just(CHUNK), 0u64..100, any::<u64>()],
            0u8..3,
            proptest::collection::vec(any::<u8>(), 0..120),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(
                |(file, chunk, offset_ok, raw_len, codec, payload, hash_ok, offset)| {
                    let codec = [Codec::Raw, Codec::Zstd, Codec::Zero][codec as usize];
                    let payload = if codec == Codec::Zero {
                        Vec::new()
                    } else {
                        payload
                    };
                    let hash = if hash_ok {
                        *blake3::hash(&payload).as_bytes()
                    } else {
                        [7; 32]
                    };
                    (
                        ChunkHeader {
                            file,
                            chunk,
                            offset: if offset_ok {
                                chunk.wrapping_mul(CHUNK)
                            } else {
                                offset
                            },
                            raw_len,
                            codec,
                            payload_len: payload.len() as u64,
                            hash,
                        },
                        payload,
                    )
                },
            )
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Drop,
        Duplicate,
        Replace(Step),
        Insert(Step),
    }

    fn arb_mutation() -> impl Strategy<Value = (prop::sample::Index, Mutation)> {
        let h = honest(0);
        let step = prop_oneof![
            3 => arb_msg(h.root, h.manifest.manifest_hash).prop_map(Step::Msg),
            3 => arb_frame().prop_map(|(hd, p)| Step::Frame(hd, p)),
            1 => Just(Step::Tick),
        ];
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(Mutation::Drop),
                Just(Mutation::Duplicate),
                step.clone().prop_map(Mutation::Replace),
                step.prop_map(Mutation::Insert),
            ],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(192))]

        /// The hostile-peer harness (issue 10 item 5): an honest transfer with arbitrary
        /// mutations (messages dropped, repeated, replaced or inserted: hostile paths,
        /// lying sizes and counts, wrong hashes, arbitrary chunk frames) and then the
        /// stream's end. The receiver never panics, ends with a clear error or a success,
        /// never writes outside its staging area unless it installed, installs only at
        /// ROOT/DEST and only the honest tree (when the sender's root is the honest one),
        /// and never grows a staged file past its manifest size.
        #[test]
        fn a_hostile_sender_never_makes_the_receiver_write_outside_staging(
            install in any::<bool>(),
            in_line in 0u64..3,
            mutations in proptest::collection::vec(arb_mutation(), 0..6),
        ) {
            let h = honest(0);
            let mut script = honest_script(&h, install);
            for (at, m) in mutations {
                let i = at.index(script.len());
                match m {
                    Mutation::Drop => { script.remove(i); }
                    Mutation::Duplicate => { let s = script[i].clone(); script.insert(i, s); }
                    Mutation::Replace(s) => script[i] = s,
                    Mutation::Insert(s) => script.insert(i, s),
                }
                if script.is_empty() {
                    break;
                }
            }
            let t = tempfile::tempdir().unwrap();
            let mut d = Driver::new(t.path(), in_line);
            d.run(&script);
            let result = d.result.take();
            prop_assert!(result.is_some(), "the session never finished");
            prop_assert!(d.session.is_finished());
            if let Some(Err(e)) = &result {
                prop_assert!(!e.to_string().is_empty());
            }
            let outside = outside_staging(t.path());
            match &result {
                Some(Ok(Outcome::Installed { root_hash, path, .. })) => {
                    prop_assert!(d.installed);
                    prop_assert_eq!(path.clone(), t.path().join("r.git").as_os_str().as_encoded_bytes().to_vec());
                    let base = t.path().join("r.git");
                    for p in &outside {
                        prop_assert!(p.starts_with(&base), "{} is outside ROOT/DEST", p.display());
                    }
                    if *root_hash == h.root {
                        assert_installed(t.path(), &h);
                    }
                }
                _ => {
                    prop_assert!(!d.installed || outside.iter().all(|p| p.starts_with(t.path().join("r.git"))));
                    if !d.installed {
                        prop_assert!(outside.is_empty(), "wrote outside staging: {:?}", outside);
                    }
                }
            }
            // Staged files never grow past their manifest size.
            if let Some(m) = d.session.manifest() {
                let tree = crate::staging::staging_dir(t.path(), &d.dest).join("tree");
                for e in m.entries.iter().filter(|e| e.kind == EntryKind::File) {
                    let p = tree.join(std::str::from_utf8(&e.path).unwrap_or("\u{0}"));
                    if let Ok(meta) = std::fs::metadata(&p) {
                        prop_assert!(meta.len() <= e.size, "{} grew to {}", p.display(), meta.len());
                    }
                }
            }
        }
    }
}
