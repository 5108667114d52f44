//! Pacing: how many bytes may have left by a given instant.
//!
//! `bytes_due(t) = floor(t_ns × bitrate / 8·10⁹)`, computed in u128 integer
//! arithmetic from one fixed start, every time from scratch. Nothing is
//! accumulated, so there is no rounding error to drift: after N datagrams
//! the output is within one datagram of `bitrate × t` whether t is one
//! second or one year. With bitrates up to 2⁶⁴ bit/s and t up to 2⁶⁴ ns
//! (584 years) the product stays below 2¹²⁸; beyond, it saturates.
//!
//! The pacer counts what was sent and says when the next `n` bytes are due
//! ([`Pacer::due_at`]) — the play-out loop sleeps until that instant
//! instead of sleeping a fixed period.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// bits per byte × ns per second.
const SCALE: u128 = 8 * NANOS_PER_SEC;

/// Byte budget from a bitrate and a monotonic clock. Pure: the caller
/// passes `now` as the time elapsed since the pacer's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    bitrate: u64,
    sent: u128,
}

impl Pacer {
    /// `bitrate` in bit/s; `None` if 0.
    pub fn new(bitrate: u64) -> Option<Pacer> {
        (bitrate > 0).then_some(Pacer { bitrate, sent: 0 })
    }

    pub fn bitrate(&self) -> u64 {
        self.bitrate
    }

    /// Bytes accounted as sent so far (forfeited budget included).
    pub fn sent(&self) -> u128 {
        self.sent
    }

    /// Bytes the bitrate allows from the start up to `now`.
    pub fn bytes_due(&self, now: Duration) -> u128 {
        now.as_nanos()
            .checked_mul(u128::from(self.bitrate))
            .map_or(u128::MAX, |bits_ns| bits_ns / SCALE)
    }

    /// Bytes the bitrate allows in a span of `span` (same formula).
    pub fn bytes_due_in(&self, span: Duration) -> u128 {
        self.bytes_due(span)
    }

    /// Earliest instant at which `bytes` more may go: the smallest t with
    /// `bytes_due(t) ≥ sent + bytes`, i.e. `ceil((sent + bytes) × 8·10⁹ / bitrate)` ns.
    pub fn due_at(&self, bytes: u64) -> Duration {
        let target = self.sent.saturating_add(u128::from(bytes));
        let ns = target
            .checked_mul(SCALE)
            .map_or(u128::MAX, |n| n.div_ceil(u128::from(self.bitrate)));
        let secs = u64::try_from(ns / NANOS_PER_SEC).unwrap_or(u64::MAX);
        // < 10⁹, fits.
        Duration::new(secs, (ns % NANOS_PER_SEC) as u32)
    }

    /// True when `bytes` more may go at `now`.
    pub fn is_due(&self, now: Duration, bytes: u64) -> bool {
        self.bytes_due(now) >= self.sent.saturating_add(u128::from(bytes))
    }

    /// Accounts `bytes` as sent.
    pub fn record(&mut self, bytes: u64) {
        self.sent = self.sent.saturating_add(u128::from(bytes));
    }

    /// Gives up budget that was not used: afterwards at most `keep` bytes
    /// are immediately due at `now`. Used when the output was idle (a cap,
    /// not a debt: no burst to "catch up") or stalled for longer than the
    /// allowed backlog.
    pub fn forfeit(&mut self, now: Duration, keep: u64) {
        let floor = self.bytes_due(now).saturating_sub(u128::from(keep));
        self.sent = self.sent.max(floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_rates() {
        let p = Pacer::new(8_000).unwrap(); // 1000 byte/s
        assert_eq!(p.bytes_due(Duration::from_secs(1)), 1000);
        assert_eq!(p.bytes_due(Duration::from_millis(1500)), 1500);
        assert_eq!(p.due_at(1316), Duration::from_millis(1316));
        assert!(Pacer::new(0).is_none());
    }

    #[test]
    fn no_overflow_after_years() {
        let p = Pacer::new(20_000_000).unwrap();
        let ten_years = Duration::from_secs(10 * 365 * 86_400);
        assert_eq!(p.bytes_due(ten_years), 2_500_000 * 10 * 365 * 86_400);
        let mut q = p;
        q.record(2_500_000 * 10 * 365 * 86_400);
        assert_eq!(q.due_at(0), ten_years);
        // Absurd inputs saturate instead of wrapping.
        let max = Pacer::new(u64::MAX).unwrap();
        assert_eq!(max.bytes_due(Duration::MAX), u128::MAX);
    }

    #[test]
    fn forfeit_keeps_at_most_keep() {
        let mut p = Pacer::new(8_000).unwrap();
        p.forfeit(Duration::from_secs(10), 1316);
        assert_eq!(p.sent(), 10_000 - 1316);
        assert!(p.is_due(Duration::from_secs(10), 1316));
        assert!(!p.is_due(Duration::from_secs(10), 1317));
        // Never goes backwards.
        p.forfeit(Duration::from_secs(1), 0);
        assert_eq!(p.sent(), 10_000 - 1316);
    }

    proptest! {
        #[test]
        fn due_at_is_the_exact_threshold(bitrate in 1u64..100_000_000_000, sent in 0u64..(1 << 50), bytes in 0u64..100_000) {
            let mut p = Pacer::new(bitrate).unwrap();
            p.record(sent);
            let t = p.due_at(bytes);
            prop_assert!(p.is_due(t, bytes));
            if let Some(before) = t.checked_sub(Duration::from_nanos(1)) {
                prop_assert!(!p.is_due(before, bytes) || bytes == 0 && sent == 0);
            }
        }
    }
}
