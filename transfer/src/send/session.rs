//! The sender's side of the protocol as a state machine: which message is allowed when,
//! what the plan is, when the pass is over and how it ended.
//!
//! Deterministic and sans-io, in the style of quinn-proto: no sockets, no files, no clock but
//! the `now` passed to [`SenderSession::handle`]. The driver ([`super`]) writes
//! [`SenderSession::start`]'s manifest, then feeds every event ([`SenderInput`]: a control
//! message, a chunk frame written, a source that vanished, the answer to a source check, a
//! timeout) and carries out what comes back ([`SenderOutput`]: write a control message,
//! enqueue chunks, re-check the sources, report progress, finish). A hostile receiver can
//! only make it finish with an error (property-tested below).
//!
//! States: `Handshake` (manifest sent; `Queued`* while the receiver is at its limit, then
//! `Have`* and `Accept`) → `Sending` (chunks out, `Progress`, `Retry`; once every enqueued
//! chunk is written: the source check of an installing pass, then `Done`) → the receiver's
//! `Installed`, `Staged` or `Fail` → `Finished`.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::manifest::Manifest;
use crate::tracker::MAX_CHUNK_ATTEMPTS;
use crate::wire::{hex, ControlMsg, FailCode, Hash, Hello, OwnerPolicy, RootHasher};

use super::progress::ProgressMeter;
use super::queue::ChunkId;
use super::SendEvent;

/// What one attempt of a transfer is.
#[derive(Debug, Clone)]
pub struct SenderSessionConfig {
    pub dest: Vec<u8>,
    /// Ask the receiver to keep what an earlier attempt verified.
    pub resume: bool,
    /// A pre-copy: verified into staging, not installed; sources that changed are the final
    /// pass's business.
    pub stage_only: bool,
    /// The last attempt a pre-copy gets: vanished sources then end it partial, not failed.
    pub last_attempt: bool,
    /// How long to wait in a busy receiver's line (0: not at all).
    pub wait_for: Duration,
    /// Free text for the receiver's logs.
    pub sender_info: String,
    /// The source is sent as a git directory ([`crate::gitdir`]).
    pub git: bool,
    /// Who should own the installed files ([`crate::owner`]).
    pub owner: OwnerPolicy,
    /// Where symlinks leaving the tree may point (`--allow-external-link`).
    pub external_links: Vec<Vec<u8>>,
    /// The transfer ticket's text ([`crate::ticket`]), empty without one.
    pub ticket: Vec<u8>,
    /// The protocol version this connection negotiated ([`crate::wire::Negotiated`]).
    pub version: u16,
}

/// What happened, for the session.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderInput {
    /// A message from the receiver.
    Control(ControlMsg),
    /// The receiver finished or lost the control stream.
    ControlClosed,
    /// A chunk frame went out on a data stream.
    ChunkWritten {
        file: u64,
        chunk: u64,
        hash: Hash,
        raw_len: u64,
        wire_len: u64,
    },
    /// A chunk's source vanished or shrank since the scan: it was not sent.
    ChunkVanished { file: u64, chunk: u64, path: String },
    /// The answer to [`SenderOutput::CheckSource`]: sources changed since the scan.
    SourceChecked { changed: Vec<String> },
    /// [`SenderSession::poll_timeout`] passed.
    Timeout,
}

/// What the driver must do.
#[derive(Debug)]
pub enum SenderOutput {
    /// Write this on the control stream.
    Send(ControlMsg),
    /// Send these chunks, in order (the plan: all the receiver lacks).
    Enqueue(Vec<ChunkId>),
    /// Send this chunk again, ahead of the plan.
    Resend {
        file: u64,
        chunk: u64,
        reason: String,
    },
    /// Every chunk is out: re-stat the sources and answer [`SenderInput::SourceChecked`].
    CheckSource,
    /// The receiver's progress, for the compression decision (what to show is a
    /// [`SendEvent::Progress`]).
    Progress {
        verified_bytes: u64,
        wire_bytes: u64,
    },
    /// Worth showing the user.
    Event(SendEvent),
    /// The attempt is over.
    Finished(Result<Ending, Error>),
}

/// How an attempt ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The receiver verified everything (root hashes equal) and installed it at `path`, or
    /// kept it staged (`path` empty).
    Verified {
        root_hash: Hash,
        path: Vec<u8>,
        replaced: Option<Vec<u8>>,
    },
    /// A pre-copy's last attempt, with sources that vanished: the receiver keeps what it
    /// verified for the final pass.
    Partial,
}

/// Counters for the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SenderStats {
    pub resumed_bytes: u64,
    pub chunks_resumed: u64,
    pub chunks_sent: u64,
    pub chunks_retried: u64,
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    pub queued_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Manifest sent; waiting for `Have`*/`Accept`, in the receiver's line since `queued`.
    Handshake {
        queued: Option<Instant>,
    },
    /// Chunks going out: `outstanding` enqueued and not yet written (or vanished).
    Sending {
        outstanding: u64,
        checking: bool,
        done_sent: bool,
    },
    Finished,
}

/// The sender's protocol state for one attempt.
#[derive(Debug, Clone)]
pub struct SenderSession {
    cfg: SenderSessionConfig,
    state: State,
    manifest_hash: Hash,
    /// Per entry, the hash of each chunk once it was written (or reported by `Have`).
    hashes: Vec<Vec<Option<Hash>>>,
    /// Times the receiver asked for each chunk again.
    retries: std::collections::HashMap<ChunkId, u32>,
    vanished: Vec<String>,
    stats: SenderStats,
    /// Bytes done and this run's rate, reported as [`SendEvent::Progress`].
    progress: ProgressMeter,
}

impl SenderSession {
    pub fn new(manifest: &Manifest, cfg: SenderSessionConfig) -> Self {
        SenderSession {
            cfg,
            state: State::Handshake { queued: None },
            manifest_hash: manifest.manifest_hash,
            hashes: (0..manifest.entries.len())
                .map(|i| vec![None; manifest.chunk_count(i) as usize])
                .collect(),
            retries: Default::default(),
            vanished: Vec::new(),
            stats: SenderStats::default(),
            progress: ProgressMeter::new(manifest.total_bytes),
        }
    }

    /// The opening messages: `Hello`, every entry, `ManifestEnd`.
    pub fn start(&self, manifest: &Manifest) -> Vec<ControlMsg> {
        let mut msgs = Vec::with_capacity(manifest.entries.len() + 2);
        msgs.push(ControlMsg::Hello(self.hello(manifest)));
        msgs.extend(manifest.entries.iter().cloned().map(ControlMsg::Entry));
        msgs.push(ControlMsg::ManifestEnd {
            manifest_hash: manifest.manifest_hash,
        });
        msgs
    }

    /// [`SenderSession::start`]'s messages as the frames the driver writes, encoded from the
    /// manifest's entries without copying them (200k in a busy repository).
    pub fn start_frames(&self, manifest: &Manifest) -> Vec<u8> {
        let mut out = Vec::new();
        ControlMsg::Hello(self.hello(manifest)).encode_frame(&mut out);
        for e in &manifest.entries {
            crate::wire::encode_entry_frame(e, &mut out);
        }
        ControlMsg::ManifestEnd {
            manifest_hash: manifest.manifest_hash,
        }
        .encode_frame(&mut out);
        out
    }

    fn hello(&self, manifest: &Manifest) -> Hello {
        Hello {
            version: self.cfg.version,
            dest: self.cfg.dest.clone(),
            root_kind: manifest.root_kind,
            chunk_size: manifest.chunk_size,
            entry_count: manifest.entries.len() as u64,
            total_bytes: manifest.total_bytes,
            resume: self.cfg.resume,
            install: !self.cfg.stage_only,
            sender_info: self.cfg.sender_info.clone(),
            git: self.cfg.git,
            owner: self.cfg.owner.clone(),
            external_links: self.cfg.external_links.clone(),
            ticket: self.cfg.ticket.clone(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// When [`SenderInput::Timeout`] is due: the end of `wait_for` while in line.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshake {
                queued: Some(since),
            } => Some(since + self.cfg.wait_for),
            _ => None,
        }
    }

    /// The root hash over every chunk hash, once all are known.
    pub fn root_hash(&self) -> Option<Hash> {
        let mut root = RootHasher::new(&self.manifest_hash);
        for h in self.hashes.iter().flatten() {
            root.add_chunk(h.as_ref()?);
        }
        Some(root.finish())
    }

    /// Feeds one event; returns what to do, in order. After `Finished`, nothing.
    pub fn handle(&mut self, input: SenderInput, now: Instant) -> Vec<SenderOutput> {
        let mut out = Vec::new();
        if let Err(e) = self.step(input, now, &mut out) {
            self.finish(Err(e), &mut out);
        }
        out
    }

    fn finish(&mut self, result: Result<Ending, Error>, out: &mut Vec<SenderOutput>) {
        if self.state != State::Finished {
            self.state = State::Finished;
            out.push(SenderOutput::Finished(result));
        }
    }

    fn chunk_exists(&self, file: u64, chunk: u64) -> bool {
        usize::try_from(file)
            .ok()
            .and_then(|f| self.hashes.get(f))
            .is_some_and(|c| chunk < c.len() as u64)
    }

    fn step(
        &mut self,
        input: SenderInput,
        now: Instant,
        out: &mut Vec<SenderOutput>,
    ) -> Result<(), Error> {
        match (&self.state, input) {
            (State::Finished, _) => Ok(()),
            (_, SenderInput::ControlClosed) => Err(Error::Interrupted(
                "receiver closed the control stream".into(),
            )),
            (_, SenderInput::Control(ControlMsg::Fail { code, message })) => Err(match code {
                FailCode::Verification => Error::Verification(message),
                _ => Error::Refused { code, message },
            }),
            (State::Handshake { queued }, SenderInput::Timeout) => match queued {
                Some(since) if now >= *since + self.cfg.wait_for => Err(Error::Refused {
                    code: FailCode::Busy,
                    message: format!(
                        "the receiver is still at its transfer limit after {:.0} s in line; \
                         --wait-for waits longer",
                        now.saturating_duration_since(*since).as_secs_f64()
                    ),
                }),
                _ => Ok(()),
            },
            (State::Handshake { queued }, SenderInput::Control(msg)) => {
                let queued = *queued;
                self.handshake(queued, msg, now, out)
            }
            (State::Sending { .. }, SenderInput::Control(msg)) => self.sending(msg, now, out),
            (
                State::Sending { .. },
                SenderInput::ChunkWritten {
                    file,
                    chunk,
                    hash,
                    raw_len,
                    wire_len,
                },
            ) => {
                let slot = usize::try_from(file)
                    .ok()
                    .and_then(|f| self.hashes.get_mut(f))
                    .and_then(|c| c.get_mut(usize::try_from(chunk).ok()?))
                    .ok_or_else(|| {
                        Error::Other(format!("wrote chunk {chunk} of entry {file}, not ours"))
                    })?;
                *slot = Some(hash);
                self.stats.chunks_sent += 1;
                self.stats.sent_bytes += raw_len;
                self.stats.wire_bytes += wire_len;
                self.completed(out);
                Ok(())
            }
            (State::Sending { .. }, SenderInput::ChunkVanished { path, .. }) => {
                self.vanished.push(path);
                self.completed(out);
                Ok(())
            }
            (
                State::Sending {
                    checking: true,
                    outstanding,
                    ..
                },
                SenderInput::SourceChecked { changed },
            ) => {
                let outstanding = *outstanding;
                self.state = State::Sending {
                    outstanding,
                    checking: false,
                    done_sent: false,
                };
                // A chunk asked for again meanwhile is still out: once it is written, the
                // sources are checked again. A change ends the attempt at once.
                if outstanding == 0 || !changed.is_empty() {
                    self.conclude(changed, out);
                }
                Ok(())
            }
            (_, SenderInput::Timeout) => Ok(()),
            (state, input) => Err(Error::Other(format!(
                "internal: {input:?} does not fit the session's state {state:?}"
            ))),
        }
    }

    /// The receiver holds these chunks of `file` verified (`Have`, `Haves`).
    fn have(&mut self, file: u64, chunks: &[(u64, Hash)]) -> Result<(), Error> {
        for &(chunk, hash) in chunks {
            if !self.chunk_exists(file, chunk) {
                return Err(Error::Other(format!(
                    "receiver reported chunk {chunk} of entry {file}, which does not exist"
                )));
            }
            self.hashes[file as usize][chunk as usize] = Some(hash);
        }
        Ok(())
    }

    fn handshake(
        &mut self,
        queued: Option<Instant>,
        msg: ControlMsg,
        now: Instant,
        out: &mut Vec<SenderOutput>,
    ) -> Result<(), Error> {
        match msg {
            ControlMsg::Queued {
                position,
                active,
                limit,
            } => {
                if self.cfg.wait_for.is_zero() {
                    return Err(Error::Refused {
                        code: FailCode::Busy,
                        message: format!(
                            "receiver is running {active} transfers, its limit \
                             (--wait-for 0: not waiting in line)"
                        ),
                    });
                }
                let since = queued.unwrap_or(now);
                self.state = State::Handshake {
                    queued: Some(since),
                };
                out.push(SenderOutput::Event(SendEvent::Queued {
                    position,
                    active,
                    limit,
                    waited_seconds: now.saturating_duration_since(since).as_secs_f64(),
                }));
                Ok(())
            }
            ControlMsg::Have { file, chunks } => self.have(file, &chunks),
            ControlMsg::Haves { files } => files
                .iter()
                .try_for_each(|(file, chunks)| self.have(*file, chunks)),
            ControlMsg::Accept { verified_bytes } => {
                if let Some(since) = queued {
                    let waited_seconds = now.saturating_duration_since(since).as_secs_f64();
                    self.stats.queued_seconds += waited_seconds;
                    out.push(SenderOutput::Event(SendEvent::Admitted { waited_seconds }));
                }
                let mut plan = Vec::new();
                for (f, per_file) in self.hashes.iter().enumerate() {
                    for (c, h) in per_file.iter().enumerate() {
                        match h {
                            Some(_) => self.stats.chunks_resumed += 1,
                            None => plan.push((f as u64, c as u64)),
                        }
                    }
                }
                self.stats.resumed_bytes = verified_bytes;
                // The receiver's count of verified bytes, resumed ones included: done from
                // the first report on.
                let report = self.progress.accepted(verified_bytes, now);
                out.push(SenderOutput::Event(SendEvent::Progress(report)));
                self.state = State::Sending {
                    outstanding: plan.len() as u64,
                    checking: false,
                    done_sent: false,
                };
                if plan.is_empty() {
                    self.drained(out);
                } else {
                    out.push(SenderOutput::Enqueue(plan));
                }
                Ok(())
            }
            other => Err(Error::Other(format!(
                "unexpected answer from the receiver: {}",
                other.brief()
            ))),
        }
    }

    fn sending(
        &mut self,
        msg: ControlMsg,
        now: Instant,
        out: &mut Vec<SenderOutput>,
    ) -> Result<(), Error> {
        let State::Sending {
            outstanding,
            checking,
            done_sent,
        } = self.state
        else {
            return Ok(());
        };
        match msg {
            ControlMsg::Progress {
                verified_bytes,
                wire_bytes,
                ..
            } => {
                out.push(SenderOutput::Progress {
                    verified_bytes,
                    wire_bytes,
                });
                let report = self.progress.verified(verified_bytes, now);
                out.push(SenderOutput::Event(SendEvent::Progress(report)));
                Ok(())
            }
            ControlMsg::Retry {
                file,
                chunk,
                reason,
            } => {
                if !self.chunk_exists(file, chunk) {
                    return Err(Error::Other(format!(
                        "receiver asked again for chunk {chunk} of entry {file}, which does not exist"
                    )));
                }
                let asked = self.retries.entry((file, chunk)).or_insert(0);
                *asked += 1;
                if *asked > MAX_CHUNK_ATTEMPTS {
                    return Err(Error::Verification(format!(
                        "the receiver asked for chunk {chunk} of entry {file} {asked} times"
                    )));
                }
                self.stats.chunks_retried += 1;
                // Its hash is the one of the copy that will arrive next.
                self.hashes[file as usize][chunk as usize] = None;
                self.state = State::Sending {
                    outstanding: outstanding + 1,
                    checking,
                    done_sent: false,
                };
                out.push(SenderOutput::Resend {
                    file,
                    chunk,
                    reason,
                });
                Ok(())
            }
            ControlMsg::Installed {
                root_hash,
                path,
                replaced,
            } if done_sent && !self.cfg.stage_only => {
                self.verified(root_hash, path, replaced, now, out)
            }
            ControlMsg::Staged { root_hash } if done_sent && self.cfg.stage_only => {
                self.verified(root_hash, Vec::new(), None, now, out)
            }
            other => Err(Error::Other(format!(
                "unexpected message from the receiver: {}",
                other.brief()
            ))),
        }
    }

    /// The receiver verified everything: our root hash must be its.
    fn verified(
        &mut self,
        theirs: Hash,
        path: Vec<u8>,
        replaced: Option<Vec<u8>>,
        now: Instant,
        out: &mut Vec<SenderOutput>,
    ) -> Result<(), Error> {
        let ours = self.root_hash().ok_or_else(|| {
            Error::Other("the receiver answered before every chunk was sent".into())
        })?;
        if ours != theirs {
            return Err(Error::Verification(format!(
                "receiver installed root hash {} but ours is {}",
                hex(&theirs),
                hex(&ours)
            )));
        }
        let report = self.progress.complete(now);
        out.push(SenderOutput::Event(SendEvent::Progress(report)));
        self.finish(
            Ok(Ending::Verified {
                root_hash: ours,
                path,
                replaced,
            }),
            out,
        );
        Ok(())
    }

    /// One enqueued chunk is done with (written or vanished).
    fn completed(&mut self, out: &mut Vec<SenderOutput>) {
        if let State::Sending { outstanding, .. } = &mut self.state {
            *outstanding = outstanding.saturating_sub(1);
            if *outstanding == 0 {
                self.drained(out);
            }
        }
    }

    /// Every enqueued chunk is done with.
    fn drained(&mut self, out: &mut Vec<SenderOutput>) {
        let State::Sending {
            outstanding,
            checking,
            done_sent,
        } = self.state
        else {
            return;
        };
        if checking || done_sent || outstanding > 0 {
            return;
        }
        if self.cfg.stage_only {
            // A pre-copy of a live tree may see files change: the final pass re-sends them.
            self.conclude(Vec::new(), out);
        } else {
            self.state = State::Sending {
                outstanding,
                checking: true,
                done_sent,
            };
            out.push(SenderOutput::CheckSource);
        }
    }

    /// Sources checked (or not, for a pre-copy): `Done`, or abandon the attempt.
    fn conclude(&mut self, changed: Vec<String>, out: &mut Vec<SenderOutput>) {
        let mut paths = std::mem::take(&mut self.vanished);
        paths.extend(changed);
        if paths.is_empty() {
            match self.root_hash() {
                Some(root_hash) => {
                    if let State::Sending { done_sent, .. } = &mut self.state {
                        *done_sent = true;
                    }
                    out.push(SenderOutput::Send(ControlMsg::Done { root_hash }));
                }
                None => self.finish(Err(Error::Other("a chunk has no hash at Done".into())), out),
            }
            return;
        }
        paths.sort();
        paths.dedup();
        let message = format!("{} changed during the send", paths.join(", "));
        // The receiver keeps what it verified for the next attempt (`--resume`).
        out.push(SenderOutput::Send(ControlMsg::Fail {
            code: FailCode::Aborted,
            message: message.clone(),
        }));
        if self.cfg.stage_only && self.cfg.last_attempt {
            self.finish(Ok(Ending::Partial), out);
        } else {
            self.finish(Err(Error::SourceChanged(message)), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PROTOCOL_VERSION;
    use crate::wire::{Entry, EntryKind, RootKind};
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        let e = |path: &str, kind, size| Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime_sec: 1,
            mtime_nsec: 0,
            size,
            link_target: vec![],
            ino: 1,
            ctime_sec: 1,
            ctime_nsec: 0,
            attrs: None,
        };
        Manifest::from_scan(
            RootKind::Dir,
            1 << 16,
            vec![
                e("", EntryKind::Dir, 0),
                e("a", EntryKind::File, (1 << 16) + 5),
                e("b", EntryKind::File, 3),
            ],
        )
    }

    fn cfg(stage_only: bool) -> SenderSessionConfig {
        SenderSessionConfig {
            dest: b"r.git".to_vec(),
            resume: true,
            stage_only,
            last_attempt: false,
            wait_for: Duration::from_secs(10),
            sender_info: "test".into(),
            git: false,
            owner: OwnerPolicy::Receiver,
            external_links: Vec::new(),
            ticket: Vec::new(),
            version: PROTOCOL_VERSION,
        }
    }

    fn hash_of(file: u64, chunk: u64) -> Hash {
        *blake3::hash(&[file as u8, chunk as u8]).as_bytes()
    }

    fn written(file: u64, chunk: u64) -> SenderInput {
        SenderInput::ChunkWritten {
            file,
            chunk,
            hash: hash_of(file, chunk),
            raw_len: 10,
            wire_len: 20,
        }
    }

    fn root_of(m: &Manifest) -> Hash {
        let mut r = RootHasher::new(&m.manifest_hash);
        for (f, c) in [(1, 0), (1, 1), (2, 0)] {
            r.add_chunk(&hash_of(f, c));
        }
        r.finish()
    }

    #[test]
    fn an_installing_pass_checks_its_source_then_sends_done_and_accepts_the_install() {
        let m = manifest();
        let mut s = SenderSession::new(&m, cfg(false));
        let t0 = Instant::now();
        let start = s.start(&m);
        assert!(
            matches!(&start[0], ControlMsg::Hello(h) if h.install && h.resume && h.version == PROTOCOL_VERSION)
        );
        assert_eq!(start.len(), 5);
        // What the driver writes is these messages' frames.
        let mut frames = Vec::new();
        for msg in &start {
            msg.encode_frame(&mut frames);
        }
        assert_eq!(s.start_frames(&m), frames);
        // The receiver holds chunk 0 of "a" from an earlier attempt.
        let have = ControlMsg::Have {
            file: 1,
            chunks: vec![(0, hash_of(1, 0))],
        };
        assert!(s.handle(SenderInput::Control(have), t0).is_empty());
        let out = s.handle(
            SenderInput::Control(ControlMsg::Accept {
                verified_bytes: 1 << 16,
            }),
            t0,
        );
        // The first progress report already counts the resumed chunk as done.
        assert!(
            matches!(&out[..], [SenderOutput::Event(SendEvent::Progress(r)), SenderOutput::Enqueue(p)]
                if p == &[(1, 1), (2, 0)] && r.done_bytes == 1 << 16 && r.resumed_bytes == 1 << 16
                    && r.total_bytes == (1 << 16) + 8),
            "{out:?}"
        );
        assert!(s.handle(written(2, 0), t0).is_empty());
        let out = s.handle(written(1, 1), t0);
        assert!(matches!(&out[..], [SenderOutput::CheckSource]), "{out:?}");
        let out = s.handle(SenderInput::SourceChecked { changed: vec![] }, t0);
        let root = root_of(&m);
        assert!(
            matches!(&out[..], [SenderOutput::Send(ControlMsg::Done { root_hash })] if *root_hash == root),
            "{out:?}"
        );
        let out = s.handle(
            SenderInput::Control(ControlMsg::Installed {
                root_hash: root,
                path: b"/r/r.git".to_vec(),
                replaced: None,
            }),
            t0,
        );
        assert!(matches!(
            &out[..],
            [SenderOutput::Event(SendEvent::Progress(r)), SenderOutput::Finished(Ok(Ending::Verified { .. }))]
                if r.done_bytes == r.total_bytes
        ));
        assert!(s.is_finished());
        assert_eq!(s.stats().chunks_resumed, 1);
        assert_eq!(s.stats().chunks_sent, 2);
    }

    #[test]
    fn a_retried_chunk_is_resent_and_done_follows_again() {
        let m = manifest();
        let mut s = SenderSession::new(&m, cfg(true));
        let t0 = Instant::now();
        s.handle(
            SenderInput::Control(ControlMsg::Accept { verified_bytes: 0 }),
            t0,
        );
        s.handle(written(1, 0), t0);
        s.handle(written(1, 1), t0);
        let out = s.handle(written(2, 0), t0);
        assert!(matches!(
            &out[..],
            [SenderOutput::Send(ControlMsg::Done { .. })]
        ));
        let retry = |s: &mut SenderSession| {
            s.handle(
                SenderInput::Control(ControlMsg::Retry {
                    file: 1,
                    chunk: 0,
                    reason: "hash".into(),
                }),
                t0,
            )
        };
        assert!(matches!(
            &retry(&mut s)[..],
            [SenderOutput::Resend {
                file: 1,
                chunk: 0,
                ..
            }]
        ));
        // Staged before the resent copy went out: not yet.
        let early = s.handle(
            SenderInput::Control(ControlMsg::Staged {
                root_hash: root_of(&m),
            }),
            t0,
        );
        assert!(
            matches!(&early[..], [SenderOutput::Finished(Err(_))]),
            "{early:?}"
        );
    }

    #[test]
    fn in_line_until_the_deadline_or_not_at_all() {
        let m = manifest();
        let t0 = Instant::now();
        let queued = SenderInput::Control(ControlMsg::Queued {
            position: 3,
            active: 32,
            limit: 32,
        });
        let mut s = SenderSession::new(&m, cfg(false));
        assert!(matches!(
            &s.handle(queued.clone(), t0)[..],
            [SenderOutput::Event(SendEvent::Queued { position: 3, .. })]
        ));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert!(s
            .handle(SenderInput::Timeout, t0 + Duration::from_secs(9))
            .is_empty());
        let out = s.handle(SenderInput::Timeout, t0 + Duration::from_secs(10));
        assert!(
            matches!(&out[..], [SenderOutput::Finished(Err(Error::Refused { code: FailCode::Busy, message }))] if message.contains("--wait-for")),
            "{out:?}"
        );

        let mut c = cfg(false);
        c.wait_for = Duration::ZERO;
        let mut s = SenderSession::new(&m, c);
        assert!(matches!(
            &s.handle(queued.clone(), t0)[..],
            [SenderOutput::Finished(Err(Error::Refused { .. }))]
        ));

        let mut s = SenderSession::new(&m, cfg(false));
        s.handle(queued, t0);
        let out = s.handle(
            SenderInput::Control(ControlMsg::Accept { verified_bytes: 0 }),
            t0 + Duration::from_secs(4),
        );
        assert!(
            matches!(&out[0], SenderOutput::Event(SendEvent::Admitted { waited_seconds }) if *waited_seconds == 4.0),
            "{out:?}"
        );
        assert_eq!(s.stats().queued_seconds, 4.0);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn vanished_sources_abort_the_attempt_or_end_the_last_precopy_partial() {
        let m = manifest();
        let t0 = Instant::now();
        for (stage_only, last) in [(false, false), (true, false), (true, true), (false, true)] {
            let mut c = cfg(stage_only);
            c.last_attempt = last;
            let mut s = SenderSession::new(&m, c);
            s.handle(
                SenderInput::Control(ControlMsg::Accept { verified_bytes: 0 }),
                t0,
            );
            s.handle(written(1, 0), t0);
            s.handle(
                SenderInput::ChunkVanished {
                    file: 1,
                    chunk: 1,
                    path: "/src/a".into(),
                },
                t0,
            );
            let mut out = s.handle(written(2, 0), t0);
            if !stage_only {
                assert!(matches!(&out[..], [SenderOutput::CheckSource]), "{out:?}");
                out = s.handle(
                    SenderInput::SourceChecked {
                        changed: vec!["/src/b".into()],
                    },
                    t0,
                );
            }
            assert!(
                matches!(&out[0], SenderOutput::Send(ControlMsg::Fail { code: FailCode::Aborted, message }) if message.contains("/src/a")),
                "{out:?}"
            );
            match &out[1] {
                SenderOutput::Finished(Ok(Ending::Partial)) => assert!(stage_only && last),
                SenderOutput::Finished(Err(Error::SourceChanged(m))) => {
                    assert!(!(stage_only && last));
                    assert!(m.contains("/src/a"));
                    assert_eq!(m.contains("/src/b"), !stage_only);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// What a hostile receiver may send.
    fn arb_control() -> impl Strategy<Value = ControlMsg> {
        let hash = any::<[u8; 32]>();
        prop_oneof![
            (0u64..4, proptest::collection::vec((0u64..3, hash), 0..3))
                .prop_map(|(file, chunks)| ControlMsg::Have { file, chunks }),
            proptest::collection::vec(
                (0u64..5, proptest::collection::vec((0u64..4, hash), 0..3)),
                0..3
            )
            .prop_map(|files| ControlMsg::Haves { files }),
            any::<u64>().prop_map(|v| ControlMsg::Accept { verified_bytes: v }),
            (0u64..5, 0u64..40, 0u64..40).prop_map(|(position, active, limit)| {
                ControlMsg::Queued {
                    position,
                    active,
                    limit,
                }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| {
                ControlMsg::Progress {
                    verified_chunks: a,
                    verified_bytes: b,
                    wire_bytes: c,
                }
            }),
            (0u64..4, 0u64..3).prop_map(|(file, chunk)| ControlMsg::Retry {
                file,
                chunk,
                reason: "r".into()
            }),
            hash.prop_map(|h| ControlMsg::Staged { root_hash: h }),
            hash.prop_map(|h| ControlMsg::Installed {
                root_hash: h,
                path: b"/x".to_vec(),
                replaced: None
            }),
            Just(ControlMsg::Done { root_hash: [0; 32] }),
            (1u8..=6).prop_map(|c| ControlMsg::Fail {
                code: match c {
                    1 => FailCode::BadRequest,
                    2 => FailCode::Busy,
                    3 => FailCode::NoSpace,
                    4 => FailCode::Verification,
                    5 => FailCode::Io,
                    _ => FailCode::Aborted,
                },
                message: "no".into()
            }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Receiver(ControlMsg),
        /// The driver writes the next queued chunk (the honest side of the pair).
        WriteOne,
        Vanish,
        Wait(u64),
        /// The receiver answers as an honest one would (`Staged`/`Installed` with our root).
        HonestVerdict,
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => arb_control().prop_map(Step::Receiver),
            4 => Just(Step::WriteOne),
            1 => Just(Step::Vanish),
            1 => (0u64..20).prop_map(Step::Wait),
            1 => Just(Step::HonestVerdict),
        ]
    }

    proptest! {
        /// Against any receiver: no panic; chunks enqueued or resent exist; an `Ok` ending
        /// means the receiver's root hash was ours and every chunk was written; once the
        /// receiver closes the stream the session is finished; nothing follows `Finished`.
        #[test]
        fn a_hostile_receiver_ends_in_an_error_or_a_verified_success(
            stage_only in any::<bool>(),
            last in any::<bool>(),
            steps in proptest::collection::vec(arb_step(), 0..60),
        ) {
            let m = manifest();
            let mut c = cfg(stage_only);
            c.last_attempt = last;
            let mut s = SenderSession::new(&m, c);
            let t0 = Instant::now();
            let mut now = t0;
            let mut queue: std::collections::VecDeque<ChunkId> = Default::default();
            let mut finished = None;
            let mut check_pending = false;
            let run = |s: &mut SenderSession, input: SenderInput, now: Instant,
                           queue: &mut std::collections::VecDeque<ChunkId>,
                           check_pending: &mut bool,
                           finished: &mut Option<Result<Ending, Error>>| -> Result<(), TestCaseError> {
                let was_finished = s.is_finished();
                for o in s.handle(input, now) {
                    prop_assert!(!was_finished, "output after Finished: {:?}", o);
                    match o {
                        SenderOutput::Enqueue(plan) => {
                            for (f, c) in &plan {
                                prop_assert!(s.chunk_exists(*f, *c));
                            }
                            queue.extend(plan);
                        }
                        SenderOutput::Resend { file, chunk, .. } => {
                            prop_assert!(s.chunk_exists(file, chunk));
                            queue.push_front((file, chunk));
                        }
                        SenderOutput::CheckSource => *check_pending = true,
                        SenderOutput::Finished(r) => {
                            prop_assert!(finished.is_none());
                            *finished = Some(r);
                        }
                        _ => {}
                    }
                }
                Ok(())
            };
            for step in steps {
                let input = match step {
                    Step::Receiver(msg) => SenderInput::Control(msg),
                    Step::WriteOne => match queue.pop_front() {
                        Some((f, c)) => written(f, c),
                        None => continue,
                    },
                    Step::Vanish => match queue.pop_front() {
                        Some((file, chunk)) => SenderInput::ChunkVanished { file, chunk, path: "p".into() },
                        None => continue,
                    },
                    Step::Wait(secs) => {
                        now += Duration::from_secs(secs);
                        SenderInput::Timeout
                    }
                    Step::HonestVerdict => SenderInput::Control(if stage_only {
                        ControlMsg::Staged { root_hash: root_of(&m) }
                    } else {
                        ControlMsg::Installed { root_hash: root_of(&m), path: b"/r".to_vec(), replaced: None }
                    }),
                };
                run(&mut s, input, now, &mut queue, &mut check_pending, &mut finished)?;
                // An installing pass's source check is answered at once: nothing changed.
                if std::mem::take(&mut check_pending) {
                    let answer = SenderInput::SourceChecked { changed: vec![] };
                    run(&mut s, answer, now, &mut queue, &mut check_pending, &mut finished)?;
                }
            }
            run(&mut s, SenderInput::ControlClosed, now, &mut queue, &mut check_pending, &mut finished)?;
            prop_assert!(s.is_finished());
            match finished {
                Some(Ok(Ending::Verified { root_hash, .. })) => {
                    prop_assert_eq!(Some(root_hash), s.root_hash());
                    prop_assert_eq!(root_hash, root_of(&m));
                }
                Some(Ok(Ending::Partial)) => prop_assert!(stage_only && last),
                Some(Err(_)) => {}
                None => prop_assert!(false, "never finished"),
            }
        }
    }
}
