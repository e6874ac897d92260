//! `shardmove demo` end to end: the verified migration it runs, its two network modes
//! (network namespaces as root, loopback otherwise or with `--no-netns`), and that no
//! namespace outlives it, however it ends (success, failure, SIGINT with `--keep-serving`).
//! The demo always uses its own embedded SQLite registry, so these are not contract tests.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{to_run, Env, Run, BIN};

fn tools_built() {
    for name in ["shardsend", "shardrecv"] {
        let p = Path::new(BIN).with_file_name(name);
        assert!(
            p.is_file(),
            "{} is missing: run the workspace tests (`cargo test --workspace`) so the transfer binaries are built",
            p.display()
        );
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn demo(env: &Env, args: &[&str]) -> Run {
    tools_built();
    to_run(
        env.sm_command(&[&["demo"], args].concat())
            .output()
            .expect("run shardmove demo"),
    )
}

/// The demo's one `network: ...` line.
#[track_caller]
fn mode_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" network: "))
        .collect();
    assert_eq!(lines.len(), 1, "one network mode line expected: {stderr}");
    lines[0]
}

/// As root the demo must run in network namespaces; otherwise in loopback mode (the skip is
/// printed, with the demo's reason). Returns the namespaces it names (none on loopback).
#[track_caller]
fn assert_mode(stderr: &str, forced_loopback: bool) -> Vec<String> {
    let line = mode_line(stderr);
    if is_root() && !forced_loopback {
        assert!(
            line.contains("network: namespaces shardmove-demo-"),
            "running as root, the demo must use network namespaces: {line}"
        );
        let names: Vec<String> = line
            .split_whitespace()
            .filter(|w| w.starts_with("shardmove-demo-"))
            .map(str::to_string)
            .collect();
        assert_eq!(names.len(), 2, "{line}");
        assert!(
            names[0].ends_with("-a") && names[1].ends_with("-b"),
            "{line}"
        );
        // Each daemon listens inside its own namespace, on its veth address.
        for (host, ns) in ["shard-a", "shard-b"].iter().zip(&names) {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.contains(&format!("{host}: shardrecv on 10."))
                        && l.ends_with(&format!("in netns:{ns}"))),
                "{host} not in {ns}: {stderr}"
            );
        }
        names
    } else {
        assert!(line.contains("network: loopback"), "{line}");
        if forced_loopback {
            assert!(line.contains("--no-netns"), "{line}");
        } else {
            println!("network namespace path skipped: {line}");
        }
        Vec::new()
    }
}

fn netns_list() -> Vec<String> {
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// No namespace of this demo run (nor its veth, which lives and dies with them) is left.
#[track_caller]
fn assert_gone(names: &[String]) {
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "network namespaces left behind: {left:?}");
}

#[test]
fn demo_runs_a_verified_migration() {
    let env = Env::sqlite();
    let run = demo(&env, &["--repos", "3", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let names = assert_mode(&run.stderr, false);
    let s: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(s["migration"]["state"], "done");
    assert_eq!(s["verified"].as_array().map(Vec::len), Some(3));
    assert_eq!(s["clones_failed"], 0);
    assert_eq!(
        s["network"],
        if names.is_empty() {
            "loopback"
        } else {
            "namespaces"
        }
    );
    assert_gone(&names);
}

#[test]
fn demo_no_netns_runs_on_loopback() {
    let env = Env::sqlite();
    let run = demo(&env, &["--repos", "1", "--no-netns", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_mode(&run.stderr, true);
    let s: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(s["network"], "loopback");
    assert_eq!(s["verified"].as_array().map(Vec::len), Some(1));
    assert!(
        run.stderr.contains("shard-b: shardrecv on 127.0.0.1:"),
        "{}",
        run.stderr
    );
}

/// The demo fails after both daemons run in their namespaces (its fixtures cannot be
/// written): the processes are killed and the namespaces removed all the same.
#[test]
fn demo_failing_midway_leaves_no_namespace() {
    let env = Env::sqlite();
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("upstreams"), "not a directory").unwrap();
    let run = demo(
        &env,
        &["--repos", "1", "--dir", work.to_str().expect("utf-8 path")],
    );
    assert_eq!(run.code, 5, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("making fixture r01"), "{}", run.stderr);
    let names = assert_mode(&run.stderr, false);
    assert_gone(&names);
}

/// With `--keep-serving` the hosts stay up (inside their namespaces, as root) until SIGINT,
/// then everything goes.
#[test]
fn demo_keep_serving_stops_on_sigint_and_leaves_no_namespace() {
    tools_built();
    let env = Env::sqlite();
    let mut child = env
        .sm_command(&["demo", "--repos", "1", "--keep-serving", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardmove demo");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("demo never reached serving: {seen}");
            }
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("until Ctrl-C") {
            break;
        }
    }
    let names = assert_mode(&seen, false);
    if !names.is_empty() {
        let live = netns_list();
        for name in &names {
            assert!(live.contains(name), "{name} not up while serving: {live:?}");
            let pids = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .expect("ip netns pids");
            assert!(
                !String::from_utf8_lossy(&pids.stdout).trim().is_empty(),
                "no shardrecv inside {name} while serving"
            );
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) },
        0,
        "sending SIGINT"
    );
    let out = child.wait_with_output().expect("wait for demo");
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(out.status.code(), Some(0), "{seen}{}", rest.join("\n"));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["verified"].as_array().map(Vec::len), Some(1));
    assert_gone(&names);
}
