//! Group slots: where a round's free-slot scan starts ([`SlotHint`]) and
//! the creation of new groups of free slots ([`ensure_free_slots`]).
//! The rows themselves are written by the round (`round.rs`), in the same
//! transaction as the device they are given to.

use mysql_async::prelude::*;
use mysql_async::Conn;

use super::error::SmsError;
use crate::db::DbError;

/// Where the next free-slot scan of this process starts: after the slots
/// it last took, instead of at group 1, slot 0. Without it,
/// every round's `device_id IS NULL` index scan walked over the entries of
/// the slots just taken (delete-marked until InnoDB's purge catches up):
/// thousands per query under load, the costliest statement of a round.
/// A slot freed below the hint by this process lowers it at once; one
/// freed by another process is found when the hint expires (after
/// [`SLOT_HINT_TTL`]) and the next round scans from the start again. So
/// "the lowest free slot" holds within a process, and across processes
/// within that delay.
#[derive(Debug)]
pub struct SlotHint {
    state: std::sync::Mutex<HintState>,
    ttl: std::time::Duration,
}

#[derive(Debug, Default)]
struct HintState {
    /// The floor and when it was first trusted.
    floor: Option<((u32, u8), std::time::Instant)>,
    /// Bumped whenever the floor is lowered or dropped: a round that
    /// scanned before that must not raise the floor past a slot freed
    /// meanwhile.
    generation: u64,
}

impl Default for SlotHint {
    fn default() -> Self {
        SlotHint::with_ttl(SLOT_HINT_TTL)
    }
}

/// How long a [`SlotHint`] is trusted.
pub const SLOT_HINT_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl SlotHint {
    /// A hint trusted for `ttl` (tests use zero: always from the start).
    pub fn with_ttl(ttl: std::time::Duration) -> SlotHint {
        SlotHint {
            state: std::sync::Mutex::new(HintState::default()),
            ttl,
        }
    }
    /// The (group, slot) the next slot query starts at.
    pub fn floor(&self) -> (u32, u8) {
        self.start().0
    }
    /// The floor, and the generation to give back to [`SlotHint::found`].
    pub(super) fn start(&self) -> ((u32, u8), u64) {
        match self.state.lock() {
            Ok(h) => match h.floor {
                Some((gs, at)) if at.elapsed() < self.ttl => (gs, h.generation),
                _ => ((0, 0), h.generation),
            },
            Err(_) => ((0, 0), 0),
        }
    }
    /// `gs`: the slot after the free ones a round found (and locked) in a
    /// scan begun at `generation`. The next scan starts there; if the
    /// round rolls back, [`SlotHint::freed`] lowers the floor again.
    pub(super) fn found(&self, gs: (u32, u8), generation: u64) {
        if let Ok(mut h) = self.state.lock() {
            if h.generation != generation {
                return; // lowered meanwhile: keep the lower floor
            }
            let at = match h.floor {
                // Keep the age of a trusted hint: it must expire even
                // under constant load.
                Some((_, at)) if at.elapsed() < self.ttl => at,
                _ => std::time::Instant::now(),
            };
            h.floor = Some((gs, at));
        }
    }
    /// `gs` is free again (a device removed, or a round rolled back).
    pub(super) fn freed(&self, gs: (u32, u8)) {
        if let Ok(mut h) = self.state.lock() {
            h.generation += 1;
            if let Some((floor, _)) = h.floor.as_mut() {
                *floor = (*floor).min(gs);
            }
        }
    }
    pub(super) fn reset(&self) {
        if let Ok(mut h) = self.state.lock() {
            h.generation += 1;
            h.floor = None;
        }
    }
}

/// Makes at least `needed` group slots free, creating groups of 256 free
/// slots, committed on their own (not in a command transaction: an INSERT
/// that meets duplicates keeps shared locks on them until its transaction
/// ends, which would hide those slots from every concurrent `SKIP LOCKED`
/// allocation). Serialised by a named lock, and only for what is missing:
/// groups fill in order, and an empty extra group is waste. Two processes
/// creating the same group at once: the second one's IGNORE skips the rows.
pub(super) async fn ensure_free_slots(conn: &mut Conn, needed: usize) -> Result<(), SmsError> {
    let got: Option<Option<i64>> = conn
        .query_first("SELECT GET_LOCK(CONCAT('casd.newgroup.', DATABASE()), 10)")
        .await?;
    if got.flatten() != Some(1) {
        return Err(SmsError::Db(DbError::Unreachable(
            "could not take the group creation lock".into(),
        )));
    }
    let result = async {
        let free: Option<u64> = conn
            .query_first("SELECT COUNT(*) FROM group_slots WHERE device_id IS NULL")
            .await?;
        let free = free.unwrap_or(0) as usize;
        if free < needed {
            let groups = (needed - free).div_ceil(256);
            let next: Option<u32> = conn
                .query_first("SELECT COALESCE(MAX(group_id), 0) + 1 FROM group_slots")
                .await?;
            let next = next.unwrap_or(1);
            let values: Vec<String> = (next..next + groups as u32)
                .flat_map(|g| (0..256).map(move |s| format!("({g},{s},NULL)")))
                .collect();
            conn.query_drop(format!(
                "INSERT IGNORE INTO group_slots (group_id, slot, device_id) VALUES {}",
                values.join(",")
            ))
            .await?;
        }
        Ok::<(), mysql_async::Error>(())
    }
    .await;
    let _: Option<Option<i64>> = conn
        .query_first("SELECT RELEASE_LOCK(CONCAT('casd.newgroup.', DATABASE()))")
        .await?;
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SlotHint;

    #[test]
    fn slot_hint_follows_found_slots_and_never_rises_past_a_freed_one() {
        let h = SlotHint::default();
        assert_eq!(h.floor(), (0, 0), "no hint yet: from the start");
        let (_, g) = h.start();
        h.found((3, 64), g);
        assert_eq!(h.floor(), (3, 64));
        // A round scans (generation g2); meanwhile another round rolls
        // back and frees 3/70. The first round's later, higher find must
        // not hide 3/70.
        let (_, g2) = h.start();
        h.found((3, 80), g2);
        let (_, g3) = h.start();
        h.freed((3, 70));
        assert_eq!(h.floor(), (3, 70));
        h.found((3, 96), g3);
        assert_eq!(h.floor(), (3, 70), "a find from before the free is ignored");
        h.freed((1, 4));
        assert_eq!(h.floor(), (1, 4));
        h.reset();
        assert_eq!(h.floor(), (0, 0));
        let expired = SlotHint::with_ttl(std::time::Duration::ZERO);
        let (_, g) = expired.start();
        expired.found((2, 2), g);
        assert_eq!(expired.floor(), (0, 0), "an expired hint is not used");
    }
}
