//! Who drives a batch: whether `migrate` starts a new batch, goes on with an unfinished one
//! (taking it over from a dead driver, or retrying what an incomplete one left), or refuses
//! because a live driver has it.
//!
//! The decision ([`decide_start`], [`may_claim`]) is pure; whether an owner is alive
//! ([`owner_gone`]) is the only I/O: on this host its process is looked up in `/proc`,
//! elsewhere its heartbeat decides.

use std::time::Duration;

use crate::store::journal::{BatchRecord, BatchState, Owner};

/// A running batch's owner refreshes the batch's `updated_at` this often...
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// ...and counts as gone after this many seconds without it, unless it runs on this host,
/// where its process is looked up directly.
pub const OWNER_STALE_SECS: i64 = 60;

/// This machine's host name.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This process, as a batch owner.
pub fn me() -> Owner {
    Owner {
        pid: std::process::id(),
        host: this_host(),
    }
}

/// Why `owner` no longer drives its batch (last heartbeat at `updated_at`, unix seconds), or
/// `None` while it does. On this host the process itself is checked (gone, or its pid reused
/// by something that is not shardmove); elsewhere the heartbeat decides.
pub fn owner_gone(owner: &Owner, updated_at: i64, now: i64) -> Option<String> {
    if owner.host == this_host() {
        if owner.pid == std::process::id() {
            return None;
        }
        return match std::fs::read(format!("/proc/{}/cmdline", owner.pid)) {
            Err(_) => Some(format!("process {} has exited", owner.pid)),
            Ok(cmdline) if !String::from_utf8_lossy(&cmdline).contains("shardmove") => {
                Some(format!("process {} is no longer shardmove", owner.pid))
            }
            Ok(_) => None,
        };
    }
    let silent = now - updated_at;
    (silent > OWNER_STALE_SECS).then(|| format!("no heartbeat for {silent} s"))
}

/// Why a `running` batch has no live driver, or `None` (also for batches not running).
pub fn driver_gone(batch: &BatchRecord, now: i64) -> Option<String> {
    match (&batch.state, &batch.owner) {
        (BatchState::Running, Some(owner)) => owner_gone(owner, batch.updated_at, now),
        (BatchState::Running, None) => Some("no owner recorded".into()),
        _ => None,
    }
}

/// What `migrate` does about the batches of its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// No unfinished batch: record a new one.
    New,
    /// Go on with batch `id`; `why` is said to the operator.
    Continue { id: i64, why: String },
    /// A live driver has it.
    Refused(String),
}

/// The decision for `existing`, the newest unfinished batch of the same plane, instance and
/// services (or the one `--resume` names), where `gone` says why its driver is gone.
pub fn decide_start(existing: Option<&BatchRecord>, gone: Option<String>, me: &Owner) -> Start {
    let Some(batch) = existing else {
        return Start::New;
    };
    let id = batch.id;
    match batch.state {
        BatchState::Done => Start::Continue {
            id,
            why: format!("migration {id} is done; nothing left to move"),
        },
        BatchState::Incomplete => Start::Continue {
            id,
            why: format!(
                "going on with migration {id}, which ended incomplete: its rolled-back and \
                 stuck repositories are retried"
            ),
        },
        BatchState::Running => match (&batch.owner, gone) {
            (_, Some(gone)) => Start::Continue {
                id,
                why: format!("taking over migration {id}: its owner is gone ({gone})"),
            },
            (Some(owner), None) if owner == me => Start::Continue {
                id,
                why: format!("going on with migration {id}"),
            },
            (owner, None) => Start::Refused(format!(
                "migration {id} of {} from {} to {} is still running{}; wait for it \
                 (`shardmove migrate status {id}`), or stop that process first",
                batch.spec.instance,
                batch.spec.from,
                batch.spec.to,
                owner
                    .as_ref()
                    .map(|o| format!(", driven by {o}"))
                    .unwrap_or_default()
            )),
        },
    }
}

/// The same rule, checked again inside the claiming transaction (the batch locked).
pub fn may_claim(batch: &BatchRecord, me: &Owner, now: i64) -> Result<(), String> {
    match decide_start(Some(batch), driver_gone(batch, now), me) {
        Start::Refused(why) => Err(why),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::ports::BatchSpec;

    fn batch(state: BatchState, owner: Option<Owner>, updated_at: i64) -> BatchRecord {
        BatchRecord {
            id: 7,
            plane: "builtin".into(),
            spec: BatchSpec {
                instance: "t".into(),
                from: "a".into(),
                to: "b".into(),
                repos: vec![],
            },
            message: "m".into(),
            state,
            owner,
            updated_at,
        }
    }

    #[test]
    fn an_owner_is_gone_when_its_process_exited_or_its_heartbeat_stopped() {
        let now = 1_000_000;
        assert_eq!(owner_gone(&me(), 0, now), None);
        let dead = Owner {
            pid: u32::MAX,
            host: this_host(),
        };
        assert!(owner_gone(&dead, now, now).is_some_and(|w| w.contains("exited")));
        let remote = Owner {
            pid: 1,
            host: "some-other-host".into(),
        };
        assert_eq!(owner_gone(&remote, now - OWNER_STALE_SECS, now), None);
        assert!(owner_gone(&remote, now - OWNER_STALE_SECS - 1, now).is_some());
    }

    #[test]
    fn a_live_driver_keeps_its_batch_and_a_dead_or_finished_one_does_not() {
        let me = me();
        let other = Owner {
            pid: 1,
            host: "elsewhere".into(),
        };
        let now = 1_000_000;
        assert_eq!(decide_start(None, None, &me), Start::New);
        let live = batch(BatchState::Running, Some(other.clone()), now);
        assert!(matches!(
            decide_start(Some(&live), driver_gone(&live, now), &me),
            Start::Refused(why) if why.contains("still running") && why.contains("pid 1 on elsewhere")
        ));
        assert!(may_claim(&live, &me, now).is_err());
        let silent = batch(BatchState::Running, Some(other), now - 3600);
        assert!(matches!(
            decide_start(Some(&silent), driver_gone(&silent, now), &me),
            Start::Continue { id: 7, why } if why.contains("taking over") && why.contains("no heartbeat")
        ));
        assert!(may_claim(&silent, &me, now).is_ok());
        let incomplete = batch(BatchState::Incomplete, None, now);
        assert!(matches!(
            decide_start(Some(&incomplete), None, &me),
            Start::Continue { why, .. } if why.contains("retried")
        ));
        let mine = batch(BatchState::Running, Some(me.clone()), 0);
        assert!(may_claim(&mine, &me, now).is_ok());
        let orphan = batch(BatchState::Running, None, now);
        assert!(matches!(
            decide_start(Some(&orphan), driver_gone(&orphan, now), &me),
            Start::Continue { .. }
        ));
    }
}
