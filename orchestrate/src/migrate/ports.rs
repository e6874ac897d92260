//! The narrow traits through which the migrate driver carries out the core's actions, and
//! the plain data that crosses them.
//!
//! - [`ControlPlane`]: the runbook's registry side (which repositories, where they are, and
//!   the freeze flag, clusterize, promote, unfreeze). Two implementations: the built-in
//!   registry ([`super::builtin::BuiltinPlane`]) and a Phorge cluster
//!   ([`crate::phorge::PhorgePlane`]).
//! - [`HostOps`]: what runs on a shard host's disk (transfers, hooks, git checks), through the
//!   hosts' [`Executor`](crate::executor::Executor)s.
//! - [`Journal`]: where each repository's state is persisted, in shardmove's own database
//!   whatever the control plane (the store's batch journal).
//!
//! Futures are boxed so the driver takes `&dyn` ports: the control plane is chosen at run
//! time, and one copy of the driver serves both.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

use super::core::{Completion, ControlOp, HostOp, JournalWrite, Profile, RepoRecord};
use crate::error::Result;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What a batch moves: an instance's repositories (all, or `repos`) from one service to
/// another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchSpec {
    pub instance: String,
    pub from: String,
    pub to: String,
    /// Only these repositories; all of the instance on `from` when empty.
    pub repos: Vec<String>,
}

/// One end of a repository's move: a device, and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    pub device: String,
    /// Where steps on this device run (`localhost`, `netns:NAME`, an ssh host, or a command
    /// prefix; see [`crate::executor::executor_for_host`]).
    pub host: String,
    /// The directory holding the working copies (shardrecv's root on a target).
    pub root: String,
    /// The device's shardrecv, `HOST:PORT`.
    pub transfer_addr: String,
    /// Its shardrecv's key fingerprints, preferred first (a target must have one; two during
    /// a key rotation): shardsend pins them all.
    pub fingerprints: Vec<String>,
}

impl Endpoint {
    /// The full path of `relative` on this device.
    pub fn path(&self, relative: &str) -> String {
        format!("{}/{}", self.root.trim_end_matches('/'), relative)
    }
}

/// One repository of a batch, with both ends fixed when the batch is created. They are
/// journaled, never derived again from the control plane: once clusterized the plane names
/// B as the repository's home, and a driver resuming from there must still know that A is
/// the source (issue 10, item 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepoPlan {
    /// The repository, as the control plane names it.
    pub repository: String,
    /// Its path relative to the devices' roots.
    pub path: String,
    pub source: Endpoint,
    pub target: Endpoint,
}

pub trait ControlPlane: Send + Sync {
    /// A name for messages and the journal (`builtin`, `phorge`).
    fn kind(&self) -> &'static str;

    /// How this plane freezes (disk hooks or a flag) and retries.
    fn profile(&self) -> Profile;

    /// The repositories `spec` moves, each with its two ends; refuses what cannot move.
    fn plan<'a>(&'a self, spec: &'a BatchSpec) -> BoxFuture<'a, Vec<RepoPlan>>;

    /// The ends of a repository journaled with devices `source` and `target`.
    fn endpoints<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, (Endpoint, Endpoint)>;

    /// The keys a transfer to `target` pins now, if this plane reads them again before every
    /// pass (`None`: keep those read when the run started). A key rotation may move on while a
    /// batch runs; a pass pinning what the registry says at its start stays within what the
    /// device's shardrecv serves (see `crate::keys`).
    fn target_pins<'a>(&'a self, _target: &'a str) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async { Ok(None) })
    }

    /// Before a batch: B bound, A closed to new repositories. Returns what it did.
    fn before_batch<'a>(&'a self, spec: &'a BatchSpec) -> BoxFuture<'a, Vec<String>>;

    /// After a batch (`all_moved` when no repository of it is left on A).
    fn after_batch<'a>(
        &'a self,
        spec: &'a BatchSpec,
        all_moved: bool,
    ) -> BoxFuture<'a, Vec<String>>;

    /// Carries out `op` for `repo` (idempotent: done again after a crash).
    fn apply<'a>(
        &'a self,
        spec: &'a BatchSpec,
        repo: &'a RepoPlan,
        op: &'a ControlOp,
    ) -> BoxFuture<'a, Completion>;
}

pub trait HostOps: Send + Sync {
    /// Carries out `op` on the host it concerns (idempotent).
    fn run<'a>(&'a self, repo: &'a RepoPlan, op: &'a HostOp) -> BoxFuture<'a, Completion>;
}

/// A repository as the journal holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct JournaledRepo {
    pub repository: String,
    pub path: String,
    pub source_device: String,
    pub target_device: String,
    pub record: RepoRecord,
    /// When its read-only window started, if it did (resumed windows go first).
    pub frozen_at_ms: Option<i64>,
}

pub trait Journal: Send + Sync {
    /// Records `write` for `repository` of batch `id`, in one transaction.
    fn write<'a>(
        &'a self,
        id: i64,
        repository: &'a str,
        write: &'a JournalWrite,
    ) -> BoxFuture<'a, ()>;

    /// The repositories of batch `id`, in batch order.
    fn repos(&self, id: i64) -> BoxFuture<'_, Vec<JournaledRepo>>;

    /// Proof of life of this batch's driver.
    fn heartbeat(&self, id: i64) -> BoxFuture<'_, ()>;
}
