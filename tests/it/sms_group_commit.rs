//! Group commit of SMS commands (`sms::store::accept_batch`,
//! `sms::commit::Committer`) against a real MariaDB: a batch gives every
//! command the outcome it would have had alone, in order; the stored
//! state and the work items (per device, in order) are the same as
//! accepting the commands one by one; a full queue refuses at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::sms_common;

use casd::failpoint::Armed;
use casd::sms::store::{self, Accepted, Submission};
use casd::sms::{CommandKind, SmsError};
use casd::testing::TestDb;
use mysql_async::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sms_common::submission as sub;

/// What an outcome says, without ids that differ between databases.
fn summary(r: &Result<Accepted, SmsError>) -> String {
    match r {
        Ok(Accepted::New { .. }) => "accepted".into(),
        Ok(Accepted::Replay { .. }) => "replay".into(),
        Err(e) => format!("{:?}", casd::api_error::ApiError::from(clone_err(e)).body()),
    }
}

fn clone_err(e: &SmsError) -> SmsError {
    match e {
        SmsError::UnknownDevice(d) => SmsError::UnknownDevice(*d),
        SmsError::UnknownGroup(g) => SmsError::UnknownGroup(*g),
        SmsError::DeviceExists(d) => SmsError::DeviceExists(*d),
        SmsError::TransactionReused => SmsError::TransactionReused,
        SmsError::AlreadyExpired => SmsError::AlreadyExpired,
        other => panic!("unexpected refusal {other}"),
    }
}

/// The state that must not depend on batching: devices (without their
/// slot), entitlements, and each device's work items in id order (payloads
/// without slots, and without the default OSM expiry: it follows the
/// clock), plus the request and idempotency row counts.
async fn state(
    db: &casd::db::Db,
) -> (
    Vec<String>,
    Vec<String>,
    BTreeMap<String, Vec<String>>,
    u64,
    u64,
) {
    let mut c = db.conn().await.unwrap();
    let devices: Vec<(u64, String, u32)> = c
        .query("SELECT device_id, state, pmk_version FROM devices ORDER BY device_id")
        .await
        .unwrap();
    let ents: Vec<(u64, u32, u32, u32, String)> = c
        .query(
            "SELECT device_id, product_id, start_at, end_at, state FROM entitlements \
             ORDER BY device_id, product_id",
        )
        .await
        .unwrap();
    let items: Vec<(Option<u64>, String)> = c
        .query("SELECT device_id, payload FROM work_items ORDER BY id")
        .await
        .unwrap();
    let mut per_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (d, payload) in items {
        let mut v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        for k in ["group_id", "slot", "not_after"] {
            if let Some(o) = v.as_object_mut() {
                o.remove(k);
            }
        }
        per_device
            .entry(d.map(|d| d.to_string()).unwrap_or_else(|| "-".into()))
            .or_default()
            .push(v.to_string());
    }
    let reqs: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM sms_requests")
        .await
        .unwrap();
    let idem: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM idempotency")
        .await
        .unwrap();
    (
        devices.iter().map(|d| format!("{d:?}")).collect(),
        ents.iter().map(|e| format!("{e:?}")).collect(),
        per_device,
        reqs.unwrap_or(0),
        idem.unwrap_or(0),
    )
}

/// Slots: every enabled device holds one, distinct, and `group_slots`
/// says the same; disabled devices hold none.
async fn slots_consistent(db: &casd::db::Db) {
    let mut c = db.conn().await.unwrap();
    let bad: Option<u64> = c
        .query_first(
            "SELECT COUNT(*) FROM devices d LEFT JOIN group_slots g \
             ON g.group_id = d.group_id AND g.slot = d.slot AND g.device_id = d.device_id \
             WHERE (d.state = 'enabled' AND g.device_id IS NULL) \
                OR (d.state = 'disabled' AND d.group_id IS NOT NULL)",
        )
        .await
        .unwrap();
    assert_eq!(bad, Some(0), "devices and group_slots disagree");
    let held: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM group_slots WHERE device_id IS NOT NULL")
        .await
        .unwrap();
    let enabled: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM devices WHERE state = 'enabled'")
        .await
        .unwrap();
    assert_eq!(
        held, enabled,
        "every held slot belongs to an enabled device"
    );
}

/// Runs `subs` as one batch on one database and one by one on another;
/// outcomes and state must agree.
async fn batch_equals_sequential(subs: &[Submission]) {
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    let batched = store::accept_batch(&a.db, subs).await;
    let mut single = Vec::new();
    for s in subs {
        single.push(
            store::accept_batch(&b.db, std::slice::from_ref(s))
                .await
                .pop()
                .unwrap(),
        );
    }
    for (i, (x, y)) in batched.iter().zip(&single).enumerate() {
        assert_eq!(
            summary(x),
            summary(y),
            "command {i} ({}) differs",
            subs[i].message
        );
    }
    // A replay answers with the original's reply, byte for byte.
    for (i, r) in batched.iter().enumerate() {
        if let Ok(Accepted::Replay { reply, original_id }) = r {
            let orig = batched[..i].iter().find_map(|o| match o {
                Ok(Accepted::New { request_id, reply }) if request_id == original_id => Some(reply),
                _ => None,
            });
            assert_eq!(orig, Some(reply), "replay of command {i}");
        }
    }
    let (sa, sb) = (state(&a.db).await, state(&b.db).await);
    assert_eq!(sa.0, sb.0, "devices");
    assert_eq!(sa.1, sb.1, "entitlements");
    assert_eq!(sa.2, sb.2, "work items per device, in order");
    // Replays are recorded by the handler, not here: one row per accepted.
    let accepted = batched
        .iter()
        .filter(|r| matches!(r, Ok(Accepted::New { .. })))
        .count() as u64;
    assert_eq!(
        (sa.3, sa.4),
        (accepted, accepted),
        "request and idempotency rows"
    );
    assert_eq!((sb.3, sb.4), (accepted, accepted));
    slots_consistent(&a.db).await;
    slots_consistent(&b.db).await;
}

#[tokio::test]
async fn a_batch_gives_each_command_its_sequential_outcome() {
    use CommandKind::*;
    let subs = vec![
        sub(AddDevice, r#"{"transaction_id":"a1","device_id":1}"#),
        sub(
            AddEntitlement,
            r#"{"transaction_id":"e1","device_id":1,"product_id":7,"start":0,"end":2000000000}"#,
        ),
        sub(AddDevice, r#"{"transaction_id":"a2","device_id":2}"#),
        // Same key, same command: the stored reply.
        sub(AddDevice, r#"{"transaction_id":"a1","device_id":1}"#),
        // Same key, another command: 409.
        sub(AddDevice, r#"{"transaction_id":"a2","device_id":3}"#),
        // Device 1 exists by now.
        sub(AddDevice, r#"{"transaction_id":"a3","device_id":1}"#),
        sub(
            RemoveEntitlement,
            r#"{"transaction_id":"r1","device_id":1,"product_id":7}"#,
        ),
        sub(
            RemoveEntitlement,
            r#"{"transaction_id":"r2","device_id":1,"product_id":9}"#,
        ),
        sub(
            AddEntitlement,
            r#"{"transaction_id":"e2","device_id":1,"product_id":8,"start":0,"end":2000000000}"#,
        ),
        sub(RemoveDevice, r#"{"transaction_id":"d1","device_id":1}"#),
        // Unknown after its removal.
        sub(
            AddEntitlement,
            r#"{"transaction_id":"e3","device_id":1,"product_id":8,"start":0,"end":2000000000}"#,
        ),
        sub(
            GenerateOsm,
            r#"{"transaction_id":"o1","device_id":1,"text":"x","duration_s":5}"#,
        ),
        // Re-added: enabled again, its entitlement stays ended.
        sub(AddDevice, r#"{"transaction_id":"a4","device_id":1}"#),
        sub(
            GenerateOsm,
            r#"{"transaction_id":"o2","group_id":1,"text":"hello","duration_s":5}"#,
        ),
        sub(
            GenerateOsm,
            r#"{"transaction_id":"o3","group_id":99,"text":"hello","duration_s":5}"#,
        ),
        sub(
            GenerateOsm,
            r#"{"transaction_id":"o4","all":true,"text":"hi","duration_s":5,"expires_at":1}"#,
        ),
        sub(
            GenerateOsm,
            r#"{"transaction_id":"o5","all":true,"text":"hi","duration_s":5}"#,
        ),
        sub(RemoveDevice, r#"{"transaction_id":"d2","device_id":5}"#),
    ];
    // The outcomes themselves, not only their agreement.
    let db = TestDb::new().await;
    let got: Vec<String> = store::accept_batch(&db.db, &subs)
        .await
        .iter()
        .map(summary)
        .collect();
    let codes: Vec<&str> = got
        .iter()
        .map(|s| {
            [
                "accepted",
                "replay",
                "transaction_reused",
                "device_exists",
                "unknown_device",
                "unknown_group",
                "already_expired",
            ]
            .into_iter()
            .find(|c| s.contains(c))
            .unwrap_or(s)
        })
        .collect();
    assert_eq!(
        codes,
        [
            "accepted",
            "accepted",
            "accepted",
            "replay",
            "transaction_reused",
            "device_exists",
            "accepted",
            "accepted",
            "accepted",
            "accepted",
            "unknown_device",
            "unknown_device",
            "accepted",
            "accepted",
            "unknown_group",
            "already_expired",
            "accepted",
            "unknown_device",
        ]
    );
    batch_equals_sequential(&subs).await;
}

#[tokio::test]
async fn random_batches_equal_one_by_one() {
    use CommandKind::*;
    for seed in 0..4u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut subs = Vec::new();
        for n in 0..80 {
            let d = rng.gen_range(1..=6u64);
            let p = rng.gen_range(1..=3u32);
            // Now and then an earlier transaction_id again (same or other body).
            let tid = if n > 0 && rng.gen_bool(0.1) {
                format!("t{}", rng.gen_range(0..n))
            } else {
                format!("t{n}")
            };
            let s = match rng.gen_range(0..6) {
                0 | 1 => sub(
                    AddDevice,
                    &format!(r#"{{"transaction_id":"{tid}","device_id":{d}}}"#),
                ),
                2 => sub(
                    RemoveDevice,
                    &format!(r#"{{"transaction_id":"{tid}","device_id":{d}}}"#),
                ),
                3 => sub(
                    AddEntitlement,
                    &format!(
                        r#"{{"transaction_id":"{tid}","device_id":{d},"product_id":{p},"start":0,"end":{}}}"#,
                        2_000_000_000 + n
                    ),
                ),
                4 => sub(
                    RemoveEntitlement,
                    &format!(r#"{{"transaction_id":"{tid}","device_id":{d},"product_id":{p}}}"#),
                ),
                _ => sub(
                    GenerateOsm,
                    &format!(
                        r#"{{"transaction_id":"{tid}","device_id":{d},"text":"m{n}","duration_s":5}}"#
                    ),
                ),
            };
            subs.push(s);
        }
        batch_equals_sequential(&subs).await;
    }
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_with_overloaded() {
    // A "database" that accepts TCP connections and never speaks: the one
    // committer hangs in its first round, and the queue (16 batches of 1)
    // fills up.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mysql://casd:x@{}/nothing", silent.local_addr().unwrap());
    let db = casd::db::Db::new(&url, 2, Duration::from_secs(30)).unwrap();
    let committer = casd::sms::commit::Committer::start(db, 1, 1);
    let mut waiting = Vec::new();
    let mut refused = 0;
    for n in 0..40 {
        let c = committer.clone();
        let s = sub(
            CommandKind::AddDevice,
            &format!(r#"{{"transaction_id":"q{n}","device_id":{}}}"#, n + 1),
        );
        let mut f = Box::pin(async move { c.submit(s).await });
        // A refusal is immediate: the future is ready on its first poll.
        let first_poll = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match f.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        match first_poll {
            Some(Err(SmsError::Overloaded)) => refused += 1,
            Some(other) => panic!("command {n}: {other:?}"),
            None => waiting.push(f),
        }
    }
    // 16 queued plus at most one taken by the committer.
    assert!(
        (16..=17).contains(&waiting.len()),
        "{} waiting",
        waiting.len()
    );
    assert_eq!(refused, 40 - waiting.len());
    let e = casd::api_error::ApiError::from(SmsError::Overloaded);
    assert_eq!(e.status, 503);
    assert_eq!(e.retry_after, Some(1));
    drop(silent);
}

#[tokio::test]
async fn concurrent_batches_about_the_same_devices_serialize() {
    // Two committers (or two processes) adding the same new devices and
    // entitling them at once: every device is added exactly once, the
    // loser gets 409, nothing is doubled and the slots stay consistent.
    let t = TestDb::new().await;
    let batch = |tag: &'static str| {
        (1..=60u64)
            .flat_map(|d| {
                [
                    sub(
                        CommandKind::AddDevice,
                        &format!(r#"{{"transaction_id":"{tag}a{d}","device_id":{d}}}"#),
                    ),
                    sub(
                        CommandKind::AddEntitlement,
                        &format!(
                            r#"{{"transaction_id":"{tag}e{d}","device_id":{d},"product_id":1,"start":0,"end":2000000000}}"#
                        ),
                    ),
                ]
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (batch("x"), batch("y"));
    let (ra, rb) = tokio::join!(
        store::accept_batch(&t.db, &a),
        store::accept_batch(&t.db, &b)
    );
    let adds = |r: &[Result<Accepted, SmsError>]| {
        r.iter()
            .step_by(2)
            .filter(|o| matches!(o, Ok(Accepted::New { .. })))
            .count()
    };
    let exists = |r: &[Result<Accepted, SmsError>]| {
        r.iter()
            .step_by(2)
            .filter(|o| matches!(o, Err(SmsError::DeviceExists(_))))
            .count()
    };
    assert_eq!(adds(&ra) + adds(&rb), 60, "each device added once");
    assert_eq!(exists(&ra) + exists(&rb), 60, "the other add is a 409");
    // Every entitlement is accepted: the device exists by then either way.
    for r in ra.iter().chain(&rb).skip(1).step_by(2) {
        assert!(matches!(r, Ok(Accepted::New { .. })), "{r:?}");
    }
    let mut c = t.db.conn().await.unwrap();
    let items: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM work_items")
        .await
        .unwrap();
    assert_eq!(items, Some(180));
    slots_consistent(&t.db).await;
}

#[tokio::test]
async fn hostile_bodies_are_stored_byte_for_byte_in_both_escape_modes() {
    // The round's statements carry their values as escaped literals: a
    // body made of quotes, backslashes, NUL, control bytes and non-ASCII
    // must come back exactly, whether or not the session has
    // NO_BACKSLASH_ESCAPES, and must never become SQL.
    let hostile = "x'); DROP TABLE devices; -- \\' \\\\ \" \u{0} \n\r\t\u{1a} ` ? ?? é 日本 😀 %_";
    for nbe in [false, true] {
        let t = TestDb::new().await;
        let mut c = t.db.conn().await.unwrap();
        if nbe {
            c.query_drop("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
                .await
                .unwrap();
        }
        let body = serde_json::json!({
            "transaction_id": "h1",
            "all": true,
            "text": "hi",
            "duration_s": 5,
        })
        .to_string();
        let mut s = sub(CommandKind::GenerateOsm, &body);
        // What is stored as the message is what was received: here, bytes
        // no JSON parser would accept, which is the point.
        s.message = hostile.to_owned();
        s.sender = format!("sender{hostile}");
        let r = store::accept_batch_on(&mut c, std::slice::from_ref(&s), &Default::default()).await;
        assert!(matches!(r[0], Ok(Accepted::New { .. })), "{r:?}");
        let row: Option<(String, String)> = c
            .query_first("SELECT sender, message FROM sms_requests")
            .await
            .unwrap();
        assert_eq!(
            row,
            Some((s.sender.clone(), hostile.to_owned())),
            "nbe={nbe}"
        );
        let devices: Option<u64> = c.query_first("SELECT COUNT(*) FROM devices").await.unwrap();
        assert_eq!(devices, Some(0), "the devices table is still there");
        // The same command again is a replay, found by that sender.
        let r = store::accept_batch_on(&mut c, std::slice::from_ref(&s), &Default::default()).await;
        assert!(matches!(r[0], Ok(Accepted::Replay { .. })), "{r:?}");
    }
}

#[tokio::test]
async fn the_slot_hint_keeps_lowest_free_first_within_a_process() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    let hint = store::SlotHint::default();
    let add = |d: u64| {
        sub(
            CommandKind::AddDevice,
            &format!(r#"{{"transaction_id":"a{d}","device_id":{d}}}"#),
        )
    };
    let slot_of = |d: u64| {
        let db = t.db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            let r: Option<(u32, u8)> = c
                .exec_first(
                    "SELECT group_id, slot FROM devices WHERE device_id = ?",
                    (d,),
                )
                .await
                .unwrap();
            r.unwrap()
        }
    };
    // Two groups and a half, in batches, as the committer would.
    let subs: Vec<Submission> = (1..=600).map(add).collect();
    for chunk in subs.chunks(64) {
        let r = store::accept_batch_on(&mut c, chunk, &hint).await;
        assert!(r.iter().all(|o| matches!(o, Ok(Accepted::New { .. }))));
    }
    assert_eq!(slot_of(600).await, (3, 87));
    assert_eq!(
        hint.floor(),
        (3, 88),
        "the scan starts after the slots the last round took (577..=600 took 3/64..=3/87)"
    );
    // Freed by another process (behind this one's back): found once the
    // hint has expired; an expired (zero-TTL) hint always scans from 1.
    c.query_drop(
        "UPDATE devices SET state = 'disabled', group_id = NULL, slot = NULL WHERE device_id = 10",
    )
    .await
    .unwrap();
    c.query_drop("UPDATE group_slots SET device_id = NULL WHERE device_id = 10")
        .await
        .unwrap();
    store::accept_batch_on(&mut c, &[add(602)], &hint).await;
    assert_eq!(
        slot_of(602).await,
        (3, 88),
        "hint still trusted: from slot 3/88"
    );
    let expired = store::SlotHint::with_ttl(Duration::ZERO);
    store::accept_batch_on(&mut c, &[add(603)], &expired).await;
    assert_eq!(slot_of(603).await, (1, 9), "from group 1 again");
    // Freed by this process: the next adddevice gets it at once.
    let rm = sub(
        CommandKind::RemoveDevice,
        r#"{"transaction_id":"r5","device_id":5}"#,
    );
    store::accept_batch_on(&mut c, &[rm], &hint).await;
    assert_eq!(hint.floor(), (1, 4));
    store::accept_batch_on(&mut c, &[add(601)], &hint).await;
    assert_eq!(slot_of(601).await, (1, 4));
    slots_consistent(&t.db).await;
}

#[tokio::test]
async fn concurrent_rounds_with_the_same_command_replay_it() {
    // Two committers holding the same adddevice (same transaction_id):
    // whichever commits second must answer with the first's reply, never
    // with "device exists" (its device lock waited for the first).
    let t = TestDb::new().await;
    for n in 0..20u64 {
        let s = sub(
            CommandKind::AddDevice,
            &format!(r#"{{"transaction_id":"same{n}","device_id":{}}}"#, 500 + n),
        );
        let (a, b) = tokio::join!(
            store::accept_batch(&t.db, std::slice::from_ref(&s)),
            store::accept_batch(&t.db, std::slice::from_ref(&s))
        );
        let id = |r: &Result<Accepted, SmsError>| match r {
            Ok(Accepted::New { request_id, .. }) => *request_id,
            Ok(Accepted::Replay { original_id, .. }) => *original_id,
            Err(e) => panic!("round {n}: {e:?}"),
        };
        assert_eq!(id(&a[0]), id(&b[0]), "round {n}");
    }
}

/// Migration 0006 on a database that already has requests (an upgrade):
/// the sequence continues after the highest id, for accepted commands and
/// for recorded refusals, and a replay keeps its original id and reply.
#[tokio::test]
async fn request_ids_continue_after_existing_rows_when_migration_6_runs() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    // Rows written before the upgrade (by AUTO_INCREMENT, up to 41,000).
    c.query_drop(
        "INSERT INTO sms_requests (id, sender, transaction_id, path, message, received_at, status_code, response) \
         VALUES (41000, 's', 'old', '/adddevice', '', UTC_TIMESTAMP(6), 200, '')",
    )
    .await
    .unwrap();
    let m6 = casd::db::MIGRATIONS
        .iter()
        .find(|m| m.version == 6)
        .expect("migration 6");
    for stmt in casd::db::split_statements(m6.sql) {
        c.query_drop(stmt).await.unwrap();
    }
    let s = sub(
        CommandKind::AddDevice,
        r#"{"transaction_id":"up1","device_id":77}"#,
    );
    let r = store::accept_batch_on(&mut c, std::slice::from_ref(&s), &Default::default()).await;
    let Ok(Accepted::New { request_id, reply }) = &r[0] else {
        panic!("{r:?}");
    };
    // Ids are not gap-free (a round takes one per command before it knows
    // which are accepted, and this first round waited for group slots to
    // be created), but they continue above the existing rows.
    assert!(
        (41001..41010).contains(request_id),
        "an id after the existing rows: {request_id}"
    );
    assert!(
        reply.starts_with(&format!(r#"{{"request_id":{request_id},"#)),
        "{reply}"
    );
    let stored: Option<String> = c
        .exec_first(
            "SELECT response FROM sms_requests WHERE id = ?",
            (*request_id,),
        )
        .await
        .unwrap();
    assert_eq!(
        stored.as_deref(),
        Some(reply.as_str()),
        "stored reply = sent reply"
    );
    // A refusal recorded on its own takes the next id.
    let refused = store::record(
        &t.db,
        "sms1",
        Some("bad"),
        "/adddevice",
        "{}",
        time::OffsetDateTime::now_utc(),
        400,
        "{}",
        false,
    )
    .await
    .unwrap();
    assert!(refused > *request_id, "{refused} after {request_id}");
    // The replay keeps the original id and reply.
    let r = store::accept_batch_on(&mut c, std::slice::from_ref(&s), &Default::default()).await;
    match &r[0] {
        Ok(Accepted::Replay {
            original_id,
            reply: again,
        }) => {
            assert_eq!(original_id, request_id);
            assert_eq!(again, reply);
        }
        other => panic!("{other:?}"),
    }
}

/// A round waiting on a row lock taken elsewhere (another process, or the
/// EMMG's share lock while it delivers keys) holds the committers' building
/// turn for at most `BUILD_TURN_MAX`: commands about other devices are
/// committed meanwhile, and the blocked one once the lock goes.
#[tokio::test]
async fn a_round_blocked_on_a_lock_does_not_hold_up_other_commands() {
    let t = TestDb::new().await;
    let committer = casd::sms::commit::Committer::start(t.db.clone(), 256, 2);
    let add = |d: u64| {
        sub(
            CommandKind::AddDevice,
            &format!(r#"{{"transaction_id":"a{d}","device_id":{d}}}"#),
        )
    };
    assert!(matches!(
        committer.submit(add(1)).await,
        Ok(Accepted::New { .. })
    ));
    // Another session holds device 1's row.
    let mut other = t.db.conn().await.unwrap();
    other.query_drop("START TRANSACTION").await.unwrap();
    other
        .query_drop("SELECT * FROM devices WHERE device_id = 1 FOR UPDATE")
        .await
        .unwrap();
    let blocked = {
        let c = committer.clone();
        tokio::spawn(async move {
            c.submit(sub(
                CommandKind::RemoveDevice,
                r#"{"transaction_id":"r1","device_id":1}"#,
            ))
            .await
        })
    };
    // Wait until that round is waiting for the lock (polling the server's
    // process list, not a fixed delay).
    let mut probe = t.db.conn().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // The committer's statement locking device 1 still running.
        let waits: Option<u64> = probe
            .query_first(
                "SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() \
                 AND info LIKE 'SELECT device_id, state, group_id, slot, pmk_version FROM devices%'",
            )
            .await
            .unwrap();
        if waits.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the round never waited"
        );
        tokio::task::yield_now().await;
    }
    // Commands about other devices still go through, well before the
    // lock wait times out (10 s).
    let other_cmds = tokio::time::timeout(Duration::from_secs(5), async {
        (
            committer.submit(add(2)).await,
            committer.submit(add(3)).await,
        )
    })
    .await
    .expect("other devices' commands were held up by the blocked round");
    assert!(
        matches!(other_cmds.0, Ok(Accepted::New { .. })),
        "{other_cmds:?}"
    );
    assert!(
        matches!(other_cmds.1, Ok(Accepted::New { .. })),
        "{other_cmds:?}"
    );
    assert!(!blocked.is_finished(), "still waiting for device 1");
    other.query_drop("ROLLBACK").await.unwrap();
    let r = blocked.await.unwrap();
    assert!(matches!(r, Ok(Accepted::New { .. })), "{r:?}");
}

/// A round checks its slot assignment on the affected-row count of the
/// slot statement, taken from that statement's OK packet in a multi-
/// statement script: each statement's own count, never its neighbour's.
#[tokio::test]
async fn a_script_reports_each_statements_own_affected_rows() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    c.query_drop("CREATE TABLE t (k INT PRIMARY KEY, v INT NOT NULL)")
        .await
        .unwrap();
    let mut s = casd::sqltext::Script::default();
    s.push("INSERT INTO t (k, v) VALUES (1, 1), (2, 2), (3, 3)", &[])
        .unwrap();
    s.push("SELECT k FROM t ORDER BY k", &[]).unwrap();
    // One row changed by ON DUPLICATE KEY UPDATE (2), one inserted (1).
    s.push(
        "INSERT INTO t (k, v) VALUES (?, 10), (4, 4) ON DUPLICATE KEY UPDATE v = VALUES(v)",
        &[mysql_async::Value::from(2u32)],
    )
    .unwrap();
    s.push("UPDATE t SET v = 0 WHERE k > 100", &[]).unwrap();
    s.push("DELETE FROM t WHERE k IN (1, 4)", &[]).unwrap();
    let (sets, affected) = s.run_counted(&mut c).await.unwrap();
    assert_eq!(affected, [3, 0, 3, 0, 2]);
    assert_eq!(sets[1].len(), 3);
    assert!(sets.iter().enumerate().all(|(i, r)| i == 1 || r.is_empty()));
}

/// A round that fails after its writes, right before COMMIT, stores
/// nothing: every command of the batch fails (500), no row of any table is
/// left, and the same commands are accepted afterwards as if never sent
/// ("a 200 means durable", "a round that fails writes nothing").
#[tokio::test]
async fn a_round_failing_before_commit_stores_nothing() {
    let t = TestDb::new().await;
    let subs = [
        sub(
            CommandKind::AddDevice,
            r#"{"transaction_id":"f1","device_id":31}"#,
        ),
        sub(
            CommandKind::AddDevice,
            r#"{"transaction_id":"f2","device_id":32}"#,
        ),
        sub(
            CommandKind::RemoveDevice,
            r#"{"transaction_id":"f3","device_id":31}"#,
        ),
    ];
    let counts = || async {
        let mut c = t.db.conn().await.unwrap();
        let mut n = Vec::new();
        for table in [
            "sms_requests",
            "idempotency",
            "devices",
            "work_items",
            "entitlements",
        ] {
            let k: Option<u64> = c
                .query_first(format!("SELECT COUNT(*) FROM {table}"))
                .await
                .unwrap();
            n.push(k.unwrap_or(0));
        }
        let taken: Option<u64> = c
            .query_first("SELECT COUNT(*) FROM group_slots WHERE device_id IS NOT NULL")
            .await
            .unwrap();
        n.push(taken.unwrap_or(0));
        n
    };
    {
        // Armed for this test's database only (see casd::failpoint).
        let _armed = Armed::new("sms::commit", &t.name);
        let r = store::accept_batch(&t.db, &subs).await;
        assert_eq!(r.len(), 3);
        for o in &r {
            assert!(matches!(o, Err(SmsError::Internal(_))), "{o:?}");
        }
    }
    assert_eq!(counts().await, vec![0; 6], "nothing stored");
    // Nothing half-done either: the same commands are accepted now.
    let r = store::accept_batch(&t.db, &subs).await;
    assert_eq!(
        r.iter().map(summary).collect::<Vec<_>>(),
        vec!["accepted"; 3]
    );
    assert_eq!(counts().await, vec![3, 3, 2, 3, 0, 1]);
}
