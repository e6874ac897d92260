//! Turning measurements into a markdown table, CSV and an SVG chart.
//!
//! The chart answers "which codec should a transfer use on this link": x is the link speed
//! (log scale, 100 KB/s to 10 GB/s, decimal units), the top panel the effective transfer time
//! `tar + compress + bytes/link + decompress` in seconds (log scale), the bottom panel the
//! same time relative to plain tar, where a codec wins wherever its curve is below 1 and the
//! crossing is its breakpoint. Hand-written SVG: a few lines of code instead of a plotting
//! dependency tree.

use std::fmt::Write as _;

use crate::codecs::{Codec, Measurement};

/// Results for one repository variant (as is, or repacked).
#[derive(Debug, Clone)]
pub struct RepoResult {
    /// Repository label, e.g. `bare-200M`.
    pub repo: String,
    /// `as-is` or `repacked`.
    pub variant: String,
    /// Extra facts for the table, e.g. `repack 12.3 s, copy 0.8 s`.
    pub note: String,
    pub measurements: Vec<Measurement>,
}

/// Link speeds (bytes/s) at which the winner is reported.
pub const WINNER_LINKS: &[(f64, &str)] = &[
    (1e6, "1 MB/s"),
    (1e7, "10 MB/s"),
    (1e8, "100 MB/s"),
    (1e9, "1 GB/s"),
    (1e10, "10 GB/s"),
];

/// `1.2 MB/s` style rate (decimal units, as link speeds are quoted).
pub fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "never".to_string(),
        Some(r) if r.is_infinite() => "always".to_string(),
        Some(r) => {
            let (v, u) = if r >= 1e9 {
                (r / 1e9, "GB/s")
            } else if r >= 1e6 {
                (r / 1e6, "MB/s")
            } else {
                (r / 1e3, "KB/s")
            };
            if v >= 100.0 {
                format!("{v:.0} {u}")
            } else {
                format!("{v:.1} {u}")
            }
        }
    }
}

/// `151.2 MB` (decimal, to compare with the runbook's table).
pub fn fmt_mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn fmt_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The fastest codec at a link speed.
pub fn winner(ms: &[Measurement], link: f64) -> Option<&Measurement> {
    ms.iter().min_by(|a, b| {
        a.effective_secs(link)
            .partial_cmp(&b.effective_secs(link))
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// Compact markdown, one row per result (the runbook's table, extended): for each codec
/// `saved% · breakpoint (compress+decompress)`.
pub fn summary(results: &[RepoResult]) -> String {
    let mut codecs: Vec<Codec> = Vec::new();
    for r in results {
        for m in &r.measurements {
            if m.codec != Codec::None && !codecs.contains(&m.codec) {
                codecs.push(m.codec);
            }
        }
    }
    let mut s = String::from("| repository | variant | tar size | tar time |");
    for c in &codecs {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|---|---:|---:|");
    for _ in &codecs {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in results {
        let Some(base) = r.measurements.iter().find(|m| m.codec == Codec::None) else {
            continue;
        };
        let _ = write!(
            s,
            "| {} | {} | {} | {:.0} ms |",
            r.repo,
            r.variant,
            fmt_mb(base.input_bytes),
            base.tar_secs * 1000.0
        );
        for c in &codecs {
            match r.measurements.iter().find(|m| m.codec == *c) {
                Some(m) => {
                    let saved = 100.0 * m.saved_bytes() as f64 / m.input_bytes.max(1) as f64;
                    let _ = write!(
                        s,
                        " {saved:.1}% · {}{} |",
                        fmt_rate(m.breakpoint()),
                        if m.extrapolated { "*" } else { "" }
                    );
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Markdown: the summary, one table of all codecs per result, then the winners by link speed.
pub fn markdown(results: &[RepoResult]) -> String {
    let mut s = String::from("Saved bytes · breakpoint (compress + decompress) per codec:\n\n");
    s.push_str(&summary(results));
    s.push_str("\nAll figures:\n\n");
    s.push_str("| repository | variant | codec | tar size | wire size | saved | compress | decompress | breakpoint (c+d) | breakpoint (c only) |\n");
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        for m in &r.measurements {
            let star = if m.extrapolated { "*" } else { "" };
            let saved = if m.input_bytes > 0 {
                100.0 * m.saved_bytes() as f64 / m.input_bytes as f64
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "| {} | {} | {}{} | {} | {} | {:.1}% | {} | {} | {} | {} |",
                r.repo,
                r.variant,
                m.codec,
                star,
                fmt_mb(m.input_bytes),
                fmt_mb(m.output_bytes),
                saved,
                if m.codec == Codec::None {
                    format!("tar {}", fmt_secs(m.tar_secs))
                } else {
                    fmt_secs(m.compress_secs)
                },
                if m.codec == Codec::None {
                    "-".to_string()
                } else {
                    fmt_secs(m.decompress_secs)
                },
                if m.codec == Codec::None {
                    "-".to_string()
                } else {
                    fmt_rate(m.breakpoint())
                },
                if m.codec == Codec::None {
                    "-".to_string()
                } else {
                    fmt_rate(m.breakpoint_compress_only())
                },
            );
        }
    }
    s.push_str("\nFastest choice by link speed (serial model: tar + compress + size/link + decompress):\n\n");
    s.push_str("| repository | variant | note |");
    for (_, name) in WINNER_LINKS {
        let _ = write!(s, " {name} |");
    }
    s.push_str("\n|---|---|---|");
    for _ in WINNER_LINKS {
        s.push_str("---|");
    }
    s.push('\n');
    for r in results {
        let _ = write!(s, "| {} | {} | {} |", r.repo, r.variant, r.note);
        for (link, _) in WINNER_LINKS {
            let w = winner(&r.measurements, *link)
                .map(|m| m.codec.to_string())
                .unwrap_or_default();
            let _ = write!(s, " {w} |");
        }
        s.push('\n');
    }
    s
}

/// CSV, one row per (repository, variant, codec); sizes in bytes, times in seconds,
/// breakpoints in bytes/s (empty: never pays).
pub fn csv(results: &[RepoResult]) -> String {
    let mut s = String::from(
        "repo,variant,codec,tar_bytes,wire_bytes,tar_secs,compress_secs,decompress_secs,breakpoint_bps,breakpoint_compress_only_bps,extrapolated,note\n",
    );
    let bp = |v: Option<f64>| match v {
        Some(v) if v.is_finite() => format!("{v:.0}"),
        Some(_) => "inf".to_string(),
        None => String::new(),
    };
    for r in results {
        for m in &r.measurements {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{:.4},{:.4},{:.4},{},{},{},{}",
                r.repo,
                r.variant,
                m.codec,
                m.input_bytes,
                m.output_bytes,
                m.tar_secs,
                m.compress_secs,
                m.decompress_secs,
                bp(m.breakpoint()),
                bp(m.breakpoint_compress_only()),
                m.extrapolated,
                r.note.replace(',', ";")
            );
        }
    }
    s
}

/// Parse a codec name as printed by its `Display` (`tar`, `gzip-6`, `zstd-3-mt2`, ...).
pub fn parse_codec(s: &str) -> Option<Codec> {
    if s == "tar" {
        return Some(Codec::None);
    }
    if s == "shardsend" {
        return Some(Codec::Shardsend);
    }
    if let Some(l) = s.strip_prefix("gzip-") {
        return l.parse().ok().map(Codec::Gzip);
    }
    let z = s.strip_prefix("zstd-")?;
    match z.split_once("-mt") {
        Some((l, n)) => Some(Codec::ZstdMt(l.parse().ok()?, n.parse().ok()?)),
        None => z.parse().ok().map(Codec::Zstd),
    }
}

/// Read back what [`csv`] wrote (to re-render tables and charts without measuring again).
pub fn parse_csv(text: &str) -> Result<Vec<RepoResult>, String> {
    let mut out: Vec<RepoResult> = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 11 {
            return Err(format!(
                "line {}: {} fields, expected 11 or 12",
                i + 1,
                f.len()
            ));
        }
        let bad = |what: &str| format!("line {}: bad {what}", i + 1);
        let m = Measurement {
            codec: parse_codec(f[2]).ok_or_else(|| bad("codec"))?,
            input_bytes: f[3].parse().map_err(|_| bad("tar_bytes"))?,
            output_bytes: f[4].parse().map_err(|_| bad("wire_bytes"))?,
            tar_secs: f[5].parse().map_err(|_| bad("tar_secs"))?,
            compress_secs: f[6].parse().map_err(|_| bad("compress_secs"))?,
            decompress_secs: f[7].parse().map_err(|_| bad("decompress_secs"))?,
            extrapolated: f[10] == "true",
        };
        let note = f.get(11).copied().unwrap_or("").to_string();
        match out.last_mut() {
            Some(r) if r.repo == f[0] && r.variant == f[1] => r.measurements.push(m),
            _ => out.push(RepoResult {
                repo: f[0].to_string(),
                variant: f[1].to_string(),
                note,
                measurements: vec![m],
            }),
        }
    }
    Ok(out)
}

const COLORS: &[&str] = &[
    "#000000", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#17becf",
    "#e377c2", "#7f7f7f",
];

/// An SVG chart of effective transfer time vs link speed for one result.
pub fn svg_chart(r: &RepoResult) -> String {
    let (w, h) = (900.0, 760.0);
    let (left, right) = (80.0, 220.0);
    let plot_w = w - left - right;
    let (top1, h1) = (50.0, 330.0);
    let (top2, h2) = (450.0, 260.0);
    let (x_lo, x_hi) = (1e5f64.log10(), 1e10f64.log10());
    let x = |link: f64| left + (link.log10() - x_lo) / (x_hi - x_lo) * plot_w;
    let steps = 200;
    let links: Vec<f64> = (0..=steps)
        .map(|i| 10f64.powf(x_lo + (x_hi - x_lo) * i as f64 / steps as f64))
        .collect();
    let base = r.measurements.iter().find(|m| m.codec == Codec::None);

    // Panel 1 range: seconds, log scale.
    let mut ymin = f64::MAX;
    let mut ymax = f64::MIN;
    for m in &r.measurements {
        for &l in &links {
            let t = m.effective_secs(l).max(1e-3);
            ymin = ymin.min(t);
            ymax = ymax.max(t);
        }
    }
    let (ylo, yhi) = (
        ymin.log10().floor(),
        ymax.log10().ceil().max(ymin.log10().floor() + 1.0),
    );
    let y1 = |t: f64| top1 + h1 - (t.max(1e-3).log10() - ylo) / (yhi - ylo) * h1;
    // Panel 2: relative to tar, linear, zoomed on the best codec's gain (clipped above).
    let mut min_rel = 1.0f64;
    if let Some(b) = base {
        for m in &r.measurements {
            for &l in &links {
                min_rel = min_rel.min(m.effective_secs(l) / b.effective_secs(l));
            }
        }
    }
    let rlo = (((min_rel - 0.02) / 0.05).floor() * 0.05).clamp(0.0, 0.95);
    let rhi = 1.0 + (1.0 - rlo) * 1.5;
    let y2 = |v: f64| top2 + h2 - (v.clamp(rlo, rhi) - rlo) / (rhi - rlo) * h2;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let tar_bytes = base.map(|m| m.input_bytes).unwrap_or(0);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">{} ({}), tar {}: effective transfer time vs link speed</text>"#,
        xml(&r.repo),
        xml(&r.variant),
        fmt_mb(tar_bytes)
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" fill="#555">seconds = tar + compress + wire bytes / link + decompress (log-log)</text>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}" fill="#555">time relative to plain tar: below 1 the codec wins; the crossing is its breakpoint</text>"##,
        top2 - 12.0
    );
    // Axes and grid.
    for (top, hh) in [(top1, h1), (top2, h2)] {
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{hh}" fill="none" stroke="#333"/>"##
        );
        for e in 5..=10 {
            let xx = x(10f64.powi(e));
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{}" stroke="#ddd"/>"##,
                top + hh
            );
        }
    }
    let labels = [
        (1e5, "100 KB/s"),
        (1e6, "1 MB/s"),
        (1e7, "10 MB/s"),
        (1e8, "100 MB/s"),
        (1e9, "1 GB/s"),
        (1e10, "10 GB/s"),
    ];
    for (top, hh) in [(top1, h1), (top2, h2)] {
        for (v, l) in labels {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{l}</text>"#,
                x(v),
                top + hh + 16.0
            );
        }
    }
    let mut e = ylo as i32;
    while e <= yhi as i32 {
        let t = 10f64.powi(e);
        let yy = y1(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            yy + 4.0,
            if t >= 1.0 {
                format!("{t:.0} s")
            } else {
                format!("{t} s")
            }
        );
        e += 1;
    }
    let ticks: Vec<f64> = (0..=5)
        .map(|i| rlo + (rhi - rlo) * i as f64 / 5.0)
        .chain(std::iter::once(1.0))
        .collect();
    for v in ticks {
        let yy = y2(v);
        let stroke = if v == 1.0 { "#333" } else { "#ddd" };
        let v = (v * 1000.0).round() / 1000.0;
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="{stroke}"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"#,
            left + plot_w,
            left - 6.0,
            yy + 4.0
        );
    }
    // Curves and legend.
    for (i, m) in r.measurements.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if m.codec == Codec::None {
            r#" stroke-width="2.5""#
        } else {
            r#" stroke-width="1.6""#
        };
        let mut p1 = String::new();
        let mut p2 = String::new();
        for &l in &links {
            let t = m.effective_secs(l);
            let _ = write!(p1, "{:.1},{:.1} ", x(l), y1(t));
            if let Some(b) = base {
                let rel = t / b.effective_secs(l);
                let _ = write!(p2, "{:.1},{:.1} ", x(l), y2(rel));
            }
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}"{dash} points="{p1}"/>"#
        );
        if base.is_some() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}"{dash} points="{p2}"/>"#
            );
        }
        let ly = top1 + 14.0 + i as f64 * 34.0;
        let lx = left + plot_w + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            m.codec,
            if m.extrapolated { " *" } else { "" }
        );
        if let Some(bp) = m
            .breakpoint()
            .filter(|b| b.is_finite() && *b >= 1e5 && *b <= 1e10)
        {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#,
                x(bp),
                y2(1.0)
            );
        }
        if m.codec != Codec::None {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" fill="#555" font-size="11">{:+.1}%, bp {}</text>"##,
                lx + 28.0,
                ly + 18.0,
                -100.0 * m.saved_bytes() as f64 / m.input_bytes.max(1) as f64,
                fmt_rate(m.breakpoint())
            );
        }
    }
    if r.measurements.iter().any(|m| m.extrapolated) {
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}" fill="#555">* measured on evenly spaced blocks of the tar stream and scaled linearly</text>"##,
            h - 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(codec: Codec, out: u64, c: f64, d: f64) -> Measurement {
        Measurement {
            codec,
            input_bytes: 1_000_000,
            output_bytes: out,
            tar_secs: 0.1,
            compress_secs: c,
            decompress_secs: d,
            extrapolated: false,
        }
    }

    #[test]
    fn breakpoints_and_winners() {
        let ms = vec![
            m(Codec::None, 1_000_000, 0.0, 0.0),
            m(Codec::Zstd(3), 500_000, 0.4, 0.1),
            m(Codec::Gzip(6), 1_100_000, 1.0, 0.1),
        ];
        // 500 KB saved over 0.5 s: 1 MB/s.
        assert_eq!(ms[1].breakpoint(), Some(1_000_000.0));
        assert_eq!(ms[2].breakpoint(), None);
        assert_eq!(winner(&ms, 1e5).map(|m| m.codec), Some(Codec::Zstd(3)));
        assert_eq!(winner(&ms, 1e8).map(|m| m.codec), Some(Codec::None));
        let r = RepoResult {
            repo: "t".into(),
            variant: "as-is".into(),
            note: String::new(),
            measurements: ms,
        };
        let svg = svg_chart(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(markdown(std::slice::from_ref(&r)).contains("| t | as-is | zstd-3 |"));
        let text = csv(std::slice::from_ref(&r));
        assert_eq!(text.lines().count(), 4);
        let back = parse_csv(&text).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].measurements.len(), 3);
        assert_eq!(back[0].measurements[1].codec, Codec::Zstd(3));
        for c in crate::codecs::DEFAULT_CODECS {
            assert_eq!(parse_codec(&c.to_string()), Some(*c));
        }
    }
}
