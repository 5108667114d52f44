//! The EMM store: the one module that writes `emms` and `carousel_events`.
//!
//! Every EMM that enters or leaves the carousel gets a `carousel_events`
//! row (`add` / `remove`) in the same transaction as its `emms` change:
//! the Cycler follows the events.
//!
//! - The EMMG inserts the EMMs of a batch ([`push_insert`], live or already
//!   superseded) and withdraws the ones they supersede ([`push_withdraw`]),
//!   in the batch's write script; it reads the live unique EMMs it may
//!   supersede first ([`push_live_unique`]).
//! - The rotation job re-seals live group/global EMMs under the current
//!   key ([`stale_sealed`], [`insert_resealed`], [`withdraw_resealed`]).
//! - The purge job deletes expired EMMs ([`expire_batch`]) and old rows
//!   ([`PURGE_WITHDRAWN`], [`PURGE_EVENTS`]).
//!
//! `emms.purpose` is a [`Purpose`] (supersession is decided on it) and
//! `emms.class` a [`Class`]; `emms.emm_data` is a [`Review`].

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use carousel::Class;
use mysql_async::prelude::*;
use mysql_async::{Transaction, Value};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::sms::store::db_time;
use crate::sqltext::{col, marks, Script};
use casd_wire::emm::{Address, CommandSpec};

/// What an EMM is for: `emms.purpose`, on which a new EMM decides which of
/// the device's live EMMs it supersedes. Stored as `device_enable`,
/// `device_disable`, `entitlement_set`, `entitlement_add:<product>`,
/// `entitlement_remove:<product>`, `osm`, `keys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    DeviceEnable,
    DeviceDisable,
    EntitlementSet,
    EntitlementAdd(u32),
    EntitlementRemove(u32),
    Osm,
    Keys,
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Purpose::DeviceEnable => f.write_str("device_enable"),
            Purpose::DeviceDisable => f.write_str("device_disable"),
            Purpose::EntitlementSet => f.write_str("entitlement_set"),
            Purpose::EntitlementAdd(p) => write!(f, "entitlement_add:{p}"),
            Purpose::EntitlementRemove(p) => write!(f, "entitlement_remove:{p}"),
            Purpose::Osm => f.write_str("osm"),
            Purpose::Keys => f.write_str("keys"),
        }
    }
}

impl FromStr for Purpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Purpose, String> {
        let product = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("unknown purpose `{s}`"))
        };
        Ok(match s {
            "device_enable" => Purpose::DeviceEnable,
            "device_disable" => Purpose::DeviceDisable,
            "entitlement_set" => Purpose::EntitlementSet,
            "osm" => Purpose::Osm,
            "keys" => Purpose::Keys,
            _ => match s.split_once(':') {
                Some(("entitlement_add", p)) => Purpose::EntitlementAdd(product(p)?),
                Some(("entitlement_remove", p)) => Purpose::EntitlementRemove(product(p)?),
                _ => return Err(format!("unknown purpose `{s}`")),
            },
        })
    }
}

/// `emms.emm_data`: what was sealed, for review and re-sealing. Stored as
/// [`Review::to_json`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub address: Address,
    pub commands: Vec<CommandSpec>,
    #[serde(default)]
    pub emm_id: u64,
    #[serde(default)]
    pub issued_at: u32,
    #[serde(default)]
    pub key_version: u32,
    pub not_after: u32,
    /// The EMM a re-sealed one replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resealed_from: Option<u64>,
}

impl Review {
    /// The stored text: every object's keys sorted (through
    /// `serde_json::Value`), the text the EMMG has always written.
    pub fn to_json(&self) -> String {
        serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

/// `emms.addressing` and `emms.address` of an address.
pub fn addressing(address: &Address) -> (&'static str, u64) {
    match address {
        Address::Unique { device_id } => ("unique", device_id.get()),
        Address::Group { group_id, .. } => ("group", u64::from(*group_id)),
        Address::Global => ("global", 0),
    }
}

/// One sealed EMM to store.
#[derive(Clone, Debug)]
pub struct NewEmm {
    pub request_id: Option<u64>,
    pub class: Class,
    pub purpose: Purpose,
    /// What was sealed (its emm_id, address, key version, not_after).
    pub review: Review,
    pub section: Vec<u8>,
    /// False when a later EMM of the same batch already supersedes it: it
    /// is stored `withdrawn` and never announced.
    pub live: bool,
}

fn unix_to_db(t: u32) -> Value {
    db_time(OffsetDateTime::from_unix_timestamp(i64::from(t)).unwrap_or(OffsetDateTime::UNIX_EPOCH))
}

/// Appends the INSERT of `emms`, and an `add` event for each live one, to
/// a write script, all made at `now`. Returns whether any is live.
pub fn push_insert(
    w: &mut Script,
    emms: &[NewEmm],
    now: OffsetDateTime,
) -> Result<bool, crate::sqltext::Error> {
    if emms.is_empty() {
        return Ok(false);
    }
    let mut params: Vec<Value> = Vec::with_capacity(emms.len() * 12);
    for m in emms {
        let (mode, address) = addressing(&m.review.address);
        params.extend([
            Value::from(m.review.emm_id),
            m.request_id.map(Value::from).unwrap_or(Value::NULL),
            Value::from(mode),
            Value::from(address),
            Value::from(m.review.key_version),
            Value::from(m.class as u8),
            Value::from(m.purpose.to_string()),
            Value::from(m.review.to_json()),
            Value::from(m.section.clone()),
            db_time(now),
            unix_to_db(m.review.not_after),
            Value::from(if m.live { "live" } else { "withdrawn" }),
        ]);
    }
    w.push(
        &format!(
            "INSERT INTO emms (id, request_id, addressing, address, key_version, class, purpose, \
             emm_data, encrypted_emm, created_at, not_after, state) VALUES {}",
            marks(emms.len(), "(?,?,?,?,?,?,?,?,?,?,?,?)")
        ),
        &params,
    )?;
    let live: Vec<u64> = emms
        .iter()
        .filter(|m| m.live)
        .map(|m| m.review.emm_id)
        .collect();
    push_events(w, &live, "add", now)?;
    Ok(!live.is_empty())
}

/// Runs [`push_insert`] on its own (tests and tools that store an EMM).
pub async fn insert<Q: Queryable>(
    q: &mut Q,
    emms: &[NewEmm],
    now: OffsetDateTime,
) -> Result<bool, crate::sqltext::Error> {
    let mut w = Script::default();
    let live = push_insert(&mut w, emms, now)?;
    w.run(q).await?;
    Ok(live)
}

/// Appends the withdrawal of the live EMMs `ids`, with a `remove` event
/// each, to a write script.
pub fn push_withdraw(
    w: &mut Script,
    ids: &[u64],
    now: OffsetDateTime,
) -> Result<(), crate::sqltext::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let params: Vec<Value> = ids.iter().map(|i| Value::from(*i)).collect();
    w.push(
        &format!(
            "UPDATE emms SET state = 'withdrawn' WHERE id IN ({})",
            marks(ids.len(), "?")
        ),
        &params,
    )?;
    push_events(w, ids, "remove", now)
}

fn push_events(
    w: &mut Script,
    ids: &[u64],
    op: &str,
    now: OffsetDateTime,
) -> Result<(), crate::sqltext::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut params: Vec<Value> = Vec::with_capacity(ids.len() * 3);
    for id in ids {
        params.extend([Value::from(*id), Value::from(op), db_time(now)]);
    }
    w.push(
        &format!(
            "INSERT INTO carousel_events (emm_id, op, created_at) VALUES {}",
            marks(ids.len(), "(?,?,?)")
        ),
        &params,
    )?;
    Ok(())
}

/// Appends the read of `n` (> 0) new emm_ids to a script, in one statement
/// with MariaDB's sequence engine (`seq_1_to_N`); its rows go to
/// [`id_rows`]. Without the engine the statement fails with
/// [`crate::db::DbErrorKind::NoSuchTable`]: use [`next_ids`] then.
pub fn push_next_ids(reads: &mut Script, n: usize) -> Result<usize, crate::sqltext::Error> {
    reads.push(
        &format!("SELECT NEXTVAL(emm_id_seq) FROM seq_1_to_{n}"),
        &[],
    )
}

/// The ids read by [`push_next_ids`], increasing.
pub fn id_rows(rows: &[mysql_async::Row]) -> Result<Vec<u64>, crate::sqltext::Error> {
    let mut ids = rows
        .iter()
        .map(|r| col(r, 0))
        .collect::<Result<Vec<u64>, _>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// `n` new emm_ids, increasing. Taken outside the transaction's atomicity
/// (sequences are not rolled back): a transaction that does not commit
/// leaves a gap, which the schema allows.
pub async fn next_ids(tx: &mut Transaction<'_>, n: usize) -> Result<Vec<u64>, mysql_async::Error> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // One round trip with MariaDB's sequence engine (seq_1_to_N), else one
    // NEXTVAL at a time.
    let r: Result<Vec<u64>, mysql_async::Error> = tx
        .query(format!("SELECT NEXTVAL(emm_id_seq) FROM seq_1_to_{n}"))
        .await;
    let mut ids = match r {
        Ok(v) if v.len() == n => v,
        _ => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let id: Option<u64> = tx.query_first("SELECT NEXTVAL(emm_id_seq)").await?;
                v.push(id.unwrap_or(0));
            }
            v
        }
    };
    ids.sort_unstable();
    Ok(ids)
}

/// A live unique EMM, as read for supersession.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveEmm {
    pub id: u64,
    pub device: u64,
    /// `None` for a purpose this version does not know (only "everything"
    /// supersedes it).
    pub purpose: Option<Purpose>,
}

/// The statement reading the live unique EMMs of `devices`, locked until
/// the transaction ends.
fn live_unique_sql(devices: &[u64]) -> (String, Vec<Value>) {
    (
        format!(
            "SELECT id, address, purpose FROM emms WHERE addressing = 'unique' \
             AND address IN ({}) AND state = 'live' FOR UPDATE",
            marks(devices.len(), "?")
        ),
        devices.iter().map(|d| Value::from(*d)).collect(),
    )
}

/// Appends the read of the live unique EMMs of `devices` (locked until the
/// transaction ends) to a script; its rows go to [`live_rows`].
pub fn push_live_unique(
    reads: &mut Script,
    devices: &[u64],
) -> Result<usize, crate::sqltext::Error> {
    let (sql, params) = live_unique_sql(devices);
    reads.push(&sql, &params)
}

/// [`push_live_unique`] as a statement of its own.
pub async fn live_unique(
    tx: &mut Transaction<'_>,
    devices: &[u64],
) -> Result<Vec<LiveEmm>, mysql_async::Error> {
    let (sql, params) = live_unique_sql(devices);
    let rows: Vec<(u64, u64, String)> = tx.exec(sql, params).await?;
    Ok(rows
        .into_iter()
        .map(|(id, device, p)| LiveEmm {
            id,
            device,
            purpose: p.parse().ok(),
        })
        .collect())
}

/// The rows of [`push_live_unique`].
pub fn live_rows(rows: &[mysql_async::Row]) -> Result<Vec<LiveEmm>, crate::sqltext::Error> {
    rows.iter()
        .map(|r| {
            Ok(LiveEmm {
                id: col(r, 0)?,
                device: col(r, 1)?,
                purpose: col::<String>(r, 2)?.parse().ok(),
            })
        })
        .collect()
}

/// A live EMM sealed under an older key version than the current one.
#[derive(Clone, Debug)]
pub struct Stale {
    pub id: u64,
    pub emm_data: String,
}

/// Up to `limit` live, unexpired EMMs to `(addressing, address)` sealed
/// under a version below `current`, oldest first, locked until the
/// transaction ends. Group-addressed key deliveries (purpose `keys`) are
/// not among them: sealed again under the key they deliver they would
/// tell nobody anything; they expire on their own.
pub async fn stale_sealed(
    tx: &mut Transaction<'_>,
    (addressing, address): (&str, u64),
    current: u32,
    limit: usize,
) -> Result<Vec<Stale>, mysql_async::Error> {
    let rows: Vec<(u64, String)> = tx
        .exec(
            "SELECT id, emm_data FROM emms \
             WHERE addressing = ? AND address = ? AND state = 'live' AND key_version < ? \
             AND purpose <> 'keys' AND not_after > UTC_TIMESTAMP(6) ORDER BY id LIMIT ? FOR UPDATE",
            (addressing, address, current, limit as u64),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, emm_data)| Stale { id, emm_data })
        .collect())
}

/// Stores the re-sealed copy `review.emm_id` of EMM `old` (same request,
/// address, class, purpose and not_after; live, made now).
pub async fn insert_resealed(
    tx: &mut Transaction<'_>,
    old: u64,
    review: &Review,
    section: &[u8],
) -> Result<(), mysql_async::Error> {
    tx.exec_drop(
        "INSERT INTO emms (id, request_id, addressing, address, key_version, class, purpose, \
         emm_data, encrypted_emm, created_at, not_after, state) \
         SELECT ?, request_id, addressing, address, ?, class, purpose, ?, ?, UTC_TIMESTAMP(6), \
         not_after, 'live' FROM emms WHERE id = ?",
        (
            review.emm_id,
            review.key_version,
            review.to_json(),
            section,
            old,
        ),
    )
    .await
}

/// Withdraws the EMMs `old` that `new` replace: a `remove` event for each
/// old one, then an `add` for each new one.
pub async fn withdraw_resealed(
    tx: &mut Transaction<'_>,
    old: &[u64],
    new: &[u64],
) -> Result<(), mysql_async::Error> {
    if old.is_empty() {
        return Ok(());
    }
    tx.exec_drop(
        format!(
            "UPDATE emms SET state = 'withdrawn' WHERE id IN ({})",
            marks(old.len(), "?")
        ),
        old.iter().map(|i| Value::from(*i)).collect::<Vec<_>>(),
    )
    .await?;
    let mut params: Vec<Value> = Vec::with_capacity(old.len() + new.len());
    let mut rows = Vec::with_capacity(old.len() + new.len());
    for id in old {
        rows.push("(?, 'remove', UTC_TIMESTAMP(6))");
        params.push((*id).into());
    }
    for id in new {
        rows.push("(?, 'add', UTC_TIMESTAMP(6))");
        params.push((*id).into());
    }
    tx.exec_drop(
        format!(
            "INSERT INTO carousel_events (emm_id, op, created_at) VALUES {}",
            rows.join(",")
        ),
        params,
    )
    .await
}

/// Live, unexpired EMMs to `(addressing, address)` sealed under `version`.
pub async fn live_sealed_with<Q: Queryable>(
    q: &mut Q,
    (addressing, address): (&str, u64),
    version: u32,
) -> Result<u64, mysql_async::Error> {
    let live: Option<u64> = q
        .exec_first(
            "SELECT COUNT(*) FROM emms WHERE addressing = ? AND address = ? AND key_version = ? \
             AND state = 'live' AND not_after > UTC_TIMESTAMP(6)",
            (addressing, address, version),
        )
        .await?;
    Ok(live.unwrap_or(0))
}

/// Groups with a live group EMM.
pub async fn groups_with_live<Q: Queryable>(q: &mut Q) -> Result<Vec<u32>, mysql_async::Error> {
    let g: Vec<u64> = q
        .query("SELECT DISTINCT address FROM emms WHERE addressing = 'group' AND state = 'live'")
        .await?;
    Ok(g.into_iter()
        .filter_map(|g| u32::try_from(g).ok())
        .collect())
}

/// Bytes of every live EMM's section (what one carousel cycle sends).
pub async fn live_bytes<Q: Queryable>(q: &mut Q) -> Result<u64, mysql_async::Error> {
    let b: Option<Option<u64>> = q
        .query_first(
            "SELECT CAST(SUM(LENGTH(encrypted_emm)) AS UNSIGNED) FROM emms WHERE state = 'live'",
        )
        .await?;
    Ok(b.flatten().unwrap_or(0))
}

/// Of `devices`, those whose live ENTITLEMENT_SET EMM was made less than
/// `days` ago.
pub async fn fresh_sets(
    tx: &mut Transaction<'_>,
    devices: &[u64],
    days: u32,
) -> Result<HashSet<u64>, mysql_async::Error> {
    if devices.is_empty() {
        return Ok(HashSet::new());
    }
    let mut params: Vec<Value> = devices.iter().map(|d| Value::from(*d)).collect();
    params.push(Purpose::EntitlementSet.to_string().into());
    params.push(days.into());
    let fresh: Vec<u64> = tx
        .exec(
            format!(
                "SELECT DISTINCT address FROM emms WHERE addressing = 'unique' AND address IN ({}) \
                 AND purpose = ? AND state = 'live' \
                 AND created_at > UTC_TIMESTAMP(6) - INTERVAL ? DAY",
                marks(devices.len(), "?")
            ),
            params,
        )
        .await?;
    Ok(fresh.into_iter().collect())
}

/// Takes up to `limit` expired EMMs off the air (a `remove` event for each
/// one still live) and deletes them. Returns (deleted, of which live).
pub async fn expire_batch(
    tx: &mut Transaction<'_>,
    limit: u64,
) -> Result<(u64, u64), mysql_async::Error> {
    let rows: Vec<(u64, String)> = tx
        .exec(
            "SELECT id, state FROM emms WHERE not_after < UTC_TIMESTAMP(6) \
             ORDER BY not_after LIMIT ? FOR UPDATE",
            (limit,),
        )
        .await?;
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let live: Vec<Value> = rows
        .iter()
        .filter(|(_, s)| s == "live")
        .map(|(id, _)| Value::from(*id))
        .collect();
    if !live.is_empty() {
        tx.exec_drop(
            format!(
                "INSERT INTO carousel_events (emm_id, op, created_at) VALUES {}",
                marks(live.len(), "(?, 'remove', UTC_TIMESTAMP(6))")
            ),
            live.clone(),
        )
        .await?;
    }
    let ids: Vec<Value> = rows.iter().map(|(id, _)| Value::from(*id)).collect();
    tx.exec_drop(
        format!("DELETE FROM emms WHERE id IN ({})", marks(ids.len(), "?")),
        ids,
    )
    .await?;
    Ok((rows.len() as u64, live.len() as u64))
}

/// Retention (purge job): withdrawn EMMs `?` days after `created_at`, at most `?`.
pub const PURGE_WITHDRAWN: &str = "DELETE FROM emms WHERE state = 'withdrawn' AND created_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY ORDER BY created_at LIMIT ?";
/// Retention (purge job): events `?` hours after `created_at`, at most `?`.
pub const PURGE_EVENTS: &str = "DELETE FROM carousel_events WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? HOUR ORDER BY created_at LIMIT ?";

#[cfg(test)]
mod tests {
    use super::*;
    use casd_wire::emm::DeviceId;

    #[test]
    fn purposes_keep_their_stored_form() {
        let all = [
            (Purpose::DeviceEnable, "device_enable"),
            (Purpose::DeviceDisable, "device_disable"),
            (Purpose::EntitlementSet, "entitlement_set"),
            (Purpose::EntitlementAdd(7), "entitlement_add:7"),
            (
                Purpose::EntitlementRemove(4_000_000_000),
                "entitlement_remove:4000000000",
            ),
            (Purpose::Osm, "osm"),
            (Purpose::Keys, "keys"),
        ];
        for (p, s) in all {
            assert_eq!(p.to_string(), s);
            assert_eq!(s.parse::<Purpose>(), Ok(p));
        }
        for bad in [
            "test",
            "entitlement_add:",
            "entitlement_add:x",
            "keys:1",
            "",
        ] {
            assert!(bad.parse::<Purpose>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_review_is_the_json_the_emmg_always_wrote() {
        let r = Review {
            address: Address::Unique {
                device_id: DeviceId::new(5).unwrap(),
            },
            commands: vec![CommandSpec::DeviceDisable {}],
            emm_id: 9,
            issued_at: 10,
            key_version: 2,
            not_after: 11,
            resealed_from: None,
        };
        let old = serde_json::json!({
            "emm_id": 9,
            "issued_at": 10,
            "not_after": 11,
            "address": r.address,
            "key_version": 2,
            "commands": r.commands,
        });
        assert_eq!(r.to_json(), old.to_string());
        let back: Review = serde_json::from_str(&old.to_string()).unwrap();
        assert_eq!(back, r);
    }
}
