//! Fuzz harnesses (issue 10 item 5), compiled only with the `fuzzing` feature.
//!
//! Each harness takes the fuzzer's raw bytes, drives one sans-io part of the receiver with
//! them and panics when an invariant breaks. They live in the library, not in the fuzz
//! crate, so that two callers share them:
//! - `transfer/fuzz` (cargo fuzz, nightly, libFuzzer): one target per function, see
//!   `scripts/fuzz.sh`;
//! - the stable test `tests/fuzz_corpus.rs`, which replays every committed corpus file
//!   through the same functions: that is how CI keeps the corpus passing without nightly.
//!
//! Structured inputs are decoded with `arbitrary` from the same bytes, so a corpus file is
//! just bytes for both callers. Paths, names and sizes are drawn mostly from small
//! vocabularies (parents, duplicates, `..`, the staging name, chunk boundaries) so that the
//! fuzzer reaches the deep rules instead of dying on the first check.
//!
//! The harnesses:
//! - [`wire_control`]: [`ControlMsg::decode_body`] and [`control_frame_len`]; the encoding
//!   is canonical: what decodes re-encodes to the same bytes (a newer sender's `Hello` to a
//!   prefix of them) and decodes equal;
//! - [`wire_chunk_header`]: [`ChunkHeader::decode`]; what decodes re-encodes to the same bytes;
//! - [`manifest_builder`]: [`ManifestBuilder`] with arbitrary `Hello`s and entry sequences;
//!   a manifest it returns obeys every rule of [`crate::manifest`] (checked again here,
//!   independently) and equals the one a sender computes from the same entries;
//! - [`chunk_tracker`]: header checks, verifications and mismatches against a manifest,
//!   compared with a model: never panics, verified bytes never exceed the total, complete
//!   only when every chunk is verified, the root hash only then and in manifest order;
//! - [`recv_session`]: the hostile peer. Arbitrary sequences of control messages (also as
//!   arbitrary bytes through the decoder), chunk frames (also as bytes), ticks and driver
//!   events, around an honest transfer the fuzzer can replay step by step. A model driver
//!   answers the session's outputs without disk I/O (claim, staging prepared or not, chunk
//!   stored, corrupt or failed, install ok or not). Invariants: never panics; finishes
//!   exactly once and says nothing after; stores only chunks whose header fits the manifest;
//!   asks for `Install` (or answers `Staged`) only when every chunk was verified and the
//!   root over the verified hashes equals the sender's; every message it sends fits a control
//!   frame; its counters agree with the model; its output per input stays bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};

use crate::manifest::{
    chunk_count, chunk_len, external_link_allowed, symlink_stays_inside, Manifest, ManifestBuilder,
    MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES, MIN_CHUNK_SIZE, STAGING_DIR_NAME,
};
use crate::recv::session::{Outcome, ReceiverInput, ReceiverOutput, ReceiverSession};
use crate::tracker::{ChunkState, ChunkTracker, Mismatch, MAX_CHUNK_ATTEMPTS};
use crate::wire::{
    control_frame_len, Attrs, ChunkHeader, Codec, ControlMsg, Entry, EntryKind, FailCode, Hash,
    Hello, ManifestHasher, OwnerPolicy, RootHasher, RootKind, WireError, MAX_CONTROL_FRAME,
    MAX_HAVE_PER_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Most chunks the model driver's "disk" takes: a bigger manifest is refused as a real
/// receiver refuses one larger than its free space (`PrepareFailed { NoSpace }`), before a
/// tracker is built. This is what bounds the tracker's memory in the real receiver too.
pub const MODEL_DISK_CHUNKS: u64 = 4096;

// ---------------------------------------------------------------------------------------
// wire

/// Decodes `data` as a control frame body, and its first 4 bytes as a length prefix.
pub fn wire_control(data: &[u8]) {
    if let Some(prefix) = data.first_chunk::<4>() {
        match control_frame_len(*prefix) {
            Ok(len) => assert!(len >= 1 && len as u64 <= u64::from(MAX_CONTROL_FRAME)),
            Err(e) => assert!(
                matches!(e, WireError::EmptyFrame | WireError::FrameTooLarge(_)),
                "length prefix: {e:?}"
            ),
        }
    }
    let Ok(msg) = ControlMsg::decode_body(data) else {
        return;
    };
    let mut body = Vec::new();
    msg.encode_body(&mut body);
    let newer_hello = matches!(&msg, ControlMsg::Hello(h) if h.version > PROTOCOL_VERSION);
    if newer_hello {
        // A newer sender's fields are left unread: what we re-encode is a prefix.
        assert!(
            data.starts_with(&body),
            "newer Hello re-encodes to a prefix"
        );
    } else {
        assert_eq!(body, data, "decoding then encoding gives the same bytes");
    }
    assert_eq!(ControlMsg::decode_body(&body).as_ref(), Ok(&msg));
    let mut frame = Vec::new();
    msg.encode_frame(&mut frame);
    let prefix = frame
        .first_chunk::<4>()
        .expect("a frame has a length prefix");
    assert_eq!(control_frame_len(*prefix), Ok(body.len()));
    assert!(msg.brief().chars().count() <= 203);
}

/// Decodes the first [`ChunkHeader::LEN`] bytes of `data` (zero-padded) as a chunk header.
pub fn wire_chunk_header(data: &[u8]) {
    let mut buf = [0u8; ChunkHeader::LEN];
    let n = data.len().min(ChunkHeader::LEN);
    buf[..n].copy_from_slice(&data[..n]);
    match ChunkHeader::decode(&buf) {
        Ok(h) => assert_eq!(
            h.encode(),
            buf,
            "decoding then encoding gives the same bytes"
        ),
        Err(e) => assert!(
            matches!(
                e,
                WireError::BadMagic(_) | WireError::InvalidValue { field: "codec", .. }
            ),
            "chunk header: {e:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// structured pieces shared by the manifest, tracker and session harnesses

const LONG_NAME: &[u8] = &[b'n'; 256];
/// Path components: ordinary names, the forbidden ones, the staging name, an over-long one.
const NAMES: [&[u8]; 12] = [
    b"a",
    b"b",
    b"d",
    b"objects",
    b"HEAD",
    b"..",
    b".",
    b"",
    STAGING_DIR_NAME.as_bytes(),
    b"x\0y",
    LONG_NAME,
    b"srv",
];
const XATTR_NAMES: [&[u8]; 8] = [
    b"user.a",
    b"user.b",
    b"security.selinux",
    b"system.posix_acl_access",
    b"trusted.x",
    b"user.",
    b"bogus.x",
    b"",
];

/// A path: components from [`NAMES`] joined by `/` (relative or absolute), or raw bytes.
#[derive(Arbitrary, Debug, Clone)]
pub enum FuzzPath {
    Names(Vec<u8>),
    Absolute(Vec<u8>),
    Raw(Vec<u8>),
}

impl FuzzPath {
    fn build(&self) -> Vec<u8> {
        let join = |ix: &[u8]| {
            ix.iter()
                .map(|i| NAMES[usize::from(*i) % NAMES.len()])
                .collect::<Vec<_>>()
                .join(&b'/')
        };
        match self {
            FuzzPath::Names(ix) => join(ix),
            FuzzPath::Absolute(ix) => [b"/".as_slice(), &join(ix)].concat(),
            FuzzPath::Raw(b) => b.clone(),
        }
    }
}

/// A size: mostly around chunk boundaries of [`MIN_CHUNK_SIZE`].
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzSize {
    Zero,
    Small(u16),
    /// `chunks % 5` whole chunks plus a remainder.
    Chunks(u8, u16),
    Raw(u64),
}

impl FuzzSize {
    fn build(self) -> u64 {
        match self {
            FuzzSize::Zero => 0,
            FuzzSize::Small(n) => u64::from(n),
            FuzzSize::Chunks(c, r) => u64::from(c % 5) * MIN_CHUNK_SIZE + u64::from(r),
            FuzzSize::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct FuzzXattr {
    name: u8,
    raw_name: Option<Vec<u8>>,
    value: Vec<u8>,
    /// A value one byte over Linux's limit.
    oversized: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct FuzzAttrs {
    uid: u32,
    gid: u32,
    xattrs: Vec<FuzzXattr>,
}

impl FuzzAttrs {
    fn build(&self) -> Attrs {
        Attrs {
            uid: self.uid,
            gid: self.gid,
            xattrs: self
                .xattrs
                .iter()
                .map(|x| {
                    let name = x.raw_name.clone().unwrap_or_else(|| {
                        XATTR_NAMES[usize::from(x.name) % XATTR_NAMES.len()].to_vec()
                    });
                    let value = if x.oversized {
                        vec![0; crate::manifest::MAX_XATTR_VALUE + 1]
                    } else {
                        x.value.clone()
                    };
                    (name, value)
                })
                .collect(),
        }
    }
}

/// One manifest entry as the fuzzer shapes it.
#[derive(Arbitrary, Debug, Clone)]
pub struct FuzzEntry {
    path: FuzzPath,
    kind: u8,
    mode: u32,
    size: FuzzSize,
    link: FuzzPath,
    ino: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
    attrs: Option<FuzzAttrs>,
}

const KINDS: [EntryKind; 4] = [
    EntryKind::File,
    EntryKind::Dir,
    EntryKind::Symlink,
    EntryKind::Hardlink,
];

impl FuzzEntry {
    fn build(&self) -> Entry {
        Entry {
            path: self.path.build(),
            kind: KINDS[usize::from(self.kind) % KINDS.len()],
            mode: self.mode,
            mtime_sec: self.mtime.0,
            mtime_nsec: self.mtime.1,
            size: self.size.build(),
            link_target: self.link.build(),
            ino: self.ino,
            ctime_sec: self.ctime.0,
            ctime_nsec: self.ctime.1,
            attrs: self.attrs.as_ref().map(FuzzAttrs::build),
        }
    }
}

/// A count relative to what is actually sent.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzCount {
    Exact,
    Plus(u8),
    Minus(u8),
    Raw(u64),
}

impl FuzzCount {
    fn build(self, exact: u64) -> u64 {
        match self {
            FuzzCount::Exact => exact,
            FuzzCount::Plus(n) => exact.saturating_add(u64::from(n)),
            FuzzCount::Minus(n) => exact.saturating_sub(u64::from(n)),
            FuzzCount::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct FuzzHello {
    /// `Ok`: `% 8` gives 0..=7 (0, 6 and 7 are refused); `Err`: a raw version.
    version: Result<u8, u16>,
    dest: Option<FuzzPath>,
    file_root: bool,
    chunk_size: Result<u8, u64>,
    entry_count: FuzzCount,
    total_bytes: FuzzCount,
    resume: bool,
    install: bool,
    git: bool,
    external_links: Vec<FuzzPath>,
}

impl FuzzHello {
    /// The `Hello` for `entries`: counts relative to them; `dest` `r.git` unless given.
    fn build(&self, entries: &[Entry]) -> Hello {
        let bytes = entries
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.size));
        Hello {
            version: match self.version {
                Ok(v) => u16::from(v % 8),
                Err(v) => v,
            },
            dest: self
                .dest
                .as_ref()
                .map_or_else(|| b"r.git".to_vec(), FuzzPath::build),
            root_kind: if self.file_root {
                RootKind::File
            } else {
                RootKind::Dir
            },
            chunk_size: match self.chunk_size {
                Ok(c) => [MIN_CHUNK_SIZE, 1 << 20, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE - 1]
                    [usize::from(c % 4)],
                Err(c) => c,
            },
            entry_count: self.entry_count.build(entries.len() as u64),
            total_bytes: self.total_bytes.build(bytes),
            resume: self.resume,
            install: self.install,
            sender_info: "fuzz".into(),
            git: self.git,
            owner: OwnerPolicy::Receiver,
            external_links: self.external_links.iter().map(FuzzPath::build).collect(),
            ticket: Vec::new(),
        }
    }
}

/// A hash: the right one for the context, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzHash {
    Right,
    Other,
    Raw([u8; 32]),
}

impl FuzzHash {
    fn pick(self, right: Hash, other: Hash) -> Hash {
        match self {
            FuzzHash::Right => right,
            FuzzHash::Other => other,
            FuzzHash::Raw(h) => h,
        }
    }
}

// ---------------------------------------------------------------------------------------
// manifest

#[derive(Arbitrary, Debug)]
pub struct ManifestCase {
    hello: FuzzHello,
    entries: Vec<FuzzEntry>,
    end: FuzzHash,
}

/// Builds a manifest from an arbitrary `Hello` and entries; checks whatever it accepts.
pub fn manifest_builder(data: &[u8]) {
    let Ok(case) = ManifestCase::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let entries: Vec<Entry> = case.entries.iter().map(FuzzEntry::build).collect();
    let hello = case.hello.build(&entries);
    let Ok(mut builder) = ManifestBuilder::new(&hello) else {
        return;
    };
    assert!((MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version));
    assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&hello.chunk_size));
    assert!(hello.entry_count <= MAX_MANIFEST_ENTRIES);
    assert!(check_relative(&hello.dest).is_ok());
    // The builder is pushed on after a refusal too (the session stops at the first one, but
    // a refused entry must leave no trace either way).
    let mut accepted = Vec::new();
    for e in entries {
        if builder.push(e.clone()).is_ok() {
            accepted.push(e);
        }
        assert_eq!(builder.len(), accepted.len() as u64);
        assert!(builder.len() <= hello.entry_count);
        assert!(builder.held_bytes() <= MAX_MANIFEST_BYTES);
        assert_eq!(builder.remaining(), hello.entry_count - builder.len());
    }
    let expected = Manifest::from_scan(hello.root_kind, hello.chunk_size, accepted);
    let sent_hash = case.end.pick(expected.manifest_hash, [0; 32]);
    if let Ok(m) = builder.finish(&sent_hash) {
        assert_eq!(m, expected, "the receiver's manifest is the sender's");
        assert_eq!(m.manifest_hash, sent_hash);
        check_manifest_rules(&hello, &m);
    }
}

/// A relative path of normal components (the rule, restated independently).
fn check_relative(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > 4096 || path[0] == b'/' || path.contains(&0) {
        return Err("empty, long, absolute or NUL");
    }
    if path
        .split(|b| *b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b".." || c.len() > 255)
    {
        return Err("bad component");
    }
    Ok(())
}

/// Every rule a validated manifest obeys, checked from scratch.
fn check_manifest_rules(hello: &Hello, m: &Manifest) {
    assert_eq!(m.entries.len() as u64, hello.entry_count);
    assert_eq!(
        m.entries.iter().map(|e| e.size).sum::<u64>(),
        hello.total_bytes
    );
    assert_eq!(m.total_bytes, hello.total_bytes);
    if hello.root_kind == RootKind::File {
        assert_eq!(m.entries.len(), 1);
        assert!(m.entries[0].path.is_empty() && m.entries[0].kind == EntryKind::File);
    }
    let mut seen: HashMap<&[u8], EntryKind> = HashMap::new();
    for (i, e) in m.entries.iter().enumerate() {
        if hello.root_kind == RootKind::Dir {
            if i == 0 {
                assert!(e.path.is_empty() && e.kind == EntryKind::Dir, "root entry");
            } else {
                assert!(check_relative(&e.path).is_ok(), "path {:?}", e.path);
                if let Some(pos) = e.path.iter().rposition(|b| *b == b'/') {
                    assert_eq!(seen.get(&e.path[..pos]), Some(&EntryKind::Dir), "parent");
                }
                assert!(!seen.contains_key(e.path.as_slice()), "duplicate");
            }
        }
        if e.kind != EntryKind::File {
            assert_eq!(e.size, 0);
        }
        match e.kind {
            EntryKind::Symlink => assert!(
                symlink_stays_inside(&e.path, &e.link_target)
                    || external_link_allowed(&e.link_target, &hello.external_links)
            ),
            EntryKind::Hardlink => assert_eq!(
                seen.get(e.link_target.as_slice()),
                Some(&EntryKind::File),
                "hardlink to an earlier file"
            ),
            _ => {}
        }
        if let Some(a) = &e.attrs {
            for (j, (name, value)) in a.xattrs.iter().enumerate() {
                let known = [b"user.".as_slice(), b"trusted.", b"security.", b"system."]
                    .iter()
                    .any(|ns| name.starts_with(ns) && name.len() > ns.len());
                assert!(known && name.len() <= 255 && !name.contains(&0));
                assert!(value.len() <= crate::manifest::MAX_XATTR_VALUE);
                assert!(j == 0 || a.xattrs[j - 1].0 < *name, "sorted, unique");
            }
        }
        seen.insert(&e.path, e.kind);
    }
    let mut hasher = ManifestHasher::new();
    m.entries.iter().for_each(|e| hasher.add(e));
    assert_eq!(hasher.finish(), m.manifest_hash);
}

// ---------------------------------------------------------------------------------------
// tracker

/// An index: mostly small, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzIndex {
    Small(u8),
    Raw(u64),
}

impl FuzzIndex {
    fn build(self) -> u64 {
        match self {
            FuzzIndex::Small(i) => u64::from(i % 8),
            FuzzIndex::Raw(i) => i,
        }
    }
}

/// A length: the one the manifest implies, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzLen {
    Right,
    Off(i8),
    Raw(u64),
}

impl FuzzLen {
    fn build(self, right: u64) -> u64 {
        match self {
            FuzzLen::Right => right,
            FuzzLen::Off(d) => right.wrapping_add_signed(i64::from(d)),
            FuzzLen::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct FuzzHeader {
    file: FuzzIndex,
    chunk: FuzzIndex,
    offset: FuzzLen,
    raw_len: FuzzLen,
    codec: u8,
    payload_len: FuzzLen,
    hash: FuzzHash,
}

impl FuzzHeader {
    /// A header for `manifest`: "right" values are what an honest sender would put there.
    fn build(&self, manifest: &Manifest) -> ChunkHeader {
        let (file, chunk) = (self.file.build(), self.chunk.build());
        let raw = manifest
            .chunk_len(usize::try_from(file).unwrap_or(usize::MAX), chunk)
            .unwrap_or(0);
        let raw_len = self.raw_len.build(raw);
        let codec = [Codec::Raw, Codec::Zstd, Codec::Zero][usize::from(self.codec % 3)];
        let payload = match codec {
            Codec::Raw => raw_len,
            Codec::Zstd => raw_len / 2,
            Codec::Zero => 0,
        };
        ChunkHeader {
            file,
            chunk,
            offset: self.offset.build(chunk.wrapping_mul(manifest.chunk_size)),
            raw_len,
            codec,
            payload_len: self.payload_len.build(payload),
            hash: self.hash.pick(honest_chunk_hash(file, chunk), [0xee; 32]),
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum TrackerOp {
    /// A frame header; if it passes, the bytes then verify (`Some(hash)`) or not (`None`).
    Frame(FuzzHeader, Option<FuzzHash>),
    /// A chunk from the journal of an earlier attempt.
    Journal(FuzzIndex, FuzzIndex, [u8; 32]),
    VerifiedOf(FuzzIndex),
    RootHash,
}

#[derive(Arbitrary, Debug)]
pub struct TrackerCase {
    entries: Vec<(u8, FuzzSize)>,
    large_chunks: bool,
    ops: Vec<TrackerOp>,
}

/// What the tracker should hold: verified hashes and failed attempts per chunk.
#[derive(Default)]
struct TrackerModel {
    verified: HashMap<(u64, u64), Hash>,
    mismatches: HashMap<(u64, u64), u32>,
}

impl TrackerModel {
    fn verified_bytes(&self, m: &Manifest) -> u64 {
        self.verified
            .keys()
            .map(|(f, c)| {
                m.chunk_len(*f as usize, *c)
                    .expect("model holds real chunks")
            })
            .sum()
    }

    /// The root over the verified hashes in manifest order, once all are there.
    fn root(&self, m: &Manifest) -> Option<Hash> {
        let mut root = RootHasher::new(&m.manifest_hash);
        for (f, e) in m.entries.iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            for c in 0..chunk_count(e.size, m.chunk_size) {
                root.add_chunk(self.verified.get(&(f as u64, c))?);
            }
        }
        Some(root.finish())
    }

    fn chunk_exists(m: &Manifest, file: u64, chunk: u64) -> bool {
        usize::try_from(file)
            .ok()
            .and_then(|f| m.chunk_len(f, chunk))
            .is_some()
    }
}

/// The checks an honest header passes, restated: `Ok(())` when the tracker must accept it.
fn header_fits(m: &Manifest, h: &ChunkHeader) -> bool {
    let Some(e) = usize::try_from(h.file).ok().and_then(|f| m.entries.get(f)) else {
        return false;
    };
    let Some(len) = (e.kind == EntryKind::File)
        .then(|| chunk_len(e.size, m.chunk_size, h.chunk))
        .flatten()
    else {
        return false;
    };
    h.chunk.checked_mul(m.chunk_size) == Some(h.offset)
        && h.raw_len == len
        && match h.codec {
            Codec::Raw => h.payload_len == h.raw_len,
            Codec::Zstd => h.payload_len < h.raw_len,
            Codec::Zero => h.payload_len == 0,
        }
}

fn tracker_manifest(entries: &[(u8, FuzzSize)], large_chunks: bool) -> Manifest {
    let entries = entries
        .iter()
        .enumerate()
        .map(|(i, (kind, size))| {
            let kind = KINDS[usize::from(*kind) % KINDS.len()];
            Entry {
                path: format!("e{i}").into_bytes(),
                kind,
                size: if kind == EntryKind::File {
                    size.build()
                } else {
                    0
                },
                ..Entry::default()
            }
        })
        .collect();
    let chunk_size = if large_chunks {
        1 << 20
    } else {
        MIN_CHUNK_SIZE
    };
    Manifest::from_scan(RootKind::Dir, chunk_size, entries)
}

/// Arbitrary header, verify, mismatch and journal sequences against a manifest.
pub fn chunk_tracker(data: &[u8]) {
    let Ok(case) = TrackerCase::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let m = tracker_manifest(&case.entries, case.large_chunks);
    if m.total_bytes != m.entries.iter().fold(0u64, |s, e| s.saturating_add(e.size))
        || m.total_chunks() > MODEL_DISK_CHUNKS
    {
        // A manifest the receiver's space check refuses (or one whose sizes overflow, which
        // the manifest builder refuses) never gets a tracker.
        return;
    }
    let mut t = ChunkTracker::new(&m);
    assert_eq!(t.total_chunks(), m.total_chunks());
    let mut model = TrackerModel::default();
    for op in &case.ops {
        match *op {
            TrackerOp::Frame(fh, verify) => {
                let h = fh.build(&m);
                let checked = t.check_header(&h);
                assert_eq!(checked.is_ok(), header_fits(&m, &h), "{h:?}: {checked:?}");
                let Ok(state) = checked else { continue };
                let key = (h.file, h.chunk);
                assert_eq!(
                    state == ChunkState::AlreadyVerified,
                    model.verified.contains_key(&key)
                );
                match verify {
                    Some(hash) => {
                        let hash = hash.pick(h.hash, [0xdd; 32]);
                        let new = !model.verified.contains_key(&key);
                        assert_eq!(t.mark_verified(h.file, h.chunk, hash), new);
                        model.verified.entry(key).or_insert(hash);
                    }
                    None => {
                        let attempts = model.mismatches.entry(key).or_insert(0);
                        *attempts += 1;
                        let expected = if *attempts >= MAX_CHUNK_ATTEMPTS {
                            Mismatch::GiveUp {
                                attempts: *attempts,
                            }
                        } else {
                            Mismatch::Retry {
                                attempts: *attempts,
                            }
                        };
                        assert_eq!(t.record_mismatch(h.file, h.chunk), expected);
                    }
                }
            }
            TrackerOp::Journal(file, chunk, hash) => {
                let (file, chunk) = (file.build(), chunk.build());
                let new = TrackerModel::chunk_exists(&m, file, chunk)
                    && !model.verified.contains_key(&(file, chunk));
                assert_eq!(t.mark_verified(file, chunk, hash), new);
                if new {
                    model.verified.insert((file, chunk), hash);
                }
            }
            TrackerOp::VerifiedOf(file) => {
                let file = file.build();
                let mut expected: Vec<(u64, Hash)> = model
                    .verified
                    .iter()
                    .filter(|((f, _), _)| *f == file)
                    .map(|((_, c), h)| (*c, *h))
                    .collect();
                expected.sort();
                assert_eq!(
                    t.verified_of(usize::try_from(file).unwrap_or(usize::MAX)),
                    expected
                );
            }
            TrackerOp::RootHash => assert_eq!(t.root_hash(&m.manifest_hash), model.root(&m)),
        }
        assert_eq!(t.verified_chunks(), model.verified.len() as u64);
        assert_eq!(t.verified_bytes(), model.verified_bytes(&m));
        assert!(t.verified_bytes() <= m.total_bytes);
        assert_eq!(t.is_complete(), t.verified_chunks() == t.total_chunks());
        assert!(model.mismatches.len() as u64 <= m.total_chunks());
    }
    assert_eq!(t.root_hash(&m.manifest_hash), model.root(&m));
    assert_eq!(t.is_complete(), model.root(&m).is_some());
}

// ---------------------------------------------------------------------------------------
// receiver session: the hostile peer

/// The hash an honest sender puts in the header of chunk `chunk` of `file` (the model
/// driver stores no bytes, so any fixed function of the index serves).
fn honest_chunk_hash(file: u64, chunk: u64) -> Hash {
    let mut h = [0x5a; 32];
    h[..8].copy_from_slice(&file.to_le_bytes());
    h[8..16].copy_from_slice(&chunk.to_le_bytes());
    h
}

/// One entry of the honest tree: a file, symlink or hardlink at the root or under `d`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ShapeEntry {
    in_dir: bool,
    kind: u8,
    chunks: u8,
    rest: u16,
}

/// What the honest sender would send, in order.
#[derive(Debug, Clone)]
enum HonestStep {
    Msg(ControlMsg),
    Frame(ChunkHeader),
}

struct Honest {
    manifest: Manifest,
    root: Hash,
    steps: Vec<HonestStep>,
}

fn honest(shape: &[ShapeEntry], version: u16, resume: bool, install: bool) -> Honest {
    let mut entries = vec![
        Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            ..Entry::default()
        },
        Entry {
            path: b"d".to_vec(),
            kind: EntryKind::Dir,
            mode: 0o755,
            ..Entry::default()
        },
    ];
    let mut first_file: Option<Vec<u8>> = None;
    for (i, s) in shape.iter().take(32).enumerate() {
        let path = format!("{}e{i}", if s.in_dir { "d/" } else { "" }).into_bytes();
        let mut e = Entry {
            path: path.clone(),
            mode: 0o644,
            ino: i as u64,
            ..Entry::default()
        };
        match s.kind % 4 {
            0 | 1 => {
                e.size = u64::from(s.chunks % 4) * MIN_CHUNK_SIZE + u64::from(s.rest);
                first_file.get_or_insert(path);
            }
            2 => {
                e.kind = EntryKind::Symlink;
                e.link_target = if s.in_dir {
                    b"../d".to_vec()
                } else {
                    b"d".to_vec()
                };
            }
            _ => match &first_file {
                Some(f) => {
                    e.kind = EntryKind::Hardlink;
                    e.link_target = f.clone();
                }
                None => e.kind = EntryKind::Dir,
            },
        }
        entries.push(e);
    }
    let manifest = Manifest::from_scan(RootKind::Dir, MIN_CHUNK_SIZE, entries);
    let mut steps = vec![HonestStep::Msg(ControlMsg::Hello(Hello {
        version,
        dest: b"r.git".to_vec(),
        root_kind: RootKind::Dir,
        chunk_size: manifest.chunk_size,
        entry_count: manifest.entries.len() as u64,
        total_bytes: manifest.total_bytes,
        resume,
        install,
        sender_info: "honest".into(),
        ..Hello::default()
    }))];
    steps.extend(
        manifest
            .entries
            .iter()
            .map(|e| HonestStep::Msg(ControlMsg::Entry(e.clone()))),
    );
    steps.push(HonestStep::Msg(ControlMsg::ManifestEnd {
        manifest_hash: manifest.manifest_hash,
    }));
    let mut root = RootHasher::new(&manifest.manifest_hash);
    for (f, e) in manifest.entries.iter().enumerate() {
        for c in 0..manifest.chunk_count(f) {
            let len = manifest.chunk_len(f, c).expect("chunk of a file");
            let hash = honest_chunk_hash(f as u64, c);
            root.add_chunk(&hash);
            steps.push(HonestStep::Frame(ChunkHeader {
                file: f as u64,
                chunk: c,
                offset: c * manifest.chunk_size,
                raw_len: len,
                codec: if e.ino % 2 == 0 {
                    Codec::Raw
                } else {
                    Codec::Zstd
                },
                payload_len: if e.ino % 2 == 0 { len } else { len / 2 },
                hash,
            }));
        }
    }
    let root = root.finish();
    steps.push(HonestStep::Msg(ControlMsg::Done { root_hash: root }));
    Honest {
        manifest,
        root,
        steps,
    }
}

/// A control message from the hostile sender.
#[derive(Arbitrary, Debug)]
pub enum FuzzMsg {
    Hello(FuzzHello),
    /// Entry `n` of the honest manifest.
    HonestEntry(u8),
    Entry(FuzzEntry),
    /// `Right`: the hash of the entries sent since the last `Hello`; `Other`: the honest one.
    ManifestEnd(FuzzHash),
    /// `Right`: the root over what the receiver verified so far; `Other`: the honest one.
    Done(FuzzHash),
    Fail(u8),
    /// Messages only a receiver sends.
    ReceiverOnly(u8),
}

/// How the model driver carries out a `StoreChunk`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum StoreResult {
    /// The bytes hashed to the header's hash.
    Verified,
    /// The bytes hashed to something else (cannot happen after a real verify; a buggy store).
    VerifiedAs([u8; 32]),
    Mismatch,
    Failed {
        no_space: bool,
    },
    /// Answered later (data streams run beside the control stream).
    Later,
}

/// A driver event the session did not ask for (stale or out-of-order results).
#[derive(Arbitrary, Debug)]
pub enum StrayInput {
    InLine(u64, u64, u64),
    Admitted,
    Refused,
    Prepared,
    PrepareFailed(u8),
    Stored(FuzzIndex, FuzzIndex, FuzzHash),
    Mismatch(FuzzIndex, FuzzIndex),
    StoreFailed(bool),
    Installed,
    InstallFailed,
}

/// One event of a session.
#[derive(Arbitrary, Debug)]
pub enum Event {
    HonestNext,
    HonestRest,
    Control(FuzzMsg),
    /// Bytes off the control stream: a decoded message, or `ControlUnreadable`.
    ControlBytes(Vec<u8>),
    Frame(FuzzHeader),
    /// Bytes off a data stream: a decoded header, or `FrameUnreadable`.
    FrameBytes(Vec<u8>),
    Tick(u64),
    /// Answer the chunk stores that were left for later.
    DeliverLater,
    Stray(StrayInput),
    ControlClosed,
    ConnectionLost,
}

/// How the model driver answers.
#[derive(Arbitrary, Debug)]
pub struct DriverPlan {
    in_line: u8,
    admit: bool,
    /// `None`: staging is prepared; `Some(code)`: preparing fails with that code.
    prepare_fails: Option<u8>,
    /// Chunks an earlier attempt verified (kept only when the sender resumes).
    journal: Vec<(FuzzIndex, FuzzIndex, FuzzHash)>,
    stores: Vec<StoreResult>,
    install_ok: bool,
}

#[derive(Arbitrary, Debug)]
pub struct SessionCase {
    shape: Vec<ShapeEntry>,
    version: u8,
    resume: bool,
    install: bool,
    driver: DriverPlan,
    events: Vec<Event>,
}

const FAIL_CODES: [FailCode; 6] = [
    FailCode::BadRequest,
    FailCode::Busy,
    FailCode::NoSpace,
    FailCode::Verification,
    FailCode::Io,
    FailCode::Aborted,
];

/// The model driver: carries out the session's outputs in memory and checks them.
struct Model<'a> {
    plan: &'a DriverPlan,
    honest: &'a Honest,
    session: ReceiverSession,
    /// What the session should have verified: (file, chunk) -> hash, mirroring its tracker.
    verified: HashMap<(u64, u64), Hash>,
    /// The sender's root, from a `Done` the session took.
    sender_root: Option<Hash>,
    /// Entries sent since the last `Hello` (for a `ManifestEnd` that matches them).
    sent_entries: Vec<Entry>,
    later: VecDeque<ReceiverInput>,
    stores: usize,
    finished: bool,
    install_asked: bool,
    accepted: bool,
}

impl Model<'_> {
    fn manifest(&self) -> Option<Arc<Manifest>> {
        self.session.manifest().cloned()
    }

    /// Receiving: the tracker exists and nothing ended it.
    fn receiving(&self) -> bool {
        !self.finished && !self.install_asked && self.session.verified().is_some()
    }

    fn shadow_root(&self) -> Option<Hash> {
        let m = self.manifest()?;
        TrackerModel {
            verified: self.verified.clone(),
            mismatches: HashMap::new(),
        }
        .root(&m)
    }

    /// Mirrors what the session's tracker and root take from `input`, before it takes it.
    fn mirror(&mut self, input: &ReceiverInput) {
        match input {
            ReceiverInput::ChunkStored { file, chunk, hash } if self.receiving() => {
                let m = self.manifest().expect("receiving has a manifest");
                if TrackerModel::chunk_exists(&m, *file, *chunk) {
                    self.verified.entry((*file, *chunk)).or_insert(*hash);
                }
            }
            ReceiverInput::Control(ControlMsg::Done { root_hash }) if self.receiving() => {
                self.sender_root = Some(*root_hash);
            }
            ReceiverInput::Control(ControlMsg::Hello(_)) => self.sent_entries.clear(),
            ReceiverInput::Control(ControlMsg::Entry(e)) => self.sent_entries.push(e.clone()),
            _ => {}
        }
    }

    /// Feeds one input and everything the driver does about its outputs.
    fn feed(&mut self, input: ReceiverInput) {
        let mut pending: VecDeque<ReceiverInput> = VecDeque::from([input]);
        while let Some(input) = pending.pop_front() {
            self.mirror(&input);
            let outputs = self.session.handle(input);
            if self.finished {
                assert!(outputs.is_empty(), "output after Finished: {outputs:?}");
            }
            let entries = self.manifest().map_or(0, |m| m.entries.len());
            assert!(
                outputs.len() <= entries + 8,
                "{} outputs for one input",
                outputs.len()
            );
            for output in outputs {
                if let Some(next) = self.carry_out(output) {
                    pending.push_back(next);
                }
            }
            self.check_counters();
        }
    }

    fn check_counters(&self) {
        let (Some((chunks, bytes, total)), Some(m)) = (self.session.verified(), self.manifest())
        else {
            return;
        };
        assert!(chunks <= total && bytes <= m.total_bytes);
        assert_eq!(total, m.total_chunks());
        if !self.install_asked && !self.finished {
            assert_eq!(chunks, self.verified.len() as u64, "verified chunks");
            let model_bytes: u64 = self
                .verified
                .keys()
                .map(|(f, c)| m.chunk_len(*f as usize, *c).unwrap_or(0))
                .sum();
            assert_eq!(bytes, model_bytes, "verified bytes");
        }
    }

    /// The session may call the transfer verified: every chunk verified, roots equal.
    fn assert_verified(&self, what: &str) {
        let root = self.shadow_root();
        assert!(root.is_some(), "{what} with chunks missing");
        assert_eq!(root, self.sender_root, "{what} with root hashes differing");
    }

    fn carry_out(&mut self, output: ReceiverOutput) -> Option<ReceiverInput> {
        match output {
            ReceiverOutput::Send(msg) => {
                let mut frame = Vec::new();
                msg.encode_frame(&mut frame);
                let prefix = *frame.first_chunk::<4>().expect("length prefix");
                assert!(control_frame_len(prefix).is_ok(), "sent frame over the cap");
                match &msg {
                    ControlMsg::Have { chunks, .. } => {
                        assert!(!self.accepted && chunks.len() <= MAX_HAVE_PER_FRAME)
                    }
                    ControlMsg::Haves { files } => {
                        let in_all: usize = files.iter().map(|(_, c)| c.len()).sum();
                        assert!(!self.accepted && in_all <= MAX_HAVE_PER_FRAME);
                        assert!(files.len() <= MAX_HAVE_PER_FRAME);
                    }
                    ControlMsg::Accept { .. } => {
                        assert!(!self.accepted, "Accept twice");
                        self.accepted = true;
                    }
                    ControlMsg::Staged { root_hash } => {
                        self.assert_verified("Staged");
                        assert_eq!(Some(*root_hash), self.sender_root);
                    }
                    _ => {}
                }
                None
            }
            ReceiverOutput::Claim { dest, .. } => {
                assert!(check_relative(&dest).is_ok(), "claimed {dest:?}");
                for position in (1..=u64::from(self.plan.in_line % 4)).rev() {
                    self.feed(ReceiverInput::InLine {
                        position,
                        active: 2,
                        limit: 2,
                    });
                }
                Some(if self.plan.admit {
                    ReceiverInput::Admitted
                } else {
                    ReceiverInput::Refused("the destination is busy".into())
                })
            }
            ReceiverOutput::Prepare { manifest, request } => {
                if manifest.total_chunks() > MODEL_DISK_CHUNKS {
                    return Some(ReceiverInput::PrepareFailed {
                        code: FailCode::NoSpace,
                        message: "model disk full".into(),
                    });
                }
                if let Some(code) = self.plan.prepare_fails {
                    return Some(ReceiverInput::PrepareFailed {
                        code: FAIL_CODES[usize::from(code) % FAIL_CODES.len()],
                        message: "model staging refused".into(),
                    });
                }
                let mut tracker = ChunkTracker::new(&manifest);
                self.verified.clear();
                if request.resume {
                    for (f, c, h) in &self.plan.journal {
                        let (f, c) = (f.build(), c.build());
                        let hash = h.pick(honest_chunk_hash(f, c), [0xcc; 32]);
                        if tracker.mark_verified(f, c, hash) {
                            self.verified.insert((f, c), hash);
                        }
                    }
                }
                Some(ReceiverInput::Prepared(tracker))
            }
            ReceiverOutput::AcceptData | ReceiverOutput::SkipChunk => None,
            ReceiverOutput::StoreChunk(h) => {
                let m = self.manifest().expect("a manifest before frames");
                assert!(
                    header_fits(&m, &h),
                    "stored a frame that does not fit: {h:?}"
                );
                assert!(
                    !self.verified.contains_key(&(h.file, h.chunk)),
                    "stored a verified chunk again"
                );
                let plan = &self.plan.stores;
                let result = if plan.is_empty() {
                    StoreResult::Verified
                } else {
                    plan[self.stores % plan.len()]
                };
                self.stores += 1;
                let answer = match result {
                    StoreResult::Verified | StoreResult::Later => ReceiverInput::ChunkStored {
                        file: h.file,
                        chunk: h.chunk,
                        hash: h.hash,
                    },
                    StoreResult::VerifiedAs(hash) => ReceiverInput::ChunkStored {
                        file: h.file,
                        chunk: h.chunk,
                        hash,
                    },
                    StoreResult::Mismatch => ReceiverInput::ChunkMismatch {
                        file: h.file,
                        chunk: h.chunk,
                        reason: "model: hash differs".into(),
                    },
                    StoreResult::Failed { no_space } => ReceiverInput::StoreFailed {
                        error: "model: write failed".into(),
                        no_space,
                    },
                };
                if matches!(result, StoreResult::Later) {
                    self.later.push_back(answer);
                    return None;
                }
                Some(answer)
            }
            ReceiverOutput::Install => {
                assert!(!self.install_asked, "Install twice");
                self.assert_verified("Install");
                self.install_asked = true;
                Some(if self.plan.install_ok {
                    ReceiverInput::Installed {
                        path: b"/model/r.git".to_vec(),
                        replaced: None,
                    }
                } else {
                    ReceiverInput::InstallFailed("model: rename failed".into())
                })
            }
            ReceiverOutput::Settle => {
                self.assert_verified("Settle");
                None
            }
            ReceiverOutput::DiscardStaging => None,
            ReceiverOutput::Finished(result) => {
                assert!(!self.finished, "finished twice");
                self.finished = true;
                match result {
                    Ok(Outcome::Installed { root_hash, .. }) => {
                        assert!(self.install_asked && self.plan.install_ok);
                        assert_eq!(Some(root_hash), self.sender_root);
                    }
                    Ok(Outcome::Staged { root_hash }) => {
                        assert!(!self.install_asked);
                        assert_eq!(Some(root_hash), self.sender_root);
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
                None
            }
        }
    }

    fn stray(&self, s: &StrayInput) -> ReceiverInput {
        match *s {
            StrayInput::InLine(position, active, limit) => ReceiverInput::InLine {
                position,
                active,
                limit,
            },
            StrayInput::Admitted => ReceiverInput::Admitted,
            StrayInput::Refused => ReceiverInput::Refused("stray".into()),
            StrayInput::Prepared => {
                let m = self
                    .manifest()
                    .map_or_else(|| self.honest.manifest.clone(), |m| (*m).clone());
                if m.total_chunks() > MODEL_DISK_CHUNKS {
                    ReceiverInput::Admitted
                } else {
                    ReceiverInput::Prepared(ChunkTracker::new(&m))
                }
            }
            StrayInput::PrepareFailed(code) => ReceiverInput::PrepareFailed {
                code: FAIL_CODES[usize::from(code) % FAIL_CODES.len()],
                message: "stray".into(),
            },
            StrayInput::Stored(f, c, h) => {
                let (file, chunk) = (f.build(), c.build());
                ReceiverInput::ChunkStored {
                    file,
                    chunk,
                    hash: h.pick(honest_chunk_hash(file, chunk), [0xbb; 32]),
                }
            }
            StrayInput::Mismatch(f, c) => ReceiverInput::ChunkMismatch {
                file: f.build(),
                chunk: c.build(),
                reason: "stray".into(),
            },
            StrayInput::StoreFailed(no_space) => ReceiverInput::StoreFailed {
                error: "stray".into(),
                no_space,
            },
            StrayInput::Installed => ReceiverInput::Installed {
                path: b"/model/stray".to_vec(),
                replaced: Some(b"/model/old".to_vec()),
            },
            StrayInput::InstallFailed => ReceiverInput::InstallFailed("stray".into()),
        }
    }

    fn control(&self, msg: &FuzzMsg) -> ControlMsg {
        match msg {
            FuzzMsg::Hello(h) => ControlMsg::Hello(h.build(&self.honest.manifest.entries)),
            FuzzMsg::HonestEntry(i) => {
                let entries = &self.honest.manifest.entries;
                ControlMsg::Entry(entries[usize::from(*i) % entries.len()].clone())
            }
            FuzzMsg::Entry(e) => ControlMsg::Entry(e.build()),
            FuzzMsg::ManifestEnd(h) => {
                let mut hasher = ManifestHasher::new();
                self.sent_entries.iter().for_each(|e| hasher.add(e));
                ControlMsg::ManifestEnd {
                    manifest_hash: h.pick(hasher.finish(), self.honest.manifest.manifest_hash),
                }
            }
            FuzzMsg::Done(h) => ControlMsg::Done {
                root_hash: h.pick(
                    self.shadow_root().unwrap_or(self.honest.root),
                    self.honest.root,
                ),
            },
            FuzzMsg::Fail(code) => ControlMsg::Fail {
                code: FAIL_CODES[usize::from(*code) % FAIL_CODES.len()],
                message: "sender gave up".into(),
            },
            FuzzMsg::ReceiverOnly(k) => match k % 7 {
                0 => ControlMsg::Accept { verified_bytes: 0 },
                1 => ControlMsg::Have {
                    file: 0,
                    chunks: vec![(0, [0; 32])],
                },
                2 => ControlMsg::Staged {
                    root_hash: self.honest.root,
                },
                3 => ControlMsg::Progress {
                    verified_chunks: 1,
                    verified_bytes: 1,
                    wire_bytes: 1,
                },
                4 => ControlMsg::Queued {
                    position: 1,
                    active: 1,
                    limit: 1,
                },
                5 => ControlMsg::Retry {
                    file: 0,
                    chunk: 0,
                    reason: String::new(),
                },
                _ => ControlMsg::Installed {
                    root_hash: self.honest.root,
                    path: b"r.git".to_vec(),
                    replaced: None,
                },
            },
        }
    }

    fn frame_manifest(&self) -> Manifest {
        self.manifest()
            .map_or_else(|| self.honest.manifest.clone(), |m| (*m).clone())
    }
}

/// The hostile peer against [`ReceiverSession`], with the model driver.
pub fn recv_session(data: &[u8]) {
    let Ok(case) = SessionCase::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let version = u16::from(case.version) % PROTOCOL_VERSION + 1;
    let honest = honest(&case.shape, version, case.resume, case.install);
    let mut model = Model {
        plan: &case.driver,
        honest: &honest,
        session: ReceiverSession::new(),
        verified: HashMap::new(),
        sender_root: None,
        sent_entries: Vec::new(),
        later: VecDeque::new(),
        stores: 0,
        finished: false,
        install_asked: false,
        accepted: false,
    };
    let mut next_honest = 0usize;
    for event in &case.events {
        let inputs: Vec<ReceiverInput> = match event {
            Event::HonestNext | Event::HonestRest => {
                let end = if matches!(event, Event::HonestNext) {
                    (next_honest + 1).min(honest.steps.len())
                } else {
                    honest.steps.len()
                };
                let steps = &honest.steps[next_honest..end];
                next_honest = end;
                steps
                    .iter()
                    .map(|s| match s {
                        HonestStep::Msg(m) => ReceiverInput::Control(m.clone()),
                        HonestStep::Frame(h) => ReceiverInput::ChunkFrame(h.clone()),
                    })
                    .collect()
            }
            Event::Control(msg) => vec![ReceiverInput::Control(model.control(msg))],
            Event::ControlBytes(bytes) => vec![match ControlMsg::decode_body(bytes) {
                Ok(msg) => ReceiverInput::Control(msg),
                Err(e) => ReceiverInput::ControlUnreadable(e.to_string()),
            }],
            Event::Frame(fh) => vec![ReceiverInput::ChunkFrame(fh.build(&model.frame_manifest()))],
            Event::FrameBytes(bytes) => {
                let mut buf = [0u8; ChunkHeader::LEN];
                let n = bytes.len().min(ChunkHeader::LEN);
                buf[..n].copy_from_slice(&bytes[..n]);
                vec![match ChunkHeader::decode(&buf) {
                    Ok(h) => ReceiverInput::ChunkFrame(h),
                    Err(e) => ReceiverInput::FrameUnreadable(e.to_string()),
                }]
            }
            Event::Tick(wire_bytes) => vec![ReceiverInput::Tick {
                wire_bytes: *wire_bytes,
            }],
            Event::DeliverLater => model.later.drain(..).collect(),
            Event::Stray(s) => vec![model.stray(s)],
            Event::ControlClosed => vec![ReceiverInput::ControlClosed],
            Event::ConnectionLost => vec![ReceiverInput::ConnectionLost("model: reset".into())],
        };
        for input in inputs {
            model.feed(input);
        }
    }
    // The streams end: late stores arrive, then the control stream closes.
    let later: Vec<_> = model.later.drain(..).collect();
    for input in later {
        model.feed(input);
    }
    model.feed(ReceiverInput::ControlClosed);
    assert!(model.finished, "the session never finished");
    assert!(model.session.is_finished());
}
