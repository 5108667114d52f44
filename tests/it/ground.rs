//! The ground: migrations, readiness, the command line's error messages.

use std::process::Command;
use std::time::Duration;

use casd::config::{Config, Role};
use casd::testing::{Running, TestDb};
use mysql_async::prelude::*;

#[tokio::test]
async fn migrations_are_recorded_and_idempotent() {
    let t = TestDb::new().await;
    // Already migrated by TestDb; a second run applies nothing.
    assert_eq!(t.db.migrate().await.unwrap(), Vec::<u32>::new());
    assert!(t.db.migrations_current().await.unwrap());
    let mut c = t.db.conn().await.unwrap();
    let n: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM schema_migrations")
        .await
        .unwrap();
    assert_eq!(n, Some(casd::db::MIGRATIONS.len() as u64));
    for table in [
        "sms_requests",
        "devices",
        "entitlements",
        "emms",
        "keys",
        "work_items",
        "leases",
        "oauth_clients",
        "group_slots",
        "idempotency",
        "carousel_events",
        "job_runs",
    ] {
        let found: Option<String> = c
            .exec_first("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?", (table,))
            .await
            .unwrap();
        assert_eq!(found.as_deref(), Some(table));
    }
}

#[tokio::test]
async fn two_processes_migrating_at_once_apply_each_file_once() {
    let t = TestDb::new().await;
    // A fresh, empty database next to it, migrated by two pools concurrently.
    let mut admin = t.db.conn().await.unwrap();
    let name = format!("{}_x", t.name);
    admin
        .query_drop(format!("CREATE DATABASE `{name}`"))
        .await
        .unwrap();
    let url = format!("{}/{}", casd::testing::server_url(), name);
    let a = casd::db::Db::new(&url, 2, Duration::from_secs(5)).unwrap();
    let b = casd::db::Db::new(&url, 2, Duration::from_secs(5)).unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    // Exactly one of them applied everything; the other found nothing to do.
    assert_eq!(
        ra.len() + rb.len(),
        casd::db::MIGRATIONS.len(),
        "{ra:?} {rb:?}"
    );
    assert!(a.migrations_current().await.unwrap());
    a.close().await;
    b.close().await;
    admin
        .query_drop(format!("DROP DATABASE `{name}`"))
        .await
        .unwrap();
}

fn test_config(url: &str) -> Config {
    let database = casd::testing::database_toml(url);
    let text = format!(
        "{database}[metrics]\nlisten = \"\"\n[api]\nplain_http = true\nrequest_log = \"{dir}/req.jsonl\"\n[cycler]\nlog_file = \"{dir}/car.jsonl\"\n",
        dir = std::env::temp_dir().display()
    );
    Config::from_toml_str(&text, std::path::Path::new("test.toml"), std::iter::empty()).unwrap()
}

#[tokio::test]
async fn healthz_and_readyz_answer_over_real_http() {
    let t = TestDb::new().await;
    let cfg = test_config(&t.url);
    let casd = Running::start(cfg, vec![Role::Cycler]).await;
    // Readiness is reached once the role reports started; `ready` polls the
    // endpoint itself (the thing under test).
    assert_eq!(casd.ready().await["status"], "ready");
    let h = reqwest::get(format!("{}/healthz", casd.base))
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    casd.shutdown().await.unwrap();
}

#[tokio::test]
async fn readyz_is_503_when_migrations_are_missing() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    c.query_drop("DELETE FROM schema_migrations").await.unwrap();
    drop(c);
    let mut cfg = test_config(&t.url);
    cfg.database.migrate_on_start = false;
    let casd = Running::start(cfg, vec![Role::Cycler]).await;
    let client = reqwest::Client::new();
    let mut body = None;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{}/readyz", casd.base)).send().await {
            assert_eq!(r.status(), 503);
            body = Some(r.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::task::yield_now().await;
    }
    let body = body.expect("readyz never answered");
    assert!(
        body["problems"]
            .to_string()
            .contains("migrations not applied"),
        "{body}"
    );
    casd.shutdown().await.unwrap();
}

fn casd_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_casd"));
    // The test command exports the run database URL; the child uses its config file.
    c.env_remove("CASD_DATABASE_URL");
    c
}

fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::write(text)
}

mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(text: &str) -> TempPath {
        let p = std::env::temp_dir().join(format!(
            "casd-cfg-{}-{:08x}.toml",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&p, text).unwrap();
        TempPath(p)
    }
}

#[test]
fn misspelt_key_gives_one_clear_line() {
    let f = write_config("[database]\nurl = \"mysql://u:pw@127.0.0.1:1/x\"\n[api]\nplain_http = true\nlisen = \"127.0.0.1:1\"\n");
    let out = casd_bin()
        .args(["--config"])
        .arg(&f.0)
        .args(["config", "check"])
        .env_remove("CASD_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("api") && err.contains("lisen"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("pw"), "{err}");
}

#[test]
fn unreachable_database_gives_one_clear_line() {
    // Port 1 on loopback: nothing listens there.
    let f = write_config("[database]\nurl = \"mysql://u:secretpw@127.0.0.1:1/x\"\nconnect_timeout_s = 2\n[metrics]\nlisten = \"\"\n[api]\nplain_http = true\nlisten = \"127.0.0.1:0\"\n");
    let out = casd_bin()
        .arg("--config")
        .arg(&f.0)
        .arg("migrate")
        .env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the database at mysql://u@127.0.0.1:1/x"),
        "{err}"
    );
    assert!(
        !err.contains("secretpw") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn help_lists_the_commands() {
    let out = casd_bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for c in ["run", "migrate", "config"] {
        assert!(s.contains(c), "{s}");
    }
}

#[tokio::test]
async fn a_migration_edited_in_its_comments_only_is_accepted_and_any_other_edit_refused() {
    let t = TestDb::new().await;
    let mut c = t.db.conn().await.unwrap();
    let current = recorded_checksum(&mut c).await;
    // A database that applied 0001 before its comments were reworded.
    let before_rewording = "bff6bfe157fca36744fa89c3462ae052aaea7e4ea3c15709ecdc358fa8fcf37e";
    assert_ne!(current, before_rewording);
    c.query_drop(format!(
        "UPDATE schema_migrations SET checksum = UNHEX('{before_rewording}') WHERE version = 1"
    ))
    .await
    .unwrap();
    assert_eq!(t.db.migrate().await.unwrap(), Vec::<u32>::new());
    assert_eq!(
        recorded_checksum(&mut c).await,
        current,
        "record moved to the current text"
    );
    // Any other difference still stops start-up.
    c.query_drop("UPDATE schema_migrations SET checksum = UNHEX(SHA2('x', 256)) WHERE version = 1")
        .await
        .unwrap();
    let err = t.db.migrate().await.unwrap_err().to_string();
    assert!(err.contains("file changed after it was applied"), "{err}");
}

async fn recorded_checksum(c: &mut mysql_async::Conn) -> String {
    let sum: Vec<u8> = c
        .query_first("SELECT checksum FROM schema_migrations WHERE version = 1")
        .await
        .unwrap()
        .unwrap();
    hex::encode(sum)
}
