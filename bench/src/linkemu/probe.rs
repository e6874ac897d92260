//! Measuring a link from inside its namespaces: a TCP stream (throughput, and so the
//! forwarder's ceiling) and UDP echo probes (round-trip time and loss).
//!
//! Sockets belong to the namespace they were created in, so each socket is made on a thread
//! inside its namespace ([`netns::in_namespace`]) and then used from ordinary threads. The
//! kernel's TCP congestion control is whatever the namespace defaults to (BBR here).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use super::netns;

/// Port the probes use inside the namespaces (which hold nothing else).
const PROBE_PORT: u16 = 5201;

/// Result of a TCP stream from side A to side B.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    pub bytes: u64,
    pub seconds: f64,
    pub mbit_per_s: f64,
}

/// Streams from `ns_a` to `addr_b` in `ns_b` for `duration`, counting what B receives.
pub fn tcp_stream(
    ns_a: &str,
    ns_b: &str,
    addr_b: Ipv4Addr,
    duration: Duration,
) -> Result<StreamResult> {
    let target = SocketAddrV4::new(addr_b, PROBE_PORT);
    let listener = netns::in_namespace(ns_b, move || {
        TcpListener::bind(target).with_context(|| format!("listen on {target} in the B namespace"))
    })?;
    let receiver = std::thread::spawn(move || -> Result<(u64, f64)> {
        let (mut conn, _) = listener.accept().context("accept")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            let n = conn.read(&mut buf).context("read")?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        Ok((total, first.map_or(0.0, |t| t.elapsed().as_secs_f64())))
    });
    let mut conn = netns::in_namespace(ns_a, move || {
        TcpStream::connect_timeout(&target.into(), Duration::from_secs(5))
            .with_context(|| format!("connect to {target} from the A namespace"))
    })?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    while start.elapsed() < duration {
        conn.write_all(&buf).context("write")?;
    }
    drop(conn);
    let (bytes, seconds) = receiver
        .join()
        .map_err(|_| anyhow!("receiver thread panicked"))??;
    let mbit_per_s = if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e6
    } else {
        0.0
    };
    Ok(StreamResult {
        bytes,
        seconds,
        mbit_per_s,
    })
}

/// Result of UDP echo probes from A to B and back.
#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    pub sent: u64,
    pub received: u64,
    /// Share of probes with no answer (either direction lost it).
    pub loss: f64,
    pub min_rtt_ms: f64,
    pub median_rtt_ms: f64,
}

/// Sends `count` numbered UDP probes from A to an echo on B, `interval` apart, and waits
/// `patience` after the last for stragglers.
pub fn udp_echo(
    ns_a: &str,
    ns_b: &str,
    addr_b: Ipv4Addr,
    count: u64,
    interval: Duration,
    patience: Duration,
) -> Result<EchoResult> {
    let target = SocketAddrV4::new(addr_b, PROBE_PORT);
    let echo = netns::in_namespace(ns_b, move || {
        UdpSocket::bind(target).with_context(|| format!("bind {target} in the B namespace"))
    })?;
    echo.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo_stop = stop.clone();
    let echo_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !echo_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let client = netns::in_namespace(ns_a, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)?;
        Ok(s)
    })?;
    client.set_read_timeout(Some(Duration::from_millis(1)))?;
    let start = Instant::now();
    let mut sent_at = Vec::with_capacity(count as usize);
    let mut rtts: Vec<f64> = Vec::new();
    let mut seen = vec![false; count as usize];
    let mut buf = [0u8; 64];
    let mut collect = |rtts: &mut Vec<f64>, sent_at: &[Instant]| {
        while let Ok(n) = client.recv(&mut buf) {
            if n >= 8 {
                let i = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8])) as usize;
                if i < sent_at.len() && !seen[i] {
                    seen[i] = true;
                    rtts.push(sent_at[i].elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    };
    for i in 0..count {
        let due = start + interval * i as u32;
        while Instant::now() < due {
            collect(&mut rtts, &sent_at);
        }
        sent_at.push(Instant::now());
        client.send(&i.to_be_bytes()).context("send probe")?;
    }
    let end = Instant::now() + patience;
    while Instant::now() < end {
        collect(&mut rtts, &sent_at);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo_thread.join();
    rtts.sort_by(|a, b| a.total_cmp(b));
    let received = rtts.len() as u64;
    Ok(EchoResult {
        sent: count,
        received,
        loss: 1.0 - received as f64 / count.max(1) as f64,
        min_rtt_ms: rtts.first().copied().unwrap_or(f64::NAN),
        median_rtt_ms: rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN),
    })
}
