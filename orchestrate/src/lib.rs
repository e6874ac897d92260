//! `orchestrate`: the control plane of shardmove, as a library the `shardmove` binary (and
//! later the batch `migrate` driver) calls.
//!
//! - [`registry`]: the database (SQLite or PostgreSQL) of services, devices, instances,
//!   bindings, repositories, working-copy versions and events; every change is one
//!   transaction with its event.
//! - [`repos`]: the runbook's per-repository steps (create, maintenance, observe,
//!   clusterize, thaw), each callable on its own.
//! - [`maintenance`]: the pre-receive hook and the wait for pushes in flight.
//! - [`daemons`]: daemon plan, restart, and the bundled observation worker.
//! - [`executor`]: how steps reach a shard host's disk (local processes, a network
//!   namespace of this machine, ssh).
//! - [`netns`]: a pair of network namespaces joined by a veth pair (the demo's shard hosts).
//! - [`names`]: validation of operator input.
//! - [`error`]: the one error enum and its exit codes.

pub mod daemons;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod executor;
pub mod failpoint;
pub mod maintenance;
pub mod migrate;
pub mod names;
pub mod netns;
pub mod phorge;
pub mod repos;
pub mod scripts;
pub mod store;
/// The registry's catalog, by its older name.
pub use store as registry;
pub mod status_page;
pub mod verify;

pub use error::{Error, Result};
pub use store::{Backend, Registry};
