//! What is special about sending a git directory (a bare repository, or a `.git` directory):
//! which of git's files are transient, and which files are its refs.
//!
//! A live repository keeps changing while a pre-copy (`shardsend --stage-only`) reads it:
//! a push writes into a quarantine directory (`objects/tmp_objdir-incoming-*`, or
//! `objects/incoming-*` before git 2.11) that vanishes when the push ends, takes `*.lock`
//! files, and `index-pack`, `repack` and `gc` write `tmp_*`/`.tmp-*` files and `gc.pid`, then
//! rename or delete them. Those files are never part of the repository's state: copying them
//! is useless at best, and harmful at worst (a stale `refs/heads/main.lock` on the target
//! refuses every push to that branch; a stale `gc.pid` blocks gc). So in git mode they are
//! left out of the manifest, in every pass (a frozen repository may hold stale ones too).
//!
//! **Refs are what make a copy consistent.** git writes objects before the refs that point
//! to them, and never deletes a reachable object without first writing it elsewhere. So a
//! copy whose refs were read *before* its object directories were listed holds every object
//! those refs reach, as long as no listed object file vanished before it was read (the
//! sender restarts the pass then). [`is_ref_path`] names the files the scan reads first.
//!
//! **Some of git's files are named by their content.** A loose object `objects/xx/<rest of
//! its id>` holds exactly the object of that id, and `objects/pack/pack-<checksum>.pack` is
//! named by the checksum of its own bytes, its `.idx` and `.rev` being functions of the pack.
//! git never rewrites them, but it *freshens* them (bumps their mtime, so a gc keeps them)
//! whenever it would write an object it already has, e.g. during any push, even a refused
//! one. So for these files, and these only, path and size are the whole identity
//! ([`same_source_version`]): a freshened pack carries over on resume and does not restart a
//! frozen pass. Files git rewrites in place or by rename under the same name (`.bitmap`,
//! a cruft pack's `.mtimes`, `.keep`, `.promisor`, `multi-pack-index`, `commit-graph`, refs,
//! `config`) keep the full (size, mtime, inode, ctime) identity.
//!
//! How git mode is switched on: `shardsend --git auto` (the default) turns it on when the
//! source directory looks like a git directory ([`looks_like_git_dir`]: `HEAD`, `objects/`
//! and `refs/`); `--git on` requires it, `--git off` sends the tree exactly as it is.
//!
//! The rules are sans-io (byte paths relative to the git directory) and unit-tested here;
//! only [`looks_like_git_dir`] touches the file system.

use std::fmt;
use std::path::Path;

use crate::wire::{Entry, EntryKind};

/// Whether the source is treated as a git directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GitMode {
    /// On when the source looks like a git directory.
    #[default]
    Auto,
    /// Always on; a source that is not a git directory is refused.
    On,
    /// Never: every file is copied as it is.
    Off,
}

impl std::str::FromStr for GitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GitMode::Auto),
            "on" => Ok(GitMode::On),
            "off" => Ok(GitMode::Off),
            _ => Err(format!("invalid git mode {s:?}: expected auto, on or off")),
        }
    }
}

impl fmt::Display for GitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GitMode::Auto => "auto",
            GitMode::On => "on",
            GitMode::Off => "off",
        })
    }
}

/// A repository's on-disk formats, as git names them (`extensions.objectFormat`,
/// `extensions.refStorage`): what git on the receiving host must be able to read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GitFormats {
    /// `sha1` or `sha256`.
    pub objects: String,
    /// `files` or `reftable`.
    pub refs: String,
}

impl GitFormats {
    /// Reads them from a repository's `config` file the way git does when it opens the
    /// repository (its own config file only, no includes; section and key names in any
    /// case; `sha1` and `files` unless set). Reading the file instead of asking `git config`
    /// spares a process, and works whatever git (if any) this host has.
    pub fn of_config(config: &[u8]) -> GitFormats {
        let mut formats = GitFormats {
            objects: "sha1".into(),
            refs: "files".into(),
        };
        let mut in_extensions = false;
        for line in config.split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let mut rest = line.trim();
            if let Some(header) = rest.strip_prefix('[') {
                let Some((section, after)) = header.split_once(']') else {
                    in_extensions = false;
                    continue;
                };
                // `[extensions "sub"]` is another section than `[extensions]`.
                in_extensions = section.trim().eq_ignore_ascii_case("extensions");
                rest = after.trim();
            }
            if !in_extensions || rest.is_empty() || rest.starts_with(['#', ';']) {
                continue;
            }
            let Some((key, value)) = rest.split_once('=') else {
                continue;
            };
            let value = value.split(['#', ';']).next().unwrap_or("").trim();
            let value = value.trim_matches('"').to_ascii_lowercase();
            match key.trim().to_ascii_lowercase().as_str() {
                "objectformat" => formats.objects = value,
                "refstorage" => formats.refs = value,
                _ => {}
            }
        }
        formats
    }

    /// Reads `OBJECTS REFS` (as the orchestrator's `git-formats` host script prints it).
    pub fn parse(line: &str) -> Option<GitFormats> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(objects), Some(refs), None) => Some(GitFormats {
                objects: objects.to_string(),
                refs: refs.to_string(),
            }),
            _ => None,
        }
    }

    /// Whether every git since 2.0 reads it (SHA-1 objects, loose and packed refs).
    pub fn is_classic(&self) -> bool {
        self.objects == "sha1" && self.refs == "files"
    }
}

impl fmt::Display for GitFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} objects, {} refs", self.objects, self.refs)
    }
}

/// True when `dir` has what every git directory has: a `HEAD` file and `objects/` and
/// `refs/` directories.
pub fn looks_like_git_dir(dir: &Path) -> bool {
    let is_dir = |name: &str| {
        std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_dir())
    };
    let head_is_file = std::fs::symlink_metadata(dir.join("HEAD")).is_ok_and(|m| {
        let t = m.file_type();
        t.is_file() || t.is_symlink()
    });
    head_is_file && is_dir("objects") && is_dir("refs")
}

/// True when `rel` (a `/`-separated path relative to the git directory) is one of git's
/// transient files or directories, which come and go while git works and are never copied.
/// A directory for which this holds is skipped with everything below it.
pub fn is_transient(rel: &[u8]) -> bool {
    let name = rel.rsplit(|b| *b == b'/').next().unwrap_or(rel);
    // Lock files anywhere: refs, packed-refs, config, index, HEAD, shallow, commit-graph,
    // multi-pack-index, gc.log.
    if name.ends_with(b".lock") {
        return true;
    }
    if rel == b"gc.pid" {
        return true;
    }
    let Some(in_objects) = rel.strip_prefix(b"objects/") else {
        return false;
    };
    // Push quarantine: `objects/tmp_objdir-incoming-XXXXXX` (git >= 2.11) or
    // `objects/incoming-XXXXXX` (older), removed or migrated when the push ends.
    let top = in_objects
        .split(|b| *b == b'/')
        .next()
        .unwrap_or(in_objects);
    if top.starts_with(b"tmp_objdir-") || top.starts_with(b"incoming-") {
        return true;
    }
    // Objects being written: `xx/tmp_obj_*`, `pack/tmp_pack_*`, `pack/tmp_idx_*`,
    // `pack/tmp_rev_*`, `info/commit-graphs/tmp_graph_*`, ...; and repack's
    // `pack/.tmp-PID-pack-*` before its rename.
    name.starts_with(b"tmp_") || name.starts_with(b".tmp-")
}

/// True for the files and directories that hold refs: `HEAD`, `packed-refs` and everything
/// under `refs/`. The scan reads these before it lists any object (see the module doc).
pub fn is_ref_path(rel: &[u8]) -> bool {
    rel == b"HEAD" || rel == b"packed-refs" || rel == b"refs" || rel.starts_with(b"refs/")
}

/// Where a git directory's `objects/info/alternates` says objects are borrowed from: its
/// non-empty lines that are not comments. Empty: the file borrows nothing.
pub fn alternates(content: &[u8]) -> Vec<String> {
    content
        .split(|b| *b == b'\n')
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The object ids a ref file names: a loose ref's id (not a `ref: ...` symbolic ref), or
/// every id of `packed-refs`, peeled ones (`^<id>`) included. Anything else is skipped.
pub fn ref_tips(content: &[u8]) -> Vec<String> {
    let is_id = |s: &[u8]| (s.len() == 40 || s.len() == 64) && s.iter().all(u8::is_ascii_hexdigit);
    content
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = line.strip_prefix(b"^").unwrap_or(line);
            let id = line.split(|b| *b == b' ' || *b == b'\r').next()?;
            is_id(id).then(|| String::from_utf8_lossy(id).into_owned())
        })
        .collect()
}

/// True when `rel` names one of git's content-addressed files: a loose object
/// (`objects/xx/` + 38 or 62 hex digits, SHA-1 or SHA-256) or a pack, its index or its
/// reverse index (`objects/pack/pack-<40 or 64 hex>.{pack,idx,rev}`). Their bytes are fixed
/// by their name (see the module doc); nothing else is.
pub fn is_content_addressed(rel: &[u8]) -> bool {
    let Some(in_objects) = rel.strip_prefix(b"objects/") else {
        return false;
    };
    let hex_id = |s: &[u8]| (s.len() == 40 || s.len() == 64) && s.iter().all(u8::is_ascii_hexdigit);
    if let Some(name) = in_objects.strip_prefix(b"pack/pack-") {
        return [&b".pack"[..], b".idx", b".rev"]
            .iter()
            .any(|ext| name.strip_suffix(*ext).is_some_and(hex_id));
    }
    match in_objects {
        [a, b, b'/', rest @ ..] => {
            a.is_ascii_hexdigit()
                && b.is_ascii_hexdigit()
                && (rest.len() == 38 || rest.len() == 62)
                && rest.iter().all(u8::is_ascii_hexdigit)
        }
        _ => false,
    }
}

/// True when `new` describes the same bytes as `old` (an entry of an earlier scan): the same
/// source version (size, mtime, inode, ctime), or, in git mode, the same path and size of a
/// content-addressed file, whatever git's freshening did to its times (module doc). Decides
/// what a resume carries over and what the frozen pass's source check calls changed.
pub fn same_source_version(old: &Entry, new: &Entry, git: bool) -> bool {
    if git
        && old.kind == EntryKind::File
        && new.kind == EntryKind::File
        && old.path == new.path
        && old.size == new.size
        && is_content_addressed(&new.path)
    {
        return true;
    }
    old.same_version(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_read_from_the_config_as_git_reads_them() {
        let classic =
            GitFormats::of_config(b"[core]\n\trepositoryformatversion = 0\n\tbare = true\n");
        assert_eq!(classic, GitFormats::parse("sha1 files").unwrap());
        assert!(classic.is_classic());
        let modern = GitFormats::of_config(
            b"[core]\n\trepositoryformatversion = 1\n[Extensions]\n\tobjectFormat = sha256 # new\n\
              \tREFSTORAGE=\"reftable\"\n[remote \"origin\"]\n\turl = x\n",
        );
        assert_eq!(modern, GitFormats::parse("sha256 reftable").unwrap());
        assert!(!modern.is_classic());
        assert_eq!(modern.to_string(), "sha256 objects, reftable refs");
        // A subsection, a comment and a key elsewhere are not the repository's format.
        let other = GitFormats::of_config(
            b"[extensions \"x\"]\n\tobjectformat = sha256\n[core]\n\tobjectformat = sha256\n\
              [extensions]\n\t# refstorage = reftable\n",
        );
        assert!(other.is_classic(), "{other}");
        assert_eq!(
            GitFormats::of_config(b"[extensions] objectformat = sha256\n").objects,
            "sha256"
        );
        assert_eq!(GitFormats::parse("sha1"), None);
        assert_eq!(GitFormats::parse("sha1 files extra"), None);
    }

    #[test]
    fn transient_files_of_pushes_and_gc_are_recognised() {
        for p in [
            "objects/tmp_objdir-incoming-Ab12Cd",
            "objects/tmp_objdir-incoming-Ab12Cd/4b/825dc642cb6eb9a060e54bf8d69288fbee4904",
            "objects/incoming-XyZ123/pack/pack-1.pack",
            "objects/pack/tmp_pack_aBcDeF",
            "objects/pack/tmp_idx_aBcDeF",
            "objects/pack/tmp_rev_aBcDeF",
            "objects/pack/.tmp-1234-pack-0123abcd.pack",
            "objects/4b/tmp_obj_XyZ",
            "objects/info/commit-graphs/tmp_graph_123",
            "refs/heads/main.lock",
            "packed-refs.lock",
            "HEAD.lock",
            "config.lock",
            "objects/info/commit-graph.lock",
            "gc.pid",
            "gc.log.lock",
        ] {
            assert!(is_transient(p.as_bytes()), "{p} is transient");
        }
    }

    #[test]
    fn the_repository_itself_is_never_transient() {
        for p in [
            "HEAD",
            "config",
            "packed-refs",
            "refs/heads/main",
            "refs/heads/tmp_branch",
            "refs/heads/feature/incoming-changes",
            "objects/4b/825dc642cb6eb9a060e54bf8d69288fbee4904",
            "objects/pack/pack-0123abcd.pack",
            "objects/pack/pack-0123abcd.idx",
            "objects/pack/pack-0123abcd.keep",
            "objects/info/packs",
            "objects/info/commit-graph",
            "gc.log",
            "hooks/pre-receive",
            "tmp_notes",
            "logs/refs/heads/main",
            "objects",
        ] {
            assert!(!is_transient(p.as_bytes()), "{p} is not transient");
        }
    }

    #[test]
    fn ref_paths() {
        for p in [
            "HEAD",
            "packed-refs",
            "refs",
            "refs/heads/main",
            "refs/tags",
        ] {
            assert!(is_ref_path(p.as_bytes()), "{p}");
        }
        for p in [
            "HEADS",
            "refsx",
            "logs/refs/heads/main",
            "objects",
            "config",
        ] {
            assert!(!is_ref_path(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn alternates_and_ref_tips_are_read_from_gits_files() {
        assert_eq!(
            alternates(b"# pool\n/srv/pool.git/objects\n\n  ../../other/objects \n"),
            ["/srv/pool.git/objects", "../../other/objects"]
        );
        assert!(alternates(b"\n# nothing\n").is_empty());
        let a = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
        let b = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(ref_tips(format!("{a}\n").as_bytes()), [a]);
        assert!(ref_tips(b"ref: refs/heads/main\n").is_empty());
        let packed = format!(
            "# pack-refs with: peeled fully-peeled sorted\n{a} refs/heads/main\n{b} refs/tags/v1\n^{a}\nnot-an-id refs/x\n"
        );
        assert_eq!(ref_tips(packed.as_bytes()), [a, b, a]);
    }

    #[test]
    fn content_addressed_names() {
        let sha1 = "825dc642cb6eb9a060e54bf8d69288fbee4904";
        let pack = "0123456789abcdef0123456789abcdef01234567";
        let pack256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for p in [
            format!("objects/4b/{sha1}"),
            format!("objects/4b/{sha1}{}", "0".repeat(24)),
            format!("objects/pack/pack-{pack}.pack"),
            format!("objects/pack/pack-{pack}.idx"),
            format!("objects/pack/pack-{pack}.rev"),
            format!("objects/pack/pack-{pack256}.pack"),
        ] {
            assert!(is_content_addressed(p.as_bytes()), "{p}");
        }
        for p in [
            // Rewritten in place or by rename under the same name: never trusted by name.
            format!("objects/pack/pack-{pack}.bitmap"),
            format!("objects/pack/pack-{pack}.mtimes"),
            format!("objects/pack/pack-{pack}.keep"),
            format!("objects/pack/pack-{pack}.promisor"),
            "objects/pack/multi-pack-index".to_string(),
            "objects/info/commit-graph".to_string(),
            "objects/info/packs".to_string(),
            "objects/info/alternates".to_string(),
            // Not git's names.
            format!("objects/pack/pack-{}.pack", &pack[..39]),
            format!("objects/pack/pack-{pack}x.pack"),
            format!("objects/4b/{}", &sha1[..37]),
            format!("objects/4g/{sha1}"),
            format!("objects/4b/{sha1}/x"),
            format!("objects/4b/tmp_obj_{}", &sha1[..30]),
            format!("refs/4b/{sha1}"),
            format!("x/objects/4b/{sha1}"),
            "objects/pack/pack-1.pack".to_string(),
        ] {
            assert!(!is_content_addressed(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn a_freshened_object_is_the_same_source_only_in_git_mode_and_only_by_its_name() {
        let old = Entry {
            path: b"objects/pack/pack-0123456789abcdef0123456789abcdef01234567.pack".to_vec(),
            kind: EntryKind::File,
            mode: 0o444,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 1,
            size: 8 << 20,
            link_target: Vec::new(),
            ino: 42,
            ctime_sec: 1_700_000_000,
            ctime_nsec: 1,
            attrs: None,
        };
        // What `touch` (git's freshen) and a repack rewriting the same pack do.
        let freshened = Entry {
            mtime_sec: 1_700_000_900,
            ctime_sec: 1_700_000_900,
            ino: 43,
            ..old.clone()
        };
        assert!(same_source_version(&old, &freshened, true));
        assert!(!same_source_version(&old, &freshened, false));
        let resized = Entry {
            size: old.size - 1,
            ..freshened.clone()
        };
        assert!(!same_source_version(&old, &resized, true));
        let bitmap = |e: &Entry| Entry {
            path: b"objects/pack/pack-0123456789abcdef0123456789abcdef01234567.bitmap".to_vec(),
            ..e.clone()
        };
        assert!(!same_source_version(
            &bitmap(&old),
            &bitmap(&freshened),
            true
        ));
        assert!(same_source_version(&bitmap(&old), &bitmap(&old), true));
        let moved = Entry {
            path: b"objects/pack/pack-1123456789abcdef0123456789abcdef01234567.pack".to_vec(),
            ..freshened
        };
        assert!(!same_source_version(&old, &moved, true));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("auto".parse(), Ok(GitMode::Auto));
        assert_eq!("on".parse(), Ok(GitMode::On));
        assert_eq!("off".parse(), Ok(GitMode::Off));
        assert!("yes".parse::<GitMode>().is_err());
        assert_eq!(GitMode::Off.to_string(), "off");
    }
}
