//! Group and global key rotation (`rotation` job) and root key rotation
//! (`root-rotation` job).
//!
//! One `rotation` run does, in order (each step idempotent, so a run that
//! dies is simply redone by the next):
//! 1. **Create** — when no GLK version is pending and the newest one
//!    activates `rotation_days` after the one before it within the lead
//!    time (or the run was triggered with `"force": true`): the next GLK
//!    version and the next GK version of every group with members, all
//!    activating at the same instant, through the Encryptor. Parameters:
//!    `activates_at` (unix s) or `activates_in_s` override the activation.
//!    The lead time is checked against the carousel: a warning with the
//!    numbers when it is shorter than sending the key EMMs needs.
//! 2. **Deliver** — one `deliverkeys` work item per enabled device (the
//!    EMMG sends it its group's current + pending GK and the current +
//!    pending GLK, unique EMM, background class), enqueued in fenced
//!    transactions of `scheduler.batch` devices with a cursor in
//!    `scheduler_state` ('rotation'), so a million devices is a thousand
//!    short transactions and a crash resumes where it stopped. Batches get
//!    increasing `not_before` so that the key EMMs' first sending takes at
//!    most `rotation_bandwidth_share` of the output bitrate.
//! 3. **Activate** — a version whose activation passed is marked `active`,
//!    the ones before it `retiring` (sealing already follows `activates_at`).
//! 4. **Re-seal** — live group/global EMMs sealed under an older version
//!    than the current one are sealed again under it (new emm_id, same
//!    commands, address, class, purpose and not_after) and the old ones
//!    withdrawn, with their carousel events, in fenced batches.
//! 5. **Retire** — an older version with no live EMM sealed under it is
//!    marked `retired`.

use std::collections::HashSet;

use mysql_async::prelude::*;
use mysql_async::Value;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{db_now, Counts, Job, JobCtx, JobError};
use crate::encryptor::{BoxFuture, KeyState, RootRotation, SealJob};
use crate::keystore::{current_meta, list_meta, KeyKind, KeyMeta};
use casd_wire::emm::{Address, CommandSpec, DeviceId};

/// `scheduler_state` row of the delivery cursor.
const CURSOR: &str = "rotation";
/// EMMs re-sealed per transaction.
const RESEAL_BATCH: usize = 100;

pub struct RotationJob;

impl Job for RotationJob {
    fn name(&self) -> &str {
        "rotation"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(rotate(ctx))
    }
}

pub struct RootRotationJob;

impl Job for RootRotationJob {
    fn name(&self) -> &str {
        "root-rotation"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(async move {
            ctx.check()?;
            let r = ctx.encryptor()?.rotate_root().await?;
            let mut counts = Counts::new();
            match r {
                RootRotation::NotConfigured => {
                    counts.insert(
                        "skipped".into(),
                        "keys.next_root_key_file is not set".into(),
                    );
                }
                RootRotation::AlreadyCurrent { root_generation } => {
                    counts.insert(
                        "skipped".into(),
                        "already sealed under keys.next_root_key_file".into(),
                    );
                    counts.insert("root_generation".into(), root_generation.into());
                }
                RootRotation::Rewrapped {
                    rows,
                    root_generation,
                } => {
                    tracing::warn!(rows, root_generation, "root key rotated: set keys.root_key_file to keys.next_root_key_file and unset the latter");
                    counts.insert("rows_resealed".into(), rows.into());
                    counts.insert("root_generation".into(), root_generation.into());
                }
            }
            Ok(counts)
        })
    }
}

/// Where delivery of a rotation's keys stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cursor {
    /// The rotation (its activation, unix s).
    pub activates_at: u32,
    /// Devices with device_id <= after have their item.
    pub after: u64,
    /// Batches enqueued so far.
    pub batches: u64,
    /// not_before of batch k = t0_ms + k × interval_ms (database clock).
    pub t0_ms: i64,
    pub interval_ms: i64,
    pub done: bool,
}

/// Section bytes of a key-delivery EMM carrying `versions` GK and
/// `versions` GLK versions.
pub fn key_emm_bytes(versions: usize) -> usize {
    let a = Address::Unique {
        device_id: DeviceId::new(1).expect("1 is a device id"),
    };
    let gk = CommandSpec::GroupKey {
        group_id: 0,
        slot: 0,
        key_version: 0,
        activates_at: 0,
        key: (),
    };
    let glk = CommandSpec::GlobalKey {
        key_version: 0,
        activates_at: 0,
        key: (),
    };
    a.emm_overhead() + versions * (gk.encoded_len() + glk.encoded_len())
}

/// Seconds the output needs to send `sections` sections of `bytes` each
/// once at `bitrate` bit/s, TS packet headers included (184 payload bytes
/// per 188).
pub fn airtime_s(sections: u64, bytes: usize, bitrate: u64) -> f64 {
    sections as f64 * bytes as f64 * 8.0 * 188.0 / 184.0 / bitrate.max(1) as f64
}

/// The slowest configured output's bitrate (the carousel can deliver no
/// faster than it).
pub fn min_bitrate(cfg: &crate::config::Config) -> u64 {
    cfg.cycler
        .outputs
        .iter()
        .map(|o| o.bitrate)
        .min()
        .unwrap_or(1_000_000)
}

/// The delivery plan of a rotation for `devices` devices.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Plan {
    pub devices: u64,
    pub key_emm_bytes: usize,
    pub bitrate: u64,
    /// One pass of just the key EMMs.
    pub keys_once_s: f64,
    /// Their first sending: burst_count repetitions in the fast lane.
    pub first_send_s: f64,
    /// Spread of the enqueue so the first sending takes at most the share.
    pub spread_s: f64,
    /// A full carousel cycle once they are in (every live EMM once).
    pub cycle_s: f64,
    pub lead_s: f64,
    pub batches: u64,
    pub interval_ms: i64,
}

/// Works out the spread and checks the lead time (warns with the numbers).
pub fn plan(cfg: &crate::config::Config, devices: u64, live_bytes: u64, lead_s: f64) -> Plan {
    let sc = &cfg.scheduler;
    let bitrate = min_bitrate(cfg);
    let bytes = key_emm_bytes(2);
    let burst = u64::from(cfg.cycler.burst_count.max(1));
    let keys_once_s = airtime_s(devices, bytes, bitrate);
    let first_send_s = keys_once_s * burst as f64;
    let batch = sc.batch.max(1) as u64;
    let batches = devices.div_ceil(batch).max(1);
    let mut spread_s = first_send_s / sc.rotation_bandwidth_share;
    // Everything is queued by half the lead time at the latest.
    if spread_s > lead_s / 2.0 {
        spread_s = (lead_s / 2.0).max(0.0);
    }
    let interval_ms = if batches > 1 {
        (spread_s * 1000.0 / (batches - 1) as f64) as i64
    } else {
        0
    };
    let cycle_s = airtime_s(1, 1, bitrate) * live_bytes as f64 + keys_once_s;
    let p = Plan {
        devices,
        key_emm_bytes: bytes,
        bitrate,
        keys_once_s,
        first_send_s,
        spread_s,
        cycle_s,
        lead_s,
        batches,
        interval_ms,
    };
    let needed = spread_s.max(first_send_s / sc.rotation_bandwidth_share) + cycle_s;
    if lead_s < needed {
        tracing::warn!(
            devices,
            key_emm_bytes = bytes,
            bitrate,
            keys_once_s = format!("{keys_once_s:.1}"),
            first_send_s = format!("{first_send_s:.1}"),
            cycle_s = format!("{cycle_s:.1}"),
            needed_s = format!("{needed:.1}"),
            lead_s = format!("{lead_s:.1}"),
            "key rotation lead time is shorter than the carousel needs to deliver the new keys \
             (first sending at the configured bandwidth share + one full cycle); devices may see \
             group/global EMMs under the new key before they hold it"
        );
    }
    p
}

/// One `rotation` run.
pub async fn rotate(ctx: &JobCtx) -> Result<Counts, JobError> {
    let enc = ctx.encryptor()?;
    let cfg = &ctx.shared.cfg;
    let sc = &cfg.scheduler;
    let mut counts = Counts::new();
    let mut c = ctx.conn().await?;
    let now = db_now(&mut c).await?;
    let lead = u64::from(sc.rotation_lead_hours) * 3600;

    // 1. Create.
    let glks = list_meta(&mut c, KeyKind::Global).await?;
    let newest = glks
        .iter()
        .filter(|m| m.state != "retired")
        .max_by_key(|m| m.version)
        .cloned();
    let pending = newest.as_ref().is_some_and(|m| m.activates_at > now);
    let period = u64::from(sc.rotation_days) * 86_400;
    let scheduled_at = newest
        .as_ref()
        .map(|m| u64::from(m.activates_at) + period)
        .unwrap_or(0);
    let due = period > 0 && u64::from(now) + lead >= scheduled_at;
    if pending {
        counts.insert(
            "pending_version".into(),
            newest.as_ref().map(|m| m.version).into(),
        );
    } else if ctx.param_bool("force") || due {
        let at = if let Some(a) = ctx.param_u64("activates_at") {
            a
        } else if let Some(s) = ctx.param_u64("activates_in_s") {
            u64::from(now) + s
        } else {
            (u64::from(now) + lead).max(scheduled_at)
        };
        let at =
            u32::try_from(at).map_err(|_| JobError::Other("activates_at out of range".into()))?;
        ctx.check()?;
        let glk = enc.create_key_version(KeyKind::Global, at).await?;
        tracing::info!(
            version = glk.version,
            activates_at = at,
            "GLK version created"
        );
        counts.insert("glk_version".into(), glk.version.into());
        let groups: Vec<u32> = c
            .query("SELECT DISTINCT group_id FROM group_slots WHERE device_id IS NOT NULL ORDER BY group_id")
            .await?;
        let mut made = 0u64;
        for g in groups {
            ctx.check()?;
            let kind = KeyKind::Group(g);
            let metas = list_meta(&mut c, kind).await?;
            // No key yet (its first is made, active, on first use), or
            // this rotation's already made by an earlier run.
            if metas.is_empty() || metas.iter().any(|m| m.activates_at >= at) {
                continue;
            }
            enc.create_key_version(kind, at).await?;
            made += 1;
        }
        counts.insert("gk_versions_created".into(), made.into());
        // Lead time check and delivery plan.
        let devices: Option<u64> = c
            .query_first("SELECT COUNT(*) FROM devices WHERE state = 'enabled'")
            .await?;
        let live_bytes: Option<Option<u64>> = c
            .query_first("SELECT CAST(SUM(LENGTH(encrypted_emm)) AS UNSIGNED) FROM emms WHERE state = 'live'")
            .await?;
        let p = plan(
            cfg,
            devices.unwrap_or(0),
            live_bytes.flatten().unwrap_or(0),
            f64::from(at.saturating_sub(now)),
        );
        counts.insert("plan".into(), serde_json::to_value(&p).unwrap_or_default());
        let now_ms: Option<i64> = c
            .query_first("SELECT CAST(UNIX_TIMESTAMP(UTC_TIMESTAMP(6)) * 1000 AS SIGNED)")
            .await?;
        let cursor = Cursor {
            activates_at: at,
            after: 0,
            batches: 0,
            t0_ms: now_ms.unwrap_or(0),
            interval_ms: p.interval_ms,
            done: false,
        };
        let mut tx = ctx.begin(&mut c).await?;
        write_cursor(&mut tx, &cursor).await?;
        tx.commit().await?;
    }

    // 2. Deliver.
    let enqueued = deliver(ctx, &mut c).await?;
    counts.insert("deliverkeys_enqueued".into(), enqueued.into());

    // 3-5. Activate, re-seal, retire: global, then every group with keys
    //      or live group EMMs.
    let mut families = vec![KeyKind::Global];
    let mut groups: Vec<u32> = c
        .query("SELECT DISTINCT group_id FROM group_slots WHERE device_id IS NOT NULL")
        .await?;
    let with_emms: Vec<u64> = c
        .query("SELECT DISTINCT address FROM emms WHERE addressing = 'group' AND state = 'live'")
        .await?;
    groups.extend(with_emms.into_iter().filter_map(|g| u32::try_from(g).ok()));
    let groups: HashSet<u32> = groups.into_iter().collect();
    let mut groups: Vec<u32> = groups.into_iter().collect();
    groups.sort_unstable();
    families.extend(groups.into_iter().map(KeyKind::Group));
    let (mut activated, mut resealed, mut retired) = (0u64, 0u64, 0u64);
    for kind in families {
        ctx.check()?;
        let now = db_now(&mut c).await?;
        let Some(cur) = current_meta(&mut c, kind, now).await? else {
            continue;
        };
        let metas = list_meta(&mut c, kind).await?;
        for m in &metas {
            if m.version == cur.version && m.state == "pending" {
                enc.set_key_state(kind, m.version, KeyState::Active).await?;
                activated += 1;
            } else if m.version < cur.version && (m.state == "active" || m.state == "pending") {
                enc.set_key_state(kind, m.version, KeyState::Retiring)
                    .await?;
            }
        }
        resealed += reseal(ctx, &mut c, kind, cur.version).await?;
        retired += retire(ctx, &mut c, kind, &metas, cur.version).await?;
    }
    counts.insert("activated".into(), activated.into());
    counts.insert("resealed".into(), resealed.into());
    counts.insert("retired".into(), retired.into());
    Ok(counts)
}

async fn read_cursor<Q: Queryable>(q: &mut Q, lock: bool) -> Result<Option<Cursor>, JobError> {
    let v: Option<String> = q
        .exec_first(
            format!(
                "SELECT value FROM scheduler_state WHERE name = ?{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            (CURSOR,),
        )
        .await?;
    Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
}

async fn write_cursor<Q: Queryable>(q: &mut Q, c: &Cursor) -> Result<(), JobError> {
    q.exec_drop(
        "INSERT INTO scheduler_state (name, value, updated_at) VALUES (?, ?, UTC_TIMESTAMP(6)) \
         ON DUPLICATE KEY UPDATE value = VALUES(value), updated_at = VALUES(updated_at)",
        (CURSOR, serde_json::to_string(c).unwrap_or_default()),
    )
    .await?;
    Ok(())
}

/// Enqueues the remaining `deliverkeys` items of the current rotation, one
/// fenced transaction per batch of devices. Returns items enqueued.
async fn deliver(ctx: &JobCtx, c: &mut mysql_async::Conn) -> Result<u64, JobError> {
    let batch = ctx.shared.cfg.scheduler.batch.max(1) as u64;
    let mut n = 0u64;
    loop {
        let mut tx = ctx.begin(c).await?;
        let Some(mut cur) = read_cursor(&mut tx, true).await? else {
            tx.rollback().await?;
            return Ok(n);
        };
        if cur.done {
            tx.rollback().await?;
            return Ok(n);
        }
        let ids: Vec<u64> = tx
            .exec(
                "SELECT device_id FROM devices WHERE state = 'enabled' AND device_id > ? \
                 ORDER BY device_id LIMIT ?",
                (cur.after, batch),
            )
            .await?;
        let Some(&last) = ids.last() else {
            cur.done = true;
            write_cursor(&mut tx, &cur).await?;
            tx.commit().await?;
            return Ok(n);
        };
        let not_before_ms = cur.t0_ms + cur.interval_ms * cur.batches as i64;
        tx.exec_drop(
            "INSERT INTO work_items (request_id, kind, device_id, payload, state, attempts, not_before, created_at) \
             SELECT NULL, 'deliverkeys', NULL, JSON_OBJECT('kind', 'deliverkeys', 'device_id', device_id), \
                    'pending', 0, FROM_UNIXTIME(? / 1000), UTC_TIMESTAMP(6) \
             FROM devices WHERE state = 'enabled' AND device_id > ? AND device_id <= ? ORDER BY device_id",
            (not_before_ms, cur.after, last),
        )
        .await?;
        n += tx.affected_rows();
        cur.after = last;
        cur.batches += 1;
        write_cursor(&mut tx, &cur).await?;
        tx.commit().await?;
        ctx.shared.work_ready.notify_one();
    }
}

#[derive(Deserialize)]
struct Review {
    not_after: u32,
    address: Address,
    commands: Vec<CommandSpec>,
}

/// Re-seals the live EMMs of `kind`'s family sealed under a version older
/// than `current`. Returns EMMs re-sealed.
async fn reseal(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    kind: KeyKind,
    current: u32,
) -> Result<u64, JobError> {
    let (addressing, address) = match kind {
        KeyKind::Global => ("global", 0u64),
        KeyKind::Group(g) => ("group", u64::from(g)),
        KeyKind::Pmk => return Ok(0),
    };
    let enc = ctx.encryptor()?;
    let mut n = 0u64;
    let mut skip: HashSet<u64> = HashSet::new();
    loop {
        let mut tx = ctx.begin(c).await?;
        type Row = (u64, Option<u64>, u8, String, String);
        let rows: Vec<Row> = tx
            .exec(
                "SELECT id, request_id, class, purpose, emm_data FROM emms \
                 WHERE addressing = ? AND address = ? AND state = 'live' AND key_version < ? \
                 AND not_after > UTC_TIMESTAMP(6) ORDER BY id LIMIT ? FOR UPDATE",
                (
                    addressing,
                    address,
                    current,
                    (RESEAL_BATCH + skip.len()) as u64,
                ),
            )
            .await?;
        let rows: Vec<Row> = rows.into_iter().filter(|r| !skip.contains(&r.0)).collect();
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(n);
        }
        let ids: Vec<u64> = tx
            .query(format!(
                "SELECT NEXTVAL(emm_id_seq) FROM seq_1_to_{}",
                rows.len()
            ))
            .await?;
        let issued_at = db_now(&mut tx).await?;
        let mut jobs = Vec::new();
        let mut kept = Vec::new();
        for (r, id) in rows.iter().zip(ids.iter()) {
            match serde_json::from_str::<Review>(&r.4) {
                Ok(rv) => {
                    jobs.push(SealJob {
                        emm_id: *id,
                        issued_at,
                        not_after: rv.not_after,
                        address: rv.address.clone(),
                        key_version: Some(current),
                        commands: rv.commands.clone(),
                    });
                    kept.push((r, *id, rv));
                }
                Err(e) => {
                    tracing::error!(emm_id = r.0, "cannot re-seal: unreadable emm_data: {e}");
                    skip.insert(r.0);
                }
            }
        }
        let sealed = if jobs.is_empty() {
            Vec::new()
        } else {
            enc.seal_batch(jobs).await?
        };
        let mut old_ids = Vec::new();
        let mut new_ids = Vec::new();
        for ((r, id, rv), s) in kept.into_iter().zip(sealed) {
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(emm_id = r.0, "cannot re-seal: {e}");
                    skip.insert(r.0);
                    continue;
                }
            };
            let review = json!({
                "emm_id": id,
                "issued_at": issued_at,
                "not_after": rv.not_after,
                "address": rv.address,
                "key_version": s.key_version,
                "commands": rv.commands,
                "resealed_from": r.0,
            });
            tx.exec_drop(
                "INSERT INTO emms (id, request_id, addressing, address, key_version, class, purpose, \
                 emm_data, encrypted_emm, created_at, not_after, state) \
                 SELECT ?, request_id, addressing, address, ?, class, purpose, ?, ?, UTC_TIMESTAMP(6), \
                 not_after, 'live' FROM emms WHERE id = ?",
                (id, s.key_version, review.to_string(), s.section, r.0),
            )
            .await?;
            old_ids.push(r.0);
            new_ids.push(id);
        }
        if !old_ids.is_empty() {
            let ph = vec!["?"; old_ids.len()].join(",");
            tx.exec_drop(
                format!("UPDATE emms SET state = 'withdrawn' WHERE id IN ({ph})"),
                old_ids.iter().map(|i| Value::from(*i)).collect::<Vec<_>>(),
            )
            .await?;
            let mut params: Vec<Value> = Vec::new();
            let mut values = Vec::new();
            for id in &old_ids {
                values.push("(?, 'remove', UTC_TIMESTAMP(6))");
                params.push((*id).into());
            }
            for id in &new_ids {
                values.push("(?, 'add', UTC_TIMESTAMP(6))");
                params.push((*id).into());
            }
            tx.exec_drop(
                format!(
                    "INSERT INTO carousel_events (emm_id, op, created_at) VALUES {}",
                    values.join(",")
                ),
                params,
            )
            .await?;
        }
        tx.commit().await?;
        if !new_ids.is_empty() {
            ctx.shared.emms_ready.notify_one();
        }
        n += new_ids.len() as u64;
    }
}

/// Marks retired the versions older than `current` that no live EMM uses.
async fn retire(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    kind: KeyKind,
    metas: &[KeyMeta],
    current: u32,
) -> Result<u64, JobError> {
    let (addressing, address) = match kind {
        KeyKind::Global => ("global", 0u64),
        KeyKind::Group(g) => ("group", u64::from(g)),
        KeyKind::Pmk => return Ok(0),
    };
    let enc = ctx.encryptor()?;
    let mut n = 0;
    for m in metas {
        if m.version >= current || m.state == "retired" {
            continue;
        }
        ctx.check()?;
        let live: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM emms WHERE addressing = ? AND address = ? AND key_version = ? \
                 AND state = 'live' AND not_after > UTC_TIMESTAMP(6)",
                (addressing, address, m.version),
            )
            .await?;
        if live.unwrap_or(0) == 0 {
            enc.set_key_state(kind, m.version, KeyState::Retired)
                .await?;
            tracing::info!(%kind, version = m.version, "key version retired");
            n += 1;
        }
    }
    Ok(n)
}
