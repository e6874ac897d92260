//! The sender's memory of a git directory's loose-object directories, from one pass to the
//! next, so that a migration's frozen final pass does not list and `stat` every loose object
//! again inside the repository's read-only window.
//!
//! **Why.** A busy repository holds hundreds of thousands of loose objects in
//! `objects/00` .. `objects/ff` (200,000 in the 5 GB busy fixture). Listing them, with an
//! `fstatat` and an `llistxattr` each, is ~0.5 s of a final pass; yet between the last
//! pre-copy and the freeze only a few of those 256 directories changed.
//!
//! **The rule that makes it safe.** Git writes a loose object once, to a temporary name in
//! its directory, then renames (or links) it into place, and removes it only by unlinking:
//! every change to what a loose-object directory holds changes the directory's mtime and
//! ctime. So a pass that finds a directory with the same device, inode, mtime and ctime as
//! when it was listed before reuses that listing ([`ScanCache::take`]) instead of reading it.
//! Two guards:
//! - *Timestamp granularity.* The kernel stamps times from a coarse clock, so a change in
//!   the same tick as an earlier one can leave the mtime equal. A listing is kept only for a
//!   directory whose ctime was at least [`SETTLED_FOR`] old when it was stamped (taken before
//!   the directory was read): any later change then gets a later time.
//! - *What is trusted.* Only directories of git's content-addressed loose objects, each a
//!   single-name regular file, and only in git mode; nothing else of the tree is cached.
//!
//! **What it does not see**, by design: a change to a loose object that leaves its directory
//! alone, which git never makes except to freshen its mtime (`utime`, when an object is
//! written that exists already) and which an operator would make only by hand (`chmod`,
//! `chown`, `setfattr` inside `objects/`). The copy then carries the loose object's earlier
//! mode, times or owner; its content, named by its hash, is the same. `shardsend
//! --no-scan-cache` reads every directory.
//!
//! **Where.** One file per source directory (named by the BLAKE3 hash of its canonical path)
//! under `$XDG_CACHE_HOME/shardsend` or `~/.cache/shardsend` (`--scan-cache DIR`), written
//! atomically by each pre-copy pass and removed by the pass that installs. A missing,
//! damaged or foreign file is an empty cache: the scan reads everything, as without one.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foldhash::HashMap;

use crate::gitdir;
use crate::wire::{ControlMsg, Entry};

/// How old a directory's last change must be for its listing to be kept (see the module
/// doc): far more than any file system's timestamp granularity (1 s on some, one kernel
/// tick on ext4 and xfs).
pub const SETTLED_FOR: Duration = Duration::from_secs(2);

const MAGIC: &[u8; 8] = b"SXSCAN01";

/// What identifies one version of a directory: any change to its entries changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirStamp {
    pub dev: u64,
    pub ino: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
}

impl DirStamp {
    pub fn of(meta: &fs::Metadata) -> DirStamp {
        DirStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }

    /// Whether the directory's last change was at least [`SETTLED_FOR`] before `now`.
    fn settled_at(&self, now: SystemTime) -> bool {
        let ctime = if self.ctime_sec >= 0 {
            UNIX_EPOCH
                + Duration::new(
                    self.ctime_sec as u64,
                    self.ctime_nsec.clamp(0, 999_999_999) as u32,
                )
        } else {
            UNIX_EPOCH
        };
        now.duration_since(ctime)
            .is_ok_and(|age| age >= SETTLED_FOR)
    }
}

/// `objects/XX`: a directory of loose objects, the only kind this cache keeps.
pub fn is_loose_object_dir(rel: &[u8]) -> bool {
    matches!(rel, [b'o', b'b', b'j', b'e', b'c', b't', b's', b'/', a, b] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit())
}

/// Listings of loose-object directories, by relative path.
#[derive(Default)]
pub struct ScanCache {
    dirs: HashMap<Vec<u8>, (DirStamp, Vec<Entry>)>,
}

impl ScanCache {
    /// Reads the cache file at `path`; an empty cache when there is none or it is unusable
    /// (said at debug level: the scan then reads every directory, as without a cache).
    pub fn load(path: &Path) -> ScanCache {
        match fs::read(path) {
            Ok(bytes) => Self::decode(&bytes).unwrap_or_else(|why| {
                tracing::debug!(path = %path.display(), %why, "scan cache unusable; reading every directory");
                ScanCache::default()
            }),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(path = %path.display(), error = %e, "scan cache unreadable");
                }
                ScanCache::default()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Directories held.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Takes the earlier listing of the directory at `rel`, if it was kept and the directory
    /// is still the version `stamp` says (taken, not copied: 200k entries in a busy
    /// repository).
    pub fn take(&mut self, rel: &[u8], stamp: &DirStamp) -> Option<Vec<Entry>> {
        if self.dirs.get(rel).is_some_and(|(kept, _)| kept == stamp) {
            self.dirs.remove(rel).map(|(_, entries)| entries)
        } else {
            None
        }
    }

    /// Keeps the listing `entries` of the loose-object directory at `rel`, stamped `stamp`
    /// before it was read, when it may be trusted next time (see the module doc); returns
    /// whether it was kept.
    pub fn keep(
        &mut self,
        rel: &[u8],
        stamp: DirStamp,
        entries: Vec<Entry>,
        now: SystemTime,
    ) -> bool {
        let trusted = is_loose_object_dir(rel)
            && stamp.settled_at(now)
            && entries.iter().all(|e| {
                e.kind == crate::wire::EntryKind::File && gitdir::is_content_addressed(&e.path)
            });
        if trusted {
            self.dirs.insert(rel.to_vec(), (stamp, entries));
        }
        trusted
    }

    /// Adds `other`'s directories (the findings of a scan's helper thread).
    pub fn absorb(&mut self, other: ScanCache) {
        self.dirs.extend(other.dirs);
    }

    /// Writes the cache to `path` atomically (a temporary file renamed over it; not fsynced:
    /// a cache lost in a crash only costs one full scan).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, self.encode())?;
        fs::rename(&tmp, path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// `MAGIC`, BLAKE3 of the body, body: per directory its path, stamp, entry count and
    /// entries (wire codec frames).
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.dirs.len() as u64).to_le_bytes());
        let mut dirs: Vec<_> = self.dirs.iter().collect();
        dirs.sort_by(|a, b| a.0.cmp(b.0));
        for (rel, (s, entries)) in dirs {
            body.extend_from_slice(&(rel.len() as u64).to_le_bytes());
            body.extend_from_slice(rel);
            for v in [s.dev, s.ino] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            for v in [s.mtime_sec, s.mtime_nsec, s.ctime_sec, s.ctime_nsec] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            for e in entries {
                ControlMsg::Entry(e.clone()).encode_frame(&mut body);
            }
        }
        let mut out = Vec::with_capacity(40 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode(bytes: &[u8]) -> Result<ScanCache, String> {
        if bytes.get(..8) != Some(&MAGIC[..]) {
            return Err("unknown format".into());
        }
        let sum = bytes.get(8..40).ok_or("truncated")?;
        let body = &bytes[40..];
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader(body);
        let mut cache = ScanCache::default();
        for _ in 0..r.u64()? {
            let len = usize::try_from(r.u64()?).map_err(|_| "bad length")?;
            let rel = r.take(len)?.to_vec();
            let (dev, ino) = (r.u64()?, r.u64()?);
            let mut times = [0i64; 4];
            for t in &mut times {
                *t = r.u64()? as i64;
            }
            let n = r.u64()?;
            let mut entries = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                let head: [u8; 4] = r.take(4)?.try_into().map_err(|_| "truncated")?;
                let len = crate::wire::control_frame_len(head).map_err(|e| e.to_string())?;
                match ControlMsg::decode_body(r.take(len)?).map_err(|e| e.to_string())? {
                    ControlMsg::Entry(e) => entries.push(e),
                    _ => return Err("unexpected record".into()),
                }
            }
            let stamp = DirStamp {
                dev,
                ino,
                mtime_sec: times[0],
                mtime_nsec: times[1],
                ctime_sec: times[2],
                ctime_nsec: times[3],
            };
            cache.dirs.insert(rel, (stamp, entries));
        }
        Ok(cache)
    }
}

/// Reads a cache body front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "truncated")?;
        Ok(u64::from_le_bytes(b))
    }
}

/// The cache file of source directory `src` under `dir`.
pub fn cache_file(dir: &Path, src: &Path) -> PathBuf {
    let canonical = fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let key = blake3::hash(canonical.as_os_str().as_bytes()).to_hex();
    dir.join(format!("{}.scan", &key[..32]))
}

/// Where scan caches live by default: `$XDG_CACHE_HOME/shardsend`, else
/// `$HOME/.cache/shardsend`; `None` without either (no cache then).
pub fn default_dir() -> Option<PathBuf> {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from("XDG_CACHE_HOME")
        .or_else(|| from("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("shardsend"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Attrs, EntryKind};

    fn object(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File,
            mode: 0o444,
            mtime_sec: 1_700_000_000,
            size: 42,
            ino: 7,
            attrs: Some(Attrs {
                uid: 1000,
                gid: 1000,
                xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            }),
            ..Entry::default()
        }
    }

    fn stamp(ctime_sec: i64) -> DirStamp {
        DirStamp {
            dev: 1,
            ino: 2,
            mtime_sec: ctime_sec,
            mtime_nsec: 5,
            ctime_sec,
            ctime_nsec: 6,
        }
    }

    #[test]
    fn only_settled_loose_object_directories_are_kept_and_they_round_trip() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let old = stamp(1_700_000_000);
        let fresh = stamp(1_700_000_099);
        let obj = |fan: &str| object(&format!("objects/{fan}/{}", "1".repeat(38)));
        let mut c = ScanCache::default();
        assert!(c.keep(b"objects/ab", old, vec![obj("ab")], now));
        assert!(
            !c.keep(b"objects/cd", fresh, vec![obj("cd")], now),
            "changed 1 s ago"
        );
        assert!(
            !c.keep(b"objects/pack", old, vec![], now),
            "not loose objects"
        );
        assert!(!c.keep(b"refs/heads", old, vec![], now));
        let mut lock = obj("ef");
        lock.path = b"objects/ef/notanid".to_vec();
        assert!(
            !c.keep(b"objects/ef", old, vec![lock], now),
            "not content-addressed"
        );
        assert!(
            c.keep(b"objects/00", old, vec![], now),
            "an empty directory"
        );

        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("sub/x.scan");
        c.save(&file).unwrap();
        let mut back = ScanCache::load(&file);
        assert_eq!(back.len(), 2);
        assert_eq!(back.take(b"objects/ab", &fresh), None, "another version");
        assert_eq!(back.take(b"objects/ab", &old), Some(vec![obj("ab")]));
        assert_eq!(back.take(b"objects/ab", &old), None, "taken");
        assert_eq!(back.take(b"objects/cd", &old), None);

        // Truncated, damaged or of another format: empty, never an error.
        let bytes = fs::read(&file).unwrap();
        for bad in [&bytes[..bytes.len() - 3], &bytes[..20], b"SXSCAN99"] {
            fs::write(&file, bad).unwrap();
            assert!(ScanCache::load(&file).is_empty());
        }
        assert!(ScanCache::load(&t.path().join("none")).is_empty());
    }

    #[test]
    fn loose_object_directories_are_two_hex_digits_under_objects() {
        for yes in ["objects/00", "objects/ff", "objects/aB"] {
            assert!(is_loose_object_dir(yes.as_bytes()), "{yes}");
        }
        for no in [
            "objects/pack",
            "objects/info",
            "objects/0",
            "objects/0g",
            "refs/00",
            "objects/000",
        ] {
            assert!(!is_loose_object_dir(no.as_bytes()), "{no}");
        }
    }
}
