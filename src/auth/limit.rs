//! Request limits: per-key token buckets (per-client request rate, failed
//! token requests) and the request body limit.
//!
//! The buckets live in this process: with N instances behind a balancer a
//! client gets up to N times its rate (docs/security.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::api_error::ApiError;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key. A bucket holds up to `burst` tokens and refills at
/// `rate` per second; a request takes one.
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    max_keys: usize,
}

impl RateLimiter {
    /// At most `max_keys` buckets are kept; past that, full (idle) buckets
    /// are dropped first.
    pub fn new(max_keys: usize) -> RateLimiter {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
        }
    }

    fn with_bucket<T>(
        &self,
        key: &str,
        rate: f64,
        burst: f64,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> T {
        let burst = burst.max(1.0);
        let mut map = match self.buckets.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if !map.contains_key(key) && map.len() >= self.max_keys {
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if map.len() >= self.max_keys {
                map.clear();
            }
        }
        let b = map.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        f(b)
    }

    /// Takes a token, or says how many whole seconds (at least 1) until one
    /// is there.
    pub fn take(&self, key: &str, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.with_bucket(key, rate, burst, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(retry_after(b.tokens, rate))
            }
        })
    }

    /// Like [`take`](Self::take) without taking: is a token there?
    pub fn peek(&self, key: &str, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.with_bucket(key, rate, burst, now, |b| {
            if b.tokens >= 1.0 {
                Ok(())
            } else {
                Err(retry_after(b.tokens, rate))
            }
        })
    }

    /// Takes a token if one is there (for counting failures after the fact).
    pub fn spend(&self, key: &str, rate: f64, burst: f64, now: Instant) {
        self.with_bucket(key, rate, burst, now, |b| {
            b.tokens = (b.tokens - 1.0).max(0.0);
        })
    }
}

fn retry_after(tokens: f64, rate: f64) -> u64 {
    let s = Duration::from_secs_f64(((1.0 - tokens) / rate.max(1e-6)).clamp(0.0, 86_400.0));
    s.as_secs_f64().ceil().max(1.0) as u64
}

/// The configured body limit (`api.body_limit`) with the spec's 413 body.
/// Bodies are read here, up to the limit, so every route sees the same
/// limit and the same error whatever extractor it uses.
pub async fn body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body over the limit of {limit} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => {
            next.run(Request::from_parts(parts, Body::from(collected.to_bytes())))
                .await
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => too_large(),
        Err(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the request body could not be read",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses_then_refills() {
        let l = RateLimiter::new(10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take("a", 1.0, 3.0, t0), Ok(()));
        }
        assert_eq!(l.take("a", 1.0, 3.0, t0), Err(1));
        // Another key has its own bucket.
        assert_eq!(l.take("b", 1.0, 3.0, t0), Ok(()));
        // Half a second later: still nothing; a second later: one token.
        assert_eq!(
            l.take("a", 1.0, 3.0, t0 + Duration::from_millis(500)),
            Err(1)
        );
        assert_eq!(
            l.take("a", 1.0, 3.0, t0 + Duration::from_millis(1000)),
            Ok(())
        );
        assert_eq!(
            l.take("a", 1.0, 3.0, t0 + Duration::from_millis(1000)),
            Err(1)
        );
    }

    #[test]
    fn slow_refill_gives_long_retry_after() {
        let l = RateLimiter::new(10);
        let t0 = Instant::now();
        let per_min = 10.0 / 60.0;
        l.spend("x", per_min, 1.0, t0);
        assert_eq!(l.peek("x", per_min, 1.0, t0), Err(6));
    }

    #[test]
    fn key_count_is_bounded() {
        let l = RateLimiter::new(4);
        let t0 = Instant::now();
        for i in 0..100 {
            let _ = l.take(&format!("k{i}"), 1.0, 1.0, t0);
        }
        assert!(l.buckets.lock().unwrap().len() <= 4);
    }
}
