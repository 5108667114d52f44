//! Throughput of the SMS-CAS interface with the durable commit, next to a
//! baseline of raw single-row INSERT commits on the same MariaDB in the same
//! run. Not part of the normal suite:
//!
//! ```text
//! cargo test --release -p casd --test sms_bench -- --ignored --nocapture
//! ```
//! `CASD_BENCH_SECS` (default 5) and `CASD_BENCH_CONNS` (default 32) tune it.

mod sms_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use sms_common::Headend;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn accepted_commands_per_second() {
    let secs = env("CASD_BENCH_SECS", 5);
    let conns = env("CASD_BENCH_CONNS", 32) as usize;
    // CASD_BENCH_MIX=ent: one device per client, then only addentitlement.
    let ent_only = std::env::var("CASD_BENCH_MIX").is_ok_and(|m| m == "ent");
    let h = Arc::new(Headend::start().await);

    // Baseline: 16 connections, one autocommitted single-row INSERT each.
    {
        let mut c = h.db().conn().await.unwrap();
        c.query_drop(
            "CREATE TABLE bench_rows (id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             v VARCHAR(64) NOT NULL) ENGINE=InnoDB",
        )
        .await
        .unwrap();
    }
    let stop = Instant::now() + Duration::from_secs(secs);
    let n = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (h, n) = (h.clone(), n.clone());
        set.spawn(async move {
            let mut c = h.db().conn().await.unwrap();
            while Instant::now() < stop {
                c.exec_drop("INSERT INTO bench_rows (v) VALUES (?)", ("x",))
                    .await
                    .unwrap();
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let baseline = n.load(Ordering::Relaxed) as f64 / secs as f64;
    // The same on one connection: the commit (fsync) latency.
    let single = {
        let mut c = h.db().conn().await.unwrap();
        let t0 = Instant::now();
        let mut k = 0u64;
        while t0.elapsed() < Duration::from_secs(1) {
            c.exec_drop("INSERT INTO bench_rows (v) VALUES (?)", ("x",))
                .await
                .unwrap();
            k += 1;
        }
        k as f64 / t0.elapsed().as_secs_f64()
    };
    // A round trip without a commit.
    let rtt = {
        let mut c = h.db().conn().await.unwrap();
        let t0 = Instant::now();
        let mut k = 0u64;
        while t0.elapsed() < Duration::from_millis(500) {
            let _: Option<u64> = c.exec_first("SELECT ?", (k,)).await.unwrap();
            k += 1;
        }
        t0.elapsed().as_micros() as f64 / k as f64
    };
    println!("one connection: {rtt:.0} µs per statement round trip");
    // One command transaction without HTTP, sequentially.
    let direct = {
        let t0 = Instant::now();
        let mut k = 0u64;
        while t0.elapsed() < Duration::from_secs(1) {
            let d = 900_000_000 + k;
            let body = format!(r#"{{"transaction_id":"x{d}","device_id":{d}}}"#);
            let req = casd::sms::types::parse_command(
                casd::sms::CommandKind::AddDevice,
                body.as_bytes(),
                256,
            )
            .unwrap();
            let meta = casd::sms::store::RequestMeta {
                sender: "bench",
                path: "/adddevice",
                message: &body,
                received_at: time::OffsetDateTime::now_utc(),
            };
            casd::sms::store::accept(h.db(), &meta, &req).await.unwrap();
            k += 1;
        }
        k as f64 / t0.elapsed().as_secs_f64()
    };
    println!("one connection: {single:.0} INSERT commits/s; {direct:.0} adddevice transactions/s (no HTTP)");

    let work_before: u64 = h
        .db()
        .conn()
        .await
        .unwrap()
        .query_first("SELECT COUNT(*) FROM work_items")
        .await
        .unwrap()
        .unwrap_or(0);
    // The interface: `conns` concurrent clients posting adddevice then
    // addentitlement for fresh devices, each a durable commit.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()
        .unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    // A client whose rate limit no benchmark reaches.
    let bearer: Arc<str> = casd::auth::testing::bench_bearer(h.db()).await.into();
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conns as u64 {
        let (h, ok, bad, lat, client, bearer) = (
            h.clone(),
            ok.clone(),
            bad.clone(),
            lat.clone(),
            client.clone(),
            bearer.clone(),
        );
        set.spawn(async move {
            let mut i = 0u64;
            let mut mine = Vec::new();
            while Instant::now() < stop {
                let d = 1 + w * 10_000_000 + i;
                let (path, body) = if ent_only && i > 0 {
                    let d = 1 + w * 10_000_000;
                    (
                        "/addentitlement",
                        format!(
                            r#"{{"transaction_id":"e{d}-{i}","device_id":{d},"product_id":{},"start":0,"end":2000000000}}"#,
                            1 + i % 1000
                        ),
                    )
                } else if i.is_multiple_of(2) || ent_only {
                    (
                        "/adddevice",
                        format!(r#"{{"transaction_id":"a{d}","device_id":{d}}}"#),
                    )
                } else {
                    let d = d - 1;
                    (
                        "/addentitlement",
                        format!(
                            r#"{{"transaction_id":"e{d}","device_id":{d},"product_id":1,"start":0,"end":2000000000}}"#
                        ),
                    )
                };
                let t0 = Instant::now();
                let r = client
                    .post(h.url(path))
                    .header("authorization", &*bearer)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                        mine.push(t0.elapsed().as_micros() as u32);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            lat.lock().unwrap().extend(mine);
        });
    }
    while set.join_next().await.is_some() {}
    let rate = ok.load(Ordering::Relaxed) as f64 / secs as f64;
    let mut l = lat.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let work: Option<u64> = h
        .db()
        .conn()
        .await
        .unwrap()
        .query_first("SELECT COUNT(*) FROM work_items")
        .await
        .unwrap();
    println!(
        "baseline: {baseline:.0} single-row INSERT commits/s over 16 connections\n\
         sms:      {rate:.0} accepted commands/s over {conns} HTTP connections ({} refused), \
         latency p50 {:.1} ms p99 {:.1} ms; {:.0}% of baseline\n\
         work items committed: {}; request log lines dropped: {}",
        bad.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
        100.0 * rate / baseline,
        work.unwrap_or(0) - work_before,
        h.log.dropped(),
    );
    assert_eq!(
        work.unwrap_or(0) - work_before,
        ok.load(Ordering::Relaxed),
        "every 200 has its work item"
    );
}
