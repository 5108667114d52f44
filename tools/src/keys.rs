//! The keys the probe opens EMMs with: PMKs (every device's DUK derives
//! from them), single DUKs, group keys and global keys, from the command
//! line or a JSON file, plus keys learned from GROUP_KEY / GLOBAL_KEY
//! commands in unique EMMs that opened (exactly what a receiver does).
//!
//! Key bytes are held in `casd_wire::crypto::Key128` (zeroized on drop, no
//! printing Debug) and never appear in an error message.

use std::collections::HashMap;
use std::path::Path;

use casd_wire::crypto::{derive_duk, Key128};
use serde::Deserialize;

/// A bad key argument or key file. Messages name the option or entry,
/// never the key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: {why}")]
    Bad { what: String, why: String },
    #[error("key file {path}: {why}")]
    File { path: String, why: String },
}

fn bad(what: impl Into<String>, why: impl Into<String>) -> KeyError {
    KeyError::Bad {
        what: what.into(),
        why: why.into(),
    }
}

/// 32 hex digits (spaces, ':' and a `0x` prefix tolerated) to a key.
pub fn parse_key_hex(what: &str, s: &str) -> Result<Key128, KeyError> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    let clean: String = s.chars().filter(|c| !matches!(c, ' ' | ':')).collect();
    let bytes = hex::decode(&clean)
        .map_err(|_| bad(what, "key is not hexadecimal (expected 32 hex digits)"))?;
    Key128::from_slice(&bytes).map_err(|_| {
        bad(
            what,
            format!("key is {} bytes, expected 16 (32 hex digits)", bytes.len()),
        )
    })
}

fn parse_num<T: std::str::FromStr>(what: &str, field: &str, s: &str) -> Result<T, KeyError> {
    s.trim()
        .parse()
        .map_err(|_| bad(what, format!("{field} {:?} is not a number", s.trim())))
}

/// Where the key that opened an EMM came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Duk,
    Pmk,
    Gk,
    Glk,
    LearnedGk,
    LearnedGlk,
}

impl KeySource {
    pub fn name(self) -> &'static str {
        match self {
            KeySource::Duk => "duk",
            KeySource::Pmk => "pmk",
            KeySource::Gk => "gk",
            KeySource::Glk => "glk",
            KeySource::LearnedGk => "learned_gk",
            KeySource::LearnedGlk => "learned_glk",
        }
    }
}

/// Every key the probe knows.
#[derive(Default, Clone)]
pub struct KeySet {
    /// PMK by version; `None` = used for any version without its own entry.
    pmk: HashMap<Option<u32>, Key128>,
    duk: HashMap<u64, Key128>,
    gk: HashMap<(u32, u32), (Key128, bool)>,
    glk: HashMap<u32, (Key128, bool)>,
    derived: HashMap<(u64, u32), Key128>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("pmk", &self.pmk.len())
            .field("duk", &self.duk.len())
            .field("gk", &self.gk.len())
            .field("glk", &self.glk.len())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    pmk: Vec<VersionKey>,
    #[serde(default)]
    duk: Vec<DukEntry>,
    #[serde(default)]
    gk: Vec<GkEntry>,
    #[serde(default)]
    glk: Vec<VersionKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionKey {
    #[serde(default)]
    version: Option<u32>,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DukEntry {
    device_id: u64,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GkEntry {
    group_id: u32,
    version: u32,
    key: String,
}

impl KeySet {
    pub fn is_empty(&self) -> bool {
        self.pmk.is_empty() && self.duk.is_empty() && self.gk.is_empty() && self.glk.is_empty()
    }

    pub fn add_pmk(&mut self, version: Option<u32>, key: Key128) {
        self.pmk.insert(version, key);
        self.derived.clear();
    }
    pub fn add_duk(&mut self, device_id: u64, key: Key128) {
        self.duk.insert(device_id, key);
    }
    pub fn add_gk(&mut self, group_id: u32, version: u32, key: Key128) {
        self.gk.insert((group_id, version), (key, false));
    }
    pub fn add_glk(&mut self, version: u32, key: Key128) {
        self.glk.insert(version, (key, false));
    }

    /// `--pmk HEX` or `--pmk VERSION=HEX`.
    pub fn parse_pmk_arg(&mut self, arg: &str) -> Result<(), KeyError> {
        let (v, k) = match arg.split_once('=') {
            Some((v, k)) => (Some(parse_num("--pmk", "version", v)?), k),
            None => (None, arg),
        };
        let what = match v {
            Some(v) => format!("--pmk {v}=…"),
            None => "--pmk".to_owned(),
        };
        self.add_pmk(v, parse_key_hex(&what, k)?);
        Ok(())
    }

    /// `--duk DEVICE_ID=HEX`.
    pub fn parse_duk_arg(&mut self, arg: &str) -> Result<(), KeyError> {
        let (d, k) = arg
            .split_once('=')
            .ok_or_else(|| bad("--duk", "expected DEVICE_ID=HEX"))?;
        let d: u64 = parse_num("--duk", "device_id", d)?;
        self.add_duk(d, parse_key_hex(&format!("--duk {d}=…"), k)?);
        Ok(())
    }

    /// `--gk GROUP:VERSION=HEX`.
    pub fn parse_gk_arg(&mut self, arg: &str) -> Result<(), KeyError> {
        let (gv, k) = arg
            .split_once('=')
            .ok_or_else(|| bad("--gk", "expected GROUP:VERSION=HEX"))?;
        let (g, v) = gv
            .split_once(':')
            .ok_or_else(|| bad("--gk", "expected GROUP:VERSION=HEX"))?;
        let g: u32 = parse_num("--gk", "group", g)?;
        let v: u32 = parse_num("--gk", "version", v)?;
        self.add_gk(g, v, parse_key_hex(&format!("--gk {g}:{v}=…"), k)?);
        Ok(())
    }

    /// `--glk VERSION=HEX`.
    pub fn parse_glk_arg(&mut self, arg: &str) -> Result<(), KeyError> {
        let (v, k) = arg
            .split_once('=')
            .ok_or_else(|| bad("--glk", "expected VERSION=HEX"))?;
        let v: u32 = parse_num("--glk", "version", v)?;
        self.add_glk(v, parse_key_hex(&format!("--glk {v}=…"), k)?);
        Ok(())
    }

    /// Adds the keys of a JSON key file (format in docs/tools.md).
    pub fn load_file(&mut self, path: &Path) -> Result<(), KeyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: p.clone(),
            why: e.to_string(),
        })?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(vectors) = v.get("vectors").and_then(|x| x.as_array()) {
                return self.load_vectors(&p, vectors);
            }
        }
        let f: KeyFile = serde_json::from_str(&text).map_err(|e| KeyError::File {
            path: p.clone(),
            // serde_json's message names the position and field, not the value.
            why: format!("not a key file: {e}"),
        })?;
        let ctx = |what: String| format!("key file {p}: {what}");
        for (i, e) in f.pmk.iter().enumerate() {
            self.add_pmk(e.version, parse_key_hex(&ctx(format!("pmk[{i}]")), &e.key)?);
        }
        for (i, e) in f.duk.iter().enumerate() {
            self.add_duk(
                e.device_id,
                parse_key_hex(&ctx(format!("duk[{i}]")), &e.key)?,
            );
        }
        for (i, e) in f.gk.iter().enumerate() {
            self.add_gk(
                e.group_id,
                e.version,
                parse_key_hex(&ctx(format!("gk[{i}]")), &e.key)?,
            );
        }
        for (i, e) in f.glk.iter().enumerate() {
            let v = e
                .version
                .ok_or_else(|| bad(ctx(format!("glk[{i}]")), "version is required"))?;
            self.add_glk(v, parse_key_hex(&ctx(format!("glk[{i}]")), &e.key)?);
        }
        Ok(())
    }

    /// The keys of a test-vector file (`wire/tests/vectors/emm-v1.json`): each
    /// vector's `keys` object may hold `pmk`+`pmk_version`,
    /// `duk`+`device_id`, `gk`+`gk_version`+`group_id`, `glk`+`glk_version`
    /// (other entries, such as the at-rest root key, are ignored).
    fn load_vectors(&mut self, p: &str, vectors: &[serde_json::Value]) -> Result<(), KeyError> {
        let num = |k: &serde_json::Value, f: &str| k.get(f).and_then(|x| x.as_u64());
        for (i, v) in vectors.iter().enumerate() {
            let Some(k) = v.get("keys") else { continue };
            let what = |f: &str| format!("key file {p}: vectors[{i}].keys.{f}");
            let hexkey = |f: &str| -> Result<Option<Key128>, KeyError> {
                match k.get(f).and_then(|x| x.as_str()) {
                    Some(h) => parse_key_hex(&what(f), h).map(Some),
                    None => Ok(None),
                }
            };
            let u32_of = |f: &str| -> Result<u32, KeyError> {
                num(k, f)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(what(f), "missing or not a u32"))
            };
            if let Some(key) = hexkey("pmk")? {
                self.add_pmk(Some(u32_of("pmk_version")?), key);
            }
            if let Some(key) = hexkey("duk")? {
                let d = num(k, "device_id").ok_or_else(|| bad(what("device_id"), "missing"))?;
                self.add_duk(d, key);
            }
            if let Some(key) = hexkey("gk")? {
                self.add_gk(u32_of("group_id")?, u32_of("gk_version")?, key);
            }
            if let Some(key) = hexkey("glk")? {
                self.add_glk(u32_of("glk_version")?, key);
            }
        }
        Ok(())
    }

    /// The DUK of `device_id` for an EMM sealed under PMK `version`.
    pub fn duk(&mut self, device_id: u64, version: u32) -> Option<(Key128, KeySource)> {
        if let Some(k) = self.duk.get(&device_id) {
            return Some((k.clone(), KeySource::Duk));
        }
        if let Some(k) = self.derived.get(&(device_id, version)) {
            return Some((k.clone(), KeySource::Pmk));
        }
        let pmk = self
            .pmk
            .get(&Some(version))
            .or_else(|| self.pmk.get(&None))?;
        let duk = derive_duk(pmk, device_id);
        if self.derived.len() > 100_000 {
            self.derived.clear(); // a bound, not a cache policy
        }
        self.derived.insert((device_id, version), duk.clone());
        Some((duk, KeySource::Pmk))
    }

    pub fn gk(&self, group_id: u32, version: u32) -> Option<(Key128, KeySource)> {
        self.gk.get(&(group_id, version)).map(|(k, learned)| {
            let src = if *learned {
                KeySource::LearnedGk
            } else {
                KeySource::Gk
            };
            (k.clone(), src)
        })
    }

    pub fn glk(&self, version: u32) -> Option<(Key128, KeySource)> {
        self.glk.get(&version).map(|(k, learned)| {
            let src = if *learned {
                KeySource::LearnedGlk
            } else {
                KeySource::Glk
            };
            (k.clone(), src)
        })
    }

    /// Remembers a GK delivered on air; true if it was new.
    pub fn learn_gk(&mut self, group_id: u32, version: u32, key: &Key128) -> bool {
        if self.gk.contains_key(&(group_id, version)) {
            return false;
        }
        self.gk.insert((group_id, version), (key.clone(), true));
        true
    }

    /// Remembers a GLK delivered on air; true if it was new.
    pub fn learn_glk(&mut self, version: u32, key: &Key128) -> bool {
        if self.glk.contains_key(&version) {
            return false;
        }
        self.glk.insert(version, (key.clone(), true));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "000102030405060708090a0b0c0d0e0f";

    #[test]
    fn arguments_parse_and_errors_never_echo_the_key() {
        let mut ks = KeySet::default();
        ks.parse_pmk_arg(K).unwrap();
        ks.parse_pmk_arg(&format!("2={K}")).unwrap();
        ks.parse_duk_arg(&format!("77={K}")).unwrap();
        ks.parse_gk_arg(&format!("3:1={K}")).unwrap();
        ks.parse_glk_arg(&format!("1={K}")).unwrap();
        assert!(ks.gk(3, 1).is_some() && ks.glk(1).is_some() && ks.gk(3, 2).is_none());
        assert_eq!(ks.duk(77, 1).unwrap().1, KeySource::Duk);
        assert_eq!(ks.duk(78, 9).unwrap().1, KeySource::Pmk);
        let secret = "deadbeefdeadbeefdeadbeefdeadbe";
        for e in [
            ks.parse_gk_arg(&format!("3:1={secret}")).unwrap_err(),
            ks.parse_gk_arg(&format!("3={secret}")).unwrap_err(),
            ks.parse_duk_arg(&format!("x={secret}zz")).unwrap_err(),
            ks.parse_pmk_arg(&format!("{secret}zz")).unwrap_err(),
        ] {
            let m = e.to_string();
            assert!(!m.contains("deadbeef"), "{m}");
        }
        assert!(ks
            .parse_glk_arg(&format!("1={secret}"))
            .unwrap_err()
            .to_string()
            .contains("15 bytes"));
    }
}
