//! `casd plan` as an operator runs it: the binary, a configuration file,
//! a migrated database with a few devices; the JSON checked against the
//! contract's arithmetic (docs/operations.md, "Sizing EMM bandwidth").

use casd::testing::TestDb;
use mysql_async::prelude::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casd_plan_sizes_a_rotation_and_an_import_from_the_live_carousel() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    // Three enabled devices in two groups.
    c.query_drop(
        "INSERT INTO devices (device_id, state, group_id, slot, pmk_version, created_at, updated_at) VALUES \
         (1, 'enabled', 1, 0, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)), \
         (2, 'enabled', 1, 1, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)), \
         (3, 'enabled', 2, 0, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)); \
         INSERT INTO group_slots (group_id, slot, device_id) VALUES (1, 0, 1), (1, 1, 2), (2, 0, 3)",
    )
    .await
    .unwrap();
    let cfg = std::env::temp_dir().join(format!("casd-plan-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "{}[api]\nplain_http = true\n\
             [[cycler.outputs]]\nname = \"main\"\ndestination = \"127.0.0.1:9\"\nbitrate = 1000000\n",
            casd::testing::database_toml(&t.url)
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_casd"))
            .arg("--config")
            .arg(&cfg)
            .arg("plan")
            .args(args)
            .env_remove("CASD_DATABASE_URL")
            .env("CASD_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    let v: Value = serde_json::from_str(&run(&["--json", "--import", "1000"])).unwrap();
    assert_eq!(v["live"]["devices"], 3);
    assert_eq!(v["live"]["groups"], 2);
    let o = &v["outputs"][0];
    assert_eq!(o["output"], "main");
    assert_eq!(o["rotation_groups"], 2);
    // 1,000 devices × 257 bytes × 8 × 188/184 / 1 Mbit/s, first sent 3 times.
    let per_pass = 257_000.0 * 8.0 * 188.0 / 184.0 / 1e6;
    let import = o["import_first_send_s"].as_f64().unwrap();
    assert!((import - 3.0 * per_pass).abs() < 1e-6, "{o}");
    let classes: Vec<&str> = o["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(classes, ["urgent", "change", "background"]);
    // A million devices: 3,907 group EMMs, well under 30 s of air.
    let v: Value = serde_json::from_str(&run(&["--json", "--devices", "1000000"])).unwrap();
    let o = &v["outputs"][0];
    assert_eq!(o["rotation_groups"], 3907);
    let once = o["rotation_once_s"].as_f64().unwrap();
    assert!((5.6..5.7).contains(&once), "{o}");
    let text = run(&["--devices", "1000000"]);
    assert!(text.contains("output main at 1000000 bit/s"), "{text}");
    assert!(
        text.contains("rotation   3907 groups: one pass 5.6 s"),
        "{text}"
    );
    let _ = std::fs::remove_file(&cfg);
}
