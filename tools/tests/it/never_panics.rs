//! The decode pipeline never panics on arbitrary or corrupted input, and
//! never reports as authentic anything but what was sealed.

use crate::common;

use casd_tools::decode::{Probe, ProbeConfig, Resync};
use casd_tools::input::{Next, PcapSource, Source};
use casd_tools::keys::KeySet;
use casd_tools::net;
use casd_wire::crypto::Key128;
use proptest::prelude::*;
use serde_json::Value;

fn keyed_probe() -> Probe {
    let mut keys = KeySet::default();
    keys.add_pmk(None, Key128::from_bytes(common::PMK));
    Probe::new(ProbeConfig {
        keys,
        all_pids: true,
        show_keys: true,
        repeats: true,
        keep_times: true,
        ts_bitrate: Some(1_000_000),
        ..ProbeConfig::default()
    })
}

fn run(bytes: &[u8], chunk: usize) -> (Probe, Vec<Value>) {
    let mut p = keyed_probe();
    let mut r = Resync::new();
    let mut recs = Vec::new();
    let mut pkts: Vec<Vec<u8>> = Vec::new();
    for c in bytes.chunks(chunk.max(1)) {
        r.push(c, &mut |x| pkts.push(x.to_vec()));
    }
    r.finish(&mut |x| pkts.push(x.to_vec()));
    for x in &pkts {
        p.push_packet(x, None, &mut |v| recs.push(v));
    }
    // A packet of the wrong length is counted, not a panic.
    p.push_packet(&bytes[..bytes.len().min(100)], Some(1.0), &mut |v| {
        recs.push(v)
    });
    let s = p.summary(true, 10);
    assert_eq!(s["type"], "summary");
    (p, recs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..6000), chunk in 1usize..4000) {
        run(&bytes, chunk);
    }

    #[test]
    fn packets_with_sync_bytes_and_random_headers(
        body in proptest::collection::vec(any::<u8>(), 0..40 * 187),
        pids in proptest::collection::vec(prop_oneof![Just(0x0001u16), Just(0x0101), any::<u16>()], 40),
    ) {
        // Sync byte at every 188th byte so the resync locks and the
        // depacketizer sees "plausible" packets.
        let mut bytes = Vec::new();
        for (i, c) in body.chunks(187).enumerate() {
            bytes.push(0x47);
            let mut c = c.to_vec();
            if c.len() >= 2 {
                let pid = pids[i % pids.len()] & 0x1FFF;
                c[0] = (c[0] & 0xE0) | (pid >> 8) as u8;
                c[1] = pid as u8;
            }
            bytes.extend_from_slice(&c);
        }
        run(&bytes, 188 * 3);
    }

    #[test]
    fn corrupted_real_stream_never_forges_an_emm(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..20),
        cut in any::<prop::sample::Index>(),
    ) {
        let f = common::fixture();
        let pkts = common::stream(&[f.unique.clone(), f.group.clone(), f.global.clone()], 4);
        let mut bytes: Vec<u8> = pkts.iter().flatten().copied().collect();
        for (i, x) in &flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x | 1;
        }
        let cut = cut.index(bytes.len() + 1);
        let (_, recs) = run(&bytes[..cut], 1000);
        let sealed = [&f.unique, &f.group, &f.global];
        for r in recs.iter().filter(|r| r["type"] == "emm" && r["mac"] == "ok") {
            let id = r["emm_id"].as_u64().unwrap();
            prop_assert!((1..=3).contains(&id), "forged EMM {r}");
            prop_assert_eq!(r["len"].as_u64().unwrap() as usize, sealed[id as usize - 1].len());
        }
    }

    #[test]
    fn frames_and_rtp(bytes in proptest::collection::vec(any::<u8>(), 0..200), link in prop_oneof![Just(0u32), Just(1), Just(101), Just(108), Just(113), Just(228), Just(276), any::<u32>()]) {
        let _ = net::parse_frame(link, &bytes);
        let _ = net::parse_ipv4(&bytes);
        for m in [net::RtpMode::Auto, net::RtpMode::Force, net::RtpMode::Off] {
            let (ts, _) = net::strip_rtp(&bytes, m);
            prop_assert!(ts.len() <= bytes.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pcap_files_with_random_records(body in proptest::collection::vec(any::<u8>(), 0..3000), ng in any::<bool>()) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.pcap");
        let mut bytes = if ng {
            // Section header block, little endian, then an interface
            // description block (Ethernet), then garbage.
            let mut b = vec![0x0A, 0x0D, 0x0D, 0x0A, 28, 0, 0, 0, 0x4D, 0x3C, 0x2B, 0x1A, 1, 0, 0, 0];
            b.extend_from_slice(&[0xFF; 8]);
            b.extend_from_slice(&[28, 0, 0, 0]);
            b.extend_from_slice(&[1, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
            b
        } else {
            let mut b = vec![0xD4, 0xC3, 0xB2, 0xA1, 2, 0, 4, 0];
            b.extend_from_slice(&[0; 8]);
            b.extend_from_slice(&65535u32.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
            b
        };
        bytes.extend_from_slice(&body);
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(mut s) = PcapSource::open(&path, None) {
            for _ in 0..10_000 {
                match s.next() {
                    Ok(Next::Chunk(_)) | Ok(Next::Idle) => {}
                    Ok(Next::End) | Err(_) => break,
                }
            }
        }
    }
}
