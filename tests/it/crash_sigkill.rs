//! Crash safety: the real `casd` binary (every role) is killed with SIGKILL
//! while an SMS is posting commands. After a restart, every command that was
//! answered 200 is in the database, its EMMs are made exactly once and reach
//! the air; none is doubled.

use crate::common;
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use casd::testing::{Capture, TestDb};
use mysql_async::prelude::*;
use serde_json::json;

fn start(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_casd"))
        // The test command exports the run database URL; the child uses its config file.
        .env_remove("CASD_DATABASE_URL")
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("CASD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start casd")
}

async fn wait_ready(http: &reqwest::Client, base: &str, child: &mut Child) {
    for _ in 0..2000 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "casd exited during start-up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // polling a child process, not synchronising threads
    }
    panic!("casd never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_posting_loses_and_doubles_nothing() {
    let t = TestDb::new().await;
    let mut cap = Capture::bind(0x0101).await;
    let dir = std::env::temp_dir().join(format!("casd-crash-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    let cfg_path = dir.join("casd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "{database}[metrics]\nlisten = \"\"\n[api]\nlisten = \"127.0.0.1:{port}\"\nplain_http = true\nrequest_log = \"{d}/req.jsonl\"\n\
             [keys]\nroot_key_file = \"{d}/root.key\"\n[cycler]\nlog_file = \"{d}/car.jsonl\"\nburst_interval_ms = 20\n\
             [[cycler.outputs]]\nname = \"t\"\ndestination = \"{dest}\"\nbitrate = 4000000\n",
            database = casd::testing::database_toml(&t.url),
            d = dir.display(),
            dest = cap.addr()
        ),
    )
    .unwrap();
    hw::FileKeySource::create_new(dir.join("root.key")).unwrap();

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // The token's key is published before casd starts, so that casd's key
    // set (loaded at start, refreshed every auth.key_refresh_s) knows it.
    let bearer = casd::testing::bench_bearer(&t.db).await;
    let mut child = start(&cfg_path);
    wait_ready(&http, &base, &mut child).await;

    // Four SMS connections post adddevice commands; record every 200.
    let accepted: Arc<Mutex<HashMap<u64, u64>>> = Default::default(); // request_id -> device_id
    let stop_posting = tokio_util::sync::CancellationToken::new();
    let mut posters = Vec::new();
    for w in 0..4u64 {
        let (http, base, accepted, stop, bearer) = (
            http.clone(),
            base.clone(),
            accepted.clone(),
            stop_posting.clone(),
            bearer.clone(),
        );
        posters.push(tokio::spawn(async move {
            for i in 0..10_000u64 {
                if stop.is_cancelled() {
                    break;
                }
                let device = 1 + w * 100_000 + i;
                let body =
                    json!({"transaction_id": format!("crash-{device}"), "device_id": device});
                let r = http
                    .post(format!("{base}/adddevice"))
                    .header("authorization", &bearer)
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let v: serde_json::Value = match r.json().await {
                            Ok(v) => v,
                            Err(_) => continue, // cut mid-reply: not an acknowledged 200
                        };
                        accepted
                            .lock()
                            .unwrap()
                            .insert(v["request_id"].as_u64().unwrap(), device);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::task::yield_now().await, // the process is gone
                }
            }
        }));
    }
    // Kill once a good number of commands were acknowledged.
    let guard = std::time::Instant::now() + Duration::from_secs(120);
    while accepted.lock().unwrap().len() < 150 {
        assert!(child.try_wait().unwrap().is_none());
        assert!(
            std::time::Instant::now() < guard,
            "only {} commands accepted in 120 s (see the request log)",
            accepted.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a shared counter
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop_posting.cancel();
    for p in posters {
        p.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 150);

    let mut child = start(&cfg_path);
    wait_ready(&http, &base, &mut child).await;

    // Every acknowledged command is stored, then processed.
    let mut c = t.db.conn().await.unwrap();
    let mut unprocessed = usize::MAX;
    for _ in 0..3000 {
        let rows: Vec<(u64, Option<String>)> = c
            .query("SELECT id, DATE_FORMAT(processed_at, '%s') FROM sms_requests WHERE path = '/adddevice' AND status_code = 200")
            .await
            .unwrap();
        let stored: HashMap<u64, bool> =
            rows.into_iter().map(|(id, p)| (id, p.is_some())).collect();
        for rid in accepted.keys() {
            assert!(
                stored.contains_key(rid),
                "request {rid} was answered 200 but is not in the database"
            );
        }
        unprocessed = accepted.keys().filter(|rid| !stored[rid]).count();
        if unprocessed == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // polling the database for the EMMG's progress
    }
    assert_eq!(
        unprocessed, 0,
        "acknowledged commands never processed after restart"
    );

    // Exactly one device_enable and one entitlement_set per acknowledged
    // command: nothing doubled by the redo after the crash.
    common::assert_emms_once(&mut c, accepted.keys()).await;
    let devices: Option<u64> = c.query_first("SELECT COUNT(*) FROM devices").await.unwrap();
    let work_pending: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM work_items WHERE state <> 'done'")
        .await
        .unwrap();
    assert_eq!(work_pending, Some(0));
    assert!(devices.unwrap() as usize >= accepted.len());

    // Their EMMs reach the air after the restart.
    let wanted: Vec<Vec<u8>> = c
        .query("SELECT encrypted_emm FROM emms WHERE purpose = 'device_enable' AND state = 'live'")
        .await
        .unwrap();
    let mut missing: HashSet<Vec<u8>> = wanted.into_iter().collect();
    let total = missing.len();
    while !missing.is_empty() {
        let s = cap
            .next_section(Duration::from_secs(30))
            .await
            .expect("carousel stopped");
        missing.remove(&s[..]);
    }
    assert!(total >= accepted.len());
    child.kill().unwrap();
    child.wait().unwrap();
}
