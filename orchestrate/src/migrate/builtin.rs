//! The built-in registry as a [`ControlPlane`]: shardmove's own model of Almanac (services,
//! devices, instances, bindings, repositories and their copies' versions).
//!
//! The freeze is a registry flag plus the `pre-receive` hooks on disk (the core's host
//! operations); clusterize and promote are the registry's runbook steps. Around the batch:
//! B bound and A closed before it; after it, when every repository moved, A closed +
//! no-daemons for the instance (central flags that sync keeps) and the instance's daemons
//! restarted where the plan allows.

use super::core::{Completion, ControlOp, Profile};
use super::ports::{BatchSpec, BoxFuture, ControlPlane, Endpoint, RepoPlan};
use crate::daemons::RestartConfig;
use crate::error::{Error, Result};
use crate::registry::{Device, Registry, Repository};
use crate::repos::Thaw;
use crate::store::journal::now_ms;

/// The built-in registry, with what the batch's end restarts.
#[derive(Debug, Clone)]
pub struct BuiltinPlane {
    pub registry: Registry,
    /// `host restart` of the instance's daemons after the batch (`None`: leave them).
    pub daemons: Option<RestartConfig>,
    /// The full connectivity check inside the window (`--full-verify`).
    pub full_verify: bool,
}

fn endpoint(device: Device) -> Endpoint {
    Endpoint {
        fingerprints: device.pins(),
        device: device.name,
        host: device.host,
        root: device.root_path,
        transfer_addr: device.transfer_addr,
    }
}

impl BuiltinPlane {
    async fn selected(&self, spec: &BatchSpec) -> Result<Vec<Repository>> {
        let registry = &self.registry;
        registry.instance(&spec.instance).await?;
        registry.service(&spec.from).await?;
        registry.service(&spec.to).await?;
        if spec.from == spec.to {
            return Err(Error::invalid("--to", "must differ from --from"));
        }
        let on_a = registry.repositories_on(&spec.instance, &spec.from).await?;
        if spec.repos.is_empty() {
            return Ok(on_a);
        }
        let mut out = Vec::new();
        for wanted in &spec.repos {
            let repo = registry.repository(wanted).await?;
            if repo.instance != spec.instance || repo.service != spec.from {
                return Err(Error::Refused(format!(
                    "repository {} is on {}/{}, not {}/{}",
                    repo.full_name(),
                    repo.instance,
                    repo.service,
                    spec.instance,
                    spec.from
                )));
            }
            out.push(repo);
        }
        Ok(out)
    }

    /// The device of service `from` holding the newest copy of `repo`, and B's first device.
    async fn ends(&self, repo: &Repository, spec: &BatchSpec) -> Result<(Device, Device)> {
        let newest = repo
            .copies
            .iter()
            .filter(|c| c.service == spec.from)
            .max_by_key(|c| c.version)
            .ok_or_else(|| {
                Error::Refused(format!(
                    "repository {} has no working copy on service {}",
                    repo.full_name(),
                    spec.from
                ))
            })?;
        let from = self.registry.device(&newest.device).await?;
        let to = self
            .registry
            .devices_of(&spec.to)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Refused(format!("service {} has no device", spec.to)))?;
        if to.pins().is_empty() {
            return Err(Error::Refused(format!(
                "device {} has no key fingerprint: shardsend must pin its shardrecv \
                 (`device add ... --fingerprint F`)",
                to.name
            )));
        }
        Ok((from, to))
    }

    async fn plan_batch(&self, spec: &BatchSpec) -> Result<Vec<RepoPlan>> {
        let mut plans = Vec::new();
        for repo in self.selected(spec).await? {
            let (from, to) = self.ends(&repo, spec).await?;
            plans.push(RepoPlan {
                repository: repo.full_name(),
                path: repo.path.clone(),
                source: endpoint(from),
                target: endpoint(to),
            });
        }
        Ok(plans)
    }

    async fn before(&self, spec: &BatchSpec) -> Result<Vec<String>> {
        let registry = &self.registry;
        let mut lines = Vec::new();
        match registry.add_binding(&spec.instance, &spec.to).await {
            Ok(_) => lines.push(format!("bound {} to {}", spec.instance, spec.to)),
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        registry
            .set_binding_property(&spec.instance, &spec.from, "closed", "true", false)
            .await?;
        registry.sync(Some(&spec.instance)).await?;
        lines.push(format!(
            "{}/{} closed to new repositories",
            spec.instance, spec.from
        ));
        Ok(lines)
    }

    async fn after(&self, spec: &BatchSpec, all_moved: bool) -> Result<Vec<String>> {
        let registry = &self.registry;
        if !all_moved {
            // Repositories are left on A: their daemons keep running there.
            return Ok(vec![format!(
                "{}/{} keeps its daemons: repositories are left on it",
                spec.instance, spec.from
            )]);
        }
        registry
            .set_binding_property(&spec.instance, &spec.from, "closed", "true", false)
            .await?;
        registry
            .set_binding_property(&spec.instance, &spec.from, "no-daemons", "true", false)
            .await?;
        registry.sync(Some(&spec.instance)).await?;
        let mut lines = vec![format!(
            "{}/{} set closed + no-daemons",
            spec.instance, spec.from
        )];
        // Daemons only where the plan now allows: none for A's binding, B's started. A
        // failure leaves the batch running; the next `migrate` redoes these idempotent steps.
        if let Some(daemons) = &self.daemons {
            for o in crate::daemons::restart(registry, daemons, Some(&spec.instance)).await? {
                lines.push(format!(
                    "daemons of {}/{} on {}: {}",
                    o.instance, o.service, o.device, o.detail
                ));
            }
        }
        Ok(lines)
    }

    async fn apply_op(
        &self,
        spec: &BatchSpec,
        repo: &RepoPlan,
        op: &ControlOp,
    ) -> Result<Completion> {
        let registry = &self.registry;
        let name = repo.repository.as_str();
        match op {
            ControlOp::Freeze { message } => drop(registry.mark_maintenance(name, message).await?),
            ControlOp::Clusterize => drop(registry.clusterize(name, &spec.to).await?),
            ControlOp::RevertClusterize => drop(registry.clusterize(name, &spec.from).await?),
            ControlOp::Promote => {
                drop(
                    registry
                        .thaw(name, &repo.target.device, Thaw::Promote, true)
                        .await?,
                );
            }
            ControlOp::Unfreeze => {
                registry.clear_maintenance(name, None).await?;
                return Ok(Completion::Unfrozen { at_ms: now_ms() });
            }
        }
        Ok(Completion::Nothing)
    }
}

impl ControlPlane for BuiltinPlane {
    fn kind(&self) -> &'static str {
        "builtin"
    }

    fn profile(&self) -> Profile {
        Profile {
            full_verify: self.full_verify,
            ..Profile::builtin()
        }
    }

    fn plan<'a>(&'a self, spec: &'a BatchSpec) -> BoxFuture<'a, Vec<RepoPlan>> {
        Box::pin(self.plan_batch(spec))
    }

    fn endpoints<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, (Endpoint, Endpoint)> {
        Box::pin(async move {
            Ok((
                endpoint(self.registry.device(source).await?),
                endpoint(self.registry.device(target).await?),
            ))
        })
    }

    fn target_pins<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async move { Ok(Some(self.registry.device(target).await?.pins())) })
    }

    fn before_batch<'a>(&'a self, spec: &'a BatchSpec) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.before(spec))
    }

    fn after_batch<'a>(
        &'a self,
        spec: &'a BatchSpec,
        all_moved: bool,
    ) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.after(spec, all_moved))
    }

    fn apply<'a>(
        &'a self,
        spec: &'a BatchSpec,
        repo: &'a RepoPlan,
        op: &'a ControlOp,
    ) -> BoxFuture<'a, Completion> {
        Box::pin(self.apply_op(spec, repo, op))
    }
}
