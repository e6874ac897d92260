//! What the progress bar and the `--json` progress events say: bytes done out of the
//! tree's total, and the rate of this run.
//!
//! Sans-io, fed by the sender session with the receiver's numbers and the `now` it is given.
//! The receiver's `Accept` and `Progress` carry its count of verified bytes, which already
//! includes what an earlier attempt left verified (`--resume`, a reconnection). So:
//! - bytes done are the receiver's count, never that count plus the resumed bytes (an
//!   earlier driver added both, showing `504/600 MiB` right after a resume and ending past
//!   the total);
//! - the first report, at `Accept`, already counts the resumed bytes as done;
//! - done never goes backwards and never passes the total, whatever the receiver says;
//! - the rate counts only bytes verified since this run's `Accept`, over the time since
//!   then, so resumed bytes do not inflate it (the progress bar's own estimator used to see
//!   them arrive in the first frame).

use std::time::Instant;

use serde::Serialize;

/// One report: what is done of the tree, and how fast this run goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressReport {
    /// Bytes of the tree verified by the receiver, resumed ones included.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes an earlier attempt left verified (counted in `done_bytes` from the first report).
    pub resumed_bytes: u64,
    /// Bytes verified in this run per second since the receiver accepted it; resumed
    /// bytes are not in it.
    pub bytes_per_second: f64,
    /// Seconds since the receiver accepted this run.
    pub seconds: f64,
    /// Seconds left at `bytes_per_second`; `None` until something moved.
    pub eta_seconds: Option<f64>,
}

/// Accumulates the receiver's reports for one attempt.
#[derive(Debug, Clone)]
pub struct ProgressMeter {
    total: u64,
    resumed: u64,
    done: u64,
    accepted_at: Option<Instant>,
}

impl ProgressMeter {
    pub fn new(total_bytes: u64) -> Self {
        ProgressMeter {
            total: total_bytes,
            resumed: 0,
            done: 0,
            accepted_at: None,
        }
    }

    /// The receiver accepted the run, holding `verified_bytes` from an earlier attempt.
    pub fn accepted(&mut self, verified_bytes: u64, now: Instant) -> ProgressReport {
        self.resumed = verified_bytes.min(self.total);
        self.done = self.done.max(self.resumed);
        self.accepted_at = Some(now);
        self.report(now)
    }

    /// The receiver has verified `verified_bytes` in all (resumed ones included).
    pub fn verified(&mut self, verified_bytes: u64, now: Instant) -> ProgressReport {
        self.done = self.done.max(verified_bytes.min(self.total));
        self.report(now)
    }

    /// The receiver verified the whole tree (it installed or staged it).
    pub fn complete(&mut self, now: Instant) -> ProgressReport {
        self.done = self.total;
        self.report(now)
    }

    pub fn report(&self, now: Instant) -> ProgressReport {
        let seconds = self
            .accepted_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let this_run = self.done.saturating_sub(self.resumed);
        let bytes_per_second = if seconds > 0.0 {
            this_run as f64 / seconds
        } else {
            0.0
        };
        let eta_seconds = (bytes_per_second > 0.0)
            .then(|| self.total.saturating_sub(self.done) as f64 / bytes_per_second);
        ProgressReport {
            done_bytes: self.done,
            total_bytes: self.total,
            resumed_bytes: self.resumed,
            bytes_per_second,
            seconds,
            eta_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    /// The numbers of the bug report: 600 MiB, 234 MiB verified before a kill -9, resumed
    /// at 100 MiB/s. The old driver showed 504 MiB after 0.6 s and ended at 680 MiB.
    #[test]
    fn resumed_bytes_count_once_from_the_first_report_and_stay_out_of_the_rate() {
        let t0 = Instant::now();
        let mut m = ProgressMeter::new(600 * MIB);
        let first = m.accepted(234 * MIB, t0);
        assert_eq!(first.done_bytes, 234 * MIB);
        assert_eq!(first.resumed_bytes, 234 * MIB);
        assert_eq!(first.bytes_per_second, 0.0);
        assert_eq!(first.eta_seconds, None);
        // The receiver's count includes the resumed bytes: 60 MiB more after 0.6 s.
        let r = m.verified(294 * MIB, t0 + Duration::from_millis(600));
        assert_eq!(r.done_bytes, 294 * MIB);
        assert!(
            (r.bytes_per_second - 100.0 * MIB as f64).abs() < 1.0,
            "{r:?}"
        );
        let eta = r.eta_seconds.unwrap();
        assert!((eta - 3.06).abs() < 0.01, "{eta}");
        let end = m.complete(t0 + Duration::from_millis(3660));
        assert_eq!(end.done_bytes, 600 * MIB);
        assert!(
            (end.bytes_per_second - 100.0 * MIB as f64).abs() < 1.0,
            "{end:?}"
        );
    }

    #[test]
    fn done_never_goes_back_nor_past_the_total() {
        let t0 = Instant::now();
        let mut m = ProgressMeter::new(100);
        m.accepted(10, t0);
        assert_eq!(m.verified(50, t0 + Duration::from_secs(1)).done_bytes, 50);
        assert_eq!(m.verified(20, t0 + Duration::from_secs(2)).done_bytes, 50);
        assert_eq!(
            m.verified(u64::MAX, t0 + Duration::from_secs(3)).done_bytes,
            100
        );
        // A receiver claiming more resumed bytes than the tree has.
        let mut m = ProgressMeter::new(100);
        let r = m.accepted(1_000, t0);
        assert_eq!((r.done_bytes, r.resumed_bytes), (100, 100));
        assert_eq!(
            m.complete(t0 + Duration::from_secs(1)).bytes_per_second,
            0.0
        );
    }

    #[test]
    fn a_report_before_the_accept_says_nothing_moved() {
        let m = ProgressMeter::new(100);
        let r = m.report(Instant::now());
        assert_eq!((r.done_bytes, r.seconds, r.bytes_per_second), (0, 0.0, 0.0));
    }
}
