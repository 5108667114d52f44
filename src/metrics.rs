//! Prometheus metrics: the registry of one process, the handles each
//! component keeps, and `GET /metrics` on a listener of its own
//! (`[metrics] listen`; docs/metrics.md lists every metric).
//!
//! Crate: `metrics` handles registered directly on a per-process
//! `metrics-exporter-prometheus` recorder, never through the global
//! recorder. Why this pair rather than `prometheus-client`:
//! - no global state: two headends in one test binary (every integration
//!   test shares one) keep counters of their own;
//! - it writes the classic Prometheus text format, which `promtool check
//!   metrics` lints clean, whereas prometheus-client writes OpenMetrics
//!   only, whose `# TYPE foo counter` + `foo_total` families promtool's
//!   parser reports as "no help text";
//! - `metrics-process` gives the standard `process_*` metrics for it.
//!
//! Cost on hot paths: a component resolves its handles (name + labels)
//! once at start; a `Counter`/`Gauge` is then an `Arc` of an atomic, so an
//! update is one relaxed atomic operation, with no label lookup and no
//! lock. Values that live elsewhere already (the players' counters, the
//! pool's, the committer queue's length) are read at scrape time by hooks
//! ([`Metrics::on_scrape`]) and cost nothing between scrapes.
//!
//! Label values come from fixed lists only (route templates, numeric
//! statuses, the API's error codes, configured output and job names):
//! never a client string, a token or a key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::db::Db;

/// `[metrics] listen` when the configuration says nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// The classic text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Buckets of every latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of `casd_sms_commit_round_size` (commands per round).
const ROUND_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// How often the database probe runs.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

static META: Metadata<'static> = Metadata::new("casd", Level::INFO, Some("casd::metrics"));

type Hook = Box<dyn Fn() + Send + Sync>;

/// One process's metrics. `None` inside when metrics are off: every
/// handle is then a no-op and nothing is registered.
pub struct Metrics {
    inner: Option<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    process: metrics_process::Collector,
    hooks: Mutex<Vec<Hook>>,
}

/// A label list as components write it.
pub type Labels<'a> = &'a [(&'static str, String)];

impl Metrics {
    /// A registry with `casd_build_info` and the process metrics.
    pub fn new() -> Arc<Metrics> {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("casd_sms_commit_round_size".into()),
                    ROUND_BUCKETS,
                )
            });
        // The bucket lists are non-empty constants: the only error the
        // builder has cannot happen; if it did, metrics would be off.
        let Ok(builder) = builder else {
            tracing::error!("metrics: bad histogram buckets; metrics are off");
            return Metrics::off();
        };
        let recorder = builder.build_recorder();
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || process.describe());
        let m = Metrics {
            inner: Some(Inner {
                recorder,
                process,
                hooks: Mutex::new(Vec::new()),
            }),
        };
        let build = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("git_sha", env!("BUILD_GIT_SHA").to_string()),
        ];
        m.gauge(
            "casd_build_info",
            "casd's version and git commit (always 1).",
            &build,
        )
        .set(1.0);
        Arc::new(m)
    }

    /// Metrics turned off (`listen = ""`): every handle a no-op.
    pub fn off() -> Arc<Metrics> {
        Arc::new(Metrics { inner: None })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    pub fn counter(&self, name: &'static str, help: &'static str, labels: Labels) -> Counter {
        let Some(i) = &self.inner else {
            return Counter::noop();
        };
        i.recorder
            .describe_counter(KeyName::from_const_str(name), None, help.into());
        i.recorder.register_counter(&key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, help: &'static str, labels: Labels) -> Gauge {
        let Some(i) = &self.inner else {
            return Gauge::noop();
        };
        i.recorder
            .describe_gauge(KeyName::from_const_str(name), None, help.into());
        i.recorder.register_gauge(&key(name, labels), &META)
    }

    pub fn histogram(&self, name: &'static str, help: &'static str, labels: Labels) -> Histogram {
        let Some(i) = &self.inner else {
            return Histogram::noop();
        };
        i.recorder
            .describe_histogram(KeyName::from_const_str(name), None, help.into());
        i.recorder.register_histogram(&key(name, labels), &META)
    }

    /// Runs `f` before each scrape (to copy values kept elsewhere into
    /// gauges and counters). Not run at all when metrics are off.
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Some(i) = &self.inner {
            if let Ok(mut h) = i.hooks.lock() {
                h.push(Box::new(f));
            }
        }
    }

    /// The text exposition of every metric, hooks run first.
    pub fn render(&self) -> String {
        let Some(i) = &self.inner else {
            return String::new();
        };
        metrics::with_local_recorder(&i.recorder, || i.process.collect());
        if let Ok(hooks) = i.hooks.lock() {
            for f in hooks.iter() {
                f();
            }
        }
        i.recorder.handle().render()
    }
}

fn key(name: &'static str, labels: Labels) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect();
    Key::from_parts(name, labels)
}

/// Serves `GET /metrics` (404 elsewhere, no token) on `listener` until
/// `shutdown` (mini-redis style: the caller binds).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    crate::http::serve(listener, router, shutdown).await
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    // Hooks and the process collector read /proc and atomics: quick, but
    // not async; keep them off the runtime's worker anyway.
    let body = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// `casd_database_up` from a ping every second, and
/// `casd_database_pool_connections_in_use` from the pool's own counters
/// at scrape time. Runs until `shutdown`.
pub fn watch_database(m: &Metrics, db: Db, shutdown: CancellationToken) {
    if !m.is_on() {
        return;
    }
    let in_use = m.gauge(
        "casd_database_pool_connections_in_use",
        "Connections of the pool lent out to a role at scrape time.",
        &[],
    );
    let semi_sync = m.gauge(
        "casd_database_semi_sync_active",
        "1 while the primary's semi-synchronous replication is active, 0 once it fell back to asynchronous (rpl_semi_sync_master_timeout passed without a replica's ack); NaN where semi-sync is not enabled on the primary.",
        &[],
    );
    let watched = db.clone();
    m.on_scrape(move || {
        use std::sync::atomic::Ordering::Relaxed;
        // The pool of the server written to now (it changes at a failover).
        let pool = watched.pool().metrics();
        let open = pool.connection_count.load(Relaxed);
        let idle = pool.connections_in_pool.load(Relaxed);
        in_use.set(open.saturating_sub(idle) as f64);
        match watched.semi_sync() {
            Some(crate::db::SemiSync::Active) => semi_sync.set(1.0),
            Some(crate::db::SemiSync::FellBack) => semi_sync.set(0.0),
            None => semi_sync.set(f64::NAN),
        }
    });
    let up = m.gauge(
        "casd_database_up",
        "1 when the database answered the last ping (every second), else 0.",
        &[],
    );
    every(PROBE_INTERVAL, shutdown, move || {
        let (db, up) = (db.clone(), up.clone());
        async move {
            let ping = tokio::time::timeout(PROBE_INTERVAL, db.ping()).await;
            up.set(if matches!(ping, Ok(Ok(()))) { 1.0 } else { 0.0 });
        }
    });
}

/// Runs `refresh` now and every `every` until `shutdown`, for values read
/// from the database by one task (never per item).
pub fn every<F, Fut>(every: Duration, shutdown: CancellationToken, mut refresh: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            refresh().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The SMS-CAS interface's handles, resolved at start for every route and
/// the statuses it answers.
#[derive(Clone)]
pub struct SmsMetrics {
    m: Arc<Metrics>,
    routes: Arc<Vec<RouteMetrics>>,
    pub round_size: Histogram,
}

struct RouteMetrics {
    path: &'static str,
    duration: Histogram,
    by_status: Vec<(u16, Counter)>,
}

/// The statuses the command routes answer (docs/sms-api.md "Errors");
/// another one is registered when first seen.
const SMS_STATUSES: [u16; 12] = [200, 400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 503];
const REQUESTS_HELP: &str = "SMS commands answered, by route and HTTP status.";

impl SmsMetrics {
    pub fn new(m: &Arc<Metrics>, paths: &[&'static str]) -> SmsMetrics {
        let routes = paths
            .iter()
            .map(|&path| RouteMetrics {
                path,
                duration: m.histogram(
                    "casd_sms_request_duration_seconds",
                    "Time from a command's arrival to its answer, by route.",
                    &[("path", path.into())],
                ),
                by_status: SMS_STATUSES
                    .iter()
                    .map(|&s| (s, requests(m, path, s)))
                    .collect(),
            })
            .collect();
        let round_size = m.histogram(
            "casd_sms_commit_round_size",
            "Commands stored per group-commit round.",
            &[],
        );
        SmsMetrics {
            m: m.clone(),
            routes: Arc::new(routes),
            round_size,
        }
    }

    /// One command answered on `path` with `status` after `elapsed`.
    pub fn answered(&self, path: &str, status: u16, elapsed: Duration) {
        let Some(r) = self.routes.iter().find(|r| r.path == path) else {
            return;
        };
        r.duration.record(elapsed.as_secs_f64());
        match r.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.increment(1),
            None => requests(&self.m, r.path, status).increment(1),
        }
    }

    /// A command refused with the API's error `code` (a fixed string).
    pub fn refused(&self, code: &'static str) {
        self.m
            .counter(
                "casd_sms_refusals_total",
                REFUSALS_HELP,
                &[("code", code.into())],
            )
            .increment(1);
    }

    /// `casd_sms_commands_waiting` read from `waiting` at scrape time.
    pub fn watch_waiting(&self, waiting: impl Fn() -> usize + Send + Sync + 'static) {
        let g = self.m.gauge(
            "casd_sms_commands_waiting",
            "Commands queued for the group committer at scrape time.",
            &[],
        );
        self.m.on_scrape(move || g.set(waiting() as f64));
    }
}

const REFUSALS_HELP: &str = "SMS commands refused, by the API's error code.";

fn requests(m: &Metrics, path: &'static str, status: u16) -> Counter {
    m.counter(
        "casd_sms_requests_total",
        REQUESTS_HELP,
        &[("path", path.into()), ("status", status.to_string())],
    )
}
