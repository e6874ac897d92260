//! Walks the source tree into manifest entries, in a deterministic order.
//!
//! Order: depth-first, a directory before its children, children sorted by name bytes, so
//! two scans of an unchanged tree give the same manifest (and the same manifest hash).
//! Kept: regular files, directories, symlinks that stay inside the tree, each with its owner,
//! group and extended attributes ([`Attrs`]; names and values read without following
//! symlinks). A regular file with several names is sent once: its later names, in manifest
//! order, become [`EntryKind::Hardlink`] entries naming the first ([`Scan::hardlinks`]).
//! A symlink leaving the tree is refused (its copy would dangle, or point at something else
//! on the receiver), unless its absolute target lies under a prefix the operator allowed
//! (`--allow-external-link`, [`crate::manifest::external_link_allowed`]): then it is sent as
//! the link it is. Skipped with a warning (and listed in the summary): sockets, FIFOs and
//! devices, which have no meaning on another host.
//!
//! **Borrowed objects.** A git directory with `objects/info/alternates` keeps objects in
//! another repository: it is refused, or with `--dissociate` its borrowed objects travel as
//! an extra pack and the alternates file stays behind ([`crate::dissociate`]).
//!
//! **A live source.** Entries may vanish between a directory's listing and their `stat`, or
//! a directory between its `stat` and its listing (git removes a push's quarantine directory
//! when the push ends; gc deletes packs). The walk never fails on that: the entry is left
//! out and named in [`Scan::vanished`], and the caller decides what it means (a pre-copy
//! carries on; an installing pass, whose source must be frozen, starts over).
//!
//! **Git directories** ([`crate::gitdir`]): git's transient files are left out (counted in
//! [`Scan::transient_skipped`]), and the refs (`HEAD`, `packed-refs`, `refs/`) are read into
//! memory *before* any other part of the tree is listed, so the objects listed afterwards
//! include everything those refs reach. Their content travels from memory
//! ([`Scan::captured`]), never re-read: a ref rewritten during the send cannot point the copy
//! at objects it lacks. The entry of a captured file carries the `stat` taken before its
//! content was read, and the content is kept only when a second `stat` after the read is
//! unchanged, so content and version always belong together.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::dissociate::BorrowedPack;
use crate::error::Error;
use crate::gitdir::{self, GitMode};
use crate::manifest::{external_link_allowed, symlink_stays_inside, Manifest};
use crate::phases::Phases;
use crate::scan_cache::{self, DirStamp, ScanCache};
use crate::wire::{Attrs, Entry, EntryKind, RootKind};

/// Most bytes of ref files held in memory per scan; larger `packed-refs` are read at send
/// time like any other file (their copy is then only as consistent as a plain copy).
pub const MAX_CAPTURED_BYTES: u64 = 64 << 20;

/// What to scan and how.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    pub chunk_size: u64,
    pub git: GitMode,
    /// Absolute directories symlinks leaving the tree may point into.
    pub external_links: Vec<Vec<u8>>,
    /// Make a repository that borrows objects self-contained ([`crate::dissociate`]).
    pub dissociate: bool,
    /// In git mode: the file remembering loose-object directories between passes
    /// ([`crate::scan_cache`]); `None`: read every directory.
    pub cache_file: Option<PathBuf>,
    /// Write what this scan listed to `cache_file` for the next pass (a pre-copy does; the
    /// final pass, inside the read-only window, only reads it).
    pub save_cache: bool,
}

/// A scanned source: the manifest plus where each entry lives locally.
pub struct Scan {
    pub manifest: Manifest,
    pub sources: Vec<PathBuf>,
    /// Entries left out, with the reason.
    pub skipped: Vec<String>,
    /// Content read during the scan, by entry index (a git directory's refs).
    pub captured: HashMap<usize, bytes::Bytes>,
    /// True when git's rules applied ([`crate::gitdir`]).
    pub git: bool,
    /// Transient git files and directories left out.
    pub transient_skipped: u64,
    /// Paths that vanished (or turned into something else) while being scanned.
    pub vanished: Vec<String>,
    /// Entries sent as hardlinks to an earlier path of the same file.
    pub hardlinks: u64,
    /// Symlinks leaving the tree, sent because `--allow-external-link` allowed their target.
    pub external_links: u64,
    /// The objects a borrowing repository lacked, packed for the transfer (`--dissociate`);
    /// the pack's files live as long as this scan.
    pub borrowed: Option<BorrowedPack>,
    /// Loose-object directories whose earlier listing was reused, not read
    /// ([`crate::scan_cache`]).
    pub cached_dirs: u64,
}

/// Builds the entry describing `meta` at relative path `rel` (owner and group included; the
/// extended attributes are read by [`read_xattrs`]).
pub fn entry_from_metadata(rel: Vec<u8>, meta: &fs::Metadata, link_target: Vec<u8>) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::File
    };
    Entry {
        path: rel,
        kind,
        mode: meta.mode() & 0o7777,
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        link_target,
        ino: meta.ino(),
        ctime_sec: meta.ctime(),
        ctime_nsec: meta.ctime_nsec().clamp(0, 999_999_999) as u32,
        attrs: Some(Attrs {
            uid: meta.uid(),
            gid: meta.gid(),
            xattrs: Vec::new(),
        }),
    }
}

/// The extended attributes of `path` itself (not of a symlink's target), sorted by name;
/// none on a file system without them.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        // Gone between the listing and the read: not part of the version we send.
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Fills `entry`'s extended attributes from `path`; false when `path` vanished meanwhile.
fn add_xattrs(entry: &mut Entry, path: &Path) -> Result<bool, Error> {
    match read_xattrs(path) {
        Ok(xattrs) => {
            if let Some(a) = entry.attrs.as_mut() {
                a.xattrs = xattrs;
            }
            Ok(true)
        }
        Err(e) if is_vanished(&e) => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// True for the errors by which a path tells us it is no longer what was listed.
fn is_vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Scans `src` (a directory or a regular file).
pub fn scan(src: &Path, opts: ScanOptions) -> Result<Scan, Error> {
    let meta = fs::symlink_metadata(src).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Input(format!("source {} does not exist", src.display()))
        } else {
            Error::io(src, e)
        }
    })?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(Error::Input(format!(
            "source {} is a symlink; give the path it points to",
            src.display()
        )));
    }
    if ft.is_file() {
        if opts.git == GitMode::On {
            return Err(not_a_git_dir(src));
        }
        let mut entry = entry_from_metadata(Vec::new(), &meta, Vec::new());
        if !add_xattrs(&mut entry, src)? {
            return Err(Error::Input(format!(
                "source {} vanished while being scanned",
                src.display()
            )));
        }
        return Ok(Scan {
            manifest: Manifest::from_scan(RootKind::File, opts.chunk_size, vec![entry]),
            sources: vec![src.to_path_buf()],
            skipped: Vec::new(),
            captured: HashMap::new(),
            git: false,
            transient_skipped: 0,
            vanished: Vec::new(),
            hardlinks: 0,
            external_links: 0,
            borrowed: None,
            cached_dirs: 0,
        });
    }
    if !ft.is_dir() {
        return Err(Error::Input(format!(
            "source {} is neither a file nor a directory",
            src.display()
        )));
    }
    let git = match opts.git {
        GitMode::Off => false,
        GitMode::Auto => gitdir::looks_like_git_dir(src),
        GitMode::On if gitdir::looks_like_git_dir(src) => true,
        GitMode::On => return Err(not_a_git_dir(src)),
    };
    // Borrowed objects are added after the walk; such a scan keeps no cache.
    let cache_file = opts.cache_file.as_ref().filter(|_| git && !opts.dissociate);
    let mut phases = Phases::start();
    let cache = cache_file.map(|f| ScanCache::load(f));
    phases.mark("cache read");
    let mut walker = Walker::new(git, opts.external_links.clone(), cache, opts.save_cache);
    // The root directory itself is entry 0 (empty path): its mode and mtime travel too.
    let mut root = entry_from_metadata(Vec::new(), &meta, Vec::new());
    add_xattrs(&mut root, src)?;
    let mut items = vec![Item {
        entry: root,
        source: src.to_path_buf(),
        content: None,
        inode: None,
    }];
    let mut children = walker.list(src)?.unwrap_or_default();
    if git {
        // Refs first (captured), then the rest: see the module doc. Each top-level child's
        // subtree is a contiguous run of items, so the runs are put back in name order.
        // The other children are walked straight into `items`, in name order, the refs' runs
        // put in between: the big run (`objects`, 200k entries in a busy repository) is never
        // moved again.
        children.sort_by(|a, b| a.name.cmp(&b.name));
        let mut ref_runs: HashMap<Vec<u8>, Vec<Item>> = HashMap::new();
        for c in children.iter().filter(|c| gitdir::is_ref_path(&c.name)) {
            let mut run = Vec::new();
            walker.child(&c.path, c.name.clone(), Some(&c.dirent), &mut run)?;
            ref_runs.insert(c.name.clone(), run);
        }
        for c in children {
            match ref_runs.remove(&c.name) {
                Some(run) => items.extend(run),
                None => walker.child(&c.path, c.name, Some(&c.dirent), &mut items)?,
            }
        }
    } else {
        children.sort_by(|a, b| a.name.cmp(&b.name));
        for c in children {
            walker.child(&c.path, c.name, Some(&c.dirent), &mut items)?;
        }
    }
    phases.mark("tree walked");
    if let (Some(file), Some(kept)) = (cache_file, walker.kept.take()) {
        // A cache that cannot be written costs the next pass a full scan, nothing else.
        if let Err(e) = kept.save(file) {
            tracing::warn!(path = %file.display(), error = %e, "could not write the scan cache; the next pass reads every directory");
        }
    }
    let borrowed = if git {
        take_in_borrowed_objects(src, &mut items, opts.dissociate)?
    } else {
        None
    };
    phases.mark("cache written, borrowed objects");
    let hardlinks = link_later_names(&mut items);
    let mut entries = Vec::with_capacity(items.len());
    let mut sources = Vec::with_capacity(items.len());
    let mut captured = HashMap::new();
    for (i, item) in items.into_iter().enumerate() {
        if let Some(c) = item.content {
            captured.insert(i, c);
        }
        entries.push(item.entry);
        sources.push(item.source);
    }
    phases.mark("hardlinks, entries");
    let manifest = Manifest::from_scan(RootKind::Dir, opts.chunk_size, entries);
    phases.mark("manifest hashed");
    phases.log("scanned", manifest.entries.len());
    Ok(Scan {
        manifest,
        sources,
        skipped: walker.skipped,
        captured,
        git,
        transient_skipped: walker.transient_skipped,
        vanished: walker.vanished,
        hardlinks,
        external_links: walker.external_links,
        borrowed,
        cached_dirs: walker.cached_dirs,
    })
}

/// Path order of the manifest: depth first, a directory before its children, children by
/// name bytes (component by component: `a/b` comes before `a-c`).
fn manifest_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

/// Inserts `item` at its place in `items` (in manifest order).
fn insert_in_order(items: &mut Vec<Item>, item: Item) {
    let at = items.partition_point(|i| manifest_order(&i.entry.path, &item.entry.path).is_lt());
    items.insert(at, item);
}

/// A git directory that borrows objects (`objects/info/alternates`): refused, or with
/// `dissociate` its alternates file is left out and the borrowed objects, reachable from the
/// refs captured in `items`, are added as one pack ([`crate::dissociate`]).
fn take_in_borrowed_objects(
    src: &Path,
    items: &mut Vec<Item>,
    dissociate: bool,
) -> Result<Option<BorrowedPack>, Error> {
    const ALTERNATES: &[u8] = b"objects/info/alternates";
    let Some(at) = items
        .iter()
        .position(|i| i.entry.path == ALTERNATES && i.entry.kind == EntryKind::File)
    else {
        return Ok(None);
    };
    let pools = match fs::read(&items[at].source) {
        Ok(content) => gitdir::alternates(&content),
        Err(e) if is_vanished(&e) => Vec::new(),
        Err(e) => return Err(Error::io(&items[at].source, e)),
    };
    if pools.is_empty() {
        return Ok(None);
    }
    if !dissociate {
        return Err(Error::Input(format!(
            "{} borrows objects from {} (objects/info/alternates): a copy would lack them, or              point back at this host's disk. Pass --dissociate to send the borrowed objects              along (the copy is self-contained; this repository is not changed)",
            src.display(),
            pools.join(", ")
        )));
    }
    items.remove(at);
    let tips: Vec<String> = items
        .iter()
        .filter_map(|i| i.content.as_deref())
        .flat_map(gitdir::ref_tips)
        .collect();
    let Some(pack) = crate::dissociate::pack_borrowed(src, &tips)? else {
        return Ok(None);
    };
    // The pack's entries look like git's own: read-only, owned like the object directory.
    let objects = items
        .iter()
        .find(|i| i.entry.path == b"objects")
        .map(|i| i.entry.clone())
        .ok_or_else(|| Error::Other("a git directory without objects/".into()))?;
    let owned = |mut e: Entry, mode: u32| {
        e.mode = mode;
        e.attrs = objects.attrs.as_ref().map(|a| Attrs {
            xattrs: Vec::new(),
            ..a.clone()
        });
        e
    };
    if !items.iter().any(|i| i.entry.path == b"objects/pack") {
        let meta = fs::metadata(pack.dir()).map_err(|e| Error::io(pack.dir(), e))?;
        let entry = entry_from_metadata(b"objects/pack".to_vec(), &meta, Vec::new());
        insert_in_order(
            items,
            Item {
                entry: owned(entry, objects.mode),
                source: pack.dir().to_path_buf(),
                content: None,
                inode: None,
            },
        );
    }
    for (name, path) in &pack.files {
        let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let rel = format!("objects/pack/{name}").into_bytes();
        insert_in_order(
            items,
            Item {
                entry: owned(entry_from_metadata(rel, &meta, Vec::new()), 0o444),
                source: path.clone(),
                content: None,
                inode: None,
            },
        );
    }
    Ok(Some(pack))
}

/// Turns the later names of a file with several (in manifest order, the order the receiver
/// validates them in) into hardlinks to its first; returns how many.
fn link_later_names(items: &mut [Item]) -> u64 {
    let mut first: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut linked = 0;
    for item in items {
        let Some(inode) = item.inode else { continue };
        match first.get(&inode) {
            Some(path) => {
                item.entry.kind = EntryKind::Hardlink;
                item.entry.size = 0;
                item.entry.link_target = path.clone();
                item.content = None;
                linked += 1;
            }
            None => {
                first.insert(inode, item.entry.path.clone());
            }
        }
    }
    linked
}

/// Why a symlink leaving the tree is refused, and what the operator can do.
fn escaping_link(path: &Path, target: &[u8]) -> Error {
    let target = String::from_utf8_lossy(target);
    let how = if target.starts_with('/') {
        format!(
            "if {target} lies in a shared directory that exists on both hosts, allow it with              --allow-external-link DIR (the link is then copied as it is)"
        )
    } else {
        "a relative link out of the tree is never copied (it would point elsewhere under the          receiver's root): make it absolute and allow its directory with          --allow-external-link DIR"
            .to_string()
    };
    Error::Input(format!(
        "{} is a symlink to {target}, outside the tree: its copy would dangle or point at          something else; {how}",
        path.display()
    ))
}

fn not_a_git_dir(src: &Path) -> Error {
    Error::Input(format!(
        "--git on: source {} is not a git directory (it needs HEAD, objects/ and refs/)",
        src.display()
    ))
}

/// A directory's child: its name and path.
/// Subdirectories from which a directory's walk is split across threads ([`Walker::walk`]).
const PARALLEL_WALK_MIN_SUBDIRS: usize = 16;

/// A listed name: its path, and its directory entry, whose `metadata()` is an `fstatat` on
/// the open directory (no walk of the whole path again: a large share of a 200k-entry scan).
struct Child {
    name: Vec<u8>,
    path: PathBuf,
    dirent: fs::DirEntry,
}

/// One scanned entry and where it lives.
struct Item {
    entry: Entry,
    source: PathBuf,
    content: Option<bytes::Bytes>,
    /// (device, inode) of a regular file with more than one name.
    inode: Option<(u64, u64)>,
}

struct Walker {
    git: bool,
    skipped: Vec<String>,
    vanished: Vec<String>,
    transient_skipped: u64,
    capture_budget: u64,
    /// `--allow-external-link` prefixes.
    allowed_external: Vec<Vec<u8>>,
    /// Symlinks leaving the tree that they allowed.
    external_links: u64,
    /// Listings of loose-object directories from the previous pass ([`crate::scan_cache`]),
    /// shared with the helper threads (each directory is taken once).
    cache: Arc<Mutex<ScanCache>>,
    /// Whether to use `cache` (git mode with a cache file).
    caching: bool,
    /// The listings this scan may leave for the next pass; `None`: it leaves none.
    kept: Option<ScanCache>,
    /// Directories taken from `cache`.
    cached_dirs: u64,
    /// When the scan began: a directory changed less than [`scan_cache::SETTLED_FOR`]
    /// before it is not kept.
    now: SystemTime,
}

impl Walker {
    /// A walker with git's rules or not, the `--allow-external-link` prefixes, and the
    /// previous pass's listings (`None`: no cache), leaving its own when `save`.
    fn new(
        git: bool,
        allowed_external: Vec<Vec<u8>>,
        cache: Option<ScanCache>,
        save: bool,
    ) -> Walker {
        Walker {
            git,
            skipped: Vec::new(),
            vanished: Vec::new(),
            transient_skipped: 0,
            capture_budget: MAX_CAPTURED_BYTES,
            allowed_external,
            external_links: 0,
            caching: cache.is_some(),
            kept: (cache.is_some() && save).then(ScanCache::default),
            cache: Arc::new(Mutex::new(cache.unwrap_or_default())),
            cached_dirs: 0,
            now: SystemTime::now(),
        }
    }

    /// The children of `dir`, or `None` when `dir` vanished.
    fn list(&mut self, dir: &Path) -> Result<Option<Vec<Child>>, Error> {
        let listing = match fs::read_dir(dir) {
            Ok(l) => l,
            Err(e) if is_vanished(&e) => {
                self.vanished.push(dir.display().to_string());
                return Ok(None);
            }
            Err(e) => return Err(Error::io(dir, e)),
        };
        let mut children = Vec::new();
        for d in listing {
            match d {
                Ok(d) => children.push(Child {
                    name: d.file_name().as_bytes().to_vec(),
                    path: d.path(),
                    dirent: d,
                }),
                Err(e) if is_vanished(&e) => {
                    self.vanished.push(dir.display().to_string());
                    return Ok(None);
                }
                Err(e) => return Err(Error::io(dir, e)),
            }
        }
        Ok(Some(children))
    }

    /// Walks the subtree of `dir` (already an item) into `out`.
    fn walk(&mut self, dir: &Path, prefix: &[u8], out: &mut Vec<Item>) -> Result<(), Error> {
        let Some(mut children) = self.list(dir)? else {
            return Ok(());
        };
        children.sort_by(|a, b| a.name.cmp(&b.name));
        let rel_of = |c: &Child| {
            let mut rel = prefix.to_vec();
            rel.push(b'/');
            rel.extend_from_slice(&c.name);
            rel
        };
        let subdirs = children
            .iter()
            .filter(|c| c.dirent.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        // A fan-out directory (git's objects/00..ff) is walked by several threads: the scan
        // is a stat per entry, and 200k loose objects take a second on one core inside a
        // final pass's read-only window. Refs are never split (their capture budget is one).
        // With a scan cache the fan-out's directories are mostly not read at all: threads
        // would only add the copy of their results.
        let cached = self.caching && self.cache.lock().is_ok_and(|c| !c.is_empty());
        if subdirs < PARALLEL_WALK_MIN_SUBDIRS
            || threads < 2
            || gitdir::is_ref_path(prefix)
            || cached
        {
            for c in children {
                let rel = rel_of(&c);
                self.child(&c.path, rel, Some(&c.dirent), out)?;
            }
            return Ok(());
        }
        let per_thread = children.len().div_ceil(threads);
        let results: Vec<Result<(Walker, Vec<Item>), Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = children
                .chunks(per_thread)
                .map(|part| {
                    let mut walker = self.helper();
                    scope.spawn(move || {
                        let mut items = Vec::new();
                        for c in part {
                            walker.child(&c.path, rel_of(c), Some(&c.dirent), &mut items)?;
                        }
                        Ok((walker, items))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Other("a scan thread panicked".into())))
                })
                .collect()
        });
        for result in results {
            let (walker, items) = result?;
            self.absorb(walker);
            out.extend(items);
        }
        Ok(())
    }

    /// A walker for part of a directory, on another thread: same rules, its own findings
    /// (merged back by [`Walker::absorb`]), no budget for capturing refs.
    fn helper(&self) -> Walker {
        Walker {
            git: self.git,
            skipped: Vec::new(),
            vanished: Vec::new(),
            transient_skipped: 0,
            capture_budget: 0,
            allowed_external: self.allowed_external.clone(),
            external_links: 0,
            cache: self.cache.clone(),
            caching: self.caching,
            kept: self.kept.as_ref().map(|_| ScanCache::default()),
            cached_dirs: 0,
            now: self.now,
        }
    }

    fn absorb(&mut self, other: Walker) {
        self.skipped.extend(other.skipped);
        self.vanished.extend(other.vanished);
        self.transient_skipped += other.transient_skipped;
        self.external_links += other.external_links;
        self.cached_dirs += other.cached_dirs;
        if let (Some(kept), Some(theirs)) = (self.kept.as_mut(), other.kept) {
            kept.absorb(theirs);
        }
    }

    /// Walks the loose-object directory `dir` (at `rel`, described by `meta`, taken before
    /// it is read), or reuses its listing from the previous pass when it did not change
    /// since ([`crate::scan_cache`]).
    fn walk_loose_objects(
        &mut self,
        dir: &Path,
        rel: &[u8],
        meta: &fs::Metadata,
        out: &mut Vec<Item>,
    ) -> Result<(), Error> {
        let stamp = DirStamp::of(meta);
        let earlier = self.cache.lock().ok().and_then(|mut c| c.take(rel, &stamp));
        if let Some(entries) = earlier {
            if let Some(kept) = self.kept.as_mut() {
                kept.keep(rel, stamp, entries.clone(), self.now);
            }
            out.reserve(entries.len());
            for entry in entries {
                let name = entry
                    .path
                    .rsplit(|b| *b == b'/')
                    .next()
                    .unwrap_or(&entry.path);
                let source = dir.join(std::ffi::OsStr::from_bytes(name));
                out.push(Item {
                    entry,
                    source,
                    content: None,
                    inode: None,
                });
            }
            self.cached_dirs += 1;
            return Ok(());
        }
        let (first, vanished) = (out.len(), self.vanished.len());
        self.walk(dir, rel, out)?;
        let complete = self.vanished.len() == vanished;
        let single_names = out[first..].iter().all(|i| i.inode.is_none());
        if let Some(kept) = self.kept.as_mut().filter(|_| complete && single_names) {
            let entries = out[first..].iter().map(|i| i.entry.clone()).collect();
            kept.keep(rel, stamp, entries, self.now);
        }
        Ok(())
    }

    /// Adds `path` (at relative path `rel`, listed as `dirent`) and, for a directory, its
    /// subtree to `out`.
    fn child(
        &mut self,
        path: &Path,
        rel: Vec<u8>,
        dirent: Option<&fs::DirEntry>,
        out: &mut Vec<Item>,
    ) -> Result<(), Error> {
        if self.git && gitdir::is_transient(&rel) {
            self.transient_skipped += 1;
            return Ok(());
        }
        let meta = match dirent.map_or_else(|| fs::symlink_metadata(path), |d| d.metadata()) {
            Ok(m) => m,
            Err(e) if is_vanished(&e) => {
                self.vanished.push(path.display().to_string());
                return Ok(());
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = match fs::read_link(path) {
                Ok(t) => t.as_os_str().as_bytes().to_vec(),
                Err(e) if is_vanished(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    // Gone, or replaced by something that is not a symlink.
                    self.vanished.push(path.display().to_string());
                    return Ok(());
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            if !symlink_stays_inside(&rel, &target) {
                if !external_link_allowed(&target, &self.allowed_external) {
                    return Err(escaping_link(path, &target));
                }
                self.external_links += 1;
            }
            self.push(
                out,
                entry_from_metadata(rel, &meta, target),
                path,
                None,
                &meta,
            )?;
        } else if ft.is_dir() {
            let entry = entry_from_metadata(rel.clone(), &meta, Vec::new());
            if self.push(out, entry, path, None, &meta)? {
                if self.caching && scan_cache::is_loose_object_dir(&rel) {
                    self.walk_loose_objects(path, &rel, &meta, out)?;
                } else {
                    self.walk(path, &rel, out)?;
                }
            }
        } else if ft.is_file() {
            let captured = if self.git && gitdir::is_ref_path(&rel) {
                self.capture(path, &meta)?
            } else {
                None
            };
            match captured {
                Some(Captured::Vanished) => self.vanished.push(path.display().to_string()),
                Some(Captured::Read(meta, content)) => {
                    let entry = entry_from_metadata(rel, &meta, Vec::new());
                    self.push(out, entry, path, Some(content), &meta)?;
                }
                None => {
                    let entry = entry_from_metadata(rel, &meta, Vec::new());
                    self.push(out, entry, path, None, &meta)?;
                }
            }
        } else {
            tracing::warn!(path = %path.display(), "skipping a special file (socket, FIFO or device)");
            self.skipped
                .push(format!("{}: special file", String::from_utf8_lossy(&rel)));
        }
        Ok(())
    }

    /// Adds `entry` (of `path`, described by `meta`) with its extended attributes; false
    /// when `path` vanished meanwhile (then it is left out, and named in `vanished`).
    fn push(
        &mut self,
        out: &mut Vec<Item>,
        mut entry: Entry,
        path: &Path,
        content: Option<bytes::Bytes>,
        meta: &fs::Metadata,
    ) -> Result<bool, Error> {
        if !add_xattrs(&mut entry, path)? {
            self.vanished.push(path.display().to_string());
            return Ok(false);
        }
        let inode = (meta.is_file() && meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
        out.push(Item {
            entry,
            source: path.to_path_buf(),
            content,
            inode,
        });
        Ok(true)
    }

    /// Reads a ref file into memory, with the `stat` of the version read. `None` when it
    /// does not fit the budget or kept changing while read (it is then read at send time).
    fn capture(&mut self, path: &Path, listed: &fs::Metadata) -> Result<Option<Captured>, Error> {
        if listed.len() > self.capture_budget {
            return Ok(None);
        }
        for _ in 0..3 {
            let mut file = match fs::File::open(path) {
                Ok(f) => f,
                Err(e) if is_vanished(&e) => return Ok(Some(Captured::Vanished)),
                Err(e) => return Err(Error::io(path, e)),
            };
            let before = file.metadata().map_err(|e| Error::io(path, e))?;
            if !before.is_file() || before.len() > self.capture_budget {
                return Ok(None);
            }
            let mut content = Vec::with_capacity(before.len() as usize);
            file.by_ref()
                .take(before.len() + 1)
                .read_to_end(&mut content)
                .map_err(|e| Error::io(path, e))?;
            let after = file.metadata().map_err(|e| Error::io(path, e))?;
            let unchanged = content.len() as u64 == before.len()
                && entry_from_metadata(Vec::new(), &after, Vec::new())
                    .same_version(&entry_from_metadata(Vec::new(), &before, Vec::new()));
            if unchanged {
                self.capture_budget -= before.len();
                return Ok(Some(Captured::Read(Box::new(before), content.into())));
            }
        }
        Ok(None)
    }
}

enum Captured {
    Vanished,
    /// The content and the `stat` of the version read.
    Read(Box<fs::Metadata>, bytes::Bytes),
}

/// Paths whose source changed since the scan (size, mtime, inode or ctime), or vanished; a
/// hardlink changed when its path no longer names the same inode.
/// In git mode a content-addressed file (a pack, a loose object) is not looked at again: its
/// name says its content, which git writes once (to a temporary name, then renamed) and never
/// changes (it only freshens the mtime, even on a refused push); what the receiver verified
/// is therefore what the name means, and if a repack deleted it since, the copy simply holds
/// it in a form A no longer does. That skips a `stat` per loose object in the frozen final
/// pass (200,000 in the 5 GB busy fixture: ~0.5 s of the read-only window) and never fails a
/// frozen pass over a repack's deletions.
pub fn changed_since_scan(scan: &Scan) -> Vec<String> {
    let mut changed = Vec::new();
    for (e, src) in scan.manifest.entries.iter().zip(&scan.sources) {
        if scan.git && e.kind == EntryKind::File && gitdir::is_content_addressed(&e.path) {
            continue;
        }
        if e.kind == EntryKind::Hardlink {
            if !fs::symlink_metadata(src).is_ok_and(|m| m.is_file() && m.ino() == e.ino) {
                changed.push(src.display().to_string());
            }
            continue;
        }
        if e.kind != EntryKind::File {
            continue;
        }
        let same = fs::symlink_metadata(src)
            .map(|m| {
                let now = entry_from_metadata(e.path.clone(), &m, Vec::new());
                gitdir::same_source_version(e, &now, scan.git)
            })
            .unwrap_or(false);
        if !same {
            changed.push(src.display().to_string());
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(git: GitMode) -> ScanOptions {
        ScanOptions {
            chunk_size: 1 << 20,
            git,
            ..ScanOptions::default()
        }
    }

    fn paths(s: &Scan) -> Vec<String> {
        s.manifest
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect()
    }

    /// A bare repository's skeleton with a push and a repack in progress.
    fn busy_git_dir(dir: &Path) {
        for d in [
            "objects/pack",
            "objects/4b",
            "objects/tmp_objdir-incoming-Ab12Cd/4b",
            "refs/heads",
            "refs/tags",
        ] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        for (f, text) in [
            ("HEAD", "ref: refs/heads/main\n"),
            ("config", "[core]\n\tbare = true\n"),
            ("packed-refs", "# pack-refs with: peeled\n"),
            (
                "refs/heads/main",
                "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n",
            ),
            (
                "refs/heads/main.lock",
                "1111111111111111111111111111111111111111\n",
            ),
            ("objects/4b/825dc642cb6eb9a060e54bf8d69288fbee4904", "x"),
            ("objects/tmp_objdir-incoming-Ab12Cd/4b/0000", "y"),
            ("objects/pack/pack-1.pack", "pack"),
            ("objects/pack/tmp_pack_XyZ", "partial"),
            ("objects/pack/.tmp-99-pack-1.idx", "partial"),
            ("gc.pid", "123 host"),
        ] {
            fs::write(dir.join(f), text).unwrap();
        }
    }

    #[test]
    fn a_fan_out_directory_walked_by_several_threads_scans_as_one_walk_would() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        // 40 fan-out directories (more than PARALLEL_WALK_MIN_SUBDIRS), each with two loose
        // objects, a subdirectory, and every fifth a push's quarantine to be left out.
        let mut expected = Vec::new();
        for i in 0..40u8 {
            let fan = format!("objects/{i:02x}");
            fs::create_dir_all(t.path().join(&fan).join("sub")).unwrap();
            for name in ["aa", "bb"] {
                let object = format!("{fan}/{name}{}", "0".repeat(36));
                fs::write(t.path().join(&object), &object).unwrap();
            }
            fs::write(t.path().join(&fan).join("sub/x"), "x").unwrap();
            if i % 5 == 0 {
                fs::create_dir_all(t.path().join(format!("{fan}/tmp_objdir-incoming-{i}")))
                    .unwrap();
            }
            expected.push(fan);
        }
        let git = scan(t.path(), opts(GitMode::On)).unwrap();
        let listed = paths(&git);
        // Manifest order, every fan-out directory with its whole subtree, nothing transient.
        let mut sorted = listed.clone();
        sorted.sort_by(|a, b| manifest_order(a.as_bytes(), b.as_bytes()));
        assert_eq!(listed, sorted);
        for fan in &expected {
            let inside: Vec<_> = listed
                .iter()
                .filter(|p| p.starts_with(fan.as_str()))
                .collect();
            assert_eq!(inside.len(), 5, "{fan}: {inside:?}");
        }
        assert!(
            !listed.iter().any(|p| p.contains("tmp_objdir")),
            "{listed:?}"
        );
        // 8 quarantines in the fan-out, plus busy_git_dir's own transient files.
        let single = {
            let u = tempfile::tempdir().unwrap();
            busy_git_dir(u.path());
            scan(u.path(), opts(GitMode::On)).unwrap().transient_skipped
        };
        assert_eq!(git.transient_skipped, single + 8);
        // The same tree scans to the same manifest every time.
        let again = scan(t.path(), opts(GitMode::On)).unwrap();
        assert_eq!(again.manifest.manifest_hash, git.manifest.manifest_hash);
    }

    #[test]
    fn git_mode_leaves_transient_files_out_and_captures_refs() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        let s = scan(t.path(), opts(GitMode::Auto)).unwrap();
        assert!(s.git);
        assert_eq!(
            paths(&s),
            [
                "",
                "HEAD",
                "config",
                "objects",
                "objects/4b",
                "objects/4b/825dc642cb6eb9a060e54bf8d69288fbee4904",
                "objects/pack",
                "objects/pack/pack-1.pack",
                "packed-refs",
                "refs",
                "refs/heads",
                "refs/heads/main",
                "refs/tags",
            ]
        );
        // The quarantine directory, the lock, two temporary pack files and gc.pid.
        assert_eq!(s.transient_skipped, 5);
        assert!(s.vanished.is_empty());
        let captured: Vec<&str> = {
            let mut v: Vec<usize> = s.captured.keys().copied().collect();
            v.sort();
            v.into_iter()
                .map(|i| std::str::from_utf8(&s.manifest.entries[i].path).unwrap())
                .collect()
        };
        assert_eq!(captured, ["HEAD", "packed-refs", "refs/heads/main"]);
        let main = s
            .manifest
            .entries
            .iter()
            .position(|e| e.path == b"refs/heads/main")
            .unwrap();
        assert_eq!(
            &s.captured[&main][..],
            b"4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"
        );
        assert_eq!(s.manifest.entries[main].size, 41);
    }

    #[test]
    fn the_same_tree_scans_to_the_same_manifest_in_both_modes_when_nothing_is_transient() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        for f in [
            "refs/heads/main.lock",
            "objects/pack/tmp_pack_XyZ",
            "objects/pack/.tmp-99-pack-1.idx",
            "gc.pid",
        ] {
            fs::remove_file(t.path().join(f)).unwrap();
        }
        fs::remove_dir_all(t.path().join("objects/tmp_objdir-incoming-Ab12Cd")).unwrap();
        let git = scan(t.path(), opts(GitMode::On)).unwrap();
        let plain = scan(t.path(), opts(GitMode::Off)).unwrap();
        assert!(git.git && !plain.git);
        assert_eq!(git.manifest, plain.manifest);
        assert!(plain.captured.is_empty());
    }

    #[test]
    fn git_off_copies_everything_and_git_on_requires_a_git_dir() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        let s = scan(t.path(), opts(GitMode::Off)).unwrap();
        assert!(!s.git);
        assert_eq!(s.transient_skipped, 0);
        assert!(paths(&s).contains(&"gc.pid".to_string()));
        assert!(paths(&s).contains(&"objects/pack/tmp_pack_XyZ".to_string()));

        let plain = tempfile::tempdir().unwrap();
        fs::write(plain.path().join("HEAD"), "not git").unwrap();
        fs::write(plain.path().join("gc.pid"), "1").unwrap();
        let s = scan(plain.path(), opts(GitMode::Auto)).unwrap();
        assert!(!s.git, "auto needs HEAD, objects/ and refs/");
        assert_eq!(paths(&s), ["", "HEAD", "gc.pid"]);
        let err = scan(plain.path(), opts(GitMode::On)).err().unwrap();
        assert!(err.to_string().contains("not a git directory"), "{err}");
    }

    #[test]
    fn a_freshened_pack_is_not_a_changed_source_in_git_mode() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        let pack = "objects/pack/pack-0123456789abcdef0123456789abcdef01234567.pack";
        fs::write(t.path().join(pack), "pack bytes").unwrap();
        let git = scan(t.path(), opts(GitMode::On)).unwrap();
        let plain = scan(t.path(), opts(GitMode::Off)).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        let touch = |rel: &str| {
            fs::File::options()
                .write(true)
                .open(t.path().join(rel))
                .unwrap()
                .set_modified(later)
                .unwrap()
        };
        touch(pack);
        assert!(changed_since_scan(&git).is_empty());
        assert_eq!(changed_since_scan(&plain).len(), 1);
        // Same size, other bytes, under a name git never trusts: changed in both modes.
        touch("packed-refs");
        assert_eq!(changed_since_scan(&git).len(), 1);
        // A content-addressed file is not looked at again in git mode, even gone (a repack
        // deleting it after it was sent): its name is its content. Without git mode it is.
        fs::remove_file(t.path().join(pack)).unwrap();
        assert_eq!(changed_since_scan(&git).len(), 1);
        assert_eq!(changed_since_scan(&plain).len(), 2);
    }

    #[test]
    fn later_names_of_a_file_become_hardlinks_in_manifest_order_with_xattrs_read() {
        let t = tempfile::tempdir().unwrap();
        busy_git_dir(t.path());
        fs::create_dir(t.path().join("hooks")).unwrap();
        // The walk reads refs first, but the manifest lists hooks/ before refs/: the file
        // entry must be the first *in the manifest*, which the receiver checks links against.
        fs::hard_link(
            t.path().join("refs/heads/main"),
            t.path().join("hooks/main-copy"),
        )
        .unwrap();
        xattr::set(t.path().join("config"), "user.b", b"2").unwrap();
        xattr::set(t.path().join("config"), "user.a", b"1").unwrap();
        let s = scan(t.path(), opts(GitMode::On)).unwrap();
        let find = |p: &str| {
            s.manifest
                .entries
                .iter()
                .position(|e| e.path == p.as_bytes())
                .unwrap()
        };
        let (copy, main) = (find("hooks/main-copy"), find("refs/heads/main"));
        assert!(copy < main);
        assert_eq!(s.manifest.entries[copy].kind, EntryKind::File);
        assert_eq!(s.manifest.entries[copy].size, 41);
        let link = &s.manifest.entries[main];
        assert_eq!(
            (link.kind, link.size, &link.link_target[..]),
            (EntryKind::Hardlink, 0, &b"hooks/main-copy"[..])
        );
        assert!(!s.captured.contains_key(&main), "a hardlink has no content");
        assert_eq!(s.hardlinks, 1);
        let config = s.manifest.entries[find("config")].attrs.as_ref().unwrap();
        assert_eq!(
            config.xattrs,
            [
                (b"user.a".to_vec(), b"1".to_vec()),
                (b"user.b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(config.uid, unsafe { libc::geteuid() });
        // The receiver accepts what the scan produced.
        let mut b = crate::manifest::ManifestBuilder::new(&crate::wire::Hello {
            version: crate::wire::PROTOCOL_VERSION,
            dest: b"r.git".to_vec(),
            chunk_size: s.manifest.chunk_size,
            entry_count: s.manifest.entries.len() as u64,
            total_bytes: s.manifest.total_bytes,
            ..Default::default()
        })
        .unwrap();
        for e in &s.manifest.entries {
            b.push(e.clone()).unwrap();
        }
        b.finish(&s.manifest.manifest_hash).unwrap();
    }

    #[test]
    fn vanished_entries_are_reported_not_fatal() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        fs::write(t.path().join("d/f"), "x").unwrap();
        let mut w = Walker::new(false, Vec::new(), None, false);
        let mut out = Vec::new();
        // Listed, then gone before its stat; a directory gone before its listing.
        w.child(&t.path().join("gone"), b"gone".to_vec(), None, &mut out)
            .unwrap();
        w.walk(&t.path().join("gone-dir"), b"gone-dir", &mut out)
            .unwrap();
        // A file that turned into a directory's parent mid-walk (ENOTDIR).
        w.child(&t.path().join("d/f/x"), b"d/f/x".to_vec(), None, &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(w.vanished.len(), 3, "{:?}", w.vanished);
    }

    /// Writes loose object `objects/XX/REST` (any content: the scan does not hash it).
    fn loose_object(dir: &Path, id: &str, content: &str) {
        let (fan, rest) = id.split_at(2);
        fs::create_dir_all(dir.join("objects").join(fan)).unwrap();
        fs::write(dir.join("objects").join(fan).join(rest), content).unwrap();
    }

    #[test]
    fn a_cached_scan_lists_what_a_full_scan_lists_and_reads_only_changed_directories() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r.git");
        busy_git_dir(&repo);
        let id = |fan: &str, n: usize| format!("{fan}{n:038x}");
        for fan in ["00", "4c", "ab", "ff"] {
            for n in 0..5 {
                loose_object(&repo, &id(fan, n), fan);
            }
        }
        let cache = t.path().join("cache/r.scan");
        let cached = |save: bool| {
            scan(
                &repo,
                ScanOptions {
                    cache_file: Some(cache.clone()),
                    save_cache: save,
                    ..opts(GitMode::On)
                },
            )
            .unwrap()
        };
        // Just written: too fresh to be trusted, nothing kept.
        let first = cached(true);
        assert_eq!(first.cached_dirs, 0);
        assert!(ScanCache::load(&cache).is_empty());
        // Settled: every loose-object directory is kept, then reused as it is.
        std::thread::sleep(scan_cache::SETTLED_FOR + std::time::Duration::from_millis(100));
        assert_eq!(cached(true).cached_dirs, 0);
        assert_eq!(ScanCache::load(&cache).len(), 5, "00, 4b, 4c, ab, ff");
        let again = cached(false);
        assert_eq!(again.cached_dirs, 5);
        assert_eq!(again.manifest.manifest_hash, first.manifest.manifest_hash);
        assert_eq!(again.sources, first.sources);

        // A push adds an object to one directory, a prune removes one from another, a refs
        // update: only those directories are read, and the manifest is a full scan's.
        loose_object(&repo, &id("4c", 9), "new");
        fs::remove_file(repo.join("objects/ab").join(&id("ab", 3)[2..])).unwrap();
        fs::write(repo.join("refs/heads/main"), format!("{}\n", id("4c", 9))).unwrap();
        let after = cached(false);
        assert_eq!(after.cached_dirs, 3, "00, 4b and ff are unchanged");
        let full = scan(&repo, opts(GitMode::On)).unwrap();
        assert_eq!(after.manifest.manifest_hash, full.manifest.manifest_hash);
        assert_eq!(after.sources, full.sources);
        assert_eq!(after.manifest.entries, full.manifest.entries);

        // What the cache trusts: git never changes a loose object in place, so a chmod by
        // hand (the directory untouched) is not seen; --no-scan-cache sees it.
        let f = repo.join("objects/00").join(&id("00", 1)[2..]);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let mode_of = |s: &Scan| {
            let i = s.sources.iter().position(|p| *p == f).unwrap();
            s.manifest.entries[i].mode
        };
        assert_eq!(mode_of(&cached(false)), 0o644);
        assert_eq!(mode_of(&scan(&repo, opts(GitMode::On)).unwrap()), 0o600);

        // A damaged cache is no cache.
        let mut bytes = fs::read(&cache).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&cache, bytes).unwrap();
        assert_eq!(cached(false).cached_dirs, 0);
        // Off in plain mode, and with --dissociate.
        let plain = scan(
            &repo,
            ScanOptions {
                cache_file: Some(cache.clone()),
                ..opts(GitMode::Off)
            },
        )
        .unwrap();
        assert_eq!(plain.cached_dirs, 0);
    }
}
