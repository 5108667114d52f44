//! The `refresh` job: keeps every enabled device's ENTITLEMENT_SET current
//! in the background carousel. A device whose live `entitlement_set` EMM is
//! missing or older than `scheduler.refresh_days` gets a `refreshset` work
//! item; the EMMG makes the set as it is then and withdraws the old one.
//!
//! Devices are walked in fenced batches of `scheduler.batch`; items get
//! increasing `not_before` (like a rotation's key deliveries) so the new
//! sets' first sending takes at most `rotation_bandwidth_share` of the
//! output. A run is skipped while items of the previous one are still
//! queued.

use std::collections::HashSet;

use mysql_async::prelude::*;
use mysql_async::Value;

use super::rotation::airtime_s;
use super::{Counts, Job, JobCtx, JobError};

pub struct RefreshJob;

impl Job for RefreshJob {
    fn name(&self) -> &str {
        "refresh"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(refresh(ctx))
    }
}

use crate::encryptor::BoxFuture;
use casd_wire::{crypto, emm};

/// Section bytes assumed for a set when spreading (a set of 4 products).
const SET_BYTES: usize = emm::emm_overhead(crypto::ADDRESS_LEN_UNIQUE)
    + emm::TLV_HEADER_LEN
    + emm::entitlement_set_value_len(4);

/// One refresh run.
pub async fn refresh(ctx: &JobCtx) -> Result<Counts, JobError> {
    let cfg = &ctx.shared.cfg;
    let sc = &cfg.scheduler;
    let batch = sc.batch.max(1) as u64;
    let mut counts = Counts::new();
    let mut c = ctx.conn().await?;
    let queued: Option<u64> = c
        .query_first(
            "SELECT COUNT(*) FROM work_items WHERE state = 'pending' AND kind = 'refreshset'",
        )
        .await?;
    if queued.unwrap_or(0) > 0 {
        counts.insert(
            "skipped".into(),
            "the previous refresh is still queued".into(),
        );
        return Ok(counts);
    }
    let bitrate = super::rotation::min_bitrate(cfg);
    let burst = f64::from(cfg.cycler.burst_count.max(1));
    // Milliseconds of spread per item.
    let per_item_ms =
        airtime_s(1, SET_BYTES, bitrate) * burst / sc.rotation_bandwidth_share * 1000.0;
    let (mut after, mut seen, mut stale_total) = (0u64, 0u64, 0u64);
    loop {
        let mut tx = ctx.begin(&mut c).await?;
        let ids: Vec<u64> = tx
            .exec(
                "SELECT device_id FROM devices WHERE state = 'enabled' AND device_id > ? \
                 ORDER BY device_id LIMIT ?",
                (after, batch),
            )
            .await?;
        let Some(&last) = ids.last() else {
            tx.rollback().await?;
            break;
        };
        let ph = vec!["?"; ids.len()].join(",");
        let mut params: Vec<Value> = ids.iter().map(|d| Value::from(*d)).collect();
        params.push(sc.refresh_days.into());
        let fresh: Vec<u64> = tx
            .exec(
                format!(
                    "SELECT DISTINCT address FROM emms WHERE addressing = 'unique' AND address IN ({ph}) \
                     AND purpose = 'entitlement_set' AND state = 'live' \
                     AND created_at > UTC_TIMESTAMP(6) - INTERVAL ? DAY"
                ),
                params,
            )
            .await?;
        let fresh: HashSet<u64> = fresh.into_iter().collect();
        let stale: Vec<u64> = ids.iter().copied().filter(|d| !fresh.contains(d)).collect();
        if !stale.is_empty() {
            let mut params: Vec<Value> = Vec::with_capacity(stale.len() * 3);
            let mut rows = Vec::with_capacity(stale.len());
            for (i, d) in stale.iter().enumerate() {
                let delay_ms = ((stale_total + i as u64) as f64 * per_item_ms) as u64;
                rows.push(
                    "(NULL, 'refreshset', NULL, ?, 'pending', 0, \
                     UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, UTC_TIMESTAMP(6))",
                );
                params.push(
                    serde_json::json!({"kind": "refreshset", "device_id": d})
                        .to_string()
                        .into(),
                );
                params.push((delay_ms * 1000).into());
            }
            tx.exec_drop(
                format!(
                    "INSERT INTO work_items (request_id, kind, device_id, payload, state, attempts, \
                     not_before, created_at) VALUES {}",
                    rows.join(",")
                ),
                params,
            )
            .await?;
        }
        tx.commit().await?;
        if !stale.is_empty() {
            ctx.shared.work_ready.notify_one();
        }
        seen += ids.len() as u64;
        stale_total += stale.len() as u64;
        after = last;
        if (ids.len() as u64) < batch {
            break;
        }
    }
    counts.insert("devices".into(), seen.into());
    counts.insert("refreshset_enqueued".into(), stale_total.into());
    Ok(counts)
}
