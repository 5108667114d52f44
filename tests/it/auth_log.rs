//! Secrets and tokens never reach the log. Run in a process of its own
//! (`common::run_alone`): the log is captured with a thread-scoped
//! subscriber, and tracing's per-callsite interest cache is process-wide, so
//! other tests running at the same time in this binary could make a
//! callsite look disabled (seen: "access token issued" missing).

use crate::common;

use casd::auth::testing::{self, probe_path};
use casd::auth::{keys, Auth, AuthSettings, Scope};
use casd::testing::TestDb;
use tokio_util::sync::CancellationToken;

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

use common::LogBuf;

#[test]
fn secrets_and_tokens_never_reach_the_log() {
    common::run_alone("auth_log::secrets_and_tokens_never_reach_the_log_alone");
}

#[tokio::test]
#[ignore = "run in a process of its own by secrets_and_tokens_never_reach_the_log"]
async fn secrets_and_tokens_never_reach_the_log_alone() {
    let buf = LogBuf::default();
    let w = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || w.clone())
        .finish();
    // Current-thread test runtime: the server's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let t = TestDb::new().await;
    let key_file = std::env::temp_dir()
        .join(format!(
            "casd-auth-log-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ))
        .join("token-signing.pem");
    keys::init_signing_key(&t.db, &key_file).await.unwrap();
    let auth = Auth::new(
        t.db.clone(),
        AuthSettings {
            signing_key_file: Some(key_file.clone()),
            ..AuthSettings::default()
        },
    );
    let router = testing::probe_routes().merge(casd::auth::endpoint::routes(auth.clone()));
    let router = casd::auth::protect(router, auth, 65536);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(casd::http::serve(listener, router, shutdown.clone()));
    let http = reqwest::Client::new();
    let token_request = |auth: String| {
        http.post(format!("{base}/oauth/token"))
            .header("authorization", auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
    };
    let get = |token: String| {
        http.get(format!("{base}{}", probe_path(Scope::SmsRead)))
            .bearer_auth(token)
            .send()
    };
    let secret = testing::create_client(&t.db, "smsL", &[Scope::SmsRead], 100).await;
    let r = token_request(basic("smsL", secret.expose())).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get(token.clone()).await.unwrap().status(), 200);
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(get(tampered.clone()).await.unwrap().status(), 401);
    let r = token_request(basic("smsL", "a-wrong-secret"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("access token issued"),
        "log not captured: {log}"
    );
    assert!(log.contains("token request refused"), "{log}");
    let signature = token.rsplit('.').next().unwrap();
    for (what, s) in [
        ("secret", secret.expose()),
        ("wrong secret", "a-wrong-secret"),
        ("token signature", signature),
        ("tampered token", &tampered[tampered.len() - 20..]),
    ] {
        assert!(!log.contains(s), "{what} in the log:\n{log}");
    }
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(key_file.parent().unwrap());
}
