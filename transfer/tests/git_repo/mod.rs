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
    let work = dir.join("work");
    git(dir, &["init", "-q", "-b", "main", "work"]);
    write_random(&work.join("big.bin"), 8 << 20, 7);
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "first"]);
    git(
        dir,
        &["clone", "-q", "--bare", "--no-local", "work", "a.git"],
    );
    let bare = dir.join("a.git");
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
