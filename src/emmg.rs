//! The EMMG role: turns `work_items` into sealed EMMs in `emms`, with a
//! `carousel_events` row for every EMM that enters or leaves the carousel.
//!
//! One batch ([`process_once`]) is one READ COMMITTED transaction:
//! 1. take up to `emmg.batch` pending items, `FOR UPDATE SKIP LOCKED` (any
//!    number of workers and processes may run at once; an item is only ever
//!    held by one of them);
//! 2. keep per-device order: an item of a device is processed only when
//!    every pending item of that device with a lower id is in this batch too
//!    (otherwise it is left for later; its lock ends with the transaction);
//! 3. read the state the EMMs must carry *now* (the device's active
//!    entitlements, its PMK version, the group's members, the current key
//!    versions) and build the §3.4 command lists;
//! 4. take emm_ids from `emm_id_seq` and have the Encryptor seal the whole
//!    batch in one call (key deliveries name versions; the Encryptor fills
//!    in key bytes);
//! 5. withdraw the EMMs the new ones supersede, insert the new ones (state
//!    `live`, or `withdrawn` when a later item of the same batch already
//!    supersedes them), one `carousel_events` row per EMM added or removed,
//!    mark the items done and stamp `sms_requests.processed_at`;
//! 6. COMMIT, then ring `emms_ready`.
//!
//! A crash or error anywhere before the COMMIT rolls everything back: the
//! items are still pending and are redone; the only trace is a gap in the
//! emm_id sequence. Nothing is lost and nothing is doubled.
//!
//! What each command becomes (class 0 urgent, 1 change, 2 background):
//!
//! | work item | EMMs (unique unless said) | class | purpose | withdraws (same device) |
//! |---|---|---|---|---|
//! | adddevice | DEVICE_ENABLE + GROUP_KEY (current and pending GK of its group, its slot) + GLOBAL_KEY (current and pending GLK) | 1 | `device_enable` | `device_enable`, `device_disable`, `entitlement_set` |
//! |  | ENTITLEMENT_SET (its active entitlements) | 2 | `entitlement_set` | |
//! | removedevice | DEVICE_DISABLE | 0 | `device_disable` | every other live unique EMM of the device |
//! |  | revocation (it held a slot): a new GK of its group, active at once (made through the Encryptor while planning), to each remaining member: GROUP_KEY (current and pending GK, its slot) + GLOBAL_KEY (current and pending GLK); a `revocations` row | 1 | `keys` | `keys` (of each member) |
//! | addentitlement p | ENTITLEMENT_ADD | 1 | `entitlement_add:p` | `entitlement_add:p`, `entitlement_remove:p`, `entitlement_set` |
//! |  | ENTITLEMENT_SET | 2 | `entitlement_set` | |
//! | removeentitlement p | ENTITLEMENT_REMOVE | 1 | `entitlement_remove:p` | as addentitlement |
//! |  | ENTITLEMENT_SET | 2 | `entitlement_set` | |
//! | generateosm | OSM: unique / group (bitmap = the group's current members) / global | 0 if forced, else 1 | `osm` | nothing |
//! | deliverkeys (rotations before group-addressed delivery; still processed) | GROUP_KEY (current and pending GK of its group, its slot) + GLOBAL_KEY (current and pending GLK); nothing unless the device is enabled | 2 | `keys` | `keys` |
//! | delivergroupkeys (Scheduler, rotation and revocation) | **group** EMM (bitmap = the group's current members; none left: no EMM) under the group's GK in force: the named GROUP_KEY (slot 0) and/or GLOBAL_KEY versions; lives until the item's `not_after` | 2 | `keys` | nothing |
//! | refreshset (Scheduler, refresh) | ENTITLEMENT_SET + GROUP_KEY / GLOBAL_KEY as adddevice's (a device that was off catches up on keys); nothing unless the device is enabled | 2 | `entitlement_set` | `entitlement_set` |
//!
//! The Scheduler's kinds have no `work_items.device_id` (they are not
//! ordered with the device's SMS commands); they read the device's row
//! `LOCK IN SHARE MODE`, so an SMS command about the device (which takes
//! the row `FOR UPDATE`) commits either before (and is seen) or after (and
//! its own item supersedes or withdraws what they made).
//!
//! Unique EMMs are sealed with the device's own PMK version; group and
//! global EMMs with the version the Encryptor says is current. State EMMs
//! live `emmg.emm_lifetime_days`; an OSM until its `not_after`.
//!
//! Section size: commands are packed greedily into as few EMMs of at most
//! `cas.max_section_bytes` as they fit. An ENTITLEMENT_SET replaces the
//! receiver's whole set, so it is never split: a set too large for one
//! section is sent instead as ENTITLEMENT_ADD commands of every active
//! entitlement (same purpose and class), packed into as many EMMs as
//! needed. A group OSM whose group has no member left produces no EMM.
//!
//! Item failures: an item that cannot be built or sealed for a reason that
//! retrying will not fix is marked `failed` (with `last_error`) and does not
//! hold up its device's later items; a key not found is retried with
//! back-off up to [`MAX_ATTEMPTS`]. An unreachable database or Encryptor
//! fails the whole batch, which the worker retries with back-off (logged
//! once per outage).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carousel::Class;
use mysql_async::prelude::*;
use mysql_async::{Conn, IsolationLevel, Transaction, TxOpts, Value};
use time::OffsetDateTime;

use crate::app::Shared;
use crate::db::{classify, Db, DbError, DbErrorKind};
use crate::emm_store::{self, LiveEmm, NewEmm, Purpose, Review};
use crate::encryptor::{Encryptor, EncryptorError, SealJob, SealJobError, SealResults, Sealed};
use crate::keystore::{KeyKind, KeyMeta};
use crate::queue::{self, Item, KeyOffer, Work};
use crate::scheduler::revocation::{self, Revoked};
use crate::sms::types::{ProductId, Target};
use crate::sqltext::{col, marks, Script};
use casd_wire::emm::{self, Address, CommandSpec, DeviceId, Entitlement};

/// Name of the fail point (tests only, see [`crate::failpoint`]) where a
/// batch has done everything but COMMIT: armed, the batch drops its
/// transaction instead, as a crash right there would.
pub const FAIL_BEFORE_COMMIT: &str = "emmg::before_commit";

#[derive(Debug, thiserror::Error)]
pub enum EmmgError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Encryptor(#[from] EncryptorError),
    #[error("the emmg role needs an encryptor")]
    NoEncryptor,
    /// A statement's result was not what the code expects (a bug), or the
    /// batch was abandoned at a fail point (tests).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<crate::sqltext::Error> for EmmgError {
    fn from(e: crate::sqltext::Error) -> Self {
        match e {
            crate::sqltext::Error::Db(e) => e.into(),
            crate::sqltext::Error::Internal(m) => EmmgError::Internal(m),
        }
    }
}

impl From<mysql_async::Error> for EmmgError {
    fn from(e: mysql_async::Error) -> Self {
        EmmgError::Db(e.into())
    }
}

impl EmmgError {
    /// The database or the Encryptor is not there: retry later, quietly.
    pub fn is_unavailable(&self) -> bool {
        match self {
            EmmgError::Db(d) => d.is_unavailable(),
            EmmgError::Encryptor(EncryptorError::Unavailable(_)) => true,
            _ => false,
        }
    }
    fn is_retryable_now(&self) -> bool {
        matches!(self, EmmgError::Db(d) if d.kind().is_conflict())
    }
}

/// The EMMG role: `emmg.workers` workers until shutdown; each finishes the
/// batch it holds before stopping.
pub async fn run(shared: Shared) -> anyhow::Result<()> {
    let enc = shared.encryptor.clone().ok_or(EmmgError::NoEncryptor)?;
    let outage = Arc::new(AtomicBool::new(false));
    watch_backlog(&shared);
    let mut set = tokio::task::JoinSet::new();
    for n in 0..shared.cfg.emmg.workers.max(1) {
        set.spawn(worker(shared.clone(), enc.clone(), outage.clone(), n));
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            anyhow::bail!("an EMMG worker panicked: {e}");
        }
    }
    Ok(())
}

async fn worker(shared: Shared, enc: Arc<dyn Encryptor>, outage: Arc<AtomicBool>, n: usize) {
    let poll = Duration::from_millis(shared.cfg.emmg.poll_interval_ms.max(1));
    let batch = shared.cfg.emmg.batch.max(1);
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        match process_once(&shared, enc.as_ref()).await {
            Ok(done) => {
                if outage.swap(false, Ordering::Relaxed) {
                    tracing::info!("EMMG: database and encryptor reachable again");
                }
                backoff = Duration::from_millis(100);
                if done >= batch {
                    continue; // more is probably waiting
                }
                tokio::select! {
                    _ = shared.work_ready.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shared.shutdown.cancelled() => break,
                }
            }
            Err(e) => {
                if e.is_unavailable() {
                    if !outage.swap(true, Ordering::Relaxed) {
                        tracing::warn!("EMMG: {e}; retrying with back-off until it is back");
                    }
                } else {
                    tracing::error!(worker = n, "EMMG batch failed: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Processes one batch of `emmg.batch` items; returns how many items it
/// finished (done or failed).
pub async fn process_once(shared: &Shared, enc: &dyn Encryptor) -> Result<usize, EmmgError> {
    process_batch(shared, enc, 0).await
}

/// [`process_once`] with at most `batch` items (0 = `emmg.batch`).
pub async fn process_batch(
    shared: &Shared,
    enc: &dyn Encryptor,
    batch: usize,
) -> Result<usize, EmmgError> {
    let batch = if batch == 0 {
        shared.cfg.emmg.batch
    } else {
        batch
    }
    .max(1);
    let mut conn = shared.db.conn().await?;
    conn.reset_connection(false);
    let metrics = BatchMetrics::new(&shared.metrics);
    let started = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_batch(shared, enc, batch, &mut conn).await {
            Err(e) if attempt < 4 && e.is_retryable_now() => continue,
            Ok((counts, changed)) => {
                if changed {
                    shared.emms_ready.notify_one();
                }
                metrics.settled(counts, started.elapsed());
                return Ok(counts[0] + counts[1]);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Items of a committed batch: done, failed, retried.
type ItemCounts = [usize; 3];

/// `casd_emmg_items_total{outcome}` and `casd_emmg_batch_duration_seconds`.
struct BatchMetrics {
    items: [metrics::Counter; 3],
    duration: metrics::Histogram,
}

impl BatchMetrics {
    fn new(m: &crate::metrics::Metrics) -> BatchMetrics {
        BatchMetrics {
            items: ["done", "failed", "retried"].map(|o| {
                m.counter(
                    "casd_emmg_items_total",
                    "Work items settled by the EMMG, by outcome.",
                    &[("outcome", o.into())],
                )
            }),
            duration: m.histogram(
                "casd_emmg_batch_duration_seconds",
                "Time of one EMMG batch, take to commit (batches that took items).",
                &[],
            ),
        }
    }

    fn settled(&self, counts: ItemCounts, elapsed: Duration) {
        if counts.iter().sum::<usize>() == 0 {
            return;
        }
        for (c, n) in self.items.iter().zip(counts) {
            c.increment(n as u64);
        }
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// `casd_emmg_work_items_pending` and `casd_emmg_oldest_pending_age_seconds`
/// from one query per second by one task (not per item or per worker).
fn watch_backlog(shared: &Shared) {
    let m = &shared.metrics;
    if !m.is_on() {
        return;
    }
    let pending = m.gauge(
        "casd_emmg_work_items_pending",
        "Work items waiting for the EMMG.",
        &[],
    );
    let oldest = m.gauge(
        "casd_emmg_oldest_pending_age_seconds",
        "Age of the oldest pending work item (0 when none).",
        &[],
    );
    let db = shared.db.clone();
    let every = Duration::from_secs(1);
    crate::metrics::every(every, shared.shutdown.clone(), move || {
        let (db, pending, oldest) = (db.clone(), pending.clone(), oldest.clone());
        async move {
            let backlog =
                async { Ok::<_, EmmgError>(queue::backlog(&mut db.conn().await?).await?) };
            // Unknown while the database is away: keep the last values.
            if let Ok((n, age)) = backlog.await {
                pending.set(n as f64);
                oldest.set(age);
            }
        }
    });
}

/// One batch, one READ COMMITTED transaction (see the module doc): take
/// (1-2), plan (3), seal (4), settle and write (5), commit (6). Returns the
/// items finished and whether the carousel changed.
async fn try_batch(
    shared: &Shared,
    enc: &dyn Encryptor,
    batch: usize,
    conn: &mut Conn,
) -> Result<(ItemCounts, bool), EmmgError> {
    let now = OffsetDateTime::now_utc();
    let now_unix = unix(now);
    let mut txo = TxOpts::default();
    txo.with_isolation_level(IsolationLevel::ReadCommitted);
    let mut tx = conn.start_transaction(txo).await?;

    let taken = take(&mut tx, batch, now).await?;
    if taken.items.is_empty() {
        tx.rollback().await?;
        return Ok(([0; 3], false));
    }
    let outcomes = plan(shared, enc, &mut tx, &taken, now_unix).await?;
    let (ids, live) = ids_and_live(&mut tx, planned(&outcomes), &withdrawing(&outcomes)).await?;
    let sealed = seal(enc, seal_jobs(&outcomes, &ids, now_unix)).await?;
    let settled = settle(&taken.items, outcomes, ids, sealed, now_unix);
    let gone = superseded(live, &settled.withdraw);
    let (writes, changed) = writes(&settled, &gone, now)?;
    writes.run(&mut tx).await?;

    if crate::failpoint::armed(FAIL_BEFORE_COMMIT, shared.db.database_name()) {
        drop(tx);
        return Err(EmmgError::Internal(format!(
            "batch abandoned before commit (fail point {FAIL_BEFORE_COMMIT})"
        )));
    }
    tx.commit().await?;
    let counts = [
        settled.done.len(),
        settled.failed.len(),
        settled.retry.len(),
    ];
    Ok((counts, changed))
}

fn unix(t: OffsetDateTime) -> u32 {
    t.unix_timestamp().clamp(0, u32::MAX as i64) as u32
}

// ---------------------------------------------------------------------------
// 1-2. Take
// ---------------------------------------------------------------------------

/// The batch's items and what the EMMG reads of their devices.
#[derive(Default)]
struct Taken {
    items: Vec<Item>,
    /// `pmk_version` of each device of the items.
    pmk: HashMap<u64, u32>,
    /// The active entitlements of each device of the items.
    entitlements: HashMap<u64, Vec<Entitlement>>,
}

/// Takes up to `batch` items, keeps those whose device has no earlier
/// pending item left out, and reads their devices' rows and active
/// entitlements: one round trip of plain reads after the take.
async fn take(
    tx: &mut Transaction<'_>,
    batch: usize,
    now: OffsetDateTime,
) -> Result<Taken, EmmgError> {
    let items = queue::take(tx, batch, now).await?;
    let devices = queue::devices_of(&items);
    if devices.is_empty() {
        return Ok(Taken {
            items,
            ..Taken::default()
        });
    }
    let list = marks(devices.len(), "?");
    let params: Vec<Value> = devices.iter().map(|d| Value::from(*d)).collect();
    let mut reads = Script::default();
    let pending_at = queue::push_pending_of(&mut reads, &devices, &items)?;
    let rows_at = reads.push(
        &format!("SELECT device_id, pmk_version FROM devices WHERE device_id IN ({list})"),
        &params,
    )?;
    let ents_at = reads.push(
        &format!(
            "SELECT device_id, product_id, start_at, end_at FROM entitlements \
             WHERE state = 'active' AND device_id IN ({list}) ORDER BY device_id, product_id"
        ),
        &params,
    )?;
    let sets = reads.run(tx).await?;
    let mut taken = Taken {
        items: queue::in_device_order(items, &queue::pending_rows(&sets[pending_at])?),
        ..Taken::default()
    };
    for r in &sets[rows_at] {
        taken.pmk.insert(col(r, 0)?, col(r, 1)?);
    }
    for r in &sets[ents_at] {
        taken
            .entitlements
            .entry(col(r, 0)?)
            .or_default()
            .push(Entitlement {
                product_id: col(r, 1)?,
                start: col(r, 2)?,
                end: col(r, 3)?,
            });
    }
    Ok(taken)
}

// ---------------------------------------------------------------------------
// 3. Plan: read what an item's EMMs depend on, then decide (pure)
// ---------------------------------------------------------------------------

/// Everything an EMM carries but its commands.
#[derive(Clone, Debug, PartialEq)]
struct Head {
    address: Address,
    /// The device's PMK version (unique EMMs); `None`: the Encryptor's
    /// current version.
    key_version: Option<u32>,
    class: Class,
    purpose: Purpose,
    not_after: u32,
}

/// One EMM to make.
#[derive(Clone, Debug, PartialEq)]
struct Planned {
    head: Head,
    commands: Vec<CommandSpec>,
}

/// Which of the device's live unique EMMs an item supersedes.
#[derive(Clone, Debug, PartialEq)]
enum Withdraw {
    Nothing,
    Purposes(Vec<Purpose>),
    /// Every live unique EMM of the device but the item's own.
    All,
}

impl Withdraw {
    /// Whether it supersedes an EMM of purpose `p` (`None`: a purpose this
    /// version does not know).
    fn matches(&self, p: Option<Purpose>) -> bool {
        match self {
            Withdraw::Nothing => false,
            Withdraw::Purposes(list) => p.is_some_and(|p| list.contains(&p)),
            Withdraw::All => true,
        }
    }
}

/// The EMMs an item becomes.
#[derive(Debug, PartialEq)]
struct Plan {
    emms: Vec<Planned>,
    /// The devices whose live unique EMMs the plan supersedes, and which.
    withdraw: Vec<(u64, Withdraw)>,
    /// A removal's revocation: (device, group, the group's new GK version).
    revoked: Option<Revoked>,
}

impl Plan {
    fn nothing() -> Plan {
        Plan::to_all(Vec::new())
    }
    fn of(device: DeviceId, emms: Vec<Planned>, withdraw: Withdraw) -> Plan {
        Plan {
            emms,
            withdraw: vec![(device.get(), withdraw)],
            revoked: None,
        }
    }
    /// EMMs that supersede nothing (group and global ones).
    fn to_all(emms: Vec<Planned>) -> Plan {
        Plan {
            emms,
            withdraw: Vec::new(),
            revoked: None,
        }
    }
}

/// Why an item makes no EMM this time.
#[derive(Debug, PartialEq)]
enum Skip {
    /// A key was not found: retried with back-off.
    Retry(String),
    /// Retrying will not help.
    Failed(String),
}

type Outcome = Result<Plan, Skip>;

/// What the EMMs of every item depend on but the item itself.
struct Limits {
    max_section: usize,
    /// `not_after` of state EMMs (all but OSMs).
    state_not_after: u32,
}

/// Key versions to deliver: the one in use now, then those created ahead
/// of time for a coming rotation (a device added now must get them too).
#[derive(Clone, Debug, Default)]
struct Keys {
    group: Vec<KeyMeta>,
    global: Vec<KeyMeta>,
}

/// A group member: (device, slot, pmk_version).
type Member = (DeviceId, u8, u32);

/// What an item's EMMs depend on besides the item, read before deciding.
#[derive(Debug, Default)]
struct Facts {
    /// The device's PMK version; `None`: no such device.
    pmk: Option<u32>,
    /// The device's active entitlements.
    entitlements: Vec<Entitlement>,
    /// A Scheduler item's device if enabled: (group_id, slot, pmk_version).
    enabled: Option<(u32, u8, u32)>,
    /// The keys to deliver, or why they cannot be had now.
    keys: Option<Result<Keys, String>>,
    /// The slots of a group OSM's members.
    slots: Vec<u8>,
    /// A removal's revocation: the group's new GK version and its
    /// remaining members (device, slot, pmk_version).
    rekeyed: Option<(u32, Vec<Member>)>,
}

impl Facts {
    fn keys(&mut self) -> Result<Keys, Skip> {
        self.keys
            .take()
            .unwrap_or_else(|| Err("key versions not read".into()))
            .map_err(Skip::Retry)
    }
    fn pmk(&self, device: DeviceId) -> Result<u32, Skip> {
        self.pmk
            .ok_or_else(|| Skip::Failed(format!("device {device} not found")))
    }
}

/// The outcome of every item, in order.
async fn plan(
    shared: &Shared,
    enc: &dyn Encryptor,
    tx: &mut Transaction<'_>,
    taken: &Taken,
    now: u32,
) -> Result<Vec<Outcome>, EmmgError> {
    let cfg = &shared.cfg;
    let limits = Limits {
        max_section: cfg.cas.max_section_bytes,
        state_not_after: now.saturating_add(cfg.emmg.emm_lifetime_days.saturating_mul(86_400)),
    };
    let mut keys = KeyVersions {
        enc,
        db: &shared.db,
        cache: HashMap::new(),
    };
    let mut out = Vec::with_capacity(taken.items.len());
    for item in &taken.items {
        let work = match item.work() {
            Ok(w) => w,
            Err(m) => {
                out.push(Err(Skip::Failed(m)));
                continue;
            }
        };
        let facts = read_facts(&work, tx, taken, &mut keys).await?;
        out.push(decide(work, facts, &limits));
    }
    Ok(out)
}

/// Reads what `work`'s EMMs depend on. The Scheduler's kinds read their
/// device's row under a shared lock (see the module doc) and nothing more
/// when it is not enabled.
async fn read_facts(
    work: &Work,
    tx: &mut Transaction<'_>,
    taken: &Taken,
    keys: &mut KeyVersions<'_>,
) -> Result<Facts, EmmgError> {
    let mut f = Facts::default();
    if let Some(d) = work.device_id() {
        f.pmk = taken.pmk.get(&d.get()).copied();
        f.entitlements = taken
            .entitlements
            .get(&d.get())
            .cloned()
            .unwrap_or_default();
    }
    match work {
        Work::AddDevice { group_id, .. } => f.keys = Some(keys.deliverable(*group_id).await?),
        Work::RemoveDevice {
            group_id: Some(g), ..
        } => match keys.rekey(*g).await? {
            Ok(version) => {
                f.rekeyed = Some((version, group_members(tx, *g).await?));
                f.keys = Some(keys.deliverable(*g).await?);
            }
            Err(m) => f.keys = Some(Err(m)),
        },
        Work::DeliverKeys { device_id } => {
            f.enabled = enabled_device(tx, *device_id).await?;
            if let Some((group_id, _, _)) = f.enabled {
                f.keys = Some(keys.deliverable(group_id).await?);
            }
        }
        Work::RefreshSet { device_id } => {
            f.enabled = enabled_device(tx, *device_id).await?;
            if let Some((group_id, _, _)) = f.enabled {
                f.entitlements = active_entitlements(tx, *device_id).await?;
                f.keys = Some(keys.deliverable(group_id).await?);
            }
        }
        Work::GenerateOsm {
            target: Target::Group(g),
            ..
        } => f.slots = group_slots(tx, g.get()).await?,
        Work::DeliverGroupKeys { group_id, .. } => f.slots = group_slots(tx, *group_id).await?,
        _ => {}
    }
    Ok(f)
}

/// The EMMs `work` becomes given `f` (see the table in the module doc).
fn decide(work: Work, f: Facts, lim: &Limits) -> Outcome {
    let change = change_class(&work);
    match work {
        Work::AddDevice {
            device_id,
            group_id,
            slot,
            pmk_version,
            ..
        } => add_device(device_id, (group_id, slot, pmk_version, change), f, lim),
        Work::RemoveDevice {
            device_id,
            group_id,
            ..
        } => remove_device(device_id, group_id, f, lim),
        Work::AddEntitlement {
            device_id,
            product_id,
            start,
            end,
            ..
        } => {
            let p = product_id.get();
            let e = Entitlement {
                product_id: p,
                start,
                end,
            };
            let add = (CommandSpec::EntitlementAdd(e), Purpose::EntitlementAdd(p));
            entitlement_change(device_id, (product_id, change), add, f, lim)
        }
        Work::RemoveEntitlement {
            device_id,
            product_id,
            ..
        } => {
            let p = product_id.get();
            let remove = (
                CommandSpec::EntitlementRemove { product_id: p },
                Purpose::EntitlementRemove(p),
            );
            entitlement_change(device_id, (product_id, Class::Change), remove, f, lim)
        }
        Work::DeliverKeys { device_id } => match f.enabled {
            Some(place) => deliver_keys(device_id, place, f, lim),
            None => Ok(Plan::nothing()),
        },
        Work::DeliverGroupKeys {
            group_id,
            gk,
            glk,
            not_after,
        } => Ok(group_keys(group_id, (gk, glk), not_after, f, lim)?),
        Work::RefreshSet { device_id } => match f.enabled {
            Some(place) => refresh(device_id, place, f, lim),
            None => Ok(Plan::nothing()),
        },
        Work::GenerateOsm {
            target,
            text,
            duration_s,
            forced,
            not_after,
        } => {
            let osm = CommandSpec::Osm {
                duration_s,
                flags: emm::osm_flags(forced),
                text,
            };
            let class = if forced { Class::Urgent } else { Class::Change };
            osm_plan((osm, class), target, not_after, f, lim)
        }
    }
}

/// The class of a change's EMMs: bulk adds (import, POST /bulk) are paced
/// by their not_before and go in the background class, so that a million
/// of them do not fill the front of every cycle.
fn change_class(work: &Work) -> Class {
    match work.is_bulk() {
        true => Class::Background,
        false => Class::Change,
    }
}

impl Limits {
    /// The head of a state EMM to the device.
    fn state(&self, device_id: DeviceId, pmk: u32, class: Class, purpose: Purpose) -> Head {
        Head {
            address: Address::Unique { device_id },
            key_version: Some(pmk),
            class,
            purpose,
            not_after: self.state_not_after,
        }
    }
}

/// DEVICE_DISABLE to the device; when it held a slot, its group's new GK
/// (and the global keys) to each remaining member in unique EMMs, so the
/// removed device never learns it (docs/format.md §2, "Revocation").
fn remove_device(device_id: DeviceId, group: Option<u32>, mut f: Facts, lim: &Limits) -> Outcome {
    let head = lim.state(
        device_id,
        f.pmk(device_id)?,
        Class::Urgent,
        Purpose::DeviceDisable,
    );
    let mut plan = Plan::of(
        device_id,
        packed(vec![CommandSpec::DeviceDisable {}], head, lim.max_section)?,
        Withdraw::All,
    );
    let (Some(group_id), Some((gk_version, members))) = (group, f.rekeyed.take()) else {
        return Ok(plan);
    };
    let keys = f.keys()?;
    for (member, slot, pmk) in members {
        let head = lim.state(member, pmk, Class::Change, Purpose::Keys);
        let cmds = key_commands(group_id, slot, &keys);
        plan.emms.extend(packed(cmds, head, lim.max_section)?);
        let keys_only = Withdraw::Purposes(vec![Purpose::Keys]);
        plan.withdraw.push((member.get(), keys_only));
    }
    plan.revoked = Some(Revoked {
        device_id: device_id.get(),
        group_id,
        gk_version,
    });
    Ok(plan)
}

/// DEVICE_ENABLE with the keys of the device's group and the global keys
/// (group, slot, pmk_version, class), then the device's entitlement set.
fn add_device(
    device_id: DeviceId,
    (group_id, slot, pmk, class): (u32, u8, u32, Class),
    mut f: Facts,
    lim: &Limits,
) -> Outcome {
    let keys = f.keys()?;
    let mut cmds = vec![CommandSpec::DeviceEnable {}];
    cmds.extend(key_commands(group_id, slot, &keys));
    let head = lim.state(device_id, pmk, class, Purpose::DeviceEnable);
    let mut emms = packed(cmds, head, lim.max_section)?;
    emms.extend(set_emms(device_id, pmk, f.entitlements, lim)?);
    let withdraw = [
        Purpose::DeviceEnable,
        Purpose::DeviceDisable,
        Purpose::EntitlementSet,
    ];
    Ok(Plan::of(
        device_id,
        emms,
        Withdraw::Purposes(withdraw.into()),
    ))
}

/// The keys of an enabled device's group (group, slot, pmk_version) and
/// the global keys, replacing the device's previous `keys` EMM.
fn deliver_keys(
    device_id: DeviceId,
    (group_id, slot, pmk): (u32, u8, u32),
    mut f: Facts,
    lim: &Limits,
) -> Outcome {
    let keys = f.keys()?;
    let head = lim.state(device_id, pmk, Class::Background, Purpose::Keys);
    let emms = packed(key_commands(group_id, slot, &keys), head, lim.max_section)?;
    Ok(Plan::of(
        device_id,
        emms,
        Withdraw::Purposes(vec![Purpose::Keys]),
    ))
}

/// The named key versions in one group EMM to the group's current members
/// (none: no EMM), sealed under the group's GK in force when it is made
/// (docs/format.md §2, "Group-addressed delivery").
fn group_keys(
    group_id: u32,
    (gk, glk): (Option<KeyOffer>, Option<KeyOffer>),
    not_after: u32,
    f: Facts,
    lim: &Limits,
) -> Result<Plan, Skip> {
    let gk = gk.map(|k| CommandSpec::GroupKey {
        group_id,
        // A group EMM never says a device's slot (receivers ignore it).
        slot: 0,
        key_version: k.version,
        activates_at: k.activates_at,
        key: (),
    });
    let glk = glk.map(|k| CommandSpec::GlobalKey {
        key_version: k.version,
        activates_at: k.activates_at,
        key: (),
    });
    let commands: Vec<CommandSpec> = gk.into_iter().chain(glk).collect();
    if f.slots.is_empty() || commands.is_empty() {
        return Ok(Plan::nothing());
    }
    let head = Head {
        address: Address::group_with_slots(group_id, f.slots),
        key_version: None,
        class: Class::Background,
        purpose: Purpose::Keys,
        not_after,
    };
    Ok(Plan::to_all(packed(commands, head, lim.max_section)?))
}

/// The device's entitlement set again, with its group's and the global
/// keys after it (current and pending: a device that was off during a
/// rotation catches up here), replacing its previous set.
fn refresh(
    device_id: DeviceId,
    (group_id, slot, pmk): (u32, u8, u32),
    mut f: Facts,
    lim: &Limits,
) -> Outcome {
    let keys = f.keys()?;
    let address = Address::Unique { device_id };
    let mut cmds = set_commands(f.entitlements, &address, lim.max_section);
    cmds.extend(key_commands(group_id, slot, &keys));
    let head = lim.state(device_id, pmk, Class::Background, Purpose::EntitlementSet);
    let emms = packed(cmds, head, lim.max_section)?;
    let withdraw = Withdraw::Purposes(vec![Purpose::EntitlementSet]);
    Ok(Plan::of(device_id, emms, withdraw))
}

/// ENTITLEMENT_ADD / ENTITLEMENT_REMOVE of `product` (in `class`), then
/// the device's whole set.
fn entitlement_change(
    device_id: DeviceId,
    (product, class): (ProductId, Class),
    (command, purpose): (CommandSpec, Purpose),
    f: Facts,
    lim: &Limits,
) -> Outcome {
    let pmk = f.pmk(device_id)?;
    let head = lim.state(device_id, pmk, class, purpose);
    let mut emms = packed(vec![command], head, lim.max_section)?;
    emms.extend(set_emms(device_id, pmk, f.entitlements, lim)?);
    let p = product.get();
    let withdraw = [
        Purpose::EntitlementAdd(p),
        Purpose::EntitlementRemove(p),
        Purpose::EntitlementSet,
    ];
    Ok(Plan::of(
        device_id,
        emms,
        Withdraw::Purposes(withdraw.into()),
    ))
}

/// An OSM to a device, a group's current members (none: no EMM) or all.
fn osm_plan(
    (osm, class): (CommandSpec, Class),
    target: Target,
    not_after: u32,
    f: Facts,
    lim: &Limits,
) -> Outcome {
    let (address, key_version) = match target {
        Target::Device(d) => (Address::Unique { device_id: d }, Some(f.pmk(d)?)),
        Target::Group(_) if f.slots.is_empty() => return Ok(Plan::nothing()),
        Target::Group(g) => (Address::group_with_slots(g.get(), f.slots), None),
        Target::All => (Address::Global, None),
    };
    let head = Head {
        address,
        key_version,
        class,
        purpose: Purpose::Osm,
        not_after,
    };
    Ok(Plan::to_all(packed(vec![osm], head, lim.max_section)?))
}

/// GROUP_KEY of each group key version, then GLOBAL_KEY of each global one.
fn key_commands(group_id: u32, slot: u8, keys: &Keys) -> Vec<CommandSpec> {
    let gks = keys.group.iter().map(|k| CommandSpec::GroupKey {
        group_id,
        slot,
        key_version: k.version,
        activates_at: k.activates_at,
        key: (),
    });
    let glks = keys.global.iter().map(|k| CommandSpec::GlobalKey {
        key_version: k.version,
        activates_at: k.activates_at,
        key: (),
    });
    gks.chain(glks).collect()
}

/// `commands` packed into as few EMMs with `head` as fit.
fn packed(commands: Vec<CommandSpec>, head: Head, max: usize) -> Result<Vec<Planned>, Skip> {
    Ok(pack(commands, &head.address, max)
        .map_err(Skip::Failed)?
        .into_iter()
        .map(|commands| Planned {
            head: head.clone(),
            commands,
        })
        .collect())
}

fn set_emms(
    device: DeviceId,
    pmk_version: u32,
    entries: Vec<Entitlement>,
    lim: &Limits,
) -> Result<Vec<Planned>, Skip> {
    entitlement_set_emms(
        device,
        pmk_version,
        entries,
        lim.max_section,
        lim.state_not_after,
    )
    .map_err(Skip::Failed)
}

/// Packs commands, in order, into as few EMMs as fit `max_section_bytes`.
pub fn pack(
    commands: Vec<CommandSpec>,
    address: &Address,
    max_section_bytes: usize,
) -> Result<Vec<Vec<CommandSpec>>, String> {
    let room = max_section_bytes.saturating_sub(address.emm_overhead());
    let mut out: Vec<Vec<CommandSpec>> = Vec::new();
    let mut used = 0;
    for c in commands {
        let l = c.encoded_len();
        if l > room {
            return Err(format!(
                "a {} command of {l} bytes cannot fit a {max_section_bytes}-byte section",
                c.tag()
            ));
        }
        match out.last_mut() {
            Some(cur) if used + l <= room => {
                cur.push(c);
                used += l;
            }
            _ => {
                out.push(vec![c]);
                used = l;
            }
        }
    }
    Ok(out)
}

/// The device's entitlement set as commands: one ENTITLEMENT_SET when it
/// fits a section, else ENTITLEMENT_ADD of each (see the module doc).
fn entitlement_set_emms(
    device: DeviceId,
    pmk_version: u32,
    entries: Vec<Entitlement>,
    max: usize,
    not_after: u32,
) -> Result<Vec<Planned>, String> {
    let address = Address::Unique { device_id: device };
    let groups = pack(set_commands(entries, &address, max), &address, max)?;
    let head = Head {
        address,
        key_version: Some(pmk_version),
        class: Class::Background,
        purpose: Purpose::EntitlementSet,
        not_after,
    };
    Ok(groups
        .into_iter()
        .map(|commands| Planned {
            head: head.clone(),
            commands,
        })
        .collect())
}

/// The set as commands: one ENTITLEMENT_SET when it fits a section, else
/// ENTITLEMENT_ADD of each (see the module doc).
fn set_commands(entries: Vec<Entitlement>, address: &Address, max: usize) -> Vec<CommandSpec> {
    let set = CommandSpec::EntitlementSet {
        entries: entries.clone(),
    };
    if address.emm_overhead() + set.encoded_len() <= max {
        vec![set]
    } else {
        entries
            .into_iter()
            .map(CommandSpec::EntitlementAdd)
            .collect()
    }
}

/// Current (and pending) key versions, asked once per batch.
struct KeyVersions<'a> {
    enc: &'a dyn Encryptor,
    db: &'a Db,
    cache: HashMap<KeyKind, Vec<KeyMeta>>,
}

impl KeyVersions<'_> {
    /// The group's key versions to deliver, then the global ones; `Ok(Err)`
    /// when one is not to be had now (the item is retried).
    async fn deliverable(&mut self, group_id: u32) -> Result<Result<Keys, String>, EmmgError> {
        let group = match self.versions(KeyKind::Group(group_id)).await? {
            Ok(v) => v,
            Err(m) => return Ok(Err(m)),
        };
        Ok(self
            .versions(KeyKind::Global)
            .await?
            .map(|global| Keys { group, global }))
    }

    /// A new version of the group's GK, active at once (a revocation);
    /// `Ok(Err)` when the Encryptor refuses (the item is retried). The
    /// batch's cached versions of the group are dropped. A batch rolled
    /// back after this leaves an unused version, never a missing one.
    async fn rekey(&mut self, group_id: u32) -> Result<Result<u32, String>, EmmgError> {
        let kind = KeyKind::Group(group_id);
        self.cache.remove(&kind);
        match self.enc.create_key_version(kind, 0).await {
            Ok(m) => {
                tracing::info!(
                    group_id,
                    version = m.version,
                    "group key rotated: a device left"
                );
                Ok(Ok(m.version))
            }
            Err(EncryptorError::Unavailable(e)) => Err(EncryptorError::Unavailable(e).into()),
            Err(e) => Ok(Err(format!("cannot rekey {kind}: {e}"))),
        }
    }

    /// The version in use now, then versions created ahead of time for a
    /// coming rotation (a device added now must get them too).
    async fn versions(&mut self, kind: KeyKind) -> Result<Result<Vec<KeyMeta>, String>, EmmgError> {
        if let Some(v) = self.cache.get(&kind) {
            return Ok(Ok(v.clone()));
        }
        let current = match self.enc.current_key(kind).await {
            Ok(m) => m,
            Err(EncryptorError::Unavailable(e)) => {
                return Err(EncryptorError::Unavailable(e).into())
            }
            Err(e) => return Ok(Err(format!("no current {kind}: {e}"))),
        };
        let mut conn = self.db.conn().await?;
        conn.reset_connection(false);
        let all = crate::keystore::list_meta(&mut conn, kind).await?;
        let mut out = vec![current.clone()];
        out.extend(
            all.into_iter()
                .filter(|m| m.state == "pending" && m.version > current.version),
        );
        self.cache.insert(kind, out.clone());
        Ok(Ok(out))
    }
}

/// (group_id, slot, pmk_version) of an enabled device, its row locked in
/// share mode until the batch commits (see the module doc); `None` when the
/// device is unknown or disabled.
async fn enabled_device(
    tx: &mut Transaction<'_>,
    device: DeviceId,
) -> Result<Option<(u32, u8, u32)>, EmmgError> {
    let row: Option<(String, Option<u32>, Option<u8>, u32)> = tx
        .exec_first(
            "SELECT state, group_id, slot, pmk_version FROM devices WHERE device_id = ? \
             LOCK IN SHARE MODE",
            (device.get(),),
        )
        .await?;
    Ok(match row {
        Some((state, Some(g), Some(s), pmk)) if state == "enabled" => Some((g, s, pmk)),
        _ => None,
    })
}

/// The device's active entitlements, by product.
async fn active_entitlements(
    tx: &mut Transaction<'_>,
    device: DeviceId,
) -> Result<Vec<Entitlement>, EmmgError> {
    let rows: Vec<(u32, u32, u32)> = tx
        .exec(
            "SELECT product_id, start_at, end_at FROM entitlements \
             WHERE state = 'active' AND device_id = ? ORDER BY product_id",
            (device.get(),),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|(product_id, start, end)| Entitlement {
            product_id,
            start,
            end,
        })
        .collect())
}

/// The group's enabled members: (device, slot, pmk_version).
async fn group_members(tx: &mut Transaction<'_>, group_id: u32) -> Result<Vec<Member>, EmmgError> {
    let rows: Vec<(u64, u8, u32)> = tx
        .exec(
            "SELECT device_id, slot, pmk_version FROM devices \
             WHERE group_id = ? AND state = 'enabled' ORDER BY slot",
            (group_id,),
        )
        .await?;
    rows.into_iter()
        .map(|(d, slot, pmk)| {
            DeviceId::new(d)
                .map(|d| (d, slot, pmk))
                .map_err(|e| EmmgError::Internal(format!("devices row: {e}")))
        })
        .collect()
}

/// The slots of the group's current members.
async fn group_slots(tx: &mut Transaction<'_>, group_id: u32) -> Result<Vec<u8>, EmmgError> {
    Ok(tx
        .exec(
            "SELECT slot FROM group_slots WHERE group_id = ? AND device_id IS NOT NULL",
            (group_id,),
        )
        .await?)
}

// ---------------------------------------------------------------------------
// 4. emm_ids and sealing
// ---------------------------------------------------------------------------

/// EMMs planned in all.
fn planned(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .map(|o| o.as_ref().map_or(0, |p| p.emms.len()))
        .sum()
}

/// The devices whose items withdraw something, once each.
fn withdrawing(outcomes: &[Outcome]) -> Vec<u64> {
    let mut d: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .flat_map(|p| &p.withdraw)
        .filter(|(_, w)| *w != Withdraw::Nothing)
        .map(|(d, _)| *d)
        .collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// `total` new emm_ids and, in the same round trip, the live unique EMMs
/// of the `withdrawing` devices, locked until the commit (read before the
/// new ones exist, so the same rows as after sealing).
async fn ids_and_live(
    tx: &mut Transaction<'_>,
    total: usize,
    withdrawing: &[u64],
) -> Result<(Vec<u64>, Vec<LiveEmm>), EmmgError> {
    let mut script = Script::default();
    let ids_at = (total > 0)
        .then(|| emm_store::push_next_ids(&mut script, total))
        .transpose()?;
    let live_at = (!withdrawing.is_empty())
        .then(|| emm_store::push_live_unique(&mut script, withdrawing))
        .transpose()?;
    let (ids, live) = match script.run(tx).await {
        Ok(sets) => (
            ids_at.map_or(Ok(Vec::new()), |k| emm_store::id_rows(&sets[k]))?,
            live_at.map_or(Ok(Vec::new()), |k| emm_store::live_rows(&sets[k]))?,
        ),
        // No sequence engine (seq_1_to_N): one NEXTVAL at a time, then the
        // lookup on its own.
        Err(crate::sqltext::Error::Db(e))
            if ids_at.is_some() && classify(&e) == DbErrorKind::NoSuchTable =>
        {
            let ids = emm_store::next_ids(tx, total).await?;
            let live = match withdrawing.is_empty() {
                true => Vec::new(),
                false => emm_store::live_unique(tx, withdrawing).await?,
            };
            (ids, live)
        }
        Err(e) => return Err(e.into()),
    };
    if ids.len() != total {
        return Err(EmmgError::Internal(format!(
            "{} emm_ids for {total} EMMs",
            ids.len()
        )));
    }
    Ok((ids, live))
}

/// One sealing job per planned EMM, in order, with `ids` in order.
fn seal_jobs(outcomes: &[Outcome], ids: &[u64], now: u32) -> Vec<SealJob> {
    outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .flat_map(|p| &p.emms)
        .zip(ids)
        .map(|(p, id)| SealJob {
            emm_id: *id,
            issued_at: now,
            not_after: p.head.not_after,
            address: p.head.address.clone(),
            key_version: p.head.key_version,
            commands: p.commands.clone(),
        })
        .collect()
}

/// The whole batch in one Encryptor call.
async fn seal(enc: &dyn Encryptor, jobs: Vec<SealJob>) -> Result<SealResults, EmmgError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let total = jobs.len();
    // A removal's revocation makes an EMM per group-mate: more than one
    // call may be needed.
    let mut sealed = Vec::with_capacity(total);
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let chunk: Vec<SealJob> = jobs.by_ref().take(crate::encryptor::MAX_BATCH).collect();
        sealed.extend(enc.seal_batch(chunk).await?);
    }
    if sealed.len() != total {
        return Err(
            EncryptorError::Internal(format!("{} results for {total} jobs", sealed.len())).into(),
        );
    }
    Ok(sealed)
}

// ---------------------------------------------------------------------------
// 5. Settle (pure) and write
// ---------------------------------------------------------------------------

/// What becomes of each item, and the EMMs to store.
#[derive(Default)]
struct Settled<'a> {
    made: Vec<NewEmm>,
    done: Vec<&'a Item>,
    retry: Vec<(&'a Item, String)>,
    failed: Vec<(&'a Item, String)>,
    /// Withdrawals of EMMs already in the table, per device.
    withdraw: BTreeMap<u64, Vec<Withdraw>>,
    /// Revocations to record.
    revoked: Vec<Revoked>,
}

impl<'a> Settled<'a> {
    /// `item` is done with `emms`; the EMMs of this batch its plan
    /// supersedes never go live.
    fn done(&mut self, item: &'a Item, withdraw: Vec<(u64, Withdraw)>, emms: Vec<NewEmm>) {
        for (d, withdraw) in withdraw {
            if withdraw == Withdraw::Nothing {
                continue;
            }
            for m in &mut self.made {
                if device_of(&m.review.address) == Some(d) && withdraw.matches(Some(m.purpose)) {
                    m.live = false;
                }
            }
            self.withdraw.entry(d).or_default().push(withdraw);
        }
        self.made.extend(emms);
        self.done.push(item);
    }
}

fn device_of(a: &Address) -> Option<u64> {
    match a {
        Address::Unique { device_id } => Some(device_id.get()),
        _ => None,
    }
}

/// Per item, its EMMs with their ids and sections, or why it is retried
/// or failed (a key not found: retried; any other refusal: failed).
fn settle(
    items: &[Item],
    outcomes: Vec<Outcome>,
    ids: Vec<u64>,
    sealed: SealResults,
    now: u32,
) -> Settled<'_> {
    let mut s = Settled::default();
    let mut results = ids.into_iter().zip(sealed);
    for (item, o) in items.iter().zip(outcomes) {
        let plan = match o {
            Ok(plan) => plan,
            Err(Skip::Retry(m)) => {
                s.retry.push((item, m));
                continue;
            }
            Err(Skip::Failed(m)) => {
                s.failed.push((item, m));
                continue;
            }
        };
        let results: Vec<_> = results.by_ref().take(plan.emms.len()).collect();
        match stored(item, plan.emms, results, now) {
            Ok(emms) => {
                s.revoked.extend(plan.revoked);
                s.done(item, plan.withdraw, emms)
            }
            Err(SealJobError::UnknownKey(m)) => s.retry.push((item, m)),
            Err(e) => s.failed.push((item, e.to_string())),
        }
    }
    s
}

/// The EMMs of one item as stored, or its first sealing error.
fn stored(
    item: &Item,
    planned: Vec<Planned>,
    results: Vec<(u64, Result<Sealed, SealJobError>)>,
    now: u32,
) -> Result<Vec<NewEmm>, SealJobError> {
    if results.len() < planned.len() {
        return Err(SealJobError::Invalid("no result".into()));
    }
    let mut out = Vec::with_capacity(planned.len());
    for (p, (id, r)) in planned.into_iter().zip(results) {
        let s = r?;
        out.push(NewEmm {
            request_id: item.request_id,
            class: p.head.class,
            purpose: p.head.purpose,
            review: Review {
                address: p.head.address,
                commands: p.commands,
                emm_id: id,
                issued_at: now,
                key_version: s.key_version,
                not_after: p.head.not_after,
                resealed_from: None,
            },
            section: s.section,
            live: true,
        });
    }
    Ok(out)
}

/// The ids of the `live` EMMs the batch's items supersede.
fn superseded(live: Vec<LiveEmm>, withdraw: &BTreeMap<u64, Vec<Withdraw>>) -> Vec<u64> {
    live.into_iter()
        .filter(|l| {
            withdraw
                .get(&l.device)
                .is_some_and(|ws| ws.iter().any(|w| w.matches(l.purpose)))
        })
        .map(|l| l.id)
        .collect()
}

/// Every write of the batch in one script (one round trip): withdrawals,
/// the new EMMs, then the items' marks. Also whether the carousel changes.
fn writes(s: &Settled<'_>, gone: &[u64], now: OffsetDateTime) -> Result<(Script, bool), EmmgError> {
    let mut w = Script::default();
    emm_store::push_withdraw(&mut w, gone, now)?;
    let added = emm_store::push_insert(&mut w, &s.made, now)?;
    queue::push_done(&mut w, &s.done)?;
    revocation::push_revoked(&mut w, &s.revoked)?;
    for (item, msg) in &s.retry {
        queue::push_retry(&mut w, item, msg, now)?;
    }
    for (item, msg) in &s.failed {
        queue::push_failed(&mut w, item, msg)?;
    }
    Ok((w, added || !gone.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u64) -> Address {
        Address::Unique {
            device_id: DeviceId::new(n).unwrap(),
        }
    }

    #[test]
    fn packing_respects_the_section_size() {
        // Unique EMM: 65 + 8 + 16 = 89 bytes before the commands.
        assert_eq!(dev(1).emm_overhead(), 89);
        let adds: Vec<CommandSpec> = (1..=30)
            .map(|p| {
                CommandSpec::EntitlementAdd(Entitlement {
                    product_id: p,
                    start: 0,
                    end: 1,
                })
            })
            .collect();
        let packs = pack(adds, &dev(1), 256).unwrap();
        // (256 - 89) / 15 = 11 per EMM.
        assert_eq!(
            packs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![11, 11, 8]
        );
        for p in &packs {
            let len: usize =
                dev(1).emm_overhead() + p.iter().map(CommandSpec::encoded_len).sum::<usize>();
            assert!(len <= 256);
        }
        let too_big = CommandSpec::Osm {
            duration_s: 0,
            flags: 0,
            text: "x".repeat(200),
        };
        assert!(pack(vec![too_big], &dev(1), 256).is_err());
    }

    #[test]
    fn a_large_entitlement_set_becomes_adds() {
        let d = DeviceId::new(5).unwrap();
        let few: Vec<Entitlement> = (1..=13)
            .map(|p| Entitlement {
                product_id: p,
                start: 0,
                end: 9,
            })
            .collect();
        // 89 + 3 + 2 + 12 * 13 = 250: one SET.
        let e = entitlement_set_emms(d, 1, few, 256, 100).unwrap();
        assert_eq!(e.len(), 1);
        assert!(matches!(
            e[0].commands[0],
            CommandSpec::EntitlementSet { .. }
        ));
        let many: Vec<Entitlement> = (1..=14)
            .map(|p| Entitlement {
                product_id: p,
                start: 0,
                end: 9,
            })
            .collect();
        let e = entitlement_set_emms(d, 1, many, 256, 100).unwrap();
        assert_eq!(e.len(), 2);
        assert!(e.iter().all(|p| p.head.purpose == Purpose::EntitlementSet
            && p.head.class == Class::Background
            && p.commands
                .iter()
                .all(|c| matches!(c, CommandSpec::EntitlementAdd(_)))));
        // An empty set is still sent: it clears a re-enabled card.
        let e = entitlement_set_emms(d, 1, vec![], 256, 100).unwrap();
        assert_eq!(e.len(), 1);
    }

    fn lim() -> Limits {
        Limits {
            max_section: 256,
            state_not_after: 1000,
        }
    }

    fn meta(kind: KeyKind, version: u32) -> KeyMeta {
        KeyMeta {
            id: 0,
            kind,
            version,
            state: "active".into(),
            activates_at: 10 * version,
            retires_at: None,
        }
    }

    fn keys() -> Keys {
        Keys {
            group: vec![meta(KeyKind::Group(3), 1), meta(KeyKind::Group(3), 2)],
            global: vec![meta(KeyKind::Global, 5)],
        }
    }

    fn id(n: u64) -> DeviceId {
        DeviceId::new(n).unwrap()
    }

    #[test]
    fn an_added_device_gets_its_keys_then_its_set() {
        let work = Work::AddDevice {
            device_id: id(7),
            group_id: 3,
            slot: 9,
            pmk_version: 4,
            reenabled: false,
            bulk: false,
        };
        let f = Facts {
            keys: Some(Ok(keys())),
            ..Facts::default()
        };
        let plan = decide(work.clone(), f, &lim()).unwrap();
        assert_eq!(plan.withdraw[0].0, 7);
        assert_eq!(plan.emms.len(), 2);
        let enable = &plan.emms[0];
        assert_eq!(enable.head.purpose, Purpose::DeviceEnable);
        assert_eq!(enable.head.class, Class::Change);
        assert_eq!(enable.head.key_version, Some(4));
        assert_eq!(enable.head.not_after, 1000);
        assert_eq!(enable.commands.len(), 4, "enable + 2 GK + 1 GLK");
        assert!(matches!(
            enable.commands[1],
            CommandSpec::GroupKey {
                group_id: 3,
                slot: 9,
                key_version: 1,
                ..
            }
        ));
        assert_eq!(plan.emms[1].head.purpose, Purpose::EntitlementSet);
        assert!(plan.withdraw[0].1.matches(Some(Purpose::DeviceDisable)));
        assert!(!plan.withdraw[0].1.matches(Some(Purpose::Keys)));
        // Keys not to be had: retried, not failed.
        let f = Facts {
            keys: Some(Err("no GK".into())),
            ..Facts::default()
        };
        assert_eq!(decide(work, f, &lim()), Err(Skip::Retry("no GK".into())));
    }

    #[test]
    fn a_group_gets_its_keys_in_one_group_emm_under_its_own_gk() {
        let offer = |version| {
            Some(KeyOffer {
                version,
                activates_at: 500,
            })
        };
        let work = Work::DeliverGroupKeys {
            group_id: 4,
            gk: offer(2),
            glk: offer(3),
            not_after: 900,
        };
        let f = Facts {
            slots: vec![3, 9],
            ..Facts::default()
        };
        let plan = decide(work.clone(), f, &lim()).unwrap();
        assert_eq!(plan.emms.len(), 1);
        let e = &plan.emms[0];
        assert_eq!(e.head.address, Address::group_with_slots(4, [3, 9]));
        // The Encryptor seals it under the group's GK in force.
        assert_eq!(e.head.key_version, None);
        assert_eq!(
            (e.head.class, e.head.purpose),
            (Class::Background, Purpose::Keys)
        );
        assert_eq!(e.head.not_after, 900);
        assert!(matches!(
            e.commands[..],
            [
                CommandSpec::GroupKey {
                    group_id: 4,
                    slot: 0,
                    key_version: 2,
                    ..
                },
                CommandSpec::GlobalKey { key_version: 3, .. }
            ]
        ));
        // One TS packet's worth: header + group address + both keys.
        let bytes = e.head.address.emm_overhead()
            + e.commands
                .iter()
                .map(CommandSpec::encoded_len)
                .sum::<usize>();
        assert_eq!(bytes, 176);
        assert!(plan.withdraw.is_empty());
        // No member left: nothing.
        assert_eq!(decide(work, Facts::default(), &lim()), Ok(Plan::nothing()));
    }

    #[test]
    fn a_removal_rekeys_the_group_for_the_remaining_members_only() {
        let gone = Work::RemoveDevice {
            device_id: id(8),
            group_id: Some(3),
            slot: Some(1),
        };
        let f = Facts {
            pmk: Some(2),
            rekeyed: Some((2, vec![(id(9), 4, 1), (id(10), 6, 1)])),
            keys: Some(Ok(keys())),
            ..Facts::default()
        };
        let plan = decide(gone, f, &lim()).unwrap();
        let to = |e: &Planned| device_of(&e.head.address);
        assert_eq!(plan.emms[0].commands, vec![CommandSpec::DeviceDisable {}]);
        assert_eq!(to(&plan.emms[0]), Some(8));
        let rest = &plan.emms[1..];
        assert_eq!(
            rest.iter().map(to).collect::<Vec<_>>(),
            vec![Some(9), Some(10)]
        );
        for e in rest {
            assert_eq!(
                (e.head.class, e.head.purpose),
                (Class::Change, Purpose::Keys)
            );
            assert!(e.commands.iter().any(|c| matches!(
                c,
                CommandSpec::GroupKey {
                    group_id: 3,
                    key_version: 2,
                    ..
                }
            )));
        }
        assert_eq!(
            plan.withdraw[1..],
            [
                (9, Withdraw::Purposes(vec![Purpose::Keys])),
                (10, Withdraw::Purposes(vec![Purpose::Keys]))
            ]
        );
        assert_eq!(
            plan.revoked,
            Some(Revoked {
                device_id: 8,
                group_id: 3,
                gk_version: 2
            })
        );
    }

    #[test]
    fn a_refresh_carries_the_set_and_the_keys() {
        let f = Facts {
            enabled: Some((4, 3, 1)),
            keys: Some(Ok(keys())),
            ..Facts::default()
        };
        let plan = decide(Work::RefreshSet { device_id: id(8) }, f, &lim()).unwrap();
        let cmds: Vec<u8> = plan
            .emms
            .iter()
            .flat_map(|e| e.commands.iter().map(|c| c.tag()))
            .collect();
        assert_eq!(cmds[0], emm::tag::ENTITLEMENT_SET);
        assert!(cmds.contains(&emm::tag::GROUP_KEY) && cmds.contains(&emm::tag::GLOBAL_KEY));
        assert!(plan
            .emms
            .iter()
            .all(|e| e.head.purpose == Purpose::EntitlementSet));
        assert_eq!(
            plan.withdraw,
            vec![(8, Withdraw::Purposes(vec![Purpose::EntitlementSet]))]
        );
    }

    #[test]
    fn bulk_adds_go_in_the_background_class() {
        let add = Work::AddDevice {
            device_id: id(7),
            group_id: 3,
            slot: 9,
            pmk_version: 4,
            reenabled: false,
            bulk: false,
        };
        let ent = Work::AddEntitlement {
            device_id: id(7),
            product_id: ProductId::new(5).unwrap(),
            start: 1,
            end: 2,
            bulk: false,
        };
        for work in [add, ent] {
            let f = || Facts {
                keys: Some(Ok(keys())),
                pmk: Some(4),
                ..Facts::default()
            };
            let normal = decide(work.clone(), f(), &lim()).unwrap();
            assert_eq!(normal.emms[0].head.class, Class::Change);
            let bulk = decide(work.into_bulk(), f(), &lim()).unwrap();
            assert!(bulk.emms.iter().all(|e| e.head.class == Class::Background));
            assert_eq!(bulk.emms.len(), normal.emms.len());
        }
    }

    #[test]
    fn unknown_or_disabled_devices() {
        let gone = Work::RemoveDevice {
            device_id: id(8),
            group_id: None,
            slot: None,
        };
        assert!(matches!(
            decide(gone.clone(), Facts::default(), &lim()),
            Err(Skip::Failed(m)) if m == "device 8 not found"
        ));
        let f = Facts {
            pmk: Some(2),
            ..Facts::default()
        };
        let plan = decide(gone, f, &lim()).unwrap();
        assert_eq!(plan.emms[0].head.class, Class::Urgent);
        assert_eq!(plan.withdraw, vec![(8, Withdraw::All)]);
        // The Scheduler's kinds make nothing for a disabled device.
        for w in [
            Work::DeliverKeys { device_id: id(8) },
            Work::RefreshSet { device_id: id(8) },
        ] {
            assert_eq!(decide(w, Facts::default(), &lim()), Ok(Plan::nothing()));
        }
    }

    #[test]
    fn osms_by_target() {
        let osm = |target, forced| Work::GenerateOsm {
            target,
            text: "hi".into(),
            duration_s: 5,
            forced,
            not_after: 77,
        };
        let g = crate::sms::types::GroupId::new(4).unwrap();
        // A group without members: no EMM.
        assert_eq!(
            decide(osm(Target::Group(g), false), Facts::default(), &lim()),
            Ok(Plan::nothing())
        );
        let f = Facts {
            slots: vec![1, 2],
            ..Facts::default()
        };
        let plan = decide(osm(Target::Group(g), true), f, &lim()).unwrap();
        assert_eq!(plan.emms[0].head.class, Class::Urgent);
        assert_eq!(plan.emms[0].head.not_after, 77);
        assert_eq!(plan.emms[0].head.key_version, None);
        assert!(plan.withdraw.is_empty());
        let plan = decide(osm(Target::All, false), Facts::default(), &lim()).unwrap();
        assert_eq!(plan.emms[0].head.address, Address::Global);
        assert_eq!(plan.emms[0].head.class, Class::Change);
    }

    fn item(id: u64) -> Item {
        Item {
            id,
            request_id: Some(100 + id),
            device_id: Some(1),
            payload: String::new(),
            attempts: 0,
        }
    }

    fn sealed(k: u32) -> Result<Sealed, SealJobError> {
        Ok(Sealed {
            section: vec![1, 2, 3],
            key_version: k,
        })
    }

    #[test]
    fn a_later_item_supersedes_an_earlier_one_of_the_batch() {
        let set = |n| {
            entitlement_set_emms(id(1), 1, vec![], 256, 9)
                .unwrap()
                .into_iter()
                .map(move |mut p| {
                    p.head.not_after = n;
                    p
                })
                .collect::<Vec<_>>()
        };
        let plan = |n| {
            Ok(Plan::of(
                id(1),
                set(n),
                Withdraw::Purposes(vec![Purpose::EntitlementSet]),
            ))
        };
        let items = vec![item(1), item(2), item(3), item(4)];
        let outcomes = vec![
            plan(10),
            plan(20),
            Err(Skip::Failed("bad".into())),
            plan(40),
        ];
        let ids = vec![51, 52, 54];
        let results = vec![
            sealed(1),
            sealed(1),
            Err(SealJobError::UnknownKey("pmk 1".into())),
        ];
        let s = settle(&items, outcomes, ids, results, 5);
        assert_eq!(s.done.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 2]);
        let ids_msgs = |v: &[(&Item, String)]| -> Vec<(u64, String)> {
            v.iter().map(|(i, m)| (i.id, m.clone())).collect()
        };
        assert_eq!(ids_msgs(&s.retry), vec![(4, "pmk 1".to_string())]);
        assert_eq!(ids_msgs(&s.failed), vec![(3, "bad".to_string())]);
        let made: Vec<(u64, bool)> = s.made.iter().map(|m| (m.review.emm_id, m.live)).collect();
        assert_eq!(made, vec![(51, false), (52, true)]);
        assert_eq!(s.made[1].request_id, Some(102));
        assert_eq!(s.made[1].review.issued_at, 5);
        assert_eq!(s.withdraw[&1].len(), 2);
    }

    #[test]
    fn only_everything_supersedes_an_unknown_purpose() {
        let live = vec![
            LiveEmm {
                id: 1,
                device: 5,
                purpose: Some(Purpose::Keys),
            },
            LiveEmm {
                id: 2,
                device: 5,
                purpose: None,
            },
            LiveEmm {
                id: 3,
                device: 6,
                purpose: None,
            },
        ];
        let mut w = BTreeMap::new();
        w.insert(5, vec![Withdraw::Purposes(vec![Purpose::Keys])]);
        w.insert(6, vec![Withdraw::All]);
        assert_eq!(superseded(live, &w), vec![1, 3]);
    }
}
