//! Helpers for the end-to-end tests: keys, a real `shardrecv` daemon on loopback, running
//! `shardsend`, comparing trees, and a raw protocol client for hostile-input tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use transfer::identity::{Fingerprint, Identity};

pub fn shardsend() -> &'static str {
    env!("CARGO_BIN_EXE_shardsend")
}

pub fn shardrecv() -> &'static str {
    env!("CARGO_BIN_EXE_shardrecv")
}

/// A scratch directory with a receiver key, a sender key and an allow-list.
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub recv_key: PathBuf,
    pub send_key: PathBuf,
    pub allow: PathBuf,
    pub recv_fp: Fingerprint,
    pub send_fp: Fingerprint,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().expect("tempdir");
        let recv_key = dir.path().join("recv.key");
        let send_key = dir.path().join("send.key");
        let recv_fp = Identity::generate(&recv_key).expect("recv key").fingerprint;
        let send_fp = Identity::generate(&send_key).expect("send key").fingerprint;
        let allow = dir.path().join("allow.txt");
        std::fs::write(&allow, format!("# test senders\n{send_fp}  # the sender\n")).unwrap();
        Keys {
            dir,
            recv_key,
            send_key,
            allow,
            recv_fp,
            send_fp,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running `shardrecv serve` on 127.0.0.1; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub root: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub fn start(keys: &Keys, root: &Path) -> Daemon {
        Daemon::start_on(keys, root, "127.0.0.1:0")
    }

    pub fn start_on(keys: &Keys, root: &Path, listen: &str) -> Daemon {
        Daemon::start_in(keys, root, listen, &[])
    }

    /// Starts the daemon through `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_in(keys: &Keys, root: &Path, listen: &str, wrapper: &[&str]) -> Daemon {
        Daemon::start_with(keys, root, listen, wrapper, &[])
    }

    /// Starts the daemon with extra `serve` arguments (e.g. `--max-transfers 4`).
    pub fn start_with(
        keys: &Keys,
        root: &Path,
        listen: &str,
        wrapper: &[&str],
        extra: &[&str],
    ) -> Daemon {
        Daemon::spawn(
            Path::new(shardrecv()),
            keys,
            root,
            listen,
            wrapper,
            extra,
            &[],
        )
    }

    /// Starts another build's daemon (`exe`, e.g. the previous release's) with this one's
    /// arguments, which every release since 0.1.0 understands.
    pub fn start_exe(exe: &Path, keys: &Keys, root: &Path) -> Daemon {
        Daemon::spawn(exe, keys, root, "127.0.0.1:0", &[], &[], &[])
    }

    /// Starts the daemon with `SHARDMOVE_FAILPOINTS=spec` (see `transfer::failpoint`).
    pub fn start_with_failpoints(keys: &Keys, root: &Path, listen: &str, spec: &str) -> Daemon {
        Daemon::spawn(
            Path::new(shardrecv()),
            keys,
            root,
            listen,
            &[],
            &[],
            &[("SHARDMOVE_FAILPOINTS", spec)],
        )
    }

    /// `exe serve` (this build's shardrecv unless another build's is named) on `listen`.
    fn spawn(
        exe: &Path,
        keys: &Keys,
        root: &Path,
        listen: &str,
        wrapper: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        std::fs::create_dir_all(root).unwrap();
        let log = root
            .parent()
            .unwrap()
            .join(format!("recv-{}.log", std::process::id()));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(["serve", "--listen", listen, "--root"])
            .arg(root)
            .arg("--identity")
            .arg(&keys.recv_key)
            .arg("--allow")
            .arg(&keys.allow)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("spawn shardrecv");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("shardrecv did not report its address: {line:?}"))
            .to_string();
        Daemon {
            child,
            addr,
            root: root.to_path_buf(),
            log,
        }
    }

    /// SIGTERM, as an operator stops it: it closes its connections, then exits.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// Waits (up to `timeout`) for the daemon to die by SIGKILL, as a failpoint does.
    pub fn killed_itself(&mut self, timeout: Duration) -> bool {
        use std::os::unix::process::ExitStatusExt;
        wait_for(
            timeout,
            || matches!(self.child.try_wait(), Ok(Some(s)) if s.signal() == Some(libc::SIGKILL)),
        )
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `shardsend SRC ADDR DEST --identity --peer --json --no-progress EXTRA...` as a command.
pub fn send_cmd(keys: &Keys, src: &Path, addr: &str, dest: &str, extra: &[&str]) -> Command {
    send_cmd_in(&[], keys, src, addr, dest, extra)
}

/// [`send_cmd`] run through `wrapper` (e.g. `ip netns exec NS`).
pub fn send_cmd_in(
    wrapper: &[&str],
    keys: &Keys,
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    send_via(
        wrapper,
        Path::new(shardsend()),
        keys,
        src,
        addr,
        dest,
        extra,
    )
}

/// [`send_cmd`] of another build's `shardsend` (`exe`, e.g. the previous release's).
pub fn send_cmd_exe(
    exe: &Path,
    keys: &Keys,
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    send_via(&[], exe, keys, src, addr, dest, extra)
}

/// `exe` (through `wrapper`, if any) with [`send_args`], `--no-progress` and `extra`.
fn send_via(
    wrapper: &[&str],
    exe: &Path,
    keys: &Keys,
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    let mut c = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    send_args(&mut c, keys, src, addr, dest);
    c.arg("--no-progress").args(extra);
    c
}

/// What every test send says: source, receiver, destination, keys, a JSON summary.
fn send_args(c: &mut Command, keys: &Keys, src: &Path, addr: &str, dest: &str) {
    c.arg(src)
        .arg(addr)
        .arg(dest)
        .arg("--identity")
        .arg(&keys.send_key)
        .arg("--peer")
        .arg(keys.recv_fp.to_string())
        .arg("--json")
        // The test's own caches (scan cache, path memory), not the user's.
        .env("XDG_CACHE_HOME", keys.dir.path().join("cache"));
}

/// `shardsend SRC ADDR DEST --identity --peer --json EXTRA...`: with the JSON progress events
/// on stderr (no `--no-progress`).
pub fn send_cmd_with_progress(
    keys: &Keys,
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(shardsend());
    send_args(&mut c, keys, src, addr, dest);
    c.args(extra);
    c
}

pub fn send(keys: &Keys, src: &Path, addr: &str, dest: &str, extra: &[&str]) -> Output {
    send_cmd(keys, src, addr, dest, extra)
        .output()
        .expect("run shardsend")
}

/// The JSON summary (or error object) shardsend printed.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn assert_ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "shardsend failed ({:?}): {}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    json(out)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for tests.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_random(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, random_bytes(len, seed)).unwrap();
}

/// Asserts two trees are identical: names, kinds, bytes, permissions, mtimes, link targets,
/// extended attributes, and which files are hardlinks of each other.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_entries(a, b);
    assert_eq!(
        hardlink_groups(a),
        hardlink_groups(b),
        "hardlinks of {}",
        b.display()
    );
}

/// Extended attributes of `p` itself, sorted.
pub fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .map(|n| {
            let value = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n.to_string_lossy().into_owned(), value)
        })
        .collect();
    v.sort();
    v
}

/// Relative paths of the files with several names, grouped by inode, sorted.
pub fn hardlink_groups(root: &Path) -> Vec<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<u64, Vec<String>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else if m.is_file() && m.nlink() > 1 {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.entry(m.ino()).or_default().push(rel);
            }
        }
    }
    let mut by_inode = std::collections::BTreeMap::new();
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        walk(root, root, &mut by_inode);
    }
    let mut groups: Vec<Vec<String>> = by_inode
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

fn assert_same_entries(a: &Path, b: &Path) {
    let ma = std::fs::symlink_metadata(a).unwrap();
    let mb =
        std::fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{} missing: {e}", b.display()));
    assert_eq!(
        ma.file_type().is_dir(),
        mb.file_type().is_dir(),
        "{}",
        b.display()
    );
    assert_eq!(
        ma.file_type().is_symlink(),
        mb.file_type().is_symlink(),
        "{}",
        b.display()
    );
    assert_eq!(xattrs_of(a), xattrs_of(b), "xattrs of {}", b.display());
    if ma.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(a).unwrap(),
            std::fs::read_link(b).unwrap()
        );
        assert_eq!(ma.mtime(), mb.mtime(), "symlink mtime of {}", b.display());
        return;
    }
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        b.display()
    );
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {}",
        b.display()
    );
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", b.display());
        for n in na {
            assert_same_entries(&a.join(&n), &b.join(&n));
        }
    } else {
        assert_eq!(ma.len(), mb.len(), "size of {}", b.display());
        assert_eq!(file_hash(a), file_hash(b), "content of {}", b.display());
    }
}

pub fn file_hash(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

/// Everything under `root` except the staging directory.
pub fn visible_entries(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".shardrecv")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Verified-chunk records in the journal of `dest` under `root`.
pub fn journal_records(root: &Path, dest: &str) -> u64 {
    transfer::staging::journal_records(root, dest.as_bytes())
}

/// Two network namespaces joined by a rate-limited veth (scripts/netns.sh); removed on drop.
pub struct NetnsPair {
    pub name: String,
    pub subnet: String,
}

impl NetnsPair {
    pub fn up(rate: &str) -> NetnsPair {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 10_000;
        let name = format!("sm{id}x{n}");
        let subnet = format!("10.231.{}", (id * 7 + n) % 250 + 1);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns.sh");
        let status = Command::new(script)
            .args(["up", &name, &subnet, rate])
            .status()
            .expect("run scripts/netns.sh");
        assert!(status.success(), "netns setup failed");
        NetnsPair { name, subnet }
    }

    pub fn exec(&self, side: char) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            format!("{}-{side}", self.name),
        ]
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns.sh");
        let _ = Command::new(script).args(["down", &self.name]).status();
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace's `linkemu` (bench crate), which `cargo test --workspace` builds beside this
/// test binary's `deps/` directory; `None` when it was not built.
pub fn linkemu() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("linkemu");
    path.is_file().then_some(path)
}

/// The workspace's `handshake-flood` (bench crate), built like [`linkemu`]; `None` when it
/// was not built.
pub fn handshake_flood() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("handshake-flood");
    path.is_file().then_some(path)
}

/// A `linkemu` link between two namespaces it creates (A 10.250.88.1, B 10.250.88.2); ended
/// with SIGTERM on drop (its watchdog removes the namespaces even if that fails).
pub struct Link {
    child: Child,
    /// Kept open: linkemu prints its counters there when it ends.
    _stdout: BufReader<std::process::ChildStdout>,
    pub ns_a: String,
    pub ns_b: String,
    pub addr_b: String,
}

impl Link {
    /// Starts `linkemu --json --name PREFIX ARGS...` and waits for its ready line.
    pub fn start(exe: &Path, tag: &str, args: &[&str]) -> Link {
        let prefix = format!("st{}{tag}", std::process::id() % 100_000);
        let mut child = Command::new(exe)
            .args(["--json", "--name", &prefix])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start linkemu");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("linkemu stdout"));
        stdout.read_line(&mut line).expect("linkemu ready line");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("linkemu ready line {line:?} is not JSON: {e}"));
        let field = |k: &str| ready[k].as_str().expect("ready line field").to_string();
        Link {
            ns_a: field("ns_a"),
            ns_b: field("ns_b"),
            addr_b: field("addr_b"),
            child,
            _stdout: stdout,
        }
    }

    /// `ip netns exec` into side `A` or `B`.
    pub fn exec(&self, side: char) -> Vec<String> {
        let ns = if side == 'a' { &self.ns_a } else { &self.ns_b };
        vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()]
    }

    /// Takes the link down (`true`) or brings it back up.
    pub fn set_down(&self, down: bool) {
        let sig = if down { libc::SIGUSR1 } else { libc::SIGUSR2 };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Runs git with a fixed identity and no user or system configuration.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(dir, args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A work repository `dir/work` with one commit of a README and `files`, and its bare
/// clone `dir/a.git` (made through the pack protocol, so its objects are in one pack).
/// Returns (bare, work).
pub fn bare_repo(dir: &Path, files: &[(&str, &[u8])]) -> (PathBuf, PathBuf) {
    let work = dir.join("work");
    git(dir, &["init", "-q", "-b", "main", "work"]);
    std::fs::write(work.join("README"), "hello\n").unwrap();
    for (name, content) in files {
        std::fs::write(work.join(name), content).unwrap();
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "first"]);
    git(
        dir,
        &["clone", "-q", "--bare", "--no-local", "work", "a.git"],
    );
    (dir.join("a.git"), work)
}

pub fn git_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid");
    c
}

/// A `shardrecv serve` started with exactly `args` (no flags added), its stdout kept for
/// the lines after the first; killed on drop.
pub struct Served {
    pub child: Child,
    pub addr: String,
    pub stdout: BufReader<ChildStdout>,
    pub log: PathBuf,
}

impl Served {
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let log = dir.join(format!("served-{}.log", rand_suffix()));
        let mut child = Command::new(shardrecv())
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["listening", addr, "fingerprint", _] => addr.to_string(),
            _ => panic!(
                "shardrecv did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        Served {
            child,
            addr,
            stdout,
            log,
        }
    }

    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `shardsend` with the key at `key` instead of the usual sender's.
pub fn send_as(
    keys: &Keys,
    key: &Path,
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    send_keyed(key, &[keys.recv_fp], src, addr, dest, extra)
}

/// `shardsend` with the key at `key`, pinning `pins` in this order, giving up a connection
/// after 5 s.
pub fn send_keyed(
    key: &Path,
    pins: &[Fingerprint],
    src: &Path,
    addr: &str,
    dest: &str,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(shardsend());
    c.arg(src)
        .arg(addr)
        .arg(dest)
        .arg("--identity")
        .arg(key)
        .args(["--json", "--no-progress", "--connect-timeout", "5"]);
    for fp in pins {
        c.arg("--peer").arg(fp.to_string());
    }
    c.args(extra);
    c
}

pub fn small_tree(dir: &Path, bytes: usize) -> PathBuf {
    let src = dir.join(format!("src-{}", rand_suffix()));
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("pack"), bytes, 7);
    std::fs::write(src.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    src
}

pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

/// A unix datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
pub struct NotifySocket {
    pub socket: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        NotifySocket { socket, path }
    }

    /// The next datagram (waits up to 20 s).
    pub fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self.socket.recv(&mut buf).expect("no sd_notify datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}
