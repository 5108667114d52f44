//! Access tokens: JWTs (RFC 7519) signed with Ed25519 (`alg` EdDSA,
//! RFC 8037), typed `at+jwt` (RFC 9068), with the signing key's RFC 7638
//! thumbprint as `kid`.
//!
//! Signing is done here with `ed25519-dalek` (whose key zeroizes on drop);
//! verification goes through the `jsonwebtoken` crate with our one algorithm
//! pinned, after our own header checks, against the public keys published
//! in `jwt_keys` ([`KeySet`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::Signer as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{AuthError, AuthSettings, Scope};
use crate::db::{Db, DbError};

/// Longest bearer token looked at; ours are well under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The JOSE `typ` of our access tokens (RFC 9068 §2.1).
pub const TOKEN_TYPE: &str = "at+jwt";

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The claims of a casd access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The client id.
    pub sub: String,
    /// RFC 9068 §2.2: the client the token was issued to (= `sub` here).
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    /// Random token id, for logs and revocation lists.
    pub jti: String,
}

impl Claims {
    /// Claims for `client_id` with `scopes`, issued at `now` (unix seconds).
    pub fn new(settings: &AuthSettings, client_id: &str, scopes: &[Scope], now: u64) -> Claims {
        Claims {
            iss: settings.issuer.clone(),
            aud: settings.audience.clone(),
            sub: client_id.to_owned(),
            client_id: client_id.to_owned(),
            scope: Scope::join(scopes),
            iat: now,
            exp: now + settings.token_lifetime_s,
            jti: hex::encode(rand::random::<[u8; 16]>()),
        }
    }
}

/// An Ed25519 signing key with its key id. Zeroized on drop (dalek);
/// `Debug` shows the kid only.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> SigningKey {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
        Self::from_dalek(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    fn from_dalek(key: ed25519_dalek::SigningKey) -> SigningKey {
        let kid = kid_for(key.verifying_key().as_bytes());
        SigningKey { key, kid }
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as written by
    /// `openssl genpkey -algorithm ed25519`.
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, String> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(Self::from_dalek)
            .map_err(|_| "not an Ed25519 PKCS#8 PEM private key".to_owned())
    }

    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, String> {
        self.key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| format!("cannot encode the key: {e}"))
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Raw Ed25519 signature (tests forge odd headers with it).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn sign_bytes(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// Signs `claims` into a compact JWS.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": self.kid});
        let mut out = String::with_capacity(512);
        out.push_str(&B64.encode(header.to_string()));
        out.push('.');
        // Serializing a struct of strings and integers cannot fail.
        out.push_str(&B64.encode(serde_json::to_vec(claims).unwrap_or_default()));
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&B64.encode(sig.to_bytes()));
        out
    }

    /// Claims for `client_id`/`scopes` at `now`, signed. Tests pass a `now`
    /// in the past to make an expired token without waiting.
    pub fn mint(
        &self,
        settings: &AuthSettings,
        client_id: &str,
        scopes: &[Scope],
        now: u64,
    ) -> (String, Claims) {
        let claims = Claims::new(settings, client_id, scopes, now);
        (self.sign(&claims), claims)
    }
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key (RFC 8037 §2), base64url.
pub fn kid_for(public: &[u8; 32]) -> String {
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public)
    );
    B64.encode(Sha256::digest(jwk.as_bytes()))
}

/// What we insist on in the JOSE header before looking at anything else.
pub struct CheckedHeader {
    pub kid: String,
}

/// Header checks: a JWT whose `alg` is exactly EdDSA (never `none`, HS*,
/// RS*…), `typ` at+jwt and a `kid`.
pub fn check_header(token: &str) -> Result<CheckedHeader, AuthError> {
    if token.len() > MAX_TOKEN_LEN || token.split('.').count() != 3 {
        return Err(AuthError::Malformed);
    }
    let h = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
    if h.alg != Algorithm::EdDSA {
        return Err(AuthError::Invalid("wrong algorithm"));
    }
    if h.typ.as_deref() != Some(TOKEN_TYPE) {
        return Err(AuthError::Invalid("not an access token"));
    }
    let kid = h.kid.ok_or(AuthError::Invalid("no key id"))?;
    Ok(CheckedHeader { kid })
}

/// A published verification key.
#[derive(Clone)]
pub struct PublicKey {
    pub key: DecodingKey,
    /// Unix seconds after which it verifies nothing; None while current.
    pub retires_at: Option<u64>,
}

/// Verifies `token` against `key`: signature, alg, exp (with leeway),
/// iss, aud; and that the key is not retired at `now`.
pub fn verify(
    token: &str,
    key: &PublicKey,
    settings: &AuthSettings,
    now: u64,
) -> Result<Claims, AuthError> {
    if key.retires_at.is_some_and(|t| now >= t) {
        return Err(AuthError::Invalid("signing key retired"));
    }
    let mut v = Validation::new(Algorithm::EdDSA);
    v.algorithms = vec![Algorithm::EdDSA];
    v.leeway = settings.leeway_s;
    v.set_audience(&[&settings.audience]);
    v.set_issuer(&[&settings.issuer]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
    use jsonwebtoken::errors::ErrorKind as K;
    let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| {
        AuthError::Invalid(match e.kind() {
            K::InvalidSignature => "bad signature",
            K::ExpiredSignature => "expired",
            K::InvalidAudience => "wrong audience",
            K::InvalidIssuer => "wrong issuer",
            K::InvalidAlgorithm => "wrong algorithm",
            K::ImmatureSignature => "not yet valid",
            _ => "undecodable claims",
        })
    })?;
    let c = data.claims;
    if c.iat > now + settings.leeway_s {
        return Err(AuthError::Invalid("issued in the future"));
    }
    if c.sub.is_empty() || c.sub != c.client_id {
        return Err(AuthError::Invalid("bad subject"));
    }
    Ok(c)
}

/// Tokens whose signature, issuer, audience and subject have been checked,
/// keyed by the SHA-256 of the whole token, so that a client's every
/// request does not pay for an Ed25519 verification (the largest CPU cost
/// of an SMS command). A hit is only a token byte-identical to one that
/// verified: any change to header, claims or signature is another key and
/// goes through [`verify`]. Expiry and the key's retirement are checked on
/// every hit; the key must still be published (the caller looks it up
/// first). Bounded: emptied when full.
pub struct VerifiedCache {
    map: std::sync::Mutex<HashMap<[u8; 32], Claims>>,
    cap: usize,
}

impl VerifiedCache {
    pub fn new(cap: usize) -> VerifiedCache {
        VerifiedCache {
            map: std::sync::Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    fn id(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The claims of `token` if it verified before and is still valid at
    /// `now` under `key`.
    pub fn get(
        &self,
        token: &str,
        key: &PublicKey,
        settings: &AuthSettings,
        now: u64,
    ) -> Option<Claims> {
        if key.retires_at.is_some_and(|t| now >= t) {
            return None;
        }
        let map = self.map.lock().ok()?;
        map.get(&Self::id(token))
            .filter(|c| c.exp.saturating_add(settings.leeway_s) > now)
            .cloned()
    }

    pub fn put(&self, token: &str, claims: &Claims) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.cap {
                map.clear();
            }
            map.insert(Self::id(token), claims.clone());
        }
    }
}

/// The public keys every verifier holds, loaded from `jwt_keys`.
#[derive(Default)]
pub struct KeySet {
    state: RwLock<KeyState>,
    refreshing: AtomicBool,
    /// Held while a request reloads the set for an unknown kid, so that
    /// concurrent requests wait for that load instead of failing.
    pub(crate) miss_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct KeyState {
    keys: HashMap<String, PublicKey>,
    /// Last load attempt, successful or not.
    loaded_at: Option<Instant>,
    /// Whether that attempt read the table.
    last_ok: bool,
    last_miss_refresh: Option<Instant>,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<PublicKey> {
        self.state.read().ok()?.keys.get(kid).cloned()
    }

    /// True when the last load failed (database unreachable) or none was
    /// made: an unknown kid then means "cannot tell", not "bad token".
    pub fn last_load_failed(&self) -> bool {
        self.state
            .read()
            .map(|s| s.loaded_at.is_none() || !s.last_ok)
            .unwrap_or(true)
    }

    pub fn is_stale(&self, every: Duration) -> bool {
        self.state
            .read()
            .map(|s| s.loaded_at.is_none_or(|t| t.elapsed() >= every))
            .unwrap_or(true)
    }

    pub(crate) fn begin_background_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn end_background_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// True at most once a second: an unknown kid may trigger a reload, but
    /// a stream of made-up kids cannot hammer the database.
    pub fn may_refresh_on_miss(&self, now: Instant) -> bool {
        let Ok(mut s) = self.state.write() else {
            return false;
        };
        if s.last_miss_refresh
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        s.last_miss_refresh = Some(now);
        true
    }

    /// Replaces the set with the usable keys in `jwt_keys`.
    pub async fn refresh(&self, db: &Db) -> Result<usize, DbError> {
        let rows = super::keys::load_public_keys(db).await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                // Keep the old set; try again after the refresh period.
                if let Ok(mut s) = self.state.write() {
                    s.loaded_at = Some(Instant::now());
                    s.last_ok = false;
                }
                return Err(e);
            }
        };
        let mut keys = HashMap::new();
        for r in rows {
            if r.alg != "EdDSA" || r.public_key.len() != 32 {
                tracing::warn!(kid = %r.kid, "ignoring jwt_keys row with unexpected algorithm or length");
                continue;
            }
            keys.insert(
                r.kid,
                PublicKey {
                    key: DecodingKey::from_ed_der(&r.public_key),
                    retires_at: r.retires_at,
                },
            );
        }
        let n = keys.len();
        if let Ok(mut s) = self.state.write() {
            s.keys = keys;
            s.loaded_at = Some(Instant::now());
            s.last_ok = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings::default()
    }

    fn public(k: &SigningKey) -> PublicKey {
        PublicKey {
            key: DecodingKey::from_ed_der(&k.public_key()),
            retires_at: None,
        }
    }

    #[test]
    fn signed_token_verifies_and_carries_its_claims() {
        let k = SigningKey::generate();
        let now = unix_now();
        let (t, c) = k.mint(&settings(), "smsA", &[Scope::SmsRead], now);
        assert_eq!(check_header(&t).unwrap().kid, k.kid());
        let got = verify(&t, &public(&k), &settings(), now).unwrap();
        assert_eq!(got, c);
        assert_eq!(got.scope, "sms:read");
        assert_eq!(got.exp, now + 600);
    }

    #[test]
    fn the_verified_cache_holds_only_the_exact_token_until_it_expires() {
        let k = SigningKey::generate();
        let st = settings();
        let now = unix_now();
        let (t, c) = k.mint(&st, "smsA", &[Scope::SmsWrite], now);
        let key = public(&k);
        let cache = VerifiedCache::new(4);
        assert!(cache.get(&t, &key, &st, now).is_none(), "empty at first");
        cache.put(&t, &verify(&t, &key, &st, now).unwrap());
        assert_eq!(cache.get(&t, &key, &st, now), Some(c.clone()));
        // Any other byte is another token: not in the cache.
        let mut forged = t.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(cache.get(&forged, &key, &st, now).is_none());
        // Expired (past the leeway): no longer answered from the cache.
        assert!(cache.get(&t, &key, &st, c.exp + st.leeway_s).is_none());
        // Its key retired: nothing either.
        let retired = PublicKey {
            key: key.key.clone(),
            retires_at: Some(now),
        };
        assert!(cache.get(&t, &retired, &st, now).is_none());
        // Bounded: full means emptied, then the new entry.
        for i in 0..4 {
            let (ti, ci) = k.mint(&st, &format!("c{i}"), &[Scope::SmsRead], now);
            cache.put(&ti, &ci);
        }
        assert!(cache.map.lock().unwrap().len() <= 4);
    }

    #[test]
    fn another_key_does_not_verify() {
        let (a, b) = (SigningKey::generate(), SigningKey::generate());
        let (t, _) = a.mint(&settings(), "x", &[], unix_now());
        assert_eq!(
            verify(&t, &public(&b), &settings(), unix_now()),
            Err(AuthError::Invalid("bad signature"))
        );
    }

    #[test]
    fn pem_round_trip_keeps_the_kid() {
        let k = SigningKey::generate();
        let pem = k.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k2 = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(k.kid(), k2.kid());
        assert!(!format!("{k:?}").contains(&pem[28..60]));
    }

    #[test]
    fn openssl_made_key_is_accepted() {
        // `openssl genpkey -algorithm ed25519` (a throwaway test key).
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEIBaJZHLGPgEulzLAmw7LwhMsICO2LXUmLtDW/gI5Y+HR\n\
                   -----END PRIVATE KEY-----\n";
        let k = SigningKey::from_pkcs8_pem(pem).unwrap();
        assert_eq!(k.kid(), "D6YMUV-ukGEsJ-Zk7VxGCim96eMCpj_vS-NLQ0Xnom4");
        let (t, _) = k.mint(&settings(), "x", &[Scope::Admin], unix_now());
        assert!(verify(&t, &public(&k), &settings(), unix_now()).is_ok());
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of the A.2 public key.
        let x = B64
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let x: [u8; 32] = x.try_into().unwrap();
        assert_eq!(kid_for(&x), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn retired_key_verifies_nothing() {
        let k = SigningKey::generate();
        let now = unix_now();
        let (t, _) = k.mint(&settings(), "x", &[], now);
        let mut p = public(&k);
        p.retires_at = Some(now + 10);
        assert!(verify(&t, &p, &settings(), now).is_ok());
        assert_eq!(
            verify(&t, &p, &settings(), now + 10),
            Err(AuthError::Invalid("signing key retired"))
        );
    }
}
