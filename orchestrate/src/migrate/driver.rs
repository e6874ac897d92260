//! The async driver: carries out the core's actions through the ports, for every repository
//! of a batch, `parallel` at a time and `per_host` per source host.
//!
//! It decides nothing the core could: it runs the action [`RepoMachine::poll`] returns,
//! feeds back the outcome, and stops the whole batch only when the journal itself fails (a
//! database error: the journal is the driver's memory, so going on without it would be
//! worse than a crash, which the next driver takes over). A failpoint follows every action
//! (`after-ACTION`, see [`crate::failpoint`]).
//!
//! **Resumed read-only windows go first.** A repository whose window was open when the
//! previous driver died is driven at once, without queueing behind the pre-copies of others
//! (issue 10, item 3: one window lasted 3.69 s after a takeover).
//!
//! **Each transfer pass pins the target's keys as they are then.** The ends of a repository
//! are read when the run starts, but a batch may run for hours and a key rotation of the
//! target (`crate::keys`) may add, prefer and finally unpin keys meanwhile; the receiver drops
//! the old key once the registry no longer pins it. So before every pre-copy round and final
//! pass the driver asks the plane for the target's pins again
//! ([`ControlPlane::target_pins`]; one indexed read on the built-in registry), and a pass
//! started after `--finish` pins the new key only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::batch::{self, Start, HEARTBEAT};
use super::core::{
    Action, Completion, Event, Finish, HostOp, JournalWrite, RepoContext, RepoMachine,
};
use super::ports::{BatchSpec, ControlPlane, HostOps, Journal, JournaledRepo, RepoPlan};
use super::{MigrateConfig, MigrationSummary, Reporter};
use crate::error::{Error, Result};
use crate::store::journal::{BatchState, Owner};
use crate::store::Registry;

/// How `start` found the batch it drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    New,
    /// Went on with an unfinished batch (taken over from a dead driver, or incomplete).
    Continued {
        why: String,
    },
}

/// Decides and claims the batch `cfg` runs (a new one, or the unfinished one of the same
/// services, or `resume`'s), refusing while a live driver has it. Returns its id.
pub async fn start(
    store: &Registry,
    plane: &dyn ControlPlane,
    cfg: &MigrateConfig,
    resume: Option<i64>,
) -> Result<(i64, Started)> {
    let me = batch::me();
    let now = crate::registry::now();
    let existing = match resume {
        Some(id) => Some(store.batch(id).await?),
        None => {
            let spec = &cfg.spec;
            store
                .unfinished_batch(plane.kind(), &spec.instance, &spec.from, &spec.to)
                .await?
        }
    };
    let gone = existing.as_ref().and_then(|b| batch::driver_gone(b, now));
    match batch::decide_start(existing.as_ref(), gone, &me) {
        Start::Refused(why) => Err(Error::Refused(why)),
        Start::Continue { id, why } => {
            store
                .claim_batch(id, &me, |b| {
                    batch::may_claim(b, &me, crate::registry::now())
                })
                .await?;
            Ok((id, Started::Continued { why }))
        }
        Start::New => {
            let plans = plane.plan(&cfg.spec).await?;
            if plans.is_empty() {
                return Err(Error::Refused(format!(
                    "instance {} has no repository on service {} to migrate",
                    cfg.spec.instance, cfg.spec.from
                )));
            }
            let id = store
                .create_batch(
                    plane.kind(),
                    &cfg.spec,
                    &cfg.message,
                    cfg.parallel,
                    &plans,
                    &me,
                )
                .await?;
            Ok((id, Started::New))
        }
    }
}

impl Journal for Registry {
    fn write<'a>(
        &'a self,
        id: i64,
        repository: &'a str,
        write: &'a JournalWrite,
    ) -> super::ports::BoxFuture<'a, ()> {
        Box::pin(self.journal_write(id, repository, write))
    }

    fn repos(&self, id: i64) -> super::ports::BoxFuture<'_, Vec<JournaledRepo>> {
        Box::pin(self.batch_repos(id))
    }

    fn heartbeat(&self, id: i64) -> super::ports::BoxFuture<'_, ()> {
        let me = batch::me();
        Box::pin(async move { self.batch_heartbeat(id, &me).await })
    }
}

/// The ports one batch runs through.
#[derive(Clone)]
pub struct Ports {
    pub store: Registry,
    pub plane: Arc<dyn ControlPlane>,
    pub hosts: Arc<dyn HostOps>,
}

/// Runs claimed batch `id` to its end: the plane's steps before, every repository through
/// its machine, the plane's steps after; then the batch is `done` or `incomplete`.
pub async fn run(
    ports: &Ports,
    cfg: &MigrateConfig,
    id: i64,
    report: Reporter,
) -> Result<MigrationSummary> {
    let started = Instant::now();
    let batch = ports.store.batch(id).await?;
    let spec = BatchSpec {
        repos: Vec::new(),
        ..batch.spec.clone()
    };
    // Proof of life for other hosts deciding whether this batch needs taking over; a long
    // pre-copy writes no journal for minutes.
    let heartbeat = {
        let (store, report) = (ports.store.clone(), report.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                if let Err(e) = Journal::heartbeat(&store, id).await {
                    report(&format!("migration {id}: heartbeat not recorded: {e}"));
                }
            }
        })
    };
    let outcome = run_repos(ports, cfg, &batch.message, &spec, id, &report).await;
    heartbeat.abort();
    outcome?;

    let repos = ports.store.batch_repos(id).await?;
    let all_moved = repos
        .iter()
        .all(|r| r.record.state == Some(super::core::RepoState::Done));
    for line in ports.plane.after_batch(&spec, all_moved).await? {
        report(&line);
    }
    let state = if all_moved {
        BatchState::Done
    } else {
        BatchState::Incomplete
    };
    ports.store.finish_batch(id, state).await?;
    let status = ports
        .store
        .migration_status(id, |b| batch::driver_gone(b, crate::registry::now()))
        .await?;
    let mut windows: Vec<f64> = status
        .repositories
        .iter()
        .filter(|r| r.state == super::core::RepoState::Done)
        .filter_map(|r| r.readonly_seconds)
        .collect();
    windows.sort_by(f64::total_cmp);
    Ok(MigrationSummary {
        id,
        state,
        seconds: started.elapsed().as_secs_f64(),
        readonly_median_seconds: windows.get(windows.len() / 2).copied(),
        readonly_max_seconds: windows.last().copied(),
        status,
    })
}

async fn run_repos(
    ports: &Ports,
    cfg: &MigrateConfig,
    message: &str,
    spec: &BatchSpec,
    id: i64,
    report: &Reporter,
) -> Result<()> {
    for line in ports.plane.before_batch(spec).await? {
        report(&line);
    }
    let repos = ports.store.batch_repos(id).await?;
    let total = repos.len();
    let global = Arc::new(Semaphore::new(cfg.parallel.max(1)));
    let mut per_host: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut ends = HashMap::new();
    let profile = ports.plane.profile();
    let mut tasks = tokio::task::JoinSet::new();
    // Open windows first, then the rest in batch order.
    let mut order: Vec<(usize, JournaledRepo)> = repos.into_iter().enumerate().collect();
    order.sort_by_key(|(n, r)| (!in_window(r), *n));
    for (n, journaled) in order {
        let label = format!("[{}/{}] {}", n + 1, total, journaled.repository);
        let ctx = RepoContext {
            repository: journaled.repository.clone(),
            to_service: spec.to.clone(),
            message: message.to_string(),
            profile: profile.clone(),
        };
        let machine = RepoMachine::resume(ctx, &journaled.record, true);
        if matches!(machine.poll(), Action::Finish(_)) {
            continue;
        }
        let key = (
            journaled.source_device.clone(),
            journaled.target_device.clone(),
        );
        if !ends.contains_key(&key) {
            match ports.plane.endpoints(&key.0, &key.1).await {
                Ok(e) => {
                    ends.insert(key.clone(), e);
                }
                Err(e) => {
                    report(&format!("{label}: not driven: its devices: {e}"));
                    continue;
                }
            }
        }
        let Some((source, target)) = ends.get(&key).cloned() else {
            continue;
        };
        let plan = RepoPlan {
            repository: journaled.repository.clone(),
            path: journaled.path.clone(),
            source,
            target,
        };
        let window = in_window(&journaled);
        let host_limit = per_host
            .entry(plan.source.host.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(cfg.per_host.max(1))))
            .clone();
        let (ports, report, global, spec) =
            (ports.clone(), report.clone(), global.clone(), spec.clone());
        tasks.spawn(async move {
            // Queue first (a repository waiting for its turn is never read-only), unless its
            // window is already open.
            let _slots = match window {
                true => None,
                false => Some((
                    global.acquire_owned().await,
                    host_limit.acquire_owned().await,
                )),
            };
            drive_repo(&ports, id, &spec, &plan, machine, &label, &report).await
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::Refused(format!("migration task failed: {e}")));
            }
        }
    }
    match first_error {
        // The journal failed: it is intact up to there, the next `migrate` goes on.
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether the repository's read-only window is open (a driver died inside it).
fn in_window(r: &JournaledRepo) -> bool {
    r.frozen_at_ms.is_some()
        && r.record
            .state
            .is_some_and(|s| s != super::core::RepoState::Pending && !s.is_final())
}

/// Drives one repository's machine until it finishes for this run.
async fn drive_repo(
    ports: &Ports,
    id: i64,
    spec: &BatchSpec,
    plan: &RepoPlan,
    mut machine: RepoMachine,
    label: &str,
    report: &Reporter,
) -> Result<Finish> {
    let mut since = Instant::now();
    let mut sent = 0u64;
    let mut rounds = 0u32;
    loop {
        let action = machine.poll();
        let event = match &action {
            Action::Finish(finish) => return Ok(*finish),
            Action::Journal(write) => {
                ports.store.write(id, &plan.repository, write).await?;
                Event::Completed(Completion::Nothing)
            }
            Action::Host(_) | Action::Control(_)
                if crate::failpoint::error(&format!("before-{}", action.name())) =>
            {
                Event::Failed(format!("failpoint error:before-{}", action.name()))
            }
            Action::Host(op @ (HostOp::Precopy | HostOp::FinalPass)) => {
                // The target's keys as the registry pins them now: a key rotation may have
                // moved on since the run started (see `crate::keys`).
                let mut plan = plan.clone();
                match ports.plane.target_pins(&plan.target.device).await {
                    Ok(Some(pins)) if !pins.is_empty() => plan.target.fingerprints = pins,
                    Ok(_) => {}
                    Err(e) => report(&format!(
                        "{label}: cannot read {}'s keys again ({e}): pinning {}",
                        plan.target.device,
                        plan.target.fingerprints.join(", ")
                    )),
                }
                outcome(ports.hosts.run(&plan, op).await)?
            }
            Action::Host(op) => outcome(ports.hosts.run(plan, op).await)?,
            Action::Control(op) => outcome(ports.plane.apply(spec, plan, op).await)?,
            Action::Wait(pause) => {
                report(&format!(
                    "{label}: retrying in {:.1} s",
                    pause.as_secs_f64()
                ));
                tokio::time::sleep(*pause).await;
                Event::Completed(Completion::Nothing)
            }
        };
        crate::failpoint::hit(&format!("after-{}", action.name()));
        match (&action, &event) {
            (_, Event::Completed(Completion::Precopied { sent_bytes, waited })) => {
                sent += sent_bytes;
                rounds += 1;
                report(&format!(
                    "{label}: pre-copy round {rounds}: {sent_bytes} bytes sent{}",
                    waited
                        .as_ref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                ));
            }
            (_, Event::Completed(Completion::FinalPass { sent_bytes, .. })) => sent += sent_bytes,
            (
                Action::Journal(JournalWrite {
                    state: Some(state), ..
                }),
                _,
            ) => {
                report(&format!(
                    "{label}: {} in {:.3} s{}{}",
                    state.as_str(),
                    since.elapsed().as_secs_f64(),
                    match sent {
                        0 => String::new(),
                        n => format!(", {n} bytes sent"),
                    },
                    match rounds {
                        0 | 1 => String::new(),
                        n => format!(" in {n} rounds"),
                    }
                ));
                since = Instant::now();
                sent = 0;
                rounds = 0;
            }
            (_, Event::Failed(why)) => report(&format!("{label}: {} failed: {why}", action.name())),
            _ => {}
        }
        machine.handle(event);
    }
}

/// A port's result as the core's event; database failures stop the driver instead.
fn outcome(result: Result<Completion>) -> Result<Event> {
    match result {
        Ok(done) => Ok(Event::Completed(done)),
        Err(e @ (Error::Database(_) | Error::Migrate(_))) => Err(e),
        Err(e) => Ok(Event::Failed(e.to_string())),
    }
}

/// The owner this process claims batches as (for tests and status).
pub fn owner() -> Owner {
    batch::me()
}
