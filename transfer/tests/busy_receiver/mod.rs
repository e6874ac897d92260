//! A receiver at its transfer limit makes senders wait in line, never fail (issue 10 item 4):
//! every transfer finishes, no more than the limit are ever active at once (the receiver
//! logs the observed maximum, `max_active`), and a sender is told its place.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::*;

/// The largest `max_active=N` the receiver logged.
fn logged_max_active(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("max_active=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// `senders` concurrent transfers of `size`-byte trees, each paced at `bwlimit` so they
/// overlap, into one receiver (`limit` slots, or its default when `None`).
fn senders_wait_in_line(limit: Option<usize>, senders: usize, size: usize, bwlimit: &str) {
    let keys = Keys::new();
    let root = keys.path("root");
    let limit_arg = limit.map(|l| l.to_string());
    let extra: Vec<&str> = match &limit_arg {
        Some(l) => vec!["--max-transfers", l],
        None => vec![],
    };
    let d = Daemon::start_with(&keys, &root, "127.0.0.1:0", &[], &extra);
    let limit = limit.unwrap_or(transfer::recv::DEFAULT_MAX_TRANSFERS) as u64;
    // One source tree for everyone: the receiver still writes `senders` copies.
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), size, 1);
    std::fs::write(src.join("packed-refs"), "x refs/heads/main\n").unwrap();

    let started = Instant::now();
    let children: Vec<_> = (0..senders)
        .map(|i| {
            send_cmd(
                &keys,
                &src,
                &d.addr,
                &format!("r{i}.git"),
                &["--bwlimit", bwlimit, "--compress", "off"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    let mut queued_senders = 0;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!("r{i}: {}", stderr(&out)));
            continue;
        }
        let j = json(&out);
        if stderr(&out).contains(r#""event":"queued""#) {
            queued_senders += 1;
            assert!(j["queued_seconds"].as_f64().unwrap() > 0.0, "{j}");
            assert!(
                stderr(&out).contains(r#""event":"admitted""#),
                "{}",
                stderr(&out)
            );
        }
    }
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    for i in 0..senders {
        assert_same_tree(&src, &root.join(format!("r{i}.git")));
    }
    let max_active = logged_max_active(&d.log());
    eprintln!(
        "{senders} senders into a receiver of {limit} slots: all done in {:.1} s, \
         {queued_senders} waited in line, at most {max_active} active at once",
        elapsed.as_secs_f64()
    );
    assert!(
        max_active >= 1,
        "the receiver logged no admission: {}",
        d.log()
    );
    assert!(
        max_active <= limit,
        "{max_active} active at once, limit {limit}"
    );
    assert!(
        queued_senders > 0,
        "nobody waited: the limit was not exercised"
    );
    assert!(elapsed < Duration::from_secs(240), "took {elapsed:?}");
}

#[test]
fn busy_receiver_makes_senders_wait_in_line_and_none_fails() {
    senders_wait_in_line(Some(6), 10, 3 << 20, "2M");
}

/// The case of issue 10: 50 concurrent `shardsend`s of 20 MB trees into one `shardrecv` with
/// its default limit of 32 (18 of them used to fail).
#[test]
fn fifty_senders_into_the_default_limit_of_32_all_finish() {
    senders_wait_in_line(None, 50, 20 << 20, "8M");
}

/// A sender that will not wait (`--wait-for 0`) or whose deadline passes is refused with
/// exit 4 and a clear message, and leaves the line: the next sender still gets the slot.
#[test]
fn a_sender_gives_up_waiting_at_its_deadline_and_leaves_the_line() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start_with(&keys, &root, "127.0.0.1:0", &[], &["--max-transfers", "1"]);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 6 << 20, 1);
    // Small chunks on one stream: the first is verified early and the slot stays held ~6 s.
    let slow_args = [
        "--bwlimit",
        "1M",
        "--chunk-size",
        "256K",
        "--streams",
        "1",
        "--compress",
        "off",
    ];
    let slow = send_cmd(&keys, &src, &d.addr, "slow", &slow_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "slow"
    ) > 0));
    let small = keys.path("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("f"), "x").unwrap();

    let out = send(&keys, &small, &d.addr, "now", &["--wait-for", "0"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not waiting in line"),
        "{}",
        stderr(&out)
    );

    let t0 = Instant::now();
    let out = send(&keys, &small, &d.addr, "soon", &["--wait-for", "1s"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("still at its transfer limit"),
        "{}",
        stderr(&out)
    );
    assert!(t0.elapsed() >= Duration::from_secs(1));
    assert!(!root.join("now").exists() && !root.join("soon").exists());

    // The two that left are out of the line: this one is next and gets the slot.
    let out = send(&keys, &small, &d.addr, "later", &[]);
    let j = assert_ok(&out);
    assert!(j["queued_seconds"].as_f64().unwrap() > 0.0, "{j}");
    assert!(
        stderr(&out).contains(r#""event":"queued","position":1"#),
        "{}",
        stderr(&out)
    );
    assert_ok(&slow.wait_with_output().unwrap());
    assert_same_tree(&small, &root.join("later"));
    assert_same_tree(&src, &root.join("slow"));
    assert_eq!(logged_max_active(&d.log()), 1);
}
