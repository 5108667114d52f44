//! Who may call the API: OAuth 2.0 client credentials, JWT access tokens,
//! scopes (sms-api.md "Authentication").
//!
//! INTERFACE (stable for the routes): handlers take a [`Caller`] extractor
//! and call [`Caller::require`] with the route's [`Scope`]. A missing or bad
//! token is refused by the extractor with 401; a missing scope by `require`
//! with 403.
//!
//! PLACEHOLDER IMPLEMENTATION: until the token service lands (issue 6), the
//! extractor accepts `Authorization: Bearer dev:<client_id>` and grants every
//! scope. It must not ship.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use crate::api_error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    SmsWrite,
    SmsRead,
    EmmGenerate,
    Encrypt,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SmsWrite => "sms:write",
            Scope::SmsRead => "sms:read",
            Scope::EmmGenerate => "emm:generate",
            Scope::Encrypt => "encrypt",
            Scope::Admin => "admin",
        }
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

fn unauthorized(msg: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing bearer token"))?
            .to_str()
            .map_err(|_| unauthorized("malformed Authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))?;
        let client_id = token
            .strip_prefix("dev:")
            .filter(|c| !c.is_empty() && c.len() <= 64)
            .ok_or_else(|| unauthorized("invalid token"))?;
        Ok(Caller {
            client_id: client_id.to_owned(),
            scopes: vec![
                Scope::SmsWrite,
                Scope::SmsRead,
                Scope::EmmGenerate,
                Scope::Encrypt,
                Scope::Admin,
            ],
        })
    }
}
