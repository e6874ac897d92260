//! Where a step's time went, logged at debug level. A migration's final pass runs inside the
//! repository's read-only window; its scan, prepare and install log their phases so that a
//! slow window says which part of which step it was (`RUST_LOG=transfer=debug`).

use std::time::{Duration, Instant};

/// Phases of one step, timed back to back.
pub(crate) struct Phases {
    last: Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub(crate) fn start() -> Phases {
        Phases {
            last: Instant::now(),
            spent: Vec::new(),
        }
    }

    /// Ends the phase called `name`.
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.spent.push((name, now - self.last));
        self.last = now;
    }

    /// Logs the phases as `what` of a step over `entries` entries.
    pub(crate) fn log(&self, what: &'static str, entries: usize) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let parts: Vec<String> = self
                .spent
                .iter()
                .map(|(name, d)| format!("{name} {:.3} s", d.as_secs_f64()))
                .collect();
            tracing::debug!(entries, phases = %parts.join(", "), "{what}");
        }
    }
}
