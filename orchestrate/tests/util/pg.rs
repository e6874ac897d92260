//! The PostgreSQL server the contract tests run against: the one `SHARDMOVE_TEST_PG` names, or
//! else a throwaway cluster this test binary starts itself, so the README's plain
//! `cargo test --workspace` runs the PostgreSQL variants on a fresh machine (issue 16, item 6)
//! instead of skipping them.
//!
//! The throwaway cluster is made once per test binary, on first use: `initdb` in a temporary
//! directory (as the `postgres` user when we are root, since PostgreSQL refuses to run as
//! root), a server listening only on a unix socket in that directory (no port to collide with
//! another test binary or a system cluster), durability off (a test database dies with the
//! process anyway), and a database `shardmove_test`. It is stopped and its directory removed
//! when the process exits (`atexit`), and by a small watchdog process if the test binary is
//! killed instead. Only when PostgreSQL is not installed at all do the tests skip, and they
//! say so on the real stderr, which the test harness does not capture.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the PostgreSQL tests get their server.
#[derive(Clone, Debug)]
pub enum PgServer {
    /// A base URL to connect to (each test makes its own schema in it).
    Url(String),
    /// PostgreSQL is not installed: why, for the loud skip message.
    NotInstalled(String),
}

/// The one server of this test binary. Panics (failing the test, with the reason) when
/// PostgreSQL is installed but the throwaway cluster cannot be started: that is a broken
/// machine, not a reason to skip.
pub fn server() -> PgServer {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    let outcome = SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("SHARDMOVE_TEST_PG") {
            return Ok(PgServer::Url(url));
        }
        match find_bin_dir() {
            None => {
                let reason = "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin \
                              or on PATH; scripts/install-deps.sh installs it) and \
                              SHARDMOVE_TEST_PG is not set"
                    .to_string();
                loud(&format!(
                    "SKIPPED: every postgres:: test of this binary, because {reason}"
                ));
                Ok(PgServer::NotInstalled(reason))
            }
            Some(bin) => start_throwaway(&bin).map(PgServer::Url),
        }
    });
    match outcome {
        Ok(server) => server.clone(),
        Err(why) => panic!("cannot start a throwaway PostgreSQL cluster: {why}"),
    }
}

/// Writes to the process's stderr directly: `eprintln!` inside a test is captured and shown
/// only when the test fails, and a skip must be seen.
pub fn loud(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The newest `/usr/lib/postgresql/VERSION/bin` (Debian's layout), else the directory of an
/// `initdb` on PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let debian = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(debian)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

/// What [`stop_at_exit`] needs.
struct Cluster {
    dir: PathBuf,
    pg_ctl: PathBuf,
    as_postgres: bool,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

const DATABASE: &str = "shardmove_test";
const USER: &str = "shardmove";

fn start_throwaway(bin: &Path) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    let as_postgres = unsafe { libc::geteuid() } == 0;
    // Short path: the socket's path (DIR/.s.PGSQL.5432) must fit in sun_path (108 bytes).
    let dir = tempfile::Builder::new()
        .prefix("shardmove-pg-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("temporary directory: {e}"))?
        .keep();
    let data = dir.join("data");
    if as_postgres {
        // The server runs as `postgres`: it must own the directory it writes and listens in.
        let status = Command::new("chown")
            .args(["-R", "postgres:", &dir.display().to_string()])
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(
                "chown of the cluster directory to postgres failed (no postgres user? \
                        Debian's postgresql package creates it)"
                    .into(),
            );
        }
    }
    let pg_ctl = bin.join("pg_ctl");
    let cluster = CLUSTER.get_or_init(|| Cluster {
        dir: dir.clone(),
        pg_ctl: pg_ctl.clone(),
        as_postgres,
    });
    // SAFETY: registering a plain `extern "C" fn` with no arguments.
    unsafe { libc::atexit(stop_at_exit) };
    spawn_watchdog(cluster);

    run(
        as_postgres,
        Command::new(bin.join("initdb")).args([
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
            &format!("--username={USER}"),
            "-D",
            &data.display().to_string(),
        ]),
        "initdb",
    )?;
    let options = format!(
        "-c listen_addresses='' -k {} -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=200",
        dir.display()
    );
    run(
        as_postgres,
        Command::new(&pg_ctl).args([
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            &data.display().to_string(),
            "-l",
            &dir.join("server.log").display().to_string(),
            "-o",
            &options,
        ]),
        "pg_ctl start",
    )?;
    let socket_dir = dir.display().to_string();
    let admin = format!("postgres://{USER}@localhost/postgres?host={socket_dir}");
    create_database(&admin)?;
    loud(&format!(
        "note: PostgreSQL tests use a throwaway cluster in {socket_dir} (SHARDMOVE_TEST_PG not set)"
    ));
    Ok(format!(
        "postgres://{USER}@localhost/{DATABASE}?host={socket_dir}"
    ))
}

/// Runs `command` (as `postgres` through `runuser` when we are root); its output goes into the
/// error when it fails.
fn run(as_postgres: bool, command: &mut Command, what: &str) -> Result<(), String> {
    let mut full = if as_postgres {
        let mut wrapped = Command::new("runuser");
        wrapped
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    } else {
        std::mem::replace(command, Command::new("true"))
    };
    // `runuser` keeps the cwd, which `postgres` may not be allowed to enter.
    let output = full
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn create_database(admin_url: &str) -> Result<(), String> {
    super::block_on(async {
        use sqlx::Connection;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match sqlx::PgConnection::connect(admin_url).await {
                Ok(conn) => break conn,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("connect to the throwaway cluster: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("create database {DATABASE}: {e}"))?;
        Ok(())
    })
}

/// Stops the server at once (its data is thrown away) and removes its directory.
extern "C" fn stop_at_exit() {
    if let Some(cluster) = CLUSTER.get() {
        let data = cluster.dir.join("data").display().to_string();
        let _ = run(
            cluster.as_postgres,
            Command::new(&cluster.pg_ctl).args(["stop", "-m", "immediate", "-w", "-D", &data]),
            "pg_ctl stop",
        );
        let _ = std::fs::remove_dir_all(&cluster.dir);
    }
}

/// A shell in its own process group that does what [`stop_at_exit`] does once this process is
/// gone, for when it is killed (a signal skips `atexit`). The server itself outlives us by
/// design: `pg_ctl` detaches it into its own session.
fn spawn_watchdog(cluster: &Cluster) {
    use std::os::unix::process::CommandExt;
    let stop = if cluster.as_postgres {
        "runuser -u postgres -- \"$2\" stop -m immediate -w -D \"$3/data\""
    } else {
        "\"$2\" stop -m immediate -w -D \"$3/data\""
    };
    let script = format!(
        "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; \
         if [ -d \"$3/data\" ]; then cd / && {stop} >/dev/null 2>&1; rm -rf \"$3\"; fi"
    );
    let spawned = Command::new("sh")
        .args(["-c", &script, "pg-watchdog"])
        .arg(std::process::id().to_string())
        .arg(&cluster.pg_ctl)
        .arg(&cluster.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        loud(&format!(
            "warning: no watchdog for the throwaway PostgreSQL cluster ({e}); if this test \
             binary is killed, stop it by hand: {} stop -D {}/data",
            cluster.pg_ctl.display(),
            cluster.dir.display()
        ));
    }
}
