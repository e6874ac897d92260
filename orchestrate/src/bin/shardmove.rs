//! `shardmove`: the operator's command line over the `orchestrate` library. It only parses
//! arguments ([`orchestrate::cli`]), builds the library's configs, calls one library function
//! per command, prints the result (text from [`orchestrate::render`], or JSON with `--json`)
//! and maps errors to the documented exit codes.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
#[cfg(feature = "demo")]
use orchestrate::cli::DemoArgs;
use orchestrate::cli::{
    BindingCmd, Cli, Command, DeviceCmd, HostCmd, InstanceCmd, MigrateArgs, MigrateCmd,
    ObserveArgs, PhorgeCmd, RepoCmd, ServiceCmd, StatusCmd,
};
use orchestrate::daemons::{self, RestartConfig};
use orchestrate::error::exit_code;
use orchestrate::repos::Thaw;
use orchestrate::{render, Registry};
use serde::Serialize;

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

/// Prints `value` as pretty JSON, or as `text` renders it (nothing for an empty text).
fn print<T: Serialize + ?Sized>(
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

/// Live progress goes to stderr in both modes, so `--json` keeps stdout a single document
/// while a script (or its log) still sees what the batch is doing.
fn reporter() -> orchestrate::migrate::Reporter {
    std::sync::Arc::new(|line: &str| {
        eprintln!("{}", render::progress_line(SystemTime::now(), line));
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo brings its own registry.
    #[cfg(feature = "demo")]
    if let Command::Demo(args) = &cli.command {
        return demo_command(args, cli.json).await;
    }
    // Generated from the command line's definitions: no registry involved.
    if orchestrate::manual::run(&cli.command, &mut std::io::stdout())? {
        return Ok(());
    }
    let actor = cli
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".to_string());
    let registry = Registry::open(&cli.db, &actor).await?;
    let result = dispatch(&registry, &cli, cli.json).await;
    registry.close().await;
    result
}

async fn dispatch(registry: &Registry, cli: &Cli, json: bool) -> anyhow::Result<()> {
    match &cli.command {
        Command::Service(cmd) => match cmd {
            ServiceCmd::Add { name } => print(
                json,
                &registry.add_service(name).await?,
                render::service_added,
            ),
            ServiceCmd::List => print(json, &registry.services().await?, |s| render::services(s)),
            ServiceCmd::Show { name } => {
                print(json, &registry.service(name).await?, render::service)
            }
        },
        Command::Device(cmd) => match cmd {
            DeviceCmd::Add(add) => {
                let added = registry.add_device(&add.new_device()).await?;
                print(json, &added, render::device_added)
            }
            DeviceCmd::List => print(json, &registry.devices().await?, |d| render::devices(d)),
            DeviceCmd::Show { name } => print(json, &registry.device(name).await?, render::device),
            DeviceCmd::RotateKey(args) => {
                let report = orchestrate::keys::rotate_key(registry, &args.request()?).await?;
                print(json, &report, render::key_rotation)
            }
        },
        Command::Instance(cmd) => match cmd {
            InstanceCmd::Add { name } => print(
                json,
                &registry.add_instance(name).await?,
                render::instance_added,
            ),
            InstanceCmd::List => {
                print(json, &registry.instances().await?, |i| render::instances(i))
            }
            InstanceCmd::Show { name } => {
                print(json, &registry.instance(name).await?, render::instance)
            }
        },
        Command::Binding(cmd) => match cmd {
            BindingCmd::Add(b) => {
                let added = registry.add_binding(&b.instance, &b.service).await?;
                print(json, &added, render::binding_added)
            }
            BindingCmd::List { instance } => {
                let all = registry.bindings(instance.as_deref()).await?;
                print(json, &all, |b| render::bindings(b))
            }
            BindingCmd::Show(b) => {
                let binding = registry.binding(&b.instance, &b.service).await?;
                print(json, &binding, render::binding)
            }
            BindingCmd::SetProperty {
                binding: b,
                key,
                value,
                force,
            } => {
                let binding = registry
                    .set_binding_property(&b.instance, &b.service, key, value, *force)
                    .await?;
                print(json, &binding, render::binding)
            }
        },
        Command::Sync { instance } => {
            let changes = registry.sync(instance.as_deref()).await?;
            print(json, &changes, |c| render::sync_changes(c))
        }
        Command::Repo(cmd) => repo_command(registry, cmd, json).await,
        Command::Host(HostCmd::Plan { instance }) => {
            let plan = daemons::plan(registry, instance.as_deref()).await?;
            print(json, &plan, |p| render::host_plan(p))
        }
        Command::Host(HostCmd::Restart {
            instance,
            run_dir,
            template,
            interval,
        }) => {
            let config = RestartConfig::for_this_binary(run_dir, template, &cli.db, *interval)?;
            let outcomes = daemons::restart(registry, &config, instance.as_deref()).await?;
            print(json, &outcomes, |o| render::restarted(o))
        }
        Command::Observe(args) => observe_command(registry, args, json).await,
        Command::Status {
            command: Some(StatusCmd::Serve { listen }),
        } => serve_status(registry, *listen).await,
        Command::Status { command: None } => print(json, &registry.in_maintenance().await?, |r| {
            render::in_maintenance(r)
        }),
        Command::Migrate(args) => migrate_command(registry, &cli.db, args, json).await,
        Command::Phorge(PhorgeCmd::Device {
            name,
            host,
            transfer,
            fingerprint,
            conduit,
        }) => {
            let (url, token) = conduit.resolve()?;
            let plane = orchestrate::phorge::PhorgePlane::for_conduit(&url, &token)?;
            let (h, t, f) = (host.as_deref(), transfer.as_deref(), fingerprint.as_deref());
            plane.set_device(name, h, t, f).await?;
            print(json, &serde_json::json!({"device": name}), |_| {
                format!("recorded how to reach Almanac device {name}")
            })
        }
        Command::Doctor(args) => {
            let report = orchestrate::doctor::run(registry, &args.config()).await?;
            print(json, &report, render::doctor)?;
            match report.problems {
                0 => Ok(()),
                count => Err(orchestrate::Error::ProblemsFound { count }.into()),
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo_command(args, json).await,
        // Answered by `manual::run` before the registry is opened.
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Events { subject, limit } => {
            let events = registry.events(subject.as_deref(), *limit).await?;
            print(json, &events, |e| render::events(e))
        }
    }
}

async fn repo_command(registry: &Registry, cmd: &RepoCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        RepoCmd::Create {
            instance,
            name,
            upstream,
        } => {
            let repo = registry
                .create_repository(instance, name, upstream.as_deref())
                .await?;
            print(json, &repo, render::repo_created)
        }
        RepoCmd::List { instance } => {
            let all = registry.repositories(instance.as_deref()).await?;
            print(json, &all, |r| render::repos(r))
        }
        RepoCmd::Show { repo } => print(json, &registry.repository(repo).await?, render::repo),
        RepoCmd::Maintenance {
            repo,
            start: Some(message),
            stop: false,
            wait,
        } => {
            let wait = Duration::from_secs(*wait);
            let repo = registry.start_maintenance(repo, message, wait).await?;
            print(json, &repo, |r| render::maintenance_started(r, message))
        }
        RepoCmd::Maintenance {
            repo,
            start: None,
            stop: true,
            ..
        } => print(
            json,
            &registry.stop_maintenance(repo).await?,
            render::maintenance_stopped,
        ),
        RepoCmd::Maintenance { .. } => {
            anyhow::bail!("pass exactly one of --start MESSAGE and --stop")
        }
        RepoCmd::Observe { instance } => {
            let outcomes = registry
                .observe_pass(instance.as_deref(), None, None)
                .await?;
            print(json, &outcomes, |o| render::observations(o))
        }
        RepoCmd::Clusterize { repo, service } => {
            let moved = registry.clusterize(repo, service).await?;
            print(json, &moved, render::clusterized)
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
            let repo = registry.thaw(repo, device, direction, *force).await?;
            print(json, &repo, render::repo)
        }
    }
}

async fn observe_command(
    registry: &Registry,
    args: &ObserveArgs,
    json: bool,
) -> anyhow::Result<()> {
    if !args.daemon {
        let (instance, service) = (args.instance.as_deref(), args.service.as_deref());
        let outcomes = registry
            .observe_pass(instance, service, args.device.as_deref())
            .await?;
        return print(json, &outcomes, |o| render::observations(o));
    }
    let config = args.worker_config()?;
    daemons::run_worker(registry, &config, |outcomes| {
        for o in outcomes {
            println!("{}", render::observation(o));
        }
    })
    .await?;
    Ok(())
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

async fn migrate_command(
    registry: &Registry,
    db: &str,
    args: &MigrateArgs,
    json: bool,
) -> anyhow::Result<()> {
    use orchestrate::migrate;
    if let Some(MigrateCmd::Status { id }) = &args.command {
        let id = match id {
            Some(id) => *id,
            None => *registry
                .migration_ids()
                .await?
                .first()
                .ok_or_else(|| orchestrate::Error::Refused("no migration yet".into()))?,
        };
        return print(
            json,
            &migrate::status(registry, id).await?,
            render::migration,
        );
    }
    let cfg = args.config();
    let daemons = if args.no_restart_daemons {
        None
    } else {
        let (dir, template) = (&args.run_dir, &args.daemon_template);
        Some(RestartConfig::for_this_binary(
            dir,
            template,
            db,
            args.daemon_interval,
        )?)
    };
    let beside = orchestrate::cli::beside_this_binary("shardsend");
    let ports = args.ports(registry, daemons, beside)?;
    if args.dry_run && args.resume.is_none() {
        let plan = ports.plane.plan(&cfg.spec).await?;
        let (from, to) = (&cfg.spec.from, &cfg.spec.to);
        return print(json, &plan, |p| render::migration_plan(p, from, to));
    }
    let (id, started) = migrate::start(registry, ports.plane.as_ref(), &cfg, args.resume).await?;
    if let migrate::Started::Continued { why } = &started {
        reporter()(why);
    }
    reporter()(&format!(
        "migration {id} started (resume with `shardmove migrate --resume {id}`)"
    ));
    let summary = migrate::run(&ports, &cfg, id, reporter()).await?;
    print(json, &summary, render::migration_summary)?;
    if summary.state != migrate::BatchState::Done {
        let left = (summary.status.repositories.iter())
            .filter(|r| r.state != migrate::RepoState::Done)
            .count();
        return Err(orchestrate::Error::MigrationIncomplete { id, left }.into());
    }
    Ok(())
}

#[cfg(feature = "demo")]
async fn demo_command(args: &DemoArgs, json: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the shardmove binary")?;
    let bin_dir = exe
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let summary = orchestrate::demo::run(&args.config(bin_dir), reporter()).await?;
    print(json, &summary, render::demo_summary)
}
