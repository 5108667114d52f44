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
use crate::http::{self, Readiness};

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
}

/// How long roles get to finish in-flight work after shutdown is asked.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the database pool and applies migrations if configured.
pub async fn open_db(cfg: &Config) -> anyhow::Result<Db> {
    let db = Db::new(
        cfg.database.url.expose(),
        cfg.database.pool_max,
        Duration::from_secs(cfg.database.connect_timeout_s),
    )?;
    db.ping().await.with_context(|| {
        format!(
            "cannot reach the database at {} (database.url)",
            db.display()
        )
    })?;
    Ok(db)
}

/// Runs `roles` until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    roles: Vec<Role>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = open_db(&cfg).await?;
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
    let shared = Shared {
        cfg: std::sync::Arc::new(cfg),
        db: db.clone(),
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        work_ready: Default::default(),
        emms_ready: Default::default(),
        auth: auth.clone(),
    };

    let mut router: Router = http::health_routes(db.clone(), readiness.clone());
    if shared.cfg.auth.token_endpoint {
        router = router.merge(crate::auth::endpoint::routes(auth.clone()));
    }
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for role in &roles {
        let (routes, task) = start_role(*role, &shared).await?;
        if let Some(r) = routes {
            router = router.merge(r);
        }
        if let Some(t) = task {
            tasks.spawn(t);
        }
    }

    let addr = listener.local_addr()?;
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, %scheme, roles = %names.join(","), database = %db.display(), "casd running");
    for o in &shared.cfg.cycler.outputs {
        if roles.contains(&Role::Cycler) {
            tracing::info!(output = %o.name, destination = %o.destination, pid = o.pid, bitrate = o.bitrate, "carousel output");
        }
    }

    // Body limit on every route; bearer token, enabled client and rate
    // limit on every route but /healthz, /readyz and /oauth/token.
    let router = crate::auth::protect(router, auth, shared.cfg.api.body_limit);
    let server = match tls {
        Some(tls) => tokio::spawn(crate::tls::serve_tls(
            listener,
            router,
            tls,
            shutdown.clone(),
        )),
        None => tokio::spawn(http::serve(listener, router, shutdown.clone())),
    };

    // A role task that fails brings the process down (systemd restarts it);
    // otherwise we wait for the shutdown signal.
    let mut failure = None;
    tokio::select! {
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
    db.close().await;
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

type RoleTask = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Starts one role: its routes (if it serves any) and its background task.
async fn start_role(
    role: Role,
    shared: &Shared,
) -> anyhow::Result<(Option<Router>, Option<RoleTask>)> {
    // Roles are wired in as they are built; until then a role only reports ready.
    shared.readiness.started(role);
    Ok((None, None))
}
