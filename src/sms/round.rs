//! One group-commit round, as named steps: [`read`] (one script of reads:
//! the transaction begins, the device rows are locked) → [`decide`] (pure,
//! `decide.rs`) → [`write`] (one script of writes) → [`commit`]. Anything
//! but a commit ends in ROLLBACK ([`try_round`]).
//!
//! Why scripts: a round is about a dozen statements whose shapes (rows, IN
//! lists) change with every batch. Sent one by one, each would cost a
//! round trip (and, prepared, a PREPARE too and a statement-cache entry
//! per shape); sent as one text query with the values inlined
//! ([`crate::sqltext`], which never lets a client byte be parsed as SQL),
//! reads and writes cost one round trip each. Measured: the round trips
//! were most of a round's time (docs/benchmarks.md), and a round is the
//! path every SMS command goes through.

use std::collections::HashMap;

use mysql_async::prelude::*;
use mysql_async::{Conn, Row, Value};
use time::OffsetDateTime;

use super::decide::{self, Decided, DeviceRow, Found, Stored};
use super::error::SmsError;
use super::slots::{ensure_free_slots, SlotHint};
use super::store::{db_time, Accepted, Submission};
use super::types::{SmsCommand, Target};
use crate::db::{DbError, DbErrorKind};
use crate::keystore::{self, KeyKind};
use crate::queue::{self, At, NewItem, Work};
use crate::sqltext::{col, marks, Script};

/// Attempts of one round on deadlock / lock-wait timeout / duplicate key.
const ATTEMPTS: usize = 5;

/// How many times a round may find too few free slots and create more.
const SLOT_ROUNDS: usize = 64;

/// What a round works on.
pub(super) struct Round<'a> {
    pub cmds: &'a [&'a Submission],
    /// Each command's canonical SHA-256 (its idempotency body hash).
    pub shas: &'a [[u8; 32]],
    pub hint: &'a SlotHint,
}

enum RoundEnd {
    Committed(Vec<Result<Accepted, SmsError>>),
    /// Fewer free slots than the round's adddevice need: rolled back.
    NeedSlots(usize),
}

fn is_retryable(e: &SmsError) -> bool {
    // A deadlock or lock wait timeout, or a duplicate key: a concurrent
    // transaction (another committer or process) took the same
    // transaction_id or added the same new device first: the round is run
    // again and then sees it.
    matches!(e, SmsError::Db(d) if d.kind().is_conflict() || d.kind() == DbErrorKind::Duplicate)
}

/// Runs one round until it commits, retrying contention; creating group
/// slots between attempts when the round needs more than are free.
/// `ready_to_commit`: see [`super::store::accept_batch_gated`].
pub(super) async fn run_round(
    conn: &mut Conn,
    r: &Round<'_>,
    ready_to_commit: &mut (dyn FnMut() + Send),
) -> Result<Vec<Result<Accepted, SmsError>>, SmsError> {
    let mut attempt = 0;
    let mut slot_rounds = 0;
    // The first attempt does without the idempotency lookup; any attempt
    // after a failure (a duplicate key among them) does it.
    let mut lookup = false;
    loop {
        attempt += 1;
        match try_round(conn, r, lookup, ready_to_commit).await {
            Ok(RoundEnd::Committed(answers)) => return Ok(answers),
            Ok(RoundEnd::NeedSlots(n)) => {
                // Not an attempt lost to contention: a burst of adddevice
                // may fill the free slots before this round gets them.
                slot_rounds += 1;
                if slot_rounds > SLOT_ROUNDS {
                    return Err(SmsError::Db(DbError::Unreachable(
                        "could not allocate group slots".into(),
                    )));
                }
                attempt -= 1;
                // Free slots below the hint (freed by another process)
                // count too: the next attempt scans from group 1.
                r.hint.reset();
                ensure_free_slots(conn, n).await?;
            }
            Err(e) if attempt < ATTEMPTS && is_retryable(&e) => lookup = true,
            Err(e) => return Err(e),
        }
    }
}

/// One attempt; on anything but a commit, ROLLBACK (also after a failed
/// statement or COMMIT: the transaction may be open; a broken connection
/// fails here too and is not reused) and the slots it found are free
/// again for the hint.
async fn try_round(
    conn: &mut Conn,
    r: &Round<'_>,
    lookup: bool,
    ready_to_commit: &mut (dyn FnMut() + Send),
) -> Result<RoundEnd, SmsError> {
    let mut scanned = None;
    let end = steps(conn, r, lookup, &mut scanned, ready_to_commit).await;
    if !matches!(end, Ok(RoundEnd::Committed(_))) {
        let _ = conn.query_drop("ROLLBACK").await;
        if let Some(gs) = scanned {
            r.hint.freed(gs);
        }
    }
    end
}

/// read → decide → write → commit. `scanned`: set to the lowest free slot
/// the reads found (and locked).
async fn steps(
    conn: &mut Conn,
    r: &Round<'_>,
    lookup: bool,
    scanned: &mut Option<(u32, u8)>,
    ready_to_commit: &mut (dyn FnMut() + Send),
) -> Result<RoundEnd, SmsError> {
    let now = OffsetDateTime::now_utc();
    let now_unix = now.unix_timestamp().clamp(0, u32::MAX as i64) as u32;
    let found = read(conn, r, lookup, now_unix).await?;
    *scanned = found.free_slots.first().copied();
    let mut plans = decide::decide(r.cmds, r.shas, &found, now_unix);
    if !lookup {
        // Refused against the state: a replay of an accepted command looks
        // the same; its stored reply is the answer.
        let refused = decide::refused(&plans);
        if !refused.is_empty() {
            let stored = read_stored(conn, r.cmds, &refused).await?;
            decide::apply_replays(&mut plans, &stored, r.shas);
        }
    }
    let decided = match decide::settle(plans, &found.free_slots, &found.request_ids, r.cmds) {
        Ok(d) => d,
        Err(need) => return Ok(RoundEnd::NeedSlots(need)),
    };
    if decided.writes.is_empty() {
        // Nothing to write: end the transaction (and its locks).
        ready_to_commit();
        conn.query_drop("ROLLBACK").await?;
        return Ok(RoundEnd::Committed(decided.answers));
    }
    write(conn, r, &decided, now).await?;
    commit(conn, ready_to_commit).await?;
    for w in &decided.writes {
        if let Work::RemoveDevice {
            group_id: Some(g),
            slot: Some(s),
            ..
        } = w.work
        {
            r.hint.freed((g, s));
        }
    }
    Ok(RoundEnd::Committed(decided.answers))
}

/// The indexes of each read statement in the script's results.
#[derive(Default)]
struct ReadSets {
    pmk_and_ids: usize,
    devices: Option<usize>,
    slots: Option<(usize, u64)>,
    idempotency: Vec<(usize, Vec<usize>)>,
    groups: Option<usize>,
    active: Option<usize>,
}

/// The round's reads, one script: the transaction begins; the request ids
/// and the PMK version; the devices, locked; free slots, locked; the
/// idempotency rows (when `lookup`); the OSMs' groups; the entitlements
/// being removed.
async fn read(
    conn: &mut Conn,
    r: &Round<'_>,
    lookup: bool,
    now_unix: u32,
) -> Result<Found, SmsError> {
    let (floor, hint_generation) = r.hint.start();
    let mut script = Script::default();
    let sets = push_reads(&mut script, r.cmds, lookup, now_unix, floor)?;
    let rows = script.run(conn).await?;
    let found = parse_reads(&rows, &sets, r.cmds)?;
    if let Some(&(g, s)) = found.free_slots.last() {
        // The next scan starts after the slots this round took (and
        // locked); if the round rolls back, they are freed again.
        let next = if s == u8::MAX { (g + 1, 0) } else { (g, s + 1) };
        r.hint.found(next, hint_generation);
    }
    Ok(found)
}

/// A transaction_id accepted by a concurrent round that has not committed
/// yet is not seen by these reads; our INSERT then waits for it and fails
/// with a duplicate key, and the round is run again.
fn push_reads(
    script: &mut Script,
    cmds: &[&Submission],
    lookup: bool,
    now_unix: u32,
    (floor_group, floor_slot): (u32, u8),
) -> Result<ReadSets, SmsError> {
    script.push("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", &[])?;
    script.push("START TRANSACTION", &[])?;
    let adds = cmds
        .iter()
        .filter(|s| matches!(s.req.command, SmsCommand::AddDevice { .. }))
        .count() as u64;
    let mut sets = ReadSets {
        pmk_and_ids: push_pmk_and_ids(script, cmds.len(), adds > 0, now_unix)?,
        ..ReadSets::default()
    };
    // The devices, locked in ascending order (two rounds never wait on
    // each other in a cycle).
    let dev_ids = sorted(
        cmds.iter()
            .filter_map(|s| s.req.command.device_id())
            .map(|d| d.get()),
    );
    if !dev_ids.is_empty() {
        sets.devices = Some(script.push(
            &format!(
                "SELECT device_id, state, group_id, slot, pmk_version FROM devices \
                 WHERE device_id IN ({}) ORDER BY device_id FOR UPDATE",
                marks(dev_ids.len(), "?")
            ),
            &values(&dev_ids),
        )?);
    }
    // Free slots, the lowest first, as many as there are adddevice (some
    // may go unused: refused or replayed); slots locked by concurrent
    // rounds are skipped, never waited for.
    if adds > 0 {
        let k = script.push(
            "SELECT group_id, slot FROM group_slots WHERE device_id IS NULL \
             AND (group_id > ? OR (group_id = ? AND slot >= ?)) \
             ORDER BY group_id, slot LIMIT ? FOR UPDATE SKIP LOCKED",
            &[
                Value::from(floor_group),
                Value::from(floor_group),
                Value::from(floor_slot),
                Value::from(adds),
            ],
        )?;
        sets.slots = Some((k, adds));
    }
    // Idempotency, read *after* the device locks: a concurrent round that
    // held one of our devices has committed by now, and a duplicate it
    // accepted must be seen here as a replay (not as "device exists").
    // Only when `lookup`: a round first runs without it (a replay is rare,
    // and the lookup was a tenth of a command's cost); a replay then fails
    // on the idempotency key and the round is run again with the lookup,
    // and a command refused against the state has its key looked up after
    // the decision (`steps`), in the same transaction.
    if lookup {
        let all: Vec<usize> = (0..cmds.len()).collect();
        sets.idempotency = push_idempotency_lookup(script, cmds, &all)?;
    }
    sets.groups = push_groups(script, cmds)?;
    sets.active = push_active(script, cmds)?;
    Ok(sets)
}

/// A request id per command from the sequence (not transactional: a
/// refused command, a replay or a rolled-back round leaves a gap), so that
/// the writes carry them as literals; and, when the round adds devices,
/// the PMK version their DUKs derive from: the key store's current PMK
/// (metadata only), 1 on a store without any PMK yet (a database the
/// Encryptor has not initialised).
fn push_pmk_and_ids(
    script: &mut Script,
    n: usize,
    adds: bool,
    now_unix: u32,
) -> Result<usize, SmsError> {
    let (pmk, values) = if adds {
        keystore::current_version_subquery(KeyKind::Pmk, now_unix)
    } else {
        ("NULL".to_owned(), Vec::new())
    };
    let ids = vec!["NEXTVAL(sms_request_ids)"; n].join(", ");
    Ok(script.push(&format!("SELECT {pmk}, {ids}"), &values)?)
}

fn push_groups(script: &mut Script, cmds: &[&Submission]) -> Result<Option<usize>, SmsError> {
    let groups = sorted(cmds.iter().filter_map(|s| match &s.req.command {
        SmsCommand::GenerateOsm {
            target: Target::Group(g),
            ..
        } => Some(g.get()),
        _ => None,
    }));
    if groups.is_empty() {
        return Ok(None);
    }
    Ok(Some(script.push(
        &format!(
            "SELECT DISTINCT group_id FROM group_slots WHERE group_id IN ({})",
            marks(groups.len(), "?")
        ),
        &values(&groups),
    )?))
}

fn push_active(script: &mut Script, cmds: &[&Submission]) -> Result<Option<usize>, SmsError> {
    let devices: Vec<u64> = cmds
        .iter()
        .filter_map(|s| match &s.req.command {
            SmsCommand::RemoveEntitlement { device_id, .. } => Some(device_id.get()),
            _ => None,
        })
        .collect();
    if devices.is_empty() {
        return Ok(None);
    }
    Ok(Some(script.push(
        &format!(
            "SELECT device_id, product_id FROM entitlements \
             WHERE device_id IN ({}) AND state = 'active'",
            marks(devices.len(), "?")
        ),
        &values(&devices),
    )?))
}

fn sorted<T: Ord>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn values<T: Copy + Into<Value>>(v: &[T]) -> Vec<Value> {
    v.iter().map(|x| (*x).into()).collect()
}

/// The reads' rows as [`Found`].
fn parse_reads(
    rows: &[Vec<Row>],
    sets: &ReadSets,
    cmds: &[&Submission],
) -> Result<Found, SmsError> {
    let set = |k: Option<usize>| k.and_then(|k| rows.get(k)).map_or(&[][..], |v| &v[..]);
    let first = rows
        .get(sets.pmk_and_ids)
        .and_then(|r| r.first())
        .ok_or_else(|| SmsError::Internal("no request ids".into()))?;
    let mut found = Found {
        pmk_version: col::<Option<u32>>(first, 0)?.unwrap_or(1),
        request_ids: (1..=cmds.len())
            .map(|k| col(first, k))
            .collect::<Result<_, _>>()?,
        stored: stored_rows(rows, &sets.idempotency, cmds)?,
        ..Found::default()
    };
    for row in set(sets.devices) {
        let state: String = col(row, 1)?;
        let device = DeviceRow {
            enabled: state == "enabled",
            group_id: col(row, 2)?,
            slot: col(row, 3)?,
            pmk_version: col(row, 4)?,
        };
        found.devices.insert(col(row, 0)?, device);
    }
    for row in set(sets.slots.map(|(k, _)| k)) {
        found.free_slots.push((col(row, 0)?, col(row, 1)?));
    }
    for row in set(sets.groups) {
        found.known_groups.insert(col(row, 0)?);
    }
    for row in set(sets.active) {
        found.active.insert((col(row, 0)?, col(row, 1)?));
    }
    Ok(found)
}

/// Reads the idempotency rows of commands `idx` (in the round's
/// transaction, after the decision: see [`push_reads`]).
async fn read_stored(
    conn: &mut Conn,
    cmds: &[&Submission],
    idx: &[usize],
) -> Result<HashMap<usize, Stored>, SmsError> {
    let mut script = Script::default();
    let sets = push_idempotency_lookup(&mut script, cmds, idx)?;
    let rows = script.run(conn).await?;
    stored_rows(&rows, &sets, cmds)
}

/// Pushes the idempotency lookup of commands `idx` (one statement per
/// sender) onto `script`; returns each statement's index with its commands.
fn push_idempotency_lookup(
    script: &mut Script,
    cmds: &[&Submission],
    idx: &[usize],
) -> Result<Vec<(usize, Vec<usize>)>, SmsError> {
    let mut by_sender: Vec<(&str, Vec<usize>)> = Vec::new();
    for &i in idx {
        let sender = cmds[i].sender.as_str();
        match by_sender.iter_mut().find(|(s, _)| *s == sender) {
            Some((_, v)) => v.push(i),
            None => by_sender.push((sender, vec![i])),
        }
    }
    let mut out = Vec::with_capacity(by_sender.len());
    for (sender, idx) in by_sender {
        let mut v: Vec<Value> = vec![Value::from(sender)];
        v.extend(
            idx.iter()
                .map(|i| Value::from(cmds[*i].req.transaction_id.as_str())),
        );
        let k = script.push(
            &format!(
                "SELECT i.transaction_id, i.body_sha256, i.request_id, r.response FROM idempotency i \
                 LEFT JOIN sms_requests r ON r.id = i.request_id \
                 WHERE i.sender = ? AND i.transaction_id IN ({})",
                marks(idx.len(), "?")
            ),
            &v,
        )?;
        out.push((k, idx));
    }
    Ok(out)
}

/// The idempotency rows the lookup found, by command index.
fn stored_rows(
    rows: &[Vec<Row>],
    sets: &[(usize, Vec<usize>)],
    cmds: &[&Submission],
) -> Result<HashMap<usize, Stored>, SmsError> {
    let mut out = HashMap::new();
    for (k, idx) in sets {
        for row in rows.get(*k).map_or(&[][..], |v| &v[..]) {
            let tid: String = col(row, 0)?;
            let Some(&i) = idx
                .iter()
                .find(|i| cmds[**i].req.transaction_id.as_str() == tid)
            else {
                continue;
            };
            let stored = Stored {
                body_sha256: col(row, 1)?,
                request_id: col(row, 2)?,
                response: col(row, 3)?,
            };
            out.insert(i, stored);
        }
    }
    Ok(out)
}

/// The round's writes, one script: each accepted command's request row
/// (with its id and its whole reply), idempotency row, state change and
/// work item, as multi-row statements.
async fn write(
    conn: &mut Conn,
    r: &Round<'_>,
    d: &Decided,
    now: OffsetDateTime,
) -> Result<(), SmsError> {
    let mut w = Script::default();
    push_requests(&mut w, r, d)?;
    push_idempotency(&mut w, r, d, now)?;
    push_removals(&mut w, d, now)?;
    let slots = push_slots(&mut w, d, now)?;
    push_entitlements(&mut w, d, now)?;
    push_work_items(&mut w, r, d, now)?;
    let (_, affected) = w.run_counted(conn).await?;
    if let Some((k, given)) = slots {
        // Each row must have been an existing free slot changed (2 per row
        // for ON DUPLICATE KEY UPDATE, in the statement's OK packet);
        // anything else means the slot table and the device table
        // disagree: write nothing.
        if affected.get(k).copied() != Some(2 * given) {
            return Err(SmsError::Internal(
                "group slot assignment touched unexpected rows".into(),
            ));
        }
    }
    Ok(())
}

fn push_requests(w: &mut Script, r: &Round<'_>, d: &Decided) -> Result<(), SmsError> {
    let mut v: Vec<Value> = Vec::with_capacity(d.writes.len() * 7);
    for x in &d.writes {
        let s = r.cmds[x.index];
        v.extend([
            Value::from(x.request_id),
            Value::from(s.sender.as_str()),
            Value::from(s.req.transaction_id.as_str()),
            Value::from(s.path),
            Value::from(s.message.as_str()),
            db_time(s.received_at),
            Value::from(x.reply.as_str()),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO sms_requests \
             (id, sender, transaction_id, path, message, received_at, status_code, response) VALUES {}",
            marks(d.writes.len(), "(?,?,?,?,?,?,200,?)")
        ),
        &v,
    )?;
    Ok(())
}

fn push_idempotency(
    w: &mut Script,
    r: &Round<'_>,
    d: &Decided,
    now: OffsetDateTime,
) -> Result<(), SmsError> {
    let mut v: Vec<Value> = Vec::with_capacity(d.writes.len() * 5);
    for x in &d.writes {
        let s = r.cmds[x.index];
        v.extend([
            Value::from(s.sender.as_str()),
            Value::from(s.req.transaction_id.as_str()),
            Value::from(&r.shas[x.index][..]),
            Value::from(x.request_id),
            db_time(now),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO idempotency (sender, transaction_id, body_sha256, request_id, created_at) VALUES {}",
            marks(d.writes.len(), "(?,?,?,?,?)")
        ),
        &v,
    )?;
    Ok(())
}

/// Removed devices: disabled, their slot freed, their entitlements ended.
fn push_removals(w: &mut Script, d: &Decided, now: OffsetDateTime) -> Result<(), SmsError> {
    let removed: Vec<u64> = d
        .writes
        .iter()
        .filter_map(|x| match &x.work {
            Work::RemoveDevice { device_id, .. } => Some(device_id.get()),
            _ => None,
        })
        .collect();
    if removed.is_empty() {
        return Ok(());
    }
    let list = marks(removed.len(), "?");
    let with_times = |times: usize| {
        let mut v = vec![db_time(now); times];
        v.extend(values(&removed));
        v
    };
    w.push(
        &format!(
            "UPDATE devices SET state = 'disabled', group_id = NULL, slot = NULL, updated_at = ? \
             WHERE device_id IN ({list})"
        ),
        &with_times(1),
    )?;
    w.push(
        &format!("UPDATE group_slots SET device_id = NULL WHERE device_id IN ({list})"),
        &values(&removed),
    )?;
    w.push(
        &format!(
            "UPDATE entitlements SET state = 'ended', ended_at = ?, updated_at = ? \
             WHERE device_id IN ({list}) AND state = 'active'"
        ),
        &with_times(2),
    )?;
    Ok(())
}

/// A slot given to a device (new, or re-enabled).
struct Given {
    device_id: u64,
    group_id: u32,
    slot: u8,
    pmk_version: u32,
    reenabled: bool,
}

/// Slots given: every one was free and is locked by this round. Returns
/// the slot statement's index and the number of slots given (checked by
/// [`write`]).
fn push_slots(
    w: &mut Script,
    d: &Decided,
    now: OffsetDateTime,
) -> Result<Option<(usize, u64)>, SmsError> {
    let given: Vec<Given> = d
        .writes
        .iter()
        .filter_map(|x| match x.work {
            Work::AddDevice {
                device_id,
                group_id,
                slot,
                pmk_version,
                reenabled,
                ..
            } => Some(Given {
                device_id: device_id.get(),
                group_id,
                slot,
                pmk_version,
                reenabled,
            }),
            _ => None,
        })
        .collect();
    if given.is_empty() {
        return Ok(None);
    }
    let mut v: Vec<Value> = Vec::with_capacity(given.len() * 3);
    for g in &given {
        v.extend([g.group_id.into(), g.slot.into(), g.device_id.into()]);
    }
    let k = w.push(
        &format!(
            "INSERT INTO group_slots (group_id, slot, device_id) VALUES {} \
             ON DUPLICATE KEY UPDATE device_id = VALUES(device_id)",
            marks(given.len(), "(?,?,?)")
        ),
        &v,
    )?;
    push_devices(w, &given, now)?;
    Ok(Some((k, given.len() as u64)))
}

/// New devices inserted, removed ones enabled again in their new slot.
fn push_devices(w: &mut Script, given: &[Given], now: OffsetDateTime) -> Result<(), SmsError> {
    let fresh: Vec<&Given> = given.iter().filter(|g| !g.reenabled).collect();
    if !fresh.is_empty() {
        let mut v: Vec<Value> = Vec::with_capacity(fresh.len() * 6);
        for g in &fresh {
            v.extend([
                g.device_id.into(),
                g.group_id.into(),
                g.slot.into(),
                g.pmk_version.into(),
                db_time(now),
                db_time(now),
            ]);
        }
        w.push(
            &format!(
                "INSERT INTO devices (device_id, state, group_id, slot, pmk_version, created_at, updated_at) \
                 VALUES {}",
                marks(fresh.len(), "(?,'enabled',?,?,?,?,?)")
            ),
            &v,
        )?;
    }
    for g in given.iter().filter(|g| g.reenabled) {
        w.push(
            "UPDATE devices SET state = 'enabled', group_id = ?, slot = ?, updated_at = ? \
             WHERE device_id = ?",
            &[
                g.group_id.into(),
                g.slot.into(),
                db_time(now),
                g.device_id.into(),
            ],
        )?;
    }
    Ok(())
}

fn push_entitlements(w: &mut Script, d: &Decided, now: OffsetDateTime) -> Result<(), SmsError> {
    let mut adds: Vec<Value> = Vec::new();
    let mut ends: Vec<(u64, u32)> = Vec::new();
    for x in &d.writes {
        match x.work {
            Work::AddEntitlement {
                device_id,
                product_id,
                start,
                end,
                ..
            } => adds.extend([
                device_id.get().into(),
                product_id.get().into(),
                start.into(),
                end.into(),
                db_time(now),
            ]),
            Work::RemoveEntitlement {
                device_id,
                product_id,
                was_active: true,
            } => ends.push((device_id.get(), product_id.get())),
            _ => {}
        }
    }
    if !adds.is_empty() {
        w.push(
            &format!(
                "INSERT INTO entitlements (device_id, product_id, start_at, end_at, state, updated_at, ended_at) \
                 VALUES {} ON DUPLICATE KEY UPDATE start_at = VALUES(start_at), end_at = VALUES(end_at), \
                 state = 'active', updated_at = VALUES(updated_at), ended_at = NULL",
                marks(adds.len() / 5, "(?,?,?,?,'active',?,NULL)")
            ),
            &adds,
        )?;
    }
    if !ends.is_empty() {
        // One product per device in a round: the CASE picks it.
        let mut v = vec![db_time(now), db_time(now)];
        v.extend(ends.iter().map(|(d, _)| Value::from(*d)));
        for (d, p) in &ends {
            v.extend([Value::from(*d), Value::from(*p)]);
        }
        w.push(
            &format!(
                "UPDATE entitlements SET state = 'ended', ended_at = ?, updated_at = ? \
                 WHERE device_id IN ({}) AND state = 'active' AND product_id = CASE device_id {} END",
                marks(ends.len(), "?"),
                vec!["WHEN ? THEN ?"; ends.len()].join(" ")
            ),
            &v,
        )?;
    }
    Ok(())
}

/// The work items, in the round's order; a bulk command's is paced and
/// marked bulk (`queue::BulkPace`, `Work::into_bulk`).
fn push_work_items(
    w: &mut Script,
    r: &Round<'_>,
    d: &Decided,
    now: OffsetDateTime,
) -> Result<(), SmsError> {
    let works: Vec<(Work, OffsetDateTime)> = d
        .writes
        .iter()
        .map(
            |x| match (&r.cmds[x.index].bulk, x.work.clone().into_bulk()) {
                // Only adds are bulk work: a removal in a bulk request is not
                // delayed (its disable is urgent however it came).
                (Some(pace), work) if work.is_bulk() => (work, pace.next(now)),
                _ => (x.work.clone(), now),
            },
        )
        .collect();
    let items: Vec<NewItem<'_>> = d
        .writes
        .iter()
        .zip(&works)
        .map(|(x, (work, not_before))| NewItem {
            request_id: Some(x.request_id),
            work,
            not_before: At::Client(*not_before),
        })
        .collect();
    queue::push_enqueue(w, &items, At::Client(now))?;
    Ok(())
}

/// COMMIT, after telling the caller the round is ready for it.
async fn commit(
    conn: &mut Conn,
    ready_to_commit: &mut (dyn FnMut() + Send),
) -> Result<(), SmsError> {
    ready_to_commit();
    if crate::failpoint::armed(FAIL_COMMIT, conn.opts().db_name()) {
        return Err(SmsError::Internal(format!(
            "fail point {FAIL_COMMIT}: round abandoned before COMMIT"
        )));
    }
    conn.query_drop("COMMIT").await?;
    Ok(())
}

/// Fail point (tests only, see [`crate::failpoint`]): a round that has
/// written everything fails instead of committing (500, nothing stored).
pub const FAIL_COMMIT: &str = "sms::commit";
