//! Real sockets: a player sends to a UDP socket on 127.0.0.1, the test
//! collects the datagrams, writes the TS to a file and has Wireshark's
//! dissectors (tshark) check every section CRC and the continuity counters.
//! tshark is required (Debian package `tshark`; scripts/test.sh installs it).

use crate::common;

use std::path::Path;
use std::time::Duration;

use carousel::mux::{MuxConfig, RtpConfig, RTP_HEADER_LEN};
use carousel::output::{UdpConfig, UdpOutput};
use carousel::player::{AsyncUdpOutput, Carousel, PlayerConfig};
use carousel::schedule::{Class, ScheduleConfig};
use carousel::ts::Pid;
use common::tshark::{assert_no_cc_drops, sections, Sections};
use common::{demux, emm, id_of};
use tokio_util::sync::CancellationToken;

fn check_with_tshark(ts: &Path, expect_sections: usize) {
    let f = ts.to_str().unwrap();
    let Sections {
        tids,
        crc_statuses: statuses,
        raw,
    } = sections(f, &[]);
    assert!(
        !statuses.is_empty(),
        "tshark decoded no section CRC at all:\n{raw}"
    );
    let bad = statuses.iter().filter(|s| *s != "1").count();
    assert_eq!(
        bad,
        0,
        "tshark found {bad} bad CRCs among {}",
        statuses.len()
    );
    let cat = tids.iter().filter(|t| *t == "0x01").count();
    eprintln!(
        "tshark: {} section CRCs checked, table_ids {:?}",
        statuses.len(),
        {
            let mut u = tids.clone();
            u.sort();
            u.dedup();
            u
        }
    );
    assert!(cat > 0, "tshark saw no CAT: {tids:?}");
    assert!(
        tids.iter().any(|t| t == "0x82"),
        "tshark saw no EMM: {tids:?}"
    );
    // tshark counts exactly the sections our depacketizer found.
    assert_eq!(statuses.len(), expect_sections, "sections seen by tshark");
    assert_no_cc_drops(f, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_to_loopback_decodes_cleanly_in_tshark() {
    let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = rx.local_addr().unwrap();
    let mut udp = UdpConfig::new(dest);
    udp.dscp = Some(34); // AF41
    udp.ttl = Some(2);
    let output = AsyncUdpOutput::new(UdpOutput::open(&udp).unwrap()).unwrap();
    let rtp = RtpConfig {
        ssrc: 0x1234_5678,
        initial_sequence: 65_000,
        initial_timestamp: 0,
    };
    let config = PlayerConfig {
        name: "loopback".into(),
        mux: MuxConfig {
            bitrate: 4_000_000,
            cbr: true,
            rtp: Some(rtp),
            ..MuxConfig::default()
        },
        schedule: ScheduleConfig {
            burst_count: 2,
            burst_interval: 50,
        },
        clock_anchor_unix_ms: None,
        spin: carousel::DEFAULT_SPIN,
    };
    let carousel = Carousel::new();
    let cancel = CancellationToken::new();
    let player = carousel
        .spawn_player(config, output, None, cancel.clone())
        .unwrap();
    for id in 0..40 {
        carousel
            .add(emm(
                id,
                Class::ALL[(id % 3) as usize],
                u64::MAX,
                60 + 7 * id as usize,
            ))
            .await
            .unwrap();
    }
    // 400 datagrams ≈ 1 s at 4 Mbit/s; the timeout only turns a hang into a failure.
    let mut datagrams = Vec::new();
    let mut buf = [0u8; 2048];
    while datagrams.len() < 400 {
        let n = tokio::time::timeout(Duration::from_secs(10), rx.recv(&mut buf))
            .await
            .expect("no datagram within 10 s")
            .unwrap();
        datagrams.push(buf[..n].to_vec());
    }
    cancel.cancel();
    let stats = player.join().await;
    assert!(
        stats.datagrams >= 400 && stats.send_errors == 0,
        "{stats:?}"
    );

    let mut ts = Vec::new();
    for (i, d) in datagrams.iter().enumerate() {
        assert_eq!(d.len(), RTP_HEADER_LEN + 7 * 188);
        assert_eq!(d[..2], [0x80, 33]);
        assert_eq!(
            u16::from_be_bytes([d[2], d[3]]),
            65_000u16.wrapping_add(i as u16)
        );
        assert_eq!(d[8..12], 0x1234_5678u32.to_be_bytes());
        ts.extend_from_slice(&d[RTP_HEADER_LEN..]);
    }
    let (emms, cats, errors) = demux(&ts, Pid::DEFAULT_EMM);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(cats.len() >= 2);
    let mut ids: Vec<u64> = emms.iter().map(|s| id_of(s)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, (0..40).collect::<Vec<_>>(), "every EMM on air");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loopback.ts");
    std::fs::write(&path, &ts).unwrap();
    check_with_tshark(&path, emms.len() + cats.len());
}
