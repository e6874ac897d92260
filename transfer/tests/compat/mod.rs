//! Releases one apart work together (the upgrade rule in `transfer::wire`): the previous
//! release's `shardsend` and `shardrecv`, built from this repository's history by
//! `scripts/previous-release.sh`, against this build's, in both directions; and a transfer
//! interrupted under one release's receiver resumed under the other's (an upgrade, then a
//! downgrade), which is what a host upgraded in the middle of a migration sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::util::*;

/// One release's pair of binaries.
#[derive(Debug, Clone)]
struct Release {
    name: &'static str,
    send: PathBuf,
    recv: PathBuf,
    /// The protocol version it speaks at its newest.
    protocol: u64,
}

fn this_build() -> Release {
    Release {
        name: "this build",
        send: shardsend().into(),
        recv: shardrecv().into(),
        protocol: u64::from(transfer::wire::PROTOCOL_VERSION),
    }
}

/// The previous release, built once per test run (the script caches it under target/);
/// `None`, said on stderr, when this checkout has no history to build it from.
fn previous_release() -> Option<Release> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/previous-release.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/previous-release.sh");
        match out.status.code() {
            Some(0) => Some(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )),
            Some(3) => None,
            other => panic!("scripts/previous-release.sh failed ({other:?})"),
        }
    });
    match dir {
        Some(dir) => Some(Release {
            name: "the previous release",
            send: dir.join("shardsend"),
            recv: dir.join("shardrecv"),
            protocol: u64::from(transfer::wire::PREVIOUS_PROTOCOL_VERSION),
        }),
        None => {
            eprintln!(
                "SKIPPED: the previous-release compatibility test, because this checkout has \
                 no history to build the previous release from (see scripts/previous-release.sh)"
            );
            None
        }
    }
}

/// A tree of what repositories hold: a bare git repository with a few packs' worth of data,
/// a symlink and a hardlinked pair beside it.
fn repository_tree(dir: &Path) -> PathBuf {
    let seed = dir.join(format!("seed-{}", rand_suffix()));
    std::fs::create_dir_all(&seed).unwrap();
    let data = random_bytes(3 << 20, 11);
    let (bare, _work) = bare_repo(&seed, &[("data.bin", &data), ("notes.txt", b"notes\n")]);
    std::fs::write(bare.join("description"), "compat test\n").unwrap();
    std::os::unix::fs::symlink("HEAD", bare.join("HEAD.link")).unwrap();
    std::fs::hard_link(bare.join("description"), bare.join("description.hardlink")).unwrap();
    bare
}

#[test]
fn this_build_and_the_previous_release_move_trees_in_both_directions() {
    let Some(previous) = previous_release() else {
        return;
    };
    let current = this_build();
    let keys = Keys::new();
    let src = repository_tree(keys.dir.path());
    for (n, (sender, receiver)) in [
        (&previous, &current),
        (&current, &previous),
        (&current, &current),
    ]
    .into_iter()
    .enumerate()
    {
        let case = format!("{} sending to {}", sender.name, receiver.name);
        let root = keys.path(&format!("root-{n}"));
        let d = Daemon::start_exe(&receiver.recv, &keys, &root);
        let out = send_cmd_exe(&sender.send, &keys, &src, &d.addr, "r.git", &[])
            .output()
            .unwrap();
        let j = assert_ok(&out);
        assert_same_tree(&src, &root.join("r.git"));
        // Both sides settle on the older one's newest version.
        let spoken = sender.protocol.min(receiver.protocol);
        if sender.protocol == current.protocol {
            assert_eq!(j["protocol_version"], spoken, "{case}: {j}");
        }
        if receiver.protocol == current.protocol {
            let alpn = String::from_utf8(transfer::wire::alpn_id(spoken as u16)).unwrap();
            let log = d.log();
            assert!(
                log.contains(&format!("version={spoken}")) && log.contains(&alpn),
                "{case}: the receiver logs version {spoken} over {alpn}: {log}"
            );
        }
        // The installed tree takes the next transfer of the same destination.
        let again = send_cmd_exe(&sender.send, &keys, &src, &d.addr, "r.git", &[])
            .output()
            .unwrap();
        assert_ok(&again);
    }
}

/// A transfer killed under `first`'s receiver, resumed under `second`'s on the same root.
fn resume_across(first: &Release, second: &Release) {
    let case = format!("staged by {}, resumed by {}", first.name, second.name);
    let keys = Keys::new();
    let root = keys.path("root");
    let src = keys.path("src");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 24 << 20, 5);
    std::fs::write(src.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    let args = ["--chunk-size", "1M", "--streams", "2", "--compress", "off"];
    let mut slow = args.to_vec();
    slow.extend(["--bwlimit", "6M", "--retry-for", "0"]);
    let mut d = Daemon::start_exe(&first.recv, &keys, &root);
    let mut killed = send_cmd_exe(&first.send, &keys, &src, &d.addr, "r.git", &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || journal_records(&root, "r.git")
            >= 8),
        "{case}: nothing verified"
    );
    killed.kill().unwrap();
    killed.wait().unwrap();
    // The host is upgraded (or downgraded): its daemon stops as an operator stops it.
    std::thread::sleep(Duration::from_millis(300));
    d.terminate();
    let verified = journal_records(&root, "r.git");
    assert!((8..24).contains(&verified), "{case}: verified {verified}");

    let d = Daemon::start_exe(&second.recv, &keys, &root);
    let mut resume = args.to_vec();
    resume.push("--resume");
    let out = send_cmd_exe(&second.send, &keys, &src, &d.addr, "r.git", &resume)
        .output()
        .unwrap();
    let j = assert_ok(&out);
    // Every chunk the first receiver verified carried over (HEAD is one small chunk), and
    // only the rest crossed the wire again.
    assert_eq!(j["chunks_resumed"], verified, "{case}: {j}");
    let (resumed, sent) = (
        j["resumed_bytes"].as_u64().unwrap(),
        j["sent_bytes"].as_u64().unwrap(),
    );
    assert!(resumed >= (verified - 1) << 20, "{case}: {j}");
    assert_eq!(resumed + sent, j["bytes"].as_u64().unwrap(), "{case}: {j}");
    assert_same_tree(&src, &root.join("r.git"));
}

#[test]
fn a_transfer_resumes_across_an_upgrade_and_a_downgrade_of_both_ends() {
    let Some(previous) = previous_release() else {
        return;
    };
    let current = this_build();
    resume_across(&previous, &current);
    resume_across(&current, &previous);
}
