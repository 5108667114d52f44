//! Encryption at rest of the MariaDB scripts/mariadb.sh brings up (its
//! options, on a private server): every casd table is encrypted, and a
//! device_id and a transaction_id posted through the API are nowhere in
//! clear in the data files, the redo log or the binary logs.

use std::path::{Path, PathBuf};

use casd::testing::MariaDbInstance;
use mysql_async::prelude::*;
use serde_json::json;

use crate::db_common::Headend;

/// Distinctive values: nothing else in a data directory holds them.
const DEVICE_ID: u64 = 7_351_946_028_113_729;
const TRANSACTION_ID: &str = "dbenc-Qx7ZkV3tW9m2-rest";

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The files among `files` whose bytes contain one of `needles`, with it.
fn holding(files: &[PathBuf], needles: &[(&str, Vec<u8>)]) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_default();
        for (what, n) in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                found.push(format!("{} holds the {what}", f.display()));
            }
        }
    }
    found
}

/// The posted values as they would sit in a page or a row event in clear:
/// text (the request body, the transaction id), and the BIGINT column's
/// big-endian (InnoDB) and little-endian (binary log row image) bytes.
fn needles() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("transaction_id", TRANSACTION_ID.as_bytes().to_vec()),
        ("device_id (text)", DEVICE_ID.to_string().into_bytes()),
        ("device_id (BE)", DEVICE_ID.to_be_bytes().to_vec()),
        ("device_id (LE)", DEVICE_ID.to_le_bytes().to_vec()),
    ]
}

#[test]
fn the_search_finds_each_value_in_clear() {
    // The negative result below means something only if this finds them.
    let d = tempfile::tempdir().unwrap();
    for (i, (_, n)) in needles().iter().enumerate() {
        let mut bytes = vec![0xA5u8; 1000 + i];
        bytes.extend_from_slice(n);
        bytes.extend_from_slice(&[0x5A; 77]);
        std::fs::write(d.path().join(format!("f{i}")), bytes).unwrap();
    }
    let found = holding(&files(d.path()), &needles());
    assert_eq!(found.len(), needles().len(), "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_casd_table_is_encrypted_and_no_posted_value_is_in_clear_on_disk() {
    let inst = MariaDbInstance::start(&[]);
    let h = Headend::start(&inst, None).await;
    h.post(
        "/adddevice",
        TRANSACTION_ID,
        json!({ "device_id": DEVICE_ID }),
    )
    .await;
    h.processed().await;

    let mut c = h.db.conn().await.unwrap();
    // The value is stored (so its absence from the files is encryption).
    let found: Option<u64> = c
        .exec_first(
            "SELECT device_id FROM devices WHERE device_id = ?",
            (DEVICE_ID,),
        )
        .await
        .unwrap();
    assert_eq!(found, Some(DEVICE_ID));

    // information_schema: every table of the casd database encrypted.
    let tables: Vec<String> = c
        .query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'casd'")
        .await
        .unwrap();
    assert!(tables.len() >= 10, "{tables:?}");
    let encrypted: Vec<String> = c
        .query(
            "SELECT SUBSTRING(name, 6) FROM information_schema.INNODB_TABLESPACES_ENCRYPTION \
             WHERE name LIKE 'casd/%' AND encryption_scheme = 1 AND current_key_version >= 1",
        )
        .await
        .unwrap();
    let missing: Vec<&String> = tables.iter().filter(|t| !encrypted.contains(t)).collect();
    assert!(missing.is_empty(), "not encrypted: {missing:?}");
    // FORCE: a table cannot even be created in clear.
    let plain = c
        .query_drop("CREATE TABLE casd.plain (x INT) ENGINE=InnoDB ENCRYPTED=NO")
        .await;
    assert!(plain.is_err(), "an unencrypted table was created");

    // Dirty pages to the .ibd files, so the search reads the rows' pages.
    c.query_drop("FLUSH TABLES casd.devices, casd.sms_requests, casd.idempotency FOR EXPORT")
        .await
        .unwrap();
    c.query_drop("UNLOCK TABLES").await.unwrap();
    let all = files(&inst.dir.join("data"));
    let has = |f: &str| all.iter().any(|p| p.to_string_lossy().contains(f));
    for f in [
        "ib_logfile0",
        "binlog.000001",
        "casd/devices.ibd",
        "casd/sms_requests.ibd",
    ] {
        assert!(has(f), "no {f} in the data directory: {all:?}");
    }
    let found = holding(&all, &needles());
    assert!(found.is_empty(), "in clear on disk: {found:?}");
    h.casd.shutdown().await.unwrap();
}
