//! Named failpoints: places where a test can make the `shardmove` process die with SIGKILL,
//! or make a migration step fail, to prove that whatever a crash or a failure leaves behind
//! is taken over correctly.
//!
//! A tiny equivalent of the `fail` crate, compiled in only with the `failpoints` feature
//! (which `cargo test` turns on through orchestrate's self dev-dependency; release builds
//! carry none of it). `SHARDMOVE_FAILPOINTS` lists the points, comma-separated:
//! - `NAME` kills this process with SIGKILL when point NAME is reached (`NAME@N`: on the N-th
//!   time only, counted per process). A kill rather than an error: a clean error would run
//!   cleanup code that a real crash never runs.
//! - `error:NAME` makes the step at point NAME fail, as a refused host step would.
//!
//! The driver's points are `after-ACTION` (after each action of the migrate core, named by
//! [`crate::migrate::core::Action::name`]) and `error:before-ACTION`. The host scripts have
//! their own points inside multi-part operations (see `failpoint` in `host-scripts/lib.sh`),
//! which exit with a status of their own that kills the driver here
//! ([`hit_in_host_script`]); the store has points inside transactions (`in-tx-...`).

#[cfg(feature = "failpoints")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    pub struct Point {
        pub error: bool,
        pub name: String,
        pub at: Option<u64>,
    }

    pub fn points() -> &'static [Point] {
        static SPEC: OnceLock<Vec<Point>> = OnceLock::new();
        SPEC.get_or_init(|| {
            std::env::var("SHARDMOVE_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let (error, s) = match s.strip_prefix("error:") {
                        Some(rest) => (true, rest),
                        None => (false, s),
                    };
                    let (name, at) = match s.split_once('@') {
                        Some((n, at)) => (n.to_string(), at.parse().ok()),
                        None => (s.to_string(), None),
                    };
                    Point { error, name, at }
                })
                .collect()
        })
    }

    /// Whether the point `name` of kind `error` fires now (counting its hits).
    pub fn fires(name: &str, error: bool) -> bool {
        static COUNTS: OnceLock<Mutex<HashMap<(String, bool), u64>>> = OnceLock::new();
        let Some(point) = points().iter().find(|p| p.name == name && p.error == error) else {
            return false;
        };
        let count = {
            let mut counts = COUNTS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let c = counts.entry((name.to_string(), error)).or_default();
            *c += 1;
            *c
        };
        point.at.is_none_or(|at| at == count)
    }

    pub fn die(what: &str) {
        eprintln!("shardmove: failpoint {what} hit: killing this process (SIGKILL)");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Kills this process at point `name` if the environment asks for it (see the module doc).
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if enabled::fires(name, false) {
        enabled::die(name);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Whether the step at point `name` must fail (`error:NAME`); always false without the
/// feature.
pub fn error(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    return enabled::fires(name, true);
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// A host script exited with the failpoint status (`scripts::exit::FAILPOINT`): in test
/// builds this process dies the way a crash in the middle of the host operation would leave
/// things. Without the feature the status is just an error.
pub fn hit_in_host_script(script: &str, stderr: &str) {
    #[cfg(feature = "failpoints")]
    enabled::die(&format!("in host script {script} ({})", stderr.trim()));
    #[cfg(not(feature = "failpoints"))]
    let _ = (script, stderr);
}
