//! `casd-probe audit` against a TestDb: from a file (no timing) and live
//! against the real Cycler.

use crate::probe_common;

use std::time::Duration;

use bytes::Bytes;
use carousel::{Packetizer, Pid};
use casd_wire::emm::{Address, CommandSpec};
use mysql_async::prelude::*;
use probe_common::headend::*;
use probe_common::probe;

fn ts_of(sections: &[Vec<u8>], cycles: usize) -> Vec<[u8; 188]> {
    let mut p = Packetizer::new(Pid::DEFAULT_EMM, true);
    let mut out = Vec::new();
    let mut pkt = [0u8; 188];
    for _ in 0..cycles {
        let mut q: std::collections::VecDeque<Bytes> =
            sections.iter().map(|s| Bytes::from(s.clone())).collect();
        while p.next_packet(&mut pkt, || q.pop_front()) {
            out.push(pkt);
        }
    }
    out
}

fn osm(text: &str) -> Vec<CommandSpec> {
    vec![CommandSpec::Osm {
        duration_s: 1,
        flags: 0,
        text: text.into(),
    }]
}

#[tokio::test]
async fn file_audit_finds_missing_and_unknown_emms() {
    let h = Headend::new().await;
    let a = h.store(Address::Global, osm("a"), true).await;
    let b = h.store(Address::Global, osm("b"), true).await;
    let d = tempfile::tempdir().unwrap();
    let url = h.t.url.clone();

    // Both live rows on air: OK.
    let f = d.path().join("ok.ts");
    probe_common::write_ts(&f, &ts_of(&[a.section.clone(), b.section.clone()], 3));
    let r = probe(&[
        "audit",
        "--db-url",
        &url,
        "--ts",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    let rep = &r.of_type("audit")[0];
    assert_eq!(rep["ok"], true);
    assert_eq!(rep["expected"], 2);
    assert_eq!(rep["in_period"], 2);

    // B missing, and a section no row knows: both named, exit 1.
    let stranger = probe_common::fixture().global.to_vec();
    let f = d.path().join("bad.ts");
    probe_common::write_ts(&f, &ts_of(&[a.section.clone(), stranger], 3));
    let r = probe(&["audit", "--db-url", &url, "--ts", f.to_str().unwrap()]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(out.contains("DIFFERENCES"), "{out}");
    assert!(
        out.contains(&format!("missing: emm {} (global)", b.id)),
        "{out}"
    );
    assert!(
        out.contains("unknown_on_air: an EMM section on air matches no row"),
        "{out}"
    );
    assert!(!out.contains(&format!("emm {} ", a.id)), "{out}");

    // A withdrawn row still on air.
    let mut c = h.t.db.conn().await.unwrap();
    c.exec_drop("UPDATE emms SET state = 'withdrawn' WHERE id = ?", (b.id,))
        .await
        .unwrap();
    let f = d.path().join("withdrawn.ts");
    probe_common::write_ts(&f, &ts_of(&[a.section.clone(), b.section.clone()], 3));
    let r = probe(&[
        "audit",
        "--db-url",
        &url,
        "--ts",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code(), 1);
    let rep = &r.of_type("audit")[0];
    assert_eq!(rep["problems"][0]["kind"], "withdrawn_on_air", "{rep}");
    assert_eq!(rep["problems"][0]["row"]["emm_id"], b.id);
    assert_eq!(rep["problems"].as_array().unwrap().len(), 1, "{rep}");

    // A database that is not there: one line, exit 2, no password.
    let r = probe(&[
        "audit",
        "--db-url",
        "mysql://u:s3cret@127.0.0.1:1/x",
        "--ts",
        f.to_str().unwrap(),
    ]);
    assert_eq!(r.code(), 2);
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
    assert!(!r.stderr().contains("s3cret"), "{}", r.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_audit_against_the_cycler() {
    let h = Headend::new().await;
    let stored = h.store_three().await;
    let port = free_port();
    let dest = format!("127.0.0.1:{port}");
    let casd = h.start_cycler(dest.parse().unwrap(), |_| {}).await;
    let url = h.t.url.clone();
    let run = |extra: &'static [&'static str]| {
        let url = url.clone();
        let dest = dest.clone();
        tokio::task::spawn_blocking(move || {
            let mut a = vec![
                "audit", "--db-url", &url, "--udp", &dest, "--count", "2000", "--json",
            ];
            a.extend_from_slice(extra);
            probe(&a)
        })
    };
    let limit = Duration::from_secs(90);
    let r = tokio::time::timeout(limit, run(&[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    let rep = &r.of_type("audit")[0];
    assert_eq!(rep["expected"], 3, "{rep}");
    assert_eq!(rep["in_period"], 3, "{rep}");
    assert!(rep["window"]["duration_s"].as_f64().unwrap() > 0.5, "{rep}");

    // A too-tight max period: the first sighting comes later than that.
    let r = tokio::time::timeout(limit, run(&["--max-period", "0.000001"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.code(), 1);
    assert_eq!(r.of_type("audit")[0]["problems"][0]["kind"], "late");

    // Live in the table but never announced to the carousel, and withdrawn
    // in the table without telling the carousel (so still on air).
    let hidden = h
        .store(Address::Global, osm("never announced"), false)
        .await;
    let mut c = h.t.db.conn().await.unwrap();
    c.exec_drop(
        "UPDATE emms SET state = 'withdrawn' WHERE id = ?",
        (stored[2].id,),
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(limit, run(&[]))
        .await
        .unwrap()
        .unwrap();
    casd.shutdown().await.unwrap();
    assert_eq!(r.code(), 1, "{}", r.stdout());
    let rep = &r.of_type("audit")[0];
    let problems: Vec<(String, u64)> = rep["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_owned(),
                p["row"]["emm_id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        problems,
        vec![
            ("missing".to_owned(), hidden.id),
            ("withdrawn_on_air".to_owned(), stored[2].id)
        ],
        "{rep}"
    );
}
