//! git's own maintenance running in the source repository (`git gc`, `repack`, `prune`,
//! `pack-refs`, `multi-pack-index`, `maintenance run`), and waiting for it to end
//! (`shardsend --repack-wait`).
//!
//! **Why a pre-copy waits.** Such a command writes new packs and then deletes the loose
//! objects, packs and loose refs they replace. A pre-copy running beside it copies the
//! repository twice over; a freeze while it runs leaves it deleting files under the final
//! pass, which then fails ("source changed"). Waiting before each pre-copy round keeps both
//! out: the round after the wait carries the new packs while the repository is live, and the
//! freeze finds nothing left to rewrite. `gc.auto` is not turned off instead: it would not
//! stop a repack already running or one started by cron.
//!
//! **Why here, not in a host script.** The orchestrator used to ask a shell script on the
//! source host before every round (scan `/proc`, read the formats with `git config`): about
//! 12 ms of processes per repository and round, which made a 200-repository batch 6% slower
//! (bench/RESULTS.md, "Reshaping (issue 13)"). `shardsend` runs on that host anyway; scanning
//! `/proc` from it costs well under a millisecond.
//!
//! **How a process is found.** git chdirs into the repository it works on, whoever started
//! it and however: a process whose working directory is the repository and whose command
//! line is `git [global options] SUBCOMMAND ...` with a rewriting subcommand. `pack-objects
//! --stdout` serving a fetch is not one of them. Processes of other users are invisible to an
//! unprivileged sender (their `/proc/PID/cwd` cannot be read): run it as root, or as the
//! repositories' user, which runs their gc.
//!
//! [`rewriting_subcommand`] is the sans-io rule, unit-tested; [`rewriting_process`] and
//! [`wait_until_idle`] read `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

/// git subcommands that rewrite objects or refs.
pub const REWRITING: [&str; 7] = [
    "gc",
    "repack",
    "prune",
    "prune-packed",
    "pack-refs",
    "multi-pack-index",
    "maintenance",
];

/// How often [`wait_until_idle`] looks again.
const POLL: Duration = Duration::from_millis(500);

/// The rewriting subcommand `cmdline` runs, if any. `cmdline` is `/proc/PID/cmdline`: words
/// separated by NUL bytes, or by spaces when the process rewrote its own title.
pub fn rewriting_subcommand(cmdline: &[u8]) -> Option<&'static str> {
    let mut words = cmdline
        .split(|b| *b == 0 || b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let program = words.next()?;
    if program.rsplit(|b| *b == b'/').next() != Some(b"git".as_slice()) {
        return None;
    }
    while let Some(word) = words.next() {
        match word {
            // Global options that take the next word as their value.
            b"-C" | b"-c" | b"--git-dir" | b"--work-tree" | b"--namespace" | b"--exec-path" => {
                words.next();
            }
            w if w.starts_with(b"-") => {}
            w => return REWRITING.iter().copied().find(|s| s.as_bytes() == w),
        }
    }
    None
}

/// The first process rewriting `repo` (`process PID: COMMAND LINE`), or `None`.
pub fn rewriting_process(repo: &Path) -> std::io::Result<Option<String>> {
    let repo = repo.canonicalize()?;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Gone meanwhile, or another user's: not ours to see.
        if std::fs::read_link(entry.path().join("cwd")).ok().as_deref() != Some(repo.as_path()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if rewriting_subcommand(&cmdline).is_some() {
            let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            return Ok(Some(format!("process {pid}: {}", shown.trim_end())));
        }
    }
    Ok(None)
}

/// What [`wait_until_idle`] waited for.
#[derive(Debug, Clone, PartialEq)]
pub struct Waited {
    /// The first rewriting process seen, if any.
    pub process: Option<String>,
    pub seconds: f64,
}

/// Returns once no process rewrites `repo`, or `Err(what still does)` after `max`.
pub fn wait_until_idle(repo: &Path, max: Duration) -> std::io::Result<Result<Waited, String>> {
    let started = Instant::now();
    let mut first = None;
    while let Some(what) = rewriting_process(repo)? {
        if started.elapsed() >= max {
            return Ok(Err(what));
        }
        first.get_or_insert(what);
        std::thread::sleep(POLL.min(max.saturating_sub(started.elapsed())));
    }
    Ok(Ok(Waited {
        process: first,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_subcommands_are_found_after_gits_own_options() {
        let cases: [(&[u8], Option<&str>); 12] = [
            (b"git\0gc\0--auto\0", Some("gc")),
            (b"/usr/lib/git-core/git\0repack\0-a\0-d\0", Some("repack")),
            (b"git\0-C\0/srv/r.git\0prune\0", Some("prune")),
            (
                b"git\0-c\0gc.auto=0\0--no-pager\0pack-refs\0--all\0",
                Some("pack-refs"),
            ),
            (
                b"git\0--git-dir=/srv/r.git\0maintenance\0run\0",
                Some("maintenance"),
            ),
            (
                b"git --git-dir /srv/r.git multi-pack-index write",
                Some("multi-pack-index"),
            ),
            (b"git\0prune-packed\0", Some("prune-packed")),
            (b"git\0pack-objects\0--stdout\0", None),
            (b"git\0upload-pack\0/srv/r.git\0", None),
            (b"/usr/bin/perl\0gc\0", None),
            (b"gitk\0gc\0", None),
            (b"", None),
        ];
        for (cmdline, want) in cases {
            assert_eq!(
                rewriting_subcommand(cmdline),
                want,
                "{}",
                String::from_utf8_lossy(cmdline)
            );
        }
    }

    #[test]
    fn a_process_working_in_the_repository_is_seen_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r.git");
        std::fs::create_dir(&repo).unwrap();
        assert_eq!(rewriting_process(&repo).unwrap(), None);
        // A stand-in that calls itself `git repack`, working in the repository.
        let mut child = std::process::Command::new("perl")
            .arg("-e")
            .arg("$0 = 'git repack -a -d'; sleep 30")
            .current_dir(&repo)
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut seen = None;
        for _ in 0..100 {
            seen = rewriting_process(&repo).unwrap();
            if seen.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = seen.expect("the stand-in is seen");
        assert!(seen.starts_with(&format!("process {pid}: git")), "{seen}");
        let still = wait_until_idle(&repo, Duration::from_millis(600)).unwrap();
        assert!(still.is_err(), "{still:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        let waited = wait_until_idle(&repo, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(waited.process, None);
    }
}
