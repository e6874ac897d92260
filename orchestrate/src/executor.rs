//! Running steps on a shard host's disk (git init, hooks, fetch) through one abstraction.
//!
//! An [`Executor`] only turns an argument vector into a process: [`LocalExecutor`] runs it
//! here; [`NetnsExecutor`] runs it here inside a network namespace (`ip netns exec NAME`, for
//! a device whose host is `netns:NAME`: a shard host simulated on this machine, as the demo
//! does when run as root); [`SshExecutor`] runs `ssh HOST '<quoted argv>'` with the system
//! OpenSSH client, so ports, users, keys and known hosts come from ssh's own configuration
//! (`~/.ssh/config`, or the file named by `SHARDMOVE_SSH_CONFIG`), the way operators already
//! reach their shard hosts, and never from the registry. One connection per host is shared
//! by all steps (OpenSSH `ControlMaster`, sockets in a private `$TMPDIR/shardmove-ssh-UID`,
//! kept 60 s after the last use; `SHARDMOVE_SSH_SHARE=off` turns it off): most steps run
//! inside a repository's read-only window, where a new handshake per step costs ~0.4 s.
//! Every step is therefore written as a program plus arguments (multi-line steps as `sh -c SCRIPT ARGS`,
//! with values passed as positional arguments, never spliced into the script), so it runs
//! unchanged on either. Running is async (tokio) because the callers sit next to database
//! I/O; building the command is sync so the trait stays object-safe.

use std::process::Stdio;

use crate::error::{Error, Result};
use crate::names;
use crate::registry::Device;

/// Turns an argument vector into a process on one host.
pub trait Executor: std::fmt::Debug + Send + Sync {
    /// The host this executor runs on (for messages).
    fn host(&self) -> &str;

    /// The command that runs `argv` on the host.
    fn command(&self, argv: &[&str]) -> std::process::Command;

    /// For hosts whose processes would outlive this one (ssh: killing the client does not
    /// stop the remote command), a command that runs `argv` and kills it once its stdin
    /// closes. The runner keeps that stdin open until the command ends, so it closes exactly
    /// when this process dies. `None` where [`die_with_parent`] already covers it.
    fn command_watched(&self, _argv: &[&str]) -> Option<std::process::Command> {
        None
    }
}

/// Run on the remote host around a watched command (see [`Executor::command_watched`]):
/// the command runs with stdin from /dev/null while a watcher reads the session's stdin
/// (kept on fd 3: an asynchronous list's own stdin is /dev/null); at end of file (the ssh
/// session closed: the driver died) it sends SIGTERM to the command.
const WATCH_SCRIPT: &str = r#"exec 3<&0
"$@" </dev/null &
c=$!
{ while read -r _ <&3; do :; done; kill -TERM "$c" 2>/dev/null; } &
w=$!
wait "$c"
s=$?
kill "$w" 2>/dev/null
exit "$s""#;

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

/// Host prefix that [`executor_for`] maps to a [`NetnsExecutor`]: `netns:NAME`.
pub const NETNS_HOST_PREFIX: &str = "netns:";

/// Runs commands on this machine inside network namespace NAME: `ip netns exec NAME argv...`.
/// `ip` execs the command in place (no shell, no quoting), so the child is the command
/// itself; the filesystem is shared with this machine.
#[derive(Debug, Clone)]
pub struct NetnsExecutor {
    /// `netns:NAME`, for messages.
    host: String,
    name: String,
}

impl NetnsExecutor {
    /// An executor for namespace `name`, which must be a valid name (see
    /// [`names::check_name`]): it becomes one argument of `ip` and a file under `/run/netns`.
    pub fn new(name: &str) -> Result<NetnsExecutor> {
        names::check_name("network namespace", name)?;
        Ok(NetnsExecutor {
            host: format!("{NETNS_HOST_PREFIX}{name}"),
            name: name.to_string(),
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Executor for NetnsExecutor {
    fn host(&self) -> &str {
        &self.host
    }

    fn command(&self, argv: &[&str]) -> std::process::Command {
        let argv = if argv.is_empty() { &["true"][..] } else { argv };
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(argv);
        command
    }
}

/// Host prefix that [`executor_for_host`] maps to a [`PrefixExecutor`]: `exec:COMMAND WORDS`.
pub const EXEC_HOST_PREFIX: &str = "exec:";

/// Runs commands through a command prefix on this machine: `exec:/lab/tools/ondev.sh a` runs
/// `ARGV` as `/lab/tools/ondev.sh a ARGV...`. For hosts that are reached by a wrapper rather
/// than a network: the Phorge lab's devices are mount namespaces entered by `ondev.sh`, a
/// container is `exec:docker exec -i NAME`. The words of the prefix are split on whitespace
/// (no quoting); the arguments are passed as they are.
#[derive(Debug, Clone)]
pub struct PrefixExecutor {
    host: String,
    prefix: Vec<String>,
}

impl Executor for PrefixExecutor {
    fn host(&self) -> &str {
        &self.host
    }

    fn command(&self, argv: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(&self.prefix[0]);
        command.args(&self.prefix[1..]).args(argv);
        command
    }
}

/// Runs commands on another host through `ssh` (batch mode: never prompts).
#[derive(Debug, Clone)]
pub struct SshExecutor {
    /// Destination as ssh understands it (`host`, `user@host`, or a `Host` alias).
    pub host: String,
    /// An ssh configuration file (`ssh -F`), else the user's default.
    pub config: Option<std::path::PathBuf>,
    /// Where the shared connections' sockets live (`ControlPath`); `None`: a new connection
    /// per command. A migration runs seven or more commands per repository on each host, most
    /// inside the read-only window; a fresh ssh handshake costs ~0.4 s each on this kind of
    /// machine, a multiplexed session a few milliseconds.
    pub control_dir: Option<std::path::PathBuf>,
}

/// Environment variable naming the ssh configuration file the ssh executor uses.
pub const SSH_CONFIG_ENV: &str = "SHARDMOVE_SSH_CONFIG";

/// Environment variable that, set to `off`, stops the ssh executor from sharing one
/// connection per host (for operators whose ssh configuration decides that itself).
pub const SSH_SHARE_ENV: &str = "SHARDMOVE_SSH_SHARE";

/// How long an idle shared ssh connection stays up after the last step that used it.
const SSH_SHARE_PERSIST: &str = "ControlPersist=60";

/// The directory for shared-connection sockets: `$TMPDIR/shardmove-ssh-UID`, mode 0700 and
/// owned by this user, or `None` (no sharing) if it cannot be made so.
fn ssh_control_dir() -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("shardmove-ssh-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    // Somebody else's directory, or one others may write into: no sockets there.
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0;
    private.then_some(dir)
}

impl SshExecutor {
    /// An executor for `host`, with the configuration file from [`SSH_CONFIG_ENV`] if set.
    pub fn from_env(host: &str) -> SshExecutor {
        let config = std::env::var_os(SSH_CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(Into::into);
        let share = std::env::var(SSH_SHARE_ENV).map_or(true, |v| v != "off");
        SshExecutor {
            host: host.to_string(),
            config,
            control_dir: if share { ssh_control_dir() } else { None },
        }
    }
}

impl Executor for SshExecutor {
    fn host(&self) -> &str {
        &self.host
    }

    fn command(&self, argv: &[&str]) -> std::process::Command {
        self.ssh(argv)
    }

    fn command_watched(&self, argv: &[&str]) -> Option<std::process::Command> {
        let mut remote = vec!["sh", "-c", WATCH_SCRIPT, "shardmove-watch"];
        remote.extend_from_slice(argv);
        Some(self.ssh(&remote))
    }
}

impl SshExecutor {
    fn ssh(&self, remote: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("ssh");
        if let Some(config) = &self.config {
            command.arg("-F").arg(config);
        }
        // The remote side runs the command through the login shell: quote every word.
        let remote: Vec<String> = remote.iter().map(|word| shell_quote(word)).collect();
        if let Some(dir) = &self.control_dir {
            // %C: a hash of host, port and user, so the socket path stays short.
            command
                .args(["-o", "ControlMaster=auto", "-o"])
                .arg(format!("ControlPath={}/%C", dir.display()))
                .args(["-o", SSH_SHARE_PERSIST]);
        }
        // A host that dies mid-step fails the step within a minute (4 unanswered keepalives
        // 15 s apart) instead of hanging until TCP gives up; the migration then rolls back.
        command.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-T",
            "--",
            &self.host,
            &remote.join(" "),
        ]);
        command
    }
}

/// Quotes a value for `sh` (unchanged when it is made of safe characters only).
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Hosts that [`executor_for`] treats as this machine.
pub const LOCAL_HOSTS: [&str; 4] = ["localhost", "local", "127.0.0.1", "::1"];

/// The executor for a device's host (see [`executor_for_host`]).
pub fn executor_for(device: &Device) -> Result<Box<dyn Executor>> {
    executor_for_host(&device.name, &device.host)
}

/// The executor for `host` (of device `device`, for messages): local for [`LOCAL_HOSTS`], a
/// network namespace of this machine for `netns:NAME`, ssh for any other.
pub fn executor_for_host(device: &str, host: &str) -> Result<Box<dyn Executor>> {
    let invalid = |why: String| Error::invalid(format!("host {host:?} of device {device}"), why);
    if LOCAL_HOSTS.contains(&host) {
        Ok(Box::new(LocalExecutor))
    } else if let Some(name) = host.strip_prefix(NETNS_HOST_PREFIX) {
        Ok(Box::new(
            NetnsExecutor::new(name).map_err(|e| invalid(e.to_string()))?,
        ))
    } else if let Some(prefix) = host.strip_prefix(EXEC_HOST_PREFIX) {
        let prefix: Vec<String> = prefix.split_whitespace().map(str::to_string).collect();
        if prefix.is_empty() {
            return Err(invalid("`exec:` needs a command".into()));
        }
        Ok(Box::new(PrefixExecutor {
            host: host.to_string(),
            prefix,
        }))
    } else if host.starts_with('-') {
        Err(invalid("must not start with '-'".into()))
    } else {
        Ok(Box::new(SshExecutor::from_env(host)))
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
    run_status_with_input(executor, argv, None).await
}

/// Like [`run_status`], with `input` (if any) written to the command's stdin.
pub async fn run_status_with_input(
    executor: &dyn Executor,
    argv: &[&str],
    input: Option<&[u8]>,
) -> Result<CommandOutput> {
    use tokio::io::AsyncWriteExt;
    let not_started = |e: std::io::Error| Error::HostCommand {
        host: executor.host().to_string(),
        command: describe(argv),
        status: "not started".into(),
        stderr: e.to_string(),
    };
    // Without input, a host whose processes would outlive ours gets the watched form, its
    // stdin held open by `_watch` until the command ends.
    let watched = match input {
        None => executor.command_watched(argv),
        Some(_) => None,
    };
    let is_watched = watched.is_some();
    let mut command =
        tokio::process::Command::from(watched.unwrap_or_else(|| executor.command(argv)));
    die_with_parent(&mut command);
    command
        .stdin(if input.is_some() || is_watched {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(not_started)?;
    // Feed stdin while stdout and stderr are drained, so a command that answers before it has
    // read everything cannot deadlock on a full pipe.
    let stdin = child.stdin.take();
    let (stdin, _watch) = match is_watched {
        true => (None, stdin),
        false => (stdin, None),
    };
    let feed = async move {
        if let (Some(input), Some(mut stdin)) = (input, stdin) {
            // A command that exits without reading all of it closes the pipe: not our error,
            // its exit status says what happened.
            let _ = stdin.write_all(input).await;
        }
    };
    let (output, ()) = tokio::join!(child.wait_with_output(), feed);
    let output = output.map_err(not_started)?;
    Ok(CommandOutput {
        status: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Starts `argv` on the host with piped stdin and stdout (stderr inherited), for a long-lived
/// helper that talks over them (the Phorge agent). It dies with this process; over ssh its
/// stdin closes with the session, which the helper treats as its end.
pub fn spawn_piped(executor: &dyn Executor, argv: &[&str]) -> Result<tokio::process::Child> {
    let mut command = tokio::process::Command::from(executor.command(argv));
    die_with_parent(&mut command);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command.spawn().map_err(|e| Error::HostCommand {
        host: executor.host().to_string(),
        command: describe(argv),
        status: "not started".into(),
        stderr: e.to_string(),
    })
}

/// A step's process (a `shardsend` pass, the ssh client carrying it) is killed when this
/// process dies, even by `kill -9`: a batch's next driver must not race an orphaned pass of
/// the dead one for the same destination (both would resume the same transfer, each
/// superseding the other).
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit): no allocation, no lock.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
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
    // Scripts are long; their name (`$0`) and arguments say what ran.
    match argv {
        ["sh", "-c", _script, name, rest @ ..] => format!("{name} {}", rest.join(" ")),
        _ => argv.join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_round_trips_through_sh() {
        for value in [
            "plain",
            "with space",
            "it's",
            "$(rm -rf /)",
            "a\nb",
            "",
            "*",
        ] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(value))])
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), value);
        }
    }

    fn device(host: &str) -> Device {
        Device {
            name: "b1".into(),
            service: "repo002".into(),
            host: host.into(),
            transfer_addr: "10.0.0.2:4433".into(),
            root_path: "/srv/b".into(),
            fingerprint: None,
            fingerprints: Vec::new(),
            rotation: None,
            created_at: 0,
        }
    }

    #[test]
    fn netns_command_passes_argv_unquoted_to_ip_netns_exec() {
        let exec = executor_for(&device("netns:shard-b")).expect("netns executor");
        assert_eq!(exec.host(), "netns:shard-b");
        let command = exec.command(&["git", "-C", "/srv/a b", "fetch", "$(x)"]);
        assert_eq!(command.get_program(), "ip");
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["netns", "exec", "shard-b", "git", "-C", "/srv/a b", "fetch", "$(x)"]
        );
    }

    #[test]
    fn netns_names_are_validated() {
        for bad in [
            "netns:",
            "netns:-x",
            "netns:../etc",
            "netns:a/b",
            "netns:.hidden",
            "netns:a;b",
            "netns:é",
        ] {
            let err = executor_for(&device(bad)).expect_err(bad);
            assert!(err.to_string().contains("b1"), "{err}");
        }
        assert!(NetnsExecutor::new(&"n".repeat(65)).is_err());
        assert_eq!(
            NetnsExecutor::new("shardmove-demo-1-a")
                .expect("valid")
                .name(),
            "shardmove-demo-1-a"
        );
    }

    #[test]
    fn ssh_shares_one_connection_per_host_when_it_has_a_private_socket_dir() {
        let ssh = SshExecutor {
            host: "shard1".into(),
            config: None,
            control_dir: Some("/run/x".into()),
        };
        let args: Vec<String> = ssh
            .command(&["true"])
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[..6],
            [
                "-o",
                "ControlMaster=auto",
                "-o",
                "ControlPath=/run/x/%C",
                "-o",
                "ControlPersist=60"
            ]
        );
        let dir = ssh_control_dir().expect("a private directory under TMPDIR");
        let mode = std::fs::metadata(&dir).expect("exists").permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o700);
    }

    #[test]
    fn ssh_command_quotes_every_word() {
        let ssh = SshExecutor {
            host: "shard1".into(),
            config: Some("/etc/x".into()),
            control_dir: None,
        };
        let command = ssh.command(&["git", "-C", "/srv/a b", "fetch"]);
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-F",
                "/etc/x",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=30",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=4",
                "-T",
                "--",
                "shard1",
                "git -C '/srv/a b' fetch"
            ]
        );
    }
}
