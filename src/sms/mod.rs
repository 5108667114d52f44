//! The SMS-CAS interface (sms-api.md): the five command routes, the two
//! read routes, the request log.
//!
//! A command request goes: authentication (401, from the `Caller`
//! extractor) → body read with the size limit (413) → scope `sms:write`
//! (403) → `Content-Type: application/json` (415) → parse into a validated
//! [`types::CommandRequest`] (400 / 422) → the [`commit::Committer`], which
//! stores it with the other commands waiting at that moment in one
//! transaction ([`store::accept_batch`]; 404 / 409 / 422 / 503, or 200
//! after COMMIT) → wake the EMMG.
//!
//! Every request is recorded: accepted ones by their own transaction,
//! refused ones (and replays) by one INSERT afterwards, and each one as a
//! line of the request log. A request refused without authentication (401)
//! is only in the request log: storing rows for anyone who can reach the
//! port would let them fill the database. When the database is unreachable
//! the request cannot be stored; its log line says so (`not_stored`).
//!
//! `/generateosm` takes scope `sms:write` like the other commands:
//! sms-api.md lists it among the SMS's commands and does not name another
//! scope (`emm:generate` is for direct EMM generation by other clients).

mod bulk;
pub mod commit;
mod decide;
pub mod error;
mod round;
mod slots;
pub mod store;
pub mod types;

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use http_body_util::{BodyExt, Limited};
use time::OffsetDateTime;

use crate::api_error::ApiError;
use crate::app::Shared;
use crate::auth::{Caller, Scope};
use crate::reqlog::{RequestLine, RequestLog};

pub use error::SmsError;
pub use types::{CommandKind, CommandRequest, DeviceId};

/// The role's state: the process's shared handles and the request log.
#[derive(Clone)]
pub struct SmsState {
    pub shared: Shared,
    pub log: RequestLog,
    pub committer: commit::Committer,
    pub metrics: crate::metrics::SmsMetrics,
    /// The pace of `POST /bulk` items' work items (one per process).
    pub bulk_pace: std::sync::Arc<crate::queue::BulkPace>,
}

/// The SMS role's routes, with a request log writing to `api.request_log`.
pub fn routes(shared: Shared) -> Router {
    let log = RequestLog::open(
        shared.cfg.api.request_log.clone(),
        crate::reqlog::DEFAULT_ROTATE_BYTES,
        crate::reqlog::DEFAULT_KEEP,
    );
    routes_with_log(shared, log)
}

/// The routes with a given request log (tests keep a handle to flush it).
pub fn routes_with_log(shared: Shared, log: RequestLog) -> Router {
    let metrics =
        crate::metrics::SmsMetrics::new(&shared.metrics, &CommandKind::ALL.map(|k| k.path()));
    let committer = commit::Committer::start_observed(
        shared.db.clone(),
        shared.cfg.api.commit_batch,
        shared.cfg.api.committers,
        metrics.round_size.clone(),
    );
    metrics.watch_waiting(committer.waiting());
    let bulk_pace = std::sync::Arc::new(crate::queue::BulkPace::from_config(&shared.cfg));
    let state = SmsState {
        shared,
        log,
        committer,
        metrics,
        bulk_pace,
    };
    let mut r = Router::new();
    for kind in CommandKind::ALL {
        let m: MethodRouter<SmsState> = post(
            move |State(st): State<SmsState>,
                  caller: Result<Caller, ApiError>,
                  headers: HeaderMap,
                  body: Body| async move { command(st, kind, caller, headers, body).await },
        );
        r = r.route(kind.path(), m.fallback(method_not_allowed));
    }
    r.route(
        "/bulk",
        post(
            |State(st): State<SmsState>,
             caller: Result<Caller, ApiError>,
             headers: HeaderMap,
             body: Body| async move { bulk::bulk(st, caller, headers, body).await },
        )
        .fallback(method_not_allowed),
    )
    .route(
        "/requests/{id}",
        get(get_request).fallback(method_not_allowed),
    )
    .route(
        "/devices/{device_id}",
        get(get_device).fallback(method_not_allowed),
    )
    .with_state(state)
}

async fn method_not_allowed(method: Method) -> Response {
    let e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on this route"),
    );
    e.into_response()
}

/// The response for a JSON body we already hold as text, so that the bytes
/// sent are the bytes stored.
fn json_response(
    status: StatusCode,
    body: String,
    retry_after: Option<u64>,
    request_id: Option<u64>,
) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(s) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(id) = request_id {
        h.insert("x-request-id", HeaderValue::from(id));
    }
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads the body up to `limit` bytes: `Err(TooLarge)` past it. The same
/// limit and 413 body as every other route (`auth::limit::body_limit`),
/// applied here rather than by that layer: the SMS routes read the body
/// only after the caller check, and record the refusal themselves.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, SmsError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(SmsError::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(SmsError::TooLarge(limit)),
        // The client went away or sent a broken body.
        Err(e) => Err(SmsError::MalformedJson(format!(
            "could not read the body: {e}"
        ))),
    }
}

struct Ctx {
    st: SmsState,
    method: &'static str,
    path: String,
    started: Instant,
    received_at: OffsetDateTime,
}

impl Ctx {
    fn ts(&self) -> String {
        self.received_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        id: Option<u64>,
        sender: Option<&str>,
        tid: Option<&str>,
        status: u16,
        body: &str,
        response: &str,
        not_stored: Option<String>,
    ) {
        self.st.log.write(&RequestLine {
            ts: &self.ts(),
            id,
            sender,
            transaction_id: tid,
            method: self.method,
            path: &self.path,
            status,
            duration_us: self.started.elapsed().as_micros() as u64,
            body,
            response,
            not_stored: not_stored.as_deref(),
        });
    }

    /// Answers a request that was not accepted as a new command: stores it
    /// (unless unauthenticated), logs it, and sends `status` / `body`.
    #[allow(clippy::too_many_arguments)]
    async fn finish_unaccepted(
        &self,
        sender: Option<&str>,
        tid: Option<&str>,
        message: &str,
        status: StatusCode,
        body: String,
        retry_after: Option<u64>,
        replay: bool,
    ) -> Response {
        let mut id = None;
        let mut not_stored = None;
        if let Some(sender) = sender {
            match store::record(
                &self.st.shared.db,
                sender,
                tid,
                &self.path,
                message,
                self.received_at,
                status.as_u16(),
                &body,
                replay,
            )
            .await
            {
                Ok(i) => id = Some(i),
                Err(e) => {
                    tracing::warn!(path = %self.path, status = status.as_u16(), "request not stored in sms_requests: {e}");
                    not_stored = Some(e.to_string());
                }
            }
        }
        self.log(id, sender, tid, status.as_u16(), message, &body, not_stored);
        json_response(status, body, retry_after, id)
    }

    async fn refuse(
        &self,
        sender: Option<&str>,
        tid: Option<&str>,
        message: &str,
        e: impl Into<ApiError>,
    ) -> Response {
        let e: ApiError = e.into();
        self.st.metrics.refused(e.code);
        let body = e.body().to_string();
        self.finish_unaccepted(sender, tid, message, e.status, body, e.retry_after, false)
            .await
    }
}

async fn command(
    st: SmsState,
    kind: CommandKind,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let metrics = st.metrics.clone();
    let ctx = Ctx {
        st,
        method: "POST",
        path: kind.path().to_owned(),
        started: Instant::now(),
        received_at: OffsetDateTime::now_utc(),
    };
    let response = match caller {
        Err(e) => ctx.refuse(None, None, "", e).await,
        Ok(caller) => match ctx.admit(kind, &caller, &headers, body).await {
            Ok(sub) => ctx.submit(sub).await,
            Err(refused) => refused,
        },
    };
    metrics.answered(
        kind.path(),
        response.status().as_u16(),
        ctx.started.elapsed(),
    );
    response
}

impl Ctx {
    /// The checks after authentication, in the documented order: body size
    /// (413), scope (403), media type (415), the command itself (400/422).
    /// A refusal is answered (and recorded) here.
    async fn admit(
        &self,
        kind: CommandKind,
        caller: &Caller,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<store::Submission, Response> {
        let sender = caller.client_id.as_str();
        let body = read_body(headers, body, self.st.shared.cfg.api.body_limit).await;
        let message = match &body {
            Ok(b) => String::from_utf8_lossy(b).into_owned(),
            Err(_) => String::new(),
        };
        let fields_tid = body
            .as_ref()
            .ok()
            .and_then(|b| types::Fields::parse(b).ok())
            .and_then(|f| f.raw_transaction_id());
        let tid = fields_tid.as_deref();
        let refuse = |e: ApiError| self.refuse(Some(sender), tid, &message, e);
        if let Err(e) = caller.require(Scope::SmsWrite) {
            return Err(refuse(e).await);
        }
        if !is_json(headers) {
            return Err(refuse(SmsError::UnsupportedMediaType.into()).await);
        }
        let body = match body {
            Ok(b) => b,
            Err(e) => return Err(refuse(e.into()).await),
        };
        let max_section = self.st.shared.cfg.cas.max_section_bytes;
        let req = match types::parse_command(kind, &body, max_section) {
            Ok(r) => r,
            Err(e) => return Err(refuse(e.into()).await),
        };
        Ok(store::Submission {
            sender: sender.to_owned(),
            path: kind.path(),
            message,
            received_at: self.received_at,
            req,
            bulk: None,
        })
    }

    /// Hands the command to the committer and answers its outcome: 200
    /// after COMMIT (and the EMMG woken), a replay's stored reply, or the
    /// refusal.
    async fn submit(&self, sub: store::Submission) -> Response {
        let sender = sub.sender.clone();
        let message = sub.message.clone();
        let tid = sub.req.transaction_id.as_str().to_owned();
        let (sender, tid) = (Some(sender.as_str()), Some(tid.as_str()));
        match self.st.committer.submit(sub).await {
            Ok(store::Accepted::New { request_id, reply }) => {
                self.st.shared.work_ready.notify_one();
                self.log(Some(request_id), sender, tid, 200, &message, &reply, None);
                json_response(StatusCode::OK, reply, None, Some(request_id))
            }
            Ok(store::Accepted::Replay { reply, .. }) => {
                self.finish_unaccepted(sender, tid, &message, StatusCode::OK, reply, None, true)
                    .await
            }
            Err(e) => {
                if let SmsError::Db(db) = &e {
                    tracing::warn!(path = %self.path, "command not stored: {db}");
                }
                self.refuse(sender, tid, &message, e).await
            }
        }
    }
}

/// Read routes answer errors with the spec's body but are not recorded in
/// `sms_requests` (they change nothing); they are in the request log.
async fn read_route<F, Fut>(
    st: SmsState,
    caller: Result<Caller, ApiError>,
    path: String,
    f: F,
) -> Response
where
    F: FnOnce(SmsState, Caller) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, ApiError>>,
{
    let ctx = Ctx {
        st: st.clone(),
        method: "GET",
        path,
        started: Instant::now(),
        received_at: OffsetDateTime::now_utc(),
    };
    let sender = caller.as_ref().ok().map(|c| c.client_id.clone());
    let result = match caller {
        Ok(c) => match c.require(Scope::SmsRead) {
            Ok(()) => f(st, c).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (status, body, retry) = match result {
        Ok(v) => (StatusCode::OK, v.to_string(), None),
        Err(e) => (e.status, e.body().to_string(), e.retry_after),
    };
    ctx.log(
        None,
        sender.as_deref(),
        None,
        status.as_u16(),
        "",
        &body,
        None,
    );
    json_response(status, body, retry, None)
}

async fn get_request(
    State(st): State<SmsState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/requests/{id}");
    read_route(st, caller, path, |st, c| async move {
        let rid: u64 = id.parse().map_err(|_| SmsError::BadPath {
            field: "request_id",
            what: "request id",
        })?;
        let any = c.scopes.contains(&Scope::Admin);
        store::request_status(&st.shared.db, rid, &c.client_id, any)
            .await?
            .ok_or_else(|| SmsError::UnknownRequest(rid).into())
    })
    .await
}

async fn get_device(
    State(st): State<SmsState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/devices/{id}");
    read_route(st, caller, path, |st, _c| async move {
        let bad = || SmsError::OutOfRange {
            field: "device_id",
            message: "`device_id` must be an integer in 1..=9007199254740991 (2^53-1)".into(),
        };
        let n: u64 = id.parse().map_err(|_| bad())?;
        let d = DeviceId::new(n).map_err(|_| bad())?;
        store::device_status(&st.shared.db, d.get())
            .await?
            .ok_or_else(|| SmsError::UnknownDevice(d.get()).into())
    })
    .await
}
