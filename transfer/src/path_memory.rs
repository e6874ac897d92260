//! The sender's memory of a path's congestion window, so that a transfer to a receiver it has
//! just sent to starts near the rate the last one reached instead of from ten packets.
//!
//! **Why.** A migration runs one `shardsend` per pass and repository, and each new connection
//! starts from an initial window of ten packets, which startup doubles or so per round trip.
//! Measured over linkemu at 100 Mbit/s and 50 ms RTT: a 1.9 MB repository took 0.49 s, ten
//! round trips, of which the ramp was about seven; 40 repositories of 490 MB in all took
//! 55.8 s under `migrate` (wire time 40.6 s), its two lanes per source host idle through
//! every repository's ramp. The further the receiver, the more of each transfer is ramp.
//!
//! **The rule**, after careful resume (draft-ietf-tsvwg-careful-resume), simplified:
//! - *remember*: when a transfer ends well, the controller's window and the path's minimum
//!   RTT are saved per receiver address and controller ([`Ending`], [`remember`]). A window
//!   that never left startup is only a lower bound: it does not replace a larger memory that
//!   is still fresh ([`next`]).
//! - *reconnaissance*: a memory older than [`LIFETIME`] is forgotten; the new connection's
//!   first RTT sample must be at least half the remembered minimum, since the same window on
//!   a shorter path is a higher rate ([`Resume::jump`]).
//! - *jump*: the window, while still in startup (BBR) or slow start (`background`), rises to
//!   half the remembered window. BBR's startup then goes on from there, measuring what the
//!   path really delivers; for `background` the jump replaces slow start, and the delay rule
//!   grows the window at most 25% a round trip (doubling from the jump overfilled the queue
//!   the other lane of a migration kept: twice the drops of a cold start, against a fifth
//!   without it).
//! - *retreat*: what the controllers do anyway. BBR's window follows the delivery rate it
//!   measures, and a congested round ends startup; `background` backs off on queueing delay
//!   and loss. The jump is paced (quinn paces at 1.25 x window / RTT), so half a remembered
//!   window is spread over most of a round trip, not sent at line rate.
//!
//! Parallel lanes of a migration share one memory per receiver: each remembered its share, and
//! jumps to half of it. Only `bbr` and `background` remember; Cubic, NewReno and quinn's BBR
//! start cold. `shardsend --no-path-memory` never reads or writes it.
//!
//! **Where.** One small JSON file per receiver address and controller, under
//! `$XDG_CACHE_HOME/shardsend/paths` or `~/.cache/shardsend/paths`, written atomically
//! (several lanes end at once). A missing, damaged or expired file is no memory; each write
//! removes the files that expired ([`prune`]), so receivers gone (or test ports) leave nothing
//! behind for long.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How long a remembered window may be used: within a migration, lanes end transfers to the
/// same receiver every few seconds and keep it fresh; a path seen an hour ago may carry
/// other traffic now.
pub const LIFETIME: Duration = Duration::from_secs(15 * 60);

/// What a new connection may start from (the controller applies it at its first RTT sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The remembered window, bytes.
    pub window: u64,
    /// The path's remembered minimum RTT.
    pub min_rtt: Duration,
}

impl Resume {
    /// The window to jump to, given the new connection's first RTT sample: half the
    /// remembered one, unless the path now looks shorter than half the remembered one (then
    /// the memory is of another path, and the connection starts cold).
    pub fn jump(&self, first_rtt: Duration) -> Option<u64> {
        (first_rtt >= self.min_rtt / 2 && self.window > 0).then_some(self.window / 2)
    }
}

/// Careful resume's decision at a connection's first RTT sample, logged: the window a
/// controller whose window is `window` now should jump to, if any. `in_startup`: it is still
/// in startup / slow start (a controller past it has measured the path already).
pub fn jump_at_first_sample(
    resume: Resume,
    first_rtt: Duration,
    window: u64,
    in_startup: bool,
    controller: &str,
) -> Option<u64> {
    let jump = resume.jump(first_rtt).filter(|&w| in_startup && w > window);
    let (first_rtt_us, remembered_rtt_us) = (
        first_rtt.as_micros() as u64,
        resume.min_rtt.as_micros() as u64,
    );
    match jump {
        Some(window) => tracing::debug!(
            controller,
            window,
            first_rtt_us,
            remembered_rtt_us,
            "startup resumes from the path's memory"
        ),
        None => tracing::debug!(
            controller,
            first_rtt_us,
            remembered_rtt_us,
            "the path's memory does not fit this connection; starting cold"
        ),
    }
    jump
}

/// What a controller tells at the end of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// The window it would cruise at (BBR: one BDP plus its headroom), bytes.
    pub window: u64,
    pub min_rtt: Duration,
    /// It left startup / slow start: the window reflects the path, not just the time it had.
    pub converged: bool,
    /// The window this connection jumped to from a memory, if it did.
    pub jumped: Option<u64>,
}

/// One remembered path, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub window: u64,
    pub min_rtt_us: u64,
    pub converged: bool,
    pub saved_unix_ms: u64,
}

impl Remembered {
    fn age(&self, now: SystemTime) -> Duration {
        let saved = UNIX_EPOCH + Duration::from_millis(self.saved_unix_ms);
        // A memory from the future (a clock stepped back) counts as old.
        now.duration_since(saved).unwrap_or(Duration::MAX)
    }

    fn fresh(&self, now: SystemTime) -> bool {
        self.age(now) <= LIFETIME
    }

    fn resume(&self) -> Resume {
        Resume {
            window: self.window,
            min_rtt: Duration::from_micros(self.min_rtt_us),
        }
    }
}

/// The memory after a transfer that ended as `ending`, given the one before (`None`: leave
/// the file as it is). A converged window replaces any memory; one that never left startup
/// only replaces a smaller or stale one.
pub fn next(old: Option<Remembered>, ending: Ending, now: SystemTime) -> Option<Remembered> {
    if ending.window == 0 || ending.min_rtt.is_zero() {
        return None;
    }
    let kept = old.filter(|o| o.fresh(now));
    if !ending.converged && kept.is_some_and(|o| o.window >= ending.window) {
        return None;
    }
    let saved_unix_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Some(Remembered {
        window: ending.window,
        min_rtt_us: ending.min_rtt.as_micros() as u64,
        converged: ending.converged,
        saved_unix_ms,
    })
}

/// The file remembering the path to `peer` for `controller` under `dir`.
pub fn file_for(dir: &Path, peer: SocketAddr, controller: &str) -> PathBuf {
    let ip = peer.ip().to_canonical().to_string().replace(':', "_");
    dir.join(format!("{ip}-{}-{controller}.json", peer.port()))
}

fn read(file: &Path) -> Option<Remembered> {
    let text = fs::read(file).ok()?;
    serde_json::from_slice(&text).ok()
}

/// What a new connection to the path `file` remembers may start from, if anything.
pub fn load(file: &Path, now: SystemTime) -> Option<Resume> {
    read(file)
        .filter(|r| r.fresh(now) && r.window > 0 && r.min_rtt_us > 0)
        .map(|r| r.resume())
}

/// Records how a transfer ended in `file` (by [`next`]'s rule); written atomically, not
/// fsynced (a memory lost in a crash costs one cold start). Returns whether it wrote.
pub fn remember(file: &Path, ending: Ending, now: SystemTime) -> io::Result<bool> {
    let Some(memory) = next(read(file), ending, now) else {
        return Ok(false);
    };
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let text = serde_json::to_vec(&memory).map_err(io::Error::other)?;
    fs::write(&tmp, text)?;
    fs::rename(&tmp, file).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    if let Some(dir) = file.parent() {
        prune(dir, now);
    }
    Ok(true)
}

/// Most entries of the memory directory looked at per pruning.
const PRUNE_MAX_ENTRIES: usize = 4096;

/// Removes memories (and temporary files a killed sender left) untouched for longer than
/// [`LIFETIME`]: they would never be used again, and every receiver address and port leaves
/// its own file (tests and demos pick ports at random). Best effort, bounded.
pub fn prune(dir: &Path, now: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.take(PRUNE_MAX_ENTRIES).flatten() {
        let expired = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > LIFETIME));
        let ours = entry.file_name().to_str().is_some_and(|name| {
            name.ends_with(".json")
                || name
                    .rsplit('.')
                    .next()
                    .is_some_and(|e| e.starts_with("tmp"))
        });
        if expired && ours {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Where memories live by default: `paths` beside the scan cache.
pub fn default_dir() -> Option<PathBuf> {
    crate::scan_cache::default_dir().map(|d| d.join("paths"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ending(window: u64, converged: bool) -> Ending {
        Ending {
            window,
            min_rtt: ms(50),
            converged,
            jumped: None,
        }
    }

    #[test]
    fn a_jump_is_half_the_window_and_needs_a_path_at_least_half_as_long() {
        let r = Resume {
            window: 1_000_000,
            min_rtt: ms(50),
        };
        assert_eq!(r.jump(ms(50)), Some(500_000));
        assert_eq!(r.jump(ms(25)), Some(500_000));
        // Longer (a queue, another route): the same window is a lower rate, still safe.
        assert_eq!(r.jump(ms(400)), Some(500_000));
        // Much shorter: another path; start cold.
        assert_eq!(r.jump(ms(24)), None);
        assert_eq!(r.jump(Duration::ZERO), None);
    }

    #[test]
    fn a_converged_window_replaces_the_memory_and_a_ramp_only_a_smaller_one() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let first = next(None, ending(900_000, false), now).unwrap();
        assert_eq!((first.window, first.converged), (900_000, false));
        // A shorter transfer that ended mid-ramp says less than what is remembered.
        assert_eq!(next(Some(first), ending(300_000, false), now), None);
        // ... but a larger ramp is news.
        let more = next(Some(first), ending(1_200_000, false), now).unwrap();
        assert_eq!(more.window, 1_200_000);
        // A converged window is the path's now, smaller or not.
        let less = next(Some(more), ending(400_000, true), now).unwrap();
        assert_eq!((less.window, less.converged), (400_000, true));
        // A stale memory is replaced even by a ramp.
        let later = now + LIFETIME + Duration::from_secs(1);
        assert_eq!(
            next(Some(more), ending(300_000, false), later).map(|m| m.window),
            Some(300_000)
        );
        // Nothing measured: nothing written.
        assert_eq!(next(None, ending(0, true), now), None);
    }

    #[test]
    fn memories_round_trip_expire_and_survive_damage() {
        let dir = tempfile::tempdir().unwrap();
        let peer: SocketAddr = "10.250.88.2:7400".parse().unwrap();
        let file = file_for(&dir.path().join("paths"), peer, "bbr");
        let now = SystemTime::now();
        assert_eq!(load(&file, now), None);
        assert!(remember(&file, ending(800_000, true), now).unwrap());
        assert_eq!(
            load(&file, now),
            Some(Resume {
                window: 800_000,
                min_rtt: ms(50)
            })
        );
        // Not converged and smaller: the file stays.
        assert!(!remember(&file, ending(100_000, false), now).unwrap());
        assert_eq!(load(&file, now).map(|r| r.window), Some(800_000));
        assert_eq!(load(&file, now + LIFETIME + Duration::from_secs(1)), None);
        // A clock stepped back makes the memory look saved in the future: unused.
        assert_eq!(load(&file, now - Duration::from_secs(60)), None);
        fs::write(&file, b"{not json").unwrap();
        assert_eq!(load(&file, now), None);
        assert!(remember(&file, ending(100_000, false), now).unwrap());
        assert_eq!(load(&file, now).map(|r| r.window), Some(100_000));
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(file.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn writing_a_memory_removes_the_expired_ones_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let old = now - LIFETIME - Duration::from_secs(60);
        let set_mtime = |name: &str, t: SystemTime| {
            let f = fs::File::create(dir.path().join(name)).unwrap();
            f.set_modified(t).unwrap();
        };
        set_mtime("10.0.0.9-7400-bbr.json", old);
        set_mtime("10.0.0.9-7401-bbr.tmp1234", old);
        set_mtime("10.0.0.8-7400-bbr.json", now);
        set_mtime("notes.txt", old);
        let peer: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        let file = file_for(dir.path(), peer, "bbr");
        assert!(remember(&file, ending(500_000, true), now).unwrap());
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "10.0.0.1-7400-bbr.json",
                "10.0.0.8-7400-bbr.json",
                "notes.txt"
            ]
        );
    }

    #[test]
    fn each_receiver_and_controller_has_its_own_file() {
        let dir = Path::new("/d");
        let a: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:7401".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:7400".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:7400".parse().unwrap();
        assert_ne!(file_for(dir, a, "bbr"), file_for(dir, b, "bbr"));
        assert_ne!(file_for(dir, a, "bbr"), file_for(dir, a, "background"));
        assert_eq!(file_for(dir, a, "bbr"), file_for(dir, mapped, "bbr"));
        assert_eq!(
            file_for(dir, v6, "bbr"),
            PathBuf::from("/d/fd00__2-7400-bbr.json")
        );
    }
}
