//! Carousel schedule behaviour: fast lane, bursts, classes, expiry, removal,
//! one play per live EMM per cycle.

use std::collections::{BTreeMap, BTreeSet};

use carousel::schedule::{Class, Emm, Lane, Played, Schedule, ScheduleConfig};
use proptest::prelude::*;

use crate::common;

/// A 20-byte EMM section carrying its id (the body is the id alone).
fn emm(id: u64, class: Class, not_after: u64) -> Emm {
    common::emm(id, class, not_after, 20)
}

const NO_BURST: ScheduleConfig = ScheduleConfig {
    burst_count: 0,
    burst_interval: 0,
};

#[test]
fn new_emm_goes_first_and_bursts_with_spacing() {
    let mut s = Schedule::new(ScheduleConfig {
        burst_count: 3,
        burst_interval: 100,
    });
    for id in 0..5 {
        s.insert(emm(id, Class::Background, u64::MAX), 0).unwrap();
    }
    // Let the five initial bursts finish: plays at t=0, 100, 200.
    let mut t = 0;
    let mut log: Vec<(u64, Played)> = Vec::new();
    while t <= 300 {
        while let Some(p) = s.next(t) {
            let fresh_due = matches!(p.lane, Lane::Cycle);
            log.push((t, p));
            if fresh_due {
                break; // one cycle play per tick keeps the log short
            }
        }
        t += 10;
    }
    // The new EMM 99 arrives at t=1000 while the cycle is busy: its first
    // play is the very next one.
    s.insert(emm(99, Class::Background, u64::MAX), 1000)
        .unwrap();
    let p = s.next(1000).unwrap();
    assert_eq!((p.id, p.lane), (99, Lane::Burst { repetition: 1 }));
    // Not again before 1100 although the cycle goes on.
    for t in 1001..1100 {
        let p = s.next(t).unwrap();
        assert_ne!(p.id, 99, "repetition too early at {t}");
    }
    let p = s.next(1100).unwrap();
    assert_eq!((p.id, p.lane), (99, Lane::Burst { repetition: 2 }));
    // A late call: spacing is measured from the actual play.
    let p = s.next(1250).unwrap();
    assert_eq!((p.id, p.lane), (99, Lane::Burst { repetition: 3 }));
    assert!((1251..1400).all(|t| s.next(t).unwrap().lane == Lane::Cycle));
    // Each initial EMM got exactly 3 burst plays, spaced ≥ 100.
    for id in 0..5 {
        let times: Vec<u64> = log
            .iter()
            .filter(|(_, p)| p.id == id && matches!(p.lane, Lane::Burst { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(times.len(), 3, "EMM {id}");
        assert!(times.windows(2).all(|w| w[1] - w[0] >= 100), "{times:?}");
    }
}

#[test]
fn class_priority_in_fast_lane_and_cycle() {
    let mut s = Schedule::new(ScheduleConfig {
        burst_count: 1,
        burst_interval: 10,
    });
    s.insert(emm(1, Class::Background, u64::MAX), 0).unwrap();
    s.insert(emm(2, Class::Change, u64::MAX), 0).unwrap();
    s.insert(emm(3, Class::Urgent, u64::MAX), 0).unwrap();
    s.insert(emm(4, Class::Change, u64::MAX), 0).unwrap();
    let burst: Vec<u64> = (0..4).map(|_| s.next(0).unwrap().id).collect();
    assert_eq!(burst, vec![3, 2, 4, 1]);
    // Cycle order: urgent, change, background.
    let pass: Vec<(u64, Class)> = (0..4)
        .map(|_| s.next(0).unwrap())
        .map(|p| (p.id, p.class))
        .collect();
    assert_eq!(pass[0], (3, Class::Urgent));
    assert_eq!(pass[3], (1, Class::Background));
    assert!(pass[1..3].iter().all(|(_, c)| *c == Class::Change));
}

#[test]
fn expired_emms_are_dropped_and_never_played() {
    let mut s = Schedule::new(ScheduleConfig {
        burst_count: 2,
        burst_interval: 50,
    });
    s.insert(emm(1, Class::Urgent, 60), 0).unwrap();
    s.insert(emm(2, Class::Urgent, 1_000), 0).unwrap();
    assert_eq!(s.next(0).unwrap().id, 1);
    assert_eq!(s.next(0).unwrap().id, 2);
    // EMM 1 expires before its second repetition.
    assert_eq!(s.next(61).map(|p| p.id), Some(2));
    assert_eq!(s.len(), 1);
    for t in 62..1000 {
        assert_eq!(s.next(t).unwrap().id, 2);
    }
    assert!(s.next(1001).is_none());
    assert!(s.is_empty());
    assert_eq!(s.stats().expired, 2);
}

#[test]
fn remove_works_in_both_lanes() {
    let mut s = Schedule::new(ScheduleConfig {
        burst_count: 2,
        burst_interval: 10,
    });
    s.insert(emm(1, Class::Urgent, u64::MAX), 0).unwrap();
    s.insert(emm(2, Class::Urgent, u64::MAX), 0).unwrap();
    assert!(s.remove(1)); // still in the fast lane
    assert_eq!(s.next(0).unwrap().id, 2);
    assert_eq!(s.next(10).unwrap().id, 2);
    assert_eq!(s.next(10).unwrap().lane, Lane::Cycle);
    assert!(s.remove(2)); // in the cycle
    assert!(!s.remove(2));
    assert!(s.next(20).is_none());
    assert!(s.is_empty());
    assert_eq!(s.next_due(), None);
}

#[test]
fn every_live_emm_once_per_cycle_and_cycle_numbers() {
    let mut s = Schedule::new(NO_BURST);
    for id in 0..1000 {
        s.insert(emm(id, Class::ALL[(id % 3) as usize], u64::MAX), 0)
            .unwrap();
    }
    let mut per_cycle: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for _ in 0..5000 {
        let p = s.next(0).unwrap();
        per_cycle.entry(p.cycle).or_default().push(p.id);
    }
    assert_eq!(per_cycle.len(), 5);
    for (cycle, mut ids) in per_cycle {
        ids.sort();
        assert_eq!(ids, (0..1000).collect::<Vec<_>>(), "cycle {cycle}");
    }
}

#[test]
fn next_due_reports_the_fast_lane_when_cycle_empty() {
    let mut s = Schedule::new(ScheduleConfig {
        burst_count: 2,
        burst_interval: 40,
    });
    assert_eq!(s.next_due(), None);
    s.insert(emm(1, Class::Change, u64::MAX), 5).unwrap();
    assert_eq!(s.next_due(), Some(5));
    s.next(5).unwrap();
    assert_eq!(s.next_due(), Some(45));
    assert!(s.next(44).is_none());
    s.next(45).unwrap();
    assert_eq!(s.next_due(), Some(0)); // in the cycle: always something
}

#[derive(Clone, Debug)]
enum Op {
    Insert { class: u8, ttl: u64 },
    Remove(usize),
    Play(u8),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u64..500).prop_map(|(class, ttl)| Op::Insert { class, ttl }),
        1 => any::<usize>().prop_map(Op::Remove),
        4 => (1u8..20).prop_map(Op::Play),
        1 => (0u64..50).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Against a model: nothing expired or removed is played, nothing is
    /// played twice in a pass, bursts are spaced, and an EMM live in the
    /// cycle for a whole pass is played in it.
    #[test]
    fn schedule_model(ops in proptest::collection::vec(op(), 1..300), burst_count in 0u8..4) {
        let cfg = ScheduleConfig { burst_count, burst_interval: 20 };
        let mut s = Schedule::new(cfg);
        let mut now = 0u64;
        let mut next_id = 0u64;
        let mut live: BTreeMap<u64, u64> = BTreeMap::new(); // id -> not_after
        let mut last_burst: BTreeMap<u64, (u8, u64)> = BTreeMap::new();
        let mut in_cycle_since: BTreeMap<u64, u64> = BTreeMap::new(); // id -> first cycle it may be played in full
        let mut pass_seen: BTreeSet<u64> = BTreeSet::new();
        let mut pass = s.cycle();
        for op in ops {
            match op {
                Op::Insert { class, ttl } => {
                    let id = next_id;
                    next_id += 1;
                    s.insert(emm(id, Class::from_u8(class).unwrap(), now + ttl), now).unwrap();
                    live.insert(id, now + ttl);
                    if burst_count == 0 {
                        in_cycle_since.insert(id, s.cycle() + 1);
                    }
                }
                Op::Remove(k) => {
                    if let Some(&id) = live.keys().nth(k % live.len().max(1)) {
                        prop_assert!(s.remove(id));
                        live.remove(&id);
                        in_cycle_since.remove(&id);
                    }
                }
                Op::Advance(dt) => now += dt,
                Op::Play(n) => for _ in 0..n {
                    let Some(p) = s.next(now) else { break };
                    let not_after = live.get(&p.id).copied();
                    prop_assert!(not_after.is_some_and(|na| na >= now), "played {} removed/expired", p.id);
                    if p.cycle != pass {
                        // A pass ended: everything in the cycle for all of it was played.
                        for (&id, &since) in &in_cycle_since {
                            if since <= pass && live.get(&id).is_some_and(|na| *na >= now) {
                                prop_assert!(pass_seen.contains(&id), "EMM {} missed in pass {}", id, pass);
                            }
                        }
                        pass = p.cycle;
                        pass_seen.clear();
                    }
                    match p.lane {
                        Lane::Cycle => {
                            prop_assert!(pass_seen.insert(p.id), "EMM {} twice in pass {}", p.id, pass);
                        }
                        Lane::Burst { repetition } => {
                            if let Some((r, t)) = last_burst.get(&p.id) {
                                prop_assert_eq!(repetition, r + 1);
                                prop_assert!(now - t >= 20);
                            } else {
                                prop_assert_eq!(repetition, 1);
                            }
                            last_burst.insert(p.id, (repetition, now));
                            if repetition == burst_count {
                                in_cycle_since.insert(p.id, p.cycle + 1);
                            }
                        }
                    }
                }
            }
            live.retain(|_, na| *na >= now);
            prop_assert!(s.len() >= live.len());
        }
    }
}
