//! The receiver's staging area: where a transfer's bytes land until they are verified,
//! fsynced and installed, and the journal that makes `--resume` cheap.
//!
//! Layout, per destination (`KEY` = first 32 hex digits of BLAKE3(dest name)):
//! ```text
//! ROOT/.shardrecv/KEY/lock      flock'ed while a transfer runs (one writer per destination,
//!                               even across two daemons on one root)
//! ROOT/.shardrecv/KEY/state     the manifest of the current attempt (versioned)
//! ROOT/.shardrecv/KEY/journal   header + one 48-byte record per verified chunk
//! ROOT/.shardrecv/KEY/tree      the staged tree (or file)
//! ```
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
//!   `NAME.replaced-<unix-time>` first.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::gitdir::same_source_version;
use crate::manifest::{Manifest, STAGING_DIR_NAME};
use crate::tracker::ChunkTracker;
use crate::wire::{ControlMsg, Entry, EntryKind, Hash, Hello, RootKind};

const STATE_MAGIC: &[u8; 8] = b"SXSTATE1";
const JOURNAL_MAGIC: &[u8; 8] = b"SXJRNL01";
const RECORD_LEN: usize = 8 + 8 + 32;

/// Staging directory of a destination.
pub fn staging_dir(root: &Path, dest: &[u8]) -> PathBuf {
    let key = blake3::hash(dest).to_hex();
    root.join(STAGING_DIR_NAME).join(&key.as_str()[..32])
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
    _lock: File,
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
    /// earlier attempt when `resume` is set. Fills `tracker` with what is already verified.
    pub fn prepare(
        root: &Path,
        dest: &[u8],
        manifest: &Manifest,
        resume: bool,
        git: bool,
    ) -> Result<(Staging, ChunkTracker), PrepareError> {
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
        // What an earlier attempt verified, by path, if it may be reused.
        let carried: Carried = if resume {
            load_previous(&dir, manifest.chunk_size).unwrap_or_else(|e| {
                tracing::info!(error = %e, "no usable earlier attempt; starting afresh");
                HashMap::new()
            })
        } else {
            HashMap::new()
        };

        let reused_bytes: u64 = manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .filter(|e| {
                carried
                    .get(&e.path)
                    .is_some_and(|(old, _)| same_source_version(old, e, git))
            })
            .map(|e| e.size)
            .sum();
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

        // Build the new tree beside the old one, moving reusable files across.
        let new_tree = dir.join("tree.new");
        remove_any(&new_tree)?;
        if manifest.root_kind == RootKind::Dir {
            fs::create_dir(&new_tree).map_err(io_err(&new_tree))?;
        }
        let mut journal_records: Vec<(u64, u64, Hash)> = Vec::new();
        for (i, e) in manifest.entries.iter().enumerate() {
            let dst = if manifest.root_kind == RootKind::File {
                new_tree.clone()
            } else {
                path_of(&new_tree, &e.path)
            };
            match e.kind {
                EntryKind::Dir => {
                    if !dst.exists() {
                        fs::create_dir(&dst).map_err(io_err(&dst))?;
                    }
                }
                EntryKind::Symlink => {} // made at install time
                EntryKind::File => {
                    let reuse = carried
                        .get(&e.path)
                        .filter(|(old, _)| same_source_version(old, e, git));
                    let src = if manifest.root_kind == RootKind::File {
                        tree.clone()
                    } else {
                        path_of(&tree, &e.path)
                    };
                    let moved = reuse.filter(|_| fs::rename(&src, &dst).is_ok());
                    if let Some((_, chunks)) = moved {
                        for (chunk, hash) in chunks {
                            if tracker.mark_verified(i as u64, *chunk, *hash) {
                                journal_records.push((i as u64, *chunk, *hash));
                            }
                        }
                    }
                    let f = OpenOptions::new()
                        .create(true)
                        .truncate(moved.is_none())
                        .write(true)
                        .open(&dst)
                        .map_err(io_err(&dst))?;
                    f.set_len(e.size).map_err(io_err(&dst))?;
                }
            }
        }
        remove_any(&tree)?;
        fs::rename(&new_tree, &tree).map_err(io_err(&tree))?;

        // New state first, then the journal: if we die between the two renames the old
        // journal names the old manifest hash and is ignored (safe, merely re-sends).
        write_atomically(&dir.join("state"), &encode_state(manifest))?;
        let mut jbytes = Vec::with_capacity(40 + journal_records.len() * RECORD_LEN);
        jbytes.extend_from_slice(JOURNAL_MAGIC);
        jbytes.extend_from_slice(&manifest.manifest_hash);
        for (f, c, h) in &journal_records {
            jbytes.extend_from_slice(&f.to_le_bytes());
            jbytes.extend_from_slice(&c.to_le_bytes());
            jbytes.extend_from_slice(h);
        }
        let jpath = dir.join("journal");
        write_atomically(&jpath, &jbytes)?;
        let journal = OpenOptions::new()
            .append(true)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        Ok((
            Staging {
                dir,
                root: root.to_path_buf(),
                dest: PathBuf::from(std::ffi::OsStr::from_bytes(dest)),
                tree,
                journal,
                _lock: lock,
            },
            tracker,
        ))
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
        // Symlinks, then file metadata, then directories deepest-first (creating entries
        // inside a directory changes its mtime).
        for (i, e) in manifest.entries.iter().enumerate() {
            let p = self.entry_path(manifest, i);
            match e.kind {
                EntryKind::Symlink => {
                    remove_any(&p)?;
                    symlink(std::ffi::OsStr::from_bytes(&e.link_target), &p).map_err(io_err(&p))?;
                    set_symlink_mtime(&p, e).map_err(io_err(&p))?;
                }
                EntryKind::File => {
                    let f = File::options().write(true).open(&p).map_err(io_err(&p))?;
                    f.set_permissions(fs::Permissions::from_mode(e.mode & 0o7777))
                        .map_err(io_err(&p))?;
                    f.set_times(fs::FileTimes::new().set_modified(mtime_of(e)))
                        .map_err(io_err(&p))?;
                }
                EntryKind::Dir => {}
            }
        }
        for (i, e) in manifest.entries.iter().enumerate().rev() {
            if e.kind == EntryKind::Dir {
                let p = self.entry_path(manifest, i);
                let f = File::open(&p).map_err(io_err(&p))?;
                f.set_times(fs::FileTimes::new().set_modified(mtime_of(e)))
                    .map_err(io_err(&p))?;
                f.set_permissions(fs::Permissions::from_mode(e.mode & 0o7777))
                    .map_err(io_err(&p))?;
            }
        }
        // One syncfs makes every staged byte and inode durable: far cheaper than an fsync
        // per file on trees of 100k loose objects.
        syncfs(&self.dir).map_err(io_err(&self.dir))?;

        let target = self.root.join(&self.dest);
        let parent = target
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let replaced = match fs::symlink_metadata(&target) {
            Ok(_) => {
                let aside = aside_name(&target);
                fs::rename(&target, &aside).map_err(io_err(&target))?;
                Some(aside)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&target, e)),
        };
        fs::rename(&self.tree, &target).map_err(io_err(&target))?;
        fsync_dir(&parent).map_err(io_err(&parent))?;
        let dir = self.dir.clone();
        drop(self);
        let _ = fs::remove_dir_all(&dir);
        Ok((target, replaced))
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

fn mtime_of(e: &Entry) -> SystemTime {
    if e.mtime_sec >= 0 {
        UNIX_EPOCH + Duration::new(e.mtime_sec as u64, e.mtime_nsec.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(e.mtime_sec.unsigned_abs())
    }
}

fn set_symlink_mtime(p: &Path, e: &Entry) -> io::Result<()> {
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
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn encode_state(m: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&m.manifest_hash);
    // The header travels as a Hello frame, entries as Entry frames: one codec for both.
    ControlMsg::Hello(Hello {
        version: crate::wire::PROTOCOL_VERSION,
        dest: Vec::new(),
        root_kind: m.root_kind,
        chunk_size: m.chunk_size,
        entry_count: m.entries.len() as u64,
        total_bytes: m.total_bytes,
        resume: false,
        install: true,
        sender_info: String::new(),
        git: false,
    })
    .encode_frame(&mut out);
    for e in &m.entries {
        ControlMsg::Entry(e.clone()).encode_frame(&mut out);
    }
    out
}

/// Per path: the earlier attempt's entry and the chunks it verified.
type Carried = HashMap<Vec<u8>, (Entry, Vec<(u64, Hash)>)>;

/// Reads the previous attempt's manifest and journal: verified chunks per path.
fn load_previous(dir: &Path, chunk_size: u64) -> Result<Carried, String> {
    let state = fs::read(dir.join("state")).map_err(|e| format!("state: {e}"))?;
    if state.len() < 40 || &state[..8] != STATE_MAGIC {
        return Err("state: unknown format".into());
    }
    let manifest_hash: Hash = state[8..40].try_into().map_err(|_| "state: short")?;
    let mut frames = &state[40..];
    let mut entries = Vec::new();
    let mut old_chunk_size = 0;
    while !frames.is_empty() {
        let len = crate::wire::control_frame_len(
            frames
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or("state: truncated")?,
        )
        .map_err(|e| e.to_string())?;
        let body = frames.get(4..4 + len).ok_or("state: truncated")?;
        match ControlMsg::decode_body(body).map_err(|e| e.to_string())? {
            ControlMsg::Hello(h) => old_chunk_size = h.chunk_size,
            ControlMsg::Entry(e) => entries.push(e),
            _ => return Err("state: unexpected record".into()),
        }
        frames = &frames[4 + len..];
    }
    if old_chunk_size != chunk_size {
        return Err(format!(
            "chunk size changed from {old_chunk_size} to {chunk_size}"
        ));
    }
    let mut journal = Vec::new();
    File::open(dir.join("journal"))
        .and_then(|mut f| f.read_to_end(&mut journal))
        .map_err(|e| format!("journal: {e}"))?;
    if journal.len() < 40 || &journal[..8] != JOURNAL_MAGIC || journal[8..40] != manifest_hash {
        return Err("journal belongs to another manifest".into());
    }
    let mut per_file: Vec<Vec<(u64, Hash)>> = vec![Vec::new(); entries.len()];
    // A torn last record (killed mid-write) is ignored by chunks_exact.
    for rec in journal[40..].chunks_exact(RECORD_LEN) {
        let file = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let chunk = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        let hash: Hash = rec[16..].try_into().expect("32 bytes");
        if let Some(v) = per_file.get_mut(file as usize) {
            v.push((chunk, hash));
        }
    }
    Ok(entries
        .into_iter()
        .zip(per_file)
        .map(|(e, chunks)| (e.path.clone(), (e, chunks)))
        .collect())
}
