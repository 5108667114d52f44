//! Authentication and authorization over real HTTP on 127.0.0.1 against a
//! real MariaDB: the token endpoint, the bearer check on every route, scope
//! checks, disabled clients, rate and body limits, signing key rotation.

use std::path::PathBuf;

use casd::auth::testing::{self, probe_path, RouteCase, TestIssuer};
use casd::auth::{clients, keys, Auth, AuthSettings, Scope};
use casd::testing::TestDb;
use mysql_async::prelude::*;
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    auth: Auth,
    key_file: PathBuf,
    shutdown: CancellationToken,
    t: TestDb,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.key_file.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn temp_key_file() -> PathBuf {
    std::env::temp_dir()
        .join(format!(
            "casd-auth-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ))
        .join("token-signing.pem")
}

/// Probe routes (one per scope) + the token endpoint, wrapped exactly as
/// app::run wraps a process's router, served over plain HTTP.
async fn start(tune: impl FnOnce(&mut AuthSettings)) -> Server {
    let t = TestDb::new().await;
    let key_file = temp_key_file();
    keys::init_signing_key(&t.db, &key_file).await.unwrap();
    let mut settings = AuthSettings {
        signing_key_file: Some(key_file.clone()),
        ..AuthSettings::default()
    };
    tune(&mut settings);
    let auth = Auth::new(t.db.clone(), settings);
    let router = testing::probe_routes().merge(casd::auth::endpoint::routes(auth.clone()));
    let router = casd::auth::protect(router, auth.clone(), 65536);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(casd::http::serve(listener, router, shutdown.clone()));
    Server {
        base: format!("http://{addr}"),
        addr,
        auth,
        key_file,
        shutdown,
        t,
    }
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

async fn token_request(
    s: &Server,
    auth_header: Option<String>,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}/oauth/token", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(h) = auth_header {
        rb = rb.header("authorization", h);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v: Value = r.json().await.unwrap();
    (status, headers, v)
}

async fn get(s: &Server, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path}", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn token_endpoint_issues_working_tokens_by_basic_and_by_form() {
    let s = start(|_| {}).await;
    let secret =
        testing::create_client(&s.t.db, "smsA", &[Scope::SmsWrite, Scope::SmsRead], 100).await;

    let (st, h, v) = token_request(
        &s,
        Some(basic("smsA", secret.expose())),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 600);
    assert_eq!(v["scope"], "sms:write sms:read");
    assert_eq!(h["cache-control"], "no-store");
    let token = v["access_token"].as_str().unwrap().to_owned();
    let r = get(&s, &probe_path(Scope::SmsRead), &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["client_id"], "smsA");
    assert_eq!(
        get(&s, &probe_path(Scope::Admin), &token).await.status(),
        403
    );

    let (st, _, v) = token_request(
        &s,
        None,
        &format!(
            "grant_type=client_credentials&client_id=smsA&client_secret={}",
            secret.expose()
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let token2 = v["access_token"].as_str().unwrap();
    assert_ne!(token, token2);
    assert_eq!(
        get(&s, &probe_path(Scope::SmsWrite), token2).await.status(),
        200
    );

    // Both ways at once is refused (RFC 6749 §2.3).
    let (st, _, v) = token_request(
        &s,
        Some(basic("smsA", secret.expose())),
        &format!(
            "grant_type=client_credentials&client_secret={}",
            secret.expose()
        ),
    )
    .await;
    assert_eq!((st, v["error"].as_str()), (400, Some("invalid_request")));

    // Id and secret are form-urlencoded inside Basic (§2.3.1).
    let odd = "p:w d+%/é";
    let hash = clients::hash_secret(odd, clients::HashCost::Fast);
    let mut c = s.t.db.conn().await.unwrap();
    c.exec_drop(
        "UPDATE oauth_clients SET secret_hash = ? WHERE client_id = 'smsA'",
        (hash,),
    )
    .await
    .unwrap();
    drop(c);
    let (st, _, v) = token_request(
        &s,
        Some(basic("smsA", odd)),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn token_endpoint_errors_follow_rfc6749() {
    let s = start(|_| {}).await;
    let secret =
        testing::create_client(&s.t.db, "smsB", &[Scope::SmsWrite, Scope::SmsRead], 100).await;
    let good = Some(basic("smsB", secret.expose()));

    // Wrong secret, unknown client: 401 invalid_client with a Basic challenge.
    for h in [basic("smsB", "wrong"), basic("nobody", secret.expose())] {
        let (st, hd, v) = token_request(&s, Some(h), "grant_type=client_credentials").await;
        assert_eq!(
            (st, v["error"].as_str()),
            (401, Some("invalid_client")),
            "{v}"
        );
        assert!(hd["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        assert_eq!(hd["cache-control"], "no-store");
        assert!(!v.to_string().contains(secret.expose()));
    }
    let (st, _, v) = token_request(&s, None, "grant_type=client_credentials").await;
    assert_eq!((st, v["error"].as_str()), (401, Some("invalid_client")));

    let cases = [
        (
            "grant_type=password&username=a&password=b",
            400,
            "unsupported_grant_type",
        ),
        (
            "grant_type=authorization_code&code=x",
            400,
            "unsupported_grant_type",
        ),
        ("scope=sms:read", 400, "invalid_request"),
        (
            "grant_type=client_credentials&grant_type=client_credentials",
            400,
            "invalid_request",
        ),
        (
            "grant_type=client_credentials&scope=admin",
            400,
            "invalid_scope",
        ),
        (
            "grant_type=client_credentials&scope=sms:read%20root",
            400,
            "invalid_scope",
        ),
    ];
    for (body, status, code) in cases {
        let (st, _, v) = token_request(&s, good.clone(), body).await;
        assert_eq!(
            (st, v["error"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
        assert!(v["error_description"].is_string());
    }

    // A subset of the client's scopes.
    let (st, _, v) = token_request(
        &s,
        good.clone(),
        "grant_type=client_credentials&scope=sms:read",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["scope"], "sms:read");
    let t = v["access_token"].as_str().unwrap();
    assert_eq!(get(&s, &probe_path(Scope::SmsRead), t).await.status(), 200);
    assert_eq!(get(&s, &probe_path(Scope::SmsWrite), t).await.status(), 403);

    // Not a form.
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/token", s.base))
        .header("authorization", good.clone().unwrap())
        .json(&serde_json::json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_request");

    // A disabled client gets no token, even with the right secret.
    clients::set_enabled(&s.t.db, "smsB", false).await.unwrap();
    let (st, _, v) = token_request(&s, good, "grant_type=client_credentials").await;
    assert_eq!((st, v["error"].as_str()), (401, Some("invalid_client")));
}

#[tokio::test]
async fn failed_token_requests_are_rate_limited_per_client() {
    let s = start(|a| {
        a.failed_token_burst = 3;
        a.failed_token_per_min = 1;
    })
    .await;
    let secret = testing::create_client(&s.t.db, "smsC", &[Scope::SmsRead], 100).await;
    for _ in 0..3 {
        let (st, _, _) = token_request(
            &s,
            Some(basic("smsC", "guess")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(st, 401);
    }
    // Locked out now, even with the right secret.
    let (st, h, v) = token_request(
        &s,
        Some(basic("smsC", secret.expose())),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"], "slow_down");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Another client is not affected.
    let other = testing::create_client(&s.t.db, "smsD", &[Scope::SmsRead], 100).await;
    let (st, _, _) = token_request(
        &s,
        Some(basic("smsD", other.expose())),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(st, 200);
}

/// The table the lead extends to every route of the real app: each route
/// with its scope. Here: the probe routes, one per scope.
fn probe_table() -> Vec<RouteCase> {
    Scope::ALL
        .into_iter()
        .map(|sc| RouteCase::new(Method::GET, &probe_path(sc), sc))
        .collect()
}

#[tokio::test]
async fn every_route_refuses_bad_tokens_and_missing_scopes() {
    let s = start(|_| {}).await;
    let issuer = TestIssuer::new(&s.t.db).await;
    testing::check_route_matrix(&reqwest::Client::new(), &s.base, &issuer, &probe_table()).await;
    // A path nobody serves is closed as well (no probing for routes).
    let r = reqwest::Client::new()
        .get(format!("{}/probe_unknown", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "unknown paths are closed too");
}

#[tokio::test]
async fn disabling_a_client_stops_its_token_at_the_next_check() {
    let s = start(|a| a.client_cache_ttl = std::time::Duration::ZERO).await;
    let issuer = TestIssuer::new(&s.t.db).await;
    let token = issuer.token("smsE", &[Scope::SmsRead]).await;
    let path = probe_path(Scope::SmsRead);
    assert_eq!(get(&s, &path, &token).await.status(), 200);
    clients::set_enabled(&s.t.db, "smsE", false).await.unwrap();
    let r = get(&s, &path, &token).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    assert!(v["error"]["message"].as_str().unwrap().contains("disabled"));
    clients::set_enabled(&s.t.db, "smsE", true).await.unwrap();
    assert_eq!(get(&s, &path, &token).await.status(), 200);
    // Scopes taken from the client since the token was issued go too.
    clients::set_scopes(&s.t.db, "smsE", &[Scope::SmsWrite])
        .await
        .unwrap();
    assert_eq!(get(&s, &path, &token).await.status(), 403);
}

#[tokio::test]
async fn over_the_client_rate_gives_429_with_retry_after() {
    let s = start(|_| {}).await;
    let issuer = TestIssuer::new(&s.t.db).await;
    testing::create_client(&s.t.db, "slow", &[Scope::SmsRead], 1).await;
    let token = issuer.mint("slow", &[Scope::SmsRead], casd::auth::token::unix_now());
    let path = probe_path(Scope::SmsRead);
    assert_eq!(get(&s, &path, &token).await.status(), 200);
    let mut limited = None;
    for _ in 0..5 {
        let r = get(&s, &path, &token).await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("five requests at 1/s were never limited");
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    // Another client has its own bucket.
    let other = issuer.token("fast", &[Scope::SmsRead]).await;
    assert_eq!(get(&s, &path, &other).await.status(), 200);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_with_the_spec_body() {
    let s = start(|_| {}).await;
    let issuer = TestIssuer::new(&s.t.db).await;
    let token = issuer.token("big", &[Scope::SmsRead]).await;
    let big = "x".repeat(70 * 1024);
    // Without a token the body is not even looked at.
    let r = reqwest::Client::new()
        .post(format!("{}{}", s.base, probe_path(Scope::SmsRead)))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Declared length, on a protected and on a public route.
    for path in [probe_path(Scope::SmsRead), "/oauth/token".into()] {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", s.base))
            .bearer_auth(&token)
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "body_too_large");
    }
    // Chunked, no length declared: counted while reading.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut req = String::from(
        "POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    );
    for _ in 0..20 {
        req.push_str(&format!("1000\r\n{}\r\n", "y".repeat(4096)));
    }
    req.push_str("0\r\n\r\n");
    // The server may answer and close before reading it all.
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = tcp.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("body_too_large"), "{resp}");
}

#[tokio::test]
async fn previous_signing_key_verifies_until_retired() {
    let s = start(|_| {}).await;
    let secret = testing::create_client(&s.t.db, "smsF", &[Scope::SmsRead], 100).await;
    let fetch = || {
        token_request(
            &s,
            Some(basic("smsF", secret.expose())),
            "grant_type=client_credentials",
        )
    };
    let (st, _, v) = fetch().await;
    assert_eq!(st, 200);
    let old = v["access_token"].as_str().unwrap().to_owned();
    let old_kid = casd::auth::token::check_header(&old).ok().unwrap().kid;

    let rot = keys::rotate_signing_key(&s.t.db, &s.key_file, 600)
        .await
        .unwrap();
    assert_eq!(rot.previous.as_deref(), Some(old_kid.as_str()));
    let (st, _, v) = fetch().await;
    assert_eq!(st, 200);
    let new = v["access_token"].as_str().unwrap().to_owned();
    let new_kid = casd::auth::token::check_header(&new).ok().unwrap().kid;
    assert_eq!(new_kid, rot.current);
    assert_ne!(new_kid, old_kid);

    let path = probe_path(Scope::SmsRead);
    assert_eq!(
        get(&s, &path, &old).await.status(),
        200,
        "previous key still verifies"
    );
    assert_eq!(get(&s, &path, &new).await.status(), 200);

    assert!(keys::retire_key(&s.t.db, &old_kid, 0).await.unwrap());
    s.auth.refresh_keys().await.unwrap();
    assert_eq!(get(&s, &path, &old).await.status(), 401, "retired key");
    assert_eq!(get(&s, &path, &new).await.status(), 200);

    // An issuer whose key was retired stops issuing rather than minting
    // tokens nobody accepts.
    keys::retire_key(&s.t.db, &new_kid, 0).await.unwrap();
    let (st, h, v) = fetch().await;
    assert_eq!(
        (st, v["error"].as_str()),
        (503, Some("temporarily_unavailable"))
    );
    assert!(h.contains_key("retry-after"));
}

/// Every route the real app serves, with the scope it needs, and the roles
/// to start so that it is served. EXTEND THIS as routes land (SMS commands:
/// `sms:write`; `GET /requests/…`, `GET /devices/…`: `sms:read`).
fn app_routes() -> (Vec<casd::config::Role>, Vec<RouteCase>) {
    use casd::config::Role;
    use serde_json::json;
    let mut routes = vec![
        RouteCase::new(Method::POST, "/encryptor/v1/seal", Scope::Encrypt)
            .body(json!({"jobs": []})),
        RouteCase::new(Method::POST, "/encryptor/v1/current-key", Scope::Encrypt)
            .body(json!("global")),
        RouteCase::new(Method::POST, "/encryptor/v1/create-key", Scope::Encrypt)
            .body(json!({"key": {"kind": "global"}, "activates_at": 0})),
        RouteCase::new(Method::POST, "/encryptor/v1/key-state", Scope::Encrypt)
            .body(json!({"key": {"kind": "global"}, "version": 1, "state": "active"})),
        RouteCase::new(Method::POST, "/encryptor/v1/rotate-root", Scope::Admin),
        RouteCase::new(Method::POST, "/encryptor/v1/export", Scope::Admin)
            .body(json!({"device_ids": [1]})),
        RouteCase::new(Method::POST, "/bulk", Scope::SmsWrite)
            .body(json!({"commands": [{"command": "removedevice", "transaction_id": "t", "device_id": 1}]})),
        RouteCase::new(Method::GET, "/requests/1", Scope::SmsRead),
        RouteCase::new(Method::GET, "/devices/1", Scope::SmsRead),
        RouteCase::new(Method::GET, "/jobs", Scope::Admin),
        RouteCase::new(Method::POST, "/jobs/purge/run", Scope::Admin).body(json!({})),
    ];
    for (i, path) in [
        "/adddevice",
        "/removedevice",
        "/addentitlement",
        "/removeentitlement",
        "/generateosm",
    ]
    .into_iter()
    .enumerate()
    {
        routes.push(
            RouteCase::new(Method::POST, path, Scope::SmsWrite)
                .body(json!({"transaction_id": format!("matrix-{i}"), "device_id": 1})),
        );
    }
    (vec![Role::Encryptor, Role::Sms, Role::Scheduler], routes)
}

#[tokio::test]
async fn every_app_route_refuses_bad_tokens_and_missing_scopes() {
    let t = TestDb::new().await;
    let key_file = temp_key_file();
    let dir = key_file.parent().unwrap().to_owned();
    std::fs::create_dir_all(&dir).unwrap();
    hw::key_source::FileKeySource::create_new(dir.join("root.key")).unwrap();
    let d = dir.display();
    let cfg = casd::config::Config::from_toml_str(
        &format!(
            "{}[metrics]\nlisten = \"\"\n[api]\nplain_http = true\nrequest_log = \"{d}/req.jsonl\"\n\
             [keys]\nroot_key_file = \"{d}/root.key\"\n[cycler]\nlog_file = \"{d}/car.jsonl\"\n\
             [auth]\nsigning_key_file = \"{d}/token-signing.pem\"\n",
            casd::testing::database_toml(&t.url)
        ),
        std::path::Path::new("t.toml"),
        std::iter::empty(),
    )
    .unwrap();
    let (roles, routes) = app_routes();
    let casd = casd::testing::Running::start(cfg, roles).await;
    casd.ready().await;
    let issuer = TestIssuer::new(&t.db).await;
    let http = reqwest::Client::new();
    testing::check_route_matrix(&http, &casd.base, &issuer, &routes).await;
    casd.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
