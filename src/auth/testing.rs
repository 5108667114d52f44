//! Helpers for tests (this crate's and the end-to-end ones): clients with a
//! cheap hash, tokens signed by a key published in the test database (so
//! any casd process on that database accepts them), forged tokens of every
//! bad kind, and a route matrix check. Compiled only with the `testing`
//! feature (see `crate::testing`).
//!
//! ```ignore
//! let t = TestDb::new().await;
//! let token = casd::auth::testing::token_for(&t.db, "smsA", &[Scope::SmsWrite]).await;
//! client.post(url).bearer_auth(&token)...
//! ```

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use mysql_async::prelude::*;

use super::clients::{self, HashCost, NewSecret};
use super::token::{self, Claims, SigningKey};
use super::{keys, AuthSettings, Scope};
use crate::db::Db;

/// Registers (or re-enables, with these scopes) a client whose secret is
/// hashed with test-cheap Argon2 parameters; returns the secret.
pub async fn create_client(
    db: &Db,
    client_id: &str,
    scopes: &[Scope],
    rate_per_s: u32,
) -> NewSecret {
    let secret = clients::generate_secret();
    let hash = clients::hash_secret(secret.expose(), HashCost::Fast);
    let mut c = db.conn().await.expect("test db connection");
    c.exec_drop(
        "INSERT INTO oauth_clients (client_id, secret_hash, scopes, enabled, rate_per_s, created_at, updated_at) \
         VALUES (?, ?, ?, TRUE, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)) \
         ON DUPLICATE KEY UPDATE secret_hash = VALUES(secret_hash), scopes = VALUES(scopes), \
           enabled = TRUE, rate_per_s = VALUES(rate_per_s)",
        (client_id, hash, Scope::join(scopes), rate_per_s),
    )
    .await
    .expect("insert test client");
    secret
}

/// A signing key published in a test database, minting tokens for the
/// default issuer/audience (or the settings given).
pub struct TestIssuer {
    pub key: SigningKey,
    pub settings: AuthSettings,
    db: Db,
    published: bool,
}

impl TestIssuer {
    /// A new key, published in `db`.
    pub async fn new(db: &Db) -> TestIssuer {
        Self::with_settings(db, AuthSettings::default()).await
    }

    pub async fn with_settings(db: &Db, settings: AuthSettings) -> TestIssuer {
        let key = SigningKey::generate();
        keys::publish(db, &key).await.expect("publish test key");
        TestIssuer {
            key,
            settings,
            db: db.clone(),
            published: true,
        }
    }

    /// A key that is not published (for a server whose database is down:
    /// its tokens are well-formed, and nothing is written anywhere).
    pub fn unpublished(db: &Db) -> TestIssuer {
        TestIssuer {
            key: SigningKey::generate(),
            settings: AuthSettings::default(),
            db: db.clone(),
            published: false,
        }
    }

    /// A valid token for `client_id` with `scopes`; creates the client
    /// (enabled, those scopes, 1000 req/s) if it does not exist.
    pub async fn token(&self, client_id: &str, scopes: &[Scope]) -> String {
        if !self.published {
            return self.mint(client_id, scopes, token::unix_now());
        }
        let mut c = self.db.conn().await.expect("test db connection");
        let exists: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM oauth_clients WHERE client_id = ?",
                (client_id,),
            )
            .await
            .expect("select client");
        if exists.unwrap_or(0) == 0 {
            drop(c);
            create_client(&self.db, client_id, scopes, 1000).await;
        }
        self.mint(client_id, scopes, token::unix_now())
    }

    /// A token issued at `now` (unix seconds): pass an old `now` for an
    /// expired token. Does not touch the client table.
    pub fn mint(&self, client_id: &str, scopes: &[Scope], now: u64) -> String {
        self.key.mint(&self.settings, client_id, scopes, now).0
    }

    /// Signs arbitrary claims with this key.
    pub fn sign(&self, claims: &Claims) -> String {
        self.key.sign(claims)
    }

    pub fn claims(&self, client_id: &str, scopes: &[Scope]) -> Claims {
        Claims::new(&self.settings, client_id, scopes, token::unix_now())
    }

    /// Every way a token for `client_id` can be bad, each with its name.
    /// All must be refused with 401.
    pub fn bad_tokens(&self, client_id: &str, scopes: &[Scope]) -> Vec<(&'static str, String)> {
        let now = token::unix_now();
        let good = self.mint(client_id, scopes, now);
        let mut out = vec![
            ("malformed", "not-a-jwt".to_owned()),
            ("garbage segments", "a.b.c".to_owned()),
        ];
        // Payload changed after signing: ask for every scope.
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut c = self.claims(client_id, &Scope::ALL);
        c.iat = now;
        parts[1] = B64.encode(serde_json::to_vec(&c).unwrap_or_default());
        out.push(("tampered payload", parts.join(".")));
        // Signature of another key under our kid.
        let other = SigningKey::generate();
        let forged = other.sign(&self.claims(client_id, scopes));
        let mut fp: Vec<&str> = forged.split('.').collect();
        let gp: Vec<&str> = good.split('.').collect();
        fp[0] = gp[0];
        out.push(("bad signature", fp.join(".")));
        // A key nobody published.
        out.push(("unknown key", other.sign(&self.claims(client_id, scopes))));
        let mut wrong_aud = self.claims(client_id, scopes);
        wrong_aud.aud = format!("{}-other", self.settings.audience);
        out.push(("wrong audience", self.sign(&wrong_aud)));
        let mut wrong_iss = self.claims(client_id, scopes);
        wrong_iss.iss = format!("{}-other", self.settings.issuer);
        out.push(("wrong issuer", self.sign(&wrong_iss)));
        out.push((
            "expired",
            self.mint(
                client_id,
                scopes,
                now - self.settings.token_lifetime_s - self.settings.leeway_s - 60,
            ),
        ));
        out.push((
            "issued in the future",
            self.mint(client_id, scopes, now + 3600),
        ));
        // alg none, unsigned.
        let claims_b64 =
            B64.encode(serde_json::to_vec(&self.claims(client_id, scopes)).unwrap_or_default());
        let none_h = B64.encode(format!(
            r#"{{"alg":"none","typ":"at+jwt","kid":"{}"}}"#,
            self.key.kid()
        ));
        out.push(("alg none", format!("{none_h}.{claims_b64}.")));
        // HS256 "signed" with the public key as the HMAC secret (the classic
        // algorithm confusion), raw and base64url.
        for (name, secret) in [
            ("HS256 with the public key", self.key.public_key().to_vec()),
            (
                "HS256 with the public key, base64url",
                B64.encode(self.key.public_key()).into_bytes(),
            ),
        ] {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            h.kid = Some(self.key.kid().to_owned());
            h.typ = Some(token::TOKEN_TYPE.into());
            let t = jsonwebtoken::encode(
                &h,
                &self.claims(client_id, scopes),
                &jsonwebtoken::EncodingKey::from_secret(&secret),
            )
            .unwrap_or_default();
            out.push((name, t));
        }
        // Right key, wrong JOSE type (e.g. an ID token).
        let mut p: Vec<String> = good.split('.').map(str::to_owned).collect();
        p[0] = B64.encode(format!(
            r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
            self.key.kid()
        ));
        let input = format!("{}.{}", p[0], p[1]);
        let sig = B64.encode(self.key.sign_bytes(input.as_bytes()));
        out.push(("typ JWT", format!("{input}.{sig}")));
        out
    }
}

/// `Authorization` value for benches and tests that serve routes directly:
/// a client `bench` with every scope and a rate no bench reaches.
pub async fn bench_bearer(db: &Db) -> String {
    let issuer = TestIssuer::new(db).await;
    create_client(db, "bench", &Scope::ALL, 1_000_000).await;
    format!(
        "Bearer {}",
        issuer.mint("bench", &Scope::ALL, token::unix_now())
    )
}

/// A valid token for `client_id` with `scopes`, from a new key published
/// in `db` (default issuer and audience). Creates the client if needed.
pub async fn token_for(db: &Db, client_id: &str, scopes: &[Scope]) -> String {
    TestIssuer::new(db).await.token(client_id, scopes).await
}

/// One route of the route matrix: how to call it and what scope it needs.
#[derive(Debug, Clone)]
pub struct RouteCase {
    pub method: reqwest::Method,
    pub path: String,
    pub scope: Scope,
    /// JSON body for POSTs (need not be valid for the route: the matrix
    /// checks who gets in, not what the route does).
    pub body: Option<serde_json::Value>,
}

impl RouteCase {
    pub fn new(method: reqwest::Method, path: &str, scope: Scope) -> RouteCase {
        RouteCase {
            method,
            path: path.to_owned(),
            scope,
            body: None,
        }
    }
    pub fn body(mut self, b: serde_json::Value) -> RouteCase {
        self.body = Some(b);
        self
    }
}

/// For every route: no token, each bad token → 401 with the spec's error
/// body; a valid token without the route's scope → 403; with it → neither
/// 401 nor 403. Panics with the route and the case that failed.
pub async fn check_route_matrix(
    http: &reqwest::Client,
    base: &str,
    issuer: &TestIssuer,
    routes: &[RouteCase],
) {
    let client = format!("matrix-{:08x}", rand::random::<u32>());
    for r in routes {
        let others: Vec<Scope> = Scope::ALL.into_iter().filter(|s| *s != r.scope).collect();
        let send = |token: Option<String>| {
            let mut rb = http.request(r.method.clone(), format!("{base}{}", r.path));
            if let Some(b) = &r.body {
                rb = rb.json(b);
            }
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            rb.send()
        };
        let resp = send(None).await.expect("request");
        assert_eq!(resp.status(), 401, "{} {}: no token", r.method, r.path);
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = resp.json().await.expect("json error body");
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");

        // Every scope: valid for the client, so the bad tokens fail for
        // their badness alone.
        let all = issuer.token(&client, &Scope::ALL).await;
        for (what, t) in issuer.bad_tokens(&client, &[r.scope]) {
            let resp = send(Some(t.clone())).await.expect("request");
            assert_eq!(resp.status(), 401, "{} {}: {what}", r.method, r.path);
            let text = resp.text().await.unwrap_or_default();
            assert!(!text.contains(&t), "{what}: token echoed");
            let body: serde_json::Value = serde_json::from_str(&text).expect("json error body");
            assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
        }
        let wrong = issuer.mint(&client, &others, token::unix_now());
        let resp = send(Some(wrong)).await.expect("request");
        assert_eq!(
            resp.status(),
            403,
            "{} {}: without scope {}",
            r.method,
            r.path,
            r.scope
        );
        let body: serde_json::Value = resp.json().await.expect("json error body");
        assert_eq!(body["error"]["code"], "insufficient_scope", "{body}");
        let right = issuer.mint(&client, &[r.scope], token::unix_now());
        let status = send(Some(right)).await.expect("request").status();
        assert!(
            status != 401 && status != 403 && status != 429,
            "{} {}: with scope {}: {status}",
            r.method,
            r.path,
            r.scope
        );
        let status = send(Some(all)).await.expect("request").status();
        assert!(
            status != 401 && status != 403,
            "{} {}: every scope: {status}",
            r.method,
            r.path
        );
    }
}

/// A router with one route per scope, `GET /probe/<scope>` → 200 with the
/// caller, for testing the auth layer without the real routes.
pub fn probe_routes() -> axum::Router {
    use axum::routing::get;
    let mut r = axum::Router::new();
    for scope in Scope::ALL {
        r = r.route(
            &format!("/probe/{}", scope.as_str().replace(':', "_")),
            get(move |caller: super::Caller| async move {
                caller.require(scope)?;
                Ok::<_, crate::api_error::ApiError>(axum::Json(serde_json::json!({
                    "client_id": caller.client_id,
                    "scopes": Scope::join(&caller.scopes),
                })))
            }),
        );
    }
    r
}

/// The probe path of a scope.
pub fn probe_path(scope: Scope) -> String {
    format!("/probe/{}", scope.as_str().replace(':', "_"))
}
