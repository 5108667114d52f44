//! A headend on a private MariaDB ([`MariaDbInstance`]): every role but the
//! Scheduler, casd connected over TLS verified against the instance's CA,
//! commands posted through the real API, the carousel captured on
//! 127.0.0.1. Shared by the db_* tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use casd::config::{Config, DbTlsMode, Role};
use casd::db::{Db, DbTls};
use casd::testing::{Capture, MariaDbInstance, Running};
use mysql_async::prelude::*;
use serde_json::{json, Value};

pub const LIMIT: Duration = Duration::from_secs(30);

/// casd's own way to the instance: TLS required, its CA.
pub fn tls_db(inst: &MariaDbInstance, database: &str) -> Db {
    let tls = DbTls::Required {
        ca: Some(inst.ca()),
    };
    let url = format!("{}/{database}", inst.server_url);
    Db::with_tls(&url, &tls, 4, Duration::from_secs(5)).expect("pool")
}

pub struct Headend {
    pub casd: Running,
    pub cfg: Config,
    /// The test's own connection to the headend's database (TLS too).
    pub db: Db,
    pub cap: Capture,
    http: reqwest::Client,
    bearer: String,
}

impl Headend {
    /// A headend on database `casd` of `inst` (created when missing).
    /// `like`: the configuration of a headend this one replaces (its root
    /// key file): a restored headend opens the same key store.
    pub async fn start(inst: &MariaDbInstance, like: Option<&Config>) -> Headend {
        let mut admin = tls_db(inst, "").conn().await.expect("connect over TLS");
        admin
            .query_drop("CREATE DATABASE IF NOT EXISTS casd CHARACTER SET utf8mb4")
            .await
            .unwrap();
        drop(admin);
        let cap = Capture::bind(0x0101).await;
        let url = format!("{}/casd", inst.server_url);
        let mut cfg = casd::testing::config(&url, cap.addr());
        cfg.database.tls = DbTlsMode::Required;
        cfg.database.tls_ca = Some(inst.ca());
        match like {
            Some(old) => cfg.keys.root_key_file = old.keys.root_key_file.clone(),
            None => {
                hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
            }
        }
        let roles = vec![Role::Sms, Role::Emmg, Role::Encryptor, Role::Cycler];
        let casd = Running::start(cfg.clone(), roles).await;
        casd.ready().await;
        let db = tls_db(inst, "casd");
        let scopes = [casd::auth::Scope::SmsWrite, casd::auth::Scope::SmsRead];
        let token = casd::auth::testing::token_for(&db, "sms-db", &scopes).await;
        Headend {
            casd,
            cfg,
            db,
            cap,
            http: reqwest::Client::new(),
            bearer: format!("Bearer {token}"),
        }
    }

    /// POSTs `body` (with `transaction_id`) to `path`; asserts it accepted.
    pub async fn post(&self, path: &str, transaction_id: &str, mut body: Value) -> Value {
        body["transaction_id"] = json!(transaction_id);
        let (http, base) = (&self.http, &self.casd.base);
        crate::common::post_accepted(http, base, &self.bearer, path, &body).await
    }

    /// Waits (polling the table that says so, `LIMIT` as a guard) until
    /// every accepted request has been processed by the EMMG.
    pub async fn processed(&self) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let mut c = self.db.conn().await.unwrap();
            let pending: Option<u64> = c
                .query_first("SELECT COUNT(*) FROM sms_requests WHERE status_code = 200 AND processed_at IS NULL")
                .await
                .unwrap();
            if pending == Some(0) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests never processed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The live EMMs on air (emm id -> section): every live row's section
    /// seen on air in one pass, then, in a second pass, every one again
    /// and nothing else (the first lets a withdrawal the Cycler has not
    /// read yet leave the air).
    pub async fn live_on_air(&mut self) -> BTreeMap<u64, Vec<u8>> {
        let mut c = self.db.conn().await.unwrap();
        let rows: Vec<(u64, Vec<u8>)> = c
            .query("SELECT id, encrypted_emm FROM emms WHERE state = 'live'")
            .await
            .unwrap();
        let live: BTreeMap<Vec<u8>, u64> = rows.into_iter().map(|(id, s)| (s, id)).collect();
        self.pass(&live, false).await;
        self.pass(&live, true).await;
        assert!(
            self.cap.errors.is_empty(),
            "stream errors: {:?}",
            self.cap.errors
        );
        live.into_iter().map(|(s, id)| (id, s)).collect()
    }

    async fn pass(&mut self, live: &BTreeMap<Vec<u8>, u64>, strict: bool) {
        let mut seen = BTreeSet::new();
        while seen.len() < live.len() {
            let s = self
                .cap
                .next_section(LIMIT)
                .await
                .expect("carousel stopped");
            match live.get(s.as_ref()) {
                Some(id) => {
                    seen.insert(*id);
                }
                None if strict => panic!(
                    "a section on air is no live row: {:02x?}",
                    &s[..8.min(s.len())]
                ),
                None => {}
            }
        }
    }
}
