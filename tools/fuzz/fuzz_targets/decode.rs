//! Arbitrary bytes as a TS byte stream: resync, per-PID reassembly on every
//! PID, CAT, EMM parsing and opening with a PMK (and keys learned on air).
#![no_main]

use casd_wire::crypto::Key128;
use casd_tools::decode::{Probe, ProbeConfig, Resync};
use casd_tools::keys::KeySet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut keys = KeySet::default();
    keys.add_pmk(None, Key128::from_bytes([0x11; 16]));
    let mut probe = Probe::new(ProbeConfig {
        keys,
        all_pids: true,
        repeats: true,
        keep_times: true,
        ts_bitrate: Some(1_000_000),
        ..ProbeConfig::default()
    });
    let mut resync = Resync::new();
    let mut packets: Vec<Vec<u8>> = Vec::new();
    // Split at a data-dependent point so chunk boundaries get exercised.
    let split = data.first().map_or(0, |b| usize::from(*b) * 3).min(data.len());
    resync.push(&data[..split], &mut |p| packets.push(p.to_vec()));
    resync.push(&data[split..], &mut |p| packets.push(p.to_vec()));
    resync.finish(&mut |p| packets.push(p.to_vec()));
    for p in &packets {
        probe.push_packet(p, None, &mut |_| {});
    }
    // Datagram path: the raw input as one datagram (RTP auto-detect).
    let (ts, _) = casd_tools::net::strip_rtp(data, casd_tools::net::RtpMode::Auto);
    for p in ts.chunks(188) {
        probe.push_packet(p, Some(1.0), &mut |_| {});
    }
    let _ = probe.summary(true, 100);
});
