//! Test-only fault injection (`shardsend --inject-fault`, hidden): corrupts a chunk on its
//! way out, so the receiver's checks can be exercised with the real binaries.
//!
//! Kept off the hot path: the encoders know nothing of it, and a transfer without a fault
//! has no injector at all (`Option::None`, one branch per frame). The injector copies the
//! one payload it corrupts; every other payload passes untouched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::queue::ChunkId;

/// Which fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte of the first chunk's payload once: the receiver must ask again.
    CorruptOnce,
    /// Flip it every time: the receiver must give up with a clear error.
    CorruptAlways,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "corrupt-once" => Ok(Fault::CorruptOnce),
            "corrupt-always" => Ok(Fault::CorruptAlways),
            _ => Err(format!("unknown fault {s:?}")),
        }
    }
}

/// Applies a [`Fault`] to the first chunk of the plan.
pub struct FaultInjector {
    fault: Fault,
    target: Mutex<Option<ChunkId>>,
    fired: AtomicBool,
}

impl FaultInjector {
    pub fn new(fault: Fault) -> Self {
        FaultInjector {
            fault,
            target: Mutex::new(None),
            fired: AtomicBool::new(false),
        }
    }

    /// The plan is known: its first chunk is the target.
    pub fn aim(&self, plan: &[ChunkId]) {
        if let (Ok(mut t), Some(first)) = (self.target.lock(), plan.first()) {
            t.get_or_insert(*first);
        }
    }

    /// Returns the payload to send for `chunk`: corrupted when it is the target and the
    /// fault fires now.
    pub fn apply(&self, chunk: ChunkId, payload: bytes::Bytes) -> bytes::Bytes {
        let is_target = self.target.lock().is_ok_and(|t| *t == Some(chunk));
        if !is_target || payload.is_empty() {
            return payload;
        }
        let first = !self.fired.swap(true, Ordering::Relaxed);
        if !first && self.fault == Fault::CorruptOnce {
            return payload;
        }
        tracing::warn!(
            file = chunk.0,
            chunk = chunk.1,
            "injecting a corrupted byte (test fault)"
        );
        let mut corrupted = payload.to_vec();
        corrupted[0] ^= 0xff;
        corrupted.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupts_the_target_once_or_always() {
        let once = FaultInjector::new(Fault::CorruptOnce);
        once.aim(&[(1, 0), (1, 1)]);
        let p = bytes::Bytes::from_static(b"abc");
        assert_eq!(&once.apply((1, 1), p.clone())[..], b"abc");
        assert_ne!(&once.apply((1, 0), p.clone())[..], b"abc");
        assert_eq!(&once.apply((1, 0), p.clone())[..], b"abc");
        let always = FaultInjector::new(Fault::CorruptAlways);
        always.aim(&[(1, 0)]);
        assert_ne!(&always.apply((1, 0), p.clone())[..], b"abc");
        assert_ne!(&always.apply((1, 0), p)[..], b"abc");
        assert!(always.apply((1, 0), bytes::Bytes::new()).is_empty());
    }
}
