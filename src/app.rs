//! Assembling a headend process: the roles chosen for this process, their
//! routes on one router, their background tasks, and an orderly stop.
//!
//! [`run`] takes its listener from outside (mini-redis style) so tests bind
//! port 0 and learn the address before the headend starts.

use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role};
use crate::db::Db;
use crate::encryptor::{Encryptor, LocalEncryptor};
use crate::http::{self, Readiness};
use crate::keystore::KeyStore;

/// Everything a role needs from the process it runs in.
#[derive(Clone)]
pub struct Shared {
    pub cfg: std::sync::Arc<Config>,
    pub db: Db,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    /// Rung by the SMS-CAS interface after it commits a work item, so an
    /// EMMG in this process picks it up at once instead of at its next poll.
    pub work_ready: std::sync::Arc<tokio::sync::Notify>,
    /// Rung by the EMMG (and Scheduler) after committing carousel changes,
    /// so a Cycler in this process reads `carousel_events` at once.
    pub emms_ready: std::sync::Arc<tokio::sync::Notify>,
    /// Token verification, client status and rate limits of this process
    /// (every route is already behind it via `auth::protect`; roles use it
    /// for e.g. `auth.settings()`).
    pub auth: crate::auth::Auth,
    /// The Encryptor the EMMG and Scheduler call: local when the encryptor
    /// role runs in this process, remote otherwise; `None` when no role here
    /// needs one.
    pub encryptor: Option<std::sync::Arc<dyn Encryptor>>,
    /// This process's metrics registry (a no-op one when `[metrics]
    /// listen` is off); roles resolve their handles from it at start.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// How long roles get to finish in-flight work after shutdown is asked.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the database pool and applies migrations if configured.
pub async fn open_db(cfg: &Config) -> anyhow::Result<Db> {
    let db = Db::with_servers(
        cfg.database.url.expose(),
        &crate::db::DbTls::from_config(&cfg.database),
        &cfg.database.servers,
        cfg.database.pool_max,
        Duration::from_secs(cfg.database.connect_timeout_s),
    )?;
    db.ping().await.with_context(|| {
        format!(
            "cannot reach the database at {} (database.url, database.servers)",
            db.display()
        )
    })?;
    Ok(db)
}

/// Loads the root key from the configured key source and opens the key
/// store; creates PMK v1 / GLK v1 on a fresh store.
pub async fn open_keystore(cfg: &Config, db: &Db) -> anyhow::Result<KeyStore> {
    use hw::key_source::{FileKeySource, KeySource};
    let source = FileKeySource::load(&cfg.keys.root_key_file)
        .map_err(|e| anyhow::anyhow!("{e} (keys.root_key_file; `casd keys init` creates it)"))?;
    let root = source.root_key().map_err(|e| anyhow::anyhow!("{e}"))?;
    let opened = KeyStore::open(db.clone(), casd_wire::crypto::Key128::from_bytes(*root)).await;
    // After a root rotation the store opens under keys.next_root_key_file.
    let opened = match (opened, &cfg.keys.next_root_key_file) {
        (Err(crate::keystore::KeyStoreError::WrongRoot { .. }), Some(next)) => {
            let next_root = FileKeySource::load(next)
                .and_then(|s| s.root_key())
                .map_err(|e| anyhow::anyhow!("{e} (keys.next_root_key_file)"))?;
            tracing::warn!("the key store is sealed under keys.next_root_key_file: set keys.root_key_file to it");
            KeyStore::open(
                db.clone(),
                casd_wire::crypto::Key128::from_bytes(*next_root),
            )
            .await
        }
        (r, _) => r,
    };
    let ks = opened.context("opening the key store")?;
    let created = ks.init().await.context("initialising the key store")?;
    for k in created {
        tracing::info!(kind = %k, "created first key version");
    }
    Ok(ks)
}

/// The Encryptor of another process (`peers.encryptor_url`), called with
/// this process's client credentials (`peers.client`).
fn remote_encryptor(cfg: &Config) -> anyhow::Result<crate::encryptor::RemoteEncryptor> {
    let url = cfg.peers.encryptor_url.as_deref().ok_or_else(|| {
        anyhow::anyhow!("the emmg and scheduler roles need the encryptor: run it in this process, or set peers.encryptor_url and peers.client")
    })?;
    let client = cfg.peers.client.clone().ok_or_else(|| {
        anyhow::anyhow!("peers.client: client credentials are needed to call peers.encryptor_url")
    })?;
    let tokens = crate::auth::client::TokenClient::new(client)
        .map_err(|e| anyhow::anyhow!("peers.client: {e}"))?;
    Ok(crate::encryptor::RemoteEncryptor::new(url, tokens))
}

async fn open_local_encryptor(
    cfg: &Config,
    db: &Db,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<LocalEncryptor> {
    let ks = open_keystore(cfg, db).await?;
    Ok(LocalEncryptor::new(ks, cfg.cas.max_section_bytes)
        .with_next_root_file(cfg.keys.next_root_key_file.clone())
        .with_transport_key(load_transport_key(cfg.keys.transport_key_file.as_deref())?)
        .with_metrics(metrics))
}

/// The vendor transport key of personalization exports, from a file in
/// the root key file's format (docs/format.md §6, §9); `None` when unset.
pub fn load_transport_key(
    path: Option<&std::path::Path>,
) -> anyhow::Result<Option<casd_wire::crypto::Key128>> {
    use hw::key_source::{FileKeySource, KeySource};
    let Some(path) = path else { return Ok(None) };
    let key = FileKeySource::load(path)
        .and_then(|s| s.root_key())
        .map_err(|e| anyhow::anyhow!("{e} (keys.transport_key_file)"))?;
    Ok(Some(casd_wire::crypto::Key128::from_bytes(*key)))
}

/// Runs `roles` until `shutdown` is cancelled, with the metrics endpoint
/// on `[metrics] listen` (bound here; nothing when it is "").
pub async fn run(
    cfg: Config,
    roles: Vec<Role>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = match cfg.metrics.listen_addr() {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (metrics.listen; \"\" turns metrics off)")
        })?),
        None => None,
    };
    run_with_metrics(cfg, roles, listener, metrics, shutdown).await
}

/// [`run`] with the metrics listener taken from outside (`None`: metrics
/// off), so tests bind port 0 and learn the address first.
pub async fn run_with_metrics(
    cfg: Config,
    roles: Vec<Role>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = open_db(&cfg).await?;
    db.watch(shutdown.clone());
    if cfg.database.migrate_on_start {
        let applied = db.migrate().await.context("applying migrations")?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
    }
    let readiness = Readiness::new(&roles);
    // TLS files are read before anything listens: a bad path stops start-up.
    let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::load_server_config(cert, key)?),
        _ => None,
    };
    let auth = start_auth(&cfg, &db).await;
    let metrics = start_metrics(metrics_listener, &db, &shutdown)?;
    if let Some(at) = cfg
        .api
        .tls_cert
        .as_deref()
        .and_then(crate::tls::not_after_unix)
    {
        metrics
            .gauge(
                "casd_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the API's TLS certificate (Unix seconds).",
                &[],
            )
            .set(at as f64);
    }
    let encryptor = encryptor_for(&cfg, &db, &roles, &metrics).await?;
    let shared = Shared {
        cfg: std::sync::Arc::new(cfg),
        db: db.clone(),
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        work_ready: Default::default(),
        emms_ready: Default::default(),
        auth: auth.clone(),
        encryptor,
        metrics,
    };
    let (router, tasks) = start_roles(&roles, &shared).await?;
    log_start(&listener, &roles, &shared, tls.is_some())?;
    let server = match tls {
        Some(tls) => tokio::spawn(crate::tls::serve_tls(
            listener,
            router,
            tls,
            shutdown.clone(),
        )),
        None => tokio::spawn(http::serve(listener, router, shutdown.clone())),
    };
    let watchdog = start_watchdog(readiness.clone(), shutdown.clone());
    let failure = wait_and_drain(&shutdown, tasks, server).await;
    db.close().await;
    if let Some(w) = watchdog {
        let _ = w.stopping();
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The process's metrics and their endpoint on `listener` (metrics off
/// without one), with the database probe.
fn start_metrics(
    listener: Option<TcpListener>,
    db: &Db,
    shutdown: &CancellationToken,
) -> anyhow::Result<std::sync::Arc<crate::metrics::Metrics>> {
    let Some(listener) = listener else {
        return Ok(crate::metrics::Metrics::off());
    };
    let metrics = crate::metrics::Metrics::new();
    crate::metrics::watch_database(&metrics, db.clone(), shutdown.clone());
    tracing::info!(addr = %listener.local_addr()?, "metrics at GET /metrics");
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        shutdown.clone(),
    ));
    Ok(metrics)
}

/// The process's authentication context, with the verification keys
/// loaded if the database has them yet (a missing signing key only makes
/// `POST /oauth/token` answer 503, said at start).
async fn start_auth(cfg: &Config, db: &Db) -> crate::auth::Auth {
    let auth = crate::auth::Auth::new(
        db.clone(),
        crate::auth::AuthSettings::from_config(&cfg.auth),
    );
    match auth.refresh_keys().await {
        Ok(n) => tracing::debug!(keys = n, "token verification keys loaded"),
        Err(e) => tracing::warn!("cannot load token verification keys yet: {e}"),
    }
    if cfg.auth.token_endpoint {
        if let Err(e) = crate::auth::keys::load_signing_key(&cfg.auth.signing_key_file) {
            tracing::warn!("POST /oauth/token will answer 503 until this is fixed: {e}");
        }
    }
    auth
}

/// The Encryptor the roles use: this process's own when it runs the
/// Encryptor role, else the remote one for the roles that need one.
async fn encryptor_for(
    cfg: &Config,
    db: &Db,
    roles: &[Role],
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<Option<std::sync::Arc<dyn Encryptor>>> {
    if roles.contains(&Role::Encryptor) {
        return Ok(Some(std::sync::Arc::new(
            open_local_encryptor(cfg, db, metrics).await?,
        )));
    }
    if roles.contains(&Role::Emmg) || roles.contains(&Role::Scheduler) {
        return Ok(Some(std::sync::Arc::new(remote_encryptor(cfg)?)));
    }
    Ok(None)
}

/// Starts every role: the process's router (every role's routes behind
/// authentication) and the roles' tasks.
async fn start_roles(
    roles: &[Role],
    shared: &Shared,
) -> anyhow::Result<(Router, JoinSet<anyhow::Result<()>>)> {
    let mut router: Router = http::health_routes(shared.db.clone(), shared.readiness.clone());
    if shared.cfg.auth.token_endpoint {
        router = router.merge(crate::auth::endpoint::routes(shared.auth.clone()));
    }
    // Routes whose handlers check the caller themselves and record refused
    // requests (the SMS role) go behind `auth::attach`; all others behind
    // `auth::protect`.
    let mut self_checking: Router = Router::new();
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for role in roles {
        let (routes, task) = start_role(*role, shared).await?;
        if let Some(r) = routes {
            if *role == Role::Sms {
                self_checking = self_checking.merge(r);
            } else {
                router = router.merge(r);
            }
        }
        if let Some(t) = task {
            tasks.spawn(t);
        }
    }
    // Bearer token, enabled client and rate limit on every route but
    // auth::PUBLIC_PATHS; the body limit everywhere (the
    // SMS routes apply it themselves).
    let auth = shared.auth.clone();
    let router = crate::auth::protect(router, auth.clone(), shared.cfg.api.body_limit)
        .merge(crate::auth::attach(self_checking, auth));
    Ok((router, tasks))
}

fn log_start(
    listener: &TcpListener,
    roles: &[Role],
    shared: &Shared,
    tls: bool,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(%addr, %scheme, roles = %names.join(","), database = %shared.db.display(), "casd running");
    if roles.contains(&Role::Cycler) {
        for o in &shared.cfg.cycler.outputs {
            tracing::info!(output = %o.name, destination = %o.destination, pid = o.pid, bitrate = o.bitrate, "carousel output");
        }
    }
    Ok(())
}

/// Waits for the shutdown signal or a role's failure (a role task that
/// fails brings the process down; systemd restarts it), then lets the
/// roles and the server drain for at most [`DRAIN_TIMEOUT`]. Returns the
/// failure, if any.
async fn wait_and_drain(
    shutdown: &CancellationToken,
    mut tasks: JoinSet<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<impl Sized>,
) -> Option<anyhow::Error> {
    let mut failure = None;
    tokio::select! {
        // Shutdown first: roles end by themselves once it is asked, and
        // that is not a failure.
        biased;
        _ = shutdown.cancelled() => {}
        Some(res) = tasks.join_next() => {
            failure = Some(match res {
                Ok(Ok(())) => anyhow::anyhow!("a role stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("a role panicked: {e}"),
            });
            shutdown.cancel();
        }
    }
    tracing::info!("draining");
    let drain = async {
        while let Some(res) = tasks.join_next().await {
            if let Ok(Err(e)) = res {
                tracing::error!("role stopped with error: {e:#}");
            }
        }
        let _ = server.await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("roles did not finish within {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    failure
}

/// systemd integration when run under `Type=notify` (NOTIFY_SOCKET set):
/// READY=1 once every role reports ready, WATCHDOG=1 at half the
/// configured interval from the runtime (a stalled runtime stops the pings
/// and systemd restarts the process), STOPPING=1 at shutdown.
fn start_watchdog(
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Option<std::sync::Arc<dyn hw::Watchdog>> {
    let wd: std::sync::Arc<dyn hw::Watchdog> = match hw::watchdog::SystemdWatchdog::from_env() {
        Ok(Some(w)) => std::sync::Arc::new(w),
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("systemd notify socket unusable: {e}");
            return None;
        }
    };
    let w = wd.clone();
    tokio::spawn(async move {
        let tick = w
            .ping_interval()
            .map(|i| i / 2)
            .unwrap_or(Duration::from_secs(5));
        let mut ready_sent = false;
        loop {
            if !ready_sent && readiness.pending().is_empty() {
                ready_sent = w.ready().is_ok();
            }
            if w.ping_interval().is_some() {
                let _ = w.ping();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(if ready_sent { tick } else { tick.min(Duration::from_millis(200)) }) => {}
            }
        }
    });
    Some(wd)
}

type RoleTask = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Starts one role: its routes (if it serves any) and its background task.
/// Roles without a task are ready at once; a role with a task marks itself
/// ready when it is (the Cycler after loading the carousel).
async fn start_role(
    role: Role,
    shared: &Shared,
) -> anyhow::Result<(Option<Router>, Option<RoleTask>)> {
    match role {
        Role::Encryptor => {
            let enc = shared
                .encryptor
                .clone()
                .ok_or_else(|| anyhow::anyhow!("encryptor role without a key store"))?;
            crate::encryptor::watch_keys(shared);
            shared.readiness.started(role);
            Ok((Some(crate::encryptor::routes(enc)), None))
        }
        Role::Cycler => Ok((None, Some(Box::pin(crate::cycler::run(shared.clone()))))),
        Role::Sms => {
            shared.readiness.started(role);
            Ok((Some(crate::sms::routes(shared.clone())), None))
        }
        Role::Emmg => {
            shared.readiness.started(role);
            Ok((None, Some(Box::pin(crate::emmg::run(shared.clone())))))
        }
        Role::Scheduler => {
            let s = crate::scheduler::Scheduler::new(shared.clone());
            crate::scheduler::rotation::watch_next_rotation(shared);
            crate::plan::watch(shared);
            shared.readiness.started(role);
            Ok((
                Some(crate::scheduler::routes(s.clone())),
                Some(Box::pin(s.run())),
            ))
        }
    }
}
