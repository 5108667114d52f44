//! Measurement, not run by default: preparing a group-addressed key
//! rotation for N devices (create the versions, enqueue one item per group,
//! the EMMG seals and stores one group EMM per group), the air time of its
//! key EMMs at 1 Mbit/s (computed from the stored sections), and, in the
//! same run, the per-device delivery it replaces (one unique key EMM per
//! device, `deliverkeys`) on a sample of devices, extrapolated to N.
//!
//! ```text
//! CASD_SCALE_DEVICES=1000000 cargo test --release -p casd --test it scheduler_scale:: -- --ignored --nocapture
//! ```
//! (`CASD_SCALE_BASELINE_DEVICES`, default 20,000: the baseline's sample.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use casd::app::Shared;
use casd::encryptor::{Encryptor, LocalEncryptor};
use casd::keystore::KeyStore;
use casd::queue::{self, At, NewItem, Work};
use casd::scheduler::rotation::{airtime_s, RotationJob};
use casd::scheduler::{JobEntry, Schedule, Scheduler};
use casd::testing::TestDb;
use casd_wire::crypto::Key128;
use casd_wire::emm::DeviceId;
use mysql_async::prelude::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// N enabled devices in groups of 256, each group with its first GK
/// (what adddevice would have made).
async fn devices(t: &TestDb, enc: &dyn Encryptor, n: u64) {
    let mut c = t.db.conn().await.unwrap();
    for (table, cols, vals) in [
        (
            "devices",
            "device_id, state, group_id, slot, pmk_version, created_at, updated_at",
            "seq, 'enabled', (seq - 1) DIV 256 + 1, (seq - 1) MOD 256, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)",
        ),
        (
            "group_slots",
            "group_id, slot, device_id",
            "(seq - 1) DIV 256 + 1, (seq - 1) MOD 256, seq",
        ),
    ] {
        let mut from = 1;
        while from <= n {
            let to = (from + 49_999).min(n);
            c.query_drop(format!(
                "INSERT INTO {table} ({cols}) SELECT {vals} FROM seq_{from}_to_{to}"
            ))
            .await
            .unwrap();
            from = to + 1;
        }
    }
    for g in 1..=n.div_ceil(256) {
        enc.current_key(casd::keystore::KeyKind::Group(g as u32))
            .await
            .unwrap();
    }
}

/// Runs EMMG workers until no item is pending; returns the time taken.
async fn drain(shared: &Shared, enc: &Arc<dyn Encryptor>) -> Duration {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..shared.cfg.emmg.workers {
        let (s, e) = (shared.clone(), enc.clone());
        set.spawn(async move {
            loop {
                let k = casd::emmg::process_once(&s, e.as_ref()).await.unwrap();
                if k == 0 {
                    let mut c = s.db.conn().await.unwrap();
                    let left: Option<u64> = c
                        .query_first("SELECT COUNT(*) FROM work_items WHERE state = 'pending'")
                        .await
                        .unwrap();
                    if left == Some(0) {
                        return;
                    }
                    // Only when another worker holds the last items.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    t.elapsed()
}

/// (count, max section bytes) of the live key EMMs of `addressing`.
async fn key_emms(shared: &Shared, addressing: &str) -> (u64, u64) {
    let mut c = shared.db.conn().await.unwrap();
    c.exec_first(
        "SELECT COUNT(*), COALESCE(MAX(LENGTH(encrypted_emm)), 0) FROM emms \
         WHERE purpose = 'keys' AND state = 'live' AND addressing = ?",
        (addressing,),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --release --ignored --nocapture"]
async fn rotation_for_many_devices() {
    let n = env_u64("CASD_SCALE_DEVICES", 100_000);
    let sample = env_u64("CASD_SCALE_BASELINE_DEVICES", 20_000).min(n);
    let t = TestDb::new().await;
    let mut cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    // Spread of the enqueue off: this measures how fast it can be prepared.
    cfg.cycler.outputs[0].bitrate = 1_000_000_000;
    let ks = KeyStore::new(t.db.clone(), Key128::from_bytes([3; 16]), 1);
    ks.init().await.unwrap();
    let enc: Arc<dyn Encryptor> = Arc::new(LocalEncryptor::new(ks, cfg.cas.max_section_bytes));
    let shared = casd::testing::shared(cfg, t.db.clone(), Some(enc.clone()));
    let t0 = Instant::now();
    devices(&t, enc.as_ref(), n).await;
    let groups = n.div_ceil(256);
    eprintln!(
        "setup: {n} devices in {groups} groups in {:?}",
        t0.elapsed()
    );

    let sch = Scheduler::with_jobs(
        shared.clone(),
        vec![JobEntry {
            job: Arc::new(RotationJob),
            schedule: Schedule::Manual,
        }],
    );
    let t1 = Instant::now();
    let run = sch
        .run_now(
            "rotation",
            serde_json::json!({"force": true, "activates_in_s": 86_400}),
        )
        .await
        .unwrap();
    let enqueue = t1.elapsed();
    assert_eq!(run.outcome.as_deref(), Some("ok"), "{run:?}");
    let counts = run.counts.unwrap();
    assert_eq!(counts["delivergroupkeys_enqueued"], groups);
    assert_eq!(counts["gk_versions_created"], groups);
    eprintln!("rotation job (create {groups} GK + GLK, enqueue {groups} items): {enqueue:?}");
    let emmg = drain(&shared, &enc).await;
    let (count, max) = key_emms(&shared, "group").await;
    assert_eq!(count, groups);
    eprintln!("EMMG: {groups} group key EMMs in {emmg:?}");
    let air = airtime_s(count, max as usize, 1_000_000);
    eprintln!(
        "group key EMM section: {max} bytes; one pass at 1 Mbit/s: {air:.1} s; first sending \
         with burst_count 3: {:.1} s",
        3.0 * air
    );
    let prep = enqueue + emmg;
    eprintln!("total preparation: {prep:?}");

    // Baseline, same run: the per-device delivery on `sample` devices.
    let mut tx = shared.db.conn().await.unwrap();
    let mut tx = tx.start_transaction(Default::default()).await.unwrap();
    let works: Vec<Work> = (1..=sample)
        .map(|d| Work::DeliverKeys {
            device_id: DeviceId::new(d).unwrap(),
        })
        .collect();
    let items: Vec<NewItem<'_>> = works
        .iter()
        .map(|work| NewItem {
            request_id: None,
            work,
            not_before: At::ServerNow,
        })
        .collect();
    let t3 = Instant::now();
    for chunk in items.chunks(1000) {
        queue::enqueue(&mut tx, chunk).await.unwrap();
    }
    tx.commit().await.unwrap();
    let base = t3.elapsed() + drain(&shared, &enc).await;
    let (ucount, umax) = key_emms(&shared, "unique").await;
    assert_eq!(ucount, sample);
    let per_device = base.as_secs_f64() / sample as f64;
    eprintln!(
        "baseline, per-device delivery: {sample} unique key EMMs ({umax} bytes) in {base:?}; \
         extrapolated to {n}: {:.1} s to prepare, {:.1} s of air at 1 Mbit/s",
        per_device * n as f64,
        airtime_s(n, umax as usize, 1_000_000)
    );
    eprintln!(
        "ratio (group-addressed / per-device, extrapolated): preparation {:.4}, air {:.5}",
        prep.as_secs_f64() / (per_device * n as f64),
        air / airtime_s(n, umax as usize, 1_000_000)
    );
}
