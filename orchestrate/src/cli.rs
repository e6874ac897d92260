//! The command line of `shardmove`, as clap definitions: every command, argument, default
//! and help text, with the exit codes in the `--help` epilogue. It lives in the library (not
//! the binary) so the binary stays a thin parse-call-print loop and tools such as manual
//! page or completion generators can reach the same definitions.
//!
//! Nothing here runs anything or reads the environment: the methods only turn parsed values
//! into the library's configs (the binary adds what it finds on this machine).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::daemons::{self, WorkerConfig};
use crate::doctor::DoctorConfig;
use crate::error::{Error, Result};
use crate::migrate::host::HostConfig;
use crate::migrate::{BatchSpec, MigrateConfig};
use crate::registry::NewDevice;
use crate::repos::DEFAULT_PUSH_WAIT;

pub const AFTER_HELP: &str = "\
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
pub struct Cli {
    /// Registry database: a SQLite file path, a sqlite: URL or a postgres:// URL.
    #[arg(
        long,
        global = true,
        env = "SHARDMOVE_DB",
        default_value = "shardmove.db"
    )]
    pub db: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who is acting, recorded in events (default: $USER).
    #[arg(long, global = true, env = "SHARDMOVE_ACTOR")]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    Migrate(Box<MigrateArgs>),
    #[cfg(feature = "demo")]
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
    Doctor(DoctorArgs),
    /// A Phorge cluster's devices: how `migrate --plane phorge` reaches them.
    #[command(subcommand)]
    Phorge(PhorgeCmd),
    /// Print a shell completion script to stdout, e.g. `shardmove completions bash >
    /// /etc/bash_completion.d/shardmove`.
    Completions {
        #[arg(value_enum)]
        shell: crate::manual::Shell,
    },
    /// Print the manual page (roff) to stdout, or with --out-dir write one page per command
    /// and subcommand (shardmove.1, shardmove-migrate.1, ...).
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
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

/// `doctor`'s arguments.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Repair what is safe (wrong hooks, stale copies without their hook, orphaned
    /// staging, asides past the retention), never a repository a live batch works on;
    /// each repair is an event in the audit log.
    #[arg(long)]
    pub fix: bool,
    /// Report copies in maintenance for longer than this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub max_maintenance: u64,
    /// Days a moved-aside copy is kept before `--fix` removes it.
    #[arg(long, default_value_t = 14)]
    pub retention_days: u64,
}

impl DoctorArgs {
    /// What the doctor looks for and may repair.
    pub fn config(&self) -> DoctorConfig {
        DoctorConfig {
            fix: self.fix,
            max_maintenance: Duration::from_secs(self.max_maintenance),
            retention: Duration::from_secs(self.retention_days.saturating_mul(86_400)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
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
pub enum DeviceCmd {
    /// Add a device to a service.
    Add(DeviceAdd),
    /// List devices.
    List,
    /// Show one device.
    Show {
        /// Device name.
        name: String,
    },
    /// Replace a device's shardrecv key without failing a transfer: one step per run
    /// (--add, --prefer, --finish; --abort to go back), where it stands without one.
    #[command(long_about = ROTATE_KEY_HELP)]
    RotateKey(RotateKeyArgs),
}

/// `device rotate-key --help`: the whole procedure.
pub const ROTATE_KEY_HELP: &str = "\
Replace a device's shardrecv key without failing a transfer: one step per run, and without a
step, where the rotation stands and what to do next.

A sender pins several keys and asks the receiver for them by name; a receiver serves several
and presents the first one asked for that it holds. So nothing fails while the device's
shardrecv holds at least one of the keys the registry pins, which every step keeps true:

  0. On the device's host: shardrecv keygen --out /etc/shard/recv-new.key (prints NEW).
  1. rotate-key DEVICE --add NEW: the registry pins the old key and NEW (the old one preferred);
     every `migrate` pass from now on gives shardsend both.
     Then give the device's shardrecv both keys, the old one first (its config:
     identity = [\"/etc/shard/recv.key\", \"/etc/shard/recv-new.key\"]) and reload it
     (systemctl reload shardrecv, or kill -HUP).
  2. rotate-key DEVICE --prefer: checks with a real handshake that the device's shardrecv
     serves NEW, then pins NEW first. Then make NEW its primary (identity = [NEW, OLD]) and
     reload it, for senders that name no key (shardsend from before key rotation).
  3. rotate-key DEVICE --finish: checks again that it serves NEW, then unpins the old key.
     Then drop the old key from shardrecv (identity = NEW) and reload it. Transfers in flight
     keep their connection; passes of running batches re-read the pins, so they follow.
  --abort instead of 2 or 3: checks that it still serves the old key, then unpins NEW.

Each step is an event in `shardmove events`; a step out of order (finishing with no rotation
under way, adding a second new key, ...) is refused (exit 5) and changes nothing, as is a step
whose check fails (shardrecv unreachable, or not serving the key). The checks connect from this
host to the device's transfer address (UDP) without a key of their own: shardrecv proves its
key, then refuses the connection (it logs a failed handshake).";

/// `device rotate-key`'s arguments: the device and at most one step.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("step").args(["add", "prefer", "finish", "abort"])))]
pub struct RotateKeyArgs {
    /// Device name.
    pub device: String,
    /// Step 1: pin NEW (its shardrecv's new key fingerprint) beside the device's key.
    #[arg(long, value_name = "NEW")]
    pub add: Option<String>,
    /// Step 2: once its shardrecv serves both keys (checked), pin the new key first.
    #[arg(long)]
    pub prefer: bool,
    /// Step 3: once its shardrecv serves the new key (checked), unpin the old one.
    #[arg(long)]
    pub finish: bool,
    /// Go back: once its shardrecv serves the old key (checked), unpin the new one.
    #[arg(long)]
    pub abort: bool,
}

impl RotateKeyArgs {
    /// The library request (a malformed `--add` fingerprint is invalid input).
    pub fn request(&self) -> Result<crate::keys::RotateKey> {
        use crate::keys::KeyStep;
        let step = match (&self.add, self.prefer, self.finish, self.abort) {
            (Some(fp), ..) => KeyStep::add(fp)?,
            (None, true, ..) => KeyStep::Prefer,
            (None, false, true, _) => KeyStep::Finish,
            (None, false, false, true) => KeyStep::Abort,
            (None, false, false, false) => KeyStep::Status,
        };
        Ok(crate::keys::RotateKey {
            device: self.device.clone(),
            step,
        })
    }
}

/// `device add`'s arguments.
#[derive(Debug, Args)]
pub struct DeviceAdd {
    /// Device name (letters, digits, '.', '_', '-').
    pub name: String,
    /// Service the device belongs to.
    #[arg(long)]
    pub service: String,
    /// Host the device is on (`localhost` runs steps locally, `netns:NAME` inside network
    /// namespace NAME here, any other through ssh).
    #[arg(long)]
    pub host: String,
    /// Transfer address of its `shardrecv`, HOST:PORT.
    #[arg(long)]
    pub transfer: String,
    /// Absolute directory holding the working copies.
    #[arg(long)]
    pub root: String,
    /// Key fingerprint of its `shardrecv`.
    #[arg(long)]
    pub fingerprint: Option<String>,
}

impl DeviceAdd {
    /// What the registry records.
    pub fn new_device(&self) -> NewDevice {
        NewDevice {
            name: self.name.clone(),
            service: self.service.clone(),
            host: self.host.clone(),
            transfer_addr: self.transfer.clone(),
            root_path: self.root.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
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
pub struct BindingRef {
    /// The instance (tenant).
    #[arg(long)]
    pub instance: String,
    /// The service (storage pool).
    #[arg(long)]
    pub service: String,
}

#[derive(Debug, Subcommand)]
pub enum BindingCmd {
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
pub enum RepoCmd {
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
pub enum HostCmd {
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
pub struct ObserveArgs {
    /// Run as a daemon: passes every --interval seconds until SIGTERM.
    #[arg(long, requires_all = ["instance", "service", "pid_file"])]
    pub daemon: bool,
    /// Only this instance's repositories.
    #[arg(long)]
    pub instance: Option<String>,
    /// Only repositories on this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only fetch into copies on this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Pid file the daemon writes (and removes on exit); refuses to start twice.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Seconds between passes.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
    /// Stop after this many passes.
    #[arg(long)]
    pub passes: Option<u64>,
}

impl ObserveArgs {
    /// The worker's configuration with `--daemon` (clap requires its three options).
    pub fn worker_config(&self) -> Result<WorkerConfig> {
        let (Some(instance), Some(service), Some(pid_file)) =
            (&self.instance, &self.service, &self.pid_file)
        else {
            return Err(Error::invalid(
                "observe --daemon",
                "needs --instance, --service and --pid-file",
            ));
        };
        Ok(WorkerConfig {
            instance: instance.clone(),
            service: service.clone(),
            device: self.device.clone(),
            pid_file: pid_file.clone(),
            interval: Duration::from_secs(self.interval),
            max_passes: self.passes,
        })
    }
}

/// Default maintenance message shown to users whose push is refused during a migration.
pub const DEFAULT_MIGRATE_MESSAGE: &str =
    "This repository is being moved to another storage shard; pushes are paused for a moment. Reads keep working.";

#[derive(Debug, Subcommand)]
pub enum StatusCmd {
    /// Serve the maintenance page until interrupted; prints `serving http://ADDR/` once ready.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

/// Which control plane holds the registry `migrate` works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaneKind {
    /// shardmove's own registry (SQLite or PostgreSQL, `--db`).
    Builtin,
    /// A Phorge cluster: Almanac services and devices, Phorge's repositories and runbook
    /// (`--phorge-root`, `--conduit`, `--token-file`). The batch journal still lives in `--db`.
    Phorge,
}

/// How `migrate --plane phorge` runs the runbook's registry steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PhorgeSteps {
    /// One PHP process for the batch, through Phorge's own editors (milliseconds a step).
    Agent,
    /// `bin/repository` per step (0.3-0.5 s each: PHP starts and loads Phorge every time).
    Cli,
}

/// Where a Phorge cluster's Conduit API is.
#[derive(Debug, Clone, Args)]
pub struct ConduitArgs {
    /// Phorge's base URL (its Conduit API is at URL/api/).
    #[arg(long, value_name = "URL", env = "SHARDMOVE_CONDUIT")]
    pub conduit: Option<String>,
    /// File holding a Conduit API token of a user who may edit Almanac services and devices.
    #[arg(long, value_name = "FILE", env = "SHARDMOVE_CONDUIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ConduitArgs {
    /// The URL and the token read from its file.
    pub fn resolve(&self) -> Result<(String, String)> {
        let url = self
            .conduit
            .clone()
            .ok_or_else(|| Error::invalid("--conduit", "required with a Phorge cluster"))?;
        let file = self
            .token_file
            .as_ref()
            .ok_or_else(|| Error::invalid("--token-file", "required with a Phorge cluster"))?;
        let token = std::fs::read_to_string(file).map_err(|e| Error::Io {
            context: "reading the Conduit token",
            path: file.clone(),
            source: e,
        })?;
        Ok((url, token.trim().to_string()))
    }
}

#[derive(Debug, Subcommand)]
pub enum PhorgeCmd {
    /// Record how shardmove reaches an Almanac device (its properties shardmove.host,
    /// shardmove.transfer, shardmove.fingerprint), through Conduit.
    Device {
        /// The Almanac device's name.
        name: String,
        /// Where steps on it run: `localhost`, an ssh host, `netns:NAME`, or `exec:PREFIX`
        /// (a command prefix, e.g. the lab kit's `exec:/lab/tools/ondev.sh a`).
        #[arg(long)]
        host: Option<String>,
        /// Its shardrecv, HOST:PORT.
        #[arg(long)]
        transfer: Option<String>,
        /// Its shardrecv's key fingerprint; during a key rotation both keys, preferred first,
        /// separated by a space ("NEW OLD"): transfers pin every one (docs/key-rotation.md).
        #[arg(long)]
        fingerprint: Option<String>,
        #[command(flatten)]
        conduit: ConduitArgs,
    },
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub command: Option<MigrateCmd>,
    /// The tenant (built-in registry; required there). With Phorge: a name for the cluster in
    /// the journal (default `phorge`).
    #[arg(long)]
    pub instance: Option<String>,
    /// Service the repositories leave (an Almanac service name with Phorge).
    #[arg(long, required = true)]
    pub from: Option<String>,
    /// Service they move to (bound to the instance if needed).
    #[arg(long, required = true)]
    pub to: Option<String>,
    /// Where the registry is: shardmove's own, or a Phorge cluster.
    #[arg(long, value_enum, default_value = "builtin")]
    pub plane: PlaneKind,
    /// Phorge: the checkout (with bin/repository) on --phorge-host.
    #[arg(long, value_name = "DIR")]
    pub phorge_root: Option<String>,
    /// Phorge: where the checkout is (an executor host, as for devices).
    #[arg(long, value_name = "HOST", default_value = "localhost")]
    pub phorge_host: String,
    /// Phorge: how the runbook's registry steps run.
    #[arg(long, value_enum, default_value = "agent")]
    pub phorge_steps: PhorgeSteps,
    #[command(flatten)]
    pub conduit: ConduitArgs,
    /// shardsend's congestion controller for the transfers. `background` (the default)
    /// yields to users' traffic on shared links (a competing TCP flow keeps most of the link);
    /// `bbr` takes the link's full rate, even with loss; `auto` is shardsend's own default
    /// (bbr, cubic on loopback).
    #[arg(long, default_value = "background", value_parser = ["background", "auto", "bbr", "cubic", "newreno"])]
    pub congestion: String,
    /// Only these repositories (NAME or INSTANCE/NAME); default: all of the instance on --from.
    #[arg(long, num_args = 1..)]
    pub repos: Vec<String>,
    /// Repositories moved at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Repositories moved at once from one source host (one disk, one link).
    #[arg(long, default_value_t = 2)]
    pub per_host: usize,
    /// What users see when a push is refused during their repository's short freeze.
    #[arg(long, default_value = DEFAULT_MIGRATE_MESSAGE)]
    pub message: String,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue migration ID after the orchestrator was stopped or killed.
    #[arg(long, value_name = "ID")]
    pub resume: Option<i64>,
    /// Sender identity key, as a path on the source hosts.
    #[arg(long, default_value = "/etc/shard/send.key")]
    pub identity: String,
    /// shardsend as run on the source hosts (default: the one beside shardmove, else PATH).
    #[arg(long)]
    pub shardsend: Option<String>,
    /// Seconds maintenance start waits for pushes in flight.
    #[arg(long, default_value_t = 30)]
    pub freeze_wait: u64,
    /// Sign a transfer ticket for every pass with this key (a key made by `shardsend
    /// keygen`, on this host), for target receivers run with `--ticket-signer` set to its
    /// fingerprint: each ticket lets only the source's sender key create (or replace the
    /// recorded tree at) this repository's path, until it expires
    #[arg(long, value_name = "PATH", env = "SHARDMOVE_TICKET_KEY")]
    pub ticket_key: Option<PathBuf>,
    /// Seconds a transfer ticket stays valid (a pass reconnecting after that fails, and the
    /// pre-copy's retry gets a new one)
    #[arg(long, value_name = "SECONDS", default_value_t = crate::tickets::DEFAULT_TTL.as_secs())]
    pub ticket_ttl: u64,
    /// Seconds a pre-copy round waits for a `git gc`/`repack` already working in the
    /// repository on A to finish (it would otherwise be copied twice, or break the frozen final
    /// pass); after that the repository is left on A.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub repack_wait: u64,
    /// Cap each transfer's send rate (shardsend --bwlimit, e.g. 50M).
    #[arg(long)]
    pub bwlimit: Option<String>,
    /// Install B's copies for their numeric owners as on A (shardsend --preserve-owner; B's
    /// shardrecv must run as root or with CAP_CHOWN and friends, else refused before any data
    /// moves). Without this, --chown or --map-owner, copies belong to the user running shardrecv.
    #[arg(long)]
    pub preserve_owner: bool,
    /// Install B's copies for USER:GROUP as B knows them, e.g. the forge's daemon user: git
    /// refuses a repository owned by someone else ("dubious ownership").
    #[arg(long, value_name = "USER:GROUP")]
    pub chown: Option<String>,
    /// Rewrite an owner and/or group, FROM=TO (shardsend --map-owner; repeatable).
    #[arg(long, value_name = "FROM=TO")]
    pub map_owner: Vec<String>,
    /// Copy a symlink leaving the repository as a link when its target is inside DIR (e.g. a
    /// hooks directory shared by all repositories on both hosts); otherwise it is refused.
    #[arg(long, value_name = "DIR")]
    pub allow_external_link: Vec<String>,
    /// Make copies of repositories that borrow objects (objects/info/alternates) self-contained
    /// on B; without it such a repository is refused (rolled back, left on A).
    #[arg(long)]
    pub dissociate: bool,
    /// Run the full `git fsck --connectivity-only` on B while the repository is read-only.
    /// By default B's pre-copy gets the full check while still live, and the read-only window
    /// only checks what the final pass brought (as git does for a push).
    #[arg(long)]
    pub full_verify: bool,
    /// After the batch, leave daemons alone instead of running `host restart` for the instance
    /// (which stops them where A is now no-daemons and starts them where the plan allows).
    #[arg(long)]
    pub no_restart_daemons: bool,
    /// Directory of daemon pid and log files, as for `host restart`.
    #[arg(long, env = "SHARDMOVE_RUN_DIR", default_value = "shardmove-run")]
    pub run_dir: PathBuf,
    /// Per-device daemon command, as for `host restart`.
    #[arg(long, env = "SHARDMOVE_DAEMON_TEMPLATE", default_value = daemons::DEFAULT_TEMPLATE)]
    pub daemon_template: String,
    /// Seconds between observation passes of restarted daemons.
    #[arg(long, default_value_t = 60)]
    pub daemon_interval: u64,
}

/// `name` in the directory of the running binary, if there is such a file (how `migrate`
/// finds the `shardsend` installed with it).
pub fn beside_this_binary(name: &str) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join(name);
    candidate.is_file().then(|| candidate.display().to_string())
}

impl MigrateArgs {
    /// The batch to run (clap requires --instance, --from and --to unless a subcommand is
    /// given); `--parallel 0` and `--per-host 0` mean 1.
    pub fn config(&self) -> MigrateConfig {
        MigrateConfig {
            spec: BatchSpec {
                instance: self.instance.clone().unwrap_or_else(|| match self.plane {
                    PlaneKind::Phorge => "phorge".into(),
                    PlaneKind::Builtin => String::new(),
                }),
                from: self.from.clone().unwrap_or_default(),
                to: self.to.clone().unwrap_or_default(),
                repos: self.repos.clone(),
            },
            parallel: self.parallel.max(1),
            per_host: self.per_host.max(1),
            message: self.message.clone(),
        }
    }

    /// How steps run on the shard hosts. `shardsend`: `--shardsend`, else `beside` (the one
    /// found beside this binary), else whichever the hosts' PATH has.
    pub fn host_config(&self, beside: Option<String>) -> Result<HostConfig> {
        let tickets = self
            .ticket_key
            .as_deref()
            .map(|key| {
                crate::tickets::TicketSigner::load(key, Duration::from_secs(self.ticket_ttl))
            })
            .transpose()?
            .map(std::sync::Arc::new);
        Ok(HostConfig {
            tickets,
            shardsend: (self.shardsend.clone().or(beside)).unwrap_or_else(|| "shardsend".into()),
            identity: self.identity.clone(),
            freeze_wait: Duration::from_secs(self.freeze_wait),
            repack_wait: Duration::from_secs(self.repack_wait),
            shardsend_args: self.shardsend_args(),
        })
    }

    /// What every `shardsend` of the batch gets beyond source, target and identity.
    fn shardsend_args(&self) -> Vec<String> {
        let flag = |name: &str, value: &String| [format!("--{name}"), value.clone()];
        let mut args: Vec<String> = Vec::new();
        args.extend(self.bwlimit.iter().flat_map(|b| flag("bwlimit", b)));
        args.extend(flag("congestion", &self.congestion));
        if self.preserve_owner {
            args.push("--preserve-owner".into());
        }
        args.extend(self.chown.iter().flat_map(|c| flag("chown", c)));
        args.extend(self.map_owner.iter().flat_map(|m| flag("map-owner", m)));
        args.extend((self.allow_external_link.iter()).flat_map(|d| flag("allow-external-link", d)));
        if self.dissociate {
            args.push("--dissociate".into());
        }
        args
    }

    /// The Phorge cluster `--plane phorge` names.
    pub fn phorge(&self) -> Result<crate::phorge::PhorgeConfig> {
        let (conduit, token) = self.conduit.resolve()?;
        let root = self
            .phorge_root
            .clone()
            .ok_or_else(|| Error::invalid("--phorge-root", "required with --plane phorge"))?;
        Ok(crate::phorge::PhorgeConfig {
            root,
            host: self.phorge_host.clone(),
            conduit,
            token,
            steps: match self.phorge_steps {
                PhorgeSteps::Agent => crate::phorge::Steps::Agent,
                PhorgeSteps::Cli => crate::phorge::Steps::Cli,
            },
            freeze_wait_secs: self.freeze_wait,
            full_verify: self.full_verify,
        })
    }

    /// The ports of the batch: the plane `--plane` names, host steps through executors.
    /// `daemons` is what the built-in plane restarts after the batch.
    pub fn ports(
        &self,
        registry: &crate::Registry,
        daemons: Option<crate::daemons::RestartConfig>,
        beside: Option<String>,
    ) -> Result<crate::migrate::Ports> {
        use std::sync::Arc;
        let hosts = self.host_config(beside)?;
        match self.plane {
            PlaneKind::Builtin => {
                if self.instance.is_none() && self.command.is_none() {
                    return Err(Error::invalid(
                        "--instance",
                        "required with the built-in registry",
                    ));
                }
                Ok(crate::migrate::builtin_ports(
                    crate::migrate::builtin::BuiltinPlane {
                        registry: registry.clone(),
                        daemons,
                        full_verify: self.full_verify,
                    },
                    hosts,
                ))
            }
            PlaneKind::Phorge => Ok(crate::migrate::Ports {
                store: registry.clone(),
                plane: Arc::new(crate::phorge::PhorgePlane::new(self.phorge()?)?),
                hosts: Arc::new(crate::migrate::host::ExecutorHostOps { cfg: hosts }),
            }),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum MigrateCmd {
    /// Per-repository state, bytes and read-only seconds of migration ID (default: the latest).
    Status { id: Option<i64> },
}

#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the work files in DIR instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of repositories.
    #[arg(long, default_value_t = 6)]
    pub repos: usize,
    /// Repositories moved at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// After the migration, keep both shard hosts and the status page up until Ctrl-C.
    #[arg(long)]
    pub keep_serving: bool,
    /// Loopback mode even as root: no network namespaces.
    #[arg(long)]
    pub no_netns: bool,
}

#[cfg(feature = "demo")]
impl DemoArgs {
    /// The demo's configuration; `bin_dir` holds `shardsend` and `shardrecv` (beside this
    /// binary). `--repos 0` and `--parallel 0` mean 1.
    pub fn config(&self, bin_dir: PathBuf) -> crate::demo::DemoConfig {
        use crate::demo::{DemoConfig, NetworkChoice};
        DemoConfig {
            bin_dir,
            dir: self.dir.clone(),
            repos: self.repos.max(1),
            parallel: self.parallel.max(1),
            keep_serving: self.keep_serving,
            network: if self.no_netns {
                NetworkChoice::Loopback
            } else {
                NetworkChoice::Auto
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::error::exit_code;

    #[test]
    fn definitions_are_consistent() {
        // clap's own checks: no clashing names, valid defaults, requirements that exist.
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_every_exit_code() {
        for code in [
            exit_code::OK,
            exit_code::INTERNAL,
            exit_code::INVALID,
            exit_code::NOT_FOUND,
            exit_code::ALREADY_EXISTS,
            exit_code::REFUSED,
            exit_code::PUSHES_IN_FLIGHT,
            exit_code::HOST_COMMAND,
            exit_code::DATABASE,
            exit_code::MIGRATION_INCOMPLETE,
            exit_code::PROBLEMS_FOUND,
        ] {
            assert!(
                AFTER_HELP.contains(&format!("\n  {code:<2} ")),
                "exit code {code} is not in --help"
            );
        }
    }

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("shardmove").chain(args.iter().copied()))
            .expect("parse")
            .command
    }

    #[test]
    fn migrate_args_become_the_batch_and_host_configs() {
        let Command::Migrate(args) = parse(&[
            "migrate",
            "--instance",
            "t",
            "--from",
            "a",
            "--to",
            "b",
            "--repos",
            "r1",
            "t/r2",
            "--parallel",
            "0",
            "--bwlimit",
            "50M",
            "--freeze-wait",
            "7",
        ]) else {
            panic!("not migrate");
        };
        let cfg = args.config();
        assert_eq!(
            cfg.spec,
            BatchSpec {
                instance: "t".into(),
                from: "a".into(),
                to: "b".into(),
                repos: vec!["r1".into(), "t/r2".into()],
            }
        );
        assert_eq!((cfg.parallel, cfg.per_host), (1, 2));
        assert_eq!(cfg.message, DEFAULT_MIGRATE_MESSAGE);
        let hosts = args
            .host_config(Some("/opt/bin/shardsend".into()))
            .expect("hosts");
        assert_eq!(hosts.shardsend, "/opt/bin/shardsend");
        assert_eq!(hosts.identity, "/etc/shard/send.key");
        assert_eq!(
            hosts.shardsend_args,
            ["--bwlimit", "50M", "--congestion", "background"]
        );
        assert_eq!(hosts.freeze_wait, Duration::from_secs(7));
        assert_eq!(
            args.host_config(None).expect("hosts").shardsend,
            "shardsend"
        );
        let Command::Migrate(explicit) = parse(&[
            "migrate",
            "--instance",
            "t",
            "--from",
            "a",
            "--to",
            "b",
            "--shardsend",
            "/x/ss",
        ]) else {
            panic!("not migrate");
        };
        assert_eq!(
            explicit
                .host_config(Some("/opt/ss".into()))
                .expect("hosts")
                .shardsend,
            "/x/ss"
        );
        // Migrations yield to users' traffic unless told otherwise.
        assert_eq!(
            explicit.host_config(None).expect("hosts").shardsend_args,
            ["--congestion", "background"]
        );
        // Copy fidelity reaches every shardsend.
        let Command::Migrate(faithful) = parse(&[
            "migrate",
            "--instance",
            "t",
            "--from",
            "a",
            "--to",
            "b",
            "--chown",
            "git:git",
            "--map-owner",
            "root=git",
            "--map-owner",
            ":wheel=:git",
            "--allow-external-link",
            "/srv/hooks",
            "--dissociate",
            "--preserve-owner",
        ]) else {
            panic!("not migrate");
        };
        assert_eq!(
            faithful.host_config(None).expect("hosts").shardsend_args,
            [
                "--congestion",
                "background",
                "--preserve-owner",
                "--chown",
                "git:git",
                "--map-owner",
                "root=git",
                "--map-owner",
                ":wheel=:git",
                "--allow-external-link",
                "/srv/hooks",
                "--dissociate"
            ]
        );
    }

    #[test]
    fn device_and_observe_args_become_library_values() {
        let Command::Device(DeviceCmd::Add(add)) = parse(&[
            "device",
            "add",
            "a1",
            "--service",
            "a",
            "--host",
            "h",
            "--transfer",
            "h:1",
            "--root",
            "/srv",
        ]) else {
            panic!("not device add");
        };
        let new = add.new_device();
        assert_eq!(
            (new.name.as_str(), new.service.as_str(), new.host.as_str()),
            ("a1", "a", "h")
        );
        assert_eq!(
            (new.transfer_addr.as_str(), new.root_path.as_str()),
            ("h:1", "/srv")
        );
        assert_eq!(new.fingerprint, None);
        let Command::Observe(daemon) = parse(&[
            "observe",
            "--daemon",
            "--instance",
            "t",
            "--service",
            "a",
            "--pid-file",
            "/run/p",
            "--interval",
            "5",
            "--passes",
            "2",
        ]) else {
            panic!("not observe");
        };
        let worker = daemon.worker_config().expect("worker config");
        assert_eq!(
            (worker.instance.as_str(), worker.service.as_str()),
            ("t", "a")
        );
        assert_eq!(worker.pid_file, PathBuf::from("/run/p"));
        assert_eq!(
            (worker.interval, worker.max_passes),
            (Duration::from_secs(5), Some(2))
        );
        // Without --daemon the worker options are optional; asking for a worker is then an error.
        let Command::Observe(pass) = parse(&["observe", "--instance", "t"]) else {
            panic!("not observe");
        };
        assert!(pass.worker_config().is_err());
        assert!(
            Cli::try_parse_from(["shardmove", "observe", "--daemon", "--instance", "t"]).is_err()
        );
    }

    #[test]
    fn rotate_key_takes_at_most_one_step() {
        use crate::keys::KeyStep;
        let fp = "ab".repeat(32);
        let step = |args: &[&str]| {
            let mut all = vec!["device", "rotate-key", "b1"];
            all.extend(args);
            match parse(&all) {
                Command::Device(DeviceCmd::RotateKey(a)) => a.request().map(|r| r.step),
                _ => panic!("not rotate-key"),
            }
        };
        assert_eq!(step(&[]).unwrap(), KeyStep::Status);
        assert_eq!(step(&["--add", &fp]).unwrap(), KeyStep::Add(fp.clone()));
        assert_eq!(step(&["--prefer"]).unwrap(), KeyStep::Prefer);
        assert_eq!(step(&["--finish"]).unwrap(), KeyStep::Finish);
        assert_eq!(step(&["--abort"]).unwrap(), KeyStep::Abort);
        assert!(step(&["--add", "nope"]).is_err());
        for two in [
            vec!["--prefer", "--finish"],
            vec!["--add", fp.as_str(), "--abort"],
        ] {
            let mut all = vec!["shardmove", "device", "rotate-key", "b1"];
            all.extend(two);
            assert!(Cli::try_parse_from(all).is_err());
        }
    }

    #[cfg(feature = "demo")]
    #[test]
    fn demo_args_become_its_config() {
        use crate::demo::NetworkChoice;
        let Command::Demo(args) = parse(&["demo", "--repos", "0", "--no-netns"]) else {
            panic!("not demo");
        };
        let cfg = args.config(PathBuf::from("/opt/bin"));
        assert_eq!(cfg.bin_dir, PathBuf::from("/opt/bin"));
        assert_eq!((cfg.repos, cfg.parallel, cfg.dir), (1, 2, None));
        assert!(matches!(cfg.network, NetworkChoice::Loopback));
        let Command::Demo(auto) = parse(&["demo"]) else {
            panic!("not demo");
        };
        assert!(matches!(
            auto.config(PathBuf::new()).network,
            NetworkChoice::Auto
        ));
        assert_eq!(auto.config(PathBuf::new()).repos, 6);
    }

    #[test]
    fn doctor_args_become_its_config() {
        let Command::Doctor(args) = parse(&["doctor", "--fix", "--retention-days", "2"]) else {
            panic!("not doctor");
        };
        let cfg = args.config();
        assert!(cfg.fix);
        assert_eq!(cfg.max_maintenance, Duration::from_secs(3600));
        assert_eq!(cfg.retention, Duration::from_secs(2 * 86_400));
        let Command::Doctor(huge) = parse(&["doctor", "--retention-days", &u64::MAX.to_string()])
        else {
            panic!("not doctor");
        };
        assert_eq!(huge.config().retention, Duration::from_secs(u64::MAX));
    }

    #[test]
    fn migrate_status_needs_no_services_but_a_batch_does() {
        let status = Cli::try_parse_from(["shardmove", "migrate", "status", "3"]).expect("parse");
        let Command::Migrate(args) = status.command else {
            panic!("not migrate");
        };
        assert!(matches!(
            args.command,
            Some(MigrateCmd::Status { id: Some(3) })
        ));
        assert!(Cli::try_parse_from(["shardmove", "migrate", "--instance", "t"]).is_err());
    }
}
