//! A receiver killed (SIGKILL, by its failpoints) in the middle of installing, and what the
//! resumed transfer does then (issue 10: "install rename" failpoints).

use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// Entries of `root` whose name starts with `prefix`.
fn named(root: &Path, prefix: &str) -> Vec<String> {
    visible_entries(root)
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Installs an old copy of `r.git`, then sends a new one to a receiver that dies at
/// `failpoint`; returns the keys, the new source and the receiver's root.
fn install_killed_at(failpoint: &str) -> (Keys, std::path::PathBuf, std::path::PathBuf, String) {
    let keys = Keys::new();
    let root = keys.path("root");
    let old = keys.path("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("HEAD"), "old copy\n").unwrap();
    let mut d = Daemon::start(&keys, &root);
    assert_ok(&send(&keys, &old, &d.addr, "r.git", &[]));
    let addr = d.addr.clone();
    d.kill9();

    let src = keys.path("new");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("pack"), 3 << 20, 1);
    std::fs::write(src.join("HEAD"), "new copy\n").unwrap();
    let mut d = Daemon::start_with_failpoints(&keys, &root, &addr, failpoint);
    let mut sender = send_cmd(&keys, &src, &d.addr, "r.git", &["--chunk-size", "1M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        d.killed_itself(Duration::from_secs(20)),
        "shardrecv did not die at {failpoint}: {}",
        d.log()
    );
    assert!(d.log().contains(&format!("failpoint {failpoint} hit")));
    // The sender would notice only at its idle timeout: stop it now, as an operator would.
    let _ = sender.kill();
    let _ = sender.wait();
    (keys, src, root, addr)
}

/// Resumes the transfer on a healthy receiver: nothing is sent again, the new tree is
/// installed; returns the summary.
fn resume(keys: &Keys, src: &Path, root: &Path, addr: &str) -> serde_json::Value {
    let d = Daemon::start_on(keys, root, addr);
    let j = assert_ok(&send(
        keys,
        src,
        &d.addr,
        "r.git",
        &["--resume", "--chunk-size", "1M"],
    ));
    assert_eq!(j["sent_bytes"], 0, "the staged tree was complete: {j}");
    assert_eq!(j["resumed_bytes"], j["bytes"], "{j}");
    assert_same_tree(src, &root.join("r.git"));
    j
}

#[test]
fn receiver_killed_before_the_install_rename_keeps_the_target_and_resumes_for_free() {
    let (keys, src, root, addr) = install_killed_at("install-before-rename");
    assert_eq!(
        std::fs::read_to_string(root.join("r.git/HEAD")).unwrap(),
        "old copy\n",
        "the target is untouched"
    );
    assert!(named(&root, "r.git.replaced-").is_empty());
    let j = resume(&keys, &src, &root, &addr);
    let aside = j["replaced"].as_str().expect("the old copy moved aside");
    assert_eq!(
        std::fs::read_to_string(Path::new(aside).join("HEAD")).unwrap(),
        "old copy\n"
    );
}

/// The window the brief asked about: the old copy is moved aside and the new tree is not in
/// yet, so the target does not exist. The resumed transfer sends nothing and installs the
/// staged tree; the old copy stays aside, exactly once.
#[test]
fn receiver_killed_after_moving_the_target_aside_installs_on_resume() {
    let (keys, src, root, addr) = install_killed_at("install-moved-aside");
    assert!(!root.join("r.git").exists(), "the target was moved aside");
    let aside = named(&root, "r.git.replaced-");
    assert_eq!(aside.len(), 1, "{aside:?}");
    let j = resume(&keys, &src, &root, &addr);
    assert!(j["replaced"].is_null(), "nothing left to move aside: {j}");
    assert_eq!(named(&root, "r.git.replaced-"), aside);
    assert_eq!(
        std::fs::read_to_string(root.join(&aside[0]).join("HEAD")).unwrap(),
        "old copy\n"
    );
}
