//! The watchdog: a separate process that removes the link's namespaces if the main process
//! dies without doing it (SIGKILL, a crash).
//!
//! Nothing runs in a process after SIGKILL, so cleanup must live elsewhere. The main process
//! starts the watchdog (its own executable, re-run with a hidden argument) *before* it
//! creates anything, holding the write end of a pipe to the watchdog's stdin. The watchdog
//! leaves the process group (so a Ctrl-C aimed at the main process does not kill it first),
//! ignores the usual termination signals, and blocks reading the pipe. The kernel closes the
//! pipe however the main process ends: after a clean teardown the main process writes
//! [`DONE`] first and the watchdog exits quietly; on plain EOF it removes the namespaces.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context, Result};

use super::netns;

/// Hidden first argument that turns the executable into a watchdog.
pub const WATCHDOG_ARG: &str = "__linkemu-watchdog";
/// What the main process writes after a clean teardown.
const DONE: &[u8] = b"done\n";

/// A running watchdog; [`Watchdog::release`] tells it the namespaces are already gone.
pub struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts `exe WATCHDOG_ARG NAMES...`.
    pub fn spawn(exe: &Path, names: &[String]) -> Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(exe);
        cmd.arg(WATCHDOG_ARG)
            .args(names)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec we only call async-signal-safe functions.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the watchdog {}", exe.display()))?;
        let pipe = child.stdin.take();
        Ok(Watchdog { child, pipe })
    }

    /// The namespaces were removed: let the watchdog exit without touching anything.
    pub fn release(mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(DONE);
        }
        let _ = self.child.wait();
    }
}

/// Body of the watchdog process: wait for the pipe to close, then clean up unless released.
pub fn run(names: &[String]) -> i32 {
    // SAFETY: signal(2) with SIG_IGN; no handler code runs.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut got = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut got);
    if got.ends_with(DONE) {
        return 0;
    }
    for name in names {
        netns::remove(name);
    }
    eprintln!("linkemu watchdog: the link process died; removed {names:?}");
    0
}
