//! The shell scripts shardmove runs on shard hosts, kept as files (`orchestrate/host-scripts/`)
//! and compiled in, and the one table of exit codes they share with the Rust side.
//!
//! **Why shell.** A step must run unchanged on this machine, inside a network namespace and
//! over ssh, on hosts where only `sh` and `git` can be assumed; one `sh -c SCRIPT NAME ARGS`
//! process per step keeps the read-only window to a few process starts. Values always arrive
//! as positional arguments, never spliced into the text, so quoting cannot go wrong.
//!
//! **Why files.** They are read and reviewed as shell, and a test runs `shellcheck` over each
//! script exactly as it is sent (the function library `lib.sh` followed by one entry file).

use crate::error::{Error, Result};
use crate::executor::{self, CommandOutput, Executor};

/// The function library every script starts with.
const LIB: &str = include_str!("../host-scripts/lib.sh");

/// One host script: `lib.sh` plus its entry file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// `REPO MESSAGE`: the maintenance hook with MESSAGE (only the message changes if it is
    /// there already).
    InstallHook,
    /// `REPO`: the hook removed, any original restored.
    RemoveHook,
    /// `REPO SECONDS`: returns once no push is in flight.
    WaitIdle,
    /// `REPO MESSAGE SECONDS`: both, in one process.
    InstallHookAndWaitIdle,
    /// `DEST STAMP STAGING`: a rolled-back copy moved aside, its staging discarded.
    DiscardCopy,
    /// `REPO`: full connectivity check; prints the refs' object ids.
    FsckConnectivity,
    /// `REPO walk|refs-only` (stdin: new `TIP` and verified `^TIP` lines): prints the refs,
    /// then walks what is new since the verified tips (refs-only: nothing is new).
    VerifySince,
    /// `REPO`: a new bare repository.
    CreateBare,
    /// `ROOT REL...`: what `shardmove doctor` compares with the registry.
    DoctorScan,
    /// `DIR [WAIT]`: a transfer's staging directory removed unless a transfer still holds it
    /// after WAIT seconds (default 0).
    RemoveStaging,
    /// `PATH`: a `*.replaced-*` / `*.rolled-back-*` copy removed.
    RemoveAside,
    /// `OBJECTS REFS`: whether git on this host can use a repository of those formats.
    GitSupports,
    /// `DEST RECORD`: `absent`, `unrecorded`, or the root hash shardrecv recorded for DEST.
    InstalledRoot,
}

impl Script {
    pub const ALL: [Script; 13] = [
        Script::InstallHook,
        Script::RemoveHook,
        Script::WaitIdle,
        Script::InstallHookAndWaitIdle,
        Script::DiscardCopy,
        Script::FsckConnectivity,
        Script::VerifySince,
        Script::CreateBare,
        Script::DoctorScan,
        Script::RemoveStaging,
        Script::RemoveAside,
        Script::GitSupports,
        Script::InstalledRoot,
    ];

    /// Its name (`$0` on the host, and what error messages show).
    pub fn name(self) -> &'static str {
        match self {
            Script::InstallHook => "install-hook",
            Script::RemoveHook => "remove-hook",
            Script::WaitIdle => "wait-idle",
            Script::InstallHookAndWaitIdle => "install-hook-and-wait-idle",
            Script::DiscardCopy => "discard-copy",
            Script::FsckConnectivity => "fsck-connectivity",
            Script::VerifySince => "verify-since",
            Script::CreateBare => "create-bare",
            Script::DoctorScan => "doctor-scan",
            Script::RemoveStaging => "remove-staging",
            Script::RemoveAside => "remove-aside",
            Script::GitSupports => "git-supports",
            Script::InstalledRoot => "installed-root",
        }
    }

    fn entry(self) -> &'static str {
        match self {
            Script::InstallHook => include_str!("../host-scripts/install-hook.sh"),
            Script::RemoveHook => include_str!("../host-scripts/remove-hook.sh"),
            Script::WaitIdle => include_str!("../host-scripts/wait-idle.sh"),
            Script::InstallHookAndWaitIdle => {
                include_str!("../host-scripts/install-hook-and-wait-idle.sh")
            }
            Script::DiscardCopy => include_str!("../host-scripts/discard-copy.sh"),
            Script::FsckConnectivity => include_str!("../host-scripts/fsck-connectivity.sh"),
            Script::VerifySince => include_str!("../host-scripts/verify-since.sh"),
            Script::CreateBare => include_str!("../host-scripts/create-bare.sh"),
            Script::DoctorScan => include_str!("../host-scripts/doctor-scan.sh"),
            Script::RemoveStaging => include_str!("../host-scripts/remove-staging.sh"),
            Script::RemoveAside => include_str!("../host-scripts/remove-aside.sh"),
            Script::GitSupports => include_str!("../host-scripts/git-supports.sh"),
            Script::InstalledRoot => include_str!("../host-scripts/installed-root.sh"),
        }
    }

    /// The whole text sent to the host.
    pub fn text(self) -> String {
        format!("{LIB}\n{}", self.entry())
    }

    /// Runs the script with `args` through `exec` (stdin: `input`), whatever its status; a
    /// failpoint that fired in it kills this process in test builds.
    pub async fn run(
        self,
        exec: &dyn Executor,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<CommandOutput> {
        let text = self.text();
        let mut argv = vec!["sh", "-c", &text, self.name()];
        argv.extend_from_slice(args);
        let out = executor::run_status_with_input(exec, &argv, input).await?;
        if out.status == exit::FAILPOINT {
            crate::failpoint::hit_in_host_script(self.name(), &out.stderr);
        }
        Ok(out)
    }

    /// Like [`Script::run`], and any status but 0 is an error naming the script and host.
    pub async fn run_ok(self, exec: &dyn Executor, args: &[&str]) -> Result<CommandOutput> {
        let out = self.run(exec, args, None).await?;
        if out.status == 0 {
            Ok(out)
        } else {
            Err(self.failed(exec, args, &out))
        }
    }

    /// The error for a run that ended with an unexpected status.
    pub fn failed(self, exec: &dyn Executor, args: &[&str], out: &CommandOutput) -> Error {
        let mut argv = vec!["sh", "-c", "", self.name()];
        argv.extend_from_slice(args);
        executor::host_error(exec, &argv, out)
    }
}

/// The exit codes the scripts use (`lib.sh` defines the same values; a test compares them).
/// Outside every range a git command's own status could leak through: the scripts map each
/// git failure to one of these.
pub mod exit {
    /// `pre-receive.shardmove-orig` exists and is not ours to overwrite.
    pub const ORIG_EXISTS: i32 = 80;
    /// Pushes (or fetches) still working after the wait; stdout says which.
    pub const PUSHES_IN_FLIGHT: i32 = 81;
    /// The repository or tree to check is not there.
    pub const MISSING: i32 = 82;
    /// A git command failed (its message on stderr).
    pub const GIT: i32 = 83;
    /// Objects the refs need are missing.
    pub const OBJECTS_MISSING: i32 = 84;
    /// The path to create already exists.
    pub const EXISTS: i32 = 85;
    /// A test failpoint fired inside the script.
    pub const FAILPOINT: i32 = 86;
    /// `git fsck` found the repository broken.
    pub const CORRUPT: i32 = 87;
    /// git on the host cannot use the repository's object format or ref storage.
    pub const UNSUPPORTED: i32 = 88;

    pub const ALL: [(&str, i32); 9] = [
        ("EX_ORIG_EXISTS", ORIG_EXISTS),
        ("EX_PUSHES_IN_FLIGHT", PUSHES_IN_FLIGHT),
        ("EX_MISSING", MISSING),
        ("EX_GIT", GIT),
        ("EX_OBJECTS_MISSING", OBJECTS_MISSING),
        ("EX_EXISTS", EXISTS),
        ("EX_FAILPOINT", FAILPOINT),
        ("EX_CORRUPT", CORRUPT),
        ("EX_UNSUPPORTED", UNSUPPORTED),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_table_and_the_hook_marker_are_the_ones_lib_sh_defines() {
        let defined: Vec<(String, i32)> = LIB
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.starts_with("EX_"))
            .filter_map(|(k, v)| Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?)))
            .collect();
        let expected: Vec<(String, i32)> =
            exit::ALL.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(defined, expected);
        let mut codes: Vec<i32> = exit::ALL.iter().map(|(_, v)| *v).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), exit::ALL.len(), "exit codes collide");
        assert!(LIB.contains(&format!(
            "HOOK_MARKER={}\n",
            crate::maintenance::HOOK_MARKER
        )));
    }

    #[test]
    fn every_script_is_shellcheck_clean() {
        let Ok(version) = std::process::Command::new("shellcheck")
            .arg("--version")
            .output()
        else {
            // CI installs it (scripts/install-deps.sh); say so loudly elsewhere.
            println!("skipped: shellcheck is not installed (scripts/install-deps.sh installs it)");
            return;
        };
        assert!(version.status.success());
        let dir = tempfile::tempdir().expect("temp dir");
        for script in Script::ALL {
            let path = dir.path().join(format!("{}.sh", script.name()));
            std::fs::write(&path, script.text()).expect("write script");
            let out = std::process::Command::new("shellcheck")
                .args(["-s", "sh"])
                .arg(&path)
                .output()
                .expect("run shellcheck");
            assert!(
                out.status.success(),
                "{}: {}",
                script.name(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}
