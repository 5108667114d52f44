//! `casd keys export` (docs/format.md §9): the real binary writes a
//! personalization file; an independent implementation (Python's
//! `cryptography`, tests/python/open_personalization.py, installed by
//! scripts/test.sh) opens it and gives the DUKs casd-wire derives; the
//! export is recorded in `duk_exports`.

use crate::common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use casd::keystore::{KeyKind, KeyStore};
use casd::testing::TestDb;
use casd_wire::crypto::{derive_duk, Key128};
use mysql_async::prelude::*;

/// The venv's Python with `cryptography` (scripts/test.sh), or
/// `CASD_TEST_PYTHON`. Missing: the test fails, saying so.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CASD_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test.sh (it installs cryptography there) or set CASD_TEST_PYTHON",
        venv.display()
    );
    venv
}

async fn pmk(t: &TestDb, dir: &Path) -> Key128 {
    let root = std::fs::read_to_string(dir.join("root.key")).unwrap();
    let root = Key128::from_slice(&hex::decode(root.trim()).unwrap()).unwrap();
    let ks = KeyStore::open(t.db.clone(), root).await.unwrap();
    let v = ks.current(KeyKind::Pmk).await.unwrap().version;
    (*ks.key(KeyKind::Pmk, v).await.unwrap()).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_opens_in_python_to_casd_wires_duks_and_is_recorded() {
    let t = TestDb::new().await;
    let dir = common::temp_dir("export");
    let cfg = common::cli_config(&dir, &t.url, "");
    hw::FileKeySource::create_new(dir.join("vendor.key")).unwrap();
    let out = dir.join("perso.jsonl");
    let run = common::casd_cli(
        &cfg,
        &[
            "keys",
            "export",
            "--devices",
            "5000,1-100",
            "--transport-key",
            dir.join("vendor.key").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let pmk = pmk(&t, &dir).await;
    // Never in clear: no DUK's hex is in the file.
    assert!(!text.contains(&hex::encode(derive_duk(&pmk, 1).expose())));
    let py = std::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/open_personalization.py"))
        .arg(dir.join("vendor.key"))
        .arg(hex::encode(pmk.expose()))
        .arg(&out)
        .output()
        .expect("run python");
    assert!(
        py.status.success(),
        "python: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let opened: BTreeMap<u64, String> = String::from_utf8(py.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (d, k) = l.split_once(' ').unwrap();
            (d.parse().unwrap(), k.to_owned())
        })
        .collect();
    let expected: BTreeMap<u64, String> = (1..=100)
        .chain([5000])
        .map(|d| (d, hex::encode(derive_duk(&pmk, d).expose())))
        .collect();
    assert_eq!(opened, expected);

    let mut c = t.db.conn().await.unwrap();
    let rec: Vec<(String, u64, String)> = c
        .query("SELECT via, device_count, devices FROM duk_exports")
        .await
        .unwrap();
    assert_eq!(rec, [("cli".to_owned(), 101, "1-100,5000".to_owned())]);
    // A second export to the same path is refused before anything is recorded.
    let again = common::casd_cli(
        &cfg,
        &[
            "keys",
            "export",
            "--devices",
            "1",
            "--transport-key",
            dir.join("vendor.key").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!again.status.success());
    let n: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM duk_exports")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    std::fs::remove_dir_all(&dir).ok();
}
