//! `shardmove doctor` (issue 15, item 5): every kind of disagreement between disk and
//! registry, planted by hand, is found; `--fix` repairs the safe ones, with an event each.

use super::*;

fn doctor(env: &Env, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let run = env.sm(&all);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}{}", run.stdout, run.stderr));
    (run.code, report)
}

fn kinds(report: &Value, problems_only: bool) -> Vec<String> {
    let mut out: Vec<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !problems_only || (f["problem"] == true && f["fixed"].is_null()))
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

pub(super) fn doctor_finds_every_planted_problem_and_fixes_the_safe_ones(env: &Env) {
    let shards = setup(env, &[("moved", 0), ("live", 0), ("held", 0), ("stray", 0)]);
    // A clean registry: nothing to say.
    let (code, report) = doctor(env, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["problems"], 0, "{report}");

    // `moved` goes to B: A keeps a stale copy (information, with its hook).
    let run = run_migrate(
        env,
        &shards,
        &["--repos", "t/moved", "--no-restart-daemons"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (code, report) = doctor(env, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(kinds(&report, false), ["stale_copy"]);

    // Planted: the stale copy loses its hook (it would take pushes)...
    let a_moved = shards.a.join("t/moved.git");
    std::fs::remove_file(a_moved.join("hooks/pre-receive")).unwrap();
    // ...a writable repository gets our hook...
    let stray = shards.a.join("t/stray.git/hooks/pre-receive");
    std::fs::write(
        &stray,
        "#!/bin/sh\n# shardmove-maintenance-hook: left behind\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&stray, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // ...a repository in maintenance loses its hook (it takes pushes), for too long...
    env.ok(&["repo", "maintenance", "t/held", "--start", "held by hand"]);
    std::fs::remove_file(shards.a.join("t/held.git/hooks/pre-receive")).unwrap();
    // ...staging nobody will resume, and old moved-aside copies on B.
    std::fs::create_dir_all(
        shards
            .b
            .join(".shardrecv/0123456789abcdef0123456789abcdef/tree"),
    )
    .unwrap();
    let aside = shards.b.join("t/old.git.rolled-back-1");
    std::fs::create_dir_all(&aside).unwrap();
    let out = Command::new("touch")
        .args(["-d", "30 days ago"])
        .arg(&aside)
        .status()
        .unwrap();
    assert!(out.success());
    // ...and a batch whose driver died (killed before it did anything).
    let args = migrate_args(&shards, &["--repos", "t/live", "--no-restart-daemons"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let killed = env
        .sm_command(&args)
        .env("SHARDMOVE_FAILPOINTS", "after-journal-step")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(killed.status.signal(), Some(9));

    std::thread::sleep(Duration::from_millis(1100));
    let (code, report) = doctor(env, &["--max-maintenance", "0"]);
    assert_eq!(code, 10, "{report}");
    assert_eq!(
        kinds(&report, true),
        [
            "aside",
            "driver_gone",
            "hook_without_maintenance",
            "long_maintenance",
            "maintenance_without_hook",
            "orphaned_staging",
            "stale_copy_writable",
        ],
        "{report:#}"
    );
    // The dead driver's batch is taken over; its pre-copy staging, while it waits for the
    // final pass, is never called orphaned (the batch will resume it).
    let args = migrate_args(&shards, &["--repos", "t/live", "--no-restart-daemons"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let killed = env
        .sm_command(&args)
        .env("SHARDMOVE_FAILPOINTS", "after-journal-precopied")
        .output()
        .unwrap();
    assert_eq!(killed.status.signal(), Some(9));
    let (_, report) = doctor(env, &["--max-maintenance", "0"]);
    let orphans = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "orphaned_staging")
        .count();
    assert_eq!(
        orphans, 1,
        "only the planted staging is orphaned: {report:#}"
    );
    let run = run_migrate(env, &shards, &["--repos", "t/live", "--no-restart-daemons"]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    // --fix repairs what is safe; the maintenance flag stays (an operator may mean it).
    let (code, report) = doctor(env, &["--fix", "--max-maintenance", "0"]);
    assert_eq!(code, 10, "{report:#}");
    assert_eq!(
        kinds(&report, true),
        ["long_maintenance", "maintenance_without_hook"],
        "{report:#}"
    );
    assert!(report["fixed"].as_u64().unwrap() >= 4, "{report:#}");
    assert!(!stray.exists(), "the stray hook removed");
    assert!(!aside.exists(), "aside past the retention removed");
    assert!(!shards
        .b
        .join(".shardrecv/0123456789abcdef0123456789abcdef")
        .exists());
    let msg = std::fs::read_to_string(a_moved.join("hooks/shardmove-maintenance.msg")).unwrap();
    assert!(
        msg.contains("this copy is stale: t/moved moved to service b"),
        "{msg}"
    );
    let events = env.json(&["events", "--limit", "50"]);
    let fixes = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "doctor.fix")
        .count();
    assert_eq!(
        fixes as u64,
        report["fixed"].as_u64().unwrap(),
        "{events:#}"
    );
    // The operator lifts the flag: all clean.
    env.ok(&["repo", "maintenance", "t/held", "--stop"]);
    let (code, report) = doctor(env, &[]);
    assert_eq!(code, 0, "{report:#}");
}
