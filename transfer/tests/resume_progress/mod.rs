//! Progress across a kill -9 and a resume (issue 16): resumed bytes count as done from the
//! first report, never twice, and stay out of the rate. Read from `shardsend --json`'s
//! progress events, which the progress bar draws from too.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

const MIB: u64 = 1 << 20;

/// The `{"event":"progress",...}` lines of a `--json` stderr.
fn progress_events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .collect()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Done never passes the total and never goes back; the rate is this run's bytes (done
/// minus resumed) over this run's seconds.
fn assert_sane(events: &[Value], total: u64) {
    let mut prev = 0;
    for e in events {
        assert_eq!(u(e, "total_bytes"), total, "{e}");
        let done = u(e, "done_bytes");
        assert!(done <= total, "done past the total: {e}");
        assert!(done >= prev, "done went back from {prev}: {e}");
        prev = done;
        let this_run = (done - u(e, "resumed_bytes")) as f64;
        let expected = if f(e, "seconds") > 0.0 {
            this_run / f(e, "seconds")
        } else {
            0.0
        };
        assert!(
            (f(e, "bytes_per_second") - expected).abs() <= 1.0 + expected * 1e-9,
            "rate is not this run's bytes over this run's time: {e}"
        );
    }
}

#[test]
fn progress_after_kill_9_and_resume_counts_resumed_bytes_once_and_not_in_the_rate() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let total: u64 = 32 * MIB;
    let bwlimit: u64 = 8 * MIB;
    write_random(&src.join("pack"), total as usize, 16);
    let args = [
        "--bwlimit",
        "8M",
        "--chunk-size",
        "1M",
        "--streams",
        "2",
        "--compress",
        "off",
    ];
    let first_log = keys.path("first.stderr");
    let mut first_args = args.to_vec();
    first_args.extend(["--retry-for", "0"]);
    let mut first = send_cmd_with_progress(&keys, &src, &d.addr, "r.git", &first_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(30), || journal_records(
        &root, "r.git"
    ) >= 10));
    first.kill().unwrap();
    first.wait().unwrap();
    // Let the receiver finish what it had already received before looking at the journal.
    std::thread::sleep(Duration::from_millis(500));
    let verified = journal_records(&root, "r.git");
    assert!((10..32).contains(&verified), "verified {verified} MiB");
    let resumed = verified * MIB;

    let before = progress_events(&std::fs::read_to_string(&first_log).unwrap());
    assert!(!before.is_empty(), "the first attempt printed no progress");
    assert_sane(&before, total);
    assert_eq!(u(&before[0], "done_bytes"), 0, "{}", before[0]);

    let mut resume_args = args.to_vec();
    resume_args.push("--resume");
    let out = send_cmd_with_progress(&keys, &src, &d.addr, "r.git", &resume_args)
        .output()
        .unwrap();
    let j = assert_ok(&out);
    assert_eq!(u(&j, "resumed_bytes"), resumed, "{j}");
    // The summary's rate is this run's too.
    let run_rate = u(&j, "sent_bytes") as f64 / f(&j, "seconds") / 1e6;
    assert!((f(&j, "mb_per_s") - run_rate).abs() < 1e-6, "{j}");
    let events = progress_events(&stderr(&out));
    assert!(events.len() >= 3, "too few progress events: {events:?}");
    assert_sane(&events, total);
    // The first report, at the receiver's Accept, already counts the resumed bytes.
    let first_event = &events[0];
    assert_eq!(u(first_event, "done_bytes"), resumed, "{first_event}");
    assert_eq!(f(first_event, "bytes_per_second"), 0.0, "{first_event}");
    for e in &events {
        assert_eq!(u(e, "resumed_bytes"), resumed, "{e}");
        // Counted in, the resumed bytes (10 MiB or more) would put the rate well past the
        // limit over the first seconds.
        if f(e, "seconds") >= 1.0 {
            assert!(
                f(e, "bytes_per_second") <= 1.5 * bwlimit as f64,
                "rate over --bwlimit: {e}"
            );
        }
    }
    let last = events.last().unwrap();
    assert_eq!(u(last, "done_bytes"), total, "{last}");
    assert_same_tree(&src, &root.join("r.git"));
}
