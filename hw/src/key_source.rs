//! The root key's source.
//!
//! **Root key file format**: exactly 32 hexadecimal digits (the 16 key bytes,
//! upper or lower case), optionally followed by one `\n`; nothing else. The
//! file must be a regular file owned by the user running casd with no group
//! or other permission bits (`mode & 0o077 == 0`, e.g. 0600 or 0400), or
//! (a Kubernetes Secret volume with `fsGroup`) owned by root, group-owned by
//! casd's own group, readable by that group only (e.g. 0440; see
//! [`check_private_file`]); otherwise loading is refused with an error
//! naming the path and mode.
//! [`FileKeySource::create_new`] writes such a file with a fresh random key,
//! mode 0600, atomically, and never over an existing file.

use rand::rngs::OsRng;
use rand::RngCore;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

/// Length of the root key.
pub const ROOT_KEY_LEN: usize = 16;

/// Largest file we read (32 hex digits + newline, with room to report a bad length).
const MAX_FILE_LEN: u64 = 64;

/// Where the root key comes from.
pub trait KeySource: Send + Sync {
    /// The 16-byte root key, zeroized when the caller drops it.
    fn root_key(&self) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>, KeySourceError>;
    /// A description of the source for logs and errors (`file:/path`,
    /// `simulated:name`). Never derived from key bytes; the key's
    /// fingerprint is computed by the caller with its own crypto.
    fn key_id(&self) -> String;
}

/// Why the root key could not be had. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    /// An I/O error on the path.
    #[error("root key file {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Group or other may access the file.
    #[error("root key file {path} has mode {mode:04o}: group/other access is not allowed (chmod 600 {path})")]
    Permissions {
        /// Path.
        path: PathBuf,
        /// Permission bits (mode & 0o7777).
        mode: u32,
    },
    /// Owned by another user.
    #[error(
        "root key file {path} is owned by uid {owner}, not by the current user (uid {current})"
    )]
    Owner {
        /// Path.
        path: PathBuf,
        /// File owner.
        owner: u32,
        /// Effective uid of this process.
        current: u32,
    },
    /// Not a regular file.
    #[error("root key file {path} is not a regular file")]
    NotRegularFile {
        /// Path.
        path: PathBuf,
    },
    /// Content is not 32 hex digits (+ optional newline).
    #[error("root key file {path} is malformed: {reason}")]
    Format {
        /// Path.
        path: PathBuf,
        /// What is wrong (never the content).
        reason: &'static str,
    },
    /// `create_new` found a file already there.
    #[error("root key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// Path.
        path: PathBuf,
    },
}

/// The root key read from a file (see the module doc for the format and the
/// permission rules). The key is read and checked once, at [`FileKeySource::load`].
pub struct FileKeySource {
    path: PathBuf,
    key: Zeroizing<[u8; ROOT_KEY_LEN]>,
}

impl std::fmt::Debug for FileKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeySource")
            .field("path", &self.path)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeySourceError + '_ {
    move |source| KeySourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Why a secret file's owner or mode is refused ([`check_private_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateFileError {
    /// Owned by another user (and not the root-owned, own-group form).
    Owner {
        /// File owner.
        owner: u32,
        /// Effective uid of this process.
        current: u32,
    },
    /// Others may access it, or group access that is not the allowed form.
    Permissions {
        /// Permission bits (mode & 0o7777).
        mode: u32,
    },
}

/// Whether only casd can read a secret file (a key): either owned by the
/// effective user with no group or other bits (0600, 0400), or owned by
/// root, group-owned by casd's effective group, group-readable only and no
/// other bits (0440, 0400). The second form is what Kubernetes makes of a
/// Secret volume with `defaultMode: 0400` and the pod's `fsGroup`: root
/// could read the file anyway, and the group is the pod's own.
pub fn check_private_file(meta: &std::fs::Metadata) -> Result<(), PrivateFileError> {
    private_file_rule(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        ),
    )
}

/// [`check_private_file`]'s decision on (owner, group, mode) of the file
/// and (uid, gid) of the process.
fn private_file_rule(
    (owner, group, mode): (u32, u32, u32),
    (current, current_group): (u32, u32),
) -> Result<(), PrivateFileError> {
    if owner == current {
        return if mode & 0o077 == 0 {
            Ok(())
        } else {
            Err(PrivateFileError::Permissions { mode })
        };
    }
    if owner != 0 {
        return Err(PrivateFileError::Owner { owner, current });
    }
    if group == current_group && mode & 0o037 == 0 {
        Ok(())
    } else {
        Err(PrivateFileError::Permissions { mode })
    }
}

impl FileKeySource {
    /// Opens, checks (regular file, owner = current user, mode & 0o077 == 0)
    /// and parses the key file. The checks run on the opened descriptor, so
    /// the file checked is the file read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeySourceError> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.file_type().is_file() {
            return Err(KeySourceError::NotRegularFile {
                path: path.to_owned(),
            });
        }
        check_private_file(&meta).map_err(|e| match e {
            PrivateFileError::Owner { owner, current } => KeySourceError::Owner {
                path: path.to_owned(),
                owner,
                current,
            },
            PrivateFileError::Permissions { mode } => KeySourceError::Permissions {
                path: path.to_owned(),
                mode,
            },
        })?;
        let mut content = Zeroizing::new(Vec::with_capacity(MAX_FILE_LEN as usize));
        (&mut file)
            .take(MAX_FILE_LEN)
            .read_to_end(&mut content)
            .map_err(io_err(path))?;
        let key = parse_key_file(&content).map_err(|reason| KeySourceError::Format {
            path: path.to_owned(),
            reason,
        })?;
        Ok(FileKeySource {
            path: path.to_owned(),
            key,
        })
    }

    /// Writes a fresh random root key to `path` with mode 0600 and loads it.
    ///
    /// Atomic and never overwriting: the key is written to a temporary file
    /// created with O_CREAT|O_EXCL and mode 0600 in the same directory,
    /// fsynced, then hard-linked to `path` (link(2) fails if `path` exists),
    /// and the temporary name is removed; the directory is fsynced. A crash
    /// leaves either no key file or a complete one.
    pub fn create_new(path: impl AsRef<Path>) -> Result<Self, KeySourceError> {
        let path = path.as_ref();
        if path.symlink_metadata().is_ok() {
            return Err(KeySourceError::Exists {
                path: path.to_owned(),
            });
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or_else(|| KeySourceError::Format {
            path: path.to_owned(),
            reason: "path has no file name",
        })?;
        let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        OsRng.fill_bytes(&mut key[..]);
        // The file's text in a fixed buffer: a growing String would leave
        // copies of the key behind that Zeroizing never sees.
        let mut text = Zeroizing::new([b'\n'; 2 * ROOT_KEY_LEN + 1]);
        hex::encode_to_slice(&key[..], &mut text[..2 * ROOT_KEY_LEN])
            .expect("the buffer holds two digits per key byte");

        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:016x}",
            file_name.to_string_lossy(),
            std::process::id(),
            OsRng.next_u64()
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&text[..]).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            std::fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeySourceError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io_err(path)(e)
                }
            })
        })();
        // The temporary name goes whatever happened; its content is the key,
        // so overwrite-then-unlink is pointless on most filesystems: unlink.
        let _ = std::fs::remove_file(&tmp);
        result?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Self::load(path)
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl KeySource for FileKeySource {
    fn root_key(&self) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>, KeySourceError> {
        Ok(Zeroizing::new(*self.key))
    }

    fn key_id(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

fn parse_key_file(content: &[u8]) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>, &'static str> {
    let body = content.strip_suffix(b"\n").unwrap_or(content);
    if body.len() != 2 * ROOT_KEY_LEN {
        return Err("expected exactly 32 hex digits and an optional newline");
    }
    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    if hex::decode_to_slice(body, &mut key[..]).is_err() {
        key.zeroize(); // a partial key must not linger
        return Err("a character is not a hex digit");
    }
    Ok(key)
}

/// A root key held in memory, for tests and simulations.
pub struct SimulatedKeySource {
    name: String,
    key: Zeroizing<[u8; ROOT_KEY_LEN]>,
}

impl std::fmt::Debug for SimulatedKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedKeySource")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SimulatedKeySource {
    /// A source that returns `key`.
    pub fn new(name: impl Into<String>, key: [u8; ROOT_KEY_LEN]) -> Self {
        SimulatedKeySource {
            name: name.into(),
            key: Zeroizing::new(key),
        }
    }

    /// A source with a fresh random key.
    pub fn random(name: impl Into<String>) -> Self {
        let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        OsRng.fill_bytes(&mut key[..]);
        SimulatedKeySource {
            name: name.into(),
            key,
        }
    }
}

impl KeySource for SimulatedKeySource {
    fn root_key(&self) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>, KeySourceError> {
        Ok(Zeroizing::new(*self.key))
    }

    fn key_id(&self) -> String {
        format!("simulated:{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &Path, content: &str, mode: u32) {
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f";

    #[test]
    fn loads_0600_and_0400() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        for mode in [0o600, 0o400] {
            write(&p, &format!("{KEY_HEX}\n"), mode);
            let s = FileKeySource::load(&p).unwrap();
            assert_eq!(*s.root_key().unwrap(), core::array::from_fn(|i| i as u8));
            assert_eq!(s.key_id(), format!("file:{}", p.display()));
            std::fs::remove_file(&p).unwrap();
        }
        write(&p, &KEY_HEX.to_uppercase(), 0o600);
        assert!(FileKeySource::load(&p).is_ok());
    }

    #[test]
    fn refuses_group_or_other_access() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610] {
            write(&p, KEY_HEX, mode);
            let e = FileKeySource::load(&p).unwrap_err();
            assert!(
                matches!(&e, KeySourceError::Permissions { mode: m, .. } if *m == mode),
                "{e}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(!msg.contains(KEY_HEX));
        }
    }

    #[test]
    fn kubernetes_secret_volume_form() {
        let casd = (10001, 10001);
        // Own file, owner-only: the usual form.
        assert_eq!(private_file_rule((10001, 10001, 0o400), casd), Ok(()));
        // Root-owned, casd's group, group-readable (defaultMode 0400 + fsGroup).
        assert_eq!(private_file_rule((0, 10001, 0o440), casd), Ok(()));
        assert_eq!(private_file_rule((0, 10001, 0o400), casd), Ok(()));
        // Another group, group-writable, or others: refused.
        for (g, mode) in [(0, 0o440), (10001, 0o460), (10001, 0o444), (10001, 0o441)] {
            assert_eq!(
                private_file_rule((0, g, mode), casd),
                Err(PrivateFileError::Permissions { mode })
            );
        }
        // Own file with group bits, another non-root owner: refused.
        assert!(private_file_rule((10001, 10001, 0o440), casd).is_err());
        assert_eq!(
            private_file_rule((10002, 10001, 0o400), casd),
            Err(PrivateFileError::Owner {
                owner: 10002,
                current: 10001
            })
        );
    }

    #[test]
    fn refuses_other_owner() {
        // Only meaningful as root: chown the file to another user.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        write(&p, KEY_HEX, 0o600);
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        assert!(matches!(
            FileKeySource::load(&p),
            Err(KeySourceError::Owner { owner: 65534, .. })
        ));
    }

    #[test]
    fn refuses_bad_content_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        for bad in [
            "",
            "00",
            "000102030405060708090a0b0c0d0e0fff",
            "000102030405060708090a0b0c0d0e0g",
            "000102030405060708090a0b0c0d0e0f\n\n",
            " 000102030405060708090a0b0c0d0e0f",
        ] {
            write(&p, bad, 0o600);
            let e = FileKeySource::load(&p).unwrap_err();
            assert!(matches!(e, KeySourceError::Format { .. }), "{bad:?}: {e}");
            if !bad.is_empty() {
                assert!(!e.to_string().contains(bad.trim()));
            }
        }
        assert!(matches!(
            FileKeySource::load(dir.path()),
            Err(KeySourceError::NotRegularFile { .. })
        ));
        assert!(matches!(
            FileKeySource::load(dir.path().join("missing")),
            Err(KeySourceError::Io { .. })
        ));
    }

    #[test]
    fn create_new_writes_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        let s = FileKeySource::create_new(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.len(), 33);
        assert!(text.ends_with('\n'));
        let again = FileKeySource::load(&p).unwrap();
        assert_eq!(*again.root_key().unwrap(), *s.root_key().unwrap());
        assert!(matches!(
            FileKeySource::create_new(&p),
            Err(KeySourceError::Exists { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Two fresh keys differ.
        let s2 = FileKeySource::create_new(dir.path().join("other.key")).unwrap();
        assert_ne!(*s2.root_key().unwrap(), *s.root_key().unwrap());
    }

    #[test]
    fn debug_is_redacted() {
        let s = SimulatedKeySource::new("t", [0xAB; 16]);
        let d = format!("{s:?}");
        assert!(d.contains("<redacted>") && !d.to_lowercase().contains("abab"));
        assert_eq!(*s.root_key().unwrap(), [0xAB; 16]);
        assert_eq!(s.key_id(), "simulated:t");
        let r1 = SimulatedKeySource::random("a");
        let r2 = SimulatedKeySource::random("b");
        assert_ne!(*r1.root_key().unwrap(), *r2.root_key().unwrap());
        let dyn_source: Box<dyn KeySource> = Box::new(r1);
        assert_eq!(dyn_source.key_id(), "simulated:a");
    }
}
