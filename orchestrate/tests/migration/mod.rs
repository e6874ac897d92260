//! `shardmove migrate` end to end: real shardrecv/shardsend between two shard roots, real
//! git, each test on both backends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{clone_and_commit, commit, git, git_ok, Env, Sshd};

mod chaos;
mod daemon_user;
mod doctor;
mod formats;
mod repack;
mod rotation;
mod tickets;
use chaos::{
    a_final_pass_superseded_after_it_installed_leaves_no_staging,
    every_failpoint_is_taken_over_with_the_invariants,
};
use doctor::doctor_finds_every_planted_problem_and_fixes_the_safe_ones;
use formats::{
    a_target_whose_git_cannot_read_reftable_is_refused_before_the_freeze,
    reftable_and_sha256_repositories_move_and_stay_what_they_are,
};
use repack::{
    a_repack_on_a_is_waited_out_before_the_precopy,
    a_repack_outlasting_the_wait_leaves_the_repository_writable_on_a,
};
use rotation::device_rotate_key_walks_the_steps_while_a_migration_runs;
use tickets::migrate_signs_a_ticket_for_every_pass_and_a_ticketed_receiver_needs_one;

crate::contract!(
    migrate_moves_verified_repositories_and_disables_the_old_service,
    migrate_over_ssh_moves_and_verifies,
    migrate_rolls_back_what_cannot_be_copied_and_leaves_it_writable,
    killed_orchestrator_is_taken_over_from_the_journal,
    kill_after_thawed_takeover_left_b_read_only,
    precopy_rolled_back_is_retried_by_the_next_migrate,
    every_failpoint_is_taken_over_with_the_invariants,
    a_final_pass_superseded_after_it_installed_leaves_no_staging,
    doctor_finds_every_planted_problem_and_fixes_the_safe_ones,
    dry_run_changes_nothing,
    status_page_in_chromium_shows_what_is_read_only_and_why,
    reftable_and_sha256_repositories_move_and_stay_what_they_are,
    a_target_whose_git_cannot_read_reftable_is_refused_before_the_freeze,
    migrate_signs_a_ticket_for_every_pass_and_a_ticketed_receiver_needs_one,
    a_repack_on_a_is_waited_out_before_the_precopy,
    a_repack_outlasting_the_wait_leaves_the_repository_writable_on_a,
    device_rotate_key_walks_the_steps_while_a_migration_runs,
);

/// Issue 10, item 5: over ssh, killing the driver killed only the local ssh client; the remote
/// `shardsend` went on and raced the next driver's pass. A watched remote command dies with
/// the session.
#[test]
fn dead_driver_remote_shardsend_is_killed() {
    if let Some(why) = Sshd::unavailable() {
        println!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sshd = Sshd::start(dir.path());
    // Both ways the executor reaches a host: a connection of its own, and one shared by all
    // steps (the default), where killing the client leaves the master connection up.
    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).expect("socket dir");
    for control_dir in [None, Some(sockets)] {
        let exec = orchestrate::executor::SshExecutor {
            host: sshd.alias.to_string(),
            config: Some(sshd.config.clone()),
            control_dir,
        };
        remote_step_dies_with_its_driver(exec, &dir.path().join("remote.pid"));
    }
}

fn remote_step_dies_with_its_driver(exec: orchestrate::executor::SshExecutor, pid_file: &Path) {
    let _ = std::fs::remove_file(pid_file);
    let pid_file = pid_file.to_path_buf();
    let script = format!("echo $$ > '{}'; exec sleep 120", pid_file.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let step =
            tokio::spawn(
                async move { orchestrate::executor::run(&exec, &["sh", "-c", &script]).await },
            );
        let t0 = Instant::now();
        while !pid_file.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "remote command never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pid = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .to_string();
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "remote command runs"
        );
        // The driver's side goes away (its ssh client is killed with it).
        step.abort();
        let _ = step.await;
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && !zombie(&pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "remote command {pid} outlived its driver's ssh session"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

fn zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

/// The transfer tools, built beside `shardmove` by `cargo test --workspace`.
pub(crate) fn tool(name: &str) -> PathBuf {
    let p = Path::new(crate::util::BIN).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: run the workspace tests (`cargo test --workspace`) so the transfer binaries are built",
        p.display()
    );
    p
}

/// Shard A (source) and shard B (with its shardrecv), registered as services a and b.
struct Shards {
    a: PathBuf,
    b: PathBuf,
    send_key: PathBuf,
    recv: Child,
    /// `migrate --run-dir`: pid files of the daemons the batch (re)starts.
    run: PathBuf,
}

/// The daemon `migrate` starts after the batch in these tests: it writes its pid file and
/// idles until `Shards` is dropped.
const TEST_DAEMON: &str = "echo $$ > {pid_file}; exec sleep 600";

impl Drop for Shards {
    fn drop(&mut self) {
        let _ = self.recv.kill();
        let _ = self.recv.wait();
        // The test daemons' pid files (the run directory also holds their logs).
        for entry in std::fs::read_dir(&self.run).into_iter().flatten().flatten() {
            let pid = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<u32>() {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

pub(crate) fn keygen(bin: &str, out: &Path) -> String {
    let o = Command::new(tool(bin))
        .args(["keygen", "--out"])
        .arg(out)
        .output()
        .expect("keygen");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Where [`setup_on`] puts devices a1 and b1.
struct Layout<'a> {
    /// Their hosts: an ssh alias puts a device behind the ssh executor (shardrecv still runs
    /// here, as the daemon on B's host).
    hosts: [&'a str; 2],
    /// Their roots, relative to the test's directory.
    roots: [&'a str; 2],
    /// Extra `shardrecv serve` arguments for B's receiver.
    recv_args: &'a [&'a str],
    /// B's receiver reads its identity and allow-list from this config file (in the test's
    /// directory; the test writes it, naming `recv.key` and `allow.txt`) instead of flags, so
    /// a SIGHUP reloads what the file says then.
    recv_config: Option<&'a str>,
}

const LOCAL: Layout<'static> = Layout {
    hosts: ["localhost", "localhost"],
    roots: ["shard-a", "shard-b"],
    recv_args: &[],
    recv_config: None,
};

fn setup(env: &Env, repos: &[(&str, usize)]) -> Shards {
    setup_on(env, repos, &LOCAL)
}

fn setup_on(env: &Env, repos: &[(&str, usize)], layout: &Layout) -> Shards {
    let a = env.path(layout.roots[0]);
    let b = env.path(layout.roots[1]);
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let send_key = env.path("send.key");
    let send_fp = keygen("shardsend", &send_key);
    let recv_key = env.path("recv.key");
    let recv_fp = keygen("shardrecv", &recv_key);
    let allow = env.path("allow.txt");
    std::fs::write(&allow, format!("{send_fp}\n")).unwrap();
    let mut recv = Command::new(tool("shardrecv"));
    recv.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(&b);
    match layout.recv_config {
        Some(file) => recv.arg("--config").arg(env.path(file)),
        None => recv
            .arg("--identity")
            .arg(&recv_key)
            .arg("--allow")
            .arg(&allow),
    };
    let recv = recv
        .args(layout.recv_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shardrecv");
    // Owned by `Shards` from here on, so a failure below does not leak the daemon.
    let mut shards = Shards {
        a,
        b,
        send_key,
        recv,
        run: env.path("run"),
    };
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(shards.recv.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.split_whitespace().nth(1).expect("address").to_string();
    let (a_s, b_s) = (
        shards.a.display().to_string(),
        shards.b.display().to_string(),
    );
    env.ok(&["service", "add", "a"]);
    env.ok(&["service", "add", "b"]);
    env.ok(&[
        "device",
        "add",
        "a1",
        "--service",
        "a",
        "--host",
        layout.hosts[0],
        "--transfer",
        "127.0.0.1:9",
        "--root",
        &a_s,
    ]);
    env.ok(&[
        "device",
        "add",
        "b1",
        "--service",
        "b",
        "--host",
        layout.hosts[1],
        "--transfer",
        &addr,
        "--root",
        &b_s,
        "--fingerprint",
        &recv_fp,
    ]);
    env.ok(&["instance", "add", "t"]);
    env.ok(&["binding", "add", "--instance", "t", "--service", "a"]);
    for (name, mib) in repos {
        let repo = env.json(&["repo", "create", "--instance", "t", name]);
        let bare = shards.a.join(repo["path"].as_str().unwrap());
        let work = env.path(&format!("work-{name}"));
        clone_and_commit(&bare, &work, "first");
        if *mib > 0 {
            let data: Vec<u8> = (0..mib << 20)
                .map(|i| (i as u64).wrapping_mul(2654435761) as u8 ^ (i >> 9) as u8)
                .collect();
            std::fs::write(work.join("blob.bin"), data).unwrap();
            git_ok(&work, &["add", "blob.bin"]);
            git_ok(&work, &["commit", "-q", "-m", "data"]);
        }
        git_ok(&work, &["push", "-q", "origin", "HEAD"]);
    }
    shards
}

fn migrate_args<'a>(shards: &'a Shards, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "migrate",
        "--instance",
        "t",
        "--from",
        "a",
        "--to",
        "b",
        "--identity",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(shards.send_key.display().to_string());
    v.extend([
        "--run-dir".to_string(),
        shards.run.display().to_string(),
        "--daemon-template".to_string(),
        TEST_DAEMON.to_string(),
    ]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_migrate(env: &Env, shards: &Shards, extra: &[&str]) -> crate::util::Run {
    let args = migrate_args(shards, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    env.sm(&refs)
}

/// `shardmove migrate ...` with `SHARDMOVE_FAILPOINTS=points` (see `orchestrate::failpoint`),
/// run to its end (or its kill).
fn migrate_with_failpoints(
    env: &Env,
    shards: &Shards,
    extra: &[&str],
    points: &str,
) -> std::process::Output {
    let args = migrate_args(shards, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    env.sm_command(&refs)
        .env("SHARDMOVE_FAILPOINTS", points)
        .output()
        .expect("run shardmove migrate")
}

/// `shardmove migrate ...` in the background, output discarded.
fn spawn_migrate(env: &Env, shards: &Shards, extra: &[&str]) -> Child {
    let args = migrate_args(shards, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    env.sm_command(&refs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shardmove migrate")
}

/// Polls `cond` every 20 ms; fails the test with `what` after `timeout`.
#[track_caller]
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `t/NAME` now lives on service b with the refs it had on A (`refs_before`), out of
/// maintenance; B takes a push (the maintenance hook that travelled with the copy is gone),
/// and A's old copy refuses one, saying where the repository went.
#[track_caller]
fn assert_moved(env: &Env, shards: &Shards, name: &str, refs_before: &str) {
    let repo = env.json(&["repo", "show", &format!("t/{name}")]);
    assert_eq!(repo["service"], "b", "{repo}");
    assert_eq!(repo["maintenance"], false, "{repo}");
    let on_b = shards.b.join(format!("t/{name}.git"));
    assert_eq!(refs(&on_b), refs_before, "{name}: refs moved intact");
    let work = env.path(&format!("after-{name}"));
    clone_and_commit(&on_b, &work, "after the move");
    let push = git(&work, &["push", "-q", "origin", "HEAD"]);
    assert_eq!(push.code, 0, "push to B refused: {}", push.stderr);
    let stale = env.path(&format!("stale-{name}"));
    clone_and_commit(
        &shards.a.join(format!("t/{name}.git")),
        &stale,
        "to the old copy",
    );
    let push = git(&stale, &["push", "-q", "origin", "HEAD"]);
    assert_ne!(push.code, 0, "push to A's stale copy accepted");
    assert!(
        push.stderr
            .contains(&format!("this copy is stale: t/{name} moved to service b")),
        "{}",
        push.stderr
    );
}

/// `migrate` ended incomplete (exit 9) with every repository of the batch rolled back: their
/// rows of `migrate status`.
#[track_caller]
fn all_rolled_back(env: &Env, run: &crate::util::Run) -> Vec<Value> {
    assert_eq!(run.code, 9, "{}{}", run.stdout, run.stderr);
    let status = env.json(&["migrate", "status"]);
    let rows = status["repositories"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!rows.is_empty(), "{status}");
    for r in &rows {
        assert_eq!(r["state"], "rolled_back", "{r}");
    }
    rows
}

/// `t/NAME` was refused before its freeze: never read-only (`status`, its row of `migrate
/// status`), still on service a out of maintenance, A's copy takes a push, B holds nothing.
#[track_caller]
fn assert_left_writable_on_a(env: &Env, shards: &Shards, name: &str, status: &Value) {
    assert!(
        status["readonly_seconds"].is_null() || status["readonly_seconds"].as_f64() == Some(0.0),
        "never frozen: {status}"
    );
    let shown = env.json(&["repo", "show", &format!("t/{name}")]);
    assert_eq!(shown["service"], "a", "{shown}");
    assert_eq!(shown["maintenance"], false, "{shown}");
    let work = env.path(&format!("still-on-a-{name}"));
    clone_and_commit(&shards.a.join(format!("t/{name}.git")), &work, "still on A");
    let push = git(&work, &["push", "-q", "origin", "HEAD"]);
    assert_eq!(push.code, 0, "{}", push.stderr);
    assert!(!shards.b.join(format!("t/{name}.git")).exists());
}

fn refs(path: &Path) -> String {
    git_ok(path, &["for-each-ref", "--format=%(objectname) %(refname)"])
}

fn migrate_moves_verified_repositories_and_disables_the_old_service(env: &Env) {
    let shards = setup(env, &[("r1", 1), ("r2", 0), ("r3", 2)]);
    let before: Vec<String> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| refs(&shards.a.join(format!("t/{r}.git"))))
        .collect();
    let run = run_migrate(env, &shards, &["--parallel", "2", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let summary: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["state"], "done");
    for (i, r) in ["r1", "r2", "r3"].iter().enumerate() {
        assert_moved(env, &shards, r, &before[i]);
    }
    let status = env.json(&["migrate", "status"]);
    for r in status["repositories"].as_array().unwrap() {
        assert_eq!(r["state"], "done");
        assert!(r["readonly_seconds"].as_f64().unwrap() >= 0.0);
        assert!(r["bytes"].as_u64().unwrap() > 0);
    }
    let binding = env.json(&["binding", "show", "--instance", "t", "--service", "a"]);
    assert_eq!(binding["closed"], true);
    assert_eq!(binding["no_daemons"], true);
    // `host restart` ran for the instance: a daemon for B's binding, none for A's.
    let b_daemon = shards.run.join("t.b.b1.pid");
    let pid = std::fs::read_to_string(&b_daemon).expect("B's daemon wrote its pid file");
    assert!(
        Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "B's daemon runs"
    );
    assert!(!shards.run.join("t.a.a1.pid").exists(), "no daemon for A");
    // Robust to the next sync.
    env.ok(&["sync"]);
    let binding = env.json(&["binding", "show", "--instance", "t", "--service", "a"]);
    assert_eq!(binding["no_daemons"], true);
}

/// Both shard hosts behind ssh: every host step (shardsend, hooks, the wait for pushes, `git`
/// verification) goes through the ssh executor to a real sshd. One sshd per host, reached
/// only through its alias in the file named by `SHARDMOVE_SSH_CONFIG`, so each sshd's log
/// shows that its host's steps went through it. The roots hold shell metacharacters: every
/// path crosses the remote login shell, so quoting has to be right.
fn migrate_over_ssh_moves_and_verifies(env: &Env) {
    if let Some(why) = Sshd::unavailable() {
        println!("skipped: {why}");
        return;
    }
    let host_a = Sshd::start_as(&env.path("sshd-a"), "shard-a-over-ssh");
    let host_b = Sshd::start_as(&env.path("sshd-b"), "shard-b-over-ssh");
    let config = env.path("ssh_config");
    let both = [&host_a.config, &host_b.config].map(|c| std::fs::read_to_string(c).unwrap());
    std::fs::write(&config, both.concat()).unwrap();
    env.set_var("SHARDMOVE_SSH_CONFIG", &config);
    let layout = Layout {
        hosts: [host_a.alias, host_b.alias],
        roots: ["shard-a'$HOME", "shard-b;*"],
        recv_args: &[],
        recv_config: None,
    };
    let names = ["r1", "r2"];
    let shards = setup_on(env, &[("r1", 1), ("r2", 0)], &layout);
    let before: Vec<String> = names
        .iter()
        .map(|r| refs(&shards.a.join(format!("t/{r}.git"))))
        .collect();
    let before_ssh = (
        host_a.commands(),
        host_b.commands(),
        host_a.sessions(),
        host_b.sessions(),
    );

    let run = run_migrate(env, &shards, &["--parallel", "2", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let summary: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["state"], "done", "{summary}");
    let status = env.json(&["migrate", "status"]);
    for r in status["repositories"].as_array().unwrap() {
        assert_eq!(r["state"], "done", "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    }
    for (i, r) in names.iter().enumerate() {
        // A's stale hook went in over ssh.
        assert_moved(env, &shards, r, &before[i]);
    }
    assert_eq!(env.json(&["status"]).as_array().map(Vec::len), Some(0));
    // Per repository, A ran two shardsend passes, its hook and push wait, its refs and the
    // stale hook; B the pre-copy fsck, its verification and its unhook. Each through its own
    // sshd, over few connections: the executor shares one per host.
    let commands = (
        host_a.commands() - before_ssh.0,
        host_b.commands() - before_ssh.1,
    );
    let connections = (
        host_a.sessions() - before_ssh.2,
        host_b.sessions() - before_ssh.3,
    );
    let n = names.len();
    assert!(
        commands.0 >= 4 * n && commands.1 >= 2 * n,
        "commands run over ssh during the migration (A, B): {commands:?}"
    );
    assert!(
        connections.0 < commands.0 && connections.1 < commands.1,
        "ssh connections {connections:?} for {commands:?} commands: not shared"
    );
}

fn migrate_rolls_back_what_cannot_be_copied_and_leaves_it_writable(env: &Env) {
    let mut shards = setup(env, &[("r1", 0), ("r2", 0)]);
    // B's receiver is gone: every transfer fails.
    let _ = shards.recv.kill();
    let _ = shards.recv.wait();
    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 9, "{}{}", run.stdout, run.stderr);
    let status = env.json(&["migrate", "status"]);
    for r in status["repositories"].as_array().unwrap() {
        assert_eq!(r["state"], "rolled_back", "{r}");
        assert!(
            r["error"].as_str().unwrap().contains("shardsend"),
            "the error names the failed step: {r}"
        );
    }
    assert_eq!(status["state"], "incomplete");
    for r in ["r1", "r2"] {
        let repo = env.json(&["repo", "show", &format!("t/{r}")]);
        assert_eq!(repo["service"], "a");
        assert_eq!(repo["maintenance"], false);
        let work = env.path(&format!("w-{r}"));
        clone_and_commit(&shards.a.join(format!("t/{r}.git")), &work, "still on A");
        assert_eq!(git(&work, &["push", "-q", "origin", "HEAD"]).code, 0);
    }
}

/// Issue 10, item 2: a pre-copy that failed (there, on a push's vanished quarantine
/// directory) rolled the repository back and ended the batch `failed`; the next `migrate`
/// then refused with exit 5. A rolled-back repository is left writable on A and the next
/// `migrate` of the same services retries it to `done`.
fn precopy_rolled_back_is_retried_by_the_next_migrate(env: &Env) {
    let shards = setup(env, &[("r1", 1)]);
    let before = refs(&shards.a.join("t/r1.git"));
    let out = migrate_with_failpoints(env, &shards, &["--json"], "error:before-host-precopy");
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = env.json(&["migrate", "status"]);
    assert_eq!(
        status["repositories"][0]["state"], "rolled_back",
        "{status}"
    );
    let repo = env.json(&["repo", "show", "t/r1"]);
    assert_eq!(
        (repo["service"].as_str(), repo["maintenance"].as_bool()),
        (Some("a"), Some(false))
    );
    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let status = env.json(&["migrate", "status"]);
    assert_eq!(status["repositories"][0]["state"], "done", "{status}");
    assert_moved(env, &shards, "r1", &before);
}

fn killed_orchestrator_is_taken_over_from_the_journal(env: &Env) {
    // r2's pre-copy at 2 MB/s (4 s) keeps the first driver busy while the test checks that
    // nobody else may drive its batch.
    let shards = setup(env, &[("r1", 3), ("r2", 8)]);
    let mut child = spawn_migrate(env, &shards, &["--parallel", "1", "--bwlimit", "2M"]);
    // Wait until the first repository is past its pre-copy, then kill -9.
    wait_until(
        Duration::from_secs(60),
        "migration never progressed",
        || {
            let run = env.sm(&["migrate", "status", "--json"]);
            run.code == 0
                && serde_json::from_str::<Value>(&run.stdout).unwrap()["repositories"][0]["state"]
                    != "pending"
        },
    );
    // While its driver lives, the batch is neither doubled nor resumed by a second process.
    let st = env.json(&["migrate", "status"]);
    let id = st["id"].as_i64().unwrap().to_string();
    assert!(st["owner_gone"].is_null(), "{st}");
    let second = run_migrate(env, &shards, &[]);
    assert_eq!(second.code, 5, "{}{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("still running"), "{}", second.stderr);
    let resume = run_migrate(env, &shards, &["--resume", &id]);
    assert_eq!(resume.code, 5, "{}{}", resume.stdout, resume.stderr);
    assert!(resume.stderr.contains("driven by pid"), "{}", resume.stderr);

    child.kill().unwrap();
    child.wait().unwrap();
    let st = env.json(&["migrate", "status"]);
    assert_eq!(st["state"], "running", "{st}");
    assert!(
        st["owner_gone"]
            .as_str()
            .is_some_and(|g| g.contains("exited")),
        "{st}"
    );
    // A plain `migrate` of the same services takes the orphaned batch over.
    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!("taking over migration {id}")),
        "{}",
        run.stderr
    );
    let st = env.json(&["migrate", "status", &id]);
    assert_eq!(st["state"], "done");
    for r in st["repositories"].as_array().unwrap() {
        assert_eq!(r["state"], "done");
    }
    let in_maintenance = env.json(&["status"]);
    assert_eq!(in_maintenance.as_array().map(Vec::len), Some(0));
}

/// Issue 10, item 1: a driver killed after "thawed" (now `promoted`) (B promoted, B still hooked) was taken
/// over by one that re-derived the source from the registry, which by then named B: it put
/// the *stale* hook on B, the new home, and left A with the freeze hook. B refused every push
/// while the registry said the repository was writable.
fn kill_after_thawed_takeover_left_b_read_only(env: &Env) {
    let shards = setup(env, &[("r1", 1), ("r2", 0)]);
    let before: Vec<String> = ["r1", "r2"]
        .iter()
        .map(|r| refs(&shards.a.join(format!("t/{r}.git"))))
        .collect();
    let killed =
        migrate_with_failpoints(env, &shards, &["--parallel", "1"], "after-journal-promoted");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        killed.status.signal(),
        Some(9),
        "the failpoint kills the driver: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let st = env.json(&["migrate", "status"]);
    assert_eq!(st["repositories"][0]["state"], "promoted", "{st}");

    let run = run_migrate(env, &shards, &["--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("taking over migration"),
        "{}",
        run.stderr
    );
    for (i, r) in ["r1", "r2"].iter().enumerate() {
        assert_moved(env, &shards, r, &before[i]);
        let hooks = shards.b.join(format!("t/{r}.git/hooks"));
        assert!(
            !hooks.join("shardmove-maintenance.msg").exists(),
            "{r}: B keeps no maintenance message"
        );
    }
    assert_no_staging(&shards);
}

/// Nothing is left in B's staging area (`ROOT/.shardrecv/`): every transfer was installed or
/// discarded.
#[track_caller]
fn assert_no_staging(shards: &Shards) {
    let left: Vec<_> = std::fs::read_dir(shards.b.join(".shardrecv"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "staging left behind on B: {left:?}");
}

fn dry_run_changes_nothing(env: &Env) {
    let shards = setup(env, &[("r1", 0)]);
    let before = env.snapshot();
    let run = run_migrate(env, &shards, &["--dry-run", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let plan: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(plan[0]["repository"], "t/r1");
    assert_eq!(plan[0]["target"]["device"], "b1");
    assert_eq!(plan[0]["source"]["device"], "a1");
    assert_eq!(env.snapshot(), before);
    let err = env.fails(
        &[
            "migrate",
            "--instance",
            "t",
            "--from",
            "a",
            "--to",
            "nowhere",
        ],
        3,
    );
    assert!(err.contains("nowhere"), "{err}");
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

/// Headless Chromium, as DESIGN.md §6 runs it: `--dump-dom` or `--screenshot`.
fn chromium_run(env: &Env, args: &[&str]) -> crate::util::Run {
    let exe = chromium().expect("chromium");
    let profile = env.path(&format!("chromium-profile-{}", fastrand::u32(..)));
    let out = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    crate::util::to_run(out)
}

/// `GET /metrics` of the status page at `url` (`http://ADDR/`), over a plain socket as a
/// Prometheus server would; the body.
fn scrape(url: &str) -> String {
    use std::io::{Read, Write};
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect to the status page");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{response}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample `name` (with its labels) in a scrape.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}"))
}

fn status_page_in_chromium_shows_what_is_read_only_and_why(env: &Env) {
    if chromium().is_none() {
        println!("skipped: chromium not installed (.ci/run installs it)");
        return;
    }
    let shards = setup(env, &[("r1", 0), ("r2", 0)]);
    // A push held in the site's own slow hook keeps r1's freeze waiting for it: the window
    // in which users see the page.
    let bare = shards.a.join("t/r1.git");
    let marker = env.path("hook-started");
    let hook = format!("#!/bin/sh\ntouch '{}'\nsleep 6\nexit 0\n", marker.display());
    let hook_path = bare.join("hooks/pre-receive");
    std::fs::write(&hook_path, hook).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = env.path("slow-push");
    clone_and_commit(&bare, &work, "in flight");
    let mut push = Command::new("git")
        .args(["push", "-q", "origin", "HEAD"])
        .current_dir(&work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "push never reached the hook",
        || marker.exists(),
    );
    let message = "Moving to faster disks: pushes pause for a moment";
    let mut migration = spawn_migrate(env, &shards, &["--parallel", "1", "--message", message]);
    let mut page = env
        .sm_command(&["status", "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(page.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("serving ")
        .expect("url")
        .to_string();
    // Wait for r1 to be read-only, then load the page the way a user would.
    wait_until(Duration::from_secs(30), "r1 never became read-only", || {
        env.json(&["status"]).as_array().map(Vec::len) == Some(1)
    });
    let dom = chromium_run(env, &["--dump-dom", &url]);
    assert_eq!(dom.code, 0, "chromium failed: {}", dom.stderr);
    assert!(dom.stdout.contains("t/r1"), "{}", dom.stdout);
    assert!(dom.stdout.contains(message), "{}", dom.stdout);
    assert!(dom.stdout.contains("Migration 1 of"), "{}", dom.stdout);
    assert!(!dom.stdout.contains("Every repository accepts pushes"));
    // A screenshot for people: kept beside the test binaries.
    let shot =
        Path::new(crate::util::BIN).with_file_name(format!("status-page-{}.png", env.backend));
    let _ = std::fs::remove_file(&shot);
    let run = chromium_run(
        env,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,500",
            &url,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::metadata(&shot)
        .map(|m| m.len() > 1000)
        .unwrap_or(false));
    // The JSON side agrees.
    let api = chromium_run(env, &["--dump-dom", &format!("{url}api/status")]);
    assert!(api.stdout.contains("\"read_only\""), "{}", api.stdout);
    // Prometheus sees the same, during the migration...
    let during = scrape(&url);
    assert_eq!(
        metric(&during, "shardmove_repositories_read_only"),
        1.0,
        "{during}"
    );
    assert_eq!(
        metric(&during, "shardmove_migration_batches{state=\"running\"}"),
        1.0,
        "{during}"
    );

    assert!(
        push.wait().unwrap().success(),
        "the in-flight push completes"
    );
    assert!(migration.wait().unwrap().success());
    let dom = chromium_run(env, &["--dump-dom", &url]);
    assert!(
        dom.stdout.contains("Every repository accepts pushes"),
        "{}",
        dom.stdout
    );
    // ... and after it: what moved, and the two read-only windows in the histogram.
    assert!(
        dom.stdout.contains("2 of 2 repositories moved"),
        "{}",
        dom.stdout
    );
    assert!(
        dom.stdout.contains("Last read-only windows"),
        "{}",
        dom.stdout
    );
    assert!(
        dom.stdout.contains(" UTC</span>, <span id=\"age\">"),
        "{}",
        dom.stdout
    );
    let after = scrape(&url);
    assert_eq!(
        metric(&after, "shardmove_repositories_read_only"),
        0.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "shardmove_migrated_repositories_total"),
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "shardmove_readonly_window_seconds_count"),
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "shardmove_readonly_window_seconds_bucket{le=\"+Inf\"}"
        ),
        2.0,
        "{after}"
    );
    assert!(
        metric(&after, "shardmove_migrated_bytes_total") > 0.0,
        "{after}"
    );
    // The r1 window waited for the in-flight push (~6 s): the histogram says so.
    assert!(
        metric(&after, "shardmove_readonly_window_seconds_sum") > 1.0,
        "{after}"
    );
    let _ = page.kill();
    let _ = page.wait();
}
