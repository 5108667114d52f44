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
//! | addentitlement p | ENTITLEMENT_ADD | 1 | `entitlement_add:p` | `entitlement_add:p`, `entitlement_remove:p`, `entitlement_set` |
//! |  | ENTITLEMENT_SET | 2 | `entitlement_set` | |
//! | removeentitlement p | ENTITLEMENT_REMOVE | 1 | `entitlement_remove:p` | as addentitlement |
//! |  | ENTITLEMENT_SET | 2 | `entitlement_set` | |
//! | generateosm | OSM: unique / group (bitmap = the group's current members) / global | 0 if forced, else 1 | `osm` | nothing |
//! | deliverkeys (Scheduler, rotation) | GROUP_KEY (current and pending GK of its group, its slot) + GLOBAL_KEY (current and pending GLK); nothing unless the device is enabled | 2 | `keys` | `keys` |
//! | refreshset (Scheduler, refresh) | ENTITLEMENT_SET; nothing unless the device is enabled | 2 | `entitlement_set` | `entitlement_set` |
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, IsolationLevel, Transaction, TxOpts, Value};
use time::OffsetDateTime;

use crate::app::Shared;
use crate::db::{classify, Db, DbError, DbErrorKind};
use crate::encryptor::{Encryptor, EncryptorError, SealJob, SealJobError};
use crate::keystore::{KeyKind, KeyMeta};
use crate::sms::store::db_time;
use crate::sms::types::Target;
use crate::sms::Work;
use crate::sqltext::{col, values, Script};
use casd_wire::emm::{self, Address, CommandSpec, DeviceId, Entitlement};

pub const CLASS_URGENT: u8 = 0;
pub const CLASS_CHANGE: u8 = 1;
pub const CLASS_BACKGROUND: u8 = 2;

/// Attempts of an item whose key was not found before it is marked failed.
pub const MAX_ATTEMPTS: u32 = 8;

/// `emms.purpose` values (supersession is decided on them).
pub mod purpose {
    pub const DEVICE_ENABLE: &str = "device_enable";
    pub const DEVICE_DISABLE: &str = "device_disable";
    pub const ENTITLEMENT_SET: &str = "entitlement_set";
    pub const OSM: &str = "osm";
    pub const KEYS: &str = "keys";
    pub fn entitlement_add(product_id: u32) -> String {
        format!("entitlement_add:{product_id}")
    }
    pub fn entitlement_remove(product_id: u32) -> String {
        format!("entitlement_remove:{product_id}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmmgError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Encryptor(#[from] EncryptorError),
    #[error("the emmg role needs an encryptor")]
    NoEncryptor,
    /// A statement's result was not what the code expects (a bug).
    #[error("internal: {0}")]
    Internal(String),
    /// Test hook: the batch was abandoned just before COMMIT.
    #[error("batch abandoned before commit (injected)")]
    Injected,
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

/// Options of one batch (tests).
#[derive(Clone, Debug, Default)]
pub struct BatchOptions {
    /// Items per batch; 0 = `emmg.batch`.
    pub batch: usize,
    /// Do everything, then drop the transaction instead of committing it,
    /// as a crash right before COMMIT would.
    #[doc(hidden)]
    pub abandon_before_commit: bool,
}

/// The EMMG role: `emmg.workers` workers until shutdown; each finishes the
/// batch it holds before stopping.
pub async fn run(shared: Shared) -> anyhow::Result<()> {
    let enc = shared.encryptor.clone().ok_or(EmmgError::NoEncryptor)?;
    let outage = Arc::new(AtomicBool::new(false));
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

/// Processes one batch; returns how many items it finished (done or failed).
pub async fn process_once(shared: &Shared, enc: &dyn Encryptor) -> Result<usize, EmmgError> {
    process_batch(shared, enc, &BatchOptions::default()).await
}

/// [`process_once`] with options.
pub async fn process_batch(
    shared: &Shared,
    enc: &dyn Encryptor,
    opts: &BatchOptions,
) -> Result<usize, EmmgError> {
    let mut conn = shared.db.conn().await?;
    conn.reset_connection(false);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = try_batch(shared, enc, opts, &mut conn).await;
        match r {
            Err(e) if attempt < 4 && e.is_retryable_now() => continue,
            Ok((n, changed)) => {
                if changed {
                    shared.emms_ready.notify_one();
                }
                return Ok(n);
            }
            Err(e) => return Err(e),
        }
    }
}

struct Item {
    id: u64,
    request_id: Option<u64>,
    device_id: Option<u64>,
    payload: String,
    attempts: u32,
}

struct DeviceRow {
    pmk_version: u32,
}

/// One EMM to make.
struct Planned {
    address: Address,
    key_version: Option<u32>,
    class: u8,
    purpose: String,
    not_after: u32,
    commands: Vec<CommandSpec>,
}

impl Planned {
    fn addressing(&self) -> (&'static str, u64) {
        match &self.address {
            Address::Unique { device_id } => ("unique", device_id.get()),
            Address::Group { group_id, .. } => ("group", u64::from(*group_id)),
            Address::Global => ("global", 0),
        }
    }
    fn device(&self) -> Option<u64> {
        match &self.address {
            Address::Unique { device_id } => Some(device_id.get()),
            _ => None,
        }
    }
}

/// Which of the device's live unique EMMs an item supersedes.
#[derive(Clone, Debug)]
enum Withdraw {
    Nothing,
    Purposes(Vec<String>),
    /// Every live unique EMM of the device but the item's own.
    All,
}

impl Withdraw {
    fn matches(&self, purpose: &str) -> bool {
        match self {
            Withdraw::Nothing => false,
            Withdraw::Purposes(p) => p.iter().any(|x| x == purpose),
            Withdraw::All => true,
        }
    }
}

enum Outcome {
    Done {
        emms: Vec<Planned>,
        device: Option<u64>,
        withdraw: Withdraw,
    },
    Retry(String),
    Failed(String),
}

fn now_unix() -> u32 {
    OffsetDateTime::now_utc()
        .unix_timestamp()
        .clamp(0, u32::MAX as i64) as u32
}

fn unix_to_db(t: u32) -> Value {
    db_time(OffsetDateTime::from_unix_timestamp(i64::from(t)).unwrap_or(OffsetDateTime::UNIX_EPOCH))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
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
    let set = CommandSpec::EntitlementSet {
        entries: entries.clone(),
    };
    let groups = if address.emm_overhead() + set.encoded_len() <= max {
        vec![vec![set]]
    } else {
        let adds = entries
            .into_iter()
            .map(CommandSpec::EntitlementAdd)
            .collect();
        pack(adds, &address, max)?
    };
    Ok(groups
        .into_iter()
        .map(|commands| Planned {
            address: address.clone(),
            key_version: Some(pmk_version),
            class: CLASS_BACKGROUND,
            purpose: purpose::ENTITLEMENT_SET.into(),
            not_after,
            commands,
        })
        .collect())
}

/// Current (and pending) key versions, asked once per batch.
struct KeyVersions<'a> {
    enc: &'a dyn Encryptor,
    db: &'a Db,
    cache: HashMap<KeyKind, Vec<KeyMeta>>,
}

impl KeyVersions<'_> {
    /// The version in use now, then versions created ahead of time for a
    /// coming rotation (a device added now must get them too).
    async fn versions_to_deliver(
        &mut self,
        kind: KeyKind,
    ) -> Result<Result<Vec<KeyMeta>, String>, EmmgError> {
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

async fn try_batch(
    shared: &Shared,
    enc: &dyn Encryptor,
    opts: &BatchOptions,
    conn: &mut Conn,
) -> Result<(usize, bool), EmmgError> {
    let cfg = &shared.cfg;
    let batch = if opts.batch == 0 {
        cfg.emmg.batch
    } else {
        opts.batch
    }
    .max(1);
    let now_dt = OffsetDateTime::now_utc();
    let now = now_unix();
    let mut txo = TxOpts::default();
    txo.with_isolation_level(IsolationLevel::ReadCommitted);
    let mut tx = conn.start_transaction(txo).await?;

    // 1. Take items. Index order (not_before, id) so the scan locks only
    //    the rows it returns.
    type ItemRow = (u64, Option<u64>, Option<u64>, String, u32);
    let rows: Vec<ItemRow> = tx
        .exec(
            "SELECT id, request_id, device_id, payload, attempts FROM work_items \
             WHERE state = 'pending' AND not_before <= ? \
             ORDER BY not_before, id LIMIT ? FOR UPDATE SKIP LOCKED",
            (db_time(now_dt), batch as u64),
        )
        .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok((0, false));
    }
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

    // 2. One round trip of plain reads about the devices of the items
    //    taken: their pending items (for the order check), their rows and
    //    their active entitlements.
    //
    //    Per-device order: the device's pending items below our highest
    //    one must all be ours (a plain read: it sees other workers' held
    //    items as still pending); otherwise its items are left for later.
    let held: HashSet<u64> = items.iter().map(|i| i.id).collect();
    let devices: Vec<u64> = {
        let mut d: Vec<u64> = items.iter().filter_map(|i| i.device_id).collect();
        d.sort_unstable();
        d.dedup();
        d
    };
    let mut dev_rows: HashMap<u64, DeviceRow> = HashMap::new();
    let mut ents: HashMap<u64, Vec<Entitlement>> = HashMap::new();
    if !devices.is_empty() {
        let max_id = items.last().map(|i| i.id).unwrap_or(0);
        let params: Vec<Value> = devices.iter().map(|d| Value::from(*d)).collect();
        let list = placeholders(devices.len());
        let mut reads = Script::default();
        let mut p = params.clone();
        p.push(Value::from(max_id));
        let pending_at = reads.push(
            &format!(
                "SELECT device_id, id FROM work_items WHERE state = 'pending' \
                 AND device_id IN ({list}) AND id <= ? ORDER BY device_id, id"
            ),
            &p,
        )?;
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
        let sets = reads.run(&mut tx).await?;
        let mut ok: HashSet<u64> = HashSet::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        for r in &sets[pending_at] {
            let (d, id): (u64, u64) = (col(r, 0)?, col(r, 1)?);
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
        for r in &sets[rows_at] {
            dev_rows.insert(
                col(r, 0)?,
                DeviceRow {
                    pmk_version: col(r, 1)?,
                },
            );
        }
        for r in &sets[ents_at] {
            ents.entry(col(r, 0)?).or_default().push(Entitlement {
                product_id: col(r, 1)?,
                start: col(r, 2)?,
                end: col(r, 3)?,
            });
        }
    }
    if items.is_empty() {
        tx.rollback().await?;
        return Ok((0, false));
    }

    // 3. The commands of each item.
    let mut keys = KeyVersions {
        enc,
        db: &shared.db,
        cache: HashMap::new(),
    };
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
    for item in &items {
        outcomes.push(plan(item, &mut tx, &dev_rows, &ents, &mut keys, shared, now).await?);
    }

    // 4. emm_ids and one sealing call for the whole batch.
    let total: usize = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Done { emms, .. } => emms.len(),
            _ => 0,
        })
        .sum();
    // With them, in the same round trip, the live unique EMMs of the
    // devices whose items withdraw something, locked until the commit
    // (read before the new ones exist, so the same rows as after sealing).
    let mut withdrawing: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Done {
                device: Some(d),
                withdraw,
                ..
            } if !matches!(withdraw, Withdraw::Nothing) => Some(*d),
            _ => None,
        })
        .collect();
    withdrawing.sort_unstable();
    withdrawing.dedup();
    let mut script = Script::default();
    let ids_at = (total > 0)
        .then(|| {
            script.push(
                &format!("SELECT NEXTVAL(emm_id_seq) FROM seq_1_to_{total}"),
                &[],
            )
        })
        .transpose()?;
    let live_sql = format!(
        "SELECT id, address, purpose FROM emms WHERE addressing = 'unique' \
         AND address IN ({}) AND state = 'live' FOR UPDATE",
        placeholders(withdrawing.len())
    );
    let live_params: Vec<Value> = withdrawing.iter().map(|d| Value::from(*d)).collect();
    let live_at = (!withdrawing.is_empty())
        .then(|| script.push(&live_sql, &live_params))
        .transpose()?;
    let (ids, live_rows) = match script.run(&mut tx).await {
        Ok(sets) => {
            let mut ids: Vec<u64> = match ids_at {
                Some(k) => sets[k]
                    .iter()
                    .map(|r| col(r, 0))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            };
            ids.sort_unstable();
            let live: Vec<(u64, u64, String)> = match live_at {
                Some(k) => sets[k]
                    .iter()
                    .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?)))
                    .collect::<Result<_, crate::sqltext::Error>>()?,
                None => Vec::new(),
            };
            (ids, live)
        }
        // No sequence engine (seq_1_to_N): one NEXTVAL at a time, then
        // the lookup on its own.
        Err(crate::sqltext::Error::Db(e))
            if ids_at.is_some() && classify(&e) == DbErrorKind::NoSuchTable =>
        {
            let ids = next_emm_ids(&mut tx, total).await?;
            let live: Vec<(u64, u64, String)> = if withdrawing.is_empty() {
                Vec::new()
            } else {
                tx.exec(live_sql.as_str(), live_params.clone()).await?
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
    let mut jobs = Vec::with_capacity(total);
    {
        let mut k = 0;
        for o in &outcomes {
            if let Outcome::Done { emms, .. } = o {
                for p in emms {
                    jobs.push(SealJob {
                        emm_id: ids[k],
                        issued_at: now,
                        not_after: p.not_after,
                        address: p.address.clone(),
                        key_version: p.key_version,
                        commands: p.commands.clone(),
                    });
                    k += 1;
                }
            }
        }
    }
    let sealed = if jobs.is_empty() {
        Vec::new()
    } else {
        enc.seal_batch(jobs).await?
    };
    if sealed.len() != total {
        return Err(
            EncryptorError::Internal(format!("{} results for {total} jobs", sealed.len())).into(),
        );
    }

    // Per item: its EMMs with their ids and sections, or why it failed.
    struct Made {
        id: u64,
        request_id: Option<u64>,
        planned: Planned,
        section: Vec<u8>,
        key_version: u32,
        live: bool,
    }
    let mut made: Vec<Made> = Vec::new();
    let mut done_items: Vec<&Item> = Vec::new();
    let mut retry_items: Vec<(&Item, String)> = Vec::new();
    let mut failed_items: Vec<(&Item, String)> = Vec::new();
    // Withdrawals of EMMs already in the table, per device.
    let mut db_withdraw: BTreeMap<u64, Vec<Withdraw>> = BTreeMap::new();
    let mut results = sealed.into_iter();
    let mut id_iter = ids.into_iter();
    for (item, o) in items.iter().zip(outcomes) {
        match o {
            Outcome::Done {
                emms,
                device,
                withdraw,
            } => {
                let mut mine = Vec::new();
                let mut err: Option<SealJobError> = None;
                for p in emms {
                    let id = id_iter.next().unwrap_or(0);
                    match results.next() {
                        Some(Ok(s)) => mine.push(Made {
                            id,
                            request_id: item.request_id,
                            planned: p,
                            section: s.section,
                            key_version: s.key_version,
                            live: true,
                        }),
                        Some(Err(e)) => err = err.or(Some(e)),
                        None => err = err.or(Some(SealJobError::Invalid("no result".into()))),
                    }
                }
                match err {
                    Some(SealJobError::UnknownKey(m)) => retry_items.push((item, m)),
                    Some(e) => failed_items.push((item, e.to_string())),
                    None => {
                        if let Some(d) = device {
                            if !matches!(withdraw, Withdraw::Nothing) {
                                // Earlier EMMs of this batch it supersedes
                                // never go live.
                                for m in made.iter_mut() {
                                    if m.planned.device() == Some(d)
                                        && withdraw.matches(&m.planned.purpose)
                                    {
                                        m.live = false;
                                    }
                                }
                                db_withdraw.entry(d).or_default().push(withdraw);
                            }
                        }
                        made.extend(mine);
                        done_items.push(item);
                    }
                }
            }
            Outcome::Retry(m) => retry_items.push((item, m)),
            Outcome::Failed(m) => failed_items.push((item, m)),
        }
    }

    // 5. Writes: the live EMMs to withdraw are read (and locked) first,
    //    then every write goes in one script (one round trip).
    let mut changed = false;
    let mut w = Script::default();
    if !db_withdraw.is_empty() {
        let gone: Vec<u64> = live_rows
            .into_iter()
            .filter(|(_, d, p)| {
                db_withdraw
                    .get(d)
                    .is_some_and(|ws| ws.iter().any(|w| w.matches(p)))
            })
            .map(|(id, _, _)| id)
            .collect();
        if !gone.is_empty() {
            let params: Vec<Value> = gone.iter().map(|i| Value::from(*i)).collect();
            w.push(
                &format!(
                    "UPDATE emms SET state = 'withdrawn' WHERE id IN ({})",
                    placeholders(gone.len())
                ),
                &params,
            )?;
            insert_events(&mut w, &gone, "remove", now_dt)?;
            changed = true;
        }
    }
    if !made.is_empty() {
        let mut params: Vec<Value> = Vec::with_capacity(made.len() * 12);
        for m in &made {
            let (addressing, address) = m.planned.addressing();
            let review = serde_json::json!({
                "emm_id": m.id,
                "issued_at": now,
                "not_after": m.planned.not_after,
                "address": m.planned.address,
                "key_version": m.key_version,
                "commands": m.planned.commands,
            });
            params.extend([
                Value::from(m.id),
                m.request_id.map(Value::from).unwrap_or(Value::NULL),
                Value::from(addressing),
                Value::from(address),
                Value::from(m.key_version),
                Value::from(m.planned.class),
                Value::from(m.planned.purpose.as_str()),
                Value::from(review.to_string()),
                Value::from(m.section.clone()),
                db_time(now_dt),
                unix_to_db(m.planned.not_after),
                Value::from(if m.live { "live" } else { "withdrawn" }),
            ]);
        }
        let rows = vec!["(?,?,?,?,?,?,?,?,?,?,?,?)"; made.len()].join(",");
        w.push(
            &format!(
                "INSERT INTO emms (id, request_id, addressing, address, key_version, class, purpose, \
                 emm_data, encrypted_emm, created_at, not_after, state) VALUES {rows}"
            ),
            &params,
        )?;
        let live: Vec<u64> = made.iter().filter(|m| m.live).map(|m| m.id).collect();
        if !live.is_empty() {
            insert_events(&mut w, &live, "add", now_dt)?;
            changed = true;
        }
    }
    if !done_items.is_empty() {
        // done_at and processed_at are the time the EMMs are stored: the
        // server's clock at these statements, in the write script right
        // after the EMMs' INSERT and just before the COMMIT (the batch's
        // `now` would leave out the batch's own build, seal and insert
        // time, tens of ms under load).
        let ids: Vec<Value> = done_items.iter().map(|i| Value::from(i.id)).collect();
        w.push(
            &format!(
                "UPDATE work_items SET state = 'done', done_at = UTC_TIMESTAMP(6), \
                 attempts = attempts + 1, last_error = NULL WHERE id IN ({})",
                placeholders(done_items.len())
            ),
            &ids,
        )?;
        let reqs: Vec<Value> = done_items
            .iter()
            .filter_map(|i| i.request_id)
            .map(Value::from)
            .collect();
        if !reqs.is_empty() {
            w.push(
                &format!(
                    "UPDATE sms_requests SET processed_at = UTC_TIMESTAMP(6) WHERE id IN ({})",
                    placeholders(reqs.len())
                ),
                &reqs,
            )?;
        }
    }
    for (item, msg) in &retry_items {
        let attempts = item.attempts + 1;
        let give_up = attempts >= MAX_ATTEMPTS;
        if give_up {
            tracing::error!(
                item = item.id,
                "work item failed after {attempts} attempts: {msg}"
            );
        } else {
            tracing::warn!(item = item.id, "work item will be retried: {msg}");
        }
        let delay = 1u64 << attempts.min(8);
        w.push(
            "UPDATE work_items SET state = ?, attempts = ?, last_error = ?, \
             not_before = ? + INTERVAL ? SECOND WHERE id = ?",
            &values((
                if give_up { "failed" } else { "pending" },
                attempts,
                truncate(msg, 1024),
                db_time(now_dt),
                delay,
                item.id,
            )),
        )?;
    }
    for (item, msg) in &failed_items {
        tracing::error!(item = item.id, "work item failed: {msg}");
        w.push(
            "UPDATE work_items SET state = 'failed', attempts = attempts + 1, last_error = ?, \
             done_at = UTC_TIMESTAMP(6) WHERE id = ?",
            &values((truncate(msg, 1024), item.id)),
        )?;
    }
    w.run(&mut tx).await?;
    if opts.abandon_before_commit {
        drop(tx);
        return Err(EmmgError::Injected);
    }
    tx.commit().await?;
    Ok((done_items.len() + failed_items.len(), changed))
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn insert_events(
    w: &mut Script,
    ids: &[u64],
    op: &str,
    now: OffsetDateTime,
) -> Result<(), EmmgError> {
    let mut params: Vec<Value> = Vec::with_capacity(ids.len() * 3);
    for id in ids {
        params.extend([Value::from(*id), Value::from(op), db_time(now)]);
    }
    let rows = vec!["(?,?,?)"; ids.len()].join(",");
    w.push(
        &format!("INSERT INTO carousel_events (emm_id, op, created_at) VALUES {rows}"),
        &params,
    )?;
    Ok(())
}

/// `n` values of `emm_id_seq`, increasing. Taken outside the transaction's
/// atomicity (sequences are not rolled back): a batch that does not commit
/// leaves a gap, which the schema allows.
async fn next_emm_ids(tx: &mut Transaction<'_>, n: usize) -> Result<Vec<u64>, EmmgError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // One round trip with MariaDB's sequence engine (seq_1_to_N).
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

/// An item that makes no EMM.
fn nothing() -> Outcome {
    Outcome::Done {
        emms: Vec::new(),
        device: None,
        withdraw: Withdraw::Nothing,
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

/// The EMMs one item becomes.
async fn plan(
    item: &Item,
    tx: &mut Transaction<'_>,
    devices: &HashMap<u64, DeviceRow>,
    ents: &HashMap<u64, Vec<Entitlement>>,
    keys: &mut KeyVersions<'_>,
    shared: &Shared,
    now: u32,
) -> Result<Outcome, EmmgError> {
    let cfg = &shared.cfg;
    let max = cfg.cas.max_section_bytes;
    let state_not_after = now.saturating_add(cfg.emmg.emm_lifetime_days.saturating_mul(86_400));
    let work: Work = match serde_json::from_str(&item.payload) {
        Ok(w) => w,
        Err(e) => return Ok(Outcome::Failed(format!("unreadable payload: {e}"))),
    };
    let pmk_of = |d: DeviceId| devices.get(&d.get()).map(|r| r.pmk_version);
    let ents_of = |d: DeviceId| ents.get(&d.get()).cloned().unwrap_or_default();
    let unique = |d: DeviceId| Address::Unique { device_id: d };
    let ent_withdraw = |p: u32| {
        Withdraw::Purposes(vec![
            purpose::entitlement_add(p),
            purpose::entitlement_remove(p),
            purpose::ENTITLEMENT_SET.into(),
        ])
    };
    let mut emms: Vec<Planned> = Vec::new();
    let pack_into = |emms: &mut Vec<Planned>,
                     commands: Vec<CommandSpec>,
                     address: Address,
                     key_version: Option<u32>,
                     class: u8,
                     purpose: String,
                     not_after: u32|
     -> Result<(), String> {
        for commands in pack(commands, &address, max)? {
            emms.push(Planned {
                address: address.clone(),
                key_version,
                class,
                purpose: purpose.clone(),
                not_after,
                commands,
            });
        }
        Ok(())
    };
    macro_rules! tri {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(m) => return Ok(Outcome::Failed(m)),
            }
        };
    }
    let (device, withdraw) = match work {
        Work::AddDevice {
            device_id,
            group_id,
            slot,
            pmk_version,
            ..
        } => {
            let gks = match keys.versions_to_deliver(KeyKind::Group(group_id)).await? {
                Ok(v) => v,
                Err(m) => return Ok(Outcome::Retry(m)),
            };
            let glks = match keys.versions_to_deliver(KeyKind::Global).await? {
                Ok(v) => v,
                Err(m) => return Ok(Outcome::Retry(m)),
            };
            let mut cmds = vec![CommandSpec::DeviceEnable {}];
            cmds.extend(gks.iter().map(|k| CommandSpec::GroupKey {
                group_id,
                slot,
                key_version: k.version,
                activates_at: k.activates_at,
                key: (),
            }));
            cmds.extend(glks.iter().map(|k| CommandSpec::GlobalKey {
                key_version: k.version,
                activates_at: k.activates_at,
                key: (),
            }));
            tri!(pack_into(
                &mut emms,
                cmds,
                unique(device_id),
                Some(pmk_version),
                CLASS_CHANGE,
                purpose::DEVICE_ENABLE.into(),
                state_not_after,
            ));
            emms.extend(tri!(entitlement_set_emms(
                device_id,
                pmk_version,
                ents_of(device_id),
                max,
                state_not_after,
            )));
            (
                device_id,
                Withdraw::Purposes(vec![
                    purpose::DEVICE_ENABLE.into(),
                    purpose::DEVICE_DISABLE.into(),
                    purpose::ENTITLEMENT_SET.into(),
                ]),
            )
        }
        Work::RemoveDevice { device_id, .. } => {
            let Some(pmk) = pmk_of(device_id) else {
                return Ok(Outcome::Failed(format!("device {device_id} not found")));
            };
            tri!(pack_into(
                &mut emms,
                vec![CommandSpec::DeviceDisable {}],
                unique(device_id),
                Some(pmk),
                CLASS_URGENT,
                purpose::DEVICE_DISABLE.into(),
                state_not_after,
            ));
            (device_id, Withdraw::All)
        }
        // ENTITLEMENT_ADD / ENTITLEMENT_REMOVE, then the device's whole set.
        Work::AddEntitlement { device_id, .. } | Work::RemoveEntitlement { device_id, .. } => {
            let Some(pmk) = pmk_of(device_id) else {
                return Ok(Outcome::Failed(format!("device {device_id} not found")));
            };
            let (command, p, what) = match work {
                Work::AddEntitlement {
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
                    (
                        CommandSpec::EntitlementAdd(e),
                        p,
                        purpose::entitlement_add(p),
                    )
                }
                Work::RemoveEntitlement { product_id, .. } => {
                    let p = product_id.get();
                    (
                        CommandSpec::EntitlementRemove { product_id: p },
                        p,
                        purpose::entitlement_remove(p),
                    )
                }
                _ => unreachable!("matched above"),
            };
            tri!(pack_into(
                &mut emms,
                vec![command],
                unique(device_id),
                Some(pmk),
                CLASS_CHANGE,
                what,
                state_not_after
            ));
            emms.extend(tri!(entitlement_set_emms(
                device_id,
                pmk,
                ents_of(device_id),
                max,
                state_not_after
            )));
            (device_id, ent_withdraw(p))
        }
        Work::DeliverKeys { device_id } => {
            let Some((group_id, slot, pmk)) = enabled_device(tx, device_id).await? else {
                return Ok(nothing());
            };
            let gks = match keys.versions_to_deliver(KeyKind::Group(group_id)).await? {
                Ok(v) => v,
                Err(m) => return Ok(Outcome::Retry(m)),
            };
            let glks = match keys.versions_to_deliver(KeyKind::Global).await? {
                Ok(v) => v,
                Err(m) => return Ok(Outcome::Retry(m)),
            };
            let mut cmds: Vec<CommandSpec> = gks
                .iter()
                .map(|k| CommandSpec::GroupKey {
                    group_id,
                    slot,
                    key_version: k.version,
                    activates_at: k.activates_at,
                    key: (),
                })
                .collect();
            cmds.extend(glks.iter().map(|k| CommandSpec::GlobalKey {
                key_version: k.version,
                activates_at: k.activates_at,
                key: (),
            }));
            tri!(pack_into(
                &mut emms,
                cmds,
                unique(device_id),
                Some(pmk),
                CLASS_BACKGROUND,
                purpose::KEYS.into(),
                state_not_after,
            ));
            (device_id, Withdraw::Purposes(vec![purpose::KEYS.into()]))
        }
        Work::RefreshSet { device_id } => {
            let Some((_, _, pmk)) = enabled_device(tx, device_id).await? else {
                return Ok(nothing());
            };
            let rows: Vec<(u32, u32, u32)> = tx
                .exec(
                    "SELECT product_id, start_at, end_at FROM entitlements \
                     WHERE state = 'active' AND device_id = ? ORDER BY product_id",
                    (device_id.get(),),
                )
                .await?;
            let entries = rows
                .into_iter()
                .map(|(product_id, start, end)| Entitlement {
                    product_id,
                    start,
                    end,
                })
                .collect();
            emms.extend(tri!(entitlement_set_emms(
                device_id,
                pmk,
                entries,
                max,
                state_not_after,
            )));
            (
                device_id,
                Withdraw::Purposes(vec![purpose::ENTITLEMENT_SET.into()]),
            )
        }
        Work::GenerateOsm {
            target,
            text,
            duration_s,
            forced,
            not_after,
        } => {
            let class = if forced { CLASS_URGENT } else { CLASS_CHANGE };
            let osm = CommandSpec::Osm {
                duration_s,
                flags: emm::osm_flags(forced),
                text,
            };
            let (address, key_version) = match target {
                Target::Device(d) => {
                    let Some(pmk) = pmk_of(d) else {
                        return Ok(Outcome::Failed(format!("device {d} not found")));
                    };
                    (unique(d), Some(pmk))
                }
                Target::Group(g) => {
                    let slots: Vec<u8> = tx
                        .exec(
                            "SELECT slot FROM group_slots WHERE group_id = ? AND device_id IS NOT NULL",
                            (g.get(),),
                        )
                        .await?;
                    if slots.is_empty() {
                        return Ok(Outcome::Done {
                            emms: Vec::new(),
                            device: None,
                            withdraw: Withdraw::Nothing,
                        });
                    }
                    (Address::group_with_slots(g.get(), slots), None)
                }
                Target::All => (Address::Global, None),
            };
            tri!(pack_into(
                &mut emms,
                vec![osm],
                address,
                key_version,
                class,
                purpose::OSM.into(),
                not_after,
            ));
            return Ok(Outcome::Done {
                emms,
                device: None,
                withdraw: Withdraw::Nothing,
            });
        }
    };
    Ok(Outcome::Done {
        emms,
        device: Some(device.get()),
        withdraw,
    })
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
        assert!(e.iter().all(|p| p.purpose == purpose::ENTITLEMENT_SET
            && p.class == CLASS_BACKGROUND
            && p.commands
                .iter()
                .all(|c| matches!(c, CommandSpec::EntitlementAdd(_)))));
        // An empty set is still sent: it clears a re-enabled card.
        let e = entitlement_set_emms(d, 1, vec![], 256, 100).unwrap();
        assert_eq!(e.len(), 1);
    }
}
