//! The OAuth client registry (`oauth_clients`): who may ask for tokens,
//! with which scopes, at what rate. Secrets are generated here (256 random
//! bits), shown once, and stored only as Argon2id PHC strings.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use mysql_async::prelude::*;
use zeroize::Zeroizing;

use super::Scope;
use crate::db::{classify, Db, DbError, DbErrorKind};

/// A freshly generated client secret. `Debug` never shows it; the bytes
/// are zeroized on drop.
pub struct NewSecret(Zeroizing<String>);

impl NewSecret {
    /// The secret itself, to print once or hand to a test.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewSecret(<redacted>)")
    }
}

/// 32 bytes from the OS random source, base64url (43 characters).
pub fn generate_secret() -> NewSecret {
    let mut b = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, b.as_mut());
    NewSecret(Zeroizing::new(B64.encode(b.as_ref())))
}

/// How expensive the hash is. `Standard` is what the CLI stores: Argon2id,
/// 19 MiB, 2 passes, 1 lane (OWASP's minimum recommendation). `Fast` is for
/// tests only; verification reads the parameters from the PHC string, so
/// both verify the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCost {
    Standard,
    Fast,
}

fn argon2(cost: HashCost) -> Argon2<'static> {
    let params = match cost {
        HashCost::Standard => Params::new(19 * 1024, 2, 1, None),
        HashCost::Fast => Params::new(256, 1, 1, None),
    }
    .unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The PHC string of `secret` with a random salt.
pub fn hash_secret(secret: &str, cost: HashCost) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2(cost)
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        // Only fails on parameter errors, which are constants above.
        .unwrap_or_default()
}

/// Checks `secret` against a PHC string (constant-time compare inside the
/// argon2 crate). Anything but an Argon2id hash is refused.
pub fn verify_secret(phc: &str, secret: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    if h.algorithm.as_str() != "argon2id" {
        return false;
    }
    Argon2::default()
        .verify_password(secret.as_bytes(), &h)
        .is_ok()
}

/// 1..=64 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_client_id(id: &str) -> Result<(), ClientError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ClientError::Invalid(
            "client id must be 1..=64 characters of A-Z a-z 0-9 . _ -".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Invalid(String),
    #[error("client `{0}` already exists")]
    Exists(String),
    #[error("no client `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<mysql_async::Error> for ClientError {
    fn from(e: mysql_async::Error) -> Self {
        ClientError::Db(e.into())
    }
}

/// A client as listed (no secret hash).
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub client_id: String,
    pub scopes: Vec<Scope>,
    pub enabled: bool,
    pub rate_per_s: u32,
    pub created_at: String,
    pub updated_at: String,
}

/// What the token endpoint and the verifier read.
#[derive(Clone)]
pub(crate) struct ClientRow {
    pub secret_hash: String,
    pub scopes: Vec<Scope>,
    pub enabled: bool,
    pub rate_per_s: u32,
}

pub(crate) async fn lookup(db: &Db, client_id: &str) -> Result<Option<ClientRow>, DbError> {
    let mut c = db.conn().await?;
    let row: Option<(String, String, bool, u32)> = c
        .exec_first(
            "SELECT secret_hash, scopes, enabled, rate_per_s FROM oauth_clients WHERE client_id = ?",
            (client_id,),
        )
        .await?;
    Ok(
        row.map(|(secret_hash, scopes, enabled, rate_per_s)| ClientRow {
            secret_hash,
            // Scopes in the table are written by us; an unknown one is dropped.
            scopes: scopes.split(' ').filter_map(|s| s.parse().ok()).collect(),
            enabled,
            rate_per_s,
        }),
    )
}

async fn hash_blocking(secret: &NewSecret, cost: HashCost) -> String {
    let s = Zeroizing::new(secret.expose().to_owned());
    tokio::task::spawn_blocking(move || hash_secret(&s, cost))
        .await
        .unwrap_or_default()
}

/// Registers a client; returns its secret (the only time it exists in clear).
pub async fn create(
    db: &Db,
    client_id: &str,
    scopes: &[Scope],
    rate_per_s: u32,
    cost: HashCost,
) -> Result<NewSecret, ClientError> {
    validate_client_id(client_id)?;
    if scopes.is_empty() {
        return Err(ClientError::Invalid(
            "a client needs at least one scope".into(),
        ));
    }
    if rate_per_s == 0 {
        return Err(ClientError::Invalid(
            "rate must be at least 1 request/s".into(),
        ));
    }
    let secret = generate_secret();
    let hash = hash_blocking(&secret, cost).await;
    let mut sorted = scopes.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut c = db.conn().await?;
    let r = c
        .exec_drop(
            "INSERT INTO oauth_clients (client_id, secret_hash, scopes, enabled, rate_per_s, created_at, updated_at) \
             VALUES (?, ?, ?, TRUE, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            (client_id, hash, Scope::join(&sorted), rate_per_s),
        )
        .await;
    match r {
        Ok(()) => Ok(secret),
        Err(e) if classify(&e) == DbErrorKind::Duplicate => {
            Err(ClientError::Exists(client_id.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn list(db: &Db) -> Result<Vec<ClientRecord>, ClientError> {
    let mut c = db.conn().await?;
    let rows: Vec<(String, String, bool, u32, String, String)> = c
        .query(
            "SELECT client_id, scopes, enabled, rate_per_s, \
                    DATE_FORMAT(created_at, '%Y-%m-%dT%H:%i:%sZ'), DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%sZ') \
             FROM oauth_clients ORDER BY client_id",
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(client_id, scopes, enabled, rate_per_s, created_at, updated_at)| ClientRecord {
                client_id,
                scopes: scopes.split(' ').filter_map(|s| s.parse().ok()).collect(),
                enabled,
                rate_per_s,
                created_at,
                updated_at,
            },
        )
        .collect())
}

async fn update(
    db: &Db,
    client_id: &str,
    set: &str,
    value: mysql_async::Value,
) -> Result<(), ClientError> {
    let mut c = db.conn().await?;
    c.exec_drop(
        format!(
            "UPDATE oauth_clients SET {set} = ?, updated_at = UTC_TIMESTAMP(6) WHERE client_id = ?"
        ),
        (value, client_id),
    )
    .await?;
    // affected_rows is 0 for "no change" too: look the row up instead.
    let n: Option<u64> = c
        .exec_first(
            "SELECT COUNT(*) FROM oauth_clients WHERE client_id = ?",
            (client_id,),
        )
        .await?;
    if n.unwrap_or(0) == 0 {
        return Err(ClientError::NotFound(client_id.to_owned()));
    }
    Ok(())
}

/// A new secret for the client; the old one stops working at once (tokens
/// already issued run until they expire).
pub async fn rotate_secret(
    db: &Db,
    client_id: &str,
    cost: HashCost,
) -> Result<NewSecret, ClientError> {
    let secret = generate_secret();
    let hash = hash_blocking(&secret, cost).await;
    update(db, client_id, "secret_hash", hash.into()).await?;
    Ok(secret)
}

/// Enables or disables a client. Disabling stops its tokens at their next
/// check (within `auth.client_cache_ms`).
pub async fn set_enabled(db: &Db, client_id: &str, enabled: bool) -> Result<(), ClientError> {
    update(db, client_id, "enabled", enabled.into()).await
}

pub async fn set_scopes(db: &Db, client_id: &str, scopes: &[Scope]) -> Result<(), ClientError> {
    if scopes.is_empty() {
        return Err(ClientError::Invalid(
            "a client needs at least one scope".into(),
        ));
    }
    let mut sorted = scopes.to_vec();
    sorted.sort();
    sorted.dedup();
    update(db, client_id, "scopes", Scope::join(&sorted).into()).await
}

pub async fn set_rate(db: &Db, client_id: &str, rate_per_s: u32) -> Result<(), ClientError> {
    if rate_per_s == 0 {
        return Err(ClientError::Invalid(
            "rate must be at least 1 request/s".into(),
        ));
    }
    update(db, client_id, "rate_per_s", rate_per_s.into()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verifies_only_its_secret() {
        let s = generate_secret();
        assert_eq!(s.expose().len(), 43);
        let h = hash_secret(s.expose(), HashCost::Fast);
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains(s.expose()));
        assert!(verify_secret(&h, s.expose()));
        assert!(!verify_secret(&h, "wrong"));
        assert!(!verify_secret("garbage", s.expose()));
        assert!(!format!("{s:?}").contains(s.expose()));
    }

    #[test]
    fn standard_cost_is_argon2id_19mib() {
        let h = hash_secret("x", HashCost::Standard);
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    }

    #[test]
    fn client_ids_are_checked() {
        assert!(validate_client_id("smsA").is_ok());
        assert!(validate_client_id("role.encryptor-1_x").is_ok());
        for bad in ["", "a b", "a:b", "é", &"x".repeat(65)] {
            assert!(validate_client_id(bad).is_err(), "{bad}");
        }
    }
}
