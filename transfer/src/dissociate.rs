//! `--dissociate`: a copy of a repository that borrows objects (`objects/info/alternates`,
//! e.g. `git clone --shared`, GitLab-style object pools) made self-contained.
//!
//! A borrowing repository's copy on B is broken (its pool is on A) or, worse, works only
//! because it points back at A's disk. So the scan refuses such a repository unless told to
//! dissociate ([`crate::scan`]), and then the objects reachable only through the alternates
//! travel in one extra pack, built on the sender **outside A's repository** (in a temporary
//! directory, A untouched), while the `alternates` file is left out.
//!
//! Which objects: everything reachable from the refs the scan captured, from every ref, from
//! the reflogs and the index (what `git fsck` checks), minus what the repository holds
//! itself. "Holds itself" is asked of git with the alternates out of sight: a shadow object
//! directory of symlinks to the repository's own `pack/` and loose `xx/` directories, without
//! `info/`. The three git processes stream into each other (`rev-list` → `cat-file` → a
//! filter → `pack-objects`), so memory does not grow with the repository. `pack-objects`
//! writes its temporary files into its object directory: it is given one of our own, with
//! the repository's as an alternate (through which git also reaches the pool), so nothing
//! is ever written under A's repository.
//!
//! `pack-objects` runs single-threaded so that the same objects give the same pack (its name
//! is the checksum of its bytes): a final pass then carries the pre-copy's pack over by name
//! and size ([`crate::gitdir::same_source_version`]) instead of sending it again. The walk
//! itself is repeated by every pass, the frozen one included: its cost grows with the
//! history reachable from the refs (see the report of the change that added this).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::Error;

/// The borrowed objects, packed: the pack's files (`pack-<id>.pack`, `.idx`, and `.rev`
/// where git writes one) in a temporary directory that lives as long as this value.
pub struct BorrowedPack {
    pub files: Vec<(String, PathBuf)>,
    pub objects: u64,
    pack_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl BorrowedPack {
    /// The directory holding the pack's files.
    pub fn dir(&self) -> &Path {
        &self.pack_dir
    }
}

/// git on `git_dir`, trusted whoever owns it (the forge's daemon user, usually; git would
/// refuse it to root as "dubious ownership"): it is only read, the pack goes elsewhere.
fn git(git_dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.args(["-c", "safe.directory=*", "--git-dir"]).arg(git_dir);
    c
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("--dissociate: {what}: {e}"))
}

/// Packs the objects `git_dir` reaches only through its alternates (from `tips`, every ref,
/// the reflogs and the index); `None` when there are none.
pub fn pack_borrowed(git_dir: &Path, tips: &[String]) -> Result<Option<BorrowedPack>, Error> {
    let dir = tempfile::Builder::new()
        .prefix("shardsend-dissociate-")
        .tempdir()
        .map_err(|e| failed("temporary directory", e))?;
    // The repository's own object directories, without info/ (and so without alternates).
    let shadow = dir.path().join("own-objects");
    std::fs::create_dir(&shadow).map_err(|e| Error::io(&shadow, e))?;
    let objects = git_dir.join("objects");
    for d in std::fs::read_dir(&objects).map_err(|e| Error::io(&objects, e))? {
        let d = d.map_err(|e| Error::io(&objects, e))?;
        let name = d.file_name();
        let n = name.as_encoded_bytes();
        let own = n == b"pack" || (n.len() == 2 && n.iter().all(u8::is_ascii_hexdigit));
        if own {
            std::os::unix::fs::symlink(d.path(), shadow.join(&name))
                .map_err(|e| Error::io(shadow.join(&name), e))?;
        }
    }
    // pack-objects' own object directory: its temporary files and the pack land here.
    let scratch = dir.path().join("objects");
    let out_dir = scratch.join("pack");
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;

    let mut rev_list = git(git_dir)
        .args([
            "rev-list",
            "--objects",
            "--no-object-names",
            "--all",
            "--reflog",
            "--indexed-objects",
            "--stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed("cannot run git rev-list", e))?;
    let rev_out = rev_list
        .stdout
        .take()
        .ok_or_else(|| failed("git rev-list", "no stdout"))?;
    let mut cat_file = git(git_dir)
        .arg("cat-file")
        .arg("--batch-check=%(objectname)")
        .env("GIT_OBJECT_DIRECTORY", &shadow)
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .stdin(Stdio::from(rev_out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed("cannot run git cat-file", e))?;
    let mut pack_objects = git(git_dir)
        .args(["pack-objects", "--threads=1", "-q"])
        .arg(out_dir.join("pack"))
        .env("GIT_OBJECT_DIRECTORY", &scratch)
        .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &objects)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed("cannot run git pack-objects", e))?;
    {
        let mut stdin = rev_list
            .stdin
            .take()
            .ok_or_else(|| failed("git rev-list", "no stdin"))?;
        for tip in tips {
            writeln!(stdin, "{tip}").map_err(|e| failed("git rev-list", e))?;
        }
    }
    // What the repository lacks itself ("<id> missing" with the alternates out of sight).
    let borrowed = {
        let lines = BufReader::new(
            cat_file
                .stdout
                .take()
                .ok_or_else(|| failed("git cat-file", "no stdout"))?,
        );
        let mut to_pack = pack_objects
            .stdin
            .take()
            .ok_or_else(|| failed("git pack-objects", "no stdin"))?;
        let mut n = 0u64;
        for line in lines.lines() {
            let line = line.map_err(|e| failed("git cat-file", e))?;
            if let Some(id) = line.strip_suffix(" missing") {
                writeln!(to_pack, "{id}").map_err(|e| failed("git pack-objects", e))?;
                n += 1;
            }
        }
        n
    };
    for (name, child) in [("rev-list", rev_list), ("cat-file", cat_file)] {
        let out = child
            .wait_with_output()
            .map_err(|e| failed(&format!("git {name}"), e))?;
        if !out.status.success() {
            return Err(failed(
                &format!("git {name} failed"),
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
    }
    let packed = pack_objects
        .wait_with_output()
        .map_err(|e| failed("git pack-objects", e))?;
    if !packed.status.success() {
        return Err(failed(
            "git pack-objects failed",
            String::from_utf8_lossy(&packed.stderr).trim(),
        ));
    }
    if borrowed == 0 {
        return Ok(None);
    }
    let mut files = Vec::new();
    for d in std::fs::read_dir(&out_dir).map_err(|e| Error::io(&out_dir, e))? {
        let d = d.map_err(|e| Error::io(&out_dir, e))?;
        let name = d.file_name().to_string_lossy().into_owned();
        if name.starts_with("pack-") {
            files.push((name, d.path()));
        }
    }
    files.sort();
    Ok(Some(BorrowedPack {
        files,
        objects: borrowed,
        pack_dir: out_dir,
        _dir: dir,
    }))
}
