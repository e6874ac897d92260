//! The repositories room of the store: repository rows, their maintenance flag and message,
//! their service, and the versions of their working copies, with every SQL statement about
//! them.
//!
//! The runbook ([`crate::repos`]) composes these calls with host steps. Nothing here runs a
//! host command, so no transaction is ever open across a remote round trip (a SQLite write
//! transaction locks the whole registry). That is why creating a repository is two calls:
//! [`Registry::allocation`] reads where it may go, the runbook creates the bare repositories
//! on the hosts, and [`Registry::record_repository`] records it in one transaction that
//! re-checks everything the host step relied on.
//!
//! Each change is one transaction ending with its event ([`Registry::commit_with_event`]);
//! a change to one repository reads its row with the backend's row lock (see the catalog's
//! module doc), so two commands on one repository serialise. The rule that decides which
//! version a thaw writes needs no database: it is [`thaw_version`], tested on its own.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use super::catalog::{
    binding_id, binding_props, flags, is_unique_violation, now, require_id, Named, Registry,
};
use crate::error::{Error, Result};

/// A repository, with its working copies.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Repository {
    pub instance: String,
    pub name: String,
    pub service: String,
    /// Path relative to the device root.
    pub path: String,
    pub upstream_url: Option<String>,
    pub maintenance: bool,
    pub maintenance_message: Option<String>,
    pub maintenance_since: Option<i64>,
    pub created_at: i64,
    pub copies: Vec<WorkingCopy>,
}

impl Repository {
    /// `INSTANCE/NAME`, the unambiguous reference.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.instance, self.name)
    }
}

/// The version of one device's copy of a repository (higher is newer).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkingCopy {
    pub device: String,
    pub service: String,
    pub version: i64,
    pub updated_at: i64,
}

/// What `repo clusterize` did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Clusterized {
    pub repository: String,
    pub from: String,
    pub to: String,
    /// False when the repository already was on the target service.
    pub changed: bool,
}

/// Which way `repo thaw` moves a device's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thaw {
    /// Declare the device's copy authoritative (newest).
    Promote,
    /// Declare the device's copy stale.
    Demote,
}

impl Thaw {
    /// The event a thaw in this direction writes.
    fn action(self) -> &'static str {
        match self {
            Thaw::Promote => "repo.thaw.promote",
            Thaw::Demote => "repo.thaw.demote",
        }
    }
}

/// Where `repo create` may put a repository, as read before any host step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Allocation {
    /// Services of the instance's open bindings that have a device, by name.
    pub open: Vec<String>,
    /// How many of the instance's bindings have a device, open or not (for the refusal).
    pub bindings: usize,
}

/// A repository whose bare copies exist on every device of `service`, to be recorded.
#[derive(Debug, Clone)]
pub(crate) struct NewRepository<'a> {
    pub instance: &'a str,
    pub name: &'a str,
    pub service: &'a str,
    /// Relative to each device's root.
    pub path: &'a str,
    pub upstream_url: Option<&'a str>,
    /// The devices the copies were created on: every device of `service`, by name.
    pub devices: &'a [String],
}

/// Internal repository row.
#[derive(Debug, Clone)]
pub(crate) struct RepoRow {
    pub id: i64,
    pub instance_id: i64,
    pub instance: String,
    pub name: String,
    pub service_id: i64,
    pub path: String,
    pub upstream_url: Option<String>,
    pub maintenance: bool,
    pub maintenance_message: Option<String>,
    pub maintenance_since: Option<i64>,
    pub created_at: i64,
}

impl RepoRow {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.instance, self.name)
    }
}

/// What a thaw changes: the device's recorded version before, and the one it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThawChange {
    pub before: Option<i64>,
    pub after: i64,
}

/// What [`thaw_version`] decides from: the repository's recorded copies and the device.
#[derive(Debug, Clone)]
pub(crate) struct ThawInput<'a> {
    /// `INSTANCE/NAME`, for messages.
    pub repository: &'a str,
    pub device: &'a str,
    /// The device's service, and whether it is the repository's current service.
    pub device_service: &'a str,
    pub on_current_service: bool,
    /// Every recorded copy: device name and version.
    pub copies: &'a [(String, i64)],
}

fn describe(version: Option<i64>) -> String {
    version.map_or("no copy recorded".to_string(), |v| format!("version {v}"))
}

/// The thaw rule. Promote makes the device's copy the newest (version = max + 1, or the
/// same version when it already is the only newest); it is refused without `force` when
/// another device's copy is newer, naming it, and always when the device is not on the
/// repository's current service (clusterize first). Demote marks the copy stale (version 0);
/// it is refused without `force` when the device holds the newest copy and no other copy is
/// as new, because nothing authoritative would be left.
pub(crate) fn thaw_version(
    input: &ThawInput<'_>,
    direction: Thaw,
    force: bool,
) -> Result<ThawChange> {
    let ThawInput {
        repository, device, ..
    } = *input;
    let own = input
        .copies
        .iter()
        .find(|(name, _)| name == device)
        .map(|c| c.1);
    let others = input.copies.iter().filter(|(name, _)| name != device);
    let newest_other = others.clone().max_by_key(|c| c.1);
    let max_version = input.copies.iter().map(|c| c.1).max().unwrap_or(0);
    let after = match direction {
        Thaw::Promote => {
            if !input.on_current_service {
                return Err(Error::Refused(format!(
                    "device {device} belongs to service {}, not to the service of {repository}: clusterize it first",
                    input.device_service
                )));
            }
            if let Some(newer) = others
                .clone()
                .filter(|c| c.1 > own.unwrap_or(0))
                .max_by_key(|c| c.1)
            {
                if !force {
                    return Err(Error::Refused(format!(
                        "device {}'s copy of {repository} ({}) is newer than {device}'s ({}); pass --force to declare {device} authoritative anyway",
                        newer.0,
                        describe(Some(newer.1)),
                        describe(own)
                    )));
                }
            }
            let newest_is_own = own == Some(max_version)
                && input.copies.iter().filter(|c| c.1 == max_version).count() == 1;
            if newest_is_own {
                max_version
            } else {
                max_version + 1
            }
        }
        Thaw::Demote => {
            let Some(own_version) = own else {
                return Err(Error::Refused(format!(
                    "device {device} has no copy of {repository} to demote"
                )));
            };
            let still_covered = newest_other.is_some_and(|c| c.1 >= own_version);
            if !still_covered && !force {
                return Err(Error::Refused(format!(
                    "device {device} holds the newest copy of {repository} ({}); {} pass --force to demote it anyway",
                    describe(own),
                    match newest_other {
                        Some(c) => format!("the next newest is on {} ({});", c.0, describe(Some(c.1))),
                        None => "no other device has a copy;".to_string(),
                    }
                )));
            }
            0
        }
    };
    Ok(ThawChange { before: own, after })
}

impl Registry {
    /// All repositories (optionally of one instance), by instance then name.
    pub async fn repositories(&self, instance: Option<&str>) -> Result<Vec<Repository>> {
        let mut conn = self.read_conn().await?;
        if let Some(instance) = instance {
            require_id(&mut conn, Named::Instance, instance).await?;
        }
        let rows = sqlx::query(&format!(
            "{REPO_SELECT} WHERE ($1 = '' OR i.name = $1) ORDER BY i.name, r.name"
        ))
        .bind(instance.unwrap_or(""))
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let repo = repo_from_row(&row)?;
            out.push(self.repository_of(&mut conn, &repo).await?);
        }
        Ok(out)
    }

    /// Repositories of one instance on one service (used by the daemon plan and worker).
    pub async fn repositories_on(&self, instance: &str, service: &str) -> Result<Vec<Repository>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(&format!(
            "{REPO_SELECT} JOIN services s ON s.id = r.service_id \
             WHERE i.name = $1 AND s.name = $2 ORDER BY r.name"
        ))
        .bind(instance)
        .bind(service)
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.repository_of(&mut conn, &repo_from_row(&row)?).await?);
        }
        Ok(out)
    }

    /// Repositories in maintenance (for `status`), by instance then name.
    pub async fn in_maintenance(&self) -> Result<Vec<Repository>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(&format!(
            "{REPO_SELECT} WHERE r.maintenance <> 0 ORDER BY i.name, r.name"
        ))
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.repository_of(&mut conn, &repo_from_row(&row)?).await?);
        }
        Ok(out)
    }

    /// `repo show REPO` (`INSTANCE/NAME`, or `NAME` when unique).
    pub async fn repository(&self, reference: &str) -> Result<Repository> {
        let mut conn = self.read_conn().await?;
        let row = resolve_repo(&mut conn, reference, "").await?;
        self.repository_of(&mut conn, &row).await
    }

    pub(crate) async fn repository_of(
        &self,
        conn: &mut AnyConnection,
        row: &RepoRow,
    ) -> Result<Repository> {
        let service = service_name(conn, row.service_id).await?;
        let copies = sqlx::query(
            "SELECT d.name AS device, s.name AS service, w.version, w.updated_at FROM working_copies w \
             JOIN devices d ON d.id = w.device_id JOIN services s ON s.id = d.service_id \
             WHERE w.repository_id = $1 ORDER BY d.name",
        )
        .bind(row.id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            Ok(WorkingCopy {
                device: r.try_get("device")?,
                service: r.try_get("service")?,
                version: r.try_get("version")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Repository {
            instance: row.instance.clone(),
            name: row.name.clone(),
            service,
            path: row.path.clone(),
            upstream_url: row.upstream_url.clone(),
            maintenance: row.maintenance,
            maintenance_message: row.maintenance_message.clone(),
            maintenance_since: row.maintenance_since,
            created_at: row.created_at,
            copies,
        })
    }

    /// The first half of `repo create`, before any host step: the instance exists, the name
    /// is free, and which services the instance's open bindings (with a device) offer.
    pub(crate) async fn allocation(&self, instance: &str, name: &str) -> Result<Allocation> {
        let mut conn = self.read_conn().await?;
        let instance_id = require_id(&mut conn, Named::Instance, instance).await?;
        refuse_taken_name(&mut conn, instance_id, instance, name).await?;
        let bindings = sqlx::query(
            "SELECT b.id, s.name AS service FROM bindings b JOIN services s ON s.id = b.service_id \
             WHERE b.instance_id = $1 AND EXISTS (SELECT 1 FROM devices d WHERE d.service_id = s.id) ORDER BY s.name",
        )
        .bind(instance_id)
        .fetch_all(&mut *conn)
        .await?;
        let mut open = Vec::new();
        for row in &bindings {
            let (closed, _) = flags(&binding_props(&mut conn, row.try_get("id")?).await?);
            if !closed {
                open.push(row.try_get("service")?);
            }
        }
        Ok(Allocation {
            open,
            bindings: bindings.len(),
        })
    }

    /// The second half of `repo create`, after the bare repositories exist on the hosts:
    /// records the repository and version 1 of each copy, in one transaction that re-checks
    /// what the host step relied on (the name still free, the binding still there and open,
    /// the service's devices still exactly those the copies were created on). A refusal
    /// records nothing; the caller removes what it created.
    pub(crate) async fn record_repository(&self, new: &NewRepository<'_>) -> Result<()> {
        let NewRepository {
            instance,
            name,
            service,
            ..
        } = *new;
        let mut tx = self.begin_write().await?;
        let instance_id = require_id(&mut tx, Named::Instance, instance).await?;
        refuse_taken_name(&mut tx, instance_id, instance, name).await?;
        let service_id = require_id(&mut tx, Named::Service, service).await?;
        let binding = binding_id(&mut tx, instance_id, service_id, self.backend().lock_clause())
            .await?
            .ok_or_else(|| {
                Error::Refused(format!(
                    "binding {instance}/{service} was removed while {instance}/{name} was being created; nothing recorded"
                ))
            })?;
        if flags(&binding_props(&mut tx, binding).await?).0 {
            return Err(Error::Refused(format!(
                "binding {instance}/{service} was closed while {instance}/{name} was being created; nothing recorded"
            )));
        }
        let devices =
            sqlx::query("SELECT id, name FROM devices WHERE service_id = $1 ORDER BY name")
                .bind(service_id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| Ok((r.try_get::<i64, _>("id")?, r.try_get::<String, _>("name")?)))
                .collect::<Result<Vec<_>>>()?;
        let mut created = new.devices.to_vec();
        created.sort();
        if devices.iter().map(|d| &d.1).ne(created.iter()) {
            return Err(Error::Refused(format!(
                "the devices of service {service} changed while {instance}/{name} was being created \
                 (copies made on {}, devices now {}); nothing recorded",
                created.join(","),
                devices.iter().map(|d| d.1.as_str()).collect::<Vec<_>>().join(",")
            )));
        }
        let at = now();
        let repo_id: i64 = sqlx::query(
            "INSERT INTO repositories (instance_id, name, service_id, path, upstream_url, maintenance, created_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $6) RETURNING id",
        )
        .bind(instance_id)
        .bind(name)
        .bind(service_id)
        .bind(new.path)
        .bind(new.upstream_url.map(str::to_string))
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                already_exists(instance, name)
            } else {
                e.into()
            }
        })?
        .try_get("id")?;
        for (device_id, _) in &devices {
            sqlx::query("INSERT INTO working_copies (repository_id, device_id, version, updated_at) VALUES ($1, $2, 1, $3)")
                .bind(repo_id)
                .bind(device_id)
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        self.commit_with_event(
            tx,
            "repo.create",
            &format!("repo:{instance}/{name}"),
            &format!("service={service} devices={}", created.join(",")),
        )
        .await
    }

    /// The registry half of maintenance start: the flag and message, in one transaction with
    /// its event, touching no disk (observation pulls read the flag, so they stop first).
    /// A repository already in maintenance keeps its `since`. Returns its full name.
    pub(crate) async fn mark_maintenance(&self, reference: &str, message: &str) -> Result<String> {
        crate::names::check_maintenance_message(message)?;
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        sqlx::query("UPDATE repositories SET maintenance = 1, maintenance_message = $1, maintenance_since = $2 WHERE id = $3")
            .bind(message)
            .bind(row.maintenance_since.filter(|_| row.maintenance).unwrap_or_else(now))
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

    /// The registry half of maintenance stop: clears the flag and records why (`failure`:
    /// maintenance could not start), touching no disk. `migrate` lifts the hooks itself (B's
    /// removed, A's kept with a new message), so the old copy never accepts a push between
    /// the two.
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
        self.commit_with_event(tx, action, &format!("repo:{}", row.full_name()), &detail)
            .await
    }

    /// `repo clusterize REPO --service S`: moves the repository to service `S` (which the
    /// instance must be bound to) in one transaction, the row locked.
    pub async fn clusterize(&self, reference: &str, service: &str) -> Result<Clusterized> {
        let mut tx = self.begin_write().await?;
        let row = resolve_repo(&mut tx, reference, self.backend().lock_clause()).await?;
        let service_id = require_id(&mut tx, Named::Service, service).await?;
        if binding_id(&mut tx, row.instance_id, service_id, "")
            .await?
            .is_none()
        {
            return Err(Error::Refused(format!(
                "instance {} has no binding to service {service}: run `binding add --instance {} --service {service}` first",
                row.instance, row.instance
            )));
        }
        let from = service_name(&mut tx, row.service_id).await?;
        let changed = row.service_id != service_id;
        if changed {
            sqlx::query("UPDATE repositories SET service_id = $1 WHERE id = $2")
                .bind(service_id)
                .bind(row.id)
                .execute(&mut *tx)
                .await?;
            self.commit_with_event(
                tx,
                "repo.clusterize",
                &format!("repo:{}", row.full_name()),
                &format!("from={from} to={service}"),
            )
            .await?;
        }
        Ok(Clusterized {
            repository: row.full_name(),
            from,
            to: service.to_string(),
            changed,
        })
    }

    /// `repo thaw REPO --promote DEVICE [--force]` / `--demote DEVICE`: writes the version
    /// [`thaw_version`] decides for DEVICE's copy, in one transaction, the row locked.
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
        let device_service: String = device_row.try_get("service")?;
        let copies: Vec<(String, i64)> = sqlx::query(
            "SELECT d.name, w.version FROM working_copies w JOIN devices d ON d.id = w.device_id WHERE w.repository_id = $1",
        )
        .bind(row.id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("version")?)))
        .collect::<Result<_>>()?;
        let full_name = row.full_name();
        let change = thaw_version(
            &ThawInput {
                repository: &full_name,
                device,
                device_service: &device_service,
                on_current_service: device_row.try_get::<i64, _>("service_id")? == row.service_id,
                copies: &copies,
            },
            direction,
            force,
        )?;
        sqlx::query("DELETE FROM working_copies WHERE repository_id = $1 AND device_id = $2")
            .bind(row.id)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO working_copies (repository_id, device_id, version, updated_at) VALUES ($1, $2, $3, $4)")
            .bind(row.id)
            .bind(device_id)
            .bind(change.after)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let detail = format!(
            "device={device} version: {} -> {}{}",
            describe(change.before),
            change.after,
            if force { " (forced)" } else { "" }
        );
        self.commit_with_event(
            tx,
            direction.action(),
            &format!("repo:{full_name}"),
            &detail,
        )
        .await?;
        self.repository(&full_name).await
    }
}

fn already_exists(instance: &str, name: &str) -> Error {
    Error::AlreadyExists {
        kind: "repository",
        name: format!("{instance}/{name}"),
    }
}

/// [`Error::AlreadyExists`] when the instance already has a repository called `name`.
async fn refuse_taken_name(
    conn: &mut AnyConnection,
    instance_id: i64,
    instance: &str,
    name: &str,
) -> Result<()> {
    let taken = sqlx::query("SELECT id FROM repositories WHERE instance_id = $1 AND name = $2")
        .bind(instance_id)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    match taken {
        Some(_) => Err(already_exists(instance, name)),
        None => Ok(()),
    }
}

async fn service_name(conn: &mut AnyConnection, service_id: i64) -> Result<String> {
    Ok(sqlx::query("SELECT name FROM services WHERE id = $1")
        .bind(service_id)
        .fetch_one(&mut *conn)
        .await?
        .try_get("name")?)
}

pub(crate) const REPO_SELECT: &str = "SELECT r.id, r.instance_id, i.name AS instance, r.name, r.service_id, r.path, r.upstream_url, \
     r.maintenance, r.maintenance_message, r.maintenance_since, r.created_at FROM repositories r JOIN instances i ON i.id = r.instance_id";

pub(crate) fn repo_from_row(row: &sqlx::any::AnyRow) -> Result<RepoRow> {
    Ok(RepoRow {
        id: row.try_get("id")?,
        instance_id: row.try_get("instance_id")?,
        instance: row.try_get("instance")?,
        name: row.try_get("name")?,
        service_id: row.try_get("service_id")?,
        path: row.try_get("path")?,
        upstream_url: row.try_get("upstream_url")?,
        maintenance: row.try_get::<i64, _>("maintenance")? != 0,
        maintenance_message: row.try_get("maintenance_message")?,
        maintenance_since: row.try_get("maintenance_since")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Finds a repository by `INSTANCE/NAME` or unique `NAME`. With a writing transaction on
/// PostgreSQL, pass `lock` = [`Backend::lock_clause`](super::Backend::lock_clause) to lock
/// the row until commit (`""` otherwise); only those constants go into the statement.
pub(crate) async fn resolve_repo(
    conn: &mut AnyConnection,
    reference: &str,
    lock: &'static str,
) -> Result<RepoRow> {
    let not_found = || Error::NotFound {
        kind: "repository",
        name: reference.into(),
    };
    let ids: Vec<i64> = match reference.split_once('/') {
        Some((instance, name)) => sqlx::query("SELECT r.id FROM repositories r JOIN instances i ON i.id = r.instance_id WHERE i.name = $1 AND r.name = $2")
            .bind(instance)
            .bind(name)
            .fetch_all(&mut *conn)
            .await?,
        None => sqlx::query("SELECT id FROM repositories WHERE name = $1").bind(reference).fetch_all(&mut *conn).await?,
    }
    .iter()
    .map(|r| r.try_get("id"))
    .collect::<std::result::Result<_, _>>()?;
    let id = match ids.as_slice() {
        [] => return Err(not_found()),
        [id] => *id,
        _ => {
            return Err(Error::invalid(
                format!("repository {reference:?}"),
                format!(
                    "{} instances have a repository of that name; use INSTANCE/NAME",
                    ids.len()
                ),
            ))
        }
    };
    if !lock.is_empty() {
        sqlx::query(&format!("SELECT id FROM repositories WHERE id = $1{lock}"))
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
    }
    let row = sqlx::query(&format!("{REPO_SELECT} WHERE r.id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(not_found)?;
    repo_from_row(&row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(d, v)| (d.to_string(), *v)).collect()
    }

    fn thaw(
        device: &str,
        on_current_service: bool,
        list: &[(&str, i64)],
        direction: Thaw,
        force: bool,
    ) -> Result<ThawChange> {
        thaw_version(
            &ThawInput {
                repository: "t/r",
                device,
                device_service: "svc",
                on_current_service,
                copies: &copies(list),
            },
            direction,
            force,
        )
    }

    fn refusal(result: Result<ThawChange>) -> String {
        match result {
            Err(Error::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn promote_writes_one_above_the_newest_unless_already_the_only_newest() {
        let up = |list: &[(&str, i64)]| thaw("b1", true, list, Thaw::Promote, true);
        // B has no copy yet (the migrate case): one above A's.
        assert_eq!(
            up(&[("a1", 3)]).ok(),
            Some(ThawChange {
                before: None,
                after: 4
            })
        );
        // B already holds the only newest copy: promoting again changes nothing.
        assert_eq!(
            up(&[("a1", 3), ("b1", 4)]).ok(),
            Some(ThawChange {
                before: Some(4),
                after: 4
            })
        );
        // A tie is not "the newest": B gets strictly above it.
        assert_eq!(
            up(&[("a1", 4), ("b1", 4)]).ok(),
            Some(ThawChange {
                before: Some(4),
                after: 5
            })
        );
    }

    #[test]
    fn promote_refuses_an_older_copy_without_force_and_naming_the_newer() {
        let why = refusal(thaw(
            "b1",
            true,
            &[("a1", 3), ("b1", 1)],
            Thaw::Promote,
            false,
        ));
        assert!(
            why.contains("device a1's copy of t/r (version 3) is newer than b1's (version 1)"),
            "{why}"
        );
        assert!(why.contains("--force"), "{why}");
        let none = refusal(thaw("b1", true, &[("a1", 3)], Thaw::Promote, false));
        assert!(none.contains("(no copy recorded)"), "{none}");
    }

    #[test]
    fn promote_refuses_a_device_of_another_service_even_forced() {
        let why = refusal(thaw("b1", false, &[("a1", 1)], Thaw::Promote, true));
        assert!(why.contains("device b1 belongs to service svc"), "{why}");
        assert!(why.contains("clusterize it first"), "{why}");
    }

    #[test]
    fn demote_keeps_an_authoritative_copy_unless_forced() {
        // Another copy is as new: demoting is safe.
        assert_eq!(
            thaw("a1", true, &[("a1", 4), ("b1", 4)], Thaw::Demote, false).ok(),
            Some(ThawChange {
                before: Some(4),
                after: 0
            })
        );
        let why = refusal(thaw(
            "b1",
            true,
            &[("a1", 2), ("b1", 4)],
            Thaw::Demote,
            false,
        ));
        assert!(
            why.contains("b1 holds the newest copy of t/r (version 4)"),
            "{why}"
        );
        assert!(
            why.contains("the next newest is on a1 (version 2)"),
            "{why}"
        );
        let alone = refusal(thaw("a1", true, &[("a1", 1)], Thaw::Demote, false));
        assert!(alone.contains("no other device has a copy"), "{alone}");
        assert_eq!(
            thaw("a1", true, &[("a1", 1)], Thaw::Demote, true).ok(),
            Some(ThawChange {
                before: Some(1),
                after: 0
            })
        );
    }

    #[test]
    fn demote_of_a_device_without_a_copy_is_refused_even_forced() {
        let why = refusal(thaw("c1", true, &[("a1", 1)], Thaw::Demote, true));
        assert!(
            why.contains("device c1 has no copy of t/r to demote"),
            "{why}"
        );
    }
}
