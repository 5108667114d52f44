//! Lossless failover (issue 19): a private primary + semi-synchronous
//! replica pair on 127.0.0.1 (brought up by scripts/mariadb.sh through
//! `casd::testing::mariadb`, never the shared test server), a headend with
//! every role configured with both servers, 16 SMS clients posting. The
//! primary gets SIGKILL, `casd db promote` promotes the replica, and casd
//! goes on by itself. Then: every 200 is on the new primary, processed and
//! on air exactly once; the carousel never stopped; the commands refused
//! meanwhile left nothing half-written; the old primary restarted is
//! read-only and casd does not write to it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use casd::config::Role;
use casd::db::{Db, DbErrorKind};
use casd::testing::mariadb::Pair;
use casd::testing::{Capture, Running};
use mysql_async::prelude::*;
use serde_json::json;

const CLIENTS: u64 = 16;

/// What the SMS clients saw.
#[derive(Default)]
struct Seen {
    /// request_id -> (device_id, when the 200 arrived).
    accepted: HashMap<u64, (u64, Instant)>,
    /// device_id of every command not answered 200 (503, or no answer).
    refused: Vec<u64>,
    unavailable: usize,
}

/// The [`CLIENTS`] SMS clients posting until stopped.
struct Clients {
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
    posters: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(base: &str, bearer: &str) -> Clients {
        let seen: Arc<Mutex<Seen>> = Default::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let posters = (0..CLIENTS)
            .map(|c| post_until(stop.clone(), base.into(), bearer.into(), seen.clone(), c))
            .collect();
        Clients {
            seen,
            stop,
            posters,
        }
    }

    async fn stop(self) -> Seen {
        self.stop.cancel();
        for p in self.posters {
            p.await.unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn post_until(
    stop: tokio_util::sync::CancellationToken,
    base: String,
    bearer: String,
    seen: Arc<Mutex<Seen>>,
    client: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        for i in 0.. {
            if stop.is_cancelled() {
                return;
            }
            let device = 1 + client * 1_000_000 + i;
            let body = json!({"transaction_id": format!("fo-{device}"), "device_id": device});
            let r = http
                .post(format!("{base}/adddevice"))
                .header("authorization", &bearer)
                .json(&body)
                .send()
                .await;
            // request_id of a 200; else whether it was a 503 (with Retry-After).
            let outcome: Result<u64, bool> = match r {
                Ok(r) if r.status() == 200 => {
                    let v: Result<serde_json::Value, _> = r.json().await;
                    v.ok().and_then(|v| v["request_id"].as_u64()).ok_or(false)
                }
                Ok(r) if r.status() == 503 => {
                    assert!(
                        r.headers().contains_key("retry-after"),
                        "a 503 without Retry-After"
                    );
                    Err(true)
                }
                _ => Err(false),
            };
            {
                let mut s = seen.lock().unwrap();
                match outcome {
                    Ok(rid) => {
                        s.accepted.insert(rid, (device, Instant::now()));
                        continue;
                    }
                    Err(unavailable) => {
                        s.unavailable += usize::from(unavailable);
                        s.refused.push(device);
                    }
                }
            }
            // Refused: the SMS backs off a little (Retry-After says seconds;
            // a test keeps it short), then posts its next command.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn scrape(run: &Running) -> String {
    let at = run.metrics.expect("metrics endpoint");
    reqwest::get(format!("http://{at}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls the metrics endpoint until `line` is in it (or 30 s: a guard).
async fn wait_metric(run: &Running, line: &str) {
    let guard = Instant::now() + Duration::from_secs(30);
    while !scrape(run).await.lines().any(|l| l == line) {
        assert!(Instant::now() < guard, "metrics never showed {line:?}");
        tokio::time::sleep(Duration::from_millis(100)).await; // polling a scrape
    }
}

/// A headend with `roles` (and metrics) on `pair`, both servers in
/// `database.servers`, ready; and a bearer token for its SMS routes.
async fn start_on(
    pair: &Pair,
    output: std::net::SocketAddr,
    roles: Vec<Role>,
) -> (Running, String) {
    let mut cfg = casd::testing::config(&pair.url, output);
    cfg.database.servers = pair.servers.clone();
    cfg.database.tls = casd::config::DbTlsMode::Required;
    cfg.database.tls_ca = Some(pair.ca());
    hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    let setup = Db::with_servers(
        &pair.url,
        &pair.tls(),
        &pair.servers,
        4,
        Duration::from_secs(2),
    )
    .unwrap();
    setup.migrate().await.unwrap();
    let bearer = casd::testing::bench_bearer(&setup).await;
    let casd = Running::start_with_metrics(cfg, roles).await;
    casd.ready().await;
    (casd, bearer)
}

/// Polls `/readyz` until it answers 503 (or 20 s: a guard); its body.
async fn readyz_until_not_ready(run: &Running) -> String {
    let guard = Instant::now() + Duration::from_secs(20);
    loop {
        let r = reqwest::get(format!("{}/readyz", run.base)).await.unwrap();
        if r.status() == 503 {
            return r.text().await.unwrap();
        }
        assert!(
            Instant::now() < guard,
            "/readyz stayed ready without a primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the endpoint
    }
}

/// `casd db promote` on the pair: Ok(stdout) or Err(stderr).
fn promote(pair: &Pair) -> Result<String, String> {
    let dir = pair.dir.join("promote");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("casd.toml");
    std::fs::write(
        &conf,
        format!(
            "[database]\nurl = \"{}\"\nservers = [\"{}\", \"{}\"]\ntls_ca = \"{}\"\n[api]\nplain_http = true\n\
             [metrics]\nlisten = \"\"\n",
            pair.url,
            pair.servers[0],
            pair.servers[1],
            pair.ca().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_casd"))
        .env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "warn")
        .arg("--config")
        .arg(&conf)
        .args([
            "db",
            "promote",
            "--admin-user",
            "casd_admin",
            "--admin-password-file",
        ])
        .arg(pair.admin_password_file())
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_replica_promoted_nothing_lost() {
    let pair = Pair::up(1000);
    let mut cap = Capture::bind(0x0101).await;
    let (casd, bearer) = start_on(&pair, cap.addr(), Role::ALL.to_vec()).await;
    wait_metric(&casd, "casd_database_semi_sync_active 1").await;
    // While the primary is writable, promote refuses (no split brain).
    let refused = promote(&pair).expect_err("promoted next to a live primary");
    assert!(refused.contains("is writable"), "{refused}");

    let clients = Clients::start(&casd.base, &bearer);
    let seen = clients.seen.clone();
    let guard = Instant::now() + Duration::from_secs(120);
    while seen.lock().unwrap().accepted.len() < 300 {
        assert!(Instant::now() < guard, "too few commands accepted");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a shared counter
    }
    // A first EMM on air before the kill: the carousel is playing.
    cap.next_section(Duration::from_secs(30))
        .await
        .expect("carousel playing");

    let gap_before = cap.take_largest_gap();
    let killed = Instant::now();
    let before = seen.lock().unwrap().accepted.len();
    pair.kill9("a");
    // No writable server: not ready (the watcher notices within 500 ms).
    let not_ready = readyz_until_not_ready(&casd).await;
    assert!(not_ready.contains("database"), "{not_ready}");
    let report = promote(&pair).expect("casd db promote");
    let promoted = Instant::now();
    assert!(report.contains("promoted"), "{report}");
    // casd finds the new primary by itself: wait for 200s again.
    let resumed = loop {
        let first_after = seen
            .lock()
            .unwrap()
            .accepted
            .values()
            .filter(|(_, at)| *at > promoted)
            .map(|(_, at)| *at)
            .min();
        if let Some(at) = first_after {
            break at;
        }
        assert!(
            Instant::now() < guard,
            "casd never accepted a command after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a shared counter
    };
    while seen.lock().unwrap().accepted.len() < before + 300 {
        assert!(
            Instant::now() < guard,
            "too few commands accepted after the failover"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a shared counter
    }
    let seen = clients.stop().await;
    // The new primary has no replica: semi-sync fell back, alarmed.
    wait_metric(&casd, "casd_database_semi_sync_active 0").await;
    eprintln!(
        "failover: kill -9 -> promote done {:?}; -> first 200 {:?} (promote -> first 200 {:?}); \
         {} accepted, {} refused ({} with 503)",
        promoted - killed,
        resumed - killed,
        resumed - promoted,
        seen.accepted.len(),
        seen.refused.len(),
        seen.unavailable
    );

    let b = Db::with_tls(&pair.url_of("b"), &pair.tls(), 4, Duration::from_secs(2)).unwrap();
    every_200_stored_once_and_processed(&b, &seen).await;
    refused_left_nothing_half_written(&b, &seen).await;
    every_200_on_air(&b, &seen, &mut cap).await;
    let gap = cap.largest_gap();
    eprintln!(
        "failover: largest gap between datagrams from the kill on {gap:?} (before it: {gap_before:?})"
    );
    assert!(
        gap < Duration::from_secs(2),
        "the carousel stalled for {gap:?}"
    );
    assert!(cap.errors.is_empty(), "stream errors: {:?}", cap.errors);

    old_primary_is_fenced(&pair, &casd, &bearer, &b).await;
    casd.shutdown().await.unwrap();
}

async fn every_200_stored_once_and_processed(b: &Db, seen: &Seen) {
    let mut c = b.conn().await.unwrap();
    let guard = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: Vec<(u64, u16, bool)> = c
            .query("SELECT id, status_code, processed_at IS NOT NULL FROM sms_requests WHERE path = '/adddevice'")
            .await
            .unwrap();
        let stored: HashMap<u64, (u16, bool)> =
            rows.into_iter().map(|(id, s, p)| (id, (s, p))).collect();
        for rid in seen.accepted.keys() {
            let (status, _) = stored
                .get(rid)
                .unwrap_or_else(|| panic!("request {rid} got a 200 but is not on the new primary"));
            assert_eq!(*status, 200, "request {rid}");
        }
        if seen.accepted.keys().all(|rid| stored[rid].1) {
            break;
        }
        assert!(Instant::now() < guard, "accepted commands never processed");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the EMMG's progress
    }
    crate::common::assert_emms_once(&mut c, seen.accepted.keys()).await;
    let doubled: Vec<(u64, u64)> = c
        .query("SELECT address, COUNT(*) FROM emms WHERE purpose = 'device_enable' AND state = 'live' GROUP BY address HAVING COUNT(*) > 1")
        .await
        .unwrap();
    assert!(
        doubled.is_empty(),
        "devices enabled twice on air: {doubled:?}"
    );
}

/// A refused command is either wholly there (its commit reached the
/// replica before the primary died: the SMS's retry gets the stored
/// reply) or not at all.
async fn refused_left_nothing_half_written(b: &Db, seen: &Seen) {
    let mut c = b.conn().await.unwrap();
    for device in &seen.refused {
        let tx = format!("fo-{device}");
        let device_row: Option<u64> = c
            .exec_first(
                "SELECT device_id FROM devices WHERE device_id = ?",
                (device,),
            )
            .await
            .unwrap();
        let idem: Option<u64> = c
            .exec_first(
                "SELECT request_id FROM idempotency WHERE transaction_id = ?",
                (&tx,),
            )
            .await
            .unwrap();
        let ok: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM sms_requests WHERE transaction_id = ? AND status_code = 200",
                (&tx,),
            )
            .await
            .unwrap();
        let whole = device_row.is_some() && idem.is_some() && ok == Some(1);
        let none = device_row.is_none() && idem.is_none() && ok == Some(0);
        assert!(
            whole || none,
            "refused {tx} half-written: device {device_row:?}, idempotency {idem:?}, 200 rows {ok:?}"
        );
    }
}

async fn every_200_on_air(b: &Db, seen: &Seen, cap: &mut Capture) {
    let mut c = b.conn().await.unwrap();
    let wanted: Vec<(u64, Vec<u8>)> = c
        .query("SELECT request_id, encrypted_emm FROM emms WHERE purpose = 'device_enable' AND state = 'live' AND request_id IS NOT NULL")
        .await
        .unwrap();
    let mut missing: HashSet<Vec<u8>> = wanted
        .into_iter()
        .filter(|(rid, _)| seen.accepted.contains_key(rid))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(missing.len(), seen.accepted.len());
    while !missing.is_empty() {
        let s = cap
            .next_section(Duration::from_secs(30))
            .await
            .expect("carousel stopped");
        missing.remove(&s[..]);
    }
}

async fn old_primary_is_fenced(pair: &Pair, casd: &Running, bearer: &str, b: &Db) {
    pair.restart("a");
    let a = Db::with_tls(&pair.url_of("a"), &pair.tls(), 2, Duration::from_secs(2)).unwrap();
    let mut c = a.conn().await.unwrap();
    let ro: Option<u8> = c.query_first("SELECT @@global.read_only").await.unwrap();
    assert_eq!(ro, Some(1), "the old primary came back writable");
    let write = c
        .query_drop("INSERT INTO schema_migrations VALUES (999, 'x', REPEAT('x', 32), NOW())")
        .await
        .expect_err("the casd user wrote to a read-only server");
    assert_eq!(casd::db::classify(&write), DbErrorKind::ReadOnly, "{write}");
    drop(c);
    // Configured with the fenced server alone, casd finds nothing to write to.
    let only_a = Db::with_servers(
        &pair.url,
        &pair.tls(),
        &pair.servers[..1],
        2,
        Duration::from_secs(2),
    )
    .unwrap();
    let err = only_a.ping().await.expect_err("wrote to a fenced server");
    assert!(err.to_string().contains("no writable"), "{err}");
    // The running headend keeps writing to the new primary, not to it.
    let r = reqwest::Client::new()
        .post(format!("{}/adddevice", casd.base))
        .header("authorization", bearer)
        .json(&json!({"transaction_id": "fo-after-fence", "device_id": 999_999_999u64}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let on = |db: &Db| {
        let db = db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            let n: Option<u64> = c
                .query_first("SELECT COUNT(*) FROM devices WHERE device_id = 999999999")
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(on(b).await, Some(1));
    assert_eq!(on(&a).await, Some(0));
}

/// Accepted commands per second with the semi-synchronous replica attached
/// (each COMMIT waits for its ack) vs without (replica stopped, semi-sync
/// off), alternating windows in one run on one private pair. Not part of
/// the normal suite:
///
/// ```text
/// cargo test --release -p casd --test it db_failover::bench -- --ignored --nocapture
/// ```
/// `CASD_TEST_BENCH_SECS` (default 3) and `CASD_TEST_BENCH_PAIRS` (default
/// 5) tune it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_replica_attached_vs_not() {
    let env = |n: &str, d: u64| {
        std::env::var(n)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (secs, pairs) = (
        env("CASD_TEST_BENCH_SECS", 3),
        env("CASD_TEST_BENCH_PAIRS", 5),
    );
    let pair = Pair::up(10_000);
    let (casd, bearer) = start_on(&pair, "127.0.0.1:9".parse().unwrap(), vec![Role::Sms]).await;
    let clients = Clients::start(&casd.base, &bearer);
    let seen = clients.seen.clone();
    let count = || seen.lock().unwrap().accepted.len() as f64;
    let window = || async {
        let (n0, t0) = (count(), Instant::now());
        tokio::time::sleep(Duration::from_secs(secs)).await; // the measured window
        (count() - n0) / t0.elapsed().as_secs_f64()
    };
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        attach(&pair, true).await;
        let w = window().await;
        attach(&pair, false).await;
        let wo = window().await;
        eprintln!("replica attached {w:.0}/s, not {wo:.0}/s");
        with.push(w);
        without.push(wo);
        ratios.push(w / wo);
    }
    drop(seen);
    let seen = clients.stop().await;
    assert_eq!(seen.unavailable, 0, "503s during the benchmark");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (lo, hi) = (
        ratios.iter().cloned().fold(f64::MAX, f64::min),
        ratios.iter().cloned().fold(0.0, f64::max),
    );
    eprintln!(
        "accepted commands/s, 16 clients, {pairs} pairs of {secs} s windows: replica attached \
         (semi-sync AFTER_SYNC) {:.0}/s, without {:.0}/s; ratio {:.3} ({lo:.3}-{hi:.3})",
        median(&mut with),
        median(&mut without),
        median(&mut ratios)
    );
    casd.shutdown().await.unwrap();
}

/// Replica `b` replicating with the primary's semi-sync on and active, or
/// stopped with semi-sync off.
async fn attach(pair: &Pair, on: bool) {
    if !on {
        pair.sql("b", "STOP SLAVE");
        pair.sql("a", "SET GLOBAL rpl_semi_sync_master_enabled = OFF");
        return;
    }
    pair.sql("a", "SET GLOBAL rpl_semi_sync_master_enabled = ON");
    pair.sql("b", "START SLAVE");
    let guard = Instant::now() + Duration::from_secs(60);
    while pair.sql("a", "SHOW STATUS LIKE 'Rpl_semi_sync_master_status'")
        != "Rpl_semi_sync_master_status\tON"
    {
        assert!(Instant::now() < guard, "semi-sync never became active");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the server's status
    }
}
