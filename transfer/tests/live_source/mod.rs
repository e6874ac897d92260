//! Sending a source that changes while it is read: a live pre-copy (`--stage-only`) never
//! fails, an installing pass still refuses or restarts, and a busy git repository's final
//! pass installs a copy equal to it (issue 10 items 2 and 4).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A shell loop in a child process, run until `stop` exists; killed on drop.
struct Busy {
    child: Child,
    stop: PathBuf,
    what: &'static str,
}

impl Busy {
    fn start(what: &'static str, dir: &Path, stop: &Path, body: &str) -> Busy {
        let script = format!("while [ ! -e '{}' ]; do {body}; done", stop.display());
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shell loop");
        Busy {
            child,
            stop: stop.to_path_buf(),
            what,
        }
    }

    /// Stops the loop at the end of its current round; its errors fail the test.
    fn finish(mut self) {
        std::fs::write(&self.stop, "").unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "{} loop failed: {err}", self.what);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Regression test for issue 10 item 2: `objects/tmp_objdir-incoming-XXXX/4b/825dc6…: No
/// such file or directory` failed a live pre-copy. Real pushes (loose objects and kept packs,
/// through git's quarantine, branch creations and deletions) and a repack/gc loop run while
/// `--stage-only` passes copy the bare repository; every pass must succeed and every complete
/// pre-copy must be a consistent repository (its refs were read before its objects were
/// listed). Then, with the repository quiet (frozen), the final pass installs an identical
/// copy: git fsck passes and the refs are equal.
#[test]
fn live_precopy_survives_vanishing_quarantine_dir() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let bare = keys.path("a.git");
    let work = keys.path("work");
    git(keys.dir.path(), &["init", "-q", "--bare", "a.git"]);
    // The gc loop below is the only gc: an automatic one would make it fail with "gc is
    // already running".
    git(&bare, &["config", "gc.auto", "0"]);
    git(keys.dir.path(), &["init", "-q", "-b", "main", "work"]);
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    std::fs::write(work.join("seed"), random_bytes(1 << 20, 1)).unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "seed"]);
    git(&work, &["push", "-q", "origin", "main"]);

    // Pushes: a few new blobs each round (unpacked as loose objects in the quarantine), and
    // every 4th round 120 files (more than receive.unpackLimit: kept as a pack); branches
    // come and go.
    let pushes = Busy::start(
        "push",
        &work,
        &keys.path("stop-push"),
        "i=$((i+1)); head -c 3000 /dev/urandom > f$((i % 7)); \
         if [ $((i % 4)) = 0 ]; then mkdir -p d$i; for j in $(seq 120); do echo $i $j > d$i/$j; done; fi; \
         git add -A && git commit -qm c$i && git push -q origin HEAD:refs/heads/main \
         && git push -q -f origin HEAD:refs/heads/b$((i % 3)) \
         && { [ $((i % 5)) != 0 ] || git push -q origin :refs/heads/b$((i % 3)); } || exit 1",
    );
    // Repacks delete the packs and loose objects they replaced; gc also packs refs.
    let gc = Busy::start(
        "gc",
        &bare,
        &keys.path("stop-gc"),
        "git repack -a -d -q || exit 1; sleep 0.2; git gc -q || exit 1; sleep 0.2",
    );

    let started = Instant::now();
    let (mut passes, mut transient, mut restarts, mut fscked) = (0u64, 0u64, 0u64, 0u64);
    let staged_tree = transfer::staging::staging_dir(&root, b"r.git").join("tree");
    while passes < 20 || (transient == 0 && passes < 60) {
        let out = send(
            &keys,
            &bare,
            &d.addr,
            "r.git",
            &["--stage-only", "--resume", "--chunk-size", "64K"],
        );
        let j = assert_ok(&out);
        passes += 1;
        assert_eq!(j["staged_only"], true, "{j}");
        assert_eq!(j["git"], true, "{j}");
        transient += j["transient_skipped"].as_u64().unwrap();
        restarts += j["attempts"].as_u64().unwrap() - 1;
        if j["complete"] == true {
            // What the orchestrator checks before the freeze: the pre-copy is a repository.
            let fsck = git_cmd(
                &staged_tree,
                &["fsck", "--connectivity-only", "--no-progress"],
            )
            .output()
            .unwrap();
            assert!(
                fsck.status.success(),
                "pass {passes}: the staged pre-copy is not consistent: {}",
                String::from_utf8_lossy(&fsck.stderr)
            );
            fscked += 1;
        }
    }
    eprintln!(
        "{passes} live pre-copies in {:.1} s: {transient} transient files left out, \
         {restarts} restarts, {fscked} complete pre-copies fsck-clean",
        started.elapsed().as_secs_f64()
    );
    assert!(
        transient > 0,
        "no pass met a push in flight: the race was not exercised"
    );
    pushes.finish();
    gc.finish();

    // Frozen: the final pass sends what changed and installs.
    let j = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "r.git",
        &["--resume", "--chunk-size", "64K"],
    ));
    assert_eq!(j["complete"], true, "{j}");
    assert!(j["resumed_bytes"].as_u64().unwrap() > 0, "{j}");
    let installed = root.join("r.git");
    assert_same_tree(&bare, &installed);
    git(&installed, &["fsck", "--no-progress", "--strict"]);
    assert_eq!(
        git(&installed, &["for-each-ref"]),
        git(&bare, &["for-each-ref"])
    );
}

/// A pre-copy whose source files vanish or shrink while they are read restarts (resuming
/// what was verified) instead of failing; the final pass then installs the tree as it is.
#[test]
fn precopy_restarts_when_files_vanish_or_shrink_mid_send() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("a-kept"), 1 << 20, 1);
    write_random(&src.join("b-deleted"), 6 << 20, 2);
    write_random(&src.join("c-truncated"), 6 << 20, 3);
    let child = send_cmd(
        &keys,
        &src,
        &d.addr,
        "r",
        &[
            "--stage-only",
            "--bwlimit",
            "6M",
            "--chunk-size",
            "256K",
            "--compress",
            "off",
            "--streams",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r"
    ) >= 4));
    std::fs::remove_file(src.join("b-deleted")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("c-truncated"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let j = assert_ok(&out);
    assert_eq!(j["complete"], true, "{j}");
    assert!(j["attempts"].as_u64().unwrap() >= 2, "{j}");
    assert_eq!(j["bytes"], 2 << 20, "{j}");
    assert!(
        stderr(&out).contains("changed during the send"),
        "{}",
        stderr(&out)
    );

    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "r",
        &["--resume", "--chunk-size", "256K"],
    ));
    assert_eq!(j["sent_bytes"], 0, "all verified by the pre-copy: {j}");
    assert_same_tree(&src, &root.join("r"));
}

/// Churn (files and directories created and deleted, a 1 MiB file rewritten every few
/// milliseconds) never fails a pre-copy, even without git's rules; an installing pass over
/// the same churn refuses after its attempts (exit 6), and succeeds once the source holds
/// still.
#[test]
fn churning_tree_never_fails_a_precopy_and_the_final_pass_waits_for_it_to_hold_still() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("big"), 8 << 20, 1);
    let churn = Busy::start(
        "churn",
        &src,
        &keys.path("stop-churn"),
        "i=$((i+1)); mkdir -p tmp$((i % 5))/sub; echo $i > tmp$((i % 5))/sub/f; \
         rm -rf tmp$(((i + 2) % 5)); head -c 1048576 /dev/urandom > hot; ln -sf big link$((i % 2)); \
         rm -f link$(((i + 1) % 2))",
    );
    for pass in 0..3 {
        let out = send(
            &keys,
            &src,
            &d.addr,
            "r",
            &[
                "--stage-only",
                "--resume",
                "--git",
                "off",
                "--chunk-size",
                "1M",
            ],
        );
        let j = assert_ok(&out);
        assert_eq!(j["staged_only"], true, "pass {pass}: {j}");
    }
    // The 1 MiB `hot` file changes in every round of the loop and every attempt resends it;
    // at 2 MB/s an attempt lasts at least half a second, so even a loop starved by a loaded
    // machine changes something inside each attempt.
    let out = send(
        &keys,
        &src,
        &d.addr,
        "r",
        &["--resume", "--git", "off", "--bwlimit", "2M"],
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("kept changing"), "{}", stderr(&out));
    assert!(
        visible_entries(&root).is_empty(),
        "nothing is installed from a changing source"
    );
    churn.finish();
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "r",
        &["--resume", "--git", "off"],
    ));
    assert_eq!(j["complete"], true, "{j}");
    assert_same_tree(&src, &root.join("r"));
}
