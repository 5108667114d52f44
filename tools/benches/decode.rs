//! Decoding speed of casd-probe from a .ts file, next to baselines measured
//! in the same run on the same file:
//!   - `read`: the file read in 64 KiB blocks and discarded (like `cat > /dev/null`),
//!   - `chunk loop`: the same plus a plain loop over 188-byte packets touching
//!     the sync byte,
//!   - the probe's pipeline in process (resync + per-PID depacketizer + CRC +
//!     EMM parsing), without keys and with a PMK (every EMM opened once,
//!     repetitions recognised by their bytes),
//!   - the release `casd-probe` binary itself (`--ts FILE --quiet --json`).
//!
//! `cargo bench -p casd-tools --bench decode` (CASD_PROBE_BENCH_PACKETS sets
//! the file size, default 1 000 000 packets = 188 MB).

use std::io::Read;
use std::time::Instant;

use bytes::Bytes;
use carousel::{Packetizer, Pid};
use casd_tools::decode::{Probe, ProbeConfig, Resync};
use casd_tools::keys::KeySet;
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::emm::{Address, Command, DeviceId, Entitlement};

// The streams and the sealing of the probe's tests, one copy.
#[path = "../tests/it/common/mod.rs"]
mod common;
use common::{cat_section, seal, GK, PMK};

fn sections() -> Vec<Bytes> {
    let pmk = Key128::from_bytes(PMK);
    let ent = Entitlement {
        product_id: 7,
        start: 1_700_000_000,
        end: 1_800_000_000,
    };
    let mut out = Vec::new();
    for d in 1..=3000u64 {
        let address = Address::Unique {
            device_id: DeviceId::new(d).unwrap(),
        };
        let commands = vec![Command::EntitlementSet {
            entries: vec![ent; 4],
        }];
        out.push(seal(d, address, 1, commands, &derive_duk(&pmk, d)));
    }
    let gk = Key128::from_bytes(GK);
    for g in 0..100u32 {
        let address = Address::group_with_slots(g, 0..=255);
        let commands = vec![Command::EntitlementAdd(ent)];
        out.push(seal(10_000 + u64::from(g), address, 1, commands, &gk));
    }
    out
}

fn make_file(path: &std::path::Path, packets: usize) {
    let secs = sections();
    let cat = cat_section();
    let mut emm = Packetizer::new(Pid::DEFAULT_EMM, true);
    let mut catp = Packetizer::new(Pid::CAT, true);
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut pkt = [0u8; 188];
    let mut n = 0;
    let mut i = 0;
    while n < packets {
        if n % 500 == 0 {
            let mut c = Some(cat.clone());
            while catp.next_packet(&mut pkt, || c.take()) {
                std::io::Write::write_all(&mut w, &pkt).unwrap();
                n += 1;
            }
        }
        if emm.next_packet(&mut pkt, || {
            i += 1;
            Some(secs[i % secs.len()].clone())
        }) {
            std::io::Write::write_all(&mut w, &pkt).unwrap();
            n += 1;
        }
    }
    std::io::Write::flush(&mut w).unwrap();
}

fn read_all(path: &std::path::Path, mut f: impl FnMut(&[u8])) -> f64 {
    let t = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        f(&buf[..n]);
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let packets: usize = std::env::var("CASD_PROBE_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.ts");
    make_file(&path, packets);
    let mb = (packets * 188) as f64 / 1e6;
    println!("file: {packets} packets ({mb:.0} MB), 3100 distinct EMM sections cycled, CAT every 500 packets");
    // Warm the page cache.
    read_all(&path, |_| {});

    // Each figure is the best of RUNS runs (the machine is shared).
    const RUNS: usize = 3;
    let best = |f: &mut dyn FnMut() -> f64| (0..RUNS).map(|_| f()).fold(f64::INFINITY, f64::min);
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let t = best(&mut || {
        read_all(&path, |b| {
            std::hint::black_box(b);
        })
    });
    rows.push(("read 64 KiB blocks (cat > /dev/null)", t));
    let mut acc = 0u64;
    let t = best(&mut || {
        read_all(&path, |b| {
            for p in b.chunks(188) {
                acc += u64::from(p[0]);
            }
        })
    });
    std::hint::black_box(acc);
    rows.push(("read + plain 188-byte chunk loop", t));

    for (name, keyed) in [
        ("probe pipeline, no keys", false),
        ("probe pipeline, PMK (all EMMs opened)", true),
    ] {
        let mut keys = KeySet::default();
        if keyed {
            keys.add_pmk(None, Key128::from_bytes(PMK));
            for g in 0..100 {
                keys.add_gk(g, 1, Key128::from_bytes([0x5A; 16]));
            }
        }
        let mut t = f64::INFINITY;
        let mut probe = Probe::new(ProbeConfig::default());
        let mut sink = 0usize;
        for _ in 0..RUNS {
            probe = Probe::new(ProbeConfig {
                keys: keys.clone(),
                ..ProbeConfig::default()
            });
            let mut r = Resync::new();
            t = t.min(read_all(&path, |b| {
                r.push(b, &mut |p| {
                    probe.push_packet(p, None, &mut |v| sink += v.is_object() as usize)
                });
            }));
        }
        assert_eq!(probe.counters.packets as usize, packets);
        assert_eq!(probe.counters.crc_errors + probe.counters.cc_errors, 0);
        if keyed {
            assert_eq!(probe.counters.no_key, 0);
            assert!(probe.counters.opened > 0);
        }
        std::hint::black_box(sink);
        rows.push((name, t));
    }

    let bin = env!("CARGO_BIN_EXE_casd-probe");
    let t = best(&mut || {
        let t0 = Instant::now();
        let out = std::process::Command::new(bin)
            .args([
                "--ts",
                path.to_str().unwrap(),
                "--quiet",
                "--json",
                "--pmk",
                &hex::encode(PMK),
            ])
            .output()
            .unwrap();
        let t = t0.elapsed().as_secs_f64();
        assert!(out.status.success());
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["packets"].as_u64().unwrap() as usize, packets);
        t
    });
    rows.push(("casd-probe binary --ts --pmk (process, wall)", t));

    let base = rows[0].1;
    println!(
        "{:<46} {:>10} {:>14} {:>10} {:>12}",
        "what", "seconds", "packets/s", "MB/s", "x read time"
    );
    for (name, t) in &rows {
        println!(
            "{name:<46} {t:>10.3} {:>14.0} {:>10.0} {:>12.1}",
            packets as f64 / t,
            mb / t,
            t / base
        );
    }
}
