//! The `purge` job: expiry and retention, in bounded batches — every batch
//! its own short fenced transaction of at most `scheduler.batch` rows, so
//! no lock is held for long and a purge can stop anywhere.
//!
//! | what | rule |
//! |---|---|
//! | `emms` past `not_after` | deleted; a `carousel_events` 'remove' for each one still live (the Cycler drops it; its schedule also drops expired EMMs by itself) |
//! | withdrawn `emms` | deleted `retention_days` after `created_at` |
//! | `entitlements` in state 'ended' | deleted `retention_days` after `ended_at` |
//! | `sms_requests`, `idempotency` | deleted `retention_days` after they were received |
//! | `work_items` done or failed | deleted `retention_days` after `done_at` |
//! | `carousel_events` | deleted `events_retention_hours` after `created_at` (the Cycler waits at most `cycler::HOLE_TIMEOUT`, 120 s, for a late event) |
//! | `job_runs`, taken `job_triggers` | deleted `retention_days` after they started |

use mysql_async::prelude::*;
use mysql_async::Value;

use super::{Counts, Job, JobCtx, JobError};
use crate::config::SchedulerConfig;
use crate::emm_store;
use crate::encryptor::BoxFuture;
use crate::queue;

pub struct PurgeJob;

impl Job for PurgeJob {
    fn name(&self) -> &str {
        "purge"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(purge(ctx))
    }
}

/// One purge; the counts name what was deleted.
pub async fn purge(ctx: &JobCtx) -> Result<Counts, JobError> {
    let sc = &ctx.shared.cfg.scheduler;
    let batch = sc.batch.max(1) as u64;
    let mut counts = Counts::new();
    let (expired, off_air) = expire(ctx, batch).await?;
    counts.insert("emms_expired".into(), expired.into());
    counts.insert("emms_taken_off_air".into(), off_air.into());
    for (what, sql, age) in retention(sc) {
        let n = delete_in_batches(ctx, sql, age, batch).await?;
        counts.insert(what.into(), n.into());
    }
    Ok(counts)
}

/// Expired EMMs: removed from the air, then deleted, `batch` per
/// transaction. Returns (deleted, of which were live).
async fn expire(ctx: &JobCtx, batch: u64) -> Result<(u64, u64), JobError> {
    let (mut expired, mut off_air) = (0u64, 0u64);
    loop {
        let mut c = ctx.conn().await?;
        let mut tx = ctx.begin(&mut c).await?;
        let (n, live) = emm_store::expire_batch(&mut tx, batch).await?;
        if n == 0 {
            tx.rollback().await?;
            break;
        }
        tx.commit().await?;
        if live > 0 {
            ctx.shared.emms_ready.notify_one();
        }
        expired += n;
        off_air += live;
        if n < batch {
            break;
        }
    }
    Ok((expired, off_air))
}

/// The retention rules: (count name, statement, age). Each statement takes
/// the age (days or hours) and a row limit; its table's owner writes it.
fn retention(sc: &SchedulerConfig) -> [(&'static str, &'static str, u32); 9] {
    let days = sc.retention_days;
    [
        ("emms_withdrawn", emm_store::PURGE_WITHDRAWN, days),
        (
            "entitlements_ended",
            "DELETE FROM entitlements WHERE state = 'ended' AND ended_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY ended_at LIMIT ?",
            days,
        ),
        (
            "sms_requests",
            "DELETE FROM sms_requests WHERE received_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY received_at LIMIT ?",
            days,
        ),
        (
            "idempotency",
            "DELETE FROM idempotency WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY created_at LIMIT ?",
            days,
        ),
        ("work_items_done", queue::PURGE_DONE, days),
        ("work_items_failed", queue::PURGE_FAILED, days),
        ("carousel_events", emm_store::PURGE_EVENTS, sc.events_retention_hours),
        (
            "job_runs",
            "DELETE FROM job_runs WHERE started_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY started_at LIMIT ?",
            days,
        ),
        (
            "job_triggers",
            "DELETE FROM job_triggers WHERE run_id IS NOT NULL AND requested_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY id LIMIT ?",
            days,
        ),
    ]
}

/// Runs `sql` (age, limit) in fenced transactions of `batch` rows until
/// fewer are left. Returns rows deleted.
async fn delete_in_batches(ctx: &JobCtx, sql: &str, age: u32, batch: u64) -> Result<u64, JobError> {
    let mut n = 0u64;
    loop {
        let mut c = ctx.conn().await?;
        let mut tx = ctx.begin(&mut c).await?;
        tx.exec_drop(sql, vec![Value::from(age), Value::from(batch)])
            .await?;
        let k = tx.affected_rows();
        tx.commit().await?;
        n += k;
        if k < batch {
            break;
        }
    }
    Ok(n)
}
