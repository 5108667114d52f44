//! The carousel schedule: which EMM section goes on air next.
//!
//! Rules (the wire contract leaves them to us; `docs/carousel.md`):
//! - **Fast lane.** A new EMM is played `burst_count` times,
//!   `burst_interval` apart (at least: the next repetition is due
//!   `burst_interval` after the previous one actually went out), before
//!   anything of the cycle. Among due repetitions, the class decides
//!   (urgent > change > background), then the due time, then the id.
//! - **Cycle.** After its burst, an EMM joins the cycle of its class. One
//!   cycle (pass) plays every urgent EMM, then every change EMM, then every
//!   background EMM, each once, in round-robin order; then the cycle number
//!   goes up by one. An EMM added during a pass is played in that pass if
//!   the pass has not yet gone past its place, otherwise in the next one —
//!   never twice in a pass.
//! - **Expiry.** An EMM is expired when `now > not_after`. It is never
//!   played after that; it is dropped when the schedule reaches it (within
//!   one cycle, or at once with [`Schedule::purge_expired`]).
//!
//! Time is a `u64` on the caller's timeline (`now`, `not_after` and
//! `burst_interval` in the same unit). The [`crate::player`] uses
//! milliseconds since the Unix epoch, advanced by a monotonic clock.
//!
//! Costs: `insert` and `remove` are O(1) expected for EMMs in the cycle
//! (hash index + swap-remove in a chunked array) and O(log b) for the b EMMs
//! still bursting; `next` is O(1) amortised. Memory per EMM in the cycle:
//! one 48-byte slot (id, not_after, `Bytes` handle) in 4096-slot chunks plus
//! one 16-byte hash index bucket (+1 control byte); the section bytes
//! themselves are shared (`Bytes`) with every other output.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;

use crate::section::{Section, SectionError};

/// Priority class of an EMM, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Class {
    /// Must reach devices as fast as possible (e.g. a disable).
    Urgent = 0,
    /// A change of rights or keys.
    Change = 1,
    /// Refresh of the standing state.
    Background = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Urgent, Class::Change, Class::Background];

    pub fn from_u8(v: u8) -> Option<Class> {
        Class::ALL.get(usize::from(v)).copied()
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// One EMM as the schedule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emm {
    /// Unique per headend (the schedule refuses duplicates).
    pub id: u64,
    pub class: Class,
    /// Last instant at which it may be played, on the schedule's timeline.
    pub not_after: u64,
    /// One complete long-syntax section (checked on insert).
    pub section: Bytes,
}

/// Fast-lane settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Plays in the fast lane before joining the cycle (0 = straight to the cycle).
    pub burst_count: u8,
    /// Minimum spacing of those plays, in the timeline's unit.
    pub burst_interval: u64,
}

impl Default for ScheduleConfig {
    /// 3 plays, 1000 units apart (1 s on the player's millisecond timeline).
    fn default() -> Self {
        ScheduleConfig {
            burst_count: 3,
            burst_interval: 1000,
        }
    }
}

/// Where a play came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Fast lane, repetition 1..=burst_count.
    Burst { repetition: u8 },
    /// Regular cycle.
    Cycle,
}

/// One section chosen to go on air.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Played {
    pub id: u64,
    pub class: Class,
    /// The cycle (pass) in progress when it was played, from 0.
    pub cycle: u64,
    pub lane: Lane,
    pub section: Bytes,
}

/// Why an EMM was not inserted (the schedule is unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error("EMM {0} is already in the carousel")]
    DuplicateId(u64),
    #[error("EMM {id} expired (not_after {not_after} < now {now})")]
    Expired { id: u64, not_after: u64, now: u64 },
    #[error("EMM {id} is not a valid section: {error}")]
    InvalidSection { id: u64, error: SectionError },
    #[error("carousel full: at most {max} EMMs per class")]
    Full { max: usize },
}

/// Counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScheduleStats {
    pub inserted: u64,
    pub removed: u64,
    pub expired: u64,
    pub burst_plays: u64,
    pub cycle_plays: u64,
}

/// Hasher for EMM ids: ids are ours (from the database, increasing), not
/// attacker-chosen, so SipHash's flooding resistance buys nothing and costs
/// time on 10 million entries. A multiply-fold spreads sequential ids over
/// the high bits (hashbrown's control byte) and the low bits (bucket).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = (n ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// An EMM in the cycle. 48 bytes.
#[derive(Debug)]
struct Slot {
    id: u64,
    not_after: u64,
    section: Bytes,
}

/// An EMM in the fast lane.
#[derive(Debug)]
struct Burst {
    class: Class,
    not_after: u64,
    section: Bytes,
    plays_left: u8,
    due: u64,
}

/// Slots per chunk. Chunks instead of one Vec: no doubling spike (a 10M
/// Vec would briefly hold 2×480 MB while growing) and at most one partly
/// used chunk of slack per class.
const CHUNK: usize = 4096;

/// Position in `rings`: class in the top 2 bits, index in the low 30.
const INDEX_BITS: u32 = 30;
const MAX_PER_CLASS: usize = 1 << INDEX_BITS;

#[derive(Debug, Default)]
struct Ring {
    chunks: Vec<Vec<Slot>>,
    len: usize,
}

impl Ring {
    fn get(&self, i: usize) -> Option<&Slot> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }
    fn push(&mut self, slot: Slot) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(slot),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(slot);
                self.chunks.push(c);
            }
        }
        self.len += 1;
    }
    /// Removes slot `i`, moving the last slot into its place. Returns the
    /// removed slot and the id of the moved one (now at `i`), if any.
    fn swap_remove(&mut self, i: usize) -> Option<(Slot, Option<u64>)> {
        if i >= self.len {
            return None;
        }
        let last_chunk = self.chunks.last_mut()?;
        let last = last_chunk.pop()?;
        if last_chunk.is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if i == self.len {
            return Some((last, None));
        }
        let moved = last.id;
        let target = self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)?;
        Some((std::mem::replace(target, last), Some(moved)))
    }
    fn swap(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        let (lo, hi) = (a.min(b), a.max(b));
        let (ci, cj) = (lo / CHUNK, hi / CHUNK);
        if ci == cj {
            if let Some(c) = self.chunks.get_mut(ci) {
                c.swap(lo % CHUNK, hi % CHUNK);
            }
        } else {
            let (left, right) = self.chunks.split_at_mut(cj);
            if let (Some(x), Some(y)) = (
                left.get_mut(ci).and_then(|c| c.get_mut(lo % CHUNK)),
                right.first_mut().and_then(|c| c.get_mut(hi % CHUNK)),
            ) {
                std::mem::swap(x, y);
            }
        }
    }
    fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<Slot>>()
            + self.chunks.len() * CHUNK * std::mem::size_of::<Slot>()
    }
}

/// The carousel of one output. See the module documentation for the rules.
#[derive(Debug)]
pub struct Schedule {
    config: ScheduleConfig,
    /// EMMs in the cycle: id → packed (class, index).
    index: IdMap<u32>,
    rings: [Ring; 3],
    /// Next position of the pass in progress: (class, index).
    cursor: (usize, usize),
    cycle: u64,
    burst: IdMap<Burst>,
    burst_due: [BTreeSet<(u64, u64)>; 3],
    stats: ScheduleStats,
}

fn pack(class: usize, i: usize) -> u32 {
    ((class as u32) << INDEX_BITS) | i as u32
}
fn unpack(loc: u32) -> (usize, usize) {
    (
        (loc >> INDEX_BITS) as usize,
        (loc & ((1 << INDEX_BITS) - 1)) as usize,
    )
}

impl Schedule {
    pub fn new(config: ScheduleConfig) -> Self {
        Schedule {
            config,
            index: IdMap::default(),
            rings: Default::default(),
            cursor: (0, 0),
            cycle: 0,
            burst: IdMap::default(),
            burst_due: Default::default(),
            stats: ScheduleStats::default(),
        }
    }

    pub fn config(&self) -> ScheduleConfig {
        self.config
    }
    /// Live EMMs (fast lane and cycle; expired ones not yet reached count).
    pub fn len(&self) -> usize {
        self.index.len() + self.burst.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, id: u64) -> bool {
        self.index.contains_key(&id) || self.burst.contains_key(&id)
    }
    /// Live EMMs of `class` in the cycle and in the fast lane.
    pub fn class_len(&self, class: Class) -> usize {
        self.rings[class.index()].len + self.burst_due[class.index()].len()
    }
    /// EMMs still in the fast lane (not yet joined the cycle).
    pub fn fast_lane_len(&self) -> usize {
        self.burst.len()
    }
    /// Number of the pass in progress.
    pub fn cycle(&self) -> u64 {
        self.cycle
    }
    pub fn stats(&self) -> ScheduleStats {
        self.stats
    }

    /// Adds an EMM at time `now`; its first fast-lane play is due at once.
    pub fn insert(&mut self, emm: Emm, now: u64) -> Result<(), InsertError> {
        let Emm {
            id,
            class,
            not_after,
            section,
        } = emm;
        if self.contains(id) {
            return Err(InsertError::DuplicateId(id));
        }
        if not_after < now {
            return Err(InsertError::Expired { id, not_after, now });
        }
        if let Err(error) = Section::parse(&section) {
            return Err(InsertError::InvalidSection { id, error });
        }
        if self.rings[class.index()].len >= MAX_PER_CLASS - 1 {
            return Err(InsertError::Full {
                max: MAX_PER_CLASS - 1,
            });
        }
        self.stats.inserted += 1;
        if self.config.burst_count == 0 {
            self.join_cycle(id, class, not_after, section);
            return Ok(());
        }
        self.burst_due[class.index()].insert((now, id));
        self.burst.insert(
            id,
            Burst {
                class,
                not_after,
                section,
                plays_left: self.config.burst_count,
                due: now,
            },
        );
        Ok(())
    }

    fn join_cycle(&mut self, id: u64, class: Class, not_after: u64, section: Bytes) {
        let ring = &mut self.rings[class.index()];
        self.index.insert(id, pack(class.index(), ring.len));
        ring.push(Slot {
            id,
            not_after,
            section,
        });
    }

    /// Removes an EMM; false if it was not there.
    pub fn remove(&mut self, id: u64) -> bool {
        if let Some(b) = self.burst.remove(&id) {
            self.burst_due[b.class.index()].remove(&(b.due, id));
            self.stats.removed += 1;
            return true;
        }
        match self.index.get(&id) {
            Some(&loc) => {
                let (class, i) = unpack(loc);
                self.remove_at(class, i);
                self.stats.removed += 1;
                true
            }
            None => false,
        }
    }

    /// Removes the slot at (class, i) keeping the pass invariant: slots
    /// before the cursor (in the cursor's ring) are the ones already played
    /// in this pass, slots from the cursor on are still to play.
    fn remove_at(&mut self, class: usize, i: usize) {
        let (cc, ci) = self.cursor;
        let ring = &mut self.rings[class];
        if class == cc && i < ci {
            // Fill the hole with the last played slot, then let the last
            // slot (unplayed) take that place, which becomes the cursor.
            let k = ci - 1;
            ring.swap(i, k);
            if let Some(id) = ring.get(i).map(|s| s.id) {
                self.index.insert(id, pack(class, i));
            }
            self.cursor.1 = k;
            self.remove_swap(class, k);
        } else {
            self.remove_swap(class, i);
        }
    }

    fn remove_swap(&mut self, class: usize, i: usize) {
        if let Some((removed, moved)) = self.rings[class].swap_remove(i) {
            self.index.remove(&removed.id);
            if let Some(id) = moved {
                self.index.insert(id, pack(class, i));
            }
        }
    }

    /// The next section to play at `now`, or `None` when nothing is due
    /// (the cycle is empty and no fast-lane play is due yet).
    pub fn next(&mut self, now: u64) -> Option<Played> {
        if let Some(p) = self.next_burst(now) {
            return Some(p);
        }
        loop {
            let (class, i) = self.cursor;
            let Some(slot) = self.rings.get(class).and_then(|r| r.get(i)) else {
                if class + 1 < self.rings.len() {
                    self.cursor = (class + 1, 0);
                    continue;
                }
                // End of a pass.
                self.cursor = (0, 0);
                if self.rings.iter().all(|r| r.len == 0) {
                    return None;
                }
                self.cycle += 1;
                continue;
            };
            if slot.not_after < now {
                self.stats.expired += 1;
                self.remove_swap(class, i);
                continue;
            }
            let played = Played {
                id: slot.id,
                class: Class::ALL[class],
                cycle: self.cycle,
                lane: Lane::Cycle,
                section: slot.section.clone(),
            };
            self.cursor.1 += 1;
            self.stats.cycle_plays += 1;
            return Some(played);
        }
    }

    fn next_burst(&mut self, now: u64) -> Option<Played> {
        for class in Class::ALL {
            let queue = &mut self.burst_due[class.index()];
            while let Some(&(due, id)) = queue.first() {
                if due > now {
                    break;
                }
                queue.pop_first();
                let Some(b) = self.burst.get_mut(&id) else {
                    continue;
                };
                if b.not_after < now {
                    self.burst.remove(&id);
                    self.stats.expired += 1;
                    continue;
                }
                b.plays_left -= 1;
                let played = Played {
                    id,
                    class,
                    cycle: self.cycle,
                    lane: Lane::Burst {
                        repetition: self.config.burst_count - b.plays_left,
                    },
                    section: b.section.clone(),
                };
                if b.plays_left > 0 {
                    b.due = now.saturating_add(self.config.burst_interval);
                    queue.insert((b.due, id));
                } else if let Some(b) = self.burst.remove(&id) {
                    self.join_cycle(id, class, b.not_after, b.section);
                }
                self.stats.burst_plays += 1;
                return Some(played);
            }
        }
        None
    }

    /// When [`Schedule::next`] will next have something: `Some(0)` (i.e.
    /// now, whatever now is) while the cycle is not empty, else the first
    /// fast-lane due time, else `None`.
    pub fn next_due(&self) -> Option<u64> {
        if self.rings.iter().any(|r| r.len > 0) {
            return Some(0);
        }
        self.burst_due
            .iter()
            .filter_map(|q| q.first().map(|&(due, _)| due))
            .min()
    }

    /// Drops every expired EMM now (O(n)); returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let before = self.len();
        let expired: Vec<u64> = self
            .burst
            .iter()
            .filter(|(_, b)| b.not_after < now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove(id);
        }
        for class in 0..self.rings.len() {
            let mut i = 0;
            while let Some(slot) = self.rings[class].get(i) {
                if slot.not_after < now {
                    // remove_at keeps the pass invariant; the slot moved into
                    // `i` (if any) is examined next.
                    self.remove_at(class, i);
                } else {
                    i += 1;
                }
            }
        }
        let n = before - self.len();
        self.stats.removed -= self.stats.removed.min(n as u64);
        self.stats.expired += n as u64;
        n
    }

    /// Heap bytes held by the schedule's own structures (slots, index,
    /// fast lane), from capacities; the section bytes are not counted.
    pub fn heap_bytes(&self) -> usize {
        let slots: usize = self.rings.iter().map(Ring::heap_bytes).sum();
        // hashbrown: one (key, value) bucket plus one control byte per
        // bucket; buckets ≈ capacity × 8/7.
        let index = self.index.capacity() * 8 / 7 * (std::mem::size_of::<(u64, u32)>() + 1);
        let burst = self.burst.capacity() * 8 / 7 * (std::mem::size_of::<(u64, Burst)>() + 1)
            + self.burst.len() * 3 * std::mem::size_of::<(u64, u64)>();
        slots + index + burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{build, LongHeader, TableId};

    fn emm(id: u64, class: Class, not_after: u64) -> Emm {
        let section = build(
            &LongHeader::private(TableId::EMM_UNIQUE, id as u16),
            &id.to_be_bytes(),
        )
        .unwrap();
        Emm {
            id,
            class,
            not_after,
            section: Bytes::from(section),
        }
    }

    /// Plays until the pass number changes; the first play of the next
    /// pass is returned separately so it is not lost.
    fn drain_pass(s: &mut Schedule, now: u64) -> (Vec<u64>, Option<Played>) {
        let c = s.cycle();
        let mut ids = Vec::new();
        while let Some(p) = s.next(now) {
            if p.cycle != c {
                return (ids, Some(p));
            }
            ids.push(p.id);
            assert!(ids.len() < 100_000);
        }
        (ids, None)
    }

    #[test]
    fn slot_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    #[test]
    fn rejects_bad_inserts_without_change() {
        let mut s = Schedule::new(ScheduleConfig::default());
        s.insert(emm(1, Class::Change, 100), 0).unwrap();
        assert_eq!(
            s.insert(emm(1, Class::Urgent, 100), 0),
            Err(InsertError::DuplicateId(1))
        );
        assert_eq!(
            s.insert(emm(2, Class::Urgent, 5), 6),
            Err(InsertError::Expired {
                id: 2,
                not_after: 5,
                now: 6
            })
        );
        let mut bad = emm(3, Class::Urgent, 100);
        bad.section = Bytes::from_static(&[0x82, 0xF0, 0x00]);
        assert!(matches!(
            s.insert(bad, 0),
            Err(InsertError::InvalidSection { id: 3, .. })
        ));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn remove_during_pass_keeps_each_once() {
        let cfg = ScheduleConfig {
            burst_count: 0,
            burst_interval: 0,
        };
        let mut s = Schedule::new(cfg);
        for id in 0..10 {
            s.insert(emm(id, Class::Background, u64::MAX), 0).unwrap();
        }
        // Play 5, then remove two already played and one not yet played.
        let first: Vec<u64> = (0..5).map(|_| s.next(0).unwrap().id).collect();
        assert!(s.remove(first[1]));
        assert!(s.remove(first[3]));
        assert!(s.remove(8));
        assert!(!s.remove(8));
        let (rest, next) = drain_pass(&mut s, 0);
        let mut all: Vec<u64> = first.iter().chain(rest.iter()).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5, 6, 7, 9]);
        // Next pass: exactly the 7 survivors.
        let (mut pass, _) = drain_pass(&mut s, 0);
        pass.push(next.unwrap().id);
        pass.sort();
        assert_eq!(pass, vec![0, 2, 4, 5, 6, 7, 9]);
    }

    #[test]
    fn purge_expired_removes_only_expired() {
        let cfg = ScheduleConfig {
            burst_count: 0,
            burst_interval: 0,
        };
        let mut s = Schedule::new(cfg);
        for id in 0..20 {
            s.insert(
                emm(
                    id,
                    Class::ALL[(id % 3) as usize],
                    if id % 2 == 0 { 10 } else { 100 },
                ),
                0,
            )
            .unwrap();
        }
        for _ in 0..7 {
            s.next(0).unwrap();
        }
        assert_eq!(s.purge_expired(50), 10);
        assert_eq!(s.len(), 10);
        let (mut pass, next) = drain_pass(&mut s, 50);
        pass.extend(next.map(|p| p.id));
        pass.extend(drain_pass(&mut s, 50).0);
        pass.sort();
        pass.dedup();
        assert_eq!(pass, (0..20).filter(|i| i % 2 == 1).collect::<Vec<_>>());
    }
}
