//! [`HostOps`] over the shard hosts' executors: `shardsend` passes, hooks, and git checks.
//! The same operations serve both control planes; the core simply emits no hook operation
//! where the plane freezes by a flag (Phorge).
//!
//! Transfers run `shardsend` on the source's host towards the target's `shardrecv`, pinned to
//! the target's fingerprints (one `--peer` each, preferred first: two during a key rotation);
//! its `--json` summary is read as [`transfer::send::SendSummary`].

use std::path::Path;
use std::time::Duration;

use super::core::{Completion, HostOp};
use super::ports::{BoxFuture, HostOps, RepoPlan};
use crate::error::{Error, Result};
use crate::executor::{self, executor_for_host, Executor};
use crate::scripts::Script;
use crate::{maintenance, verify};

/// How much longer than the receiver's idle timeout [`HostOp::ClearStaging`] waits for a
/// transfer to let go of the staging (a receiver whose sender was killed holds it until then).
const CLEAR_STAGING_MARGIN: Duration = Duration::from_secs(15);

/// How transfers and the push wait run.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// `shardsend` as run on the source hosts.
    pub shardsend: String,
    /// The sender identity key, as a path on the source hosts.
    pub identity: String,
    /// Extra `shardsend` arguments (e.g. `--bwlimit 50M`).
    pub shardsend_args: Vec<String>,
    /// How long the freeze waits for pushes in flight.
    pub freeze_wait: Duration,
    /// Signs a transfer ticket for every pass (`--ticket-key`), for receivers that require
    /// them.
    pub tickets: Option<std::sync::Arc<crate::tickets::TicketSigner>>,
    /// How long a pre-copy round waits for a `git gc`/`repack` running on A to finish.
    pub repack_wait: Duration,
}

/// Host operations through each device's executor.
#[derive(Debug, Clone)]
pub struct ExecutorHostOps {
    pub cfg: HostConfig,
}

fn source(repo: &RepoPlan) -> Result<Box<dyn Executor>> {
    executor_for_host(&repo.source.device, &repo.source.host)
}

fn target(repo: &RepoPlan) -> Result<Box<dyn Executor>> {
    executor_for_host(&repo.target.device, &repo.target.host)
}

impl ExecutorHostOps {
    /// One `shardsend` pass (`stage_only`: the live pre-copy), its summary.
    async fn send(&self, repo: &RepoPlan, stage_only: bool) -> Result<transfer::send::SendSummary> {
        if repo.target.fingerprints.is_empty() {
            return Err(Error::Refused(format!(
                "device {} has no key fingerprint: shardsend must pin its shardrecv",
                repo.target.device
            )));
        }
        let src = repo.source.path(&repo.path);
        let ticket = match &self.cfg.tickets {
            Some(signer) => Some(
                signer
                    .ticket_for(
                        repo,
                        (source(repo)?.as_ref(), target(repo)?.as_ref()),
                        (&self.cfg.shardsend, &self.cfg.identity),
                        stage_only,
                    )
                    .await?,
            ),
            None => None,
        };
        let mut argv: Vec<&str> = vec![
            &self.cfg.shardsend,
            &src,
            &repo.target.transfer_addr,
            &repo.path,
            "--identity",
            &self.cfg.identity,
            "--json",
            "--no-progress",
            "--resume",
        ];
        // A pre-copy round waits for a git gc/repack on A (see transfer::git_maintenance).
        let repack_wait = format!("{}s", self.cfg.repack_wait.as_secs());
        for fingerprint in &repo.target.fingerprints {
            argv.extend(["--peer", fingerprint.as_str()]);
        }
        if stage_only {
            argv.extend(["--stage-only", "--repack-wait", &repack_wait]);
        }
        if let Some(ticket) = &ticket {
            argv.extend(["--ticket", ticket.as_str()]);
        }
        argv.extend(self.cfg.shardsend_args.iter().map(String::as_str));
        let exec = source(repo)?;
        let out = executor::run_status(exec.as_ref(), &argv).await?;
        match out.status {
            0 => serde_json::from_str(&out.stdout)
                .map_err(|e| Error::Refused(format!("shardsend printed no JSON summary ({e})"))),
            transfer::error::exit::SOURCE_BUSY => Err(Error::Refused(format!(
                "{} is still being repacked on {} after {} s; the pre-copy waits for git's \
                 gc/repack so that the read-only window stays short: retry when it ends, or \
                 give it longer with --repack-wait ({})",
                repo.repository,
                exec.host(),
                self.cfg.repack_wait.as_secs(),
                out.stderr.trim()
            ))),
            _ => Err(executor::host_error(exec.as_ref(), &argv, &out)),
        }
    }

    async fn run_op(&self, repo: &RepoPlan, op: &HostOp) -> Result<Completion> {
        let src = repo.source.path(&repo.path);
        let dst = repo.target.path(&repo.path);
        Ok(match op {
            HostOp::Precopy => {
                // shardsend waits for a repack running on A first (--repack-wait), which
                // would be copied over and over, or fail the frozen final pass.
                let sent = self.send(repo, true).await?;
                let waited = sent.waited_for.as_ref().map(|what| {
                    format!(
                        "waited {:.1} s for {what} on {}",
                        sent.waited_seconds, repo.source.device
                    )
                });
                // Before anything is frozen: B's git must read what A's holds. Checked after
                // the round (shardsend reads the formats, sparing a process per round): a
                // refusal then rolls back a staged copy, which is rare and harmless.
                let formats = sent.git_formats.clone().ok_or_else(|| {
                    Error::Refused(format!(
                        "{} on {} was not sent as a git repository",
                        src, repo.source.device
                    ))
                })?;
                verify::ensure_git_supports(target(repo)?.as_ref(), &formats)
                    .await
                    .map_err(|e| match e {
                        Error::Refused(why) => Error::Refused(format!(
                            "{} cannot move to device {}: {why}",
                            repo.repository, repo.target.device
                        )),
                        other => other,
                    })?;
                Completion::Precopied {
                    sent_bytes: sent.sent_bytes,
                    waited,
                }
            }
            HostOp::CheckStaged => {
                // The pre-copy waits in shardrecv's staging area under B's root; fsck it now,
                // while the repository is live.
                let staged = transfer::staging::staging_dir(
                    Path::new(&repo.target.root),
                    repo.path.as_bytes(),
                )
                .join("tree");
                let tips =
                    verify::full_connectivity(target(repo)?.as_ref(), &staged.to_string_lossy())
                        .await?;
                Completion::Staged { tips }
            }
            HostOp::HookSource { message } => {
                maintenance::install_hook_and_wait_idle(
                    source(repo)?.as_ref(),
                    &src,
                    &repo.repository,
                    message,
                    self.cfg.freeze_wait,
                )
                .await?;
                Completion::Nothing
            }
            HostOp::FinalPass => {
                let exec = source(repo)?;
                // A is frozen and idle: its refs are read while the pass runs.
                let (sent, refs) = tokio::join!(
                    self.send(repo, false),
                    verify::refs_digest(exec.as_ref(), &src)
                );
                let sent = sent?;
                Completion::FinalPass {
                    bytes: sent.bytes,
                    sent_bytes: sent.sent_bytes,
                    source_refs: refs?,
                }
            }
            HostOp::ProbeInstalled => {
                let (a_exec, b_exec) = (source(repo)?, target(repo)?);
                if !maintenance::exists(b_exec.as_ref(), &dst).await? {
                    return Ok(Completion::Nothing);
                }
                let (a, b) = tokio::join!(
                    verify::refs_digest(a_exec.as_ref(), &src),
                    verify::refs_digest(b_exec.as_ref(), &dst)
                );
                let a = a?;
                match b {
                    Ok(b) if b == a => Completion::AlreadyInstalled { source_refs: a },
                    _ => Completion::Nothing,
                }
            }
            HostOp::ReadSourceRefs => {
                Completion::SourceRefs(verify::refs_digest(source(repo)?.as_ref(), &src).await?)
            }
            HostOp::VerifyTarget {
                source_refs,
                verified_tips,
            } => {
                let exec = target(repo)?;
                let checked = match verified_tips {
                    Some(tips) => {
                        verify::refs_and_connected_since(exec.as_ref(), &dst, source_refs, tips)
                            .await
                    }
                    None => {
                        verify::refs_and_full_connectivity(exec.as_ref(), &dst, source_refs).await
                    }
                };
                checked.map_err(|e| match e {
                    Error::Refused(why) => Error::Refused(format!(
                        "verification of {} on {} against {} failed: {why}",
                        repo.repository, repo.target.device, repo.source.device
                    )),
                    other => other,
                })?;
                Completion::Nothing
            }
            HostOp::UnhookTarget => {
                maintenance::remove_hook(target(repo)?.as_ref(), &dst).await?;
                Completion::Nothing
            }
            HostOp::MarkSourceStale { message } => {
                maintenance::install_hook(source(repo)?.as_ref(), &src, message).await?;
                Completion::Nothing
            }
            HostOp::UnhookSource => {
                maintenance::remove_hook(source(repo)?.as_ref(), &src).await?;
                Completion::Nothing
            }
            HostOp::DiscardTarget => {
                let staging = transfer::staging::staging_dir(
                    Path::new(&repo.target.root),
                    repo.path.as_bytes(),
                );
                maintenance::discard_copy(
                    target(repo)?.as_ref(),
                    &dst,
                    &staging.to_string_lossy(),
                    crate::registry::now(),
                )
                .await?;
                Completion::Nothing
            }
            HostOp::ClearStaging => {
                let staging = transfer::staging::staging_dir(
                    Path::new(&repo.target.root),
                    repo.path.as_bytes(),
                );
                // A receiver whose sender died holds the staging until its idle timeout.
                let wait = (transfer::quic::IDLE_TIMEOUT + CLEAR_STAGING_MARGIN).as_secs();
                Script::RemoveStaging
                    .run_ok(
                        target(repo)?.as_ref(),
                        &[&staging.to_string_lossy(), &wait.to_string()],
                    )
                    .await?;
                Completion::Nothing
            }
        })
    }
}

impl HostOps for ExecutorHostOps {
    fn run<'a>(&'a self, repo: &'a RepoPlan, op: &'a HostOp) -> BoxFuture<'a, Completion> {
        Box::pin(self.run_op(repo, op))
    }
}
