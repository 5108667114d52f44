//! Helpers shared by integration tests that need test-only crates.
#![allow(dead_code)]

use std::path::Path;

/// A TCP port on 127.0.0.1 free a moment ago, for a program that binds
/// it itself (a child process, Prometheus, a listener set in a config).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POSTs an SMS command `body` to `base` + `path` with `bearer`; asserts
/// a 200 with status "accepted" and returns the reply.
pub async fn post_accepted(
    http: &reqwest::Client,
    base: &str,
    bearer: &str,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let r = http
        .post(format!("{base}{path}"))
        .header("authorization", bearer)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{path} {body}: {v}");
    assert_eq!(v["status"], "accepted", "{path} {body}: {v}");
    v
}

/// A test CA and a server certificate for 127.0.0.1/localhost signed by
/// it, written as ca.pem, cert.pem, key.pem in `dir` (what
/// docs/security.md's openssl recipe makes).
pub fn make_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "casd test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "casd");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

/// Runs the ignored test `path` (`module::name`) of this test binary in a
/// process of its own and fails with its output if it fails: for the few
/// tests that need process-wide state to themselves (tracing's callsite
/// interest cache), now that every integration test shares one binary.
pub fn run_alone(path: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            path,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{path} alone failed:\n{stdout}\n{stderr}"
    );
}

/// Every metric casd exports (the metrics contract of issue 17; the
/// standard process_* ones included). A histogram's `_bucket`, `_sum` and
/// `_count` series count as its name.
pub const METRICS: &[&str] = &[
    "casd_sms_requests_total",
    "casd_sms_request_duration_seconds",
    "casd_sms_commit_round_size",
    "casd_sms_commands_waiting",
    "casd_sms_refusals_total",
    "casd_emmg_work_items_pending",
    "casd_emmg_oldest_pending_age_seconds",
    "casd_emmg_items_total",
    "casd_emmg_batch_duration_seconds",
    "casd_encryptor_seals_total",
    "casd_encryptor_seal_errors_total",
    "casd_encryptor_key_version",
    "casd_encryptor_group_keys",
    "casd_encryptor_next_rotation_seconds",
    "casd_cycler_bytes_sent_total",
    "casd_cycler_packets_sent_total",
    "casd_cycler_datagrams_sent_total",
    "casd_cycler_send_errors_total",
    "casd_cycler_live_emms",
    "casd_cycler_cycle_seconds",
    "casd_cycler_cycle_target_seconds",
    "casd_cycler_fast_lane_depth",
    "casd_cycler_last_datagram_age_seconds",
    "casd_cycler_events_behind",
    "casd_cycler_playout_log_dropped_total",
    "casd_cycler_on_air",
    "casd_cycler_takeovers_total",
    "casd_scheduler_job_last_success_timestamp_seconds",
    "casd_scheduler_job_last_duration_seconds",
    "casd_scheduler_job_failures_total",
    "casd_scheduler_job_period_seconds",
    "casd_scheduler_lease_held",
    "casd_plan_cycle_seconds",
    "casd_plan_rotation_seconds",
    "casd_plan_revocation_seconds",
    "casd_plan_import_seconds_per_1000_devices",
    "casd_database_up",
    "casd_database_pool_connections_in_use",
    "casd_database_semi_sync_active",
    "casd_build_info",
    "casd_tls_certificate_expiry_timestamp_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// Exactly one `device_enable` and one `entitlement_set` EMM for each of
/// `requests` (accepted `/adddevice` commands), and no request with two
/// EMMs of one purpose: nothing lost, nothing doubled by a redo.
pub async fn assert_emms_once<'a>(
    c: &mut mysql_async::Conn,
    requests: impl Iterator<Item = &'a u64>,
) {
    use mysql_async::prelude::Queryable;
    let per_request: Vec<(u64, String, u64)> = c
        .query("SELECT request_id, purpose, COUNT(*) FROM emms WHERE request_id IS NOT NULL GROUP BY request_id, purpose")
        .await
        .unwrap();
    let mut purposes: std::collections::HashMap<u64, std::collections::HashSet<String>> =
        Default::default();
    for (rid, purpose, n) in per_request {
        assert_eq!(n, 1, "request {rid} has {n} EMMs of purpose {purpose}");
        purposes.entry(rid).or_default().insert(purpose);
    }
    for rid in requests {
        let p = purposes.get(rid).cloned().unwrap_or_default();
        assert!(
            p.contains("device_enable") && p.contains("entitlement_set"),
            "request {rid}: {p:?}"
        );
    }
}

/// A tracing writer into memory, for tests that read what was logged.
#[derive(Clone, Default)]
pub struct LogBuf(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A minimal configuration file for the `casd` binary's offline commands
/// (database, root key file in `dir`), written as `dir/casd.toml`; the root
/// key file is created.
pub fn cli_config(dir: &Path, db_url: &str, extra: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("casd.toml");
    std::fs::write(
        &path,
        format!(
            "{database}[metrics]\nlisten = \"\"\n[api]\nplain_http = true\n[keys]\nroot_key_file = \"{d}/root.key\"\n{extra}",
            database = casd::testing::database_toml(db_url),
            d = dir.display()
        ),
    )
    .unwrap();
    hw::FileKeySource::create_new(dir.join("root.key")).unwrap();
    path
}

/// Runs the `casd` binary with `--config config` and `args`; its output.
pub fn casd_cli(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_casd"))
        // The test command may export a database URL; the child uses its config file.
        .env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "warn")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run casd")
}

/// A fresh temporary directory for one test.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("casd-{what}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
