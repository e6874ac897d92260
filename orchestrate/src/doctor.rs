//! `shardmove doctor`: compares every device's disk with the registry and the batch journal,
//! and repairs what is safe to repair.
//!
//! A driver that died mid-batch, an operator's manual step, or a bug can leave state nobody
//! notices until a user cannot push: a hook the registry does not know of, a stale copy that
//! takes pushes, staging nobody will resume, rolled-back copies filling a disk. The rules:
//! - a copy on a device of the repository's service carries our hook exactly when the
//!   registry says the repository is in maintenance;
//! - a copy on any other device (a stale source) carries our hook, with the stale message;
//! - a copy in maintenance for longer than `max_maintenance` is reported;
//! - staging under a device's `.shardrecv/` belongs to a transfer in progress (locked) or to
//!   a pre-copy an unfinished batch will resume; anything else is orphaned;
//! - `*.replaced-*` / `*.rolled-back-*` are reported, and past the retention removed by `--fix`;
//! - a running batch whose driver is gone is reported (the next `migrate` takes it over).
//!
//! **What `--fix` does**, each with an event in the audit log: removes a hook the registry
//! does not want, puts the stale hook on a stale copy, removes orphaned staging and asides
//! past the retention. It never touches a repository of a batch whose driver is alive (that
//! driver may be between two steps that disagree for a moment), and never lifts a
//! maintenance flag (an operator may have set it on purpose).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::executor::executor_for;
use crate::migrate::batch;
use crate::migrate::RepoState;
use crate::registry::{Device, Registry};
use crate::scripts::Script;
use crate::store::journal::BatchState;

/// What the doctor looks for.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    /// Report copies in maintenance for longer than this.
    pub max_maintenance: Duration,
    /// `*.replaced-*` / `*.rolled-back-*` older than this are removed by `--fix`.
    pub retention: Duration,
    /// Repair what is safe to repair.
    pub fix: bool,
}

/// The kinds of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Our hook on a copy the registry says is writable.
    HookWithoutMaintenance,
    /// The registry says maintenance, the copy has no hook of ours: pushes are accepted.
    MaintenanceWithoutHook,
    /// A copy on a device outside the repository's service without the stale hook.
    StaleCopyWritable,
    /// A copy on a device outside the repository's service (information; takes space).
    StaleCopy,
    /// A copy the registry records is not on its device.
    MissingCopy,
    /// In maintenance for longer than the limit.
    LongMaintenance,
    /// Staging no transfer or batch will use.
    OrphanedStaging,
    /// A moved-aside copy (`*.replaced-*`, `*.rolled-back-*`).
    Aside,
    /// A running batch whose driver is gone.
    DriverGone,
}

/// One finding.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    pub kind: Kind,
    /// `device:path`, `repository`, or `migration:ID`.
    pub subject: String,
    pub detail: String,
    /// Whether it needs attention (information otherwise).
    pub problem: bool,
    /// What `--fix` did about it, if anything.
    pub fixed: Option<String>,
}

/// The doctor's report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Problems left after the fixes.
    pub problems: usize,
    pub fixed: usize,
}

/// One line of the `doctor_scan` host script.
#[derive(Debug, Clone, PartialEq)]
enum Scanned {
    Repo {
        rel: String,
        present: bool,
        hook: HookSeen,
        message: String,
    },
    Staging {
        name: String,
        locked: bool,
        mtime: i64,
    },
    Aside {
        path: String,
        mtime: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HookSeen {
    Ours,
    Own,
    None,
}

fn parse_scan(stdout: &str) -> Vec<Scanned> {
    stdout
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            Some(match f.as_slice() {
                ["repo", rel, present, hook, message] => Scanned::Repo {
                    rel: rel.to_string(),
                    present: *present == "present",
                    hook: match *hook {
                        "ours" => HookSeen::Ours,
                        "own" => HookSeen::Own,
                        _ => HookSeen::None,
                    },
                    message: message.to_string(),
                },
                ["staging", name, lock, mtime] => Scanned::Staging {
                    name: name.to_string(),
                    locked: *lock == "locked",
                    mtime: mtime.parse().ok()?,
                },
                ["aside", path, mtime] => Scanned::Aside {
                    path: path.to_string(),
                    mtime: mtime.parse().ok()?,
                },
                _ => return None,
            })
        })
        .collect()
}

/// The staging directory name of a destination (see `transfer::staging::staging_dir`).
fn staging_name(rel: &str) -> String {
    transfer::staging::staging_dir(Path::new(""), rel.as_bytes())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs the doctor over every device of the registry.
pub async fn run(registry: &Registry, cfg: &DoctorConfig) -> Result<Report> {
    let now = crate::registry::now();
    let repos = registry.repositories(None).await?;
    let devices = registry.devices().await?;
    let mut findings = Vec::new();

    // What unfinished batches still need: their repositories (left alone while a live driver
    // works on them) and the pre-copies they will resume.
    let mut busy: BTreeSet<String> = BTreeSet::new();
    let mut awaited_staging: BTreeSet<(String, String)> = BTreeSet::new();
    for b in registry.open_batches().await? {
        let gone = batch::driver_gone(&b, now);
        if let Some(why) = &gone {
            findings.push(Finding {
                kind: Kind::DriverGone,
                subject: format!("migration:{}", b.id),
                detail: format!(
                    "migration {} of {} from {} to {} is running but its driver is gone ({why}): \
                     `shardmove migrate --instance {} --from {} --to {}` takes it over",
                    b.id,
                    b.spec.instance,
                    b.spec.from,
                    b.spec.to,
                    b.spec.instance,
                    b.spec.from,
                    b.spec.to
                ),
                problem: true,
                fixed: None,
            });
        }
        for r in registry.batch_repos(b.id).await? {
            let state = r.record.state.unwrap_or(RepoState::Pending);
            if b.state == BatchState::Running && gone.is_none() {
                busy.insert(r.repository.clone());
            }
            if !state.is_final() && state < RepoState::Copied {
                awaited_staging.insert((r.target_device.clone(), staging_name(&r.path)));
            }
        }
    }

    for device in &devices {
        let exec = executor_for(device)?;
        // Copies this device should or may hold: repositories of its service, and those with
        // a recorded copy here.
        let mine: Vec<_> = repos
            .iter()
            .filter(|r| {
                r.service == device.service || r.copies.iter().any(|c| c.device == device.name)
            })
            .collect();
        let mut args: Vec<&str> = vec![device.root_path.as_str()];
        args.extend(mine.iter().map(|r| r.path.as_str()));
        let out = Script::DoctorScan.run_ok(exec.as_ref(), &args).await?;
        let scanned = parse_scan(&out.stdout);
        let by_rel: HashMap<&str, &crate::registry::Repository> =
            mine.iter().map(|r| (r.path.as_str(), *r)).collect();
        for line in scanned {
            match line {
                Scanned::Repo {
                    rel,
                    present,
                    hook,
                    message,
                } => {
                    let Some(repo) = by_rel.get(rel.as_str()) else {
                        continue;
                    };
                    let f = check_copy(
                        registry, device, repo, present, hook, &message, cfg, now, &busy,
                    )
                    .await?;
                    findings.extend(f);
                }
                Scanned::Staging {
                    name,
                    locked,
                    mtime,
                } => {
                    if locked || awaited_staging.contains(&(device.name.clone(), name.clone())) {
                        continue;
                    }
                    let dir = format!(
                        "{}/.shardrecv/{name}",
                        device.root_path.trim_end_matches('/')
                    );
                    let mut f = Finding {
                        kind: Kind::OrphanedStaging,
                        subject: format!("{}:{dir}", device.name),
                        detail: format!(
                            "staging no transfer holds and no unfinished batch will resume ({} s old)",
                            now - mtime
                        ),
                        problem: true,
                        fixed: None,
                    };
                    if cfg.fix {
                        Script::RemoveStaging.run_ok(exec.as_ref(), &[&dir]).await?;
                        f.fixed = Some("removed".into());
                        fixed_event(registry, &f).await?;
                    }
                    findings.push(f);
                }
                Scanned::Aside { path, mtime } => {
                    let age = now - mtime;
                    let expired = age > cfg.retention.as_secs() as i64;
                    let mut f = Finding {
                        kind: Kind::Aside,
                        subject: format!("{}:{path}", device.name),
                        detail: format!(
                            "moved aside {age} s ago{}",
                            if expired { ", past the retention" } else { "" }
                        ),
                        problem: expired,
                        fixed: None,
                    };
                    if expired && cfg.fix {
                        Script::RemoveAside.run_ok(exec.as_ref(), &[&path]).await?;
                        f.fixed = Some("removed".into());
                        fixed_event(registry, &f).await?;
                    }
                    findings.push(f);
                }
            }
        }
    }
    findings.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    let problems = findings
        .iter()
        .filter(|f| f.problem && f.fixed.is_none())
        .count();
    let fixed = findings.iter().filter(|f| f.fixed.is_some()).count();
    Ok(Report {
        findings,
        problems,
        fixed,
    })
}

#[allow(clippy::too_many_arguments)]
async fn check_copy(
    registry: &Registry,
    device: &Device,
    repo: &crate::registry::Repository,
    present: bool,
    hook: HookSeen,
    message: &str,
    cfg: &DoctorConfig,
    now: i64,
    busy: &BTreeSet<String>,
) -> Result<Vec<Finding>> {
    let name = repo.full_name();
    let subject = format!(
        "{}:{}",
        device.name,
        crate::repos::path_on(device, &repo.path)
    );
    let serving = repo.service == device.service;
    let recorded = repo.copies.iter().any(|c| c.device == device.name);
    let mut out = Vec::new();
    let finding = |kind, detail: String, problem| Finding {
        kind,
        subject: subject.clone(),
        detail: format!("{name}: {detail}"),
        problem,
        fixed: None,
    };
    if !present {
        if serving || recorded {
            out.push(finding(
                Kind::MissingCopy,
                "the registry records a copy here, the directory is not there".into(),
                serving,
            ));
        }
        return Ok(out);
    }
    let may_fix = cfg.fix && !busy.contains(&name);
    let exec = executor_for(device)?;
    let path = crate::repos::path_on(device, &repo.path);
    if serving {
        if repo.maintenance {
            if hook != HookSeen::Ours {
                out.push(finding(
                    Kind::MaintenanceWithoutHook,
                    "in maintenance in the registry, but no refusal hook: pushes are accepted"
                        .into(),
                    true,
                ));
            }
            let since = now - repo.maintenance_since.unwrap_or(now);
            if since > cfg.max_maintenance.as_secs() as i64 {
                out.push(finding(
                    Kind::LongMaintenance,
                    format!(
                        "in maintenance for {since} s: {}",
                        repo.maintenance_message.as_deref().unwrap_or("")
                    ),
                    true,
                ));
            }
        } else if hook == HookSeen::Ours {
            let mut f = finding(
                Kind::HookWithoutMaintenance,
                format!("refuses pushes ({message:?}) while the registry says it is writable"),
                true,
            );
            if may_fix {
                crate::maintenance::remove_hook(exec.as_ref(), &path).await?;
                f.fixed = Some("hook removed (any original restored)".into());
                fixed_event(registry, &f).await?;
            }
            out.push(f);
        }
    } else {
        out.push(finding(
            Kind::StaleCopy,
            format!("a copy outside the repository's service {}", repo.service),
            false,
        ));
        if hook != HookSeen::Ours || !message.starts_with("this copy is stale") {
            let mut f = finding(
                Kind::StaleCopyWritable,
                "a stale copy without the stale refusal hook: a push there would be lost".into(),
                true,
            );
            if may_fix {
                let stale = format!(
                    "this copy is stale: {name} moved to service {}; fetch its new location",
                    repo.service
                );
                crate::maintenance::install_hook(exec.as_ref(), &path, &stale).await?;
                f.fixed = Some("stale hook installed".into());
                fixed_event(registry, &f).await?;
            }
            out.push(f);
        }
    }
    Ok(out)
}

async fn fixed_event(registry: &Registry, f: &Finding) -> Result<()> {
    registry
        .record_event(
            "doctor.fix",
            &f.subject,
            &format!(
                "{:?}: {} -> {}",
                f.kind,
                f.detail,
                f.fixed.as_deref().unwrap_or("")
            ),
        )
        .await
}

/// Counts of findings by kind, for the text summary.
pub fn counts(report: &Report) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for f in &report.findings {
        let key = serde_json::to_value(f.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *out.entry(key).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lines_parse_and_garbage_is_ignored() {
        let out = "repo\tt/a.git\tpresent\tours\tthis copy is stale: t/a moved\n\
                   repo\tt/b.git\tmissing\tnone\t\n\
                   staging\tabc\tfree\t100\n\
                   aside\t/r/t/a.git.rolled-back-5\t7\n\
                   nonsense\n";
        let s = parse_scan(out);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[0],
            Scanned::Repo {
                rel: "t/a.git".into(),
                present: true,
                hook: HookSeen::Ours,
                message: "this copy is stale: t/a moved".into()
            }
        );
        assert!(matches!(&s[1], Scanned::Repo { present: false, .. }));
        assert!(matches!(
            &s[2],
            Scanned::Staging {
                locked: false,
                mtime: 100,
                ..
            }
        ));
        assert!(matches!(&s[3], Scanned::Aside { mtime: 7, .. }));
        assert_eq!(staging_name("t/a.git").len(), 32);
    }
}
