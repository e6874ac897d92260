//! Owners travel (issue 11 item 1): a repository sent as root to a receiver that installs it
//! for a forge's non-root daemon user passes `git fsck` and takes a push as that user; a
//! receiver that may not give files away refuses before any data moves.
//!
//! These need root (to create the daemon user and to give it files); without root they say
//! they skipped.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::*;

/// A system user (and its group) made with `useradd` for one test; removed on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    /// `None` (with the reason printed) when this process cannot make users.
    fn create(tag: &str) -> Option<TestUser> {
        if !is_root() {
            eprintln!("skipped: needs root to create a daemon user and give it files");
            return None;
        }
        let name = format!("smx{tag}{}", std::process::id());
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group", "--shell"])
            .arg("/usr/sbin/nologin")
            .arg(&name)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: useradd is not available or failed");
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        Some(TestUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
        })
    }

    /// `git -C dir ARGS` run as this user, with no user or system configuration.
    fn git(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", &self.name, "--", "env"])
            .args([
                "GIT_CONFIG_NOSYSTEM=1",
                "GIT_CONFIG_GLOBAL=/dev/null",
                "GIT_AUTHOR_NAME=d",
                "GIT_AUTHOR_EMAIL=d@example.invalid",
                "GIT_COMMITTER_NAME=d",
                "GIT_COMMITTER_EMAIL=d@example.invalid",
                "git",
                "-C",
            ])
            .arg(dir)
            .args(args)
            .output()
            .expect("runuser git")
    }

    fn git_ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.git(dir, args);
        assert!(
            out.status.success(),
            "git {args:?} as {} in {}: {}",
            self.name,
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `shardrecv serve` as this user, with the capabilities `caps` (setpriv's syntax, e.g.
    /// `+chown,+fowner`; empty: none). setpriv execs in place, so the daemon is the child
    /// the test kills at the end.
    fn run_shardrecv(&self, keys: &Keys, root: &Path, caps: &str) -> Daemon {
        let (uid, gid) = (self.uid.to_string(), self.gid.to_string());
        let mut wrapper = vec![
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &gid,
            "--clear-groups",
        ];
        if !caps.is_empty() {
            wrapper.extend(["--inh-caps", caps, "--ambient-caps", caps]);
        }
        wrapper.push("--");
        Daemon::start_in(keys, root, "127.0.0.1:0", &wrapper)
    }

    /// `keys`' receiver run as this user (no capabilities) on a root it owns, its key and
    /// allow-list its own: (root, daemon).
    fn receiver_with_its_own_root(&self, keys: &Keys) -> (PathBuf, Daemon) {
        open_up(keys);
        self.owns(&keys.recv_key);
        self.owns(&keys.allow);
        let root = keys.path("root");
        std::fs::create_dir(&root).unwrap();
        self.owns(&root);
        let d = self.run_shardrecv(keys, &root, "");
        (root, d)
    }

    fn owns(&self, p: &Path) {
        std::os::unix::fs::lchown(p, Some(self.uid), Some(self.gid)).unwrap();
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// Lets other users reach what the test made under its (0700) scratch directory.
fn open_up(keys: &Keys) {
    std::fs::set_permissions(keys.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bare repository made by root, with a hook kept under a second name (as the
/// maintenance hook does) and an extended attribute.
fn root_owned_repo(dir: &Path) -> PathBuf {
    let (bare, _) = bare_repo(dir, &[]);
    let hook = bare.join("hooks/pre-receive");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::hard_link(&hook, bare.join("hooks/pre-receive.kept")).unwrap();
    // chown clears set-id bits: the receiver must put them back.
    let helper = bare.join("hooks/setgid-helper");
    std::fs::write(&helper, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o2755)).unwrap();
    xattr::set(bare.join("config"), "user.shardmove.origin", b"shard-a").unwrap();
    // SELinux labels, on a file and on a symlink itself, where the kernel lets root set them
    // (without an SELinux policy loaded, security.* is plain storage for CAP_SYS_ADMIN).
    std::os::unix::fs::symlink("pre-receive", bare.join("hooks/update")).unwrap();
    let label = b"system_u:object_r:git_data_t:s0\0";
    for p in ["hooks/pre-receive", "hooks/update"] {
        if let Err(e) = xattr::set(bare.join(p), "security.selinux", label) {
            eprintln!("no security.selinux label on {p} in this test: {e}");
        }
    }
    bare
}

/// Every path under `root` (itself included) with its (uid, gid).
fn owners(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let m = std::fs::symlink_metadata(root).unwrap();
    let mut out = vec![(root.to_path_buf(), m.uid(), m.gid())];
    if m.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(owners(&e.unwrap().path()));
        }
    }
    out
}

#[test]
fn a_repository_installed_for_a_daemon_user_passes_fsck_and_takes_its_push() {
    let Some(daemon) = TestUser::create("d") else {
        return;
    };
    let keys = Keys::new();
    open_up(&keys);
    let root = keys.path("root");
    let d = Daemon::start(&keys, &root);
    let bare = root_owned_repo(keys.dir.path());

    // As before: files belong to the receiver's user (root), and git refuses the daemon
    // user such a repository.
    let j = assert_ok(&send(&keys, &bare, &d.addr, "plain.git", &[]));
    assert_eq!(j["owner"], "receiver", "{j}");
    let refused = daemon.git(&root.join("plain.git"), &["fsck"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("dubious ownership"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let chown = format!("{0}:{0}", daemon.name);
    let j = assert_ok(&send(&keys, &bare, &d.addr, "r.git", &["--chown", &chown]));
    assert_eq!(
        j["owner"],
        format!("preserve, mapping *={0} :*=:{0}", daemon.name)
    );
    assert_eq!(j["hardlinks"], 1, "{j}");
    let installed = root.join("r.git");
    for (p, uid, gid) in owners(&installed) {
        assert_eq!((uid, gid), (daemon.uid, daemon.gid), "{}", p.display());
    }
    // Owners aside, the copy is faithful: bytes, modes, times, xattrs, the hook's two names.
    assert_same_tree(&bare, &installed);
    daemon.git_ok(&installed, &["fsck", "--strict", "--no-progress"]);

    // The daemon user pushes to it (from a clone of its own).
    let clones = keys.path("daemon-clones");
    std::fs::create_dir(&clones).unwrap();
    daemon.owns(&clones);
    daemon.git_ok(&clones, &["clone", "-q", installed.to_str().unwrap(), "w"]);
    let w = clones.join("w");
    std::fs::write(w.join("pushed"), "by the daemon user\n").unwrap();
    daemon.owns(&w.join("pushed"));
    daemon.git_ok(&w, &["add", "pushed"]);
    daemon.git_ok(&w, &["commit", "-qm", "pushed on B"]);
    daemon.git_ok(&w, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    assert_eq!(
        daemon.git_ok(&installed, &["rev-parse", "refs/heads/main"]),
        daemon.git_ok(&w, &["rev-parse", "HEAD"])
    );
    daemon.git_ok(&installed, &["fsck", "--strict", "--no-progress"]);

    // --map-owner rewrites only what it names: root's files go to the daemon user, their
    // group stays root's.
    let map = format!("root={}", daemon.name);
    let j = assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "m.git",
        &["--map-owner", &map],
    ));
    assert_eq!(
        j["owner"],
        format!("preserve, mapping 0={}", daemon.name),
        "{j}"
    );
    for (p, uid, gid) in owners(&root.join("m.git")) {
        assert_eq!((uid, gid), (daemon.uid, 0), "{}", p.display());
    }
    // --preserve-owner keeps the numeric ids.
    daemon.owns(&bare.join("description"));
    assert_ok(&send(&keys, &bare, &d.addr, "p.git", &["--preserve-owner"]));
    let m = std::fs::metadata(root.join("p.git/description")).unwrap();
    assert_eq!((m.uid(), m.gid()), (daemon.uid, daemon.gid));
    let m = std::fs::metadata(root.join("p.git/config")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0));
}

#[test]
fn a_receiver_without_cap_chown_refuses_an_owner_it_cannot_give_before_any_data() {
    let Some(daemon) = TestUser::create("r") else {
        return;
    };
    let keys = Keys::new();
    // shardrecv as the daemon user, as systemd would run it.
    let (root, d) = daemon.receiver_with_its_own_root(&keys);
    let bare = root_owned_repo(keys.dir.path());

    let out = send(&keys, &bare, &d.addr, "r.git", &["--preserve-owner"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("for uid 0 gid 0") && err.contains("without CAP_CHOWN"),
        "{err}"
    );
    assert!(visible_entries(&root).is_empty());
    assert!(
        !transfer::staging::staging_dir(&root, b"r.git").exists(),
        "refused before staging"
    );

    // Giving files to itself needs no capability; nor does the default.
    let chown = format!("{0}:{0}", daemon.name);
    assert_ok(&send(&keys, &bare, &d.addr, "r.git", &["--chown", &chown]));
    daemon.git_ok(&root.join("r.git"), &["fsck", "--no-progress"]);
    assert_ok(&send(&keys, &bare, &d.addr, "plain.git", &[]));
    for (p, uid, _) in owners(&root.join("plain.git")) {
        assert_eq!(uid, daemon.uid, "{}", p.display());
    }
    drop(d);

    // The same user with the capabilities the refusal named gives files away: modes
    // (set-gid included), times, xattrs and links as on A, and A's owners.
    let d = daemon.run_shardrecv(&keys, &root, "+chown,+dac_override,+fowner,+fsetid");
    assert_ok(&send(
        &keys,
        &bare,
        &d.addr,
        "kept.git",
        &["--preserve-owner"],
    ));
    let installed = root.join("kept.git");
    for (p, uid, gid) in owners(&installed) {
        assert_eq!((uid, gid), (0, 0), "{}", p.display());
    }
    assert_same_tree(&bare, &installed);
}

/// A pre-copy settles the staged files' metadata (git's read-only modes included); a file of
/// mode 0444 that changes before the final pass must still be replaced by a receiver that is
/// not root (it cannot open such a file for writing).
#[test]
fn a_read_only_file_changed_after_a_precopy_is_replaced_by_a_receiver_that_is_not_root() {
    let Some(daemon) = TestUser::create("s") else {
        return;
    };
    let keys = Keys::new();
    let (root, d) = daemon.receiver_with_its_own_root(&keys);
    let src = keys.path("src");
    std::fs::create_dir_all(src.join("objects/info")).unwrap();
    let graph = src.join("objects/info/commit-graph");
    std::fs::write(&graph, "graph one").unwrap();
    std::fs::set_permissions(&graph, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::write(src.join("packed-refs"), "refs\n").unwrap();
    assert_ok(&send(&keys, &src, &d.addr, "r.git", &["--stage-only"]));
    // The staged copy is settled: read-only, and not root's to write.
    let staged =
        transfer::staging::staging_dir(&root, b"r.git").join("tree/objects/info/commit-graph");
    assert_eq!(
        std::fs::metadata(&staged).unwrap().permissions().mode() & 0o777,
        0o444
    );
    // A gc rewrites the commit-graph (same mode, other bytes and size) before the freeze.
    std::fs::set_permissions(&graph, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&graph, "graph two, longer").unwrap();
    std::fs::set_permissions(&graph, std::fs::Permissions::from_mode(0o444)).unwrap();
    assert_ok(&send(&keys, &src, &d.addr, "r.git", &["--resume"]));
    assert_same_tree(&src, &root.join("r.git"));
    assert_eq!(
        std::fs::read(root.join("r.git/objects/info/commit-graph")).unwrap(),
        b"graph two, longer"
    );
}
