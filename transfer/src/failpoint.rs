//! Named failpoints: places where a chaos test makes the process die with SIGKILL, to prove
//! that whatever a crash leaves behind is recovered by the next attempt.
//!
//! Compiled in only with the `failpoints` feature, which `cargo test` turns on through the
//! crate's self dev-dependency (so the `shardrecv` binary that the workspace's tests run
//! has them); release builds carry none of it. `SHARDMOVE_FAILPOINTS` lists the points,
//! comma-separated, the way `orchestrate`'s failpoints read it: `NAME` kills the process at
//! point NAME, `NAME@N` on its N-th hit only (counted per process). Names of other
//! components' points (and `error:` points, which this crate has none of) are ignored.
//!
//! The points of this crate, all inside [`crate::staging::Staging::install`]:
//! - `install-before-rename`: the staged tree is complete, its metadata applied and synced;
//!   nothing is renamed yet (an existing target is untouched);
//! - `install-moved-aside`: an existing target was moved aside to `NAME.replaced-<time>`;
//!   the staged tree is not renamed in yet, so NAME does not exist.
//!
//! Either way the staging area keeps the verified tree and its journal: a resumed transfer
//! (`shardsend --resume`) finds every chunk verified, sends nothing, and installs it; after
//! `install-moved-aside` there is no target left to move aside, and the previous copy stays
//! where the killed install put it.

/// Kills this process at point `name` if `SHARDMOVE_FAILPOINTS` asks for it; nothing
/// without the `failpoints` feature.
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if enabled::fires(name) {
        eprintln!("failpoint {name} hit: killing this process (SIGKILL)");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Whether this build has failpoints compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

#[cfg(feature = "failpoints")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// `(name, N)` of each listed point; `None`: every hit.
    fn points() -> &'static [(String, Option<u64>)] {
        static SPEC: OnceLock<Vec<(String, Option<u64>)>> = OnceLock::new();
        SPEC.get_or_init(|| parse(&std::env::var("SHARDMOVE_FAILPOINTS").unwrap_or_default()))
    }

    pub fn parse(spec: &str) -> Vec<(String, Option<u64>)> {
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with("error:"))
            .map(|s| match s.split_once('@') {
                Some((name, at)) => (name.to_string(), at.parse().ok()),
                None => (s.to_string(), None),
            })
            .collect()
    }

    /// Whether point `name` fires now (counting its hits).
    pub fn fires(name: &str) -> bool {
        static COUNTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
        let Some((_, at)) = points().iter().find(|(n, _)| n == name) else {
            return false;
        };
        let mut counts = COUNTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(name.to_string()).or_default();
        *count += 1;
        at.is_none_or(|at| at == *count)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn spec_parses_like_orchestrates() {
            assert_eq!(
                super::parse(" install-moved-aside, error:after-x,install-before-rename@2,,"),
                vec![
                    ("install-moved-aside".to_string(), None),
                    ("install-before-rename".to_string(), Some(2)),
                ]
            );
        }
    }
}
