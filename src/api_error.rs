//! The error body every HTTP route answers with (sms-api.md "Errors"):
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`.
//!
//! Each boundary has its own error enum (SMS commands, auth, encryptor…)
//! and converts into [`ApiError`]; this is the one place the JSON shape and
//! the `Retry-After` header are written.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_field`, `unknown_device`.
    pub code: &'static str,
    /// Human-readable, never containing secrets.
    pub message: String,
    /// The input field at fault, when one is.
    pub field: Option<String>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }
    pub fn retry_after(mut self, s: u64) -> Self {
        self.retry_after = Some(s);
        self
    }
    /// The JSON body, also what gets stored as the request's response.
    pub fn body(&self) -> serde_json::Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            e["field"] = json!(f);
        }
        json!({ "error": e })
    }
    /// 503 with Retry-After: the database (or a peer role) is not there.
    pub fn unavailable(what: &str) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what} unavailable; nothing was changed, retry later"),
        )
        .retry_after(2)
    }
    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; nothing was changed",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        if e.is_unavailable() {
            ApiError::unavailable("database")
        } else {
            tracing::error!("database error: {e}");
            ApiError::internal()
        }
    }
}

impl From<mysql_async::Error> for ApiError {
    fn from(e: mysql_async::Error) -> Self {
        crate::db::DbError::from(e).into()
    }
}
