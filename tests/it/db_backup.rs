//! Hot backup and restore (scripts/mariadb-backup.sh, mariadb-backup): the
//! backup is taken while the headend serves; a headend started on the
//! backup restored into a fresh instance plays the same carousel, the same
//! live EMMs, as the original did at the backup.

use casd::testing::MariaDbInstance;
use serde_json::json;

use crate::db_common::Headend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_plays_the_same_carousel() {
    let inst = MariaDbInstance::start(&[]);
    let mut original = Headend::start(&inst, None).await;
    for d in 1..=4u64 {
        let device = 880_000 + d;
        original
            .post(
                "/adddevice",
                &format!("bk-add-{d}"),
                json!({ "device_id": device }),
            )
            .await;
        let ent = json!({"device_id": device, "product_id": 9, "start": 1_700_000_000u32, "end": 1_900_000_000u32});
        original
            .post("/addentitlement", &format!("bk-ent-{d}"), ent)
            .await;
    }
    original.processed().await;
    let before = original.live_on_air().await;
    assert!(before.len() >= 8, "{} live EMMs", before.len());

    // While the headend serves: the carousel keeps playing, the API answers.
    let target = inst.dir.with_file_name("backup");
    let backup = {
        let target = target.clone();
        let dir = inst.dir.clone();
        std::thread::spawn(move || MariaDbInstance::backup_dir(&dir, &target))
    };
    let during = original.live_on_air().await;
    backup.join().expect("backup thread");
    assert_eq!(during, before, "the carousel changed while the backup ran");
    original.casd.shutdown().await.unwrap();

    let restored_db = inst.restore(&target);
    let mut restored = Headend::start(&restored_db, Some(&original.cfg)).await;
    let after = restored.live_on_air().await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "live emm ids on air"
    );
    assert_eq!(after, before, "sections on air");
    // And it takes new work on the restored data.
    restored
        .post("/adddevice", "bk-after", json!({ "device_id": 880_999u64 }))
        .await;
    restored.processed().await;
    restored.casd.shutdown().await.unwrap();
}
