//! Walks the source tree into manifest entries, in a deterministic order.
//!
//! Order: depth-first, a directory before its children, children sorted by name bytes, so
//! two scans of an unchanged tree give the same manifest (and the same manifest hash).
//! Kept: regular files, directories, symlinks that stay inside the tree. Skipped with a
//! warning (and listed in the summary): symlinks that leave the tree, sockets, FIFOs and
//! devices, which have no meaning on another host.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::manifest::{symlink_stays_inside, Manifest};
use crate::wire::{Entry, EntryKind, RootKind};

/// A scanned source: the manifest plus where each entry lives locally.
pub struct Scan {
    pub manifest: Manifest,
    pub sources: Vec<PathBuf>,
    /// Entries left out, with the reason.
    pub skipped: Vec<String>,
}

/// Builds the entry describing `meta` at relative path `rel`.
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
    }
}

/// Scans `src` (a directory or a regular file).
pub fn scan(src: &Path, chunk_size: u64) -> Result<Scan, Error> {
    let meta = fs::symlink_metadata(src).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
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
        let entry = entry_from_metadata(Vec::new(), &meta, Vec::new());
        return Ok(Scan {
            manifest: Manifest::from_scan(RootKind::File, chunk_size, vec![entry]),
            sources: vec![src.to_path_buf()],
            skipped: Vec::new(),
        });
    }
    if !ft.is_dir() {
        return Err(Error::Input(format!(
            "source {} is neither a file nor a directory",
            src.display()
        )));
    }
    // The root directory itself is entry 0 (empty path): its mode and mtime travel too.
    let mut entries = vec![entry_from_metadata(Vec::new(), &meta, Vec::new())];
    let mut sources = vec![src.to_path_buf()];
    let mut skipped = Vec::new();
    walk(src, Vec::new(), &mut entries, &mut sources, &mut skipped)?;
    Ok(Scan {
        manifest: Manifest::from_scan(RootKind::Dir, chunk_size, entries),
        sources,
        skipped,
    })
}

fn walk(
    dir: &Path,
    prefix: Vec<u8>,
    entries: &mut Vec<Entry>,
    sources: &mut Vec<PathBuf>,
    skipped: &mut Vec<String>,
) -> Result<(), Error> {
    let mut children: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|r| {
            r.map(|d| (d.file_name().as_bytes().to_vec(), d.path()))
                .map_err(|e| Error::io(dir, e))
        })
        .collect::<Result<_, _>>()?;
    children.sort();
    for (name, path) in children {
        let rel = if prefix.is_empty() {
            name
        } else {
            let mut r = prefix.clone();
            r.push(b'/');
            r.extend_from_slice(&name);
            r
        };
        let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| Error::io(&path, e))?;
            let target = target.as_os_str().as_bytes().to_vec();
            if !symlink_stays_inside(&rel, &target) {
                tracing::warn!(path = %path.display(), target = %String::from_utf8_lossy(&target),
                    "skipping a symlink that points outside the tree");
                skipped.push(format!(
                    "{}: symlink to {} leaves the tree",
                    String::from_utf8_lossy(&rel),
                    String::from_utf8_lossy(&target)
                ));
                continue;
            }
            entries.push(entry_from_metadata(rel, &meta, target));
            sources.push(path);
        } else if ft.is_dir() {
            entries.push(entry_from_metadata(rel.clone(), &meta, Vec::new()));
            sources.push(path.clone());
            walk(&path, rel, entries, sources, skipped)?;
        } else if ft.is_file() {
            entries.push(entry_from_metadata(rel, &meta, Vec::new()));
            sources.push(path);
        } else {
            tracing::warn!(path = %path.display(), "skipping a special file (socket, FIFO or device)");
            skipped.push(format!("{}: special file", String::from_utf8_lossy(&rel)));
        }
    }
    Ok(())
}

/// Paths whose source changed since the scan (size, mtime, inode or ctime), or vanished.
pub fn changed_since_scan(scan: &Scan) -> Vec<String> {
    let mut changed = Vec::new();
    for (e, src) in scan.manifest.entries.iter().zip(&scan.sources) {
        if e.kind != EntryKind::File {
            continue;
        }
        let same = fs::symlink_metadata(src)
            .map(|m| entry_from_metadata(e.path.clone(), &m, Vec::new()).same_version(e))
            .unwrap_or(false);
        if !same {
            changed.push(src.display().to_string());
        }
    }
    changed
}
