//! Daemons: which (instance, service) pairs should run them (`host plan`), applying that
//! (`host restart`), and the bundled worker (`shardmove observe --daemon`).
//!
//! The plan reads the central binding flags: a binding with `no-daemons` never gets a
//! daemon, whatever `--instance` asks; a closed binding still does (its existing
//! repositories are still observed). `restart` stops what runs per device (pid file), then
//! starts the planned ones through a per-device command template, so operators can plug in
//! their own supervisor; the default template starts the bundled worker. Pid files live in
//! a run directory, one per (instance, service, device); the worker writes and removes its
//! own and refuses to start twice.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::executor::{shell_quote, Executor, LocalExecutor};
use crate::registry::Registry;
use crate::repos::Observation;

/// The default per-device daemon command: the bundled observation worker.
pub const DEFAULT_TEMPLATE: &str =
    "exec {exe} --db {db} observe --daemon --instance {instance} --service {service} --device {device} --pid-file {pid_file} --interval {interval}";

/// Placeholders a template may use (values are shell-quoted when substituted).
pub const PLACEHOLDERS: [&str; 9] = [
    "exe", "db", "instance", "service", "device", "host", "root", "pid_file", "interval",
];

/// One line of `host plan`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanEntry {
    pub instance: String,
    pub service: String,
    pub devices: Vec<String>,
    pub run_daemons: bool,
    pub reason: String,
}

/// `host plan [--instance I]`: one entry per binding.
pub async fn plan(registry: &Registry, instance: Option<&str>) -> Result<Vec<PlanEntry>> {
    let mut out = Vec::new();
    for binding in registry.bindings(instance).await? {
        let devices: Vec<String> = registry
            .devices_of(&binding.service)
            .await?
            .into_iter()
            .map(|d| d.name)
            .collect();
        let (run_daemons, reason) = if binding.no_daemons {
            (false, "no-daemons is set".to_string())
        } else if devices.is_empty() {
            (false, "service has no device".to_string())
        } else if binding.closed {
            (
                true,
                "closed to new repositories; existing ones are still observed".to_string(),
            )
        } else {
            (true, "open".to_string())
        };
        out.push(PlanEntry {
            instance: binding.instance,
            service: binding.service,
            devices,
            run_daemons,
            reason,
        });
    }
    Ok(out)
}

/// How `host restart` starts daemons.
#[derive(Debug, Clone)]
pub struct RestartConfig {
    /// Where pid and log files live.
    pub run_dir: PathBuf,
    /// Per-device command template (see [`DEFAULT_TEMPLATE`], [`PLACEHOLDERS`]).
    pub template: String,
    /// `{exe}`: the `shardmove` binary.
    pub exe: PathBuf,
    /// `{db}`: the registry URL the daemons use.
    pub db: String,
    /// `{interval}`: seconds between observation passes.
    pub interval_secs: u64,
    /// How long to wait for a started daemon's pid file, and for a stopped one to exit.
    pub settle: Duration,
}

impl RestartConfig {
    /// Daemons run by this very `shardmove` binary (`{exe}`), with pid files under `run_dir`
    /// (made absolute: the daemons do not share our working directory), waiting up to 10 s.
    pub fn for_this_binary(
        run_dir: &std::path::Path,
        template: &str,
        db: &str,
        interval_secs: u64,
    ) -> crate::Result<RestartConfig> {
        let io = |context, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| crate::Error::Io {
                context,
                path,
                source,
            }
        };
        Ok(RestartConfig {
            run_dir: std::path::absolute(run_dir).map_err(io("resolving --run-dir", run_dir))?,
            template: template.to_string(),
            exe: std::env::current_exe()
                .map_err(io("finding the shardmove binary", std::path::Path::new("")))?,
            db: db.to_string(),
            interval_secs,
            settle: Duration::from_secs(10),
        })
    }
}

/// What `host restart` did on one device.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RestartOutcome {
    pub instance: String,
    pub service: String,
    pub device: String,
    /// Pid of a daemon that was stopped.
    pub stopped: Option<i32>,
    /// Pid of the daemon started (from its pid file), if one was started and wrote it.
    pub started: Option<i32>,
    pub detail: String,
}

/// The pid file of the daemon for one (instance, service, device).
pub fn pid_file(run_dir: &Path, instance: &str, service: &str, device: &str) -> PathBuf {
    run_dir.join(format!("{instance}.{service}.{device}.pid"))
}

/// `host restart [--instance I]`: stops every daemon of the plan's devices, then starts
/// those the plan allows.
pub async fn restart(
    registry: &Registry,
    config: &RestartConfig,
    instance: Option<&str>,
) -> Result<Vec<RestartOutcome>> {
    for name in config
        .template
        .split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}'))
        .map(|(name, _)| name)
    {
        if !PLACEHOLDERS.contains(&name) {
            return Err(Error::invalid(
                "daemon template",
                format!(
                    "unknown placeholder {{{name}}} (known: {})",
                    PLACEHOLDERS.join(", ")
                ),
            ));
        }
    }
    std::fs::create_dir_all(&config.run_dir).map_err(|source| Error::Io {
        context: "creating run directory",
        path: config.run_dir.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in plan(registry, instance).await? {
        for device_name in &entry.devices {
            let device = registry.device(device_name).await?;
            let pid_path = pid_file(
                &config.run_dir,
                &entry.instance,
                &entry.service,
                device_name,
            );
            let stopped = stop_pid_file(&pid_path, config.settle).await?;
            let mut outcome = RestartOutcome {
                instance: entry.instance.clone(),
                service: entry.service.clone(),
                device: device_name.clone(),
                stopped,
                started: None,
                detail: String::new(),
            };
            if !entry.run_daemons {
                outcome.detail = format!("not started: {}", entry.reason);
                out.push(outcome);
                continue;
            }
            let values: BTreeMap<&str, String> = [
                ("exe", config.exe.display().to_string()),
                ("db", config.db.clone()),
                ("instance", entry.instance.clone()),
                ("service", entry.service.clone()),
                ("device", device.name.clone()),
                ("host", device.host.clone()),
                ("root", device.root_path.clone()),
                ("pid_file", pid_path.display().to_string()),
                ("interval", config.interval_secs.to_string()),
            ]
            .into_iter()
            .collect();
            let command = expand(&config.template, &values);
            let log_path = pid_path.with_extension("log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| Error::Io {
                    context: "opening daemon log",
                    path: log_path.clone(),
                    source,
                })?;
            let log_err = log.try_clone().map_err(|source| Error::Io {
                context: "opening daemon log",
                path: log_path.clone(),
                source,
            })?;
            // Daemons run here, beside the registry; they reach devices through executors
            // (a custom template may start something on the device itself).
            let exec = LocalExecutor;
            let mut process = exec.command(&["sh", "-c", &command]);
            // Own process group: the daemon outlives this command and its terminal.
            process
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .process_group(0);
            let child = process.spawn().map_err(|e| Error::HostCommand {
                host: exec.host().to_string(),
                command: command.clone(),
                status: "not started".into(),
                stderr: e.to_string(),
            })?;
            // Reap the shell (the daemon `exec`s in place of it, or forks) without blocking.
            std::thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
            outcome.started = wait_for_pid_file(&pid_path, config.settle).await;
            outcome.detail = match outcome.started {
                Some(pid) => format!("started pid {pid}"),
                None => format!(
                    "started; no live pid in {} yet (see {})",
                    pid_path.display(),
                    log_path.display()
                ),
            };
            out.push(outcome);
        }
    }
    Ok(out)
}

/// Substitutes `{name}` placeholders with shell-quoted values.
fn expand(template: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{name}}}"), &shell_quote(value));
    }
    out
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 1)
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so also look at /proc state.
    // SAFETY: kill with signal 0 sends nothing.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
}

/// Stops the daemon named by a pid file (SIGTERM, then SIGKILL after `settle`); returns its
/// pid if one was running. Removes the pid file.
pub async fn stop_pid_file(path: &Path, settle: Duration) -> Result<Option<i32>> {
    let Some(pid) = read_pid(path) else {
        let _ = std::fs::remove_file(path);
        return Ok(None);
    };
    if !alive(pid) {
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    // SAFETY: plain signal delivery to a pid read from our own pid file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = tokio::time::Instant::now() + settle;
    while alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(path);
    Ok(Some(pid))
}

async fn wait_for_pid_file(path: &Path, settle: Duration) -> Option<i32> {
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        if let Some(pid) = read_pid(path).filter(|pid| alive(*pid)) {
            return Some(pid);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the bundled worker observes.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub instance: String,
    pub service: String,
    /// Only fetch into copies on this device.
    pub device: Option<String>,
    pub pid_file: PathBuf,
    pub interval: Duration,
    /// Stop after this many passes (tests); `None` runs until SIGTERM/SIGINT.
    pub max_passes: Option<u64>,
}

/// `shardmove observe --daemon`: writes its pid file, runs observation passes every
/// `interval` until SIGTERM/SIGINT, `max_passes`, or its binding gets `no-daemons`; removes
/// its pid file on the way out. `report` receives each pass's outcomes.
pub async fn run_worker(
    registry: &Registry,
    config: &WorkerConfig,
    mut report: impl FnMut(&[Observation]),
) -> Result<()> {
    let binding = registry.binding(&config.instance, &config.service).await?;
    if binding.no_daemons {
        return Err(Error::Refused(format!(
            "binding {}/{} has no-daemons set: not starting",
            config.instance, config.service
        )));
    }
    let own = std::process::id() as i32;
    if let Some(pid) = read_pid(&config.pid_file).filter(|pid| *pid != own && alive(*pid)) {
        return Err(Error::Refused(format!(
            "a daemon is already running with pid {pid} ({})",
            config.pid_file.display()
        )));
    }
    let tmp = config.pid_file.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{own}\n"))
        .and_then(|()| std::fs::rename(&tmp, &config.pid_file))
        .map_err(|source| Error::Io {
            context: "writing pid file",
            path: config.pid_file.clone(),
            source,
        })?;
    let result = worker_loop(registry, config, &mut report).await;
    if read_pid(&config.pid_file) == Some(own) {
        let _ = std::fs::remove_file(&config.pid_file);
    }
    result
}

async fn worker_loop(
    registry: &Registry,
    config: &WorkerConfig,
    report: &mut impl FnMut(&[Observation]),
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let io = |source| Error::Io {
        context: "installing signal handler",
        path: PathBuf::new(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let mut passes = 0u64;
    loop {
        let binding = registry.binding(&config.instance, &config.service).await?;
        if binding.no_daemons {
            return Ok(());
        }
        let outcomes = registry
            .observe_pass(
                Some(&config.instance),
                Some(&config.service),
                config.device.as_deref(),
            )
            .await?;
        report(&outcomes);
        passes += 1;
        if config.max_passes.is_some_and(|max| passes >= max) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}
