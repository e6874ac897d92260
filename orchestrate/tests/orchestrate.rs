//! End-to-end tests of `shardmove`, each run against SQLite and PostgreSQL (one contract
//! suite; PostgreSQL from `SHARDMOVE_TEST_PG`, or a throwaway cluster the tests start: see
//! `util::pg`), with real `git` repositories and processes.

mod demo;
mod migration;
mod packaging;
mod phorge;
mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::{clone_and_commit, commit, git, git_ok, Env};

/// The Phorge lab is expensive (a MariaDB and three PHP servers): one backend for the journal.
#[test]
fn phorge_repository_moves_there_and_back_with_a_client_pushing() {
    phorge::phorge_repository_moves_there_and_back_with_a_client_pushing(&Env::sqlite());
}

contract!(
    objects_and_bad_input_change_nothing,
    open_without_daemons_needs_force,
    sync_propagates_flags_and_never_resets_them,
    allocation_never_picks_a_closed_binding,
    repo_create_runs_no_host_step_inside_a_transaction,
    maintenance_refuses_pushes_and_keeps_reads,
    maintenance_waits_for_push_in_flight,
    maintenance_wait_timeout_lifts_maintenance,
    observe_skips_repositories_in_maintenance,
    concurrent_clusterize_from_two_processes_is_consistent,
    thaw_refuses_older_copies_unless_forced,
    daemons_follow_the_plan_and_never_start_under_no_daemons,
    library_steps_are_callable_without_the_cli,
    ssh_executor_drives_a_device_over_a_real_sshd,
);

fn objects_and_bad_input_change_nothing(env: &Env) {
    env.two_services();
    let service = env.json(&["service", "show", "a"]);
    assert_eq!(service["devices"], serde_json::json!(["a1"]));
    let device = env.json(&["device", "show", "a1"]);
    assert_eq!(device["service"], "a");
    assert_eq!(device["host"], "localhost");
    assert_eq!(
        env.json(&["instance", "list"]).as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        env.json(&["binding", "show", "--instance", "t", "--service", "a"])["closed"],
        false
    );
    env.ok(&["repo", "create", "--instance", "t", "r1"]);

    let before = env.snapshot();
    let root = env.path("rx").display().to_string();
    // Duplicates.
    assert!(env
        .fails(&["service", "add", "a"], 4)
        .contains("already exists"));
    env.fails(
        &[
            "device",
            "add",
            "a1",
            "--service",
            "a",
            "--host",
            "localhost",
            "--transfer",
            "h:1",
            "--root",
            &root,
        ],
        4,
    );
    env.fails(&["instance", "add", "t"], 4);
    env.fails(&["binding", "add", "--instance", "t", "--service", "a"], 4);
    env.fails(&["repo", "create", "--instance", "t", "r1"], 4);
    // Unknown names.
    assert!(env
        .fails(&["service", "show", "nope"], 3)
        .contains("unknown service \"nope\""));
    env.fails(
        &[
            "device",
            "add",
            "x1",
            "--service",
            "nope",
            "--host",
            "localhost",
            "--transfer",
            "h:1",
            "--root",
            &root,
        ],
        3,
    );
    env.fails(
        &["binding", "add", "--instance", "nobody", "--service", "a"],
        3,
    );
    env.fails(
        &[
            "binding",
            "set-property",
            "--instance",
            "t",
            "--service",
            "nope",
            "closed",
            "true",
        ],
        3,
    );
    env.fails(&["repo", "create", "--instance", "nobody", "r2"], 3);
    env.fails(&["repo", "show", "t/nope"], 3);
    env.fails(&["repo", "maintenance", "nope", "--start", "x"], 3);
    env.fails(&["repo", "clusterize", "r1", "--service", "nope"], 3);
    env.fails(&["repo", "thaw", "r1", "--promote", "nope"], 3);
    // Invalid values.
    env.fails(&["service", "add", "a/b"], 2);
    env.fails(&["service", "add", ""], 2);
    env.fails(&["instance", "add", "-x"], 2);
    env.fails(
        &[
            "device",
            "add",
            "x1",
            "--service",
            "a",
            "--host",
            "localhost",
            "--transfer",
            "nonsense",
            "--root",
            &root,
        ],
        2,
    );
    env.fails(
        &[
            "device",
            "add",
            "x1",
            "--service",
            "a",
            "--host",
            "localhost",
            "--transfer",
            "h:1",
            "--root",
            "relative/dir",
        ],
        2,
    );
    assert!(env
        .fails(
            &[
                "binding",
                "set-property",
                "--instance",
                "t",
                "--service",
                "a",
                "closed",
                "maybe"
            ],
            2
        )
        .contains("expected true or false"));
    env.fails(
        &[
            "binding",
            "set-property",
            "--instance",
            "t",
            "--service",
            "a",
            "Bad Key",
            "1",
        ],
        2,
    );
    for url in [
        "ftp://host/x.git",
        "not a url",
        "https://",
        "file://relative",
    ] {
        assert!(env
            .fails(
                &["repo", "create", "--instance", "t", "r2", "--upstream", url],
                2
            )
            .contains("upstream url"));
    }
    env.fails(&["repo", "create", "--instance", "t", "../escape"], 2);
    env.fails(&["repo", "maintenance", "r1", "--start", ""], 2);
    // Usage errors from clap: exit 2, no panic.
    env.fails(&["repo", "maintenance", "r1"], 2);
    env.fails(&["repo", "thaw", "r1"], 2);
    env.fails(&["frobnicate"], 2);
    env.fails(&["--db", "mysql://x/y", "service", "list"], 2);
    assert_eq!(env.snapshot(), before, "bad input changed the registry");
    assert!(!env.repo_path("ra", "r2").exists() && !env.repo_path("rb", "r2").exists());
}

fn open_without_daemons_needs_force(env: &Env) {
    env.two_services();
    let args = [
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "no-daemons",
        "true",
    ];
    let stderr = env.fails(&args, 5);
    assert!(
        stderr.contains("open but without daemons") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        env.json(&["binding", "show", "--instance", "t", "--service", "a"])["no_daemons"],
        false
    );
    // Closing first makes it a sane state; forcing is possible too.
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "closed",
        "true",
    ]);
    env.ok(&args);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "no-daemons",
        "true",
        "--force",
    ]);
    let b = env.json(&["binding", "show", "--instance", "t", "--service", "b"]);
    assert_eq!(
        (b["closed"].clone(), b["no_daemons"].clone()),
        (Value::Bool(false), Value::Bool(true))
    );
    // Reopening a no-daemons binding is the same questionable state.
    env.fails(
        &[
            "binding",
            "set-property",
            "--instance",
            "t",
            "--service",
            "a",
            "closed",
            "false",
        ],
        5,
    );
    let events = env.json(&["events", "--subject", "binding:t/b"]);
    assert!(events.as_array().is_some_and(|e| e
        .iter()
        .any(|e| e["detail"].as_str().is_some_and(|d| d.contains("(forced)")))));
}

fn sync_propagates_flags_and_never_resets_them(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "closed",
        "true",
    ]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "no-daemons",
        "true",
    ]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "weight",
        "3",
    ]);
    let a = env.json(&["binding", "show", "--instance", "t", "--service", "a"]);
    assert_eq!(a["view"], Value::Null, "no view before the first sync");
    let changes = env.json(&["sync", "--instance", "t"]);
    assert_eq!(
        changes[0]["changed"],
        serde_json::json!(["closed", "no-daemons", "weight"])
    );
    for _ in 0..2 {
        let a = env.json(&["binding", "show", "--instance", "t", "--service", "a"]);
        assert_eq!(a["view"]["properties"]["closed"], "true");
        assert_eq!(a["view"]["properties"]["no-daemons"], "true");
        assert_eq!(a["view"]["properties"]["weight"], "3");
        assert_eq!(a["view"]["in_sync"], true);
        assert_eq!(a["closed"], true);
        // A second sync (all instances) must not reset anything.
        let again = env.json(&["sync"]);
        assert!(
            again
                .as_array()
                .is_some_and(|all| all.iter().all(|c| c["changed"] == serde_json::json!([]))),
            "{again}"
        );
    }
    // A central change shows as out of date until the next sync propagates it.
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "weight",
        "5",
    ]);
    assert_eq!(
        env.json(&["binding", "show", "--instance", "t", "--service", "a"])["view"]["in_sync"],
        false
    );
    env.ok(&["sync"]);
    let a = env.json(&["binding", "show", "--instance", "t", "--service", "a"]);
    assert_eq!(
        (
            a["view"]["properties"]["weight"].clone(),
            a["view"]["properties"]["closed"].clone()
        ),
        ("5".into(), "true".into())
    );
    env.fails(&["sync", "--instance", "nobody"], 3);
}

/// Regression (issue 13): `repo create` ran `git init` on every device inside `BEGIN
/// IMMEDIATE`, so the whole SQLite registry was write-locked for the hosts' round trips, and
/// nothing re-checked the binding on PostgreSQL. Here an operator closes the chosen binding
/// while the bare repository is being made (a `git` wrapper does it, from inside the host
/// step): the close must go through at once, and the create must then record nothing and
/// remove the directory it made.
fn repo_create_runs_no_host_step_inside_a_transaction(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    let Some(real_git) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("git"))
            .find(|git| git.is_file())
    }) else {
        println!("skipped: git not on PATH");
        return;
    };
    let wrappers = env.path("wrappers");
    std::fs::create_dir_all(&wrappers).expect("wrapper dir");
    let log = env.path("close.log");
    let wrapper = wrappers.join("git");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             case \"$*\" in *init*) '{bin}' binding set-property --instance t --service a closed true \
             >>'{log}' 2>&1 || echo 'close failed' >>'{log}';; esac\n\
             exec '{git}' \"$@\"\n",
            bin = util::BIN,
            log = log.display(),
            git = real_git.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![wrappers.clone()];
    dirs.extend(std::env::split_paths(&path));
    env.set_var("PATH", std::env::join_paths(dirs).expect("PATH"));

    let err = env.fails(&["repo", "create", "--instance", "t", "x"], 5);
    assert!(
        err.contains("binding t/a was closed while t/x was being created"),
        "{err}"
    );
    let close_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!close_log.contains("close failed"), "{close_log}");
    // (Inside the create's transaction the close would have failed with "database is
    // locked" after the 30 s busy timeout on SQLite.)
    assert_eq!(
        env.json(&["binding", "show", "--instance", "t", "--service", "a"])["closed"],
        true
    );
    assert!(
        !env.repo_path("ra", "x").exists(),
        "the bare repository was left behind"
    );
    assert_eq!(
        env.json(&["repo", "list"]).as_array().map(Vec::len),
        Some(0)
    );
}

fn allocation_never_picks_a_closed_binding(env: &Env) {
    env.two_services();
    env.ok(&["service", "add", "c"]);
    let root = env.path("rc").display().to_string();
    env.ok(&[
        "device",
        "add",
        "c1",
        "--service",
        "c",
        "--host",
        "localhost",
        "--transfer",
        "127.0.0.1:1",
        "--root",
        &root,
    ]);
    env.ok(&["binding", "add", "--instance", "t", "--service", "c"]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..40 {
        let name = format!("r{i}");
        let repo = env.json(&["repo", "create", "--instance", "t", &name]);
        let service = repo["service"].as_str().unwrap_or_default().to_string();
        let root = format!("r{service}");
        assert!(
            git_ok(
                &env.repo_path(&root, &name),
                &["rev-parse", "--is-bare-repository"]
            ) == "true"
        );
        assert_eq!(repo["copies"][0]["version"], 1);
        *counts.entry(service).or_default() += 1;
    }
    assert_eq!(
        counts.get("b"),
        None,
        "a closed binding was picked: {counts:?}"
    );
    // P(all 40 on one of two open services) = 2^-39.
    assert!(
        counts.get("a").is_some_and(|n| *n > 0) && counts.get("c").is_some_and(|n| *n > 0),
        "{counts:?}"
    );
    for service in ["a", "c"] {
        env.ok(&[
            "binding",
            "set-property",
            "--instance",
            "t",
            "--service",
            service,
            "closed",
            "true",
        ]);
    }
    let before = env.snapshot();
    let stderr = env.fails(&["repo", "create", "--instance", "t", "late"], 5);
    assert!(stderr.contains("no open binding"), "{stderr}");
    assert_eq!(env.snapshot(), before);
    for root in ["ra", "rb", "rc"] {
        assert!(!env.repo_path(root, "late").exists());
    }
}

fn maintenance_refuses_pushes_and_keeps_reads(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    env.ok(&["repo", "create", "--instance", "t", "r1"]);
    let bare = env.repo_path("ra", "r1");
    let work = env.path("work");
    let first = clone_and_commit(&bare, &work, "first");
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);

    let message = "moving to a faster shard, back at 14:00";
    env.ok(&["repo", "maintenance", "t/r1", "--start", message]);
    let second = commit(&work, "second");
    let push = git(&work, &["push", "origin", "HEAD:refs/heads/main"]);
    assert_ne!(push.code, 0, "push accepted during maintenance");
    assert!(
        push.stderr.contains(message),
        "message not shown: {}",
        push.stderr
    );
    assert_eq!(git_ok(&bare, &["rev-parse", "refs/heads/main"]), first);
    // Reads keep working.
    let clone = env.path("clone");
    git_ok(
        env.dir.path(),
        &[
            "clone",
            "-q",
            &bare.display().to_string(),
            &clone.display().to_string(),
        ],
    );
    assert_eq!(
        git_ok(&clone, &["rev-parse", "refs/remotes/origin/main"]),
        first
    );
    git_ok(&work, &["fetch", "-q", "origin"]);
    // Shown by repo show and status.
    let shown = env.json(&["repo", "show", "r1"]);
    assert_eq!(
        (
            shown["maintenance"].clone(),
            shown["maintenance_message"].clone()
        ),
        (Value::Bool(true), message.into())
    );
    assert!(shown["maintenance_since"].as_i64().is_some_and(|t| t > 0));
    let status = env.json(&["status"]);
    assert_eq!(status[0]["name"], "r1");
    assert!(env.ok(&["status"]).contains(message));

    env.ok(&["repo", "maintenance", "t/r1", "--stop"]);
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    assert_eq!(git_ok(&bare, &["rev-parse", "refs/heads/main"]), second);
    assert_eq!(env.json(&["status"]), serde_json::json!([]));
    assert!(
        !bare.join("hooks/pre-receive").exists(),
        "our hook left behind"
    );
    assert!(env.ok(&["status"]).contains("no repository in maintenance"));
}

/// A repository whose own pre-receive hook sleeps `secs` (after touching `marker`).
fn slow_hooked_repo(
    env: &Env,
    name: &str,
    secs: u32,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    env.ok(&["repo", "create", "--instance", "t", name]);
    let bare = env.repo_path("ra", name);
    let marker = env.path("hook-started");
    let hook = format!(
        "#!/bin/sh\n# the site's own hook\ntouch '{}'\nsleep {secs}\nexit 0\n",
        marker.display()
    );
    let hook_path = bare.join("hooks/pre-receive");
    std::fs::write(&hook_path, &hook).expect("write hook");
    std::fs::set_permissions(&hook_path, std::fs::Permissions::from_mode(0o750))
        .expect("chmod hook");
    (bare, marker, hook.into_bytes())
}

fn start_push_and_wait_for_hook(
    work: &std::path::Path,
    marker: &std::path::Path,
) -> std::process::Child {
    let child = std::process::Command::new("git")
        .args(["push", "-q", "origin", "HEAD:refs/heads/main"])
        .current_dir(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start push");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "push never reached the hook");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn maintenance_waits_for_push_in_flight(env: &Env) {
    let (bare, marker, hook) = slow_hooked_repo(env, "slow", 3);
    let hook_path = bare.join("hooks/pre-receive");
    let inode = std::fs::metadata(&hook_path).expect("hook").ino();
    let work = env.path("work");
    let pushed = clone_and_commit(&bare, &work, "in flight");
    let mut push = start_push_and_wait_for_hook(&work, &marker);

    let started = Instant::now();
    env.ok(&[
        "repo",
        "maintenance",
        "slow",
        "--start",
        "frozen",
        "--wait",
        "30",
    ]);
    // The push was past the hook: maintenance must have waited for it to finish.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "did not wait: {:?}",
        started.elapsed()
    );
    assert_eq!(
        git_ok(&bare, &["rev-parse", "refs/heads/main"]),
        pushed,
        "in-flight push not finished when --start returned"
    );
    let status = push.wait().expect("push");
    assert!(status.success(), "the in-flight push should have succeeded");
    // And nothing new gets in.
    commit(&work, "late");
    assert_ne!(
        git(&work, &["push", "origin", "HEAD:refs/heads/main"]).code,
        0
    );
    assert_eq!(git_ok(&bare, &["rev-parse", "refs/heads/main"]), pushed);

    env.ok(&["repo", "maintenance", "slow", "--stop"]);
    let meta = std::fs::metadata(&hook_path).expect("hook restored");
    assert_eq!(
        std::fs::read(&hook_path).expect("hook"),
        hook,
        "original hook not restored exactly"
    );
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        meta.ino(),
        inode,
        "original hook file replaced rather than restored"
    );
    assert!(!bare.join("hooks/pre-receive.shardmove-orig").exists());
}

fn maintenance_wait_timeout_lifts_maintenance(env: &Env) {
    let (bare, marker, hook) = slow_hooked_repo(env, "stuck", 5);
    let work = env.path("work");
    let pushed = clone_and_commit(&bare, &work, "slow push");
    let mut push = start_push_and_wait_for_hook(&work, &marker);
    let stderr = env.fails(
        &[
            "repo",
            "maintenance",
            "stuck",
            "--start",
            "frozen",
            "--wait",
            "1",
        ],
        6,
    );
    assert!(
        stderr.contains("in flight") && stderr.contains("lifted"),
        "{stderr}"
    );
    assert_eq!(env.json(&["repo", "show", "stuck"])["maintenance"], false);
    assert_eq!(
        std::fs::read(bare.join("hooks/pre-receive")).expect("hook"),
        hook
    );
    assert!(push.wait().expect("push").success());
    assert_eq!(git_ok(&bare, &["rev-parse", "refs/heads/main"]), pushed);
    let events = env.json(&["events", "--subject", "repo:t/stuck"]);
    assert!(events.as_array().is_some_and(|e| e
        .iter()
        .any(|e| e["action"] == "repo.maintenance.start-failed")));
}

fn observe_skips_repositories_in_maintenance(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    let upstream = env.path("upstream.git");
    git_ok(
        env.dir.path(),
        &["init", "-q", "--bare", &upstream.display().to_string()],
    );
    let work = env.path("upstream-work");
    let one = clone_and_commit(&upstream, &work, "one");
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    let url = format!("file://{}", upstream.display());
    env.ok(&[
        "repo",
        "create",
        "--instance",
        "t",
        "mirror",
        "--upstream",
        &url,
    ]);
    env.ok(&["repo", "create", "--instance", "t", "plain"]);
    let mirror = env.repo_path("ra", "mirror");

    let pass = env.json(&["repo", "observe", "--instance", "t"]);
    assert_eq!(
        pass.as_array().map(Vec::len),
        Some(1),
        "only observed repositories: {pass}"
    );
    assert_eq!(pass[0]["outcome"], "fetched");
    assert_eq!(git_ok(&mirror, &["rev-parse", "refs/heads/main"]), one);

    env.ok(&["repo", "maintenance", "mirror", "--start", "moving"]);
    let two = commit(&work, "two");
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    let text = env.ok(&["repo", "observe"]);
    assert!(
        text.contains("t/mirror: skipped") && text.contains("in maintenance: moving"),
        "{text}"
    );
    assert_eq!(
        git_ok(&mirror, &["rev-parse", "refs/heads/main"]),
        one,
        "observation pulled into a repository in maintenance"
    );

    env.ok(&["repo", "maintenance", "mirror", "--stop"]);
    assert_eq!(env.json(&["repo", "observe"])[0]["outcome"], "fetched");
    assert_eq!(git_ok(&mirror, &["rev-parse", "refs/heads/main"]), two);
    // A broken upstream is reported, not fatal.
    std::fs::rename(&upstream, env.path("gone.git")).expect("rename");
    assert_eq!(env.json(&["repo", "observe"])[0]["outcome"], "failed");
}

fn concurrent_clusterize_from_two_processes_is_consistent(env: &Env) {
    env.two_services();
    env.ok(&["service", "add", "c"]);
    env.ok(&["binding", "add", "--instance", "t", "--service", "c"]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "c",
        "closed",
        "true",
    ]);
    env.ok(&["repo", "create", "--instance", "t", "r1"]);
    for round in 0..4 {
        let targets = if round % 2 == 0 {
            ["b", "c"]
        } else {
            ["c", "a"]
        };
        let children: Vec<_> = targets
            .iter()
            .map(|service| {
                env.sm_command(&["repo", "clusterize", "t/r1", "--service", service])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn clusterize")
            })
            .collect();
        for child in children {
            let out = util::to_run(child.wait_with_output().expect("clusterize"));
            assert_eq!(out.code, 0, "round {round}: {}{}", out.stdout, out.stderr);
        }
        // Every move starts where the previous one ended, and the last one is the state.
        let events = env.json(&["events", "--subject", "repo:t/r1", "--limit", "1000"]);
        let moves: Vec<(String, String)> = events
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["action"] == "repo.clusterize")
            .map(|e| {
                let detail = e["detail"].as_str().unwrap_or_default();
                let (from, to) = detail.split_once(' ').expect("from=.. to=..");
                (
                    from.trim_start_matches("from=").to_string(),
                    to.trim_start_matches("to=").to_string(),
                )
            })
            .collect();
        let mut at = "a".to_string();
        for (from, to) in &moves {
            assert_eq!(
                from, &at,
                "lost update: a move from {from} while the repository was on {at}: {moves:?}"
            );
            at = to.clone();
        }
        assert_eq!(env.json(&["repo", "show", "t/r1"])["service"], at.as_str());
        assert!(targets.contains(&at.as_str()));
    }
    let stderr = env.fails(&["repo", "clusterize", "r1", "--service", "zzz"], 3);
    assert!(stderr.contains("unknown service"));
    env.ok(&["service", "add", "unbound"]);
    assert!(env
        .fails(&["repo", "clusterize", "r1", "--service", "unbound"], 5)
        .contains("no binding"));
}

fn thaw_refuses_older_copies_unless_forced(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    env.ok(&["repo", "create", "--instance", "t", "r1"]);
    // Not on the repository's service yet.
    assert!(env
        .fails(&["repo", "thaw", "r1", "--promote", "b1", "--force"], 5)
        .contains("clusterize it first"));
    env.ok(&["repo", "clusterize", "r1", "--service", "b"]);
    let before = env.snapshot();
    let stderr = env.fails(&["repo", "thaw", "r1", "--promote", "b1"], 5);
    assert!(
        stderr.contains("a1") && stderr.contains("newer") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(env.snapshot(), before);
    let repo = env.json(&["repo", "thaw", "r1", "--promote", "b1", "--force"]);
    let version = |repo: &Value, device: &str| {
        repo["copies"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["device"] == device))
            .map(|c| c["version"].as_i64().unwrap_or(-1))
    };
    assert_eq!(
        (version(&repo, "a1"), version(&repo, "b1")),
        (Some(1), Some(2))
    );
    // Promoting the newest again is a no-op refusal-free step.
    let repo = env.json(&["repo", "thaw", "r1", "--promote", "b1"]);
    assert_eq!(version(&repo, "b1"), Some(2));
    // Demoting the only newest copy is refused; demoting the stale one is fine.
    let stderr = env.fails(&["repo", "thaw", "r1", "--demote", "b1"], 5);
    assert!(
        stderr.contains("newest") && stderr.contains("a1"),
        "{stderr}"
    );
    let repo = env.json(&["repo", "thaw", "r1", "--demote", "a1"]);
    assert_eq!(
        (version(&repo, "a1"), version(&repo, "b1")),
        (Some(0), Some(2))
    );
    env.fails(
        &["repo", "thaw", "r1", "--promote", "b1", "--demote", "a1"],
        2,
    );
}

fn daemons_follow_the_plan_and_never_start_under_no_daemons(env: &Env) {
    env.two_services();
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "closed",
        "true",
    ]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "b",
        "no-daemons",
        "true",
    ]);
    // An observed repository for the worker to keep up to date.
    let upstream = env.path("upstream.git");
    git_ok(
        env.dir.path(),
        &["init", "-q", "--bare", &upstream.display().to_string()],
    );
    let work = env.path("upstream-work");
    let head = clone_and_commit(&upstream, &work, "observed");
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    let url = format!("file://{}", upstream.display());
    env.ok(&[
        "repo",
        "create",
        "--instance",
        "t",
        "watched",
        "--upstream",
        &url,
    ]);
    let plan = env.json(&["host", "plan", "--instance", "t"]);
    let run = |plan: &Value, service: &str| {
        plan.as_array()
            .and_then(|p| p.iter().find(|e| e["service"] == service))
            .map(|e| e["run_daemons"].clone())
    };
    assert_eq!(
        (run(&plan, "a"), run(&plan, "b")),
        (Some(Value::Bool(true)), Some(Value::Bool(false)))
    );
    assert!(env.ok(&["host", "plan"]).contains("no-daemons is set"));

    let run_dir = env.path("run").display().to_string();
    let restart = env.json(&[
        "host",
        "restart",
        "--instance",
        "t",
        "--run-dir",
        &run_dir,
        "--interval",
        "1",
    ]);
    let pid_a = env.path("run/t.a.a1.pid");
    let pid: i32 = std::fs::read_to_string(&pid_a)
        .expect("daemon pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "daemon not running"
    );
    // The bundled worker runs observation passes: the upstream commit arrives.
    let watched = env.repo_path("ra", "watched");
    let deadline = Instant::now() + Duration::from_secs(20);
    while git(
        &watched,
        &["rev-parse", "--verify", "-q", "refs/heads/main"],
    )
    .stdout
    .trim()
        != head
    {
        assert!(
            Instant::now() < deadline,
            "the daemon never fetched the upstream"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !env.path("run/t.b.b1.pid").exists(),
        "daemon started under no-daemons"
    );
    let b = restart
        .as_array()
        .and_then(|r| r.iter().find(|o| o["service"] == "b"))
        .expect("b outcome");
    assert_eq!(b["started"], Value::Null);

    // A custom template also never runs for no-daemons bindings.
    let marker = env.path("custom-ran");
    let template = format!("echo {{service}} >> '{}'", marker.display());
    env.ok(&[
        "host",
        "restart",
        "--instance",
        "t",
        "--run-dir",
        &run_dir,
        "--template",
        &template,
    ]);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() || zombie(pid),
        "old daemon not stopped"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default().trim(),
        "a"
    );
    env.fails(
        &[
            "host",
            "restart",
            "--run-dir",
            &run_dir,
            "--template",
            "run {nope}",
        ],
        2,
    );

    // Disabling a (closed + no-daemons) and restarting leaves nothing running.
    env.ok(&[
        "host",
        "restart",
        "--instance",
        "t",
        "--run-dir",
        &run_dir,
        "--interval",
        "1",
    ]);
    let pid2: i32 = std::fs::read_to_string(&pid_a)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "closed",
        "true",
    ]);
    env.ok(&[
        "binding",
        "set-property",
        "--instance",
        "t",
        "--service",
        "a",
        "no-daemons",
        "true",
    ]);
    env.ok(&["host", "restart", "--run-dir", &run_dir]);
    assert!(!pid_a.exists());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid2}/stat")).exists() || zombie(pid2),
        "daemon still running"
    );
    assert!(env
        .json(&["host", "plan"])
        .as_array()
        .is_some_and(|p| p.iter().all(|e| e["run_daemons"] == false)));
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn library_steps_are_callable_without_the_cli(env: &Env) {
    env.two_services();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let registry = orchestrate::Registry::open(&env.db, "library-test")
            .await
            .expect("open");
        registry
            .set_binding_property("t", "b", "closed", "true", false)
            .await
            .expect("close b");
        let repo = registry
            .create_repository("t", "lib", None)
            .await
            .expect("create");
        assert_eq!(repo.service, "a");
        let moved = registry.clusterize("t/lib", "b").await.expect("clusterize");
        assert!(moved.changed && moved.from == "a" && moved.to == "b");
        let err = registry
            .thaw("lib", "b1", orchestrate::repos::Thaw::Promote, false)
            .await
            .expect_err("older copy");
        assert_eq!(err.exit_code(), orchestrate::error::exit_code::REFUSED);
        let err = registry.add_service("a").await.expect_err("duplicate");
        assert!(matches!(err, orchestrate::Error::AlreadyExists { .. }));
        registry.close().await;
    });
}

fn ssh_executor_drives_a_device_over_a_real_sshd(env: &Env) {
    if let Some(why) = util::Sshd::unavailable() {
        println!("skipped: {why}");
        return;
    }
    let sshd = util::Sshd::start(env.dir.path());
    let sm = |args: &[&str]| {
        let out = env
            .sm_command(args)
            .env("SHARDMOVE_SSH_CONFIG", &sshd.config)
            .output()
            .expect("shardmove");
        util::to_run(out)
    };
    let ok = |args: &[&str]| {
        let run = sm(args);
        assert_eq!(
            run.code, 0,
            "shardmove {args:?}: {}{}",
            run.stdout, run.stderr
        );
        run.stdout
    };
    let root = env.path("remote-root").display().to_string();
    ok(&["service", "add", "s"]);
    ok(&[
        "device",
        "add",
        "s1",
        "--service",
        "s",
        "--host",
        sshd.alias,
        "--transfer",
        "127.0.0.1:7400",
        "--root",
        &root,
    ]);
    ok(&["instance", "add", "t"]);
    ok(&["binding", "add", "--instance", "t", "--service", "s"]);
    ok(&["repo", "create", "--instance", "t", "over-ssh"]);
    let bare = env.path("remote-root/t/over-ssh.git");
    assert_eq!(
        git_ok(&bare, &["rev-parse", "--is-bare-repository"]),
        "true"
    );
    let work = env.path("work");
    clone_and_commit(&bare, &work, "one");
    ok(&[
        "repo",
        "maintenance",
        "over-ssh",
        "--start",
        "moving over ssh",
        "--wait",
        "10",
    ]);
    let push = git(&work, &["push", "origin", "HEAD:refs/heads/main"]);
    assert!(
        push.code != 0 && push.stderr.contains("moving over ssh"),
        "{}",
        push.stderr
    );
    ok(&["repo", "maintenance", "over-ssh", "--stop"]);
    git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    // Without the config the host is unknown: a clear host-command error, nothing created.
    let run = util::to_run(
        env.sm_command(&["repo", "create", "--instance", "t", "nowhere"])
            .env("SHARDMOVE_SSH_CONFIG", "/dev/null")
            .output()
            .expect("run"),
    );
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("on shardhost"), "{}", run.stderr);
    assert_eq!(
        env.json(&["repo", "list"]).as_array().map(Vec::len),
        Some(1)
    );
}

/// `completions` and `man` need no registry: the scripts parse in their shells, the pages
/// render with `man`.
#[test]
fn completions_and_man_pages_come_from_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| {
        let output = std::process::Command::new(util::BIN)
            .args(args)
            .env("SHARDMOVE_DB", dir.path().join("never-created.db"))
            .output()
            .expect("run shardmove");
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let bash = run(&["completions", "bash"]);
    let script = dir.path().join("shardmove.bash");
    std::fs::write(&script, &bash).expect("write");
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash -n");
    assert!(check.status.success(), "bash -n: {check:?}");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef shardmove"));
    assert!(run(&["completions", "fish"]).contains("complete -c shardmove"));

    let pages = dir.path().join("man");
    let listed = run(&["man", "--out-dir", &pages.display().to_string()]);
    assert!(listed.lines().count() > 20, "{listed}");
    for line in listed.lines() {
        assert!(Path::new(line).is_file(), "{line} listed but not written");
    }
    let page = pages.join("shardmove-migrate.1");
    assert!(page.is_file());
    assert!(!dir.path().join("never-created.db").exists());
    if Path::new("/usr/bin/man").is_file() {
        let rendered = std::process::Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .output()
            .expect("man -l");
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(rendered.status.success(), "man -l: {rendered:?}");
        assert!(text.contains("--parallel"), "{text}");
    } else {
        println!("man not installed: the page's rendering is not checked");
    }
    assert!(run(&["man"]).contains(".TH shardmove 1"));
}
