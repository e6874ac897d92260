//! When a transfer whose connection was lost connects again, and when it gives up.
//!
//! Why: a cut link (a router restarting, a WAN path flapping) must not cost a migration what
//! it already moved, nor wait for an operator to type `--resume`. The receiver journals every
//! verified chunk, so a new connection that asks to resume is told what it holds and only the
//! rest crosses the wire ([`super::session::SenderSession`] plans that from `Have`).
//!
//! Sans-io: no clock but the `now` passed in, no sockets. The driver ([`super::send`]) tells
//! a [`Reconnector`] when a connection was made ([`Reconnector::connected`]) and how each
//! attempt failed ([`Reconnector::failed`]); it answers [`Verdict::Retry`] (pause, then
//! connect again with `resume`, within a shorter connect timeout) or [`Verdict::GiveUp`].
//!
//! The rules:
//! - Only once the receiver has answered in this run. A first connection that fails is a
//!   wrong address, a stopped receiver or a refused key: reported at once (exit 3), as before.
//! - Only link failures: a connection lost ([`Error::Interrupted`]: idle timeout after a
//!   silent cut, a receiver that shut down or restarted) or a new connection that got no
//!   answer ([`Error::Unreachable`]). A refusal, a failed verification, a key mismatch or a
//!   source that changed end the transfer as they always did.
//! - `retry_for` bounds one outage: its clock starts when the loss is noticed (after QUIC's
//!   idle timeout, 30 s, when a cut is silent) and stops when a connection is made again, so
//!   a link that comes and goes does not add up its outages against one long transfer.
//!   Zero turns reconnecting off.
//! - The first try comes at once (a receiver that restarts closes connections on purpose and
//!   is back within a second), later ones after [`RETRY_PAUSE`]. Each try waits at most
//!   [`RECONNECT_TIMEOUT`] for an answer: quinn resends its first packet only after 1, 2 and
//!   4 s more, so one long try would notice a returning link several seconds late, where
//!   fresh tries notice it within about a second.

use std::time::{Duration, Instant};

use crate::error::Error;

use super::SendEvent;

/// Pause between two reconnect tries that got no answer.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long one reconnect try waits for the receiver's answer (at most `--connect-timeout`).
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// Default of `shardsend --retry-for`: long enough for a router or a receiver to restart,
/// short enough that a migration whose target is really gone fails within minutes.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(300);

/// What to do after an attempt failed.
#[derive(Debug)]
pub enum Verdict {
    /// Report `event`, wait `pause`, then connect again (resuming) for at most
    /// `connect_timeout`.
    Retry {
        pause: Duration,
        connect_timeout: Duration,
        event: SendEvent,
    },
    /// The transfer ends with this error.
    GiveUp(Error),
}

/// An outage: since when no connection worked, and how often we tried.
#[derive(Debug, Clone)]
struct Outage {
    since: Instant,
    tries: u32,
    /// What ended the last working connection (the give-up message names it).
    cause: String,
}

/// The reconnect decision for one run of `shardsend`.
#[derive(Debug, Clone)]
pub struct Reconnector {
    retry_for: Duration,
    connected_once: bool,
    outage: Option<Outage>,
    reconnects: u32,
}

/// Whether `error` says the link failed (not the peer, nor our input).
pub fn is_link_failure(error: &Error) -> bool {
    matches!(error, Error::Interrupted(_) | Error::Unreachable { .. })
}

/// What went wrong, without the advice to `--resume` that an interruption carries (we are
/// resuming).
fn what_failed(error: &Error) -> String {
    match error {
        Error::Interrupted(what) | Error::Unreachable { reason: what, .. } => what.clone(),
        other => other.to_string(),
    }
}

impl Reconnector {
    pub fn new(retry_for: Duration) -> Self {
        Reconnector {
            retry_for,
            connected_once: false,
            outage: None,
            reconnects: 0,
        }
    }

    /// Connections made again after an outage, so far.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// A connection to the receiver was made at `now`; ends an outage (and says so).
    pub fn connected(&mut self, now: Instant) -> Option<SendEvent> {
        self.connected_once = true;
        let outage = self.outage.take()?;
        self.reconnects += 1;
        Some(SendEvent::Reconnected {
            waited_seconds: now.saturating_duration_since(outage.since).as_secs_f64(),
            tries: outage.tries,
        })
    }

    /// An attempt failed at `now` with `error`.
    pub fn failed(&mut self, error: Error, now: Instant, connect_timeout: Duration) -> Verdict {
        if !self.connected_once || !is_link_failure(&error) || self.retry_for.is_zero() {
            return Verdict::GiveUp(error);
        }
        let outage = self.outage.get_or_insert_with(|| Outage {
            since: now,
            tries: 0,
            cause: what_failed(&error),
        });
        let waited = now.saturating_duration_since(outage.since);
        if waited >= self.retry_for {
            return Verdict::GiveUp(Error::Interrupted(format!(
                "{}; no connection to the receiver again within --retry-for {} s (last try: {})",
                outage.cause,
                self.retry_for.as_secs(),
                what_failed(&error)
            )));
        }
        let pause = if outage.tries == 0 {
            Duration::ZERO
        } else {
            RETRY_PAUSE.min(self.retry_for - waited)
        };
        outage.tries += 1;
        Verdict::Retry {
            pause,
            connect_timeout: connect_timeout.min(RECONNECT_TIMEOUT),
            event: SendEvent::Reconnecting {
                reason: what_failed(&error),
                try_number: outage.tries,
                waited_seconds: waited.as_secs_f64(),
                retry_for_seconds: self.retry_for.as_secs_f64(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FailCode;

    const S: Duration = Duration::from_secs(1);
    const CONNECT: Duration = Duration::from_secs(15);

    fn lost() -> Error {
        Error::Interrupted("timed out".into())
    }

    fn no_answer() -> Error {
        Error::Unreachable {
            addr: "10.0.0.2:7400".into(),
            reason: "no answer within 4 s".into(),
        }
    }

    fn retry(v: Verdict) -> (Duration, Duration, SendEvent) {
        match v {
            Verdict::Retry {
                pause,
                connect_timeout,
                event,
            } => (pause, connect_timeout, event),
            Verdict::GiveUp(e) => panic!("gave up: {e}"),
        }
    }

    fn gave_up(v: Verdict) -> Error {
        match v {
            Verdict::GiveUp(e) => e,
            Verdict::Retry { .. } => panic!("retried"),
        }
    }

    #[test]
    fn a_first_connection_that_fails_is_reported_at_once() {
        let mut r = Reconnector::new(300 * S);
        let t0 = Instant::now();
        let e = gave_up(r.failed(no_answer(), t0, CONNECT));
        assert!(matches!(e, Error::Unreachable { .. }), "{e}");
        let e = gave_up(r.failed(lost(), t0, CONNECT));
        assert!(matches!(e, Error::Interrupted(_)));
    }

    #[test]
    fn a_lost_connection_is_retried_at_once_then_every_pause_with_a_short_connect_timeout() {
        let mut r = Reconnector::new(300 * S);
        let t0 = Instant::now();
        assert!(
            r.connected(t0).is_none(),
            "no outage yet, nothing to report"
        );
        let (pause, timeout, event) = retry(r.failed(lost(), t0 + 40 * S, CONNECT));
        assert_eq!((pause, timeout), (Duration::ZERO, RECONNECT_TIMEOUT));
        assert!(matches!(
            event,
            SendEvent::Reconnecting { try_number: 1, waited_seconds, .. } if waited_seconds == 0.0
        ));
        let (pause, _, event) = retry(r.failed(no_answer(), t0 + 44 * S, CONNECT));
        assert_eq!(pause, RETRY_PAUSE);
        match event {
            SendEvent::Reconnecting {
                try_number,
                waited_seconds,
                reason,
                retry_for_seconds,
            } => {
                assert_eq!((try_number, waited_seconds), (2, 4.0));
                assert_eq!(retry_for_seconds, 300.0);
                assert!(reason.contains("no answer"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A --connect-timeout shorter than ours is kept.
        let (_, timeout, _) = retry(r.failed(no_answer(), t0 + 49 * S, S));
        assert_eq!(timeout, S);
        // Back: the outage lasted from 40 s to 52 s, over three tries.
        let back = r.connected(t0 + 52 * S);
        assert_eq!(
            back,
            Some(SendEvent::Reconnected {
                waited_seconds: 12.0,
                tries: 3
            })
        );
        assert_eq!(r.reconnects(), 1);
    }

    #[test]
    fn retry_for_bounds_each_outage_not_the_whole_transfer() {
        let mut r = Reconnector::new(60 * S);
        let t0 = Instant::now();
        r.connected(t0);
        retry(r.failed(lost(), t0 + 100 * S, CONNECT));
        retry(r.failed(no_answer(), t0 + 159 * S, CONNECT));
        // The last pause never reaches past the deadline.
        let (pause, _, _) = retry(r.failed(no_answer(), t0 + 159 * S + S / 2, CONNECT));
        assert_eq!(pause, S / 2);
        let e = gave_up(r.failed(no_answer(), t0 + 160 * S, CONNECT));
        let text = e.to_string();
        assert!(matches!(e, Error::Interrupted(_)), "{text}");
        assert!(text.contains("--retry-for 60 s"), "{text}");
        assert!(text.contains("timed out"), "names what was lost: {text}");
        assert!(text.contains("--resume"), "says how to go on: {text}");
        assert_eq!(e.exit_code(), crate::error::exit::INTERRUPTED);

        // A connection made again starts a new budget.
        let mut r = Reconnector::new(60 * S);
        r.connected(t0);
        retry(r.failed(lost(), t0, CONNECT));
        r.connected(t0 + 50 * S);
        retry(r.failed(lost(), t0 + 100 * S, CONNECT));
        retry(r.failed(no_answer(), t0 + 150 * S, CONNECT));
    }

    #[test]
    fn only_link_failures_are_retried() {
        let t0 = Instant::now();
        for e in [
            Error::Refused {
                code: FailCode::Busy,
                message: "destination is being received".into(),
            },
            Error::Verification("root hash".into()),
            Error::Connect {
                addr: "x".into(),
                reason: "it refused our key".into(),
            },
            Error::SourceChanged("f".into()),
            Error::Input("bad".into()),
            Error::Other("internal".into()),
        ] {
            let mut r = Reconnector::new(300 * S);
            r.connected(t0);
            let text = e.to_string();
            let back = gave_up(r.failed(e, t0, CONNECT));
            assert_eq!(back.to_string(), text, "passed on unchanged");
        }
        // Also in the middle of an outage: a reconnect that is refused ends it.
        let mut r = Reconnector::new(300 * S);
        r.connected(t0);
        retry(r.failed(lost(), t0, CONNECT));
        let e = gave_up(r.failed(Error::Verification("x".into()), t0 + S, CONNECT));
        assert!(matches!(e, Error::Verification(_)));
    }

    #[test]
    fn retry_for_zero_turns_reconnecting_off() {
        let mut r = Reconnector::new(Duration::ZERO);
        let t0 = Instant::now();
        r.connected(t0);
        let e = gave_up(r.failed(lost(), t0, CONNECT));
        assert_eq!(e.to_string(), lost().to_string());
    }
}
