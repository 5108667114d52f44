//! `POST /bulk` (sms-api.md "Bulk"): up to [`MAX_ITEMS`] commands in one
//! request, each with a result of its own (the status and body its single
//! route would have answered), stored through the same group-commit
//! rounds as single commands (`store::accept_batch`, one place decides).
//!
//! Items are bulk commands: their work items are paced
//! (`emmg.bulk_bandwidth_share`, one [`BulkPace`] per process) and the
//! adds' EMMs go in the background class. Each item is recorded as a
//! request of its own (accepted ones by their round, refused ones and
//! replays by one INSERT each); the envelope is a line of the request log.
//! The request as a whole is refused (nothing stored) only for what
//! concerns it whole: authentication, scope, size, media type, or a body
//! that is not `{"commands": [1 ..= 100 objects]}`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::store::{self, Accepted, Submission};
use super::types::{self, CommandKind};
use super::{is_json, json_response, read_body, Ctx, SmsError, SmsState};
use crate::api_error::ApiError;
use crate::auth::{Caller, Scope};
use crate::queue::BulkPace;

/// Most commands one request may carry.
pub const MAX_ITEMS: usize = 100;

/// The route's handler.
pub(super) async fn bulk(
    st: SmsState,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = Ctx {
        st,
        method: "POST",
        path: "/bulk".to_owned(),
        started: std::time::Instant::now(),
        received_at: time::OffsetDateTime::now_utc(),
    };
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return whole(&ctx, None, "", e),
    };
    let sender = caller.client_id.as_str();
    let body = match read_body(&headers, body, ctx.st.shared.cfg.api.body_limit).await {
        Ok(b) => b,
        Err(e) => return whole(&ctx, Some(sender), "", e.into()),
    };
    let message = String::from_utf8_lossy(&body).into_owned();
    if let Err(e) = caller.require(Scope::SmsWrite) {
        return whole(&ctx, Some(sender), &message, e);
    }
    if !is_json(&headers) {
        return whole(
            &ctx,
            Some(sender),
            &message,
            SmsError::UnsupportedMediaType.into(),
        );
    }
    let items = match items(&body) {
        Ok(i) => i,
        Err(e) => return whole(&ctx, Some(sender), &message, e),
    };
    let results = run(&ctx, sender, items).await;
    let reply = json!({ "results": results }).to_string();
    ctx.log(None, Some(sender), None, 200, &message, &reply, None);
    json_response(StatusCode::OK, reply, None, None)
}

/// A refusal of the whole request: logged, not stored (it names no command).
fn whole(ctx: &Ctx, sender: Option<&str>, message: &str, e: ApiError) -> Response {
    let body = e.body().to_string();
    ctx.log(None, sender, None, e.status.as_u16(), message, &body, None);
    json_response(e.status, body, e.retry_after, None)
}

/// The `commands` array's objects.
fn items(body: &[u8]) -> Result<Vec<Map<String, Value>>, ApiError> {
    let invalid =
        |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m).field("commands");
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::from(SmsError::MalformedJson(format!("malformed JSON: {e}"))))?;
    let Value::Object(mut top) = v else {
        return Err(invalid("the body must be a JSON object".into()));
    };
    if let Some(k) = top.keys().find(|k| *k != "commands") {
        return Err(ApiError::from(SmsError::UnknownField(k.clone())));
    }
    let Some(Value::Array(cmds)) = top.remove("commands") else {
        return Err(invalid("`commands` must be an array".into()));
    };
    if cmds.is_empty() || cmds.len() > MAX_ITEMS {
        return Err(invalid(format!(
            "`commands` must hold 1 to {MAX_ITEMS} commands"
        )));
    }
    cmds.into_iter()
        .map(|c| match c {
            Value::Object(m) => Ok(m),
            _ => Err(invalid("every command must be a JSON object".into())),
        })
        .collect()
}

/// One item parsed: its submission, or its refusal.
type Parsed = Result<Submission, Box<Refusal>>;

/// A refused item, with what its record needs: its kind's path (or
/// `/bulk` when the kind is unknown), transaction_id and text.
struct Refusal {
    path: &'static str,
    tid: Option<String>,
    error: ApiError,
    message: String,
}

fn parse_item(ctx: &Ctx, sender: &str, pace: &Arc<BulkPace>, mut m: Map<String, Value>) -> Parsed {
    let tid = m
        .get("transaction_id")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    let kind = m.remove("command");
    let message = Value::Object(m).to_string();
    let kind = kind
        .as_ref()
        .and_then(|k| k.as_str())
        .and_then(|k| CommandKind::ALL.into_iter().find(|c| c.name() == k));
    let Some(kind) = kind else {
        let e = SmsError::Invalid {
            field: "command",
            message: "`command` must be one of adddevice, removedevice, addentitlement, \
                      removeentitlement, generateosm"
                .into(),
        };
        return Err(Box::new(Refusal {
            path: "/bulk",
            tid,
            error: e.into(),
            message,
        }));
    };
    let max_section = ctx.st.shared.cfg.cas.max_section_bytes;
    match types::parse_command(kind, message.as_bytes(), max_section) {
        Ok(req) => Ok(Submission {
            sender: sender.to_owned(),
            path: kind.path(),
            message,
            received_at: ctx.received_at,
            req,
            bulk: Some(pace.clone()),
        }),
        Err(e) => Err(Box::new(Refusal {
            path: kind.path(),
            tid,
            error: e.into(),
            message,
        })),
    }
}

/// Every item's result, in order.
async fn run(ctx: &Ctx, sender: &str, items: Vec<Map<String, Value>>) -> Vec<Value> {
    let pace = ctx.st.bulk_pace.clone();
    let parsed: Vec<Parsed> = items
        .into_iter()
        .map(|m| parse_item(ctx, sender, &pace, m))
        .collect();
    let subs: Vec<Submission> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let mut outcomes = store::accept_batch(&ctx.st.shared.db, &subs)
        .await
        .into_iter();
    if !subs.is_empty() {
        ctx.st.shared.work_ready.notify_one();
    }
    let who = Who { ctx, sender };
    let mut results = Vec::with_capacity(parsed.len());
    for p in parsed {
        let r = match p {
            Ok(sub) => {
                let o = outcomes.next().unwrap_or_else(|| {
                    Err(SmsError::Internal("no outcome for the command".into()))
                });
                who.settle(&sub, o).await
            }
            Err(r) => {
                who.refused(r.path, r.tid.as_deref(), &r.message, r.error)
                    .await
            }
        };
        results.push(r);
    }
    results
}

/// The caller of the bulk request, for its items' records.
struct Who<'a> {
    ctx: &'a Ctx,
    sender: &'a str,
}

impl Who<'_> {
    /// The result of a submitted item.
    async fn settle(&self, sub: &Submission, o: Result<Accepted, SmsError>) -> Value {
        let tid = Some(sub.req.transaction_id.as_str());
        match o {
            Ok(Accepted::New { reply, .. }) => item(200, &reply),
            Ok(Accepted::Replay { reply, .. }) => {
                self.record((sub.path, tid, &sub.message), StatusCode::OK, &reply, true)
                    .await;
                item(200, &reply)
            }
            Err(e) => self.refused(sub.path, tid, &sub.message, e.into()).await,
        }
    }

    /// A refused item: recorded as a request of its own.
    async fn refused(&self, path: &str, tid: Option<&str>, message: &str, e: ApiError) -> Value {
        let body = e.body().to_string();
        self.ctx.st.metrics.refused(e.code);
        self.record((path, tid, message), e.status, &body, false)
            .await;
        item(e.status.as_u16(), &body)
    }

    /// Stores the item's request row ((path, transaction_id, message)).
    async fn record(
        &self,
        (path, tid, message): (&str, Option<&str>, &str),
        status: StatusCode,
        body: &str,
        replay: bool,
    ) {
        let r = store::record(
            &self.ctx.st.shared.db,
            self.sender,
            tid,
            path,
            message,
            self.ctx.received_at,
            status.as_u16(),
            body,
            replay,
        )
        .await;
        if let Err(e) = r {
            tracing::warn!(
                path,
                status = status.as_u16(),
                "bulk item not stored in sms_requests: {e}"
            );
        }
    }
}

fn item(status: u16, body: &str) -> Value {
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    json!({ "status": status, "body": body })
}
