//! `orchestrate`: the control plane of shardmove, as a library the `shardmove` binary (and
//! later the batch `migrate` driver) calls.
//!
//! - [`store`] (also reachable as `registry`): every SQL statement; the database (SQLite or
//!   PostgreSQL) of services, devices, instances, bindings, repositories, working-copy
//!   versions, events and the migrate journal; every change is one transaction with its event.
//! - [`repos`]: the runbook's per-repository steps (create, maintenance, observe), composing
//!   store calls and host steps, each callable on its own.
//! - [`maintenance`]: the pre-receive hook and the wait for pushes in flight.
//! - [`daemons`]: daemon plan, restart, and the bundled observation worker.
//! - [`keys`]: `device rotate-key`, a device's shardrecv key replaced with overlap.
//! - [`executor`]: how steps reach a shard host's disk (local processes, a network
//!   namespace of this machine, ssh).
//! - [`netns`]: a pair of network namespaces joined by a veth pair (the demo's shard hosts).
//! - [`names`]: validation of operator input.
//! - [`error`]: the one error enum and its exit codes.
//! - [`cli`], [`render`]: the `shardmove` command line (clap definitions) and the text it
//!   prints for each result, so `bin/shardmove.rs` only parses, calls, prints.

pub mod cli;
pub mod daemons;
#[cfg(feature = "demo")]
pub mod demo;
pub mod doctor;
pub mod error;
pub mod executor;
pub mod failpoint;
pub mod keys;
pub mod maintenance;
pub mod manual;
pub mod migrate;
pub mod names;
pub mod netns;
pub mod phorge;
pub mod render;
pub mod repos;
pub mod scripts;
pub mod store;
/// The registry's catalog, by its older name.
pub use store as registry;
pub mod status_page;
pub mod tickets;
pub mod verify;

pub use error::{Error, Result};
pub use store::{Backend, Registry};

#[cfg(test)]
mod tests {
    /// Issue 13 item 6: a library user can drop the demo's dependencies. They must stay
    /// optional and enabled only by the `demo` feature (building with
    /// `--no-default-features` then pulls neither).
    #[test]
    fn demo_dependencies_stay_optional() {
        let manifest = include_str!("../Cargo.toml");
        let dependencies = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .expect("a [dependencies] table");
        for name in ["fixtures", "tempfile"] {
            let line = dependencies
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}.")))
                .unwrap_or_else(|| panic!("{name} is not a dependency"));
            assert!(line.contains("optional = true"), "{name}: {line}");
        }
        let demo = manifest
            .lines()
            .find(|l| l.starts_with("demo = "))
            .expect("a demo feature");
        assert!(
            demo.contains("dep:fixtures") && demo.contains("dep:tempfile"),
            "{demo}"
        );
        assert!(
            manifest.contains("default = [\"demo\"]"),
            "demo is not on by default"
        );
    }
}
