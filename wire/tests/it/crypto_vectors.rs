//! Published test vectors `wire/tests/vectors/emm-v1.json`.
//!
//! - `vectors_file_verifies`: reads only the file and checks, from its hex
//!   fields, every derivation (DUK, K_wrap, K_mac), every intermediate
//!   (wrapped_dek, ciphertext, mac, crc) and every section byte-exact, then
//!   opens each section and compares the decoded fields — what a receiver
//!   implementer would do.
//! - `vectors_file_is_what_the_generator_makes`: the file equals the output
//!   of the deterministic generator below (seeded ChaCha20). To rewrite the
//!   file after a deliberate change: `CASD_WRITE_VECTORS=1 cargo test -p
//!   casd-wire --test it crypto_vectors::`.

use casd_wire::crypto::{self, Key128, SectionKeys};
use casd_wire::emm::{
    self, Address, Command, DeviceId, EmmId, EmmPlaintext, Entitlement, SealInput,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Value};
use std::path::PathBuf;

const SEED: u64 = 0xCA5D_0001;
const ISSUED_AT: u32 = 1_767_225_600; // 2026-01-01T00:00:00Z
const NOT_AFTER: u32 = ISSUED_AT + 30 * 86_400;

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/emm-v1.json")
}

fn hx(b: &[u8]) -> String {
    hex::encode(b)
}

fn unhex(v: &Value, field: &str) -> Vec<u8> {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("field {field} missing"));
    hex::decode(s).unwrap_or_else(|_| panic!("field {field} is not hex"))
}

fn key_field(v: &Value, field: &str) -> Key128 {
    Key128::from_slice(&unhex(v, field)).expect("16-byte key field")
}

/// Splits a section into its named parts (by the spec's fixed offsets).
fn parts(section: &[u8], address_len: usize) -> Value {
    let a = 8 + address_len;
    let n = section.len();
    json!({
        "header": hx(&section[..8]),
        "address": hx(&section[8..a]),
        "format_version": hx(&section[a..a + 1]),
        "key_version": hx(&section[a + 1..a + 5]),
        "iv": hx(&section[a + 5..a + 21]),
        "wrapped_dek": hx(&section[a + 21..a + 37]),
        "ciphertext": hx(&section[a + 37..n - 20]),
        "mac": hx(&section[n - 20..n - 4]),
        "crc32": hx(&section[n - 4..]),
    })
}

struct Gen {
    rng: ChaCha20Rng,
}

impl Gen {
    fn key(&mut self) -> Key128 {
        Key128::random(&mut self.rng)
    }
    fn iv(&mut self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        self.rng.fill_bytes(&mut iv);
        iv
    }
}

fn emm_vector(
    name: &str,
    description: &str,
    root_info: Value,
    address_root: &Key128,
    input: &SealInput,
    iv: [u8; 16],
    dek: &Key128,
) -> Value {
    let table_id = input.address.table_id();
    let address = input.address.address_bytes();
    let (k_wrap, k_mac) = crypto::derive_emm_keys(address_root, table_id, &address);
    let plaintext = EmmPlaintext {
        emm_id: input.emm_id,
        issued_at: input.issued_at,
        not_after: input.not_after,
        commands: input.commands.clone(),
    }
    .encode()
    .expect("encodable");
    let section = SectionKeys::derive(address_root, table_id, &address)
        .expect("keys")
        .seal_deterministic(
            input.emm_id.table_id_extension(),
            input.key_version,
            &plaintext,
            crypto::DEFAULT_MAX_SECTION_BYTES,
            &iv,
            dek,
        )
        .expect("fits in 256 bytes");
    let mut context = vec![table_id];
    context.extend_from_slice(&address);
    json!({
        "name": name,
        "description": description,
        "keys": root_info,
        "address_root": hx(address_root.expose()),
        "table_id": format!("{table_id:02x}"),
        "address": hx(&address),
        "emm_kek_context": hx(&context),
        "k_wrap": hx(k_wrap.expose()),
        "k_mac": hx(k_mac.expose()),
        "key_version": input.key_version,
        "dek": hx(dek.expose()),
        "iv": hx(&iv),
        "emm": emm::review_json(input),
        "plaintext": hx(&plaintext),
        "section": hx(&section),
        "section_len": section.len(),
        "section_parts": parts(&section, address.len()),
    })
}

fn generate() -> Value {
    let mut g = Gen {
        rng: ChaCha20Rng::seed_from_u64(SEED),
    };
    let pmk = g.key();
    let gk = g.key();
    let glk = g.key();
    let root = g.key();
    let pmk_version = 1u32;
    let gk_version = 3u32;
    let glk_version = 2u32;
    let device_id = DeviceId::new(0x0000_1234_5678_9ABC).expect("valid");
    let group_id = 17u32;
    let slot = 5u8;
    let duk = crypto::derive_duk(&pmk, device_id.get());

    // 1. Unique: entitlement + delivery of GK_3(17) and GLK_2 (used below).
    let unique = SealInput {
        emm_id: EmmId(0x0001_0000_0002_0001),
        issued_at: ISSUED_AT,
        not_after: NOT_AFTER,
        address: Address::Unique { device_id },
        key_version: pmk_version,
        commands: vec![
            Command::EntitlementAdd(Entitlement {
                product_id: 101,
                start: ISSUED_AT,
                end: ISSUED_AT + 365 * 86_400,
            }),
            Command::GroupKey {
                group_id,
                slot,
                key_version: gk_version,
                activates_at: ISSUED_AT + 3600,
                key: gk.clone(),
            },
            Command::GlobalKey {
                key_version: glk_version,
                activates_at: ISSUED_AT + 7200,
                key: glk.clone(),
            },
        ],
    };
    let (iv, dek) = (g.iv(), g.key());
    let v_unique = emm_vector(
        "unique",
        "Unique EMM (0x82) under DUK = KDF(PMK_1, \"CAS-DUK\", device_id): ENTITLEMENT_ADD, \
         GROUP_KEY delivering the GK of the group vector, GLOBAL_KEY delivering the GLK of the global vector",
        json!({
            "pmk": hx(pmk.expose()),
            "pmk_version": pmk_version,
            "device_id": device_id.get(),
            "duk_context": hx(&device_id.get().to_be_bytes()),
            "duk": hx(duk.expose()),
        }),
        &duk,
        &unique,
        iv,
        &dek,
    );

    // 2. Group: slots 5 and 200 of group 17, under GK_3.
    let group = SealInput {
        emm_id: EmmId(0x0001_0000_0002_0002),
        issued_at: ISSUED_AT,
        not_after: NOT_AFTER,
        address: Address::group_with_slots(group_id, [slot, 200]),
        key_version: gk_version,
        commands: vec![Command::EntitlementSet {
            entries: vec![
                Entitlement {
                    product_id: 101,
                    start: ISSUED_AT,
                    end: ISSUED_AT + 365 * 86_400,
                },
                Entitlement {
                    product_id: 102,
                    start: ISSUED_AT,
                    end: ISSUED_AT + 30 * 86_400,
                },
            ],
        }],
    };
    let (iv, dek) = (g.iv(), g.key());
    let v_group = emm_vector(
        "group",
        "Group EMM (0x83) for slots 5 and 200 of group 17 under GK_3: ENTITLEMENT_SET with two products",
        json!({ "gk": hx(gk.expose()), "gk_version": gk_version, "group_id": group_id, "slots": [slot, 200] }),
        &gk,
        &group,
        iv,
        &dek,
    );

    // 3. Global under GLK_2.
    let global = SealInput {
        emm_id: EmmId(0x0001_0000_0002_0003),
        issued_at: ISSUED_AT,
        not_after: NOT_AFTER,
        address: Address::Global,
        key_version: glk_version,
        commands: vec![
            Command::Osm {
                duration_s: 30,
                flags: emm::OSM_FLAG_FORCED,
                text: "Service notice: maintenance 02:00–04:00".into(),
            },
            Command::EntitlementRemove { product_id: 7 },
        ],
    };
    let (iv, dek) = (g.iv(), g.key());
    let v_global = emm_vector(
        "global",
        "Global EMM (0x84) under GLK_2: forced OSM (UTF-8 text) and ENTITLEMENT_REMOVE",
        json!({ "glk": hx(glk.expose()), "glk_version": glk_version }),
        &glk,
        &global,
        iv,
        &dek,
    );

    // 4. At rest: PMK_1 sealed in `keys` row 1 under root key generation 1.
    let (iv, dek) = (g.iv(), g.key());
    let row_id = 1u64;
    let root_version = 1u32;
    let blob = crypto::seal_key_at_rest_deterministic(&root, root_version, row_id, &pmk, &iv, &dek);
    let (k_wrap, k_mac) = crypto::derive_emm_keys(&root, 0x00, &row_id.to_be_bytes());
    let mut context = vec![0x00];
    context.extend_from_slice(&row_id.to_be_bytes());
    let v_rest = json!({
        "name": "at_rest",
        "description": "PMK_1 sealed at rest (§4) for keys row 1 under root key generation 1: a §3 section with \
                        table_id 0x00, table_id_extension = row_id mod 65536, address = row_id (u64), \
                        key_version = root key generation, plaintext = the raw 16-byte key (docs/format.md)",
        "keys": { "root_key": hx(root.expose()), "root_version": root_version, "row_id": row_id },
        "address_root": hx(root.expose()),
        "table_id": "00",
        "address": hx(&row_id.to_be_bytes()),
        "emm_kek_context": hx(&context),
        "k_wrap": hx(k_wrap.expose()),
        "k_mac": hx(k_mac.expose()),
        "key_version": root_version,
        "dek": hx(dek.expose()),
        "iv": hx(&iv),
        "plaintext": hx(pmk.expose()),
        "section": hx(&blob),
        "section_len": blob.len(),
        "section_parts": parts(&blob, 8),
    });

    let v_rotation = rotation_vector(&mut g, &gk, gk_version, group_id, slot);

    json!({
        "title": "casd EMM test vectors, contract v1 (docs/format.md §2-§4, §8)",
        "conventions": [
            "All byte strings are lowercase hex; all integers in byte strings are big-endian.",
            "KDF: NIST SP 800-108 counter mode, PRF AES-128-CMAC, K(i) = CMAC(key, u32(i) || label || 0x00 || context || u32(L)).",
            "duk = KDF(pmk, \"CAS-DUK\", duk_context = u64(device_id), L=128).",
            "k_wrap || k_mac = KDF(address_root, \"CAS-EMM-KEK\", emm_kek_context = table_id || address, L=256).",
            "wrapped_dek = AES-128-ECB(k_wrap, dek); ciphertext = AES-128-CTR(dek, iv as a 128-bit big-endian counter, plaintext).",
            "mac = AES-CMAC(k_mac, section[0 .. end of ciphertext]); crc32 = CRC-32/MPEG-2(section[0 .. end of mac]).",
            "The unique vector delivers the group and global vectors' keys; 'emm' is the reviewable JSON (no key bytes).",
            "The group_rotation vector is a group-addressed rotation: under the group vector's GK it delivers the group's next GK and the next GLK (keys.gk_next, keys.glk_next).",
            "dek and iv come from a seeded test RNG; production draws them from the OS CSPRNG for every section."
        ],
        "generator": format!("wire/tests/it/crypto_vectors.rs, ChaCha20Rng seed {SEED:#x}"),
        "vectors": [v_unique, v_group, v_global, v_rest, v_rotation],
    })
}

/// 5. Group-addressed rotation: one group EMM for slots 5 and 200 of
///    group 17 under GK_3 delivering GK_4 (slot written 0, ignored) and
///    GLK_3. Drawn after the other vectors so that they stay as they were.
fn rotation_vector(g: &mut Gen, gk: &Key128, gk_version: u32, group_id: u32, slot: u8) -> Value {
    let (gk_next, glk_next) = (g.key(), g.key());
    let rotation = SealInput {
        emm_id: EmmId(0x0001_0000_0002_0004),
        issued_at: ISSUED_AT,
        not_after: NOT_AFTER,
        address: Address::group_with_slots(group_id, [slot, 200]),
        key_version: gk_version,
        commands: vec![
            Command::GroupKey {
                group_id,
                slot: 0,
                key_version: gk_version + 1,
                activates_at: ISSUED_AT + 86_400,
                key: gk_next.clone(),
            },
            Command::GlobalKey {
                key_version: 3,
                activates_at: ISSUED_AT + 86_400,
                key: glk_next.clone(),
            },
        ],
    };
    let (iv, dek) = (g.iv(), g.key());
    emm_vector(
        "group_rotation",
        "Group EMM (0x83) for slots 5 and 200 of group 17 under GK_3 (the group vector's key): \
         GROUP_KEY delivering GK_4 of group 17 (slot 0, ignored in a group EMM) and GLOBAL_KEY delivering GLK_3",
        json!({
            "gk": hx(gk.expose()), "gk_version": gk_version, "group_id": group_id, "slots": [slot, 200],
            "gk_next": hx(gk_next.expose()), "glk_next": hx(glk_next.expose()),
        }),
        gk,
        &rotation,
        iv,
        &dek,
    )
}

fn render(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("json");
    s.push('\n');
    s
}

/// Rewrites the file when `CASD_WRITE_VECTORS` is set (once per test run,
/// before either test reads it).
fn maybe_write() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CASD_WRITE_VECTORS").is_some() {
            std::fs::create_dir_all(path().parent().expect("dir")).expect("mkdir");
            std::fs::write(path(), render(&generate())).expect("write vectors");
        }
    });
}

#[test]
fn vectors_file_is_what_the_generator_makes() {
    maybe_write();
    let generated = render(&generate());
    let on_disk = std::fs::read_to_string(path()).expect("tests/vectors/emm-v1.json exists");
    assert!(
        on_disk == generated,
        "emm-v1.json differs from the generator; if the change is deliberate, rerun with CASD_WRITE_VECTORS=1"
    );
}

/// Key deliveries: the unique vector's are the group/global vectors'
/// roots; the group_rotation vector's are its `keys.gk_next` /
/// `keys.glk_next`, and it is sealed under the group vector's root.
fn check_deliveries(vectors: &[Value], name: &str, commands: &[Command]) {
    let rotation = vectors
        .iter()
        .find(|x| x["name"] == "group_rotation")
        .unwrap();
    if name == "group_rotation" {
        let group = vectors.iter().find(|x| x["name"] == "group").unwrap();
        assert_eq!(
            key_field(rotation, "address_root"),
            key_field(group, "address_root")
        );
    }
    for c in commands {
        let (want, k) = match c {
            Command::GroupKey { key, .. } => ("group", key),
            Command::GlobalKey { key, .. } => ("global", key),
            _ => continue,
        };
        let expected = match (name, want) {
            ("group_rotation", "group") => key_field(&rotation["keys"], "gk_next"),
            ("group_rotation", _) => key_field(&rotation["keys"], "glk_next"),
            _ => key_field(
                vectors.iter().find(|x| x["name"] == want).unwrap(),
                "address_root",
            ),
        };
        assert_eq!(*k, expected, "{name}");
    }
}

/// Checks the file from its own fields, as an independent implementer would.
#[test]
fn vectors_file_verifies() {
    maybe_write();
    let text = std::fs::read_to_string(path()).expect("vectors file");
    let file: Value = serde_json::from_str(&text).expect("json");
    let vectors = file["vectors"].as_array().expect("vectors array");
    assert_eq!(vectors.len(), 5);
    for v in vectors {
        let name = v["name"].as_str().expect("name");
        let root = key_field(v, "address_root");
        let table_id = u8::from_str_radix(v["table_id"].as_str().expect("table_id"), 16).unwrap();
        let address = unhex(v, "address");
        let section = unhex(v, "section");
        let plaintext = unhex(v, "plaintext");
        let iv: [u8; 16] = unhex(v, "iv").try_into().unwrap();
        let dek = key_field(v, "dek");
        let key_version = v["key_version"].as_u64().unwrap() as u32;

        // Address-root derivation.
        if name == "unique" {
            let k = &v["keys"];
            let pmk = key_field(k, "pmk");
            let duk = crypto::derive_duk(&pmk, k["device_id"].as_u64().unwrap());
            assert_eq!(hx(duk.expose()), k["duk"].as_str().unwrap());
            assert_eq!(duk, root);
        }
        // K_wrap / K_mac.
        let mut ctx = vec![table_id];
        ctx.extend_from_slice(&address);
        assert_eq!(hx(&ctx), v["emm_kek_context"].as_str().unwrap(), "{name}");
        let (k_wrap, k_mac) = crypto::derive_emm_keys(&root, table_id, &address);
        assert_eq!(k_wrap, key_field(v, "k_wrap"), "{name}");
        assert_eq!(k_mac, key_field(v, "k_mac"), "{name}");

        // Byte-exact section from (keys, dek, iv, plaintext).
        let ext = u16::from_be_bytes([section[3], section[4]]);
        let rebuilt = SectionKeys::derive(&root, table_id, &address)
            .unwrap()
            .seal_deterministic(ext, key_version, &plaintext, 256, &iv, &dek)
            .unwrap();
        assert_eq!(hx(&rebuilt), hx(&section), "{name}");
        assert_eq!(section.len() as u64, v["section_len"].as_u64().unwrap());

        // Intermediates, by the spec's offsets.
        let p = &v["section_parts"];
        let a = 8 + address.len();
        let n = section.len();
        assert_eq!(unhex(p, "iv"), iv);
        assert_eq!(unhex(p, "ciphertext").len(), plaintext.len());
        assert_eq!(section[a], 0x01);
        assert_eq!(
            crypto::crc32_mpeg2(&section[..n - 4])
                .to_be_bytes()
                .to_vec(),
            unhex(p, "crc32")
        );
        assert_eq!(&section[8..a], &address[..]);

        // Open as a receiver.
        let opened = crypto::open_section(&root, &section).unwrap();
        assert_eq!(&opened.plaintext[..], &plaintext[..], "{name}");
        assert_eq!(opened.key_version, key_version);

        if name == "at_rest" {
            let k = &v["keys"];
            let row = k["row_id"].as_u64().unwrap();
            let u = crypto::open_key_at_rest(&root, row, &section).unwrap();
            assert_eq!(hx(u.key.expose()), hx(&plaintext));
            assert_eq!(
                u64::from(u.root_version),
                k["root_version"].as_u64().unwrap()
            );
            let unique = vectors.iter().find(|x| x["name"] == "unique").unwrap();
            assert_eq!(hx(&plaintext), unique["keys"]["pmk"].as_str().unwrap());
        } else {
            let o = emm::open_emm(&section, &root).unwrap();
            assert_eq!(
                emm::review_json(&SealInput {
                    emm_id: o.emm_id,
                    issued_at: o.issued_at,
                    not_after: o.not_after,
                    address: o.address.clone(),
                    key_version: o.key_version,
                    commands: o.commands.clone(),
                }),
                v["emm"],
                "{name}"
            );
            check_deliveries(vectors, name, &o.commands);
        }
    }
}
