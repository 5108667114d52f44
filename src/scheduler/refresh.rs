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

use super::rotation::{airtime_s, device};
use super::{enabled_devices_after, Counts, Job, JobCtx, JobError};
use crate::emm_store;
use crate::queue::{self, At, NewItem, Work};

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
    let batch = cfg.scheduler.batch.max(1) as u64;
    let mut counts = Counts::new();
    let mut c = ctx.conn().await?;
    // `Work::RefreshSet`'s kind.
    if queue::pending_of_kind(&mut c, "refreshset").await? > 0 {
        counts.insert(
            "skipped".into(),
            "the previous refresh is still queued".into(),
        );
        return Ok(counts);
    }
    let burst = f64::from(cfg.cycler.burst_count.max(1));
    // Milliseconds of spread per item.
    let per_item_ms = airtime_s(1, SET_BYTES, super::rotation::min_bitrate(cfg)) * burst
        / cfg.scheduler.rotation_bandwidth_share
        * 1000.0;
    let (mut after, mut seen, mut enqueued) = (0u64, 0u64, 0u64);
    loop {
        let spread = Spread {
            first: enqueued,
            per_item_ms,
        };
        let Some(b) = refresh_batch(ctx, &mut c, after, batch, spread).await? else {
            break;
        };
        seen += b.devices;
        enqueued += b.enqueued;
        after = b.last;
        if b.devices < batch {
            break;
        }
    }
    counts.insert("devices".into(), seen.into());
    counts.insert("refreshset_enqueued".into(), enqueued.into());
    Ok(counts)
}

/// Where a batch's items go in the run's spread.
#[derive(Clone, Copy, Debug)]
struct Spread {
    /// Items of the run enqueued before this batch.
    first: u64,
    per_item_ms: f64,
}

impl Spread {
    /// `not_before` of the batch's `i`-th item: microseconds from now.
    fn delay_us(&self, i: usize) -> u64 {
        ((self.first + i as u64) as f64 * self.per_item_ms) as u64 * 1000
    }
}

/// What one batch did.
struct Batch {
    devices: u64,
    enqueued: u64,
    last: u64,
}

/// One fenced transaction: the enabled devices after `after`; a
/// `refreshset` item for each whose set is missing or stale. `None` when
/// no device is left.
async fn refresh_batch(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    after: u64,
    batch: u64,
    spread: Spread,
) -> Result<Option<Batch>, JobError> {
    let mut tx = ctx.begin(c).await?;
    let ids = enabled_devices_after(&mut tx, after, batch).await?;
    let Some(&last) = ids.last() else {
        tx.rollback().await?;
        return Ok(None);
    };
    let fresh = emm_store::fresh_sets(&mut tx, &ids, ctx.shared.cfg.scheduler.refresh_days).await?;
    let works = ids
        .iter()
        .filter(|d| !fresh.contains(d))
        .map(|d| {
            Ok(Work::RefreshSet {
                device_id: device(*d)?,
            })
        })
        .collect::<Result<Vec<_>, JobError>>()?;
    let items: Vec<NewItem<'_>> = works
        .iter()
        .enumerate()
        .map(|(i, work)| NewItem {
            request_id: None,
            work,
            not_before: At::ServerNowPlusMicros(spread.delay_us(i)),
        })
        .collect();
    queue::enqueue(&mut tx, &items).await?;
    tx.commit().await?;
    if !items.is_empty() {
        ctx.shared.work_ready.notify_one();
    }
    Ok(Some(Batch {
        devices: ids.len() as u64,
        enqueued: items.len() as u64,
        last,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_spreads_its_items_across_batches() {
        let s = Spread {
            first: 0,
            per_item_ms: 2.5,
        };
        assert_eq!(
            (s.delay_us(0), s.delay_us(1), s.delay_us(2)),
            (0, 2000, 5000)
        );
        // The next batch goes on where the last one stopped.
        let s = Spread { first: 3, ..s };
        assert_eq!(s.delay_us(0), 7000);
    }
}
