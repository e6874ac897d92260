//! The `shardxfer` wire format: control messages and chunk frame headers.
//!
//! Everything here is sans-io: encoding appends to a `Vec<u8>`, decoding reads from a byte
//! slice and never panics on hostile input (property-tested in this module). The async
//! driver ([`crate::io`]) only moves whole frames between these functions and quinn streams.
//!
//! Layout, all integers little-endian:
//! - control frame: `u32 len` then `len` bytes = `u8 type` + body. `len` is capped at
//!   [`MAX_CONTROL_FRAME`] so a peer cannot make us allocate without bound;
//! - chunk frame on a data stream: a fixed [`ChunkHeader::LEN`]-byte header then
//!   `payload_len` payload bytes;
//! - variable byte strings: `u32 len` + bytes (paths are raw bytes: Unix file names need not
//!   be UTF-8).
//!
//! The protocol version travels in [`Hello`]; an unknown version is refused with a message.
//! Versions:
//! - 1: the original protocol;
//! - 2: the receiver may answer [`ControlMsg::Queued`] (repeatedly) before `Have`/`Accept`
//!   while it is at its transfer limit. A receiver speaks both: it never sends `Queued` to a
//!   version 1 sender (which simply waits for `Accept`). A version 2 sender is refused by a
//!   version 1 receiver, so receivers are upgraded first.
//! - 3: [`Hello::git`]: the sender says the tree is a git directory, so the receiver may
//!   carry a content-addressed file over by its path and size alone
//!   ([`crate::gitdir::same_source_version`]). The field follows the version 2 layout; a
//!   receiver decodes each `Hello` by the version it carries and still serves 1 and 2.
//! - 4: entries carry their owner, group and extended attributes ([`Attrs`], sent as
//!   [`T_ENTRY_ATTRS`] frames, covered by the manifest hash like every entry byte); a second
//!   path of a hardlinked file is an [`EntryKind::Hardlink`] entry naming the first; the
//!   `Hello` carries the sender's [`OwnerPolicy`] (`--preserve-owner`, `--chown`,
//!   `--map-owner`), applied by the receiver. Receivers serve 1 to 4; entries of earlier
//!   versions have no attributes, and their files belong to the receiver's user as before.
//! - 5: [`Hello::external_links`]: the absolute prefixes symlinks leaving the tree may point
//!   into (`--allow-external-link`); earlier senders send none, and such links are refused.
//! - 6: [`Hello::ticket`]: the orchestrator's signed transfer ticket ([`crate::ticket`]),
//!   empty without one; [`FailCode::Unauthorized`] answers a refused ticket (earlier senders,
//!   which cannot carry one, get `BadRequest` with the same message). Release 0.1.0.
//! - 7: the version is negotiated in the TLS handshake, by ALPN ([`Negotiated`]): from this
//!   version on each one has its own id, `shardxfer/7`, and a `Hello` must carry the version
//!   its connection negotiated. Versions 1 to 6 share the id `shardxfer/1` (they had no
//!   negotiation: a receiver read the `Hello`'s version). The receiver tells what it holds
//!   in [`ControlMsg::Haves`] frames, many files each (a resumed pass of a 200k-file tree
//!   was 200k `Have` frames); the other messages are those of 6. Release 0.2.0.
//!
//! # The upgrade rule
//! A build speaks its own version and the one before ([`PREVIOUS_PROTOCOL_VERSION`]): a
//! sender offers both ids, newest first, and speaks whichever the receiver picked; a receiver
//! picks the newest id both know, and also serves every version of the legacy id. So a fleet
//! upgrades one host at a time, senders and receivers in any order, as long as no two hosts
//! are more than one release apart; a release drops the version before its previous one only
//! when that is said in its notes (ARCHITECTURE.md, "Versions and upgrades").

use thiserror::Error;

/// ALPN id of protocol versions 1 to 6, which had no negotiation of their own.
pub const LEGACY_ALPN: &[u8] = b"shardxfer/1";
/// Version carried in [`Hello`]; bumped on any incompatible change of this module.
pub const PROTOCOL_VERSION: u16 = 7;
/// The version before [`PROTOCOL_VERSION`], which this build also speaks (the upgrade rule).
pub const PREVIOUS_PROTOCOL_VERSION: u16 = PROTOCOL_VERSION - 1;
/// First version negotiated by its own ALPN id.
pub const ALPN_NEGOTIATED_SINCE_VERSION: u16 = 7;
/// Oldest sender version a receiver still serves.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// First version whose senders understand [`ControlMsg::Queued`].
pub const QUEUED_SINCE_VERSION: u16 = 2;
/// First version whose `Hello` carries [`Hello::git`].
pub const GIT_FLAG_SINCE_VERSION: u16 = 3;
/// First version whose `Hello` carries [`Hello::owner`].
pub const OWNER_SINCE_VERSION: u16 = 4;
/// First version whose `Hello` carries [`Hello::external_links`].
pub const EXTERNAL_LINKS_SINCE_VERSION: u16 = 5;
/// First version whose `Hello` carries [`Hello::ticket`] and whose senders know
/// [`FailCode::Unauthorized`].
pub const TICKET_SINCE_VERSION: u16 = 6;
/// First version whose senders read [`ControlMsg::Haves`].
pub const HAVES_SINCE_VERSION: u16 = 7;

/// The ALPN id of protocol `version`: `shardxfer/V` from [`ALPN_NEGOTIATED_SINCE_VERSION`]
/// on, [`LEGACY_ALPN`] before.
pub fn alpn_id(version: u16) -> Vec<u8> {
    if version >= ALPN_NEGOTIATED_SINCE_VERSION {
        format!("shardxfer/{version}").into_bytes()
    } else {
        LEGACY_ALPN.to_vec()
    }
}

/// The ALPN ids this build offers, most preferred first (senders and receivers alike): the
/// current version's, then the previous one's.
pub fn offered_alpn_ids() -> Vec<Vec<u8>> {
    let mut ids = vec![
        alpn_id(PROTOCOL_VERSION),
        alpn_id(PREVIOUS_PROTOCOL_VERSION),
    ];
    ids.dedup();
    ids
}

/// What a connection's TLS handshake settled about the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The ALPN id both sides agreed on (empty: the peer offered none).
    pub alpn: Vec<u8>,
    /// The version a sender speaks on this connection.
    pub version: u16,
    /// The `Hello` versions a receiver serves on this connection.
    pub serves: std::ops::RangeInclusive<u16>,
}

impl Negotiated {
    /// From the id the handshake agreed on (`None`: no ALPN, read as the legacy id, whose
    /// `Hello` says the version). `None` back: an id this build does not speak (rustls
    /// refuses those in the handshake, so this is a peer's or a configuration's bug).
    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Negotiated> {
        let alpn = alpn.unwrap_or(LEGACY_ALPN);
        if alpn == LEGACY_ALPN {
            let newest_legacy = ALPN_NEGOTIATED_SINCE_VERSION - 1;
            return Some(Negotiated {
                alpn: alpn.to_vec(),
                version: newest_legacy.min(PROTOCOL_VERSION),
                serves: MIN_PROTOCOL_VERSION..=newest_legacy.min(PROTOCOL_VERSION),
            });
        }
        let version: u16 = std::str::from_utf8(alpn.strip_prefix(b"shardxfer/")?)
            .ok()?
            .parse()
            .ok()?;
        let known = (ALPN_NEGOTIATED_SINCE_VERSION..=PROTOCOL_VERSION).contains(&version)
            && version >= PREVIOUS_PROTOCOL_VERSION;
        known.then(|| Negotiated {
            alpn: alpn.to_vec(),
            version,
            serves: version..=version,
        })
    }

    /// The agreed id as text, for logs and summaries.
    pub fn alpn_text(&self) -> String {
        String::from_utf8_lossy(&self.alpn).into_owned()
    }
}
/// Most external link prefixes a `Hello` may carry.
pub const MAX_EXTERNAL_LINK_PREFIXES: usize = 256;
/// Most owner rules a `Hello` may carry.
pub const MAX_OWNER_RULES: usize = 1024;
/// Largest control frame accepted (type byte + body).
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;
/// Most chunk hashes carried by one [`ControlMsg::Have`] frame (keeps it under the cap).
pub const MAX_HAVE_PER_FRAME: usize = 16_384;
/// How often a receiver sends `Progress` while receiving; the sender's `auto` compression
/// keeps enough data queued to cover it ([`crate::compress`]).
pub const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Magic at the start of every chunk header: catches desynchronised streams early.
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"SXC1");

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// Errors from decoding bytes that came off the network.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame truncated: needed {needed} more bytes")]
    Truncated { needed: u64 },
    #[error("control frame of {0} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit")]
    FrameTooLarge(u64),
    #[error("empty control frame")]
    EmptyFrame,
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    #[error("invalid value {value} for {field}")]
    InvalidValue { field: &'static str, value: u64 },
    #[error("{0} trailing bytes after message")]
    TrailingBytes(u64),
    #[error("bad chunk frame magic {0:#010x} (stream out of sync)")]
    BadMagic(u32),
    #[error("string field {field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
}

/// What the root of a transfer is: a directory tree or a single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootKind {
    #[default]
    Dir,
    File,
}

/// Kind of one manifest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    #[default]
    File,
    Dir,
    Symlink,
    /// Version 4: another name of an earlier file entry (same inode on the sender), whose
    /// path is in `link_target`; no data of its own (size 0).
    Hardlink,
}

/// An entry's owner, group and extended attributes (protocol version 4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Numeric owner and group on the sender.
    pub uid: u32,
    pub gid: u32,
    /// Extended attributes (`user.*`, `security.selinux`, `system.posix_acl_access`, ...),
    /// as (name, value), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One file, directory, symlink or hardlink of the tree being sent.
///
/// `ino`, `ctime_*` identify the source version: a resume keeps verified chunks of a file only
/// when all of size, mtime, inode and ctime are unchanged, so a rewritten source is re-sent
/// whole and never spliced from two versions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Path relative to the transfer root, `/`-separated, raw bytes; empty for a file root.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// File size in bytes; 0 for directories and symlinks.
    pub size: u64,
    /// Symlink target, or a hardlink's first path (raw bytes); empty otherwise.
    pub link_target: Vec<u8>,
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    /// Owner, group, xattrs; `None` from senders before version 4.
    pub attrs: Option<Attrs>,
}

impl Entry {
    /// True when `other` describes the same source version of the same path.
    pub fn same_version(&self, other: &Entry) -> bool {
        self.path == other.path
            && self.kind == other.kind
            && self.size == other.size
            && self.mtime_sec == other.mtime_sec
            && self.mtime_nsec == other.mtime_nsec
            && self.ino == other.ino
            && self.ctime_sec == other.ctime_sec
            && self.ctime_nsec == other.ctime_nsec
            && self.link_target == other.link_target
    }
}

/// First message of a transfer, sender to receiver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub version: u16,
    /// Destination name under the receiver's root (relative, validated by the receiver).
    pub dest: Vec<u8>,
    pub root_kind: RootKind,
    pub chunk_size: u64,
    pub entry_count: u64,
    pub total_bytes: u64,
    /// Ask the receiver to keep what it already verified for this destination.
    pub resume: bool,
    /// Install once verified; when false the receiver keeps the verified tree in staging
    /// (a pre-copy) and answers `Staged`; a later `resume` run sends what changed and installs.
    pub install: bool,
    /// Free text for the receiver's logs (tool version, compression policy).
    pub sender_info: String,
    /// Version 3: the tree is a git directory (sent with git's rules,
    /// [`crate::gitdir`]); always false from older senders.
    pub git: bool,
    /// Version 4: who should own the installed files; [`OwnerPolicy::Receiver`] from older
    /// senders.
    pub owner: OwnerPolicy,
    /// Version 5: absolute directories that symlinks leaving the tree may point into
    /// (`shardsend --allow-external-link`); checked by the receiver like any entry.
    pub external_links: Vec<Vec<u8>>,
    /// Version 6: the transfer ticket's text (`shardsend --ticket`), empty without one;
    /// at most [`crate::ticket::MAX_TICKET_LEN`] bytes.
    pub ticket: Vec<u8>,
}

/// Who owns the installed files (protocol version 4); see [`crate::owner`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OwnerPolicy {
    /// The user running the receiver (as before version 4).
    #[default]
    Receiver,
    /// Each entry's numeric owner and group, rewritten by the first matching rule.
    Apply(Vec<OwnerRule>),
}

/// One rewrite of an owner or a group: `from` (any when `None`) becomes `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRule {
    pub kind: IdKind,
    /// A numeric id on the sender; `None` matches every id.
    pub from: Option<u32>,
    /// Resolved on the receiver.
    pub to: IdName,
}

/// Whether a rule rewrites owners or groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    User,
    Group,
}

/// A user or group as the receiver should resolve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdName {
    Id(u32),
    Name(String),
}

/// Why a receiver refused or failed a transfer; lets the sender map it to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCode {
    /// Bad request: invalid manifest, path, protocol violation.
    BadRequest = 1,
    /// Another transfer holds the destination.
    Busy = 2,
    /// Not enough space on the receiver.
    NoSpace = 3,
    /// A chunk kept failing verification, or the root hash differs.
    Verification = 4,
    /// Local I/O failure on the receiver.
    Io = 5,
    /// The sender aborted.
    Aborted = 6,
    /// Version 6: the transfer's ticket is missing or does not allow it.
    Unauthorized = 7,
}

impl FailCode {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => FailCode::BadRequest,
            2 => FailCode::Busy,
            3 => FailCode::NoSpace,
            4 => FailCode::Verification,
            5 => FailCode::Io,
            6 => FailCode::Aborted,
            7 => FailCode::Unauthorized,
            other => {
                return Err(WireError::InvalidValue {
                    field: "fail code",
                    value: u64::from(other),
                })
            }
        })
    }
}

/// Messages of the control stream (one bidirectional stream opened by the sender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// S->R: start of a transfer; followed by `entry_count` [`ControlMsg::Entry`].
    Hello(Hello),
    /// S->R: one manifest entry.
    Entry(Entry),
    /// S->R: end of manifest, with the hash of all encoded entries.
    ManifestEnd { manifest_hash: Hash },
    /// R->S: chunks of `file` already verified in staging (resume), with their hashes.
    Have { file: u64, chunks: Vec<(u64, Hash)> },
    /// R->S (version 7): what [`ControlMsg::Have`] says, for many files in one frame: at
    /// most [`MAX_HAVE_PER_FRAME`] files and as many chunks in all. A file's chunks may
    /// continue in the next frame.
    Haves { files: Vec<(u64, Vec<(u64, Hash)>)> },
    /// R->S: the receiver accepted the manifest; all `Have` frames were sent before it.
    Accept { verified_bytes: u64 },
    /// R->S (version 2): the receiver is running `active` transfers, its `limit`; this one
    /// waits, `position` in line (1 = next). Repeated when the position changes and every
    /// few seconds; `Have`/`Accept` follow once it is admitted.
    Queued {
        position: u64,
        active: u64,
        limit: u64,
    },
    /// R->S, every [`PROGRESS_INTERVAL`]: chunks and raw bytes verified so far, and frame
    /// bytes read from the data streams so far (counted per read, not per whole chunk: the
    /// sender measures the link with them).
    Progress {
        verified_chunks: u64,
        verified_bytes: u64,
        wire_bytes: u64,
    },
    /// R->S: this chunk failed verification; send it again.
    Retry {
        file: u64,
        chunk: u64,
        reason: String,
    },
    /// S->R: every chunk was sent; the sender's root hash.
    Done { root_hash: Hash },
    /// R->S: every chunk is verified and kept in staging (no install was asked for).
    Staged { root_hash: Hash },
    /// R->S: the tree is fsynced and installed.
    Installed {
        root_hash: Hash,
        path: Vec<u8>,
        replaced: Option<Vec<u8>>,
    },
    /// Either way: the transfer cannot go on.
    Fail { code: FailCode, message: String },
}

const T_HELLO: u8 = 1;
const T_ENTRY: u8 = 2;
const T_MANIFEST_END: u8 = 3;
const T_HAVE: u8 = 4;
const T_ACCEPT: u8 = 5;
const T_PROGRESS: u8 = 6;
const T_RETRY: u8 = 7;
const T_DONE: u8 = 8;
const T_INSTALLED: u8 = 9;
const T_FAIL: u8 = 10;
const T_STAGED: u8 = 11;
const T_QUEUED: u8 = 12;
/// An [`Entry`] with [`Attrs`] (version 4); [`T_ENTRY`] stays the attribute-less layout.
pub const T_ENTRY_ATTRS: u8 = 13;
const T_HAVES: u8 = 14;

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// All zero bytes (a hole in a sparse file); empty payload.
    Zero = 2,
}

impl Codec {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            2 => Ok(Codec::Zero),
            other => Err(WireError::InvalidValue {
                field: "codec",
                value: u64::from(other),
            }),
        }
    }
}

/// Header of a chunk frame on a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Index of the file in the manifest.
    pub file: u64,
    /// Index of the chunk in the file.
    pub chunk: u64,
    /// Byte offset in the file; must equal `chunk * chunk_size`.
    pub offset: u64,
    /// Length of the chunk once decoded.
    pub raw_len: u64,
    pub codec: Codec,
    pub payload_len: u64,
    /// BLAKE3 of the raw (decoded) bytes, computed by the sender from what it read.
    pub hash: Hash,
}

impl ChunkHeader {
    /// Encoded size of a header.
    pub const LEN: usize = 4 + 8 * 5 + 1 + 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut w = &mut out[..];
        put(&mut w, &CHUNK_MAGIC.to_le_bytes());
        put(&mut w, &self.file.to_le_bytes());
        put(&mut w, &self.chunk.to_le_bytes());
        put(&mut w, &self.offset.to_le_bytes());
        put(&mut w, &self.raw_len.to_le_bytes());
        put(&mut w, &[self.codec as u8]);
        put(&mut w, &self.payload_len.to_le_bytes());
        put(&mut w, &self.hash);
        out
    }

    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader { buf: &buf[..] };
        let magic = r.u32()?;
        if magic != CHUNK_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        Ok(ChunkHeader {
            file: r.u64()?,
            chunk: r.u64()?,
            offset: r.u64()?,
            raw_len: r.u64()?,
            codec: Codec::from_u8(r.u8()?)?,
            payload_len: r.u64()?,
            hash: r.hash()?,
        })
    }
}

fn put(w: &mut &mut [u8], bytes: &[u8]) {
    let (head, tail) = std::mem::take(w).split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    *w = tail;
}

impl ControlMsg {
    /// The message for an error text: its debug form, cut at 200 characters (an `Entry` or
    /// a `Have` can be long).
    pub fn brief(&self) -> String {
        let text = format!("{self:?}");
        match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        }
    }

    /// Appends this message as one length-prefixed frame to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 4]);
        self.encode_body(out);
        // A body never exceeds u32: the largest (`Have`) is bounded by MAX_HAVE_PER_FRAME.
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Encodes type byte + body (what `len` counts). Also the input of the manifest hash.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            ControlMsg::Hello(h) => {
                out.push(T_HELLO);
                out.extend_from_slice(&h.version.to_le_bytes());
                put_bytes(out, &h.dest);
                out.push(match h.root_kind {
                    RootKind::Dir => 0,
                    RootKind::File => 1,
                });
                put_u64(out, h.chunk_size);
                put_u64(out, h.entry_count);
                put_u64(out, h.total_bytes);
                out.push(u8::from(h.resume));
                out.push(u8::from(h.install));
                put_bytes(out, h.sender_info.as_bytes());
                if h.version >= GIT_FLAG_SINCE_VERSION {
                    out.push(u8::from(h.git));
                }
                if h.version >= OWNER_SINCE_VERSION {
                    encode_owner(out, &h.owner);
                }
                if h.version >= EXTERNAL_LINKS_SINCE_VERSION {
                    out.extend_from_slice(&(h.external_links.len() as u32).to_le_bytes());
                    for prefix in &h.external_links {
                        put_bytes(out, prefix);
                    }
                }
                if h.version >= TICKET_SINCE_VERSION {
                    put_bytes(out, &h.ticket);
                }
            }
            ControlMsg::Entry(e) => encode_entry_body(e, out),
            ControlMsg::ManifestEnd { manifest_hash } => {
                out.push(T_MANIFEST_END);
                out.extend_from_slice(manifest_hash);
            }
            ControlMsg::Have { file, chunks } => {
                out.push(T_HAVE);
                put_u64(out, *file);
                put_chunk_hashes(out, chunks);
            }
            ControlMsg::Haves { files } => {
                out.push(T_HAVES);
                out.extend_from_slice(&(files.len() as u32).to_le_bytes());
                for (file, chunks) in files {
                    put_u64(out, *file);
                    put_chunk_hashes(out, chunks);
                }
            }
            ControlMsg::Accept { verified_bytes } => {
                out.push(T_ACCEPT);
                put_u64(out, *verified_bytes);
            }
            ControlMsg::Progress {
                verified_chunks,
                verified_bytes,
                wire_bytes,
            } => {
                out.push(T_PROGRESS);
                put_u64(out, *verified_chunks);
                put_u64(out, *verified_bytes);
                put_u64(out, *wire_bytes);
            }
            ControlMsg::Retry {
                file,
                chunk,
                reason,
            } => {
                out.push(T_RETRY);
                put_u64(out, *file);
                put_u64(out, *chunk);
                put_bytes(out, reason.as_bytes());
            }
            ControlMsg::Done { root_hash } => {
                out.push(T_DONE);
                out.extend_from_slice(root_hash);
            }
            ControlMsg::Installed {
                root_hash,
                path,
                replaced,
            } => {
                out.push(T_INSTALLED);
                out.extend_from_slice(root_hash);
                put_bytes(out, path);
                match replaced {
                    None => out.push(0),
                    Some(p) => {
                        out.push(1);
                        put_bytes(out, p);
                    }
                }
            }
            ControlMsg::Staged { root_hash } => {
                out.push(T_STAGED);
                out.extend_from_slice(root_hash);
            }
            ControlMsg::Queued {
                position,
                active,
                limit,
            } => {
                out.push(T_QUEUED);
                put_u64(out, *position);
                put_u64(out, *active);
                put_u64(out, *limit);
            }
            ControlMsg::Fail { code, message } => {
                out.push(T_FAIL);
                out.push(*code as u8);
                put_bytes(out, message.as_bytes());
            }
        }
    }

    /// Decodes a frame body (type byte + body, without the length prefix).
    pub fn decode_body(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader { buf };
        let ty = r.u8().map_err(|_| WireError::EmptyFrame)?;
        let msg = match ty {
            T_HELLO => {
                let version = r.u16()?;
                let mut hello = Hello {
                    version,
                    dest: r.bytes()?,
                    root_kind: match r.u8()? {
                        0 => RootKind::Dir,
                        1 => RootKind::File,
                        v => {
                            return Err(WireError::InvalidValue {
                                field: "root kind",
                                value: u64::from(v),
                            })
                        }
                    },
                    chunk_size: r.u64()?,
                    entry_count: r.u64()?,
                    total_bytes: r.u64()?,
                    resume: r.bool("resume")?,
                    install: r.bool("install")?,
                    sender_info: r.string("sender info")?,
                    git: false,
                    owner: OwnerPolicy::Receiver,
                    external_links: Vec::new(),
                    ticket: Vec::new(),
                };
                if version >= GIT_FLAG_SINCE_VERSION {
                    hello.git = r.bool("git")?;
                }
                if version >= OWNER_SINCE_VERSION {
                    hello.owner = decode_owner(&mut r)?;
                }
                if version >= EXTERNAL_LINKS_SINCE_VERSION {
                    let n = r.u32()? as usize;
                    if n > MAX_EXTERNAL_LINK_PREFIXES {
                        return Err(WireError::InvalidValue {
                            field: "external link prefix count",
                            value: n as u64,
                        });
                    }
                    for _ in 0..n {
                        hello.external_links.push(r.bytes()?);
                    }
                }
                if version >= TICKET_SINCE_VERSION {
                    hello.ticket = r.bytes()?;
                    if hello.ticket.len() > crate::ticket::MAX_TICKET_LEN {
                        return Err(WireError::InvalidValue {
                            field: "ticket length",
                            value: hello.ticket.len() as u64,
                        });
                    }
                }
                if version > PROTOCOL_VERSION {
                    // A newer sender's fields: left unread, so that the receiver can say
                    // which versions it speaks rather than report a malformed message.
                    r.buf = &[];
                }
                ControlMsg::Hello(hello)
            }
            T_ENTRY | T_ENTRY_ATTRS => ControlMsg::Entry(Entry {
                path: r.bytes()?,
                kind: match r.u8()? {
                    0 => EntryKind::File,
                    1 => EntryKind::Dir,
                    2 => EntryKind::Symlink,
                    3 => EntryKind::Hardlink,
                    v => {
                        return Err(WireError::InvalidValue {
                            field: "entry kind",
                            value: u64::from(v),
                        })
                    }
                },
                mode: r.u32()?,
                mtime_sec: r.i64()?,
                mtime_nsec: r.u32()?,
                size: r.u64()?,
                link_target: r.bytes()?,
                ino: r.u64()?,
                ctime_sec: r.i64()?,
                ctime_nsec: r.u32()?,
                attrs: if ty == T_ENTRY_ATTRS {
                    Some(decode_attrs(&mut r)?)
                } else {
                    None
                },
            }),
            T_MANIFEST_END => ControlMsg::ManifestEnd {
                manifest_hash: r.hash()?,
            },
            T_HAVE => ControlMsg::Have {
                file: r.u64()?,
                chunks: r.chunk_hashes(MAX_HAVE_PER_FRAME, "have count")?,
            },
            T_HAVES => {
                let n = r.u32()? as usize;
                if n > MAX_HAVE_PER_FRAME {
                    return Err(WireError::InvalidValue {
                        field: "haves file count",
                        value: n as u64,
                    });
                }
                let mut files = Vec::with_capacity(n);
                let mut in_all = 0usize;
                for _ in 0..n {
                    let file = r.u64()?;
                    let left = MAX_HAVE_PER_FRAME - in_all;
                    let chunks = r.chunk_hashes(left, "haves chunk count")?;
                    in_all += chunks.len();
                    files.push((file, chunks));
                }
                ControlMsg::Haves { files }
            }
            T_ACCEPT => ControlMsg::Accept {
                verified_bytes: r.u64()?,
            },
            T_PROGRESS => ControlMsg::Progress {
                verified_chunks: r.u64()?,
                verified_bytes: r.u64()?,
                wire_bytes: r.u64()?,
            },
            T_RETRY => ControlMsg::Retry {
                file: r.u64()?,
                chunk: r.u64()?,
                reason: r.string("retry reason")?,
            },
            T_DONE => ControlMsg::Done {
                root_hash: r.hash()?,
            },
            T_INSTALLED => ControlMsg::Installed {
                root_hash: r.hash()?,
                path: r.bytes()?,
                replaced: match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes()?),
                    v => {
                        return Err(WireError::InvalidValue {
                            field: "replaced flag",
                            value: u64::from(v),
                        })
                    }
                },
            },
            T_STAGED => ControlMsg::Staged {
                root_hash: r.hash()?,
            },
            T_QUEUED => ControlMsg::Queued {
                position: r.u64()?,
                active: r.u64()?,
                limit: r.u64()?,
            },
            T_FAIL => ControlMsg::Fail {
                code: FailCode::from_u8(r.u8()?)?,
                message: r.string("fail message")?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        if !r.buf.is_empty() {
            return Err(WireError::TrailingBytes(r.buf.len() as u64));
        }
        Ok(msg)
    }
}

fn encode_owner(out: &mut Vec<u8>, owner: &OwnerPolicy) {
    match owner {
        OwnerPolicy::Receiver => out.push(0),
        OwnerPolicy::Apply(rules) => {
            out.push(1);
            out.extend_from_slice(&(rules.len() as u32).to_le_bytes());
            for rule in rules {
                out.push(match rule.kind {
                    IdKind::User => 0,
                    IdKind::Group => 1,
                });
                match rule.from {
                    None => out.push(0),
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id.to_le_bytes());
                    }
                }
                match &rule.to {
                    IdName::Id(id) => {
                        out.push(0);
                        out.extend_from_slice(&id.to_le_bytes());
                    }
                    IdName::Name(name) => {
                        out.push(1);
                        put_bytes(out, name.as_bytes());
                    }
                }
            }
        }
    }
}

fn decode_owner(r: &mut Reader<'_>) -> Result<OwnerPolicy, WireError> {
    let invalid = |field, value: u8| WireError::InvalidValue {
        field,
        value: u64::from(value),
    };
    match r.u8()? {
        0 => Ok(OwnerPolicy::Receiver),
        1 => {
            let n = r.u32()? as usize;
            if n > MAX_OWNER_RULES {
                return Err(WireError::InvalidValue {
                    field: "owner rule count",
                    value: n as u64,
                });
            }
            let mut rules = Vec::with_capacity(n);
            for _ in 0..n {
                let kind = match r.u8()? {
                    0 => IdKind::User,
                    1 => IdKind::Group,
                    v => return Err(invalid("owner rule kind", v)),
                };
                let from = match r.u8()? {
                    0 => None,
                    1 => Some(r.u32()?),
                    v => return Err(invalid("owner rule source", v)),
                };
                let to = match r.u8()? {
                    0 => IdName::Id(r.u32()?),
                    1 => IdName::Name(r.string("owner name")?),
                    v => return Err(invalid("owner rule target", v)),
                };
                rules.push(OwnerRule { kind, from, to });
            }
            Ok(OwnerPolicy::Apply(rules))
        }
        v => Err(invalid("owner policy", v)),
    }
}

fn decode_attrs(r: &mut Reader<'_>) -> Result<Attrs, WireError> {
    let uid = r.u32()?;
    let gid = r.u32()?;
    let n = r.u32()? as usize;
    // Each attribute takes at least 8 bytes: a count beyond what is left is a lie, and
    // must not size an allocation.
    if n > r.buf.len() / 8 {
        return Err(WireError::InvalidValue {
            field: "xattr count",
            value: n as u64,
        });
    }
    let mut xattrs = Vec::with_capacity(n);
    for _ in 0..n {
        xattrs.push((r.bytes()?, r.bytes()?));
    }
    Ok(Attrs { uid, gid, xattrs })
}

/// Checks a control frame's length prefix before its body is read.
pub fn control_frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix);
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::FrameTooLarge(u64::from(len)));
    }
    Ok(len as usize)
}

/// Hash over the manifest entries, in order, as both sides encode them.
#[derive(Default)]
pub struct ManifestHasher {
    hasher: blake3::Hasher,
    /// The entry being hashed, encoded (reused from entry to entry).
    scratch: Vec<u8>,
}

impl ManifestHasher {
    pub fn new() -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"shardxfer/1 manifest");
        ManifestHasher {
            hasher,
            scratch: Vec::with_capacity(256),
        }
    }
    pub fn add(&mut self, entry: &Entry) {
        self.scratch.clear();
        encode_entry_body(entry, &mut self.scratch);
        self.hasher
            .update(&(self.scratch.len() as u64).to_le_bytes());
        self.hasher.update(&self.scratch);
    }
    pub fn finish(&self) -> Hash {
        *self.hasher.finalize().as_bytes()
    }
}

/// Root hash of a transfer: the manifest hash, then every chunk hash in manifest order.
/// Both sides compute it independently; equality means every byte and every entry matched.
pub struct RootHasher(blake3::Hasher);

impl RootHasher {
    pub fn new(manifest_hash: &Hash) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"shardxfer/1 root");
        h.update(manifest_hash);
        RootHasher(h)
    }
    pub fn add_chunk(&mut self, chunk_hash: &Hash) {
        self.0.update(chunk_hash);
    }
    pub fn finish(&self) -> Hash {
        *self.0.finalize().as_bytes()
    }
}

/// The body of an [`ControlMsg::Entry`] frame (type byte included), from a borrowed entry:
/// the manifest of a 200k-entry tree is encoded and hashed without copying its entries.
fn encode_entry_body(e: &Entry, out: &mut Vec<u8>) {
    out.push(if e.attrs.is_some() {
        T_ENTRY_ATTRS
    } else {
        T_ENTRY
    });
    put_bytes(out, &e.path);
    out.push(match e.kind {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
        EntryKind::Hardlink => 3,
    });
    out.extend_from_slice(&e.mode.to_le_bytes());
    out.extend_from_slice(&e.mtime_sec.to_le_bytes());
    out.extend_from_slice(&e.mtime_nsec.to_le_bytes());
    put_u64(out, e.size);
    put_bytes(out, &e.link_target);
    put_u64(out, e.ino);
    out.extend_from_slice(&e.ctime_sec.to_le_bytes());
    out.extend_from_slice(&e.ctime_nsec.to_le_bytes());
    if let Some(a) = &e.attrs {
        out.extend_from_slice(&a.uid.to_le_bytes());
        out.extend_from_slice(&a.gid.to_le_bytes());
        out.extend_from_slice(&(a.xattrs.len() as u32).to_le_bytes());
        for (name, value) in &a.xattrs {
            put_bytes(out, name);
            put_bytes(out, value);
        }
    }
}

/// One [`ControlMsg::Entry`] frame of a borrowed entry, appended to `out`.
pub fn encode_entry_frame(e: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    encode_entry_body(e, out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Lowercase hex of a hash, for logs and summaries.
pub fn hex(hash: &Hash) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `u32` count, then each (chunk, hash) pair (`Have`, `Haves`).
fn put_chunk_hashes(out: &mut Vec<u8>, chunks: &[(u64, Hash)]) {
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for (chunk, hash) in chunks {
        put_u64(out, *chunk);
        out.extend_from_slice(hash);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                needed: (n - self.buf.len()) as u64,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A `u32` count (at most `limit`, else `field` is invalid) of (chunk, hash) pairs.
    fn chunk_hashes(
        &mut self,
        limit: usize,
        field: &'static str,
    ) -> Result<Vec<(u64, Hash)>, WireError> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(WireError::InvalidValue {
                field,
                value: n as u64,
            });
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            chunks.push((self.u64()?, self.hash()?));
        }
        Ok(chunks)
    }

    fn hash(&mut self) -> Result<Hash, WireError> {
        self.array()
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::InvalidValue {
                field,
                value: u64::from(v),
            }),
        }
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?).map_err(|_| WireError::BadUtf8 { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>()
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            prop_oneof![
                Just(EntryKind::File),
                Just(EntryKind::Dir),
                Just(EntryKind::Symlink),
                Just(EntryKind::Hardlink)
            ],
            any::<u32>(),
            any::<i64>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..32),
            any::<u64>(),
            any::<i64>(),
            any::<u32>(),
            proptest::option::of(arb_attrs()),
        )
            .prop_map(
                |(path, kind, mode, ms, mn, size, link_target, ino, cs, cn, attrs)| Entry {
                    path,
                    kind,
                    mode,
                    mtime_sec: ms,
                    mtime_nsec: mn,
                    size,
                    link_target,
                    ino,
                    ctime_sec: cs,
                    ctime_nsec: cn,
                    attrs,
                },
            )
    }

    fn arb_attrs() -> impl Strategy<Value = Attrs> {
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..20),
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..4,
            ),
        )
            .prop_map(|(uid, gid, xattrs)| Attrs { uid, gid, xattrs })
    }

    fn arb_owner() -> impl Strategy<Value = OwnerPolicy> {
        let rule = (
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            prop_oneof![
                any::<u32>().prop_map(IdName::Id),
                "[a-z]{1,12}".prop_map(IdName::Name)
            ],
        )
            .prop_map(|(group, from, to)| OwnerRule {
                kind: if group { IdKind::Group } else { IdKind::User },
                from,
                to,
            });
        prop_oneof![
            Just(OwnerPolicy::Receiver),
            proptest::collection::vec(rule, 0..4).prop_map(OwnerPolicy::Apply)
        ]
    }

    fn arb_msg() -> impl Strategy<Value = ControlMsg> {
        prop_oneof![
            (
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..40),
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                ".{0,20}",
                any::<bool>(),
                arb_owner(),
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..3),
                proptest::collection::vec(any::<u8>(), 0..64),
            )
                .prop_map(
                    |(version, dest, file, cs, ec, tb, resume, info, git, owner, links, ticket)| {
                        ControlMsg::Hello(Hello {
                            version,
                            dest,
                            root_kind: if file { RootKind::File } else { RootKind::Dir },
                            chunk_size: cs,
                            entry_count: ec,
                            total_bytes: tb,
                            resume,
                            install: !resume || file,
                            sender_info: info,
                            // Older versions have no git flag: it decodes as false.
                            git: git && version >= GIT_FLAG_SINCE_VERSION,
                            owner: if version >= OWNER_SINCE_VERSION {
                                owner
                            } else {
                                OwnerPolicy::Receiver
                            },
                            external_links: if version >= EXTERNAL_LINKS_SINCE_VERSION {
                                links
                            } else {
                                Vec::new()
                            },
                            ticket: if version >= TICKET_SINCE_VERSION {
                                ticket
                            } else {
                                Vec::new()
                            },
                        })
                    }
                ),
            arb_entry().prop_map(ControlMsg::Entry),
            arb_hash().prop_map(|h| ControlMsg::ManifestEnd { manifest_hash: h }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), arb_hash()), 0..20)
            )
                .prop_map(|(file, chunks)| ControlMsg::Have { file, chunks }),
            proptest::collection::vec(
                (
                    any::<u64>(),
                    proptest::collection::vec((any::<u64>(), arb_hash()), 0..5)
                ),
                0..6
            )
            .prop_map(|files| ControlMsg::Haves { files }),
            any::<u64>().prop_map(|v| ControlMsg::Accept { verified_bytes: v }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| {
                ControlMsg::Progress {
                    verified_chunks: a,
                    verified_bytes: b,
                    wire_bytes: c,
                }
            }),
            (any::<u64>(), any::<u64>(), ".{0,30}").prop_map(|(file, chunk, reason)| {
                ControlMsg::Retry {
                    file,
                    chunk,
                    reason,
                }
            }),
            arb_hash().prop_map(|h| ControlMsg::Done { root_hash: h }),
            arb_hash().prop_map(|h| ControlMsg::Staged { root_hash: h }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(position, active, limit)| {
                ControlMsg::Queued {
                    position,
                    active,
                    limit,
                }
            }),
            (
                arb_hash(),
                proptest::collection::vec(any::<u8>(), 0..30),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..30))
            )
                .prop_map(|(root_hash, path, replaced)| ControlMsg::Installed {
                    root_hash,
                    path,
                    replaced
                }),
            (1u8..=7, ".{0,30}").prop_map(|(c, message)| ControlMsg::Fail {
                code: FailCode::from_u8(c).expect("valid code"),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn control_round_trip(msg in arb_msg()) {
            let mut frame = Vec::new();
            msg.encode_frame(&mut frame);
            let len = control_frame_len(frame[..4].try_into().unwrap()).unwrap();
            prop_assert_eq!(len, frame.len() - 4);
            prop_assert_eq!(ControlMsg::decode_body(&frame[4..]).unwrap(), msg);
        }

        #[test]
        fn control_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ControlMsg::decode_body(&bytes);
        }

        #[test]
        fn truncated_control_is_an_error(msg in arb_msg(), cut in any::<prop::sample::Index>()) {
            let mut body = Vec::new();
            msg.encode_body(&mut body);
            let cut = cut.index(body.len());
            prop_assert!(ControlMsg::decode_body(&body[..cut]).is_err());
        }

        #[test]
        fn chunk_header_round_trip(
            file in any::<u64>(), chunk in any::<u64>(), offset in any::<u64>(),
            raw_len in any::<u64>(), codec in 0u8..3, payload_len in any::<u64>(), hash in arb_hash()
        ) {
            let h = ChunkHeader { file, chunk, offset, raw_len, codec: Codec::from_u8(codec).unwrap(), payload_len, hash };
            prop_assert_eq!(ChunkHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn chunk_header_decode_never_panics(bytes in any::<[u8; ChunkHeader::LEN]>()) {
            let _ = ChunkHeader::decode(&bytes);
        }
    }

    #[test]
    fn frame_length_limits() {
        assert_eq!(control_frame_len([0; 4]), Err(WireError::EmptyFrame));
        assert!(matches!(
            control_frame_len((MAX_CONTROL_FRAME + 1).to_le_bytes()),
            Err(WireError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = Vec::new();
        ControlMsg::Accept { verified_bytes: 1 }.encode_body(&mut body);
        body.push(0);
        assert_eq!(
            ControlMsg::decode_body(&body),
            Err(WireError::TrailingBytes(1))
        );
    }

    #[test]
    fn alpn_ids_name_the_versions_a_connection_speaks() {
        assert_eq!(
            PROTOCOL_VERSION, 7,
            "the ids below are those of release 0.2.0"
        );
        assert_eq!(
            offered_alpn_ids(),
            [b"shardxfer/7".to_vec(), b"shardxfer/1".to_vec()]
        );
        let current = Negotiated::from_alpn(Some(b"shardxfer/7")).unwrap();
        assert_eq!((current.version, current.serves), (7, 7..=7));
        // The previous release's id covers every version before negotiation existed.
        for alpn in [Some(LEGACY_ALPN), None] {
            let legacy = Negotiated::from_alpn(alpn).unwrap();
            assert_eq!((legacy.version, legacy.serves), (6, 1..=6));
        }
        for unknown in [
            &b"shardxfer/8"[..],
            b"shardxfer/0",
            b"shardxfer/x",
            b"h3",
            b"",
        ] {
            assert_eq!(Negotiated::from_alpn(Some(unknown)), None, "{unknown:?}");
        }
    }

    #[test]
    fn a_newer_senders_hello_decodes_to_its_version() {
        let hello = Hello {
            version: PROTOCOL_VERSION + 1,
            dest: b"r.git".to_vec(),
            ..Hello::default()
        };
        let mut body = Vec::new();
        ControlMsg::Hello(hello.clone()).encode_body(&mut body);
        body.extend_from_slice(b"fields of a later version");
        assert_eq!(ControlMsg::decode_body(&body), Ok(ControlMsg::Hello(hello)));
    }

    #[test]
    fn git_flag_travels_from_version_3_only() {
        for (version, git, len) in [(2u16, false, 0usize), (3, true, 1)] {
            let hello = Hello {
                version,
                git,
                ..Hello::default()
            };
            let mut body = Vec::new();
            ControlMsg::Hello(hello.clone()).encode_body(&mut body);
            let mut v2 = Vec::new();
            ControlMsg::Hello(Hello {
                version: 2,
                ..hello.clone()
            })
            .encode_body(&mut v2);
            assert_eq!(body.len(), v2.len() + len);
            assert_eq!(ControlMsg::decode_body(&body), Ok(ControlMsg::Hello(hello)));
        }
    }

    #[test]
    fn an_entrys_attributes_are_part_of_its_encoding_and_so_of_the_manifest_hash() {
        let plain = Entry {
            path: b"hooks/pre-receive".to_vec(),
            ..Entry::default()
        };
        let owned = |uid, xattrs: Vec<(Vec<u8>, Vec<u8>)>| Entry {
            attrs: Some(Attrs {
                uid,
                gid: 1000,
                xattrs,
            }),
            ..plain.clone()
        };
        let hash = |e: &Entry| {
            let mut h = ManifestHasher::new();
            h.add(e);
            h.finish()
        };
        let label = vec![(
            b"security.selinux".to_vec(),
            b"system_u:object_r:git_data_t:s0".to_vec(),
        )];
        let all = [
            plain.clone(),
            owned(1000, Vec::new()),
            owned(1001, Vec::new()),
            owned(1000, label),
        ];
        for (i, a) in all.iter().enumerate() {
            let mut body = Vec::new();
            ControlMsg::Entry(a.clone()).encode_body(&mut body);
            assert_eq!(body[0], if i == 0 { T_ENTRY } else { T_ENTRY_ATTRS });
            assert_eq!(
                ControlMsg::decode_body(&body),
                Ok(ControlMsg::Entry(a.clone()))
            );
            for b in &all[i + 1..] {
                assert_ne!(hash(a), hash(b));
            }
        }
    }

    #[test]
    fn a_lying_xattr_count_allocates_nothing() {
        let mut body = Vec::new();
        ControlMsg::Entry(Entry {
            attrs: Some(Attrs::default()),
            ..Entry::default()
        })
        .encode_body(&mut body);
        let count_at = body.len() - 4;
        body[count_at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ControlMsg::decode_body(&body),
            Err(WireError::InvalidValue {
                field: "xattr count",
                ..
            })
        ));
    }

    #[test]
    fn largest_have_frame_fits_the_cap() {
        let msg = ControlMsg::Have {
            file: u64::MAX,
            chunks: vec![(u64::MAX, [0xff; 32]); MAX_HAVE_PER_FRAME],
        };
        let mut frame = Vec::new();
        msg.encode_frame(&mut frame);
        assert!(frame.len() - 4 <= MAX_CONTROL_FRAME as usize);
        // The batched form at its limits: as many files as chunks, one chunk each.
        let msg = ControlMsg::Haves {
            files: vec![(u64::MAX, vec![(u64::MAX, [0xff; 32])]); MAX_HAVE_PER_FRAME],
        };
        let mut frame = Vec::new();
        msg.encode_frame(&mut frame);
        assert!(frame.len() - 4 <= MAX_CONTROL_FRAME as usize);
        assert_eq!(ControlMsg::decode_body(&frame[4..]).unwrap(), msg);
        // One chunk more in all is refused.
        let msg = ControlMsg::Haves {
            files: vec![
                (1, vec![(0, [1; 32]); MAX_HAVE_PER_FRAME]),
                (2, vec![(0, [1; 32])]),
            ],
        };
        let mut frame = Vec::new();
        msg.encode_frame(&mut frame);
        assert!(ControlMsg::decode_body(&frame[4..]).is_err());
    }
}
