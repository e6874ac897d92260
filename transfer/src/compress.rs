//! Compression policy: `off`, `zstd[:LEVEL]`, or `auto`, decided from measurement.
//!
//! The runbook's finding is that compressing git data rarely pays: packs are already
//! zlib-compressed, so zstd saves a few percent at a CPU cost that only slow links recoup.
//! The **breakpoint** is `bytes saved / extra seconds` (compression *and* decompression time,
//! as a serial cost): a link slower than it gains from compressing, a faster one loses.
//! [`AutoDecider`] measures both sides of that inequality on the live transfer:
//! - the data: zstd ratio and speed on sampled chunks (the first [`SAMPLE_FIRST`] chunks,
//!   then one in [`SAMPLE_EVERY`], so a tree that turns from packs to text is noticed);
//! - the link: wire bytes the receiver reports per second over windows of
//!   [`LINK_WINDOW_SECS`]; every window is a lower bound of the link's capacity, so the
//!   estimate is the best window seen, capped by `--bwlimit`, which *is* the link's speed from
//!   our point of view.
//!
//! It compresses only while `link < breakpoint`. Two refinements keep that honest:
//! - before the link is measured, data whose breakpoint exceeds [`OPTIMISTIC_LINK`] (source
//!   text: zstd saves most of it at hundreds of MB/s) is compressed at once: otherwise a
//!   small transfer over a slow link would be gone, raw, before the first measurement;
//! - while compressing, a window in which the data streams sat idle (the encoders, not the
//!   link, were the bottleneck) says compression is what limits us: the next window is sent
//!   raw ([`PROBE_SECS`]) to measure what the link can really take.
//!
//! Independently, any chunk whose compressed form is not smaller goes raw. The decision and
//! its figures end up in the `--json` summary.
//!
//! All of this is sans-io and deterministic given its inputs (times are passed in).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Chunks sampled at the start of a transfer before `auto` decides.
pub const SAMPLE_FIRST: u64 = 4;
/// After the first samples, one chunk in this many is sampled.
pub const SAMPLE_EVERY: u64 = 32;
/// Minimum length of a link-rate measurement window.
pub const LINK_WINDOW_SECS: f64 = 0.25;
/// Before the link is measured, data whose breakpoint is above this is compressed.
pub const OPTIMISTIC_LINK: f64 = 50e6;
/// Length of a raw probe after a window in which compression was the bottleneck.
pub const PROBE_SECS: f64 = 0.5;
/// zstd level used by `auto` and by a bare `zstd`.
pub const DEFAULT_LEVEL: i32 = 3;

/// What the user asked for with `--compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressPolicy {
    Off,
    Zstd(i32),
    Auto,
}

impl FromStr for CompressPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(CompressPolicy::Off),
            "auto" => Ok(CompressPolicy::Auto),
            "zstd" => Ok(CompressPolicy::Zstd(DEFAULT_LEVEL)),
            other => {
                let level = other
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .ok_or_else(|| {
                        format!("invalid compression {other:?}: use off, auto, zstd or zstd:LEVEL")
                    })?;
                if !(1..=22).contains(&level) {
                    return Err(format!("zstd level {level} out of range 1..=22"));
                }
                Ok(CompressPolicy::Zstd(level))
            }
        }
    }
}

impl fmt::Display for CompressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompressPolicy::Off => write!(f, "off"),
            CompressPolicy::Zstd(l) => write!(f, "zstd:{l}"),
            CompressPolicy::Auto => write!(f, "auto"),
        }
    }
}

/// One measurement of zstd on a sampled chunk.
#[derive(Debug, Clone, Copy)]
pub struct CodecSample {
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub compress_secs: f64,
    pub decompress_secs: f64,
}

/// What `auto` (or a fixed policy) decided, with the figures behind it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Decision {
    pub policy: String,
    /// Whether chunks are being compressed now.
    pub compress: bool,
    pub level: i32,
    pub reason: String,
    /// Link throughput used for the decision, bytes/s.
    pub link_bytes_per_sec: Option<f64>,
    /// Bytes saved per extra second of compress + decompress, bytes/s.
    pub breakpoint_bytes_per_sec: Option<f64>,
    /// compressed / raw over the samples.
    pub sample_ratio: Option<f64>,
    pub compress_mb_per_sec: Option<f64>,
    pub decompress_mb_per_sec: Option<f64>,
    pub samples: u64,
    /// Raw probes made because compression was the bottleneck.
    pub probes: u64,
}

/// Measures link and data and decides whether compressing pays. See the module docs.
#[derive(Debug, Clone)]
pub struct AutoDecider {
    policy: CompressPolicy,
    bwlimit: Option<u64>,
    raw: u64,
    compressed: u64,
    compress_secs: f64,
    decompress_secs: f64,
    samples: u64,
    window_start: Option<(f64, u64)>,
    best_link: Option<f64>,
    /// Sending raw until this time, to measure the link (see module docs).
    probe_until: Option<f64>,
    probes: u64,
}

impl AutoDecider {
    pub fn new(policy: CompressPolicy, bwlimit: Option<u64>) -> Self {
        AutoDecider {
            policy,
            bwlimit,
            raw: 0,
            compressed: 0,
            compress_secs: 0.0,
            decompress_secs: 0.0,
            samples: 0,
            window_start: None,
            best_link: None,
            probe_until: None,
            probes: 0,
        }
    }

    pub fn level(&self) -> i32 {
        match self.policy {
            CompressPolicy::Zstd(l) => l,
            _ => DEFAULT_LEVEL,
        }
    }

    /// Whether the `n`-th chunk this sender encodes should be sampled (compressed and
    /// decompressed to measure). Only `auto` samples.
    pub fn should_sample(&self, n: u64) -> bool {
        self.policy == CompressPolicy::Auto && (n < SAMPLE_FIRST || n.is_multiple_of(SAMPLE_EVERY))
    }

    pub fn add_sample(&mut self, s: CodecSample) {
        self.raw += s.raw_bytes;
        self.compressed += s.compressed_bytes;
        self.compress_secs += s.compress_secs;
        self.decompress_secs += s.decompress_secs;
        self.samples += 1;
    }

    /// Feeds the receiver's cumulative wire-byte count at time `now_secs`. `link_bound` says
    /// whether, since the last call, the data streams spent more time waiting for the link
    /// (blocked writing) than waiting for the encoders.
    pub fn observe_wire(&mut self, now_secs: f64, wire_bytes: u64, link_bound: bool) {
        match self.window_start {
            None => self.window_start = Some((now_secs, wire_bytes)),
            Some((t0, b0)) => {
                let dt = now_secs - t0;
                if dt >= LINK_WINDOW_SECS {
                    let rate = wire_bytes.saturating_sub(b0) as f64 / dt;
                    self.best_link = Some(self.best_link.map_or(rate, |b| b.max(rate)));
                    self.window_start = Some((now_secs, wire_bytes));
                    let probing = self.probe_until.is_some_and(|t| now_secs < t);
                    if self.policy == CompressPolicy::Auto
                        && !link_bound
                        && !probing
                        && self.decide_at(now_secs).compress
                    {
                        self.probe_until = Some(now_secs + PROBE_SECS);
                        self.probes += 1;
                    }
                }
            }
        }
    }

    /// The link speed the decision uses: best measured window, capped by `--bwlimit`.
    pub fn link_rate(&self) -> Option<f64> {
        match (self.best_link, self.bwlimit) {
            (Some(m), Some(cap)) => Some(m.min(cap as f64)),
            (Some(m), None) => Some(m),
            (None, Some(cap)) => Some(cap as f64),
            (None, None) => None,
        }
    }

    /// Decision at time `now_secs` (seconds since the transfer started).
    pub fn decide_at(&self, now_secs: f64) -> Decision {
        let level = self.level();
        let ratio = (self.raw > 0).then(|| self.compressed as f64 / self.raw as f64);
        let cpu = self.compress_secs + self.decompress_secs;
        let breakpoint = (self.raw > 0 && cpu > 0.0)
            .then(|| self.raw.saturating_sub(self.compressed) as f64 / cpu);
        let mbps = |secs: f64| (secs > 0.0).then(|| self.raw as f64 / secs / 1e6);
        let link = self.link_rate();
        let mut d = Decision {
            policy: self.policy.to_string(),
            compress: false,
            level,
            reason: String::new(),
            link_bytes_per_sec: link,
            breakpoint_bytes_per_sec: breakpoint,
            sample_ratio: ratio,
            compress_mb_per_sec: mbps(self.compress_secs),
            decompress_mb_per_sec: mbps(self.decompress_secs),
            samples: self.samples,
            probes: self.probes,
        };
        match self.policy {
            CompressPolicy::Off => d.reason = "compression off".into(),
            CompressPolicy::Zstd(l) => {
                d.compress = true;
                d.reason = format!("zstd level {l} requested");
            }
            CompressPolicy::Auto if self.probe_until.is_some_and(|t| now_secs < t) => {
                d.reason = format!(
                    "probing the link raw for {PROBE_SECS} s: the encoders, not the link, were the bottleneck"
                );
            }
            CompressPolicy::Auto => match (link, breakpoint) {
                (_, None) if self.samples < SAMPLE_FIRST => {
                    d.reason = "measuring: sending raw until the data is sampled".into()
                }
                (_, None) => {
                    d.reason = "zstd saved nothing on the sampled chunks: sending raw".into()
                }
                (_, Some(b)) if b <= 0.0 => {
                    d.reason = "zstd saved nothing on the sampled chunks: sending raw".into()
                }
                (None, Some(b)) if b >= OPTIMISTIC_LINK => {
                    d.compress = true;
                    d.reason = format!(
                        "link not measured yet; zstd:{level} saves {:.1}% (breakpoint {:.0} MB/s), \
                         so compressing until the link proves faster",
                        (1.0 - ratio.unwrap_or(1.0)) * 100.0,
                        b / 1e6
                    );
                }
                (None, Some(_)) => {
                    d.reason = format!(
                        "link not measured yet (it takes {LINK_WINDOW_SECS} s of transfer): sending raw"
                    )
                }
                (Some(l), Some(b)) => {
                    d.compress = l < b;
                    d.reason = format!(
                        "link {:.1} MB/s {} breakpoint {:.1} MB/s (zstd:{level} saves {:.1}% at {:.0} MB/s compress, {:.0} MB/s decompress)",
                        l / 1e6,
                        if d.compress { "<" } else { ">=" },
                        b / 1e6,
                        (1.0 - ratio.unwrap_or(1.0)) * 100.0,
                        d.compress_mb_per_sec.unwrap_or(0.0),
                        d.decompress_mb_per_sec.unwrap_or(0.0),
                    );
                }
            },
        }
        d
    }
}

/// Errors of the chunk codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("decoded {got} bytes, frame header said {expected}")]
    Length { expected: u64, got: u64 },
}

/// Decodes a zstd payload into `out`, which must come back exactly `raw_len` long.
/// The output is bounded by `raw_len`, so a hostile payload cannot inflate without limit.
pub fn decompress_into(
    dec: &mut zstd::bulk::Decompressor<'_>,
    payload: &[u8],
    raw_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.clear();
    out.reserve(raw_len as usize);
    let n = dec
        .decompress_to_buffer(payload, out)
        .map_err(CodecError::Zstd)?;
    if n as u64 != raw_len {
        return Err(CodecError::Length {
            expected: raw_len,
            got: n as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies() {
        assert_eq!("off".parse(), Ok(CompressPolicy::Off));
        assert_eq!("auto".parse(), Ok(CompressPolicy::Auto));
        assert_eq!("zstd".parse(), Ok(CompressPolicy::Zstd(3)));
        assert_eq!("zstd:19".parse(), Ok(CompressPolicy::Zstd(19)));
        assert!("zstd:0".parse::<CompressPolicy>().is_err());
        assert!("gzip".parse::<CompressPolicy>().is_err());
    }

    fn sample(ratio: f64, mbps: f64) -> CodecSample {
        let raw = 4_000_000;
        CodecSample {
            raw_bytes: raw,
            compressed_bytes: (raw as f64 * ratio) as u64,
            compress_secs: raw as f64 / (mbps * 1e6),
            decompress_secs: raw as f64 / (mbps * 4.0 * 1e6),
        }
    }

    #[test]
    fn auto_compresses_only_below_the_breakpoint() {
        // Text-like: halves the data at 200 MB/s (decompress 800 MB/s):
        // breakpoint = 2 MB saved / (0.02 + 0.005) s = 80 MB/s.
        let mut d = AutoDecider::new(CompressPolicy::Auto, None);
        assert!(!d.decide_at(0.0).compress);
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(0.5, 200.0));
        }
        // Breakpoint 80 MB/s is above the optimistic threshold: compress before measuring.
        assert!(d.decide_at(0.0).compress, "optimistic before measurement");
        d.observe_wire(0.0, 0, true);
        d.observe_wire(1.0, 10_000_000, true); // 10 MB/s link, streams blocked on it
        let dec = d.decide_at(1.0);
        assert!(dec.compress, "{dec:?}");
        let bp = dec.breakpoint_bytes_per_sec.unwrap();
        assert!((bp - 80e6).abs() < 1e3, "{bp}");
        d.observe_wire(2.0, 210_000_000, false); // a 200 MB/s window
        assert!(!d.decide_at(2.0).compress);
    }

    #[test]
    fn pack_like_data_never_pays_on_a_fast_link_but_bwlimit_caps_the_link() {
        // Pack-like: saves 2% at 300 MB/s; breakpoint ~ 4.8 MB/s.
        let mut d = AutoDecider::new(CompressPolicy::Auto, Some(1_000_000));
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(0.98, 300.0));
        }
        assert!(
            d.decide_at(0.0).compress,
            "the --bwlimit cap is the link before measuring"
        );
        d.observe_wire(0.0, 0, true);
        d.observe_wire(1.0, 500_000_000, true);
        let dec = d.decide_at(1.0);
        assert_eq!(dec.link_bytes_per_sec, Some(1e6));
        assert!(dec.compress, "1 MB/s cap is below the breakpoint: {dec:?}");
        let mut d = AutoDecider::new(CompressPolicy::Auto, None);
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(0.98, 300.0));
        }
        assert!(
            !d.decide_at(0.0).compress,
            "breakpoint below the optimistic threshold: raw until measured"
        );
        d.observe_wire(0.0, 0, true);
        d.observe_wire(1.0, 500_000_000, true);
        assert!(!d.decide_at(1.0).compress);
    }

    #[test]
    fn incompressible_samples_mean_raw_and_fixed_policies_ignore_measurement() {
        let mut d = AutoDecider::new(CompressPolicy::Auto, Some(1));
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(1.0, 300.0));
        }
        assert!(!d.decide_at(0.0).compress);
        let d = AutoDecider::new(CompressPolicy::Zstd(5), None);
        assert!(d.decide_at(0.0).compress);
        assert!(!d.should_sample(0));
        let d = AutoDecider::new(CompressPolicy::Off, Some(1));
        assert!(!d.decide_at(0.0).compress);
    }

    #[test]
    fn compression_as_the_bottleneck_triggers_a_raw_probe_that_can_end_compression() {
        // Text at 200 MB/s: breakpoint 80 MB/s. Compressing, the streams sit idle at 30 MB/s
        // of wire bytes: the encoders are the bottleneck, so probe raw.
        let mut d = AutoDecider::new(CompressPolicy::Auto, None);
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(0.5, 200.0));
        }
        d.observe_wire(0.0, 0, false);
        d.observe_wire(0.3, 9_000_000, false);
        let dec = d.decide_at(0.31);
        assert!(!dec.compress && dec.reason.contains("probing"), "{dec:?}");
        assert_eq!(dec.probes, 1);
        // The raw probe shows a 400 MB/s link: stay raw after the probe.
        d.observe_wire(0.6, 129_000_000, false);
        d.observe_wire(0.9, 249_000_000, false);
        assert!(!d.decide_at(1.0).compress);
        // On a slow link the streams block while compressing: no probe, keep compressing.
        let mut d = AutoDecider::new(CompressPolicy::Auto, None);
        for _ in 0..SAMPLE_FIRST {
            d.add_sample(sample(0.5, 200.0));
        }
        d.observe_wire(0.0, 0, true);
        d.observe_wire(0.5, 1_000_000, true);
        assert!(d.decide_at(0.6).compress);
        assert_eq!(d.decide_at(0.6).probes, 0);
    }

    #[test]
    fn decompression_is_bounded_by_the_declared_length() {
        let data = vec![7u8; 1 << 20];
        let payload = zstd::bulk::compress(&data, 3).unwrap();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let mut out = Vec::new();
        decompress_into(&mut dec, &payload, data.len() as u64, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress_into(&mut dec, &payload, 1000, &mut out).is_err());
        assert!(decompress_into(&mut dec, &payload, 2 << 20, &mut out).is_err());
        assert!(decompress_into(&mut dec, b"garbage", 10, &mut out).is_err());
    }
}
