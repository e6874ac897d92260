//! Issue 15, item 2: a receiver's key rotated with overlap while transfers run. The receiver
//! (a real `shardrecv`, its identities in a config file) goes from the old key, to old + new,
//! to new + old (the primary switched), to the new key alone, each step a SIGHUP; senders
//! pinning only the old key, only the new one, and both, start before, during and after the
//! steps. Every one that pins a key the receiver serves succeeds; long transfers started
//! before the first step run through all of them; a sender pinning only a key the receiver
//! dropped is refused with both keys named.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use transfer::identity::{Fingerprint, Identity};

use crate::util::*;

/// `shardsend` with the usual sender key, pinning `pins` in this order.
fn send_pinning(
    keys: &Keys,
    pins: &[Fingerprint],
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    send_keyed(&keys.send_key, pins, src, addr, dest, extra)
}

/// A receiver whose identities come from its config file, changed and reloaded by the test.
struct Rotating<'a> {
    keys: &'a Keys,
    config: PathBuf,
    root: PathBuf,
    served: Served,
    notify: NotifySocket,
}

impl<'a> Rotating<'a> {
    fn write_config(config: &Path, root: &Path, identities: &[&Path], allow: &Path) {
        let list: Vec<String> = identities.iter().map(|p| toml_path(p)).collect();
        std::fs::write(
            config,
            format!(
                "listen = \"127.0.0.1:0\"\nroot = {}\nidentity = [{}]\nallow = {}\n",
                toml_path(root),
                list.join(", "),
                toml_path(allow)
            ),
        )
        .unwrap();
    }

    fn start(keys: &'a Keys, identities: &[&Path]) -> Rotating<'a> {
        let root = keys.path("root");
        let config = keys.path("rotating.toml");
        Rotating::write_config(&config, &root, identities, &keys.allow);
        let notify = NotifySocket::new(keys.dir.path());
        let served = Served::start(
            keys.dir.path(),
            &[
                "--config",
                config.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
            ],
            &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
        );
        assert_eq!(notify.next(), "READY=1");
        Rotating {
            keys,
            config,
            root,
            served,
            notify,
        }
    }

    /// Rewrites the config with `identities` (and `allow`) and reloads; returns once the
    /// daemon says it is ready again.
    fn reload_with(&self, identities: &[&Path], allow: &Path) {
        Rotating::write_config(&self.config, &self.root, identities, allow);
        self.served.signal(libc::SIGHUP);
        assert!(self.notify.next().starts_with("RELOADING=1"));
        assert_eq!(self.notify.next(), "READY=1");
    }

    fn reload(&self, identities: &[&Path]) {
        self.reload_with(identities, &self.keys.allow);
    }

    /// A short transfer pinning `pins`; returns the key the receiver presented.
    fn quick(&self, src: &Path, pins: &[Fingerprint], dest: &str) -> String {
        let out = send_pinning(self.keys, pins, src, &self.served.addr, dest, &[])
            .output()
            .unwrap();
        let summary = assert_ok(&out);
        assert_same_tree(src, &self.root.join(dest));
        summary["receiver_key"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A transfer pinning `pins` that must be refused; returns its stderr.
    fn refused(&self, src: &Path, pins: &[Fingerprint], dest: &str) -> String {
        let out = send_pinning(self.keys, pins, src, &self.served.addr, dest, &[])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(!self.root.join(dest).exists());
        stderr(&out)
    }
}

/// A long transfer (rate-limited) in flight: started, and seen writing on the receiver.
struct Long {
    dest: String,
    child: Child,
    /// The key it must have been given.
    expect: Fingerprint,
}

fn start_long(
    r: &Rotating,
    src: &Path,
    pins: &[Fingerprint],
    dest: &str,
    expect: Fingerprint,
) -> Long {
    let child = send_pinning(
        r.keys,
        pins,
        src,
        &r.served.addr,
        dest,
        &["--bwlimit", "2M"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || journal_records(&r.root, dest)
            >= 1),
        "{dest} never started writing"
    );
    Long {
        dest: dest.to_string(),
        child,
        expect,
    }
}

/// The key the receiver presents to a sender that names none (an older shardsend).
fn primary(addr: &str) -> Fingerprint {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(transfer::quic::probe(
        addr.parse().unwrap(),
        &[],
        Duration::from_secs(5),
    ))
    .unwrap()
}

#[test]
fn a_key_rotation_while_transfers_run_fails_none() {
    let keys = Keys::new();
    let old_key = keys.recv_key.clone();
    let old = keys.recv_fp;
    let new_key = keys.path("recv-new.key");
    let new = Identity::generate(&new_key).unwrap().fingerprint;
    let mut r = Rotating::start(&keys, &[&old_key]);
    let line = r.served.next_line();
    let metrics = line
        .trim()
        .strip_prefix("metrics http://")
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line: {line:?}"))
        .to_string();
    // 32 MiB at 2 MB/s: 16 s, longer than all the steps below.
    let big = small_tree(keys.dir.path(), 32 << 20);
    let small = small_tree(keys.dir.path(), 64 << 10);
    let (o, n) = (old.to_string(), new.to_string());
    let mut long = Vec::new();
    let mut quick = 0;
    let mut next = || {
        quick += 1;
        format!("q{quick}.git")
    };

    // Step 0: the receiver holds the old key only.
    long.push(start_long(&r, &big, &[old], "before-old.git", old));
    long.push(start_long(&r, &big, &[old, new], "before-both.git", old));
    assert_eq!(
        r.quick(&small, &[new, old], &next()),
        o,
        "falls back to the key it holds"
    );
    let err = r.refused(&small, &[new], &next());
    assert!(
        err.contains(&n) && err.contains(&o) && err.contains("--peer"),
        "{err}"
    );
    assert_eq!(primary(&r.served.addr), old);

    // Step 1: old + new, the old one primary. Each sender gets the first key it names.
    r.reload(&[&old_key, &new_key]);
    assert_eq!(r.quick(&small, &[old], &next()), o);
    assert_eq!(r.quick(&small, &[new], &next()), n);
    assert_eq!(r.quick(&small, &[new, old], &next()), n);
    assert_eq!(r.quick(&small, &[old, new], &next()), o);
    assert_eq!(primary(&r.served.addr), old);
    long.push(start_long(&r, &big, &[new], "added-new.git", new));

    // Step 2: the primary switched: senders naming no key get the new one; those naming the
    // old key still get it.
    r.reload(&[&new_key, &old_key]);
    assert_eq!(primary(&r.served.addr), new);
    assert_eq!(r.quick(&small, &[old], &next()), o);
    assert_eq!(r.quick(&small, &[new], &next()), n);
    assert_eq!(r.quick(&small, &[old, new], &next()), o);
    long.push(start_long(&r, &big, &[old], "switched-old.git", old));

    // Step 3: the old key dropped. New connections can no longer get it...
    r.reload(&[&new_key]);
    assert_eq!(r.quick(&small, &[new], &next()), n);
    assert_eq!(r.quick(&small, &[old, new], &next()), n);
    let err = r.refused(&small, &[old], &next());
    assert!(
        err.contains(&format!(
            "receiver key fingerprint {n} is not pinned (pinned: {o})"
        )),
        "{err}"
    );
    // ...while the transfers started before the first step are still running through it.
    for l in &mut long[..2] {
        assert!(
            l.child.try_wait().unwrap().is_none(),
            "{} ended before the rotation did: the test did not overlap it",
            l.dest
        );
    }

    // A reload with a bad key file changes nothing: neither the identities nor the
    // allow-list of the same reload (which would refuse our sender).
    let empty_allow = keys.path("nobody.txt");
    std::fs::write(&empty_allow, "# nobody\n").unwrap();
    r.reload_with(&[&new_key, &keys.path("missing.key")], &empty_allow);
    assert!(
        r.served.log().contains("nothing reloaded"),
        "{}",
        r.served.log()
    );
    assert!(r.served.log().contains("missing.key"), "{}", r.served.log());
    assert_eq!(r.quick(&small, &[new], &next()), n);
    assert_eq!(primary(&r.served.addr), new);

    // Every transfer that pinned a key the receiver held when it connected succeeded, each
    // with the key it asked for.
    let mut failures = Vec::new();
    for mut l in long {
        let mut out = String::new();
        l.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        l.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = l.child.wait().unwrap();
        if !status.success() {
            failures.push(format!("{}: {status}: {out}{err}", l.dest));
            continue;
        }
        let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(summary["receiver_key"], l.expect.to_string(), "{}", l.dest);
        assert_eq!(summary["reconnects"], 0, "{}", l.dest);
        assert_same_tree(&big, &r.root.join(&l.dest));
    }
    assert!(
        failures.is_empty(),
        "failed during the rotation: {failures:#?}"
    );

    // Metrics: only the new key is served now; the old one was presented along the way.
    let body = crate::operator::scrape(&metrics).1;
    assert!(
        body.contains(&format!(
            "shardrecv_identity{{fingerprint=\"{n}\",primary=\"true\"}} 1"
        )),
        "{body}"
    );
    assert!(
        !body.contains(&format!("shardrecv_identity{{fingerprint=\"{o}\"")),
        "{body}"
    );
    let presented = |fp: &str| {
        body.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "shardrecv_identity_presented_total{{fingerprint=\"{fp}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(presented(&o) >= 8, "{body}");
    assert!(presented(&n) >= 8, "{body}");
}

#[test]
fn identities_on_the_command_line_are_announced_and_checked() {
    let keys = Keys::new();
    let new_key = keys.path("recv-new.key");
    let new = Identity::generate(&new_key).unwrap().fingerprint;
    let root = keys.path("root");
    let args = |ids: &[&Path]| {
        let mut v: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--root".into(),
            root.display().to_string(),
            "--allow".into(),
            keys.allow.display().to_string(),
        ];
        for id in ids {
            v.push("--identity".into());
            v.push(id.display().to_string());
        }
        v
    };
    let a = args(&[&keys.recv_key, &new_key]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut d = Served::start(keys.dir.path(), &a, &[]);
    assert_eq!(
        d.next_line().trim(),
        format!("also fingerprint {new}"),
        "the second identity is announced after the first line"
    );
    assert_eq!(primary(&d.addr), keys.recv_fp);
    let small = small_tree(keys.dir.path(), 1000);
    let out = send_pinning(&keys, &[new], &small, &d.addr, "r.git", &[])
        .output()
        .unwrap();
    assert_eq!(assert_ok(&out)["receiver_key"], new.to_string());
    assert!(
        d.log()
            .contains(&format!("{} (primary), {new}", keys.recv_fp)),
        "{}",
        d.log()
    );
    drop(d);

    // The same key twice, or a key file that is not one, stops the daemon before it listens.
    let twice = args(&[&keys.recv_key, &keys.recv_key]);
    let out = Command::new(shardrecv())
        .arg("serve")
        .args(&twice)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("given twice"), "{}", stderr(&out));
    let bad = args(&[&keys.recv_key, &keys.allow]);
    let out = Command::new(shardrecv())
        .arg("serve")
        .args(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("allow.txt"), "{}", stderr(&out));
}
