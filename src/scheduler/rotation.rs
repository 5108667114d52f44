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
//! 2. **Deliver**, group-addressed — one `delivergroupkeys` work item per
//!    group with members (the EMMG makes one group EMM to its members,
//!    sealed under the group's current GK, carrying the group's new GK and
//!    the new GLK: 176 bytes, one TS packet), enqueued in fenced
//!    transactions of `scheduler.batch` groups with a cursor in
//!    `scheduler_state` ('rotation-groups'), so a crash resumes where it
//!    stopped. Batches get increasing `not_before` so that the key EMMs'
//!    first sending takes at most `rotation_bandwidth_share` of the output
//!    bitrate. A device that misses them catches up from its refresh.
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
use mysql_async::Transaction;
use serde::{Deserialize, Serialize};

use super::{db_now, Counts, Job, JobCtx, JobError};
use crate::emm_store::{self, Review, Stale};
use crate::encryptor::{BoxFuture, EncryptorError, KeyState, RootRotation, SealJob, SealResults};
use crate::keystore::{
    current_meta, group_versions_at, groups_with_keys, list_meta, KeyKind, KeyMeta,
};
use crate::queue::{self, At, KeyOffer, NewItem, Work};
use casd_wire::emm::{Address, CommandSpec, DeviceId};

/// `scheduler_state` row of the delivery cursor (a name of its own: the
/// per-device cursor of casd before group-addressed delivery was 'rotation').
const CURSOR: &str = "rotation-groups";
/// Seconds a group-addressed key EMM stays in the carousel after its keys
/// activate: a device back on within that catches up from it; later, from
/// its refresh.
pub const KEYS_LIVE_AFTER_ACTIVATION_S: u32 = 3600;
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
    /// Groups with group_id <= after have their item.
    pub after: u64,
    /// The rotation's GLK version (`None`: a run created none).
    #[serde(default)]
    pub glk: Option<KeyOffer>,
    /// Batches enqueued so far.
    pub batches: u64,
    /// not_before of batch k = t0_ms + k × interval_ms (database clock).
    pub t0_ms: i64,
    pub interval_ms: i64,
    pub done: bool,
}

/// Section bytes of a group-addressed rotation's EMM: a group address,
/// one GK and one GLK version (176: one TS packet).
pub fn group_key_emm_bytes() -> usize {
    key_emm_bytes(&Address::group_with_slots(1, [0]), 1)
}

/// Section bytes of a key-delivery EMM to `a` carrying `versions` GK and
/// `versions` GLK versions.
pub fn key_emm_bytes(a: &Address, versions: usize) -> usize {
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

/// The delivery plan of a rotation to `groups` groups.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Plan {
    pub groups: u64,
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
pub fn plan(cfg: &crate::config::Config, groups: u64, live_bytes: u64, lead_s: f64) -> Plan {
    let sc = &cfg.scheduler;
    let bitrate = min_bitrate(cfg);
    let bytes = group_key_emm_bytes();
    let burst = u64::from(cfg.cycler.burst_count.max(1));
    let keys_once_s = airtime_s(groups, bytes, bitrate);
    let first_send_s = keys_once_s * burst as f64;
    let batch = sc.batch.max(1) as u64;
    let batches = groups.div_ceil(batch).max(1);
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
        groups,
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
            groups,
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
    let mut counts = Counts::new();
    let mut c = ctx.conn().await?;

    // 1. Create.
    let now = db_now(&mut c).await?;
    let glks = list_meta(&mut c, KeyKind::Global).await?;
    match creation(&glks, now, &ctx.shared.cfg.scheduler) {
        Creation::Pending(version) => {
            counts.insert("pending_version".into(), version.into());
        }
        Creation::Due { scheduled_at } => {
            create(ctx, &mut c, now, scheduled_at, &mut counts).await?
        }
        Creation::NotDue { scheduled_at } if ctx.param_bool("force") => {
            create(ctx, &mut c, now, scheduled_at, &mut counts).await?
        }
        Creation::NotDue { .. } => {}
    }

    // 2. Deliver.
    let enqueued = deliver(ctx, &mut c).await?;
    counts.insert("delivergroupkeys_enqueued".into(), enqueued.into());

    // 3-5. Activate, re-seal, retire: global, then every group with keys
    //      or live group EMMs.
    let (mut activated, mut resealed, mut retired) = (0u64, 0u64, 0u64);
    for kind in families(&mut c).await? {
        ctx.check()?;
        let now = db_now(&mut c).await?;
        let Some(cur) = current_meta(&mut c, kind, now).await? else {
            continue;
        };
        let metas = list_meta(&mut c, kind).await?;
        activated += activate(ctx, kind, &metas, cur.version).await?;
        resealed += reseal(ctx, &mut c, kind, cur.version).await?;
        retired += retire(ctx, &mut c, kind, &metas, cur.version).await?;
    }
    counts.insert("activated".into(), activated.into());
    counts.insert("resealed".into(), resealed.into());
    counts.insert("retired".into(), retired.into());
    Ok(counts)
}

/// Whether a rotation's versions are to be created now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Creation {
    /// The newest GLK version activates later: it is this rotation's.
    Pending(u32),
    /// Within the lead time of the next scheduled activation (unix s).
    Due { scheduled_at: u64 },
    /// Not yet (a forced run creates anyway).
    NotDue { scheduled_at: u64 },
}

/// Decides from the GLK versions: the next activation is `rotation_days`
/// after the newest one's; it is due within `rotation_lead_hours` of it.
fn creation(glks: &[KeyMeta], now: u32, sc: &crate::config::SchedulerConfig) -> Creation {
    let newest = glks
        .iter()
        .filter(|m| m.state != "retired")
        .max_by_key(|m| m.version);
    if let Some(m) = newest.filter(|m| m.activates_at > now) {
        return Creation::Pending(m.version);
    }
    let period = u64::from(sc.rotation_days) * 86_400;
    let lead = u64::from(sc.rotation_lead_hours) * 3600;
    let scheduled_at = newest.map_or(0, |m| u64::from(m.activates_at) + period);
    if period > 0 && u64::from(now) + lead >= scheduled_at {
        Creation::Due { scheduled_at }
    } else {
        Creation::NotDue { scheduled_at }
    }
}

/// `casd_encryptor_next_rotation_seconds{kind}` (gk, glk: one rotation
/// makes both) from the GLK metadata every 10 s: seconds until the next
/// scheduled activation, negative when overdue. Nothing when rotation is
/// off (`rotation_days = 0`). For the process running the Scheduler role.
pub fn watch_next_rotation(shared: &crate::app::Shared) {
    let m = &shared.metrics;
    let period = u64::from(shared.cfg.scheduler.rotation_days) * 86_400;
    if !m.is_on() || period == 0 {
        return;
    }
    let gauge = |k: &str| {
        m.gauge(
            "casd_encryptor_next_rotation_seconds",
            "Seconds until the next scheduled key rotation (negative = overdue).",
            &[("kind", k.into())],
        )
    };
    let gauges = [gauge("gk"), gauge("glk")];
    let db = shared.db.clone();
    let every = std::time::Duration::from_secs(10);
    crate::metrics::every(every, shared.shutdown.clone(), move || {
        let (db, gauges) = (db.clone(), gauges.clone());
        async move {
            let Ok(mut c) = db.conn().await else { return };
            let Ok(glks) = list_meta(&mut c, KeyKind::Global).await else {
                return;
            };
            let newest = glks
                .iter()
                .filter(|m| m.state != "retired")
                .map(|m| m.activates_at)
                .max();
            if let Some(at) = newest {
                let left = (u64::from(at) + period) as f64 - crate::metrics::unix_now();
                for g in &gauges {
                    g.set(left);
                }
            }
        }
    });
}

/// When the new versions activate: the run's `activates_at` or
/// `activates_in_s` parameter, else the lead time from now but not before
/// the scheduled time.
fn activation(ctx: &JobCtx, now: u32, scheduled_at: u64) -> Result<u32, JobError> {
    let lead = u64::from(ctx.shared.cfg.scheduler.rotation_lead_hours) * 3600;
    let at = if let Some(a) = ctx.param_u64("activates_at") {
        a
    } else if let Some(s) = ctx.param_u64("activates_in_s") {
        u64::from(now) + s
    } else {
        (u64::from(now) + lead).max(scheduled_at)
    };
    u32::try_from(at).map_err(|_| JobError::Other("activates_at out of range".into()))
}

/// Step 1: the next GLK version and the next GK version of every group
/// with members, then the delivery plan and its cursor.
async fn create(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    now: u32,
    scheduled_at: u64,
    counts: &mut Counts,
) -> Result<(), JobError> {
    let enc = ctx.encryptor()?;
    let at = activation(ctx, now, scheduled_at)?;
    ctx.check()?;
    let glk = enc.create_key_version(KeyKind::Global, at).await?;
    tracing::info!(
        version = glk.version,
        activates_at = at,
        "GLK version created"
    );
    counts.insert("glk_version".into(), glk.version.into());
    let glk = KeyOffer {
        version: glk.version,
        activates_at: glk.activates_at,
    };
    let groups: Vec<u32> = c
        .query("SELECT DISTINCT group_id FROM group_slots WHERE device_id IS NOT NULL ORDER BY group_id")
        .await?;
    let keyed = groups_with_keys(c, at).await?;
    // No key yet (its first is made, active, on first use), or this
    // rotation's already made by an earlier run: none.
    let due: Vec<u32> = groups
        .into_iter()
        .filter(|g| keyed.get(g) == Some(&false))
        .collect();
    let mut made = create_group_keys(ctx, due.clone(), at).await?;
    // Those that failed (two creations may deadlock on neighbouring
    // groups' gap locks), one at a time; a creation that failed after its
    // commit is found made and skipped.
    let keyed = groups_with_keys(c, at).await?;
    for g in due.into_iter().filter(|g| keyed.get(g) == Some(&false)) {
        ctx.check()?;
        enc.create_key_version(KeyKind::Group(g), at).await?;
        made += 1;
    }
    counts.insert("gk_versions_created".into(), made.into());
    let p = start_delivery(ctx, c, now, (at, glk)).await?;
    counts.insert("plan".into(), serde_json::to_value(&p).unwrap_or_default());
    Ok(())
}

/// Group key creations in flight at once: each is a short transaction of
/// its own, so they overlap their round trips (one after the other, a
/// million devices' 3,907 groups took 17.9 s on the development machine).
const CREATE_CONCURRENCY: usize = 16;

/// Creates the rotation's GK (activating at `at`) of each group, at most
/// [`CREATE_CONCURRENCY`] at a time. Returns versions created; a creation
/// the Encryptor refused is logged and left to the caller's second pass.
async fn create_group_keys(ctx: &JobCtx, groups: Vec<u32>, at: u32) -> Result<u64, JobError> {
    let enc = ctx
        .enc
        .clone()
        .ok_or_else(|| JobError::Other("the scheduler needs an encryptor".into()))?;
    let mut set = tokio::task::JoinSet::new();
    let mut made = 0u64;
    let joined = |r: Result<Result<KeyMeta, EncryptorError>, tokio::task::JoinError>| match r
        .map_err(|e| JobError::Other(format!("key creation task: {e}")))?
    {
        Ok(_) => Ok::<u64, JobError>(1),
        Err(e) => {
            tracing::warn!("group key creation failed, retried alone: {e}");
            Ok(0)
        }
    };
    for g in groups {
        ctx.check()?;
        if set.len() >= CREATE_CONCURRENCY {
            if let Some(r) = set.join_next().await {
                made += joined(r)?;
            }
        }
        let enc = enc.clone();
        set.spawn(async move { enc.create_key_version(KeyKind::Group(g), at).await });
    }
    while let Some(r) = set.join_next().await {
        made += joined(r)?;
    }
    Ok(made)
}

/// The lead time check and delivery plan, and the delivery cursor of the
/// rotation activating at `at` with GLK `glk`.
async fn start_delivery(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    now: u32,
    (at, glk): (u32, KeyOffer),
) -> Result<Plan, JobError> {
    let groups: Option<u64> = c
        .query_first("SELECT COUNT(DISTINCT group_id) FROM group_slots WHERE device_id IS NOT NULL")
        .await?;
    let live_bytes = emm_store::live_bytes(c).await?;
    let p = plan(
        &ctx.shared.cfg,
        groups.unwrap_or(0),
        live_bytes,
        f64::from(at.saturating_sub(now)),
    );
    let now_ms: Option<i64> = c
        .query_first("SELECT CAST(UNIX_TIMESTAMP(UTC_TIMESTAMP(6)) * 1000 AS SIGNED)")
        .await?;
    let cursor = Cursor {
        activates_at: at,
        after: 0,
        glk: Some(glk),
        batches: 0,
        t0_ms: now_ms.unwrap_or(0),
        interval_ms: p.interval_ms,
        done: false,
    };
    let mut tx = ctx.begin(c).await?;
    write_cursor(&mut tx, &cursor).await?;
    tx.commit().await?;
    Ok(p)
}

/// The key families to activate, re-seal and retire: global, then every
/// group with members or with live group EMMs, in order.
async fn families(c: &mut mysql_async::Conn) -> Result<Vec<KeyKind>, JobError> {
    let mut groups: Vec<u32> = c
        .query("SELECT DISTINCT group_id FROM group_slots WHERE device_id IS NOT NULL")
        .await?;
    groups.extend(emm_store::groups_with_live(c).await?);
    groups.sort_unstable();
    groups.dedup();
    let mut families = vec![KeyKind::Global];
    families.extend(groups.into_iter().map(KeyKind::Group));
    Ok(families)
}

/// Step 3: the current version marked `active`, the ones before it
/// `retiring`. Returns versions activated.
async fn activate(
    ctx: &JobCtx,
    kind: KeyKind,
    metas: &[KeyMeta],
    current: u32,
) -> Result<u64, JobError> {
    let enc = ctx.encryptor()?;
    let mut activated = 0;
    for m in metas {
        if m.version == current && m.state == "pending" {
            enc.set_key_state(kind, m.version, KeyState::Active).await?;
            activated += 1;
        } else if m.version < current && (m.state == "active" || m.state == "pending") {
            enc.set_key_state(kind, m.version, KeyState::Retiring)
                .await?;
        }
    }
    Ok(activated)
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

/// Enqueues the remaining `delivergroupkeys` items of the current
/// rotation, one fenced transaction per batch of groups. Returns items
/// enqueued.
async fn deliver(ctx: &JobCtx, c: &mut mysql_async::Conn) -> Result<u64, JobError> {
    let batch = ctx.shared.cfg.scheduler.batch.max(1) as u64;
    let mut n = 0u64;
    loop {
        let mut tx = ctx.begin(c).await?;
        let Some(mut cur) = read_cursor(&mut tx, true).await?.filter(|c| !c.done) else {
            tx.rollback().await?;
            return Ok(n);
        };
        let groups = groups_with_members_after(&mut tx, cur.after, batch).await?;
        let (Some(&first), Some(&last)) = (groups.first(), groups.last()) else {
            cur.done = true;
            write_cursor(&mut tx, &cur).await?;
            tx.commit().await?;
            return Ok(n);
        };
        let at = cur.activates_at;
        let gks: std::collections::HashMap<u32, u32> =
            group_versions_at(&mut tx, at, (first, last))
                .await?
                .into_iter()
                .collect();
        let gk = |g: u32| {
            gks.get(&g).map(|&version| KeyOffer {
                version,
                activates_at: at,
            })
        };
        let not_after = at.saturating_add(KEYS_LIVE_AFTER_ACTIVATION_S);
        let works = group_key_items(&groups, gk, cur.glk, not_after);
        let not_before = At::UnixMs(cur.t0_ms + cur.interval_ms * cur.batches as i64);
        let items: Vec<NewItem<'_>> = works
            .iter()
            .map(|work| NewItem {
                request_id: None,
                work,
                not_before,
            })
            .collect();
        n += queue::enqueue(&mut tx, &items).await?;
        cur.after = u64::from(last);
        cur.batches += 1;
        write_cursor(&mut tx, &cur).await?;
        tx.commit().await?;
        ctx.shared.work_ready.notify_one();
    }
}

/// Up to `limit` groups with members after `after`, in order.
pub(super) async fn groups_with_members_after<Q: Queryable>(
    q: &mut Q,
    after: u64,
    limit: u64,
) -> Result<Vec<u32>, JobError> {
    Ok(q.exec(
        "SELECT DISTINCT group_id FROM group_slots WHERE device_id IS NOT NULL AND group_id > ? \
             ORDER BY group_id LIMIT ?",
        (after, limit),
    )
    .await?)
}

/// One `delivergroupkeys` item per group: its GK offer (`gk(group)`) and
/// the GLK offer; groups with neither get none.
pub(super) fn group_key_items(
    groups: &[u32],
    gk: impl Fn(u32) -> Option<KeyOffer>,
    glk: Option<KeyOffer>,
    not_after: u32,
) -> Vec<Work> {
    groups
        .iter()
        .map(|&group_id| Work::DeliverGroupKeys {
            group_id,
            gk: gk(group_id),
            glk,
            not_after,
        })
        .filter(|w| {
            !matches!(
                w,
                Work::DeliverGroupKeys {
                    gk: None,
                    glk: None,
                    ..
                }
            )
        })
        .collect()
}

/// `emms.addressing` and `emms.address` of a key family's EMMs (`None`:
/// PMKs seal unique EMMs only, never re-sealed).
fn family_address(kind: KeyKind) -> Option<(&'static str, u64)> {
    match kind {
        KeyKind::Global => Some(("global", 0)),
        KeyKind::Group(g) => Some(("group", u64::from(g))),
        KeyKind::Pmk => None,
    }
}

/// Re-seals the live EMMs of `kind`'s family sealed under a version older
/// than `current`, in fenced batches. Returns EMMs re-sealed.
async fn reseal(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    kind: KeyKind,
    current: u32,
) -> Result<u64, JobError> {
    let Some(family) = family_address(kind) else {
        return Ok(0);
    };
    let mut n = 0u64;
    // EMMs that cannot be re-sealed (logged once), left as they are.
    let mut skip: HashSet<u64> = HashSet::new();
    loop {
        let mut tx = ctx.begin(c).await?;
        let stale: Vec<Stale> =
            emm_store::stale_sealed(&mut tx, family, current, RESEAL_BATCH + skip.len())
                .await?
                .into_iter()
                .filter(|r| !skip.contains(&r.id))
                .collect();
        if stale.is_empty() {
            tx.rollback().await?;
            return Ok(n);
        }
        let ids = emm_store::next_ids(&mut tx, stale.len()).await?;
        let issued_at = db_now(&mut tx).await?;
        let (jobs, kept) = reseal_jobs(&stale, &ids, issued_at, current, &mut skip);
        let sealed = match jobs.is_empty() {
            true => Vec::new(),
            false => ctx.encryptor()?.seal_batch(jobs).await?,
        };
        let (old, new) = store_resealed(&mut tx, kept, sealed, &mut skip).await?;
        emm_store::withdraw_resealed(&mut tx, &old, &new).await?;
        tx.commit().await?;
        if !new.is_empty() {
            ctx.shared.emms_ready.notify_one();
        }
        n += new.len() as u64;
    }
}

/// The sealing job of each stale EMM under `current`, with its new id and
/// the review to store; an unreadable `emm_data` is logged and skipped.
fn reseal_jobs(
    stale: &[Stale],
    ids: &[u64],
    issued_at: u32,
    current: u32,
    skip: &mut HashSet<u64>,
) -> (Vec<SealJob>, Vec<Review>) {
    let mut jobs = Vec::new();
    let mut kept = Vec::new();
    for (r, id) in stale.iter().zip(ids) {
        match serde_json::from_str::<Review>(&r.emm_data) {
            Ok(old) => {
                jobs.push(SealJob {
                    emm_id: *id,
                    issued_at,
                    not_after: old.not_after,
                    address: old.address.clone(),
                    key_version: Some(current),
                    commands: old.commands.clone(),
                });
                kept.push(Review {
                    emm_id: *id,
                    issued_at,
                    resealed_from: Some(r.id),
                    ..old
                });
            }
            Err(e) => {
                tracing::error!(emm_id = r.id, "cannot re-seal: unreadable emm_data: {e}");
                skip.insert(r.id);
            }
        }
    }
    (jobs, kept)
}

/// Stores each re-sealed EMM (refused ones are logged and skipped).
/// Returns (old ids, new ids).
async fn store_resealed(
    tx: &mut Transaction<'_>,
    kept: Vec<Review>,
    sealed: SealResults,
    skip: &mut HashSet<u64>,
) -> Result<(Vec<u64>, Vec<u64>), JobError> {
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for (mut review, s) in kept.into_iter().zip(sealed) {
        let from = review.resealed_from.unwrap_or(0);
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(emm_id = from, "cannot re-seal: {e}");
                skip.insert(from);
                continue;
            }
        };
        review.key_version = s.key_version;
        emm_store::insert_resealed(tx, from, &review, &s.section).await?;
        old.push(from);
        new.push(review.emm_id);
    }
    Ok((old, new))
}

/// Marks retired the versions older than `current` that no live EMM uses.
async fn retire(
    ctx: &JobCtx,
    c: &mut mysql_async::Conn,
    kind: KeyKind,
    metas: &[KeyMeta],
    current: u32,
) -> Result<u64, JobError> {
    let Some(family) = family_address(kind) else {
        return Ok(0);
    };
    let enc = ctx.encryptor()?;
    let mut n = 0;
    for m in metas {
        if m.version >= current || m.state == "retired" {
            continue;
        }
        ctx.check()?;
        if emm_store::live_sealed_with(c, family, m.version).await? == 0 {
            enc.set_key_state(kind, m.version, KeyState::Retired)
                .await?;
            tracing::info!(%kind, version = m.version, "key version retired");
            n += 1;
        }
    }
    Ok(n)
}

/// A device id read from `devices` (valid there by construction).
pub(super) fn device(d: u64) -> Result<DeviceId, JobError> {
    DeviceId::new(d).map_err(|e| JobError::Other(format!("devices row: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(days: u32, lead_hours: u32) -> crate::config::SchedulerConfig {
        crate::config::SchedulerConfig {
            rotation_days: days,
            rotation_lead_hours: lead_hours,
            ..Default::default()
        }
    }

    fn glk(version: u32, activates_at: u32, state: &str) -> KeyMeta {
        KeyMeta {
            id: 0,
            kind: KeyKind::Global,
            version,
            state: state.into(),
            activates_at,
            retires_at: None,
        }
    }

    #[test]
    fn a_rotation_is_created_within_the_lead_time() {
        let day = 86_400;
        let keys = [glk(1, 0, "retired"), glk(2, 1000, "active")];
        // Next at 1000 + 30 days; lead 48 h.
        let next = 1000 + 30 * day;
        assert_eq!(
            creation(&keys, next - 49 * 3600, &sc(30, 48)),
            Creation::NotDue {
                scheduled_at: u64::from(next)
            }
        );
        assert_eq!(
            creation(&keys, next - 48 * 3600, &sc(30, 48)),
            Creation::Due {
                scheduled_at: u64::from(next)
            }
        );
        // A version activating later is this rotation's.
        let pending = [glk(2, 1000, "active"), glk(3, 5000, "pending")];
        assert_eq!(creation(&pending, 2000, &sc(30, 48)), Creation::Pending(3));
        // rotation_days = 0: never due by schedule.
        assert!(matches!(
            creation(&keys, u32::MAX, &sc(0, 48)),
            Creation::NotDue { .. }
        ));
    }

    #[test]
    fn a_reseal_keeps_what_was_sealed_and_names_its_origin() {
        let old = Review {
            address: Address::Global,
            commands: vec![CommandSpec::DeviceDisable {}],
            emm_id: 5,
            issued_at: 1,
            key_version: 1,
            not_after: 99,
            resealed_from: None,
        };
        let stale = [
            Stale {
                id: 5,
                emm_data: old.to_json(),
            },
            Stale {
                id: 6,
                emm_data: "[]".into(),
            },
        ];
        let mut skip = HashSet::new();
        let (jobs, kept) = reseal_jobs(&stale, &[10, 11], 50, 2, &mut skip);
        assert_eq!(skip, HashSet::from([6]));
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].emm_id, jobs[0].key_version), (10, Some(2)));
        assert_eq!(jobs[0].not_after, 99);
        assert_eq!(
            (kept[0].emm_id, kept[0].issued_at, kept[0].resealed_from),
            (10, 50, Some(5))
        );
        assert_eq!(kept[0].commands, old.commands);
    }
}
