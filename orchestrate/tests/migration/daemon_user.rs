//! Issue 11, items 1 and 5: a repository the forge's non-root daemon user owns on A moves to
//! B for that user (`migrate --chown`), and on B that user runs `git fsck --full`, clones and
//! pushes. shardmove itself runs as root and reads copies it does not own (git would refuse
//! them as "dubious ownership" without the scripts' `safe.directory`).

use std::os::unix::fs::MetadataExt;

use super::*;

/// A system user and group made with `useradd` for one test, removed on drop.
struct DaemonUser {
    name: String,
}

impl DaemonUser {
    fn create() -> Option<DaemonUser> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: needs root to make a daemon user and give it files");
            return None;
        }
        let name = format!("smd{}", std::process::id());
        let made = Command::new("useradd")
            .args(["--system", "--user-group", "--create-home", "--shell"])
            .args(["/bin/sh", &name])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            println!("skipped: useradd is not available here");
            return None;
        }
        Some(DaemonUser { name })
    }

    fn uid(&self) -> u32 {
        let out = Command::new("id")
            .args(["-u", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// `git ARGS` in `dir` as this user, with no system or global configuration (so no
    /// `safe.directory` help): exactly what the forge's daemon would run.
    #[track_caller]
    fn git_ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = Command::new("runuser")
            .args(["-u", &self.name, "--", "env"])
            .args([
                "GIT_CONFIG_NOSYSTEM=1",
                "GIT_CONFIG_GLOBAL=/dev/null",
                "GIT_AUTHOR_NAME=d",
                "GIT_AUTHOR_EMAIL=d@example.invalid",
                "GIT_COMMITTER_NAME=d",
                "GIT_COMMITTER_EMAIL=d@example.invalid",
                "git",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("runuser git");
        assert!(
            out.status.success(),
            "git {args:?} as {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn chown(&self, path: &Path) {
        let who = format!("{0}:{0}", self.name);
        let ok = Command::new("chown").args(["-R", &who]).arg(path).status();
        assert!(ok.is_ok_and(|s| s.success()), "chown {}", path.display());
    }
}

impl Drop for DaemonUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

#[test]
fn a_repository_moved_for_the_daemon_user_passes_fsck_and_takes_its_push() {
    let Some(daemon) = DaemonUser::create() else {
        return;
    };
    let env = Env::sqlite();
    let shards = setup(&env, &[("r1", 1)]);
    let on_a = shards.a.join("t/r1.git");
    let before = refs(&on_a);
    // The forge's daemon user owns A's copy, as it would on a real shard.
    daemon.chown(&on_a);
    daemon.git_ok(&on_a, &["fsck", "--no-progress"]);
    let owner = format!("{0}:{0}", daemon.name);
    let run = run_migrate(&env, &shards, &["--chown", &owner, "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    let on_b = shards.b.join("t/r1.git");
    let uid = daemon.uid();
    let mut checked = 0;
    let mut stack = vec![on_b.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!(meta.uid(), uid, "{} not the daemon user's", path.display());
            checked += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(checked > 10, "{checked} files checked");
    assert_eq!(
        daemon.git_ok(
            &on_b,
            &["for-each-ref", "--format=%(objectname) %(refname)"]
        ),
        before
    );
    daemon.git_ok(&on_b, &["fsck", "--full", "--strict", "--no-progress"]);

    // The daemon user clones and pushes, as the forge would on its behalf.
    let work_root = env.path("daemon-work");
    std::fs::create_dir(&work_root).unwrap();
    daemon.chown(&work_root);
    daemon.git_ok(&work_root, &["clone", "-q", on_b.to_str().unwrap(), "w"]);
    let w = work_root.join("w");
    daemon.git_ok(&w, &["commit", "-q", "--allow-empty", "-m", "pushed on B"]);
    daemon.git_ok(&w, &["push", "-q", "origin", "HEAD"]);
    assert_eq!(
        daemon.git_ok(&on_b, &["rev-parse", "HEAD"]),
        daemon.git_ok(&w, &["rev-parse", "HEAD"])
    );
    daemon.git_ok(&on_b, &["fsck", "--full", "--strict", "--no-progress"]);
    let repo = env.json(&["repo", "show", "t/r1"]);
    assert_eq!(repo["service"], "b");
    assert_eq!(repo["maintenance"], false);
}
