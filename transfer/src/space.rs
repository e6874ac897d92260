//! Disk space promised to the transfers a receiver runs at once.
//!
//! **Why a ledger.** Each transfer checks, when its staging is prepared, that what it still
//! has to write fits in the free space ([`crate::staging::Staging::prepare`]). Alone that is
//! right; but 32 transfers prepared within the same second all see the same free space, each
//! fits, and together they fill the disk: every one of them then fails mid-way on ENOSPC,
//! after sending most of its bytes, and a full disk also hurts whatever else lives on it.
//! So the receiver keeps a ledger of what it has promised and not yet written: a transfer
//! is admitted only if its bytes fit in the free space minus what is promised to the others
//! (and minus `keep_free`, room left for everything else on that disk), and is refused at
//! once, before any data moves, with a message that says why.
//!
//! Free space is read from the file system each time (`statvfs`), so it already counts what
//! the transfers wrote; a transfer's promise shrinks as it writes ([`SpaceLedger::wrote`]),
//! and ends with the transfer ([`SpaceLedger::release`]), installed or not.
//!
//! Sans-io: the caller passes the free space it read; `recv` keeps the ledger in a mutex and
//! holds a release-on-drop guard per transfer.

use std::collections::HashMap;

/// One transfer's promise.
pub type PromiseId = u64;

/// Disk bytes a transfer still writing `bytes` of file data into `entries` entries, as
/// `chunks` journaled chunks, may take: the data, a block per entry (a file's last block,
/// a directory, an inode's share) and a journal record per chunk. An overestimate on
/// purpose: the ledger must not promise the last few blocks twice.
pub fn footprint(bytes: u64, entries: u64, chunks: u64) -> u64 {
    const BLOCK: u64 = 4096;
    const JOURNAL_RECORD: u64 = 64;
    bytes
        .saturating_add(entries.saturating_mul(BLOCK))
        .saturating_add(chunks.saturating_mul(JOURNAL_RECORD))
}

/// Why a transfer does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Bytes the transfer still has to write.
    pub needed: u64,
    /// Free bytes on the file system now.
    pub available: u64,
    /// Bytes promised to other transfers and not yet written.
    pub promised: u64,
    /// How many transfers hold those promises.
    pub transfers: usize,
    /// Bytes kept free for everything else on the disk.
    pub keep_free: u64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not enough space on the receiver: this transfer needs {} more bytes, {} are free, \
             of which {} are promised to {} transfer(s) in progress",
            self.needed, self.available, self.promised, self.transfers
        )?;
        if self.keep_free > 0 {
            write!(f, " and {} are kept free (--keep-free)", self.keep_free)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Promise {
    needed: u64,
    written: u64,
}

impl Promise {
    fn outstanding(self) -> u64 {
        self.needed.saturating_sub(self.written)
    }
}

/// What the receiver has promised and not yet written.
#[derive(Debug, Default)]
pub struct SpaceLedger {
    keep_free: u64,
    next: PromiseId,
    promises: HashMap<PromiseId, Promise>,
}

impl SpaceLedger {
    /// A ledger that also keeps `keep_free` bytes free for everything else on the disk.
    pub fn new(keep_free: u64) -> SpaceLedger {
        SpaceLedger {
            keep_free,
            ..SpaceLedger::default()
        }
    }

    /// Bytes promised and not yet written, over all transfers.
    pub fn outstanding(&self) -> u64 {
        self.promises
            .values()
            .fold(0u64, |sum, p| sum.saturating_add(p.outstanding()))
    }

    /// Transfers holding a promise.
    pub fn transfers(&self) -> usize {
        self.promises.len()
    }

    /// Promises `needed` bytes if they fit in `available` (read from the file system now)
    /// beside every other promise and `keep_free`.
    pub fn try_promise(&mut self, needed: u64, available: u64) -> Result<PromiseId, Shortfall> {
        let promised = self.outstanding();
        let room = available
            .saturating_sub(promised)
            .saturating_sub(self.keep_free);
        if needed > room {
            return Err(Shortfall {
                needed,
                available,
                promised,
                transfers: self.promises.len(),
                keep_free: self.keep_free,
            });
        }
        let id = self.next;
        self.next += 1;
        self.promises.insert(id, Promise { needed, written: 0 });
        Ok(id)
    }

    /// `bytes` of promise `id` were written (the file system's free space counts them now).
    pub fn wrote(&mut self, id: PromiseId, bytes: u64) {
        if let Some(p) = self.promises.get_mut(&id) {
            p.written = p.written.saturating_add(bytes);
        }
    }

    /// The transfer ended (installed, failed or gone): its promise ends.
    pub fn release(&mut self, id: PromiseId) {
        self.promises.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn transfers_that_each_fit_are_refused_once_together_they_would_not() {
        let mut ledger = SpaceLedger::new(0);
        let free = 100;
        let a = ledger.try_promise(40, free).unwrap();
        let b = ledger.try_promise(40, free).unwrap();
        let refused = ledger.try_promise(40, free).unwrap_err();
        assert_eq!(
            refused,
            Shortfall {
                needed: 40,
                available: 100,
                promised: 80,
                transfers: 2,
                keep_free: 0
            }
        );
        assert!(refused
            .to_string()
            .contains("80 are promised to 2 transfer(s)"));
        // a writes 30 bytes: the disk has 70 free, 50 of them promised.
        ledger.wrote(a, 30);
        assert_eq!(ledger.outstanding(), 50);
        assert!(ledger.try_promise(21, 70).is_err());
        let c = ledger.try_promise(20, 70).unwrap();
        ledger.release(b);
        ledger.release(c);
        ledger.release(a);
        assert_eq!((ledger.outstanding(), ledger.transfers()), (0, 0));
    }

    #[test]
    fn keep_free_is_never_promised() {
        let mut ledger = SpaceLedger::new(10);
        assert!(ledger.try_promise(91, 100).is_err());
        let e = ledger.try_promise(95, 100).unwrap_err();
        assert!(e.to_string().contains("10 are kept free"), "{e}");
        ledger.try_promise(90, 100).unwrap();
        // Over-writing a promise (a file grew) never makes it negative.
        let id = ledger.try_promise(0, 10).unwrap();
        ledger.wrote(id, 5);
        assert_eq!(ledger.outstanding(), 90);
    }

    proptest! {
        /// Whatever the order of promises, writes and releases, and whatever the disk says:
        /// what is promised and not written never exceeds the free space a promise was made
        /// against, so transfers that were admitted can all finish on a disk nobody else fills.
        #[test]
        fn admitted_transfers_always_fit_together(
            ops in proptest::collection::vec((0u8..3, 0u64..1000, 0usize..8), 1..200),
        ) {
            let capacity = 5_000u64;
            let mut ledger = SpaceLedger::new(100);
            let mut used = 0u64; // bytes on the disk, all written by admitted transfers
            let mut live: Vec<(PromiseId, u64, u64)> = Vec::new(); // id, needed, written
            for (op, n, pick) in ops {
                match op {
                    0 => {
                        if let Ok(id) = ledger.try_promise(n, capacity - used) {
                            live.push((id, n, 0));
                        }
                    }
                    1 if !live.is_empty() => {
                        let i = pick % live.len();
                        let (id, needed, written) = &mut live[i];
                        let step = n.min(*needed - *written);
                        *written += step;
                        used += step;
                        ledger.wrote(*id, step);
                    }
                    2 if !live.is_empty() => {
                        let (id, _, _) = live.remove(pick % live.len());
                        ledger.release(id);
                    }
                    _ => {}
                }
                let remaining: u64 = live.iter().map(|(_, n, w)| n - w).sum();
                prop_assert_eq!(ledger.outstanding(), remaining);
                prop_assert!(used + remaining + 100 <= capacity, "{} + {} > {}", used, remaining, capacity);
            }
        }
    }
}
