//! The receiver's staging area: where a transfer's bytes land until they are verified,
//! fsynced and installed, and the journal that makes `--resume` cheap.
//!
//! Layout, per destination (`KEY` = first 32 hex digits of BLAKE3(dest name)):
//! ```text
//! ROOT/.shardrecv/KEY/lock      flock'ed while a transfer runs (one writer per destination,
//!                               even across two daemons on one root)
//! ROOT/.shardrecv/KEY/journal   format magic (SXJRNL02: format 2), manifest hash, the manifest
//!                               of the current attempt, then one 48-byte record per verified
//!                               chunk
//! ROOT/.shardrecv/KEY/tree      the staged tree (or file)
//! ROOT/.shardrecv/KEY/settled   after a pre-copy: the manifest hash and owner rules whose
//!                               metadata every staged file already has ([`Staging::settle`])
//! ```
//! (Format 1 kept the manifest in a separate `state` file; a resume still reads it.)
//!
//! Versions: the journal's magic carries its format (`SXJRNL` + two digits). A receiver reads
//! its own format and every earlier one; a journal of a later format (a downgrade after a
//! newer release staged it) is named in a warning and the transfer starts afresh, which loses
//! only the resumed bytes, never data. The manifest inside is in the wire codec with the
//! `Hello` version of the release that wrote it; a decoder reads a newer `Hello` as far as
//! it knows it ([`crate::wire`]), so releases one apart resume each other's journals (tested
//! against the previous release's binaries in `transfer/tests/compat.rs`).
//! Invariants:
//! - nothing is written outside `ROOT/.shardrecv/` until [`Staging::install`];
//! - a journal record is appended only after its chunk's bytes were written and hashed equal
//!   to the sender's hash, so after `kill -9` every record describes bytes on disk (the page
//!   cache survives a process kill; the final `syncfs` makes them durable before install);
//! - the journal header names the manifest hash; a journal of another manifest is ignored;
//! - on resume, verified chunks carry over only for files whose source version (size,
//!   mtime, inode, ctime) is unchanged, or, when the sender says the tree is a git directory,
//!   for git's content-addressed files of the same path and size, whatever their times
//!   ([`same_source_version`]); other files are re-sent whole, never spliced;
//! - install never deletes or overwrites: an existing target is renamed to
//!   `NAME.replaced-<unix-time>` first;
//! - a pre-copy's end gives every staged file its final metadata (mode, mtime, xattrs,
//!   owner), outside the read-only window, and says so in `settled`; the next prepare trusts
//!   that only for files it carries over whose metadata in the new manifest is the same, and
//!   removes `settled` before it changes anything, so the install (inside the window) applies
//!   metadata only to what changed (a 200k-entry repository: every inode re-written and
//!   synced otherwise);
//! - a `kill -9` at any point of [`Staging::prepare`] loses no staged file: the journal
//!   (manifest and records together) switches to the new attempt in one rename, naming only
//!   carried files, before the tree is fixed up in place around them; carried files are
//!   never moved or written (format 1 moved them into a `tree.new` that the next prepare
//!   deleted, and could name truncated files in a journal it had not yet replaced).

use foldhash::{HashMap, HashMapExt};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::gitdir::same_source_version;
use crate::manifest::{Manifest, STAGING_DIR_NAME};
use crate::owner::{check_can_give, Me, Resolved};
use crate::phases::Phases;
use crate::tracker::ChunkTracker;
use crate::wire::{
    ControlMsg, Entry, EntryKind, Hash, Hello, ManifestHasher, OwnerPolicy, RootKind,
};

/// The journal (manifest and records in one file), format 2.
const JOURNAL_MAGIC: &[u8; 8] = b"SXJRNL02";
/// What every format's magic starts with; two digits of format number follow.
const JOURNAL_MAGIC_PREFIX: &[u8; 6] = b"SXJRNL";
/// Before it: records only, the manifest in a separate `state` file (still read on resume).
const LEGACY_JOURNAL_MAGIC: &[u8; 8] = b"SXJRNL01";
const LEGACY_STATE_MAGIC: &[u8; 8] = b"SXSTATE1";
const RECORD_LEN: usize = 8 + 8 + 32;

/// Staging directory of a destination.
pub fn staging_dir(root: &Path, dest: &[u8]) -> PathBuf {
    let key = blake3::hash(dest).to_hex();
    root.join(STAGING_DIR_NAME).join(&key.as_str()[..32])
}

/// Where the receiver records the root hash (hex) of the tree it installed at `dest`: what a
/// `replace` ticket is checked against ([`crate::ticket::Grant::Replace`]).
pub fn installed_root_file(root: &Path, dest: &[u8]) -> PathBuf {
    let key = blake3::hash(dest).to_hex();
    root.join(crate::manifest::INSTALLED_ROOTS_DIR_NAME)
        .join(&key.as_str()[..32])
}

/// Whether anything is at `dest` under `root`, and the root hash recorded for it, if any.
pub fn installed_root(root: &Path, dest: &[u8]) -> (bool, Option<String>) {
    let exists = fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(dest))).is_ok();
    let recorded = fs::read_to_string(installed_root_file(root, dest))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    (exists, recorded.filter(|_| exists))
}

/// Forgets the root recorded for `dest` (before an install replaces the tree: a crash
/// between the two then leaves no record, never a stale one).
pub fn forget_installed_root(root: &Path, dest: &[u8]) -> Result<(), Error> {
    remove_any(&installed_root_file(root, dest))
}

/// Records `root_hash` as the root of the tree just installed at `dest`.
pub fn record_installed_root(root: &Path, dest: &[u8], root_hash: &Hash) -> Result<(), Error> {
    let file = installed_root_file(root, dest);
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    write_atomically(&file, crate::wire::hex(root_hash).as_bytes())
}

/// Why staging could not be prepared.
#[derive(Debug)]
pub enum PrepareError {
    /// Another process holds the destination's lock.
    Busy,
    /// Not enough free space.
    NoSpace {
        needed: u64,
        available: u64,
    },
    /// The sender asked for something this receiver cannot do (an owner it may not give
    /// files to, a user it does not have).
    Refused(String),
    Io(Error),
}

impl From<Error> for PrepareError {
    fn from(e: Error) -> Self {
        PrepareError::Io(e)
    }
}

/// An open staging area, locked for one transfer.
pub struct Staging {
    pub dir: PathBuf,
    root: PathBuf,
    dest: PathBuf,
    tree: PathBuf,
    journal: File,
    /// Who gets the installed files; `None`: the receiver's user ([`crate::owner`]).
    owner: Option<Resolved>,
    /// Per manifest entry: a carried file that already has its final metadata
    /// ([`Staging::settle`]), which the install leaves alone.
    settled: Vec<bool>,
    _lock: File,
}

/// What the sender asked of staging and install, from its `Hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Keep what an earlier attempt verified.
    pub resume: bool,
    /// Git's carry-over rules ([`same_source_version`]).
    pub git: bool,
    /// Who should own the installed files.
    pub owner: OwnerPolicy,
}

impl Request {
    pub fn of(hello: &Hello) -> Request {
        Request {
            resume: hello.resume,
            git: hello.git,
            owner: hello.owner.clone(),
        }
    }
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c is a valid C string, st points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn path_of(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(std::ffi::OsStr::from_bytes(rel))
    }
}

impl Staging {
    /// Locks and prepares staging for `manifest`, carrying over verified chunks from an
    /// earlier attempt when `resume` is set (with git's rules when `git`). Fills `tracker`
    /// with what is already verified.
    ///
    /// **Crash-safe at every step** (see the module doc): the new journal, naming only the
    /// chunks of files that carry over, replaces the old one in one rename *before* the tree
    /// is touched, and the tree is then fixed up in place, never touching a carried file. A
    /// kill anywhere leaves either the old journal and an untouched tree, or the new
    /// journal and a tree whose carried files are intact; either way the next prepare
    /// carries them over again.
    pub fn prepare(
        root: &Path,
        dest: &[u8],
        manifest: &Manifest,
        request: &Request,
    ) -> Result<(Staging, ChunkTracker), PrepareError> {
        Self::prepare_after(root, dest, manifest, request, None)
    }

    /// [`Staging::prepare`], given what this process remembers of the destination's
    /// previous attempt ([`Previous::remember`]): used instead of reading the journal back
    /// when the journal is still the one that attempt left ([`Previous::still_on_disk`]).
    pub fn prepare_after(
        root: &Path,
        dest: &[u8],
        manifest: &Manifest,
        request: &Request,
        remembered: Option<Arc<Previous>>,
    ) -> Result<(Staging, ChunkTracker), PrepareError> {
        let Request { resume, git, .. } = *request;
        let mut phases = Phases::start();
        // Refused before anything is written, let alone sent.
        let owner = Resolved::resolve(&request.owner).map_err(PrepareError::Refused)?;
        if let Some(owner) = &owner {
            check_can_give(owner, &manifest.entries, &Me::current())
                .map_err(PrepareError::Refused)?;
        }
        let dir = staging_dir(root, dest);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(PrepareError::Busy),
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e).into()),
        }
        let tree = dir.join("tree");
        // What an earlier attempt verified, if it may be reused: remembered, or read back.
        let earlier: Arc<Previous> = match remembered {
            _ if !resume => Arc::default(),
            Some(p) if p.chunk_size == manifest.chunk_size && p.still_on_disk(&dir) => p,
            _ => Arc::new(load_previous(&dir, manifest.chunk_size).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the earlier attempt's journal is unusable; starting afresh");
                Previous::default()
            })),
        };
        let previous = earlier.manifest_hash;
        let carried: HashMap<&[u8], usize> = earlier
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_slice(), i))
            .collect();
        phases.mark("previous journal");
        // Whether the earlier attempt's files all have that attempt's final metadata.
        let settled_record = settled_record(previous, &owner);
        let was_settled = settled_record
            .as_ref()
            .is_some_and(|r| fs::read(dir.join("settled")).is_ok_and(|on_disk| on_disk == *r));
        let mut settled = vec![false; manifest.entries.len()];
        // What the staged tree holds: what carries over, what the fix-up below prunes and which
        // directories exist. A settled tree is the earlier manifest's directories and files,
        // exactly (nothing touches it between the pre-copy's settle and this prepare, which
        // removes the mark before it changes anything), so it is not walked: a 200k-file walk
        // is ~0.45 s of a final pass inside the read-only window. Any other tree is read once
        // (one directory walk with an `fstatat` per file).
        // The earlier entry at each new entry's path.
        let old_of_new: Vec<Option<usize>> = manifest
            .entries
            .iter()
            .map(|e| carried.get(e.path.as_slice()).copied())
            .collect();
        let tree_is_dir = fs::symlink_metadata(&tree).is_ok_and(|m| m.is_dir());
        let staged_tree = match manifest.root_kind {
            RootKind::Dir if tree_is_dir && was_settled => StagedTree::Settled {
                earlier: &earlier.entries,
                old_of_new: &old_of_new,
            },
            RootKind::Dir if tree_is_dir => StagedTree::Walked(Listing::of(&tree)?),
            _ => StagedTree::Walked(Listing::default()),
        };
        phases.mark("staged tree listed");
        // Files that carry over: the same source version, and the staged file is there.
        let staged_size = |i: usize, e: &Entry| match manifest.root_kind {
            RootKind::File => fs::symlink_metadata(&tree)
                .ok()
                .filter(|m| m.file_type().is_file())
                .map(|m| m.len()),
            RootKind::Dir => staged_tree.file_size(i, e),
        };
        let mut reused: Vec<Option<&[(u64, Hash)]>> = vec![None; manifest.entries.len()];
        for (i, e) in manifest.entries.iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            let Some(old) = old_of_new[i] else {
                continue;
            };
            let (old, chunks) = (&earlier.entries[old], &earlier.chunks[old]);
            let staged = staged_size(i, e) == Some(e.size);
            if staged && same_source_version(old, e, git) {
                reused[i] = Some(chunks);
                settled[i] = was_settled && same_metadata(old, e);
            }
        }
        let reused_bytes: u64 = manifest
            .entries
            .iter()
            .zip(&reused)
            .filter(|(_, r)| r.is_some())
            .map(|(e, _)| e.size)
            .sum();
        phases.mark("carried files matched");
        // Space: what is not already staged must fit. Checked before any allocation sized
        // by the (untrusted) manifest, which therefore cannot exceed the disk.
        let needed = manifest.total_bytes.saturating_sub(reused_bytes);
        let available = available_bytes(&dir).map_err(io_err(&dir))?;
        if needed > available {
            drop(lock);
            let _ = fs::remove_dir_all(&dir);
            return Err(PrepareError::NoSpace { needed, available });
        }
        let mut tracker = ChunkTracker::new(manifest);
        let mut records: Vec<(u64, u64, Hash)> = Vec::new();
        for (i, chunks) in reused.iter().enumerate() {
            for (chunk, hash) in chunks.unwrap_or_default() {
                if tracker.mark_verified(i as u64, *chunk, *hash) {
                    records.push((i as u64, *chunk, *hash));
                }
            }
        }

        // 1. The new journal (manifest + carried chunks) replaces the old one at once; the
        //    settled mark, which names the old manifest, goes first.
        crash_point()?;
        remove_any(&dir.join("settled"))?;
        let jpath = dir.join("journal");
        crash_point()?;
        // Not fsynced: like the records appended to it, the journal is made durable by the
        // install's syncfs; a process killed keeps it (the page cache), and a machine that
        // loses it resumes afresh. An fsync of a 200k-entry journal (~20 MB) here would sit
        // inside a final pass's read-only window.
        phases.mark("chunks vouched for");
        replace_file(&jpath, &encode_journal(manifest, &records), false)?;
        phases.mark("journal written");
        // Left by earlier versions: a separate manifest file, and a tree being rebuilt
        // beside the staged one (whose moved files that version's journal no longer found).
        for legacy in ["state", "tree.new"] {
            crash_point()?;
            remove_any(&dir.join(legacy))?;
        }
        // 2. The tree, fixed up in place around the carried files.
        match manifest.root_kind {
            RootKind::File => {
                if reused.first().is_none_or(|r| r.is_none()) {
                    crash_point()?;
                    remove_any(&tree)?;
                    create_sized(&tree, manifest.entries.first().map_or(0, |e| e.size))?;
                }
            }
            RootKind::Dir => {
                if !fs::symlink_metadata(&tree).is_ok_and(|m| m.is_dir()) {
                    crash_point()?;
                    remove_any(&tree)?;
                    fs::create_dir(&tree).map_err(io_err(&tree))?;
                }
                // Kept: the new manifest's directories, and the files that carry over.
                let kept = |i: usize| match manifest.entries[i].kind {
                    EntryKind::Dir => true,
                    EntryKind::File => reused[i].is_some(),
                    _ => false,
                };
                staged_tree.prune(&tree, &manifest.entries, kept)?;
                for (i, e) in manifest.entries.iter().enumerate().skip(1) {
                    match e.kind {
                        // A staged directory the manifest has is kept by the prune.
                        EntryKind::Dir if !staged_tree.is_dir(i, e) => {
                            let p = path_of(&tree, &e.path);
                            if !p.is_dir() {
                                crash_point()?;
                                fs::create_dir(&p).map_err(io_err(&p))?;
                            }
                        }
                        EntryKind::File if reused[i].is_none() => {
                            create_sized(&path_of(&tree, &e.path), e.size)?
                        }
                        // Links are made at install time.
                        _ => {}
                    }
                }
            }
        }
        let journal = OpenOptions::new()
            .append(true)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        phases.mark("tree fixed up");
        phases.log("staging prepared", manifest.entries.len());
        Ok((
            Staging {
                dir,
                root: root.to_path_buf(),
                dest: PathBuf::from(std::ffi::OsStr::from_bytes(dest)),
                tree,
                journal,
                owner,
                settled,
                _lock: lock,
            },
            tracker,
        ))
    }

    /// A pre-copy's end (the tree verified and kept staged): gives every staged file its
    /// final metadata now, while the repository is still live, and records for which manifest
    /// and owner rules ([`settled_record`]), so that the final pass's install touches only
    /// the files that changed. Directories and links are left to the install (their entries
    /// and times change as the final pass fixes the tree up).
    pub fn settle(&mut self, manifest: &Manifest) -> Result<(), Error> {
        let mark = self.dir.join("settled");
        remove_any(&mark)?;
        for (i, e) in manifest.entries.iter().enumerate() {
            if e.kind == EntryKind::File && !self.settled.get(i).copied().unwrap_or(false) {
                self.apply_metadata(&self.entry_path(manifest, i), e)?;
            }
        }
        if let Some(record) = settled_record(Some(manifest.manifest_hash), &self.owner) {
            write_atomically(&mark, &record)?;
        }
        self.settled = manifest
            .entries
            .iter()
            .map(|e| e.kind == EntryKind::File)
            .collect();
        Ok(())
    }

    /// How many files the install will leave alone (settled by a pre-copy and unchanged).
    pub fn settled_files(&self) -> u64 {
        self.settled.iter().filter(|s| **s).count() as u64
    }

    /// Path of entry `entry` inside the staged tree.
    pub fn entry_path(&self, manifest: &Manifest, entry: usize) -> PathBuf {
        if manifest.root_kind == RootKind::File {
            self.tree.clone()
        } else {
            path_of(&self.tree, &manifest.entries[entry].path)
        }
    }

    /// Writes a verified chunk's bytes at `offset` of staged file `path`.
    pub fn write_chunk(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        f.write_all_at(data, offset)
    }

    /// Makes `[offset, offset + len)` of staged file `path` read as zeros, as a hole when the
    /// file system can punch one.
    pub fn zero_range(path: &Path, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let f = OpenOptions::new().write(true).open(path)?;
        // SAFETY: fallocate on a valid fd; offsets are checked against the manifest.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Appends a journal record; called only after the chunk's bytes are written.
    pub fn journal_append(&mut self, file: u64, chunk: u64, hash: &Hash) -> io::Result<()> {
        let mut rec = [0u8; RECORD_LEN];
        rec[..8].copy_from_slice(&file.to_le_bytes());
        rec[8..16].copy_from_slice(&chunk.to_le_bytes());
        rec[16..].copy_from_slice(hash);
        self.journal.write_all(&rec)
    }

    /// Makes the staged tree durable and applies final metadata, then installs it as
    /// `ROOT/DEST`, moving an existing target aside. Returns (installed, replaced) paths.
    pub fn install(self, manifest: &Manifest) -> Result<(PathBuf, Option<PathBuf>), Error> {
        // Links first; then each entry's metadata ([`Staging::apply_metadata`]) but for files
        // a pre-copy settled, directories deepest-first and last (creating entries inside a
        // directory changes its mtime). A hardlink shares its first path's inode, and so
        // everything but its name.
        tracing::debug!(
            settled = self.settled_files(),
            entries = manifest.entries.len(),
            "install: files whose metadata a pre-copy already applied are left alone"
        );
        let mut phases = Phases::start();
        for (i, e) in manifest.entries.iter().enumerate() {
            let p = self.entry_path(manifest, i);
            match e.kind {
                EntryKind::Symlink => {
                    remove_any(&p)?;
                    symlink(std::ffi::OsStr::from_bytes(&e.link_target), &p).map_err(io_err(&p))?;
                    self.apply_metadata(&p, e)?;
                }
                EntryKind::Hardlink => {
                    remove_any(&p)?;
                    let first = path_of(&self.tree, &e.link_target);
                    fs::hard_link(&first, &p).map_err(io_err(&p))?;
                }
                EntryKind::File if self.settled.get(i).copied().unwrap_or(false) => {}
                EntryKind::File => self.apply_metadata(&p, e)?,
                EntryKind::Dir => {}
            }
        }
        for (i, e) in manifest.entries.iter().enumerate().rev() {
            if e.kind == EntryKind::Dir {
                self.apply_metadata(&self.entry_path(manifest, i), e)?;
            }
        }
        phases.mark("metadata applied");
        // One syncfs makes every staged byte and inode durable: far cheaper than an fsync
        // per file on trees of 100k loose objects.
        syncfs(&self.dir).map_err(io_err(&self.dir))?;
        phases.mark("synced");

        let target = self.root.join(&self.dest);
        let parent = target
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        // A kill from here on leaves the verified tree and its journal in staging: a resumed
        // transfer sends nothing and installs it (crate::failpoint has the cases).
        crate::failpoint::hit("install-before-rename");
        let replaced = match fs::symlink_metadata(&target) {
            Ok(_) => {
                let aside = aside_name(&target);
                fs::rename(&target, &aside).map_err(io_err(&target))?;
                crate::failpoint::hit("install-moved-aside");
                Some(aside)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&target, e)),
        };
        fs::rename(&self.tree, &target).map_err(io_err(&target))?;
        fsync_dir(&parent).map_err(io_err(&parent))?;
        phases.mark("renamed into place");
        let dir = self.dir.clone();
        drop(self);
        let _ = fs::remove_dir_all(&dir);
        phases.mark("staging removed");
        phases.log("installed", manifest.entries.len());
        Ok((target, replaced))
    }

    /// Gives staged entry `p` the metadata of `e`, without following a symlink and without
    /// opening it (a file given away may no longer be ours to open): extended attributes,
    /// mode, mtime, all as its owner (still us), then the owner the sender asked for (if it
    /// asked: [`crate::owner`]) last, so that giving it away cannot stop us finishing it.
    /// `chown` clears set-id bits and file capabilities, which are then put back.
    fn apply_metadata(&self, p: &Path, e: &Entry) -> Result<(), Error> {
        let symlink = e.kind == EntryKind::Symlink;
        let mode = fs::Permissions::from_mode(e.mode & 0o7777);
        if let Some(attrs) = &e.attrs {
            set_xattrs(p, &attrs.xattrs)?;
        }
        if !symlink {
            fs::set_permissions(p, mode.clone()).map_err(io_err(p))?;
        }
        set_mtime(p, e).map_err(io_err(p))?;
        let (Some(owner), Some(attrs)) = (&self.owner, &e.attrs) else {
            return Ok(());
        };
        let (uid, gid) = owner.map(attrs);
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|err| {
            Error::Other(format!(
                "{}: cannot give it to uid {uid} gid {gid}: {err}",
                p.display()
            ))
        })?;
        if !symlink && e.mode & 0o6000 != 0 {
            fs::set_permissions(p, mode).map_err(io_err(p))?;
            // Without CAP_FSETID the kernel drops set-gid silently: say so instead.
            let now = fs::symlink_metadata(p)
                .map_err(io_err(p))?
                .permissions()
                .mode();
            if now & 0o7777 != e.mode & 0o7777 {
                return Err(Error::Other(format!(
                    "{}: mode {:o} after giving it to uid {uid} gid {gid}, not {:o} (set-id \
                     bits need CAP_FSETID)",
                    p.display(),
                    now & 0o7777,
                    e.mode & 0o7777
                )));
            }
        }
        let capability = attrs
            .xattrs
            .iter()
            .find(|(name, _)| name == b"security.capability");
        if let Some((name, value)) = capability {
            xattr::set(p, std::ffi::OsStr::from_bytes(name), value).map_err(|err| {
                Error::Other(format!(
                    "{}: cannot set security.capability again after chown: {err}",
                    p.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Removes this staging area entirely (disk full: give the space back).
    pub fn discard(self) {
        let dir = self.dir.clone();
        drop(self);
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove staging");
        }
    }
}

/// Gives `p` (itself, not a symlink's target) exactly the extended attributes `xattrs`.
/// Stale `user.*`/`trusted.*` attributes (left by an earlier install attempt of a carried
/// file) are removed; `security.*` and `system.*` ones the sender did not send are the
/// receiver system's own (an SELinux label given at creation, an inherited ACL) and stay.
fn set_xattrs(p: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), Error> {
    let failed = |what: &str, name: &[u8], err: io::Error| {
        Error::Other(format!(
            "{}: cannot {what} extended attribute {}: {err}",
            p.display(),
            String::from_utf8_lossy(name)
        ))
    };
    let unsupported = |err: &io::Error| err.raw_os_error() == Some(libc::EOPNOTSUPP);
    match xattr::list(p) {
        Ok(names) => {
            for name in names {
                let name = name.as_bytes();
                let stale = (name.starts_with(b"user.") || name.starts_with(b"trusted."))
                    && !xattrs.iter().any(|(n, _)| n == name);
                if stale {
                    xattr::remove(p, std::ffi::OsStr::from_bytes(name))
                        .map_err(|err| failed("remove stale", name, err))?;
                }
            }
        }
        Err(err) if unsupported(&err) && xattrs.is_empty() => return Ok(()),
        Err(err) => return Err(failed("list", b"", err)),
    }
    for (name, value) in xattrs {
        xattr::set(p, std::ffi::OsStr::from_bytes(name), value)
            .map_err(|err| failed("set", name, err))?;
    }
    Ok(())
}

/// Sets `p`'s mtime (not a symlink target's), leaving its atime.
fn set_mtime(p: &Path, e: &Entry) -> io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: e.mtime_sec as libc::time_t,
            tv_nsec: i64::from(e.mtime_nsec.min(999_999_999)) as libc::c_long,
        },
    ];
    // SAFETY: valid C string and a pointer to two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn syncfs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    // SAFETY: syncfs on a valid open fd.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// `NAME.replaced-<unix-time>`, with `-N` appended if that exists already.
fn aside_name(target: &Path) -> PathBuf {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.replaced-{now}", target.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while fs::symlink_metadata(&candidate).is_ok() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

fn remove_any(p: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err(p)),
        Ok(_) => fs::remove_file(p).map_err(io_err(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace_file(path, bytes, true)
}

/// Replaces `path` with `bytes` in one rename (a reader sees the old or the new content),
/// fsynced first when `durable`.
fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| if durable { f.sync_all() } else { Ok(()) })
        .map_err(io_err(&tmp))?;
    crash_point()?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Creates (or truncates) a staged file of `size` bytes, to be filled by chunks.
fn create_sized(path: &Path, size: u64) -> Result<(), Error> {
    crash_point()?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))
}

/// Removes from the staged directory `dir` (at relative path `rel`) everything the new
/// manifest does not keep: `keep` maps a path to `true` for a directory (kept, and pruned
/// in turn) or `false` for a carried file (kept as it is).
/// What the staged tree holds, as prepare's carry-over and fix-up ask it of each entry `i` of
/// the new manifest.
enum StagedTree<'a> {
    /// Read from disk.
    Walked(Listing),
    /// A settled tree: exactly the earlier manifest's directories and files (links are made
    /// at install time), so nothing is read; `old_of_new[i]` is the earlier entry at new
    /// entry `i`'s path.
    Settled {
        earlier: &'a [Entry],
        old_of_new: &'a [Option<usize>],
    },
}

impl StagedTree<'_> {
    /// The size of the regular file staged at new entry `i`'s path (`e`), if that is one.
    fn file_size(&self, i: usize, e: &Entry) -> Option<u64> {
        match self {
            StagedTree::Walked(listing) => listing.file_size(&e.path),
            StagedTree::Settled {
                earlier,
                old_of_new,
            } => old_of_new[i]
                .map(|j| &earlier[j])
                .filter(|old| old.kind == EntryKind::File)
                .map(|old| old.size),
        }
    }

    /// Whether a directory is staged at new entry `i`'s path (`e`).
    fn is_dir(&self, i: usize, e: &Entry) -> bool {
        match self {
            StagedTree::Walked(listing) => listing.is_dir(&e.path),
            StagedTree::Settled {
                earlier,
                old_of_new,
            } => old_of_new[i].is_some_and(|j| j > 0 && earlier[j].kind == EntryKind::Dir),
        }
    }

    /// Removes from `tree` everything staged that the new manifest (`entries`) does not
    /// keep: `kept(i)` says whether new entry `i`'s path stays (a directory, pruned in turn,
    /// or a carried file), provided the same kind is staged there.
    fn prune(
        &self,
        tree: &Path,
        entries: &[Entry],
        kept: impl Fn(usize) -> bool,
    ) -> Result<(), Error> {
        match self {
            StagedTree::Walked(listing) => {
                let mut keep: HashMap<&[u8], bool> = HashMap::new();
                for (i, e) in entries.iter().enumerate() {
                    if kept(i) {
                        keep.insert(&e.path, e.kind == EntryKind::Dir);
                    }
                }
                listing.prune(tree, &keep)
            }
            StagedTree::Settled {
                earlier,
                old_of_new,
            } => {
                let mut new_of_old: Vec<Option<usize>> = vec![None; earlier.len()];
                for (i, old) in old_of_new.iter().enumerate() {
                    if let Some(j) = old {
                        new_of_old[*j] = Some(i);
                    }
                }
                let mut removed: Option<&[u8]> = None;
                for (j, old) in earlier.iter().enumerate().skip(1) {
                    if !matches!(old.kind, EntryKind::Dir | EntryKind::File) {
                        continue;
                    }
                    let path = old.path.as_slice();
                    if removed
                        .is_some_and(|r| path.starts_with(r) && path.get(r.len()) == Some(&b'/'))
                    {
                        continue;
                    }
                    let stays =
                        new_of_old[j].is_some_and(|i| kept(i) && entries[i].kind == old.kind);
                    if !stays {
                        crash_point()?;
                        remove_any(&path_of(tree, path))?;
                        if old.kind == EntryKind::Dir {
                            removed = Some(path);
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// What a staged tree holds: every path under it (relative, as in the manifest), parents
/// before their children, with its kind and, for a regular file, its size.
#[derive(Default)]
struct Listing {
    entries: Vec<(Vec<u8>, ListedKind)>,
    index: HashMap<Vec<u8>, usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ListedKind {
    Dir,
    File(u64),
    Other,
}

impl Listing {
    /// Walks `tree`: the kinds come from the directory entries, a file's size from an
    /// `fstatat` on its open directory.
    fn of(tree: &Path) -> Result<Listing, Error> {
        let mut listing = Listing::default();
        listing.walk(tree, &[])?;
        listing.index = listing
            .entries
            .iter()
            .enumerate()
            .map(|(i, (path, _))| (path.clone(), i))
            .collect();
        Ok(listing)
    }

    fn walk(&mut self, dir: &Path, rel: &[u8]) -> Result<(), Error> {
        for d in fs::read_dir(dir).map_err(io_err(dir))? {
            let d = d.map_err(io_err(dir))?;
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(d.file_name().as_bytes());
            let file_type = d.file_type().map_err(io_err(&d.path()))?;
            if file_type.is_dir() {
                self.entries.push((child.clone(), ListedKind::Dir));
                self.walk(&d.path(), &child)?;
            } else if file_type.is_file() {
                let len = d.metadata().map_err(io_err(&d.path()))?.len();
                self.entries.push((child, ListedKind::File(len)));
            } else {
                self.entries.push((child, ListedKind::Other));
            }
        }
        Ok(())
    }

    fn kind(&self, rel: &[u8]) -> Option<ListedKind> {
        self.index.get(rel).map(|i| self.entries[*i].1)
    }

    /// The size of the regular file at `rel`, if that is one.
    fn file_size(&self, rel: &[u8]) -> Option<u64> {
        match self.kind(rel) {
            Some(ListedKind::File(len)) => Some(len),
            _ => None,
        }
    }

    fn is_dir(&self, rel: &[u8]) -> bool {
        self.kind(rel) == Some(ListedKind::Dir)
    }

    /// Removes from `tree` everything listed that `keep` does not keep: a directory it maps
    /// to true, a regular file it maps to false (a carried file).
    fn prune(&self, tree: &Path, keep: &HashMap<&[u8], bool>) -> Result<(), Error> {
        // The last directory removed: its subtree follows it in the listing, and went with it.
        let mut removed: Option<&[u8]> = None;
        for (path, kind) in &self.entries {
            if removed.is_some_and(|r| path.starts_with(r) && path.get(r.len()) == Some(&b'/')) {
                continue;
            }
            let kept = matches!(
                (keep.get(path.as_slice()), kind),
                (Some(true), ListedKind::Dir) | (Some(false), ListedKind::File(_))
            );
            if !kept {
                crash_point()?;
                remove_any(&path_of(tree, path))?;
                if *kind == ListedKind::Dir {
                    removed = Some(path);
                }
            }
        }
        Ok(())
    }
}

/// In unit tests, a simulated `kill -9` between two of prepare's changes to the disk
/// ([`tests::interrupted_prepare_never_loses_staged_files`]); nothing in other builds.
fn crash_point() -> Result<(), Error> {
    #[cfg(test)]
    if tests::CRASH_AFTER.with(|c| {
        let left = c.get();
        c.set(left.map(|n| n.saturating_sub(1)));
        left == Some(0)
    }) {
        return Err(Error::Other("simulated crash".into()));
    }
    Ok(())
}

/// What `settled` holds: the manifest whose metadata the staged files have, and the owner
/// rules it was applied with (a change of either makes it void). `None`: nothing to record.
fn settled_record(manifest_hash: Option<Hash>, owner: &Option<Resolved>) -> Option<Vec<u8>> {
    let hash = manifest_hash?;
    let mut record = b"SXSETL01".to_vec();
    record.extend_from_slice(&hash);
    record.extend_from_slice(blake3::hash(format!("{owner:?}").as_bytes()).as_bytes());
    Some(record)
}

/// Whether two versions of an entry ask for the same metadata (what [`Staging::settle`]
/// applied for the first holds for the second).
fn same_metadata(old: &Entry, new: &Entry) -> bool {
    old.kind == new.kind
        && old.mode == new.mode
        && old.mtime_sec == new.mtime_sec
        && old.mtime_nsec == new.mtime_nsec
        && old.attrs == new.attrs
}

/// The journal: `JOURNAL_MAGIC`, the manifest hash, the manifest's length and frames (its
/// `Hello` header, then every `Entry`, in the wire codec), then one [`RECORD_LEN`]-byte
/// record per verified chunk. One file, so that the manifest and the chunks it vouches for
/// change together, in one rename.
fn encode_journal(m: &Manifest, records: &[(u64, u64, Hash)]) -> Vec<u8> {
    let manifest = encode_manifest(m);
    let mut out = Vec::with_capacity(48 + manifest.len() + records.len() * RECORD_LEN);
    out.extend_from_slice(JOURNAL_MAGIC);
    out.extend_from_slice(&m.manifest_hash);
    out.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    out.extend_from_slice(&manifest);
    for (f, c, h) in records {
        out.extend_from_slice(&f.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(h);
    }
    out
}

fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    // The header travels as a Hello frame, entries as Entry frames: one codec for both.
    ControlMsg::Hello(Hello {
        version: crate::wire::PROTOCOL_VERSION,
        root_kind: m.root_kind,
        chunk_size: m.chunk_size,
        entry_count: m.entries.len() as u64,
        total_bytes: m.total_bytes,
        install: true,
        ..Hello::default()
    })
    .encode_frame(&mut out);
    for e in &m.entries {
        ControlMsg::Entry(e.clone()).encode_frame(&mut out);
    }
    out
}

/// Reads manifest frames back: (chunk size, entries).
fn decode_manifest(mut frames: &[u8]) -> Result<(u64, Vec<Entry>), String> {
    let mut entries = Vec::new();
    let mut chunk_size = 0;
    while !frames.is_empty() {
        let len = crate::wire::control_frame_len(
            frames
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or("manifest: truncated")?,
        )
        .map_err(|e| e.to_string())?;
        let body = frames.get(4..4 + len).ok_or("manifest: truncated")?;
        match ControlMsg::decode_body(body).map_err(|e| e.to_string())? {
            ControlMsg::Hello(h) => chunk_size = h.chunk_size,
            ControlMsg::Entry(e) => entries.push(e),
            _ => return Err("manifest: unexpected record".into()),
        }
        frames = &frames[4 + len..];
    }
    Ok((chunk_size, entries))
}

/// Number of verified-chunk records in the journal of `dest` under `root` (for tests and
/// diagnostics; 0 when there is none).
pub fn journal_records(root: &Path, dest: &[u8]) -> u64 {
    let Ok(journal) = fs::read(staging_dir(root, dest).join("journal")) else {
        return 0;
    };
    split_journal(&journal).map_or(0, |(_, _, records)| (records.len() / RECORD_LEN) as u64)
}

/// (manifest hash, manifest frames, records) of a journal, current or legacy format (whose
/// manifest lives in the separate `state` file: empty frames here).
fn split_journal(journal: &[u8]) -> Result<(Hash, &[u8], &[u8]), String> {
    let magic = journal.get(..8).ok_or("journal: truncated")?;
    let hash: Hash = journal
        .get(8..40)
        .and_then(|h| h.try_into().ok())
        .ok_or("journal: truncated")?;
    if magic == LEGACY_JOURNAL_MAGIC {
        return Ok((hash, &[], &journal[40..]));
    }
    if magic != JOURNAL_MAGIC {
        return Err(match magic.strip_prefix(JOURNAL_MAGIC_PREFIX) {
            Some(format) => format!(
                "journal of format {} (this receiver reads formats 01 and 02; a newer release \
                 wrote it)",
                String::from_utf8_lossy(format)
            ),
            None => "journal: unknown format".into(),
        });
    }
    let len = journal
        .get(40..48)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("journal: truncated")?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(48))
        .filter(|end| *end <= journal.len())
        .ok_or("journal: truncated manifest")?;
    Ok((hash, &journal[48..end], &journal[end..]))
}

/// An earlier attempt at a destination: its manifest and the chunks it verified, read back
/// from its journal ([`load_previous`]) or remembered by the process that staged it
/// ([`Previous::remember`]).
#[derive(Default, Debug)]
pub struct Previous {
    /// Its manifest hash; `None`: no earlier attempt.
    manifest_hash: Option<Hash>,
    chunk_size: u64,
    /// Its manifest's entries, in manifest order.
    entries: Vec<Entry>,
    /// Per entry, the (chunk, hash) pairs verified.
    chunks: Vec<Vec<(u64, Hash)>>,
    /// For a remembered attempt: the journal as it left it.
    journal: Option<FileStamp>,
}

/// What identifies one version of a file (a journal left by an attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

impl Previous {
    /// What a receiver keeps in memory of a pre-copy it just staged and settled in `root`
    /// for `dest`: its manifest and verified chunks (from `tracker`), and the journal's
    /// stamp. The final pass's prepare then need not read a 200k-entry journal back (~0.2 s
    /// inside the read-only window); it trusts the memory only while the journal is
    /// unchanged ([`Previous::still_on_disk`]).
    pub fn remember(
        root: &Path,
        dest: &[u8],
        manifest: &Manifest,
        tracker: &ChunkTracker,
    ) -> Previous {
        Previous {
            manifest_hash: Some(manifest.manifest_hash),
            chunk_size: manifest.chunk_size,
            entries: manifest.entries.clone(),
            chunks: (0..manifest.entries.len())
                .map(|i| tracker.verified_of(i))
                .collect(),
            journal: FileStamp::of(&staging_dir(root, dest).join("journal")),
        }
    }

    /// Entries held (the memory it takes is about proportional).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the journal in staging directory `dir` is still the one this attempt left
    /// (same file, length and time): no other attempt ran since.
    fn still_on_disk(&self, dir: &Path) -> bool {
        self.journal.is_some() && FileStamp::of(&dir.join("journal")) == self.journal
    }
}

/// Reads the previous attempt's manifest and journal: its manifest hash (`None`: no earlier
/// attempt) and the verified chunks per path. Reads the current format and the legacy one
/// (`state` + a journal of records only).
fn load_previous(dir: &Path, chunk_size: u64) -> Result<Previous, String> {
    let mut journal = Vec::new();
    match File::open(dir.join("journal")) {
        // No earlier attempt: nothing to carry, nothing to warn about.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Previous::default()),
        file => file
            .and_then(|mut f| f.read_to_end(&mut journal))
            .map_err(|e| format!("journal: {e}"))?,
    };
    let (manifest_hash, frames, records) = split_journal(&journal)?;
    let legacy_state;
    let frames = if journal.starts_with(LEGACY_JOURNAL_MAGIC) {
        legacy_state = fs::read(dir.join("state")).map_err(|e| format!("state: {e}"))?;
        if legacy_state.len() < 40 || &legacy_state[..8] != LEGACY_STATE_MAGIC {
            return Err("state: unknown format".into());
        }
        if legacy_state[8..40] != manifest_hash {
            return Err("journal belongs to another manifest".into());
        }
        &legacy_state[40..]
    } else {
        frames
    };
    let (old_chunk_size, entries) = decode_manifest(frames)?;
    let mut hasher = ManifestHasher::new();
    for e in &entries {
        hasher.add(e);
    }
    if hasher.finish() != manifest_hash {
        return Err("journal: its manifest does not match its hash".into());
    }
    if old_chunk_size != chunk_size {
        return Err(format!(
            "chunk size changed from {old_chunk_size} to {chunk_size}"
        ));
    }
    let mut per_file: Vec<Vec<(u64, Hash)>> = vec![Vec::new(); entries.len()];
    // A torn last record (killed mid-write) is ignored by chunks_exact.
    for rec in records.chunks_exact(RECORD_LEN) {
        let file = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let chunk = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        let hash: Hash = rec[16..].try_into().expect("32 bytes");
        if let Some(v) = per_file.get_mut(file as usize) {
            v.push((chunk, hash));
        }
    }
    Ok(Previous {
        manifest_hash: Some(manifest_hash),
        chunk_size,
        entries,
        chunks: per_file,
        journal: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Prepare's changes to the disk allowed before a simulated kill; `None`: no kill.
        pub(crate) static CRASH_AFTER: Cell<Option<u64>> = const { Cell::new(None) };
    }

    const CHUNK: u64 = 64 * 1024;

    fn resumed(resume: bool) -> Request {
        Request {
            resume,
            ..Request::default()
        }
    }

    fn entry(path: &str, kind: EntryKind, size: u64, mtime: i64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            mtime_sec: mtime,
            mtime_nsec: 0,
            size,
            link_target: Vec::new(),
            ino: 1,
            ctime_sec: mtime,
            ctime_nsec: 0,
            attrs: None,
        }
    }

    fn content(e: &Entry) -> Vec<u8> {
        let seed = blake3::hash(&[&e.path[..], &e.mtime_sec.to_le_bytes()].concat());
        let mut out = Vec::with_capacity(e.size as usize);
        let mut reader = blake3::Hasher::new_keyed(seed.as_bytes()).finalize_xof();
        out.resize(e.size as usize, 0);
        reader.fill(&mut out);
        out
    }

    /// A pre-copy of the first manifest, fully staged; the second one, after the source
    /// moved on: `keep` unchanged, `changed` rewritten, `gone` deleted, `a/x` a file
    /// turned directory, `new` created.
    fn manifests() -> (Manifest, Manifest) {
        let first = vec![
            entry("", EntryKind::Dir, 0, 1),
            entry("a", EntryKind::Dir, 0, 1),
            entry("a/b", EntryKind::Dir, 0, 1),
            entry("a/b/keep", EntryKind::File, 3 * CHUNK + 17, 1),
            entry("a/x", EntryKind::File, CHUNK, 1),
            entry("changed", EntryKind::File, 2 * CHUNK, 1),
            entry("gone", EntryKind::File, CHUNK + 1, 1),
        ];
        let second = vec![
            entry("", EntryKind::Dir, 0, 2),
            entry("a", EntryKind::Dir, 0, 2),
            entry("a/b", EntryKind::Dir, 0, 1),
            entry("a/b/keep", EntryKind::File, 3 * CHUNK + 17, 1),
            entry("a/x", EntryKind::Dir, 0, 2),
            entry("a/x/y", EntryKind::File, 5, 2),
            entry("changed", EntryKind::File, 2 * CHUNK, 2),
            entry("new", EntryKind::File, CHUNK, 2),
        ];
        (
            Manifest::from_scan(RootKind::Dir, CHUNK, first),
            Manifest::from_scan(RootKind::Dir, CHUNK, second),
        )
    }

    /// Stages every chunk of `m` under `root` as the receiver does: write, then journal.
    fn stage_fully(root: &Path, m: &Manifest) {
        let (mut s, _) = Staging::prepare(root, b"r.git", m, &Request::default()).unwrap();
        for (i, e) in m.entries.iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            let data = content(e);
            let path = s.entry_path(m, i);
            for (c, raw) in data.chunks(CHUNK as usize).enumerate() {
                Staging::write_chunk(&path, c as u64 * CHUNK, raw).unwrap();
                s.journal_append(i as u64, c as u64, blake3::hash(raw).as_bytes())
                    .unwrap();
            }
        }
    }

    /// Runs prepare with a simulated kill after `n` changes to the disk; true when it was
    /// killed (false: it finished first).
    fn prepare_killed_after(root: &Path, m: &Manifest, resume: bool, n: u64) -> bool {
        CRASH_AFTER.with(|c| c.set(Some(n)));
        let result = Staging::prepare(root, b"r.git", m, &resumed(resume));
        CRASH_AFTER.with(|c| c.set(None));
        match result {
            Ok(_) => false,
            Err(PrepareError::Io(Error::Other(m))) if m == "simulated crash" => true,
            Err(e) => panic!("prepare failed for real after {n} changes: {e:?}"),
        }
    }

    /// The journal's promise: every chunk it vouches for is on disk with that hash.
    fn assert_vouched_chunks_are_on_disk(s: &Staging, t: &ChunkTracker, m: &Manifest) {
        for i in 0..m.entries.len() {
            let path = s.entry_path(m, i);
            for (c, hash) in t.verified_of(i) {
                let len = m.chunk_len(i, c).unwrap() as usize;
                let mut buf = vec![0u8; len];
                File::open(&path)
                    .unwrap()
                    .read_exact_at(&mut buf, c * CHUNK)
                    .unwrap();
                assert_eq!(
                    blake3::hash(&buf).as_bytes(),
                    &hash,
                    "chunk {c} of {} vouched for but not on disk",
                    String::from_utf8_lossy(&m.entries[i].path)
                );
            }
        }
    }

    /// Issue: `prepare` moved reusable files into `tree.new`, and the next prepare began by
    /// deleting `tree.new`: a receiver killed in between lost staged files (a full re-send
    /// inside the read-only window). Now a kill after any of prepare's changes costs none:
    /// the next prepare carries every unchanged file over, and the tree ends as the manifest
    /// says.
    #[test]
    fn interrupted_prepare_never_loses_staged_files() {
        use std::os::unix::fs::FileExt as _;
        let (first, second) = manifests();
        let keep = &second.entries[3];
        let mut kills = 0;
        for n in 0.. {
            let t = tempfile::tempdir().unwrap();
            stage_fully(t.path(), &first);
            if !prepare_killed_after(t.path(), &second, true, n) {
                break;
            }
            kills += 1;
            let (s, tracker) = Staging::prepare(t.path(), b"r.git", &second, &resumed(true))
                .unwrap_or_else(|e| panic!("killed after {n} changes: {e:?}"));
            assert_eq!(
                tracker.verified_bytes(),
                keep.size,
                "killed after {n} changes: the unchanged file must carry over"
            );
            assert_vouched_chunks_are_on_disk(&s, &tracker, &second);
            assert_eq!(journal_records(t.path(), b"r.git"), 4);
            for (i, e) in second.entries.iter().enumerate() {
                let m = fs::symlink_metadata(s.entry_path(&second, i)).unwrap();
                assert_eq!(m.is_dir(), e.kind == EntryKind::Dir, "killed after {n}");
                if e.kind == EntryKind::File {
                    assert_eq!(m.len(), e.size);
                }
            }
            assert!(!s.tree.join("gone").exists());
            let mut staged = vec![0u8; keep.size as usize];
            File::open(s.tree.join("a/b/keep"))
                .unwrap()
                .read_exact_at(&mut staged, 0)
                .unwrap();
            assert_eq!(staged, content(keep));
        }
        assert!(kills >= 8, "only {kills} crash points exercised");
    }

    /// Issue: a fresh (not resumed) prepare truncated every staged file before replacing
    /// the old journal; killed in between, the next resumed prepare carried over chunks of
    /// files that were now zeros, and both root hashes, computed from journaled hashes,
    /// would still have agreed. Now no journal ever vouches for bytes that are not there.
    #[test]
    fn interrupted_fresh_prepare_never_vouches_for_truncated_files() {
        let (first, _) = manifests();
        for n in 0.. {
            let t = tempfile::tempdir().unwrap();
            stage_fully(t.path(), &first);
            if !prepare_killed_after(t.path(), &first, false, n) {
                break;
            }
            let (s, tracker) = Staging::prepare(t.path(), b"r.git", &first, &resumed(true))
                .unwrap_or_else(|e| panic!("killed after {n} changes: {e:?}"));
            assert_vouched_chunks_are_on_disk(&s, &tracker, &first);
        }
    }

    #[test]
    fn a_legacy_staging_area_still_resumes() {
        let t = tempfile::tempdir().unwrap();
        let (first, _) = manifests();
        stage_fully(t.path(), &first);
        // Rewrite it as format 1 left it: `state` + a journal of records only.
        let dir = staging_dir(t.path(), b"r.git");
        let journal = fs::read(dir.join("journal")).unwrap();
        let (hash, frames, records) = split_journal(&journal).unwrap();
        let mut state = LEGACY_STATE_MAGIC.to_vec();
        state.extend_from_slice(&hash);
        state.extend_from_slice(frames);
        let mut legacy = LEGACY_JOURNAL_MAGIC.to_vec();
        legacy.extend_from_slice(&hash);
        legacy.extend_from_slice(records);
        fs::write(dir.join("state"), state).unwrap();
        fs::write(dir.join("journal"), legacy).unwrap();
        let (s, tracker) = Staging::prepare(t.path(), b"r.git", &first, &resumed(true)).unwrap();
        assert_eq!(tracker.verified_bytes(), first.total_bytes);
        assert_vouched_chunks_are_on_disk(&s, &tracker, &first);
        assert!(
            !dir.join("state").exists(),
            "converted to the current format"
        );
    }

    #[test]
    fn a_journal_of_a_newer_format_is_named_and_the_transfer_starts_afresh() {
        let t = tempfile::tempdir().unwrap();
        let (first, _) = manifests();
        stage_fully(t.path(), &first);
        let dir = staging_dir(t.path(), b"r.git");
        let mut journal = fs::read(dir.join("journal")).unwrap();
        journal[..8].copy_from_slice(b"SXJRNL03");
        fs::write(dir.join("journal"), &journal).unwrap();
        let Err(err) = load_previous(&dir, first.chunk_size) else {
            panic!("a journal of a newer format was read");
        };
        assert!(
            err.contains("format 03") && err.contains("newer release"),
            "{err}"
        );
        // The resume still works: it just carries nothing over.
        let (s, tracker) = Staging::prepare(t.path(), b"r.git", &first, &resumed(true)).unwrap();
        assert_eq!(tracker.verified_bytes(), 0);
        assert_vouched_chunks_are_on_disk(&s, &tracker, &first);
        // No journal at all is no error.
        let empty = tempfile::tempdir().unwrap();
        assert!(load_previous(empty.path(), first.chunk_size)
            .unwrap()
            .entries
            .is_empty());
    }

    #[test]
    fn a_settled_precopy_leaves_the_install_only_what_changed() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (first, _) = manifests();
        stage_fully(t.path(), &first);
        // The pre-copy ends: its files get their metadata now.
        let (mut s, tracker) =
            Staging::prepare(t.path(), b"r.git", &first, &resumed(true)).unwrap();
        assert_eq!(tracker.verified_bytes(), first.total_bytes);
        assert_eq!(s.settled_files(), 0, "nothing was settled before");
        s.settle(&first).unwrap();
        let dir = staging_dir(t.path(), b"r.git");
        assert!(dir.join("settled").exists());
        let keep = s.entry_path(&first, 3);
        assert_eq!(fs::metadata(&keep).unwrap().mtime(), 1);
        drop(s);

        // The final pass: "changed" has new metadata (mode), the rest is as settled.
        let mut entries = first.entries.clone();
        entries[5].mode = 0o600;
        let second = Manifest::from_scan(RootKind::Dir, CHUNK, entries);
        let (s, _) = Staging::prepare(t.path(), b"r.git", &second, &resumed(true)).unwrap();
        assert!(
            !dir.join("settled").exists(),
            "the mark goes before the journal changes"
        );
        let files = second.entries.iter().filter(|e| e.kind == EntryKind::File);
        assert_eq!(s.settled_files(), files.count() as u64 - 1);
        // Proof that the install leaves settled files alone: a settled file's time changed
        // behind its back stays changed; the changed file gets its new mode.
        let keep = s.entry_path(&second, 3);
        let stamp =
            fs::FileTimes::new().set_modified(UNIX_EPOCH + std::time::Duration::from_secs(77));
        File::options()
            .write(true)
            .open(&keep)
            .unwrap()
            .set_times(stamp)
            .unwrap();
        let (installed, _) = s.install(&second).unwrap();
        assert_eq!(
            fs::metadata(installed.join("a/b/keep")).unwrap().mtime(),
            77
        );
        let changed = fs::metadata(installed.join("changed")).unwrap();
        assert_eq!(changed.mode() & 0o777, 0o600);
        assert_eq!(changed.mtime(), 1);

        // Without a settle (or for other owner rules, or another manifest) nothing is trusted.
        let t = tempfile::tempdir().unwrap();
        stage_fully(t.path(), &first);
        let (s, _) = Staging::prepare(t.path(), b"r.git", &first, &resumed(true)).unwrap();
        assert_eq!(s.settled_files(), 0);
        let owner = Some(Resolved::default());
        assert_ne!(
            settled_record(Some(first.manifest_hash), &owner),
            settled_record(Some(first.manifest_hash), &None)
        );
        assert_eq!(settled_record(None, &None), None);
    }

    #[test]
    fn a_fresh_prepare_over_an_earlier_attempt_leaves_only_the_new_manifest() {
        let t = tempfile::tempdir().unwrap();
        let (first, second) = manifests();
        stage_fully(t.path(), &first);
        for resume in [false, true] {
            let (s, _) = Staging::prepare(t.path(), b"r.git", &second, &resumed(resume)).unwrap();
            let tree = s.entry_path(&second, 0);
            assert!(
                !tree.join("gone").exists(),
                "resume {resume}: a file of no manifest stays"
            );
            assert!(
                tree.join("a/x").is_dir(),
                "resume {resume}: a file became a directory"
            );
            assert!(tree.join("new").is_file());
        }
    }

    /// Every path under `tree` with its kind and size, sorted.
    fn tree_contents(tree: &Path) -> Vec<(Vec<u8>, String)> {
        let mut walked = Listing::default();
        walked.walk(tree, &[]).unwrap();
        let mut out: Vec<_> = walked
            .entries
            .into_iter()
            .map(|(p, k)| {
                let kind = match k {
                    ListedKind::Dir => "dir".to_string(),
                    ListedKind::File(n) => format!("file {n}"),
                    ListedKind::Other => "other".to_string(),
                };
                (p, kind)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_settled_tree_is_fixed_up_from_its_manifest_as_a_walk_would_fix_it() {
        let (first, second) = manifests();
        let mut trees = Vec::new();
        for settle in [true, false] {
            let t = tempfile::tempdir().unwrap();
            stage_fully(t.path(), &first);
            let (mut s, _) = Staging::prepare(t.path(), b"r.git", &first, &resumed(true)).unwrap();
            if settle {
                s.settle(&first).unwrap();
            }
            drop(s);
            // `gone` leaves, `a/x` turns from a file into a directory, `new` comes.
            let (s, tracker) =
                Staging::prepare(t.path(), b"r.git", &second, &resumed(true)).unwrap();
            assert_vouched_chunks_are_on_disk(&s, &tracker, &second);
            let tree = s.entry_path(&second, 0);
            assert!(!tree.join("gone").exists(), "settled {settle}");
            assert!(tree.join("a/x").is_dir(), "settled {settle}");
            trees.push(tree_contents(&tree));
        }
        assert_eq!(trees[0], trees[1]);
        let expected: Vec<_> = second
            .entries
            .iter()
            .skip(1)
            .map(|e| e.path.clone())
            .collect();
        let mut got: Vec<_> = trees[0].iter().map(|(p, _)| p.clone()).collect();
        got.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_remembered_attempt_stands_for_its_journal_only_while_the_journal_is_unchanged() {
        let (first, second) = manifests();
        // A settled pre-copy of `first`, remembered as the receiver does.
        let staged = |root: &Path| {
            stage_fully(root, &first);
            let (mut s, tracker) =
                Staging::prepare(root, b"r.git", &first, &resumed(true)).unwrap();
            s.settle(&first).unwrap();
            drop(s);
            Arc::new(Previous::remember(root, b"r.git", &first, &tracker))
        };
        let journal = |root: &Path| staging_dir(root, b"r.git").join("journal");
        // Damages the journal's manifest bytes but keeps its length and times.
        let damage_in_place = |root: &Path| {
            let path = journal(root);
            let times = fs::metadata(&path).unwrap().modified().unwrap();
            let mut bytes = fs::read(&path).unwrap();
            bytes[60] ^= 0xff;
            fs::write(&path, &bytes).unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_times(fs::FileTimes::new().set_modified(times))
                .unwrap();
        };
        let carried = |root: &Path, memory: Option<Arc<Previous>>| {
            let (s, tracker) =
                Staging::prepare_after(root, b"r.git", &second, &resumed(true), memory).unwrap();
            assert_vouched_chunks_are_on_disk(&s, &tracker, &second);
            tracker.verified_bytes()
        };
        let kept = first.entries[3].size; // a/b/keep: the one file of `first` that carries over

        // Remembered: the journal is not read back (a damaged one would say nothing).
        let t = tempfile::tempdir().unwrap();
        let memory = staged(t.path());
        damage_in_place(t.path());
        assert_eq!(carried(t.path(), Some(memory)), kept);

        // Not remembered: the same damage is found and nothing carries over.
        let t = tempfile::tempdir().unwrap();
        staged(t.path());
        damage_in_place(t.path());
        assert_eq!(carried(t.path(), None), 0);

        // The journal changed since (another attempt ran): the memory is not trusted.
        let t = tempfile::tempdir().unwrap();
        let memory = staged(t.path());
        let mut other = first.entries.clone();
        other.truncate(4);
        let other = Manifest::from_scan(RootKind::Dir, CHUNK, other);
        drop(Staging::prepare(t.path(), b"r.git", &other, &resumed(false)).unwrap());
        assert!(!memory.still_on_disk(&staging_dir(t.path(), b"r.git")));
        assert_eq!(
            carried(t.path(), Some(memory)),
            0,
            "nothing of `other` is verified"
        );
    }
}
