//! Verifying a repository's copy on B with git, cheaply enough to run while it is read-only.
//!
//! `migrate` must not clusterize a copy git cannot use, so B's copy is checked with git's own
//! tools (the transfer already proved it byte-equal to A's tree with BLAKE3; this proves the
//! tree is a complete repository). A full `git fsck --connectivity-only` costs 50 ms on a
//! 10 MB repository and 0.4 s on a 60 MB one with loose objects: too long for the frozen
//! window, which the batch exists to keep short. So the work is split the way git splits it
//! for pushes:
//! - [`full_connectivity`] runs `fsck --connectivity-only` on B's **pre-copied** tree, while
//!   the repository is still live, and returns the object ids its refs pointed to ("tips");
//! - in the frozen window, [`refs_and_connected_since`] checks that B's refs equal A's
//!   [`refs_digest`] (taken while the final pass runs: A is frozen and idle by then) and
//!   walks only the objects reachable from B's final refs but not from those tips (`git
//!   rev-list --objects --quiet --stdin` with the new tips and `^TIP` lines), which is the
//!   check git's receive-pack runs on every push (`check_connected`); when no ref points
//!   anywhere new, there is nothing to walk and only the refs are compared. A tip that no
//!   final ref points to is left out, since git gc may have pruned its history meanwhile.
//!
//! With no recorded tips (pre-copy staging not found, or `--full-verify`), the window runs
//! the full fsck instead.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::executor::{self, Executor};
use crate::scripts::{exit, Script};

/// `git for-each-ref` of a copy, as one string (object ids and names, sorted by git). The copy
/// may belong to the forge's daemon user: git is told to trust it (it only reads here).
pub async fn refs_digest(exec: &dyn Executor, path: &str) -> Result<String> {
    let out = executor::run(
        exec,
        &[
            "git",
            "-c",
            "safe.directory=*",
            "-C",
            path,
            "for-each-ref",
            "--format=%(objectname) %(refname)",
        ],
    )
    .await?;
    Ok(out.stdout)
}

/// `git fsck --connectivity-only` of the repository at `path`; returns its refs' object ids
/// (sorted, unique), or `None` when `path` does not exist.
pub async fn full_connectivity(exec: &dyn Executor, path: &str) -> Result<Option<Vec<String>>> {
    let script = Script::FsckConnectivity;
    let out = script.run(exec, &[path], None).await?;
    match out.status {
        0 => Ok(Some(tips(&out.stdout))),
        exit::MISSING => Ok(None),
        exit::CORRUPT => Err(Error::Refused(format!(
            "git fsck found {path} broken: {}",
            last_line(&out.stderr)
        ))),
        _ => Err(script.failed(exec, &[path], &out)),
    }
}

/// In one process on B: its refs must equal `expected_refs` (A's [`refs_digest`]), and every
/// object reachable from them must be present, trusting the history of those
/// `verified_tips` that the refs still point to.
pub async fn refs_and_connected_since(
    exec: &dyn Executor,
    path: &str,
    expected_refs: &str,
    verified_tips: &[String],
) -> Result<()> {
    let known: BTreeSet<&str> = verified_tips.iter().map(String::as_str).collect();
    let (kept, new): (Vec<String>, Vec<String>) = tips(expected_refs)
        .into_iter()
        .partition(|tip| known.contains(tip.as_str()));
    // Only new tips need a walk (bounded by the verified ones); with none, the refs alone are
    // compared: a walk would only parse every verified tip (0.55 s for 20k tips).
    let input: String = new
        .iter()
        .map(|tip| format!("{tip}\n"))
        .chain(kept.iter().map(|tip| format!("^{tip}\n")))
        .collect();
    let script = Script::VerifySince;
    let out = match new.is_empty() {
        true => script.run(exec, &[path, "refs-only"], None).await?,
        false => {
            script
                .run(exec, &[path, "walk"], Some(input.as_bytes()))
                .await?
        }
    };
    match out.status {
        0 | exit::OBJECTS_MISSING if out.stdout != expected_refs => Err(refs_differ(path)),
        0 => Ok(()),
        exit::OBJECTS_MISSING => Err(Error::Refused(format!(
            "{path} is missing objects its refs need: {}",
            last_line(&out.stderr)
        ))),
        _ => Err(script.failed(exec, &[path], &out)),
    }
}

/// A repository's on-disk formats; `shardsend` reports them in git mode.
pub use transfer::gitdir::GitFormats;

/// Refused unless git on `exec`'s host can use a repository of `formats`: checked before a
/// freeze, since a copy B's git cannot read would fail only at verification, inside the
/// read-only window, or worse, after it.
pub async fn ensure_git_supports(exec: &dyn Executor, formats: &GitFormats) -> Result<()> {
    if formats.is_classic() {
        return Ok(());
    }
    let script = Script::GitSupports;
    let args = [formats.objects.as_str(), formats.refs.as_str()];
    let out = script.run(exec, &args, None).await?;
    match out.status {
        0 => Ok(()),
        exit::UNSUPPORTED => Err(Error::Refused(format!(
            "the repository uses {formats}, which git on host {} cannot use ({}); upgrade git \
             there (reftable needs git 2.45 or later, SHA-256 git 2.29 or later)",
            exec.host(),
            last_line(&out.stderr)
        ))),
        _ => Err(script.failed(exec, &args, &out)),
    }
}

fn last_line(text: &str) -> &str {
    text.trim().lines().last().unwrap_or("")
}

/// Without recorded tips: B's refs must equal `expected_refs`, and the full
/// `fsck --connectivity-only` must pass on B (two processes; the fallback path).
pub async fn refs_and_full_connectivity(
    exec: &dyn Executor,
    path: &str,
    expected_refs: &str,
) -> Result<()> {
    if refs_digest(exec, path).await? != expected_refs {
        return Err(refs_differ(path));
    }
    full_connectivity(exec, path)
        .await?
        .map(drop)
        .ok_or_else(|| Error::Refused(format!("{path} does not exist")))
}

fn refs_differ(path: &str) -> Error {
    Error::Refused(format!("refs of {path} differ from the source's"))
}

/// The object ids of a `for-each-ref` listing (first word of each line), sorted and unique.
pub fn tips(listing: &str) -> Vec<String> {
    let set: BTreeSet<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|oid| oid.len() >= 40 && oid.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    set.into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::LocalExecutor;
    use std::path::Path;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn commit(dir: &Path, name: &str) -> String {
        std::fs::write(dir.join(name), name).expect("write");
        git(dir, &["add", name]);
        git(dir, &["commit", "-q", "-m", name]);
        git(dir, &["rev-parse", "HEAD"])
    }

    /// Removes a loose object.
    fn drop_object(repo: &Path, oid: &str) {
        let p = repo.join(".git/objects").join(&oid[..2]).join(&oid[2..]);
        std::fs::remove_file(&p).expect("loose object exists");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn incremental_check_trusts_verified_tips_and_catches_new_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path();
        git(repo, &["init", "-q", "-b", "main"]);
        commit(repo, "a");
        let path = repo.to_string_lossy().into_owned();
        let exec = LocalExecutor;

        let tips = block_on(full_connectivity(&exec, &path))
            .expect("fsck passes")
            .expect("repository exists");
        assert_eq!(tips, [git(repo, &["rev-parse", "HEAD"])]);
        let missing = dir.path().join("nope").to_string_lossy().into_owned();
        assert_eq!(
            block_on(full_connectivity(&exec, &missing)).expect("no error"),
            None
        );

        // New history on top of the verified tip: checked, and complete.
        commit(repo, "b");
        let digest = block_on(refs_digest(&exec, &path)).expect("refs");
        block_on(refs_and_connected_since(&exec, &path, &digest, &tips)).expect("connected");
        let other = digest.replace("refs/heads/main", "refs/heads/other");
        let err = block_on(refs_and_connected_since(&exec, &path, &other, &tips))
            .expect_err("refs differ");
        assert!(err.to_string().contains("differ"), "{err}");

        // The new commit's blob goes missing: the incremental check sees it.
        let blob = git(repo, &["rev-parse", "HEAD:b"]);
        drop_object(repo, &blob);
        let err = block_on(refs_and_connected_since(&exec, &path, &digest, &tips))
            .expect_err("a missing object is found");
        assert!(err.to_string().contains("missing objects"), "{err}");

        // Trusting the new tip as well skips the walk (this is what makes it cheap), so the
        // tips recorded must come from a full fsck: full_connectivity catches the gap.
        let all = super::tips(&digest);
        block_on(refs_and_connected_since(&exec, &path, &digest, &all)).expect("trusted");
        assert!(block_on(full_connectivity(&exec, &path)).is_err());
        let err =
            block_on(refs_and_full_connectivity(&exec, &path, &other)).expect_err("refs differ");
        assert!(err.to_string().contains("differ"), "{err}");
        assert!(block_on(refs_and_full_connectivity(&exec, &path, &digest)).is_err());
    }

    /// Whether `git` (as found on PATH) creates a repository of these formats.
    fn git_creates(dir: &Path, args: &[&str]) -> bool {
        Command::new("git")
            .args(["init", "-q", "--bare"])
            .args(args)
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The formats as shardsend reads them from a repository's config file.
    fn formats_of(repo: &Path) -> GitFormats {
        GitFormats::of_config(&std::fs::read(repo.join("config")).expect("config"))
    }

    /// Issue 11, item 3: formats are read from the config of repositories git made (an old
    /// git could not open them), an old git on the target is refused by name, and a reftable
    /// ref update in flight counts as busy.
    #[test]
    fn git_formats_are_detected_an_old_git_refused_and_reftable_locks_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exec = LocalExecutor;
        let classic = dir.path().join("classic.git");
        assert!(git_creates(&classic, &[]));
        let formats = formats_of(&classic);
        assert!(formats.is_classic(), "{formats}");
        block_on(ensure_git_supports(&exec, &formats)).expect("any git reads sha1/files");

        let modern = dir.path().join("modern.git");
        if !git_creates(
            &modern,
            &["--object-format=sha256", "--ref-format=reftable"],
        ) {
            println!("skipped the reftable half: this git cannot create reftable repositories");
            return;
        }
        let path = modern.to_string_lossy().into_owned();
        let formats = formats_of(&modern);
        assert_eq!(
            formats,
            GitFormats {
                objects: "sha256".into(),
                refs: "reftable".into()
            }
        );
        block_on(ensure_git_supports(&exec, &formats)).expect("this git made it");
        // Debian 12's own git (2.39) predates reftable; a host whose PATH finds it is refused.
        let old = std::process::Command::new("/usr/bin/git")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let minor = old
            .strip_prefix("git version 2.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|m| m.parse::<u32>().ok());
        if minor.is_some_and(|m| m < 45) {
            let host = crate::executor::executor_for_host("old", "exec:env PATH=/usr/bin:/bin")
                .expect("prefix executor");
            let err = block_on(ensure_git_supports(host.as_ref(), &formats))
                .expect_err("reftable refused on an old git");
            let text = err.to_string();
            assert!(
                text.contains("reftable refs") && text.contains(&old),
                "{text}"
            );
        } else {
            println!("skipped the old-git half: /usr/bin/git is not older than 2.45 ({old:?})");
        }

        // A reftable ref update holds tables.list.lock: the push wait sees it.
        std::fs::write(modern.join("reftable/tables.list.lock"), "").expect("plant lock");
        let out = block_on(Script::WaitIdle.run(&exec, &[&path, "0"], None)).expect("runs");
        assert_eq!(out.status, exit::PUSHES_IN_FLIGHT, "{out:?}");
        assert!(out.stdout.contains("tables.list.lock"), "{out:?}");
        std::fs::remove_file(modern.join("reftable/tables.list.lock")).expect("lift lock");
        let out = block_on(Script::WaitIdle.run(&exec, &[&path, "0"], None)).expect("runs");
        assert_eq!(out.status, 0, "{out:?}");
    }

    #[test]
    fn tips_are_unique_object_ids_in_order() {
        let listing = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb refs/heads/b\n\
                       aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa refs/heads/a\n\
                       bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb refs/tags/v1\n\
                       not-an-oid refs/x\n\n";
        assert_eq!(
            tips(listing),
            [
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
            ]
        );
    }
}
