//! What a receiver remembers of the pre-copies it staged, so that the final pass of a
//! migration, which follows within seconds on a new connection, need not read the staged
//! manifest back from its journal inside the repository's read-only window (~0.2 s for
//! 200k entries). Memory, not truth: [`crate::staging::Staging::prepare_after`] uses an
//! attempt only while its journal is the one it left, and reads the journal otherwise.
//!
//! Bounded: at most [`MAX_REMEMBERED_ENTRIES`] manifest entries in all (about 300 bytes
//! each), the oldest attempts forgotten first, none kept longer than [`REMEMBER_FOR`]; an
//! attempt is forgotten as soon as the next transfer to its destination takes it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::staging::Previous;

/// Entries remembered across all destinations (a 5 GB repository of 200k loose objects is
/// 200k entries, ~60 MB).
pub const MAX_REMEMBERED_ENTRIES: usize = 1_000_000;

/// How long a staged attempt is remembered: a migration's final pass follows its last
/// pre-copy within seconds; a pre-copy left for longer is read back from its journal.
pub const REMEMBER_FOR: Duration = Duration::from_secs(15 * 60);

/// Staged attempts by destination, oldest first.
#[derive(Default)]
pub struct RememberedAttempts {
    attempts: VecDeque<(Vec<u8>, Instant, Arc<Previous>)>,
}

impl RememberedAttempts {
    /// Remembers `attempt` at `dest` (replacing an earlier one), forgetting what is too old
    /// or beyond the bound. An attempt larger than the bound is not kept.
    pub fn remember(&mut self, dest: &[u8], attempt: Previous, now: Instant) {
        self.forget(dest);
        if attempt.len() > MAX_REMEMBERED_ENTRIES {
            return;
        }
        self.attempts
            .push_back((dest.to_vec(), now, Arc::new(attempt)));
        self.attempts
            .retain(|(_, at, _)| now.saturating_duration_since(*at) < REMEMBER_FOR);
        while self.entries() > MAX_REMEMBERED_ENTRIES {
            self.attempts.pop_front();
        }
    }

    /// Takes what is remembered of `dest`, if it is not too old.
    pub fn take(&mut self, dest: &[u8], now: Instant) -> Option<Arc<Previous>> {
        let i = self.attempts.iter().position(|(d, _, _)| d == dest)?;
        let (_, at, attempt) = self.attempts.remove(i)?;
        (now.saturating_duration_since(at) < REMEMBER_FOR).then_some(attempt)
    }

    /// Forgets `dest`.
    pub fn forget(&mut self, dest: &[u8]) {
        self.attempts.retain(|(d, _, _)| d != dest);
    }

    /// Entries remembered in all.
    pub fn entries(&self) -> usize {
        self.attempts.iter().map(|(_, _, a)| a.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use crate::tracker::ChunkTracker;
    use crate::wire::{Entry, EntryKind, RootKind};

    fn attempt(files: usize) -> Previous {
        let mut entries = vec![Entry {
            kind: EntryKind::Dir,
            ..Entry::default()
        }];
        entries.extend((0..files).map(|i| Entry {
            path: format!("f{i:07}").into_bytes(),
            kind: EntryKind::File,
            size: 1,
            ..Entry::default()
        }));
        let m = Manifest::from_scan(RootKind::Dir, 1 << 16, entries);
        let t = tempfile::tempdir().unwrap();
        Previous::remember(t.path(), b"d", &m, &ChunkTracker::new(&m))
    }

    #[test]
    fn attempts_are_taken_once_and_forgotten_when_old_or_beyond_the_bound() {
        let now = Instant::now();
        let mut r = RememberedAttempts::default();
        r.remember(b"a", attempt(10), now);
        r.remember(b"b", attempt(20), now);
        r.remember(b"a", attempt(30), now);
        assert_eq!(r.entries(), 21 + 31, "a replaced");
        assert_eq!(r.take(b"a", now).map(|p| p.len()), Some(31));
        assert!(r.take(b"a", now).is_none(), "taken once");
        // Too old.
        assert!(r.take(b"b", now + REMEMBER_FOR).is_none());
        // The bound: the oldest go first; one larger than the bound is not kept.
        let half = MAX_REMEMBERED_ENTRIES / 2;
        r.remember(b"x", attempt(half - 1), now);
        r.remember(b"y", attempt(half - 1), now);
        r.remember(b"z", attempt(10), now);
        assert!(r.entries() <= MAX_REMEMBERED_ENTRIES);
        assert!(r.take(b"x", now).is_none(), "the oldest was forgotten");
        assert!(r.take(b"z", now).is_some());
        r.remember(b"big", attempt(MAX_REMEMBERED_ENTRIES), now);
        assert!(r.take(b"big", now).is_none());
        r.forget(b"y");
        assert_eq!(r.entries(), 0);
    }
}
