//! The text `shardmove` prints for each command (without `--json`), as pure functions of
//! the library's result types, so the binary only picks one and prints it, and each text is
//! tested here from fixed inputs (the way [`crate::status_page::render`] is).
//!
//! Conventions: one line per listed item, each ending in `\n` (the binary trims the last one);
//! columns separated by tabs so scripts that do not use `--json` can still `cut -f`; times as
//! `YYYY-MM-DD HH:MM:SS UTC` ([`utc`]); flags as `yes`/`no`. `--json` prints the same values
//! through serde instead, so what a text shows never decides what a script can read.

use crate::daemons::{PlanEntry, RestartOutcome};
use crate::keys::RotationReport;
use crate::migrate::{MigrationStatus, MigrationSummary, RepoPlan};
use crate::registry::{
    Binding, Device, Event, Instance, Repository, RotationStage, Service, SyncChange,
};
use crate::repos::{Clusterized, Observation};

/// `YYYY-MM-DD HH:MM:SS UTC` from unix seconds (days-to-civil, proleptic Gregorian).
pub fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A live progress line of `migrate`/`demo`: `HH:MM:SS.mmm LINE` (UTC) at time `at`.
pub fn progress_line(at: std::time::SystemTime, line: &str) -> String {
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    format!(
        "{}.{:03} {line}",
        &utc(secs)[11..19],
        since_epoch.subsec_millis()
    )
}

fn yes_no(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// `service add`.
pub fn service_added(service: &Service) -> String {
    format!("added service {}", service.name)
}

/// `service list`.
pub fn services(all: &[Service]) -> String {
    all.iter()
        .map(|s| format!("{}\tdevices: {}\n", s.name, s.devices.join(",")))
        .collect()
}

/// `service show`.
pub fn service(s: &Service) -> String {
    format!(
        "service {}\n  created: {}\n  devices: {}",
        s.name,
        utc(s.created_at),
        s.devices.join(", ")
    )
}

/// `device add`.
pub fn device_added(d: &Device) -> String {
    format!("added device {} to service {}", d.name, d.service)
}

/// `device list`.
pub fn devices(all: &[Device]) -> String {
    all.iter()
        .map(|d| {
            format!(
                "{}\tservice: {}\thost: {}\ttransfer: {}\troot: {}\tpinned: {}{}\n",
                d.name,
                d.service,
                d.host,
                d.transfer_addr,
                d.root_path,
                match d.fingerprints.is_empty() {
                    true => "(none)".to_string(),
                    false => d.fingerprints.join(","),
                },
                match d.rotation {
                    Some(_) => " (key rotation under way)",
                    None => "",
                }
            )
        })
        .collect()
}

/// `device show`.
pub fn device(d: &Device) -> String {
    let mut text = format!(
        "device {}\n  service: {}\n  host: {}\n  transfer: {}\n  root: {}\n  fingerprint: {}",
        d.name,
        d.service,
        d.host,
        d.transfer_addr,
        d.root_path,
        d.fingerprint.as_deref().unwrap_or("(none)")
    );
    if let Some(r) = &d.rotation {
        text.push_str(&format!(
            "\n  key rotation: to {} ({}, since {})\n  pinned: {}",
            r.new,
            match r.stage {
                RotationStage::Added => "added, the old key preferred",
                RotationStage::Preferred => "the new key preferred",
            },
            utc(r.since),
            d.fingerprints.join(", ")
        ));
    }
    text
}

/// `device rotate-key`: what the step did, what was checked, what to do next.
pub fn key_rotation(r: &RotationReport) -> String {
    let mut text = match (r.step, &r.rotation) {
        ("status", None) => format!("device {}: no key rotation under way\n", r.device),
        ("status", Some(rot)) => format!(
            "device {}: key rotation from {} to {} ({}, since {})\n",
            r.device,
            rot.old,
            rot.new,
            rot.stage.as_str(),
            utc(rot.since)
        ),
        ("added", _) => format!(
            "device {}: new key pinned beside the old one (the old one still preferred)\n",
            r.device
        ),
        ("preferred", _) => format!("device {}: the new key is now preferred\n", r.device),
        ("finished", _) => format!(
            "device {}: key rotation finished; unpinned {}\n",
            r.device,
            r.unpinned.as_deref().unwrap_or("(none)")
        ),
        (step, _) => format!(
            "device {}: key rotation {step}; unpinned {}\n",
            r.device,
            r.unpinned.as_deref().unwrap_or("(none)")
        ),
    };
    if let Some(c) = &r.check {
        text.push_str(&format!(
            "  checked: its shardrecv at {} presents {} when asked for it (its primary: {})\n",
            c.addr, c.presented, c.primary
        ));
    }
    text.push_str(&format!(
        "  pinned (senders accept these, the first preferred): {}\n",
        match r.fingerprints.is_empty() {
            true => "(none)".to_string(),
            false => r.fingerprints.join(", "),
        }
    ));
    text.push_str(&format!("next: {}\n", r.next));
    text
}

/// `instance add`.
pub fn instance_added(i: &Instance) -> String {
    format!("added instance {}", i.name)
}

/// `instance list`.
pub fn instances(all: &[Instance]) -> String {
    all.iter().map(|i| format!("{}\n", i.name)).collect()
}

/// `instance show`.
pub fn instance(i: &Instance) -> String {
    format!("instance {}\n  created: {}", i.name, utc(i.created_at))
}

/// `binding add`.
pub fn binding_added(b: &Binding) -> String {
    format!("added binding {}/{}", b.instance, b.service)
}

/// One binding (`binding show`, `binding set-property`, a line of `binding list`): flags,
/// central properties, and whether the instance's view is in sync.
pub fn binding(b: &Binding) -> String {
    let props: Vec<String> = b
        .properties
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let view = match &b.view {
        Some(v) => format!(
            "synced at {}, {}",
            utc(v.synced_at),
            if v.in_sync {
                "in sync"
            } else {
                "out of date: run sync"
            }
        ),
        None => "never synced".to_string(),
    };
    format!(
        "{}/{}\tclosed: {}\tno-daemons: {}\tproperties: {}\tview: {view}\n",
        b.instance,
        b.service,
        yes_no(b.closed),
        yes_no(b.no_daemons),
        if props.is_empty() {
            "(none)".to_string()
        } else {
            props.join(" ")
        }
    )
}

/// `binding list`.
pub fn bindings(all: &[Binding]) -> String {
    all.iter().map(binding).collect()
}

/// `sync`.
pub fn sync_changes(changes: &[SyncChange]) -> String {
    changes
        .iter()
        .map(|c| {
            let what = if c.changed.is_empty() {
                "unchanged".to_string()
            } else {
                format!("updated {}", c.changed.join(", "))
            };
            format!("synced {}/{}: {what}\n", c.instance, c.service)
        })
        .collect()
}

/// `host plan`.
pub fn host_plan(plan: &[PlanEntry]) -> String {
    plan.iter()
        .map(|e| {
            format!(
                "{}/{}\t{}\t({}; devices: {})\n",
                e.instance,
                e.service,
                if e.run_daemons {
                    "run daemons"
                } else {
                    "no daemons"
                },
                e.reason,
                if e.devices.is_empty() {
                    "none".to_string()
                } else {
                    e.devices.join(",")
                }
            )
        })
        .collect()
}

/// `host restart`.
pub fn restarted(outcomes: &[RestartOutcome]) -> String {
    outcomes
        .iter()
        .map(|o| {
            let stopped = o
                .stopped
                .map(|pid| format!("stopped pid {pid}; "))
                .unwrap_or_default();
            format!(
                "{}/{} on {}: {stopped}{}\n",
                o.instance, o.service, o.device, o.detail
            )
        })
        .collect()
}

/// One repository of an observation pass (also each line the daemon prints).
pub fn observation(o: &Observation) -> String {
    format!("{}: {} ({})", o.repository, o.outcome, o.detail)
}

/// `observe`, `repo observe`.
pub fn observations(all: &[Observation]) -> String {
    if all.is_empty() {
        return "no observed repository".to_string();
    }
    all.iter().map(|o| observation(o) + "\n").collect()
}

/// `status`: the repositories in maintenance.
pub fn in_maintenance(repos: &[Repository]) -> String {
    if repos.is_empty() {
        return "no repository in maintenance".to_string();
    }
    repos
        .iter()
        .map(|r| {
            format!(
                "{}\tin maintenance since {}: {}\n",
                r.full_name(),
                utc(r.maintenance_since.unwrap_or(0)),
                r.maintenance_message.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// `events`.
pub fn events(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{}\t{}\t{}\t{}\t{}\n",
                utc(e.at),
                e.actor,
                e.action,
                e.subject,
                e.detail
            )
        })
        .collect()
}

/// `repo create`.
pub fn repo_created(r: &Repository) -> String {
    format!(
        "created {} on service {} ({})",
        r.full_name(),
        r.service,
        r.copies
            .iter()
            .map(|c| c.device.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `repo list`.
pub fn repos(all: &[Repository]) -> String {
    all.iter()
        .map(|r| {
            let state = if r.maintenance {
                format!(
                    "maintenance: {}",
                    r.maintenance_message.as_deref().unwrap_or("")
                )
            } else {
                "live".to_string()
            };
            format!("{}\tservice: {}\t{state}\n", r.full_name(), r.service)
        })
        .collect()
}

/// `repo show`, `repo thaw`: the repository and its copies' versions.
pub fn repo(repo: &Repository) -> String {
    let mut out = format!(
        "repository {}\n  service: {}\n  path: {}\n",
        repo.full_name(),
        repo.service,
        repo.path
    );
    if let Some(url) = &repo.upstream_url {
        out += &format!("  upstream: {url}\n");
    }
    if repo.maintenance {
        out += &format!(
            "  maintenance: since {}, message: {}\n",
            utc(repo.maintenance_since.unwrap_or(0)),
            repo.maintenance_message.as_deref().unwrap_or("")
        );
    } else {
        out += "  maintenance: no\n";
    }
    for copy in &repo.copies {
        out += &format!(
            "  copy on {} ({}): version {}\n",
            copy.device, copy.service, copy.version
        );
    }
    out
}

/// `repo maintenance --start MESSAGE`.
pub fn maintenance_started(r: &Repository, message: &str) -> String {
    format!(
        "{} is in maintenance: pushes are refused with {message:?}; no push in flight",
        r.full_name()
    )
}

/// `repo maintenance --stop`.
pub fn maintenance_stopped(r: &Repository) -> String {
    format!("{} is out of maintenance", r.full_name())
}

/// `repo clusterize`.
pub fn clusterized(c: &Clusterized) -> String {
    if c.changed {
        format!("{} moved from service {} to {}", c.repository, c.from, c.to)
    } else {
        format!("{} already on service {}", c.repository, c.to)
    }
}

/// `doctor`: one tab-separated line per finding (`PROBLEM` or `info`, kind, subject, detail,
/// what `--fix` did), then the counts.
pub fn doctor(report: &crate::doctor::Report) -> String {
    let mut out = String::new();
    for f in &report.findings {
        out += &format!(
            "{}\t{:?}\t{}\t{}{}\n",
            if f.problem { "PROBLEM" } else { "info" },
            f.kind,
            f.subject,
            f.detail,
            f.fixed
                .as_deref()
                .map(|x| format!(" [fixed: {x}]"))
                .unwrap_or_default()
        );
    }
    out + &format!("{} problems left, {} fixed", report.problems, report.fixed)
}

/// `migrate status`, and the head of `migrate`'s and `demo`'s summaries: the batch, then
/// one tab-separated line per repository.
pub fn migration(st: &MigrationStatus) -> String {
    let mut out = format!(
        "migration {} of {}: {} -> {}, {} ({} repositories)\n",
        st.id,
        st.instance,
        st.from,
        st.to,
        st.state.as_str(),
        st.repositories.len()
    );
    if let Some(gone) = &st.owner_gone {
        out.push_str(&format!(
            "  its driver is gone ({gone}): `shardmove migrate --resume {}` continues it\n",
            st.id
        ));
    }
    for r in &st.repositories {
        out.push_str(&format!(
            "  {}\t{}{}\t{} bytes\tread-only {}{}\n",
            r.repository,
            r.state.as_str(),
            r.step
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            r.bytes,
            r.readonly_seconds
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "-".into()),
            r.error
                .as_deref()
                .map(|e| format!("\terror: {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

/// `migrate --dry-run`: what would move, from where to where.
pub fn migration_plan(plan: &[RepoPlan], from: &str, to: &str) -> String {
    let mut out = format!(
        "plan: {} repositories from {from} to {to} (nothing changed)\n",
        plan.len()
    );
    for l in plan {
        out.push_str(&format!(
            "  {}\t{}:{} -> {} ({})\n",
            l.repository,
            l.source.device,
            l.source.path(&l.path),
            l.target.device,
            l.target.transfer_addr
        ));
    }
    out
}

/// `migrate`: the batch's status, then its outcome and read-only windows.
pub fn migration_summary(s: &MigrationSummary) -> String {
    format!(
        "{}migration {} {} in {:.1} s; read-only window median {:.2} s, max {:.2} s",
        migration(&s.status),
        s.id,
        s.state.as_str(),
        s.seconds,
        s.readonly_median_seconds.unwrap_or(0.0),
        s.readonly_max_seconds.unwrap_or(0.0)
    )
}

#[cfg(feature = "demo")]
/// `demo`: the migration's status, then what was verified and how the clients fared.
pub fn demo_summary(s: &crate::demo::DemoSummary) -> String {
    format!(
        "{}demo done: {} repositories moved and verified in {:.1} s; read-only window median {:.2} s, max {:.2} s; \
         background clones: {} ok, {} failed; status page was {}",
        migration(&s.migration.status),
        s.verified.len(),
        s.migration.seconds,
        s.migration.readonly_median_seconds.unwrap_or(0.0),
        s.migration.readonly_max_seconds.unwrap_or(0.0),
        s.clones_ok,
        s.clones_failed,
        s.status_url
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::migrate::ports::Endpoint;
    use crate::migrate::{BatchState, RepoProgress, RepoState};
    use crate::registry::{BindingView, WorkingCopy};
    use crate::repos::ObserveOutcome;

    /// 2026-11-25 15:44:30 UTC.
    const T: i64 = 1_795_621_470;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(T), "2026-11-25 15:44:30 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(
            progress_line(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(T as u64 * 1000 + 7),
                "go"
            ),
            "15:44:30.007 go"
        );
    }

    fn device_a1(fingerprint: Option<&str>) -> Device {
        Device {
            name: "a1".into(),
            service: "a".into(),
            host: "localhost".into(),
            transfer_addr: "127.0.0.1:7400".into(),
            root_path: "/srv/a".into(),
            fingerprint: fingerprint.map(str::to_string),
            fingerprints: fingerprint.iter().map(|f| f.to_string()).collect(),
            rotation: None,
            created_at: T,
        }
    }

    #[test]
    fn catalog_objects() {
        let service = Service {
            name: "a".into(),
            created_at: T,
            devices: vec!["a1".into(), "a2".into()],
        };
        assert_eq!(service_added(&service), "added service a");
        assert_eq!(
            services(std::slice::from_ref(&service)),
            "a\tdevices: a1,a2\n"
        );
        assert_eq!(
            super::service(&service),
            "service a\n  created: 2026-11-25 15:44:30 UTC\n  devices: a1, a2"
        );
        let d = device_a1(None);
        assert_eq!(device_added(&d), "added device a1 to service a");
        assert_eq!(
            devices(std::slice::from_ref(&d)),
            "a1\tservice: a\thost: localhost\ttransfer: 127.0.0.1:7400\troot: /srv/a\tpinned: (none)\n"
        );
        assert_eq!(
            device(&d),
            "device a1\n  service: a\n  host: localhost\n  transfer: 127.0.0.1:7400\n  root: /srv/a\n  fingerprint: (none)"
        );
        assert!(device(&device_a1(Some("ab:cd"))).ends_with("fingerprint: ab:cd"));
        let mut rotating = device_a1(Some("aa"));
        rotating.rotation = Some(crate::registry::KeyRotation {
            old: "aa".into(),
            new: "bb".into(),
            stage: RotationStage::Preferred,
            since: T,
        });
        rotating.fingerprints = vec!["bb".into(), "aa".into()];
        assert!(
            devices(std::slice::from_ref(&rotating))
                .ends_with("\tpinned: bb,aa (key rotation under way)\n"),
            "{}",
            devices(std::slice::from_ref(&rotating))
        );
        assert!(
            device(&rotating).ends_with(
                "fingerprint: aa\n  key rotation: to bb (the new key preferred, since \
                 2026-11-25 15:44:30 UTC)\n  pinned: bb, aa"
            ),
            "{}",
            device(&rotating)
        );
        let report = RotationReport {
            device: "a1".into(),
            step: "preferred",
            fingerprint: Some("aa".into()),
            fingerprints: vec!["bb".into(), "aa".into()],
            rotation: rotating.rotation.clone(),
            check: Some(crate::keys::ServedCheck {
                addr: "127.0.0.1:7400".into(),
                asked_for: "bb".into(),
                presented: "bb".into(),
                primary: "aa".into(),
            }),
            unpinned: None,
            next: "make it primary".into(),
        };
        assert_eq!(
            key_rotation(&report),
            "device a1: the new key is now preferred\n  checked: its shardrecv at 127.0.0.1:7400 \
             presents bb when asked for it (its primary: aa)\n  pinned (senders accept these, \
             the first preferred): bb, aa\nnext: make it primary\n"
        );
        let i = Instance {
            name: "t".into(),
            created_at: T,
        };
        assert_eq!(instance_added(&i), "added instance t");
        assert_eq!(instances(&[i.clone(), i.clone()]), "t\nt\n");
        assert_eq!(
            instance(&i),
            "instance t\n  created: 2026-11-25 15:44:30 UTC"
        );
    }

    #[test]
    fn bindings_show_flags_properties_and_the_view() {
        let mut properties = BTreeMap::new();
        properties.insert("closed".to_string(), "true".to_string());
        properties.insert("weight".to_string(), "3".to_string());
        let synced = Binding {
            instance: "t".into(),
            service: "a".into(),
            properties: properties.clone(),
            closed: true,
            no_daemons: false,
            view: Some(BindingView {
                synced_at: T,
                properties,
                in_sync: true,
            }),
        };
        assert_eq!(binding_added(&synced), "added binding t/a");
        assert_eq!(
            binding(&synced),
            "t/a\tclosed: yes\tno-daemons: no\tproperties: closed=true weight=3\t\
             view: synced at 2026-11-25 15:44:30 UTC, in sync\n"
        );
        let stale = Binding {
            view: Some(BindingView {
                synced_at: T,
                properties: BTreeMap::new(),
                in_sync: false,
            }),
            ..synced.clone()
        };
        assert!(binding(&stale)
            .ends_with("view: synced at 2026-11-25 15:44:30 UTC, out of date: run sync\n"));
        let fresh = Binding {
            service: "b".into(),
            properties: BTreeMap::new(),
            closed: false,
            no_daemons: true,
            view: None,
            ..synced.clone()
        };
        assert_eq!(
            bindings(&[fresh]),
            "t/b\tclosed: no\tno-daemons: yes\tproperties: (none)\tview: never synced\n"
        );
        assert_eq!(
            sync_changes(&[
                SyncChange {
                    instance: "t".into(),
                    service: "a".into(),
                    changed: vec![],
                },
                SyncChange {
                    instance: "t".into(),
                    service: "b".into(),
                    changed: vec!["closed".into(), "no-daemons".into()],
                },
            ]),
            "synced t/a: unchanged\nsynced t/b: updated closed, no-daemons\n"
        );
    }

    #[test]
    fn daemons_plan_restart_and_observation() {
        let plan = [
            PlanEntry {
                instance: "t".into(),
                service: "a".into(),
                devices: vec!["a1".into(), "a2".into()],
                run_daemons: true,
                reason: "open".into(),
            },
            PlanEntry {
                instance: "t".into(),
                service: "b".into(),
                devices: vec![],
                run_daemons: false,
                reason: "service has no device".into(),
            },
        ];
        assert_eq!(
            host_plan(&plan),
            "t/a\trun daemons\t(open; devices: a1,a2)\n\
             t/b\tno daemons\t(service has no device; devices: none)\n"
        );
        let outcome = RestartOutcome {
            instance: "t".into(),
            service: "a".into(),
            device: "a1".into(),
            stopped: Some(41),
            started: Some(42),
            detail: "started pid 42".into(),
        };
        assert_eq!(
            restarted(&[
                outcome.clone(),
                RestartOutcome {
                    stopped: None,
                    ..outcome
                }
            ]),
            "t/a on a1: stopped pid 41; started pid 42\nt/a on a1: started pid 42\n"
        );
        assert_eq!(observations(&[]), "no observed repository");
        let seen = Observation {
            repository: "t/r".into(),
            outcome: ObserveOutcome::Skipped,
            detail: "in maintenance: moving".into(),
        };
        assert_eq!(observation(&seen), "t/r: skipped (in maintenance: moving)");
        assert_eq!(
            observations(&[seen]),
            "t/r: skipped (in maintenance: moving)\n"
        );
    }

    fn repository(maintenance: bool) -> Repository {
        Repository {
            instance: "t".into(),
            name: "r".into(),
            service: "a".into(),
            path: "t/r.git".into(),
            upstream_url: None,
            maintenance,
            maintenance_message: maintenance.then(|| "moving to b".to_string()),
            maintenance_since: maintenance.then_some(T),
            created_at: T,
            copies: vec![
                WorkingCopy {
                    device: "a1".into(),
                    service: "a".into(),
                    version: 2,
                    updated_at: T,
                },
                WorkingCopy {
                    device: "b1".into(),
                    service: "b".into(),
                    version: 0,
                    updated_at: T,
                },
            ],
        }
    }

    #[test]
    fn repositories() {
        let live = repository(false);
        let frozen = repository(true);
        assert_eq!(repo_created(&live), "created t/r on service a (a1, b1)");
        assert_eq!(
            repos(&[live.clone(), frozen.clone()]),
            "t/r\tservice: a\tlive\nt/r\tservice: a\tmaintenance: moving to b\n"
        );
        assert_eq!(
            repo(&live),
            "repository t/r\n  service: a\n  path: t/r.git\n  maintenance: no\n\
             \x20 copy on a1 (a): version 2\n  copy on b1 (b): version 0\n"
        );
        let observed = Repository {
            upstream_url: Some("https://example.org/r.git".into()),
            copies: vec![],
            ..frozen.clone()
        };
        assert_eq!(
            repo(&observed),
            "repository t/r\n  service: a\n  path: t/r.git\n  upstream: https://example.org/r.git\n\
             \x20 maintenance: since 2026-11-25 15:44:30 UTC, message: moving to b\n"
        );
        assert_eq!(in_maintenance(&[]), "no repository in maintenance");
        assert_eq!(
            in_maintenance(std::slice::from_ref(&frozen)),
            "t/r\tin maintenance since 2026-11-25 15:44:30 UTC: moving to b\n"
        );
        assert_eq!(
            maintenance_started(&frozen, "say \"hi\""),
            "t/r is in maintenance: pushes are refused with \"say \\\"hi\\\"\"; no push in flight"
        );
        assert_eq!(maintenance_stopped(&live), "t/r is out of maintenance");
        let moved = Clusterized {
            repository: "t/r".into(),
            from: "a".into(),
            to: "b".into(),
            changed: true,
        };
        assert_eq!(clusterized(&moved), "t/r moved from service a to b");
        assert_eq!(
            clusterized(&Clusterized {
                changed: false,
                ..moved
            }),
            "t/r already on service b"
        );
        assert_eq!(
            events(&[Event {
                id: 1,
                at: T,
                actor: "ops".into(),
                action: "repo.create".into(),
                subject: "repo:t/r".into(),
                detail: "service=a devices=a1".into(),
            }]),
            "2026-11-25 15:44:30 UTC\tops\trepo.create\trepo:t/r\tservice=a devices=a1\n"
        );
    }

    #[test]
    fn doctor_findings_and_counts() {
        use crate::doctor::{Finding, Kind, Report};
        let report = Report {
            findings: vec![
                Finding {
                    kind: Kind::StaleCopyWritable,
                    subject: "a1:/srv/a/t/r.git".into(),
                    detail: "takes pushes".into(),
                    problem: true,
                    fixed: Some("hook installed".into()),
                },
                Finding {
                    kind: Kind::Aside,
                    subject: "b1:/srv/b/t/r.git.replaced-1".into(),
                    detail: "3 days old".into(),
                    problem: false,
                    fixed: None,
                },
            ],
            problems: 0,
            fixed: 1,
        };
        assert_eq!(
            doctor(&report),
            "PROBLEM\tStaleCopyWritable\ta1:/srv/a/t/r.git\ttakes pushes [fixed: hook installed]\n\
             info\tAside\tb1:/srv/b/t/r.git.replaced-1\t3 days old\n\
             0 problems left, 1 fixed"
        );
        let clean = Report {
            findings: vec![],
            problems: 0,
            fixed: 0,
        };
        assert_eq!(doctor(&clean), "0 problems left, 0 fixed");
    }

    fn status() -> MigrationStatus {
        let progress = RepoProgress {
            repository: "t/r1".into(),
            state: RepoState::Done,
            step: None,
            error: None,
            source_device: "a1".into(),
            target_device: "b1".into(),
            bytes: 1234,
            sent_bytes: 1300,
            frozen_at_ms: Some(1000),
            thawed_at_ms: Some(1420),
            readonly_seconds: Some(0.42),
        };
        MigrationStatus {
            id: 7,
            plane: "builtin".into(),
            instance: "t".into(),
            from: "a".into(),
            to: "b".into(),
            message: "moving".into(),
            state: BatchState::Incomplete,
            created_at: T,
            updated_at: T,
            finished_at: Some(T),
            owner: None,
            owner_gone: None,
            repositories: vec![
                progress.clone(),
                RepoProgress {
                    repository: "t/r2".into(),
                    state: RepoState::RolledBack,
                    step: Some("final_copy".into()),
                    error: Some("shardsend failed".into()),
                    bytes: 0,
                    readonly_seconds: None,
                    ..progress
                },
            ],
            counts: HashMap::new(),
        }
    }

    #[test]
    fn migrations() {
        let st = status();
        assert_eq!(
            migration(&st),
            "migration 7 of t: a -> b, incomplete (2 repositories)\n\
             \x20 t/r1\tdone\t1234 bytes\tread-only 0.42 s\n\
             \x20 t/r2\trolled_back (final_copy)\t0 bytes\tread-only -\terror: shardsend failed\n"
        );
        let gone = MigrationStatus {
            state: BatchState::Running,
            owner_gone: Some("pid 9 on h is not running".into()),
            repositories: vec![],
            ..st.clone()
        };
        assert_eq!(
            migration(&gone),
            "migration 7 of t: a -> b, running (0 repositories)\n\
             \x20 its driver is gone (pid 9 on h is not running): `shardmove migrate --resume 7` continues it\n"
        );
        let summary = MigrationSummary {
            id: 7,
            state: BatchState::Incomplete,
            seconds: 12.34,
            status: st.clone(),
            readonly_median_seconds: Some(0.42),
            readonly_max_seconds: None,
        };
        assert_eq!(
            migration_summary(&summary),
            format!(
                "{}migration 7 incomplete in 12.3 s; read-only window median 0.42 s, max 0.00 s",
                migration(&st)
            )
        );
        let end = |device: &str, root: &str| Endpoint {
            device: device.into(),
            host: "localhost".into(),
            root: root.into(),
            transfer_addr: format!("{device}.example:7400"),
            fingerprints: Vec::new(),
        };
        let plan = [RepoPlan {
            repository: "t/r1".into(),
            path: "t/r1.git".into(),
            source: end("a1", "/srv/a/"),
            target: end("b1", "/srv/b"),
        }];
        assert_eq!(
            migration_plan(&plan, "a", "b"),
            "plan: 1 repositories from a to b (nothing changed)\n\
             \x20 t/r1\ta1:/srv/a/t/r1.git -> b1 (b1.example:7400)\n"
        );
        assert_eq!(
            migration_plan(&[], "a", "b"),
            "plan: 0 repositories from a to b (nothing changed)\n"
        );
        #[cfg(feature = "demo")]
        demo_summary_follows_the_migration(summary, &st);
    }

    #[cfg(feature = "demo")]
    fn demo_summary_follows_the_migration(summary: MigrationSummary, st: &MigrationStatus) {
        let demo = crate::demo::DemoSummary {
            work_dir: "/tmp/d".into(),
            network: "loopback".into(),
            status_url: "http://127.0.0.1:1/".into(),
            migration: summary,
            clones_ok: 5,
            clones_failed: 0,
            verified: vec!["t/r1".into()],
        };
        assert_eq!(
            demo_summary(&demo),
            format!(
                "{}demo done: 1 repositories moved and verified in 12.3 s; read-only window median 0.42 s, \
                 max 0.00 s; background clones: 5 ok, 0 failed; status page was http://127.0.0.1:1/",
                migration(st)
            )
        );
    }
}
