//! Test support: a throwaway database per test, on the MariaDB that
//! `scripts/test.sh` brings up. Compiled into the library (not `cfg(test)`)
//! so integration tests and the tools' tests can use it; it does nothing
//! unless called.
//!
//! The server comes from `CASD_TEST_DATABASE_URL` (a `mysql://` URL without
//! a database), or from `.state/test-database-url` written by
//! `scripts/test.sh`, so a plain `cargo test` works after one bring-up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;

use crate::db::Db;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The MariaDB server URL for tests (no database part).
pub fn server_url() -> String {
    if let Ok(u) = std::env::var("CASD_TEST_DATABASE_URL") {
        return u.trim_end_matches('/').to_owned();
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/test-database-url");
    match std::fs::read_to_string(&file) {
        Ok(u) => u.trim().trim_end_matches('/').to_owned(),
        Err(_) => panic!(
            "no test database: run the README's test command (scripts/test.sh), \
             or set CASD_TEST_DATABASE_URL=mysql://user:pw@127.0.0.1:port"
        ),
    }
}

/// A fresh database with every migration applied, dropped when this value
/// is dropped.
pub struct TestDb {
    pub db: Db,
    pub name: String,
    pub url: String,
    server: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = server_url();
        let name = format!(
            "casd_t_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut admin = mysql_async::Conn::new(
            mysql_async::Opts::from_url(&server)
                .expect("CASD_TEST_DATABASE_URL is not a mysql:// URL"),
        )
        .await
        .expect("cannot connect to the test MariaDB");
        admin
            .query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .await
            .expect("create test database");
        let _ = admin.disconnect().await;
        let url = format!("{server}/{name}");
        let db = Db::new(&url, 16, Duration::from_secs(5)).expect("pool");
        db.migrate().await.expect("migrations apply");
        TestDb {
            db,
            name,
            url,
            server,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside a runtime: do the async cleanup on a thread of
        // its own with a small runtime, and wait for it.
        let server = self.server.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(opts) = mysql_async::Opts::from_url(&server) {
                    if let Ok(mut c) = mysql_async::Conn::new(opts).await {
                        let _ = c
                            .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                            .await;
                        let _ = c.disconnect().await;
                    }
                }
            });
        })
        .join();
    }
}
