//! The EMMG against a throwaway MariaDB with the local Encryptor (simulated
//! root key): commands posted over HTTP become the right sealed EMMs, with
//! supersession, crash safety and concurrent workers.

use crate::sms_common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use casd::emmg;
use casd::encryptor::{BoxFuture, Encryptor, EncryptorError, LocalEncryptor, SealJob, SealResults};
use casd::failpoint::Armed;
use casd::keystore::{KeyKind, KeyMeta, KeyStore};
use casd_wire::crypto::{self, Key128};
use casd_wire::emm::{self, Address, Command, Entitlement};
use mysql_async::prelude::*;
use serde_json::Value;
use sms_common::Headend;

struct Rig {
    h: Headend,
    ks: KeyStore,
    enc: LocalEncryptor,
}

async fn rig() -> Rig {
    let h = Headend::start().await;
    let ks = KeyStore::new(h.db().clone(), Key128::from_bytes([7; 16]), 1);
    ks.init().await.unwrap();
    let enc = LocalEncryptor::new(ks.clone(), h.shared.cfg.cas.max_section_bytes);
    Rig { h, ks, enc }
}

impl Rig {
    async fn process_all(&self) -> usize {
        let mut n = 0;
        loop {
            let k = emmg::process_once(&self.h.shared, &self.enc).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k;
        }
    }

    /// Every EMM, oldest first.
    #[allow(clippy::type_complexity)]
    async fn emms(&self) -> Vec<Emm> {
        let mut c = self.h.db().conn().await.unwrap();
        let rows: Vec<mysql_async::Row> = c
            .query(
                "SELECT id, request_id, addressing, address, key_version, class, purpose, emm_data, \
                 encrypted_emm, state FROM emms ORDER BY id",
            )
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| {
                let (
                    id,
                    request_id,
                    addressing,
                    address,
                    key_version,
                    class,
                    purpose,
                    data,
                    section,
                    state,
                ): (
                    u64,
                    Option<u64>,
                    String,
                    u64,
                    u32,
                    u8,
                    String,
                    String,
                    Vec<u8>,
                    String,
                ) = mysql_async::from_row(r);
                Emm {
                    id,
                    request_id,
                    addressing,
                    address,
                    key_version,
                    class,
                    purpose,
                    data: serde_json::from_str(&data).unwrap(),
                    section,
                    live: state == "live",
                }
            })
            .collect()
    }

    /// Opens a section with the key its address calls for.
    async fn open(&self, e: &Emm) -> emm::OpenedEmm {
        let root = match e.addressing.as_str() {
            "unique" => {
                let pmk = self.ks.key(KeyKind::Pmk, e.key_version).await.unwrap();
                crypto::derive_duk(&pmk, e.address)
            }
            "group" => (*self
                .ks
                .key(KeyKind::Group(e.address as u32), e.key_version)
                .await
                .unwrap())
            .clone(),
            _ => (*self.ks.key(KeyKind::Global, e.key_version).await.unwrap()).clone(),
        };
        emm::open_emm(&e.section, &root).expect("section opens with its key")
    }
}

#[derive(Debug, Clone)]
struct Emm {
    id: u64,
    request_id: Option<u64>,
    addressing: String,
    address: u64,
    key_version: u32,
    class: u8,
    purpose: String,
    data: Value,
    section: Vec<u8>,
    live: bool,
}

fn live_of(emms: &[Emm], device: u64) -> Vec<&Emm> {
    emms.iter()
        .filter(|e| e.live && e.addressing == "unique" && e.address == device)
        .collect()
}

fn ent(p: u32, s: u32, e: u32) -> Entitlement {
    Entitlement {
        product_id: p,
        start: s,
        end: e,
    }
}

#[tokio::test]
async fn every_command_becomes_the_right_sealed_emms() {
    let r = rig().await;
    let h = &r.h;
    let add1 = h.add_device(1).await;
    h.add_device(2).await;
    assert_eq!(r.process_all().await, 2);

    let emms = r.emms().await;
    let mine: Vec<&Emm> = emms.iter().filter(|e| e.request_id == Some(add1)).collect();
    assert_eq!(mine.len(), 2);
    let (enable, set) = (mine[0], mine[1]);
    assert_eq!(
        (
            enable.purpose.as_str(),
            enable.class,
            enable.addressing.as_str(),
            enable.address
        ),
        ("device_enable", 1, "unique", 1)
    );
    assert_eq!((set.purpose.as_str(), set.class), ("entitlement_set", 2));
    assert_eq!(enable.key_version, 1, "the device's PMK version");
    let opened = r.open(enable).await;
    assert_eq!(opened.emm_id.0, enable.id);
    let gk = r.ks.key(KeyKind::Group(1), 1).await.unwrap();
    let glk = r.ks.key(KeyKind::Global, 1).await.unwrap();
    match &opened.commands[..] {
        [Command::DeviceEnable, Command::GroupKey {
            group_id: 1,
            slot: 0,
            key_version: 1,
            key: k1,
            ..
        }, Command::GlobalKey {
            key_version: 1,
            key: k2,
            ..
        }] => {
            assert!(*k1 == *gk && *k2 == *glk, "delivered keys are the store's");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.open(set).await.commands,
        vec![Command::EntitlementSet { entries: vec![] }]
    );
    // Reviewable JSON without key bytes.
    assert_eq!(enable.data["commands"][1]["type"], "group_key");
    assert!(enable.data["commands"][1].get("key").is_none());
    assert!(!enable.data.to_string().contains(&hex::encode(gk.expose())));
    // The request is processed and lists its EMMs.
    let (_, st) = h.get(&format!("/requests/{add1}")).await;
    assert_eq!(st["status"], "processed");
    assert_eq!(st["emm_ids"], serde_json::json!([enable.id, set.id]));

    // Entitlements: ADD + a new SET; the old SET leaves the carousel.
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"e7","device_id":1,"product_id":7,"start":100,"end":200}"#,
    )
    .await;
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"e8","device_id":1,"product_id":8,"start":100,"end":300}"#,
    )
    .await;
    assert_eq!(r.process_all().await, 2);
    let emms = r.emms().await;
    let live = live_of(&emms, 1);
    let purposes: Vec<&str> = live.iter().map(|e| e.purpose.as_str()).collect();
    assert_eq!(
        purposes,
        [
            "device_enable",
            "entitlement_add:7",
            "entitlement_add:8",
            "entitlement_set"
        ]
    );
    let set = live[3];
    // Both items of the batch read the state as it is now: the SET of the
    // second has both products; the first's SET never went live.
    assert_eq!(
        r.open(set).await.commands,
        vec![Command::EntitlementSet {
            entries: vec![ent(7, 100, 200), ent(8, 100, 300)]
        }]
    );
    assert_eq!(
        r.open(live[1]).await.commands,
        vec![Command::EntitlementAdd(ent(7, 100, 200))]
    );
    assert_eq!(live[1].class, 1);
    assert_eq!(
        emms.iter()
            .filter(|e| e.purpose == "entitlement_set" && e.address == 1)
            .count(),
        3,
        "one per item, older ones withdrawn"
    );

    // Remove product 7: REMOVE, the old ADD 7 withdrawn, SET [8].
    h.ok(
        "/removeentitlement",
        r#"{"transaction_id":"r7","device_id":1,"product_id":7}"#,
    )
    .await;
    r.process_all().await;
    let emms = r.emms().await;
    let live = live_of(&emms, 1);
    let purposes: Vec<&str> = live.iter().map(|e| e.purpose.as_str()).collect();
    assert_eq!(
        purposes,
        [
            "device_enable",
            "entitlement_add:8",
            "entitlement_remove:7",
            "entitlement_set"
        ]
    );
    assert_eq!(
        r.open(live[2]).await.commands,
        vec![Command::EntitlementRemove { product_id: 7 }]
    );
    assert_eq!(
        r.open(live[3]).await.commands,
        vec![Command::EntitlementSet {
            entries: vec![ent(8, 100, 300)]
        }]
    );

    // OSMs: unique (change class), group (forced → urgent, members' slots), global.
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"o1","device_id":1,"text":"Hello 1","duration_s":10}"#,
    )
    .await;
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"o2","group_id":1,"text":"Group","duration_s":0,"forced":true,"expires_at":4000000000}"#,
    )
    .await;
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"o3","all":true,"text":"Everyone","duration_s":5}"#,
    )
    .await;
    r.process_all().await;
    let emms = r.emms().await;
    let osms: Vec<&Emm> = emms.iter().filter(|e| e.purpose == "osm").collect();
    assert_eq!(osms.len(), 3);
    assert_eq!((osms[0].addressing.as_str(), osms[0].class), ("unique", 1));
    assert_eq!(
        r.open(osms[0]).await.commands,
        vec![Command::Osm {
            duration_s: 10,
            flags: 0,
            text: "Hello 1".into()
        }]
    );
    assert_eq!((osms[1].addressing.as_str(), osms[1].class), ("group", 0));
    let g = r.open(osms[1]).await;
    assert_eq!(g.address, Address::group_with_slots(1, [0, 1]));
    assert_eq!(g.not_after, 4_000_000_000);
    assert_eq!(
        g.commands,
        vec![Command::Osm {
            duration_s: 0,
            flags: 1,
            text: "Group".into()
        }]
    );
    assert_eq!((osms[2].addressing.as_str(), osms[2].class), ("global", 1));
    assert!(
        matches!(&r.open(osms[2]).await.commands[..], [Command::Osm { text, .. }] if text == "Everyone")
    );

    // removedevice: DEVICE_DISABLE (urgent); every other unique EMM of the
    // device leaves; group and global OSMs stay.
    h.ok("/removedevice", r#"{"transaction_id":"rm1","device_id":1}"#)
        .await;
    r.process_all().await;
    let emms = r.emms().await;
    let live = live_of(&emms, 1);
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].purpose.as_str(), live[0].class),
        ("device_disable", 0)
    );
    assert_eq!(r.open(live[0]).await.commands, vec![Command::DeviceDisable]);
    assert!(emms
        .iter()
        .filter(|e| e.purpose == "osm" && e.addressing != "unique")
        .all(|e| e.live));

    // Re-adding it withdraws the DISABLE and enables it again.
    h.ok("/adddevice", r#"{"transaction_id":"again","device_id":1}"#)
        .await;
    r.process_all().await;
    let emms = r.emms().await;
    let purposes: Vec<String> = live_of(&emms, 1)
        .iter()
        .map(|e| e.purpose.clone())
        .collect();
    assert_eq!(purposes, ["device_enable", "entitlement_set"]);

    // The change feed: one add per EMM that went live, one remove per withdrawal.
    let mut c = h.db().conn().await.unwrap();
    let events: Vec<(u64, String)> = c
        .query("SELECT emm_id, op FROM carousel_events ORDER BY id")
        .await
        .unwrap();
    let adds: HashSet<u64> = events
        .iter()
        .filter(|e| e.1 == "add")
        .map(|e| e.0)
        .collect();
    let removes: HashSet<u64> = events
        .iter()
        .filter(|e| e.1 == "remove")
        .map(|e| e.0)
        .collect();
    for e in &emms {
        let never_live = !adds.contains(&e.id);
        if e.live {
            assert!(adds.contains(&e.id) && !removes.contains(&e.id), "{e:?}");
        } else {
            assert!(never_live || removes.contains(&e.id), "{e:?}");
        }
    }
    assert_eq!(adds.len() + removes.len(), events.len(), "no event twice");
    // Every request is processed.
    let unprocessed: Option<u64> = c
        .query_first(
            "SELECT COUNT(*) FROM sms_requests WHERE status_code = 200 AND processed_at IS NULL",
        )
        .await
        .unwrap();
    assert_eq!(unprocessed, Some(0));
}

#[tokio::test]
async fn a_batch_abandoned_before_commit_is_redone_once() {
    let r = rig().await;
    let h = &r.h;
    h.add_device(1).await;
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"e","device_id":1,"product_id":3,"start":1,"end":2}"#,
    )
    .await;
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"o","all":true,"text":"x","duration_s":1}"#,
    )
    .await;
    // A crash right before COMMIT, in this test's database only.
    let armed = Armed::new(emmg::FAIL_BEFORE_COMMIT, h.db().database_name().unwrap());
    let e = emmg::process_once(&h.shared, &r.enc).await.unwrap_err();
    drop(armed);
    assert!(e.to_string().contains(emmg::FAIL_BEFORE_COMMIT), "{e}");
    assert_eq!(h.count("emms").await, 0);
    assert_eq!(h.count("carousel_events").await, 0);
    let mut c = h.db().conn().await.unwrap();
    let pending: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM work_items WHERE state = 'pending'")
        .await
        .unwrap();
    assert_eq!(pending, Some(3));
    let processed: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM sms_requests WHERE processed_at IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(processed, Some(0));

    // A worker killed while the Encryptor is sealing (the future dropped
    // mid-transaction, its connection gone back without a COMMIT).
    let gate = Arc::new(Held {
        inner: r.enc.clone(),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(), // never released
    });
    let shared = h.shared.clone();
    let g2 = gate.clone();
    let task = tokio::spawn(async move { emmg::process_once(&shared, g2.as_ref()).await });
    gate.entered.notified().await;
    task.abort();
    let _ = task.await;
    assert_eq!(h.count("emms").await, 0);

    // Redone: every item once, nothing doubled.
    assert_eq!(r.process_all().await, 3);
    assert_eq!(r.process_all().await, 0);
    let emms = r.emms().await;
    // adddevice 2 + addentitlement 2 (the first SET withdrawn) + OSM 1.
    assert_eq!(emms.len(), 5);
    let pending: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM work_items WHERE state <> 'done'")
        .await
        .unwrap();
    assert_eq!(pending, Some(0));
    let ids: HashSet<u64> = emms.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 5);
}

/// An Encryptor that signals when a seal starts and seals only once
/// released (never, if nobody releases it: a worker stuck in sealing).
struct Held {
    inner: LocalEncryptor,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Encryptor for Held {
    fn seal_batch(&self, jobs: Vec<SealJob>) -> BoxFuture<'_, Result<SealResults, EncryptorError>> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            self.inner.seal_batch(jobs).await
        })
    }
    fn current_key(&self, kind: KeyKind) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>> {
        self.inner.current_key(kind)
    }
}

/// `processed_at` (and the item's `done_at`) say when the EMMs were
/// stored, not when the batch began: a batch held up while sealing stamps
/// a time after the hold.
#[tokio::test]
async fn processed_at_is_when_the_emms_are_stored() {
    let r = rig().await;
    let h = &r.h;
    h.add_device(1).await;
    let held = Arc::new(Held {
        inner: r.enc.clone(),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let shared = h.shared.clone();
    let h2 = held.clone();
    let task = tokio::spawn(async move { emmg::process_once(&shared, h2.as_ref()).await });
    held.entered.notified().await;
    // The batch began before this (it has taken the item and planned).
    let released_at = time::OffsetDateTime::now_utc();
    held.release.notify_one();
    assert_eq!(task.await.unwrap().unwrap(), 1);
    let at = casd::sms::store::db_time(released_at);
    let mut c = h.db().conn().await.unwrap();
    let processed: Option<u64> = c
        .exec_first(
            "SELECT COUNT(*) FROM sms_requests WHERE status_code = 200 AND processed_at >= ?",
            (at.clone(),),
        )
        .await
        .unwrap();
    assert_eq!(processed, Some(1));
    let done: Option<u64> = c
        .exec_first(
            "SELECT COUNT(*) FROM work_items WHERE state = 'done' AND done_at >= ?",
            (at,),
        )
        .await
        .unwrap();
    assert_eq!(done, Some(1));
}

#[tokio::test]
async fn concurrent_workers_never_double_an_item_and_keep_device_order() {
    let r = Arc::new(rig().await);
    let h = &r.h;
    for d in 1..=30u64 {
        h.add_device(d).await;
        h.ok(
            "/addentitlement",
            &format!(
                r#"{{"transaction_id":"e{d}","device_id":{d},"product_id":1,"start":1,"end":2}}"#
            ),
        )
        .await;
        h.ok(
            "/removeentitlement",
            &format!(r#"{{"transaction_id":"r{d}","device_id":{d},"product_id":1}}"#),
        )
        .await;
    }
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let r = r.clone();
        set.spawn(async move {
            let mut idle = 0;
            let mut n = 0;
            while idle < 20 {
                let k = emmg::process_batch(&r.h.shared, &r.enc, 4).await.unwrap();
                n += k;
                if k == 0 {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                } else {
                    idle = 0;
                }
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = set.join_next().await {
        total += n.unwrap();
    }
    assert_eq!(total, 90, "each item finished exactly once");
    let emms = r.emms().await;
    // Two EMMs per item, none doubled.
    let mut per_request: BTreeMap<u64, usize> = BTreeMap::new();
    for e in &emms {
        *per_request.entry(e.request_id.unwrap()).or_default() += 1;
    }
    assert_eq!(per_request.len(), 90);
    assert!(per_request.values().all(|n| *n == 2), "{per_request:?}");
    // Per device, EMMs follow the order of the requests.
    let mut c = h.db().conn().await.unwrap();
    let order: Vec<(u64, u64, u64)> = c
        .query(
            "SELECT w.device_id, w.id, MIN(e.id) FROM work_items w JOIN emms e ON e.request_id = w.request_id \
             GROUP BY w.device_id, w.id ORDER BY w.device_id, w.id",
        )
        .await
        .unwrap();
    for pair in order.windows(2) {
        if pair[0].0 == pair[1].0 {
            assert!(
                pair[0].2 < pair[1].2,
                "device {} out of order: {pair:?}",
                pair[0].0
            );
        }
    }
    // The final state on air per device: enable, REMOVE 1, SET [].
    for d in 1..=30 {
        let purposes: Vec<&str> = live_of(&emms, d)
            .iter()
            .map(|e| e.purpose.as_str())
            .collect();
        assert_eq!(
            purposes,
            ["device_enable", "entitlement_remove:1", "entitlement_set"],
            "device {d}"
        );
    }
}

#[tokio::test]
async fn the_role_wakes_on_commit_and_stops_on_shutdown() {
    let r = rig().await;
    let mut shared = r.h.shared.clone();
    shared.encryptor = Some(Arc::new(r.enc.clone()));
    shared.shutdown = tokio_util::sync::CancellationToken::new();
    let role = tokio::spawn(emmg::run(shared.clone()));
    // The SMS routes ring the same `work_ready` (shared Arc).
    let id = r.h.add_device(9).await;
    let mut processed = false;
    for _ in 0..200 {
        let (_, st) = r.h.get(&format!("/requests/{id}")).await;
        if st["status"] == "processed" {
            processed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(processed);
    shared.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), role)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unreachable_database_is_reported_as_unavailable() {
    let url = "mysql://casd:pw@127.0.0.1:1/casd";
    let db = casd::db::Db::new(url, 2, Duration::from_secs(1)).unwrap();
    let h = Headend::serve(url, db, |_| {}).await;
    let t = casd::testing::TestDb::new().await;
    let ks = KeyStore::new(t.db.clone(), Key128::from_bytes([7; 16]), 1);
    let enc = LocalEncryptor::new(ks, 256);
    let e = emmg::process_once(&h.shared, &enc).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
}
