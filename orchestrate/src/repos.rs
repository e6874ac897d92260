//! The runbook's repository steps, each callable on its own: create (allocation among open
//! bindings), maintenance start/stop, observation pass; clusterize and thaw, which touch no
//! host, are the store's ([`Registry::clusterize`], [`Registry::thaw`]).
//!
//! This layer composes store calls (`crate::store`, which holds every SQL statement) with
//! host steps (through an [`Executor`](crate::executor::Executor)), and never runs a host
//! step while a store transaction is open: a SQLite write transaction locks the whole
//! registry, and a host step may be a remote round trip. So `repo create` reads where the
//! repository may go, creates the bare repositories on the hosts, then records everything in
//! one transaction that re-checks what it relied on, and removes what it created if that
//! fails. Maintenance is recorded *before* the hook is installed (observation pulls read the
//! flag, so they stop first) and cleared again if the hook cannot be installed or pushes do
//! not drain in time.

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::executor::{self, executor_for};
use crate::maintenance;
use crate::names;
use crate::registry::{Device, NewRepository, Registry, Repository};
use crate::scripts::Script;

pub use crate::names::MAX_MESSAGE_LEN;
pub use crate::store::{Clusterized, Thaw};

/// Default bound on the wait for pushes in flight when maintenance starts.
pub const DEFAULT_PUSH_WAIT: Duration = Duration::from_secs(60);

/// What an observation pass did with one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObserveOutcome {
    /// Its upstream was fetched into its newest copy.
    Fetched,
    /// It is in maintenance: nothing was fetched.
    Skipped,
    /// The fetch failed (the detail says why); the pass went on.
    Failed,
}

impl ObserveOutcome {
    /// The word `--json` and the text output use.
    pub fn as_str(self) -> &'static str {
        match self {
            ObserveOutcome::Fetched => "fetched",
            ObserveOutcome::Skipped => "skipped",
            ObserveOutcome::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ObserveOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of one repository in an observation pass.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Observation {
    pub repository: String,
    pub outcome: ObserveOutcome,
    pub detail: String,
}

/// Full path of a repository on a device.
pub fn path_on(device: &Device, relative: &str) -> String {
    format!("{}/{}", device.root_path.trim_end_matches('/'), relative)
}

impl Registry {
    /// `repo create --instance I NAME [--upstream URL]`: picks a service at random among the
    /// instance's open bindings (whose service has a device), creates a bare repository on
    /// each of its devices, then records the repository and version 1 of each copy. No
    /// transaction is open while the hosts work; if recording is refused (the name was taken
    /// or the binding closed meanwhile), the bare repositories this call created are removed.
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
        let allocation = self.allocation(instance, name).await?;
        if allocation.open.is_empty() {
            return Err(Error::Refused(format!(
                "instance {instance} has no open binding to a service with a device ({} bindings, all closed or without devices): \
                 add one with `binding add` or reopen one with `binding set-property ... closed false`",
                allocation.bindings
            )));
        }
        let service = &allocation.open[fastrand::usize(..allocation.open.len())];
        let devices = self.devices_of(service).await?;
        let relative = format!("{instance}/{name}.git");
        let mut created: Vec<(Box<dyn executor::Executor>, String)> = Vec::new();
        let on_hosts = async {
            for device in &devices {
                let exec = executor_for(device)?;
                let path = path_on(device, &relative);
                Script::CreateBare.run_ok(exec.as_ref(), &[&path]).await?;
                created.push((exec, path));
            }
            Ok::<(), Error>(())
        }
        .await;
        let device_names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
        let recorded = match on_hosts {
            Ok(()) => {
                self.record_repository(&NewRepository {
                    instance,
                    name,
                    service,
                    path: &relative,
                    upstream_url,
                    devices: &device_names,
                })
                .await
            }
            Err(err) => Err(err),
        };
        if let Err(err) = recorded {
            // Only directories this call created are removed: create-bare refuses a path
            // where anything exists, so a concurrent create of the same name keeps its own.
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
        names::check_maintenance_message(message)?;
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
                    outcome: ObserveOutcome::Skipped,
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
                    outcome: ObserveOutcome::Fetched,
                    detail: format!("from {url} into {device}"),
                },
                Ok(None) => continue,
                Err(err) => Observation {
                    repository: repo.full_name(),
                    outcome: ObserveOutcome::Failed,
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
}
