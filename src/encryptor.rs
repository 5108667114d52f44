//! The Encryptor role: the only holder of keys. It seals EMMs (and hands out
//! key *versions*) for the EMMG and the Scheduler.
//!
//! One trait, [`Encryptor`], two implementations: [`LocalEncryptor`] (same
//! process: a direct call, no HTTP) and `RemoteEncryptor` (another process:
//! the REST endpoint below). Callers hold an `Arc<dyn Encryptor>` and do not
//! know which one they have.
//!
//! REST (scope `encrypt`):
//! - `POST /encryptor/v1/seal` `{"jobs": [SealJob, …]}` (at most
//!   [`MAX_BATCH`]) → `{"results": [{"section": hex, "key_version": n} |
//!   {"error": {"code", "message"}}, …]}` in job order;
//! - `POST /encryptor/v1/current-key` `{"kind": "group", "group_id": 7}` →
//!   the [`KeyMeta`] of the version to use now (a group's first key is
//!   created on demand);
//! - `POST /encryptor/v1/create-key` `{"key": {"kind": "global"},
//!   "activates_at": 1767225600}` → the [`KeyMeta`] of the next version
//!   (key rotation, by the Scheduler);
//! - `POST /encryptor/v1/key-state` `{"key": …, "version": 2, "state":
//!   "retired"}` → 204;
//! - `POST /encryptor/v1/rotate-root` (scope `admin`) → [`RootRotation`]:
//!   re-seals every key row under `keys.next_root_key_file`;
//! - `POST /encryptor/v1/export` (scope `admin`) `{"device_ids": [1, 2]}`
//!   → the personalization file's [`Export`]: each device's DUK wrapped
//!   under `keys.transport_key_file` (docs/format.md §9), recorded first.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api_error::ApiError;
use crate::auth::{Caller, Scope};
use crate::keystore::{KeyKind, KeyMeta, KeyStore, KeyStoreError};
use casd_wire::crypto::{self, Key128};
use casd_wire::emm::{self, Address, CommandSpec, EmmId, KeyRef, SealInput};
use casd_wire::personalization;

/// Largest batch one call may carry.
pub const MAX_BATCH: usize = 1000;

/// The latest activation a key version can have: `keys.activates_at` is
/// written with FROM_UNIXTIME, which gives NULL past 2^31-1 on MariaDB 10.x
/// (the insert would then fail and the caller get a 500).
pub const MAX_ACTIVATES_AT: u32 = i32::MAX as u32;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One EMM to seal. Key-delivery commands carry versions, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealJob {
    pub emm_id: u64,
    pub issued_at: u32,
    pub not_after: u32,
    pub address: Address,
    /// Version of the address root (PMK for unique, GK for group, GLK for
    /// global); `None` = the version to use now.
    #[serde(default)]
    pub key_version: Option<u32>,
    pub commands: Vec<CommandSpec>,
}

/// A sealed EMM: the complete section, CRC included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    #[serde(with = "hex_bytes")]
    pub section: Vec<u8>,
    pub key_version: u32,
}

/// Why one job of a batch was refused (the others still go through).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum SealJobError {
    /// The named key version does not exist.
    #[error("{0}")]
    UnknownKey(String),
    /// The EMM does not fit `max_section_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// The commands cannot be encoded (or a key command its address may not carry).
    #[error("{0}")]
    Invalid(String),
}

/// Why a whole call failed.
#[derive(Debug, thiserror::Error)]
pub enum EncryptorError {
    /// The database or the Encryptor process is not there; retry later.
    #[error("encryptor unavailable: {0}")]
    Unavailable(String),
    /// A request the Encryptor refuses as a whole.
    #[error("encryptor refused the request: {0}")]
    Refused(String),
    /// The key family has no usable version (every one retired, or none
    /// activated yet): a state to fix, not a fault (409).
    #[error("{0}")]
    NoVersion(String),
    /// Something that retrying will not fix (e.g. the root key does not open the store).
    #[error("encryptor failure: {0}")]
    Internal(String),
}

pub type SealResults = Vec<Result<Sealed, SealJobError>>;

/// What the EMMG and Scheduler need from the Encryptor.
pub trait Encryptor: Send + Sync {
    /// Seals every job; per-job refusals are in the results, in job order.
    fn seal_batch(&self, jobs: Vec<SealJob>) -> BoxFuture<'_, Result<SealResults, EncryptorError>>;
    /// The version of `kind` to use now (a group's first key is created).
    fn current_key(&self, kind: KeyKind) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>>;
    /// Creates the next version of `kind`, activating at `activates_at`
    /// (unix s; 0 = now). Used by the Scheduler's key rotation.
    fn create_key_version(
        &self,
        kind: KeyKind,
        activates_at: u32,
    ) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>> {
        let _ = (kind, activates_at);
        Box::pin(async { Err(EncryptorError::Refused("key creation not supported".into())) })
    }
    /// Sets a version's state (`active`, `retiring`, `retired`).
    fn set_key_state(
        &self,
        kind: KeyKind,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'_, Result<(), EncryptorError>> {
        let _ = (kind, version, state);
        Box::pin(async {
            Err(EncryptorError::Refused(
                "key state change not supported".into(),
            ))
        })
    }
    /// Personalization export: every device's DUK (current PMK) wrapped
    /// for the vendor, never in clear; recorded in `duk_exports` and the
    /// log before it is handed out.
    fn export_duks(&self, req: ExportRequest) -> BoxFuture<'_, Result<Export, EncryptorError>> {
        let _ = req;
        Box::pin(async { Err(EncryptorError::Refused("export not supported".into())) })
    }
    /// Root key rotation: re-seals every key row under the configured next
    /// root key (`keys.next_root_key_file`) and switches to it.
    fn rotate_root(&self) -> BoxFuture<'_, Result<RootRotation, EncryptorError>> {
        Box::pin(async {
            Err(EncryptorError::Refused(
                "root rotation not supported".into(),
            ))
        })
    }
}

/// What to export and who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub devices: crate::export::DeviceSet,
    pub exported_by: String,
    pub via: crate::export::Via,
}

/// A personalization file: its header and one line per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub header: personalization::Header,
    pub lines: Vec<personalization::Line>,
}

impl Export {
    /// The file's text (JSON lines, docs/format.md §9).
    pub fn to_jsonl(&self) -> String {
        // Plain structs of strings and integers: serializing cannot fail.
        fn line<T: Serialize>(v: &T) -> String {
            serde_json::to_string(v).unwrap_or_default() + "\n"
        }
        let mut out = line(&self.header);
        out.reserve(80 * self.lines.len());
        self.lines.iter().for_each(|l| out += &line(l));
        out
    }
}

/// States a key version may be set to through the Encryptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Retiring,
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
        }
    }
}

/// What a root rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum RootRotation {
    /// No next root key is configured: nothing done.
    NotConfigured,
    /// The store is already sealed under the next root key.
    AlreadyCurrent { root_generation: u32 },
    /// Every row re-sealed.
    Rewrapped { rows: u64, root_generation: u32 },
}

impl From<KeyStoreError> for EncryptorError {
    fn from(e: KeyStoreError) -> Self {
        match e {
            KeyStoreError::Db(d) if d.is_unavailable() => {
                EncryptorError::Unavailable(d.to_string())
            }
            e @ KeyStoreError::NoVersion { .. } => EncryptorError::NoVersion(e.to_string()),
            other => EncryptorError::Internal(other.to_string()),
        }
    }
}

/// `casd_encryptor_key_version{kind}` (pmk, glk) and
/// `casd_encryptor_group_keys`, from the key metadata every 10 s (no
/// sealed column read). For the process running the Encryptor role.
pub fn watch_keys(shared: &crate::app::Shared) {
    let m = &shared.metrics;
    if !m.is_on() {
        return;
    }
    let version = |k: &str| {
        m.gauge(
            "casd_encryptor_key_version",
            "Version of the key family sealed with now.",
            &[("kind", k.into())],
        )
    };
    let (pmk, glk) = (version("pmk"), version("glk"));
    let groups = m.gauge(
        "casd_encryptor_group_keys",
        "Groups with a group key in use.",
        &[],
    );
    let db = shared.db.clone();
    crate::metrics::every(KEY_METRICS_EVERY, shared.shutdown.clone(), move || {
        let (db, pmk, glk, groups) = (db.clone(), pmk.clone(), glk.clone(), groups.clone());
        async move {
            let Ok(mut c) = db.conn().await else { return };
            let now = crate::metrics::unix_now() as u32;
            for (g, kind) in [(&pmk, KeyKind::Pmk), (&glk, KeyKind::Global)] {
                if let Ok(Some(meta)) = crate::keystore::current_meta(&mut c, kind, now).await {
                    g.set(f64::from(meta.version));
                }
            }
            if let Ok(n) = crate::keystore::group_key_count(&mut c, now).await {
                groups.set(n as f64);
            }
        }
    });
}

const KEY_METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The in-process Encryptor.
#[derive(Clone, Debug)]
pub struct LocalEncryptor {
    /// Swapped (never mutated) by a root rotation.
    keys: Arc<std::sync::RwLock<KeyStore>>,
    /// Held for reading while a key is created, for writing while the root
    /// is rotated: no row is sealed under a root that is being replaced.
    root_gate: Arc<tokio::sync::RwLock<()>>,
    /// `keys.next_root_key_file`: the root key a rotation moves to.
    next_root_file: Option<std::path::PathBuf>,
    /// `keys.transport_key_file`: the key personalization exports are
    /// wrapped under (none: exports refused).
    transport_key: Option<Arc<Key128>>,
    max_section_bytes: usize,
    seals: SealMetrics,
}

/// `casd_encryptor_seals_total{addressing}` and
/// `casd_encryptor_seal_errors_total` (no-ops until
/// [`LocalEncryptor::with_metrics`]).
#[derive(Clone, Debug)]
struct SealMetrics {
    /// unique, group, global.
    by_addressing: [metrics::Counter; 3],
    errors: metrics::Counter,
}

impl SealMetrics {
    fn new(m: &crate::metrics::Metrics) -> SealMetrics {
        let seals = |a: &str| {
            m.counter(
                "casd_encryptor_seals_total",
                "EMMs sealed by the Encryptor, by addressing.",
                &[("addressing", a.into())],
            )
        };
        SealMetrics {
            by_addressing: ["unique", "group", "global"].map(seals),
            errors: m.counter(
                "casd_encryptor_seal_errors_total",
                "Seal jobs the Encryptor could not seal (unknown key, too large, invalid, store error).",
                &[],
            ),
        }
    }

    fn count(&self, address: usize, ok: bool) {
        match ok {
            true => self.by_addressing[address].increment(1),
            false => self.errors.increment(1),
        }
    }
}

impl LocalEncryptor {
    pub fn new(keys: KeyStore, max_section_bytes: usize) -> Self {
        LocalEncryptor {
            keys: Arc::new(std::sync::RwLock::new(keys)),
            root_gate: Default::default(),
            next_root_file: None,
            transport_key: None,
            max_section_bytes,
            seals: SealMetrics::new(&crate::metrics::Metrics::off()),
        }
    }

    /// Counting seals in `m`.
    pub fn with_metrics(mut self, m: &crate::metrics::Metrics) -> Self {
        self.seals = SealMetrics::new(m);
        self
    }

    /// With the root key file a root rotation moves to.
    pub fn with_next_root_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.next_root_file = path;
        self
    }

    /// With the vendor transport key personalization exports are wrapped under.
    pub fn with_transport_key(mut self, key: Option<Key128>) -> Self {
        self.transport_key = key.map(Arc::new);
        self
    }

    /// The key store in use (a cheap clone; a root rotation replaces it).
    pub fn keystore(&self) -> KeyStore {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The address root of `job` and the version used.
    async fn address_root(
        &self,
        job: &SealJob,
        current: &mut HashMap<KeyKind, u32>,
    ) -> Result<Result<(Key128, u32), SealJobError>, EncryptorError> {
        let kind = match &job.address {
            Address::Unique { .. } => KeyKind::Pmk,
            Address::Group { group_id, .. } => KeyKind::Group(*group_id),
            Address::Global => KeyKind::Global,
        };
        let keys = self.keystore();
        let version = match job.key_version {
            Some(v) => v,
            None => match current.get(&kind) {
                Some(v) => *v,
                None => {
                    let v = match keys.current(kind).await {
                        Ok(m) => m.version,
                        // This job cannot be sealed; the others may.
                        Err(e @ KeyStoreError::NoVersion { .. }) => {
                            return Ok(Err(SealJobError::UnknownKey(e.to_string())))
                        }
                        Err(e) => return Err(e.into()),
                    };
                    current.insert(kind, v);
                    v
                }
            },
        };
        let key = match keys.key(kind, version).await {
            Ok(k) => k,
            Err(KeyStoreError::UnknownVersion { kind, version }) => {
                return Ok(Err(SealJobError::UnknownKey(format!(
                    "{kind} version {version} does not exist"
                ))))
            }
            Err(e) => return Err(e.into()),
        };
        let root = match &job.address {
            Address::Unique { device_id } => crypto::derive_duk(&key, device_id.get()),
            _ => (*key).clone(),
        };
        Ok(Ok((root, version)))
    }

    async fn seal_one(
        &self,
        job: SealJob,
        current: &mut HashMap<KeyKind, u32>,
    ) -> Result<Result<Sealed, SealJobError>, EncryptorError> {
        let (root, key_version) = match self.address_root(&job, current).await? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        // Fetch the keys that key-delivery commands carry, then resolve
        // synchronously.
        let mut delivered = Vec::new();
        for spec in &job.commands {
            if let Some(r) = spec.key_ref() {
                let (kind, version) = match r {
                    KeyRef::Group {
                        group_id,
                        key_version,
                    } => (KeyKind::Group(group_id), key_version),
                    KeyRef::Global { key_version } => (KeyKind::Global, key_version),
                };
                match self.keystore().key(kind, version).await {
                    Ok(k) => delivered.push((r, k)),
                    Err(KeyStoreError::UnknownVersion { kind, version }) => {
                        return Ok(Err(SealJobError::UnknownKey(format!(
                            "{kind} version {version} does not exist"
                        ))))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let commands = emm::resolve_commands(&job.commands, |r| {
            delivered
                .iter()
                .find(|(k, _)| *k == r)
                .map(|(_, key)| (**key).clone())
                .ok_or(())
        });
        let Ok(commands) = commands else {
            return Ok(Err(SealJobError::Invalid("key lookup failed".into())));
        };
        let input = SealInput {
            emm_id: EmmId(job.emm_id),
            issued_at: job.issued_at,
            not_after: job.not_after,
            address: job.address,
            key_version,
            commands,
        };
        let sealed = emm::seal_emm(
            &input,
            &root,
            self.max_section_bytes,
            &mut rand::thread_rng(),
        );
        Ok(match sealed {
            Ok(section) => Ok(Sealed {
                section,
                key_version,
            }),
            Err(emm::SealEmmError::Seal(e @ crypto::SealError::TooLarge { .. })) => {
                Err(SealJobError::TooLarge(e.to_string()))
            }
            Err(e) => Err(SealJobError::Invalid(e.to_string())),
        })
    }
}

impl Encryptor for LocalEncryptor {
    fn seal_batch(&self, jobs: Vec<SealJob>) -> BoxFuture<'_, Result<SealResults, EncryptorError>> {
        Box::pin(async move {
            if jobs.len() > MAX_BATCH {
                return Err(EncryptorError::Refused(format!(
                    "at most {MAX_BATCH} jobs per call"
                )));
            }
            let mut out = Vec::with_capacity(jobs.len());
            // "The version to use now" is looked up once per family per batch.
            let mut current = HashMap::new();
            for job in jobs {
                let address = match job.address {
                    Address::Unique { .. } => 0,
                    Address::Group { .. } => 1,
                    Address::Global => 2,
                };
                let sealed = self.seal_one(job, &mut current).await;
                self.seals.count(address, matches!(sealed, Ok(Ok(_))));
                out.push(sealed?);
            }
            Ok(out)
        })
    }

    fn current_key(&self, kind: KeyKind) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>> {
        Box::pin(async move {
            let _gate = self.root_gate.read().await;
            Ok(self.keystore().current(kind).await?)
        })
    }

    fn create_key_version(
        &self,
        kind: KeyKind,
        activates_at: u32,
    ) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>> {
        Box::pin(async move {
            if kind == KeyKind::Pmk {
                return Err(EncryptorError::Refused(
                    "PMK versions are not created by rotation".into(),
                ));
            }
            if activates_at > MAX_ACTIVATES_AT {
                return Err(EncryptorError::Refused(format!(
                    "activates_at must be at most {MAX_ACTIVATES_AT} (2038-01-19T03:14:07Z)"
                )));
            }
            let _gate = self.root_gate.read().await;
            Ok(self
                .keystore()
                .create_version_at(kind, activates_at)
                .await?)
        })
    }

    fn set_key_state(
        &self,
        kind: KeyKind,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'_, Result<(), EncryptorError>> {
        Box::pin(async move {
            Ok(self
                .keystore()
                .set_state(kind, version, state.as_str())
                .await?)
        })
    }

    fn export_duks(&self, req: ExportRequest) -> BoxFuture<'_, Result<Export, EncryptorError>> {
        Box::pin(async move {
            let ktk = self.transport_key.clone().ok_or_else(|| {
                EncryptorError::Refused("no transport key: set keys.transport_key_file".into())
            })?;
            let _gate = self.root_gate.read().await;
            let keys = self.keystore();
            let pmk_version = keys.current(KeyKind::Pmk).await?.version;
            let pmk = keys.key(KeyKind::Pmk, pmk_version).await?;
            let now = time::OffsetDateTime::now_utc();
            let record = crate::export::Record {
                exported_by: req.exported_by,
                via: req.via,
                pmk_version,
                transport_key_id: personalization::transport_key_id(&ktk),
                devices: req.devices,
            };
            // Recorded before anything leaves: an unrecorded export is none.
            let export_id = crate::export::record(keys.db(), &record, now)
                .await
                .map_err(|e| EncryptorError::Unavailable(e.to_string()))?;
            let lines = record
                .devices
                .iter()
                .map(|d| personalization::line(&ktk, d, &crypto::derive_duk(&pmk, d.get())))
                .collect();
            let header = personalization::Header {
                format: personalization::FORMAT.into(),
                wrap: personalization::WRAP.into(),
                export_id,
                created_at: now
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                pmk_version,
                transport_key_id: record.transport_key_id,
                devices: record.devices.len(),
            };
            Ok(Export { header, lines })
        })
    }

    fn rotate_root(&self) -> BoxFuture<'_, Result<RootRotation, EncryptorError>> {
        Box::pin(async move {
            use hw::key_source::{FileKeySource, KeySource};
            let Some(path) = &self.next_root_file else {
                return Ok(RootRotation::NotConfigured);
            };
            let source = FileKeySource::load(path)
                .map_err(|e| EncryptorError::Internal(format!("{e} (keys.next_root_key_file)")))?;
            let new_root = Key128::from_bytes(
                *source
                    .root_key()
                    .map_err(|e| EncryptorError::Internal(e.to_string()))?,
            );
            let _gate = self.root_gate.write().await;
            let old = self.keystore();
            // Already sealed under the new root (rotated before, perhaps by
            // another process): use it. `open` refuses a root that opens none
            // of the rows, and a rewrap is all or nothing.
            if let Ok(ks) = KeyStore::open(old.db().clone(), new_root.clone()).await {
                let root_generation = ks.root_version();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = ks;
                return Ok(RootRotation::AlreadyCurrent { root_generation });
            }
            let generation = old.root_version() + 1;
            let rows = old.rewrap(&new_root, generation).await?;
            let new = KeyStore::new(old.db().clone(), new_root, generation);
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = new;
            Ok(RootRotation::Rewrapped {
                rows,
                root_generation: generation,
            })
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealRequest {
    pub jobs: Vec<SealJob>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum SealResultJson {
    Ok(Sealed),
    Err { error: SealJobError },
}

#[derive(Serialize, Deserialize)]
pub struct SealResponse {
    pub results: Vec<SealResultJson>,
}

impl From<EncryptorError> for ApiError {
    fn from(e: EncryptorError) -> Self {
        match e {
            EncryptorError::Unavailable(_) => ApiError::unavailable("key store"),
            EncryptorError::Refused(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m)
            }
            EncryptorError::NoVersion(m) => {
                ApiError::new(StatusCode::CONFLICT, "no_key_version", m)
            }
            EncryptorError::Internal(m) => {
                tracing::error!("encryptor: {m}");
                ApiError::internal()
            }
        }
    }
}

/// Parses a JSON body into `T`, mapping serde's complaint to a 400 that
/// names the field.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            e.into_inner().to_string(),
        )
        .field(path)
    })
}

/// The Encryptor's REST routes.
pub fn routes(enc: Arc<dyn Encryptor>) -> Router {
    Router::new()
        .route("/encryptor/v1/seal", post(seal_handler))
        .route("/encryptor/v1/current-key", post(current_key_handler))
        .route("/encryptor/v1/create-key", post(create_key_handler))
        .route("/encryptor/v1/key-state", post(key_state_handler))
        .route("/encryptor/v1/rotate-root", post(rotate_root_handler))
        .route("/encryptor/v1/export", post(export_handler))
        .with_state(enc)
}

/// `POST /encryptor/v1/create-key` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub key: KeyKind,
    /// Unix seconds; 0 = now.
    #[serde(default)]
    pub activates_at: u32,
}

/// `POST /encryptor/v1/key-state` body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStateRequest {
    pub key: KeyKind,
    pub version: u32,
    pub state: KeyState,
}

async fn create_key_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<KeyMeta>, ApiError> {
    caller.require(Scope::Encrypt)?;
    let req: CreateKeyRequest = parse_json(&body)?;
    Ok(Json(
        enc.create_key_version(req.key, req.activates_at).await?,
    ))
}

async fn key_state_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Encrypt)?;
    let req: KeyStateRequest = parse_json(&body)?;
    enc.set_key_state(req.key, req.version, req.state).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_root_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
) -> Result<Json<RootRotation>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(enc.rotate_root().await?))
}

/// `POST /encryptor/v1/export` body: the devices by id (a list the
/// OpenAPI schema can state whole; the CLI also takes ranges).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    pub device_ids: Vec<emm::DeviceId>,
}

/// Most devices one API export may name.
pub const MAX_API_EXPORT: usize = 10_000;

async fn export_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<Export>, ApiError> {
    caller.require(Scope::Admin)?;
    let req: ExportBody = parse_json(&body)?;
    let devices = match req.device_ids.len() {
        1..=MAX_API_EXPORT => crate::export::DeviceSet::of(&req.device_ids),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("1 to {MAX_API_EXPORT} device ids per call"),
            )
            .field("device_ids"))
        }
    };
    let req = ExportRequest {
        devices,
        exported_by: caller.client_id,
        via: crate::export::Via::Api,
    };
    Ok(Json(enc.export_duks(req).await?))
}

async fn seal_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<SealResponse>, ApiError> {
    caller.require(Scope::Encrypt)?;
    let req: SealRequest = parse_json(&body)?;
    if req.jobs.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("at most {MAX_BATCH} jobs per call"),
        )
        .field("jobs"));
    }
    let results = enc.seal_batch(req.jobs).await?;
    Ok(Json(SealResponse {
        results: results
            .into_iter()
            .map(|r| match r {
                Ok(s) => SealResultJson::Ok(s),
                Err(error) => SealResultJson::Err { error },
            })
            .collect(),
    }))
}

async fn current_key_handler(
    State(enc): State<Arc<dyn Encryptor>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<KeyMeta>, ApiError> {
    caller.require(Scope::Encrypt)?;
    let kind: KeyKind = parse_json(&body)?;
    Ok(Json(enc.current_key(kind).await?))
}

/// Hex encoding for byte fields in JSON.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// The Encryptor in another process, over its REST endpoint. A peer that is
/// down (connection refused, 5xx, 429, token endpoint unreachable) is
/// `Unavailable`: the EMMG leaves its work queued in MySQL and retries with
/// back-off. A 401 drops the cached token and is retried once.
pub struct RemoteEncryptor {
    base: String,
    tokens: crate::auth::client::TokenClient,
}

impl std::fmt::Debug for RemoteEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEncryptor")
            .field("base", &self.base)
            .finish()
    }
}

impl RemoteEncryptor {
    pub fn new(base: &str, tokens: crate::auth::client::TokenClient) -> Self {
        RemoteEncryptor {
            base: base.trim_end_matches('/').to_owned(),
            tokens,
        }
    }

    async fn call<T: serde::de::DeserializeOwned + Send>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, EncryptorError> {
        let url = format!("{}{path}", self.base);
        for attempt in 0..2 {
            let req = self
                .tokens
                .http()
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            let req = self.tokens.authorize(req).await.map_err(|e| {
                if e.is_transient() {
                    EncryptorError::Unavailable(e.to_string())
                } else {
                    EncryptorError::Internal(e.to_string())
                }
            })?;
            let resp = req
                .send()
                .await
                .map_err(|e| EncryptorError::Unavailable(format!("{url}: {e}")))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.tokens.invalidate().await;
                continue;
            }
            if status.is_success() {
                return resp.json::<T>().await.map_err(|e| {
                    EncryptorError::Unavailable(format!("{url}: reply cut or malformed: {e}"))
                });
            }
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| status.to_string());
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    EncryptorError::Unavailable(format!("{url}: {status}: {message}"))
                } else {
                    EncryptorError::Refused(format!("{url}: {status}: {message}"))
                },
            );
        }
        Err(EncryptorError::Internal(format!(
            "{url}: token refused twice"
        )))
    }
}

impl Encryptor for RemoteEncryptor {
    fn seal_batch(&self, jobs: Vec<SealJob>) -> BoxFuture<'_, Result<SealResults, EncryptorError>> {
        Box::pin(async move {
            let n = jobs.len();
            let body = serde_json::to_vec(&SealRequest { jobs })
                .map_err(|e| EncryptorError::Internal(e.to_string()))?;
            let resp: SealResponse = self.call("/encryptor/v1/seal", body).await?;
            if resp.results.len() != n {
                return Err(EncryptorError::Internal(format!(
                    "encryptor answered {} results for {n} jobs",
                    resp.results.len()
                )));
            }
            Ok(resp
                .results
                .into_iter()
                .map(|r| match r {
                    SealResultJson::Ok(s) => Ok(s),
                    SealResultJson::Err { error } => Err(error),
                })
                .collect())
        })
    }

    fn current_key(&self, kind: KeyKind) -> BoxFuture<'_, Result<KeyMeta, EncryptorError>> {
        Box::pin(async move {
            let body =
                serde_json::to_vec(&kind).map_err(|e| EncryptorError::Internal(e.to_string()))?;
            self.call("/encryptor/v1/current-key", body).await
        })
    }
}
