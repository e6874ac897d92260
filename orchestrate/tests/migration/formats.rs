//! Issue 11, item 3: repositories in git's newer formats (reftable refs, SHA-256 objects)
//! move and stay what they are, and a target whose git cannot read them is refused before
//! anything is frozen, by name, leaving the repository writable on A.

use super::*;

/// Whether the `git` on PATH can create a reftable, SHA-256 repository (git 2.45 or later).
fn modern_git() -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    git(
        dir.path(),
        &[
            "init",
            "-q",
            "--bare",
            "--object-format=sha256",
            "--ref-format=reftable",
            "probe.git",
        ],
    )
    .code
        == 0
}

/// Replaces `t/NAME`'s fresh copy on A with a reftable, SHA-256 repository holding a commit
/// on `main` and a tag; returns its refs.
fn make_modern(env: &Env, shards: &Shards, name: &str) -> String {
    let bare = shards.a.join(format!("t/{name}.git"));
    std::fs::remove_dir_all(&bare).expect("remove the classic copy");
    git_ok(
        &shards.a,
        &[
            "init",
            "-q",
            "--bare",
            "--object-format=sha256",
            "--ref-format=reftable",
            &bare.display().to_string(),
        ],
    );
    let work = env.path(&format!("modern-{name}"));
    git_ok(
        &shards.a,
        &[
            "init",
            "-q",
            "-b",
            "main",
            "--object-format=sha256",
            &work.display().to_string(),
        ],
    );
    std::fs::write(work.join("file"), "sha256 content\n").expect("write");
    git_ok(&work, &["add", "file"]);
    commit(&work, "in a modern repository");
    git_ok(&work, &["tag", "v1"]);
    let url = bare.display().to_string();
    git_ok(&work, &["push", "-q", &url, "main", "v1"]);
    refs(&bare)
}

pub(super) fn reftable_and_sha256_repositories_move_and_stay_what_they_are(env: &Env) {
    if !modern_git() {
        println!("skipped: the git on PATH cannot create reftable SHA-256 repositories (2.45+)");
        return;
    }
    let shards = setup(env, &[("r1", 0), ("modern", 0)]);
    let classic_refs = refs(&shards.a.join("t/r1.git"));
    let modern_refs = make_modern(env, &shards, "modern");
    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let on_b = shards.b.join("t/modern.git");
    assert_eq!(
        git_ok(&on_b, &["rev-parse", "--show-ref-format"]),
        "reftable"
    );
    assert_eq!(
        git_ok(&on_b, &["rev-parse", "--show-object-format"]),
        "sha256"
    );
    git_ok(&on_b, &["fsck", "--full", "--no-progress"]);
    assert_moved(env, &shards, "modern", &modern_refs);
    assert_moved(env, &shards, "r1", &classic_refs);
}

pub(super) fn a_target_whose_git_cannot_read_reftable_is_refused_before_the_freeze(env: &Env) {
    if !modern_git() {
        println!("skipped: the git on PATH cannot create reftable SHA-256 repositories (2.45+)");
        return;
    }
    // B's host runs its steps with Debian's own git, if that one predates reftable.
    let old = git(Path::new("/"), &["--version"]);
    let old_git = Command::new("/usr/bin/git")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let minor = old_git
        .strip_prefix("git version 2.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m >= 45) {
        println!(
            "skipped: /usr/bin/git ({old_git:?}) reads reftable; no older git to stand for B's \
             (PATH's git: {})",
            old.stdout.trim()
        );
        return;
    }
    let layout = Layout {
        hosts: ["localhost", "exec:env PATH=/usr/bin:/bin"],
        roots: ["shard-a", "shard-b"],
        recv_args: &[],
        recv_config: None,
    };
    let shards = setup_on(env, &[("modern", 0)], &layout);
    make_modern(env, &shards, "modern");
    let run = run_migrate(env, &shards, &["--json"]);
    let rows = all_rolled_back(env, &run);
    let r = &rows[0];
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("reftable refs") && error.contains(&old_git) && error.contains("b1"),
        "the error names the format, B's git and the device: {error}"
    );
    assert_left_writable_on_a(env, &shards, "modern", r);
}
