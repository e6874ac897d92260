//! The forwarder: one thread per direction reads packets from one TUN device, asks the
//! [`LinkModel`] what happens to each, holds the survivors in a delay line and writes them to
//! the other TUN device when they are due. With segmentation offload ([`Framing::Offload`],
//! the default) a read may be a super-packet of many wire packets: the model judges each
//! wire packet and the survivors travel on in runs ([`super::offload`]).
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
use super::offload::{Segmentation, VnetHdr, VNET_HDR_LEN};

/// Most bytes one direction holds in its delay line (1 Gbit/s x 150 ms is ~19 MB).
pub const DELAY_LINE_LIMIT: u64 = 64 << 20;
/// Packets read before the loop writes what is due again.
const READ_BATCH: usize = 64;
/// Longest sleep, so a stop request is noticed promptly.
const MAX_SLEEP: Nanos = 50_000_000;
/// Largest read from a TUN device: a 64 KiB super-packet and its `virtio_net_hdr`.
const PACKET_BUF: usize = 65_536 + VNET_HDR_LEN;

/// How packets are framed on the TUN descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One IP packet per read and write (`IFF_TUN` alone).
    Plain,
    /// A `virtio_net_hdr` before each packet, which may be a TSO/USO super-packet
    /// (`IFF_VNET_HDR` and `TUNSETOFFLOAD`).
    Offload,
}

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
    /// Wire packets in `data` (more than one for a super-packet).
    segments: u64,
    /// Bytes those wire packets take on the line (IP packets, no `virtio_net_hdr`).
    wire_bytes: u64,
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

/// Writes one packet (or super-packet) to the far side's TUN device and counts its wire
/// packets.
fn deliver(out_fd: libc::c_int, held: &Held, counters: &Counters) {
    // SAFETY: write(2) from a buffer we own, of its length.
    let n = unsafe { libc::write(out_fd, held.data.as_ptr().cast(), held.data.len()) };
    if n < 0 {
        counters.write_errors.fetch_add(1, Ordering::Relaxed);
    } else {
        counters
            .packets_out
            .fetch_add(held.segments, Ordering::Relaxed);
        counters
            .bytes_out
            .fetch_add(held.wire_bytes, Ordering::Relaxed);
    }
}

/// One direction's delay line and buffers.
struct Direction<'a> {
    out_fd: libc::c_int,
    counters: &'a Counters,
    line: BinaryHeap<Reverse<Held>>,
    held_bytes: u64,
    pool: Vec<Vec<u8>>,
    seq: u64,
}

impl Direction<'_> {
    fn buffer(&mut self) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf
    }

    fn count_drop(&self, why: Drop, segments: u64) {
        let c = match why {
            Drop::Down => &self.counters.lost_down,
            Drop::RandomLoss => &self.counters.lost_random,
            Drop::BurstLoss => &self.counters.lost_burst,
            Drop::QueueFull => &self.counters.dropped_queue,
        };
        c.fetch_add(segments, Ordering::Relaxed);
    }

    /// Sends `held` now if it is due and nothing is ahead of it, else holds it until its
    /// release time (dropping it when the delay line is full).
    fn place(&mut self, held: Held, now: Nanos) {
        let len = held.data.len() as u64;
        if self.held_bytes + len > DELAY_LINE_LIMIT {
            self.counters
                .dropped_delay_line
                .fetch_add(held.segments, Ordering::Relaxed);
            self.pool.push(held.data);
            return;
        }
        if held.release <= now && self.line.is_empty() {
            // Due now and nothing ahead of it: skip the heap.
            deliver(self.out_fd, &held, self.counters);
            self.pool.push(held.data);
            return;
        }
        self.held_bytes += len;
        self.seq += 1;
        self.line.push(Reverse(Held {
            seq: self.seq,
            ..held
        }));
    }

    /// Delivers (or, while the link is down, loses) everything due by `now`.
    fn release_due(&mut self, now: Nanos, down: bool) {
        while self.line.peek().is_some_and(|h| h.0.release <= now) {
            let Some(Reverse(held)) = self.line.pop() else {
                break;
            };
            self.held_bytes -= held.data.len() as u64;
            if down {
                self.counters
                    .lost_down
                    .fetch_add(held.segments, Ordering::Relaxed);
            } else {
                deliver(self.out_fd, &held, self.counters);
            }
            self.pool.push(held.data);
        }
    }

    /// Judges one wire packet whose bytes (as written to the far side) are `frame`.
    fn offer_one(
        &mut self,
        model: &mut LinkModel,
        frame: &[u8],
        wire: u64,
        now: Nanos,
        down: bool,
    ) {
        self.counters.packets_in.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(wire, Ordering::Relaxed);
        match model.offer(now, wire, down) {
            Verdict::Drop(why) => self.count_drop(why, 1),
            Verdict::Deliver { at, reordered } => {
                if reordered {
                    self.counters.reordered.fetch_add(1, Ordering::Relaxed);
                }
                let mut data = self.buffer();
                data.extend_from_slice(frame);
                let held = Held {
                    release: at,
                    seq: 0,
                    data,
                    segments: 1,
                    wire_bytes: wire,
                };
                self.place(held, now);
            }
        }
    }

    /// Judges each wire packet of a super-packet and sends the survivors on in runs of
    /// consecutive ones, each released when its last packet is due. A lost or reordered
    /// packet ends a run (a reordered one travels alone, at its own later time).
    fn offer_segmented(
        &mut self,
        model: &mut LinkModel,
        seg: &Segmentation,
        packet: &[u8],
        now: Nanos,
        down: bool,
    ) {
        struct Run {
            first: usize,
            release: Nanos,
            wire_bytes: u64,
        }
        let count = seg.count();
        let mut run: Option<Run> = None;
        let emit = |dir: &mut Self, run: Run, end: usize| {
            let mut data = dir.buffer();
            seg.build(packet, run.first, end, &mut data);
            let held = Held {
                release: run.release,
                seq: 0,
                data,
                segments: (end - run.first) as u64,
                wire_bytes: run.wire_bytes,
            };
            dir.place(held, now);
        };
        for i in 0..count {
            let wire = seg.wire_len(i);
            self.counters.packets_in.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_in.fetch_add(wire, Ordering::Relaxed);
            match model.offer(now, wire, down) {
                Verdict::Drop(why) => {
                    self.count_drop(why, 1);
                    if let Some(r) = run.take() {
                        emit(self, r, i);
                    }
                }
                Verdict::Deliver {
                    at,
                    reordered: true,
                } => {
                    self.counters.reordered.fetch_add(1, Ordering::Relaxed);
                    if let Some(r) = run.take() {
                        emit(self, r, i);
                    }
                    let alone = Run {
                        first: i,
                        release: at,
                        wire_bytes: wire,
                    };
                    emit(self, alone, i + 1);
                }
                Verdict::Deliver {
                    at,
                    reordered: false,
                } => match &mut run {
                    Some(r) => {
                        r.release = r.release.max(at);
                        r.wire_bytes += wire;
                    }
                    None => {
                        run = Some(Run {
                            first: i,
                            release: at,
                            wire_bytes: wire,
                        })
                    }
                },
            }
        }
        if let Some(r) = run.take() {
            emit(self, r, count);
        }
    }
}

/// Moves packets from `input` to `output` through `model` until `control.stop` is set.
pub fn run_direction(
    input: &OwnedFd,
    output: &OwnedFd,
    framing: Framing,
    mut model: LinkModel,
    control: &Control,
    counters: &Counters,
) {
    // SAFETY: prctl on the calling thread; 1 us slack makes ppoll wake close to the deadline.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    let mut dir = Direction {
        out_fd: output.as_raw_fd(),
        counters,
        line: BinaryHeap::new(),
        held_bytes: 0,
        pool: Vec::new(),
        seq: 0,
    };
    let mut scratch = vec![0u8; PACKET_BUF];
    let in_fd = input.as_raw_fd();
    while !control.stop.load(Ordering::Relaxed) {
        let now = control.now();
        // 1. Deliver what is due (a cut link loses what is still on the wire, too).
        dir.release_due(now, control.is_down(now));
        // 2. Sleep until a packet arrives or the next one is due.
        let wait = dir
            .line
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
        // 3. Read a batch and judge each packet. Reads land in one scratch buffer and what
        //    survives is copied into a right-sized pooled buffer: held packets then cost
        //    their size, not 64 KiB each, and no buffer is zeroed per packet.
        for _ in 0..READ_BATCH {
            // SAFETY: read(2) into a buffer we own, of its length.
            let n = unsafe { libc::read(in_fd, scratch.as_mut_ptr().cast(), scratch.len()) };
            if n <= 0 {
                break;
            }
            let frame = &scratch[..n as usize];
            let now = control.now();
            let down = control.is_down(now);
            match framing {
                Framing::Plain => {
                    dir.offer_one(&mut model, frame, frame.len() as u64, now, down);
                }
                Framing::Offload => {
                    let Some(hdr) = VnetHdr::parse(frame) else {
                        continue;
                    };
                    let packet = &frame[VNET_HDR_LEN..];
                    match Segmentation::of(&hdr, packet) {
                        Some(seg) => dir.offer_segmented(&mut model, &seg, packet, now, down),
                        None => dir.offer_one(&mut model, frame, packet.len() as u64, now, down),
                    }
                }
            }
        }
        // Keep the pool from growing past what a burst needs (a delay line of thousands of
        // packets allocates as it fills and frees as it drains).
        dir.pool.truncate(16 * READ_BATCH);
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
        framing: Framing,
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
                .spawn(move || run_direction(&input, &output, framing, model, &shared, &counters));
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
