//! Throughput of the SMS-CAS interface with the durable commit, next to a
//! baseline of raw single-row INSERT commits on the same MariaDB in the same
//! run. Not part of the normal suite:
//!
//! ```text
//! cargo test --release -p casd --test it sms_bench:: -- --ignored --nocapture
//! ```
//! `CASD_BENCH_SECS` (default 5) and `CASD_BENCH_CONNS` (default 32, at most
//! 290: the in-process clients use device ids below 2.9e9, the no-HTTP
//! loop 2.95e9, wrk window k from 3e9 + k × 1e9) and `CASD_BENCH_PAIRS`
//! (default 3, at most 5: wrk windows, each right after a baseline window
//! of its own) tune it. The wrk part runs when `wrk` is installed.

use crate::sms_common;

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

/// CPU seconds (user + system, every thread) a process has used so far,
/// from /proc (in USER_HZ ticks, 100 per second on Linux); `children`: of
/// its children it has waited for instead.
fn cpu_secs(pid: u32, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, cutime and cstime the next two.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = if children { 13 } else { 11 };
    let ticks: u64 = f.get(at)?.parse::<u64>().ok()? + f.get(at + 1)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Work items committed so far: one per accepted command.
async fn work_items(h: &Headend) -> u64 {
    let mut c = h.db().conn().await.unwrap();
    c.query_first("SELECT COUNT(*) FROM work_items")
        .await
        .unwrap()
        .unwrap_or(0)
}

/// The MariaDB server's pid when it runs on this machine (its pid file is
/// readable), so that its CPU time can be read.
async fn server_pid(h: &Headend) -> Option<u32> {
    let mut c = h.db().conn().await.ok()?;
    let path: Option<String> = c.query_first("SELECT @@pid_file").await.ok()?;
    let path = std::path::Path::new(&path?).to_path_buf();
    let path = if path.is_absolute() {
        path
    } else {
        let dir: Option<String> = c.query_first("SELECT @@datadir").await.ok()?;
        std::path::Path::new(&dir?).join(path)
    };
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// CPU used by this process and by the server between two readings.
#[derive(Clone, Copy)]
struct Cpu {
    me: f64,
    server: Option<f64>,
}

fn cpu_now(server: Option<u32>) -> Cpu {
    Cpu {
        me: cpu_secs(std::process::id(), false).unwrap_or(0.0),
        server: server.and_then(|p| cpu_secs(p, false)),
    }
}

/// "µs of CPU per operation" for this process and the server.
fn per_op(a: Cpu, b: Cpu, ops: u64) -> String {
    let us = |s: f64| s * 1e6 / ops.max(1) as f64;
    match (a.server, b.server) {
        (Some(x), Some(y)) => format!(
            "{:.0} µs this process + {:.0} µs MariaDB = {:.0} µs",
            us(b.me - a.me),
            us(y - x),
            us(b.me - a.me + y - x)
        ),
        _ => format!("{:.0} µs this process (MariaDB not local)", us(b.me - a.me)),
    }
}

/// Single-row INSERT commits per second over 16 connections, each
/// autocommitted, for `secs`; with the CPU per commit.
async fn baseline_window(h: &Arc<Headend>, secs: u64, spid: Option<u32>) -> (f64, String) {
    let stop = Instant::now() + Duration::from_secs(secs);
    let cpu0 = cpu_now(spid);
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
    let done = n.load(Ordering::Relaxed);
    (done as f64 / secs as f64, per_op(cpu0, cpu_now(spid), done))
}

/// The median; of an even count, the mean of the middle two (not the
/// upper one: that would report the better of two windows).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn accepted_commands_per_second() {
    let secs = env("CASD_BENCH_SECS", 5);
    let conns = env("CASD_BENCH_CONNS", 32) as usize;
    assert!(conns <= 290, "device id ranges would overlap");
    // CASD_BENCH_MIX=ent: one device per client, then only addentitlement.
    let ent_only = std::env::var("CASD_BENCH_MIX").is_ok_and(|m| m == "ent");
    let h = Arc::new(Headend::start().await);
    let spid = server_pid(&h).await;

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
    let (baseline, base_cpu) = baseline_window(&h, secs, spid).await;
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
            let d = 2_950_000_000 + k;
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
    // Rounds of k commands (half adddevice, half addentitlement of the
    // devices just added), no HTTP, one connection: CPU per command, to
    // tell a round's fixed cost from each command's own.
    let mut next = 2_960_000_000u64;
    for k in [1usize, 4, 16, 64] {
        let mut c = h.db().conn().await.unwrap();
        let hint = casd::sms::store::SlotHint::default();
        let a = cpu_now(spid);
        let t0 = Instant::now();
        let mut done = 0u64;
        let mut prev: Vec<u64> = Vec::new();
        while t0.elapsed() < Duration::from_millis(1500) {
            let mut subs = Vec::with_capacity(k);
            for d in prev.drain(..) {
                subs.push(sms_common::submission(
                    casd::sms::CommandKind::AddEntitlement,
                    &format!(r#"{{"transaction_id":"ye{d}","device_id":{d},"product_id":1,"start":0,"end":2000000000}}"#),
                ));
            }
            while subs.len() < k {
                next += 1;
                prev.push(next);
                subs.push(sms_common::submission(
                    casd::sms::CommandKind::AddDevice,
                    &format!(r#"{{"transaction_id":"y{next}","device_id":{next}}}"#),
                ));
            }
            let r = casd::sms::store::accept_batch_on(&mut c, &subs, &hint).await;
            assert!(r.iter().all(|o| o.is_ok()), "{r:?}");
            done += subs.len() as u64;
        }
        let rate = done as f64 / t0.elapsed().as_secs_f64();
        println!(
            "rounds of {k:>2}, one connection, no HTTP: {rate:.0} commands/s; CPU per command: {}",
            per_op(a, cpu_now(spid), done)
        );
    }

    let work_before = work_items(&h).await;
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
    let cpu1 = cpu_now(spid);
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
                    Ok(r) => {
                        if bad.fetch_add(1, Ordering::Relaxed) < 3 {
                            let s = r.status();
                            println!("refused: {s} {}", r.text().await.unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        if bad.fetch_add(1, Ordering::Relaxed) < 3 {
                            println!("refused: {e}");
                        }
                    }
                }
                i += 1;
            }
            lat.lock().unwrap().extend(mine);
        });
    }
    while set.join_next().await.is_some() {}
    let sms_cpu = per_op(cpu1, cpu_now(spid), ok.load(Ordering::Relaxed));
    let rate = ok.load(Ordering::Relaxed) as f64 / secs as f64;
    let mut l = lat.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let work = work_items(&h).await;
    println!(
        "baseline: {baseline:.0} single-row INSERT commits/s over 16 connections\n\
         sms:      {rate:.0} accepted commands/s over {conns} HTTP connections ({} refused), \
         latency p50 {:.1} ms p99 {:.1} ms; {:.0}% of baseline\n\
         CPU per baseline commit: {base_cpu}\n\
         CPU per accepted command (HTTP client included): {sms_cpu}\n\
         work items committed: {}; request log lines dropped: {}",
        bad.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
        100.0 * rate / baseline,
        work - work_before,
        h.log.dropped(),
    );
    assert_eq!(
        work - work_before,
        ok.load(Ordering::Relaxed),
        "every 200 has its work item"
    );

    // The same load from a load generator in a process of its own (wrk,
    // when installed: `apt-get install wrk`), as an SMS on another machine
    // would be: this process then only serves. Same mix: an adddevice
    // for a new device, then an addentitlement for a device added 4,097
    // requests earlier on the same wrk thread (long committed; until
    // there is one, another adddevice; wrk builds one request per thread
    // that it never sends, so the first device is never added).
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("wrk: not installed, external load generator skipped");
        return;
    }
    let dir = h.log_path.parent().unwrap().to_path_buf();
    let script = dir.join("sms.lua");
    std::fs::write(
        &script,
        format!(
            r#"
local threads = {{}}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  base = 3000000000 + tonumber(args[1]) * 1000000000 + tid * 100000000
  n = 0
end
function request()
  n = n + 1
  local path, body
  if n % 2 == 1 or n < 4100 then
    local d = base + n
    path = "/adddevice"
    body = '{{"transaction_id":"w' .. d .. '","device_id":' .. d .. '}}'
  else
    local d = base + n - 4097
    path = "/addentitlement"
    body = '{{"transaction_id":"we' .. d .. '","device_id":' .. d .. ',"product_id":1,"start":0,"end":2000000000}}'
  end
  return wrk.format("POST", path, {{["authorization"] = "{bearer}", ["content-type"] = "application/json"}}, body)
end
function response(status, headers, body)
  if status ~= 200 then
    io.write("wrk: status " .. status .. ": " .. body .. "\n")
  end
end
"#,
            bearer = &*bearer
        ),
    )
    .unwrap();
    // Windows of wrk load alternating with windows of the baseline, so
    // that each ratio compares two measurements taken seconds apart: on a
    // shared machine the baseline alone moves by a third within a run.
    let pairs = env("CASD_BENCH_PAIRS", 3).clamp(1, 5);
    let (mut rates, mut ratios) = (Vec::new(), Vec::new());
    let mut work_before = work;
    for k in 0..pairs {
        let (base_k, base_cpu_k) = baseline_window(&h, secs, spid).await;
        let wrk_cpu0 = cpu_secs(std::process::id(), true).unwrap_or(0.0);
        let cpu2 = cpu_now(spid);
        let out = tokio::process::Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--latency",
                "-s",
            ])
            .arg(&script)
            .arg(h.url("/"))
            .args(["--", &k.to_string()])
            .output()
            .await
            .unwrap();
        let cpu3 = cpu_now(spid);
        let text = String::from_utf8_lossy(&out.stdout);
        let work = work_items(&h).await;
        let accepted = work - work_before;
        work_before = work;
        // wrk's CPU: this process's children waited for, so far.
        let wrk_cpu = cpu_secs(std::process::id(), true).unwrap_or(0.0) - wrk_cpu0;
        let pick = |key: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(key))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
                .unwrap_or_else(|| "?".into())
        };
        let non2xx = text
            .lines()
            .find(|l| l.contains("Non-2xx"))
            .unwrap_or("Non-2xx or 3xx responses: 0")
            .to_owned();
        let rate = accepted as f64 / secs as f64;
        println!(
            "window {k}: baseline {base_k:.0} commits/s (CPU per commit: {base_cpu_k})\n\
             wrk:      {rate:.0} accepted commands/s over {conns} HTTP connections, latency p50 {} p99 {}; {:.0}% of this window's baseline ({})\n\
             CPU per accepted command (casd only): {}; wrk {:.0} µs",
            pick("50%"),
            pick("99%"),
            100.0 * rate / base_k,
            non2xx.trim(),
            per_op(cpu2, cpu3, accepted),
            wrk_cpu * 1e6 / accepted.max(1) as f64,
        );
        if !non2xx.ends_with(" 0") {
            println!("{text}");
        }
        assert!(out.status.success(), "wrk: {text}");
        assert!(accepted > 0, "wrk: {text}");
        rates.push(rate);
        ratios.push(100.0 * rate / base_k);
    }
    println!(
        "wrk, median of {pairs} windows: {:.0} accepted commands/s, {:.0}% of the baseline next to it",
        median(&mut rates),
        median(&mut ratios)
    );
}
