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
//! States: `AwaitHello` → `AwaitAdmission` (`Claim`; `Queued` to a version 2 sender while in
//! line) → `Manifest` (entries, `ManifestEnd`) → `Preparing` → `Receiving` (`Have`*, `Accept`;
//! frames, `Done`, `Progress` on ticks, `Retry` on mismatches) → `Installing` or `Staged` →
//! `Finished`.

use std::sync::Arc;

use crate::error::Error;
use crate::manifest::{Manifest, ManifestBuilder};
use crate::tracker::{ChunkState, ChunkTracker, Mismatch};
use crate::wire::{
    hex, ChunkHeader, ControlMsg, FailCode, Hash, MAX_HAVE_PER_FRAME, QUEUED_SINCE_VERSION,
};

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
    /// Time to report progress.
    Tick,
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
    /// `Refused`.
    Claim { dest: Vec<u8>, resume: bool },
    /// Prepare staging (space check, carry-over when `resume`); answer `Prepared` or
    /// `PrepareFailed`.
    Prepare {
        manifest: Arc<Manifest>,
        resume: bool,
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
    install: bool,
    resume: bool,
    builder: Option<ManifestBuilder>,
    manifest: Option<Arc<Manifest>>,
    tracker: Option<ChunkTracker>,
    sender_root: Option<Hash>,
    wire_bytes: u64,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    pub fn new() -> Self {
        ReceiverSession {
            state: State::AwaitHello,
            version: 0,
            install: false,
            resume: false,
            builder: None,
            manifest: None,
            tracker: None,
            sender_root: None,
            wire_bytes: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The validated manifest, once the sender's `ManifestEnd` was accepted.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
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
                match ManifestBuilder::new(&hello) {
                    Ok(b) => {
                        self.builder = Some(b);
                        self.version = hello.version;
                        self.install = hello.install;
                        self.resume = hello.resume;
                        self.state = State::AwaitAdmission;
                        out.push(ReceiverOutput::Claim {
                            dest: hello.dest,
                            resume: hello.resume,
                        });
                    }
                    Err(e) => self.fail(FailCode::BadRequest, e.to_string(), out),
                }
            }
            (State::AwaitHello, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("expected Hello, got {}", describe(&other)),
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
                match built {
                    Ok(m) => {
                        let manifest = Arc::new(m);
                        self.manifest = Some(manifest.clone());
                        self.state = State::Preparing;
                        out.push(ReceiverOutput::Prepare {
                            manifest,
                            resume: self.resume,
                        });
                    }
                    Err(e) => self.fail(FailCode::BadRequest, e, out),
                }
            }
            (State::Manifest, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("expected a manifest entry, got {}", describe(&other)),
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
            (State::Receiving, In::Tick) => {
                if let Some(t) = &self.tracker {
                    out.push(ReceiverOutput::Send(ControlMsg::Progress {
                        verified_chunks: t.verified_chunks(),
                        verified_bytes: t.verified_bytes(),
                        wire_bytes: self.wire_bytes,
                    }));
                }
            }
            (_, In::Tick) => {}
            (_, In::Control(other)) => self.fail(
                FailCode::BadRequest,
                format!("unexpected control message {}", describe(&other)),
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
        for i in 0..manifest.entries.len() {
            for part in tracker.verified_of(i).chunks(MAX_HAVE_PER_FRAME) {
                out.push(ReceiverOutput::Send(ControlMsg::Have {
                    file: i as u64,
                    chunks: part.to_vec(),
                }));
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
                self.wire_bytes = self
                    .wire_bytes
                    .saturating_add(ChunkHeader::LEN as u64)
                    .saturating_add(header.payload_len);
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

/// A message named for an error, without dumping a whole manifest.
fn describe(msg: &ControlMsg) -> String {
    let text = format!("{msg:?}");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}
