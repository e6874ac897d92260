//! Issue 11, item 4: a `git repack`/`gc` working on A is waited out before each pre-copy
//! round, so it neither gets copied twice nor deletes files under the frozen final pass.
//!
//! The busy processes are stand-ins: `perl` sets its command line to git's (`$0`) and sleeps,
//! in the repository, which is all the wait looks at (`/proc/PID/cwd` and `cmdline`); a real
//! repack that lasts a chosen time cannot be made here. `scripts/bench-busy.sh` runs real
//! `git repack -a -d` during 5 GB migrations.

use std::time::SystemTime;

use super::*;

/// A process that looks like `git ARGS` working in `repo`, for `secs` seconds.
struct FakeGit(Child);

impl FakeGit {
    fn start(repo: &Path, args: &str, secs: u32) -> FakeGit {
        let script = format!("$0 = \"git {args}\"; sleep {secs}");
        let child = Command::new("perl")
            .args(["-e", &script])
            .current_dir(repo)
            .spawn()
            .expect("start perl");
        // Perl names itself only once it runs: wait for that, or a loaded machine lets
        // migrate look at /proc first and see no git at all.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"git ")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in never named itself git {args}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        FakeGit(child)
    }
}

impl Drop for FakeGit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

pub(super) fn a_repack_on_a_is_waited_out_before_the_precopy(env: &Env) {
    let shards = setup(env, &[("r1", 1)]);
    let repo = shards.a.join("t/r1.git");
    let before = refs(&repo);
    // A clone being served (pack-objects --stdout) is no rewrite and must not be waited for.
    let _serving = FakeGit::start(&repo, "pack-objects --revs --thin --stdout", 120);
    let started_ms = now_ms();
    let _repack = FakeGit::start(&repo, "repack -a -d", 3);
    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("pre-copy round 1:")
            && run.stderr.contains("for process")
            && run.stderr.contains("git repack -a -d on a1"),
        "the pre-copy says what it waited for: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("pack-objects"), "{}", run.stderr);
    let status = env.json(&["migrate", "status"]);
    let r = &status["repositories"][0];
    let frozen = r["frozen_at_ms"].as_u64().expect("frozen_at_ms");
    assert!(
        frozen >= started_ms + 2_900,
        "frozen {} ms after the repack started, before it ended (3 s): {r}",
        frozen.saturating_sub(started_ms)
    );
    assert_moved(env, &shards, "r1", &before);
}

pub(super) fn a_repack_outlasting_the_wait_leaves_the_repository_writable_on_a(env: &Env) {
    let shards = setup(env, &[("r1", 0)]);
    let repo = shards.a.join("t/r1.git");
    let _gc = FakeGit::start(&repo, "-c gc.auto=1 gc --auto", 300);
    let run = run_migrate(env, &shards, &["--json", "--repack-wait", "1"]);
    let rows = all_rolled_back(env, &run);
    let r = &rows[0];
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("t/r1 is still being repacked")
            && error.contains("gc --auto")
            && error.contains("--repack-wait"),
        "the error says what runs and what to do: {error}"
    );
    assert_left_writable_on_a(env, &shards, "r1", r);
}
