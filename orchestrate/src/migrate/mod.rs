//! `shardmove migrate`: move an instance's repositories from service A to service B, in
//! crash-resumable, verified, parallel batches.
//!
//! Rooms:
//! - [`core`]: the pure per-repository state machine (`pending -> precopied -> frozen ->
//!   copied -> verified -> clusterized -> promoted -> done`, or `rolling_back ->
//!   rolled_back`), with every decision about failures, crashes and retries. No I/O.
//! - [`ports`]: the narrow traits its actions go through: [`ports::ControlPlane`] (the
//!   built-in registry, [`builtin`], or Phorge, [`crate::phorge`]), [`ports::HostOps`]
//!   ([`host`]: transfers, hooks, git checks) and [`ports::Journal`] (the store).
//! - [`batch`]: who drives a batch (start, take over, refuse).
//! - [`driver`]: the async loop that carries the actions out, in parallel, with per-host
//!   limits and the open windows of a resumed batch first.
//!
//! **Read-only window.** A repository enters maintenance only when its own turn comes, after
//! its live pre-copy (`shardsend --stage-only`, repeated while a round still moved much), and
//! leaves it as soon as B is promoted. The frozen pass (`shardsend --resume`) sends only files
//! that changed since the pre-copy. Inside the window run only: the hook and the push wait
//! (one process), the final pass (A's refs read alongside), one verification process on B,
//! clusterize, promote, unhook B.
//!
//! **After.** B's copy is writable; A's stale copy keeps a pre-receive hook that refuses
//! pushes and says where the repository went.

pub mod batch;
pub mod builtin;
pub mod core;
pub mod driver;
pub mod host;
pub mod ports;
#[cfg(test)]
mod sim;

use std::sync::Arc;

use serde::Serialize;

pub use self::core::{RepoState, Step};
pub use self::ports::{BatchSpec, RepoPlan};
pub use crate::store::journal::{BatchState, MigrationStatus, RepoProgress};

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    pub spec: BatchSpec,
    pub parallel: usize,
    /// Concurrent repositories per source host (one disk, one link).
    pub per_host: usize,
    /// What a refused push shows during a repository's freeze.
    pub message: String,
}

/// What a batch did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationSummary {
    pub id: i64,
    pub state: BatchState,
    pub seconds: f64,
    pub status: MigrationStatus,
    /// Median and longest read-only window over the migrated repositories, seconds.
    pub readonly_median_seconds: Option<f64>,
    pub readonly_max_seconds: Option<f64>,
}

/// Progress lines for the operator while a batch runs.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

pub use driver::{run, start, Ports, Started};

/// `migrate status ID`: the journal's view, and why a running batch's driver is gone.
pub async fn status(store: &crate::store::Registry, id: i64) -> crate::Result<MigrationStatus> {
    store
        .migration_status(id, |b| batch::driver_gone(b, crate::registry::now()))
        .await
}

/// The ports of a batch on the built-in registry.
pub fn builtin_ports(plane: builtin::BuiltinPlane, hosts: host::HostConfig) -> Ports {
    Ports {
        store: plane.registry.clone(),
        plane: Arc::new(plane),
        hosts: Arc::new(host::ExecutorHostOps { cfg: hosts }),
    }
}
