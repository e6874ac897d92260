//! Running steps on a shard host's disk (git init, hooks, fetch) through one abstraction.
//!
//! An [`Executor`] only turns an argument vector into a process: [`LocalExecutor`] runs it
//! here; an ssh executor (next issue) will run `ssh HOST -- <quoted argv>`. Every step is
//! therefore written as a program plus arguments (multi-line steps as `sh -c SCRIPT ARGS`,
//! with values passed as positional arguments, never spliced into the script), so it runs
//! unchanged on either. Running is async (tokio) because the callers sit next to database
//! I/O; building the command is sync so the trait stays object-safe.

use std::process::Stdio;

use crate::error::{Error, Result};
use crate::registry::Device;

/// Turns an argument vector into a process on one host.
pub trait Executor: std::fmt::Debug + Send + Sync {
    /// The host this executor runs on (for messages).
    fn host(&self) -> &str;

    /// The command that runs `argv` on the host.
    fn command(&self, argv: &[&str]) -> std::process::Command;
}

/// Runs commands as local processes.
#[derive(Debug, Clone, Default)]
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn host(&self) -> &str {
        "localhost"
    }

    fn command(&self, argv: &[&str]) -> std::process::Command {
        let (program, args) = argv
            .split_first()
            .map_or(("true", &[][..]), |(p, a)| (*p, a));
        let mut command = std::process::Command::new(program);
        command.args(args);
        command
    }
}

/// Hosts that [`executor_for`] treats as this machine.
pub const LOCAL_HOSTS: [&str; 4] = ["localhost", "local", "127.0.0.1", "::1"];

/// The executor for a device's host: local for [`LOCAL_HOSTS`]; other hosts are refused
/// until the ssh executor exists.
pub fn executor_for(device: &Device) -> Result<Box<dyn Executor>> {
    if LOCAL_HOSTS.contains(&device.host.as_str()) {
        Ok(Box::new(LocalExecutor))
    } else {
        Err(Error::Refused(format!(
            "device {} is on host {}: only local devices ({}) can be driven so far (no ssh executor yet)",
            device.name,
            device.host,
            LOCAL_HOSTS.join(", ")
        )))
    }
}

/// Output of a successful command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` through `executor` and waits; `Err` unless it exits 0.
pub async fn run(executor: &dyn Executor, argv: &[&str]) -> Result<CommandOutput> {
    let output = run_status(executor, argv).await?;
    if output.status == 0 {
        Ok(output)
    } else {
        Err(host_error(executor, argv, &output))
    }
}

/// Runs `argv` through `executor` and waits, whatever its exit status.
pub async fn run_status(executor: &dyn Executor, argv: &[&str]) -> Result<CommandOutput> {
    let mut command = tokio::process::Command::from(executor.command(argv));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = command.output().await.map_err(|e| Error::HostCommand {
        host: executor.host().to_string(),
        command: describe(argv),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    Ok(CommandOutput {
        status: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

pub(crate) fn host_error(executor: &dyn Executor, argv: &[&str], output: &CommandOutput) -> Error {
    Error::HostCommand {
        host: executor.host().to_string(),
        command: describe(argv),
        status: format!("exit status {}", output.status),
        stderr: output
            .stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string(),
    }
}

/// A short human form of a command (scripts abbreviated to their first line).
fn describe(argv: &[&str]) -> String {
    match argv {
        ["sh", "-c", script, name, rest @ ..] => {
            let _ = script;
            format!("{name} {}", rest.join(" "))
        }
        _ => argv.join(" "),
    }
}
