//! Admission of transfers into one receiver: at most `limit` run at once, the others wait
//! in arrival order, and a sender is told its place while it waits.
//!
//! **Why the receiver queues instead of refusing.** A receiver at its limit used to refuse
//! with "retry later", and 18 of 50 concurrent senders failed (issue 10 item 4). A limit is
//! right (memory, disk bandwidth and file descriptors per transfer), failing is not. The two
//! ways out were: the sender retries with backoff, or the receiver queues. Queueing wins on
//! every count that matters here:
//! - a slot is handed over the moment it frees, instead of sitting idle until some sender's
//!   backoff ends (which also keeps a read-only window's final pass as short as possible);
//! - first come, first served: no sender starves behind luckier retry timings;
//! - the sender learns its place (`Queued{position}`) rather than guessing, and prints it;
//! - no handshake, manifest upload and refusal per retry.
//!
//! The cost is a connection per waiting sender. It is small and bounded: a waiting
//! transfer's manifest sits unread in quinn's flow-controlled stream buffer, QUIC
//! keep-alives (3 s) keep the connection up however long it waits, and the queue itself is
//! capped ([`Admissions::new`]'s `max_queued`: beyond it senders are refused as busy). A
//! sender stops waiting after its own deadline (`shardsend --wait-for`).
//!
//! Sans-io: this is the bookkeeping only (tickets, positions, the observed maximum of
//! transfers active at once); [`crate::recv`] wraps it in a mutex and wakes waiters.

use std::collections::VecDeque;

/// A waiting transfer's place in the queue.
pub type Ticket = u64;

/// What [`Admissions::poll`] decided for a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The transfer may run; it must call [`Admissions::release`] when it ends.
    Admitted,
    /// Still waiting; 1 is the next to be admitted.
    Waiting { position: u64 },
}

/// Why a transfer could not even wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub queued: u64,
}

/// Transfers running and waiting in one receiver.
#[derive(Debug, Clone)]
pub struct Admissions {
    limit: u64,
    max_queued: u64,
    active: u64,
    waiting: VecDeque<Ticket>,
    next_ticket: Ticket,
    max_active: u64,
}

impl Admissions {
    /// At most `limit` (at least 1) transfers active; at most `max_queued` waiting.
    pub fn new(limit: u64, max_queued: u64) -> Self {
        Admissions {
            limit: limit.max(1),
            max_queued,
            active: 0,
            waiting: VecDeque::new(),
            next_ticket: 0,
            max_active: 0,
        }
    }

    /// Joins the queue.
    pub fn enqueue(&mut self) -> Result<Ticket, QueueFull> {
        if self.waiting.len() as u64 >= self.max_queued {
            return Err(QueueFull {
                queued: self.waiting.len() as u64,
            });
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back(ticket);
        Ok(ticket)
    }

    /// Admits `ticket` if it is first in line and a slot is free; else says where it
    /// stands. A ticket that is not waiting (admitted or cancelled already) gets
    /// `Waiting{position: 0}` and nothing changes: callers poll only their own live ticket.
    pub fn poll(&mut self, ticket: Ticket) -> Admission {
        let Some(index) = self.waiting.iter().position(|t| *t == ticket) else {
            return Admission::Waiting { position: 0 };
        };
        if index == 0 && self.active < self.limit {
            self.waiting.pop_front();
            self.active += 1;
            self.max_active = self.max_active.max(self.active);
            return Admission::Admitted;
        }
        Admission::Waiting {
            position: index as u64 + 1,
        }
    }

    /// Leaves the queue without running (the sender went away). Returns whether it was
    /// waiting.
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        match self.waiting.iter().position(|t| *t == ticket) {
            Some(i) => {
                self.waiting.remove(i);
                true
            }
            None => false,
        }
    }

    /// An admitted transfer ended.
    pub fn release(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn active(&self) -> u64 {
        self.active
    }

    pub fn queued(&self) -> u64 {
        self.waiting.len() as u64
    }

    /// The most transfers ever active at once (never above the limit).
    pub fn max_active(&self) -> u64 {
        self.max_active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_come_first_served_within_the_limit() {
        let mut a = Admissions::new(2, 10);
        let t: Vec<Ticket> = (0..4).map(|_| a.enqueue().unwrap()).collect();
        // The third may not jump the queue even when polled first.
        assert_eq!(a.poll(t[2]), Admission::Waiting { position: 3 });
        assert_eq!(a.poll(t[0]), Admission::Admitted);
        assert_eq!(a.poll(t[1]), Admission::Admitted);
        assert_eq!(a.poll(t[2]), Admission::Waiting { position: 1 });
        assert_eq!(a.poll(t[3]), Admission::Waiting { position: 2 });
        a.release();
        assert_eq!(a.poll(t[3]), Admission::Waiting { position: 2 });
        assert_eq!(a.poll(t[2]), Admission::Admitted);
        assert!(a.cancel(t[3]));
        assert!(!a.cancel(t[3]));
        assert_eq!((a.active(), a.queued(), a.max_active()), (2, 0, 2));
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut a = Admissions::new(1, 2);
        a.enqueue().unwrap();
        a.enqueue().unwrap();
        assert_eq!(a.enqueue(), Err(QueueFull { queued: 2 }));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive,
        Poll(usize),
        Cancel(usize),
        Finish(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Arrive),
            any::<usize>().prop_map(Op::Poll),
            any::<usize>().prop_map(Op::Cancel),
            any::<usize>().prop_map(Op::Finish),
        ]
    }

    proptest! {
        /// Whatever the interleaving: never more than `limit` active, admissions in arrival
        /// order, positions count the waiting tickets ahead.
        #[test]
        fn limit_and_order_hold(limit in 1u64..5, ops in proptest::collection::vec(op(), 0..200)) {
            let mut a = Admissions::new(limit, 1000);
            let mut waiting: Vec<Ticket> = Vec::new();
            let mut running: Vec<Ticket> = Vec::new();
            let mut admitted_order: Vec<Ticket> = Vec::new();
            for op in ops {
                match op {
                    Op::Arrive => waiting.push(a.enqueue().unwrap()),
                    Op::Poll(i) if !waiting.is_empty() => {
                        let t = waiting[i % waiting.len()];
                        match a.poll(t) {
                            Admission::Admitted => {
                                prop_assert_eq!(waiting[0], t, "only the head is admitted");
                                waiting.remove(0);
                                running.push(t);
                                admitted_order.push(t);
                            }
                            Admission::Waiting { position } => {
                                let ahead = waiting.iter().position(|w| *w == t).unwrap() as u64;
                                prop_assert_eq!(position, ahead + 1);
                            }
                        }
                    }
                    Op::Cancel(i) if !waiting.is_empty() => {
                        let t = waiting.remove(i % waiting.len());
                        prop_assert!(a.cancel(t));
                    }
                    Op::Finish(i) if !running.is_empty() => {
                        running.remove(i % running.len());
                        a.release();
                    }
                    _ => {}
                }
                prop_assert_eq!(a.active(), running.len() as u64);
                prop_assert!(a.active() <= limit);
                prop_assert!(a.max_active() <= limit);
                prop_assert_eq!(a.queued(), waiting.len() as u64);
            }
            prop_assert!(admitted_order.windows(2).all(|w| w[0] < w[1]), "FIFO");
        }
    }
}
