//! Root key rotation as the Scheduler's job runs it: every key row re-sealed
//! under `keys.next_root_key_file`, the running Encryptor switched to it,
//! the keys themselves unchanged (devices notice nothing), and a second run
//! a no-op.

use std::sync::Arc;

use casd::encryptor::{Encryptor, LocalEncryptor, SealJob};
use casd::keystore::{KeyKind, KeyStore, KeyStoreError};
use casd::scheduler::Scheduler;
use casd::testing::TestDb;
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::emm::{self, Address, CommandSpec, DeviceId};
use hw::KeySource;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_job_reseals_every_row_and_keeps_sealing() {
    let t = TestDb::new().await;
    let mut cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    let dir = cfg.keys.root_key_file.parent().unwrap().to_owned();
    let old_src = hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    let new_path = dir.join("next-root.key");
    let new_src = hw::FileKeySource::create_new(&new_path).unwrap();
    cfg.keys.next_root_key_file = Some(new_path.clone());
    let old_root = Key128::from(old_src.root_key().unwrap());
    let new_root = Key128::from(new_src.root_key().unwrap());

    let ks = KeyStore::open(t.db.clone(), old_root.clone())
        .await
        .unwrap();
    ks.init().await.unwrap();
    ks.current(KeyKind::Group(1)).await.unwrap();
    let pmk_before = ks.key(KeyKind::Pmk, 1).await.unwrap();
    let enc = Arc::new(LocalEncryptor::new(ks, 256).with_next_root_file(Some(new_path)));
    let shared = casd::testing::shared(cfg, t.db.clone(), Some(enc.clone()));
    let sched = Scheduler::new(shared);
    let run = sched
        .run_now("root-rotation", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(run.outcome.as_deref(), Some("ok"), "{run:?}");
    let counts = run.counts.clone().unwrap_or_default();
    assert_eq!(counts["rows_resealed"], 3, "{run:?}");
    assert_eq!(counts["root_generation"], 2, "{run:?}");

    // The table opens under the new root only, with the same keys in it.
    assert!(matches!(
        KeyStore::open(t.db.clone(), old_root).await,
        Err(KeyStoreError::WrongRoot { .. })
    ));
    let reopened = KeyStore::open(t.db.clone(), new_root).await.unwrap();
    assert_eq!(reopened.root_version(), 2);
    assert_eq!(*reopened.key(KeyKind::Pmk, 1).await.unwrap(), *pmk_before);

    // The running Encryptor seals with the re-sealed keys: a device's DUK still opens.
    let job = SealJob {
        emm_id: 1,
        issued_at: 1_700_000_000,
        not_after: 1_800_000_000,
        address: Address::Unique {
            device_id: DeviceId::new(9).unwrap(),
        },
        key_version: None,
        commands: vec![CommandSpec::DeviceEnable {}],
    };
    let sealed = enc.seal_batch(vec![job]).await.unwrap().remove(0).unwrap();
    emm::open_emm(&sealed.section, &derive_duk(&pmk_before, 9)).unwrap();

    // A second run finds the store already under the new root.
    let again = sched
        .run_now("root-rotation", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(again.outcome.as_deref(), Some("ok"));
    let counts = again.counts.clone().unwrap_or_default();
    assert!(counts.get("rows_resealed").is_none(), "{again:?}");
    assert_eq!(counts["root_generation"], 2, "{again:?}");
}
