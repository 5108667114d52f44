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
use super::round::{run_round, Round};
use super::types::CommandRequest;
use crate::db::{Db, DbError};

pub use super::slots::{SlotHint, SLOT_HINT_TTL};

/// How long an OSM is carouselled when the SMS gives no `expires_at`.
pub const DEFAULT_OSM_LIFETIME_S: u32 = 24 * 3600;

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
    /// A bulk command (`casd devices import`, `POST /bulk`): its work item
    /// is due when this pace says and its adds' EMMs go in the background
    /// class ([`crate::queue::Work::into_bulk`]). `None`: an SMS command.
    pub bulk: Option<std::sync::Arc<crate::queue::BulkPace>>,
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
        bulk: None,
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

/// [`accept_batch_on`], calling `ready_to_commit` when a round has done
/// its reads and writes and only its end is left (its COMMIT and fsync, or
/// a ROLLBACK when it has nothing to write). Not a test hook: the
/// committer ends its build turn then, so that the next batch is built
/// while this one waits for its fsync (`commit.rs`).
pub async fn accept_batch_gated(
    conn: &mut Conn,
    subs: &[Submission],
    hint: &SlotHint,
    ready_to_commit: &mut (dyn FnMut() + Send),
) -> Vec<Result<Accepted, SmsError>> {
    let mut out: Vec<Option<Result<Accepted, SmsError>>> =
        std::iter::repeat_with(|| None).take(subs.len()).collect();
    let mut pending: Vec<usize> = (0..subs.len()).collect();
    while !pending.is_empty() {
        let (round, rest) = pick_round(subs, &pending);
        let cmds: Vec<&Submission> = round.iter().map(|i| &subs[*i]).collect();
        let shas: Vec<[u8; 32]> = cmds.iter().map(|s| s.req.canonical_sha256()).collect();
        let r = Round {
            cmds: &cmds,
            shas: &shas,
            hint,
        };
        match run_round(conn, &r, ready_to_commit).await {
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
    use super::*;
    use crate::sms::types::{parse_command, CommandKind};

    fn sub(sender: &str, kind: CommandKind, tid: &str, device: u64) -> Submission {
        let body = format!(r#"{{"transaction_id":"{tid}","device_id":{device}}}"#);
        Submission {
            sender: sender.into(),
            path: kind.path(),
            message: body.clone(),
            received_at: OffsetDateTime::UNIX_EPOCH,
            req: parse_command(kind, body.as_bytes(), 1024).expect("valid command"),
            bulk: None,
        }
    }

    #[test]
    fn a_round_holds_one_command_per_device_and_key_in_order() {
        use CommandKind::{AddDevice as Add, RemoveDevice as Rm};
        let subs = [
            sub("a", Add, "t1", 1),
            sub("a", Rm, "t2", 1),  // device 1 again: next round
            sub("a", Add, "t1", 2), // key (a, t1) again: next round
            sub("b", Add, "t1", 3), // another sender's t1: this round
            sub("a", Add, "t4", 1), // behind the held device 1: next round
            sub("a", Add, "t5", 4),
        ];
        let all: Vec<usize> = (0..subs.len()).collect();
        let (round, rest) = pick_round(&subs, &all);
        assert_eq!((round, rest.clone()), (vec![0, 3, 5], vec![1, 2, 4]));
        let (round, rest) = pick_round(&subs, &rest);
        assert_eq!((round, rest.clone()), (vec![1, 2], vec![4]));
        assert_eq!(pick_round(&subs, &rest), (vec![4], vec![]));
    }
}
