//! `casd devices import` (src/import.rs), the real binary on a real
//! MariaDB: a 50,000-device import killed half-way (SIGKILL) and rerun
//! stores every device and entitlement once; bad lines are reported with
//! their numbers and the rest is imported; the work items are bulk and
//! paced (emmg.bulk_bandwidth_share).

use crate::common;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use casd::testing::TestDb;
use mysql_async::prelude::*;

const START: u32 = 1_767_225_600; // 2026-01-01
const END: u32 = 1_798_761_600; // 2027-01-01

fn import(cfg: &Path, file: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_casd"));
    c.env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "warn")
        .arg("--config")
        .arg(cfg)
        .args(["devices", "import"])
        .arg(file)
        .stdin(Stdio::null());
    c
}

async fn count(c: &mut mysql_async::Conn, sql: &str) -> u64 {
    c.query_first::<u64, _>(sql).await.unwrap().unwrap_or(0)
}

/// Device i has i % 3 entitlements (products 1 and 2).
fn write_csv(path: &Path, devices: u64) -> u64 {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "device_id,product_id,start,end").unwrap();
    let mut ents = 0;
    for d in 1..=devices {
        write!(f, "{d}").unwrap();
        for p in 1..=(d % 3) {
            write!(f, ",{p},{START},{END}").unwrap();
            ents += 1;
        }
        writeln!(f).unwrap();
    }
    ents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_devices_killed_half_way_and_rerun_none_missing_none_doubled() {
    const N: u64 = 50_000;
    let t = TestDb::new().await;
    let dir = common::temp_dir("import");
    let cfg = common::cli_config(&dir, &t.url, "");
    let init = common::casd_cli(&cfg, &["keys", "init", "--if-missing"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let file = dir.join("devices.csv");
    let ents = write_csv(&file, N);
    let mut c = t.db.conn().await.unwrap();

    // First run: killed once a third of the devices are in.
    let mut child = import(&cfg, &file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = 0;
    for _ in 0..30_000 {
        seen = count(&mut c, "SELECT COUNT(*) FROM devices").await;
        if seen >= N / 3 || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // polling another process's progress
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = count(&mut c, "SELECT COUNT(*) FROM devices").await;
    assert!(
        seen >= N / 3 && at_kill < N,
        "killed with {at_kill} of {N} devices in"
    );

    // The rerun completes it.
    let out = import(&cfg, &file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{N} lines")), "{stdout}");
    assert!(stdout.contains(" 0 bad lines"), "{stdout}");

    let commands = N + ents;
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM devices WHERE state = 'enabled'"
        )
        .await,
        N
    );
    assert_eq!(
        count(&mut c, "SELECT COUNT(DISTINCT group_id, slot) FROM devices").await,
        N
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM group_slots WHERE device_id IS NOT NULL"
        )
        .await,
        N
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM entitlements WHERE state = 'active'"
        )
        .await,
        ents
    );
    // Entitlements as in the file: device d holds products 1..=d%3.
    let wrong: u64 = count(
        &mut c,
        &format!(
            "SELECT COUNT(*) FROM devices d LEFT JOIN entitlements e ON e.device_id = d.device_id \
             GROUP BY d.device_id HAVING COUNT(e.product_id) <> d.device_id % 3 \
             OR SUM(e.start_at <> {START} OR e.end_at <> {END}) > 0 LIMIT 1"
        ),
    )
    .await;
    assert_eq!(wrong, 0, "a device's entitlements differ from the file");
    // Nothing doubled: one stored request, idempotency row and work item per command.
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM sms_requests WHERE sender = 'casd:import'"
        )
        .await,
        commands
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM idempotency WHERE sender = 'casd:import'"
        )
        .await,
        commands
    );
    assert_eq!(
        count(&mut c, "SELECT COUNT(*) FROM work_items").await,
        commands
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT COUNT(*) FROM work_items WHERE payload LIKE '%\"bulk\":true%'"
        )
        .await,
        commands
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_reported_by_number_and_the_rest_is_imported_paced() {
    let t = TestDb::new().await;
    let dir = common::temp_dir("import-bad");
    // 1 Mbit/s, burst 3, a tenth of it: items 10/4 times the quarter's spacing apart.
    let cfg = common::cli_config(
        &dir,
        &t.url,
        "[emmg]\nbulk_bandwidth_share = 0.1\n[cycler]\nburst_count = 3\n[[cycler.outputs]]\nname = \"t\"\ndestination = \"127.0.0.1:9\"\nbitrate = 1000000\n",
    );
    let init = common::casd_cli(&cfg, &["keys", "init", "--if-missing"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let file = dir.join("devices.jsonl");
    let lines = [
        r#"{"device_id": 1}"#, // 1
        r#"{"device_id": 0}"#, // 2 bad
        "",                    // 3
        "# a comment",         // 4
        r#"{"device_id": 2, "entitlements": [{"product_id": 7, "start": 1767225600, "end": "2027-01-01T00:00:00Z"}]}"#, // 5
        r#"{"device_id": 3"#, // 6 bad
        r#"{"device_id": 4, "entitlements": [{"product_id": 7, "start": 20, "end": 10}]}"#, // 7 bad
        r#"{"device_id": 5, "colour": "red"}"#, // 8 bad
        r#"{"device_id": 6}"#, // 9
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = import(&cfg, &file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "bad lines must make the exit status fail"
    );
    for n in [2, 6, 7, 8] {
        assert!(
            stderr.contains(&format!("devices.jsonl:{n}: ")),
            "line {n} not reported: {stderr}"
        );
    }
    for n in [1, 5, 9] {
        assert!(
            !stderr.contains(&format!("devices.jsonl:{n}: ")),
            "line {n} reported: {stderr}"
        );
    }
    assert!(
        stdout.contains("3 devices added") && stdout.contains("1 entitlements added"),
        "{stdout}"
    );
    assert!(stdout.contains("4 bad lines"), "{stdout}");
    let mut c = t.db.conn().await.unwrap();
    let devices: Vec<u64> = c
        .query("SELECT device_id FROM devices ORDER BY device_id")
        .await
        .unwrap();
    assert_eq!(devices, [1, 2, 6]);
    let ent: Vec<(u64, u32, u32, u32)> = c
        .query("SELECT device_id, product_id, start_at, end_at FROM entitlements")
        .await
        .unwrap();
    assert_eq!(ent, [(2, 7, START, END)]);

    // Paced: each item one spacing after the one before (4 items).
    let spacing = casd::queue::spacing(1_000_000, 3, 0.1).as_micros() as i64;
    let due: Vec<i64> = c
        .query("SELECT CAST(TIMESTAMPDIFF(MICROSECOND, '2026-01-01', not_before) AS SIGNED) FROM work_items ORDER BY id")
        .await
        .unwrap();
    assert_eq!(due.len(), 4);
    for w in due.windows(2) {
        assert!(
            (w[1] - w[0] - spacing).abs() <= 1,
            "items {w:?} not {spacing} µs apart"
        );
    }
    // Items made an hour ago and paced for later are no backlog (the
    // CasdEmmBacklog alarm); once one is due a minute, it is.
    c.query_drop("UPDATE work_items SET created_at = created_at - INTERVAL 1 HOUR, not_before = not_before + INTERVAL 1 HOUR")
        .await
        .unwrap();
    let (pending, age) = casd::queue::backlog(&mut c).await.unwrap();
    assert_eq!((pending, age), (4, 0.0));
    c.query_drop("UPDATE work_items SET not_before = UTC_TIMESTAMP(6) - INTERVAL 61 SECOND ORDER BY id LIMIT 1")
        .await
        .unwrap();
    let (_, age) = casd::queue::backlog(&mut c).await.unwrap();
    assert!((61.0..120.0).contains(&age), "{age}");
    c.query_drop("UPDATE work_items SET not_before = UTC_TIMESTAMP(6)")
        .await
        .unwrap();

    // A rerun stores nothing new and reports the same lines.
    let again = import(&cfg, &file).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 devices added, 0 already present, 0 entitlements added, 4 commands already stored, 4 bad lines"),
        "{}", String::from_utf8_lossy(&again.stdout));
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM work_items").await, 4);
    std::fs::remove_dir_all(&dir).ok();
}
