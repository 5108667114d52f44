//! Property tests: seal → open round-trips for arbitrary plaintexts,
//! addresses and commands; any single bit flip in a section is refused;
//! decoding arbitrary bytes never panics.

use casd_wire::crypto::{self, Key128, SectionKeys, SectionSpec};
use casd_wire::emm::{
    self, Address, Command, DeviceId, EmmId, EmmPlaintext, Entitlement, SealInput,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn key() -> impl Strategy<Value = Key128> {
    any::<[u8; 16]>().prop_map(Key128::from_bytes)
}

fn address() -> impl Strategy<Value = Address> {
    prop_oneof![
        (1..=DeviceId::MAX).prop_map(|id| Address::Unique {
            device_id: DeviceId::new(id).expect("in range"),
        }),
        (any::<u32>(), any::<[u8; 32]>())
            .prop_map(|(group_id, bitmap)| Address::Group { group_id, bitmap }),
        Just(Address::Global),
    ]
}

fn entitlement() -> impl Strategy<Value = Entitlement> {
    (1..=u32::MAX, any::<u32>(), any::<u32>()).prop_map(|(product_id, start, end)| Entitlement {
        product_id,
        start,
        end,
    })
}

fn command(with_keys: bool) -> BoxedStrategy<Command> {
    let plain = prop_oneof![
        entitlement().prop_map(Command::EntitlementAdd),
        (1..=u32::MAX).prop_map(|product_id| Command::EntitlementRemove { product_id }),
        Just(Command::DeviceEnable),
        Just(Command::DeviceDisable),
        (any::<u16>(), any::<u8>(), "\\PC{0,20}").prop_map(|(duration_s, flags, text)| {
            Command::Osm {
                duration_s,
                flags,
                text,
            }
        }),
        prop::collection::vec(entitlement(), 0..5)
            .prop_map(|entries| Command::EntitlementSet { entries }),
        (0x09..=0xFFu8, prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(tag, value)| Command::Unknown { tag, value }),
    ];
    if !with_keys {
        return plain.boxed();
    }
    prop_oneof![
        plain,
        (any::<u32>(), any::<u8>(), any::<u32>(), any::<u32>(), key()).prop_map(
            |(group_id, slot, key_version, activates_at, key)| Command::GroupKey {
                group_id,
                slot,
                key_version,
                activates_at,
                key,
            }
        ),
        (any::<u32>(), any::<u32>(), key()).prop_map(|(key_version, activates_at, key)| {
            Command::GlobalKey {
                key_version,
                activates_at,
                key,
            }
        }),
    ]
    .boxed()
}

fn seal_input() -> impl Strategy<Value = SealInput> {
    address().prop_flat_map(|address| {
        let unique = address.is_unique();
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(command(unique), 1..4),
        )
            .prop_map(
                move |(id, issued_at, not_after, key_version, commands)| SealInput {
                    emm_id: EmmId(id),
                    issued_at,
                    not_after,
                    address: address.clone(),
                    key_version,
                    commands,
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn envelope_roundtrip(root in key(), address in address(), ext in any::<u16>(), kv in any::<u32>(),
                          plaintext in prop::collection::vec(any::<u8>(), 0..300), seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let bytes = address.address_bytes();
        let spec = SectionSpec { table_id: address.table_id(), table_id_extension: ext, address: &bytes, key_version: kv };
        let s = crypto::seal_section(&root, &spec, &plaintext, 4096, &mut rng).unwrap();
        prop_assert_eq!(s.len(), crypto::SECTION_OVERHEAD + bytes.len() + plaintext.len());
        let o = crypto::open_section(&root, &s).unwrap();
        prop_assert_eq!(&o.plaintext[..], &plaintext[..]);
        prop_assert_eq!(o.key_version, kv);
        prop_assert_eq!(o.table_id_extension, ext);
        let keys = SectionKeys::derive(&root, address.table_id(), &bytes).unwrap();
        prop_assert_eq!(&crypto::open_section_with_keys(&keys, &s).unwrap().plaintext[..], &plaintext[..]);
    }

    #[test]
    fn emm_roundtrip(input in seal_input(), root in key(), seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        match emm::seal_emm(&input, &root, 4096, &mut rng) {
            Ok(s) => {
                let o = emm::open_emm(&s, &root).unwrap();
                prop_assert_eq!(&o.address, &input.address);
                prop_assert_eq!(o.emm_id, input.emm_id);
                prop_assert_eq!(o.issued_at, input.issued_at);
                prop_assert_eq!(o.not_after, input.not_after);
                prop_assert_eq!(o.key_version, input.key_version);
                prop_assert_eq!(&o.commands, &input.commands);
            }
            Err(e) => prop_assert!(false, "seal failed: {}", e),
        }
    }

    #[test]
    fn any_single_bit_flip_is_refused(input in seal_input(), root in key(), seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let s = emm::seal_emm(&input, &root, 4096, &mut rng).unwrap();
        let bit = pick.index(s.len() * 8);
        let mut bad = s.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(crypto::open_section(&root, &bad).is_err(), "bit {} accepted", bit);
        prop_assert!(emm::open_emm(&bad, &root).is_err());
    }

    #[test]
    fn every_bit_flip_of_one_section_is_refused(seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let root = Key128::random(&mut rng);
        let spec = SectionSpec { table_id: 0x84, table_id_extension: 1, address: &[], key_version: 1 };
        let s = crypto::seal_section(&root, &spec, b"0123456789abcdef0123456789", 256, &mut rng).unwrap();
        for bit in 0..s.len() * 8 {
            let mut bad = s.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(crypto::open_section(&root, &bad).is_err(), "bit {} accepted", bit);
        }
    }

    #[test]
    fn wrong_key_is_refused(input in seal_input(), root in key(), other in key(), seed in any::<u64>()) {
        prop_assume!(root != other);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let s = emm::seal_emm(&input, &root, 4096, &mut rng).unwrap();
        prop_assert_eq!(crypto::open_section(&other, &s), Err(crypto::OpenError::Mac));
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), root in key()) {
        let _ = EmmPlaintext::decode(&bytes);
        let _ = crypto::parse_section(&bytes);
        let _ = crypto::open_section(&root, &bytes);
        let _ = emm::open_emm(&bytes, &root);
        let _ = crypto::open_key_at_rest(&root, 1, &bytes);
        let _ = crypto::at_rest_root_version(&bytes);
        for t in [0x00u8, 0x82, 0x83, 0x84, 0x85] {
            let _ = Address::from_wire(t, &bytes);
        }
    }

    /// Arbitrary bytes made to pass the header and CRC checks still never
    /// panic and are refused by the MAC.
    #[test]
    fn crc_valid_garbage_is_refused(table in prop::sample::select(vec![0x00u8, 0x82, 0x83, 0x84]),
                                     body in prop::collection::vec(any::<u8>(), 0..300), root in key()) {
        let mut s = vec![table, 0, 0, 0, 0, 0xC1, 0, 0];
        s.extend_from_slice(&body);
        s.push(crypto::FORMAT_VERSION);
        let total = s.len() + 4;
        if total - 3 <= 0x0FFF {
            let sl = (total - 3) as u16;
            s[1] = 0xF0 | (sl >> 8) as u8;
            s[2] = sl as u8;
        }
        let crc = crypto::crc32_mpeg2(&s);
        s.extend_from_slice(&crc.to_be_bytes());
        prop_assert!(crypto::open_section(&root, &s).is_err());
        prop_assert!(emm::open_emm(&s, &root).is_err());
        prop_assert!(crypto::open_key_at_rest(&root, 1, &s).is_err());
    }

    #[test]
    fn plaintext_decode_of_encoded_prefix_never_panics(input in seal_input(), cut in any::<prop::sample::Index>()) {
        let p = EmmPlaintext { emm_id: input.emm_id, issued_at: input.issued_at, not_after: input.not_after, commands: input.commands.clone() };
        let enc = p.encode().unwrap();
        prop_assert_eq!(EmmPlaintext::decode(&enc).unwrap(), p);
        let n = cut.index(enc.len());
        let _ = EmmPlaintext::decode(&enc[..n]);
    }

    #[test]
    fn at_rest_roundtrip(root in key(), k in key(), row in any::<u64>(), rv in any::<u32>(), seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let blob = crypto::seal_key_at_rest(&root, rv, row, &k, &mut rng);
        prop_assert_eq!(blob.len(), crypto::AT_REST_BLOB_LEN);
        let u = crypto::open_key_at_rest(&root, row, &blob).unwrap();
        prop_assert_eq!(u.key, k);
        prop_assert_eq!(u.root_version, rv);
        prop_assert!(crypto::open_key_at_rest(&root, row.wrapping_add(1), &blob).is_err());
    }
}
