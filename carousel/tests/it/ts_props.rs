//! Property tests: packetize → depacketize is the identity for any section
//! sizes in both packing modes; the depacketizer and the section parser
//! never panic, whatever the bytes; continuity counters run on across cycles.

use std::collections::VecDeque;

use bytes::Bytes;
use carousel::section::{build, LongHeader, Section, TableId, MIN_SECTION_LEN};
use carousel::ts::{Depacketizer, Event, Packetizer, Pid, PACKET_LEN};
use proptest::prelude::*;

fn section(total_len: usize, seed: u16) -> Bytes {
    let body: Vec<u8> = (0..total_len - MIN_SECTION_LEN)
        .map(|i| (i as u16).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect();
    Bytes::from(build(&LongHeader::private(TableId::EMM_GROUP, seed), &body).unwrap())
}

fn packetize(p: &mut Packetizer, sections: &[Bytes]) -> Vec<[u8; PACKET_LEN]> {
    let mut q: VecDeque<Bytes> = sections.iter().cloned().collect();
    let mut out = Vec::new();
    let mut pkt = [0u8; PACKET_LEN];
    while p.next_packet(&mut pkt, || q.pop_front()) {
        out.push(pkt);
    }
    out
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    // Mostly EMM-sized sections, with the extremes well represented.
    let size = prop_oneof![
        3 => 12usize..=300,
        1 => 12usize..=4096,
        1 => prop_oneof![Just(12usize), Just(181), Just(182), Just(183), Just(184), Just(185), Just(4096)],
    ];
    proptest::collection::vec(size, 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip_any_sizes_both_modes(sizes in sizes(), pack: bool) {
        let sections: Vec<Bytes> = sizes.iter().enumerate().map(|(i, &n)| section(n, i as u16)).collect();
        let mut p = Packetizer::new(Pid::DEFAULT_EMM, pack);
        let packets = packetize(&mut p, &sections);
        let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
        let mut got = Vec::new();
        for pkt in &packets {
            for e in d.push(pkt) {
                match e {
                    Event::Section(s) => got.push(s),
                    Event::Discontinuity => {}
                    Event::Error(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
        prop_assert_eq!(&got, &sections);
        // Nothing wasted beyond what the rules allow: every packet but the
        // last carries at least one section byte, and unpacked mode has one
        // section start per PUSI packet.
        let starts = packets.iter().filter(|p| p[1] & 0x40 != 0).count();
        if pack {
            prop_assert!(starts <= sections.len());
        } else {
            prop_assert_eq!(starts, sections.len());
        }
        let total: usize = sizes.iter().sum();
        prop_assert!(packets.len() * 184 >= total);
    }

    #[test]
    fn continuity_counter_runs_on_across_cycles(cycles in proptest::collection::vec(sizes(), 1..5), pack: bool) {
        let mut p = Packetizer::new(Pid::DEFAULT_EMM, pack);
        let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
        let mut n = 0usize;
        for sizes in cycles {
            let sections: Vec<Bytes> = sizes.iter().map(|&s| section(s, 1)).collect();
            for pkt in packetize(&mut p, &sections) {
                prop_assert_eq!(usize::from(pkt[3] & 0x0F), n % 16);
                // Only the very first packet carries the discontinuity flag.
                prop_assert_eq!(pkt[3] & 0x20 != 0, n == 0);
                n += 1;
                for e in d.push(&pkt) {
                    prop_assert!(!matches!(e, Event::Error(_)), "{:?}", e);
                }
            }
        }
    }

    #[test]
    fn depacketizer_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..4000), pid in 0u16..4) {
        let mut d = Depacketizer::new(Pid::new(pid).unwrap());
        for chunk in data.chunks(PACKET_LEN) {
            // Give garbage a valid sync byte half the time so it gets deeper.
            let mut c = chunk.to_vec();
            if c.len() == PACKET_LEN && c[1] & 1 == 0 {
                c[0] = 0x47;
            }
            d.push_with(&c, |_| {});
        }
    }

    #[test]
    fn depacketizer_survives_corrupted_streams(sizes in sizes(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..20), pack: bool) {
        let sections: Vec<Bytes> = sizes.iter().map(|&n| section(n, 7)).collect();
        let mut packets = packetize(&mut Packetizer::new(Pid::DEFAULT_EMM, pack), &sections);
        let n = packets.len() * PACKET_LEN;
        for (at, x) in flips {
            let at = at % n;
            packets[at / PACKET_LEN][at % PACKET_LEN] ^= x | 1;
        }
        let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
        for pkt in &packets {
            for e in d.push(pkt) {
                if let Event::Section(s) = e {
                    // Whatever comes out as a section passed its CRC.
                    prop_assert!(Section::parse(&s).is_ok());
                }
            }
        }
    }
}
