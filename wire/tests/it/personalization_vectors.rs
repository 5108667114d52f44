//! Published test vectors `wire/tests/vectors/personalization-v1.json`
//! (docs/format.md §9): a personalization file for three devices under a
//! fixed PMK and transport key, with each DUK and wrapped value.
//!
//! - `rfc3394_known_answer`: the key wrap primitive gives RFC 3394 §4.1's
//!   published answer (the crate is checked against the RFC, not itself).
//! - `vectors_file_verifies`: from the file's own hex fields, each DUK is
//!   the §2 derivation, each line unwraps to it under the transport key,
//!   and each wrapped value is byte-exact.
//! - `vectors_file_is_what_the_generator_makes`: the file equals the
//!   generator's output. To rewrite it after a deliberate change:
//!   `CASD_WRITE_VECTORS=1 cargo test -p casd-wire --test it personalization_vectors::`.

use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::emm::DeviceId;
use casd_wire::personalization::{self as p, Header, Line};
use serde_json::{json, Value};
use std::path::PathBuf;

const PMK: [u8; 16] = *b"casd-test-pmk-v1";
const KTK: [u8; 16] = *b"vendor-ktk-test1";
const DEVICES: [u64; 3] = [1, 20_015_998_343_868, (1 << 53) - 1];

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/personalization-v1.json")
}

fn generate() -> String {
    let (pmk, ktk) = (Key128::from_bytes(PMK), Key128::from_bytes(KTK));
    let header = Header {
        format: p::FORMAT.into(),
        wrap: p::WRAP.into(),
        export_id: 1,
        created_at: "2026-01-01T00:00:00Z".into(),
        pmk_version: 1,
        transport_key_id: p::transport_key_id(&ktk),
        devices: DEVICES.len() as u64,
    };
    let mut file = serde_json::to_string(&header).unwrap() + "\n";
    let mut vectors = Vec::new();
    for d in DEVICES {
        let id = DeviceId::new(d).unwrap();
        let duk = derive_duk(&pmk, d);
        let line = p::line(&ktk, id, &duk);
        file += &(serde_json::to_string(&line).unwrap() + "\n");
        vectors.push(json!({
            "device_id": d,
            "duk": hex::encode(duk.expose()),
            "wrapped_duk": line.wrapped_duk,
        }));
    }
    let v = json!({
        "title": "casd personalization file test vectors, format casd-personalization/1 (docs/format.md §9)",
        "conventions": [
            "All byte strings are lowercase hex; integers in byte strings are big-endian.",
            "duk = KDF(pmk, \"CAS-DUK\", u64(device_id), L=128) (docs/format.md §2).",
            "wrapped_duk = AES-128-KW(transport_key, duk || u64(device_id)) (RFC 3394, default IV a6a6a6a6a6a6a6a6).",
            "transport_key_id = KDF(transport_key, \"CAS-KEY-FINGERPRINT\", empty, L=64)."
        ],
        "generator": "wire/tests/it/personalization_vectors.rs",
        "pmk": hex::encode(PMK),
        "transport_key": hex::encode(KTK),
        "vectors": vectors,
        "file": file,
    });
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

fn maybe_write() {
    if std::env::var_os("CASD_WRITE_VECTORS").is_some() {
        std::fs::write(path(), generate()).unwrap();
    }
}

fn key(v: &Value, f: &str) -> Key128 {
    Key128::from_slice(&hex::decode(v[f].as_str().unwrap()).unwrap()).unwrap()
}

#[test]
fn rfc3394_known_answer() {
    let kek: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f")
        .unwrap()
        .try_into()
        .unwrap();
    let data = hex::decode("00112233445566778899aabbccddeeff").unwrap();
    let mut out = [0u8; 24];
    aes_kw::KekAes128::from(kek).wrap(&data, &mut out).unwrap();
    assert_eq!(
        hex::encode(out),
        "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5"
    );
}

#[test]
fn vectors_file_verifies() {
    maybe_write();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    let (pmk, ktk) = (key(&v, "pmk"), key(&v, "transport_key"));
    let file = v["file"].as_str().unwrap();
    let mut lines = file.lines();
    let header: Header = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header.format, p::FORMAT);
    assert_eq!(header.transport_key_id, p::transport_key_id(&ktk));
    let vectors = v["vectors"].as_array().unwrap();
    assert_eq!(header.devices, vectors.len() as u64);
    for (vec, text) in vectors.iter().zip(lines) {
        let line: Line = serde_json::from_str(text).unwrap();
        let d = vec["device_id"].as_u64().unwrap();
        assert_eq!(line.device_id.get(), d);
        assert_eq!(derive_duk(&pmk, d), key(vec, "duk"));
        assert_eq!(p::unwrap_duk(&ktk, &line).unwrap(), key(vec, "duk"));
        assert_eq!(line.wrapped_duk, vec["wrapped_duk"].as_str().unwrap());
    }
}

#[test]
fn vectors_file_is_what_the_generator_makes() {
    maybe_write();
    let on_disk = std::fs::read_to_string(path()).expect("personalization-v1.json exists");
    assert!(
        on_disk == generate(),
        "personalization-v1.json differs from the generator; if deliberate, rerun with CASD_WRITE_VECTORS=1"
    );
}
