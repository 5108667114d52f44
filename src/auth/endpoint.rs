//! `POST /oauth/token`: the client credentials grant (RFC 6749 §4.4).
//!
//! This is the one route whose errors use RFC 6749 §5.2's shape
//! (`{"error": "invalid_client", "error_description": "..."}`) rather than
//! the spec's `{"error": {"code", "message"}}`: OAuth client libraries
//! parse it. Every answer carries `Cache-Control: no-store`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;
use zeroize::Zeroizing;

use super::keys::KeyError;
use super::{clients, token, Auth, Scope};

/// The token route, to merge into a process's router.
pub fn routes(auth: Auth) -> Router {
    Router::new()
        .route("/oauth/token", post(token_endpoint))
        .with_state(auth)
}

/// An RFC 6749 §5.2 error.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    retry_after: Option<u64>,
}

fn oauth_err(code: &'static str, description: impl Into<String>) -> OAuthError {
    let status = match code {
        "invalid_client" => StatusCode::UNAUTHORIZED,
        "slow_down" => StatusCode::TOO_MANY_REQUESTS,
        "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    OAuthError {
        status,
        code,
        description: description.into(),
        retry_after: None,
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": self.code, "error_description": self.description})),
        )
            .into_response();
        let h = resp.headers_mut();
        no_store(h);
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"casd\""),
            );
        }
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The form, each parameter at most once (§3.2); empty values are absent.
struct Form(Vec<(String, Zeroizing<String>)>);

impl Form {
    fn parse(body: &[u8]) -> Result<Form, OAuthError> {
        let mut out: Vec<(String, Zeroizing<String>)> = Vec::new();
        for (k, v) in form_urlencoded::parse(body) {
            if v.is_empty() {
                continue;
            }
            if out.iter().any(|(k2, _)| *k2 == k) {
                return Err(oauth_err(
                    "invalid_request",
                    format!("parameter `{}` given more than once", k.escape_debug()),
                ));
            }
            out.push((k.into_owned(), Zeroizing::new(v.into_owned())));
        }
        Ok(Form(out))
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k2, _)| k2 == k)
            .map(|(_, v)| v.as_str())
    }
}

/// The client's id and secret, from HTTP Basic (§2.3.1: each
/// form-urlencoded inside) or from the form — never both (§2.3).
fn credentials(
    headers: &HeaderMap,
    form: &Form,
) -> Result<(String, Zeroizing<String>), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .map(|v| {
            let v = v.to_str().map_err(|_| bad_basic())?;
            let (scheme, rest) = v.split_once(' ').ok_or_else(bad_basic)?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(oauth_err(
                    "invalid_client",
                    "client authentication must be HTTP Basic or form fields",
                ));
            }
            let raw = Zeroizing::new(B64.decode(rest.trim()).map_err(|_| bad_basic())?);
            let raw = std::str::from_utf8(&raw).map_err(|_| bad_basic())?;
            let (id, secret) = raw.split_once(':').ok_or_else(bad_basic)?;
            Ok((form_decode(id)?, form_decode(secret)?))
        })
        .transpose()?;
    let in_form = form.get("client_secret").is_some();
    match basic {
        Some(_) if in_form => Err(oauth_err(
            "invalid_request",
            "client credentials given both in the Authorization header and in the body",
        )),
        Some((id, secret)) => {
            if form.get("client_id").is_some_and(|f| f != id.as_str()) {
                return Err(oauth_err(
                    "invalid_request",
                    "client_id differs from the one in the Authorization header",
                ));
            }
            Ok((id.to_string(), secret))
        }
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => Ok((id.to_owned(), Zeroizing::new(secret.to_owned()))),
            _ => Err(oauth_err(
                "invalid_client",
                "client authentication missing (HTTP Basic or client_id/client_secret)",
            )),
        },
    }
}

fn bad_basic() -> OAuthError {
    oauth_err("invalid_client", "malformed HTTP Basic credentials")
}

/// application/x-www-form-urlencoded decoding of one value ('+' is space).
fn form_decode(s: &str) -> Result<Zeroizing<String>, OAuthError> {
    let plus = Zeroizing::new(s.replace('+', " "));
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(|c| Zeroizing::new(c.into_owned()))
        .map_err(|_| bad_basic())
}

async fn token_endpoint(State(auth): State<Auth>, headers: HeaderMap, body: Bytes) -> Response {
    match issue(&auth, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn issue(auth: &Auth, headers: &HeaderMap, body: &[u8]) -> Result<Response, OAuthError> {
    let form = client_credentials_form(headers, body)?;
    let (client_id, row) = authenticate_client(auth, headers, &form).await?;
    let scopes = granted_scopes(&form, &row.scopes)?;
    let s = auth.settings();
    let key = signing_key(auth).await?;
    let (access_token, claims) = key.mint(s, &client_id, &scopes, token::unix_now());
    tracing::info!(client_id = %client_id, jti = %claims.jti, kid = %key.kid(), scope = %claims.scope, "access token issued");
    let mut resp = Json(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": s.token_lifetime_s,
        "scope": claims.scope,
    }))
    .into_response();
    no_store(resp.headers_mut());
    Ok(resp)
}

/// The form of a client credentials grant request.
fn client_credentials_form(headers: &HeaderMap, body: &[u8]) -> Result<Form, OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(oauth_err(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let form = Form::parse(body)?;
    match form.get("grant_type") {
        None => Err(oauth_err("invalid_request", "grant_type missing")),
        Some("client_credentials") => Ok(form),
        Some(_) => Err(oauth_err(
            "unsupported_grant_type",
            "only grant_type=client_credentials is supported",
        )),
    }
}

/// The client's id and its (enabled) record, once its secret is checked.
/// Failed attempts are counted per client id, and past the limit refused
/// before a hash is spent on them (429 `slow_down`).
async fn authenticate_client(
    auth: &Auth,
    headers: &HeaderMap,
    form: &Form,
) -> Result<(String, clients::ClientRow), OAuthError> {
    let (client_id, secret) = credentials(headers, form)?;
    if clients::validate_client_id(&client_id).is_err() {
        return Err(oauth_err("invalid_client", "client authentication failed"));
    }
    let s = auth.settings();
    let (rate, burst) = (
        f64::from(s.failed_token_per_min) / 60.0,
        f64::from(s.failed_token_burst),
    );
    if let Err(wait) = auth.failures().peek(&client_id) {
        let mut e = oauth_err(
            "slow_down",
            "too many failed attempts for this client; retry later",
        );
        e.retry_after = Some(wait);
        return Err(e);
    }
    let row = clients::lookup(auth.db(), &client_id).await.map_err(|e| {
        tracing::warn!("token endpoint cannot read oauth_clients: {e}");
        let mut e = oauth_err(
            "temporarily_unavailable",
            "database unavailable; retry later",
        );
        e.retry_after = Some(2);
        e
    })?;
    let ok = auth
        .verify_secret(row.as_ref().map(|r| r.secret_hash.clone()), secret)
        .await;
    match row {
        Some(r) if ok && r.enabled => Ok((client_id, r)),
        _ => {
            auth.failures().spend(&client_id, rate, burst);
            tracing::warn!(client_id = ?client_id, "token request refused: bad client credentials or disabled client");
            Err(oauth_err("invalid_client", "client authentication failed"))
        }
    }
}

/// The scopes asked for (all the client's when none are), each granted to
/// the client.
fn granted_scopes(form: &Form, granted: &[Scope]) -> Result<Vec<Scope>, OAuthError> {
    let scopes = match form.get("scope") {
        None => granted.to_vec(),
        Some(req) => {
            let asked = Scope::parse_list(req).map_err(|m| oauth_err("invalid_scope", m))?;
            if let Some(extra) = asked.iter().find(|s| !granted.contains(s)) {
                return Err(oauth_err(
                    "invalid_scope",
                    format!("scope `{extra}` is not granted to this client"),
                ));
            }
            asked
        }
    };
    if scopes.is_empty() {
        return Err(oauth_err("invalid_scope", "no scope to grant"));
    }
    Ok(scopes)
}

/// The process's signing key, published and not retired.
async fn signing_key(auth: &Auth) -> Result<std::sync::Arc<token::SigningKey>, OAuthError> {
    let unavailable = |why: &str| {
        let mut e = oauth_err("temporarily_unavailable", why);
        e.retry_after = Some(5);
        e
    };
    let Some(src) = auth.signer() else {
        return Err(unavailable("this process does not issue tokens"));
    };
    let key = src.current().map_err(|e| {
        match &e {
            KeyError::Missing { .. } => tracing::error!("{e}"),
            _ => tracing::error!("cannot load the token signing key: {e}"),
        }
        unavailable("no usable token signing key")
    })?;
    let db_err = |e: crate::db::DbError| {
        tracing::warn!("token endpoint cannot read jwt_keys: {e}");
        unavailable("database unavailable; retry later")
    };
    match super::keys::get_key(auth.db(), key.kid())
        .await
        .map_err(db_err)?
    {
        None => {
            super::keys::publish(auth.db(), &key)
                .await
                .map_err(db_err)?;
            tracing::info!(kid = %key.kid(), "token signing key published");
        }
        Some(row) if row.retires_at.is_some() => {
            tracing::error!(kid = %key.kid(), "the token signing key is retired; run `casd auth rotate-signing-key`");
            return Err(unavailable("token signing key retired"));
        }
        Some(_) => {}
    }
    Ok(key)
}
