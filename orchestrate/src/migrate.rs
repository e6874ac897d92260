//! `shardmove migrate`: move an instance's repositories from service A to service B, in
//! crash-resumable, verified, parallel batches.
//!
//! **The state machine is pure** ([`RepoState`], [`next_step`], [`RepoState::after`]):
//! `pending -> precopied -> frozen -> copied -> verified -> clusterized -> thawed -> done`,
//! with `rolled_back` and `failed`. The driver ([`run`]) records in `migration_repos` the step
//! it is about to run (`step`, for the status page), runs its side effect, and only then
//! records the state it leads to. Every step is idempotent (a re-sent pre-copy resumes,
//! maintenance start/stop and clusterize/thaw are no-ops when already done, verification only
//! reads), so a driver killed at any point resumes with `migrate --resume ID` by re-running
//! the step of the recorded state.
//!
//! **Read-only window.** A repository enters maintenance only when its own turn comes, after
//! its live pre-copy (`shardsend --stage-only`: packs are immutable, so most bytes move
//! while users still push), and leaves it as soon as B is promoted. The frozen pass
//! (`shardsend --resume`) sends only files that changed since the pre-copy.
//!
//! **After.** B's copy is writable; A's stale copy keeps a pre-receive hook that refuses
//! pushes and says where the repository went.
//!
//! **Failure.** Any failure before `clusterized` rolls the repository back: A stays
//! authoritative, maintenance is lifted, B's copy (if any) is moved aside as
//! `PATH.rolled-back-<unix-time>`; the batch goes on. A failure after it (thaw, unfreeze)
//! cannot be undone safely and leaves the repository `failed` with the error, for an operator.
//!
//! **Where steps run.** Transfers run `shardsend` on the source device's host (through its
//! [`Executor`]: local process or ssh) towards the target device's `shardrecv`, pinned to the
//! target device's registered fingerprint. Verification runs `git` on both hosts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::executor::{self, executor_for};
use crate::registry::{self, Device, Registry, Repository};
use crate::repos::{path_on, Thaw};
use crate::verify;

/// Where one repository is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoState {
    Pending,
    Precopied,
    Frozen,
    Copied,
    Verified,
    Clusterized,
    Thawed,
    Done,
    RolledBack,
    Failed,
}

/// The side effect that moves a repository from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `shardsend --stage-only` while the repository is live.
    Precopy,
    /// Maintenance start with the operator's message (waits for pushes in flight).
    Freeze,
    /// `shardsend --resume`: what changed since the pre-copy, then install on B.
    FinalCopy,
    /// Refs digest equal on A and B, `git fsck --connectivity-only` on B.
    Verify,
    /// The repository's service becomes B (one registry transaction).
    Clusterize,
    /// B's copy is declared authoritative (`thaw --promote --force`).
    Promote,
    /// Maintenance stop: pushes go to B from now on.
    Unfreeze,
}

impl RepoState {
    pub const ALL: [RepoState; 10] = [
        RepoState::Pending,
        RepoState::Precopied,
        RepoState::Frozen,
        RepoState::Copied,
        RepoState::Verified,
        RepoState::Clusterized,
        RepoState::Thawed,
        RepoState::Done,
        RepoState::RolledBack,
        RepoState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RepoState::Pending => "pending",
            RepoState::Precopied => "precopied",
            RepoState::Frozen => "frozen",
            RepoState::Copied => "copied",
            RepoState::Verified => "verified",
            RepoState::Clusterized => "clusterized",
            RepoState::Thawed => "thawed",
            RepoState::Done => "done",
            RepoState::RolledBack => "rolled_back",
            RepoState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<RepoState> {
        RepoState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::invalid("migration state", format!("unknown state {s:?}")))
    }

    /// The state a successful `step` leads to.
    pub fn after(step: Step) -> RepoState {
        match step {
            Step::Precopy => RepoState::Precopied,
            Step::Freeze => RepoState::Frozen,
            Step::FinalCopy => RepoState::Copied,
            Step::Verify => RepoState::Verified,
            Step::Clusterize => RepoState::Clusterized,
            Step::Promote => RepoState::Thawed,
            Step::Unfreeze => RepoState::Done,
        }
    }

    /// Whether a failure in this state can be rolled back (A still authoritative).
    pub fn can_roll_back(self) -> bool {
        matches!(
            self,
            RepoState::Pending
                | RepoState::Precopied
                | RepoState::Frozen
                | RepoState::Copied
                | RepoState::Verified
        )
    }

    /// Whether the repository is read-only in this state (maintenance on).
    pub fn is_frozen(self) -> bool {
        matches!(
            self,
            RepoState::Frozen
                | RepoState::Copied
                | RepoState::Verified
                | RepoState::Clusterized
                | RepoState::Thawed
        )
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RepoState::Done | RepoState::RolledBack | RepoState::Failed
        )
    }
}

/// The step to run in `state`, or `None` when the repository is finished.
pub fn next_step(state: RepoState) -> Option<Step> {
    match state {
        RepoState::Pending => Some(Step::Precopy),
        RepoState::Precopied => Some(Step::Freeze),
        RepoState::Frozen => Some(Step::FinalCopy),
        RepoState::Copied => Some(Step::Verify),
        RepoState::Verified => Some(Step::Clusterize),
        RepoState::Clusterized => Some(Step::Promote),
        RepoState::Thawed => Some(Step::Unfreeze),
        RepoState::Done | RepoState::RolledBack | RepoState::Failed => None,
    }
}

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    pub instance: String,
    pub from: String,
    pub to: String,
    /// Only these repositories (names or INSTANCE/NAME); all of the instance on A if empty.
    pub repos: Vec<String>,
    pub parallel: usize,
    /// Concurrent repositories per source host (one disk, one link).
    pub per_host: usize,
    pub message: String,
    /// `shardsend` as run on the source hosts.
    pub shardsend: String,
    /// The sender identity key, as a path on the source hosts.
    pub identity: String,
    /// How long maintenance start waits for pushes in flight.
    pub freeze_wait: Duration,
    /// Extra `shardsend` arguments (e.g. `--bwlimit 50M`).
    pub shardsend_args: Vec<String>,
    /// Run the full `git fsck --connectivity-only` on B in the read-only window instead of
    /// the incremental check against the pre-copy's verified tips (see [`crate::verify`]).
    pub full_verify: bool,
    /// `host restart` of the instance's daemons after the batch (`None`: leave them).
    pub daemons: Option<crate::daemons::RestartConfig>,
}

/// One repository of a migration, as `migrate status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RepoProgress {
    pub repository: String,
    pub state: RepoState,
    /// The step running now (or interrupted), if any.
    pub step: Option<String>,
    pub error: Option<String>,
    /// Size of the tree moved.
    pub bytes: u64,
    /// Bytes that crossed the wire (pre-copy + final pass).
    pub sent_bytes: u64,
    /// When maintenance started and ended, unix milliseconds.
    pub frozen_at_ms: Option<i64>,
    pub thawed_at_ms: Option<i64>,
    /// Seconds the repository was (or has been so far) read-only.
    pub readonly_seconds: Option<f64>,
}

/// A migration and its repositories.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MigrationStatus {
    pub id: i64,
    pub instance: String,
    pub from: String,
    pub to: String,
    pub message: String,
    pub state: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub owner: Option<String>,
    /// For a `running` migration whose owner no longer drives it: why (then `migrate`
    /// takes it over, or `migrate --resume ID` continues it).
    pub owner_gone: Option<String>,
    pub repositories: Vec<RepoProgress>,
    pub counts: HashMap<String, u64>,
}

/// A repository's plan line for `--dry-run`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanLine {
    pub repository: String,
    pub from_device: String,
    pub from_path: String,
    pub to_device: String,
    pub to_addr: String,
}

/// Progress lines for the operator while a batch runs.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

/// Current time in unix milliseconds (read-only windows are often well under a second).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Who drives a migration: `pid N on HOST`.
fn owner() -> String {
    format!("pid {} on {}", std::process::id(), this_host())
}

/// A running migration's owner refreshes `migrations.updated_at` this often...
const HEARTBEAT: Duration = Duration::from_secs(10);
/// ...and counts as gone after this many seconds without it, unless it runs on this host,
/// where its process is looked up directly.
pub const OWNER_STALE_SECS: i64 = 60;

/// Why a migration in `state` no longer has a live driver: `None` unless it is `running`
/// and its owner is missing or [`owner_gone`].
fn driver_gone(state: &str, owner: Option<&str>, updated_at: i64) -> Option<String> {
    match (state, owner) {
        ("running", Some(owner)) => owner_gone(owner, updated_at, registry::now()),
        ("running", None) => Some("no owner recorded".into()),
        _ => None,
    }
}

/// Why the recorded `owner` of a running migration no longer drives it, or `None` while it
/// does. On this host the process itself is checked (gone, or its pid reused by something
/// that is not shardmove); elsewhere the heartbeat (`updated_at`, unix seconds) decides.
pub fn owner_gone(owner: &str, updated_at: i64, now: i64) -> Option<String> {
    let parsed = owner
        .strip_prefix("pid ")
        .and_then(|rest| rest.split_once(" on "))
        .and_then(|(pid, host)| Some((pid.parse::<u32>().ok()?, host)));
    if let Some((pid, host)) = parsed {
        if host == this_host() {
            if pid == std::process::id() {
                return None;
            }
            return match std::fs::read(format!("/proc/{pid}/cmdline")) {
                Err(_) => Some(format!("process {pid} has exited")),
                Ok(cmdline) if !String::from_utf8_lossy(&cmdline).contains("shardmove") => {
                    Some(format!("process {pid} is no longer shardmove"))
                }
                Ok(_) => None,
            };
        }
    }
    let silent = now - updated_at;
    (silent > OWNER_STALE_SECS).then(|| format!("no heartbeat for {silent} s"))
}

impl Registry {
    /// The devices a migration moves between: the device of service `from` holding the
    /// newest copy of `repo`, and B's first device.
    ///
    /// `from` is the migration's source service, never the repository's current one: once
    /// clusterized, the repository's service is B, and a driver taking the batch over there
    /// must still unhook B and leave A stale, not the other way round (issue 10, item 1).
    async fn endpoints(&self, repo: &Repository, from: &str, to: &str) -> Result<(Device, Device)> {
        let newest = repo
            .copies
            .iter()
            .filter(|c| c.service == from)
            .max_by_key(|c| c.version)
            .ok_or_else(|| {
                Error::Refused(format!(
                    "repository {} has no working copy on service {from}",
                    repo.full_name(),
                ))
            })?;
        let from = self.device(&newest.device).await?;
        let to_device = self
            .devices_of(to)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Refused(format!("service {to} has no device")))?;
        if to_device.fingerprint.is_none() {
            return Err(Error::Refused(format!(
                "device {} has no key fingerprint: shardsend must pin its shardrecv \
                 (`device add ... --fingerprint F`)",
                to_device.name
            )));
        }
        Ok((from, to_device))
    }

    /// The repositories a migration would move, with their endpoints (`--dry-run`).
    pub async fn migration_plan(&self, cfg: &MigrateConfig) -> Result<Vec<PlanLine>> {
        self.service(&cfg.to).await?;
        let mut lines = Vec::new();
        for repo in self.selected_repos(cfg).await? {
            let (from, to) = self.endpoints(&repo, &cfg.from, &cfg.to).await?;
            lines.push(PlanLine {
                repository: repo.full_name(),
                from_path: path_on(&from, &repo.path),
                from_device: from.name,
                to_device: to.name,
                to_addr: to.transfer_addr,
            });
        }
        Ok(lines)
    }

    async fn selected_repos(&self, cfg: &MigrateConfig) -> Result<Vec<Repository>> {
        self.instance(&cfg.instance).await?;
        self.service(&cfg.from).await?;
        let on_a = self.repositories_on(&cfg.instance, &cfg.from).await?;
        if cfg.repos.is_empty() {
            return Ok(on_a);
        }
        let mut out = Vec::new();
        for wanted in &cfg.repos {
            let repo = self.repository(wanted).await?;
            if repo.instance != cfg.instance || repo.service != cfg.from {
                return Err(Error::Refused(format!(
                    "repository {} is on {}/{}, not {}/{}",
                    repo.full_name(),
                    repo.instance,
                    repo.service,
                    cfg.instance,
                    cfg.from
                )));
            }
            out.push(repo);
        }
        Ok(out)
    }

    /// Records a new migration of the selected repositories (all `pending`); returns its id.
    pub async fn create_migration(&self, cfg: &MigrateConfig) -> Result<i64> {
        let repos = self.selected_repos(cfg).await?;
        if repos.is_empty() {
            return Err(Error::Refused(format!(
                "instance {} has no repository on service {} to migrate",
                cfg.instance, cfg.from
            )));
        }
        if cfg.from == cfg.to {
            return Err(Error::invalid("--to", "must differ from --from"));
        }
        self.service(&cfg.to).await?;
        let mut tx = self.begin_write().await?;
        let instance_id =
            registry::require_id(&mut tx, "instances", "instance", &cfg.instance).await?;
        let from_id = registry::require_id(&mut tx, "services", "service", &cfg.from).await?;
        let to_id = registry::require_id(&mut tx, "services", "service", &cfg.to).await?;
        let now = registry::now();
        let id: i64 = sqlx::query(
            "INSERT INTO migrations (instance_id, from_service_id, to_service_id, message, parallel, state, created_at, updated_at, owner) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $6, $7) RETURNING id",
        )
        .bind(instance_id)
        .bind(from_id)
        .bind(to_id)
        .bind(&cfg.message)
        .bind(cfg.parallel as i64)
        .bind(now)
        .bind(owner())
        .fetch_one(&mut *tx)
        .await?
        .try_get("id")?;
        for (position, repo) in repos.iter().enumerate() {
            let row = registry::resolve_repo(&mut tx, &repo.full_name(), "").await?;
            sqlx::query(
                "INSERT INTO migration_repos (migration_id, repository_id, position, state, updated_at) VALUES ($1, $2, $3, 'pending', $4)",
            )
            .bind(id)
            .bind(row.id)
            .bind(position as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        self.event(
            &mut tx,
            "migrate.create",
            &format!("migration:{id}"),
            &format!(
                "instance={} from={} to={} repos={}",
                cfg.instance,
                cfg.from,
                cfg.to,
                repos.len()
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The stored configuration of migration `id` (for `--resume`).
    pub async fn migration_config(&self, id: i64, base: &MigrateConfig) -> Result<MigrateConfig> {
        let st = self.migration_status(id).await?;
        Ok(MigrateConfig {
            instance: st.instance,
            from: st.from,
            to: st.to,
            message: st.message,
            repos: st.repositories.into_iter().map(|r| r.repository).collect(),
            ..base.clone()
        })
    }

    /// Ids of all migrations, newest first.
    pub async fn migration_ids(&self) -> Result<Vec<i64>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query("SELECT id FROM migrations ORDER BY id DESC")
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(Error::from))
            .collect()
    }

    /// `migrate status ID`.
    pub async fn migration_status(&self, id: i64) -> Result<MigrationStatus> {
        let mut conn = self.read_conn().await?;
        let m = sqlx::query(
            "SELECT m.id, i.name AS instance, a.name AS from_service, b.name AS to_service, m.message, m.state, \
             m.created_at, m.updated_at, m.finished_at, m.owner FROM migrations m \
             JOIN instances i ON i.id = m.instance_id JOIN services a ON a.id = m.from_service_id \
             JOIN services b ON b.id = m.to_service_id WHERE m.id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "migration",
            name: id.to_string(),
        })?;
        let rows = sqlx::query(
            "SELECT i.name AS instance, r.name, mr.state, mr.step, mr.error, mr.bytes, mr.sent_bytes, mr.frozen_at_ms, mr.thawed_at_ms \
             FROM migration_repos mr JOIN repositories r ON r.id = mr.repository_id JOIN instances i ON i.id = r.instance_id \
             WHERE mr.migration_id = $1 ORDER BY mr.position",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let now = now_ms();
        let mut repositories = Vec::new();
        let mut counts: HashMap<String, u64> = HashMap::new();
        for r in rows {
            let state = RepoState::parse(&r.try_get::<String, _>("state")?)?;
            *counts.entry(state.as_str().to_string()).or_default() += 1;
            let frozen_at_ms: Option<i64> = r.try_get("frozen_at_ms")?;
            let thawed_at_ms: Option<i64> = r.try_get("thawed_at_ms")?;
            repositories.push(RepoProgress {
                repository: format!(
                    "{}/{}",
                    r.try_get::<String, _>("instance")?,
                    r.try_get::<String, _>("name")?
                ),
                state,
                step: r.try_get("step")?,
                error: r.try_get("error")?,
                bytes: r.try_get::<i64, _>("bytes")?.max(0) as u64,
                sent_bytes: r.try_get::<i64, _>("sent_bytes")?.max(0) as u64,
                frozen_at_ms,
                thawed_at_ms,
                readonly_seconds: frozen_at_ms
                    .map(|f| (thawed_at_ms.unwrap_or(now) - f) as f64 / 1000.0),
            });
        }
        let state: String = m.try_get("state")?;
        let owner: Option<String> = m.try_get("owner")?;
        let updated_at: i64 = m.try_get("updated_at")?;
        let owner_gone = driver_gone(&state, owner.as_deref(), updated_at);
        Ok(MigrationStatus {
            id,
            instance: m.try_get("instance")?,
            from: m.try_get("from_service")?,
            to: m.try_get("to_service")?,
            message: m.try_get("message")?,
            state,
            created_at: m.try_get("created_at")?,
            updated_at,
            finished_at: m.try_get("finished_at")?,
            owner,
            owner_gone,
            repositories,
            counts,
        })
    }

    async fn repo_state(&self, id: i64, repo: &str) -> Result<RepoState> {
        let mut conn = self.read_conn().await?;
        let row = registry::resolve_repo(&mut conn, repo, "").await?;
        let state: String = sqlx::query(
            "SELECT state FROM migration_repos WHERE migration_id = $1 AND repository_id = $2",
        )
        .bind(id)
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await?
        .try_get("state")?;
        RepoState::parse(&state)
    }

    /// The tips B's pre-copy was verified at, if that check ran.
    async fn verified_tips(&self, id: i64, repo: &str) -> Result<Option<Vec<String>>> {
        let mut conn = self.read_conn().await?;
        let row = registry::resolve_repo(&mut conn, repo, "").await?;
        let tips: Option<String> = sqlx::query(
            "SELECT verified_tips FROM migration_repos WHERE migration_id = $1 AND repository_id = $2",
        )
        .bind(id)
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await?
        .try_get("verified_tips")?;
        Ok(tips.map(|t| t.lines().map(str::to_string).collect()))
    }

    /// Journals a repository's progress in one transaction: the new state (if any), the step
    /// running now (`None` once it finished), and the counters and timestamps in `update`.
    async fn journal(
        &self,
        id: i64,
        repo: &str,
        state: Option<RepoState>,
        step: Option<Step>,
        update: JournalUpdate,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = registry::resolve_repo(&mut tx, repo, "").await?;
        let step_text = step.map(|s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        });
        let now = registry::now();
        sqlx::query(
            "UPDATE migration_repos SET state = COALESCE($1, state), step = $2, \
             error = COALESCE($3, error), bytes = bytes + $4, sent_bytes = sent_bytes + $5, \
             frozen_at_ms = COALESCE(frozen_at_ms, $6), thawed_at_ms = COALESCE(thawed_at_ms, $7), updated_at = $8, \
             verified_tips = COALESCE($9, verified_tips) \
             WHERE migration_id = $10 AND repository_id = $11",
        )
        .bind(state.map(|s| s.as_str()))
        .bind(step_text)
        .bind(update.error.clone())
        .bind(update.bytes as i64)
        .bind(update.sent_bytes as i64)
        .bind(update.frozen_at_ms)
        .bind(update.thawed_at_ms)
        .bind(now)
        .bind(update.verified_tips.clone())
        .bind(id)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE migrations SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if let Some(state) = state {
            self.event(
                &mut tx,
                "migrate.repo",
                &format!("repo:{repo}"),
                &format!(
                    "migration={id} state={}{}",
                    state.as_str(),
                    update
                        .error
                        .as_deref()
                        .map(|e| format!(" error={e}"))
                        .unwrap_or_default()
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn heartbeat(&self, id: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE migrations SET updated_at = $1 WHERE id = $2 AND owner = $3")
            .bind(registry::now())
            .bind(id)
            .bind(owner())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish_migration(&self, id: i64, state: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let now = registry::now();
        sqlx::query("UPDATE migrations SET state = $1, updated_at = $2, finished_at = $2, owner = NULL WHERE id = $3")
            .bind(state)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        self.event(&mut tx, "migrate.finish", &format!("migration:{id}"), state)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// An unfinished migration of `instance` from `from` to `to`, if any: (id, why its owner
    /// is gone, if it is). A new `migrate` of the same services takes over such a batch
    /// instead of starting a second one over the same repositories.
    pub async fn unfinished_migration(
        &self,
        instance: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<(i64, Option<String>)>> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query(
            "SELECT m.id, m.state, m.owner, m.updated_at FROM migrations m \
             JOIN instances i ON i.id = m.instance_id \
             JOIN services a ON a.id = m.from_service_id JOIN services b ON b.id = m.to_service_id \
             WHERE i.name = $1 AND a.name = $2 AND b.name = $3 AND m.state = 'running' \
             ORDER BY m.id DESC LIMIT 1",
        )
        .bind(instance)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|row| {
            let state: String = row.try_get("state")?;
            let owner: Option<String> = row.try_get("owner")?;
            let gone = driver_gone(&state, owner.as_deref(), row.try_get("updated_at")?);
            Ok((row.try_get("id")?, gone))
        })
        .transpose()
    }

    /// Makes this process the migration's owner, unless another live process drives it:
    /// two drivers on one journal would run the same steps twice at once.
    async fn claim_migration(&self, id: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "SELECT state, owner, updated_at FROM migrations WHERE id = $1{}",
            self.backend().lock_clause()
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "migration",
            name: id.to_string(),
        })?;
        let state: String = row.try_get("state")?;
        let current: Option<String> = row.try_get("owner")?;
        if let (Some(current), "running") = (&current, state.as_str()) {
            let updated_at: i64 = row.try_get("updated_at")?;
            if *current != owner() && owner_gone(current, updated_at, registry::now()).is_none() {
                return Err(Error::Refused(format!(
                    "migration {id} is being driven by {current}; wait for it to finish \
                     (`shardmove migrate status {id}`), or stop that process first"
                )));
            }
        }
        sqlx::query("UPDATE migrations SET state = 'running', owner = $1, finished_at = NULL, updated_at = $2 WHERE id = $3")
            .bind(owner())
            .bind(registry::now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct JournalUpdate {
    error: Option<String>,
    bytes: u64,
    sent_bytes: u64,
    /// When the repository became read-only (just before its maintenance started) and
    /// writable again (just after it ended), unix milliseconds; the first value sticks.
    frozen_at_ms: Option<i64>,
    thawed_at_ms: Option<i64>,
    /// Object ids found connected on B's pre-copied tree, one per line.
    verified_tips: Option<String>,
}

/// What a batch did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationSummary {
    pub id: i64,
    pub state: String,
    pub seconds: f64,
    pub status: MigrationStatus,
    /// Median and longest read-only window over the migrated repositories, seconds.
    pub readonly_median_seconds: Option<f64>,
    pub readonly_max_seconds: Option<f64>,
}

/// Runs (or resumes) migration `id`: the batch steps around it, then every repository
/// through its state machine, `cfg.parallel` at a time and `cfg.per_host` per source host.
pub async fn run(
    registry: &Registry,
    cfg: &MigrateConfig,
    id: i64,
    report: Reporter,
) -> Result<MigrationSummary> {
    let started = Instant::now();
    registry.claim_migration(id).await?;
    // Proof of life for other hosts deciding whether this batch needs taking over; a long
    // pre-copy writes no journal for minutes.
    let heartbeat = {
        let (registry, report) = (registry.clone(), report.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                if let Err(e) = registry.heartbeat(id).await {
                    report(&format!("migration {id}: heartbeat not recorded: {e}"));
                }
            }
        })
    };
    let outcome = run_claimed(registry, cfg, id, report, started).await;
    heartbeat.abort();
    outcome
}

async fn run_claimed(
    registry: &Registry,
    cfg: &MigrateConfig,
    id: i64,
    report: Reporter,
    started: Instant,
) -> Result<MigrationSummary> {
    // Before the batch: bind B, close A to new allocations, sync. All idempotent.
    match registry.add_binding(&cfg.instance, &cfg.to).await {
        Ok(_) => report(&format!("bound {} to {}", cfg.instance, cfg.to)),
        Err(Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    registry
        .set_binding_property(&cfg.instance, &cfg.from, "closed", "true", false)
        .await?;
    registry.sync(Some(&cfg.instance)).await?;
    report(&format!(
        "{}/{} closed to new repositories",
        cfg.instance, cfg.from
    ));

    let status = registry.migration_status(id).await?;
    let total = status.repositories.len();
    let global = Arc::new(Semaphore::new(cfg.parallel.max(1)));
    let mut per_host: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, progress) in status.repositories.into_iter().enumerate() {
        if progress.state.is_final() {
            continue;
        }
        let repo = registry.repository(&progress.repository).await?;
        let (from, to) = match registry.endpoints(&repo, &cfg.from, &cfg.to).await {
            Ok(e) => e,
            Err(e) if progress.state.can_roll_back() => {
                registry
                    .journal(
                        id,
                        &progress.repository,
                        Some(RepoState::RolledBack),
                        None,
                        JournalUpdate {
                            error: Some(e.to_string()),
                            ..Default::default()
                        },
                    )
                    .await?;
                report(&format!("{}: not migrated: {e}", progress.repository));
                continue;
            }
            Err(e) => return Err(e),
        };
        let host_limit = per_host
            .entry(from.host.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(cfg.per_host.max(1))))
            .clone();
        let (registry, cfg, report, global) = (
            registry.clone(),
            cfg.clone(),
            report.clone(),
            global.clone(),
        );
        tasks.spawn(async move {
            // Queue first: a repository waiting for its turn is never read-only.
            let _slot = global.acquire_owned().await;
            let _host = host_limit.acquire_owned().await;
            let label = format!("[{}/{}] {}", n + 1, total, progress.repository);
            migrate_one(&registry, &cfg, id, &repo, &from, &to, &label, &report).await
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::Refused(format!("migration task failed: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        // A registry failure: the journal is intact, `--resume` continues.
        return Err(e);
    }

    // After the batch: A closed + no-daemons for the instance (central flags, kept by sync).
    registry
        .set_binding_property(&cfg.instance, &cfg.from, "closed", "true", false)
        .await?;
    registry
        .set_binding_property(&cfg.instance, &cfg.from, "no-daemons", "true", false)
        .await?;
    registry.sync(Some(&cfg.instance)).await?;
    report(&format!(
        "{}/{} set closed + no-daemons",
        cfg.instance, cfg.from
    ));
    // Daemons only where the plan now allows: none for A's binding, B's started. A failure
    // leaves the batch `running`; `--resume` redoes these idempotent after-batch steps.
    if let Some(daemons) = &cfg.daemons {
        for o in crate::daemons::restart(registry, daemons, Some(&cfg.instance)).await? {
            report(&format!(
                "daemons of {}/{} on {}: {}",
                o.instance, o.service, o.device, o.detail
            ));
        }
    }

    let status = registry.migration_status(id).await?;
    let failed = status
        .repositories
        .iter()
        .filter(|r| r.state != RepoState::Done)
        .count();
    let state = if failed == 0 { "done" } else { "failed" };
    registry.finish_migration(id, state).await?;
    let status = registry.migration_status(id).await?;
    let mut windows: Vec<f64> = status
        .repositories
        .iter()
        .filter(|r| r.state == RepoState::Done)
        .filter_map(|r| r.readonly_seconds)
        .collect();
    windows.sort_by(f64::total_cmp);
    Ok(MigrationSummary {
        id,
        state: state.into(),
        seconds: started.elapsed().as_secs_f64(),
        readonly_median_seconds: windows.get(windows.len() / 2).copied(),
        readonly_max_seconds: windows.last().copied(),
        status,
    })
}

/// Drives one repository to `done`, or rolls it back.
#[allow(clippy::too_many_arguments)]
async fn migrate_one(
    registry: &Registry,
    cfg: &MigrateConfig,
    id: i64,
    repository: &Repository,
    from: &Device,
    to: &Device,
    label: &str,
    report: &Reporter,
) -> Result<()> {
    let name = repository.full_name();
    let repo = name.as_str();
    // A's refs, read while the final pass runs (A is frozen and idle by then).
    let mut source_refs = None;
    loop {
        let state = registry.repo_state(id, repo).await?;
        let Some(step) = next_step(state) else {
            return Ok(());
        };
        // The running step is shown for the long steps outside the read-only window; inside
        // it (tens of milliseconds) a transaction per step would only lengthen the window.
        if !state.is_frozen() {
            registry
                .journal(id, repo, None, Some(step), JournalUpdate::default())
                .await?;
        }
        let t0 = Instant::now();
        match run_step(
            registry,
            cfg,
            id,
            repository,
            from,
            to,
            step,
            &mut source_refs,
        )
        .await
        {
            Ok(update) => {
                let next = RepoState::after(step);
                report(&format!(
                    "{label}: {} in {:.3} s{}",
                    next.as_str(),
                    t0.elapsed().as_secs_f64(),
                    if update.sent_bytes > 0 {
                        format!(", {} bytes sent", update.sent_bytes)
                    } else {
                        String::new()
                    }
                ));
                registry.journal(id, repo, Some(next), None, update).await?;
                crate::failpoint::hit(&format!("migrate-after-{}", next.as_str()));
            }
            Err(err @ (Error::Database(_) | Error::Migrate(_))) => return Err(err),
            Err(err) if state.can_roll_back() => {
                report(&format!("{label}: {step:?} failed: {err}; rolling back"));
                let rollback = roll_back(registry, repo, to).await;
                let error = match rollback {
                    Ok(()) => err.to_string(),
                    Err(e) => format!("{err}; rollback incomplete: {e}"),
                };
                registry
                    .journal(
                        id,
                        repo,
                        Some(RepoState::RolledBack),
                        None,
                        JournalUpdate {
                            error: Some(error),
                            thawed_at_ms: Some(now_ms()),
                            ..Default::default()
                        },
                    )
                    .await?;
                report(&format!("{label}: rolled back, still on {}", cfg.from));
                return Ok(());
            }
            Err(err) => {
                report(&format!("{label}: {step:?} failed after clusterize: {err}"));
                registry
                    .journal(
                        id,
                        repo,
                        Some(RepoState::Failed),
                        None,
                        JournalUpdate {
                            error: Some(err.to_string()),
                            ..Default::default()
                        },
                    )
                    .await?;
                return Ok(());
            }
        }
    }
}

/// Runs one step's side effect.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    registry: &Registry,
    cfg: &MigrateConfig,
    id: i64,
    repo: &Repository,
    from: &Device,
    to: &Device,
    step: Step,
    source_refs: &mut Option<String>,
) -> Result<JournalUpdate> {
    let repo_ref = &repo.full_name();
    let src = path_on(from, &repo.path);
    match step {
        Step::Precopy | Step::FinalCopy => {
            let exec = executor_for(from)?;
            let fingerprint = to.fingerprint.clone().unwrap_or_default();
            let mut argv: Vec<&str> = vec![
                &cfg.shardsend,
                &src,
                &to.transfer_addr,
                &repo.path,
                "--identity",
                &cfg.identity,
                "--peer",
                &fingerprint,
                "--json",
                "--no-progress",
                "--resume",
            ];
            if step == Step::Precopy {
                argv.push("--stage-only");
            }
            argv.extend(cfg.shardsend_args.iter().map(String::as_str));
            let out = if step == Step::FinalCopy {
                let (out, refs) = tokio::join!(
                    executor::run(exec.as_ref(), &argv),
                    verify::refs_digest(exec.as_ref(), &src)
                );
                *source_refs = Some(refs?);
                out?
            } else {
                executor::run(exec.as_ref(), &argv).await?
            };
            let summary: serde_json::Value = serde_json::from_str(&out.stdout)
                .map_err(|e| Error::Refused(format!("shardsend printed no JSON summary ({e})")))?;
            let get = |k: &str| summary[k].as_u64().unwrap_or(0);
            let verified_tips = if step == Step::Precopy && !cfg.full_verify {
                // The pre-copy waits in shardrecv's staging area (under B's root, as the
                // device's root is shardrecv's); fsck it now, while the repository is live.
                let staged = transfer::staging::staging_dir(
                    std::path::Path::new(&to.root_path),
                    repo.path.as_bytes(),
                )
                .join("tree");
                verify::full_connectivity(executor_for(to)?.as_ref(), &staged.to_string_lossy())
                    .await?
                    .map(|tips| tips.join("\n"))
            } else {
                None
            };
            Ok(JournalUpdate {
                bytes: if step == Step::FinalCopy {
                    get("bytes")
                } else {
                    0
                },
                sent_bytes: get("sent_bytes"),
                verified_tips,
                ..Default::default()
            })
        }
        Step::Freeze => {
            // The window starts before the hook goes in: from here pushes may be refused.
            let frozen_at_ms = now_ms();
            registry
                .start_maintenance(repo_ref, &cfg.message, cfg.freeze_wait)
                .await?;
            Ok(JournalUpdate {
                frozen_at_ms: Some(frozen_at_ms),
                ..Default::default()
            })
        }
        Step::Verify => {
            let dst = path_on(to, &repo.path);
            let b_exec = executor_for(to)?;
            // Resumed after a crash, the final pass's reading of A's refs is gone: read again.
            let a = match source_refs.take() {
                Some(refs) => refs,
                None => verify::refs_digest(executor_for(from)?.as_ref(), &src).await?,
            };
            let tips = match cfg.full_verify {
                true => None,
                false => registry.verified_tips(id, repo_ref).await?,
            };
            let checked = match tips {
                Some(tips) => {
                    verify::refs_and_connected_since(b_exec.as_ref(), &dst, &a, &tips).await
                }
                None => verify::refs_and_full_connectivity(b_exec.as_ref(), &dst, &a).await,
            };
            checked.map_err(|e| match e {
                Error::Refused(why) => Error::Refused(format!(
                    "verification of {} on {} against {} failed: {why}",
                    repo.full_name(),
                    to.name,
                    from.name
                )),
                other => other,
            })?;
            Ok(JournalUpdate::default())
        }
        Step::Clusterize => {
            registry.clusterize(repo_ref, &cfg.to).await?;
            Ok(JournalUpdate::default())
        }
        Step::Promote => {
            registry
                .thaw(repo_ref, &to.name, Thaw::Promote, true)
                .await?;
            Ok(JournalUpdate::default())
        }
        Step::Unfreeze => {
            // B's copy arrived with A's hook (the final pass copied it): removing it, and
            // the registry flag, ends the window.
            let dst = path_on(to, &repo.path);
            crate::maintenance::remove_hook(executor_for(to)?.as_ref(), &dst).await?;
            registry.clear_maintenance(repo_ref, None).await?;
            let thawed_at_ms = now_ms();
            // A's copy is stale from now on: its hook stays and only its message changes, so
            // a client that still points there cannot fork history, not even for an instant.
            let stale = format!(
                "this copy is stale: {} moved to service {}; fetch its new location",
                repo.full_name(),
                cfg.to
            );
            crate::maintenance::install_hook(executor_for(from)?.as_ref(), &src, &stale).await?;
            Ok(JournalUpdate {
                thawed_at_ms: Some(thawed_at_ms),
                ..Default::default()
            })
        }
    }
}

/// Undoes a repository's migration before clusterize: maintenance lifted (A stays
/// authoritative), B's copy moved aside, and the pre-copy's staging on B discarded (unless a
/// transfer still holds its lock), so a rollback leaves nothing under B's `.shardrecv/`.
async fn roll_back(registry: &Registry, repo_ref: &str, to: &Device) -> Result<()> {
    let repo = registry.repository(repo_ref).await?;
    if repo.maintenance {
        registry.stop_maintenance(repo_ref).await?;
    }
    let dst = path_on(to, &repo.path);
    let staging =
        transfer::staging::staging_dir(std::path::Path::new(&to.root_path), repo.path.as_bytes());
    let stamp = registry::now().to_string();
    executor::run(
        executor_for(to)?.as_ref(),
        &[
            "sh",
            "-c",
            "if [ -e \"$1\" ]; then mv \"$1\" \"$1.rolled-back-$2\"; fi\n\
             if [ -d \"$3\" ]; then flock -n \"$3/lock\" rm -rf \"$3\" || true; fi",
            "move-aside",
            &dst,
            &stamp,
            &staging.to_string_lossy(),
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_gone_when_its_process_exited_or_its_heartbeat_stopped() {
        let now = 1_000_000;
        // This process, on this host: alive whatever the heartbeat says.
        assert_eq!(owner_gone(&owner(), 0, now), None);
        // A pid that cannot exist (above pid_max) on this host: gone at once.
        let dead = format!("pid 4294967295 on {}", this_host());
        assert!(owner_gone(&dead, now, now).is_some_and(|w| w.contains("exited")));
        // Elsewhere only the heartbeat counts.
        let remote = "pid 1 on some-other-host";
        assert_eq!(owner_gone(remote, now - OWNER_STALE_SECS, now), None);
        assert!(owner_gone(remote, now - OWNER_STALE_SECS - 1, now).is_some());
        assert!(owner_gone("garbage", now - 3600, now).is_some());
    }

    #[test]
    fn the_state_machine_walks_to_done_and_names_every_state() {
        let mut state = RepoState::Pending;
        let mut steps = Vec::new();
        while let Some(step) = next_step(state) {
            steps.push(step);
            state = RepoState::after(step);
        }
        assert_eq!(state, RepoState::Done);
        assert_eq!(
            steps,
            [
                Step::Precopy,
                Step::Freeze,
                Step::FinalCopy,
                Step::Verify,
                Step::Clusterize,
                Step::Promote,
                Step::Unfreeze
            ]
        );
        for s in RepoState::ALL {
            assert_eq!(RepoState::parse(s.as_str()).unwrap(), s);
        }
        assert!(RepoState::parse("bogus").is_err());
    }

    #[test]
    fn rollback_only_before_clusterize_and_frozen_only_between_freeze_and_unfreeze() {
        let mut state = RepoState::Pending;
        let mut seen_clusterize = false;
        while let Some(step) = next_step(state) {
            assert_eq!(state.can_roll_back(), !seen_clusterize, "{state:?}");
            if step == Step::Clusterize {
                seen_clusterize = true;
            }
            state = RepoState::after(step);
        }
        // Read-only exactly from Freeze's result until Unfreeze runs.
        assert!(!RepoState::Pending.is_frozen());
        assert!(!RepoState::Precopied.is_frozen());
        assert!(RepoState::after(Step::Freeze).is_frozen());
        assert!(RepoState::Thawed.is_frozen());
        assert!(!RepoState::after(Step::Unfreeze).is_frozen());
        assert!(RepoState::RolledBack.is_final() && !RepoState::RolledBack.is_frozen());
    }
}
