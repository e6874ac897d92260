//! Test environment: a registry (SQLite file or a private PostgreSQL schema), shard roots
//! in a temp dir, and helpers that run the real `shardmove` binary and real `git`.

#![allow(dead_code)]

use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub mod pg;

pub const BIN: &str = env!("CARGO_BIN_EXE_shardmove");

/// One test's world.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: String,
    pub backend: &'static str,
    pg_cleanup: Option<(String, String)>,
    /// Extra environment for every `shardmove` this world runs (see [`Env::set_var`]).
    vars: RefCell<Vec<(String, OsString)>>,
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Env {
    pub fn sqlite() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("registry.db").display().to_string();
        Env {
            dir,
            db,
            backend: "sqlite",
            pg_cleanup: None,
            vars: RefCell::default(),
        }
    }

    /// A fresh schema in the database of [`pg::server`] (`SHARDMOVE_TEST_PG`, or a throwaway
    /// cluster), or `None` after saying loudly why when PostgreSQL is not installed.
    pub fn postgres() -> Option<Env> {
        let base = match pg::server() {
            pg::PgServer::Url(url) => url,
            pg::PgServer::NotInstalled(reason) => {
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a test")
                    .to_string();
                pg::loud(&format!("SKIPPED: {test} because {reason}"));
                return None;
            }
        };
        let schema = format!("t_{}_{}", std::process::id(), fastrand::u64(..));
        block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&base)
                .await
                .unwrap_or_else(|e| panic!("connect to {base}: {e}"));
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut conn)
                .await
                .expect("create schema");
        });
        let sep = if base.contains('?') { '&' } else { '?' };
        let db = format!("{base}{sep}options[search_path]={schema}");
        let dir = tempfile::tempdir().expect("temp dir");
        Some(Env {
            dir,
            db,
            backend: "postgres",
            pg_cleanup: Some((base, schema)),
            vars: RefCell::default(),
        })
    }

    /// Sets `key` for every later `shardmove` of this world (e.g. `SHARDMOVE_SSH_CONFIG`, so
    /// the helpers reach devices behind ssh), without touching the test process's own
    /// environment, which the other tests share.
    pub fn set_var(&self, key: &str, value: impl Into<OsString>) {
        let mut vars = self.vars.borrow_mut();
        vars.retain(|(k, _)| k != key);
        vars.push((key.to_string(), value.into()));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `shardmove ARGS` against this registry.
    pub fn sm(&self, args: &[&str]) -> Run {
        let output = self.sm_command(args).output().expect("run shardmove");
        to_run(output)
    }

    pub fn sm_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("SHARDMOVE_DB", &self.db)
            .env("SHARDMOVE_ACTOR", "test")
            .envs(self.vars.borrow().iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path());
        command
    }

    /// Runs and expects exit 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.sm(args);
        assert_eq!(
            run.code, 0,
            "shardmove {args:?} failed: {}{}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    /// Runs with `--json`, expects exit 0, parses stdout.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("shardmove {args:?}: bad json ({e}): {out}"))
    }

    /// Runs and expects exit `code`; returns stderr, which must be one clear line.
    #[track_caller]
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let run = self.sm(args);
        assert_eq!(
            run.code, code,
            "shardmove {args:?}: expected exit {code}: {}{}",
            run.stdout, run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "panic: {}", run.stderr);
        // Our own errors: one lowercase fragment, no trailing period (clap formats its own).
        if let Some(message) = run.stderr.strip_prefix("shardmove: error: ") {
            assert!(
                !message.trim_end().ends_with('.'),
                "trailing period: {}",
                run.stderr
            );
            assert!(
                !message.starts_with(|c: char| c.is_ascii_uppercase()),
                "capitalised: {}",
                run.stderr
            );
        }
        run.stderr
    }

    /// Everything the registry holds, for "changed nothing" checks.
    pub fn snapshot(&self) -> Value {
        serde_json::json!({
            "services": self.json(&["service", "list"]),
            "devices": self.json(&["device", "list"]),
            "instances": self.json(&["instance", "list"]),
            "bindings": self.json(&["binding", "list"]),
            "repos": self.json(&["repo", "list"]),
            "events": self.json(&["events", "--limit", "100000"]),
        })
    }

    /// Services `a`, `b` (devices `a1`, `b1` with roots `ra`, `rb`) and instance `t` bound
    /// to both.
    pub fn two_services(&self) {
        for (service, device) in [("a", "a1"), ("b", "b1")] {
            self.ok(&["service", "add", service]);
            let root = self.path(&format!("r{service}")).display().to_string();
            self.ok(&[
                "device",
                "add",
                device,
                "--service",
                service,
                "--host",
                "localhost",
                "--transfer",
                "127.0.0.1:7400",
                "--root",
                &root,
            ]);
        }
        self.ok(&["instance", "add", "t"]);
        self.ok(&["binding", "add", "--instance", "t", "--service", "a"]);
        self.ok(&["binding", "add", "--instance", "t", "--service", "b"]);
    }

    /// Path of `t/NAME` on device root `rX`.
    pub fn repo_path(&self, root: &str, name: &str) -> PathBuf {
        self.path(root).join("t").join(format!("{name}.git"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((base, schema)) = self.pg_cleanup.take() {
            block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                        .execute(&mut conn)
                        .await;
                }
            });
        }
    }
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

pub fn to_run(output: Output) -> Run {
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs git in `dir`; returns the outcome.
pub fn git(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("run git");
    to_run(output)
}

/// Runs git and expects success; returns stdout trimmed.
#[track_caller]
pub fn git_ok(dir: &Path, args: &[&str]) -> String {
    let run = git(dir, args);
    assert_eq!(
        run.code,
        0,
        "git {args:?} in {}: {}{}",
        dir.display(),
        run.stdout,
        run.stderr
    );
    run.stdout.trim().to_string()
}

/// A working clone of `bare` at `dir` with one new commit; returns its id.
pub fn clone_and_commit(bare: &Path, dir: &Path, message: &str) -> String {
    git_ok(
        bare.parent().expect("parent"),
        &[
            "clone",
            "-q",
            &bare.display().to_string(),
            &dir.display().to_string(),
        ],
    );
    commit(dir, message)
}

pub fn commit(dir: &Path, message: &str) -> String {
    git_ok(dir, &["commit", "-q", "--allow-empty", "-m", message]);
    git_ok(dir, &["rev-parse", "HEAD"])
}

/// Declares each contract test once per backend: `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&$crate::util::Env::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { if let Some(env) = $crate::util::Env::postgres() { super::$name(&env) } } )*
        }
    };
}

/// A real `sshd` on a loopback port (DESIGN.md §6), with a client key and an ssh config file
/// whose `Host` alias reaches it. It logs to a file, so a test can count the sessions it
/// served. Killed on drop.
pub struct Sshd {
    child: std::process::Child,
    pub config: PathBuf,
    pub alias: &'static str,
    log: PathBuf,
}

/// The sshd the tests start.
const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    /// Why [`Sshd::start`] cannot run here (tests print it and skip), or `None`.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("needs root to run sshd (privilege separation, /run/sshd)".into());
        }
        if !Path::new(SSHD).is_file() {
            return Some(format!(
                "{SSHD} not installed (scripts/install-deps.sh installs it)"
            ));
        }
        for tool in ["ssh", "ssh-keygen"] {
            let found = std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            });
            if !found {
                return Some(format!(
                    "{tool} not installed (scripts/install-deps.sh installs it)"
                ));
            }
        }
        None
    }

    /// An sshd whose files live in `dir`, reached as `shardhost`.
    pub fn start(dir: &Path) -> Sshd {
        Sshd::start_as(dir, "shardhost")
    }

    /// An sshd whose files live in `dir` (one sshd per directory), reached as `alias`.
    pub fn start_as(dir: &Path, alias: &'static str) -> Sshd {
        std::fs::create_dir_all(dir).expect("sshd dir");
        let keygen = |path: &Path| {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .status()
                .expect("run ssh-keygen");
            assert!(status.success(), "ssh-keygen failed");
        };
        let host_key = dir.join("ssh_host_key");
        let client_key = dir.join("client_key");
        keygen(&host_key);
        keygen(&client_key);
        let authorized = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("privilege separation dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let log = dir.join("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-f", "/dev/null", "-p", &port.to_string()])
            .arg("-E")
            .arg(&log)
            .args([
                "-o",
                // DEBUG1 logs every command a session runs ("req exec"), which the tests count.
                "LogLevel=DEBUG1",
                "-o",
                "ListenAddress=127.0.0.1",
                "-o",
                "StrictModes=no",
                "-o",
                "PermitRootLogin=prohibit-password",
            ])
            .arg("-o")
            .arg(format!("HostKey={}", host_key.display()))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", authorized.display()))
            .arg("-o")
            .arg(format!("PidFile={}", dir.join("sshd.pid").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sshd");
        let config = dir.join("ssh_config");
        let user = std::env::var("USER").unwrap_or_else(|_| "root".to_string());
        std::fs::write(
            &config,
            format!(
                "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
                 StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
                client_key.display()
            ),
        )
        .expect("ssh config");
        let sshd = Sshd {
            child,
            config,
            alias,
            log,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let ok = Command::new("ssh")
                .arg("-F")
                .arg(&sshd.config)
                .args(["-o", "BatchMode=yes", alias, "true"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sshd on port {port} did not accept the client key"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        sshd
    }

    /// Connections this sshd has authenticated so far (its log's `Accepted publickey` lines).
    pub fn sessions(&self) -> usize {
        self.log_lines("Accepted publickey")
    }

    /// Commands run through this sshd so far, over any connection (shared ones included).
    pub fn commands(&self) -> usize {
        self.log_lines(" req exec")
    }

    fn log_lines(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
