//! The middle step of a group-commit round, pure: given what the round's
//! reads found (and locked), what each command does. Accepted (with its
//! work item, which also says the state change), refused, or replayed
//! (the same transaction_id with the same command was accepted before: its
//! stored reply). No database here: `round.rs` reads before and writes
//! after, and the tests below check every refusal without MariaDB.
//!
//! Each command is decided against the state as the round found it: a
//! round holds at most one command per device and per (sender,
//! transaction_id) (`store::pick_round`), so no command of the round can
//! change what another one finds.

use std::collections::{HashMap, HashSet};

use super::error::SmsError;
use super::store::{Accepted, Submission, DEFAULT_OSM_LIFETIME_S};
use super::types::{SmsCommand, Target};
use crate::queue::Work;

/// A device's row as the round found (and locked) it.
#[derive(Clone, Debug)]
pub(super) struct DeviceRow {
    pub enabled: bool,
    pub group_id: Option<u32>,
    pub slot: Option<u8>,
    pub pmk_version: u32,
}

/// An `idempotency` row (with its request's stored reply).
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub body_sha256: Vec<u8>,
    pub request_id: u64,
    pub response: Option<String>,
}

/// What a round's reads found.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// The PMK version new devices' DUKs derive from.
    pub pmk_version: u32,
    /// One `sms_request_ids` value per command, in order.
    pub request_ids: Vec<u64>,
    pub devices: HashMap<u64, DeviceRow>,
    /// Free slots, lowest first, locked by this round: as many as the
    /// round has adddevice (fewer when there are not enough).
    pub free_slots: Vec<(u32, u8)>,
    /// The groups named by the round's OSMs that exist.
    pub known_groups: HashSet<u32>,
    /// (device, product) active entitlements of the round's removals.
    pub active: HashSet<(u64, u32)>,
    /// Idempotency rows found, by command index (read only when the round
    /// looks them up first).
    pub stored: HashMap<usize, Stored>,
}

/// What one command of a round does.
#[derive(Debug)]
pub(super) enum Plan {
    /// Answered without a change (refused, or a replay).
    Answer(Result<Accepted, SmsError>),
    /// Accepted: its work item.
    Accept(Work),
}

/// One accepted command: what the round writes for it.
#[derive(Debug)]
pub(super) struct Write {
    /// Its index in the round.
    pub index: usize,
    pub work: Work,
    pub request_id: u64,
    /// The 200 body, also stored in its `sms_requests` row.
    pub reply: String,
}

/// The round decided: every command's answer (valid once the writes
/// commit) and the writes.
#[derive(Debug)]
pub(super) struct Decided {
    pub answers: Vec<Result<Accepted, SmsError>>,
    pub writes: Vec<Write>,
}

/// Every command of the round against what the round found.
pub(super) fn decide(
    cmds: &[&Submission],
    shas: &[[u8; 32]],
    found: &Found,
    now_unix: u32,
) -> Vec<Plan> {
    cmds.iter()
        .enumerate()
        .map(|(i, s)| match found.stored.get(&i) {
            Some(stored) => replay(stored, &shas[i]),
            None => against_state(&s.req.command, found, now_unix),
        })
        .collect()
}

/// A command whose transaction_id was used before: the stored reply when
/// the command is the same (same canonical SHA-256), else a refusal.
pub(super) fn replay(stored: &Stored, sha: &[u8; 32]) -> Plan {
    Plan::Answer(match &stored.response {
        _ if stored.body_sha256.as_slice() != sha.as_slice() => Err(SmsError::TransactionReused),
        Some(reply) if !reply.is_empty() => Ok(Accepted::Replay {
            original_id: stored.request_id,
            reply: reply.clone(),
        }),
        _ => Err(SmsError::Internal(format!(
            "idempotency row of request {} has no stored reply",
            stored.request_id
        ))),
    })
}

/// One command against the state (an adddevice's slot is given later, by
/// [`settle`], once the number needed is known).
fn against_state(cmd: &SmsCommand, found: &Found, now_unix: u32) -> Plan {
    let enabled = |d: u64| found.devices.get(&d).is_some_and(|r| r.enabled);
    let refuse = |e: SmsError| Plan::Answer(Err(e));
    match cmd {
        SmsCommand::AddDevice { device_id } => match found.devices.get(&device_id.get()) {
            Some(r) if r.enabled => refuse(SmsError::DeviceExists(device_id.get())),
            // Re-adding a removed device enables it again with a new slot;
            // its PMK version (burned into the card) is kept and its old
            // entitlements stay ended.
            r => Plan::Accept(Work::AddDevice {
                device_id: *device_id,
                group_id: 0,
                slot: 0,
                pmk_version: r.map_or(found.pmk_version, |r| r.pmk_version),
                reenabled: r.is_some(),
                bulk: false,
            }),
        },
        SmsCommand::RemoveDevice { device_id } => match found.devices.get(&device_id.get()) {
            Some(r) if r.enabled => Plan::Accept(Work::RemoveDevice {
                device_id: *device_id,
                group_id: r.group_id,
                slot: r.slot,
            }),
            _ => refuse(SmsError::UnknownDevice(device_id.get())),
        },
        // A removed (disabled) device is unknown to the SMS until re-added.
        SmsCommand::AddEntitlement { device_id, .. }
        | SmsCommand::RemoveEntitlement { device_id, .. }
            if !enabled(device_id.get()) =>
        {
            refuse(SmsError::UnknownDevice(device_id.get()))
        }
        SmsCommand::AddEntitlement {
            device_id,
            product_id,
            start,
            end,
        } => Plan::Accept(Work::AddEntitlement {
            device_id: *device_id,
            product_id: *product_id,
            start: start.0,
            end: end.0,
            bulk: false,
        }),
        SmsCommand::RemoveEntitlement {
            device_id,
            product_id,
        } => Plan::Accept(Work::RemoveEntitlement {
            device_id: *device_id,
            product_id: *product_id,
            was_active: found.active.contains(&(device_id.get(), product_id.get())),
        }),
        SmsCommand::GenerateOsm { .. } => osm(cmd, found, now_unix),
    }
}

fn osm(cmd: &SmsCommand, found: &Found, now_unix: u32) -> Plan {
    let SmsCommand::GenerateOsm {
        target,
        text,
        duration_s,
        forced,
        expires_at,
    } = cmd
    else {
        return Plan::Answer(Err(SmsError::Internal("not an OSM".into())));
    };
    let refuse = |e: SmsError| Plan::Answer(Err(e));
    match (expires_at, target) {
        (Some(t), _) if t.0 <= now_unix => refuse(SmsError::AlreadyExpired),
        (_, Target::Device(d)) if !found.devices.get(&d.get()).is_some_and(|r| r.enabled) => {
            refuse(SmsError::UnknownDevice(d.get()))
        }
        (_, Target::Group(g)) if !found.known_groups.contains(&g.get()) => {
            refuse(SmsError::UnknownGroup(g.get()))
        }
        (e, _) => Plan::Accept(Work::GenerateOsm {
            target: *target,
            text: text.as_str().to_owned(),
            duration_s: *duration_s,
            forced: *forced,
            not_after: e
                .map(|t| t.0)
                .unwrap_or_else(|| now_unix.saturating_add(DEFAULT_OSM_LIFETIME_S)),
        }),
    }
}

/// The commands refused against the state. When the round did not look
/// the idempotency keys up first, a replay of an accepted command looks
/// like one of these (its device exists, or is gone): their keys are
/// looked up, and [`apply_replays`] answers the ones found.
pub(super) fn refused(plans: &[Plan]) -> Vec<usize> {
    (0..plans.len())
        .filter(|i| matches!(plans[*i], Plan::Answer(Err(_))))
        .collect()
}

/// Replaces the plans of the commands whose idempotency row was found.
pub(super) fn apply_replays(
    plans: &mut [Plan],
    stored: &HashMap<usize, Stored>,
    shas: &[[u8; 32]],
) {
    for (i, s) in stored {
        if let Some(p) = plans.get_mut(*i) {
            *p = replay(s, &shas[*i]);
        }
    }
}

/// Gives the (re-)enabled devices their slots, in arrival order, and
/// writes each accepted command's reply. `Err(n)`: the round needs `n`
/// free slots and found fewer (it is rolled back, slots are created, and
/// it is run again).
pub(super) fn settle(
    plans: Vec<Plan>,
    free_slots: &[(u32, u8)],
    request_ids: &[u64],
    cmds: &[&Submission],
) -> Result<Decided, usize> {
    let need = plans
        .iter()
        .filter(|p| matches!(p, Plan::Accept(Work::AddDevice { .. })))
        .count();
    if free_slots.len() < need {
        return Err(need);
    }
    let mut slots = free_slots.iter();
    let mut answers = Vec::with_capacity(plans.len());
    let mut writes = Vec::new();
    for (index, plan) in plans.into_iter().enumerate() {
        let mut work = match plan {
            Plan::Answer(a) => {
                answers.push(a);
                continue;
            }
            Plan::Accept(w) => w,
        };
        if let Work::AddDevice { group_id, slot, .. } = &mut work {
            // Counted above: one free slot per adddevice.
            (*group_id, *slot) = slots.next().copied().unwrap_or_default();
        }
        let request_id = request_ids.get(index).copied().unwrap_or_default();
        let reply = accepted_reply(request_id, cmds[index].req.transaction_id.as_str());
        answers.push(Ok(Accepted::New {
            request_id,
            reply: reply.clone(),
        }));
        writes.push(Write {
            index,
            work,
            request_id,
            reply,
        });
    }
    Ok(Decided { answers, writes })
}

/// The 200 body of an accepted command (docs/sms-api.md).
pub(super) fn accepted_reply(request_id: u64, transaction_id: &str) -> String {
    format!(
        "{{\"request_id\":{request_id},\"status\":\"accepted\",\"transaction_id\":{}}}",
        serde_json::Value::from(transaction_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sms::types::{parse_command, CommandKind};

    const NOW: u32 = 1_700_000_000;

    fn sub(kind: CommandKind, body: &str) -> Submission {
        Submission {
            sender: "sms".into(),
            path: kind.path(),
            message: body.into(),
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            req: parse_command(kind, body.as_bytes(), 1024).expect("valid command"),
            bulk: None,
        }
    }

    /// One adddevice per (transaction_id as JSON text, device).
    fn adddevices(cmds: &[(&str, u64)]) -> Vec<Submission> {
        cmds.iter()
            .map(|(tid, d)| {
                let body = format!(r#"{{"transaction_id":"{tid}","device_id":{d}}}"#);
                sub(CommandKind::AddDevice, &body)
            })
            .collect()
    }

    fn shas_of(subs: &[Submission]) -> Vec<[u8; 32]> {
        subs.iter().map(|s| s.req.canonical_sha256()).collect()
    }

    fn dev(enabled: bool, pmk_version: u32) -> DeviceRow {
        DeviceRow {
            enabled,
            group_id: enabled.then_some(3),
            slot: enabled.then_some(7),
            pmk_version,
        }
    }

    /// One command decided against `found`.
    fn one(s: &Submission, found: &Found) -> Plan {
        let sha = s.req.canonical_sha256();
        decide(&[s], &[sha], found, NOW).pop().expect("one plan")
    }

    fn refusal(p: Plan) -> SmsError {
        match p {
            Plan::Answer(Err(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn work(p: Plan) -> Work {
        match p {
            Plan::Accept(w) => w,
            other => panic!("expected an acceptance, got {other:?}"),
        }
    }

    fn found_with(devices: &[(u64, DeviceRow)]) -> Found {
        Found {
            pmk_version: 4,
            devices: devices.iter().cloned().collect(),
            ..Found::default()
        }
    }

    #[test]
    fn adddevice_new_readded_and_existing() {
        let add = sub(
            CommandKind::AddDevice,
            r#"{"transaction_id":"t","device_id":9}"#,
        );
        let w = work(one(&add, &found_with(&[])));
        assert!(matches!(
            w,
            Work::AddDevice {
                pmk_version: 4,
                reenabled: false,
                bulk: false,
                ..
            }
        ));
        // A removed device keeps the PMK version burned into its card.
        let w = work(one(&add, &found_with(&[(9, dev(false, 2))])));
        assert!(matches!(
            w,
            Work::AddDevice {
                pmk_version: 2,
                reenabled: true,
                bulk: false,
                ..
            }
        ));
        let e = refusal(one(&add, &found_with(&[(9, dev(true, 2))])));
        assert!(matches!(e, SmsError::DeviceExists(9)));
    }

    #[test]
    fn removedevice_frees_its_slot_or_is_unknown() {
        let rm = sub(
            CommandKind::RemoveDevice,
            r#"{"transaction_id":"t","device_id":9}"#,
        );
        let w = work(one(&rm, &found_with(&[(9, dev(true, 1))])));
        assert!(matches!(
            w,
            Work::RemoveDevice {
                group_id: Some(3),
                slot: Some(7),
                ..
            }
        ));
        for found in [found_with(&[]), found_with(&[(9, dev(false, 1))])] {
            assert!(matches!(
                refusal(one(&rm, &found)),
                SmsError::UnknownDevice(9)
            ));
        }
    }

    #[test]
    fn entitlements_need_an_enabled_device() {
        let add = sub(
            CommandKind::AddEntitlement,
            r#"{"transaction_id":"t","device_id":9,"product_id":5,"start":1,"end":2}"#,
        );
        let rm = sub(
            CommandKind::RemoveEntitlement,
            r#"{"transaction_id":"t","device_id":9,"product_id":5}"#,
        );
        for s in [&add, &rm] {
            for found in [found_with(&[]), found_with(&[(9, dev(false, 1))])] {
                assert!(matches!(
                    refusal(one(s, &found)),
                    SmsError::UnknownDevice(9)
                ));
            }
        }
        let mut found = found_with(&[(9, dev(true, 1))]);
        assert!(matches!(
            work(one(&add, &found)),
            Work::AddEntitlement {
                start: 1,
                end: 2,
                bulk: false,
                ..
            }
        ));
        assert!(matches!(
            work(one(&rm, &found)),
            Work::RemoveEntitlement {
                was_active: false,
                ..
            }
        ));
        found.active.insert((9, 5));
        assert!(matches!(
            work(one(&rm, &found)),
            Work::RemoveEntitlement {
                was_active: true,
                ..
            }
        ));
    }

    #[test]
    fn osm_refusals_and_default_lifetime() {
        let osm = |target: &str, extra: &str| {
            sub(
                CommandKind::GenerateOsm,
                &format!(r#"{{"transaction_id":"t",{target},"text":"hi","duration_s":5{extra}}}"#),
            )
        };
        let mut found = found_with(&[(9, dev(true, 1)), (8, dev(false, 1))]);
        found.known_groups.insert(2);
        let expired = osm(r#""all":true"#, &format!(r#","expires_at":{NOW}"#));
        assert!(matches!(
            refusal(one(&expired, &found)),
            SmsError::AlreadyExpired
        ));
        assert!(matches!(
            refusal(one(&osm(r#""device_id":8"#, ""), &found)),
            SmsError::UnknownDevice(8)
        ));
        assert!(matches!(
            refusal(one(&osm(r#""group_id":1"#, ""), &found)),
            SmsError::UnknownGroup(1)
        ));
        for target in [r#""device_id":9"#, r#""group_id":2"#, r#""all":true"#] {
            let w = work(one(&osm(target, ""), &found));
            assert!(
                matches!(w, Work::GenerateOsm { not_after, .. } if not_after == NOW + DEFAULT_OSM_LIFETIME_S),
                "{target}"
            );
        }
        let later = osm(r#""all":true"#, &format!(r#","expires_at":{}"#, NOW + 1));
        assert!(matches!(
            work(one(&later, &found)),
            Work::GenerateOsm { not_after, .. } if not_after == NOW + 1
        ));
    }

    #[test]
    fn a_stored_key_replays_or_is_refused_as_reused() {
        let add = sub(
            CommandKind::AddDevice,
            r#"{"transaction_id":"t","device_id":9}"#,
        );
        let sha = add.req.canonical_sha256();
        let stored = |body_sha256: Vec<u8>, response: Option<&str>| Stored {
            body_sha256,
            request_id: 41,
            response: response.map(str::to_owned),
        };
        // The same command: its stored reply, whatever the state says now.
        let mut found = found_with(&[(9, dev(true, 1))]);
        found
            .stored
            .insert(0, stored(sha.to_vec(), Some("{\"request_id\":41}")));
        match one(&add, &found) {
            Plan::Answer(Ok(Accepted::Replay { original_id, reply })) => {
                assert_eq!((original_id, reply.as_str()), (41, "{\"request_id\":41}"))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        // Another command under the same key.
        found.stored.insert(0, stored(vec![0; 32], Some("{}")));
        assert!(matches!(
            refusal(one(&add, &found)),
            SmsError::TransactionReused
        ));
        // A key without its reply is a broken invariant, not a replay.
        found.stored.insert(0, stored(sha.to_vec(), None));
        assert!(matches!(refusal(one(&add, &found)), SmsError::Internal(_)));
    }

    #[test]
    fn refused_commands_are_looked_up_and_replays_replace_them() {
        let subs = adddevices(&[("a", 1), ("b", 2)]);
        let cmds: Vec<&Submission> = subs.iter().collect();
        let shas = shas_of(&subs);
        // Device 2 exists: a replay of its adddevice looks like a refusal.
        let found = found_with(&[(2, dev(true, 1))]);
        let mut plans = decide(&cmds, &shas, &found, NOW);
        assert_eq!(refused(&plans), vec![1]);
        let stored = HashMap::from([(
            1,
            Stored {
                body_sha256: shas[1].to_vec(),
                request_id: 7,
                response: Some("{\"request_id\":7}".into()),
            },
        )]);
        apply_replays(&mut plans, &stored, &shas);
        assert!(refused(&plans).is_empty());
        assert!(matches!(
            plans[1],
            Plan::Answer(Ok(Accepted::Replay { original_id: 7, .. }))
        ));
    }

    #[test]
    fn settle_gives_slots_in_arrival_order_and_asks_for_more() {
        let subs = adddevices(&[("a", 1), ("b", 2), ("c\\\"", 3)]);
        let cmds: Vec<&Submission> = subs.iter().collect();
        let shas = shas_of(&subs);
        let found = found_with(&[(2, dev(true, 1))]);
        let plans = || decide(&cmds, &shas, &found, NOW);
        // Two adddevice accepted (device 2 exists): two slots needed.
        assert_eq!(
            settle(plans(), &[(1, 0)], &[10, 11, 12], &cmds).err(),
            Some(2)
        );
        let d = settle(plans(), &[(1, 0), (1, 1)], &[10, 11, 12], &cmds).expect("enough slots");
        let given: Vec<(usize, u64, u32, u8)> = d
            .writes
            .iter()
            .map(|w| match w.work {
                Work::AddDevice {
                    device_id,
                    group_id,
                    slot,
                    ..
                } => (w.index, device_id.get(), group_id, slot),
                _ => panic!("adddevice expected"),
            })
            .collect();
        assert_eq!(given, vec![(0, 1, 1, 0), (2, 3, 1, 1)]);
        assert!(matches!(d.answers[1], Err(SmsError::DeviceExists(2))));
        assert_eq!(
            d.writes[1].reply,
            r#"{"request_id":12,"status":"accepted","transaction_id":"c\""}"#
        );
        assert!(
            matches!(&d.answers[2], Ok(Accepted::New { request_id: 12, reply }) if *reply == d.writes[1].reply)
        );
    }
}
