//! `shardmove`: the operator's command line over the `orchestrate` library. It only parses
//! arguments, calls one library function per command, prints the result (text, or JSON with
//! `--json`) and maps errors to the documented exit codes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use orchestrate::daemons::{self, RestartConfig, WorkerConfig};
use orchestrate::error::exit_code;
use orchestrate::registry::{NewDevice, Repository};
use orchestrate::repos::{Thaw, DEFAULT_PUSH_WAIT};
use orchestrate::Registry;
use serde::Serialize;

const AFTER_HELP: &str = "\
Registry: --db PATH (SQLite file, created if missing; default ./shardmove.db), --db sqlite:URL,
or --db postgres://USER:PASS@HOST:PORT/DB; also from SHARDMOVE_DB.

Exit codes:
  0  success
  1  internal error
  2  invalid input (arguments, names, urls, property values)
  3  unknown service, device, instance, binding or repository
  4  already exists
  5  refused in the current state (the message says why; often --force lifts it)
  6  maintenance not started: pushes still in flight after --wait
  7  a command on a shard host failed
  8  registry database error
  9  a migration ended with repositories not moved (rolled back or stuck; the next
     `migrate` of the same services goes on with it)
  10 doctor found problems (left after --fix)";

/// Control plane for moving git repositories between storage shards: registry, maintenance
/// mode, allocation, clusterize/thaw, daemons. Each runbook step is one command.
#[derive(Debug, Parser)]
#[command(name = "shardmove", version, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    /// Registry database: a SQLite file path, a sqlite: URL or a postgres:// URL.
    #[arg(
        long,
        global = true,
        env = "SHARDMOVE_DB",
        default_value = "shardmove.db"
    )]
    db: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Who is acting, recorded in events (default: $USER).
    #[arg(long, global = true, env = "SHARDMOVE_ACTOR")]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Storage pools (services).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Hosts holding a service's working copies (devices).
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Tenants (instances).
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Which services an instance may use, and their flags (closed, no-daemons).
    #[command(subcommand)]
    Binding(BindingCmd),
    /// Copy the central service definitions (flags included) to the instances' views.
    Sync {
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Repositories: create, maintenance, observe, clusterize, thaw.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Daemons per (instance, service): plan and restart.
    #[command(subcommand)]
    Host(HostCmd),
    /// One observation pass, or with --daemon the observation worker that `host restart` starts.
    Observe(ObserveArgs),
    /// Repositories in maintenance, with their message and since when; `status serve` runs
    /// the page that tells users (HTML at /, JSON at /api/status).
    Status {
        #[command(subcommand)]
        command: Option<StatusCmd>,
    },
    /// Move an instance's repositories from service A to service B: crash-resumable,
    /// verified, parallel. `migrate status [ID]` shows where a batch stands.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Migrate(MigrateArgs),
    /// A full migration between two local shard hosts (keys, daemons, registry, generated
    /// repositories, a client cloning meanwhile), verified, then cleaned up. No argument needed.
    ///
    /// Two network modes; the first progress line says which one runs, and why:
    ///
    /// - network namespaces (run as root, `ip netns` working): each shard host is its own
    ///   network namespace (shardmove-demo-PID-a, -b), linked by a veth pair on a private /30
    ///   that exists only inside them. Each host's shardrecv listens on its veth address and
    ///   every step on a host (shardsend towards the other, hooks, git) runs inside its
    ///   namespace (device host `netns:NAME`). The status page and the cloning client stay on
    ///   127.0.0.1 here. The namespaces are removed on every exit, Ctrl-C included, after the
    ///   processes inside are killed.
    ///
    /// - loopback (not root, namespaces unavailable, or --no-netns): both shard hosts share
    ///   this machine's network, both daemons on 127.0.0.1.
    Demo(DemoArgs),
    /// Compare every device's disk with the registry: hooks that disagree with maintenance,
    /// long maintenance, stale copies that take pushes, orphaned staging, moved-aside copies,
    /// batches whose driver is gone. Exits 10 when problems are left (for a timer).
    Doctor {
        /// Repair what is safe (wrong hooks, stale copies without their hook, orphaned
        /// staging, asides past the retention), never a repository a live batch works on;
        /// each repair is an event in the audit log.
        #[arg(long)]
        fix: bool,
        /// Report copies in maintenance for longer than this many seconds.
        #[arg(long, default_value_t = 3600)]
        max_maintenance: u64,
        /// Days a moved-aside copy is kept before `--fix` removes it.
        #[arg(long, default_value_t = 14)]
        retention_days: u64,
    },
    /// The audit log (who changed what, when).
    Events {
        /// Only events whose subject contains this text (e.g. `repo:tenant/name`).
        #[arg(long)]
        subject: Option<String>,
        /// At most this many, the most recent.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Add a service.
    Add {
        /// Service name (letters, digits, '.', '_', '-').
        name: String,
    },
    /// List services.
    List,
    /// Show one service.
    Show {
        /// Service name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Add a device to a service.
    Add {
        /// Device name (letters, digits, '.', '_', '-').
        name: String,
        /// Service the device belongs to.
        #[arg(long)]
        service: String,
        /// Host the device is on (`localhost` runs steps locally, `netns:NAME` inside network
        /// namespace NAME here, any other through ssh).
        #[arg(long)]
        host: String,
        /// Transfer address of its `shardrecv`, HOST:PORT.
        #[arg(long)]
        transfer: String,
        /// Absolute directory holding the working copies.
        #[arg(long)]
        root: String,
        /// Key fingerprint of its `shardrecv`.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// List devices.
    List,
    /// Show one device.
    Show {
        /// Device name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCmd {
    /// Add an instance.
    Add {
        /// Instance name (letters, digits, '.', '_', '-').
        name: String,
    },
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Instance name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct BindingRef {
    /// The instance (tenant).
    #[arg(long)]
    instance: String,
    /// The service (storage pool).
    #[arg(long)]
    service: String,
}

#[derive(Debug, Subcommand)]
enum BindingCmd {
    /// Bind an instance to a service (open, with daemons).
    Add(BindingRef),
    /// List bindings.
    List {
        /// Only this instance's bindings.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Show one binding: central properties and the instance's synced view.
    Show(BindingRef),
    /// Set a central property: `closed` / `no-daemons` (true|false) or a free-form key.
    /// "Open but no-daemons" is refused without --force: repositories would be allocated
    /// where nothing observes them.
    SetProperty {
        #[command(flatten)]
        binding: BindingRef,
        /// `closed`, `no-daemons`, or a free-form key ([a-z0-9._-]).
        key: String,
        /// `true`/`false` for the flags; free text (no control characters) otherwise.
        value: String,
        /// Accept "open but no-daemons".
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RepoCmd {
    /// Create a bare repository on a service chosen at random among the instance's open bindings.
    Create {
        /// Instance the repository belongs to.
        #[arg(long)]
        instance: String,
        /// Repository name (stored as ROOT/INSTANCE/NAME.git on each device).
        name: String,
        /// Upstream URL of an observed repository (fetched by observation passes).
        #[arg(long)]
        upstream: Option<String>,
    },
    /// List repositories.
    List {
        /// Only this instance's repositories.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Show one repository (REPO is INSTANCE/NAME, or NAME when unique).
    Show {
        /// INSTANCE/NAME, or NAME when unique.
        repo: String,
    },
    /// Start or stop maintenance: pushes refused with MESSAGE, reads keep working,
    /// observation skips it. --start returns once pushes in flight have finished.
    Maintenance {
        /// INSTANCE/NAME, or NAME when unique.
        repo: String,
        /// Start maintenance; MESSAGE is what a refused push shows.
        #[arg(
            long,
            value_name = "MESSAGE",
            conflicts_with = "stop",
            required_unless_present = "stop"
        )]
        start: Option<String>,
        /// Stop maintenance and restore the repository's own pre-receive hook.
        #[arg(long)]
        stop: bool,
        /// Seconds to wait for pushes in flight before giving up (and lifting maintenance).
        #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_PUSH_WAIT.as_secs())]
        wait: u64,
    },
    /// One observation pass: git fetch from each observed repository's upstream.
    Observe {
        /// Only this instance's repositories.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Move a repository to another service of its instance, in one transaction.
    Clusterize {
        /// INSTANCE/NAME, or NAME when unique.
        repo: String,
        /// Target service; the instance must be bound to it.
        #[arg(long)]
        service: String,
    },
    /// Declare a device's copy authoritative (--promote) or stale (--demote).
    Thaw {
        /// INSTANCE/NAME, or NAME when unique.
        repo: String,
        /// Make DEVICE's copy the newest (DEVICE must be on the repository's service).
        #[arg(
            long,
            value_name = "DEVICE",
            conflicts_with = "demote",
            required_unless_present = "demote"
        )]
        promote: Option<String>,
        /// Mark DEVICE's copy stale.
        #[arg(long, value_name = "DEVICE")]
        demote: Option<String>,
        /// Promote even when another copy is newer / demote the newest copy.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Which (instance, service) pairs should run daemons, and why.
    Plan {
        /// Only this instance's bindings.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Stop daemons and start them again where the plan allows (never where no-daemons is set).
    Restart {
        /// Only this instance's daemons (no-daemons bindings are never started).
        #[arg(long)]
        instance: Option<String>,
        /// Directory of pid and log files.
        #[arg(long, env = "SHARDMOVE_RUN_DIR", default_value = "shardmove-run")]
        run_dir: PathBuf,
        /// Per-device command (run by `sh -c`); placeholders: {exe} {db} {instance} {service}
        /// {device} {host} {root} {pid_file} {interval}. Default: the bundled worker.
        #[arg(long, env = "SHARDMOVE_DAEMON_TEMPLATE", default_value = daemons::DEFAULT_TEMPLATE)]
        template: String,
        /// Seconds between observation passes ({interval}).
        #[arg(long, default_value_t = 60)]
        interval: u64,
    },
}

#[derive(Debug, Args)]
struct ObserveArgs {
    /// Run as a daemon: passes every --interval seconds until SIGTERM.
    #[arg(long, requires_all = ["instance", "service", "pid_file"])]
    daemon: bool,
    /// Only this instance's repositories.
    #[arg(long)]
    instance: Option<String>,
    /// Only repositories on this service.
    #[arg(long)]
    service: Option<String>,
    /// Only fetch into copies on this device.
    #[arg(long)]
    device: Option<String>,
    /// Pid file the daemon writes (and removes on exit); refuses to start twice.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Seconds between passes.
    #[arg(long, default_value_t = 60)]
    interval: u64,
    /// Stop after this many passes.
    #[arg(long)]
    passes: Option<u64>,
}

/// Default maintenance message shown to users whose push is refused during a migration.
const DEFAULT_MIGRATE_MESSAGE: &str =
    "This repository is being moved to another storage shard; pushes are paused for a moment. Reads keep working.";

#[derive(Debug, Subcommand)]
enum StatusCmd {
    /// Serve the maintenance page until interrupted; prints `serving http://ADDR/` once ready.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

async fn serve_status(registry: &Registry, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr().context("local address")?;
    println!("serving http://{addr}/");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    orchestrate::status_page::serve(registry.clone(), listener, shutdown).await?;
    Ok(())
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(subcommand)]
    command: Option<MigrateCmd>,
    #[arg(long, required = true)]
    instance: Option<String>,
    /// Service the repositories leave.
    #[arg(long, required = true)]
    from: Option<String>,
    /// Service they move to (bound to the instance if needed).
    #[arg(long, required = true)]
    to: Option<String>,
    /// Only these repositories (NAME or INSTANCE/NAME); default: all of the instance on --from.
    #[arg(long, num_args = 1..)]
    repos: Vec<String>,
    /// Repositories moved at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Repositories moved at once from one source host (one disk, one link).
    #[arg(long, default_value_t = 2)]
    per_host: usize,
    /// What users see when a push is refused during their repository's short freeze.
    #[arg(long, default_value = DEFAULT_MIGRATE_MESSAGE)]
    message: String,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue migration ID after the orchestrator was stopped or killed.
    #[arg(long, value_name = "ID")]
    resume: Option<i64>,
    /// Sender identity key, as a path on the source hosts.
    #[arg(long, default_value = "/etc/shard/send.key")]
    identity: String,
    /// shardsend as run on the source hosts (default: the one beside shardmove, else PATH).
    #[arg(long)]
    shardsend: Option<String>,
    /// Seconds maintenance start waits for pushes in flight.
    #[arg(long, default_value_t = 30)]
    freeze_wait: u64,
    /// Cap each transfer's send rate (shardsend --bwlimit, e.g. 50M).
    #[arg(long)]
    bwlimit: Option<String>,
    /// Run the full `git fsck --connectivity-only` on B while the repository is read-only.
    /// By default B's pre-copy gets the full check while still live, and the read-only window
    /// only checks what the final pass brought (as git does for a push).
    #[arg(long)]
    full_verify: bool,
    /// After the batch, leave daemons alone instead of running `host restart` for the instance
    /// (which stops them where A is now no-daemons and starts them where the plan allows).
    #[arg(long)]
    no_restart_daemons: bool,
    /// Directory of daemon pid and log files, as for `host restart`.
    #[arg(long, env = "SHARDMOVE_RUN_DIR", default_value = "shardmove-run")]
    run_dir: PathBuf,
    /// Per-device daemon command, as for `host restart`.
    #[arg(long, env = "SHARDMOVE_DAEMON_TEMPLATE", default_value = daemons::DEFAULT_TEMPLATE)]
    daemon_template: String,
    /// Seconds between observation passes of restarted daemons.
    #[arg(long, default_value_t = 60)]
    daemon_interval: u64,
}

#[derive(Debug, Subcommand)]
enum MigrateCmd {
    /// Per-repository state, bytes and read-only seconds of migration ID (default: the latest).
    Status { id: Option<i64> },
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Keep the work files in DIR instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of repositories.
    #[arg(long, default_value_t = 6)]
    repos: usize,
    /// Repositories moved at once.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// After the migration, keep both shard hosts and the status page up until Ctrl-C.
    #[arg(long)]
    keep_serving: bool,
    /// Loopback mode even as root: no network namespaces.
    #[arg(long)]
    no_netns: bool,
}

/// Live progress goes to stderr in both modes, so `--json` keeps stdout a single document
/// while a script (or its log) still sees what the batch is doing.
fn reporter() -> orchestrate::migrate::Reporter {
    std::sync::Arc::new(move |line: &str| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs() as i64;
        eprintln!("{}.{:03} {line}", &utc(secs)[11..19], now.subsec_millis());
    })
}

fn beside_me(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join(name);
    candidate.is_file().then_some(candidate)
}

fn migration_text(st: &orchestrate::migrate::MigrationStatus) -> String {
    let mut out = format!(
        "migration {} of {}: {} -> {}, {} ({} repositories)\n",
        st.id,
        st.instance,
        st.from,
        st.to,
        st.state.as_str(),
        st.repositories.len()
    );
    if let Some(gone) = &st.owner_gone {
        out.push_str(&format!(
            "  its driver is gone ({gone}): `shardmove migrate --resume {}` continues it\n",
            st.id
        ));
    }
    for r in &st.repositories {
        out.push_str(&format!(
            "  {}\t{}{}\t{} bytes\tread-only {}{}\n",
            r.repository,
            r.state.as_str(),
            r.step
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            r.bytes,
            r.readonly_seconds
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "-".into()),
            r.error
                .as_deref()
                .map(|e| format!("\terror: {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

async fn migrate_command(
    registry: &Registry,
    db: &str,
    args: &MigrateArgs,
    json: bool,
) -> anyhow::Result<()> {
    use orchestrate::migrate::{self, builtin::BuiltinPlane, host::HostConfig, MigrateConfig};
    if let Some(MigrateCmd::Status { id }) = &args.command {
        let id = match id {
            Some(id) => *id,
            None => *registry
                .migration_ids()
                .await?
                .first()
                .ok_or_else(|| orchestrate::Error::Refused("no migration yet".into()))?,
        };
        return print(json, &migrate::status(registry, id).await?, migration_text);
    }
    let shardsend = args
        .shardsend
        .clone()
        .or_else(|| beside_me("shardsend").map(|p| p.display().to_string()))
        .unwrap_or_else(|| "shardsend".into());
    let spec = migrate::BatchSpec {
        instance: args.instance.clone().unwrap_or_default(),
        from: args.from.clone().unwrap_or_default(),
        to: args.to.clone().unwrap_or_default(),
        repos: args.repos.clone(),
    };
    let cfg = MigrateConfig {
        spec,
        parallel: args.parallel.max(1),
        per_host: args.per_host.max(1),
        message: args.message.clone(),
    };
    let daemons = if args.no_restart_daemons {
        None
    } else {
        Some(RestartConfig {
            run_dir: std::path::absolute(&args.run_dir).context("resolving --run-dir")?,
            template: args.daemon_template.clone(),
            exe: std::env::current_exe().context("finding the shardmove binary")?,
            db: db.to_string(),
            interval_secs: args.daemon_interval,
            settle: Duration::from_secs(10),
        })
    };
    let ports = migrate::builtin_ports(
        BuiltinPlane {
            registry: registry.clone(),
            daemons,
            full_verify: args.full_verify,
        },
        HostConfig {
            shardsend,
            identity: args.identity.clone(),
            freeze_wait: Duration::from_secs(args.freeze_wait),
            shardsend_args: args
                .bwlimit
                .iter()
                .flat_map(|b| ["--bwlimit".to_string(), b.clone()])
                .collect(),
        },
    );
    if args.dry_run && args.resume.is_none() {
        return print(json, &ports.plane.plan(&cfg.spec).await?, |plan| {
            let mut out = format!(
                "plan: {} repositories from {} to {} (nothing changed)\n",
                plan.len(),
                cfg.spec.from,
                cfg.spec.to
            );
            for l in plan {
                out.push_str(&format!(
                    "  {}\t{}:{} -> {} ({})\n",
                    l.repository,
                    l.source.device,
                    l.source.path(&l.path),
                    l.target.device,
                    l.target.transfer_addr
                ));
            }
            out
        });
    }
    let (id, started) = migrate::start(registry, ports.plane.as_ref(), &cfg, args.resume).await?;
    if let migrate::Started::Continued { why } = &started {
        reporter()(why);
    }
    reporter()(&format!(
        "migration {id} started (resume with `shardmove migrate --resume {id}`)"
    ));
    let summary = migrate::run(&ports, &cfg, id, reporter()).await?;
    print(json, &summary, |s| {
        format!(
            "{}migration {} {} in {:.1} s; read-only window median {:.2} s, max {:.2} s",
            migration_text(&s.status),
            s.id,
            s.state.as_str(),
            s.seconds,
            s.readonly_median_seconds.unwrap_or(0.0),
            s.readonly_max_seconds.unwrap_or(0.0)
        )
    })?;
    if summary.state != migrate::BatchState::Done {
        let left = summary
            .status
            .repositories
            .iter()
            .filter(|r| r.state != migrate::RepoState::Done)
            .count();
        return Err(orchestrate::Error::MigrationIncomplete { id, left }.into());
    }
    Ok(())
}

async fn demo_command(args: &DemoArgs, json: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the shardmove binary")?;
    let bin_dir = exe
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let cfg = orchestrate::demo::DemoConfig {
        bin_dir,
        dir: args.dir.clone(),
        repos: args.repos.max(1),
        parallel: args.parallel.max(1),
        keep_serving: args.keep_serving,
        network: if args.no_netns {
            orchestrate::demo::NetworkChoice::Loopback
        } else {
            orchestrate::demo::NetworkChoice::Auto
        },
    };
    let summary = orchestrate::demo::run(&cfg, reporter()).await?;
    print(json, &summary, |s| {
        format!(
            "{}demo done: {} repositories moved and verified in {:.1} s; read-only window median {:.2} s, max {:.2} s; \
             background clones: {} ok, {} failed; status page was {}",
            migration_text(&s.migration.status),
            s.verified.len(),
            s.migration.seconds,
            s.migration.readonly_median_seconds.unwrap_or(0.0),
            s.migration.readonly_max_seconds.unwrap_or(0.0),
            s.clones_ok,
            s.clones_failed,
            s.status_url
        )
    })
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shardmove: error: starting runtime: {err}");
            std::process::exit(exit_code::INTERNAL);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => exit_code::OK,
        Err(err) => {
            eprintln!("shardmove: error: {err:#}");
            err.downcast_ref::<orchestrate::Error>()
                .map_or(exit_code::INTERNAL, orchestrate::Error::exit_code)
        }
    };
    std::process::exit(code);
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).context("serialising output")?
        );
    } else {
        let text = text(value);
        if !text.is_empty() {
            println!("{}", text.trim_end());
        }
    }
    Ok(())
}

fn yes_no(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from unix seconds (days-to-civil, proleptic Gregorian).
fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn repo_text(repo: &Repository) -> String {
    let mut out = format!(
        "repository {}\n  service: {}\n  path: {}\n",
        repo.full_name(),
        repo.service,
        repo.path
    );
    if let Some(url) = &repo.upstream_url {
        out += &format!("  upstream: {url}\n");
    }
    if repo.maintenance {
        out += &format!(
            "  maintenance: since {}, message: {}\n",
            utc(repo.maintenance_since.unwrap_or(0)),
            repo.maintenance_message.as_deref().unwrap_or("")
        );
    } else {
        out += "  maintenance: no\n";
    }
    for copy in &repo.copies {
        out += &format!(
            "  copy on {} ({}): version {}\n",
            copy.device, copy.service, copy.version
        );
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo(args) = &cli.command {
        return demo_command(args, cli.json).await;
    }
    let actor = cli
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".to_string());
    let registry = Registry::open(&cli.db, &actor).await?;
    let json = cli.json;
    let result = dispatch(&registry, &cli, json).await;
    registry.close().await;
    result
}

async fn dispatch(registry: &Registry, cli: &Cli, json: bool) -> anyhow::Result<()> {
    match &cli.command {
        Command::Service(cmd) => match cmd {
            ServiceCmd::Add { name } => print(json, &registry.add_service(name).await?, |s| {
                format!("added service {}", s.name)
            }),
            ServiceCmd::List => print(json, &registry.services().await?, |all| {
                all.iter()
                    .map(|s| format!("{}\tdevices: {}\n", s.name, s.devices.join(",")))
                    .collect()
            }),
            ServiceCmd::Show { name } => print(json, &registry.service(name).await?, |s| {
                format!(
                    "service {}\n  created: {}\n  devices: {}",
                    s.name,
                    utc(s.created_at),
                    s.devices.join(", ")
                )
            }),
        },
        Command::Device(cmd) => match cmd {
            DeviceCmd::Add {
                name,
                service,
                host,
                transfer,
                root,
                fingerprint,
            } => {
                let new = NewDevice {
                    name: name.clone(),
                    service: service.clone(),
                    host: host.clone(),
                    transfer_addr: transfer.clone(),
                    root_path: root.clone(),
                    fingerprint: fingerprint.clone(),
                };
                print(json, &registry.add_device(&new).await?, |d| {
                    format!("added device {} to service {}", d.name, d.service)
                })
            }
            DeviceCmd::List => print(json, &registry.devices().await?, |all| {
                all.iter()
                    .map(|d| {
                        format!(
                            "{}\tservice: {}\thost: {}\ttransfer: {}\troot: {}\n",
                            d.name, d.service, d.host, d.transfer_addr, d.root_path
                        )
                    })
                    .collect()
            }),
            DeviceCmd::Show { name } => print(json, &registry.device(name).await?, |d| {
                format!(
                    "device {}\n  service: {}\n  host: {}\n  transfer: {}\n  root: {}\n  fingerprint: {}",
                    d.name,
                    d.service,
                    d.host,
                    d.transfer_addr,
                    d.root_path,
                    d.fingerprint.as_deref().unwrap_or("(none)")
                )
            }),
        },
        Command::Instance(cmd) => match cmd {
            InstanceCmd::Add { name } => print(json, &registry.add_instance(name).await?, |i| {
                format!("added instance {}", i.name)
            }),
            InstanceCmd::List => print(json, &registry.instances().await?, |all| {
                all.iter().map(|i| format!("{}\n", i.name)).collect()
            }),
            InstanceCmd::Show { name } => print(json, &registry.instance(name).await?, |i| {
                format!("instance {}\n  created: {}", i.name, utc(i.created_at))
            }),
        },
        Command::Binding(cmd) => {
            let binding_text = |b: &orchestrate::registry::Binding| {
                let props: Vec<String> = b
                    .properties
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let view = match &b.view {
                    Some(v) => format!(
                        "synced at {}, {}",
                        utc(v.synced_at),
                        if v.in_sync {
                            "in sync"
                        } else {
                            "out of date: run sync"
                        }
                    ),
                    None => "never synced".to_string(),
                };
                format!(
                    "{}/{}\tclosed: {}\tno-daemons: {}\tproperties: {}\tview: {view}\n",
                    b.instance,
                    b.service,
                    yes_no(b.closed),
                    yes_no(b.no_daemons),
                    if props.is_empty() {
                        "(none)".to_string()
                    } else {
                        props.join(" ")
                    }
                )
            };
            match cmd {
                BindingCmd::Add(b) => print(
                    json,
                    &registry.add_binding(&b.instance, &b.service).await?,
                    |b| format!("added binding {}/{}", b.instance, b.service),
                ),
                BindingCmd::List { instance } => print(
                    json,
                    &registry.bindings(instance.as_deref()).await?,
                    |all| all.iter().map(binding_text).collect(),
                ),
                BindingCmd::Show(b) => print(
                    json,
                    &registry.binding(&b.instance, &b.service).await?,
                    binding_text,
                ),
                BindingCmd::SetProperty {
                    binding,
                    key,
                    value,
                    force,
                } => print(
                    json,
                    &registry
                        .set_binding_property(
                            &binding.instance,
                            &binding.service,
                            key,
                            value,
                            *force,
                        )
                        .await?,
                    binding_text,
                ),
            }
        }
        Command::Sync { instance } => print(
            json,
            &registry.sync(instance.as_deref()).await?,
            |changes| {
                changes
                    .iter()
                    .map(|c| {
                        let what = if c.changed.is_empty() {
                            "unchanged".to_string()
                        } else {
                            format!("updated {}", c.changed.join(", "))
                        };
                        format!("synced {}/{}: {what}\n", c.instance, c.service)
                    })
                    .collect()
            },
        ),
        Command::Repo(cmd) => repo_command(registry, cmd, json).await,
        Command::Host(cmd) => match cmd {
            HostCmd::Plan { instance } => print(
                json,
                &daemons::plan(registry, instance.as_deref()).await?,
                |plan| {
                    plan.iter()
                        .map(|e| {
                            format!(
                                "{}/{}\t{}\t({}; devices: {})\n",
                                e.instance,
                                e.service,
                                if e.run_daemons {
                                    "run daemons"
                                } else {
                                    "no daemons"
                                },
                                e.reason,
                                if e.devices.is_empty() {
                                    "none".to_string()
                                } else {
                                    e.devices.join(",")
                                }
                            )
                        })
                        .collect()
                },
            ),
            HostCmd::Restart {
                instance,
                run_dir,
                template,
                interval,
            } => {
                let exe = std::env::current_exe().context("finding the shardmove binary")?;
                let config = RestartConfig {
                    run_dir: std::path::absolute(run_dir).context("resolving --run-dir")?,
                    template: template.clone(),
                    exe,
                    db: cli.db.clone(),
                    interval_secs: *interval,
                    settle: Duration::from_secs(10),
                };
                print(
                    json,
                    &daemons::restart(registry, &config, instance.as_deref()).await?,
                    |outcomes| {
                        outcomes
                            .iter()
                            .map(|o| {
                                let stopped = o
                                    .stopped
                                    .map(|pid| format!("stopped pid {pid}; "))
                                    .unwrap_or_default();
                                format!(
                                    "{}/{} on {}: {stopped}{}\n",
                                    o.instance, o.service, o.device, o.detail
                                )
                            })
                            .collect()
                    },
                )
            }
        },
        Command::Observe(args) => {
            if args.daemon {
                let (Some(instance), Some(service), Some(pid_file)) =
                    (&args.instance, &args.service, &args.pid_file)
                else {
                    anyhow::bail!("--daemon needs --instance, --service and --pid-file");
                };
                let config = WorkerConfig {
                    instance: instance.clone(),
                    service: service.clone(),
                    device: args.device.clone(),
                    pid_file: pid_file.clone(),
                    interval: Duration::from_secs(args.interval),
                    max_passes: args.passes,
                };
                daemons::run_worker(registry, &config, |outcomes| {
                    for o in outcomes {
                        println!("{}: {} ({})", o.repository, o.outcome, o.detail);
                    }
                })
                .await?;
                Ok(())
            } else {
                observe(
                    registry,
                    args.instance.as_deref(),
                    args.service.as_deref(),
                    args.device.as_deref(),
                    json,
                )
                .await
            }
        }
        Command::Status {
            command: Some(StatusCmd::Serve { listen }),
        } => serve_status(registry, *listen).await,
        Command::Status { command: None } => {
            print(json, &registry.in_maintenance().await?, |repos| {
                if repos.is_empty() {
                    return "no repository in maintenance".to_string();
                }
                repos
                    .iter()
                    .map(|r| {
                        format!(
                            "{}\tin maintenance since {}: {}\n",
                            r.full_name(),
                            utc(r.maintenance_since.unwrap_or(0)),
                            r.maintenance_message.as_deref().unwrap_or("")
                        )
                    })
                    .collect()
            })
        }
        Command::Migrate(args) => migrate_command(registry, &cli.db, args, json).await,
        Command::Doctor {
            fix,
            max_maintenance,
            retention_days,
        } => {
            let cfg = orchestrate::doctor::DoctorConfig {
                fix: *fix,
                max_maintenance: Duration::from_secs(*max_maintenance),
                retention: Duration::from_secs(retention_days.saturating_mul(86_400)),
            };
            let report = orchestrate::doctor::run(registry, &cfg).await?;
            print(json, &report, |r| {
                let mut out = String::new();
                for f in &r.findings {
                    out += &format!(
                        "{}\t{:?}\t{}\t{}{}\n",
                        if f.problem { "PROBLEM" } else { "info" },
                        f.kind,
                        f.subject,
                        f.detail,
                        f.fixed
                            .as_deref()
                            .map(|x| format!(" [fixed: {x}]"))
                            .unwrap_or_default()
                    );
                }
                out + &format!("{} problems left, {} fixed", r.problems, r.fixed)
            })?;
            if report.problems > 0 {
                return Err(orchestrate::Error::ProblemsFound {
                    count: report.problems,
                }
                .into());
            }
            Ok(())
        }
        Command::Demo(args) => demo_command(args, json).await,
        Command::Events { subject, limit } => print(
            json,
            &registry.events(subject.as_deref(), *limit).await?,
            |events| {
                events
                    .iter()
                    .map(|e| {
                        format!(
                            "{}\t{}\t{}\t{}\t{}\n",
                            utc(e.at),
                            e.actor,
                            e.action,
                            e.subject,
                            e.detail
                        )
                    })
                    .collect()
            },
        ),
    }
}

async fn observe(
    registry: &Registry,
    instance: Option<&str>,
    service: Option<&str>,
    device: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let outcomes = registry.observe_pass(instance, service, device).await?;
    print(json, &outcomes, |all| {
        if all.is_empty() {
            return "no observed repository".to_string();
        }
        all.iter()
            .map(|o| format!("{}: {} ({})\n", o.repository, o.outcome, o.detail))
            .collect()
    })
}

async fn repo_command(registry: &Registry, cmd: &RepoCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        RepoCmd::Create {
            instance,
            name,
            upstream,
        } => print(
            json,
            &registry
                .create_repository(instance, name, upstream.as_deref())
                .await?,
            |r| {
                format!(
                    "created {} on service {} ({})",
                    r.full_name(),
                    r.service,
                    r.copies
                        .iter()
                        .map(|c| c.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ),
        RepoCmd::List { instance } => print(
            json,
            &registry.repositories(instance.as_deref()).await?,
            |all| {
                all.iter()
                    .map(|r| {
                        let state = if r.maintenance {
                            format!(
                                "maintenance: {}",
                                r.maintenance_message.as_deref().unwrap_or("")
                            )
                        } else {
                            "live".to_string()
                        };
                        format!("{}\tservice: {}\t{state}\n", r.full_name(), r.service)
                    })
                    .collect()
            },
        ),
        RepoCmd::Show { repo } => print(json, &registry.repository(repo).await?, repo_text),
        RepoCmd::Maintenance {
            repo,
            start,
            stop,
            wait,
        } => {
            match (start, stop) {
                (Some(message), false) => {
                    print(
                        json,
                        &registry
                            .start_maintenance(repo, message, Duration::from_secs(*wait))
                            .await?,
                        |r| {
                            format!("{} is in maintenance: pushes are refused with {:?}; no push in flight", r.full_name(), message)
                        },
                    )
                }
                (None, true) => print(json, &registry.stop_maintenance(repo).await?, |r| {
                    format!("{} is out of maintenance", r.full_name())
                }),
                _ => anyhow::bail!("pass exactly one of --start MESSAGE and --stop"),
            }
        }
        RepoCmd::Observe { instance } => {
            observe(registry, instance.as_deref(), None, None, json).await
        }
        RepoCmd::Clusterize { repo, service } => {
            print(json, &registry.clusterize(repo, service).await?, |c| {
                if c.changed {
                    format!("{} moved from service {} to {}", c.repository, c.from, c.to)
                } else {
                    format!("{} already on service {}", c.repository, c.to)
                }
            })
        }
        RepoCmd::Thaw {
            repo,
            promote,
            demote,
            force,
        } => {
            let (device, direction) = match (promote, demote) {
                (Some(d), None) => (d, Thaw::Promote),
                (None, Some(d)) => (d, Thaw::Demote),
                _ => anyhow::bail!("pass exactly one of --promote DEVICE and --demote DEVICE"),
            };
            print(
                json,
                &registry.thaw(repo, device, direction, *force).await?,
                repo_text,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_795_621_470), "2026-11-25 15:44:30 UTC");
    }
}
