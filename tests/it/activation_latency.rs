//! Activation latency: from the SMS's 200 to the first TS packet of the
//! command's EMM at a UDP socket on 127.0.0.1, with every role in one
//! process. A benchmark, not part of the normal suite:
//!
//! ```text
//! cargo test --release -p casd --test it activation_latency:: -- --ignored --nocapture
//! ```
//! `CASD_BENCH_RATES` (default "100,1000") commands/s, `CASD_BENCH_SECS`
//! (default 5) per rate. Commands are addentitlement to 200 devices added
//! first; the EMM is recognised on air by its table_id_extension (emm_id mod
//! 65536) and device address, the emm_ids of each request coming from
//! `GET /requests/{id}` afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use casd::config::Role;
use casd::testing::{Running, TestDb};
use serde_json::json;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn activation_latency_p50_p99() {
    let rates: Vec<u64> = std::env::var("CASD_BENCH_RATES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs: u64 = std::env::var("CASD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t = TestDb::new().await;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = sock.local_addr().unwrap();
    let mut cfg = casd::testing::config(&t.url, dest);
    cfg.cycler.outputs[0].bitrate = 10_000_000;
    cfg.emmg.poll_interval_ms = 20;
    hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    let roles = vec![Role::Sms, Role::Emmg, Role::Encryptor, Role::Cycler];
    let casd = Running::start(cfg, roles).await;
    let base = casd.base.clone();
    // A client whose rate limit no benchmark reaches.
    let bearer = casd::auth::testing::bench_bearer(&t.db).await;
    let http = reqwest::Client::new();
    casd.ready().await;

    // First packet time of every (device_id, tid_ext) seen on air, stamped
    // by a receiving thread as datagrams arrive.
    let seen: Arc<Mutex<HashMap<(u64, u16), Instant>>> = Default::default();
    let s2 = seen.clone();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let recv_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rs = recv_stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !rs.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let now = Instant::now();
            for p in buf[..n].chunks(188) {
                // A section start in this packet: payload_unit_start, EMM PID.
                if p.len() < 188
                    || p[0] != 0x47
                    || p[1] & 0x40 == 0
                    || (u16::from(p[1] & 0x1F) << 8 | u16::from(p[2])) != 0x0101
                {
                    continue;
                }
                let mut i = 4 + if p[3] & 0x20 != 0 {
                    1 + p[4] as usize
                } else {
                    0
                };
                let Some(&ptr) = p.get(i) else { continue };
                i += 1 + ptr as usize;
                // Sections starting in this packet (back to back).
                while i + 16 <= 188 && p[i] == 0x82 {
                    let len = ((usize::from(p[i + 1] & 0x0F)) << 8 | usize::from(p[i + 2])) + 3;
                    let ext = u16::from_be_bytes([p[i + 3], p[i + 4]]);
                    let dev = u64::from_be_bytes(p[i + 8..i + 16].try_into().unwrap());
                    s2.lock().unwrap().entry((dev, ext)).or_insert(now);
                    i += len;
                }
            }
        }
    });

    let post = |path: &'static str, body: serde_json::Value| {
        let (http, base, bearer) = (http.clone(), base.clone(), bearer.clone());
        async move {
            let r = http
                .post(format!("{base}{path}"))
                .header("authorization", bearer)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let at = Instant::now();
            let v: serde_json::Value = r.json().await.unwrap();
            // Over capacity the headend sheds load with 503 + Retry-After: counted.
            (status == 200).then(|| (v["request_id"].as_u64().unwrap_or(0), at))
        }
    };
    for d in 1..=200u64 {
        let added = post(
            "/adddevice",
            json!({"transaction_id": format!("add-{d}"), "device_id": d}),
        )
        .await;
        assert!(added.is_some(), "adddevice {d} refused");
    }

    let mut n = 0u64;
    for rate in rates {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let total = rate * secs;
        let mut tasks = Vec::new();
        let start = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(start + interval * i as u32).await; // pacing the load generator
            n += 1;
            let device = 1 + n % 200;
            let body = json!({"transaction_id": format!("lat-{n}"), "device_id": device, "product_id": (n % 1000 + 1) as u32, "start": 1_700_000_000u32, "end": 1_900_000_000u32});
            let p = post("/addentitlement", body);
            tasks.push(tokio::spawn(async move { (device, p.await) }));
        }
        let sent_for = start.elapsed();
        let mut acked = Vec::new();
        let mut shed = 0;
        for t in tasks {
            match t.await.unwrap() {
                (device, Some(ok)) => acked.push((device, ok)),
                (_, None) => shed += 1,
            }
        }
        // Map each request to its EMMs, then to their first packet on air.
        let mut lat = Vec::new();
        // The EMMG's share: received_at to processed_at (EMMs stored), both
        // stamped by the headend.
        let mut stored = Vec::new();
        // The rest of the path, split at processed_at (a wall-clock stamp;
        // the 200 and the packet are stamped with Instant, placed on the
        // wall clock through one reading of both taken here): the 200 to
        // the EMMs stored (the EMMG taking the item, building, sealing and
        // storing its EMMs; below zero when that was done before the
        // client saw its 200), and the EMMs stored to their first packet
        // (the Cycler following the events and the carousel playing them).
        let (i0, w0) = (Instant::now(), time::OffsetDateTime::now_utc());
        let wall = |i: Instant| {
            if i >= i0 {
                w0 + i.duration_since(i0)
            } else {
                w0 - i0.duration_since(i)
            }
        };
        let (mut pickup, mut to_air) = (Vec::new(), Vec::new());
        let mut missing = 0;
        for (device, (rid, at)) in &acked {
            let deadline = Instant::now() + Duration::from_secs(30);
            let found = loop {
                let v: serde_json::Value = http
                    .get(format!("{base}/requests/{rid}"))
                    .header("authorization", &bearer)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let ids: Vec<u64> = v["emm_ids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                let first = ids
                    .iter()
                    .filter_map(|id| {
                        seen.lock()
                            .unwrap()
                            .get(&(*device, (*id % 65536) as u16))
                            .copied()
                    })
                    .min();
                if let Some(f) = first {
                    let ts = |k: &str| {
                        v[k].as_str().and_then(|t| {
                            time::OffsetDateTime::parse(
                                t,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .ok()
                        })
                    };
                    if let (Some(r), Some(p)) = (ts("received_at"), ts("processed_at")) {
                        stored.push((p - r).as_seconds_f64() * 1e3);
                        pickup.push((p - wall(*at)).as_seconds_f64() * 1e3);
                        to_air.push((wall(f) - p).as_seconds_f64() * 1e3);
                    }
                    break Some(f);
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await; // waiting for the air, polled
            };
            match found {
                Some(f) => lat.push(f.saturating_duration_since(*at).as_secs_f64() * 1e3),
                None => missing += 1,
            }
        }
        let offered = total as f64 / sent_for.as_secs_f64();
        println!(
            "activation latency at {rate} commands/s offered ({offered:.0}/s achieved by the generator): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} commands ({missing} never seen, {shed} shed with 503); received to EMMs stored: p50 {:.1} ms, p99 {:.1} ms\n  \
             the 200 to EMMs stored: p50 {:.1} ms, p99 {:.1} ms; EMMs stored to first packet: p50 {:.1} ms, p99 {:.1} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut lat, 1.0),
            lat.len(),
            pct(&mut stored, 0.5),
            pct(&mut stored, 0.99),
            pct(&mut pickup, 0.5),
            pct(&mut pickup, 0.99),
            pct(&mut to_air, 0.5),
            pct(&mut to_air, 0.99),
        );
    }
    recv_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    receiver.join().unwrap();
    casd.shutdown().await.unwrap();
}
