//! Token signing keys: the private key of an issuing process lives in a
//! PKCS#8 PEM file readable only by its owner (`auth.signing_key_file`);
//! its public key is published in `jwt_keys`, from which every role
//! instance builds its verification key set.
//!
//! Rotation ([`rotate_signing_key`]) publishes the new public key first,
//! then replaces the file (atomic rename), then gives the previous key a
//! `retires_at` one token lifetime (+ leeway) ahead: tokens it signed keep
//! verifying until they expire anyway, and none outlives it. An issuing
//! process notices the new file at its next token request.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mysql_async::prelude::*;

use super::token::SigningKey;
use crate::db::{Db, DbError};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("token signing key file {path} does not exist (create it with `casd auth init-key`)")]
    Missing { path: PathBuf },
    #[error("cannot read or write token signing key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "token signing key file {path} is accessible by others (mode {mode:04o}); `chmod 600` it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("token signing key file {path} is not owned by the user casd runs as")]
    Owner { path: PathBuf },
    #[error("token signing key file {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("token signing key file {path} already exists")]
    Exists { path: PathBuf },
    #[error(transparent)]
    Db(#[from] DbError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeyError::Missing {
                path: path.to_owned(),
            }
        } else {
            KeyError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Reads the key file, refusing one that others may read or that another
/// user owns.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    check_private(path, &meta)?;
    let pem = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    SigningKey::from_pkcs8_pem(&pem).map_err(|message| KeyError::Format {
        path: path.to_owned(),
        message,
    })
}

/// The root key file's rule ([`hw::key_source::check_private_file`]).
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyError> {
    use hw::key_source::{check_private_file, PrivateFileError};
    check_private_file(meta).map_err(|e| match e {
        PrivateFileError::Permissions { mode } => KeyError::Permissions {
            path: path.to_owned(),
            mode,
        },
        PrivateFileError::Owner { .. } => KeyError::Owner {
            path: path.to_owned(),
        },
    })
}

/// Writes `key` to `path` with mode 0600 through a temporary file in the
/// same directory: atomically replacing an existing file when `replace`,
/// otherwise failing with [`KeyError::Exists`] if one is there.
pub fn write_signing_key(path: &Path, key: &SigningKey, replace: bool) -> Result<(), KeyError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.{:08x}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u32>()
    ));
    let pem = key.to_pkcs8_pem().map_err(|message| KeyError::Format {
        path: path.to_owned(),
        message,
    })?;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(pem.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        if replace {
            std::fs::rename(&tmp, path).map_err(io_err(path))
        } else {
            // link(2) fails if the target exists: no clobbering, no race.
            std::fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io_err(path)(e)
                }
            })
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// The current signing key of an issuing process, re-read when the file
/// changes (rotation by the CLI while the process runs).
pub struct SignerSource {
    path: PathBuf,
    cached: Mutex<Option<(FileStamp, Arc<SigningKey>)>>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct FileStamp {
    ino: u64,
    mtime: i64,
    mtime_ns: i64,
    len: u64,
}

impl SignerSource {
    pub fn new(path: PathBuf) -> SignerSource {
        SignerSource {
            path,
            cached: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Result<Arc<SigningKey>, KeyError> {
        let meta = std::fs::metadata(&self.path).map_err(io_err(&self.path))?;
        let stamp = FileStamp {
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
            len: meta.len(),
        };
        if let Ok(c) = self.cached.lock() {
            if let Some((s, k)) = c.as_ref() {
                if *s == stamp {
                    return Ok(k.clone());
                }
            }
        }
        let key = Arc::new(load_signing_key(&self.path)?);
        tracing::info!(kid = %key.kid(), file = %self.path.display(), "token signing key loaded");
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((stamp, key.clone()));
        }
        Ok(key)
    }
}

/// One row of `jwt_keys`.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub kid: String,
    pub alg: String,
    pub public_key: Vec<u8>,
    pub created_at: String,
    /// Unix seconds; None while the key is current.
    pub retires_at: Option<u64>,
}

const KEY_COLUMNS: &str = "kid, alg, public_key, DATE_FORMAT(created_at, '%Y-%m-%dT%H:%i:%sZ'), \
     CAST(FLOOR(UNIX_TIMESTAMP(retires_at)) AS SIGNED)";

type KeyTuple = (String, String, Vec<u8>, String, Option<i64>);

fn key_row((kid, alg, public_key, created_at, retires_at): KeyTuple) -> KeyRow {
    KeyRow {
        kid,
        alg,
        public_key,
        created_at,
        retires_at: retires_at.map(|t| t.max(0) as u64),
    }
}

/// Keys that still verify: current ones and retiring ones not yet past.
pub async fn load_public_keys(db: &Db) -> Result<Vec<KeyRow>, DbError> {
    let mut c = db.conn().await?;
    let rows: Vec<KeyTuple> = c
        .query(format!(
            "SELECT {KEY_COLUMNS} FROM jwt_keys \
             WHERE retires_at IS NULL OR retires_at > UTC_TIMESTAMP(6)"
        ))
        .await?;
    Ok(rows.into_iter().map(key_row).collect())
}

/// Every key, oldest first (for `casd auth keys`).
pub async fn list_keys(db: &Db) -> Result<Vec<KeyRow>, DbError> {
    let mut c = db.conn().await?;
    let rows: Vec<KeyTuple> = c
        .query(format!(
            "SELECT {KEY_COLUMNS} FROM jwt_keys ORDER BY created_at, kid"
        ))
        .await?;
    Ok(rows.into_iter().map(key_row).collect())
}

pub async fn get_key(db: &Db, kid: &str) -> Result<Option<KeyRow>, DbError> {
    let mut c = db.conn().await?;
    let row: Option<KeyTuple> = c
        .exec_first(
            format!("SELECT {KEY_COLUMNS} FROM jwt_keys WHERE kid = ?"),
            (kid,),
        )
        .await?;
    Ok(row.map(key_row))
}

/// Publishes `key`'s public half (no-op if already there).
pub async fn publish(db: &Db, key: &SigningKey) -> Result<(), DbError> {
    let mut c = db.conn().await?;
    c.exec_drop(
        "INSERT INTO jwt_keys (kid, alg, public_key, created_at, retires_at) \
         VALUES (?, 'EdDSA', ?, UTC_TIMESTAMP(6), NULL) \
         ON DUPLICATE KEY UPDATE kid = kid",
        (key.kid(), key.public_key().to_vec()),
    )
    .await?;
    Ok(())
}

/// Sets the key's `retires_at` to `after_s` seconds from now (0: at once),
/// unless it already retires sooner. False if no such key.
pub async fn retire_key(db: &Db, kid: &str, after_s: u64) -> Result<bool, DbError> {
    let mut c = db.conn().await?;
    c.exec_drop(
        "UPDATE jwt_keys SET retires_at = CASE \
             WHEN retires_at IS NOT NULL AND retires_at < UTC_TIMESTAMP(6) + INTERVAL ? SECOND \
             THEN retires_at ELSE UTC_TIMESTAMP(6) + INTERVAL ? SECOND END \
         WHERE kid = ?",
        (after_s, after_s, kid),
    )
    .await?;
    Ok(get_key(db, kid).await?.is_some())
}

/// Creates the key file if it does not exist and publishes its public key.
/// Returns the kid and whether a new key was made.
pub async fn init_signing_key(db: &Db, path: &Path) -> Result<(String, bool), KeyError> {
    let (key, created) = match load_signing_key(path) {
        Ok(k) => (k, false),
        Err(KeyError::Missing { .. }) => {
            let k = SigningKey::generate();
            match write_signing_key(path, &k, false) {
                Ok(()) => (k, true),
                // Someone else made it meanwhile: use theirs.
                Err(KeyError::Exists { .. }) => (load_signing_key(path)?, false),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    publish(db, &key).await?;
    Ok((key.kid().to_owned(), created))
}

/// What [`rotate_signing_key`] did.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub previous: Option<String>,
    pub current: String,
    /// Seconds until the previous key stops verifying.
    pub previous_retires_in_s: u64,
}

/// New signing key: publish, replace the file, retire the previous key
/// after `retire_after_s` (the token lifetime plus leeway).
pub async fn rotate_signing_key(
    db: &Db,
    path: &Path,
    retire_after_s: u64,
) -> Result<Rotation, KeyError> {
    let previous = match load_signing_key(path) {
        Ok(k) => Some(k.kid().to_owned()),
        Err(KeyError::Missing { .. }) => None,
        Err(e) => return Err(e),
    };
    let key = SigningKey::generate();
    publish(db, &key).await?;
    write_signing_key(path, &key, true)?;
    if let Some(p) = &previous {
        retire_key(db, p, retire_after_s).await?;
    }
    Ok(Rotation {
        previous,
        current: key.kid().to_owned(),
        previous_retires_in_s: retire_after_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "casd-keys-{}-{:08x}/{name}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    #[test]
    fn written_key_is_0600_and_loads_back() {
        let p = tmp_path("k.pem");
        let k = SigningKey::generate();
        write_signing_key(&p, &k, false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_signing_key(&p).unwrap().kid(), k.kid());
        // No clobbering without `replace`.
        assert!(matches!(
            write_signing_key(&p, &SigningKey::generate(), false),
            Err(KeyError::Exists { .. })
        ));
        let k2 = SigningKey::generate();
        write_signing_key(&p, &k2, true).unwrap();
        assert_eq!(load_signing_key(&p).unwrap().kid(), k2.kid());
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn group_readable_key_is_refused() {
        let p = tmp_path("k.pem");
        write_signing_key(&p, &SigningKey::generate(), false).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_signing_key(&p).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn signer_source_follows_the_file() {
        let p = tmp_path("k.pem");
        let a = SigningKey::generate();
        write_signing_key(&p, &a, false).unwrap();
        let src = SignerSource::new(p.clone());
        assert_eq!(src.current().unwrap().kid(), a.kid());
        let b = SigningKey::generate();
        write_signing_key(&p, &b, true).unwrap();
        assert_eq!(src.current().unwrap().kid(), b.kid());
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
