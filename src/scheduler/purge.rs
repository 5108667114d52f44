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
use crate::encryptor::BoxFuture;

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
    let days = sc.retention_days;
    let mut counts = Counts::new();

    // Expired EMMs: removed from the air, then deleted.
    let (mut expired, mut off_air) = (0u64, 0u64);
    loop {
        let mut c = ctx.conn().await?;
        let mut tx = ctx.begin(&mut c).await?;
        let rows: Vec<(u64, String)> = tx
            .exec(
                "SELECT id, state FROM emms WHERE not_after < UTC_TIMESTAMP(6) \
                 ORDER BY not_after LIMIT ? FOR UPDATE",
                (batch,),
            )
            .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            break;
        }
        let live: Vec<u64> = rows
            .iter()
            .filter(|(_, s)| s == "live")
            .map(|(id, _)| *id)
            .collect();
        if !live.is_empty() {
            let values = vec!["(?, 'remove', UTC_TIMESTAMP(6))"; live.len()].join(",");
            tx.exec_drop(
                format!("INSERT INTO carousel_events (emm_id, op, created_at) VALUES {values}"),
                live.iter().map(|i| Value::from(*i)).collect::<Vec<_>>(),
            )
            .await?;
        }
        let ids: Vec<Value> = rows.iter().map(|(id, _)| Value::from(*id)).collect();
        tx.exec_drop(
            format!(
                "DELETE FROM emms WHERE id IN ({})",
                vec!["?"; ids.len()].join(",")
            ),
            ids,
        )
        .await?;
        tx.commit().await?;
        if !live.is_empty() {
            ctx.shared.emms_ready.notify_one();
        }
        expired += rows.len() as u64;
        off_air += live.len() as u64;
        if (rows.len() as u64) < batch {
            break;
        }
    }
    counts.insert("emms_expired".into(), expired.into());
    counts.insert("emms_taken_off_air".into(), off_air.into());

    let steps: [(&str, String, Vec<Value>); 9] = [
        (
            "emms_withdrawn",
            "DELETE FROM emms WHERE state = 'withdrawn' AND created_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY created_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "entitlements_ended",
            "DELETE FROM entitlements WHERE state = 'ended' AND ended_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY ended_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "sms_requests",
            "DELETE FROM sms_requests WHERE received_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY received_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "idempotency",
            "DELETE FROM idempotency WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY created_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "work_items_done",
            "DELETE FROM work_items WHERE state = 'done' AND done_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY done_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "work_items_failed",
            "DELETE FROM work_items WHERE state = 'failed' AND done_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY done_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "carousel_events",
            "DELETE FROM carousel_events WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? HOUR ORDER BY created_at LIMIT ?".into(),
            vec![sc.events_retention_hours.into()],
        ),
        (
            "job_runs",
            "DELETE FROM job_runs WHERE started_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY started_at LIMIT ?".into(),
            vec![days.into()],
        ),
        (
            "job_triggers",
            "DELETE FROM job_triggers WHERE run_id IS NOT NULL AND requested_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY id LIMIT ?".into(),
            vec![days.into()],
        ),
    ];
    for (what, sql, params) in steps {
        let mut n = 0u64;
        loop {
            let mut c = ctx.conn().await?;
            let mut tx = ctx.begin(&mut c).await?;
            let mut p = params.clone();
            p.push(batch.into());
            tx.exec_drop(sql.as_str(), p).await?;
            let k = tx.affected_rows();
            tx.commit().await?;
            n += k;
            if k < batch {
                break;
            }
        }
        counts.insert(what.into(), n.into());
    }
    Ok(counts)
}
