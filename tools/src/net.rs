//! Link / IPv4 / UDP / RTP framing: reading UDP datagrams out of captured
//! frames, and wrapping datagrams in Ethernet/IPv4/UDP for pcap output.
//! Every parser here works on untrusted bytes and never panics: it returns
//! [`Skip`] for anything it does not handle.

use std::net::{Ipv4Addr, SocketAddrV4};

/// pcap link-layer types this reader understands (tcpdump.org LINKTYPE_*).
pub mod linktype {
    pub const NULL: u32 = 0;
    pub const ETHERNET: u32 = 1;
    pub const RAW: u32 = 101;
    pub const LOOP: u32 = 108;
    pub const LINUX_SLL: u32 = 113;
    pub const IPV4: u32 = 228;
    pub const LINUX_SLL2: u32 = 276;
}

/// One UDP datagram found in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: &'a [u8],
}

/// Why a frame yielded no datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("link type {0} is not supported")]
    LinkType(u32),
    #[error("not IPv4")]
    NotIpv4,
    #[error("not UDP")]
    NotUdp,
    #[error("IPv4 fragment (not reassembled)")]
    Fragment,
    #[error("frame truncated")]
    Truncated,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88A8, 0x9100];

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The UDP datagram in a frame of the given link type.
pub fn parse_frame(link: u32, frame: &[u8]) -> Result<Udp<'_>, Skip> {
    match link {
        linktype::ETHERNET => {
            let mut at = 12;
            let mut ethertype = be16(frame, at).ok_or(Skip::Truncated)?;
            while ETHERTYPE_VLAN.contains(&ethertype) {
                at += 4;
                ethertype = be16(frame, at).ok_or(Skip::Truncated)?;
            }
            if ethertype != ETHERTYPE_IPV4 {
                return Err(Skip::NotIpv4);
            }
            parse_ipv4(frame.get(at + 2..).ok_or(Skip::Truncated)?)
        }
        linktype::RAW | linktype::IPV4 => parse_ipv4(frame),
        linktype::NULL | linktype::LOOP => {
            // 4-byte address family in the writer's byte order (NULL) or
            // network order (LOOP); AF_INET is 2 everywhere.
            let fam = frame.get(..4).ok_or(Skip::Truncated)?;
            if fam != [2, 0, 0, 0] && fam != [0, 0, 0, 2] {
                return Err(Skip::NotIpv4);
            }
            parse_ipv4(&frame[4..])
        }
        linktype::LINUX_SLL => {
            if be16(frame, 14).ok_or(Skip::Truncated)? != ETHERTYPE_IPV4 {
                return Err(Skip::NotIpv4);
            }
            parse_ipv4(frame.get(16..).ok_or(Skip::Truncated)?)
        }
        linktype::LINUX_SLL2 => {
            if be16(frame, 0).ok_or(Skip::Truncated)? != ETHERTYPE_IPV4 {
                return Err(Skip::NotIpv4);
            }
            parse_ipv4(frame.get(20..).ok_or(Skip::Truncated)?)
        }
        other => Err(Skip::LinkType(other)),
    }
}

/// The UDP datagram in an IPv4 packet (unfragmented only).
pub fn parse_ipv4(ip: &[u8]) -> Result<Udp<'_>, Skip> {
    let first = *ip.first().ok_or(Skip::Truncated)?;
    if first >> 4 != 4 {
        return Err(Skip::NotIpv4);
    }
    let ihl = usize::from(first & 0x0F) * 4;
    if ihl < 20 || ip.len() < ihl {
        return Err(Skip::Truncated);
    }
    let total = usize::from(be16(ip, 2).ok_or(Skip::Truncated)?);
    if total < ihl || total > ip.len() {
        return Err(Skip::Truncated);
    }
    let frag = be16(ip, 6).ok_or(Skip::Truncated)?;
    if frag & 0x3FFF != 0 {
        return Err(Skip::Fragment); // MF set or offset != 0
    }
    if ip[9] != 17 {
        return Err(Skip::NotUdp);
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[ihl..total];
    let sport = be16(udp, 0).ok_or(Skip::Truncated)?;
    let dport = be16(udp, 2).ok_or(Skip::Truncated)?;
    let ulen = usize::from(be16(udp, 4).ok_or(Skip::Truncated)?);
    if ulen < 8 || ulen > udp.len() {
        return Err(Skip::Truncated);
    }
    Ok(Udp {
        src: SocketAddrV4::new(src, sport),
        dst: SocketAddrV4::new(dst, dport),
        payload: &udp[8..ulen],
    })
}

/// How to treat a possible RTP header in front of the TS packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtpMode {
    /// Strip it when the datagram looks like RFC 2250 (V=2, PT 33, TS sync
    /// byte right after the header).
    Auto,
    /// Always strip an RTP header (a datagram that has none is left alone).
    Force,
    /// Never strip.
    Off,
}

/// Length of the RTP header (fixed part, CSRCs, extension) if `d` starts
/// with one that parses, whatever its payload type.
pub fn rtp_header_len(d: &[u8]) -> Option<usize> {
    let b0 = *d.first()?;
    if b0 >> 6 != 2 || d.len() < 12 {
        return None;
    }
    let mut len = 12 + 4 * usize::from(b0 & 0x0F);
    if b0 & 0x10 != 0 {
        let ext_words = usize::from(be16(d, len + 2)?);
        len += 4 + 4 * ext_words;
    }
    (len <= d.len()).then_some(len)
}

/// The TS part of a datagram and whether an RTP header was removed.
pub fn strip_rtp(d: &[u8], mode: RtpMode) -> (&[u8], bool) {
    let looks = |len: usize| d.get(1).is_some_and(|b| b & 0x7F == 33) && d.get(len) == Some(&0x47);
    match (mode, rtp_header_len(d)) {
        (RtpMode::Off, _) | (_, None) => (d, false),
        (RtpMode::Force, Some(len)) => (&d[len..], true),
        (RtpMode::Auto, Some(len)) if d.first() != Some(&0x47) && looks(len) => (&d[len..], true),
        (RtpMode::Auto, Some(_)) => (d, false),
    }
}

fn ones_complement_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// Largest UDP payload in one IPv4 datagram.
pub const MAX_UDP_PAYLOAD: usize = 65_535 - 20 - 8;

/// An Ethernet II frame carrying `payload` in IPv4/UDP from `src` to `dst`
/// (checksums filled in; multicast destinations get the 01:00:5e MAC).
/// Payloads above [`MAX_UDP_PAYLOAD`] are cut to that size.
pub fn ethernet_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], ip_id: u16) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_UDP_PAYLOAD)];
    let mut f = Vec::with_capacity(14 + 28 + payload.len());
    let d = dst.ip().octets();
    if dst.ip().is_multicast() {
        f.extend_from_slice(&[0x01, 0x00, 0x5E, d[1] & 0x7F, d[2], d[3]]);
    } else {
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    }
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let s = src.ip().octets();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&s);
    ip[16..20].copy_from_slice(&d);
    let csum = fold(ones_complement_sum(0, &ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    let ulen = (8 + payload.len()) as u16;
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&ulen.to_be_bytes());
    // Checksum over the pseudo-header, the UDP header and the payload.
    let mut sum = ones_complement_sum(0, &s);
    sum = ones_complement_sum(sum, &d);
    sum += 17 + u32::from(ulen);
    sum = ones_complement_sum(sum, &udp);
    sum = ones_complement_sum(sum, payload);
    let c = match fold(sum) {
        0 => 0xFFFF,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_checksums() {
        let src: SocketAddrV4 = "127.0.0.1:4000".parse().unwrap();
        let dst: SocketAddrV4 = "239.1.2.3:5500".parse().unwrap();
        let payload = [0x47u8; 188];
        let f = ethernet_frame(src, dst, &payload, 7);
        assert_eq!(&f[..6], &[0x01, 0x00, 0x5E, 0x01, 0x02, 0x03]);
        let u = parse_frame(linktype::ETHERNET, &f).unwrap();
        assert_eq!((u.src, u.dst, u.payload), (src, dst, &payload[..]));
        // IPv4 header sums to 0xFFFF with its checksum.
        assert_eq!(fold(ones_complement_sum(0, &f[14..34])), 0);
        // Fragments, non-UDP and truncation are skipped, not parsed.
        let mut frag = f.clone();
        frag[14 + 6] = 0x20;
        assert_eq!(parse_frame(linktype::ETHERNET, &frag), Err(Skip::Fragment));
        let mut tcp = f.clone();
        tcp[14 + 9] = 6;
        assert_eq!(parse_frame(linktype::ETHERNET, &tcp), Err(Skip::NotUdp));
        assert_eq!(
            parse_frame(linktype::ETHERNET, &f[..40]),
            Err(Skip::Truncated)
        );
        assert_eq!(parse_frame(999, &f), Err(Skip::LinkType(999)));
        assert_eq!(
            parse_frame(linktype::RAW, &f[14..]).unwrap().payload.len(),
            188
        );
    }

    #[test]
    fn rtp_detection() {
        let mut d = vec![0x80, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        d.extend_from_slice(&[0x47; 188]);
        assert_eq!(strip_rtp(&d, RtpMode::Auto), (&d[12..], true));
        assert_eq!(strip_rtp(&d, RtpMode::Off), (&d[..], false));
        let plain = [0x47u8; 188];
        assert_eq!(strip_rtp(&plain, RtpMode::Auto), (&plain[..], false));
        // Another payload type is not taken for MPEG-TS in auto mode.
        d[1] = 96;
        assert!(!strip_rtp(&d, RtpMode::Auto).1);
        assert!(strip_rtp(&d, RtpMode::Force).1);
        assert_eq!(rtp_header_len(&[0x80]), None);
    }
}
