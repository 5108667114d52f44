//! Hand-made streams, clean and broken, decoded by the probe binary.

use crate::common;

use common::*;
use serde_json::json;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn clean_stream_decodes_every_emm_with_the_pmk_alone() {
    let d = tmp();
    let f = fixture();
    let pkts = stream(&[f.unique.clone(), f.group.clone(), f.global.clone()], 5);
    let path = d.path().join("clean.ts");
    write_ts(&path, &pkts);
    let r = probe_json("--ts", &path, &["--pmk", &hex16(&PMK)]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let u = r.emm(1);
    assert_eq!(u["mac"], "ok");
    assert_eq!(u["key_source"], "pmk");
    assert_eq!(u["address"], json!({"mode": "unique", "device_id": DEVICE}));
    assert_eq!(u["commands"][0], json!({"type": "device_enable"}));
    assert_eq!(u["commands"][1]["type"], "group_key");
    assert_eq!(u["commands"][1]["key"], "<redacted, 16 bytes>");
    assert_eq!(u["commands"][2]["key"], "<redacted, 16 bytes>");
    assert!(!r.stdout().contains(&hex16(&GK)) && !r.stdout().contains(&hex16(&GLK)));
    // Group and global open with the keys the unique EMM delivered.
    let g = r.emm(2);
    assert_eq!(
        (g["mac"].as_str(), g["key_source"].as_str()),
        (Some("ok"), Some("learned_gk"))
    );
    assert_eq!(
        g["address"],
        json!({"mode": "group", "group_id": GROUP, "slots": [5, 9]})
    );
    assert_eq!(
        g["commands"],
        json!([{"type": "entitlement_add", "product_id": 42, "start": 1_700_000_000u32, "end": 1_800_000_000u32}])
    );
    let gl = r.emm(3);
    assert_eq!(
        gl["commands"],
        json!([{"type": "osm", "duration_s": 10, "forced": true, "text": "hello"}])
    );
    let cat = &r.of_type("cat")[0];
    assert_eq!(
        cat["ca_descriptors"],
        json!([{"ca_system_id": 0x4AFF, "ca_pid": 0x0101}])
    );
    let s = r.summary();
    assert_eq!(
        s["emm_sections"],
        json!({"unique": 5, "group": 5, "global": 5})
    );
    assert_eq!(
        s["emms_distinct"],
        json!({"unique": 1, "group": 1, "global": 1})
    );
    for k in [
        "crc",
        "cc",
        "mac",
        "truncated",
        "sync",
        "malformed_emm",
        "no_key",
    ] {
        assert_eq!(r.errors(k), 0, "{k}: {s}");
    }
    // 5 sightings each: 4 intervals per EMM, in packets (no timing in a .ts file).
    assert_eq!(s["cycle"]["unit"], "packets");
    assert_eq!(s["per_emm"][0]["cycle"]["count"], 4);
    // --show-keys prints them (test keys only).
    let r = probe_json("--ts", &path, &["--pmk", &hex16(&PMK), "--show-keys"]);
    assert_eq!(r.emm(1)["commands"][1]["key"], hex16(&GK));
    assert_eq!(r.emm(1)["commands"][2]["key"], hex16(&GLK));
    // With --ts-bitrate the cycle comes out in ms and PIDs get a bitrate.
    let r = probe_json("--ts", &path, &["--ts-bitrate", "1000000"]);
    let s = r.summary();
    assert_eq!(s["cycle"]["unit"], "ms");
    assert!(s["pids"][1]["bitrate_bps"].as_f64().unwrap() > 0.0, "{s}");
    // Without keys: decoded structurally, not opened.
    assert_eq!(r.emm(1)["mac"], "no_key");
    assert_eq!(r.errors("no_key"), 15);
}

#[test]
fn bad_crc_is_counted_and_the_section_dropped() {
    let d = tmp();
    let f = fixture();
    let mut pkts = stream(std::slice::from_ref(&f.global), 3);
    // Packet 0 is the CAT, packet 1 the first EMM packet: flip a byte of
    // the section body (after the 4-byte header, AF of 2 and pointer).
    pkts[1][40] ^= 0x01;
    let path = d.path().join("crc.ts");
    write_ts(&path, &pkts);
    let r = probe_json("--ts", &path, &["--glk", &format!("1={}", hex16(&GLK))]);
    assert_eq!(r.code(), 0);
    assert_eq!(r.errors("crc"), 1);
    assert_eq!(r.errors("cc"), 0);
    assert_eq!(r.summary()["emm_sections"]["global"], 2);
    let e = &r.of_type("error")[0];
    assert_eq!(e["kind"], "crc");
    assert!(
        e["message"].as_str().unwrap().contains("CRC_32 mismatch"),
        "{e}"
    );
    // --fail-on-errors turns it into exit 1.
    let r = probe(&[
        "--ts",
        path.to_str().unwrap(),
        "--quiet",
        "--fail-on-errors",
    ]);
    assert_eq!(r.code(), 1);
}

#[test]
fn cc_gap_and_truncated_section_are_reported() {
    let d = tmp();
    let f = fixture();
    // The unique EMM is larger than one packet: dropping its second packet
    // breaks the counter and loses that section.
    let pkts = stream(&[f.unique.clone(), f.global.clone()], 2);
    assert!(f.unique.len() > 184);
    let mut gap = pkts.clone();
    gap.remove(2);
    let path = d.path().join("cc.ts");
    write_ts(&path, &gap);
    let r = probe_json("--ts", &path, &[]);
    assert_eq!(r.errors("cc"), 1, "{}", r.stdout());
    let e = r.of_type("error");
    assert_eq!(e[0]["kind"], "cc");
    assert!(e[0]["message"]
        .as_str()
        .unwrap()
        .contains("continuity_counter gap"));
    assert_eq!(r.summary()["emm_sections"]["unique"], 1);

    // Truncated: the first unique section's second packet is replaced by a
    // packet (CC continuing) that starts a new section with PUSI.
    let mut tr = pkts.clone();
    let cc = tr[2][3] & 0x0F;
    let mut p = [0xFFu8; 188];
    p[..5].copy_from_slice(&[0x47, 0x41, 0x01, 0x10 | cc, 0x00]);
    p[5..5 + f.global.len()].copy_from_slice(&f.global);
    tr[2] = p;
    let path = d.path().join("trunc.ts");
    write_ts(&path, &tr);
    let r = probe_json("--ts", &path, &[]);
    assert_eq!(r.errors("truncated"), 1, "{}", r.stdout());
    assert_eq!(r.errors("cc"), 0);
    let e = r.of_type("error");
    assert!(
        e[0]["message"].as_str().unwrap().contains("truncated"),
        "{}",
        e[0]
    );
}

#[test]
fn wrong_key_fails_the_mac_and_prints_no_command() {
    let d = tmp();
    let f = fixture();
    let pkts = stream(&[f.unique.clone(), f.group.clone()], 4);
    let path = d.path().join("k.ts");
    write_ts(&path, &pkts);
    let wrong = hex16(&[0x22; 16]);
    let r = probe_json(
        "--ts",
        &path,
        &["--pmk", &wrong, "--gk", &format!("3:1={wrong}")],
    );
    assert_eq!(r.code(), 0);
    assert_eq!(r.errors("mac"), 8);
    let u = r.emm(1);
    assert_eq!(u["mac"], "fail");
    assert!(u.get("commands").is_none());
    assert_eq!(r.emm(2)["mac"], "fail");
    // Human output says so too.
    let r = probe(&["--ts", path.to_str().unwrap(), "--pmk", &wrong]);
    assert!(r.stdout().contains("MAC FAILED"), "{}", r.stdout());
    assert!(r.stdout().contains("MAC 4"), "{}", r.stdout());
}

#[test]
fn garbage_and_sync_loss_never_panic() {
    let d = tmp();
    let f = fixture();
    let pkts = stream(std::slice::from_ref(&f.global), 3);
    let mut bytes: Vec<u8> = vec![0x47, 1, 2, 3, 4, 5, 6];
    for (i, p) in pkts.iter().enumerate() {
        bytes.extend_from_slice(p);
        if i == 2 {
            bytes.extend_from_slice(&[0xAB; 50]);
        }
    }
    bytes.extend_from_slice(&[0x47, 0x00]);
    let path = d.path().join("g.ts");
    std::fs::write(&path, &bytes).unwrap();
    let r = probe_json("--ts", &path, &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.errors("skipped_bytes"), 7 + 50);
    assert_eq!(r.errors("sync_losses"), 1);
    assert_eq!(r.errors("trailing_bytes"), 2);
    assert_eq!(r.summary()["emm_sections"]["global"], 3);
    // Pure noise.
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &noise).unwrap();
    let r = probe_json("--ts", &path, &["--all-pids", "--pmk", &hex16(&PMK)]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stderr().is_empty(), "{}", r.stderr());
}

#[test]
fn bad_inputs_and_keys_fail_in_one_line() {
    let d = tmp();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--ts".into(), "/nonexistent/x.ts".into()],
            "cannot open /nonexistent/x.ts",
        ),
        (
            vec!["--ts".into(), d.path().display().to_string()],
            "is a directory",
        ),
        (
            vec!["--pcap".into(), "/nonexistent/x.pcap".into()],
            "cannot open",
        ),
        (
            vec!["--ts".into(), "-".into(), "--pmk".into(), "zz".into()],
            "--pmk: key is not hexadecimal",
        ),
        (
            vec!["--ts".into(), "-".into(), "--gk".into(), "3=00".into()],
            "--gk: expected GROUP:VERSION=HEX",
        ),
        (
            vec!["--ts".into(), "-".into(), "--glk".into(), "1=0011".into()],
            "key is 2 bytes, expected 16",
        ),
        (
            vec![
                "--ts".into(),
                "-".into(),
                "--keys".into(),
                "/nonexistent/k.json".into(),
            ],
            "key file /nonexistent/k.json",
        ),
        (
            vec![
                "--udp".into(),
                "239.1.1.1:5500".into(),
                "--interface".into(),
                "nosuchif0".into(),
            ],
            "no network interface named \"nosuchif0\"",
        ),
        (vec!["--udp".into(), "[::1]:5500".into()], "only IPv4"),
    ];
    let notpcap = d.path().join("x.pcap");
    std::fs::write(&notpcap, b"hello world").unwrap();
    let mut cases = cases;
    cases.push((
        vec!["--pcap".into(), notpcap.display().to_string()],
        "is not a pcap or pcapng file",
    ));
    let badkeys = d.path().join("k.json");
    std::fs::write(
        &badkeys,
        r#"{"gk":[{"group_id":1,"version":1,"key":"00"}]}"#,
    )
    .unwrap();
    cases.push((
        vec![
            "--ts".into(),
            "-".into(),
            "--keys".into(),
            badkeys.display().to_string(),
        ],
        "gk[0]: key is 1 bytes",
    ));
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = probe(&a);
        let err = r.stderr();
        assert_eq!(r.code(), 2, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn key_file_opens_everything_and_is_documented_format() {
    let d = tmp();
    let f = fixture();
    let path = d.path().join("k.ts");
    write_ts(
        &path,
        &stream(&[f.group.clone(), f.global.clone(), f.unique.clone()], 2),
    );
    let duk = casd_wire::crypto::derive_duk(&casd_wire::crypto::Key128::from_bytes(PMK), DEVICE);
    let keys = json!({
        "duk": [{"device_id": DEVICE, "key": hex::encode(duk.expose())}],
        "gk": [{"group_id": GROUP, "version": 1, "key": hex16(&GK)}],
        "glk": [{"version": 1, "key": hex16(&GLK)}],
    });
    let kf = d.path().join("keys.json");
    std::fs::write(&kf, keys.to_string()).unwrap();
    let r = probe_json(
        "--ts",
        &path,
        &["--keys", kf.to_str().unwrap(), "--no-learn-keys"],
    );
    assert_eq!(r.emm(1)["key_source"], "duk");
    assert_eq!(r.emm(2)["key_source"], "gk");
    assert_eq!(r.emm(3)["key_source"], "glk");
    assert_eq!(r.summary()["emms_opened"], 6);
}
