//! The live test: casd (every role, in this process) with its database
//! behind a cuttable proxy, a real Prometheus scraping casd's /metrics
//! every second with the shipped rules (only their `for:` shortened), a
//! real Alertmanager posting to a webhook served here. Every wait is a
//! poll with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use casd::config::{Config, Role};
use casd::testing::{Capture, Running, TcpProxy, TestDb};

use crate::common;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(25);
/// How often a poll looks again (a poll interval, not a synchronisation).
const POLL: Duration = Duration::from_millis(200);
/// Commands posted, then counted by Prometheus.
const N: u64 = 5;

/// A program started for the test, killed when dropped; its output goes
/// to a file that failures show.
struct Program {
    child: Child,
    log: PathBuf,
}

impl Program {
    fn start(program: &str, package: &str, args: &[String], dir: &Path) -> Program {
        let log = dir.join(format!("{program}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} ({e}): install Debian's {package} (scripts/test.sh does)")
            });
        Program { child, log }
    }

    fn output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped rules with every `for:` set to 1s: the only change, so the
/// test runs the expressions, labels and annotations operators get.
fn rules_for_test() -> String {
    let shipped = std::fs::read_to_string(super::repo("deploy/prometheus/casd-rules.yml")).unwrap();
    shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_test_rules_differ_from_the_shipped_ones_only_in_for() {
    let shipped = super::read("deploy/prometheus/casd-rules.yml");
    let test = rules_for_test();
    assert_eq!(shipped.lines().count(), test.lines().count());
    let mut changed = 0;
    for (a, b) in shipped.lines().zip(test.lines()) {
        if a != b {
            assert!(a.trim_start().starts_with("for: "), "{a:?} -> {b:?}");
            assert_eq!(b.trim(), "for: 1s");
            changed += 1;
        }
    }
    assert!(changed > 0, "no for: shortened");
}

/// Every role, the database through the proxy, metrics on `metrics`, and
/// two outputs: "main" (to the capture) and "quiet", which sends no CAT and
/// so stays silent as long as the carousel holds no EMM — an output that
/// sends nothing, as a stopped one does.
fn casd_config(
    db_url: &str,
    main: SocketAddr,
    quiet: SocketAddr,
    metrics: &str,
    dir: &Path,
) -> Config {
    let database = casd::testing::database_toml(db_url);
    let text = format!(
        "{database}connect_timeout_s = 2\n\
         [metrics]\nlisten = \"{metrics}\"\n\
         [api]\nplain_http = true\nrequest_log = \"{d}/requests.jsonl\"\n\
         [keys]\nroot_key_file = \"{d}/root.key\"\n\
         [emmg]\npoll_interval_ms = 50\n\
         [cycler]\npoll_interval_ms = 20\nburst_interval_ms = 20\nlog_file = \"{d}/carousel.jsonl\"\n\
         [[cycler.outputs]]\nname = \"main\"\ndestination = \"{main}\"\nbitrate = 2000000\n\
         [[cycler.outputs]]\nname = \"quiet\"\ndestination = \"{quiet}\"\nbitrate = 2000000\ncat = false\n",
        d = dir.display()
    );
    Config::from_toml_str(&text, Path::new("alerting.toml"), std::iter::empty())
        .expect("test config")
}

/// Polls `probe` every POLL until it gives a value, for at most LIMIT.
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The webhook Alertmanager posts to: every notification, kept.
async fn serve_webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Default::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let keep = keep.clone();
            async move { keep.lock().unwrap().push(v) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// Whether the webhook received `alertname` with `status` (firing or
/// resolved), for output `output` when given.
fn notified(got: &Mutex<Vec<Value>>, alertname: &str, status: &str, output: Option<&str>) -> bool {
    got.lock().unwrap().iter().any(|n| {
        n["alerts"].as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == alertname
                && a["status"] == status
                && output.is_none_or(|o| a["labels"]["output"] == o)
        })
    })
}

fn start_alertmanager(dir: &Path, port: u16, webhook: &str) -> Program {
    let cfg = format!(
        "route:\n  receiver: test\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: test\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n"
    );
    std::fs::write(dir.join("alertmanager.yml"), cfg).unwrap();
    let args = [
        "--config.file=alertmanager.yml".to_owned(),
        "--storage.path=am-data".to_owned(),
        format!("--web.listen-address=127.0.0.1:{port}"),
        // No gossip port: a single Alertmanager.
        "--cluster.listen-address=".to_owned(),
    ];
    Program::start(
        "prometheus-alertmanager",
        "prometheus-alertmanager",
        &args,
        dir,
    )
}

fn start_prometheus(dir: &Path, port: u16, casd_metrics: &str, am_port: u16) -> Program {
    std::fs::write(dir.join("casd-rules.yml"), rules_for_test()).unwrap();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [casd-rules.yml]\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
         scrape_configs:\n  - job_name: casd\n    static_configs:\n      - targets: ['{casd_metrics}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let args = [
        "--config.file=prometheus.yml".to_owned(),
        "--storage.tsdb.path=prom-data".to_owned(),
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--rules.alert.resend-delay=1s".to_owned(),
    ];
    Program::start("prometheus", "prometheus", &args, dir)
}

/// The single value of instant query `q` on Prometheus at `base`, if any.
async fn query(http: &reqwest::Client, base: &str, q: &str) -> Option<f64> {
    let r = http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

async fn post_commands(http: &reqwest::Client, base: &str, bearer: &str) {
    for d in 0..N {
        let r = http
            .post(format!("{base}/adddevice"))
            .header("authorization", bearer)
            .json(&json!({"transaction_id": format!("alerting-{d}"), "device_id": 7000 + d}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
}

/// The test's moving parts, kept alive together.
struct Stack {
    _dir: tempfile::TempDir,
    proxy: TcpProxy,
    casd: Running,
    prometheus: Program,
    alertmanager: Program,
    prom: String,
    webhook: Arc<Mutex<Vec<Value>>>,
    bearer: String,
    _t: TestDb,
    _cap: Capture,
    _quiet: std::net::UdpSocket,
}

/// A failing test shows what Prometheus, Alertmanager and the webhook saw.
impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.casd.stop.cancel();
    }
}

impl Stack {
    fn logs(&self) -> String {
        format!(
            "--- prometheus:\n{}\n--- alertmanager:\n{}\n--- webhook: {:?}",
            self.prometheus.output(),
            self.alertmanager.output(),
            self.webhook.lock().unwrap()
        )
    }
}

async fn start_stack() -> Stack {
    let t = TestDb::new().await;
    let cap = Capture::bind(0x0101).await;
    let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = TcpProxy::start(casd::testing::server_addr()).await;
    let metrics = format!("127.0.0.1:{}", common::free_port());
    hw::FileKeySource::create_new(dir.path().join("root.key")).unwrap();
    // The token's key is published before casd starts: casd loads its key
    // set at start.
    let bearer = casd::testing::bench_bearer(&t.db).await;
    let cfg = casd_config(
        &proxy.url_via(&t.url),
        cap.addr(),
        quiet.local_addr().unwrap(),
        &metrics,
        dir.path(),
    );
    let casd = Running::start(cfg, Role::ALL.to_vec()).await;
    casd.ready().await;
    let (hook, webhook) = serve_webhook().await;
    let (am_port, prom_port) = (common::free_port(), common::free_port());
    let alertmanager = start_alertmanager(dir.path(), am_port, &hook);
    let prometheus = start_prometheus(dir.path(), prom_port, &metrics, am_port);
    Stack {
        _dir: dir,
        proxy,
        casd,
        prometheus,
        alertmanager,
        prom: format!("http://127.0.0.1:{prom_port}"),
        webhook,
        bearer,
        _t: t,
        _cap: cap,
        _quiet: quiet,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_commands_and_the_database_alert_fires_and_resolves() {
    let s = start_stack().await;
    let http = client();
    let (prom, hook) = (s.prom.as_str(), &s.webhook);

    let up = poll("the casd target up", || {
        query(&http, prom, "up{job=\"casd\"}")
    })
    .await;
    assert_eq!(up, 1.0);

    post_commands(&http, &s.casd.base, &s.bearer).await;
    let counted = "sum(casd_sms_requests_total{job=\"casd\",path=\"/adddevice\",status=\"200\"})";
    poll("Prometheus to count the commands", || async {
        (query(&http, prom, counted).await? == N as f64).then_some(())
    })
    .await;
    let total = query(&http, prom, "sum(casd_sms_requests_total{job=\"casd\"})").await;
    assert_eq!(total, Some(N as f64), "every request counted once");

    s.proxy.cut();
    poll("CasdDatabaseDown at the webhook", || async {
        notified(hook, "CasdDatabaseDown", "firing", None).then_some(())
    })
    .await;
    s.proxy.restore().await;
    poll("CasdDatabaseDown resolved at the webhook", || async {
        notified(hook, "CasdDatabaseDown", "resolved", None).then_some(())
    })
    .await;
}

/// No command is posted: the carousel stays empty, so output "quiet" (no
/// CAT) never sends, while "main" plays its CAT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_output_makes_casd_off_air_fire() {
    let s = start_stack().await;
    let hook = &s.webhook;
    poll("CasdOffAir for output quiet at the webhook", || async {
        notified(hook, "CasdOffAir", "firing", Some("quiet")).then_some(())
    })
    .await;
    assert!(
        !notified(hook, "CasdOffAir", "firing", Some("main")),
        "main is on air"
    );
}
