//! The project's known-answer vectors (wire/tests/vectors/emm-v1.json, made by
//! wire/tests/it/crypto_vectors.rs) decoded by the probe: with only the PMK (group
//! and global keys learned from the unique vector's commands), and with the
//! vectors file itself as `--keys`. Four EMM vectors: unique, group, global
//! and group_rotation (a group EMM delivering the next GK and GLK).

use crate::common;

use std::collections::VecDeque;

use bytes::Bytes;
use carousel::{Packetizer, Pid};
use serde_json::{json, Value};

fn vectors() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wire/tests/vectors/emm-v1.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("wire/tests/vectors/emm-v1.json"))
        .unwrap()
}

#[test]
fn kat_vectors_decode_to_their_reviewable_json() {
    let v = vectors();
    let emms: Vec<&Value> = v["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| ["82", "83", "84"].contains(&x["table_id"].as_str().unwrap()))
        .collect();
    assert_eq!(emms.len(), 4);
    let mut q: VecDeque<Bytes> = emms
        .iter()
        .map(|x| Bytes::from(hex::decode(x["section"].as_str().unwrap()).unwrap()))
        .collect();
    let mut p = Packetizer::new(Pid::DEFAULT_EMM, true);
    let mut pkts = Vec::new();
    let mut pkt = [0u8; 188];
    while p.next_packet(&mut pkt, || q.pop_front()) {
        pkts.push(pkt);
    }
    let d = tempfile::tempdir().unwrap();
    let ts = d.path().join("kat.ts");
    common::write_ts(&ts, &pkts);
    let keys = &emms[0]["keys"];
    let pmk = format!("{}={}", keys["pmk_version"], keys["pmk"].as_str().unwrap());
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wire/tests/vectors/emm-v1.json"
    );
    for args in [
        vec!["--pmk", pmk.as_str()],
        vec!["--keys", file, "--no-learn-keys"],
    ] {
        let mut a = vec!["--ts", ts.to_str().unwrap(), "--json"];
        a.extend(args.iter());
        let r = common::probe(&a);
        assert_eq!(r.code(), 0, "{args:?}: {}", r.stderr());
        for x in &emms {
            let want = &x["emm"];
            let got = r
                .records
                .iter()
                .find(|e| e["type"] == "emm" && e["emm_id"] == want["emm_id"])
                .unwrap_or_else(|| {
                    panic!("{args:?}: {} not opened: {}", want["emm_id"], r.stdout())
                });
            assert_eq!(got["mac"], "ok");
            for f in ["address", "issued_at", "not_after", "key_version"] {
                assert_eq!(got[f], want[f], "{args:?} {f}");
            }
            let mut cmds = want["commands"].clone();
            for c in cmds.as_array_mut().unwrap() {
                if c["type"] == "group_key" || c["type"] == "global_key" {
                    c["key"] = json!("<redacted, 16 bytes>");
                }
            }
            assert_eq!(got["commands"], cmds, "{args:?}");
        }
        assert_eq!(r.summary()["emms_opened"], 4);
    }
}
