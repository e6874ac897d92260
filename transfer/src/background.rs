//! `--congestion background`: a delay-based "scavenger" congestion controller for quinn, so a
//! migration yields to users' traffic on a shared link.
//!
//! Why: a migration is background traffic on links that users' pushes and clones also use.
//! quinn's BBR keeps a shared 100 Mbit link full, and measured against one kernel TCP flow
//! (BBR) it left that flow 17% of the link (bench/RESULTS.md, WAN fairness); Cubic and
//! NewReno yield, but collapse under random loss (3% of the link at 1% loss). This controller
//! is in the spirit of LEDBAT (RFC 6817) and LEDBAT++: it reads queueing delay (latest RTT
//! minus the path's minimum RTT) and
//! - grows while the queue it sees is below [`BackgroundConfig::target`] and shrinks above it,
//!   in proportion to the distance (`window += gain * off_target * bytes_acked`), so a
//!   competing flow that builds a queue makes it back off to its minimum window;
//! - treats a loss event as a mild signal (window x [`LOSS_DECREASE`]) rather than Cubic's
//!   x0.7 on each event: random loss on a long path no longer collapses the window, and the
//!   delay signal is what keeps the queue short. Persistent congestion resets to the minimum;
//! - starts with slow start (doubling per RTT) until the queue reaches half the target or a
//!   loss happens.
//!
//! The rule is pure ([`DelayWindow`], tested with made-up RTTs); [`Background`] adapts it to
//! quinn's `Controller` trait.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

use crate::path_memory::{jump_at_first_sample, Ending, Resume};

/// Window multiplier on a loss event (not persistent congestion).
pub const LOSS_DECREASE: f64 = 0.9;

/// Tuning of the background controller.
#[derive(Debug, Clone)]
pub struct BackgroundConfig {
    /// Queueing delay the controller tolerates; above it, it backs off.
    pub target: Duration,
    /// Fraction of the acknowledged bytes by which the window moves per ack at full off-target
    /// (1/4: at most +25% or -25% per round trip).
    pub gain: f64,
    /// Window at start, in datagrams.
    pub initial_packets: u64,
    /// Smallest window, in datagrams.
    pub min_packets: u64,
    /// The path's memory from an earlier transfer ([`crate::path_memory`]): slow start jumps
    /// to half its window at the first RTT sample, if that sample says it is the same path.
    pub resume: Option<Resume>,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        BackgroundConfig {
            target: Duration::from_millis(25),
            gain: 0.25,
            initial_packets: 10,
            min_packets: 2,
            resume: None,
        }
    }
}

/// The window rule, fed with RTT samples; no quinn types, no clock of its own.
#[derive(Debug, Clone)]
pub struct DelayWindow {
    config: BackgroundConfig,
    mtu: u64,
    window: u64,
    slow_start: bool,
    /// When the last decrease happened: losses of packets sent before it belong to the same
    /// congestion event (quinn reports each loss; one event per round trip is the rule).
    recovery_start: Option<Instant>,
    /// Smallest "latest RTT" of the current and previous filter intervals: one delayed ack
    /// should not count as a queue.
    filter: RttFilter,
    /// The path's minimum RTT so far.
    min_rtt: Option<Duration>,
    /// The path's memory, until the first RTT sample uses or refuses it.
    resume: Option<Resume>,
    /// The window slow start jumped to from it.
    jumped: Option<u64>,
    /// Bytes acknowledged while the sender had data: a window that has carried a few of
    /// itself is the path's, not a start's.
    acked: u64,
}

#[derive(Debug, Clone)]
struct RttFilter {
    interval_start: Option<Instant>,
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl RttFilter {
    fn update(&mut self, now: Instant, sample: Duration, interval: Duration) -> Duration {
        match self.interval_start {
            Some(start) if now.saturating_duration_since(start) < interval => {}
            _ => {
                self.interval_start = Some(now);
                self.previous = self.current.take();
            }
        }
        self.current = Some(self.current.map_or(sample, |c| c.min(sample)));
        self.previous
            .map_or(sample, |p| p.min(sample))
            .min(self.current.unwrap_or(sample))
    }
}

impl DelayWindow {
    pub fn new(config: BackgroundConfig, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        DelayWindow {
            window: config.initial_packets * mtu,
            resume: config.resume,
            config,
            mtu,
            slow_start: true,
            recovery_start: None,
            filter: RttFilter {
                interval_start: None,
                current: None,
                previous: None,
            },
            min_rtt: None,
            jumped: None,
            acked: 0,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    fn min_window(&self) -> u64 {
        self.config.min_packets * self.mtu
    }

    /// Every RTT sample, `min` the path's minimum so far (even while the sender is short of
    /// data). The first one decides careful resume's jump ([`crate::path_memory`]): still in
    /// slow start, the window rises to half the remembered one.
    pub fn on_rtt_sample(&mut self, min: Duration) {
        self.min_rtt = Some(min);
        let Some(resume) = self.resume.take() else {
            return;
        };
        if let Some(window) =
            jump_at_first_sample(resume, min, self.window, self.slow_start, "background")
        {
            // The jump stands for slow start: from half the remembered window the delay rule
            // grows at most 25% a round trip (doubling from there overfilled the queue another
            // lane of the migration kept: twice the drops).
            self.window = window;
            self.jumped = Some(window);
            self.slow_start = false;
        }
    }

    /// What the path's memory should keep of this connection: its window (the BDP and the
    /// queue it tolerates). Converged once out of slow start with two windows acknowledged
    /// since: a short transfer that jumped (a final pass) must not halve the memory.
    pub fn ending(&self) -> Option<Ending> {
        Some(Ending {
            window: self.window,
            min_rtt: self.min_rtt?,
            converged: !self.slow_start && self.acked >= 2 * self.window,
            jumped: self.jumped,
        })
    }

    /// `bytes` newly acknowledged; `latest` is the last RTT sample, `min` the path's minimum.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, latest: Duration, min: Duration) {
        self.acked += bytes;
        // Filter over a quarter of the base RTT (at least 2 ms): short enough to follow the
        // queue, long enough that an ack delayed by the peer is outvoted.
        let interval = (min / 4).max(Duration::from_millis(2));
        let current = self.filter.update(now, latest, interval);
        let queue = current.saturating_sub(min).as_secs_f64();
        let target = self.config.target.as_secs_f64();
        if self.slow_start {
            if queue < target / 2.0 {
                self.window += bytes;
                return;
            }
            self.slow_start = false;
            tracing::debug!(
                window = self.window,
                queue_ms = queue * 1e3,
                "background: slow start ends"
            );
        }
        let off_target = ((target - queue) / target).clamp(-1.0, 1.0);
        let change = self.config.gain * off_target * bytes as f64;
        let next = (self.window as f64 + change).max(self.min_window() as f64);
        self.window = next as u64;
    }

    /// A packet sent at `sent` was lost (reported at `now`): a mild decrease once per
    /// congestion event, or back to the minimum on persistent congestion.
    pub fn on_loss(&mut self, now: Instant, sent: Instant, persistent: bool) {
        if !persistent && self.recovery_start.is_some_and(|start| sent <= start) {
            return;
        }
        self.recovery_start = Some(now);
        tracing::debug!(
            window = self.window,
            persistent,
            slow_start = self.slow_start,
            "background: congestion event"
        );
        self.slow_start = false;
        self.window = if persistent {
            self.min_window()
        } else {
            ((self.window as f64 * LOSS_DECREASE) as u64).max(self.min_window())
        };
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
        self.window = self.window.max(self.min_window());
    }
}

/// quinn factory for [`Background`].
#[derive(Debug, Clone, Default)]
pub struct BackgroundFactory {
    pub config: BackgroundConfig,
}

impl ControllerFactory for BackgroundFactory {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Background {
            rule: DelayWindow::new(self.config.clone(), current_mtu),
            initial: self.config.initial_packets * u64::from(current_mtu),
        })
    }
}

/// The background controller as quinn sees it.
#[derive(Debug, Clone)]
pub struct Background {
    rule: DelayWindow,
    initial: u64,
}

impl Background {
    /// What the path's memory should keep of this connection.
    pub fn ending(&self) -> Option<Ending> {
        self.rule.ending()
    }
}

impl Controller for Background {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        // This packet's own round trip (quinn's estimator keeps only a smoothed value).
        let sample = now.saturating_duration_since(sent);
        let min = rtt.min().min(sample);
        self.rule.on_rtt_sample(min);
        if app_limited {
            // A sender short of data learns nothing about the path's capacity.
            return;
        }
        self.rule.on_ack(now, bytes, sample, min);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.rule.on_loss(now, sent, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.rule.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.rule.window()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const MTU: u16 = 1200;

    /// Acks one window's worth of bytes in `n` acks spread over one RTT, each seeing `rtt`.
    fn one_round(w: &mut DelayWindow, now: &mut Instant, rtt: Duration, base: Duration) {
        let n = 20;
        let per = (w.window() / n).max(1);
        for _ in 0..n {
            *now += rtt / n as u32;
            w.on_ack(*now, per, rtt, base);
        }
    }

    fn remembering(window: u64, rtt: Duration) -> BackgroundConfig {
        BackgroundConfig {
            resume: Some(Resume {
                window,
                min_rtt: rtt,
            }),
            ..BackgroundConfig::default()
        }
    }

    #[test]
    fn slow_start_jumps_to_half_a_remembered_window_of_the_same_path() {
        let mut w = DelayWindow::new(remembering(1_000_000, 50 * MS), MTU);
        w.on_rtt_sample(52 * MS);
        assert_eq!(w.window(), 500_000);
        assert_eq!(
            w.ending().map(|e| (e.jumped, e.converged)),
            Some((Some(500_000), false))
        );
        // Used once: later samples change nothing.
        w.on_rtt_sample(40 * MS);
        assert_eq!(w.window(), 500_000);
        // The jump stands for slow start: from there the delay rule grows at most 25% a
        // round trip, never doubling into a queue another flow keeps.
        assert!(!w.in_slow_start());
        let mut now = Instant::now();
        one_round(&mut w, &mut now, 52 * MS, 50 * MS);
        assert!(
            w.window() > 500_000 && w.window() <= 625_000,
            "{}",
            w.window()
        );
        // Not the path's window yet (a final pass ends about here), until it has carried two
        // of itself.
        assert_eq!(w.ending().map(|e| e.converged), Some(false));
        one_round(&mut w, &mut now, 52 * MS, 50 * MS);
        one_round(&mut w, &mut now, 52 * MS, 50 * MS);
        assert_eq!(w.ending().map(|e| e.converged), Some(true));
    }

    #[test]
    fn a_memory_of_a_longer_path_or_after_slow_start_is_not_used() {
        let cold = u64::from(MTU) * BackgroundConfig::default().initial_packets;
        let mut w = DelayWindow::new(remembering(1_000_000, 150 * MS), MTU);
        w.on_rtt_sample(50 * MS);
        assert_eq!(w.window(), cold);
        assert_eq!(w.ending().and_then(|e| e.jumped), None);
        // A loss ends slow start before any RTT sample (a lost first flight).
        let mut w = DelayWindow::new(remembering(1_000_000, 50 * MS), MTU);
        let now = Instant::now();
        w.on_loss(now, now, false);
        w.on_rtt_sample(50 * MS);
        assert!(w.window() < cold, "{}", w.window());
    }

    #[test]
    fn slow_start_doubles_until_the_queue_grows() {
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        let start = w.window();
        one_round(&mut w, &mut now, 50 * MS, 50 * MS);
        assert!(w.window() >= 2 * start - 20 && w.in_slow_start());
        // A queue of 15 ms (over half the 25 ms target) ends slow start.
        for _ in 0..3 {
            one_round(&mut w, &mut now, 65 * MS, 50 * MS);
        }
        assert!(!w.in_slow_start());
    }

    #[test]
    fn grows_below_target_and_backs_off_to_the_minimum_above_it() {
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        w.on_loss(now, now, false); // leave slow start
        let before = w.window();
        for _ in 0..10 {
            one_round(&mut w, &mut now, 55 * MS, 50 * MS);
        }
        let grown = w.window();
        assert!(grown > before * 3, "{before} -> {grown}");
        // A competing flow holds a 60 ms queue: well above the 25 ms target.
        for _ in 0..60 {
            one_round(&mut w, &mut now, 110 * MS, 50 * MS);
        }
        assert_eq!(w.window(), 2 * u64::from(MTU));
    }

    #[test]
    fn random_loss_does_not_collapse_the_window() {
        // One loss event per round trip (1% loss at ~100 packets in flight) and no queue:
        // the window still grows, where Cubic would shrink it every round.
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        w.on_loss(now, now, false);
        let before = w.window();
        for _ in 0..30 {
            one_round(&mut w, &mut now, 50 * MS, 50 * MS);
            w.on_loss(now, now - 10 * MS, false);
        }
        assert!(w.window() > before * 5, "{before} -> {}", w.window());
    }

    #[test]
    fn settles_near_the_target_queue() {
        // A link whose queue grows with the window beyond the BDP: RTT = base + excess/rate.
        let base = 50 * MS;
        let bdp = 100 * u64::from(MTU);
        let rate = bdp as f64 / base.as_secs_f64(); // bytes per second
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        for _ in 0..400 {
            let excess = w.window().saturating_sub(bdp) as f64;
            let rtt = base + Duration::from_secs_f64(excess / rate);
            one_round(&mut w, &mut now, rtt, base);
        }
        let queue = Duration::from_secs_f64(w.window().saturating_sub(bdp) as f64 / rate);
        assert!(w.window() > bdp, "the link is not kept full");
        assert!(queue < 35 * MS, "queue {queue:?}");
    }

    #[test]
    fn losses_of_one_flight_are_one_event() {
        // Regression: quinn reports every lost packet; 30 losses from one burst cut the
        // window 30 times (0.9^30) and a 50 MB transfer ran at 60% of an empty link.
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        for _ in 0..5 {
            one_round(&mut w, &mut now, 50 * MS, 50 * MS);
        }
        let before = w.window();
        let sent = now - 40 * MS;
        for i in 0..30 {
            w.on_loss(now + i * MS / 10, sent, false);
        }
        assert_eq!(w.window(), (before as f64 * LOSS_DECREASE) as u64);
        // A loss of a packet sent after that event is a new event.
        w.on_loss(now + 60 * MS, now + 10 * MS, false);
        assert!(w.window() < (before as f64 * LOSS_DECREASE) as u64);
    }

    #[test]
    fn persistent_congestion_resets_to_the_minimum() {
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let now = Instant::now();
        w.on_loss(now, now, true);
        assert_eq!(w.window(), 2 * u64::from(MTU));
        w.on_mtu_update(1452);
        assert_eq!(w.window(), 2 * 1452);
    }

    #[test]
    fn one_delayed_ack_is_not_a_queue() {
        let mut w = DelayWindow::new(BackgroundConfig::default(), MTU);
        let mut now = Instant::now();
        let base = 50 * MS;
        w.on_ack(now, 1200, base, base);
        now += MS;
        // A 30 ms ack delay on one sample, inside the filter interval: still slow start.
        w.on_ack(now, 1200, base + 30 * MS, base);
        assert!(w.in_slow_start());
    }
}
