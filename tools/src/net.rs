//! Link / IPv4 / UDP / RTP framing: reading UDP datagrams out of captured
//! frames, and wrapping datagrams in Ethernet/IPv4/UDP for pcap output.
//! The Ethernet, VLAN, IPv4 and UDP headers are read and written with
//! etherparse; what stays here is the choice of what to accept.
//! Every parser here works on untrusted bytes and never panics: it returns
//! [`Skip`] for anything it does not handle.

use std::net::SocketAddrV4;

use etherparse::{
    EtherType, Ethernet2Header, Ethernet2Slice, IpNumber, Ipv4Header, Ipv4HeaderSlice,
    SingleVlanSlice, UdpHeader, UdpSlice,
};

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
const ETHERTYPE_VLAN: [EtherType; 3] = [
    EtherType::VLAN_TAGGED_FRAME,
    EtherType::PROVIDER_BRIDGING,
    EtherType::VLAN_DOUBLE_TAGGED_FRAME,
];

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The UDP datagram in a frame of the given link type.
pub fn parse_frame(link: u32, frame: &[u8]) -> Result<Udp<'_>, Skip> {
    match link {
        linktype::ETHERNET => parse_ipv4(ethernet_payload(frame)?),
        linktype::RAW | linktype::IPV4 => parse_ipv4(frame),
        // The capture pseudo-headers below are fixed-size and only their
        // protocol field matters here; etherparse has no SLL2 and its SLL
        // reader rejects packet types a capture may legitimately carry.
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

/// The IPv4 packet in an Ethernet II frame, behind any number of VLAN tags.
fn ethernet_payload(frame: &[u8]) -> Result<&[u8], Skip> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame).map_err(|_| Skip::Truncated)?;
    let (mut ether_type, mut rest) = (eth.ether_type(), eth.payload_slice());
    while ETHERTYPE_VLAN.contains(&ether_type) {
        let vlan = SingleVlanSlice::from_slice(rest).map_err(|_| Skip::Truncated)?;
        (ether_type, rest) = (vlan.ether_type(), vlan.payload_slice());
    }
    if ether_type != EtherType::IPV4 {
        return Err(Skip::NotIpv4);
    }
    Ok(rest)
}

/// The UDP datagram in an IPv4 packet (unfragmented only).
pub fn parse_ipv4(ip: &[u8]) -> Result<Udp<'_>, Skip> {
    // The version first: anything that is not IPv4 (IPv6 included) is
    // reported as such, however short.
    if *ip.first().ok_or(Skip::Truncated)? >> 4 != 4 {
        return Err(Skip::NotIpv4);
    }
    let header = Ipv4HeaderSlice::from_slice(ip).map_err(|_| Skip::Truncated)?;
    let header_len = header.slice().len();
    let total = usize::from(header.total_len());
    if total < header_len || total > ip.len() {
        return Err(Skip::Truncated);
    }
    if header.is_fragmenting_payload() {
        return Err(Skip::Fragment); // MF set or offset != 0
    }
    if header.protocol() != IpNumber::UDP {
        return Err(Skip::NotUdp);
    }
    let udp = UdpSlice::from_slice(&ip[header_len..total]).map_err(|_| Skip::Truncated)?;
    // etherparse reads a zero length as "the rest of the packet" (IPv6
    // jumbograms); over IPv4 it is simply invalid.
    if usize::from(udp.length()) < UdpHeader::LEN {
        return Err(Skip::Truncated);
    }
    Ok(Udp {
        src: SocketAddrV4::new(header.source_addr(), udp.source_port()),
        dst: SocketAddrV4::new(header.destination_addr(), udp.destination_port()),
        payload: udp.payload(),
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

/// Largest UDP payload in one IPv4 datagram.
pub const MAX_UDP_PAYLOAD: usize = 65_535 - Ipv4Header::MIN_LEN - UdpHeader::LEN;

/// An Ethernet II frame carrying `payload` in IPv4/UDP from `src` to `dst`
/// (checksums filled in; multicast destinations get the 01:00:5e MAC).
/// Payloads above [`MAX_UDP_PAYLOAD`] are cut to that size.
pub fn ethernet_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], ip_id: u16) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_UDP_PAYLOAD)];
    let d = dst.ip().octets();
    let eth = Ethernet2Header {
        source: [0x02, 0, 0, 0, 0, 0x01],
        destination: if dst.ip().is_multicast() {
            [0x01, 0x00, 0x5E, d[1] & 0x7F, d[2], d[3]]
        } else {
            [0x02, 0, 0, 0, 0, 0x02]
        },
        ether_type: EtherType::IPV4,
    };
    let udp_len = (UdpHeader::LEN + payload.len()) as u16; // fits: payload was cut above
    let mut ip = Ipv4Header::new(udp_len, 64, IpNumber::UDP, src.ip().octets(), d)
        .expect("payload cut to MAX_UDP_PAYLOAD");
    ip.identification = ip_id;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let udp = UdpHeader::with_ipv4_checksum(src.port(), dst.port(), &ip, payload)
        .expect("payload cut to MAX_UDP_PAYLOAD");
    let mut f = Vec::with_capacity(Ethernet2Header::LEN + ip.header_len() + udp_len as usize);
    f.extend_from_slice(&eth.to_bytes());
    f.extend_from_slice(&ip.to_bytes());
    f.extend_from_slice(&udp.to_bytes());
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
        // The IPv4 header checksum verifies.
        let ip = Ipv4HeaderSlice::from_slice(&f[14..34]).unwrap().to_header();
        assert_eq!(ip.calc_header_checksum(), ip.header_checksum);
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

    /// The bytes the hand-written builder produced before etherparse took
    /// over (headers only): pcap files written by casd-probe stay the same.
    #[test]
    fn frames_byte_identical_to_before() {
        // Frames built in memory and compared byte by byte; nothing is sent
        // (the addresses only have to be of several kinds).
        let cases: [(&str, &str, Vec<u8>, u16, &str); 3] = [
            (
                "127.0.0.1:5501",
                "127.0.0.1:5500",
                vec![0x47, 1, 2, 3, 4],
                1,
                "0200000000020200000000010800450000210001400040113cc97f0000017f000001157d157c000d89d4",
            ),
            (
                "10.1.2.3:4000",
                "239.1.2.3:5500",
                vec![0xFF; 7],
                65535,
                "01005e010203020000000001080045000023ffff400040113dc20a010203ef0102030fa0157c000fdeaa",
            ),
            (
                "192.168.1.1:65535",
                "10.0.0.1:1",
                (0u8..=255).collect(),
                4660,
                "02000000000202000000000108004500011c1234400040115bf3c0a801010a000001ffff0001010871f3",
            ),
        ];
        for (src, dst, payload, id, want) in cases {
            let f = ethernet_frame(src.parse().unwrap(), dst.parse().unwrap(), &payload, id);
            assert_eq!(hex::encode(&f[..42]), want);
            assert_eq!(&f[42..], &payload[..]);
        }
    }

    #[test]
    fn vlan_tags_and_bad_lengths() {
        let src: SocketAddrV4 = "127.0.0.1:4000".parse().unwrap();
        let f = ethernet_frame(src, src, &[0x47; 10], 1);
        // Two VLAN tags (802.1ad outer, 802.1Q inner) in front of IPv4.
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xA8, 0, 1, 0x81, 0x00, 0, 2]);
        tagged.extend_from_slice(&f[12..]);
        assert_eq!(
            parse_frame(linktype::ETHERNET, &tagged).unwrap().payload,
            &[0x47; 10]
        );
        assert_eq!(
            parse_frame(linktype::ETHERNET, &tagged[..16]),
            Err(Skip::Truncated)
        );
        // IPv6 is not IPv4, however short.
        assert_eq!(parse_ipv4(&[0x60]), Err(Skip::NotIpv4));
        assert_eq!(parse_ipv4(&[]), Err(Skip::Truncated));
        // A UDP length of zero (or below the header) is invalid over IPv4.
        let mut zero = f[14..].to_vec();
        zero[20 + 4..20 + 6].copy_from_slice(&[0, 0]);
        assert_eq!(parse_ipv4(&zero), Err(Skip::Truncated));
        // An IPv4 total length beyond the packet, or inside the header.
        let mut long = f[14..].to_vec();
        long[2..4].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(parse_ipv4(&long), Err(Skip::Truncated));
        long[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse_ipv4(&long), Err(Skip::Truncated));
    }
}
