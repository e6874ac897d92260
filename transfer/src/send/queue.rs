//! The chunks waiting to be encoded, shared by the data streams' encoders: chunks the
//! receiver asked for again first, then the plan in order.
//!
//! Only a queue: when the sending is done is the session's business
//! ([`super::session::SenderSession`] counts what it enqueued against what was written).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A chunk: (entry index, chunk index).
pub type ChunkId = (u64, u64);

/// Work shared by the encoders.
pub struct WorkQueue {
    state: Mutex<QueueState>,
    wake: Notify,
}

struct QueueState {
    plan: VecDeque<ChunkId>,
    retries: VecDeque<ChunkId>,
    closed: bool,
}

impl Default for WorkQueue {
    fn default() -> Self {
        WorkQueue {
            state: Mutex::new(QueueState {
                plan: VecDeque::new(),
                retries: VecDeque::new(),
                closed: false,
            }),
            wake: Notify::new(),
        }
    }
}

impl WorkQueue {
    /// The next chunk to encode; `None` once the queue is closed.
    pub async fn next(&self) -> Option<ChunkId> {
        loop {
            let woken = self.wake.notified();
            {
                let mut s = self.state.lock().ok()?;
                if s.closed {
                    return None;
                }
                if let Some(item) = s.retries.pop_front().or_else(|| s.plan.pop_front()) {
                    return Some(item);
                }
            }
            woken.await;
        }
    }

    /// Appends chunks to send in order.
    pub fn extend(&self, chunks: impl IntoIterator<Item = ChunkId>) {
        if let Ok(mut s) = self.state.lock() {
            s.plan.extend(chunks);
        }
        self.wake.notify_waiters();
    }

    /// Puts a chunk the receiver asked for again ahead of the plan.
    pub fn retry(&self, item: ChunkId) {
        if let Ok(mut s) = self.state.lock() {
            s.retries.push_back(item);
        }
        self.wake.notify_waiters();
    }

    /// Whether no chunk waits to be encoded (the encoders may still hold the last ones).
    pub fn is_empty(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.plan.is_empty() && s.retries.is_empty())
            .unwrap_or(true)
    }

    /// Stops every encoder at its next `next()`.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_come_first_and_close_stops_waiters() {
        let q = std::sync::Arc::new(WorkQueue::default());
        assert!(q.is_empty());
        q.extend([(0, 0), (0, 1)]);
        q.retry((5, 5));
        assert!(!q.is_empty());
        assert_eq!(q.next().await, Some((5, 5)));
        assert_eq!(q.next().await, Some((0, 0)));
        assert_eq!(q.next().await, Some((0, 1)));
        assert!(q.is_empty());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.extend([(1, 0)]);
        assert_eq!(waiter.await.unwrap(), Some((1, 0)));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
