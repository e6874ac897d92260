//! QUIC endpoints tuned for bulk data.
//!
//! quinn's defaults suit interactive traffic, not multi-GB copies. What we change and why:
//! - **Congestion control** ([`Congestion`], `--congestion` on both binaries). Measured with
//!   `scripts/bench-wan.sh` over linkemu (bench/RESULTS.md, "WAN congestion choice"): on a
//!   100 Mbit/s, 50 ms link quinn's Cubic (its default) and NewReno fall to 3-13% of the link
//!   at 0.1-1% random loss, because every loss event shrinks their window and a long path
//!   needs hundreds of round trips to grow it back; BBR models the path (bottleneck rate,
//!   minimum RTT) instead and keeps ~90% at 0, 0.1% and 1% loss, at least 1.3x scp (kernel
//!   TCP BBR). So **BBR is the default off loopback** (`auto`). On a loopback path there is
//!   no loss to survive, and quinn's BBR costs throughput there: measured on this machine
//!   (1 GiB, `--compress off`, quiet), 1.19-1.27 s with BBR against 1.07 s with Cubic, which
//!   also sends far fewer packets back (the sender's `recvmmsg` calls 5,358 against 1,178
//!   before the default was BBR); so `auto` is Cubic on loopback. quinn's BBR also sent ~2-3x
//!   what a drop-tail bottleneck carries (over half its packets dropped at a 50 ms queue):
//!   its rate estimate and quinn's window-based pacing do not fit together. So `bbr` is now
//!   our own model ([`crate::bbr`], whose window is its in-flight target): the same or better
//!   throughput (100 Mbit/s, 50 ms: 93% at 0, 0.1 and 1% loss; 1 Gbit/s, 50 ms, 0.1%: 79-85%
//!   against 77-79%) with about 1% of its packets dropped and 11-48% less sender CPU;
//!   quinn's stays as `quinn-bbr` for comparison. Next to one kernel TCP flow (BBR) on a
//!   100 Mbit link, quinn's BBR left that flow 17-24%; ours, whose window stays near the BDP,
//!   leaves it 81% (RESULTS, "WAN: a BBR whose window is its target"). Yielding is measured,
//!   not promised (another controller may behave otherwise), so a migration's default stays
//!   `background` ([`crate::background`]), a delay-based scavenger that
//!   backs off when a queue builds (a competing TCP flow keeps 84-92% of the link) and shrinks
//!   only mildly on loss, so alone it still reaches 87% / 80% / 83% of the same link at 0%,
//!   1% and bursty loss, with ~1.5% of its packets dropped. It is meant
//!   for `shardmove migrate` (background traffic by nature). Cubic and NewReno stay
//!   available for comparison.
//! - **Flow-control windows.** quinn's defaults (stream receive 1.25 MB, send 10 MB) cap a
//!   single connection near `window / RTT`. What may be in flight is the smallest of the
//!   sender's send window ([`SEND_WINDOW`], 16 MiB), the receiver's connection window
//!   ([`CONNECTION_WINDOW`], 32 MiB) and streams x [`STREAM_WINDOW`] (4 x 4 MiB): 16 MiB,
//!   which covers 1 Gbit/s up to ~130 ms of RTT. Both ends take `--window SIZE` (4M-256M) for
//!   longer or faster paths; shardsend then opens at least SIZE / 4M streams. The windows are
//!   also each end's memory bound (unacknowledged data on the sender, unread data on the
//!   receiver), which is why they are an explicit, bounded option rather than unbounded
//!   growth. Measured over linkemu at 1 Gbit/s, 150 ms (load 8-10, bench/RESULTS.md "WAN
//!   windows"): 60-74 MB/s with the defaults and the same with `--window 64M` on both ends,
//!   whatever the stream count (4, 8, 16): on this machine CPU, not the windows, held it.
//!   The *stream* window is kept at [`STREAM_WINDOW`] = 4 MiB for a different reason:
//!   quinn-proto 0.11.19 aborts a connection ("too many gaps in stream buffer") when a stream's
//!   reassembly buffer holds more than 1024 separate pieces; with 16 MiB stream windows BBR's
//!   startup overshoot (40% of packets lost at the queue) did exactly that on a 100 Mbit, 50 ms
//!   link, while 4 MiB (~2,900 packets, so at most ~730 pieces at any loss rate) completed.
//!   Several data streams share the connection window, so the stream window bounds only one
//!   stream's share.
//! - **Datagram size.** Per-packet cost dominates on fast paths. Measured in DESIGN.md
//!   (quinn 0.11, loopback): 1452-byte packets give 1.1-1.3 GB/s, 4096 gives 2.0-2.9 GB/s,
//!   and past ~8 KB it *drops* (GSO batches shrink). On loopback (MTU 64 KiB) we start at
//!   [`LOOPBACK_MTU`]; elsewhere we start at QUIC's safe 1200 and let MTU discovery climb to
//!   what a 1500-byte Ethernet carries: 1472 over IPv4 ([`ETHERNET_MTU_V4`]), 1452 over IPv6
//!   ([`ETHERNET_MTU_V6`]). quinn's one default (1452) fits both, but over IPv4 it leaves 20
//!   bytes of every full packet unused: ~1.4% of a WAN link in theory, where the per-packet
//!   overhead (IP, UDP, QUIC header, frame header, AEAD tag: ~70 bytes) already caps the
//!   payload at ~95% of the link. Measured over linkemu (100 Mbit/s, 50 ms): no change yet
//!   (93% of the link before and after, bench/RESULTS.md); whether discovery reaches 1472
//!   there is unchecked. A path with a smaller MTU (tunnels, PPPoE) loses the probes and
//!   discovery settles lower, as it would from 1452. `tests::mtu_choice_is_guarded` pins this.
//! - **UDP socket buffers.** Linux caps `SO_RCVBUF`/`SO_SNDBUF` at `net.core.rmem_max`
//!   (212992 bytes by default); at GB/s a burst overflows that and every drop costs a
//!   congestion-window cut. We ask for [`SOCKET_BUFFER`], use `SO_*BUFFORCE` when root (it
//!   bypasses the cap), and log a warning when the kernel gives less than asked.
//! - **GSO/GRO** stay on (quinn's default, set explicitly): one syscall per batch of packets.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::path_memory::{Ending, Resume};

use crate::error::Error;

/// Initial datagram size on loopback, the best point of the measured curve (DESIGN.md 3).
pub const LOOPBACK_MTU: u16 = 4096;
/// MTU discovery ceiling off loopback over IPv4: 1500-byte Ethernet minus IPv4 (20) and UDP
/// (8) headers.
pub const ETHERNET_MTU_V4: u16 = 1472;
/// MTU discovery ceiling off loopback over IPv6: 1500-byte Ethernet minus IPv6 (40) and UDP
/// (8) headers.
pub const ETHERNET_MTU_V6: u16 = 1452;
/// Connection-level receive and send window.
pub const CONNECTION_WINDOW: u64 = 32 << 20;
/// Send window: 16 MiB covers 1.3 GB/s at 12 ms RTT, and bounds the sender's buffered data.
pub const SEND_WINDOW: u64 = 16 << 20;
/// Per-stream receive window: bounded by quinn's reassembly limit (module doc), and the
/// data streams share the connection window.
pub const STREAM_WINDOW: u64 = 4 << 20;
/// UDP socket buffer size requested from the kernel.
pub const SOCKET_BUFFER: usize = 32 << 20;
/// Silence after which a connection counts as lost (a cut link); the sender then reconnects
/// and resumes (`send::reconnect`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most concurrent data streams a receiver allows per connection.
pub const MAX_DATA_STREAMS: u32 = 64;

/// Congestion controller of a connection (see the module doc for why the default is what it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR, except Cubic on a loopback path (module doc).
    #[default]
    Auto,
    /// Our BBR model ([`crate::bbr`]): its window is its in-flight target.
    Bbr,
    /// quinn's own BBR, kept to compare against (it overflows drop-tail queues: [`crate::bbr`]).
    QuinnBbr,
    Cubic,
    NewReno,
    /// Delay-based scavenger ([`crate::background`]): yields to other traffic.
    Background,
}

impl Congestion {
    pub const NAMES: &'static str = "auto, bbr, quinn-bbr, cubic, newreno, background";

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Auto => "auto",
            Congestion::Bbr => "bbr",
            Congestion::QuinnBbr => "quinn-bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Background => "background",
        }
    }

    /// The controller `self` means on a path to `peer` (`auto` decided).
    pub fn for_peer(self, peer: IpAddr) -> Congestion {
        match self {
            Congestion::Auto if peer.is_loopback() => Congestion::Cubic,
            Congestion::Auto => Congestion::Bbr,
            chosen => chosen,
        }
    }

    /// Whether this controller starts from a path's memory ([`crate::path_memory`]) and
    /// leaves one: ours do; Cubic, NewReno and quinn's BBR always start cold.
    pub fn remembers_paths(self) -> bool {
        matches!(
            self,
            Congestion::Auto | Congestion::Bbr | Congestion::Background
        )
    }

    fn factory(
        self,
        resume: Option<Resume>,
    ) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Auto | Congestion::Bbr => Arc::new(crate::bbr::BbrFactory {
                config: crate::bbr::BbrConfig {
                    resume,
                    ..Default::default()
                },
            }),
            Congestion::QuinnBbr => Arc::new(BbrConfig::default()),
            Congestion::Cubic => Arc::new(CubicConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
            Congestion::Background => Arc::new(crate::background::BackgroundFactory {
                config: crate::background::BackgroundConfig {
                    resume,
                    ..Default::default()
                },
            }),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Congestion::Auto),
            "bbr" => Ok(Congestion::Bbr),
            "quinn-bbr" => Ok(Congestion::QuinnBbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            "background" => Ok(Congestion::Background),
            _ => Err(format!(
                "unknown congestion controller {s:?} (one of {})",
                Congestion::NAMES
            )),
        }
    }
}

/// Transport choices an operator can make (`--congestion`, `--window`); the rest is chosen
/// per path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransportOptions {
    pub congestion: Congestion,
    /// Bytes in flight per connection (send window, and connection receive window on the
    /// receiving side); `None` keeps [`CONNECTION_WINDOW`] / [`SEND_WINDOW`].
    pub window: Option<u64>,
    /// Where the sender's controller may start from ([`crate::path_memory`]); `None` on a
    /// receiver, and for a path not remembered.
    pub resume: Option<Resume>,
}

/// Smallest and largest `--window`: below 4 MiB a single stream stalls; above 256 MiB one
/// transfer's buffers would dwarf the per-end memory budget.
pub const MIN_WINDOW: u64 = 4 << 20;
pub const MAX_WINDOW: u64 = 256 << 20;

/// Parses `--window` (`64M`, binary suffixes) within [`MIN_WINDOW`, `MAX_WINDOW`].
pub fn parse_window(text: &str) -> Result<u64, String> {
    let bytes = crate::units::parse_size(text)?;
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&bytes) {
        return Err(format!("--window {text}: must be between 4M and 256M"));
    }
    Ok(bytes)
}

/// Transport settings chosen for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicTuning {
    pub initial_mtu: u16,
    pub mtu_upper_bound: u16,
    pub connection_window: u64,
    pub stream_window: u64,
    /// Unacknowledged data the sender keeps (each byte of it is sender memory).
    pub send_window: u64,
    pub congestion: Congestion,
    pub resume: Option<Resume>,
}

impl QuicTuning {
    /// Settings for a path to (or from) `peer`.
    pub fn for_peer(peer: IpAddr, options: &TransportOptions) -> Self {
        // An IPv4 peer reached through a dual-stack socket shows as ::ffff:a.b.c.d; its
        // packets are IPv4 on the wire.
        let (initial_mtu, mtu_upper_bound) = match peer.to_canonical() {
            peer if peer.is_loopback() => (LOOPBACK_MTU, LOOPBACK_MTU),
            IpAddr::V4(_) => (1200, ETHERNET_MTU_V4),
            IpAddr::V6(_) => (1200, ETHERNET_MTU_V6),
        };
        QuicTuning {
            initial_mtu,
            mtu_upper_bound,
            connection_window: options.window.unwrap_or(CONNECTION_WINDOW),
            stream_window: STREAM_WINDOW,
            send_window: options.window.unwrap_or(SEND_WINDOW),
            congestion: options.congestion.for_peer(peer),
            resume: options.resume,
        }
    }

    pub fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX))
            .receive_window(VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX))
            .send_window(self.send_window)
            .initial_mtu(self.initial_mtu)
            .min_mtu(self.initial_mtu.min(1200))
            .enable_segmentation_offload(true)
            .send_fairness(false)
            .max_concurrent_uni_streams(VarInt::from_u32(MAX_DATA_STREAMS))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .congestion_controller_factory(self.congestion.factory(self.resume))
            // A cut link is noticed within the idle timeout; keep-alives stop a quiet
            // control stream (the receiver fsyncing a large tree) from tripping it.
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s fits"),
            ))
            .keep_alive_interval(Some(Duration::from_secs(3)));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound);
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

/// What the path's memory should keep of `conn` ([`crate::path_memory`]): its controller's
/// window and the path's minimum RTT; `None` for controllers that do not remember, or
/// before anything was measured.
pub fn path_ending(conn: &quinn::Connection) -> Option<Ending> {
    let controller = conn.congestion_state().into_any();
    match controller.downcast::<crate::bbr::Bbr>() {
        Ok(bbr) => bbr.ending(),
        Err(other) => other
            .downcast::<crate::background::Background>()
            .ok()
            .and_then(|b| b.ending()),
    }
}

/// Binds a UDP socket with enlarged buffers (see module docs).
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let io = |e| Error::io(format!("udp socket {addr}"), e);
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    raise_buffer(&sock, Direction::Receive);
    raise_buffer(&sock, Direction::Send);
    sock.bind(&addr.into()).map_err(io)?;
    Ok(sock.into())
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Receive,
    Send,
}

fn raise_buffer(sock: &socket2::Socket, dir: Direction) {
    use std::os::fd::AsRawFd;
    let (force_opt, name) = match dir {
        Direction::Receive => (libc::SO_RCVBUFFORCE, "SO_RCVBUF"),
        Direction::Send => (libc::SO_SNDBUFFORCE, "SO_SNDBUF"),
    };
    let want = SOCKET_BUFFER as libc::c_int;
    // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its size.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            force_opt,
            (&want as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = match dir {
            Direction::Receive => sock.set_recv_buffer_size(SOCKET_BUFFER),
            Direction::Send => sock.set_send_buffer_size(SOCKET_BUFFER),
        };
    }
    let got = match dir {
        Direction::Receive => sock.recv_buffer_size(),
        Direction::Send => sock.send_buffer_size(),
    }
    .unwrap_or(0);
    // Linux reports twice the usable size it granted.
    if got / 2 < SOCKET_BUFFER {
        tracing::warn!(
            option = name,
            asked = SOCKET_BUFFER,
            granted = got / 2,
            "kernel granted a smaller UDP buffer than asked; raise net.core.rmem_max / wmem_max \
             or run as root for throughput beyond a few hundred MB/s"
        );
    } else {
        tracing::debug!(option = name, granted = got / 2, forced, "UDP buffer size");
    }
}

/// Endpoint settings: accept datagrams up to the UDP maximum. quinn's default (1472) is
/// advertised to the peer as `max_udp_payload_size`, which silently caps the datagram size
/// at Ethernet's even on loopback, whatever `initial_mtu` says.
fn endpoint_config() -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    cfg.max_udp_payload_size(65_527)
        .expect("65527 is quinn's documented maximum");
    cfg
}

fn runtime() -> Result<Arc<dyn quinn::Runtime>, Error> {
    quinn::default_runtime().ok_or_else(|| Error::Other("no async runtime for quinn".into()))
}

/// A server endpoint for `shardrecv`.
pub fn server_endpoint(
    listen: SocketAddr,
    crypto: rustls::ServerConfig,
    options: &TransportOptions,
) -> Result<quinn::Endpoint, Error> {
    let quic = QuicServerConfig::try_from(crypto).map_err(|e| Error::Identity(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(
        QuicTuning::for_peer(listen.ip(), options).transport_config(),
    ));
    let socket = bind_udp(listen)?;
    quinn::Endpoint::new(endpoint_config(), Some(server), socket, runtime()?)
        .map_err(|e| Error::io(format!("listen {listen}"), e))
}

/// Connects to a receiver at `addr`, asking for `server_name` (which keys we pin:
/// [`crate::identity::server_name_for`]); the pinned-key check happens in `crypto`.
pub async fn connect(
    addr: SocketAddr,
    crypto: rustls::ClientConfig,
    server_name: &str,
    timeout: Duration,
    options: &TransportOptions,
) -> Result<(quinn::Endpoint, quinn::Connection), Error> {
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| Error::Identity(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(
        QuicTuning::for_peer(addr.ip(), options).transport_config(),
    ));
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = bind_udp(bind)?;
    let endpoint = quinn::Endpoint::new(endpoint_config(), None, socket, runtime()?)
        .map_err(|e| Error::io("udp endpoint", e))?;
    let connecting = endpoint
        .connect_with(client, addr, server_name)
        .map_err(|e| Error::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err(Error::Unreachable {
                addr: addr.to_string(),
                reason: format!(
                    "no answer within {} s (is shardrecv running and the UDP port open?)",
                    timeout.as_secs_f64()
                ),
            })
        }
        // No answer, or a receiver that is shutting down (its endpoint refuses new
        // connections): worth another try when reconnecting, unlike a refused key.
        Ok(Err(e @ (quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset))) => {
            return Err(Error::Unreachable {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
        }
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Err(Error::Unreachable {
                addr: addr.to_string(),
                reason: "the receiver refused new connections (shutting down?)".into(),
            })
        }
        Ok(Err(e)) => {
            return Err(Error::Connect {
                addr: addr.to_string(),
                reason: explain_handshake_error(&e),
            })
        }
        Ok(Ok(c)) => c,
    };
    Ok((endpoint, conn))
}

/// Asks the receiver at `addr` which key it presents to a sender preferring `prefer` (none:
/// what a sender naming no key gets, the receiver's primary), and returns the fingerprint of
/// the key it proved it holds (its handshake signature checked). The probe brings no client
/// key, so the receiver refuses the connection right after (and logs a failed handshake):
/// nothing is staged or counted as a transfer. How `shardmove device rotate-key` checks a
/// receiver before the registry relies on its new key.
pub async fn probe(
    addr: SocketAddr,
    prefer: &[crate::identity::Fingerprint],
    timeout: Duration,
) -> Result<crate::identity::Fingerprint, Error> {
    let result = Arc::new(crate::identity::ProbeResult::default());
    let crypto = crate::identity::probe_crypto(result.clone())?;
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| Error::Identity(e.to_string()))?;
    let client = quinn::ClientConfig::new(Arc::new(quic));
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::new(endpoint_config(), None, bind_udp(bind)?, runtime()?)
        .map_err(|e| Error::io("udp endpoint", e))?;
    let server_name = crate::identity::server_name_for(prefer);
    let connecting = endpoint
        .connect_with(client, addr, &server_name)
        .map_err(|e| Error::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    // The receiver's refusal of our missing certificate may come before or after our side
    // counts the handshake as done; either way its key was proven by then.
    let outcome = tokio::time::timeout(timeout, connecting).await;
    if let Ok(Ok(conn)) = &outcome {
        conn.close(0u32.into(), b"probe");
    }
    endpoint.close(0u32.into(), b"probe");
    if let Some(fp) = result.proven() {
        return Ok(fp);
    }
    Err(match outcome {
        Err(_) => Error::Unreachable {
            addr: addr.to_string(),
            reason: format!(
                "no answer within {} s (is shardrecv running and the UDP port open?)",
                timeout.as_secs_f64()
            ),
        },
        Ok(Err(e)) => Error::Connect {
            addr: addr.to_string(),
            reason: format!("the receiver proved no key: {e}"),
        },
        Ok(Ok(_)) => Error::Connect {
            addr: addr.to_string(),
            reason: "the receiver proved no key".into(),
        },
    })
}

/// The fingerprint of the key the peer of `conn` authenticated with.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<crate::identity::Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::identity::Fingerprint::of_certificate(certs.first()?).ok()
}

/// What the handshake of `conn` settled about the protocol (see [`crate::wire::Negotiated`]).
pub fn negotiated(conn: &quinn::Connection) -> Result<crate::wire::Negotiated, Error> {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    crate::wire::Negotiated::from_alpn(alpn.as_deref()).ok_or_else(|| Error::Connect {
        addr: conn.remote_address().to_string(),
        reason: format!(
            "the handshake agreed on protocol id {:?}, which this build does not speak",
            String::from_utf8_lossy(alpn.as_deref().unwrap_or_default())
        ),
    })
}

/// Turns a handshake failure into a sentence an operator can act on.
pub fn explain_handshake_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    // TLS alert 120, no_application_protocol: no ALPN id in common.
    if text.contains("error 120") || text.contains("known protocol") {
        return format!(
            "the peer speaks none of this build's protocol versions ({} and {}): it is more \
             than one release older or newer; upgrade the older side first ({text})",
            crate::wire::PROTOCOL_VERSION,
            crate::wire::PREVIOUS_PROTOCOL_VERSION
        );
    }
    if text.contains("is not pinned") {
        format!(
            "the receiver's key is none of those given with --peer; during a key rotation pin \
             both the old and the new key ({text})"
        )
    } else if text.contains("certificate") || text.contains("alert") || text.contains("handshake") {
        format!(
            "the TLS handshake failed, most likely because our key is not in the receiver's \
             allow-list ({text})"
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{
        client_crypto, server_crypto, AllowList, Identity, IdentitySet, LiveAllowList,
        LiveIdentities,
    };

    /// A receiver offering `ids` and a sender of this build: the version the sender then
    /// speaks, or the handshake's error as explained to an operator.
    async fn negotiate_with(ids: &[&[u8]]) -> Result<crate::wire::Negotiated, String> {
        let dir = tempfile::tempdir().unwrap();
        let recv = Identity::generate(&dir.path().join("recv.key")).unwrap();
        let send = Identity::generate(&dir.path().join("send.key")).unwrap();
        let pins = [recv.fingerprint];
        let served = IdentitySet::from_identities([(dir.path().join("recv.key"), recv)]).unwrap();
        let allow = AllowList::from_fingerprints([send.fingerprint]);
        let mut server = server_crypto(
            Arc::new(LiveIdentities::new(served)),
            Arc::new(LiveAllowList::new(allow)),
        )
        .unwrap();
        server.alpn_protocols = ids.iter().map(|id| id.to_vec()).collect();
        let options = TransportOptions::default();
        let listen = server_endpoint("127.0.0.1:0".parse().unwrap(), server, &options).unwrap();
        let addr = listen.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            if let Some(incoming) = listen.accept().await {
                let conn = incoming.await.map_err(|e| e.to_string())?;
                return Ok(negotiated(&conn).map_err(|e| e.to_string())?.version);
            }
            Err("no connection".to_string())
        });
        let crypto = client_crypto(&send, &pins).unwrap();
        let name = crate::identity::server_name_for(&pins);
        let outcome = connect(addr, crypto, &name, Duration::from_secs(5), &options).await;
        match outcome {
            Ok((_endpoint, conn)) => {
                let ours = negotiated(&conn).map_err(|e| e.to_string())?;
                let theirs = accept.await.unwrap()?;
                assert_eq!(ours.version, theirs, "both sides read the same version");
                Ok(ours)
            }
            Err(e) => {
                accept.abort();
                Err(e.to_string())
            }
        }
    }

    #[tokio::test]
    async fn alpn_picks_the_newest_version_both_sides_speak() {
        use crate::wire::{alpn_id, PREVIOUS_PROTOCOL_VERSION, PROTOCOL_VERSION};
        // This build on both sides.
        let ids = crate::wire::offered_alpn_ids();
        let ids: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let both = negotiate_with(&ids).await.unwrap();
        assert_eq!(both.version, PROTOCOL_VERSION);
        assert_eq!(both.alpn, alpn_id(PROTOCOL_VERSION));
        // A receiver of the previous release: the sender steps down.
        let previous = alpn_id(PREVIOUS_PROTOCOL_VERSION);
        let old = negotiate_with(&[&previous]).await.unwrap();
        assert_eq!(old.version, PREVIOUS_PROTOCOL_VERSION);
        // A receiver two releases ahead: no version in common, said so.
        let err = negotiate_with(&[b"shardxfer/99"]).await.unwrap_err();
        assert!(
            err.contains("none of this build's protocol versions"),
            "{err}"
        );
    }

    #[test]
    fn mtu_choice_is_guarded() {
        // The measured sweet spot on loopback; 8192 and above were measured 3-4x slower.
        let lo = QuicTuning::for_peer("127.0.0.1".parse().unwrap(), &TransportOptions::default());
        assert_eq!(lo.initial_mtu, 4096);
        assert!(lo.mtu_upper_bound < 8192);
        assert_eq!(
            QuicTuning::for_peer("::1".parse().unwrap(), &TransportOptions::default()),
            lo
        );
        // Off loopback: never start above what a 1500-byte network carries.
        // Discovery climbs to a full 1500-byte Ethernet frame, less the IP and UDP headers
        // of the family the packets really use.
        let options = TransportOptions::default();
        let lan = QuicTuning::for_peer("10.9.0.2".parse().unwrap(), &options);
        assert!(lan.initial_mtu <= 1200);
        assert_eq!(lan.mtu_upper_bound, 1500 - 20 - 8);
        let mapped = QuicTuning::for_peer("::ffff:10.9.0.2".parse().unwrap(), &options);
        assert_eq!(mapped, lan);
        let lan6 = QuicTuning::for_peer("fd00::2".parse().unwrap(), &options);
        assert!(lan6.initial_mtu <= 1200);
        assert_eq!(lan6.mtu_upper_bound, 1500 - 40 - 8);
    }

    #[test]
    fn windows_cover_the_bdp_but_fit_the_memory_budget() {
        let t = QuicTuning::for_peer("127.0.0.1".parse().unwrap(), &TransportOptions::default());
        // 2.5 GB/s x 10 ms = 25 MB.
        assert!(t.connection_window >= 25_000_000);
        assert!(t.connection_window <= 64 << 20);
        assert!(t.stream_window >= 1 << 20);
    }

    #[test]
    fn bbr_startup_loss_cannot_overflow_quinns_stream_reassembly() {
        // Regression: "too many gaps in stream buffer" aborted a BBR transfer on a 100 Mbit,
        // 50 ms link with 16 MiB stream windows. quinn-proto keeps at most 1024 pieces per
        // stream; received runs alternate with gaps, so pieces <= packets in the window / 2
        // even at the worst loss pattern (every other packet lost), and ~1/4 at random loss.
        const QUINN_MAX_CHUNKS: u64 = 1024;
        let t = QuicTuning::for_peer("10.9.0.2".parse().unwrap(), &TransportOptions::default());
        let smallest_packet = 1200 - 60; // QUIC's minimum datagram less headers
        let packets = t.stream_window / smallest_packet;
        assert!(
            packets / 4 <= QUINN_MAX_CHUNKS,
            "{packets} packets per stream window"
        );
    }

    #[test]
    fn window_option_is_bounded_and_sets_both_windows() {
        assert_eq!(parse_window("64M"), Ok(64 << 20));
        assert!(parse_window("1M")
            .unwrap_err()
            .contains("between 4M and 256M"));
        assert!(parse_window("1G").is_err());
        assert!(parse_window("lots").is_err());
        let opts = TransportOptions {
            window: Some(64 << 20),
            ..TransportOptions::default()
        };
        let t = QuicTuning::for_peer("10.9.0.2".parse().unwrap(), &opts);
        assert_eq!((t.send_window, t.connection_window), (64 << 20, 64 << 20));
        // The stream window never grows with it (quinn's reassembly limit).
        assert_eq!(t.stream_window, STREAM_WINDOW);
    }

    #[test]
    fn congestion_names_round_trip_and_bad_ones_explain() {
        for c in [
            Congestion::Auto,
            Congestion::Bbr,
            Congestion::QuinnBbr,
            Congestion::Cubic,
            Congestion::NewReno,
            Congestion::Background,
        ] {
            assert_eq!(c.name().parse::<Congestion>(), Ok(c));
        }
        assert_eq!("BBR".parse::<Congestion>(), Ok(Congestion::Bbr));
        let err = "vegas".parse::<Congestion>().unwrap_err();
        assert!(
            err.contains("auto, bbr, quinn-bbr, cubic, newreno, background"),
            "{err}"
        );
        // auto: Cubic where nothing is lost (loopback), BBR on real paths; a choice stays.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let wan: IpAddr = "10.9.0.2".parse().unwrap();
        assert_eq!(Congestion::Auto.for_peer(lo), Congestion::Cubic);
        assert_eq!(Congestion::Auto.for_peer(wan), Congestion::Bbr);
        assert_eq!(Congestion::Bbr.for_peer(lo), Congestion::Bbr);
        assert_eq!(
            QuicTuning::for_peer(wan, &TransportOptions::default()).congestion,
            Congestion::Bbr
        );
    }
}
