//! The purge job: expired EMMs leave the air (remove event) and the
//! table; everything past retention goes, in batches; nothing else does.

use std::sync::Arc;
use std::time::Duration;

use casd::scheduler::{purge::PurgeJob, JobEntry, Schedule, Scheduler};
use casd::testing::TestDb;
use mysql_async::prelude::*;

async fn emm(c: &mut mysql_async::Conn, id: u64, state: &str, created: &str, not_after: &str) {
    c.exec_drop(
        format!(
            "INSERT INTO emms (id, addressing, address, key_version, class, purpose, emm_data, encrypted_emm, created_at, not_after, state) \
             VALUES (?, 'global', 0, 1, 1, 'osm', '{{}}', x'00', {created}, {not_after}, ?)"
        ),
        (id, state),
    )
    .await
    .unwrap();
    if state == "live" {
        c.exec_drop(
            "INSERT INTO carousel_events (emm_id, op, created_at) VALUES (?, 'add', UTC_TIMESTAMP(6))",
            (id,),
        )
        .await
        .unwrap();
    }
}

async fn count(c: &mut mysql_async::Conn, sql: &str) -> u64 {
    c.query_first::<u64, _>(sql).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_expired_emms_from_air_and_table_and_old_rows_in_batches() {
    let t = TestDb::new().await;
    let mut cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    cfg.scheduler.batch = 2; // several batches per table
    let shared = casd::testing::shared(cfg, t.db.clone(), None);
    let mut c = t.db.conn().await.unwrap();
    let now = "UTC_TIMESTAMP(6)";
    let past = "UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE";
    let future = "UTC_TIMESTAMP(6) + INTERVAL 1 DAY";
    let old = "UTC_TIMESTAMP(6) - INTERVAL 100 DAY";
    // Expired: 5 live (must leave the air), 2 withdrawn.
    for id in 1..=5 {
        emm(&mut c, id, "live", now, past).await;
    }
    for id in 6..=7 {
        emm(&mut c, id, "withdrawn", now, past).await;
    }
    // Not expired: live (stays), withdrawn recently (stays), withdrawn long ago (goes).
    emm(&mut c, 10, "live", old, future).await;
    emm(&mut c, 11, "withdrawn", now, future).await;
    for id in 12..=14 {
        emm(&mut c, id, "withdrawn", old, future).await;
    }
    // Entitlements: ended long ago (go), ended recently, active (stay).
    for (d, state, ended) in [
        (1, "ended", old),
        (2, "ended", old),
        (3, "ended", old),
        (4, "ended", now),
        (5, "active", "NULL"),
    ] {
        c.exec_drop(
            format!("INSERT INTO entitlements (device_id, product_id, start_at, end_at, state, updated_at, ended_at) VALUES (?, 1, 0, 1, ?, {now}, {ended})"),
            (d, state),
        )
        .await
        .unwrap();
    }
    for (i, at) in [old, old, old, now].iter().enumerate() {
        c.exec_drop(
            format!("INSERT INTO sms_requests (sender, transaction_id, path, message, received_at, processed_at, status_code, response) VALUES ('s', ?, '/x', '', {at}, {at}, 200, '')"),
            (format!("t{i}"),),
        )
        .await
        .unwrap();
        c.exec_drop(
            format!("INSERT INTO idempotency (sender, transaction_id, body_sha256, request_id, created_at) VALUES ('s', ?, REPEAT('a', 32), 1, {at})"),
            (format!("t{i}"),),
        )
        .await
        .unwrap();
    }
    for (state, done) in [
        ("done", old),
        ("done", old),
        ("failed", old),
        ("done", now),
        ("pending", "NULL"),
    ] {
        c.exec_drop(
            format!("INSERT INTO work_items (kind, payload, state, not_before, created_at, done_at) VALUES ('x', '{{}}', ?, {now}, {now}, {done})"),
            (state,),
        )
        .await
        .unwrap();
    }
    for at in [
        "UTC_TIMESTAMP(6) - INTERVAL 2 DAY",
        "UTC_TIMESTAMP(6) - INTERVAL 2 DAY",
        "UTC_TIMESTAMP(6) - INTERVAL 2 DAY",
    ] {
        c.exec_drop(
            format!(
                "INSERT INTO carousel_events (emm_id, op, created_at) VALUES (999, 'add', {at})"
            ),
            (),
        )
        .await
        .unwrap();
    }
    c.exec_drop(format!("INSERT INTO job_runs (job, holder, fence, started_at, ended_at, outcome) VALUES ('purge', 'x', 1, {old}, {old}, 'ok')"), ())
        .await
        .unwrap();
    let max_event_before = count(&mut c, "SELECT MAX(id) FROM carousel_events").await;

    let sch = Scheduler::with_jobs(
        shared,
        vec![JobEntry {
            job: Arc::new(PurgeJob),
            schedule: Schedule::Every(Duration::from_secs(60)),
        }],
    );
    let run = sch.run_now("purge", serde_json::json!({})).await.unwrap();
    assert_eq!(run.outcome.as_deref(), Some("ok"), "{run:?}");
    let counts = run.counts.unwrap();
    eprintln!("{counts}");

    // Nothing expired is left, and every expired live EMM got a remove event.
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM emms WHERE not_after < UTC_TIMESTAMP(6)"
        )
        .await,
        0
    );
    let removed: Vec<u64> = c
        .exec(
            "SELECT emm_id FROM carousel_events WHERE op = 'remove' AND id > ? ORDER BY emm_id",
            (max_event_before,),
        )
        .await
        .unwrap();
    assert_eq!(removed, vec![1, 2, 3, 4, 5]);
    let left: Vec<u64> = c.query("SELECT id FROM emms ORDER BY id").await.unwrap();
    assert_eq!(left, vec![10, 11]);
    assert_eq!(counts["emms_expired"], 7);
    assert_eq!(counts["emms_taken_off_air"], 5);
    assert_eq!(counts["emms_withdrawn"], 3);
    let ents: Vec<u64> = c
        .query("SELECT device_id FROM entitlements ORDER BY device_id")
        .await
        .unwrap();
    assert_eq!(ents, vec![4, 5]);
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM sms_requests").await, 1);
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM idempotency").await, 1);
    let items: Vec<String> = c
        .query("SELECT state FROM work_items ORDER BY id")
        .await
        .unwrap();
    assert_eq!(items, vec!["done", "pending"]);
    assert_eq!(
        count(&mut c, "SELECT COUNT(*) FROM carousel_events WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL 1 DAY").await,
        0
    );
    // The old run is gone; this run's record is there.
    let runs: Vec<String> = c.query("SELECT holder FROM job_runs").await.unwrap();
    assert_eq!(runs, vec![sch.holder.clone()]);
}
