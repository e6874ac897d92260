//! Segmentation offload through the TUN devices: the sender's super-packets are judged per
//! wire packet and reach the receiver coalesced, as a real NIC's TSO/USO and GRO would do.
//!
//! Why: without offloads every 1,500-byte packet costs the sending stack a software
//! segmentation and a TUN transmit, costs linkemu one `read` and one `write`, and costs the
//! receiving stack a full pass (route lookup, socket enqueue, one `recvmsg`). At 1 Gbit/s
//! that is ~85,000 packets a second each way, and on a 2-core machine where sender,
//! receiver and linkemu share the CPU it made the link emulator the measurement: real hosts
//! at 1-25 Gbit/s hand the NIC 64 KiB super-packets (TSO for TCP, USO for UDP GSO) and
//! receive coalesced ones (GRO). With `IFF_VNET_HDR` and `TUNSETOFFLOAD` the TUN device
//! hands linkemu those super-packets whole, with a `virtio_net_hdr` saying how to cut them.
//!
//! The link model still sees every wire packet: [`Segmentation`] tells the forwarder each
//! segment's wire length, the model judges each one (loss, queue, rate, delay), and the
//! surviving segments are written back in runs of consecutive ones ([`Segmentation::build`]),
//! one super-packet per run, released when its last segment is due. A lost segment splits
//! the run, exactly where a lost packet would leave a gap. What is coalesced is what would
//! arrive back to back anyway (one sender batch, tens of microseconds of line time at 1
//! Gbit/s), which is what GRO coalesces on a real receiver.
//!
//! Pure byte manipulation, unit-tested without devices. IPv4 only: the namespaces have no
//! IPv6 (it is disabled on them); an IPv6 super-packet, should one come, passes as one packet.

/// Bytes of the `virtio_net_hdr` that prefixes every packet read from and written to a TUN
/// device opened with `IFF_VNET_HDR` (the legacy layout, the default size).
pub const VNET_HDR_LEN: usize = 10;

/// The offloads asked of the TUN devices: checksums left partial, TCP segmentation over IPv4,
/// UDP segmentation (the kernel takes USO only for IPv4 and IPv6 together).
pub const TUN_OFFLOADS: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_USO4 | libc::TUN_F_USO6;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A `virtio_net_hdr` (native endian, as the legacy TUN interface uses on this host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `buf`, or `None` when `buf` is too short.
    pub fn parse(buf: &[u8]) -> Option<VnetHdr> {
        let b = buf.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Appends the header's bytes to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.flags);
        out.push(self.gso_type);
        for v in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

/// How one super-packet (a `virtio_net_hdr` with a GSO type, then an IPv4 packet whose
/// payload spans several wire packets) divides into wire packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segmentation {
    hdr: VnetHdr,
    transport: Transport,
    /// IPv4 header length.
    ip_len: usize,
    /// IPv4 + TCP/UDP header length: repeated in every wire packet.
    headers: usize,
    /// Payload bytes per wire packet (the last one may carry fewer).
    segment: usize,
    /// Payload bytes of the whole super-packet.
    payload: usize,
}

impl Segmentation {
    /// Reads how `packet` (an IPv4 packet read after `hdr`) divides into wire packets;
    /// `None` when it is one wire packet already or not a super-packet this module cuts
    /// (the forwarder then passes it through as one packet).
    pub fn of(hdr: &VnetHdr, packet: &[u8]) -> Option<Segmentation> {
        let transport = match hdr.gso_type & !GSO_ECN {
            GSO_TCPV4 => Transport::Tcp,
            GSO_UDP_L4 => Transport::Udp,
            _ => return None,
        };
        let segment = usize::from(hdr.gso_size);
        if segment == 0 || packet.first()? >> 4 != 4 {
            return None;
        }
        let ip_len = usize::from(packet[0] & 0x0f) * 4;
        let proto = *packet.get(9)?;
        let l4_len = match (transport, proto) {
            (Transport::Udp, PROTO_UDP) => 8,
            (Transport::Tcp, PROTO_TCP) => usize::from(*packet.get(ip_len + 12)? >> 4) * 4,
            _ => return None,
        };
        let headers = ip_len + l4_len;
        if ip_len < 20 || l4_len < 8 || packet.len() <= headers {
            return None;
        }
        let payload = packet.len() - headers;
        if payload <= segment {
            return None;
        }
        Some(Segmentation {
            hdr: *hdr,
            transport,
            ip_len,
            headers,
            segment,
            payload,
        })
    }

    /// How many wire packets the super-packet carries.
    pub fn count(&self) -> usize {
        self.payload.div_ceil(self.segment)
    }

    /// Payload bytes of wire packets `first..end`.
    fn payload_of(&self, first: usize, end: usize) -> usize {
        (end * self.segment).min(self.payload) - first * self.segment
    }

    /// Length on the wire (IP packet) of wire packet `i`.
    pub fn wire_len(&self, i: usize) -> u64 {
        (self.headers + self.payload_of(i, i + 1)) as u64
    }

    /// Appends to `out` a `virtio_net_hdr` and the IPv4 packet carrying wire packets
    /// `first..end` of `packet` (the super-packet this segmentation was read from): one
    /// super-packet again when `end - first >= 2`, a plain packet otherwise. Headers are
    /// those the kernel would give each part: IP length, id and header checksum; UDP
    /// length; TCP sequence number, and FIN/PSH only on the last part, CWR only on the
    /// first. The transport checksum stays partial (the pseudo-header sum, which the
    /// receiving stack accepts as the kernel's own offloaded packets), as it came.
    pub fn build(&self, packet: &[u8], first: usize, end: usize, out: &mut Vec<u8>) {
        let count = self.count();
        debug_assert!(first < end && end <= count);
        let payload = self.payload_of(first, end);
        let mut hdr = self.hdr;
        if end - first < 2 {
            hdr.gso_type = GSO_NONE;
            hdr.gso_size = 0;
        }
        hdr.write(out);
        let start = out.len();
        out.extend_from_slice(&packet[..self.headers]);
        let from = self.headers + first * self.segment;
        out.extend_from_slice(&packet[from..from + payload]);
        let p = &mut out[start..];
        // IPv4: total length, id (the kernel numbers a super-packet's parts consecutively),
        // header checksum.
        let total = (self.headers + payload) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let id = u16::from_be_bytes([p[4], p[5]]).wrapping_add(first as u16);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let ip_sum = !fold(sum(&p[..self.ip_len]));
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let l4 = self.ip_len;
        let l4_total = (self.headers - self.ip_len + payload) as u16;
        match self.transport {
            Transport::Udp => {
                p[l4 + 4..l4 + 6].copy_from_slice(&l4_total.to_be_bytes());
            }
            Transport::Tcp => {
                let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]])
                    .wrapping_add((first * self.segment) as u32);
                p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                if first > 0 {
                    p[l4 + 13] &= !TCP_CWR;
                }
                if end < count {
                    p[l4 + 13] &= !(TCP_FIN | TCP_PSH);
                }
            }
        }
        if self.hdr.flags & F_NEEDS_CSUM != 0 {
            let at = usize::from(self.hdr.csum_start) + usize::from(self.hdr.csum_offset);
            let partial = pseudo_header_sum(p, self.transport, l4_total);
            if let Some(field) = p.get_mut(at..at + 2) {
                field.copy_from_slice(&partial);
            }
        }
    }
}

/// The partial checksum a sender leaves for offload: the folded, not inverted, sum of the
/// IPv4 pseudo-header (addresses, protocol, transport length).
fn pseudo_header_sum(ip: &[u8], transport: Transport, l4_len: u16) -> [u8; 2] {
    let proto = match transport {
        Transport::Tcp => PROTO_TCP,
        Transport::Udp => PROTO_UDP,
    };
    let s = sum(&ip[12..20]) + u32::from(proto) + u32::from(l4_len);
    fold(s).to_be_bytes()
}

/// One's-complement sum of big-endian 16-bit words (RFC 1071), not yet folded.
fn sum(bytes: &[u8]) -> u32 {
    let mut s: u32 = 0;
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 super-packet as the kernel hands it over: headers of the whole, payload
    /// bytes numbered so that every part can be checked.
    fn super_packet(transport: Transport, payload: usize, segment: u16) -> (VnetHdr, Vec<u8>) {
        let (proto, l4_len, gso_type, csum_offset) = match transport {
            Transport::Udp => (PROTO_UDP, 8usize, GSO_UDP_L4, 6u16),
            Transport::Tcp => (PROTO_TCP, 32usize, GSO_TCPV4, 16u16),
        };
        let mut p = vec![0u8; 20 + l4_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4_len + payload) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 250, 88, 1]);
        p[16..20].copy_from_slice(&[10, 250, 88, 2]);
        p[20..22].copy_from_slice(&4433u16.to_be_bytes());
        p[22..24].copy_from_slice(&7400u16.to_be_bytes());
        match transport {
            Transport::Udp => {
                p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
            }
            Transport::Tcp => {
                p[24..28].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
                p[32] = 8 << 4;
                p[33] = TCP_CWR | TCP_PSH | TCP_FIN | 0x10;
            }
        }
        p.extend((0..payload).map(|i| (i % 251) as u8));
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (20 + l4_len) as u16,
            gso_size: segment,
            csum_start: 20,
            csum_offset,
        };
        (hdr, p)
    }

    fn verify_ip_checksum(ip: &[u8]) {
        assert_eq!(fold(sum(&ip[..20])), 0xffff, "IPv4 header checksum");
    }

    #[test]
    fn the_header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1452,
            csum_start: 20,
            csum_offset: 6,
        };
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(out.len(), VNET_HDR_LEN);
        assert_eq!(VnetHdr::parse(&out), Some(h));
        assert_eq!(VnetHdr::parse(&out[..9]), None);
    }

    #[test]
    fn a_udp_super_packet_cuts_into_datagrams_that_rejoin_to_the_original() {
        let (hdr, p) = super_packet(Transport::Udp, 3 * 1452 + 100, 1452);
        let seg = Segmentation::of(&hdr, &p).expect("a super-packet");
        assert_eq!(seg.count(), 4);
        assert_eq!(seg.wire_len(0), 28 + 1452);
        assert_eq!(seg.wire_len(3), 28 + 100);
        let mut joined = Vec::new();
        for i in 0..4 {
            let mut out = Vec::new();
            seg.build(&p, i, i + 1, &mut out);
            let h = VnetHdr::parse(&out).unwrap();
            assert_eq!(
                h.gso_type, GSO_NONE,
                "one wire packet is not a super-packet"
            );
            assert_eq!(h.flags, F_NEEDS_CSUM);
            let ip = &out[VNET_HDR_LEN..];
            assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, ip.len());
            assert_eq!(u16::from_be_bytes([ip[24], ip[25]]) as usize, ip.len() - 20);
            assert_eq!(
                u16::from_be_bytes([ip[4], ip[5]]),
                0xfffeu16.wrapping_add(i as u16)
            );
            verify_ip_checksum(ip);
            // Completing the partial checksum over the datagram verifies it.
            let mut full = ip.to_vec();
            let partial = u16::from_be_bytes([full[26], full[27]]);
            full[26..28].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&full[20..]) + u32::from(partial));
            full[26..28].copy_from_slice(&c.to_be_bytes());
            let check = fold(
                sum(&full[20..])
                    + sum(&full[12..20])
                    + u32::from(PROTO_UDP)
                    + (full.len() as u32 - 20),
            );
            assert_eq!(check, 0xffff, "datagram {i} checksums");
            joined.extend_from_slice(&ip[28..]);
        }
        assert_eq!(joined, p[28..]);
    }

    #[test]
    fn the_whole_run_rebuilds_the_super_packet_byte_for_byte() {
        for transport in [Transport::Udp, Transport::Tcp] {
            let (hdr, mut p) = super_packet(transport, 10 * 1400 - 7, 1400);
            // The kernel's own header checksum and partial checksum on the original.
            let ip_sum = !fold(sum(&p[..20]));
            p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let at = usize::from(hdr.csum_start + hdr.csum_offset);
            let l4_total = (p.len() - 20) as u16;
            let partial = pseudo_header_sum(&p, transport, l4_total);
            p[at..at + 2].copy_from_slice(&partial);
            let seg = Segmentation::of(&hdr, &p).unwrap();
            let mut out = Vec::new();
            seg.build(&p, 0, seg.count(), &mut out);
            assert_eq!(VnetHdr::parse(&out), Some(hdr));
            assert_eq!(&out[VNET_HDR_LEN..], &p[..], "{transport:?}");
        }
    }

    #[test]
    fn a_tcp_run_in_the_middle_has_its_sequence_and_no_end_flags() {
        let (hdr, p) = super_packet(Transport::Tcp, 5 * 1000, 1000);
        let seg = Segmentation::of(&hdr, &p).unwrap();
        assert_eq!(seg.count(), 5);
        let mut out = Vec::new();
        seg.build(&p, 1, 3, &mut out);
        let h = VnetHdr::parse(&out).unwrap();
        assert_eq!((h.gso_type, h.gso_size), (GSO_TCPV4, 1000));
        let ip = &out[VNET_HDR_LEN..];
        assert_eq!(ip.len(), 52 + 2000);
        let seq = u32::from_be_bytes([ip[24], ip[25], ip[26], ip[27]]);
        assert_eq!(
            seq,
            0xffff_ff00u32.wrapping_add(1000),
            "sequence wraps like TCP's"
        );
        assert_eq!(ip[33] & (TCP_CWR | TCP_FIN | TCP_PSH), 0);
        assert_eq!(&ip[52..], &p[52 + 1000..52 + 3000]);
        verify_ip_checksum(ip);
        // The last part keeps FIN and PSH, the first keeps CWR.
        out.clear();
        seg.build(&p, 4, 5, &mut out);
        assert_eq!(
            out[VNET_HDR_LEN + 33] & (TCP_FIN | TCP_PSH),
            TCP_FIN | TCP_PSH
        );
        out.clear();
        seg.build(&p, 0, 1, &mut out);
        assert_eq!(out[VNET_HDR_LEN + 33] & TCP_CWR, TCP_CWR);
    }

    #[test]
    fn what_is_not_a_super_packet_passes_through() {
        let (mut hdr, p) = super_packet(Transport::Udp, 1000, 1452);
        assert_eq!(Segmentation::of(&hdr, &p), None, "one segment's worth");
        hdr.gso_type = GSO_NONE;
        let (_, big) = super_packet(Transport::Udp, 5000, 1452);
        assert_eq!(Segmentation::of(&hdr, &big), None, "no GSO type");
        let (hdr, mut v6) = super_packet(Transport::Udp, 5000, 1452);
        v6[0] = 0x60;
        assert_eq!(Segmentation::of(&hdr, &v6), None, "IPv6 is not cut here");
        let (hdr, p) = super_packet(Transport::Tcp, 5000, 1452);
        assert_eq!(Segmentation::of(&hdr, &p[..30]), None, "truncated");
    }
}
