//! The registry: its connection and transactions, services, devices, instances, bindings
//! (central definitions and the instances' views) and the audit log, in SQLite or
//! PostgreSQL. Repositories and their copies are the [`repos`](super::repos) room's, the
//! batch journal the [`journal`](super::journal) room's; all three share this handle.
//!
//! **One type, a backend enum, not a trait.** The two backends share one schema and every
//! query: both accept `$N` parameters, `RETURNING`, `BIGINT` and `TEXT`, so the queries are
//! written once against sqlx's `Any` driver. A trait with two implementations would
//! duplicate ~40 identical queries and let them drift; the contract test suite would then be
//! the only thing keeping them equal. What genuinely differs is small and lives in
//! [`Backend`]: the migration directory (id generation), how a writing transaction starts,
//! and the row-lock clause:
//!
//! - SQLite: every writing transaction is `BEGIN IMMEDIATE` (it takes the database write lock
//!   up front, so two read-modify-write commands cannot interleave and neither fails on a
//!   lock upgrade), with a busy timeout so a second process waits instead of failing; WAL
//!   journal so reads are never blocked, with `synchronous = NORMAL`: a commit reaches the
//!   WAL (it survives `kill -9` of any process) but is fsynced at checkpoints, not at every
//!   commit. A power loss can therefore forget the last commits, always as a whole and in
//!   order (SQLite's documented guarantee for WAL + NORMAL), and every host-side step of a
//!   migration is idempotent and re-run from the journal; in exchange a commit costs
//!   microseconds instead of an fsync, and `migrate` commits several times inside each
//!   repository's read-only window.
//! - PostgreSQL: a plain transaction, and the repository row is read `FOR UPDATE`, which
//!   serialises concurrent commands on one repository (no lost update) while commands on
//!   other repositories proceed.
//!
//! **Every change is one transaction that also writes its event** (`events`: when, who,
//! what, on which subject, detail). Input is validated before the transaction starts, and
//! existence is checked inside it, so bad input changes nothing.
//!
//! **Central definitions vs the instance's view.** `bindings` + `binding_properties` are the
//! central, authoritative definitions (flags included) and are the only thing
//! `binding set-property` writes. `instance_view` + `instance_view_properties` are what an
//! instance has been told; only `sync` writes them, by copying the central rows. So a flag
//! set centrally reaches the instance at the next sync and no sync can reset it (the bug of
//! the old tooling, whose sync rebuilt the instance's flags from service defaults).
//! Decisions (allocation, daemon plan) read the central definitions.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool, Row, Transaction};

use crate::error::{Error, Result};
use crate::names::{self, PROP_CLOSED, PROP_NO_DAEMONS};

/// Which database the registry lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The row-lock clause appended to a `SELECT` of a row about to be changed.
    pub(crate) fn lock_clause(self) -> &'static str {
        match self {
            // BEGIN IMMEDIATE already holds the database write lock.
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }
}

/// How long a SQLite writer waits for another process's write transaction.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The registry handle: a small connection pool, the backend, and who is acting (for events).
#[derive(Debug, Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    actor: String,
}

/// A writing transaction (see the module doc for how each backend starts it).
pub(crate) type WriteTx = Transaction<'static, sqlx::Any>;

/// Turns what the operator typed (`--db`) into a backend and a connection URL: `postgres://`
/// and `postgresql://` URLs, `sqlite:` URLs, or a bare file path (created if missing).
pub fn parse_db_url(db: &str) -> Result<(Backend, String)> {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        Ok((Backend::Postgres, db.to_string()))
    } else if db.starts_with("sqlite:") {
        Ok((Backend::Sqlite, db.to_string()))
    } else if db.contains("://") {
        Err(Error::invalid(
            format!("database {db:?}"),
            "expected postgres://..., sqlite:... or a file path",
        ))
    } else if db.is_empty() {
        Err(Error::invalid("database", "empty path"))
    } else {
        Ok((Backend::Sqlite, format!("sqlite://{db}?mode=rwc")))
    }
}

/// Current time in unix seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A storage pool.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Service {
    pub name: String,
    pub created_at: i64,
    pub devices: Vec<String>,
}

/// A host holding working copies of a service's repositories under `root_path`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Device {
    pub name: String,
    pub service: String,
    pub host: String,
    pub transfer_addr: String,
    pub root_path: String,
    /// The key of its shardrecv the device is known by (during a rotation, the old one).
    pub fingerprint: Option<String>,
    /// The keys senders pin, preferred first: `fingerprint`, and during a key rotation the
    /// new key too ([`Device::pins`]).
    pub fingerprints: Vec<String>,
    /// A key rotation under way (`device rotate-key`, see [`crate::keys`]).
    pub rotation: Option<KeyRotation>,
    pub created_at: i64,
}

/// How far a device's key rotation went.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RotationStage {
    /// Both keys pinned, the old one preferred.
    Added,
    /// Both keys pinned, the new one preferred.
    Preferred,
}

impl RotationStage {
    /// As stored in `devices.rotation_stage`.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStage::Added => "added",
            RotationStage::Preferred => "preferred",
        }
    }

    fn parse(text: &str) -> Option<RotationStage> {
        match text {
            "added" => Some(RotationStage::Added),
            "preferred" => Some(RotationStage::Preferred),
            _ => None,
        }
    }
}

/// A key rotation under way on a device: `old` (its `fingerprint`) is being replaced by `new`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyRotation {
    pub old: String,
    pub new: String,
    pub stage: RotationStage,
    /// When `--add` pinned the new key (unix seconds).
    pub since: i64,
}

/// A device's keys as the registry records them: what `device rotate-key` changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub fingerprint: Option<String>,
    /// Under way: the new key, how far, since when (the old key is `fingerprint`).
    pub rotation: Option<(String, RotationStage, i64)>,
}

impl DeviceKeys {
    /// The keys senders pin, preferred first.
    pub fn pins(&self) -> Vec<String> {
        match (&self.fingerprint, &self.rotation) {
            (Some(old), Some((new, RotationStage::Added, _))) => vec![old.clone(), new.clone()],
            (Some(old), Some((new, RotationStage::Preferred, _))) => {
                vec![new.clone(), old.clone()]
            }
            (None, Some((new, _, _))) => vec![new.clone()],
            (fingerprint, None) => fingerprint.iter().cloned().collect(),
        }
    }
}

impl Device {
    /// The keys senders pin, preferred first (what `migrate` gives shardsend as `--peer`s).
    pub fn pins(&self) -> Vec<String> {
        self.keys().pins()
    }

    /// Its keys as `device rotate-key` sees them.
    pub fn keys(&self) -> DeviceKeys {
        DeviceKeys {
            fingerprint: self.fingerprint.clone(),
            rotation: self
                .rotation
                .as_ref()
                .map(|r| (r.new.clone(), r.stage, r.since)),
        }
    }
}

/// What `device add` records.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub name: String,
    pub service: String,
    pub host: String,
    pub transfer_addr: String,
    pub root_path: String,
    pub fingerprint: Option<String>,
}

/// A tenant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Instance {
    pub name: String,
    pub created_at: i64,
}

/// An instance's binding to a service: central properties, and the instance's synced view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Binding {
    pub instance: String,
    pub service: String,
    /// Central, authoritative properties.
    pub properties: BTreeMap<String, String>,
    pub closed: bool,
    pub no_daemons: bool,
    /// The instance's view, `None` before the first sync.
    pub view: Option<BindingView>,
}

/// What the instance was last told about one binding.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BindingView {
    pub synced_at: i64,
    pub properties: BTreeMap<String, String>,
    /// Whether the view equals the central properties.
    pub in_sync: bool,
}

/// One audit-log entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

/// What one sync did for one binding.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SyncChange {
    pub instance: String,
    pub service: String,
    /// Keys whose value in the view changed (added, changed or removed).
    pub changed: Vec<String>,
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl Registry {
    /// Opens (and creates or migrates) the registry at `db` (see [`parse_db_url`]); `actor`
    /// names who acts in the events this handle writes.
    pub async fn open(db: &str, actor: &str) -> Result<Registry> {
        sqlx::any::install_default_drivers();
        let (backend, url) = parse_db_url(db)?;
        let mut options = AnyPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(60));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                    sqlx::query(&busy).execute(&mut *conn).await?;
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await?;
        let registry = Registry {
            pool,
            backend,
            actor: actor.to_string(),
        };
        registry.migrate().await?;
        Ok(registry)
    }

    async fn migrate(&self) -> Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        // SQLite has no migration lock: two processes opening a fresh file at once may race;
        // the loser sees the winner's tables and succeeds on the second run.
        match migrator.run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(_) if self.backend == Backend::Sqlite => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(migrator.run(&self.pool).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Who acts in this handle's events.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a writing transaction (see the module doc).
    pub(crate) async fn begin_write(&self) -> Result<WriteTx> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// A connection for reads.
    pub(crate) async fn read_conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
    }

    /// Appends an event inside the caller's transaction.
    async fn event(
        &self,
        conn: &mut AnyConnection,
        action: &str,
        subject: &str,
        detail: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(now())
        .bind(&self.actor)
        .bind(action)
        .bind(subject)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Writes the event and commits: the tail of every registry change.
    pub(crate) async fn commit_with_event(
        &self,
        mut tx: WriteTx,
        action: &str,
        subject: &str,
        detail: &str,
    ) -> Result<()> {
        self.event(&mut tx, action, subject, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    // ----- services -----

    /// `service add NAME`.
    pub async fn add_service(&self, name: &str) -> Result<Service> {
        names::check_name("service", name)?;
        let mut tx = self.begin_write().await?;
        if lookup_id(&mut tx, Named::Service, name).await?.is_some() {
            return Err(Error::AlreadyExists {
                kind: "service",
                name: name.into(),
            });
        }
        insert_named(
            &mut tx,
            "INSERT INTO services (name, created_at) VALUES ($1, $2)",
            name,
            "service",
        )
        .await?;
        self.commit_with_event(tx, "service.add", &format!("service:{name}"), "")
            .await?;
        self.service(name).await
    }

    /// All services, by name.
    pub async fn services(&self) -> Result<Vec<Service>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query("SELECT name, created_at FROM services ORDER BY name")
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let name: String = row.try_get("name")?;
            let devices = service_devices(&mut conn, &name).await?;
            out.push(Service {
                name,
                created_at: row.try_get("created_at")?,
                devices,
            });
        }
        Ok(out)
    }

    /// `service show NAME`.
    pub async fn service(&self, name: &str) -> Result<Service> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query("SELECT name, created_at FROM services WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "service",
                name: name.into(),
            })?;
        let devices = service_devices(&mut conn, name).await?;
        Ok(Service {
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
            devices,
        })
    }

    // ----- devices -----

    /// `device add`.
    pub async fn add_device(&self, new: &NewDevice) -> Result<Device> {
        names::check_name("device", &new.name)?;
        names::check_root(&new.root_path)?;
        // An `exec:COMMAND WORDS` host is a command prefix: words, so spaces are its own.
        let prefix = new
            .host
            .strip_prefix(crate::executor::EXEC_HOST_PREFIX)
            .map(str::trim);
        let bad = match prefix {
            Some(command) => command.is_empty() || command.chars().any(char::is_control),
            None => {
                new.host.is_empty()
                    || new
                        .host
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control())
            }
        };
        if bad {
            return Err(Error::invalid(
                format!("host {:?}", new.host),
                "empty or contains whitespace (only an `exec:COMMAND ARGS` host has words)",
            ));
        }
        check_transfer_addr(&new.transfer_addr)?;
        if let Some(fp) = &new.fingerprint {
            if fp.is_empty() || !fp.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') {
                return Err(Error::invalid(
                    format!("fingerprint {fp:?}"),
                    "expected hex digits (colons allowed)",
                ));
            }
        }
        let mut tx = self.begin_write().await?;
        let service_id = require_id(&mut tx, Named::Service, &new.service).await?;
        if lookup_id(&mut tx, Named::Device, &new.name)
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists {
                kind: "device",
                name: new.name.clone(),
            });
        }
        sqlx::query(
            "INSERT INTO devices (name, service_id, host, transfer_addr, root_path, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&new.name)
        .bind(service_id)
        .bind(&new.host)
        .bind(&new.transfer_addr)
        .bind(&new.root_path)
        .bind(new.fingerprint.clone())
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_to_exists(e, "device", &new.name))?;
        let detail = format!(
            "service={} host={} transfer={} root={}",
            new.service, new.host, new.transfer_addr, new.root_path
        );
        self.commit_with_event(tx, "device.add", &format!("device:{}", new.name), &detail)
            .await?;
        self.device(&new.name).await
    }

    /// All devices, by name.
    pub async fn devices(&self) -> Result<Vec<Device>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(&format!("{DEVICE_SELECT} ORDER BY d.name"))
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// `device show NAME`.
    pub async fn device(&self, name: &str) -> Result<Device> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query(&format!("{DEVICE_SELECT} WHERE d.name = $1"))
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "device",
                name: name.into(),
            })?;
        device_from_row(&row)
    }

    /// Sets device `name`'s keys to `to`, provided they are still `from` (what the caller
    /// decided on; a concurrent `rotate-key` step in between is refused), with `action`'s
    /// event. The caller runs its checks on the hosts before, outside any transaction.
    pub async fn set_device_keys(
        &self,
        name: &str,
        from: &DeviceKeys,
        to: &DeviceKeys,
        action: &str,
        detail: &str,
    ) -> Result<Device> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "{DEVICE_SELECT} WHERE d.name = $1{}",
            self.backend().lock_clause()
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "device",
            name: name.into(),
        })?;
        let now_keys = device_from_row(&row)?.keys();
        if now_keys != *from {
            return Err(Error::Refused(format!(
                "device {name}'s keys changed meanwhile (another rotate-key step?): nothing \
                 done; look at `shardmove device rotate-key {name}` and run the step again"
            )));
        }
        let (next, stage, since) = match &to.rotation {
            Some((new, stage, since)) => (Some(new.clone()), Some(stage.as_str()), Some(*since)),
            None => (None, None, None),
        };
        sqlx::query(
            "UPDATE devices SET fingerprint = $1, next_fingerprint = $2, rotation_stage = $3, \
             rotation_since = $4 WHERE name = $5",
        )
        .bind(to.fingerprint.clone())
        .bind(next)
        .bind(stage)
        .bind(since)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        self.commit_with_event(tx, action, &format!("device:{name}"), detail)
            .await?;
        self.device(name).await
    }

    /// The devices of one service.
    pub async fn devices_of(&self, service: &str) -> Result<Vec<Device>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(&format!(
            "{DEVICE_SELECT} WHERE s.name = $1 ORDER BY d.name"
        ))
        .bind(service)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(device_from_row).collect()
    }

    // ----- instances -----

    /// `instance add NAME`.
    pub async fn add_instance(&self, name: &str) -> Result<Instance> {
        names::check_name("instance", name)?;
        let mut tx = self.begin_write().await?;
        if lookup_id(&mut tx, Named::Instance, name).await?.is_some() {
            return Err(Error::AlreadyExists {
                kind: "instance",
                name: name.into(),
            });
        }
        insert_named(
            &mut tx,
            "INSERT INTO instances (name, created_at) VALUES ($1, $2)",
            name,
            "instance",
        )
        .await?;
        self.commit_with_event(tx, "instance.add", &format!("instance:{name}"), "")
            .await?;
        self.instance(name).await
    }

    /// All instances, by name.
    pub async fn instances(&self) -> Result<Vec<Instance>> {
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query("SELECT name, created_at FROM instances ORDER BY name")
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Instance {
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// `instance show NAME`.
    pub async fn instance(&self, name: &str) -> Result<Instance> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query("SELECT name, created_at FROM instances WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "instance",
                name: name.into(),
            })?;
        Ok(Instance {
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
        })
    }

    // ----- bindings -----

    /// `binding add --instance I --service S`: a new binding is open, with daemons.
    pub async fn add_binding(&self, instance: &str, service: &str) -> Result<Binding> {
        let mut tx = self.begin_write().await?;
        let instance_id = require_id(&mut tx, Named::Instance, instance).await?;
        let service_id = require_id(&mut tx, Named::Service, service).await?;
        if binding_id(&mut tx, instance_id, service_id, "")
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists {
                kind: "binding",
                name: format!("{instance}/{service}"),
            });
        }
        sqlx::query(
            "INSERT INTO bindings (instance_id, service_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(instance_id)
        .bind(service_id)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_to_exists(e, "binding", &format!("{instance}/{service}")))?;
        self.commit_with_event(
            tx,
            "binding.add",
            &format!("binding:{instance}/{service}"),
            "",
        )
        .await?;
        self.binding(instance, service).await
    }

    /// `binding set-property`: sets one central property. Refuses "open but no-daemons"
    /// (new repositories would be allocated where nothing observes them) unless `force`.
    pub async fn set_binding_property(
        &self,
        instance: &str,
        service: &str,
        key: &str,
        value: &str,
        force: bool,
    ) -> Result<Binding> {
        let value = names::check_property(key, value)?;
        let mut tx = self.begin_write().await?;
        let instance_id = require_id(&mut tx, Named::Instance, instance).await?;
        let service_id = require_id(&mut tx, Named::Service, service).await?;
        let id = binding_id(
            &mut tx,
            instance_id,
            service_id,
            self.backend().lock_clause(),
        )
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "binding",
            name: format!("{instance}/{service}"),
        })?;
        let mut props = binding_props(&mut tx, id).await?;
        let old = props.insert(key.to_string(), value.clone());
        let (closed, no_daemons) = flags(&props);
        if !closed && no_daemons && !force {
            return Err(Error::Refused(format!(
                "binding {instance}/{service} would be open but without daemons: new repositories would still be \
                 allocated there and nothing would observe them; set closed=true first, or pass --force"
            )));
        }
        sqlx::query("DELETE FROM binding_properties WHERE binding_id = $1 AND key = $2")
            .bind(id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO binding_properties (binding_id, key, value, updated_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(key)
            .bind(&value)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let detail = format!(
            "{key}: {} -> {value}{}",
            old.as_deref().unwrap_or("(unset)"),
            if force { " (forced)" } else { "" }
        );
        self.commit_with_event(
            tx,
            "binding.set-property",
            &format!("binding:{instance}/{service}"),
            &detail,
        )
        .await?;
        self.binding(instance, service).await
    }

    /// All bindings (optionally of one instance), by instance then service.
    pub async fn bindings(&self, instance: Option<&str>) -> Result<Vec<Binding>> {
        let mut conn = self.read_conn().await?;
        if let Some(instance) = instance {
            require_id(&mut conn, Named::Instance, instance).await?;
        }
        let rows = sqlx::query(
            "SELECT b.id, b.instance_id, b.service_id, i.name AS instance, s.name AS service FROM bindings b \
             JOIN instances i ON i.id = b.instance_id JOIN services s ON s.id = b.service_id \
             WHERE ($1 = '' OR i.name = $1) ORDER BY i.name, s.name",
        )
        .bind(instance.unwrap_or(""))
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            out.push(binding_from_row(&mut conn, &row).await?);
        }
        Ok(out)
    }

    /// `binding show --instance I --service S`.
    pub async fn binding(&self, instance: &str, service: &str) -> Result<Binding> {
        let all = self.bindings(Some(instance)).await?;
        all.into_iter()
            .find(|b| b.service == service)
            .ok_or_else(|| Error::NotFound {
                kind: "binding",
                name: format!("{instance}/{service}"),
            })
    }

    /// `sync [--instance I]`: copies the central definitions of each binding (flags
    /// included) to the instance's view, in one transaction. Returns what changed.
    pub async fn sync(&self, instance: Option<&str>) -> Result<Vec<SyncChange>> {
        let mut tx = self.begin_write().await?;
        let instance_filter = match instance {
            Some(name) => Some(require_id(&mut tx, Named::Instance, name).await?),
            None => None,
        };
        let rows = sqlx::query(
            "SELECT b.id, b.instance_id, b.service_id, i.name AS instance, s.name AS service FROM bindings b \
             JOIN instances i ON i.id = b.instance_id JOIN services s ON s.id = b.service_id \
             WHERE ($1 = 0 OR b.instance_id = $1) ORDER BY i.name, s.name",
        )
        .bind(instance_filter.unwrap_or(0))
        .fetch_all(&mut *tx)
        .await?;
        let at = now();
        let mut changes = Vec::new();
        for row in rows {
            let (id, instance_id, service_id): (i64, i64, i64) = (
                row.try_get("id")?,
                row.try_get("instance_id")?,
                row.try_get("service_id")?,
            );
            let central = binding_props(&mut tx, id).await?;
            let view = view_props(&mut tx, instance_id, service_id).await?;
            let mut changed: Vec<String> = central
                .iter()
                .filter(|(k, v)| view.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .chain(view.keys().filter(|k| !central.contains_key(*k)).cloned())
                .collect();
            changed.sort();
            sqlx::query(
                "DELETE FROM instance_view_properties WHERE instance_id = $1 AND service_id = $2",
            )
            .bind(instance_id)
            .bind(service_id)
            .execute(&mut *tx)
            .await?;
            for (key, value) in &central {
                sqlx::query("INSERT INTO instance_view_properties (instance_id, service_id, key, value) VALUES ($1, $2, $3, $4)")
                    .bind(instance_id)
                    .bind(service_id)
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM instance_view WHERE instance_id = $1 AND service_id = $2")
                .bind(instance_id)
                .bind(service_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO instance_view (instance_id, service_id, synced_at) VALUES ($1, $2, $3)")
                .bind(instance_id)
                .bind(service_id)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            changes.push(SyncChange {
                instance: row.try_get("instance")?,
                service: row.try_get("service")?,
                changed,
            });
        }
        let subject = match instance {
            Some(name) => format!("instance:{name}"),
            None => "all".to_string(),
        };
        let changed: usize = changes.iter().map(|c| c.changed.len()).sum();
        self.commit_with_event(
            tx,
            "sync",
            &subject,
            &format!("{} bindings, {changed} properties changed", changes.len()),
        )
        .await?;
        Ok(changes)
    }

    /// The audit log, oldest first, optionally only events whose subject contains `subject`.
    pub async fn events(&self, subject: Option<&str>, limit: u64) -> Result<Vec<Event>> {
        let mut conn = self.read_conn().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let pattern = format!("%{}%", subject.unwrap_or(""));
        let rows = sqlx::query(
            "SELECT id, at, actor, action, subject, detail FROM \
             (SELECT * FROM events WHERE subject LIKE $1 ORDER BY id DESC LIMIT $2) recent ORDER BY id",
        )
        .bind(pattern)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    subject: r.try_get("subject")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

fn check_transfer_addr(addr: &str) -> Result<()> {
    let ok = match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("transfer address {addr:?}"),
            "expected HOST:PORT",
        ))
    }
}

pub(crate) fn flags(props: &BTreeMap<String, String>) -> (bool, bool) {
    let flag = |key: &str| {
        props
            .get(key)
            .and_then(|v| names::parse_flag(v))
            .unwrap_or(false)
    };
    (flag(PROP_CLOSED), flag(PROP_NO_DAEMONS))
}

fn unique_to_exists(err: sqlx::Error, kind: &'static str, name: &str) -> Error {
    if is_unique_violation(&err) {
        Error::AlreadyExists {
            kind,
            name: name.to_string(),
        }
    } else {
        err.into()
    }
}

async fn insert_named(
    conn: &mut AnyConnection,
    sql: &str,
    name: &str,
    kind: &'static str,
) -> Result<()> {
    sqlx::query(sql)
        .bind(name)
        .bind(now())
        .execute(&mut *conn)
        .await
        .map_err(|e| unique_to_exists(e, kind, name))?;
    Ok(())
}

/// The tables whose rows are found by their unique `name`: the closed set [`lookup_id`]
/// reads, so no table name ever comes from a caller's string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Named {
    Service,
    Device,
    Instance,
}

impl Named {
    /// What an operator calls one row (in [`Error::NotFound`]).
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Named::Service => "service",
            Named::Device => "device",
            Named::Instance => "instance",
        }
    }

    fn id_query(self) -> &'static str {
        match self {
            Named::Service => "SELECT id FROM services WHERE name = $1",
            Named::Device => "SELECT id FROM devices WHERE name = $1",
            Named::Instance => "SELECT id FROM instances WHERE name = $1",
        }
    }
}

/// The id of the `table` row called `name`.
pub(crate) async fn lookup_id(
    conn: &mut AnyConnection,
    table: Named,
    name: &str,
) -> Result<Option<i64>> {
    let row = sqlx::query(table.id_query())
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(row) => Some(row.try_get("id")?),
        None => None,
    })
}

/// Like [`lookup_id`], but an unknown name is [`Error::NotFound`].
pub(crate) async fn require_id(conn: &mut AnyConnection, table: Named, name: &str) -> Result<i64> {
    lookup_id(conn, table, name)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: table.kind(),
            name: name.into(),
        })
}

/// The binding of an instance to a service. `lock` is [`Backend::lock_clause`] inside a
/// writing transaction that reads the binding's flags and relies on them until commit (a
/// concurrent `set-property` then waits), `""` otherwise.
pub(crate) async fn binding_id(
    conn: &mut AnyConnection,
    instance_id: i64,
    service_id: i64,
    lock: &'static str,
) -> Result<Option<i64>> {
    let row = sqlx::query(&format!(
        "SELECT id FROM bindings WHERE instance_id = $1 AND service_id = $2{lock}"
    ))
    .bind(instance_id)
    .bind(service_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(row) => Some(row.try_get("id")?),
        None => None,
    })
}

pub(crate) async fn binding_props(
    conn: &mut AnyConnection,
    binding_id: i64,
) -> Result<BTreeMap<String, String>> {
    let rows = sqlx::query("SELECT key, value FROM binding_properties WHERE binding_id = $1")
        .bind(binding_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("key")?, r.try_get("value")?)))
        .collect()
}

async fn view_props(
    conn: &mut AnyConnection,
    instance_id: i64,
    service_id: i64,
) -> Result<BTreeMap<String, String>> {
    let rows = sqlx::query("SELECT key, value FROM instance_view_properties WHERE instance_id = $1 AND service_id = $2")
        .bind(instance_id)
        .bind(service_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("key")?, r.try_get("value")?)))
        .collect()
}

async fn binding_from_row(conn: &mut AnyConnection, row: &sqlx::any::AnyRow) -> Result<Binding> {
    let (id, instance_id, service_id): (i64, i64, i64) = (
        row.try_get("id")?,
        row.try_get("instance_id")?,
        row.try_get("service_id")?,
    );
    let properties = binding_props(conn, id).await?;
    let (closed, no_daemons) = flags(&properties);
    let synced = sqlx::query(
        "SELECT synced_at FROM instance_view WHERE instance_id = $1 AND service_id = $2",
    )
    .bind(instance_id)
    .bind(service_id)
    .fetch_optional(&mut *conn)
    .await?;
    let view = match synced {
        Some(synced) => {
            let view_properties = view_props(conn, instance_id, service_id).await?;
            Some(BindingView {
                synced_at: synced.try_get("synced_at")?,
                in_sync: view_properties == properties,
                properties: view_properties,
            })
        }
        None => None,
    };
    Ok(Binding {
        instance: row.try_get("instance")?,
        service: row.try_get("service")?,
        properties,
        closed,
        no_daemons,
        view,
    })
}

async fn service_devices(conn: &mut AnyConnection, service: &str) -> Result<Vec<String>> {
    let rows = sqlx::query("SELECT d.name FROM devices d JOIN services s ON s.id = d.service_id WHERE s.name = $1 ORDER BY d.name")
        .bind(service)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
}

const DEVICE_SELECT: &str =
    "SELECT d.name, s.name AS service, d.host, d.transfer_addr, d.root_path, d.fingerprint, \
                             d.next_fingerprint, d.rotation_stage, d.rotation_since, d.created_at \
                             FROM devices d JOIN services s ON s.id = d.service_id";

fn device_from_row(row: &sqlx::any::AnyRow) -> Result<Device> {
    let name: String = row.try_get("name")?;
    let fingerprint: Option<String> = row.try_get("fingerprint")?;
    let next: Option<String> = row.try_get("next_fingerprint")?;
    let stage: Option<String> = row.try_get("rotation_stage")?;
    let since: Option<i64> = row.try_get("rotation_since")?;
    let rotation = match (next, stage) {
        (Some(new), Some(stage)) => {
            let stage = RotationStage::parse(&stage).ok_or_else(|| {
                Error::Refused(format!(
                    "device {name}: unknown key rotation stage {stage:?} in the registry"
                ))
            })?;
            Some((new, stage, since.unwrap_or(0)))
        }
        _ => None,
    };
    let keys = DeviceKeys {
        fingerprint: fingerprint.clone(),
        rotation,
    };
    Ok(Device {
        fingerprints: keys.pins(),
        rotation: keys.rotation.map(|(new, stage, since)| KeyRotation {
            old: fingerprint.clone().unwrap_or_default(),
            new,
            stage,
            since,
        }),
        fingerprint,
        name,
        service: row.try_get("service")?,
        host: row.try_get("host")?,
        transfer_addr: row.try_get("transfer_addr")?,
        root_path: row.try_get("root_path")?,
        created_at: row.try_get("created_at")?,
    })
}
