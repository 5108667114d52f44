//! casd-probe against the real headend: the Cycler role plays EMMs sealed
//! by the LocalEncryptor and stored in a TestDb; the probe listens on
//! 127.0.0.1, live (plain and RTP on another PID found through the CAT)
//! and then from its own recordings (.ts and pcap).

use crate::probe_common;

use std::time::Duration;

use probe_common::headend::*;
use probe_common::{probe, Run};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

fn assert_decoded(r: &Run, stored: &[Stored], what: &str) {
    for s in stored {
        let e = r
            .records
            .iter()
            .find(|v| v["type"] == "emm" && v["emm_id"] == s.id)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: EMM {} not decoded:\n{}\n{}",
                    s.id,
                    r.stdout(),
                    r.stderr()
                )
            });
        assert_eq!(e["mac"], "ok", "{what}: {e}");
        assert_eq!(
            e["address"],
            serde_json::to_value(&s.address).unwrap(),
            "{what}"
        );
        assert_eq!(e["commands"], s.expected_commands(), "{what}");
        assert_eq!(e["not_after"], 2_000_000_000u32, "{what}");
    }
    let sum = r.summary();
    for k in [
        "crc",
        "cc",
        "mac",
        "truncated",
        "sync",
        "stream",
        "invalid_section",
        "malformed_emm",
    ] {
        assert_eq!(sum["errors"][k], 0, "{what}: {k} errors: {sum}");
    }
    for mode in ["unique", "group", "global"] {
        assert_eq!(sum["emms_distinct"][mode], 1, "{what}: {sum}");
        assert!(
            sum["emm_sections"][mode].as_u64().unwrap() > 1,
            "{what}: {sum}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_the_headend_live_and_from_its_recordings() {
    let h = Headend::new().await;
    let stored = h.store_three().await;
    let dir = tempfile::tempdir().unwrap();
    let ts = dir.path().join("rec.ts");
    let pcap = dir.path().join("rec.pcap");
    let (p1, p2) = (free_port(), free_port());
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.1:{p2}");
    let pmk = h.pmk_hex();
    let count = "2500";
    let (c1, o1) = spawn_probe(&[
        "--udp",
        &a1,
        "--count",
        count,
        "--json",
        "--pmk",
        &pmk,
        "--write-ts",
        ts.to_str().unwrap(),
        "--write-pcap",
        pcap.to_str().unwrap(),
    ]);
    let (c2, o2) = spawn_probe(&["--udp", &a2, "--count", count, "--json", "--pmk", &pmk]);
    // Both probes listen: start the headend, a second output with RTP on PID 0x0200.
    let casd = h
        .start_cycler(a1.parse().unwrap(), |cfg| {
            let mut o = cfg.cycler.outputs[0].clone();
            o.name = "rtp".into();
            o.destination = a2.parse().unwrap();
            o.rtp = true;
            o.pid = 0x0200;
            cfg.cycler.outputs.push(o);
        })
        .await;
    let r1 = finish_probe(c1, o1, LIMIT).await;
    let r2 = finish_probe(c2, o2, LIMIT).await;
    casd.shutdown().await.unwrap();

    assert_eq!(r1.code(), 0, "{}", r1.stderr());
    assert_decoded(&r1, &stored, "live");
    let s1 = r1.summary();
    assert_eq!(s1["packets"], 2500);
    assert_eq!(s1["rtp_datagrams"], 0);
    assert_eq!(
        s1["cat"],
        json!([{"ca_system_id": 0x4AFF, "ca_pid": 0x0101}])
    );
    // Group/global EMMs opened with keys learned from the unique EMM.
    let g = r1
        .records
        .iter()
        .find(|v| v["type"] == "emm" && v["mode"] == "group")
        .unwrap();
    assert_eq!(g["key_source"], "learned_gk");
    // Timing from the live capture: bitrate near the configured 2 Mbit/s
    // in total, and a cycle time per EMM.
    let total_bps: f64 = s1["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bitrate_bps"].as_f64().unwrap())
        .sum();
    assert!(total_bps > 1.0e6 && total_bps < 2.2e6, "{s1}");
    assert_eq!(s1["cycle"]["unit"], "ms");
    for e in s1["per_emm"].as_array().unwrap() {
        assert!(e["cycle"]["min"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(e["cycle"]["max"].as_f64().unwrap() < 1000.0, "{e}");
    }
    // No key bytes in the output unless asked for.
    let ((gv, gk), (lv, glk)) = h.gk_glk_hex().await;
    assert!(!r1.stdout().contains(&gk) && !r1.stdout().contains(&glk));

    // RTP output, EMM PID taken from the CAT.
    assert_eq!(r2.code(), 0, "{}", r2.stderr());
    assert_decoded(&r2, &stored, "rtp");
    let s2 = r2.summary();
    assert!(s2["rtp_datagrams"].as_u64().unwrap() > 0);
    assert_eq!(s2["rtp_datagrams"], s2["datagrams"]);
    assert_eq!(
        s2["cat"],
        json!([{"ca_system_id": 0x4AFF, "ca_pid": 0x0200}])
    );
    assert!(s2["pids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == 0x0200 && p["sections"].as_u64().unwrap() > 0));

    // The recording, read back: same sections, keys from a key file.
    let kf = dir.path().join("keys.json");
    std::fs::write(
        &kf,
        json!({"pmk": [{"version": 1, "key": pmk}], "gk": [{"group_id": GROUP, "version": gv, "key": gk}],
               "glk": [{"version": lv, "key": glk}]})
        .to_string(),
    )
    .unwrap();
    let rt = probe(&[
        "--ts",
        ts.to_str().unwrap(),
        "--json",
        "--keys",
        kf.to_str().unwrap(),
        "--show-keys",
        "--no-learn-keys",
    ]);
    assert_eq!(rt.code(), 0, "{}", rt.stderr());
    let mut expected = Vec::new();
    for s in &stored {
        let e = rt
            .records
            .iter()
            .find(|v| v["type"] == "emm" && v["emm_id"] == s.id)
            .unwrap();
        expected.push(e.clone());
    }
    assert_eq!(expected[0]["commands"][1]["key"], Value::String(gk.clone()));
    assert_eq!(
        expected[0]["commands"][2]["key"],
        Value::String(glk.clone())
    );
    assert_eq!(expected[1]["key_source"], "gk");
    let st = rt.summary();
    assert_eq!(st["packets"], 2500);
    assert_eq!(st["emm_sections"], s1["emm_sections"], "{s1}\n{st}");
    assert_eq!(st["errors"]["cc"], 0);
    assert_eq!(st["errors"]["crc"], 0);
    // And the pcap recording (wall-clock times kept). It holds whole
    // datagrams, so the last one may have a few packets past --count.
    let rp = probe(&[
        "--pcap",
        pcap.to_str().unwrap(),
        "--json",
        "--pmk",
        &pmk,
        "--count",
        count,
    ]);
    assert_eq!(rp.code(), 0, "{}", rp.stderr());
    assert_decoded(&rp, &stored, "pcap");
    let sp = rp.summary();
    assert_eq!(sp["emm_sections"], s1["emm_sections"]);
    assert_eq!(sp["datagrams"], s1["datagrams"]);
    assert_eq!(sp["cycle"]["unit"], "ms");
}
