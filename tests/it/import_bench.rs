//! Benchmark (ignored): `casd devices import` rate in devices/s, beside a
//! baseline measured in the same run on the same server: raw batched
//! multi-row INSERTs of device-shaped rows, one COMMIT per 500 rows (what
//! a loader with no slots, requests, idempotency or work items would do).
//!
//! `CASD_BENCH_DEVICES=1000000 cargo test --release -p casd --test it import_bench:: -- --ignored --nocapture`

use std::io::Write;
use std::time::Instant;

use casd::testing::TestDb;
use mysql_async::prelude::*;

fn devices() -> u64 {
    std::env::var("CASD_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Rows/s of raw batched INSERT … VALUES (…),(…) with a COMMIT per 500.
async fn raw_inserts(c: &mut mysql_async::Conn, n: u64) -> f64 {
    c.query_drop(
        "CREATE TABLE bench_raw (device_id BIGINT UNSIGNED NOT NULL PRIMARY KEY, \
         state ENUM('enabled','disabled') NOT NULL, group_id INT UNSIGNED, slot TINYINT UNSIGNED, \
         pmk_version INT UNSIGNED NOT NULL, created_at DATETIME(6) NOT NULL, \
         updated_at DATETIME(6) NOT NULL, UNIQUE KEY (group_id, slot)) ENGINE=InnoDB",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut d = 0u64;
    while d < n {
        let rows: Vec<String> = (d..(d + 500).min(n))
            .map(|i| {
                format!(
                    "({},'enabled',{},{},1,UTC_TIMESTAMP(6),UTC_TIMESTAMP(6))",
                    i + 1,
                    i / 256 + 1,
                    i % 256
                )
            })
            .collect();
        d += rows.len() as u64;
        c.query_drop(format!(
            "START TRANSACTION; INSERT INTO bench_raw VALUES {}; COMMIT",
            rows.join(",")
        ))
        .await
        .unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
async fn import_rate_beside_raw_batched_inserts() {
    let n = devices();
    let t = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("casd-import-bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("devices.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    for d in 1..=n {
        writeln!(f, "{d}").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let cfg = casd::testing::config(&t.url, "127.0.0.1:9".parse().unwrap());
    hw::FileKeySource::create_new(&cfg.keys.root_key_file).ok();
    casd::app::open_keystore(&cfg, &t.db).await.unwrap();
    let mut c = t.db.conn().await.unwrap();
    let raw = raw_inserts(&mut c, n).await;

    let started = Instant::now();
    let sum = casd::import::import_file(
        &t.db,
        &file,
        500,
        cfg.cas.max_section_bytes,
        casd::queue::BulkPace::from_config(&cfg),
        &mut |_| {},
        &mut |line, why| panic!("line {line}: {why}"),
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(sum.devices_added, n);
    let rate = n as f64 / secs;
    println!(
        "import: {n} devices in {secs:.1} s = {rate:.0} devices/s; raw batched inserts (500 rows per COMMIT), same run: {raw:.0} rows/s; ratio {:.3}",
        rate / raw
    );
    std::fs::remove_dir_all(&dir).ok();
}
