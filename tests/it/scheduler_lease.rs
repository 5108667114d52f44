//! Scheduler leases against a real MariaDB: two instances run every job
//! once per period without overlap, killing the holder hands the job over
//! within the lease time, and a paused old holder cannot write.

use casd::app::Shared;
use std::sync::Arc;
use std::time::Duration;

use casd::db::Db;
use casd::encryptor::BoxFuture;
use casd::scheduler::{Counts, Job, JobCtx, JobEntry, JobError, RunRecord, Schedule, Scheduler};
use casd::testing::TestDb;
use mysql_async::prelude::*;
use tokio::sync::Notify;

/// Guard against a hung test (not a synchronisation).
const LIMIT: Duration = Duration::from_secs(60);

fn shared(t: &TestDb) -> Shared {
    let cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    // A pool of its own, as another process would have.
    let db = Db::new(&t.url, 8, Duration::from_secs(5)).unwrap();
    casd::testing::shared(cfg, db.clone(), None)
}

/// Counts its runs with a fenced write.
struct Probe;
impl Job for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(async move {
            let mut c = ctx.conn().await?;
            let mut tx = ctx.begin(&mut c).await?;
            tx.exec_drop(
                "INSERT INTO scheduler_state (name, value, updated_at) VALUES ('probe', '1', UTC_TIMESTAMP(6)) \
                 ON DUPLICATE KEY UPDATE value = value + 1",
                (),
            )
            .await?;
            tx.commit().await?;
            Ok(Counts::new())
        })
    }
}

/// Records that it started, then holds the job until the run is cancelled.
struct Hold;
impl Job for Hold {
    fn name(&self) -> &str {
        "hold"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(async move {
            ctx.cancel.cancelled().await;
            ctx.check()?;
            Ok(Counts::new())
        })
    }
}

/// Writes a marker, waits for its gate (ignoring cancellation, like a
/// paused process), then tries to write a second marker.
struct Gated {
    tag: &'static str,
    gate: Option<Arc<Notify>>,
    started: Arc<Notify>,
}
impl Job for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(async move {
            let mark = |n: &'static str| async move {
                let mut c = ctx.conn().await?;
                let mut tx = ctx.begin(&mut c).await?;
                tx.exec_drop(
                    "INSERT INTO scheduler_state (name, value, updated_at) VALUES (?, ?, UTC_TIMESTAMP(6))",
                    (format!("{}-{n}", self.tag), ctx.fence.to_string()),
                )
                .await?;
                tx.commit().await?;
                Ok::<_, JobError>(())
            };
            mark("1").await?;
            self.started.notify_one();
            if let Some(g) = &self.gate {
                g.notified().await;
            }
            mark("2").await?;
            Ok(Counts::new())
        })
    }
}

fn every(ms: u64) -> Schedule {
    Schedule::Every(Duration::from_millis(ms))
}

fn scheduler(s: Shared, holder: &str, jobs: Vec<JobEntry>, lease: Duration) -> Scheduler {
    let mut sch = Scheduler::with_jobs(s, jobs);
    sch.holder = holder.into();
    sch.lease = lease;
    sch.tick = Duration::from_millis(20);
    sch
}

async fn runs(db: &Db, job: &str) -> Vec<RunRecord> {
    let mut c = db.conn().await.unwrap();
    let mut r = casd::scheduler::recent_runs(&mut c, Some(job), 10_000)
        .await
        .unwrap();
    r.reverse();
    r
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finished runs never overlap, each starts a period after the previous
/// one, fences grow.
fn assert_serial(runs: &[RunRecord], period_ms: i64) {
    let done: Vec<&RunRecord> = runs.iter().filter(|r| r.ended_us.is_some()).collect();
    for w in done.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(
            b.started_us >= a.ended_us.unwrap(),
            "runs overlap: {a:?} / {b:?}"
        );
        assert!(
            b.started_us - a.started_us >= period_ms * 1000,
            "run started before the period passed: {a:?} / {b:?}"
        );
        assert!(b.fence > a.fence, "fence did not grow: {a:?} / {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_every_job_once_per_period() {
    let t = TestDb::new().await;
    let (sa, sb) = (shared(&t), shared(&t));
    let jobs = || {
        vec![
            JobEntry {
                job: Arc::new(Probe),
                schedule: every(100),
            },
            JobEntry {
                job: Arc::new(casd::scheduler::purge::PurgeJob),
                schedule: every(100),
            },
        ]
    };
    let lease = Duration::from_secs(2);
    let a = tokio::spawn(scheduler(sa.clone(), "A", jobs(), lease).run());
    let b = tokio::spawn(scheduler(sb.clone(), "B", jobs(), lease).run());
    wait_for("12 runs of each job", async || {
        runs(&t.db, "probe").await.len() >= 12 && runs(&t.db, "purge").await.len() >= 12
    })
    .await;
    sa.shutdown.cancel();
    sb.shutdown.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    for job in ["probe", "purge"] {
        let r = runs(&t.db, job).await;
        // The last run may have been stopped by the shutdown.
        let (last, before) = r.split_last().unwrap();
        assert!(
            before.iter().all(|r| r.outcome.as_deref() == Some("ok")),
            "{r:?}"
        );
        assert!(
            matches!(last.outcome.as_deref(), Some("ok" | "cancelled")),
            "{last:?}"
        );
        assert_serial(&r, 100);
    }
    let probe = runs(&t.db, "probe").await;
    let mut c = t.db.conn().await.unwrap();
    let count: Option<String> = c
        .query_first("SELECT value FROM scheduler_state WHERE name = 'probe'")
        .await
        .unwrap();
    assert_eq!(
        count.unwrap().parse::<usize>().unwrap(),
        probe.len(),
        "every run wrote exactly once"
    );
    let holders: std::collections::BTreeSet<&str> =
        probe.iter().map(|r| r.holder.as_str()).collect();
    eprintln!("probe runs: {} by {:?}", probe.len(), holders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holder_hands_the_job_over_within_the_lease() {
    let t = TestDb::new().await;
    let (sa, sb) = (shared(&t), shared(&t));
    let lease = Duration::from_secs(1);
    let jobs = || {
        vec![
            JobEntry {
                job: Arc::new(Hold),
                schedule: every(50),
            },
            JobEntry {
                job: Arc::new(Probe),
                schedule: every(50),
            },
        ]
    };
    let a = tokio::spawn(scheduler(sa.clone(), "A", jobs(), lease).run());
    let b = tokio::spawn(scheduler(sb.clone(), "B", jobs(), lease).run());
    wait_for("a holder of `hold`", async || {
        !runs(&t.db, "hold").await.is_empty()
    })
    .await;
    // Both run for more than two lease lengths: the holder renews, the
    // other never takes the job over.
    let before = runs(&t.db, "probe").await.len();
    wait_for("probe runs for > 2 leases", async || {
        runs(&t.db, "probe").await.len() >= before + 40
    })
    .await;
    let first = runs(&t.db, "hold").await;
    assert_eq!(first.len(), 1, "taken over while renewed: {first:?}");
    let first = first[0].clone();
    assert!(first.ended_us.is_none());

    // Kill the holder (no release, no renewal, no record of the end).
    let mut c = t.db.conn().await.unwrap();
    let killed_at: Option<i64> = c
        .query_first("SELECT CAST(UNIX_TIMESTAMP(UTC_TIMESTAMP(6)) * 1000000 AS SIGNED)")
        .await
        .unwrap();
    let killed_at = killed_at.unwrap();
    let (killed, survivor, survivor_task) = if first.holder == "A" {
        a.abort();
        ("A", sb.clone(), b)
    } else {
        b.abort();
        ("B", sa.clone(), a)
    };
    wait_for("the survivor runs `hold`", async || {
        runs(&t.db, "hold").await.len() >= 2
    })
    .await;
    let r = runs(&t.db, "hold").await;
    let second = &r[1];
    assert_ne!(second.holder, killed);
    assert!(second.fence > first.fence, "{first:?} / {second:?}");
    let handover_ms = (second.started_us - killed_at) / 1000;
    eprintln!("hand-over after {handover_ms} ms (lease 1000 ms)");
    assert!(
        handover_ms <= 1000 + 1000,
        "hand-over took {handover_ms} ms with a 1000 ms lease"
    );
    survivor.shutdown.cancel();
    survivor_task.await.unwrap().unwrap();
    let last = runs(&t.db, "hold").await;
    assert_eq!(last[1].outcome.as_deref(), Some("cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_holder_cannot_write_after_losing_the_lease() {
    let t = TestDb::new().await;
    let (sa, sb) = (shared(&t), shared(&t));
    let gate = Arc::new(Notify::new());
    let a_started = Arc::new(Notify::new());
    let a = scheduler(
        sa,
        "A",
        vec![JobEntry {
            job: Arc::new(Gated {
                tag: "A",
                gate: Some(gate.clone()),
                started: a_started.clone(),
            }),
            schedule: Schedule::Manual,
        }],
        // Long: A does not renew during the test; it is "paused".
        Duration::from_secs(600),
    );
    let b = scheduler(
        sb,
        "B",
        vec![JobEntry {
            job: Arc::new(Gated {
                tag: "B",
                gate: None,
                started: Arc::new(Notify::new()),
            }),
            schedule: Schedule::Manual,
        }],
        Duration::from_secs(600),
    );
    let run_a = tokio::spawn(async move { a.run_now("gated", serde_json::json!({})).await });
    a_started.notified().await;
    // While A holds the lease, B cannot take it.
    assert!(matches!(
        b.run_now("gated", serde_json::json!({})).await,
        Err(casd::scheduler::RunNowError::Busy(_))
    ));
    // A's lease runs out (a pause longer than the lease) and B takes over.
    let mut c = t.db.conn().await.unwrap();
    c.query_drop("UPDATE leases SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
        .await
        .unwrap();
    let rb = b.run_now("gated", serde_json::json!({})).await.unwrap();
    assert_eq!(rb.outcome.as_deref(), Some("ok"));
    // A wakes up and tries its second write.
    gate.notify_one();
    let ra = run_a.await.unwrap().unwrap();
    assert_eq!(ra.outcome.as_deref(), Some("fenced"), "{ra:?}");
    assert!(rb.fence > ra.fence);
    let names: Vec<String> = c
        .query("SELECT name FROM scheduler_state ORDER BY name")
        .await
        .unwrap();
    assert_eq!(
        names,
        vec!["A-1", "B-1", "B-2"],
        "A wrote after losing the lease"
    );
}
