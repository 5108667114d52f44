//! Pacing of bulk commands (`casd devices import`, `POST /bulk`): their
//! work items get increasing `not_before`, spaced so that the first sending
//! of their EMMs (burst_count times in the carousel's fast lane) takes at
//! most `emmg.bulk_bandwidth_share` of the slowest output, like a
//! rotation's key deliveries. A million imported devices are then a steady
//! background trickle instead of a million EMMs at the front of the cycle.

use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;

use casd_wire::{crypto, emm};

/// Section bytes assumed per bulk item: an add makes two EMMs (the command,
/// then the device's whole set, both with a few products).
pub const BULK_ITEM_BYTES: usize = 2
    * (emm::emm_overhead(crypto::ADDRESS_LEN_UNIQUE)
        + emm::TLV_HEADER_LEN
        + emm::entitlement_set_value_len(4));

/// Time between two bulk items: [`BULK_ITEM_BYTES`] sent `burst` times
/// (with TS packet headers) in `share` of `bitrate`.
pub fn spacing(bitrate: u64, burst: u32, share: f64) -> Duration {
    let bits = BULK_ITEM_BYTES as f64 * 8.0 * 188.0 / 184.0 * f64::from(burst.max(1));
    Duration::from_secs_f64(bits / (bitrate.max(1) as f64 * share))
}

/// Hands out the `not_before` of bulk items: each one `per_item` after the
/// previous, never before now.
#[derive(Debug)]
pub struct BulkPace {
    per_item: Duration,
    last: Mutex<Option<OffsetDateTime>>,
}

impl BulkPace {
    /// Spacing from the configuration (see the module doc).
    pub fn from_config(cfg: &crate::config::Config) -> BulkPace {
        let per_item = spacing(
            crate::scheduler::rotation::min_bitrate(cfg),
            cfg.cycler.burst_count,
            cfg.emmg.bulk_bandwidth_share,
        );
        BulkPace::new(per_item, None)
    }

    /// `per_item` apart, the first no earlier than `after` (the last
    /// pending bulk item's, so two runs do not double the rate).
    pub fn new(per_item: Duration, after: Option<OffsetDateTime>) -> BulkPace {
        BulkPace {
            per_item,
            last: Mutex::new(after),
        }
    }

    /// Continue after `t` when that is later than what was handed out.
    pub fn after(self, t: Option<OffsetDateTime>) -> BulkPace {
        let last = self.last.into_inner().unwrap_or_else(|e| e.into_inner());
        BulkPace::new(self.per_item, last.max(t))
    }

    pub fn per_item(&self) -> Duration {
        self.per_item
    }

    /// The next item's `not_before`.
    pub fn next(&self, now: OffsetDateTime) -> OffsetDateTime {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let t = match *last {
            Some(l) if l + self.per_item > now => l + self.per_item,
            _ => now,
        };
        *last = Some(t);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_spaced_and_never_before_now() {
        let now = OffsetDateTime::from_unix_timestamp(1_000).unwrap();
        let p = BulkPace::new(Duration::from_millis(100), None);
        let ts: Vec<_> = (0..3).map(|_| p.next(now)).collect();
        let ms: Vec<i128> = ts.iter().map(|t| (*t - now).whole_milliseconds()).collect();
        assert_eq!(ms, [0, 100, 200]);
        // Later, once the spacing has passed, items are due at once again.
        let later = now + Duration::from_secs(10);
        assert_eq!(p.next(later), later);
        // A pace continuing after pending items starts behind them.
        let q = BulkPace::new(Duration::from_millis(100), None).after(Some(later));
        assert_eq!(q.next(now), later + Duration::from_millis(100));
    }

    #[test]
    fn spacing_follows_bytes_burst_and_share() {
        let s = spacing(1_000_000, 3, 0.25);
        let bits = BULK_ITEM_BYTES as f64 * 8.0 * 188.0 / 184.0 * 3.0;
        assert!((s.as_secs_f64() - bits / 250_000.0).abs() < 1e-9);
        // Twice the share, half the spacing.
        let half = spacing(1_000_000, 3, 0.5).as_secs_f64();
        assert!((half * 2.0 - s.as_secs_f64()).abs() < 1e-9);
    }
}
