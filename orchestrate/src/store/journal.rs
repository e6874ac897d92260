//! The batch journal (tables `batches` and `batch_repos`): every migrate batch, its owner,
//! and each repository's state, step, counters and read-only window.
//!
//! It is shardmove's own memory whatever the control plane: with Phorge the catalog is
//! Phorge's, the journal still lives here. Repositories are named as their plane names them
//! and each row fixes both devices at creation (see the schema's 0004 migration for why).
//! Every write is one transaction; a state change also writes its event.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use sqlx::Row;

use super::{now, Registry};
use crate::error::{Error, Result};
use crate::migrate::core::{ErrorUpdate, JournalWrite, RepoRecord, RepoState};
use crate::migrate::ports::{BatchSpec, JournaledRepo, RepoPlan};

/// Where a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// A driver works on it (or did until it died: see [`MigrationStatus::owner_gone`]).
    Running,
    /// Every repository moved.
    Done,
    /// It ended with repositories rolled back or stuck; the next `migrate` of the same
    /// services goes on with it.
    Incomplete,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Running => "running",
            BatchState::Done => "done",
            BatchState::Incomplete => "incomplete",
        }
    }

    fn parse(s: &str) -> Result<BatchState> {
        [
            BatchState::Running,
            BatchState::Done,
            BatchState::Incomplete,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
        .ok_or_else(|| Error::invalid("batch state", format!("unknown state {s:?}")))
    }
}

/// The process driving a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: u32,
    pub host: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)
    }
}

/// A batch as `migrate` finds it when deciding whether to start, resume or refuse.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: i64,
    pub plane: String,
    pub spec: BatchSpec,
    pub message: String,
    pub state: BatchState,
    pub owner: Option<Owner>,
    /// Unix seconds of the last write or heartbeat.
    pub updated_at: i64,
}

/// One repository of a migration, as `migrate status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RepoProgress {
    pub repository: String,
    pub state: RepoState,
    /// The step running now (or interrupted), if any.
    pub step: Option<String>,
    pub error: Option<String>,
    pub source_device: String,
    pub target_device: String,
    /// Size of the tree moved.
    pub bytes: u64,
    /// Bytes that crossed the wire (pre-copy rounds + final pass).
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
    pub plane: String,
    pub instance: String,
    pub from: String,
    pub to: String,
    pub message: String,
    pub state: BatchState,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub owner: Option<Owner>,
    /// For a `running` migration whose owner no longer drives it: why (then `migrate`
    /// takes it over, or `migrate --resume ID` continues it).
    pub owner_gone: Option<String>,
    pub repositories: Vec<RepoProgress>,
    pub counts: HashMap<String, u64>,
}

/// Current time in unix milliseconds (read-only windows are often well under a second).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const BATCH_SELECT: &str = "SELECT id, plane, instance, from_service, to_service, message, state, \
     created_at, updated_at, finished_at, owner_pid, owner_host FROM batches";

fn owner_of(row: &sqlx::any::AnyRow) -> Result<Option<Owner>> {
    let pid: Option<i64> = row.try_get("owner_pid")?;
    let host: Option<String> = row.try_get("owner_host")?;
    Ok(match (pid, host) {
        (Some(pid), Some(host)) => Some(Owner {
            pid: u32::try_from(pid).unwrap_or(u32::MAX),
            host,
        }),
        _ => None,
    })
}

fn batch_from_row(row: &sqlx::any::AnyRow, repos: Vec<String>) -> Result<BatchRecord> {
    Ok(BatchRecord {
        id: row.try_get("id")?,
        plane: row.try_get("plane")?,
        spec: BatchSpec {
            instance: row.try_get("instance")?,
            from: row.try_get("from_service")?,
            to: row.try_get("to_service")?,
            repos,
        },
        message: row.try_get("message")?,
        state: BatchState::parse(&row.try_get::<String, _>("state")?)?,
        owner: owner_of(row)?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Registry {
    /// Records a new batch of `plans` (all `pending`) owned by `owner`; returns its id.
    pub async fn create_batch(
        &self,
        plane: &str,
        spec: &BatchSpec,
        message: &str,
        parallel: usize,
        plans: &[RepoPlan],
        owner: &Owner,
    ) -> Result<i64> {
        let mut tx = self.begin_write().await?;
        let now = now();
        let id: i64 = sqlx::query(
            "INSERT INTO batches (plane, instance, from_service, to_service, message, parallel, state, \
             created_at, updated_at, owner_pid, owner_host) \
             VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $7, $8, $9) RETURNING id",
        )
        .bind(plane)
        .bind(&spec.instance)
        .bind(&spec.from)
        .bind(&spec.to)
        .bind(message)
        .bind(parallel as i64)
        .bind(now)
        .bind(i64::from(owner.pid))
        .bind(&owner.host)
        .fetch_one(&mut *tx)
        .await?
        .try_get("id")?;
        for (position, plan) in plans.iter().enumerate() {
            sqlx::query(
                "INSERT INTO batch_repos (batch_id, repository, position, path, source_device, \
                 target_device, state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
            )
            .bind(id)
            .bind(&plan.repository)
            .bind(position as i64)
            .bind(&plan.path)
            .bind(&plan.source.device)
            .bind(&plan.target.device)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        self.commit_with_event(
            tx,
            "migrate.create",
            &format!("migration:{id}"),
            &format!(
                "plane={plane} instance={} from={} to={} repos={}",
                spec.instance,
                spec.from,
                spec.to,
                plans.len()
            ),
        )
        .await?;
        Ok(id)
    }

    /// Every batch that is not done (running or incomplete), oldest first.
    pub async fn open_batches(&self) -> Result<Vec<BatchRecord>> {
        let mut conn = self.read_conn().await?;
        let ids: Vec<i64> = sqlx::query("SELECT id FROM batches WHERE state <> 'done' ORDER BY id")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<std::result::Result<_, _>>()?;
        drop(conn);
        let mut out = Vec::new();
        for id in ids {
            out.push(self.batch(id).await?);
        }
        Ok(out)
    }

    /// Batch `id`, with its repositories' names as `spec.repos`.
    pub async fn batch(&self, id: i64) -> Result<BatchRecord> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query(&format!("{BATCH_SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "migration",
                name: id.to_string(),
            })?;
        let repos =
            sqlx::query("SELECT repository FROM batch_repos WHERE batch_id = $1 ORDER BY position")
                .bind(id)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get("repository"))
                .collect::<std::result::Result<_, _>>()?;
        batch_from_row(&row, repos)
    }

    /// The newest batch of `plane` moving `instance` from `from` to `to` that is not done.
    pub async fn unfinished_batch(
        &self,
        plane: &str,
        instance: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<BatchRecord>> {
        let mut conn = self.read_conn().await?;
        let id: Option<i64> = sqlx::query(
            "SELECT id FROM batches WHERE plane = $1 AND instance = $2 AND from_service = $3 \
             AND to_service = $4 AND state <> 'done' ORDER BY id DESC LIMIT 1",
        )
        .bind(plane)
        .bind(instance)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get("id"))
        .transpose()?;
        drop(conn);
        match id {
            Some(id) => Ok(Some(self.batch(id).await?)),
            None => Ok(None),
        }
    }

    /// Makes `owner` the driver of batch `id` if `may_take(current record)` allows it, in one
    /// transaction (the row locked), so two processes cannot both claim it.
    pub async fn claim_batch(
        &self,
        id: i64,
        owner: &Owner,
        may_take: impl FnOnce(&BatchRecord) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "{BATCH_SELECT} WHERE id = $1{}",
            self.backend().lock_clause()
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "migration",
            name: id.to_string(),
        })?;
        let record = batch_from_row(&row, Vec::new())?;
        may_take(&record).map_err(Error::Refused)?;
        sqlx::query(
            "UPDATE batches SET state = 'running', owner_pid = $1, owner_host = $2, \
             finished_at = NULL, updated_at = $3 WHERE id = $4",
        )
        .bind(i64::from(owner.pid))
        .bind(&owner.host)
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Proof of life: `updated_at` of batch `id`, if `owner` still owns it.
    pub async fn batch_heartbeat(&self, id: i64, owner: &Owner) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE batches SET updated_at = $1 WHERE id = $2 AND owner_pid = $3 AND owner_host = $4",
        )
        .bind(now())
        .bind(id)
        .bind(i64::from(owner.pid))
        .bind(&owner.host)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends batch `id` in `state`, releasing its owner.
    pub async fn finish_batch(&self, id: i64, state: BatchState) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let now = now();
        sqlx::query(
            "UPDATE batches SET state = $1, updated_at = $2, finished_at = $2, owner_pid = NULL, \
             owner_host = NULL WHERE id = $3",
        )
        .bind(state.as_str())
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        self.commit_with_event(
            tx,
            "migrate.finish",
            &format!("migration:{id}"),
            state.as_str(),
        )
        .await
    }

    /// The repositories of batch `id`, in order, as a resumed driver needs them.
    pub async fn batch_repos(&self, id: i64) -> Result<Vec<JournaledRepo>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(
            "SELECT repository, path, source_device, target_device, state, error, verified_tips, \
             frozen_at_ms FROM batch_repos WHERE batch_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|r| {
                let tips: Option<String> = r.try_get("verified_tips")?;
                Ok(JournaledRepo {
                    repository: r.try_get("repository")?,
                    path: r.try_get("path")?,
                    source_device: r.try_get("source_device")?,
                    target_device: r.try_get("target_device")?,
                    record: RepoRecord {
                        state: Some(parse_state(&r.try_get::<String, _>("state")?)?),
                        verified_tips: tips.map(|t| t.lines().map(str::to_string).collect()),
                        error: r.try_get("error")?,
                    },
                    frozen_at_ms: r.try_get("frozen_at_ms")?,
                })
            })
            .collect()
    }

    /// Applies `write` to `repository` of batch `id` in one transaction (with an event when
    /// its state changes).
    pub async fn journal_write(
        &self,
        id: i64,
        repository: &str,
        write: &JournalWrite,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let now = now();
        let (error, clear_error) = match &write.error {
            ErrorUpdate::Keep => (None, false),
            ErrorUpdate::Set(e) => (Some(e.as_str()), false),
            ErrorUpdate::Clear => (None, true),
        };
        let stamp = write.stamp_frozen.then(now_ms);
        let done = sqlx::query(
            "UPDATE batch_repos SET state = COALESCE($1, state), step = $2, \
             error = CASE WHEN $3 = 1 THEN NULL ELSE COALESCE($4, error) END, \
             bytes = CASE WHEN $1 = 'pending' THEN 0 ELSE bytes + $5 END, \
             sent_bytes = sent_bytes + $6, \
             frozen_at_ms = CASE WHEN $1 = 'pending' THEN NULL ELSE COALESCE(frozen_at_ms, $7) END, \
             thawed_at_ms = CASE WHEN $1 = 'pending' THEN NULL \
                                 WHEN frozen_at_ms IS NULL AND $7 IS NULL THEN thawed_at_ms \
                                 ELSE COALESCE(thawed_at_ms, $8) END, \
             verified_tips = CASE WHEN $1 = 'pending' THEN NULL ELSE COALESCE($9, verified_tips) END, \
             updated_at = $10 WHERE batch_id = $11 AND repository = $12",
        )
        .bind(write.state.map(|s| s.as_str()))
        .bind(write.step.map(|s| s.as_str()))
        .bind(i64::from(clear_error))
        .bind(error)
        .bind(write.add_bytes as i64)
        .bind(write.add_sent_bytes as i64)
        .bind(stamp)
        .bind(write.thawed_at_ms)
        .bind(write.verified_tips.as_ref().map(|t| t.join("\n")))
        .bind(now)
        .bind(id)
        .bind(repository)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(Error::NotFound {
                kind: "repository of migration",
                name: format!("{repository} in migration {id}"),
            });
        }
        sqlx::query("UPDATE batches SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // A crash with the update written but not committed: nothing of it may survive.
        crate::failpoint::hit("in-tx-journal");
        match write.state {
            Some(state) => {
                let detail = format!(
                    "migration={id} state={}{}",
                    state.as_str(),
                    error.map(|e| format!(" error={e}")).unwrap_or_default()
                );
                self.commit_with_event(tx, "migrate.repo", &format!("repo:{repository}"), &detail)
                    .await
            }
            None => Ok(tx.commit().await?),
        }
    }

    /// Ids of all migrations, newest first.
    pub async fn migration_ids(&self) -> Result<Vec<i64>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query("SELECT id FROM batches ORDER BY id DESC")
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(Error::from))
            .collect()
    }

    /// `migrate status ID`; `owner_gone` says why a running batch's owner no longer drives
    /// it (given the batch's record).
    pub async fn migration_status(
        &self,
        id: i64,
        owner_gone: impl FnOnce(&BatchRecord) -> Option<String>,
    ) -> Result<MigrationStatus> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query(
            "SELECT id, plane, instance, from_service, to_service, message, state, created_at, \
             updated_at, finished_at, owner_pid, owner_host FROM batches WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "migration",
            name: id.to_string(),
        })?;
        let rows = sqlx::query(
            "SELECT repository, state, step, error, source_device, target_device, bytes, \
             sent_bytes, frozen_at_ms, thawed_at_ms FROM batch_repos WHERE batch_id = $1 \
             ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let now = now_ms();
        let mut repositories = Vec::new();
        let mut counts: HashMap<String, u64> = HashMap::new();
        for r in rows {
            let state = parse_state(&r.try_get::<String, _>("state")?)?;
            *counts.entry(state.as_str().to_string()).or_default() += 1;
            let frozen_at_ms: Option<i64> = r.try_get("frozen_at_ms")?;
            let thawed_at_ms: Option<i64> = r.try_get("thawed_at_ms")?;
            repositories.push(RepoProgress {
                repository: r.try_get("repository")?,
                state,
                step: r.try_get("step")?,
                error: r.try_get("error")?,
                source_device: r.try_get("source_device")?,
                target_device: r.try_get("target_device")?,
                bytes: r.try_get::<i64, _>("bytes")?.max(0) as u64,
                sent_bytes: r.try_get::<i64, _>("sent_bytes")?.max(0) as u64,
                frozen_at_ms,
                thawed_at_ms,
                readonly_seconds: frozen_at_ms
                    .map(|f| (thawed_at_ms.unwrap_or(now) - f) as f64 / 1000.0),
            });
        }
        let record = batch_from_row(&row, Vec::new())?;
        let owner_gone = owner_gone(&record);
        Ok(MigrationStatus {
            id,
            plane: record.plane,
            instance: record.spec.instance,
            from: record.spec.from,
            to: record.spec.to,
            message: record.message,
            state: record.state,
            created_at: row.try_get("created_at")?,
            updated_at: record.updated_at,
            finished_at: row.try_get("finished_at")?,
            owner: record.owner,
            owner_gone,
            repositories,
            counts,
        })
    }
}

/// Totals over every batch of the journal, for the status page's `/metrics`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationTotals {
    /// Batches per state (`running`, `done`, `incomplete`).
    pub batches: BTreeMap<String, u64>,
    /// Repositories of all batches per migration state.
    pub repositories: BTreeMap<String, u64>,
    /// Size of the trees of repositories that moved (state `done`).
    pub moved_bytes: u64,
    /// Bytes that crossed the wire, every repository and pass.
    pub sent_bytes: u64,
    /// Read-only windows that ended (frozen and thawed again), seconds.
    pub readonly_windows: Vec<f64>,
}

impl Registry {
    /// [`MigrationTotals`] of the whole journal: one pass over `batches` and `batch_repos`.
    pub async fn migration_totals(&self) -> Result<MigrationTotals> {
        let mut conn = self.read_conn().await?;
        let mut totals = MigrationTotals::default();
        for row in sqlx::query("SELECT state FROM batches")
            .fetch_all(&mut *conn)
            .await?
        {
            *totals.batches.entry(row.try_get("state")?).or_default() += 1;
        }
        let rows = sqlx::query(
            "SELECT state, bytes, sent_bytes, frozen_at_ms, thawed_at_ms FROM batch_repos",
        )
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let state = parse_state(&row.try_get::<String, _>("state")?)?;
            *totals
                .repositories
                .entry(state.as_str().to_string())
                .or_default() += 1;
            if state == RepoState::Done {
                totals.moved_bytes += row.try_get::<i64, _>("bytes")?.max(0) as u64;
            }
            totals.sent_bytes += row.try_get::<i64, _>("sent_bytes")?.max(0) as u64;
            let frozen: Option<i64> = row.try_get("frozen_at_ms")?;
            let thawed: Option<i64> = row.try_get("thawed_at_ms")?;
            if let (Some(frozen), Some(thawed)) = (frozen, thawed) {
                totals
                    .readonly_windows
                    .push((thawed - frozen).max(0) as f64 / 1000.0);
            }
        }
        Ok(totals)
    }
}

fn parse_state(s: &str) -> Result<RepoState> {
    RepoState::parse(s)
        .ok_or_else(|| Error::invalid("migration state", format!("unknown state {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry at schema 3 (before the batch journal) with a batch interrupted after
    /// "thawed" and one that ended "failed" is carried into `batches` / `batch_repos`.
    #[test]
    fn schema_4_carries_the_batches_of_schema_3() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("old.db").display().to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use sqlx::Connection;
            let url = format!("sqlite://{path}?mode=rwc");
            let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
            let all = sqlx::migrate!("./migrations/sqlite");
            let up_to_3 = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(all.migrations[..3].to_vec()),
                ..sqlx::migrate!("./migrations/sqlite")
            };
            up_to_3.run(&mut conn).await.expect("schema 3");
            for sql in [
                "INSERT INTO services (id, name, created_at) VALUES (1, 'a', 0), (2, 'b', 0)",
                "INSERT INTO devices (id, name, service_id, host, transfer_addr, root_path, created_at) \
                 VALUES (1, 'a1', 1, 'localhost', '127.0.0.1:1', '/a', 0), \
                        (2, 'a2', 1, 'localhost', '127.0.0.1:2', '/a2', 0), \
                        (3, 'b1', 2, 'localhost', '127.0.0.1:3', '/b', 0)",
                "INSERT INTO instances (id, name, created_at) VALUES (1, 't', 0)",
                "INSERT INTO repositories (id, instance_id, name, service_id, path, created_at) \
                 VALUES (1, 1, 'r', 2, 't/r.git', 0), (2, 1, 's', 1, 't/s.git', 0)",
                "INSERT INTO working_copies (repository_id, device_id, version, updated_at) \
                 VALUES (1, 1, 1, 0), (1, 2, 2, 0), (1, 3, 3, 0), (2, 1, 1, 0)",
                "INSERT INTO migrations (id, instance_id, from_service_id, to_service_id, message, parallel, state, created_at, updated_at, owner) \
                 VALUES (5, 1, 1, 2, 'moving', 2, 'running', 0, 0, 'pid 1 on gone'), \
                        (6, 1, 1, 2, 'moving', 2, 'failed', 0, 0, NULL)",
                "INSERT INTO migration_repos (migration_id, repository_id, position, state, updated_at, frozen_at_ms) \
                 VALUES (5, 1, 0, 'thawed', 0, 1000), (6, 2, 0, 'failed', 0, NULL)",
            ] {
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            conn.close().await.expect("close");

            let registry = Registry::open(&path, "test").await.expect("schema 4");
            let running = registry.batch(5).await.expect("batch 5");
            assert_eq!(running.state, BatchState::Running);
            assert_eq!(running.owner, None, "no owner to parse back: it is taken over");
            let repos = registry.batch_repos(5).await.expect("repos");
            assert_eq!(repos.len(), 1);
            let r = &repos[0];
            assert_eq!(
                (r.repository.as_str(), r.path.as_str()),
                ("t/r", "t/r.git")
            );
            // A's newest copy (a2), B's first device, whatever the repository's service now.
            assert_eq!(
                (r.source_device.as_str(), r.target_device.as_str()),
                ("a2", "b1")
            );
            assert_eq!(r.record.state, Some(RepoState::Promoted));
            assert_eq!(r.frozen_at_ms, Some(1000));
            assert_eq!(registry.batch(6).await.expect("6").state, BatchState::Incomplete);
            let failed = registry.batch_repos(6).await.expect("repos");
            assert_eq!(failed[0].record.state, Some(RepoState::Clusterized));
            // New batches number on after the carried ones.
            let id = registry
                .create_batch(
                    "builtin",
                    &running.spec,
                    "m",
                    1,
                    &[],
                    &Owner {
                        pid: 1,
                        host: "h".into(),
                    },
                )
                .await
                .expect("new batch");
            assert!(id > 6);
        });
    }
}
