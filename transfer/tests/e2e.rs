//! End-to-end tests: the real `shardsend` and `shardrecv` binaries on loopback.

mod busy_receiver;
mod compat;
mod cut_link;
mod failpoints;
mod git_repo;
mod limits;
mod live_source;
mod operator;
mod ownership;
mod path_memory;
mod resume_progress;
mod rotation;
mod tickets;
mod util;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use util::*;

fn tree_with_everything(src: &Path) {
    std::fs::create_dir_all(src.join("objects/pack")).unwrap();
    std::fs::create_dir_all(src.join("refs/heads")).unwrap();
    std::fs::create_dir_all(src.join("empty-dir")).unwrap();
    write_random(&src.join("objects/pack/pack-1.pack"), 9_000_000, 1);
    write_random(&src.join("objects/pack/pack-1.idx"), 123_457, 2);
    std::fs::write(src.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(src.join("refs/heads/main"), "0123456789abcdef\n").unwrap();
    std::fs::write(src.join("empty"), "").unwrap();
    std::fs::write(src.join("config"), "[core]\n\tbare = true\n".repeat(5000)).unwrap();
    let hook = src.join("hook.sh");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(src.join("config"), std::fs::Permissions::from_mode(0o600)).unwrap();
    symlink("../HEAD", src.join("refs/head-link")).unwrap();
    symlink("pack/pack-1.pack", src.join("objects/alias")).unwrap();
    // A second name of the hook (the maintenance hook keeps the original this way), and
    // extended attributes on a file and a directory.
    std::fs::hard_link(&hook, src.join("refs/hook-kept")).unwrap();
    xattr::set(&hook, "user.shardmove.origin", b"shard-a").unwrap();
    xattr::set(src.join("refs"), "user.empty", b"").unwrap();
    // Fixed, distinctive mtimes (nanoseconds included) on a file and a directory.
    let t = std::time::UNIX_EPOCH + Duration::new(1_500_000_000, 123_456_789);
    std::fs::File::options()
        .write(true)
        .open(src.join("HEAD"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    std::fs::File::open(src.join("empty-dir"))
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn tree_round_trips_byte_for_byte_with_metadata() {
    let keys = Keys::new();
    let src = keys.path("src.git");
    tree_with_everything(&src);
    // A link out of the tree into a directory the operator allowed (shared by both hosts).
    symlink("/etc/passwd", src.join("escaping-link")).unwrap();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let out = send(
        &keys,
        &src,
        &d.addr,
        "tenant/r1.git",
        &["--compress", "auto", "--allow-external-link", "/etc"],
    );
    let j = assert_ok(&out);
    assert_same_tree(&src, &root.join("tenant/r1.git"));
    assert_eq!(j["external_links"], 1);
    assert!(j["skipped"].as_array().unwrap().is_empty(), "{j}");
    let total = 9_000_000 + 123_457 + 21 + 17 + 20 * 5000 + 17;
    // The hook's second name is a hardlink: its bytes travel once.
    assert_eq!(j["bytes"], total);
    assert_eq!(j["hardlinks"], 1);
    assert_eq!(j["owner"], "receiver");
    assert_eq!(j["sent_bytes"], total);
    assert_eq!(j["resumed_bytes"], 0);
    assert_eq!(j["root_hash"].as_str().unwrap().len(), 64);
    assert!(j["compression"]["reason"].as_str().is_some());
    // Both sides print the same root hash.
    assert!(
        wait_for(Duration::from_secs(5), || d
            .log()
            .contains(j["root_hash"].as_str().unwrap())),
        "receiver log lacks the root hash: {}",
        d.log()
    );
    // Staging is cleaned after install.
    let staging = transfer::staging::staging_dir(&root, b"tenant/r1.git");
    assert!(!staging.exists());
}

#[test]
fn existing_target_is_moved_aside_never_overwritten() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let v1 = keys.path("v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("f"), "one").unwrap();
    assert_ok(&send(&keys, &v1, &d.addr, "r.git", &[]));
    let v2 = keys.path("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("f"), "two").unwrap();
    let j = assert_ok(&send(&keys, &v2, &d.addr, "r.git", &[]));
    let replaced = j["replaced"].as_str().expect("replaced path");
    assert!(replaced.contains("r.git.replaced-"), "{replaced}");
    assert_eq!(
        std::fs::read_to_string(Path::new(replaced).join("f")).unwrap(),
        "one"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("r.git/f")).unwrap(),
        "two"
    );
}

#[test]
fn single_file_and_zstd_round_trip() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let f = keys.path("notes.txt");
    std::fs::write(&f, "source-like text, very compressible\n".repeat(200_000)).unwrap();
    let j = assert_ok(&send(
        &keys,
        &f,
        &d.addr,
        "notes.txt",
        &["--compress", "zstd:3"],
    ));
    assert_eq!(file_hash(&f), file_hash(&root.join("notes.txt")));
    assert!(j["compression"]["compress"].as_bool().unwrap());
    let wire = j["wire_bytes"].as_u64().unwrap();
    assert!(
        wire * 10 < j["bytes"].as_u64().unwrap(),
        "zstd did not shrink: {j}"
    );
}

#[test]
fn sparse_file_over_4_gib_round_trips() {
    let keys = Keys::new();
    let src = keys.path("big.img");
    let f = std::fs::File::create(&src).unwrap();
    let size: u64 = 5 * (1 << 30) + 12_345;
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let marks = [0u64, (4 << 30) - 3, (4 << 30) + 777, size - 100];
    for (i, at) in marks.iter().enumerate() {
        f.write_all_at(&random_bytes(100, i as u64), *at).unwrap();
    }
    drop(f);
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "big.img",
        &["--compress", "off"],
    ));
    let dst = root.join("big.img");
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
    assert_eq!(j["bytes"], size);
    // Holes travel as empty frames: a few chunks of real data on the wire, not 5 GiB.
    assert!(j["wire_bytes"].as_u64().unwrap() < 64 << 20, "{j}");
    // And stay holes on the receiver.
    assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 64 << 20);
    assert_eq!(file_hash(&src), file_hash(&dst));
}

#[test]
fn unauthorised_sender_is_refused_before_anything_is_staged() {
    let keys = Keys::new();
    let root = keys.path("root");
    std::fs::write(&keys.allow, "# nobody\n").unwrap();
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    let out = send(&keys, &src, &d.addr, "r.git", &["--connect-timeout", "5"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("allow-list"), "{}", stderr(&out));
    assert!(!root.join(".shardrecv").exists());
    assert!(visible_entries(&root).is_empty());
    assert!(d.log().contains("not in the allow-list"), "{}", d.log());
}

#[test]
fn both_binaries_share_keygen_and_fingerprint() {
    let keys = Keys::new();
    let key = keys.path("new.key");
    let made = std::process::Command::new(shardsend())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(stderr(&made).contains("allow-list"), "{}", stderr(&made));
    let printed = std::process::Command::new(shardrecv())
        .args(["fingerprint", "--identity"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{}", stderr(&printed));
    assert_eq!(made.stdout, printed.stdout);
    let again = std::process::Command::new(shardrecv())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
}

#[test]
fn wrong_receiver_key_and_unreachable_receiver_are_clear_errors() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let other = transfer::identity::Identity::generate(&keys.path("other.key")).unwrap();
    let out = std::process::Command::new(shardsend())
        .arg(&src)
        .arg(&d.addr)
        .arg("r.git")
        .arg("--identity")
        .arg(&keys.send_key)
        .arg("--peer")
        .arg(other.fingerprint.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--peer"), "{}", stderr(&out));
    assert!(visible_entries(&root).is_empty());

    // Nothing listens on this port.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = sock.local_addr().unwrap().to_string();
    drop(sock);
    let out = send(&keys, &src, &dead, "r.git", &["--connect-timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
    assert_eq!(json(&out)["ok"], false);
}

#[test]
fn bad_local_input_is_refused_with_a_clear_message() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let missing = keys.path("does-not-exist");
    let out = send(&keys, &missing, &d.addr, "r.git", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    for dest in ["../escape", "/abs", ".shardrecv/x", "a//b"] {
        let out = send(&keys, &src, &d.addr, dest, &[]);
        assert_eq!(out.status.code(), Some(2), "{dest}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("invalid destination"),
            "{}",
            stderr(&out)
        );
    }
    let out = send(&keys, &src, &d.addr, "r.git", &["--compress", "gzip"]);
    assert_eq!(out.status.code(), Some(2));
    let out = send(&keys, &src, &d.addr, "r.git", &["--bwlimit", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(visible_entries(&root).is_empty());
}

#[test]
fn every_congestion_controller_and_a_larger_window_complete_a_transfer() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("data"), 6_000_000, 11);
    for (i, extra) in [
        vec!["--congestion", "bbr"],
        vec!["--congestion", "quinn-bbr"],
        vec!["--congestion", "cubic"],
        vec!["--congestion", "newreno"],
        vec!["--congestion", "background"],
        vec!["--window", "64M", "--congestion", "background"],
    ]
    .iter()
    .enumerate()
    {
        let dest = format!("cc{i}.git");
        let mut args = vec!["--compress", "off"];
        args.extend(extra.iter().copied());
        assert_ok(&send(&keys, &src, &d.addr, &dest, &args));
        assert_same_tree(&src, &root.join(&dest));
    }
    let out = send(&keys, &src, &d.addr, "x.git", &["--congestion", "vegas"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bbr, quinn-bbr, cubic, newreno, background"));
    let out = send(&keys, &src, &d.addr, "x.git", &["--window", "1M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("between 4M and 256M"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corrupted_chunk_is_requested_again_and_persistent_corruption_fails() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("data"), 3_000_000, 7);
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "once.git",
        &["--inject-fault", "corrupt-once", "--compress", "off"],
    ));
    assert_eq!(j["chunks_retried"], 1);
    assert_same_tree(&src, &root.join("once.git"));

    let out = send(
        &keys,
        &src,
        &d.addr,
        "always.git",
        &["--inject-fault", "corrupt-always", "--compress", "off"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("failed verification 3 times"),
        "{}",
        stderr(&out)
    );
    assert!(!root.join("always.git").exists());
}

#[test]
fn eight_concurrent_transfers_and_a_refused_duplicate_destination() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let srcs: Vec<_> = (0..8)
        .map(|i| {
            let s = keys.path(&format!("src{i}"));
            std::fs::create_dir(&s).unwrap();
            write_random(&s.join("pack"), 2_000_000 + i * 1000, i as u64);
            s
        })
        .collect();
    // A slow transfer holds "busy.git" while a second one to it must be refused.
    let slow_src = keys.path("slow");
    std::fs::create_dir(&slow_src).unwrap();
    write_random(&slow_src.join("pack"), 6_000_000, 99);
    let slow = send_cmd(&keys, &slow_src, &d.addr, "busy.git", &["--bwlimit", "2M"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || journal_records(
        &root, "busy.git"
    ) > 0));
    let children: Vec<_> = srcs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            send_cmd(&keys, s, &d.addr, &format!("r{i}.git"), &[])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let dup = send(&keys, &slow_src, &d.addr, "busy.git", &[]);
    assert_eq!(dup.status.code(), Some(4), "{}", stderr(&dup));
    assert!(
        stderr(&dup).contains("already being received"),
        "{}",
        stderr(&dup)
    );
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_ok(&out);
        assert_same_tree(&srcs[i], &root.join(format!("r{i}.git")));
    }
    let out = slow.wait_with_output().unwrap();
    let j = assert_ok(&out);
    // --bwlimit 2M held: 6 MB cannot have taken less than ~2.9 s (a lower bound only, so a
    // slow machine cannot fail it).
    assert!(j["seconds"].as_f64().unwrap() > 2.5, "{j}");
    assert_same_tree(&slow_src, &root.join("busy.git"));
}

fn resume_after_kill(kill_receiver: bool) {
    let keys = Keys::new();
    let root = keys.path("root");
    let mut d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let total: u64 = 24 << 20;
    write_random(&src.join("pack"), total as usize, 3);
    let args = [
        "--bwlimit",
        "6M",
        "--chunk-size",
        "1M",
        "--streams",
        "2",
        "--compress",
        "off",
    ];
    // This sender gives up at the loss (--retry-for 0), so the resume is ours to make.
    let mut first_args = args.to_vec();
    first_args.extend(["--retry-for", "0"]);
    let mut first = send_cmd(&keys, &src, &d.addr, "r.git", &first_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r.git"
    ) >= 8));
    if kill_receiver {
        d.kill9();
        let _ = first.wait();
        d = Daemon::start_on(&keys, &root, &d.addr.clone());
    } else {
        first.kill().unwrap();
        first.wait().unwrap();
    }
    // Let the receiver finish what it had already received before looking at the journal.
    std::thread::sleep(Duration::from_millis(500));
    let verified = journal_records(&root, "r.git");
    assert!((8..24).contains(&verified), "verified {verified}");

    let mut resume_args = args.to_vec();
    resume_args.retain(|a| *a != "--bwlimit" && *a != "6M");
    resume_args.push("--resume");
    let j = assert_ok(&send(&keys, &src, &d.addr, "r.git", &resume_args));
    assert_eq!(j["resumed_bytes"], verified << 20, "{j}");
    assert_eq!(j["chunks_resumed"], verified);
    // Only what the receiver had not verified crossed the wire again.
    assert_eq!(j["sent_bytes"], total - (verified << 20), "{j}");
    assert_same_tree(&src, &root.join("r.git"));
}

#[test]
fn kill_9_of_the_sender_then_resume_resends_only_missing_chunks() {
    resume_after_kill(false);
}

#[test]
fn kill_9_of_the_receiver_then_resume_resends_only_missing_chunks() {
    resume_after_kill(true);
}

#[test]
fn source_changed_since_the_first_attempt_is_resent_whole() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("a"), 8 << 20, 1);
    write_random(&src.join("b"), 8 << 20, 2);
    let args = [
        "--bwlimit",
        "4M",
        "--chunk-size",
        "1M",
        "--streams",
        "1",
        "--compress",
        "off",
    ];
    // This sender gives up at the loss (--retry-for 0), so the resume is ours to make.
    let mut first_args = args.to_vec();
    first_args.extend(["--retry-for", "0"]);
    let mut first = send_cmd(&keys, &src, &d.addr, "r.git", &first_args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // File "a" is sent first; wait until some of it is verified, then kill and rewrite it.
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r.git"
    ) >= 3));
    first.kill().unwrap();
    first.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Same size, new content: only ctime/mtime/inode reveal it.
    let mut data = std::fs::read(src.join("a")).unwrap();
    data[0] ^= 1;
    std::fs::write(src.join("a"), &data).unwrap();
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--resume", "--chunk-size", "1M", "--compress", "off"],
    ));
    assert_eq!(
        j["resumed_bytes"], 0,
        "a changed and b was never started: {j}"
    );
    assert_eq!(j["sent_bytes"], 16 << 20);
    assert_same_tree(&src, &root.join("r.git"));
}

#[test]
fn disk_full_is_reported_and_leaves_the_target_untouched() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let keys = Keys::new();
    let root = keys.path("small");
    std::fs::create_dir(&root).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(root.clone());
    let d = Daemon::start(&keys, &root);
    std::fs::create_dir(root.join("r.git")).unwrap();
    std::fs::write(root.join("r.git/keep"), "old copy").unwrap();

    // Too big up front.
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 40 << 20, 5);
    let out = send(&keys, &src, &d.addr, "r.git", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("need 41943040 bytes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("r.git/keep")).unwrap(),
        "old copy"
    );

    // Fits alone, but two at once would not: the second is refused up front by the space
    // ledger (issue 15; it used to fail half-way on ENOSPC), the first is installed.
    let a = keys.path("a");
    let b = keys.path("b");
    for (p, seed) in [(&a, 1), (&b, 2)] {
        std::fs::create_dir(p).unwrap();
        write_random(&p.join("pack"), 15 << 20, seed);
    }
    let slow = ["--bwlimit", "10M", "--compress", "off"];
    let spawn = |src: &std::path::Path, dest: &str| {
        send_cmd(&keys, src, &d.addr, dest, &slow)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a, "a.git"), spawn(&b, "b.git"));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    let failed: Vec<_> = [&oa, &ob]
        .into_iter()
        .filter(|o| !o.status.success())
        .collect();
    assert_eq!(failed.len(), 1, "a: {}\nb: {}", stderr(&oa), stderr(&ob));
    let err = stderr(failed[0]);
    assert!(
        err.contains("promised to 1 transfer(s) in progress"),
        "{err}"
    );
    assert_eq!(failed[0].status.code(), Some(4));
    let names = visible_entries(&root);
    assert_eq!(names.len(), 2, "{names:?}");
    let installed = if oa.status.success() {
        "a.git"
    } else {
        "b.git"
    };
    std::fs::remove_dir_all(root.join(installed)).unwrap();

    // The disk filled by someone else mid-transfer: the transfer fails with ENOSPC, says how
    // much more it needs, and gives its staging back; the old copy is untouched.
    let child = spawn(&a, "c.git");
    assert!(wait_for(std::time::Duration::from_secs(20), || {
        std::fs::read_dir(root.join(".shardrecv"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    }));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let filler = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat /dev/zero > '{}/filler' 2>/dev/null; true",
            root.display()
        ))
        .status()
        .unwrap();
    assert!(filler.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("disk full") && err.contains("more bytes are needed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("r.git/keep")).unwrap(),
        "old copy"
    );
    let staged: Vec<_> = std::fs::read_dir(root.join(".shardrecv"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "staging left behind: {staged:?}");
}

/// A client that speaks the protocol directly, to send what no honest sender would.
mod hostile {
    use super::*;
    use transfer::identity::{client_crypto, Identity};
    use transfer::io::{read_control, write_controls};
    use transfer::wire::{
        ChunkHeader, Codec, ControlMsg, Entry, EntryKind, Hello, ManifestHasher, RootKind,
    };

    pub fn entry(path: &str, kind: EntryKind, size: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime_sec: 0,
            mtime_nsec: 0,
            size,
            link_target: Vec::new(),
            ino: 1,
            ctime_sec: 0,
            ctime_nsec: 0,
            attrs: None,
        }
    }

    /// Sends a manifest (counts as given) and optional raw chunk frames; returns the
    /// receiver's `Fail` message, or panics if it did not refuse.
    pub fn refusal(
        keys: &Keys,
        addr: &str,
        declared_entries: u64,
        declared_bytes: u64,
        entries: Vec<Entry>,
        frames: Vec<(ChunkHeader, Vec<u8>)>,
    ) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let id = Identity::load(&keys.send_key).unwrap();
            let crypto = client_crypto(&id, &[keys.recv_fp]).unwrap();
            let (_ep, conn) = transfer::quic::connect(
                addr.parse().unwrap(),
                crypto,
                &transfer::identity::server_name_for(&[keys.recv_fp]),
                Duration::from_secs(5),
                &transfer::quic::TransportOptions::default(),
            )
            .await
            .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            // Every tree starts with its root directory entry.
            let mut entries = entries;
            entries.insert(0, entry("", EntryKind::Dir, 0));
            let declared_entries = declared_entries + 1;
            let mut hasher = ManifestHasher::new();
            for e in &entries {
                hasher.add(e);
            }
            let mut msgs = vec![ControlMsg::Hello(Hello {
                version: transfer::wire::PROTOCOL_VERSION,
                dest: b"evil.git".to_vec(),
                root_kind: RootKind::Dir,
                chunk_size: 1 << 16,
                entry_count: declared_entries,
                total_bytes: declared_bytes,
                resume: false,
                install: true,
                sender_info: "hostile test".into(),
                git: false,
                owner: Default::default(),
                external_links: Vec::new(),
                ticket: Vec::new(),
            })];
            msgs.extend(entries.into_iter().map(ControlMsg::Entry));
            msgs.push(ControlMsg::ManifestEnd {
                manifest_hash: hasher.finish(),
            });
            write_controls(&mut send, &msgs).await.unwrap();
            let mut data = None;
            loop {
                match tokio::time::timeout(Duration::from_secs(10), read_control(&mut recv)).await {
                    Ok(Ok(Some(ControlMsg::Fail { message, .. }))) => return message,
                    Ok(Ok(Some(ControlMsg::Accept { .. }))) => {
                        let mut s = conn.open_uni().await.unwrap();
                        for (h, p) in &frames {
                            let _ = s.write_all(&h.encode()).await;
                            let _ = s.write_all(p).await;
                        }
                        data = Some(s);
                    }
                    Ok(Ok(Some(_))) => {}
                    other => panic!("receiver did not refuse: {other:?}"),
                }
                let _ = &data;
            }
        })
    }

    pub fn frame(file: u64, chunk: u64, raw_len: u64, payload: Vec<u8>) -> (ChunkHeader, Vec<u8>) {
        (
            ChunkHeader {
                file,
                chunk,
                offset: chunk << 16,
                raw_len,
                codec: Codec::Raw,
                payload_len: payload.len() as u64,
                hash: *blake3::hash(&payload).as_bytes(),
            },
            payload,
        )
    }
}

#[test]
fn hostile_manifests_and_frames_are_refused_and_write_nothing_outside_staging() {
    use hostile::*;
    use transfer::wire::EntryKind::*;
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let cases: Vec<(&str, u64, u64, Vec<transfer::wire::Entry>, Vec<_>)> = vec![
        (
            "'..' component",
            1,
            0,
            vec![entry("../../etc/x", File, 0)],
            vec![],
        ),
        (
            "absolute path",
            1,
            0,
            vec![entry("/etc/x", File, 0)],
            vec![],
        ),
        (
            "points outside the tree",
            1,
            0,
            {
                let mut l = entry("l", Symlink, 0);
                l.link_target = b"../../../etc".to_vec();
                vec![l]
            },
            vec![],
        ),
        (
            "more entries than",
            1,
            0,
            vec![entry("a", File, 0), entry("b", File, 0)],
            vec![],
        ),
        (
            "announced 4 entries but sent 2",
            3,
            0,
            vec![entry("a", File, 0)],
            vec![],
        ),
        (
            "more than the 10 bytes announced",
            1,
            10,
            vec![entry("a", File, 11)],
            vec![],
        ),
        (
            "past the end",
            1,
            100,
            vec![entry("a", File, 100)],
            vec![frame(1, 1, 100, vec![0; 100])],
        ),
        (
            "implies 100",
            1,
            100,
            vec![entry("a", File, 100)],
            vec![frame(1, 0, 99, vec![1; 99])],
        ),
        (
            "does not exist",
            1,
            100,
            vec![entry("a", File, 100)],
            vec![frame(5, 0, 100, vec![1; 100])],
        ),
        (
            "not a regular file",
            1,
            100,
            vec![entry("a", File, 100)],
            vec![frame(0, 0, 100, vec![1; 100])],
        ),
    ];
    for (expect, n, bytes, entries, frames) in cases {
        let msg = refusal(&keys, &d.addr, n, bytes, entries, frames);
        assert!(msg.contains(expect), "expected {expect:?} in {msg:?}");
        assert!(
            visible_entries(&root).is_empty(),
            "{expect}: wrote outside staging"
        );
    }
    assert!(!Path::new("/etc/x").exists());
    let _ = Arc::new(());
}

#[test]
fn source_changed_during_the_send_is_detected_and_resent_whole() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 12 << 20, 1);
    write_random(&src.join("other"), 1 << 20, 2);
    let child = send_cmd(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--bwlimit", "8M", "--chunk-size", "1M", "--compress", "off"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    assert!(wait_for(Duration::from_secs(20), || journal_records(
        &root, "r.git"
    ) >= 2));
    // Rewrite the file in place while it is being sent.
    let mut data = std::fs::read(src.join("pack")).unwrap();
    data[5 << 20] ^= 0xff;
    std::fs::write(src.join("pack"), &data).unwrap();
    let out = child.wait_with_output().unwrap();
    let j = assert_ok(&out);
    assert_eq!(j["attempts"], 2, "{j}");
    assert!(
        stderr(&out).contains("changed during the send"),
        "{}",
        stderr(&out)
    );
    // The changed file went again whole; the unchanged one was kept from the first attempt.
    assert_eq!(j["resumed_bytes"], 1 << 20, "{j}");
    assert_same_tree(&src, &root.join("r.git"));
}

#[test]
fn auto_compresses_text_over_a_slow_link() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and tc");
        return;
    }
    let keys = Keys::new();
    let net = NetnsPair::up("16mbit");
    let root = keys.path("root");
    let b = net.exec('b');
    let wrapper: Vec<&str> = b.iter().map(String::as_str).collect();
    let d = Daemon::start_in(&keys, &root, &format!("{}.2:0", net.subnet), &wrapper);
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    let text: String = (0..120_000)
        .map(|i| {
            format!(
                "fn item_{i}(x: u64) -> u64 {{ x.wrapping_mul({}) }}\n",
                i % 97
            )
        })
        .collect();
    std::fs::write(src.join("lib.rs"), &text).unwrap();
    let a = net.exec('a');
    // shardsend from namespace a over the rate-limited link, `auto` compression.
    let send_auto = |src: &Path, dest: &str| {
        std::process::Command::new(&a[0])
            .args(&a[1..])
            .arg(shardsend())
            .arg(src)
            .arg(&d.addr)
            .arg(dest)
            .arg("--identity")
            .arg(&keys.send_key)
            .arg("--peer")
            .arg(keys.recv_fp.to_string())
            .args([
                "--json",
                "--no-progress",
                "--compress",
                "auto",
                "--chunk-size",
                "256K",
            ])
            .output()
            .unwrap()
    };
    let out = send_auto(&src, "r.git");
    let j = assert_ok(&out);
    let c = &j["compression"];
    // A 2 MB/s link is far below the breakpoint of source text (hundreds of MB/s): text is
    // compressed from the first chunks on, before the link is even measured.
    assert_eq!(c["compress"], true, "{j}");
    assert!(
        j["wire_bytes"].as_u64().unwrap() * 10 < j["bytes"].as_u64().unwrap(),
        "{j}"
    );
    assert_same_tree(&src, &root.join("r.git"));

    // Pack-like (incompressible) data over the same link goes raw.
    let packs = keys.path("packs");
    std::fs::create_dir(&packs).unwrap();
    write_random(&packs.join("pack-1.pack"), 2 << 20, 11);
    let out = send_auto(&packs, "p.git");
    let j = assert_ok(&out);
    assert_eq!(j["compression"]["compress"], false, "{j}");
    assert!(j["wire_bytes"].as_u64().unwrap() >= 2 << 20, "{j}");
}

#[test]
fn stage_only_precopy_then_resume_sends_only_what_changed_and_installs() {
    let keys = Keys::new();
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let src = keys.path("src.git");
    std::fs::create_dir_all(src.join("objects/pack")).unwrap();
    write_random(&src.join("objects/pack/pack-1.pack"), 6 << 20, 1);
    std::fs::write(src.join("packed-refs"), "aaaa refs/heads/main\n").unwrap();
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--stage-only", "--chunk-size", "1M"],
    ));
    assert_eq!(j["staged_only"], true);
    assert_eq!(j["installed_path"], "");
    assert!(
        visible_entries(&root).is_empty(),
        "a pre-copy installs nothing"
    );

    // The live repository moves on: a ref changes, a new pack appears.
    std::fs::write(src.join("packed-refs"), "bbbb refs/heads/main\n").unwrap();
    write_random(&src.join("objects/pack/pack-2.pack"), 1 << 20, 2);
    let j = assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "r.git",
        &["--resume", "--chunk-size", "1M"],
    ));
    assert_eq!(j["resumed_bytes"], 6 << 20, "{j}");
    assert_eq!(j["sent_bytes"], (1 << 20) + 21, "{j}");
    assert_same_tree(&src, &root.join("r.git"));
}
