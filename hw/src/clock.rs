//! Clocks: monotonic time since an origin (for pacing and timeouts) and wall
//! time (for issued_at / not_after), with a simulated twin advanced by hand.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic and a wall clock.
pub trait Clock: Send + Sync {
    /// Monotonic time since this clock's origin; never goes backwards.
    fn now(&self) -> Duration;
    /// Wall time since the Unix epoch (may jump when the system clock is set).
    fn unix_now(&self) -> Duration;
    /// Wall time in whole Unix seconds, saturating at `u32::MAX` (the wire
    /// format's `issued_at` / `not_after` are u32).
    fn unix_secs_u32(&self) -> u32 {
        u32::try_from(self.unix_now().as_secs()).unwrap_or(u32::MAX)
    }
}

/// The system clocks: `Instant` since construction, `SystemTime` since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn unix_now(&self) -> Duration {
        // A system clock set before 1970 reads as the epoch rather than panicking.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }
}

/// A clock that moves only when told to. Monotonic time starts at zero.
#[derive(Debug)]
pub struct SimulatedClock {
    inner: Mutex<(Duration, Duration)>,
}

impl SimulatedClock {
    /// Monotonic time 0, wall time `unix_now`.
    pub fn new(unix_now: Duration) -> Self {
        SimulatedClock {
            inner: Mutex::new((Duration::ZERO, unix_now)),
        }
    }

    /// Advances both clocks by `d`.
    pub fn advance(&self, d: Duration) {
        let mut g = self.lock();
        g.0 += d;
        g.1 += d;
    }

    /// Sets the wall clock only (as an NTP step would); monotonic time is untouched.
    pub fn set_unix(&self, unix_now: Duration) {
        self.lock().1 = unix_now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Duration, Duration)> {
        // The state is two plain Durations: a poisoned lock still holds valid data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for SimulatedClock {
    fn now(&self) -> Duration {
        self.lock().0
    }

    fn unix_now(&self) -> Duration {
        self.lock().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_moves_forward() {
        let c = SystemClock::new();
        let a = c.now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.now() > a);
        assert!(c.unix_now() > Duration::from_secs(1_600_000_000));
        assert!(c.unix_secs_u32() > 1_600_000_000);
    }

    #[test]
    fn simulated_clock_is_manual() {
        let c = SimulatedClock::new(Duration::from_secs(1_000));
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Duration::from_millis(1500));
        assert_eq!(c.unix_now(), Duration::from_millis(1_001_500));
        c.set_unix(Duration::from_secs(5));
        assert_eq!(c.now(), Duration::from_millis(1500));
        assert_eq!(c.unix_secs_u32(), 5);
        c.set_unix(Duration::from_secs(u64::from(u32::MAX) + 10));
        assert_eq!(c.unix_secs_u32(), u32::MAX);
    }

    #[test]
    fn clocks_are_object_safe() {
        let clocks: Vec<Box<dyn Clock>> = vec![
            Box::new(SystemClock::new()),
            Box::new(SimulatedClock::new(Duration::ZERO)),
        ];
        for c in &clocks {
            let _ = c.now();
        }
    }
}
