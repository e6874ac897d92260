//! Issue 15, item 1: `migrate --ticket-key` against a receiver that requires tickets; the
//! same receiver refuses a migration that brings none, and the repository stays on A.

use super::*;

pub(crate) fn migrate_signs_a_ticket_for_every_pass_and_a_ticketed_receiver_needs_one(env: &Env) {
    let orchestrator_key = env.path("orchestrator.key");
    let signer = keygen("shardsend", &orchestrator_key);
    let recv_args = ["--ticket-signer", signer.as_str()];
    let layout = Layout {
        recv_args: &recv_args,
        ..LOCAL
    };
    let shards = setup_on(env, &[("r1", 1), ("r2", 0)], &layout);

    // Without tickets: every pre-copy is refused, nothing is frozen, all stays on A.
    let run = run_migrate(env, &shards, &["--json"]);
    for r in &all_rolled_back(env, &run) {
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains("requires a transfer ticket"), "{error}");
        let name = r["repository"].as_str().unwrap_or_default();
        assert_left_writable_on_a(env, &shards, name.trim_start_matches("t/"), r);
    }

    // With them: the next run moves both (with the pushes A took meanwhile).
    let before: Vec<String> = ["r1", "r2"]
        .iter()
        .map(|r| refs(&shards.a.join(format!("t/{r}.git"))))
        .collect();
    let key = orchestrator_key.display().to_string();
    let run = run_migrate(env, &shards, &["--json", "--ticket-key", &key]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_moved(env, &shards, "r1", &before[0]);
    assert_moved(env, &shards, "r2", &before[1]);
}
