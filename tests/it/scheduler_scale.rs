//! Measurement, not run by default: preparing a key rotation for 100,000
//! devices (create the versions, enqueue the deliveries, EMMG seals and
//! stores the key EMMs), and the air time its key EMMs need at 1 Mbit/s.
//!
//! ```text
//! CASD_SCALE_DEVICES=100000 cargo test --release -p casd --test it scheduler_scale:: -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use casd::encryptor::{Encryptor, LocalEncryptor};
use casd::keystore::KeyStore;
use casd::scheduler::rotation::{airtime_s, RotationJob};
use casd::scheduler::{JobEntry, Schedule, Scheduler};
use casd::testing::TestDb;
use casd_wire::crypto::Key128;
use mysql_async::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --release --ignored --nocapture"]
async fn rotation_for_many_devices() {
    let n: u64 = std::env::var("CASD_SCALE_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let t = TestDb::new().await;
    let mut cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    // Spread of the enqueue off: this measures how fast it can be prepared.
    cfg.cycler.outputs[0].bitrate = 1_000_000_000;
    let ks = KeyStore::new(t.db.clone(), Key128::from_bytes([3; 16]), 1);
    ks.init().await.unwrap();
    let enc: Arc<dyn Encryptor> = Arc::new(LocalEncryptor::new(ks, cfg.cas.max_section_bytes));
    let shared = casd::testing::shared(cfg, t.db.clone(), Some(enc.clone()));
    let mut c = t.db.conn().await.unwrap();
    let t0 = Instant::now();
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
    let groups = n.div_ceil(256);
    // Every group's first key (what adddevice would have made).
    for g in 1..=groups {
        enc.current_key(casd::keystore::KeyKind::Group(g as u32))
            .await
            .unwrap();
    }
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
    assert_eq!(counts["deliverkeys_enqueued"], n);
    eprintln!("rotation job (create {groups} GK + GLK, enqueue {n} items): {enqueue:?}");

    let t2 = Instant::now();
    let workers = shared.cfg.emmg.workers;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
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
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let emmg = t2.elapsed();
    let (count, avg, max): (u64, f64, u64) = c
        .query_first(
            "SELECT COUNT(*), AVG(LENGTH(encrypted_emm)), MAX(LENGTH(encrypted_emm)) FROM emms WHERE purpose = 'keys' AND state = 'live'",
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count, n);
    eprintln!(
        "EMMG ({workers} workers, batch {}): {n} key EMMs in {emmg:?} ({:.0}/s)",
        shared.cfg.emmg.batch,
        n as f64 / emmg.as_secs_f64()
    );
    eprintln!(
        "key EMM section: {avg:.0} bytes average, {max} max; one pass at 1 Mbit/s: {:.1} s; \
         first sending with burst_count 3: {:.1} s",
        airtime_s(n, max as usize, 1_000_000),
        3.0 * airtime_s(n, max as usize, 1_000_000)
    );
    eprintln!("total preparation: {:?}", enqueue + emmg);
}
