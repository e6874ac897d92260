//! `shardrecv serve --metrics ADDR`: the receiver's counters for an operator's Prometheus,
//! on `GET /metrics`.
//!
//! The counters live in [`ReceiverMetrics`], updated by the driver where things happen
//! (bytes read from data streams, admissions, refusals, `Retry`s, failed verifications,
//! installs); gauges that are a state of the admissions (active, queued) are read when
//! scraped. The encoding is the `prometheus-client` crate's (the Prometheus project's own
//! Rust client: correct escaping, `# HELP`/`# TYPE`, histogram buckets, OpenMetrics text that
//! Prometheus reads natively) rather than hand-written. The HTTP side is a tiny HTTP/1.1
//! responder on the tokio listener: one request per connection, answered and closed, the
//! request head capped in size and time, so a scraper or a port scanner can hold nothing.
//!
//! `--metrics` should listen on loopback or an admin network: the numbers are not secret,
//! but nothing authenticates the scraper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wire::FailCode;

/// Label of the refusal and failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Labels of the identity gauge: a key we serve, and whether it is the primary.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    pub fingerprint: String,
    pub primary: String,
}

/// Label of the presented-identity counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub fingerprint: String,
}

/// The receiver's identities as a scrape sees them.
#[derive(Debug, Clone, Default)]
pub struct IdentityReport {
    /// Served now, the primary first.
    pub served: Vec<crate::identity::Fingerprint>,
    /// Handshakes in which each key was presented since the start.
    pub presented: Vec<(crate::identity::Fingerprint, u64)>,
}

/// Label of the completed-transfer counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

/// The `reason` label of a refusal or failure sent as `Fail{code}`.
pub fn reason_of(code: FailCode) -> &'static str {
    match code {
        FailCode::BadRequest => "bad_request",
        FailCode::Busy => "busy",
        FailCode::NoSpace => "no_space",
        FailCode::Verification => "verification",
        FailCode::Io => "io",
        FailCode::Aborted => "aborted",
        FailCode::Unauthorized => "unauthorized",
    }
}

/// The `reason` of a sender refused in the TLS handshake (its key is not allowed).
pub const NOT_ALLOWED: &str = "not_allowed";

/// Everything `/metrics` shows (names get the `shardrecv_` prefix; counters `_total`).
#[derive(Debug)]
pub struct ReceiverMetrics {
    registry: Registry,
    /// Frame bytes (headers and payloads) read from data streams.
    pub received_bytes: Counter,
    /// Transfers holding a slot, set when scraped.
    pub active: Gauge,
    /// Transfers waiting in line for a slot, set when scraped.
    pub queued: Gauge,
    pub admitted: Counter,
    /// Transfers refused before any data was accepted, by reason.
    pub refused: Family<Reason, Counter>,
    /// Accepted transfers that ended in failure, by reason (`aborted` when the sender
    /// gave up, e.g. on a changed source; its staging is kept).
    pub failed: Family<Reason, Counter>,
    /// Transfers verified and installed, or kept staged (pre-copies).
    pub completed: Family<Outcome, Counter>,
    /// `Retry`s sent (a chunk asked for again after it failed verification).
    pub chunk_retries: Counter,
    /// Chunks whose hash did not match.
    pub verify_failures: Counter,
    /// Seconds from a complete verification to the tree renamed into place.
    pub install_seconds: Histogram,
    /// Connections refused before their handshake, by reason
    /// ([`crate::handshake_limit::Why::label`]).
    pub handshakes_refused: Family<Reason, Counter>,
    /// Bytes promised to transfers in progress and not yet written, set when scraped.
    pub space_promised: Gauge,
    /// The keys served now (1 each), labelled with whether it is the primary: during a key
    /// rotation, which receivers already hold the new key.
    pub identities: Family<IdentityLabel, Gauge>,
    /// Handshakes in which each key was presented: an old key no sender asks for any more
    /// can be dropped.
    pub identity_presented: Family<KeyLabel, Counter>,
    /// Handshake refusals already counted (the allow-list counts them itself).
    tls_refusals_seen: AtomicU64,
    /// Presentations already counted, per key (the identities count them themselves).
    presented_seen: std::sync::Mutex<std::collections::HashMap<crate::identity::Fingerprint, u64>>,
}

impl Default for ReceiverMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shardrecv");
        let received_bytes = Counter::default();
        let active = Gauge::default();
        let queued = Gauge::default();
        let admitted = Counter::default();
        let refused = Family::<Reason, Counter>::default();
        let failed = Family::<Reason, Counter>::default();
        let completed = Family::<Outcome, Counter>::default();
        let chunk_retries = Counter::default();
        let verify_failures = Counter::default();
        // 5 ms to ~82 s: a small repository's renames up to a large tree's syncfs.
        let install_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let handshakes_refused = Family::<Reason, Counter>::default();
        let space_promised = Gauge::default();
        registry.register(
            "handshakes_refused",
            "Connections refused before their handshake, by reason (handshake_rate: the \
             source address's handshakes per second; handshakes_in_progress: too many at once)",
            handshakes_refused.clone(),
        );
        registry.register(
            "space_promised_bytes",
            "Disk bytes promised to transfers in progress and not yet written",
            space_promised.clone(),
        );
        registry.register(
            "received_bytes",
            "Frame bytes (headers and payloads) read from senders' data streams",
            received_bytes.clone(),
        );
        registry.register(
            "transfers_active",
            "Transfers holding one of the --max-transfers slots",
            active.clone(),
        );
        registry.register(
            "transfers_queued",
            "Transfers waiting in line for a slot",
            queued.clone(),
        );
        registry.register(
            "transfers_admitted",
            "Transfers given a slot",
            admitted.clone(),
        );
        registry.register(
            "transfers_refused",
            "Transfers refused before data was accepted, by reason (not_allowed: key not in \
             the allow-list)",
            refused.clone(),
        );
        registry.register(
            "transfers_failed",
            "Accepted transfers that ended in failure, by reason",
            failed.clone(),
        );
        registry.register(
            "transfers_completed",
            "Transfers verified, then installed or kept staged",
            completed.clone(),
        );
        registry.register(
            "chunk_retries",
            "Chunks asked for again after they failed verification",
            chunk_retries.clone(),
        );
        registry.register(
            "verify_failures",
            "Chunks whose BLAKE3 hash did not match",
            verify_failures.clone(),
        );
        registry.register(
            "install_seconds",
            "Seconds to install a verified tree (owners, modes, syncfs, renames)",
            install_seconds.clone(),
        );
        let identities = Family::<IdentityLabel, Gauge>::default();
        let identity_presented = Family::<KeyLabel, Counter>::default();
        registry.register(
            "identity",
            "Key fingerprints this receiver serves (1 each); primary=\"true\" for the one \
             presented to senders that name none",
            identities.clone(),
        );
        registry.register(
            "identity_presented",
            "Handshakes in which each key was presented (the sender's server name chose it, \
             or the primary)",
            identity_presented.clone(),
        );
        ReceiverMetrics {
            identities,
            identity_presented,
            registry,
            received_bytes,
            active,
            queued,
            admitted,
            refused,
            failed,
            completed,
            chunk_retries,
            verify_failures,
            install_seconds,
            handshakes_refused,
            space_promised,
            tls_refusals_seen: AtomicU64::new(0),
            presented_seen: Default::default(),
        }
    }

    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn handshake_refused(&self, why: crate::handshake_limit::Why) {
        self.handshakes_refused
            .get_or_create(&Reason {
                reason: why.label().to_string(),
            })
            .inc();
    }

    pub fn fail(&self, reason: &str) {
        self.failed
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn complete(&self, outcome: &str) {
        self.completed
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The text for a scrape. `tls_refusals` is the allow-list's running count of senders
    /// refused in the handshake; `active` and `queued` the admissions' state now;
    /// `identities` the keys served now and how often each was presented.
    pub fn render(
        &self,
        tls_refusals: u64,
        active: u64,
        queued: u64,
        identities: &IdentityReport,
    ) -> String {
        // A reload may have dropped a key: the gauge shows only what is served now.
        self.identities.clear();
        for (i, fp) in identities.served.iter().enumerate() {
            self.identities
                .get_or_create(&IdentityLabel {
                    fingerprint: fp.to_string(),
                    primary: (i == 0).to_string(),
                })
                .set(1);
        }
        // One scrape at a time moves the counters (a poisoned lock only means a scrape
        // panicked after counting: its counts stand).
        let mut seen = match self.presented_seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (fp, count) in &identities.presented {
            let before = seen.insert(*fp, *count).unwrap_or(0);
            self.identity_presented
                .get_or_create(&KeyLabel {
                    fingerprint: fp.to_string(),
                })
                .inc_by(count.saturating_sub(before));
        }
        drop(seen);
        let seen = self.tls_refusals_seen.swap(tls_refusals, Ordering::Relaxed);
        if tls_refusals > seen {
            self.refused
                .get_or_create(&Reason {
                    reason: NOT_ALLOWED.to_string(),
                })
                .inc_by(tls_refusals - seen);
        }
        self.active.set(i64::try_from(active).unwrap_or(i64::MAX));
        self.queued.set(i64::try_from(queued).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The `Content-Type` of [`ReceiverMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Largest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP answer: status line text, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

/// What to answer to a request head (`GET /metrics HTTP/1.1` ...); `metrics` renders the
/// body only when asked for it.
pub fn route(head: &[u8], metrics: impl FnOnce() -> String) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let text = |status, body: &str| Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_string(),
    };
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return text("400 Bad Request", "expected an HTTP/1.x request\n");
    }
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    match (method, path) {
        (Some("GET" | "HEAD"), Some("/metrics")) => Response {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            body: metrics(),
        },
        (Some("GET" | "HEAD"), _) => text("404 Not Found", "only /metrics is served here\n"),
        _ => text(
            "405 Method Not Allowed",
            "only GET /metrics is served here\n",
        ),
    }
}

/// Serves `/metrics` on `listener` until the task is dropped; `metrics` renders a scrape.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, metrics).await {
                tracing::debug!(%peer, error = %e, "metrics: request not answered");
            }
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    metrics: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_REQUEST_HEAD {
                return Err(std::io::Error::other("request head too large"));
            }
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let head_only = head.starts_with(b"HEAD ");
    let r = route(&head, || metrics());
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Binds the `--metrics` listener (at start, so a bad address is an error before serving).
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| crate::Error::io(format!("--metrics {addr}"), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| crate::Error::io("metrics listener", e))?;
    tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| crate::Error::io("metrics listener", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line is `name{labels} value` (value a number), and every family has
    /// `# HELP` and `# TYPE`.
    fn assert_parses(text: &str) {
        let mut typed = std::collections::HashSet::new();
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_string());
            } else if line == "# EOF" || line.starts_with("# UNIT") {
            } else {
                let (name, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap();
                let family = name.split('{').next().unwrap();
                assert!(
                    typed.iter().any(|t| family.starts_with(t.as_str())),
                    "no TYPE for {line}"
                );
            }
        }
        assert_eq!(typed, helped);
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = ReceiverMetrics::new();
        m.received_bytes.inc_by(1234);
        m.admitted.inc();
        m.refuse(reason_of(FailCode::Busy));
        m.fail(reason_of(FailCode::Verification));
        m.complete("installed");
        m.chunk_retries.inc();
        m.verify_failures.inc_by(2);
        m.install_seconds.observe(0.02);
        let (a, b) = (
            crate::identity::Fingerprint([0xaa; 32]),
            crate::identity::Fingerprint([0xbb; 32]),
        );
        let report = IdentityReport {
            served: vec![a, b],
            presented: vec![(a, 4), (b, 1)],
        };
        let text = m.render(3, 2, 1, &report);
        assert_parses(&text);
        let (ha, hb) = (a.to_string(), b.to_string());
        assert!(
            text.contains(&format!(
                "shardrecv_identity{{fingerprint=\"{ha}\",primary=\"true\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "shardrecv_identity{{fingerprint=\"{hb}\",primary=\"false\"}} 1"
        )));
        assert!(text.contains(&format!(
            "shardrecv_identity_presented_total{{fingerprint=\"{ha}\"}} 4"
        )));
        // After a reload that dropped `a`: only `b` is served (now primary); counts stay.
        let after = IdentityReport {
            served: vec![b],
            presented: vec![(a, 4), (b, 3)],
        };
        let text2 = m.render(3, 2, 1, &after);
        assert!(!text2.contains(&format!("shardrecv_identity{{fingerprint=\"{ha}\"")));
        assert!(text2.contains(&format!(
            "shardrecv_identity{{fingerprint=\"{hb}\",primary=\"true\"}} 1"
        )));
        assert!(text2.contains(&format!(
            "shardrecv_identity_presented_total{{fingerprint=\"{hb}\"}} 3"
        )));
        for want in [
            "shardrecv_received_bytes_total 1234",
            "shardrecv_transfers_active 2",
            "shardrecv_transfers_queued 1",
            "shardrecv_transfers_admitted_total 1",
            "shardrecv_transfers_refused_total{reason=\"busy\"} 1",
            "shardrecv_transfers_refused_total{reason=\"not_allowed\"} 3",
            "shardrecv_transfers_failed_total{reason=\"verification\"} 1",
            "shardrecv_transfers_completed_total{outcome=\"installed\"} 1",
            "shardrecv_chunk_retries_total 1",
            "shardrecv_verify_failures_total 2",
            "shardrecv_install_seconds_count 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // The handshake refusals are counted once, however often scraped.
        assert!(m
            .render(3, 0, 0, &report)
            .contains("shardrecv_transfers_refused_total{reason=\"not_allowed\"} 3"));
        assert!(m
            .render(5, 0, 0, &report)
            .contains("shardrecv_transfers_refused_total{reason=\"not_allowed\"} 5"));
    }

    #[test]
    fn only_get_metrics_is_served() {
        let body = || "x 1\n".to_string();
        let ok = route(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", body);
        assert_eq!((ok.status, ok.body.as_str()), ("200 OK", "x 1\n"));
        assert_eq!(ok.content_type, CONTENT_TYPE);
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", body).status,
            "200 OK"
        );
        assert_eq!(
            route(b"GET / HTTP/1.1\r\n\r\n", body).status,
            "404 Not Found"
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n", body).status,
            "405 Method Not Allowed"
        );
        assert_eq!(
            route(b"\x16\x03\x01garbage", body).status,
            "400 Bad Request"
        );
        assert_eq!(route(b"", body).status, "400 Bad Request");
    }
}
