//! The SMS-CAS interface's database side: one transaction per accepted
//! command, records of refused requests, and the read-only queries.
//!
//! An accepted command commits, in one READ COMMITTED transaction:
//! the `sms_requests` row, the `idempotency` row, the state change
//! (`devices`, `group_slots`, `entitlements`) and one `work_items` row. The
//! idempotency INSERT comes right after the request row, so a concurrent
//! duplicate blocks on it until the first commits (then gets a duplicate-key
//! error and answers with the stored reply) or rolls back (then proceeds).
//! READ COMMITTED keeps InnoDB from taking gap locks, which would make two
//! adddevice of new devices deadlock each other; the device row is locked
//! `FOR UPDATE` by every command about a device, which serializes them and
//! makes their work item ids follow their commit order (per-device order).
//! Deadlocks and lock-wait timeouts are retried a few times.

use mysql_async::prelude::*;
use mysql_async::{Conn, IsolationLevel, Transaction, TxOpts, Value};
use serde_json::json;
use time::OffsetDateTime;

use super::error::SmsError;
use super::types::{Command, CommandRequest, Target};
use super::work::Work;
use crate::db::{Db, DbError};

/// How long an OSM is carouselled when the SMS gives no `expires_at`.
pub const DEFAULT_OSM_LIFETIME_S: u32 = 24 * 3600;

/// Attempts of one command transaction on deadlock / lock-wait timeout.
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

enum Step {
    Done(Accepted),
    Duplicate,
    Refused(SmsError),
    NeedGroup,
}

fn is_retryable(e: &SmsError) -> bool {
    matches!(e, SmsError::Db(DbError::Query(mysql_async::Error::Server(s))) if matches!(s.code, 1213 | 1205))
}

fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// Stores an accepted command (or finds it accepted before). Refusals that
/// depend on the state (unknown device, device exists, transaction reused,
/// an OSM already expired) come back as `Err` with nothing changed.
pub async fn accept(
    db: &Db,
    meta: &RequestMeta<'_>,
    req: &CommandRequest,
) -> Result<Accepted, SmsError> {
    let mut conn = db.conn().await?;
    // Our transactions always end in COMMIT or ROLLBACK and change no
    // session state, so the connection can go back to the pool without a
    // COM_RESET_CONNECTION — which would also drop its prepared statements.
    conn.reset_connection(false);
    let sha = req.canonical_sha256();
    let mut attempt = 0;
    let mut groups_made = 0;
    loop {
        attempt += 1;
        let step = match try_accept(&mut conn, meta, req, &sha).await {
            Ok(s) => s,
            Err(e) if attempt < ATTEMPTS && is_retryable(&e) => continue,
            Err(e) => return Err(e),
        };
        match step {
            Step::Done(a) => return Ok(a),
            Step::Refused(e) => return Err(e),
            Step::NeedGroup => {
                // Not an attempt lost to contention: a burst of adddevice
                // may fill a fresh group before this one gets its slot.
                groups_made += 1;
                if groups_made > 64 {
                    return Err(SmsError::Db(DbError::Unreachable(
                        "could not allocate a group slot".into(),
                    )));
                }
                attempt -= 1;
                create_next_group(&mut conn).await?;
            }
            Step::Duplicate => {
                let row: Option<(Vec<u8>, u64, Option<String>)> = conn
                    .exec_first(
                        "SELECT i.body_sha256, i.request_id, r.response FROM idempotency i \
                         LEFT JOIN sms_requests r ON r.id = i.request_id \
                         WHERE i.sender = ? AND i.transaction_id = ?",
                        (meta.sender, req.transaction_id.as_str()),
                    )
                    .await?;
                match row {
                    Some((stored, _, _)) if stored != sha => {
                        return Err(SmsError::TransactionReused)
                    }
                    Some((_, original_id, Some(reply))) => {
                        return Ok(Accepted::Replay { original_id, reply })
                    }
                    // The original went away between our INSERT and this
                    // read (purged, or rolled back): try again.
                    _ if attempt < ATTEMPTS => continue,
                    _ => {
                        return Err(SmsError::Db(DbError::Unreachable(
                            "idempotency row vanished repeatedly".into(),
                        )))
                    }
                }
            }
        }
    }
}

async fn try_accept(
    conn: &mut Conn,
    meta: &RequestMeta<'_>,
    req: &CommandRequest,
    sha: &[u8; 32],
) -> Result<Step, SmsError> {
    let now = OffsetDateTime::now_utc();
    // Read before the transaction: a key-metadata read needs no lock.
    let pmk_version = match req.command {
        Command::AddDevice { .. } => active_pmk_version(conn).await?,
        _ => 1,
    };
    let mut opts = TxOpts::default();
    opts.with_isolation_level(IsolationLevel::ReadCommitted);
    let mut tx = conn.start_transaction(opts).await?;
    tx.exec_drop(
        "INSERT INTO sms_requests (sender, transaction_id, path, message, received_at, status_code, response) \
         VALUES (?, ?, ?, ?, ?, 200, '')",
        (
            meta.sender,
            req.transaction_id.as_str(),
            meta.path,
            meta.message,
            db_time(meta.received_at),
        ),
    )
    .await?;
    let request_id = tx
        .last_insert_id()
        .ok_or_else(|| DbError::Unreachable("no insert id for sms_requests".into()))?;
    let r = tx
        .exec_drop(
            "INSERT INTO idempotency (sender, transaction_id, body_sha256, request_id, created_at) \
             VALUES (?, ?, ?, ?, ?)",
            (
                meta.sender,
                req.transaction_id.as_str(),
                &sha[..],
                request_id,
                db_time(now),
            ),
        )
        .await;
    match r {
        Ok(()) => {}
        Err(e) if server_code(&e) == Some(1062) => {
            tx.rollback().await?;
            return Ok(Step::Duplicate);
        }
        Err(e) => return Err(e.into()),
    }
    let work = match apply(&mut tx, &req.command, now, pmk_version).await? {
        Change::Work(w) => w,
        Change::Refused(refusal) => {
            tx.rollback().await?;
            return Ok(Step::Refused(refusal));
        }
        Change::NeedGroup => {
            tx.rollback().await?;
            return Ok(Step::NeedGroup);
        }
    };
    let payload = serde_json::to_string(&work).unwrap_or_default();
    tx.exec_drop(
        "INSERT INTO work_items (request_id, kind, device_id, payload, state, attempts, not_before, created_at) \
         VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)",
        (
            request_id,
            work.kind(),
            work.device_id().map(|d| d.get()),
            payload,
            db_time(now),
            db_time(now),
        ),
    )
    .await?;
    let reply = json!({
        "request_id": request_id,
        "transaction_id": req.transaction_id.as_str(),
        "status": "accepted",
    })
    .to_string();
    tx.exec_drop(
        "UPDATE sms_requests SET response = ? WHERE id = ?",
        (&reply, request_id),
    )
    .await?;
    tx.commit().await?;
    Ok(Step::Done(Accepted::New { request_id, reply }))
}

/// The device's state, locked until the transaction ends.
async fn lock_device(
    tx: &mut Transaction<'_>,
    device_id: u64,
) -> Result<Option<(String, Option<u32>, Option<u8>)>, SmsError> {
    Ok(tx
        .exec_first(
            "SELECT state, group_id, slot FROM devices WHERE device_id = ? FOR UPDATE",
            (device_id,),
        )
        .await?)
}

async fn require_enabled(
    tx: &mut Transaction<'_>,
    device_id: u64,
) -> Result<Result<(), SmsError>, SmsError> {
    Ok(match lock_device(tx, device_id).await? {
        Some((state, _, _)) if state == "enabled" => Ok(()),
        // A removed (disabled) device is unknown to the SMS until re-added.
        _ => Err(SmsError::UnknownDevice(device_id)),
    })
}

/// The PMK version new devices' DUKs derive from: the key store's current
/// PMK (metadata only, never key bytes); 1 on a store without any PMK yet
/// (a database the Encryptor has not initialised).
async fn active_pmk_version(conn: &mut Conn) -> Result<u32, SmsError> {
    let now = OffsetDateTime::now_utc()
        .unix_timestamp()
        .clamp(0, u32::MAX as i64) as u32;
    let meta = crate::keystore::current_meta(conn, crate::keystore::KeyKind::Pmk, now).await?;
    Ok(meta.map(|m| m.version).unwrap_or(1))
}

/// Gives `device_id` the lowest free (group_id, slot). Slots locked by
/// concurrent transactions are skipped, so allocation never waits on
/// another command. `Ok(None)`: no free slot, a new group is needed
/// ([`create_next_group`], outside this transaction). `Err(DeviceExists)`:
/// a concurrent transaction gave this device a slot first.
async fn allocate_slot(
    tx: &mut Transaction<'_>,
    device_id: u64,
) -> Result<Option<(u32, u8)>, SmsError> {
    let free: Option<(u32, u8)> = tx
        .exec_first(
            "SELECT group_id, slot FROM group_slots WHERE device_id IS NULL \
             ORDER BY group_id, slot LIMIT 1 FOR UPDATE SKIP LOCKED",
            (),
        )
        .await?;
    let Some((g, s)) = free else { return Ok(None) };
    let r = tx
        .exec_drop(
            "UPDATE group_slots SET device_id = ? WHERE group_id = ? AND slot = ?",
            (device_id, g, s),
        )
        .await;
    match r {
        Ok(()) => Ok(Some((g, s))),
        Err(e) if server_code(&e) == Some(1062) => Err(SmsError::DeviceExists(device_id)),
        Err(e) => Err(e.into()),
    }
}

/// Creates the next group's 256 free slots, committed on its own (not in a
/// command transaction: an INSERT that meets duplicates keeps shared locks
/// on them until its transaction ends, which would hide those slots from
/// every concurrent `SKIP LOCKED` allocation). Two processes creating the
/// same group at once: the second one's IGNORE skips the rows.
async fn create_next_group(conn: &mut Conn) -> Result<(), SmsError> {
    // Serialised by a named lock, and only when no slot is free any more:
    // two commands that both found every slot taken must not create two
    // groups (groups fill in order; an empty extra group is waste).
    let got: Option<Option<i64>> = conn
        .query_first("SELECT GET_LOCK(CONCAT('casd.newgroup.', DATABASE()), 10)")
        .await?;
    if got.flatten() != Some(1) {
        return Err(SmsError::Db(DbError::Unreachable(
            "could not take the group creation lock".into(),
        )));
    }
    let result = async {
        let free: Option<u8> = conn
            .query_first("SELECT 1 FROM group_slots WHERE device_id IS NULL LIMIT 1")
            .await?;
        if free.is_none() {
            let next: Option<u32> = conn
                .query_first("SELECT COALESCE(MAX(group_id), 0) + 1 FROM group_slots")
                .await?;
            let next = next.unwrap_or(1);
            let values: Vec<String> = (0..256).map(|s| format!("({next},{s},NULL)")).collect();
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

/// What a command's state change came to.
enum Change {
    Work(Work),
    Refused(SmsError),
    /// Every slot is taken: create a group and run the transaction again.
    NeedGroup,
}

/// The state change of one command.
async fn apply(
    tx: &mut Transaction<'_>,
    cmd: &Command,
    now: OffsetDateTime,
    pmk_version: u32,
) -> Result<Change, SmsError> {
    let now_v = || db_time(now);
    let now_unix = now.unix_timestamp().clamp(0, u32::MAX as i64) as u32;
    Ok(Change::Work(match cmd {
        Command::AddDevice { device_id } => {
            let id = device_id.get();
            match lock_device(tx, id).await? {
                Some((state, _, _)) if state == "enabled" => {
                    return Ok(Change::Refused(SmsError::DeviceExists(id)))
                }
                Some(_) => {
                    // Re-adding a removed device enables it again with a new
                    // slot; its PMK version (burned into the card) is kept and
                    // its old entitlements stay ended.
                    let (g, s) = match allocate_slot(tx, id).await? {
                        Some(gs) => gs,
                        None => return Ok(Change::NeedGroup),
                    };
                    tx.exec_drop(
                        "UPDATE devices SET state = 'enabled', group_id = ?, slot = ?, updated_at = ? \
                         WHERE device_id = ?",
                        (g, s, now_v(), id),
                    )
                    .await?;
                    let pmk: Option<u32> = tx
                        .exec_first("SELECT pmk_version FROM devices WHERE device_id = ?", (id,))
                        .await?;
                    Work::AddDevice {
                        device_id: *device_id,
                        group_id: g,
                        slot: s,
                        pmk_version: pmk.unwrap_or(1),
                        reenabled: true,
                    }
                }
                None => {
                    let pmk = pmk_version;
                    let (g, s) = match allocate_slot(tx, id).await {
                        Ok(Some(gs)) => gs,
                        Ok(None) => return Ok(Change::NeedGroup),
                        Err(SmsError::DeviceExists(_)) => {
                            return Ok(Change::Refused(SmsError::DeviceExists(id)))
                        }
                        Err(e) => return Err(e),
                    };
                    let r = tx
                        .exec_drop(
                            "INSERT INTO devices (device_id, state, group_id, slot, pmk_version, created_at, updated_at) \
                             VALUES (?, 'enabled', ?, ?, ?, ?, ?)",
                            (id, g, s, pmk, now_v(), now_v()),
                        )
                        .await;
                    match r {
                        Ok(()) => {}
                        // Added concurrently by another transaction_id.
                        Err(e) if server_code(&e) == Some(1062) => {
                            return Ok(Change::Refused(SmsError::DeviceExists(id)))
                        }
                        Err(e) => return Err(e.into()),
                    }
                    Work::AddDevice {
                        device_id: *device_id,
                        group_id: g,
                        slot: s,
                        pmk_version: pmk,
                        reenabled: false,
                    }
                }
            }
        }
        Command::RemoveDevice { device_id } => {
            let id = device_id.get();
            let (group_id, slot) = match lock_device(tx, id).await? {
                Some((state, g, s)) if state == "enabled" => (g, s),
                _ => return Ok(Change::Refused(SmsError::UnknownDevice(id))),
            };
            tx.exec_drop(
                "UPDATE devices SET state = 'disabled', group_id = NULL, slot = NULL, updated_at = ? \
                 WHERE device_id = ?",
                (now_v(), id),
            )
            .await?;
            tx.exec_drop(
                "UPDATE group_slots SET device_id = NULL WHERE device_id = ?",
                (id,),
            )
            .await?;
            tx.exec_drop(
                "UPDATE entitlements SET state = 'ended', ended_at = ?, updated_at = ? \
                 WHERE device_id = ? AND state = 'active'",
                (now_v(), now_v(), id),
            )
            .await?;
            Work::RemoveDevice {
                device_id: *device_id,
                group_id,
                slot,
            }
        }
        Command::AddEntitlement {
            device_id,
            product_id,
            start,
            end,
        } => {
            if let Err(e) = require_enabled(tx, device_id.get()).await? {
                return Ok(Change::Refused(e));
            }
            tx.exec_drop(
                "INSERT INTO entitlements (device_id, product_id, start_at, end_at, state, updated_at, ended_at) \
                 VALUES (?, ?, ?, ?, 'active', ?, NULL) \
                 ON DUPLICATE KEY UPDATE start_at = VALUES(start_at), end_at = VALUES(end_at), \
                 state = 'active', updated_at = VALUES(updated_at), ended_at = NULL",
                (device_id.get(), product_id.get(), start.0, end.0, now_v()),
            )
            .await?;
            Work::AddEntitlement {
                device_id: *device_id,
                product_id: *product_id,
                start: start.0,
                end: end.0,
            }
        }
        Command::RemoveEntitlement {
            device_id,
            product_id,
        } => {
            if let Err(e) = require_enabled(tx, device_id.get()).await? {
                return Ok(Change::Refused(e));
            }
            tx.exec_drop(
                "UPDATE entitlements SET state = 'ended', ended_at = ?, updated_at = ? \
                 WHERE device_id = ? AND product_id = ? AND state = 'active'",
                (now_v(), now_v(), device_id.get(), product_id.get()),
            )
            .await?;
            let was_active = tx.affected_rows() > 0;
            Work::RemoveEntitlement {
                device_id: *device_id,
                product_id: *product_id,
                was_active,
            }
        }
        Command::GenerateOsm {
            target,
            text,
            duration_s,
            forced,
            expires_at,
        } => {
            let not_after = match expires_at {
                Some(t) if t.0 <= now_unix => return Ok(Change::Refused(SmsError::AlreadyExpired)),
                Some(t) => t.0,
                None => now_unix.saturating_add(DEFAULT_OSM_LIFETIME_S),
            };
            match target {
                Target::Device(d) => {
                    if let Err(e) = require_enabled(tx, d.get()).await? {
                        return Ok(Change::Refused(e));
                    }
                }
                Target::Group(g) => {
                    let exists: Option<u8> = tx
                        .exec_first(
                            "SELECT 1 FROM group_slots WHERE group_id = ? LIMIT 1",
                            (g.get(),),
                        )
                        .await?;
                    if exists.is_none() {
                        return Ok(Change::Refused(SmsError::UnknownGroup(g.get())));
                    }
                }
                Target::All => {}
            }
            Work::GenerateOsm {
                target: *target,
                text: text.as_str().to_owned(),
                duration_s: *duration_s,
                forced: *forced,
                not_after,
            }
        }
    }))
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
    conn.exec_drop(
        "INSERT INTO sms_requests (sender, transaction_id, path, message, received_at, processed_at, status_code, response) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
    conn.last_insert_id()
        .ok_or_else(|| DbError::Unreachable("no insert id for sms_requests".into()))
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
