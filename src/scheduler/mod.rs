//! The Scheduler role: periodic jobs, each run by exactly one instance of
//! the fleet at a time (see docs/scheduler.md).
//!
//! - A [`Job`] has a name and a [`Schedule`] (`every 60s`, `daily 03:30`,
//!   `manual`). Every instance runs one loop per job: every
//!   `scheduler.tick_ms` it asks the database whether the job is due (the
//!   last run in `job_runs` is a period old, the daily time has passed
//!   since it, or a `job_triggers` row waits), and only then tries its
//!   lease ([`lease`]).
//! - With the lease, the run's first transaction re-checks "due" under the
//!   lease row's lock (another instance may have just run it), inserts the
//!   `job_runs` row and takes the pending triggers; the job then runs with
//!   its lease renewed every third of `lease_seconds`; the run's end is
//!   recorded (outcome `ok` / `error` / `fenced` / `cancelled`, counts
//!   JSON) *before* the lease is released, so two runs of one job never
//!   overlap in `job_runs`.
//! - Every write of a job goes through [`JobCtx::begin`], a transaction
//!   that holds the lease row and aborts with [`JobError::Fenced`] when the
//!   fence is no longer the run's: a paused or partitioned old holder
//!   cannot write after another instance took the lease over.
//! - Jobs: [`purge::PurgeJob`] (expiry and retention),
//!   [`rotation::RotationJob`] (GK/GLK rotation), [`rotation::RootRotationJob`]
//!   (root key re-seal), [`refresh::RefreshJob`] (ENTITLEMENT_SET refresh),
//!   [`revocation::RevocationJob`] (GLK rotation after removals).
//!
//! HTTP (scope `admin`): `GET /jobs` — every job of this instance with its
//! schedule, lease and recent runs; `POST /jobs/{name}/run` (optional JSON
//! object body: the job's parameters) — records a trigger and wakes the
//! loops; 202 with the trigger id. The run happens on whichever instance
//! takes the lease next.

pub mod purge;
pub mod refresh;
pub mod revocation;
pub mod rotation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use mysql_async::prelude::*;
use mysql_async::{Conn, IsolationLevel, Transaction, TxOpts};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api_error::ApiError;
use crate::app::Shared;
use crate::auth::{Caller, Scope};
use crate::db::DbError;
use crate::encryptor::{BoxFuture, Encryptor, EncryptorError};
use crate::lease;

/// What a run reports: a JSON object of counts (and notes).
pub type Counts = serde_json::Map<String, Value>;

/// When a job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// A period after the start of the last run.
    Every(Duration),
    /// Once a day at HH:MM UTC (at the first tick after it).
    DailyAt { hour: u8, minute: u8 },
    /// Only when triggered.
    Manual,
}

impl Schedule {
    /// `every 90s` / `every 5m` / `every 1h` / `every 30d` / `every 250ms`,
    /// `daily 03:30`, `manual`.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        let bad =
            || format!("`{s}`: expected \"every <n>ms|s|m|h|d\", \"daily HH:MM\" or \"manual\"");
        if s == "manual" {
            return Ok(Schedule::Manual);
        }
        if let Some(rest) = s.strip_prefix("every ") {
            let rest = rest.trim();
            let split = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            let (n, unit) = rest.split_at(split);
            let n: u64 = n.parse().map_err(|_| bad())?;
            let d = match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                "d" => Duration::from_secs(n * 86_400),
                _ => return Err(bad()),
            };
            if d.is_zero() {
                return Err(format!("`{s}`: the period must not be zero"));
            }
            return Ok(Schedule::Every(d));
        }
        if let Some(rest) = s.strip_prefix("daily ") {
            let (h, m) = rest.trim().split_once(':').ok_or_else(bad)?;
            let hour: u8 = h.parse().map_err(|_| bad())?;
            let minute: u8 = m.parse().map_err(|_| bad())?;
            if hour > 23 || minute > 59 {
                return Err(bad());
            }
            return Ok(Schedule::DailyAt { hour, minute });
        }
        Err(bad())
    }

    /// Whether a run is due at `now_ms` (unix ms, database clock) when the
    /// last run started at `last_ms`.
    pub fn due(&self, last_ms: Option<i64>, now_ms: i64) -> bool {
        match self {
            Schedule::Manual => false,
            Schedule::Every(p) => match last_ms {
                None => true,
                Some(l) => now_ms - l >= p.as_millis() as i64,
            },
            Schedule::DailyAt { hour, minute } => {
                let day = 86_400_000i64;
                let at = i64::from(*hour) * 3_600_000 + i64::from(*minute) * 60_000;
                let today = now_ms - now_ms.rem_euclid(day) + at;
                let latest = if today <= now_ms { today } else { today - day };
                last_ms.is_none_or(|l| l < latest)
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}ms", d.as_millis()),
            Schedule::DailyAt { hour, minute } => write!(f, "daily {hour:02}:{minute:02}"),
            Schedule::Manual => f.write_str("manual"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Another instance took the lease over: nothing more was written.
    #[error("lease lost to another instance (fenced)")]
    Fenced,
    /// Shutdown asked.
    #[error("stopped by shutdown")]
    Cancelled,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Encryptor(#[from] EncryptorError),
    #[error("{0}")]
    Other(String),
}

impl From<mysql_async::Error> for JobError {
    fn from(e: mysql_async::Error) -> Self {
        JobError::Db(e.into())
    }
}

impl JobError {
    fn outcome(&self) -> &'static str {
        match self {
            JobError::Fenced => "fenced",
            JobError::Cancelled => "cancelled",
            _ => "error",
        }
    }
}

/// A periodic job.
pub trait Job: Send + Sync {
    fn name(&self) -> &str;
    /// One run. Writes go through [`JobCtx::begin`].
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>>;
}

/// What one run of a job gets.
pub struct JobCtx {
    pub shared: Shared,
    pub enc: Option<Arc<dyn Encryptor>>,
    pub job: String,
    pub holder: String,
    pub fence: u64,
    pub run_id: u64,
    /// The parameters of the trigger(s) (`{}` for a scheduled run).
    pub params: Value,
    /// Cancelled at shutdown or when the lease is lost.
    pub cancel: CancellationToken,
    lost: Arc<AtomicBool>,
}

impl JobCtx {
    /// `Err` when the run must stop (lease lost, shutdown).
    pub fn check(&self) -> Result<(), JobError> {
        if self.lost.load(Ordering::Relaxed) {
            Err(JobError::Fenced)
        } else if self.cancel.is_cancelled() {
            Err(JobError::Cancelled)
        } else {
            Ok(())
        }
    }

    pub async fn conn(&self) -> Result<Conn, JobError> {
        let mut c = self.shared.db.conn().await?;
        c.reset_connection(false);
        Ok(c)
    }

    /// The Encryptor (rotation jobs need one).
    pub fn encryptor(&self) -> Result<&dyn Encryptor, JobError> {
        self.enc
            .as_deref()
            .ok_or_else(|| JobError::Other("the scheduler needs an encryptor".into()))
    }

    /// A READ COMMITTED transaction that holds this run's lease row (`FOR
    /// UPDATE`) and has checked that the fence is still the run's: every
    /// write of a job is made in one. `Err(Fenced)` otherwise.
    pub async fn begin<'c>(&self, conn: &'c mut Conn) -> Result<Transaction<'c>, JobError> {
        self.check()?;
        let mut txo = TxOpts::default();
        txo.with_isolation_level(IsolationLevel::ReadCommitted);
        let mut tx = conn.start_transaction(txo).await?;
        let row: Option<(String, u64)> = tx
            .exec_first(
                "SELECT holder, fence FROM leases WHERE name = ? FOR UPDATE",
                (lease::lease_name(&self.job),),
            )
            .await?;
        if row.as_ref() != Some(&(self.holder.clone(), self.fence)) {
            drop(tx);
            self.lost.store(true, Ordering::Relaxed);
            return Err(JobError::Fenced);
        }
        Ok(tx)
    }

    /// A parameter as u64.
    pub fn param_u64(&self, k: &str) -> Option<u64> {
        self.params.get(k).and_then(Value::as_u64)
    }

    pub fn param_bool(&self, k: &str) -> bool {
        self.params.get(k).and_then(Value::as_bool).unwrap_or(false)
    }
}

/// One row of `job_runs`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunRecord {
    pub id: u64,
    pub job: String,
    pub holder: String,
    pub fence: u64,
    /// Unix microseconds (database clock).
    pub started_us: i64,
    pub ended_us: Option<i64>,
    pub outcome: Option<String>,
    pub counts: Option<Value>,
}

const RUN_COLS: &str = "id, job, holder, fence, \
    CAST(UNIX_TIMESTAMP(started_at) * 1000000 AS SIGNED), \
    CAST(UNIX_TIMESTAMP(ended_at) * 1000000 AS SIGNED), outcome, counts";

type RunRow = (
    u64,
    String,
    String,
    u64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn run_from_row(r: RunRow) -> RunRecord {
    RunRecord {
        id: r.0,
        job: r.1,
        holder: r.2,
        fence: r.3,
        started_us: r.4,
        ended_us: r.5,
        outcome: r.6,
        counts: r.7.and_then(|c| serde_json::from_str(&c).ok()),
    }
}

/// Recent runs of `job` (newest first), or of every job when `None`.
pub async fn recent_runs(
    conn: &mut Conn,
    job: Option<&str>,
    limit: u32,
) -> Result<Vec<RunRecord>, DbError> {
    let rows: Vec<RunRow> = match job {
        Some(j) => {
            conn.exec(
                format!("SELECT {RUN_COLS} FROM job_runs WHERE job = ? ORDER BY id DESC LIMIT ?"),
                (j, limit),
            )
            .await?
        }
        None => {
            conn.exec(
                format!("SELECT {RUN_COLS} FROM job_runs ORDER BY id DESC LIMIT ?"),
                (limit,),
            )
            .await?
        }
    };
    Ok(rows.into_iter().map(run_from_row).collect())
}

/// Records a trigger for `job`; returns its id.
pub async fn trigger(
    conn: &mut Conn,
    job: &str,
    params: &Value,
    requested_by: &str,
) -> Result<u64, DbError> {
    conn.exec_drop(
        "INSERT INTO job_triggers (job, params, requested_by, requested_at) \
         VALUES (?, ?, ?, UTC_TIMESTAMP(6))",
        (job, params.to_string(), requested_by),
    )
    .await?;
    Ok(conn.last_insert_id().unwrap_or(0))
}

/// A configured job.
#[derive(Clone)]
pub struct JobEntry {
    pub job: Arc<dyn Job>,
    pub schedule: Schedule,
}

/// Why [`Scheduler::run_now`] did not run the job.
#[derive(Debug, thiserror::Error)]
pub enum RunNowError {
    #[error("no job named `{0}`")]
    UnknownJob(String),
    #[error("another instance holds the lease of `{0}` (running it now)")]
    Busy(String),
    #[error(transparent)]
    Job(#[from] JobError),
}

/// One scheduler instance.
#[derive(Clone)]
pub struct Scheduler {
    shared: Shared,
    enc: Option<Arc<dyn Encryptor>>,
    /// `leases.holder` of this instance.
    pub holder: String,
    /// Lease length (from `scheduler.lease_seconds`; tests shorten it).
    pub lease: Duration,
    /// Loop period (from `scheduler.tick_ms`).
    pub tick: Duration,
    jobs: Arc<Vec<JobEntry>>,
    wake: Arc<Notify>,
    metrics: Arc<std::collections::BTreeMap<String, JobMetrics>>,
}

/// The `casd_scheduler_job_*` handles of one job.
struct JobMetrics {
    last_success: metrics::Gauge,
    last_duration: metrics::Gauge,
    failures: metrics::Counter,
    lease_held: metrics::Gauge,
}

impl JobMetrics {
    fn new(m: &crate::metrics::Metrics, e: &JobEntry) -> JobMetrics {
        // Not `job`: Prometheus' own target label, which would clash.
        let l = [("scheduler_job", e.job.name().to_string())];
        let period = match e.schedule {
            Schedule::Every(d) => d.as_secs_f64(),
            Schedule::DailyAt { .. } => 86_400.0,
            Schedule::Manual => 0.0,
        };
        m.gauge(
            "casd_scheduler_job_period_seconds",
            "Configured period of the job (daily = 86400, manual = 0).",
            &l,
        )
        .set(period);
        JobMetrics {
            last_success: m.gauge(
                "casd_scheduler_job_last_success_timestamp_seconds",
                "Unix time at which this instance last finished a run of the job successfully.",
                &l,
            ),
            last_duration: m.gauge(
                "casd_scheduler_job_last_duration_seconds",
                "Duration of the job's last run by this instance.",
                &l,
            ),
            failures: m.counter(
                "casd_scheduler_job_failures_total",
                "Runs of the job by this instance that did not succeed.",
                &l,
            ),
            lease_held: m.gauge(
                "casd_scheduler_lease_held",
                "1 while this instance holds the job's lease (runs it), else 0.",
                &l,
            ),
        }
    }

    fn finished(&self, ok: bool, took: Duration) {
        self.last_duration.set(took.as_secs_f64());
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_success.set(now);
        } else {
            self.failures.increment(1);
        }
    }
}

/// The built-in jobs with their schedules from the configuration.
pub fn builtin_jobs(cfg: &crate::config::Config) -> Vec<JobEntry> {
    let sc = &cfg.scheduler;
    let parse = |s: &str| Schedule::parse(s).unwrap_or(Schedule::Manual);
    vec![
        JobEntry {
            job: Arc::new(purge::PurgeJob),
            schedule: Schedule::Every(Duration::from_secs(sc.purge_interval_s.max(1))),
        },
        JobEntry {
            job: Arc::new(rotation::RotationJob),
            schedule: parse(&sc.rotation_schedule),
        },
        JobEntry {
            job: Arc::new(rotation::RootRotationJob),
            schedule: parse(&sc.root_rotation_schedule),
        },
        JobEntry {
            job: Arc::new(refresh::RefreshJob),
            schedule: parse(&sc.refresh_schedule),
        },
        JobEntry {
            job: Arc::new(revocation::RevocationJob),
            schedule: parse(&sc.revocation_schedule),
        },
    ]
}

impl Scheduler {
    /// The built-in jobs, configured from `shared.cfg`.
    pub fn new(shared: Shared) -> Scheduler {
        let jobs = builtin_jobs(&shared.cfg);
        Scheduler::with_jobs(shared, jobs)
    }

    /// Given jobs (tests add their own).
    pub fn with_jobs(shared: Shared, jobs: Vec<JobEntry>) -> Scheduler {
        let sc = &shared.cfg.scheduler;
        Scheduler {
            enc: shared.encryptor.clone(),
            holder: if sc.instance_id.is_empty() {
                lease::default_holder()
            } else {
                sc.instance_id.clone()
            },
            lease: Duration::from_secs(sc.lease_seconds),
            tick: Duration::from_millis(sc.tick_ms.max(1)),
            metrics: Arc::new(
                jobs.iter()
                    .map(|e| {
                        (
                            e.job.name().to_string(),
                            JobMetrics::new(&shared.metrics, e),
                        )
                    })
                    .collect(),
            ),
            jobs: Arc::new(jobs),
            wake: Default::default(),
            shared,
        }
    }

    pub fn jobs(&self) -> &[JobEntry] {
        &self.jobs
    }

    /// Wakes every job loop of this instance (a trigger was recorded).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Runs every job's loop until shutdown. Aborting this future (a
    /// killed process) leaves the leases to expire.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for e in self.jobs.iter() {
            set.spawn(self.clone().job_loop(e.clone()));
        }
        while let Some(r) = set.join_next().await {
            if let Err(e) = r {
                if e.is_panic() {
                    anyhow::bail!("a scheduler job loop panicked: {e}");
                }
            }
        }
        Ok(())
    }

    async fn job_loop(self, e: JobEntry) {
        let mut failing = false;
        loop {
            if self.shared.shutdown.is_cancelled() {
                break;
            }
            match self.tick_once(&e).await {
                Ok(Some(r)) => {
                    failing = false;
                    let level_ok = r.outcome.as_deref() == Some("ok");
                    if level_ok {
                        tracing::info!(job = %r.job, run = r.id, fence = r.fence, counts = %r.counts.clone().unwrap_or_default(), "job run finished");
                    } else {
                        tracing::warn!(job = %r.job, run = r.id, fence = r.fence, outcome = ?r.outcome, counts = %r.counts.clone().unwrap_or_default(), "job run did not succeed");
                    }
                }
                Ok(None) => failing = false,
                Err(err) => {
                    if !failing {
                        tracing::warn!(job = e.job.name(), "scheduler: {err}; retrying");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.tick) => {}
                _ = self.shared.shutdown.cancelled() => break,
            }
        }
    }

    /// One look at `e`: runs it when it is due and this instance gets its
    /// lease; `Ok(None)` otherwise.
    pub async fn tick_once(&self, e: &JobEntry) -> Result<Option<RunRecord>, JobError> {
        let mut c = self.shared.db.conn().await?;
        if !is_due(&mut c, e).await? {
            return Ok(None);
        }
        drop(c);
        self.execute(e, None).await
    }

    /// Runs `job` now with `params` (no schedule check) if this instance
    /// can take its lease.
    pub async fn run_now(&self, job: &str, params: Value) -> Result<RunRecord, RunNowError> {
        let e = self
            .jobs
            .iter()
            .find(|e| e.job.name() == job)
            .ok_or_else(|| RunNowError::UnknownJob(job.into()))?
            .clone();
        match self.execute(&e, Some(params)).await? {
            Some(r) => Ok(r),
            None => Err(RunNowError::Busy(job.into())),
        }
    }

    /// Takes the lease, re-checks, runs, records, releases.
    async fn execute(
        &self,
        e: &JobEntry,
        forced: Option<Value>,
    ) -> Result<Option<RunRecord>, JobError> {
        let name = e.job.name().to_owned();
        let lname = lease::lease_name(&name);
        let mut c = self.shared.db.conn().await?;
        let Some(fence) = lease::acquire(&mut c, &lname, &self.holder, self.lease).await? else {
            return Ok(None);
        };
        let metrics = self.metrics.get(&name);
        let started = std::time::Instant::now();
        if let Some(m) = metrics {
            m.lease_held.set(1.0);
        }
        let ctx = JobCtx {
            shared: self.shared.clone(),
            enc: self.enc.clone(),
            job: name,
            holder: self.holder.clone(),
            fence,
            run_id: 0,
            params: json!({}),
            cancel: self.shared.shutdown.child_token(),
            lost: Arc::new(AtomicBool::new(false)),
        };
        let (run_id, params) = match start_run(&ctx, &mut c, e, forced).await {
            Ok(Some(started)) => started,
            other => {
                let _ = lease::release(&mut c, &lname, &self.holder, fence).await;
                if let Some(m) = metrics {
                    m.lease_held.set(0.0);
                }
                return other.map(|_| None);
            }
        };
        drop(c);
        let ctx = JobCtx {
            run_id,
            params,
            ..ctx
        };
        // Run, renewing the lease; both in this future, so aborting it (a
        // killed process) stops the renewals too.
        let result = tokio::select! {
            r = e.job.run(&ctx) => r,
            _ = self.renew(&ctx, &lname) => unreachable!("renewal never ends on its own"),
        };
        let ok = result.is_ok();
        let finished = self.finish(&ctx, &lname, result).await;
        if let Some(m) = metrics {
            m.lease_held.set(0.0);
            m.finished(ok && finished.is_ok(), started.elapsed());
        }
        finished.map(Some)
    }

    /// Renews the run's lease every third of its length until dropped; a
    /// lost lease cancels the run (and then waits to be dropped).
    async fn renew(&self, ctx: &JobCtx, lname: &str) {
        let every = self.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let r = match self.shared.db.conn().await {
                Ok(mut c) => lease::renew(&mut c, lname, &self.holder, ctx.fence, self.lease).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job = %ctx.job, fence = ctx.fence, "lease lost; stopping the run");
                    ctx.lost.store(true, Ordering::Relaxed);
                    ctx.cancel.cancel();
                    // Let the job notice and return.
                    std::future::pending::<()>().await;
                }
                // Could not renew (database away): the fence check of
                // the next write decides.
                Err(e) => tracing::warn!(job = %ctx.job, "lease renewal failed: {e}"),
            }
        }
    }

    /// Records the run's end, then releases the lease: runs never overlap.
    async fn finish(
        &self,
        ctx: &JobCtx,
        lname: &str,
        result: Result<Counts, JobError>,
    ) -> Result<RunRecord, JobError> {
        let (outcome, counts) = match result {
            Ok(c) => ("ok", Value::Object(c)),
            Err(err) => (err.outcome(), json!({ "error": err.to_string() })),
        };
        let mut c = self.shared.db.conn().await?;
        c.exec_drop(
            "UPDATE job_runs SET ended_at = UTC_TIMESTAMP(6), outcome = ?, counts = ? WHERE id = ?",
            (outcome, counts.to_string(), ctx.run_id),
        )
        .await?;
        lease::release(&mut c, lname, &self.holder, ctx.fence).await?;
        let rec: Option<RunRow> = c
            .exec_first(
                format!("SELECT {RUN_COLS} FROM job_runs WHERE id = ?"),
                (ctx.run_id,),
            )
            .await?;
        rec.map(run_from_row)
            .ok_or_else(|| JobError::Other("run record vanished".into()))
    }
}

/// The run's first transaction, under the lease: still due (unless
/// forced)? Records the run and takes the pending triggers. Returns the
/// run id and its parameters, `None` when not due any more.
async fn start_run(
    ctx: &JobCtx,
    c: &mut Conn,
    e: &JobEntry,
    forced: Option<Value>,
) -> Result<Option<(u64, Value)>, JobError> {
    let mut tx = ctx.begin(c).await?;
    if forced.is_none() && !is_due(&mut tx, e).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.exec_drop(
        "INSERT INTO job_runs (job, holder, fence, started_at) VALUES (?, ?, ?, UTC_TIMESTAMP(6))",
        (&ctx.job, &ctx.holder, ctx.fence),
    )
    .await?;
    let run_id = tx.last_insert_id().unwrap_or(0);
    let triggers: Vec<Option<String>> = tx
        .exec(
            "SELECT params FROM job_triggers WHERE job = ? AND run_id IS NULL ORDER BY id FOR UPDATE",
            (&ctx.job,),
        )
        .await?;
    if !triggers.is_empty() {
        tx.exec_drop(
            "UPDATE job_triggers SET run_id = ? WHERE job = ? AND run_id IS NULL",
            (run_id, &ctx.job),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Some((run_id, run_params(&triggers, forced.as_ref()))))
}

/// A run's parameters: every trigger's object, in order, then the forced
/// run's; a later key wins. Anything but an object is ignored.
fn run_params(triggers: &[Option<String>], forced: Option<&Value>) -> Value {
    let mut params = serde_json::Map::new();
    let parsed = triggers
        .iter()
        .filter_map(|p| serde_json::from_str(p.as_deref()?).ok());
    for v in parsed.chain(forced.cloned()) {
        if let Value::Object(m) = v {
            params.extend(m);
        }
    }
    Value::Object(params)
}

/// Enabled devices after `after`, in order, at most `limit` (the
/// Scheduler's jobs walk the devices in fenced batches with this cursor).
pub async fn enabled_devices_after(
    tx: &mut Transaction<'_>,
    after: u64,
    limit: u64,
) -> Result<Vec<u64>, JobError> {
    Ok(tx
        .exec(
            "SELECT device_id FROM devices WHERE state = 'enabled' AND device_id > ? \
             ORDER BY device_id LIMIT ?",
            (after, limit),
        )
        .await?)
}

/// Due: by schedule (last run's start, database clock) or by a trigger.
async fn is_due<Q: Queryable>(q: &mut Q, e: &JobEntry) -> Result<bool, JobError> {
    let row: Option<(Option<i64>, i64, u64)> = q
        .exec_first(
            "SELECT (SELECT CAST(UNIX_TIMESTAMP(MAX(started_at)) * 1000 AS SIGNED) FROM job_runs WHERE job = ?), \
             CAST(UNIX_TIMESTAMP(UTC_TIMESTAMP(6)) * 1000 AS SIGNED), \
             (SELECT COUNT(*) FROM job_triggers WHERE job = ? AND run_id IS NULL)",
            (e.job.name(), e.job.name()),
        )
        .await?;
    let Some((last, now, triggers)) = row else {
        return Ok(false);
    };
    Ok(triggers > 0 || e.schedule.due(last, now))
}

/// The database's clock, unix seconds.
pub async fn db_now<Q: Queryable>(q: &mut Q) -> Result<u32, JobError> {
    let now: Option<u64> = q
        .query_first("SELECT CAST(UNIX_TIMESTAMP(UTC_TIMESTAMP()) AS UNSIGNED)")
        .await?;
    Ok(now.unwrap_or(0) as u32)
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// The Scheduler's routes: `GET /jobs`, `POST /jobs/{name}/run`.
pub fn routes(s: Scheduler) -> Router {
    Router::new()
        .route("/jobs", get(list_handler))
        .route("/jobs/{name}/run", post(run_handler))
        .with_state(s)
}

fn db_api_error(e: DbError) -> ApiError {
    if e.is_unavailable() {
        ApiError::unavailable("database")
    } else {
        tracing::error!("scheduler API: {e}");
        ApiError::internal()
    }
}

async fn list_handler(State(s): State<Scheduler>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let mut c = s.shared.db.conn().await.map_err(db_api_error)?;
    let mut jobs = Vec::new();
    for e in s.jobs.iter() {
        let name = e.job.name();
        let runs = recent_runs(&mut c, Some(name), 10)
            .await
            .map_err(db_api_error)?;
        let lease: Option<(String, u64, String)> = c
            .exec_first(
                "SELECT holder, fence, DATE_FORMAT(expires_at, '%Y-%m-%dT%H:%i:%s.%fZ') FROM leases WHERE name = ?",
                (lease::lease_name(name),),
            )
            .await
            .map_err(|e| db_api_error(e.into()))?;
        let pending: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM job_triggers WHERE job = ? AND run_id IS NULL",
                (name,),
            )
            .await
            .map_err(|e| db_api_error(e.into()))?;
        jobs.push(json!({
            "name": name,
            "schedule": e.schedule.to_string(),
            "lease": lease.map(|(holder, fence, expires_at)| json!({"holder": holder, "fence": fence, "expires_at": expires_at})),
            "pending_triggers": pending.unwrap_or(0),
            "runs": runs,
        }));
    }
    Ok(Json(json!({ "instance": s.holder, "jobs": jobs })))
}

async fn run_handler(
    State(s): State<Scheduler>,
    Path(name): Path<String>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::Admin)?;
    if !s.jobs.iter().any(|e| e.job.name() == name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job named `{name}`"),
        ));
    }
    let params: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body must be a JSON object of job parameters (or empty)",
                ))
            }
        }
    };
    let mut c = s.shared.db.conn().await.map_err(db_api_error)?;
    let id = trigger(&mut c, &name, &params, &caller.client_id)
        .await
        .map_err(db_api_error)?;
    s.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": name, "trigger_id": id })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_parameters_merge_in_order_and_a_forced_run_wins() {
        let triggers = [
            Some(r#"{"force":true,"activates_in_s":10}"#.to_string()),
            None,
            Some("not json".to_string()),
            Some("[1]".to_string()),
            Some(r#"{"activates_in_s":20}"#.to_string()),
        ];
        assert_eq!(
            run_params(&triggers, None),
            json!({"force": true, "activates_in_s": 20})
        );
        assert_eq!(
            run_params(&triggers, Some(&json!({"activates_in_s": 30}))),
            json!({"force": true, "activates_in_s": 30})
        );
        assert_eq!(run_params(&[], None), json!({}));
    }

    #[test]
    fn schedules_parse() {
        assert_eq!(
            Schedule::parse("every 90s").unwrap(),
            Schedule::Every(Duration::from_secs(90))
        );
        assert_eq!(
            Schedule::parse("every 100ms").unwrap(),
            Schedule::Every(Duration::from_millis(100))
        );
        assert_eq!(
            Schedule::parse("daily 03:30").unwrap(),
            Schedule::DailyAt {
                hour: 3,
                minute: 30
            }
        );
        assert_eq!(Schedule::parse("manual").unwrap(), Schedule::Manual);
        for bad in ["every", "every 0s", "every 5x", "daily 24:00", "weekly", ""] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn due_rules() {
        let e = Schedule::Every(Duration::from_secs(60));
        assert!(e.due(None, 1_000));
        assert!(!e.due(Some(0), 59_999));
        assert!(e.due(Some(0), 60_000));
        let d = Schedule::DailyAt { hour: 3, minute: 0 };
        let day = 86_400_000;
        let at3 = 3 * 3_600_000;
        // Last run yesterday 03:00, now today 02:59: not yet; 03:00: due.
        assert!(!d.due(Some(at3), day + at3 - 60_000));
        assert!(d.due(Some(at3), day + at3));
        // Ran today after 03:00: not due until tomorrow.
        assert!(!d.due(Some(day + at3 + 5), day + 23 * 3_600_000));
        assert!(!Schedule::Manual.due(None, 5));
    }
}
