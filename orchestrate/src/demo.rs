//! `shardmove demo`: a full migration between two local shard hosts, from nothing.
//!
//! It builds what an operator would have: two shard roots with a `shardrecv` daemon each
//! (keys made and pinned both ways), an embedded SQLite registry with two services and their
//! devices, an instance with generated repositories of mixed sizes (some of them observed
//! mirrors of an upstream), then runs the real `migrate` while a background client keeps
//! cloning the repositories from wherever the registry says they live. It checks every moved
//! repository (refs equal to the original, `git fsck` clean), prints a summary, and cleans
//! up. The demo is the acceptance test a stranger can run: it needs no argument and no
//! network beyond this machine.
//!
//! Network, in one of two modes (one line says which, and why):
//! - **namespaces** (root, `ip netns` working, no `--no-netns`): each shard host is its own
//!   network namespace ([`crate::netns`]), linked to the other by a veth pair. Its devices'
//!   host is `netns:NAME`, so the executor runs every step on it (shardsend towards the other
//!   host, hooks, git) inside it, and its `shardrecv` listens on its veth address: the
//!   transfer really crosses a link between two network stacks. The registry, the status page
//!   (127.0.0.1) and the cloning client stay in this machine's namespace; the filesystem is
//!   shared, so the client clones through `file://` paths. The namespaces are removed on
//!   every exit (success, error, SIGINT/SIGTERM, with or without `--keep-serving`), after
//!   the processes inside are killed.
//! - **loopback** (otherwise): both hosts are this machine, both daemons on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use crate::error::{Error, Result};
use crate::executor::{Executor, LocalExecutor, NetnsExecutor, NETNS_HOST_PREFIX};
use crate::migrate::{self, MigrateConfig, MigrationSummary, Reporter};
use crate::netns::NetnsPair;
use crate::registry::{NewDevice, Registry};
use crate::repos::path_on;

/// Which network the demo may use for its two shard hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkChoice {
    /// Network namespaces when running as root and `ip netns` works, else loopback.
    #[default]
    Auto,
    /// Loopback only (`--no-netns`).
    Loopback,
}

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Directory holding `shardsend` and `shardrecv` (normally beside `shardmove`).
    pub bin_dir: PathBuf,
    /// Work directory; a temporary one (removed afterwards) when `None`.
    pub dir: Option<PathBuf>,
    pub repos: usize,
    pub parallel: usize,
    /// After the migration, keep the daemons and the status page up until Ctrl-C.
    pub keep_serving: bool,
    pub network: NetworkChoice,
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub work_dir: String,
    /// `namespaces` or `loopback`.
    pub network: String,
    /// The maintenance page users would read during the migration.
    pub status_url: String,
    pub migration: MigrationSummary,
    pub clones_ok: u64,
    pub clones_failed: u64,
    pub verified: Vec<String>,
}

/// A `shardrecv serve` child process, killed on drop.
struct Daemon {
    child: tokio::process::Child,
    addr: String,
    fingerprint: String,
}

async fn start_receiver(
    exec: &dyn Executor,
    bin_dir: &Path,
    listen: &str,
    root: &Path,
    key: &Path,
    (allow, ticket_signer): (&Path, &str),
) -> Result<Daemon> {
    let exe = bin_dir.join("shardrecv");
    let argv = [
        utf8(&exe)?,
        "serve",
        "--listen",
        listen,
        "--root",
        utf8(root)?,
        "--identity",
        utf8(key)?,
        "--allow",
        utf8(allow)?,
        // Tickets on, as a fleet runs: only what the orchestrator signed gets written.
        "--ticket-signer",
        ticket_signer,
    ];
    // Through the host's executor: in its network namespace when it has one (`ip netns
    // exec` execs in place, so the child is shardrecv itself).
    let mut child = tokio::process::Command::from(exec.command(&argv))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| io_error("starting", &exe, e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Refused("shardrecv has no stdout".into()))?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .map_err(|_| Error::Refused("shardrecv did not start within 20 s".into()))?
    .map_err(|e| io_error("reading", &exe, e))?;
    // "listening ADDR fingerprint FP"
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["listening", addr, "fingerprint", fp] => Ok(Daemon {
            child,
            addr: addr.to_string(),
            fingerprint: fp.to_string(),
        }),
        _ => Err(Error::Refused(format!(
            "unexpected first line from shardrecv: {line:?}"
        ))),
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::invalid(
            format!("path {}", path.display()),
            "not valid UTF-8 (the demo passes paths to the shard hosts' commands as text)",
        )
    })
}

fn io_error(context: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

async fn git(dir: Option<&Path>, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| io_error("running", Path::new("git"), e))?;
    if !out.status.success() {
        return Err(Error::HostCommand {
            host: "localhost".into(),
            command: format!("git {}", args.join(" ")),
            status: format!("{}", out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The network of the two shard hosts (index 0 is `shard-a`, 1 is `shard-b`).
enum Network {
    Loopback,
    Namespaces(NetnsPair),
}

impl Network {
    /// Picks the mode (see the module doc) and reports it in one line.
    async fn choose(choice: NetworkChoice, report: &Reporter) -> Network {
        let why = match choice {
            NetworkChoice::Loopback => "--no-netns given".to_string(),
            NetworkChoice::Auto if !crate::netns::is_root() => {
                "not root: network namespaces need root".to_string()
            }
            NetworkChoice::Auto => {
                let prefix = namespace_prefix();
                match tokio::task::spawn_blocking(move || NetnsPair::create(&prefix)).await {
                    Ok(Ok(pair)) => {
                        report(&format!(
                            "network: namespaces {} ({}) and {} ({}) joined by a veth pair; \
                             each shard host's shardrecv and steps run inside its own",
                            pair.a.name, pair.a.addr, pair.b.name, pair.b.addr
                        ));
                        return Network::Namespaces(pair);
                    }
                    Ok(Err(e)) => format!("network namespaces unavailable: {e}"),
                    Err(e) => format!("network namespaces unavailable: setup task failed: {e}"),
                }
            }
        };
        report(&format!(
            "network: loopback, both shard hosts on 127.0.0.1 in this machine's namespace ({why})"
        ));
        Network::Loopback
    }

    fn mode(&self) -> &'static str {
        match self {
            Network::Loopback => "loopback",
            Network::Namespaces(_) => "namespaces",
        }
    }

    /// The device host of shard host `side`: `localhost` or `netns:NAME`.
    fn host(&self, side: usize) -> String {
        match self {
            Network::Loopback => "localhost".into(),
            Network::Namespaces(pair) => {
                let ns = if side == 0 { &pair.a } else { &pair.b };
                format!("{NETNS_HOST_PREFIX}{}", ns.name)
            }
        }
    }

    /// Where shard host `side`'s shardrecv listens (port chosen by the kernel).
    fn listen(&self, side: usize) -> String {
        match self {
            Network::Loopback => "127.0.0.1:0".into(),
            Network::Namespaces(pair) => {
                let ns = if side == 0 { &pair.a } else { &pair.b };
                format!("{}:0", ns.addr)
            }
        }
    }

    fn executor(&self, side: usize) -> Result<Box<dyn Executor>> {
        match self {
            Network::Loopback => Ok(Box::new(LocalExecutor)),
            Network::Namespaces(pair) => {
                let ns = if side == 0 { &pair.a } else { &pair.b };
                Ok(Box::new(NetnsExecutor::new(&ns.name)?))
            }
        }
    }

    /// Removes the namespaces (killing what still runs inside); nothing to do on loopback.
    async fn teardown(self, report: &Reporter) -> Result<()> {
        let Network::Namespaces(mut pair) = self else {
            return Ok(());
        };
        let names = format!("{} and {}", pair.a.name, pair.b.name);
        tokio::task::spawn_blocking(move || pair.teardown())
            .await
            .map_err(|e| Error::Refused(format!("removing network namespaces {names}: {e}")))??;
        report(&format!("network namespaces {names} removed"));
        Ok(())
    }
}

/// `shardmove-demo-PID` (with a sequence number after the first demo of this process), so
/// concurrent demos never share a namespace.
fn namespace_prefix() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    match SEQ.fetch_add(1, Ordering::Relaxed) {
        0 => format!("shardmove-demo-{}", std::process::id()),
        n => format!("shardmove-demo-{}-{n}", std::process::id()),
    }
}

/// SIGINT and SIGTERM, listened for from the start, so an interrupted demo still cleans up.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Interrupts> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen =
            |kind| signal(kind).map_err(|e| Error::Refused(format!("listening for signals: {e}")));
        Ok(Interrupts {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
        })
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// A spawned task aborted when dropped (an interrupted demo must not leave one running).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What runs after a successful migration, until [`Serving::stop`].
struct Serving {
    registry: Registry,
    daemons: Vec<Daemon>,
    page_stop: tokio::sync::oneshot::Sender<()>,
    page: Task<Result<()>>,
    summary: DemoSummary,
}

impl Serving {
    async fn stop(mut self) -> DemoSummary {
        let _ = self.page_stop.send(());
        let _ = (&mut self.page.0).await;
        for d in &mut self.daemons {
            let _ = d.child.kill().await;
        }
        self.registry.close().await;
        self.summary
    }
}

/// Runs the demo; `report` receives progress lines.
pub async fn run(cfg: &DemoConfig, report: Reporter) -> Result<DemoSummary> {
    for exe in ["shardsend", "shardrecv"] {
        if !cfg.bin_dir.join(exe).is_file() {
            return Err(Error::Refused(format!(
                "{exe} not found in {}: build the workspace first (`cargo build --release --workspace`)",
                cfg.bin_dir.display()
            )));
        }
    }
    let mut interrupts = Interrupts::new()?;
    let temp;
    let work = match &cfg.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| io_error("creating", d, e))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("shardmove-demo.")
                .tempdir()
                .map_err(|e| io_error("creating", Path::new("/tmp"), e))?;
            temp.path().to_path_buf()
        }
    };
    report(&format!("work directory {}", work.display()));
    let network = Network::choose(cfg.network, &report).await;

    // Every path from here on reaches the teardown below (a panic drops the namespaces).
    let outcome = tokio::select! {
        outcome = demo(cfg, &work, &network, &report) => outcome,
        signal = interrupts.recv() => Err(Error::Refused(format!("demo interrupted by {signal}"))),
    };
    let outcome = match outcome {
        Ok(serving) => {
            if cfg.keep_serving {
                report(&format!(
                    "serving {} and both shardrecv daemons until Ctrl-C",
                    serving.summary.status_url
                ));
                let signal = interrupts.recv().await;
                report(&format!("{signal}: stopping"));
            }
            Ok(serving.stop().await)
        }
        Err(e) => Err(e),
    };
    match (outcome, network.teardown(&report).await) {
        (Ok(summary), Ok(())) => Ok(summary),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => {
            report(&format!("cleanup failed too: {cleanup}"));
            Err(e)
        }
    }
}

/// Everything between choosing the network and serving: hosts, registry, repositories, the
/// migration with a client cloning, verification.
async fn demo(
    cfg: &DemoConfig,
    work: &Path,
    network: &Network,
    report: &Reporter,
) -> Result<Serving> {
    // Two shard hosts: roots, keys (each pins the other), a receiver each.
    let keys = work.join("keys");
    std::fs::create_dir_all(&keys).map_err(|e| io_error("creating", &keys, e))?;
    let mut fps = Vec::new();
    for host in ["shard-a", "shard-b"] {
        let root = work.join(host);
        std::fs::create_dir_all(&root).map_err(|e| io_error("creating", &root, e))?;
        let id = transfer::identity::Identity::generate(&keys.join(format!("{host}.key")))
            .map_err(|e| Error::Refused(e.to_string()))?;
        fps.push(id.fingerprint.to_string());
    }
    // The orchestrator's own key: it signs a transfer ticket for every pass.
    let orchestrator_key = keys.join("orchestrator.key");
    let signer = transfer::identity::Identity::generate(&orchestrator_key)
        .map_err(|e| Error::Refused(e.to_string()))?
        .fingerprint
        .to_string();
    let allow = keys.join("allow.txt");
    std::fs::write(
        &allow,
        format!("{}  # shard-a\n{}  # shard-b\n", fps[0], fps[1]),
    )
    .map_err(|e| io_error("writing", &allow, e))?;
    let mut daemons = Vec::new();
    for (side, host) in ["shard-a", "shard-b"].into_iter().enumerate() {
        let d = start_receiver(
            network.executor(side)?.as_ref(),
            &cfg.bin_dir,
            &network.listen(side),
            &work.join(host),
            &keys.join(format!("{host}.key")),
            (&allow, &signer),
        )
        .await?;
        report(&format!(
            "{host}: shardrecv on {} (key {}…){}",
            d.addr,
            d.fingerprint.get(..16).unwrap_or(&d.fingerprint),
            match network {
                Network::Loopback => String::new(),
                Network::Namespaces(_) => format!(" in {}", network.host(side)),
            }
        ));
        daemons.push(d);
    }

    // The registry: two services, one device each, an instance bound to the first.
    let db = work.join("registry.db");
    let registry = Registry::open(&db.display().to_string(), "demo").await?;
    for (service, device, host) in [("repo001", "a1", 0usize), ("repo002", "b1", 1)] {
        registry.add_service(service).await?;
        registry
            .add_device(&NewDevice {
                name: device.into(),
                service: service.into(),
                host: network.host(host),
                transfer_addr: daemons[host].addr.clone(),
                root_path: work
                    .join(if host == 0 { "shard-a" } else { "shard-b" })
                    .display()
                    .to_string(),
                fingerprint: Some(daemons[host].fingerprint.clone()),
            })
            .await?;
    }
    registry.add_instance("demo").await?;
    registry.add_binding("demo", "repo001").await?;
    registry.sync(Some("demo")).await?;

    // Repositories of mixed sizes, every third one an observed mirror of an upstream.
    let sizes: [u64; 6] = [1 << 20, 3 << 20, 6 << 20, 12 << 20, 2 << 20, 24 << 20];
    let upstreams = work.join("upstreams");
    let mut names = Vec::new();
    for i in 0..cfg.repos {
        let name = format!("r{:02}", i + 1);
        let size = sizes[i % sizes.len()];
        let kind = if i % 2 == 0 {
            fixtures::Kind::Bare
        } else {
            fixtures::Kind::Loose
        };
        let upstream = upstreams.join(format!("{name}.git"));
        let mut spec = fixtures::FixtureSpec::new(kind, Some(size), &upstream);
        spec.seed = i as u64 + 1;
        tokio::task::spawn_blocking(move || fixtures::make(&spec))
            .await
            .map_err(|e| Error::Refused(format!("fixture task failed: {e}")))?
            .map_err(|e| Error::Refused(format!("making fixture {name}: {e}")))?;
        let observed = i % 3 == 2;
        let url = format!("file://{}", upstream.display());
        let repo = registry
            .create_repository("demo", &name, observed.then_some(url.as_str()))
            .await?;
        let device = registry.device(&repo.copies[0].device).await?;
        let path = path_on(&device, &repo.path);
        git(Some(&upstream), &["push", "--quiet", "--mirror", &path]).await?;
        report(&format!(
            "created demo/{name}: {} MiB {:?}{} on {}",
            size >> 20,
            kind,
            if observed { ", observed" } else { "" },
            repo.service
        ));
        names.push(name);
    }
    let observed = registry
        .observe_pass(Some("demo"), None, None)
        .await?
        .into_iter()
        .filter(|o| o.outcome == crate::repos::ObserveOutcome::Fetched)
        .count();
    report(&format!(
        "observation pass: {observed} repositories fetched"
    ));

    // A client that keeps cloning while repositories move.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut cloner = {
        let (registry, names, stop, ok, failed, dir) = (
            registry.clone(),
            names.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            work.join("clones"),
        );
        Task(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = &names[n % names.len()];
                n += 1;
                let Ok(repo) = registry.repository(&format!("demo/{name}")).await else {
                    continue;
                };
                let newest = repo
                    .copies
                    .iter()
                    .filter(|c| c.service == repo.service)
                    .max_by_key(|c| c.version);
                let Some(copy) = newest else { continue };
                let Ok(device) = registry.device(&copy.device).await else {
                    continue;
                };
                let target = dir.join(format!("{name}-{n}"));
                // A file:// URL, as a remote client would: a plain path makes git hardlink
                // the objects, which changes the source's ctime and forces a full resend.
                let src = format!("file://{}", path_on(&device, &repo.path));
                let target_text = target.display().to_string();
                match git(None, &["clone", "--quiet", "--bare", &src, &target_text]).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                let _ = std::fs::remove_dir_all(&target);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    };

    // The page that tells users what is read-only and why.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| io_error("listening", Path::new("127.0.0.1:0"), e))?;
    let status_url = format!(
        "http://{}/",
        listener
            .local_addr()
            .map_err(|e| io_error("listening", Path::new("127.0.0.1:0"), e))?
    );
    let (page_stop_tx, page_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let page = Task(tokio::spawn(crate::status_page::serve(
        registry.clone(),
        listener,
        async {
            let _ = page_stop_rx.await;
        },
    )));
    report(&format!("status page: {status_url}"));

    // The migration itself.
    let mcfg = MigrateConfig {
        spec: migrate::BatchSpec {
            instance: "demo".into(),
            from: "repo001".into(),
            to: "repo002".into(),
            repos: Vec::new(),
        },
        parallel: cfg.parallel,
        per_host: cfg.parallel,
        message: "demo: this repository is moving to shard repo002; pushes resume in a few seconds"
            .into(),
    };
    let ports = migrate::builtin_ports(
        migrate::builtin::BuiltinPlane {
            registry: registry.clone(),
            // The demo's shard hosts run no observation daemons.
            daemons: None,
            full_verify: false,
        },
        migrate::host::HostConfig {
            shardsend: cfg.bin_dir.join("shardsend").display().to_string(),
            identity: keys.join("shard-a.key").display().to_string(),
            freeze_wait: Duration::from_secs(30),
            tickets: Some(std::sync::Arc::new(crate::tickets::TicketSigner::load(
                &keys.join("orchestrator.key"),
                crate::tickets::DEFAULT_TTL,
            )?)),
            repack_wait: Duration::from_secs(3600),
            shardsend_args: Vec::new(),
        },
    );
    let (id, _) = migrate::start(&registry, ports.plane.as_ref(), &mcfg, None).await?;
    let plan = registry.batch(id).await?.spec.repos;
    report(&format!(
        "migrating {} repositories from repo001 to repo002, {} at a time",
        plan.len(),
        cfg.parallel
    ));
    let summary = migrate::run(&ports, &mcfg, id, report.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let _ = (&mut cloner.0).await;
    let summary = summary?;

    // Check every repository where the registry now says it lives.
    let mut verified = Vec::new();
    for name in &names {
        let repo = registry.repository(&format!("demo/{name}")).await?;
        if repo.service != "repo002" || repo.maintenance {
            return Err(Error::Refused(format!(
                "demo/{name} is on {} (maintenance {}), expected repo002 and writable",
                repo.service, repo.maintenance
            )));
        }
        let device = registry.device("b1").await?;
        let path = PathBuf::from(path_on(&device, &repo.path));
        let moved = git(
            Some(&path),
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        )
        .await?;
        let original = git(
            Some(&upstreams.join(format!("{name}.git"))),
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        )
        .await?;
        if moved != original {
            return Err(Error::Refused(format!(
                "demo/{name}: refs on repo002 differ from the original"
            )));
        }
        git(
            Some(&path),
            &["fsck", "--connectivity-only", "--no-progress"],
        )
        .await?;
        verified.push(format!("demo/{name}"));
    }
    report(&format!(
        "verified {} repositories on repo002 (refs equal to the originals, fsck clean)",
        verified.len()
    ));
    Ok(Serving {
        registry,
        daemons,
        page_stop: page_stop_tx,
        page,
        summary: DemoSummary {
            status_url,
            work_dir: work.display().to_string(),
            network: network.mode().to_string(),
            migration: summary,
            clones_ok: ok.load(Ordering::Relaxed),
            clones_failed: failed.load(Ordering::Relaxed),
            verified,
        },
    })
}
