//! Repository steps of the runbook, each one callable on its own: create (allocation among
//! open bindings), maintenance start/stop, observation pass, clusterize, thaw.
//!
//! Each step changes the registry in one transaction with its event, and touches shard
//! hosts only through an [`Executor`](crate::executor::Executor). Where a host step belongs
//! to the change (creating the bare repository), it runs inside the transaction, so a
//! failure on the host rolls the registry back. Maintenance is recorded *before* the hook is
//! installed (observation pulls read the flag, so they stop first) and cleared again if the
//! hook cannot be installed or pushes do not drain in time.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::executor::{self, executor_for};
use crate::maintenance;
use crate::names;
use crate::registry::{
    self, binding_props, flags, require_id, resolve_repo, Device, Registry, Repository, REPO_SELECT,
};

/// Longest maintenance message.
pub const MAX_MESSAGE_LEN: usize = 1000;

/// Default bound on the wait for pushes in flight when maintenance starts.
pub const DEFAULT_PUSH_WAIT: Duration = Duration::from_secs(60);

/// What `repo clusterize` did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Clusterized {
    pub repository: String,
    pub from: String,
    pub to: String,
    /// False when the repository already was on the target service.
    pub changed: bool,
}

/// Outcome of one repository in an observation pass.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Observation {
    pub repository: String,
    /// `fetched`, `skipped` or `failed`.
    pub outcome: String,
    pub detail: String,
}

/// Which way `repo thaw` moves a device's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thaw {
    /// Declare the device's copy authoritative (newest).
    Promote,
    /// Declare the device's copy stale.
    Demote,
}

fn check_message(message: &str) -> Result<()> {
    if message.trim().is_empty() || message.len() > MAX_MESSAGE_LEN || message.contains('\0') {
        return Err(Error::invalid(
            "maintenance message",
            format!("must be 1-{MAX_MESSAGE_LEN} characters"),
        ));
    }
    Ok(())
}

/// Full path of a repository on a device.
pub fn path_on(device: &Device, relative: &str) -> String {
    format!("{}/{}", device.root_path.trim_end_matches('/'), relative)
}

impl Registry {
    /// `repo create --instance I NAME [--upstream URL]`: picks a service at random among the
    /// instance's open bindings (whose service has a device), creates a bare repository on
    /// each of its devices and records version 1 for each.
    pub async fn create_repository(
        &self,
        instance: &str,
        name: &str,
        upstream_url: Option<&str>,
    ) -> Result<Repository> {
        names::check_name("repository", name)?;
        if let Some(url) = upstream_url {
            names::check_upstream_url(url)?;
        }
        let mut tx = self.begin_write().await?;
        let instance_id = require_id(&mut tx, "instances", "instance", instance).await?;
        let exists =
            sqlx::query("SELECT id FROM repositories WHERE instance_id = $1 AND name = $2")
                .bind(instance_id)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_some() {
            return Err(Error::AlreadyExists {
                kind: "repository",
                name: format!("{instance}/{name}"),
            });
        }
        let bindings = sqlx::query(
            "SELECT b.id, s.id AS service_id, s.name AS service FROM bindings b JOIN services s ON s.id = b.service_id \
             WHERE b.instance_id = $1 AND EXISTS (SELECT 1 FROM devices d WHERE d.service_id = s.id) ORDER BY s.name",
        )
        .bind(instance_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut open = Vec::new();
        for row in &bindings {
            let (closed, _) = flags(&binding_props(&mut tx, row.try_get("id")?).await?);
            if !closed {
                open.push((
                    row.try_get::<i64, _>("service_id")?,
                    row.try_get::<String, _>("service")?,
                ));
            }
        }
        if open.is_empty() {
            return Err(Error::Refused(format!(
                "instance {instance} has no open binding to a service with a device ({} bindings, all closed or without devices): \
                 add one with `binding add` or reopen one with `binding set-property ... closed false`",
                bindings.len()
            )));
        }
        let (service_id, service) = open[fastrand::usize(..open.len())].clone();
        let relative = format!("{instance}/{name}.git");
        let repo_id: i64 = sqlx::query(
            "INSERT INTO repositories (instance_id, name, service_id, path, upstream_url, maintenance, created_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $6) RETURNING id",
        )
        .bind(instance_id)
        .bind(name)
        .bind(service_id)
        .bind(&relative)
        .bind(upstream_url.map(str::to_string))
        .bind(registry::now())
        .fetch_one(&mut *tx)
        .await?
        .try_get("id")?;
        let devices = self.devices_of(&service).await?;
        let mut created: Vec<(Box<dyn executor::Executor>, String)> = Vec::new();
        let mut result = Ok(());
        for device in &devices {
            let step = async {
                let exec = executor_for(device)?;
                let path = path_on(device, &relative);
                crate::scripts::Script::CreateBare
                    .run_ok(exec.as_ref(), &[&path])
                    .await?;
                created.push((exec, path));
                let device_id = require_id(&mut tx, "devices", "device", &device.name).await?;
                sqlx::query("INSERT INTO working_copies (repository_id, device_id, version, updated_at) VALUES ($1, $2, 1, $3)")
                    .bind(repo_id)
                    .bind(device_id)
                    .bind(registry::now())
                    .execute(&mut *tx)
                    .await?;
                Ok::<(), Error>(())
            };
            result = step.await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            let detail = format!(
                "service={service} devices={}",
                devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            result = self
                .event(
                    &mut tx,
                    "repo.create",
                    &format!("repo:{instance}/{name}"),
                    &detail,
                )
                .await;
        }
        if result.is_ok() {
            result = tx.commit().await.map_err(Error::from);
        }
        if let Err(err) = result {
            // Only directories this call created (it refuses existing ones) are removed.
            for (exec, path) in &created {
                let _ = executor::run(exec.as_ref(), &["rm", "-rf", "--", path]).await;
            }
            return Err(err);
        }
        self.repository(&format!("{instance}/{name}")).await
    }

    /// The devices of the repository's current service.
    async fn serving_devices(&self, repo: &Repository) -> Result<Vec<Device>> {
        self.devices_of(&repo.service).await
    }

    /// Where the maintenance hook goes: every device of the current service (pushes land
    /// there), plus every other device with a recorded copy (a clusterize during
    /// maintenance, as in the runbook, must not leave the old or new copy hooked or
    /// unhooked). The flag says whether the copy must exist (current service) or is skipped
    /// when its directory is gone.
    async fn hook_devices(&self, repo: &Repository) -> Result<Vec<(Device, bool)>> {
        let mut out: Vec<(Device, bool)> = self
            .serving_devices(repo)
            .await?
            .into_iter()
            .map(|d| (d, true))
            .collect();
        for copy in &repo.copies {
            if !out.iter().any(|(d, _)| d.name == copy.device) {
                out.push((self.device(&copy.device).await?, false));
            }
        }
        Ok(out)
    }

    /// `repo maintenance REPO --start MESSAGE`: records maintenance, installs the hook on
    /// every device of the repository's service, and returns once no push is in flight
    /// (at most `wait`); on failure maintenance is lifted again and the error says why.
    pub async fn start_maintenance(
        &self,
        reference: &str,
        message: &str,
        wait: Duration,
    ) -> Result<Repository> {
        check_message(message)?;
        let was_in_maintenance = self.repository(reference).await?.maintenance;
        let full_name = self.mark_maintenance(reference, message).await?;
        let repo = self.repository(&full_name).await?;
        let on_disk = async {
            let mut targets = Vec::new();
            for (device, required) in &self.hook_devices(&repo).await? {
                let exec = executor_for(device)?;
                let path = path_on(device, &repo.path);
                if !required && !maintenance::exists(exec.as_ref(), &path).await? {
                    continue;
                }
                targets.push((exec, path));
            }
            // Every hook goes in before any wait; the last copy's install and wait share
            // one process (usually the only copy: one process in all).
            let name = repo.full_name();
            if let Some(((last_exec, last_path), others)) = targets.split_last() {
                for (exec, path) in others {
                    maintenance::install_hook(exec.as_ref(), path, message).await?;
                }
                maintenance::install_hook_and_wait_idle(
                    last_exec.as_ref(),
                    last_path,
                    &name,
                    message,
                    wait,
                )
                .await?;
                for (exec, path) in others {
                    maintenance::wait_idle(exec.as_ref(), path, &name, wait).await?;
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(err) = on_disk {
            if !was_in_maintenance {
                let _ = self
                    .stop_maintenance_inner(&repo.full_name(), Some(&err.to_string()))
                    .await;
            }
            return Err(err);
        }
        self.repository(&repo.full_name()).await
    }

    /// The registry half of maintenance start: the flag and message, in one transaction with
    /// its event, touching no disk (observation pulls read the flag, so they stop first).
    /// Returns the repository's full name.
    pub(crate) async fn mark_maintenance(&self, reference: &str, message: &str) -> Result<String> {
        check_message(message)?;
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        sqlx::query("UPDATE repositories SET maintenance = 1, maintenance_message = $1, maintenance_since = $2 WHERE id = $3")
            .bind(message)
            .bind(row.maintenance_since.filter(|_| row.maintenance).unwrap_or_else(registry::now))
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
        self.commit_with_event(
            tx,
            "repo.maintenance.start",
            &format!("repo:{}", row.full_name()),
            message,
        )
        .await?;
        Ok(row.full_name())
    }

    /// `repo maintenance REPO --stop`: removes the hook (restoring any original) and clears
    /// maintenance.
    pub async fn stop_maintenance(&self, reference: &str) -> Result<Repository> {
        self.stop_maintenance_inner(reference, None).await
    }

    async fn stop_maintenance_inner(
        &self,
        reference: &str,
        failure: Option<&str>,
    ) -> Result<Repository> {
        let repo = self.repository(reference).await?;
        for (device, required) in self.hook_devices(&repo).await? {
            let exec = executor_for(&device)?;
            let path = path_on(&device, &repo.path);
            if !required && !maintenance::exists(exec.as_ref(), &path).await? {
                continue;
            }
            maintenance::remove_hook(exec.as_ref(), &path).await?;
        }
        self.clear_maintenance(&repo.full_name(), failure).await?;
        self.repository(&repo.full_name()).await
    }

    /// The registry half of maintenance stop: clears the flag and records why, touching no
    /// disk. `migrate` lifts the hooks itself (B's removed, A's kept with a new message), so
    /// the old copy never accepts a push between the two.
    pub(crate) async fn clear_maintenance(
        &self,
        reference: &str,
        failure: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        if !row.maintenance {
            // Already lifted (a resumed unfreeze, a rollback of a repository never frozen).
            return Ok(());
        }
        sqlx::query("UPDATE repositories SET maintenance = 0, maintenance_message = NULL, maintenance_since = NULL WHERE id = $1")
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
        let (action, detail) = match failure {
            Some(why) => ("repo.maintenance.start-failed", why.to_string()),
            None => (
                "repo.maintenance.stop",
                row.maintenance_message.clone().unwrap_or_default(),
            ),
        };
        self.event(
            &mut tx,
            action,
            &format!("repo:{}", row.full_name()),
            &detail,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Repositories in maintenance (for `status`).
    pub async fn in_maintenance(&self) -> Result<Vec<Repository>> {
        Ok(self
            .repositories(None)
            .await?
            .into_iter()
            .filter(|r| r.maintenance)
            .collect())
    }

    /// `repo observe [--instance I]` (and one pass of the daemon, which also filters by
    /// service): `git fetch` from each observed repository's upstream into its newest copy,
    /// skipping repositories in maintenance. A failing fetch is reported, not fatal.
    /// With `device`, only repositories whose newest copy is on that device are fetched (one
    /// daemon per device, none fetching twice).
    pub async fn observe_pass(
        &self,
        instance: Option<&str>,
        service: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<Observation>> {
        let repos = self.repositories(instance).await?;
        let mut out = Vec::new();
        for repo in repos {
            let Some(url) = repo.upstream_url.clone() else {
                continue;
            };
            if service.is_some_and(|s| s != repo.service) {
                continue;
            }
            // Re-read just before fetching: maintenance may have started since the listing.
            let current = self.repository(&repo.full_name()).await?;
            if current.maintenance {
                out.push(Observation {
                    repository: repo.full_name(),
                    outcome: "skipped".into(),
                    detail: format!(
                        "in maintenance: {}",
                        current.maintenance_message.unwrap_or_default()
                    ),
                });
                continue;
            }
            let outcome = self.fetch_upstream(&current, &url, device).await;
            out.push(match outcome {
                Ok(Some(device)) => Observation {
                    repository: repo.full_name(),
                    outcome: "fetched".into(),
                    detail: format!("from {url} into {device}"),
                },
                Ok(None) => continue,
                Err(err) => Observation {
                    repository: repo.full_name(),
                    outcome: "failed".into(),
                    detail: err.to_string(),
                },
            });
        }
        Ok(out)
    }

    async fn fetch_upstream(
        &self,
        repo: &Repository,
        url: &str,
        only_device: Option<&str>,
    ) -> Result<Option<String>> {
        let devices = self.serving_devices(repo).await?;
        let version = |d: &Device| {
            repo.copies
                .iter()
                .find(|c| c.device == d.name)
                .map_or(0, |c| c.version)
        };
        let device = devices.iter().max_by_key(|d| version(d)).ok_or_else(|| {
            Error::Refused(format!(
                "service {} of {} has no device",
                repo.service,
                repo.full_name()
            ))
        })?;
        if only_device.is_some_and(|d| d != device.name) {
            return Ok(None);
        }
        let exec = executor_for(device)?;
        let path = path_on(device, &repo.path);
        let argv = [
            "git",
            "-C",
            &path,
            "fetch",
            "--quiet",
            "--prune",
            "--no-write-fetch-head",
            url,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ];
        executor::run(exec.as_ref(), &argv).await?;
        Ok(Some(device.name.clone()))
    }

    /// `repo clusterize REPO --service S`: moves the repository to service `S` (which the
    /// instance must be bound to) in one transaction, the row locked.
    pub async fn clusterize(&self, reference: &str, service: &str) -> Result<Clusterized> {
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        let service_id = require_id(&mut tx, "services", "service", service).await?;
        if registry::binding_id(&mut tx, row.instance_id, service_id)
            .await?
            .is_none()
        {
            return Err(Error::Refused(format!(
                "instance {} has no binding to service {service}: run `binding add --instance {} --service {service}` first",
                row.instance, row.instance
            )));
        }
        let from: String = sqlx::query("SELECT name FROM services WHERE id = $1")
            .bind(row.service_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("name")?;
        let changed = row.service_id != service_id;
        if changed {
            sqlx::query("UPDATE repositories SET service_id = $1 WHERE id = $2")
                .bind(service_id)
                .bind(row.id)
                .execute(&mut *tx)
                .await?;
            self.event(
                &mut tx,
                "repo.clusterize",
                &format!("repo:{}", row.full_name()),
                &format!("from={from} to={service}"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Clusterized {
            repository: row.full_name(),
            from,
            to: service.to_string(),
            changed,
        })
    }

    /// `repo thaw REPO --promote DEVICE [--force]` / `--demote DEVICE`.
    ///
    /// Promote makes DEVICE's copy the newest (version = max + 1); it is refused without
    /// `force` when another device's copy is newer than DEVICE's, naming it. DEVICE must
    /// belong to the repository's current service (clusterize first). Demote marks DEVICE's
    /// copy stale (version 0); it is refused without `force` when DEVICE holds the newest
    /// copy and no other copy is as new.
    pub async fn thaw(
        &self,
        reference: &str,
        device: &str,
        direction: Thaw,
        force: bool,
    ) -> Result<Repository> {
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        let device_row = sqlx::query("SELECT d.id, d.service_id, s.name AS service FROM devices d JOIN services s ON s.id = d.service_id WHERE d.name = $1")
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound { kind: "device", name: device.into() })?;
        let device_id: i64 = device_row.try_get("id")?;
        let copies: Vec<(i64, String, i64)> = sqlx::query(
            "SELECT w.device_id, d.name, w.version FROM working_copies w JOIN devices d ON d.id = w.device_id WHERE w.repository_id = $1",
        )
        .bind(row.id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("device_id")?, r.try_get("name")?, r.try_get("version")?)))
        .collect::<Result<_>>()?;
        let own = copies.iter().find(|c| c.0 == device_id).map(|c| c.2);
        let others = copies.iter().filter(|c| c.0 != device_id);
        let newest_other = others.clone().max_by_key(|c| c.2);
        let max_version = copies.iter().map(|c| c.2).max().unwrap_or(0);
        let describe =
            |v: Option<i64>| v.map_or("no copy recorded".to_string(), |v| format!("version {v}"));
        let (new_version, action) = match direction {
            Thaw::Promote => {
                if device_row.try_get::<i64, _>("service_id")? != row.service_id {
                    let service: String = device_row.try_get("service")?;
                    return Err(Error::Refused(format!(
                        "device {device} belongs to service {service}, not to the service of {}: clusterize it first",
                        row.full_name()
                    )));
                }
                if let Some(newer) = others
                    .clone()
                    .filter(|c| c.2 > own.unwrap_or(0))
                    .max_by_key(|c| c.2)
                {
                    if !force {
                        return Err(Error::Refused(format!(
                            "device {}'s copy of {} ({}) is newer than {device}'s ({}); pass --force to declare {device} authoritative anyway",
                            newer.1,
                            row.full_name(),
                            describe(Some(newer.2)),
                            describe(own)
                        )));
                    }
                }
                let newest_is_own = own.is_some()
                    && own == Some(max_version)
                    && copies.iter().filter(|c| c.2 == max_version).count() == 1;
                (
                    if newest_is_own {
                        max_version
                    } else {
                        max_version + 1
                    },
                    "repo.thaw.promote",
                )
            }
            Thaw::Demote => {
                if own.is_none() {
                    return Err(Error::Refused(format!(
                        "device {device} has no copy of {} to demote",
                        row.full_name()
                    )));
                }
                let own_version = own.unwrap_or(0);
                let still_covered = newest_other.is_some_and(|c| c.2 >= own_version);
                if !still_covered && !force {
                    return Err(Error::Refused(format!(
                        "device {device} holds the newest copy of {} ({}); {} pass --force to demote it anyway",
                        row.full_name(),
                        describe(own),
                        match newest_other {
                            Some(c) => format!("the next newest is on {} ({});", c.1, describe(Some(c.2))),
                            None => "no other device has a copy;".to_string(),
                        }
                    )));
                }
                (0, "repo.thaw.demote")
            }
        };
        sqlx::query("DELETE FROM working_copies WHERE repository_id = $1 AND device_id = $2")
            .bind(row.id)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO working_copies (repository_id, device_id, version, updated_at) VALUES ($1, $2, $3, $4)")
            .bind(row.id)
            .bind(device_id)
            .bind(new_version)
            .bind(registry::now())
            .execute(&mut *tx)
            .await?;
        let detail = format!(
            "device={device} version: {} -> {new_version}{}",
            describe(own),
            if force { " (forced)" } else { "" }
        );
        self.event(
            &mut tx,
            action,
            &format!("repo:{}", row.full_name()),
            &detail,
        )
        .await?;
        tx.commit().await?;
        self.repository(&row.full_name()).await
    }

    /// Repositories of one instance on one service (used by the daemon plan and worker).
    pub async fn repositories_on(&self, instance: &str, service: &str) -> Result<Vec<Repository>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(&format!("{REPO_SELECT} JOIN services s ON s.id = r.service_id WHERE i.name = $1 AND s.name = $2 ORDER BY r.name"))
            .bind(instance)
            .bind(service)
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::new();
        for row in rows {
            out.push(
                self.repository_of(&mut conn, &registry::repo_from_row(&row)?)
                    .await?,
            );
        }
        Ok(out)
    }
}
