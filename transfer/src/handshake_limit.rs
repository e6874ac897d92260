//! Limits on handshakes nobody has authenticated yet: a token bucket per source address,
//! and a cap on handshakes in progress at once.
//!
//! **Why.** `shardrecv` is reachable from every shard host, and a QUIC handshake costs the
//! receiver real work before it knows who is calling: key exchange, a signature with its own
//! key, the client certificate's signature checked against the allow-list. Left alone, a
//! flood of handshakes (a broken script in a loop, a scanner, or worse) turns that work into
//! CPU taken from the transfers that are authorised, whose throughput is what the receiver is
//! for. So before any cryptography:
//! - each source address may fail `rate` handshakes per second, with bursts up to `burst`;
//!   once it has used them up, its attempts are refused at once, which costs one small
//!   packet. Only failed handshakes count: a host running many authorised senders at once
//!   (a migration's source host starts one per repository) is never held back, while an
//!   address whose handshakes keep failing (an unknown key, garbage) is after its burst;
//! - at most `max_in_progress` handshakes run at once, whatever their addresses (a flood from
//!   many addresses); beyond that, an address QUIC has not validated is asked to prove it
//!   (a stateless Retry: spoofed sources never come back), and a validated one is refused.
//!
//! Connections already made are never affected, and a sender refused here is told so and
//! retries like after any failed connect. IPv6 addresses are bucketed by /64, which is what
//! one host usually holds. The table of buckets is bounded ([`MAX_TRACKED`]): full buckets
//! are forgotten first (a forgotten address starts again with a full bucket, which is what
//! it would have anyway).
//!
//! Sans-io: the caller passes the time; `recv` asks [`HandshakeLimiter::admit`] for every
//! incoming connection and reports [`HandshakeLimiter::finished`] when its handshake ends,
//! saying whether it failed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Addresses tracked at most (memory stays bounded whatever the flood).
pub const MAX_TRACKED: usize = 65_536;

/// Default handshakes per second per source address.
pub const DEFAULT_RATE: u32 = 20;
/// Default handshakes in progress at once.
pub const DEFAULT_MAX_IN_PROGRESS: usize = 128;

/// What to do with an incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Run its handshake; report [`HandshakeLimiter::finished`] when it ends.
    Accept,
    /// Ask the address to prove it is real (QUIC Retry) before any work.
    Retry,
    /// Refuse at once (CONNECTION_REFUSED).
    Refuse(Why),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its address used up its handshakes per second.
    AddressRate,
    /// Too many handshakes run at once.
    InProgress,
}

impl Why {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Why::AddressRate => "handshake_rate",
            Why::InProgress => "handshakes_in_progress",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limiter's state.
#[derive(Debug)]
pub struct HandshakeLimiter {
    rate: f64,
    burst: f64,
    max_in_progress: usize,
    in_progress: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

/// The bucket an address counts against: itself (IPv4), its /64 (IPv6).
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl HandshakeLimiter {
    /// `rate` failed handshakes per second per address (bursts of twice that),
    /// `max_in_progress` at once. A rate of 0 turns the per-address limit off.
    pub fn new(rate: u32, max_in_progress: usize) -> HandshakeLimiter {
        HandshakeLimiter {
            rate: f64::from(rate),
            burst: f64::from(rate) * 2.0,
            max_in_progress: max_in_progress.max(1),
            in_progress: 0,
            buckets: HashMap::new(),
        }
    }

    /// Handshakes running now.
    pub fn in_progress(&self) -> usize {
        self.in_progress
    }

    /// Decides for a connection from `ip` arriving at `now`; `validated`: QUIC has proved
    /// the address (a Retry token came back).
    pub fn admit(&mut self, ip: IpAddr, validated: bool, now: Instant) -> Verdict {
        if self.rate > 0.0 && self.tokens(bucket_key(ip), now) < 1.0 {
            return Verdict::Refuse(Why::AddressRate);
        }
        if self.in_progress >= self.max_in_progress {
            return if validated {
                Verdict::Refuse(Why::InProgress)
            } else {
                Verdict::Retry
            };
        }
        self.in_progress += 1;
        Verdict::Accept
    }

    /// A handshake [`admit`](Self::admit) accepted has ended; `failed`: it did not
    /// authenticate a peer, which costs its address a token. Failures that were already in
    /// progress when the bucket ran dry drive it below zero (down to minus the burst), so a
    /// flood that got many handshakes in at once waits longer.
    pub fn finished(&mut self, ip: IpAddr, failed: bool, now: Instant) {
        self.in_progress = self.in_progress.saturating_sub(1);
        if failed && self.rate > 0.0 {
            let burst = self.burst;
            let key = bucket_key(ip);
            self.tokens(key, now);
            if let Some(bucket) = self.buckets.get_mut(&key) {
                bucket.tokens = (bucket.tokens - 1.0).max(-burst);
            }
        }
    }

    /// The tokens of `key`'s bucket now (refilled for the time since it was last seen).
    fn tokens(&mut self, key: IpAddr, now: Instant) -> f64 {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_TRACKED {
            self.forget_full(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        bucket.tokens
    }

    /// Forgets buckets that have refilled (they hold nothing a new bucket would not); if the
    /// table is still full (a flood from more than `MAX_TRACKED` addresses at once), the
    /// fullest half.
    fn forget_full(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        let level =
            |b: &Bucket| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate;
        self.buckets.retain(|_, b| level(b) < burst);
        if self.buckets.len() >= MAX_TRACKED {
            let mut levels: Vec<f64> = self.buckets.values().map(level).collect();
            levels.sort_by(f64::total_cmp);
            let median = levels[levels.len() / 2];
            self.buckets.retain(|_, b| level(b) < median);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Admits one attempt from `ip` and ends its handshake (`failed` or not).
    fn attempt(l: &mut HandshakeLimiter, ip: IpAddr, failed: bool, now: Instant) -> Verdict {
        let v = l.admit(ip, false, now);
        if v == Verdict::Accept {
            l.finished(ip, failed, now);
        }
        v
    }

    #[test]
    fn an_address_may_fail_its_burst_then_its_rate_and_others_are_not_affected() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(10, 1000);
        let flood = ip("127.0.0.2");
        let admitted = (0..100)
            .filter(|_| attempt(&mut l, flood, true, t0) == Verdict::Accept)
            .count();
        assert_eq!(admitted, 20, "the burst is twice the rate");
        assert_eq!(l.admit(flood, false, t0), Verdict::Refuse(Why::AddressRate));
        // Another address is served at once.
        assert_eq!(attempt(&mut l, ip("127.0.0.1"), true, t0), Verdict::Accept);
        // A second later the flooder has 10 more.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..100)
            .filter(|_| attempt(&mut l, flood, true, t1) == Verdict::Accept)
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn authenticated_handshakes_cost_nothing_and_failures_in_flight_cost_more_later() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(10, 1000);
        // A source host starting 500 senders at once, all authorised.
        let host = ip("10.0.0.7");
        for _ in 0..500 {
            assert_eq!(attempt(&mut l, host, false, t0), Verdict::Accept);
        }
        // 60 failing handshakes admitted at once (none had ended): the bucket goes below zero.
        let flood = ip("10.0.0.9");
        for _ in 0..60 {
            assert_eq!(l.admit(flood, false, t0), Verdict::Accept);
        }
        for _ in 0..60 {
            l.finished(flood, true, t0);
        }
        assert_eq!(l.in_progress(), 0);
        // -20 now: refused for 2.1 s, then 1 token.
        let t2 = t0 + Duration::from_millis(2000);
        assert_eq!(l.admit(flood, false, t2), Verdict::Refuse(Why::AddressRate));
        let t3 = t0 + Duration::from_millis(2150);
        assert_eq!(attempt(&mut l, flood, true, t3), Verdict::Accept);
        assert_eq!(l.admit(flood, false, t3), Verdict::Refuse(Why::AddressRate));
    }

    #[test]
    fn too_many_at_once_asks_unproven_addresses_to_retry_and_refuses_proven_ones() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(0, 2);
        assert_eq!(l.admit(ip("10.0.0.1"), false, t0), Verdict::Accept);
        assert_eq!(l.admit(ip("10.0.0.2"), false, t0), Verdict::Accept);
        assert_eq!(l.admit(ip("10.0.0.3"), false, t0), Verdict::Retry);
        assert_eq!(
            l.admit(ip("10.0.0.3"), true, t0),
            Verdict::Refuse(Why::InProgress)
        );
        l.finished(ip("10.0.0.1"), false, t0);
        assert_eq!(l.admit(ip("10.0.0.3"), true, t0), Verdict::Accept);
        assert_eq!(l.in_progress(), 2);
    }

    #[test]
    fn ipv6_hosts_share_their_64_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(1, 100);
        let mut fail = |a: &str| attempt(&mut l, ip(a), true, t0);
        assert_eq!(fail("2001:db8::1"), Verdict::Accept);
        assert_eq!(fail("2001:db8::ffff:2"), Verdict::Accept);
        assert_eq!(
            fail("2001:db8::3"),
            Verdict::Refuse(Why::AddressRate),
            "same /64"
        );
        assert_eq!(fail("2001:db8:0:1::1"), Verdict::Accept);
        assert_eq!(fail("::ffff:192.0.2.1"), Verdict::Accept);
        assert_eq!(fail("192.0.2.1"), Verdict::Accept);
        assert_eq!(fail("192.0.2.1"), Verdict::Refuse(Why::AddressRate));
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_from_many_addresses() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(5, usize::MAX);
        for i in 0..(MAX_TRACKED as u32 * 2) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            attempt(&mut l, a, true, t0);
            assert!(l.buckets.len() <= MAX_TRACKED);
        }
    }
}
