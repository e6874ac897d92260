//! Named failpoints: places where a test can make the `shardmove` process die with SIGKILL,
//! to prove that whatever a crash leaves behind is taken over correctly.
//!
//! A tiny equivalent of the `fail` crate, compiled in only with the `failpoints` feature
//! (which `cargo test` turns on through orchestrate's self dev-dependency; release builds
//! carry none of it). `SHARDMOVE_FAILPOINTS` names the points to fire, comma-separated;
//! `NAME@N` fires on the N-th hit only (counted per process). The process kills itself with
//! SIGKILL rather than returning an error: a clean error would run cleanup code that a real
//! crash never runs.

/// Fires failpoint `name` if the environment asks for it (see the module doc).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SPEC: OnceLock<Vec<(String, Option<u64>)>> = OnceLock::new();
    static COUNTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        std::env::var("SHARDMOVE_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('@') {
                Some((n, at)) => (n.to_string(), at.parse().ok()),
                None => (s.to_string(), None),
            })
            .collect()
    });
    let Some((_, at)) = spec.iter().find(|(n, _)| n == name) else {
        return;
    };
    let count = {
        let mut counts = COUNTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(name.to_string()).or_default();
        *c += 1;
        *c
    };
    if at.is_none_or(|at| at == count) {
        eprintln!("shardmove: failpoint {name} hit: killing this process (SIGKILL)");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Without the `failpoints` feature a failpoint costs nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// A host script exited with the failpoint status (`exit::FAILPOINT`): in test builds this
/// process dies the way a crash in the middle of the host operation would leave things.
/// Without the feature the status is just an error.
pub fn hit_in_host_script(script: &str, stderr: &str) {
    #[cfg(feature = "failpoints")]
    {
        eprintln!("shardmove: failpoint in host script {script} hit: killing this process (SIGKILL) {stderr}");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (script, stderr);
}
