//! Redundant Cyclers: which instance of a group is on air.
//!
//! Instances with the same `cycler.redundancy_group` serve the same
//! outputs. Each one loads the carousel and follows `carousel_events` (a
//! hot standby), but only the holder of the lease `cycler:<group>`
//! ([`crate::lease`], the database's clock, a fence bumped at every
//! take-over) sends: its players are on air, every other instance's are in
//! standby ([`carousel::Carousel::set_on_air`]).
//!
//! - Every quarter of `cycler.lease_ms` the holder renews, the others try
//!   to acquire: a holder that dies (kill -9, host lost) is replaced within
//!   `lease_ms` × 1.25 plus a round trip. On the way back on air each PID's
//!   first packet carries the discontinuity indicator (`Mux::resume`).
//! - A holder whose renewal finds the fence changed (it was paused longer
//!   than the lease and another instance took over) goes to standby at
//!   once.
//! - The database gone: the holder keeps playing (it cannot renew, but no
//!   other instance can take the lease without the database either); a
//!   standby stays standby. When the database answers again, the holder
//!   renews its lease; if another instance got there first after the
//!   lease ran out, the holder sees the new fence and steps down.
//! - An orderly stop releases the lease (after the players stopped), so
//!   a standby takes over at its next attempt instead of after the lease.
//!
//! The decision is [`decide`], pure; [`OnAir::run`] reads the lease, asks
//! it, and applies the result to the carousel and the metrics.

use std::time::Duration;

use crate::app::Shared;
use crate::lease;

/// Where this instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Air {
    Standby,
    /// On air under the lease with this fence.
    OnAir {
        fence: u64,
    },
}

/// What one look at the lease found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseSeen {
    /// This instance holds it, with this fence.
    Held(u64),
    /// Another instance holds it (or took it over).
    Other,
    /// The database did not answer.
    Unreachable,
}

/// The next state (pure): the lease decides, except that an unreachable
/// database changes nothing (see the module doc).
pub fn decide(now: Air, seen: LeaseSeen) -> Air {
    match (now, seen) {
        (_, LeaseSeen::Held(fence)) => Air::OnAir { fence },
        (_, LeaseSeen::Other) => Air::Standby,
        (now, LeaseSeen::Unreachable) => now,
    }
}

/// The lease name of a redundancy group.
pub fn lease_name(group: &str) -> String {
    format!("cycler:{group}")
}

/// The on-air duty of one redundant Cycler.
pub struct OnAir {
    shared: Shared,
    carousel: carousel::Carousel,
    name: String,
    holder: String,
    lease: Duration,
    air: Air,
    db_down: bool,
    on_air: metrics::Gauge,
    takeovers: metrics::Counter,
}

impl OnAir {
    /// `None` when `cycler.redundancy_group` is empty (always on air).
    pub fn new(shared: &Shared, carousel: &carousel::Carousel) -> Option<OnAir> {
        let group = shared.cfg.cycler.redundancy_group.clone();
        let m = &shared.metrics;
        let labels = [("group", group.clone())];
        let on_air = m.gauge(
            "casd_cycler_on_air",
            "1 while this Cycler's outputs are on air, 0 in standby (redundant Cyclers).",
            &labels,
        );
        // Registered (at 0) without redundancy too: one set of series.
        let takeovers = m.counter(
            "casd_cycler_takeovers_total",
            "Times this Cycler went on air from standby (took the group's lease).",
            &labels,
        );
        if group.is_empty() {
            on_air.set(1.0);
            return None;
        }
        on_air.set(0.0);
        Some(OnAir {
            shared: shared.clone(),
            carousel: carousel.clone(),
            name: lease_name(&group),
            holder: lease::default_holder(),
            lease: Duration::from_millis(shared.cfg.cycler.lease_ms),
            air: Air::Standby,
            db_down: false,
            on_air,
            takeovers,
        })
    }

    /// Looks at the lease every quarter of its length, forever.
    pub async fn run(&mut self) {
        let every = self.lease / 4;
        loop {
            let seen = self.look().await;
            self.apply(decide(self.air, seen)).await;
            tokio::time::sleep(every).await;
        }
    }

    async fn look(&mut self) -> LeaseSeen {
        let seen: anyhow::Result<Option<u64>> = async {
            let mut c = self.shared.db.conn().await?;
            match self.air {
                Air::OnAir { fence } => {
                    let held =
                        lease::renew(&mut c, &self.name, &self.holder, fence, self.lease).await?;
                    Ok(held.then_some(fence))
                }
                Air::Standby => {
                    Ok(lease::acquire(&mut c, &self.name, &self.holder, self.lease).await?)
                }
            }
        }
        .await;
        match seen {
            Ok(held) => {
                if std::mem::take(&mut self.db_down) {
                    tracing::info!(lease = %self.name, "cycler: database back, lease checked");
                }
                held.map_or(LeaseSeen::Other, LeaseSeen::Held)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.db_down, true) {
                    tracing::warn!(lease = %self.name, air = ?self.air,
                        "cycler: database unreachable ({e:#}); staying as we are (no other instance can take the lease without it)");
                }
                LeaseSeen::Unreachable
            }
        }
    }

    async fn apply(&mut self, next: Air) {
        match (self.air, next) {
            (Air::Standby, Air::OnAir { fence }) => {
                self.carousel.set_on_air(true).await;
                self.on_air.set(1.0);
                self.takeovers.increment(1);
                tracing::info!(lease = %self.name, holder = %self.holder, fence, "cycler: on air (took the lease)");
            }
            (Air::OnAir { fence }, Air::Standby) => {
                self.carousel.set_on_air(false).await;
                self.on_air.set(0.0);
                tracing::warn!(lease = %self.name, fence, "cycler: lease taken over by another instance; standby");
            }
            _ => {}
        }
        self.air = next;
    }

    /// After the players stopped: lets the lease go, so that a standby
    /// takes over at its next attempt.
    pub async fn release(&self) {
        let Air::OnAir { fence } = self.air else {
            return;
        };
        let released = async {
            let mut c = self.shared.db.conn().await?;
            lease::release(&mut c, &self.name, &self.holder, fence).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = released {
            tracing::warn!(lease = %self.name, "cycler: lease not released ({e:#}); it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_decides_unless_the_database_is_gone() {
        let on = |fence| Air::OnAir { fence };
        // A standby takes over when it gets the lease, waits otherwise.
        assert_eq!(decide(Air::Standby, LeaseSeen::Held(7)), on(7));
        assert_eq!(decide(Air::Standby, LeaseSeen::Other), Air::Standby);
        assert_eq!(decide(Air::Standby, LeaseSeen::Unreachable), Air::Standby);
        // The holder stays while it renews, steps down when fenced out...
        assert_eq!(decide(on(7), LeaseSeen::Held(7)), on(7));
        assert_eq!(decide(on(7), LeaseSeen::Other), Air::Standby);
        // ...and keeps playing while the database is away.
        assert_eq!(decide(on(7), LeaseSeen::Unreachable), on(7));
    }
}
