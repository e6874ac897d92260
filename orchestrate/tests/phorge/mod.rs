//! `shardmove migrate --plane phorge` against a real Phorge cluster: the lab kit of
//! `../shared/phorge-lab/` (MariaDB, Phorge, a front and two repository devices in mount
//! namespaces), a client pushing and reading over HTTP through the front meanwhile.
//!
//! Asserted, per move: a push is refused (503) only inside the freeze and accepted after it,
//! landing on the new device; every acknowledged push is there; the version rows show the
//! target promoted and the source's row gone; the repository's service is the target; `git
//! fsck` passes on the target's copy; a clone through the front works; reads fail only inside
//! the freeze (the clusterize -> promote gap). Moved there and back, and once with the driver
//! killed (SIGKILL) between clusterize and promote, then taken over.
//!
//! Skipped, saying why, only without root or mount namespaces; a missing kit fails.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::util::{self, git, Env};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The kit: `$SHARDMOVE_PHORGE_LAB`, else `shared/phorge-lab` beside the project.
fn kit() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHARDMOVE_PHORGE_LAB") {
        return PathBuf::from(dir);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = here.join("../../shared/phorge-lab");
    assert!(
        dir.join("setup.sh").is_file(),
        "the Phorge lab kit is not at {} (set SHARDMOVE_PHORGE_LAB)",
        dir.display()
    );
    dir
}

/// Why the lab cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the Phorge lab needs root (mount namespaces, apt)".into());
    }
    let ok = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "mount namespaces are unavailable (unshare -m failed)".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running lab, torn down on drop.
struct Lab {
    dir: PathBuf,
    http: u16,
    recv: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.recv {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(self.dir.join("teardown.sh"))
            .arg("--rm")
            .env("LAB", &self.dir)
            .status();
    }
}

impl Lab {
    fn start(dir: &Path) -> Lab {
        let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let out = Command::new(kit().join("setup.sh"))
            .env("LAB", dir)
            .env("LAB_DB_PORT", ports[0].to_string())
            .env("LAB_HTTP_PORT", ports[1].to_string())
            .env("LAB_A_HTTP_PORT", ports[2].to_string())
            .env("LAB_B_HTTP_PORT", ports[3].to_string())
            .output()
            .expect("run the lab's setup.sh");
        let lab = Lab {
            dir: dir.to_path_buf(),
            http: ports[1],
            recv: Vec::new(),
        };
        assert!(
            out.status.success(),
            "setup.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn url(&self) -> String {
        format!(
            "http://admin:vcspass-123@127.0.0.1:{}/source/lab.git",
            self.http
        )
    }

    fn conduit(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http)
    }

    fn sql(&self, query: &str) -> String {
        let out = Command::new(self.dir.join("tools/sql.sh"))
            .args(["-N", "-e", query])
            .env("LAB", &self.dir)
            .output()
            .expect("sql.sh");
        assert!(out.status.success(), "{query}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `shardrecv` for device `d` (a|b), in that device's mount namespace, rooted at the
    /// lab's `repository.default-local-path`; its address.
    fn start_recv(&mut self, d: &str, key: &Path, allow: &Path) -> String {
        let mut child = Command::new(self.dir.join("tools/ondev.sh"))
            .arg(d)
            .arg(crate::migration::tool("shardrecv"))
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(self.dir.join("repo"))
            .arg("--identity")
            .arg(key)
            .arg("--allow")
            .arg(allow)
            .env("LAB", &self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shardrecv on a device");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("shardrecv's address");
        self.recv.push(child);
        line.split_whitespace().nth(1).expect("address").to_string()
    }

    /// (device, version) rows of R1.
    fn versions(&self) -> Vec<(String, String)> {
        self.sql(
            "SELECT d.name, v.repositoryVersion FROM phorge_repository.repository_workingcopyversion v \
             JOIN phorge_repository.repository r ON r.phid = v.repositoryPHID \
             JOIN phorge_almanac.almanac_device d ON d.phid = v.devicePHID WHERE r.id = 1",
        )
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    fn service(&self) -> String {
        self.sql(
            "SELECT s.name FROM phorge_repository.repository r \
             JOIN phorge_almanac.almanac_service s ON s.phid = r.almanacServicePHID WHERE r.id = 1",
        )
    }

    /// Seconds between the last maintenance start and stop, as Phorge's own transactions
    /// record them (whole seconds).
    fn maintenance_window_s(&self) -> i64 {
        let rows = self.sql(
            "SELECT t.dateCreated, t.newValue FROM phorge_repository.repository_transaction t \
             JOIN phorge_repository.repository r ON r.phid = t.objectPHID \
             WHERE r.id = 1 AND t.transactionType = 'maintenance' ORDER BY t.id DESC LIMIT 2",
        );
        let times: Vec<i64> = rows
            .lines()
            .filter_map(|l| l.split('\t').next()?.parse().ok())
            .collect();
        assert_eq!(
            times.len(),
            2,
            "maintenance start and stop recorded: {rows}"
        );
        times[0] - times[1]
    }
}

/// What the HTTP client saw: pushes acknowledged (branch, sha), refusals and failed reads,
/// with their times (unix ms).
#[derive(Default)]
struct Seen {
    acked: Vec<(String, String)>,
    refused: Vec<(i64, String)>,
    failed_reads: Vec<(i64, String)>,
}

/// Pushes a new branch, again and again, and reads (`ls-remote`), through the front.
fn client(
    lab: &Lab,
    work: &Path,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> std::thread::JoinHandle<()> {
    let url = lab.url();
    let work = work.to_path_buf();
    std::thread::spawn(move || {
        let parent = work.parent().expect("parent").to_path_buf();
        if !work.exists() {
            let clone = git(&parent, &["clone", "-q", &url, &work.display().to_string()]);
            assert_eq!(clone.code, 0, "clone through the front: {}", clone.stderr);
        }
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let branch = format!("c{}-{n}", std::process::id());
            let sha = util::commit(&work, &branch);
            let t = now_ms();
            let push = git(
                &work,
                &["push", "-q", &url, &format!("HEAD:refs/heads/{branch}")],
            );
            let mut s = seen.lock().unwrap();
            if push.code == 0 {
                s.acked.push((branch, sha));
            } else {
                s.refused.push((t, push.stderr.trim().to_string()));
            }
            drop(s);
            let t = now_ms();
            let read = git(&work, &["ls-remote", "-q", &url, "HEAD"]);
            if read.code != 0 {
                seen.lock()
                    .unwrap()
                    .failed_reads
                    .push((t, read.stderr.trim().to_string()));
            }
        }
    })
}

struct Move {
    frozen_at_ms: i64,
    thawed_at_ms: i64,
    readonly_s: f64,
}

fn migrate_args(lab: &Lab, env: &Env, from: &str, to: &str) -> Vec<String> {
    [
        "migrate",
        "--plane",
        "phorge",
        "--phorge-root",
        &lab.dir.join("phorge").display().to_string(),
        "--conduit",
        &lab.conduit(),
        "--token-file",
        &lab.dir.join("admin.api-token").display().to_string(),
        "--from",
        from,
        "--to",
        to,
        "--identity",
        &env.path("send.key").display().to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Moves R1 from `from` to `to` (with `points` on the first run) and checks the result.
#[allow(clippy::too_many_arguments)]
fn move_and_check(
    lab: &Lab,
    env: &Env,
    from: &str,
    to: &str,
    to_device: &str,
    from_device: &str,
    points: Option<&str>,
) -> Move {
    let args = migrate_args(lab, env, from, to);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Some(points) = points {
        let out = env
            .sm_command(&args)
            .env("SHARDMOVE_FAILPOINTS", points)
            .output()
            .expect("migrate");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "killed at {points}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run = env.sm(&args);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    if points.is_some() {
        assert!(
            run.stderr.contains("taking over migration"),
            "{}",
            run.stderr
        );
    }
    let summary: Value = serde_json::from_str(&run.stdout).expect("summary");
    assert_eq!(summary["state"], "done", "{summary}");
    let r = &summary["status"]["repositories"][0];
    assert_eq!(r["state"], "done", "{r}");
    // Phorge's registry.
    assert_eq!(lab.service(), to);
    let versions = lab.versions();
    assert_eq!(versions.len(), 1, "one version row: {versions:?}");
    assert_eq!(versions[0].0, to_device, "{versions:?}");
    assert!(
        !versions.iter().any(|(d, _)| d == from_device),
        "the source's row is gone: {versions:?}"
    );
    // The target's copy.
    let dev = if to_device.contains("-b") {
        "dev-b"
    } else {
        "dev-a"
    };
    let copy = lab.dir.join(dev).join("repo/1");
    util::git_ok(&copy, &["fsck", "--no-progress"]);
    Move {
        frozen_at_ms: r["frozen_at_ms"].as_i64().expect("window start"),
        thawed_at_ms: r["thawed_at_ms"].as_i64().expect("window end"),
        readonly_s: r["readonly_seconds"].as_f64().expect("window"),
    }
}

pub(crate) fn phorge_repository_moves_there_and_back_with_a_client_pushing(env: &Env) {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let mut lab = Lab::start(&env.path("lab"));
    // Keys and each device's shardrecv, in the device's mount namespace.
    let send_fp = crate::migration::keygen("shardsend", &env.path("send.key"));
    let allow = env.path("allow.txt");
    std::fs::write(&allow, format!("{send_fp}\n")).unwrap();
    let mut fps = Vec::new();
    for d in ["a", "b"] {
        let key = env.path(&format!("recv-{d}.key"));
        let fp = crate::migration::keygen("shardrecv", &key);
        let addr = lab.start_recv(d, &key, &allow);
        fps.push((d, addr, fp));
    }
    let token = lab.dir.join("admin.api-token").display().to_string();
    for (d, addr, fp) in &fps {
        let host = format!("exec:{} {d}", lab.dir.join("tools/ondev.sh").display());
        env.ok(&[
            "phorge",
            "device",
            &format!("repo-{d}.lab"),
            "--host",
            &host,
            "--transfer",
            addr,
            "--fingerprint",
            fp,
            "--conduit",
            &lab.conduit(),
            "--token-file",
            &token,
        ]);
    }
    // `ondev.sh` needs LAB in the environment of every step.
    env.set_var("LAB", &lab.dir);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let work = env.path("client");
    let pusher = client(&lab, &work, stop.clone(), seen.clone());
    // Let the client get going before each move.
    let settle = || std::thread::sleep(Duration::from_millis(800));
    settle();
    let mut moves = Vec::new();
    moves.push(move_and_check(
        &lab,
        env,
        "repos-a.lab",
        "repos-b.lab",
        "repo-b.lab",
        "repo-a.lab",
        None,
    ));
    let window_ab = lab.maintenance_window_s();
    settle();
    moves.push(move_and_check(
        &lab,
        env,
        "repos-b.lab",
        "repos-a.lab",
        "repo-a.lab",
        "repo-b.lab",
        None,
    ));
    let window_ba = lab.maintenance_window_s();
    settle();
    // Killed between clusterize and promote (reads fail there), then taken over.
    moves.push(move_and_check(
        &lab,
        env,
        "repos-a.lab",
        "repos-b.lab",
        "repo-b.lab",
        "repo-a.lab",
        Some("after-journal-clusterized"),
    ));
    settle();
    // Pushes through Phorge's front take seconds on a loaded machine: let the client go on
    // (a while at most) until it has enough acknowledged pushes for the checks below, the
    // last ones on B.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().acked.len() <= 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    pusher.join().expect("client");

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.acked.len() > 3, "the client got pushes through");
    // Every acknowledged push is on the final home (B), whichever device took it.
    let b = lab.dir.join("dev-b/repo/1");
    for (branch, sha) in &seen.acked {
        let got = git(&b, &["rev-parse", &format!("refs/heads/{branch}")]);
        assert_eq!(got.stdout.trim(), sha, "acknowledged push {branch} lost");
    }
    // Refused only inside a freeze (a push started just before the freeze may be refused a
    // moment after it began): with HTTP 503 (read-only), or with 500 when it reached Phorge
    // in the clusterize -> promote gap, where the repository has no leader to write to (the
    // same gap in which reads fail; seen on a loaded machine).
    let inside = |t: i64| {
        moves
            .iter()
            .any(|m| t >= m.frozen_at_ms - 2_000 && t <= m.thawed_at_ms + 100)
    };
    for (t, why) in &seen.refused {
        assert!(inside(*t), "push refused outside a freeze at {t}: {why}");
        assert!(
            why.contains("503") || why.contains("HTTP 500"),
            "refused with something else than 503 or 500: {why}"
        );
    }
    for (t, why) in &seen.failed_reads {
        assert!(inside(*t), "read failed outside a freeze at {t}: {why}");
    }
    // A clone through the front, after it all.
    let clone = env.path("after");
    let out = git(
        env.dir.path(),
        &["clone", "-q", &lab.url(), &clone.display().to_string()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    println!(
        "phorge moves: read-only windows {:?} s (ours); Phorge's transactions A->B {window_ab} s, B->A {window_ba} s; \
         {} pushes acknowledged, {} refused, {} failed reads",
        moves.iter().map(|m| (m.readonly_s * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        seen.acked.len(),
        seen.refused.len(),
        seen.failed_reads.len()
    );
}
