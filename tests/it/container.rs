//! The container image and the Kubernetes manifests, run here with podman
//! (docs/deploy.md): the image is built offline by scripts/image.sh from
//! this build's binaries, then
//! - one container (every role) runs as non-root on a read-only root
//!   filesystem with its secrets as 0400 files, answers /readyz, issues a
//!   token, and a posted command's EMM is captured on 127.0.0.1 and decoded;
//! - `podman kube play` runs the rendered split overlay (five roles, five
//!   containers, host network, the test's MariaDB) and the same SMS-to-air
//!   flow passes through them over TLS.
//!
//! podman, runc and debootstrap come from Debian (scripts/test.sh installs
//! them), podman is set up by deploy/container/containers.conf. Without
//! podman the tests FAIL, unless `CASD_TEST_SKIP_CONTAINERS=1` opts out
//! (said loudly in the output). The debootstrap base is cached under
//! /var/cache/casd/image, so only a machine's first run pays for it.

use crate::common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use casd::auth::client::{ClientCredentialsConfig, TokenClient};
use casd::auth::{clients, Scope};
use casd::config::Secret;
use casd::keystore::{KeyKind, KeyStore};
use casd::testing::{Capture, TestDb};
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::receiver::Receiver;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
/// The image's user (deploy/container/Containerfile).
const CASD_UID: u32 = 10001;
const ROLES: [&str; 5] = ["sms", "emmg", "encryptor", "cycler", "scheduler"];
/// The Secrets the split overlay mounts (docs/deploy.md).
const SECRETS: [&str; 6] = [
    "casd-tls",
    "casd-database",
    "casd-root-key",
    "casd-token-signing-key",
    "casd-peer-emmg",
    "casd-peer-scheduler",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env(
        "CONTAINERS_CONF",
        root().join("deploy/container/containers.conf"),
    );
    c
}

/// Runs `cmd`, returns its stdout, fails the test with its stderr.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image built from this build's casd and casd-probe, once per test
/// run; None (said loudly) only when podman is missing and the run opted out.
fn image() -> Option<&'static str> {
    if Command::new("podman").arg("--version").output().is_err() {
        if std::env::var("CASD_TEST_SKIP_CONTAINERS").as_deref() == Ok("1") {
            eprintln!(
                "!!! CONTAINER TESTS NOT RUN: no podman, CASD_TEST_SKIP_CONTAINERS=1 opted out !!!"
            );
            return None;
        }
        panic!(
            "podman is not installed: scripts/test.sh installs podman, runc and debootstrap \
             (or set CASD_TEST_SKIP_CONTAINERS=1 to opt out)"
        );
    }
    static IMAGE: OnceLock<String> = OnceLock::new();
    Some(IMAGE.get_or_init(|| {
        // The binaries this test run built, side by side for --prebuilt.
        let bins = std::env::temp_dir().join(format!("casd-image-bins-{}", std::process::id()));
        std::fs::create_dir_all(&bins).unwrap();
        for (name, path) in [
            ("casd", env!("CARGO_BIN_EXE_casd")),
            ("casd-probe", crate::probe_common::probe_bin()),
        ] {
            let _ = std::fs::remove_file(bins.join(name));
            std::os::unix::fs::symlink(path, bins.join(name)).unwrap();
        }
        let tag = "localhost/casd:test";
        run(Command::new("bash")
            .arg(root().join("scripts/image.sh"))
            .arg("--prebuilt")
            .arg(&bins)
            .args(["--tag", tag])
            .stderr(std::process::Stdio::inherit()));
        std::fs::remove_dir_all(&bins).unwrap();
        tag.to_owned()
    }))
}

/// Writes a secret file owned by the image's user, mode 0400.
fn secret_file(path: &Path, content: &[u8]) {
    if !content.is_empty() {
        std::fs::write(path, content).unwrap();
    }
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(CASD_UID)),
        Some(nix::unistd::Gid::from_raw(CASD_UID)),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
}

/// The test database's URL without its password, and the password.
fn split_password(url: &str) -> (String, String) {
    let mut u = url::Url::parse(url).unwrap();
    let pw = u.password().unwrap_or_default().to_owned();
    u.set_password(None).unwrap();
    (u.into(), pw)
}

/// A fresh directory for a test's files, readable by the image's user.
fn test_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("casd-{what}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The one-time set-up an operator does: root key, token signing key,
/// clients (billing for the SMS; emmg and scheduler for the Encryptor).
/// Returns the clients' secrets by id and the root key.
async fn operator_setup(
    t: &TestDb,
    root_key: &Path,
    signing_key: &Path,
) -> (HashMap<&'static str, Secret>, Key128) {
    let root = {
        use hw::KeySource;
        Key128::from(
            hw::FileKeySource::create_new(root_key)
                .unwrap()
                .root_key()
                .unwrap(),
        )
    };
    secret_file(root_key, b"");
    casd::auth::keys::init_signing_key(&t.db, signing_key)
        .await
        .unwrap();
    secret_file(signing_key, b"");
    let mut secrets = HashMap::new();
    for (id, scopes) in [
        ("billing", &[Scope::SmsWrite, Scope::SmsRead][..]),
        ("emmg", &[Scope::Encrypt][..]),
        ("scheduler", &[Scope::Encrypt][..]),
    ] {
        let s = clients::create(&t.db, id, scopes, 10_000, clients::HashCost::Fast)
            .await
            .unwrap();
        secrets.insert(id, Secret::new(s.expose()));
    }
    (secrets, root)
}

/// Polls `url` until it answers 200, failing when `alive` says the
/// container stopped (polling another process: no sleep-free way).
async fn wait_ready(http: &reqwest::Client, url: &str, alive: impl Fn() -> bool) {
    for _ in 0..6000 {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            alive(),
            "the container serving {url} stopped during start-up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} never ready");
}

/// The SMS-to-air flow: a token for `billing`, two commands posted, their
/// EMMs captured on 127.0.0.1 and decoded by the reference receiver.
async fn sms_to_air(client: &TokenClient, base: &str, t: &TestDb, root: Key128, cap: &mut Capture) {
    let token = client.access_token().await.expect("a token is issued");
    assert!(!token.is_empty());
    for (path, body) in [
        (
            "/adddevice",
            json!({"transaction_id": "c-1", "device_id": 501}),
        ),
        (
            "/addentitlement",
            json!({"transaction_id": "c-2", "device_id": 501, "product_id": 3, "start": 1_700_000_000u32, "end": 1_900_000_000u32}),
        ),
    ] {
        let bearer = format!("Bearer {}", token.expose());
        common::post_accepted(client.http(), base, &bearer, path, &body).await;
    }
    let pmk = KeyStore::open(t.db.clone(), root)
        .await
        .unwrap()
        .key(KeyKind::Pmk, 1)
        .await
        .unwrap();
    let mut rx: HashMap<u64, Receiver> = [(501, Receiver::new(501, derive_duk(&pmk, 501)))].into();
    casd::testing::air_until(
        cap,
        &mut rx,
        "commands through the container",
        LIMIT,
        |rx| rx[&501].enabled == Some(true) && rx[&501].entitlements.contains_key(&3),
    )
    .await;
}

/// A container removed when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "2", &self.0]).output();
    }
}

fn running(name: &str) -> bool {
    podman()
        .args(["inspect", "--format", "{{.State.Running}}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// The uid the container's main process runs as, seen from the host.
fn process_uid(name: &str) -> u32 {
    let pid = run(podman().args(["inspect", "--format", "{{.State.Pid}}", name]));
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    uid.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Copies the test MariaDB's CA to `file` (casd verifies the server with
/// it, as in production); false, said loudly by `database_toml`, when the
/// test database has none.
fn db_ca_into(file: &Path) -> bool {
    let _ = casd::testing::database_toml("");
    match casd::testing::server_ca() {
        Some(ca) => {
            std::fs::copy(ca, file).unwrap();
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)).unwrap();
            true
        }
        None => false,
    }
}

/// Every role in one process, plain HTTP on loopback, secrets and config
/// under `etc`, logs under `state`; the API's address comes from
/// CASD_API__LISTEN. TLS to the database when `db_tls` (its CA in
/// `etc/db-ca.pem`, see [`db_ca_into`]).
fn all_in_one_config(url: &str, dest: &str, etc: &str, state: &str, db_tls: bool) -> String {
    let tls = if db_tls {
        format!("tls = \"required\"\ntls_ca = \"{etc}/db-ca.pem\"\n")
    } else {
        "tls = \"disabled\"\n".to_owned()
    };
    format!(
        "[database]\nurl = \"{url}\"\npassword_file = \"{etc}/db-password\"\n{tls}\
         [api]\nplain_http = true\nrequest_log = \"{state}/log/requests.jsonl\"\n\
         [keys]\nroot_key_file = \"{etc}/root.key\"\n[auth]\nsigning_key_file = \"{etc}/token.pem\"\n\
         [emmg]\npoll_interval_ms = 20\n\
         [cycler]\nlog_file = \"{state}/log/carousel.jsonl\"\nburst_interval_ms = 20\npoll_interval_ms = 10\n\
         [[cycler.outputs]]\nname = \"t\"\ndestination = \"{dest}\"\nbitrate = 4000000\n"
    )
}

/// `podman run` of the image with `dir` as /etc/casd (read-only), on the
/// host network, read-only root, no capabilities; the API on `port`.
fn start_container(image: &str, dir: &Path, port: u16) -> Container {
    let name = format!("casd-test-{:08x}", rand::random::<u32>());
    run(podman()
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
        ])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .arg("-v")
        .arg(format!("{}:/etc/casd:ro", dir.display()))
        .args(["-e", &format!("CASD_API__LISTEN=127.0.0.1:{port}")])
        .args(["-e", "CASD_LOG=warn", image, "run"]));
    Container(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_runs_non_root_read_only_and_sms_to_air() {
    let Some(image) = image() else { return };
    let t = TestDb::new().await;
    let dir = test_dir("container");
    let (secrets, root) = operator_setup(&t, &dir.join("root.key"), &dir.join("token.pem")).await;
    let (url, password) = split_password(&t.url);
    secret_file(&dir.join("db-password"), password.as_bytes());
    let mut cap = Capture::bind(0x0101).await;
    let tls = db_ca_into(&dir.join("db-ca.pem"));
    let config = all_in_one_config(
        &url,
        &cap.addr().to_string(),
        "/etc/casd",
        "/var/lib/casd",
        tls,
    );
    std::fs::write(dir.join("casd.toml"), config).unwrap();
    let port = common::free_port();
    let started = std::time::Instant::now();
    let c = start_container(image, &dir, port);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&http, &format!("{base}/readyz"), || running(&c.0)).await;
    // Reported, not asserted (docs/benchmarks.md): `podman run` to /readyz 200.
    eprintln!(
        "container start to ready: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        process_uid(&c.0),
        CASD_UID,
        "casd runs as the image's non-root user"
    );

    let client = TokenClient::new(ClientCredentialsConfig {
        token_url: format!("{base}/oauth/token"),
        client_id: "billing".into(),
        client_secret: Secret::new(secrets["billing"].expose()),
        scope: None,
        ca_file: None,
    })
    .unwrap();
    sms_to_air(&client, &base, &t, root, &mut cap).await;
    assert!(running(&c.0), "the container died");
    drop(c);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `podman kube down` (and removal of what it left) when the test ends.
struct Kube(PathBuf);

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = podman().args(["kube", "down"]).arg(&self.0).output();
    }
}

/// The test's overlay on top of the split one: this image, one replica
/// each, every pod on the host network with ports of its own on 127.0.0.1,
/// the test's database and peers' addresses, no probes (podman 4.3 would
/// run them with curl, which the image does not have), fast polling.
fn test_overlay(
    image: &str,
    ports: &HashMap<&str, (u16, u16)>,
    db_url: &str,
    dest: &str,
) -> String {
    let (name, tag) = image.rsplit_once(':').unwrap();
    let mut text =
        format!("images:\n  - name: casd\n    newName: {name}\n    newTag: {tag}\npatches:\n");
    text += "  - target: {kind: Deployment}\n    patch: |-\n";
    for (op, path, value) in [
        ("replace", "/spec/replicas", "1"),
        ("add", "/spec/template/spec/hostNetwork", "true"),
        (
            "remove",
            "/spec/template/spec/containers/0/readinessProbe",
            "",
        ),
        (
            "remove",
            "/spec/template/spec/containers/0/livenessProbe",
            "",
        ),
        // podman refuses port mappings on the host network.
        ("remove", "/spec/template/spec/containers/0/ports", ""),
    ] {
        text += &format!("      - op: {op}\n        path: {path}\n");
        if !value.is_empty() {
            text += &format!("        value: {value}\n");
        }
    }
    let peers = format!(
        "CASD_PEERS__ENCRYPTOR_URL=https://127.0.0.1:{}\nCASD_PEERS__CLIENT__TOKEN_URL=https://127.0.0.1:{}/oauth/token",
        ports["encryptor"].0, ports["sms"].0
    );
    for role in ROLES {
        let mut env = format!(
            "CASD_API__LISTEN=127.0.0.1:{}\nCASD_METRICS__LISTEN=127.0.0.1:{}\nCASD_DATABASE__URL={db_url}\n\
             CASD_EMMG__POLL_INTERVAL_MS=20\nCASD_CYCLER__POLL_INTERVAL_MS=10\nCASD_CYCLER__BURST_INTERVAL_MS=20\n\
             CASD_CYCLER__OUTPUTS=[{{name = \"t\", destination = \"{dest}\", bitrate = 4000000}}]\nCASD_LOG=warn",
            ports[role].0, ports[role].1
        );
        if role == "emmg" || role == "scheduler" {
            env = format!("{env}\n{peers}");
        }
        text += &format!("  - target: {{kind: Deployment, name: casd-{role}}}\n    patch: |-\n");
        for kv in env.lines() {
            let (k, v) = kv.split_once('=').unwrap();
            text += &format!(
                "      - op: add\n        path: /spec/template/spec/containers/0/env/-\n        value: {{name: {k}, value: {}}}\n",
                serde_json::Value::String(v.into())
            );
        }
    }
    text
}

/// The rendered manifests with each Secret volume turned into a hostPath
/// directory of the test's (podman 4.3 mounts a Secret's data
/// undecoded, world-readable and root-owned). Every replacement must
/// happen: a change of kustomize's output format fails here.
fn secrets_as_host_paths(yaml: &str, dir: &Path) -> String {
    let mut out = yaml.to_owned();
    for name in SECRETS {
        let from = format!(
            "secret:\n          defaultMode: 256\n          optional: false\n          secretName: {name}\n"
        );
        let to = format!(
            "hostPath:\n          path: {}\n          type: Directory\n",
            dir.join(name).display()
        );
        assert!(out.contains(&from), "no Secret volume {name} in:\n{yaml}");
        out = out.replace(&from, &to);
    }
    out
}

/// What the operator puts in the Secrets (docs/deploy.md), one directory
/// per Secret, files 0400 owned by the image's user.
async fn secret_dirs(t: &TestDb, dir: &Path) -> (HashMap<&'static str, Secret>, Key128) {
    for s in SECRETS {
        std::fs::create_dir_all(dir.join(s)).unwrap();
        std::fs::set_permissions(dir.join(s), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    common::make_certs(dir);
    for (from, to) in [
        ("ca.pem", "ca.crt"),
        ("cert.pem", "tls.crt"),
        ("key.pem", "tls.key"),
    ] {
        let text = std::fs::read(dir.join(from)).unwrap();
        secret_file(&dir.join("casd-tls").join(to), &text);
    }
    let (secrets, root) = operator_setup(
        t,
        &dir.join("casd-root-key/root.key"),
        &dir.join("casd-token-signing-key/token-signing.pem"),
    )
    .await;
    for id in ["emmg", "scheduler"] {
        let file = dir.join(format!("casd-peer-{id}/client-secret"));
        secret_file(&file, secrets[id].expose().as_bytes());
    }
    let (_, password) = split_password(&t.url);
    secret_file(&dir.join("casd-database/password"), password.as_bytes());
    // base/casd.toml verifies the database's certificate with this CA.
    assert!(
        db_ca_into(&dir.join("casd-database/ca.crt")),
        "the split overlay connects to MariaDB over TLS: the test database needs its CA \
         (CASD_TEST_DATABASE_CA; scripts/test.sh sets it up)"
    );
    (secrets, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_play_split_overlay_five_roles_sms_to_air() {
    let Some(image) = image() else { return };
    let Some(kubectl) = crate::deploy::tool("kubectl") else {
        return;
    };
    let t = TestDb::new().await;
    let dir = test_dir("kube");
    let (secrets, root) = secret_dirs(&t, &dir).await;
    let mut cap = Capture::bind(0x0101).await;
    let ports: HashMap<&str, (u16, u16)> = ROLES
        .into_iter()
        .map(|r| (r, (common::free_port(), common::free_port())))
        .collect();
    let (db_url, _) = split_password(&t.url);
    let overlay = crate::deploy::kustomization(
        &["deploy/kubernetes/overlays/split"],
        &[],
        &test_overlay(image, &ports, &db_url, &cap.addr().to_string()),
    );
    let rendered = overlay.join("rendered.yaml");
    crate::deploy::render(&kubectl, &overlay, &rendered);
    let yaml = secrets_as_host_paths(&std::fs::read_to_string(&rendered).unwrap(), &dir);
    let play = overlay.join("play.yaml");
    std::fs::write(&play, yaml).unwrap();
    run(podman().args(["kube", "play"]).arg(&play));
    let kube = Kube(play);

    let containers = run(podman().args(["ps", "--format", "{{.Names}}"]));
    for role in ROLES {
        let name = format!("casd-{role}-pod-0-casd");
        assert!(
            containers.lines().any(|l| l == name),
            "no container {name}:\n{containers}"
        );
        assert_eq!(process_uid(&name), CASD_UID, "{role} runs as non-root");
    }
    let client = TokenClient::new(ClientCredentialsConfig {
        token_url: format!("https://127.0.0.1:{}/oauth/token", ports["sms"].0),
        client_id: "billing".into(),
        client_secret: Secret::new(secrets["billing"].expose()),
        scope: None,
        ca_file: Some(dir.join("casd-tls/ca.crt")),
    })
    .unwrap();
    for role in ROLES {
        let url = format!("https://127.0.0.1:{}/readyz", ports[role].0);
        let name = format!("casd-{role}-pod-0-casd");
        wait_ready(client.http(), &url, || running(&name)).await;
    }
    let base = format!("https://127.0.0.1:{}", ports["sms"].0);
    sms_to_air(&client, &base, &t, root, &mut cap).await;
    drop(kube);
    std::fs::remove_dir_all(&overlay).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
