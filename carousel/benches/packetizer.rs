//! Throughput and memory figures for docs/carousel.md.
//!
//!     CARGO_TARGET_DIR=target-carousel cargo bench -p carousel --bench packetizer
//!
//! - Packetizer: TS packets per second on one core, packing 200-byte
//!   sections, against a baseline that only copies the same payload bytes
//!   into 188-byte packet buffers (memcpy); the ratio is what the section
//!   carriage logic costs on top of moving the bytes.
//! - Depacketizer: packets per second reassembling (and CRC-checking) them.
//! - Schedule: `next()` per second in a 1M-EMM carousel.
//! - Memory: resident set growth (from /proc/self/statm) while building
//!   1M sections, inserting them into one schedule, then into a second one
//!   (a second output sharing the same `Bytes`), divided by 1M.
//!
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a tiny smoke
//! version so CI stays fast.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use carousel::schedule::{Class, Emm, Schedule, ScheduleConfig};
use carousel::section::{build, LongHeader, TableId};
use carousel::ts::{Depacketizer, Event, Packetizer, Pid, PACKET_LEN};

fn section(i: u64, len: usize) -> Bytes {
    let mut body = i.to_be_bytes().to_vec();
    body.resize(len - 12, i as u8);
    Bytes::from(build(&LongHeader::private(TableId::EMM_UNIQUE, i as u16), &body).unwrap())
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let packets: usize = if full { 5_000_000 } else { 10_000 };
    let emms: u64 = if full { 1_000_000 } else { 10_000 };

    // --- packetizer vs memcpy -------------------------------------------
    let sections: Vec<Bytes> = (0..4096).map(|i| section(i, 200)).collect();
    let mut p = Packetizer::new(Pid::DEFAULT_EMM, true);
    let mut pkt = [0u8; PACKET_LEN];
    let mut i = 0usize;
    let mut stream = Vec::with_capacity(if full { 0 } else { packets * PACKET_LEN });
    let t = Instant::now();
    for _ in 0..packets {
        p.next_packet(&mut pkt, || {
            i += 1;
            Some(sections[i % sections.len()].clone())
        });
        black_box(&pkt);
        if !full {
            stream.extend_from_slice(&pkt);
        }
    }
    let pk = t.elapsed();
    let payload: Vec<u8> = sections.iter().flat_map(|s| s.iter().copied()).collect();
    let t = Instant::now();
    let mut off = 0;
    for _ in 0..packets {
        if off + 184 > payload.len() {
            off = 0;
        }
        pkt[4..].copy_from_slice(&payload[off..off + 184]);
        off += 184;
        black_box(&pkt);
    }
    let mc = t.elapsed();
    let pps = packets as f64 / pk.as_secs_f64();
    let mps = packets as f64 / mc.as_secs_f64();
    println!(
        "packetizer: {:.1} M packets/s ({:.2} Gbit/s of TS); memcpy baseline {:.1} M packets/s; ratio {:.2}",
        pps / 1e6,
        pps * 188.0 * 8.0 / 1e9,
        mps / 1e6,
        mps / pps
    );

    // --- depacketizer ----------------------------------------------------
    if full {
        let mut p = Packetizer::new(Pid::DEFAULT_EMM, true);
        let mut i = 0usize;
        for _ in 0..1_000_000 {
            p.next_packet(&mut pkt, || {
                i += 1;
                Some(sections[i % sections.len()].clone())
            });
            stream.extend_from_slice(&pkt);
        }
    }
    let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
    let mut n = 0u64;
    let t = Instant::now();
    for chunk in stream.chunks(PACKET_LEN) {
        d.push_with(chunk, |e| {
            if let Event::Section(_) = e {
                n += 1
            }
        });
    }
    let dp = t.elapsed();
    assert_eq!(d.stats().errors, 0);
    println!(
        "depacketizer: {:.2} M packets/s, {n} sections CRC-checked",
        (stream.len() / PACKET_LEN) as f64 / dp.as_secs_f64() / 1e6
    );
    drop(stream);

    // --- memory per EMM and schedule speed ------------------------------
    let r0 = rss_bytes();
    let secs: Vec<Bytes> = (0..emms).map(|i| section(i, 200)).collect();
    let r1 = rss_bytes();
    let cfg = ScheduleConfig {
        burst_count: 0,
        burst_interval: 0,
    };
    let mut a = Schedule::new(cfg);
    for (i, s) in secs.iter().enumerate() {
        let id = i as u64;
        a.insert(
            Emm {
                id,
                class: Class::ALL[i % 3],
                not_after: u64::MAX,
                section: s.clone(),
            },
            0,
        )
        .unwrap();
    }
    let r2 = rss_bytes();
    let mut b = Schedule::new(cfg);
    for (i, s) in secs.iter().enumerate() {
        b.insert(
            Emm {
                id: i as u64,
                class: Class::ALL[i % 3],
                not_after: u64::MAX,
                section: s.clone(),
            },
            0,
        )
        .unwrap();
    }
    let r3 = rss_bytes();
    let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / emms as f64;
    println!(
        "memory at {emms} EMMs of 200 bytes: sections {:.0} B/EMM (200 payload); first schedule {:.0} B/EMM \
         (incl. one-off 32 B shared Bytes header); each further output {:.0} B/EMM; heap_bytes() estimate {:.0} B/EMM",
        per(r0, r1),
        per(r1, r2),
        per(r2, r3),
        b.heap_bytes() as f64 / emms as f64
    );
    let t = Instant::now();
    let plays = emms * 3;
    for _ in 0..plays {
        black_box(a.next(1));
    }
    let sp = t.elapsed();
    let t = Instant::now();
    for id in (0..emms).step_by(2) {
        a.remove(id);
    }
    let rm = t.elapsed();
    println!(
        "schedule: next() {:.1} M/s at {emms} EMMs; remove {:.0} ns each",
        plays as f64 / sp.as_secs_f64() / 1e6,
        rm.as_nanos() as f64 / (emms / 2) as f64
    );
    black_box((a, b, secs));
}
