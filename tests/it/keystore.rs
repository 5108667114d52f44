//! The key store against a real MariaDB: sealing at rest, versions, root rewrap.

use casd::keystore::{self, KeyKind, KeyStore, KeyStoreError};
use casd::testing::TestDb;
use casd_wire::crypto::Key128;
use mysql_async::prelude::*;

fn root(b: u8) -> Key128 {
    Key128::from_bytes([b; 16])
}

#[tokio::test]
async fn init_creates_pmk_and_glk_sealed_not_in_clear() {
    let t = TestDb::new().await;
    let ks = KeyStore::new(t.db.clone(), root(7), 1);
    let created = ks.init().await.unwrap();
    assert_eq!(created, vec![KeyKind::Pmk, KeyKind::Global]);
    // Second init creates nothing.
    assert!(ks.init().await.unwrap().is_empty());
    let pmk = ks.key(KeyKind::Pmk, 1).await.unwrap();
    let mut c = t.db.conn().await.unwrap();
    let rows: Vec<(u64, Vec<u8>)> = c.query("SELECT id, sealed FROM `keys`").await.unwrap();
    assert_eq!(rows.len(), 2);
    for (_, blob) in &rows {
        assert_eq!(blob.len(), casd_wire::crypto::AT_REST_BLOB_LEN);
        assert!(
            !blob.windows(16).any(|w| w == pmk.expose()),
            "key bytes stored in clear"
        );
    }
    // A second store with the same root reads the same key from the table.
    let ks2 = KeyStore::new(t.db.clone(), root(7), 1);
    assert_eq!(*ks2.key(KeyKind::Pmk, 1).await.unwrap(), *pmk);
}

#[tokio::test]
async fn wrong_root_is_refused() {
    let t = TestDb::new().await;
    KeyStore::new(t.db.clone(), root(1), 1)
        .init()
        .await
        .unwrap();
    let wrong = KeyStore::new(t.db.clone(), root(2), 1);
    assert!(matches!(
        wrong.verify_root().await,
        Err(KeyStoreError::WrongRoot { .. })
    ));
    assert!(matches!(
        wrong.init().await,
        Err(KeyStoreError::WrongRoot { .. })
    ));
    assert!(matches!(
        wrong.key(KeyKind::Global, 1).await,
        Err(KeyStoreError::WrongRoot { .. })
    ));
}

#[tokio::test]
async fn versions_and_activation() {
    let t = TestDb::new().await;
    let ks = KeyStore::new(t.db.clone(), root(3), 1);
    ks.init().await.unwrap();
    // A group key is created on first use.
    let g = ks.current(KeyKind::Group(5)).await.unwrap();
    assert_eq!(
        (g.kind, g.version, g.state.as_str()),
        (KeyKind::Group(5), 1, "active")
    );
    // A version activating in the future is pending and not used yet.
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600) as u32;
    let v2 = ks
        .create_version_at(KeyKind::Group(5), future)
        .await
        .unwrap();
    assert_eq!((v2.version, v2.state.as_str()), (2, "pending"));
    assert_eq!(ks.current(KeyKind::Group(5)).await.unwrap().version, 1);
    // Both versions are there, and differ.
    let k1 = ks.key(KeyKind::Group(5), 1).await.unwrap();
    let k2 = ks.key(KeyKind::Group(5), 2).await.unwrap();
    assert_ne!(*k1, *k2);
    // Metadata readers see versions without the material.
    let mut c = t.db.conn().await.unwrap();
    let metas = keystore::list_meta(&mut c, KeyKind::Group(5))
        .await
        .unwrap();
    assert_eq!(
        metas.iter().map(|m| m.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(matches!(
        ks.key(KeyKind::Group(5), 9).await,
        Err(KeyStoreError::UnknownVersion { version: 9, .. })
    ));
    // PMK has no lazy creation.
    let empty = TestDb::new().await;
    let ks_empty = KeyStore::new(empty.db.clone(), root(3), 1);
    assert!(matches!(
        ks_empty.current(KeyKind::Pmk).await,
        Err(KeyStoreError::NoVersion { .. })
    ));
}

#[tokio::test]
async fn concurrent_creators_agree_on_one_version() {
    let t = TestDb::new().await;
    let a = KeyStore::new(t.db.clone(), root(4), 1);
    let b = KeyStore::new(t.db.clone(), root(4), 1);
    let (ra, rb) = tokio::join!(a.current(KeyKind::Group(9)), b.current(KeyKind::Group(9)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.id, rb.id);
    let mut c = t.db.conn().await.unwrap();
    let n: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM `keys` WHERE kind='group' AND group_id=9")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    assert_eq!(
        *a.key(KeyKind::Group(9), 1).await.unwrap(),
        *b.key(KeyKind::Group(9), 1).await.unwrap()
    );
}

#[tokio::test]
async fn root_rewrap_reseals_every_row() {
    let t = TestDb::new().await;
    let old = KeyStore::new(t.db.clone(), root(5), 1);
    old.init().await.unwrap();
    old.current(KeyKind::Group(1)).await.unwrap();
    let before = old.key(KeyKind::Group(1), 1).await.unwrap();
    let n = old.rewrap(&root(6), 2).await.unwrap();
    assert_eq!(n, 3);
    let new = KeyStore::new(t.db.clone(), root(6), 2);
    new.verify_root().await.unwrap();
    assert_eq!(*new.key(KeyKind::Group(1), 1).await.unwrap(), *before);
    let stale = KeyStore::new(t.db.clone(), root(5), 1);
    assert!(matches!(
        stale.key(KeyKind::Pmk, 1).await,
        Err(KeyStoreError::WrongRoot { .. })
    ));
    let mut c = t.db.conn().await.unwrap();
    let fps: Vec<Vec<u8>> = c
        .query("SELECT DISTINCT root_key_id FROM `keys`")
        .await
        .unwrap();
    assert_eq!(fps, vec![keystore::root_fingerprint(&root(6)).to_vec()]);
}
