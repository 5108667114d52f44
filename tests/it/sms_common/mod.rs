//! Shared by the SMS and EMMG tests: a headend serving the SMS routes over
//! real HTTP on 127.0.0.1:0 against a throwaway database.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use casd::app::Shared;
use casd::config::Config;
use casd::db::Db;
use casd::reqlog::RequestLog;
use casd::testing::TestDb;
use mysql_async::prelude::*;
use serde_json::Value;

pub fn config(url: &str, log: &std::path::Path) -> Config {
    let text = format!(
        "{}connect_timeout_s = 2\n[api]\nplain_http = true\nrequest_log = \"{}\"\n",
        casd::testing::database_toml(url),
        log.display()
    );
    Config::from_toml_str(&text, std::path::Path::new("test.toml"), std::iter::empty()).unwrap()
}

/// A parsed command as the committer receives it, from sender `sms`.
pub fn submission(kind: casd::sms::CommandKind, body: &str) -> casd::sms::store::Submission {
    casd::sms::store::Submission {
        sender: "sms".into(),
        path: kind.path(),
        message: body.into(),
        received_at: time::OffsetDateTime::now_utc(),
        req: casd::sms::types::parse_command(kind, body.as_bytes(), 1024).expect("valid command"),
        bulk: None,
    }
}

pub fn shared_for(cfg: Config, db: Db) -> Shared {
    casd::testing::shared(cfg, db, None)
}

pub struct Headend {
    pub t: Option<TestDb>,
    pub shared: Shared,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub log: RequestLog,
    pub log_path: PathBuf,
    /// Signs the tests' tokens (published in the database when it is up).
    pub issuer: casd::auth::testing::TestIssuer,
}

impl Headend {
    /// A fresh database and the SMS routes served on 127.0.0.1:0.
    pub async fn start() -> Headend {
        let t = TestDb::new().await;
        let mut h = Self::serve(&t.url, t.db.clone(), |_| {}).await;
        h.t = Some(t);
        h
    }

    /// Serves the SMS routes with `db` (which may point anywhere).
    pub async fn serve(url: &str, db: Db, tweak: impl FnOnce(&mut Config)) -> Headend {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("CASD_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let log_path = std::env::temp_dir().join(format!(
            "casd-smstest-{}-{:08x}/requests.jsonl",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut cfg = config(url, &log_path);
        tweak(&mut cfg);
        let shared = shared_for(cfg, db);
        let log = RequestLog::open(&log_path, 1 << 30, 1);
        let router = casd::auth::attach(
            casd::sms::routes_with_log(shared.clone(), log.clone()),
            shared.auth.clone(),
        );
        let issuer = match tokio::time::timeout(
            std::time::Duration::from_secs(3),
            db_up(&shared.db),
        )
        .await
        {
            Ok(true) => casd::auth::testing::TestIssuer::new(&shared.db).await,
            _ => casd::auth::testing::TestIssuer::unpublished(&shared.db),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(casd::http::serve(listener, router, shared.shutdown.clone()));
        Headend {
            t: None,
            shared,
            addr,
            client: reqwest::Client::new(),
            log,
            log_path,
            issuer,
        }
    }

    /// `Authorization: Bearer …` for `client`, every scope (the client is
    /// created on first use).
    pub async fn bearer(&self, client: &str) -> String {
        format!(
            "Bearer {}",
            self.issuer.token(client, &casd::auth::Scope::ALL).await
        )
    }

    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs a JSON body (as text) as client `sms1`.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value, reqwest::header::HeaderMap) {
        self.post_as("sms1", path, body).await
    }

    pub async fn post_as(
        &self,
        client: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .post(self.url(path))
            .header("authorization", self.bearer(client).await)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v, headers)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .header("authorization", self.bearer("sms1").await)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// 200 or panic; returns the request_id.
    pub async fn ok(&self, path: &str, body: &str) -> u64 {
        let (s, v, _) = self.post(path, body).await;
        assert_eq!(s, 200, "{path} {body} -> {v}");
        assert_eq!(v["status"], "accepted", "{v}");
        v["request_id"].as_u64().unwrap()
    }

    pub async fn add_device(&self, id: u64) -> u64 {
        self.ok(
            "/adddevice",
            &format!(r#"{{"transaction_id":"add-{id}","device_id":{id}}}"#),
        )
        .await
    }

    pub async fn count(&self, table: &str) -> u64 {
        let mut c = self.db().conn().await.unwrap();
        c.query_first(format!("SELECT COUNT(*) FROM `{table}`"))
            .await
            .unwrap()
            .unwrap()
    }

    /// Row counts of every table the SMS routes write.
    pub async fn counts(&self) -> Vec<(&'static str, u64)> {
        let mut v = Vec::new();
        for t in [
            "sms_requests",
            "idempotency",
            "devices",
            "group_slots",
            "entitlements",
            "work_items",
            "emms",
            "carousel_events",
        ] {
            v.push((t, self.count(t).await));
        }
        v
    }

    pub async fn log_lines(&self) -> Vec<Value> {
        self.log.flush().await;
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Headend {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        if let Some(dir) = self.log_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn db_up(db: &Db) -> bool {
    db.ping().await.is_ok()
}
