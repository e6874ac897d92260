//! Issue 15 item 3: what one receiver holds back for the transfers it is for. Concurrent
//! transfers that each fit but together would not are refused up front, never failed
//! half-way on a full disk; and a flood of unauthenticated handshakes is refused before any
//! cryptography while an authorised transfer goes on.

use std::process::{Command, Stdio};

use crate::util::*;

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", dir.display());
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Six 12 MiB transfers at once into a 48 MiB disk: each alone fits, together they do not.
/// The receiver admits what fits beside what it already promised and refuses the rest at
/// once (exit 4, saying what is promised to whom); none fails on a full disk mid-way, and
/// every admitted one is installed whole. `--keep-free` is never promised.
#[test]
fn concurrent_transfers_that_together_would_overfill_the_disk_are_refused_up_front() {
    if !is_root() {
        println!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let keys = Keys::new();
    let disk = Tmpfs::mount(&keys.path("disk"), "48m");
    let root = disk.dir.join("root");
    let d = Daemon::start(&keys, &root);
    let sources: Vec<_> = (0..6)
        .map(|i| {
            let src = keys.path(&format!("src{i}"));
            std::fs::create_dir(&src).unwrap();
            write_random(&src.join("pack"), 12 << 20, i + 1);
            src
        })
        .collect();
    let children: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            send_cmd(
                &keys,
                src,
                &d.addr,
                &format!("r{i}.git"),
                &["--bwlimit", "6M", "--compress", "off"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut installed = Vec::new();
    let mut refused = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        match out.status.code() {
            Some(0) => installed.push(i),
            Some(4) => {
                let err = stderr(&out);
                assert!(
                    err.contains("not enough space on the receiver") && err.contains("promised to"),
                    "r{i}: {err}"
                );
                refused.push(i);
            }
            other => panic!("r{i} ended with {other:?}: {}", stderr(&out)),
        }
    }
    eprintln!("6 x 12 MiB into 48 MiB: installed {installed:?}, refused up front {refused:?}");
    assert!(
        !installed.is_empty() && !refused.is_empty(),
        "{installed:?} {refused:?}"
    );
    assert!(installed.len() <= 3, "{installed:?}");
    for i in &installed {
        assert_same_tree(&sources[*i], &root.join(format!("r{i}.git")));
    }
    assert!(
        !d.log().contains("disk full"),
        "a transfer hit the full disk: {}",
        d.log()
    );

    // What stays free for everything else is never promised: 1 MiB fits in the ~12 MiB
    // left, not beside 8 MiB kept free.
    drop(d);
    let small = keys.path("small");
    std::fs::create_dir(&small).unwrap();
    write_random(&small.join("pack"), 1 << 20, 9);
    let keep = Daemon::start_with(&keys, &root, "127.0.0.1:0", &[], &["--keep-free", "11M"]);
    let out = send(&keys, &small, &keep.addr, "kept.git", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kept free (--keep-free)"),
        "{}",
        stderr(&out)
    );
}

/// `handshake-flood` against a receiver: its summary.
fn flood(d: &Daemon, keys: &Keys, count: u64, seconds: f64) -> serde_json::Value {
    let flooder = handshake_flood().expect("checked by the caller");
    let out = Command::new(flooder)
        .arg(&d.addr)
        .args(["--peer", &keys.recv_fp.to_string(), "--from", "127.0.0.2"])
        .args([
            "--count",
            &count.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A flood of handshakes from 127.0.0.2 with a key nobody allowed: once its burst of failures
/// is used up the receiver's limiter refuses it before any cryptography, while a transfer from
/// 127.0.0.1 goes through; with the limit off, every one of them costs a full handshake (the control).
/// How much throughput the flood takes is measured by `scripts/bench-flood.sh`.
#[test]
fn a_handshake_flood_is_refused_before_any_cryptography_while_a_transfer_goes_on() {
    if handshake_flood().is_none() {
        println!("skipped: handshake-flood was not built (cargo test --workspace builds it)");
        return;
    }
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start_with(
        &keys,
        &root,
        "127.0.0.1:0",
        &[],
        &["--handshake-rate", "20"],
    );
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 16 << 20, 3);
    let sender = send_cmd(&keys, &src, &d.addr, "r.git", &["--bwlimit", "8M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let limited = flood(&d, &keys, 2000, 2.0);
    let out = sender.wait_with_output().unwrap();
    let j = assert_ok(&out);
    assert_eq!(j["complete"], true, "{j}");
    assert_same_tree(&src, &root.join("r.git"));
    eprintln!("flood against a limit of 20/s: {limited}");
    assert_eq!(limited["connected"], 0, "{limited}");
    // A burst of 40 failures, 20 a second after, plus the failures already under way when
    // the bucket ran dry (it is debited as handshakes fail): the rest, most of the flood, is
    // refused before the handshake.
    let handshakes = limited["handshake_failed"].as_u64().unwrap();
    assert!(handshakes <= 300, "{limited}");
    assert!(limited["refused"].as_u64().unwrap() >= 1700, "{limited}");
    assert!(
        d.log()
            .contains("refused a sender that is not in the allow-list"),
        "the burst reached the allow-list: {}",
        d.log()
    );

    let open = Daemon::start_with(&keys, &root, "127.0.0.1:0", &[], &["--handshake-rate", "0"]);
    let unlimited = flood(&open, &keys, 300, 1.0);
    eprintln!("flood with the limit off: {unlimited}");
    assert_eq!(unlimited["connected"], 0, "{unlimited}");
    assert_eq!(unlimited["refused"], 0, "{unlimited}");
    assert!(
        unlimited["handshake_failed"].as_u64().unwrap() >= 290,
        "{unlimited}"
    );
}
