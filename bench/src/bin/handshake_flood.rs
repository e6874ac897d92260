//! `handshake-flood`: unauthenticated QUIC handshakes against a `shardrecv`, at a steady
//! rate, from a chosen local address: the attack of issue 15 item 3, for its test and its
//! benchmark (`scripts/bench-flood.sh`).
//!
//! Each attempt is a real connection attempt with a key the receiver does not allow (a
//! fresh one unless `--identity` names one), so an unprotected receiver does the full
//! handshake work for each. Attempts are started at `count / seconds` per second, at most
//! `--in-flight` at once, each given up after `--timeout`. The summary (JSON on stdout) says
//! how they ended: refused before the handshake (the receiver's limiter), failed in the
//! handshake (the allow-list), timed out, or connected (which would be a bug).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use transfer::identity::{client_crypto, Fingerprint, Identity};

#[derive(Parser)]
#[command(
    name = "handshake-flood",
    about = "Unauthenticated QUIC handshakes against a shardrecv at a steady rate (a benchmark tool)"
)]
struct Cli {
    /// The receiver, IP:PORT
    target: SocketAddr,
    /// The receiver's fingerprint (the handshake gets as far as an allowed key would)
    #[arg(long)]
    peer: String,
    /// Local address to send from (e.g. 127.0.0.2: a flood from another host than the
    /// authorised sender's)
    #[arg(long, default_value = "127.0.0.2")]
    from: std::net::IpAddr,
    /// Attempts in all
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Over this many seconds
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Attempts in flight at most
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Seconds before an attempt is given up
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// A key to present (default: a fresh one, which no allow-list holds)
    #[arg(long)]
    identity: Option<std::path::PathBuf>,
}

#[derive(Default, serde::Serialize)]
struct Summary {
    attempts: u64,
    /// Refused before any handshake work (CONNECTION_REFUSED).
    refused: u64,
    /// The handshake ran and failed (the key is not allowed).
    handshake_failed: u64,
    timed_out: u64,
    /// A connection was made: the receiver let an unknown key in.
    connected: u64,
    other: u64,
    seconds: f64,
    attempts_per_second: f64,
}

/// How attempts ended, counted by the attempts' tasks.
#[derive(Default)]
struct Endings {
    refused: AtomicU64,
    handshake_failed: AtomicU64,
    timed_out: AtomicU64,
    connected: AtomicU64,
    other: AtomicU64,
}

impl Endings {
    /// An attempt that failed before the client's side of the handshake ended (`None`:
    /// it timed out).
    fn count_failure(&self, error: Option<quinn::ConnectionError>) {
        let counter = match error {
            None | Some(quinn::ConnectionError::TimedOut) => &self.timed_out,
            Some(quinn::ConnectionError::ConnectionClosed(close))
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                &self.refused
            }
            Some(quinn::ConnectionError::ConnectionClosed(_))
            | Some(quinn::ConnectionError::TransportError(_)) => &self.handshake_failed,
            Some(_) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.count == 0 || cli.seconds <= 0.0 || cli.in_flight == 0 || cli.timeout <= 0.0 {
        bail!("--count, --seconds, --in-flight and --timeout must be positive");
    }
    let keys = tempfile::tempdir()?;
    let identity = match &cli.identity {
        Some(path) => Identity::load(path)?,
        None => Identity::generate(&keys.path().join("flood.key"))?,
    };
    let peer = Fingerprint::parse(&cli.peer)?;
    let crypto = client_crypto(&identity, &[peer])?;
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).context("QUIC client config")?;
    let client = quinn::ClientConfig::new(Arc::new(quic));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let endings = Arc::new(Endings::default());
    let started = Instant::now();
    rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(cli.from, 0))
            .with_context(|| format!("bind {}", cli.from))?;
        endpoint.set_default_client_config(client);
        let slots = Arc::new(tokio::sync::Semaphore::new(cli.in_flight));
        let interval = Duration::from_secs_f64(cli.seconds / cli.count as f64);
        let timeout = Duration::from_secs_f64(cli.timeout);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..cli.count {
            tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
            let permit = slots.clone().acquire_owned().await?;
            let connecting = endpoint.connect(cli.target, "shardxfer")?;
            let endings = endings.clone();
            tasks.spawn(async move {
                let attempt = tokio::time::timeout(timeout, connecting).await;
                match attempt {
                    // TLS 1.3: the client's side of the handshake ends before the receiver
                    // checked its certificate; a refused key closes the connection then.
                    Ok(Ok(conn)) => match tokio::time::timeout(timeout, conn.closed()).await {
                        Ok(_) => endings.handshake_failed.fetch_add(1, Ordering::Relaxed),
                        Err(_) => endings.connected.fetch_add(1, Ordering::Relaxed),
                    },
                    Ok(Err(e)) => {
                        endings.count_failure(Some(e));
                        0
                    }
                    Err(_) => {
                        endings.count_failure(None);
                        0
                    }
                };
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        endpoint.close(0u32.into(), b"done");
        anyhow::Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let summary = Summary {
        attempts: cli.count,
        refused: load(&endings.refused),
        handshake_failed: load(&endings.handshake_failed),
        timed_out: load(&endings.timed_out),
        connected: load(&endings.connected),
        other: load(&endings.other),
        seconds,
        attempts_per_second: cli.count as f64 / seconds,
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
