//! The HTTP side shared by every role: the router each role adds its routes
//! to, `/healthz`, `/readyz` and `/openapi.json`, and the server loop.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only
//! when the database answers, every migration is applied and every role this
//! process runs has started; otherwise 503 with the reasons.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Role;
use crate::db::Db;

/// What `/readyz` reports on. Roles mark themselves started.
#[derive(Clone, Default)]
pub struct Readiness {
    roles: Arc<Mutex<BTreeMap<Role, bool>>>,
}

impl Readiness {
    pub fn new(roles: &[Role]) -> Self {
        let map = roles.iter().map(|r| (*r, false)).collect();
        Readiness {
            roles: Arc::new(Mutex::new(map)),
        }
    }
    pub fn started(&self, role: Role) {
        if let Ok(mut m) = self.roles.lock() {
            m.insert(role, true);
        }
    }
    /// Roles not started yet.
    pub fn pending(&self) -> Vec<Role> {
        self.roles
            .lock()
            .map(|m| m.iter().filter(|(_, ok)| !**ok).map(|(r, _)| *r).collect())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct HealthState {
    db: Db,
    readiness: Readiness,
}

/// `/healthz`, `/readyz` and the OpenAPI document (`/openapi.json`).
pub fn health_routes(db: Db, readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(HealthState { db, readiness })
        .merge(crate::openapi::routes())
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), s.db.migrations_current()).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => problems.push("migrations not applied".to_string()),
        Ok(Err(e)) => problems.push(format!("database: {e}")),
        Err(_) => problems.push("database: no answer within 2 s".to_string()),
    }
    let pending = s.readiness.pending();
    if !pending.is_empty() {
        let names: Vec<&str> = pending.iter().map(|r| r.name()).collect();
        problems.push(format!("roles not started: {}", names.join(", ")));
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "problems": problems})),
        )
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
