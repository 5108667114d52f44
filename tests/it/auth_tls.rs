//! The whole process: `app::run` with TLS configured, the outbound token
//! client trusting the test CA, and the `clients`/`auth` command line.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use casd::auth::client::{ClientCredentialsConfig, TokenClient};
use casd::auth::{clients, Scope};
use casd::config::{Config, Role, Secret};
use casd::testing::TestDb;
use tokio_util::sync::CancellationToken;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "casd-tls-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_certs(dir: &TempDir) {
    common::make_certs(&dir.0);
}

fn config(url: &str, dir: &TempDir, tls: bool) -> String {
    let d = dir.0.display();
    let api = if tls {
        format!("tls_cert = \"{d}/cert.pem\"\ntls_key = \"{d}/key.pem\"\n")
    } else {
        "plain_http = true\n".to_string()
    };
    let database = casd::testing::database_toml(url);
    format!(
        "{database}[metrics]\nlisten = \"\"\n[api]\n{api}request_log = \"{d}/req.jsonl\"\n\
         [cycler]\nlog_file = \"{d}/car.jsonl\"\n[auth]\nsigning_key_file = \"{d}/keys/token.pem\"\n"
    )
}

#[tokio::test]
async fn https_listener_with_token_client_trusting_the_ca() {
    let t = TestDb::new().await;
    let dir = TempDir::new();
    make_certs(&dir);
    let cfg = Config::from_toml_str(
        &config(&t.url, &dir, true),
        Path::new("t.toml"),
        std::iter::empty(),
    )
    .unwrap();
    casd::auth::keys::init_signing_key(&t.db, &cfg.auth.signing_key_file)
        .await
        .unwrap();
    let secret = clients::create(
        &t.db,
        "emmg-1",
        &[Scope::Encrypt],
        100,
        clients::HashCost::Fast,
    )
    .await
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(casd::app::run(
        cfg,
        vec![Role::Cycler],
        listener,
        shutdown.clone(),
    ));

    let tc = TokenClient::new(ClientCredentialsConfig {
        token_url: format!("https://127.0.0.1:{}/oauth/token", addr.port()),
        client_id: "emmg-1".into(),
        client_secret: Secret::new(secret.expose()),
        scope: None,
        ca_file: Some(dir.path("ca.pem")),
    })
    .unwrap();
    let https = format!("https://127.0.0.1:{}", addr.port());
    let mut up = false;
    for _ in 0..400 {
        match tc.http().get(format!("{https}/healthz")).send().await {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                up = true;
                break;
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
    assert!(up, "https /healthz never answered");

    // Token over HTTPS, cached, and accepted by the process's auth layer.
    let tok = tc.access_token().await.unwrap();
    assert_eq!(
        tok.expose(),
        tc.access_token().await.unwrap().expose(),
        "cached"
    );
    let r = tc
        .authorize(tc.http().get(format!("{https}/no-such-route")))
        .await
        .unwrap()
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "authenticated, then not found");
    let r = tc
        .http()
        .get(format!("{https}/no-such-route"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "every route but the public ones needs a token"
    );

    // A client that does not trust the CA cannot talk to it.
    let untrusting = reqwest::Client::new();
    assert!(untrusting
        .get(format!("{https}/healthz"))
        .send()
        .await
        .is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    assert!(
        plain
            .as_ref()
            .map(|r| !r.status().is_success())
            .unwrap_or(true),
        "{plain:?}"
    );

    // Wrong secret: the client reports the endpoint's refusal.
    let bad = TokenClient::new(ClientCredentialsConfig {
        token_url: format!("{https}/oauth/token"),
        client_id: "emmg-1".into(),
        client_secret: Secret::new("wrong"),
        scope: None,
        ca_file: Some(dir.path("ca.pem")),
    })
    .unwrap();
    match bad.access_token().await {
        Err(casd::auth::client::TokenClientError::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (401, "invalid_client"))
        }
        other => panic!("{other:?}"),
    }

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn tls_files_that_do_not_load_stop_start_up() {
    let t = TestDb::new().await;
    let dir = TempDir::new();
    std::fs::write(dir.path("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path("key.pem"), "not a key").unwrap();
    let cfg = Config::from_toml_str(
        &config(&t.url, &dir, true),
        Path::new("t.toml"),
        std::iter::empty(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = casd::app::run(cfg, vec![Role::Cycler], listener, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("api.tls_cert"), "{err}");
}

fn casd(cfg: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_casd"))
        // The test command exports the run database URL; the child uses its config file.
        .env_remove("CASD_DATABASE_URL")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn command_line_manages_clients_and_signing_keys() {
    let t = TestDb::new().await;
    let dir = TempDir::new();
    let cfg = dir.path("casd.toml");
    std::fs::write(&cfg, config(&t.url, &dir, false)).unwrap();

    let (ok, out, err) = casd(
        &cfg,
        &[
            "clients",
            "create",
            "--id",
            "smsA",
            "--scopes",
            "sms:write,sms:read",
            "--rate",
            "50",
        ],
    );
    assert!(ok, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("client_secret="))
        .expect("secret printed")
        .to_owned();
    assert_eq!(secret.len(), 43);
    let (ok, _, err) = casd(
        &cfg,
        &["clients", "create", "--id", "smsA", "--scopes", "sms:read"],
    );
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = casd(
        &cfg,
        &["clients", "create", "--id", "x", "--scopes", "root"],
    );
    assert!(!ok && err.contains("unknown scope"), "{err}");

    // Stored hashed; the hash checks the printed secret.
    let row = clients::list(&t.db).await.unwrap();
    assert_eq!(row.len(), 1);
    assert_eq!((row[0].rate_per_s, row[0].enabled), (50, true));
    let mut c = t.db.conn().await.unwrap();
    let hash: Option<String> = mysql_async::prelude::Queryable::query_first(
        &mut c,
        "SELECT secret_hash FROM oauth_clients WHERE client_id = 'smsA'",
    )
    .await
    .unwrap();
    drop(c);
    let hash = hash.unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains(&secret));
    assert!(clients::verify_secret(&hash, &secret));

    let (ok, out, _) = casd(&cfg, &["clients", "list"]);
    assert!(ok && out.contains("smsA") && out.contains("enabled") && !out.contains(&secret));
    let (ok, _, _) = casd(&cfg, &["clients", "disable", "--id", "smsA"]);
    assert!(ok);
    let (_, out, _) = casd(&cfg, &["clients", "list"]);
    assert!(out.contains("disabled"), "{out}");
    let (ok, _, _) = casd(&cfg, &["clients", "enable", "--id", "smsA"]);
    assert!(ok);
    let (ok, out, _) = casd(&cfg, &["clients", "rotate-secret", "--id", "smsA"]);
    assert!(ok);
    let new_secret = out
        .lines()
        .find_map(|l| l.strip_prefix("client_secret="))
        .unwrap();
    assert_ne!(new_secret, secret);
    let (ok, _, err) = casd(&cfg, &["clients", "disable", "--id", "nobody"]);
    assert!(!ok && err.contains("no client"), "{err}");

    // Signing keys.
    let (ok, out, err) = casd(&cfg, &["auth", "init-key"]);
    assert!(ok, "{err}");
    assert!(out.contains("created"), "{out}");
    let key_file = dir.path("keys/token.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, out, _) = casd(&cfg, &["auth", "init-key"]);
    assert!(ok && out.contains("already exists"), "{out}");
    let (ok, out, err) = casd(&cfg, &["auth", "rotate-signing-key"]);
    assert!(ok, "{err}");
    assert!(out.contains("previous key"), "{out}");
    let (ok, out, _) = casd(&cfg, &["auth", "keys"]);
    assert!(ok);
    assert!(
        out.contains("current") && out.contains("retiring in"),
        "{out}"
    );
}
