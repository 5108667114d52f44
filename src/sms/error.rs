//! Every way an SMS request is refused, mapped to the status, code and field
//! of sms-api.md "Errors". The codes are stable (docs/sms-api.md lists them).

use axum::http::StatusCode;

use crate::api_error::ApiError;
use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    // 400
    #[error("{0}")]
    MalformedJson(String),
    #[error("`{0}` is missing")]
    Missing(&'static str),
    #[error("`{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{message}")]
    OutOfRange {
        field: &'static str,
        message: String,
    },
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("field `{0}` given more than once")]
    DuplicateField(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("`{field}` is not a valid {what}")]
    BadPath {
        field: &'static str,
        what: &'static str,
    },
    // 404
    #[error("unknown device {0}")]
    UnknownDevice(u64),
    #[error("unknown group {0}")]
    UnknownGroup(u32),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    // 409
    #[error("transaction_id already used with a different request")]
    TransactionReused,
    #[error("device {0} already exists and is enabled")]
    DeviceExists(u64),
    // 413
    #[error("request body over the limit of {0} bytes")]
    TooLarge(usize),
    // 415
    #[error("the body must be sent as Content-Type: application/json")]
    UnsupportedMediaType,
    // 422
    #[error("`start` is after `end`")]
    StartAfterEnd,
    #[error(
        "OSM text of {len} bytes cannot fit one EMM (at most {max} UTF-8 bytes for this target)"
    )]
    OsmTooLong { len: usize, max: usize },
    #[error("`expires_at` is not in the future")]
    AlreadyExpired,
    // 503
    #[error("too many commands waiting to be stored")]
    Overloaded,
    // 503 / 500
    #[error(transparent)]
    Db(#[from] DbError),
    /// A bug or a broken invariant: logged, answered 500 with nothing
    /// changed (the message is never sent).
    #[error("{0}")]
    Internal(String),
}

impl From<crate::sqltext::Error> for SmsError {
    fn from(e: crate::sqltext::Error) -> Self {
        match e {
            crate::sqltext::Error::Db(e) => e.into(),
            crate::sqltext::Error::Internal(m) => SmsError::Internal(m),
        }
    }
}

impl From<mysql_async::Error> for SmsError {
    fn from(e: mysql_async::Error) -> Self {
        SmsError::Db(DbError::from(e))
    }
}

impl From<SmsError> for ApiError {
    fn from(e: SmsError) -> ApiError {
        use SmsError::*;
        let msg = e.to_string();
        let (status, code, field): (StatusCode, &'static str, Option<String>) = match e {
            Db(db) => return ApiError::from(db),
            Internal(m) => {
                tracing::error!("SMS command failed: {m}");
                return ApiError::internal();
            }
            Overloaded => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many commands waiting to be stored; nothing was changed, retry later",
                )
                .retry_after(1)
            }
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json", None),
            Missing(f) => (StatusCode::BAD_REQUEST, "missing_field", Some(f.into())),
            WrongType { field, .. } => (StatusCode::BAD_REQUEST, "wrong_type", Some(field.into())),
            OutOfRange { field, .. } => {
                (StatusCode::BAD_REQUEST, "out_of_range", Some(field.into()))
            }
            Invalid { field, .. } => (StatusCode::BAD_REQUEST, "invalid_field", Some(field.into())),
            UnknownField(f) => (StatusCode::BAD_REQUEST, "unknown_field", Some(f)),
            DuplicateField(f) => (StatusCode::BAD_REQUEST, "duplicate_field", Some(f)),
            InvalidTarget(_) => (StatusCode::BAD_REQUEST, "invalid_target", None),
            BadPath { field, .. } => (StatusCode::BAD_REQUEST, "invalid_field", Some(field.into())),
            UnknownDevice(_) => (
                StatusCode::NOT_FOUND,
                "unknown_device",
                Some("device_id".into()),
            ),
            UnknownGroup(_) => (
                StatusCode::NOT_FOUND,
                "unknown_group",
                Some("group_id".into()),
            ),
            UnknownRequest(_) => (StatusCode::NOT_FOUND, "unknown_request", None),
            TransactionReused => (
                StatusCode::CONFLICT,
                "transaction_reused",
                Some("transaction_id".into()),
            ),
            DeviceExists(_) => (
                StatusCode::CONFLICT,
                "device_exists",
                Some("device_id".into()),
            ),
            // The same 413 as every other route's.
            TooLarge(limit) => return crate::auth::limit::too_large(limit),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            StartAfterEnd => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "start_after_end",
                Some("start".into()),
            ),
            OsmTooLong { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "osm_too_long",
                Some("text".into()),
            ),
            AlreadyExpired => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "already_expired",
                Some("expires_at".into()),
            ),
        };
        let mut a = ApiError::new(status, code, msg);
        a.field = field;
        a
    }
}
