//! The request log: one JSON line per API request (sms-api.md "Records"),
//! written to `api.request_log` through the shared [`JsonLog`] writer
//! (rotated by size, never blocking a request, drops counted).
//!
//! What goes in a line is chosen here ([`RequestLine`]): never the
//! Authorization header, tokens or secrets — the SMS routes log the body they
//! received (commands carry no secrets) and the reply they sent. The
//! database row in `sms_requests` is the durable record; this file is the
//! operator's tail.

use serde::Serialize;

use crate::jsonlog::JsonLog;
pub use crate::jsonlog::{DEFAULT_KEEP, DEFAULT_ROTATE_BYTES};

/// One line of the request log (borrowed: a line is serialized at once,
/// and copying every field first cost as much as serializing it).
#[derive(Debug, Clone, Serialize)]
pub struct RequestLine<'a> {
    /// RFC 3339, UTC, microseconds.
    pub ts: &'a str,
    /// `sms_requests.id` of this request when it was stored.
    pub id: Option<u64>,
    /// Authenticated client id; None when authentication failed.
    pub sender: Option<&'a str>,
    pub transaction_id: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_us: u64,
    /// The request body as received (lossy UTF-8).
    pub body: &'a str,
    /// The reply body sent.
    pub response: &'a str,
    /// Set when the request could not be stored in `sms_requests`
    /// (database unreachable): this line is then its only record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_stored: Option<&'a str>,
}

/// A cheap-to-clone handle on the request log's writer.
#[derive(Clone, Debug)]
pub struct RequestLog(JsonLog);

impl RequestLog {
    /// Starts the writer for `path` (created on first write).
    pub fn open(path: impl Into<std::path::PathBuf>, rotate_bytes: u64, keep: u32) -> RequestLog {
        RequestLog(JsonLog::open(path, rotate_bytes, keep))
    }

    /// Queues one line; never waits. A full queue drops the line.
    pub fn write(&self, line: &RequestLine<'_>) {
        self.0.write(line);
    }

    /// Lines dropped so far (queue full or file unwritable).
    pub fn dropped(&self) -> u64 {
        self.0.dropped()
    }

    /// Waits until every line queued before this call is written.
    pub async fn flush(&self) {
        self.0.flush().await
    }
}
