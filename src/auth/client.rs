//! The calling side: a role that talks to another role over HTTP(S) gets
//! its access token here with its own client credentials, keeps it until
//! shortly before it expires, and attaches it to its requests.
//!
//! ```ignore
//! let tc = TokenClient::new(&ClientCredentialsConfig { .. })?;
//! let resp = tc.authorize(tc.http().post(url).json(&body)).await?.send().await?;
//! if resp.status() == 401 { tc.invalidate().await; /* retry once */ }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;

use crate::config::Secret;

/// Where and as whom to get tokens. Meant to be embedded in a role's
/// configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentialsConfig {
    /// The token endpoint, e.g. `https://cas-sms.example:8443/oauth/token`.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Space-separated scopes to ask for; all the client's scopes if absent.
    #[serde(default)]
    pub scope: Option<String>,
    /// PEM file of the CA(s) to trust for HTTPS (instead of the public roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenClientError {
    #[error("cannot read CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint said no (e.g. `invalid_client`, `invalid_scope`).
    #[error("token endpoint refused: {status} {code}: {description}")]
    Refused {
        status: u16,
        code: String,
        description: String,
        retry_after: Option<u64>,
    },
    #[error("token endpoint answered something unexpected: {0}")]
    BadResponse(String),
}

impl TokenClientError {
    /// Worth retrying later (endpoint down, 429/503), as opposed to a
    /// configuration error (bad secret, scope, CA).
    pub fn is_transient(&self) -> bool {
        match self {
            TokenClientError::Unreachable(_) => true,
            TokenClientError::Refused { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// A reqwest client for calls between roles: HTTPS trusting only `ca_file`
/// when given (the public web roots otherwise), HTTP/1.1, sane timeouts.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, TokenClientError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .https_only(false);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| TokenClientError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TokenClientError::Ca {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TokenClientError::Ca {
                path: path.to_owned(),
                message: "no certificate in the file".into(),
            });
        }
        b = b.tls_built_in_root_certs(false);
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| TokenClientError::Build(e.to_string()))
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
}

/// Client credentials → cached access token.
pub struct TokenClient {
    http: reqwest::Client,
    cfg: ClientCredentialsConfig,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("token_url", &self.cfg.token_url)
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Secret,
    token_type: String,
    expires_in: u64,
}

#[derive(Deserialize, Default)]
struct ErrorResponse {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// How long before expiry a token is replaced: a tenth of its life, at
/// least 5 s, at most half of it.
fn refresh_margin(expires_in: u64) -> Duration {
    let tenth = (expires_in / 10).max(5);
    Duration::from_secs(tenth.min(expires_in / 2))
}

impl TokenClient {
    pub fn new(cfg: ClientCredentialsConfig) -> Result<TokenClient, TokenClientError> {
        let http = http_client(cfg.ca_file.as_deref())?;
        Ok(TokenClient {
            http,
            cfg,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The HTTP client (same TLS trust) to make the role-to-role calls with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A valid access token, fetched if none is cached or it is about to
    /// expire. Concurrent callers share one fetch.
    pub async fn access_token(&self) -> Result<Secret, TokenClientError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let (token, expires_in) = self.fetch().await?;
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + Duration::from_secs(expires_in)
                - refresh_margin(expires_in),
        });
        Ok(token)
    }

    /// `req` with `Authorization: Bearer <token>`.
    pub async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, TokenClientError> {
        let t = self.access_token().await?;
        Ok(req.bearer_auth(t.expose()))
    }

    /// Forget the cached token (after a 401: key retired, client re-enabled…).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch(&self) -> Result<(Secret, u64), TokenClientError> {
        // RFC 6749 §2.3.1: id and secret form-urlencoded, then Basic.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = zeroize::Zeroizing::new(format!(
            "{}:{}",
            enc(&self.cfg.client_id),
            enc(self.cfg.client_secret.expose())
        ));
        let mut body = form_urlencoded::Serializer::new(String::new());
        body.append_pair("grant_type", "client_credentials");
        if let Some(s) = &self.cfg.scope {
            body.append_pair("scope", s);
        }
        let resp = self
            .http
            .post(&self.cfg.token_url)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Basic {}", B64.encode(basic.as_bytes())),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.finish())
            .send()
            .await
            .map_err(|e| TokenClientError::Unreachable(e.without_url().to_string()))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| TokenClientError::Unreachable(e.without_url().to_string()))?;
        if !status.is_success() {
            let e: ErrorResponse = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(TokenClientError::Refused {
                status: status.as_u16(),
                code: e.error,
                description: e.error_description,
                retry_after,
            });
        }
        let t: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| TokenClientError::BadResponse(e.to_string()))?;
        if !t.token_type.eq_ignore_ascii_case("bearer") || t.access_token.is_empty() {
            return Err(TokenClientError::BadResponse(format!(
                "token_type `{}`",
                t.token_type
            )));
        }
        Ok((t.access_token, t.expires_in))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_a_tenth_within_bounds() {
        assert_eq!(refresh_margin(600), Duration::from_secs(60));
        assert_eq!(refresh_margin(30), Duration::from_secs(5));
        assert_eq!(refresh_margin(6), Duration::from_secs(3));
    }
}
