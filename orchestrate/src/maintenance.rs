//! Maintenance mode on disk: the `pre-receive` hook that refuses pushes, and the wait for
//! pushes already past it (the scripts are `install_hook`, `remove_hook` and `wait_idle` in
//! `host-scripts/lib.sh`).
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
//! before it was installed).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::scripts::{exit, Script};

/// Marker line identifying our hook (`HOOK_MARKER` in `host-scripts/lib.sh`).
pub const HOOK_MARKER: &str = "shardmove-maintenance-hook";

/// Whether a directory exists on the host.
pub async fn exists(executor: &dyn Executor, path: &str) -> Result<bool> {
    Ok(crate::executor::run_status(executor, &["test", "-d", path])
        .await?
        .status
        == 0)
}

/// Installs the maintenance hook with `message` in the repository at `repo_path`.
pub async fn install_hook(executor: &dyn Executor, repo_path: &str, message: &str) -> Result<()> {
    Script::InstallHook
        .run_ok(executor, &[repo_path, message])
        .await?;
    Ok(())
}

/// Removes the maintenance hook, restoring the original `pre-receive` if there was one.
pub async fn remove_hook(executor: &dyn Executor, repo_path: &str) -> Result<()> {
    Script::RemoveHook.run_ok(executor, &[repo_path]).await?;
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
    let args = [repo_path, secs.as_str()];
    let out = Script::WaitIdle.run(executor, &args, None).await?;
    wait_outcome(Script::WaitIdle, executor, &args, out, repo_name, wait)
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
    let secs = wait.as_secs().to_string();
    let args = [repo_path, message, secs.as_str()];
    let script = Script::InstallHookAndWaitIdle;
    let out = script.run(executor, &args, None).await?;
    wait_outcome(script, executor, &args, out, repo_name, wait)
}

fn wait_outcome(
    script: Script,
    executor: &dyn Executor,
    args: &[&str],
    out: crate::executor::CommandOutput,
    repo_name: &str,
    wait: Duration,
) -> Result<()> {
    match out.status {
        0 => Ok(()),
        exit::PUSHES_IN_FLIGHT => Err(Error::PushesInFlight {
            repo: repo_name.to_string(),
            waited_secs: wait.as_secs(),
            detail: out.stdout.trim().to_string(),
        }),
        _ => Err(script.failed(executor, args, &out)),
    }
}

/// A rolled-back copy at `dest` moved aside as `DEST.rolled-back-STAMP`, and the transfer's
/// `staging` directory discarded unless a transfer still holds its lock.
pub async fn discard_copy(
    executor: &dyn Executor,
    dest: &str,
    staging: &str,
    stamp: i64,
) -> Result<()> {
    let stamp = stamp.to_string();
    Script::DiscardCopy
        .run_ok(executor, &[dest, &stamp, staging])
        .await?;
    Ok(())
}
