//! `chaos-migrate`: the randomized soak of issue 10 (run by `scripts/chaos-migrate.sh`, not
//! in CI). Per run: a registry, shard A with REPOS repositories, shard B's shardrecv; a client
//! pushing a new branch, again and again, to wherever `shardmove repo show` says each
//! repository lives; `shardmove migrate --parallel 2 --bwlimit 6M` killed with SIGKILL KILLS
//! times (half of them just after a "frozen" line, the others at a random moment; every third
//! time B's shardrecv is killed too and restarted), each time taken over by a plain `migrate`
//! of the same services; then one last `migrate` to the end. Then the invariants:
//! - every repository `done`, on B, out of maintenance;
//! - `shardmove doctor` finds no problem (hooks agree with the registry, no staging left);
//! - every push that returned 0 is on B; B's copies pass `git fsck` and take a push, A's
//!   refuse one;
//! - the read-only windows (max, and how many over 1 s).
//!
//! Everything runs on 127.0.0.1 with the release binaries in `--bin`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

/// Randomized kill -9 soak of `shardmove migrate`, with a client pushing meanwhile.
#[derive(Debug, Parser)]
struct Args {
    /// Independent runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Repositories per run.
    #[arg(long, default_value_t = 12)]
    repos: usize,
    /// Kills of the driver per run.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Size of each repository's content.
    #[arg(long, default_value = "16M")]
    size: String,
    /// Directory of the release binaries.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Keep the work files here (default: a temporary directory, removed).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Random seed (default: from the clock); printed, so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
}

struct World {
    bin: PathBuf,
    dir: PathBuf,
    db: String,
    a: PathBuf,
    b: PathBuf,
    send_key: PathBuf,
    recv_key: PathBuf,
    allow: PathBuf,
    recv_addr: String,
    recv: Option<Child>,
}

impl World {
    fn sm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("shardmove"));
        c.args(args)
            .env("SHARDMOVE_DB", &self.db)
            .env("SHARDMOVE_ACTOR", "chaos")
            .current_dir(&self.dir);
        c
    }

    fn sm_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.sm(args).output()?;
        if !out.status.success() {
            bail!(
                "shardmove {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn sm_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        Ok(serde_json::from_str(&self.sm_ok(&all)?)?)
    }

    fn start_recv(&mut self) -> Result<()> {
        let mut child = Command::new(self.bin.join("shardrecv"))
            .args(["serve", "--listen", &self.recv_addr, "--root"])
            .arg(&self.b)
            .arg("--identity")
            .arg(&self.recv_key)
            .arg("--allow")
            .arg(&self.allow)
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("shardrecv.log"))?,
            )
            .spawn()
            .context("starting shardrecv")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("shardrecv stdout")?).read_line(&mut line)?;
        let addr = line
            .split_whitespace()
            .nth(1)
            .context("shardrecv printed no address")?;
        self.recv_addr = addr.to_string();
        self.recv = Some(child);
        Ok(())
    }

    fn kill_recv(&mut self) {
        if let Some(mut c) = self.recv.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn migrate(&self) -> Command {
        let mut c = self.sm(&[
            "migrate",
            "--instance",
            "t",
            "--from",
            "a",
            "--to",
            "b",
            "--parallel",
            "2",
            "--bwlimit",
            "6M",
            "--no-restart-daemons",
            "--identity",
        ]);
        c.arg(&self.send_key).arg("--json");
        c
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_recv();
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "chaos")
        .env("GIT_AUTHOR_EMAIL", "chaos@example.invalid")
        .env("GIT_COMMITTER_NAME", "chaos")
        .env("GIT_COMMITTER_EMAIL", "chaos@example.invalid")
        .output()?)
}

fn git_ok(dir: &Path, args: &[&str]) -> Result<String> {
    let out = git(dir, args)?;
    if !out.status.success() {
        bail!(
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn keygen(bin: &Path, tool: &str, out: &Path) -> Result<String> {
    let o = Command::new(bin.join(tool))
        .args(["keygen", "--out"])
        .arg(out)
        .output()?;
    if !o.status.success() {
        bail!("{tool} keygen failed");
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn setup(
    bin: &Path,
    dir: &Path,
    repos: usize,
    size: u64,
    rng: &mut fastrand::Rng,
) -> Result<World> {
    std::fs::create_dir_all(dir)?;
    let (a, b) = (dir.join("shard-a"), dir.join("shard-b"));
    std::fs::create_dir_all(&a)?;
    std::fs::create_dir_all(&b)?;
    let send_key = dir.join("send.key");
    let send_fp = keygen(bin, "shardsend", &send_key)?;
    let recv_key = dir.join("recv.key");
    let recv_fp = keygen(bin, "shardrecv", &recv_key)?;
    let allow = dir.join("allow.txt");
    std::fs::write(&allow, format!("{send_fp}\n"))?;
    let mut w = World {
        bin: bin.to_path_buf(),
        dir: dir.to_path_buf(),
        db: dir.join("registry.db").display().to_string(),
        a,
        b,
        send_key,
        recv_key,
        allow,
        recv_addr: "127.0.0.1:0".into(),
        recv: None,
    };
    w.start_recv()?;
    let (a_s, b_s) = (w.a.display().to_string(), w.b.display().to_string());
    w.sm_ok(&["service", "add", "a"])?;
    w.sm_ok(&["service", "add", "b"])?;
    w.sm_ok(&[
        "device",
        "add",
        "a1",
        "--service",
        "a",
        "--host",
        "localhost",
        "--transfer",
        "127.0.0.1:9",
        "--root",
        &a_s,
    ])?;
    let addr = w.recv_addr.clone();
    w.sm_ok(&[
        "device",
        "add",
        "b1",
        "--service",
        "b",
        "--host",
        "localhost",
        "--transfer",
        &addr,
        "--root",
        &b_s,
        "--fingerprint",
        &recv_fp,
    ])?;
    w.sm_ok(&["instance", "add", "t"])?;
    w.sm_ok(&["binding", "add", "--instance", "t", "--service", "a"])?;
    for i in 0..repos {
        let name = format!("r{i}");
        let repo = w.sm_json(&["repo", "create", "--instance", "t", &name])?;
        let bare = w.a.join(repo["path"].as_str().context("path")?);
        let work = dir.join(format!("seed-{name}"));
        git_ok(
            dir,
            &[
                "clone",
                "-q",
                &bare.display().to_string(),
                &work.display().to_string(),
            ],
        )?;
        // Incompressible content, in a few files (packs are immutable: most bytes move live).
        for f in 0..4 {
            let data: Vec<u8> = (0..size / 4).map(|_| rng.u8(..)).collect();
            std::fs::write(work.join(format!("blob{f}")), data)?;
        }
        git_ok(&work, &["add", "."])?;
        git_ok(&work, &["commit", "-q", "-m", "seed"])?;
        git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"])?;
    }
    Ok(w)
}

/// Pushes to every repository in turn, where the registry says it lives.
fn pusher(
    w: &World,
    repos: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String, String)>>>,
    refused: Arc<Mutex<u64>>,
) -> std::thread::JoinHandle<()> {
    let (bin, db, dir, a, b) = (
        w.bin.clone(),
        w.db.clone(),
        w.dir.clone(),
        w.a.clone(),
        w.b.clone(),
    );
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("r{}", n as usize % repos);
            let Ok(show) = Command::new(bin.join("shardmove"))
                .args(["repo", "show", &format!("t/{name}"), "--json"])
                .env("SHARDMOVE_DB", &db)
                .current_dir(&dir)
                .output()
            else {
                continue;
            };
            let Ok(repo) = serde_json::from_slice::<Value>(&show.stdout) else {
                continue;
            };
            let home = if repo["service"] == "b" { &b } else { &a }.join(format!("t/{name}.git"));
            let work = dir.join(format!("push-{name}"));
            if !work.exists()
                && git_ok(
                    &dir,
                    &[
                        "clone",
                        "-q",
                        &home.display().to_string(),
                        &work.display().to_string(),
                    ],
                )
                .is_err()
            {
                let _ = std::fs::remove_dir_all(&work);
                continue;
            }
            let branch = format!("p{n}");
            let Ok(sha) = git_ok(&work, &["commit", "-q", "--allow-empty", "-m", &branch])
                .and_then(|_| git_ok(&work, &["rev-parse", "HEAD"]))
            else {
                continue;
            };
            match git(
                &work,
                &[
                    "push",
                    "-q",
                    &home.display().to_string(),
                    &format!("HEAD:refs/heads/{branch}"),
                ],
            ) {
                Ok(o) if o.status.success() => acked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((name, branch, sha)),
                _ => *refused.lock().unwrap_or_else(|e| e.into_inner()) += 1,
            }
        }
    })
}

#[derive(Default, Debug)]
struct RunFigures {
    kills: usize,
    kills_after_frozen: usize,
    recv_kills: usize,
    finished_before_kill: usize,
    acked: usize,
    refused: u64,
    lost: usize,
    not_done: usize,
    stuck_read_only: usize,
    doctor_problems: u64,
    staging_left: usize,
    fsck_failures: usize,
    windows: Vec<f64>,
    final_runs: usize,
    /// What the soak did, with wall-clock times (UTC, as migrate's progress lines).
    events: Vec<String>,
    /// Per window over 1 s: the repository's progress lines from every driver, with the
    /// soak's kills between them, to see which step took the time.
    long_windows: Vec<String>,
}

/// Now as `HH:MM:SS.mmm` UTC, the clock of migrate's progress lines.
fn utc_clock_ms(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The breakdown of `repo`'s long window: its lines from each driver's log in the order the
/// drivers ran, then the soak's events, both sorted by their clock.
fn window_breakdown(dir: &Path, fig: &RunFigures, repo: &Value) -> String {
    let label = repo["repository"].as_str().unwrap_or("?");
    let mut lines: Vec<String> = Vec::new();
    let mut logs: Vec<(String, PathBuf)> = (0..fig.kills + fig.finished_before_kill)
        .map(|k| (format!("driver {k}"), dir.join(format!("migrate-{k}.log"))))
        .collect();
    logs.extend((1..=fig.final_runs).map(|n| {
        (
            format!("final driver {n}"),
            dir.join(format!("migrate-final-{n}.log")),
        )
    }));
    let needle = format!("{label}:");
    for (name, path) in logs {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            if line.contains(&needle) || line.contains("taking over") || line.contains("took over")
            {
                lines.push(format!("{line}    [{name}]"));
            }
        }
    }
    lines.extend(fig.events.iter().map(|e| format!("{e}    [soak]")));
    // Progress lines and events both start with HH:MM:SS.mmm: sorting them as text orders
    // them in time (within one UTC day).
    lines.sort();
    let at = |key: &str| {
        repo[key]
            .as_u64()
            .map(utc_clock_ms)
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "long window: {label} read-only {:.3} s (frozen {}, thawed {}):\n  {}",
        repo["readonly_seconds"].as_f64().unwrap_or(0.0),
        at("frozen_at_ms"),
        at("thawed_at_ms"),
        lines.join("\n  ")
    )
}

fn one_run(args: &Args, dir: &Path, rng: &mut fastrand::Rng) -> Result<RunFigures> {
    let size = parse_size(&args.size)?;
    let mut w = setup(&args.bin, dir, args.repos, size, rng)?;
    // The repositories just written (REPOS x SIZE) are still dirty in the page cache, and A
    // and B share this filesystem: without a sync, the first installs' syncfs on B flushes
    // them all inside the first two read-only windows (1.4-1.8 s instead of 0.3 s).
    let synced = Command::new("sync").status().context("running sync")?;
    if !synced.success() {
        bail!("sync failed: {synced}");
    }
    let mut fig = RunFigures::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0u64));
    let push = pusher(&w, args.repos, stop.clone(), acked.clone(), refused.clone());

    for k in 0..args.kills {
        let mut child = w
            .migrate()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let after_frozen = k % 2 == 0;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut log = std::fs::File::create(dir.join(format!("migrate-{k}.log")))?;
        let reader = std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains(": frozen in ") {
                    let _ = tx.send(());
                }
            }
        });
        let deadline = Duration::from_millis(rng.u64(200..3000));
        let t0 = Instant::now();
        let mut exited = None;
        loop {
            if let Some(status) = child.try_wait()? {
                exited = Some(status);
                break;
            }
            if after_frozen && rx.try_recv().is_ok() {
                fig.kills_after_frozen += 1;
                break;
            }
            if !after_frozen && t0.elapsed() >= deadline {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if exited.is_some() {
            fig.finished_before_kill += 1;
        } else {
            let _ = child.kill();
            let _ = child.wait();
            fig.kills += 1;
            fig.events.push(format!(
                "{} driver {k} killed{}",
                utc_clock_ms(now_ms()),
                if after_frozen {
                    " (just after 'frozen')"
                } else {
                    ""
                }
            ));
        }
        let _ = reader.join();
        if k % 3 == 2 {
            w.kill_recv();
            fig.events
                .push(format!("{} shardrecv killed", utc_clock_ms(now_ms())));
            w.start_recv()?;
            fig.events
                .push(format!("{} shardrecv restarted", utc_clock_ms(now_ms())));
            fig.recv_kills += 1;
        }
    }
    // One last driver, to the end (an incomplete batch is gone on with by the next one).
    for _ in 0..5 {
        fig.final_runs += 1;
        let out = w.migrate().output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        std::fs::write(
            dir.join(format!("migrate-final-{}.log", fig.final_runs)),
            stderr.as_bytes(),
        )?;
        // Done, or nothing left on A (the last killed driver had finished its batch).
        if out.status.success() || stderr.contains("has no repository on service a") {
            break;
        }
        eprintln!(
            "chaos: final migrate exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("fail"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = push.join();

    // Invariants.
    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|e| e.into_inner()));
    fig.acked = acked.len();
    fig.refused = *refused.lock().unwrap_or_else(|e| e.into_inner());
    for (name, branch, sha) in &acked {
        let got = git(
            &w.b.join(format!("t/{name}.git")),
            &["rev-parse", &format!("refs/heads/{branch}")],
        )?;
        if String::from_utf8_lossy(&got.stdout).trim() != sha {
            fig.lost += 1;
            eprintln!("chaos: acknowledged push {name}:{branch} ({sha}) is not on B");
        }
    }
    for i in 0..args.repos {
        let name = format!("r{i}");
        let repo = w.sm_json(&["repo", "show", &format!("t/{name}")])?;
        if repo["service"] != "b" {
            fig.not_done += 1;
        }
        if repo["maintenance"] == true {
            fig.stuck_read_only += 1;
        }
        let on_b = w.b.join(format!("t/{name}.git"));
        if git_ok(&on_b, &["fsck", "--no-progress"]).is_err() {
            fig.fsck_failures += 1;
        }
        let work = dir.join(format!("check-{name}"));
        let pushed_b = git_ok(
            dir,
            &[
                "clone",
                "-q",
                &on_b.display().to_string(),
                &work.display().to_string(),
            ],
        )
        .and_then(|_| git_ok(&work, &["commit", "-q", "--allow-empty", "-m", "after"]))
        .and_then(|_| git_ok(&work, &["push", "-q", "origin", "HEAD:refs/heads/after"]));
        if pushed_b.is_err() {
            fig.stuck_read_only += 1;
            eprintln!("chaos: {name}: B refuses a push: {pushed_b:?}");
        }
        let a_url = w.a.join(format!("t/{name}.git")).display().to_string();
        if git_ok(&work, &["push", "-q", &a_url, "HEAD:refs/heads/after"]).is_ok() {
            fig.lost += 1;
            eprintln!("chaos: {name}: A's stale copy took a push");
        }
    }
    let doctor = w.sm(&["doctor", "--json"]).output()?;
    let report: Value = serde_json::from_slice(&doctor.stdout).unwrap_or(Value::Null);
    fig.doctor_problems = report["problems"].as_u64().unwrap_or(u64::MAX);
    if fig.doctor_problems > 0 {
        eprintln!("chaos: doctor: {report:#}");
    }
    fig.staging_left = std::fs::read_dir(w.b.join(".shardrecv"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = w.sm_json(&["migrate", "status"])?;
    for r in status["repositories"].as_array().into_iter().flatten() {
        if r["state"] != "done" {
            fig.not_done += 1;
        }
        if let Some(s) = r["readonly_seconds"].as_f64() {
            fig.windows.push(s);
            if s > 1.0 {
                let breakdown = window_breakdown(dir, &fig, r);
                fig.long_windows.push(breakdown);
            }
        }
    }
    Ok(fig)
}

fn parse_size(s: &str) -> Result<u64> {
    let (num, mul) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num.parse::<u64>().context("--size")? * mul)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    // Commands run in the work directory: the binaries' path must not be relative.
    args.bin = std::fs::canonicalize(&args.bin)
        .with_context(|| format!("--bin {}", args.bin.display()))?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir()?;
    let base = args
        .work
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "chaos-migrate: seed {seed}, {} runs of {} repositories x {} kills",
        args.runs, args.repos, args.kills
    );
    let mut all_ok = true;
    for run in 0..args.runs {
        let dir = base.join(format!("run{run}"));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let f = one_run(&args, &dir, &mut rng)?;
        let mut windows = f.windows.clone();
        windows.sort_by(f64::total_cmp);
        let max = windows.last().copied().unwrap_or(0.0);
        let median = windows.get(windows.len() / 2).copied().unwrap_or(0.0);
        let over_1s = windows.iter().filter(|w| **w > 1.0).count();
        let ok = f.lost == 0
            && f.not_done == 0
            && f.stuck_read_only == 0
            && f.doctor_problems == 0
            && f.staging_left == 0
            && f.fsck_failures == 0;
        all_ok &= ok;
        println!(
            "run {run}: {:.0} s; kills {} ({} just after 'frozen', {} of shardrecv too; {} runs finished before their kill); \
             final drivers {}; pushes acknowledged {} / refused {}; lost {}; not done {}; stuck read-only {}; \
             doctor problems {}; staging left {}; fsck failures {}; read-only window median {median:.3} s, max {max:.3} s, over 1 s: {over_1s} -> {}",
            t0.elapsed().as_secs_f64(),
            f.kills,
            f.kills_after_frozen,
            f.recv_kills,
            f.finished_before_kill,
            f.final_runs,
            f.acked,
            f.refused,
            f.lost,
            f.not_done,
            f.stuck_read_only,
            f.doctor_problems,
            f.staging_left,
            f.fsck_failures,
            if ok { "ok" } else { "INVARIANT BROKEN" }
        );
        for breakdown in &f.long_windows {
            println!("{breakdown}");
        }
    }
    if !all_ok {
        bail!("an invariant was broken (see above)");
    }
    Ok(())
}
