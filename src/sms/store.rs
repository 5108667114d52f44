//! The SMS-CAS interface's database side: group commit of accepted
//! commands, records of refused requests, and the read-only queries.
//!
//! Accepted commands are committed in batches ([`accept_batch`], fed by
//! [`super::commit::Committer`]): all the commands waiting at a moment go
//! into one READ COMMITTED transaction (a *round*) holding, for every
//! accepted one, its `sms_requests` row, its `idempotency` row, its state
//! change (`devices`, `group_slots`, `entitlements`) and one `work_items`
//! row, written as multi-row statements: about a dozen statements and one
//! fsync per round, whatever its size. Nothing is answered before the
//! round commits, and a round that fails writes nothing.
//!
//! The outcome of every command is the one it would have had alone, in
//! arrival order: a round holds at most one command per device and per
//! (sender, transaction_id), so each command is checked against the state
//! its predecessors committed. The device rows are locked `FOR UPDATE`
//! (in ascending order), which serializes rounds about the same device,
//! also across processes, and makes work item ids follow commit order
//! (per-device order). READ COMMITTED keeps InnoDB from taking gap locks,
//! which would make two rounds adding new devices deadlock each other.
//! A transaction_id accepted by a concurrent round, or a new device added
//! by one, shows up as a duplicate key on our INSERT: the round is rolled
//! back and run again, and then sees it (a replay, a 409). Deadlocks and
//! lock-wait timeouts are retried the same way.

use mysql_async::prelude::*;
use mysql_async::{Conn, Value};
use serde_json::json;
use time::OffsetDateTime;

use super::error::SmsError;
use super::types::{Command, CommandRequest, Target};
use super::work::Work;
use crate::db::{Db, DbError};
use crate::sqltext::{col, marks, Script};

/// How long an OSM is carouselled when the SMS gives no `expires_at`.
pub const DEFAULT_OSM_LIFETIME_S: u32 = 24 * 3600;

/// Attempts of one round on deadlock / lock-wait timeout / duplicate key.
const ATTEMPTS: usize = 5;

/// A DATETIME(6) parameter (UTC).
pub fn db_time(t: OffsetDateTime) -> Value {
    let t = t.to_offset(time::UtcOffset::UTC);
    Value::Date(
        t.year().clamp(0, 9999) as u16,
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond(),
    )
}

/// `DATE_FORMAT` pattern giving RFC 3339 with microseconds, UTC.
pub const RFC3339_SQL: &str = "%Y-%m-%dT%H:%i:%s.%fZ";

/// What the request was, for the `sms_requests` row.
pub struct RequestMeta<'a> {
    pub sender: &'a str,
    pub path: &'a str,
    pub message: &'a str,
    pub received_at: OffsetDateTime,
}

/// The outcome of an accepted command.
#[derive(Debug)]
pub enum Accepted {
    /// Committed now: the reply to send (also stored in the request row).
    New { request_id: u64, reply: String },
    /// The same transaction_id with the same command was accepted before:
    /// its stored reply.
    Replay { original_id: u64, reply: String },
}

/// One command to accept, with what the request was (owned: it waits in
/// the committer's queue).
#[derive(Clone, Debug)]
pub struct Submission {
    pub sender: String,
    pub path: &'static str,
    pub message: String,
    pub received_at: OffsetDateTime,
    pub req: CommandRequest,
}

fn is_retryable(e: &SmsError) -> bool {
    // 1213 deadlock, 1205 lock wait timeout, 1062 a concurrent transaction
    // (another committer or process) took the same transaction_id or added
    // the same new device first: the round is run again and then sees it.
    matches!(e, SmsError::Db(DbError::Query(mysql_async::Error::Server(s))) if matches!(s.code, 1213 | 1205 | 1062))
}

/// Stores one accepted command (or finds it accepted before): a batch of
/// one. Refusals that depend on the state (unknown device, device exists,
/// transaction reused, an OSM already expired) come back as `Err` with
/// nothing changed.
pub async fn accept(
    db: &Db,
    meta: &RequestMeta<'_>,
    req: &CommandRequest,
) -> Result<Accepted, SmsError> {
    let sub = Submission {
        sender: meta.sender.to_owned(),
        path: static_path(meta.path),
        message: meta.message.to_owned(),
        received_at: meta.received_at,
        req: req.clone(),
    };
    accept_batch(db, std::slice::from_ref(&sub))
        .await
        .pop()
        .unwrap_or_else(|| Err(SmsError::Internal("no outcome for the command".into())))
}

/// The request paths are the five command paths; anything else is kept as
/// a generic name (only tests call [`accept`] with other paths).
fn static_path(p: &str) -> &'static str {
    super::types::CommandKind::ALL
        .iter()
        .map(|k| k.path())
        .find(|k| *k == p)
        .unwrap_or("/command")
}

/// A batch-wide failure, given to every command of the batch.
pub fn shared_error(e: &SmsError) -> SmsError {
    match e {
        SmsError::Db(d) if d.is_unavailable() => SmsError::Db(DbError::Unreachable(d.to_string())),
        other => SmsError::Internal(other.to_string()),
    }
}

/// Group commit: accepts `subs` in as few transactions as their order
/// allows and returns one outcome per submission, in order. The outcome of
/// each command is exactly what accepting them one by one, in this order,
/// would give:
///
/// - a *round* is one READ COMMITTED transaction holding at most one
///   command per device and per (sender, transaction_id); a command that
///   meets a device or key already in the round waits for the next round,
///   and so does every later command of that device or key (order kept);
/// - a round that fails on a deadlock, a lock-wait timeout or a duplicate
///   key (a concurrent committer got there first) is rolled back and run
///   again; one that fails for good fails every command not yet committed
///   (later ones may depend on it), with nothing written.
pub async fn accept_batch(db: &Db, subs: &[Submission]) -> Vec<Result<Accepted, SmsError>> {
    match db.conn().await {
        Ok(mut conn) => accept_batch_on(&mut conn, subs, &SlotHint::default()).await,
        Err(e) => {
            let e = SmsError::Db(e);
            subs.iter().map(|_| Err(shared_error(&e))).collect()
        }
    }
}

/// [`accept_batch`] on a connection the caller keeps (the committer's own:
/// no pool round trip per batch).
pub async fn accept_batch_on(
    conn: &mut Conn,
    subs: &[Submission],
    hint: &SlotHint,
) -> Vec<Result<Accepted, SmsError>> {
    accept_batch_gated(conn, subs, hint, &mut || {}).await
}

/// [`accept_batch_on`], calling `before_commit` when a round has done its
/// reads and writes and only its end is left (its COMMIT and fsync, or a
/// ROLLBACK when it has nothing to write): the committer lets the next
/// batch start building then.
pub async fn accept_batch_gated(
    conn: &mut Conn,
    subs: &[Submission],
    hint: &SlotHint,
    before_commit: &mut (dyn FnMut() + Send),
) -> Vec<Result<Accepted, SmsError>> {
    let mut out: Vec<Option<Result<Accepted, SmsError>>> =
        std::iter::repeat_with(|| None).take(subs.len()).collect();
    let mut pending: Vec<usize> = (0..subs.len()).collect();
    while !pending.is_empty() {
        let (round, rest) = pick_round(subs, &pending);
        match run_round(conn, subs, &round, hint, before_commit).await {
            Ok(results) => {
                for (i, r) in round.iter().zip(results) {
                    out[*i] = Some(r);
                }
                pending = rest;
            }
            Err(e) => {
                if !matches!(&e, SmsError::Db(d) if d.is_unavailable()) {
                    tracing::error!("SMS command batch failed: {e}");
                }
                // Later commands may depend on this round: none of the
                // rest is stored either.
                for o in out.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(Err(shared_error(&e)));
                }
                break;
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err(SmsError::Internal("command left unanswered".into()))))
        .collect()
}

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
    fn start(&self) -> ((u32, u8), u64) {
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
    fn found(&self, gs: (u32, u8), generation: u64) {
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
    fn freed(&self, gs: (u32, u8)) {
        if let Ok(mut h) = self.state.lock() {
            h.generation += 1;
            if let Some((floor, _)) = h.floor.as_mut() {
                *floor = (*floor).min(gs);
            }
        }
    }
    fn reset(&self) {
        if let Ok(mut h) = self.state.lock() {
            h.generation += 1;
            h.floor = None;
        }
    }
}

/// Splits `pending` (indexes in arrival order) into this round and the
/// rest: see [`accept_batch`].
fn pick_round(subs: &[Submission], pending: &[usize]) -> (Vec<usize>, Vec<usize>) {
    use std::collections::HashSet;
    let mut devices: HashSet<u64> = HashSet::new();
    let mut keys: HashSet<(&str, &str)> = HashSet::new();
    let mut held_devices: HashSet<u64> = HashSet::new();
    let mut held_keys: HashSet<(&str, &str)> = HashSet::new();
    let (mut round, mut rest) = (Vec::new(), Vec::new());
    for &i in pending {
        let s = &subs[i];
        let key = (s.sender.as_str(), s.req.transaction_id.as_str());
        let dev = s.req.command.device_id().map(|d| d.get());
        let clash = keys.contains(&key)
            || held_keys.contains(&key)
            || dev.is_some_and(|d| devices.contains(&d) || held_devices.contains(&d));
        if clash {
            held_keys.insert(key);
            if let Some(d) = dev {
                held_devices.insert(d);
            }
            rest.push(i);
        } else {
            keys.insert(key);
            if let Some(d) = dev {
                devices.insert(d);
            }
            round.push(i);
        }
    }
    (round, rest)
}

/// Runs one round until it commits, retrying contention; creating group
/// slots between attempts when the round needs more than are free.
async fn run_round(
    conn: &mut Conn,
    subs: &[Submission],
    round: &[usize],
    hint: &SlotHint,
    before_commit: &mut (dyn FnMut() + Send),
) -> Result<Vec<Result<Accepted, SmsError>>, SmsError> {
    let cmds: Vec<&Submission> = round.iter().map(|i| &subs[*i]).collect();
    let shas: Vec<[u8; 32]> = cmds.iter().map(|s| s.req.canonical_sha256()).collect();
    let mut attempt = 0;
    let mut slot_rounds = 0;
    // The first attempt does without the idempotency lookup; any attempt
    // after a failure (a duplicate key among them) does it.
    let mut lookup = false;
    loop {
        attempt += 1;
        match try_round(conn, &cmds, &shas, hint, lookup, before_commit).await {
            Ok(RoundEnd::Committed(r)) => return Ok(r),
            Ok(RoundEnd::NeedSlots(n)) => {
                // Not an attempt lost to contention: a burst of adddevice
                // may fill the free slots before this round gets them.
                slot_rounds += 1;
                if slot_rounds > 64 {
                    return Err(SmsError::Db(DbError::Unreachable(
                        "could not allocate group slots".into(),
                    )));
                }
                attempt -= 1;
                // Free slots below the hint (freed by another process)
                // count too: the next attempt scans from group 1.
                hint.reset();
                ensure_free_slots(conn, n).await?;
            }
            Err(e) if attempt < ATTEMPTS && is_retryable(&e) => lookup = true,
            Err(e) => return Err(e),
        }
    }
}

enum RoundEnd {
    Committed(Vec<Result<Accepted, SmsError>>),
    /// Fewer free slots than the round's adddevice need: rolled back.
    NeedSlots(usize),
}

/// What one command of a round does.
enum Plan {
    /// Answered without a change (refused, or a replay).
    Answer(Result<Accepted, SmsError>),
    /// Accepted: its work item, which also says the state change.
    Accept(Work),
}

/// The device's row as the round found (and locked) it.
struct DeviceRow {
    enabled: bool,
    group_id: Option<u32>,
    slot: Option<u8>,
    pmk_version: u32,
}

/// One round: a script of reads (the round's transaction begins, the
/// device rows are locked), the decisions in memory, a script of writes,
/// COMMIT. Anything but a commit ends in ROLLBACK.
async fn try_round(
    conn: &mut Conn,
    cmds: &[&Submission],
    shas: &[[u8; 32]],
    hint: &SlotHint,
    lookup: bool,
    before_commit: &mut (dyn FnMut() + Send),
) -> Result<RoundEnd, SmsError> {
    let mut scanned = None;
    let r = round(conn, cmds, shas, hint, &mut scanned, lookup, before_commit).await;
    if !matches!(r, Ok(RoundEnd::Committed(_))) {
        // Also after a failed statement or COMMIT: the transaction may be
        // open. A broken connection fails here too; it is not reused.
        let _ = conn.query_drop("ROLLBACK").await;
        // The slots it found are free again.
        if let Some(gs) = scanned {
            hint.freed(gs);
        }
    }
    r
}

/// `scanned`: set to the lowest free slot the round found.
async fn round(
    conn: &mut Conn,
    cmds: &[&Submission],
    shas: &[[u8; 32]],
    hint: &SlotHint,
    scanned: &mut Option<(u32, u8)>,
    lookup: bool,
    before_commit: &mut (dyn FnMut() + Send),
) -> Result<RoundEnd, SmsError> {
    use std::collections::{HashMap, HashSet};
    let now = OffsetDateTime::now_utc();
    let now_unix = now.unix_timestamp().clamp(0, u32::MAX as i64) as u32;

    // 1. Reads, in the transaction. A transaction_id accepted by a
    //    concurrent round that has not committed yet is not seen here; our
    //    INSERT below then waits for it and fails with a duplicate key, and
    //    the round is run again.
    let mut reads = Script::default();
    reads.push("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", &[])?;
    reads.push("START TRANSACTION", &[])?;
    let adds = cmds
        .iter()
        .filter(|s| matches!(s.req.command, Command::AddDevice { .. }))
        .count();
    // The PMK version new devices' DUKs derive from: the key store's
    // current PMK (metadata only, never key bytes); 1 on a store without
    // any PMK yet (a database the Encryptor has not initialised). In the
    // same statement, a request id per command from the sequence (not
    // transactional: a refused command, a replay or a rolled-back round
    // leaves a gap), so that the writes below carry them as literals.
    let pmk_and_ids = reads.push(
        &format!(
            "SELECT {}, {}",
            if adds > 0 {
                "(SELECT version FROM `keys` WHERE kind = 'pmk' AND group_id = 0 \
                 AND state <> 'retired' AND activates_at <= FROM_UNIXTIME(?) \
                 ORDER BY version DESC LIMIT 1)"
            } else {
                "NULL"
            },
            vec!["NEXTVAL(sms_request_ids)"; cmds.len()].join(", ")
        ),
        &if adds > 0 {
            vec![Value::from(now_unix)]
        } else {
            Vec::new()
        },
    )?;
    // The devices, locked in ascending order (two rounds never wait on
    // each other in a cycle).
    let mut dev_ids: Vec<u64> = cmds
        .iter()
        .filter_map(|s| s.req.command.device_id().map(|d| d.get()))
        .collect();
    dev_ids.sort_unstable();
    dev_ids.dedup();
    let ids_of = |v: &[u64]| v.iter().map(|d| Value::from(*d)).collect::<Vec<_>>();
    let dev_set = if dev_ids.is_empty() {
        None
    } else {
        Some(reads.push(
            &format!(
                "SELECT device_id, state, group_id, slot, pmk_version FROM devices \
                 WHERE device_id IN ({}) ORDER BY device_id FOR UPDATE",
                marks(dev_ids.len(), "?")
            ),
            &ids_of(&dev_ids),
        )?)
    };
    // Free slots, the lowest first, as many as there are adddevice (some
    // may go unused: refused or replayed); slots locked by concurrent
    // rounds are skipped, never waited for.
    let ((floor_group, floor_slot), hint_generation) = hint.start();
    let slot_set = if adds > 0 {
        Some(reads.push(
            "SELECT group_id, slot FROM group_slots WHERE device_id IS NULL \
             AND (group_id > ? OR (group_id = ? AND slot >= ?)) \
             ORDER BY group_id, slot LIMIT ? FOR UPDATE SKIP LOCKED",
            &[
                Value::from(floor_group),
                Value::from(floor_group),
                Value::from(floor_slot),
                Value::from(adds as u64),
            ],
        )?)
    } else {
        None
    };
    // Idempotency, read *after* the device locks: a concurrent round that
    // held one of our devices has committed by now, and a duplicate it
    // accepted must be seen here as a replay (not as "device exists").
    // One not seen (no shared device, not committed yet) makes our
    // INSERT wait for it and fail with a duplicate key: the round is run
    // again.
    //
    // Only when `lookup`: a round first runs without it (a replay is rare,
    // and the lookup was a tenth of a command's cost). Then a replay that
    // would be accepted again fails on the idempotency key and the round
    // is run again with the lookup; a command refused against the state
    // (a replayed adddevice finds its device) has its key looked up after
    // the plan, below, in the same transaction.
    let idem_sets = if lookup {
        let all: Vec<usize> = (0..cmds.len()).collect();
        push_idempotency_lookup(&mut reads, cmds, &all)?
    } else {
        Vec::new()
    };
    let mut groups: Vec<u32> = cmds
        .iter()
        .filter_map(|s| match &s.req.command {
            Command::GenerateOsm {
                target: Target::Group(g),
                ..
            } => Some(g.get()),
            _ => None,
        })
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let group_set = if groups.is_empty() {
        None
    } else {
        Some(reads.push(
            &format!(
                "SELECT DISTINCT group_id FROM group_slots WHERE group_id IN ({})",
                marks(groups.len(), "?")
            ),
            &groups.iter().map(|g| Value::from(*g)).collect::<Vec<_>>(),
        )?)
    };
    let rm_ent: Vec<u64> = cmds
        .iter()
        .filter_map(|s| match &s.req.command {
            Command::RemoveEntitlement { device_id, .. } => Some(device_id.get()),
            _ => None,
        })
        .collect();
    let active_set = if rm_ent.is_empty() {
        None
    } else {
        Some(reads.push(
            &format!(
                "SELECT device_id, product_id FROM entitlements \
                 WHERE device_id IN ({}) AND state = 'active'",
                marks(rm_ent.len(), "?")
            ),
            &ids_of(&rm_ent),
        )?)
    };
    let sets = reads.run(conn).await?;

    let (pmk_version, round_ids): (u32, Vec<u64>) = match sets[pmk_and_ids].first() {
        Some(r) => (
            col::<Option<u32>>(r, 0)?.unwrap_or(1),
            (1..=cmds.len())
                .map(|k| col(r, k))
                .collect::<Result<_, _>>()?,
        ),
        None => return Err(SmsError::Internal("no request ids".into())),
    };
    let mut plans: Vec<Option<Plan>> = std::iter::repeat_with(|| None).take(cmds.len()).collect();
    for (i, answer) in idempotency_answers(&sets, &idem_sets, cmds, shas)? {
        plans[i] = Some(answer);
    }
    let mut devices: HashMap<u64, DeviceRow> = HashMap::new();
    if let Some(k) = dev_set {
        for row in &sets[k] {
            let state: String = col(row, 1)?;
            devices.insert(
                col(row, 0)?,
                DeviceRow {
                    enabled: state == "enabled",
                    group_id: col(row, 2)?,
                    slot: col(row, 3)?,
                    pmk_version: col(row, 4)?,
                },
            );
        }
    }
    let mut free: Vec<(u32, u8)> = Vec::new();
    if let Some(k) = slot_set {
        for row in &sets[k] {
            free.push((col(row, 0)?, col(row, 1)?));
        }
    }
    if let (Some(&lowest), Some(&(g, s))) = (free.first(), free.last()) {
        // The next scan starts after the slots this round took (and
        // locked); if the round rolls back, they are freed again.
        let next = if s == u8::MAX { (g + 1, 0) } else { (g, s + 1) };
        hint.found(next, hint_generation);
        *scanned = Some(lowest);
    }
    let mut known_groups: HashSet<u32> = HashSet::new();
    if let Some(k) = group_set {
        for row in &sets[k] {
            known_groups.insert(col(row, 0)?);
        }
    }
    let mut active: HashSet<(u64, u32)> = HashSet::new();
    if let Some(k) = active_set {
        for row in &sets[k] {
            active.insert((col(row, 0)?, col(row, 1)?));
        }
    }

    // 2. Each command against the state it found: refused, or accepted
    //    with its work item (an adddevice's slot is given below, once the
    //    number needed is known).
    let enabled = |d: u64| devices.get(&d).is_some_and(|r| r.enabled);
    for (i, s) in cmds.iter().enumerate() {
        if plans[i].is_some() {
            continue;
        }
        let refuse = |e: SmsError| Some(Plan::Answer(Err(e)));
        let accept = |w: Work| Some(Plan::Accept(w));
        plans[i] = match &s.req.command {
            Command::AddDevice { device_id } => match devices.get(&device_id.get()) {
                Some(r) if r.enabled => refuse(SmsError::DeviceExists(device_id.get())),
                // Re-adding a removed device enables it again with a new
                // slot; its PMK version (burned into the card) is kept and
                // its old entitlements stay ended.
                r => accept(Work::AddDevice {
                    device_id: *device_id,
                    group_id: 0,
                    slot: 0,
                    pmk_version: r.map_or(pmk_version, |r| r.pmk_version),
                    reenabled: r.is_some(),
                }),
            },
            Command::RemoveDevice { device_id } => match devices.get(&device_id.get()) {
                Some(r) if r.enabled => accept(Work::RemoveDevice {
                    device_id: *device_id,
                    group_id: r.group_id,
                    slot: r.slot,
                }),
                _ => refuse(SmsError::UnknownDevice(device_id.get())),
            },
            // A removed (disabled) device is unknown to the SMS until re-added.
            Command::AddEntitlement { device_id, .. }
            | Command::RemoveEntitlement { device_id, .. }
                if !enabled(device_id.get()) =>
            {
                refuse(SmsError::UnknownDevice(device_id.get()))
            }
            Command::AddEntitlement {
                device_id,
                product_id,
                start,
                end,
            } => accept(Work::AddEntitlement {
                device_id: *device_id,
                product_id: *product_id,
                start: start.0,
                end: end.0,
            }),
            Command::RemoveEntitlement {
                device_id,
                product_id,
            } => accept(Work::RemoveEntitlement {
                device_id: *device_id,
                product_id: *product_id,
                was_active: active.contains(&(device_id.get(), product_id.get())),
            }),
            Command::GenerateOsm {
                target,
                text,
                duration_s,
                forced,
                expires_at,
            } => match (expires_at, target) {
                (Some(t), _) if t.0 <= now_unix => refuse(SmsError::AlreadyExpired),
                (_, Target::Device(d)) if !enabled(d.get()) => {
                    refuse(SmsError::UnknownDevice(d.get()))
                }
                (_, Target::Group(g)) if !known_groups.contains(&g.get()) => {
                    refuse(SmsError::UnknownGroup(g.get()))
                }
                (e, _) => accept(Work::GenerateOsm {
                    target: *target,
                    text: text.as_str().to_owned(),
                    duration_s: *duration_s,
                    forced: *forced,
                    not_after: e
                        .map(|t| t.0)
                        .unwrap_or_else(|| now_unix.saturating_add(DEFAULT_OSM_LIFETIME_S)),
                }),
            },
        };
    }
    if !lookup {
        // Refused against the state: a replay of an accepted command
        // looks the same (its device exists, or is gone); its stored
        // reply is the answer.
        let refused: Vec<usize> = (0..cmds.len())
            .filter(|i| matches!(plans[*i], Some(Plan::Answer(Err(_)))))
            .collect();
        if !refused.is_empty() {
            let mut q = Script::default();
            let idem_sets = push_idempotency_lookup(&mut q, cmds, &refused)?;
            let sets = q.run(conn).await?;
            for (i, answer) in idempotency_answers(&sets, &idem_sets, cmds, shas)? {
                plans[i] = Some(answer);
            }
        }
    }
    let mut plans: Vec<Plan> = plans
        .into_iter()
        .map(|p| p.ok_or_else(|| SmsError::Internal("command without a plan".into())))
        .collect::<Result<_, _>>()?;

    // 3. Slots for the devices being (re-)enabled, in arrival order.
    let need = plans
        .iter()
        .filter(|p| matches!(p, Plan::Accept(Work::AddDevice { .. })))
        .count();
    if free.len() < need {
        return Ok(RoundEnd::NeedSlots(need));
    }
    let mut slots = free.into_iter();
    for p in &mut plans {
        if let Plan::Accept(Work::AddDevice { group_id, slot, .. }) = p {
            (*group_id, *slot) = slots
                .next()
                .ok_or_else(|| SmsError::Internal("a slot per adddevice".into()))?;
        }
    }
    let mut accepted: Vec<(usize, Work)> = Vec::new();
    let mut answers: Vec<Option<Result<Accepted, SmsError>>> = Vec::with_capacity(plans.len());
    for (i, p) in plans.into_iter().enumerate() {
        match p {
            Plan::Answer(a) => answers.push(Some(a)),
            Plan::Accept(w) => {
                accepted.push((i, w));
                answers.push(None);
            }
        }
    }
    if accepted.is_empty() {
        // Nothing to write: end the transaction (and its locks).
        before_commit();
        conn.query_drop("ROLLBACK").await?;
        return Ok(RoundEnd::Committed(
            answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(SmsError::Internal("unanswered".into()))))
                .collect(),
        ));
    }

    // 4. Writes, one script. Each request row is inserted with its id
    //    (read above) and its whole reply.
    let n = accepted.len();
    let mut w = Script::default();
    let replies: Vec<(u64, String)> = accepted
        .iter()
        .map(|(i, _)| {
            let rid = round_ids[*i];
            (
                rid,
                format!(
                    "{{\"request_id\":{rid},\"status\":\"accepted\",\"transaction_id\":{}}}",
                    serde_json::Value::from(cmds[*i].req.transaction_id.as_str())
                ),
            )
        })
        .collect();
    let mut v: Vec<Value> = Vec::with_capacity(n * 7);
    for ((i, _), (rid, reply)) in accepted.iter().zip(&replies) {
        let s = cmds[*i];
        v.extend([
            Value::from(*rid),
            Value::from(s.sender.as_str()),
            Value::from(s.req.transaction_id.as_str()),
            Value::from(s.path),
            Value::from(s.message.as_str()),
            db_time(s.received_at),
            Value::from(reply.as_str()),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO sms_requests \
             (id, sender, transaction_id, path, message, received_at, status_code, response) VALUES {}",
            marks(n, "(?,?,?,?,?,?,200,?)")
        ),
        &v,
    )?;
    let mut v: Vec<Value> = Vec::with_capacity(n * 5);
    for ((i, _), (rid, _)) in accepted.iter().zip(&replies) {
        v.extend([
            Value::from(cmds[*i].sender.as_str()),
            Value::from(cmds[*i].req.transaction_id.as_str()),
            Value::from(&shas[*i][..]),
            Value::from(*rid),
            db_time(now),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO idempotency (sender, transaction_id, body_sha256, request_id, created_at) VALUES {}",
            marks(n, "(?,?,?,?,?)")
        ),
        &v,
    )?;

    // Devices: removals free their slot and end their entitlements.
    let removed: Vec<u64> = accepted
        .iter()
        .filter_map(|(_, w)| match w {
            Work::RemoveDevice { device_id, .. } => Some(device_id.get()),
            _ => None,
        })
        .collect();
    if !removed.is_empty() {
        let list = marks(removed.len(), "?");
        let mut v = vec![db_time(now)];
        v.extend(ids_of(&removed));
        w.push(
            &format!(
                "UPDATE devices SET state = 'disabled', group_id = NULL, slot = NULL, updated_at = ? \
                 WHERE device_id IN ({list})"
            ),
            &v,
        )?;
        w.push(
            &format!("UPDATE group_slots SET device_id = NULL WHERE device_id IN ({list})"),
            &ids_of(&removed),
        )?;
        let mut v = vec![db_time(now), db_time(now)];
        v.extend(ids_of(&removed));
        w.push(
            &format!(
                "UPDATE entitlements SET state = 'ended', ended_at = ?, updated_at = ? \
                 WHERE device_id IN ({list}) AND state = 'active'"
            ),
            &v,
        )?;
    }
    // Slots given: every one was free and is locked by this round.
    let given: Vec<(u64, u32, u8, u32, bool)> = accepted
        .iter()
        .filter_map(|(_, w)| match w {
            Work::AddDevice {
                device_id,
                group_id,
                slot,
                pmk_version,
                reenabled,
            } => Some((device_id.get(), *group_id, *slot, *pmk_version, *reenabled)),
            _ => None,
        })
        .collect();
    let mut slots_set = None;
    if !given.is_empty() {
        let mut v: Vec<Value> = Vec::with_capacity(given.len() * 3);
        for (d, g, s, _, _) in &given {
            v.extend([Value::from(*g), Value::from(*s), Value::from(*d)]);
        }
        let k = w.push(
            &format!(
                "INSERT INTO group_slots (group_id, slot, device_id) VALUES {} \
                 ON DUPLICATE KEY UPDATE device_id = VALUES(device_id)",
                marks(given.len(), "(?,?,?)")
            ),
            &v,
        )?;
        slots_set = Some(k);
        let fresh: Vec<&(u64, u32, u8, u32, bool)> = given.iter().filter(|g| !g.4).collect();
        if !fresh.is_empty() {
            let mut v: Vec<Value> = Vec::with_capacity(fresh.len() * 6);
            for (d, g, s, pmk, _) in &fresh {
                v.extend([
                    Value::from(*d),
                    Value::from(*g),
                    Value::from(*s),
                    Value::from(*pmk),
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
        for (d, g, s, _, _) in given.iter().filter(|g| g.4) {
            w.push(
                "UPDATE devices SET state = 'enabled', group_id = ?, slot = ?, updated_at = ? \
                 WHERE device_id = ?",
                &[
                    Value::from(*g),
                    Value::from(*s),
                    db_time(now),
                    Value::from(*d),
                ],
            )?;
        }
    }
    // Entitlements.
    let adds: Vec<Value> = accepted
        .iter()
        .filter_map(|(_, w)| match w {
            Work::AddEntitlement {
                device_id,
                product_id,
                start,
                end,
            } => Some([
                Value::from(device_id.get()),
                Value::from(product_id.get()),
                Value::from(*start),
                Value::from(*end),
                db_time(now),
            ]),
            _ => None,
        })
        .flatten()
        .collect();
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
    let ends: Vec<(u64, u32)> = accepted
        .iter()
        .filter_map(|(_, w)| match w {
            Work::RemoveEntitlement {
                device_id,
                product_id,
                was_active: true,
            } => Some((device_id.get(), product_id.get())),
            _ => None,
        })
        .collect();
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
    // The work items, in the round's order.
    let mut v: Vec<Value> = Vec::with_capacity(n * 6);
    for ((_, work), (rid, _)) in accepted.iter().zip(&replies) {
        v.extend([
            Value::from(*rid),
            Value::from(work.kind()),
            work.device_id()
                .map(|d| Value::from(d.get()))
                .unwrap_or(Value::NULL),
            Value::from(serde_json::to_string(work).unwrap_or_default()),
            db_time(now),
            db_time(now),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO work_items (request_id, kind, device_id, payload, state, attempts, not_before, created_at) \
             VALUES {}",
            marks(n, "(?,?,?,?,'pending',0,?,?)")
        ),
        &v,
    )?;
    let (_, affected) = w.run_counted(conn).await?;

    // 5. Checks, then COMMIT.
    if let Some(k) = slots_set {
        // Each row must have been an existing free slot changed (2 per row
        // for ON DUPLICATE KEY UPDATE, in the statement's OK packet);
        // anything else means the slot table and the device table
        // disagree: write nothing.
        if affected.get(k).copied() != Some(2 * given.len() as u64) {
            return Err(SmsError::Internal(
                "group slot assignment touched unexpected rows".into(),
            ));
        }
    }
    before_commit();
    conn.query_drop("COMMIT").await?;
    for (_, w) in &accepted {
        if let Work::RemoveDevice {
            group_id: Some(g),
            slot: Some(s),
            ..
        } = w
        {
            hint.freed((*g, *s));
        }
    }

    for ((i, _), (request_id, reply)) in accepted.iter().zip(replies) {
        answers[*i] = Some(Ok(Accepted::New { request_id, reply }));
    }
    Ok(RoundEnd::Committed(
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(SmsError::Internal("unanswered".into()))))
            .collect(),
    ))
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

/// The answers of the commands the lookup found, by index: the stored
/// reply (same body) or `TransactionReused`.
fn idempotency_answers(
    sets: &[Vec<mysql_async::Row>],
    idem_sets: &[(usize, Vec<usize>)],
    cmds: &[&Submission],
    shas: &[[u8; 32]],
) -> Result<Vec<(usize, Plan)>, SmsError> {
    let mut out = Vec::new();
    for (k, idx) in idem_sets {
        for row in &sets[*k] {
            let tid: String = col(row, 0)?;
            let stored: Vec<u8> = col(row, 1)?;
            let original_id: u64 = col(row, 2)?;
            let response: Option<String> = col(row, 3)?;
            let Some(&i) = idx
                .iter()
                .find(|i| cmds[**i].req.transaction_id.as_str() == tid)
            else {
                continue;
            };
            out.push((
                i,
                Plan::Answer(match response {
                    _ if stored.as_slice() != shas[i].as_slice() => {
                        Err(SmsError::TransactionReused)
                    }
                    Some(reply) if !reply.is_empty() => Ok(Accepted::Replay { original_id, reply }),
                    _ => Err(SmsError::Internal(format!(
                        "idempotency row of request {original_id} has no stored reply"
                    ))),
                }),
            ));
        }
    }
    Ok(out)
}

/// Makes at least `needed` group slots free, creating groups of 256 free
/// slots, committed on their own (not in a command transaction: an INSERT
/// that meets duplicates keeps shared locks on them until its transaction
/// ends, which would hide those slots from every concurrent `SKIP LOCKED`
/// allocation). Serialised by a named lock, and only for what is missing:
/// groups fill in order, and an empty extra group is waste. Two processes
/// creating the same group at once: the second one's IGNORE skips the rows.
async fn ensure_free_slots(conn: &mut Conn, needed: usize) -> Result<(), SmsError> {
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

/// Stores a request that was not accepted as a new command: a refusal, or
/// a replay of an accepted one (`processed` = true: nothing to produce).
/// Autocommit: one INSERT.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    db: &Db,
    sender: &str,
    transaction_id: Option<&str>,
    path: &str,
    message: &str,
    received_at: OffsetDateTime,
    status: u16,
    response: &str,
    processed: bool,
) -> Result<u64, DbError> {
    let mut conn = db.conn().await?;
    conn.reset_connection(false);
    let id: Option<u64> = conn
        .exec_first(
        "INSERT INTO sms_requests (id, sender, transaction_id, path, message, received_at, processed_at, status_code, response) \
         VALUES (NEXTVAL(sms_request_ids), ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            sender,
            transaction_id,
            path,
            message,
            db_time(received_at),
            if processed {
                db_time(OffsetDateTime::now_utc())
            } else {
                Value::NULL
            },
            status,
            response,
        ),
    )
    .await?;
    id.ok_or_else(|| DbError::Unreachable("no id returned for sms_requests".into()))
}

/// `GET /requests/{id}`: the request's progress, or None when unknown (or
/// another sender's, unless `any_sender`).
pub async fn request_status(
    db: &Db,
    id: u64,
    sender: &str,
    any_sender: bool,
) -> Result<Option<serde_json::Value>, DbError> {
    let mut conn = db.conn().await?;
    conn.reset_connection(false);
    type Row = (
        String,
        Option<String>,
        String,
        String,
        Option<String>,
        u16,
        String,
    );
    let row: Option<Row> = conn
        .exec_first(
            format!(
                "SELECT sender, transaction_id, path, DATE_FORMAT(received_at, '{f}'), \
                 DATE_FORMAT(processed_at, '{f}'), status_code, response FROM sms_requests WHERE id = ?",
                f = RFC3339_SQL
            ),
            (id,),
        )
        .await?;
    let Some((owner, tid, path, received_at, processed_at, status_code, response)) = row else {
        return Ok(None);
    };
    if owner != sender && !any_sender {
        return Ok(None);
    }
    let emm_ids: Vec<u64> = conn
        .exec(
            "SELECT id FROM emms WHERE request_id = ? ORDER BY id",
            (id,),
        )
        .await?;
    let work: Option<(String, u32, Option<String>)> = conn
        .exec_first(
            "SELECT state, attempts, last_error FROM work_items WHERE request_id = ? ORDER BY id LIMIT 1",
            (id,),
        )
        .await?;
    let reply: serde_json::Value =
        serde_json::from_str(&response).unwrap_or(serde_json::Value::Null);
    // A replay's row carries the original's reply; point at the original.
    let original = reply
        .get("request_id")
        .and_then(|v| v.as_u64())
        .filter(|r| *r != id);
    let failed = work.as_ref().is_some_and(|w| w.0 == "failed");
    let status = match (status_code, original) {
        (200, Some(_)) => "replayed",
        (200, None) if processed_at.is_some() => "processed",
        (200, None) if failed => "failed",
        (200, None) => "accepted",
        _ => "refused",
    };
    let mut v = json!({
        "request_id": id,
        "transaction_id": tid,
        "path": path,
        "status": status,
        "status_code": status_code,
        "received_at": received_at,
        "processed_at": processed_at,
        "emm_ids": emm_ids,
        "response": reply,
        "work": work.map(|(state, attempts, last_error)| json!({
            "state": state, "attempts": attempts, "last_error": last_error,
        })),
    });
    if let Some(o) = original {
        v["original_request_id"] = json!(o);
    }
    Ok(Some(v))
}

/// `GET /devices/{id}`: the device, its slot and its entitlements.
pub async fn device_status(db: &Db, device_id: u64) -> Result<Option<serde_json::Value>, DbError> {
    let mut conn = db.conn().await?;
    conn.reset_connection(false);
    type Row = (String, Option<u32>, Option<u8>, u32, String, String);
    let row: Option<Row> = conn
        .exec_first(
            format!(
                "SELECT state, group_id, slot, pmk_version, DATE_FORMAT(created_at, '{f}'), \
                 DATE_FORMAT(updated_at, '{f}') FROM devices WHERE device_id = ?",
                f = RFC3339_SQL
            ),
            (device_id,),
        )
        .await?;
    let Some((state, group_id, slot, pmk_version, created_at, updated_at)) = row else {
        return Ok(None);
    };
    let ents: Vec<(u32, u32, u32, String, Option<String>)> = conn
        .exec(
            format!(
                "SELECT product_id, start_at, end_at, state, DATE_FORMAT(ended_at, '{f}') \
                 FROM entitlements WHERE device_id = ? ORDER BY product_id",
                f = RFC3339_SQL
            ),
            (device_id,),
        )
        .await?;
    let entitlements: Vec<serde_json::Value> = ents
        .into_iter()
        .map(|(p, s, e, st, ended)| {
            json!({"product_id": p, "start": s, "end": e, "state": st, "ended_at": ended})
        })
        .collect();
    Ok(Some(json!({
        "device_id": device_id,
        "state": state,
        "group_id": group_id,
        "slot": slot,
        "pmk_version": pmk_version,
        "created_at": created_at,
        "updated_at": updated_at,
        "entitlements": entitlements,
    })))
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
