//! Issue 15, item 2: `shardmove device rotate-key` walks B's receiver from its old key to a new
//! one while a `migrate` batch moves repositories to it: every step is checked against the real
//! shardrecv, refused when out of order or when the receiver does not serve the key, recorded in
//! the audit log; and the batch, whose passes run before, during and after the steps (the old
//! key dropped from the receiver before its last ones), moves every repository.

use std::time::Duration;

use transfer::identity::Fingerprint;

use super::*;

/// The key B's shardrecv presents when asked for `prefer` (nothing: its primary).
fn presented(addr: &str, prefer: &[&str]) -> Option<String> {
    let prefer: Vec<Fingerprint> = prefer
        .iter()
        .map(|p| Fingerprint::parse(p).expect("fingerprint"))
        .collect();
    let addr = addr.parse().expect("address");
    crate::util::block_on(transfer::quic::probe(addr, &prefer, Duration::from_secs(5)))
        .ok()
        .map(|fp| fp.to_string())
}

/// Writes B's receiver config with these identity files (in the test's directory, the first
/// primary) and reloads it; returns once `ready` holds for what it serves.
fn reload(env: &Env, shards: &Shards, identities: &[&str], ready: impl Fn() -> bool) {
    write_config(env, identities);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(shards.recv.id() as libc::pid_t, libc::SIGHUP) };
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "shardrecv did not serve {identities:?} after its reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(env: &Env, identities: &[&str]) {
    let list: Vec<String> = identities.iter().map(|i| format!("{i:?}")).collect();
    std::fs::write(
        env.path("shardrecv.toml"),
        format!("identity = [{}]\nallow = \"allow.txt\"\n", list.join(", ")),
    )
    .unwrap();
}

pub(crate) fn device_rotate_key_walks_the_steps_while_a_migration_runs(env: &Env) {
    // B's receiver reads its keys from the config file: recv.key (made by setup) to begin with.
    write_config(env, &["recv.key"]);
    let layout = Layout {
        recv_config: Some("shardrecv.toml"),
        ..LOCAL
    };
    let names = ["r1", "r2", "r3", "r4"];
    let repos: Vec<(&str, usize)> = names.iter().map(|n| (*n, 0)).collect();
    let shards = setup_on(env, &repos, &layout);
    let b1 = env.json(&["device", "show", "b1"]);
    let old = b1["fingerprint"]
        .as_str()
        .expect("b1 has a key")
        .to_string();
    let addr = b1["transfer_addr"].as_str().unwrap().to_string();
    assert_eq!(b1["fingerprints"], serde_json::json!([old]));
    assert_eq!(b1["rotation"], Value::Null);
    let new = keygen("shardrecv", &env.path("recv-new.key"));
    // Bytes git cannot compress, so each repository takes seconds at --bwlimit 1M.
    for (n, name) in names.iter().enumerate() {
        let work = env.path(&format!("work-{name}"));
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ n as u64;
        let data: Vec<u8> = (0..(3 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(work.join("random.bin"), data).unwrap();
        git_ok(&work, &["add", "random.bin"]);
        git_ok(&work, &["commit", "-q", "-m", "random"]);
        git_ok(&work, &["push", "-q", "origin", "HEAD"]);
    }
    let before: Vec<String> = names
        .iter()
        .map(|r| refs(&shards.a.join(format!("t/{r}.git"))))
        .collect();

    // Bad input and steps out of order change nothing.
    let snapshot = env.snapshot();
    assert!(env
        .fails(&["device", "rotate-key", "nosuch", "--add", &new], 3)
        .contains("unknown device"));
    assert!(env
        .fails(&["device", "rotate-key", "b1", "--add", "c0ffee"], 2)
        .contains("64 hex digits"));
    for step in ["--prefer", "--finish", "--abort"] {
        let err = env.fails(&["device", "rotate-key", "b1", step], 5);
        assert!(err.contains("no key rotation of device b1"), "{err}");
    }
    assert!(env
        .fails(&["device", "rotate-key", "a1", "--add", &new], 5)
        .contains("no key pinned"));
    assert!(env
        .fails(&["device", "rotate-key", "b1", "--add", &old], 5)
        .contains("already device b1's key"));
    env.fails(&["device", "rotate-key", "b1", "--prefer", "--finish"], 2);
    assert_eq!(env.snapshot(), snapshot);
    let status = env.json(&["device", "rotate-key", "b1"]);
    assert_eq!(status["step"], "status");
    assert!(
        status["next"].as_str().unwrap().contains("--add"),
        "{status}"
    );

    // A batch starts (rate-limited, one repository at a time: it outlasts the rotation).
    let args = migrate_args(&shards, &["--json", "--parallel", "1", "--bwlimit", "1M"]);
    let refs_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut batch = env
        .sm_command(&refs_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start migrate");
    let staging = shards.b.join(".shardrecv");
    let t0 = Instant::now();
    while std::fs::read_dir(&staging).map_or(0, |d| d.count()) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the batch never sent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // 1. Pin the new key beside the old one.
    let added = env.json(&["device", "rotate-key", "b1", "--add", &new.to_uppercase()]);
    assert_eq!(added["step"], "added");
    assert_eq!(added["fingerprints"], serde_json::json!([old, new]));
    assert_eq!(added["rotation"]["stage"], "added");
    assert!(
        added["next"].as_str().unwrap().contains("--prefer"),
        "{added}"
    );
    let shown = env.ok(&["device", "show", "b1"]);
    assert!(shown.contains(&format!("pinned: {old}, {new}")), "{shown}");
    let listed = env.ok(&["device", "list"]);
    assert!(
        listed.contains(&format!("pinned: {old},{new} (key rotation under way)")),
        "{listed}"
    );
    // A second new key, or preferring a key the receiver does not serve yet: refused.
    let other = keygen("shardrecv", &env.path("recv-other.key"));
    assert!(env
        .fails(&["device", "rotate-key", "b1", "--add", &other], 5)
        .contains("already under way"));
    let err = env.fails(&["device", "rotate-key", "b1", "--prefer"], 5);
    assert!(
        err.contains(&format!("does not serve the key {new}")) && err.contains(&old),
        "{err}"
    );
    assert_eq!(
        env.json(&["device", "show", "b1"])["rotation"]["stage"],
        "added"
    );

    // The receiver gets both keys, the old one first.
    reload(env, &shards, &["recv.key", "recv-new.key"], || {
        presented(&addr, &[&new]).as_deref() == Some(new.as_str())
    });

    // 2. Prefer the new key: checked against the receiver.
    let preferred = env.json(&["device", "rotate-key", "b1", "--prefer"]);
    assert_eq!(preferred["fingerprints"], serde_json::json!([new, old]));
    assert_eq!(preferred["check"]["presented"], new.as_str());
    assert_eq!(preferred["check"]["primary"], old.as_str());
    assert!(preferred["next"].as_str().unwrap().contains("--finish"));
    reload(env, &shards, &["recv-new.key", "recv.key"], || {
        presented(&addr, &[]).as_deref() == Some(new.as_str())
    });

    // 3. Finish: only the new key pinned; then the receiver drops the old one.
    let finished = env.json(&["device", "rotate-key", "b1", "--finish"]);
    assert_eq!(finished["fingerprints"], serde_json::json!([new]));
    assert_eq!(finished["fingerprint"], new.as_str());
    assert_eq!(finished["unpinned"], old.as_str());
    assert_eq!(finished["rotation"], Value::Null);
    assert_eq!(finished["check"]["primary"], new.as_str());
    reload(env, &shards, &["recv-new.key"], || {
        presented(&addr, &[&old]).as_deref() == Some(new.as_str())
    });
    assert!(
        batch.try_wait().expect("batch").is_none(),
        "the batch ended before the rotation did: it did not overlap"
    );
    let err = env.fails(&["device", "rotate-key", "b1", "--finish"], 5);
    assert!(err.contains("no key rotation"), "{err}");

    // Going back: a rotation to a key never given to the receiver is aborted (the receiver
    // still serving the device's key is checked first).
    env.json(&["device", "rotate-key", "b1", "--add", &other]);
    let aborted = env.json(&["device", "rotate-key", "b1", "--abort"]);
    assert_eq!(aborted["fingerprints"], serde_json::json!([new]));
    assert_eq!(aborted["unpinned"], other.as_str());
    assert!(env
        .ok(&["device", "rotate-key", "b1"])
        .contains("no key rotation under way"));

    // The batch, whose later passes ran after the old key was gone, moved everything.
    let out = batch.wait_with_output().expect("batch");
    assert!(
        out.status.success(),
        "migrate failed during the rotation: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, refs_before) in names.iter().zip(&before) {
        assert_moved(env, &shards, name, refs_before);
    }
    let status = env.json(&["migrate", "status"]);
    for r in status["repositories"].as_array().unwrap() {
        assert_eq!(r["state"], "done", "{r}");
    }

    // Each step is in the audit log.
    let events = env.json(&["events", "--subject", "device:b1"]);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("device.key."))
        .collect();
    for want in [
        "device.key.add",
        "device.key.prefer",
        "device.key.finish",
        "device.key.abort",
    ] {
        assert!(actions.contains(&want), "{want} missing: {actions:?}");
    }
}
