//! A lost connection is survived (issue 12 item 5): shardsend connects again on its own,
//! says it is waiting, and sends only what the receiver has not verified. Once over a real
//! emulated WAN link cut for longer than QUIC's idle timeout (`linkemu`, root only), once on
//! loopback with a receiver that restarts mid-transfer.

use std::io::{BufReader, Read};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::*;

const MIB: u64 = 1 << 20;

/// The JSON events shardsend printed on stderr (`--json`), in order.
fn events(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter(|l| l.starts_with("{\"event\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Reads a child's stderr on a thread, so a chatty child never blocks on a full pipe.
fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    })
}

/// Waits for the sender and returns its JSON summary and stderr.
fn finish(
    mut child: Child,
    stderr: std::thread::JoinHandle<String>,
) -> (serde_json::Value, String) {
    let mut out = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_to_string(&mut out)
        .expect("read stdout");
    let status = child.wait().expect("wait for shardsend");
    let err = stderr.join().expect("stderr reader");
    assert!(
        status.success(),
        "shardsend failed ({status}): {err}\n{out}"
    );
    let summary = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (summary, err)
}

/// What a resumed transfer must show: the chunks verified before the loss were not sent
/// again (the last attempt resumed exactly them), and no more than one window of chunks in
/// flight at the loss crossed the wire twice.
fn assert_sent_only_the_rest(j: &serde_json::Value, total: u64, verified_before: u64) {
    assert_eq!(j["resumed_bytes"], verified_before * MIB, "{j}");
    assert_eq!(j["chunks_resumed"], verified_before, "{j}");
    let sent = j["sent_bytes"].as_u64().expect("sent_bytes");
    let in_flight = transfer::quic::SEND_WINDOW + 4 * MIB;
    assert!(
        sent >= total && sent <= total + in_flight,
        "sent {sent} of {total} bytes: more than the chunks in flight at the loss were re-sent"
    );
    assert!(j["reconnects"].as_u64().unwrap_or(0) >= 1, "{j}");
    assert!(j["attempts"].as_u64().unwrap_or(0) >= 2, "{j}");
}

#[test]
fn a_link_cut_for_longer_than_the_idle_timeout_is_survived_without_resending_verified_chunks() {
    if !is_root() {
        eprintln!(
            "skipping a_link_cut_for_longer_than_the_idle_timeout_is_survived: needs root \
             (linkemu's network namespaces and TUN devices)"
        );
        return;
    }
    let Some(linkemu) = linkemu() else {
        eprintln!(
            "skipping a_link_cut_for_longer_than_the_idle_timeout_is_survived: linkemu is not \
             built (`cargo test --workspace` builds it; or `cargo build -p bench --bin linkemu`)"
        );
        return;
    };
    // The scenario: 45 s, longer than the idle timeout, so both ends drop the
    // connection and the sender must make a new one.
    const CUT: Duration = Duration::from_secs(45);
    assert!(CUT > transfer::quic::IDLE_TIMEOUT + Duration::from_secs(5));

    let keys = Keys::new();
    let root = keys.path("root");
    let link = Link::start(&linkemu, "cut", &["--rate", "40M", "--delay", "10ms"]);
    let listen = format!("{}:0", link.addr_b);
    let exec_b = link.exec('b');
    let exec_b: Vec<&str> = exec_b.iter().map(String::as_str).collect();
    let d = Daemon::start_in(&keys, &root, &listen, &exec_b);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let total = 48 * MIB;
    write_random(&src.join("pack"), total as usize, 12);

    let exec_a = link.exec('a');
    let exec_a: Vec<&str> = exec_a.iter().map(String::as_str).collect();
    let mut sender = send_cmd_in(
        &exec_a,
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--chunk-size", "1M", "--compress", "off"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = collect_stderr(&mut sender);
    assert!(
        wait_for(Duration::from_secs(60), || journal_records(&root, "r.git")
            >= 8),
        "the transfer never got going: {}",
        d.log()
    );
    link.set_down(true);
    std::thread::sleep(CUT);
    assert!(
        sender.try_wait().unwrap().is_none(),
        "shardsend gave up during the cut"
    );
    // Both ends timed out long ago: what is journaled now is all the receiver verified.
    let verified = journal_records(&root, "r.git");
    assert!((8..48).contains(&verified), "verified {verified} chunks");
    link.set_down(false);

    let (j, err) = finish(sender, stderr);
    assert_same_tree(&src, &root.join("r.git"));
    assert_sent_only_the_rest(&j, total, verified);
    let events = events(&err);
    let reconnecting: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "reconnecting")
        .collect();
    assert!(!reconnecting.is_empty(), "no reconnecting event: {err}");
    // Several tries while the link stayed down (the cut outlasts the idle timeout by 15 s).
    assert!(
        reconnecting.len() >= 2,
        "one try only for a {CUT:?} cut: {err}"
    );
    let back = events
        .iter()
        .find(|e| e["event"] == "reconnected")
        .unwrap_or_else(|| panic!("no reconnected event: {err}"));
    assert!(back["waited_seconds"].as_f64().unwrap() >= 5.0, "{back}");
    assert_eq!(visible_entries(&root), ["r.git"], "nothing moved aside");
}

#[test]
fn a_receiver_restarted_mid_transfer_is_reconnected_to_and_resumed() {
    let keys = Keys::new();
    let root = keys.path("root");
    let mut d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let total = 24 * MIB;
    write_random(&src.join("pack"), total as usize, 5);
    let mut sender = send_cmd(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &[
            "--bwlimit",
            "6M",
            "--chunk-size",
            "1M",
            "--streams",
            "2",
            "--compress",
            "off",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = collect_stderr(&mut sender);
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r.git"
    ) >= 6));
    // A graceful stop closes the connection: the sender notices at once, not after the idle
    // timeout.
    d.terminate();
    let verified = journal_records(&root, "r.git");
    assert!((6..24).contains(&verified), "verified {verified}");
    let addr = d.addr.clone();
    d = Daemon::start_on(&keys, &root, &addr);

    let (j, err) = finish(sender, stderr);
    assert_same_tree(&src, &root.join("r.git"));
    assert_sent_only_the_rest(&j, total, verified);
    let kinds: Vec<_> = events(&err)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("reconnecting"),
        "{err}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("reconnected"),
        "{err}"
    );
    assert_eq!(visible_entries(&root), ["r.git"], "nothing moved aside");
    drop(d);
}

#[test]
fn retry_for_zero_fails_at_once_and_the_error_says_how_to_resume() {
    let keys = Keys::new();
    let root = keys.path("root");
    let mut d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 16 << 20, 6);
    let sender = send_cmd(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--bwlimit", "4M", "--retry-for", "0", "--compress", "off"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r.git"
    ) >= 2));
    d.terminate();
    let out = sender.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("reconnecting"),
        "reconnected although --retry-for 0: {}",
        stderr(&out)
    );
    assert_eq!(json(&out)["exit_code"], 6);
}
