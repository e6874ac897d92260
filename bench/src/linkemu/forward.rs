//! The forwarder: one thread per direction reads packets from one TUN device, asks the
//! [`LinkModel`] what happens to each, holds the survivors in a delay line and writes them to
//! the other TUN device when they are due.
//!
//! Why this shape: per-packet cost is what limits a userspace link at 1 Gbit/s (~85,000
//! full-size packets a second each way), so the loop does one `read` and one `write` per
//! packet, reads in batches before it sleeps, reuses packet buffers, and sleeps in `ppoll`
//! with a nanosecond timeout (timer slack lowered to 1 us) until the next packet is due or
//! one arrives. The delay line is a min-heap on release time, bounded in bytes
//! ([`DELAY_LINE_LIMIT`]) so memory stays bounded whatever the sender does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::model::{CutSchedule, Drop, LinkModel, Nanos, Verdict};

/// Most bytes one direction holds in its delay line (1 Gbit/s x 150 ms is ~19 MB).
pub const DELAY_LINE_LIMIT: u64 = 64 << 20;
/// Packets read before the loop writes what is due again.
const READ_BATCH: usize = 64;
/// Longest sleep, so a stop request is noticed promptly.
const MAX_SLEEP: Nanos = 50_000_000;
/// Largest packet a TUN device hands us (MTU 1500; headroom for a larger MTU).
const PACKET_BUF: usize = 65_536;

/// Counters of one direction, readable while the link runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub lost_random: AtomicU64,
    pub lost_burst: AtomicU64,
    pub lost_down: AtomicU64,
    pub dropped_queue: AtomicU64,
    pub dropped_delay_line: AtomicU64,
    pub reordered: AtomicU64,
    pub write_errors: AtomicU64,
}

/// A snapshot of [`Counters`], for printing and `--json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DirectionStats {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub lost_random: u64,
    pub lost_burst: u64,
    pub lost_down: u64,
    pub dropped_queue: u64,
    pub dropped_delay_line: u64,
    pub reordered: u64,
    pub write_errors: u64,
}

impl Counters {
    pub fn snapshot(&self) -> DirectionStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: g(&self.packets_in),
            bytes_in: g(&self.bytes_in),
            packets_out: g(&self.packets_out),
            bytes_out: g(&self.bytes_out),
            lost_random: g(&self.lost_random),
            lost_burst: g(&self.lost_burst),
            lost_down: g(&self.lost_down),
            dropped_queue: g(&self.dropped_queue),
            dropped_delay_line: g(&self.dropped_delay_line),
            reordered: g(&self.reordered),
            write_errors: g(&self.write_errors),
        }
    }
}

/// What both directions share: the clock origin, the cut state and the stop flag.
#[derive(Debug)]
pub struct Control {
    pub start: Instant,
    pub cuts: CutSchedule,
    /// Set by a signal (SIGUSR1 down, SIGUSR2 up).
    pub down_by_signal: AtomicBool,
    pub stop: AtomicBool,
}

impl Control {
    pub fn new(cuts: CutSchedule) -> Self {
        Control {
            start: Instant::now(),
            cuts,
            down_by_signal: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }

    pub fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    pub fn is_down(&self, now: Nanos) -> bool {
        self.down_by_signal.load(Ordering::Relaxed) || self.cuts.is_down(now)
    }
}

struct Held {
    release: Nanos,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.release, self.seq) == (other.release, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.release, self.seq).cmp(&(other.release, other.seq))
    }
}

/// Writes one packet to the far side's TUN device and counts it.
fn deliver(out_fd: libc::c_int, packet: &[u8], counters: &Counters) {
    // SAFETY: write(2) from a buffer we own, of its length.
    let n = unsafe { libc::write(out_fd, packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        counters.write_errors.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.packets_out.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_out
            .fetch_add(packet.len() as u64, Ordering::Relaxed);
    }
}

/// Moves packets from `input` to `output` through `model` until `control.stop` is set.
pub fn run_direction(
    input: &OwnedFd,
    output: &OwnedFd,
    mut model: LinkModel,
    control: &Control,
    counters: &Counters,
) {
    // SAFETY: prctl on the calling thread; 1 us slack makes ppoll wake close to the deadline.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    let mut line: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut held_bytes: u64 = 0;
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut scratch = vec![0u8; PACKET_BUF];
    let mut seq: u64 = 0;
    let in_fd = input.as_raw_fd();
    let out_fd = output.as_raw_fd();
    while !control.stop.load(Ordering::Relaxed) {
        let now = control.now();
        // 1. Deliver what is due (a cut link loses what is still on the wire, too).
        while line.peek().is_some_and(|h| h.0.release <= now) {
            let Some(Reverse(held)) = line.pop() else {
                break;
            };
            held_bytes -= held.data.len() as u64;
            if control.is_down(now) {
                counters.lost_down.fetch_add(1, Ordering::Relaxed);
            } else {
                deliver(out_fd, &held.data, counters);
            }
            pool.push(held.data);
        }
        // 2. Sleep until a packet arrives or the next one is due.
        let wait = line
            .peek()
            .map_or(MAX_SLEEP, |h| h.0.release.saturating_sub(now))
            .min(MAX_SLEEP);
        let mut pfd = libc::pollfd {
            fd: in_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: (wait / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        let ready = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if ready <= 0 {
            continue;
        }
        // 3. Read a batch and judge each packet. Reads land in one scratch buffer and each
        //    packet is copied into a right-sized pooled buffer: held packets then cost their
        //    size, not 64 KiB each, and no buffer is zeroed per packet.
        for _ in 0..READ_BATCH {
            // SAFETY: read(2) into a buffer we own, of its length.
            let n = unsafe { libc::read(in_fd, scratch.as_mut_ptr().cast(), scratch.len()) };
            if n <= 0 {
                break;
            }
            let mut buf = pool.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(&scratch[..n as usize]);
            let len = n as u64;
            counters.packets_in.fetch_add(1, Ordering::Relaxed);
            counters.bytes_in.fetch_add(len, Ordering::Relaxed);
            let now = control.now();
            match model.offer(now, len, control.is_down(now)) {
                Verdict::Drop(why) => {
                    let c = match why {
                        Drop::Down => &counters.lost_down,
                        Drop::RandomLoss => &counters.lost_random,
                        Drop::BurstLoss => &counters.lost_burst,
                        Drop::QueueFull => &counters.dropped_queue,
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    pool.push(buf);
                }
                Verdict::Deliver { at, reordered } => {
                    if held_bytes + len > DELAY_LINE_LIMIT {
                        counters.dropped_delay_line.fetch_add(1, Ordering::Relaxed);
                        pool.push(buf);
                        continue;
                    }
                    if reordered {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    if at <= now && line.is_empty() {
                        // Due now and nothing ahead of it: skip the heap.
                        deliver(out_fd, &buf, counters);
                        pool.push(buf);
                        continue;
                    }
                    held_bytes += len;
                    seq += 1;
                    line.push(Reverse(Held {
                        release: at,
                        seq,
                        data: buf,
                    }));
                }
            }
        }
        // Keep the pool from growing past what a burst needs (a delay line of thousands of
        // packets allocates as it fills and frees as it drains).
        pool.truncate(16 * READ_BATCH);
    }
}

/// Both directions of a running link.
pub struct Link {
    pub control: Arc<Control>,
    pub a_to_b: Arc<Counters>,
    pub b_to_a: Arc<Counters>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Link {
    /// Starts forwarding between the two TUN descriptors with one model per direction.
    pub fn start(
        tun_a: OwnedFd,
        tun_b: OwnedFd,
        models: (LinkModel, LinkModel),
        control: Arc<Control>,
    ) -> Link {
        let tun_a = Arc::new(tun_a);
        let tun_b = Arc::new(tun_b);
        let a_to_b = Arc::new(Counters::default());
        let b_to_a = Arc::new(Counters::default());
        let mut threads = Vec::new();
        let (m_ab, m_ba) = models;
        for (input, output, model, counters, name) in [
            (tun_a.clone(), tun_b.clone(), m_ab, a_to_b.clone(), "a->b"),
            (tun_b, tun_a, m_ba, b_to_a.clone(), "b->a"),
        ] {
            let shared = control.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("linkemu {name}"))
                .spawn(move || run_direction(&input, &output, model, &shared, &counters));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    eprintln!("linkemu: cannot start the {name} forwarder: {e}");
                    control.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        Link {
            control,
            a_to_b,
            b_to_a,
            threads,
        }
    }

    /// Stops both forwarders and waits for them.
    pub fn stop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::ops::Drop for Link {
    fn drop(&mut self) {
        self.stop();
    }
}
