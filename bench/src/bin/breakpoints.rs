//! `breakpoints`: the link speed below which compressing a repository transfer pays, per
//! codec, measured on real repositories. Reproduces and extends the runbook's tar/tgz table.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bench::codecs::{measure, measure_tar, Codec, DEFAULT_CODECS};
use bench::report::{csv, markdown, parse_csv, svg_chart, RepoResult};
use clap::Parser;

/// Measure tar, gzip -6, zstd -1/-3/-9/-19, multithreaded zstd and shardsend's chunked zstd
/// on each repository (as is, and after `git repack -a -d` on a copy), counting compression
/// *and* decompression time, and write a markdown table, CSV and one SVG chart per result.
///
/// The tar stream is built in memory with the `tar` crate and never stored: it flows through
/// the encoder into the decoder into a byte counter, so memory stays bounded at any size.
/// The page cache is warmed by a first tar pass; times are wall-clock on this machine
/// (`--repeat N` keeps the fastest of N runs).
///
/// Breakpoint = bytes saved / (compress + decompress seconds): links slower than it gain from
/// compressing. Link speeds and sizes in the outputs are decimal (1 MB/s = 10^6 bytes/s).
///
/// Example:
///   cargo run --release -p bench --bin breakpoints -- /tmp/fx/bare-200M /srv/repos/big.git
#[derive(Debug, Parser)]
#[command(name = "breakpoints", verbatim_doc_comment)]
struct Cli {
    /// Repositories (bare or with a working copy) or any directories to measure
    #[arg(required_unless_present = "from_csv", value_name = "REPO")]
    repos: Vec<PathBuf>,

    /// Measure nothing: re-render results.md and the charts from a results.csv written earlier
    #[arg(long, value_name = "CSV", conflicts_with = "repos")]
    from_csv: Option<PathBuf>,

    /// Directory for results.md, results.csv and chart-*.svg
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,

    /// Skip the `git repack -a -d` variant
    #[arg(long)]
    no_repack: bool,

    /// Where repacked copies are made (and deleted afterwards)
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,

    /// Codecs slower than zstd -9 (zstd -19) see only about this many bytes of the tar
    /// stream, in evenly spaced 4 MiB blocks, and their figures are scaled to the whole;
    /// 0 = measure everything
    #[arg(long, default_value = "256M", value_parser = parse_size_arg)]
    slow_sample: u64,

    /// Measure each codec this many times and keep the fastest run (guards against other
    /// load on the machine); sampled slow codecs run once
    #[arg(long, default_value_t = 1)]
    repeat: u32,

    /// Codecs to measure, comma-separated (default: tar,gzip-6,zstd-1,zstd-3,zstd-9,zstd-19,
    /// zstd-3-mt2,shardsend); names as in the results
    #[arg(long, value_delimiter = ',', value_parser = parse_codec_arg)]
    codecs: Vec<Codec>,

    /// Label for each repository, in order (default: the directory name)
    #[arg(long = "label", value_name = "NAME")]
    labels: Vec<String>,
}

fn parse_codec_arg(s: &str) -> Result<Codec, String> {
    bench::report::parse_codec(s).ok_or_else(|| {
        format!("unknown codec {s:?}: use tar, gzip-L, zstd-L, zstd-L-mtN or shardsend")
    })
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    fixtures::parse_size(s).map_err(|e| e.to_string())
}

fn label_of(p: &Path) -> String {
    let canon = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| canon.display().to_string())
}

fn measure_all(
    dir: &Path,
    repo: &str,
    variant: &str,
    note: String,
    cli: &Cli,
) -> Result<RepoResult> {
    // Warm the page cache, then measure plain tar.
    measure_tar(dir).with_context(|| format!("reading {}", dir.display()))?;
    let (tar_bytes, mut tar_secs) = measure_tar(dir)?;
    for _ in 1..cli.repeat.max(1) {
        tar_secs = tar_secs.min(measure_tar(dir)?.1);
    }
    eprintln!(
        "  {repo} ({variant}): tar {:.1} MB in {:.2} s",
        tar_bytes as f64 / 1e6,
        tar_secs
    );
    let mut ms = Vec::new();
    let codecs: &[Codec] = if cli.codecs.is_empty() {
        DEFAULT_CODECS
    } else {
        &cli.codecs
    };
    for &codec in codecs {
        let limit = match codec {
            Codec::Zstd(l) if l > 9 && cli.slow_sample > 0 => Some(cli.slow_sample),
            _ => None,
        };
        let mut best: Option<bench::codecs::Measurement> = None;
        // Sampled slow codecs run once: minutes each, and their noise is small relative.
        let reps = if limit.is_some() {
            1
        } else {
            cli.repeat.max(1)
        };
        for _ in 0..reps {
            let m = measure(dir, codec, tar_bytes, tar_secs, limit)
                .with_context(|| format!("measuring {codec} on {}", dir.display()))?;
            let total = |m: &bench::codecs::Measurement| m.compress_secs + m.decompress_secs;
            if best.as_ref().is_none_or(|b| total(&m) < total(b)) {
                best = Some(m);
            }
        }
        let Some(m) = best else {
            bail!("no measurement of {codec}");
        };
        eprintln!(
            "    {:<12} {:>9.1} MB  c {:>7.2} s  d {:>6.2} s{}",
            codec.to_string(),
            m.output_bytes as f64 / 1e6,
            m.compress_secs,
            m.decompress_secs,
            if m.extrapolated {
                "  (scaled from a sample)"
            } else {
                ""
            }
        );
        ms.push(m);
    }
    Ok(RepoResult {
        repo: repo.to_string(),
        variant: variant.to_string(),
        note,
        measurements: ms,
    })
}

fn run_git(dir: &Path, args: &[&str]) -> Result<()> {
    let st = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .status()
        .context("running git (is it installed?)")?;
    if !st.success() {
        bail!("git {} in {} failed: {st}", args.join(" "), dir.display());
    }
    Ok(())
}

fn repacked(src: &Path, label: &str, cli: &Cli) -> Result<RepoResult> {
    let copy = cli
        .work_dir
        .join(format!("breakpoints-{}-{label}", std::process::id()));
    if copy.exists() {
        fs::remove_dir_all(&copy).with_context(|| format!("removing {}", copy.display()))?;
    }
    let t = Instant::now();
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&copy)
        .status()
        .context("running cp")?;
    if !st.success() {
        bail!("cp -a {} {} failed: {st}", src.display(), copy.display());
    }
    let copy_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = run_git(&copy, &["repack", "-a", "-d", "-q"]).and_then(|_| {
        let repack_secs = t.elapsed().as_secs_f64();
        measure_all(
            &copy,
            label,
            "repacked",
            format!("cp {copy_secs:.1} s, repack -a -d {repack_secs:.1} s"),
            cli,
        )
    });
    let _ = fs::remove_dir_all(&copy);
    r
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.labels.is_empty() && cli.labels.len() != cli.repos.len() {
        bail!(
            "{} labels for {} repositories: give one --label per REPO or none",
            cli.labels.len(),
            cli.repos.len()
        );
    }
    for r in &cli.repos {
        if !r.is_dir() {
            bail!("{} is not a directory", r.display());
        }
    }
    fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    if let Some(csv_path) = &cli.from_csv {
        let text = fs::read_to_string(csv_path)
            .with_context(|| format!("reading {}", csv_path.display()))?;
        let results = parse_csv(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("parsing {}", csv_path.display()))?;
        write_outputs(&cli.out, &results)?;
        println!("{}", markdown(&results));
        return Ok(());
    }
    let mut results = Vec::new();
    for (i, repo) in cli.repos.iter().enumerate() {
        let label = cli.labels.get(i).cloned().unwrap_or_else(|| label_of(repo));
        eprintln!("{label}: {}", repo.display());
        results.push(measure_all(repo, &label, "as-is", String::new(), &cli)?);
        if !cli.no_repack {
            results.push(repacked(repo, &label, &cli)?);
        }
        // Write after every repository so a long run leaves partial results.
        write_outputs(&cli.out, &results)?;
    }
    println!("{}", markdown(&results));
    eprintln!(
        "wrote {}/results.md, results.csv, chart-*.svg",
        cli.out.display()
    );
    Ok(())
}

fn write_outputs(out: &Path, results: &[RepoResult]) -> Result<()> {
    let w = |name: &str, text: String| -> Result<()> {
        let p = out.join(name);
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    w("results.md", markdown(results))?;
    w("results.csv", csv(results))?;
    for r in results {
        let safe: String = format!("{}-{}", r.repo, r.variant)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        w(&format!("chart-{safe}.svg"), svg_chart(r))?;
    }
    Ok(())
}
