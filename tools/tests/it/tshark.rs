//! The probe's pcap recording, opened by Debian's tshark: every datagram is
//! a UDP packet, every section decodes with a good CRC, no CC drop. tshark
//! is required (`apt-get install tshark`): without it this test fails.

use crate::common;
#[path = "../../../carousel/tests/it/common/tshark.rs"]
mod tshark_run;

use common::*;
use tshark_run::{assert_no_cc_drops, sections, tshark, Sections};

#[test]
fn pcap_written_by_the_probe_opens_in_tshark() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture();
    let pkts = stream(&[f.unique.clone(), f.group.clone(), f.global.clone()], 20);
    let input = d.path().join("in.ts");
    write_ts(&input, &pkts);
    let pcap = d.path().join("out.pcap");
    let r = probe_json(
        "--ts",
        &input,
        &["--quiet", "--write-pcap", pcap.to_str().unwrap()],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let section_count = r.summary()["sections"].as_u64().unwrap();
    assert_eq!(section_count, 20 * 4);
    let p = pcap.to_str().unwrap();

    // One UDP packet per 7 TS packets (the last one partial).
    let udp = tshark(&[
        "-r",
        p,
        "-Y",
        "udp.dstport == 5500",
        "-T",
        "fields",
        "-e",
        "udp.length",
    ]);
    let lens: Vec<usize> = udp.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(lens.len(), pkts.len().div_ceil(7), "{udp}");
    assert!(lens[..lens.len() - 1].iter().all(|&l| l == 8 + 7 * 188));

    // Every section, decoded by tshark's MPEG dissectors, with CRC checked.
    let udp_ts = ["-d", "udp.port==5500,mp2t"];
    let Sections {
        tids,
        crc_statuses: statuses,
        raw,
    } = sections(p, &udp_ts);
    assert_eq!(
        statuses.len() as u64,
        section_count,
        "tshark sections:\n{raw}"
    );
    assert!(
        statuses.iter().all(|s| s == "1"),
        "bad CRC in tshark: {statuses:?}"
    );
    for t in ["0x01", "0x82", "0x83", "0x84"] {
        assert_eq!(tids.iter().filter(|x| *x == t).count(), 20, "{t}: {tids:?}");
    }
    assert_no_cc_drops(p, &udp_ts);

    // tshark's pcapng of the same capture reads back identically.
    let ng = d.path().join("out.pcapng");
    tshark(&["-r", p, "-F", "pcapng", "-w", ng.to_str().unwrap()]);
    let r2 = probe_json("--pcap", &ng, &["--quiet", "--port", "5500"]);
    assert_eq!(r2.code(), 0, "{}", r2.stderr());
    let (a, b) = (r.summary(), r2.summary());
    assert_eq!(a["emm_sections"], b["emm_sections"]);
    assert_eq!(b["sections"], section_count);
    assert_eq!(b["datagrams"].as_u64().unwrap() as usize, lens.len());
    assert_eq!(b["errors"]["cc"], 0);
    // The pcap times were kept (synthesised at 2 Mbit/s for a .ts input).
    let dur = b["duration_s"].as_f64().unwrap();
    let expect = (lens.len() - 1) as f64 * 7.0 * 1504.0 / 2e6;
    assert!((dur - expect).abs() < 1e-3, "{dur} vs {expect}");
    // A port filter that matches nothing skips every frame.
    let r3 = probe_json("--pcap", &ng, &["--quiet", "--port", "9"]);
    assert_eq!(r3.summary()["packets"], 0);
    assert_eq!(
        r3.summary()["errors"]["frames_skipped"].as_u64().unwrap() as usize,
        lens.len()
    );
}
