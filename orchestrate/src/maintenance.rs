//! Maintenance mode on disk: the `pre-receive` hook that refuses pushes, and the wait for
//! pushes already past it.
//!
//! **Hook.** `start` installs a `pre-receive` hook that prints the operator's message and
//! exits 1, so git refuses every push (SSH, HTTP, local) while `clone`/`fetch` (which never
//! run `pre-receive`) keep working. An existing hook is kept by hard-linking it to
//! `pre-receive.shardmove-orig` before our hook is renamed over `pre-receive`: there is no
//! instant without a hook, and `stop` renames the original back, restoring the very same
//! file (content, mode, inode; a symlink stays a symlink). While maintenance is on, the
//! original is not chained into: every push is refused anyway, so running it could only
//! cause side effects. The hooks directory is asked from git (`rev-parse --git-path
//! hooks`), so `core.hooksPath` is honoured.
//!
//! **Waiting for pushes in flight.** A push that ran `pre-receive` before the hook was
//! swapped will still update refs. After installing the hook, `wait_idle` polls until no
//! process whose working directory is the repository has `receive-pack` (or `fetch`, an
//! observation pull) in its command line, and no `*.lock` remains under `refs/` or as
//! `packed-refs.lock`. `git receive-pack` always `chdir`s into the repository (local, ssh and
//! `http-backend` pushes alike), and git holds a ref's `.lock` file for the whole ref update,
//! so "no such process and no lock" means no ref can change any more. Alternatives
//! considered: `fuser`/`lsof` on the refs (not installed everywhere, and misses a push
//! between pack receipt and ref locking), or a `reference-transaction` hook counting
//! transactions (needs git >= 2.28 on every shard and does not see pushes that started
//! before it was installed). The scan is a small `sh` script run through the executor, so it
//! works over ssh unchanged.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::executor::{self, Executor};

/// Marker line identifying our hook.
pub const HOOK_MARKER: &str = "shardmove-maintenance-hook";

// The scripts run inside the read-only window, where every process costs milliseconds on a
// busy host: they use shell builtins (`read`, `printf`, `[`) wherever an external command is
// not needed. `is_ours` reads only the first lines of `pre-receive`, where our marker sits.
const IS_OURS: &str = r#"is_ours() {
  [ -f "$1" ] || return 1
  n=0
  while [ $n -lt 3 ] && IFS= read -r line; do
    case $line in *shardmove-maintenance-hook*) return 0 ;; esac
    n=$((n + 1))
  done < "$1"
  return 1
}
"#;

const INSTALL_SCRIPT: &str = r#"set -eu
repo=$1
hooks=$(git -C "$repo" rev-parse --path-format=absolute --git-path hooks)
[ -d "$hooks" ] || mkdir -p "$hooks"
printf '%s\n' "$2" > "$hooks/shardmove-maintenance.msg.tmp"
mv -f "$hooks/shardmove-maintenance.msg.tmp" "$hooks/shardmove-maintenance.msg"
if ! is_ours "$hooks/pre-receive"; then
  if [ -e "$hooks/pre-receive" ] || [ -L "$hooks/pre-receive" ]; then
    if [ -e "$hooks/pre-receive.shardmove-orig" ] || [ -L "$hooks/pre-receive.shardmove-orig" ]; then
      echo "$hooks/pre-receive.shardmove-orig already exists; not overwriting it" >&2
      exit 3
    fi
    ln -P "$hooks/pre-receive" "$hooks/pre-receive.shardmove-orig"
  fi
  printf '%s\n' '#!/bin/sh' \
    '# shardmove-maintenance-hook: installed by `shardmove repo maintenance --start`, removed by' \
    '# `--stop` (which restores any original hook from pre-receive.shardmove-orig).' \
    '# Refuses every push with the operator'"'"'s message; clone and fetch are not affected.' \
    'msg="$(dirname "$0")/shardmove-maintenance.msg"' \
    'if [ -r "$msg" ]; then cat "$msg" >&2; else echo "repository in maintenance" >&2; fi' \
    'exit 1' > "$hooks/pre-receive.shardmove-tmp"
  chmod 755 "$hooks/pre-receive.shardmove-tmp"
  mv -f "$hooks/pre-receive.shardmove-tmp" "$hooks/pre-receive"
fi
"#;

const REMOVE_SCRIPT: &str = r#"set -eu
repo=$1
hooks=$(git -C "$repo" rev-parse --path-format=absolute --git-path hooks)
if [ -e "$hooks/pre-receive.shardmove-orig" ] || [ -L "$hooks/pre-receive.shardmove-orig" ]; then
  mv -f "$hooks/pre-receive.shardmove-orig" "$hooks/pre-receive"
  rm -f "$hooks/shardmove-maintenance.msg"
elif is_ours "$hooks/pre-receive"; then
  rm -f "$hooks/pre-receive" "$hooks/shardmove-maintenance.msg"
else
  rm -f "$hooks/shardmove-maintenance.msg"
fi
"#;

const WAIT_IDLE_SCRIPT: &str = r#"set -u
repo=$(cd "$1" && pwd -P) || exit 2
pat=$repo
case $repo in *[][*?\\]*) pat=$(printf '%s' "$repo" | sed 's/[][*?\\]/\\&/g') ;; esac
end=
busy() {
  for link in $(find /proc -mindepth 2 -maxdepth 2 -name cwd -lname "$pat" 2>/dev/null); do
    dir=${link%/cwd}
    cmd=$(tr '\0' ' ' < "$dir/cmdline" 2>/dev/null) || continue
    case "$cmd" in
      *receive-pack*|*" fetch "*) echo "process ${dir#/proc/}: $cmd"; return 0 ;;
    esac
  done
  if [ -e "$repo/packed-refs.lock" ]; then echo "lock file $repo/packed-refs.lock"; return 0; fi
  lock=$(find "$repo/refs" -name '*.lock' -print -quit 2>/dev/null)
  if [ -n "$lock" ]; then echo "lock file $lock"; return 0; fi
  return 1
}
while what=$(busy); do
  now=$(date +%s)
  [ -n "$end" ] || end=$((now + $2))
  if [ "$now" -ge "$end" ]; then echo "$what"; exit 3; fi
  sleep 0.1
done
"#;

/// Whether a directory exists on the host.
pub async fn exists(executor: &dyn Executor, path: &str) -> Result<bool> {
    Ok(executor::run_status(executor, &["test", "-d", path])
        .await?
        .status
        == 0)
}

/// Installs the maintenance hook with `message` in the repository at `repo_path`.
pub async fn install_hook(executor: &dyn Executor, repo_path: &str, message: &str) -> Result<()> {
    executor::run(
        executor,
        &[
            "sh",
            "-c",
            &format!("{IS_OURS}{INSTALL_SCRIPT}"),
            "install-maintenance-hook",
            repo_path,
            message,
        ],
    )
    .await?;
    Ok(())
}

/// Removes the maintenance hook, restoring the original `pre-receive` if there was one.
pub async fn remove_hook(executor: &dyn Executor, repo_path: &str) -> Result<()> {
    executor::run(
        executor,
        &[
            "sh",
            "-c",
            &format!("{IS_OURS}{REMOVE_SCRIPT}"),
            "remove-maintenance-hook",
            repo_path,
        ],
    )
    .await?;
    Ok(())
}

/// Waits until no push (or observation fetch) is working on the repository, at most `wait`.
pub async fn wait_idle(
    executor: &dyn Executor,
    repo_path: &str,
    repo_name: &str,
    wait: Duration,
) -> Result<()> {
    let secs = wait.as_secs().to_string();
    let argv = [
        "sh",
        "-c",
        WAIT_IDLE_SCRIPT,
        "wait-for-pushes",
        repo_path,
        &secs,
    ];
    wait_outcome(executor, &argv, repo_name, wait).await
}

/// [`install_hook`] then [`wait_idle`] in one process: one round trip (one ssh session) less
/// in the read-only window.
pub async fn install_hook_and_wait_idle(
    executor: &dyn Executor,
    repo_path: &str,
    repo_name: &str,
    message: &str,
    wait: Duration,
) -> Result<()> {
    let script =
        format!("{IS_OURS}{INSTALL_SCRIPT}set +e\nset -- \"$1\" \"$3\"\n{WAIT_IDLE_SCRIPT}");
    let secs = wait.as_secs().to_string();
    let argv = [
        "sh",
        "-c",
        &script,
        "install-hook-and-wait-for-pushes",
        repo_path,
        message,
        &secs,
    ];
    wait_outcome(executor, &argv, repo_name, wait).await
}

async fn wait_outcome(
    executor: &dyn Executor,
    argv: &[&str],
    repo_name: &str,
    wait: Duration,
) -> Result<()> {
    let output = executor::run_status(executor, argv).await?;
    match output.status {
        0 => Ok(()),
        3 => Err(Error::PushesInFlight {
            repo: repo_name.to_string(),
            waited_secs: wait.as_secs(),
            detail: output.stdout.trim().to_string(),
        }),
        _ => Err(executor::host_error(executor, argv, &output)),
    }
}
