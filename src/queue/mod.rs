//! The work queue: the one module that writes `work_items`.
//!
//! - **Enqueue** typed [`Work`] only (the payload is its JSON, `kind` and
//!   `device_id` come from it): the SMS store appends the INSERT to the
//!   script of its round ([`push_enqueue`]); the Scheduler's jobs run it
//!   in their fenced transaction ([`enqueue`]).
//! - **Take** ([`take`]): the EMMG's batch takes pending items whose
//!   `not_before` passed, `FOR UPDATE SKIP LOCKED` (any number of workers
//!   and processes at once; an item is only ever held by one of them).
//!   Per-device order: an item of a device is processed only when every
//!   pending item of that device with a lower id was taken with it
//!   ([`push_pending_of`] reads them, [`in_device_order`] decides).
//! - **Mark** an item done, retried with back-off or failed, in the
//!   batch's write script ([`push_done`], [`push_retry`], [`push_failed`]).
//! - **Pace** bulk commands' items ([`BulkPace`]: spaced `not_before`).
//! - Retention: the purge job's statements ([`PURGE_DONE`], [`PURGE_FAILED`]).

mod pace;
mod work;

use std::collections::HashSet;

use mysql_async::prelude::*;
use mysql_async::{Transaction, Value};
use time::OffsetDateTime;

use crate::sms::store::db_time;
use crate::sqltext::{col, marks, values, Script};
pub use pace::{spacing, BulkPace, BULK_ITEM_BYTES};
pub use work::{KeyOffer, Work};

/// Attempts of an item whose key was not found before it is marked failed.
pub const MAX_ATTEMPTS: u32 = 8;

/// Longest `last_error` kept.
const LAST_ERROR_MAX: usize = 1024;

/// When an item becomes due (`not_before`) or was made (`created_at`).
#[derive(Clone, Copy, Debug)]
pub enum At {
    /// This process's clock (the SMS store stamps a round with one time).
    Client(OffsetDateTime),
    /// The database's clock now.
    ServerNow,
    /// The database's clock now plus this many microseconds.
    ServerNowPlusMicros(u64),
    /// A unix time in milliseconds.
    UnixMs(i64),
}

impl At {
    /// The SQL expression and its value, if it has one.
    fn sql(self) -> (&'static str, Option<Value>) {
        match self {
            At::Client(t) => ("?", Some(db_time(t))),
            At::ServerNow => ("UTC_TIMESTAMP(6)", None),
            At::ServerNowPlusMicros(us) => {
                ("UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND", Some(us.into()))
            }
            At::UnixMs(ms) => ("FROM_UNIXTIME(? / 1000)", Some(ms.into())),
        }
    }
}

/// One item to enqueue.
#[derive(Clone, Copy, Debug)]
pub struct NewItem<'a> {
    /// The SMS request it comes from (`None` for the Scheduler's).
    pub request_id: Option<u64>,
    pub work: &'a Work,
    pub not_before: At,
}

/// The INSERT of `items` (at least one), all made at `created_at`.
fn insert(items: &[NewItem<'_>], created_at: At) -> (String, Vec<Value>) {
    let (created_sql, created_value) = created_at.sql();
    let mut rows = Vec::with_capacity(items.len());
    let mut params = Vec::with_capacity(items.len() * 6);
    for item in items {
        let (not_before_sql, not_before_value) = item.not_before.sql();
        rows.push(format!(
            "(?,?,?,?,'pending',0,{not_before_sql},{created_sql})"
        ));
        params.extend([
            item.request_id.map(Value::from).unwrap_or(Value::NULL),
            Value::from(item.work.kind()),
            item.work
                .device_id()
                .map(|d| Value::from(d.get()))
                .unwrap_or(Value::NULL),
            Value::from(serde_json::to_string(item.work).unwrap_or_default()),
        ]);
        params.extend(not_before_value);
        params.extend(created_value.clone());
    }
    let sql = format!(
        "INSERT INTO work_items (request_id, kind, device_id, payload, state, attempts, not_before, created_at) \
         VALUES {}",
        rows.join(",")
    );
    (sql, params)
}

/// Appends the INSERT of `items` to a script (the SMS store's round sends
/// its statements as one text query: see [`crate::sqltext`]). Returns the
/// statement's index in the script, `None` when there is nothing to insert.
pub fn push_enqueue(
    w: &mut Script,
    items: &[NewItem<'_>],
    created_at: At,
) -> Result<Option<usize>, crate::sqltext::Error> {
    if items.is_empty() {
        return Ok(None);
    }
    let (sql, params) = insert(items, created_at);
    w.push(&sql, &params).map(Some)
}

/// Inserts `items` made now (database clock); returns how many.
pub async fn enqueue(
    tx: &mut Transaction<'_>,
    items: &[NewItem<'_>],
) -> Result<u64, mysql_async::Error> {
    if items.is_empty() {
        return Ok(0);
    }
    let (sql, params) = insert(items, At::ServerNow);
    tx.exec_drop(sql, params).await?;
    Ok(tx.affected_rows())
}

/// Pending items of `kind` (the refresh job waits for its previous run).
pub async fn pending_of_kind<Q: Queryable>(
    q: &mut Q,
    kind: &str,
) -> Result<u64, mysql_async::Error> {
    let n: Option<u64> = q
        .exec_first(
            "SELECT COUNT(*) FROM work_items WHERE state = 'pending' AND kind = ?",
            (kind,),
        )
        .await?;
    Ok(n.unwrap_or(0))
}

/// Pending items and how long, in seconds, the longest-waiting one has
/// been due (0 when none), for the EMMG's backlog metrics: a covering scan
/// of the pending index, then its first row (`not_before` is UTC).
pub async fn backlog<Q: Queryable>(q: &mut Q) -> Result<(u64, f64), mysql_async::Error> {
    let n: Option<u64> = q
        .query_first("SELECT COUNT(*) FROM work_items WHERE state = 'pending'")
        .await?;
    // Since it became due (not_before; the SMS's items are due when made):
    // paced items (bulk imports, key deliveries) waiting for their turn are
    // not a backlog. The first row of the (state, not_before, id) index.
    let age_us: Option<Option<i64>> = q
        .query_first(
            "SELECT TIMESTAMPDIFF(MICROSECOND, not_before, UTC_TIMESTAMP(6)) FROM work_items \
             WHERE state = 'pending' ORDER BY not_before, id LIMIT 1",
        )
        .await?;
    Ok((
        n.unwrap_or(0),
        age_us.flatten().unwrap_or(0).max(0) as f64 / 1e6,
    ))
}

/// The latest `not_before` of the pending bulk items ([`Work::into_bulk`]),
/// so that a new bulk run is paced after them, not beside them.
pub async fn bulk_horizon<Q: Queryable>(
    q: &mut Q,
) -> Result<Option<OffsetDateTime>, mysql_async::Error> {
    let t: Option<Option<String>> = q
        .query_first(format!(
            "SELECT DATE_FORMAT(MAX(not_before), '{}') FROM work_items \
             WHERE state = 'pending' AND kind IN ('adddevice', 'addentitlement') \
             AND payload LIKE '%\"bulk\":true%'",
            crate::sms::store::RFC3339_SQL
        ))
        .await?;
    Ok(t.flatten().and_then(|s| {
        OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339).ok()
    }))
}

/// One item taken.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: u64,
    pub request_id: Option<u64>,
    pub device_id: Option<u64>,
    pub payload: String,
    /// Attempts before this one.
    pub attempts: u32,
}

impl Item {
    pub fn work(&self) -> Result<Work, String> {
        serde_json::from_str(&self.payload).map_err(|e| format!("unreadable payload: {e}"))
    }
}

/// Takes up to `limit` pending items due at `now`, in id order, locked
/// until the transaction ends (`FOR UPDATE SKIP LOCKED`: items another
/// worker holds are skipped, not waited for).
pub async fn take(
    tx: &mut Transaction<'_>,
    limit: usize,
    now: OffsetDateTime,
) -> Result<Vec<Item>, mysql_async::Error> {
    type Row = (u64, Option<u64>, Option<u64>, String, u32);
    // Index order (not_before, id) so the scan locks only the rows it returns.
    let rows: Vec<Row> = tx
        .exec(
            "SELECT id, request_id, device_id, payload, attempts FROM work_items \
             WHERE state = 'pending' AND not_before <= ? \
             ORDER BY not_before, id LIMIT ? FOR UPDATE SKIP LOCKED",
            (db_time(now), limit as u64),
        )
        .await?;
    let mut items: Vec<Item> = rows
        .into_iter()
        .map(|(id, request_id, device_id, payload, attempts)| Item {
            id,
            request_id,
            device_id,
            payload,
            attempts,
        })
        .collect();
    items.sort_by_key(|i| i.id);
    Ok(items)
}

/// The devices of `items` (sorted, once each).
pub fn devices_of(items: &[Item]) -> Vec<u64> {
    let mut d: Vec<u64> = items.iter().filter_map(|i| i.device_id).collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// Appends the read of the pending items of `devices` up to the highest
/// taken id (a plain read: it sees other workers' held items as pending),
/// rows `(device_id, id)` ordered by device and id, for [`in_device_order`].
pub fn push_pending_of(
    reads: &mut Script,
    devices: &[u64],
    items: &[Item],
) -> Result<usize, crate::sqltext::Error> {
    let max_id = items.iter().map(|i| i.id).max().unwrap_or(0);
    let mut p: Vec<Value> = devices.iter().map(|d| Value::from(*d)).collect();
    p.push(Value::from(max_id));
    reads.push(
        &format!(
            "SELECT device_id, id FROM work_items WHERE state = 'pending' \
             AND device_id IN ({}) AND id <= ? ORDER BY device_id, id",
            marks(devices.len(), "?")
        ),
        &p,
    )
}

/// The rows of [`push_pending_of`] as `(device_id, id)`.
pub fn pending_rows(rows: &[mysql_async::Row]) -> Result<Vec<(u64, u64)>, crate::sqltext::Error> {
    rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
}

/// Per-device order: keeps the items without a device, and an item of a
/// device only when every pending item of that device before it is taken
/// too. `pending` is `(device_id, id)` ordered by device, then id.
pub fn in_device_order(mut items: Vec<Item>, pending: &[(u64, u64)]) -> Vec<Item> {
    let held: HashSet<u64> = items.iter().map(|i| i.id).collect();
    let mut ok: HashSet<u64> = HashSet::new();
    let mut blocked: HashSet<u64> = HashSet::new();
    for &(d, id) in pending {
        if blocked.contains(&d) {
            continue;
        }
        if held.contains(&id) {
            ok.insert(id);
        } else {
            blocked.insert(d);
        }
    }
    items.retain(|i| i.device_id.is_none() || ok.contains(&i.id));
    items
}

/// Marks `items` done, and their SMS requests processed. `done_at` and
/// `processed_at` are the server's clock at these statements: sent in the
/// write script right after the EMMs' INSERT and just before the COMMIT,
/// they are the time the EMMs are stored (the batch's start would leave
/// out its own build, seal and insert time, tens of ms under load).
pub fn push_done(w: &mut Script, items: &[&Item]) -> Result<(), crate::sqltext::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let ids: Vec<Value> = items.iter().map(|i| Value::from(i.id)).collect();
    w.push(
        &format!(
            "UPDATE work_items SET state = 'done', done_at = UTC_TIMESTAMP(6), \
             attempts = attempts + 1, last_error = NULL WHERE id IN ({})",
            marks(ids.len(), "?")
        ),
        &ids,
    )?;
    let reqs: Vec<Value> = items
        .iter()
        .filter_map(|i| i.request_id)
        .map(Value::from)
        .collect();
    if !reqs.is_empty() {
        w.push(
            &format!(
                "UPDATE sms_requests SET processed_at = UTC_TIMESTAMP(6) WHERE id IN ({})",
                marks(reqs.len(), "?")
            ),
            &reqs,
        )?;
    }
    Ok(())
}

/// What becomes of an item to retry after its `attempts` so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts counting this one.
    pub attempts: u32,
    /// [`MAX_ATTEMPTS`] reached: the item is marked failed.
    pub give_up: bool,
    /// Back-off before the next attempt, in seconds.
    pub delay_s: u64,
}

impl Retry {
    pub fn after(attempts_before: u32) -> Retry {
        let attempts = attempts_before + 1;
        Retry {
            attempts,
            give_up: attempts >= MAX_ATTEMPTS,
            delay_s: 1u64 << attempts.min(8),
        }
    }
}

/// Marks `item` to be retried with back-off (failed after [`MAX_ATTEMPTS`]).
pub fn push_retry(
    w: &mut Script,
    item: &Item,
    msg: &str,
    now: OffsetDateTime,
) -> Result<(), crate::sqltext::Error> {
    let r = Retry::after(item.attempts);
    if r.give_up {
        tracing::error!(
            item = item.id,
            "work item failed after {} attempts: {msg}",
            r.attempts
        );
    } else {
        tracing::warn!(item = item.id, "work item will be retried: {msg}");
    }
    w.push(
        "UPDATE work_items SET state = ?, attempts = ?, last_error = ?, \
         not_before = ? + INTERVAL ? SECOND WHERE id = ?",
        &values((
            if r.give_up { "failed" } else { "pending" },
            r.attempts,
            truncate(msg, LAST_ERROR_MAX),
            db_time(now),
            r.delay_s,
            item.id,
        )),
    )?;
    Ok(())
}

/// Marks `item` failed for good.
pub fn push_failed(w: &mut Script, item: &Item, msg: &str) -> Result<(), crate::sqltext::Error> {
    tracing::error!(item = item.id, "work item failed: {msg}");
    w.push(
        "UPDATE work_items SET state = 'failed', attempts = attempts + 1, last_error = ?, \
         done_at = UTC_TIMESTAMP(6) WHERE id = ?",
        &values((truncate(msg, LAST_ERROR_MAX), item.id)),
    )?;
    Ok(())
}

/// Retention (purge job): done items `?` days after `done_at`, at most `?`.
pub const PURGE_DONE: &str = "DELETE FROM work_items WHERE state = 'done' AND done_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY done_at LIMIT ?";
/// Retention (purge job): failed items `?` days after `done_at`, at most `?`.
pub const PURGE_FAILED: &str = "DELETE FROM work_items WHERE state = 'failed' AND done_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY done_at LIMIT ?";

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sms::types::DeviceId;

    fn item(id: u64, device: Option<u64>) -> Item {
        Item {
            id,
            request_id: None,
            device_id: device,
            payload: String::new(),
            attempts: 0,
        }
    }

    #[test]
    fn a_device_waits_for_its_earlier_items() {
        // Device 1: items 1 and 3 taken, nothing else pending before them.
        // Device 2: item 4 taken but item 2 (held elsewhere) comes first.
        // Item 5 has no device: never held back.
        let items = vec![
            item(1, Some(1)),
            item(3, Some(1)),
            item(4, Some(2)),
            item(5, None),
        ];
        let pending = [(1, 1), (1, 3), (2, 2), (2, 4)];
        let kept: Vec<u64> = in_device_order(items, &pending)
            .iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(kept, vec![1, 3, 5]);
        // A gap in the middle holds back the items after it only.
        let items = vec![item(1, Some(7)), item(6, Some(7))];
        let kept: Vec<u64> = in_device_order(items, &[(7, 1), (7, 2), (7, 6)])
            .iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(kept, vec![1]);
    }

    #[test]
    fn retries_back_off_then_give_up() {
        assert_eq!(
            Retry::after(0),
            Retry {
                attempts: 1,
                give_up: false,
                delay_s: 2
            }
        );
        assert!(!Retry::after(MAX_ATTEMPTS - 2).give_up);
        assert!(Retry::after(MAX_ATTEMPTS - 1).give_up);
        assert_eq!(Retry::after(20).delay_s, 256);
    }

    #[test]
    fn the_insert_takes_kind_device_and_payload_from_the_work() {
        let w = Work::RefreshSet {
            device_id: DeviceId::new(9).unwrap(),
        };
        let items = [NewItem {
            request_id: None,
            work: &w,
            not_before: At::ServerNowPlusMicros(5),
        }];
        let (sql, params) = insert(&items, At::ServerNow);
        assert!(sql.ends_with(
            "VALUES (?,?,?,?,'pending',0,UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND,UTC_TIMESTAMP(6))"
        ));
        assert_eq!(
            params,
            vec![
                Value::NULL,
                Value::from("refreshset"),
                Value::NULL,
                Value::from(r#"{"kind":"refreshset","device_id":9}"#),
                Value::from(5u64),
            ]
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
