//! Sending real git repositories: what git's own behaviour means for a pre-copy and its
//! final pass (freshened packs), and for the copy B gets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::util::*;

/// A bare repository `a.git` (one pack holding an 8 MiB incompressible blob, cloned from a
/// work repository) and that work repository, in `dir`. Returns (bare, work, pack path).
fn repo_with_a_big_pack(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (bare, work) = bare_repo(dir, &[("big.bin", &random_bytes(8 << 20, 7))]);
    git(&bare, &["config", "gc.auto", "0"]);
    let pack = std::fs::read_dir(bare.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .expect("clone --bare wrote a pack");
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    (bare, work, pack)
}

/// What git does to a pack it would rewrite: bumps its mtime (and so its ctime).
fn freshen(path: &Path) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
}

/// Regression test for the chaos soak's finding: a final pass inside the read-only window
/// re-sent a whole 8 MB pack that the pre-copy had staged, because pushes (even refused
/// ones) freshen git's packs and the carry-over rule compared mtime and ctime. In git mode
/// a content-addressed file carries over by path and size; the frozen pass's source check
/// ignores freshening too, so a pack touched all through the final pass restarts nothing.
/// `--git off` keeps the old rule (the "before" figure).
#[test]
fn freshened_pack_is_not_resent_by_the_final_pass() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let (bare, work, pack) = repo_with_a_big_pack(keys.dir.path());
    let pack_size = std::fs::metadata(&pack).unwrap().len();
    assert!(pack_size > 8 << 20, "{pack_size}");
    for (dest, mode) in [("r.git", "auto"), ("plain.git", "off")] {
        let j = assert_ok(&send(
            &keys,
            &bare,
            &d.addr,
            dest,
            &["--stage-only", "--git", mode, "--chunk-size", "1M"],
        ));
        assert_eq!(
            j["sent_bytes"].as_u64().unwrap(),
            j["bytes"].as_u64().unwrap()
        );
    }

    // The repository lives on: a push adds objects and moves a ref, and the pack is
    // freshened.
    std::fs::write(work.join("README"), "hello again\n").unwrap();
    git(&work, &["commit", "-qam", "second"]);
    git(&work, &["push", "-q", "origin", "main"]);
    std::thread::sleep(Duration::from_millis(20));
    freshen(&pack);

    let before = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "plain.git",
        &["--resume", "--git", "off", "--chunk-size", "1M"],
    ));
    let before_sent = before["sent_bytes"].as_u64().unwrap();
    assert!(
        before_sent >= pack_size,
        "the old rule re-sends the pack: {before}"
    );

    // The final pass, with the pack freshened over and over while it runs (refused pushes
    // meeting the freeze).
    let stop = Arc::new(AtomicBool::new(false));
    let toucher = {
        let (stop, pack) = (stop.clone(), pack.clone());
        std::thread::spawn(move || {
            let mut touches = 0u64;
            while !stop.load(Ordering::Relaxed) {
                freshen(&pack);
                touches += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            touches
        })
    };
    let after = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--resume", "--chunk-size", "1M"],
    ));
    // Control: under the old rule the same freshening keeps the frozen pass from finishing.
    let old_rule = send(&keys, &bare, &d.addr, "plain2.git", &["--git", "off"]);
    stop.store(true, Ordering::Relaxed);
    let touches = toucher.join().unwrap();
    assert_eq!(old_rule.status.code(), Some(6), "{}", stderr(&old_rule));
    assert!(
        stderr(&old_rule).contains("kept changing"),
        "{}",
        stderr(&old_rule)
    );
    let after_sent = after["sent_bytes"].as_u64().unwrap();
    eprintln!(
        "final pass after a push and a freshened {pack_size}-byte pack: {before_sent} bytes \
         re-sent by the old rule (--git off), {after_sent} in git mode ({touches} touches \
         during the pass, {} attempt(s))",
        after["attempts"]
    );
    assert_eq!(after["git"], true, "{after}");
    assert_eq!(
        after["attempts"], 1,
        "freshening restarted the pass: {after}"
    );
    assert!(
        after["resumed_bytes"].as_u64().unwrap() >= pack_size,
        "{after}"
    );
    assert!(
        after_sent < 64 << 10,
        "only the push's objects and refs travel: {after}"
    );
    assert!(touches > 0);

    let installed = root.join("r.git");
    assert_eq!(
        file_hash(&pack),
        file_hash(&installed.join(pack.strip_prefix(&bare).unwrap()))
    );
    git(&installed, &["fsck", "--no-progress", "--strict"]);
    assert_eq!(
        git(&installed, &["for-each-ref"]),
        git(&bare, &["for-each-ref"])
    );
}

/// Issue 11 item 2: a symlink leaving the tree (forges link hooks to a shared directory)
/// was skipped with a warning, so push policy vanished silently on B. It is refused now,
/// unless its absolute target lies in a directory the operator allows, and then it is
/// copied as a link.
#[test]
fn external_symlinks_are_refused_unless_allowed_then_copied_as_links() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let (bare, _, _) = repo_with_a_big_pack(keys.dir.path());
    let shared = keys.path("shared-hooks");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("pre-receive"), "#!/bin/sh\nexit 0\n").unwrap();
    let target = shared.join("pre-receive");
    std::os::unix::fs::symlink(&target, bare.join("hooks/pre-receive")).unwrap();
    let allow = shared.to_str().unwrap();

    let out = send(&keys, &bare, &d.addr, "r.git", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("hooks/pre-receive is a symlink to") && err.contains("--allow-external-link"),
        "{err}"
    );
    assert!(visible_entries(&root).is_empty());
    // Another directory, or a relative way out, is not what the operator allowed.
    for (other, hint) in [
        ("/etc/passwd", "--allow-external-link DIR (the link"),
        ("../../shared-hooks/pre-receive", "never copied"),
    ] {
        std::fs::remove_file(bare.join("hooks/pre-receive")).unwrap();
        std::os::unix::fs::symlink(other, bare.join("hooks/pre-receive")).unwrap();
        let out = send(
            &keys,
            &bare,
            &d.addr,
            "r.git",
            &["--allow-external-link", allow],
        );
        assert_eq!(out.status.code(), Some(2), "{other}: {}", stderr(&out));
        assert!(stderr(&out).contains(hint), "{other}: {}", stderr(&out));
    }
    for bad in ["/", "relative/dir", "/a/../b"] {
        let out = send(
            &keys,
            &bare,
            &d.addr,
            "r.git",
            &["--allow-external-link", bad],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }

    std::fs::remove_file(bare.join("hooks/pre-receive")).unwrap();
    std::os::unix::fs::symlink(&target, bare.join("hooks/pre-receive")).unwrap();
    let j = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--allow-external-link", allow],
    ));
    assert_eq!(j["external_links"], 1, "{j}");
    let installed = root.join("r.git");
    assert_eq!(
        std::fs::read_link(installed.join("hooks/pre-receive")).unwrap(),
        target
    );
    assert_same_tree(&bare, &installed);
}

/// Issue 11 item 2: `objects/info/alternates` (`git clone --shared`, object pools) made a
/// copy that was broken on B, or silently used A's pool. Such a repository is refused now;
/// with `--dissociate` the objects it borrows travel in a pack built outside A's repository,
/// B gets no alternates line, and B passes `git fsck` with A's pool gone. The pack is the
/// same for the same objects, so a final pass after a pre-copy does not send it again.
#[test]
fn borrowing_repository_is_refused_unless_dissociated_then_self_contained() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let dir = keys.dir.path();
    let (pool, work, _) = repo_with_a_big_pack(dir);
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            "--shared",
            pool.to_str().unwrap(),
            "shared.git",
        ],
    );
    let a = dir.join("shared.git");
    git(&a, &["config", "gc.auto", "0"]);
    // Objects of its own on top of the borrowed history.
    git(&work, &["remote", "add", "shared", a.to_str().unwrap()]);
    std::fs::write(work.join("own"), "only in the shared clone\n").unwrap();
    git(&work, &["add", "own"]);
    git(&work, &["commit", "-qm", "own commit"]);
    git(&work, &["push", "-q", "shared", "HEAD:refs/heads/topic"]);
    let alternates = std::fs::read_to_string(a.join("objects/info/alternates")).unwrap();

    let out = send(&keys, &a, &d.addr, "r.git", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("borrows objects from") && err.contains("--dissociate"),
        "{err}"
    );
    assert!(visible_entries(&root).is_empty());

    let listing = |p: &Path| {
        let mut v = Vec::new();
        for e in walk(p) {
            let m = std::fs::symlink_metadata(&e).unwrap();
            v.push((e, m.len(), m.modified().unwrap()));
        }
        v
    };
    let before = listing(&a);
    let staged = assert_ok(&send(
        &keys,
        &a,
        &d.addr,
        "r.git",
        &["--dissociate", "--stage-only", "--chunk-size", "1M"],
    ));
    let borrowed = staged["borrowed_objects"].as_u64().unwrap();
    assert!(borrowed >= 3, "the pool's commit, tree and blobs: {staged}");
    let j = assert_ok(&send(
        &keys,
        &a,
        &d.addr,
        "r.git",
        &["--dissociate", "--resume", "--chunk-size", "1M"],
    ));
    assert_eq!(j["borrowed_objects"], borrowed);
    assert_eq!(
        j["sent_bytes"], 0,
        "the same objects make the same pack: {j}"
    );
    assert_eq!(listing(&a), before, "A's repository is untouched");
    assert_eq!(
        std::fs::read_to_string(a.join("objects/info/alternates")).unwrap(),
        alternates
    );

    let b = root.join("r.git");
    assert!(!b.join("objects/info/alternates").exists());
    let refs = git(&a, &["for-each-ref"]);
    let objects = git(&a, &["rev-list", "--objects", "--all"]);
    // A's pool gone: B still has every object.
    std::fs::rename(&pool, dir.join("pool-gone")).unwrap();
    git(&b, &["fsck", "--full", "--strict", "--no-progress"]);
    assert_eq!(git(&b, &["for-each-ref"]), refs);
    assert_eq!(git(&b, &["rev-list", "--objects", "--all"]), objects);
}

/// Every path under `root`, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        children.sort();
        for c in children {
            out.extend(walk(&c));
        }
    }
    out
}

/// Issue 13: the pre-copy's wait for git's gc/repack moved from a host script into
/// `shardsend --repack-wait`. A stand-in `git repack` working in the repository holds the
/// send back; one outlasting the wait ends it with exit 7 and nothing staged; once it is
/// gone the send goes through at once. The summary carries the formats B's git must read.
#[test]
fn repack_wait_holds_the_send_back_while_git_rewrites_the_repository() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let (bare, _work) = bare_repo(keys.dir.path(), &[("a.txt", b"hello\n".as_slice())]);
    // Started, and calling itself `git repack`, before this returns.
    let repack = |seconds: &str| {
        let child = std::process::Command::new("perl")
            .arg("-e")
            .arg(format!("$0 = 'git repack -a -d'; sleep {seconds}"))
            .current_dir(&bare)
            .spawn()
            .unwrap();
        let cmdline = format!("/proc/{}/cmdline", child.id());
        assert!(wait_for(Duration::from_secs(10), || std::fs::read(
            &cmdline
        )
        .is_ok_and(|c| c.starts_with(b"git repack"))));
        child
    };

    // Outlasts the wait: exit 7, naming the process; nothing reached the receiver.
    let mut long = repack("60");
    let out = send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--stage-only", "--repack-wait", "1s"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("still being rewritten by git") && err.contains("git repack -a -d"),
        "{err}"
    );
    assert!(visible_entries(&root).is_empty());
    long.kill().unwrap();
    long.wait().unwrap();

    // Ends within the wait: the send waits for it, then goes through and says so.
    let mut short = repack("1");
    let j = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--stage-only", "--repack-wait", "30s"],
    ));
    short.wait().unwrap();
    assert_eq!(j["staged_only"], true, "{j}");
    assert!(
        j["waited_for"]
            .as_str()
            .unwrap_or("")
            .contains("git repack"),
        "{j}"
    );
    assert!(j["waited_seconds"].as_f64().unwrap() > 0.2, "{j}");
    assert_eq!(j["git_formats"]["objects"], "sha1", "{j}");
    assert_eq!(j["git_formats"]["refs"], "files", "{j}");

    // Idle: no wait at all; and --git off cannot look for git's processes.
    let j = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--resume", "--repack-wait", "30s"],
    ));
    assert_eq!(j["waited_for"], serde_json::Value::Null, "{j}");
    assert_eq!(j["complete"], true, "{j}");
    let out = send(
        &keys,
        &bare,
        &d.addr,
        "s.git",
        &["--git", "off", "--repack-wait", "1s"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--repack-wait needs git mode"));
}
