//! A Phorge cluster as a [`ControlPlane`]: `migrate` moves Phorge-hosted repositories
//! between Almanac repository services, with Phorge's own database as the registry.
//!
//! - **Reads** go through Conduit with an API token ([`conduit`]): the services and their
//!   bound devices (`almanac.service.search`), the devices' shardmove properties
//!   (`almanac.device.search`), the repositories (`diffusion.repository.search`).
//! - **The runbook** runs on a host with the Phorge checkout: either through one long-lived PHP
//!   agent ([`agent`], the default: Phorge's own editors and transactions, loaded once) or
//!   through `bin/repository` per step (`maintenance --start/--stop`, `clusterize --service`,
//!   `thaw --demote A --force` then `thaw --promote B --force`). Each `bin/repository` call
//!   starts PHP and loads Phorge (0.3-0.5 s here), four of them inside the read-only window;
//!   the agent does each step in milliseconds. Both are kept so the difference can be
//!   measured (bench/RESULTS.md).
//! - **`closed`** is an Almanac service property, set on A before the batch through
//!   `almanac.service.edit`.
//! - **The freeze** is Phorge's maintenance flag, which the front checks (HTTP pushes get a
//!   503, SSH pushes the message), followed by taking the repository's write lock, which
//!   every push holds while it writes: once taken, no push is in flight. No hook goes on disk
//!   (the core's profile says so): the hooks in a hosted repository are Phorge's own.
//! - **Promote** is demote A, then promote B, back to back under the write lock; a promotion
//!   that already happened (B the leader) is success. Between clusterize and promote reads
//!   fail ("Leader lost"), so the two run in consecutive core steps inside the freeze.
//!
//! **Where copies are.** A repository's working copy is at its `localPath` on every device
//! (one column shared by all devices); each device's view of that path is its own. Transfers
//! send `dirname(localPath)/ID` from the source device to the target's shardrecv, whose root
//! must be `dirname(localPath)` as the target device sees it. How to reach a device is an
//! Almanac device property (set once with `shardmove phorge device`): `shardmove.host` (an
//! executor host: `localhost`, an ssh host, `exec:PREFIX`), `shardmove.transfer` (its
//! shardrecv, `HOST:PORT`) and `shardmove.fingerprint` (that shardrecv's key).

pub mod agent;
pub mod conduit;

use std::path::Path;

use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::migrate::core::{Completion, ControlOp, Profile};
use crate::migrate::ports::{BatchSpec, BoxFuture, ControlPlane, Endpoint, RepoPlan};
use crate::store::journal::now_ms;
use agent::Agent;
use conduit::Conduit;

/// Almanac device properties shardmove reads.
pub const PROP_HOST: &str = "shardmove.host";
pub const PROP_TRANSFER: &str = "shardmove.transfer";
pub const PROP_FINGERPRINT: &str = "shardmove.fingerprint";

/// How the runbook's registry steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steps {
    /// One PHP agent for the batch.
    Agent,
    /// `bin/repository` per step.
    Cli,
}

/// Where Phorge is and how to reach it.
#[derive(Debug, Clone)]
pub struct PhorgeConfig {
    /// The Phorge checkout (with `bin/repository`) on `host`.
    pub root: String,
    /// Where the Phorge checkout is (an executor host; `localhost` by default).
    pub host: String,
    /// Conduit's base URL, e.g. `https://phorge.example.org/`.
    pub conduit: String,
    /// An API token of a user allowed to edit Almanac services.
    pub token: String,
    pub steps: Steps,
    /// How long the freeze waits for pushes in flight.
    pub freeze_wait_secs: u64,
    /// The full connectivity check inside the window.
    pub full_verify: bool,
}

/// A Phorge cluster.
pub struct PhorgePlane {
    cfg: PhorgeConfig,
    conduit: Conduit,
    agent: Mutex<Option<Agent>>,
}

impl std::fmt::Debug for PhorgePlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhorgePlane")
            .field("cfg", &self.cfg.conduit)
            .finish()
    }
}

/// A repository as Conduit and the agent describe it.
#[derive(Debug, Clone)]
struct PhorgeRepo {
    id: u64,
    callsign: Option<String>,
    service_phid: Option<String>,
}

impl PhorgeRepo {
    fn monogram(&self) -> String {
        format!("R{}", self.id)
    }

    fn matches(&self, wanted: &str) -> bool {
        let w = wanted.trim();
        w == self.monogram()
            || w == self.id.to_string()
            || self
                .callsign
                .as_deref()
                .is_some_and(|c| w == c || w == format!("r{c}"))
    }
}

impl PhorgePlane {
    pub fn new(cfg: PhorgeConfig) -> Result<PhorgePlane> {
        let conduit = Conduit::new(&cfg.conduit, &cfg.token)?;
        Ok(PhorgePlane {
            cfg,
            conduit,
            agent: Mutex::new(None),
        })
    }

    /// A plane used only for Conduit (recording device properties).
    pub fn for_conduit(conduit: &str, token: &str) -> Result<PhorgePlane> {
        PhorgePlane::new(PhorgeConfig {
            root: String::new(),
            host: "localhost".into(),
            conduit: conduit.to_string(),
            token: token.to_string(),
            steps: Steps::Agent,
            freeze_wait_secs: 30,
            full_verify: false,
        })
    }

    /// Sends one request to the agent (started on first use).
    async fn agent(&self, request: Value) -> Result<Value> {
        let mut guard = self.agent.lock().await;
        if guard.is_none() {
            *guard = Some(Agent::start(&self.cfg.host, &self.cfg.root)?);
        }
        let agent = guard
            .as_mut()
            .ok_or_else(|| Error::Refused("the Phorge agent is not running".into()))?;
        match agent.call(&request).await {
            Ok(answer) => Ok(answer),
            Err(e) => {
                // A dead agent is started again by the next request.
                *guard = None;
                Err(e)
            }
        }
    }

    /// `bin/repository ARGS` on the Phorge host; a usage error that says the step already
    /// happened (`already_if` in its output) is success.
    async fn bin_repository(&self, args: &[&str], already_if: Option<&str>) -> Result<()> {
        let exec = crate::executor::executor_for_host("phorge", &self.cfg.host)?;
        let bin = format!("{}/bin/repository", self.cfg.root.trim_end_matches('/'));
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        let out = crate::executor::run_status(exec.as_ref(), &argv).await?;
        let already = already_if.is_some_and(|text| out.stdout.contains(text));
        if out.status == 0 || already {
            Ok(())
        } else {
            Err(Error::HostCommand {
                host: self.cfg.host.clone(),
                command: format!("bin/repository {}", args.join(" ")),
                status: format!("exit status {}", out.status),
                stderr: format!("{} {}", out.stdout.trim(), out.stderr.trim())
                    .trim()
                    .to_string(),
            })
        }
    }

    async fn service(&self, name: &str) -> Result<Value> {
        let found = self
            .conduit
            .search(
                "almanac.service.search",
                json!({"constraints": {"names": [name]}, "attachments": {"bindings": true, "properties": true}}),
            )
            .await?;
        found
            .into_iter()
            .find(|s| s["fields"]["name"] == name)
            .ok_or_else(|| Error::NotFound {
                kind: "Almanac service",
                name: name.to_string(),
            })
    }

    /// The first actively bound device of a service.
    fn bound_device(service: &Value) -> Option<String> {
        service["attachments"]["bindings"]["bindings"]
            .as_array()?
            .iter()
            .find(|b| b["disabled"] != true)
            .and_then(|b| b["interface"]["device"]["name"].as_str())
            .map(str::to_string)
    }

    async fn endpoint(&self, device: &str, root: &str) -> Result<Endpoint> {
        let found = self
            .conduit
            .search(
                "almanac.device.search",
                json!({"constraints": {"names": [device]}, "attachments": {"properties": true}}),
            )
            .await?;
        let d = found
            .into_iter()
            .find(|d| d["fields"]["name"] == device)
            .ok_or_else(|| Error::NotFound {
                kind: "Almanac device",
                name: device.to_string(),
            })?;
        let prop = |key: &str| {
            d["attachments"]["properties"]["properties"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["key"] == key)
                .and_then(|p| p["value"].as_str())
                .map(str::to_string)
        };
        Ok(Endpoint {
            device: device.to_string(),
            host: prop(PROP_HOST).unwrap_or_else(|| "localhost".into()),
            root: root.to_string(),
            transfer_addr: prop(PROP_TRANSFER).unwrap_or_default(),
            fingerprints: prop(PROP_FINGERPRINT)
                .map(|v| pins_of_property(&v))
                .unwrap_or_default(),
        })
    }

    async fn repositories(&self) -> Result<Vec<PhorgeRepo>> {
        let found = self
            .conduit
            .search("diffusion.repository.search", json!({}))
            .await?;
        Ok(found
            .iter()
            .filter_map(|r| {
                Some(PhorgeRepo {
                    id: r["id"].as_u64()?,
                    callsign: r["fields"]["callsign"].as_str().map(str::to_string),
                    service_phid: r["fields"]["almanacServicePHID"]
                        .as_str()
                        .map(str::to_string),
                })
            })
            .collect())
    }

    /// `repository.default-local-path`: the root under which working copies live, the same
    /// on every device (each device's view of it is its own); targets' shardrecv root.
    async fn root(&self) -> Result<String> {
        let config = self.agent(json!({"op": "config"})).await?;
        config["default_local_path"]
            .as_str()
            .map(|p| p.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Refused("Phorge has no repository.default-local-path".into()))
    }

    /// A repository's working-copy path (the agent reads the column Conduit does not show).
    async fn local_path(&self, monogram: &str) -> Result<String> {
        let state = self.agent(json!({"op": "state", "repo": monogram})).await?;
        state["local_path"]
            .as_str()
            .map(|p| p.trim_end_matches('/').to_string())
            .ok_or_else(|| Error::Refused(format!("Phorge gave no local path for {monogram}")))
    }

    async fn plan_batch(&self, spec: &BatchSpec) -> Result<Vec<RepoPlan>> {
        if spec.from == spec.to {
            return Err(Error::invalid("--to", "must differ from --from"));
        }
        let (from, to) = (
            self.service(&spec.from).await?,
            self.service(&spec.to).await?,
        );
        let from_phid = from["phid"].as_str().unwrap_or_default().to_string();
        let source = Self::bound_device(&from).ok_or_else(|| {
            Error::Refused(format!("service {} has no active binding", spec.from))
        })?;
        let target = Self::bound_device(&to)
            .ok_or_else(|| Error::Refused(format!("service {} has no active binding", spec.to)))?;
        let all = self.repositories().await?;
        let mut selected: Vec<PhorgeRepo> = Vec::new();
        if spec.repos.is_empty() {
            selected.extend(
                all.into_iter()
                    .filter(|r| r.service_phid.as_deref() == Some(from_phid.as_str())),
            );
        } else {
            for wanted in &spec.repos {
                let r = all
                    .iter()
                    .find(|r| r.matches(wanted))
                    .ok_or_else(|| Error::NotFound {
                        kind: "repository",
                        name: wanted.clone(),
                    })?;
                if r.service_phid.as_deref() != Some(from_phid.as_str()) {
                    return Err(Error::Refused(format!(
                        "repository {} is not on service {}",
                        r.monogram(),
                        spec.from
                    )));
                }
                selected.push(r.clone());
            }
        }
        let root = self.root().await?;
        let mut plans = Vec::new();
        for r in selected {
            let monogram = r.monogram();
            let local = self.local_path(&monogram).await?;
            let name = Path::new(&local)
                .strip_prefix(&root)
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "{monogram}: its local path {local:?} is not under repository.default-local-path {root:?}"
                    ))
                })?;
            let target_end = self.endpoint(&target, &root).await?;
            if target_end.transfer_addr.is_empty() || target_end.fingerprints.is_empty() {
                return Err(Error::Refused(format!(
                    "Almanac device {target} has no {PROP_TRANSFER} / {PROP_FINGERPRINT} property: \
                     set them with `shardmove phorge device {target} --transfer HOST:PORT --fingerprint F`"
                )));
            }
            plans.push(RepoPlan {
                repository: monogram,
                path: name,
                source: self.endpoint(&source, &root).await?,
                target: target_end,
            });
        }
        Ok(plans)
    }

    async fn set_closed(&self, service: &str, closed: bool) -> Result<()> {
        let s = self.service(service).await?;
        let phid = s["phid"].as_str().unwrap_or_default();
        self.conduit
            .call(
                "almanac.service.edit",
                json!({"objectIdentifier": phid, "transactions": [{"type": "property.set", "value": {"closed": closed}}]}),
            )
            .await?;
        Ok(())
    }

    async fn apply_op(
        &self,
        spec: &BatchSpec,
        repo: &RepoPlan,
        op: &ControlOp,
    ) -> Result<Completion> {
        let r = repo.repository.as_str();
        match (self.cfg.steps, op) {
            (Steps::Agent, ControlOp::Freeze { message }) => {
                self.agent(json!({"op": "freeze", "repo": r, "message": message, "wait": self.cfg.freeze_wait_secs}))
                    .await?;
            }
            (Steps::Agent, ControlOp::Clusterize) => {
                self.agent(json!({"op": "clusterize", "repo": r, "service": spec.to}))
                    .await?;
            }
            (Steps::Agent, ControlOp::RevertClusterize) => {
                self.agent(json!({"op": "clusterize", "repo": r, "service": spec.from}))
                    .await?;
            }
            (Steps::Agent, ControlOp::Promote) => {
                self.agent(json!({"op": "promote", "repo": r, "from_device": repo.source.device, "to_device": repo.target.device}))
                    .await?;
            }
            (Steps::Agent, ControlOp::Unfreeze) => {
                self.agent(json!({"op": "unfreeze", "repo": r})).await?;
                return Ok(Completion::Unfrozen { at_ms: now_ms() });
            }
            (Steps::Cli, ControlOp::Freeze { message }) => {
                self.bin_repository(&["maintenance", r, "--start", message], None)
                    .await?;
                // `maintenance --start` only refuses new pushes; one already past the front's
                // check goes on writing A's copy (the manual runbook's own hole: its final
                // copy can miss an acknowledged push). Without the agent's write lock, wait
                // on A's disk until no receive-pack works there and no ref lock is held.
                let exec =
                    crate::executor::executor_for_host(&repo.source.device, &repo.source.host)?;
                crate::maintenance::wait_idle(
                    exec.as_ref(),
                    &repo.source.path(&repo.path),
                    r,
                    std::time::Duration::from_secs(self.cfg.freeze_wait_secs),
                )
                .await?;
            }
            (Steps::Cli, ControlOp::Clusterize) => {
                self.bin_repository(&["clusterize", r, "--service", &spec.to], None)
                    .await?;
            }
            (Steps::Cli, ControlOp::RevertClusterize) => {
                self.bin_repository(&["clusterize", r, "--service", &spec.from], None)
                    .await?;
            }
            (Steps::Cli, ControlOp::Promote) => {
                // Today's Phorge refuses --promote while A still holds a version row.
                self.bin_repository(
                    &["thaw", r, "--demote", &repo.source.device, "--force"],
                    None,
                )
                .await?;
                let already = format!("unambiguous leaders: {}.", repo.target.device);
                self.bin_repository(
                    &["thaw", r, "--promote", &repo.target.device, "--force"],
                    Some(&already),
                )
                .await?;
            }
            (Steps::Cli, ControlOp::Unfreeze) => {
                self.bin_repository(&["maintenance", r, "--stop"], None)
                    .await?;
                return Ok(Completion::Unfrozen { at_ms: now_ms() });
            }
        }
        Ok(Completion::Nothing)
    }

    /// What Phorge says of a repository: service, read-only, version rows (tests, status).
    pub async fn state(&self, repository: &str) -> Result<Value> {
        self.agent(json!({"op": "state", "repo": repository})).await
    }

    /// Records how to reach Almanac device `device` (its shardmove properties).
    pub async fn set_device(
        &self,
        device: &str,
        host: Option<&str>,
        transfer: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<()> {
        let found = self
            .conduit
            .search(
                "almanac.device.search",
                json!({"constraints": {"names": [device]}}),
            )
            .await?;
        let d = found
            .into_iter()
            .find(|d| d["fields"]["name"] == device)
            .ok_or_else(|| Error::NotFound {
                kind: "Almanac device",
                name: device.to_string(),
            })?;
        let mut props = serde_json::Map::new();
        for (key, value) in [
            (PROP_HOST, host),
            (PROP_TRANSFER, transfer),
            (PROP_FINGERPRINT, fingerprint),
        ] {
            if let Some(v) = value {
                props.insert(key.to_string(), Value::String(v.to_string()));
            }
        }
        if props.is_empty() {
            return Err(Error::invalid("phorge device", "nothing to set"));
        }
        self.conduit
            .call(
                "almanac.device.edit",
                json!({"objectIdentifier": d["phid"], "transactions": [{"type": "property.set", "value": props}]}),
            )
            .await?;
        Ok(())
    }
}

impl ControlPlane for PhorgePlane {
    fn kind(&self) -> &'static str {
        "phorge"
    }

    fn profile(&self) -> Profile {
        Profile {
            disk_hooks: false,
            full_verify: self.cfg.full_verify,
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
            let root = self.root().await?;
            Ok((
                self.endpoint(source, &root).await?,
                self.endpoint(target, &root).await?,
            ))
        })
    }

    fn before_batch<'a>(&'a self, spec: &'a BatchSpec) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            self.set_closed(&spec.from, true).await?;
            Ok(vec![format!(
                "Almanac service {} closed to new repositories",
                spec.from
            )])
        })
    }

    fn after_batch<'a>(
        &'a self,
        spec: &'a BatchSpec,
        all_moved: bool,
    ) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            Ok(vec![if all_moved {
                format!("every repository of the batch moved off {}", spec.from)
            } else {
                format!("repositories are left on {}", spec.from)
            }])
        })
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
/// The keys in a `shardmove.fingerprint` property, preferred first: one fingerprint, or
/// several separated by spaces or commas during a key rotation (`shardmove phorge device NAME
/// --fingerprint "NEW OLD"`).
fn pins_of_property(value: &str) -> Vec<String> {
    value
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fingerprint_property_may_hold_several_keys_preferred_first() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        assert_eq!(super::pins_of_property(&a), vec![a.clone()]);
        assert_eq!(
            super::pins_of_property(&format!(" {b}, {a}\n")),
            vec![b.clone(), a.clone()]
        );
        assert!(super::pins_of_property("  ").is_empty());
    }
}
