//! casd to MariaDB over TLS (`database.tls = "required"`): the connection
//! is TLS, the server's certificate is verified, and a server that cannot
//! do TLS stops casd at start-up with one clear line.

use std::process::Command;

use casd::db::{Db, DbTls};
use casd::testing::MariaDbInstance;
use mysql_async::prelude::*;

use crate::db_common::tls_db;

/// `casd --config <file> migrate` with `[database]` pointing at `url`.
fn casd_migrate(url: &str, tls_lines: &str) -> std::process::Output {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("casd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\nconnect_timeout_s = 5\n{tls_lines}\
             [metrics]\nlisten = \"\"\n[api]\nplain_http = true\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_casd"))
        .arg("--config")
        .arg(&cfg)
        .arg("migrate")
        .env_remove("CASD_DATABASE_URL")
        .env("CASD_LOG", "off")
        .output()
        .unwrap()
}

#[test]
fn a_server_without_tls_stops_casd_with_one_clear_line() {
    let inst = MariaDbInstance::start(&["--skip-ssl"]);
    let url = format!("{}/casd", inst.server_url);
    let tls = format!("tls = \"required\"\ntls_ca = \"{}\"\n", inst.ca().display());
    let out = casd_migrate(&url, &tls);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not offer TLS"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", inst.port)), "{err}");
    let password = inst.server_url.split([':', '@']).nth(2).unwrap();
    assert!(
        !err.contains(password) && !err.contains("panicked"),
        "{err}"
    );
    // The same server, TLS explicitly off: reached (the refusal was TLS's).
    let plain = casd_migrate(&url.replace("/casd", "/mysql"), "tls = \"disabled\"\n");
    assert!(
        !String::from_utf8_lossy(&plain.stderr).contains("does not offer TLS"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
}

#[tokio::test]
async fn casd_talks_tls_to_the_scripts_server_and_checks_its_certificate() {
    let inst = MariaDbInstance::start(&[]);
    // The session is TLS (no move to the unix socket afterwards).
    let mut c = tls_db(&inst, "").conn().await.expect("TLS connection");
    let (_, version): (String, String) = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .await
        .unwrap()
        .unwrap();
    assert!(version.starts_with("TLSv1."), "{version:?}");
    drop(c);

    // A certificate from another CA is refused.
    let d = tempfile::tempdir().unwrap();
    crate::common::make_certs(d.path());
    let other = DbTls::Required {
        ca: Some(d.path().join("ca.pem")),
    };
    let db = Db::with_tls(
        &inst.server_url,
        &other,
        1,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let err = db.conn().await.expect_err("a server the CA did not sign");
    assert!(err.to_string().contains("certificate"), "{err}");

    // And `casd migrate` with the scripts' settings gets through.
    let tls = format!("tls = \"required\"\ntls_ca = \"{}\"\n", inst.ca().display());
    let mut admin = tls_db(&inst, "").conn().await.unwrap();
    admin.query_drop("CREATE DATABASE casd").await.unwrap();
    let out = casd_migrate(&format!("{}/casd", inst.server_url), &tls);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
