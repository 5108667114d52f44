//! Who may call the API: OAuth 2.0 client credentials, JWT access tokens,
//! scopes, per-client rate limits (sms-api.md "Authentication";
//! docs/security.md is the operator's view).
//!
//! INTERFACE (stable for the routes): handlers take a [`Caller`] extractor
//! and call [`Caller::require`] with the route's [`Scope`]. A missing or bad
//! token is refused with 401 before the handler runs; a missing scope by
//! `require` with 403.
//!
//! How it fits together:
//! - [`protect`] wraps the whole router of a process (app.rs does it once).
//!   Every path except [`PUBLIC_PATHS`] must carry a valid bearer token, so a
//!   route that forgets to take a `Caller` is still closed. The layer checks
//!   the token ([`Auth::authenticate`]), that the client is still enabled,
//!   and the client's rate limit, then puts the [`Caller`] into the request
//!   extensions, where the extractor finds it. Handler signatures and state
//!   types are untouched: the extractor works with any router state.
//! - [`Auth`] (cheap to clone, in `app::Shared::auth`) holds the public key
//!   set (`jwt_keys`), the client status cache and the rate limiter.
//! - [`endpoint`] serves `POST /oauth/token`; [`keys`] the Ed25519 signing
//!   key file and the published public keys; [`clients`] the `oauth_clients`
//!   registry (Argon2id secrets); [`client`] the outbound helper roles use to
//!   call each other; [`testing`] tokens for tests.

pub mod client;
pub mod clients;
pub mod endpoint;
pub mod keys;
pub mod limit;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::api_error::ApiError;
use crate::config::AuthConfig;
use crate::db::{Db, DbError};

/// Paths answered without a token: liveness, readiness, the API's own
/// description (no secret in it; tools read it before they have a token),
/// and the token endpoint itself (which authenticates clients by their
/// secret).
pub const PUBLIC_PATHS: &[&str] = &["/healthz", "/readyz", "/openapi.json", "/oauth/token"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    SmsWrite,
    SmsRead,
    EmmGenerate,
    Encrypt,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::SmsWrite,
        Scope::SmsRead,
        Scope::EmmGenerate,
        Scope::Encrypt,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SmsWrite => "sms:write",
            Scope::SmsRead => "sms:read",
            Scope::EmmGenerate => "emm:generate",
            Scope::Encrypt => "encrypt",
            Scope::Admin => "admin",
        }
    }

    /// Space-separated scope string (RFC 6749 §3.3) → scopes; an unknown
    /// name is an error carrying that name.
    pub fn parse_list(s: &str) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for name in s.split(' ').filter(|n| !n.is_empty()) {
            let sc: Scope = name.parse()?;
            if !out.contains(&sc) {
                out.push(sc);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Scopes → the space-separated form used in tokens and the database.
    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scope `{}` (expected sms:write, sms:read, emm:generate, encrypt, admin)",
                    s.escape_debug()
                )
            })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated client making a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub client_id: String,
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// 403 unless the caller's token carries `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this route needs scope `{}`", scope.as_str()),
            ))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        if let Some(Refusal(e)) = parts.extensions.get::<Refusal>() {
            return Err(e.clone());
        }
        if parts.extensions.get::<Auth>().is_none() {
            // Fail closed, loudly: a router that was never wrapped.
            tracing::error!(
                path = %parts.uri.path(),
                "route takes a Caller but the router is not wrapped by auth::protect"
            );
            return Err(ApiError::internal());
        }
        // Under `protect` but on a public path: there is no caller.
        Err(AuthError::Missing.into())
    }
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`, or not a JWT at all.
    Malformed,
    /// A JWT we do not accept; the reason is safe to show (never the token).
    Invalid(&'static str),
    /// The client was disabled or deleted since the token was issued.
    ClientDisabled,
    /// Over the client's rate limit; seconds to wait.
    RateLimited(u64),
    /// The database could not be asked whether the client is enabled.
    Unavailable,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        match e {
            AuthError::Missing => {
                unauthorized("missing bearer token (Authorization: Bearer <token>)")
            }
            AuthError::Malformed => unauthorized("malformed bearer token"),
            AuthError::Invalid(why) => unauthorized(&format!("invalid token: {why}")),
            AuthError::ClientDisabled => unauthorized("invalid token: client disabled"),
            AuthError::RateLimited(s) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "over this client's rate limit; retry later",
            )
            .retry_after(s),
            AuthError::Unavailable => ApiError::unavailable("token verification (database)"),
        }
    }
}

/// Settings of token issue and verification, from `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    pub token_lifetime_s: u64,
    pub leeway_s: u64,
    /// How long a client's enabled flag, scopes and rate are cached.
    pub client_cache_ttl: Duration,
    /// How often the public key set is reloaded from `jwt_keys`.
    pub key_refresh: Duration,
    /// The private key file, when this process issues tokens.
    pub signing_key_file: Option<PathBuf>,
    pub failed_token_burst: u32,
    pub failed_token_per_min: u32,
}

impl AuthSettings {
    pub fn from_config(c: &AuthConfig) -> AuthSettings {
        AuthSettings {
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            token_lifetime_s: c.token_lifetime_s,
            leeway_s: c.leeway_s,
            client_cache_ttl: Duration::from_millis(c.client_cache_ms),
            key_refresh: Duration::from_secs(c.key_refresh_s),
            signing_key_file: c.token_endpoint.then(|| c.signing_key_file.clone()),
            failed_token_burst: c.failed_token_burst,
            failed_token_per_min: c.failed_token_per_min,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings::from_config(&AuthConfig::default())
    }
}

/// What the verifier needs to know about a client, cached briefly.
#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub enabled: bool,
    pub scopes: Vec<Scope>,
    pub rate_per_s: u32,
}

/// The authentication context of one process. Clones share everything.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AuthSettings,
    db: Db,
    keys: token::KeySet,
    verified: token::VerifiedCache,
    clients: Mutex<HashMap<String, (Instant, Option<ClientStatus>)>>,
    limiter: limit::RateLimiter,
    failures: limit::RateLimiter,
    signer: Option<keys::SignerSource>,
    /// Argon2 verifications at once (each is ~20 MiB and tens of ms of CPU).
    hash_gate: tokio::sync::Semaphore,
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.inner.settings.issuer)
            .field("audience", &self.inner.settings.audience)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(db: Db, settings: AuthSettings) -> Auth {
        let signer = settings
            .signing_key_file
            .clone()
            .map(keys::SignerSource::new);
        Auth {
            inner: Arc::new(Inner {
                keys: token::KeySet::default(),
                verified: token::VerifiedCache::new(16_384),
                clients: Mutex::new(HashMap::new()),
                limiter: limit::RateLimiter::new(100_000),
                failures: limit::RateLimiter::new(10_000),
                signer,
                hash_gate: tokio::sync::Semaphore::new(2),
                dummy_hash: tokio::sync::OnceCell::new(),
                settings,
                db,
            }),
        }
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.inner.settings
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub(crate) fn signer(&self) -> Option<&keys::SignerSource> {
        self.inner.signer.as_ref()
    }

    pub(crate) fn failures(&self) -> &limit::RateLimiter {
        &self.inner.failures
    }

    /// Reloads the public key set from `jwt_keys` now; returns how many keys
    /// are usable. Called at start-up, periodically, and on an unknown `kid`.
    pub async fn refresh_keys(&self) -> Result<usize, DbError> {
        self.inner.keys.refresh(&self.inner.db).await
    }

    /// The whole check of a request's `Authorization` header: token,
    /// client still enabled, rate limit. Returns who is calling.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer_token(headers)?;
        let claims = self.verify_token(token).await?;
        let status = self
            .client_status(&claims.sub)
            .await?
            .filter(|s| s.enabled)
            .ok_or(AuthError::ClientDisabled)?;
        // A token never grants more than the client has now.
        let scopes: Vec<Scope> = Scope::parse_list(&claims.scope)
            .map_err(|_| AuthError::Invalid("unknown scope in token"))?
            .into_iter()
            .filter(|s| status.scopes.contains(s))
            .collect();
        let rate = f64::from(status.rate_per_s.max(1));
        self.inner
            .limiter
            .take(&claims.sub, rate, rate)
            .map_err(AuthError::RateLimited)?;
        Ok(Caller {
            client_id: claims.sub,
            scopes,
        })
    }

    /// Signature, algorithm, key id, issuer, audience, expiry of one token.
    pub async fn verify_token(&self, token: &str) -> Result<token::Claims, AuthError> {
        let header = token::check_header(token)?;
        let keys = &self.inner.keys;
        let refresh = self.inner.settings.key_refresh;
        if keys.is_stale(refresh) {
            // Reload in the background; this request uses the current set.
            let me = self.clone();
            if keys.begin_background_refresh() {
                tokio::spawn(async move {
                    let _ = me.refresh_logged().await;
                    me.inner.keys.end_background_refresh();
                });
            }
        }
        let key = match keys.get(&header.kid) {
            Some(k) => k,
            None => {
                // A key published since our last load (rotation elsewhere);
                // at most one such reload per second.
                let _one_at_a_time = keys.miss_lock.lock().await;
                if keys.get(&header.kid).is_none() && keys.may_refresh_on_miss(Instant::now()) {
                    let _ = self.refresh_logged().await;
                }
                match keys.get(&header.kid) {
                    Some(k) => k,
                    // The key table could not be read: we cannot tell a
                    // good token from a bad one.
                    None if keys.last_load_failed() => return Err(AuthError::Unavailable),
                    None => return Err(AuthError::Invalid("unknown signing key")),
                }
            }
        };
        let now = token::unix_now();
        let settings = &self.inner.settings;
        if let Some(c) = self.inner.verified.get(token, &key, settings, now) {
            return Ok(c);
        }
        let c = token::verify(token, &key, settings, now)?;
        self.inner.verified.put(token, &c);
        Ok(c)
    }

    /// False when the key set could not be read.
    async fn refresh_logged(&self) -> bool {
        match self.refresh_keys().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("cannot reload token verification keys: {e}");
                false
            }
        }
    }

    /// The client's enabled flag, scopes and rate, at most
    /// `client_cache_ttl` old. `None`: no such client.
    pub async fn client_status(&self, client_id: &str) -> Result<Option<ClientStatus>, AuthError> {
        let ttl = self.inner.settings.client_cache_ttl;
        if !ttl.is_zero() {
            if let Ok(m) = self.inner.clients.lock() {
                if let Some((at, st)) = m.get(client_id) {
                    if at.elapsed() < ttl {
                        return Ok(st.clone());
                    }
                }
            }
        }
        let row = clients::lookup(&self.inner.db, client_id)
            .await
            .map_err(|e| {
                tracing::warn!("cannot read client status: {e}");
                AuthError::Unavailable
            })?;
        let status = row.map(|r| ClientStatus {
            enabled: r.enabled,
            scopes: r.scopes,
            rate_per_s: r.rate_per_s,
        });
        if !ttl.is_zero() {
            if let Ok(mut m) = self.inner.clients.lock() {
                m.insert(client_id.to_owned(), (Instant::now(), status.clone()));
            }
        }
        Ok(status)
    }

    /// Argon2id check of a client secret off the async threads; at most two
    /// at once. `phc` None (unknown client) checks against a dummy hash so
    /// that unknown and known clients take the same time.
    pub(crate) async fn verify_secret(
        &self,
        phc: Option<String>,
        secret: zeroize::Zeroizing<String>,
    ) -> bool {
        let phc = match phc {
            Some(p) => p,
            None => match self
                .inner
                .dummy_hash
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(|| {
                        clients::hash_secret("not a real secret", clients::HashCost::Standard)
                    })
                    .await
                })
                .await
            {
                Ok(h) => h.clone(),
                Err(_) => return false,
            },
        };
        let Ok(_permit) = self.inner.hash_gate.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || clients::verify_secret(&phc, &secret))
            .await
            .unwrap_or(false)
    }
}

/// `Authorization: Bearer <token>` (scheme case-insensitive, RFC 6750 §2.1).
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > token::MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Wraps every route of a process: outside [`PUBLIC_PATHS`], bearer token,
/// enabled client and rate limit (401/429/503) with the resulting
/// [`Caller`] in the request extensions; then the body limit (413). The
/// token is checked first so that no body of an unauthenticated caller is
/// read.
pub fn protect(router: Router, auth: Auth, body_limit: usize) -> Router {
    let router = limit::body_limit(
        // Unknown paths are behind the layers too (401 before 404), also
        // after this router is merged with others.
        router.fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
        }),
        body_limit,
    );
    router
        .layer(axum::middleware::from_fn(authenticate_layer))
        .layer(axum::Extension(auth))
}

/// For routers whose every handler takes `Result<Caller, ApiError>`, checks
/// it first, and records refused requests itself (the SMS role: sms-api.md
/// "Records"): the same check as [`protect`], but a refusal (401/429/503) is
/// handed to the handler through the extractor instead of answered here.
/// No body limit either: such handlers apply `api.body_limit` themselves,
/// after the caller check. Everything else goes behind [`protect`].
pub fn attach(router: Router, auth: Auth) -> Router {
    router
        .layer(axum::middleware::from_fn(attach_layer))
        .layer(axum::Extension(auth))
}

/// A refused authentication, for the extractor of an [`attach`]ed route.
#[derive(Clone)]
struct Refusal(ApiError);

async fn attach_layer(mut req: Request, next: Next) -> Response {
    let Some(auth) = req.extensions().get::<Auth>().cloned() else {
        return ApiError::internal().into_response();
    };
    let mut challenge = None;
    match auth.authenticate(req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
        }
        Err(e) => {
            challenge = challenge_for(&e);
            req.extensions_mut().insert(Refusal(e.into()));
        }
    }
    let mut resp = next.run(req).await;
    add_challenge(&mut resp, challenge);
    resp
}

/// RFC 6750 §3: no error code when no credentials were sent.
fn challenge_for(e: &AuthError) -> Option<&'static str> {
    match e {
        AuthError::Missing => Some("Bearer realm=\"casd\""),
        AuthError::RateLimited(_) | AuthError::Unavailable => None,
        _ => Some("Bearer realm=\"casd\", error=\"invalid_token\""),
    }
}

fn add_challenge(resp: &mut Response, challenge: Option<&'static str>) {
    let value = match resp.status() {
        StatusCode::UNAUTHORIZED => challenge,
        StatusCode::FORBIDDEN => Some("Bearer realm=\"casd\", error=\"insufficient_scope\""),
        _ => None,
    };
    if let Some(v) = value {
        resp.headers_mut()
            .entry(header::WWW_AUTHENTICATE)
            .or_insert(HeaderValue::from_static(v));
    }
}

async fn authenticate_layer(mut req: Request, next: Next) -> Response {
    if PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Some(auth) = req.extensions().get::<Auth>().cloned() else {
        return ApiError::internal().into_response();
    };
    match auth.authenticate(req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            let mut resp = next.run(req).await;
            add_challenge(&mut resp, None);
            resp
        }
        Err(e) => {
            let challenge = challenge_for(&e);
            let mut resp = ApiError::from(e).into_response();
            add_challenge(&mut resp, challenge);
            resp
        }
    }
}
