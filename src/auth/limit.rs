//! Request limits: per-key rate limits (per-client request rate, failed
//! token requests), on `governor`'s GCRA, and the request body limit, on
//! tower-http's `RequestBodyLimitLayer`.
//!
//! The limits live in this process: with N instances behind a balancer a
//! client gets up to N times its rate (docs/security.md).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;

use crate::api_error::ApiError;

type Keyed<C> =
    governor::RateLimiter<String, DefaultKeyedStateStore<String>, C, StateInformationMiddleware>;

/// The limiters by (replenish interval, burst).
type ByQuota<C> = HashMap<(Duration, u32), Arc<Keyed<C>>>;

/// Rate limits by key (a client id). A key may make up to `burst` requests
/// at once, then `rate` per second (GCRA, the same as a token bucket of
/// `burst` tokens refilled at `rate`).
pub struct RateLimiter<C: Clock = DefaultClock> {
    clock: C,
    /// One keyed limiter per (interval, burst): governor gives a limiter
    /// one quota, and each client has its own rate (`rate_per_s`).
    /// Clients with the same rate share one limiter, keyed by client id.
    limiters: Mutex<ByQuota<C>>,
    /// Keys whose budget a [`RateLimiter::spend`] used up, with when the
    /// next cell is there: what [`RateLimiter::peek`] answers from, since
    /// governor has no look without taking.
    exhausted: Mutex<HashMap<String, C::Instant>>,
    max_keys: usize,
}

impl RateLimiter {
    /// At most `max_keys` keys are tracked per limit; past that, the keys
    /// whose budget is full again are dropped first, then all of them.
    pub fn new(max_keys: usize) -> RateLimiter {
        RateLimiter::with_clock(max_keys, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(max_keys: usize, clock: C) -> RateLimiter<C> {
        RateLimiter {
            clock,
            limiters: Mutex::new(HashMap::new()),
            exhausted: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
        }
    }

    fn limiter(&self, rate: f64, burst: f64) -> Arc<Keyed<C>> {
        let interval = Duration::from_secs_f64(1.0 / rate.clamp(1e-6, 1e9));
        let burst = NonZeroU32::new(burst.clamp(1.0, f64::from(u32::MAX)) as u32)
            .unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let fresh = || {
            Arc::new(
                governor::RateLimiter::<_, _, _, governor::middleware::NoOpMiddleware<_>>::new(
                    quota,
                    DefaultKeyedStateStore::default(),
                    self.clock.clone(),
                )
                .with_middleware::<StateInformationMiddleware>(),
            )
        };
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        let l = map.entry((interval, burst.get())).or_insert_with(fresh);
        if l.len() >= self.max_keys {
            l.retain_recent();
            if l.len() >= self.max_keys {
                *l = fresh();
            }
        }
        l.clone()
    }

    /// Takes a cell, or says how many whole seconds (at least 1) until one
    /// is there.
    pub fn take(&self, key: &str, rate: f64, burst: f64) -> Result<(), u64> {
        self.limiter(rate, burst)
            .check_key(&key.to_owned())
            .map(|_| ())
            .map_err(|not_until| whole_seconds(not_until.wait_time_from(self.clock.now())))
    }

    /// Is a cell there for `key` (without taking it)? Only keys that
    /// [`RateLimiter::spend`] used up are refused.
    pub fn peek(&self, key: &str) -> Result<(), u64> {
        let now = self.clock.now();
        let mut map = self.exhausted.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(until) if *until > now => Err(whole_seconds(until.duration_since(now).into())),
            Some(_) => {
                map.remove(key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Takes a cell if one is there (for counting failures after the
    /// fact); once the last one is taken, [`RateLimiter::peek`] refuses
    /// the key until the next one is there.
    pub fn spend(&self, key: &str, rate: f64, burst: f64) {
        let l = self.limiter(rate, burst);
        let key = key.to_owned();
        let refused = match l.check_key(&key) {
            Ok(left) if left.remaining_burst_capacity() > 0 => return,
            // The last cell: when the next one is there, governor only
            // tells by refusing a check (a refused check takes nothing).
            Ok(_) => l.check_key(&key).err(),
            Err(not_until) => Some(not_until),
        };
        if let Some(not_until) = refused {
            let mut map = self.exhausted.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= self.max_keys {
                let now = self.clock.now();
                map.retain(|_, until| *until > now);
                if map.len() >= self.max_keys {
                    map.clear();
                }
            }
            map.insert(key, not_until.earliest_possible());
        }
    }
}

/// Retry-After: whole seconds, at least 1, at most a day.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs_f64().ceil().clamp(1.0, 86_400.0) as u64
}

/// The spec's 413 body (docs/sms-api.md, docs/security.md).
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body over the limit of {limit} bytes"),
    )
}

/// The configured body limit (`api.body_limit`) on every route of
/// `router`, with the spec's error bodies: tower-http refuses a declared
/// length over the limit at once and limits the body a handler reads
/// (axum's `Bytes` extractor then answers 413; axum's own default limit is
/// set to the same value, or its 2 MiB would cap a larger one).
pub fn body_limit(router: Router, limit: usize) -> Router {
    router
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(limit))
        .layer(axum::middleware::map_response(
            move |r: Response| async move { spec_body_errors(r, limit) },
        ))
}

/// Every 413 leaves with the spec's body, and so does a 400 that is not
/// ours (not JSON): axum's answer when a body could not be read (the
/// client went away, a broken chunk), `bad_body` in docs/openapi.json.
fn spec_body_errors(r: Response, limit: usize) -> Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(limit).into_response(),
        StatusCode::BAD_REQUEST if !json => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the request body could not be read",
        )
        .into_response(),
        _ => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(max_keys: usize) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::with_clock(max_keys, clock.clone()), clock)
    }

    #[test]
    fn bucket_allows_burst_then_refuses_then_refills() {
        let (l, clock) = limiter(10);
        for _ in 0..3 {
            assert_eq!(l.take("a", 1.0, 3.0), Ok(()));
        }
        assert_eq!(l.take("a", 1.0, 3.0), Err(1));
        // Another key has its own budget.
        assert_eq!(l.take("b", 1.0, 3.0), Ok(()));
        // Half a second later: still nothing; a second later: one cell.
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.take("a", 1.0, 3.0), Err(1));
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.take("a", 1.0, 3.0), Ok(()));
        assert_eq!(l.take("a", 1.0, 3.0), Err(1));
        // Another rate is another limit, for the same key too.
        assert_eq!(l.take("a", 10.0, 10.0), Ok(()));
    }

    #[test]
    fn spent_failures_lock_the_key_until_one_refills() {
        let (l, clock) = limiter(10);
        let per_min = 10.0 / 60.0;
        for _ in 0..2 {
            assert_eq!(l.peek("x"), Ok(()));
            l.spend("x", per_min, 2.0);
        }
        assert_eq!(l.peek("x"), Err(6), "one failure back every 6 s");
        assert_eq!(l.peek("y"), Ok(()), "another key is not affected");
        clock.advance(Duration::from_secs(5));
        assert_eq!(l.peek("x"), Err(1));
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.peek("x"), Ok(()));
        // One failure back: the next one locks again.
        l.spend("x", per_min, 2.0);
        assert_eq!(l.peek("x"), Err(6));
    }

    #[tokio::test]
    async fn body_errors_leave_with_the_spec_body() {
        use axum::body::{to_bytes, Body};
        let code = |r: Response| async move {
            let status = r.status().as_u16();
            let body = to_bytes(r.into_body(), 4096).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
        };
        let plain = |status: StatusCode| {
            let mut r = Response::new(Body::from("Failed to buffer the request body"));
            *r.status_mut() = status;
            r
        };
        let r = spec_body_errors(plain(StatusCode::PAYLOAD_TOO_LARGE), 1024);
        assert_eq!(code(r).await, (413, "body_too_large".to_owned()));
        let r = spec_body_errors(plain(StatusCode::BAD_REQUEST), 1024);
        assert_eq!(code(r).await, (400, "bad_body".to_owned()));
        // Our own 400s (JSON) pass unchanged.
        let ours = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "x").into_response();
        let r = spec_body_errors(ours, 1024);
        assert_eq!(code(r).await, (400, "invalid_request".to_owned()));
    }

    #[test]
    fn key_count_is_bounded() {
        let (l, _clock) = limiter(4);
        for i in 0..100 {
            let _ = l.take(&format!("k{i}"), 1.0, 1.0);
            l.spend(&format!("k{i}"), 1.0, 1.0);
        }
        for m in l.limiters.lock().unwrap().values() {
            assert!(m.len() <= 4);
        }
        assert!(l.exhausted.lock().unwrap().len() <= 4);
    }
}
