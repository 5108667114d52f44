//! `GET /metrics` of a whole headend (every role in one process) on real
//! sockets and a real MariaDB: every name of docs/metrics.md is served,
//! the SMS counters count what was posted, `casd_database_up` follows the
//! database (taken away with a TcpProxy), no label value carries a secret,
//! `promtool check metrics` finds nothing, and `listen = ""` serves nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use casd::auth::Scope;
use casd::config::{Config, Role};
use casd::testing::{Capture, Running, TcpProxy, TestDb};
use serde_json::json;

use crate::common;

/// Guard against a hung test (not a synchronisation).
const LIMIT: Duration = Duration::from_secs(30);

/// A headend with its metrics address.
struct Headend {
    metrics: SocketAddr,
    run: Running,
    http: reqwest::Client,
}

impl Headend {
    /// Every role on `cfg`, metrics on 127.0.0.1:0; returns once ready.
    async fn start(cfg: Config) -> Headend {
        let run = Running::start_with_metrics(cfg, Role::ALL.to_vec()).await;
        run.ready().await;
        Headend {
            metrics: run.metrics.expect("metrics address"),
            run,
            http: reqwest::Client::new(),
        }
    }

    async fn scrape(&self) -> String {
        scrape(self.metrics).await.expect("scrape")
    }

    /// Scrapes until `f` holds on the parsed scrape.
    async fn until(&self, what: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + LIMIT;
        loop {
            let s = Scrape::parse(&self.scrape().await);
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "never: {what}\n{}", s.text);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, bearer: &str, path: &str, body: serde_json::Value) -> u16 {
        self.http
            .post(format!("{}{path}", self.run.base))
            .header("authorization", bearer)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn stop(self) {
        self.run.shutdown().await.unwrap();
    }
}

async fn scrape(addr: SocketAddr) -> reqwest::Result<String> {
    let r = reqwest::get(format!("http://{addr}/metrics")).await?;
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    r.text().await
}

/// A scrape as (name, labels) → value.
struct Scrape {
    text: String,
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (head, value) = l.rsplit_once(' ').expect("sample line");
                let (name, labels) = match head.split_once('{') {
                    Some((n, rest)) => (n, labels(rest.trim_end_matches('}'))),
                    None => (head, BTreeMap::new()),
                };
                let v = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("value of {l}")),
                };
                (name.to_string(), labels, v)
            })
            .collect();
        Scrape {
            text: text.to_string(),
            series,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.series.iter().any(|(n, _, _)| n == name)
    }

    /// The value of the series `name` with (at least) `want` labels.
    fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.series
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }
}

/// `k="v",k2="v2"` (the values casd writes hold no `"` or `,`).
fn labels(s: &str) -> BTreeMap<String, String> {
    s.split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once("=\"").expect("label");
            (k.to_string(), v.trim_end_matches('"').to_string())
        })
        .collect()
}

/// A label value casd may write: from the fixed lists of docs/metrics.md.
fn allowed(key: &str, v: &str) -> bool {
    let word = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
    };
    let number = |v: &str| v == "+Inf" || v.parse::<f64>().is_ok();
    match key {
        "path" => [
            "/adddevice",
            "/removedevice",
            "/addentitlement",
            "/removeentitlement",
            "/generateosm",
        ]
        .contains(&v),
        "status" => v.len() == 3 && v.parse::<u16>().is_ok(),
        "code" | "scheduler_job" => word(v),
        "outcome" => ["done", "failed", "retried"].contains(&v),
        "addressing" => ["unique", "group", "global"].contains(&v),
        "kind" => ["pmk", "glk", "gk"].contains(&v),
        "class" => ["urgent", "change", "background"].contains(&v),
        "output" => v == "test",
        // cycler.redundancy_group: none configured here.
        "group" => v.is_empty(),
        "version" => v == env!("CARGO_PKG_VERSION"),
        "git_sha" => v == "unknown" || (v.len() == 12 && v.chars().all(|c| c.is_ascii_hexdigit())),
        "le" | "quantile" => number(v),
        _ => false,
    }
}

/// The headend of the tests: every role, its database behind a proxy.
async fn headend(t: &TestDb, proxy: &TcpProxy, cap: &Capture) -> (Headend, Config) {
    let mut cfg = casd::testing::config(&proxy.url_via(&t.url), cap.addr());
    cfg.database.connect_timeout_s = 1;
    hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    (Headend::start(cfg.clone()).await, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headend_serves_every_metric_and_counts_commands() {
    let t = TestDb::new().await;
    let proxy = TcpProxy::start(casd::testing::server_addr()).await;
    let cap = Capture::bind(0x0101).await;
    let (h, cfg) = headend(&t, &proxy, &cap).await;
    let secret =
        casd::auth::testing::create_client(&t.db, "sms-metrics", &[Scope::SmsWrite], 1000).await;
    let token = casd::auth::testing::token_for(&t.db, "sms-metrics", &[Scope::SmsWrite]).await;
    let bearer = format!("Bearer {token}");

    const N: u64 = 5;
    for d in 0..N {
        let body = json!({"device_id": 7000 + d, "transaction_id": format!("m-{d}")});
        assert_eq!(h.post(&bearer, "/adddevice", body).await, 200);
    }
    let dup = json!({"device_id": 7000, "transaction_id": "m-dup"});
    assert_eq!(h.post(&bearer, "/adddevice", dup).await, 409);

    let s = h
        .until("the EMMG settled every item and the carousel played", |s| {
            s.get("casd_emmg_items_total", &[("outcome", "done")]) >= Some(N as f64)
                && s.get("casd_cycler_datagrams_sent_total", &[]) > Some(0.0)
                && s.get("casd_database_up", &[]) == Some(1.0)
                && s.has("casd_encryptor_key_version")
        })
        .await;
    // Every metric of the contract (a histogram by its buckets) but the TLS
    // expiry, which needs TLS and is checked below to be absent.
    let tls = "casd_tls_certificate_expiry_timestamp_seconds";
    let missing: Vec<&&str> = common::METRICS
        .iter()
        .filter(|n| **n != tls && !s.has(n) && !s.has(&format!("{n}_bucket")))
        .collect();
    assert!(missing.is_empty(), "not served: {missing:?}\n{}", s.text);
    assert!(!s.has(tls), "no TLS configured");
    let ok = [("path", "/adddevice"), ("status", "200")];
    assert_eq!(s.get("casd_sms_requests_total", &ok), Some(N as f64));
    let conflict = [("path", "/adddevice"), ("status", "409")];
    assert_eq!(s.get("casd_sms_requests_total", &conflict), Some(1.0));
    assert_eq!(
        s.get("casd_sms_refusals_total", &[("code", "device_exists")]),
        Some(1.0)
    );
    assert!(s.get("casd_encryptor_seals_total", &[("addressing", "unique")]) >= Some(N as f64));
    assert_eq!(
        s.get("casd_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0)
    );

    // No label value but from the fixed lists; no secret anywhere.
    for (name, labels, _) in &s.series {
        for (k, v) in labels {
            assert!(
                allowed(k, v),
                "{name}: label {k}=\"{v}\" is not from a fixed list"
            );
        }
    }
    let root = std::fs::read(&cfg.keys.root_key_file).unwrap();
    for (what, needle) in [
        ("client secret", secret.expose().to_string()),
        ("access token", token.clone()),
        (
            "token signature",
            token.rsplit('.').next().unwrap().to_string(),
        ),
        ("root key (hex)", hex::encode(&root)),
        (
            "root key (file)",
            String::from_utf8_lossy(&root).trim().to_string(),
        ),
    ] {
        assert!(
            !needle.is_empty() && !s.text.contains(&needle),
            "the scrape holds the {what}"
        );
    }

    // A path other than /metrics: 404, and the API's routes are not there.
    let r = reqwest::get(format!("http://{}/adddevice", h.metrics))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    promtool_check(&s.text);
    h.stop().await;
}

/// `promtool check metrics` (Debian's `prometheus`, installed by
/// scripts/test.sh) on a real scrape: no lint problem. Missing promtool
/// fails the test.
fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool not found: install Debian's `prometheus` (scripts/test.sh does when run as root)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_up_follows_the_database() {
    let t = TestDb::new().await;
    let proxy = TcpProxy::start(casd::testing::server_addr()).await;
    let cap = Capture::bind(0x0101).await;
    let (h, _) = headend(&t, &proxy, &cap).await;
    h.until("database up", |s| {
        s.get("casd_database_up", &[]) == Some(1.0)
    })
    .await;
    proxy.cut();
    h.until("database down", |s| {
        s.get("casd_database_up", &[]) == Some(0.0)
    })
    .await;
    // Still served, with the process metrics, while the database is away.
    let s = Scrape::parse(&h.scrape().await);
    assert!(s.has("process_resident_memory_bytes"));
    proxy.restore().await;
    h.until("database up again", |s| {
        s.get("casd_database_up", &[]) == Some(1.0)
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_binds_the_configured_address_and_empty_is_off() {
    let t = TestDb::new().await;
    let cap = Capture::bind(0x0101).await;
    let mut cfg = casd::testing::config(&t.url, cap.addr());
    hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    // A free port, given to `[metrics] listen`.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for (listen, served) in [(port.to_string(), true), (String::new(), false)] {
        cfg.metrics.listen = listen;
        let run = Running::start(cfg.clone(), vec![Role::Sms]).await;
        // `run` binds the metrics listener before any role starts.
        run.ready().await;
        let result = scrape(port).await;
        match served {
            true => assert!(result.expect("served").contains("casd_build_info")),
            false => assert!(result.is_err(), "metrics served with listen = \"\""),
        }
        run.shutdown().await.unwrap();
    }
}
