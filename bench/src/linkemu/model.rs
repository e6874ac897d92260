//! The link model: what happens to one packet offered to one direction of the emulated link.
//!
//! Pure and deterministic (a seeded RNG, time passed in as nanoseconds since the link
//! started), so the rules are unit-tested on a simulated clock while the forwarder
//! (`forward.rs`) only moves bytes between TUN devices at the times this model says.
//!
//! The order of the rules mirrors a real path:
//! 1. **cut**: while the link is down (schedule or signal, decided by the caller) every
//!    packet is lost;
//! 2. **loss**: random (Bernoulli) and/or Gilbert–Elliott bursty loss, applied on arrival
//!    like netem's, so a lost packet uses no link time;
//! 3. **rate**: the packet is serialised at RATE behind those already queued; the queue is
//!    drop-tail and measured in time (`queue`: the longest wait a packet may face), which is
//!    how routers are sized (a buffer of N ms at line rate);
//! 4. **delay + jitter**: one-way propagation delay plus a uniform extra in `[0, jitter]`;
//!    jitter never reorders (a packet is never released before the one ahead of it), so
//!    reordering is its own knob;
//! 5. **reorder**: with probability `reorder`, a packet is held `reorder_gap` longer and
//!    the packets behind it overtake it.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Nanoseconds since the link started: the model's clock.
pub type Nanos = u64;

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Gilbert–Elliott two-state loss: a good and a bad state, switched per packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from good to bad, per packet.
    pub p_good_to_bad: f64,
    /// Probability of moving from bad to good, per packet (mean burst = 1 / this).
    pub p_bad_to_good: f64,
    /// Loss probability while bad (1 - h in the usual notation).
    pub loss_bad: f64,
    /// Loss probability while good (1 - k).
    pub loss_good: f64,
}

impl GilbertElliott {
    /// Long-run loss rate: the stationary share of each state times its loss.
    pub fn mean_loss(&self) -> f64 {
        let total = self.p_good_to_bad + self.p_bad_to_good;
        if total == 0.0 {
            return self.loss_good;
        }
        let bad_share = self.p_good_to_bad / total;
        bad_share * self.loss_bad + (1.0 - bad_share) * self.loss_good
    }
}

/// One direction's link parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Line rate in bits per second; `None` forwards as fast as packets come.
    pub rate_bps: Option<u64>,
    /// Longest time a packet may wait for the line (drop-tail queue length in time).
    pub queue: Nanos,
    /// One-way propagation delay.
    pub delay: Nanos,
    /// Uniform extra delay in `[0, jitter]`, order-preserving.
    pub jitter: Nanos,
    /// Random loss probability per packet.
    pub loss: f64,
    /// Bursty loss, applied after (and independently of) random loss.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Probability that a packet is held back and overtaken.
    pub reorder: f64,
    /// How long a reordered packet is held beyond its normal release.
    pub reorder_gap: Nanos,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            rate_bps: None,
            queue: 50 * 1_000_000,
            delay: 0,
            jitter: 0,
            loss: 0.0,
            gilbert_elliott: None,
            reorder: 0.0,
            reorder_gap: 1_000_000,
        }
    }
}

/// Why a packet did not make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Down,
    RandomLoss,
    BurstLoss,
    QueueFull,
}

/// What the link does with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the packet to the far side at this time.
    Deliver {
        at: Nanos,
        reordered: bool,
    },
    Drop(Drop),
}

/// State of one direction of the link.
#[derive(Debug)]
pub struct LinkModel {
    params: LinkParams,
    rng: SmallRng,
    /// When the line finishes serialising the last accepted packet.
    line_free_at: Nanos,
    /// Release time of the last in-order packet (jitter must not reorder).
    last_release: Nanos,
    ge_bad: bool,
}

impl LinkModel {
    pub fn new(params: LinkParams, seed: u64) -> Self {
        LinkModel {
            params,
            rng: SmallRng::seed_from_u64(seed),
            line_free_at: 0,
            last_release: 0,
            ge_bad: false,
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Time the line needs to serialise `len` bytes.
    pub fn serialisation(&self, len: u64) -> Nanos {
        match self.params.rate_bps {
            Some(rate) if rate > 0 => {
                ((len as u128 * 8 * NANOS_PER_SEC as u128).div_ceil(rate as u128)) as u64
            }
            _ => 0,
        }
    }

    /// How long a packet arriving at `now` would wait before its serialisation starts.
    pub fn backlog(&self, now: Nanos) -> Nanos {
        self.line_free_at.saturating_sub(now)
    }

    /// Offers a packet of `len` bytes arriving at `now`; `down` says whether the link is cut.
    pub fn offer(&mut self, now: Nanos, len: u64, down: bool) -> Verdict {
        if down {
            return Verdict::Drop(Drop::Down);
        }
        if self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss.min(1.0)) {
            return Verdict::Drop(Drop::RandomLoss);
        }
        if let Some(ge) = self.params.gilbert_elliott {
            // Transition first, then lose according to the state this packet sees.
            let switch = if self.ge_bad {
                ge.p_bad_to_good
            } else {
                ge.p_good_to_bad
            };
            if self.rng.gen_bool(switch.clamp(0.0, 1.0)) {
                self.ge_bad = !self.ge_bad;
            }
            let loss = if self.ge_bad {
                ge.loss_bad
            } else {
                ge.loss_good
            };
            if loss > 0.0 && self.rng.gen_bool(loss.min(1.0)) {
                return Verdict::Drop(Drop::BurstLoss);
            }
        }
        let tx = self.serialisation(len);
        let wait = self.backlog(now);
        // An empty line always takes a packet, however large; otherwise the wait it would
        // face must fit in the queue.
        if wait > 0 && wait + tx > self.params.queue {
            return Verdict::Drop(Drop::QueueFull);
        }
        self.line_free_at = now.max(self.line_free_at) + tx;
        let jitter = if self.params.jitter > 0 {
            self.rng.gen_range(0..=self.params.jitter)
        } else {
            0
        };
        let natural = self.line_free_at + self.params.delay + jitter;
        if self.params.reorder > 0.0 && self.rng.gen_bool(self.params.reorder.min(1.0)) {
            // Held back: not part of the in-order sequence, so later packets pass it.
            return Verdict::Deliver {
                at: natural.max(self.last_release) + self.params.reorder_gap,
                reordered: true,
            };
        }
        self.last_release = natural.max(self.last_release);
        Verdict::Deliver {
            at: self.last_release,
            reordered: false,
        }
    }
}

/// Planned cuts of the link: `(start, length)` pairs, times since the link started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutSchedule {
    cuts: Vec<(Nanos, Nanos)>,
}

impl CutSchedule {
    pub fn new(mut cuts: Vec<(Nanos, Nanos)>) -> Self {
        cuts.sort_unstable();
        CutSchedule { cuts }
    }

    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// Whether a planned cut covers `now` (start inclusive, end exclusive).
    pub fn is_down(&self, now: Nanos) -> bool {
        self.cuts
            .iter()
            .any(|&(start, len)| now >= start && now < start.saturating_add(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn link(params: LinkParams) -> LinkModel {
        LinkModel::new(params, 7)
    }

    fn deliver_at(v: Verdict) -> Nanos {
        match v {
            Verdict::Deliver { at, .. } => at,
            Verdict::Drop(d) => panic!("dropped: {d:?}"),
        }
    }

    #[test]
    fn unlimited_link_without_delay_delivers_at_once() {
        let mut l = link(LinkParams::default());
        assert_eq!(deliver_at(l.offer(5 * MS, 1500, false)), 5 * MS);
        assert_eq!(deliver_at(l.offer(5 * MS, 1500, false)), 5 * MS);
    }

    #[test]
    fn rate_serialises_back_to_back_packets() {
        // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms on the line.
        let mut l = link(LinkParams {
            rate_bps: Some(12_000_000),
            delay: 10 * MS,
            ..LinkParams::default()
        });
        assert_eq!(l.serialisation(1500), MS);
        let times: Vec<Nanos> = (0..4)
            .map(|_| deliver_at(l.offer(0, 1500, false)))
            .collect();
        assert_eq!(times, vec![11 * MS, 12 * MS, 13 * MS, 14 * MS]);
        // After the line drained, a new packet goes straight through.
        assert_eq!(deliver_at(l.offer(100 * MS, 1500, false)), 111 * MS);
    }

    #[test]
    fn drop_tail_queue_is_measured_in_time() {
        // 1 ms per packet, queue of 5 ms: a burst of 10 keeps the first 5 (5 ms of line
        // time, the one being sent included) and drops the rest.
        let mut l = link(LinkParams {
            rate_bps: Some(12_000_000),
            queue: 5 * MS,
            ..LinkParams::default()
        });
        let verdicts: Vec<Verdict> = (0..10).map(|_| l.offer(0, 1500, false)).collect();
        let kept = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver { .. }))
            .count();
        assert_eq!(kept, 5);
        assert!(verdicts[5..]
            .iter()
            .all(|v| *v == Verdict::Drop(Drop::QueueFull)));
        // Once the queue drained by 1 ms, one more fits.
        assert!(matches!(l.offer(MS, 1500, false), Verdict::Deliver { .. }));
        assert_eq!(l.offer(MS, 1500, false), Verdict::Drop(Drop::QueueFull));
    }

    #[test]
    fn a_cut_link_drops_everything() {
        let mut l = link(LinkParams::default());
        for i in 0..100 {
            assert_eq!(l.offer(i, 100, true), Verdict::Drop(Drop::Down));
        }
        assert!(matches!(l.offer(100, 100, false), Verdict::Deliver { .. }));
    }

    fn loss_share(l: &mut LinkModel, n: u32) -> f64 {
        let lost = (0..n)
            .filter(|_| matches!(l.offer(0, 100, false), Verdict::Drop(_)))
            .count();
        lost as f64 / n as f64
    }

    #[test]
    fn random_loss_matches_its_probability() {
        let mut l = link(LinkParams {
            loss: 0.01,
            ..LinkParams::default()
        });
        let share = loss_share(&mut l, 200_000);
        assert!((0.008..0.012).contains(&share), "{share}");
        let mut none = link(LinkParams::default());
        assert_eq!(loss_share(&mut none, 10_000), 0.0);
        let mut all = link(LinkParams {
            loss: 1.0,
            ..LinkParams::default()
        });
        assert_eq!(loss_share(&mut all, 1_000), 1.0);
    }

    #[test]
    fn gilbert_elliott_loss_comes_in_bursts_at_its_mean_rate() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.0025,
            p_bad_to_good: 0.25,
            loss_bad: 1.0,
            loss_good: 0.0,
        };
        assert!((ge.mean_loss() - 0.0099).abs() < 0.0001);
        let mut l = link(LinkParams {
            gilbert_elliott: Some(ge),
            ..LinkParams::default()
        });
        let lost: Vec<bool> = (0..400_000)
            .map(|_| matches!(l.offer(0, 100, false), Verdict::Drop(Drop::BurstLoss)))
            .collect();
        let share = lost.iter().filter(|&&x| x).count() as f64 / lost.len() as f64;
        assert!((0.008..0.012).contains(&share), "{share}");
        // Mean burst length 1 / 0.25 = 4 packets, where random loss at the same rate would
        // give bursts of ~1.01.
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count();
        let mean_burst = lost.iter().filter(|&&x| x).count() as f64 / bursts as f64;
        assert!((3.5..4.5).contains(&mean_burst), "{mean_burst}");
    }

    #[test]
    fn jitter_delays_but_never_reorders() {
        let mut l = link(LinkParams {
            delay: 10 * MS,
            jitter: 5 * MS,
            ..LinkParams::default()
        });
        let mut last = 0;
        let mut spread = (Nanos::MAX, 0);
        for i in 0..10_000u64 {
            let now = i * 10_000; // 10 us apart, much closer than the jitter
            let at = deliver_at(l.offer(now, 100, false));
            assert!(at >= last, "reordered by jitter");
            assert!(at >= now + 10 * MS);
            let extra = at - now - 10 * MS;
            spread = (spread.0.min(extra), spread.1.max(extra));
            last = at;
        }
        // Jitter was really applied, within its bound plus the order-keeping wait.
        assert!(spread.1 > MS, "{spread:?}");
    }

    #[test]
    fn reordered_packets_are_overtaken() {
        let mut l = link(LinkParams {
            delay: 10 * MS,
            reorder: 0.1,
            reorder_gap: 2 * MS,
            ..LinkParams::default()
        });
        let mut releases = Vec::new();
        let mut reordered = 0;
        for i in 0..10_000u64 {
            if let Verdict::Deliver { at, reordered: r } = l.offer(i * 100_000, 100, false) {
                reordered += r as u32;
                releases.push(at);
            }
        }
        assert!((800..1200).contains(&reordered), "{reordered}");
        // Some packet is released after a packet that was offered later: real reordering.
        let overtaken = releases.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(overtaken >= 800, "{overtaken}");
    }

    #[test]
    fn cut_schedule_covers_its_windows_only() {
        let s = CutSchedule::new(vec![(10 * MS, 5 * MS), (2 * MS, MS)]);
        assert!(!s.is_down(0));
        assert!(s.is_down(2 * MS));
        assert!(!s.is_down(3 * MS));
        assert!(s.is_down(10 * MS));
        assert!(s.is_down(15 * MS - 1));
        assert!(!s.is_down(15 * MS));
        assert!(!CutSchedule::default().is_down(0));
    }

    #[test]
    fn same_seed_same_fate() {
        let params = LinkParams {
            loss: 0.3,
            jitter: MS,
            ..LinkParams::default()
        };
        let mut a = LinkModel::new(params.clone(), 42);
        let mut b = LinkModel::new(params, 42);
        for i in 0..1000 {
            assert_eq!(a.offer(i, 100, false), b.offer(i, 100, false));
        }
    }
}
